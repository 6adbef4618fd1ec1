//! How a tunnel's transport ends, against a peer driven by hand (proto over rustls, free
//! to send what a real driver would not): a close_notify is seen however it arrives, and
//! a drained side keeps its socket until its last bytes are out and the peer is done.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use fluidity_proto::{Config, Connection, Credentials, Event, Frame, Limits, StreamEvent, Target};
use fluidity_runtime_smol::driver::client_handshake;
use fluidity_runtime_smol::pki::{generate_ca, issue_client, issue_server};
use fluidity_runtime_smol::tls::{
    client_config, server_config, CaRoots, Identity, PeerCheck, TlsSession,
};
use fluidity_runtime_smol::{accept, connect, start, Handshaken, TunnelEvent};
use futures_lite::{AsyncReadExt, AsyncWriteExt};

/// Generous bound for every wait (readiness, never timing).
const LIMIT: Duration = Duration::from_secs(60);

fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let day = Duration::from_secs(86_400);
    let ca = generate_ca("ca", day).unwrap();
    let roots = CaRoots::from_pem(ca.cert_pem()).unwrap();
    let server = issue_server(&ca, &["127.0.0.1".parse().unwrap()], "server", day).unwrap();
    let client = issue_client(&ca, "agent", &["127.0.0.1".parse().unwrap()], day).unwrap();
    let any = PeerCheck::default();
    (
        server_config(&Identity::from_certified(&server).unwrap(), &roots, &any).unwrap(),
        client_config(&Identity::from_certified(&client).unwrap(), &roots, &any).unwrap(),
    )
}

fn config() -> Arc<Config> {
    Arc::new(Config {
        require_auth: false,
        ..Config::default()
    })
}

/// The TLS handshake of the first connection `listener` accepts.
async fn accept_one(listener: &Async<TcpListener>, tls: Arc<rustls::ServerConfig>) -> Handshaken {
    let (sock, _) = listener.accept().await.unwrap();
    let tls = TlsSession::server(tls).unwrap();
    accept(sock, tls, &PeerCheck::default(), LIMIT)
        .await
        .unwrap()
}

/// One end of a tunnel driven by hand.
struct Raw {
    sock: Async<TcpStream>,
    tls: TlsSession,
    conn: Connection,
    events: Vec<Event>,
}

impl Raw {
    /// Decrypts `data` and hands the plaintext to the connection.
    fn feed(&mut self, mut data: &[u8]) {
        loop {
            if !data.is_empty() {
                self.tls.read_tls(&mut data).unwrap();
            }
            self.tls.process_new_packets().unwrap();
            let mut plain = Vec::new();
            let _ = self.tls.reader().read_to_end(&mut plain);
            self.conn.handle_input(Instant::now(), &plain);
            while let Some(e) = self.conn.poll() {
                self.events.push(e);
            }
            if data.is_empty() {
                return;
            }
        }
    }

    async fn read_once(&mut self) -> std::io::Result<usize> {
        let mut buf = vec![0; 64 << 10];
        let n = self.sock.read_with(|mut s| s.read(&mut buf)).await?;
        self.feed(&buf[..n]);
        Ok(n)
    }

    /// Encrypts `plain`, and a close_notify after it if asked, into one TCP write.
    fn write(&mut self, plain: &[u8], close_notify: bool) {
        self.tls.writer().write_all(plain).unwrap();
        if close_notify {
            self.tls.send_close_notify();
        }
        let mut out = Vec::new();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut out).unwrap();
        }
        self.sock.get_ref().write_all(&out).unwrap();
    }

    /// Sends what the connection has to send.
    fn send(&mut self, close_notify: bool) {
        let mut plain = Vec::new();
        self.conn.poll_transmit(Instant::now(), &mut plain);
        self.write(&plain, close_notify);
    }
}

/// A peer that sends its last frames and its close_notify in one write and leaves TCP
/// open (as TLS stacks do while they wait for the other close_notify) has ended the
/// transport: the stream fails at once as a connection lost, instead of waiting for the
/// idle timeout to call the peer dead.
#[test]
fn a_close_notify_behind_data_ends_the_tunnel_at_once() {
    smol::block_on(async {
        let (server_tls, client_tls) = tls_configs();
        let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).unwrap();
        let addr = listener.get_ref().local_addr().unwrap();
        let _server = smol::spawn(async move {
            let h = accept_one(&listener, server_tls).await;
            let conn = Connection::server(config(), Instant::now());
            let mut raw = Raw {
                sock: h.sock,
                tls: h.tls,
                conn,
                events: vec![],
            };
            raw.feed(&[]);
            let id = loop {
                raw.send(false);
                if let Some(id) = raw.events.iter().find_map(|e| match e {
                    Event::Stream(StreamEvent::OpenRequested { id, .. }) => Some(*id),
                    _ => None,
                }) {
                    break id;
                }
                raw.read_once().await.unwrap();
            };
            raw.conn.accept_open(id).unwrap();
            raw.conn.send_stream(id).write(b"hello").unwrap();
            // OPEN_RESULT, DATA and close_notify in one write, and no FIN.
            raw.send(true);
            Timer::after(LIMIT).await;
        });
        let tls = TlsSession::client(client_tls, "127.0.0.1").unwrap();
        let h = connect(addr, tls, &PeerCheck::default(), LIMIT)
            .await
            .unwrap();
        let conn = Connection::agent(config(), Credentials::none(), Instant::now());
        let (tunnel, _events, driver) = start(h.sock, h.tls, conn).unwrap();
        let _driver = smol::spawn(driver);
        tunnel.ready().await.unwrap();
        let mut s = tunnel
            .open(Target::parse("x.test:1").unwrap())
            .await
            .unwrap();
        let end = s.read_to_end(&mut Vec::new()).await;
        let err = end.expect_err("a transport ended before the drain is no clean end");
        assert!(
            err.to_string().contains("transport closed"),
            "the end was not taken from the close_notify: {err}"
        );
    });
}

