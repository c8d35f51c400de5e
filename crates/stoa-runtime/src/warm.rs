//! Warm sandboxes of Python runs: sandboxes started ahead of the runs that will use
//! them, each holding a Python process that finished its start-up (and imported the
//! pool's `prior_imports`), waiting on its stdin (a socket) for one run. The run gets
//! output pipes of its own at hand-over and reports its exit code on that socket as it
//! ends, so its end is known before its sandbox is torn down.
//!
//! A pool is keyed by everything of a run that is fixed before the run is known: its
//! environment, interpreter, profile limits, network, devices, storage mount, prior
//! imports and the environment variables it starts with (the org's variables
//! included: they may be read at start-up or import time). What differs per run (its
//! id, working directory, `HOME`, `PYTHONPATH`) is handed over with its code. A warm
//! sandbox serves one run and is destroyed with it: nothing of one run is ever visible
//! to another.
//!
//! Each warm sandbox binds a directory of its own where the worker's runs directory is
//! seen inside; the run's working directory is made in it at hand-over, so the run sees
//! the same path as a cold run would, and only its own directory there.
//!
//! Pools are learnt (made once a key was used `learn_uses` times within
//! `learn_window`), refilled in the background between launches, shrunk when idle,
//! and never hold more warm sandboxes than the worker has free run slots: each one
//! stands in a slot a coming run would take, within the profile's limits (its cgroup).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::cgroup::Limits;
use crate::sandbox::{Confinement, Jail, owned_name};
use crate::{Execution, OutputLine, ProcessExecution, RuntimeError};

/// The program of a warm sandbox, after its `PRIOR = [...]` line.
const PROGRAM: &str = include_str!("warm_boot.py");

/// Settings of the pools (`python.warm`).
#[derive(Debug, Clone)]
pub struct WarmConfig {
    pub enabled: bool,
    /// Warm sandboxes kept per pool.
    pub per_env: usize,
    /// Warm sandboxes kept in all (never more than the worker's free run slots).
    pub max_total: usize,
    /// A pool not used for this long is emptied and forgotten.
    pub idle: Duration,
    /// A pool is made once its key was used this many times within `learn_window`.
    pub learn_uses: usize,
    pub learn_window: Duration,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            enabled: false,
            per_env: 2,
            max_total: 16,
            idle: Duration::from_secs(300),
            learn_uses: 2,
            learn_window: Duration::from_secs(600),
        }
    }
}

/// Everything of a run that is fixed before the run is known: what a warm sandbox is
/// started with. Its `Debug` text is the pool's key (every field, no digest: two
/// recipes share a pool only when they are equal).
#[derive(Debug, Clone)]
pub(crate) struct Recipe {
    /// The environment's interpreter.
    pub python: PathBuf,
    pub env_dir: PathBuf,
    /// Where the worker's run directories are (seen there inside).
    pub runs_dir: PathBuf,
    /// The variables it starts with, sorted by name.
    pub env: Vec<(String, String)>,
    pub prior: Vec<String>,
    pub limits: Limits,
    pub network: bool,
    pub devices: Vec<PathBuf>,
    /// The org's storage directory and where it is seen inside.
    pub storage: Option<(PathBuf, PathBuf)>,
}

impl Recipe {
    pub fn key(&self) -> String {
        format!("{self:?}")
    }
}

/// A started warm sandbox, waiting for its run.
pub(crate) struct Ready {
    pub exec: ProcessExecution,
    pub stdin: UnixStream,
    /// Its output so far (a prior import's warnings belong to the run).
    pub output: mpsc::Receiver<OutputLine>,
    /// Its own directory, seen inside as the runs directory.
    pub dir: PathBuf,
    /// When it was started (none waits longer than `idle`).
    pub born: Instant,
    /// Its program said it waits for its run (its prior imports done).
    pub said_ready: bool,
}

impl Ready {
    /// Whether its program waits for its run now (`Some(false)`: still importing;
    /// `None`: it died or said something else, and must go). Never blocks: what the
    /// socket holds now.
    fn waiting(&mut self) -> Option<bool> {
        if !self.said_ready {
            let mut b = [0u8; 1];
            match rustix::net::recv(&self.stdin, &mut b, rustix::net::RecvFlags::DONTWAIT) {
                Ok((1, _)) if b[0] == b'R' => self.said_ready = true,
                Err(rustix::io::Errno::AGAIN) if !self.exec.exited() => return Some(false),
                _ => return None,
            }
        }
        (!self.exec.exited()).then_some(true)
    }
}

