//! Scripted tests of two connections joined in memory on one virtual clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::{Frame, HEADER_LEN};
use crate::*;

struct Pair {
    now: Instant,
    agent: Connection,
    server: Connection,
    agent_events: Vec<Event>,
    server_events: Vec<Event>,
}

fn cfg(require_auth: bool) -> Arc<Config> {
    Arc::new(Config {
        require_auth,
        ..Config::default()
    })
}

impl Pair {
    fn new(agent_cfg: Arc<Config>, server_cfg: Arc<Config>) -> Pair {
        let now = Instant::now();
        Pair {
            now,
            agent: Connection::agent(agent_cfg, Credentials::none(), now),
            server: Connection::server(server_cfg, now),
            agent_events: Vec::new(),
            server_events: Vec::new(),
        }
    }

    fn ready() -> Pair {
        Pair::ready_with(Config::default())
    }

    /// A ready pair whose two sides both use `config` (with `require_auth` off).
    fn ready_with(config: Config) -> Pair {
        let config = Arc::new(Config {
            require_auth: false,
            ..config
        });
        let mut p = Pair::new(config.clone(), config);
        p.drive();
        assert!(p.agent.is_ready() && p.server.is_ready());
        p.agent_events.clear();
        p.server_events.clear();
        p
    }

    /// Moves bytes both ways until neither side has anything to send.
    fn drive(&mut self) {
        for _ in 0..1000 {
            let mut a = Vec::new();
            let mut s = Vec::new();
            self.agent.poll_transmit(self.now, &mut a);
            self.server.poll_transmit(self.now, &mut s);
            if a.is_empty() && s.is_empty() {
                self.collect();
                return;
            }
            assert_eq!(self.server.handle_input(self.now, &a), a.len());
            assert_eq!(self.agent.handle_input(self.now, &s), s.len());
            self.collect();
        }
        panic!("livelock: still sending after 1000 rounds");
    }

    fn collect(&mut self) {
        while let Some(e) = self.agent.poll() {
            self.agent_events.push(e);
        }
        while let Some(e) = self.server.poll() {
            self.server_events.push(e);
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.agent.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
    }

    fn open_accepted(&mut self) -> StreamId {
        let id = self.agent.open(self.now, target()).unwrap();
        self.drive();
        let req = self.server_events.iter().any(
            |e| matches!(e, Event::Stream(StreamEvent::OpenRequested { id: i, .. }) if *i == id),
        );
        assert!(req, "server saw no open request");
        self.server.accept_open(id).unwrap();
        self.drive();
        assert!(self
            .agent_events
            .contains(&Event::Stream(StreamEvent::Opened { id })));
        id
    }
}

fn target() -> Target {
    Target::parse("example.com:80").unwrap()
}

fn read_all(c: &mut Connection, id: StreamId) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        match c.recv_stream(id).read(usize::MAX) {
            Ok(Some(b)) => out.extend_from_slice(&b),
            Ok(None) => return (out, true),
            Err(Error::Blocked) => return (out, false),
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

#[test]
fn handshake_with_application_auth() {
    let mut p = Pair::new(cfg(true), cfg(true));
    p.drive();
    let req = p
        .server_events
        .drain(..)
        .find_map(|e| match e {
            Event::AuthRequested(r) => Some(r),
            _ => None,
        })
        .expect("auth requested");
    assert_eq!(req.method, "none");
    assert!(!p.agent.is_ready());
    assert_eq!(p.agent.open(p.now, target()), Err(Error::NotReady));
    p.server
        .accept_auth(p.now, req, "arn:aws:iam::1:user/a".into(), 0);
    p.drive();
    assert!(p.agent_events.contains(&Event::Ready {
        principal: "arn:aws:iam::1:user/a".into()
    }));
    assert!(p.agent.is_ready());
}

/// Found by the simulation (seed 0x7ad86dffe7b8664b): a server application that takes
/// longer than the idle timeout to decide on the auth (allowed: the handshake deadline is
/// longer) must not declare the waiting agent dead the moment it admits it.
#[test]
fn a_slow_auth_decision_does_not_trip_the_idle_timeout() {
    let mut p = Pair::new(cfg(true), cfg(true));
    p.drive();
    let req = p
        .server_events
        .drain(..)
        .find_map(|e| match e {
            Event::AuthRequested(r) => Some(r),
            _ => None,
        })
        .expect("auth requested");
    // Past the 15 s idle timeout, within the 30 s handshake deadline.
    p.advance(Duration::from_secs(20));
    p.server.accept_auth(p.now, req, "slow".into(), 0);
    p.drive();
    p.advance(Duration::from_millis(1));
    p.drive();
    assert!(
        !p.server_events
            .iter()
            .chain(&p.agent_events)
            .any(|e| matches!(e, Event::ConnectionLost { .. })),
        "{:?} {:?}",
        p.server_events,
        p.agent_events
    );
    assert!(p.server.is_ready() && p.agent.is_ready());
}

#[test]
fn rejected_auth_closes_both_sides_with_the_reason() {
    let mut p = Pair::new(cfg(true), cfg(true));
    p.drive();
    let req = p
        .server_events
        .drain(..)
        .find_map(|e| match e {
            Event::AuthRequested(r) => Some(r),
            _ => None,
        })
        .unwrap();
    p.server.reject_auth(
        p.now,
        req,
        AuthFailure::NotAllowed,
        "not on the list".into(),
    );
    p.drive();
    let lost = p.agent_events.iter().find_map(|e| match e {
        Event::ConnectionLost { reason } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(
        lost,
        Some(Error::AuthRejected {
            failure: AuthFailure::NotAllowed,
            detail: "not on the list".into()
        })
    );
    assert!(p.server.is_drained());
    assert!(p.agent.is_drained());
}

#[test]
fn handshake_deadline_fires_when_the_server_never_answers() {
    let mut p = Pair::new(cfg(true), cfg(true));
    p.drive();
    // The server application holds the auth request and never answers.
    let deadline = p.agent.poll_timeout().unwrap();
    assert_eq!(deadline, p.now + Duration::from_secs(30));
    p.advance(Duration::from_secs(30));
    p.drive();
    assert!(p.agent_events.iter().any(|e| matches!(
        e,
        Event::ConnectionLost {
            reason: Error::HandshakeTimeout(_)
        }
    )));
}

#[test]
fn data_flows_both_ways_with_half_close() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    assert_eq!(p.agent.send_stream(id).write(b"request").unwrap(), 7);
    p.agent.send_stream(id).finish().unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.server, id), (b"request".to_vec(), true));
    // The server's direction is still open after the agent's FIN.
    p.server.send_stream(id).write(b"response").unwrap();
    p.server.send_stream(id).finish().unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.agent, id), (b"response".to_vec(), true));
    p.drive();
    assert_eq!(p.agent.stats().streams_active, 0);
    assert_eq!(p.server.stats().streams_active, 0);
}

#[test]
fn data_written_before_the_open_result_is_delivered_after_accept() {
    let mut p = Pair::ready();
    let id = p.agent.open(p.now, target()).unwrap();
    p.agent.send_stream(id).write(b"early").unwrap();
    p.drive();
    assert_eq!(
        p.server.recv_stream(id).read(10),
        Err(Error::NotOpen(id)),
        "not readable before accept"
    );
    p.server.accept_open(id).unwrap();
    p.drive();
    assert!(p
        .server_events
        .contains(&Event::Stream(StreamEvent::Readable { id })));
    assert_eq!(read_all(&mut p.server, id).0, b"early");
}

#[test]
fn refusal_reaches_the_agent_typed() {
    let mut p = Pair::ready();
    let id = p.agent.open(p.now, target()).unwrap();
    p.drive();
    p.server
        .refuse_open(id, OpenRefusal::new(RefusalReason::NoSuchHost, "nx"))
        .unwrap();
    p.drive();
    assert!(p
        .agent_events
        .contains(&Event::Stream(StreamEvent::Refused {
            id,
            refusal: OpenRefusal::new(RefusalReason::NoSuchHost, "nx")
        })));
    assert_eq!(p.agent.stream_info(id), None);
}

#[test]
fn writer_blocks_at_the_window_and_resumes_when_the_reader_reads() {
    // A send buffer as large as any credit, so that the window alone limits writes.
    let mut p = Pair::ready_with(Config {
        send_buffer: usize::MAX,
        ..Config::default()
    });
    let id = p.open_accepted();
    let window = Limits::default().stream_window as usize;
    let big = vec![7u8; window * 3];
    let n = p.agent.send_stream(id).write(&big).unwrap();
    assert_eq!(n, window, "write takes exactly the credit");
    assert_eq!(p.agent.send_stream(id).write(&big), Err(Error::Blocked));
    p.drive();
    let info = p.server.stream_info(id).unwrap();
    assert_eq!(
        info.recv_buffered, window,
        "receiver buffers at most the window"
    );
    let (got, _) = read_all(&mut p.server, id);
    assert_eq!(got.len(), window);
    p.drive();
    assert!(p
        .agent_events
        .contains(&Event::Stream(StreamEvent::Writable { id })));
    assert!(p.agent.send_stream(id).write(&big).unwrap() > 0);
}

