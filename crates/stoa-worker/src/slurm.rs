//! The Slurm bridge (`stoa worker --slurm`): a worker that executes nothing itself. It
//! claims runs of the profiles it serves and submits each as a Slurm job (`sbatch`),
//! whose batch script runs `stoa exec` on the node Slurm chose; `stoa exec` asks the
//! server for the run under its lease and executes it like any worker (output,
//! heartbeats, samples, its end).
//!
//! The bridge follows its jobs with one `squeue` per poll for all of them, never one
//! call per run: while Slurm holds a job pending, the run's pending reason is Slurm's
//! (`Slurm: Resources`); a job that Slurm ended without `stoa exec` reporting the run's
//! end (its time limit, a node failure, an admin's `scancel`) ends the run with the
//! state that matches. An abort is `scancel`; a stop is `scancel --signal=TERM --batch`,
//! which signals the batch script's process alone, that is `stoa exec` (the script
//! `exec`s it): it asks the server why and stops the run with its grace period, as any
//! worker does, sparing the sandbox's launcher (which dies on SIGTERM and would take
//! the run down before its handler finished); then `scancel` once the grace period
//! passed.
//!
//! Invariants:
//! - A run is submitted at most once: its lease token and job id are kept in
//!   `DATA_DIR/slurm/<run>.json` (mode 0600) before and after `sbatch`, and a bridge
//!   that restarts finds its jobs again by name (`stoa-<run id>`) before it submits
//!   anything it holds.
//! - The lease token reaches the job in its environment, never on a command line:
//!   `sbatch` runs with only the job's variables, the named ones of the bridge's and
//!   Slurm's own (`SLURM_*`, `SBATCH_*`), and exports all of that (`--export=ALL`). A
//!   list of names (`--export=A,B`) would have Slurm load the user's login environment
//!   on the node first (`--get-user-env`), which costs 0.1 to 1.2 s per job.
//! - The bridge writes a run's end only when Slurm says its job ended (or it is gone
//!   from Slurm) and `stoa exec` did not write one within `slurm.end_grace_s`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stoa_config::{SlurmConfig, SlurmProfile};
use stoa_core::plane::{Assignment, ControlPlane, Directive, Progress, RunControl, RunEnd};
use stoa_types::{RunId, RunStatus};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

/// The prefix of the name of every job the bridge submits (`stoa-<run id>`).
pub const JOB_PREFIX: &str = "stoa-";

/// What each job runs on its node, and how it reaches the server.
#[derive(Debug, Clone)]
pub struct ExecSetup {
    /// The `stoa` binary on the nodes.
    pub binary: PathBuf,
    /// The config file `stoa exec` reads there.
    pub config: Option<PathBuf>,
    /// The servers `stoa exec` calls.
    pub servers: Vec<String>,
    /// The bridge's worker token (`stoa exec` calls as the bridge).
    pub worker_token: String,
    /// A CA certificate for an `https://` server.
    pub ca_file: Option<PathBuf>,
    pub lease_s: u64,
    /// Names of the bridge's environment variables its jobs get (`--export`).
    pub export_env: Vec<String>,
}

/// What the bridge keeps of a run on its disk, so that a restart neither loses nor
/// submits it twice.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    run: RunId,
    lease_token: String,
    profile: String,
    timeout_s: i64,
    /// The Slurm job, once submitted.
    job: Option<String>,
}

/// A run the bridge holds.
#[derive(Debug)]
struct Job {
    kept: Kept,
    /// Slurm's state of the job when last read (`PENDING`, `RUNNING`, ...).
    state: Option<String>,
    /// The pending reason last reported.
    reason: Option<String>,
    /// An abort or stop Stoa asked for, carried out at that instant.
    asked: Option<(RunControl, Instant)>,
    /// A stop whose grace period passed: its job was cancelled.
    stop_enforced: bool,
    /// When the job was first seen ended (or gone) with the run still held.
    ended_at: Option<Instant>,
    /// `sbatch` of it is under way: the queue is not read for it meanwhile.
    submitting: bool,
    /// Read back from the bridge's disk at its start (a run kept without a job is
    /// submitted only then).
    restored: bool,
}

