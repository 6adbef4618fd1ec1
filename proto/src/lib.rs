//! Sans-IO core of the Fluidity tunnel: framing, the hello → auth → ready handshake, and
//! multiplexed streams with flow control, keepalive and graceful shutdown.
//!
//! Nothing here does I/O, reads a clock, spawns, locks or panics on peer input: a
//! [`Connection`] is a state machine fed bytes and instants, which makes it testable in a
//! deterministic simulation and fuzzable. A driver (the `fluidity-runtime-smol` crate)
//! moves its bytes over TLS.
//!
//! # Layout
//!
//! - [`frame`]: the 12-byte header, frame types and the incremental [`Decoder`].
//! - [`handshake`]: hello, version negotiation, authentication exchange.
//! - [`stream`]: per-stream state, credit windows, [`StreamEvent`]s, and the
//!   [`SendStream`]/[`RecvStream`] views.
//! - [`connection`]: the [`Connection`] that ties them together.
//!
//! The wire format is specified in `docs/PROTOCOL.md`.
//!
//! # The run loop
//!
//! After **every** input (bytes, EOF, a timer, or an application call such as
//! `open`, `write`, `read`, `accept_auth`), drain the outputs, in this order:
//!
//! 1. [`Connection::poll_transmit`] until it returns 0, sending what it appends;
//! 2. [`Connection::poll`] until `None`, acting on each [`Event`];
//! 3. [`Connection::poll_timeout`], re-arming the one timer;
//! 4. stop when [`Connection::is_drained`] is true.
//!
//! ```
//! # use std::{sync::Arc, time::Instant};
//! # use fluidity_proto::*;
//! let now = Instant::now();
//! let cfg = Arc::new(Config { require_auth: false, ..Config::default() });
//! let mut agent = Connection::agent(cfg.clone(), Credentials::none(), now);
//! let mut server = Connection::server(cfg, now);
//! let (mut a2s, mut s2a) = (Vec::new(), Vec::new());
//! for _ in 0..3 {
//!     agent.poll_transmit(now, &mut a2s);
//!     server.poll_transmit(now, &mut s2a);
//!     let n = server.handle_input(now, &a2s); a2s.drain(..n);
//!     let n = agent.handle_input(now, &s2a); s2a.drain(..n);
//! }
//! assert!(matches!(agent.poll(), Some(Event::Ready { .. })));
//! let id = agent.open(now, Target::parse("example.com:443").unwrap()).unwrap();
//! agent.send_stream(id).write(b"hello").unwrap();
//! ```
//!
//! # Without copying
//!
//! Each data call has a variant that moves [`bytes::Bytes`] instead of copying slices,
//! for a driver that writes vectored (e.g. into TLS): [`SendStream::write_bytes`] takes
//! the application's buffer, [`Connection::poll_transmit_chunks`] hands out the frames as
//! header and payload chunks, and [`Connection::handle_input_bytes`] decodes from the
//! driver's [`bytes::BytesMut`]. The two kinds of call may be mixed; the frames, flow
//! control and scheduling are the same. Bytes copied in by [`SendStream::write`] leave
//! through `poll_transmit_chunks` without a second copy too: they are split off the
//! stream's buffer, whose allocation is reused once the chunks are dropped.
//!
//! Reading and writing never block: [`Error::Blocked`] means "wait for
//! [`StreamEvent::Readable`] or [`StreamEvent::Writable`]". Protocol violations by the
//! peer never come back from a handler: the connection sends a goaway with an
//! [`ErrorCode`] and raises [`Event::ConnectionLost`].
//!
//! # Flow control
//!
//! Each stream has a receive window (what the receiver will buffer for it) and the
//! connection has one more (what may be in flight in total). A sender never sends
//! beyond either; a receiver treats any excess as a `FLOW_CONTROL` error. Stream credit
//! returns as the application reads; connection credit returns as frames are processed,
//! so a stalled reader holds only its own stream's window and never blocks the others.
//! Received payloads share the receive buffer's allocations, which hold other frames
//! too; a payload in another allocation than its stream's last shared chunk is copied
//! instead (counted by [`Stats::rx_copied`]) when sharing it would leave the stream's
//! shared payloads keeping more of those allocations alive than twice their bytes plus a
//! slack (two allocations, or half the window while the stream buffers less than that);
//! payloads under 1 KiB are always copied, and gathered (one read may return several).
//! Whatever the peer sends, a stalled reader thus keeps about three times its window in
//! memory at most.

#![warn(unreachable_pub)]

mod config;
pub mod connection;
mod error;
pub mod frame;
pub mod handshake;
pub mod stream;

#[cfg(test)]
mod tests;

#[cfg(any(fuzzing, feature = "fuzzing"))]
pub mod fuzzing;

use std::fmt;

pub use config::{deadline, Config, Limits, PROBE_QUIET, WINDOW_GROWTH_RTTS};
pub use connection::{Connection, Event, Stats};
pub use error::{Error, ErrorCode};
pub use frame::{Decoder, Frame, FrameType};
pub use handshake::{AuthFailure, AuthRequest, AuthResult, Credentials};
pub use stream::target::{Host, OpenRefusal, RefusalReason, Target, MAX_DETAIL_LEN, MAX_HOST_LEN};
pub use stream::{RecvStream, SendStream, StreamEvent, StreamInfo};

/// Largest window a credit counter may reach (as in HTTP/2).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Which end of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Side {
    /// The laptop end: opens streams.
    Agent,
    /// The cloud end: answers opens and dials.
    Server,
}

/// A stream id. Streams are opened by the agent with odd ids, increasing; 0 names the
/// connection itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct StreamId(pub u32);

impl StreamId {
    /// The connection (for connection-level frames).
    pub const CONNECTION: StreamId = StreamId(0);

    /// Whether the agent opened this stream (odd ids).
    pub fn is_agent_initiated(self) -> bool {
        self.0 % 2 == 1
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}
