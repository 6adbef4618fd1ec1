//! Entry points for fuzzing the proxy's parsers of network input. Each must never panic,
//! whatever the bytes; the checks inside are the parsers' own invariants.

use fluidity_runtime_smol::relay::MAX_READ_CHUNKS;
use fluidity_runtime_smol::testing::{Batches, Trickle};
use futures_lite::future::block_on;

use super::chunked::ChunkedDecoder;
use super::head::{self, Framing};
use super::io::{
    copy_chunked, copy_exact, copy_unchunked, pipe, read_head, Inbound, SharedStream, Source,
};
use super::socks5;

/// Parses `data` as a request head and, if complete, its framing and target.
pub fn fuzz_http_request_head(data: &[u8]) {
    if let Ok(Some((req, len))) = head::parse_request_head(data) {
        assert!(len <= data.len() && len <= head::MAX_HEAD_LEN);
        let _ = head::request_framing(&req);
        if let Ok(abs) = head::parse_absolute_target(req.target()) {
            assert!(abs.path.starts_with('/'));
        }
    }
}

/// Parses `data` as a response head and, if complete, its framing for GET and HEAD.
pub fn fuzz_http_response_head(data: &[u8]) {
    if let Ok(Some((resp, len))) = head::parse_response_head(data) {
        assert!(len <= data.len() && len <= head::MAX_HEAD_LEN);
        let _ = head::response_framing("GET", &resp);
        assert_eq!(
            head::response_framing("HEAD", &resp),
            Ok(head::Framing::Empty)
        );
    }
}

/// Decodes `data` as a chunked body, split where its first byte says, and checks that
/// the split does not change the result.
pub fn fuzz_chunked(data: &[u8]) {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let whole = decode(&[body]);
    let at = usize::from(split).min(body.len());
    let parts = decode(&[&body[..at], &body[at..]]);
    assert_eq!(whole, parts);
}

fn decode(pieces: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), super::chunked::ChunkedError> {
    let mut dec = ChunkedDecoder::new();
    let mut out = Vec::new();
    let mut total = 0;
    for piece in pieces {
        let mut rest = *piece;
        while !rest.is_empty() && !dec.is_done() {
            let step = dec.feed(rest)?;
            assert!(step.consumed <= rest.len() && step.data.end <= step.consumed);
            out.extend_from_slice(&rest[step.data]);
            total += step.consumed;
            rest = &rest[step.consumed..];
            if step.consumed == 0 {
                break;
            }
        }
    }
    Ok((out, total, dec.is_done()))
}

/// Reads `data` as an origin's answers to GET requests, as the proxy relays them, once
/// from a buffered reader and once from a tunnel stream whose chunks are cut as the first
/// byte says, as many a read as the second says, into a client that takes at most as
/// many bytes a write as the third says (0: all): every message and error must come out
/// the same, byte for byte. Read once more as for an HTTP/1.0 client, each chunked body
/// must come out as its payload alone (the chunked copy's body, decoded).
pub fn fuzz_http_response_stream(data: &[u8]) {
    let [cut, per_read, per_write, input @ ..] = data else {
        return;
    };
    let sizes = [usize::from(cut % 16) + 1, usize::from(cut / 16) * 97 + 1];
    let per_read = usize::from(*per_read) % MAX_READ_CHUNKS + 1;
    let per_write = match per_write {
        0 => usize::MAX,
        n => usize::from(*n),
    };
    let whole = read_responses(&mut Inbound::with_capacity(input, 64), per_write, false);
    let mut stream = SharedStream::new(Batches::cut(input, &sizes, per_read));
    let chunked = read_responses(&mut stream.halves().0, per_write, false);
    assert_eq!(whole, chunked);

    let mut stream = SharedStream::new(Batches::cut(input, &sizes, per_read));
    let unchunked = read_responses(&mut stream.halves().0, per_write, true);
    let decoded: Vec<_> = whole
        .into_iter()
        .map(|r| {
            r.map(|(status, was_chunked, body)| match was_chunked {
                true => match decode(&[&body]) {
                    Ok((payload, _, true)) => (status, true, payload),
                    other => panic!("a chunked body that was copied whole decodes: {other:?}"),
                },
                false => (status, false, body),
            })
        })
        .collect();
    assert_eq!(unchunked, decoded);
}

/// A response as read: its status, whether its body was chunked, and its body; or why
/// reading stopped.
type ReadResponse = Result<(u16, bool, Vec<u8>), String>;

/// Each response (its body's payload alone when `unchunk`), until the input ends or
/// something fails.
fn read_responses<S: Source>(from: &mut S, per_write: usize, unchunk: bool) -> Vec<ReadResponse> {
    let mut out = Vec::new();
    loop {
        let resp = match block_on(read_head(from, head::parse_response_head)) {
            Ok(Some(r)) => r,
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(format!("{e:?}")));
                return out;
            }
        };
        let mut body = Trickle::new(per_write);
        let framing = head::response_framing("GET", &resp);
        let copied = match framing {
            Ok(Framing::Empty) => Ok(0),
            Ok(Framing::Length(n)) => {
                block_on(copy_exact(from, &mut body, &mut Vec::new(), n)).map(|()| n)
            }
            Ok(Framing::Chunked) if unchunk => {
                block_on(copy_unchunked(from, &mut body, &mut Vec::new()))
            }
            Ok(Framing::Chunked) => {
                block_on(copy_chunked(from, &mut body, &mut Vec::new(), &|_| true))
            }
            Ok(Framing::UntilClose) => block_on(pipe(from, &mut body)),
            Err(why) => {
                out.push(Err(why.to_string()));
                return out;
            }
        };
        match copied {
            Ok(n) => {
                assert_eq!(n, body.out.len() as u64);
                out.push(Ok((resp.status, framing == Ok(Framing::Chunked), body.out)));
            }
            Err(e) => {
                out.push(Err(format!("{e:?}")));
                return out;
            }
        }
        if framing == Ok(Framing::UntilClose) {
            return out;
        }
    }
}

