//! The client side: deterministic payloads and their digests, curl, CONNECT through the
//! proxy from Rust, and the Python WebSocket client.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::origin::python;

/// Length of the repeating block behind [`payload`]: a prime, so that a shifted or
/// reordered chunk boundary never lines up with the pattern again.
const BLOCK_LEN: usize = 1_048_573;

fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        // splitmix64: every byte depends on its position.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut out = Vec::with_capacity(BLOCK_LEN + 8);
        while out.len() < BLOCK_LEN {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(BLOCK_LEN);
        out
    })
}

/// Fills `buf` with the payload bytes starting at `offset`.
pub fn payload_into(offset: u64, buf: &mut [u8]) {
    let block = block();
    let mut pos = (offset % BLOCK_LEN as u64) as usize;
    let mut filled = 0;
    while filled < buf.len() {
        let n = (BLOCK_LEN - pos).min(buf.len() - filled);
        buf[filled..filled + n].copy_from_slice(&block[pos..pos + n]);
        filled += n;
        pos = 0;
    }
}

/// The first `len` payload bytes: what the HTTP origin's `/bytes/LEN` sends.
pub fn payload(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    payload_into(0, &mut v);
    v
}

/// `len` bytes that differ for every `seed` (for many concurrent streams).
pub fn seeded_payload(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    payload_into(seed.wrapping_mul(7919), &mut v);
    v
}

/// An incremental SHA-256.
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    /// A fresh digest.
    pub fn new() -> Self {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest in lowercase hex.
    pub fn hex(self) -> String {
        hex::encode(self.0.finish().as_ref())
    }
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut s = Sha256::new();
    s.update(data);
    s.hex()
}

/// SHA-256 of the first `len` payload bytes, without holding them all.
pub fn payload_sha256(len: u64) -> String {
    let mut s = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = buf
            .len()
            .min(usize::try_from(len - off).unwrap_or(usize::MAX));
        payload_into(off, &mut buf[..n]);
        s.update(&buf[..n]);
        off += n as u64;
    }
    s.hex()
}

/// Writes the first `len` payload bytes to `path`.
pub fn write_payload_file(path: &Path, len: u64) {
    let mut f = io::BufWriter::new(std::fs::File::create(path).expect("creating a payload file"));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = buf
            .len()
            .min(usize::try_from(len - off).unwrap_or(usize::MAX));
        payload_into(off, &mut buf[..n]);
        f.write_all(&buf[..n]).expect("writing a payload file");
        off += n as u64;
    }
    f.flush().expect("writing a payload file");
}

/// What a curl run produced.
#[derive(Debug)]
pub struct Curl {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

impl Curl {
    /// Standard output as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with curl's output unless it exited 0.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "curl failed: {}\nstdout: {}",
            self.stderr,
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(2000)])
        );
        self
    }
}

/// Runs curl with `-sS`, a connect timeout and an overall `--max-time` of 120 s (a hang
/// becomes exit code 28, never a stuck test), plus `args`.
pub fn curl<I, S>(args: I) -> Curl
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new("curl")
        .args(["-sS", "--connect-timeout", "20", "--max-time", "120"])
        .args(args)
        .output()
        .expect("running curl (install it with .ci/setup-e2e.sh)");
    Curl {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `curl -x PROXY URL` with the status code appended to stdout; returns (status, body).
pub fn curl_status(proxy: &str, url: &str) -> (u16, String) {
    let out = curl(["-x", proxy, "-w", "\n%{http_code}", url]);
    let text = out.text();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let status = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl gave no status (exit {:?}): {}\n{text}",
            out.code, out.stderr
        )
    });
    (status, body.to_owned())
}

/// Sends `CONNECT target` to the proxy and reads the response head, byte by byte so that
/// none of the tunnelled bytes are taken. Returns the status and the connected socket.
pub fn connect_via(proxy: SocketAddr, target: &str) -> io::Result<(u16, TcpStream)> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    let head = read_head_bytewise(&mut s)?;
    let status = parse_status(&head)?;
    s.set_read_timeout(None)?;
    Ok((status, s))
}

