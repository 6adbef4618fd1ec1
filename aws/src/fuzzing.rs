//! Entry points for fuzzing this crate's parsers of network input. Each must never panic,
//! whatever the bytes; the assertions inside are the parsers' own invariants.
//!
//! - [`auth_payload`]: the tunnel's IAM auth payload as the server receives it;
//! - [`sts_response`]: STS answers (the XML reader, `GetCallerIdentity` results, error
//!   documents, ARN normalisation);
//! - [`auth_verify`]: the server's whole verification of a payload, with STS played by a
//!   local responder that answers with fuzzer-chosen status and body.
//!
//! Not a stable API: it exists for the `fuzz/` targets and for the test below that replays
//! the checked-in corpus (`fuzz/corpus/<target>/`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::clients::sts::CallerIdentity;
use crate::http::{HttpConfig, HttpResponse};
use crate::iam_auth::{
    normalize_arn, sign_auth_request_at, AuthDenied, AuthPayload, Principal, Verifier,
    VerifierConfig, MAX_HEADERS, MAX_HEADER_NAME, MAX_HEADER_VALUE, MAX_PAYLOAD_BYTES, MAX_URL,
};
use crate::xml::{self, XmlNode};
use crate::Credentials;

/// The STS endpoint the fuzzed server verifies with. Requests reach the local responder
/// through it as a proxy, so the URL (and hence the corpus) does not depend on its port.
pub const FUZZ_STS_ENDPOINT: &str = "http://sts.fuzz.test";
/// The fuzzed server's id.
pub const FUZZ_SERVER_ID: &str = "fuzz-server";
/// The TLS exporter value of the fuzzed session.
pub const FUZZ_CHANNEL_BINDING: [u8; 32] = [0x42; 32];
/// The account the fuzzed server admits.
pub const FUZZ_ACCOUNT: &str = "123456789012";

/// The fuzzed server's clock: 2026-01-01T00:00:00Z, so that signed seeds never expire.
pub fn fuzz_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

/// A payload signed the way the agent signs it, for this server, session and clock.
pub fn signed_payload() -> AuthPayload {
    let creds = Credentials::new(
        "AKIDFUZZEXAMPLE",
        "fuzz-secret-key",
        Some("fuzz-session-token".into()),
        None,
        "fuzz",
    );
    sign_auth_request_at(
        &creds,
        "us-east-1",
        FUZZ_STS_ENDPOINT,
        FUZZ_SERVER_ID,
        &FUZZ_CHANNEL_BINDING,
        fuzz_now(),
    )
    .expect("signing a fixed request works")
}

// ----- auth payload -----

/// Decodes `data` as an auth payload; an accepted payload must respect every limit and
/// survive re-encoding unchanged, and its debug form must hide the signature.
pub fn auth_payload(data: &[u8]) {
    let Ok(p) = AuthPayload::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_PAYLOAD_BYTES);
    assert_eq!(p.method, "POST");
    assert!(p.url.len() <= MAX_URL);
    assert!(p.headers.len() <= MAX_HEADERS);
    for (k, v) in &p.headers {
        assert!(!k.is_empty() && k.len() <= MAX_HEADER_NAME && v.len() <= MAX_HEADER_VALUE);
        assert!(
            !v.contains(['\r', '\n']),
            "a header value carries a line break"
        );
    }
    let again = AuthPayload::decode(&p.encode()).expect("re-encoded payload decodes");
    assert_eq!(again, p);
    let debug = format!("{p:?}");
    if p.header("authorization").is_some_and(|v| v.len() >= 32) {
        assert!(
            debug.contains("** redacted **"),
            "Authorization not redacted"
        );
    }
}

// ----- STS answers -----

/// Parses `data` as an STS answer: the XML tree (bounded depth), the caller identity and
/// its normalised ARN, and the error document reader used for non-200 answers.
pub fn sts_response(data: &[u8]) {
    if let Ok(root) = xml::parse(data) {
        assert!(
            depth(&root) <= 32,
            "XML tree deeper than the parser's limit"
        );
        if let Some(id) = CallerIdentity::from_xml(&root) {
            let n = normalize_arn(&id.arn);
            assert!(n.len() <= id.arn.len(), "normalising made the ARN longer");
            assert_eq!(normalize_arn(&n), n, "normalisation is not idempotent");
        }
    }
    let resp = HttpResponse {
        status: 403,
        headers: vec![("x-amzn-requestid".into(), "fuzz".into())],
        body: data.to_vec(),
    };
    let err = crate::client::service_error("sts", "GetCallerIdentity", &resp);
    let _ = err.to_string();
}

