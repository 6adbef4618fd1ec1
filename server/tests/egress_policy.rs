//! The egress policy: default ranges, precedence, embedded IPv4, parsing and configuration.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fluidity_proto::{Host, RefusalReason, Target};
use fluidity_server::egress::{
    Cidr, Denied, EgressPolicy, EgressRule, HostPattern, PortRange, RangeKind,
};
use proptest::prelude::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn name(host: &str, port: u16) -> Target {
    Target::new(Host::Name(host.into()), port)
}

fn literal(addr: &str, port: u16) -> Target {
    Target::new(Host::Ip(ip(addr)), port)
}

/// The kind of default range that refuses `addr` under `policy`, or `None` if allowed.
fn refused_kind(policy: &EgressPolicy, addr: &str) -> Option<RangeKind> {
    match policy.check_addr(ip(addr), 443) {
        Ok(()) => None,
        Err(Denied::DefaultRange { kind, .. }) => Some(kind),
        Err(other) => panic!("{addr}: unexpected denial {other}"),
    }
}

#[test]
fn every_default_range_is_denied() {
    let p = EgressPolicy::default();
    let cases = [
        ("0.0.0.0", RangeKind::Unspecified),
        ("0.1.2.3", RangeKind::Unspecified),
        ("10.0.0.1", RangeKind::Private),
        ("10.255.255.255", RangeKind::Private),
        ("100.64.0.1", RangeKind::Shared),
        ("100.127.255.254", RangeKind::Shared),
        ("127.0.0.1", RangeKind::Loopback),
        ("127.255.0.9", RangeKind::Loopback),
        ("169.254.169.254", RangeKind::CloudMetadata),
        ("169.254.170.2", RangeKind::CloudMetadata),
        ("169.254.1.1", RangeKind::LinkLocal),
        ("172.16.0.1", RangeKind::Private),
        ("172.31.255.255", RangeKind::Private),
        ("192.0.0.8", RangeKind::Reserved),
        ("192.0.2.1", RangeKind::Documentation),
        ("192.88.99.1", RangeKind::Reserved),
        ("192.168.1.1", RangeKind::Private),
        ("198.18.0.1", RangeKind::Benchmark),
        ("198.19.255.255", RangeKind::Benchmark),
        ("198.51.100.7", RangeKind::Documentation),
        ("203.0.113.9", RangeKind::Documentation),
        ("224.0.0.1", RangeKind::Multicast),
        ("239.255.255.250", RangeKind::Multicast),
        ("240.0.0.1", RangeKind::Reserved),
        ("255.255.255.255", RangeKind::Broadcast),
        ("::", RangeKind::Unspecified),
        ("::1", RangeKind::Loopback),
        ("::7f00:1", RangeKind::Reserved),
        ("64:ff9b:1::1", RangeKind::Reserved),
        ("100::1", RangeKind::Reserved),
        ("2001::1", RangeKind::Reserved),
        ("2001:2::1", RangeKind::Benchmark),
        ("2001:db8::1", RangeKind::Documentation),
        ("3fff::1", RangeKind::Documentation),
        ("fd00:ec2::254", RangeKind::CloudMetadata),
        ("fc00::1", RangeKind::UniqueLocal),
        ("fd12:3456::1", RangeKind::UniqueLocal),
        ("fe80::1", RangeKind::LinkLocal),
        ("febf::1", RangeKind::LinkLocal),
        ("fec0::1", RangeKind::Reserved),
        ("ff02::1", RangeKind::Multicast),
    ];
    for (addr, kind) in cases {
        assert_eq!(refused_kind(&p, addr), Some(kind), "{addr}");
    }
}

#[test]
fn the_edges_of_default_ranges_are_public() {
    let p = EgressPolicy::default();
    for addr in [
        "1.1.1.1",
        "8.8.8.8",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2606:4700::1111",
        "2a00:1450::1",
        "2001:4860:4860::8888",
        "fbff::1",
        "fe7f::1",
    ] {
        assert_eq!(p.check_addr(ip(addr), 443), Ok(()), "{addr}");
    }
}