/// A side that has drained its tunnel keeps the socket until the peer is done: bytes the
/// kernel still holds for a slow peer are not lost when a packet of the peer's (its
/// keepalive PING) crosses the close, which closing at once would answer with a reset.
#[test]
fn a_drained_tunnel_delivers_its_last_bytes_though_a_ping_crosses_its_close() {
    const LEN: usize = 3 << 20;
    smol::block_on(async {
        let (server_tls, client_tls) = tls_configs();
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Inherited by the accepted socket: room for a good part of the download.
        l.set_send_buffer_size(1 << 20).unwrap();
        l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        l.listen(8).unwrap();
        let listener = Async::new(TcpListener::from(l)).unwrap();
        let addr = listener.get_ref().local_addr().unwrap();
        let (closed_tx, closed) = async_channel::bounded::<()>(1);
        // The real server driver; its one stream sends LEN bytes behind a goaway.
        let _server = smol::spawn(async move {
            let h = accept_one(&listener, server_tls).await;
            let conn = Connection::server(config(), Instant::now());
            let (tunnel, events, driver) = start(h.sock, h.tls, conn).unwrap();
            smol::spawn(driver).detach();
            while let Ok(ev) = events.recv().await {
                match ev {
                    TunnelEvent::OpenRequested { id, .. } => {
                        let (mut s, t) = (tunnel.accept_open(id).unwrap(), tunnel.clone());
                        smol::spawn(async move {
                            s.read_to_end(&mut Vec::new()).await.unwrap();
                            t.go_away();
                            s.write_all(&vec![7u8; LEN]).await.unwrap();
                            s.close().await.unwrap();
                        })
                        .detach();
                    }
                    TunnelEvent::Closed { .. } => break,
                    _ => {}
                }
            }
            let _ = closed_tx.send(()).await;
        });
        // The agent by hand, behind a slow path: a small receive buffer, read slowly.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(16 << 10).unwrap();
        sock.connect(&addr.into()).unwrap();
        let sock = Async::new(TcpStream::from(sock)).unwrap();
        let tls = TlsSession::client(client_tls, "127.0.0.1").unwrap();
        let h = client_handshake(sock, tls, &PeerCheck::default(), LIMIT)
            .await
            .unwrap();
        let limits = Limits {
            stream_window: 1 << 24,
            connection_window: 1 << 26,
            ..Limits::default()
        };
        let agent_config = Arc::new(Config {
            limits,
            ..Config::default()
        });
        let conn = Connection::agent(agent_config, Credentials::none(), Instant::now());
        let mut raw = Raw {
            sock: h.sock,
            tls: h.tls,
            conn,
            events: vec![],
        };
        raw.send(false);
        while !raw.conn.is_ready() {
            raw.read_once().await.unwrap();
        }
        let id = raw
            .conn
            .open(Instant::now(), Target::parse("x.test:1").unwrap())
            .unwrap();
        raw.conn.send_stream(id).finish().unwrap();
        raw.send(false);
        let (mut got, mut fin) = (0, false);
        let mut take = |raw: &mut Raw| {
            while let Ok(b) = raw.conn.recv_stream(id).read(1 << 20) {
                match b {
                    Some(b) => got += b.len(),
                    None => {
                        fin = true;
                        break;
                    }
                }
            }
            (got, fin)
        };
        let mut buf = vec![0u8; 32 << 10];
        // Slowly, until the server's tunnel has drained and closed for its application.
        while closed.try_recv().is_err() {
            Timer::after(Duration::from_millis(5)).await;
            if let Ok(n) = raw.sock.get_ref().read(&mut buf) {
                raw.feed(&buf[..n]);
            }
            take(&mut raw);
        }
        assert!(
            take(&mut raw).0 < LEN,
            "the test needs bytes still in flight"
        );
        let mut ping = Vec::new();
        Frame::Ping {
            ack: false,
            opaque: 42,
        }
        .encode(&mut ping);
        raw.write(&ping, false);
        let end = loop {
            match raw.read_once().await {
                Ok(0) => break "the end of the stream".to_owned(),
                Ok(_) => {}
                Err(e) => break e.to_string(),
            }
            take(&mut raw);
        };
        let (got, fin) = take(&mut raw);
        assert!(
            got == LEN && fin,
            "a graceful drain lost {} bytes ({end})",
            LEN - got
        );
    });
}
