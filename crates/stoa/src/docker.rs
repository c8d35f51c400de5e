//! `stoa docker` and `stoa compose`: image and compose runs.

use clap::Subcommand;
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
        /// Registry user (basic credentials; the password comes from STOA_REGISTRY_PASSWORD).
        #[arg(long)]
        registry_user: Option<String>,
        /// Do not mount the org's storage at /mnt/s3.
        #[arg(long)]
        no_storage: bool,
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
            registry_user,
            no_storage,
            opts,
        } => {
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
            let password = registry_password(&registry_user)?;
            let req = ImageStartRequest {
                docker_image_ref: image,
                docker_run_cmd: cmd,
                docker_run_env: (!env.is_empty()).then(|| env.join("\n")),
                timeout: Some(timeout),
                execution_type: Some(machine),
                enable_s3_mount: Some(!no_storage),
                docker_registry_credential_type: registry_user
                    .as_ref()
                    .map(|_| "basic".to_string()),
                docker_username: registry_user,
                docker_password: password,
                run_name: opts.name.clone(),
                labels: opts.labels(),
                metadata: opts.metadata()?,
                user_callback_urls: opts.callbacks(),
                ..Default::default()
            };
            let started = c.start_image(&req).await?;
            crate::run::follow_started(&c, &started, detach).await
        }
        DockerCommand::Logs { id } => crate::run::replay(&c, &id).await,
    }
}

/// The registry password for `--registry-user`, from `STOA_REGISTRY_PASSWORD`.
fn registry_password(user: &Option<String>) -> anyhow::Result<Option<String>> {
    match user {
        Some(_) => Ok(Some(std::env::var("STOA_REGISTRY_PASSWORD").map_err(
            |_| anyhow::anyhow!("--registry-user needs the password in STOA_REGISTRY_PASSWORD"),
        )?)),
        None => Ok(None),
    }
}

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
        /// Registry user (basic credentials; the password comes from STOA_REGISTRY_PASSWORD).
        #[arg(long)]
        registry_user: Option<String>,
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
            registry_user,
            s3,
            s3_mount_path,
            opts,
        } => {
            let code = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let password = registry_password(&registry_user)?;
            let req = ComposeStartRequest {
                compose_file_code: code,
                timeout: Some(timeout),
                execution_type: Some(machine),
                file_name: file.file_name().map(|n| n.to_string_lossy().into_owned()),
                enable_s3_mount: s3.then_some(true),
                s3_mount_path: s3.then_some(s3_mount_path),
                docker_registry_credential_type: registry_user
                    .as_ref()
                    .map(|_| "basic".to_string()),
                docker_username: registry_user,
                docker_password: password,
                run_name: opts.name.clone(),
                labels: opts.labels(),
                metadata: opts.metadata()?,
                user_callback_urls: opts.callbacks(),
                ..Default::default()
            };
            let started = c.start_compose(&req).await?;
            crate::run::follow_started(&c, &started, detach).await
        }
        ComposeCommand::Logs { id } => crate::run::replay(&c, &id).await,
    }
}
