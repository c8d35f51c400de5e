//! Image runs on the Docker Engine API (bollard, version negotiated so the API 1.41 of
//! Debian's engine works as well as newer ones).
//!
//! Every container and network a run creates carries the label `stoa.run=<run id>`;
//! when the run's output and exit code are collected they are removed, and
//! [`DockerRuntime::reconcile`] removes any that no live run owns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures::StreamExt;
use stoa_core::ImageRunSpec;
use tokio::sync::{OnceCell, mpsc};

use crate::launch::{LaunchContext, LaunchError, LaunchRequest, Launched, Runtime, pull};
use crate::process::LineSplitter;
use crate::{Execution, Exit, OutputLine, RuntimeError, Signaller, Stream};

/// The label every Stoa-made container and network carries: the run's id.
pub const RUN_LABEL: &str = "stoa.run";
/// The label of the networks of this installation's pool (one network per run, made
/// ahead of time so that creating it is not on a run's critical path).
pub const POOL_LABEL: &str = "stoa.pool";
/// The label naming the Stoa installation (data directory) that made an object, so
/// that installations sharing an engine never reconcile each other's containers.
pub const INSTANCE_LABEL: &str = "stoa.instance";

/// Orphaned containers removed at once by a reconciler pass.
const RECONCILE_PARALLEL: usize = 8;

/// Settings of the Docker runtime.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://…`); `DOCKER_HOST` or the
    /// local socket when unset.
    pub host: Option<String>,
    /// Whether containers get a network (each run its own); `false` means none at all.
    pub network: bool,
    /// Pids limit for containers whose profile sets none.
    pub default_pids_limit: i64,
    /// This installation's id (value of [`INSTANCE_LABEL`]).
    pub instance: String,
    /// Networks kept ready for the next runs (each used by one run at a time, then
    /// recycled; see [`crate::netpool`]).
    pub network_pool: usize,
    /// Seconds a spare network beyond `network_pool` is kept without use.
    pub network_idle_s: u64,
    /// Registries (`host:port`) that may be pulled from although they are internal.
    pub allowed_registries: Vec<String>,
    /// Internal destinations (IPs or CIDRs) containers may reach; see [`crate::firewall`].
    pub allowed_destinations: Vec<String>,
}

/// Basic registry credentials. Never printed: `Debug` hides the password.
#[derive(Clone)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Resource limits of a container, from the run's hardware profile.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    pub pids_limit: Option<i64>,
    /// GPUs to request: a count, or specific device ids when assigned.
    pub gpu_count: u32,
    pub gpu_ids: Vec<String>,
    /// Whether the container gets a network (its profile's choice); `docker.network`
    /// when unset.
    pub network: Option<bool>,
}

/// What one image run needs.
#[derive(Debug, Clone)]
pub struct ImageJob {
    pub run_id: String,
    pub image: String,
    /// Command; the image's own when `None`.
    pub cmd: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub auth: Option<RegistryAuth>,
    pub resources: Resources,
    /// `host_path:container_path[:ro]` binds (the org's storage directory).
    pub binds: Vec<String>,
    /// Working directory inside the container (the image's own when `None`).
    pub workdir: Option<String>,
}

/// The Docker runtime.
pub struct DockerRuntime {
    cfg: DockerConfig,
    client: OnceCell<Docker>,
    /// The books of the network pool ([`crate::netpool`]).
    pub(crate) nets: std::sync::Mutex<crate::netpool::NetPool>,
    pub(crate) counter: std::sync::atomic::AtomicU64,
    /// When this runtime was made (networks made before belong to no one).
    pub(crate) started: chrono::DateTime<chrono::Utc>,
    /// One refill at a time (it loops until the pool is full).
    pub(crate) refilling: tokio::sync::Mutex<()>,
    /// Whether the egress rules were installed (then each reconciler pass renews them).
    firewall: std::sync::atomic::AtomicBool,
    /// Whether the failure to install them was reported (it is, once).
    firewall_warned: std::sync::atomic::AtomicBool,
}

/// An engine error as users read it: `Docker engine unreachable: …` when the engine
/// could not be talked to, else the engine's own message.
pub(crate) fn engine_error(e: bollard::errors::Error) -> RuntimeError {
    if is_unreachable(&e) {
        unreachable(plain_unreachable(&e))
    } else {
        RuntimeError::System(format!("Docker engine error: {}", server_message(&e)))
    }
}

/// `Docker engine unreachable: …`.
pub(crate) fn unreachable(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::EngineUnreachable(e.to_string())
}

