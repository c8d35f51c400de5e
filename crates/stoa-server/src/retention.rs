//! Retention: the background loop that removes what ended runs leave in the store once
//! it is old enough, so the database does not grow without bound.
//!
//! A pass, in order: the output of runs that ended more than `retention.output_days`
//! ago (the runs stay, marked `output_expired`); runs that ended more than
//! `retention.runs_days` ago, with everything of theirs; the output rows of deleted runs
//! (deleting a run removes it at once and leaves its rows to this loop). Every step
//! works in batches of one short transaction each, so requests never wait long on the
//! store. Passes run shortly after start, every `retention.interval_s`, and on demand
//! ([`Retention::wake`], after a run is deleted), one at a time. A pass is idempotent:
//! one cut short (an error, shutdown) is finished by the next.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stoa_store::Store;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, RetentionConfig};
use stoa_core::loops::{Loop, Pass};

/// Output chunks removed per transaction.
const OUTPUT_BATCH: i64 = 5000;
/// Runs removed per transaction (each with its samples and deliveries).
const RUNS_BATCH: i64 = 200;
/// Pause between two batches, so requests queued at the store go first.
const BATCH_PAUSE: Duration = Duration::from_millis(5);
/// Delay of the first pass after start (or the interval, when shorter).
const FIRST_PASS: Duration = Duration::from_secs(5);

/// What retention removes: output chunks of runs whose output expired, runs, output
/// chunks of deleted runs.
const KINDS: [&str; 3] = ["output", "runs", "deleted_output"];

/// Retention's loop: its outcome (for `/metrics`) and its on-demand trigger.
pub fn new_loop() -> Loop {
    Loop::new(
        "retention",
        "removed",
        "What retention removed: output chunks of runs whose output expired (output), runs (runs), output chunks of deleted runs (deleted_output).",
        &KINDS,
    )
}

/// What one pass removed.
#[derive(Debug, Default)]
struct Removed {
    output: u64,
    runs: u64,
    deleted_output: u64,
}

impl Removed {
    fn by_kind(&self) -> Vec<(&'static str, u64)> {
        vec![
            (KINDS[0], self.output),
            (KINDS[1], self.runs),
            (KINDS[2], self.deleted_output),
        ]
    }
}

/// Runs retention passes until shutdown.
pub async fn run(
    store: Arc<dyn Store>,
    config: Arc<Config>,
    retention: Arc<Loop>,
    shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_secs(config.retention.interval_s.max(1));
    let stop = shutdown.clone();
    retention
        .run(interval.min(FIRST_PASS), interval, shutdown, || {
            let (store, config, stop) = (store.clone(), config.clone(), stop.clone());
            async move {
                let started = Instant::now();
                let mut removed = Removed::default();
                let result = pass(store.as_ref(), &config.retention, &stop, &mut removed).await;
                let ms = started.elapsed().as_millis() as u64;
                match &result {
                    Err(e) => tracing::warn!(
                        error = %e,
                        expired_output_chunks = removed.output,
                        runs = removed.runs,
                        deleted_output_chunks = removed.deleted_output,
                        ms,
                        "retention pass failed; the next one goes on"
                    ),
                    Ok(()) if removed.output + removed.runs + removed.deleted_output > 0 => {
                        tracing::info!(
                            expired_output_chunks = removed.output,
                            runs = removed.runs,
                            deleted_output_chunks = removed.deleted_output,
                            ms,
                            "retention pass removed stored data"
                        )
                    }
                    Ok(()) => tracing::debug!(ms, "retention pass: nothing to remove"),
                }
                Ok(Pass {
                    done: removed.by_kind(),
                    next: None,
                    error: result.err().map(|e| e.to_string()),
                })
            }
        })
        .await
}

/// One pass; `removed` counts what went, also when a step fails.
async fn pass(
    store: &dyn Store,
    cfg: &RetentionConfig,
    shutdown: &watch::Receiver<bool>,
    removed: &mut Removed,
) -> stoa_store::Result<()> {
    let now = chrono::Utc::now();
    if let Some(before) = cutoff(now, cfg.output_days) {
        drain(
            move || store.prune_output(before, OUTPUT_BATCH),
            OUTPUT_BATCH,
            &mut removed.output,
            shutdown,
        )
        .await?;
    }
    if let Some(before) = cutoff(now, cfg.runs_days) {
        drain(
            move || store.prune_runs(before, RUNS_BATCH),
            RUNS_BATCH,
            &mut removed.runs,
            shutdown,
        )
        .await?;
    }
    drain(
        move || store.purge_orphan_output(OUTPUT_BATCH),
        OUTPUT_BATCH,
        &mut removed.deleted_output,
        shutdown,
    )
    .await
}

/// The time `days` before `now` (RFC 3339, as the store writes times); `None` for 0
/// (kept forever) or a time before the calendar's start.
fn cutoff(now: chrono::DateTime<chrono::Utc>, days: u64) -> Option<chrono::DateTime<chrono::Utc>> {
    if days == 0 {
        return None;
    }
    let age = chrono::TimeDelta::try_days(i64::try_from(days).ok()?)?;
    now.checked_sub_signed(age)
}

/// Runs `batch` until it removes less than `size` (nothing is left) or the server
/// shuts down, adding what each removed to `total`.
async fn drain<F, Fut>(
    mut batch: F,
    size: i64,
    total: &mut u64,
    shutdown: &watch::Receiver<bool>,
) -> stoa_store::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = stoa_store::Result<u64>>,
{
    loop {
        let n = batch().await?;
        *total += n;
        if n < size as u64 || *shutdown.borrow() {
            return Ok(());
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_are_days_back_and_zero_keeps_forever() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-31T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(cutoff(now, 0), None);
        assert_eq!(
            cutoff(now, 30)
                .map(|t| stoa_core::time::stamp(&t))
                .as_deref(),
            Some("2026-03-01T12:00:00.000000Z")
        );
        assert_eq!(cutoff(now, u64::MAX), None);
    }

    #[test]
    fn metrics_name_each_kind_removed() {
        let r = new_loop();
        let mut out = String::new();
        r.render(&mut out);
        assert!(out.contains("stoa_retention_last_pass_timestamp_seconds 0\n"));
        let removed = Removed {
            output: 7,
            runs: 2,
            deleted_output: 3,
        };
        r.record(&removed.by_kind(), Some("disk I/O error".into()));
        let mut out = String::new();
        r.render(&mut out);
        for line in [
            "stoa_retention_passes_total 1",
            "stoa_retention_removed_total{what=\"output\"} 7",
            "stoa_retention_removed_total{what=\"runs\"} 2",
            "stoa_retention_removed_total{what=\"deleted_output\"} 3",
            "stoa_retention_last_pass_failed 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in {out}");
        }
    }
}
