//! The Stoa server: the HTTP API, the output streams, and the embedded worker, over a
//! [`stoa_store::Store`].

pub mod api;
pub mod auth;
pub mod callbacks;
pub mod config;
pub mod disk;
pub mod engine;
pub mod env_vars;
pub mod error;
pub mod hub;
pub mod masking;
pub mod prom;
pub mod retention;
pub mod run_metrics;
pub mod secrets;
pub mod selection;
pub mod sse;
pub mod state;
pub mod storage;
pub mod worker;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::serve::ListenerExt;
use stoa_core::Limits;
use stoa_runtime::docker::{DockerConfig, DockerRuntime};
use stoa_runtime::{
    Interpreter, PythonRuntime, PythonRuntimeConfig, Sandbox, python::find_on_path,
};
use stoa_store::{SqliteStore, Store};
use tokio::sync::watch;

pub use config::Config;

use crate::engine::Engine;
use crate::hub::Hub;
use crate::state::AppState;

/// A started server.
pub struct ServerHandle {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The address of the S3 endpoint, unless it is off.
    pub s3_addr: Option<SocketAddr>,
    /// The address of the unauthenticated `/metrics` listener, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin key created at first start, when it was generated (not preset).
    pub generated_admin_key: Option<String>,
    /// The store it uses.
    pub store: Arc<dyn Store>,
    /// Flipped first: the worker stops claiming and ends its runs.
    stopping: watch::Sender<bool>,
    /// Flipped once the worker is done: the listeners and streams close.
    shutdown: watch::Sender<bool>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    worker: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Shuts down gracefully: the worker stops claiming, waits for active runs (up
    /// to `limits.shutdown_grace_s`), then ends the rest; meanwhile the API keeps
    /// answering (reads, aborts, streams, which get their `jobFinished`). Then the
    /// listeners and remaining streams close.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stopping.send(true);
        let worker = self.worker.await.context("worker task");
        let _ = self.shutdown.send(true);
        worker?;
        self.http.await.context("http task")??;
        Ok(())
    }

    /// Base URL of the API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// This installation's id, made at first start (labels its containers).
fn instance_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_string());
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    auth::write_private(&path, &format!("{id}\n"))?;
    Ok(id)
}

/// Makes the data directory its owner's only (0700), and the files at its top (the
/// database, the admin and master keys, ...) 0600, also when an earlier version made
/// them readable by others. Directories below keep their modes: runs must read theirs.
pub fn private_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let private = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("making {} private (mode {mode:o})", path.display()))
    };
    private(dir, 0o700)?;
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        // Not followed: a link is not the data directory's own file.
        let meta = e.metadata()?;
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            private(&e.path(), 0o600)?;
        }
    }
    Ok(())
}

