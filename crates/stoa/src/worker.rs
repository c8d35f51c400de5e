//! `stoa worker`: a worker on another machine, executing runs of the server it
//! registers with; and `stoa workers`: the fleet, managed on the server's data
//! directory (join tokens, the list, drain).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use stoa_core::time::{short, stamp};

use anyhow::Context;
use clap::Subcommand;
use stoa_client::worker::{HttpPlane, http_client, register};
use stoa_types::worker::{OfferedProfile, RegisterRequest};
use tokio::sync::watch;

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The server's URL (`http://` or `https://`); several, comma-separated or repeated,
    /// for servers sharing one store: calls go to the next when one cannot be reached.
    #[arg(long, env = "STOA_SERVER", required = true, value_delimiter = ',')]
    server: Vec<String>,
    /// A join token (`stoa workers token create` on the server's machine).
    #[arg(long, env = "STOA_WORKER_TOKEN", hide_env_values = true)]
    token: String,
    /// This worker's name in the fleet [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Config file, in the server's format: `[worker]`, `[python]`, `[docker]`,
    /// `[[profiles]]` (the profiles offered, each one the server knows)
    /// [default: ./stoa.toml when present].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The worker's data directory (run directories, environments, org storage when
    /// `storage` points nowhere else).
    #[arg(
        long,
        env = "STOA_WORKER_DATA_DIR",
        default_value = "./stoa-worker-data"
    )]
    data_dir: PathBuf,
    /// A CA certificate (PEM) trusted for an `https://` server, besides the system's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Execute nothing here: hand each run to Slurm as a job that runs `stoa exec` on
    /// a node (the profiles served and their `sbatch` options are `[[slurm.profiles]]`
    /// of the config).
    #[arg(long)]
    slurm: bool,
}

/// `stoa exec`: executes one run in a Slurm job (the Slurm bridge's batch script runs
/// it). What it needs to reach the server comes in the job's environment
/// (`STOA_SERVER`, `STOA_EXEC_RUN`, `STOA_EXEC_LEASE`, `STOA_EXEC_WORKER_TOKEN`), never
/// on its command line.
#[derive(clap::Args)]
pub struct ExecArgs {
    /// The node's data directory (environment cache, run directories).
    #[arg(long, default_value = "/var/tmp/stoa-exec")]
    data_dir: PathBuf,
    /// Config file (`[python]`, `[docker]`, `[[profiles]]`).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// A worker's config (`stoa worker`, `stoa exec`): the file, this data directory
/// (made, absolute and private), logging set up.
fn worker_config(
    config: Option<&std::path::Path>,
    data_dir: &std::path::Path,
) -> anyhow::Result<stoa_config::Config> {
    let mut cfg = stoa_config::Config::load(config)?;
    cfg.data_dir = data_dir.to_path_buf();
    cfg.validate()?;
    crate::init_logging(&cfg.log);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    // Run directories are bind-mounted into sandboxes, which need absolute paths.
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)?;
    // Its token and spooled output are the worker's own.
    stoa_server::private_data_dir(&cfg.data_dir)?;
    Ok(cfg)
}

/// Runs a worker until SIGTERM or Ctrl-C (its runs get `limits.shutdown_grace_s`).
pub async fn run(a: WorkerArgs) -> anyhow::Result<i32> {
    let mut cfg = worker_config(a.config.as_deref(), &a.data_dir)?;
    let token_file = cfg.data_dir.join("worker-token");
    if a.slurm {
        return bridge(a, cfg, token_file).await;
    }
    let runtimes = stoa_worker::runtimes(&mut cfg)?;
    let host = host_name();
    let name = a
        .name
        .clone()
        .or_else(|| host.clone())
        .unwrap_or_else(|| "worker".into());
    let offer = RegisterRequest {
        name: name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: "v1".into(),
        profiles: cfg
            .capacities()
            .into_iter()
            .map(|p| OfferedProfile {
                name: p.name,
                slots: p.slots,
            })
            .collect(),
        gpus: cfg.worker.gpu_ids.clone(),
        host,
        // After a restart the name is taken again with the token it had.
        previous_token: kept_token(&token_file),
        cluster: None,
    };
    let http = http_client(a.ca_file.as_deref())?;
    let registered = register_until_answered(&http, &a, &offer, &token_file).await?;
    let plane = Arc::new(HttpPlane::new(http, &a.server, registered));
    let profiles: Vec<&str> = offer.profiles.iter().map(|p| p.name.as_str()).collect();
    eprintln!(
        "worker {name} registered with {} (profiles: {}; GPUs: {})",
        a.server.join(", "),
        profiles.join(", "),
        if offer.gpus.is_empty() {
            "none".to_string()
        } else {
            offer.gpus.join(",")
        }
    );
    let cfg = Arc::new(cfg);
    let worker = Arc::new(
        stoa_worker::Worker::new(plane, cfg.clone(), runtimes, Default::default())
            .with_spool(cfg.worker.spool_max_bytes),
    );
    // Nothing of an earlier run of this worker is held now: its directories go (its
    // runs were reaped by the server when their leases expired).
    worker.kill_leftovers(&[])?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = tokio::spawn(worker.serve(stop_rx.clone(), stop_rx));
    crate::wait_for_signal().await;
    eprintln!("worker {name} stopping…");
    let _ = stop_tx.send(true);
    running.await?;
    Ok(0)
}