/// Why the engine was not reached, in the words of the innermost cause (`Connection
/// reset by peer`), without the HTTP client's wrapping (`Error in the hyper legacy
/// client: client error (SendRequest)`).
pub(crate) fn plain_unreachable(e: &bollard::errors::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    if text.contains("hyper") || text.contains("SendRequest") || text.is_empty() {
        "the connection to the engine was lost".to_string()
    } else {
        text
    }
}

/// True when an error says the engine was not reached (or stopped answering), rather
/// than an answer of the engine.
pub(crate) fn is_unreachable(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    matches!(
        e,
        E::IOError { .. }
            | E::HyperLegacyError { .. }
            | E::HyperResponseError { .. }
            | E::HttpClientError { .. }
            | E::RequestTimeoutError
            | E::SocketNotFoundError(_)
    )
}

/// True when the engine says a network does not exist (a start or create that
/// named a network removed behind Stoa's back).
fn is_network_gone(e: &bollard::errors::Error) -> bool {
    let msg = server_message(e);
    msg.contains("network") && msg.contains("not found")
}

/// The engine's own message for an error, without bollard's wrapping.
pub(crate) fn server_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The registry host of an image reference (`host:5000/a/b:tag` → `host:5000`), or
/// Docker Hub's.
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "https://index.docker.io/v1/".to_string(),
    }
}

