//! Entry points for fuzzing this crate's parsers of network input. Each must never panic,
//! whatever the bytes; the assertions inside are the parsers' own invariants.
//!
//! - [`auth_payload`]: the tunnel's IAM auth payload as the server receives it;
//! - [`sts_response`]: STS answers (the XML reader, `GetCallerIdentity` results, error
//!   documents, ARN normalisation);
//! - [`auth_verify`]: the server's whole verification of a payload, with STS played by a
//!   local responder that answers with fuzzer-chosen status and body;
//! - [`control_event`]: the Lambda events the control functions receive;
//! - [`control_local_request`]: the local control host's HTTP request reader, over a socket;
//! - [`control_types`]: the control functions' JSON request and answer bodies;
//! - [`ca_csr`]: the CA function's CSR policy, and signing with a fixed CA;
//! - [`aws_answers`]: the answers of the AWS APIs the control functions and their
//!   clients read (ECS DescribeTasks and DescribeServices, EC2 DescribeNetworkInterfaces,
//!   CloudWatch GetMetricStatistics, DynamoDB GetItem and the agent-IP record, Secrets
//!   Manager GetSecretValue, CreateSecret and PutSecretValue, a function URL's answer);
//! - [`aws_credentials`]: what the credential providers read (the container and instance
//!   metadata credentials, the metadata service's role listing and session token, STS
//!   AssumeRole, RFC 3339 expiry times) and the shared config and credentials files.
//!
//! Not a stable API: it exists for the `fuzz/` targets and for the test below that replays
//! the checked-in corpus (`fuzz/corpus/<target>/`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use fluidity_runtime_smol::pki::{self, CaBundle};
use fluidity_runtime_smol::tls::PeerIdentity;

use crate::clients::sts::CallerIdentity;
use crate::control::ca;
use crate::control::client::explain;
use crate::control::handlers::{parse_body, MAX_BODY_LEN};
use crate::control::lambda::{function_url_response, parse_event, EventKind};
use crate::control::local;
use crate::control::types::{
    CertRole, CertificateRequest, CertificateResponse, ErrorResponse, Function, KillRequest,
    KillResponse, QueryRequest, QueryResponse, SleepResponse, WakeRequest, WakeResponse,
};
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

// ----- the control functions' AWS answers -----

/// The table the fuzzed agent-IP records are read from, which their errors name.
const FUZZ_TABLE: &str = "fuzz-table";

/// The function URL the fuzzed answers come from; errors name it without its query.
const FUZZ_FUNCTION_URL: &str = "https://fuzz.lambda-url.eu-west-1.on.aws/wake?fuzz-query";

/// Reads `data` as each answer the control functions and their clients decode: as JSON,
/// the ECS DescribeTasks and DescribeServices answers, the DynamoDB GetItem answer and
/// the agent-IP record in its item, and the Secrets Manager GetSecretValue (with the CA
/// secret it may hold), CreateSecret and PutSecretValue answers; as XML, the EC2
/// DescribeNetworkInterfaces and CloudWatch GetMetricStatistics answers; as bytes, a
/// function URL's answer.
///
/// An agent-IP record stored again reads back unchanged; a secret's `Debug` form shows no
/// value, and its binary value is the base64 it came as; a function URL's answer is the
/// body's JSON (`null` for a blank body), and its errors do not quote the URL's query.
pub fn aws_answers(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = crate::clients::ecs::tasks_answer(&v);
        let _ = crate::clients::ecs::services_answer(&v);
        dynamodb_answer(&v);
        secrets_answer(&v);
    }
    if let Ok(root) = xml::parse(data) {
        let _ = crate::clients::ec2::network_interfaces(&root);
        if let Ok(points) = crate::clients::cloudwatch::datapoints(&root) {
            assert!(
                points.windows(2).all(|w| w[0].timestamp <= w[1].timestamp),
                "datapoints out of order"
            );
        }
    }
    match crate::clients::lambda_url::function_url_answer(FUZZ_FUNCTION_URL, data) {
        Ok(serde_json::Value::Null) => assert!(
            data.iter().all(u8::is_ascii_whitespace)
                || serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| v.is_null())
        ),
        Ok(v) => assert_eq!(Some(v), serde_json::from_slice(data).ok()),
        Err(crate::Error::MalformedResponse { operation, .. }) => {
            assert_eq!(operation, crate::http::redact_url(FUZZ_FUNCTION_URL));
        }
        Err(e) => panic!("a function URL's answer failed otherwise: {e}"),
    }
}

/// The GetItem answer in `v`, and the agent-IP record in its item.
fn dynamodb_answer(v: &serde_json::Value) {
    use crate::clients::dynamodb::{attr_n, get_item_answer, get_n};
    use crate::control::agent_ip::{agent_ip_item, agent_ip_record};
    let item = match get_item_answer(v.clone()) {
        Ok(Some(item)) => item,
        Ok(None) => {
            assert!(v.get("Item").is_none_or(serde_json::Value::is_null));
            return;
        }
        Err(_) => return,
    };
    for name in item.keys() {
        if let Some(n) = get_n(&item, name) {
            let again = crate::clients::dynamodb::Item::from_iter([(name.clone(), attr_n(n))]);
            assert_eq!(get_n(&again, name), Some(n));
        }
    }
    let id = crate::control::ServerId::new("fuzz-cluster", "fuzz-service");
    match agent_ip_record(&item, FUZZ_TABLE, &id) {
        Ok(record) => {
            let stored = agent_ip_item(&id, &record);
            let again = agent_ip_record(&stored, FUZZ_TABLE, &id).expect("a stored record reads");
            assert_eq!(again, record, "a record changed when stored again");
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("item fuzz-cluster/fuzz-service of table fuzz-table"),
                "{text}"
            );
        }
    }
}

