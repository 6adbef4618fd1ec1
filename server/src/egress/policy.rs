//! Which targets the server may dial: the egress policy.
//!
//! The tunnel must not become a way into the network the server runs in (its VPC, the
//! instance or task metadata services that hand out credentials, its own loopback
//! services). So by default every address in a loopback, private, link-local, shared
//! (CGNAT), multicast, unique-local, unspecified, broadcast, reserved, documentation or
//! benchmark range is refused, and the operator can widen or narrow that with explicit
//! lists.
//!
//! # Precedence
//!
//! For every decision the first matching rule wins, in this order:
//!
//! 1. **explicit deny**: `deny_ports`, `deny_hosts`, `deny_cidrs`;
//! 2. **explicit allow**: `allow_cidrs` for an address, `allow_hosts` for every address a
//!    matching name resolves to (an allowed name may point into a default-denied range, for
//!    example an internal service; it is still subject to `deny_cidrs`);
//! 3. **default-deny ranges** (see [`RangeKind`]; `allow_private = true` lifts only the
//!    private, shared and unique-local ones, never loopback, link-local or metadata);
//! 4. **allow** everything else.
//!
//! Ports are a filter on top of that: a port in `deny_ports` is refused, and when
//! `allow_ports` is not empty, a port outside it is refused.
//!
//! # Addresses that embed an IPv4 address
//!
//! An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) reaches `a.b.c.d` through a dual-stack
//! socket, so it is judged as that IPv4 address and nothing else. NAT64 (`64:ff9b::/96`,
//! which AWS NAT gateways translate) and 6to4 (`2002::/16`) addresses are judged both as
//! themselves and as the IPv4 address they embed, and refused if either is refused. The
//! deprecated IPv4-compatible range `::/96`, local-use NAT64 `64:ff9b:1::/48` and Teredo
//! `2001::/32` are refused as a whole.
//!
//! # Two checks
//!
//! [`EgressPolicy::check_target`] runs before resolution (port and host rules, and the
//! address rules for an IP literal); [`EgressPolicy::check_resolved`] (or
//! [`EgressPolicy::check_addr`] when no name is involved) runs on every address a name
//! resolved to, so that a name pointing at `169.254.169.254` or a numeric name such as
//! `2130706433` cannot get around the address rules.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use fluidity_proto::{Host, OpenRefusal, RefusalReason, Target};
use serde::{Deserialize, Serialize};

use crate::Error;

/// A block of addresses, `address/prefix-length`; host bits are cleared when parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `prefix` leading bits of `addr`. An IPv4-mapped IPv6 block with a prefix
    /// of at least 96 becomes the IPv4 block it maps, since mapped addresses are judged as
    /// IPv4.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, Error> {
        let invalid = |why| Error::InvalidCidr {
            input: format!("{addr}/{prefix}"),
            why,
        };
        match addr {
            IpAddr::V4(a) => {
                if prefix > 32 {
                    return Err(invalid("an IPv4 prefix length is at most 32"));
                }
                let bits = u32::from(a) & v4_mask(prefix);
                Ok(Cidr {
                    addr: IpAddr::V4(Ipv4Addr::from(bits)),
                    prefix,
                })
            }
            IpAddr::V6(a) => {
                if prefix > 128 {
                    return Err(invalid("an IPv6 prefix length is at most 128"));
                }
                if prefix >= 96 {
                    if let Some(v4) = a.to_ipv4_mapped() {
                        return Cidr::new(IpAddr::V4(v4), prefix - 96);
                    }
                }
                let bits = u128::from(a) & v6_mask(prefix);
                Ok(Cidr {
                    addr: IpAddr::V6(Ipv6Addr::from(bits)),
                    prefix,
                })
            }
        }
    }

    /// The block holding exactly `addr`.
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        // A full-length prefix is always valid, and a mapped /128 becomes a valid /32.
        Cidr::new(addr, prefix).unwrap_or(Cidr { addr, prefix })
    }

    /// A block from parts known to be valid (network address with host bits clear).
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    /// A block from parts known to be valid (network address with host bits clear).
    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this block. IPv4 blocks hold only IPv4 addresses and IPv6 blocks
    /// only IPv6 addresses; no mapping is done here.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & v4_mask(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & v6_mask(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = Error;

    /// Parses `10.0.0.0/8`, `fc00::/7`, or a bare address (a block of one).
    fn from_str(s: &str) -> Result<Cidr, Error> {
        let invalid = |why| Error::InvalidCidr {
            input: s.to_owned(),
            why,
        };
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid("not an IP address"))?;
        match prefix {
            None => Ok(Cidr::host(addr)),
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid("the prefix length is not a number"));
                }
                let prefix: u8 = p
                    .parse()
                    .map_err(|_| invalid("the prefix length is not a number"))?;
                Cidr::new(addr, prefix).map_err(|e| match e {
                    Error::InvalidCidr { why, .. } => invalid(why),
                    other => other,
                })
            }
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = Error;
    fn try_from(s: String) -> Result<Cidr, Error> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A host name rule: an exact name (`example.com`) or every name below a domain
