//! Origin servers on 127.0.0.1, on std threads: HTTP/1.1 (plain and TLS), echo, flood,
//! silent, deaf, black hole, and a Python WebSocket echo server.
//!
//! The HTTP origin understands just enough HTTP/1.1 for the tests, with explicit limits:
//! - `GET /hello`: `hello from NAME`;
//! - `GET /bytes/N`: N bytes of [`payload`](super::client::payload), with Content-Length;
//! - `POST /sha256`: reads a Content-Length or chunked body (answering
//!   `Expect: 100-continue`) and answers the body's SHA-256 in hex;
//! - `GET /hang/N/M`: announces Content-Length M, sends the first N bytes of the payload,
//!   then waits for the client to go away (a transfer that can only end in an error);
//! - `GET /cut/N/M`: announces Content-Length M, sends N bytes of the payload, then
//!   closes the connection plainly (a FIN); `GET /cut-chunked` sends one chunk of a
//!   chunked body, then closes plainly;
//! - `POST /early`: answers `200` with [`EARLY_BODY`] at once, then reads the body to its
//!   end (an answer before the request's body, which RFC 9110 allows);
//! - `POST /expect-fails`: answers `417 Expectation Failed` with `Connection: close`
//!   before any body, and closes;
//! - keep-alive unless the client sends `Connection: close`.
//!
//! [`AbruptOrigin`] ends its connections the way servers do when things go wrong: an
//! early answer to an upload it will not read, and a crash in the middle of a response.
//!
//! A client that breaks the protocol or a limit gets its connection closed; an origin
//! thread never panics on what a client sends.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fluidity_runtime_smol::pki::{self, SanEntry};
use fluidity_runtime_smol::tls::{certs_from_pem, crypto_provider, key_from_pem};

use super::client::{payload_into, Sha256};
use super::proc::{wait_for, Proc};

/// Largest request head the origin reads.
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line.
const MAX_CHUNK_LINE: usize = 1024;
/// Bytes per write when sending a body.
const WRITE_CHUNK: usize = 64 * 1024;

/// Accepts on a listener in a thread until `stop` is set, handing each connection to
/// `serve` on its own thread.
fn accept_loop<F>(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    serve: F,
) where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            accepted.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            std::thread::spawn(move || serve(conn));
        }
    });
}

/// Wakes an accept loop so that it sees its stop flag.
fn stop_accepting(addr: SocketAddr, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
}

fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("binding an origin on 127.0.0.1")
}

/// A plain HTTP/1.1 origin.
#[derive(Debug)]
pub struct HttpOrigin {
    addr: SocketAddr,
    name: String,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    ended: Arc<Mutex<Ended>>,
}

/// How an origin's connections ended, so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ended {
    /// Closed plainly by the client side, between requests.
    pub closed: usize,
    /// Reset by the client side.
    pub reset: usize,
    /// Ended any other way (the origin closed, or a request it refused).
    pub other: usize,
}

impl HttpOrigin {
    /// Starts an origin that calls itself `name` in `/hello`.
    pub fn start(name: &str) -> HttpOrigin {
        let listener = bind();
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let n = name.to_owned();
        let ended = Arc::new(Mutex::new(Ended::default()));
        let counts = ended.clone();
        accept_loop(listener, stop.clone(), connections.clone(), move |conn| {
            let _ = conn.set_nodelay(true);
            let how = serve_http(conn, &n);
            let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
            match how {
                Ok(true) => counts.closed += 1,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => counts.reset += 1,
                _ => counts.other += 1,
            }
        });
        HttpOrigin {
            addr,
            name: name.to_owned(),
            stop,
            connections,
            ended,
        }
    }