/// The Secrets Manager answers in `v`, and the CA secret a GetSecretValue answer holds.
fn secrets_answer(v: &serde_json::Value) {
    use crate::clients::secrets::{
        create_secret_answer, get_secret_value_answer, put_secret_value_answer, SecretValue,
    };
    let _ = create_secret_answer(v);
    let _ = put_secret_value_answer(v);
    let Ok(secret) = get_secret_value_answer(v.clone()) else {
        return;
    };
    let shown = format!(
        "{:?}",
        SecretValue {
            arn: String::new(),
            name: String::new(),
            version_id: String::new(),
            ..secret.clone()
        }
    );
    assert_eq!(
        shown,
        r#"SecretValue { arn: "", name: "", version_id: "", value: "** redacted **" }"#
    );
    // (Serde also reads a struct from an array of its fields, in order: the base64 is
    // compared only when it came by name.)
    if let (Some(binary), true) = (&secret.secret_binary, v.is_object()) {
        assert_eq!(
            Some(
                base64::engine::general_purpose::STANDARD
                    .encode(binary)
                    .as_str()
            ),
            v.get("SecretBinary").and_then(serde_json::Value::as_str),
            "SecretBinary is not the base64 of the decoded value"
        );
    }
    if let Some(text) = &secret.secret_string {
        let _ = ca::parse_ca_secret(text);
    }
}

// ----- credentials -----

/// Reads `data` as each thing a credential provider decodes, and as the shared files:
///
/// - as JSON, the container and instance-metadata credentials answer, and what a
///   `credential_process` prints (accepted only with `Version` 1);
/// - as XML, the STS AssumeRole answer;
/// - as text, an RFC 3339 time, the metadata service's role listing, its session-token
///   answer (the first line as the TTL header, the rest as the body; and all as the
///   body), and both the config and the credentials file.
///
/// Accepted credentials have a key id and a secret key, all parts printable ASCII, sign
/// a request whose every header can be sent, and show neither the secret nor the token
/// in their `Debug` form; their expiry is the answer's `Expiration` as read alone. A
/// parsed time written back in RFC 3339 reads as itself to the microsecond. A role name
/// fits in a URL path; a session token fits in a header and lives no longer than asked.
/// Profiles have names, their properties have lower-case names, and written back as a
/// credentials file they read back unchanged.
pub fn aws_credentials(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        for provider in ["ecs-container", "imds"] {
            if let Ok(c) = crate::chain::metadata_credentials(data, provider) {
                check_credentials(&c);
                let expiration = v.get("Expiration").and_then(serde_json::Value::as_str);
                assert_eq!(c.expiry(), expiration.and_then(crate::chain::parse_rfc3339));
                assert!(v
                    .get("Code")
                    .is_none_or(|c| c.is_null() || c.as_str() == Some("Success")));
            }
        }
    }
    if let Ok(c) = crate::chain::process_credentials(data) {
        check_credentials(&c);
        let v: serde_json::Value = serde_json::from_slice(data).expect("accepted output is JSON");
        assert_eq!(
            v.get("Version").and_then(serde_json::Value::as_u64),
            Some(1)
        );
        let expiration = v.get("Expiration").and_then(serde_json::Value::as_str);
        assert_eq!(c.expiry(), expiration.and_then(crate::chain::parse_rfc3339));
    }
    if let Ok(root) = xml::parse(data) {
        if let Ok(c) = crate::clients::sts::assume_role_credentials(&root) {
            check_credentials(&c);
            assert!(c.session_token().is_some() && c.expiry().is_some());
        }
    }
    let text = String::from_utf8_lossy(data);
    rfc3339_round_trip(&text);
    if let Ok(role) = crate::chain::instance_role(&text) {
        assert!(!role.is_empty() && role.len() <= 64, "{role:?}");
        assert_eq!(Some(role), text.lines().next().map(str::trim));
        let url =
            format!("http://169.254.169.254/latest/meta-data/iam/security-credentials/{role}");
        assert!(url.parse::<ureq::http::Uri>().is_ok(), "{url}");
    }
    let (first, rest) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let ttl = String::from_utf8_lossy(first);
    for (body, header) in [(rest, Some(&*ttl)), (data, None)] {
        if let Ok((token, lifetime)) = crate::imds::session_token(body, header) {
            assert!(!token.is_empty() && token.len() <= 1024);
            assert!(
                ureq::http::HeaderValue::from_str(&token).is_ok(),
                "{token:?}"
            );
            assert!(lifetime <= Duration::from_secs(21_600));
        }
    }
    profiles(&text);
}

