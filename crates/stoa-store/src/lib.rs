//! Stoa's persistent state behind one trait, [`Store`].
//!
//! The SQLite backend ([`SqliteStore`]) is the embedded default; the PostgreSQL one
//! ([`PgStore`]) lets several servers share one database. Every state change of a run
//! is one transaction that also writes its timestamp and timeline phase, and is checked
//! against the state machine in `stoa-core`, so two writers racing to end a run cannot
//! both win, on one server or several.

#[doc(hidden)]
pub mod conformance;
pub mod copy;
mod postgres;
mod sqlite;

pub use postgres::{PgFeed, PgStore, create_database, redacted};

pub use sqlite::now;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
pub use stoa_core::time::Time;
use stoa_types::{OrgId, RunId, RunStatus};

pub use sqlite::SqliteStore;
pub use stoa_core::plane::{
    Appended, Directive, GpuSample, OutputPiece, OutputStream, RunControl, Sample,
};
pub use stoa_core::record::{Lease, Run, RunKind};
pub use stoa_core::scheduler::{StoredActive, StoredPending};

/// The schema versions of a store before and after its migrations ran at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: i64,
    pub to: i64,
}

/// Where a store lives: a SQLite file, or a PostgreSQL database by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Location {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; anything else is the path of a
    /// SQLite database (`sqlite://` stripped).
    pub fn parse(s: &str) -> Self {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_string())
        } else {
            Location::Sqlite(s.strip_prefix("sqlite://").unwrap_or(s).into())
        }
    }

    /// How it is shown in logs and errors (a URL without its password).
    pub fn display(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(u) => redacted(u),
        }
    }
}

/// A store opened, migrated, with the feed of changes other processes make to it.
pub struct Opened {
    pub store: std::sync::Arc<dyn Store>,
    pub feed: std::sync::Arc<dyn ChangeFeed>,
    pub migrated: Migrated,
}

/// Opens (creating a SQLite file if needed) the store at `at` and applies migrations.
pub async fn open(at: &Location) -> Result<Opened> {
    use std::sync::Arc;
    Ok(match at {
        Location::Sqlite(path) => {
            let path = path.clone();
            let s = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??;
            Opened {
                migrated: s.migrated(),
                store: Arc::new(s),
                feed: Arc::new(NoOtherWriters),
            }
        }
        Location::Postgres(url) => {
            let s = PgStore::connect(url).await?;
            Opened {
                migrated: s.migrated(),
                feed: Arc::new(s.feed()),
                store: Arc::new(s),
            }
        }
    })
}

/// A change another process made to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// This run's state changed (queued, placed, started, ended…).
    State(RunId),
    /// This run has new output.
    Output(RunId),
    /// Runs were queued.
    Queued,
    /// Anything may have changed unseen (the feed was lost for a while).
    Unknown,
}

/// How a server hears of the changes other processes make to the store it shares with
/// them (new output, state changes), to wake its live readers. The server's own changes
/// reach its readers in-process; this feed carries only the ids of the runs that
/// changed, never their data.
#[async_trait]
pub trait ChangeFeed: Send + Sync {
    /// Calls `changed` for each change another process sharing the store made, until
    /// `shutdown` flips.
    async fn follow(
        &self,
        changed: &(dyn Fn(Change) + Send + Sync),
        shutdown: tokio::sync::watch::Receiver<bool>,
    );
}

/// The feed of a store no other process writes (SQLite, opened by one server).
pub struct NoOtherWriters;

#[async_trait]
impl ChangeFeed for NoOtherWriters {
    async fn follow(
        &self,
        _changed: &(dyn Fn(Change) + Send + Sync),
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
    }
}

/// True when a worker reports Running again under its lease (its first report's
/// answer was lost): the transition is answered yes, changing nothing. One rule for
/// both backends.
fn repeats_running(cur: &Run, to: RunStatus, data: &TransitionData) -> bool {
    to == RunStatus::Running
        && cur.status == RunStatus::Running
        && data.lease_token.is_some()
        && cur.lease.as_ref().map(|l| &l.token) == data.lease_token.as_ref()
}