/// Parses `data` as each SOCKS5 message in turn.
pub fn fuzz_socks5(data: &[u8]) {
    if let Ok(Some((_, len))) = socks5::parse_greeting(data) {
        assert!(len <= data.len());
    }
    if let Ok(Some((_, len))) = socks5::parse_user_pass(data) {
        assert!(len <= data.len());
    }
    if let Ok(Some((req, len))) = socks5::parse_request(data) {
        assert!(len <= data.len());
        let _ = req.target();
    }
}

/// Text that users and clients hand the agent and the server: a CONNECT target, a
/// `Proxy-Authorization` value, an egress rule, a server address, and the agent's and
/// the server's configuration files.
pub fn fuzz_settings_text(data: &[u8]) {
    let creds = super::Credentials {
        username: "user".into(),
        password: "pa:ss w\u{f6}rd".into(),
    };
    let _ = creds.matches_basic(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(target) = fluidity_proto::Target::parse(text) {
        assert!(fluidity_proto::Target::parse(&target.to_string()).is_some());
    }
    let _ = text.parse::<fluidity_server::egress::EgressRule>();
    let _ = crate::tunnel::ServerAddr::parse(text);
    let _ = toml::from_str::<crate::config::AgentConfig>(text);
    let _ = toml::from_str::<fluidity_server::ServerConfig>(text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every file of `fuzz/corpus/<target>/`; the corpus must not be empty.
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        files.sort();
        let out: Vec<_> = files
            .into_iter()
            .map(|p| {
                let data = std::fs::read(&p).expect("corpus file");
                (p.display().to_string(), data)
            })
            .collect();
        assert!(!out.is_empty(), "no corpus in {}", dir.display());
        out
    }

    #[test]
    fn corpus_replays_through_settings_text() {
        for (name, data) in corpus("settings_text") {
            eprintln!("{name}");
            fuzz_settings_text(&data);
        }
        // The seeds are good examples, so that the fuzzer starts from text that parses.
        let seed = |n: &str| {
            let (_, data) = corpus("settings_text")
                .into_iter()
                .find(|(p, _)| p.ends_with(n))
                .unwrap();
            String::from_utf8(data).unwrap()
        };
        toml::from_str::<crate::config::AgentConfig>(&seed("agent-config")).unwrap();
        toml::from_str::<fluidity_server::ServerConfig>(&seed("server-config")).unwrap();
        seed("egress-rule")
            .parse::<fluidity_server::egress::EgressRule>()
            .unwrap();
        assert!(fluidity_proto::Target::parse(&seed("ipv6-target")).is_some());
        let creds = crate::proxy::Credentials {
            username: "user".into(),
            password: "pa:ss w\u{f6}rd".into(),
        };
        assert!(creds.matches_basic(seed("basic-credentials").as_bytes()));
    }

    #[test]
    fn corpus_replays_through_http_request_head() {
        for (name, data) in corpus("http_request_head") {
            eprintln!("{name}");
            fuzz_http_request_head(&data);
        }
    }

    #[test]
    fn corpus_replays_through_http_response_head() {
        for (name, data) in corpus("http_response_head") {
            eprintln!("{name}");
            fuzz_http_response_head(&data);
        }
    }

    #[test]
    fn corpus_replays_through_chunked_body() {
        for (name, data) in corpus("chunked_body") {
            eprintln!("{name}");
            fuzz_chunked(&data);
        }
    }

    #[test]
    fn corpus_replays_through_http_response_stream() {
        for (name, data) in corpus("http_response_stream") {
            eprintln!("{name}");
            fuzz_http_response_stream(&data);
        }
    }

    #[test]
    fn corpus_replays_through_socks5() {
        for (name, data) in corpus("socks5") {
            eprintln!("{name}");
            fuzz_socks5(&data);
        }
    }

    proptest! {
        #[test]
        fn entry_points_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz_http_request_head(&data);
            fuzz_http_response_head(&data);
            fuzz_chunked(&data);
            fuzz_socks5(&data);
            fuzz_http_response_stream(&data);
        }

        #[test]
        fn heads_with_arbitrary_header_text_never_panic(
            target in "[ -~]{0,40}",
            name in "[!-~]{1,20}",
            value in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut req = format!("GET {target} HTTP/1.1\r\n{name}: ").into_bytes();
            req.extend_from_slice(&value);
            req.extend_from_slice(b"\r\n\r\n");
            fuzz_http_request_head(&req);
            let mut resp = format!("HTTP/1.1 200 OK\r\n{name}: ").into_bytes();
            resp.extend_from_slice(&value);
            resp.extend_from_slice(b"\r\n\r\n");
            fuzz_http_response_head(&resp);
        }
    }
}