/// Checks credentials a provider accepted; see [`aws_credentials`].
fn check_credentials(c: &Credentials) {
    let usable = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic());
    assert!(usable(c.access_key_id()) && usable(c.secret_access_key()));
    assert!(c.session_token().is_none_or(usable));
    // The Debug form is the same whatever the secret and the token.
    let other = Credentials::new(
        c.access_key_id(),
        "other secret",
        c.session_token().map(|_| "other token".to_string()),
        c.expiry(),
        c.provider(),
    );
    assert_eq!(format!("{c:?}"), format!("{other:?}"));
    let url = "https://sts.amazonaws.com/";
    let mut headers = vec![("host".to_string(), "sts.amazonaws.com".to_string())];
    let signer = crate::sign::Signer {
        creds: c,
        region: "us-east-1",
        service: "sts",
        time: fuzz_now(),
        payload_hash: crate::sign::PayloadHash::Implicit,
    };
    crate::sign::sign_headers(
        &signer,
        "POST",
        url,
        &mut headers,
        b"Action=GetCallerIdentity",
    )
    .expect("accepted credentials sign");
    for (name, value) in &headers {
        assert!(
            ureq::http::HeaderValue::from_str(value).is_ok(),
            "header {name} cannot be sent"
        );
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let auth = header("authorization").expect("an Authorization header");
    assert!(auth.starts_with(&format!(
        "AWS4-HMAC-SHA256 Credential={}/",
        c.access_key_id()
    )));
    assert_eq!(
        header("x-amz-security-token").map(String::as_str),
        c.session_token()
    );
}

/// A time `text` parses to, written back in RFC 3339 (microseconds), reads as itself to
/// the microsecond, and writing that gives the same text.
fn rfc3339_round_trip(text: &str) {
    use aws_smithy_types::date_time::Format;
    let Some(t) = crate::chain::parse_rfc3339(text) else {
        return;
    };
    let Ok(written) = aws_smithy_types::DateTime::from(t).fmt(Format::DateTime) else {
        // RFC 3339 allows year 0, which the writer does not.
        let year_1 = SystemTime::UNIX_EPOCH - Duration::from_secs(62_135_596_800);
        assert!(t < year_1, "{text:?} parsed but does not format");
        return;
    };
    let again = crate::chain::parse_rfc3339(&written).expect("a written time parses");
    let drift = t.duration_since(again).expect("writing does not round up");
    assert!(drift < Duration::from_micros(1), "{text:?} -> {written}");
    assert_eq!(
        aws_smithy_types::DateTime::from(again)
            .fmt(Format::DateTime)
            .ok(),
        Some(written)
    );
}

/// Checks `text` read as the config file and as the credentials file; see
/// [`aws_credentials`].
fn profiles(text: &str) {
    let profiles = crate::profile::merge_profiles(Some(text), Some(text));
    let mut written = String::new();
    for (name, props) in &profiles {
        assert!(
            !name.is_empty() && name.trim() == name && !name.contains([']', '\n']),
            "profile name {name:?}"
        );
        written.push_str(&format!("[{name}]\n"));
        for (k, v) in props {
            assert!(
                !k.is_empty()
                    && k.trim() == k
                    && *k == k.to_ascii_lowercase()
                    && !k.contains(['=', '\n']),
                "property name {k:?}"
            );
            assert!(v.trim() == v && !v.contains('\n'), "value {v:?}");
            written.push_str(&format!("{k} = {v}\n"));
        }
    }
    assert_eq!(
        crate::profile::merge_profiles(None, Some(&written)),
        profiles,
        "written back:\n{written}"
    );
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

// ----- the control plane -----

/// Reads `data` as a Lambda event (JSON) the way the control functions do: a function-URL
/// request, a scheduled event or a direct invocation. A function-URL event is recognised
/// only by `requestContext.http`, a direct invocation's body is the event itself as JSON,
/// and the function-URL answer built for it carries a body that reads back as JSON of the
/// same shape.
pub fn control_event(data: &[u8]) {
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let is_url = event.pointer("/requestContext/http").is_some();
    match parse_event(&event) {
        Ok(inv) => {
            match inv.kind {
                EventKind::FunctionUrl => {
                    assert!(is_url, "a function-URL event without its context")
                }
                EventKind::Scheduled => assert!(!is_url && inv.body.is_empty()),
                EventKind::Direct => {
                    assert!(!is_url && inv.source_ip.is_none());
                    if !event.is_null() {
                        serde_json::from_slice::<serde_json::Value>(&inv.body)
                            .expect("a direct invocation's body is JSON");
                    }
                }
            }
            if inv.kind != EventKind::FunctionUrl {
                assert_eq!(inv.source_ip, None, "an address without a function URL");
                assert_eq!(inv.caller_arn, None, "a caller without a function URL");
            }
        }
        Err(e) => {
            assert!(is_url, "only function-URL events are refused: {e}");
            assert_eq!(e.status, 400);
        }
    }
    let answer = function_url_response(400, &event);
    let body = answer["body"]
        .as_str()
        .expect("the answer's body is a string");
    // Only the shape is compared: serde_json parses floats fast rather than exactly, so a
    // float may come back one unit in the last place off.
    let again: serde_json::Value = serde_json::from_str(body).expect("the answer's body is JSON");
    assert_eq!(again.is_object(), event.is_object());
    assert_eq!(again.is_array(), event.is_array());
}

/// One exchange at a time with [`local_listener`]: an accept must get its own connection.
static SERIAL_LOCAL: Mutex<()> = Mutex::new(());

/// The local control host's listener for [`control_local_request`], on 127.0.0.1.
fn local_listener() -> &'static TcpListener {
    static LISTENER: OnceLock<TcpListener> = OnceLock::new();
    LISTENER.get_or_init(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1"))
}

/// Sends `data` to the local control host's request reader over a real socket on
/// 127.0.0.1 (then closes the sending side) and reads one request from it. An accepted
/// request has a method and a path, a body within the limit, and a head that fitted in
/// the head limit.
pub fn control_local_request(data: &[u8]) {
    // Well beyond the reader's limits (16 KiB head, 64 KiB body), and small enough that
    // the write below never waits for the reader.
    let data = &data[..data.len().min(96 * 1024)];
    let _serial = SERIAL_LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    let listener = local_listener();
    let addr = listener.local_addr().expect("local address");
    let mut client = TcpStream::connect(addr).expect("connect to 127.0.0.1");
    let (mut server, _) = listener.accept().expect("accept on 127.0.0.1");
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    client.write_all(data).expect("write to 127.0.0.1");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shut down the sending side");
    let Ok(req) = local::read_request(&mut server) else {
        return;
    };
    assert!(!req.method.is_empty());
    assert!(req.body.len() <= MAX_BODY_LEN);
    // The body is taken from what follows the head, and the head is read 4 KiB at a
    // time until it is complete or past the limit.
    assert!(req.body.len() < data.len());
    assert!(
        data.len() - req.body.len() <= local::MAX_HEAD_LEN + 4096,
        "a head longer than the limit was accepted"
    );
    assert!(
        data.windows(req.body.len().max(1))
            .any(|w| req.body.is_empty() || w == req.body),
        "the body is not the bytes sent"
    );
    let _ = local::signed_for_lambda(req.authorization.as_deref());
    let _ = req
        .path
        .split('?')
        .next()
        .map(|p| p.trim_matches('/').parse::<Function>());
}

/// Checks that `T` decoded from `value` encodes and decodes back to itself.
fn round_trip<T>(value: &serde_json::Value) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let t: T = serde_json::from_value(value.clone()).ok()?;
    let text = serde_json::to_string(&t).expect("a decoded message encodes");
    let again: T = serde_json::from_str(&text).expect("an encoded message decodes");
    assert_eq!(again, t, "{text}");
    Some(t)
}

