//! The worker: claims runs from the control plane, executes them with the runtimes
//! (sandboxed Python, Python in a profile's image, image and compose runs), and sends
//! their output, progress, samples and ends back. It talks to the control plane only
//! through [`ControlPlane`]: in-process for the embedded worker.
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

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoa_core::plane::{Assignment, ControlPlane, Directive, Progress, RunEnd};
use stoa_core::{ComposeRunSpec, ImageRunSpec, PythonRunSpec};
use stoa_runtime::compose::ComposeJob;
use stoa_runtime::docker::{DockerRuntime, ImageJob, RegistryAuth, Resources};
use stoa_runtime::python_container::ContainerPython;
use stoa_runtime::{Execution, OutputLine, PythonJob, PythonRuntime, RuntimeError};
use stoa_types::{RunId, RunStatus};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use sink::OutputSink;
use stoa_config::Config;
use stoa_core::loops::{Pass, WorkerStats};

pub use setup::runtimes;

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
        }
    }
}

/// The worker: runs claimed from the control plane, executed with these runtimes.
pub struct Worker {
    plane: Arc<dyn ControlPlane>,
    config: Arc<Config>,
    python: Option<Arc<PythonRuntime>>,
    docker: Option<Arc<DockerRuntime>>,
    container_python: Option<Arc<ContainerPython>>,
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
}

