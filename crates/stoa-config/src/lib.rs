//! The one typed config tree: defaults, then `stoa.toml`, then `STOA_*` environment
//! variables, then command-line flags. Validated at start-up; errors name the source of
//! the bad value. Every limit is here with its default, and documented in the README.
//! Shared by the control plane (`stoa server`) and the workers (`stoa worker`), which
//! read the same file.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The server's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// Where the database, environments and run directories live.
    pub data_dir: PathBuf,
    /// Base URL clients reach the server at, used in `streaming_url` and every other
    /// URL the server hands out; when unset, `http://` and the address the server is
    /// bound to (never the request's `Host` header, which the caller controls).
    pub public_url: Option<String>,
    /// The first admin key, used only when the store has no key yet (`lk_…`).
    pub admin_key: Option<String>,
    /// Log filter (`tracing` syntax).
    pub log: String,
    pub limits: LimitsConfig,
    pub worker: WorkerConfig,
    pub python: PythonConfig,
    pub docker: DockerSection,
    pub secrets: SecretsConfig,
    pub callbacks: CallbacksConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub storage: StorageConfig,
    pub store: StoreConfig,
    /// The web dashboard at `/ui/`.
    pub ui: UiConfig,
    /// The proxy to the ports of runs.
    pub ports: PortsConfig,
    /// The Slurm bridge (`stoa worker --slurm`).
    pub slurm: SlurmConfig,
    /// Hardware profiles runs may ask for.
    pub profiles: Vec<ProfileConfig>,
}

/// The proxy to the ports runs expose: `/ports/{run id}/{port}/` on the API address,
/// and `{run id}-{port}.{base_domain}` when a base domain is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PortsConfig {
    /// A domain whose subdomains `{run id}-{port}` reach runs' ports (a wildcard DNS
    /// name pointing at this server), so that an application is served from the root
    /// of an origin of its own [default: unset, only the path form].
    pub base_domain: Option<String>,
}

/// The Slurm bridge: `stoa worker --slurm` claims runs of the profiles below and
/// submits each as a Slurm job that runs `stoa exec` on a compute node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SlurmConfig {
    /// The `stoa` binary on the compute nodes [default: the bridge's own path].
    pub exec: Option<PathBuf>,
    /// The config file `stoa exec` reads on the nodes (`[python]`, `[docker]`,
    /// `[[profiles]]`) [default: the bridge's own `--config`].
    pub node_config: Option<PathBuf>,
    /// The data directory of `stoa exec` on the nodes (environment cache, run
    /// directories); node-local (the jobs of one node share it, nodes must not).
    pub node_data_dir: PathBuf,
    /// Where Slurm writes the log of each job's `stoa exec` on its node (`%j` is the
    /// job id).
    pub job_log: String,
    /// How often the bridge reads the state of its jobs (one `squeue` for all) and
    /// renews their leases, in milliseconds.
    pub poll_interval_ms: u64,
    /// Jobs the bridge keeps in Slurm at once (pending or running).
    pub max_jobs: usize,
    /// Added to a run's timeout for the job's `--time`: the run's timeout counts from
    /// its start, after its environment build or image pull.
    pub time_margin_s: u64,
    /// Seconds the bridge waits, after Slurm ended a job, for `stoa exec`'s own
    /// report of the run's end before it writes the end from Slurm's state.
    pub end_grace_s: u64,
    /// Seconds after a stop's grace period before the bridge cancels a job that is
    /// still in Slurm.
    pub stop_margin_s: u64,
    /// Variables of the bridge's environment that its jobs get (those set), besides
    /// `python.pass_env` and what `stoa exec` needs to reach the server: paths, CA
    /// bundles, package indexes and proxies, never the whole environment.
    pub export_env: Vec<String>,
    /// The profiles the bridge serves and their Slurm options.
    pub profiles: Vec<SlurmProfile>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            exec: None,
            node_config: None,
            node_data_dir: PathBuf::from("/var/tmp/stoa-exec"),
            job_log: "/tmp/stoa-slurm-%j.log".into(),
            poll_interval_ms: 1000,
            max_jobs: 64,
            time_margin_s: 600,
            end_grace_s: 3,
            stop_margin_s: 10,
            export_env: [
                "PATH",
                "HOME",
                "LANG",
                "LC_ALL",
                "TMPDIR",
                "SSL_CERT_FILE",
                "SSL_CERT_DIR",
                "REQUESTS_CA_BUNDLE",
                "CURL_CA_BUNDLE",
                "PIP_CERT",
                "PIP_INDEX_URL",
                "PIP_EXTRA_INDEX_URL",
                "PIP_FIND_LINKS",
                "UV_INDEX_URL",
                "UV_EXTRA_INDEX_URL",
                "HTTP_PROXY",
                "HTTPS_PROXY",
                "NO_PROXY",
                "http_proxy",
                "https_proxy",
                "no_proxy",
            ]
            .map(String::from)
            .to_vec(),
            profiles: vec![],
        }
    }
}