/// Why the reaper ends `run` (`reason`, else its worker was lost) and the `[stoa]` line
/// it adds to the run's output; one rule for both backends.
fn reaped_because(run: &Run, reason: Option<&str>) -> (String, OutputPiece) {
    let why = reason.map(str::to_string).unwrap_or_else(|| {
        format!(
            "worker lost: {}, last heard {}",
            run.worker_id.as_deref().unwrap_or("unknown"),
            run.lease
                .as_ref()
                .map(|l| stoa_core::time::stamp(&l.heard_at))
                .unwrap_or_else(|| "never".into()),
        )
    });
    let line = OutputPiece::from((
        OutputStream::System,
        format!(
            "[stoa] {why}; output up to that point is kept
"
        ),
    ));
    (why, line)
}

/// Keeps chunks while their content fits in `max_bytes` (always at least one, so a
/// reader paging through output makes progress). Rows come one at a time: a page never
/// holds more than the budget and one chunk.
fn take_within<E: Into<StoreError>>(
    rows: impl Iterator<Item = std::result::Result<OutputChunk, E>>,
    max_bytes: usize,
) -> Result<Vec<OutputChunk>> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for r in rows {
        let chunk = r.map_err(Into::into)?;
        bytes += chunk.content.len();
        if bytes > max_bytes && !out.is_empty() {
            break;
        }
        out.push(chunk);
    }
    Ok(out)
}

/// The rule of [`OutputStore::append_output_at`] for a batch numbered from `first`, with
/// `last` the run's last stored number and `stored` its stored bytes: how many leading
/// pieces were stored by an earlier send (and are skipped), or why nothing is stored.
fn numbered_append(
    first: i64,
    last: i64,
    stored: i64,
    chunks: &[OutputPiece],
    max_bytes: u64,
) -> std::result::Result<usize, Appended> {
    if first < 1 || first > last + 1 {
        return Err(Appended::Gap { expected: last + 1 });
    }
    let skip = usize::try_from(last + 1 - first).unwrap_or(0);
    let adding: u64 = chunks
        .iter()
        .skip(skip)
        .map(|p| p.content.len() as u64)
        .sum();
    if (stored.max(0) as u64).saturating_add(adding) > max_bytes {
        return Err(Appended::OverLimit);
    }
    Ok(skip)
}

/// Upper bounds of the store latency histogram, in seconds.
const OP_BUCKETS: [f64; 9] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];
static OP_COUNTS: [std::sync::atomic::AtomicU64; 9] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 9];
static OP_COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static OP_SUM_MICROS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records the latency of one store operation.
fn record_op(d: std::time::Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let secs = d.as_secs_f64();
    for (i, b) in OP_BUCKETS.iter().enumerate() {
        if secs <= *b {
            OP_COUNTS[i].fetch_add(1, Relaxed);
        }
    }
    OP_COUNT.fetch_add(1, Relaxed);
    OP_SUM_MICROS.fetch_add(d.as_micros() as u64, Relaxed);
}

/// Store operation latency so far (cumulative buckets, as Prometheus wants them).
pub struct OpStats {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_secs: f64,
}

/// The latency of store operations in this process.
pub fn op_stats() -> OpStats {
    use std::sync::atomic::Ordering::Relaxed;
    OpStats {
        buckets: OP_BUCKETS
            .iter()
            .zip(OP_COUNTS.iter())
            .map(|(b, c)| (*b, c.load(Relaxed)))
            .collect(),
        count: OP_COUNT.load(Relaxed),
        sum_secs: OP_SUM_MICROS.load(Relaxed) as f64 / 1e6,
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error (in its own words), of this kind.
    #[error("database error: {message}")]
    Database { message: String, kind: DbFailure },
    /// A stored value could not be read back.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// A migration failed.
    #[error("migration {version} failed: {message}")]
    Migration { version: i64, message: String },
    /// The blocking task running the query was lost.
    #[error("store task failed: {0}")]
    Task(String),
    /// A file of the database could not be created or made private.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// True when the write failed for lack of space (the disk under the database is full).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Database { kind, .. } => *kind == DbFailure::DiskFull,
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// What kind of database error a [`StoreError::Database`] is, whichever the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFailure {
    /// The write did not fit: the disk under the database is full.
    DiskFull,
    /// The database cannot be reached now (down, restarting, refusing connections).
    Unavailable,
    /// Anything else.
    Other,
}

/// Result type of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// An organisation (tenant).
#[derive(Debug, Clone, PartialEq)]
pub struct Org {
    pub id: OrgId,
    pub slug: String,
    pub name: String,
    pub created_at: Time,
}

/// An API key as stored: only the hash of the secret is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub org_id: OrgId,
    pub name: String,
    /// The first characters of the key, shown in lists.
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    pub is_admin: bool,
    pub is_active: bool,
    pub created_at: Time,
    pub last_used_at: Option<Time>,
    /// Dashboard sessions of this key signed in before this time are over (a sign-out
    /// ends them on every server).
    pub sessions_after: Option<Time>,
}

