//! The worker: claims runs from the control plane, executes them with the runtimes
//! (sandboxed Python, Python in a profile's image, image and compose runs), and sends
//! their output, progress, samples and ends back. It talks to the control plane only
//! through [`ControlPlane`]: in-process for the embedded worker, over HTTP for
//! `stoa worker` on another machine.
//!
//! Invariants:
//! - A run's output is sent before its end, so a reader that sees a terminal state and
//!   then reads the output has all of it.
//! - A run is held (its control channel registered) from its claim until every process
//!   and container of it is gone; the Docker sweep spares exactly the runs held.
//! - When a run ends, every process of it is gone (confirmed), and its working
//!   directory is removed.
//! - A worker that lost a run's lease kills it and writes nothing more of it.

pub mod masking;
pub mod setup;
mod sink;
pub mod slurm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoa_core::plane::{Assignment, ControlPlane, Directive, Progress, RunEnd};
use stoa_runtime::docker::{DockerRuntime, RegistryAuth, Resources};
use stoa_runtime::{
    Execution, LaunchContext, LaunchError, LaunchRequest, Launched, Measure, OutputLine, Runtime,
    RuntimeError,
};
use stoa_types::{RunId, RunStatus};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use sink::OutputSink;
use stoa_config::Config;
use stoa_core::loops::{Pass, WorkerStats};
use stoa_core::record::RunKind;

pub use setup::{runtimes, runtimes_for_one_run};

/// A request to a running run.
#[derive(Debug, Clone, Copy)]
enum Control {
    /// Kill now; the run ends `aborted`.
    Abort,
    /// SIGTERM, then kill after the grace period; the run ends `cancelled`.
    Stop(Duration),
    /// The server is going down; the run ends `system_failure`.
    Shutdown,
    /// The worker no longer holds the run's lease (the reaper ended it): kill it and
    /// write nothing more.
    Lost,
    /// The cluster manager ended the job the run ran in (its time limit, an admin's
    /// `scancel`): kill it, store its output, and leave its end to the bridge, which
    /// knows why.
    Withdrawn,
}

impl From<stoa_core::plane::RunControl> for Control {
    fn from(c: stoa_core::plane::RunControl) -> Self {
        match c {
            stoa_core::plane::RunControl::Abort => Control::Abort,
            stoa_core::plane::RunControl::Stop { grace_ms } => {
                Control::Stop(Duration::from_millis(grace_ms))
            }
        }
    }
}

/// A run this worker holds: its control channel and lease token.
struct Held {
    tx: mpsc::UnboundedSender<Control>,
    token: String,
    /// The number of the run's next output piece (its sink's; a notice written after
    /// the sink is gone goes on from it).
    next_seq: Arc<std::sync::atomic::AtomicI64>,
}

/// The error of runs the server's shutdown ended.
const SHUTDOWN_ERROR: &str = "the server shut down while the run was active";

/// The same, for a worker on another machine that was stopped.
const WORKER_SHUTDOWN_ERROR: &str = "the worker shut down while the run was active";

/// The error of an outcome that is not reported: the cluster manager ended the run's
/// job, and its bridge says why.
const WITHDRAWN: &str = "the cluster manager ended the run's job";

/// How a run ended, as decided by the worker.
#[derive(Debug, Clone)]
struct Outcome {
    status: RunStatus,
    return_code: Option<i64>,
    error: Option<String>,
    timed_out: bool,
}

impl Outcome {
    fn system(error: impl Into<String>) -> Self {
        Outcome {
            status: RunStatus::SystemFailure,
            return_code: None,
            error: Some(error.into()),
            timed_out: false,
        }
    }

    fn failed(error: impl Into<String>) -> Self {
        Outcome {
            status: RunStatus::Failed,
            return_code: None,
            error: Some(error.into()),
            timed_out: false,
        }
    }

    fn from_control(c: Control, stop_exit: Option<i64>) -> Self {
        match c {
            Control::Abort => Outcome {
                status: RunStatus::Aborted,
                return_code: None,
                error: Some("aborted by user".into()),
                timed_out: false,
            },
            Control::Stop(_) => Outcome {
                status: RunStatus::Cancelled,
                return_code: stop_exit,
                error: Some("cancelled by user".into()),
                timed_out: false,
            },
            Control::Shutdown => Outcome::system(SHUTDOWN_ERROR),
            // Never stored: the lease is gone, so is the right to write the end.
            Control::Lost => Outcome::system("the worker lost the run's lease"),
            // Never sent: the bridge writes the end.
            Control::Withdrawn => Outcome::system(WITHDRAWN),
        }
    }
}

/// The worker: runs claimed from the control plane, executed with these runtimes.
pub struct Worker {
    plane: Arc<dyn ControlPlane>,
    config: Arc<Config>,
    /// The runtimes by the kind of run they execute ([`PYTHON`], ...).
    runtimes: HashMap<&'static str, Arc<dyn Runtime>>,
    /// The Docker engine (the reconciler, container samples), when configured.
    docker: Option<Arc<DockerRuntime>>,
    /// NVML (no GPUs without the driver).
    gpus: Arc<stoa_runtime::gpu::Gpus>,
    /// Runs this worker holds.
    held: Mutex<HashMap<RunId, Held>>,
    /// What the sampler measures: running runs and their last CPU reading.
    sampling: Mutex<HashMap<RunId, SampleTarget>>,
    /// Platform metrics (sampler lag, reconciler passes).
    stats: Arc<WorkerStats>,
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Most bytes of a run's output kept on disk while the control plane is away (a
    /// worker on another machine); `None`: memory only.
    spool_max: Option<u64>,
    /// `stoa exec`: what Slurm's signal to the job turned out to mean.
    signal: Mutex<Option<watch::Receiver<JobSignal>>>,
    /// False in `stoa exec`: the node's engine has containers of other jobs' runs,
    /// which this process does not hold, so it sweeps nothing.
    sweeps: std::sync::atomic::AtomicBool,
    /// Wakes the tending of warm sandboxes (a run started or ended).
    tending: Arc<tokio::sync::Notify>,
}

/// Slurm's signal to the job of a `stoa exec` run: none yet, one being looked into
/// (the control plane is asked what is wanted), or what it meant.
#[derive(Debug, Clone, Copy)]
enum JobSignal {
    None,
    Deciding,
    Decided(Control),
}

/// What executes runs on this worker.
pub struct Runtimes {
    /// By the kind of run they execute ([`PYTHON`], [`CONTAINER_PYTHON`], [`IMAGE`],
    /// [`COMPOSE`]).
    pub runs: HashMap<&'static str, Arc<dyn Runtime>>,
    /// `None` when no Docker engine is configured.
    pub docker: Option<Arc<DockerRuntime>>,
    pub gpus: Arc<stoa_runtime::gpu::Gpus>,
}

