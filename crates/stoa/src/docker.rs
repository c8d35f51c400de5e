//! `stoa docker` and `stoa compose`: image and compose runs.

use clap::Subcommand;
use stoa_core::validate::NOTEBOOK_JOB_TYPE as NOTEBOOK;
use stoa_types::{ComposeStartRequest, ImageStartRequest};

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum DockerCommand {
    /// Run a container image and stream its output.
    Run {
        /// Image reference.
        image: String,
        /// Command, split like a POSIX shell (the image's own when absent).
        #[arg(short = 'c', long)]
        command: Option<String>,
        /// Environment variable NAME=value (repeatable).
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// Hardware profile.
        #[arg(short = 'm', long, default_value = "cpu")]
        machine: String,
        /// Seconds before the run is killed.
        #[arg(short = 't', long, default_value_t = 300)]
        timeout: i64,
        /// Print the run id and return without streaming.
        #[arg(short = 'd', long)]
        detach: bool,
        #[command(flatten)]
        registry: RegistryOpts,
        /// Do not mount the org's storage (`--s3`, the default, mounts it).
        #[arg(long = "no-s3", visible_alias = "no-storage", overrides_with = "s3")]
        no_s3: bool,
        /// Mount the org's storage (the default).
        #[arg(long = "s3", overrides_with = "no_s3")]
        s3: bool,
        /// Where the container sees the org's storage.
        #[arg(long, default_value = "/mnt/s3")]
        s3_mount_path: String,
        /// A TCP port the container serves on, reached through the server's proxy at
        /// /ports/ID/PORT/ while it runs (repeatable; default: the image's EXPOSE).
        #[arg(short = 'p', long = "port")]
        ports: Vec<u16>,
        #[command(flatten)]
        common: CommonOpts,
        #[command(flatten)]
        opts: crate::run::RunOpts,
    },
    /// Replay and follow a run's output.
    Logs { id: String },
}

pub async fn run(cmd: DockerCommand) -> anyhow::Result<i32> {
    let c = crate::login::client()?;
    match cmd {
        DockerCommand::Run {
            image,
            command,
            env,
            machine,
            timeout,
            detach,
            registry,
            no_s3,
            s3: _,
            s3_mount_path,
            ports,
            common,
            opts,
        } => {
            if no_s3 && s3_mount_path != "/mnt/s3" {
                anyhow::bail!(
                    "--s3-mount-path is given but the storage is not mounted (--no-s3); drop one of them"
                );
            }
            let cmd = match command {
                Some(s) => Some(
                    shlex::split(&s)
                        .ok_or_else(|| anyhow::anyhow!("-c: unbalanced quotes in {s:?}"))?,
                ),
                None => None,
            };
            for e in &env {
                if !e.contains('=') {
                    eprintln!("warning: -e {e:?} has no '=' and is ignored by the server");
                }
            }
            let (kind, user, password) = registry.resolve()?;
            let req = ImageStartRequest {
                docker_image_ref: image,
                docker_run_cmd: cmd,
                docker_run_env: (!env.is_empty()).then(|| env.join("\n")),
                timeout: Some(timeout),
                execution_type: Some(machine),
                file_name: common.file_name,
                enable_s3_mount: Some(!no_s3),
                s3_mount_path: (!no_s3).then_some(s3_mount_path),
                graceful_timeout: common.graceful_timeout,
                docker_registry_credential_type: kind,
                docker_username: user,
                docker_password: password,
                run_name: opts.name.clone(),
                labels: opts.labels(),
                metadata: opts.metadata()?,
                user_callback_urls: opts.callbacks(),
                job_type: None,
                ports: (!ports.is_empty()).then_some(ports),
            };
            let started = c.start_image(&req).await?;
            crate::run::follow_started(&c, &started, detach).await
        }
        DockerCommand::Logs { id } => crate::run::replay(&c, &id).await,
    }
}