    /// How its connections have ended so far.
    pub fn ended(&self) -> Ended {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HttpOrigin {
    fn drop(&mut self) {
        stop_accepting(self.addr, &self.stop);
    }
}

/// An HTTPS origin (TLS 1.3 or 1.2, rustls) serving the same routes, with a certificate
/// for `localhost` and `127.0.0.1` from its own CA.
#[derive(Debug)]
pub struct TlsOrigin {
    addr: SocketAddr,
    ca_file: PathBuf,
    stop: Arc<AtomicBool>,
}

impl TlsOrigin {
    /// Starts the origin and writes its CA certificate to `dir/origin-ca.pem`.
    pub fn start(name: &str, dir: &Path) -> TlsOrigin {
        let day = Duration::from_secs(24 * 3600);
        let ca = pki::generate_ca("fluidity e2e origin CA", day).expect("origin CA");
        let leaf = pki::issue_server(
            &ca,
            &[
                SanEntry::Dns("localhost".into()),
                SanEntry::Ip([127, 0, 0, 1].into()),
            ],
            "localhost",
            day,
        )
        .expect("origin certificate");
        let ca_file = dir.join("origin-ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).expect("writing the origin CA");
        let config = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                certs_from_pem(&leaf.cert_pem, "origin certificate").expect("origin chain"),
                key_from_pem(&leaf.key_pem, "origin key").expect("origin key"),
            )
            .expect("origin TLS config");
        let config = Arc::new(config);
        let listener = bind();
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let n = name.to_owned();
        accept_loop(
            listener,
            stop.clone(),
            Arc::new(AtomicUsize::new(0)),
            move |conn| {
                let _ = conn.set_nodelay(true);
                let Ok(tls) = rustls::ServerConnection::new(config.clone()) else {
                    return;
                };
                let _ = serve_http(rustls::StreamOwned::new(tls, conn), &n);
            },
        );
        TlsOrigin {
            addr,
            ca_file,
            stop,
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate file, for `curl --cacert`.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        stop_accepting(self.addr, &self.stop);
    }
}

/// The parts of a request head the origin uses.
struct Request {
    method: String,
    path: String,
    content_length: Option<u64>,
    chunked: bool,
    expect_continue: bool,
    close: bool,
    /// The request line's minor version (0 or 1).
    minor_version: u8,
    /// `Sec-WebSocket-Key`, as sent.
    websocket_key: Option<String>,
}

/// Reads one request head; `None` on a clean end of stream before it.
fn read_head<R: BufRead>(r: &mut R) -> io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Take bytes up to and including the end of the head, and no further.
        let mut take = buf.len();
        let mut done = false;
        for (i, b) in buf.iter().enumerate() {
            head.push(*b);
            if head.ends_with(b"\r\n\r\n") {
                take = i + 1;
                done = true;
                break;
            }
        }
        if !done {
            take = buf.len();
        }
        r.consume(take);
        if done {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::other("request head too large"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(io::Error::other("malformed request head")),
    }
    let mut out = Request {
        method: req.method.unwrap_or("").to_owned(),
        path: req.path.unwrap_or("").to_owned(),
        content_length: None,
        chunked: false,
        expect_continue: false,
        close: req.version == Some(0),
        minor_version: req.version.unwrap_or(1),
        websocket_key: None,
    };
    for h in req.headers.iter() {
        let v = String::from_utf8_lossy(h.value).trim().to_ascii_lowercase();
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                out.content_length = Some(
                    v.parse()
                        .map_err(|_| io::Error::other("bad Content-Length"))?,
                )
            }
            "transfer-encoding" => out.chunked = v.ends_with("chunked"),
            "expect" => out.expect_continue = v == "100-continue",
            "sec-websocket-key" => {
                out.websocket_key = Some(String::from_utf8_lossy(h.value).trim().to_owned())
            }
            "connection" if v.split(',').any(|t| t.trim() == "close") => out.close = true,
            _ => {}
        }
    }
    Ok(Some(out))
}

/// Feeds exactly `n` body bytes to `sink`.
fn read_body_exact<R: Read>(r: &mut R, mut n: u64, sink: &mut Sha256) -> io::Result<()> {
    let mut buf = vec![0u8; WRITE_CHUNK];
    while n > 0 {
        let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        let got = r.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        sink.update(&buf[..got]);
        n -= got as u64;
    }
    Ok(())
}

fn read_line<R: BufRead>(r: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    r.by_ref()
        .take(MAX_CHUNK_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(io::Error::other("chunk line too long or truncated"));
    }
    Ok(String::from_utf8_lossy(&line).trim().to_owned())
}

/// Feeds a chunked body to `sink`, through the last chunk and the trailer section.
fn read_body_chunked<R: BufRead>(r: &mut R, sink: &mut Sha256) -> io::Result<()> {
    loop {
        let line = read_line(r)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailer fields, then the empty line.
            while !read_line(r)?.is_empty() {}
            return Ok(());
        }
        read_body_exact(r, size, sink)?;
        if !read_line(r)?.is_empty() {
            return Err(io::Error::other("chunk not followed by CRLF"));
        }
    }
}

