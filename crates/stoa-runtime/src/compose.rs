//! Compose runs, orchestrated on the Docker Engine API (no compose binary).
//!
//! A stack gets one network (a pool network, or an internal one when
//! `docker.network = false`), its named volumes, and one container per service
//! (`stoa-<run>-<service>`), each reachable by its service name. Every object carries
//! the run's label, so the reconciler removes what a crash leaves behind.
//!
//! Services start as soon as what they depend on allows it (`service_started`,
//! `service_healthy`, `service_completed_successfully`). The run ends when a
//! service's container exits, except services others await with
//! `service_completed_successfully` (those end the run only when they fail). The exit
//! code is that service's, or that of `x-stoa.exit-code-from`. Then every other
//! container is stopped with its stop signal and grace period, dependents before what
//! they depend on, and everything of the run is removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, DeviceRequest, EndpointSettings, HealthConfig, HealthStatusEnum,
    HostConfig, Mount, MountTmpfsOptions, MountType, NetworkCreateRequest, NetworkingConfig,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListVolumesOptionsBuilder,
    StopContainerOptionsBuilder,
};
use stoa_core::ComposeRunSpec;
use stoa_core::compose::{ComposePlan, Condition, MountPlan, ServicePlan};
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tokio::task::JoinSet;

use crate::docker::{
    DockerRuntime, INSTANCE_LABEL, RUN_LABEL, Resources, container_gone, engine_error,
    is_not_found, registry_of, remove_container, server_message, wait_exit,
};
use crate::launch::{LaunchContext, LaunchError, LaunchRequest, Launched, Measure, Runtime, pull};
use crate::{Execution, Exit, OutputLine, RuntimeError, Signaller, Stream};

/// The label naming a container's compose service.
pub const SERVICE_LABEL: &str = "stoa.service";

/// Default time between a service's stop signal and its kill (compose's default).
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// What one compose run needs.
#[derive(Debug, Clone)]
pub struct ComposeJob {
    pub run_id: String,
    pub plan: ComposePlan,
    /// Variables every service gets, below its own `environment`.
    pub env: Vec<(String, String)>,
    /// The profile's limits (a cap on each container) and the run's GPUs.
    pub resources: Resources,
    /// The org's storage directory and where services see it: mounted into the
    /// services `plan.s3_mount` lists (all when there is no list).
    pub storage: Option<(String, String)>,
    /// Where each port a service serves on is reached, sent once its container
    /// started; closed before the stack's network is given back.
    pub ports: Option<mpsc::UnboundedSender<crate::launch::PortEvent>>,
}

impl ComposeJob {
    /// The container name of a service.
    pub fn container_name(run_id: &str, service: &str) -> String {
        format!("stoa-{run_id}-{service}")
    }
}

/// Where a service is.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting,
    Started,
    Healthy,
    Unhealthy(String),
    Exited {
        code: i64,
        oom: bool,
    },
    /// It will not start (the run is ending).
    Skipped,
}

/// A started container of the stack.
#[derive(Debug, Clone)]
struct Member {
    service: String,
    name: String,
    /// Stop order: higher first (dependents before their dependencies).
    depth: usize,
    grace: Duration,
}

/// The live objects of a stack, shared by the orchestrator, signals and teardown.
struct Stack {
    docker: Docker,
    runtime: Arc<DockerRuntime>,
    run_id: String,
    network: String,
    /// The pool network given to the stack (given back when the stack is removed or
    /// dropped); `None` for a network of the run's own, removed with it.
    lease: std::sync::Mutex<Option<crate::netpool::NetworkLease>>,
    /// The network is the run's own (not a pool network), removed with it.
    own_network: bool,
    volumes: Vec<String>,
    members: std::sync::Mutex<Vec<Member>>,
    /// Where the services' ports were sent (closed before the network goes back).
    ports: Option<mpsc::UnboundedSender<crate::launch::PortEvent>>,
    /// Held while a container is created and started; teardown takes it after
    /// setting `ending`, so no container appears behind its back.
    creating: Mutex<()>,
    ending: AtomicBool,
    killed: AtomicBool,
    end: Notify,
    /// What forwards each service's output: read to the end before removal.
    pumps: std::sync::Mutex<Vec<crate::docker::LogPump>>,
}

