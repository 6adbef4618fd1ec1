//! The simulation proper: an agent and a server `Connection`, each with an application
//! that follows its part of the [`Options`], joined by two [`Link`]s on one virtual clock.
//!
//! The clock is read once; afterwards time only moves by jumping to the earliest thing
//! due (a delivery, a protocol timer, an application action). At each instant both sides
//! are driven as the crate documentation prescribes (inputs, then `poll_transmit`, `poll`
//! and `poll_timeout`) until nothing changes, and the invariants are checked after every
//! round.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fluidity_proto::{
    AuthRequest, Connection, Credentials, Error, ErrorCode, Event, Host, OpenRefusal,
    RefusalReason, Side, StreamEvent, StreamId, Target,
};

use super::link::Link;
use super::model::{dir_of, other, AppStream, End, StreamModel};
use super::options::{AuthPlan, Ending, Options};
use super::rng::{fill_pattern, mix, pattern_mismatch, Rng, TraceHash};

/// A run's bound on simulation steps (instants visited): more means livelock.
const MAX_STEPS: u64 = 400_000;
/// A bound on rounds at one instant: more means the sides keep each other busy for ever.
const MAX_ROUNDS_PER_INSTANT: u32 = 20_000;
/// Virtual time by which every run must have finished.
const HORIZON: Duration = Duration::from_secs(300);
/// Timers fire exactly on time in virtual time; this only absorbs rounding to the
/// microsecond grid of the generated durations.
pub const DETECTION_SLACK: Duration = Duration::from_millis(1);
/// Lines of recent history kept for a failure report.
const LOG_LINES: usize = 40;
/// The principal the server application admits.
const PRINCIPAL: &str = "sim-agent";

/// What a finished run looked like.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Hash of every transmitted byte, every event and the instants they happened at.
    pub trace: u64,
    /// Instants visited.
    pub steps: u64,
    /// Virtual time from start to finish.
    pub elapsed: Duration,
    /// Streams that completed on both sides.
    pub completed: usize,
    /// Stream bytes read by the applications.
    pub bytes_read: u64,
    /// How each side's connection ended (`None`: drained cleanly).
    pub agent_lost: Option<Error>,
    /// See `agent_lost`.
    pub server_lost: Option<Error>,
    /// For a silent disconnect: how long after it each side noticed.
    pub detection: [Option<Duration>; 2],
    /// The largest `sent - read` seen on any stream direction, over the receiver's window:
    /// how full the windows got.
    pub max_window_use: f64,
    /// Per plan: when the stream was over on both sides.
    pub done_at: Vec<Option<Duration>>,
    /// Per plan and direction (up, down): the largest `sent - read` seen.
    pub max_in_flight: Vec<[u64; 2]>,
    /// What the run exercised.
    pub coverage: Coverage,
}

/// How often the interesting things happened in a run: a sweep checks that each did
/// happen somewhere, so a harness change cannot quietly stop exercising it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Coverage {
    /// Writes refused for lack of credit.
    pub blocked_writes: u64,
    /// `Writable` events after a blocked write.
    pub writable_events: u64,
    /// Opens retried because the peer's stream limit was reached.
    pub open_retries: u64,
    /// `handle_input` calls that took only part of what was offered (control backlog).
    pub partial_inputs: u64,
    /// Transmissions cut into pieces by the link.
    pub splits: u64,
    /// Link stalls.
    pub stalls: u64,
    /// Streams reset by the application.
    pub resets: u64,
    /// Of those, resets sent after the stream's last written bytes (`reset_after_sent`).
    pub resets_after_sent: u64,
    /// Peer resets that handed over bytes the application had not read yet.
    pub unread_at_reset: u64,
    /// Streams refused.
    pub refusals: u64,
    /// Readers that held a stream's whole window.
    pub full_windows: u64,
    /// Graceful goaways received.
    pub goaways: u64,
    /// Transport EOFs after which complete streams were still read.
    pub reads_after_peer_drained: u64,
    /// Rounds in which a side could not transmit because its transport was full.
    pub full_transports: u64,
    /// Streams completed on both sides.
    pub completed: u64,
    /// Connection losses by kind: idle timeout, handshake timeout, auth rejection, peer
    /// close, local close, transport closed.
    pub lost_idle: u64,
    /// See `lost_idle`.
    pub lost_handshake: u64,
    /// See `lost_idle`.
    pub lost_auth: u64,
    /// See `lost_idle`.
    pub lost_peer_closed: u64,
    /// See `lost_idle`.
    pub lost_locally_closed: u64,
    /// See `lost_idle`.
    pub lost_transport: u64,
}