impl Job {
    fn new(kept: Kept, restored: bool) -> Self {
        Job {
            kept,
            state: None,
            reason: None,
            asked: None,
            stop_enforced: false,
            ended_at: None,
            submitting: false,
            restored,
        }
    }
}

/// One job as `squeue` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedJob {
    pub id: String,
    pub name: String,
    /// `PENDING`, `RUNNING`, `COMPLETING`, `COMPLETED`, `CANCELLED`, `TIMEOUT`, ...
    pub state: String,
    /// Slurm's reason (`Resources`, `Priority`, `None`, ...).
    pub reason: String,
    pub nodes: String,
}

/// The `squeue` format the bridge reads (`|`-separated: id, state, reason, nodes,
/// name; the name last, as the only field a user chooses, `|` included).
const SQUEUE_FORMAT: &str = "%i|%T|%r|%N|%j";

/// Reads `squeue -h -o SQUEUE_FORMAT` output.
pub fn parse_squeue(out: &str) -> Vec<QueuedJob> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(5, '|');
            Some(QueuedJob {
                id: f.next()?.trim().to_string(),
                state: f.next()?.trim().to_string(),
                reason: f.next()?.trim().to_string(),
                nodes: f.next()?.trim().to_string(),
                name: f.next()?.trim().to_string(),
            })
        })
        .filter(|j| !j.id.is_empty())
        .collect()
}

/// The job id in `sbatch --parsable`'s answer (`ID` or `ID;CLUSTER`).
pub fn parsable_job_id(out: &str) -> String {
    out.trim().split(';').next().unwrap_or_default().to_string()
}

/// True while Slurm still has the job's processes (or will start them).
fn is_live(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "CONFIGURING"
            | "RUNNING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "STOPPED"
    )
}

/// The run's end when Slurm ended its job without `stoa exec` reporting one: from the
/// job's final state (`None`: the job is gone from Slurm), what Stoa asked for, and who
/// cancelled it when Slurm's accounting says.
pub fn end_from_slurm(
    job: &str,
    state: Option<&str>,
    asked: Option<RunControl>,
    cancelled_by: Option<&str>,
) -> RunEnd {
    let end = |status, error: String, timed_out| RunEnd {
        status,
        return_code: None,
        error: Some(error),
        timed_out,
    };
    match (asked, state) {
        (Some(RunControl::Abort), _) => end(RunStatus::Aborted, "aborted by user".into(), false),
        (Some(RunControl::Stop { .. }), _) => {
            end(RunStatus::Cancelled, "cancelled by user".into(), false)
        }
        (None, Some("TIMEOUT")) => end(
            RunStatus::Failed,
            format!("Slurm: TIMEOUT: job {job} passed its time limit"),
            true,
        ),
        (None, Some("NODE_FAIL")) => end(
            RunStatus::SystemFailure,
            format!("Slurm: NODE_FAIL: the node of job {job} failed"),
            false,
        ),
        (None, Some("OUT_OF_MEMORY")) => RunEnd {
            return_code: Some(137),
            ..end(
                RunStatus::Failed,
                format!("Slurm: OUT_OF_MEMORY: job {job} ran out of memory"),
                false,
            )
        },
        (None, Some("CANCELLED")) => end(
            RunStatus::Aborted,
            match cancelled_by {
                Some(who) => {
                    format!("Slurm: CANCELLED by {who}: job {job} was cancelled outside Stoa")
                }
                None => format!(
                    "Slurm: CANCELLED: job {job} was cancelled outside Stoa (scancel by an administrator or the job's owner)"
                ),
            },
            false,
        ),
        (None, Some(s @ ("PREEMPTED" | "BOOT_FAIL" | "DEADLINE" | "REVOKED"))) => end(
            RunStatus::SystemFailure,
            format!("Slurm: {s}: job {job} ended before the run could"),
            false,
        ),
        (None, Some(s)) => end(
            RunStatus::SystemFailure,
            format!(
                "Slurm: job {job} ended ({s}) without stoa exec reporting the run's end (see the job's log on its node)"
            ),
            false,
        ),
        (None, None) => end(
            RunStatus::SystemFailure,
            format!("Slurm: job {job} is gone from Slurm without the run's end"),
            false,
        ),
    }
}

