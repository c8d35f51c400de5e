//! Placement: which queued run starts next on a worker, and why the others wait.
//!
//! The queue is the fleet's; each worker offers its own profiles, with its own slots
//! and GPUs, and asks for the next run it can take (`decide_for`).
//!
//! Rules, in order:
//! 1. A run needs a free slot of its hardware profile on the worker (`slots` runs at
//!    once there) and, for a profile with GPUs, that many free GPUs of that worker
//!    (unless the profile shares its GPUs). A draining worker takes no new run.
//! 2. An org with `org_max_running` runs already running waits.
//! 3. Within an org, its highest-priority run of the profile goes first; FIFO within a
//!    priority. Priority never reorders runs of different orgs except by rule 4.
//! 4. Across orgs, fairness comes before priority. An org running fewer runs of the
//!    profile than its priority share (`floor(priority_share × slots)`) competes by
//!    priority first: the highest-priority head among such orgs starts. Otherwise (or
//!    when no org is under its share) the orgs take turns: the org with the fewest runs
//!    of the profile running goes first, then the one served least recently, then the
//!    higher priority, then the older run. With `priority_share` below 1, an org's
//!    high-priority runs can hold at most that share of a profile ahead of other
//!    orgs; on a one-slot profile the orgs simply alternate. `priority_share = 1`
//!    orders all orgs by priority (the turns only break ties).
//!
//! Pending reasons name only what the waiting run's own org may know: the profile's
//! use, its org's limit, and its place among its own org's queued runs of the profile
//! (never the global queue, nor other orgs' runs).
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

/// A worker offering a profile, and how much of it is taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Offered {
    pub worker: String,
    pub slots: usize,
    /// Runs of the profile it holds now.
    pub running: usize,
    pub draining: bool,
}

/// The worker of a scheduler made with [`Scheduler::new`] (the embedded worker).
pub const DEFAULT_WORKER: &str = "embedded";

/// What one worker offers.
#[derive(Debug, Clone, Default)]
struct Offer {
    profiles: BTreeMap<String, ProfileCapacity>,
    gpus: Vec<String>,
    draining: bool,
}

/// A placement decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub run: RunId,
    /// The worker it goes to.
    pub worker: String,
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
    /// The scheduler's count of changes when it was queued (see [`Scheduler::mark`]).
    at: u64,
}

#[derive(Debug, Clone)]
struct Running {
    worker: String,
    profile: String,
    org: String,
    gpus: Vec<String>,
    at: u64,
}

/// A pending run as the store holds it (for [`Scheduler::follow`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPending {
    pub run: RunId,
    pub org: String,
    pub profile: String,
    pub priority: i64,
    pub seq: u64,
}

/// A run held by a worker under a lease, as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredActive {
    pub run: RunId,
    pub worker: String,
    pub org: String,
    pub profile: String,
    pub gpus: Vec<String>,
}

/// The fleet's queue, its workers and what runs on them.
#[derive(Debug, Default)]
pub struct Scheduler {
    workers: BTreeMap<String, Offer>,
    /// Profile → org → queued runs in order.
    queues: HashMap<String, BTreeMap<String, BTreeSet<Key>>>,
    queued: HashMap<RunId, Queued>,
    /// Queued runs per org (for the queued-runs limit).
    queued_per_org: HashMap<String, usize>,
    running: HashMap<RunId, Running>,
    org_max_running: usize,
    /// (profile, org) → tick of the last start, for taking turns.
    last_served: HashMap<(String, String), u64>,
    tick: u64,
    /// Share of a profile's slots an org may take by priority ahead of other orgs
    /// (0.0..=1.0; rule 4).
    priority_share: f64,
    /// Changes of the queue and of what runs, counted (see [`Scheduler::mark`]).
    changes: u64,
}

impl Scheduler {
    /// A scheduler with one worker, [`DEFAULT_WORKER`], offering these profiles and
    /// GPUs; `org_max_running` 0 means no org limit.
    pub fn new(profiles: Vec<ProfileCapacity>, gpus: Vec<String>, org_max_running: usize) -> Self {
        let mut s = Self::without_workers(org_max_running);
        s.add_worker(DEFAULT_WORKER, profiles, gpus);
        s
    }

    /// A scheduler with no worker yet.
    pub fn without_workers(org_max_running: usize) -> Self {
        Scheduler {
            org_max_running,
            ..Default::default()
        }
    }