#[test]
fn mapped_ipv6_is_judged_as_the_ipv4_it_carries() {
    let p = EgressPolicy::default();
    assert_eq!(
        refused_kind(&p, "::ffff:169.254.169.254"),
        Some(RangeKind::CloudMetadata)
    );
    assert_eq!(
        refused_kind(&p, "::ffff:127.0.0.1"),
        Some(RangeKind::Loopback)
    );
    assert_eq!(
        refused_kind(&p, "::ffff:10.1.2.3"),
        Some(RangeKind::Private)
    );
    assert_eq!(
        refused_kind(&p, "::ffff:a9fe:a9fe"),
        Some(RangeKind::CloudMetadata)
    );
    assert_eq!(p.check_addr(ip("::ffff:8.8.8.8"), 443), Ok(()));

    // The detail names the address as asked and the IPv4 range that matched.
    let err = p.check_addr(ip("::ffff:169.254.169.254"), 80).unwrap_err();
    assert_eq!(
        err.to_string(),
        "address ::ffff:169.254.169.254 is in the cloud metadata range 169.254.169.254/32"
    );

    // An explicit IPv4 allow covers the mapped form, and a mapped CIDR means its IPv4 block.
    let local = EgressPolicy::default().allowing(cidr("127.0.0.1/32"));
    assert_eq!(local.check_addr(ip("::ffff:127.0.0.1"), 80), Ok(()));
    assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
    let deny = EgressPolicy {
        deny_cidrs: vec![cidr("::ffff:8.8.8.0/120")],
        ..Default::default()
    };
    assert!(matches!(
        deny.check_addr(ip("8.8.8.8"), 53),
        Err(Denied::Cidr { .. })
    ));
}

#[test]
fn nat64_and_6to4_are_judged_by_their_embedded_ipv4_too() {
    let p = EgressPolicy::default();
    // 64:ff9b::a9fe:a9fe is 169.254.169.254 through NAT64.
    assert_eq!(
        refused_kind(&p, "64:ff9b::a9fe:a9fe"),
        Some(RangeKind::CloudMetadata)
    );
    assert_eq!(
        refused_kind(&p, "64:ff9b::10.0.0.1"),
        Some(RangeKind::Private)
    );
    assert_eq!(p.check_addr(ip("64:ff9b::8.8.8.8"), 443), Ok(()));
    // 2002:c0a8:0101:: embeds 192.168.1.1; 2002:0808:0808:: embeds 8.8.8.8.
    assert_eq!(
        refused_kind(&p, "2002:c0a8:101::1"),
        Some(RangeKind::Private)
    );
    assert_eq!(refused_kind(&p, "2002:7f00:1::"), Some(RangeKind::Loopback));
    assert_eq!(p.check_addr(ip("2002:808:808::1"), 443), Ok(()));
}