/// The `sbatch` options of a profile's jobs.
pub fn profile_args(p: &SlurmProfile) -> Vec<String> {
    let mut a = Vec::new();
    let mut opt = |flag: &str, v: &Option<String>| {
        if let Some(v) = v {
            a.push(format!("--{flag}={v}"));
        }
    };
    opt("partition", &p.partition);
    opt("gres", &p.gres);
    opt("gpus", &p.gpus);
    opt("cpus-per-task", &p.cpus_per_task.map(|c| c.to_string()));
    opt("mem", &p.mem);
    opt("constraint", &p.constraint);
    opt("account", &p.account);
    opt("qos", &p.qos);
    a.extend(p.extra_args.iter().cloned());
    a
}

/// `--time` of a run's job in minutes: its timeout plus the margin, rounded up.
pub fn time_limit_minutes(timeout_s: i64, margin_s: u64) -> u64 {
    (timeout_s.max(1) as u64 + margin_s).div_ceil(60).max(1)
}

/// Runs a Slurm command; its stdout, or its stderr (or why it could not run) as the
/// error.
async fn slurm(
    cmd: &str,
    args: &[String],
    stdin: Option<&str>,
    env: &[(&str, String)],
) -> Result<String, String> {
    run_slurm(tokio::process::Command::new(cmd), cmd, args, stdin, env).await
}

/// Like [`slurm`], with `env` as the command's whole environment.
async fn slurm_only_env(
    cmd: &str,
    args: &[String],
    stdin: Option<&str>,
    env: &[(&str, String)],
) -> Result<String, String> {
    let mut c = tokio::process::Command::new(cmd);
    c.env_clear();
    run_slurm(c, cmd, args, stdin, env).await
}

async fn run_slurm(
    mut c: tokio::process::Command,
    cmd: &str,
    args: &[String],
    stdin: Option<&str>,
    env: &[(&str, String)],
) -> Result<String, String> {
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .map_err(|e| format!("{cmd} could not be started: {e}"))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .await
            .map_err(|e| format!("writing to {cmd}: {e}"))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .map_err(|_| format!("{cmd} did not answer within 60 s"))?
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(format!("{cmd} failed ({}): {err}", out.status))
    }
}

/// The cluster's name (`ClusterName` of `scontrol show config`).
pub async fn cluster_name() -> Result<String, String> {
    let out = slurm("scontrol", &["show".into(), "config".into()], None, &[]).await?;
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "ClusterName").then(|| v.trim().to_string())
        })
        .ok_or_else(|| "scontrol show config names no ClusterName".into())
}

/// Quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The bridge.
pub struct Bridge {
    plane: Arc<dyn ControlPlane>,
    cfg: SlurmConfig,
    exec: ExecSetup,
    /// `DATA_DIR/slurm`: a file per run held.
    state_dir: PathBuf,
    jobs: Mutex<HashMap<RunId, Job>>,
}

