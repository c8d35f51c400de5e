//! The engine: the control plane's side of runs. It keeps the queue and the
//! scheduler, hands runs to the worker that claims them (in-process, through
//! [`ControlPlane`]), records what the worker reports under the run's lease, reaps runs
//! whose worker was lost, and carries out abort and stop.
//!
//! Invariants:
//! - A claim and an abort or stop of a pending run take one lock: a control never
//!   misses a run that was just claimed, and never ends one that a worker holds.
//! - Every write a worker asks for after its claim names the run's lease token: a
//!   worker that lost its lease can never overwrite what the reaper wrote.
//! - The scheduler frees a run's slot and GPUs when its worker records its end, or
//!   when the reaper ends it (a worker that comes back is held to its own capacity by
//!   its slots, which the lost run keeps until it is gone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use stoa_core::RegistryCredentials;
use stoa_core::loops::Pass;
use stoa_core::plane::{
    Appended, Assignment, ControlPlane, Directive, GpuSample, OrgOutput, OutputPiece, PlaneError,
    Progress, RunControl, RunEnd, Sample,
};
use stoa_core::scheduler::Scheduler;
use stoa_store::{Run, Store, StoreError, TransitionData};
use stoa_types::worker::{RegisterRequest, RegisterResponse};
use stoa_types::{OrgId, RunId, RunStatus};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::Config;
use crate::disk::DiskGuard;
use crate::hub::Hub;

/// Output bytes a run may store beyond `limits.max_output_bytes`: its worker's
/// notices (truncation, lines lost) after the limit is reached.
const OUTPUT_NOTICE_ROOM: u64 = 64 * 1024;

/// The name of the worker that runs in the server process, on a store of its own
/// (SQLite); on a shared store each server's is `embedded-<server id>` (see
/// [`embedded_name`]).
pub const EMBEDDED_WORKER: &str = "embedded";

/// The name of this server's embedded worker: `embedded` on a store no other server
/// shares; else `embedded-` and the server's id, kept in its data directory
/// (`server.id`) so that a restarted server knows its earlier runs.
pub fn embedded_name(shared: bool, data_dir: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    if !shared {
        return Ok(EMBEDDED_WORKER.to_string());
    }
    let file = data_dir.join("server.id");
    let id = match std::fs::read_to_string(&file) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => {
            let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
            stoa_config::write_private(&file, &id)
                .with_context(|| format!("writing {}", file.display()))?;
            id
        }
    };
    Ok(format!("{EMBEDDED_WORKER}-{id}"))
}

/// The place of a run among queued runs of equal priority: its creation time, which
/// its id carries (UUIDv7: milliseconds, then a counter), so that every server orders
/// runs alike, whichever server queued them.
fn order_of(id: RunId) -> u64 {
    (id.0.as_u128() >> 64) as u64
}

/// How often a server on a shared store looks at the queue without being told of a
/// change.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// How long a server waits after hearing of a change before it looks, so that the
/// changes made together cost one look.
const FOLLOW_SETTLE: Duration = Duration::from_millis(10);

/// The least time between two looks: under a stream of changes, a server looks four
/// times a second (each look reads every pending run).
const FOLLOW_GAP: Duration = Duration::from_millis(250);

/// The error of the embedded worker's runs that were active when the server stopped
/// without ending them (a crash).
const RESTART_ERROR: &str = "the server restarted while the run was active";

/// The control plane of runs.
pub struct Engine {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    config: Arc<Config>,
    keyring: Arc<crate::secrets::Keyring>,
    deliverer: Arc<crate::callbacks::Deliverer>,
    /// Registry credentials of queued runs, in memory only (never stored).
    credentials: Mutex<HashMap<RunId, RegistryCredentials>>,
    /// The worker that claims here (the embedded one), when there is one.
    worker: Option<String>,
    /// Woken when a run may be claimed (the embedded worker).
    wake: Notify,
    /// Woken when a run may be claimed (workers waiting in a long-poll claim).
    fleet_wake: Notify,
    /// Woken when an abort or stop waits for the worker's next heartbeat.
    beat: Notify,
    /// Woken when another server sharing the store changed a run.
    follow_wake: Notify,
    /// Held while claiming a run and while ending a pending one; see the module doc.
    claim_lock: tokio::sync::Mutex<()>,
    /// The queue and what runs, for placement decisions.
    sched: Mutex<Scheduler>,
    /// Platform metrics (run durations, the sampler's lag, the loops' passes).
    pub stats: Arc<crate::prom::EngineStats>,
    /// Free space under the data directory.
    disk: Arc<DiskGuard>,
    /// The server is shutting down: new runs are refused.
    stopping: std::sync::atomic::AtomicBool,
}