/// A run to insert, in `pending`.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub org_id: OrgId,
    pub job_type: RunKind,
    pub execution_type: String,
    pub file_name: Option<String>,
    /// The validated spec, as JSON.
    pub spec: String,
    pub timeout_s: i64,
    pub run_name: Option<String>,
    pub labels: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub callback_urls: Vec<String>,
    pub price_per_hour: Option<f64>,
    /// The first pending reason.
    pub pending_reason: Option<String>,
    /// 0..=100, higher first.
    pub priority: i64,
    /// Same key from the same org within 24 h returns the first run.
    pub idempotency_key: Option<String>,
    /// The GPU selection run this run profiles for.
    pub parent_id: Option<RunId>,
}

/// What an insert did.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// Stored, `pending`.
    New,
    /// Nothing stored: the org's run with that idempotency key.
    Existing(Box<Run>),
    /// Nothing stored: the org already has `queued` runs pending, and more would pass
    /// its limit.
    OverLimit { queued: usize },
}

/// Which active runs the reaper ends (`system_failure`, a `[stoa]` line in the output
/// saying why, the callback outbox written, all in one transaction).
#[derive(Debug, Clone, Copy)]
pub enum Reap<'a> {
    /// Runs whose lease expired before now: `worker lost: <worker>, last heard <time>`;
    /// except the runs of `except` (a worker known to be alive: the embedded one, whose
    /// heartbeats may fail while the disk under the store is full).
    Expired { except: Option<&'a str> },
    /// Every active run of this worker, whatever its lease, with this reason (a worker
    /// that restarted knows its earlier runs are gone).
    Worker { worker: &'a str, reason: &'a str },
}

/// What a transition writes besides the new status.
#[derive(Debug, Clone, Default)]
pub struct TransitionData {
    pub return_code: Option<i64>,
    pub error: Option<String>,
    pub timed_out: bool,
    pub worker_id: Option<String>,
    pub pgid: Option<i64>,
    /// When set, the write happens only while the run is held under this lease token
    /// (`None` back otherwise): a worker that lost its lease writes nothing.
    pub lease_token: Option<String>,
}

/// One stored piece of output (normally one line, with its newline).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputChunk {
    /// Position in the run's output, from 1, without gaps.
    pub seq: i64,
    pub stream: OutputStream,
    pub content: String,
    pub ts: Time,
    /// The compose service it came from.
    pub service: Option<String>,
}

/// An encrypted value as stored: ciphertext, nonce and the id of the key that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub nonce: Vec<u8>,
    pub key_id: String,
}

/// A stored secret (environment variable of an org's runs).
#[derive(Debug, Clone, PartialEq)]
pub struct Secret {
    pub id: String,
    pub org_id: OrgId,
    pub name: String,
    pub sealed: Sealed,
    pub is_secret: bool,
    pub created_at: Time,
    pub updated_at: Time,
}

/// Where a sealed value lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedRef {
    /// A secret, by id.
    Secret(String),
    /// An org's callback signing secret.
    CallbackSecret(OrgId),
}

/// A callback delivery of the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: i64,
    pub run_id: RunId,
    pub org_id: OrgId,
    pub url: String,
    /// The JSON body to POST.
    pub payload: String,
    pub state: DeliveryState,
    pub attempts: i64,
    pub next_attempt_at: Time,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
}

/// Where a callback delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Due (again) at its `next_attempt_at`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up (attempts spent, or refused for good).
    Failed,
}

impl DeliveryState {
    /// As stored and shown (`pending`, `delivered`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    /// Reads a stored state.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => DeliveryState::Pending,
            "delivered" => DeliveryState::Delivered,
            "failed" => DeliveryState::Failed,
            _ => return None,
        })
    }
}