/// A profile the Slurm bridge serves, and the `sbatch` options of its jobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SlurmProfile {
    /// A hardware profile the server knows.
    pub name: String,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--gres` (`gpu:h200:1`).
    pub gres: Option<String>,
    /// `--gpus`.
    pub gpus: Option<String>,
    /// `--cpus-per-task`.
    pub cpus_per_task: Option<u32>,
    /// `--mem` (`8G`).
    pub mem: Option<String>,
    /// `--constraint`.
    pub constraint: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// More `sbatch` options, as given.
    pub extra_args: Vec<String>,
}

/// Where the server keeps its state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    /// `postgres://user:password@host:port/database` to keep the state in PostgreSQL
    /// (13 or newer), which several servers may share; also `STOA_DATABASE_URL` and
    /// `--database-url`. When unset: SQLite, `DATA_DIR/stoa.db`. A URL may end in
    /// `?max_connections=N` (connections of this server's pool, default 16).
    pub url: Option<String>,
}

/// Named limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Timeout of a run that names none, in seconds.
    pub default_timeout_s: i64,
    /// Largest timeout a run may ask for, in seconds.
    pub max_timeout_s: i64,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Output kept per run, in bytes; beyond it output is dropped and the run marked truncated.
    pub max_output_bytes: u64,
    /// Most files a Python run may bundle in `import_files`.
    pub max_import_files: usize,
    /// Seconds the server waits for active runs at shutdown before killing them.
    pub shutdown_grace_s: u64,
    /// Free bytes under the data directory below which the server warns and refuses
    /// new runs (503).
    pub min_free_bytes: u64,
    /// Bytes of a reserve file in the data directory, given up when the disk fills so
    /// that the ends of runs can still be stored (0: none). It must exceed what the
    /// store may grow by at its next checkpoint (its write-ahead log, up to about 4 MiB)
    /// plus the output runs hold back.
    pub disk_reserve_bytes: u64,
    /// Output bytes a run holds in memory while the disk is full; more is counted as
    /// lost (and told in its output).
    pub max_held_output_bytes: u64,
    /// Seconds between keep-alive comments on output streams.
    pub sse_keepalive_s: u64,
    /// Runs an org may have running at once (0: no limit); more wait.
    pub org_max_running: usize,
    /// Runs an org may have queued; more are refused with 429.
    pub org_max_queued: usize,
    /// Share of a profile's slots (0.0..=1.0) an org may take by priority ahead of
    /// other orgs' waiting runs; beyond it the orgs take turns (0: always turns, 1:
    /// priority across orgs). Priority always orders runs within an org.
    pub priority_share: f64,
    /// Output streams open at once per run; more are refused with 429.
    pub max_streams_per_run: usize,
    /// Output streams open at once per API key; a stream opened without a key (the
    /// official client sends none) counts against the org that owns the run.
    pub max_streams_per_key: usize,
    /// Output bytes one API reply carries (the execution record's `stdout` plus
    /// `stderr`, a stored-logs reply); the whole output is read from the stream.
    pub max_output_per_reply_bytes: usize,
    /// Output bytes an org's runs may hold in the store, all together (0: no limit).
    /// Off by default: a limit would cut the output of existing installations at
    /// upgrade; retention bounds the store by age instead.
    pub output_bytes_per_org: u64,
    /// Largest timeout a notebook run (`job_type` `customer_notebook`) may ask for, in
    /// seconds; it may exceed `max_timeout_s`.
    pub notebook_max_timeout_s: i64,
    /// Ports one image run may expose through the proxy (`ports` in its request).
    pub max_ports_per_run: usize,
}