impl Worker {
    /// A worker over these runtimes, claiming from `plane`.
    pub fn new(
        plane: Arc<dyn ControlPlane>,
        config: Arc<Config>,
        runtimes: Runtimes,
        stats: Arc<WorkerStats>,
    ) -> Self {
        let Runtimes { runs, docker, gpus } = runtimes;
        let capacity = config.concurrency();
        Worker {
            plane,
            config,
            runtimes: runs,
            docker,
            gpus,
            held: Mutex::new(HashMap::new()),
            sampling: Mutex::new(HashMap::new()),
            stats,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            spool_max: None,
            signal: Mutex::new(None),
            sweeps: std::sync::atomic::AtomicBool::new(true),
            tending: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Keeps up to `max` bytes of each run's output in `DATA_DIR/spool` while the
    /// control plane cannot take it: a worker on another machine (whose own shutdown is
    /// then said as such in the runs it ends).
    pub fn with_spool(mut self, max: u64) -> Self {
        self.spool_max = Some(max);
        self
    }

    fn spool_dir(&self) -> PathBuf {
        self.config.data_dir.join("spool")
    }

    fn runs_dir(&self) -> PathBuf {
        self.config.data_dir.join("runs")
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before the worker's first claim: kills what is left of runs an earlier
    /// incarnation of it held (each run by its recorded process group, when that group
    /// still carries the run's id), and removes their working directories.
    pub fn kill_leftovers(&self, runs: &[(RunId, i64)]) -> std::io::Result<()> {
        for (id, pgid) in runs {
            if owns_process_group(*pgid as i32, *id) {
                stoa_runtime::kill_group(*pgid as i32);
            }
        }
        for dir in [self.runs_dir(), self.spool_dir()] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            std::fs::create_dir_all(&dir)?;
        }
        Ok(())
    }

    /// All a worker does: its background loops (the sampler and the Docker
    /// reconciler, which removes at once what runs that ended while it was away left,
    /// then every `docker.reconcile_interval_s`) until `shutdown` flips, the spare
    /// networks made ahead, and the claim loop until `stopping` flips ([`Worker::run`]).
    pub async fn serve(
        self: Arc<Self>,
        stopping: watch::Receiver<bool>,
        shutdown: watch::Receiver<bool>,
    ) {
        let every = Duration::from_secs(self.config.docker.reconcile_interval_s.max(1));
        tokio::spawn(self.clone().run_reconciler(every, shutdown.clone()));
        tokio::spawn(self.clone().run_tending(shutdown.clone()));
        tokio::spawn(self.clone().run_sampler(shutdown));
        let warm = self.clone();
        tokio::spawn(async move { warm.warm_up().await });
        self.run(stopping).await
    }

    /// The worker loop: claims runs while there are free slots. Returns when
    /// `shutdown` flips, after active runs finished or were ended (see
    /// `limits.shutdown_grace_s`).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let beats = tokio::spawn(self.clone().run_heartbeats());
        loop {
            if *shutdown.borrow() {
                break;
            }
            let permit = tokio::select! {
                p = self.slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.changed() => break,
            };
            match self.plane.claim().await {
                Ok(Some(run)) => {
                    let (_, rx) = self.hold(&run);
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.execute_guarded(run, rx).await;
                        drop(permit);
                    });
                }
                Ok(None) => {
                    drop(permit);
                    tokio::select! {
                        _ = self.plane.work_available() => {}
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
                Err(e) => {
                    drop(permit);
                    tracing::error!(error = %e, "claiming a run failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
        self.drain().await;
        beats.abort();
        self.release().await;
    }

    /// `stoa exec`: Slurm signals every process of the job at once, the run's own
    /// included, so how the run went down does not say why: when the job was
    /// signalled, the outcome is what the signal meant (an abort or stop asked for, or
    /// the cluster manager's own reasons).
    async fn after_job_signal(&self, outcome: Option<Outcome>) -> Option<Outcome> {
        let Some(mut rx) = self
            .signal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return outcome;
        };
        let return_code = outcome.as_ref().and_then(|o| o.return_code);
        // The run may see SIGTERM (143) a moment before this process does.
        if matches!(*rx.borrow(), JobSignal::None)
            && !(return_code == Some(143)
                && tokio::time::timeout(
                    Duration::from_secs(1),
                    rx.wait_for(|s| !matches!(s, JobSignal::None)),
                )
                .await
                .is_ok())
        {
            return outcome;
        }
        let decided = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| matches!(s, JobSignal::Decided(_))),
        )
        .await;
        let c = match decided.as_ref().map(|r| r.as_ref().map(|s| **s)) {
            Ok(Ok(JobSignal::Decided(c))) => c,
            _ => Control::Withdrawn,
        };
        Some(Outcome::from_control(c, return_code))
    }

    /// Executes one run handed over under its lease (`stoa exec` in a Slurm job): its
    /// heartbeats and samples go with it. When `ended` flips (Slurm signalled the job),
    /// the control plane is asked at once what is wanted: an abort or stop asked for is
    /// carried out and reported; otherwise the cluster manager ended the job for its
    /// own reasons, and the run is killed, its output stored and its end left to the
    /// bridge.
    pub async fn execute_one(self: Arc<Self>, run: Assignment, mut ended: watch::Receiver<bool>) {
        let (id, token) = (run.id, run.lease_token.clone());
        self.sweeps
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = self.hold(&run);
        let beats = tokio::spawn(self.clone().run_heartbeats());
        let (sampling_tx, sampling_rx) = watch::channel(false);
        tokio::spawn(self.clone().run_sampler(sampling_rx));
        let plane = self.plane.clone();
        let (signal_tx, signal_rx) = watch::channel(JobSignal::None);
        *self.signal.lock().unwrap_or_else(|p| p.into_inner()) = Some(signal_rx);
        let signalled = tokio::spawn(async move {
            if ended.wait_for(|v| *v).await.is_err() {
                return;
            }
            let _ = signal_tx.send(JobSignal::Deciding);
            let c = match plane.heartbeat(&[(id, token)]).await {
                Ok(d) => match d.first().map(|(_, d)| *d) {
                    Some(Directive::Control(c)) => c.into(),
                    Some(Directive::Lost) => Control::Lost,
                    _ => Control::Withdrawn,
                },
                Err(_) => Control::Withdrawn,
            };
            tracing::info!(run = %id, control = ?c, "the Slurm job was signalled");
            let _ = signal_tx.send(JobSignal::Decided(c));
            let _ = tx.send(c);
        });
        self.clone().execute_guarded(run, rx).await;
        signalled.abort();
        beats.abort();
        let _ = sampling_tx.send(true);
    }

    /// Holds a claimed run from now on (its control channel and lease), before anything
    /// of it exists; the channel's ends.
    fn hold(
        &self,
        run: &Assignment,
    ) -> (
        mpsc::UnboundedSender<Control>,
        mpsc::UnboundedReceiver<Control>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.held().insert(
            run.id,
            Held {
                tx: tx.clone(),
                token: run.lease_token.clone(),
                next_seq: Arc::new(std::sync::atomic::AtomicI64::new(1)),
            },
        );
        (tx, rx)
    }

    /// Executes a held run; a panic of its supervisor ends it `system_failure`.
    async fn execute_guarded(
        self: Arc<Self>,
        run: Assignment,
        rx: mpsc::UnboundedReceiver<Control>,
    ) {
        use futures::FutureExt;
        let claimed = run.clone();
        let supervised = std::panic::AssertUnwindSafe(self.clone().execute(run, rx));
        if let Err(panic) = supervised.catch_unwind().await {
            self.supervisor_panicked(claimed, panic).await;
        }
    }

    /// Renews the leases of the runs this worker holds and carries out what the
    /// answers say (an abort or stop asked for, or a run lost).
    async fn heartbeat(&self) {
        let held: Vec<(RunId, String)> = self
            .held()
            .iter()
            .map(|(id, h)| (*id, h.token.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        let answers = match self.plane.heartbeat(&held).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "renewing the worker's leases failed");
                return;
            }
        };
        let held = self.held();
        for (id, d) in answers {
            let c = match d {
                Directive::Continue => continue,
                Directive::Control(c) => c.into(),
                Directive::Lost => Control::Lost,
            };
            if let Some(h) = held.get(&id) {
                let _ = h.tx.send(c);
            }
        }
    }

    /// Heartbeats every third of the lease, and at once when the control plane has a
    /// control waiting; also while the worker drains at shutdown (`run` ends it).
    async fn run_heartbeats(self: Arc<Self>) {
        let every = self.plane.lease() / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.plane.control_pending() => {}
            }
            self.heartbeat().await;
        }
    }

    /// At shutdown: waits for active runs up to the grace period, then ends the rest.
    async fn drain(&self) {
        let all = self.capacity as u32;
        let grace = Duration::from_secs(self.config.limits.shutdown_grace_s);
        if tokio::time::timeout(grace, self.slots.acquire_many(all))
            .await
            .is_ok()
        {
            return;
        }
        let controls: Vec<_> = self.held().values().map(|h| h.tx.clone()).collect();
        tracing::warn!(
            runs = controls.len(),
            "ending runs still active at shutdown"
        );
        for c in controls {
            let _ = c.send(Control::Shutdown);
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.slots.acquire_many(all)).await;
    }

    /// Executes one claimed run to its end and sends the outcome.
    async fn execute(self: Arc<Self>, run: Assignment, mut ctl: mpsc::UnboundedReceiver<Control>) {
        let id = run.id;
        let workdir = self.runs_dir().join(id.to_string());
        let mut sink = OutputSink::new(
            self.plane.clone(),
            id,
            run.lease_token.clone(),
            self.next_seq_of(id),
            run.org_id.clone(),
            self.config.limits.max_output_bytes,
        );
        sink.held_max = self.config.limits.max_held_output_bytes;
        if let Some(max) = self.spool_max {
            let path = self.spool_dir().join(format!("{id}.jsonl"));
            sink.spool = Some(sink::Spool::new(path, max));
        }
        if let Some(o) = run.org_output {
            sink.org_limit(o.limit, o.used);
        }
        sink.mask(
            run.secrets.iter().map(|(_, v)| v.clone()),
            self.config.secrets.min_mask_len,
        );
        // A run that reported its own end leaves its sandbox here, taken down once its
        // end is recorded (before its slot is free).
        let mut ended = None;
        let outcome = match self
            .drive(&run, &workdir, &mut sink, &mut ctl, &mut ended)
            .await
        {
            Ok(o) => o,
            Err(e) => Some(Outcome::system(format!("internal error: {e}"))),
        };
        tracing::debug!(run = %id, "the run's supervision ended");
        let outcome = self.after_job_signal(outcome).await;
        // Whatever way the run went, no held-back output is lost.
        sink.flush_held().await;
        if outcome
            .as_ref()
            .is_some_and(|o| o.error.as_deref() == Some(WITHDRAWN))
        {
            // Its output is stored (tried for a while: the job is being killed); its
            // end is the bridge's to write.
            for _ in 0..20 {
                if sink.settle().await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            self.held().remove(&id);
            let _ = std::fs::remove_dir_all(&workdir);
            return;
        }
        let end = outcome.map(|mut o| {
            if o.error.as_deref() == Some(SHUTDOWN_ERROR) {
                let why = if self.spool_max.is_some() {
                    // A worker on another machine: it went down, not the server.
                    WORKER_SHUTDOWN_ERROR
                } else {
                    SHUTDOWN_ERROR
                };
                o.error = Some(why.into());
                sink.pending_note(&format!("{why}; output up to that point is kept"));
            }
            RunEnd {
                status: o.status,
                return_code: o.return_code,
                // An error may repeat what the run printed or an interpolated image.
                error: o.error.map(|mut e| {
                    sink.mask_text(&mut e);
                    e
                }),
                timed_out: o.timed_out,
            }
        });
        self.finish(&run, &mut sink, end).await;
        tracing::debug!(run = %id, "the run's end is recorded");
        if let Some(mut exec) = ended
            && let Err(e) = exec.finish_off().await
        {
            tracing::error!(run = %id, error = %e, "what was left of the run's sandbox could not be killed");
        }
        self.tending.notify_one();
        self.held().remove(&id);
        if workdir.exists()
            && let Err(e) = std::fs::remove_dir_all(&workdir)
        {
            tracing::warn!(run = %id, error = %e, "removing the run's working directory failed");
        }
    }

    /// Sends a run's end: its held-back output first, then its final state, retried
    /// until the control plane takes it, since its disk may be full: a run never stays
    /// active after its process ended, and the exit code it had is the one kept. A run
    /// without an end (it ended elsewhere before it started) is given back all the same.
    async fn finish(&self, run: &Assignment, sink: &mut OutputSink, end: Option<RunEnd>) {
        let id = run.id;
        let end = end.unwrap_or(RunEnd {
            // Never stored: the run already ended, or is no longer this worker's.
            status: RunStatus::SystemFailure,
            return_code: None,
            error: Some("the run ended before it started".into()),
            timed_out: false,
        });
        let mut delay = Duration::from_millis(100);
        let mut told = false;
        loop {
            if sink.settle().await {
                match self.plane.finish(id, &run.lease_token, end.clone()).await {
                    Ok(_) => {
                        if told {
                            tracing::info!(run = %id, "the end of the run is stored");
                        }
                        return;
                    }
                    Err(e) => {
                        if !told {
                            tracing::error!(run = %id, error = %e, "storing the end of a run failed: retrying until it is stored");
                            told = true;
                        }
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// A run's supervisor panicked: whatever of the run is left is killed, and it ends
    /// `system_failure` (its output so far kept), freeing its slot and GPUs.
    async fn supervisor_panicked(&self, run: Assignment, panic: Box<dyn std::any::Any + Send>) {
        let id = run.id;
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(run = %id, panic = %what, "the supervisor of a run panicked");
        let target = self
            .sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        // The process tree, by its group; containers go with the sweep once the run is
        // no longer held.
        if let Some(SampleTarget {
            what: Measure::Group(pgid),
            ..
        }) = target
            && owns_process_group(pgid, id)
        {
            stoa_runtime::kill_group(pgid);
        }
        let next_seq = self.next_seq_of(id);
        self.held().remove(&id);
        let swept = self.reconcile().await;
        self.stats
            .reconciler
            .record(&[("", *swept.as_ref().unwrap_or(&0) as u64)], swept.err());
        let mut sink = OutputSink::new(
            self.plane.clone(),
            id,
            run.lease_token.clone(),
            next_seq,
            run.org_id.clone(),
            u64::MAX,
        );
        sink.pending_note(
            "internal error: the run's supervisor failed; output up to that point is kept",
        );
        let end = RunEnd {
            status: RunStatus::SystemFailure,
            return_code: None,
            error: Some("internal error: the run's supervisor failed".into()),
            timed_out: false,
        };
        self.finish(&run, &mut sink, Some(end)).await;
        let workdir = self.runs_dir().join(id.to_string());
        if workdir.exists() {
            let _ = std::fs::remove_dir_all(&workdir);
        }
    }

    /// The output numbering of a held run (a fresh one for a run not held).
    fn next_seq_of(&self, id: RunId) -> Arc<std::sync::atomic::AtomicI64> {
        self.held()
            .get(&id)
            .map(|h| h.next_seq.clone())
            .unwrap_or_else(|| Arc::new(std::sync::atomic::AtomicI64::new(1)))
    }

    /// Records progress of a run; `false` when the worker no longer holds it.
    async fn progress(&self, run: &Assignment, p: Progress) -> anyhow::Result<bool> {
        // Running is reported again when its answer was lost (the store answers yes to
        // the same lease): a connection dropped once does not end the run.
        let retries = if matches!(p, Progress::Running { .. }) {
            3
        } else {
            0
        };
        let mut delay = Duration::from_millis(200);
        for _ in 0..retries {
            match self
                .plane
                .progress(run.id, &run.lease_token, p.clone())
                .await
            {
                Err(stoa_core::plane::PlaneError::Unavailable(e)) => {
                    tracing::warn!(run = %run.id, error = %e, "reporting the run running failed; again in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                r => return Ok(r?),
            }
        }
        Ok(self.plane.progress(run.id, &run.lease_token, p).await?)
    }

    /// Reads the GPUs of running runs that were given GPUs.
    async fn sample_gpus(&self) -> Vec<stoa_core::plane::GpuSample> {
        let targets: Vec<(RunId, Vec<u32>)> = self
            .sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| !t.gpus.is_empty())
            .map(|(k, t)| (*k, t.gpus.clone()))
            .collect();
        let mut out = Vec::new();
        for (id, idx) in targets {
            let gpus = self.gpus.clone();
            let readings = tokio::task::spawn_blocking(move || gpus.read(&idx))
                .await
                .unwrap_or_default();
            let ts = stoa_core::time::now();
            out.extend(readings.into_iter().map(|r| stoa_core::plane::GpuSample {
                run_id: Some(id),
                ts,
                gpu: r.index as i64,
                values: [
                    r.utilization_percent,
                    r.memory_utilization_percent,
                    r.memory_used_bytes,
                    r.temperature_celsius,
                    r.power_watt,
                    r.power_limit_watt,
                    r.clock_sm_mhz,
                    r.clock_mem_mhz,
                    r.pcie_rx_bytes_per_sec,
                    r.pcie_tx_bytes_per_sec,
                ],
            }));
        }
        out
    }

    /// The sampler: every `metrics.interval_ms`, one sample per running run, sent in
    /// one batch.
    pub async fn run_sampler(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.config.metrics.interval_ms.max(100));
        let mut next = Instant::now() + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.changed() => return,
            }
            let lag = Instant::now().saturating_duration_since(next);
            self.stats.set_sampler_lag(lag.as_secs_f64());
            next += interval;
            if next < Instant::now() {
                next = Instant::now() + interval;
            }
            let samples = self.sample_once().await;
            let gpus = self.sample_gpus().await;
            if (!samples.is_empty() || !gpus.is_empty())
                && let Err(e) = self.plane.samples(samples, gpus).await
            {
                tracing::error!(error = %e, "storing samples failed");
            }
        }
    }

    /// Prepares, launches and supervises a run with the runtime of its type. `Ok(None)`
    /// when the run already ended elsewhere (aborted between claim and start).
    async fn drive(
        &self,
        run: &Assignment,
        workdir: &std::path::Path,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
        ended: &mut Option<Box<dyn Execution>>,
    ) -> anyhow::Result<Option<Outcome>> {
        let id = run.id;
        let runtime = match self.runtime_for(run) {
            Ok(r) => r,
            Err(outcome) => return Ok(Some(outcome)),
        };
        let profile = self.profile(&run.execution_type);
        let run_id = id.to_string();
        let request = LaunchRequest {
            run_id: &run_id,
            profile: &run.execution_type,
            spec: &run.spec,
            secrets: &run.secrets,
            registry: run.registry.clone().map(|c| RegistryAuth {
                username: c.username,
                password: c.password,
            }),
            gpu_ids: &run.gpu_ids,
            resources: self.resources_for(run),
            disk_mb: profile.and_then(|p| p.disk_mb),
            python_image: profile.and_then(|p| p.python_image.as_deref()),
            workdir,
        };
        let ctx = Preparing {
            worker: self,
            run,
            sink: tokio::sync::Mutex::new(sink),
            ctl: tokio::sync::Mutex::new(ctl),
            control: Mutex::new(None),
            phases: Phases::new(self.plane.clone(), run),
        };
        let launched = runtime.launch(&request, &ctx).await;
        self.tend_after(Duration::from_millis(
            self.config.python.warm.refill_after_ms,
        ));
        // Its timeline is stored before it is recorded running (or ended).
        if let Err(e) = ctx.phases.stored().await {
            if let Ok(mut l) = launched {
                let _ = l.exec.kill().await;
            }
            return Err(anyhow::anyhow!("storing the run's timeline failed: {e}"));
        }
        let control = ctx.control.into_inner().unwrap_or_else(|p| p.into_inner());
        let (sink, ctl) = (ctx.sink.into_inner(), ctx.ctl.into_inner());
        let Launched {
            mut exec,
            output: mut rx,
            timeout_s,
            measure,
            cpu_before_s,
            ports,
        } = match launched {
            Ok(l) => l,
            Err(LaunchError::Interrupted) => {
                return Ok(Some(match control {
                    Some(c) => Outcome::from_control(c, None),
                    None => Outcome::system("the run's preparation was interrupted"),
                }));
            }
            Err(LaunchError::Failed(msg)) => return Ok(Some(Outcome::failed(msg))),
            Err(LaunchError::System(msg)) => return Ok(Some(Outcome::system(msg))),
            Err(LaunchError::Worker(msg)) => return Err(anyhow::anyhow!(msg)),
        };
        let started = self
            .progress(run, Progress::Running { pgid: exec.pgid() })
            .await;
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                // Not recorded as running: it must not run unwatched.
                let _ = exec.kill().await;
                return Err(e);
            }
        };
        if !started {
            // Aborted between the claim and now, or its lease lost: it must not run.
            exec.kill().await?;
            return Ok(None);
        }
        if let Some(ports) = ports {
            tokio::spawn(record_ports(
                self.plane.clone(),
                run.id,
                run.lease_token.clone(),
                ports,
            ));
        }
        #[cfg(feature = "fault-injection")]
        if run.run_name.as_deref() == Some(FAULT_SUPERVISOR_PANIC) {
            panic!("fault injection: the supervisor of run {id} panics");
        }
        let target = match (measure, exec.pgid()) {
            (Some(t), _) => t,
            (None, Some(pgid)) => Measure::Group(pgid as i32),
            (None, None) => Measure::Containers(vec![format!("stoa-{id}")]),
        };
        self.sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                // CPU time of a new process group or container starts at zero now (a
                // warm sandbox's at what its start-up used).
                SampleTarget {
                    what: target,
                    gpus: run.gpu_ids.iter().filter_map(|g| g.parse().ok()).collect(),
                    memory_limit: self.resources_for(run).memory_mb.map(|m| m * 1024 * 1024),
                    last: Some((cpu_before_s, Instant::now())),
                },
            );
        let outcome = supervise(
            exec.as_mut(),
            &mut rx,
            timeout_s,
            sink,
            ctl,
            |exit, first| runtime.setup_failure(exit, first),
        )
        .await;
        self.sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        *ended = Some(exec);
        Ok(Some(outcome))
    }

    /// The runtime of a run: by its type, and for a Python run of a profile with a
    /// `python_image`, the containerised one.
    fn runtime_for(&self, run: &Assignment) -> Result<Arc<dyn Runtime>, Outcome> {
        let kind = match run.job_type {
            RunKind::Python
                if self
                    .profile(&run.execution_type)
                    .is_some_and(|p| p.python_image.is_some()) =>
            {
                CONTAINER_PYTHON
            }
            RunKind::Notebook => IMAGE,
            other => other.as_str(),
        };
        self.runtimes.get(kind).cloned().ok_or_else(|| {
            Outcome::system(match kind {
                PYTHON => "no worker can execute Python runs here".to_string(),
                CONTAINER_PYTHON => {
                    "no worker can execute containerised Python runs here".to_string()
                }
                IMAGE | COMPOSE => format!("no worker can execute {kind} runs here"),
                other => format!("no runtime for runs of type {other:?}"),
            })
        })
    }

    /// The run's org storage directory, made when missing (to be mounted).
    fn org_storage(&self, run: &Assignment) -> std::io::Result<std::path::PathBuf> {
        let dir = stoa_config::org_storage_dir(&self.config.data_dir, &run.org_id);
        stoa_config::make_storage_root(&dir)?;
        Ok(dir)
    }

    /// The configured profile of that name.
    fn profile(&self, name: &str) -> Option<&stoa_config::ProfileConfig> {
        self.config.profiles.iter().find(|p| p.name == name)
    }

    /// Container limits of a run: its profile's, with the GPUs it was given.
    fn resources_for(&self, run: &Assignment) -> Resources {
        let p = self.profile(&run.execution_type);
        Resources {
            cpus: p.and_then(|p| p.cpus),
            memory_mb: p.and_then(|p| p.memory_mb),
            pids_limit: p.and_then(|p| p.pids_limit),
            gpu_count: p.map(|p| p.gpu_count).unwrap_or(0),
            gpu_ids: run.gpu_ids.clone(),
            network: p.and_then(|p| p.network),
        }
    }

    /// Removes containers and networks of this installation that no active run owns.
    pub async fn reconcile(&self) -> Result<usize, String> {
        let Some(docker) = &self.docker else {
            return Ok(0);
        };
        if !self.sweeps.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(0);
        }
        // Asked at each object, not from a list made before the engine's listing: a
        // run claimed meanwhile may already have a container in that listing. A run's
        // control is registered before its first container is made, and removed only
        // after its containers are gone.
        let live = |run: &str| {
            // Tool containers of a run (its environment build) carry its id as a prefix.
            let id = run.get(..36).unwrap_or(run);
            id.parse::<RunId>()
                .is_ok_and(|id| self.held().contains_key(&id))
        };
        match docker.reconcile(&live).await {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::debug!(error = %e, "reconciler skipped: Docker engine not available");
                Err(e.to_string())
            }
        }
    }

    /// Samples every running run once; returns the samples taken.
    pub async fn sample_once(&self) -> Vec<stoa_core::plane::Sample> {
        let targets: Vec<(RunId, SampleTarget)> = self
            .sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        if targets.is_empty() {
            return vec![];
        }
        let needs_proc = targets
            .iter()
            .any(|(_, t)| matches!(t.what, Measure::Group(_)));
        let snap = if needs_proc {
            tokio::task::spawn_blocking(stoa_runtime::metrics::proc_snapshot)
                .await
                .unwrap_or_default()
        } else {
            Default::default()
        };
        let host_mem = stoa_runtime::metrics::mem_total();
        let now = Instant::now();
        let ts = stoa_core::time::now();
        let mut out = Vec::new();
        // Engine stats take a second or two each: every run's at once.
        let readings = futures::future::join_all(
            targets
                .iter()
                .map(|(_, t)| self.reading(t, &snap, host_mem)),
        )
        .await;
        for ((id, t), reading) in targets.into_iter().zip(readings) {
            let Some((cpu_s, used, total)) = reading else {
                continue;
            };
            let cpu_percent = match t.last {
                Some((prev_cpu, at)) => {
                    let wall = now.duration_since(at).as_secs_f64();
                    if wall > 0.0 {
                        ((cpu_s - prev_cpu) / wall * 100.0).max(0.0)
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            if let Some(e) = self
                .sampling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&id)
            {
                e.last = Some((cpu_s, now));
            }
            out.push(stoa_core::plane::Sample {
                run_id: id,
                ts,
                cpu_percent,
                ram_used: used as i64,
                ram_total: total as i64,
            });
        }
        out
    }

    /// CPU seconds so far, memory used and memory total of one sampled run.
    async fn reading(
        &self,
        t: &SampleTarget,
        snap: &stoa_runtime::metrics::ProcSnapshot,
        host_mem: u64,
    ) -> Option<(f64, u64, u64)> {
        match &t.what {
            Measure::Group(pgid) => snap.groups.get(pgid).map(|(ticks, rss)| {
                (
                    *ticks as f64 / stoa_runtime::metrics::CLOCK_TICKS,
                    *rss,
                    t.memory_limit.unwrap_or(host_mem),
                )
            }),
            Measure::Containers(names) => {
                let d = self.docker.as_ref()?;
                let stats =
                    futures::future::join_all(names.iter().map(|n| d.container_stats(n))).await;
                let mut sum: Option<(u64, u64, u64)> = None;
                for (ns, used, limit) in stats.into_iter().flatten() {
                    let limit = if limit == 0 { host_mem } else { limit };
                    let (a, b, c) = sum.unwrap_or((0, 0, 0));
                    sum = Some((a + ns, b + used, c.saturating_add(limit)));
                }
                sum.map(|(ns, used, limit)| (ns as f64 / 1e9, used, limit.min(host_mem)))
            }
        }
    }

    /// Makes the spare networks of image runs ahead of the first run.
    pub async fn warm_up(&self) {
        if let Some(d) = &self.docker
            && d.ping().await.is_ok()
        {
            d.refill().await;
        }
    }

    /// Runs the reconciler at once, then every `interval` (and when asked), until
    /// shutdown.
    pub async fn run_reconciler(
        self: Arc<Self>,
        interval: Duration,
        shutdown: watch::Receiver<bool>,
    ) {
        let mut first = true;
        let me = self.clone();
        self.stats
            .reconciler
            .run(Duration::ZERO, interval, shutdown, || {
                let me = me.clone();
                let first = std::mem::take(&mut first);
                async move {
                    let n = me.reconcile().await?;
                    if first && n > 0 {
                        tracing::warn!(
                            objects = n,
                            "removed containers and networks of runs that are no longer active"
                        );
                    }
                    Ok(Pass::did(n as u64))
                }
            })
            .await
    }

    /// Wakes the tending of warm sandboxes `after` this long.
    fn tend_after(&self, after: Duration) {
        let tending = self.tending.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tending.notify_one();
        });
    }

    /// Keeps the runtimes' warm sandboxes within the free run slots: a little after
    /// every launch (`python.warm.refill_after_ms`), after every end of a run, and
    /// every second; at shutdown they are ended.
    async fn run_tending(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut runtimes: Vec<Arc<dyn Runtime>> = Vec::new();
        for r in self.runtimes.values() {
            if !runtimes.iter().any(|k| Arc::ptr_eq(k, r)) {
                runtimes.push(r.clone());
            }
        }
        while !*shutdown.borrow() {
            for r in &runtimes {
                r.tend(self.slots.available_permits()).await;
            }
            self.stats
                .set_warm_ready(runtimes.iter().map(|r| r.ready()).sum());
            tokio::select! {
                _ = self.tending.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
        }
        for r in &runtimes {
            r.release_ready().await;
        }
        self.stats.set_warm_ready(0);
    }

    /// Releases what the worker holds outside runs (spare networks).
    async fn release(&self) {
        if let Some(d) = &self.docker {
            d.remove_spares().await;
        }
    }
}