/// A worker on another machine, as registered.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub name: String,
    /// Hex SHA-256 of the worker's token (the token itself is never stored).
    pub token_hash: String,
    /// What it offers (JSON, as the control plane reads it).
    pub offer: String,
    pub registered_at: Time,
    pub last_heard_at: Time,
    /// Takes no new runs.
    pub draining: bool,
}

/// Filter for listing runs.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only these states (all when empty).
    pub statuses: Vec<RunStatus>,
    /// Only runs carrying this label.
    pub label: Option<String>,
    /// Only runs of this name.
    pub run_name: Option<String>,
    /// Only runs of this kind (`python`, `image`, `compose`, `gpu_selection`).
    pub kind: Option<String>,
    /// Only runs that asked for this hardware profile.
    pub profile: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

/// Stoa's persistent state. Both backends implement the same guarantees.
/// The store: every resource's operations, each backend implementing them one file per
/// resource. On `dyn Store` the methods are at hand; on a backend's own type, bring
/// them into scope with [`prelude`].
pub trait Store:
    KeyStore
    + RunStore
    + QueueStore
    + WorkerStore
    + SecretStore
    + DeliveryStore
    + MetricStore
    + OutputStore
    + 'static
{
}

impl<
    T: KeyStore
        + RunStore
        + QueueStore
        + WorkerStore
        + SecretStore
        + DeliveryStore
        + MetricStore
        + OutputStore
        + 'static,
> Store for T
{
}

/// The store's traits, to call a store's methods (`use stoa_store::prelude::*;`).
pub mod prelude {
    pub use super::{
        DeliveryStore, KeyStore, MetricStore, OutputStore, QueueStore, RunStore, SecretStore,
        Store, WorkerStore,
    };
}

/// Organisations and API keys.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Creates an organisation.
    async fn create_org(&self, slug: &str, name: &str) -> Result<Org>;
    /// An organisation by id.
    async fn get_org(&self, id: &OrgId) -> Result<Option<Org>>;
    /// An organisation by slug or id.
    async fn find_org(&self, slug_or_id: &str) -> Result<Option<Org>>;
    /// All organisations.
    async fn list_orgs(&self) -> Result<Vec<Org>>;
    /// Stores a key (its hash; the secret itself is never stored).
    async fn insert_key(&self, key: &ApiKey) -> Result<()>;
    /// The active key with this hash, and its org.
    async fn key_by_hash(&self, hash: &str) -> Result<Option<(ApiKey, Org)>>;
    /// All keys.
    async fn list_keys(&self) -> Result<Vec<ApiKey>>;
    /// Deactivates a key by id or prefix; false when none matched.
    async fn revoke_key(&self, id_or_prefix: &str) -> Result<bool>;
    /// Number of keys, revoked ones included.
    async fn count_keys(&self) -> Result<i64>;
    /// Records that a key was used now.
    async fn touch_key(&self, id: &str) -> Result<()>;
    /// Ends the dashboard sessions of a key signed in before `at` (sign-out).
    async fn end_sessions(&self, id: &str, at: Time) -> Result<()>;
}