/// The embedded worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerConfig {
    /// Run the embedded worker (`--no-worker` turns it off: runs stay pending).
    pub enabled: bool,
    /// Runs executed at once; 0 means twice the CPU cores (at least 4).
    pub max_concurrent_runs: usize,
    /// Grace period of a stop (SIGTERM, then kill), in seconds.
    pub stop_grace_s: u64,
    /// GPU ids of this worker that runs may be given (`CUDA_VISIBLE_DEVICES`, device
    /// requests); the GPUs NVML finds when unset.
    pub gpu_ids: Vec<String>,
    /// Price per hour of the profiles made from discovered GPUs (`gpu.h200 = 3.5`).
    pub gpu_prices: std::collections::BTreeMap<String, f64>,
    /// Seconds a worker's hold on a run (its lease) lasts without a heartbeat; workers
    /// renew every third of it. A run whose lease expired ends `system_failure`
    /// (`worker lost`).
    pub lease_s: u64,
    /// Seconds a worker's claim waits for a run before it is answered "none" (204).
    pub claim_wait_s: u64,
    /// Bytes of a run's output a worker on another machine keeps on its disk while the
    /// server cannot be reached (beyond `limits.max_held_output_bytes` in memory).
    pub spool_max_bytes: u64,
}

/// Python runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PythonConfig {
    /// Interpreter used for run environments.
    pub interpreter: String,
    /// `auto` (uv when found, else venv + pip), `uv` or `pip`.
    pub installer: String,
    /// Package index URL for requirement installs (installer default when unset).
    pub index_url: Option<String>,
    /// `auto` (bubblewrap when it works here), `bubblewrap` (required) or `none`.
    pub sandbox: String,
    /// Whether runs may use the network (a profile's `network` decides for its runs).
    /// Off by default; when on, internal destinations stay unreachable.
    pub network: bool,
    /// Server environment variables copied into runs (CA bundles for pip inside runs).
    pub pass_env: Vec<String>,
    /// The unprivileged uid (and gid) runs and environment builds execute as when the
    /// server runs as root. Give it no other use on the machine.
    pub sandbox_uid: u32,
    /// Install wheels only (`--only-binary :all:`): no package's build code runs, and
    /// builds share one download cache.
    pub only_binary: bool,
    /// Memory limit of an environment build, in MiB.
    pub build_memory_mb: u64,
    /// Pids limit of an environment build.
    pub build_pids_limit: u64,
    /// Longest an environment build may take, in seconds (all its steps together);
    /// the run fails when it does not finish in time.
    pub build_timeout_s: u64,
    /// Internal destinations (IPs or CIDRs) that runs with network and builds may
    /// reach although they are loopback, private or link-local.
    pub allowed_destinations: Vec<String>,
    /// Warm sandboxes: Python processes started ahead of the runs that use them.
    pub warm: WarmSection,
}

/// Warm sandboxes of Python runs (`python.warm`): per pool key (environment,
/// interpreter, profile, prior imports, the org's variables) a few sandboxes whose
/// Python finished its start-up wait for one run each; runs that find none start cold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WarmSection {
    /// Keep warm sandboxes (only where bubblewrap sandboxes runs).
    pub enabled: bool,
    /// Warm sandboxes kept per pool.
    pub per_env: usize,
    /// Warm sandboxes kept in all; never more than the worker's free run slots.
    pub max_total: usize,
    /// Seconds a pool is kept without being used.
    pub idle_s: u64,
    /// A pool is made once its key was used this many times within `learn_window_s`.
    pub learn_uses: usize,
    pub learn_window_s: u64,
    /// After a run starts, its pool is refilled once the run has run this many
    /// milliseconds (or ended), so that a refill never competes with a short run's
    /// start and end.
    pub refill_after_ms: u64,
}

impl Default for WarmSection {
    fn default() -> Self {
        WarmSection {
            enabled: true,
            per_env: 2,
            max_total: 16,
            idle_s: 300,
            learn_uses: 2,
            learn_window_s: 600,
            refill_after_ms: 50,
        }
    }
}