impl Bridge {
    /// A bridge claiming from `plane`; the runs an earlier incarnation held are read
    /// back from `data_dir`.
    pub fn new(
        plane: Arc<dyn ControlPlane>,
        cfg: SlurmConfig,
        exec: ExecSetup,
        data_dir: &std::path::Path,
    ) -> std::io::Result<Self> {
        let state_dir = data_dir.join("slurm");
        std::fs::create_dir_all(&state_dir)?;
        let mut jobs = HashMap::new();
        for e in std::fs::read_dir(&state_dir)?.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            match serde_json::from_str::<Kept>(&text) {
                Ok(kept) => {
                    jobs.insert(kept.run, Job::new(kept, true));
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "an unreadable record of a held run is left alone")
                }
            }
        }
        if !jobs.is_empty() {
            tracing::info!(
                runs = jobs.len(),
                "runs held before the restart are followed again"
            );
        }
        Ok(Bridge {
            plane,
            cfg,
            exec,
            state_dir,
            jobs: Mutex::new(jobs),
        })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keep(&self, k: &Kept) -> std::io::Result<()> {
        let path = self.state_dir.join(format!("{}.json", k.run));
        stoa_config::write_private(&path, &serde_json::to_string(k).expect("serialises"))
    }

    fn forget(&self, id: RunId) {
        self.jobs().remove(&id);
        let _ = std::fs::remove_file(self.state_dir.join(format!("{id}.json")));
    }

    /// Claims and submits runs while it has room (`slurm.max_jobs`), and follows its
    /// jobs, until `stopping` flips. Jobs in Slurm stay there: a bridge that starts
    /// again follows them.
    pub async fn serve(self: Arc<Self>, mut stopping: watch::Receiver<bool>) {
        let follow = tokio::spawn(self.clone().follow_loop());
        loop {
            if *stopping.borrow() {
                break;
            }
            if self.jobs().len() >= self.cfg.max_jobs.max(1) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(self.cfg.poll_interval_ms.max(100))) => {}
                    _ = stopping.changed() => break,
                }
                continue;
            }
            let claimed = tokio::select! {
                c = self.plane.claim() => c,
                _ = stopping.changed() => break,
            };
            match claimed {
                Ok(Some(run)) => self.submit_claimed(run).await,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "claiming a run failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stopping.changed() => break,
                    }
                }
            }
        }
        follow.abort();
    }

    /// Keeps a claimed run, then submits it.
    async fn submit_claimed(&self, run: Assignment) {
        let timeout_s = serde_json::from_str::<serde_json::Value>(&run.spec)
            .ok()
            .and_then(|v| v["timeout"].as_i64())
            .unwrap_or(600);
        let kept = Kept {
            run: run.id,
            lease_token: run.lease_token.clone(),
            profile: run.execution_type.clone(),
            timeout_s,
            job: None,
        };
        if let Err(e) = self.keep(&kept) {
            tracing::error!(run = %run.id, error = %e, "keeping a claimed run failed");
            self.end(
                run.id,
                &run.lease_token,
                RunEnd {
                    status: RunStatus::SystemFailure,
                    return_code: None,
                    error: Some(format!(
                        "the Slurm bridge could not keep the run on its disk: {e}"
                    )),
                    timed_out: false,
                },
            )
            .await;
            return;
        }
        self.jobs().insert(run.id, Job::new(kept.clone(), false));
        self.submit(kept).await;
    }

    /// Submits a kept run as a Slurm job and records the job.
    async fn submit(&self, kept: Kept) {
        let id = kept.run;
        match self.jobs().get_mut(&id) {
            Some(j) if !j.submitting => j.submitting = true,
            _ => return,
        }
        let Some(profile) = self.cfg.profiles.iter().find(|p| p.name == kept.profile) else {
            let end = RunEnd {
                status: RunStatus::SystemFailure,
                return_code: None,
                error: Some(format!(
                    "the Slurm bridge serves no profile {:?}",
                    kept.profile
                )),
                timed_out: false,
            };
            self.end(id, &kept.lease_token, end).await;
            return;
        };
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name={JOB_PREFIX}{id}"),
            format!("--comment=stoa-run={id}"),
            "--no-requeue".into(),
            format!(
                "--time={}",
                time_limit_minutes(kept.timeout_s, self.cfg.time_margin_s)
            ),
            format!("--output={}", self.cfg.job_log),
            "--chdir=/".into(),
        ];
        let env = [
            ("STOA_SERVER", self.exec.servers.join(",")),
            ("STOA_EXEC_RUN", id.to_string()),
            ("STOA_EXEC_LEASE", kept.lease_token.clone()),
            ("STOA_EXEC_WORKER_TOKEN", self.exec.worker_token.clone()),
            ("STOA_EXEC_LEASE_S", self.exec.lease_s.to_string()),
            (
                "STOA_EXEC_CA_FILE",
                self.exec
                    .ca_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ];
        // Only these variables reach the job: sbatch runs with them alone and exports
        // its whole environment (the lease token in it, never on a command line).
        let named: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| {
                k == "PATH"
                    || k.starts_with("SLURM_")
                    || k.starts_with("SBATCH_")
                    || self.exec.export_env.iter().any(|n| n == k)
            })
            .collect();
        // The job's own last: a variable of the bridge's never replaces one of them.
        let mut job_env: Vec<(&str, String)> =
            named.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        job_env.extend(env);
        let env = job_env;
        args.push("--export=ALL".into());
        args.extend(profile_args(profile));
        let mut script = format!(
            "#!/bin/sh\n# Stoa run {id}\nexec {} exec --data-dir {}",
            sh_quote(&self.exec.binary.to_string_lossy()),
            sh_quote(&self.cfg.node_data_dir.to_string_lossy()),
        );
        if let Some(c) = &self.exec.config {
            script.push_str(&format!(" --config {}", sh_quote(&c.to_string_lossy())));
        }
        script.push('\n');
        match slurm_only_env("sbatch", &args, Some(&script), &env).await {
            Ok(out) => {
                let job = parsable_job_id(&out);
                tracing::info!(run = %id, job = %job, "submitted to Slurm");
                if !self.record_job(id, &job).await {
                    // It ended meanwhile (aborted, reaped): its job goes.
                    let _ = scancel(&job, None).await;
                    return;
                }
                let _ = self
                    .plane
                    .progress(
                        id,
                        &kept.lease_token,
                        Progress::Reason(format!("Slurm: submitted as job {job}")),
                    )
                    .await;
            }
            Err(e) => {
                if let Some(j) = self.jobs().get_mut(&id) {
                    j.submitting = false;
                }
                tracing::error!(run = %id, error = %e, "sbatch refused the run's job");
                let end = RunEnd {
                    status: RunStatus::SystemFailure,
                    return_code: None,
                    error: Some(format!("Slurm did not take the run's job: {e}")),
                    timed_out: false,
                };
                self.end(id, &kept.lease_token, end).await;
            }
        }
    }

    /// Writes a run's end (retried while the server is away) and forgets the run.
    async fn end(&self, id: RunId, token: &str, end: RunEnd) {
        let mut delay = Duration::from_millis(200);
        for _ in 0..10 {
            match self.plane.finish(id, token, end.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(run = %id, error = %e, "storing the run's end failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.forget(id);
    }

    /// Every `slurm.poll_interval_ms`: reads Slurm's queue once and acts on what
    /// changed; and on a timer of its own (a slow Slurm never holds it up), renews the
    /// leases and hears controls.
    async fn follow_loop(self: Arc<Self>) {
        let every = Duration::from_millis(self.cfg.poll_interval_ms.max(100));
        let leases = async {
            loop {
                self.hear_controls().await;
                tokio::time::sleep(every).await;
            }
        };
        let queue = async {
            loop {
                self.read_queue().await;
                tokio::time::sleep(every).await;
            }
        };
        tokio::join!(leases, queue);
    }

    /// Reads Slurm's queue once and acts on each held run's job.
    async fn read_queue(&self) {
        let listed = match slurm(
            "squeue",
            &[
                "-h".into(),
                // Its own jobs, in every partition, whatever their state.
                "--me".into(),
                "-a".into(),
                "--states=all".into(),
                "-o".into(),
                SQUEUE_FORMAT.into(),
            ],
            None,
            &[],
        )
        .await
        {
            Ok(out) => parse_squeue(&out),
            Err(e) => {
                tracing::warn!(error = %e, "reading Slurm's queue failed");
                return;
            }
        };
        // Runs being submitted now are not in this listing yet.
        let held: Vec<(RunId, bool)> = self
            .jobs()
            .iter()
            .filter(|(_, j)| !j.submitting)
            .map(|(id, j)| (*id, j.restored))
            .collect();
        for (id, restored) in held {
            let name = format!("{JOB_PREFIX}{id}");
            let kept_job = self.jobs().get(&id).and_then(|j| j.kept.job.clone());
            // The job kept for it; without one (a restart between sbatch and keeping its
            // answer), the job Slurm has by its name.
            let named: Vec<&QueuedJob> = listed.iter().filter(|q| q.name == name).collect();
            let queued = match &kept_job {
                Some(k) => named.iter().find(|q| &q.id == k).copied(),
                None => named
                    .iter()
                    .find(|q| is_live(&q.state))
                    .or(named.first())
                    .copied(),
            };
            match (queued, kept_job) {
                (Some(q), kept) => {
                    if kept.is_none() {
                        tracing::info!(run = %id, job = %q.id, "found the run's Slurm job again");
                        self.record_job(id, &q.id).await;
                    }
                    self.observe(id, q).await;
                }
                (None, None) if restored => {
                    // Kept but never submitted (the bridge stopped in between), and
                    // still held.
                    let kept = self.jobs().get(&id).map(|j| j.kept.clone());
                    if let Some(k) = kept
                        && self
                            .still_held(id, &k.lease_token)
                            .await
                            .is_ok_and(|held| held)
                    {
                        tracing::info!(run = %id, "submitting a held run that has no Slurm job");
                        self.submit(k).await;
                    }
                }
                // Submitted by this incarnation: its job is listed on a later read.
                (None, None) => {}
                (None, Some(job)) => self.ended(id, &job, None).await,
            }
        }
    }

    /// Records the Slurm job of a held run (submitted, or found by name after a
    /// restart): in memory, on disk and in the run's record. False when the run is no
    /// longer held.
    async fn record_job(&self, id: RunId, job: &str) -> bool {
        let kept = {
            let mut jobs = self.jobs();
            let Some(j) = jobs.get_mut(&id) else {
                return false;
            };
            j.kept.job = Some(job.to_string());
            j.submitting = false;
            j.kept.clone()
        };
        if let Err(e) = self.keep(&kept) {
            tracing::error!(run = %id, error = %e, "keeping the run's Slurm job failed (a restart finds it by name)");
        }
        let _ = self
            .plane
            .progress(id, &kept.lease_token, Progress::SlurmJob(job.to_string()))
            .await;
        true
    }

    /// Whether the bridge still holds run `id` (a heartbeat of it alone; its lease is
    /// renewed).
    async fn still_held(
        &self,
        id: RunId,
        token: &str,
    ) -> Result<bool, stoa_core::plane::PlaneError> {
        let d = self.plane.heartbeat(&[(id, token.to_string())]).await?;
        Ok(d.first().is_some_and(|(_, d)| *d != Directive::Lost))
    }

    /// Acts on a job's state as listed.
    async fn observe(&self, id: RunId, q: &QueuedJob) {
        let (token, reason_before, asked, enforced) = {
            let mut jobs = self.jobs();
            let Some(j) = jobs.get_mut(&id) else {
                return;
            };
            j.state = Some(q.state.clone());
            if is_live(&q.state) {
                // Seen ended (or missing) once, listed live again: a blip.
                j.ended_at = None;
            }
            (
                j.kept.lease_token.clone(),
                j.reason.clone(),
                j.asked,
                j.stop_enforced,
            )
        };
        if !is_live(&q.state) {
            self.ended(id, &q.id, Some(&q.state)).await;
            return;
        }
        let reason = match q.state.as_str() {
            "PENDING" => Some(match q.reason.as_str() {
                "" | "None" => "Slurm: queued".to_string(),
                r => format!("Slurm: {r}"),
            }),
            "RUNNING" | "CONFIGURING" => Some(format!(
                "Slurm: job {} started on {}",
                q.id,
                if q.nodes.is_empty() {
                    "a node"
                } else {
                    &q.nodes
                }
            )),
            _ => None,
        };
        if let Some(r) = reason
            && reason_before.as_deref() != Some(r.as_str())
        {
            if let Some(j) = self.jobs().get_mut(&id) {
                j.reason = Some(r.clone());
            }
            let _ = self.plane.progress(id, &token, Progress::Reason(r)).await;
        }
        // A stop whose grace period passed: the job goes (the run still ends
        // `cancelled`).
        if let Some((RunControl::Stop { grace_ms }, at)) = asked
            && !enforced
            && at.elapsed()
                >= Duration::from_millis(grace_ms) + Duration::from_secs(self.cfg.stop_margin_s)
        {
            if let Err(e) = scancel(&q.id, None).await {
                tracing::warn!(run = %id, job = %q.id, error = %e, "cancelling the stopped job failed");
            }
            if let Some(j) = self.jobs().get_mut(&id) {
                j.stop_enforced = true;
            }
        }
    }

    /// A job Slurm ended (`state`), or that is gone from Slurm (`None`): once
    /// `slurm.end_grace_s` passed without `stoa exec` writing the run's end, the bridge
    /// writes it from Slurm's state.
    async fn ended(&self, id: RunId, job: &str, state: Option<&str>) {
        let (first, since, token, asked) = {
            let mut jobs = self.jobs();
            let Some(j) = jobs.get_mut(&id) else {
                return;
            };
            let first = j.ended_at.is_none();
            let since = *j.ended_at.get_or_insert_with(Instant::now);
            (first, since, j.kept.lease_token.clone(), j.asked)
        };
        if first || since.elapsed() < Duration::from_secs(self.cfg.end_grace_s) {
            return;
        }
        // Did `stoa exec` write it meanwhile? Then the lease is gone.
        match self.still_held(id, &token).await {
            Ok(false) => {
                self.forget(id);
                return;
            }
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(run = %id, error = %e, "asking whether the run ended failed");
                return;
            }
        }
        let cancelled_by = if state == Some("CANCELLED") && asked.is_none() {
            cancelled_by(job).await
        } else {
            None
        };
        let mut end = end_from_slurm(job, state, asked.map(|(c, _)| c), cancelled_by.as_deref());
        // The last words of the job's log, when the bridge can read it (the node is
        // this machine, or the log is on a shared filesystem).
        if end.status == RunStatus::SystemFailure
            && let Some(last) = last_log_line(&self.cfg.job_log.replace("%j", job))
        {
            end.error = end.error.map(|e| format!("{e}; its log ends: {last}"));
        }
        tracing::info!(run = %id, job = %job, state = state.unwrap_or("gone"), status = %end.status, "the run's Slurm job ended without its end; writing it");
        self.end(id, &token, end).await;
    }

    /// Renews the leases of all runs held, and carries out what the answers say.
    async fn hear_controls(&self) {
        let leases: Vec<(RunId, String)> = self
            .jobs()
            .iter()
            .map(|(id, j)| (*id, j.kept.lease_token.clone()))
            .collect();
        if leases.is_empty() {
            return;
        }
        let answers = match self.plane.heartbeat(&leases).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "renewing the leases of the bridge's runs failed");
                return;
            }
        };
        for (id, d) in answers {
            let (job, state, asked, token) = {
                let jobs = self.jobs();
                let Some(j) = jobs.get(&id) else {
                    continue;
                };
                (
                    j.kept.job.clone(),
                    j.state.clone(),
                    j.asked,
                    j.kept.lease_token.clone(),
                )
            };
            match d {
                Directive::Continue => {}
                Directive::Lost => {
                    // Ended elsewhere: by `stoa exec` (its job ends by itself), or
                    // reaped (a `stoa exec` hears it and kills the run): a job that
                    // never started goes.
                    if let Some(job) = &job
                        && state.as_deref().is_none_or(|s| s == "PENDING")
                    {
                        let _ = scancel(job, None).await;
                    }
                    self.forget(id);
                }
                Directive::Control(c) if asked.is_none() => {
                    if let Some(j) = self.jobs().get_mut(&id) {
                        j.asked = Some((c, Instant::now()));
                    }
                    let running = state.as_deref().is_some_and(|s| s != "PENDING");
                    match (&job, running) {
                        (Some(job), true) => {
                            // `stoa exec` hears the signal, asks the server why, and
                            // ends the run as asked (a stop with its grace period).
                            let signal = match c {
                                RunControl::Abort => None,
                                RunControl::Stop { .. } => Some("TERM"),
                            };
                            tracing::info!(run = %id, job = %job, control = ?c, "cancelling the run's Slurm job");
                            if let Err(e) = scancel(job, signal).await {
                                tracing::warn!(run = %id, job = %job, error = %e, "scancel failed");
                            }
                        }
                        (job, _) => {
                            // Not started in Slurm: it ends here.
                            if let Some(job) = job
                                && let Err(e) = scancel(job, None).await
                            {
                                tracing::warn!(run = %id, job = %job, error = %e, "scancel failed");
                            }
                            let end = end_from_slurm(
                                job.as_deref().unwrap_or("-"),
                                Some("PENDING"),
                                Some(c),
                                None,
                            );
                            self.end(id, &token, end).await;
                        }
                    }
                }
                Directive::Control(_) => {}
            }
        }
    }
}

