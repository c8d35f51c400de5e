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
use stoa_core::PythonRunSpec;
use stoa_store::{NewRun, Run};
use stoa_types::{FieldError, RunId, RunStatus};

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

fn validation(field: &str, msg: String, input: Option<Value>) -> ApiError {
    ApiError::Validation(vec![FieldError {
        loc: vec!["body".into(), field.into()],
        msg,
        kind: "value_error".into(),
        input,
    }])
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
    let v = crate::api::parse_body(&body)?;
    let profiles: Vec<String> = match v.get("profiles") {
        None | Some(Value::Null) => state
            .config
            .profiles
            .iter()
            .map(|p| p.name.clone())
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                validation(
                    "profiles",
                    "Input should be a list of profile names".into(),
                    v.get("profiles").cloned(),
                )
            })?,
        Some(other) => {
            return Err(validation(
                "profiles",
                "Input should be a list of profile names".into(),
                Some(other.clone()),
            ));
        }
    };
    if profiles.is_empty() {
        return Err(validation(
            "profiles",
            "at least one profile is needed".into(),
            None,
        ));
    }
    for p in &profiles {
        if !state.limits.profiles.contains(p) {
            return Err(validation(
                "profiles",
                format!(
                    "unknown hardware profile '{p}'; available: {}",
                    state.limits.profiles.join(", ")
                ),
                Some(Value::String(p.clone())),
            ));
        }
    }
    // The code is checked like a Python run's (one profile stands in for all).
    let mut probe = v.clone();
    if let Some(o) = probe.as_object_mut() {
        o.insert("execution_type".into(), Value::String(profiles[0].clone()));
    }
    let spec =
        PythonRunSpec::from_json(&probe, &state.limits).map_err(|e| ApiError::Validation(e.0))?;
    let parent = RunId::new();
    let base =
        |id: RunId, profile: &str, spec_json: String, job_type: &str, parent_id: Option<RunId>| {
            NewRun {
                id,
                org_id: caller.org.id.clone(),
                job_type: job_type.into(),
                execution_type: profile.into(),
                file_name: spec.file_name_given.then(|| spec.file_name.clone()),
                spec: spec_json,
                timeout_s: spec.run.timeout,
                run_name: spec.run.run_name.clone(),
                labels: spec.run.labels.clone(),
                metadata: spec.run.metadata.clone(),
                callback_urls: if parent_id.is_none() {
                    spec.run.user_callback_urls.clone()
                } else {
                    vec![]
                },
                price_per_hour: state
                    .config
                    .profiles
                    .iter()
                    .find(|p| p.name == profile)
                    .map(|p| p.price_per_hour),
                pending_reason: None,
                priority: spec.run.priority,
                idempotency_key: None,
                parent_id,
            }
        };
    let parent_spec = json!({"profiles": profiles}).to_string();
    let mut children = Vec::with_capacity(profiles.len());
    for p in &profiles {
        let mut child = spec.clone();
        child.run.execution_type = p.clone();
        let child_json =
            serde_json::to_string(&child).map_err(|e| ApiError::Internal(e.to_string()))?;
        children.push(base(RunId::new(), p, child_json, "python", Some(parent)));
    }
    crate::api::admit(&state, &caller.org.id, children.len())?;
    // The parent and every child, or nothing: the parent coordinates rather than runs,
    // it is running while its children are.
    let parent_run = base(parent, "gpu_selection", parent_spec, "gpu_selection", None);
    state.store.insert_selection(&parent_run, &children).await?;
    for c in &children {
        state
            .engine
            .enqueue(c.id, &c.org_id, &c.execution_type, c.priority);
    }
    Ok(Json(SelectionStarted {
        execution_id: parent.to_string(),
        status: RunStatus::Running,
        message: format!(
            "profiling on {} profiles: {}",
            profiles.len(),
            profiles.join(", ")
        ),
    }))
}

/// The comparison of a parent's children.
pub fn compare(children: &[Run]) -> (Vec<ProfilingResult>, Value, Vec<String>) {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for c in children {
        let time = match (&c.job_start, &c.job_end) {
            (Some(s), Some(e)) => crate::api::seconds_between(s, Some(e)),
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
    let run = crate::api::load_run(&state, &caller, &id).await?;
    if run.job_type != "gpu_selection" {
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