impl DockerRuntime {
    /// A runtime; the engine is contacted on first use, so the server starts (and
    /// answers) while the engine is down.
    pub fn new(cfg: DockerConfig) -> Self {
        DockerRuntime {
            cfg,
            client: OnceCell::new(),
            nets: Default::default(),
            started: chrono::Utc::now(),
            counter: std::sync::atomic::AtomicU64::new(0),
            refilling: tokio::sync::Mutex::new(()),
            firewall: std::sync::atomic::AtomicBool::new(false),
            firewall_warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Installs the egress rules of Stoa's bridges ([`crate::firewall`]); says once
    /// why not when they cannot be (a remote engine, no iptables, not root).
    async fn install_firewall(&self) {
        use std::sync::atomic::Ordering;
        let remote = self
            .cfg
            .host
            .as_deref()
            .is_some_and(|h| !h.starts_with("unix://"));
        if remote {
            if !self.firewall_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the Docker engine is remote: containers' access to internal addresses is not restricted from here"
                );
            }
            return;
        }
        match crate::firewall::install(&self.cfg.allowed_destinations).await {
            Ok(()) => self.firewall.store(true, Ordering::Relaxed),
            Err(e) => {
                let was_installed = self.firewall.swap(false, Ordering::Relaxed);
                if was_installed || !self.firewall_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "egress rules for containers could not be installed: containers can reach internal addresses and the host");
                }
            }
        }
    }

    /// Refuses to contact a registry that is, or whose name resolves to, an internal
    /// address, unless `docker.allowed_registries` lists it. Resolved here, at pull
    /// time, since a name's addresses can change after the run was accepted.
    async fn check_registry(&self, image: &str) -> Result<(), RuntimeError> {
        use stoa_core::netguard;
        let Some(registry) = netguard::image_registry(image) else {
            return Ok(());
        };
        if netguard::registry_allowed(registry, &self.cfg.allowed_registries) {
            return Ok(());
        }
        let refused = |why: String| {
            RuntimeError::Image(format!(
                "pulling {image} refused: its registry {registry} {why}, a loopback, private, link-local or metadata address; an operator can allow it with docker.allowed_registries"
            ))
        };
        let host = netguard::registry_host(registry);
        if host == "localhost" || host.ends_with(".localhost") {
            return Err(refused("is local".into()));
        }
        if let Some(ip) = netguard::host_ip(&host) {
            if netguard::is_internal(ip) {
                return Err(refused("is".into()));
            }
            return Ok(());
        }
        let lookup = tokio::net::lookup_host((host.as_str(), 443));
        // A name that does not resolve here is reported by the engine's own pull.
        if let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_secs(10), lookup).await {
            for a in addrs {
                if netguard::is_internal(a.ip()) {
                    return Err(refused(format!("resolves to {}", a.ip())));
                }
            }
        }
        Ok(())
    }

    /// The runtime's settings.
    pub fn config(&self) -> &DockerConfig {
        &self.cfg
    }

    /// Labels of every object made for a run.
    pub(crate) fn run_labels(&self, run_id: &str) -> HashMap<String, String> {
        HashMap::from([
            (RUN_LABEL.to_string(), run_id.to_string()),
            (INSTANCE_LABEL.to_string(), self.cfg.instance.clone()),
        ])
    }

    /// The connected, version-negotiated client.
    pub async fn client(&self) -> Result<&Docker, RuntimeError> {
        self.client
            .get_or_try_init(|| async {
                let docker = match &self.cfg.host {
                    Some(h) => Docker::connect_with_host(h),
                    None => Docker::connect_with_defaults(),
                }
                .map_err(unreachable)?;
                let docker =
                    tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
                        .await
                        .map_err(|_| unreachable("no answer within 10 s"))?
                        .map_err(unreachable)?;
                // Before the first container: the rules that keep runs off the host
                // and internal addresses.
                self.install_firewall().await;
                Ok(docker)
            })
            .await
    }

    /// Checks that the engine answers now.
    pub async fn ping(&self) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        tokio::time::timeout(Duration::from_secs(10), c.ping())
            .await
            .map_err(|_| unreachable("no answer within 10 s"))?
            .map_err(unreachable)?;
        Ok(())
    }

    /// Makes the image available: pulls it when it is not present (or always, with
    /// credentials, so that access is checked). `progress` gets `pulling image N%`.
    /// A missing image or refused access is [`RuntimeError::Image`] (the run fails).
    pub async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        if auth.is_none() {
            match c.inspect_image(image).await {
                Ok(_) => return Ok(()),
                Err(e) if is_not_found(&e) => {}
                // Not an answer about the image: the engine itself is not reachable.
                Err(e @ bollard::errors::Error::DockerResponseServerError { .. }) => {
                    return Err(engine_error(e));
                }
                Err(e) => return Err(unreachable(plain_unreachable(&e))),
            }
        }
        self.check_registry(image).await?;
        let (name, tag) = split_tag(image);
        let opts = CreateImageOptionsBuilder::default()
            .from_image(name)
            .tag(tag)
            .build();
        let creds = auth.map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.clone()),
            serveraddress: Some(registry_of(image)),
            ..Default::default()
        });
        let mut layers: HashMap<String, (i64, i64)> = HashMap::new();
        let mut last_report = Instant::now() - Duration::from_secs(1);
        let mut stream = c.create_image(Some(opts), None, creds);
        progress("pulling image 0%".into());
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(i) => i,
                Err(e) => {
                    // The engine answered: it relays what the registry said (not found,
                    // denied, unreachable). Anything else is the engine itself failing.
                    let refused = matches!(
                        e,
                        bollard::errors::Error::DockerStreamError { .. }
                            | bollard::errors::Error::DockerResponseServerError { .. }
                    );
                    return Err(if refused {
                        RuntimeError::Image(format!(
                            "pulling {image} failed: {}",
                            server_message(&e)
                        ))
                    } else {
                        engine_error(e)
                    });
                }
            };
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::Image(format!(
                    "pulling {image} failed: {err}"
                )));
            }
            if let (Some(id), Some(p)) = (info.id, info.progress_detail)
                && let (Some(cur), Some(total)) = (p.current, p.total)
                && total > 0
            {
                layers.insert(id, (cur, total));
            }
            if last_report.elapsed() >= Duration::from_millis(500) && !layers.is_empty() {
                let (cur, total) = layers.values().fold((0, 0), |a, (c, t)| (a.0 + c, a.1 + t));
                progress(format!(
                    "pulling image {}%",
                    (cur * 100 / total.max(1)).min(99)
                ));
                last_report = Instant::now();
            }
        }
        Ok(())
    }

    /// Creates the run's network and container, starts it and follows its output.
    /// On any failure, what was created is removed again. A network that disappeared
    /// between being taken and the start (removed behind Stoa's back) is replaced by a
    /// fresh one, once.
    pub async fn launch(
        self: &Arc<Self>,
        job: &ImageJob,
        output: mpsc::Sender<OutputLine>,
    ) -> Result<ContainerExecution, RuntimeError> {
        let c = self.client().await?.clone();
        let name = format!("stoa-{}", job.run_id);
        let wants_network = job.resources.network.unwrap_or(self.cfg.network);
        let mut fresh = false;
        loop {
            let network = if wants_network {
                Some(self.take_network(&c, &job.run_id, fresh).await?)
            } else {
                None
            };
            let net = network.as_ref().map(|n| n.name());
            match self.create_and_start(&c, job, &name, net).await {
                Ok(id) => {
                    let logs = LogPump::start(c.clone(), id.clone(), output, None);
                    return Ok(ContainerExecution {
                        docker: c,
                        id,
                        name,
                        network,
                        exit: None,
                        ports: None,
                        logs: Some(logs),
                    });
                }
                Err(Start::NetworkGone(e)) if !fresh => {
                    if let Some(n) = network {
                        tracing::warn!(run = %job.run_id, network = %n.name(), error = %server_message(&e), "the run's network disappeared before its start: trying a fresh one");
                        n.lost();
                    }
                    fresh = true;
                }
                Err(Start::NetworkGone(e)) => {
                    return Err(RuntimeError::System(format!(
                        "the container could not start: {}",
                        server_message(&e)
                    )));
                }
                // The network goes back to the pool as `network` drops.
                Err(Start::Failed(e)) => return Err(e),
            }
        }
    }

    /// Creates and starts the container of a job on network `network` (none when
    /// `None`); its id. What was created is removed again on failure.
    async fn create_and_start(
        &self,
        c: &Docker,
        job: &ImageJob,
        name: &str,
        network: Option<&str>,
    ) -> Result<String, Start> {
        let r = &job.resources;
        let device_requests = (r.gpu_count > 0 || !r.gpu_ids.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: r.gpu_ids.is_empty().then_some(r.gpu_count as i64),
                device_ids: (!r.gpu_ids.is_empty()).then(|| r.gpu_ids.clone()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                options: None,
            }]
        });
        let memory = r.memory_mb.map(|m| (m * 1024 * 1024) as i64);
        let body = ContainerCreateBody {
            image: Some(job.image.clone()),
            cmd: job.cmd.clone(),
            working_dir: job.workdir.clone(),
            env: Some(job.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(self.run_labels(&job.run_id)),
            tty: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                memory,
                memory_swap: memory,
                nano_cpus: r.cpus.map(|c| (c * 1e9) as i64),
                pids_limit: Some(r.pids_limit.unwrap_or(self.cfg.default_pids_limit)),
                network_mode: Some(network.unwrap_or("none").to_string()),
                binds: (!job.binds.is_empty()).then(|| job.binds.clone()),
                device_requests,
                security_opt: Some(vec!["no-new-privileges".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = c
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(name).build()),
                body,
            )
            .await;
        let id = match created {
            Ok(r) => r.id,
            Err(e) => {
                remove_container(c, name).await;
                return Err(if is_network_gone(&e) {
                    Start::NetworkGone(e)
                } else if is_not_found(&e) {
                    Start::Failed(RuntimeError::Image(format!(
                        "image {} not found: {}",
                        job.image,
                        server_message(&e)
                    )))
                } else {
                    Start::Failed(engine_error(e))
                });
            }
        };
        if let Err(e) = c.start_container(&id, None).await {
            // For example a GPU request on a host without the NVIDIA runtime.
            remove_container(c, name).await;
            return Err(if is_network_gone(&e) {
                Start::NetworkGone(e)
            } else if is_unreachable(&e) {
                Start::Failed(engine_error(e))
            } else {
                Start::Failed(RuntimeError::System(format!(
                    "the container could not start: {}",
                    server_message(&e)
                )))
            });
        }
        Ok(id)
    }

    /// CPU time used (ns), memory used and its limit (bytes) of a running container.
    pub async fn container_stats(&self, name: &str) -> Option<(u64, u64, u64)> {
        let c = self.client().await.ok()?;
        let opts = bollard::query_parameters::StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let s = c.stats(name, Some(opts)).next().await?.ok()?;
        let cpu = s.cpu_stats.as_ref()?.cpu_usage.as_ref()?.total_usage?;
        let mem = s.memory_stats.as_ref()?;
        // The page cache is not the container's memory use (as `docker stats` reports).
        let cache = mem
            .stats
            .as_ref()
            .and_then(|st| {
                st.get("total_inactive_file")
                    .or_else(|| st.get("inactive_file"))
                    .copied()
            })
            .unwrap_or(0);
        let used = mem.usage.unwrap_or(0).saturating_sub(cache);
        Some((cpu, used, mem.limit.unwrap_or(0)))
    }

    /// Runs a job to its end and returns its exit and combined output (for tool
    /// containers such as environment builds).
    pub async fn run_to_end(
        self: &Arc<Self>,
        job: &ImageJob,
        deadline: tokio::time::Instant,
    ) -> Result<(Exit, String), RuntimeError> {
        let (tx, mut rx) = mpsc::channel(256);
        let mut exec = self.launch(job, tx).await?;
        let finished = {
            let collect = async {
                let mut out = String::new();
                while let Some(l) = rx.recv().await {
                    out.push_str(&l.text);
                }
                out
            };
            tokio::time::timeout_at(deadline, async { tokio::join!(exec.wait(), collect) }).await
        };
        match finished {
            Ok((exit, out)) => Ok((exit?, out)),
            Err(_) => {
                // Out of time: the container goes now, not at the next reconciler pass.
                exec.kill().await?;
                Err(RuntimeError::System("did not finish in time".into()))
            }
        }
    }

    /// Removes every container and network of this installation labelled with a run
    /// for which `live` answers false. Returns how many objects were removed.
    pub async fn reconcile(
        &self,
        live: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<usize, RuntimeError> {
        let c = self.client().await?;
        // Rules removed behind our back (a firewall reload) come back within a pass.
        if self.firewall.load(std::sync::atomic::Ordering::Relaxed) {
            self.install_firewall().await;
        }
        let mine = format!("{INSTANCE_LABEL}={}", self.cfg.instance);
        let filters = HashMap::from([("label", vec![RUN_LABEL.to_string(), mine])]);
        let containers = c
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(engine_error)?;
        let orphans: Vec<(String, String)> = containers
            .into_iter()
            .filter_map(|ct| {
                let run = ct
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(RUN_LABEL))
                    .cloned()
                    .unwrap_or_default();
                (!live(&run)).then_some((run, ct.id?))
            })
            .collect();
        // In parallel: after a crash there may be many, and each removal waits for
        // the container's processes to die.
        let removals = futures::stream::iter(orphans)
            .map(|(run, id)| async move {
                let ok = c
                    .remove_container(
                        &id,
                        Some(
                            RemoveContainerOptionsBuilder::default()
                                .force(true)
                                .v(true)
                                .build(),
                        ),
                    )
                    .await
                    .is_ok();
                if ok {
                    tracing::info!(run = %run, container = %id, "reconciler removed an orphaned container");
                }
                ok
            })
            .buffer_unordered(RECONCILE_PARALLEL)
            .collect::<Vec<bool>>()
            .await;
        let mut removed = removals.into_iter().filter(|ok| *ok).count();
        removed += self.reconcile_pool(c, live).await?;
        removed += self.reconcile_stack_objects(c, live).await?;
        Ok(removed)
    }
}

