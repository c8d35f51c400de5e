//! `stoa`: the server, and the client commands.

mod bench;
mod bundle;
mod docker;
mod env;
mod gpu;
mod jobs;
mod keys;
mod login;
mod run;
mod storage;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Stoa: ephemeral compute runs (Python, images, compose) on your own machines.
/// `stoa migrate`: opens (or makes) the store, which applies its migrations, and says
/// what it did.
async fn migrate(data: &DataDir) -> anyhow::Result<i32> {
    use anyhow::Context;
    let at = data.location();
    if matches!(at, stoa_store::Location::Sqlite(_)) {
        std::fs::create_dir_all(&data.data_dir)
            .with_context(|| format!("creating data directory {}", data.data_dir.display()))?;
        stoa_server::private_data_dir(&data.data_dir)?;
    }
    let m = stoa_store::open(&at)
        .await
        .with_context(|| format!("migrating the store at {}", at.display()))?
        .migrated;
    if m.from == m.to {
        println!(
            "the store at {} is up to date (schema version {})",
            at.display(),
            m.to
        );
    } else {
        println!(
            "migrated the store at {} from schema version {} to {}",
            at.display(),
            m.from,
            m.to
        );
    }
    Ok(0)
}

#[derive(Parser)]
#[command(name = "stoa", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the server (API, streams, embedded worker).
    Server(ServerArgs),
    /// Save the server URL and API key for the client commands.
    Login {
        /// Server base URL, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        url: String,
        /// API key (lk_…).
        #[arg(long)]
        api_key: String,
    },
    /// Python runs.
    Python {
        #[command(subcommand)]
        command: PythonCommand,
    },
    /// Docker image runs.
    Docker {
        #[command(subcommand)]
        command: docker::DockerCommand,
    },
    /// Notebooks: image runs that serve on a port, reached through the server.
    Notebook {
        #[command(subcommand)]
        command: docker::NotebookCommand,
    },
    /// Docker Compose runs.
    Compose {
        #[command(subcommand)]
        command: docker::ComposeCommand,
    },
    /// Secrets: environment variables of every run of the org.
    Env {
        #[command(subcommand)]
        command: env::EnvCommand,
    },
    /// The org's storage: list, copy and delete files (what runs see at /mnt/s3).
    Storage {
        #[command(subcommand)]
        command: storage::StorageCommand,
    },
    /// Master key of the secrets (on this machine's data directory).
    Secrets {
        #[command(subcommand)]
        command: env::SecretsCommand,
    },
    /// Completion callbacks.
    Callbacks {
        #[command(subcommand)]
        command: env::CallbacksCommand,
    },
    /// Hardware profiles and GPU selection.
    Gpu {
        #[command(subcommand)]
        command: gpu::GpuCommand,
    },
    /// List, inspect and control runs.
    Jobs {
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Manage API keys and orgs (on this machine's data directory).
    Keys {
        #[command(flatten)]
        data: DataDir,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Apply the store's migrations (on this machine's data directory) without starting
    /// the server, e.g. before starting a new version.
    Migrate {
        #[command(flatten)]
        data: DataDir,
    },
    /// Work on a store as a whole.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Execute runs of a server from this machine (a worker of its fleet), or hand
    /// them to Slurm (`--slurm`).
    Worker(worker::WorkerArgs),
    /// Execute one run inside a Slurm job (the Slurm bridge's jobs run it).
    Exec(worker::ExecArgs),
    /// Manage the fleet's workers: join tokens, the list, drain (on the server's data
    /// directory).
    Workers {
        #[command(flatten)]
        data: DataDir,
        #[command(subcommand)]
        command: worker::WorkersCommand,
    },
    /// Measure latency and throughput of trivial runs against a fresh local server.
    Bench(bench::BenchArgs),
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell
    /// (e.g. `source <(stoa completions bash)`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (`stoa.1`, `stoa-server.1`, …) into a directory, from
    /// the same definitions as `--help`.
    Man {
        /// Directory to write them to (made when missing).
        dir: std::path::PathBuf,
    },
}

/// The server's data directory (and its store), for commands that work on its store.
#[derive(clap::Args)]
pub(crate) struct DataDir {
    /// Data directory of the server.
    #[arg(
        long,
        env = "STOA_DATA_DIR",
        default_value = "./stoa-data",
        global = true
    )]
    data_dir: PathBuf,
    /// The server's PostgreSQL database (`postgres://…`), when it keeps its state there
    /// rather than in the data directory.
    #[arg(long, env = "STOA_DATABASE_URL", global = true)]
    database_url: Option<String>,
}

