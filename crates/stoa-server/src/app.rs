//! What the API does, apart from HTTP: submitting runs (Python, image, compose, GPU
//! selection), abort, stop and delete. Handlers build the request, call one function
//! here and render its reply; nothing here knows about the HTTP framework, so other
//! front ends (the CLI's admin commands, a dashboard) can call the same functions.

use std::time::Duration;

use serde_json::{Value, json};
use stoa_core::{ComposeRunSpec, ImageRunSpec, PythonRunSpec, RegistryCredentials, RunOptions};
use stoa_store::{Inserted, NewRun, Run, RunKind};
use stoa_types::{FieldError, MessageResponse, OrgId, RunId, RunStatus, StartResponse};

use crate::error::ApiError;
use crate::selection::SelectionStarted;
use crate::state::AppState;

/// The start requests: the kinds of run a client starts directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Python,
    Image,
    Compose,
}

impl Start {
    /// The kind of the run it makes (what the worker picks its runtime by).
    pub fn run_kind(self) -> RunKind {
        match self {
            Start::Python => RunKind::Python,
            Start::Image => RunKind::Image,
            Start::Compose => RunKind::Compose,
        }
    }
}

/// A run of the org; another org's run is a 404, like an unknown one.
pub async fn load_run(state: &AppState, org: &OrgId, id: &str) -> Result<Run, ApiError> {
    let id: RunId = id.parse().map_err(|_| ApiError::run_not_found())?;
    match state.store.get_run(id).await? {
        Some(r) if &r.org_id == org => Ok(r),
        _ => Err(ApiError::run_not_found()),
    }
}

/// Validates a start request of `kind` (`body`, the request's JSON), stores the run (or
/// finds the one its idempotency key names), queues it, and answers with its stream
/// URL. Over the org's queued limit: 429.
pub async fn submit(
    state: &AppState,
    org: &OrgId,
    kind: Start,
    body: &Value,
) -> Result<StartResponse, ApiError> {
    let limits = &state.limits;
    let (new, creds) = match kind {
        Start::Python => {
            let spec =
                PythonRunSpec::from_json(body, limits).map_err(|e| ApiError::Validation(e.0))?;
            let file_name = spec.file_name_given.then(|| spec.file_name.clone());
            (
                new_run(state, org, kind.run_kind(), &spec.run, file_name, &spec)?,
                None,
            )
        }
        Start::Image => {
            let (spec, creds) =
                ImageRunSpec::from_json(body, limits).map_err(|e| ApiError::Validation(e.0))?;
            let file_name = spec.file_name.clone();
            let kind = if spec.is_notebook() {
                RunKind::Notebook
            } else {
                RunKind::Image
            };
            (
                new_run(state, org, kind, &spec.run, file_name, &spec)?,
                creds,
            )
        }
        Start::Compose => {
            // The file is checked with the org's variables interpolated.
            let vars = state.engine.secret_env(org).await.map_err(|e| {
                ApiError::Internal(format!("the org's variables could not be read: {e}"))
            })?;
            let lookup = stoa_core::compose::lookup_in(&vars);
            let (spec, creds) = ComposeRunSpec::from_json(body, limits, &lookup)
                .map_err(|e| ApiError::Validation(e.0))?;
            let file_name = spec.file_name.clone();
            (
                new_run(state, org, kind.run_kind(), &spec.run, file_name, &spec)?,
                creds,
            )
        }
    };
    insert_and_queue(state, new, creds).await
}

/// The hourly price of a profile.
fn price_of(state: &AppState, profile: &str) -> Option<f64> {
    state
        .config
        .profiles
        .iter()
        .find(|p| p.name == profile)
        .map(|p| p.price_per_hour)
}

/// A run to store for a validated start request.
fn new_run(
    state: &AppState,
    org: &OrgId,
    kind: RunKind,
    run: &RunOptions,
    file_name: Option<String>,
    spec: &impl serde::Serialize,
) -> Result<NewRun, ApiError> {
    Ok(NewRun {
        id: RunId::new(),
        org_id: org.clone(),
        job_type: kind,
        execution_type: run.execution_type.clone(),
        file_name,
        spec: serde_json::to_string(spec).map_err(|e| ApiError::Internal(e.to_string()))?,
        timeout_s: run.timeout,
        run_name: run.run_name.clone(),
        labels: run.labels.clone(),
        metadata: run.metadata.clone(),
        callback_urls: run.user_callback_urls.clone(),
        price_per_hour: price_of(state, &run.execution_type),
        pending_reason: Some(state.engine.queued_reason().to_string()),
        priority: run.priority,
        idempotency_key: run.idempotency_key.clone(),
        parent_id: None,
    })
}