fn depth(node: &XmlNode) -> usize {
    1 + node.children.iter().map(depth).max().unwrap_or(0)
}

// ----- the server's verification -----

/// What the local STS responder answers next: status and body.
static STS_ANSWER: Mutex<(u16, Vec<u8>)> = Mutex::new((200, Vec::new()));

/// Starts (once) the local STS responder on 127.0.0.1 and returns its proxy URL.
fn responder() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local address").port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                // One exchange per connection; errors end only that connection.
                let _ = answer(conn);
            }
        });
        format!("http://127.0.0.1:{port}")
    })
}

/// Serves one request (after a CONNECT, if the client tunnels) with [`STS_ANSWER`].
fn answer(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = read_request(&mut conn)?;
    if head.starts_with(b"CONNECT ") {
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
        head = read_request(&mut conn)?;
    }
    let _ = head;
    let (status, body) = STS_ANSWER.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut out = format!(
        "HTTP/1.1 {status} Fuzz\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    conn.write_all(&out)?;
    conn.flush()
}

/// Reads a request head and its Content-Length body; returns the head.
fn read_request(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 || buf.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(64 * 1024)];
    conn.read_exact(&mut body)?;
    Ok(buf)
}

/// Statuses the responder may answer with.
const STATUSES: [u16; 8] = [200, 200, 403, 400, 429, 500, 503, 302];

