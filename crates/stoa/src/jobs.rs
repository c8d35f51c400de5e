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
                if let Some(e) = &r.result.error {
                    rows.push(vec!["error".into(), e.clone()]);
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
                let url = c.stream_url(&id);
                return crate::run::follow(&c, &id, &url, false).await;
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