fn respond<W: Write>(w: &mut W, status: &str, body: &[u8], close: bool) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )?;
    w.write_all(body)?;
    w.flush()
}

fn send_payload<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = buf
            .len()
            .min(usize::try_from(len - off).unwrap_or(usize::MAX));
        payload_into(off, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        off += n as u64;
    }
    w.flush()
}

/// Serves HTTP/1.1 requests on one connection until it closes or misbehaves; `Ok(true)`
/// when the client closed it plainly between requests.
fn serve_http<S: Read + Write>(conn: S, name: &str) -> io::Result<bool> {
    let mut conn = BufReader::with_capacity(WRITE_CHUNK, conn);
    while let Some(req) = read_head(&mut conn)? {
        let close = req.close;
        let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["hello"]) => respond(
                conn.get_mut(),
                "200 OK",
                format!("hello from {name}\n").as_bytes(),
                close,
            )?,
            // Answered with `Connection: close` whatever the request asked, and closed.
            ("GET", ["bye"]) => {
                respond(conn.get_mut(), "200 OK", b"bye\n", true)?;
                return Ok(false);
            }
            ("GET", ["bytes", n]) => match n.parse::<u64>() {
                Ok(len) => {
                    let w = conn.get_mut();
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                         Content-Length: {len}\r\n\r\n"
                    )?;
                    send_payload(w, len)?;
                }
                Err(_) => respond(conn.get_mut(), "400 Bad Request", b"bad length\n", true)?,
            },
            ("GET", ["hang", sent, total]) => {
                let (Ok(sent), Ok(total)) = (sent.parse::<u64>(), total.parse::<u64>()) else {
                    {
                        respond(conn.get_mut(), "400 Bad Request", b"bad lengths\n", true)?;
                        return Ok(false);
                    }
                };
                let w = conn.get_mut();
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {total}\r\n\r\n"
                )?;
                send_payload(w, sent.min(total))?;
                // Hold the connection open until the client goes away.
                let mut sink = [0u8; 1024];
                while conn.read(&mut sink)? > 0 {}
                return Ok(false);
            }
            ("POST", ["sha256"]) => {
                if req.expect_continue {
                    conn.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                    conn.get_mut().flush()?;
                }
                let mut sha = Sha256::new();
                if req.chunked {
                    read_body_chunked(&mut conn, &mut sha)?;
                } else {
                    read_body_exact(&mut conn, req.content_length.unwrap_or(0), &mut sha)?;
                }
                respond(conn.get_mut(), "200 OK", sha.hex().as_bytes(), close)?;
            }
            ("GET", ["cut", sent, total]) => {
                let (Ok(sent), Ok(total)) = (sent.parse::<u64>(), total.parse::<u64>()) else {
                    {
                        respond(conn.get_mut(), "400 Bad Request", b"bad lengths\n", true)?;
                        return Ok(false);
                    }
                };
                let w = conn.get_mut();
                write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n")?;
                send_payload(w, sent.min(total))?;
                // A plain close (FIN), with the response unfinished.
                return Ok(false);
            }
            ("GET", ["chunked-version"]) => {
                // Chunked whatever the request's version (as some origins answer), in two
                // chunks and a trailer, saying which version the request came in.
                let said = format!("request HTTP/1.{}", req.minor_version);
                let (a, b) = said.split_at(8);
                let w = conn.get_mut();
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n\
                     {:x}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
                    a.len(),
                    b.len()
                )?;
                if close {
                    return Ok(false);
                }
            }
            ("GET", ["cut-chunked"]) => {
                let w = conn.get_mut();
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                )?;
                // A plain close (FIN) before the last chunk.
                return Ok(false);
            }
            ("POST", ["early"]) => {
                // The answer first, then the body, read to its end: the connection stays
                // at a message boundary for the next request.
                respond(conn.get_mut(), "200 OK", EARLY_BODY.as_bytes(), close)?;
                let mut sha = Sha256::new();
                if req.chunked {
                    read_body_chunked(&mut conn, &mut sha)?;
                } else {
                    read_body_exact(&mut conn, req.content_length.unwrap_or(0), &mut sha)?;
                }
            }
            ("POST", ["expect-fails"]) => {
                // Refuses the expectation and closes, as the body is not wanted.
                write!(
                    conn.get_mut(),
                    "HTTP/1.1 417 Expectation Failed\r\nConnection: close\r\n\
                     Content-Length: {}\r\n\r\n{EXPECT_FAILED_BODY}",
                    EXPECT_FAILED_BODY.len()
                )?;
                return Ok(false);
            }
            _ => respond(conn.get_mut(), "404 Not Found", b"no such route\n", close)?,
        }
        if close {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The body of [`HttpOrigin`]'s answer to `POST /early`.
pub const EARLY_BODY: &str = "accepted before the body\n";

/// The body of [`HttpOrigin`]'s `417` to `POST /expect-fails`.
pub const EXPECT_FAILED_BODY: &str = "expectation failed\n";

/// The body of [`AbruptOrigin`]'s `413`.
pub const REJECT_BODY: &str = "rejected before reading the body: too large\n";

/// An origin whose connections end abruptly, each with a TCP reset:
/// - `/reject`: answers `413 Payload Too Large` (`Connection: close`, body
///   [`REJECT_BODY`]) as soon as it has the request head, and closes without reading the
///   body, as a server refusing an upload does. When the body is already streaming (no
///   `Expect: 100-continue`), it first waits until body bytes have arrived, so that they
///   are unread at the close, which is then sure to reset the connection;
/// - `/crash/N`: answers `200 OK` with `Connection: close` and no length (the body ends
///   where the connection does), sends N bytes of the payload, then resets the
///   connection, as a server that crashes mid-response does;
/// - `/flood-then-reset`: reads no body, answers `200 OK` with `Connection: close` and a
///   body without end, and once the client has taken none of it for a second, resets the
///   connection. A client that sends its whole upload before it reads anything is then
///   blocked sending when the reset comes;
/// - `/reset-now` and `/close-now`: reset, or close, the connection without answering;
/// - `/ws-crash`: a WebSocket endpoint (RFC 6455) that echoes text and binary messages
///   until it receives the text `crash`, then resets the connection without a close
///   frame, as a WebSocket server that crashes mid-session does.
#[derive(Debug)]
pub struct AbruptOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    resets: Arc<AtomicUsize>,
}

