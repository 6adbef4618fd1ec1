//! The HTTP forward proxy driven by the real curl and raw TCP clients, against local
//! origin servers, through a dialer that connects directly.

mod proxy_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fluidity_agent::proxy::{Credentials, DialError, ProxyConfig};
use fluidity_proto::{OpenRefusal, RefusalReason};
use proxy_support::*;

fn cfg() -> ProxyConfig {
    ProxyConfig::default()
}

const MIB5: usize = 5 * 1024 * 1024;

#[test]
fn get_is_rewritten_to_origin_form_with_hop_by_hop_fields_removed() {
    run(async {
        let origin = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let out = curl(&["-x", &proxy.url(), &origin.url("/hello")]).await;
        assert_eq!(stdout(&out), "hello from a\n", "{}", stderr(&out));

        let out = curl(&[
            "-x",
            &proxy.url(),
            "-H",
            "Proxy-Connection: keep-alive",
            "-H",
            "Connection: X-Drop",
            "-H",
            "X-Drop: private",
            "-H",
            "X-Keep: 1",
            "-H",
            "Host: wrong.example",
            &origin.url("/echo-head?q=1"),
        ])
        .await;
        let head = stdout(&out);
        assert!(
            head.starts_with("GET /echo-head?q=1 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Host: {}\r\n", origin.addr)),
            "{head}"
        );
        assert!(!head.contains("wrong.example"), "{head}");
        assert!(head.contains("X-Keep: 1\r\n"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("proxy-connection"), "{head}");
        assert!(!lower.contains("x-drop"), "{head}");
    });
}

#[test]
fn posts_5_mib_with_content_length() {
    run(async {
        let origin = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let data = pattern(MIB5);
        let file = TempFile::new("cl", &data);
        let out = curl(&[
            "-x",
            &proxy.url(),
            "-H",
            "Expect:",
            "--data-binary",
            &file.at(),
            &origin.url("/sum"),
        ])
        .await;
        assert_eq!(
            stdout(&out),
            format!("{MIB5} {:016x} chunked=false\n", fnv(&data)),
            "{}",
            stderr(&out)
        );
    });
}

#[test]
fn posts_5_mib_chunked_and_forwards_it_chunked() {
    run(async {
        let origin = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let data = pattern(MIB5);
        let file = TempFile::new("chunked", &data);
        let out = curl(&[
            "-x",
            &proxy.url(),
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect:",
            "--data-binary",
            &file.at(),
            &origin.url("/sum"),
        ])
        .await;
        assert_eq!(
            stdout(&out),
            format!("{MIB5} {:016x} chunked=true\n", fnv(&data)),
            "{}",
            stderr(&out)
        );
    });
}

#[test]
fn relays_a_5_mib_chunked_response() {
    run(async {
        let origin = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let out = curl(&["-x", &proxy.url(), &origin.url(&format!("/big/{MIB5}"))]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout.len(), MIB5);
        assert_eq!(fnv(&out.stdout), fnv(&pattern(MIB5)));
    });
}

#[test]
fn expect_100_continue_is_relayed() {
    run(async {
        let origin = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let data = pattern(200_000);
        let file = TempFile::new("expect", &data);
        let out = curl(&[
            "-v",
            "-x",
            &proxy.url(),
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &file.at(),
            &origin.url("/sum"),
        ])
        .await;
        assert!(
            stderr(&out).contains("< HTTP/1.1 100 Continue"),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            stdout(&out),
            format!("200000 {:016x} chunked=false\n", fnv(&data))
        );
    });
}