/// (`*.example.com`, which matches `a.example.com` and `a.b.example.com` but not
/// `example.com` itself). Case-insensitive; a trailing dot is ignored. Host rules apply to
/// names only: IP literals are governed by the CIDR rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern {
    /// The name, or the domain below which names match; lower case, no trailing dot.
    name: String,
    /// Whether this is a `*.` pattern.
    subdomains: bool,
}

impl HostPattern {
    /// Whether `name` (as a client sent it) matches this pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if !self.subdomains {
            return name.eq_ignore_ascii_case(&self.name);
        }
        let Some(split) = name.len().checked_sub(self.name.len() + 1) else {
            return false;
        };
        name.is_char_boundary(split)
            && name.as_bytes()[split] == b'.'
            && name[split + 1..].eq_ignore_ascii_case(&self.name)
    }
}

impl FromStr for HostPattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<HostPattern, Error> {
        let invalid = |why| Error::InvalidHostPattern {
            input: s.to_owned(),
            why,
        };
        let trimmed = s.trim();
        let (subdomains, rest) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        if rest.is_empty() {
            return Err(invalid("empty name"));
        }
        if rest.len() > 253 {
            return Err(invalid("a name is at most 253 bytes"));
        }
        if rest.parse::<IpAddr>().is_ok() {
            return Err(invalid(
                "an IP address is not a host name; use a CIDR rule for addresses",
            ));
        }
        if rest.contains('*') {
            return Err(invalid(
                "a wildcard may only stand alone as the first label (`*.example.com`)",
            ));
        }
        for label in rest.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(invalid("every label must be 1 to 63 bytes"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    "a name holds only letters, digits, `-`, `_` and dots",
                ));
            }
        }
        Ok(HostPattern {
            name: rest.to_ascii_lowercase(),
            subdomains,
        })
    }
}

impl TryFrom<String> for HostPattern {
    type Error = Error;
    fn try_from(s: String) -> Result<HostPattern, Error> {
        s.parse()
    }
}

impl From<HostPattern> for String {
    fn from(p: HostPattern) -> String {
        p.to_string()
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subdomains {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

/// A port or an inclusive range of ports: `443` or `8000-8100`. In TOML either a number or
/// a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// The ports `first..=last`; `None` if `first > last`.
    pub fn new(first: u16, last: u16) -> Option<PortRange> {
        (first <= last).then_some(PortRange { first, last })
    }

    /// A single port.
    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Parses a comma-separated list such as `80,443,8000-8100`.
    pub fn parse_list(s: &str) -> Result<Vec<PortRange>, Error> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(str::parse)
            .collect()
    }
}

impl FromStr for PortRange {
    type Err = Error;