impl Engine {
    /// The control plane; `worker_enabled` when the embedded worker claims from it.
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        config: Arc<Config>,
        embedded: Option<String>,
        keyring: Arc<crate::secrets::Keyring>,
        deliverer: Arc<crate::callbacks::Deliverer>,
    ) -> Self {
        let disk = Arc::new(DiskGuard::new(
            &config.data_dir,
            config.limits.min_free_bytes,
            config.limits.disk_reserve_bytes,
        ));
        let mut sched = Scheduler::without_workers(config.limits.org_max_running)
            .with_priority_share(config.limits.priority_share);
        if let Some(name) = &embedded {
            sched.add_worker(name, config.capacities(), config.worker.gpu_ids.clone());
        }
        Engine {
            store,
            hub,
            config,
            keyring,
            deliverer,
            credentials: Mutex::new(HashMap::new()),
            worker: embedded,
            wake: Notify::new(),
            fleet_wake: Notify::new(),
            beat: Notify::new(),
            follow_wake: Notify::new(),
            claim_lock: tokio::sync::Mutex::new(()),
            sched: Mutex::new(sched),
            stats: Default::default(),
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

    /// The server is shutting down: new runs are refused from now on.
    pub fn set_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The pending reason of a newly queued run.
    pub fn queued_reason(&self) -> &'static str {
        if self.has_workers() {
            "queued: waiting for a free run slot"
        } else {
            "no worker is enabled on this server (started with --no-worker), and no `stoa worker` is registered"
        }
    }

    /// Tells the workers a run may be claimed (one was queued, or a slot freed).
    pub fn wake(&self) {
        self.wake.notify_one();
        self.fleet_wake.notify_waiters();
    }

    /// Whether any worker (embedded or registered) may execute runs.
    /// The name of this server's embedded worker, when it has one.
    pub fn embedded_worker(&self) -> Option<&str> {
        self.worker.as_deref()
    }

    pub fn has_workers(&self) -> bool {
        self.sched().has_workers()
    }

    /// The embedded worker's runs that were active when the server last stopped, with
    /// their recorded process groups (for the worker to kill what is left of them).
    pub async fn embedded_leftovers(&self) -> anyhow::Result<Vec<(RunId, i64)>> {
        Ok(self
            .store
            .active_runs()
            .await?
            .into_iter()
            .filter(|r| r.worker_id.is_some() && r.worker_id == self.worker)
            .filter_map(|r| Some((r.id, r.pgid?)))
            .collect())
    }

    /// Ends the embedded worker's runs that were active when the server last stopped:
    /// there is no way to re-attach to their output pipes, so each is reaped,
    /// `system_failure` with the reason; its stored output is kept. Runs of other
    /// workers are the lease reaper's. Selection parents whose children all ended end
    /// too.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        let reaped = match &self.worker {
            Some(worker) => {
                self.store
                    .reap(stoa_store::Reap::Worker {
                        worker,
                        reason: RESTART_ERROR,
                    })
                    .await?
            }
            None => Vec::new(),
        };
        self.after_reap(&reaped).await;
        // A selection is not executed; it ends with its children.
        for run in self.store.active_runs().await? {
            if run.job_type == stoa_store::RunKind::GpuSelection {
                self.settle_parent(run.id).await;
            }
        }
        Ok(reaped.len())
    }

    /// Tells readers, callbacks and selection parents about runs the reaper ended, and
    /// the worker (its next heartbeat hears they are lost).
    async fn after_reap(&self, reaped: &[Run]) {
        if reaped.is_empty() {
            return;
        }
        self.deliverer.wake();
        for run in reaped {
            tracing::warn!(run = %run.id, error = run.error.as_deref().unwrap_or_default(), "run reaped");
            // Its slot and GPUs are free; the worker, if it comes back, takes no new
            // run beyond its own capacity (the lost run's slot is held until it is gone).
            self.sched().finish(run.id);
            self.hub.notify(run.id);
            if let Some(parent) = run.parent_id {
                self.settle_parent(parent).await;
            }
        }
        self.hub.notify_all();
        self.beat.notify_one();
        self.wake();
    }

    /// How long a lease lasts without a heartbeat (`worker.lease_s`).
    fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.config.worker.lease_s.max(1))
    }

    /// The upkeep loop, on every server: reaps runs whose lease expired, every third of
    /// `worker.lease_s` (each pass in `/metrics`), and prunes samples past their
    /// retention once an hour.
    pub async fn run_upkeep(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        // Workers on other machines get one whole lease to call again after a start
        // (the server may have been away longer than that).
        let me = self.clone();
        self.stats
            .reaper
            .run(self.lease_ttl(), self.lease_ttl() / 3, shutdown, || {
                let me = me.clone();
                let prune = last_prune.elapsed() >= Duration::from_secs(3600);
                if prune {
                    last_prune = Instant::now();
                }
                async move { me.upkeep_pass(prune).await }
            })
            .await
    }

    /// One pass of upkeep: reaps expired leases, syncs the fleet, and prunes samples
    /// (when `prune`). Its outcome is the reaper's.
    async fn upkeep_pass(&self, prune: bool) -> Result<Pass, String> {
        // The embedded worker lives as long as this process: its runs are never
        // reaped here (its heartbeats fail while the disk is full).
        let except = self.worker.as_deref();
        let outcome = match self.store.reap(stoa_store::Reap::Expired { except }).await {
            Ok(reaped) => {
                self.after_reap(&reaped).await;
                Ok(Pass::did(reaped.len() as u64))
            }
            Err(e) => {
                tracing::error!(error = %e, "reaping expired leases failed");
                Err(e.to_string())
            }
        };
        self.sync_fleet().await;
        if prune {
            let cutoff = chrono::Utc::now()
                - chrono::Duration::days(self.config.metrics.retention_days as i64);
            if let Err(e) = self.store.prune_samples(cutoff).await {
                tracing::error!(error = %e, "pruning samples failed");
            }
        }
        outcome
    }

    /// Asks the scheduler for the next run and claims it in the store; `None` when no
    /// run can start now. Called under `claim_lock`.
    async fn claim_decided(&self, worker: &str) -> Result<Option<Run>, StoreError> {
        loop {
            let Some(d) = self.sched().decide_for(worker) else {
                return Ok(None);
            };
            let lease = Some(self.lease_ttl());
            match self.store.claim(d.run, worker, &d.gpus, lease).await {
                Ok(Some(run)) => {
                    self.sched().start(&d);
                    // Everyone behind it moved up.
                    self.hub.notify(run.id);
                    self.hub.queue_moved();
                    return Ok(Some(run));
                }
                Ok(None) => {
                    // No longer pending (ended meanwhile): forget it and decide again.
                    self.sched().remove(d.run);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the engine that another server sharing the store changed a run.
    pub fn store_changed(&self) {
        self.follow_wake.notify_one();
    }

    /// On a store other servers share: follows the queue as stored (the runs they
    /// queue, place and end) whenever one of them changes a run, and every second.
    pub async fn run_follow(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last = Instant::now() - FOLLOW_GAP;
        loop {
            tokio::select! {
                _ = self.follow_wake.notified() => {}
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            tokio::time::sleep(FOLLOW_SETTLE.max(FOLLOW_GAP.saturating_sub(last.elapsed()))).await;
            last = Instant::now();
            self.sync_fleet().await;
            let mark = self.sched().mark();
            match self.store.queue_snapshot().await {
                Ok((mut pending, active)) => {
                    for p in &mut pending {
                        p.seq = order_of(p.run);
                    }
                    if self.sched().follow(mark, &pending, &active) {
                        self.wake();
                        self.hub.queue_moved();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "following the shared queue failed"),
            }
        }
    }

    /// Puts pending runs of the store into the queue (at start).
    pub async fn restore_queue(&self) -> anyhow::Result<usize> {
        // The fleet as it registered, and what its workers still run.
        for w in self.store.list_workers().await? {
            match serde_json::from_str::<RegisterRequest>(&w.offer) {
                Ok(offer) => {
                    let caps = self.capacities_of(&offer).unwrap_or_default();
                    let mut s = self.sched();
                    s.add_worker(&w.name, caps, offer.gpus);
                    s.set_draining(&w.name, w.draining);
                }
                Err(e) => {
                    tracing::warn!(worker = %w.name, error = %e, "a worker's stored offer is unreadable; it registers again")
                }
            }
        }
        for r in self.store.active_runs().await? {
            if let Some(w) = &r.worker_id
                && r.lease.is_some()
            {
                self.sched().restore_running(
                    r.id,
                    w,
                    &r.org_id.0,
                    &r.execution_type,
                    r.gpu_ids.clone(),
                );
            }
        }
        let pending = self.store.pending_runs().await?;
        let mut s = self.sched();
        for r in &pending {
            s.push(
                r.id,
                &r.org_id.0,
                &r.execution_type,
                r.priority,
                order_of(r.id),
            );
        }
        Ok(pending.len())
    }

    /// Queues a newly stored run and wakes the worker.
    pub fn enqueue(&self, id: RunId, org: &stoa_types::OrgId, profile: &str, priority: i64) {
        self.sched()
            .push(id, &org.0, profile, priority, order_of(id));
        self.wake();
    }

    /// The workers that offer a profile (the embedded one and those registered), with
    /// the runs of it they hold.
    pub fn offers_of(&self, profile: &str) -> Vec<stoa_core::scheduler::Offered> {
        self.sched().offers_of(profile)
    }

    /// Runs queued per profile.
    pub fn queue_depths(&self) -> std::collections::BTreeMap<String, usize> {
        self.sched().depths()
    }

    /// Why a run waits, as of now: the scheduler's view for queued runs, the stored
    /// reason (pulling, building) once placed.
    pub fn live_reason(&self, run: &Run) -> Option<String> {
        match run.status {
            RunStatus::Pending if !self.has_workers() => Some(self.queued_reason().to_string()),
            RunStatus::Pending => self
                .sched()
                .reason(run.id)
                .or_else(|| run.pending_reason.clone()),
            RunStatus::Starting => run.pending_reason.clone(),
            _ => None,
        }
    }

    /// Aborts a run: kills it and returns once it is gone and recorded `aborted`.
    pub async fn abort(&self, id: RunId) -> anyhow::Result<Option<Run>> {
        self.control(id, RunControl::Abort).await
    }

    /// Stops a run: SIGTERM, `grace`, then kill; recorded `cancelled`.
    pub async fn stop(&self, id: RunId, grace: Duration) -> anyhow::Result<Option<Run>> {
        let grace_ms = grace.as_millis() as u64;
        self.control(id, RunControl::Stop { grace_ms }).await
    }

    /// Carries out an abort or stop. A pending run never ran: it ends here. An active
    /// one is asked through the store: its worker hears it on its next heartbeat (the
    /// embedded worker at once); the answer comes once the run ended, or its lease
    /// expired (the reaper then says the worker was lost).
    async fn control(&self, id: RunId, asked: RunControl) -> anyhow::Result<Option<Run>> {
        let wait_for = match asked {
            RunControl::Stop { grace_ms } => Duration::from_millis(grace_ms),
            RunControl::Abort => Duration::ZERO,
        } + Duration::from_secs(30)
            + self.lease_ttl();
        {
            let _g = self.claim_lock.lock().await;
            let Some(run) = self.store.get_run(id).await? else {
                return Ok(None);
            };
            if run.status.is_terminal() {
                return Ok(Some(run));
            }
            if run.lease.is_none() {
                // No worker holds it (it is pending, or a selection whose children run):
                // it ends here.
                self.sched().remove(id);
                self.hub.notify_all();
                let (status, error) = match asked {
                    RunControl::Abort => (RunStatus::Aborted, "aborted by user"),
                    RunControl::Stop { .. } => (RunStatus::Cancelled, "cancelled by user"),
                };
                let data = TransitionData {
                    error: Some(error.into()),
                    ..Default::default()
                };
                self.store.transition(id, status, data).await?;
                self.hub.notify(id);
                self.deliverer.wake();
                if let Some(parent) = run.parent_id {
                    self.settle_parent(parent).await;
                }
                return Ok(self.store.get_run(id).await?);
            }
            if self.store.request_control(id, asked).await?.is_some() {
                // The embedded worker hears it at once.
                self.beat.notify_one();
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

    /// Keeps a summary of a run's samples with it, and its duration in the platform metrics.
    /// `run` is the run as its end left it.
    async fn summarize(&self, run: &Run) {
        let id = run.id;
        if let (Some(s), Some(e)) = (&run.job_start, &run.job_end) {
            let secs = crate::api::seconds_between(s, Some(e));
            self.stats
                .observe_run(run.job_type.as_str(), run.status.as_str(), secs);
        }
        let (first, last) = stoa_core::time::all_time();
        let samples = match self.store.samples(id, first, last).await {
            Ok(s) => s,
            Err(_) => return,
        };
        // Only a run given GPUs has its GPU samples summarised (`summarize_gpus`).
        let gpu = if run.gpu_ids.is_empty() {
            Vec::new()
        } else {
            self.store
                .gpu_samples(id, first, last)
                .await
                .unwrap_or_default()
        };
        let interval = self.config.metrics.interval_ms as f64 / 1000.0;
        let mut summary = crate::run_metrics::summarize_samples(&samples);
        crate::run_metrics::summarize_gpus(&mut summary, &gpu, run.gpu_ids.len(), run, interval);
        if let Err(e) = self
            .store
            .set_metrics_summary(id, &summary.to_string())
            .await
        {
            tracing::error!(run = %id, error = %e, "storing the metrics summary failed");
        }
    }

    /// Keeps registry credentials of a queued run in memory until its worker pulls.
    pub fn remember_credentials(&self, id: RunId, creds: RegistryCredentials) {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, creds);
    }

    /// The capacities a worker's offer gives, its profiles' GPU needs being the
    /// server's; the field at fault when it names a profile the server does not know.
    fn capacities_of(
        &self,
        offer: &RegisterRequest,
    ) -> Result<Vec<stoa_core::scheduler::ProfileCapacity>, (String, String)> {
        let known = self.config.capacities();
        offer
            .profiles
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let field = format!("profiles[{i}]");
                let cap = known.iter().find(|k| k.name == p.name).ok_or_else(|| {
                    (
                        format!("{field}.name"),
                        format!("the server has no profile {:?}", p.name),
                    )
                })?;
                if p.slots == 0 {
                    return Err((format!("{field}.slots"), "must be at least 1".into()));
                }
                let mut cap = stoa_core::scheduler::ProfileCapacity {
                    slots: p.slots,
                    ..cap.clone()
                };
                if offer.cluster.is_some() {
                    // The cluster manager gives runs their GPUs (`--gres`): none are
                    // handed out here.
                    cap.gpu_count = 0;
                    cap.gpu_shared = false;
                }
                Ok(cap)
            })
            .collect()
    }

    /// Registers a worker that presented a valid join token: it gets its own token
    /// (only its hash is kept) and a place in the scheduler. The field at fault when the
    /// offer does not check out.
    pub async fn register_worker(
        &self,
        mut offer: RegisterRequest,
    ) -> Result<Result<RegisterResponse, (String, String)>, StoreError> {
        let name_ok = !offer.name.is_empty()
            && offer.name.len() <= 63
            && offer
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Ok(Err(("name".into(), "1 to 63 of A-Z a-z 0-9 . _ -".into())));
        }
        if offer.name == EMBEDDED_WORKER || offer.name.starts_with("embedded-") {
            return Ok(Err((
                "name".into(),
                "reserved for the embedded worker".into(),
            )));
        }
        if offer.protocol != "v1" {
            return Ok(Err((
                "protocol".into(),
                format!("this server speaks v1, not {:?}", offer.protocol),
            )));
        }
        let caps = match self.capacities_of(&offer) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        // A name is one worker's: another machine takes it only once the one holding
        // it has not been heard for two leases (it is gone), or with its token.
        let previous_token = offer.previous_token.take();
        let previous = previous_token.as_deref().map(crate::auth::hash_key);
        let existing = self
            .store
            .list_workers()
            .await?
            .into_iter()
            .find(|w| w.name == offer.name);
        if let Some(w) = &existing {
            let quiet = crate::api::seconds_between(&w.last_heard_at, None)
                > 2.0 * self.config.worker.lease_s as f64;
            if !quiet && previous.as_deref() != Some(w.token_hash.as_str()) {
                return Ok(Err((
                    "name".into(),
                    format!(
                        "a worker named {:?} was heard in the last {} s: it registers again with its token (kept in its data directory), or choose another name",
                        offer.name,
                        2 * self.config.worker.lease_s
                    ),
                )));
            }
        }

        // A bridge registering again with its token keeps it: the jobs it left in
        // the cluster call with it. Any other registration gets a new one.
        let token = match (&existing, previous_token) {
            (Some(w), Some(t))
                if offer.cluster.is_some()
                    && previous.as_deref() == Some(w.token_hash.as_str()) =>
            {
                t
            }
            _ => format!("swk_{}", &crate::auth::generate_key()[3..]),
        };
        self.store
            .register_worker(&stoa_store::WorkerRecord {
                name: offer.name.clone(),
                token_hash: crate::auth::hash_key(&token),
                offer: serde_json::to_string(&offer).expect("an offer serialises"),
                registered_at: stoa_core::time::now(),
                last_heard_at: stoa_core::time::now(),
                draining: false,
            })
            .await?;
        // Registering again keeps the draining mark (the store's upsert does too).
        let draining = existing.is_some_and(|w| w.draining);
        {
            let mut s = self.sched();
            s.add_worker(&offer.name, caps, offer.gpus.clone());
            s.set_draining(&offer.name, draining);
        }
        tracing::info!(worker = %offer.name, host = offer.host.as_deref().unwrap_or_default(), "worker registered");
        self.wake();
        self.hub.notify_all();
        Ok(Ok(RegisterResponse {
            worker_token: token,
            lease_s: self.config.worker.lease_s,
            claim_wait_s: self.config.worker.claim_wait_s,
        }))
    }

    /// Follows the fleet as stored: workers removed (`stoa workers remove`) are
    /// forgotten, draining marks (`stoa workers drain`) followed, and workers that
    /// registered with another server sharing the store are known here too (they come
    /// here when that server is gone).
    async fn sync_fleet(&self) {
        // Workers that register while the list is read are not in it: they stay.
        let known_before = self.sched().worker_names();
        let stored = match self.store.list_workers().await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "reading the fleet failed");
                return;
            }
        };
        let mut keep: Vec<&str> = stored.iter().map(|w| w.name.as_str()).collect();
        if let Some(w) = &self.worker {
            keep.push(w);
        }
        let known = self.sched().worker_names();
        let since: Vec<String> = known
            .iter()
            .filter(|n| !known_before.contains(n))
            .cloned()
            .collect();
        keep.extend(since.iter().map(String::as_str));
        let mut added = Vec::new();
        for w in stored.iter().filter(|w| !known.contains(&w.name)) {
            if let Ok(offer) = serde_json::from_str::<RegisterRequest>(&w.offer)
                && let Ok(caps) = self.capacities_of(&offer)
            {
                added.push((w.name.clone(), caps, offer.gpus));
            }
        }
        let mut s = self.sched();
        s.retain_workers(&keep);
        for (name, caps, gpus) in added {
            s.add_worker(&name, caps, gpus);
        }
        for w in &stored {
            s.set_draining(&w.name, w.draining);
        }
    }

    /// Follows a worker's draining mark as stored (`stoa workers drain` writes it).
    pub fn set_draining(&self, worker: &str, draining: bool) {
        self.sched().set_draining(worker, draining);
    }

    /// Resolves when a run may be claimed; made before a claim is tried, so that a run
    /// queued between the try and the wait is not missed.
    pub fn work_signal(&self) -> tokio::sync::futures::Notified<'_> {
        self.fleet_wake.notified()
    }

    /// The next run for `worker`, claimed under a lease, with what it needs.
    pub async fn claim_for(&self, worker: &str) -> Result<Option<Assignment>, PlaneError> {
        loop {
            let run = {
                let _g = self.claim_lock.lock().await;
                self.claim_decided(worker).await
            };
            let Some(run) = run.map_err(|e| self.unavailable(e))? else {
                return Ok(None);
            };
            self.hub.notify(run.id);
            if let Some(a) = self.assignment(run).await? {
                return Ok(Some(a));
            }
        }
    }

    /// A run `worker` holds under `token`, handed over again (`stoa exec` in a Slurm
    /// job gets what its bridge claimed); `None` when the lease does not hold it.
    pub async fn assignment_for(
        &self,
        worker: &str,
        id: RunId,
        token: &str,
    ) -> Result<Option<Assignment>, PlaneError> {
        let run = self
            .store
            .get_run(id)
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(run) = run.filter(|r| {
            !r.status.is_terminal()
                && r.worker_id.as_deref() == Some(worker)
                && r.lease.as_ref().is_some_and(|l| l.token == token)
        }) else {
            return Ok(None);
        };
        self.assignment(run).await
    }

    /// Renews `worker`'s leases.
    pub async fn heartbeat_for(
        &self,
        worker: &str,
        leases: &[(RunId, String)],
    ) -> Result<Vec<(RunId, Directive)>, PlaneError> {
        self.store
            .heartbeat(worker, leases, self.lease_ttl())
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Reads back a worker's error from the store: a full disk is marked as such.
    fn unavailable(&self, e: StoreError) -> PlaneError {
        self.disk.write_failed(&e);
        // A full disk refuses; a database that is away (restarting, unreachable) is
        // waited for.
        if self.disk.is_full() {
            PlaneError::Refused(e.to_string())
        } else {
            PlaneError::Unavailable(e.to_string())
        }
    }

    /// What a worker needs to execute a run it claimed; `None` when it cannot be
    /// executed (its org's secrets do not open), in which case it ended here.
    async fn assignment(&self, run: Run) -> Result<Option<Assignment>, PlaneError> {
        let token = run
            .lease
            .as_ref()
            .map(|l| l.token.clone())
            .unwrap_or_default();
        let secrets = match self.secret_env(&run.org_id).await {
            Ok(s) => s,
            Err(e) => {
                let end = RunEnd {
                    status: RunStatus::SystemFailure,
                    return_code: None,
                    error: Some(format!("the org's secrets could not be read: {e}")),
                    timed_out: false,
                };
                self.finish(run.id, &token, end).await?;
                return Ok(None);
            }
        };
        let org_limit = self.config.limits.output_bytes_per_org;
        let org_output = if org_limit > 0 {
            match self.store.org_output_bytes(&run.org_id).await {
                Ok(used) => Some(OrgOutput {
                    limit: org_limit,
                    used,
                }),
                Err(e) => {
                    tracing::warn!(run = %run.id, error = %e, "reading the org's stored output failed: its limit is not applied to this run");
                    None
                }
            }
        } else {
            None
        };
        let registry = self
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run.id);
        Ok(Some(Assignment {
            id: run.id,
            org_id: run.org_id,
            job_type: run.job_type,
            execution_type: run.execution_type,
            spec: run.spec,
            run_name: run.run_name,
            gpu_ids: run.gpu_ids,
            lease_token: token,
            secrets,
            registry,
            org_output,
        }))
    }
}

