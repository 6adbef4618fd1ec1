//! The scenario a seed stands for: configurations, link faults, the streams the
//! applications open and how each ends, and how the connection ends. Everything is drawn
//! up front from the seed, so the printed options describe a failing run completely.

use std::time::Duration;

use fluidity_proto::{AuthFailure, Config, ErrorCode, Limits, RefusalReason, Side};

use super::rng::Rng;

/// Faults of one direction of the link.
#[derive(Debug, Clone, Copy)]
pub struct LinkOptions {
    /// Base one-way delay.
    pub latency: Duration,
    /// Extra random delay per segment (order is kept).
    pub jitter: Duration,
    /// Chance, per piece, that a transmitted buffer is cut at a random point.
    pub split_per_mille: u64,
    /// Largest piece when cutting.
    pub split_max: usize,
    /// Chance, per send, of a stall (nothing delivered for a while).
    pub stall_per_mille: u64,
    /// Longest stall.
    pub stall_max: Duration,
    /// Bytes the transport holds towards the receiver (in the network plus read but not
    /// yet consumed), like TCP's buffers: while full, the sender's driver stops calling
    /// `poll_transmit`. `None`: unbounded.
    pub capacity: Option<usize>,
}

/// How a reader consumes one direction of a stream.
#[derive(Debug, Clone, Copy)]
pub struct ReaderPlan {
    /// Largest read.
    pub chunk: usize,
    /// Time between reads (zero: reads everything as soon as it is readable).
    pub interval: Duration,
    /// The reader stops reading at this offset from the stream's start on its side...
    pub pause_at: Option<Duration>,
    /// ...for this long (`None`: for ever; then a reset always ends the stream).
    pub pause_for: Option<Duration>,
}

/// One direction of a stream.
#[derive(Debug, Clone, Copy)]
pub struct DirPlan {
    /// Bytes the writer writes, then it finishes.
    pub len: u64,
    /// Largest write.
    pub write_chunk: usize,
    /// How the other side reads.
    pub reader: ReaderPlan,
}

/// A reset of the stream by one side.
#[derive(Debug, Clone, Copy)]
pub struct ResetPlan {
    /// Who resets.
    pub by: Side,
    /// When, counted from the stream's start on that side.
    pub after: Duration,
    /// The code.
    pub code: ErrorCode,
}

/// One stream the agent opens.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    /// When the agent opens it, counted from when it became ready.
    pub open_at: Duration,
    /// How long the server application takes to answer the open.
    pub answer_delay: Duration,
    /// `Some`: the server refuses it.
    pub refuse: Option<RefusalReason>,
    /// Agent to server.
    pub up: DirPlan,
    /// Server to agent.
    pub down: DirPlan,
    /// An abort by either side.
    pub reset: Option<ResetPlan>,
}

/// How the server answers authentication (with `require_auth` on).
#[derive(Debug, Clone, Copy)]
pub enum AuthPlan {
    /// Admits the agent after a delay.
    Accept(Duration),
    /// Rejects it after a delay.
    Reject(Duration, AuthFailure),
    /// Never answers: both handshakes must time out.
    Ignore,
}

/// How the run ends.
#[derive(Debug, Clone, Copy)]
pub enum Ending {
    /// `go_away` by one side, once every stream has ended or at a fixed time after ready.
    GoAway {
        /// Who.
        by: Side,
        /// `None`: once all streams have ended on both sides.
        at: Option<Duration>,
    },
    /// `close` with a code, at a time after the start.
    Close {
        /// Who.
        by: Side,
        /// When, from the start.
        at: Duration,
        /// The code.
        code: ErrorCode,
    },
    /// The transport breaks (EOF on both sides, queued bytes lost).
    Abort {
        /// When, from the start.
        at: Duration,
    },
    /// The link goes silent both ways; only timeouts can notice.
    Silent {
        /// When, from the start.
        at: Duration,
    },
}

