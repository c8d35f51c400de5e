//! The worker protocol's server side (`/api/worker/v1/`, see [`stoa_types::worker`]):
//! each handler reads the request, calls the engine (the control plane) for the calling
//! worker, and writes the answer.

use std::pin::pin;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use stoa_core::plane::wire;
use stoa_core::plane::{
    Appended, ControlPlane, GpuSample, OutputPiece, PlaneError, RunEnd, Sample,
};
use stoa_types::worker::{
    AssignmentRequest, ClaimedRun, FinishRequest, HeartbeatRequest, HeartbeatResponse,
    HeldResponse, OrgOutputUsed, OutputGap, OutputRequest, OutputResponse, ProgressRequest,
    RegisterRequest, RegisterResponse, SamplesRequest,
};
use stoa_types::{ErrorBody, FieldError, OrgId, RunId};

use crate::api::Body;
use crate::auth::{bearer_token, hash_key};
use crate::error::ApiError;
use crate::state::AppState;

/// A registered worker making a call.
pub struct WorkerCaller {
    pub name: String,
    /// The hash of its token (a long call checks it again: the worker may be removed
    /// meanwhile).
    token_hash: String,
}

fn token_of(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization: Bearer <worker token>".into())
        })
}

impl FromRequestParts<AppState> for WorkerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token_hash = hash_key(token_of(&parts.headers)?);
        let w = state
            .store
            .worker_by_token(&token_hash)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("invalid worker token".into()))?;
        // `stoa workers drain` marks it in the store; the scheduler follows.
        state.engine.set_draining(&w.name, w.draining);
        // When it was last heard, at most every few seconds, so calls stay reads.
        let stale = crate::api::seconds_between(&w.last_heard_at, None) >= 5.0;
        if stale && let Err(e) = state.store.touch_worker(&w.name).await {
            tracing::debug!(worker = %w.name, error = %e, "recording when the worker was heard failed");
        }
        Ok(WorkerCaller {
            name: w.name,
            token_hash,
        })
    }
}

/// A JSON body read into `T`; a 422 names the field at fault.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let mut loc = vec!["body".to_string()];
        if path != "." {
            loc.extend(path.split('.').map(str::to_string));
        }
        ApiError::Validation(vec![FieldError {
            loc,
            msg: e.inner().to_string(),
            kind: "value_error".into(),
            input: None,
        }])
    })
}

fn unavailable(e: PlaneError) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

fn run_id(id: &str) -> Result<RunId, ApiError> {
    id.parse().map_err(|_| ApiError::run_not_found())
}