#[test]
fn writer_blocks_at_the_send_buffer_and_resumes_once_it_is_transmitted() {
    // A window larger than the send buffer, so that the send buffer alone limits writes.
    let config = Config {
        limits: Limits {
            stream_window: 1024 * 1024,
            ..Limits::default()
        },
        ..Config::default()
    };
    let cap = config.send_buffer;
    assert!((config.limits.stream_window as usize) > cap);
    let mut p = Pair::ready_with(config);
    let id = p.open_accepted();
    let big = vec![7u8; cap * 3];
    let n = p.agent.send_stream(id).write(&big).unwrap();
    assert_eq!(n, cap, "write takes the send buffer, not the whole credit");
    assert_eq!(p.agent.send_stream(id).write(&big), Err(Error::Blocked));
    assert_eq!(p.agent.send_stream(id).writable(), Ok(0));
    // Transmitting (no window update from the reader) makes room again.
    let mut out = Vec::new();
    while p.agent.poll_transmit(p.now, &mut out) > 0 {}
    while let Some(e) = p.agent.poll() {
        p.agent_events.push(e);
    }
    assert!(p
        .agent_events
        .contains(&Event::Stream(StreamEvent::Writable { id })));
    assert_eq!(p.agent.send_stream(id).writable(), Ok(cap));
    assert_eq!(p.agent.send_stream(id).write(&big).unwrap(), cap);
}

#[test]
fn a_stalled_stream_does_not_block_another() {
    let mut p = Pair::ready();
    let stalled = p.open_accepted();
    let live = p.open_accepted();
    let chunk = vec![1u8; 64 * 1024];
    // Fill the stalled stream's window; its reader never reads. The send buffer is
    // smaller than the window, so this takes several rounds of writing and transmitting.
    let window = Limits::default().stream_window as usize;
    for _ in 0..window / Config::default().send_buffer + 2 {
        while p.agent.send_stream(stalled).write(&chunk).is_ok() {}
        p.drive();
    }
    assert_eq!(p.server.stream_info(stalled).unwrap().recv_buffered, window);
    // The live stream moves many windows' worth of data.
    let mut moved = 0;
    while moved < 16 * 1024 * 1024 {
        if let Ok(n) = p.agent.send_stream(live).write(&chunk) {
            moved += n;
        }
        p.drive();
        read_all(&mut p.server, live);
    }
    assert_eq!(p.server.stream_info(live).unwrap().read, moved as u64);
    assert_eq!(p.server.stream_info(stalled).unwrap().recv_buffered, window);
}

/// A peer that sends an unread stream a kilobyte between every 64 KiB or so for another
/// stream would make each kilobyte keep a whole receive allocation alive: 6 MiB for the
/// other stream would hold 6 MiB here for 100 KiB. Past two allocations those payloads
/// are copied, so the receive buffer takes its earlier allocations back.
#[test]
fn a_little_of_an_unread_stream_does_not_keep_the_receive_buffers_alive() {
    const LITTLE: usize = 1024;
    let mut p = Pair::ready();
    let unread = p.open_accepted();
    let live = p.open_accepted();
    let chunk = vec![7u8; 60 * 1024];
    let before = p.server.stats();
    let mut moved = 0;
    for i in 0..100u8 {
        p.agent
            .send_stream(unread)
            .write(&[i; LITTLE])
            .expect("room in the window");
        p.drive();
        let mut n = 0;
        while n < chunk.len() {
            n += p.agent.send_stream(live).write(&chunk[n..]).unwrap_or(0);
            p.drive();
            moved += read_all(&mut p.server, live).0.len();
        }
    }
    assert_eq!(moved, 100 * chunk.len());
    let stats = p.server.stats();
    let made = stats.rx_allocations - before.rx_allocations;
    assert!(
        made <= 4,
        "{made} fresh receive allocations for {} MiB",
        moved >> 20
    );
    // All but the payloads in the first two or three allocations.
    let copied = (stats.rx_copied - before.rx_copied) as usize;
    assert!(copied >= 97 * LITTLE, "{copied} bytes copied");
    let (bytes, _) = read_all(&mut p.server, unread);
    let sent: Vec<u8> = (0..100u8).flat_map(|i| [i; LITTLE]).collect();
    assert!(bytes == sent, "the unread stream's bytes changed");
}

#[test]
fn reset_reaches_the_peer_with_its_code_and_late_frames_are_ignored() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.server.send_stream(id).write(b"in flight").unwrap();
    p.agent.send_stream(id).reset(ErrorCode(77)).unwrap();
    p.drive();
    assert!(p.server_events.contains(&Event::Stream(StreamEvent::Reset {
        id,
        code: ErrorCode(77),
        unread: vec![],
    })));
    assert!(
        p.agent.is_ready() && p.server.is_ready(),
        "connection survives"
    );
}

/// The bytes of the `Reset` event for `id` among `events`, joined.
fn unread_at_reset(events: &[Event], id: StreamId) -> Option<(ErrorCode, Vec<u8>)> {
    events.iter().find_map(|e| match e {
        Event::Stream(StreamEvent::Reset {
            id: i,
            code,
            unread,
        }) if *i == id => Some((*code, unread.concat())),
        _ => None,
    })
}

#[test]
fn a_reset_hands_over_the_bytes_that_arrived_before_it_unread() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.server.send_stream(id).write(b"HTTP/1.1 413 ").unwrap();
    p.drive();
    p.server.send_stream(id).write(b"Too Large").unwrap();
    p.drive();
    p.server.send_stream(id).reset(ErrorCode::CANCEL).unwrap();
    p.drive();
    assert_eq!(
        unread_at_reset(&p.agent_events, id),
        Some((ErrorCode::CANCEL, b"HTTP/1.1 413 Too Large".to_vec()))
    );
    assert!(
        matches!(
            p.agent.recv_stream(id).read(100),
            Err(Error::UnknownStream(_))
        ),
        "the stream itself is gone"
    );
}

#[test]
fn reset_after_sent_delivers_the_written_bytes_and_fin_before_the_reset() {
    for finish in [false, true] {
        let mut p = Pair::ready();
        let id = p.open_accepted();
        p.agent.send_stream(id).write(b"upload").unwrap();
        p.server.send_stream(id).write(b"early answer").unwrap();
        if finish {
            p.server.send_stream(id).finish().unwrap();
        }
        // Nothing transmitted yet: a plain reset would drop the answer.
        p.server
            .send_stream(id)
            .reset_after_sent(ErrorCode::CANCEL)
            .unwrap();
        assert!(matches!(
            p.server.send_stream(id).write(b"more"),
            Err(Error::UnknownStream(_))
        ));
        assert!(matches!(
            p.server.recv_stream(id).read(100),
            Err(Error::UnknownStream(_))
        ));
        let mut wire = Vec::new();
        p.server.poll_transmit(p.now, &mut wire);
        let frames = decode_all(&wire);
        let kinds: Vec<_> = frames
            .iter()
            .filter(|f| !matches!(f, Frame::WindowUpdate { .. }))
            .map(|f| match f {
                Frame::Data { fin, payload, .. } => format!("data {} fin={fin}", payload.len()),
                Frame::Reset { code, .. } => format!("reset {code}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                format!("data 12 fin={finish}"),
                format!("reset {}", ErrorCode::CANCEL)
            ],
            "the reset follows the stream's last frame in one transmit"
        );
        assert_eq!(p.agent.handle_input(p.now, &wire), wire.len());
        p.drive();
        assert_eq!(
            unread_at_reset(&p.agent_events, id),
            Some((ErrorCode::CANCEL, b"early answer".to_vec()))
        );
        assert!(p.server.stream_info(id).is_none(), "forgotten once sent");
        assert!(p.agent.is_ready() && p.server.is_ready());
    }
}

#[test]
fn a_stream_reset_after_sent_hears_nothing_of_its_open_result() {
    for accept in [true, false] {
        let mut p = Pair::ready();
        let id = p.agent.open(p.now, target()).unwrap();
        let mut wire = Vec::new();
        if accept {
            let mut up = Vec::new();
            p.agent.poll_transmit(p.now, &mut up);
            assert_eq!(p.server.handle_input(p.now, &up), up.len());
            p.server.accept_open(id).unwrap();
        } else {
            // The open is left unprocessed.
            p.server.go_away(p.now);
        }
        p.server.poll_transmit(p.now, &mut wire);
        // The agent resets the stream after a write, with nothing transmitted yet, before
        // the answer to its open arrives.
        p.agent.send_stream(id).write(b"request").unwrap();
        p.agent
            .send_stream(id)
            .reset_after_sent(ErrorCode::CANCEL)
            .unwrap();
        assert_eq!(p.agent.handle_input(p.now, &wire), wire.len());
        p.collect();
        assert!(
            !p.agent_events.iter().any(|e| matches!(
                e,
                Event::Stream(StreamEvent::Opened { .. } | StreamEvent::Refused { .. })
            )),
            "accept {accept}: {:?}",
            p.agent_events
        );
    }
}

#[test]
fn after_reset_after_sent_received_bytes_are_dropped_until_the_reset_is_out() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.agent.send_stream(id).write(b"unread upload").unwrap();
    p.drive();
    p.server.send_stream(id).write(&[7; 10_000]).unwrap();
    p.server
        .send_stream(id)
        .reset_after_sent(ErrorCode(9))
        .unwrap();
    assert_eq!(p.server.stream_info(id).unwrap().recv_buffered, 0, "freed");
    // More of the upload arrives before the server has transmitted anything.
    p.agent.send_stream(id).write(b"late upload").unwrap();
    let mut up = Vec::new();
    p.agent.poll_transmit(p.now, &mut up);
    assert_eq!(p.server.handle_input(p.now, &up), up.len());
    let info = p.server.stream_info(id).unwrap();
    assert_eq!((info.recv_buffered, info.send_buffered), (0, 10_000));
    p.drive();
    assert_eq!(
        unread_at_reset(&p.agent_events, id),
        Some((ErrorCode(9), vec![7; 10_000]))
    );
    assert!(p.server.stream_info(id).is_none());
    assert!(p.agent.is_ready() && p.server.is_ready());
}

