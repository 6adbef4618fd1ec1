//! Throughput of the sans-IO core, set against the AES-128-GCM cost of the same bytes.
//!
//! Run with `cargo bench -p fluidity-proto --bench core`. It prints a table:
//!
//! - frame encode+decode rates (16 KiB DATA frames and small control frames);
//! - a 1 GiB transfer on one stream between two in-memory [`Connection`]s (agent and
//!   server, no TLS), following the run loop of the crate docs: the agent application
//!   writes, both connections transmit and take input, the server application reads and
//!   its window updates flow back. This runs both ends' cores in one thread;
//! - the same transfer through the zero-copy calls: the agent application hands shared
//!   slices of its source to `write_bytes`, the agent transmits with
//!   `poll_transmit_chunks`, the chunks are copied into the server's input buffer (the
//!   stand-in for TLS, which reads and writes every byte anyway: that copy is timed
//!   apart and left out of the core's time, and printed), and the server takes it with
//!   `handle_input_bytes`;
//! - the AES-128-GCM seal and open rates of the same 1 GiB in 16 KiB records (ring, the
//!   tunnel's crypto provider, walking a 4 MiB buffer like the transfer's source), i.e.
//!   the cheapest possible TLS cost of those bytes at the sending and at the receiving end;
//! - the rate of one plain memcpy of the same bytes, the floor of any design that copies;
//! - for each of the two APIs, the ratios core time / seal time (the goal: under
//!   10%), core time / (seal + open) time (both ends against both ends), and core time /
//!   memcpy time (how many copies' worth of work the core does).
//!
//! Both transfers are first run at 16 MiB with the bytes hashed at both ends, so a fast
//! but wrong path cannot pass.
//!
//! Each measurement runs `FLUIDITY_BENCH_RUNS` times (default 3), interleaved, and the
//! fastest run counts: on a shared machine the fastest run is the least disturbed one.
//! `FLUIDITY_BENCH_MIB` (default 1024) scales the transfer for quick checks;
//! `FLUIDITY_BENCH_ONLY=transfer` (or `=zero-copy`) runs that transfer alone (for a
//! profiler).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fluidity_proto::frame::HEADER_LEN;
use fluidity_proto::{
    Config, Connection, Credentials, Decoder, Error, ErrorCode, Event, Frame, StreamEvent,
    StreamId, Target,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const GIB: f64 = (1024 * MIB) as f64;

/// Size of the application's writes in the transfer.
const WRITE_LEN: usize = 64 * KIB;
/// TLS record payload size used for the AES-GCM reference.
const RECORD_LEN: usize = 16 * KIB;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Deterministic, incompressible-looking filler (xorshift), so nothing is special-cased.
fn filler(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ----- frames -----

/// Encodes and decodes `count` copies of `frame` through one buffer; returns the time.
fn frame_round_trips(frame: &Frame, count: usize) -> Duration {
    let mut decoder = Decoder::new(64 * KIB as u32);
    let mut buf = BytesMut::with_capacity(128 * KIB);
    let start = Instant::now();
    for _ in 0..count {
        black_box(frame).encode(&mut buf);
        match decoder.decode(&mut buf) {
            Ok(Some(f)) => {
                black_box(f);
            }
            other => panic!("frame did not round-trip: {other:?}"),
        }
    }
    let elapsed = start.elapsed();
    assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    elapsed
}

// ----- in-memory transfer -----

/// Two connections joined in memory, following the run loop of the crate docs.
struct Pair {
    now: Instant,
    agent: Connection,
    server: Connection,
    /// Drive through the zero-copy calls (`write_bytes`, `poll_transmit_chunks`,
    /// `handle_input_bytes`) instead of the copying ones.
    zero_copy: bool,
    a2s: Vec<u8>,
    s2a: Vec<u8>,
    /// Zero-copy: the chunks one side transmitted.
    chunks: Vec<Bytes>,
    /// Zero-copy: the receiving side's input buffer, as a driver would fill it from TLS.
    a2s_rx: BytesMut,
    s2a_rx: BytesMut,
    /// Zero-copy: time spent carrying agent chunks into the server's input buffer (the
    /// one copy that TLS makes anyway, by encrypting and decrypting), kept out of the
    /// core's time.
    transport: Duration,
}

impl Pair {
    fn new(config: Arc<Config>, zero_copy: bool) -> Pair {
        let now = Instant::now();
        Pair {
            now,
            agent: Connection::agent(config.clone(), Credentials::none(), now),
            server: Connection::server(config, now),
            zero_copy,
            a2s: Vec::with_capacity(512 * KIB),
            s2a: Vec::with_capacity(64 * KIB),
            chunks: Vec::with_capacity(256),
            a2s_rx: BytesMut::with_capacity(512 * KIB),
            s2a_rx: BytesMut::with_capacity(64 * KIB),
            transport: Duration::ZERO,
        }
    }

    /// Agent → server: transmit, feed. Returns whether any byte moved.
    fn flush_agent(&mut self) -> bool {
        if self.zero_copy {
            self.agent.poll_transmit_chunks(self.now, &mut self.chunks);
            let t = Instant::now();
            carry(&mut self.chunks, &mut self.a2s_rx);
            self.transport += t.elapsed();
            feed_bytes(&mut self.server, self.now, &mut self.a2s_rx)
        } else {
            self.agent.poll_transmit(self.now, &mut self.a2s);
            feed(&mut self.server, self.now, &mut self.a2s)
        }
    }

    /// Server → agent: transmit, feed. Returns whether any byte moved.
    fn flush_server(&mut self) -> bool {
        if self.zero_copy {
            // Window updates only, a few bytes: their carrying counts as the core's.
            self.server.poll_transmit_chunks(self.now, &mut self.chunks);
            carry(&mut self.chunks, &mut self.s2a_rx);
            feed_bytes(&mut self.agent, self.now, &mut self.s2a_rx)
        } else {
            self.server.poll_transmit(self.now, &mut self.s2a);
            feed(&mut self.agent, self.now, &mut self.s2a)
        }
    }
}

/// The transport of the zero-copy run: the chunks' bytes into the receiver's input
/// buffer, as TLS would deliver them after encrypting at one end and decrypting at the
/// other (a vectored write reads the chunks where they are).
fn carry(chunks: &mut Vec<Bytes>, rx: &mut BytesMut) {
    for c in chunks.drain(..) {
        rx.extend_from_slice(&c);
    }
}

/// Offers `pending` to `conn` without copying; what it did not consume stays in
/// `pending` for the next offer.
fn feed_bytes(conn: &mut Connection, now: Instant, pending: &mut BytesMut) -> bool {
    if pending.is_empty() {
        return false;
    }
    conn.handle_input_bytes(now, pending) > 0
}

/// Offers `pending` to `conn`, keeping what it did not consume (its control backlog was
/// full); the caller transmits and offers the rest again.
fn feed(conn: &mut Connection, now: Instant, pending: &mut Vec<u8>) -> bool {
    if pending.is_empty() {
        return false;
    }
    let n = conn.handle_input(now, pending);
    if n == pending.len() {
        pending.clear();
    } else {
        pending.drain(..n);
    }
    n > 0
}

fn events(conn: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| conn.poll()).collect()
}

/// Handshake, open, accept; returns the ready pair and the stream.
fn open_stream(config: Arc<Config>, zero_copy: bool) -> (Pair, StreamId) {
    let mut p = Pair::new(config, zero_copy);
    for _ in 0..8 {
        p.flush_agent();
        p.flush_server();
    }
    assert!(
        p.agent.is_ready() && p.server.is_ready(),
        "handshake failed"
    );
    events(&mut p.agent);
    events(&mut p.server);
    let id = p
        .agent
        .open(p.now, Target::parse("127.0.0.1:9").expect("valid target"))
        .expect("open");
    p.flush_agent();
    let requested = events(&mut p.server)
        .into_iter()
        .any(|e| matches!(e, Event::Stream(StreamEvent::OpenRequested { id: i, .. }) if i == id));
    assert!(requested, "server saw no open");
    p.server.accept_open(id).expect("accept");
    p.flush_server();
    assert!(
        events(&mut p.agent).contains(&Event::Stream(StreamEvent::Opened { id })),
        "agent saw no open result"
    );
    (p, id)
}

/// FNV-1a over a byte stream: the same value however the stream is cut into chunks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Result of one transfer.
struct Transfer {
    /// The cores' time: the whole loop, less the zero-copy run's transport copy.
    elapsed: Duration,
    /// Zero-copy run: the transport copy left out of `elapsed`.
    transport: Duration,
    frames_sent: u64,
    rounds: u64,
    /// Payload bytes the server copied out of its receive buffer (`Stats::rx_copied`).
    copied: u64,
    sent_hash: Fnv,
    recv_hash: Fnv,
}

/// Moves `total` bytes from agent to server on one stream, the agent writing
/// `WRITE_LEN`-byte chunks, the server reading everything it is given.
/// With `check`, both ends hash the bytes (outside any timed run: the hash is slow) so
/// that the caller can compare what was written with what was read. With `zero_copy`
/// the agent writes shared slices of `source` with `write_bytes` and both sides use the
/// zero-copy transmit and input calls.
fn transfer(
    config: Arc<Config>,
    total: usize,
    source: &Bytes,
    check: bool,
    zero_copy: bool,
) -> Transfer {
    let mut sent_hash = Fnv::new();
    let mut recv_hash = Fnv::new();
    let (mut p, id) = open_stream(config, zero_copy);
    p.transport = Duration::ZERO;
    let frames_before = p.agent.stats().frames_sent;
    let copied_before = p.server.stats().rx_copied;
    let mut written = 0usize;
    let mut read = 0usize;
    let mut finished = false;
    let mut eof = false;
    let mut rounds = 0u64;
    let start = Instant::now();
    while !eof {
        rounds += 1;
        // Agent application: write until the stream's credit is used up.
        while written < total {
            let len = WRITE_LEN.min(total - written);
            let off = written % source.len().saturating_sub(WRITE_LEN).max(1);
            let result = if zero_copy {
                p.agent
                    .send_stream(id)
                    .write_bytes(source.slice(off..off + len))
            } else {
                p.agent.send_stream(id).write(&source[off..off + len])
            };
            match result {
                Ok(n) => {
                    if check {
                        sent_hash.update(&source[off..off + n]);
                    }
                    written += n;
                }
                Err(Error::Blocked) => break,
                Err(e) => panic!("write failed: {e}"),
            }
        }
        if written == total && !finished {
            p.agent.send_stream(id).finish().expect("finish");
            finished = true;
        }
        // Agent driver: transmit (the run loop's step 1), then events and timer.
        p.flush_agent();
        events(&mut p.agent);
        black_box(p.agent.poll_timeout());
        // Server driver and application: events, read whatever arrived.
        events(&mut p.server);
        loop {
            match p.server.recv_stream(id).read(usize::MAX) {
                Ok(Some(chunk)) => {
                    if check {
                        recv_hash.update(&chunk);
                    }
                    read += black_box(chunk).len();
                }
                Ok(None) => {
                    eof = true;
                    break;
                }
                Err(Error::Blocked) => break,
                Err(e) => panic!("read failed: {e}"),
            }
        }
        black_box(p.server.poll_timeout());
        // Window updates back to the agent.
        p.flush_server();
        assert!(rounds < 1 << 26, "transfer made no progress");
    }
    let elapsed = start.elapsed().saturating_sub(p.transport);
    assert_eq!(read, total, "server read a different byte count");
    Transfer {
        elapsed,
        transport: p.transport,
        frames_sent: p.agent.stats().frames_sent - frames_before,
        copied: p.server.stats().rx_copied - copied_before,
        sent_hash,
        recv_hash,
        rounds,
    }
}

// ----- references: AES-GCM and memcpy -----

/// Bytes the references walk through, so that they touch as much memory as the transfer
/// (whose source is 4 MiB) instead of one cache-hot record.
const REFERENCE_SPAN: usize = 4 * MIB;

/// Length of an AES-GCM tag.
const TAG_LEN: usize = 16;

/// Seals, then opens, `total` bytes in `RECORD_LEN` records with AES-128-GCM (ring, the
/// tunnel's crypto provider), as TLS 1.3 does at the sending and the receiving end; returns (seal, open) times.
fn aes_gcm(total: usize, source: &[u8]) -> (Duration, Duration) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).expect("key length"));
    let records = REFERENCE_SPAN / RECORD_LEN;
    let stride = RECORD_LEN + TAG_LEN;
    let mut buf = vec![0u8; records * stride];
    for (r, rec) in buf.chunks_exact_mut(stride).enumerate() {
        rec[..RECORD_LEN].copy_from_slice(&source[r * RECORD_LEN..(r + 1) * RECORD_LEN]);
    }
    // The TLS 1.3 record header of a full application-data record, used as the AAD.
    let aad = [0x17, 0x03, 0x03, 0x40, 0x11];
    let nonce = |pass: usize, r: usize| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&((pass * records + r) as u64).to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
    let mut done = 0usize;
    let mut pass = 0usize;
    while done < total {
        let n = records.min((total - done).div_ceil(RECORD_LEN));
        let start = Instant::now();
        for (r, rec) in buf.chunks_exact_mut(stride).take(n).enumerate() {
            let (text, tag_out) = rec.split_at_mut(RECORD_LEN);
            let tag = key
                .seal_in_place_separate_tag(nonce(pass, r), Aad::from(aad), text)
                .expect("seal");
            tag_out.copy_from_slice(tag.as_ref());
        }
        seal += start.elapsed();
        let start = Instant::now();
        for (r, rec) in buf.chunks_exact_mut(stride).take(n).enumerate() {
            let plain = key
                .open_in_place(nonce(pass, r), Aad::from(aad), rec)
                .expect("open: the record was sealed with this key and nonce");
            black_box(plain);
        }
        open += start.elapsed();
        done += n * RECORD_LEN;
        pass += 1;
    }
    (seal, open)
}