/// An interim answer is not the answer: a tunnel lost after `100 Continue` still gets the
/// client a final one (502, saying so), not a reset.
#[test]
fn a_tunnel_lost_after_100_continue_gets_a_final_502() {
    run(async {
        let origin = async_net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        let served = smol::spawn(async move {
            let (s, _) = origin.accept().await.unwrap();
            let mut c = Conn::new(s);
            c.until(b"\r\n\r\n").await.expect("the request head");
            c.send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            c.exact(5).await.expect("the body");
            // Gone: through the dialer, the tunnel ended.
        });
        let proxy = start_proxy(TunnelLostDialer, cfg()).await;
        let mut client = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        client
            .send(
                format!(
                    "POST http://{addr}/upload HTTP/1.1\r\nHost: {addr}\r\n\
                     Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
        let interim = client.until(b"\r\n\r\n").await.expect("100 Continue");
        assert!(interim.starts_with(b"HTTP/1.1 100 "), "{interim:?}");
        client.send(b"hello").await;
        served.await;
        let rest = String::from_utf8_lossy(&client.read_to_close().await).into_owned();
        assert!(
            rest.starts_with("HTTP/1.1 502 ")
                && rest.contains("the tunnel to the server ended before")
                && rest.contains("may have taken effect"),
            "{rest:?}"
        );
    });
}

#[test]
fn keep_alive_carries_requests_to_two_origins_on_one_client_connection() {
    run(async {
        let a = start_origin("a").await;
        let b = start_origin("b").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let p = proxy.url();
        let out = curl(&[
            "-x",
            &p,
            &a.url("/hello"),
            "--next",
            "-x",
            &p,
            &b.url("/hello"),
            "--next",
            "-x",
            &p,
            &b.url("/hello"),
            "--next",
            "-x",
            &p,
            &a.url("/hello"),
        ])
        .await;
        assert_eq!(
            stdout(&out),
            "hello from a\nhello from b\nhello from b\nhello from a\n",
            "{}",
            stderr(&out)
        );
        assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
        // Consecutive requests to b share one stream; a is left for b and reopened.
        assert_eq!(b.connections.load(Ordering::SeqCst), 1);
        assert_eq!(a.connections.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn head_and_204_responses_end_at_their_heads() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let p = proxy.url();
        let out = curl(&[
            "-x",
            &p,
            "-I",
            &a.url("/head"),
            "--next",
            "-x",
            &p,
            "-w",
            "%{http_code}\n",
            &a.url("/nocontent"),
            "--next",
            "-x",
            &p,
            &a.url("/hello"),
        ])
        .await;
        let text = stdout(&out);
        assert!(text.contains("Content-Length: 1000"), "{text}");
        assert!(text.contains("204\n"), "{text}");
        assert!(text.ends_with("hello from a\n"), "{text} {}", stderr(&out));
        assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(a.connections.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn close_delimited_response_ends_the_client_connection() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let p = proxy.url();
        let out = curl(&[
            "-x",
            &p,
            &a.url("/close"),
            "--next",
            "-x",
            &p,
            &a.url("/hello"),
        ])
        .await;
        assert_eq!(
            stdout(&out),
            "close-delimited body\nhello from a\n",
            "{}",
            stderr(&out)
        );
        assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn connect_tunnel_carries_http_and_honours_half_close() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let out = curl(&["-p", "-x", &proxy.url(), &a.url("/hello")]).await;
        assert_eq!(stdout(&out), "hello from a\n", "{}", stderr(&out));

        let (sink, _task) = start_sink().await;
        let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        c.send(format!("CONNECT {sink} HTTP/1.1\r\nHost: {sink}\r\n\r\n").as_bytes())
            .await;
        let head = c.until(b"\r\n\r\n").await.expect("CONNECT answer");
        let text = String::from_utf8_lossy(&head);
        // The proxy's own answer: a Date, and no length (RFC 9110 §9.3.6).
        assert!(
            text.starts_with("HTTP/1.1 200 ")
                && text.contains("\r\nDate: ")
                && !text.contains("Content-Length"),
            "{text}"
        );
        let data = pattern(300_000);
        c.send(&data).await;
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        let answer = c.read_to_close().await;
        assert_eq!(
            String::from_utf8_lossy(&answer),
            format!("300000 {:016x}", fnv(&data))
        );
    });
}

#[test]
fn websocket_upgrade_passes_through_as_raw_bytes() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        c.send(
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                a.url("/ws"),
                a.addr
            )
            .as_bytes(),
        )
        .await;
        let head = String::from_utf8(c.until(b"\r\n\r\n").await.expect("101")).unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("Upgrade: websocket\r\n"), "{head}");
        assert!(head.contains("Connection: Upgrade\r\n"), "{head}");
        c.send(b"\x81\x05hello").await;
        assert_eq!(c.exact(7).await.unwrap(), b"\x81\x05hello");
        let big = pattern(100_000);
        c.send(&big).await;
        assert_eq!(c.exact(big.len()).await.unwrap(), big);
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(c.read_to_close().await, b"[echoed 100007 bytes]");
    });
}

