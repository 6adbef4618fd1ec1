//! The SOCKS5 front end driven by curl and raw clients, against local servers.

mod proxy_support;

use std::net::Shutdown;

use async_net::TcpStream;
use fluidity_agent::proxy::{Credentials, DialError, ProxyConfig};
use fluidity_proto::{OpenRefusal, RefusalReason};
use proxy_support::*;

fn socks(proxy: &Proxy) -> String {
    proxy.addr.to_string()
}

#[test]
fn curl_with_remote_hostname_and_with_ipv4() {
    run(async {
        let a = start_origin("a").await;
        let proxy = start_proxy(DirectDialer, ProxyConfig::default()).await;
        let by_name = format!("http://localhost:{}/hello", a.addr.port());
        let out = curl(&["--socks5-hostname", &socks(&proxy), &by_name]).await;
        assert_eq!(stdout(&out), "hello from a\n", "{}", stderr(&out));
        let out = curl(&["--socks5", &socks(&proxy), &a.url("/hello")]).await;
        assert_eq!(stdout(&out), "hello from a\n", "{}", stderr(&out));
    });
}

#[test]
fn curl_username_and_password() {
    run(async {
        let a = start_origin("a").await;
        let cfg = ProxyConfig {
            auth: Some(Credentials {
                username: "bob".into(),
                password: "pw".into(),
            }),
            ..ProxyConfig::default()
        };
        let proxy = start_proxy(DirectDialer, cfg).await;
        let out = curl(&[
            "--socks5-hostname",
            &socks(&proxy),
            "-U",
            "bob:pw",
            &a.url("/hello"),
        ])
        .await;
        assert_eq!(stdout(&out), "hello from a\n", "{}", stderr(&out));
        let out = curl(&[
            "--socks5-hostname",
            &socks(&proxy),
            "-U",
            "bob:nope",
            &a.url("/hello"),
        ])
        .await;
        assert!(!out.status.success());
        assert_eq!(stdout(&out), "");
        let out = curl(&["--socks5-hostname", &socks(&proxy), &a.url("/hello")]).await;
        assert!(!out.status.success());
    });
}

/// Completes the no-auth greeting on a new connection.
async fn greeted(proxy: &Proxy) -> Conn {
    let mut c = Conn::new(TcpStream::connect(proxy.addr).await.unwrap());
    c.send(&[5, 1, 0]).await;
    assert_eq!(c.exact(2).await.unwrap(), [5, 0]);
    c
}

fn connect_ipv4(addr: std::net::SocketAddr, command: u8) -> Vec<u8> {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        panic!("not IPv4");
    };
    let mut m = vec![5, command, 0, 1];
    m.extend_from_slice(&ip.octets());
    m.extend_from_slice(&addr.port().to_be_bytes());
    m
}

#[test]
fn raw_connect_relays_with_half_close() {
    run(async {
        let (sink, _task) = start_sink().await;
        let proxy = start_proxy(DirectDialer, ProxyConfig::default()).await;
        let mut c = greeted(&proxy).await;
        // The request and the first data in one write: the proxy must not lose the data.
        let data = pattern(250_000);
        let mut first = connect_ipv4(sink, 1);
        first.extend_from_slice(&data);
        c.send(&first).await;
        let reply = c.exact(10).await.unwrap();
        assert_eq!(reply[..2], [5, 0]);
        c.s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&c.read_to_close().await),
            format!("250000 {:016x}", fnv(&data))
        );
    });
}

#[test]
fn raw_connect_to_ipv6_literal() {
    run(async {
        let Ok(origin) = start_origin_on("v6", "[::1]:0").await else {
            eprintln!("no IPv6 loopback here; the IPv6 address parsing is covered by unit tests");
            return;
        };
        let proxy = start_proxy(DirectDialer, ProxyConfig::default()).await;
        let mut c = greeted(&proxy).await;
        let mut m = vec![5, 1, 0, 4];
        m.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        m.extend_from_slice(&origin.addr.port().to_be_bytes());
        c.send(&m).await;
        assert_eq!(c.exact(10).await.unwrap()[..2], [5, 0]);
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let answer = c.until(b"hello from v6\n").await.expect("answer");
        assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));
    });
}