#[test]
fn keepalive_measures_rtt_and_detects_a_dead_peer() {
    let mut p = Pair::ready();
    p.advance(Duration::from_secs(5));
    p.drive();
    assert!(p.agent.stats().rtt.is_some());
    // The server goes silent: nothing it sends is delivered any more.
    for _ in 0..4 {
        p.now += Duration::from_secs(5);
        p.agent.handle_timeout(p.now);
        let mut sink = Vec::new();
        p.agent.poll_transmit(p.now, &mut sink);
    }
    p.collect();
    assert!(p.agent_events.iter().any(|e| matches!(
        e,
        Event::ConnectionLost {
            reason: Error::IdleTimeout(_)
        }
    )));
}

/// Timers from settings beyond what the clock counts (`u64::MAX` seconds in a
/// configuration file) mean "a century", not a panic: the handshake, keepalive, idle and
/// probe deadlines all run on them.
#[test]
fn timers_beyond_what_the_clock_counts_do_not_panic() {
    let mut p = Pair::ready_with(Config {
        handshake_timeout: Duration::MAX,
        keepalive_interval: Duration::MAX,
        idle_timeout: Duration::MAX,
        probe_timeout: Duration::MAX,
        ..Config::default()
    });
    // Silence long enough for a probe to go with the next open.
    p.advance(Duration::from_secs(5));
    let id = p.open_accepted();
    p.advance(Duration::from_secs(3600));
    p.drive();
    assert!(p.agent.poll_timeout().is_some());
    assert!(p.agent.is_ready() && p.server.is_ready());
    p.agent.send_stream(id).write(b"still here").unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.server, id).0, b"still here");
    assert!(deadline(p.now, Duration::MAX) > p.now + Duration::from_secs(50 * 365 * 86_400));
}

/// The pings (without ACK) in `bytes`, as frames.
fn pings_in(bytes: &[u8]) -> usize {
    let mut buf = bytes::BytesMut::from(bytes);
    let mut d = crate::frame::Decoder::new(u32::MAX);
    let mut n = 0;
    while let Some(f) = d.decode(&mut buf).unwrap() {
        n += usize::from(matches!(f, Frame::Ping { ack: false, .. }));
    }
    n
}

#[test]
fn a_stream_opened_after_silence_probes_and_new_streams_leave_a_silent_server() {
    let mut p = Pair::ready();
    let under_way = p.open_accepted();
    p.advance(Duration::from_secs(2));
    p.drive();
    p.agent_events.clear();
    let last_heard = p.now;
    p.now += Duration::from_secs(2);
    // Nothing more the server sends is delivered; a client wants a new stream.
    let waiting = p.agent.open(p.now, target()).unwrap();
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(pings_in(&out), 1, "the open goes with a ping");
    let deadline = p.now + Config::default().probe_timeout;
    assert_eq!(p.agent.poll_timeout(), Some(deadline));
    assert!(deadline < last_heard + Config::default().idle_timeout);
    p.now = deadline - Duration::from_millis(1);
    p.agent.handle_timeout(p.now);
    p.collect();
    assert!(p.agent_events.is_empty(), "{:?}", p.agent_events);
    p.now = deadline;
    p.agent.handle_timeout(p.now);
    p.collect();
    // The waiting open is refused so that it can go elsewhere; the connection takes no
    // new streams, and the stream under way is not cut.
    assert!(
        p.agent_events.iter().any(|e| matches!(
            e,
            Event::Stream(StreamEvent::Refused { id, refusal })
                if *id == waiting && refusal.reason == RefusalReason::GoingAway
        )),
        "{:?}",
        p.agent_events
    );
    assert!(p.agent_events.contains(&Event::Unresponsive {
        silent: Duration::from_secs(5)
    }));
    assert!(!p.agent.can_open() && p.agent.is_going_away());
    assert!(p.agent.stream_info(under_way).is_some());
    assert!(!p
        .agent_events
        .iter()
        .any(|e| matches!(e, Event::ConnectionLost { .. })));
    // The server hears of it (should it be alive after all): the open reset, a goaway.
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    let frames = {
        let mut buf = bytes::BytesMut::from(&out[..]);
        let mut d = crate::frame::Decoder::new(u32::MAX);
        std::iter::from_fn(|| d.decode(&mut buf).unwrap()).collect::<Vec<_>>()
    };
    assert!(frames
        .iter()
        .any(|f| matches!(f, Frame::Reset { id, .. } if *id == waiting)));
    assert!(frames
        .iter()
        .any(|f| matches!(f, Frame::GoAway { code, .. } if *code == ErrorCode::NO_ERROR)));
    // A dead server is then found dead by the idle timeout.
    p.now = last_heard + Config::default().idle_timeout;
    p.agent.handle_timeout(p.now);
    p.collect();
    assert!(p.agent_events.iter().any(|e| matches!(
        e,
        Event::ConnectionLost {
            reason: Error::IdleTimeout(_)
        }
    )));
}

/// A path that died one way only: the server's pings still arrive, what the agent sends
/// is lost. The agent's keepalive ping stays unanswered, so a new open is probed anyway,
/// and only the answer to the probe's own ping would end it.
#[test]
fn a_path_dead_towards_the_server_is_probed_though_its_pings_arrive() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.advance(Duration::from_secs(5));
    // Both sides ping; only the server's arrives, and later some of the stream's data.
    let mut lost = Vec::new();
    p.agent.poll_transmit(p.now, &mut lost);
    assert_eq!(pings_in(&lost), 1);
    let mut from_server = Vec::new();
    p.server.poll_transmit(p.now, &mut from_server);
    assert_eq!(p.agent.handle_input(p.now, &from_server), from_server.len());
    p.now += Duration::from_millis(1400);
    p.server.send_stream(id).write(b"still coming").unwrap();
    let mut from_server = Vec::new();
    p.server.poll_transmit(p.now, &mut from_server);
    assert_eq!(p.agent.handle_input(p.now, &from_server), from_server.len());
    // Heard from 100 ms ago, but the keepalive ping has gone unanswered for 1.5 s.
    p.now += Duration::from_millis(100);
    let waiting = p.agent.open(p.now, target()).unwrap();
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(pings_in(&out), 1, "the open goes with a ping of its own");
    // The server's next ping arrives; the probe's ping is never answered.
    p.now += Duration::from_secs(4);
    p.server.handle_timeout(p.now);
    let mut from_server = Vec::new();
    p.server.poll_transmit(p.now, &mut from_server);
    assert_eq!(p.agent.handle_input(p.now, &from_server), from_server.len());
    p.now += Duration::from_secs(1);
    p.agent.handle_timeout(p.now);
    p.collect();
    assert!(p.agent_events.contains(&Event::Unresponsive {
        silent: Duration::from_secs(5)
    }));
    assert!(p.agent_events.iter().any(|e| matches!(
        e,
        Event::Stream(StreamEvent::Refused { id, .. }) if *id == waiting
    )));
}

/// A path that died towards the server just after the server was heard and the agent's
/// keepalive answered: nothing says so when a stream opens, but an open still unanswered
/// a second later starts the probe, which finds the server gone while the open waits.
#[test]
fn an_open_unanswered_for_a_second_probes_a_path_dead_towards_the_server() {
    let mut p = Pair::ready();
    p.advance(Duration::from_secs(5));
    p.drive();
    // From now on, what the agent sends is lost; the server's pings still arrive.
    let waiting = p.agent.open(p.now, target()).unwrap();
    let mut lost = Vec::new();
    p.agent.poll_transmit(p.now, &mut lost);
    assert_eq!(
        pings_in(&lost),
        0,
        "the server was just heard: no probe yet"
    );
    let check = p.now + PROBE_QUIET;
    assert_eq!(p.agent.poll_timeout(), Some(check));
    p.now = check;
    p.agent.handle_timeout(p.now);
    p.agent.poll_transmit(p.now, &mut lost);
    assert_eq!(pings_in(&lost), 1, "the open still waits: the probe's ping");
    p.now += Duration::from_secs(4);
    p.server.handle_timeout(p.now);
    let mut from_server = Vec::new();
    p.server.poll_transmit(p.now, &mut from_server);
    assert!(pings_in(&from_server) > 0);
    assert_eq!(p.agent.handle_input(p.now, &from_server), from_server.len());
    p.now = check + Config::default().probe_timeout;
    p.agent.handle_timeout(p.now);
    p.collect();
    assert!(p.agent_events.iter().any(|e| matches!(
        e,
        Event::Stream(StreamEvent::Refused { id, .. }) if *id == waiting
    )));
}

