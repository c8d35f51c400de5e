//! Egress rules for the networks of Stoa's containers.
//!
//! Every network Stoa makes is a bridge named `stoa…` ([`BRIDGE_PREFIX`]). Once at
//! start, and again at each reconciler pass (idempotent), iptables rules are installed
//! so that traffic coming in from those bridges
//! - to another `stoa` bridge is left to Docker (its isolation chains keep networks
//!   apart; the services of one stack talk on their own bridge);
//! - to the host itself (INPUT) is refused, whatever address of the host it targets;
//! - to an internal destination ([`stoa_core::netguard::INTERNAL_V4`] / `_V6`) is
//!   refused, except the host's DNS resolvers on port 53 (Docker's embedded DNS
//!   forwards queries from inside the container's network namespace) and the
//!   operator's `docker.allowed_destinations`;
//! - replies of connections opened from outside are let through.
//!
//! The rules live in two chains of their own, [`EGRESS_CHAIN`] (jumped to from
//! `DOCKER-USER`, created when missing) and [`INPUT_CHAIN`] (jumped to from `INPUT`),
//! each rewritten atomically with `iptables-restore --noflush`. The chains are shared
//! by every Stoa installation of the host: the last one started sets the allow-list.

use std::net::IpAddr;

use stoa_core::netguard::{Cidr, INTERNAL_V4, INTERNAL_V6};

/// Prefix of the Linux bridge of every Stoa network (`stoa` + 11 hex digits).
pub const BRIDGE_PREFIX: &str = "stoa";
/// Chain with the forwarding rules of traffic from Stoa bridges.
pub const EGRESS_CHAIN: &str = "STOA-EGRESS";
/// Chain with the rules of traffic from Stoa bridges to the host itself.
pub const INPUT_CHAIN: &str = "STOA-INPUT";

/// A fresh bridge name: `stoa` and 11 hex digits (15 characters, the Linux limit).
pub fn bridge_name(seed: &str) -> String {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    (seed, std::process::id()).hash(&mut h);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    format!("{BRIDGE_PREFIX}{:011x}", h.finish() & 0xfff_ffff_ffff)
}

/// The `iptables-restore --noflush` input that (re)writes both chains for one address
/// family. `allowed` and `resolvers` of the other family are left out.
pub fn restore_script(v6: bool, allowed: &[Cidr], resolvers: &[IpAddr]) -> String {
    let internal = if v6 { INTERNAL_V6 } else { INTERNAL_V4 };
    let reject = if v6 {
        "-j REJECT --reject-with icmp6-adm-prohibited"
    } else {
        "-j REJECT --reject-with icmp-admin-prohibited"
    };
    let host_bits = if v6 { 128 } else { 32 };
    let mut s = String::from("*filter\n");
    // Declaring a chain with --noflush creates it, or empties it when it exists.
    s.push_str(&format!(
        ":{EGRESS_CHAIN} - [0:0]\n:{INPUT_CHAIN} - [0:0]\n"
    ));
    let egress = |rule: &str| format!("-A {EGRESS_CHAIN} {rule}\n");
    let input = |rule: &str| format!("-A {INPUT_CHAIN} {rule}\n");
    s.push_str(&egress(&format!("-o {BRIDGE_PREFIX}+ -j RETURN")));
    s.push_str(&egress(
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    ));
    for r in resolvers.iter().filter(|r| r.is_ipv6() == v6) {
        for proto in ["udp", "tcp"] {
            s.push_str(&egress(&format!(
                "-d {r}/{host_bits} -p {proto} --dport 53 -j RETURN"
            )));
        }
    }
    for a in allowed.iter().filter(|a| a.addr.is_ipv6() == v6) {
        s.push_str(&egress(&format!("-d {}/{} -j RETURN", a.addr, a.prefix)));
    }
    for d in internal {
        s.push_str(&egress(&format!("-d {d} {reject}")));
    }
    s.push_str(&input(
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    ));
    for a in allowed.iter().filter(|a| a.addr.is_ipv6() == v6) {
        s.push_str(&input(&format!("-d {}/{} -j RETURN", a.addr, a.prefix)));
    }
    s.push_str(&input(reject));
    s.push_str("COMMIT\n");
    s
}

/// The nameservers of the host's resolver configuration that are not loopback (those
/// Docker's embedded DNS forwards to).
fn host_resolvers() -> Vec<IpAddr> {
    resolvers(false)
}

/// The nameservers of the host's resolver configuration; loopback ones (a local
/// caching resolver) only with `loopback`.
pub(crate) fn resolvers(loopback: bool) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for f in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                continue;
            }
            if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok())
                && (loopback || !ip.is_loopback())
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
    }
    out
}

