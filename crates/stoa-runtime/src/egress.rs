//! Outbound network of sandboxed processes that have network (runs of a profile with
//! network on, environment builds): they run as the sandbox uid in the host's network
//! namespace, and an iptables chain matched on that uid refuses their packets to
//! internal destinations (loopback, private and link-local ranges, the metadata
//! address…), except DNS to the host's resolvers and the destinations the operator
//! allows. Installed once at start, idempotently; needs root and iptables.

use std::net::IpAddr;
use std::process::Command;

/// The chain of a sandbox uid, in `iptables` and `ip6tables` (one per uid, so servers
/// with other policies on the same machine use other uids).
pub fn chain(uid: u32) -> String {
    format!("STOA-EGRESS-{uid}")
}

/// Policies installed by this process, by uid: the same one is not installed twice
/// (a refresh flushes the chain for a moment).
static INSTALLED: std::sync::Mutex<Vec<(u32, Vec<String>)>> = std::sync::Mutex::new(Vec::new());

/// What the rules refuse and allow.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// The sandbox uid whose packets are filtered.
    pub uid: u32,
    /// Internal IPv4 destinations (CIDRs), refused.
    pub internal_v4: Vec<String>,
    /// Internal IPv6 destinations (CIDRs), refused.
    pub internal_v6: Vec<String>,
    /// Destinations allowed although internal (`python.allowed_destinations`, the
    /// package index when it is internal).
    pub allow: Vec<String>,
}

/// Installs (or refreshes) the rules. An error says why they could not be installed.
pub fn install(p: &EgressPolicy) -> Result<(), String> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if installed.iter().any(|(u, a)| *u == p.uid && *a == p.allow) {
        return Ok(());
    }
    let chain = chain(p.uid);
    let chain = chain.as_str();
    let resolvers = resolvers();
    for (tool, internal, v6) in [
        ("iptables", &p.internal_v4, false),
        ("ip6tables", &p.internal_v6, true),
    ] {
        let ipt = |args: &[&str]| -> Result<bool, String> {
            let out = Command::new(tool)
                .arg("-w")
                .args(args)
                .output()
                .map_err(|e| format!("{tool}: {e}"))?;
            Ok(out.status.success())
        };
        let must = |args: &[&str]| -> Result<(), String> {
            let out = Command::new(tool)
                .arg("-w")
                .args(args)
                .output()
                .map_err(|e| format!("{tool}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{tool} {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        if !ipt(&["-N", chain])? {
            must(&["-F", chain])?;
        }
        let uid = p.uid.to_string();
        let jump = ["-m", "owner", "--uid-owner", &uid, "-j", chain];
        if !ipt(&[&["-C", "OUTPUT"][..], &jump].concat())? {
            must(&[&["-I", "OUTPUT", "1"][..], &jump].concat())?;
        }
        for r in resolvers.iter().filter(|r| r.is_ipv6() == v6) {
            let r = r.to_string();
            for proto in ["udp", "tcp"] {
                must(&["-A", chain, "-d", &r, "-p", proto, "--dport", "53", "-j", "RETURN"])?;
            }
        }
        for a in p.allow.iter().filter(|a| a.contains(':') == v6) {
            must(&["-A", chain, "-d", a, "-j", "RETURN"])?;
        }
        let reject = if v6 {
            "icmp6-adm-prohibited"
        } else {
            "icmp-admin-prohibited"
        };
        for cidr in internal.iter() {
            must(&[
                "-A",
                chain,
                "-d",
                cidr,
                "-j",
                "REJECT",
                "--reject-with",
                reject,
            ])?;
        }
    }
    installed.retain(|(u, _)| *u != p.uid);
    installed.push((p.uid, p.allow.clone()));
    Ok(())
}

/// The name servers of `/etc/resolv.conf`.
fn resolvers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}