/// An open answered within the second costs no probe: the check finds nothing waiting.
#[test]
fn an_open_answered_within_a_second_sends_no_probe() {
    let mut p = Pair::ready();
    p.advance(Duration::from_secs(5));
    p.drive();
    p.open_accepted();
    p.now += PROBE_QUIET;
    p.agent.handle_timeout(p.now);
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(pings_in(&out), 0);
}

/// A keepalive ping out for less than a second (one round trip, every few seconds) arms
/// no probe on a connection that is busy.
#[test]
fn a_keepalive_ping_just_sent_arms_no_probe() {
    let mut p = Pair::ready();
    p.advance(Duration::from_secs(5));
    let mut keepalive = Vec::new();
    p.agent.poll_transmit(p.now, &mut keepalive);
    assert_eq!(pings_in(&keepalive), 1);
    // The server's own ping arrives: the agent has heard from it just now.
    let mut from_server = Vec::new();
    p.server.poll_transmit(p.now, &mut from_server);
    assert_eq!(p.agent.handle_input(p.now, &from_server), from_server.len());
    p.now += Duration::from_millis(300);
    p.agent.open(p.now, target()).unwrap();
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(pings_in(&out), 0);
}

/// A live server whose answers only wait in a queue (a slow uplink) looks silent to the
/// probe: it must not lose the streams under way, and the connection drains plainly.
#[test]
fn a_probe_that_gives_up_on_a_live_but_slow_server_cuts_nothing() {
    let mut p = Pair::ready();
    let under_way = p.open_accepted();
    p.advance(Duration::from_secs(2));
    p.drive();
    p.now += Duration::from_secs(2);
    let waiting = p.agent.open(p.now, target()).unwrap();
    // What the agent sends waits in the queue for 6 s, and so the server's answers.
    let mut queued = Vec::new();
    p.agent.poll_transmit(p.now, &mut queued);
    p.now += Duration::from_secs(6);
    p.agent.handle_timeout(p.now);
    p.collect();
    assert!(p.agent_events.contains(&Event::Unresponsive {
        silent: Duration::from_secs(6)
    }));
    // Everything arrives at last: the open first, which the server accepts, its answer
    // crossing the agent's reset.
    assert_eq!(p.server.handle_input(p.now, &queued), queued.len());
    p.collect();
    assert!(p.server_events.iter().any(|e| matches!(
        e,
        Event::Stream(StreamEvent::OpenRequested { id, .. }) if *id == waiting
    )));
    p.server.accept_open(waiting).unwrap();
    p.server.send_stream(waiting).write(b"too late").unwrap();
    p.drive();
    p.server
        .send_stream(under_way)
        .write(b"still here")
        .unwrap();
    p.server.send_stream(under_way).finish().unwrap();
    p.agent.send_stream(under_way).finish().unwrap();
    p.drive();
    assert_eq!(
        read_all(&mut p.agent, under_way),
        (b"still here".to_vec(), true)
    );
    assert_eq!(read_all(&mut p.server, under_way), (Vec::new(), true));
    p.drive();
    assert!(
        p.agent.is_drained() && p.server.is_drained(),
        "agent {:?} server {:?}; {:?}",
        p.agent.stream_ids().collect::<Vec<_>>(),
        p.server.stream_ids().collect::<Vec<_>>(),
        p.server_events
    );
    for events in [&p.agent_events, &p.server_events] {
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::ConnectionLost { .. })),
            "{events:?}"
        );
    }
}

#[test]
fn a_live_peer_answers_the_probe_and_a_busy_one_is_not_probed() {
    let mut p = Pair::ready();
    p.advance(Duration::from_secs(2));
    p.drive();
    // Heard from just now: the open goes alone.
    p.agent.open(p.now, target()).unwrap();
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(pings_in(&out), 0);
    assert_eq!(p.server.handle_input(p.now, &out), out.len());
    p.collect();
    let id = p.open_accepted();
    // Quiet for 3 s, then data on the stream: probed, answered, and all is well.
    p.now += Duration::from_secs(3);
    p.agent.send_stream(id).write(b"after a pause").unwrap();
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(pings_in(&out), 1, "data after silence goes with a ping");
    assert_eq!(p.server.handle_input(p.now, &out), out.len());
    p.drive();
    for _ in 0..8 {
        p.advance(Duration::from_secs(5));
        p.drive();
    }
    assert!(p.agent.is_ready() && p.server.is_ready());
    assert!(!p
        .agent_events
        .iter()
        .any(|e| matches!(e, Event::ConnectionLost { .. })));
    // Turned off: no probe ping.
    let mut p = Pair::ready_with(Config {
        probe_timeout: Duration::ZERO,
        ..Config::default()
    });
    p.advance(Duration::from_secs(2));
    p.drive();
    p.now += Duration::from_secs(2);
    p.agent.open(p.now, target()).unwrap();
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(pings_in(&out), 0);
}

#[test]
fn goaway_lets_open_streams_finish_then_drains() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.server.go_away(p.now);
    p.drive();
    assert!(p
        .agent_events
        .iter()
        .any(|e| matches!(e, Event::GoAway { .. })));
    assert_eq!(p.agent.open(p.now, target()), Err(Error::GoingAway));
    assert!(!p.agent.is_drained());
    p.agent.send_stream(id).write(b"last").unwrap();
    p.agent.send_stream(id).finish().unwrap();
    p.server.send_stream(id).finish().unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.server, id), (b"last".to_vec(), true));
    assert_eq!(read_all(&mut p.agent, id), (Vec::new(), true));
    p.drive();
    assert!(p.agent.is_drained() && p.server.is_drained());
}

/// Found by the simulation (seed 0x23d5ddc4f8399db2): after a goaway the server completes
/// its side of a stream, drains and closes the transport; the agent, whose application
/// had not yet read the stream's last bytes, must still be able to read them instead of
/// losing the connection and the stream's tail.
#[test]
fn a_peer_that_drains_first_leaves_complete_streams_readable() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.agent.send_stream(id).write(b"ping").unwrap();
    p.agent.send_stream(id).finish().unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.server, id), (b"ping".to_vec(), true));
    p.server.send_stream(id).write(b"pong").unwrap();
    p.server.send_stream(id).finish().unwrap();
    p.server.go_away(p.now);
    p.drive();
    assert!(p.server.is_drained(), "the server has nothing left");
    p.agent.handle_eof(p.now);
    p.collect();
    assert!(
        !p.agent_events
            .iter()
            .any(|e| matches!(e, Event::ConnectionLost { .. })),
        "{:?}",
        p.agent_events
    );
    assert_eq!(
        p.agent.poll_timeout(),
        None,
        "no keepalive towards a peer that is gone"
    );
    assert_eq!(read_all(&mut p.agent, id), (b"pong".to_vec(), true));
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert!(p.agent.is_drained());
}

/// A transport that ends while a stream still expects data is lost, goaway or not.
#[test]
fn eof_after_goaway_with_an_incomplete_stream_is_reported() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.server.send_stream(id).write(b"partial").unwrap();
    p.server.go_away(p.now);
    p.drive();
    p.agent.handle_eof(p.now);
    p.collect();
    assert!(p.agent_events.iter().any(|e| matches!(
        e,
        Event::ConnectionLost {
            reason: Error::TransportClosed
        }
    )));
}

/// After a goaway, a transport that ends inside a frame is broken, not drained, even when
/// the frame's header is all that arrived (the decoder holds it, the input is empty): the
/// cut frame may have been a reset of a stream that would otherwise read as complete.
#[test]
fn eof_after_goaway_inside_a_frame_is_reported_even_after_its_whole_header() {
    for arrived in [HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 1] {
        let mut p = Pair::ready();
        let id = p.open_accepted();
        p.agent.send_stream(id).finish().unwrap();
        p.server.send_stream(id).write(b"body").unwrap();
        p.server.send_stream(id).finish().unwrap();
        p.server.go_away(p.now);
        p.drive();
        let cut = raw(Frame::Data {
            id,
            fin: false,
            payload: Bytes::from_static(b"xy"),
        });
        assert_eq!(p.agent.handle_input(p.now, &cut[..arrived]), arrived);
        p.agent.handle_eof(p.now);
        p.collect();
        assert!(
            p.agent_events.iter().any(|e| matches!(
                e,
                Event::ConnectionLost {
                    reason: Error::TransportClosed
                }
            )),
            "{arrived} bytes of a frame, then the end, taken for a drained peer"
        );
    }
}