impl AbruptOrigin {
    /// Starts the origin.
    pub fn start() -> AbruptOrigin {
        let listener = bind();
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicUsize::new(0));
        let counted = resets.clone();
        accept_loop(
            listener,
            stop.clone(),
            Arc::new(AtomicUsize::new(0)),
            move |conn| {
                if AbruptOrigin::serve(conn).unwrap_or(false) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
        );
        AbruptOrigin { addr, stop, resets }
    }

    /// Answers one request; returns whether the connection was reset.
    fn serve(conn: TcpStream) -> io::Result<bool> {
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut r = BufReader::new(conn);
        let Some(req) = read_head(&mut r)? else {
            return Ok(false);
        };
        let mut conn = r.into_inner();
        if req.path == "/reject" {
            // Without 100-continue the body is on its way: wait until some of it is here,
            // so that it is unread when the socket is dropped (as it is: no shutdown, no
            // draining) and the kernel resets the connection.
            let mut probe = [0u8; 1];
            let streaming = !req.expect_continue && conn.peek(&mut probe)? > 0;
            let answer = format!(
                "HTTP/1.1 413 Payload Too Large\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{REJECT_BODY}",
                REJECT_BODY.len()
            );
            conn.write_all(answer.as_bytes())?;
            return Ok(streaming);
        }
        if req.path == "/ws-crash" {
            return websocket_until_crash(conn, req.websocket_key.as_deref());
        }
        if req.path == "/reset-now" {
            socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
            return Ok(true);
        }
        if req.path == "/close-now" {
            return Ok(false);
        }
        if req.path == "/flood-then-reset" {
            conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            conn.set_write_timeout(Some(Duration::from_secs(1)))?;
            let chunk = vec![b'f'; 64 * 1024];
            while conn.write(&chunk).is_ok_and(|n| n > 0) {}
            socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
            return Ok(true);
        }
        let Some(len) = req
            .path
            .strip_prefix("/crash/")
            .and_then(|n| n.parse().ok())
        else {
            respond(&mut conn, "404 Not Found", b"no such route\n", true)?;
            return Ok(false);
        };
        conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
        let mut buf = vec![0u8; len];
        payload_into(0, &mut buf);
        conn.write_all(&buf)?;
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
        Ok(true)
    }

