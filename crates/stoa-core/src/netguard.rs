//! Which network addresses runs, callbacks and image pulls must not reach unless the
//! operator allows them: loopback, "this network", private (RFC 1918), carrier-grade
//! NAT, link-local (with the cloud metadata address 169.254.169.254), IETF protocol
//! assignments, benchmarking, multicast and reserved ranges, and their IPv6
//! counterparts, including the IPv6 forms that embed an IPv4 address. Pure: no IO.
//!
//! [`INTERNAL_V4`] and [`INTERNAL_V6`] are CIDR strings meant as firewall destinations.
//! For the IPv6 prefixes that embed an IPv4 address (mapped `::ffff:0:0/96`,
//! compatible `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) the lists cover the
//! whole prefix, since a firewall cannot look inside; [`is_internal`] looks at the
//! embedded address, so `64:ff9b::808:808` (NAT64 to a public address) is not internal
//! while `64:ff9b::7f00:1` is. The documentation ranges (192.0.2.0/24,
//! 198.51.100.0/24, 203.0.113.0/24) are deliberately not listed: closed networks
//! (package mirrors of test networks, for one) use them as real addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 destinations that are internal, as CIDRs (usable with `iptables -d`).
pub const INTERNAL_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 destinations that are internal, as CIDRs (usable with `ip6tables -d`). The
/// prefixes that embed an IPv4 address are listed whole (see the module doc).
pub const INTERNAL_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "::/96",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// An address block: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a block of one). `None` when it
    /// is neither, or the prefix is longer than the address.
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim_matches(|c| c == '[' || c == ']').parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            // Digits only: `u8::from_str` would take a leading `+`.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok()?
            }
            Some(_) => return None,
            None => max,
        };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` lies in the block (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(n) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(n) & mask
            }
            _ => false,
        }
    }
}

fn in_list(list: &[&str], ip: IpAddr) -> bool {
    list.iter()
        .filter_map(|c| Cidr::parse(c))
        .any(|c| c.contains(ip))
}

/// The IPv4 address an IPv6 address embeds: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 well-known prefix (`64:ff9b::a.b.c.d`) or
/// 6to4 (`2002:AABB:CCDD::/48`).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

/// Whether an address is one that runs, callbacks and pulls must not reach by default.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => in_list(INTERNAL_V4, ip),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some(v4) => is_internal(IpAddr::V4(v4)),
            None => in_list(INTERNAL_V6, ip),
        },
    }
}

/// The address a host name stands for without any lookup: an IP literal (brackets
/// allowed), or an IPv4 address in one of the shorthand forms resolvers accept
/// (`127.1`, `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`).
pub fn host_ip(host: &str) -> Option<IpAddr> {
    let h = host.trim_matches(|c| c == '[' || c == ']');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip);
    }
    lenient_ipv4(h).map(IpAddr::V4)
}

/// `inet_aton`'s forms: one to four parts, each decimal, octal (`0…`) or hex (`0x…`);
/// the last part fills the remaining bytes.
fn lenient_ipv4(s: &str) -> Option<Ipv4Addr> {
    let s = s.strip_suffix('.').unwrap_or(s);
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or(p.strip_prefix("0X")) {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let n = if digits.is_empty() {
            0
        } else {
            if !digits.chars().all(|c| c.is_digit(radix)) {
                return None;
            }
            u64::from_str_radix(digits, radix).ok()?
        };
        nums.push(n);
    }
    let (last, head) = nums.split_last()?;
    if head.iter().any(|&n| n > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - head.len() as u32);
    if rest_bits < 64 && *last >= (1u64 << rest_bits) {
        return None;
    }
    let mut v: u32 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= (*n as u32) << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(v | *last as u32))
}

/// A URL with any `user:password@` taken out, for logs and error messages.
pub fn strip_credentials(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The registry part of an image reference (`127.0.0.1:5000` of
/// `127.0.0.1:5000/a/b:1`), or `None` for Docker Hub. As the engine reads it: the
/// first path component when it has a `.` or a `:`, is `localhost`, or has an
/// upper-case letter (which a repository name cannot have).
pub fn image_registry(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    (first.contains(['.', ':'])
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase()))
    .then_some(first)
}

/// The host of a registry (`[::1]:5000` → `::1`, `reg:5000` → `reg`), lower-cased,
/// without a trailing dot.
pub fn registry_host(registry: &str) -> String {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.split(':').next().unwrap_or(registry)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `registry` (as written in an image reference) is listed in `allowed`
/// (`docker.allowed_registries`: `host:port` or `host` entries, case-insensitive).
pub fn registry_allowed(registry: &str, allowed: &[String]) -> bool {
    allowed
        .iter()
        .any(|a| a.trim().eq_ignore_ascii_case(registry))
}

/// The registry of `image` when it is internal by its name alone (a loopback name
/// such as `localhost`, or an internal IP literal) and not in `allowed`. Names that
/// resolve to internal addresses are caught where the image is pulled.
pub fn internal_registry<'a>(image: &'a str, allowed: &[String]) -> Option<&'a str> {
    let registry = image_registry(image)?;
    if registry_allowed(registry, allowed) {
        return None;
    }
    let host = registry_host(registry);
    let internal = host == "localhost"
        || host.ends_with(".localhost")
        || host_ip(&host).is_some_and(is_internal);
    internal.then_some(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_lists_are_valid_cidrs() {
        for c in INTERNAL_V4 {
            let p = Cidr::parse(c).unwrap_or_else(|| panic!("{c}"));
            assert!(p.addr.is_ipv4() && c.contains('/'), "{c}");
        }
        for c in INTERNAL_V6 {
            let p = Cidr::parse(c).unwrap_or_else(|| panic!("{c}"));
            assert!(p.addr.is_ipv6() && c.contains('/'), "{c}");
        }
    }

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "fc00::1",
            "fd00::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(is_internal(ip(a)), "{a} is internal");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "198.20.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.80",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!is_internal(ip(a)), "{a} is not internal");
        }
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.9.8.7")) && !c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::ffff:10.0.0.1")), "families never mix");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(Cidr::parse("10.1.2.3").unwrap().contains(ip("10.1.2.3")));
        assert!(!Cidr::parse("10.1.2.3").unwrap().contains(ip("10.1.2.4")));
        assert!(Cidr::parse("[::1]").unwrap().contains(ip("::1")));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "",
        ] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn host_ip_takes_the_shorthand_forms() {
        for (h, want) in [
            ("127.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f.0.0.1", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("169.254.43518", "169.254.169.254"),
            ("[::1]", "::1"),
            ("10.0.0.5", "10.0.0.5"),
        ] {
            assert_eq!(host_ip(h), Some(ip(want)), "{h}");
        }
        for h in [
            "registry.example.com",
            "256.0.0.1",
            "1.2.3.4.5",
            "09.1.1.1",
            "a",
        ] {
            assert_eq!(host_ip(h), None, "{h}");
        }
    }

    #[test]
    fn credentials_are_stripped() {
        assert_eq!(
            strip_credentials("https://user:pw@example.com:8443/cb?x=1"),
            "https://example.com:8443/cb?x=1"
        );
        assert_eq!(
            strip_credentials("http://a@b:c@example.com/"),
            "http://example.com/"
        );
        assert_eq!(
            strip_credentials("http://example.com/p@th"),
            "http://example.com/p@th"
        );
        assert_eq!(strip_credentials("not a url"), "not a url");
    }

    #[test]
    fn registries_of_image_references() {
        assert_eq!(image_registry("busybox"), None);
        assert_eq!(image_registry("library/busybox:1"), None);
        assert_eq!(image_registry("local/busybox:full"), None);
        assert_eq!(image_registry("localhost/x"), Some("localhost"));
        assert_eq!(image_registry("LOCALHOST/x"), Some("LOCALHOST"));
        assert_eq!(image_registry("127.0.0.1:5000/x:1"), Some("127.0.0.1:5000"));
        assert_eq!(image_registry("[::1]:5000/x"), Some("[::1]:5000"));
        assert_eq!(registry_host("[::1]:5000"), "::1");
        assert_eq!(registry_host("Reg.Example.com.:443"), "reg.example.com");
    }

    #[test]
    fn internal_registries_are_refused_unless_allowed() {
        for image in [
            "127.0.0.1:5000/x",
            "localhost:5000/x",
            "localhost/x",
            "LocalHost:5000/x",
            "registry.localhost/x",
            "169.254.169.254/x",
            "[::1]:5000/x",
            "[::ffff:127.0.0.1]:5000/x",
            "10.0.0.5/x",
            "192.168.1.10:5000/team/img:1",
            "2130706433:5000/x",
            "127.1:5000/x",
        ] {
            assert!(internal_registry(image, &[]).is_some(), "{image}");
        }
        for image in [
            "busybox",
            "python:3.11",
            "registry.example.com/team/img:1",
            "203.0.113.80:5000/x",
            "ghcr.io/org/img@sha256:abc",
        ] {
            assert_eq!(internal_registry(image, &[]), None, "{image}");
        }
        let allowed = vec!["127.0.0.1:5000".to_string(), "LOCALHOST:5001".to_string()];
        assert_eq!(internal_registry("127.0.0.1:5000/x", &allowed), None);
        assert_eq!(internal_registry("localhost:5001/x", &allowed), None);
        assert_eq!(
            internal_registry("127.0.0.1:5001/x", &allowed),
            Some("127.0.0.1:5001")
        );
    }
}
