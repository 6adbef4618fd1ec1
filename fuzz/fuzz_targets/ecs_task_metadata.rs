//! The server's reading of the ECS task metadata v4 `/task` document: the whole
//! `task_metadata` call (HTTP GET, size limit, JSON, TaskARN check) against a local
//! responder on 127.0.0.1 that answers with the fuzzer's bytes.
#![no_main]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Mutex, OnceLock};

use fluidity_server::aws::discover::{
    is_well_formed_arn, resource_name, task_metadata, ArnSource, ServerIdentity,
};

/// What the responder answers next.
static BODY: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Starts (once) the responder and returns the metadata base URL.
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
        format!("http://127.0.0.1:{port}/v4/fuzz")
    })
}

/// Reads a request head and answers 200 with [`BODY`].
fn answer(mut conn: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 || head.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let body = BODY.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    conn.write_all(&out)?;
    conn.flush()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    *BODY.lock().unwrap_or_else(|e| e.into_inner()) = data.to_vec();
    let Ok(md) = task_metadata(responder()) else {
        return;
    };
    // An accepted document names a usable task and came from these bytes.
    assert!(is_well_formed_arn(&md.task_arn));
    assert!(std::str::from_utf8(data).is_ok());
    let listed: usize = md
        .containers
        .iter()
        .flat_map(|c| &c.networks)
        .map(|n| n.ipv4_addresses.len())
        .sum();
    assert!(md.private_ips().len() <= listed);
    let cluster = resource_name(&md.cluster).to_owned();
    assert!(md.cluster.ends_with(&cluster));
    let id = ServerIdentity {
        arn: md.task_arn.clone(),
        source: ArnSource::TaskMetadata,
        task: Some(md),
    };
    assert_eq!(id.cluster().is_some(), !cluster.is_empty());
    let _ = id.service();
});