#[test]
fn a_switch_to_another_protocol_than_websocket_is_a_502() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            a.url("/ws-h2c"),
            a.addr
        );
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        assert!(answer.contains("Upgrade: websocket"), "{answer}");
        assert!(!answer.contains("PRI * HTTP/2.0"), "{answer}");
    });
}

/// Sends `request` on a fresh connection and returns everything until the proxy closes.
async fn raw_exchange(proxy: &Proxy, request: &[u8]) -> String {
    let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
    // The proxy may answer before reading everything; a write error is then expected.
    let _ = futures_lite::AsyncWriteExt::write_all(&mut c.s, request).await;
    String::from_utf8_lossy(&c.read_to_close().await).into_owned()
}

#[test]
fn bad_requests_get_400_and_431() {
    run(async {
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let answer = raw_exchange(&proxy, b"GARBAGE\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains("Connection: close\r\n"), "{answer}");
        assert!(answer.contains("text/plain"), "{answer}");

        let mut huge = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nX-Big: ".to_vec();
        huge.resize(1024 * 1024, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        let answer = raw_exchange(&proxy, &huge).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.contains("Connection: close\r\n"), "{answer}");

        let mut many = "GET http://127.0.0.1:1/ HTTP/1.1\r\n".to_owned();
        for i in 0..150 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let answer = raw_exchange(&proxy, many.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

        let smuggle = b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
                        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let answer = raw_exchange(&proxy, smuggle).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 ")
                && answer.contains("both Transfer-Encoding and Content-Length"),
            "{answer}"
        );
    });
}

#[test]
fn origin_form_requests_are_refused_not_served() {
    run(async {
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let out = curl(&["-w", "\n%{http_code}", &format!("{}/health", proxy.url())]).await;
        let text = stdout(&out);
        assert!(text.ends_with("\n400"), "{text}");
        assert!(text.contains("proxy"), "{text}");
        let out = curl(&[
            "-w",
            "\n%{http_code}",
            "-x",
            &proxy.url(),
            "https://127.0.0.1:1/",
        ])
        .await;
        // curl tunnels https through CONNECT; the port is closed, so the open is refused.
        assert!(!out.status.success());
    });
}

#[test]
fn refusals_become_honest_statuses() {
    run(async {
        let cases = [
            (RefusalReason::NoSuchHost, 502),
            (RefusalReason::ConnectionRefused, 502),
            (RefusalReason::Unreachable, 502),
            (RefusalReason::Other, 502),
            (RefusalReason::TimedOut, 504),
            (RefusalReason::DeniedByPolicy, 403),
            (RefusalReason::TooManyStreams, 503),
            (RefusalReason::GoingAway, 503),
        ];
        for (reason, status) in cases {
            let dialer =
                RefusingDialer::new(DialError::Refused(OpenRefusal::new(reason, "detail")));
            let proxy = start_proxy(dialer, cfg()).await;
            let out = curl(&[
                "-w",
                "\n%{http_code}",
                "-x",
                &proxy.url(),
                "http://blocked.example:8080/x",
            ])
            .await;
            let text = stdout(&out);
            assert!(text.ends_with(&format!("\n{status}")), "{reason:?}: {text}");
            assert!(text.contains("blocked.example:8080"), "{text}");
            let out = curl(&[
                "-p",
                "-w",
                "%{http_connect}",
                "-x",
                &proxy.url(),
                "http://blocked.example:8080/x",
            ])
            .await;
            assert_eq!(stdout(&out), status.to_string(), "CONNECT {reason:?}");
        }
        // A tunnel that is down for now is retried in a moment; one that cannot be made
        // until something is fixed says so, and not to retry.
        for (down, passes) in [
            (DialError::TunnelDown("reconnecting".into()), true),
            (
                DialError::TunnelUnusable("the server's certificate is not for this name".into()),
                false,
            ),
        ] {
            let proxy = start_proxy(RefusingDialer::new(down), cfg()).await;
            let out = curl(&[
                "-w",
                "\n%{http_code}",
                "-x",
                &proxy.url(),
                "http://a.example/",
            ])
            .await;
            let text = stdout(&out);
            assert!(text.ends_with("\n502") && text.contains("tunnel"), "{text}");
            assert_eq!(text.contains("retry in a moment"), passes, "{text}");
            assert_eq!(text.contains("until this is fixed"), !passes, "{text}");
        }

        // No stream in time: 504, and the answer says what the wait was for, not that the
        // origin did not answer.
        let stuck = StuckDialer;
        let proxy = start_proxy(
            stuck,
            ProxyConfig {
                dial_timeout: std::time::Duration::from_millis(200),
                ..cfg()
            },
        )
        .await;
        let out = curl(&[
            "-w",
            "\n%{http_code}",
            "-x",
            &proxy.url(),
            "http://a.example/",
        ])
        .await;
        let text = stdout(&out);
        assert!(
            text.ends_with("\n504") && text.contains("no stream to a.example:80 within 200ms"),
            "{text}"
        );
        assert!(text.contains("max_streams"), "{text}");

        // A real refused connection through the direct dialer.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let out = curl(&[
            "-w",
            "\n%{http_code}",
            "-x",
            &proxy.url(),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .await;
        assert!(stdout(&out).ends_with("\n502"), "{}", stdout(&out));
    });
}

/// A CONNECT refused for its credentials keeps its connection for the retry, unless the
/// client sent its tunnel's first bytes with it: those are no next request, and the
/// connection ends after the 407 instead of answering them 400 and refusing the retry.
#[test]
fn a_connect_refused_for_credentials_keeps_its_connection_unless_tunnel_bytes_came_along() {
    run(async {
        let a = start_origin("a").await;
        let cfg = ProxyConfig {
            auth: Some(Credentials {
                username: "u".into(),
                password: "p".into(),
            }),
            ..ProxyConfig::default()
        };
        let proxy = start_proxy(DirectDialer, cfg).await;
        let t = a.addr.to_string();
        let connect =
            |auth: &str| format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n{auth}\r\n").into_bytes();
        async fn answer(c: &mut Conn) -> String {
            let head = String::from_utf8(c.until(b"\r\n\r\n").await.expect("an answer"))
                .expect("a text head");
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |n| n.parse().expect("a length"));
            c.exact(len).await.expect("the answer's body");
            head
        }

        let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        c.send(&connect("")).await;
        assert!(answer(&mut c).await.starts_with("HTTP/1.1 407 "));
        c.send(&connect("Proxy-Authorization: Basic dTpw\r\n"))
            .await;
        let head = answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        c.send(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(c.until(b"hello from a\n").await.is_some());

        let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        let mut early = connect("");
        early.extend_from_slice(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5]);
        c.send(&early).await;
        assert!(answer(&mut c).await.starts_with("HTTP/1.1 407 "));
        let rest = c.read_to_close().await;
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    });
}