impl Coverage {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Coverage) {
        for (mine, (_, theirs)) in self.fields_mut().into_iter().zip(other.fields()) {
            *mine += theirs;
        }
    }

    /// The counters by name.
    pub fn fields(&self) -> [(&'static str, u64); 21] {
        [
            ("blocked_writes", self.blocked_writes),
            ("writable_events", self.writable_events),
            ("open_retries", self.open_retries),
            ("partial_inputs", self.partial_inputs),
            ("splits", self.splits),
            ("stalls", self.stalls),
            ("resets", self.resets),
            ("resets_after_sent", self.resets_after_sent),
            ("unread_at_reset", self.unread_at_reset),
            ("refusals", self.refusals),
            ("full_windows", self.full_windows),
            ("goaways", self.goaways),
            ("reads_after_peer_drained", self.reads_after_peer_drained),
            ("full_transports", self.full_transports),
            ("completed", self.completed),
            ("lost_idle", self.lost_idle),
            ("lost_handshake", self.lost_handshake),
            ("lost_auth", self.lost_auth),
            ("lost_peer_closed", self.lost_peer_closed),
            ("lost_locally_closed", self.lost_locally_closed),
            ("lost_transport", self.lost_transport),
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 21] {
        [
            &mut self.blocked_writes,
            &mut self.writable_events,
            &mut self.open_retries,
            &mut self.partial_inputs,
            &mut self.splits,
            &mut self.stalls,
            &mut self.resets,
            &mut self.resets_after_sent,
            &mut self.unread_at_reset,
            &mut self.refusals,
            &mut self.full_windows,
            &mut self.goaways,
            &mut self.reads_after_peer_drained,
            &mut self.full_transports,
            &mut self.completed,
            &mut self.lost_idle,
            &mut self.lost_handshake,
            &mut self.lost_auth,
            &mut self.lost_peer_closed,
            &mut self.lost_locally_closed,
            &mut self.lost_transport,
        ]
    }
}

/// A failed run: what went wrong and the recent history.
#[derive(Debug)]
pub struct Failure {
    /// The broken invariant.
    pub message: String,
    /// The last lines of the trace.
    pub recent: Vec<String>,
}

/// One side: its connection and the transport and application state around it.
struct Peer {
    side: Side,
    conn: Connection,
    /// Delivered by the link, not yet consumed by `handle_input`.
    inbox: Vec<u8>,
    /// Output of `poll_transmit` the transport has not taken yet (it was full).
    out: Vec<u8>,
    /// This side closed its sending direction (after draining).
    transport_closed: bool,
    eof_handled: bool,
    ready_at: Option<Instant>,
    lost: Option<(Error, Instant)>,
    /// The application called `go_away`.
    went_away: bool,
    /// The application called `close` with this code.
    closed_with: Option<ErrorCode>,
    /// Last instant bytes were handed to `handle_input`.
    last_input: Instant,
    /// Server: the authentication request and when the application answers it.
    auth: Option<(AuthRequest, Option<Instant>)>,
}

impl Peer {
    fn new(side: Side, conn: Connection, now: Instant) -> Peer {
        Peer {
            side,
            conn,
            inbox: Vec::new(),
            out: Vec::new(),
            transport_closed: false,
            eof_handled: false,
            ready_at: None,
            lost: None,
            went_away: false,
            closed_with: None,
            last_input: now,
            auth: None,
        }
    }
}

fn ix(side: Side) -> usize {
    match side {
        Side::Agent => 0,
        Side::Server => 1,
    }
}

/// The target of planned stream `k`.
fn target(k: usize) -> Target {
    let host = Host::name(&format!("s{k}.sim.example")).expect("a valid host name");
    Target::new(host, 1000 + k as u16)
}

/// A running simulation.
pub struct World<'a> {
    opts: &'a Options,
    rng: Rng,
    /// Picks, call by call, the copying or the zero-copy variant of a write, transmit or
    /// input (they must behave alike); its own stream, so that the plans and link faults
    /// of a seed do not depend on it.
    api: Rng,
    start: Instant,
    now: Instant,
    peers: [Peer; 2],
    /// `links[ix(side)]` carries what `side` sends.
    links: [Link; 2],
    streams: Vec<StreamModel>,
    ids: BTreeMap<StreamId, usize>,
    /// Plans in the order the agent opens them.
    open_order: Vec<usize>,
    next_open: usize,
    ending_done: bool,
    silent_at: Option<Instant>,
    aborted_at: Option<Instant>,
    /// When the agent's probe gave up on the server (only ever after a silent cut).
    gave_up_at: Option<Instant>,
    trace: TraceHash,
    log: VecDeque<String>,
    steps: u64,
    salt: u64,
    scratch: Vec<u8>,
    max_window_use: f64,
    done_at: Vec<Option<Duration>>,
    max_in_flight: Vec<[u64; 2]>,
    cov: Coverage,
}

type Check = Result<(), String>;