impl Stack {
    fn members(&self) -> Vec<Member> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn finish(&self, kill: bool) {
        if kill {
            self.killed.store(true, Ordering::SeqCst);
        }
        self.ending.store(true, Ordering::SeqCst);
        self.end.notify_waiters();
    }

    /// Waits until its services' output has been read to the end (giving up on one
    /// that stands still for `idle`).
    async fn drain_logs(&self, idle: std::time::Duration) {
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(|p| p.into_inner()));
        crate::docker::drain_logs(pumps, idle, &self.run_id).await;
    }

    /// Returns once the stack is ending (at once when it already is).
    async fn ended(&self) {
        loop {
            let notified = self.end.notified();
            tokio::pin!(notified);
            // Registered before the flag is read: no wake-up falls between the two.
            notified.as_mut().enable();
            if self.ending.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    async fn signal_all(&self, signal: Option<&str>) {
        for m in self.members() {
            let opts = match signal {
                Some(s) => KillContainerOptionsBuilder::default().signal(s).build(),
                // The container's own stop signal.
                None => {
                    let sig = self
                        .docker
                        .inspect_container(&m.name, None)
                        .await
                        .ok()
                        .and_then(|i| i.config.and_then(|c| c.stop_signal))
                        .unwrap_or_else(|| "SIGTERM".into());
                    KillContainerOptionsBuilder::default().signal(&sig).build()
                }
            };
            let _ = self.docker.kill_container(&m.name, Some(opts)).await;
        }
    }
}

/// Sends where the ports of service `svc` (container `name`, just started) are
/// reached: its address on the stack's network.
async fn send_ports(
    stack: &Stack,
    name: &str,
    svc: &ServicePlan,
    ports: &mpsc::UnboundedSender<crate::launch::PortEvent>,
) {
    let Some(ip) = crate::docker::container_ip(&stack.docker, name, &stack.network).await else {
        tracing::warn!(run = %stack.run_id, service = %svc.name, "the service's address on the stack's network is unknown: its ports are not proxied");
        return;
    };
    for (proxied, target) in &svc.ports {
        let _ = ports.send(crate::launch::PortEvent::Open(
            *proxied,
            format!("{ip}:{target}"),
        ));
    }
}

impl DockerRuntime {
    /// Creates the stack's network and volumes and starts orchestrating its services.
    /// On failure, what was created is removed again.
    pub async fn launch_compose(
        self: &Arc<Self>,
        job: ComposeJob,
        output: mpsc::Sender<OutputLine>,
    ) -> Result<ComposeExecution, RuntimeError> {
        let c = self.client().await?.clone();
        let labels = self.run_labels(&job.run_id);
        let (network, lease) = if self.config().network {
            let mut lease = self.take_network(&c, &job.run_id, false).await?;
            // Its services are made one by one, later: a spare network removed behind
            // Stoa's back is replaced now, once.
            if !self.network_exists(&c, lease.name()).await? {
                tracing::warn!(run = %job.run_id, network = %lease.name(), "the stack's network disappeared before its start: taking a fresh one");
                lease.lost();
                lease = self.take_network(&c, &job.run_id, true).await?;
            }
            (lease.name().to_string(), Some(lease))
        } else {
            // Only the services see each other: an internal network of the run.
            let name = format!("stoa-{}", job.run_id);
            c.create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                internal: Some(true),
                // Internal networks still reach the host at their gateway: the
                // bridge is named so that the egress rules refuse that too.
                options: Some(crate::docker::bridge_options(&name)),
                labels: Some(labels.clone()),
                ..Default::default()
            })
            .await
            .map_err(engine_error)?;
            (name, None)
        };
        let stack = Arc::new(Stack {
            docker: c.clone(),
            runtime: self.clone(),
            run_id: job.run_id.clone(),
            network,
            own_network: lease.is_none(),
            lease: std::sync::Mutex::new(lease),
            volumes: job
                .plan
                .volumes
                .iter()
                .map(|v| volume_name(&job.run_id, v))
                .collect(),
            members: std::sync::Mutex::new(Vec::new()),
            ports: job.ports.clone(),
            creating: Mutex::new(()),
            ending: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            end: Notify::new(),
            pumps: Default::default(),
        });
        for v in &stack.volumes {
            if let Err(e) = c
                .create_volume(VolumeCreateRequest {
                    name: Some(v.clone()),
                    labels: Some(labels.clone()),
                    ..Default::default()
                })
                .await
            {
                remove_stack(&stack).await;
                return Err(engine_error(e));
            }
        }
        let orchestrator = tokio::spawn(orchestrate(stack.clone(), Arc::new(job), output));
        Ok(ComposeExecution {
            stack,
            orchestrator: Some(orchestrator),
            exit_code_from: None,
        })
    }

    /// Removes volumes and run networks (compose runs) of this installation labelled
    /// with a run for which `live` answers false.
    pub(crate) async fn reconcile_stack_objects(
        &self,
        c: &Docker,
        live: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<usize, RuntimeError> {
        let mine = format!("{INSTANCE_LABEL}={}", self.config().instance);
        let filters = HashMap::from([("label", vec![RUN_LABEL.to_string(), mine])]);
        let mut removed = 0;
        let networks = c
            .list_networks(Some(
                bollard::query_parameters::ListNetworksOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(engine_error)?;
        for n in networks {
            let run = n.labels.as_ref().and_then(|l| l.get(RUN_LABEL)).cloned();
            if let (Some(run), Some(name)) = (run, n.name)
                && !live(&run)
                && c.remove_network(&name).await.is_ok()
            {
                tracing::info!(run = %run, network = %name, "reconciler removed an orphaned network");
                removed += 1;
            }
        }
        let volumes = c
            .list_volumes(Some(
                ListVolumesOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(engine_error)?;
        for v in volumes.volumes.unwrap_or_default() {
            let run = v.labels.get(RUN_LABEL).cloned().unwrap_or_default();
            if !live(&run)
                && c.remove_volume(
                    &v.name,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await
                .is_ok()
            {
                tracing::info!(run = %run, volume = %v.name, "reconciler removed an orphaned volume");
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn volume_name(run_id: &str, volume: &str) -> String {
    format!("stoa-{run_id}-{volume}")
}

/// How deep a service sits in the dependency graph (0: depends on nothing).
fn depths(plan: &ComposePlan) -> HashMap<String, usize> {
    let mut d: HashMap<String, usize> = HashMap::new();
    // Services are ordered dependencies first.
    for s in &plan.services {
        let depth = s
            .depends_on
            .iter()
            .filter_map(|(dep, _)| d.get(dep))
            .map(|x| x + 1)
            .max()
            .unwrap_or(0);
        d.insert(s.name.clone(), depth);
    }
    d
}

/// How the orchestrator ended.
enum Ended {
    /// A service's container exited and ends the run.
    Exit { service: String, exit: Exit },
    /// Abort, stop or timeout: the run was told to end.
    Told,
}

async fn orchestrate(
    stack: Arc<Stack>,
    job: Arc<ComposeJob>,
    output: mpsc::Sender<OutputLine>,
) -> Result<Ended, RuntimeError> {
    let depth = depths(&job.plan);
    let mut senders = HashMap::new();
    let mut states = HashMap::new();
    for s in &job.plan.services {
        let (tx, rx) = watch::channel(State::Waiting);
        senders.insert(s.name.clone(), tx);
        states.insert(s.name.clone(), rx);
    }
    let states = Arc::new(states);
    let mut tasks = JoinSet::new();
    for s in &job.plan.services {
        let tx = senders.remove(&s.name).expect("one sender per service");
        let svc = s.clone();
        let d = depth.get(&s.name).copied().unwrap_or(0);
        let (stack, job, states, output) =
            (stack.clone(), job.clone(), states.clone(), output.clone());
        tasks.spawn(async move {
            let r = run_service(&stack, &job, &svc, d, &states, &tx, output).await;
            if r.is_err() || *tx.borrow() == State::Waiting {
                let _ = tx.send(State::Skipped);
            }
            (svc.name.clone(), r)
        });
    }
    drop(output);
    let result = loop {
        let next = tokio::select! {
            n = tasks.join_next() => n,
            _ = stack.ended() => break Ok(Ended::Told),
        };
        let Some(joined) = next else {
            break Ok(Ended::Told);
        };
        let (name, r) =
            joined.map_err(|e| RuntimeError::System(format!("a service task failed: {e}")))?;
        match r {
            Err(e) => break Err(e),
            Ok(None) => {
                if stack.ending.load(Ordering::SeqCst) {
                    break Ok(Ended::Told);
                }
            }
            Ok(Some(exit)) => {
                let svc = job.plan.service(&name).expect("a planned service");
                if !svc.awaited {
                    break Ok(Ended::Exit {
                        service: name,
                        exit,
                    });
                }
                if exit.return_code() != 0 {
                    let waiting: Vec<&str> = job
                        .plan
                        .services
                        .iter()
                        .filter(|s| {
                            s.depends_on
                                .iter()
                                .any(|(d, c)| d == &name && *c == Condition::CompletedSuccessfully)
                        })
                        .map(|s| s.name.as_str())
                        .collect();
                    break Err(RuntimeError::Failed {
                        message: format!(
                            "service {name} exited with code {}, and {} wait(s) for it to complete successfully",
                            exit.return_code(),
                            waiting.join(", ")
                        ),
                        code: Some(exit.return_code()),
                    });
                }
            }
        }
    };
    // The remaining tasks end on their own once the stack is torn down.
    tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
    result
}

/// Waits until `dep` satisfies `cond`; an error when it never can.
async fn await_dependency(
    stack: &Stack,
    me: &str,
    dep: &str,
    cond: Condition,
    states: &HashMap<String, watch::Receiver<State>>,
) -> Result<bool, RuntimeError> {
    let mut rx = states
        .get(dep)
        .cloned()
        .ok_or_else(|| RuntimeError::System(format!("unknown service {dep}")))?;
    loop {
        let st = rx.borrow_and_update().clone();
        let verdict = match (&st, cond) {
            (State::Skipped, _) => return Ok(false),
            (State::Started | State::Healthy | State::Exited { .. }, Condition::Started) => {
                Some(Ok(()))
            }
            (State::Healthy, Condition::Healthy) => Some(Ok(())),
            (State::Unhealthy(why), Condition::Healthy) => Some(Err(format!(
                "service {dep} did not become healthy ({why}), and {me} waits for it to be healthy"
            ))),
            (State::Exited { code, .. }, Condition::Healthy) => Some(Err(format!(
                "service {dep} exited with code {code} before it became healthy, and {me} waits for it to be healthy"
            ))),
            (State::Exited { code: 0, .. }, Condition::CompletedSuccessfully) => Some(Ok(())),
            (State::Exited { code, .. }, Condition::CompletedSuccessfully) => Some(Err(format!(
                "service {dep} exited with code {code}, and {me} waits for it to complete successfully"
            ))),
            _ => None,
        };
        match verdict {
            Some(Ok(())) => return Ok(true),
            Some(Err(message)) => {
                let code = match st {
                    State::Exited { code, .. } if code != 0 => Some(code),
                    _ => None,
                };
                return Err(RuntimeError::Failed { message, code });
            }
            None => {}
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Ok(false) },
            _ = stack.ended() => return Ok(false),
        }
    }
}

/// Starts one service when its dependencies allow, reports its health and exit.
/// `Ok(None)`: it never started because the run ended first.
async fn run_service(
    stack: &Stack,
    job: &ComposeJob,
    svc: &ServicePlan,
    depth: usize,
    states: &HashMap<String, watch::Receiver<State>>,
    tx: &watch::Sender<State>,
    output: mpsc::Sender<OutputLine>,
) -> Result<Option<Exit>, RuntimeError> {
    // Say what a service waits for, when it has to wait for more than a start.
    let waits: Vec<String> = svc
        .depends_on
        .iter()
        .filter_map(|(dep, cond)| match cond {
            Condition::Started => None,
            Condition::Healthy => Some(format!("{dep} to be healthy")),
            Condition::CompletedSuccessfully => Some(format!("{dep} to complete successfully")),
        })
        .collect();
    if !waits.is_empty() {
        let _ = output
            .send(OutputLine {
                stream: Stream::System,
                text: format!("[stoa] {} waits for {}\n", svc.name, waits.join(" and ")),
                service: None,
            })
            .await;
    }
    for (dep, cond) in &svc.depends_on {
        if !await_dependency(stack, &svc.name, dep, *cond, states).await? {
            return Ok(None);
        }
    }
    let name = ComposeJob::container_name(&job.run_id, &svc.name);
    {
        let _creating = stack.creating.lock().await;
        if stack.ending.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let body = container_body(stack, job, svc);
        stack
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Member {
                service: svc.name.clone(),
                name: name.clone(),
                depth,
                grace: svc.stop_grace.unwrap_or(DEFAULT_GRACE),
            });
        stack
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
            .map_err(|e| {
                if is_not_found(&e) {
                    RuntimeError::Image(format!(
                        "service {}: image {} not found: {}",
                        svc.name,
                        svc.image,
                        server_message(&e)
                    ))
                } else {
                    RuntimeError::System(format!(
                        "service {}: the container could not be created: {}",
                        svc.name,
                        server_message(&e)
                    ))
                }
            })?;
        // Its output is read from the log once it started: the log holds all of it.
        stack
            .docker
            .start_container(&name, None)
            .await
            .map_err(|e| {
                RuntimeError::System(format!(
                    "service {}: the container could not start: {}",
                    svc.name,
                    server_message(&e)
                ))
            })?;
        let pump = crate::docker::LogPump::start(
            stack.docker.clone(),
            name.clone(),
            output,
            Some(Arc::from(svc.name.as_str())),
        );
        stack
            .pumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pump);
        if let (false, Some(ports)) = (svc.ports.is_empty(), &job.ports) {
            send_ports(stack, &name, svc, ports).await;
        }
    }
    let _ = tx.send(State::Started);
    let watch_health = job.plan.services.iter().any(|s| {
        s.depends_on
            .iter()
            .any(|(d, c)| d == &svc.name && *c == Condition::Healthy)
    });
    let code = if watch_health {
        tokio::select! {
            c = wait_exit(&stack.docker, &name) => c?,
            // Health is settled; now only the exit matters.
            _ = follow_health(stack, &name, tx) => wait_exit(&stack.docker, &name).await?,
        }
    } else {
        wait_exit(&stack.docker, &name).await?
    };
    let oom = stack
        .docker
        .inspect_container(&name, None)
        .await
        .ok()
        .and_then(|i| i.state)
        .and_then(|s| s.oom_killed)
        .unwrap_or(false);
    let _ = tx.send(State::Exited { code, oom });
    Ok(Some(Exit {
        code: Some(code as i32),
        signal: None,
        oom_killed: oom,
    }))
}

/// Polls a container's health until it is healthy or unhealthy (then returns).
async fn follow_health(stack: &Stack, name: &str, tx: &watch::Sender<State>) {
    loop {
        let health = stack
            .docker
            .inspect_container(name, None)
            .await
            .ok()
            .and_then(|i| i.state)
            .map(|s| s.health);
        match health {
            Some(None) => {
                let _ = tx.send(State::Unhealthy("it has no healthcheck".into()));
                return;
            }
            Some(Some(h)) => match h.status {
                Some(HealthStatusEnum::HEALTHY) => {
                    let _ = tx.send(State::Healthy);
                    return;
                }
                Some(HealthStatusEnum::UNHEALTHY) => {
                    let last = h
                        .log
                        .and_then(|l| l.last().cloned())
                        .map(|r| {
                            format!(
                                "last check exited {}: {}",
                                r.exit_code.unwrap_or(-1),
                                r.output.unwrap_or_default().trim()
                            )
                        })
                        .unwrap_or_else(|| "its healthcheck failed".into());
                    let _ = tx.send(State::Unhealthy(last));
                    return;
                }
                _ => {}
            },
            // Gone or not answering: the exit (or the end) will tell.
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn container_body(stack: &Stack, job: &ComposeJob, svc: &ServicePlan) -> ContainerCreateBody {
    let r = &job.resources;
    let mut labels: HashMap<String, String> = svc.labels.clone().into_iter().collect();
    labels.extend(stack.runtime.run_labels(&job.run_id));
    labels.insert(SERVICE_LABEL.into(), svc.name.clone());
    let mut env: Vec<String> = job
        .env
        .iter()
        .filter(|(k, _)| !svc.environment.iter().any(|(e, _)| e == k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.extend(svc.environment.iter().map(|(k, v)| format!("{k}={v}")));
    // The service's limit, capped by the profile's.
    let cap = |own: Option<f64>, profile: Option<f64>| match (own, profile) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let memory = cap(
        svc.memory.map(|m| m as f64),
        r.memory_mb.map(|m| (m * 1024 * 1024) as f64),
    )
    .map(|m| m as i64);
    let cpus = cap(svc.cpus, r.cpus);
    let device_requests = svc.gpus.as_ref().map(|g| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            count: None,
            device_ids: Some(g.pick(&r.gpu_ids)),
            capabilities: Some(vec![vec!["gpu".into()]]),
            options: None,
        }]
    });
    let storage = job.storage.as_ref().filter(|_| {
        job.plan
            .s3_mount
            .as_ref()
            .is_none_or(|names| names.contains(&svc.name))
    });
    let storage = storage.map(|(host, target)| Mount {
        typ: Some(MountType::BIND),
        source: Some(host.clone()),
        target: Some(target.clone()),
        ..Default::default()
    });
    let mounts: Vec<Mount> = svc
        .mounts
        .iter()
        .map(|m| match m {
            MountPlan::Volume {
                name,
                target,
                read_only,
            } => Mount {
                typ: Some(MountType::VOLUME),
                source: Some(volume_name(&job.run_id, name)),
                target: Some(target.clone()),
                read_only: Some(*read_only),
                ..Default::default()
            },
            MountPlan::Anonymous { target } => Mount {
                typ: Some(MountType::VOLUME),
                target: Some(target.clone()),
                ..Default::default()
            },
            MountPlan::Tmpfs { target, size } => Mount {
                typ: Some(MountType::TMPFS),
                target: Some(target.clone()),
                tmpfs_options: size.map(|s| MountTmpfsOptions {
                    size_bytes: Some(s as i64),
                    ..Default::default()
                }),
                ..Default::default()
            },
        })
        .chain(storage)
        .collect();
    let tmpfs: HashMap<String, String> = svc
        .tmpfs
        .iter()
        .map(|t| match t.split_once(':') {
            Some((p, o)) => (p.to_string(), o.to_string()),
            None => (t.clone(), String::new()),
        })
        .collect();
    let mut aliases = vec![svc.name.clone()];
    aliases.extend(svc.aliases.iter().cloned());
    let healthcheck = svc.healthcheck.as_ref().map(|h| HealthConfig {
        test: Some(h.test.clone()),
        interval: h.interval_ns,
        timeout: h.timeout_ns,
        retries: h.retries,
        start_period: h.start_period_ns,
        start_interval: h.start_interval_ns,
    });
    let expose: Vec<String> = svc
        .expose
        .iter()
        .map(|p| {
            if p.contains('/') {
                p.clone()
            } else {
                format!("{p}/tcp")
            }
        })
        .collect();
    ContainerCreateBody {
        image: Some(svc.image.clone()),
        cmd: svc.command.clone(),
        entrypoint: svc.entrypoint.clone(),
        env: Some(env),
        labels: Some(labels),
        working_dir: svc.working_dir.clone(),
        user: svc.user.clone(),
        hostname: Some(svc.name.clone()),
        exposed_ports: (!expose.is_empty()).then_some(expose),
        healthcheck,
        stop_signal: svc.stop_signal.clone(),
        stop_timeout: svc.stop_grace.map(|g| g.as_secs() as i64),
        tty: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                stack.network.clone(),
                EndpointSettings {
                    aliases: Some(aliases),
                    ..Default::default()
                },
            )])),
        }),
        host_config: Some(HostConfig {
            memory,
            memory_swap: memory,
            memory_reservation: svc.memory_reservation.map(|m| m as i64),
            nano_cpus: cpus.map(|c| (c * 1e9) as i64),
            pids_limit: Some(
                r.pids_limit
                    .unwrap_or(stack.runtime.config().default_pids_limit),
            ),
            network_mode: Some(stack.network.clone()),
            mounts: (!mounts.is_empty()).then_some(mounts),
            tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
            shm_size: svc.shm_size.map(|s| s as i64),
            init: svc.init.then_some(true),
            device_requests,
            security_opt: Some(vec!["no-new-privileges".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Stops every container of the stack: dependents first, each level at once, with
/// each container's stop signal and grace period; all at once with SIGKILL when the
/// run was killed. No container is created afterwards.
async fn stop_all(stack: &Stack) {
    stack.finish(false);
    let _creating = stack.creating.lock().await;
    let members = stack.members();
    if stack.killed.load(Ordering::SeqCst) {
        stack.signal_all(Some("SIGKILL")).await;
        return;
    }
    let mut levels: Vec<usize> = members.iter().map(|m| m.depth).collect();
    levels.sort_unstable();
    levels.dedup();
    for level in levels.into_iter().rev() {
        let stops = members.iter().filter(|m| m.depth == level).map(|m| {
            let opts = StopContainerOptionsBuilder::default()
                .t(m.grace.as_secs().min(i32::MAX as u64) as i32)
                .build();
            let d = stack.docker.clone();
            let name = m.name.clone();
            async move {
                let _ = d.stop_container(&name, Some(opts)).await;
            }
        });
        futures::future::join_all(stops).await;
    }
}

/// Removes containers, volumes and the network of a stopped stack, and confirms
/// that no container is left.
async fn remove_all(stack: &Stack) -> Result<(), RuntimeError> {
    remove_stack(stack).await;
    let mut left = Vec::new();
    for m in &stack.members() {
        if !container_gone(&stack.docker, &m.name).await {
            left.push(m.service.clone());
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(RuntimeError::System(format!(
            "containers of services {} are still present after removal",
            left.join(", ")
        )))
    }
}

/// Removes every container, volume and the network of a stack (whatever their state).
async fn remove_stack(stack: &Stack) {
    let removals = stack
        .members()
        .into_iter()
        .map(|m| async move { remove_container(&stack.docker, &m.name).await });
    futures::future::join_all(removals).await;
    for v in &stack.volumes {
        let _ = stack
            .docker
            .remove_volume(v, None::<bollard::query_parameters::RemoveVolumeOptions>)
            .await;
    }
    // Its services' addresses may be the next run's once the network is given back.
    crate::launch::close_ports(stack.ports.as_ref()).await;
    let lease = stack.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
    match lease {
        // Back to the pool once its containers are detached.
        Some(l) => l.give_back().await,
        None if stack.own_network => {
            let _ = stack.docker.remove_network(&stack.network).await;
        }
        None => {}
    }
}

/// A running stack.
pub struct ComposeExecution {
    stack: Arc<Stack>,
    orchestrator: Option<tokio::task::JoinHandle<Result<Ended, RuntimeError>>>,
    exit_code_from: Option<String>,
}

impl ComposeExecution {
    /// Takes the run's exit code from this service (`x-stoa.exit-code-from`).
    pub fn exit_code_from(mut self, service: Option<String>) -> Self {
        self.exit_code_from = service;
        self
    }

    /// The exit code of a service's container (before removal).
    async fn code_of(&self, service: &str) -> Option<i64> {
        let name = ComposeJob::container_name(&self.stack.run_id, service);
        self.stack
            .docker
            .inspect_container(&name, None)
            .await
            .ok()?
            .state?
            .exit_code
    }
}

struct StackSignaller(Arc<Stack>);

impl Signaller for StackSignaller {
    fn terminate(&self) {
        let s = self.0.clone();
        s.finish(false);
        tokio::spawn(async move { s.signal_all(None).await });
    }
    fn kill(&self) {
        let s = self.0.clone();
        s.finish(true);
        tokio::spawn(async move { s.signal_all(Some("SIGKILL")).await });
    }
}

#[async_trait]
impl Execution for ComposeExecution {
    fn pgid(&self) -> Option<i64> {
        None
    }

    fn signaller(&self) -> Arc<dyn Signaller> {
        Arc::new(StackSignaller(self.stack.clone()))
    }

    async fn wait(&mut self) -> Result<Exit, RuntimeError> {
        let ended = match self.orchestrator.take() {
            Some(h) => h
                .await
                .map_err(|e| RuntimeError::System(format!("the orchestrator failed: {e}")))?,
            None => Ok(Ended::Told),
        };
        stop_all(&self.stack).await;
        self.stack.drain_logs(crate::docker::LOG_DRAIN).await;
        // Read between stop and removal: the exit-code-from service has stopped too.
        let code_from = match &self.exit_code_from {
            Some(s) => Some(self.code_of(s).await),
            None => None,
        };
        // Told to stop (not killed): the services' own codes, the first non-zero one.
        let killed = self.stack.killed.load(Ordering::SeqCst);
        let mut stopped_code = None;
        if !killed && matches!(ended, Ok(Ended::Told)) {
            for m in self.stack.members() {
                if let Some(c) = self.code_of(&m.service).await {
                    stopped_code = match stopped_code {
                        Some(prev) if prev != 0 => Some(prev),
                        _ => Some(c),
                    };
                }
            }
        }
        let removed = remove_all(&self.stack).await;
        let ended = ended?;
        removed?;
        match (ended, code_from) {
            (Ended::Told, code_from) => Ok(match code_from.flatten().or(stopped_code) {
                Some(c) if !killed => Exit {
                    code: Some(c as i32),
                    signal: None,
                    oom_killed: false,
                },
                _ => Exit {
                    code: None,
                    signal: Some(if killed { 9 } else { 15 }),
                    oom_killed: false,
                },
            }),
            (Ended::Exit { exit, .. }, None) => Ok(exit),
            (Ended::Exit { .. }, Some(Some(code))) => Ok(Exit {
                code: Some(code as i32),
                signal: None,
                oom_killed: false,
            }),
            (Ended::Exit { service, .. }, Some(None)) => Err(RuntimeError::Failed {
                message: format!(
                    "the run ended when {service} exited, before the exit-code-from service started"
                ),
                code: None,
            }),
        }
    }

    async fn kill(&mut self) -> Result<(), RuntimeError> {
        self.stack.finish(true);
        if let Some(h) = self.orchestrator.take() {
            let _ = h.await;
        }
        stop_all(&self.stack).await;
        self.stack.drain_logs(crate::docker::LOG_DRAIN_KILLED).await;
        remove_all(&self.stack).await
    }
}

/// Compose runs: the stack planned again with the org's variables (they may have
/// changed since it was accepted), its images pulled, its services started in order.
pub struct ComposeRuns(pub Arc<DockerRuntime>);

#[async_trait]
impl Runtime for ComposeRuns {
    async fn launch(
        &self,
        run: &LaunchRequest<'_>,
        ctx: &dyn LaunchContext,
    ) -> Result<Launched, LaunchError> {
        let spec: ComposeRunSpec = run.spec()?;
        let gpus = run.gpu_ids.len() as u32;
        let lookup = stoa_core::compose::lookup_in(run.secrets);
        let plan = match stoa_core::compose::plan(&spec.compose_file_code, &lookup, gpus) {
            Ok(p) => p,
            Err(errs) => {
                let msg = errs
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.msg))
                    .collect::<Vec<_>>()
                    .join("; ");
                let msg = format!("the compose file no longer checks out: {msg}");
                ctx.note(&msg).await;
                return Err(LaunchError::Failed(msg));
            }
        };
        ctx.notes(plan.warnings.clone()).await;
        let auth = run.registry_auth(spec.registry_username.as_deref())?;
        let images: std::collections::BTreeSet<&str> =
            plan.services.iter().map(|s| s.image.as_str()).collect();
        // One set of credentials per stack: it is for the images of a named registry
        // when there are any (others are pulled without it), else for all.
        let hub = registry_of("library/x");
        let private = images.iter().any(|i| registry_of(i) != hub);
        for image in images {
            let needs = !private || registry_of(image) != hub;
            pull(&self.0, image, auth.as_ref().filter(|_| needs), ctx).await?;
        }
        ctx.environment_ready().await?;
        let mut env = run.secrets.to_vec();
        env.extend(run.identity());
        let names = plan
            .services
            .iter()
            .map(|s| ComposeJob::container_name(run.run_id, &s.name))
            .collect();
        let exit_code_from = plan.exit_code_from.clone();
        let storage = if spec.enable_s3_mount {
            let dir = ctx.org_storage()?;
            Some((dir.display().to_string(), spec.s3_mount_path.clone()))
        } else {
            None
        };
        let (ports_tx, ports_rx) = mpsc::unbounded_channel();
        let job = ComposeJob {
            run_id: run.run_id.to_string(),
            plan,
            env,
            resources: run.resources.clone(),
            storage,
            ports: Some(ports_tx),
        };
        let (tx, rx) = mpsc::channel::<OutputLine>(1024);
        match self.0.launch_compose(job, tx).await {
            Ok(e) => Ok(Launched {
                exec: Box::new(e.exit_code_from(exit_code_from)),
                output: rx,
                timeout_s: spec.run.timeout,
                measure: Some(Measure::Containers(names)),
                cpu_before_s: 0.0,
                ports: Some(ports_rx),
            }),
            Err(e) => Err(LaunchError::System(e.to_string())),
        }
    }
}