#[test]
fn proxy_credentials_are_required_when_configured() {
    run(async {
        let a = start_origin("a").await;
        let cfg = ProxyConfig {
            auth: Some(Credentials {
                username: "alice".into(),
                password: "wonder land".into(),
            }),
            ..ProxyConfig::default()
        };
        let proxy = start_proxy(DirectDialer, cfg).await;
        let out = curl(&["-D", "-", "-x", &proxy.url(), &a.url("/hello")]).await;
        let text = stdout(&out);
        assert!(text.starts_with("HTTP/1.1 407 "), "{text}");
        assert!(
            text.contains("Proxy-Authenticate: Basic realm=\"fluidity\""),
            "{text}"
        );
        let out = curl(&[
            "-x",
            &proxy.url(),
            "-U",
            "alice:wrong",
            "-w",
            "%{http_code}",
            &a.url("/hello"),
        ])
        .await;
        assert!(stdout(&out).ends_with("407"), "{}", stdout(&out));
        let out = curl(&[
            "-x",
            &proxy.url(),
            "-U",
            "alice:wonder land",
            &a.url("/echo-head"),
        ])
        .await;
        let head = stdout(&out);
        assert!(head.starts_with("GET /echo-head HTTP/1.1"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("proxy-authorization"),
            "{head}"
        );
        let out = curl(&[
            "-p",
            "-x",
            &proxy.url(),
            "-U",
            "alice:wonder land",
            &a.url("/hello"),
        ])
        .await;
        assert_eq!(stdout(&out), "hello from a\n", "{}", stderr(&out));
    });
}

#[test]
fn two_host_fields_or_none_in_http_1_1_get_400() {
    run(async {
        let proxy = start_proxy(DirectDialer, ProxyConfig::default()).await;
        for request in [
            &b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"[..],
            b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nhost: b\r\n\r\n",
        ] {
            let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
            c.send(request).await;
            let answer = String::from_utf8_lossy(&c.read_to_close().await).into_owned();
            assert!(
                answer.starts_with("HTTP/1.1 400 ") && answer.contains("more than one Host"),
                "{answer}"
            );
        }
        // None at all: 400 for an HTTP/1.1 request (RFC 9112 §3.2), not for HTTP/1.0 or
        // a CONNECT, whose target says where.
        let a = start_origin("a").await;
        let lacking = format!("GET {} HTTP/1.1\r\n\r\n", a.url("/hello"));
        let answer = raw_exchange(&proxy, lacking.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 ") && answer.contains("without a Host"),
            "{answer}"
        );
        // The proxy's own answers carry a Date, as an origin's must.
        assert!(
            answer.contains("\r\nDate: ") && answer.contains(" GMT\r\n"),
            "{answer}"
        );
        let old = format!("GET {} HTTP/1.0\r\n\r\n", a.url("/hello"));
        let answer = raw_exchange(&proxy, old.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    });
}

#[test]
fn a_silent_client_is_dropped_after_the_head_timeout() {
    run(async {
        let cfg = ProxyConfig {
            head_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        };
        let proxy = start_proxy(DirectDialer, cfg).await;
        // Part of a head: the client is there, and is told with 408.
        let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        c.send(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x").await;
        let answer = c.read_to_close().await;
        assert!(
            answer.starts_with(b"HTTP/1.1 408 Request Timeout\r\n"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // Nothing at all: closed without a word.
        let c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        let mut c = c;
        assert_eq!(c.read_to_close().await, b"");
    });
}

#[test]
fn a_kept_stream_closed_by_the_origin_is_replaced() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let p = proxy.url();
        let url = a.url("/hello-then-close");
        let out = curl(&[
            "-x", &p, &url, "--next", "-x", &p, &url, "--next", "-x", &p, &url,
        ])
        .await;
        assert_eq!(stdout(&out), "hello from a\n".repeat(3), "{}", stderr(&out));
        assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(a.connections.load(Ordering::SeqCst), 3);
    });
}

/// An origin that framed an answer with both Transfer-Encoding and Content-Length may
/// frame its next one no better: the answer reaches the client by its chunks, and the
/// next request to that origin goes over a new connection.
#[test]
fn an_origin_answering_with_two_lengths_is_not_asked_again_on_that_connection() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let p = proxy.url();
        let url = a.url("/both-lengths");
        let out = curl(&["-x", &p, &url, "--next", "-x", &p, &url]).await;
        assert_eq!(stdout(&out), "hellohello", "{}", stderr(&out));
        assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(a.connections.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn pipelined_requests_to_two_origins_are_answered_in_order() {
    run(async {
        let a = start_origin("a").await;
        let b = start_origin("b").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let mut c = Conn::new(async_net::TcpStream::connect(proxy.addr).await.unwrap());
        let body = pattern(70_000);
        let mut requests = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            a.url("/sum"),
            body.len()
        )
        .into_bytes();
        requests.extend_from_slice(&body);
        requests.extend_from_slice(
            format!(
                "GET {} HTTP/1.1\r\nHost: x\r\n\r\nGET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                b.url("/hello"),
                a.url("/hello")
            )
            .as_bytes(),
        );
        c.send(&requests).await;
        let all = String::from_utf8(c.read_to_close().await).unwrap();
        let sum = format!("70000 {:016x} chunked=false\n", fnv(&body));
        let i = all.find(&sum).expect("first answer");
        let j = all.find("hello from b\n").expect("second answer");
        let k = all.find("hello from a\n").expect("third answer");
        assert!(i < j && j < k, "{all}");
        assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 3, "{all}");
        assert!(all.contains("Connection: close\r\n"), "{all}");
    });
}

#[test]
fn http_1_0_clients_get_one_response_per_connection() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let p = proxy.url();
        let out = curl(&[
            "-0",
            "-x",
            &p,
            &a.url("/echo-head"),
            "--next",
            "-0",
            "-x",
            &p,
            &a.url("/hello"),
        ])
        .await;
        let text = stdout(&out);
        // Forwarded in the proxy's own version, with the close the client's implies.
        assert!(text.starts_with("GET /echo-head HTTP/1.1\r\n"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{text}"
        );
        assert!(text.ends_with("hello from a\n"), "{text}");
        assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn a_malformed_chunked_request_body_gets_400() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            a.url("/sum")
        );
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains("chunk"), "{answer}");
    });
}

