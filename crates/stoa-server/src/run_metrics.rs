//! `GET …/execution/{id}/metrics` (spec §3.9): a run's samples averaged into steps, as
//! camelCase series of `{timestamp, value}`; and the summary kept with a run.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use stoa_store::{GpuSample, Sample};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Parses `5s`, `1m`, `15s`, `2h` into seconds (at least 1 s, at most a day).
pub fn parse_step(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    (1..=86_400).contains(&secs).then_some(secs)
}

fn parse_time(field: &str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::query(
                field,
                "datetime_parsing",
                "Input should be an ISO-8601 date and time",
                Some(s.into()),
            )
        })
}

/// A time as ISO-8601 in UTC, to the second (`2026-12-01T13:15:34Z`).
pub(crate) fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The summary kept with a run once it ends.
pub fn summarize_samples(samples: &[Sample]) -> Value {
    if samples.is_empty() {
        return json!({"samples": 0});
    }
    let n = samples.len() as f64;
    let peak_ram = samples.iter().map(|s| s.ram_used).max().unwrap_or(0);
    let cpu_mean = samples.iter().map(|s| s.cpu_percent).sum::<f64>() / n;
    let cpu_peak = samples.iter().map(|s| s.cpu_percent).fold(0.0, f64::max);
    json!({
        "samples": samples.len(),
        "peak_ram_bytes": peak_ram,
        "mean_cpu_percent": (cpu_mean * 10.0).round() / 10.0,
        "peak_cpu_percent": (cpu_peak * 10.0).round() / 10.0,
        // Filled by `summarize_gpus` for runs that were given GPUs.
        "peak_gpu_memory_bytes": null,
        "gpu_seconds": null,
        "gpu_energy_joules": null,
    })
}

/// Adds the GPU figures to a summary: peak GPU memory (all of the run's GPUs at one
/// time), GPU-seconds (GPUs × running time) and energy (power × sample interval).
pub fn summarize_gpus(
    summary: &mut Value,
    samples: &[GpuSample],
    gpu_count: usize,
    run: &stoa_store::Run,
    interval_s: f64,
) {
    if gpu_count == 0 {
        return;
    }
    if let (Some(s), Some(e)) = (&run.job_start, &run.job_end) {
        let secs = crate::api::seconds_between(s, Some(e));
        summary["gpu_seconds"] = json!((secs * gpu_count as f64 * 10.0).round() / 10.0);
    }
    if samples.is_empty() {
        return;
    }
    let mut mem_at: BTreeMap<DateTime<Utc>, f64> = BTreeMap::new();
    let mut energy = 0.0;
    for s in samples {
        *mem_at.entry(s.ts).or_default() += s.values[2].unwrap_or(0.0);
        energy += s.values[4].unwrap_or(0.0) * interval_s;
    }
    summary["peak_gpu_memory_bytes"] = json!(mem_at.values().cloned().fold(0.0, f64::max));
    summary["gpu_energy_joules"] = json!(energy.round());
}

/// Metrics of a run.
#[utoipa::path(get, path = "/api/v2/external/execution/{id}/metrics", tag = "runs",
    params(("id" = String, Path), ("start" = Option<String>, Query), ("end" = Option<String>, Query),
        ("step" = Option<String>, Query, description = "5s, 1m, … (default 15s)")),
    responses((status = 200, description = "camelCase series of {timestamp, value}"), (status = 404, body = stoa_types::ErrorBody),
        (status = 422, body = stoa_types::ErrorBody)),
    security(("bearer" = [])))]
pub async fn metrics(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let run = crate::app::load_run(&state, &caller.org.id, &id).await?;
    Ok(Json(series(&state, &run, &q).await?))
}