/// Everything a seed decides.
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed the options came from.
    pub seed: u64,
    /// Agent configuration.
    pub agent: Config,
    /// Server configuration.
    pub server: Config,
    /// Agent to server.
    pub up_link: LinkOptions,
    /// Server to agent.
    pub down_link: LinkOptions,
    /// The server application's answer to authentication.
    pub auth: AuthPlan,
    /// Streams the agent opens.
    pub streams: Vec<StreamPlan>,
    /// How the run ends.
    pub ending: Ending,
}

/// The smallest control backlog drawn when a transport can fill up.
pub const MIN_BACKLOG_WITH_FULL_TRANSPORTS: usize = 1024;
/// Upper bound on frames one direction of one stream may need: keeps each seed cheap.
const MAX_FRAMES_PER_DIR: u64 = 4000;
/// Upper bound on window round trips one direction may need.
const MAX_WINDOW_ROUNDS: u64 = 150;

impl Options {
    /// The scenario for `seed`.
    pub fn generate(seed: u64) -> Options {
        let mut rng = Rng::new(seed);
        let up_link = link(&mut rng);
        let down_link = link(&mut rng);
        let max_delay = max_one_way(&up_link).max(max_one_way(&down_link));
        let max_stall = up_link.stall_max.max(down_link.stall_max);
        // Keepalive must keep a live connection alive through the worst stall and delay
        // the link can produce, or a correct implementation would time out.
        let keepalive = rng.duration(Duration::from_millis(100), Duration::from_millis(2000));
        let bounded = up_link.capacity.is_some() || down_link.capacity.is_some();
        // A pong waits behind whatever the driver already took from `poll_transmit`; with
        // small transport buffers that is a few round trips more (batches are capped to
        // a few buffers' worth below).
        let queueing = if bounded {
            max_delay * 12
        } else {
            Duration::ZERO
        };
        let idle = keepalive * 2
            + max_stall * 2
            + max_delay * 4
            + queueing
            + rng.duration(Duration::from_millis(100), Duration::from_millis(3000));
        let mut agent = config(&mut rng, keepalive, idle);
        let mut server = config(&mut rng, keepalive, idle);
        for (c, link) in [(&mut agent, &up_link), (&mut server, &down_link)] {
            if bounded {
                // With full transports both ways, a control backlog smaller than a
                // couple of frames deadlocks: neither side may transmit, so neither
                // consumes input (see `bulk_transfer_both_ways_through_full_transports`).
                c.max_control_backlog = c.max_control_backlog.max(MIN_BACKLOG_WITH_FULL_TRANSPORTS);
            }
            if let Some(cap) = link.capacity {
                // A batch far larger than the transport's buffers would hold keepalive
                // answers back for longer than any idle timeout drawn here: a property
                // of the driver's batching on a slow link, not of the protocol.
                c.transmit_batch = c.transmit_batch.min(cap * 4).max(100);
            }
        }
        server.require_auth = rng.chance(500);
        let handshake = agent.handshake_timeout.min(server.handshake_timeout);
        let auth = if !server.require_auth {
            AuthPlan::Accept(Duration::ZERO)
        } else if rng.chance(200) {
            let failure = rng.pick(&[
                AuthFailure::NotAllowed,
                AuthFailure::InvalidCredentials,
                AuthFailure::Replayed,
                AuthFailure::RateLimited,
            ]);
            AuthPlan::Reject(rng.duration(Duration::ZERO, handshake / 2), failure)
        } else if rng.chance(80) {
            AuthPlan::Ignore
        } else {
            // Well inside the handshake deadline even with a stalled link.
            let room = handshake.saturating_sub(max_delay * 4 + max_stall * 4) / 2;
            AuthPlan::Accept(rng.duration(Duration::ZERO, room))
        };

        let n_streams = match rng.below(10) {
            0 => 0,
            1..=5 => rng.range_usize(1, 4),
            _ => rng.range_usize(5, 16),
        };
        let mut streams = Vec::with_capacity(n_streams);
        for _ in 0..n_streams {
            streams.push(stream(&mut rng, &agent, &server, n_streams));
        }

        let horizon = Duration::from_millis(rng.range(0, 8000));
        let ending = match rng.below(20) {
            0..=7 => Ending::GoAway {
                by: side(&mut rng),
                at: None,
            },
            8..=11 => Ending::GoAway {
                by: side(&mut rng),
                at: Some(horizon),
            },
            12..=14 => Ending::Close {
                by: side(&mut rng),
                at: horizon,
                code: rng.pick(&[ErrorCode::NO_ERROR, ErrorCode::CANCEL, ErrorCode(0x77)]),
            },
            15..=16 => Ending::Abort { at: horizon },
            _ => Ending::Silent { at: horizon },
        };
        // Drawn last, so that a seed's other draws are what they were before this setting
        // existed. Often below the window, so that writes block on the buffer, not the
        // credit; values under the protocol's minimum check that it is raised.
        agent.send_buffer = rng.log_range(1, 400_000) as usize;
        server.send_buffer = rng.log_range(1, 400_000) as usize;
        // Window growth, drawn after those for the same reason: from none (a largest window
        // under the initial one counts as the initial one) to windows far above it, with
        // budgets that often cut it short.
        for c in [&mut agent, &mut server] {
            c.max_stream_window = rng.log_range(1, 2_000_000) as u32;
            c.window_growth_budget = rng.log_range(1, 4_000_000);
        }
        Options {
            seed,
            agent,
            server,
            up_link,
            down_link,
            auth,
            streams,
            ending,
        }
    }

