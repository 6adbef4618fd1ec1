//! Shared pieces of the proxy tests: dialers, a proxy on 127.0.0.1, local origin servers,
//! and a curl runner.

#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_net::{TcpListener, TcpStream};
use bytes::Bytes;
use fluidity_agent::proxy::{serve_connection, DialError, Dialer, ProxyConfig};
use fluidity_proto::{Host, OpenRefusal, RefusalReason, Target};
use fluidity_runtime_smol::relay::ReadChunks;
use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};

/// Runs a test body with an overall time limit.
pub fn run<F: Future<Output = ()>>(f: F) {
    smol::block_on(f.or(async {
        smol::Timer::after(Duration::from_secs(60)).await;
        panic!("test timed out");
    }))
}

/// Dials targets directly over TCP, resolving names locally (tests only: the real dialer
/// is the tunnel, where the server resolves).
pub struct DirectDialer;

impl Dialer for DirectDialer {
    type Stream = DirectStream;

    async fn open(&self, target: Target) -> Result<DirectStream, DialError> {
        let refused = |reason, detail: String| DialError::Refused(OpenRefusal::new(reason, detail));
        let addrs: Vec<SocketAddr> = match &target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            Host::Name(n) => async_net::resolve((n.as_str(), target.port))
                .await
                .map_err(|e| refused(RefusalReason::NoSuchHost, e.to_string()))?,
        };
        let mut last = refused(RefusalReason::NoSuchHost, "no addresses".into());
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(DirectStream(s, false)),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    last = refused(RefusalReason::ConnectionRefused, e.to_string())
                }
                Err(e) => last = refused(RefusalReason::Unreachable, e.to_string()),
            }
        }
        Err(last)
    }
}

/// Dials directly, but each stream's end reads as its tunnel ending
/// (`ConnectionAborted`), as a tunnel's streams report a lost tunnel.
pub struct TunnelLostDialer;

impl Dialer for TunnelLostDialer {
    type Stream = DirectStream;

    async fn open(&self, target: Target) -> Result<DirectStream, DialError> {
        let s = DirectDialer.open(target).await?;
        Ok(DirectStream(s.0, true))
    }
}

/// A TCP connection as a dialer's stream (and whether its end reads as a lost tunnel).
/// Its chunk reads copy into a fresh buffer each (the tunnel's hand out what they
/// received).
pub struct DirectStream(TcpStream, bool);

impl DirectStream {
    /// `n` bytes read: the end, for a stream whose end is a lost tunnel, is an error.
    fn ended(&self, n: usize) -> io::Result<usize> {
        if n == 0 && self.1 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "tunnel lost: the test's stream ended",
            ));
        }
        Ok(n)
    }
}

impl AsyncRead for DirectStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.0).poll_read(cx, buf))?;
        Poll::Ready(self.ended(n))
    }
}

impl AsyncWrite for DirectStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

impl ReadChunks for DirectStream {
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let mut buf = vec![0; max.min(64 * 1024)];
        let n = std::task::ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf))?;
        buf.truncate(n);
        if n > 0 {
            out.push(Bytes::from(buf));
        }
        Poll::Ready(self.ended(n))
    }
}

/// Refuses every open with a fixed error, and counts the attempts.
pub struct RefusingDialer {
    pub error: DialError,
    pub attempts: AtomicUsize,
}

impl RefusingDialer {
    pub fn new(error: DialError) -> Self {
        RefusingDialer {
            error,
            attempts: AtomicUsize::new(0),
        }
    }
}

impl Dialer for RefusingDialer {
    type Stream = DirectStream;

    async fn open(&self, _target: Target) -> Result<DirectStream, DialError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        Err(self.error.clone())
    }
}

/// A dialer whose opens never complete, as when the tunnel's streams all stay in use.
pub struct StuckDialer;

impl Dialer for StuckDialer {
    type Stream = DirectStream;

    async fn open(&self, _target: Target) -> Result<DirectStream, DialError> {
        std::future::pending().await
    }
}

/// A proxy serving on 127.0.0.1 until dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Client connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    _task: smol::Task<()>,
}