impl<'a> World<'a> {
    /// A world for `opts`, its clock starting at `start`.
    pub fn new(opts: &'a Options, start: Instant) -> World<'a> {
        let credentials = if opts.server.require_auth {
            Credentials {
                method: "sim".into(),
                payload: Bytes::from_static(b"sim-token"),
            }
        } else {
            Credentials::none()
        };
        let agent = Connection::agent(Arc::new(opts.agent.clone()), credentials, start);
        let server = Connection::server(Arc::new(opts.server.clone()), start);
        let mut open_order: Vec<usize> = (0..opts.streams.len()).collect();
        open_order.sort_by_key(|&k| (opts.streams[k].open_at, k));
        World {
            opts,
            // The link's faults use their own stream of randomness, apart from the plan.
            rng: Rng::new(mix(opts.seed ^ 0x11AC)),
            api: Rng::new(mix(opts.seed ^ 0x0B17E5)),
            start,
            now: start,
            peers: [
                Peer::new(Side::Agent, agent, start),
                Peer::new(Side::Server, server, start),
            ],
            links: [
                Link::new(opts.up_link, start),
                Link::new(opts.down_link, start),
            ],
            streams: vec![StreamModel::default(); opts.streams.len()],
            ids: BTreeMap::new(),
            open_order,
            next_open: 0,
            ending_done: false,
            gave_up_at: None,
            silent_at: None,
            aborted_at: None,
            trace: TraceHash::default(),
            log: VecDeque::new(),
            steps: 0,
            salt: mix(opts.seed),
            scratch: Vec::new(),
            max_window_use: 0.0,
            done_at: vec![None; opts.streams.len()],
            max_in_flight: vec![[0; 2]; opts.streams.len()],
            cov: Coverage::default(),
        }
    }

    /// Runs to the end and checks everything.
    pub fn run(mut self) -> Result<Outcome, Failure> {
        match self.run_inner() {
            Ok(()) => Ok(self.outcome()),
            Err(message) => Err(Failure {
                message: format!(
                    "at t={:?}: {message}\nstate:\n{}",
                    self.now - self.start,
                    self.dump()
                ),
                recent: self.log.iter().cloned().collect(),
            }),
        }
    }

    fn run_inner(&mut self) -> Check {
        loop {
            self.settle()?;
            if self.finished() {
                break;
            }
            self.steps += 1;
            if self.steps > MAX_STEPS {
                return Err(format!("livelock: more than {MAX_STEPS} steps"));
            }
            let Some(next) = self.next_instant()? else {
                return Err("stuck: nothing is scheduled but the run is not over".into());
            };
            if next - self.start > HORIZON {
                return Err(format!("not quiescent after {HORIZON:?} of virtual time"));
            }
            self.now = next;
        }
        self.final_checks()
    }

    fn outcome(&self) -> Outcome {
        let detection = [Side::Agent, Side::Server].map(|s| {
            let p = &self.peers[ix(s)];
            match (self.silent_at, &p.lost) {
                (Some(t), Some((_, at))) if *at >= t => Some(*at - t),
                // The agent's probe gave up on the server, and with no stream left the
                // connection drained: noticed then.
                (Some(t), None) if s == Side::Agent => self.gave_up_at.map(|g| g - t),
                _ => None,
            }
        });
        Outcome {
            trace: self.trace.value(),
            steps: self.steps,
            elapsed: self.now - self.start,
            completed: self
                .streams
                .iter()
                .filter(|m| m.agent.end == End::Completed && m.server.end == End::Completed)
                .count(),
            bytes_read: self.streams.iter().map(|m| m.up.read + m.down.read).sum(),
            agent_lost: self.peers[0].lost.as_ref().map(|(e, _)| e.clone()),
            server_lost: self.peers[1].lost.as_ref().map(|(e, _)| e.clone()),
            detection,
            max_window_use: self.max_window_use,
            done_at: self.done_at.clone(),
            max_in_flight: self.max_in_flight.clone(),
            coverage: {
                let mut c = self.cov;
                c.splits = self.links.iter().map(|l| l.splits).sum();
                c.stalls = self.links.iter().map(|l| l.stalls).sum();
                c.completed = self
                    .streams
                    .iter()
                    .filter(|m| m.agent.end == End::Completed && m.server.end == End::Completed)
                    .count() as u64;
                c
            },
        }
    }

    fn note(&mut self, side: Option<Side>, what: impl FnOnce() -> String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        let who = match side {
            Some(Side::Agent) => "agent ",
            Some(Side::Server) => "server",
            None => "world ",
        };
        let line = format!("{:>12?} {who} {}", self.now - self.start, what());
        self.log.push_back(line);
    }

    fn finished(&self) -> bool {
        self.peers.iter().all(|p| p.conn.is_drained()) && self.links.iter().all(Link::is_idle)
    }

    // ----- one instant -----

    /// Drives both sides at `now` until neither changes, checking invariants each round.
    fn settle(&mut self) -> Check {
        for _ in 0..MAX_ROUNDS_PER_INSTANT {
            let mut progress = self.ending()?;
            // Either side may go first: the order of two drivers is not fixed.
            let order = if self.rng.chance(500) {
                [Side::Agent, Side::Server]
            } else {
                [Side::Server, Side::Agent]
            };
            for side in order {
                progress |= self.feed(side)?;
                progress |= self.drain(side)?;
                progress |= self.app(side)?;
                progress |= self.drain(side)?;
            }
            self.check_invariants()?;
            for (k, m) in self.streams.iter().enumerate() {
                if self.done_at[k].is_none() && m.agent.end.is_final() && m.server.end.is_final() {
                    self.done_at[k] = Some(self.now - self.start);
                }
            }
            if !progress {
                return Ok(());
            }
        }
        Err(format!(
            "livelock: still busy after {MAX_ROUNDS_PER_INSTANT} rounds at one instant"
        ))
    }

    /// Timers and input for `side`.
    fn feed(&mut self, side: Side) -> Result<bool, String> {
        let now = self.now;
        let i = ix(side);
        let mut progress = false;
        if self.peers[i].conn.poll_timeout().is_some_and(|t| t <= now) {
            self.peers[i].conn.handle_timeout(now);
            self.trace.u64(0x71);
            progress = true;
        } else if self.rng.chance(20) {
            // A driver's timer may wake it early; that must change nothing.
            self.peers[i].conn.handle_timeout(now);
        }
        let p = &mut self.peers[i];
        let link = &mut self.links[1 - i];
        let delivered = link.deliver(now, &mut p.inbox);
        if !p.inbox.is_empty() {
            let offered = p.inbox.len();
            let n = if self.api.chance(500) {
                let mut input = BytesMut::from(&p.inbox[..]);
                let n = p.conn.handle_input_bytes(now, &mut input);
                if input[..] != p.inbox[n.min(offered)..] {
                    return Err(format!(
                        "{side:?}: handle_input_bytes consumed {n} of {offered} bytes but left {}",
                        input.len()
                    ));
                }
                n
            } else {
                p.conn.handle_input(now, &p.inbox)
            };
            if n > offered {
                return Err(format!(
                    "{side:?}: handle_input consumed {n} of {offered} bytes"
                ));
            }
            p.inbox.drain(..n);
            p.last_input = now;
            progress |= n > 0;
            if n < offered {
                self.cov.partial_inputs += 1;
            }
        }
        if delivered > 0 {
            self.trace.u64(delivered as u64);
        }
        let p = &mut self.peers[i];
        if p.inbox.is_empty() && self.links[1 - i].take_eof(now) {
            p.conn.handle_eof(now);
            p.eof_handled = true;
            progress = true;
            if p.conn.stream_ids().next().is_some() && !p.conn.is_drained() {
                self.cov.reads_after_peer_drained += 1;
            }
            self.note(Some(side), || "transport EOF".into());
        }
        Ok(progress)
    }

    /// Outputs of `side`: transmit, events, and closing the transport once drained.
    fn drain(&mut self, side: Side) -> Result<bool, String> {
        let now = self.now;
        let i = ix(side);
        let mut progress = false;
        // Like the runtime's driver: `poll_transmit` fills the outbox only once it is
        // empty, and the outbox goes to the transport as far as its buffers have room
        // (what is on the way plus what the receiver has not consumed yet).
        let mut out = std::mem::take(&mut self.peers[i].out);
        let capacity = self.links[i].capacity().unwrap_or(usize::MAX);
        let on_the_way = self.links[i].queued() + self.peers[1 - i].inbox.len();
        let mut room = capacity.saturating_sub(on_the_way);
        let mut calls = 0u32;
        loop {
            if out.is_empty() {
                let emitted = if self.api.chance(500) {
                    let mut chunks = Vec::new();
                    let n = self.peers[i].conn.poll_transmit_chunks(now, &mut chunks);
                    for c in &chunks {
                        out.extend_from_slice(c);
                    }
                    if n != out.len() {
                        return Err(format!(
                            "{side:?}: poll_transmit_chunks returned {n} for {} bytes",
                            out.len()
                        ));
                    }
                    n
                } else {
                    self.peers[i].conn.poll_transmit(now, &mut out)
                };
                if emitted == 0 {
                    break;
                }
                // One call emits the pending control frames (bounded by the backlog plus
                // what one input slice and the application's calls can add) and at most
                // one batch of data.
                let cfg = self.config(side);
                let bound = cfg.max_control_backlog + cfg.transmit_batch + 64 * 1024;
                if out.len() > bound {
                    return Err(format!(
                        "{side:?}: one poll_transmit emitted {} bytes, beyond {bound}",
                        out.len()
                    ));
                }
                calls += 1;
                if calls > MAX_ROUNDS_PER_INSTANT {
                    return Err(format!("{side:?}: poll_transmit never returns 0"));
                }
            }
            if self.peers[i].transport_closed {
                out.clear();
                continue;
            }
            let n = out.len().min(room);
            if n == 0 {
                self.cov.full_transports += 1;
                break;
            }
            progress = true;
            self.trace.u64(ix(side) as u64);
            self.trace.u64((now - self.start).as_nanos() as u64);
            self.trace.bytes(&out[..n]);
            self.links[i].send(now, &out[..n], &mut self.rng);
            out.drain(..n);
            room -= n;
        }
        let outbox_empty = out.is_empty();
        self.peers[i].out = out;
        while let Some(ev) = self.peers[i].conn.poll() {
            progress = true;
            self.on_event(side, ev)?;
        }
        let p = &mut self.peers[i];
        if p.conn.is_drained() && outbox_empty && !p.transport_closed {
            p.transport_closed = true;
            self.links[i].close(now);
            progress = true;
            self.note(Some(side), || "drained: transport closed".into());
        }
        Ok(progress)
    }

    fn config(&self, side: Side) -> &'a fluidity_proto::Config {
        match side {
            Side::Agent => &self.opts.agent,
            Side::Server => &self.opts.server,
        }
    }

