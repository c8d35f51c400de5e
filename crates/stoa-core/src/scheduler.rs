//! Placement: which queued run starts next on a worker, and why the others wait.
//!
//! Rules, in order:
//! 1. A run needs a free slot of its hardware profile (`slots` runs at once) and, for a
//!    profile with GPUs, that many free GPUs (unless the profile shares its GPUs).
//! 2. An org with `org_max_running` runs already running waits.
//! 3. Within a profile, the highest priority waiting first; FIFO within a priority.
//! 4. When several orgs wait at that priority, they take turns: the org with the fewest
//!    runs of the profile running goes first, then the one served least recently.
//!
//! Pure data: the engine feeds it the queue and the starts and ends, and asks it for
//! decisions and pending reasons. A decision is O(profiles × orgs).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use stoa_types::RunId;

/// What a profile can hold on this worker.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileCapacity {
    pub name: String,
    /// Runs at once.
    pub slots: usize,
    /// GPUs each run gets.
    pub gpu_count: usize,
    /// Whether runs may share GPUs.
    pub gpu_shared: bool,
}

/// A placement decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub run: RunId,
    pub profile: String,
    pub org: String,
    /// GPUs given to the run.
    pub gpus: Vec<String>,
}

/// Order of runs within one org's queue of a profile.
type Key = (Reverse<i64>, u64, RunId);

#[derive(Debug, Clone)]
struct Queued {
    profile: String,
    org: String,
    key: Key,
}

#[derive(Debug, Clone)]
struct Running {
    profile: String,
    org: String,
    gpus: Vec<String>,
}

/// The worker's queue and what runs on it.
#[derive(Debug, Default)]
pub struct Scheduler {
    profiles: BTreeMap<String, ProfileCapacity>,
    /// Profile → org → queued runs in order.
    queues: HashMap<String, BTreeMap<String, BTreeSet<Key>>>,
    queued: HashMap<RunId, Queued>,
    /// Queued runs per org (for the queued-runs limit).
    queued_per_org: HashMap<String, usize>,
    running: HashMap<RunId, Running>,
    gpus: Vec<String>,
    org_max_running: usize,
    /// (profile, org) → tick of the last start, for taking turns.
    last_served: HashMap<(String, String), u64>,
    tick: u64,
}

impl Scheduler {
    /// A scheduler for these profiles and GPUs; `org_max_running` 0 means no org limit.
    pub fn new(profiles: Vec<ProfileCapacity>, gpus: Vec<String>, org_max_running: usize) -> Self {
        Scheduler {
            profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
            gpus,
            org_max_running,
            ..Default::default()
        }
    }

    /// Queues a run (`seq` orders runs of equal priority: lower first).
    pub fn push(&mut self, run: RunId, org: &str, profile: &str, priority: i64, seq: u64) {
        let key = (Reverse(priority), seq, run);
        self.queues
            .entry(profile.to_string())
            .or_default()
            .entry(org.to_string())
            .or_default()
            .insert(key);
        if self
            .queued
            .insert(
                run,
                Queued {
                    profile: profile.to_string(),
                    org: org.to_string(),
                    key,
                },
            )
            .is_none()
        {
            *self.queued_per_org.entry(org.to_string()).or_default() += 1;
        }
    }

    /// Takes a run out of the queue (aborted, or claimed elsewhere); false when it was
    /// not queued.
    pub fn remove(&mut self, run: RunId) -> bool {
        let Some(q) = self.queued.remove(&run) else {
            return false;
        };
        if let Some(n) = self.queued_per_org.get_mut(&q.org) {
            *n = n.saturating_sub(1);
        }
        if let Some(orgs) = self.queues.get_mut(&q.profile)
            && let Some(set) = orgs.get_mut(&q.org)
        {
            set.remove(&q.key);
            if set.is_empty() {
                orgs.remove(&q.org);
            }
        }
        true
    }

    /// Number of queued runs of an org.
    pub fn queued_of(&self, org: &str) -> usize {
        self.queued_per_org.get(org).copied().unwrap_or(0)
    }