/// Runs: their records, states and timelines.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Inserts a run in `pending`, with its `queued` phase, in one transaction with its
    /// checks: with an idempotency key that the org used for a run created in the last
    /// 24 hours, nothing is inserted and that run is returned (also at the limit);
    /// else, when the org already has `max_queued` runs pending, nothing is inserted.
    async fn insert_run_within(&self, run: &NewRun, max_queued: usize) -> Result<Inserted>;
    /// [`RunStore::insert_run_within`] without a queued limit: `Some` is the run its
    /// idempotency key found.
    async fn insert_run(&self, run: &NewRun) -> Result<Option<Run>> {
        Ok(match self.insert_run_within(run, usize::MAX).await? {
            Inserted::Existing(r) => Some(*r),
            Inserted::New | Inserted::OverLimit { .. } => None,
        })
    }
    /// Inserts a GPU selection in one transaction: the parent, `running` under the
    /// coordinator (it runs while its children do), and its children `pending`; nothing
    /// when that would take the org past `max_queued` pending runs.
    async fn insert_selection(
        &self,
        parent: &NewRun,
        children: &[NewRun],
        max_queued: usize,
    ) -> Result<Inserted>;
    /// The run an org created with this idempotency key in the last 24 hours.
    async fn run_by_idempotency_key(&self, org: &OrgId, key: &str) -> Result<Option<Run>>;
    /// Every pending run, oldest first (to rebuild the queue at start).
    async fn pending_runs(&self) -> Result<Vec<Run>>;
    /// The child runs of a parent run.
    async fn children(&self, parent: RunId) -> Result<Vec<Run>>;
    /// A run by id (any org: callers check the org).
    async fn get_run(&self, id: RunId) -> Result<Option<Run>>;
    /// An org's runs, newest first.
    async fn list_runs(&self, org: &OrgId, filter: &RunFilter) -> Result<Vec<Run>>;
    /// Number of an org's runs per state.
    async fn count_runs_by_status(&self, org: &OrgId) -> Result<BTreeMap<String, i64>>;
    /// The cost of all of an org's runs: running time × the profile's hourly price.
    async fn total_billed(&self, org: &OrgId) -> Result<f64>;
    /// Number of an org's runs that `filter` selects (its `limit` and `offset` aside).
    async fn count_runs(&self, org: &OrgId, filter: &RunFilter) -> Result<i64>;
    /// Deletes a terminal run with its samples and callback deliveries; false when it is
    /// unknown or not terminal. The run is gone at once, its output with it for every
    /// reader; the output rows themselves are removed later, in batches, by
    /// [`Store::purge_orphan_output`].
    async fn delete_run(&self, id: RunId) -> Result<bool>;
    /// Moves a run to `to` when the state machine allows it, writing timestamps and the
    /// timeline; `None` when the transition is not allowed (for example the run already
    /// ended), in which case nothing changed. A transition into a terminal state also
    /// writes one callback delivery per callback URL of the run, in the same
    /// transaction (the outbox).
    async fn transition(
        &self,
        id: RunId,
        to: RunStatus,
        data: TransitionData,
    ) -> Result<Option<Run>>;
    /// Sets or clears the pending reason.
    async fn set_pending_reason(&self, id: RunId, reason: Option<&str>) -> Result<()>;
    /// Appends a phase to the timeline of an active run whose lease `token` holds
    /// (one statement); false, and nothing written, when it does not.
    async fn add_phase(&self, id: RunId, token: &str, phase: &str) -> Result<bool>;
    /// Records the Slurm job an active run was submitted as.
    async fn set_slurm_job(&self, id: RunId, job: &str) -> Result<()>;
    /// Records where the ports of an active run are reached.
    async fn set_run_ports(&self, id: RunId, ports: &BTreeMap<u16, String>) -> Result<()>;
    /// Marks the run's stored output as cut at the output limit.
    async fn set_output_truncated(&self, id: RunId) -> Result<()>;
    /// Runs in `starting` or `running` (for restart recovery).
    async fn active_runs(&self) -> Result<Vec<Run>>;
    /// Deletes at most `limit` terminal runs that ended (or were created) before
    /// `before`, oldest first, like [`Store::delete_run`]: their output goes to
    /// [`Store::purge_orphan_output`]. Returns how many runs.
    async fn prune_runs(&self, before: Time, limit: i64) -> Result<u64>;
    /// Number of runs per state, all orgs (for the platform's metrics).
    async fn count_all_by_status(&self) -> Result<BTreeMap<String, i64>>;
}