/// Copies `total` bytes once, `WRITE_LEN` at a time from the 4 MiB source into a
/// 256 KiB buffer that is reused (as a socket buffer would be): the cost of touching
/// every byte once.
fn memcpy_once(total: usize, source: &[u8]) -> Duration {
    let mut dest = vec![0u8; 256 * KIB];
    let mut copied = 0usize;
    let mut src_off = 0usize;
    let mut dst_off = 0usize;
    let start = Instant::now();
    while copied < total {
        let len = WRITE_LEN.min(total - copied);
        if src_off + len > source.len() {
            src_off = 0;
        }
        if dst_off + len > dest.len() {
            dst_off = 0;
        }
        dest[dst_off..dst_off + len].copy_from_slice(&source[src_off..src_off + len]);
        black_box(&mut dest);
        copied += len;
        src_off += len;
        dst_off += len;
    }
    start.elapsed()
}

// ----- report -----

fn fastest(runs: &[Duration]) -> Duration {
    runs.iter().copied().min().unwrap_or_default()
}

fn fmt_runs(runs: &[Duration]) -> String {
    runs.iter()
        .map(|d| format!("{:.3}", secs(*d)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let runs = env_usize("FLUIDITY_BENCH_RUNS", 3).max(1);
    let total = env_usize("FLUIDITY_BENCH_MIB", 1024).max(1) * MIB;
    let source = Bytes::from(filler(4 * MIB));
    let config = Arc::new(Config {
        require_auth: false,
        ..Config::default()
    });
    let only = std::env::var("FLUIDITY_BENCH_ONLY").ok();
    if let Some(zero_copy) = match only.as_deref() {
        Some("transfer") => Some(false),
        Some("zero-copy") => Some(true),
        _ => None,
    } {
        for _ in 0..runs {
            let t = transfer(config.clone(), total, &source, false, zero_copy);
            println!(
                "transfer: {:.3} s, {:.2} GiB/s (transport copy left out: {:.3} s)",
                secs(t.elapsed),
                total as f64 / GIB / secs(t.elapsed),
                secs(t.transport)
            );
        }
        return;
    }

    // Correctness first: a smaller transfer on each path whose bytes are hashed at both
    // ends.
    let check_len = total.min(16 * MIB);
    for zero_copy in [false, true] {
        let checked = transfer(config.clone(), check_len, &source, true, zero_copy);
        assert_eq!(
            checked.sent_hash, checked.recv_hash,
            "the server read other bytes than the agent wrote (zero_copy: {zero_copy})"
        );
    }

    println!(
        "fluidity-proto core benchmark: {} MiB transfer, {} runs each (fastest counts)",
        total / MIB,
        runs
    );
    println!(
        "config: data_frame_len {} KiB, transmit_batch {} KiB, stream window {} KiB, \
         connection window {} KiB",
        config.data_frame_len as usize / KIB,
        config.transmit_batch / KIB,
        config.limits.stream_window as usize / KIB,
        config.limits.connection_window as usize / KIB
    );
    println!(
        "checked: a {} MiB transfer arrived byte-exact on both paths (FNV-1a of written \
         and read bytes)",
        check_len / MIB
    );
    println!();

    // Frames.
    let data = Frame::Data {
        id: StreamId(1),
        fin: false,
        payload: Bytes::from(source[..16 * KIB].to_vec()),
    };
    let controls = [
        Frame::WindowUpdate {
            id: StreamId(1),
            increment: 128 * 1024,
        },
        Frame::Ping {
            ack: true,
            opaque: 42,
        },
        Frame::Reset {
            id: StreamId(3),
            code: ErrorCode::CANCEL,
        },
    ];
    let data_count = total / (16 * KIB);
    let ctrl_count = 2_000_000;
    let mut data_runs = Vec::new();
    let mut ctrl_runs: Vec<Vec<Duration>> = vec![Vec::new(); controls.len()];
    for _ in 0..runs {
        data_runs.push(frame_round_trips(&data, data_count));
        for (i, c) in controls.iter().enumerate() {
            ctrl_runs[i].push(frame_round_trips(c, ctrl_count));
        }
    }

    // Transfer and references, interleaved so that all see the same machine.
    let mut transfer_runs = Vec::new();
    let mut zero_runs = Vec::new();
    let mut transport_runs = Vec::new();
    let mut seal_runs = Vec::new();
    let mut open_runs = Vec::new();
    let mut copy_runs = Vec::new();
    let mut last = None;
    let mut last_zero = None;
    for _ in 0..runs {
        let t = transfer(config.clone(), total, &source, false, false);
        transfer_runs.push(t.elapsed);
        last = Some(t);
        let z = transfer(config.clone(), total, &source, false, true);
        zero_runs.push(z.elapsed);
        transport_runs.push(z.transport);
        last_zero = Some(z.copied);
        let (seal, open) = aes_gcm(total, &source);
        seal_runs.push(seal);
        open_runs.push(open);
        copy_runs.push(memcpy_once(total, &source));
    }

    println!(
        "{:<48} {:>14} {:>10}   runs (s)",
        "measurement", "rate", "GiB/s"
    );
    let d = fastest(&data_runs);
    println!(
        "{:<48} {:>11.0} /s {:>10.2}   {}",
        "DATA 16 KiB frame encode+decode",
        data_count as f64 / secs(d),
        (data_count * (16 * KIB + HEADER_LEN)) as f64 / GIB / secs(d),
        fmt_runs(&data_runs)
    );
    for (c, r) in controls.iter().zip(&ctrl_runs) {
        let d = fastest(r);
        let name = format!("{:?} frame encode+decode", c.frame_type());
        println!(
            "{:<48} {:>11.0} /s {:>10}   {}",
            name,
            ctrl_count as f64 / secs(d),
            "-",
            fmt_runs(r)
        );
    }
    let gib_s = |d: Duration| total as f64 / GIB / secs(d);
    let core = fastest(&transfer_runs);
    let zero = fastest(&zero_runs);
    let seal = fastest(&seal_runs);
    let open = fastest(&open_runs);
    let copy = fastest(&copy_runs);
    let rows = [
        (
            format!("{} MiB stream transfer, agent+server cores", total / MIB),
            core,
            &transfer_runs,
        ),
        (
            format!("{} MiB zero-copy transfer, agent+server cores", total / MIB),
            zero,
            &zero_runs,
        ),
        (
            "  its transport copy (left out of the row above)".to_owned(),
            fastest(&transport_runs),
            &transport_runs,
        ),
        (
            "AES-128-GCM seal, 16 KiB records (ring)".to_owned(),
            seal,
            &seal_runs,
        ),
        (
            "AES-128-GCM open, 16 KiB records (ring)".to_owned(),
            open,
            &open_runs,
        ),
        (
            "memcpy, every byte copied once".to_owned(),
            copy,
            &copy_runs,
        ),
    ];
    for (name, best, all) in rows {
        println!(
            "{:<48} {:>14} {:>10.2}   {}",
            name,
            "-",
            gib_s(best),
            fmt_runs(all)
        );
    }
    if let (Some(t), Some(zero_copied)) = (last, last_zero) {
        println!(
            "transfer detail: {} frames sent by the agent, {} driver rounds, payload bytes \
             copied out of the server's receive buffer: {} (copying API), {} (zero-copy API)",
            t.frames_sent, t.rounds, t.copied, zero_copied
        );
    }
    println!();
    // The transfer runs both ends' cores (the agent's send path and the server's receive
    // path) in this one thread; carrying the bytes over TLS costs a seal at the agent and
    // an open at the server. Both comparisons are printed; the goal is stated
    // against the seal.
    let verdict = |r: f64| if r <= 0.10 { "met" } else { "MISSED" };
    let paths = [
        ("copying API (write, poll_transmit, handle_input)", core),
        (
            "zero-copy API (write_bytes, poll_transmit_chunks, handle_input_bytes)",
            zero,
        ),
    ];
    for (path, core) in paths {
        let vs_seal = secs(core) / secs(seal);
        let vs_both = secs(core) / (secs(seal) + secs(open));
        println!("{path}:");
        println!(
            "  core time / AES-GCM seal time          = {:>6.1}%  (goal < 10%: {})",
            vs_seal * 100.0,
            verdict(vs_seal)
        );
        println!(
            "  core time / (AES-GCM seal + open) time = {:>6.1}%  (both ends of the tunnel: {})",
            vs_both * 100.0,
            verdict(vs_both)
        );
        println!(
            "  core time / one memcpy of the bytes    = {:>6.2}x",
            secs(core) / secs(copy)
        );
    }
}
