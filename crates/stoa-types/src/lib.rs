//! Wire types shared by the Stoa server, worker, CLI and tests.
//!
//! Field names, paths and status strings follow the Lyceum-compatible contract in
//! `shared/spec/lyceum-wire.md`. Only serde here; OpenAPI derives sit behind the
//! `openapi` feature so that the CLI does not pay for them.

pub mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// Identifier of a run ("execution" on the wire). UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub Uuid);

impl RunId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        RunId(Uuid::now_v7())
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RunId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(RunId)
    }
}

/// Identifier of an organisation (a tenant).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrgId(pub String);

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The state of a run. Terminal states are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted and queued.
    Pending,
    /// Placed on a worker; environment being prepared.
    Starting,
    /// User code is executing.
    Running,
    /// Exit code 0.
    Completed,
    /// Non-zero exit, or the run's timeout expired.
    Failed,
    /// The platform could not run it.
    SystemFailure,
    /// Hard stop by the user.
    Aborted,
    /// Graceful stop by the user.
    Cancelled,
}

impl RunStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Pending,
        RunStatus::Starting,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::SystemFailure,
        RunStatus::Aborted,
        RunStatus::Cancelled,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Starting => "starting",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::SystemFailure => "system_failure",
            RunStatus::Aborted => "aborted",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// True for the five final states.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            RunStatus::Pending | RunStatus::Starting | RunStatus::Running
        )
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}"))
    }
}

/// Body of `POST /api/v2/external/execution/streaming/start` (spec §3.1).
///
/// The server validates the raw JSON itself so that every bad field is named in the
/// 422; this type documents the shape and is what clients send.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct PythonStartRequest {
    /// The Python source to run.
    pub code: String,
    /// Notebook cell number; accepted and ignored.
    #[serde(default)]
    pub nbcode: i64,
    /// Seconds before the run is killed (1..=max, default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Hardware profile name (default `cpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_type: Option<String>,
    /// Name the code is written as (default `script.py`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Newline-separated pip requirement lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements_content: Option<String>,
    /// Modules imported before the code runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_imports: Option<Vec<String>>,
    /// A JSON-encoded object of relative path to file text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_files: Option<String>,
    /// Accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_state: Option<String>,
    /// Completion callback URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_callback_urls: Option<Vec<String>>,
    /// A name for the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// Free-form key/value metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Body of `POST /api/v2/external/execution/image/start` (spec §3.2).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ImageStartRequest {
    /// Image reference.
    pub docker_image_ref: String,
    /// Command; the image's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_run_cmd: Option<Vec<String>>,
    /// `NAME=value` lines joined by `\n`; lines without `=` are skipped with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_run_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Mount the org's storage (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_s3_mount: Option<bool>,
    /// Where the org's storage is mounted (default `/mnt/s3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_mount_path: Option<String>,
    /// Seconds between SIGTERM and kill on stop (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_callback_urls: Option<Vec<String>>,
    /// `basic` (or `aws`, not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_registry_credential_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// `customer_notebook` for a notebook (its timeout may reach
    /// `limits.notebook_max_timeout_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_type: Option<String>,
    /// TCP ports the run serves on, reached through the proxy at
    /// `/ports/{execution_id}/{port}/` while it runs (default: the image's `EXPOSE`d
    /// ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
}

/// Body of `POST /api/v2/external/execution/compose/start` (spec §3.3).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ComposeStartRequest {
    /// The compose file (YAML); see the README for the supported subset.
    pub compose_file_code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Mount the org's storage into the services (default false; `x-stoa.s3-mount`
    /// in the file names the services, all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_s3_mount: Option<bool>,
    /// Where the services see the org's storage (default `/mnt/s3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_mount_path: Option<String>,
    /// Seconds between the stop signal and kill on stop (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_callback_urls: Option<Vec<String>>,
    /// `basic` (or `aws`, not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_registry_credential_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Reply of every start endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct StartResponse {
    /// The new run's id.
    pub execution_id: String,
    /// Its status (`pending`).
    pub status: RunStatus,
    /// Absolute URL of the SSE output stream (POST, no auth).
    pub streaming_url: String,
    /// Always null.
    pub pythia_decision: Option<String>,
}

/// One phase of a run's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Phase {
    /// `queued`, `placed`, `environment_ready`, `warm` or `cold` (how a sandboxed Python run started), `started` or `ended`.
    pub phase: String,
    /// When it was reached (ISO-8601).
    pub at: String,
}