/// Whether new runs are taken now: not while the server shuts down or its disk is low.
/// (The org's queued limit is checked by the store, with the insert.)
fn admit(state: &AppState) -> Result<(), ApiError> {
    if state.engine.is_stopping() {
        return Err(ApiError::Unavailable(
            "the server is shutting down; start the run again once it is back".into(),
        ));
    }
    if let Some(msg) = state.engine.disk().refusal() {
        return Err(ApiError::Unavailable(msg));
    }
    Ok(())
}

/// The 429 of an org at its queued limit (`limits.org_max_queued`).
fn over_limit(state: &AppState, queued: usize) -> ApiError {
    let max = state.config.limits.org_max_queued;
    ApiError::TooManyRequests(format!(
        "org queue limit: {queued} of {max} runs queued (limits.org_max_queued); wait for some to start"
    ))
}

/// Stores a new run (or finds the one its idempotency key names) and queues it.
async fn insert_and_queue(
    state: &AppState,
    new: NewRun,
    creds: Option<RegistryCredentials>,
) -> Result<StartResponse, ApiError> {
    // A retry with the same key gets the first run, even at the queued limit or while
    // new runs are refused.
    let existing = match &new.idempotency_key {
        Some(k) => state.store.run_by_idempotency_key(&new.org_id, k).await?,
        None => None,
    };
    let found = match existing {
        Some(e) => Some(e),
        None => {
            admit(state)?;
            // The key is checked again in the insert's transaction, with the limit.
            let max = state.config.limits.org_max_queued;
            match state.store.insert_run_within(&new, max).await? {
                Inserted::New => None,
                Inserted::Existing(e) => Some(*e),
                Inserted::OverLimit { queued } => return Err(over_limit(state, queued)),
            }
        }
    };
    let (id, status) = match found {
        Some(existing) => (existing.id, existing.status),
        None => {
            if let Some(c) = creds {
                // Before queueing: the worker may claim the run at once.
                state.engine.remember_credentials(new.id, c);
            }
            state
                .engine
                .enqueue(new.id, &new.org_id, &new.execution_type, new.priority);
            (new.id, RunStatus::Pending)
        }
    };
    Ok(StartResponse {
        execution_id: id.to_string(),
        status,
        // From config (`public_url`, else the bound address), never from the request's
        // `Host` header: a caller must not choose where other clients are sent.
        streaming_url: format!("{}/api/v1/stream/{id}", state.config.base_url()),
        pythia_decision: None,
    })
}

fn validation(field: &str, msg: String, input: Option<Value>) -> ApiError {
    ApiError::Validation(vec![FieldError {
        loc: vec!["body".into(), field.into()],
        msg,
        kind: "value_error".into(),
        input,
    }])
}