struct Pool {
    recipe: Arc<Recipe>,
    ready: VecDeque<Ready>,
    used: Instant,
}

#[derive(Default)]
struct State {
    pools: HashMap<String, Pool>,
    /// Recent uses of keys without a pool.
    seen: HashMap<String, VecDeque<Instant>>,
}

/// Most keys whose recent uses are remembered.
const SEEN_KEYS: usize = 4096;

/// The warm pools of one Python runtime.
pub struct WarmPools {
    cfg: WarmConfig,
    state: Mutex<State>,
    /// Launches in progress: refills wait until there are none.
    launching: AtomicUsize,
}

/// Counts a launch in progress while it lives.
pub(crate) struct Launching<'a>(&'a AtomicUsize);

impl Drop for Launching<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WarmPools {
    pub fn new(cfg: WarmConfig) -> Self {
        WarmPools {
            cfg,
            state: Mutex::new(State::default()),
            launching: AtomicUsize::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled && self.cfg.per_env > 0 && self.cfg.max_total > 0
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a launch in progress until the guard is dropped.
    pub(crate) fn launching(&self) -> Launching<'_> {
        self.launching.fetch_add(1, Ordering::SeqCst);
        Launching(&self.launching)
    }

    /// Warm sandboxes whose program said it waits for its run, in all (those still
    /// importing are not counted; those that died are dropped).
    pub fn ready(&self) -> usize {
        let mut st = self.state();
        let mut n = 0;
        for pool in st.pools.values_mut() {
            pool.ready.retain_mut(|r| match r.waiting() {
                Some(w) => {
                    n += usize::from(w);
                    true
                }
                None => false,
            });
        }
        n
    }

    /// A warm sandbox of the pool `key` whose program said it waits for its run (one
    /// still importing stays in the pool; those that died meanwhile are dropped).
    pub(crate) fn take(&self, key: &str) -> Option<Ready> {
        let mut st = self.state();
        let pool = st.pools.get_mut(key)?;
        pool.used = Instant::now();
        let mut i = 0;
        while i < pool.ready.len() {
            match pool.ready[i].waiting() {
                Some(true) => return pool.ready.remove(i),
                Some(false) => i += 1,
                // Dropping it kills it.
                None => drop(pool.ready.remove(i)),
            }
        }
        None
    }

    /// Records a use of `key` that found no warm sandbox: its pool is made once the
    /// key was used `learn_uses` times within `learn_window`.
    pub(crate) fn learn(&self, key: String, recipe: Recipe) {
        let now = Instant::now();
        let mut st = self.state();
        if let Some(p) = st.pools.get_mut(&key) {
            p.used = now;
            return;
        }
        let window = self.cfg.learn_window;
        if !st.seen.contains_key(&key) && st.seen.len() >= SEEN_KEYS {
            st.seen
                .retain(|_, uses| uses.back().is_some_and(|t| now.duration_since(*t) < window));
            if st.seen.len() >= SEEN_KEYS {
                st.seen.clear();
            }
        }
        let uses = st.seen.entry(key.clone()).or_default();
        uses.push_back(now);
        while uses
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            uses.pop_front();
        }
        if uses.len() >= self.cfg.learn_uses.max(1) {
            st.seen.remove(&key);
            tracing::debug!(pools = st.pools.len() + 1, "warm pool made");
            st.pools.insert(
                key,
                Pool {
                    recipe: Arc::new(recipe),
                    ready: VecDeque::new(),
                    used: now,
                },
            );
        }
    }