    /// The URL of `path` on this origin.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections ended with a reset so far.
    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
}

impl Drop for AbruptOrigin {
    fn drop(&mut self) {
        stop_accepting(self.addr, &self.stop);
    }
}

/// Serves an upgraded WebSocket connection for [`AbruptOrigin`]'s `/ws-crash`; returns
/// whether the connection was reset. The client waits for the `101` before it sends a
/// frame, so no frame bytes were read along with the head.
fn websocket_until_crash(mut conn: TcpStream, key: Option<&str>) -> io::Result<bool> {
    let Some(key) = key else {
        respond(
            &mut conn,
            "400 Bad Request",
            b"not a WebSocket handshake\n",
            true,
        )?;
        return Ok(false);
    };
    write!(
        conn,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        websocket_accept(key)
    )?;
    loop {
        let (opcode, payload) = read_ws_frame(&mut conn)?;
        match opcode {
            WS_TEXT if payload == b"crash" => {
                socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
                return Ok(true);
            }
            WS_TEXT | WS_BINARY => write_ws_frame(&mut conn, opcode, &payload)?,
            WS_PING => write_ws_frame(&mut conn, WS_PONG, &payload)?,
            WS_CLOSE => {
                write_ws_frame(&mut conn, WS_CLOSE, &payload)?;
                return Ok(false);
            }
            _ => {}
        }
    }
}

const WS_TEXT: u8 = 0x1;
const WS_BINARY: u8 = 0x2;
const WS_CLOSE: u8 = 0x8;
const WS_PING: u8 = 0x9;
const WS_PONG: u8 = 0xA;
/// Largest message the test origin takes: its messages are small.
const WS_MAX_PAYLOAD: u64 = 1 << 20;

/// `Sec-WebSocket-Accept` for a client's key (RFC 6455 §4.2.2).
fn websocket_accept(key: &str) -> String {
    use base64::Engine as _;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// Reads one whole, unfragmented client frame and unmasks it: (opcode, payload).
fn read_ws_frame(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head)?;
    if head[0] & 0x80 == 0 || head[1] & 0x80 == 0 {
        return Err(io::Error::other("a fragmented or unmasked client frame"));
    }
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > WS_MAX_PAYLOAD {
        return Err(io::Error::other(
            "a WebSocket frame larger than the test origin takes",
        ));
    }
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask)?;
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    r.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok((head[0] & 0x0f, payload))
}