/// The queue and its leases: claims, heartbeats, controls, the reaper.
#[async_trait]
pub trait QueueStore: Send + Sync {
    /// Claims one pending run for `worker_id` (pending → starting, with its GPUs) in one
    /// statement; with `lease`, under a fresh lease token that expires after it (the
    /// run's `lease`). `None` when it is no longer pending.
    async fn claim(
        &self,
        id: RunId,
        worker_id: &str,
        gpu_ids: &[String],
        lease: Option<Duration>,
    ) -> Result<Option<Run>>;
    /// Renews the leases `worker_id` holds (run, token) for `ttl` from now, and says for
    /// each what the worker is to do: go on, carry out an abort or stop asked for, or
    /// give the run up (its lease is no longer held under that token).
    async fn heartbeat(
        &self,
        worker_id: &str,
        leases: &[(RunId, String)],
        ttl: Duration,
    ) -> Result<Vec<(RunId, Directive)>>;
    /// Whether `token` holds the lease of an active run.
    async fn lease_held(&self, id: RunId, token: &str) -> Result<bool>;
    /// Asks an active run to abort or stop (its worker hears it on its next heartbeat).
    /// An abort asked for is not weakened into a stop. `None` when the run is not active.
    async fn request_control(&self, id: RunId, control: RunControl) -> Result<Option<Run>>;
    /// Ends the active runs `scope` selects as `system_failure`, each in one transaction
    /// with its `[stoa]` output line and its callback deliveries; returns them ended.
    async fn reap(&self, scope: Reap<'_>) -> Result<Vec<Run>>;
    /// Atomically moves the oldest `pending` run to `starting` for `worker_id`, under a
    /// lease of `lease`.
    async fn claim_next(&self, worker_id: &str, lease: Duration) -> Result<Option<Run>>;
    /// The queue as stored, for servers that share the store: the pending runs, oldest
    /// first, and the active runs a worker holds under a lease.
    async fn queue_snapshot(&self) -> Result<(Vec<StoredPending>, Vec<StoredActive>)>;
}

/// Join tokens and the workers of the fleet.
#[async_trait]
pub trait WorkerStore: Send + Sync {
    /// Stores a join token (its hash) that lets machines register as workers until
    /// `expires_at` (RFC 3339; never when `None`).
    async fn insert_join_token(&self, id: &str, hash: &str, expires_at: Option<Time>)
    -> Result<()>;
    /// Whether a join token with this hash is valid now.
    async fn join_token_valid(&self, hash: &str) -> Result<bool>;
    /// Join tokens: (id, created, expires, revoked), newest first.
    async fn list_join_tokens(&self) -> Result<Vec<(String, Time, Option<Time>, bool)>>;
    /// Revokes a join token by id; false when none has it.
    async fn revoke_join_token(&self, id: &str) -> Result<bool>;
    /// Forgets a worker: its token no longer counts (its runs are reaped when their
    /// leases expire); false when there is none of that name.
    async fn remove_worker(&self, name: &str) -> Result<bool>;
    /// Registers a worker, or registers it again under a new token (its draining mark
    /// is kept).
    async fn register_worker(&self, w: &WorkerRecord) -> Result<()>;
    /// The worker holding the token with this hash.
    async fn worker_by_token(&self, hash: &str) -> Result<Option<WorkerRecord>>;
    /// Records that a worker was heard now.
    async fn touch_worker(&self, name: &str) -> Result<()>;
    /// Every registered worker, by name.
    async fn list_workers(&self) -> Result<Vec<WorkerRecord>>;
    /// Marks a worker draining (or not); false when there is none of that name.
    async fn set_worker_draining(&self, name: &str, draining: bool) -> Result<bool>;
}

/// Sealed secrets: org variables and callback signing secrets.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Creates or replaces secrets of an org by name, in one transaction.
    async fn upsert_secrets(
        &self,
        org: &OrgId,
        items: Vec<(String, Sealed, bool)>,
    ) -> Result<Vec<Secret>>;
    /// An org's secrets (sealed), by name.
    async fn list_secrets(&self, org: &OrgId) -> Result<Vec<Secret>>;
    /// Deletes one secret by id or name; false when none matched.
    async fn delete_secret(&self, org: &OrgId, id_or_name: &str) -> Result<bool>;
    /// Deletes all of an org's secrets; returns how many.
    async fn delete_all_secrets(&self, org: &OrgId) -> Result<u64>;
    /// Every sealed value in the store (secrets and callback signing secrets), with
    /// where it lives: for start-up checks and key rotation.
    async fn all_sealed(&self) -> Result<Vec<(SealedRef, Sealed)>>;
    /// Replaces sealed values (key rotation), in one transaction.
    async fn reseal(&self, items: Vec<(SealedRef, Sealed)>) -> Result<()>;
    /// The org's callback signing secret.
    async fn callback_secret(&self, org: &OrgId) -> Result<Option<Sealed>>;
    /// Sets the org's callback signing secret.
    async fn set_callback_secret(&self, org: &OrgId, sealed: Sealed) -> Result<()>;
}