    /// The largest one-way delay of either direction, stalls included.
    pub fn worst_delay(&self) -> Duration {
        max_one_way(&self.up_link).max(max_one_way(&self.down_link))
            + self.up_link.stall_max.max(self.down_link.stall_max)
    }
}

fn side(rng: &mut Rng) -> Side {
    if rng.chance(500) {
        Side::Agent
    } else {
        Side::Server
    }
}

fn max_one_way(l: &LinkOptions) -> Duration {
    l.latency + l.jitter
}

fn link(rng: &mut Rng) -> LinkOptions {
    let calm = rng.chance(200);
    LinkOptions {
        latency: rng.duration(Duration::ZERO, Duration::from_millis(40)),
        jitter: if calm {
            Duration::ZERO
        } else {
            rng.duration(Duration::ZERO, Duration::from_millis(20))
        },
        split_per_mille: if calm {
            0
        } else {
            rng.pick(&[0, 100, 300, 700])
        },
        split_max: rng.log_range(1, 70_000) as usize,
        stall_per_mille: if calm { 0 } else { rng.pick(&[0, 0, 5, 30]) },
        stall_max: rng.duration(Duration::ZERO, Duration::from_millis(500)),
        capacity: rng.chance(400).then(|| rng.log_range(64, 300_000) as usize),
    }
}

fn config(rng: &mut Rng, keepalive: Duration, idle: Duration) -> Config {
    let limits = Limits {
        // Below 16 KiB is raised to 16 KiB by `sanitized`; drawing under it checks that.
        max_frame_len: rng.range(8 * 1024, 80 * 1024) as u32,
        stream_window: rng.log_range(1, 300_000) as u32,
        connection_window: rng.log_range(1, 1_000_000) as u32,
        max_streams: rng.range(1, 10) as u32,
    };
    Config {
        limits,
        handshake_timeout: rng.duration(Duration::from_secs(3), Duration::from_secs(20)),
        keepalive_interval: keepalive,
        idle_timeout: idle,
        // A live peer answers a probe's ping within the idle timeout drawn above (it covers
        // the link's worst stall, delay and queueing), and no sooner can be promised.
        probe_timeout: idle,
        require_auth: true,
        data_frame_len: rng.log_range(1, 20_000) as u32,
        // Tiny backlogs make `handle_input` stop early and ask to be called again.
        max_control_backlog: if rng.chance(300) {
            rng.range(1, 64) as usize
        } else {
            rng.log_range(1, 300_000) as usize
        },
        transmit_batch: rng.log_range(100, 300_000) as usize,
        // Drawn at the end of `Options::generate`.
        send_buffer: Config::default().send_buffer,
        max_stream_window: Config::default().max_stream_window,
        window_growth_budget: Config::default().window_growth_budget,
    }
}