    /// Adds a worker, or replaces what it offers (runs it has keep running).
    pub fn add_worker(&mut self, name: &str, profiles: Vec<ProfileCapacity>, gpus: Vec<String>) {
        let draining = self.workers.get(name).is_some_and(|w| w.draining);
        self.workers.insert(
            name.to_string(),
            Offer {
                profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
                gpus,
                draining,
            },
        );
    }

    /// Stops placing runs on a worker (`true`) or starts again; false when unknown.
    pub fn set_draining(&mut self, name: &str, draining: bool) -> bool {
        match self.workers.get_mut(name) {
            Some(w) => {
                w.draining = draining;
                true
            }
            None => false,
        }
    }

    /// Forgets the workers not named in `keep` (removed from the fleet); runs they
    /// hold still count until they end.
    pub fn retain_workers(&mut self, keep: &[&str]) {
        self.workers.retain(|name, _| keep.contains(&name.as_str()));
    }

    /// The workers that offer `profile`, by name, with the runs of it they hold.
    pub fn offers_of(&self, profile: &str) -> Vec<Offered> {
        self.workers
            .iter()
            .filter_map(|(name, w)| {
                let p = w.profiles.get(profile)?;
                Some(Offered {
                    worker: name.clone(),
                    slots: p.slots,
                    running: self.running_on(name, profile),
                    draining: w.draining,
                })
            })
            .collect()
    }

    /// The names of the workers known.
    pub fn worker_names(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }

    /// Whether any worker is known.
    pub fn has_workers(&self) -> bool {
        !self.workers.is_empty()
    }

    /// Records a run already running on a worker (claimed before a restart), so its
    /// slot and GPUs count.
    pub fn restore_running(
        &mut self,
        run: RunId,
        worker: &str,
        org: &str,
        profile: &str,
        gpus: Vec<String>,
    ) {
        self.remove(run);
        self.changes += 1;
        self.running.insert(
            run,
            Running {
                worker: worker.to_string(),
                profile: profile.to_string(),
                org: org.to_string(),
                gpus,
                at: self.changes,
            },
        );
    }

    /// Where the queue stands now: [`Scheduler::follow`] keeps what was queued or
    /// started after the mark, which a snapshot of the store taken after it may not
    /// show yet.
    pub fn mark(&self) -> u64 {
        self.changes
    }

    /// Follows the queue as the store holds it, when other servers share it (they
    /// queue, place and end runs too), from a snapshot taken after `mark`: runs queued
    /// here that are no longer pending there leave the queue, pending runs not queued
    /// here join it; runs held by workers count on them, and runs no longer held stop
    /// counting. True when anything changed.
    pub fn follow(
        &mut self,
        mark: u64,
        pending: &[StoredPending],
        active: &[StoredActive],
    ) -> bool {
        let before = self.changes;
        let pending_ids: std::collections::HashSet<RunId> = pending.iter().map(|p| p.run).collect();
        let active_ids: std::collections::HashSet<RunId> = active.iter().map(|a| a.run).collect();
        let gone: Vec<RunId> = self
            .queued
            .iter()
            .filter(|(id, q)| q.at <= mark && !pending_ids.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
            self.changes += 1;
        }
        let ended: Vec<RunId> = self
            .running
            .iter()
            .filter(|(id, r)| r.at <= mark && !active_ids.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            self.finish(id);
            self.changes += 1;
        }
        for p in pending {
            if !self.queued.contains_key(&p.run) && !self.running.contains_key(&p.run) {
                self.push(p.run, &p.org, &p.profile, p.priority, p.seq);
            }
        }
        for a in active {
            if !self.running.contains_key(&a.run) {
                self.restore_running(a.run, &a.worker, &a.org, &a.profile, a.gpus.clone());
            }
        }
        self.changes != before
    }

    /// Sets the share of a profile's slots an org may take by priority ahead of other
    /// orgs (rule 4), clamped to 0.0..=1.0; the default 0.0 means orgs always take turns.
    pub fn with_priority_share(mut self, share: f64) -> Self {
        self.priority_share = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self
    }

    /// Queues a run (`seq` orders runs of equal priority: lower first).
    pub fn push(&mut self, run: RunId, org: &str, profile: &str, priority: i64, seq: u64) {
        // Queued already (a server following a shared store may hear of its own run
        // before it queues it): one entry, the latest.
        self.remove(run);
        let key = (Reverse(priority), seq, run);
        self.changes += 1;
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
                    at: self.changes,
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
        let mut out: BTreeMap<String, usize> = self
            .workers
            .values()
            .flat_map(|w| w.profiles.keys())
            .map(|p| (p.clone(), 0))
            .collect();
        for q in self.queued.values() {
            *out.entry(q.profile.clone()).or_default() += 1;
        }
        out
    }

