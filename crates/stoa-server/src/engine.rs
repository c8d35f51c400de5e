//! The engine: the embedded worker that claims and executes runs, and the controls
//! that abort or stop them.
//!
//! Invariants:
//! - A run's output is stored before its terminal state is written, so a reader that
//!   sees a terminal state and then reads the output has all of it.
//! - A claim and the registration of the run's control channel happen under one lock,
//!   which `abort`/`stop` also take: a control never misses a run that was just claimed.
//! - When a run ends, every process of it is gone (confirmed), and its working
//!   directory is removed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoa_core::scheduler::Scheduler;
use stoa_core::{ComposeRunSpec, ImageRunSpec, PythonRunSpec, RegistryCredentials};
use stoa_runtime::compose::ComposeJob;
use stoa_runtime::docker::{DockerRuntime, ImageJob, RegistryAuth, Resources};
use stoa_runtime::python_container::ContainerPython;
use stoa_runtime::{Execution, OutputLine, PythonJob, PythonRuntime, RuntimeError, Stream};
use stoa_store::{OutputPiece, OutputStream, Run, Store, TransitionData};
use stoa_types::{RunId, RunStatus};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::config::Config;
use crate::disk::DiskGuard;
use crate::hub::Hub;
use crate::masking::Masker;

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

impl From<stoa_store::RunControl> for Control {
    fn from(c: stoa_store::RunControl) -> Self {
        match c {
            stoa_store::RunControl::Abort => Control::Abort,
            stoa_store::RunControl::Stop { grace_ms } => {
                Control::Stop(Duration::from_millis(grace_ms))
            }
        }
    }
}

/// A run this worker holds: its control channel and lease token.
struct Held {
    tx: mpsc::UnboundedSender<Control>,
    token: String,
}

/// The error of the embedded worker's runs that were active when the server stopped
/// without ending them (a crash).
const RESTART_ERROR: &str = "the server restarted while the run was active";

/// The error of runs the server's shutdown ended.
const SHUTDOWN_ERROR: &str = "the server shut down while the run was active";

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

/// The embedded worker and run controls.
pub struct Engine {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    config: Arc<Config>,
    python: Option<Arc<PythonRuntime>>,
    docker: Option<Arc<DockerRuntime>>,
    container_python: Option<Arc<ContainerPython>>,
    keyring: Arc<crate::secrets::Keyring>,
    deliverer: Arc<crate::callbacks::Deliverer>,
    /// NVML (no GPUs without the driver).
    gpus: Arc<stoa_runtime::gpu::Gpus>,
    /// Registry credentials of queued runs, in memory only (never stored).
    credentials: Mutex<HashMap<RunId, RegistryCredentials>>,
    worker_id: String,
    wake: Notify,
    /// Runs this worker holds.
    controls: Mutex<HashMap<RunId, Held>>,
    /// Held while claiming a run and registering its control; see the module doc.
    claim_lock: tokio::sync::Mutex<()>,
    /// The queue and what runs, for placement decisions.
    sched: Mutex<Scheduler>,
    /// Order of queued runs (continues the store's order after a restart).
    next_seq: std::sync::atomic::AtomicU64,
    /// What the sampler measures: running runs and their last CPU reading.
    sampling: Mutex<HashMap<RunId, SampleTarget>>,
    /// Platform metrics (run durations, sampler lag).
    pub stats: crate::prom::EngineStats,
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Free space under the data directory.
    disk: Arc<DiskGuard>,
    /// The server is shutting down: the worker takes no new run.
    stopping: std::sync::atomic::AtomicBool,
}

/// What executes runs on this worker.
pub struct Runtimes {
    /// `None` when the embedded worker is off.
    pub python: Option<Arc<PythonRuntime>>,
    /// `None` when the embedded worker is off.
    pub docker: Option<Arc<DockerRuntime>>,
    pub gpus: Arc<stoa_runtime::gpu::Gpus>,
}