/// Builds the Python runtime from the config, checking the interpreter and sandbox.
fn python_runtime(cfg: &Config) -> anyhow::Result<PythonRuntime> {
    let interpreter = Interpreter::probe(&cfg.python.interpreter)?;
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
    let confinement = confinement(cfg, &interpreter, sandbox)?;
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
    let etc_dir = cfg.data_dir.join("sandbox-etc");
    stoa_runtime::sandbox::write_etc(&etc_dir, uid, uid)
        .context("writing the sandbox's /etc/passwd")?;
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
            if let Err(e) = stoa_runtime::egress::install(&policy) {
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
    let Some(host) = url.and_then(|u| reqwest::Url::parse(u).ok()).and_then(|u| {
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
pub fn worker_runtimes(cfg: &mut Config) -> anyhow::Result<worker::Runtimes> {
    let gpus = Arc::new(stoa_runtime::gpu::Gpus::load());
    let found = gpus.discover();
    for g in &found {
        tracing::info!(index = g.index, model = %g.name, memory_bytes = g.memory_bytes, "found GPU");
    }
    cfg.apply_discovered_gpus(&found);
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
    Ok(worker::Runtimes {
        python: Arc::new(python_runtime(cfg)?),
        docker: Some(Arc::new(docker)),
        gpus,
    })
}

/// Opens the store, bootstraps keys, recovers runs left active, and starts serving.
pub async fn start(mut cfg: Config) -> anyhow::Result<ServerHandle> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    private_data_dir(&cfg.data_dir)?;
    // Run directories are bind-mounted into sandboxes, which need absolute paths.
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)?;
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&cfg.data_dir.join("stoa.db")).context("opening the SQLite store")?,
    );
    let keyring = Arc::new(
        secrets::Keyring::load(
            cfg.secrets.master_key.as_deref(),
            &cfg.data_dir,
            store.as_ref(),
        )
        .await?,
    );
    // A wrong master key is an error now, not garbage in a run's environment later.
    keyring.verify(store.as_ref()).await?;
    let boot = auth::bootstrap(store.as_ref(), cfg.admin_key.as_deref(), &cfg.data_dir).await?;
    let generated_admin_key = boot.and_then(|b| b.generated_key);

    let runtimes = if cfg.worker.enabled {
        Some(worker_runtimes(&mut cfg)?)
    } else {
        None
    };
    // Bound before the config is shared: the default public URL is the bound address.
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    if cfg.settle_public_url(addr) {
        tracing::warn!(
            public_url = cfg.public_url.as_deref().unwrap_or_default(),
            "listening on a wildcard address without public_url: the URLs handed out point at loopback; set public_url (STOA_PUBLIC_URL) to the address clients use"
        );
    }
    let s3_listener = match cfg.s3_listen(addr) {
        Some((a, set)) => {
            let l = match tokio::net::TcpListener::bind(&a).await {
                Ok(l) => l,
                // The next port was only a default: any free one does (credentials
                // name the endpoint).
                Err(e) if !set => {
                    let any = std::net::SocketAddr::new(addr.ip(), 0);
                    tracing::warn!(error = %e, default = %a, "the S3 endpoint's default port is taken; listening on a free port (set storage.s3_listen for a fixed one)");
                    tokio::net::TcpListener::bind(any)
                        .await
                        .with_context(|| format!("listening for S3 on {any} (storage.s3_listen)"))?
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("listening for S3 on {a} (storage.s3_listen)"));
                }
            };
            let bound = l.local_addr()?;
            cfg.settle_s3_endpoint(bound);
            Some((l, bound))
        }
        None => None,
    };
    let s3_key = Arc::new(storage::creds::CredentialKey::load(
        cfg.storage.credentials_key.as_deref(),
        &cfg.data_dir,
    )?);
    let config = Arc::new(cfg);
    let storage = storage::Storage::new(&config.data_dir, config.storage.max_bytes_per_org);
    let hub = Arc::new(Hub::default());
    let deliverer = Arc::new(callbacks::Deliverer::new(
        store.clone(),
        keyring.clone(),
        config.callbacks.clone(),
    ));
    let engine = Arc::new(Engine::new(
        store.clone(),
        hub.clone(),
        config.clone(),
        runtimes.is_some(),
        keyring.clone(),
        deliverer.clone(),
    ));
    // The embedded worker claims from the engine in-process, through the same
    // interface a worker on another machine uses.
    let worker = runtimes.map(|runtimes| {
        Arc::new(worker::Worker::new(
            engine.clone(),
            config.clone(),
            runtimes,
            engine.stats.clone(),
        ))
    });
    if let Some(w) = &worker {
        // What is left of its runs from before a crash goes before they are reaped.
        w.kill_leftovers(&engine.embedded_leftovers().await?)?;
    }
    let recovered = engine.recover().await?;
    if recovered > 0 {
        tracing::warn!(
            runs = recovered,
            "runs active at the last stop were ended as system_failure"
        );
    }
    engine.restore_queue().await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let limits = Limits {
        default_timeout: config.limits.default_timeout_s,
        max_timeout: config.limits.max_timeout_s,
        profiles: config.profiles.iter().map(|p| p.name.clone()).collect(),
        max_import_files: config.limits.max_import_files,
        max_callback_urls: config.callbacks.max_urls,
        profile_gpus: config
            .profiles
            .iter()
            .map(|p| (p.name.clone(), p.gpu_count))
            .collect(),
        allowed_registries: config.docker.allowed_registries.clone(),
    };
    let state = AppState {
        store: store.clone(),
        config: config.clone(),
        hub,
        engine: engine.clone(),
        limits: Arc::new(limits),
        shutdown: shutdown_rx.clone(),
        hostname: hostname().into(),
        keyring,
        deliverer: deliverer.clone(),
        retention: Default::default(),
        storage: storage.clone(),
        s3: s3_listener.as_ref().map(|_| {
            Arc::new(storage::s3::S3Endpoint {
                endpoint: config.storage.public_endpoint.clone().unwrap_or_default(),
                key: s3_key.clone(),
            })
        }),
    };
    let (router, doc) = api::router();
    let doc = Arc::new(doc);
    let app = router
        .route(
            "/api/v2/external/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .route("/metrics", axum::routing::get(prom::admin_metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"detail": "Not Found"})),
            )
        })
        .layer(DefaultBodyLimit::max(config.limits.max_body_bytes))
        .with_state(state.clone());

    let mut http_shutdown = shutdown_rx.clone();
    let http = tokio::spawn(async move {
        // Small SSE writes must not wait for Nagle's algorithm.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|v| *v).await;
            })
            .await
    });
    // Containers of runs that ended while the server was away go at once (in the
    // background: the API answers meanwhile), then at every interval.
    if let Some(w) = &worker {
        tokio::spawn(w.clone().run_reconciler(
            std::time::Duration::from_secs(config.docker.reconcile_interval_s.max(1)),
            shutdown_rx.clone(),
        ));
        tokio::spawn(w.clone().run_sampler(shutdown_rx.clone()));
    }
    tokio::spawn(deliverer.run(shutdown_rx.clone()));
    tokio::spawn(engine.clone().run_upkeep(shutdown_rx.clone()));
    tokio::spawn(retention::run(
        store.clone(),
        config.clone(),
        state.retention.clone(),
        shutdown_rx.clone(),
    ));
    tokio::spawn(engine.disk().clone().run(shutdown_rx.clone()));
    let s3_addr = match s3_listener {
        Some((l, bound)) => {
            let s3 = storage::s3::StoaS3 {
                storage: storage.clone(),
                key: s3_key.clone(),
                multipart_expiry_days: config.storage.multipart_expiry_days,
            };
            tokio::spawn(storage::s3::serve(l, s3, shutdown_rx.clone()));
            tracing::info!(addr = %bound, endpoint = config.storage.public_endpoint.as_deref().unwrap_or_default(), "S3 endpoint listening");
            Some(bound)
        }
        None => None,
    };
    let metrics_addr = match &config.metrics.listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for /metrics on {addr}"))?;
            let a = l.local_addr()?;
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(prom::open_metrics))
                .with_state(state.clone());
            let mut sd = shutdown_rx.clone();
            tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = sd.wait_for(|v| *v).await;
                    })
                    .await;
            });
            Some(a)
        }
        None => None,
    };
    let worker = tokio::spawn(async move {
        let mut stopping = stopping_rx.clone();
        let refuse = async move {
            let _ = stopping.wait_for(|v| *v).await;
            // New runs are refused from now on: they would wait until the next start.
            engine.set_stopping();
        };
        match worker {
            Some(w) => {
                let warm = w.clone();
                tokio::spawn(async move { warm.warm_up().await });
                tokio::join!(refuse, w.run(stopping_rx));
            }
            None => refuse.await,
        }
    });
    tracing::info!(%addr, "Stoa server listening");
    Ok(ServerHandle {
        addr,
        s3_addr,
        metrics_addr,
        generated_admin_key,
        store,
        stopping: stopping_tx,
        shutdown: shutdown_tx,
        http,
        worker,
    })
}
