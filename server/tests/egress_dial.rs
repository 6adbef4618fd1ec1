//! The dialler and resolver against real sockets on 127.0.0.1.
//!
//! Name lookups here never leave the machine: `localhost` comes from `/etc/hosts`, numeric
//! names such as `2130706433` are parsed by `getaddrinfo` itself, and `bad!name.invalid` is
//! refused by glibc's host-name syntax check (`res_hnok`) with `EAI_NONAME` before any query
//! is sent. A name such as `nonexistent.invalid` is *not* used: glibc would send it to the
//! nameserver in `/etc/resolv.conf` (on the development machines a private address), and
//! where that server is unreachable the answer is `EAI_AGAIN` or the lookup deadline, which
//! the resolver reports as `TimedOut`, not `NoSuchHost` (see the `resolve` module docs).

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::time::Duration;

use async_io::Timer;
use async_net::TcpListener;
use fluidity_proto::{Host, RefusalReason, Target};
use fluidity_server::egress::resolve::resolve;
use fluidity_server::egress::{Dialer, EgressPolicy, PortRange, Resolver};
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};

/// Runs a test future with a hard limit, so that a hang fails instead of blocking CI.
fn run<T>(fut: impl Future<Output = T>) -> T {
    smol::block_on(fut.or(async {
        Timer::after(Duration::from_secs(30)).await;
        panic!("test did not finish within 30 s")
    }))
}

fn local_policy() -> EgressPolicy {
    EgressPolicy::default().allowing("127.0.0.1/32".parse().unwrap())
}

fn literal(port: u16) -> Target {
    Target::new(Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), port)
}

fn name(host: &str, port: u16) -> Target {
    Target::new(Host::name(host).unwrap(), port)
}

/// A listener whose accept queue reports whether anything ever connected.
struct Watched(StdListener);

impl Watched {
    fn new() -> Self {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        Watched(l)
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    /// Whether a connection is waiting. A dial that returned has finished its handshake,
    /// so a connection it made is already queued.
    fn saw_connection(&self) -> bool {
        match self.0.accept() {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("accept failed: {e}"),
        }
    }
}

#[test]
fn dials_a_local_listener_and_carries_bytes() {
    run(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dialer = Dialer::new(local_policy());
        let target = literal(port);
        let (dialled, accepted) = futures_lite::future::zip(dialer.dial(&target), async {
            listener.accept().await.unwrap()
        })
        .await;
        let (mut stream, addr) = dialled.unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY is set");
        assert_eq!(accepted.1, stream.local_addr().unwrap());

        let (mut theirs, _) = accepted;
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        theirs.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        theirs.write_all(b"pong").await.unwrap();
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    });
}

#[test]
fn dials_a_name_from_etc_hosts() {
    run(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dialer = Dialer::new(local_policy());
        // `localhost` may also resolve to ::1, which this policy refuses: it is skipped.
        let (dialled, _accepted) =
            futures_lite::future::zip(dialer.dial(&name("localhost", port)), async {
                listener.accept().await.unwrap()
            })
            .await;
        let (_stream, addr) = dialled.unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
    });
}

#[test]
fn refused_port_is_connection_refused() {
    run(async {
        let port = {
            let l = StdListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let refusal = Dialer::new(local_policy())
            .dial(&literal(port))
            .await
            .unwrap_err();
        assert_eq!(
            refusal.reason,
            RefusalReason::ConnectionRefused,
            "{refusal}"
        );
        // The reason says it all for an address given as such.
        assert_eq!(refusal.detail, "", "{refusal}");
    });
}

/// A listener on 127.0.0.1 that drops every new SYN: backlog 0 and an accept queue filled
/// with connections that are never accepted. Returns the listener and the fillers, which
/// must stay alive.
fn silent_listener() -> (socket2::Socket, Vec<StdStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    // Connect until one attempt gets no answer: from then on the queue is full and the
    // kernel drops SYNs (Linux, and gVisor, keep at most backlog + 1 queued connections).
    for _ in 0..64 {
        match StdStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return (socket, fillers, addr),
            Err(e) => panic!("unexpected error while filling the backlog: {e}"),
        }
    }
    panic!("the accept queue never filled: this system does not drop SYNs on a full backlog");
}

#[test]
fn silent_port_times_out_after_the_connect_timeout() {
    let (_listener, fillers, addr) = silent_listener();
    assert!(!fillers.is_empty());
    run(async {
        let dialer = Dialer::new(local_policy()).with_connect_timeout(Duration::from_millis(500));
        let refusal = dialer.dial(&literal(addr.port())).await.unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::TimedOut, "{refusal}");
        assert!(
            refusal.detail.contains("no answer within 500ms"),
            "{}",
            refusal.detail
        );
    });
}