/// Decodes `data` as each JSON message of the control functions: the answers as
/// [`ControlClient`](crate::control::client::ControlClient) decodes them (from the JSON
/// value the function URL returned), the request bodies as the handlers read them, and a
/// refusal's body as the client explains it. Every decoded message must survive
/// encode → decode unchanged.
pub fn control_types(data: &[u8]) {
    let _ = parse_body::<WakeRequest>(data);
    let _ = parse_body::<QueryRequest>(data);
    let _ = parse_body::<KillRequest>(data);
    if let Ok(serde_json::Value::Object(_)) = serde_json::from_slice(data) {
        // An object decodes as any of the empty request bodies (unknown fields ignored).
        assert!(parse_body::<WakeRequest>(data).is_ok());
    }
    let body = String::from_utf8_lossy(data).into_owned();
    let explained = explain(crate::Error::HttpStatus {
        url: "http://127.0.0.1/ca".into(),
        status: 400,
        body: body.clone(),
    });
    match explained {
        crate::Error::HttpStatus { status, .. } => assert_eq!(status, 400),
        other => panic!("explain changed the error's kind: {other}"),
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    round_trip::<WakeResponse>(&value);
    round_trip::<QueryResponse>(&value);
    round_trip::<KillResponse>(&value);
    round_trip::<SleepResponse>(&value);
    round_trip::<ErrorResponse>(&value);
    if let Some(resp) = round_trip::<CertificateResponse>(&value) {
        let _ = ca::remaining(&resp, fuzz_now());
    }
    if let Some(req) = round_trip::<CertificateRequest>(&value) {
        let _ = ca::check_request(&req, 90);
    }
}

/// The CA the fuzzed CA function signs with (made once).
fn fuzz_ca() -> &'static CaBundle {
    static CA: OnceLock<CaBundle> = OnceLock::new();
    CA.get_or_init(|| {
        pki::generate_ca("fluidity fuzz CA", Duration::from_secs(400 * 86400))
            .expect("a CA is generated")
    })
}