/// This machine's host name, shown in the fleet.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
}

/// The worker token kept from the last registration: a worker registering again
/// after a restart takes its name back with it.
fn kept_token(token_file: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(token_file)
        .ok()
        .map(|t| t.trim().to_string())
}

/// Registers `offer`, tried until a server answers (it may not be up yet), and keeps
/// the worker's token in `token_file`.
async fn register_until_answered(
    http: &reqwest::Client,
    a: &WorkerArgs,
    offer: &RegisterRequest,
    token_file: &std::path::Path,
) -> anyhow::Result<stoa_types::worker::RegisterResponse> {
    let registered = loop {
        match register(http, &a.server, &a.token, offer).await {
            Ok(r) => break r,
            Err(e) if e.status().is_some() => {
                anyhow::bail!("the server refused the registration: {e}")
            }
            Err(e) => {
                tracing::warn!(servers = %a.server.join(","), error = %e, "no server is reachable; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    stoa_config::write_private(token_file, &format!("{}\n", registered.worker_token))
        .with_context(|| format!("keeping the worker token in {}", token_file.display()))?;
    Ok(registered)
}

/// `stoa worker --slurm`: the Slurm bridge, until SIGTERM or Ctrl-C (its jobs stay in
/// Slurm and finish; a bridge started again follows them).
async fn bridge(
    a: WorkerArgs,
    cfg: stoa_config::Config,
    token_file: PathBuf,
) -> anyhow::Result<i32> {
    let slurm = cfg.slurm.clone();
    if slurm.profiles.is_empty() {
        anyhow::bail!(
            "stoa worker --slurm serves the profiles of [[slurm.profiles]] in its config, and it has none"
        );
    }
    let cluster = stoa_worker::slurm::cluster_name()
        .await
        .map_err(|e| anyhow::anyhow!("Slurm is not reachable from here: {e}"))?;
    let mut partitions: Vec<String> = slurm
        .profiles
        .iter()
        .filter_map(|p| p.partition.clone())
        .collect();
    partitions.sort();
    partitions.dedup();
    if partitions.is_empty() {
        partitions.push("default".into());
    }
    let name = a.name.clone().unwrap_or_else(|| format!("slurm-{cluster}"));
    let offer = RegisterRequest {
        name: name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: "v1".into(),
        profiles: slurm
            .profiles
            .iter()
            .map(|p| OfferedProfile {
                name: p.name.clone(),
                slots: slurm.max_jobs.max(1),
            })
            .collect(),
        gpus: vec![],
        host: host_name(),
        previous_token: kept_token(&token_file),
        cluster: Some(stoa_types::worker::ClusterOffer {
            manager: "slurm".into(),
            name: cluster.clone(),
            partitions: partitions.clone(),
        }),
    };
    let http = http_client(a.ca_file.as_deref())?;
    let registered = register_until_answered(&http, &a, &offer, &token_file).await?;
    let exec = stoa_worker::slurm::ExecSetup {
        binary: match &slurm.exec {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("finding this binary for the jobs")?,
        },
        // The jobs start in `/`: the bridge's own config by its full path.
        config: match slurm.node_config.clone() {
            Some(p) => Some(p),
            None => a
                .config
                .as_ref()
                .map(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.clone())),
        },
        servers: a.server.clone(),
        worker_token: registered.worker_token.clone(),
        ca_file: a.ca_file.clone(),
        lease_s: registered.lease_s,
        export_env: slurm
            .export_env
            .iter()
            .chain(&cfg.python.pass_env)
            .cloned()
            .collect(),
    };
    let plane = Arc::new(HttpPlane::new(http, &a.server, registered));
    let bridge = Arc::new(stoa_worker::slurm::Bridge::new(
        plane,
        slurm,
        exec,
        &cfg.data_dir,
    )?);
    eprintln!(
        "Slurm bridge {name} registered with {} (cluster {cluster}, partitions {}; profiles: {})",
        a.server.join(", "),
        partitions.join(","),
        offer
            .profiles
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = tokio::spawn(bridge.serve(stop_rx));
    crate::wait_for_signal().await;
    eprintln!("Slurm bridge {name} stopping (its jobs stay in Slurm)…");
    let _ = stop_tx.send(true);
    running.await?;
    Ok(0)
}

/// `stoa exec`: one run in a Slurm job. Exits 0 once the run ended (its end stored,
/// or left to the bridge when Slurm ended the job).
pub async fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    // The tokens in this process's environment are not readable by other processes
    // of its uid.
    stoa_runtime::sandbox::not_dumpable().context("making stoa exec undumpable")?;
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .with_context(|| format!("stoa exec runs in a job of the Slurm bridge, which sets {k}"))
    };
    let servers: Vec<String> = var("STOA_SERVER")?.split(',').map(str::to_string).collect();
    let run: stoa_types::RunId = var("STOA_EXEC_RUN")?
        .parse()
        .map_err(|_| anyhow::anyhow!("STOA_EXEC_RUN is not a run id"))?;
    let lease = var("STOA_EXEC_LEASE")?;
    let worker_token = var("STOA_EXEC_WORKER_TOKEN")?;
    let lease_s: u64 = var("STOA_EXEC_LEASE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let ca = std::env::var("STOA_EXEC_CA_FILE")
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let mut cfg = worker_config(a.config.as_deref(), &a.data_dir)?;
    // Slurm signals the job (abort, stop, its time limit, an admin's scancel) from
    // the start: the signal is kept until the run can hear it.
    let (ended_tx, ended_rx) = watch::channel(false);
    tokio::spawn(async move {
        crate::wait_for_signal().await;
        let _ = ended_tx.send(true);
    });
    let http = http_client(ca.as_deref())?;
    let plane = Arc::new(HttpPlane::new(
        http,
        &servers,
        stoa_types::worker::RegisterResponse {
            worker_token,
            lease_s,
            claim_wait_s: 0,
        },
    ));
    // The runtimes are probed while the run is asked for.
    let probing = tokio::task::spawn_blocking(move || {
        let runtimes = stoa_worker::runtimes_for_one_run(&mut cfg);
        (cfg, runtimes)
    });
    let fetched = async {
        let mut delay = Duration::from_millis(200);
        loop {
            match stoa_core::plane::ControlPlane::assignment(plane.as_ref(), run, &lease).await {
                Ok(a) => return Ok(a),
                Err(e) if delay < Duration::from_secs(10) => {
                    tracing::warn!(error = %e, "asking the server for the run failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => anyhow::bail!("the server did not hand the run over: {e}"),
            }
        }
    };
    let (probed, fetched) = tokio::join!(probing, fetched);
    let (cfg, runtimes) = probed?;
    let runtimes = runtimes?;
    let Some(mut assignment) = fetched? else {
        eprintln!("run {run} is no longer held under this lease: nothing to execute");
        return Ok(0);
    };
    // The GPUs Slurm gave the job are the run's.
    if let Ok(gpus) = std::env::var("SLURM_JOB_GPUS")
        && !gpus.trim().is_empty()
    {
        assignment.gpu_ids = gpus.split(',').map(|g| g.trim().to_string()).collect();
    }
    eprintln!("stoa exec: run {run} on {}", servers.join(","));
    let cfg = Arc::new(cfg);
    let worker = Arc::new(
        stoa_worker::Worker::new(plane, cfg.clone(), runtimes, Default::default())
            .with_spool(cfg.worker.spool_max_bytes),
    );
    worker.execute_one(assignment, ended_rx).await;
    Ok(0)
}

#[derive(Subcommand)]
pub enum WorkersCommand {
    /// Join tokens that let machines register as workers.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The workers of the fleet.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop placing new runs on a worker (its running runs finish).
    Drain {
        name: String,
        /// Take new runs again.
        #[arg(long)]
        undo: bool,
    },
    /// Forget a worker: its token no longer counts (runs it held end `worker lost` when
    /// their leases expire); it may register again with a join token.
    Remove { name: String },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a join token (shown once).
    Create {
        /// Hours it stays valid (0: until revoked).
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(0..=87_600))]
        ttl_hours: u64,
    },
    /// List join tokens (never the tokens themselves).
    List,
    /// Revoke a join token by id (workers it registered keep their own tokens).
    Revoke { id: String },
}

pub async fn workers(data: &crate::DataDir, cmd: WorkersCommand) -> anyhow::Result<i32> {
    let store = crate::keys::open_store(data).await?;
    match cmd {
        WorkersCommand::Token {
            command: TokenCommand::Create { ttl_hours },
        } => {
            let token = format!("sjt_{}", &stoa_server::auth::generate_key()[3..]);
            let expires = (ttl_hours > 0)
                .then(|| chrono::Utc::now() + chrono::Duration::hours(ttl_hours as i64));
            let id = uuid_like(&token);
            store
                .insert_join_token(&id, &stoa_server::auth::hash_key(&token), expires)
                .await?;
            match expires.map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)) {
                Some(e) => eprintln!("join token {id} (shown once; valid until {e}):"),
                None => eprintln!("join token {id} (shown once; valid until revoked):"),
            }
            println!("{token}");
            eprintln!("on the worker's machine: stoa worker --server URL --token {token}");
        }
        WorkersCommand::List { json } => {
            let active = store.active_runs().await?;
            let mut rows = Vec::new();
            for w in store.list_workers().await? {
                let offer: RegisterRequest = serde_json::from_str(&w.offer)
                    .with_context(|| format!("the stored offer of worker {}", w.name))?;
                let running = active
                    .iter()
                    .filter(|r| r.worker_id.as_deref() == Some(w.name.as_str()))
                    .count();
                rows.push(stoa_types::worker::WorkerInfo {
                    name: w.name,
                    host: offer.host,
                    version: Some(offer.version),
                    profiles: offer.profiles,
                    gpus: offer.gpus,
                    running,
                    cluster: offer.cluster,
                    registered_at: stamp(&w.registered_at),
                    last_heard_at: stamp(&w.last_heard_at),
                    draining: w.draining,
                });
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                eprintln!(
                    "no worker has registered (stoa workers token create, then stoa worker on the machine)"
                );
            } else {
                println!(
                    "{:<20} {:<18} {:<28} {:<10} {:>7} {:>5} {:<22} STATE",
                    "NAME", "HOST", "PROFILES (SLOTS)", "GPUS", "RUNNING", "FREE", "LAST HEARD"
                );
                for r in rows {
                    let profiles: Vec<String> = r
                        .profiles
                        .iter()
                        .map(|p| format!("{}({})", p.name, p.slots))
                        .collect();
                    let gpus = if r.gpus.is_empty() {
                        "-".to_string()
                    } else {
                        r.gpus.join(",")
                    };
                    let slots: usize = r.profiles.iter().map(|p| p.slots).sum();
                    let free = if r.draining {
                        0
                    } else {
                        slots.saturating_sub(r.running)
                    };
                    // A bridge's host is its cluster: `slurm:NAME[partitions]`.
                    let host = match &r.cluster {
                        Some(c) => {
                            format!("{}:{}[{}]", c.manager, c.name, c.partitions.join(","))
                        }
                        None => r.host.clone().unwrap_or_else(|| "-".into()),
                    };
                    println!(
                        "{:<20} {:<18} {:<28} {:<10} {:>7} {:>5} {:<22} {}",
                        r.name,
                        host,
                        profiles.join(" "),
                        gpus,
                        r.running,
                        free,
                        r.last_heard_at.get(..19).unwrap_or(&r.last_heard_at),
                        if r.draining { "draining" } else { "ready" }
                    );
                }
            }
        }
        WorkersCommand::Token {
            command: TokenCommand::List,
        } => {
            println!("{:<18} {:<22} {:<22} STATE", "ID", "CREATED", "EXPIRES");
            for (id, created, expires, revoked) in store.list_join_tokens().await? {
                let expired = expires.is_some_and(|e| e < chrono::Utc::now());
                let state = match (revoked, expired) {
                    (true, _) => "revoked",
                    (false, true) => "expired",
                    _ => "valid",
                };
                println!(
                    "{id:<18} {:<22} {:<22} {state}",
                    short(&created),
                    expires.as_ref().map_or_else(|| "never".into(), short)
                );
            }
        }
        WorkersCommand::Token {
            command: TokenCommand::Revoke { id },
        } => {
            if !store.revoke_join_token(&id).await? {
                eprintln!("no join token {id:?} (stoa workers token list)");
                return Ok(1);
            }
            eprintln!("join token {id} revoked");
        }
        WorkersCommand::Remove { name } => {
            if !store.remove_worker(&name).await? {
                eprintln!("no worker named {name:?} (stoa workers list)");
                return Ok(1);
            }
            eprintln!("worker {name} removed: its token no longer counts");
        }
        WorkersCommand::Drain { name, undo } => {
            if !store.set_worker_draining(&name, !undo).await? {
                eprintln!("no worker named {name:?} (stoa workers list)");
                return Ok(1);
            }
            if undo {
                eprintln!("worker {name} takes new runs again");
            } else {
                eprintln!("worker {name} takes no new runs; its running runs finish");
            }
        }
    }
    Ok(0)
}

/// A short id for a join token, from its hash (the token itself is never stored).
fn uuid_like(token: &str) -> String {
    stoa_server::auth::hash_key(token)[..16].to_string()
}