/// Runs an iptables tool (`iptables`, `ip6tables`, their `-restore`), with `stdin`
/// when given. `Ok(false)` is a `-C` check that found no such rule; any other failure
/// is an error with the tool's words.
pub(crate) fn iptables(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<bool, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("{bin}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if out.status.success() {
        return Ok(true);
    }
    // `-C` answers 1 for a rule that is not there; anything else is a failure.
    if args.contains(&"-C") && out.status.code() == Some(1) {
        return Ok(false);
    }
    Err(format!(
        "{bin} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Makes sure `parent` jumps with `rule` (match and `-j` target) first.
pub(crate) fn ensure_first(bin: &str, parent: &str, rule: &[&str]) -> Result<(), String> {
    let check: Vec<&str> = ["-w", "-C", parent].iter().chain(rule).copied().collect();
    if !iptables(bin, &check, None)? {
        let insert: Vec<&str> = ["-w", "-I", parent, "1"]
            .iter()
            .chain(rule)
            .copied()
            .collect();
        iptables(bin, &insert, None)?;
    }
    Ok(())
}

/// Makes sure `parent` jumps to `chain` for traffic from Stoa bridges, first.
fn ensure_jump(bin: &str, parent: &str, chain: &str) -> Result<(), String> {
    let iface = format!("{BRIDGE_PREFIX}+");
    ensure_first(bin, parent, &["-i", iface.as_str(), "-j", chain])
}

fn install_family(v6: bool, allowed: &[Cidr], resolvers: &[IpAddr]) -> Result<(), String> {
    let (bin, restore) = if v6 {
        ("ip6tables", "ip6tables-restore")
    } else {
        ("iptables", "iptables-restore")
    };
    let script = restore_script(v6, allowed, resolvers);
    iptables(restore, &["-w", "--noflush"], Some(&script))?;
    // Docker makes DOCKER-USER (IPv4, and IPv6 when its ip6tables support is on) and
    // jumps to it first from FORWARD; without it, FORWARD jumps to our chain itself.
    let has_docker_user = iptables(bin, &["-w", "-S", "DOCKER-USER"], None).is_ok();
    let forward = if has_docker_user || !v6 {
        if !has_docker_user {
            iptables(bin, &["-w", "-N", "DOCKER-USER"], None)?;
        }
        ensure_first(bin, "FORWARD", &["-j", "DOCKER-USER"])?;
        "DOCKER-USER"
    } else {
        "FORWARD"
    };
    ensure_jump(bin, forward, EGRESS_CHAIN)?;
    ensure_jump(bin, "INPUT", INPUT_CHAIN)
}

/// One installation at a time in this process (many runtimes share a test process).
static INSTALLING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Installs (or rewrites) the rules for IPv4 and, where the host has ip6tables, IPv6.
/// An error says why containers' egress is not restricted (no iptables, not root).
pub async fn install(allowed_destinations: &[String]) -> Result<(), String> {
    let allowed: Vec<Cidr> = allowed_destinations
        .iter()
        .filter_map(|d| Cidr::parse(d))
        .collect();
    let resolvers = host_resolvers();
    let _one = INSTALLING.lock().await;
    // The tools run to their end: off the async threads.
    tokio::task::spawn_blocking(move || {
        install_family(false, &allowed, &resolvers)?;
        // A host without IPv6 filtering has no IPv6 path out of the bridges to guard.
        if let Err(e) = install_family(true, &allowed, &resolvers) {
            tracing::debug!(error = %e, "no IPv6 egress rules");
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_the_kernel_limit() {
        let a = bridge_name("x");
        let b = bridge_name("x");
        assert_eq!(a.len(), 15, "{a}");
        assert!(a.starts_with(BRIDGE_PREFIX));
        assert_ne!(a, b);
    }

    #[test]
    fn rules_keep_stacks_together_and_refuse_internal_destinations() {
        let allowed = vec![
            Cidr::parse("10.9.0.0/16").unwrap(),
            Cidr::parse("fd00::1").unwrap(),
        ];
        let s = restore_script(false, &allowed, &["10.255.255.53".parse().unwrap()]);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert_eq!(lines[3], "-A STOA-EGRESS -o stoa+ -j RETURN");
        let pos = |needle: &str| {
            lines
                .iter()
                .position(|l| *l == needle)
                .unwrap_or_else(|| panic!("{needle} in {s}"))
        };
        let dns = pos("-A STOA-EGRESS -d 10.255.255.53/32 -p udp --dport 53 -j RETURN");
        let allow = pos("-A STOA-EGRESS -d 10.9.0.0/16 -j RETURN");
        let meta =
            pos("-A STOA-EGRESS -d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited");
        let private =
            pos("-A STOA-EGRESS -d 10.0.0.0/8 -j REJECT --reject-with icmp-admin-prohibited");
        assert!(dns < private && allow < private && allow < meta);
        let input_allow = pos("-A STOA-INPUT -d 10.9.0.0/16 -j RETURN");
        assert!(input_allow < pos("-A STOA-INPUT -j REJECT --reject-with icmp-admin-prohibited"));
        assert!(
            !s.contains("fd00"),
            "IPv6 entries stay out of the IPv4 rules"
        );
        assert_eq!(lines.last(), Some(&"COMMIT"));
        let s6 = restore_script(true, &allowed, &[]);
        assert!(s6.contains("-A STOA-EGRESS -d fd00::1/128 -j RETURN"));
        assert!(
            s6.contains("-A STOA-EGRESS -d fe80::/10 -j REJECT --reject-with icmp6-adm-prohibited")
        );
        assert!(!s6.contains("10.9.0.0"));
    }
}