/// Image runs on the Docker engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DockerSection {
    /// Engine address; `DOCKER_HOST`, else the local socket, when unset.
    pub host: Option<String>,
    /// Give each run its own network; `false` runs containers without any network.
    pub network: bool,
    /// Pids limit of containers whose profile sets none.
    pub default_pids_limit: i64,
    /// Seconds between reconciler passes (orphaned containers and networks).
    pub reconcile_interval_s: u64,
    /// Networks made ahead of time so a run does not wait for one (each run still
    /// gets its own; 0 makes them on demand). A run's network is recycled for the next
    /// run once its containers are gone.
    pub network_pool: usize,
    /// Seconds a recycled network beyond `network_pool` is kept without use before it
    /// is removed (so a burst does not pay for a new network per run).
    pub network_idle_s: u64,
    /// Registries (`host:port` as written in image references) that images may come
    /// from although they are loopback, private, link-local or metadata addresses.
    pub allowed_registries: Vec<String>,
    /// Internal destinations (IPs or CIDRs) that containers may reach; every other
    /// loopback, private, link-local or metadata address, and the host itself, is
    /// refused by the firewall rules installed at start.
    pub allowed_destinations: Vec<String>,
}

impl Default for DockerSection {
    fn default() -> Self {
        DockerSection {
            host: None,
            network: true,
            default_pids_limit: 4096,
            reconcile_interval_s: 60,
            network_pool: 2,
            network_idle_s: 10,
            allowed_registries: vec![],
            allowed_destinations: vec![],
        }
    }
}

/// Secrets (encrypted environment variables of an org's runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SecretsConfig {
    /// Master key, 64 hex characters; `DATA_DIR/master.key` (generated) when unset.
    pub master_key: Option<String>,
    /// Secret values shorter than this are not masked in output (they would mask
    /// ordinary text).
    pub min_mask_len: usize,
    /// Most secrets per org.
    pub max_per_org: usize,
    /// Largest secret value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            master_key: None,
            min_mask_len: 3,
            max_per_org: 500,
            max_value_bytes: 64 * 1024,
        }
    }
}

/// Run metrics and the platform's Prometheus metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// Milliseconds between samples of each running run.
    pub interval_ms: u64,
    /// Days samples are kept.
    pub retention_days: u64,
    /// Address of an unauthenticated `/metrics` listener (Prometheus); when unset,
    /// `/metrics` is served on the API address behind an admin key.
    pub listen: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            interval_ms: 1000,
            retention_days: 30,
            listen: None,
        }
    }
}

/// How long ended runs and their output are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RetentionConfig {
    /// Days the output of a run is kept after it ended (0: forever); then it is
    /// removed and the run's record says `output_expired`.
    pub output_days: u64,
    /// Days a run is kept after it ended, with its output, samples and callback
    /// deliveries (0: forever).
    pub runs_days: u64,
    /// Seconds between retention passes (the first runs shortly after start).
    pub interval_s: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            output_days: 30,
            runs_days: 90,
            interval_s: 3600,
        }
    }
}

/// The web dashboard, served by the server at `/ui/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct UiConfig {
    /// Serve the dashboard (`/ui/`, and `/` redirecting there).
    pub enabled: bool,
    /// Seconds a sign-in lasts; then the browser asks for the API key again.
    pub session_ttl_s: u64,
    /// Runs per page of the runs list.
    pub page_size: u32,
    /// Output kept on the run page without JavaScript, and replayed before following
    /// live (bytes; the full log is a download).
    pub page_output_bytes: usize,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            enabled: true,
            session_ttl_s: 12 * 3600,
            page_size: 50,
            page_output_bytes: 256 * 1024,
        }
    }
}

/// Org storage: a directory per org under `DATA_DIR/storage`, mounted into runs and
/// served over the S3 protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// Address of the S3 endpoint (path-style, SigV4). When unset: the API's address
    /// with the next port (the API on port 0 gives port 0). `off` serves none.
    pub s3_listen: Option<String>,
    /// The S3 endpoint as clients reach it, handed out by `storage/credentials`; when
    /// unset, `public_url`'s scheme and host with the S3 listener's port, else the
    /// bound address.
    pub public_endpoint: Option<String>,
    /// Bytes an org may keep in its storage, files and unfinished multipart uploads
    /// together (0: no limit). A write over it is refused and leaves nothing.
    pub max_bytes_per_org: u64,
    /// Seconds the S3 credentials from `storage/credentials` are valid.
    pub credentials_ttl_s: u64,
    /// Region handed out with the credentials (clients sign with it).
    pub region: String,
    /// Key the S3 credentials are derived from, 64 hex characters; servers sharing a
    /// store must share it. `DATA_DIR/storage.key` (generated) when unset.
    pub credentials_key: Option<String>,
    /// Days an unfinished multipart upload is kept before its parts are removed.
    pub multipart_expiry_days: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            s3_listen: None,
            public_endpoint: None,
            max_bytes_per_org: 0,
            credentials_ttl_s: 12 * 3600,
            region: "us-east-1".into(),
            credentials_key: None,
            multipart_expiry_days: 7,
        }
    }
}

