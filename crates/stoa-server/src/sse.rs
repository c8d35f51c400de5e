//! The output stream (spec §4): replays stored output from the start (or after
//! `Last-Event-ID`), then follows live, and always ends with one `jobFinished`.
//!
//! Each output event's `id:` is the chunk's seq, which has no gaps; so a reader that
//! reconnects with `Last-Event-ID` gets exactly what it has not seen. The stream needs
//! no bearer token (the official client sends none): the run id, 74 random bits in a
//! UUIDv7, is the credential.
//!
//! Each stream holds a slot (see `hub`): at most `limits.max_streams_per_run` per run
//! and `limits.max_streams_per_key` per API key (streams opened without a key count
//! against the run's org); over a cap the stream is refused with 429. Replay reads the
//! store a page at a time (`PAGE` chunks, `PAGE_BYTES` of content), so a reader's memory
//! does not grow with the run's output.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use stoa_store::OutputStream;
use stoa_types::{
    FinishedJob, JobFinished, OutputEvent, RunId, RunResult, StatusEvent, StreamEvent,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::hub::{StreamRefused, StreamSlot};
use crate::state::AppState;

/// Output chunks read from the store at a time.
const PAGE: i64 = 500;
/// Most output bytes read from the store at a time (beyond one chunk).
const PAGE_BYTES: usize = 256 * 1024;

type EventStream =
    Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>;

/// Output stream of a run (POST, as the official client calls it).
#[utoipa::path(post, path = "/api/v1/stream/{id}", tag = "stream",
    params(("id" = String, Path), ("Last-Event-ID" = Option<String>, Header)),
    responses((status = 200, description = "text/event-stream of `data: {json}` events"), (status = 404, body = stoa_types::ErrorBody)))]
pub async fn stream_post(
    state: State<AppState>,
    id: Path<String>,
    headers: HeaderMap,
) -> Result<EventStream, ApiError> {
    stream(state, id, headers).await
}

/// Output stream of a run (GET, for browsers and curl).
#[utoipa::path(get, path = "/api/v1/stream/{id}", tag = "stream",
    params(("id" = String, Path), ("Last-Event-ID" = Option<String>, Header)),
    responses((status = 200, description = "text/event-stream of `data: {json}` events"), (status = 404, body = stoa_types::ErrorBody)))]
pub async fn stream_get(
    state: State<AppState>,
    id: Path<String>,
    headers: HeaderMap,
) -> Result<EventStream, ApiError> {
    stream(state, id, headers).await
}

async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<EventStream, ApiError> {
    let id: RunId = id.parse().map_err(|_| ApiError::run_not_found())?;
    let Some(run) = state.store.get_run(id).await? else {
        return Err(ApiError::run_not_found());
    };
    let holder = holder(&state, &headers, &run.org_id).await?;
    let limits = &state.config.limits;
    let slot = state
        .hub
        .open_stream(
            id,
            holder,
            limits.max_streams_per_run,
            limits.max_streams_per_key,
        )
        .map_err(|r| {
            ApiError::TooManyRequests(match r {
                StreamRefused::Run { open, max } => format!(
                    "too many output streams of this execution: {open} of {max} open (limits.max_streams_per_run); close one and retry"
                ),
                StreamRefused::Holder { open, max } => format!(
                    "too many output streams for this API key: {open} of {max} open (limits.max_streams_per_key); close one and retry"
                ),
            })
        })?;
    let after = stoa_core::resume_after(headers.get("last-event-id").and_then(|v| v.to_str().ok()));
    let (tx, rx) = mpsc::channel(64);
    let keepalive = Duration::from_secs(state.config.limits.sse_keepalive_s.max(1));
    tokio::spawn(follow(state, id, after, tx, slot));
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(keepalive).text("ping")))
}

/// Whom a stream counts against: the API key it carries (`key:<id>`), or, without a
/// valid key (the official client sends none), the org that owns the run (`org:<id>`).
async fn holder(
    state: &AppState,
    headers: &HeaderMap,
    org: &stoa_types::OrgId,
) -> Result<String, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token);
    if let Some(t) = token
        && let Some((key, _)) = state.store.key_by_hash(&crate::auth::hash_key(t)).await?
    {
        return Ok(format!("key:{}", key.id));
    }
    Ok(format!("org:{}", org.0))
}

fn event(id: &str, ev: &StreamEvent) -> Result<Event, Infallible> {
    Ok(Event::default()
        .id(id)
        .data(serde_json::to_string(ev).expect("stream events serialise")))
}

/// Feeds one reader until the run ends, the reader leaves or the server shuts down.
async fn follow(
    state: AppState,
    id: RunId,
    mut after: i64,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    // Held until this reader is done: its return frees the stream slot.
    _slot: StreamSlot,
) {
    let mut changes = state.hub.subscribe(id);
    let mut shutdown = state.shutdown.clone();
    let mut last_status: Option<StatusEvent> = None;
    let mut closing = *shutdown.borrow();
    loop {
        // The state is read before the output: output is stored before a run's terminal
        // state, so once a terminal state is seen, the read below has everything.
        let run = match state.store.get_run(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return, // deleted meanwhile
            Err(e) => {
                tracing::error!(run = %id, error = %e, "stream: reading run failed");
                return;
            }
        };
        let last_id = if after == i64::MAX {
            "end".to_string()
        } else {
            after.to_string()
        };
        if !run.status.is_terminal() {
            let st = StatusEvent {
                status: run.status,
                pending_reason: state.engine.live_reason(&run),
            };
            if last_status.as_ref() != Some(&st) {
                if tx
                    .send(event(&last_id, &StreamEvent::Status(st.clone())))
                    .await
                    .is_err()
                {
                    return;
                }
                last_status = Some(st);
            }
        }
        let chunks = if after == i64::MAX {
            vec![]
        } else {
            match state.store.read_output(id, after, PAGE, PAGE_BYTES).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(run = %id, error = %e, "stream: reading output failed");
                    return;
                }
            }
        };
        // A page cut by lines or by bytes: read on before waiting for changes.
        let full_page = chunks.len() as i64 == PAGE
            || chunks.iter().map(|c| c.content.len()).sum::<usize>() >= PAGE_BYTES / 2;
        for c in chunks {
            after = c.seq;
            let ev = StreamEvent::Output(OutputEvent {
                content: c.content,
                stream: match c.stream {
                    OutputStream::Stdout => None,
                    s => Some(s.as_str().to_string()),
                },
            });
            if tx.send(event(&c.seq.to_string(), &ev)).await.is_err() {
                return;
            }
        }
        if full_page {
            continue;
        }
        if run.status.is_terminal() {
            let fin = StreamEvent::JobFinished(JobFinished {
                job: FinishedJob {
                    result: RunResult {
                        return_code: run.return_code,
                        error: run.error.clone(),
                    },
                    status: Some(run.status),
                },
            });
            let _ = tx.send(event("end", &fin)).await;
            return;
        }
        if closing {
            // The server is closing and the run is not over (still queued).
            return;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
            // One more pass first: a run the shutdown ended gets its `jobFinished`.
            _ = shutdown.changed() => closing = true,
        }
    }
}