/// The run name that makes a run's supervisor panic once the run is running, in builds
/// with the `fault-injection` feature (tests only).
#[cfg(feature = "fault-injection")]
pub const FAULT_SUPERVISOR_PANIC: &str = "stoa-fault-injection:supervisor-panic";

/// Supervises a started run to its end: its output into the sink, abort and stop, its
/// timeout; then the outcome. `setup_failure` tells a sandbox that could not start the
/// run (from how it exited and its first lines) from the run's own failure.
async fn supervise(
    exec: &mut dyn Execution,
    rx: &mut mpsc::Receiver<OutputLine>,
    timeout_s: i64,
    sink: &mut OutputSink,
    ctl: &mut mpsc::UnboundedReceiver<Control>,
    setup_failure: impl FnOnce(stoa_runtime::Exit, (Option<&str>, Option<&str>)) -> Option<String>,
) -> Outcome {
    let sig = exec.signaller();
    let deadline = Instant::now() + Duration::from_secs(timeout_s.max(1) as u64);
    let mut intent: Option<Control> = None;
    let mut timed_out = false;
    let mut kill_at: Option<Instant> = None;
    let exit = {
        let mut wait = pin!(exec.wait());
        loop {
            tokio::select! {
                biased;
                Some(line) = rx.recv() => {
                    let mut batch = vec![line];
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Ok(l) => batch.push(l),
                            Err(_) => break,
                        }
                    }
                    sink.write_lines(batch).await;
                }
                r = &mut wait => break r,
                Some(c) = ctl.recv() => {
                    match (c, intent) {
                        // A stop already under way is not restarted.
                        (Control::Stop(_), Some(_)) => {}
                        (Control::Stop(grace), None) => {
                            sig.terminate();
                            kill_at = Some(Instant::now() + grace);
                            intent = Some(c);
                        }
                        (_, _) => {
                            sig.kill();
                            intent = Some(c);
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline), if intent.is_none() && !timed_out => {
                    timed_out = true;
                    sig.kill();
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or(deadline)), if kill_at.is_some() => {
                    kill_at = None;
                    sig.kill();
                }
            }
        }
    };
    // Everything of the run is gone, so its output closes; a short bound guards
    // against a descendant that escaped and still holds a pipe.
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        sink.write_lines(vec![line]).await;
    }
    tracing::debug!("the run's output closed");
    sink.flush_held().await;
    sink.flush_notice().await;
    let exit = match (exit, intent) {
        (Ok(e), _) => e,
        // Told to end: how it went down does not change why.
        (Err(_), Some(c)) => return Outcome::from_control(c, None),
        (Err(_), None) if timed_out => {
            return Outcome {
                status: RunStatus::Failed,
                return_code: None,
                error: Some(format!("timeout after {timeout_s} s")),
                timed_out: true,
            };
        }
        (Err(RuntimeError::Failed { message, code }), None) => {
            sink.note(&message).await;
            return Outcome {
                status: RunStatus::Failed,
                return_code: code,
                error: Some(message),
                timed_out: false,
            };
        }
        (Err(RuntimeError::Image(msg)), None) => {
            sink.note(&msg).await;
            return Outcome::failed(msg);
        }
        // Said as it is: the engine was not reachable.
        (Err(e @ RuntimeError::EngineUnreachable(_)), None) => {
            return Outcome::system(e.to_string());
        }
        (Err(e), None) => {
            return Outcome::system(format!("supervising the run failed: {e}"));
        }
    };
    let setup_failure = setup_failure(exit, sink.first_lines());
    if let Some(c) = intent {
        Outcome::from_control(c, Some(exit.return_code()))
    } else if timed_out {
        Outcome {
            status: RunStatus::Failed,
            return_code: None,
            error: Some(format!("timeout after {timeout_s} s")),
            timed_out: true,
        }
    } else if exit.oom_killed {
        Outcome {
            status: RunStatus::Failed,
            return_code: Some(137),
            error: Some("out of memory".into()),
            timed_out: false,
        }
    } else if let Some(msg) = setup_failure {
        Outcome::system(format!("the sandbox could not start the run: {msg}"))
    } else {
        let rc = exit.return_code();
        Outcome {
            status: if rc == 0 {
                RunStatus::Completed
            } else {
                RunStatus::Failed
            },
            return_code: Some(rc),
            error: None,
            timed_out: false,
        }
    }
}

