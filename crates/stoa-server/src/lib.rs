//! The Stoa server: the control plane (the HTTP API, the output streams, the queue and
//! its leases) over a [`stoa_store::Store`]. It never links the runtimes: the embedded
//! worker is handed in as an [`EmbeddedWorker`] by the binary that composes them.

pub mod api;
pub mod app;
pub mod auth;
pub mod callbacks;
pub mod disk;
pub mod engine;
pub mod env_vars;
pub mod error;
pub mod hub;
pub mod ports;
pub mod prom;
pub mod retention;
pub mod run_metrics;
pub mod secrets;
pub mod selection;
pub mod sse;
pub mod state;
pub mod storage;
pub mod ui;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::serve::ListenerExt;
use stoa_core::Limits;
use stoa_core::loops::WorkerStats;
use stoa_core::plane::ControlPlane;
use stoa_store::Store;
use stoa_types::RunId;
use tokio::sync::watch;

pub use stoa_config as config;
pub use stoa_config::Config;

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

/// The worker inside the server process, provided by the binary that composes the
/// server with the runtimes (stoa-server never links them). The server calls its
/// methods in this order: `prepare`, `attach`, `kill_leftovers`, `run`.
#[async_trait::async_trait]
pub trait EmbeddedWorker: Send + Sync {
    /// Readies its runtimes once the data directory exists; what it discovers (GPUs
    /// and their profiles) goes into the config the server then serves with.
    fn prepare(&mut self, cfg: &mut Config) -> anyhow::Result<()>;
    /// Connects it to the in-process control plane, with the counters `/metrics` shows.
    fn attach(
        &mut self,
        plane: Arc<dyn ControlPlane>,
        config: Arc<Config>,
        stats: Arc<WorkerStats>,
    );
    /// Before its first claim: kills what is left of the runs it held before a crash
    /// (each by its recorded process group) and clears their working directories.
    fn kill_leftovers(&self, runs: &[(RunId, i64)]) -> std::io::Result<()>;
    /// Claims and executes runs until `stopping` flips, then ends its runs; its
    /// background loops (sampler, Docker reconciler) go on until `shutdown` flips.
    async fn run(&self, stopping: watch::Receiver<bool>, shutdown: watch::Receiver<bool>);
}

/// Where the store is: PostgreSQL at `url` (`store.url`) when given, else
/// `DATA_DIR/stoa.db`.
pub fn store_location(url: Option<&str>, data_dir: &std::path::Path) -> stoa_store::Location {
    match url {
        Some(u) => stoa_store::Location::Postgres(u.to_string()),
        None => stoa_store::Location::Sqlite(data_dir.join("stoa.db")),
    }
}

/// Opens the store, bootstraps keys, recovers runs left active, and starts serving;
/// with `embedded` (and `worker.enabled`), also its worker.
pub async fn start(
    mut cfg: Config,
    embedded: Option<Box<dyn EmbeddedWorker>>,
) -> anyhow::Result<ServerHandle> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    private_data_dir(&cfg.data_dir)?;
    // Run directories are bind-mounted into sandboxes, which need absolute paths.
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)?;
    let location = store_location(cfg.store.url.as_deref(), &cfg.data_dir);
    let opened = stoa_store::open(&location)
        .await
        .with_context(|| format!("opening the store at {}", location.display()))?;
    let (store, feed) = (opened.store, opened.feed);
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

    let mut worker = embedded.filter(|_| cfg.worker.enabled);
    if let Some(w) = &mut worker {
        w.prepare(&mut cfg)?;
    }
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
    let shared = matches!(location, stoa_store::Location::Postgres(_));
    let embedded = match &worker {
        Some(_) => Some(engine::embedded_name(shared, &config.data_dir)?),
        None => None,
    };
    let engine = Arc::new(Engine::new(
        store.clone(),
        hub.clone(),
        config.clone(),
        embedded,
        keyring.clone(),
        deliverer.clone(),
    ));
    // The embedded worker claims from the engine in-process, through the same
    // interface a worker on another machine uses.
    if let Some(w) = &mut worker {
        w.attach(engine.clone(), config.clone(), engine.stats.worker.clone());
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
    // Output and state changes other servers store reach this one's live readers.
    {
        let (hub, engine, shutdown) = (hub.clone(), engine.clone(), shutdown_rx.clone());
        let deliverer = deliverer.clone();
        tokio::spawn(async move {
            let changed = move |change: stoa_store::Change| {
                use stoa_store::Change;
                match change {
                    // Readers read on; nothing else moved.
                    Change::Output(id) => return hub.notify(id),
                    Change::State(id) => hub.notify(id),
                    Change::Unknown => hub.notify_all(),
                    Change::Queued => {}
                }
                engine.store_changed();
                // A run another server ended may have callbacks due: every server
                // tries (each delivery is claimed by one).
                deliverer.wake();
            };
            feed.follow(&changed, shutdown).await;
        });
    }
    if shared {
        tokio::spawn(engine.clone().run_follow(shutdown_rx.clone()));
    }
    let limits = Limits {
        default_timeout: config.limits.default_timeout_s,
        max_timeout: config.limits.max_timeout_s,
        notebook_max_timeout: config.limits.notebook_max_timeout_s,
        max_ports: config.limits.max_ports_per_run,
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
        retention: Arc::new(retention::new_loop()),
        storage: storage.clone(),
        s3: s3_listener.as_ref().map(|_| {
            Arc::new(storage::s3::S3Endpoint {
                endpoint: config.storage.public_endpoint.clone().unwrap_or_default(),
                key: s3_key.clone(),
            })
        }),
    };
    let (router, doc) = api::router_and_document();
    let doc = Arc::new(doc);
    let router = if config.ui.enabled {
        router.merge(ui::router(state.clone()))
    } else {
        router
    };
    let app = router
        .route(
            "/api/v2/external/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .route("/metrics", axum::routing::get(prom::admin_metrics))
        .route("/ports/{id}/{port}", axum::routing::any(ports::with_slash))
        .route("/ports/{id}/{port}/", axum::routing::any(ports::by_path))
        .route(
            "/ports/{id}/{port}/{*rest}",
            axum::routing::any(ports::by_path),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"detail": "Not Found"})),
            )
        })
        .layer(DefaultBodyLimit::max(config.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ports::by_host,
        ))
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
    let shutdown_worker = shutdown_rx.clone();
    let worker = tokio::spawn(async move {
        let mut stopping = stopping_rx.clone();
        let refuse = async move {
            let _ = stopping.wait_for(|v| *v).await;
            // New runs are refused from now on: they would wait until the next start.
            engine.set_stopping();
        };
        match worker {
            Some(w) => {
                tokio::join!(refuse, w.run(stopping_rx, shutdown_worker));
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