    // ----- events -----

    fn on_event(&mut self, side: Side, ev: Event) -> Check {
        let text = format!("{ev:?}");
        self.trace.bytes(text.as_bytes());
        self.trace.u64((self.now - self.start).as_nanos() as u64);
        self.note(Some(side), || text);
        let now = self.now;
        let i = ix(side);
        if self.peers[i].lost.is_some() {
            return Err(format!("{side:?}: an event after ConnectionLost"));
        }
        match ev {
            // The probe's timeout is the idle timeout here, which a live peer always beats
            // (options.rs): giving up on one would be a false alarm. After a silent cut it
            // is the probe's job.
            Event::Unresponsive { silent } => {
                if side != Side::Agent || self.silent_at.is_none() || self.gave_up_at.is_some() {
                    return Err(format!(
                        "{side:?}: a live peer taken for a silent one after {silent:?}"
                    ));
                }
                self.gave_up_at = Some(now);
            }
            Event::AuthRequested(req) => {
                if side != Side::Server || !self.opts.server.require_auth {
                    return Err(format!("{side:?}: unexpected AuthRequested"));
                }
                if req.method != "sim" || req.payload.as_ref() != b"sim-token" {
                    return Err("the auth request does not carry the agent's credentials".into());
                }
                let at = match self.opts.auth {
                    AuthPlan::Accept(d) | AuthPlan::Reject(d, _) => Some(now + d),
                    AuthPlan::Ignore => None,
                };
                self.peers[i].auth = Some((req, at));
            }
            Event::Ready { principal } => {
                if self.peers[i].ready_at.is_some() {
                    return Err(format!("{side:?}: second Ready"));
                }
                let auth = self.opts.server.require_auth;
                if auth && !matches!(self.opts.auth, AuthPlan::Accept(_)) {
                    return Err(format!(
                        "{side:?}: Ready although the server never accepted"
                    ));
                }
                let expected = if auth { PRINCIPAL } else { "" };
                if principal != expected {
                    return Err(format!("{side:?}: Ready with principal {principal:?}"));
                }
                self.peers[i].ready_at = Some(now);
            }
            Event::GoAway { code, .. } => {
                let peer = &self.peers[1 - i];
                if code != ErrorCode::NO_ERROR {
                    return Err(format!("{side:?}: GoAway event with code {code}"));
                }
                if !peer.went_away && peer.closed_with != Some(ErrorCode::NO_ERROR) {
                    return Err(format!("{side:?}: GoAway although the peer never sent one"));
                }
                self.cov.goaways += 1;
            }
            Event::ConnectionLost { reason } => {
                if self.peers[i].lost.is_some() {
                    return Err(format!("{side:?}: second ConnectionLost"));
                }
                self.check_loss(side, &reason)?;
                match reason {
                    Error::IdleTimeout(_) => self.cov.lost_idle += 1,
                    Error::HandshakeTimeout(_) => self.cov.lost_handshake += 1,
                    Error::AuthRejected { .. } => self.cov.lost_auth += 1,
                    Error::PeerClosed { .. } => self.cov.lost_peer_closed += 1,
                    Error::LocallyClosed(_) => self.cov.lost_locally_closed += 1,
                    _ => self.cov.lost_transport += 1,
                }
                self.peers[i].lost = Some((reason, now));
                for m in &mut self.streams {
                    let pending_answer = side == Side::Server && m.answer_at.is_some();
                    let app = m.app_mut(side);
                    if app.end == End::Open || (app.end == End::NotStarted && pending_answer) {
                        app.end = End::Lost;
                    }
                    if side == Side::Server {
                        m.answer_at = None;
                    }
                }
            }
            Event::Stream(se) => self.on_stream_event(side, se)?,
        }
        Ok(())
    }

    fn plan_of(&self, side: Side, id: StreamId) -> Result<usize, String> {
        self.ids
            .get(&id)
            .copied()
            .ok_or_else(|| format!("{side:?}: event for stream {id}, which the agent never opened"))
    }

    fn on_stream_event(&mut self, side: Side, se: StreamEvent) -> Check {
        let now = self.now;
        match se {
            StreamEvent::OpenRequested { id, target: t } => {
                let k = self.plan_of(side, id)?;
                if side != Side::Server {
                    return Err(format!("agent: OpenRequested for {id}"));
                }
                if t != target(k) {
                    return Err(format!(
                        "server: stream {id} asks for {t}, opened for {}",
                        target(k)
                    ));
                }
                let m = &mut self.streams[k];
                if m.server.end != End::NotStarted || m.answer_at.is_some() {
                    return Err(format!("server: second OpenRequested for {id}"));
                }
                m.answer_at = Some(now + self.opts.streams[k].answer_delay);
            }
            StreamEvent::Opened { id } => {
                let k = self.plan_of(side, id)?;
                let m = &mut self.streams[k];
                if side != Side::Agent || !m.accepted || m.opened || m.agent.end != End::Open {
                    return Err(format!(
                        "{side:?}: unexpected Opened for {id} (accepted {}, opened {}, end {:?})",
                        m.accepted, m.opened, m.agent.end
                    ));
                }
                m.opened = true;
            }
            StreamEvent::Refused { id, refusal } => {
                let k = self.plan_of(side, id)?;
                let m = &mut self.streams[k];
                let by_protocol = matches!(
                    refusal.reason,
                    RefusalReason::GoingAway | RefusalReason::TooManyStreams
                ) && m.server.end == End::NotStarted
                    && m.answer_at.is_none();
                // The probe gave up on the server: opens it had not answered are refused
                // here, whatever became of them there.
                let given_up =
                    refusal.reason == RefusalReason::GoingAway && self.gave_up_at == Some(now);
                if side != Side::Agent
                    || m.agent.end != End::Open
                    || m.opened
                    || !(by_protocol || given_up || m.server.end == End::Refused(refusal.reason))
                {
                    return Err(format!(
                        "{side:?}: unexpected Refused({refusal}) for {id} (server end {:?})",
                        m.server.end
                    ));
                }
                m.agent.end = End::Refused(refusal.reason);
                self.cov.refusals += 1;
            }
            StreamEvent::Readable { id } => {
                let k = self.plan_of(side, id)?;
                let app = self.streams[k].app_mut(side);
                // A Readable queued before this side ended the stream is stale, not wrong.
                if app.end == End::Open {
                    app.readable = true;
                }
            }
            StreamEvent::Writable { id } => {
                let k = self.plan_of(side, id)?;
                let app = self.streams[k].app_mut(side);
                if app.end == End::Open {
                    if !app.write_blocked {
                        return Err(format!(
                            "{side:?}: Writable for {id} without a blocked write"
                        ));
                    }
                    app.write_blocked = false;
                    self.cov.writable_events += 1;
                }
            }
            StreamEvent::Reset { id, code, unread } => {
                let k = self.plan_of(side, id)?;
                let m = &mut self.streams[k];
                // What arrived unread continues what the application read, exactly.
                let unread = unread.concat();
                let d = m.receiving(side);
                if let Some(at) = pattern_mismatch(
                    self.salt,
                    u64::from(id.0),
                    dir_of(other(side)),
                    d.read,
                    &unread,
                ) {
                    return Err(format!(
                        "{side:?}: byte {at} left unread at the reset of {id} differs from what was written"
                    ));
                }
                if d.read + unread.len() as u64 > d.written {
                    return Err(format!(
                        "{side:?}: {} bytes read and {} unread at the reset of {id}, only {} written",
                        d.read,
                        unread.len(),
                        d.written
                    ));
                }
                self.cov.unread_at_reset += u64::from(!unread.is_empty());
                let peer_end = m.app(other(side)).end;
                if peer_end != End::ResetLocal(code) {
                    return Err(format!(
                        "{side:?}: Reset({code}) for {id}, but the peer's stream ended {peer_end:?}"
                    ));
                }
                let pending = side == Side::Server && m.answer_at.is_some();
                let app = m.app_mut(side);
                if !(matches!(app.end, End::Open | End::Completed) || pending) {
                    return Err(format!("{side:?}: Reset for {id} in state {:?}", app.end));
                }
                app.end = End::ResetByPeer(code);
                if side == Side::Server {
                    m.answer_at = None;
                }
            }
        }
        Ok(())
    }