/// Registers this machine as a worker. Needs a join token (`stoa workers token
/// create`); answers with the worker's own token.
#[utoipa::path(post, path = "/api/worker/v1/register", tag = "workers",
    request_body = RegisterRequest,
    responses((status = 200, body = RegisterResponse), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<RegisterResponse>, ApiError> {
    let token = token_of(&headers)?;
    if !state.store.join_token_valid(&hash_key(token)).await? {
        return Err(ApiError::Unauthorized(
            "invalid or expired join token (make one with `stoa workers token create`)".into(),
        ));
    }
    let req: RegisterRequest = parse(&body)?;
    match state.engine.register_worker(req).await? {
        Ok(r) => Ok(Json(r)),
        Err((field, msg)) => Err(ApiError::Validation(vec![FieldError {
            loc: std::iter::once("body".to_string())
                .chain(field.split('.').map(str::to_string))
                .collect(),
            msg,
            kind: "value_error".into(),
            input: None,
        }])),
    }
}

/// The next run for this worker: waits up to `worker.claim_wait_s` for one, then
/// answers 204.
#[utoipa::path(post, path = "/api/worker/v1/claim", tag = "workers",
    responses((status = 200, body = ClaimedRun), (status = 204), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn claim(State(state): State<AppState>, w: WorkerCaller) -> Result<Response, ApiError> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(state.config.worker.claim_wait_s);
    let mut shutdown = state.shutdown.clone();
    loop {
        // Armed before the try: a run queued meanwhile wakes it.
        let mut signal = pin!(state.engine.work_signal());
        signal.as_mut().enable();
        // Removed while it waited: it takes nothing more.
        if state.store.worker_by_token(&w.token_hash).await?.is_none() {
            return Err(ApiError::Unauthorized("invalid worker token".into()));
        }
        if let Some(a) = state.engine.claim_for(&w.name).await.map_err(unavailable)? {
            return Ok(Json(ClaimedRun::from(&a)).into_response());
        }
        tokio::select! {
            _ = signal => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(StatusCode::NO_CONTENT.into_response()),
            _ = shutdown.wait_for(|v| *v) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

/// A run this worker holds, handed over again under its lease token (`stoa exec` in a
/// Slurm job gets what its bridge claimed); 410 when the lease no longer holds it.
#[utoipa::path(post, path = "/api/worker/v1/runs/{id}/assignment", tag = "workers",
    params(("id" = String, Path)),
    request_body = AssignmentRequest,
    responses((status = 200, body = ClaimedRun), (status = 410, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn assignment(
    State(state): State<AppState>,
    w: WorkerCaller,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    let req: AssignmentRequest = parse(&body)?;
    Ok(
        match state
            .engine
            .assignment_for(&w.name, id, &req.lease_token)
            .await
            .map_err(unavailable)?
        {
            Some(a) => Json(ClaimedRun::from(&a)).into_response(),
            None => lease_lost(),
        },
    )
}

/// Renews the leases of the runs this worker holds; says what to do with each.
#[utoipa::path(post, path = "/api/worker/v1/heartbeat", tag = "workers",
    request_body = HeartbeatRequest,
    responses((status = 200, body = HeartbeatResponse), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn heartbeat(
    State(state): State<AppState>,
    w: WorkerCaller,
    Body(body): Body,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let req: HeartbeatRequest = parse(&body)?;
    let leases = req
        .runs
        .into_iter()
        .map(|h| Ok((run_id(&h.run_id)?, h.lease_token)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let answers = state
        .engine
        .heartbeat_for(&w.name, &leases)
        .await
        .map_err(unavailable)?;
    Ok(Json(HeartbeatResponse {
        runs: answers
            .into_iter()
            .map(|(id, d)| wire::directive_to_wire(id, d))
            .collect(),
    }))
}

/// Output of a run, numbered: a resend is stored once; a gap is 409 with the number
/// expected; a run the worker no longer holds is 410.
#[utoipa::path(post, path = "/api/worker/v1/runs/{id}/output", tag = "workers",
    params(("id" = String, Path)),
    request_body = OutputRequest,
    responses((status = 200, body = OutputResponse), (status = 409, body = OutputGap), (status = 410, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn output(
    State(state): State<AppState>,
    _w: WorkerCaller,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    let req: OutputRequest = parse(&body)?;
    let pieces: Vec<OutputPiece> = req.pieces.into_iter().map(OutputPiece::from).collect();
    let appended = state
        .engine
        .append_output(id, &req.lease_token, req.first, &pieces, req.at_end)
        .await
        .map_err(unavailable)?;
    Ok(match appended {
        Appended::Stored { next } => Json(OutputResponse { next }).into_response(),
        Appended::Gap { expected } => (
            StatusCode::CONFLICT,
            Json(OutputGap {
                detail: format!("output is missing before {}", req.first),
                expected,
            }),
        )
            .into_response(),
        Appended::LeaseLost => lease_lost(),
        Appended::OverLimit => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(serde_json::json!({"detail": "the run's stored output would pass limits.max_output_bytes"})),
        )
            .into_response(),
    })
}

fn lease_lost() -> Response {
    (
        StatusCode::GONE,
        Json(serde_json::json!({"detail": "the worker no longer holds this run"})),
    )
        .into_response()
}

/// Progress of a run (pending reason, phase, started, output truncated).
#[utoipa::path(post, path = "/api/worker/v1/runs/{id}/progress", tag = "workers",
    params(("id" = String, Path)),
    request_body = ProgressRequest,
    responses((status = 200, body = HeldResponse), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn progress(
    State(state): State<AppState>,
    _w: WorkerCaller,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<HeldResponse>, ApiError> {
    let id = run_id(&id)?;
    let req: ProgressRequest = parse(&body)?;
    let token = req.lease_token.clone();
    let p = wire::progress_from_wire(req).map_err(|field| {
        ApiError::Validation(vec![FieldError {
            loc: vec!["body".into(), field.into()],
            msg: "kind is one of reason, phase (both with text), running, truncated".into(),
            kind: "value_error".into(),
            input: None,
        }])
    })?;
    let held = state
        .engine
        .progress(id, &token, p)
        .await
        .map_err(unavailable)?;
    Ok(Json(HeldResponse { held }))
}

/// How a run ended (idempotent).
#[utoipa::path(post, path = "/api/worker/v1/runs/{id}/finish", tag = "workers",
    params(("id" = String, Path)),
    request_body = FinishRequest,
    responses((status = 200, body = HeldResponse), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn finish(
    State(state): State<AppState>,
    w: WorkerCaller,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<HeldResponse>, ApiError> {
    let id = run_id(&id)?;
    let req: FinishRequest = parse(&body)?;
    if !req.status.is_terminal() {
        return Err(ApiError::Validation(vec![FieldError {
            loc: vec!["body".into(), "status".into()],
            msg: "an end is one of completed, failed, system_failure, aborted, cancelled".into(),
            kind: "value_error".into(),
            input: Some(serde_json::json!(req.status)),
        }]));
    }
    let end = RunEnd {
        status: req.status,
        return_code: req.return_code,
        error: req.error,
        timed_out: req.timed_out,
    };
    let held = state
        .engine
        .finish_for(&w.name, id, &req.lease_token, end)
        .await
        .map_err(unavailable)?;
    Ok(Json(HeldResponse { held }))
}

/// Samples of the worker's running runs.
#[utoipa::path(post, path = "/api/worker/v1/samples", tag = "workers",
    request_body = SamplesRequest,
    responses((status = 204), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn samples(
    State(state): State<AppState>,
    w: WorkerCaller,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    let req: SamplesRequest = parse(&body)?;
    let bad = |e: String| ApiError::BadRequest(e);
    let system = req
        .system
        .into_iter()
        .map(TryInto::try_into)
        .collect::<Result<Vec<_>, String>>()
        .map_err(bad)?;
    let gpus = req
        .gpus
        .into_iter()
        .map(TryInto::try_into)
        .collect::<Result<Vec<_>, String>>()
        .map_err(bad)?;
    // Only samples of runs this worker holds are kept.
    let mut mine = std::collections::HashMap::new();
    for id in system
        .iter()
        .map(|s: &Sample| s.run_id)
        .chain(gpus.iter().filter_map(|g: &GpuSample| g.run_id))
    {
        if let std::collections::hash_map::Entry::Vacant(e) = mine.entry(id) {
            let held = state.store.get_run(id).await?.is_some_and(|r| {
                !r.status.is_terminal() && r.worker_id.as_deref() == Some(w.name.as_str())
            });
            e.insert(held);
        }
    }
    let system = system.into_iter().filter(|s| mine[&s.run_id]).collect();
    let gpus = gpus
        .into_iter()
        .filter(|g| g.run_id.is_some_and(|id| mine[&id]))
        .collect();
    state
        .engine
        .store_samples(system, gpus)
        .await
        .map_err(unavailable)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Bytes an org's runs hold (for its output limit).
#[utoipa::path(get, path = "/api/worker/v1/orgs/{org}/output-used", tag = "workers",
    params(("org" = String, Path)),
    responses((status = 200, body = OrgOutputUsed), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn org_output_used(
    State(state): State<AppState>,
    w: WorkerCaller,
    Path(org): Path<String>,
) -> Result<Json<OrgOutputUsed>, ApiError> {
    // Only for the orgs of runs this worker holds.
    let holds = state
        .store
        .active_runs()
        .await?
        .iter()
        .any(|r| r.org_id.0 == org && r.worker_id.as_deref() == Some(w.name.as_str()));
    if !holds {
        return Err(ApiError::NotFound(
            "no run of this org is held by this worker".into(),
        ));
    }
    let used = state
        .engine
        .org_output_used(&OrgId(org))
        .await
        .map_err(unavailable)?;
    Ok(Json(OrgOutputUsed { used }))
}