#[test]
fn an_invalid_chunked_response_gets_502_or_ends_the_transfer_visibly() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        // Nothing of the response has reached the client: it gets a 502 saying why.
        let request = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", a.url("/bad-chunks"));
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        assert!(answer.contains("invalid chunked body"), "{answer}");
        // Part of it was relayed already: the client sees the transfer fail, not succeed.
        let out = curl(&["-x", &proxy.url(), &a.url("/bad-chunks-later")]).await;
        assert!(!out.status.success(), "{}", stderr(&out));
        assert!(!out.stdout.is_empty(), "{}", stderr(&out));
        assert!(
            pattern(4 << 20).starts_with(&out.stdout),
            "not the body's start"
        );
        // The proxy goes on serving.
        let out = curl(&["-x", &proxy.url(), &a.url("/hello")]).await;
        assert_eq!(stdout(&out), "hello from a\n", "{}", stderr(&out));
    });
}

#[test]
fn an_http_1_0_client_sees_a_chunked_response_cut_short_fail() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        // Direct, curl reports the broken chunked body.
        let direct = curl(&["-0", &a.url("/chunks-cut")]).await;
        assert!(!direct.status.success(), "{}", stderr(&direct));
        // Through the proxy an HTTP/1.0 client gets the body without its coding, ended by
        // the close: a plain close would pass for the whole response, so it is a reset.
        let out = curl(&["-0", "-x", &proxy.url(), &a.url("/chunks-cut")]).await;
        assert!(
            !out.status.success(),
            "a cut response passed for a whole one: {:?} {}",
            stdout(&out),
            stderr(&out)
        );
        assert!("helloonly".starts_with(&stdout(&out)), "{}", stdout(&out));
        // An HTTP/1.1 client keeps the chunked coding and sees the cut itself.
        let out = curl(&["-x", &proxy.url(), &a.url("/chunks-cut")]).await;
        assert!(!out.status.success(), "{}", stderr(&out));
    });
}

