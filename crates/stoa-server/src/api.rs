//! The HTTP API. Routes and the OpenAPI document come from the same declarations
//! (`#[utoipa::path]` on each handler, collected by `routes!`).

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use serde_json::Value;
use stoa_store::{OutputStream, Run, RunFilter};
use stoa_types::{
    AvailableHardwareResponse, ErrorBody, ExecutionRecord, ExecutionSummary, FieldError,
    HistoryResponse, LogEntry, LogsResponse, MachineType, MachineTypesResponse, MessageResponse,
    OrgResponse, Phase, ProfileWorker, RunId, RunResult, RunStatus, StartResponse,
    StreamingStatusResponse, TimingResponse,
};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use stoa_core::time::{Time, stamp};

use crate::app::{self, Start};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Prefix of the Lyceum-compatible API.
pub const PREFIX: &str = "/api/v2/external";

#[derive(OpenApi)]
#[openapi(
    info(title = "Stoa runs API", description = "Lyceum-compatible API for ephemeral compute runs."),
    paths(crate::storage::download, crate::storage::delete),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The API router (without state) and its OpenAPI document.
pub fn router() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(start_python))
        .routes(routes!(start_image))
        .routes(routes!(start_compose))
        .routes(routes!(crate::selection::start))
        .routes(routes!(crate::selection::status))
        .routes(routes!(crate::storage::list_files))
        .routes(routes!(crate::storage::upload))
        .routes(routes!(crate::storage::creds::credentials))
        .route(
            "/api/v2/external/storage/download/{*key}",
            axum::routing::get(crate::storage::download),
        )
        .route(
            "/api/v2/external/storage/delete/{*key}",
            axum::routing::delete(crate::storage::delete),
        )
        .routes(routes!(list_workloads))
        .routes(routes!(history))
        .routes(routes!(get_execution, delete_execution))
        .routes(routes!(get_timing))
        .routes(routes!(crate::run_metrics::metrics))
        .routes(routes!(get_logs))
        .routes(routes!(abort))
        .routes(routes!(stop))
        .routes(routes!(streaming_status))
        .routes(routes!(machine_types))
        .routes(routes!(available_hardware))
        .routes(routes!(user_org))
        .routes(routes!(crate::sse::stream_post, crate::sse::stream_get))
        .routes(routes!(
            crate::env_vars::list,
            crate::env_vars::upsert,
            crate::env_vars::delete_all
        ))
        .route(
            "/api/v2/external/environment-variables",
            axum::routing::get(crate::env_vars::list)
                .post(crate::env_vars::upsert)
                .delete(crate::env_vars::delete_all),
        )
        .routes(routes!(crate::env_vars::delete_one))
        .routes(routes!(crate::callbacks::get_secret))
        .routes(routes!(crate::callbacks::rotate_secret))
        .routes(routes!(crate::workers::register))
        .routes(routes!(crate::workers::claim))
        .routes(routes!(crate::workers::assignment))
        .routes(routes!(crate::workers::heartbeat))
        .routes(routes!(crate::workers::output))
        .routes(routes!(crate::workers::progress))
        .routes(routes!(crate::workers::finish))
        .routes(routes!(crate::workers::samples))
        .routes(routes!(crate::workers::org_output_used))
        .split_for_parts()
}

/// The router and its document, every operation's error answers documented.
pub fn router_and_document() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, doc) = router();
    (router, with_error_responses(doc))
}

/// Documents the error answers every operation may give, where its declaration does
/// not: 401 (it needs a key), 404 (its path names something), 413 and 429 (it takes a
/// body), 422 (a parameter or body is checked), 500 and 503 (the store is away). Each
/// is an [`ErrorBody`].
fn with_error_responses(doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let mut v = serde_json::to_value(&doc).expect("the document serialises");
    let error = |what: &str| {
        serde_json::json!({
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    if let Some(paths) = v.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                let secured = op.get("security").is_some();
                let has_body = op.get("requestBody").is_some();
                let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                    continue;
                };
                let mut add = |code: &str, what: &str| {
                    responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(what));
                };
                if secured || path.starts_with("/api/worker/") {
                    add("401", "no key, or an invalid or revoked one");
                }
                if path.contains('{') {
                    add("404", "not found (or another org's)");
                }
                if has_body || method == "post" {
                    add("413", "the body is larger than limits.max_body_bytes");
                    add("429", "a quota is reached");
                }
                add(
                    "422",
                    "a parameter or the body is invalid (`detail` names each field)",
                );
                add("500", "an internal error (logged by the server)");
                add(
                    "503",
                    "the store is unavailable or the server is shutting down",
                );
            }
        }
    }
    serde_json::from_value(v).expect("the document reads back")
}