#[test]
fn explicit_deny_beats_explicit_allow() {
    let p = EgressPolicy {
        allow_cidrs: vec![cidr("10.0.0.0/8"), cidr("8.8.8.0/24")],
        deny_cidrs: vec![cidr("10.0.0.5/32"), cidr("8.8.8.8/32")],
        allow_hosts: vec!["*.corp.example".parse().unwrap()],
        deny_hosts: vec!["secret.corp.example".parse().unwrap()],
        allow_ports: vec![PortRange::single(443)],
        deny_ports: vec![PortRange::single(443)],
        ..Default::default()
    };
    assert!(matches!(
        p.check_addr(ip("8.8.4.4"), 443),
        Err(Denied::Port { .. })
    ));
    let p = EgressPolicy {
        allow_ports: Vec::new(),
        deny_ports: Vec::new(),
        ..p
    };
    assert_eq!(p.check_addr(ip("10.0.0.6"), 443), Ok(()));
    assert_eq!(
        p.check_addr(ip("10.0.0.5"), 443),
        Err(Denied::Cidr {
            addr: ip("10.0.0.5"),
            cidr: cidr("10.0.0.5/32")
        })
    );
    // Explicit deny also beats the public default.
    assert!(matches!(
        p.check_addr(ip("8.8.8.8"), 53),
        Err(Denied::Cidr { .. })
    ));
    assert_eq!(p.check_addr(ip("8.8.8.9"), 53), Ok(()));
    // A denied host is refused before resolution even though a pattern allows it.
    assert!(matches!(
        p.check_target(&name("SECRET.corp.example.", 443)),
        Err(Denied::Host { .. })
    ));
    // An allowed host's addresses still obey deny_cidrs.
    let t = name("db.corp.example", 5432);
    assert_eq!(p.check_target(&t), Ok(()));
    assert_eq!(p.check_resolved(&t, ip("192.168.4.4")), Ok(()));
    assert!(matches!(
        p.check_resolved(&t, ip("10.0.0.5")),
        Err(Denied::Cidr { .. })
    ));
}

#[test]
fn explicit_allow_beats_default_ranges() {
    let p = EgressPolicy::default().allowing(cidr("127.0.0.1/32"));
    assert_eq!(p.check_addr(ip("127.0.0.1"), 8080), Ok(()));
    assert_eq!(p.check_target(&literal("127.0.0.1", 8080)), Ok(()));
    assert_eq!(refused_kind(&p, "127.0.0.2"), Some(RangeKind::Loopback));
    assert_eq!(refused_kind(&p, "::1"), Some(RangeKind::Loopback));

    // allow_hosts lifts the default ranges for the addresses of that name only.
    let p = EgressPolicy {
        allow_hosts: vec!["internal.example".parse().unwrap()],
        ..Default::default()
    };
    assert_eq!(
        p.check_resolved(&name("internal.example", 80), ip("10.1.1.1")),
        Ok(())
    );
    assert!(p
        .check_resolved(&name("other.example", 80), ip("10.1.1.1"))
        .is_err());
    assert!(p.check_addr(ip("10.1.1.1"), 80).is_err());
    assert!(p.check_target(&literal("10.1.1.1", 80)).is_err());
}

#[test]
fn allow_private_lifts_only_private_ranges() {
    let p = EgressPolicy {
        allow_private: true,
        ..Default::default()
    };
    for addr in [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.0.1",
        "100.64.0.1",
        "fd12::1",
        "::ffff:10.0.0.1",
    ] {
        assert_eq!(p.check_addr(ip(addr), 80), Ok(()), "{addr}");
    }
    for (addr, kind) in [
        ("127.0.0.1", RangeKind::Loopback),
        ("169.254.169.254", RangeKind::CloudMetadata),
        ("169.254.170.2", RangeKind::CloudMetadata),
        ("fd00:ec2::254", RangeKind::CloudMetadata),
        // Alibaba Cloud's, inside the shared range that allow_private lifts.
        ("100.100.100.200", RangeKind::CloudMetadata),
        ("::ffff:100.100.100.200", RangeKind::CloudMetadata),
        ("169.254.1.1", RangeKind::LinkLocal),
        ("fe80::1", RangeKind::LinkLocal),
        ("224.0.0.1", RangeKind::Multicast),
        ("::1", RangeKind::Loopback),
        ("0.0.0.0", RangeKind::Unspecified),
    ] {
        assert_eq!(refused_kind(&p, addr), Some(kind), "{addr}");
    }
}

