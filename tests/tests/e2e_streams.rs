//! Many streams in one tunnel, and a stalled stream that must not hold up the others.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use fluidity_tests::e2e::client::{
    connect_via, payload_sha256, read_head_bytewise, seeded_payload, Sha256,
};
use fluidity_tests::e2e::origin::{EchoOrigin, FloodOrigin, HttpOrigin};
use fluidity_tests::e2e::proc::wait_for;
use fluidity_tests::e2e::{curl, watchdog, Tunnel};

const MIB: u64 = 1024 * 1024;

#[test]
fn two_hundred_concurrent_streams_in_one_tunnel_are_byte_exact() {
    const STREAMS: usize = 200;
    const LEN: usize = 64 * 1024;
    let _wd = watchdog("200_concurrent_streams", Duration::from_secs(180));
    let t = Tunnel::start();
    let echo = EchoOrigin::start();
    let proxy = t.proxy();
    let target = echo.addr().to_string();
    // Every stream is open before any sends, so all 200 are in the tunnel at once.
    let all_open = Arc::new(Barrier::new(STREAMS));
    let workers: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (all_open, target) = (all_open.clone(), target.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let conn = connect_via(proxy, &target);
                all_open.wait();
                let (status, sock) = conn.map_err(|e| format!("stream {i}: CONNECT: {e}"))?;
                if status != 200 {
                    return Err(format!("stream {i}: CONNECT answered {status}"));
                }
                let data = seeded_payload(i as u64, LEN);
                let mut w = sock.try_clone().map_err(|e| e.to_string())?;
                let sent = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&sent)?;
                    w.shutdown(Shutdown::Write)
                });
                let mut back = Vec::with_capacity(LEN);
                let mut r = sock;
                r.read_to_end(&mut back)
                    .map_err(|e| format!("stream {i}: read: {e}"))?;
                writer
                    .join()
                    .map_err(|_| format!("stream {i}: writer panicked"))?
                    .map_err(|e| format!("stream {i}: write: {e}"))?;
                if back != data {
                    return Err(format!(
                        "stream {i}: echoed {} bytes differ from the {} sent",
                        back.len(),
                        data.len()
                    ));
                }
                Ok(())
            })
        })
        .collect();
    let errors: Vec<String> = workers
        .into_iter()
        .filter_map(|w| match w.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("a worker panicked".into()),
        })
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {STREAMS} streams failed: {errors:#?}",
        errors.len()
    );
    assert_eq!(echo.connections(), STREAMS);
    assert_eq!(t.server.metric("fluidity_tunnels_total"), 1.0, "one tunnel");
    assert!(t.server.metric("fluidity_streams_total") >= STREAMS as f64);
}

/// Downloads `/bytes/LEN` through CONNECT from Rust, checking every byte, and returns how
/// long the body took.
fn timed_download(t: &Tunnel, origin: &HttpOrigin, len: u64) -> Duration {
    let (status, mut s) = connect_via(t.proxy(), &origin.addr().to_string()).expect("CONNECT");
    assert_eq!(status, 200);
    // A stream held up behind a stalled one fails here instead of hanging.
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let started = Instant::now();
    write!(
        s,
        "GET /bytes/{len} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        origin.addr()
    )
    .expect("request");
    let head = read_head_bytewise(&mut s).expect("response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("reading the body after {got} of {len} bytes: {e}"));
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        got += n as u64;
    }
    let took = started.elapsed();
    assert_eq!(got, len, "body length");
    assert_eq!(sha.hex(), payload_sha256(len), "body bytes");
    took
}