/// Completion callbacks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CallbacksConfig {
    /// Most callback URLs per run.
    pub max_urls: usize,
    /// Attempts per delivery before it is given up.
    pub max_attempts: i64,
    /// First retry delay in milliseconds; doubled after each failed attempt.
    pub backoff_base_ms: u64,
    /// Longest retry delay in seconds.
    pub backoff_max_s: u64,
    /// Seconds a receiver has to answer.
    pub timeout_s: u64,
    /// Hosts, IPs or CIDRs that may be called although they are loopback, private,
    /// link-local or metadata addresses (refused otherwise).
    pub allow_hosts: Vec<String>,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        CallbacksConfig {
            max_urls: 5,
            max_attempts: 5,
            backoff_base_ms: 1000,
            backoff_max_s: 300,
            timeout_s: 10,
            allow_hosts: vec![],
        }
    }
}

/// A hardware profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfileConfig {
    pub name: String,
    pub price_per_hour: f64,
    /// CPU limit of each run, in cores.
    pub cpus: Option<f64>,
    /// Memory limit of each run in MiB (exceeding it ends the run `out of memory`).
    pub memory_mb: Option<u64>,
    /// Pids limit of each run.
    pub pids_limit: Option<i64>,
    /// Disk a Python run may fill (its working directory; its `/tmp` too), in MiB.
    pub disk_mb: Option<u64>,
    /// Whether runs of this profile have network; `python.network` (Python runs) and
    /// `docker.network` (image runs and containerised Python runs; compose stacks
    /// always follow `docker.network`) when unset.
    pub network: Option<bool>,
    /// Runs of this profile this worker holds at once; derived when unset: the CPU
    /// cores divided by `cpus` (or `worker.max_concurrent_runs` when the profile
    /// reserves no CPUs), or for GPU profiles the worker's GPUs divided by `gpu_count`.
    pub slots: Option<usize>,
    /// Runs may share GPUs (otherwise each GPU is given to one run at a time).
    pub gpu_shared: bool,
    pub gpu_count: u32,
    pub gpu_model: Option<String>,
    /// Run Python runs of this profile inside this image (e.g. a CUDA image) instead of
    /// the bubblewrap sandbox; environments are built in the image and cached.
    pub python_image: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./stoa-data"),
            public_url: None,
            admin_key: None,
            log: "info".into(),
            limits: LimitsConfig::default(),
            worker: WorkerConfig::default(),
            python: PythonConfig::default(),
            docker: DockerSection::default(),
            secrets: SecretsConfig::default(),
            callbacks: CallbacksConfig::default(),
            metrics: MetricsConfig::default(),
            retention: RetentionConfig::default(),
            ui: UiConfig::default(),
            ports: PortsConfig::default(),
            storage: StorageConfig::default(),
            store: StoreConfig::default(),
            slurm: SlurmConfig::default(),
            profiles: vec![ProfileConfig::builtin_cpu()],
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_timeout_s: 60,
            max_timeout_s: 600,
            max_body_bytes: 10 * 1024 * 1024,
            max_output_bytes: 16 * 1024 * 1024,
            max_import_files: 1000,
            shutdown_grace_s: 10,
            min_free_bytes: 256 * 1024 * 1024,
            disk_reserve_bytes: 32 * 1024 * 1024,
            max_held_output_bytes: 1024 * 1024,
            sse_keepalive_s: 15,
            org_max_running: 0,
            org_max_queued: 10_000,
            priority_share: 0.5,
            max_streams_per_run: 32,
            max_streams_per_key: 64,
            max_output_per_reply_bytes: 1024 * 1024,
            output_bytes_per_org: 0,
            notebook_max_timeout_s: 12 * 3600,
            max_ports_per_run: 8,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            enabled: true,
            max_concurrent_runs: 0,
            stop_grace_s: 10,
            gpu_ids: vec![],
            gpu_prices: Default::default(),
            lease_s: 30,
            claim_wait_s: 25,
            spool_max_bytes: 1 << 30,
        }
    }
}

