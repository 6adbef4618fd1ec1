//! Listeners: the addresses they take, and what an accept loop does when accepting fails.
//!
//! The usual cause is running out of file descriptors (`EMFILE`), which lasts until
//! connections close, and comes and goes while they do. Retrying at once would spin on the
//! error, and logging every failure would flood the log; so a failure pauses the loop
//! briefly, a run of failures is logged when it starts (with what to do) and when
//! accepting works again, and a run that starts soon after a logged one is logged only if
//! it lasts. Errors that belong to one incoming connection (it was aborted, or Linux
//! passes on a network error pending on it) concern nobody else: the loop goes on at once.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};

/// How long an accept loop waits after a failure before accepting again.
const PAUSE: Duration = Duration::from_millis(100);
/// How long after one logged run of failures another one is only counted.
const QUIET: Duration = Duration::from_secs(10);

/// `EMFILE` (the process's descriptor limit) and `ENFILE` (the system's), as Linux numbers
/// them.
const EMFILE: i32 = 24;
/// See [`EMFILE`].
const ENFILE: i32 = 23;
/// `EPROTO`: a protocol error pending on the incoming connection (Linux).
const EPROTO: i32 = 71;

/// Reads a listener address: an IP address and port (`127.0.0.1:8080`, `[::1]:8080`,
/// `0.0.0.0:8443`), or `localhost:PORT` for `127.0.0.1:PORT`. Other names are refused: a
/// listener binds one address, and which of a name's addresses was meant is a guess.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if let Some((host, port)) = s.rsplit_once(':') {
        if host.eq_ignore_ascii_case("localhost") {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            }
        }
    }
    let split = s.rsplit_once(':');
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let what = if s.parse::<u16>().is_ok() {
        "a port alone does not say which address to listen on"
    } else if s.parse::<std::net::Ipv6Addr>().is_ok()
        || split.is_some_and(|(h, _)| h.parse::<std::net::Ipv6Addr>().is_ok())
    {
        "an IPv6 address goes in brackets, with the port after them"
    } else if split.is_some_and(|(h, p)| digits(p) && p.parse::<u16>().is_err() && host_ok(h)) {
        "the port is above 65535"
    } else if split.is_some_and(|(h, p)| p.parse::<u16>().is_ok() && !host_ok(h)) {
        "the host is not an IP address (names other than localhost are not taken: a listener \
         binds one address)"
    } else {
        "not an IP address and port"
    };
    Err(format!(
        "{what}; give one like 127.0.0.1:8080, [::1]:8080 or 0.0.0.0:8080 (all \
         interfaces), or localhost:PORT for 127.0.0.1"
    ))
}

/// Whether `host` is what a listener address may have before its port: an IPv4 address,
/// an IPv6 address in brackets, or `localhost`.
fn host_ok(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok()
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
}

/// [`parse_listen_addr`] for a configuration file's field (`#[serde(deserialize_with)]`).
pub fn deserialize_listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen_addr(&s).map_err(serde::de::Error::custom)
}

/// What to check when binding a listener failed with `e`, as a clause to append to the
/// error (empty when there is nothing to add).
pub fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => " (is another process using the port?)",
        io::ErrorKind::AddrNotAvailable => {
            " (no network interface of this machine has that address; 0.0.0.0 listens on all)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges; pick a higher one)",
        _ => "",
    }
}

/// Whether accepting failed for want of file descriptors (the process's or the system's):
/// closing idle connections makes room.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}

/// The failures of one listener's accept loop.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    /// When the current run of failures began, and whether it has been logged; `None`
    /// while accepting works.
    run: Option<(Instant, bool)>,
    /// Failures since the last "accepting again" line.
    failures: u64,
    /// When a run was last logged.
    logged: Option<Instant>,
}

impl AcceptErrors {
    /// Failures of the listener named `listener` (for the log: "proxy", "tunnel"...).
    pub fn new(listener: &'static str) -> Self {
        AcceptErrors {
            listener,
            run: None,
            failures: 0,
            logged: None,
        }
    }

    /// Records a failed accept and waits as long as [`AcceptErrors::record`] says.
    pub async fn failed(&mut self, e: &io::Error) {
        let pause = self.record(e);
        if !pause.is_zero() {
            async_io::Timer::after(pause).await;
        }
    }

    /// Records a failed accept; returns how long to wait before accepting again (zero for
    /// an error of the incoming connection alone). For loops that block instead of await.
    pub fn record(&mut self, e: &io::Error) -> Duration {
        if concerns_one_connection(e) {
            tracing::debug!(listener = self.listener, error = %e, "an incoming connection failed");
            return Duration::ZERO;
        }
        self.failures += 1;
        let now = Instant::now();
        let (since, logged) = self.run.get_or_insert((now, false));
        let quiet_since_last = self.logged.is_none_or(|t| now.duration_since(t) >= QUIET);
        if !*logged && (quiet_since_last || now.duration_since(*since) >= QUIET) {
            *logged = true;
            self.logged = Some(now);
            tracing::warn!(
                listener = self.listener,
                error = %e,
                advice = advice(e),
                "accept failed"
            );
        }
        PAUSE
    }

