//! Background loops (the lease reaper, callback delivery, retention, the Docker
//! reconciler) in one shape: a pass runs on a timer and on demand, and each loop keeps
//! its last outcome, which `/metrics` shows.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// The outcome of a background loop so far.
#[derive(Debug, Clone, Default)]
pub struct LoopOutcome {
    /// Passes done (failed ones included).
    pub passes: u64,
    /// What passes did, by kind (`""` for a loop with one kind).
    pub done: BTreeMap<&'static str, u64>,
    /// When the last pass ended (Unix seconds; 0 before the first).
    pub last_pass: f64,
    /// The last pass's error, when it failed.
    pub last_error: Option<String>,
}

impl LoopOutcome {
    /// Records a pass and what it did of each kind.
    pub fn record(&mut self, done: &[(&'static str, u64)], error: Option<String>) {
        self.passes += 1;
        for (kind, n) in done {
            *self.done.entry(kind).or_default() += n;
        }
        self.last_pass = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_error = error;
    }
}

/// What one pass did, and when it wants the next one.
#[derive(Debug, Default)]
pub struct Pass {
    /// What it did, by kind (the kinds the loop was made with).
    pub done: Vec<(&'static str, u64)>,
    /// The next pass sooner than the loop's interval (never later).
    pub next: Option<Duration>,
    /// Why the pass failed after it did what `done` counts.
    pub error: Option<String>,
}

impl Pass {
    /// A pass that did `n` things of the loop's one kind.
    pub fn did(n: u64) -> Self {
        Pass {
            done: vec![("", n)],
            ..Default::default()
        }
    }
}

/// A background loop: its name, what its counter counts, its outcome and its trigger.
pub struct Loop {
    name: &'static str,
    counter: &'static str,
    help: &'static str,
    outcome: Mutex<LoopOutcome>,
    wake: Notify,
}

impl Loop {
    /// A loop named `name` (the `stoa_<name>_*` series) whose passes count what `help`
    /// says in `stoa_<name>_<counter>_total`, under `kinds` (`&[""]` for a loop with
    /// one kind).
    pub fn new(
        name: &'static str,
        counter: &'static str,
        help: &'static str,
        kinds: &[&'static str],
    ) -> Self {
        Loop {
            name,
            counter,
            help,
            outcome: Mutex::new(LoopOutcome {
                done: kinds.iter().map(|k| (*k, 0)).collect(),
                ..Default::default()
            }),
            wake: Notify::new(),
        }
    }

    /// The loop's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Asks for a pass now (coalesced with one already asked for).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// What the loop did so far.
    pub fn outcome(&self) -> LoopOutcome {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a pass done outside [`Loop::run`].
    pub fn record(&self, done: &[(&'static str, u64)], error: Option<String>) {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(done, error);
    }

    /// Runs passes until `shutdown` flips: the first after `first`, then every
    /// `every` (or sooner, when a pass asks), and whenever [`Loop::wake`] is called. A
    /// failed pass is recorded with its error (the pass logs it as it sees fit) and the
    /// next one goes on.
    pub async fn run<F, Fut>(
        &self,
        first: Duration,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
        mut pass: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Pass, String>>,
    {
        let mut wait = first;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
            wait = every;
            match pass().await {
                Ok(p) => {
                    self.record(&p.done, p.error);
                    if let Some(n) = p.next {
                        wait = n.min(every);
                    }
                }
                Err(e) => self.record(&[], Some(e)),
            }
        }
    }

    /// Writes the loop's series in the Prometheus text format:
    /// `stoa_<name>_passes_total`, `…_<counter>_total` (with a `what` label per kind
    /// when there are several), `…_last_pass_timestamp_seconds`, `…_last_pass_failed`.
    pub fn render(&self, out: &mut String) {
        let o = self.outcome();
        let (name, counter, help) = (self.name, self.counter, self.help);
        let _ = write!(
            out,
            "# HELP stoa_{name}_passes_total Passes of the {name} loop.\n# TYPE stoa_{name}_passes_total counter\nstoa_{name}_passes_total {}\n\
             # HELP stoa_{name}_{counter}_total {help}\n# TYPE stoa_{name}_{counter}_total counter\n",
            o.passes,
        );
        for (kind, n) in &o.done {
            if kind.is_empty() {
                let _ = writeln!(out, "stoa_{name}_{counter}_total {n}");
            } else {
                let _ = writeln!(out, "stoa_{name}_{counter}_total{{what=\"{kind}\"}} {n}");
            }
        }
        let _ = write!(
            out,
            "# HELP stoa_{name}_last_pass_timestamp_seconds When the {name} loop's last pass ended.\n# TYPE stoa_{name}_last_pass_timestamp_seconds gauge\nstoa_{name}_last_pass_timestamp_seconds {}\n\
             # HELP stoa_{name}_last_pass_failed 1 when the {name} loop's last pass failed.\n# TYPE stoa_{name}_last_pass_failed gauge\nstoa_{name}_last_pass_failed {}\n",
            o.last_pass,
            u8::from(o.last_error.is_some())
        );
    }
}

/// What a worker reports about itself for `/metrics` (the embedded worker's).
pub struct WorkerStats {
    sampler_lag_micros: AtomicU64,
    /// Warm sandboxes ready for coming runs, as of the last tending.
    warm_ready: AtomicU64,
    /// The Docker reconciler's loop.
    pub reconciler: Loop,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            sampler_lag_micros: AtomicU64::new(0),
            warm_ready: AtomicU64::new(0),
            reconciler: Loop::new(
                "reconciler",
                "removed",
                "Orphaned containers, networks and volumes the reconciler removed.",
                &[""],
            ),
        }
    }
}

impl WorkerStats {
    /// Records how late the sampler's last tick was.
    pub fn set_sampler_lag(&self, secs: f64) {
        self.sampler_lag_micros
            .store((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// How late the sampler's last tick was, in seconds.
    pub fn sampler_lag(&self) -> f64 {
        self.sampler_lag_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Records how many warm sandboxes are ready.
    pub fn set_warm_ready(&self, n: usize) {
        self.warm_ready.store(n as u64, Ordering::Relaxed);
    }

    /// Warm sandboxes ready for coming runs, as of the last tending.
    pub fn warm_ready(&self) -> u64 {
        self.warm_ready.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_passes_on_its_timer_on_demand_and_keeps_its_last_outcome() {
        let l = Arc::new(Loop::new("test", "removed", "things", &["a", "b"]));
        let (tx, rx) = watch::channel(false);
        let n = Arc::new(AtomicUsize::new(0));
        let task = {
            let (l, n) = (l.clone(), n.clone());
            tokio::spawn(async move {
                l.run(Duration::from_secs(1), Duration::from_secs(60), rx, || {
                    let i = n.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if i == 1 {
                            Err("the store is away".to_string())
                        } else {
                            Ok(Pass {
                                done: vec![("a", 2)],
                                ..Default::default()
                            })
                        }
                    }
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(n.load(Ordering::SeqCst), 1, "the first pass after `first`");
        l.wake();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(n.load(Ordering::SeqCst), 2, "a pass on demand");
        let o = l.outcome();
        assert_eq!(o.passes, 2);
        assert_eq!(o.done[&"a"], 2);
        assert_eq!(o.done[&"b"], 0);
        assert_eq!(o.last_error.as_deref(), Some("the store is away"));
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(n.load(Ordering::SeqCst), 3, "the next pass on the timer");
        assert!(l.outcome().last_error.is_none());
        let mut out = String::new();
        l.render(&mut out);
        assert!(out.contains("stoa_test_passes_total 3\n"), "{out}");
        assert!(
            out.contains("stoa_test_removed_total{what=\"a\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("stoa_test_last_pass_failed 0\n"), "{out}");
        tx.send(true).unwrap();
        task.await.unwrap();
    }
}