/// Registry credentials of an image or compose run: Stoa's `--registry-user` (the
/// password from `STOA_REGISTRY_PASSWORD`), or the official client's `--registry-creds`
/// JSON with `--registry-type`.
#[derive(clap::Args)]
pub struct RegistryOpts {
    /// Registry user (basic credentials; the password comes from STOA_REGISTRY_PASSWORD).
    #[arg(long, conflicts_with = "registry_creds")]
    registry_user: Option<String>,
    /// Registry credentials as JSON (`{"username": …, "password": …}`), with
    /// --registry-type basic.
    #[arg(long, requires = "registry_type")]
    registry_creds: Option<String>,
    /// The type of --registry-creds: basic (aws is not supported by Stoa).
    #[arg(long, requires = "registry_creds")]
    registry_type: Option<String>,
}

impl RegistryOpts {
    /// The credential type, user and password to send.
    fn resolve(&self) -> anyhow::Result<(Option<String>, Option<String>, Option<String>)> {
        if let Some(user) = &self.registry_user {
            let password = std::env::var("STOA_REGISTRY_PASSWORD").map_err(|_| {
                anyhow::anyhow!("--registry-user needs the password in STOA_REGISTRY_PASSWORD")
            })?;
            return Ok((Some("basic".into()), Some(user.clone()), Some(password)));
        }
        let (Some(creds), Some(kind)) = (&self.registry_creds, &self.registry_type) else {
            return Ok((None, None, None));
        };
        if kind != "basic" {
            anyhow::bail!(
                "--registry-type {kind:?} is not supported: this server takes basic credentials (--registry-type basic)"
            );
        }
        let v: serde_json::Value = serde_json::from_str(creds)
            .map_err(|e| anyhow::anyhow!("--registry-creds is not JSON: {e}"))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    anyhow::anyhow!("--registry-creds needs a string {k:?} for basic credentials")
                })
        };
        Ok((
            Some(kind.clone()),
            Some(field("username")?),
            Some(field("password")?),
        ))
    }
}

