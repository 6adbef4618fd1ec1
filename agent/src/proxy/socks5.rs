//! Sans-IO SOCKS5 (RFC 1928) and username/password authentication (RFC 1929) messages.
//!
//! Every parser takes the bytes received so far and returns `Ok(None)` when more are
//! needed, or the message and the number of bytes it used. Message sizes are bounded by
//! the wire format itself (at most 1 + 1 + 255 + 255 bytes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fluidity_proto::{Host, RefusalReason, Target};

/// The protocol version byte.
pub const VERSION: u8 = 5;
/// Method: no authentication.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// Method: username/password (RFC 1929).
pub const METHOD_USER_PASS: u8 = 0x02;
/// Method selection answer when no offered method is acceptable.
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;

/// Command: CONNECT.
pub const CMD_CONNECT: u8 = 0x01;

/// The version byte a SOCKS4 or SOCKS4a request starts with.
pub const SOCKS4_VERSION: u8 = 4;
/// The SOCKS4 reply "request rejected or failed": the only SOCKS4 answer this proxy gives,
/// so that a SOCKS4 client reports a refusal instead of a garbled reply.
pub const SOCKS4_REJECTED: [u8; 8] = [0x00, 0x5b, 0, 0, 0, 0, 0, 0];

/// Reply codes (RFC 1928 §6).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired (used for timeouts, as curl and most servers do).
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// A malformed SOCKS5 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    /// The version byte is not 5 (or 1 in the RFC 1929 sub-negotiation).
    #[error("unsupported SOCKS version {0}")]
    Version(u8),
    /// The greeting offers no methods.
    #[error("no authentication methods offered")]
    NoMethods,
    /// A reserved byte is not zero.
    #[error("reserved byte is not zero")]
    Reserved,
    /// The address type is unknown; answer with `ADDRESS_TYPE_NOT_SUPPORTED`.
    #[error("unsupported address type {0}")]
    AddressType(u8),
    /// A domain name of length zero.
    #[error("empty domain name")]
    EmptyDomain,
}

/// The client's greeting: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Offered method codes.
    pub methods: Vec<u8>,
}

impl Greeting {
    /// Whether `method` is offered.
    pub fn offers(&self, method: u8) -> bool {
        self.methods.contains(&method)
    }
}

/// Username and password from the RFC 1929 sub-negotiation.
#[derive(Clone, PartialEq, Eq)]
pub struct UserPass {
    /// Username bytes (1..=255).
    pub username: Vec<u8>,
    /// Password bytes (0..=255).
    pub password: Vec<u8>,
}

impl std::fmt::Debug for UserPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPass")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Destination address of a request, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A domain name, to be resolved by the server (never locally).
    Domain(Vec<u8>),
}

/// A request (RFC 1928 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Command code; only [`CMD_CONNECT`] is supported.
    pub command: u8,
    /// Destination address.
    pub address: Address,
    /// Destination port.
    pub port: u16,
}

impl Request {
    /// The stream target, or `None` if the domain name is not a valid host name or the
    /// port is zero.
    pub fn target(&self) -> Option<Target> {
        if self.port == 0 {
            return None;
        }
        let host = match &self.address {
            Address::Ip(ip) => Host::Ip(*ip),
            Address::Domain(name) => Host::parse(std::str::from_utf8(name).ok()?)?,
        };
        Some(Target::new(host, self.port))
    }
}

/// Parses the greeting: `VER NMETHODS METHODS...`.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Socks5Error::Version(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let len = 2 + usize::from(n);
    let Some(methods) = buf.get(2..len) else {
        return Ok(None);
    };
    Ok(Some((
        Greeting {
            methods: methods.to_vec(),
        },
        len,
    )))
}

/// Parses the RFC 1929 request: `VER=1 ULEN UNAME PLEN PASSWD`.
pub fn parse_user_pass(buf: &[u8]) -> Result<Option<(UserPass, usize)>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != 1 {
        return Err(Socks5Error::Version(ver));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(None);
    };
    let uend = 2 + usize::from(ulen);
    let Some(&plen) = buf.get(uend) else {
        return Ok(None);
    };
    let pend = uend + 1 + usize::from(plen);
    if buf.len() < pend {
        return Ok(None);
    }
    Ok(Some((
        UserPass {
            username: buf[2..uend].to_vec(),
            password: buf[uend + 1..pend].to_vec(),
        },
        pend,
    )))
}

