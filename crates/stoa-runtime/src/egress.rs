//! Outbound network of sandboxed processes that have network (runs of a profile with
//! network on, environment builds): they run as the sandbox uid in the host's network
//! namespace, and an iptables chain matched on that uid refuses their packets to
//! internal destinations (loopback, private and link-local ranges, the metadata
//! address…) and to the host's own addresses, except DNS to the host's resolvers and
//! the destinations the operator allows. Installed at start, idempotently and
//! atomically (`iptables-restore --noflush` rewrites the chain in one step); needs root
//! and iptables.

use stoa_core::netguard::{INTERNAL_V4, INTERNAL_V6};

use crate::firewall::{ensure_first, iptables};

/// The chain of a sandbox uid, in `iptables` and `ip6tables` (one per uid, so servers
/// with other policies on the same machine use other uids).
pub fn chain(uid: u32) -> String {
    format!("STOA-EGRESS-{uid}")
}

/// What the rules refuse and allow.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// The sandbox uid whose packets are filtered.
    pub uid: u32,
    /// Destinations allowed although internal (`python.allowed_destinations`, the
    /// package index when it is internal).
    pub allow: Vec<String>,
}

/// The `iptables-restore --noflush` input that (re)writes the uid's chain for one
/// address family.
pub fn restore_script(p: &EgressPolicy, v6: bool, resolvers: &[std::net::IpAddr]) -> String {
    let chain = chain(p.uid);
    let (internal, reject) = if v6 {
        (INTERNAL_V6, "icmp6-adm-prohibited")
    } else {
        (INTERNAL_V4, "icmp-admin-prohibited")
    };
    // Declaring a chain with --noflush creates it, or empties it when it exists.
    let mut s = format!("*filter\n:{chain} - [0:0]\n");
    for r in resolvers.iter().filter(|r| r.is_ipv6() == v6) {
        for proto in ["udp", "tcp"] {
            s.push_str(&format!(
                "-A {chain} -d {r} -p {proto} --dport 53 -j RETURN\n"
            ));
        }
    }
    for a in p.allow.iter().filter(|a| a.contains(':') == v6) {
        s.push_str(&format!("-A {chain} -d {a} -j RETURN\n"));
    }
    // The host's own addresses (public ones too): services listening on all
    // interfaces, and other runs with network, are not for runs.
    s.push_str(&format!(
        "-A {chain} -m addrtype --dst-type LOCAL -j REJECT --reject-with {reject}\n"
    ));
    for cidr in internal {
        s.push_str(&format!(
            "-A {chain} -d {cidr} -j REJECT --reject-with {reject}\n"
        ));
    }
    s.push_str("COMMIT\n");
    s
}

/// Policies installed by this process, by uid, and when: the same one is installed again
/// only once [`REFRESH`] has passed (something else may have flushed the rules).
static INSTALLED: std::sync::Mutex<Vec<(u32, Vec<String>, std::time::Instant)>> =
    std::sync::Mutex::new(Vec::new());

/// How long an installation is trusted before it is written again.
const REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Installs (or rewrites) the rules, unless this process did so for the same policy
/// within [`REFRESH`]. Called at start and before each sandboxed process with network.
/// An error says why they could not be installed.
pub fn install(p: &EgressPolicy) -> Result<(), String> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if installed
        .iter()
        .any(|(u, a, at)| *u == p.uid && *a == p.allow && at.elapsed() < REFRESH)
    {
        return Ok(());
    }
    // Several servers (and Docker) change the firewall at once: a failed attempt is
    // tried again before it counts.
    let mut attempt = 0;
    while let Err(e) = write_rules(p) {
        attempt += 1;
        if attempt == 3 {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    installed.retain(|(u, _, _)| *u != p.uid);
    installed.push((p.uid, p.allow.clone(), std::time::Instant::now()));
    Ok(())
}

/// Writes the uid's chains (IPv4 and IPv6) and the jumps to them.
fn write_rules(p: &EgressPolicy) -> Result<(), String> {
    // A local caching resolver is reached on loopback: the run's DNS goes there.
    let resolvers = crate::firewall::resolvers(true);
    let chain = chain(p.uid);
    let uid = p.uid.to_string();
    for (tool, v6) in [("iptables", false), ("ip6tables", true)] {
        iptables(
            &format!("{tool}-restore"),
            &["-w", "--noflush"],
            Some(&restore_script(p, v6, &resolvers)),
        )?;
        ensure_first(
            tool,
            "OUTPUT",
            &["-m", "owner", "--uid-owner", &uid, "-j", &chain],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_refuses_internal_ranges_after_dns_and_allowed_ones() {
        let p = EgressPolicy {
            uid: 64_500,
            allow: vec!["10.1.2.3".into()],
        };
        let s = restore_script(&p, false, &["10.255.255.53".parse().unwrap()]);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[1], ":STOA-EGRESS-64500 - [0:0]");
        assert!(lines[2].contains("-d 10.255.255.53 -p udp --dport 53 -j RETURN"));
        assert!(lines[4].contains("-d 10.1.2.3 -j RETURN"));
        assert!(lines[5].contains("--dst-type LOCAL -j REJECT"));
        assert!(
            lines[6..]
                .iter()
                .any(|l| l.contains("-d 127.0.0.0/8 -j REJECT"))
        );
        for cidr in INTERNAL_V4 {
            assert!(s.contains(&format!("-d {cidr} -j REJECT")), "{cidr}");
        }
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        let s6 = restore_script(&p, true, &[]);
        assert!(s6.contains("-d ::1/128 -j REJECT --reject-with icmp6-adm-prohibited"));
        assert!(!s6.contains("10.1.2.3"));
    }
}