/// What image and compose runs take in the official client's spellings.
#[derive(clap::Args)]
pub struct CommonOpts {
    /// A name for the run (its `file_name`).
    #[arg(short = 'f', long)]
    file_name: Option<String>,
    /// Seconds between the stop signal and kill when the run is stopped (default:
    /// worker.stop_grace_s).
    #[arg(long)]
    graceful_timeout: Option<i64>,
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum ComposeCommand {
    /// Run a Docker Compose file (the supported subset is in the README) and stream
    /// the output of its services, each line prefixed with its service's name.
    Run {
        /// The compose file.
        file: std::path::PathBuf,
        /// Hardware profile.
        #[arg(short = 'm', long, default_value = "cpu")]
        machine: String,
        /// Seconds before the run is killed.
        #[arg(short = 't', long, default_value_t = 300)]
        timeout: i64,
        /// Print the run id and return without streaming.
        #[arg(short = 'd', long)]
        detach: bool,
        #[command(flatten)]
        registry: RegistryOpts,
        #[command(flatten)]
        common: CommonOpts,
        /// Mount the org's storage into the services (those `x-stoa.s3-mount` names,
        /// else all).
        #[arg(long)]
        s3: bool,
        /// Where the services see the org's storage (with --s3).
        #[arg(long, default_value = "/mnt/s3", requires = "s3")]
        s3_mount_path: String,
        #[command(flatten)]
        opts: crate::run::RunOpts,
    },
    /// Replay and follow a run's output.
    Logs { id: String },
}

pub async fn compose(cmd: ComposeCommand) -> anyhow::Result<i32> {
    let c = crate::login::client()?;
    match cmd {
        ComposeCommand::Run {
            file,
            machine,
            timeout,
            detach,
            registry,
            common,
            s3,
            s3_mount_path,
            opts,
        } => {
            let code = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let (kind, user, password) = registry.resolve()?;
            let req = ComposeStartRequest {
                compose_file_code: code,
                timeout: Some(timeout),
                execution_type: Some(machine),
                file_name: common
                    .file_name
                    .or_else(|| file.file_name().map(|n| n.to_string_lossy().into_owned())),
                enable_s3_mount: s3.then_some(true),
                s3_mount_path: s3.then_some(s3_mount_path),
                graceful_timeout: common.graceful_timeout,
                docker_registry_credential_type: kind,
                docker_username: user,
                docker_password: password,
                run_name: opts.name.clone(),
                labels: opts.labels(),
                metadata: opts.metadata()?,
                user_callback_urls: opts.callbacks(),
            };
            let started = c.start_compose(&req).await?;
            crate::run::follow_started(&c, &started, detach).await
        }
        ComposeCommand::Logs { id } => crate::run::replay(&c, &id).await,
    }
}

/// `stoa notebook`: notebook runs (Jupyter, or any image serving HTTP on a port).
#[derive(Subcommand)]
pub enum NotebookCommand {
    /// Start a notebook and print its URL through this server's proxy once it answers there.
    Launch {
        /// The notebook image.
        #[arg(short = 'i', long, default_value = "jupyter/base-notebook:latest")]
        image: String,
        /// Hardware profile.
        #[arg(short = 'm', long, default_value = "cpu")]
        machine: String,
        /// Seconds before the notebook is ended (up to the server's
        /// limits.notebook_max_timeout_s).
        #[arg(short = 't', long, default_value_t = 600)]
        timeout: i64,
        /// The notebook's access token.
        #[arg(long, default_value = "lyceum")]
        token: String,
        /// The port the notebook serves on.
        #[arg(short = 'p', long, default_value_t = 8888)]
        port: u16,
        /// Command, split like a POSIX shell [default: Jupyter's start-notebook.sh with
        /// the token and port].
        #[arg(short = 'c', long)]
        command: Option<String>,
        #[command(flatten)]
        opts: crate::run::RunOpts,
    },
    /// The org's notebooks that have not ended.
    List,
    /// End a notebook (gracefully: it ends `cancelled`).
    Stop { id: String },
}

pub async fn notebook(cmd: NotebookCommand) -> anyhow::Result<i32> {
    let c = crate::login::client()?;
    match cmd {
        NotebookCommand::Launch {
            image,
            machine,
            timeout,
            token,
            port,
            command,
            opts,
        } => {
            let cmd = match command {
                Some(s) => shlex::split(&s)
                    .ok_or_else(|| anyhow::anyhow!("-c: unbalanced quotes in {s:?}"))?,
                None => vec![
                    "start-notebook.sh".into(),
                    format!("--NotebookApp.token={token}"),
                    format!("--port={port}"),
                    "--ip=0.0.0.0".into(),
                    "--no-browser".into(),
                ],
            };
            let req = ImageStartRequest {
                docker_image_ref: image,
                docker_run_cmd: Some(cmd),
                timeout: Some(timeout),
                execution_type: Some(machine),
                run_name: opts.name.clone(),
                labels: opts.labels(),
                metadata: opts.metadata()?,
                user_callback_urls: opts.callbacks(),
                job_type: Some(NOTEBOOK.into()),
                ports: Some(vec![port]),
                ..Default::default()
            };
            let started = c.start_image(&req).await?;
            let id = started.execution_id;
            eprintln!("Notebook {id} started; waiting for it to serve on port {port}…");
            loop {
                let r = c.execution(&id).await?;
                if r.status.is_terminal() {
                    eprintln!(
                        "The notebook ended {} before it served: see `stoa docker logs {id}`",
                        r.status.as_str()
                    );
                    return Ok(1);
                }
                // Its port is open once the proxy reaches it: a 502 means the
                // container runs but the notebook server does not listen yet.
                if r.ports.contains(&port) {
                    let probe = c
                        .raw(reqwest::Method::GET, &format!("/ports/{id}/{port}/"), None)
                        .await?;
                    if probe.status() != reqwest::StatusCode::BAD_GATEWAY {
                        break;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            let base = c.base().trim_end_matches('/');
            println!("{base}/ports/{id}/{port}/?token={token}");
            eprintln!("Stop it with `stoa notebook stop {id}`.");
            Ok(0)
        }
        NotebookCommand::List => {
            let rows: Vec<Vec<String>> = c
                .workloads(None)
                .await?
                .into_iter()
                .filter(|w| w.job_type == NOTEBOOK)
                .map(|w| {
                    vec![
                        w.execution_id,
                        w.status.as_str().to_string(),
                        w.hardware_profile,
                        w.created_at,
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("No notebooks running.");
            } else {
                crate::jobs::print_table(&["ID", "STATUS", "MACHINE", "CREATED"], &rows);
            }
            Ok(0)
        }
        NotebookCommand::Stop { id } => {
            let r = c.stop(&id).await?;
            println!("{}", r.message);
            Ok(0)
        }
    }
}