impl Default for PythonConfig {
    fn default() -> Self {
        PythonConfig {
            interpreter: "python3".into(),
            installer: "auto".into(),
            index_url: None,
            sandbox: "auto".into(),
            network: false,
            sandbox_uid: 64_500,
            only_binary: false,
            build_memory_mb: 4096,
            build_pids_limit: 1024,
            build_timeout_s: 900,
            allowed_destinations: vec![],
            warm: WarmSection::default(),
            pass_env: [
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "PIP_CERT",
                "CURL_CA_BUNDLE",
                "PIP_INDEX_URL",
                "UV_INDEX_URL",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            name: "cpu".into(),
            price_per_hour: 0.0,
            cpus: None,
            memory_mb: None,
            pids_limit: None,
            disk_mb: None,
            network: None,
            slots: None,
            gpu_shared: false,
            gpu_count: 0,
            gpu_model: None,
            python_image: None,
        }
    }
}

impl ProfileConfig {
    /// The built-in `cpu` profile: limits that keep one run from taking the machine down.
    pub fn builtin_cpu() -> Self {
        ProfileConfig {
            memory_mb: Some(4096),
            pids_limit: Some(1024),
            disk_mb: Some(10 * 1024),
            ..Default::default()
        }
    }
}

/// Longest retention, in days (100 years; 0 keeps forever).
const MAX_RETENTION_DAYS: u64 = 36_500;

/// A config error, naming where the bad value came from.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads defaults, then `file` (or `./stoa.toml` when it exists), then `STOA_*`
    /// variables (`STOA_DATA_DIR`, `STOA_PYTHON__INDEX_URL`: `__` separates sections).
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(f) => {
                if !f.exists() {
                    return Err(ConfigError(format!(
                        "config file {} does not exist",
                        f.display()
                    )));
                }
                fig = fig.merge(Toml::file(f));
            }
            None if Path::new("stoa.toml").exists() => fig = fig.merge(Toml::file("stoa.toml")),
            None => {}
        }
        fig = fig.merge(Env::prefixed("STOA_").split("__"));
        if let Ok(url) = std::env::var("STOA_DATABASE_URL") {
            fig = fig.merge(Serialized::default("store.url", url));
        }
        let cfg: Config = fig.extract().map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.store.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError(
                "store.url (STOA_DATABASE_URL, --database-url) must be a postgres:// URL".into(),
            ));
        }
        if self.worker.lease_s < 3 {
            // Renewed every third of it: a second between heartbeats at least.
            return Err(ConfigError("worker.lease_s must be at least 3".into()));
        }
        if self.storage.credentials_ttl_s < 60 {
            return Err(ConfigError(
                "storage.credentials_ttl_s must be at least 60".into(),
            ));
        }
        if let Some(k) = &self.storage.credentials_key
            && hex::decode(k.trim()).map(|b| b.len()) != Ok(32)
        {
            return Err(ConfigError(
                "storage.credentials_key must be 64 hex characters".into(),
            ));
        }
        let l = &self.limits;
        if l.disk_reserve_bytes > 0 && l.disk_reserve_bytes >= l.min_free_bytes {
            // Else giving the reserve up would lift the refusal of new runs at once.
            return Err(ConfigError(format!(
                "limits.disk_reserve_bytes ({}) must be smaller than limits.min_free_bytes ({})",
                l.disk_reserve_bytes, l.min_free_bytes
            )));
        }
        if l.max_timeout_s < 1 {
            return Err(ConfigError(
                "limits.max_timeout_s must be at least 1".into(),
            ));
        }
        if l.notebook_max_timeout_s < 1 {
            return Err(ConfigError(
                "limits.notebook_max_timeout_s must be at least 1".into(),
            ));
        }
        if !(1..=l.max_timeout_s).contains(&l.default_timeout_s) {
            return Err(ConfigError(format!(
                "limits.default_timeout_s must be between 1 and limits.max_timeout_s ({})",
                l.max_timeout_s
            )));
        }
        if !(0.0..=1.0).contains(&l.priority_share) {
            return Err(ConfigError(
                "limits.priority_share must be between 0.0 and 1.0".into(),
            ));
        }
        if l.max_streams_per_run < 1 || l.max_streams_per_key < 1 {
            return Err(ConfigError(
                "limits.max_streams_per_run and limits.max_streams_per_key must be at least 1"
                    .into(),
            ));
        }
        if l.max_output_per_reply_bytes < 1024 {
            return Err(ConfigError(
                "limits.max_output_per_reply_bytes must be at least 1024".into(),
            ));
        }
        if self.profiles.is_empty() {
            return Err(ConfigError(
                "at least one hardware profile must be configured".into(),
            ));
        }
        for p in &self.profiles {
            let ok = !p.name.is_empty()
                && p.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !ok {
                return Err(ConfigError(format!(
                    "profile name {:?} must match ^[a-zA-Z0-9_.]+$",
                    p.name
                )));
            }
            if p.price_per_hour < 0.0 {
                return Err(ConfigError(format!(
                    "profile {}: price_per_hour must not be negative",
                    p.name
                )));
            }
        }
        if !["auto", "uv", "pip"].contains(&self.python.installer.as_str()) {
            return Err(ConfigError(format!(
                "python.installer must be auto, uv or pip, not {:?}",
                self.python.installer
            )));
        }
        if !["auto", "bubblewrap", "none"].contains(&self.python.sandbox.as_str()) {
            return Err(ConfigError(format!(
                "python.sandbox must be auto, bubblewrap or none, not {:?}",
                self.python.sandbox
            )));
        }
        if let Some(k) = &self.secrets.master_key
            && hex::decode(k.trim()).map(|b| b.len() != 32).unwrap_or(true)
        {
            return Err(ConfigError("secrets.master_key (STOA_SECRETS__MASTER_KEY) must be 64 hex characters (32 bytes)".into()));
        }
        if let Some(bad) = self
            .docker
            .allowed_destinations
            .iter()
            .find(|d| stoa_core::netguard::Cidr::parse(d).is_none())
        {
            return Err(ConfigError(format!(
                "docker.allowed_destinations: {bad:?} is not an IP address or a CIDR"
            )));
        }
        let ui = &self.ui;
        if ui.session_ttl_s < 60 || ui.session_ttl_s > 30 * 86400 {
            return Err(ConfigError(
                "ui.session_ttl_s must be between 60 and 2592000 (30 days)".into(),
            ));
        }
        if !(1..=1000).contains(&ui.page_size) {
            return Err(ConfigError(
                "ui.page_size must be between 1 and 1000".into(),
            ));
        }
        let r = &self.retention;
        if r.interval_s < 1 {
            return Err(ConfigError(
                "retention.interval_s must be at least 1".into(),
            ));
        }
        if r.output_days > MAX_RETENTION_DAYS || r.runs_days > MAX_RETENTION_DAYS {
            return Err(ConfigError(format!(
                "retention.output_days and retention.runs_days must be at most {MAX_RETENTION_DAYS} (0 keeps forever)"
            )));
        }
        if self.callbacks.max_attempts < 1 {
            return Err(ConfigError(
                "callbacks.max_attempts must be at least 1".into(),
            ));
        }
        if let Some(k) = &self.admin_key
            && (!k.starts_with("lk_") || k.len() < 20)
        {
            return Err(ConfigError(
                "admin_key (STOA_ADMIN_KEY) must start with lk_ and be at least 20 characters"
                    .into(),
            ));
        }
        if let Some(u) = &self.public_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(ConfigError("public_url must be an http(s) URL".into()));
        }
        Ok(())
    }

    /// Fills `public_url` when unset: `http://` and the address the server is bound to
    /// (`bound`, the real port when `listen` asks for port 0). A wildcard address
    /// (`0.0.0.0`, `[::]`) is not one clients can reach, so loopback stands in for it;
    /// true when that happened (the operator should set `public_url`).
    pub fn settle_public_url(&mut self, bound: std::net::SocketAddr) -> bool {
        if self.public_url.is_some() {
            return false;
        }
        let mut addr = bound;
        let wildcard = addr.ip().is_unspecified();
        if wildcard {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        self.public_url = Some(format!("http://{addr}"));
        wildcard
    }

    /// Where the S3 endpoint listens, given the API's bound address: `storage.s3_listen`
    /// (`true`: set), else the API's address with the next port (port 0 stays 0);
    /// `None` when `off`.
    pub fn s3_listen(&self, api: std::net::SocketAddr) -> Option<(String, bool)> {
        match self.storage.s3_listen.as_deref().map(str::trim) {
            Some("off") => None,
            Some(a) if !a.is_empty() => Some((a.to_string(), true)),
            _ => {
                let mut a = api;
                if a.port() != 0 {
                    a.set_port(a.port().wrapping_add(1));
                }
                Some((a.to_string(), false))
            }
        }
    }

    /// Settles `storage.public_endpoint` from the S3 listener's bound address: the
    /// public URL's scheme and host with that port, unless it is set.
    pub fn settle_s3_endpoint(&mut self, bound: std::net::SocketAddr) {
        if self.storage.public_endpoint.is_some() {
            return;
        }
        let base = self.base_url();
        let endpoint = url::Url::parse(&base)
            .ok()
            .and_then(|mut u| {
                u.set_port(Some(bound.port())).ok()?;
                u.set_path("");
                Some(u.as_str().trim_end_matches('/').to_string())
            })
            .unwrap_or_else(|| format!("http://{bound}"));
        self.storage.public_endpoint = Some(endpoint);
    }

    /// The base URL clients reach the server at, without a trailing slash.
    pub fn base_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.listen),
        }
    }

    /// What each profile can hold on this worker.
    pub fn capacities(&self) -> Vec<stoa_core::scheduler::ProfileCapacity> {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        self.profiles
            .iter()
            .map(|p| {
                let derived = if p.gpu_count == 0 {
                    // Runs that reserve CPUs fill the cores; runs that do not share them.
                    match p.cpus {
                        Some(c) if c > 0.0 => ((cores as f64 / c).floor() as usize).max(1),
                        _ => self.concurrency(),
                    }
                } else if p.gpu_shared {
                    self.concurrency()
                } else {
                    self.worker.gpu_ids.len() / p.gpu_count as usize
                };
                stoa_core::scheduler::ProfileCapacity {
                    name: p.name.clone(),
                    slots: p.slots.unwrap_or(derived),
                    gpu_count: p.gpu_count as usize,
                    gpu_shared: p.gpu_shared,
                }
            })
            .collect()
    }

    /// Runs executed at once by the embedded worker.
    pub fn concurrency(&self) -> usize {
        match self.worker.max_concurrent_runs {
            0 => {
                let cores = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2);
                (cores * 2).max(4)
            }
            n => n,
        }
    }
}

