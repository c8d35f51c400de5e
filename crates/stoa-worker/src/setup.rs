//! What a worker executes runs with, set up from its config: the Python runtime and
//! its sandbox, the Docker engine, and the GPUs NVML finds.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use stoa_config::{Config, ProfileConfig, write_private};
use stoa_runtime::Runtime;
use stoa_runtime::compose::ComposeRuns;
use stoa_runtime::docker::{DockerConfig, DockerRuntime, ImageRuns};
use stoa_runtime::gpu::{self, GpuInfo};
use stoa_runtime::python_container::ContainerPython;
use stoa_runtime::{
    Interpreter, PythonRuntime, PythonRuntimeConfig, Sandbox, python::find_on_path,
};

use crate::{COMPOSE, CONTAINER_PYTHON, IMAGE, PYTHON, Runtimes};

/// Builds the Python runtime from the config, checking the interpreter and sandbox.
fn python_runtime(cfg: &Config, one_run: bool) -> anyhow::Result<PythonRuntime> {
    let interpreter = Interpreter::probe_cached(
        &cfg.python.interpreter,
        &cfg.data_dir.join("interpreter.json"),
    )?;
    let mut unavailable = None;
    let sandbox = match cfg.python.sandbox.as_str() {
        "none" => Sandbox::None,
        want => {
            let found = Sandbox::detect();
            if found == Sandbox::None {
                if want == "bubblewrap" {
                    anyhow::bail!(
                        "python.sandbox is 'bubblewrap' but bubblewrap (bwrap) is not installed or cannot create a sandbox here"
                    );
                }
                // Without a sandbox a root server would run untrusted code as root: it
                // starts (image runs work), and Python runs fail saying why.
                if is_root() {
                    tracing::error!(
                        "the server runs as root and bubblewrap (bwrap) is not installed or cannot create a sandbox here: Python runs will fail until it is installed (or python.sandbox = \"none\" accepts running them as root)"
                    );
                    unavailable = Some(
                        "Python runs need bubblewrap (bwrap) on this worker: it runs as root and will not run untrusted code as root".to_string(),
                    );
                }
                tracing::warn!(
                    "bubblewrap (bwrap) is not installed or not usable: Python runs are NOT sandboxed, only isolated in their own process group with a cleared environment"
                );
            }
            found
        }
    };
    if sandbox == Sandbox::None {
        tracing::warn!(
            root = is_root(),
            "without bubblewrap, runs and environment builds keep network access, see the host's files and run with the server's uid"
        );
    }
    let uv = match cfg.python.installer.as_str() {
        "pip" => None,
        want => {
            // uv beside the interpreter first; one on PATH only when it is a real
            // binary (a version manager's shim cannot run inside the sandbox).
            let beside = interpreter.path.with_file_name("uv");
            let uv = if beside.is_file() {
                Some(beside)
            } else {
                find_on_path("uv")
                    .filter(|p| std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x7fELF")))
            };
            if uv.is_none() && want == "uv" {
                anyhow::bail!("python.installer is 'uv' but uv is not on PATH");
            }
            uv
        }
    };
    let data = cfg.data_dir.clone();
    let pass_env = cfg
        .python
        .pass_env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    let confinement = confinement(cfg, &interpreter, sandbox, one_run)?;
    tracing::info!(python = %interpreter.path.display(), version = %interpreter.version, sandbox = ?confinement.sandbox, uv = ?uv, drop_to = ?confinement.drop_to.as_ref().map(|d| d.uid), cgroups = confinement.cgroups.is_some(), "Python runtime ready");
    Ok(PythonRuntime::new(PythonRuntimeConfig {
        interpreter,
        env_root: data.join("envs"),
        uv,
        download_cache: data.join("download-cache"),
        index_url: cfg.python.index_url.clone(),
        only_binary: cfg.python.only_binary,
        unavailable,
        confinement,
        build_timeout: std::time::Duration::from_secs(cfg.python.build_timeout_s.max(1)),
        build_limits: stoa_runtime::Limits {
            memory_bytes: Some(cfg.python.build_memory_mb * 1024 * 1024),
            pids: Some(cfg.python.build_pids_limit),
            ..Default::default()
        },
        pass_env,
        network: cfg.python.network,
        // `stoa exec` executes one run and ends: nothing to keep warm for.
        warm: stoa_runtime::warm::WarmConfig {
            enabled: cfg.python.warm.enabled && !one_run,
            per_env: cfg.python.warm.per_env,
            max_total: cfg.python.warm.max_total,
            idle: std::time::Duration::from_secs(cfg.python.warm.idle_s),
            learn_uses: cfg.python.warm.learn_uses,
            learn_window: std::time::Duration::from_secs(cfg.python.warm.learn_window_s),
        },
    }))
}

/// True when this process runs as root (the owner of `/proc/self` is its uid).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The sandbox of runs and builds: as root, runs drop to `python.sandbox_uid`, join
/// cgroups, and reach the network only through the egress rules.
fn confinement(
    cfg: &Config,
    interpreter: &Interpreter,
    sandbox: Sandbox,
    one_run: bool,
) -> anyhow::Result<stoa_runtime::Confinement> {
    let bwrap = sandbox.isolates();
    let uid = cfg.python.sandbox_uid;
    let drop_to = if bwrap && is_root() {
        let setpriv = find_on_path("setpriv").context(
            "the server runs as root: runs must drop privileges, which needs util-linux's setpriv on PATH",
        )?;
        Some(stoa_runtime::sandbox::DropTo {
            uid,
            gid: uid,
            setpriv,
        })
    } else {
        None
    };
    let cgroups = match stoa_runtime::cgroup::Cgroups::detect() {
        Ok(c) => Some(stoa_runtime::cgroup::CgroupPool::new(c)),
        Err(e) => {
            tracing::warn!(error = %e, "cgroups are not usable here: Python runs are limited by rlimits only (memory as address space)");
            None
        }
    };
    // Never remade while runs may have it mounted: several `stoa exec` of Slurm jobs
    // on one node share the data directory (and the one made for their content), a
    // worker makes its own at each start.
    let etc_dir = if one_run {
        stoa_runtime::sandbox::shared_etc_dir(&cfg.data_dir, uid, uid)
            .context("writing the sandbox's /etc/passwd")?
    } else {
        let dir = stoa_runtime::sandbox::process_etc_dir(&cfg.data_dir);
        stoa_runtime::sandbox::write_etc(&dir, uid, uid)
            .context("writing the sandbox's /etc/passwd")?;
        dir
    };
    let mut ro_paths = Vec::new();
    if !interpreter.prefix.starts_with("/usr") {
        ro_paths.push(interpreter.prefix.clone());
    }
    let egress = if drop_to.is_some() {
        let mut allow = cfg.python.allowed_destinations.clone();
        allow.extend(index_addresses(cfg.python.index_url.as_deref()));
        let policy = stoa_runtime::egress::EgressPolicy { uid, allow };
        if find_on_path("iptables-restore").is_none() {
            tracing::warn!(
                "iptables is not installed: runs with network and environment builds can reach internal addresses"
            );
            None
        } else {
            // Kept even when this first installation fails (a busy firewall): every
            // process with network installs it again first, and does not start without.
            // (A process that executes one run leaves it to that run: most have none.)
            if !one_run && let Err(e) = stoa_runtime::egress::install(&policy) {
                tracing::warn!(error = %e, "the egress rules of sandboxed processes could not be installed yet: runs with network and environment builds fail until they are");
            }
            Some(policy)
        }
    } else {
        tracing::warn!(
            "not running as root: runs with network and environment builds are not kept from internal addresses"
        );
        None
    };
    Ok(stoa_runtime::Confinement {
        sandbox,
        drop_to,
        seccomp: std::sync::Arc::new(stoa_runtime::seccomp::programs()?),
        cgroups,
        ro_paths,
        etc_dir,
        egress,
    })
}

/// The addresses of the configured package index, so builds reach it when it is internal.
fn index_addresses(url: Option<&str>) -> Vec<String> {
    let Some(host) = url.and_then(|u| url::Url::parse(u).ok()).and_then(|u| {
        u.host_str()
            .map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(443)))
    }) else {
        return vec![];
    };
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()
        .map(|a| a.map(|a| a.ip().to_string()).collect())
        .unwrap_or_default()
}