/// Writes one unmasked server frame.
fn write_ws_frame(w: &mut impl Write, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match u16::try_from(payload.len()) {
        Ok(n) if n < 126 => frame.push(n as u8),
        Ok(n) => {
            frame.push(126);
            frame.extend_from_slice(&n.to_be_bytes());
        }
        Err(_) => {
            frame.push(127);
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    w.write_all(&frame)
}

/// Echoes every byte back; half-closes when the client does.
#[derive(Debug)]
pub struct EchoOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    ended: Arc<Mutex<Ended>>,
}

impl EchoOrigin {
    /// Starts the echo server.
    pub fn start() -> EchoOrigin {
        let listener = bind();
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(Mutex::new(Ended::default()));
        let counts = ended.clone();
        accept_loop(listener, stop.clone(), connections.clone(), move |conn| {
            let _ = conn.set_nodelay(true);
            let Ok(mut w) = conn.try_clone() else { return };
            let mut r = conn;
            let how = io::copy(&mut r, &mut w);
            if how.is_ok() {
                let _ = w.shutdown(Shutdown::Write);
            }
            let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
            match how {
                Ok(_) => counts.closed += 1,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => counts.reset += 1,
                Err(_) => counts.other += 1,
            }
        });
        EchoOrigin {
            addr,
            stop,
            connections,
            ended,
        }
    }

    /// How its connections have ended so far: `closed` when the client side closed
    /// (half-closed) plainly.
    pub fn ended(&self) -> Ended {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for EchoOrigin {
    fn drop(&mut self) {
        stop_accepting(self.addr, &self.stop);
    }
}

/// Sends payload bytes to every client as fast as it takes them, forever, and counts
/// what it managed to write. Its send buffer is kept small so that the count is close to
/// what the peer actually accepted.
#[derive(Debug)]
pub struct FloodOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Vec<Arc<AtomicU64>>>>,
}

impl FloodOrigin {
    /// Starts the flood server.
    pub fn start() -> FloodOrigin {
        let listener = bind();
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Vec::<Arc<AtomicU64>>::new()));
        let (all, s2) = (written.clone(), stop.clone());
        accept_loop(
            listener,
            stop.clone(),
            Arc::new(AtomicUsize::new(0)),
            move |mut conn| {
                let _ = socket2::SockRef::from(&conn).set_send_buffer_size(64 * 1024);
                let count = Arc::new(AtomicU64::new(0));
                all.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(count.clone());
                let mut buf = vec![0u8; 16 * 1024];
                let mut off = 0u64;
                while !s2.load(Ordering::SeqCst) {
                    payload_into(off, &mut buf);
                    match conn.write(&buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            off += n as u64;
                            count.fetch_add(n as u64, Ordering::SeqCst);
                        }
                    }
                }
            },
        );
        FloodOrigin {
            addr,
            stop,
            written,
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes written to each client so far, in the order they connected.
    pub fn written_per_connection(&self) -> Vec<u64> {
        let all = self.written.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    }

    /// Bytes written to all clients so far.
    pub fn written(&self) -> u64 {
        self.written_per_connection().iter().sum()
    }
}

impl Drop for FloodOrigin {
    fn drop(&mut self) {
        stop_accepting(self.addr, &self.stop);
    }
}

/// An origin that takes requests and never answers them, as a stalled backend or a long
/// poll does; it notes each connection that the proxy side closes or resets.
#[derive(Debug)]
pub struct SilentOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    released: Arc<AtomicUsize>,
}

impl SilentOrigin {
    /// Starts the origin.
    pub fn start() -> SilentOrigin {
        SilentOrigin::answering_from(usize::MAX)
    }

    /// Starts an origin silent on its first `n` connections only: from the next one on, a
    /// request gets `200` with the body `answered`.
    pub fn answering_from(n: usize) -> SilentOrigin {
        let listener = bind();
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let released = Arc::new(AtomicUsize::new(0));
        let counted = released.clone();
        let served = Arc::new(AtomicUsize::new(0));
        accept_loop(listener, stop.clone(), accepted.clone(), move |mut conn| {
            if served.fetch_add(1, Ordering::SeqCst) >= n {
                let mut conn = BufReader::new(conn);
                if let Ok(Some(req)) = read_head(&mut conn) {
                    let _ = respond(conn.get_mut(), "200 OK", b"answered", req.close);
                }
                return;
            }
            // Whatever arrives is read and ignored until the other side goes away.
            let mut sink = [0u8; 4096];
            while conn.read(&mut sink).is_ok_and(|n| n > 0) {}
            counted.fetch_add(1, Ordering::SeqCst);
        });
        SilentOrigin {
            addr,
            stop,
            accepted,
            released,
        }
    }

