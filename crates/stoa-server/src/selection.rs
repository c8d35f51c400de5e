//! GPU selection runs (spec §3.4): the code runs once per hardware profile as child
//! runs of a parent run; the status endpoint compares them and recommends one.
//!
//! The parent is not executed: it is `running` while its children are, and ends when
//! the last child ends (`completed` when at least one child completed, else `failed`).
//! Aborting the parent aborts its children. The recommendation (`best`) is the cheapest
//! completed profile whose time is within 25 % of the fastest.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stoa_store::Run;
use stoa_types::RunStatus;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Reply of `gpu_selection/start`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SelectionStarted {
    pub execution_id: String,
    pub status: RunStatus,
    pub message: String,
}

/// One profile's result.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProfilingResult {
    pub profile: String,
    pub execution_id: String,
    pub status: RunStatus,
    /// Seconds the run took (start to end), when it ran.
    pub execution_time: Option<f64>,
    /// execution_time × the profile's price per hour / 3600.
    pub cost: Option<f64>,
    pub return_code: Option<i64>,
    pub error: Option<String>,
    /// Peak memory, GPU memory and utilisation: filled from run metrics once they are
    /// recorded (null until then).
    pub peak_memory_bytes: Option<u64>,
    pub peak_gpu_memory_bytes: Option<u64>,
    pub gpu_utilization_percent: Option<f64>,
}

/// Reply of `gpu_selection/{id}/status`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SelectionStatus {
    pub execution_id: String,
    pub status: RunStatus,
    pub profiling_results: Vec<ProfilingResult>,
    #[schema(value_type = Object)]
    pub selection_results: Value,
    pub system_errors: Vec<String>,
    /// The same results, where the 1.1.7 client reads them.
    #[schema(value_type = Object)]
    pub metadata: Value,
}

/// Start a GPU selection run.
#[utoipa::path(post, path = "/api/v2/external/execution/gpu_selection/start", tag = "runs",
    request_body = stoa_types::PythonStartRequest,
    responses((status = 200, body = SelectionStarted), (status = 422, body = stoa_types::ErrorBody)), security(("bearer" = [])))]
pub async fn start(
    State(state): State<AppState>,
    caller: Caller,
    crate::api::Body(body): crate::api::Body,
) -> Result<Json<SelectionStarted>, ApiError> {
    let body = crate::api::parse_body(&body)?;
    Ok(Json(
        crate::app::start_selection(&state, &caller.org.id, &body).await?,
    ))
}

/// The comparison of a parent's children.
pub fn compare(children: &[Run]) -> (Vec<ProfilingResult>, Value, Vec<String>) {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for c in children {
        let time = match (&c.job_start, &c.job_end) {
            (Some(s), Some(e)) => Some(crate::api::seconds_between(s, Some(e))),
            _ => None,
        };
        let cost = time.map(|t| (t / 3600.0 * c.price_per_hour.unwrap_or(0.0) * 1e6).round() / 1e6);
        if c.status.is_terminal() && c.status != RunStatus::Completed {
            let why = c
                .error
                .clone()
                .unwrap_or_else(|| format!("exit code {}", c.return_code.unwrap_or(-1)));
            errors.push(format!("{}: {} ({why})", c.execution_type, c.status));
        }
        results.push(ProfilingResult {
            profile: c.execution_type.clone(),
            execution_id: c.id.to_string(),
            status: c.status,
            execution_time: time,
            cost,
            return_code: c.return_code,
            error: c.error.clone(),
            peak_memory_bytes: None,
            peak_gpu_memory_bytes: None,
            gpu_utilization_percent: None,
        });
    }
    let done: Vec<&ProfilingResult> = results
        .iter()
        .filter(|r| r.status == RunStatus::Completed && r.execution_time.is_some())
        .collect();
    let by = |f: fn(&ProfilingResult) -> f64| {
        done.iter()
            .min_by(|a, b| f(a).total_cmp(&f(b)))
            .map(|r| r.profile.clone())
    };
    let fastest = by(|r| r.execution_time.unwrap_or(f64::MAX));
    let cheapest = by(|r| r.cost.unwrap_or(f64::MAX));
    let best = fastest.as_ref().and_then(|f| {
        let ft = done.iter().find(|r| &r.profile == f)?.execution_time?;
        done.iter()
            .filter(|r| r.execution_time.unwrap_or(f64::MAX) <= ft * 1.25)
            .min_by(|a, b| {
                a.cost
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.cost.unwrap_or(f64::MAX))
            })
            .map(|r| r.profile.clone())
    });
    let metrics: BTreeMap<String, Value> = results
        .iter()
        .map(|r| {
            (
                r.profile.clone(),
                json!({"status": r.status, "time": r.execution_time, "htime": r.execution_time.map(human),
                       "cost": r.cost, "is_per_epoch": false}),
            )
        })
        .collect();
    let selection =
        json!({"best": best, "fastest": fastest, "cheapest": cheapest, "metrics": metrics});
    (results, selection, errors)
}

fn human(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.2}s")
    } else {
        format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    }
}

/// Status and comparison of a GPU selection run.
#[utoipa::path(get, path = "/api/v2/external/execution/gpu_selection/{id}/status", tag = "runs",
    params(("id" = String, Path)),
    responses((status = 200, body = SelectionStatus), (status = 404, body = stoa_types::ErrorBody)), security(("bearer" = [])))]
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SelectionStatus>, ApiError> {
    let run = crate::app::load_run(&state, &caller.org.id, &id).await?;
    if run.job_type != stoa_store::RunKind::GpuSelection {
        return Err(ApiError::NotFound("Execution not found".into()));
    }
    let children = state.store.children(run.id).await?;
    let (profiling_results, selection_results, system_errors) = compare(&children);
    let metadata = json!({
        "profiling_results": profiling_results,
        "selection_results": selection_results,
    });
    Ok(Json(SelectionStatus {
        execution_id: run.id.to_string(),
        status: run.status,
        profiling_results,
        selection_results,
        system_errors,
        metadata,
    }))
}