fn dir(rng: &mut Rng, sender: &Config, receiver: &Config, n_streams: usize) -> DirPlan {
    let window = u64::from(receiver.limits.sanitized().stream_window);
    let conn = u64::from(receiver.limits.sanitized().connection_window);
    let frame = u64::from(sender.data_frame_len.max(1))
        .min(sender.transmit_batch as u64)
        .min(u64::from(receiver.limits.sanitized().max_frame_len));
    // Credit returns at half the window: each round trip moves about that much.
    let per_round = (window / 2)
        .max(1)
        .min((conn / 2).max(1) / n_streams.max(1) as u64)
        .max(1);
    let cap = (frame * MAX_FRAMES_PER_DIR)
        .min(per_round * MAX_WINDOW_ROUNDS)
        .min(400_000);
    let len = match rng.below(10) {
        0 => 0,
        1 => rng.range(1, 16.min(cap)),
        _ => rng.log_range(1, cap),
    };
    let chunk_floor = (len / 200).max(1) as usize;
    let chunk = (rng.log_range(1, 70_000) as usize).max(chunk_floor);
    let reader = ReaderPlan {
        chunk,
        interval: if rng.chance(700) {
            Duration::ZERO
        } else {
            rng.duration(Duration::from_micros(100), Duration::from_millis(20))
        },
        pause_at: rng
            .chance(150)
            .then(|| rng.duration(Duration::ZERO, Duration::from_millis(500))),
        pause_for: Some(rng.duration(Duration::from_millis(1), Duration::from_secs(3))),
    };
    DirPlan {
        len,
        write_chunk: (rng.log_range(1, 100_000) as usize).max(chunk_floor),
        reader,
    }
}

fn stream(rng: &mut Rng, agent: &Config, server: &Config, n_streams: usize) -> StreamPlan {
    let mut up = dir(rng, agent, server, n_streams);
    let mut down = dir(rng, server, agent, n_streams);
    let mut reset = rng.chance(150).then(|| ResetPlan {
        by: side(rng),
        after: rng.duration(Duration::ZERO, Duration::from_millis(1500)),
        code: ErrorCode(rng.range(0, 20) as u32),
    });
    // A reader that stops for ever needs a reset to end its stream. Only one direction
    // may: the other reader may finish before its pause and never reset.
    let mut forever = false;
    for (d, reader_side) in [(&mut up, Side::Server), (&mut down, Side::Agent)] {
        if d.reader.pause_at.is_some() && !forever && rng.chance(200) {
            forever = true;
            // Only the reader can be relied on to reset: the writer's side of the
            // stream may have ended (FIN sent, EOF read) before its reset time.
            d.reader.pause_for = None;
            reset = Some(ResetPlan {
                by: reader_side,
                after: rng.duration(Duration::from_millis(500), Duration::from_secs(3)),
                code: ErrorCode::CANCEL,
            });
        }
    }
    StreamPlan {
        open_at: rng.duration(Duration::ZERO, Duration::from_millis(1500)),
        answer_delay: rng.duration(Duration::ZERO, Duration::from_millis(50)),
        refuse: rng.chance(80).then(|| {
            rng.pick(&[
                RefusalReason::NoSuchHost,
                RefusalReason::ConnectionRefused,
                RefusalReason::TimedOut,
                RefusalReason::DeniedByPolicy,
            ])
        }),
        up,
        down,
        reset,
    }
}
