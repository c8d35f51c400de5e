//! `stoa gpu`: hardware profiles and GPU selection.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum GpuCommand {
    /// Hardware profiles with their prices.
    Machines {
        #[arg(long)]
        json: bool,
    },
    /// Run a file on several profiles and recommend one.
    Select {
        /// A Python file, or a snippet of code.
        target: String,
        /// Only these profiles (repeatable; when absent, the GPU profiles, or all
        /// where there is none).
        #[arg(short = 'p', long = "profile")]
        profiles: Vec<String>,
        /// With no --profile: the CPU-only profiles too.
        #[arg(long, conflicts_with = "profiles")]
        include_cpu: bool,
        /// Requirements: a file, or the requirement text itself.
        #[arg(short = 'r', long)]
        requirements: Option<String>,
        /// Seconds each profile's run may take.
        #[arg(short = 't', long)]
        timeout: Option<i64>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: GpuCommand) -> anyhow::Result<i32> {
    let c = crate::login::client()?;
    match cmd {
        GpuCommand::Machines { json } => {
            let m = c.machine_types().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                let rows: Vec<Vec<String>> = m
                    .machine_types
                    .iter()
                    .map(|t| {
                        vec![
                            t.hardware_profile.clone(),
                            t.price_per_hour
                                .map(|p| format!("{p:.4}"))
                                .unwrap_or_else(|| "-".into()),
                            t.cpus.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                            t.memory_mb
                                .map(|m| format!("{m} MiB"))
                                .unwrap_or_else(|| "-".into()),
                            if t.gpu_count > 0 {
                                format!(
                                    "{} × {}",
                                    t.gpu_count,
                                    t.gpu_model.clone().unwrap_or_else(|| "GPU".into())
                                )
                            } else {
                                "-".into()
                            },
                        ]
                    })
                    .collect();
                crate::jobs::print_table(&["PROFILE", "PRICE/H", "CPUS", "MEMORY", "GPUS"], &rows);
            }
        }
        GpuCommand::Select {
            target,
            profiles,
            include_cpu,
            requirements,
            timeout,
            json,
        } => {
            let args = crate::run::PythonRunArgs {
                target,
                requirements,
                machine: "cpu".into(),
                timeout,
                detach: false,
                imports: vec![],
                file_name: None,
                opts: Default::default(),
                args: vec![],
            };
            let req = crate::run::request(&args)?;
            let mut body = serde_json::to_value(&req)?;
            let o = body.as_object_mut().expect("a request is an object");
            o.remove("execution_type");
            if !profiles.is_empty() {
                o.insert("profiles".into(), serde_json::json!(profiles));
            }
            if include_cpu {
                o.insert("include_cpu".into(), serde_json::json!(true));
            }
            let started = c.start_selection(&body).await?;
            let id = started["execution_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            eprintln!("{}", started["message"].as_str().unwrap_or(""));
            let status = loop {
                let s = c.selection_status(&id).await?;
                let st = s["status"].as_str().unwrap_or("");
                if !matches!(st, "pending" | "starting" | "running") {
                    break s;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let rows: Vec<Vec<String>> = status["profiling_results"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        vec![
                            r["profile"].as_str().unwrap_or("").to_string(),
                            r["status"].as_str().unwrap_or("").to_string(),
                            r["execution_time"]
                                .as_f64()
                                .map(|t| format!("{t:.2} s"))
                                .unwrap_or_else(|| "-".into()),
                            r["cost"]
                                .as_f64()
                                .map(|c| format!("{c:.6}"))
                                .unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                crate::jobs::print_table(&["PROFILE", "STATUS", "TIME", "COST"], &rows);
                let sel = &status["selection_results"];
                for e in status["system_errors"].as_array().into_iter().flatten() {
                    eprintln!("error: {}", e.as_str().unwrap_or(""));
                }
                match sel["best"].as_str() {
                    Some(b) => println!(
                        "Recommendation: {b} (fastest: {}, cheapest: {})",
                        sel["fastest"].as_str().unwrap_or("-"),
                        sel["cheapest"].as_str().unwrap_or("-")
                    ),
                    None => println!("No recommendation: no profile completed."),
                }
            }
            println!("Execution ID: {id}");
            return Ok(if status["status"] == "completed" {
                0
            } else {
                1
            });
        }
    }
    Ok(0)
}