/// What executes runs on this worker.
pub struct Runtimes {
    pub python: Arc<PythonRuntime>,
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
        let Runtimes {
            python,
            docker,
            gpus,
        } = runtimes;
        let container_python = docker.as_ref().map(|d| {
            Arc::new(ContainerPython::new(
                d.clone(),
                config.data_dir.join("envs-image"),
                python.config().pass_env.clone(),
                std::time::Duration::from_secs(config.python.build_timeout_s.max(1)),
            ))
        });
        let capacity = config.concurrency();
        Worker {
            plane,
            config,
            python: Some(python),
            docker,
            container_python,
            gpus,
            held: Mutex::new(HashMap::new()),
            sampling: Mutex::new(HashMap::new()),
            stats,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            spool_max: None,
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
                    let (tx, rx) = mpsc::unbounded_channel();
                    let token = run.lease_token.clone();
                    let next_seq = Arc::new(std::sync::atomic::AtomicI64::new(1));
                    self.held().insert(
                        run.id,
                        Held {
                            tx,
                            token,
                            next_seq,
                        },
                    );
                    let me = self.clone();
                    tokio::spawn(async move {
                        use futures::FutureExt;
                        let claimed = run.clone();
                        let supervised = std::panic::AssertUnwindSafe(me.clone().execute(run, rx));
                        if let Err(panic) = supervised.catch_unwind().await {
                            me.supervisor_panicked(claimed, panic).await;
                        }
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
        let outcome = match self.drive(&run, &workdir, &mut sink, &mut ctl).await {
            Ok(o) => o,
            Err(e) => Some(Outcome::system(format!("internal error: {e}"))),
        };
        // Whatever way the run went, no held-back output is lost.
        sink.flush_held().await;
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
            what: Measured::Group(pgid),
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
        Ok(self.plane.progress(run.id, &run.lease_token, p).await?)
    }

    /// Sets the pending reason of a run from a synchronous progress callback.
    fn reason_setter(&self, run: &Assignment) -> impl Fn(String) + Send + Sync + 'static {
        let plane = self.plane.clone();
        let (id, token) = (run.id, run.lease_token.clone());
        move |reason: String| {
            let plane = plane.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let _ = plane.progress(id, &token, Progress::Reason(reason)).await;
            });
        }
    }

    /// The registry credentials given with a run; a run submitted with some that the
    /// control plane lost in a restart cannot pull.
    fn registry_auth(
        &self,
        run: &Assignment,
        username: Option<&str>,
    ) -> Result<Option<RegistryAuth>, Outcome> {
        let creds = run.registry.clone();
        if username.is_some() && creds.is_none() {
            return Err(Outcome::system(
                "registry credentials are kept in memory only and were lost when the server restarted; start the run again",
            ));
        }
        Ok(creds.map(|c| RegistryAuth {
            username: c.username,
            password: c.password,
        }))
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
            let ts = stoa_core::plane::now();
            out.extend(readings.into_iter().map(|r| stoa_core::plane::GpuSample {
                run_id: Some(id),
                ts: ts.clone(),
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

    /// Prepares, launches and supervises a run. `Ok(None)` when the run already ended
    /// elsewhere (aborted between claim and start).
    async fn drive(
        &self,
        run: &Assignment,
        workdir: &std::path::Path,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
    ) -> anyhow::Result<Option<Outcome>> {
        let id = run.id;
        let launched = match run.job_type.as_str() {
            "python" => self.launch_python(run, workdir, sink, ctl).await?,
            "image" => self.launch_image(run, sink, ctl).await?,
            "compose" => self.launch_compose(run, sink, ctl).await?,
            other => Err(Outcome::system(format!(
                "no runtime for runs of type {other:?}"
            ))),
        };
        let Launched {
            mut exec,
            mut rx,
            timeout_s,
            target,
        } = match launched {
            Ok(l) => l,
            Err(outcome) => return Ok(Some(outcome)),
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
        #[cfg(feature = "fault-injection")]
        if run.run_name.as_deref() == Some(FAULT_SUPERVISOR_PANIC) {
            panic!("fault injection: the supervisor of run {id} panics");
        }
        let target = match (target, exec.pgid()) {
            (Some(t), _) => t,
            (None, Some(pgid)) => Measured::Group(pgid as i32),
            (None, None) => Measured::Containers(vec![format!("stoa-{id}")]),
        };
        self.sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                // CPU time of a new process group or container starts at zero now.
                SampleTarget {
                    what: target,
                    gpus: run.gpu_ids.iter().filter_map(|g| g.parse().ok()).collect(),
                    memory_limit: self.resources_for(run).memory_mb.map(|m| m * 1024 * 1024),
                    last: Some((0.0, Instant::now())),
                },
            );

        let python = self.python.clone().filter(|_| run.job_type == "python");
        let outcome = supervise(
            exec.as_mut(),
            &mut rx,
            timeout_s,
            sink,
            ctl,
            |exit, first| python.as_ref().and_then(|p| p.setup_failure(exit, first)),
        )
        .await;
        self.sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        Ok(Some(outcome))
    }

    /// Builds (or reuses) the Python environment and starts the run.
    async fn launch_python(
        &self,
        run: &Assignment,
        workdir: &std::path::Path,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
    ) -> anyhow::Result<Result<Launched, Outcome>> {
        let secrets = &run.secrets[..];
        let Some(python) = self.python.clone() else {
            return Ok(Err(Outcome::system(
                "no worker can execute Python runs here",
            )));
        };
        let spec: PythonRunSpec = match read_spec(run) {
            Ok(s) => s,
            Err(o) => return Ok(Err(o)),
        };
        std::fs::create_dir_all(workdir)?;
        let reqs = python.clean_requirements(
            spec.requirements.as_deref().unwrap_or(""),
            &spec.local_module_names(),
        );
        let image = self
            .profile(&spec.run.execution_type)
            .and_then(|p| p.python_image.clone());
        if let Some(image) = image {
            return self
                .launch_python_in_image(run, spec, reqs, image, workdir, sink, ctl)
                .await;
        }
        if !python.env_cached(&reqs) {
            self.reason_setter(run)("building Python environment".into());
        }
        let warnings = Mutex::new(Vec::<String>::new());
        let warn = |w: String| warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
        let env = match settle_env(sink, ctl, &warnings, python.prepare_env(&reqs, &warn)).await {
            Ok(env) => env,
            Err(outcome) => return Ok(Err(outcome)),
        };
        self.progress(run, Progress::Phase("environment_ready".into()))
            .await?;
        let timeout_s = spec.run.timeout;
        let storage = self.org_storage(run)?;
        let mut job = python_job(run, spec, workdir, reqs, secrets, Some(storage));
        self.sandbox_limits(run, &mut job);
        let (tx, rx) = mpsc::channel::<OutputLine>(1024);
        match python.launch(&job, &env, tx) {
            Ok(e) => Ok(Ok(Launched {
                exec: Box::new(e),
                rx,
                timeout_s,
                target: None,
            })),
            Err(e) => Ok(Err(Outcome::system(format!(
                "could not start the run: {e}"
            )))),
        }
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

    /// A sandboxed Python run's limits and network, from its profile, and its GPUs'
    /// device files.
    fn sandbox_limits(&self, run: &Assignment, job: &mut PythonJob) {
        // The limits containers get, and the disk a sandbox also limits.
        let r = self.resources_for(run);
        let disk_mb = self.profile(&run.execution_type).and_then(|p| p.disk_mb);
        job.limits = stoa_runtime::Limits {
            memory_bytes: r.memory_mb.map(|m| m * 1024 * 1024),
            pids: r.pids_limit.map(|n| n.max(1) as u64),
            cpus: r.cpus,
            disk_bytes: disk_mb.map(|m| m * 1024 * 1024),
        };
        job.network = r.network.unwrap_or(self.config.python.network);
        if !run.gpu_ids.is_empty() {
            // CUDA_VISIBLE_DEVICES picks the run's GPUs among the device files.
            job.devices = std::fs::read_dir("/dev")
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with("nvidia"))
                        })
                        .collect()
                })
                .unwrap_or_default();
        }
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

    /// A Python run of a profile with `python_image`: environment built in the image,
    /// run in a container.
    #[allow(clippy::too_many_arguments)]
    async fn launch_python_in_image(
        &self,
        run: &Assignment,
        spec: PythonRunSpec,
        reqs: Vec<stoa_core::requirements::Requirement>,
        image: String,
        workdir: &std::path::Path,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
    ) -> anyhow::Result<Result<Launched, Outcome>> {
        let secrets = &run.secrets[..];
        let id = run.id;
        let (Some(docker), Some(cp)) = (self.docker.clone(), self.container_python.clone()) else {
            return Ok(Err(Outcome::system(
                "no worker can execute containerised Python runs here",
            )));
        };
        let progress = self.reason_setter(run);
        let pulled = tokio::select! {
            r = docker.pull(&image, None, &progress) => r,
            Some(c) = ctl.recv() => return Ok(Err(Outcome::from_control(c, None))),
        };
        if let Err(e) = pulled {
            return Ok(Err(match e {
                RuntimeError::Image(msg) => Outcome::system(format!(
                    "the profile's Python image is not available: {msg}"
                )),
                e => Outcome::system(e.to_string()),
            }));
        }
        if !cp.env_cached(&image, &reqs) {
            progress("building Python environment".into());
        }
        let warnings = Mutex::new(Vec::<String>::new());
        let warn = |w: String| warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
        let run_id = id.to_string();
        let build = cp.prepare_env(&run_id, &image, &reqs, &warn);
        let env_dir = match settle_env(sink, ctl, &warnings, build).await {
            Ok(d) => d,
            Err(outcome) => return Ok(Err(outcome)),
        };
        self.progress(run, Progress::Phase("environment_ready".into()))
            .await?;
        let timeout_s = spec.run.timeout;
        let storage = self.org_storage(run)?;
        let job = python_job(run, spec, workdir, reqs, secrets, Some(storage));
        if let Err(e) = stoa_runtime::python::write_files(&job) {
            return Ok(Err(Outcome::system(e.to_string())));
        }
        let container = cp.run_job(&job, &image, &env_dir, self.resources_for(run));
        let (tx, rx) = mpsc::channel::<OutputLine>(1024);
        match docker.launch(&container, tx).await {
            Ok(e) => Ok(Ok(Launched {
                exec: Box::new(e),
                rx,
                timeout_s,
                target: None,
            })),
            Err(e) => Ok(Err(Outcome::system(e.to_string()))),
        }
    }

    /// Pulls the image when needed and starts the container.
    async fn launch_image(
        &self,
        run: &Assignment,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
    ) -> anyhow::Result<Result<Launched, Outcome>> {
        let secrets = &run.secrets[..];
        let id = run.id;
        let Some(docker) = self.docker.clone() else {
            return Ok(Err(Outcome::system(
                "no worker can execute image runs here",
            )));
        };
        let spec: ImageRunSpec = match read_spec(run) {
            Ok(s) => s,
            Err(o) => return Ok(Err(o)),
        };
        sink.notes(spec.env_warnings.clone()).await;
        let auth = match self.registry_auth(run, spec.registry_username.as_deref()) {
            Ok(a) => a,
            Err(o) => return Ok(Err(o)),
        };
        if let Err(o) = self
            .pull_image(&docker, run, &spec.image, auth.as_ref(), sink, ctl)
            .await
        {
            return Ok(Err(o));
        }
        self.progress(run, Progress::Phase("environment_ready".into()))
            .await?;
        let resources = self.resources_for(run);
        let mut binds = Vec::new();
        if spec.enable_s3_mount {
            let dir = self.org_storage(run)?;
            binds.push(format!("{}:{}", dir.display(), spec.s3_mount_path));
        }
        // Secrets first; docker_run_env entries of the same name win.
        let mut env: Vec<(String, String)> = secrets
            .iter()
            .filter(|(k, _)| !spec.env.iter().any(|(e, _)| e == k))
            .cloned()
            .collect();
        env.extend(spec.env.iter().cloned());
        env.extend(run_identity(run));
        let job = ImageJob {
            run_id: id.to_string(),
            image: spec.image.clone(),
            cmd: spec.cmd.clone(),
            env,
            auth,
            resources,
            binds,
            workdir: None,
        };
        let (tx, rx) = mpsc::channel::<OutputLine>(1024);
        match docker.launch(&job, tx).await {
            Ok(e) => Ok(Ok(Launched {
                exec: Box::new(e),
                rx,
                timeout_s: spec.run.timeout,
                target: None,
            })),
            Err(RuntimeError::Image(msg)) => Ok(Err(Outcome::failed(msg))),
            Err(e) => Ok(Err(Outcome::system(e.to_string()))),
        }
    }

    /// Pulls an image when needed (progress in the pending reason); a control
    /// interrupts it. A missing image or refused access fails the run.
    async fn pull_image(
        &self,
        docker: &DockerRuntime,
        run: &Assignment,
        image: &str,
        auth: Option<&RegistryAuth>,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<(), Outcome> {
        let progress = self.reason_setter(run);
        let pulled = tokio::select! {
            r = docker.pull(image, auth, &progress) => r,
            Some(c) = ctl.recv() => return Err(Outcome::from_control(c, None)),
        };
        match pulled {
            Ok(()) => Ok(()),
            Err(RuntimeError::Image(msg)) => {
                sink.note(&msg).await;
                Err(Outcome::failed(msg))
            }
            Err(e) => Err(Outcome::system(e.to_string())),
        }
    }

    /// Plans the stack again with the run's variables, pulls its images and starts it.
    async fn launch_compose(
        &self,
        run: &Assignment,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
    ) -> anyhow::Result<Result<Launched, Outcome>> {
        let secrets = &run.secrets[..];
        let id = run.id;
        let Some(docker) = self.docker.clone() else {
            return Ok(Err(Outcome::system(
                "no worker can execute compose runs here",
            )));
        };
        let spec: ComposeRunSpec = match read_spec(run) {
            Ok(s) => s,
            Err(o) => return Ok(Err(o)),
        };
        let gpus = run.gpu_ids.len() as u32;
        let lookup = stoa_core::compose::lookup_in(secrets);
        let plan = match stoa_core::compose::plan(&spec.compose_file_code, &lookup, gpus) {
            Ok(p) => p,
            Err(errs) => {
                // The org's variables changed since the run was accepted.
                let msg = errs
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.msg))
                    .collect::<Vec<_>>()
                    .join("; ");
                let msg = format!("the compose file no longer checks out: {msg}");
                sink.note(&msg).await;
                return Ok(Err(Outcome::failed(msg)));
            }
        };
        sink.notes(plan.warnings.clone()).await;
        let auth = match self.registry_auth(run, spec.registry_username.as_deref()) {
            Ok(a) => a,
            Err(o) => return Ok(Err(o)),
        };
        let images: std::collections::BTreeSet<&str> =
            plan.services.iter().map(|s| s.image.as_str()).collect();
        // One set of credentials per stack: it is for the images of a named registry
        // when there are any (others are pulled without it), else for all.
        let hub = stoa_runtime::docker::registry_of("library/x");
        let private = images
            .iter()
            .any(|i| stoa_runtime::docker::registry_of(i) != hub);
        for image in images {
            let needs = !private || stoa_runtime::docker::registry_of(image) != hub;
            let auth = auth.as_ref().filter(|_| needs);
            if let Err(o) = self.pull_image(&docker, run, image, auth, sink, ctl).await {
                return Ok(Err(o));
            }
        }
        self.progress(run, Progress::Phase("environment_ready".into()))
            .await?;
        let mut env = secrets.to_vec();
        env.extend(run_identity(run));
        let run_id = id.to_string();
        let names = plan
            .services
            .iter()
            .map(|s| ComposeJob::container_name(&run_id, &s.name))
            .collect();
        let exit_code_from = plan.exit_code_from.clone();
        let storage = if spec.enable_s3_mount {
            let dir = self.org_storage(run)?;
            Some((dir.display().to_string(), spec.s3_mount_path.clone()))
        } else {
            None
        };
        let job = ComposeJob {
            run_id,
            plan,
            env,
            resources: self.resources_for(run),
            storage,
        };
        let (tx, rx) = mpsc::channel::<OutputLine>(1024);
        match docker.launch_compose(job, tx).await {
            Ok(e) => Ok(Ok(Launched {
                exec: Box::new(e.exit_code_from(exit_code_from)),
                rx,
                timeout_s: spec.run.timeout,
                target: Some(Measured::Containers(names)),
            })),
            Err(e) => Ok(Err(Outcome::system(e.to_string()))),
        }
    }

    /// Removes containers and networks of this installation that no active run owns.
    pub async fn reconcile(&self) -> Result<usize, String> {
        let Some(docker) = &self.docker else {
            return Ok(0);
        };
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
            .any(|(_, t)| matches!(t.what, Measured::Group(_)));
        let snap = if needs_proc {
            tokio::task::spawn_blocking(stoa_runtime::metrics::proc_snapshot)
                .await
                .unwrap_or_default()
        } else {
            Default::default()
        };
        let host_mem = stoa_runtime::metrics::mem_total();
        let now = Instant::now();
        let ts = stoa_core::plane::now();
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
                ts: ts.clone(),
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
            Measured::Group(pgid) => snap.groups.get(pgid).map(|(ticks, rss)| {
                (
                    *ticks as f64 / stoa_runtime::metrics::CLOCK_TICKS,
                    *rss,
                    t.memory_limit.unwrap_or(host_mem),
                )
            }),
            Measured::Containers(names) => {
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

/// A Python run's extra environment: the org's secrets, the GPUs it was given
/// (`CUDA_VISIBLE_DEVICES`, empty for runs without GPUs so they see none) and its
/// hardware profile (`STOA_HARDWARE_PROFILE`).
fn run_env_with_gpus(secrets: &[(String, String)], run: &Assignment) -> Vec<(String, String)> {
    let mut env = secrets.to_vec();
    env.push(("CUDA_VISIBLE_DEVICES".into(), run.gpu_ids.join(",")));
    env.push(("STOA_HARDWARE_PROFILE".into(), run.execution_type.clone()));
    env
}

/// What a container learns about its run: `STOA_EXECUTION_ID` and
/// `STOA_HARDWARE_PROFILE`.
fn run_identity(run: &Assignment) -> [(String, String); 2] {
    [
        ("STOA_EXECUTION_ID".into(), run.id.to_string()),
        ("STOA_HARDWARE_PROFILE".into(), run.execution_type.clone()),
    ]
}

/// The run's stored spec; a spec that does not read back is the platform's failure.
fn read_spec<T: serde::de::DeserializeOwned>(run: &Assignment) -> Result<T, Outcome> {
    serde_json::from_str(&run.spec)
        .map_err(|e| Outcome::system(format!("the stored run spec is unreadable: {e}")))
}

/// Waits for an environment build (a control, abort or stop, interrupts it), writes
/// its warnings to the run's output, and turns a failure into the run's outcome.
async fn settle_env<T>(
    sink: &mut OutputSink,
    ctl: &mut mpsc::UnboundedReceiver<Control>,
    warnings: &Mutex<Vec<String>>,
    build: impl std::future::Future<Output = Result<T, RuntimeError>>,
) -> Result<T, Outcome> {
    let r = tokio::select! {
        r = build => r,
        Some(c) = ctl.recv() => return Err(Outcome::from_control(c, None)),
    };
    let w = std::mem::take(&mut *warnings.lock().unwrap_or_else(|p| p.into_inner()));
    sink.notes(w).await;
    match r {
        Ok(v) => Ok(v),
        Err(e) => Err(env_failure(sink, e).await),
    }
}

/// Where Python runs see their org's storage (`STOA_STORAGE` names it too).
const STORAGE_MOUNT: &str = "/mnt/s3";

/// The job of a Python run, wherever it executes.
fn python_job(
    run: &Assignment,
    spec: PythonRunSpec,
    workdir: &std::path::Path,
    reqs: Vec<stoa_core::requirements::Requirement>,
    secrets: &[(String, String)],
    storage: Option<std::path::PathBuf>,
) -> PythonJob {
    PythonJob {
        storage: storage.map(|dir| (dir, std::path::PathBuf::from(STORAGE_MOUNT))),
        run_id: run.id.to_string(),
        workdir: workdir.to_path_buf(),
        code: spec.code,
        file_name: spec.file_name,
        import_files: spec.import_files,
        prior_imports: spec.prior_imports,
        requirements: reqs,
        env: run_env_with_gpus(secrets, run),
        limits: Default::default(),
        network: false,
        devices: vec![],
    }
}

/// The outcome of a run whose environment could not be prepared: requirements that
/// do not install fail the run (with the installer's words in its output); anything
/// else is the platform's failure.
async fn env_failure(sink: &mut OutputSink, e: RuntimeError) -> Outcome {
    match e {
        RuntimeError::Requirements(msg) => {
            sink.note(&msg).await;
            Outcome::failed(format!(
                "requirements could not be installed: {}",
                msg.lines().next().unwrap_or("")
            ))
        }
        e => Outcome::system(format!("could not prepare the Python environment: {e}")),
    }
}

/// What the sampler measures for a run.
#[derive(Debug, Clone)]
enum Measured {
    /// A process group (sandboxed Python runs), from procfs.
    Group(i32),
    /// Containers (one, or a compose stack's), from the engine's stats, summed.
    Containers(Vec<String>),
}

/// A running run as the sampler sees it.
#[derive(Debug, Clone)]
struct SampleTarget {
    what: Measured,
    /// NVML indexes of the GPUs the run was given.
    gpus: Vec<u32>,
    /// The profile's memory limit, the total of the run's RAM when set.
    memory_limit: Option<u64>,
    /// The last CPU reading (seconds of CPU time, when).
    last: Option<(f64, Instant)>,
}

/// A started run, ready to be supervised.
struct Launched {
    exec: Box<dyn Execution>,
    rx: mpsc::Receiver<OutputLine>,
    timeout_s: i64,
    /// What the sampler measures, when not the run's process group or its one
    /// container `stoa-<id>`.
    target: Option<Measured>,
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
        async fn progress(&self, _: RunId, _: &str, _: Progress) -> Result<bool, PlaneError> {
            Ok(true)
        }
        async fn finish(&self, _: RunId, _: &str, _: RunEnd) -> Result<bool, PlaneError> {
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
}