    /// Whether `reason` is a legitimate way for `side`'s connection to end, given what
    /// the run did. Protocol errors between two correct peers never are.
    fn check_loss(&self, side: Side, reason: &Error) -> Check {
        let me = &self.peers[ix(side)];
        let peer = &self.peers[1 - ix(side)];
        let ok = match reason {
            Error::IdleTimeout(_) => self.silent_at.is_some(),
            Error::HandshakeTimeout(_) => {
                self.silent_at.is_some()
                    || self.aborted_at.is_some()
                    || (self.opts.server.require_auth && matches!(self.opts.auth, AuthPlan::Ignore))
            }
            Error::AuthRejected { failure, .. } => {
                matches!(self.opts.auth, AuthPlan::Reject(_, f) if f == *failure)
                    && self.opts.server.require_auth
            }
            Error::PeerClosed { code, .. } => {
                peer.closed_with == Some(*code)
                    || peer.lost.as_ref().is_some_and(|(e, _)| e.code() == *code)
            }
            Error::LocallyClosed(code) => me.closed_with == Some(*code),
            // An immediate close leaves the peer's streams to die with the transport.
            Error::TransportClosed => self.aborted_at.is_some() || peer.closed_with.is_some(),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{side:?}: connection lost for no good reason: {reason}"
            ))
        }
    }

    // ----- applications -----

    fn app(&mut self, side: Side) -> Result<bool, String> {
        let mut progress = match side {
            Side::Agent => self.agent_opens()?,
            Side::Server => self.server_answers()?,
        };
        // The application serves its streams in a rotating order.
        let n = self.streams.len();
        let first = self.rng.below(n as u64) as usize;
        for j in 0..n {
            progress |= self.stream_app(side, (first + j) % n)?;
        }
        Ok(progress)
    }

    fn agent_opens(&mut self) -> Result<bool, String> {
        let now = self.now;
        let mut progress = false;
        while let Some(&k) = self.open_order.get(self.next_open) {
            let p = &mut self.peers[0];
            let Some(ready) = p.ready_at else { break };
            if now < ready + self.opts.streams[k].open_at {
                break;
            }
            match p.conn.open(now, target(k)) {
                Ok(id) => {
                    if self.ids.insert(id, k).is_some() {
                        return Err(format!("agent: stream id {id} handed out twice"));
                    }
                    let m = &mut self.streams[k];
                    m.id = Some(id);
                    m.agent.end = End::Open;
                    m.agent.started = Some(now);
                    self.note(Some(Side::Agent), || format!("opened {id} (plan {k})"));
                }
                // Streams end as events arrive; the open is retried then.
                Err(Error::TooManyStreams) => {
                    self.cov.open_retries += 1;
                    break;
                }
                Err(Error::GoingAway | Error::ConnectionClosed) => {
                    self.streams[k].agent.end = End::NeverOpened;
                }
                Err(e) => return Err(format!("agent: open of plan {k} failed: {e}")),
            }
            self.next_open += 1;
            progress = true;
        }
        Ok(progress)
    }

    fn server_answers(&mut self) -> Result<bool, String> {
        let now = self.now;
        let mut progress = false;
        let p = &mut self.peers[1];
        if p.auth
            .as_ref()
            .is_some_and(|(_, at)| at.is_some_and(|t| t <= now))
        {
            let (req, _) = p.auth.take().expect("checked above");
            match self.opts.auth {
                AuthPlan::Accept(_) => p.conn.accept_auth(now, req, PRINCIPAL.into(), 0),
                AuthPlan::Reject(_, failure) => {
                    p.conn
                        .reject_auth(now, req, failure, "rejected by the simulation".into())
                }
                AuthPlan::Ignore => return Err("an ignored auth request was answered".into()),
            }
            progress = true;
        }
        for k in 0..self.streams.len() {
            let m = &mut self.streams[k];
            if m.answer_at.is_none_or(|t| t > now) {
                continue;
            }
            m.answer_at = None;
            progress = true;
            let id = m.id.expect("an open request names an opened stream");
            let conn = &mut self.peers[1].conn;
            match self.opts.streams[k].refuse {
                None => match conn.accept_open(id) {
                    Ok(()) => {
                        m.accepted = true;
                        m.server.end = End::Open;
                        m.server.started = Some(now);
                    }
                    Err(e) => return Err(format!("server: accept_open({id}): {e}")),
                },
                Some(reason) => {
                    let refusal = OpenRefusal::new(reason, "refused by the simulation");
                    match conn.refuse_open(id, refusal) {
                        Ok(()) => m.server.end = End::Refused(reason),
                        Err(e) => return Err(format!("server: refuse_open({id}): {e}")),
                    }
                }
            }
        }
        Ok(progress)
    }

    /// One side's application on planned stream `k`: reset, write, read as planned.
    fn stream_app(&mut self, side: Side, k: usize) -> Result<bool, String> {
        let now = self.now;
        let opts = self.opts;
        let plan = &opts.streams[k];
        let m = &mut self.streams[k];
        let app = *m.app(side);
        if app.end != End::Open {
            return Ok(false);
        }
        let id = m.id.expect("a started stream has an id");
        let started = app.started.expect("a started stream has a start");
        let conn = &mut self.peers[ix(side)].conn;
        let mut progress = false;

        if let Some(r) = plan.reset {
            if r.by == side && !app.reset_tried && now >= started + r.after {
                m.app_mut(side).reset_tried = true;
                // Half of them let what was written go out first.
                let after_sent = self.api.chance(500);
                let reset = if after_sent {
                    conn.send_stream(id).reset_after_sent(r.code)
                } else {
                    conn.send_stream(id).reset(r.code)
                };
                match reset {
                    Ok(()) => {
                        m.app_mut(side).end = End::ResetLocal(r.code);
                        self.cov.resets += 1;
                        self.cov.resets_after_sent += u64::from(after_sent);
                        self.note(Some(side), || format!("reset {id} with {}", r.code));
                        return Ok(true);
                    }
                    Err(e) => return Err(format!("{side:?}: reset of live stream {id}: {e}")),
                }
            }
        }

        // Writing.
        let (wplan, rplan) = match side {
            Side::Agent => (plan.up, plan.down.reader),
            Side::Server => (plan.down, plan.up.reader),
        };
        loop {
            let d = m.sending(side);
            if d.finished || m.app(side).write_blocked {
                break;
            }
            if d.written < wplan.len {
                let n = (wplan.len - d.written).min(wplan.write_chunk as u64) as usize;
                self.scratch.resize(n, 0);
                fill_pattern(
                    self.salt,
                    u64::from(id.0),
                    dir_of(side),
                    d.written,
                    &mut self.scratch,
                );
                // `writable` must predict exactly what a write takes.
                let writable = conn
                    .send_stream(id)
                    .writable()
                    .map_err(|e| format!("{side:?}: writable() on live stream {id}: {e}"))?;
                let written = if self.api.chance(500) {
                    conn.send_stream(id)
                        .write_bytes(Bytes::copy_from_slice(&self.scratch))
                } else {
                    conn.send_stream(id).write(&self.scratch)
                };
                match written {
                    Ok(w) if w != n.min(writable) => {
                        return Err(format!(
                            "{side:?}: write of {n} on {id} took {w} although writable() said {writable}"
                        ))
                    }
                    Err(Error::Blocked) if writable > 0 => {
                        return Err(format!(
                            "{side:?}: write on {id} blocked although writable() said {writable}"
                        ))
                    }
                    Ok(w) if w > 0 && w <= n => {
                        m.sending_mut(side).written += w as u64;
                        progress = true;
                    }
                    Ok(w) => return Err(format!("{side:?}: write of {n} on {id} returned {w}")),
                    Err(Error::Blocked) => {
                        m.app_mut(side).write_blocked = true;
                        self.cov.blocked_writes += 1;
                    }
                    Err(e) => return Err(format!("{side:?}: write on live stream {id}: {e}")),
                }
            } else {
                match conn.send_stream(id).finish() {
                    Ok(()) => {
                        m.sending_mut(side).finished = true;
                        progress = true;
                    }
                    Err(e) => return Err(format!("{side:?}: finish of live stream {id}: {e}")),
                }
            }
        }

        // Reading.
        let paused = rplan.pause_at.is_some_and(|at| {
            now >= started + at && rplan.pause_for.is_none_or(|f| now < started + at + f)
        });
        let may_read = (side == Side::Server || m.opened)
            && m.app(side).readable
            && !paused
            && m.app(side).next_read.is_none_or(|t| now >= t);
        if may_read {
            loop {
                if m.receiving(side).eof {
                    break;
                }
                match conn.recv_stream(id).read(rplan.chunk) {
                    Ok(Some(bytes)) => {
                        let offset = m.receiving(side).read;
                        if bytes.is_empty() || bytes.len() > rplan.chunk {
                            return Err(format!(
                                "{side:?}: read({}) on {id} returned {} bytes",
                                rplan.chunk,
                                bytes.len()
                            ));
                        }
                        let writer = other(side);
                        if let Some(at) = pattern_mismatch(
                            self.salt,
                            u64::from(id.0),
                            dir_of(writer),
                            offset,
                            &bytes,
                        ) {
                            return Err(format!(
                                "{side:?}: stream {id} byte {at} differs from what was written"
                            ));
                        }
                        let d = m.receiving_mut(side);
                        d.read += bytes.len() as u64;
                        if d.read > d.written {
                            return Err(format!(
                                "{side:?}: stream {id} read {} bytes, only {} written",
                                d.read, d.written
                            ));
                        }
                        progress = true;
                        if rplan.interval > Duration::ZERO {
                            m.app_mut(side).next_read = Some(now + rplan.interval);
                            break;
                        }
                    }
                    Ok(None) => {
                        let d = m.receiving_mut(side);
                        if !d.finished || d.read != d.written {
                            return Err(format!(
                                "{side:?}: end of stream {id} after {} bytes; the writer wrote {} and finished: {}",
                                d.read, d.written, d.finished
                            ));
                        }
                        d.eof = true;
                        progress = true;
                    }
                    Err(Error::Blocked) => {
                        m.app_mut(side).readable = false;
                        break;
                    }
                    Err(e) => return Err(format!("{side:?}: read on live stream {id}: {e}")),
                }
            }
        }

        if m.sending(side).finished && m.receiving(side).eof {
            m.app_mut(side).end = End::Completed;
            let info = conn.stream_info(id);
            self.note(Some(side), || {
                format!("completed {id} (still held: {info:?})")
            });
            progress = true;
        }
        Ok(progress)
    }

    // ----- endings -----

    fn all_streams_over(&self) -> bool {
        self.next_open == self.open_order.len()
            && self.streams.iter().all(|m| {
                m.agent.end.is_final() && m.server.end != End::Open && m.answer_at.is_none()
            })
    }

    fn ending(&mut self) -> Result<bool, String> {
        if self.ending_done {
            return Ok(false);
        }
        let now = self.now;
        let start = self.start;
        let due = |at: Duration| now >= start + at;
        let fire = match self.opts.ending {
            Ending::GoAway { at: None, .. } => {
                self.peers.iter().any(|p| p.lost.is_some())
                    || (self.peers[0].ready_at.is_some() && self.all_streams_over())
            }
            Ending::GoAway { at: Some(at), .. }
            | Ending::Close { at, .. }
            | Ending::Abort { at }
            | Ending::Silent { at } => due(at),
        };
        if !fire {
            return Ok(false);
        }
        self.ending_done = true;
        match self.opts.ending {
            Ending::GoAway { by, .. } => {
                let p = &mut self.peers[ix(by)];
                p.conn.go_away(now);
                p.went_away = true;
                self.note(Some(by), || "go_away".into());
            }
            Ending::Close { by, code, .. } => {
                let p = &mut self.peers[ix(by)];
                p.conn.close(now, code, "closed by the simulation");
                p.closed_with = Some(code);
                self.note(Some(by), || format!("close({code})"));
            }
            Ending::Abort { .. } => {
                for l in &mut self.links {
                    l.abort(now);
                }
                self.aborted_at = Some(now);
                self.note(None, || "transport aborted".into());
            }
            Ending::Silent { .. } => {
                for l in &mut self.links {
                    l.cut();
                }
                self.silent_at = Some(now);
                self.note(None, || "link silently cut".into());
            }
        }
        Ok(true)
    }

    // ----- time -----

    /// The earliest instant after `now` at which something is due.
    fn next_instant(&self) -> Result<Option<Instant>, String> {
        let now = self.now;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                if t > now {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
        };
        for (i, p) in self.peers.iter().enumerate() {
            let timer = p.conn.poll_timeout();
            if timer.is_some_and(|t| t <= now) {
                return Err(format!(
                    "{:?}: poll_timeout is in the past after handle_timeout ran",
                    p.side
                ));
            }
            consider(timer);
            consider(self.links[i].next_due());
            if let Some((_, at)) = &p.auth {
                consider(*at);
            }
        }
        if let Some(&k) = self.open_order.get(self.next_open) {
            consider(
                self.peers[0]
                    .ready_at
                    .map(|r| r + self.opts.streams[k].open_at),
            );
        }
        match self.opts.ending {
            Ending::GoAway { at: None, .. } => {}
            Ending::GoAway { at: Some(at), .. }
            | Ending::Close { at, .. }
            | Ending::Abort { at }
            | Ending::Silent { at } => {
                if !self.ending_done {
                    consider(Some(self.start + at));
                }
            }
        }
        for (k, m) in self.streams.iter().enumerate() {
            let plan = &self.opts.streams[k];
            consider(m.answer_at);
            for side in [Side::Agent, Side::Server] {
                let app = m.app(side);
                let Some(started) = app.started else { continue };
                if app.end != End::Open {
                    continue;
                }
                if let Some(r) = plan.reset {
                    if r.by == side && !app.reset_tried {
                        consider(Some(started + r.after));
                    }
                }
                let reader = match side {
                    Side::Agent => plan.down.reader,
                    Side::Server => plan.up.reader,
                };
                if app.readable {
                    consider(app.next_read);
                    if let (Some(at), Some(f)) = (reader.pause_at, reader.pause_for) {
                        consider(Some(started + at + f));
                    }
                }
            }
        }
        Ok(next)
    }

    // ----- invariants -----

    /// Checked after every round at every instant.
    fn check_invariants(&mut self) -> Check {
        for side in [Side::Agent, Side::Server] {
            let me = &self.peers[ix(side)].conn;
            let peer = &self.peers[1 - ix(side)].conn;
            let (my_config, peer_config) = match side {
                Side::Agent => (&self.opts.agent, &self.opts.server),
                Side::Server => (&self.opts.server, &self.opts.agent),
            };
            let send_buffer = my_config.sanitized_send_buffer();
            let initial_window = me.limits().stream_window;
            let max_window = my_config.sanitized_max_stream_window();
            let mut grown = 0u64;
            let mut recv_total = 0u64;
            for id in me.stream_ids() {
                let info = me
                    .stream_info(id)
                    .ok_or_else(|| format!("{side:?}: listed stream {id} has no info"))?;
                let k = self.plan_of(side, id)?;
                let m = &self.streams[k];
                let sending = m.sending(side);
                let receiving = m.receiving(side);
                if info.send_buffered > send_buffer {
                    return Err(format!(
                        "{side:?}: stream {id} buffers {} bytes, above its send buffer of {send_buffer}",
                        info.send_buffered
                    ));
                }
                if info.send_buffered as u64 > info.send_credit {
                    return Err(format!(
                        "{side:?}: stream {id} buffers {} bytes with {} credit",
                        info.send_buffered, info.send_credit
                    ));
                }
                // Credit only returns for bytes the receiving application read, or as the
                // receiver's window grows, so what was sent plus what may still be sent is
                // at most the receiver's window now plus what it read.
                let peer_window = u64::from(
                    peer.stream_info(id)
                        .map_or(peer_config.sanitized_max_stream_window(), |i| i.recv_window),
                );
                if info.sent + info.send_credit > peer_window + sending.read {
                    return Err(format!(
                        "{side:?}: stream {id} sent {} with {} credit left, beyond the peer's window {} plus the {} bytes it read",
                        info.sent, info.send_credit, peer_window, sending.read
                    ));
                }
                if info.sent + info.send_buffered as u64 != sending.written {
                    return Err(format!(
                        "{side:?}: stream {id} sent {} and buffers {}, but {} were written",
                        info.sent, info.send_buffered, sending.written
                    ));
                }
                // A stream reset after its last bytes is still listed until they are out;
                // what it receives meanwhile is dropped unread.
                let abandoned = matches!(m.app(side).end, End::ResetLocal(_));
                let my_window = u64::from(info.recv_window);
                if info.recv_window < initial_window || info.recv_window > max_window {
                    return Err(format!(
                        "{side:?}: stream {id} has a window of {my_window}, outside {initial_window}..={max_window}"
                    ));
                }
                grown += u64::from(info.recv_window - initial_window);
                if info.recv_buffered as u64 > my_window
                    || (!abandoned && info.received - info.read != info.recv_buffered as u64)
                {
                    return Err(format!(
                        "{side:?}: stream {id} buffers {} received bytes (received {}, read {}), window {my_window}",
                        info.recv_buffered, info.received, info.read
                    ));
                }
                if !abandoned && info.read != receiving.read {
                    return Err(format!(
                        "{side:?}: stream {id} says {} bytes were read, the application read {}",
                        info.read, receiving.read
                    ));
                }
                let in_flight = info.sent.saturating_sub(sending.read);
                if in_flight == peer_window && info.send_credit == 0 {
                    self.cov.full_windows += 1;
                }
                let slot = &mut self.max_in_flight[k][dir_of(side) as usize];
                *slot = (*slot).max(in_flight);
                if peer_window > 0 {
                    let used = in_flight as f64 / peer_window as f64;
                    self.max_window_use = self.max_window_use.max(used);
                }
                recv_total += info.recv_buffered as u64;
            }
            if grown > my_config.window_growth_budget || me.stats().windows_grown != grown {
                return Err(format!(
                    "{side:?}: stream windows grew by {grown} together (the connection counts {}), \
                     beyond the budget of {} or miscounted",
                    me.stats().windows_grown,
                    my_config.window_growth_budget
                ));
            }
            let stats = me.stats();
            // Every ping crosses the link both ways, and delays only add to latency.
            let floor = self.opts.up_link.latency + self.opts.down_link.latency;
            if stats
                .rtt
                .is_some_and(|rtt| rtt + Duration::from_micros(1) < floor)
            {
                return Err(format!(
                    "{side:?}: RTT estimate {:?} below the link's round trip {floor:?}",
                    stats.rtt
                ));
            }
            if stats.recv_buffered as u64 != recv_total {
                return Err(format!(
                    "{side:?}: stats say {} bytes buffered, streams {recv_total}",
                    stats.recv_buffered
                ));
            }
            // Connection credit returns as the receiver processes data frames.
            let peer_stats = peer.stats();
            let conn_window = u64::from(peer.limits().connection_window);
            if stats.bytes_sent > conn_window + peer_stats.bytes_received {
                return Err(format!(
                    "{side:?}: sent {} stream bytes, beyond the peer's connection window {conn_window} plus the {} it processed",
                    stats.bytes_sent, peer_stats.bytes_received
                ));
            }
        }
        Ok(())
    }

    /// Checked once the run is over.
    fn final_checks(&self) -> Check {
        for p in &self.peers {
            let side = p.side;
            let stats = p.conn.stats();
            if p.conn.stream_ids().next().is_some()
                || stats.streams_active != 0
                || stats.send_buffered != 0
                || stats.recv_buffered != 0
            {
                return Err(format!("{side:?}: streams left after the end: {stats:?}"));
            }
            if let Some(t) = self.silent_at {
                let lost_before = p.lost.as_ref().is_some_and(|(_, at)| *at <= t);
                let closing_before = p.went_away || p.closed_with.is_some() || lost_before;
                if !closing_before {
                    let cfg = match side {
                        Side::Agent => &self.opts.agent,
                        Side::Server => &self.opts.server,
                    };
                    let deadline = match p.ready_at {
                        // The idle clock starts at ready at the earliest.
                        Some(r) => t.max(r) + cfg.idle_timeout,
                        None => self.start + cfg.handshake_timeout,
                    };
                    let gave_up = self.gave_up_at.filter(|_| side == Side::Agent);
                    let Some((reason, at)) = &p.lost else {
                        // The probe gave up, and the connection drained as its streams
                        // ended: noticed, if in time.
                        match gave_up {
                            Some(g) if g <= deadline + DETECTION_SLACK => continue,
                            Some(g) => {
                                return Err(format!(
                                    "{side:?}: the probe gave up {:?} after the cut; the limit was {:?}",
                                    g - t,
                                    deadline - t
                                ))
                            }
                            None => {
                                return Err(format!(
                                    "{side:?}: the silent disconnect was never noticed"
                                ))
                            }
                        }
                    };
                    if *at > deadline + DETECTION_SLACK {
                        return Err(format!(
                            "{side:?}: dead peer noticed {:?} after the cut ({reason}); the limit was {:?}",
                            *at - t,
                            deadline - t
                        ));
                    }
                    let quiet_since = p.ready_at.map_or(p.last_input, |r| r.max(p.last_input));
                    if matches!(reason, Error::IdleTimeout(_))
                        && *at < quiet_since + cfg.idle_timeout
                    {
                        return Err(format!(
                            "{side:?}: idle timeout {:?} after the last input, before the configured {:?}",
                            *at - quiet_since,
                            cfg.idle_timeout
                        ));
                    }
                }
            }
        }
        let lost = self.peers.iter().any(|p| p.lost.is_some());
        let closed = self.peers.iter().any(|p| p.closed_with.is_some())
            || self.aborted_at.is_some()
            || self.silent_at.is_some();
        let went_away = self.peers.iter().any(|p| p.went_away);
        for (k, m) in self.streams.iter().enumerate() {
            let gone = |e: End| matches!(e, End::NotStarted | End::NeverOpened);
            if !lost && !closed {
                let agent_ok = m.agent.end.is_final() && m.agent.end != End::Lost
                    || (m.agent.end == End::NotStarted
                        && (went_away || self.peers[0].ready_at.is_none()));
                let server_ok = match m.server.end {
                    End::Open | End::Lost => false,
                    End::NotStarted => {
                        gone(m.agent.end)
                            || matches!(m.agent.end, End::Refused(_) | End::ResetLocal(_))
                    }
                    _ => true,
                };
                if !agent_ok || !server_ok {
                    return Err(format!(
                        "plan {k} ({:?}) ended {:?} at the agent and {:?} at the server although the connection closed cleanly",
                        m.id, m.agent.end, m.server.end
                    ));
                }
            }
            if m.agent.end == End::Completed && m.server.end == End::Completed {
                for (name, d) in [("up", &m.up), ("down", &m.down)] {
                    if !(d.finished && d.eof && d.read == d.written) {
                        return Err(format!(
                            "plan {k}: completed on both sides but {name} is {d:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The state of everything, for a failure report.
    fn dump(&self) -> String {
        let mut s = String::new();
        for p in &self.peers {
            let _ = writeln!(
                s,
                "  {:?}: ready {:?} lost {:?} drained {} went_away {} closed_with {:?} inbox {} outbox {} timer {:?} stats {:?}",
                p.side,
                p.ready_at.map(|t| t - self.start),
                p.lost.as_ref().map(|(e, t)| (e.to_string(), *t - self.start)),
                p.conn.is_drained(),
                p.went_away,
                p.closed_with,
                p.inbox.len(),
                p.out.len(),
                p.conn.poll_timeout().map(|t| t.saturating_duration_since(self.start)),
                p.conn.stats(),
            );
            for id in p.conn.stream_ids() {
                let _ = writeln!(s, "    {id:?}: {:?}", p.conn.stream_info(id));
            }
        }
        for (i, l) in self.links.iter().enumerate() {
            let _ = writeln!(
                s,
                "  link {}: queued {} next {:?} cut {}",
                if i == 0 {
                    "agent->server"
                } else {
                    "server->agent"
                },
                l.queued(),
                l.next_due()
                    .map(|t| t.saturating_duration_since(self.start)),
                l.is_cut()
            );
        }
        for (k, m) in self.streams.iter().enumerate() {
            if m.agent.end.is_final() && m.server.end.is_final() {
                continue;
            }
            let app = |a: &AppStream| {
                format!(
                    "{:?} started {:?} readable {} write_blocked {} next_read {:?} reset_tried {}",
                    a.end,
                    a.started.map(|t| t - self.start),
                    a.readable,
                    a.write_blocked,
                    a.next_read.map(|t| t - self.start),
                    a.reset_tried
                )
            };
            let _ = writeln!(
                s,
                "  plan {k} {:?}: agent [{}] server [{}] up {:?} down {:?} opened {} answer {:?}",
                m.id,
                app(&m.agent),
                app(&m.server),
                m.up,
                m.down,
                m.opened,
                m.answer_at.map(|t| t - self.start)
            );
        }
        s
    }
}