    fn from_str(s: &str) -> Result<PortRange, Error> {
        let invalid = |why| Error::InvalidPortRule {
            input: s.to_owned(),
            why,
        };
        let port = |p: &str| -> Result<u16, Error> {
            let p = p.trim();
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid("a port is a number from 0 to 65535"));
            }
            p.parse()
                .map_err(|_| invalid("a port is a number from 0 to 65535"))
        };
        match s.split_once('-') {
            None => Ok(PortRange::single(port(s)?)),
            Some((a, b)) => PortRange::new(port(a)?, port(b)?)
                .ok_or_else(|| invalid("the first port of a range is above the last")),
        }
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PortRange, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a range such as \"8000-8100\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRange, E> {
                u16::try_from(v)
                    .map(PortRange::single)
                    .map_err(|_| E::custom(format!("port {v} is above 65535")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRange, E> {
                u16::try_from(v)
                    .map(PortRange::single)
                    .map_err(|_| E::custom(format!("port {v} is not in 0..=65535")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The kinds of address ranges the policy refuses unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RangeKind {
    /// "This network" `0.0.0.0/8` and the unspecified `::`.
    Unspecified,
    /// `127.0.0.0/8` and `::1`.
    Loopback,
    /// RFC 1918: `10/8`, `172.16/12`, `192.168/16`. Lifted by `allow_private`.
    Private,
    /// Shared address space (carrier-grade NAT) `100.64/10`. Lifted by `allow_private`.
    Shared,
    /// Unique-local `fc00::/7`. Lifted by `allow_private`.
    UniqueLocal,
    /// Instance and task metadata and credential endpoints (`169.254.169.254`,
    /// `169.254.170.2`, `fd00:ec2::/32`, and Alibaba Cloud's `100.100.100.200`).
    CloudMetadata,
    /// Link-local `169.254/16` and `fe80::/10`.
    LinkLocal,
    /// Multicast `224/4` and `ff00::/8`.
    Multicast,
    /// Limited broadcast `255.255.255.255`.
    Broadcast,
    /// Documentation ranges (TEST-NET-1/2/3, `2001:db8::/32`, `3fff::/20`).
    Documentation,
    /// Benchmarking ranges `198.18/15` and `2001:2::/48`.
    Benchmark,
    /// Other special-purpose or deprecated ranges (IETF protocol assignments, `240/4`,
    /// IPv4-compatible IPv6, local-use NAT64, Teredo, discard-only, site-local).
    Reserved,
}

impl RangeKind {
    /// Whether `allow_private` lifts the default denial of this kind.
    pub fn is_private(self) -> bool {
        matches!(
            self,
            RangeKind::Private | RangeKind::Shared | RangeKind::UniqueLocal
        )
    }
}

impl fmt::Display for RangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RangeKind::Unspecified => "unspecified",
            RangeKind::Loopback => "loopback",
            RangeKind::Private => "private",
            RangeKind::Shared => "shared (CGNAT)",
            RangeKind::UniqueLocal => "unique-local",
            RangeKind::CloudMetadata => "cloud metadata",
            RangeKind::LinkLocal => "link-local",
            RangeKind::Multicast => "multicast",
            RangeKind::Broadcast => "broadcast",
            RangeKind::Documentation => "documentation",
            RangeKind::Benchmark => "benchmark",
            RangeKind::Reserved => "reserved",
        })
    }
}

/// The default-denied ranges, most specific first so that a refusal names the narrowest
/// block (metadata before link-local, for instance).
const DEFAULT_DENY_V4: &[(Cidr, RangeKind)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), RangeKind::Unspecified),
    (Cidr::v4(10, 0, 0, 0, 8), RangeKind::Private),
    // Alibaba Cloud's metadata, inside the shared range that `allow_private` lifts.
    (Cidr::v4(100, 100, 100, 200, 32), RangeKind::CloudMetadata),
    (Cidr::v4(100, 64, 0, 0, 10), RangeKind::Shared),
    (Cidr::v4(127, 0, 0, 0, 8), RangeKind::Loopback),
    (Cidr::v4(169, 254, 169, 254, 32), RangeKind::CloudMetadata),
    (Cidr::v4(169, 254, 170, 2, 32), RangeKind::CloudMetadata),
    (Cidr::v4(169, 254, 0, 0, 16), RangeKind::LinkLocal),
    (Cidr::v4(172, 16, 0, 0, 12), RangeKind::Private),
    (Cidr::v4(192, 0, 0, 0, 24), RangeKind::Reserved),
    (Cidr::v4(192, 0, 2, 0, 24), RangeKind::Documentation),
    (Cidr::v4(192, 88, 99, 0, 24), RangeKind::Reserved),
    (Cidr::v4(192, 168, 0, 0, 16), RangeKind::Private),
    (Cidr::v4(198, 18, 0, 0, 15), RangeKind::Benchmark),
    (Cidr::v4(198, 51, 100, 0, 24), RangeKind::Documentation),
    (Cidr::v4(203, 0, 113, 0, 24), RangeKind::Documentation),
    (Cidr::v4(224, 0, 0, 0, 4), RangeKind::Multicast),
    (Cidr::v4(255, 255, 255, 255, 32), RangeKind::Broadcast),
    (Cidr::v4(240, 0, 0, 0, 4), RangeKind::Reserved),
];