/// `result` of a run record, mirroring the stream's `jobFinished` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RunResult {
    /// Exit code of the user process, when it exited.
    #[serde(rename = "returnCode")]
    pub return_code: Option<i64>,
    /// Why the run did not complete, for timeouts, aborts and system failures.
    pub error: Option<String>,
}

/// Full execution record: `GET /api/v2/external/execution/{id}` (spec §3.7).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecutionRecord {
    pub execution_id: String,
    pub status: RunStatus,
    /// `python`, `image`, `customer_notebook`, `compose` or `gpu_selection`.
    pub job_type: String,
    /// The hardware profile asked for.
    pub execution_type: String,
    pub hardware_profile: String,
    pub file_name: Option<String>,
    pub created_at: String,
    pub job_start: Option<String>,
    pub job_end: Option<String>,
    pub return_code: Option<i64>,
    /// Cost of the run so far (a number, never a string).
    pub billed: f64,
    pub system_errors: Vec<String>,
    /// Why the run is not running yet (null once it runs).
    pub pending_reason: Option<String>,
    pub phases: Vec<Phase>,
    /// Scheduling priority, 0..=100.
    pub priority: i64,
    /// The GPUs the run was given.
    pub gpu_ids: Vec<String>,
    /// The GPU selection run this run profiles for.
    pub parent_execution_id: Option<String>,
    /// The Slurm job the run was submitted as (runs placed by a Slurm bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job_id: Option<String>,
    /// Ports reachable through the proxy while the run runs
    /// (`/ports/{execution_id}/{port}/`).
    #[serde(default)]
    pub ports: Vec<u16>,
    pub timeout: i64,
    pub stdout: String,
    pub stderr: String,
    pub result: RunResult,
    pub user_callback_urls: Vec<String>,
    pub run_name: Option<String>,
    pub labels: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// True when the stored output hit the per-run output limit and was cut.
    pub output_truncated: bool,
    /// True when `stdout` and `stderr` here hold only the start of the output (the
    /// server's `limits.max_output_per_reply_bytes`); the stream has all of it.
    #[serde(default)]
    pub record_output_truncated: bool,
    /// True when the run's output was removed by retention (`retention.output_days`
    /// after it ended): `stdout`, `stderr`, the logs and the stream have none.
    #[serde(default)]
    pub output_expired: bool,
    /// Completion callback deliveries, once the run ended.
    pub callbacks: Vec<CallbackDelivery>,
    /// Summary of the run's metrics, once it ended.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metrics_summary: Option<serde_json::Value>,
}

/// One completion callback of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CallbackDelivery {
    pub url: String,
    /// `pending`, `delivered` or `failed` (given up).
    pub state: String,
    pub attempts: i64,
    /// HTTP status of the last answer.
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<String>,
}

/// One row of `workloads/list` and of `billing/history` (spec §3.5, §3.6).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecutionSummary {
    pub execution_id: String,
    pub created_at: String,
    pub execution_type: String,
    pub status: RunStatus,
    pub hardware_profile: String,
    pub status_details: Option<String>,
    pub local_imports: Vec<String>,
    pub billed: f64,
    pub execelet_start: Option<String>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub finish_time: Option<String>,
    pub job_start: Option<String>,
    pub job_end: Option<String>,
    pub file_name: Option<String>,
    pub errors_docker: Option<String>,
    pub parent_execution_id: Option<String>,
    pub job_type: String,
    pub metadata: BTreeMap<String, String>,
    pub return_code: Option<i64>,
    pub pending_reason: Option<String>,
    pub run_name: Option<String>,
    pub labels: Vec<String>,
    /// Scheduling priority, 0..=100.
    pub priority: i64,
}

/// Reply of `billing/history`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HistoryResponse {
    pub executions: Vec<ExecutionSummary>,
    pub total_executions: i64,
    pub total_credits_spent: f64,
    pub limit: i64,
    pub offset: i64,
    pub counts_by_status: BTreeMap<String, i64>,
}

/// Reply of `execution/{id}/timing`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TimingResponse {
    pub execution_id: String,
    pub created_at: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub duration_seconds: Option<f64>,
}

/// One stored log line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LogEntry {
    pub timestamp: String,
    pub message: String,
    /// `info` for stdout, `error` for stderr.
    pub level: String,
    pub execution_id: String,
    pub user_id: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
}

/// Reply of `logs/execution/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LogsResponse {
    pub logs: Vec<LogEntry>,
    pub total: i64,
}