/// The runtimes by the kind of run they execute.
pub const PYTHON: &str = "python";
pub const CONTAINER_PYTHON: &str = "container-python";
pub const IMAGE: &str = "image";
pub const COMPOSE: &str = "compose";

/// What a runtime gets from the worker while it prepares a run: its output, its
/// pending reason and phase, its org's storage, and the controls sent meanwhile.
struct Preparing<'a> {
    worker: &'a Worker,
    run: &'a Assignment,
    sink: tokio::sync::Mutex<&'a mut OutputSink>,
    ctl: tokio::sync::Mutex<&'a mut mpsc::UnboundedReceiver<Control>>,
    /// The control (abort or stop) that interrupted the preparation.
    control: Mutex<Option<Control>>,
    phases: Phases,
}

/// The phases a launch reaches and the reasons it waits, stored in their order in the
/// background: the launch goes on meanwhile (a store write is as long as the work
/// between two phases), and no reason lands after a later one.
struct Phases {
    tx: mpsc::UnboundedSender<Progress>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Phases {
    fn new(plane: Arc<dyn ControlPlane>, run: &Assignment) -> Phases {
        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let (id, token) = (run.id, run.lease_token.clone());
        let task = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let reason = matches!(p, Progress::Reason(_));
                let stored = plane.progress(id, &token, p).await;
                // A reason not stored only leaves the one before it shown; a phase
                // not stored fails the launch.
                if !reason {
                    stored.map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        });
        Phases { tx, task }
    }