    /// Keeps the pools: empties those idle too long, lets go of warm sandboxes beyond
    /// `free_slots` (and `max_total`), then starts warm sandboxes one at a time while no
    /// launch is in progress, until every pool holds `per_env`.
    pub async fn tend(&self, c: &Confinement, free_slots: usize) {
        if !self.enabled() {
            return;
        }
        let budget = self.cfg.max_total.min(free_slots);
        let mut gone = Vec::new();
        {
            let mut st = self.state();
            let idle = self.cfg.idle;
            st.pools.retain(|_, p| {
                let keep = p.used.elapsed() < idle;
                if !keep {
                    gone.extend(p.ready.drain(..));
                }
                keep
            });
            // Nor does any warm sandbox wait longer than that: it is made anew.
            for p in st.pools.values_mut() {
                while p.ready.front().is_some_and(|r| r.born.elapsed() >= idle) {
                    gone.extend(p.ready.pop_front());
                }
            }
            let mut total: usize = st.pools.values().map(|p| p.ready.len()).sum();
            // Over budget: the least recently used pools give theirs up first.
            let mut order: Vec<(Instant, String)> =
                st.pools.iter().map(|(k, p)| (p.used, k.clone())).collect();
            order.sort();
            for (_, k) in order {
                let p = st.pools.get_mut(&k).expect("listed");
                while total > budget
                    && let Some(r) = p.ready.pop_back()
                {
                    gone.push(r);
                    total -= 1;
                }
            }
        }
        for mut r in gone {
            let _ = r.exec.kill().await;
        }
        loop {
            if self.launching.load(Ordering::SeqCst) > 0 {
                return;
            }
            let (key, recipe) = {
                let st = self.state();
                let total: usize = st.pools.values().map(|p| p.ready.len()).sum();
                if total >= budget {
                    return;
                }
                // The emptiest pool, most recently used first.
                let Some((k, p)) = st
                    .pools
                    .iter()
                    .filter(|(_, p)| p.ready.len() < self.cfg.per_env)
                    .min_by_key(|(_, p)| (p.ready.len(), std::cmp::Reverse(p.used)))
                else {
                    return;
                };
                (k.clone(), p.recipe.clone())
            };
            match spawn(c, &recipe) {
                Ok(r) => {
                    let mut st = self.state();
                    match st.pools.get_mut(&key) {
                        Some(p) => p.ready.push_back(r),
                        // Forgotten meanwhile: it goes (dropping it kills it).
                        None => drop(r),
                    }
                }
                Err(e) => {
                    // Not retried until the pool is used again.
                    tracing::warn!(error = %e, "could not start a warm sandbox; its pool is dropped");
                    self.state().pools.remove(&key);
                }
            }
            tokio::task::yield_now().await;
        }
    }

    /// Ends every warm sandbox (the worker stops).
    pub async fn release(&self) {
        let all: Vec<Ready> = {
            let mut st = self.state();
            st.pools
                .drain()
                .flat_map(|(_, mut p)| p.ready.drain(..).collect::<Vec<_>>())
                .collect()
        };
        for mut r in all {
            let _ = r.exec.kill().await;
        }
    }
}

/// The program a warm sandbox runs, for these prior imports.
pub(crate) fn program(prior: &[String]) -> String {
    // A JSON list of strings is a Python list literal.
    format!(
        "PRIOR = {}\n{PROGRAM}",
        serde_json::to_string(prior).unwrap_or_else(|_| "[]".into())
    )
}