    /// Records a successful accept, logging the end of a logged run of failures.
    pub fn accepted(&mut self) {
        if let Some((since, true)) = self.run.take() {
            tracing::info!(
                listener = self.listener,
                failures = self.failures,
                for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                "accepting connections again"
            );
            self.failures = 0;
        }
    }
}

/// Whether `e` is about the incoming connection only (accept(2): Linux passes on network
/// errors pending on the new socket), so that the next accept may well succeed.
fn concerns_one_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | NetworkDown | NetworkUnreachable | HostUnreachable
    ) || e.raw_os_error() == Some(EPROTO)
}

/// What the user can do about an accept failure.
fn advice(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(EMFILE | ENFILE) => {
            "out of file descriptors: raise the limit (ulimit -n, or LimitNOFILE for a \
             service) or lower the connection limits; retrying until connections close"
        }
        _ if e.kind() == io::ErrorKind::OutOfMemory => "the system is short of memory; retrying",
        _ => "retrying",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_ip_and_port_or_localhost() {
        let ok = |s: &str| parse_listen_addr(s).expect(s).to_string();
        assert_eq!(ok("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(ok("[::1]:8080"), "[::1]:8080");
        assert_eq!(ok("0.0.0.0:8443"), "0.0.0.0:8443");
        assert_eq!(ok("localhost:8080"), "127.0.0.1:8080");
        assert_eq!(ok("LocalHost:0"), "127.0.0.1:0");
        for bad in [
            "8080",
            "example.com:8080",
            "localhost",
            "localhost:99999",
            ":8080",
            "",
        ] {
            let e = parse_listen_addr(bad).expect_err(bad);
            assert!(
                e.contains("127.0.0.1:8080") && e.contains("localhost:PORT"),
                "{e}"
            );
        }
        assert!(parse_listen_addr("8080")
            .unwrap_err()
            .contains("a port alone"));
        for big in ["127.0.0.1:99999", "localhost:70000", "[::1]:65536"] {
            assert!(parse_listen_addr(big).unwrap_err().contains("above 65535"));
        }
        for name in ["example.com:8080", "foo:8080", "192.168.1.300:80"] {
            let e = parse_listen_addr(name).unwrap_err();
            assert!(e.contains("the host is not an IP address"), "{name}: {e}");
        }
        for bare in ["::1:8080", "::1"] {
            let e = parse_listen_addr(bare).unwrap_err();
            assert!(e.contains("goes in brackets, with the port"), "{bare}: {e}");
        }
    }

    #[test]
    fn binding_failures_say_what_to_check() {
        // Real binds: an address this machine does not have, and a port already taken.
        let absent = std::net::TcpListener::bind("192.0.2.1:0").expect_err("TEST-NET-1");
        assert!(
            bind_hint(&absent).contains("no network interface"),
            "{absent}"
        );
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let again =
            std::net::TcpListener::bind(taken.local_addr().expect("address")).expect_err("taken");
        assert!(bind_hint(&again).contains("another process"), "{again}");
        assert_eq!(bind_hint(&io::Error::other("x")), "");
    }

    #[test]
    fn a_shortage_pauses_and_an_error_of_one_connection_does_not() {
        let mut errors = AcceptErrors::new("test");
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.record(&aborted), Duration::ZERO);
        assert!(
            errors.run.is_none(),
            "one connection's error is no run of failures"
        );
        let emfile = io::Error::from_raw_os_error(EMFILE);
        assert_eq!(errors.record(&emfile), PAUSE);
        assert_eq!(errors.record(&emfile), PAUSE);
        assert!(matches!(errors.run, Some((_, true))), "the run is logged");
        assert_eq!(errors.failures, 2);
        errors.accepted();
        assert!(errors.run.is_none());
        assert_eq!(errors.failures, 0);
    }

    #[test]
    fn a_run_soon_after_a_logged_one_is_logged_only_once_it_lasts() {
        let mut errors = AcceptErrors::new("test");
        let emfile = io::Error::from_raw_os_error(EMFILE);
        errors.record(&emfile);
        errors.accepted();
        errors.record(&emfile);
        assert!(
            matches!(errors.run, Some((_, false))),
            "a relapse is only counted"
        );
        // The same relapse, begun QUIET ago (just after a logged run): now it is logged.
        let started = Instant::now()
            .checked_sub(QUIET)
            .unwrap_or_else(|| unreachable!("the clock started over {QUIET:?} ago"));
        errors.run = Some((started, false));
        errors.logged = Some(Instant::now());
        errors.record(&emfile);
        assert!(
            matches!(errors.run, Some((_, true))),
            "a lasting relapse is logged"
        );
    }
}
