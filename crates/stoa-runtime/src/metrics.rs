//! Measurements of a run's processes: procfs for process groups (sandboxed Python
//! runs), the engine's stats for containers.

use std::collections::HashMap;

/// CPU time (clock ticks) and resident memory (bytes) per process group, from one scan
/// of `/proc`.
#[derive(Debug, Default, Clone)]
pub struct ProcSnapshot {
    pub groups: HashMap<i32, (u64, u64)>,
}

/// Clock ticks per second of `/proc/*/stat` times.
pub const CLOCK_TICKS: f64 = 100.0;

/// Scans `/proc` once and sums CPU time and RSS per process group; a process counts
/// for its own group and those of its ancestors (a sandboxed run is in a session of its
/// own inside its sandbox's group).
pub fn proc_snapshot() -> ProcSnapshot {
    let mut snap = ProcSnapshot::default();
    let page = 4096u64;
    let procs = crate::process::scan_processes();
    let groups = crate::process::groups_of(&procs);
    for (p, gs) in procs.iter().zip(groups) {
        // Fields from 3 (state) on; utime is field 14, stime 15, rss 24 (1-based).
        let f = &p.fields;
        if f.len() < 22 {
            continue;
        }
        let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        let rss = f[21].parse::<u64>().unwrap_or(0) * page;
        for g in gs {
            let entry = snap.groups.entry(g).or_default();
            entry.0 += ticks;
            entry.1 += rss;
        }
    }
    snap
}

/// CPU seconds used so far by process `pid` and its descendants (each process's
/// `children` in procfs; a few reads, not a scan of `/proc`).
pub fn tree_cpu_s(pid: i32) -> f64 {
    let mut ticks = 0u64;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            // After the name: state is field 3; utime 14 and stime 15 (1-based).
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += n(11) + n(12);
        }
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            todo.extend(c.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
        }
    }
    ticks as f64 / CLOCK_TICKS
}

/// The machine's memory in bytes (`MemTotal`).
pub fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_group_is_measured() {
        let me = nix::unistd::getpgrp().as_raw();
        let snap = proc_snapshot();
        let (_, rss) = snap.groups.get(&me).copied().unwrap_or_default();
        assert!(rss > 0);
        assert!(mem_total() > 0);
    }
}