/// Parses a request: `VER CMD RSV ATYP DST.ADDR DST.PORT`.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Socks5Error> {
    if buf.len() < 4 {
        if let Some(&ver) = buf.first() {
            if ver != VERSION {
                return Err(Socks5Error::Version(ver));
            }
        }
        return Ok(None);
    }
    if buf[0] != VERSION {
        return Err(Socks5Error::Version(buf[0]));
    }
    if buf[2] != 0 {
        return Err(Socks5Error::Reserved);
    }
    let (address, addr_end) = match buf[3] {
        0x01 => {
            let Some(a) = buf.get(4..8) else {
                return Ok(None);
            };
            (
                Address::Ip(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
                8,
            )
        }
        0x03 => {
            let Some(&n) = buf.get(4) else {
                return Ok(None);
            };
            if n == 0 {
                return Err(Socks5Error::EmptyDomain);
            }
            let end = 5 + usize::from(n);
            let Some(name) = buf.get(5..end) else {
                return Ok(None);
            };
            (Address::Domain(name.to_vec()), end)
        }
        0x04 => {
            let Some(a) = buf.get(4..20) else {
                return Ok(None);
            };
            let mut octets = [0u8; 16];
            octets.copy_from_slice(a);
            (Address::Ip(IpAddr::V6(Ipv6Addr::from(octets))), 20)
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    let Some(p) = buf.get(addr_end..addr_end + 2) else {
        return Ok(None);
    };
    Ok(Some((
        Request {
            command: buf[1],
            address,
            port: u16::from_be_bytes([p[0], p[1]]),
        },
        addr_end + 2,
    )))
}

/// A reply with `code` and an unspecified bound address (0.0.0.0:0): the agent's end of a
/// stream has no meaningful local address to report.
pub fn reply(code: u8) -> [u8; 10] {
    [VERSION, code, 0, 0x01, 0, 0, 0, 0, 0, 0]
}

/// The reply code for a refused open.
pub fn reply_for_refusal(reason: RefusalReason) -> u8 {
    match reason {
        RefusalReason::NoSuchHost => reply::HOST_UNREACHABLE,
        RefusalReason::ConnectionRefused => reply::CONNECTION_REFUSED,
        RefusalReason::Unreachable => reply::NETWORK_UNREACHABLE,
        RefusalReason::TimedOut => reply::TTL_EXPIRED,
        RefusalReason::DeniedByPolicy => reply::NOT_ALLOWED,
        RefusalReason::TooManyStreams
        | RefusalReason::GoingAway
        | RefusalReason::Other
        | RefusalReason::Unknown(_) => reply::GENERAL_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_needs_all_bytes() {
        let g = [5, 2, 0, 2, 0xaa];
        for cut in 0..4 {
            assert_eq!(parse_greeting(&g[..cut]), Ok(None));
        }
        let (greeting, len) = parse_greeting(&g).unwrap().unwrap();
        assert_eq!(len, 4);
        assert!(greeting.offers(METHOD_USER_PASS));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(Socks5Error::NoMethods));
    }

    #[test]
    fn user_pass() {
        let m = [1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        for cut in 0..m.len() {
            assert_eq!(parse_user_pass(&m[..cut]), Ok(None));
        }
        let (up, len) = parse_user_pass(&m).unwrap().unwrap();
        assert_eq!(
            (up.username.as_slice(), up.password.as_slice(), len),
            (&b"bob"[..], &b"pw"[..], 8)
        );
        assert!(!format!("{up:?}").contains("pw\""));
    }

    #[test]
    fn requests_of_each_address_type() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0, 80];
        let (r, len) = parse_request(&v4).unwrap().unwrap();
        assert_eq!(len, 10);
        assert_eq!(r.target().unwrap().to_string(), "127.0.0.1:80");

        let mut name = vec![5, 1, 0, 3, 11];
        name.extend_from_slice(b"Example.COM");
        name.extend_from_slice(&443u16.to_be_bytes());
        for cut in 0..name.len() {
            assert_eq!(parse_request(&name[..cut]), Ok(None));
        }
        let (r, _) = parse_request(&name).unwrap().unwrap();
        assert_eq!(r.target().unwrap().to_string(), "example.com:443");

        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0x1f, 0x90]);
        let (r, _) = parse_request(&v6).unwrap().unwrap();
        assert_eq!(r.target().unwrap().to_string(), "[::1]:8080");

        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0]),
            Err(Socks5Error::AddressType(9))
        );
        assert_eq!(parse_request(&[5, 1, 1, 1]), Err(Socks5Error::Reserved));
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0]),
            Err(Socks5Error::EmptyDomain)
        );
        let bad_name = [5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80];
        assert_eq!(parse_request(&bad_name).unwrap().unwrap().0.target(), None);
    }

    #[test]
    fn refusal_replies() {
        assert_eq!(reply_for_refusal(RefusalReason::NoSuchHost), 0x04);
        assert_eq!(reply_for_refusal(RefusalReason::ConnectionRefused), 0x05);
        assert_eq!(reply_for_refusal(RefusalReason::DeniedByPolicy), 0x02);
        assert_eq!(reply_for_refusal(RefusalReason::TimedOut), 0x06);
        assert_eq!(reply(0), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    }
}
