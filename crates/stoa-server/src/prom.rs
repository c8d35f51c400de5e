//! The platform's own metrics in the Prometheus text format: runs by state, queue depth
//! per profile, run durations by type and final state, live stream readers, store
//! operation latency and sampler lag.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::Mutex;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use stoa_core::loops::{Loop, WorkerStats};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Upper bounds of the run duration histogram, in seconds.
const RUN_BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 3600.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Counters the engine keeps for `/metrics`.
pub struct EngineStats {
    runs: Mutex<BTreeMap<(String, String), Histogram>>,
    /// The embedded worker's (zero without one).
    pub worker: Arc<WorkerStats>,
    /// The lease reaper's loop.
    pub reaper: Loop,
}

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            runs: Default::default(),
            worker: Default::default(),
            reaper: Loop::new(
                "reaper",
                "removed",
                "Runs the lease reaper ended because their worker was lost.",
                &[""],
            ),
        }
    }
}

impl EngineStats {
    /// Records the duration of an ended run.
    pub fn observe_run(&self, job_type: &str, state: &str, secs: f64) {
        let mut m = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let h = m
            .entry((job_type.to_string(), state.to_string()))
            .or_insert_with(|| Histogram {
                counts: vec![0; RUN_BUCKETS.len()],
                ..Default::default()
            });
        for (i, b) in RUN_BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }
}

/// Renders the exposition text.
pub async fn render(state: &AppState) -> Result<String, ApiError> {
    let mut out = String::new();
    let by_state = state.store.count_all_by_status().await?;
    out.push_str("# HELP stoa_runs Runs in the store by state.\n# TYPE stoa_runs gauge\n");
    for st in stoa_types::RunStatus::ALL {
        let n = by_state.get(st.as_str()).copied().unwrap_or(0);
        let _ = writeln!(out, "stoa_runs{{state=\"{st}\"}} {n}");
    }
    out.push_str("# HELP stoa_queue_depth Runs queued on this worker per hardware profile.\n# TYPE stoa_queue_depth gauge\n");
    for (profile, n) in state.engine.queue_depths() {
        let _ = writeln!(out, "stoa_queue_depth{{profile=\"{profile}\"}} {n}");
    }
    out.push_str("# HELP stoa_run_duration_seconds Running time of ended runs.\n# TYPE stoa_run_duration_seconds histogram\n");
    let runs = state
        .engine
        .stats
        .runs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for ((job_type, st), h) in &runs {
        let labels = format!("type=\"{job_type}\",state=\"{st}\"");
        for (i, b) in RUN_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "stoa_run_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "stoa_run_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "stoa_run_duration_seconds_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(
            out,
            "stoa_run_duration_seconds_count{{{labels}}} {}",
            h.count
        );
    }
    out.push_str(
        "# HELP stoa_sse_readers Output streams being read now.\n# TYPE stoa_sse_readers gauge\n",
    );
    let _ = writeln!(out, "stoa_sse_readers {}", state.hub.readers());
    let ops = stoa_store::op_stats();
    out.push_str("# HELP stoa_store_operation_seconds Latency of store operations.\n# TYPE stoa_store_operation_seconds histogram\n");
    for (b, n) in ops.buckets {
        let _ = writeln!(out, "stoa_store_operation_seconds_bucket{{le=\"{b}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "stoa_store_operation_seconds_bucket{{le=\"+Inf\"}} {}",
        ops.count
    );
    let _ = writeln!(out, "stoa_store_operation_seconds_sum {}", ops.sum_secs);
    let _ = writeln!(out, "stoa_store_operation_seconds_count {}", ops.count);
    out.push_str("# HELP stoa_sampler_lag_seconds How late the last sampler tick ran.\n# TYPE stoa_sampler_lag_seconds gauge\n");
    let stats = &state.engine.stats;
    let _ = writeln!(
        out,
        "stoa_sampler_lag_seconds {}",
        stats.worker.sampler_lag()
    );
    out.push_str("# HELP stoa_warm_sandboxes_ready Warm sandboxes of Python runs waiting for a run, their prior imports done (the embedded worker's, as of its last tending).\n# TYPE stoa_warm_sandboxes_ready gauge\n");
    let _ = writeln!(
        out,
        "stoa_warm_sandboxes_ready {}",
        stats.worker.warm_ready()
    );
    stats.worker.reconciler.render(&mut out);
    stats.reaper.render(&mut out);
    state.deliverer.passes.render(&mut out);
    let disk = state.engine.disk();
    out.push_str("# HELP stoa_data_dir_free_bytes Free bytes under the data directory.\n# TYPE stoa_data_dir_free_bytes gauge\n");
    let _ = writeln!(out, "stoa_data_dir_free_bytes {}", disk.free_bytes());
    out.push_str("# HELP stoa_data_dir_low_space 1 while free space is below limits.min_free_bytes or a store write failed (new runs are refused).\n# TYPE stoa_data_dir_low_space gauge\n");
    let _ = writeln!(
        out,
        "stoa_data_dir_low_space {}",
        u8::from(disk.refusal().is_some())
    );
    state.retention.render(&mut out);
    Ok(out)
}

fn text(body: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// `/metrics` on its own listener (no auth).
pub async fn open_metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(text(render(&state).await?))
}

/// `/metrics` on the API address: admin keys only.
pub async fn admin_metrics(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    if !caller.is_admin {
        return Err(ApiError::Forbidden("/metrics needs an admin key".into()));
    }
    Ok(text(render(&state).await?))
}