/// The embedded worker's control plane: the engine in-process.
#[async_trait]
impl ControlPlane for Engine {
    async fn claim(&self) -> Result<Option<Assignment>, PlaneError> {
        match &self.worker {
            Some(w) => self.claim_for(w).await,
            None => Ok(None),
        }
    }

    async fn heartbeat(
        &self,
        leases: &[(RunId, String)],
    ) -> Result<Vec<(RunId, Directive)>, PlaneError> {
        self.heartbeat_for(self.worker.as_deref().unwrap_or(EMBEDDED_WORKER), leases)
            .await
    }

    async fn append_output(
        &self,
        run: RunId,
        token: &str,
        first: i64,
        pieces: &[OutputPiece],
        at_end: bool,
    ) -> Result<Appended, PlaneError> {
        if self.disk.is_full() && !at_end {
            // Routine output waits while the disk is known to be full: what is left of
            // the reserve is for runs' ends.
            return Err(PlaneError::Refused(
                "the disk under the server's data directory is full".into(),
            ));
        }
        // A worker's own limits keep a run's output below this; room is left for its
        // notices (truncation, lost lines).
        let cap = self
            .config
            .limits
            .max_output_bytes
            .saturating_add(OUTPUT_NOTICE_ROOM);
        let appended = self
            .store
            .append_output_at(run, token, first, pieces, cap)
            .await
            .map_err(|e| self.unavailable(e))?;
        if matches!(appended, Appended::Stored { .. }) {
            self.hub.notify(run);
        }
        Ok(appended)
    }