/// See [`DEFAULT_DENY_V4`]. IPv4-mapped addresses never get here (they are judged as IPv4).
const DEFAULT_DENY_V6: &[(Cidr, RangeKind)] = &[
    (
        Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
        RangeKind::Unspecified,
    ),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), RangeKind::Loopback),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 96), RangeKind::Reserved),
    (
        Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        RangeKind::Reserved,
    ),
    (
        Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        RangeKind::Reserved,
    ),
    (
        Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
        RangeKind::Reserved,
    ),
    (
        Cidr::v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48),
        RangeKind::Benchmark,
    ),
    (
        Cidr::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        RangeKind::Documentation,
    ),
    (
        Cidr::v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
        RangeKind::Documentation,
    ),
    (
        Cidr::v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0], 32),
        RangeKind::CloudMetadata,
    ),
    (
        Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        RangeKind::UniqueLocal,
    ),
    (
        Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        RangeKind::LinkLocal,
    ),
    (
        Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        RangeKind::Reserved,
    ),
    (
        Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        RangeKind::Multicast,
    ),
];

/// The default-denied range holding `ip`, if any (no mapping is done here).
pub fn default_denied_range(ip: IpAddr) -> Option<(Cidr, RangeKind)> {
    let table = match ip {
        IpAddr::V4(_) => DEFAULT_DENY_V4,
        IpAddr::V6(_) => DEFAULT_DENY_V6,
    };
    table.iter().copied().find(|(c, _)| c.contains(ip))
}

/// The forms under which an address is judged: itself (or, if IPv4-mapped, only the IPv4
/// address it maps) and the IPv4 address a NAT64 or 6to4 address embeds.
fn judged_forms(ip: IpAddr) -> (IpAddr, Option<Ipv4Addr>) {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), None),
            None => (ip, embedded_ipv4(v6)),
        },
        IpAddr::V4(_) => (ip, None),
    }
}

/// The IPv4 address a NAT64 (`64:ff9b::/96`) or 6to4 (`2002::/16`) address embeds, which
/// the policy judges too (see the [module documentation](self)).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let ip = IpAddr::V6(v6);
    let bits = u128::from(v6);
    let nat64 = Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
    if nat64.contains(ip) {
        // The low 32 bits of a u128 always fit a u32.
        return Some(Ipv4Addr::from((bits & 0xffff_ffff) as u32));
    }
    let six_to_four = Cidr::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);
    six_to_four
        .contains(ip)
        .then(|| Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32))
}

/// Why the policy refused a target; names the rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denied {
    /// The port matches a `deny_ports` rule.
    Port {
        /// The port asked for.
        port: u16,
        /// The rule that matched.
        rule: PortRange,
    },
    /// `allow_ports` is set and does not hold the port.
    PortNotAllowed {
        /// The port asked for.
        port: u16,
    },
    /// The name matches a `deny_hosts` pattern.
    Host {
        /// The name asked for.
        name: String,
        /// The pattern that matched.
        pattern: HostPattern,
    },
    /// The address matches a `deny_cidrs` block.
    Cidr {
        /// The address.
        addr: IpAddr,
        /// The block that matched.
        cidr: Cidr,
    },
    /// The address lies in a range refused by default.
    DefaultRange {
        /// The address.
        addr: IpAddr,
        /// The range that matched (for an address embedding IPv4, possibly an IPv4 range).
        range: Cidr,
        /// What kind of range it is.
        kind: RangeKind,
    },
}

impl Denied {
    /// The refusal to send; the detail names the rule (the agent names the target).
    pub fn to_refusal(&self) -> OpenRefusal {
        OpenRefusal::new(RefusalReason::DeniedByPolicy, self.to_string())
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Port { port, rule } => write!(f, "port {port} matches deny_ports {rule}"),
            Denied::PortNotAllowed { port } => write!(f, "port {port} is not in allow_ports"),
            Denied::Host { name, pattern } => {
                write!(f, "host {name} matches deny_hosts {pattern}")
            }
            Denied::Cidr { addr, cidr } => write!(f, "address {addr} matches deny_cidrs {cidr}"),
            Denied::DefaultRange { addr, range, kind } => {
                write!(f, "address {addr} is in the {kind} range {range}")
            }
        }
    }
}