/// A host name built by hand goes out in its normal form, and one no OPEN can carry is
/// refused locally: neither costs the tunnel or its other streams (the server ends the
/// tunnel on a malformed OPEN), nor is a long name cut into another host.
#[test]
fn open_takes_host_names_in_their_normal_form_and_refuses_the_rest() {
    let mut p = Pair::ready();
    let innocent = p.open_accepted();
    let name = |n: &str| Target::new(Host::Name(n.to_owned()), 443);
    let id = p.agent.open(p.now, name("Example.COM")).unwrap();
    let long = format!("{}.example", "a".repeat(250));
    for bad in [long.as_str(), "", "spa ce", "a/b"] {
        assert_eq!(
            p.agent.open(p.now, name(bad)),
            Err(Error::InvalidTarget(bad.to_owned()))
        );
    }
    p.drive();
    let asked = p.server_events.iter().find_map(|e| match e {
        Event::Stream(StreamEvent::OpenRequested { id: i, target }) if *i == id => {
            Some(target.host.to_string())
        }
        _ => None,
    });
    assert_eq!(asked.as_deref(), Some("example.com"));
    let lost = |events: &[Event]| {
        events
            .iter()
            .any(|e| matches!(e, Event::ConnectionLost { .. }))
    };
    assert!(!lost(&p.agent_events) && !lost(&p.server_events));
    p.server.send_stream(innocent).write(b"still here").unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.agent, innocent).0, b"still here");
}

/// Credentials no AUTH frame can carry (a method name out of bounds, a frame longer than
/// any server is sure to take) end the agent's connection at once, saying why, instead of
/// reaching the server cut short, malformed or too long.
#[test]
fn an_agent_with_an_impossible_method_name_fails_at_once() {
    let long = "m".repeat(65);
    for method in ["", "two words", long.as_str()] {
        let creds = Credentials {
            method: method.to_owned(),
            payload: Bytes::new(),
        };
        let mut agent = Connection::agent(cfg(false), creds, Instant::now());
        let lost = std::iter::from_fn(|| agent.poll()).find_map(|e| match e {
            Event::ConnectionLost { reason } => Some(reason),
            _ => None,
        });
        assert_eq!(lost, Some(Error::InvalidAuthMethod(method.to_owned())));
        let mut out = Vec::new();
        agent.poll_transmit(Instant::now(), &mut out);
        assert!(out.is_empty(), "{method:?}: sent {} bytes", out.len());
    }
    // A payload whose AUTH frame fits 16 KiB goes; one byte more does not.
    let method = "aws-sts-v1";
    for (extra, fits) in [(0, true), (1, false)] {
        let len = 16 * 1024 - 1 - method.len() + extra;
        let creds = Credentials {
            method: method.to_owned(),
            payload: Bytes::from(vec![b'x'; len]),
        };
        let mut agent = Connection::agent(cfg(false), creds, Instant::now());
        let lost = std::iter::from_fn(|| agent.poll()).find_map(|e| match e {
            Event::ConnectionLost { reason } => Some(reason),
            _ => None,
        });
        let want = (!fits).then_some(Error::CredentialsTooLarge(16 * 1024 + 1));
        assert_eq!(lost, want, "payload of {len} bytes");
    }
}

/// A ready pair whose server lets the agent have one stream at a time.
fn one_stream_pair() -> Pair {
    let scfg = Arc::new(Config {
        require_auth: false,
        limits: Limits {
            max_streams: 1,
            ..Limits::default()
        },
        ..Config::default()
    });
    let mut p = Pair::new(cfg(false), scfg);
    p.drive();
    p
}

/// Ends stream `id` both ways, the server's side first: the agent reads the end and
/// finishes its own side (its FIN not yet transmitted). The server's application does
/// not read the agent's end.
fn end_from_the_server_side(p: &mut Pair, id: StreamId) {
    p.server.send_stream(id).finish().unwrap();
    p.drive();
    assert_eq!(p.agent.recv_stream(id).read(1024), Ok(None));
    p.agent.send_stream(id).finish().unwrap();
}

#[test]
fn server_refuses_streams_beyond_its_limit() {
    let mut p = one_stream_pair();
    assert_eq!(p.agent.stream_room(), 1);
    let a = p.open_accepted();
    assert_eq!(p.agent.stream_room(), 0);
    assert_eq!(p.agent.open(p.now, target()), Err(Error::TooManyStreams));
    // Room comes back as the stream ends.
    p.agent.send_stream(a).reset(ErrorCode::CANCEL).unwrap();
    assert_eq!(p.agent.stream_room(), 1);
    p.drive();
    let _b = p.open_accepted();
}

/// The agent forgets a stream once its FIN has gone both ways and may open the next one in
/// the same batch as its FIN, before the server's application has read that FIN: the
/// server must not count the finished stream against the limit.
#[test]
fn an_open_right_behind_the_fin_that_ended_a_stream_is_not_refused() {
    let mut p = one_stream_pair();
    let a = p.open_accepted();
    end_from_the_server_side(&mut p, a);
    let mut out = Vec::new();
    p.agent.poll_transmit(p.now, &mut out);
    assert_eq!(
        p.agent.stream_room(),
        1,
        "the agent still counts the ended stream"
    );
    let b = p.agent.open(p.now, target()).unwrap();
    p.agent.poll_transmit(p.now, &mut out);
    // The server takes the FIN and the OPEN together; its application has not read a's end.
    assert_eq!(p.server.handle_input(p.now, &out), out.len());
    p.drive();
    let requested = p
        .server_events
        .iter()
        .any(|e| matches!(e, Event::Stream(StreamEvent::OpenRequested { id, .. }) if *id == b));
    assert!(requested, "the open was refused: {:?}", p.agent_events);
    // A further open is refused while b is alive: the limit still holds.
    p.server.accept_open(b).unwrap();
    p.drive();
    assert_eq!(p.server.recv_stream(a).read(1024), Ok(None));
    assert_eq!(p.agent.open(p.now, target()), Err(Error::TooManyStreams));
}

/// Streams that ended both ways but whose end the server's application never reads do not
/// count against `max_streams`, but no more than `max_streams` of them are let in.
#[test]
fn streams_the_server_application_never_finishes_are_capped() {
    let mut p = one_stream_pair();
    for _ in 0..2 {
        let id = p.open_accepted();
        end_from_the_server_side(&mut p, id);
        p.drive();
    }
    let third = p.agent.open(p.now, target()).unwrap();
    p.drive();
    let refused = p.agent_events.iter().any(|e| {
        matches!(e, Event::Stream(StreamEvent::Refused { id, refusal })
            if *id == third && refusal.reason == RefusalReason::TooManyStreams)
    });
    assert!(refused, "a third stream was let in: {:?}", p.agent_events);
}

fn expect_violation(p: &mut Pair, code: ErrorCode) {
    p.collect();
    let lost = p.server_events.iter().find_map(|e| match e {
        Event::ConnectionLost { reason } => Some(reason.clone()),
        _ => None,
    });
    match lost {
        Some(r) => assert_eq!(r.code(), code, "{r}"),
        None => panic!("no connection loss"),
    }
    // The goaway goes out, then the connection is drained.
    let mut out = Vec::new();
    p.server.poll_transmit(p.now, &mut out);
    assert!(out.len() >= HEADER_LEN);
    assert!(p.server.is_drained());
}

fn raw(frame: Frame) -> Vec<u8> {
    let mut v = Vec::new();
    frame.encode(&mut v);
    v
}

#[test]
fn frames_before_hello_are_a_protocol_error() {
    let now = Instant::now();
    let mut server = Connection::server(cfg(false), now);
    let mut p = Pair::new(cfg(false), cfg(false));
    std::mem::swap(&mut p.server, &mut server);
    p.server.handle_input(
        now,
        &raw(Frame::Ping {
            ack: false,
            opaque: 1,
        }),
    );
    expect_violation(&mut p, ErrorCode::PROTOCOL);
}

#[test]
fn stream_frames_before_ready_are_a_protocol_error() {
    let mut p = Pair::new(cfg(true), cfg(true));
    p.drive(); // Server waits for the application's auth answer.
    p.server.handle_input(
        p.now,
        &raw(Frame::Open {
            id: StreamId(1),
            target: target(),
        }),
    );
    expect_violation(&mut p, ErrorCode::PROTOCOL);
}

#[test]
fn data_beyond_the_window_is_a_flow_control_error() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    let too_much = Bytes::from(vec![0u8; Limits::default().stream_window as usize + 1]);
    // Split into legal frame sizes; the sum breaks the stream window.
    for c in too_much.chunks(60_000) {
        p.server.handle_input(
            p.now,
            &raw(Frame::Data {
                id,
                fin: false,
                payload: Bytes::copy_from_slice(c),
            }),
        );
    }
    expect_violation(&mut p, ErrorCode::FLOW_CONTROL);
}

#[test]
fn data_on_a_never_opened_stream_is_a_protocol_error() {
    let mut p = Pair::ready();
    p.server.handle_input(
        p.now,
        &raw(Frame::Data {
            id: StreamId(99),
            fin: false,
            payload: Bytes::from_static(b"x"),
        }),
    );
    expect_violation(&mut p, ErrorCode::PROTOCOL);
}

#[test]
fn duplicate_open_is_a_protocol_error() {
    let mut p = Pair::ready();
    let _ = p.open_accepted();
    p.server.handle_input(
        p.now,
        &raw(Frame::Open {
            id: StreamId(1),
            target: target(),
        }),
    );
    expect_violation(&mut p, ErrorCode::PROTOCOL);
}