/// The org's storage directory below the data directory (the S3 endpoint serves it;
/// runs mount it).
pub fn org_storage_dir(data_dir: &Path, org: &stoa_types::OrgId) -> PathBuf {
    data_dir.join("storage").join(&org.0)
}

/// Makes an org's storage directory when missing: writable by the sandbox uid of Python
/// runs, which mount it (no other org's run ever sees it).
pub fn make_storage_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !root.is_dir() {
        std::fs::create_dir_all(root)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o777))?;
    }
    Ok(())
}

/// Writes a file readable by its owner only (also when it existed with another mode).
pub fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_disk_reserve_is_below_the_free_space_minimum() {
        let mut c = Config::default();
        c.limits.disk_reserve_bytes = c.limits.min_free_bytes;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.disk_reserve_bytes"), "{e}");
        c.limits.disk_reserve_bytes = 0;
        c.validate().unwrap();
    }

    #[test]
    fn public_url_defaults_to_the_bound_address() {
        let mut c = Config::default();
        assert!(!c.settle_public_url("127.0.0.1:4242".parse().unwrap()));
        assert_eq!(c.base_url(), "http://127.0.0.1:4242");
        let mut c = Config::default();
        assert!(c.settle_public_url("0.0.0.0:80".parse().unwrap()));
        assert_eq!(c.base_url(), "http://127.0.0.1:80");
        let mut c = Config::default();
        assert!(c.settle_public_url("[::]:80".parse().unwrap()));
        assert_eq!(c.base_url(), "http://[::1]:80");
        let mut c = Config {
            public_url: Some("https://stoa.example/".into()),
            ..Default::default()
        };
        assert!(!c.settle_public_url("127.0.0.1:1".parse().unwrap()));
        assert_eq!(c.base_url(), "https://stoa.example");
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = Config::default();
        c.limits.default_timeout_s = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .0
                .contains("limits.default_timeout_s")
        );
        let mut c = Config::default();
        c.limits.priority_share = 1.5;
        assert!(
            c.validate()
                .unwrap_err()
                .0
                .contains("limits.priority_share")
        );
        let mut c = Config::default();
        c.python.sandbox = "docker".into();
        assert!(c.validate().unwrap_err().0.contains("python.sandbox"));
        let mut c = Config::default();
        c.retention.interval_s = 0;
        assert!(c.validate().unwrap_err().0.contains("retention.interval_s"));
        let mut c = Config::default();
        c.retention.runs_days = 1_000_000;
        assert!(c.validate().unwrap_err().0.contains("retention.runs_days"));
    }
}