/// Runs the server's verification of an auth payload, STS included.
///
/// Byte 0 picks the payload: even, a correctly signed payload for this server and
/// session ([`signed_payload`]); odd, fuzzer bytes (their length in bytes 2..4). Byte 1
/// picks STS's status; the rest is STS's body. An admitted principal must belong to the
/// allowed account.
pub fn auth_verify(data: &[u8]) {
    let (mode, status, rest) = match data {
        [m, s, rest @ ..] => (*m, STATUSES[usize::from(*s) % STATUSES.len()], rest),
        _ => return,
    };
    let own;
    let (payload, body): (&[u8], &[u8]) = if mode % 2 == 0 {
        own = signed_payload().encode();
        (&own, rest)
    } else {
        let (len, rest) = match rest {
            [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
            _ => return,
        };
        rest.split_at(len.min(rest.len()))
    };
    let source = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    if let Ok(p) = verify_with(status, body, payload, source) {
        assert_eq!(status, 200, "admitted without STS saying yes");
        assert_eq!(p.account, FUZZ_ACCOUNT);
        assert!(p.arn.starts_with("arn:"));
    }
}

/// Verifies `payload` from `source` while the responder answers `status` and `body`.
fn verify_with(
    status: u16,
    body: &[u8],
    payload: &[u8],
    source: IpAddr,
) -> Result<Principal, AuthDenied> {
    // One verification at a time: the responder's answer is shared.
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    *STS_ANSWER.lock().unwrap_or_else(|e| e.into_inner()) = (status, body.to_vec());
    let mut config = VerifierConfig::new(
        FUZZ_SERVER_ID,
        FUZZ_STS_ENDPOINT,
        vec![format!("account:{FUZZ_ACCOUNT}")
            .parse()
            .expect("valid pattern")],
    );
    config.http = HttpConfig {
        proxy: Some(responder().to_string()),
        ..HttpConfig::default()
    };
    // A fresh verifier per input: its replay cache and rate limiter would otherwise make
    // the outcome depend on earlier inputs.
    let verifier = Verifier::new(config).expect("valid verifier settings");
    verifier.verify(payload, &FUZZ_CHANNEL_BINDING, source, fuzz_now())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn corpus_replays_through_auth_payload() {
        for (name, data) in corpus("auth_payload") {
            eprintln!("{name}");
            auth_payload(&data);
        }
    }

    #[test]
    fn corpus_replays_through_sts_response() {
        for (name, data) in corpus("sts_response") {
            eprintln!("{name}");
            sts_response(&data);
        }
    }

    #[test]
    fn corpus_replays_through_auth_verify() {
        for (name, data) in corpus("auth_verify") {
            eprintln!("{name}");
            auth_verify(&data);
        }
    }

    /// The harness reaches STS: a signed payload and a good answer admit the caller.
    #[test]
    fn verification_harness_admits_a_good_answer() {
        let body = format!(
            "<GetCallerIdentityResponse><GetCallerIdentityResult>\
             <Arn>arn:aws:sts::{FUZZ_ACCOUNT}:assumed-role/r/s</Arn>\
             <UserId>AROAFUZZ:s</UserId><Account>{FUZZ_ACCOUNT}</Account>\
             </GetCallerIdentityResult></GetCallerIdentityResponse>"
        );
        let p = verify_with(
            200,
            body.as_bytes(),
            &signed_payload().encode(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
        .unwrap();
        assert_eq!(p.arn, format!("arn:aws:iam::{FUZZ_ACCOUNT}:role/r"));
    }

    /// Writes the seed corpus of this crate's targets into `fuzz/corpus/`. Run by hand
    /// after a format change: `cargo test -p fluidity-aws write_seed_corpus -- --ignored`.
    #[test]
    #[ignore = "writes files; run by hand to refresh the seeds"]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        };
        let signed = signed_payload();
        write("auth_payload", "signed", &signed.encode());
        let mut extra = signed.clone();
        extra.headers.push(("x-extra".into(), "v\u{e9}".into()));
        write("auth_payload", "extra-header", &extra.encode());
        write(
            "auth_payload",
            "not-json",
            b"{\"method\":\"POST\",\"url\":1}",
        );
        let identity = format!(
            "<?xml version=\"1.0\"?>\n<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
             <GetCallerIdentityResult><Arn>arn:aws:sts::{FUZZ_ACCOUNT}:assumed-role/r/s&amp;x</Arn>\
             <UserId>AROA&#65;:s</UserId><Account>{FUZZ_ACCOUNT}</Account></GetCallerIdentityResult>\
             <ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata></GetCallerIdentityResponse>"
        );
        let user = format!(
            "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:iam::{FUZZ_ACCOUNT}:user/u</Arn>\
             <UserId>AIDA</UserId><Account>{FUZZ_ACCOUNT}</Account></GetCallerIdentityResult></GetCallerIdentityResponse>"
        );
        let error = "<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code>\
             <Message>The request signature we calculated does not match the signature you provided.</Message>\
             </Error><RequestId>r-2</RequestId></ErrorResponse>";
        let json_error = r#"{"__type":"com.amazon#ThrottlingException","message":"Rate exceeded"}"#;
        write("sts_response", "assumed-role", identity.as_bytes());
        write("sts_response", "user", user.as_bytes());
        write("sts_response", "error", error.as_bytes());
        write("sts_response", "json-error", json_error.as_bytes());
        write(
            "auth_verify",
            "admitted",
            &[&[0u8, 0][..], identity.as_bytes()].concat(),
        );
        write(
            "auth_verify",
            "user-admitted",
            &[&[0u8, 1][..], user.as_bytes()].concat(),
        );
        write(
            "auth_verify",
            "signature-rejected",
            &[&[0u8, 2][..], error.as_bytes()].concat(),
        );
        write(
            "auth_verify",
            "throttled",
            &[&[0u8, 4][..], json_error.as_bytes()].concat(),
        );
        let encoded = signed.encode();
        let len = u16::try_from(encoded.len()).unwrap().to_be_bytes();
        write(
            "auth_verify",
            "own-payload",
            &[&[1u8, 0][..], &len, &encoded, identity.as_bytes()].concat(),
        );
        for target in ["auth_payload", "sts_response", "auth_verify"] {
            for entry in std::fs::read_dir(root.join(target)).unwrap() {
                let data = std::fs::read(entry.unwrap().path()).unwrap();
                match target {
                    "auth_payload" => auth_payload(&data),
                    "sts_response" => sts_response(&data),
                    _ => auth_verify(&data),
                }
            }
        }
    }
}
