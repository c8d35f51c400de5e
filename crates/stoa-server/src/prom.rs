//! The platform's own metrics in the Prometheus text format: runs by state, queue depth
//! per profile, run durations by type and final state, live stream readers, store
//! operation latency and sampler lag.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

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
#[derive(Default)]
pub struct EngineStats {
    runs: Mutex<BTreeMap<(String, String), Histogram>>,
    sampler_lag_micros: AtomicU64,
    reconciler: Mutex<LoopOutcome>,
    reaper: Mutex<LoopOutcome>,
}

/// The outcome of a background loop (reconciler, retention) so far.
#[derive(Debug, Clone, Default)]
pub struct LoopOutcome {
    /// Passes done (failed ones included).
    pub passes: u64,
    /// What passes removed, by kind (`""` for a loop with one kind).
    pub removed: BTreeMap<&'static str, u64>,
    /// When the last pass ended (Unix seconds; 0 before the first).
    pub last_pass: f64,
    /// The last pass's error, when it failed.
    pub last_error: Option<String>,
}

impl LoopOutcome {
    /// An outcome that counts what is removed under these kinds (zero until a pass).
    pub fn with_kinds(kinds: &[&'static str]) -> Self {
        LoopOutcome {
            removed: kinds.iter().map(|k| (*k, 0)).collect(),
            ..Default::default()
        }
    }

    /// Records a pass and what it removed of each kind.
    pub fn record(&mut self, removed: &[(&'static str, u64)], error: Option<String>) {
        self.passes += 1;
        for (kind, n) in removed {
            *self.removed.entry(kind).or_default() += n;
        }
        self.last_pass = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_error = error;
    }

    /// Writes the loop's series: `stoa_<name>_passes_total`, `…_removed_total` (with a
    /// `what` label per kind when there are several), `…_last_pass_timestamp_seconds`,
    /// `…_last_pass_failed`. `removed_help` says what is counted.
    pub fn render(&self, out: &mut String, name: &str, removed_help: &str) {
        let _ = write!(
            out,
            "# HELP stoa_{name}_passes_total Passes of the {name} loop.\n# TYPE stoa_{name}_passes_total counter\nstoa_{name}_passes_total {}\n\
             # HELP stoa_{name}_removed_total {removed_help}\n# TYPE stoa_{name}_removed_total counter\n",
            self.passes,
        );
        if self.removed.is_empty() {
            let _ = writeln!(out, "stoa_{name}_removed_total 0");
        }
        for (kind, n) in &self.removed {
            if kind.is_empty() {
                let _ = writeln!(out, "stoa_{name}_removed_total {n}");
            } else {
                let _ = writeln!(out, "stoa_{name}_removed_total{{what=\"{kind}\"}} {n}");
            }
        }
        let _ = write!(
            out,
            "# HELP stoa_{name}_last_pass_timestamp_seconds When the {name} loop's last pass ended.\n# TYPE stoa_{name}_last_pass_timestamp_seconds gauge\nstoa_{name}_last_pass_timestamp_seconds {}\n\
             # HELP stoa_{name}_last_pass_failed 1 when the {name} loop's last pass failed.\n# TYPE stoa_{name}_last_pass_failed gauge\nstoa_{name}_last_pass_failed {}\n",
            self.last_pass,
            u8::from(self.last_error.is_some())
        );
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

    /// Records a reconciler pass.
    pub fn reconciled(&self, removed: usize, error: Option<String>) {
        self.reconciler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&[("", removed as u64)], error);
    }

    /// Records a pass of the lease reaper: how many runs it ended, or why it failed.
    pub fn reaped(&self, outcome: Result<usize, String>) {
        let (n, error) = match outcome {
            Ok(n) => (n as u64, None),
            Err(e) => (0, Some(e)),
        };
        self.reaper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&[("", n)], error);
    }

    /// Records how late the sampler's last tick was.
    pub fn set_sampler_lag(&self, secs: f64) {
        self.sampler_lag_micros
            .store((secs * 1e6) as u64, Ordering::Relaxed);
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
    let _ = writeln!(
        out,
        "stoa_sampler_lag_seconds {}",
        state
            .engine
            .stats
            .sampler_lag_micros
            .load(Ordering::Relaxed) as f64
            / 1e6
    );
    state
        .engine
        .stats
        .reconciler
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .render(
            &mut out,
            "reconciler",
            "Orphaned containers, networks and volumes the reconciler removed.",
        );
    state
        .engine
        .stats
        .reaper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .render(
            &mut out,
            "reaper",
            "Runs the lease reaper ended because their worker was lost.",
        );
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
