//! Configuration: the limits a side advertises and its timers. Every default is documented.

use std::time::{Duration, Instant};

use crate::frame::MIN_MAX_FRAME_LEN;

/// Limits a side advertises in its hello; the peer must respect them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Limits {
    /// Largest frame payload this side accepts. Default 64 KiB; never below 16 KiB.
    pub max_frame_len: u32,
    /// Initial credit for each stream this side receives on: how many bytes of one
    /// stream it buffers until the stream's reader shows it keeps up (the window then
    /// grows, see [`Config::max_stream_window`]). Default 256 KiB.
    pub stream_window: u32,
    /// Initial credit for the whole connection: how many data bytes may be in flight
    /// towards this side before it has processed them. Default 16 MiB.
    pub connection_window: u32,
    /// Streams this side lets the peer have open at once. Default 256.
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: 64 * 1024,
            stream_window: 256 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_streams: 256,
        }
    }
}

impl Limits {
    /// The limits with each field raised to its protocol minimum (frames of 16 KiB, one
    /// byte of window, one stream), so that a configuration can never deadlock the tunnel.
    pub fn sanitized(self) -> Limits {
        Limits {
            max_frame_len: self.max_frame_len.max(MIN_MAX_FRAME_LEN),
            stream_window: self.stream_window.clamp(1, crate::MAX_WINDOW),
            connection_window: self.connection_window.clamp(1, crate::MAX_WINDOW),
            max_streams: self.max_streams.max(1),
        }
    }
}

/// Configuration of one side of a connection.
#[derive(Debug, Clone)]
pub struct Config {
    /// What this side advertises and enforces.
    pub limits: Limits,
    /// Time from creation to ready (hello, auth, auth result). Default 30 s, enough for a
    /// server that asks STS to verify the agent.
    pub handshake_timeout: Duration,
    /// How often a ready connection sends a ping (keepalive and RTT sample). Default 5 s.
    pub keepalive_interval: Duration,
    /// A peer that sends nothing at all for this long is presumed dead. Default 15 s.
    pub idle_timeout: Duration,
    /// Agent: how long the server has to answer the ping that goes with a stream's open or
    /// data sent at a moment the server had been silent for [`PROBE_QUIET`] (or the agent's
    /// keepalive ping was unanswered), or that goes when an open is still unanswered
    /// [`PROBE_QUIET`] after it was sent. A server that does not answer it within this long
    /// (or four round trips, if longer) gets no new streams on this connection, and the
    /// opens it has not answered are refused so that they can go elsewhere (see
    /// `Event::Unresponsive`); streams under way are not cut, since a live path whose
    /// bytes wait in a queue looks the same. A dead path under an idle tunnel is so found
    /// while someone waits, not after `idle_timeout`. Default 5 s; zero turns probes off.
    pub probe_timeout: Duration,
    /// Server only: whether authentication goes to the application (`true`) or every
    /// agent that completes the hello is admitted (`false`, for mTLS-only setups).
    /// Default `true`.
    pub require_auth: bool,
    /// Largest DATA payload this side sends (further capped by the peer's
    /// `max_frame_len`). Default 16 KiB.
    pub data_frame_len: u32,
    /// Control output (answers to pings, window updates, refusals) that may wait
    /// unsent before `handle_input` stops consuming. Default 256 KiB; 0 counts as 1.
    pub max_control_backlog: usize,
    /// Data bytes one `poll_transmit` call emits at most. Default 256 KiB; 0 counts as 1.
    pub transmit_batch: usize,
    /// Written but not yet transmitted bytes one stream may hold: a write takes at most
    /// this much beyond what is already buffered, whatever credit the peer has granted.
    /// It decouples the sender's memory from the window, which may be large so that a
    /// long or busy path stays full. Default 256 KiB; less than 16 KiB (one DATA frame)
    /// counts as 16 KiB.
    pub send_buffer: usize,
    /// Largest window one stream's receiving side grows to. A stream starts with
    /// `limits.stream_window`. While the window is smaller than what its reader takes in
    /// [`WINDOW_GROWTH_RTTS`] round trips, at the reader's pace over the last 8 round
    /// trips (at least the last 100 ms), the window, not the reader, limits the stream:
    /// each update grows it by up to its size, up to this. A window more than four times
    /// that halves. A reader that stalls or reads slowly, even in large bursts, keeps a
    /// small window, and so little buffered memory. Default 4 MiB; less than
    /// `limits.stream_window` counts as that.
    pub max_stream_window: u32,
    /// How much all streams' windows may grow beyond `limits.stream_window` together: with
    /// the number of streams it bounds what the connection's streams buffer (at most
    /// `streams × stream_window + window_growth_budget`). Default 16 MiB.
    pub window_growth_budget: u64,
}

/// How long the peer must have been silent for a stream's open or data to go with a
/// probe ([`Config::probe_timeout`]). On a busy connection the peer's frames keep coming
/// and no probe is sent.
pub const PROBE_QUIET: Duration = Duration::from_secs(1);

/// Round trips of its reader's pace a stream's window grows to cover
/// ([`Config::max_stream_window`]). Eight, where one would keep a path full: the round
/// trip is measured on an idle connection and grows under load, and the window is
/// returned in halves.
pub const WINDOW_GROWTH_RTTS: u32 = 8;

/// The instant `limit` after `at`. Limits come from configuration files and flags; one
/// beyond what the clock can count gives a deadline a century away rather than a panic.
pub fn deadline(at: Instant, limit: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    at.checked_add(limit)
        .or_else(|| at.checked_add(CENTURY))
        .unwrap_or(at)
}

impl Config {
    /// `send_buffer` as the connection applies it: at least 16 KiB.
    pub fn sanitized_send_buffer(&self) -> usize {
        self.send_buffer.max(MIN_MAX_FRAME_LEN as usize)
    }

    /// `max_stream_window` as the connection applies it: at least the initial window,
    /// at most the protocol's largest.
    pub fn sanitized_max_stream_window(&self) -> u32 {
        self.max_stream_window
            .clamp(self.limits.sanitized().stream_window, crate::MAX_WINDOW)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            probe_timeout: Duration::from_secs(5),
            require_auth: true,
            data_frame_len: 16 * 1024,
            max_control_backlog: 256 * 1024,
            transmit_batch: 256 * 1024,
            send_buffer: 256 * 1024,
            max_stream_window: 4 * 1024 * 1024,
            window_growth_budget: 16 * 1024 * 1024,
        }
    }
}