/// Driver options of every Stoa network: a bridge named `stoa…`, which the egress
/// rules of [`crate::firewall`] match.
pub(crate) fn bridge_options(seed: &str) -> HashMap<String, String> {
    HashMap::from([(
        "com.docker.network.bridge.name".to_string(),
        crate::firewall::bridge_name(seed),
    )])
}

/// Splits `name:tag` (the tag defaults to `latest`; a digest stays in the name).
fn split_tag(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// Waits until a container has exited; its exit code.
pub(crate) async fn wait_exit(c: &Docker, name: &str) -> Result<i64, RuntimeError> {
    let mut wait = c.wait_container(name, None);
    // A busy engine has been seen to leave a wait pending for a container that had
    // exited (its run then never ended): the container's state is asked as well, every
    // few seconds, and an exit it reports ends the wait.
    let mut poll = tokio::time::interval(EXIT_POLL);
    poll.tick().await;
    loop {
        tokio::select! {
            r = wait.next() => {
                return match r {
                    Some(Ok(r)) => Ok(r.status_code),
                    Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                        Ok(code)
                    }
                    Some(Err(e)) => Err(engine_error(e)),
                    None => Err(RuntimeError::System(
                        "the engine closed the wait for the container".into(),
                    )),
                };
            }
            _ = poll.tick() => {
                if let Ok(info) = c.inspect_container(name, None).await
                    && let Some(state) = info.state
                    && state.status == Some(bollard::models::ContainerStateStatusEnum::EXITED)
                {
                    tracing::warn!(container = name, "the engine's wait missed the container's exit; its state told it");
                    return Ok(state.exit_code.unwrap_or(-1));
                }
            }
        }
    }
}