impl Proxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub async fn start_proxy<D: Dialer>(dialer: D, cfg: ProxyConfig) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let dialer = Arc::new(dialer);
    let cfg = Arc::new(cfg);
    let task = smol::spawn(async move {
        loop {
            let Ok((client, peer)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let dialer = dialer.clone();
            let cfg = cfg.clone();
            smol::spawn(async move {
                let sock = client.clone();
                // As the agent does: a connection whose message broke off is reset.
                if let Err(fluidity_agent::error::Error::Aborted(_)) =
                    serve_connection(client, peer, &*dialer, &cfg).await
                {
                    fluidity_runtime_smol::relay::reset_on_close(&sock);
                }
            })
            .detach();
        }
    });
    Proxy {
        addr,
        accepted,
        _task: task,
    }
}

/// FNV-1a, enough to compare large bodies in a test.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// A file in the temporary directory holding `data`; removed when dropped.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(tag: &str, data: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "fluidity-proxy-{}-{tag}-{}",
            std::process::id(),
            fnv(tag.as_bytes())
        ));
        std::fs::write(&path, data).expect("write temp file");
        TempFile(path)
    }

    /// `@path`, as curl's --data-binary wants it.
    pub fn at(&self) -> String {
        format!("@{}", self.0.display())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Deterministic test bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Runs curl (bounded by its own --max-time) off the async threads.
pub async fn curl(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    smol::unblock(move || {
        Command::new("curl")
            // An empty --noproxy overrides any NO_PROXY in the environment.
            .args(["-sS", "--max-time", "30", "--noproxy", ""])
            .args(&args)
            .output()
            .expect("run curl")
    })
    .await
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A buffered connection for the test servers and raw clients.
pub struct Conn {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl Conn {
    pub fn new(s: TcpStream) -> Self {
        Conn { s, buf: Vec::new() }
    }

    async fn more(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        match self.s.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// Bytes up to and including `pat`, or `None` at EOF.
    pub async fn until(&mut self, pat: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(pat.len()).position(|w| w == pat) {
                let rest = self.buf.split_off(i + pat.len());
                return Some(std::mem::replace(&mut self.buf, rest));
            }
            if !self.more().await {
                return None;
            }
        }
    }

    pub async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.more().await {
                return None;
            }
        }
        let rest = self.buf.split_off(n);
        Some(std::mem::replace(&mut self.buf, rest))
    }

    /// Everything until EOF.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        while self.more().await {}
        std::mem::take(&mut self.buf)
    }

    pub async fn send(&mut self, data: &[u8]) {
        self.s.write_all(data).await.expect("send");
        self.s.flush().await.expect("flush");
    }
}

/// A small HTTP/1.1 origin on 127.0.0.1 (or `bind`).
pub struct Origin {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    _task: smol::Task<()>,
}

impl Origin {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

pub async fn start_origin(name: &str) -> Origin {
    start_origin_on(name, "127.0.0.1:0")
        .await
        .expect("bind origin")
}

pub async fn start_origin_on(name: &str, bind: &str) -> std::io::Result<Origin> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let name = name.to_owned();
    let task = smol::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let name = name.clone();
            smol::spawn(async move { origin_conn(Conn::new(s), name).await }).detach();
        }
    });
    Ok(Origin {
        addr,
        connections,
        _task: task,
    })
}

struct Req {
    method: String,
    path: String,
    raw_head: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_req(c: &mut Conn) -> Option<Req> {
    let head = c.until(b"\r\n\r\n").await?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&head).ok()?;
    Some(Req {
        method: req.method?.to_owned(),
        path: req.path?.to_owned(),
        raw_head: String::from_utf8_lossy(&head).into_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    })
}

async fn read_body(c: &mut Conn, req: &Req) -> Option<Vec<u8>> {
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line = c.until(b"\r\n").await?;
            let size_text = String::from_utf8_lossy(&line);
            let size_text = size_text.trim_end().split(';').next()?.trim().to_owned();
            let size = usize::from_str_radix(&size_text, 16).ok()?;
            if size == 0 {
                // Trailer section: lines until an empty one.
                loop {
                    if c.until(b"\r\n").await?.len() == 2 {
                        return Some(body);
                    }
                }
            }
            body.extend(c.exact(size).await?);
            c.exact(2).await?;
        }
    }
    let len: usize = req
        .header("content-length")
        .map_or(Some(0), |v| v.trim().parse().ok())?;
    c.exact(len).await
}