/// A request body, its size checked against `limits.max_body_bytes` with an API error.
pub struct Body(pub Bytes);

impl axum::extract::FromRequest<AppState> for Body {
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Body(b)),
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge(format!(
                    "the request body is larger than limits.max_body_bytes ({} bytes)",
                    state.config.limits.max_body_bytes
                )))
            }
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// Parses a JSON body; malformed JSON is a 422 like FastAPI's.
pub(crate) fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::Validation(vec![FieldError {
            loc: vec!["body".into()],
            msg: format!("JSON decode error: {e}"),
            kind: "json_invalid".into(),
            input: None,
        }])
    })
}

/// Start a Python run.
#[utoipa::path(post, path = "/api/v2/external/execution/streaming/start", tag = "runs",
    request_body = stoa_types::PythonStartRequest,
    responses((status = 200, body = StartResponse), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn start_python(
    State(state): State<AppState>,
    caller: Caller,
    Body(body): Body,
) -> Result<Json<StartResponse>, ApiError> {
    let body = parse_body(&body)?;
    Ok(Json(
        app::submit(&state, &caller.org.id, Start::Python, &body).await?,
    ))
}

/// Start a Docker image run.
#[utoipa::path(post, path = "/api/v2/external/execution/image/start", tag = "runs",
    request_body = stoa_types::ImageStartRequest,
    responses((status = 200, body = StartResponse), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn start_image(
    State(state): State<AppState>,
    caller: Caller,
    Body(body): Body,
) -> Result<Json<StartResponse>, ApiError> {
    let body = parse_body(&body)?;
    Ok(Json(
        app::submit(&state, &caller.org.id, Start::Image, &body).await?,
    ))
}

/// Start a Docker Compose run. The file is checked against the supported subset
/// (README) with the org's variables interpolated; every problem is one 422 entry.
#[utoipa::path(post, path = "/api/v2/external/execution/compose/start", tag = "runs",
    request_body = stoa_types::ComposeStartRequest,
    responses((status = 200, body = StartResponse), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn start_compose(
    State(state): State<AppState>,
    caller: Caller,
    Body(body): Body,
) -> Result<Json<StartResponse>, ApiError> {
    let body = parse_body(&body)?;
    Ok(Json(
        app::submit(&state, &caller.org.id, Start::Compose, &body).await?,
    ))
}

/// Seconds from `start` to `end` (or until now when `end` is `None`).
pub(crate) fn seconds_between(start: &Time, end: Option<&Time>) -> f64 {
    stoa_core::time::seconds(start, end.unwrap_or(&stoa_core::time::now()))
}

/// A time as the wire writes it.
fn wire_time(t: &Option<Time>) -> Option<String> {
    t.as_ref().map(stamp)
}

/// Cost of a run: its running time times the profile's hourly price.
pub(crate) fn billed(run: &Run) -> f64 {
    let secs = run
        .job_start
        .as_ref()
        .map(|s| seconds_between(s, run.job_end.as_ref()))
        .unwrap_or(0.0);
    let price = run.price_per_hour.unwrap_or(0.0);
    (secs / 3600.0 * price * 1e6).round() / 1e6
}

fn system_errors(run: &Run) -> Vec<String> {
    match run.status {
        RunStatus::SystemFailure
        | RunStatus::Failed
        | RunStatus::Aborted
        | RunStatus::Cancelled => run.error.iter().cloned().collect(),
        _ => vec![],
    }
}

fn summary(state: &AppState, run: &Run) -> ExecutionSummary {
    // Lists show many rows: read only the bundled file names, not the code and files.
    #[derive(serde::Deserialize)]
    struct Imports {
        #[serde(default)]
        import_files: BTreeMap<String, serde::de::IgnoredAny>,
    }
    let local_imports = serde_json::from_str::<Imports>(&run.spec)
        .map(|s| s.import_files.into_keys().collect())
        .unwrap_or_default();
    ExecutionSummary {
        execution_id: run.id.to_string(),
        created_at: stamp(&run.created_at),
        execution_type: run.execution_type.clone(),
        status: run.status,
        hardware_profile: run.execution_type.clone(),
        status_details: run.error.clone().or_else(|| state.engine.live_reason(run)),
        local_imports,
        billed: billed(run),
        execelet_start: wire_time(&run.job_start),
        start_time: wire_time(&run.job_start),
        end_time: wire_time(&run.job_end),
        finish_time: wire_time(&run.job_end),
        job_start: wire_time(&run.job_start),
        job_end: wire_time(&run.job_end),
        file_name: run.file_name.clone(),
        errors_docker: None,
        parent_execution_id: run.parent_id.map(|p| p.to_string()),
        job_type: run.job_type.to_string(),
        metadata: run.metadata.clone(),
        return_code: run.return_code,
        pending_reason: state.engine.live_reason(run),
        run_name: run.run_name.clone(),
        labels: run.labels.clone(),
        priority: run.priority,
    }
}

/// Parses an optional integer query parameter within `min..=max`.
fn query_int(
    q: &HashMap<String, String>,
    name: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ApiError> {
    let Some(raw) = q.get(name) else {
        return Ok(default);
    };
    let input = Some(Value::String(raw.clone()));
    let n: i64 = raw.trim().parse().map_err(|_| {
        ApiError::query(
            name,
            "int_parsing",
            "Input should be a valid integer",
            input.clone(),
        )
    })?;
    if n < min {
        return Err(ApiError::query(
            name,
            "greater_than_equal",
            format!("Input should be greater than or equal to {min}"),
            input,
        ));
    }
    if n > max {
        return Err(ApiError::query(
            name,
            "less_than_equal",
            format!("Input should be less than or equal to {max}"),
            input,
        ));
    }
    Ok(n)
}

/// Most runs one `workloads/list` reply carries, and its default: the official client
/// sends no `limit` and takes the reply for all active runs.
const WORKLOADS_MAX_LIMIT: i64 = 1000;

/// Active runs (pending, starting, running), newest first; `status` (comma-separated)
/// filters across all runs instead.
///
/// The reply is a bare array (the official client needs one), one page of `limit` runs
/// from `offset`; `X-Total-Count` counts the runs that match over all pages, and
/// `Link: <…>; rel="next"` names the next page while more remain.
#[utoipa::path(get, path = "/api/v2/external/workloads/list", tag = "runs",
    params(("status" = Option<String>, Query, description = "comma-separated states (empty: the active runs)",
            pattern = "^$|^(pending|starting|running|completed|failed|system_failure|aborted|cancelled)(,(pending|starting|running|completed|failed|system_failure|aborted|cancelled))*$"),
        ("label" = Option<String>, Query, description = "only runs with this label"),
        ("run_name" = Option<String>, Query, description = "only runs of this name"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "1..1000, default 1000"),
        ("offset" = Option<i64>, Query, minimum = 0, description = "runs to skip, default 0")),
    responses((status = 200, body = Vec<ExecutionSummary>, headers(
            ("X-Total-Count" = i64, description = "runs that match, over all pages"),
            ("Link" = String, description = "`<URL>; rel=\"next\"`: the next page, while more runs match"))),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_workloads(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(HeaderMap, Json<Vec<ExecutionSummary>>), ApiError> {
    let limit = query_int(&q, "limit", WORKLOADS_MAX_LIMIT, 1, WORKLOADS_MAX_LIMIT)?;
    let offset = query_int(&q, "offset", 0, 0, i64::MAX)?;
    let statuses = match q.get("status").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => vec![RunStatus::Pending, RunStatus::Starting, RunStatus::Running],
        Some(s) => s
            .split(',')
            .map(|x| {
                x.trim().parse::<RunStatus>().map_err(|e| {
                    ApiError::query("status", "enum", e, Some(Value::String(x.to_string())))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let filter = RunFilter {
        statuses,
        limit,
        offset,
        label: q.get("label").cloned(),
        run_name: q.get("run_name").cloned(),
        ..Default::default()
    };
    let runs = state.store.list_runs(&caller.org.id, &filter).await?;
    let total = state.store.count_runs(&caller.org.id, &filter).await?;
    let mut headers = HeaderMap::new();
    headers.insert("x-total-count", HeaderValue::from(total));
    let next = offset.saturating_add(runs.len() as i64);
    if !runs.is_empty() && next < total {
        // From `public_url` like every URL handed out, never from the `Host` header.
        let mut url = reqwest::Url::parse(&format!(
            "{}{PREFIX}/workloads/list",
            state.config.base_url()
        ))
        .map_err(|e| ApiError::Internal(format!("public_url: {e}")))?;
        {
            let mut pairs = url.query_pairs_mut();
            for name in ["status", "label", "run_name"] {
                if let Some(v) = q.get(name) {
                    pairs.append_pair(name, v);
                }
            }
            pairs.append_pair("limit", &limit.to_string());
            pairs.append_pair("offset", &next.to_string());
        }
        let link = HeaderValue::try_from(format!("<{url}>; rel=\"next\""))
            .map_err(|e| ApiError::Internal(format!("link header: {e}")))?;
        headers.insert(header::LINK, link);
    }
    Ok((
        headers,
        Json(runs.iter().map(|r| summary(&state, r)).collect()),
    ))
}

/// The org's runs, newest first, with totals.
#[utoipa::path(get, path = "/api/v2/external/billing/history", tag = "runs",
    params(("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "1..1000, default 50"),
        ("offset" = Option<i64>, Query, minimum = 0),
        ("label" = Option<String>, Query, description = "only runs with this label"),
        ("run_name" = Option<String>, Query, description = "only runs of this name")),
    responses((status = 200, body = HistoryResponse), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
async fn history(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let limit = query_int(&q, "limit", 50, 1, 1000)?;
    let offset = query_int(&q, "offset", 0, 0, i64::MAX)?;
    let runs = state
        .store
        .list_runs(
            &caller.org.id,
            &RunFilter {
                statuses: vec![],
                limit,
                offset,
                label: q.get("label").cloned(),
                run_name: q.get("run_name").cloned(),
                ..Default::default()
            },
        )
        .await?;
    let counts = state.store.count_runs_by_status(&caller.org.id).await?;
    let total = counts.values().sum();
    let spent = state.store.total_billed(&caller.org.id).await?;
    let executions: Vec<ExecutionSummary> = runs.iter().map(|r| summary(&state, r)).collect();
    Ok(Json(HistoryResponse {
        total_credits_spent: (spent * 1e6).round() / 1e6,
        executions,
        total_executions: total,
        limit,
        offset,
        counts_by_status: counts,
    }))
}

/// The record of a run, with the start of its output.
///
/// `stdout` and `stderr` together hold at most `limits.max_output_per_reply_bytes`
/// (`record_output_truncated` says when more exists); the whole output is read from
/// the stream.
#[utoipa::path(get, path = "/api/v2/external/execution/{id}", tag = "runs",
    params(("id" = String, Path)),
    responses((status = 200, body = ExecutionRecord), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_execution(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ExecutionRecord>, ApiError> {
    let run = app::load_run(&state, &caller.org.id, &id).await?;
    let callbacks = state
        .store
        .deliveries_for_run(run.id)
        .await?
        .into_iter()
        .map(|d| stoa_types::CallbackDelivery {
            next_attempt_at: (d.state == stoa_store::DeliveryState::Pending)
                .then(|| stamp(&d.next_attempt_at)),
            url: d.url,
            state: d.state.as_str().into(),
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
        })
        .collect();
    let (stdout, stderr, record_output_truncated) = output_head(
        &state,
        run.id,
        state.config.limits.max_output_per_reply_bytes,
    )
    .await?;
    Ok(Json(ExecutionRecord {
        execution_id: run.id.to_string(),
        status: run.status,
        job_type: run.job_type.to_string(),
        execution_type: run.execution_type.clone(),
        hardware_profile: run.execution_type.clone(),
        file_name: run.file_name.clone(),
        created_at: stamp(&run.created_at),
        job_start: wire_time(&run.job_start),
        job_end: wire_time(&run.job_end),
        return_code: run.return_code,
        billed: billed(&run),
        system_errors: system_errors(&run),
        pending_reason: state.engine.live_reason(&run),
        phases: run
            .phases
            .iter()
            .map(|(p, at)| Phase {
                phase: p.clone(),
                at: stamp(at),
            })
            .collect(),
        priority: run.priority,
        gpu_ids: run.gpu_ids.clone(),
        parent_execution_id: run.parent_id.map(|p| p.to_string()),
        slurm_job_id: run.slurm_job_id.clone(),
        ports: if crate::ports::proxied(&state, &run) {
            run.ports.keys().copied().collect()
        } else {
            vec![]
        },
        timeout: run.timeout_s,
        stdout,
        stderr,
        result: RunResult {
            return_code: run.return_code,
            error: run.error.clone(),
        },
        user_callback_urls: run.callback_urls.clone(),
        run_name: run.run_name.clone(),
        labels: run.labels.clone(),
        metadata: run.metadata.clone(),
        output_truncated: run.output_truncated,
        record_output_truncated,
        output_expired: run.output_expired,
        callbacks,
        metrics_summary: state
            .store
            .metrics_summary(run.id)
            .await?
            .and_then(|s| serde_json::from_str(&s).ok()),
    }))
}

/// Output chunks and bytes read from the store at a time for a record.
const RECORD_PAGE: i64 = 500;
const RECORD_PAGE_BYTES: usize = 256 * 1024;

/// The first `cap` bytes of a run's output as (stdout, stderr, cut), read a page at a
/// time: memory per request stays near `cap`, whatever the size of the output. Stoa's
/// own lines count as stdout; `cut` is true when output exists past the cap.
async fn output_head(
    state: &AppState,
    id: RunId,
    cap: usize,
) -> Result<(String, String, bool), ApiError> {
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut used = 0;
    let mut after = 0;
    loop {
        // Never more than what is left of the cap (the store still returns one chunk
        // when nothing is left, which tells whether there is more).
        let budget = (cap - used).clamp(1, RECORD_PAGE_BYTES);
        let chunks = state
            .store
            .read_output(id, after, RECORD_PAGE, budget)
            .await?;
        let Some(last) = chunks.last() else {
            return Ok((stdout, stderr, false));
        };
        after = last.seq;
        for c in chunks {
            let out = match c.stream {
                OutputStream::Stderr => &mut stderr,
                _ => &mut stdout,
            };
            let room = cap - used;
            if c.content.len() > room {
                // Cut on a character boundary so the reply stays valid UTF-8.
                let mut end = room;
                while !c.content.is_char_boundary(end) {
                    end -= 1;
                }
                out.push_str(&c.content[..end]);
                return Ok((stdout, stderr, true));
            }
            used += c.content.len();
            out.push_str(&c.content);
        }
    }
}

/// Deletes a run that has ended, with its output.
#[utoipa::path(delete, path = "/api/v2/external/execution/{id}", tag = "runs",
    params(("id" = String, Path)),
    responses((status = 200, body = MessageResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_execution(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MessageResponse>, ApiError> {
    Ok(Json(app::delete(&state, &caller.org.id, &id).await?))
}

/// Start, end and duration of a run.
#[utoipa::path(get, path = "/api/v2/external/execution/{id}/timing", tag = "runs",
    params(("id" = String, Path)),
    responses((status = 200, body = TimingResponse), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_timing(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TimingResponse>, ApiError> {
    let run = app::load_run(&state, &caller.org.id, &id).await?;
    let duration_seconds = match (&run.job_start, &run.job_end) {
        (Some(s), Some(e)) => Some(seconds_between(s, Some(e))),
        _ => None,
    };
    Ok(Json(TimingResponse {
        execution_id: run.id.to_string(),
        created_at: stamp(&run.created_at),
        start_time: wire_time(&run.job_start),
        end_time: wire_time(&run.job_end),
        duration_seconds,
    }))
}

/// Stored output lines of a run: the last `limit` within the last `hours`.
///
/// No more than `limits.max_output_per_reply_bytes` of output (the newest lines are
/// kept); `total` counts every line in the window.
#[utoipa::path(get, path = "/api/v2/external/logs/execution/{id}", tag = "runs",
    params(("id" = String, Path), ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000, description = "1..10000, default 1000"),
        ("hours" = Option<i64>, Query, minimum = 1, maximum = 168, description = "1..168, default 24")),
    responses((status = 200, body = LogsResponse), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<LogsResponse>, ApiError> {
    let limit = query_int(&q, "limit", 1000, 1, 10_000)?;
    let hours = query_int(&q, "hours", 24, 1, 168)?;
    let run = app::load_run(&state, &caller.org.id, &id).await?;
    let since = stoa_core::time::now() - chrono::Duration::hours(hours);
    let (chunks, total) = state
        .store
        .read_logs(
            run.id,
            since,
            limit,
            state.config.limits.max_output_per_reply_bytes,
        )
        .await?;
    let logs = chunks
        .into_iter()
        .map(|c| LogEntry {
            timestamp: stamp(&c.ts),
            message: c.content,
            level: match c.stream {
                OutputStream::Stdout => "info",
                OutputStream::Stderr => "error",
                OutputStream::System => "warning",
            }
            .into(),
            execution_id: run.id.to_string(),
            user_id: caller.org.id.0.clone(),
            hostname: state.hostname.to_string(),
            labels: {
                let mut l = BTreeMap::from([("stream".to_string(), c.stream.as_str().to_string())]);
                if let Some(s) = c.service {
                    l.insert("service".to_string(), s);
                }
                l
            },
        })
        .collect();
    Ok(Json(LogsResponse { logs, total }))
}

/// Aborts a run: its processes are killed and confirmed gone; it ends `aborted`.
#[utoipa::path(post, path = "/api/v2/external/workloads/abort/{id}", tag = "runs",
    params(("id" = String, Path)),
    responses((status = 200, body = MessageResponse), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn abort(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MessageResponse>, ApiError> {
    Ok(Json(app::abort(&state, &caller.org.id, &id).await?))
}

/// Stops a run gracefully: SIGTERM, the grace period, then kill; it ends `cancelled`.
#[utoipa::path(post, path = "/api/v2/external/workloads/stop/{id}", tag = "runs",
    params(("id" = String, Path)),
    responses((status = 200, body = MessageResponse), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MessageResponse>, ApiError> {
    Ok(Json(app::stop(&state, &caller.org.id, &id).await?))
}

/// A run's state in the vocabulary of the official client's polling fallback.
#[utoipa::path(get, path = "/api/v2/external/execution/streaming/{id}/status", tag = "runs",
    params(("id" = String, Path)),
    responses((status = 200, body = StreamingStatusResponse), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn streaming_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<StreamingStatusResponse>, ApiError> {
    let run = app::load_run(&state, &caller.org.id, &id).await?;
    let errors = match run.status {
        RunStatus::Completed => None,
        _ => run.error.clone(),
    };
    Ok(Json(StreamingStatusResponse {
        execution_id: run.id.to_string(),
        status: stoa_core::streaming_status(run.status, run.timed_out).to_string(),
        errors,
    }))
}

/// The configured hardware profiles with prices (also the login probe).
#[utoipa::path(get, path = "/api/v2/external/machine-types", tag = "hardware",
    responses((status = 200, body = MachineTypesResponse)), security(("bearer" = [])))]
pub(crate) async fn machine_types(
    State(state): State<AppState>,
    _caller: Caller,
) -> Json<MachineTypesResponse> {
    let depths = state.engine.queue_depths();
    Json(MachineTypesResponse {
        machine_types: state
            .config
            .profiles
            .iter()
            .map(|p| MachineType {
                hardware_profile: p.name.clone(),
                price_per_hour: Some(p.price_per_hour),
                cpus: p.cpus,
                memory_mb: p.memory_mb,
                gpu_count: p.gpu_count,
                gpu_model: p.gpu_model.clone(),
                workers: state
                    .engine
                    .offers_of(&p.name)
                    .into_iter()
                    .map(|o| ProfileWorker {
                        free_slots: if o.draining {
                            0
                        } else {
                            o.slots.saturating_sub(o.running)
                        },
                        name: o.worker,
                        slots: o.slots,
                        draining: o.draining,
                    })
                    .collect(),
                queued: depths.get(&p.name).copied().unwrap_or(0),
            })
            .collect(),
    })
}

/// Profiles the caller may use.
#[utoipa::path(get, path = "/api/v2/external/user/quotas/available-hardware", tag = "hardware",
    responses((status = 200, body = AvailableHardwareResponse)), security(("bearer" = [])))]
async fn available_hardware(
    State(state): State<AppState>,
    _caller: Caller,
) -> Json<AvailableHardwareResponse> {
    Json(AvailableHardwareResponse {
        available_hardware_profiles: state
            .config
            .profiles
            .iter()
            .map(|p| p.name.clone())
            .collect(),
    })
}

/// The org of the calling key.
#[utoipa::path(get, path = "/api/v2/external/user/org", tag = "account",
    responses((status = 200, body = OrgResponse)), security(("bearer" = [])))]
async fn user_org(caller: Caller) -> Json<OrgResponse> {
    Json(OrgResponse {
        org_id: caller.org.id.0.clone(),
        slug: caller.org.slug.clone(),
        name: caller.org.name.clone(),
        is_personal: false,
        is_key_scoped: true,
    })
}