    async fn progress(&self, run: RunId, token: &str, p: Progress) -> Result<bool, PlaneError> {
        // Running and a phase check the lease in their own statement.
        if !matches!(p, Progress::Running { .. } | Progress::Phase(_))
            && !self
                .store
                .lease_held(run, token)
                .await
                .map_err(|e| self.unavailable(e))?
        {
            return Ok(false);
        }
        let held = match p {
            Progress::Reason(reason) => {
                self.store
                    .set_pending_reason(run, Some(&reason))
                    .await
                    .map_err(|e| self.unavailable(e))?;
                true
            }
            Progress::Phase(phase) => self
                .store
                .add_phase(run, token, &phase)
                .await
                .map_err(|e| self.unavailable(e))?,
            Progress::Running { pgid } => {
                let data = TransitionData {
                    pgid,
                    lease_token: Some(token.to_string()),
                    ..Default::default()
                };
                self.store
                    .transition(run, RunStatus::Running, data)
                    .await
                    .map_err(|e| self.unavailable(e))?
                    .is_some()
            }
            Progress::Truncated => {
                self.store
                    .set_output_truncated(run)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                true
            }
            Progress::SlurmJob(job) => {
                self.store
                    .set_slurm_job(run, &job)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                true
            }
            Progress::Ports(ports) => {
                self.store
                    .set_run_ports(run, &ports)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                true
            }
        };
        self.hub.notify(run);
        Ok(held)
    }

