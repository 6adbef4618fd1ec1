//! Where a stream goes and why an open can be refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest host name a target may carry (RFC 1035 limit).
pub const MAX_HOST_LEN: usize = 255;

/// Longest human-readable detail carried by a refusal, reset or goaway.
pub const MAX_DETAIL_LEN: usize = 512;

/// The host part of a [`Target`]: a name the server resolves, or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Host {
    /// A DNS name, resolved by the server (never by the agent).
    Name(String),
    /// A literal IP address.
    Ip(IpAddr),
}

impl Host {
    /// Parses a host as written in a URL or CONNECT line: an IP literal (brackets hold an
    /// IPv6 address and nothing else, as in a URL) or a name of 1..=255 bytes of visible
    /// ASCII.
    pub fn parse(s: &str) -> Option<Host> {
        if let Some(inner) = s.strip_prefix('[') {
            let v6: Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
            return Some(Host::Ip(IpAddr::V6(v6)));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some(Host::Ip(ip));
        }
        Host::name(s)
    }

    /// A name host, if the name is 1..=255 bytes of visible ASCII without `/`, `@` or `:`.
    pub fn name(s: &str) -> Option<Host> {
        let ok = !s.is_empty()
            && s.len() <= MAX_HOST_LEN
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'@' | b':' | b'[' | b']'));
        ok.then(|| Host::Name(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

impl From<Ipv4Addr> for Host {
    fn from(a: Ipv4Addr) -> Self {
        Host::Ip(IpAddr::V4(a))
    }
}

impl From<Ipv6Addr> for Host {
    fn from(a: Ipv6Addr) -> Self {
        Host::Ip(IpAddr::V6(a))
    }
}

/// The destination of a stream: the server dials `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Target {
    /// Host name or address.
    pub host: Host,
    /// TCP port.
    pub port: u16,
}

impl Target {
    /// A target from its parts.
    pub fn new(host: Host, port: u16) -> Self {
        Target { host, port }
    }

    /// Parses `host:port` (IPv6 in brackets), as in a CONNECT request line; the port is
    /// decimal digits only, as in a URL (`+443` is refused, as the proxy's URLs refuse it).
    pub fn parse(s: &str) -> Option<Target> {
        let (host, port) = s.rsplit_once(':')?;
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let port: u16 = port.parse().ok()?;
        if host.contains(':') && !host.starts_with('[') {
            return None;
        }
        Some(Target {
            host: Host::parse(host)?,
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Why the server refused to open a stream. Carried on the wire as a `u16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum RefusalReason {
    /// The name did not resolve (NXDOMAIN or no addresses).
    NoSuchHost,
    /// The target actively refused the connection (RST).
    ConnectionRefused,
    /// No route to the target's network or host.
    Unreachable,
    /// The target did not answer within the server's connect timeout.
    TimedOut,
    /// The server's egress policy forbids this target.
    DeniedByPolicy,
    /// The tunnel already carries as many streams as the server allows.
    TooManyStreams,
    /// The server is shutting down and takes no new streams.
    GoingAway,
    /// Any other failure at the server.
    Other,
    /// A code this version does not know; kept so that it can be reported.
    Unknown(u16),
}

impl RefusalReason {
    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            RefusalReason::NoSuchHost => 1,
            RefusalReason::ConnectionRefused => 2,
            RefusalReason::Unreachable => 3,
            RefusalReason::TimedOut => 4,
            RefusalReason::DeniedByPolicy => 5,
            RefusalReason::TooManyStreams => 6,
            RefusalReason::GoingAway => 7,
            RefusalReason::Other => 8,
            RefusalReason::Unknown(c) => c,
        }
    }

    /// The reason for a wire code (`0` is success and has no reason).
    pub fn from_code(code: u16) -> RefusalReason {
        match code {
            1 => RefusalReason::NoSuchHost,
            2 => RefusalReason::ConnectionRefused,
            3 => RefusalReason::Unreachable,
            4 => RefusalReason::TimedOut,
            5 => RefusalReason::DeniedByPolicy,
            6 => RefusalReason::TooManyStreams,
            7 => RefusalReason::GoingAway,
            8 => RefusalReason::Other,
            c => RefusalReason::Unknown(c),
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::NoSuchHost => f.write_str("no such host"),
            RefusalReason::ConnectionRefused => f.write_str("connection refused"),
            RefusalReason::Unreachable => f.write_str("network unreachable"),
            RefusalReason::TimedOut => f.write_str("connection timed out"),
            RefusalReason::DeniedByPolicy => f.write_str("denied by the server's egress policy"),
            RefusalReason::TooManyStreams => f.write_str("too many streams on this tunnel"),
            RefusalReason::GoingAway => f.write_str("server is shutting down"),
            RefusalReason::Other => f.write_str("server error"),
            RefusalReason::Unknown(c) => write!(f, "unknown refusal code {c}"),
        }
    }
}

/// A refusal as sent by the server: a typed reason and a short detail for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OpenRefusal {
    /// Why.
    pub reason: RefusalReason,
    /// One line for logs and error pages; truncated to [`MAX_DETAIL_LEN`] on the wire.
    pub detail: String,
}

impl OpenRefusal {
    /// A refusal with a detail line.
    pub fn new(reason: RefusalReason, detail: impl Into<String>) -> Self {
        OpenRefusal {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for OpenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.reason, self.detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            Target::parse("example.com:443"),
            Some(Target::new(Host::Name("example.com".into()), 443))
        );
        assert_eq!(
            Target::parse("[::1]:8080"),
            Some(Target::new(Host::Ip("::1".parse().unwrap()), 8080))
        );
        assert_eq!(Target::parse("::1:80"), None);
        assert_eq!(Target::parse("a b:80"), None);
        assert_eq!(Target::parse("host:99999"), None);
        for lax in [
            "host:+443",
            "host:",
            "host: 80",
            "[127.0.0.1]:80",
            "[::1]x:80",
        ] {
            assert_eq!(Target::parse(lax), None, "{lax}");
        }
        assert_eq!(Target::parse("host:0443").unwrap().port, 443);
        assert_eq!(Host::parse("[127.0.0.1]"), None);
        assert_eq!(
            Host::parse("[::ffff:127.0.0.1]"),
            Some(Host::Ip("::ffff:127.0.0.1".parse().unwrap()))
        );
        assert_eq!(Target::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
    }

    #[test]
    fn refusal_codes_round_trip() {
        for c in 0..20u16 {
            assert_eq!(RefusalReason::from_code(c).code(), c);
        }
    }
}
