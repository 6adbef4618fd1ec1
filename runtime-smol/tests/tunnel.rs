//! A real tunnel on loopback: TLS 1.3 with generated certificates, the proto connection
//! and the driver, with many concurrent streams echoed by the server.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_io::{Async, Timer};
use fluidity_proto::{Config, Connection, Credentials, OpenRefusal, RefusalReason, Target};
use fluidity_runtime_smol::pki::{generate_ca, issue_client, issue_server, SanEntry};
use fluidity_runtime_smol::relay::{relay, Direction, ReadChunks, RelayError, MAX_READ_CHUNKS};
use fluidity_runtime_smol::tls::{
    client_config, server_config, CaRoots, Identity, PeerCheck, TlsSession,
};
use fluidity_runtime_smol::{accept, connect, start, Tunnel, TunnelEvent, TunnelStream};
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};

const DAY: Duration = Duration::from_secs(86_400);
const LIMIT: Duration = Duration::from_secs(60);

struct Certs {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn certs() -> Certs {
    let ca = generate_ca("test ca", DAY).unwrap();
    let roots = CaRoots::from_pem(ca.cert_pem()).unwrap();
    let names: Vec<SanEntry> = vec!["127.0.0.1".parse().unwrap()];
    let server = issue_server(&ca, &names, "server", DAY).unwrap();
    let client = issue_client(&ca, "agent", &["127.0.0.1".parse().unwrap()], DAY).unwrap();
    Certs {
        server: server_config(
            &Identity::from_certified(&server).unwrap(),
            &roots,
            &PeerCheck::default(),
        )
        .unwrap(),
        client: client_config(
            &Identity::from_certified(&client).unwrap(),
            &roots,
            &PeerCheck::default(),
        )
        .unwrap(),
    }
}

fn proto_config() -> Arc<Config> {
    Arc::new(Config {
        require_auth: false,
        ..Config::default()
    })
}

/// Serves one tunnel: echoes every stream, refuses port 1.
async fn serve_echo(
    ex: Arc<smol::Executor<'static>>,
    listener: Async<TcpListener>,
    cfg: Arc<rustls::ServerConfig>,
) {
    serve_echo_with(ex, listener, cfg, proto_config()).await
}

/// [`serve_echo`] with the server's own proto configuration.
async fn serve_echo_with(
    ex: Arc<smol::Executor<'static>>,
    listener: Async<TcpListener>,
    cfg: Arc<rustls::ServerConfig>,
    proto: Arc<Config>,
) {
    serve_with(ex, listener, cfg, proto, |s| async move {
        let (r, mut w) = futures_lite::io::split(s);
        futures_lite::io::copy(r, &mut w).await.unwrap();
        w.close().await.unwrap();
    })
    .await
}

/// Serves one tunnel: refuses port 1, and gives every other stream to `serve` in a task
/// of its own.
async fn serve_with<F, Fut>(
    ex: Arc<smol::Executor<'static>>,
    listener: Async<TcpListener>,
    cfg: Arc<rustls::ServerConfig>,
    proto: Arc<Config>,
    serve: F,
) where
    F: Fn(TunnelStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sock, _) = listener.accept().await.unwrap();
    let h = accept(
        sock,
        TlsSession::server(cfg).unwrap(),
        &PeerCheck::default(),
        LIMIT,
    )
    .await
    .unwrap();
    let conn = Connection::server(proto, std::time::Instant::now());
    let (tunnel, events, driver) = start(h.sock, h.tls, conn).unwrap();
    ex.spawn(driver).detach();
    while let Ok(ev) = events.recv().await {
        if let TunnelEvent::OpenRequested { id, target } = ev {
            if target.port == 1 {
                tunnel
                    .refuse_open(
                        id,
                        OpenRefusal::new(RefusalReason::ConnectionRefused, "port 1"),
                    )
                    .unwrap();
                continue;
            }
            ex.spawn(serve(tunnel.accept_open(id).unwrap())).detach();
        }
    }
}

async fn agent(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    ex: &smol::Executor<'static>,
) -> Tunnel {
    let h = connect(
        addr,
        TlsSession::client(cfg, "127.0.0.1").unwrap(),
        &PeerCheck::default(),
        LIMIT,
    )
    .await
    .unwrap();
    assert_eq!(h.established.channel_binding.len(), 32);
    let conn = Connection::agent(
        proto_config(),
        Credentials::none(),
        std::time::Instant::now(),
    );
    let (tunnel, _events, driver) = start(h.sock, h.tls, conn).unwrap();
    ex.spawn(driver).detach();
    tunnel.ready().await.unwrap();
    tunnel
}