impl Engine {
    /// An engine over these runtimes.
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        config: Arc<Config>,
        runtimes: Runtimes,
        keyring: Arc<crate::secrets::Keyring>,
        deliverer: Arc<crate::callbacks::Deliverer>,
    ) -> Self {
        let Runtimes {
            python,
            docker,
            gpus,
        } = runtimes;
        let container_python = docker.as_ref().map(|d| {
            let pass_env = python
                .as_ref()
                .map(|p| p.config().pass_env.clone())
                .unwrap_or_default();
            Arc::new(ContainerPython::new(
                d.clone(),
                config.data_dir.join("envs-image"),
                pass_env,
                std::time::Duration::from_secs(config.python.build_timeout_s.max(1)),
            ))
        });
        let capacity = config.concurrency();
        let disk = Arc::new(DiskGuard::new(
            &config.data_dir,
            config.limits.min_free_bytes,
            config.limits.disk_reserve_bytes,
        ));
        let sched = Scheduler::new(
            config.capacities(),
            config.worker.gpu_ids.clone(),
            config.limits.org_max_running,
        )
        .with_priority_share(config.limits.priority_share);
        Engine {
            store,
            hub,
            config,
            python,
            docker,
            container_python,
            keyring,
            deliverer,
            gpus,
            credentials: Mutex::new(HashMap::new()),
            worker_id: "embedded".into(),
            wake: Notify::new(),
            controls: Mutex::new(HashMap::new()),
            claim_lock: tokio::sync::Mutex::new(()),
            sched: Mutex::new(sched),
            next_seq: std::sync::atomic::AtomicU64::new(1),
            sampling: Mutex::new(HashMap::new()),
            stats: Default::default(),
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            disk,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The watch over free space under the data directory.
    pub fn disk(&self) -> &Arc<DiskGuard> {
        &self.disk
    }

    /// Whether the server is shutting down (new runs are refused: they would wait
    /// until the next start).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a worker executes runs on this server.
    pub fn worker_enabled(&self) -> bool {
        self.python.is_some()
    }

    /// The pending reason of a newly queued run.
    pub fn queued_reason(&self) -> &'static str {
        if self.worker_enabled() {
            "queued: waiting for a free run slot"
        } else {
            "no worker is enabled on this server (started with --no-worker)"
        }
    }

    /// Tells the worker a run was queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn runs_dir(&self) -> PathBuf {
        self.config.data_dir.join("runs")
    }

    /// Ends the embedded worker's runs that were active when the server last stopped:
    /// there is no way to re-attach to their output pipes, so each is killed (if
    /// anything of it is left) and reaped, `system_failure` with the reason; its stored
    /// output is kept. Runs of other workers are the lease reaper's.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        for run in self.store.active_runs().await? {
            if run.worker_id.as_deref() == Some(&self.worker_id)
                && let Some(pgid) = run.pgid
                && owns_process_group(pgid as i32, run.id)
            {
                stoa_runtime::kill_group(pgid as i32);
            }
        }
        let reaped = self
            .store
            .reap(stoa_store::Reap::Worker {
                worker: &self.worker_id,
                reason: RESTART_ERROR,
            })
            .await?;
        self.after_reap(&reaped).await;
        // A selection is not executed; it ends with its children.
        for run in self.store.active_runs().await? {
            if run.job_type == "gpu_selection" {
                self.settle_parent(run.id).await;
            }
        }
        // Nothing of this worker is active now: working directories left behind
        // belong to no run.
        let dir = self.runs_dir();
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(reaped.len())
    }

    /// Tells readers, callbacks and selection parents about runs the reaper ended, and
    /// the supervisors of those this worker still holds that they are lost.
    async fn after_reap(&self, reaped: &[Run]) {
        if reaped.is_empty() {
            return;
        }
        self.deliverer.wake();
        for run in reaped {
            tracing::warn!(run = %run.id, error = run.error.as_deref().unwrap_or_default(), "run reaped");
            if let Some(h) = self
                .controls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&run.id)
            {
                let _ = h.tx.send(Control::Lost);
            }
            self.hub.notify(run.id);
            if let Some(parent) = run.parent_id {
                self.settle_parent(parent).await;
            }
        }
        self.hub.notify_all();
    }

    /// How long a lease lasts without a heartbeat (`worker.lease_s`).
    fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.config.worker.lease_s.max(1))
    }

    /// Renews the leases of the runs this worker holds and carries out what the
    /// answers say (an abort or stop asked for elsewhere, or a run lost).
    async fn heartbeat(&self) {
        let held: Vec<(RunId, String)> = self
            .controls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, h)| (*id, h.token.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        let answers = match self
            .store
            .heartbeat(&self.worker_id, &held, self.lease_ttl())
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "renewing the worker's leases failed");
                self.disk.write_failed(&e);
                return;
            }
        };
        let controls = self.controls.lock().unwrap_or_else(|p| p.into_inner());
        for (id, d) in answers {
            let c = match d {
                stoa_store::Directive::Continue => continue,
                stoa_store::Directive::Control(c) => c.into(),
                stoa_store::Directive::Lost => Control::Lost,
            };
            if let Some(h) = controls.get(&id) {
                let _ = h.tx.send(c);
            }
        }
    }

    /// The lease loop, on every server: renews this worker's leases and reaps runs
    /// whose lease expired, every third of `worker.lease_s` and when woken.
    pub async fn run_leases(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = self.lease_ttl() / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            // Own leases first: a run of this worker is never reaped while it is here.
            self.heartbeat().await;
            let outcome = match self.store.reap(stoa_store::Reap::Expired).await {
                Ok(reaped) => {
                    self.after_reap(&reaped).await;
                    Ok(reaped.len())
                }
                Err(e) => {
                    tracing::error!(error = %e, "reaping expired leases failed");
                    Err(e.to_string())
                }
            };
            self.stats.reaped(outcome);
        }
    }

    /// The worker loop: claims pending runs while there are free slots. Returns when
    /// `shutdown` flips, after active runs finished or were ended (see
    /// `limits.shutdown_grace_s`).
    pub async fn run_worker(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.python.is_none() {
            return;
        }
        loop {
            if *shutdown.borrow() {
                break;
            }
            let permit = tokio::select! {
                p = self.slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.changed() => break,
            };
            let claimed = {
                let _g = self.claim_lock.lock().await;
                self.claim_decided().await
            };
            match claimed {
                Some((run, rx)) => {
                    self.hub.notify(run.id);
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
                None => {
                    drop(permit);
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.drain().await;
        self.release().await;
    }

    /// Asks the scheduler for the next run and claims it in the store; `None` when no
    /// run can start now. Called under `claim_lock`.
    async fn claim_decided(&self) -> Option<(Run, mpsc::UnboundedReceiver<Control>)> {
        loop {
            let d = self.sched().decide()?;
            let lease = Some(self.lease_ttl());
            match self
                .store
                .claim(d.run, &self.worker_id, &d.gpus, lease)
                .await
            {
                Ok(Some(run)) => {
                    self.sched().start(&d);
                    let (tx, rx) = mpsc::unbounded_channel();
                    let token = run
                        .lease
                        .as_ref()
                        .map(|l| l.token.clone())
                        .unwrap_or_default();
                    self.controls
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(run.id, Held { tx, token });
                    // Everyone behind it moved up.
                    self.hub.notify_all();
                    return Some((run, rx));
                }
                Ok(None) => {
                    // No longer pending (ended meanwhile): forget it and decide again.
                    self.sched().remove(d.run);
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming a run failed");
                    return None;
                }
            }
        }
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts pending runs of the store into the queue (at start).
    pub async fn restore_queue(&self) -> anyhow::Result<usize> {
        let pending = self.store.pending_runs().await?;
        let mut s = self.sched();
        for r in &pending {
            s.push(
                r.id,
                &r.org_id.0,
                &r.execution_type,
                r.priority,
                r.seq as u64,
            );
            self.next_seq
                .fetch_max(r.seq as u64 + 1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(pending.len())
    }

    /// Queues a newly stored run and wakes the worker.
    pub fn enqueue(&self, id: RunId, org: &stoa_types::OrgId, profile: &str, priority: i64) {
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sched().push(id, &org.0, profile, priority, seq);
        self.wake();
    }

    /// Queued runs per hardware profile.
    pub fn queue_depths(&self) -> std::collections::BTreeMap<String, usize> {
        self.sched().depths()
    }

    /// Runs an org has queued.
    pub fn queued_of(&self, org: &stoa_types::OrgId) -> usize {
        self.sched().queued_of(&org.0)
    }

    /// Why a run waits, as of now: the scheduler's view for queued runs, the stored
    /// reason (pulling, building) once placed.
    pub fn live_reason(&self, run: &Run) -> Option<String> {
        match run.status {
            RunStatus::Pending if !self.worker_enabled() => Some(self.queued_reason().to_string()),
            RunStatus::Pending => self
                .sched()
                .reason(run.id)
                .or_else(|| run.pending_reason.clone()),
            RunStatus::Starting => run.pending_reason.clone(),
            _ => None,
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
        let controls: Vec<_> = self
            .controls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|h| h.tx.clone())
            .collect();
        tracing::warn!(
            runs = controls.len(),
            "ending runs still active at shutdown"
        );
        for c in controls {
            let _ = c.send(Control::Shutdown);
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.slots.acquire_many(all)).await;
    }

    /// Releases what the worker holds outside runs (spare networks).
    async fn release(&self) {
        if let Some(d) = &self.docker {
            d.remove_spares().await;
        }
    }

    /// Aborts a run: kills it and returns once it is gone and recorded `aborted`.
    pub async fn abort(&self, id: RunId) -> anyhow::Result<Option<Run>> {
        self.control(id, Control::Abort).await
    }

    /// Stops a run: SIGTERM, `grace`, then kill; recorded `cancelled`.
    pub async fn stop(&self, id: RunId, grace: Duration) -> anyhow::Result<Option<Run>> {
        self.control(id, Control::Stop(grace)).await
    }

    /// Carries out an abort or stop. A pending run never ran: it ends here. An active
    /// one is asked through the store (its worker hears it on its next heartbeat) and,
    /// when this worker holds it, at once; the answer comes once the run ended, or its
    /// lease expired (the reaper then says the worker was lost).
    async fn control(&self, id: RunId, c: Control) -> anyhow::Result<Option<Run>> {
        let asked = match c {
            Control::Abort => stoa_store::RunControl::Abort,
            Control::Stop(g) => stoa_store::RunControl::Stop {
                grace_ms: g.as_millis() as u64,
            },
            Control::Shutdown | Control::Lost => return Ok(self.store.get_run(id).await?),
        };
        let wait_for = match c {
            Control::Stop(g) => g + Duration::from_secs(30),
            _ => Duration::from_secs(30),
        } + self.lease_ttl();
        {
            let _g = self.claim_lock.lock().await;
            let Some(run) = self.store.get_run(id).await? else {
                return Ok(None);
            };
            if run.status.is_terminal() {
                return Ok(Some(run));
            }
            if run.status == RunStatus::Pending {
                // No worker holds it: it never ran, end it here.
                self.sched().remove(id);
                self.hub.notify_all();
                let o = Outcome::from_control(c, None);
                self.store
                    .transition(
                        id,
                        o.status,
                        TransitionData {
                            error: o.error,
                            ..Default::default()
                        },
                    )
                    .await?;
                self.hub.notify(id);
                self.deliverer.wake();
                if let Some(parent) = run.parent_id {
                    self.settle_parent(parent).await;
                }
                return Ok(self.store.get_run(id).await?);
            }
            if self.store.request_control(id, asked).await?.is_some()
                && let Some(h) = self
                    .controls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
            {
                let _ = h.tx.send(c);
            }
        }
        self.wait_terminal(id, wait_for).await
    }

    /// Ends a GPU selection parent once all its children ended: `completed` when at least
    /// one profile completed, else `failed`.
    async fn settle_parent(&self, parent: RunId) {
        let children = match self.store.children(parent).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(run = %parent, error = %e, "reading the children of a selection failed");
                return;
            }
        };
        if children.iter().any(|c| !c.status.is_terminal()) {
            return;
        }
        let any_ok = children.iter().any(|c| c.status == RunStatus::Completed);
        let (to, error) = if any_ok {
            (RunStatus::Completed, None)
        } else {
            (RunStatus::Failed, Some("no profile completed".to_string()))
        };
        let data = TransitionData {
            error,
            return_code: Some(if any_ok { 0 } else { 1 }),
            ..Default::default()
        };
        if let Err(e) = self.store.transition(parent, to, data).await {
            tracing::error!(run = %parent, error = %e, "ending a selection failed");
        }
        self.hub.notify(parent);
        self.deliverer.wake();
    }

    /// Waits until run `id` is terminal (or `limit` passes) and returns it.
    async fn wait_terminal(&self, id: RunId, limit: Duration) -> anyhow::Result<Option<Run>> {
        let mut rx = self.hub.subscribe(id);
        let deadline = Instant::now() + limit;
        loop {
            let run = self.store.get_run(id).await?;
            match &run {
                Some(r) if !r.status.is_terminal() => {}
                _ => return Ok(run),
            }
            // Runs of another worker end through the store, unseen by this hub.
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(run),
            }
        }
    }

    /// Executes one claimed run to its end and records the outcome.
    async fn execute(self: Arc<Self>, run: Run, mut ctl: mpsc::UnboundedReceiver<Control>) {
        let id = run.id;
        let workdir = self.runs_dir().join(id.to_string());
        let mut sink = OutputSink::new(
            self.store.clone(),
            self.hub.clone(),
            self.disk.clone(),
            id,
            run.org_id.clone(),
            self.config.limits.max_output_bytes,
        );
        sink.held_max = self.config.limits.max_held_output_bytes;
        let org_limit = self.config.limits.output_bytes_per_org;
        if org_limit > 0 {
            match self.store.org_output_bytes(&run.org_id).await {
                Ok(used) => sink.org_limit(org_limit, used),
                Err(e) => {
                    tracing::warn!(run = %id, error = %e, "reading the org's stored output failed: its limit is not applied to this run")
                }
            }
        }
        let outcome = match self.secret_env(&run.org_id).await {
            Err(e) => Some(Outcome::system(format!(
                "the org's secrets could not be read: {e}"
            ))),
            Ok(secrets) => {
                sink.mask(
                    secrets.iter().map(|(_, v)| v.clone()),
                    self.config.secrets.min_mask_len,
                );
                let outcome = match self
                    .drive(&run, &workdir, &mut sink, &mut ctl, &secrets)
                    .await
                {
                    Ok(o) => o,
                    Err(e) => Some(Outcome::system(format!("internal error: {e}"))),
                };
                // Whatever way the run went, no held-back output is lost.
                sink.flush_held().await;
                outcome
            }
        };
        let data = outcome.map(|o| {
            if o.error.as_deref() == Some(SHUTDOWN_ERROR) {
                sink.pending_note(&format!(
                    "{SHUTDOWN_ERROR}; output up to that point is kept"
                ));
            }
            let data = TransitionData {
                return_code: o.return_code,
                // An error may repeat what the run printed or an interpolated image.
                error: o.error.map(|mut e| {
                    sink.mask_text(&mut e);
                    e
                }),
                timed_out: o.timed_out,
                lease_token: lease_token(&run),
                ..Default::default()
            };
            (o.status, data)
        });
        self.store_end(id, &mut sink, data).await;
        self.controls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.hub.notify(id);
        self.deliverer.wake();
        if let Some(parent) = run.parent_id {
            self.settle_parent(parent).await;
        }
        self.summarize(id).await;
        // Its slot and GPUs are free: the next run may start, and the queue moved.
        self.sched().finish(id);
        self.wake();
        self.hub.notify_all();
        if workdir.exists()
            && let Err(e) = std::fs::remove_dir_all(&workdir)
        {
            tracing::warn!(run = %id, error = %e, "removing the run's working directory failed");
        }
    }

    /// A run's supervisor panicked: whatever of the run is left is killed, and it ends
    /// `system_failure` (its output so far kept), freeing its slot and GPUs.
    async fn supervisor_panicked(&self, run: Run, panic: Box<dyn std::any::Any + Send>) {
        let id = run.id;
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(run = %id, panic = %what, "the supervisor of a run panicked");
        self.sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        // The process tree, by the group recorded when it started; containers go with
        // the reconciler once the run is no longer held.
        if let Ok(Some(now)) = self.store.get_run(id).await
            && let Some(pgid) = now.pgid
            && owns_process_group(pgid as i32, id)
        {
            stoa_runtime::kill_group(pgid as i32);
        }
        self.controls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.reconcile().await;
        let error = "internal error: the run's supervisor failed; output up to that point is kept";
        let line = (OutputStream::System, format!("[stoa] {error}\n")).into();
        if let Err(e) = self.store.append_output(id, &[line]).await {
            tracing::error!(run = %id, error = %e, "storing the failure notice failed");
        }
        let data = TransitionData {
            error: Some(error.into()),
            lease_token: lease_token(&run),
            ..Default::default()
        };
        if let Err(e) = self
            .store
            .transition(id, RunStatus::SystemFailure, data)
            .await
        {
            tracing::error!(run = %id, error = %e, "storing the end of a run failed");
        }
        self.hub.notify(id);
        self.deliverer.wake();
        if let Some(parent) = run.parent_id {
            self.settle_parent(parent).await;
        }
        self.sched().finish(id);
        self.wake();
        self.hub.notify_all();
        let workdir = self.runs_dir().join(id.to_string());
        if workdir.exists() {
            let _ = std::fs::remove_dir_all(&workdir);
        }
    }

    /// Stores a run's end: its held-back output first, then its final state (when
    /// given), retried until stored, since the disk may be full: a run never stays
    /// active after its process ended, and the exit code it had is the one kept.
    async fn store_end(
        &self,
        id: RunId,
        sink: &mut OutputSink,
        end: Option<(RunStatus, TransitionData)>,
    ) {
        let mut delay = Duration::from_millis(100);
        let mut told = false;
        loop {
            if sink.settle().await {
                let Some((status, data)) = &end else { return };
                match self.store.transition(id, *status, data.clone()).await {
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
                        self.disk.write_failed(&e);
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Prepares, launches and supervises a run. `Ok(None)` when the run already ended
    /// elsewhere (aborted between claim and start).
    async fn drive(
        &self,
        run: &Run,
        workdir: &std::path::Path,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
        secrets: &[(String, String)],
    ) -> anyhow::Result<Option<Outcome>> {
        let id = run.id;
        let launched = match run.job_type.as_str() {
            "python" => self.launch_python(run, workdir, sink, ctl, secrets).await?,
            "image" => self.launch_image(run, sink, ctl, secrets).await?,
            "compose" => self.launch_compose(run, sink, ctl, secrets).await?,
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
            .store
            .transition(
                id,
                RunStatus::Running,
                TransitionData {
                    pgid: exec.pgid(),
                    lease_token: lease_token(run),
                    ..Default::default()
                },
            )
            .await;
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                // Not recorded as running: it must not run unwatched.
                let _ = exec.kill().await;
                return Err(e.into());
            }
        };
        if started.is_none() {
            // Aborted between the claim and now, or its lease lost: it must not run.
            exec.kill().await?;
            return Ok(None);
        }
        #[cfg(feature = "fault-injection")]
        if run.run_name.as_deref() == Some(FAULT_SUPERVISOR_PANIC) {
            panic!("fault injection: the supervisor of run {id} panics");
        }
        self.hub.notify(id);
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
        self.sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
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
            (Err(_), Some(c)) => return Ok(Some(Outcome::from_control(c, None))),
            (Err(_), None) if timed_out => {
                return Ok(Some(Outcome {
                    status: RunStatus::Failed,
                    return_code: None,
                    error: Some(format!("timeout after {timeout_s} s")),
                    timed_out: true,
                }));
            }
            (Err(RuntimeError::Failed { message, code }), None) => {
                sink.note(&message).await;
                return Ok(Some(Outcome {
                    status: RunStatus::Failed,
                    return_code: code,
                    error: Some(message),
                    timed_out: false,
                }));
            }
            (Err(RuntimeError::Image(msg)), None) => {
                sink.note(&msg).await;
                return Ok(Some(Outcome::failed(msg)));
            }
            // Said as it is: the engine was not reachable.
            (Err(e @ RuntimeError::EngineUnreachable(_)), None) => {
                return Ok(Some(Outcome::system(e.to_string())));
            }
            (Err(e), None) => {
                return Ok(Some(Outcome::system(format!(
                    "supervising the run failed: {e}"
                ))));
            }
        };
        let setup_failure = match (&self.python, run.job_type.as_str()) {
            (Some(p), "python") => p.setup_failure(exit, sink.first_lines()),
            _ => None,
        };
        let outcome = if let Some(c) = intent {
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
        };
        Ok(Some(outcome))
    }

    /// Sets the pending reason of a run from a synchronous progress callback.
    fn reason_setter(&self, id: RunId) -> impl Fn(String) + Send + Sync + 'static {
        let store = self.store.clone();
        let hub = self.hub.clone();
        move |reason: String| {
            let store = store.clone();
            let hub = hub.clone();
            tokio::spawn(async move {
                if store.set_pending_reason(id, Some(&reason)).await.is_ok() {
                    hub.notify(id);
                }
            });
        }
    }

    /// Builds (or reuses) the Python environment and starts the run.
    async fn launch_python(
        &self,
        run: &Run,
        workdir: &std::path::Path,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
        secrets: &[(String, String)],
    ) -> anyhow::Result<Result<Launched, Outcome>> {
        let id = run.id;
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
                .launch_python_in_image(run, spec, reqs, image, workdir, sink, ctl, secrets)
                .await;
        }
        if !python.env_cached(&reqs) {
            self.reason_setter(id)("building Python environment".into());
        }
        let warnings = Mutex::new(Vec::<String>::new());
        let warn = |w: String| warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
        let env = match settle_env(sink, ctl, &warnings, python.prepare_env(&reqs, &warn)).await {
            Ok(env) => env,
            Err(outcome) => return Ok(Err(outcome)),
        };
        self.store.add_phase(id, "environment_ready").await?;
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

    /// The org's secrets, decrypted, as environment variables.
    pub(crate) async fn secret_env(
        &self,
        org: &stoa_types::OrgId,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for s in self.store.list_secrets(org).await? {
            out.push((s.name.clone(), self.keyring.open_string(&s.sealed)?));
        }
        Ok(out)
    }

    /// The run's org storage directory, made when missing (to be mounted).
    fn org_storage(&self, run: &Run) -> std::io::Result<std::path::PathBuf> {
        let dir = crate::storage::org_dir(&self.config.data_dir, &run.org_id);
        crate::storage::fs::make_root(&dir)?;
        Ok(dir)
    }

    /// The configured profile of that name.
    fn profile(&self, name: &str) -> Option<&crate::config::ProfileConfig> {
        self.config.profiles.iter().find(|p| p.name == name)
    }

    /// A sandboxed Python run's limits and network, from its profile, and its GPUs'
    /// device files.
    fn sandbox_limits(&self, run: &Run, job: &mut PythonJob) {
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
    fn resources_for(&self, run: &Run) -> Resources {
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
        run: &Run,
        spec: PythonRunSpec,
        reqs: Vec<stoa_core::requirements::Requirement>,
        image: String,
        workdir: &std::path::Path,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
        secrets: &[(String, String)],
    ) -> anyhow::Result<Result<Launched, Outcome>> {
        let id = run.id;
        let (Some(docker), Some(cp)) = (self.docker.clone(), self.container_python.clone()) else {
            return Ok(Err(Outcome::system(
                "no worker can execute containerised Python runs here",
            )));
        };
        let progress = self.reason_setter(id);
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
        self.store.add_phase(id, "environment_ready").await?;
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
        run: &Run,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
        secrets: &[(String, String)],
    ) -> anyhow::Result<Result<Launched, Outcome>> {
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
        let auth = match self.registry_auth(id, spec.registry_username.as_deref()) {
            Ok(a) => a,
            Err(o) => return Ok(Err(o)),
        };
        if let Err(o) = self
            .pull_image(&docker, id, &spec.image, auth.as_ref(), sink, ctl)
            .await
        {
            return Ok(Err(o));
        }
        self.store.add_phase(id, "environment_ready").await?;
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

    /// The registry credentials kept for a run; a run that had some and lost them in a
    /// restart cannot pull.
    fn registry_auth(
        &self,
        id: RunId,
        username: Option<&str>,
    ) -> Result<Option<RegistryAuth>, Outcome> {
        let creds = self
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
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

    /// Pulls an image when needed (progress in the pending reason); a control
    /// interrupts it. A missing image or refused access fails the run.
    async fn pull_image(
        &self,
        docker: &DockerRuntime,
        id: RunId,
        image: &str,
        auth: Option<&RegistryAuth>,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<(), Outcome> {
        let progress = self.reason_setter(id);
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
        run: &Run,
        sink: &mut OutputSink,
        ctl: &mut mpsc::UnboundedReceiver<Control>,
        secrets: &[(String, String)],
    ) -> anyhow::Result<Result<Launched, Outcome>> {
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
        let auth = match self.registry_auth(id, spec.registry_username.as_deref()) {
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
            if let Err(o) = self.pull_image(&docker, id, image, auth, sink, ctl).await {
                return Ok(Err(o));
            }
        }
        self.store.add_phase(id, "environment_ready").await?;
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
    pub async fn reconcile(&self) -> usize {
        let Some(docker) = &self.docker else { return 0 };
        // Asked at each object, not from a list made before the engine's listing: a
        // run claimed meanwhile may already have a container in that listing. A run's
        // control is registered before its first container is made, and removed only
        // after its containers are gone.
        let live = |run: &str| {
            // Tool containers of a run (its environment build) carry its id as a prefix.
            let id = run.get(..36).unwrap_or(run);
            id.parse::<RunId>().is_ok_and(|id| {
                self.controls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&id)
            })
        };
        match docker.reconcile(&live).await {
            Ok(n) => {
                self.stats.reconciled(n, None);
                n
            }
            Err(e) => {
                tracing::debug!(error = %e, "reconciler skipped: Docker engine not available");
                self.stats.reconciled(0, Some(e.to_string()));
                0
            }
        }
    }

    /// Samples every running run once; returns the samples taken.
    pub async fn sample_once(&self) -> Vec<stoa_store::Sample> {
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
        let ts = stoa_store::now();
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
            out.push(stoa_store::Sample {
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

    /// Reads the GPUs of running runs that were given GPUs, and stores the readings.
    async fn sample_gpus(&self) {
        let targets: Vec<(RunId, Vec<u32>)> = self
            .sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| !t.gpus.is_empty())
            .map(|(k, t)| (*k, t.gpus.clone()))
            .collect();
        for (id, idx) in targets {
            let gpus = self.gpus.clone();
            let readings = tokio::task::spawn_blocking(move || gpus.read(&idx))
                .await
                .unwrap_or_default();
            if readings.is_empty() {
                continue;
            }
            let ts = stoa_store::now();
            let samples = readings
                .into_iter()
                .map(|r| stoa_store::GpuSample {
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
                })
                .collect();
            if let Err(e) = self.store.insert_gpu_samples(id, samples).await {
                tracing::error!(run = %id, error = %e, "storing GPU samples failed");
            }
        }
    }

    /// The sampler: every `metrics.interval_ms`, one sample per running run, written in
    /// one batch; prunes samples past the retention once an hour.
    pub async fn run_sampler(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.config.metrics.interval_ms.max(100));
        let mut next = Instant::now() + interval;
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
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
            self.sample_gpus().await;
            if !samples.is_empty()
                && let Err(e) = self.store.insert_samples(samples).await
            {
                tracing::error!(error = %e, "storing samples failed");
            }
            if last_prune.elapsed() >= Duration::from_secs(3600) {
                last_prune = Instant::now();
                let cutoff = chrono::Utc::now()
                    - chrono::Duration::days(self.config.metrics.retention_days as i64);
                if let Err(e) = self
                    .store
                    .prune_samples(&cutoff.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                    .await
                {
                    tracing::error!(error = %e, "pruning samples failed");
                }
            }
        }
    }

    /// Keeps a summary of a run's samples with it, and its duration in the platform metrics.
    async fn summarize(&self, id: RunId) {
        let Ok(Some(run)) = self.store.get_run(id).await else {
            return;
        };
        if let (Some(s), Some(e)) = (&run.job_start, &run.job_end)
            && let Some(secs) = crate::api::seconds_between(s, Some(e))
        {
            self.stats
                .observe_run(&run.job_type, run.status.as_str(), secs);
        }
        let samples = match self.store.samples(id, "0000", "9999").await {
            Ok(s) => s,
            Err(_) => return,
        };
        let gpu = self
            .store
            .gpu_samples(id, "0000", "9999")
            .await
            .unwrap_or_default();
        let interval = self.config.metrics.interval_ms as f64 / 1000.0;
        let mut summary = crate::run_metrics::summarize_samples(&samples);
        crate::run_metrics::summarize_gpus(&mut summary, &gpu, run.gpu_ids.len(), &run, interval);
        if let Err(e) = self
            .store
            .set_metrics_summary(id, &summary.to_string())
            .await
        {
            tracing::error!(run = %id, error = %e, "storing the metrics summary failed");
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

    /// Runs the reconciler at once, then every `interval`, until shutdown.
    pub async fn run_reconciler(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let first = self.reconcile().await;
        if first > 0 {
            tracing::warn!(
                objects = first,
                "removed containers and networks of runs that are no longer active"
            );
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => { self.reconcile().await; }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Keeps registry credentials of a queued run in memory until its worker pulls.
    pub fn remember_credentials(&self, id: RunId, creds: RegistryCredentials) {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, creds);
    }
}

/// The token of the lease a claimed run is held under.
fn lease_token(run: &Run) -> Option<String> {
    run.lease.as_ref().map(|l| l.token.clone())
}

/// The run name that makes a run's supervisor panic once the run is running, in builds
/// with the `fault-injection` feature (tests only).
#[cfg(feature = "fault-injection")]
pub const FAULT_SUPERVISOR_PANIC: &str = "stoa-fault-injection:supervisor-panic";

/// A Python run's extra environment: the org's secrets, the GPUs it was given
/// (`CUDA_VISIBLE_DEVICES`, empty for runs without GPUs so they see none) and its
/// hardware profile (`STOA_HARDWARE_PROFILE`).
fn run_env_with_gpus(secrets: &[(String, String)], run: &Run) -> Vec<(String, String)> {
    let mut env = secrets.to_vec();
    env.push(("CUDA_VISIBLE_DEVICES".into(), run.gpu_ids.join(",")));
    env.push(("STOA_HARDWARE_PROFILE".into(), run.execution_type.clone()));
    env
}

/// What a container learns about its run: `STOA_EXECUTION_ID` and
/// `STOA_HARDWARE_PROFILE`.
fn run_identity(run: &Run) -> [(String, String); 2] {
    [
        ("STOA_EXECUTION_ID".into(), run.id.to_string()),
        ("STOA_HARDWARE_PROFILE".into(), run.execution_type.clone()),
    ]
}

/// The run's stored spec; a spec that does not read back is the platform's failure.
fn read_spec<T: serde::de::DeserializeOwned>(run: &Run) -> Result<T, Outcome> {
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
    run: &Run,
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

/// Bytes a run writes between two reads of its org's stored output (with
/// `limits.output_bytes_per_org`).
const ORG_RECHECK_BYTES: u64 = 256 * 1024;

/// Writes a run's output to the store, enforcing the per-run output limit, and
/// notifies stream readers after each write.
///
/// Nothing is lost silently: output that cannot be stored (the disk is full) is held
/// back, up to `limits.max_held_output_bytes`, and written once space is back; what did not fit is
/// counted, and a `[stoa]` line says how much was lost, with the run marked truncated,
/// as soon as it can be stored.
struct OutputSink {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    disk: Arc<DiskGuard>,
    id: RunId,
    written: u64,
    /// Bytes this run may store: the per-run limit, or less when its org's limit is near.
    max: u64,
    /// The per-run limit (`limits.max_output_bytes`).
    run_max: u64,
    /// The org's limit (`limits.output_bytes_per_org`), when set.
    org_limit: Option<u64>,
    truncated: bool,
    notice_due: bool,
    /// Output accepted but not stored yet (the disk was full), in order.
    pending: Vec<OutputPiece>,
    /// Most bytes held back (`limits.max_held_output_bytes`).
    held_max: u64,
    pending_bytes: u64,
    /// Lines and bytes that could not be stored; told in a notice once space is back.
    lost: (u64, u64),
    /// The run is to be marked `output_truncated` (once that can be stored).
    flag_due: bool,
    /// The run's org (for `limits.output_bytes_per_org`).
    org: stoa_types::OrgId,
    /// What the run had written when the org's stored output was last read.
    org_checked_at: u64,
    /// The first stdout and stderr lines, to tell sandbox set-up failures apart.
    first: (Option<String>, Option<String>),
    /// Secret values replaced by `***` before anything is stored, and the held-back
    /// ends of unfinished lines (a secret may straddle two pieces of one line).
    masker: Masker,
}

impl OutputSink {
    fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        disk: Arc<DiskGuard>,
        id: RunId,
        org: stoa_types::OrgId,
        max: u64,
    ) -> Self {
        OutputSink {
            store,
            hub,
            disk,
            id,
            written: 0,
            max,
            run_max: max,
            org_limit: None,
            truncated: false,
            notice_due: false,
            pending: Vec::new(),
            held_max: 1 << 20,
            pending_bytes: 0,
            lost: (0, 0),
            flag_due: false,
            org,
            org_checked_at: 0,
            first: (None, None),
            masker: Masker::default(),
        }
    }

    /// Keeps the run within what its org may still store (`limits.output_bytes_per_org`,
    /// of which `used` bytes are stored).
    fn org_limit(&mut self, limit: u64, used: u64) {
        self.org_limit = Some(limit);
        self.max = self.max.min(limit.saturating_sub(used));
    }

    /// Masks these values (those of at least `min_len` bytes) in all output.
    fn mask(&mut self, values: impl Iterator<Item = String>, min_len: usize) {
        self.masker = Masker::new(values, min_len);
    }

    /// Masks the secret values in a text of Stoa's own that is stored elsewhere.
    fn mask_text(&self, text: &mut String) {
        self.masker.mask(text);
    }

    /// The first stdout and stderr lines written.
    fn first_lines(&self) -> (Option<&str>, Option<&str>) {
        (self.first.0.as_deref(), self.first.1.as_deref())
    }

    async fn write_lines(&mut self, lines: Vec<OutputLine>) {
        for l in &lines {
            let slot = match l.stream {
                Stream::Stdout => &mut self.first.0,
                Stream::Stderr => &mut self.first.1,
                Stream::System => continue,
            };
            if slot.is_none() {
                *slot = Some(l.text.clone());
            }
        }
        let pieces = lines
            .into_iter()
            .filter_map(|l| {
                self.masker.hold_back(OutputPiece {
                    stream: match l.stream {
                        Stream::Stdout => OutputStream::Stdout,
                        Stream::Stderr => OutputStream::Stderr,
                        Stream::System => OutputStream::System,
                    },
                    service: l.service.map(|s| s.to_string()),
                    content: l.text,
                })
            })
            .collect();
        self.write_pieces(pieces).await;
    }

    /// Writes what is held back of unfinished lines: their streams have ended.
    async fn flush_held(&mut self) {
        let held = self.masker.take_held();
        if !held.is_empty() {
            self.write_pieces(held).await;
        }
    }

    async fn write(&mut self, chunks: Vec<(OutputStream, String)>) {
        self.write_pieces(chunks.into_iter().map(OutputPiece::from).collect())
            .await;
    }

    async fn write_pieces(&mut self, pieces: Vec<OutputPiece>) {
        if self.truncated {
            return;
        }
        self.recheck_org_limit().await;
        let mut keep = Vec::with_capacity(pieces.len());
        for mut p in pieces {
            self.masker.mask(&mut p.content);
            let n = p.content.len() as u64;
            if self.written + n > self.max {
                self.truncated = true;
                self.notice_due = true;
                break;
            }
            self.written += n;
            keep.push(p);
        }
        if !keep.is_empty() {
            // Behind output not stored yet, or while the disk is full: held back, in order.
            if !self.pending.is_empty() || self.disk.is_full() {
                self.hold(keep);
            } else if let Err(e) = self.store.append_output(self.id, &keep).await {
                self.store_failed(&e);
                self.hold(keep);
            } else {
                self.hub.notify(self.id);
            }
        }
        self.store_pending(false).await;
        if self.notice_due {
            self.flush_notice().await;
        }
    }

    /// Holds output back until it can be stored, up to `limits.max_held_output_bytes`; beyond, it
    /// is counted as lost (and told).
    fn hold(&mut self, pieces: Vec<OutputPiece>) {
        for p in pieces {
            let n = p.content.len() as u64;
            if self.pending_bytes + n > self.held_max {
                self.lost.0 += 1;
                self.lost.1 += n;
            } else {
                self.pending_bytes += n;
                self.pending.push(p);
            }
        }
    }

    /// A write of the store failed: said in the log; a full disk is marked as such.
    fn store_failed(&self, e: &stoa_store::StoreError) {
        tracing::warn!(run = %self.id, error = %e, "storing output failed: it is held back");
        self.disk.write_failed(e);
    }

    /// With `limits.output_bytes_per_org`, reads the org's stored output again every
    /// [`ORG_RECHECK_BYTES`] this run writes, so that runs of one org running at once
    /// share its limit (each may pass it by at most that much).
    async fn recheck_org_limit(&mut self) {
        let Some(limit) = self.org_limit else { return };
        if self.written < self.org_checked_at + ORG_RECHECK_BYTES {
            return;
        }
        self.org_checked_at = self.written;
        if let Ok(used) = self.store.org_output_bytes(&self.org).await {
            let left = limit.saturating_sub(used);
            self.max = self.run_max.min(self.written + left);
        }
    }

    /// Stores the output held back, then the notice of what was lost and the
    /// truncation mark. Unless `force`, nothing is tried while the disk is known to be
    /// full. True when nothing is left to store.
    async fn store_pending(&mut self, force: bool) -> bool {
        if !force && self.disk.is_full() {
            return false;
        }
        if !self.pending.is_empty() {
            if let Err(e) = self.store.append_output(self.id, &self.pending).await {
                self.store_failed(&e);
                return false;
            }
            self.pending.clear();
            self.pending_bytes = 0;
            self.hub.notify(self.id);
        }
        if self.lost.0 > 0 {
            let line = format!(
                "[stoa] {} lines ({} bytes) of output could not be stored: the disk under the server's data directory was full\n",
                self.lost.0, self.lost.1
            );
            if let Err(e) = self
                .store
                .append_output(self.id, &[(OutputStream::System, line).into()])
                .await
            {
                self.store_failed(&e);
                return false;
            }
            self.lost = (0, 0);
            self.flag_due = true;
            self.hub.notify(self.id);
        }
        if self.flag_due {
            if let Err(e) = self.store.set_output_truncated(self.id).await {
                self.store_failed(&e);
                return false;
            }
            self.flag_due = false;
        }
        true
    }

    /// At the run's end: stores what is held back; when that cannot be done, it
    /// counts as lost, so that only the short notice is left to store. True when
    /// everything is stored.
    async fn settle(&mut self) -> bool {
        if self.store_pending(true).await {
            return true;
        }
        for p in self.pending.drain(..) {
            self.lost.0 += 1;
            self.lost.1 += p.content.len() as u64;
        }
        self.pending_bytes = 0;
        self.store_pending(true).await
    }

    /// Adds a line of Stoa's own to the output held back (stored with the rest by
    /// [`OutputSink::settle`]).
    fn pending_note(&mut self, msg: &str) {
        let line = format!("[stoa] {msg}\n");
        self.pending_bytes += line.len() as u64;
        self.pending.push((OutputStream::System, line).into());
    }

    /// Writes a line of Stoa's own: `[stoa] MSG`.
    async fn note(&mut self, msg: &str) {
        self.write(vec![(OutputStream::System, format!("[stoa] {msg}\n"))])
            .await;
    }

    /// Writes lines of Stoa's own (each with its newline), when there are any.
    async fn notes(&mut self, lines: Vec<String>) {
        if !lines.is_empty() {
            self.write(
                lines
                    .into_iter()
                    .map(|l| (OutputStream::System, l))
                    .collect(),
            )
            .await;
        }
    }

    /// Writes the truncation notice once, when the limit was hit.
    async fn flush_notice(&mut self) {
        if !self.notice_due {
            return;
        }
        self.notice_due = false;
        let line = match self.org_limit {
            Some(limit) if self.max < self.run_max => format!(
                "[stoa] output truncated: the org's stored output reached its limit of {limit} bytes (limits.output_bytes_per_org)\n"
            ),
            _ => format!(
                "[stoa] output truncated: the limit of {} bytes per run was reached\n",
                self.max
            ),
        };
        self.pending_bytes += line.len() as u64;
        self.pending.push((OutputStream::System, line).into());
        self.flag_due = true;
        self.store_pending(false).await;
    }
}
