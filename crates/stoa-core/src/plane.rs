//! The control plane as a worker sees it: the one interface between a worker, which
//! executes runs, and the control plane, which queues, stores and serves them.
//!
//! A worker claims a run and gets an [`Assignment`] (the run, its lease token and what
//! it needs to execute: the org's secrets decrypted, registry credentials); from then on
//! every write it makes names that token, so a worker that lost its lease writes
//! nothing. Output is numbered by the worker: an append names the number of its first
//! piece, a piece sent twice is stored once, and a gap is refused with the number
//! expected. The embedded worker talks to the control plane in-process; an agent on
//! another machine does so over HTTP. Both go through this trait.

use std::time::Duration;

use async_trait::async_trait;
use stoa_types::{OrgId, RunId, RunStatus};

use crate::RegistryCredentials;

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
    /// Lines written by Stoa itself (warnings, truncation notices).
    System,
}

impl OutputStream {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
            OutputStream::System => "system",
        }
    }

    /// Reads a stored name (anything unknown is stdout).
    pub fn parse(s: &str) -> Self {
        match s {
            "stderr" => OutputStream::Stderr,
            "system" => OutputStream::System,
            _ => OutputStream::Stdout,
        }
    }
}

/// A piece of output to store (normally one line, with its newline).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPiece {
    pub stream: OutputStream,
    /// The compose service it came from.
    pub service: Option<String>,
    pub content: String,
}

impl From<(OutputStream, String)> for OutputPiece {
    fn from((stream, content): (OutputStream, String)) -> Self {
        OutputPiece {
            stream,
            service: None,
            content,
        }
    }
}

/// One system sample of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub run_id: RunId,
    /// RFC 3339.
    pub ts: String,
    pub cpu_percent: f64,
    pub ram_used: i64,
    pub ram_total: i64,
}

/// One reading of one GPU given to a run (fields the GPU reported).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuSample {
    pub run_id: Option<RunId>,
    pub ts: String,
    pub gpu: i64,
    /// utilisation %, memory utilisation %, memory used (bytes), temperature (°C),
    /// power (W), power limit (W), SM clock (MHz), memory clock (MHz), PCIe rx, tx (B/s).
    pub values: [Option<f64>; 10],
}

/// What the control plane asks of a running run; its worker hears it on its next
/// heartbeat (at once in-process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunControl {
    /// Kill now; the run ends `aborted`.
    Abort,
    /// SIGTERM, then kill after the grace period; the run ends `cancelled`.
    Stop { grace_ms: u64 },
}

impl RunControl {
    /// The stored form: `abort` or `stop:<grace in ms>`.
    pub fn to_stored(self) -> String {
        match self {
            RunControl::Abort => "abort".into(),
            RunControl::Stop { grace_ms } => format!("stop:{grace_ms}"),
        }
    }

    /// Reads the stored form back.
    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once(':') {
            None if s == "abort" => Some(RunControl::Abort),
            Some(("stop", ms)) => ms
                .parse()
                .ok()
                .map(|grace_ms| RunControl::Stop { grace_ms }),
            _ => None,
        }
    }
}

/// A heartbeat's answer for one run the worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Keep going: the lease was renewed.
    Continue,
    /// Renewed, and the run is to be aborted or stopped.
    Control(RunControl),
    /// The worker no longer holds the run (its lease expired and it was reaped, or it
    /// ended elsewhere): kill what is left of it and write nothing more.
    Lost,
}

/// The org's limit on stored output, when it has one, and what it holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgOutput {
    /// `limits.output_bytes_per_org`.
    pub limit: u64,
    /// Bytes the org's runs hold at the claim.
    pub used: u64,
}

/// A run handed to a worker, with everything it needs to execute it.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub id: RunId,
    pub org_id: OrgId,
    /// `python`, `image` or `compose`.
    pub job_type: String,
    /// The hardware profile.
    pub execution_type: String,
    /// The validated spec, as JSON.
    pub spec: String,
    pub run_name: Option<String>,
    /// GPUs the run was given.
    pub gpu_ids: Vec<String>,
    /// The token every later write names.
    pub lease_token: String,
    /// The org's secrets, decrypted: the run's environment. Held in memory only.
    pub secrets: Vec<(String, String)>,
    /// Registry credentials given with the run (memory only), when it has some.
    pub registry: Option<RegistryCredentials>,
    /// The org's output limit, when it has one.
    pub org_output: Option<OrgOutput>,
}

/// Progress of a claimed run.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Why it has not started yet (pulling, building), shown while it is `starting`.
    Reason(String),
    /// A phase of its timeline reached (`environment_ready`).
    Phase(String),
    /// Its processes started, under this process group when it has one.
    Running { pgid: Option<i64> },
    /// Its stored output was cut at a limit.
    Truncated,
}

/// How a run ended, as its worker decided.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    pub status: RunStatus,
    pub return_code: Option<i64>,
    pub error: Option<String>,
    pub timed_out: bool,
}

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored (pieces sent before are stored once); the next piece is number `next`.
    Stored { next: i64 },
    /// Refused: pieces are missing before it; the next one expected is `expected`.
    Gap { expected: i64 },
    /// The worker no longer holds the run: nothing was stored.
    LeaseLost,
}

/// Why the control plane did not take a call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlaneError {
    /// Not now (the store is full or unreachable, the server is away): try again;
    /// what was not taken is kept by the worker until then.
    #[error("the control plane is unavailable: {0}")]
    Unavailable(String),
}

/// The control plane, as a worker calls it.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// The next run this worker is to execute, or `None` when none fits now.
    async fn claim(&self) -> Result<Option<Assignment>, PlaneError>;
    /// Renews the leases of the runs the worker holds (run, token) and says for each
    /// what to do.
    async fn heartbeat(
        &self,
        leases: &[(RunId, String)],
    ) -> Result<Vec<(RunId, Directive)>, PlaneError>;
    /// Stores output of a run, `first` being the number of the first piece.
    async fn append_output(
        &self,
        run: RunId,
        token: &str,
        first: i64,
        pieces: &[OutputPiece],
    ) -> Result<Appended, PlaneError>;
    /// Records progress; `false` when the worker no longer holds the run (then it must
    /// not run: it was aborted between the claim and now, or lost).
    async fn progress(&self, run: RunId, token: &str, p: Progress) -> Result<bool, PlaneError>;
    /// Records how the run ended (idempotent); `false` when the worker no longer held it.
    /// The run's slot and GPUs are free from then on.
    async fn finish(&self, run: RunId, token: &str, end: RunEnd) -> Result<bool, PlaneError>;
    /// Stores samples of the worker's running runs.
    async fn samples(&self, system: Vec<Sample>, gpus: Vec<GpuSample>) -> Result<(), PlaneError>;
    /// Bytes an org's runs hold in the store now (for its output limit).
    async fn org_output_used(&self, org: &OrgId) -> Result<u64, PlaneError>;
    /// How long a lease lasts without a heartbeat.
    fn lease(&self) -> Duration;
    /// Resolves when there may be a run to claim (in-process: a run was queued or a
    /// slot freed); workers also claim on a timer.
    async fn work_available(&self) {
        std::future::pending::<()>().await
    }
    /// Resolves when a control may wait for one of the worker's runs (in-process: an
    /// abort or stop was asked); workers also heartbeat on a timer.
    async fn control_pending(&self) {
        std::future::pending::<()>().await
    }
}