async fn origin_conn(mut c: Conn, name: String) {
    while let Some(req) = read_req(&mut c).await {
        let path = req.path.split('?').next().unwrap_or("").to_owned();
        if req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            c.send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        let Some(body) = read_body(&mut c, &req).await else {
            return;
        };
        let respond = |status: &str, extra: &str, body: &[u8]| {
            let mut out = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(body);
            out
        };
        if path == "/hello" {
            let out = respond("200 OK", "", format!("hello from {name}\n").as_bytes());
            c.send(&out).await;
        } else if path == "/hello-then-close" {
            // Ends the connection without announcing it, as idle origins do.
            let out = respond("200 OK", "", format!("hello from {name}\n").as_bytes());
            c.send(&out).await;
            return;
        } else if path == "/echo-head" {
            let out = respond("200 OK", "", req.raw_head.as_bytes());
            c.send(&out).await;
        } else if path == "/sum" {
            let chunked = req.header("transfer-encoding").is_some();
            let text = format!("{} {:016x} chunked={chunked}\n", body.len(), fnv(&body));
            let out = respond("200 OK", "", text.as_bytes());
            c.send(&out).await;
        } else if let Some(n) = path.strip_prefix("/big/") {
            let n: usize = n.parse().unwrap_or(0);
            let data = pattern(n);
            c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
            for chunk in data.chunks(50_000) {
                c.send(format!("{:x}\r\n", chunk.len()).as_bytes()).await;
                c.send(chunk).await;
                c.send(b"\r\n").await;
            }
            c.send(b"0\r\nX-Trailer: done\r\n\r\n").await;
        } else if path == "/head" {
            // For HEAD the length describes the body a GET would have had.
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                .await;
        } else if path == "/nocontent" {
            c.send(b"HTTP/1.1 204 No Content\r\nX-Origin: yes\r\n\r\n")
                .await;
        } else if path == "/bad-chunks" {
            // Invalid coding right after the head, in the same write: on loopback the
            // proxy reads both at once, so nothing has reached its client yet.
            c.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            )
            .await;
            return;
        } else if path == "/bad-chunks-later" {
            // A valid chunk larger than any proxy buffer, so its start must be relayed
            // before the invalid chunk after it is seen.
            let data = pattern(4 << 20);
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                data.len()
            )
            .into_bytes();
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\nzz\r\n");
            c.send(&out).await;
            return;
        } else if path == "/chunks-cut" {
            // Chunked, and closed in the middle of its second chunk.
            c.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nonly",
            )
            .await;
            return;
        } else if path == "/gzip-until-close" {
            // A transfer coding that is not chunked: the body ends with the connection.
            c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZIPDATA")
                .await;
            return;
        } else if path == "/gzip-chunked" {
            // A transfer coding besides chunked, which no request asked for.
            c.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            )
            .await;
        } else if path == "/both-lengths" {
            // Chunked and a Content-Length, and the connection kept for more.
            c.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
            )
            .await;
        } else if path == "/close" {
            c.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body\n")
                .await;
            return;
        } else if path == "/ws-h2c" {
            // A switch to a protocol nobody asked for, then bytes in it.
            c.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n\
                  PRI * HTTP/2.0\r\n",
            )
            .await;
            return;
        } else if path == "/ws" && req.header("upgrade").is_some() {
            c.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .await;
            echo_until_eof(c).await;
            return;
        } else {
            let out = respond("404 Not Found", "", b"no such path\n");
            c.send(&out).await;
        }
        let _ = req.method;
    }
}

/// Echoes bytes until the peer finishes sending, then says how many and closes.
async fn echo_until_eof(mut c: Conn) {
    let mut total = std::mem::take(&mut c.buf);
    let mut count = total.len();
    if !total.is_empty() {
        c.send(&total).await;
    }
    let mut tmp = [0u8; 65536];
    loop {
        match c.s.read(&mut tmp).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count += n;
                total.clear();
                c.send(&tmp[..n]).await;
            }
        }
    }
    c.send(format!("[echoed {count} bytes]").as_bytes()).await;
    let _ = c.s.close().await;
}

/// A raw TCP server that reads until EOF, then answers with the byte count and checksum
/// and closes: it only answers if the client's half-close reached it.
pub async fn start_sink() -> (SocketAddr, smol::Task<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    let task = smol::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            smol::spawn(async move {
                let mut c = Conn::new(s);
                let data = c.read_to_close().await;
                let answer = format!("{} {:016x}", data.len(), fnv(&data));
                let _ = c.s.write_all(answer.as_bytes()).await;
                let _ = c.s.close().await;
            })
            .detach();
        }
    });
    (addr, task)
}