#[test]
fn the_dial_deadline_bounds_a_slow_attempt() {
    let (_listener, _fillers, addr) = silent_listener();
    run(async {
        let dialer = Dialer::new(local_policy())
            .with_connect_timeout(Duration::from_secs(60))
            .with_deadline(Duration::from_millis(400));
        let refusal = dialer.dial(&literal(addr.port())).await.unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::TimedOut, "{refusal}");
        assert!(
            refusal.detail.contains("no answer within"),
            "{}",
            refusal.detail
        );
    });
}

#[test]
fn unresolvable_name_is_no_such_host() {
    run(async {
        let target = name("bad!name.invalid", 443);
        let refusal = Dialer::new(local_policy()).dial(&target).await.unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::NoSuchHost, "{refusal}");
        assert!(
            refusal
                .detail
                .starts_with("names under .invalid never resolve"),
            "{}",
            refusal.detail
        );
    });
}

#[test]
fn private_addresses_are_refused_without_a_connection() {
    let watched = Watched::new();
    let port = watched.port();
    run(async {
        let dialer = Dialer::new(EgressPolicy::default());
        // A literal, names that resolve to loopback (from /etc/hosts, and numeric forms
        // getaddrinfo parses itself) and the metadata address.
        for target in [
            literal(port),
            name("localhost", port),
            name("2130706433", port),
            name("127.1", port),
            name("0x7f.1", port),
            Target::new(Host::Ip("::ffff:127.0.0.1".parse().unwrap()), port),
            Target::new(Host::Ip("169.254.169.254".parse().unwrap()), 80),
        ] {
            let refusal = dialer.dial(&target).await.unwrap_err();
            assert_eq!(
                refusal.reason,
                RefusalReason::DeniedByPolicy,
                "{target}: {refusal}"
            );
            // The rule that matched; a name's addresses were all judged.
            let said = match target.host {
                Host::Ip(_) => refusal.detail.starts_with("address "),
                Host::Name(_) => refusal
                    .detail
                    .starts_with("every address it resolves to is denied: address "),
            };
            assert!(
                said && refusal.detail.contains(" range "),
                "{}",
                refusal.detail
            );
        }
    });
    assert!(
        !watched.saw_connection(),
        "a denied target was connected to"
    );

    // The same numeric name is dialled once loopback is allowed: resolution did happen.
    run(async {
        let dialer = Dialer::new(local_policy());
        let (_stream, addr) = dialer.dial(&name("2130706433", port)).await.unwrap();
        assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    });
    assert!(watched.saw_connection());
}

#[test]
fn port_rules_refuse_without_a_connection() {
    let watched = Watched::new();
    let port = watched.port();
    run(async {
        let mut policy = local_policy();
        policy.allow_ports = vec![PortRange::single(443)];
        let refusal = Dialer::new(policy).dial(&literal(port)).await.unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::DeniedByPolicy);
        assert!(
            refusal.detail.contains("is not in allow_ports"),
            "{}",
            refusal.detail
        );
    });
    assert!(!watched.saw_connection());
}

#[test]
fn resolver_returns_literals_without_lookup_and_names_from_hosts() {
    run(async {
        let resolver = Resolver::new(Duration::from_secs(5), 1);
        let target = Target::new(Host::Ip("2001:db8::1".parse().unwrap()), 80);
        assert_eq!(
            resolve(&resolver, &target).await.unwrap(),
            vec!["[2001:db8::1]:80".parse::<SocketAddr>().unwrap()]
        );
        // One lookup slot: the second lookup waits for the first, then both succeed.
        let (a, b) = futures_lite::future::zip(
            resolve(&resolver, &name("localhost", 1)),
            resolve(&resolver, &name("localhost", 2)),
        )
        .await;
        assert!(a.unwrap().contains(&SocketAddr::from(([127, 0, 0, 1], 1))));
        assert!(b.unwrap().contains(&SocketAddr::from(([127, 0, 0, 1], 2))));
    });
}

#[test]
fn resolver_deadline_is_timed_out() {
    run(async {
        // A zero deadline expires before the lookup thread can answer.
        let resolver = Resolver::new(Duration::ZERO, 4);
        let refusal = resolve(&resolver, &name("localhost", 80))
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::TimedOut, "{refusal}");
    });
}

#[test]
fn a_filler_keeps_working_after_the_silent_listener_trick() {
    // The trick relies on queued connections staying established; check one carries bytes
    // once accepted, so the "silent" port really is a full queue and not a broken socket.
    let (listener, mut fillers, _) = silent_listener();
    let listener: StdListener = listener.into();
    let (mut accepted, _) = listener.accept().unwrap();
    accepted
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    fillers[0].write_all(b"x").unwrap();
    let mut buf = [0u8; 1];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"x");
}