/// The callback outbox.
#[async_trait]
pub trait DeliveryStore: Send + Sync {
    /// Claims the deliveries due at `now` (pending, next attempt reached), at most
    /// `limit`, oldest first: each is held for `hold` (its next attempt moved to
    /// `now + hold`), so no other server attempts it meanwhile. One whose attempt is
    /// never recorded (its server died) comes due again when the hold ends.
    async fn claim_deliveries(
        &self,
        now: Time,
        limit: i64,
        hold: Duration,
    ) -> Result<Vec<Delivery>>;
    /// Records an attempt: new state, attempts, next attempt time, last status and error.
    async fn record_attempt(&self, d: &Delivery) -> Result<()>;
    /// The deliveries of a run.
    async fn deliveries_for_run(&self, id: RunId) -> Result<Vec<Delivery>>;
    /// The earliest next attempt of pending deliveries.
    async fn next_delivery_at(&self) -> Result<Option<Time>>;
}

/// Metric samples and summaries.
#[async_trait]
pub trait MetricStore: Send + Sync {
    /// Stores samples (one transaction).
    async fn insert_samples(&self, samples: Vec<Sample>) -> Result<()>;
    /// A run's samples between `start` and `end` (RFC 3339, inclusive), in time order.
    async fn samples(&self, id: RunId, start: Time, end: Time) -> Result<Vec<Sample>>;
    /// Stores GPU samples (one transaction).
    async fn insert_gpu_samples(&self, run: RunId, samples: Vec<GpuSample>) -> Result<()>;
    /// A run's GPU samples between `start` and `end`, in time order.
    async fn gpu_samples(&self, id: RunId, start: Time, end: Time) -> Result<Vec<GpuSample>>;
    /// Keeps a run's metrics summary (JSON) with it.
    async fn set_metrics_summary(&self, id: RunId, summary: &str) -> Result<()>;
    /// A run's metrics summary.
    async fn metrics_summary(&self, id: RunId) -> Result<Option<String>>;
    /// Deletes samples older than `before`; returns how many.
    async fn prune_samples(&self, before: Time) -> Result<u64>;
}

/// Run output: numbered lines, pages, logs, retention.
#[async_trait]
pub trait OutputStore: Send + Sync {
    /// Removes the stored output of runs that ended (or, never started, were created)
    /// before `before`, oldest first: at most `limit` output chunks in one short
    /// transaction, so call it until it returns less than `limit`. A run is marked
    /// `output_expired` (and its output hidden from readers) with its first batch.
    async fn prune_output(&self, before: Time, limit: i64) -> Result<u64>;
    /// Removes at most `limit` output chunks of deleted runs; returns how many.
    async fn purge_orphan_output(&self, limit: i64) -> Result<u64>;
    /// Output bytes an org's runs hold in the store (what retention and deletion have
    /// not removed).
    async fn org_output_bytes(&self, org: &OrgId) -> Result<u64>;
    /// Appends output and returns the seq of the last chunk written, counting its bytes
    /// in the run's stored output. Output of a run that no longer exists (deleted) is
    /// not stored.
    async fn append_output(&self, id: RunId, chunks: &[OutputPiece]) -> Result<i64>;
    /// Appends a worker's output under its lease: `first` is the number the worker gave
    /// the first piece. Pieces already stored (a resend) are skipped, a gap (or a
    /// number below 1) is refused with the number expected, nothing is stored unless
    /// `token` holds the run's lease, and nothing that would take the run's stored
    /// output past `max_bytes`. One transaction.
    async fn append_output_at(
        &self,
        id: RunId,
        token: &str,
        first: i64,
        chunks: &[OutputPiece],
        max_bytes: u64,
    ) -> Result<Appended>;
    /// One page of output: chunks with seq greater than `after`, in order, at most
    /// `limit` of them and no more than `max_bytes` of content (but always one chunk
    /// when there is one, so paging makes progress). Readers page on from the last seq;
    /// no caller reads a run's whole output at once. None for a deleted run or one whose
    /// output expired.
    async fn read_output(
        &self,
        id: RunId,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<OutputChunk>>;
    /// The last chunks written at or after `since` (RFC 3339), in order: at most
    /// `limit`, and the newest that fit in `max_bytes` of content (at least one); and
    /// how many chunks there are since then.
    async fn read_logs(
        &self,
        id: RunId,
        since: Time,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<OutputChunk>, i64)>;
}