/// A listener on a free loopback port, and its address.
fn listen() -> (Async<TcpListener>, SocketAddr) {
    let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).unwrap();
    let addr = listener.get_ref().local_addr().unwrap();
    (listener, addr)
}

/// `len` bytes that never repeat at any alignment a buffer could have (xorshift), so that
/// bytes delivered twice or from a reused buffer cannot look right by chance.
fn payload(seed: usize, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` to the stream and closes it while reading the stream to its end;
/// returns what was read.
async fn exchange(s: TunnelStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = futures_lite::io::split(s);
    let writer = async move {
        w.write_all(data).await.unwrap();
        w.close().await.unwrap();
    };
    let reader = async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    futures_lite::future::zip(writer, reader).await.1
}

fn run<T: Send + 'static>(f: impl FnOnce(Arc<smol::Executor<'static>>) -> smol::Task<T>) -> T {
    let ex = Arc::new(smol::Executor::new());
    let task = f(ex.clone());
    let timeout = async {
        Timer::after(Duration::from_secs(120)).await;
        panic!("test timed out");
    };
    std::thread::scope(|s| {
        let ex2 = ex.clone();
        let (stop, stopped) = async_channel::bounded::<()>(1);
        s.spawn(move || smol::block_on(ex2.run(stopped.recv())));
        let out = smol::block_on(ex.run(task.or(timeout)));
        drop(stop);
        out
    })
}

#[test]
fn many_concurrent_streams_are_echoed_byte_exact() {
    run(|ex| {
        let certs = certs();
        let (listener, addr) = listen();
        ex.spawn(serve_echo(ex.clone(), listener, certs.server))
            .detach();
        let ex2 = ex.clone();
        ex.spawn(async move {
            let tunnel = agent(addr, certs.client, &ex2).await;
            let mut tasks = Vec::new();
            for i in 0..50usize {
                let tunnel = tunnel.clone();
                tasks.push(ex2.spawn(async move {
                    let data = payload(i, 200_000 + i * 1000);
                    let s = tunnel
                        .open(Target::parse("echo.test:7").unwrap())
                        .await
                        .unwrap();
                    let got = exchange(s, &data).await;
                    assert!(got == data, "stream {i} corrupted");
                }));
            }
            for t in tasks {
                t.await;
            }
            let stats = tunnel.stats();
            assert_eq!(stats.streams_opened, 50);
        })
    });
}

/// An open the agent gives up while the server works on it (a dial that takes long)
/// tells the server, which stops and keeps nothing of it: not a slot, and not a stream
/// its `accept_open` could still take.
#[test]
fn an_open_given_up_by_the_agent_is_let_go_by_the_server() {
    run(|ex| {
        let certs = certs();
        let (listener, addr) = listen();
        let (abandoned_tx, abandoned) = async_channel::bounded::<(usize, bool)>(1);
        let server_ex = ex.clone();
        ex.spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let h = accept(
                sock,
                TlsSession::server(certs.server).unwrap(),
                &PeerCheck::default(),
                LIMIT,
            )
            .await
            .unwrap();
            let conn = Connection::server(proto_config(), std::time::Instant::now());
            let (tunnel, events, driver) = start(h.sock, h.tls, conn).unwrap();
            server_ex.spawn(driver).detach();
            let mut first = true;
            while let Ok(ev) = events.recv().await {
                if let TunnelEvent::OpenRequested { id, .. } = ev {
                    if first {
                        // A dial that never ends, unless the open is given up.
                        tunnel.open_abandoned(id).await;
                    } else {
                        // A dial that ends after the agent gave the open up.
                        while tunnel.stats().streams_active > 0 {
                            Timer::after(Duration::from_millis(10)).await;
                        }
                    }
                    first = false;
                    let accepted = tunnel.accept_open(id).is_ok();
                    abandoned_tx
                        .send((tunnel.stream_slots(), accepted))
                        .await
                        .unwrap();
                }
            }
        })
        .detach();
        let ex2 = ex.clone();
        ex.spawn(async move {
            let tunnel = agent(addr, certs.client, &ex2).await;
            for _ in 0..2 {
                let open = tunnel.open(Target::parse("slow.test:9").unwrap());
                // The agent's client goes away while the open waits for its answer.
                let gave_up = open
                    .or(async {
                        Timer::after(Duration::from_millis(200)).await;
                        Err(fluidity_runtime_smol::Error::Timeout("test"))
                    })
                    .await;
                assert!(gave_up.is_err(), "the open was answered");
                let (slots, accepted) = abandoned.recv().await.unwrap();
                assert_eq!((slots, accepted), (0, false));
            }
        })
    });
}

#[test]
fn refusal_arrives_typed() {
    run(|ex| {
        let certs = certs();
        let (listener, addr) = listen();
        ex.spawn(serve_echo(ex.clone(), listener, certs.server))
            .detach();
        let ex2 = ex.clone();
        ex.spawn(async move {
            let tunnel = agent(addr, certs.client, &ex2).await;
            match tunnel.open(Target::parse("x.test:1").unwrap()).await {
                Err(fluidity_runtime_smol::Error::Refused(r)) => {
                    assert_eq!(r.reason, RefusalReason::ConnectionRefused)
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            // The tunnel still works.
            let mut s = tunnel
                .open(Target::parse("x.test:2").unwrap())
                .await
                .unwrap();
            s.write_all(b"ok").await.unwrap();
            s.close().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ok");
        })
    });
}

#[test]
fn an_open_beyond_the_stream_limit_waits_for_a_stream_to_end() {
    run(|ex| {
        let certs = certs();
        let (listener, addr) = listen();
        let two_streams = Arc::new(Config {
            require_auth: false,
            limits: fluidity_proto::Limits {
                max_streams: 2,
                ..fluidity_proto::Limits::default()
            },
            ..Config::default()
        });
        ex.spawn(serve_echo_with(
            ex.clone(),
            listener,
            certs.server,
            two_streams,
        ))
        .detach();
        let ex2 = ex.clone();
        ex.spawn(async move {
            let tunnel = agent(addr, certs.client, &ex2).await;
            let target = || Target::parse("echo.test:7").unwrap();
            let first = tunnel.open(target()).await.unwrap();
            let _second = tunnel.open(target()).await.unwrap();
            assert!(!tunnel.room_wanted());

            // A third open waits instead of failing, and says so.
            let wanted = ex2.spawn({
                let t = tunnel.clone();
                async move { t.wait_room_wanted().await }
            });
            let third = ex2.spawn({
                let t = tunnel.clone();
                async move { t.open(target()).await }
            });
            wanted.await;
            assert!(tunnel.room_wanted());
            assert!(!third.is_finished(), "opened beyond the server's limit");

            // A later open queues behind it.
            let mut later = Box::pin(tunnel.open(target()));
            assert!(futures_lite::future::poll_once(&mut later).await.is_none());

            // A stream ends: the longest waiting open goes through, and its stream works.
            drop(first);
            let mut s = third.await.expect("the waiting open failed");
            assert!(
                futures_lite::future::poll_once(&mut later).await.is_none(),
                "the later open took the room"
            );
            assert!(tunnel.room_wanted());
            s.write_all(b"third").await.unwrap();
            s.close().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"third");
            drop(s);
            let s = later.await.expect("the later open failed");
            assert!(!tunnel.room_wanted());
            drop(s);

            // An open waiting when the tunnel stops taking streams (a goaway) gets an
            // error at once, not a hang while the open streams drain.
            let _again = tunnel.open(target()).await.unwrap();
            let fourth = ex2.spawn({
                let t = tunnel.clone();
                async move { t.open(target()).await }
            });
            tunnel.wait_room_wanted().await;
            tunnel.go_away();
            match fourth.await {
                Err(fluidity_runtime_smol::Error::Tunnel(fluidity_proto::Error::GoingAway)) => {}
                other => panic!("a waiting open at goaway: {other:?}"),
            }
            assert!(!tunnel.room_wanted());
        })
    });
}

/// The server's relay between a stream and a real socket: bytes arrive exact both ways,
/// whatever the sizes the socket delivers them in (small reads are copied into the stream,
/// large ones lent to it), the relay counts them, and a stream reset in the middle of a
/// download (lent buffers still queued) ends its relay with an error and leaves the
/// tunnel working.
#[test]
fn the_relay_carries_a_socket_both_ways_byte_exact() {
    const UP: usize = 3 << 20;
    const DOWN: usize = 5 << 20;
    run(|ex| {
        let certs = certs();
        // The origin: for each connection, takes the upload while it sends the download in
        // pieces of very different sizes, and reports what it received.
        let (origin, origin_addr) = listen();
        let (got_up_tx, got_up) = async_channel::unbounded::<Vec<u8>>();
        let ex2 = ex.clone();
        ex.spawn(async move {
            loop {
                let (sock, _) = origin.accept().await.unwrap();
                // async-net's socket, whose close is a half-close (async-io's only flushes).
                let (mut r, mut w) = futures_lite::io::split(smol::net::TcpStream::from(sock));
                let got_up_tx = got_up_tx.clone();
                ex2.spawn(async move {
                    let send = async move {
                        let data = payload(2, DOWN);
                        let (mut at, mut step) = (0, 0usize);
                        while at < data.len() {
                            let piece =
                                [1, 700, 9_000, 70_000, 300_000][step % 5].min(data.len() - at);
                            // The reset stream's connection fails here; that is expected.
                            if w.write_all(&data[at..at + piece]).await.is_err() {
                                return;
                            }
                            at += piece;
                            step += 1;
                            futures_lite::future::yield_now().await;
                        }
                        let _ = w.close().await;
                    };
                    let recv = async move {
                        let mut got = Vec::new();
                        let _ = r.read_to_end(&mut got).await;
                        got
                    };
                    let ((), got) = futures_lite::future::zip(send, recv).await;
                    let _ = got_up_tx.send(got).await;
                })
                .detach();
            }
        })
        .detach();
        // The server relays every stream to the origin and reports each relay's result, and
        // the largest read from the origin.
        let (listener, addr) = listen();
        let (done_tx, done) = async_channel::unbounded::<Result<(u64, u64), RelayError>>();
        let largest = Arc::new(AtomicUsize::new(0));
        let largest2 = largest.clone();
        ex.spawn(serve_with(
            ex.clone(),
            listener,
            certs.server,
            proto_config(),
            move |stream| {
                let (done_tx, largest) = (done_tx.clone(), largest2.clone());
                async move {
                    let sock = smol::net::TcpStream::connect(origin_addr).await.unwrap();
                    let moved = relay(stream, sock, |dir, n| {
                        if dir == Direction::SocketToStream {
                            largest.fetch_max(n, Ordering::Relaxed);
                        }
                    })
                    .await;
                    done_tx.send(moved).await.unwrap();
                }
            },
        ))
        .detach();
        let ex2 = ex.clone();
        ex.spawn(async move {
            let tunnel = agent(addr, certs.client, &ex2).await;
            let full_exchange = || async {
                let s = tunnel
                    .open(Target::parse("origin.test:80").unwrap())
                    .await
                    .unwrap();
                let down = exchange(s, &payload(1, UP)).await;
                assert!(down == payload(2, DOWN), "the download arrived changed");
                assert!(
                    got_up.recv().await.unwrap() == payload(1, UP),
                    "the upload arrived changed"
                );
                assert_eq!(
                    done.recv().await.unwrap().unwrap(),
                    (UP as u64, DOWN as u64)
                );
            };
            full_exchange().await;
            // A read that large fills at least half of the relay's largest buffer, after
            // reads have grown it: it was lent, not copied.
            assert!(
                largest.load(Ordering::Relaxed) >= 128 * 1024,
                "no read was large enough to be lent ({} bytes at most)",
                largest.load(Ordering::Relaxed)
            );
            // Reset in the middle of the download, with the relay's buffers queued.
            let mut s = tunnel
                .open(Target::parse("origin.test:80").unwrap())
                .await
                .unwrap();
            let mut part = vec![0; 1 << 20];
            s.read_exact(&mut part).await.unwrap();
            assert!(part[..] == payload(2, DOWN)[..1 << 20]);
            drop(s);
            let err = done.recv().await.unwrap().unwrap_err();
            let RelayError::Stream(err) = err else {
                panic!("the relay blamed the socket for the stream's reset: {err}");
            };
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
            got_up.recv().await.unwrap();
            // The tunnel carries on.
            full_exchange().await;
        })
    });
}

/// A peer that sends its bytes in small frames (1 KiB: the connection gathers smaller
/// payloads into one chunk): every chunk read hands out stays within `MAX_READ_CHUNKS`,
/// however many frames are waiting, and the bytes arrive exact.
#[test]
fn a_chunk_read_takes_a_bounded_number_of_small_frames() {
    const FRAME: usize = 1024;
    const LEN: usize = 200 * FRAME;
    run(|ex| {
        let certs = certs();
        let (listener, addr) = listen();
        let small_frames = Arc::new(Config {
            require_auth: false,
            data_frame_len: FRAME as u32,
            ..Config::default()
        });
        let (sent_tx, sent) = async_channel::bounded::<()>(1);
        ex.spawn(serve_with(
            ex.clone(),
            listener,
            certs.server,
            small_frames,
            move |mut s| {
                let sent_tx = sent_tx.clone();
                async move {
                    s.write_all(&payload(3, LEN)).await.unwrap();
                    s.close().await.unwrap();
                    sent_tx.send(()).await.unwrap();
                    // Kept open until the reader has everything.
                    futures_lite::future::pending::<()>().await;
                }
            },
        ))
        .detach();
        let ex2 = ex.clone();
        ex.spawn(async move {
            let tunnel = agent(addr, certs.client, &ex2).await;
            let mut stream = tunnel
                .open(Target::parse("small.test:7").unwrap())
                .await
                .unwrap();
            // Let the frames pile up before reading.
            sent.recv().await.unwrap();
            let (mut got, mut reads, mut largest) = (Vec::new(), 0, 0);
            loop {
                let mut chunks = Vec::new();
                let n =
                    std::future::poll_fn(|cx| stream.poll_read_chunks(cx, &mut chunks, 1 << 20))
                        .await
                        .unwrap();
                if n == 0 {
                    break;
                }
                assert!(chunks.len() <= MAX_READ_CHUNKS, "{} chunks", chunks.len());
                largest = largest.max(chunks.len());
                reads += 1;
                got.extend(chunks.iter().flat_map(|c| c.iter().copied()));
            }
            assert_eq!(got, payload(3, LEN));
            assert!(
                reads >= (LEN / FRAME).div_ceil(MAX_READ_CHUNKS),
                "{reads} reads"
            );
            eprintln!("{reads} reads, at most {largest} chunks each");
        })
    });
}

/// A relay whose stream has ended towards its socket (the agent sent its request and its
/// FIN; the origin read its end and answers nothing yet, as a long poll does) still ends
/// when the stream is given up: reset by the agent, or its tunnel lost. Before, only a
/// write to the socket noticed, so the origin's connection stayed open until the origin
/// spoke or closed.
#[test]
fn a_half_closed_relay_ends_when_its_stream_is_given_up() {
    for lose_tunnel in [false, true] {
        let kind = run(move |ex| {
            let certs = certs();
            let (origin, origin_addr) = listen();
            let (read_to_end, origin_read_to_end) = async_channel::bounded::<()>(1);
            // Held until the test ends: the origin answers nothing.
            let (_quiet, quiet_until) = async_channel::bounded::<()>(1);
            ex.spawn(async move {
                let (sock, _) = origin.accept().await.unwrap();
                let mut s = smol::net::TcpStream::from(sock);
                let mut request = Vec::new();
                s.read_to_end(&mut request).await.unwrap();
                read_to_end.send(()).await.unwrap();
                let _ = quiet_until.recv().await;
            })
            .detach();
            let (listener, addr) = listen();
            let (relayed, relay_ended) =
                async_channel::bounded::<Result<(u64, u64), RelayError>>(1);
            ex.spawn(serve_with(
                ex.clone(),
                listener,
                certs.server,
                proto_config(),
                move |stream| {
                    let relayed = relayed.clone();
                    async move {
                        let sock = smol::net::TcpStream::connect(origin_addr).await.unwrap();
                        let _ = relayed.send(relay(stream, sock, |_, _| {}).await).await;
                    }
                },
            ))
            .detach();
            let ex2 = ex.clone();
            ex.spawn(async move {
                let _quiet = _quiet;
                let tunnel = agent(addr, certs.client, &ex2).await;
                let mut s = tunnel
                    .open(Target::parse("origin.test:80").unwrap())
                    .await
                    .unwrap();
                s.write_all(b"GET /poll HTTP/1.0\r\n\r\n").await.unwrap();
                s.close().await.unwrap();
                origin_read_to_end.recv().await.unwrap();
                if lose_tunnel {
                    tunnel.close(fluidity_proto::ErrorCode::CANCEL, "gone");
                } else {
                    // Dropped before its end: a CANCEL reset.
                    drop(s);
                }
                let ended = relay_ended.recv().await.unwrap();
                match ended.expect_err("a stream given up is no clean end") {
                    RelayError::Stream(e) => e.kind(),
                    other => panic!("the relay blamed the socket: {other}"),
                }
            })
        });
        let want = if lose_tunnel {
            std::io::ErrorKind::ConnectionAborted
        } else {
            std::io::ErrorKind::ConnectionReset
        };
        assert_eq!(kind, want, "tunnel lost: {lose_tunnel}");
    }
}