/// Starts a GPU selection: the code of a Python start request (`body`) runs once per
/// profile it names (all when none), as children of a parent run, all stored in one
/// transaction.
pub async fn start_selection(
    state: &AppState,
    org: &OrgId,
    body: &Value,
) -> Result<SelectionStarted, ApiError> {
    let include_cpu = match body.get("include_cpu") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(validation(
                "include_cpu",
                "Input should be a valid boolean".into(),
                Some(other.clone()),
            ));
        }
    };
    let profiles: Vec<String> = match body.get("profiles") {
        // The GPU profiles (the CPU ones too with `include_cpu`); all of them where
        // there is no GPU profile to compare.
        None | Some(Value::Null) => {
            let all = &state.config.profiles;
            let gpus = all.iter().any(|p| p.gpu_count > 0);
            all.iter()
                .filter(|p| include_cpu || !gpus || p.gpu_count > 0)
                .map(|p| p.name.clone())
                .collect()
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                validation(
                    "profiles",
                    "Input should be a list of profile names".into(),
                    body.get("profiles").cloned(),
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
    let mut probe = body.clone();
    if let Some(o) = probe.as_object_mut() {
        o.insert("execution_type".into(), Value::String(profiles[0].clone()));
    }
    let spec =
        PythonRunSpec::from_json(&probe, &state.limits).map_err(|e| ApiError::Validation(e.0))?;
    let parent = RunId::new();
    let base = |id: RunId,
                profile: &str,
                spec_json: String,
                job_type: RunKind,
                parent_id: Option<RunId>| {
        NewRun {
            id,
            org_id: org.clone(),
            job_type,
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
            price_per_hour: price_of(state, profile),
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
        children.push(base(
            RunId::new(),
            p,
            child_json,
            RunKind::Python,
            Some(parent),
        ));
    }
    admit(state)?;
    // The parent and every child, or nothing: the parent coordinates rather than runs,
    // it is running while its children are.
    let parent_run = base(
        parent,
        "gpu_selection",
        parent_spec,
        RunKind::GpuSelection,
        None,
    );
    let max = state.config.limits.org_max_queued;
    if let Inserted::OverLimit { queued } = state
        .store
        .insert_selection(&parent_run, &children, max)
        .await?
    {
        return Err(over_limit(state, queued));
    }
    for c in &children {
        state
            .engine
            .enqueue(c.id, &c.org_id, &c.execution_type, c.priority);
    }
    Ok(SelectionStarted {
        execution_id: parent.to_string(),
        status: RunStatus::Running,
        message: format!(
            "profiling on {} profiles: {}",
            profiles.len(),
            profiles.join(", ")
        ),
    })
}

/// The reply to an abort or stop: what state the run is in now.
fn control_reply(run: Option<Run>, verb: &str) -> Result<MessageResponse, ApiError> {
    let run = run.ok_or_else(ApiError::run_not_found)?;
    let message = if run.status == RunStatus::SystemFailure {
        // Its worker was lost (or the platform failed it) first: said with the reason.
        format!(
            "Execution {verb}; it is {}: {}",
            run.status,
            run.error.as_deref().unwrap_or("no reason recorded")
        )
    } else if run.status.is_terminal() {
        format!("Execution {verb}; it is {}", run.status)
    } else {
        format!("Execution {verb} requested; it is still {}", run.status)
    };
    Ok(MessageResponse {
        message,
        execution_id: run.id.to_string(),
        status: Some(run.status),
    })
}

/// Aborts a run of the org: its processes are killed and confirmed gone (or its
/// worker is said to be unreachable); it ends `aborted`. A GPU selection's parent goes
/// first (so it ends aborted, not failed), then every profile it runs.
pub async fn abort(state: &AppState, org: &OrgId, id: &str) -> Result<MessageResponse, ApiError> {
    let run = load_run(state, org, id).await?;
    let is_selection = run.job_type == RunKind::GpuSelection;
    let parent = run.id;
    let run = state.engine.abort(run.id).await.map_err(ApiError::from)?;
    if is_selection {
        for child in state.store.children(parent).await? {
            state.engine.abort(child.id).await.map_err(ApiError::from)?;
        }
    }
    control_reply(run, "aborted")
}

/// Stops a run of the org gracefully: SIGTERM, the grace period (an image run's own
/// `graceful_timeout`, else `worker.stop_grace_s`), then kill; it ends `cancelled`.
pub async fn stop(state: &AppState, org: &OrgId, id: &str) -> Result<MessageResponse, ApiError> {
    let run = load_run(state, org, id).await?;
    let own = serde_json::from_str::<Value>(&run.spec)
        .ok()
        .and_then(|v| v.get("graceful_timeout").and_then(Value::as_u64));
    let grace = Duration::from_secs(own.unwrap_or(state.config.worker.stop_grace_s));
    let is_selection = run.job_type == RunKind::GpuSelection;
    let parent = run.id;
    let run = state
        .engine
        .stop(run.id, grace)
        .await
        .map_err(ApiError::from)?;
    if is_selection {
        // Every profile it runs, each with its grace period, at once.
        let children = state.store.children(parent).await?;
        let stops = children.iter().map(|c| state.engine.stop(c.id, grace));
        for r in futures::future::join_all(stops).await {
            r.map_err(ApiError::from)?;
        }
    }
    control_reply(run, "stopped")
}

/// Deletes a run of the org that has ended, with its output (retention removes the
/// rows soon; they are never readable again). An active run: 409.
pub async fn delete(state: &AppState, org: &OrgId, id: &str) -> Result<MessageResponse, ApiError> {
    let run = load_run(state, org, id).await?;
    if !run.status.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "execution is still {}; abort or stop it first",
            run.status
        )));
    }
    if !state.store.delete_run(run.id).await? {
        return Err(ApiError::run_not_found());
    }
    state.hub.notify(run.id);
    state.retention.wake();
    Ok(MessageResponse {
        message: "Execution deleted".into(),
        execution_id: run.id.to_string(),
        status: None,
    })
}