#[test]
fn port_rules() {
    let p = EgressPolicy {
        allow_ports: PortRange::parse_list("80,443,8000-8100").unwrap(),
        deny_ports: vec!["8080".parse().unwrap()],
        ..Default::default()
    };
    for port in [80, 443, 8000, 8050, 8100] {
        assert_eq!(p.check_target(&name("example.com", port)), Ok(()), "{port}");
    }
    assert_eq!(
        p.check_target(&name("example.com", 22)),
        Err(Denied::PortNotAllowed { port: 22 })
    );
    assert_eq!(
        p.check_target(&name("example.com", 8101)),
        Err(Denied::PortNotAllowed { port: 8101 })
    );
    assert_eq!(
        p.check_target(&name("example.com", 8080)),
        Err(Denied::Port {
            port: 8080,
            rule: PortRange::single(8080)
        })
    );
    // The resolved-address check applies the port rules too.
    assert!(p.check_addr(ip("8.8.8.8"), 22).is_err());
    // Without allow_ports every port not denied is allowed.
    assert_eq!(
        EgressPolicy::default().check_target(&name("example.com", 22)),
        Ok(())
    );
}

#[test]
fn host_patterns() {
    let p: HostPattern = "*.Example.COM".parse().unwrap();
    assert!(p.matches("a.example.com"));
    assert!(p.matches("a.b.EXAMPLE.com"));
    assert!(p.matches("a.example.com."));
    assert!(!p.matches("example.com"));
    assert!(!p.matches("badexample.com"));
    assert!(!p.matches("example.com.evil"));
    assert!(!p.matches(".example.co"));
    assert!(!p.matches(""));
    assert_eq!(p.to_string(), "*.example.com");

    let exact: HostPattern = "metadata.google.internal.".parse().unwrap();
    assert!(exact.matches("METADATA.google.internal"));
    assert!(exact.matches("metadata.google.internal."));
    assert!(!exact.matches("x.metadata.google.internal"));

    for bad in [
        "",
        "*",
        "*.",
        "a.*.com",
        "*example.com",
        "10.0.0.1",
        "::1",
        "a..b",
        "a b",
        "a/b",
    ] {
        assert!(bad.parse::<HostPattern>().is_err(), "{bad:?}");
    }
    // A denied name is refused whatever its case or trailing dot.
    let p = EgressPolicy {
        deny_hosts: vec!["metadata.google.internal".parse().unwrap()],
        ..Default::default()
    };
    let t = Target::new(Host::Name("Metadata.Google.Internal.".into()), 80);
    let err = p.check_target(&t).unwrap_err();
    let refusal = err.to_refusal();
    assert_eq!(refusal.reason, RefusalReason::DeniedByPolicy);
    assert!(
        refusal
            .detail
            .contains("deny_hosts metadata.google.internal"),
        "{}",
        refusal.detail
    );
}

#[test]
fn cidr_parsing() {
    assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
    assert_eq!(cidr("10.1.2.3").to_string(), "10.1.2.3/32");
    assert_eq!(cidr("fe80::1/10").to_string(), "fe80::/10");
    assert_eq!(cidr("::1").to_string(), "::1/128");
    assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
    assert!(cidr("0.0.0.0/0").contains(ip("255.1.2.3")));
    assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
    assert!(cidr("::/0").contains(ip("2001:db8::1")));
    for bad in [
        "",
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "10.0.0/8",
        "host/8",
        "10.0.0.0/8/8",
        "10.0.0.0/0008",
    ] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
    }
}

#[test]
fn port_range_parsing() {
    assert_eq!(
        "8000-8100".parse::<PortRange>().unwrap(),
        PortRange::new(8000, 8100).unwrap()
    );
    assert_eq!(PortRange::parse_list(" 80, 443 ,").unwrap().len(), 2);
    for bad in ["", "-1", "65536", "90-80", "a", "80-", "1-2-3", "+80"] {
        assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
    }
}

