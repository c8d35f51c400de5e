//! The worker protocol, version 1: what a `stoa worker` agent on another machine and
//! the control plane send each other, under `/api/worker/v1/`.
//!
//! A machine registers with a join token (`stoa workers token create`) and gets its own
//! worker token, which every later call names (`Authorization: Bearer`). A claim waits
//! up to a while for a run (204 when none came) and hands over, with the run, its lease
//! token and what it needs: the org's secrets decrypted and registry credentials,
//! which the worker holds in memory only. Every write about a run names its lease
//! token; output pieces are numbered by the worker, a resent piece is stored once and a
//! gap is refused (409, with the number expected); a write under a lease the worker no
//! longer holds is refused with 410.

use serde::{Deserialize, Serialize};
#[cfg(feature = "openapi")]
use utoipa::ToSchema;

use crate::RunStatus;

/// The path prefix of the protocol's version 1.
pub const PREFIX: &str = "/api/worker/v1";

/// A profile a worker offers, and how many of its runs it takes at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OfferedProfile {
    /// A hardware profile the server knows.
    pub name: String,
    /// Runs of it at once on this worker.
    pub slots: usize,
}

/// Registration of a worker (with a join token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RegisterRequest {
    /// The worker's name, unique in the fleet (`[A-Za-z0-9._-]`, at most 63).
    pub name: String,
    /// The worker's Stoa version.
    pub version: String,
    /// The protocol version it speaks (`v1`).
    pub protocol: String,
    pub profiles: Vec<OfferedProfile>,
    /// GPU ids it may give runs.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// Its host name, shown in the fleet.
    #[serde(default)]
    pub host: Option<String>,
    /// The token it was given when it last registered (a worker registering again
    /// after a restart): a name held by a worker heard lately is taken only with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<String>,
    /// Set by a bridge that hands runs to a cluster manager instead of executing them
    /// (`stoa worker --slurm`): the cluster places runs and gives them their GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterOffer>,
}

/// The cluster behind a bridge, shown in the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ClusterOffer {
    /// The cluster manager (`slurm`).
    pub manager: String,
    /// The cluster's name (Slurm's `ClusterName`).
    pub name: String,
    /// The partitions its profiles go to.
    pub partitions: Vec<String>,
}

/// A held run asked for again under its lease (`stoa exec` in a Slurm job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AssignmentRequest {
    pub lease_token: String,
}

/// What a registered worker is told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RegisterResponse {
    /// The worker's own token: every later call names it.
    pub worker_token: String,
    /// Seconds a lease lasts without a heartbeat.
    pub lease_s: u64,
    /// Seconds a claim waits on the server for a run.
    pub claim_wait_s: u64,
}

/// An environment variable handed to a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// Registry credentials handed with a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RegistryLogin {
    pub username: String,
    pub password: String,
}

/// An org's output limit and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OrgOutputLimit {
    pub limit: u64,
    pub used: u64,
}

/// A run handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ClaimedRun {
    pub run_id: String,
    pub org_id: String,
    pub job_type: String,
    pub execution_type: String,
    /// The validated spec, as JSON text.
    pub spec: String,
    pub run_name: Option<String>,
    pub gpu_ids: Vec<String>,
    pub lease_token: String,
    /// The org's secrets, decrypted (memory only on the worker).
    pub secrets: Vec<EnvVar>,
    pub registry: Option<RegistryLogin>,
    pub org_output: Option<OrgOutputLimit>,
}

/// A run the worker holds, by its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HeldRun {
    pub run_id: String,
    pub lease_token: String,
}

/// A heartbeat: the runs the worker holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HeartbeatRequest {
    pub runs: Vec<HeldRun>,
}

/// What to do with a held run: `continue`, `abort`, `stop` (with `grace_ms`) or
/// `lost` (kill it, write nothing more).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RunDirective {
    pub run_id: String,
    pub directive: String,
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HeartbeatResponse {
    pub runs: Vec<RunDirective>,
}

/// A piece of output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OutputPieceWire {
    /// `stdout`, `stderr` or `system`.
    pub stream: String,
    #[serde(default)]
    pub service: Option<String>,
    pub content: String,
}

/// Output of a run, `first` being the number of its first piece.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OutputRequest {
    pub lease_token: String,
    pub first: i64,
    pub pieces: Vec<OutputPieceWire>,
    /// The run's processes are gone: this is what is left of its output (taken even
    /// while routine output is refused).
    #[serde(default)]
    pub at_end: bool,
}

/// Output taken: the number of the next piece.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OutputResponse {
    pub next: i64,
}

/// Output refused for a gap: the number expected next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OutputGap {
    pub detail: String,
    pub expected: i64,
}

/// Progress of a run: one of `reason`, `phase`, `running` (with `pgid`) or
/// `truncated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ProgressRequest {
    pub lease_token: String,
    pub kind: String,
    /// The reason or phase.
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub pgid: Option<i64>,
}

/// Whether the worker still holds the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HeldResponse {
    pub held: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct FinishRequest {
    pub lease_token: String,
    pub status: RunStatus,
    pub return_code: Option<i64>,
    pub error: Option<String>,
    #[serde(default)]
    pub timed_out: bool,
}

/// One system sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SampleWire {
    pub run_id: String,
    pub ts: String,
    pub cpu_percent: f64,
    pub ram_used: i64,
    pub ram_total: i64,
}

/// One GPU reading: utilisation %, memory utilisation %, memory used (bytes),
/// temperature (°C), power (W), power limit (W), SM clock, memory clock (MHz), PCIe
/// rx, tx (B/s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct GpuSampleWire {
    pub run_id: String,
    pub ts: String,
    pub gpu: i64,
    pub values: Vec<Option<f64>>,
}

/// Samples of the worker's running runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SamplesRequest {
    #[serde(default)]
    pub system: Vec<SampleWire>,
    #[serde(default)]
    pub gpus: Vec<GpuSampleWire>,
}

/// Bytes an org's runs hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OrgOutputUsed {
    pub used: u64,
}

/// A worker of the fleet, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct WorkerInfo {
    pub name: String,
    pub host: Option<String>,
    pub version: Option<String>,
    pub profiles: Vec<OfferedProfile>,
    pub gpus: Vec<String>,
    /// Runs it holds now.
    pub running: usize,
    /// The cluster a bridge hands its runs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterOffer>,
    pub registered_at: String,
    pub last_heard_at: String,
    pub draining: bool,
}

/// A join token, shown once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct JoinToken {
    pub token: String,
    pub expires_at: Option<String>,
}