/// Reads a response head up to and including its blank line, one byte at a time.
pub fn read_head_bytewise<R: Read>(r: &mut R) -> io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err(io::Error::other("response head too large"));
        }
        if r.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed in the response head: {:?}",
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The status code of a response head.
pub fn parse_status(head: &str) -> io::Result<u16> {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line in {head:?}")))
}

/// Reads until the peer closes (or errors), returning what arrived.
pub fn read_all_lossy<R: Read>(r: &mut R) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Which way the WebSocket client reaches the origin through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsVia {
    /// `GET ws://host:port/path` in absolute form with `Upgrade: websocket`.
    AbsoluteForm,
    /// `CONNECT host:port`, then the ordinary handshake inside (the library's own proxy
    /// support).
    Connect,
    /// Straight to the origin, without the proxy: what the client sees without it.
    Direct,
}

impl WsVia {
    fn arg(self) -> &'static str {
        match self {
            WsVia::AbsoluteForm => "absolute",
            WsVia::Connect => "connect",
            WsVia::Direct => "direct",
        }
    }
}

const WS_CLIENT: &str = r#"
import random, socket, sys
from websockets.sync.client import connect, ClientConnection

proxy_host, proxy_port, target, via = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
scenario = sys.argv[5]
uri = "ws://" + target + ("/ws-crash" if scenario == "crash" else "/echo")

class AbsoluteForm(ClientConnection):
    # The library speaks to the origin in origin form; through a forward proxy without
    # CONNECT the request line must carry the absolute URI instead.
    def handshake(self, *args, **kwargs):
        plain = self.protocol.connect
        def absolute():
            request = plain()
            request.path = uri
            return request
        self.protocol.connect = absolute
        return super().handshake(*args, **kwargs)

if via == "absolute":
    sock = socket.create_connection((proxy_host, proxy_port), timeout=30)
    ws = connect(uri, sock=sock, create_connection=AbsoluteForm, max_size=None,
                 compression=None, open_timeout=30)
elif via == "connect":
    ws = connect(uri, proxy="http://%s:%d" % (proxy_host, proxy_port), max_size=None,
                 compression=None, open_timeout=30)
else:
    ws = connect(uri, proxy=None, max_size=None, compression=None, open_timeout=30)

if scenario == "crash":
    # The origin echoes, then dies without a close frame when told to.
    from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
    with ws:
        ws.send("hello")
        if ws.recv(timeout=30) != "hello":
            print("MISMATCH", flush=True)
            sys.exit(1)
        ws.send("crash")
        try:
            print("MESSAGE", ws.recv(timeout=30), flush=True)
        except ConnectionClosedOK as e:
            print("closed cleanly", e.rcvd, flush=True)
        except ConnectionClosedError as e:
            # The cause is the socket's error: a reset, or none when the connection ended
            # with a FIN.
            print("closed abnormally:", "close frame received" if e.rcvd else "no close frame",
                  "(%s)" % type(e.__cause__).__name__, flush=True)
        except TimeoutError:
            print("TIMEOUT: no message and no close in 30 s", flush=True)
    sys.exit(0)

# Without compression and with random bytes, every message crosses the tunnel whole.
rng = random.Random(6455)
messages = ["hello", "second message", "x" * 70000, rng.randbytes(16384), "last"]
messages.append(rng.randbytes(1 << 20))  # many reads' worth for one frame
with ws:
    for m in messages:
        ws.send(m)
        back = ws.recv(timeout=30)
        if back != m:
            print("MISMATCH", type(m).__name__, len(m), type(back).__name__, len(back), flush=True)
            sys.exit(1)
        print("echoed", type(m).__name__, len(m), flush=True)
print("ok", len(messages), flush=True)
"#;

/// Runs the Python `websockets` client through the proxy against a WebSocket echo server
/// at `target` (`host:port`): several text and binary messages, up to 1 MiB, each echoed
/// and compared. Returns (exit code, stdout, stderr).
pub fn ws_client(proxy: SocketAddr, target: &str, via: WsVia) -> (Option<i32>, String, String) {
    run_ws_client(proxy, target, via, "echo")
}