/// What a worker executes runs with, from its config: GPUs found by NVML become its
/// `worker.gpu_ids` (and GPU profiles), the Python runtime is probed, and the Docker
/// engine is set up (reached when first used). For the embedded worker and for
/// `stoa worker` alike.
pub fn runtimes(cfg: &mut Config) -> anyhow::Result<Runtimes> {
    runtimes_with(cfg, false)
}

/// The runtimes of a process that executes one run (`stoa exec`, once per Slurm job),
/// made for a quick start: the sandbox `/etc` is shared with the other such processes
/// on the node rather than made anew, and the egress rules are installed only if the
/// run needs network (every process with network installs them first).
pub fn runtimes_for_one_run(cfg: &mut Config) -> anyhow::Result<Runtimes> {
    runtimes_with(cfg, true)
}

fn runtimes_with(cfg: &mut Config, one_run: bool) -> anyhow::Result<Runtimes> {
    let gpus = Arc::new(gpu::Gpus::load());
    let found = gpus.discover();
    for g in &found {
        tracing::info!(index = g.index, model = %g.name, memory_bytes = g.memory_bytes, "found GPU");
    }
    apply_discovered_gpus(cfg, &found);
    let docker = DockerRuntime::new(DockerConfig {
        host: cfg.docker.host.clone(),
        network: cfg.docker.network,
        default_pids_limit: cfg.docker.default_pids_limit,
        instance: instance_id(&cfg.data_dir)?,
        network_pool: cfg.docker.network_pool,
        network_idle_s: cfg.docker.network_idle_s,
        allowed_registries: cfg.docker.allowed_registries.clone(),
        allowed_destinations: cfg.docker.allowed_destinations.clone(),
    });
    let docker = Arc::new(docker);
    let python = python_runtime(cfg, one_run)?;
    let in_image = ContainerPython::new(
        docker.clone(),
        cfg.data_dir.join("envs-image"),
        python.config().pass_env.clone(),
        std::time::Duration::from_secs(cfg.python.build_timeout_s.max(1)),
    )
    .with_stdlib(python.config().interpreter.stdlib.clone());
    // A new type of run is one more runtime here.
    let runs: HashMap<&'static str, Arc<dyn Runtime>> = HashMap::from([
        (PYTHON, Arc::new(python) as Arc<dyn Runtime>),
        (CONTAINER_PYTHON, Arc::new(in_image)),
        (IMAGE, Arc::new(ImageRuns(docker.clone()))),
        (COMPOSE, Arc::new(ComposeRuns(docker.clone()))),
    ]);
    Ok(Runtimes {
        runs,
        docker: Some(docker),
        gpus,
    })
}

/// Adds what NVML found: the GPU ids (when none are configured) and a profile per
/// GPU model (`gpu.h200`, one GPU per run) unless one of that name is configured.
pub fn apply_discovered_gpus(cfg: &mut Config, found: &[GpuInfo]) {
    if found.is_empty() {
        return;
    }
    if cfg.worker.gpu_ids.is_empty() {
        cfg.worker.gpu_ids = found.iter().map(|g| g.index.to_string()).collect();
    }
    for g in found {
        let name = gpu::profile_name(&g.name);
        if cfg.profiles.iter().any(|p| p.name == name) {
            continue;
        }
        cfg.profiles.push(ProfileConfig {
            price_per_hour: cfg.worker.gpu_prices.get(&name).copied().unwrap_or(0.0),
            name,
            gpu_count: 1,
            gpu_model: Some(g.name.clone()),
            memory_mb: None,
            ..Default::default()
        });
    }
}

/// This installation's id, made at first start (labels its containers).
fn instance_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_string());
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    write_private(&path, &format!("{id}\n"))?;
    Ok(id)
}