#[test]
fn unsupported_commands_and_address_types_get_their_reply_codes() {
    run(async {
        let proxy = start_proxy(DirectDialer, ProxyConfig::default()).await;
        for command in [2u8, 3] {
            let mut c = greeted(&proxy).await;
            c.send(&connect_ipv4("127.0.0.1:9".parse().unwrap(), command))
                .await;
            let reply = c.read_to_close().await;
            assert_eq!(reply[..2], [5, 0x07], "command {command}");
        }
        let mut c = greeted(&proxy).await;
        c.send(&[5, 1, 0, 9, 1, 2, 3]).await;
        assert_eq!(c.read_to_close().await[..2], [5, 0x08]);

        // No acceptable method: only GSSAPI offered.
        let mut c = Conn::new(TcpStream::connect(proxy.addr).await.unwrap());
        c.send(&[5, 1, 1]).await;
        assert_eq!(c.read_to_close().await, [5, 0xff]);
    });
}

#[test]
fn socks4_clients_get_socks4_refusals() {
    run(async {
        let proxy = start_proxy(DirectDialer, ProxyConfig::default()).await;
        let mut c = Conn::new(TcpStream::connect(proxy.addr).await.unwrap());
        // SOCKS4 CONNECT to 127.0.0.1:80, user id "u".
        c.send(&[4, 1, 0, 80, 127, 0, 0, 1, b'u', 0]).await;
        assert_eq!(c.read_to_close().await, [0, 0x5b, 0, 0, 0, 0, 0, 0]);
        for flag in ["--socks4", "--socks4a"] {
            let out = curl(&[flag, &socks(&proxy), "http://127.0.0.1:1/"]).await;
            assert!(!out.status.success());
            assert!(stderr(&out).contains("SOCKS4"), "{}", stderr(&out));
        }
    });
}

/// A refused client that sent more behind its request reads the refusal and then a plain
/// close, not a reset: what it sent is read and dropped, as for SOCKS4.
#[test]
fn a_refusal_ends_in_a_plain_close_though_the_client_sent_more() {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    run(async {
        let refused = OpenRefusal::new(RefusalReason::ConnectionRefused, "");
        let proxy = start_proxy(
            RefusingDialer::new(DialError::Refused(refused)),
            ProxyConfig::default(),
        )
        .await;
        let target: std::net::SocketAddr = "127.0.0.1:80".parse().unwrap();
        // A refused open, and a command that is not served (BIND).
        for (command, code) in [(1, 0x05), (2, 0x07)] {
            let mut c = greeted(&proxy).await;
            let mut m = connect_ipv4(target, command);
            m.extend_from_slice(&vec![0u8; 200_000]);
            // The proxy may close before it has read it all: a failed send is the bug too,
            // and shows below.
            let _ = c.s.write_all(&m).await;
            let mut got = Vec::new();
            let end = loop {
                let mut tmp = [0u8; 4096];
                match c.s.read(&mut tmp).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => got.extend_from_slice(&tmp[..n]),
                    Err(e) => break Err(e.kind()),
                }
            };
            assert_eq!(got, socks_reply(code), "command {command}");
            assert_eq!(end, Ok(()), "command {command}: not a plain close");
        }
    });
}

#[test]
fn refusals_map_to_socks_reply_codes() {
    run(async {
        let cases = [
            (RefusalReason::NoSuchHost, 0x04),
            (RefusalReason::ConnectionRefused, 0x05),
            (RefusalReason::Unreachable, 0x03),
            (RefusalReason::TimedOut, 0x06),
            (RefusalReason::DeniedByPolicy, 0x02),
            (RefusalReason::TooManyStreams, 0x01),
            (RefusalReason::Other, 0x01),
        ];
        for (reason, code) in cases {
            let dialer = RefusingDialer::new(DialError::Refused(OpenRefusal::new(reason, "")));
            let proxy = start_proxy(dialer, ProxyConfig::default()).await;
            let mut c = greeted(&proxy).await;
            let mut m = vec![5, 1, 0, 3, 12];
            m.extend_from_slice(b"blocked.test");
            m.extend_from_slice(&443u16.to_be_bytes());
            c.send(&m).await;
            let reply = c.read_to_close().await;
            assert_eq!(reply, socks_reply(code), "{reason:?}");
        }
        let proxy = start_proxy(
            RefusingDialer::new(DialError::TunnelDown("down".into())),
            ProxyConfig::default(),
        )
        .await;
        let out = curl(&["--socks5-hostname", &socks(&proxy), "http://a.test/"]).await;
        assert!(!out.status.success());
        assert!(stderr(&out).contains("SOCKS"), "{}", stderr(&out));
    });
}

fn socks_reply(code: u8) -> Vec<u8> {
    vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}