/// Runs a CSR through the CA function's policy and, if it passes, signs it with a fixed
/// CA.
///
/// Byte 0 picks the role (bit 0) and whether a validity is asked for (bit 1), byte 1 the
/// validity in days. The rest is the CSR: PEM as is when it starts with `-----`, else
/// DER, wrapped in PEM. A request the policy admits names a well-formed ARN and as many
/// IP SANs as the role needs, and the certificate issued for it names exactly what the
/// CSR named.
pub fn ca_csr(data: &[u8]) {
    let [flags, days, csr @ ..] = data else {
        return;
    };
    let role = if flags & 1 == 0 {
        CertRole::Agent
    } else {
        CertRole::Server
    };
    let csr = if csr.starts_with(b"-----") {
        String::from_utf8_lossy(csr).into_owned()
    } else {
        der_to_pem(csr)
    };
    let req = CertificateRequest {
        csr,
        role,
        validity_days: (flags & 2 != 0).then_some(u32::from(*days)),
    };
    let max_days = 90;
    let Ok(validity) = ca::check_request(&req, max_days) else {
        return;
    };
    assert!(validity > Duration::ZERO && validity <= Duration::from_secs(90 * 86400));
    let names = pki::csr_names(&req.csr).expect("an admitted CSR has names");
    let cn = names
        .common_name
        .as_deref()
        .expect("an admitted CSR has a CN");
    assert!(ca::check_arn(cn).is_ok());
    assert!(names.dns_sans.is_empty());
    assert_eq!(names.ip_sans.len(), role.ip_san_count());
    // Signing can still refuse (a CSR whose signature does not verify); what it issues
    // must name what was asked.
    if let Ok(resp) = ca::sign(fuzz_ca(), &req, max_days) {
        let der = pem_to_der(&resp.certificate).expect("the issued certificate is PEM");
        let issued = PeerIdentity::from_der(&der).expect("the issued certificate parses");
        assert_eq!(issued, names);
    }
}

/// `der` as a PEM certificate request.
fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}