/// Starts a warm sandbox of `r`.
fn spawn(c: &Confinement, r: &Recipe) -> Result<Ready, RuntimeError> {
    let dir = r.runs_dir.join(owned_name(".warm"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| RuntimeError::io("making a warm sandbox's directory", e))?;
    let started = (|| {
        let mut rw_at = vec![(dir.clone(), r.runs_dir.clone())];
        rw_at.extend(r.storage.iter().cloned());
        let jail = Jail {
            name: owned_name("warm"),
            argv: vec![
                r.python.clone().into(),
                "-u".into(),
                "-c".into(),
                program(&r.prior).into(),
            ],
            env: r.env.clone(),
            cwd: PathBuf::from("/tmp"),
            rw_at,
            ro: vec![r.env_dir.clone()],
            devices: r.devices.clone(),
            network: r.network,
            limits: r.limits.clone(),
            ..Default::default()
        };
        let mut prepared = c.prepare(&jail)?;
        // Low priority while it starts and waits (the server, root, gives its run the
        // normal policy back at hand-over; without root that could not be undone, so
        // it starts at the normal one).
        prepared.idle = c.drop_to.is_some();
        let (tx, rx) = mpsc::channel(1024);
        let (exec, stdin) = ProcessExecution::spawn_fed(&prepared, tx, Some("bwrap"))?;
        let disk = r.limits.disk_bytes.map(|d| (dir.clone(), d));
        Ok((exec.with_limits(prepared.cgroup, disk), stdin, rx))
    })();
    match started {
        Ok((exec, stdin, output)) => Ok(Ready {
            exec: exec.with_scratch(dir.clone()),
            stdin,
            output,
            dir,
            born: Instant::now(),
            said_ready: false,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// Hands `run` (its working directory as seen inside, its file's name, its whole
/// environment) to a warm sandbox, which starts it at once; `pipes`, when given, are
/// the run's own stdout and stderr, sent with the first bytes.
pub(crate) async fn hand_over(
    sock: &mut UnixStream,
    workdir: &std::path::Path,
    file_name: &str,
    env: impl Iterator<Item = (&str, &str)>,
    pipes: Option<[std::os::fd::BorrowedFd<'_>; 2]>,
) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::os::unix::ffi::OsStrExt;
    let mut msg = Vec::with_capacity(4096);
    msg.extend_from_slice(workdir.as_os_str().as_bytes());
    msg.push(0);
    msg.extend_from_slice(file_name.as_bytes());
    for (k, v) in env {
        msg.push(0);
        msg.extend_from_slice(k.as_bytes());
        msg.push(0);
        msg.extend_from_slice(v.as_bytes());
    }
    let mut sent = 0;
    if let Some(fds) = pipes {
        let mut space =
            vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(2))];
        loop {
            sock.writable().await?;
            let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
                let mut anc = SendAncillaryBuffer::new(&mut space);
                anc.push(SendAncillaryMessage::ScmRights(&fds));
                let io = [std::io::IoSlice::new(&msg)];
                Ok(rustix::net::sendmsg(
                    &*sock,
                    &io,
                    &mut anc,
                    SendFlags::NOSIGNAL,
                )?)
            });
            match r {
                Ok(n) => {
                    sent = n;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
    sock.write_all(&msg[sent..]).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(prior: &[&str]) -> Recipe {
        Recipe {
            python: "/envs/e/bin/python".into(),
            env_dir: "/envs/e".into(),
            runs_dir: "/data/runs".into(),
            env: vec![("SECRET".into(), "s3cr3t".into())],
            prior: prior.iter().map(|s| s.to_string()).collect(),
            limits: Limits::default(),
            network: false,
            devices: vec![],
            storage: None,
        }
    }

    /// A pool is made on the `learn_uses`-th use within the window, not before; keys
    /// differ in every value (a variable's value too).
    #[test]
    fn pools_are_learnt_from_uses_within_the_window() {
        let pools = WarmPools::new(WarmConfig {
            enabled: true,
            learn_uses: 3,
            ..Default::default()
        });
        let r = recipe(&["json"]);
        let key = r.key();
        let mut other = r.clone();
        other.env[0].1 = "another".into();
        assert_ne!(other.key(), key, "another org's values make another pool");
        for _ in 0..2 {
            pools.learn(key.clone(), r.clone());
        }
        assert!(!pools.state().pools.contains_key(&key));
        pools.learn(key.clone(), r.clone());
        assert!(pools.state().pools.contains_key(&key));
        // Made, but nothing is ready until it is tended.
        assert!(pools.take(&key).is_none());
        assert_eq!(pools.ready(), 0);

        let quick = WarmPools::new(WarmConfig {
            enabled: true,
            learn_uses: 2,
            learn_window: Duration::ZERO,
            ..Default::default()
        });
        for _ in 0..3 {
            quick.learn(key.clone(), r.clone());
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            !quick.state().pools.contains_key(&key),
            "uses further apart than the window do not make a pool"
        );
    }

    /// Prior imports reach the program as a Python list literal, quotes and all.
    #[test]
    fn the_program_binds_its_prior_imports() {
        let p = program(&["json".into(), "a.b".into()]);
        assert!(p.starts_with("PRIOR = [\"json\",\"a.b\"]\n"), "{p}");
        assert!(p.contains("PyRun_SimpleFileExFlags"));
    }
}
