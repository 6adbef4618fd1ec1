//! ECS task metadata v4, served locally: `GET {uri}/task` answers the task document, as
//! the ECS agent does at `ECS_CONTAINER_METADATA_URI_V4` inside a task.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// A metadata endpoint on 127.0.0.1; stops on drop.
#[derive(Debug)]
pub struct MetadataServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

impl MetadataServer {
    /// Serves `task` at `/v4/test/task`.
    pub fn start(task: Value) -> MetadataServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the metadata endpoint");
        let addr = listener.local_addr().expect("its address");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stop.clone(), requests.clone());
        let body = task.to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = answer(conn, &body);
                }
            }
        });
        MetadataServer {
            addr,
            stop,
            requests,
        }
    }

    /// The value of `ECS_CONTAINER_METADATA_URI_V4`.
    pub fn url(&self) -> String {
        format!("http://{}/v4/test", self.addr)
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn answer(conn: TcpStream, body: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/v4/test/task" {
        ("200 OK", body)
    } else {
        ("404 Not Found", "{}")
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}