#[test]
fn policy_from_toml() {
    let p: EgressPolicy = toml::from_str(
        r#"
        allow_cidrs = ["127.0.0.1/32"]
        deny_cidrs = ["8.8.4.4"]
        allow_hosts = ["*.corp.example"]
        deny_hosts = ["metadata.google.internal"]
        allow_ports = [80, 443, "8000-8100"]
        deny_ports = ["25"]
        allow_private = true
        "#,
    )
    .unwrap();
    assert_eq!(p.allow_cidrs, vec![cidr("127.0.0.1/32")]);
    assert_eq!(p.deny_cidrs, vec![cidr("8.8.4.4/32")]);
    assert_eq!(p.allow_ports.len(), 3);
    assert!(p.allow_private);
    assert_eq!(p.check_addr(ip("127.0.0.1"), 8050), Ok(()));

    // Defaults when absent; unknown keys and bad values are errors.
    let empty: EgressPolicy = toml::from_str("").unwrap();
    assert_eq!(empty, EgressPolicy::default());
    assert!(!empty.allow_private);
    assert!(toml::from_str::<EgressPolicy>("allow_cidr = []").is_err());
    assert!(toml::from_str::<EgressPolicy>("allow_cidrs = [\"10.0.0.0/40\"]").is_err());
    assert!(toml::from_str::<EgressPolicy>("allow_ports = [70000]").is_err());
    assert!(toml::from_str::<EgressPolicy>("allow_ports = [-1]").is_err());

    // What serializes parses back to the same policy.
    let text = toml::to_string(&p).unwrap();
    assert_eq!(toml::from_str::<EgressPolicy>(&text).unwrap(), p);
}

#[test]
fn rules_from_the_command_line() {
    let mut p = EgressPolicy::default();
    for rule in [
        "allow_cidrs=127.0.0.1/32,::1",
        "deny-hosts=*.internal",
        "allow_ports=80,443,8000-8100",
        "deny_ports=25",
        "deny_cidrs=1.2.3.4",
        "allow_hosts=svc.local",
        "allow_private=true",
    ] {
        let parsed = rule.parse::<EgressRule>().unwrap();
        // Shown as given (in its canonical spelling), and read back the same.
        let shown = parsed.to_string();
        assert_eq!(shown.parse::<EgressRule>().unwrap(), parsed, "{shown}");
        p.apply(parsed);
    }
    assert_eq!(
        "allow_cidrs=127.0.0.1/32,::1"
            .parse::<EgressRule>()
            .unwrap()
            .to_string(),
        "allow_cidrs=127.0.0.1/32,::1/128"
    );
    assert_eq!(p.allow_cidrs, vec![cidr("127.0.0.1/32"), cidr("::1/128")]);
    assert_eq!(p.deny_hosts.len(), 1);
    assert_eq!(p.allow_ports.len(), 3);
    assert_eq!(p.deny_ports, vec![PortRange::single(25)]);
    assert!(p.allow_private);
    assert!(p.check_target(&name("db.internal", 443)).is_err());

    for bad in [
        "allow_cidrs",
        "allow_cidr=10.0.0.0/8",
        "allow_cidrs=10.0.0.0/99",
        "allow_private=maybe",
        "deny_hosts=*",
        "allow_ports=http",
    ] {
        assert!(bad.parse::<EgressRule>().is_err(), "{bad:?}");
    }
}

#[test]
fn ip_literal_targets_are_checked_as_addresses() {
    let p = EgressPolicy::default();
    for addr in [
        "169.254.169.254",
        "127.0.0.1",
        "::1",
        "::ffff:169.254.169.254",
    ] {
        let t = literal(addr, 80);
        let refusal = p.check_target(&t).unwrap_err().to_refusal();
        assert_eq!(refusal.reason, RefusalReason::DeniedByPolicy);
        // The rule and the address it judged (an embedded IPv4 address as itself).
        assert!(
            refusal.detail.starts_with("address ") && refusal.detail.contains(" range "),
            "{}",
            refusal.detail
        );
    }
    assert_eq!(p.check_target(&literal("93.184.216.34", 80)), Ok(()));
    // Names are not judged as addresses before resolution.
    assert_eq!(p.check_target(&name("localhost", 80)), Ok(()));
}