    /// Once every phase and reason sent is stored; the first failure of a phase, if any.
    async fn stored(self) -> Result<(), String> {
        drop(self.tx);
        self.task.await.map_err(|e| e.to_string())?
    }
}

#[async_trait::async_trait]
impl LaunchContext for Preparing<'_> {
    fn waiting(&self, reason: String) {
        // In order with the run's phases, all stored before it is recorded running.
        let _ = self.phases.tx.send(Progress::Reason(reason));
    }

    async fn note(&self, line: &str) {
        self.sink.lock().await.note(line).await;
    }

    async fn notes(&self, lines: Vec<String>) {
        self.sink.lock().await.notes(lines).await;
    }

    async fn phase(&self, name: &str) -> Result<(), LaunchError> {
        self.phases
            .tx
            .send(Progress::Phase(name.into()))
            .map_err(|_| LaunchError::Worker("storing the run's timeline failed".into()))
    }

    fn org_storage(&self) -> Result<PathBuf, LaunchError> {
        self.worker
            .org_storage(self.run)
            .map_err(|e| LaunchError::Worker(format!("making the org's storage directory: {e}")))
    }

    async fn interrupted(&self) {
        let mut ctl = self.ctl.lock().await;
        match ctl.recv().await {
            Some(c) => *self.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(c),
            // No control can come any more: never interrupted.
            None => std::future::pending().await,
        }
    }
}

