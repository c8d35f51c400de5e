//! One trait for what executes runs. Each run type is one [`Runtime`]: `python`
//! (sandboxed on the host), `container-python` (a profile's Python image), `image` and
//! `compose`. The worker picks one by the run's type and profile, hands it a
//! [`LaunchRequest`] and a [`LaunchContext`], and supervises the [`Launched`] run it
//! gets back; a new run type is one more implementation.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::docker::{RegistryAuth, Resources};
use crate::{Execution, Exit, OutputLine, RuntimeError};

/// What a runtime is told about the run it launches (no `Debug`: it holds the org's
/// secrets).
pub struct LaunchRequest<'a> {
    /// The run's id (it names the run's containers, and is in its environment).
    pub run_id: &'a str,
    /// Its hardware profile.
    pub profile: &'a str,
    /// The stored spec of its run type (JSON).
    pub spec: &'a str,
    /// The org's variables, decrypted.
    pub secrets: &'a [(String, String)],
    /// Registry credentials given with the run (kept in memory only by the control
    /// plane).
    pub registry: Option<RegistryAuth>,
    /// The GPUs it was given (NVML indexes).
    pub gpu_ids: &'a [String],
    /// Its profile's limits, with its GPUs.
    pub resources: Resources,
    /// Its profile's disk limit (sandboxed Python runs).
    pub disk_mb: Option<u64>,
    /// Its profile's Python image (`container-python`).
    pub python_image: Option<&'a str>,
    /// Its working directory (Python runs): made by the runtime, removed by the worker.
    pub workdir: &'a Path,
}

impl LaunchRequest<'_> {
    /// The run's spec as its type reads it; one that does not read back is the
    /// platform's failure.
    pub fn spec<T: serde::de::DeserializeOwned>(&self) -> Result<T, LaunchError> {
        serde_json::from_str(self.spec)
            .map_err(|e| LaunchError::System(format!("the stored run spec is unreadable: {e}")))
    }

    /// What a container learns about its run: `STOA_EXECUTION_ID` and
    /// `STOA_HARDWARE_PROFILE`.
    pub fn identity(&self) -> [(String, String); 2] {
        [
            ("STOA_EXECUTION_ID".into(), self.run_id.to_string()),
            ("STOA_HARDWARE_PROFILE".into(), self.profile.to_string()),
        ]
    }

    /// The credentials to pull with; a run submitted with some (`username` set) that
    /// the control plane lost in a restart cannot pull.
    pub fn registry_auth(
        &self,
        username: Option<&str>,
    ) -> Result<Option<RegistryAuth>, LaunchError> {
        if username.is_some() && self.registry.is_none() {
            return Err(LaunchError::System(
                "registry credentials are kept in memory only and were lost when the server restarted; start the run again".into(),
            ));
        }
        Ok(self.registry.clone())
    }
}

/// What the worker offers a runtime while it prepares a run.
#[async_trait]
pub trait LaunchContext: Send + Sync {
    /// Says why the run waits (an image pull, an environment build) in its pending
    /// reason.
    fn waiting(&self, reason: String);
    /// Writes a `[stoa]` line into the run's output.
    async fn note(&self, line: &str);
    /// Writes several `[stoa]` lines.
    async fn notes(&self, lines: Vec<String>) {
        for l in lines {
            self.note(&l).await;
        }
    }
    /// Records a phase of the run's timeline.
    async fn phase(&self, name: &str) -> Result<(), LaunchError>;
    /// Records that the run's environment is ready (phase `environment_ready`).
    async fn environment_ready(&self) -> Result<(), LaunchError> {
        self.phase("environment_ready").await
    }
    /// The org's storage directory, made when missing (runs mount it).
    fn org_storage(&self) -> Result<PathBuf, LaunchError>;
    /// Resolves when the run is asked to end (abort or stop) while it is prepared.
    async fn interrupted(&self);
}

/// How a launch ended without a run to supervise.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The run's own fault (a missing image, requirements that do not install, a
    /// compose file that no longer checks out): it ends `failed`.
    #[error("{0}")]
    Failed(String),
    /// The platform could not start it: it ends `system_failure`.
    #[error("{0}")]
    System(String),
    /// It was asked to end (abort or stop) while it was prepared.
    #[error("interrupted")]
    Interrupted,
    /// The worker failed around the run (its control plane could not be told, its
    /// disk): it ends `system_failure` as an internal error.
    #[error("{0}")]
    Worker(String),
}

/// A started run, ready to be supervised.
pub struct Launched {
    pub exec: Box<dyn Execution>,
    /// Its output, until every process of it is gone.
    pub output: mpsc::Receiver<OutputLine>,
    /// Its timeout in seconds.
    pub timeout_s: i64,
    /// What the sampler measures, when not the run's process group (for an execution
    /// with one) or its one container `stoa-<id>`.
    pub measure: Option<Measure>,
    /// CPU seconds its processes had used before the run began (a warm sandbox's
    /// start-up), which its CPU readings leave out.
    pub cpu_before_s: f64,
    /// Where the ports it serves on are reached, as they become known, and when they
    /// stop being its own.
    pub ports: Option<mpsc::UnboundedReceiver<PortEvent>>,
}