    /// The URL of `path` on this origin.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections the other side has closed or reset so far.
    pub fn released(&self) -> usize {
        self.released.load(Ordering::SeqCst)
    }
}

impl Drop for SilentOrigin {
    fn drop(&mut self) {
        stop_accepting(self.addr, &self.stop);
    }
}

/// An origin that accepts connections and then neither reads nor writes: an upload to it
/// stalls once the buffers on the way are full. Its connections stay open until it is
/// dropped.
#[derive(Debug)]
pub struct DeafOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl DeafOrigin {
    /// Starts the origin.
    pub fn start() -> DeafOrigin {
        let listener = bind();
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        accept_loop(
            listener,
            stop.clone(),
            Arc::new(AtomicUsize::new(0)),
            move |conn| {
                keep.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
            },
        );
        DeafOrigin { addr, stop, held }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DeafOrigin {
    fn drop(&mut self) {
        stop_accepting(self.addr, &self.stop);
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A port that never answers: a listener with a backlog of zero that is never accepted
/// from, filled with connections, so that the kernel drops further SYNs and a connect
/// attempt can only time out.
#[derive(Debug)]
pub struct BlackHole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

impl BlackHole {
    /// Creates the listener on a free port of 127.0.0.1 and fills its backlog.
    pub fn start() -> BlackHole {
        BlackHole::on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Creates the listener on `addr` (port 0 for a free one) and fills its backlog.
    pub fn on(addr: SocketAddr) -> BlackHole {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        if addr.is_ipv6() {
            sock.set_only_v6(true).expect("IPV6_V6ONLY");
        }
        sock.bind(&addr.into()).expect("bind");
        sock.listen(0).expect("listen");
        let addr = sock
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("an IP address");
        let mut fillers = Vec::new();
        // Connect until one attempt is left unanswered: the backlog is then full. Only a
        // probe: a slow machine merely adds a filler or two.
        for _ in 0..64 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fillers.push(s),
                Err(_) => break,
            }
        }
        BlackHole {
            addr,
            _listener: sock,
            _fillers: fillers,
        }
    }

    /// The address that never answers.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A port on 127.0.0.1 with nothing listening (connections are refused). It was free a
/// moment ago; nothing in these tests binds fixed ports, so it stays free.
pub fn refused_port() -> u16 {
    super::tunnel::free_port()
}

/// The Python interpreter of the test virtual environment, with `websockets` installed by
/// `.ci/setup-e2e.sh`.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("FLUIDITY_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fluidity-venv")))
        .expect("FLUIDITY_VENV or HOME is set");
    let py = venv.join("bin").join("python");
    let ok = Command::new(&py)
        .args(["-c", "import websockets"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import websockets: run .ci/setup-e2e.sh first",
        py.display()
    );
    py
}

const WS_ECHO_SERVER: &str = r#"
import sys
from websockets.sync.server import serve

def echo(ws):
    for message in ws:
        ws.send(message)

with serve(echo, "127.0.0.1", 0, max_size=None) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"#;

/// A WebSocket echo server: Python `websockets`, a real implementation of RFC 6455.
#[derive(Debug)]
pub struct WsOrigin {
    /// The Python process.
    pub proc: Proc,
    addr: SocketAddr,
}

impl WsOrigin {
    /// Starts the server and waits for it to print its port.
    pub fn start(log_dir: &Path) -> WsOrigin {
        let mut cmd = Command::new(python());
        cmd.args(["-u", "-c", WS_ECHO_SERVER]);
        let proc = Proc::spawn("ws-origin", cmd, log_dir);
        let port: u16 = wait_for(
            "the WebSocket origin's port",
            Duration::from_secs(30),
            || {
                proc.stdout()
                    .lines()
                    .next()
                    .and_then(|l| l.trim().parse().ok())
            },
        );
        WsOrigin {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