/// The egress policy; see the [module documentation](self) for the order of precedence.
///
/// Deserializes from a TOML table such as
///
/// ```toml
/// allow_cidrs = ["127.0.0.1/32"]
/// deny_hosts = ["*.internal"]
/// allow_ports = [80, 443, "8000-8100"]
/// allow_private = false
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressPolicy {
    /// Address blocks that may be dialled even inside a default-denied range.
    pub allow_cidrs: Vec<Cidr>,
    /// Address blocks that are never dialled.
    pub deny_cidrs: Vec<Cidr>,
    /// Names whose addresses may be dialled even inside a default-denied range.
    pub allow_hosts: Vec<HostPattern>,
    /// Names that are never resolved or dialled.
    pub deny_hosts: Vec<HostPattern>,
    /// When not empty, the only ports that may be dialled.
    pub allow_ports: Vec<PortRange>,
    /// Ports that are never dialled.
    pub deny_ports: Vec<PortRange>,
    /// Lifts the default denial of private, shared (CGNAT) and unique-local ranges (never of
    /// loopback, link-local or metadata addresses). Off by default.
    pub allow_private: bool,
}

impl EgressPolicy {
    /// Checks a target before its name is resolved: port rules, host rules, and for an IP
    /// literal the address rules.
    pub fn check_target(&self, target: &Target) -> Result<(), Denied> {
        self.check_port(target.port)?;
        match &target.host {
            Host::Ip(ip) => self.check_ip(*ip, false),
            Host::Name(name) => self.check_name(name).map(drop),
        }
    }

    /// Checks one address (with its port) that no name is involved with: port rules and
    /// address rules.
    pub fn check_addr(&self, ip: IpAddr, port: u16) -> Result<(), Denied> {
        self.check_port(port)?;
        self.check_ip(ip, false)
    }

    /// Checks one address that `target`'s name resolved to: as [`check_addr`], except that
    /// a name matching `allow_hosts` lifts the default-denied ranges.
    ///
    /// [`check_addr`]: EgressPolicy::check_addr
    pub fn check_resolved(&self, target: &Target, ip: IpAddr) -> Result<(), Denied> {
        self.check_port(target.port)?;
        let lifted = match &target.host {
            Host::Name(name) => self.check_name(name)?,
            Host::Ip(_) => false,
        };
        self.check_ip(ip, lifted)
    }

    /// Adds one rule, as parsed from the command line.
    pub fn apply(&mut self, rule: EgressRule) {
        match rule {
            EgressRule::AllowCidrs(v) => self.allow_cidrs.extend(v),
            EgressRule::DenyCidrs(v) => self.deny_cidrs.extend(v),
            EgressRule::AllowHosts(v) => self.allow_hosts.extend(v),
            EgressRule::DenyHosts(v) => self.deny_hosts.extend(v),
            EgressRule::AllowPorts(v) => self.allow_ports.extend(v),
            EgressRule::DenyPorts(v) => self.deny_ports.extend(v),
            EgressRule::AllowPrivate(b) => self.allow_private = b,
        }
    }

    /// This policy with `cidr` added to `allow_cidrs` (local mode allows `127.0.0.1` and `::1`).
    pub fn allowing(mut self, cidr: Cidr) -> Self {
        self.allow_cidrs.push(cidr);
        self
    }

    fn check_port(&self, port: u16) -> Result<(), Denied> {
        if let Some(rule) = self.deny_ports.iter().find(|r| r.contains(port)) {
            return Err(Denied::Port { port, rule: *rule });
        }
        if !self.allow_ports.is_empty() && !self.allow_ports.iter().any(|r| r.contains(port)) {
            return Err(Denied::PortNotAllowed { port });
        }
        Ok(())
    }

    /// Host rules for a name; `Ok(true)` if the name is explicitly allowed.
    fn check_name(&self, name: &str) -> Result<bool, Denied> {
        if let Some(pattern) = self.deny_hosts.iter().find(|p| p.matches(name)) {
            return Err(Denied::Host {
                name: name.to_owned(),
                pattern: pattern.clone(),
            });
        }
        Ok(self.allow_hosts.iter().any(|p| p.matches(name)))
    }

