//! The stored record of a run, as every store backend reads it back, and the rules
//! that go with it whichever backend keeps it: the phase a transition records, the
//! idempotency window, the body of its completion callback.

use std::collections::BTreeMap;

use stoa_types::{OrgId, RunId, RunStatus};

use crate::plane::RunControl;
use crate::time::{Time, stamp};

/// A stored run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: RunId,
    pub org_id: OrgId,
    pub status: RunStatus,
    pub job_type: RunKind,
    pub execution_type: String,
    pub file_name: Option<String>,
    pub spec: String,
    pub timeout_s: i64,
    pub created_at: Time,
    pub job_start: Option<Time>,
    pub job_end: Option<Time>,
    pub return_code: Option<i64>,
    pub error: Option<String>,
    pub timed_out: bool,
    pub pending_reason: Option<String>,
    /// `(phase, at)` in the order reached.
    pub phases: Vec<(String, Time)>,
    pub worker_id: Option<String>,
    /// Process group of the run's process tree, while it runs.
    pub pgid: Option<i64>,
    pub run_name: Option<String>,
    pub labels: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub callback_urls: Vec<String>,
    pub output_truncated: bool,
    pub price_per_hour: Option<f64>,
    pub priority: i64,
    pub parent_id: Option<RunId>,
    /// GPUs the run was given.
    pub gpu_ids: Vec<String>,
    /// Insertion order (FIFO within a priority).
    pub seq: i64,
    /// The run's output was removed by retention (`retention.output_days`); readers
    /// find none.
    pub output_expired: bool,
    /// The worker's hold on the run, from its claim to its end.
    pub lease: Option<Lease>,
    /// An abort or stop asked for and not yet carried out.
    pub control: Option<RunControl>,
    /// The Slurm job a Slurm bridge submitted the run as.
    pub slurm_job_id: Option<String>,
    /// Where the ports the run serves on are reached (address and port, from the
    /// worker that runs it), by port.
    pub ports: BTreeMap<u16, String>,
}

/// A worker's hold on a run it claimed: every write the worker makes after the claim
/// names the token, and heartbeats move the expiry on. A run whose lease expired is
/// ended by the reaper (`worker lost`), and the token no longer counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub token: String,
    pub expires_at: Time,
    /// When the worker last renewed it.
    pub heard_at: Time,
    /// How many times the run was claimed (1 for its first claim).
    pub attempt: i64,
}

/// The kinds of run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunKind {
    Python,
    Image,
    /// An image run serving a notebook (`job_type` `customer_notebook` in its request):
    /// executed as an image run, listed by `notebook list`.
    Notebook,
    Compose,
    /// The parent of a GPU selection: it coordinates its children (Python runs), and is
    /// never executed itself.
    GpuSelection,
}

impl RunKind {
    /// As stored and shown (`python`, `image`, `customer_notebook`, `compose`,
    /// `gpu_selection`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Python => "python",
            RunKind::Image => "image",
            RunKind::Notebook => "customer_notebook",
            RunKind::Compose => "compose",
            RunKind::GpuSelection => "gpu_selection",
        }
    }

    /// Reads a stored kind.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "python" => RunKind::Python,
            "image" => RunKind::Image,
            "customer_notebook" => RunKind::Notebook,
            "compose" => RunKind::Compose,
            "gpu_selection" => RunKind::GpuSelection,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a start request's idempotency key finds the run it created.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The phase a transition into `to` records in the run's timeline.
pub fn phase_for(to: RunStatus) -> &'static str {
    match to {
        RunStatus::Pending => "queued",
        RunStatus::Starting => "placed",
        RunStatus::Running => "started",
        _ => "ended",
    }
}

impl Run {
    /// The JSON body of the run's completion callback.
    pub fn callback_payload(&self) -> String {
        serde_json::json!({
            "execution_id": self.id.to_string(),
            "status": self.status.as_str(),
            "return_code": self.return_code,
            "error": self.error,
            "execution_type": self.execution_type,
            "hardware_profile": self.execution_type,
            "job_type": self.job_type.as_str(),
            "created_at": stamp(&self.created_at),
            "job_start": self.job_start.as_ref().map(stamp),
            "job_end": self.job_end.as_ref().map(stamp),
            "run_name": self.run_name,
            "labels": self.labels,
            "metadata": self.metadata,
        })
        .to_string()
    }
}