/// First octets whose /8 holds no default-denied range at all: an oracle independent of
/// the policy's own tables.
const PUBLIC_FIRST_OCTETS: &[u8] = &[
    1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 20, 31, 45, 52, 54, 64, 81, 99, 101, 126, 128, 130, 151,
    168, 170, 171, 173, 185, 191, 193, 197, 199, 202, 204, 212, 223,
];

/// Blocks that must always be refused under the default policy.
const PRIVATE_BLOCKS: &[(u32, u8)] = &[
    (0x0000_0000, 8),  // 0/8
    (0x0a00_0000, 8),  // 10/8
    (0x6440_0000, 10), // 100.64/10
    (0x7f00_0000, 8),  // 127/8
    (0xa9fe_0000, 16), // 169.254/16
    (0xac10_0000, 12), // 172.16/12
    (0xc0a8_0000, 16), // 192.168/16
    (0xe000_0000, 4),  // 224/4
    (0xf000_0000, 4),  // 240/4
];

proptest! {
    #[test]
    fn random_public_ipv4_passes(
        first in proptest::sample::select(PUBLIC_FIRST_OCTETS),
        rest in any::<[u8; 3]>(),
        port in 1u16..,
    ) {
        let addr = Ipv4Addr::new(first, rest[0], rest[1], rest[2]);
        let p = EgressPolicy::default();
        prop_assert_eq!(p.check_addr(IpAddr::V4(addr), port), Ok(()));
        prop_assert_eq!(p.check_addr(IpAddr::V6(addr.to_ipv6_mapped()), port), Ok(()));
        prop_assert_eq!(p.check_target(&Target::new(Host::from(addr), port)), Ok(()));
    }

    #[test]
    fn random_private_ipv4_is_denied(
        block in proptest::sample::select(PRIVATE_BLOCKS),
        bits in any::<u32>(),
        port in any::<u16>(),
    ) {
        let (net, prefix) = block;
        let host_mask = u32::MAX >> prefix;
        let addr = Ipv4Addr::from(net | (bits & host_mask));
        let p = EgressPolicy::default();
        let denied_v4 = matches!(
            p.check_addr(IpAddr::V4(addr), port),
            Err(Denied::DefaultRange { .. })
        );
        prop_assert!(denied_v4, "{} passed", addr);
        // The same address reached through a mapped, NAT64 or 6to4 IPv6 address.
        let v4 = u128::from(u32::from(addr));
        let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | v4);
        let six_to_four = Ipv6Addr::from((0x2002_u128 << 112) | (v4 << 80));
        for v6 in [addr.to_ipv6_mapped(), nat64, six_to_four] {
            let denied = matches!(
                p.check_addr(IpAddr::V6(v6), port),
                Err(Denied::DefaultRange { .. })
            );
            prop_assert!(denied, "{} passed", v6);
        }
    }

    #[test]
    fn random_public_ipv6_passes(bits in any::<u128>()) {
        // 2400::/6 is 2400:: to 27ff:..., all regional registry allocations.
        let addr = Ipv6Addr::from((0x2400_u128 << 112) | (bits >> 6));
        prop_assert_eq!(EgressPolicy::default().check_addr(IpAddr::V6(addr), 443), Ok(()));
    }

    #[test]
    fn parsers_never_panic(s in "\\PC{0,40}") {
        let _ = s.parse::<Cidr>();
        let _ = s.parse::<HostPattern>();
        let _ = s.parse::<PortRange>();
        let _ = s.parse::<EgressRule>();
    }

    #[test]
    fn host_pattern_matching_never_panics(pattern in "[a-z]{1,5}(\\.[a-z]{1,5}){0,2}", name in "\\PC{0,30}") {
        for p in [pattern.clone(), format!("*.{pattern}")] {
            let p: HostPattern = p.parse().unwrap();
            let _ = p.matches(&name);
        }
    }
}