/// The last id, `u32::MAX`, opens once: a second OPEN for it is a duplicate like any other
/// (it was taken as new, replacing the stream and escaping the stream limit).
#[test]
fn the_last_stream_id_cannot_be_opened_twice() {
    let mut p = Pair::ready();
    let last = StreamId(u32::MAX);
    let open = raw(Frame::Open {
        id: last,
        target: target(),
    });
    p.server.handle_input(p.now, &open);
    p.collect();
    assert!(p
        .server_events
        .iter()
        .any(|e| matches!(e, Event::Stream(StreamEvent::OpenRequested { id, .. }) if *id == last)));
    assert!(p.server.is_ready());
    p.server.handle_input(p.now, &open);
    expect_violation(&mut p, ErrorCode::PROTOCOL);
}

#[test]
fn data_after_fin_is_a_stream_closed_error() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.agent.send_stream(id).finish().unwrap();
    p.drive();
    p.server.handle_input(
        p.now,
        &raw(Frame::Data {
            id,
            fin: false,
            payload: Bytes::from_static(b"x"),
        }),
    );
    expect_violation(&mut p, ErrorCode::STREAM_CLOSED);
}

/// DATA after the peer's FIN is refused on a stream this side has let go of with
/// `reset_after_sent` too (its bytes are dropped, not its checks).
#[test]
fn data_after_fin_on_a_stream_let_go_is_a_stream_closed_error() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    p.server.send_stream(id).write(b"tail").unwrap();
    p.server
        .send_stream(id)
        .reset_after_sent(ErrorCode::CANCEL)
        .unwrap();
    for fin in [true, false] {
        p.server.handle_input(
            p.now,
            &raw(Frame::Data {
                id,
                fin,
                payload: Bytes::from_static(b"x"),
            }),
        );
    }
    expect_violation(&mut p, ErrorCode::STREAM_CLOSED);
}

/// A read of 0 bytes takes nothing and says `Blocked` only when nothing waits, so a
/// reader told to wait for `Readable` gets one.
#[test]
fn a_read_of_nothing_is_blocked_only_when_nothing_waits() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    assert_eq!(p.agent.recv_stream(id).read(0), Err(Error::Blocked));
    p.server.send_stream(id).write(b"hello").unwrap();
    p.drive();
    assert_eq!(p.agent.recv_stream(id).read(0), Ok(Some(Bytes::new())));
    assert_eq!(read_all(&mut p.agent, id), (b"hello".to_vec(), false));
    // Told Blocked by a read of nothing, then bytes arrive: `Readable` follows.
    assert_eq!(p.agent.recv_stream(id).read(0), Err(Error::Blocked));
    p.agent_events.clear();
    p.server.send_stream(id).write(b"more").unwrap();
    p.server.send_stream(id).finish().unwrap();
    p.drive();
    assert!(
        p.agent_events
            .iter()
            .any(|e| matches!(e, Event::Stream(StreamEvent::Readable { id: r }) if *r == id)),
        "{:?}",
        p.agent_events
    );
    assert_eq!(read_all(&mut p.agent, id), (b"more".to_vec(), true));
}

/// A server stream not yet accepted has no room to write, as its write says.
#[test]
fn a_server_stream_not_yet_accepted_promises_no_room() {
    let mut p = Pair::ready();
    let id = p.agent.open(p.now, target()).unwrap();
    p.drive();
    assert_eq!(p.server.send_stream(id).writable(), Err(Error::NotOpen(id)));
    assert_eq!(
        p.server.send_stream(id).write(b"x"),
        Err(Error::NotOpen(id))
    );
    p.server.accept_open(id).unwrap();
    assert!(p.server.send_stream(id).writable().unwrap() > 0);
}

#[test]
fn window_overflow_is_a_flow_control_error() {
    let mut p = Pair::ready();
    p.server.handle_input(
        p.now,
        &raw(Frame::WindowUpdate {
            id: StreamId::CONNECTION,
            increment: u32::MAX,
        }),
    );
    expect_violation(&mut p, ErrorCode::FLOW_CONTROL);
}

#[test]
fn oversize_frame_is_a_frame_size_error() {
    let mut p = Pair::ready();
    let mut bytes = Vec::new();
    frame::Header {
        ty: FrameType::DATA,
        flags: frame::Flags::default(),
        stream: StreamId(1),
        len: 10 << 20,
    }
    .encode(&mut bytes);
    p.server.handle_input(p.now, &bytes);
    expect_violation(&mut p, ErrorCode::FRAME_SIZE);
}

/// `n` PING frames, one after another.
fn ping_flood(n: u64) -> Vec<u8> {
    let mut flood = Vec::new();
    for i in 0..n {
        Frame::Ping {
            ack: false,
            opaque: i,
        }
        .encode(&mut flood);
    }
    flood
}

#[test]
fn ping_flood_is_backpressured_not_buffered_without_bound() {
    let mut p = Pair::ready();
    let flood = ping_flood(100_000);
    let n = p.server.handle_input(p.now, &flood);
    assert!(n < flood.len(), "stops consuming while answers pile up");
    let mut out = Vec::new();
    p.server.poll_transmit(p.now, &mut out);
    assert!(out.len() <= Config::default().max_control_backlog + 64 * 1024);
    let m = p.server.handle_input(p.now, &flood[n..]);
    assert!(m > 0, "consumes again once the backlog is sent");
}

/// A peer that floods pings, never reads the answers and then falls silent is timed out:
/// the input the full backlog refused, offered again on every turn as a driver does, is
/// no word from the peer. Before, each offer counted as one and the idle timeout never
/// came, through either input call.
#[test]
fn input_the_backlog_refuses_does_not_keep_a_silent_peer_alive() {
    let flood = ping_flood(100_000);
    for shared in [false, true] {
        let mut p = Pair::ready();
        let mut left = BytesMut::from(&flood[..]);
        let n = if shared {
            p.server.handle_input_bytes(p.now, &mut left)
        } else {
            let n = p.server.handle_input(p.now, &left);
            left.advance(n);
            n
        };
        assert!(n > 0 && !left.is_empty(), "the backlog fills");
        let start = p.now;
        let idle = Config::default().idle_timeout;
        while p.now < start + idle * 3 {
            let Some(at) = p.server.poll_timeout() else {
                break;
            };
            p.now = at.max(p.now);
            let taken = if shared {
                p.server.handle_input_bytes(p.now, &mut left)
            } else {
                p.server.handle_input(p.now, &left)
            };
            assert_eq!(taken, 0, "nothing is sent, so nothing more is taken");
            p.server.handle_timeout(p.now);
            if !p.server.is_ready() {
                break;
            }
        }
        p.collect();
        assert!(
            p.server_events.iter().any(|e| matches!(
                e,
                Event::ConnectionLost {
                    reason: Error::IdleTimeout(_)
                }
            )),
            "a peer silent for {:?} was never timed out (shared input: {shared})",
            p.now - start
        );
    }
}

#[test]
fn eof_before_drain_is_reported() {
    let mut p = Pair::ready();
    p.agent.handle_eof(p.now);
    p.collect();
    assert!(p.agent_events.contains(&Event::ConnectionLost {
        reason: Error::TransportClosed
    }));
}

#[test]
fn zero_control_backlog_and_transmit_batch_still_make_progress() {
    let zero = Arc::new(Config {
        require_auth: false,
        max_control_backlog: 0,
        transmit_batch: 0,
        ..Config::default()
    });
    let now = Instant::now();
    let mut agent = Connection::agent(zero.clone(), Credentials::none(), now);
    let mut server = Connection::server(zero, now);
    // Input a side could not take yet waits here, as a transport's buffer would hold it.
    let (mut to_server, mut to_agent) = (Vec::new(), Vec::new());
    let mut id = None;
    let mut received = Vec::new();
    let mut finished = false;
    for _ in 0..100_000 {
        agent.poll_transmit(now, &mut to_server);
        server.poll_transmit(now, &mut to_agent);
        let n = server.handle_input(now, &to_server);
        to_server.drain(..n);
        let n = agent.handle_input(now, &to_agent);
        to_agent.drain(..n);
        while let Some(e) = server.poll() {
            if let Event::Stream(StreamEvent::OpenRequested { id: i, .. }) = e {
                server.accept_open(i).unwrap();
            }
        }
        while agent.poll().is_some() {}
        if agent.is_ready() && id.is_none() {
            let i = agent.open(now, target()).unwrap();
            assert_eq!(agent.send_stream(i).write(b"progress").unwrap(), 8);
            agent.send_stream(i).finish().unwrap();
            id = Some(i);
        }
        if let Some(i) = id {
            if server.stream_info(i).is_some() {
                let (bytes, fin) = read_all(&mut server, i);
                received.extend_from_slice(&bytes);
                finished |= fin;
            }
        }
        if finished {
            break;
        }
    }
    assert_eq!((received.as_slice(), finished), (&b"progress"[..], true));
}

// ----- the zero-copy data path -----