#[test]
fn a_transfer_coding_an_http_1_0_client_cannot_take_gets_502() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        let request = format!("GET {} HTTP/1.0\r\n\r\n", a.url("/gzip-chunked"));
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        assert!(answer.contains("transfer coding"), "{answer}");
        // An HTTP/1.1 client gets the codings as the origin sent them.
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            a.url("/gzip-chunked")
        );
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            answer.contains("Transfer-Encoding: gzip, chunked\r\n"),
            "{answer}"
        );
        assert!(answer.ends_with("3\r\nabc\r\n0\r\n\r\n"), "{answer}");
        // A coding without chunked, ended by the close: the same for an HTTP/1.0 client,
        // and no Transfer-Encoding to it even on an answer without a body.
        let request = format!("GET {} HTTP/1.0\r\n\r\n", a.url("/gzip-until-close"));
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        let request = format!("HEAD {} HTTP/1.0\r\n\r\n", a.url("/gzip-chunked"));
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(!answer.contains("Transfer-Encoding"), "{answer}");
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            a.url("/gzip-until-close")
        );
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.contains("Transfer-Encoding: gzip\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nGZIPDATA"), "{answer}");
    });
}

#[test]
fn methods_are_case_sensitive() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, cfg()).await;
        // `head` is not HEAD (RFC 9110 §9.1): the origin answers it with a body, which
        // the client must get, not wait for.
        let request = format!(
            "head {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            a.url("/hello")
        );
        let answer = raw_exchange(&proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\nhello from a\n"), "{answer}");
        // And `connect` opens no tunnel: its target is no absolute URL.
        let answer = raw_exchange(
            &proxy,
            format!("connect {} HTTP/1.1\r\nHost: x\r\n\r\n", a.addr).as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    });
}

#[test]
fn a_refused_connect_ends_the_connection() {
    run(async {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let proxy = start_proxy(DirectDialer, cfg()).await;
        // The client sends its TLS hello right behind the request, as some do: after the
        // refusal those bytes are not read as a request (a second, 400 answer).
        let mut request =
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        request.extend_from_slice(b"\x16\x03\x01\x00\x05hello");
        let answer = raw_exchange(&proxy, &request).await;
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        assert!(answer.contains("Connection: close\r\n"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    });
}