    /// Number of queued runs.
    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    fn running_on(&self, worker: &str, profile: &str) -> usize {
        self.running
            .values()
            .filter(|r| r.worker == worker && r.profile == profile)
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

    fn free_gpus(&self, worker: &str, w: &Offer) -> Vec<String> {
        let used: BTreeSet<&String> = self
            .running
            .values()
            .filter(|r| r.worker == worker)
            .flat_map(|r| r.gpus.iter())
            .collect();
        w.gpus
            .iter()
            .filter(|g| !used.contains(g))
            .cloned()
            .collect()
    }

    /// GPUs a run of `p` would get now on a worker, or `None` when they are not free.
    fn gpus_for(&self, worker: &str, w: &Offer, p: &ProfileCapacity) -> Option<Vec<String>> {
        if p.gpu_count == 0 {
            return Some(vec![]);
        }
        if p.gpu_shared {
            // Spread shared runs over the GPUs in turn.
            let n = self.running_on(worker, &p.name);
            return (w.gpus.len() >= p.gpu_count).then(|| {
                (0..p.gpu_count)
                    .map(|i| w.gpus[(n * p.gpu_count + i) % w.gpus.len()].clone())
                    .collect()
            });
        }
        let free = self.free_gpus(worker, w);
        (free.len() >= p.gpu_count).then(|| free[..p.gpu_count].to_vec())
    }

    /// The next run to start on [`DEFAULT_WORKER`], if any can.
    pub fn decide(&self) -> Option<Decision> {
        self.decide_for(DEFAULT_WORKER)
    }

    /// The next run to start on `worker`, if any can.
    pub fn decide_for(&self, worker: &str) -> Option<Decision> {
        let w = self.workers.get(worker).filter(|w| !w.draining)?;
        for (name, orgs) in &self.queues {
            let Some(p) = w.profiles.get(name) else {
                continue;
            };
            if self.running_on(worker, name) >= p.slots {
                continue;
            }
            let Some(gpus) = self.gpus_for(worker, w, p) else {
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
            // Rule 4: (running, served) of each org with a head.
            let turn = |org: &String| {
                let served = self
                    .last_served
                    .get(&(name.clone(), org.clone()))
                    .copied()
                    .unwrap_or(0);
                (self.running_of_on(org, name), served)
            };
            let share = (self.priority_share * p.slots as f64).floor() as usize;
            // Orgs under their priority share compete by priority; an org under its
            // share always runs fewer runs of the profile than one at or over it, so
            // the turns below would pick among them first anyway.
            let by_priority = heads
                .iter()
                .filter(|(org, _)| self.running_of_on(org, name) < share)
                .min_by_key(|(org, k)| (k.0, turn(org), k.1));
            let pick =
                by_priority.or_else(|| heads.iter().min_by_key(|(org, k)| (turn(org), k.0, k.1)));
            if let Some((org, k)) = pick {
                return Some(Decision {
                    run: k.2,
                    worker: worker.to_string(),
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
        self.changes += 1;
        self.running.insert(
            d.run,
            Running {
                worker: d.worker.clone(),
                profile: d.profile.clone(),
                org: d.org.clone(),
                gpus: d.gpus.clone(),
                at: self.changes,
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
        // The workers that offer its profile, and are not draining.
        let offers: Vec<(&String, &Offer, &ProfileCapacity)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.draining)
            .filter_map(|(n, w)| w.profiles.get(&q.profile).map(|p| (n, w, p)))
            .collect();
        let Some(&(_, _, p)) = offers.first() else {
            let draining = self
                .workers
                .values()
                .filter(|w| w.draining && w.profiles.contains_key(&q.profile))
                .count();
            return Some(match draining {
                0 => format!("no worker offers {}", q.profile),
                1 => format!(
                    "no worker offers {}: the one that does is draining",
                    q.profile
                ),
                n => format!(
                    "no worker offers {}: the {n} that do are draining",
                    q.profile
                ),
            });
        };
        let most_gpus = offers
            .iter()
            .map(|(_, w, _)| w.gpus.len())
            .max()
            .unwrap_or(0);
        if p.gpu_count > 0 && most_gpus < p.gpu_count {
            let has = if offers.len() > 1 {
                "the largest has"
            } else {
                "this worker has"
            };
            return Some(format!(
                "no worker has the GPUs {} needs ({} each; {has} {most_gpus})",
                p.name, p.gpu_count
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
        // Place among its own org's queued runs of the profile (by priority, then
        // age): other orgs' runs are not counted, so no org learns another's queue.
        let ahead = self
            .queues
            .get(&q.profile)
            .and_then(|orgs| orgs.get(&q.org))
            .map(|set| set.range(..q.key).count())
            .unwrap_or(0);
        let place = ordinal(ahead + 1);
        if let [(worker, w, p)] = offers[..] {
            let running = self.running_on(worker, &q.profile);
            if p.gpu_count > 0 && !p.gpu_shared && self.free_gpus(worker, w).len() < p.gpu_count {
                let busy = w.gpus.len() - self.free_gpus(worker, w).len();
                return Some(format!(
                    "waiting for {}: {busy} of {} GPUs in use, {place} in queue",
                    p.name,
                    w.gpus.len()
                ));
            }
            return Some(format!(
                "waiting for {}: {running} of {} in use, {place} in queue",
                p.name, p.slots
            ));
        }
        Some(format!(
            "waiting for {}: {} workers offer it, all busy, {place} in queue",
            q.profile,
            offers.len()
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

    /// Places `n` runs one after the other (each ends before the next is placed) and
    /// returns them in the order they were placed.
    fn run_one_at_a_time(s: &mut Scheduler, n: usize) -> Vec<RunId> {
        (0..n)
            .map(|_| {
                let d = s.decide().unwrap();
                s.start(&d);
                s.finish(d.run);
                d.run
            })
            .collect()
    }

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

    /// A server follows the queue another server shares with it: what the other
    /// queued joins, what the other placed counts on its worker and leaves the queue,
    /// what ended stops counting; what this one queued or placed after the look began
    /// stays.
    #[test]
    fn following_the_stored_queue_keeps_what_changed_here_since() {
        let mut s = Scheduler::new(vec![cpu(2)], vec![], 0);
        s.add_worker("other", vec![cpu(1)], vec![]);
        let r = ids(3);
        let pending = |run: RunId, seq: u64| StoredPending {
            run,
            org: "o".into(),
            profile: "cpu".into(),
            priority: 50,
            seq,
        };
        let on_other = |run: RunId| StoredActive {
            run,
            worker: "other".into(),
            org: "o".into(),
            profile: "cpu".into(),
            gpus: vec![],
        };
        // Another server queued r0 and r1.
        let mark = s.mark();
        assert!(s.follow(mark, &[pending(r[0], 1), pending(r[1], 2)], &[]));
        assert_eq!(s.queued_len(), 2);
        // It placed r0 on its worker: r0 leaves the queue and holds that slot.
        let mark = s.mark();
        assert!(s.follow(mark, &[pending(r[1], 2)], &[on_other(r[0])]));
        assert_eq!(s.queued_len(), 1);
        assert_eq!(s.decide_for("other"), None, "the other worker is full");
        // Looked at before this server queued r2 and placed r1: both stay as they are.
        let mark = s.mark();
        s.push(r[2], "o", "cpu", 50, 3);
        let d = s.decide().unwrap();
        assert_eq!(d.run, r[1]);
        s.start(&d);
        assert!(!s.follow(mark, &[pending(r[1], 2)], &[on_other(r[0])]));
        assert_eq!(s.queued_len(), 1, "r2 stays queued");
        // r0 ended there: its slot is free again; r1 (here) is still running.
        let mark = s.mark();
        assert!(s.follow(
            mark,
            &[pending(r[2], 3)],
            &[StoredActive {
                worker: DEFAULT_WORKER.into(),
                ..on_other(r[1])
            }]
        ));
        assert_eq!(s.decide_for("other").map(|d| d.run), Some(r[2]));
        assert!(s.finish(r[1]), "r1 still counts here");
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
        let order = run_one_at_a_time(&mut s, 3);
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
    fn fairness_comes_before_priority_across_orgs() {
        // One slot: org a's many priority-100 runs and org b's priority-0 run alternate.
        let mut s = Scheduler::new(vec![cpu(1)], vec![], 0).with_priority_share(0.5);
        let (a, b) = (ids(4), ids(1));
        for (i, id) in a.iter().enumerate() {
            s.push(*id, "a", "cpu", 100, i as u64);
        }
        s.push(b[0], "b", "cpu", 0, 10);
        let order = run_one_at_a_time(&mut s, 5);
        assert_eq!(order, vec![a[0], b[0], a[1], a[2], a[3]]);

        // Ten slots, share 0.5: org a takes five by priority, org b gets the rest.
        let mut s = Scheduler::new(vec![cpu(10)], vec![], 0).with_priority_share(0.5);
        let (a, b) = (ids(10), ids(10));
        for (i, id) in a.iter().enumerate() {
            s.push(*id, "a", "cpu", 100, i as u64);
        }
        for (i, id) in b.iter().enumerate() {
            s.push(*id, "b", "cpu", 0, 100 + i as u64);
        }
        let orgs: Vec<String> = drain(&mut s).into_iter().map(|d| d.org).collect();
        assert_eq!(
            orgs[..5],
            ["a", "a", "a", "a", "a"],
            "priority within the share"
        );
        assert_eq!(orgs.iter().filter(|o| *o == "b").count(), 5);

        // Share 1: priority orders all orgs, as before.
        let mut s = Scheduler::new(vec![cpu(1)], vec![], 0).with_priority_share(1.0);
        let (a, b) = (ids(2), ids(1));
        s.push(a[0], "a", "cpu", 100, 0);
        s.push(a[1], "a", "cpu", 100, 1);
        s.push(b[0], "b", "cpu", 0, 2);
        let order = run_one_at_a_time(&mut s, 3);
        assert_eq!(order, vec![a[0], a[1], b[0]]);
    }

    #[test]
    fn pending_reasons_count_only_the_own_orgs_runs() {
        let mut s = Scheduler::new(vec![cpu(1)], vec![], 0);
        let (a, b) = (ids(5), ids(2));
        for (i, id) in a.iter().enumerate() {
            s.push(*id, "a", "cpu", 100, i as u64);
        }
        for (i, id) in b.iter().enumerate() {
            s.push(*id, "b", "cpu", 0, 10 + i as u64);
        }
        let d = s.decide().unwrap();
        s.start(&d);
        assert_eq!(
            s.reason(b[0]).unwrap(),
            "waiting for cpu: 1 of 1 in use, 1st in queue"
        );
        assert_eq!(
            s.reason(b[1]).unwrap(),
            "waiting for cpu: 1 of 1 in use, 2nd in queue"
        );
        assert_eq!(
            s.reason(a[4]).unwrap(),
            "waiting for cpu: 1 of 1 in use, 4th in queue"
        );
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

    /// One step of a random schedule.
    #[derive(Debug, Clone)]
    enum Op {
        /// Queue a run of org `0` with priority `1`.
        Push(usize, i64),
        /// Start what can start.
        Decide,
        /// End the `n`-th oldest running run.
        Finish(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..3usize, prop_oneof![Just(0i64), Just(50), Just(100)])
                .prop_map(|(o, p)| Op::Push(o, p)),
            Just(Op::Decide),
            (0..4usize).prop_map(Op::Finish),
        ]
    }

    proptest::proptest! {
        /// For any schedule: a profile never holds more runs than its slots; each start
        /// is its org's best queued run (priority, then age); and with one slot and a
        /// priority share below 1, no org starts twice in a row while another org's
        /// run waited through both starts.
        #[test]
        fn placement_holds_its_rules(
            ops in proptest::collection::vec(op(), 0..80),
            slots in 1..4usize,
            share in proptest::prop_oneof![proptest::strategy::Just(0.0), proptest::strategy::Just(0.5), proptest::strategy::Just(1.0)],
        ) {
            let orgs = ["a", "b", "c"];
            let mut s = Scheduler::new(vec![cpu(slots)], vec![], 0).with_priority_share(share);
            // Queued runs per org: (priority, seq, id); running in start order.
            let mut queued: Vec<Vec<(i64, u64, RunId)>> = vec![vec![]; 3];
            let mut running: Vec<RunId> = vec![];
            let mut seq = 0u64;
            // Last start: (org, orgs that had a run queued before it).
            let mut last: Option<(usize, Vec<usize>)> = None;
            for o in ops {
                match o {
                    Op::Push(org, prio) => {
                        let id = RunId::new();
                        s.push(id, orgs[org], "cpu", prio, seq);
                        queued[org].push((prio, seq, id));
                        seq += 1;
                    }
                    Op::Decide => {
                        while let Some(d) = s.decide() {
                            let org = orgs.iter().position(|o| *o == d.org).unwrap();
                            let waiting: Vec<usize> =
                                (0..3).filter(|i| !queued[*i].is_empty()).collect();
                            let best = *queued[org]
                                .iter()
                                .min_by_key(|(p, q, _)| (Reverse(*p), *q))
                                .unwrap();
                            proptest::prop_assert_eq!(d.run, best.2, "an org's best run starts first");
                            if slots == 1 && share < 1.0
                                && let Some((prev, before)) = &last
                                && *prev == org
                            {
                                for other in before.iter().filter(|i| **i != org) {
                                    proptest::prop_assert!(
                                        !waiting.contains(other),
                                        "org {} started twice while org {} waited", org, other
                                    );
                                }
                            }
                            queued[org].retain(|r| r.2 != d.run);
                            s.start(&d);
                            running.push(d.run);
                            proptest::prop_assert!(running.len() <= slots);
                            last = Some((org, waiting));
                        }
                    }
                    Op::Finish(n) => {
                        if !running.is_empty() {
                            let id = running.remove(n % running.len());
                            proptest::prop_assert!(s.finish(id));
                        }
                    }
                }
            }
        }
    }

    /// Each worker offers its own profiles with its own slots and GPUs; the queue is
    /// shared, a worker only takes what it offers, and a draining one takes nothing.
    #[test]
    fn workers_take_only_what_they_offer_within_their_own_capacity() {
        let gpu = ProfileCapacity {
            name: "gpu.x".into(),
            slots: 2,
            gpu_count: 1,
            gpu_shared: false,
        };
        let mut s = Scheduler::without_workers(0);
        s.add_worker("a", vec![cpu(1)], vec![]);
        s.add_worker("b", vec![cpu(1), gpu.clone()], vec!["0".into()]);
        let r = ids(5);
        for (i, id) in r[..3].iter().enumerate() {
            s.push(*id, "o", "cpu", 50, i as u64);
        }
        s.push(r[3], "o", "gpu.x", 50, 3);
        s.push(r[4], "o", "gpu.x", 50, 4);
        let on_a = s.decide_for("a").unwrap();
        assert_eq!((on_a.run, on_a.worker.as_str()), (r[0], "a"));
        s.start(&on_a);
        assert!(s.decide_for("a").is_none(), "a's one cpu slot is taken");
        let mut on_b = Vec::new();
        while let Some(d) = s.decide_for("b") {
            s.start(&d);
            on_b.push(d);
        }
        let runs: BTreeSet<RunId> = on_b.iter().map(|d| d.run).collect();
        assert_eq!(
            runs,
            BTreeSet::from([r[1], r[3]]),
            "one cpu run and one GPU run"
        );
        let gpu_run = on_b.iter().find(|d| d.profile == "gpu.x").unwrap();
        assert_eq!(gpu_run.gpus, vec!["0".to_string()]);
        assert_eq!(
            s.reason(r[2]).unwrap(),
            "waiting for cpu: 2 workers offer it, all busy, 1st in queue"
        );
        assert_eq!(
            s.reason(r[4]).unwrap(),
            "waiting for gpu.x: 1 of 1 GPUs in use, 1st in queue"
        );
        let offered = |s: &Scheduler, p: &str| {
            s.offers_of(p)
                .into_iter()
                .map(|o| (o.worker, o.slots, o.running, o.draining))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            offered(&s, "cpu"),
            vec![("a".into(), 1, 1, false), ("b".into(), 1, 1, false)]
        );
        assert_eq!(offered(&s, "gpu.x"), vec![("b".into(), 2, 1, false)]);
        // A draining worker takes nothing new; its runs finish.
        assert!(s.set_draining("a", true));
        s.finish(on_a.run);
        assert_eq!(offered(&s, "cpu")[0], ("a".into(), 1, 0, true));
        assert!(s.decide_for("a").is_none());
        s.push(RunId::new(), "o", "tpu", 50, 9);
        let waiting = s
            .queued
            .keys()
            .copied()
            .find(|id| s.queued[id].profile == "tpu")
            .unwrap();
        assert_eq!(s.reason(waiting).unwrap(), "no worker offers tpu");
        s.set_draining("a", false);
        assert_eq!(s.decide_for("a").unwrap().run, r[2]);
        assert_eq!(s.depths()["gpu.x"], 1);
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