/// A pattern that differs at every offset of a stream, so misordered bytes show.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Whether `chunk` lies inside `owner`'s memory (shared, not a copy).
fn points_into(chunk: &[u8], owner: &[u8]) -> bool {
    let (start, end) = (
        owner.as_ptr() as usize,
        owner.as_ptr() as usize + owner.len(),
    );
    let c = chunk.as_ptr() as usize;
    c >= start && c + chunk.len() <= end
}

/// Decodes every frame in `wire`, which must end on a frame boundary.
fn decode_all(wire: &[u8]) -> Vec<Frame> {
    let mut buf = bytes::BytesMut::from(wire);
    let mut d = crate::frame::Decoder::new(u32::MAX);
    let mut frames = Vec::new();
    while let Some(f) = d.decode(&mut buf).unwrap() {
        frames.push(f);
    }
    assert!(buf.is_empty(), "a partial frame at the end");
    frames
}

#[test]
fn write_bytes_takes_the_window_and_shares_the_bytes_it_sends() {
    let mut p = Pair::ready_with(Config {
        send_buffer: usize::MAX,
        ..Config::default()
    });
    let id = p.open_accepted();
    let window = Limits::default().stream_window as usize;
    let data = Bytes::from(pattern(window * 2 + 100, 1));
    let n = p.agent.send_stream(id).write_bytes(data.clone()).unwrap();
    assert_eq!(n, window, "write_bytes takes exactly the credit");
    assert_eq!(
        p.agent.send_stream(id).write_bytes(data.slice(n..)),
        Err(Error::Blocked)
    );
    assert_eq!(p.agent.send_stream(id).write_bytes(Bytes::new()), Ok(0));
    let mut chunks = Vec::new();
    let total = p.agent.poll_transmit_chunks(p.now, &mut chunks);
    assert_eq!(total, chunks.iter().map(Bytes::len).sum::<usize>());
    let payload: usize = chunks
        .iter()
        .filter(|c| c.len() > HEADER_LEN)
        .map(|c| {
            assert!(points_into(c, &data), "a payload chunk was copied");
            c.len()
        })
        .sum();
    assert!(payload > 0);
    // Deliver through the zero-copy input and finish the transfer.
    let mut wire = bytes::BytesMut::new();
    for c in &chunks {
        wire.extend_from_slice(c);
    }
    assert_eq!(p.server.handle_input_bytes(p.now, &mut wire), total);
    assert!(wire.is_empty());
    let mut got = Vec::new();
    let mut offset = n;
    let mut fin = false;
    for _ in 0..1000 {
        p.drive();
        let (bytes, f) = read_all(&mut p.server, id);
        got.extend_from_slice(&bytes);
        fin |= f;
        if fin {
            break;
        }
        if offset < data.len() {
            match p.agent.send_stream(id).write_bytes(data.slice(offset..)) {
                Ok(k) => offset += k,
                Err(Error::Blocked) => {}
                Err(e) => panic!("{e}"),
            }
            if offset == data.len() {
                p.agent.send_stream(id).finish().unwrap();
            }
        }
    }
    assert!(fin, "the stream did not end");
    assert!(
        got == data[..],
        "received bytes differ from the written ones"
    );
}

#[test]
fn chunks_split_across_frames_mix_with_copied_writes_and_fin_rides_the_last() {
    let small = Arc::new(Config {
        require_auth: false,
        data_frame_len: 4096,
        ..Config::default()
    });
    let mut p = Pair::new(small.clone(), small);
    p.drive();
    let id = p.open_accepted();
    let a = Bytes::from(pattern(3000, 2));
    let b = pattern(100, 3);
    let c = Bytes::from(pattern(9000, 4));
    let d = Bytes::from(pattern(10, 5));
    let mut tx = p.agent.send_stream(id);
    assert_eq!(tx.write_bytes(a.clone()), Ok(3000));
    assert_eq!(tx.write(&b), Ok(100));
    assert_eq!(tx.write_bytes(c.clone()), Ok(9000));
    assert_eq!(tx.write_bytes(d.clone()), Ok(10));
    tx.finish().unwrap();
    let mut chunks = Vec::new();
    p.agent.poll_transmit_chunks(p.now, &mut chunks);
    let wire: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let frames = decode_all(&wire);
    let mut payload = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let Frame::Data {
            id: fid,
            fin,
            payload: data,
        } = f
        else {
            panic!("unexpected frame {f:?}");
        };
        assert_eq!(*fid, id);
        assert!(data.len() <= 4096, "frame of {} bytes", data.len());
        assert_eq!(*fin, i == frames.len() - 1, "FIN only on the last frame");
        payload.extend_from_slice(data);
    }
    let expected: Vec<u8> = [&a[..], &b[..], &c[..], &d[..]].concat();
    assert_eq!(payload, expected);
    assert_eq!(frames.len(), expected.len().div_ceil(4096));
    // The large chunks go out as slices of the application's bytes.
    assert!(chunks
        .iter()
        .any(|x| x.len() > HEADER_LEN && points_into(x, &c)));
    assert!(chunks
        .iter()
        .any(|x| x.len() > HEADER_LEN && points_into(x, &a)));
    assert!(
        p.agent.stream_info(id).is_some_and(|i| i.fin_sent) || p.agent.stream_info(id).is_none()
    );
}

#[test]
fn handle_input_bytes_keeps_partial_frames_and_gives_back_what_the_backlog_refuses() {
    let mut p = Pair::ready();
    let id = p.open_accepted();
    let data = pattern(100_000, 6);
    p.agent.send_stream(id).write(&data).unwrap();
    p.agent.send_stream(id).finish().unwrap();
    let mut wire = Vec::new();
    while p.agent.poll_transmit(p.now, &mut wire) > 0 {}
    // Odd cuts put frame boundaries and headers across inputs.
    let mut offered = 0;
    for cut in [5, 7, 13, 4000, 16_400, 16_401, 50_000] {
        let cut = cut.min(wire.len());
        let mut piece = bytes::BytesMut::from(&wire[offered..cut]);
        let len = piece.len();
        assert_eq!(p.server.handle_input_bytes(p.now, &mut piece), len);
        offered = cut;
    }
    let mut rest = bytes::BytesMut::from(&wire[offered..]);
    let len = rest.len();
    assert_eq!(p.server.handle_input_bytes(p.now, &mut rest), len);
    p.collect();
    let (got, fin) = read_all(&mut p.server, id);
    assert!(fin && got == data);

    // A ping flood fills the control backlog: the unconsumed rest stays with the caller.
    let mut flood = Vec::new();
    for i in 0..100_000u64 {
        Frame::Ping {
            ack: false,
            opaque: i,
        }
        .encode(&mut flood);
    }
    let mut input = bytes::BytesMut::from(&flood[..]);
    let n = p.server.handle_input_bytes(p.now, &mut input);
    assert!(n < flood.len(), "stops consuming while answers pile up");
    assert_eq!(
        input.len(),
        flood.len() - n,
        "nothing consumed is left, nothing left is lost"
    );
    assert_eq!(&input[..], &flood[n..]);
    let mut out = Vec::new();
    p.server.poll_transmit_chunks(p.now, &mut out);
    let m = p.server.handle_input_bytes(p.now, &mut input);
    assert!(m > 0, "consumes again once the backlog is sent");
}

/// One step of the equivalence script, applied alike to both pairs.
#[derive(Debug, Clone)]
enum Op {
    Write {
        stream: usize,
        len: usize,
    },
    Finish {
        stream: usize,
    },
    Read {
        stream: usize,
        max: usize,
    },
    /// Transmit both ways and deliver in two pieces cut at this fraction (per mille).
    Round {
        cut: u16,
    },
}

/// Runs `ops` on a pair driven through the copying calls (`zero_copy == false`) or the
/// zero-copy ones, and returns everything each side transmitted plus what was read.
fn run_script(cfg: &Arc<Config>, ops: &[Op], zero_copy: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut p = Pair::new(cfg.clone(), cfg.clone());
    p.drive();
    let ids = [p.open_accepted(), p.open_accepted()];
    let (mut agent_wire, mut server_wire, mut read) = (Vec::new(), Vec::new(), Vec::new());
    let mut written = [0usize; 2];
    let log = |r: Result<usize, Error>| format!("{r:?}").into_bytes();
    for op in ops {
        match *op {
            Op::Write { stream, len } => {
                let data = pattern(len, written[stream] as u8);
                let r = if zero_copy {
                    p.agent
                        .send_stream(ids[stream])
                        .write_bytes(Bytes::from(data))
                } else {
                    p.agent.send_stream(ids[stream]).write(&data)
                };
                written[stream] += *r.as_ref().unwrap_or(&0);
                read.extend(log(r));
            }
            Op::Finish { stream } => {
                let r = p.agent.send_stream(ids[stream]).finish().map(|()| 0);
                read.extend(log(r));
            }
            Op::Read { stream, max } => match p.server.recv_stream(ids[stream]).read(max) {
                Ok(Some(b)) => read.extend_from_slice(&b),
                other => read.extend(format!("{other:?}").into_bytes()),
            },
            Op::Round { cut } => {
                for to_server in [true, false] {
                    let (from, to) = if to_server {
                        (&mut p.agent, &mut p.server)
                    } else {
                        (&mut p.server, &mut p.agent)
                    };
                    let mut wire = Vec::new();
                    if zero_copy {
                        let mut chunks = Vec::new();
                        let n = from.poll_transmit_chunks(p.now, &mut chunks);
                        for c in &chunks {
                            wire.extend_from_slice(c);
                        }
                        assert_eq!(n, wire.len());
                    } else {
                        from.poll_transmit(p.now, &mut wire);
                    }
                    let at = wire.len() * usize::from(cut) / 1000;
                    for piece in [&wire[..at], &wire[at..]] {
                        let n = if zero_copy {
                            let mut b = bytes::BytesMut::from(piece);
                            to.handle_input_bytes(p.now, &mut b)
                        } else {
                            to.handle_input(p.now, piece)
                        };
                        assert_eq!(n, piece.len(), "the default backlog takes it all");
                    }
                    if to_server {
                        agent_wire.extend_from_slice(&wire);
                    } else {
                        server_wire.extend_from_slice(&wire);
                    }
                }
                p.collect();
            }
        }
    }
    (agent_wire, server_wire, read)
}

fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..2usize, 0..70_000usize).prop_map(|(stream, len)| Op::Write { stream, len }),
        1 => (0..2usize).prop_map(|stream| Op::Finish { stream }),
        3 => (0..2usize, 1..100_000usize).prop_map(|(stream, max)| Op::Read { stream, max }),
        4 => (0..=1000u16).prop_map(|cut| Op::Round { cut }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Both data paths emit the same bytes, take the same writes and deliver the same
    /// reads for the same history, whatever the frame size and batch.
    #[test]
    fn zero_copy_path_is_byte_identical_to_the_copying_path(
        frame in proptest::sample::select(vec![1000u32, 4096, 16_384]),
        batch in proptest::sample::select(vec![1usize, 5000, 65_536, 256 * 1024]),
        ops in proptest::collection::vec(arb_op(), 1..40),
    ) {
        let cfg = Arc::new(Config {
            require_auth: false,
            data_frame_len: frame,
            transmit_batch: batch,
            ..Config::default()
        });
        let copying = run_script(&cfg, &ops, false);
        let zero_copy = run_script(&cfg, &ops, true);
        proptest::prop_assert!(copying.0 == zero_copy.0, "agent transmissions differ");
        proptest::prop_assert!(copying.1 == zero_copy.1, "server transmissions differ");
        proptest::prop_assert!(copying.2 == zero_copy.2, "writes or reads differ");
    }
}

/// Moves `n` bytes on stream `id` from the agent to the server, the server reading at
/// once, and returns the server's receive window for it afterwards.
fn push_and_read(p: &mut Pair, id: StreamId, n: usize) -> u32 {
    let mut left = n;
    while left > 0 {
        let chunk = vec![5u8; left.min(500)];
        if let Ok(k) = p.agent.send_stream(id).write(&chunk) {
            left -= k;
        }
        p.drive();
        read_all(&mut p.server, id);
        p.drive();
    }
    p.server.stream_info(id).unwrap().recv_window
}

/// A ready pair whose streams start with 1000-byte windows that may grow to `max`, all
/// together by at most `budget`, and a stream open on it.
fn small_windows(max: u32, budget: u64) -> (Pair, StreamId) {
    let mut p = Pair::ready_with(Config {
        limits: Limits {
            stream_window: 1000,
            ..Limits::default()
        },
        max_stream_window: max,
        window_growth_budget: budget,
        ..Config::default()
    });
    let id = p.open_accepted();
    (p, id)
}

/// Reads up to `n` bytes of stream `id` at the server, as many reads as that takes.
fn read_up_to(p: &mut Pair, id: StreamId, n: usize) -> usize {
    let mut took = 0;
    while took < n {
        match p.server.recv_stream(id).read(n - took) {
            Ok(Some(b)) => took += b.len(),
            _ => break,
        }
    }
    took
}

#[test]
fn windows_grow_for_readers_that_keep_up_within_the_budget_given_back_as_streams_end() {
    // One stream's growth from 1000 to 4000, no more.
    let (mut p, a) = small_windows(4000, 3000);
    let b = p.open_accepted();
    // A reader that takes everything at once, on a clock that does not move (and no
    // round trip measured yet: 100 ms is assumed), so everything it took counts: the
    // window doubles up to the largest.
    assert_eq!(push_and_read(&mut p, a, 20_000), 4000);
    // The budget is spent: the other stream keeps its initial window.
    assert_eq!(push_and_read(&mut p, b, 20_000), 1000);
    // Once the first stream has ended both ways, its growth is given back.
    p.agent.send_stream(a).finish().unwrap();
    p.drive();
    assert!(read_all(&mut p.server, a).1);
    p.server.send_stream(a).finish().unwrap();
    p.drive();
    assert!(read_all(&mut p.agent, a).1);
    p.drive();
    assert_eq!(p.server.stream_info(a), None);
    assert_eq!(push_and_read(&mut p, b, 20_000), 4000);
}

#[test]
fn a_window_does_not_grow_for_a_reader_slower_than_its_round_trips() {
    let (mut p, id) = small_windows(4000, Config::default().window_growth_budget);
    let mut moved = 0;
    while moved < 20_000 {
        let n = p.agent.send_stream(id).write(&[5u8; 1000]).unwrap_or(0);
        moved += n;
        p.drive();
        // Half a window every 5 ms: 800 bytes in 8 round trips (the least counted,
        // 1 ms, each), under the 1000-byte window.
        p.advance(Duration::from_millis(5));
        p.drive();
        let _ = p.server.recv_stream(id).read(500);
        p.drive();
        assert_eq!(p.server.stream_info(id).unwrap().recv_window, 1000);
    }
}

#[test]
fn a_reader_catching_up_after_stalls_keeps_its_window_and_a_slowing_one_gives_growth_back() {
    let (mut p, id) = small_windows(8000, Config::default().window_growth_budget);
    // Stalls: the window fills, the reader waits a second, then takes everything at once
    // (two updates, the second at once): a window a second, where the initial one would
    // carry that in a few round trips.
    for _ in 0..5 {
        while p.agent.send_stream(id).write(&[5u8; 300]).is_ok() {}
        p.drive();
        p.advance(Duration::from_secs(1));
        p.drive();
        // Half a window per read, so two updates, the second at once.
        let mut reads = 0;
        while let Ok(Some(_)) = p.server.recv_stream(id).read(500) {
            reads += 1;
        }
        assert!(reads >= 2, "{reads}");
        p.drive();
        assert_eq!(p.server.stream_info(id).unwrap().recv_window, 1000);
    }
    // A reader that keeps up, on a clock that does not move, widens the window...
    assert_eq!(push_and_read(&mut p, id, 200_000), 8000);
    assert_eq!(p.server.stats().windows_grown, 7000);
    // ...and one that then takes half a window per second narrows it again, update by
    // update, down to the initial window, giving the growth back.
    let mut seen = Vec::new();
    for _ in 0..12 {
        let _ = p.agent.send_stream(id).write(&[5u8; 4000]);
        p.drive();
        p.advance(Duration::from_secs(1));
        p.drive();
        let half = p.server.stream_info(id).unwrap().recv_window as usize / 2;
        read_up_to(&mut p, id, half);
        p.drive();
        seen.push(p.server.stream_info(id).unwrap().recv_window);
    }
    assert!(seen.starts_with(&[4000, 2000, 1000]), "{seen:?}");
    assert_eq!(p.server.stats().windows_grown, 0);
}

#[test]
fn a_reader_taking_bursts_between_pauses_keeps_its_window() {
    let (mut p, id) = small_windows(8000, Config::default().window_growth_budget);
    // The first ping's round trip, 0 on this clock, counts as the least one, 1 ms: the
    // pace is measured over 100 ms.
    p.advance(Duration::from_millis(1));
    p.drive();
    // As a relay writing to a socket does when its client reads a little at a time:
    // eight windows at once, as fast as they come (sixteen updates with no time between
    // them), then a pause. By that pace the window needs at most 920 bytes, below the
    // initial 1000.
    for _ in 0..10 {
        assert_eq!(push_and_read(&mut p, id, 8000), 1000);
        p.advance(Duration::from_millis(200));
        p.drive();
    }
    assert_eq!(p.server.stats().windows_grown, 0);
}

#[test]
fn a_grown_window_stays_for_a_reader_between_growing_and_shrinking_paces() {
    let (mut p, id) = small_windows(8000, Config::default().window_growth_budget);
    // The first ping's round trip, taken on this clock, is 0: the least one counted,
    // 1 ms, stands for it. The window grows while it is below what the reader takes in
    // 8 ms, and halves above four times that.
    p.advance(Duration::from_millis(1));
    p.drive();
    assert_eq!(push_and_read(&mut p, id, 200_000), 8000);
    // Half the window every 8 ms: long enough for the pace measured before to fade.
    for _ in 0..60 {
        let _ = p.agent.send_stream(id).write(&[5u8; 4000]);
        p.drive();
        p.advance(Duration::from_millis(8));
        p.drive();
        read_up_to(&mut p, id, 4000);
        p.drive();
        assert_eq!(p.server.stream_info(id).unwrap().recv_window, 8000);
    }
}