/// What a runtime tells the worker about the ports a run serves on.
#[derive(Debug)]
pub enum PortEvent {
    /// The port the proxy serves is reached at `ip:port` of a container of the run.
    Open(u16, String),
    /// The run's containers are gone and its network is about to be given to another
    /// run, where the same addresses may be another run's: its ports are forgotten
    /// first, and the sender is answered once that is recorded.
    Closed(tokio::sync::oneshot::Sender<()>),
}

/// Tells the worker that the ports sent on `tx` are no longer the run's, and waits
/// (5 s at most) until that is recorded: called before a run's network is given back.
pub async fn close_ports(tx: Option<&mpsc::UnboundedSender<PortEvent>>) {
    let Some(tx) = tx else {
        return;
    };
    let (ack, recorded) = tokio::sync::oneshot::channel();
    if tx.send(PortEvent::Closed(ack)).is_ok()
        && tokio::time::timeout(std::time::Duration::from_secs(5), recorded)
            .await
            .is_err()
    {
        tracing::warn!("the end of a run's ports was not recorded within 5 s");
    }
}

/// What the sampler measures for a run.
#[derive(Debug, Clone)]
pub enum Measure {
    /// A process group (sandboxed Python runs), from procfs.
    Group(i32),
    /// Containers (one, or a compose stack's), from the engine's stats, summed.
    Containers(Vec<String>),
}

/// What executes one type of run.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// Prepares what the run needs (an environment, images) and starts it.
    async fn launch(
        &self,
        run: &LaunchRequest<'_>,
        ctx: &dyn LaunchContext,
    ) -> Result<Launched, LaunchError>;
    /// When the run ended because its sandbox could not be set up rather than by its
    /// own doing (`exit`, with its first stdout and stderr lines), why.
    fn setup_failure(&self, _exit: Exit, _first: (Option<&str>, Option<&str>)) -> Option<String> {
        None
    }
    /// Keeps what it holds ready for coming runs (warm sandboxes) within `free_slots`
    /// run slots of the worker; called in the background between launches.
    async fn tend(&self, _free_slots: usize) {}
    /// Warm sandboxes it holds ready now.
    fn ready(&self) -> usize {
        0
    }
    /// Ends what it holds ready (the worker stops).
    async fn release_ready(&self) {}
}

/// Waits for an environment build (a control interrupts it), writes the warnings it
/// gathered into the run's output, and turns a failure into the launch's:
/// requirements that do not install fail the run (with the installer's words in its
/// output); anything else is the platform's failure.
pub(crate) async fn settle_env<T>(
    ctx: &dyn LaunchContext,
    warnings: &std::sync::Mutex<Vec<String>>,
    build: impl std::future::Future<Output = Result<T, RuntimeError>>,
) -> Result<T, LaunchError> {
    let r = tokio::select! {
        r = build => r,
        _ = ctx.interrupted() => return Err(LaunchError::Interrupted),
    };
    let w = std::mem::take(&mut *warnings.lock().unwrap_or_else(|p| p.into_inner()));
    ctx.notes(w).await;
    match r {
        Ok(v) => Ok(v),
        Err(RuntimeError::Requirements(msg)) => {
            ctx.note(&msg).await;
            Err(LaunchError::Failed(format!(
                "requirements could not be installed: {}",
                msg.lines().next().unwrap_or("")
            )))
        }
        Err(e) => Err(LaunchError::System(format!(
            "could not prepare the Python environment: {e}"
        ))),
    }
}

/// Pulls an image when needed (its progress in the run's pending reason; a control
/// interrupts it). A missing image or refused access fails the run.
pub(crate) async fn pull(
    docker: &crate::docker::DockerRuntime,
    image: &str,
    auth: Option<&RegistryAuth>,
    ctx: &dyn LaunchContext,
) -> Result<(), LaunchError> {
    let progress = |r: String| ctx.waiting(r);
    let pulled = tokio::select! {
        r = docker.pull(image, auth, &progress) => r,
        _ = ctx.interrupted() => return Err(LaunchError::Interrupted),
    };
    match pulled {
        Ok(()) => Ok(()),
        Err(RuntimeError::Image(msg)) => {
            ctx.note(&msg).await;
            Err(LaunchError::Failed(msg))
        }
        Err(e) => Err(LaunchError::System(e.to_string())),
    }
}

/// Gathers the warnings of a preparation step (a `warn` callback's).
pub(crate) fn warnings() -> std::sync::Mutex<Vec<String>> {
    std::sync::Mutex::new(Vec::new())
}