/// The DER inside a one-block PEM document.
fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
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
    fn corpus_replays_through_aws_answers() {
        for (name, data) in corpus("aws_answers") {
            eprintln!("{name}");
            aws_answers(&data);
        }
    }

    #[test]
    fn corpus_replays_through_aws_credentials() {
        for (name, data) in corpus("aws_credentials") {
            eprintln!("{name}");
            aws_credentials(&data);
        }
    }

    /// The credential seeds reach the checks: each is accepted by what it was written for.
    #[test]
    fn credential_seeds_are_accepted() {
        let seed = |name: &str| {
            corpus("aws_credentials")
                .into_iter()
                .find(|(path, _)| path.ends_with(&format!("/{name}")))
                .unwrap_or_else(|| panic!("no seed {name}"))
                .1
        };
        for name in ["container-credentials", "imds-credentials"] {
            let c = crate::chain::metadata_credentials(&seed(name), "imds").unwrap();
            assert!(c.expiry().is_some() && c.session_token().is_some());
        }
        let root = xml::parse(&seed("assume-role")).unwrap();
        crate::clients::sts::assume_role_credentials(&root).unwrap();
        for name in ["rfc3339", "rfc3339-leap-second"] {
            let text = String::from_utf8(seed(name)).unwrap();
            assert!(crate::chain::parse_rfc3339(&text).is_some(), "{name}");
        }
        let role = String::from_utf8(seed("imds-role")).unwrap();
        assert_eq!(
            crate::chain::instance_role(&role).unwrap(),
            "fluidity-agent-role"
        );
        let token = seed("imds-token");
        let (ttl, body) = token.split_at(token.iter().position(|b| *b == b'\n').unwrap());
        let ttl = std::str::from_utf8(ttl).unwrap();
        assert_eq!(
            crate::imds::session_token(&body[1..], Some(ttl)).unwrap().1,
            Duration::from_secs(21_600)
        );
        let config = String::from_utf8(seed("config-file")).unwrap();
        let credentials = String::from_utf8(seed("credentials-file")).unwrap();
        let profiles = crate::profile::merge_profiles(Some(&config), Some(&credentials));
        assert_eq!(profiles["tunnel"]["external_id"], "x#y");
        assert_eq!(profiles["ci"]["aws_access_key_id"], "AKIAFUZZCI");
        assert_eq!(profiles["ci"]["aws_secret_access_key"], "s");
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

    /// STS busy (throttled by any of its names, or 429) makes the verifier unavailable,
    /// not the caller's signature rejected: agents are told to retry, not to fix their
    /// credentials.
    #[test]
    fn a_throttled_sts_is_unavailable_not_a_rejected_signature() {
        let error = |code: &str| {
            format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>\
                 <Message>no</Message></Error><RequestId>r</RequestId></ErrorResponse>"
            )
        };
        let payload = signed_payload().encode();
        let source = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        for (status, code, unavailable) in [
            (400, "Throttling", true),
            (400, "ThrottlingException", true),
            (400, "RequestLimitExceeded", true),
            (429, "TooManyRequests", true),
            (403, "InvalidClientTokenId", false),
            (403, "SignatureDoesNotMatch", false),
        ] {
            let got = verify_with(status, error(code).as_bytes(), &payload, source);
            match got {
                Err(AuthDenied::StsUnreachable(_)) => assert!(unavailable, "{code}"),
                Err(AuthDenied::SignatureRejected { .. }) => assert!(!unavailable, "{code}"),
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn corpus_replays_through_control_event() {
        for (name, data) in corpus("control_event") {
            eprintln!("{name}");
            control_event(&data);
        }
    }

    #[test]
    fn corpus_replays_through_control_local_request() {
        for (name, data) in corpus("control_local_request") {
            eprintln!("{name}");
            control_local_request(&data);
        }
    }

    #[test]
    fn corpus_replays_through_control_types() {
        for (name, data) in corpus("control_types") {
            eprintln!("{name}");
            control_types(&data);
        }
    }

    #[test]
    fn corpus_replays_through_ca_csr() {
        for (name, data) in corpus("ca_csr") {
            eprintln!("{name}");
            ca_csr(&data);
        }
    }

    /// The CA harness reaches signing: a CSR within policy is signed, one outside is not.
    #[test]
    fn ca_harness_signs_within_policy() {
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let csr = pki::create_csr(SEED_ARN, &[ip]).unwrap().csr_pem;
        let req = CertificateRequest {
            csr: csr.clone(),
            role: CertRole::Agent,
            validity_days: Some(7),
        };
        let resp = ca::sign(fuzz_ca(), &req, 90).unwrap();
        let issued = PeerIdentity::from_der(&pem_to_der(&resp.certificate).unwrap()).unwrap();
        assert_eq!(issued.ip_sans, vec![ip]);
        let server = CertificateRequest {
            role: CertRole::Server,
            ..req
        };
        assert!(ca::check_request(&server, 90).is_err());
        // The DER form the target wraps reads as the same request.
        let wrapped = der_to_pem(&pem_to_der(&csr).unwrap());
        assert_eq!(
            pki::csr_names(&wrapped).unwrap(),
            pki::csr_names(&csr).unwrap()
        );
    }

    /// The local-host harness reads a request sent over its socket.
    #[test]
    fn local_request_harness_reads_a_request() {
        let _serial = SERIAL_LOCAL.lock().unwrap_or_else(|e| e.into_inner());
        let listener = local_listener();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client
            .write_all(b"POST /wake?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let req = local::read_request(&mut server).unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/wake?x=1")
        );
        assert_eq!(req.body, b"{}");
    }

    /// The server ARN the control seeds name.
    const SEED_ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task/fluidity/0123456789abcdef";

    /// Writes the seed corpus of the control-plane targets into `fuzz/corpus/`. Run by
    /// hand after a format change:
    /// `cargo test -p fluidity-aws write_control_seed_corpus -- --ignored`.
    #[test]
    #[ignore = "writes files; run by hand to refresh the seeds"]
    fn write_control_seed_corpus() {
        use serde_json::json;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        };
        let agent_ip: IpAddr = "203.0.113.9".parse().unwrap();
        let server_ip: IpAddr = "198.51.100.7".parse().unwrap();
        let agent_csr = pki::create_csr(SEED_ARN, &[agent_ip]).unwrap().csr_pem;
        let server_csr = pki::create_csr(SEED_ARN, &[server_ip, agent_ip])
            .unwrap()
            .csr_pem;
        let agent_req = CertificateRequest {
            csr: agent_csr.clone(),
            role: CertRole::Agent,
            validity_days: None,
        };
        let ca_body = serde_json::to_string(&agent_req).unwrap();

        // Lambda events, in the shapes AWS sends.
        let url_event = |method: &str, body: &str, b64: bool| {
            json!({
                "version": "2.0",
                "routeKey": "$default",
                "rawPath": "/",
                "rawQueryString": "",
                "headers": { "content-type": "application/json", "host": "abc.lambda-url.eu-west-1.on.aws" },
                "requestContext": {
                    "accountId": "anonymous",
                    "apiId": "abc",
                    "domainName": "abc.lambda-url.eu-west-1.on.aws",
                    "http": { "method": method, "path": "/", "protocol": "HTTP/1.1",
                              "sourceIp": "203.0.113.9", "userAgent": "fluidity" },
                    "requestId": "r-1",
                    "time": "01/Jan/2026:00:00:00 +0000",
                    "timeEpoch": 1_767_225_600_000u64
                },
                "body": body,
                "isBase64Encoded": b64,
            })
        };
        let event = |name: &str, v: serde_json::Value| {
            write(
                "control_event",
                name,
                serde_json::to_string_pretty(&v).unwrap().as_bytes(),
            )
        };
        event("url-wake", url_event("POST", "{}", false));
        event("url-ca", url_event("POST", &ca_body, false));
        event(
            "url-base64",
            url_event(
                "POST",
                &base64::engine::general_purpose::STANDARD.encode(&ca_body),
                true,
            ),
        );
        event("url-bad-base64", url_event("POST", "not base64!", true));
        event("url-get", url_event("GET", "", false));
        event(
            "url-ipv6",
            json!({ "requestContext": { "http": { "method": "post", "sourceIp": "::ffff:203.0.113.9" } } }),
        );
        event(
            "scheduled",
            json!({
                "version": "0",
                "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
                "detail-type": "Scheduled Event",
                "source": "aws.events",
                "account": "123456789012",
                "time": "2026-01-01T00:00:00Z",
                "region": "eu-west-1",
                "resources": ["arn:aws:events:eu-west-1:123456789012:rule/fluidity-sleep"],
                "detail": {}
            }),
        );
        event("direct-ca", serde_json::to_value(&agent_req).unwrap());
        event("direct-empty", json!({}));
        event("direct-null", serde_json::Value::Null);

        // Requests to the local control host.
        let auth = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc";
        let request = |name: &str, method: &str, path: &str, extra: &str, body: &str| {
            let text = format!(
                "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:9000\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
                body.len()
            );
            write("control_local_request", name, text.as_bytes());
        };
        request("wake", "POST", "/wake", "", "{}");
        request(
            "query-signed",
            "POST",
            "/query?x=1",
            &format!("authorization: {auth}\r\n"),
            "",
        );
        request("ca", "POST", "/ca", "", &ca_body);
        request("get-kill", "GET", "/kill", "", "");
        write(
            "control_local_request",
            "chunked",
            b"POST /sleep HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        );
        write(
            "control_local_request",
            "too-long-body",
            b"POST /wake HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n{}",
        );
        write(
            "control_local_request",
            "short-body",
            b"POST /wake HTTP/1.1\r\ncontent-length: 10\r\n\r\n{}",
        );

        // The control functions' bodies and answers.
        let ca = fuzz_ca();
        let signed = ca::sign(ca, &agent_req, 90).unwrap();
        let types = |name: &str, v: serde_json::Value| {
            write("control_types", name, v.to_string().as_bytes())
        };
        types(
            "wake-response",
            json!({ "status": "starting", "server_arn": SEED_ARN, "server_public_ip": "198.51.100.7",
                    "agent_public_ip_as_seen": "203.0.113.9", "desired_count": 1, "changed": true }),
        );
        types(
            "query-response",
            json!({ "status": "running", "server_ip": "198.51.100.7", "server_ip_kind": "public",
                    "server_arn": SEED_ARN, "agent_public_ip": "203.0.113.9", "desired_count": 1,
                    "task_status": "RUNNING", "detail": "ready" }),
        );
        types(
            "kill-response",
            json!({ "status": "stopping", "desired_count": 0, "changed": true }),
        );
        types(
            "sleep-response",
            json!({ "action": "scaled_to_zero", "reason": "idle for 900 s", "idle_timeout_secs": 900 }),
        );
        types(
            "error-response",
            json!({ "error": "csr_refused", "message": "the CN \"x\" is not a well-formed ARN" }),
        );
        types(
            "certificate-request",
            serde_json::to_value(&agent_req).unwrap(),
        );
        types(
            "certificate-request-server",
            json!({ "csr": server_csr, "role": "server", "validity_days": 7 }),
        );
        types(
            "certificate-response",
            serde_json::to_value(&signed).unwrap(),
        );
        write("control_types", "empty-body", b" \r\n");

        // CSRs for the CA: PEM and DER, within and outside the policy.
        let der = |pem: &str| pem_to_der(pem).unwrap();
        let csr = |name: &str, flags: u8, days: u8, body: &[u8]| {
            write("ca_csr", name, &[&[flags, days][..], body].concat())
        };
        csr("agent-pem", 0, 0, agent_csr.as_bytes());
        csr("agent-der", 2, 30, &der(&agent_csr));
        csr("server-der", 3, 7, &der(&server_csr));
        csr("server-pem-too-long", 3, 200, server_csr.as_bytes());
        csr("agent-with-two-ips", 0, 0, &der(&server_csr));
        let no_arn = pki::create_csr("fluidity-agent", &[agent_ip])
            .unwrap()
            .csr_pem;
        csr("cn-not-an-arn", 0, 0, &der(&no_arn));
        let unspecified = pki::create_csr(SEED_ARN, &["0.0.0.0".parse().unwrap()])
            .unwrap()
            .csr_pem;
        csr("unspecified-ip", 0, 0, &der(&unspecified));
        let v6 = pki::create_csr(SEED_ARN, &["2001:db8::1".parse().unwrap(), agent_ip])
            .unwrap()
            .csr_pem;
        csr("server-ipv6", 1, 0, &der(&v6));

        for (target, run) in [
            ("control_event", control_event as fn(&[u8])),
            ("control_local_request", control_local_request),
            ("control_types", control_types),
            ("ca_csr", ca_csr),
        ] {
            for (_, data) in corpus(target) {
                run(&data);
            }
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
        write(
            "aws_answers",
            "describe-tasks",
            br#"{"tasks":[{"taskArn":"arn:aws:ecs:eu-west-1:123456789012:task/c/1","lastStatus":"RUNNING","desiredStatus":"RUNNING","group":"service:s","attachments":[{"type":"ElasticNetworkInterface","details":[{"name":"networkInterfaceId","value":"eni-1"},{"name":"privateIPv4Address","value":"10.0.0.5"}]}]}],"failures":[{"arn":"x","reason":"MISSING"}]}"#,
        );
        write(
            "aws_answers",
            "describe-services",
            br#"{"services":[{"serviceName":"s","desiredCount":1,"runningCount":1,"pendingCount":0,"status":"ACTIVE"}],"failures":[]}"#,
        );
        write(
            "aws_answers",
            "network-interfaces",
            b"<DescribeNetworkInterfacesResponse><networkInterfaceSet><item><networkInterfaceId>eni-1</networkInterfaceId>\
              <status>in-use</status><privateIpAddress>10.0.0.5</privateIpAddress><association><publicIp>203.0.113.7</publicIp>\
              </association><subnetId>subnet-1</subnetId><vpcId>vpc-1</vpcId></item></networkInterfaceSet></DescribeNetworkInterfacesResponse>",
        );
        write(
            "aws_answers",
            "datapoints",
            b"<GetMetricStatisticsResponse><GetMetricStatisticsResult><Datapoints><member><Timestamp>2026-12-07T10:05:00Z</Timestamp>\
              <Maximum>1.0</Maximum><Unit>None</Unit></member><member><Timestamp>2026-12-07T10:00:00Z</Timestamp><Maximum>0.0</Maximum>\
              </member></Datapoints><Label>ActiveTunnels</Label></GetMetricStatisticsResult></GetMetricStatisticsResponse>",
        );
        write(
            "aws_answers",
            "get-item-agent-ip",
            br#"{"Item":{"server_id":{"S":"fluidity/tunnel"},"agent_ip":{"S":"203.0.113.9"},"updated_at":{"N":"1767225600"},"ttl":{"N":"1767229200"}}}"#,
        );
        write("aws_answers", "get-item-none", b"{}");
        write(
            "aws_answers",
            "get-secret-value",
            br#"{"ARN":"arn:aws:secretsmanager:eu-west-1:123456789012:secret:fluidity/ca-AbCdEf","Name":"fluidity/ca","VersionId":"v-1","SecretString":"{\"ca_cert_pem\":\"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\",\"ca_key_pem\":\"\"}","VersionStages":["AWSCURRENT"],"CreatedDate":1.767225600E9}"#,
        );
        write(
            "aws_answers",
            "get-secret-value-binary",
            br#"{"ARN":"arn:aws:secretsmanager:eu-west-1:123456789012:secret:b-AbCdEf","Name":"b","VersionId":"v-2","SecretBinary":"AAEC/w=="}"#,
        );
        write(
            "aws_answers",
            "put-secret-value",
            br#"{"ARN":"arn:aws:secretsmanager:eu-west-1:123456789012:secret:b-AbCdEf","Name":"b","VersionId":"v-3","VersionStages":["AWSCURRENT"]}"#,
        );
        write(
            "aws_answers",
            "function-url-answer",
            br#"{"status":"running","server_ip":"198.51.100.7","server_ip_kind":"public","desired_count":1}"#,
        );
        write("aws_answers", "function-url-blank", b" \r\n");
        // Serde reads a struct from an array of its fields too.
        write("aws_answers", "secret-as-array", br#"["","","","",""]"#);
        for (_, data) in corpus("aws_answers") {
            aws_answers(&data);
        }

        // What the credential providers read.
        write(
            "aws_credentials",
            "container-credentials",
            br#"{"RoleArn":"arn:aws:iam::123456789012:role/fluidity-agent","AccessKeyId":"ASIAFUZZEXAMPLE","SecretAccessKey":"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY","Token":"IQoJb3JpZ2luX2VjEFUZZ+/=","Expiration":"2026-01-01T06:00:00Z"}"#,
        );
        write(
            "aws_credentials",
            "imds-credentials",
            br#"{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"ASIAFUZZEXAMPLE","SecretAccessKey":"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY","Token":"IQoJb3JpZ2luX2VjEFUZZ+/=","Expiration":"2026-01-01T06:00:00.123456Z"}"#,
        );
        write(
            "aws_credentials",
            "imds-failure",
            br#"{"Code":"AssumeRoleUnauthorizedAccess","Message":"EC2 cannot assume the role","LastUpdated":"2026-01-01T00:00:00Z"}"#,
        );
        write(
            "aws_credentials",
            "assume-role",
            b"<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
              <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/r/fluidity-1</Arn><AssumedRoleId>AROAFUZZ:fluidity-1</AssumedRoleId></AssumedRoleUser>\
              <Credentials><AccessKeyId>ASIAFUZZEXAMPLE</AccessKeyId><SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY</SecretAccessKey>\
              <SessionToken>IQoJb3JpZ2luX2VjEFUZZ+/=</SessionToken><Expiration>2026-01-01T01:00:00Z</Expiration></Credentials>\
              </AssumeRoleResult><ResponseMetadata><RequestId>r-3</RequestId></ResponseMetadata></AssumeRoleResponse>",
        );
        write("aws_credentials", "rfc3339", b"1985-04-12T23:20:50.52Z");
        write(
            "aws_credentials",
            "rfc3339-leap-second",
            b"2016-12-31T23:59:60Z",
        );
        write("aws_credentials", "imds-role", b"fluidity-agent-role\n");
        write(
            "aws_credentials",
            "imds-token",
            b"21600\nAQAEAFUZZEXAMPLEtokenAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==",
        );
        write(
            "aws_credentials",
            "config-file",
            b"# the shared config file\n[default]\nregion = eu-west-1\noutput=json\n\n\
              [profile tunnel]\nrole_arn = arn:aws:iam::123456789012:role/fluidity ; the role\n\
              source_profile = default\nexternal_id = x#y\ns3 =\n  max_concurrent_requests = 20\n\
              [sso-session s]\nsso_region = eu-west-1\n",
        );
        write(
            "aws_credentials",
            "credentials-file",
            b"[default]\r\naws_access_key_id = AKIAFUZZEXAMPLE\r\n\
              aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\r\n\
              ; a comment\r\n[ci]\r\nAWS_ACCESS_KEY_ID=AKIAFUZZCI\r\naws_secret_access_key\t=\ts\t# note\r\n",
        );
        for (_, data) in corpus("aws_credentials") {
            aws_credentials(&data);
        }
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