    async fn finish(&self, run: RunId, token: &str, end: RunEnd) -> Result<bool, PlaneError> {
        self.finish_for(
            self.worker.as_deref().unwrap_or(EMBEDDED_WORKER),
            run,
            token,
            end,
        )
        .await
    }

    async fn samples(&self, system: Vec<Sample>, gpus: Vec<GpuSample>) -> Result<(), PlaneError> {
        self.store_samples(system, gpus).await
    }

    async fn org_output_used(&self, org: &OrgId) -> Result<u64, PlaneError> {
        self.store
            .org_output_bytes(org)
            .await
            .map_err(|e| self.unavailable(e))
    }

    fn lease(&self) -> Duration {
        self.lease_ttl()
    }

    async fn work_available(&self) {
        self.wake.notified().await
    }

    async fn control_pending(&self) {
        self.beat.notified().await
    }
}

impl Engine {
    /// Records how a run of `worker` ended, under its lease token; `false` when the
    /// token no longer holds it. Only an end (a terminal state) is taken. The run's
    /// slot and GPUs are freed when the end is stored, or when the run already ended
    /// while this worker held it (the reaper freed them then too).
    pub async fn finish_for(
        &self,
        worker: &str,
        run: RunId,
        token: &str,
        end: RunEnd,
    ) -> Result<bool, PlaneError> {
        if !end.status.is_terminal() {
            return Ok(false);
        }
        let data = TransitionData {
            return_code: end.return_code,
            error: end.error,
            timed_out: end.timed_out,
            lease_token: Some(token.to_string()),
            ..Default::default()
        };
        let ended = self
            .store
            .transition(run, end.status, data)
            .await
            .map_err(|e| self.unavailable(e))?;
        let held = ended.is_some();
        if let Some(r) = ended {
            self.hub.notify(run);
            // Only a run with callback URLs wrote deliveries to the outbox.
            if !r.callback_urls.is_empty() {
                self.deliverer.wake();
            }
            if let Some(parent) = r.parent_id {
                self.settle_parent(parent).await;
            }
            self.summarize(&r).await;
        } else {
            let gone = self
                .store
                .get_run(run)
                .await
                .map_err(|e| self.unavailable(e))?
                .is_none_or(|r| r.status.is_terminal() && r.worker_id.as_deref() == Some(worker));
            if !gone {
                // Not this worker's end to record: nothing is freed.
                return Ok(false);
            }
        }
        // Its slot and GPUs are free: the next run may start, and the queue moved.
        self.sched().finish(run);
        self.wake();
        if !held {
            // Its readers were told of the end as it was stored (if it was stored here).
            self.hub.notify(run);
        }
        self.hub.queue_moved();
        Ok(held)
    }

    /// Stores samples a worker took.
    pub async fn store_samples(
        &self,
        system: Vec<Sample>,
        gpus: Vec<GpuSample>,
    ) -> Result<(), PlaneError> {
        if !system.is_empty() {
            self.store
                .insert_samples(system)
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        let mut by_run: HashMap<RunId, Vec<GpuSample>> = HashMap::new();
        for g in gpus {
            if let Some(id) = g.run_id {
                by_run.entry(id).or_default().push(g);
            }
        }
        for (id, samples) in by_run {
            self.store
                .insert_gpu_samples(id, samples)
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        Ok(())
    }
}