/// The last non-empty line of a job's log, when it can be read from here.
fn last_log_line(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    Some(line.chars().take(300).collect())
}

/// `scancel` of a job: all of it, or `signal` to the batch script's process alone
/// (`stoa exec`), none of its children.
async fn scancel(job: &str, signal: Option<&str>) -> Result<String, String> {
    let mut args = Vec::new();
    if let Some(s) = signal {
        args.push(format!("--signal={s}"));
        args.push("--batch".into());
    }
    args.push(job.to_string());
    slurm("scancel", &args, None, &[]).await
}

/// Who cancelled a job, when Slurm's accounting is on (`CANCELLED by 1000` in
/// `sacct`): `uid N (name)`.
async fn cancelled_by(job: &str) -> Option<String> {
    let out = slurm(
        "sacct",
        &[
            "-n".into(),
            "-X".into(),
            "-P".into(),
            "-j".into(),
            job.into(),
            "-o".into(),
            "State".into(),
        ],
        None,
        &[],
    )
    .await
    .ok()?;
    let uid = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("CANCELLED by "))?
        .trim()
        .to_string();
    let name = nix_user(&uid);
    Some(match name {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    })
}

/// The name of user `uid` from the password database.
fn nix_user(uid: &str) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2) == Some(&uid)).then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_are_read() {
        let out = "12|PENDING|Resources||stoa-abc\n13|RUNNING|None|vm|a|b|CANCELLED\n\n";
        let jobs = parse_squeue(out);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].reason, "Resources");
        assert_eq!(jobs[0].name, "stoa-abc");
        assert_eq!(jobs[1].nodes, "vm");
        // A name with `|` in it fakes no field.
        assert_eq!(
            (jobs[1].state.as_str(), jobs[1].name.as_str()),
            ("RUNNING", "a|b|CANCELLED")
        );
    }

    #[test]
    fn slurm_states_map_to_run_ends() {
        let e = end_from_slurm("7", Some("TIMEOUT"), None, None);
        assert_eq!((e.status, e.timed_out), (RunStatus::Failed, true));
        assert!(e.error.unwrap().starts_with("Slurm: TIMEOUT"));
        let e = end_from_slurm("7", Some("NODE_FAIL"), None, None);
        assert_eq!(e.status, RunStatus::SystemFailure);
        let e = end_from_slurm("7", Some("CANCELLED"), None, Some("uid 0"));
        assert_eq!(e.status, RunStatus::Aborted);
        assert!(e.error.unwrap().contains("by uid 0"));
        let e = end_from_slurm("7", Some("OUT_OF_MEMORY"), None, None);
        assert_eq!((e.status, e.return_code), (RunStatus::Failed, Some(137)));
        let e = end_from_slurm("7", Some("CANCELLED"), Some(RunControl::Abort), None);
        assert_eq!(e.status, RunStatus::Aborted);
        let e = end_from_slurm("7", None, None, None);
        assert!(e.error.unwrap().contains("gone from Slurm"));
    }

    #[test]
    fn a_time_limit_covers_the_timeout_and_margin() {
        assert_eq!(time_limit_minutes(60, 60), 2);
        assert_eq!(time_limit_minutes(61, 60), 3);
        assert_eq!(time_limit_minutes(1, 0), 1);
    }

    #[test]
    fn profile_options_become_sbatch_flags() {
        let p = SlurmProfile {
            name: "gpu.h200".into(),
            partition: Some("gpu".into()),
            gres: Some("gpu:h200:1".into()),
            cpus_per_task: Some(8),
            extra_args: vec!["--exclusive".into()],
            ..Default::default()
        };
        assert_eq!(
            profile_args(&p),
            vec![
                "--partition=gpu",
                "--gres=gpu:h200:1",
                "--cpus-per-task=8",
                "--exclusive"
            ]
        );
    }
}
