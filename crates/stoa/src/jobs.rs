//! `stoa jobs`: list, inspect and control runs.

use clap::Subcommand;
use stoa_types::ExecutionSummary;

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Active runs (pending, starting, running) and why they wait.
    List {
        /// Only runs in these states (comma-separated), across all runs.
        #[arg(long)]
        status: Option<String>,
        /// Only runs with this label.
        #[arg(long)]
        label: Option<String>,
        /// Only runs of this name.
        #[arg(long)]
        name: Option<String>,
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Past and present runs, newest first.
    History {
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// The record of one run.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stored output lines of a run.
    Logs {
        id: String,
        #[arg(short = 'n', long, default_value_t = 1000)]
        limit: i64,
        #[arg(long, default_value_t = 24)]
        hours: i64,
        #[arg(long)]
        json: bool,
        /// Follow the live stream instead (replays everything first).
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// A run's metrics: a table and a sparkline per series.
    Metrics {
        id: String,
        /// Averaging step (5s, 1m, …).
        #[arg(long, default_value = "5s")]
        step: String,
        #[arg(long)]
        json: bool,
    },
    /// Kill a run now (ends `aborted`).
    Abort { id: String },
    /// Stop a run gracefully (SIGTERM, grace period, kill; ends `cancelled`).
    Stop { id: String },
    /// Delete an ended run and its output.
    Delete { id: String },
}

/// Prints rows under headers, columns padded to their widest cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A line of block characters showing `vals` from low to high.
pub fn sparkline(vals: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let (lo, hi) = vals
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
    let span = (hi - lo).max(f64::EPSILON);
    // At most 60 characters: average neighbouring points together.
    let per = vals.len().div_ceil(60).max(1);
    vals.chunks(per)
        .map(|c| {
            let v = c.iter().sum::<f64>() / c.len() as f64;
            BARS[(((v - lo) / span) * 7.0).round().clamp(0.0, 7.0) as usize]
        })
        .collect()
}

fn short_time(t: &Option<String>) -> String {
    t.as_deref()
        .map(|s| s.get(..19).unwrap_or(s).replace('T', " "))
        .unwrap_or_else(|| "-".into())
}

fn summary_rows(runs: &[ExecutionSummary], with_reason: bool) -> Vec<Vec<String>> {
    runs.iter()
        .map(|r| {
            let mut row = vec![
                r.execution_id.clone(),
                r.status.to_string(),
                r.hardware_profile.clone(),
                r.file_name
                    .clone()
                    .or_else(|| r.run_name.clone())
                    .unwrap_or_else(|| "-".into()),
                short_time(&Some(r.created_at.clone())),
            ];
            if with_reason {
                row.push(r.pending_reason.clone().unwrap_or_default());
            } else {
                row.push(
                    r.return_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
            }
            row
        })
        .collect()
}

pub async fn run(cmd: JobsCommand) -> anyhow::Result<i32> {
    let c = crate::login::client()?;
    match cmd {
        JobsCommand::List {
            status,
            label,
            name,
            limit,
            json,
        } => {
            let mut runs = c
                .workloads_filtered(status.as_deref(), label.as_deref(), name.as_deref())
                .await?;
            runs.truncate(limit);
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else if runs.is_empty() {
                println!("No active runs.");
            } else {
                print_table(
                    &[
                        "ID",
                        "STATUS",
                        "PROFILE",
                        "FILE",
                        "CREATED",
                        "WAITING BECAUSE",
                    ],
                    &summary_rows(&runs, true),
                );
            }
        }
        JobsCommand::History { limit, json } => {
            let h = c.history(limit, 0).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                print_table(
                    &["ID", "STATUS", "PROFILE", "FILE", "CREATED", "EXIT"],
                    &summary_rows(&h.executions, false),
                );
                println!("{} of {} runs", h.executions.len(), h.total_executions);
            }
        }
        JobsCommand::Status { id, json } => {
            let r = c.execution(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let mut rows = vec![
                    vec!["id".into(), r.execution_id.clone()],
                    vec!["status".into(), r.status.to_string()],
                    vec!["profile".into(), r.hardware_profile.clone()],
                    vec![
                        "file".into(),
                        r.file_name.clone().unwrap_or_else(|| "-".into()),
                    ],
                    vec!["created".into(), short_time(&Some(r.created_at.clone()))],
                    vec!["started".into(), short_time(&r.job_start)],
                    vec!["ended".into(), short_time(&r.job_end)],
                    vec![
                        "exit code".into(),
                        r.return_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into()),
                    ],
                    vec!["billed".into(), format!("{:.4}", r.billed)],
                ];
                if let Some(p) = &r.pending_reason {
                    rows.push(vec!["waiting because".into(), p.clone()]);
                }
                if let Some(j) = &r.slurm_job_id {
                    rows.push(vec!["slurm job".into(), j.clone()]);
                }
                if let Some(e) = &r.result.error {
                    rows.push(vec!["error".into(), e.clone()]);
                }
                if let Some(m) = r.metrics_summary.as_ref().and_then(|m| m.as_object()) {
                    let parts: Vec<String> = m
                        .iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    rows.push(vec!["metrics".into(), parts.join(" ")]);
                }
                let timeline: Vec<String> = r
                    .phases
                    .iter()
                    .map(|p| format!("{} {}", p.phase, short_time(&Some(p.at.clone()))))
                    .collect();
                rows.push(vec!["timeline".into(), timeline.join(" → ")]);
                print_table(&["FIELD", "VALUE"], &rows);
            }
        }
        JobsCommand::Logs {
            id,
            limit,
            hours,
            json,
            follow,
        } => {
            if follow {
                return crate::run::replay(&c, &id).await;
            }
            let l = c.logs(&id, limit, hours).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                for e in &l.logs {
                    println!(
                        "{} {}",
                        short_time(&Some(e.timestamp.clone())),
                        e.message.trim_end_matches('\n')
                    );
                }
                println!("{} entries", l.total);
            }
        }
        JobsCommand::Metrics { id, step, json } => {
            let m = c.metrics(&id, &step).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
                return Ok(0);
            }
            let series = [
                ("CPU %", "systemCpuUsagePercent", 1.0, "%"),
                ("RAM used", "systemRamUsedBytes", 1048576.0, " MiB"),
                ("GPU util %", "gpuUtilizationPercent", 1.0, "%"),
                ("GPU mem %", "gpuMemoryUtilizationPercent", 1.0, "%"),
                ("GPU power", "gpuPowerWatt", 1.0, " W"),
                ("GPU temp", "gpuTemperatureCelsius", 1.0, " °C"),
            ];
            let mut rows = Vec::new();
            for (label, key, scale, unit) in series {
                let vals: Vec<f64> = m[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["value"].as_f64())
                    .map(|v| v / scale)
                    .collect();
                if vals.is_empty() {
                    continue;
                }
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let max = vals.iter().cloned().fold(f64::MIN, f64::max);
                rows.push(vec![
                    label.to_string(),
                    format!("{mean:.1}{unit}"),
                    format!("{max:.1}{unit}"),
                    sparkline(&vals),
                ]);
            }
            if rows.is_empty() {
                println!("No metrics recorded for this run.");
            } else {
                print_table(&["SERIES", "MEAN", "PEAK", "OVER TIME"], &rows);
            }
            if let Some(s) = m["summary"].as_object() {
                let parts: Vec<String> = s
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("summary: {}", parts.join(" "));
            }
        }
        JobsCommand::Abort { id } => {
            let m = c.abort(&id).await?;
            println!("{}", m.message);
        }
        JobsCommand::Stop { id } => {
            let m = c.stop(&id).await?;
            println!("{}", m.message);
        }
        JobsCommand::Delete { id } => {
            let m = c.delete(&id).await?;
            println!("{} ({})", m.message, m.execution_id);
        }
    }
    Ok(0)
}