/// Runs the Python `websockets` client against [`super::origin::AbruptOrigin`]'s
/// `/ws-crash` at `target`: one message echoed, then `crash`. Its last line of output
/// says how the session ended: `closed abnormally: no close frame (ConnectionResetError)`
/// when the connection was reset, `(NoneType)` instead when it ended with a FIN. Returns
/// (exit code, stdout, stderr).
pub fn ws_crash_client(
    proxy: SocketAddr,
    target: &str,
    via: WsVia,
) -> (Option<i32>, String, String) {
    run_ws_client(proxy, target, via, "crash")
}

fn run_ws_client(
    proxy: SocketAddr,
    target: &str,
    via: WsVia,
    scenario: &str,
) -> (Option<i32>, String, String) {
    let out = Command::new(python())
        .args(["-u", "-c", WS_CLIENT])
        .arg(proxy.ip().to_string())
        .arg(proxy.port().to_string())
        .arg(target)
        .arg(via.arg())
        .arg(scenario)
        .output()
        .expect("running the Python WebSocket client");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// SHA-256 of a file's contents, lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("opening a downloaded file");
    let mut s = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("reading a downloaded file");
        if n == 0 {
            return s.hex();
        }
        s.update(&buf[..n]);
    }
}

/// A CONNECT stream to an echo origin held open across a test, to show that the streams
/// already in the tunnel survive what the test does to others.
#[derive(Debug)]
pub struct LiveStream {
    sock: TcpStream,
    round: u64,
}

impl LiveStream {
    /// Opens the stream through `proxy` to the echo server at `echo`.
    pub fn open(proxy: SocketAddr, echo: SocketAddr) -> LiveStream {
        let (status, sock) = connect_via(proxy, &echo.to_string()).expect("CONNECT to the echo");
        assert_eq!(status, 200, "CONNECT to the echo origin");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let mut s = LiveStream { sock, round: 0 };
        s.assert_alive("opening");
        s
    }

    /// The client's socket (with its 30 s read timeout), for what a test does next.
    pub fn into_socket(self) -> TcpStream {
        self.sock
    }

    /// Sends a distinct message and checks that it comes back whole.
    pub fn assert_alive(&mut self, after: &str) {
        self.round += 1;
        let msg = seeded_payload(1_000_000 + self.round, 4096);
        self.sock
            .write_all(&msg)
            .unwrap_or_else(|e| panic!("the open stream failed after {after}: {e}"));
        let mut back = vec![0u8; msg.len()];
        self.sock
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("the open stream failed after {after}: {e}"));
        assert!(
            back == msg,
            "the open stream garbled its echo after {after}"
        );
    }
}

/// One client connection to the proxy that sends requests one after another (keep-alive).
pub struct KeptAlive {
    /// The connection.
    pub s: std::net::TcpStream,
}

impl KeptAlive {
    /// Connects to the proxy at `proxy`.
    pub fn open(proxy: std::net::SocketAddr) -> KeptAlive {
        let s = std::net::TcpStream::connect(proxy).expect("connecting to the proxy");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        KeptAlive { s }
    }

    /// Status and body of a GET of `url` (a Content-Length response).
    pub fn get(&mut self, url: &str) -> (u16, String) {
        self.request("GET", url, None)
    }

    /// Status and body of a POST of `body` to `url` (a Content-Length response).
    pub fn post(&mut self, url: &str, body: &[u8]) -> (u16, String) {
        self.request("POST", url, Some(body))
    }

    fn request(&mut self, method: &str, url: &str, body: Option<&[u8]>) -> (u16, String) {
        let host = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        let mut req = format!("{method} {url} HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
        if let Some(body) = body {
            req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body.unwrap_or_default());
        self.s.write_all(&req).expect("request");
        self.read_response()
    }

    /// Status and body of the next response (a Content-Length one).
    pub fn read_response(&mut self) -> (u16, String) {
        let head = read_head_bytewise(&mut self.s).expect("response head");
        let status = parse_status(&head).expect("status");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("a Content-Length");
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).expect("response body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Whether the proxy closed the connection plainly (EOF) rather than resetting it or
    /// sending anything.
    pub fn closed_plainly(&mut self) -> io::Result<bool> {
        let mut byte = [0u8; 1];
        Ok(self.s.read(&mut byte)? == 0)
    }
}