impl DataDir {
    pub(crate) fn location(&self) -> stoa_store::Location {
        stoa_server::store_location(self.database_url.as_deref(), &self.data_dir)
    }
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Data directory [default: ./stoa-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the state in this PostgreSQL database (`postgres://user:pass@host/db`)
    /// instead of SQLite in the data directory [config: store.url; env:
    /// STOA_DATABASE_URL].
    #[arg(long)]
    database_url: Option<String>,
    /// Config file [default: ./stoa.toml when present].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Do not execute runs here (they stay pending).
    #[arg(long)]
    no_worker: bool,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy a SQLite store (a server's data directory, stopped) into an empty
    /// PostgreSQL database: every org, key, run, output line, metric sample, secret
    /// (still encrypted) and callback delivery.
    Copy {
        /// The data directory (or its `stoa.db`) to copy from.
        #[arg(long)]
        from: PathBuf,
        /// The PostgreSQL database to copy into (`postgres://user:pass@host/db`).
        #[arg(long)]
        to: String,
    },
}

/// `stoa store copy`: copies a SQLite store into PostgreSQL, showing progress.
async fn store_copy(from: &std::path::Path, to: &str) -> anyhow::Result<i32> {
    anyhow::ensure!(
        matches!(
            stoa_store::Location::parse(to),
            stoa_store::Location::Postgres(_)
        ),
        "--to must be a postgres:// URL"
    );
    let db = if from.is_dir() {
        from.join("stoa.db")
    } else {
        from.to_path_buf()
    };
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let progress = |table: &str, n: u64| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            eprintln!("  {table}: {n} rows…");
            *last = std::time::Instant::now();
        }
    };
    let copied = stoa_store::copy::sqlite_to_postgres(&db, to, &progress).await?;
    for (table, n) in &copied {
        println!("{table:<22} {n:>10} rows");
    }
    println!(
        "copied {} into {}; start the servers with --database-url and this data directory's master.key (or the same secrets.master_key)",
        db.display(),
        stoa_store::redacted(to)
    );
    Ok(0)
}

#[derive(Subcommand)]
enum PythonCommand {
    /// Run a Python file or snippet and stream its output.
    Run(run::PythonRunArgs),
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        match cli.command {
            Command::Server(a) => server(a).await,
            Command::Login { url, api_key } => login::login(&url, &api_key).await,
            Command::Python {
                command: PythonCommand::Run(a),
            } => run::python_run(a).await,
            Command::Docker { command } => docker::run(command).await,
            Command::Compose { command } => docker::compose(command).await,
            Command::Notebook { command } => docker::notebook(command).await,
            Command::Jobs { command } => jobs::run(command).await,
            Command::Env { command } => env::env(command).await,
            Command::Gpu { command } => gpu::run(command).await,
            Command::Storage { command } => storage::run(command).await,
            Command::Secrets { command } => env::secrets(command).await,
            Command::Callbacks { command } => env::callbacks(command).await,
            Command::Keys { data, command } => keys::run(&data, command).await,
            Command::Migrate { data } => migrate(&data).await,
            Command::Store {
                command: StoreCommand::Copy { from, to },
            } => store_copy(&from, &to).await,
            Command::Worker(a) => worker::run(a).await,
            Command::Exec(a) => worker::exec(a).await,
            Command::Workers { data, command } => worker::workers(&data, command).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(shell, &mut Cli::command(), "stoa", &mut std::io::stdout());
                Ok(0)
            }
            Command::Man { dir } => man_pages(&dir),
        }
    });
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // Streams and runtimes may still hold tasks; exit without waiting for them.
    std::process::exit(code);
}

/// Writes a manual page per command into `dir`.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<i32> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
    let n = std::fs::read_dir(dir)?.count();
    eprintln!("wrote {n} manual pages into {}", dir.display());
    Ok(0)
}

async fn server(a: ServerArgs) -> anyhow::Result<i32> {
    let mut cfg = stoa_server::Config::load(a.config.as_deref())?;
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(u) = a.database_url {
        cfg.store.url = Some(u);
    }
    if a.no_worker {
        cfg.worker.enabled = false;
    }
    init_logging(&cfg.log);
    let data_dir = cfg.data_dir.clone();
    let handle = stoa::start(cfg).await?;
    if let Some(key) = &handle.generated_admin_key {
        println!(
            "Created the default org and its admin API key (shown once; also in {}):",
            data_dir.join("admin.key").display()
        );
        println!("  {key}");
    }
    println!("Stoa listening on {}", handle.url());
    wait_for_signal().await;
    eprintln!("shutting down…");
    handle.shutdown().await?;
    Ok(0)
}

/// Logs to stderr with the config's filter (`STOA_LOG_FILTER` overrides it).
pub(crate) fn init_logging(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STOA_LOG_FILTER")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .init();
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