/// Records a run's ports as its runtime reports them: the whole map after each batch
/// of ports opened, and an empty one (answered once stored) when they close.
async fn record_ports(
    plane: Arc<dyn ControlPlane>,
    id: RunId,
    token: String,
    mut events: mpsc::UnboundedReceiver<stoa_runtime::PortEvent>,
) {
    let mut known = std::collections::BTreeMap::new();
    while let Some(first) = events.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = events.try_recv() {
            batch.push(more);
        }
        let mut acks = vec![];
        for e in batch {
            match e {
                stoa_runtime::PortEvent::Open(port, at) => {
                    known.insert(port, at);
                }
                stoa_runtime::PortEvent::Closed(ack) => {
                    known.clear();
                    acks.push(ack);
                }
            }
        }
        if let Err(e) = plane
            .progress(id, &token, Progress::Ports(known.clone()))
            .await
        {
            tracing::warn!(run = %id, error = %e, "the run's ports could not be recorded");
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

/// A running run as the sampler sees it.
#[derive(Debug, Clone)]
struct SampleTarget {
    what: Measure,
    /// NVML indexes of the GPUs the run was given.
    gpus: Vec<u32>,
    /// The profile's memory limit, the total of the run's RAM when set.
    memory_limit: Option<u64>,
    /// The last CPU reading (seconds of CPU time, when).
    last: Option<(f64, Instant)>,
}

/// True when process group `pgid` still belongs to run `id`: one of its processes
/// carries the run's id in its environment (a recorded pgid may have been reused
/// since; the group's leader may be gone while the rest of it lives).
fn owns_process_group(pgid: i32, id: RunId) -> bool {
    let want = format!("STOA_EXECUTION_ID={id}");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let pid = p.file_name();
        let pid = pid.to_string_lossy();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let in_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // The command may hold spaces and parentheses: fields follow the last ')'.
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().nth(2)?.parse::<i32>().ok()
            })
            == Some(pgid);
        in_group
            && std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()))
    })
}