/// How often a container's state is asked while its exit is awaited.
const EXIT_POLL: Duration = Duration::from_secs(3);

/// Waits (5 s at most) until the engine no longer knows a container, removing it again
/// while it does; false when it is still there.
pub(crate) async fn container_gone(c: &Docker, name: &str) -> bool {
    for _ in 0..100 {
        match c.inspect_container(name, None).await {
            Err(e) if is_not_found(&e) => return true,
            _ => {
                remove_container(c, name).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    false
}

/// Removes a container (force, with its anonymous volumes), whatever state it is in.
pub(crate) async fn remove_container(c: &Docker, name: &str) {
    let _ = c
        .remove_container(
            name,
            Some(
                RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
        .await;
}

/// Forwards a container's output as lines, from its start to its end, with nothing
/// missed; with a service, each line (and each piece of an over-long one) starts with
/// `service | `. Call it once the container was started.
///
/// The engine's follow stream may close as the container stops before it delivered
/// what the container wrote last (the log itself is complete): when it closes, the log
/// is read again (following while the container still runs, to its end once it has
/// stopped) and what was not delivered yet is forwarded.
async fn pump_logs(
    c: Docker,
    container: String,
    tx: mpsc::Sender<OutputLine>,
    service: Option<Arc<str>>,
    moved: Arc<std::sync::atomic::AtomicU64>,
) {
    let step = || moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let line = |stream, text: String| OutputLine {
        stream,
        text: match &service {
            Some(s) => format!("{s} | {text}"),
            None => text,
        },
        service: service.clone(),
    };
    let mut out = LineSplitter::default();
    let mut err = LineSplitter::default();
    // Log entries forwarded so far: each read of the log starts at its beginning.
    let mut seen: u64 = 0;
    // Just started: followed (a container that already stopped gives its whole log).
    let mut follow = true;
    loop {
        let mut logs = c.logs(
            &container,
            Some(
                LogsOptionsBuilder::default()
                    .follow(follow)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
        let mut skip = seen;
        while let Some(Ok(item)) = logs.next().await {
            step();
            if skip > 0 {
                skip -= 1;
                continue;
            }
            seen += 1;
            let (stream, splitter, bytes) = match &item {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    (Stream::Stdout, &mut out, message)
                }
                LogOutput::StdErr { message } => (Stream::Stderr, &mut err, message),
                LogOutput::StdIn { .. } => continue,
            };
            for text in splitter.push(bytes) {
                if tx.send(line(stream, text)).await.is_err() {
                    return;
                }
                step();
            }
        }
        if !follow {
            break;
        }
        // The follow closed: read again, following while it still runs.
        follow = match c.inspect_container(&container, None).await {
            Ok(info) => info.state.and_then(|s| s.running).unwrap_or(false),
            // Removed: there is no log left to read.
            Err(e) if is_not_found(&e) => break,
            Err(_) => false,
        };
        if follow {
            // Closed while it runs (an engine that ends a follow early): not in a
            // tight loop.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for (stream, s) in [(Stream::Stdout, &mut out), (Stream::Stderr, &mut err)] {
        if let Some(text) = s.finish() {
            let _ = tx.send(line(stream, text)).await;
        }
    }
}

/// Why a container did not start.
enum Start {
    /// Its network is gone (removed behind Stoa's back).
    NetworkGone(bollard::errors::Error),
    Failed(RuntimeError),
}

/// A running container. Its network goes back to the pool when it is dropped,
/// whatever way the run ended.
pub struct ContainerExecution {
    docker: Docker,
    id: String,
    name: String,
    network: Option<crate::netpool::NetworkLease>,
    exit: Option<Exit>,
    /// Where the run's ports were sent: closed before its network is given back.
    ports: Option<mpsc::UnboundedSender<crate::launch::PortEvent>>,
    /// What forwards its output: it must have read the engine's log stream to its end
    /// before the container (and its log) is removed.
    logs: Option<LogPump>,
}

/// How long the output of a run whose containers ended may stand still (no log entry
/// read from the engine, no line passed on) before the containers (with their logs)
/// are removed all the same. A pump that moves is waited for however long it takes
/// (a slow store holds it back); this bounds an engine that keeps a stream open.
pub(crate) const LOG_DRAIN: Duration = Duration::from_secs(10);

/// The same for containers killed by [`Execution::kill`] (abort): a short wait, since
/// the caller waits for the removal.
pub(crate) const LOG_DRAIN_KILLED: Duration = Duration::from_secs(2);

/// What forwards a container's output ([`pump_logs`]) and how far it got.
pub(crate) struct LogPump {
    task: tokio::task::JoinHandle<()>,
    /// Counts every entry read and every line passed on.
    moved: Arc<std::sync::atomic::AtomicU64>,
}

impl LogPump {
    /// Forwards the output of `container` (started) to `tx` in the background.
    pub(crate) fn start(
        c: Docker,
        container: String,
        tx: mpsc::Sender<OutputLine>,
        service: Option<Arc<str>>,
    ) -> LogPump {
        let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn(pump_logs(c, container, tx, service, moved.clone()));
        LogPump { task, moved }
    }
}

/// Waits until every one of `pumps` has read its container's output to the end, as
/// long as each keeps moving: one that stands still for `idle` is given up (what it
/// has not read is lost), and that is said in the server's log.
pub(crate) async fn drain_logs(pumps: Vec<LogPump>, idle: Duration, of: &str) {
    use std::sync::atomic::Ordering;
    for mut p in pumps {
        let mut last = p.moved.load(Ordering::Relaxed);
        while tokio::time::timeout(idle, &mut p.task).await.is_err() {
            let now = p.moved.load(Ordering::Relaxed);
            if now == last {
                p.task.abort();
                tracing::warn!(
                    containers = %of,
                    "a container's output stood still for {idle:?} after its end; removing it"
                );
                break;
            }
            last = now;
        }
    }
}

struct ContainerSignaller {
    docker: Docker,
    id: String,
}

impl ContainerSignaller {
    fn send(&self, signal: &'static str) {
        let d = self.docker.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            let _ = d
                .kill_container(
                    &id,
                    Some(
                        KillContainerOptionsBuilder::default()
                            .signal(signal)
                            .build(),
                    ),
                )
                .await;
        });
    }
}

impl Signaller for ContainerSignaller {
    fn terminate(&self) {
        self.send("SIGTERM");
    }
    fn kill(&self) {
        self.send("SIGKILL");
    }
}

impl ContainerExecution {
    /// Waits until its output has been read to the end (see [`drain_logs`]).
    async fn drain_logs(&mut self, idle: Duration) {
        drain_logs(self.logs.take().into_iter().collect(), idle, &self.name).await;
    }

    async fn reap(&mut self) -> Result<Exit, RuntimeError> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        let code = wait_exit(&self.docker, &self.id).await?;
        // A run that succeeded was not killed for memory: one engine call less for it.
        // (A process other than the first may have been, with the first exiting 1.)
        let oom = code != 0
            && self
                .docker
                .inspect_container(&self.id, None)
                .await
                .map_err(engine_error)?
                .state
                .and_then(|s| s.oom_killed)
                .unwrap_or(false);
        let e = Exit {
            code: Some(code as i32),
            signal: None,
            oom_killed: oom,
        };
        self.exit = Some(e);
        Ok(e)
    }

    /// Removes the container, waits until the engine no longer knows it, then gives
    /// its network back (in the background, off the run's critical path, unless the
    /// pool keeps no idle spares).
    async fn remove_and_confirm(&mut self) -> Result<(), RuntimeError> {
        remove_container(&self.docker, &self.name).await;
        let gone = container_gone(&self.docker, &self.name).await;
        // Its address may be the next run's once the network is given back.
        crate::launch::close_ports(self.ports.take().as_ref()).await;
        if let Some(lease) = self.network.take() {
            lease.give_back().await;
        }
        if gone {
            Ok(())
        } else {
            Err(RuntimeError::System(format!(
                "container {} is still present after removal",
                self.id
            )))
        }
    }
}

#[async_trait]
impl Execution for ContainerExecution {
    fn pgid(&self) -> Option<i64> {
        None
    }

    fn signaller(&self) -> Arc<dyn Signaller> {
        Arc::new(ContainerSignaller {
            docker: self.docker.clone(),
            id: self.id.clone(),
        })
    }

    async fn wait(&mut self) -> Result<Exit, RuntimeError> {
        let e = self.reap().await?;
        self.drain_logs(LOG_DRAIN).await;
        self.remove_and_confirm().await?;
        Ok(e)
    }

    async fn kill(&mut self) -> Result<(), RuntimeError> {
        let _ = self
            .docker
            .kill_container(
                &self.id,
                Some(
                    KillContainerOptionsBuilder::default()
                        .signal("SIGKILL")
                        .build(),
                ),
            )
            .await;
        self.drain_logs(LOG_DRAIN_KILLED).await;
        self.remove_and_confirm().await
    }
}

impl ContainerExecution {
    /// The container's address on its network; `None` when it has none.
    pub async fn address(&self) -> Option<String> {
        let network = self.network.as_ref()?;
        container_ip(&self.docker, &self.id, network.name()).await
    }
}

/// The address of container `container` on network `network`, when it has one there.
pub(crate) async fn container_ip(
    docker: &Docker,
    container: &str,
    network: &str,
) -> Option<String> {
    docker
        .inspect_container(container, None)
        .await
        .ok()?
        .network_settings?
        .networks?
        .remove(network)?
        .ip_address
        .filter(|ip| !ip.is_empty())
}

impl DockerRuntime {
    /// The TCP ports an image declares with `EXPOSE`, in order.
    pub async fn exposed_ports(&self, image: &str) -> Vec<u16> {
        let Ok(c) = self.client().await else {
            return vec![];
        };
        let Ok(info) = c.inspect_image(image).await else {
            return vec![];
        };
        let mut ports: Vec<u16> = info
            .config
            .and_then(|c| c.exposed_ports)
            .into_iter()
            .flatten()
            .filter_map(|p| p.strip_suffix("/tcp")?.parse().ok())
            .collect();
        ports.sort_unstable();
        ports
    }
}

/// Where the ports a run serves on are reached (the request's `ports`, else the
/// image's `EXPOSE`d ones, at most `spec.max_ports`): the container's address on its
/// network. The execution closes them before its network is given back.
async fn ports_of(
    docker: &DockerRuntime,
    spec: &ImageRunSpec,
    exec: &mut ContainerExecution,
    ctx: &dyn LaunchContext,
) -> Option<mpsc::UnboundedReceiver<crate::launch::PortEvent>> {
    let ports = if spec.ports.is_empty() {
        let mut exposed = docker.exposed_ports(&spec.image).await;
        if exposed.len() > spec.max_ports {
            ctx.note(&format!(
                "the image exposes {} ports: only the first {} are proxied (limits.max_ports_per_run)",
                exposed.len(),
                spec.max_ports
            ))
            .await;
            exposed.truncate(spec.max_ports);
        }
        exposed
    } else {
        spec.ports.clone()
    };
    if ports.is_empty() {
        return None;
    }
    let Some(ip) = exec.address().await else {
        ctx.note("the run's ports cannot be reached: its profile gives it no network")
            .await;
        return None;
    };
    let (tx, rx) = mpsc::unbounded_channel();
    for p in ports {
        let _ = tx.send(crate::launch::PortEvent::Open(p, format!("{ip}:{p}")));
    }
    exec.ports = Some(tx);
    Some(rx)
}

/// Image runs: the image pulled when needed (with the run's registry credentials),
/// then one container of it.
pub struct ImageRuns(pub Arc<DockerRuntime>);

#[async_trait]
impl Runtime for ImageRuns {
    async fn launch(
        &self,
        run: &LaunchRequest<'_>,
        ctx: &dyn LaunchContext,
    ) -> Result<Launched, LaunchError> {
        let spec: ImageRunSpec = run.spec()?;
        ctx.notes(spec.env_warnings.clone()).await;
        let auth = run.registry_auth(spec.registry_username.as_deref())?;
        pull(&self.0, &spec.image, auth.as_ref(), ctx).await?;
        ctx.environment_ready().await?;
        let mut binds = Vec::new();
        if spec.enable_s3_mount {
            let dir = ctx.org_storage()?;
            binds.push(format!("{}:{}", dir.display(), spec.s3_mount_path));
        }
        // Secrets first; docker_run_env entries of the same name win.
        let mut env: Vec<(String, String)> = run
            .secrets
            .iter()
            .filter(|(k, _)| !spec.env.iter().any(|(e, _)| e == k))
            .cloned()
            .collect();
        env.extend(spec.env.iter().cloned());
        env.extend(run.identity());
        let job = ImageJob {
            run_id: run.run_id.to_string(),
            image: spec.image.clone(),
            cmd: spec.cmd.clone(),
            env,
            auth,
            resources: run.resources.clone(),
            binds,
            workdir: None,
        };
        let (tx, rx) = mpsc::channel::<OutputLine>(1024);
        match self.0.launch(&job, tx).await {
            Ok(mut e) => Ok(Launched {
                ports: ports_of(&self.0, &spec, &mut e, ctx).await,
                exec: Box::new(e),
                output: rx,
                timeout_s: spec.run.timeout,
                measure: None,
                cpu_before_s: 0.0,
            }),
            Err(RuntimeError::Image(msg)) => Err(LaunchError::Failed(msg)),
            Err(e) => Err(LaunchError::System(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        assert_eq!(split_tag("local/busybox:full"), ("local/busybox", "full"));
        assert_eq!(
            split_tag("127.0.0.1:5000/a/b"),
            ("127.0.0.1:5000/a/b", "latest")
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/a/b:1"),
            ("127.0.0.1:5000/a/b", "1")
        );
        assert_eq!(registry_of("127.0.0.1:5000/a/b:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("python:3.11"), "https://index.docker.io/v1/");
        let a = RegistryAuth {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}

#[cfg(test)]
mod plain_tests {
    use super::*;

    #[test]
    fn an_unreachable_engine_is_said_without_the_http_clients_words() {
        let io = bollard::errors::Error::IOError {
            err: std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "Connection reset by peer",
            ),
        };
        assert_eq!(plain_unreachable(&io), "Connection reset by peer");
        let timeout = bollard::errors::Error::RequestTimeoutError;
        assert!(!plain_unreachable(&timeout).contains("hyper"));
    }
}