    /// Queued runs per profile.
    pub fn depths(&self) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> =
            self.profiles.keys().map(|p| (p.clone(), 0)).collect();
        for q in self.queued.values() {
            *out.entry(q.profile.clone()).or_default() += 1;
        }
        out
    }

    /// Number of queued runs.
    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    fn running_on(&self, profile: &str) -> usize {
        self.running
            .values()
            .filter(|r| r.profile == profile)
            .count()
    }

    fn running_of(&self, org: &str) -> usize {
        self.running.values().filter(|r| r.org == org).count()
    }

    fn running_of_on(&self, org: &str, profile: &str) -> usize {
        self.running
            .values()
            .filter(|r| r.org == org && r.profile == profile)
            .count()
    }

    fn free_gpus(&self) -> Vec<String> {
        let used: BTreeSet<&String> = self.running.values().flat_map(|r| r.gpus.iter()).collect();
        self.gpus
            .iter()
            .filter(|g| !used.contains(g))
            .cloned()
            .collect()
    }

    /// GPUs a run of `p` would get now, or `None` when they are not free.
    fn gpus_for(&self, p: &ProfileCapacity) -> Option<Vec<String>> {
        if p.gpu_count == 0 {
            return Some(vec![]);
        }
        if p.gpu_shared {
            // Spread shared runs over the GPUs in turn.
            let n = self.running_on(&p.name);
            return (self.gpus.len() >= p.gpu_count).then(|| {
                (0..p.gpu_count)
                    .map(|i| self.gpus[(n * p.gpu_count + i) % self.gpus.len()].clone())
                    .collect()
            });
        }
        let free = self.free_gpus();
        (free.len() >= p.gpu_count).then(|| free[..p.gpu_count].to_vec())
    }

    /// The next run to start, if any can.
    pub fn decide(&self) -> Option<Decision> {
        for (name, orgs) in &self.queues {
            let Some(p) = self.profiles.get(name) else {
                continue;
            };
            if self.running_on(name) >= p.slots {
                continue;
            }
            let Some(gpus) = self.gpus_for(p) else {
                continue;
            };
            // Heads of the orgs that may start a run.
            let heads: Vec<(&String, &Key)> = orgs
                .iter()
                .filter(|(org, _)| {
                    self.org_max_running == 0 || self.running_of(org) < self.org_max_running
                })
                .filter_map(|(org, set)| set.first().map(|k| (org, k)))
                .collect();
            let Some(top) = heads.iter().map(|(_, k)| k.0).min() else {
                continue;
            };
            let pick = heads
                .iter()
                .filter(|(_, k)| k.0 == top)
                .min_by_key(|(org, k)| {
                    let served = self
                        .last_served
                        .get(&(name.clone(), (*org).clone()))
                        .copied()
                        .unwrap_or(0);
                    (self.running_of_on(org, name), served, k.1)
                });
            if let Some((org, k)) = pick {
                return Some(Decision {
                    run: k.2,
                    profile: name.clone(),
                    org: (*org).clone(),
                    gpus,
                });
            }
        }
        None
    }

    /// Records that a decided run started.
    pub fn start(&mut self, d: &Decision) {
        self.remove(d.run);
        self.tick += 1;
        self.last_served
            .insert((d.profile.clone(), d.org.clone()), self.tick);
        self.running.insert(
            d.run,
            Running {
                profile: d.profile.clone(),
                org: d.org.clone(),
                gpus: d.gpus.clone(),
            },
        );
    }

    /// Records that a run ended (frees its slot and GPUs); false when it was not running.
    pub fn finish(&mut self, run: RunId) -> bool {
        self.running.remove(&run).is_some()
    }

    /// Why a queued run waits, in words; `None` when it is not queued.
    pub fn reason(&self, run: RunId) -> Option<String> {
        let q = self.queued.get(&run)?;
        let Some(p) = self.profiles.get(&q.profile) else {
            return Some(format!("no worker here offers {}", q.profile));
        };
        if p.gpu_count > 0 && self.gpus.len() < p.gpu_count {
            return Some(format!(
                "no worker has the GPUs {} needs ({} each; this worker has {})",
                p.name,
                p.gpu_count,
                self.gpus.len()
            ));
        }
        if self.org_max_running > 0 {
            let r = self.running_of(&q.org);
            if r >= self.org_max_running {
                return Some(format!(
                    "org limit: {r} of {} running",
                    self.org_max_running
                ));
            }
        }
        // Place in the profile's queue: runs ahead of it by priority, then age.
        let ahead = self
            .queues
            .get(&q.profile)
            .map(|orgs| {
                orgs.values()
                    .map(|set| set.range(..q.key).count())
                    .sum::<usize>()
            })
            .unwrap_or(0);
        let place = ordinal(ahead + 1);
        let running = self.running_on(&q.profile);
        if p.gpu_count > 0 && !p.gpu_shared && self.free_gpus().len() < p.gpu_count {
            let busy = self.gpus.len() - self.free_gpus().len();
            return Some(format!(
                "waiting for {}: {busy} of {} GPUs in use, {place} in queue",
                p.name,
                self.gpus.len()
            ));
        }
        Some(format!(
            "waiting for {}: {running} of {} in use, {place} in queue",
            p.name, p.slots
        ))
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, … `11th`, `21st`.
pub fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(slots: usize) -> ProfileCapacity {
        ProfileCapacity {
            name: "cpu".into(),
            slots,
            gpu_count: 0,
            gpu_shared: false,
        }
    }

    fn ids(n: usize) -> Vec<RunId> {
        (0..n).map(|_| RunId::new()).collect()
    }

    /// Starts everything that can start; returns the started runs in order.
    fn drain(s: &mut Scheduler) -> Vec<Decision> {
        let mut out = Vec::new();
        while let Some(d) = s.decide() {
            s.start(&d);
            out.push(d);
        }
        out
    }

    #[test]
    fn capacity_fifo_and_reasons() {
        let mut s = Scheduler::new(vec![cpu(2)], vec![], 0);
        let r = ids(5);
        for (i, id) in r.iter().enumerate() {
            s.push(*id, "a", "cpu", 50, i as u64);
        }
        let started = drain(&mut s);
        assert_eq!(
            started.iter().map(|d| d.run).collect::<Vec<_>>(),
            r[..2].to_vec()
        );
        assert_eq!(
            s.reason(r[2]).unwrap(),
            "waiting for cpu: 2 of 2 in use, 1st in queue"
        );
        assert_eq!(
            s.reason(r[4]).unwrap(),
            "waiting for cpu: 2 of 2 in use, 3rd in queue"
        );
        s.finish(r[0]);
        assert_eq!(drain(&mut s)[0].run, r[2]);
    }

    #[test]
    fn priority_first_then_fifo() {
        let mut s = Scheduler::new(vec![cpu(1)], vec![], 0);
        let r = ids(3);
        s.push(r[0], "a", "cpu", 10, 0);
        s.push(r[1], "a", "cpu", 90, 1);
        s.push(r[2], "a", "cpu", 90, 2);
        let mut order = Vec::new();
        for _ in 0..3 {
            let d = s.decide().unwrap();
            s.start(&d);
            order.push(d.run);
            s.finish(d.run);
        }
        assert_eq!(order, vec![r[1], r[2], r[0]]);
    }

    #[test]
    fn orgs_take_turns_and_limits_hold() {
        let mut s = Scheduler::new(vec![cpu(1)], vec![], 0);
        let (a, b) = (ids(3), ids(3));
        for (i, id) in a.iter().enumerate() {
            s.push(*id, "a", "cpu", 50, i as u64);
        }
        for (i, id) in b.iter().enumerate() {
            s.push(*id, "b", "cpu", 50, 10 + i as u64);
        }
        let mut orgs = Vec::new();
        for _ in 0..6 {
            let d = s.decide().unwrap();
            s.start(&d);
            orgs.push(d.org.clone());
            s.finish(d.run);
        }
        assert_eq!(orgs, vec!["a", "b", "a", "b", "a", "b"]);

        let mut s = Scheduler::new(vec![cpu(4)], vec![], 1);
        let (a, b) = (ids(2), ids(1));
        s.push(a[0], "a", "cpu", 50, 0);
        s.push(a[1], "a", "cpu", 50, 1);
        s.push(b[0], "b", "cpu", 50, 2);
        let started: Vec<_> = drain(&mut s).iter().map(|d| d.run).collect();
        assert_eq!(started, vec![a[0], b[0]], "org a is at its limit, b starts");
        assert_eq!(s.reason(a[1]).unwrap(), "org limit: 1 of 1 running");
    }

    #[test]
    fn gpus_are_given_to_one_run_at_a_time() {
        let g = ProfileCapacity {
            name: "gpu.x".into(),
            slots: 4,
            gpu_count: 1,
            gpu_shared: false,
        };
        let mut s = Scheduler::new(vec![g], vec!["0".into(), "1".into()], 0);
        let r = ids(3);
        for (i, id) in r.iter().enumerate() {
            s.push(*id, "a", "gpu.x", 50, i as u64);
        }
        let started = drain(&mut s);
        let gpus: Vec<_> = started.iter().map(|d| d.gpus.clone()).collect();
        assert_eq!(gpus, vec![vec!["0".to_string()], vec!["1".to_string()]]);
        assert_eq!(
            s.reason(r[2]).unwrap(),
            "waiting for gpu.x: 2 of 2 GPUs in use, 1st in queue"
        );
        s.finish(started[0].run);
        assert_eq!(drain(&mut s)[0].gpus, vec!["0".to_string()]);

        let mut none = Scheduler::new(
            vec![ProfileCapacity {
                name: "gpu.y".into(),
                slots: 1,
                gpu_count: 1,
                gpu_shared: false,
            }],
            vec![],
            0,
        );
        let id = RunId::new();
        none.push(id, "a", "gpu.y", 50, 0);
        assert!(none.decide().is_none());
        assert!(none.reason(id).unwrap().contains("no worker has the GPUs"));
    }

    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111]
            .iter()
            .map(|n| ordinal(*n))
            .collect();
        assert_eq!(
            got,
            vec![
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
                "111th"
            ]
        );
    }
}