/// The supervisor with a fake runtime: stop, abort, timeout, set-up failure and the
/// runtime's own failure, in milliseconds (time is paused and moves when all wait).
#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use stoa_core::plane::{Appended, GpuSample, OutputPiece, PlaneError, RunEnd, Sample};
    use stoa_runtime::{Exit, Signaller, Stream};
    use stoa_types::OrgId;
    use tokio::sync::watch as w;

    use super::*;

    /// A control plane that keeps what it is sent.
    #[derive(Default)]
    struct Recorder {
        output: StdMutex<Vec<OutputPiece>>,
        phases: StdMutex<Vec<String>>,
        ends: StdMutex<Vec<RunEnd>>,
    }

    #[async_trait::async_trait]
    impl ControlPlane for Recorder {
        async fn claim(&self) -> Result<Option<Assignment>, PlaneError> {
            Ok(None)
        }
        async fn heartbeat(
            &self,
            leases: &[(RunId, String)],
        ) -> Result<Vec<(RunId, Directive)>, PlaneError> {
            Ok(leases
                .iter()
                .map(|(id, _)| (*id, Directive::Continue))
                .collect())
        }
        async fn append_output(
            &self,
            _run: RunId,
            _token: &str,
            first: i64,
            pieces: &[OutputPiece],
            _at_end: bool,
        ) -> Result<Appended, PlaneError> {
            let mut out = self.output.lock().unwrap();
            assert_eq!(first, out.len() as i64 + 1, "numbered without gaps");
            out.extend_from_slice(pieces);
            Ok(Appended::Stored {
                next: out.len() as i64 + 1,
            })
        }
        async fn progress(&self, _: RunId, _: &str, p: Progress) -> Result<bool, PlaneError> {
            if let Progress::Phase(p) = p {
                self.phases.lock().unwrap().push(p);
            }
            Ok(true)
        }
        async fn finish(&self, _: RunId, _: &str, end: RunEnd) -> Result<bool, PlaneError> {
            self.ends.lock().unwrap().push(end);
            Ok(true)
        }
        async fn samples(&self, _: Vec<Sample>, _: Vec<GpuSample>) -> Result<(), PlaneError> {
            Ok(())
        }
        async fn org_output_used(&self, _: &OrgId) -> Result<u64, PlaneError> {
            Ok(0)
        }
        fn lease(&self) -> Duration {
            Duration::from_secs(30)
        }
    }

    /// What became of the fake run.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Running,
        Exited(i32),
        Killed,
    }

    /// A fake run: exits with `exit` after `lasts` unless signalled; on SIGTERM it
    /// exits 0 unless it ignores it; SIGKILL ends it at once.
    struct Fake {
        state: w::Sender<State>,
        ignores_term: bool,
        lasts: Duration,
        exit: i32,
        fails: Option<String>,
        signals: Arc<StdMutex<Vec<&'static str>>>,
    }

    struct FakeSig {
        state: w::Sender<State>,
        ignores_term: bool,
        signals: Arc<StdMutex<Vec<&'static str>>>,
    }

    impl Signaller for FakeSig {
        fn terminate(&self) {
            self.signals.lock().unwrap().push("TERM");
            if !self.ignores_term {
                self.state.send_replace(State::Exited(0));
            }
        }
        fn kill(&self) {
            self.signals.lock().unwrap().push("KILL");
            self.state.send_replace(State::Killed);
        }
    }

    #[async_trait::async_trait]
    impl Execution for Fake {
        fn pgid(&self) -> Option<i64> {
            None
        }
        fn signaller(&self) -> Arc<dyn Signaller> {
            Arc::new(FakeSig {
                state: self.state.clone(),
                ignores_term: self.ignores_term,
                signals: self.signals.clone(),
            })
        }
        async fn wait(&mut self) -> Result<stoa_runtime::Exit, RuntimeError> {
            let mut rx = self.state.subscribe();
            let ended = tokio::select! {
                r = rx.wait_for(|s| *s != State::Running) => *r.unwrap(),
                _ = tokio::time::sleep(self.lasts) => State::Exited(self.exit),
            };
            if let Some(message) = self.fails.clone() {
                return Err(RuntimeError::Failed {
                    message,
                    code: Some(125),
                });
            }
            Ok(match ended {
                State::Exited(code) => Exit {
                    code: Some(code),
                    signal: None,
                    oom_killed: false,
                },
                _ => Exit {
                    code: None,
                    signal: Some(9),
                    oom_killed: false,
                },
            })
        }
        async fn kill(&mut self) -> Result<(), RuntimeError> {
            self.state.send_replace(State::Killed);
            Ok(())
        }
    }

    struct Case {
        fake: Fake,
        lines: Vec<(Stream, &'static str)>,
        timeout_s: i64,
        control: Option<(Duration, Control)>,
        setup: Option<&'static str>,
    }

    fn case(lasts_ms: u64, exit: i32) -> Case {
        Case {
            fake: Fake {
                state: w::channel(State::Running).0,
                ignores_term: false,
                lasts: Duration::from_millis(lasts_ms),
                exit,
                fails: None,
                signals: Default::default(),
            },
            lines: vec![(Stream::Stdout, "one\n"), (Stream::Stderr, "two\n")],
            timeout_s: 60,
            control: None,
            setup: None,
        }
    }

    /// Supervises the case; the outcome, the output stored and the signals sent.
    async fn run(mut c: Case) -> (Outcome, Vec<String>, Vec<&'static str>) {
        let plane = Arc::new(Recorder::default());
        let id = RunId::new();
        let mut sink = OutputSink::new(
            plane.clone(),
            id,
            "token".into(),
            Arc::new(std::sync::atomic::AtomicI64::new(1)),
            OrgId("org".into()),
            1 << 20,
        );
        let (tx, mut rx) = mpsc::channel(16);
        for (stream, text) in &c.lines {
            tx.send(OutputLine {
                stream: *stream,
                text: text.to_string(),
                service: None,
            })
            .await
            .unwrap();
        }
        drop(tx);
        let (ctl_tx, mut ctl) = mpsc::unbounded_channel();
        if let Some((after, control)) = c.control {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = ctl_tx.send(control);
                // Kept open: a closed channel is not a control.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        } else {
            std::mem::forget(ctl_tx);
        }
        let signals = c.fake.signals.clone();
        let setup = c.setup;
        let outcome = supervise(
            &mut c.fake,
            &mut rx,
            c.timeout_s,
            &mut sink,
            &mut ctl,
            |_, first| {
                setup
                    .filter(|_| first.1 == Some("two\n"))
                    .map(str::to_string)
            },
        )
        .await;
        sink.settle().await;
        let text = plane
            .output
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.content.clone())
            .collect();
        let signals = signals.lock().unwrap().clone();
        (outcome, text, signals)
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_exits_keeps_its_code_and_output() {
        let (o, text, signals) = run(case(100, 0)).await;
        assert_eq!((o.status, o.return_code), (RunStatus::Completed, Some(0)));
        assert_eq!(text, ["one\n", "two\n"]);
        assert!(signals.is_empty());
        let (o, _, _) = run(case(100, 3)).await;
        assert_eq!((o.status, o.return_code), (RunStatus::Failed, Some(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_sends_term_and_a_run_that_ignores_it_is_killed_after_the_grace() {
        let mut c = case(60_000, 0);
        c.control = Some((
            Duration::from_millis(50),
            Control::Stop(Duration::from_secs(5)),
        ));
        let (o, _, signals) = run(c).await;
        assert_eq!((o.status, o.return_code), (RunStatus::Cancelled, Some(0)));
        assert_eq!(signals, ["TERM"]);

        let mut c = case(60_000, 0);
        c.fake.ignores_term = true;
        c.control = Some((
            Duration::from_millis(50),
            Control::Stop(Duration::from_secs(5)),
        ));
        let started = Instant::now();
        let (o, _, signals) = run(c).await;
        assert_eq!(o.status, RunStatus::Cancelled);
        assert_eq!(o.return_code, Some(137));
        assert_eq!(signals, ["TERM", "KILL"]);
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "after the grace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn abort_kills_at_once_and_a_lost_run_is_killed_too() {
        let mut c = case(60_000, 0);
        c.control = Some((Duration::from_millis(50), Control::Abort));
        let (o, text, signals) = run(c).await;
        assert_eq!(o.status, RunStatus::Aborted);
        assert_eq!(o.error.as_deref(), Some("aborted by user"));
        assert_eq!(signals, ["KILL"]);
        assert_eq!(text, ["one\n", "two\n"], "output before the abort is kept");

        let mut c = case(60_000, 0);
        c.control = Some((Duration::from_millis(50), Control::Lost));
        let (o, _, signals) = run(c).await;
        assert_eq!(o.status, RunStatus::SystemFailure);
        assert_eq!(signals, ["KILL"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_kills_the_run_and_says_so() {
        let mut c = case(600_000, 0);
        c.timeout_s = 2;
        let started = Instant::now();
        let (o, _, signals) = run(c).await;
        assert_eq!(o.status, RunStatus::Failed);
        assert!(o.timed_out);
        assert_eq!(o.error.as_deref(), Some("timeout after 2 s"));
        assert_eq!(signals, ["KILL"]);
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sandbox_that_could_not_start_the_run_is_the_platforms_failure() {
        let mut c = case(10, 1);
        c.setup = Some("bwrap: No permissions to create new namespace");
        let (o, _, _) = run(c).await;
        assert_eq!(o.status, RunStatus::SystemFailure);
        assert_eq!(
            o.error.as_deref(),
            Some(
                "the sandbox could not start the run: bwrap: No permissions to create new namespace"
            )
        );
        // The runtime's own failure fails the run with its words in the output.
        let mut c = case(10, 0);
        c.fake.fails = Some("the image's entrypoint does not exist".into());
        let (o, text, _) = run(c).await;
        assert_eq!((o.status, o.return_code), (RunStatus::Failed, Some(125)));
        assert!(
            text.last()
                .unwrap()
                .contains("the image's entrypoint does not exist"),
            "{text:?}"
        );
    }

    /// A run type of its own: its preparation says something and reports its phase,
    /// or waits until a control interrupts it; its run is a [`Fake`] printing a line.
    struct FakeRuntime {
        /// The preparation waits for a control instead of finishing.
        hangs: bool,
    }

    #[async_trait::async_trait]
    impl Runtime for FakeRuntime {
        async fn launch(
            &self,
            run: &LaunchRequest<'_>,
            ctx: &dyn LaunchContext,
        ) -> Result<Launched, LaunchError> {
            ctx.note(&format!("preparing {} on {}", run.run_id, run.profile))
                .await;
            if self.hangs {
                ctx.interrupted().await;
                return Err(LaunchError::Interrupted);
            }
            ctx.environment_ready().await?;
            let (tx, rx) = mpsc::channel(8);
            tx.send(OutputLine {
                stream: Stream::Stdout,
                text: "hello from the fake run\n".into(),
                service: None,
            })
            .await
            .unwrap();
            let (state, _) = w::channel(State::Running);
            Ok(Launched {
                exec: Box::new(Fake {
                    state,
                    ignores_term: false,
                    lasts: Duration::from_millis(50),
                    exit: 3,
                    fails: None,
                    signals: Default::default(),
                }),
                output: rx,
                timeout_s: 60,
                measure: None,
                cpu_before_s: 0.0,
                ports: None,
            })
        }
    }

    /// A worker whose only runtime is a fake one, standing for compose runs.
    fn worker_with(runtime: FakeRuntime, plane: Arc<Recorder>, dir: &std::path::Path) -> Worker {
        let config = Config {
            data_dir: dir.to_path_buf(),
            ..Default::default()
        };
        Worker::new(
            plane,
            Arc::new(config),
            Runtimes {
                runs: HashMap::from([(COMPOSE, Arc::new(runtime) as Arc<dyn Runtime>)]),
                docker: None,
                gpus: Arc::new(stoa_runtime::gpu::Gpus::load()),
            },
            Default::default(),
        )
    }

    fn assignment(job_type: RunKind) -> Assignment {
        Assignment {
            id: RunId::new(),
            org_id: OrgId("org".into()),
            job_type,
            execution_type: "cpu".into(),
            spec: "{}".into(),
            run_name: None,
            gpu_ids: vec![],
            lease_token: "t".into(),
            secrets: vec![],
            registry: None,
            org_output: None,
        }
    }

    fn texts(plane: &Recorder) -> Vec<String> {
        plane
            .output
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.content.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_runtime_is_all_a_run_type_needs_and_a_missing_one_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let plane = Arc::new(Recorder::default());
        let worker = Arc::new(worker_with(
            FakeRuntime { hangs: false },
            plane.clone(),
            dir.path(),
        ));
        let run = assignment(RunKind::Compose);
        let (_tx, rx) = mpsc::unbounded_channel();
        worker.clone().execute(run.clone(), rx).await;
        let out = texts(&plane);
        assert!(
            out[0].contains(&format!("preparing {} on cpu", run.id)),
            "{out:?}"
        );
        assert_eq!(out[1], "hello from the fake run\n");
        assert_eq!(*plane.phases.lock().unwrap(), vec!["environment_ready"]);
        let end = plane.ends.lock().unwrap()[0].clone();
        assert_eq!((end.status, end.return_code), (RunStatus::Failed, Some(3)));

        // A type no runtime executes ends as the platform's failure, saying so.
        let (_tx, rx) = mpsc::unbounded_channel();
        worker.clone().execute(assignment(RunKind::Image), rx).await;
        let end = plane.ends.lock().unwrap()[1].clone();
        assert_eq!(end.status, RunStatus::SystemFailure);
        assert_eq!(
            end.error.as_deref(),
            Some("no worker can execute image runs here")
        );
    }

    #[tokio::test]
    async fn an_abort_during_preparation_ends_the_run_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let plane = Arc::new(Recorder::default());
        let worker = Arc::new(worker_with(
            FakeRuntime { hangs: true },
            plane.clone(),
            dir.path(),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let run = assignment(RunKind::Compose);
        let running = tokio::spawn(worker.clone().execute(run, rx));
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(Control::Abort).unwrap();
        running.await.unwrap();
        let end = plane.ends.lock().unwrap()[0].clone();
        assert_eq!(end.status, RunStatus::Aborted);
        assert!(
            plane.phases.lock().unwrap().is_empty(),
            "it never got ready"
        );
    }
}