/// The metric series of a run the caller may read, as `metrics` answers them (`q`: its
/// `start`, `end` and `step`).
pub(crate) async fn series(
    state: &AppState,
    run: &stoa_store::Run,
    q: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let step_raw = q.get("step").map(String::as_str).unwrap_or("15s");
    let step = parse_step(step_raw).ok_or_else(|| {
        ApiError::query(
            "step",
            "value_error",
            "step is a number and a unit: 5s, 1m, 2h (1 s to 24 h)",
            Some(step_raw.into()),
        )
    })?;
    let start = match q.get("start") {
        Some(s) => parse_time("start", s)?,
        None => run.job_start.unwrap_or(run.created_at),
    };
    let end = match q.get("end") {
        Some(e) => parse_time("end", e)?,
        None => run.job_end.unwrap_or_else(Utc::now),
    };
    if end < start {
        return Err(ApiError::query(
            "end",
            "value_error",
            "end is before start",
            q.get("end").map(|e| e.as_str().into()),
        ));
    }
    let samples = state.store.samples(run.id, start, end).await?;
    // Average each series per step bucket.
    let mut buckets: BTreeMap<i64, (f64, f64, f64, usize)> = BTreeMap::new();
    for s in &samples {
        let b = (s.ts - start).num_seconds().div_euclid(step);
        let e = buckets.entry(b).or_insert((0.0, 0.0, 0.0, 0));
        e.0 += s.cpu_percent;
        e.1 += s.ram_used as f64;
        e.2 += s.ram_total as f64;
        e.3 += 1;
    }
    let series = |pick: fn(&(f64, f64, f64, usize)) -> f64| -> Vec<Value> {
        buckets
            .iter()
            .map(|(b, v)| json!({"timestamp": iso(start + chrono::Duration::seconds(b * step)), "value": (pick(v) / v.3 as f64 * 100.0).round() / 100.0}))
            .collect()
    };
    // GPU series: every GPU reading of a step averaged (empty when the run had no GPU).
    let gpu = state.store.gpu_samples(run.id, start, end).await?;
    let mut gbuckets: BTreeMap<i64, [(f64, usize); 10]> = BTreeMap::new();
    for s in &gpu {
        let b = (s.ts - start).num_seconds().div_euclid(step);
        let e = gbuckets.entry(b).or_insert([(0.0, 0); 10]);
        for (i, v) in s.values.iter().enumerate() {
            if let Some(v) = v {
                e[i].0 += v;
                e[i].1 += 1;
            }
        }
    }
    let gseries = |i: usize| -> Vec<Value> {
        gbuckets
            .iter()
            .filter(|(_, v)| v[i].1 > 0)
            .map(|(b, v)| json!({"timestamp": iso(start + chrono::Duration::seconds(b * step)), "value": (v[i].0 / v[i].1 as f64 * 100.0).round() / 100.0}))
            .collect()
    };
    Ok(json!({
        "executionId": run.id.to_string(),
        "hostname": state.hostname.to_string(),
        "timeRange": {"start": iso(start), "end": iso(end)},
        "step": step_raw,
        "systemCpuUsagePercent": series(|v| v.0),
        "systemRamUsedBytes": series(|v| v.1),
        "systemRamTotalBytes": series(|v| v.2),
        // No GPU given to the run (or no NVML): empty, not zeros.
        "gpuUtilizationPercent": gseries(0),
        "gpuMemoryUtilizationPercent": gseries(1),
        "gpuTemperatureCelsius": gseries(3),
        "gpuPowerWatt": gseries(4),
        "gpuPowerLimitWatt": gseries(5),
        "gpuClockSmMhz": gseries(6),
        "gpuClockMemMhz": gseries(7),
        "gpuPcieThroughputRxBytesPerSec": gseries(8),
        "gpuPcieThroughputTxBytesPerSec": gseries(9),
        "summary": state.store.metrics_summary(run.id).await?.and_then(|s| serde_json::from_str::<Value>(&s).ok()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_summary() {
        let id = stoa_types::RunId::new();
        let t = |s: &str| stoa_core::time::parse(s).unwrap();
        let run = stoa_store::Run {
            id,
            org_id: stoa_types::OrgId("o".into()),
            status: stoa_types::RunStatus::Completed,
            job_type: stoa_store::RunKind::Python,
            execution_type: "gpu.h200".into(),
            file_name: None,
            spec: "{}".into(),
            timeout_s: 60,
            created_at: t("2026-01-01T00:00:00Z"),
            job_start: Some(t("2026-01-01T00:00:00Z")),
            job_end: Some(t("2026-01-01T00:00:10Z")),
            return_code: Some(0),
            error: None,
            timed_out: false,
            pending_reason: None,
            phases: vec![],
            worker_id: None,
            pgid: None,
            run_name: None,
            labels: vec![],
            metadata: Default::default(),
            callback_urls: vec![],
            output_truncated: false,
            price_per_hour: None,
            priority: 50,
            parent_id: None,
            gpu_ids: vec!["0".into(), "1".into()],
            output_expired: false,
            seq: 1,
            lease: None,
            control: None,
            slurm_job_id: None,
            ports: Default::default(),
        };
        let g = |ts: &str, gpu: i64, mem: f64, power: f64| GpuSample {
            run_id: Some(id),
            ts: t(ts),
            gpu,
            values: [
                None,
                None,
                Some(mem),
                None,
                Some(power),
                None,
                None,
                None,
                None,
                None,
            ],
        };
        let samples = vec![
            g("2026-01-01T00:00:01Z", 0, 1e9, 100.0),
            g("2026-01-01T00:00:01Z", 1, 2e9, 100.0),
            g("2026-01-01T00:00:02Z", 0, 4e9, 200.0),
            g("2026-01-01T00:00:02Z", 1, 1e9, 200.0),
        ];
        let mut s = json!({});
        summarize_gpus(&mut s, &samples, 2, &run, 1.0);
        assert_eq!(s["gpu_seconds"], 20.0);
        assert_eq!(s["peak_gpu_memory_bytes"], 5e9);
        assert_eq!(s["gpu_energy_joules"], 600.0);
    }

    #[test]
    fn steps() {
        assert_eq!(parse_step("5s"), Some(5));
        assert_eq!(parse_step("1m"), Some(60));
        assert_eq!(parse_step("2h"), Some(7200));
        for bad in ["", "0s", "5", "s", "1d", "-5s", "5 s"] {
            assert_eq!(parse_step(bad), None, "{bad}");
        }
    }
}