/// Reply of `execution/streaming/{id}/status`, in the fallback vocabulary (spec §5).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct StreamingStatusResponse {
    pub execution_id: String,
    pub status: String,
    pub errors: Option<String>,
}

/// One hardware profile in `machine-types`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MachineType {
    pub hardware_profile: String,
    pub price_per_hour: Option<f64>,
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    pub gpu_count: u32,
    pub gpu_model: Option<String>,
    /// The workers that offer the profile now, with their free slots (Stoa's own;
    /// none when no worker offers it).
    #[serde(default)]
    pub workers: Vec<ProfileWorker>,
    /// Runs of the profile waiting for a slot.
    #[serde(default)]
    pub queued: usize,
}

/// A worker offering a hardware profile, in `machine-types`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ProfileWorker {
    pub name: String,
    /// Runs of the profile it takes at once.
    pub slots: usize,
    /// Slots free now (0 while it drains).
    pub free_slots: usize,
    /// It takes no new runs.
    pub draining: bool,
}

/// Reply of `machine-types`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MachineTypesResponse {
    pub machine_types: Vec<MachineType>,
}

/// Reply of `user/quotas/available-hardware`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AvailableHardwareResponse {
    pub available_hardware_profiles: Vec<String>,
}

/// Reply of `user/org`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OrgResponse {
    pub org_id: String,
    pub slug: String,
    pub name: String,
    pub is_personal: bool,
    pub is_key_scoped: bool,
}

/// Reply of abort, stop and delete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MessageResponse {
    pub message: String,
    pub execution_id: String,
    pub status: Option<RunStatus>,
}

/// An error body `{"detail": …}`: a string, or a FastAPI-style list for 422.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorBody {
    #[cfg_attr(feature = "openapi", schema(schema_with = error_detail_schema))]
    pub detail: serde_json::Value,
}

/// `detail` of an error: a message, or (422) a list of the fields at fault.
#[cfg(feature = "openapi")]
fn error_detail_schema() -> utoipa::openapi::schema::Schema {
    serde_json::from_value(serde_json::json!({
        "description": "a message, or (422) one entry per field at fault",
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                    "input": {}
                }
            }}
        ]
    }))
    .expect("a valid schema")
}

/// One entry of a 422 `detail` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldError {
    /// Where the bad value is, e.g. `["body", "timeout"]`.
    pub loc: Vec<String>,
    /// What is wrong, in words.
    pub msg: String,
    /// A stable machine-readable kind (`missing`, `int_parsing`, `less_than_equal`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The value given, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<serde_json::Value>,
}

/// An event of the SSE output stream (spec §4), as the `data:` JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StreamEvent {
    /// A piece of output; `content` carries its own newlines.
    Output(OutputEvent),
    /// The run ended; always the last event.
    JobFinished(JobFinished),
    /// Stoa only (the official client ignores it): state and pending reason.
    Status(StatusEvent),
}

/// Payload of an `output` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputEvent {
    pub content: String,
    /// `stdout` or `stderr` (Stoa only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
}

/// Payload of a `jobFinished` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinished {
    pub job: FinishedJob,
}

/// The job inside `jobFinished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishedJob {
    pub result: RunResult,
    /// The final state (Stoa only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RunStatus>,
}

/// Payload of a `status` event (Stoa only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub status: RunStatus,
    pub pending_reason: Option<String>,
}

/// An API key as listed (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub org_id: String,
    pub key_name: String,
    pub key_prefix: String,
    pub is_active: bool,
    pub is_admin: bool,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_events_use_the_wire_keys() {
        let out = StreamEvent::Output(OutputEvent {
            content: "hi\n".into(),
            stream: None,
        });
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"output":{"content":"hi\n"}}"#
        );
        let fin = StreamEvent::JobFinished(JobFinished {
            job: FinishedJob {
                result: RunResult {
                    return_code: Some(3),
                    error: None,
                },
                status: None,
            },
        });
        assert_eq!(
            serde_json::to_string(&fin).unwrap(),
            r#"{"jobFinished":{"job":{"result":{"returnCode":3,"error":null}}}}"#
        );
    }

    #[test]
    fn status_strings_round_trip() {
        for st in RunStatus::ALL {
            assert_eq!(st.as_str().parse::<RunStatus>().unwrap(), st);
            assert_eq!(
                serde_json::to_value(st).unwrap(),
                serde_json::json!(st.as_str())
            );
        }
    }
}