#[test]
fn a_stalled_reader_does_not_slow_another_stream_and_its_memory_stays_bounded() {
    const LEN: u64 = 100 * MIB;
    const ROUNDS: usize = 3;
    let _wd = watchdog("head_of_line", Duration::from_secs(240));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("bulk");
    let flood = FloodOrigin::start();

    // Rounds alternate an unloaded download with one beside a freshly stalled stream, and
    // the best of each kind is compared, so that a burst of other work on the machine
    // cannot favour one kind by chance.
    let mut unloaded = Duration::MAX;
    let mut loaded = Duration::MAX;
    let mut baseline = None;
    let mut stalled = None;
    for _ in 0..ROUNDS {
        drop(stalled.take());
        unloaded = unloaded.min(timed_download(&t, &origin, LEN));
        if baseline.is_none() {
            baseline = Some((
                t.agent.proc.rss_bytes().expect("agent RSS"),
                t.server.proc.rss_bytes().expect("server RSS"),
            ));
        }
        // A stream whose client never reads, from an origin that never stops sending.
        let (status, s) = connect_via(t.proxy(), &flood.addr().to_string()).expect("CONNECT");
        assert_eq!(status, 200);
        let _ = socket2::SockRef::from(&s).set_recv_buffer_size(64 * 1024);
        let before = flood.written();
        wait_for("the flood to start", Duration::from_secs(30), || {
            (flood.written() >= before + MIB).then_some(())
        });
        stalled = Some(s);
        loaded = loaded.min(timed_download(&t, &origin, LEN));
    }
    let (agent_rss, server_rss) = baseline.expect("rounds ran");
    let ratio = loaded.as_secs_f64() / unloaded.as_secs_f64();
    eprintln!(
        "head-of-line: unloaded {unloaded:?}, beside a stalled stream {loaded:?}, ratio {ratio:.2}; \
         the flood origin pushed {:?} bytes into the stalled streams",
        flood.written_per_connection()
    );
    assert!(
        ratio < 2.0,
        "a stream beside a stalled one took {ratio:.2}x its unloaded time \
         ({loaded:?} against {unloaded:?}); a stalled reader must slow only its own stream"
    );

    // The stalled stream's bytes wait in its window and in socket buffers, not in the
    // processes: neither grew by more than a window's worth plus slack, although the
    // origin would have sent gigabytes had anyone read them.
    let agent_growth = t
        .agent
        .proc
        .rss_bytes()
        .expect("agent RSS")
        .saturating_sub(agent_rss);
    let server_growth = t
        .server
        .proc
        .rss_bytes()
        .expect("server RSS")
        .saturating_sub(server_rss);
    let pushed = flood
        .written_per_connection()
        .into_iter()
        .max()
        .unwrap_or(0);
    eprintln!(
        "memory growth: agent {} KiB, server {} KiB",
        agent_growth / 1024,
        server_growth / 1024
    );
    assert!(
        agent_growth < 64 * MIB,
        "the agent grew by {} MiB beside a stalled stream",
        agent_growth / MIB
    );
    assert!(
        server_growth < 64 * MIB,
        "the server grew by {} MiB beside a stalled stream",
        server_growth / MIB
    );
    assert!(
        pushed < 64 * MIB,
        "the flood origin got {} MiB into one stream nobody reads: flow control did not hold",
        pushed / MIB
    );

    // The tunnel still works, with the stalled stream still open.
    let out = curl(["-x", &t.proxy_url(), &origin.url("/hello")]);
    out.assert_ok();
    assert_eq!(out.text(), "hello from bulk\n");
    drop(stalled);
}

#[test]
fn streams_beyond_the_server_limit_get_503_and_free_slots_are_reused() {
    const LIMIT: usize = 16;
    let _wd = watchdog("stream_limit", Duration::from_secs(120));
    let t = Tunnel::with(fluidity_tests::e2e::ServerOptions {
        config: Some(format!("max_streams = {LIMIT}\n")),
        ..Default::default()
    });
    let echo = EchoOrigin::start();
    let target = echo.addr().to_string();
    for round in 0..2 {
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..LIMIT + 4 {
            let (status, s) = connect_via(t.proxy(), &target).expect("CONNECT");
            match status {
                200 => held.push(s),
                503 => refused += 1,
                other => panic!("CONNECT beyond the limit answered {other}"),
            }
        }
        assert_eq!(
            (held.len(), refused),
            (LIMIT, 4),
            "round {round}: {LIMIT} streams open, the rest refused with 503"
        );
        // Every open stream works.
        for (i, s) in held.iter_mut().enumerate() {
            let msg = seeded_payload(i as u64, 1024);
            s.write_all(&msg).expect("write");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).expect("read");
            assert_eq!(back, msg, "stream {i}");
        }
        drop(held);
        // Closed streams give their slots back; wait until the server has let go.
        wait_for("the streams to close", Duration::from_secs(30), || {
            (t.server.metric("fluidity_streams_active") == 0.0).then_some(())
        });
    }
}