    /// Address rules; `lifted` waives the default ranges (but not `deny_cidrs`).
    fn check_ip(&self, ip: IpAddr, lifted: bool) -> Result<(), Denied> {
        let (primary, embedded) = judged_forms(ip);
        let forms = std::iter::once(primary).chain(embedded.map(IpAddr::V4));
        for form in forms.clone() {
            if let Some(cidr) = self.deny_cidrs.iter().find(|c| c.contains(form)) {
                return Err(Denied::Cidr {
                    addr: ip,
                    cidr: *cidr,
                });
            }
        }
        if lifted {
            return Ok(());
        }
        for form in forms {
            if self.allow_cidrs.iter().any(|c| c.contains(form)) {
                continue;
            }
            if let Some((range, kind)) = default_denied_range(form) {
                if !(self.allow_private && kind.is_private()) {
                    return Err(Denied::DefaultRange {
                        addr: ip,
                        range,
                        kind,
                    });
                }
            }
        }
        Ok(())
    }
}

/// One policy rule as given on the command line: `KEY=VALUE[,VALUE...]`, where `KEY` is a
/// field of [`EgressPolicy`] (`allow_cidrs`, `deny_cidrs`, `allow_hosts`, `deny_hosts`,
/// `allow_ports`, `deny_ports`, `allow_private`; `-` may stand for `_`). For example
/// `allow_cidrs=127.0.0.1/32`, `deny_hosts=*.internal,metadata.google.internal`,
/// `allow_ports=80,443,8000-8100`, `allow_private=true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressRule {
    /// Adds to `allow_cidrs`.
    AllowCidrs(Vec<Cidr>),
    /// Adds to `deny_cidrs`.
    DenyCidrs(Vec<Cidr>),
    /// Adds to `allow_hosts`.
    AllowHosts(Vec<HostPattern>),
    /// Adds to `deny_hosts`.
    DenyHosts(Vec<HostPattern>),
    /// Adds to `allow_ports`.
    AllowPorts(Vec<PortRange>),
    /// Adds to `deny_ports`.
    DenyPorts(Vec<PortRange>),
    /// Sets `allow_private`.
    AllowPrivate(bool),
}

impl fmt::Display for EgressRule {
    /// The rule as it is given on the command line (it parses back to itself).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, key: &str, v: &[T]) -> fmt::Result {
            write!(f, "{key}=")?;
            for (i, x) in v.iter().enumerate() {
                write!(f, "{}{x}", if i == 0 { "" } else { "," })?;
            }
            Ok(())
        }
        match self {
            EgressRule::AllowCidrs(v) => list(f, "allow_cidrs", v),
            EgressRule::DenyCidrs(v) => list(f, "deny_cidrs", v),
            EgressRule::AllowHosts(v) => list(f, "allow_hosts", v),
            EgressRule::DenyHosts(v) => list(f, "deny_hosts", v),
            EgressRule::AllowPorts(v) => list(f, "allow_ports", v),
            EgressRule::DenyPorts(v) => list(f, "deny_ports", v),
            EgressRule::AllowPrivate(b) => write!(f, "allow_private={b}"),
        }
    }
}

impl FromStr for EgressRule {
    type Err = Error;

    fn from_str(s: &str) -> Result<EgressRule, Error> {
        let invalid = |why: String| Error::InvalidEgressRule {
            input: s.to_owned(),
            why,
        };
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| invalid("expected KEY=VALUE".into()))?;
        fn list<T: FromStr<Err = Error>>(v: &str) -> Result<Vec<T>, Error> {
            v.split(',')
                .filter(|p| !p.trim().is_empty())
                .map(str::parse)
                .collect()
        }
        let key = key.trim().replace('-', "_");
        let rule = match key.as_str() {
            "allow_cidrs" => EgressRule::AllowCidrs(list(value)?),
            "deny_cidrs" => EgressRule::DenyCidrs(list(value)?),
            "allow_hosts" => EgressRule::AllowHosts(list(value)?),
            "deny_hosts" => EgressRule::DenyHosts(list(value)?),
            "allow_ports" => EgressRule::AllowPorts(PortRange::parse_list(value)?),
            "deny_ports" => EgressRule::DenyPorts(PortRange::parse_list(value)?),
            "allow_private" => match value.trim() {
                "true" | "yes" | "1" => EgressRule::AllowPrivate(true),
                "false" | "no" | "0" => EgressRule::AllowPrivate(false),
                _ => {
                    return Err(invalid(
                        "allow_private is true or false (yes or no, 1 or 0)".into(),
                    ))
                }
            },
            other => return Err(invalid(format!("unknown key {other:?}"))),
        };
        Ok(rule)
    }
}
