//! The PostgreSQL backend: a pool of connections, shared by several servers over one
//! database.
//!
//! Every method is one transaction. Where SQLite serialises writers with its one
//! connection, this backend takes row locks: a state change locks the run's row
//! (`FOR UPDATE`) before it checks the state machine; an append locks it before it
//! numbers output; an insert locks its org's `org_pending` row before it checks the
//! queued limit and the idempotency key; claims skip rows another claimer holds
//! (`FOR UPDATE SKIP LOCKED`). Servers learn of new output and state changes of other
//! servers through `NOTIFY` (see [`PgFeed`]).
//!
//! This file holds the pool, the migrations and what several resources share; each
//! resource's operations are in a file of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use stoa_types::{OrgId, RunId, RunStatus};

#[allow(unused_imports)]
use crate::prelude::*;
use crate::{
    ApiKey, Appended, DbFailure, Delivery, DeliveryState, Directive, GpuSample, Inserted, Lease,
    Migrated, NewRun, Org, OutputChunk, OutputPiece, OutputStream, Reap, Result, Run, RunControl,
    RunFilter, RunKind, Sample, Sealed, SealedRef, Secret, StoreError, StoredActive, StoredPending,
    Time, TransitionData, WorkerRecord,
};

mod feed;
pub use feed::PgFeed;

/// Embedded migrations, applied in order at connect. Never edit one that has shipped.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_insert_run.sql"),
    ),
    (3, include_str!("../../migrations/postgres/0003_slurm.sql")),
    (
        4,
        include_str!("../../migrations/postgres/0004_key_sessions.sql"),
    ),
    (
        5,
        include_str!("../../migrations/postgres/0005_run_ports.sql"),
    ),
];

/// The oldest PostgreSQL the backend runs on.
pub const MIN_SERVER_VERSION: i64 = 130_000;

/// Connections per server process, unless the URL's `max_connections` says otherwise.
const DEFAULT_POOL: u32 = 16;

/// How long a caller waits for a pooled connection before the store is called
/// unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes a lock only one migrating process holds (an arbitrary constant: "stoa").
const MIGRATION_LOCK: i64 = 0x73746f61;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let kind = match &e {
            sqlx::Error::Database(d) => match d.code().as_deref() {
                // disk_full, out_of_memory… (class 53: insufficient resources)
                Some("53100") => DbFailure::DiskFull,
                // Class 08 (connection exception), 57P0x (the server shutting down or
                // restarting).
                Some(c) if c.starts_with("08") || c.starts_with("57P") => DbFailure::Unavailable,
                _ => DbFailure::Other,
            },
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => DbFailure::Unavailable,
            _ => DbFailure::Other,
        };
        StoreError::Database {
            message: e.to_string(),
            kind,
        }
    }
}

/// PostgreSQL implementation of [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    migrated: Migrated,
    url: String,
    /// Names this process in its notifications, so that its own feed skips them (its
    /// readers heard of its changes in-process).
    origin: std::sync::Arc<str>,
    /// Asks for one `queued` notification (see [`announce_queued`]).
    queued: tokio::sync::mpsc::Sender<()>,
}

/// How long the announcer gathers inserts before it tells the other servers.
const ANNOUNCE_GATHER: Duration = Duration::from_millis(10);

/// Tells the other servers that runs were queued, once per burst of inserts, outside
/// their transactions; ends when every handle of the store is gone.
async fn announce_queued(pool: PgPool, mut asked: tokio::sync::mpsc::Receiver<()>) {
    while asked.recv().await.is_some() {
        tokio::time::sleep(ANNOUNCE_GATHER).await;
        while asked.try_recv().is_ok() {}
        let sent =
            sqlx::query("SELECT pg_notify($1, 'queued:-:' || current_setting('application_name'))")
                .bind(feed::CHANNEL)
                .execute(&pool)
                .await;
        if let Err(e) = sent {
            // The others find the runs at their next look (every second).
            tracing::debug!(error = %e, "announcing queued runs failed");
        }
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:pass@host:port/db`), checks
    /// that the server is PostgreSQL 13 or newer, and applies migrations (one process
    /// at a time: several servers may start together).
    pub async fn connect(url: &str) -> Result<Self> {
        let opts: PgConnectOptions = url.parse().map_err(|e| StoreError::Database {
            message: format!("invalid database URL: {e}"),
            kind: DbFailure::Other,
        })?;
        let origin: std::sync::Arc<str> = uuid::Uuid::new_v4().simple().to_string()[..12].into();
        // Notifications name the process that sent them (see `notify`).
        let opts = opts.application_name(&format!("stoa-{origin}"));
        let pool = PgPoolOptions::new()
            .max_connections(pool_size(url))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(|e| {
                let mut err = StoreError::from(e);
                if let StoreError::Database { message, .. } = &mut err {
                    *message = format!("cannot reach PostgreSQL at {}: {message}", redacted(url));
                }
                err
            })?;
        let version: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(&pool)
            .await?;
        let version: i64 = version.trim().parse().unwrap_or(0);
        if version < MIN_SERVER_VERSION {
            return Err(StoreError::Database {
                message: format!(
                    "PostgreSQL at {} is version {}.{}; Stoa needs 13 or newer",
                    redacted(url),
                    version / 10_000,
                    version % 10_000
                ),
                kind: DbFailure::Other,
            });
        }
        let migrated = migrate(&pool).await?;
        let (queued, asked) = tokio::sync::mpsc::channel(1);
        tokio::spawn(announce_queued(pool.clone(), asked));
        Ok(PgStore {
            pool,
            migrated,
            url: url.to_string(),
            origin,
            queued,
        })
    }

    /// The schema versions before and after the migrations that ran at connect.
    pub fn migrated(&self) -> Migrated {
        self.migrated
    }

    /// The URL without its password, for messages.
    pub fn display_url(&self) -> String {
        redacted(&self.url)
    }

    /// A change feed over this database's notifications (see [`PgFeed`]).
    pub fn feed(&self) -> PgFeed {
        PgFeed::new(self.url.clone(), self.origin.clone())
    }

    /// Runs `f` on a transaction, committed when it returns `Ok`, and times it.
    async fn tx<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(
                &'c mut PgConnection,
            )
                -> std::pin::Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>
            + Send,
        T: Send,
    {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let out = f(&mut tx).await?;
        tx.commit().await?;
        crate::record_op(started.elapsed());
        Ok(out)
    }

    /// Has the other servers told that runs were queued (soon, once per burst).
    fn announce_queued(&self) {
        let _ = self.queued.try_send(());
    }

    /// The pool, for one-statement operations (each its own transaction).
    fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Moves a run's creation, start and end times (and those of its output) back to
    /// `at`, as if it had run then. For tests of retention only.
    #[doc(hidden)]
    pub async fn backdate_run(&self, id: RunId, at: Time) -> Result<()> {
        self.tx(move |c| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE runs SET created_at = $2,
                        job_start = CASE WHEN job_start IS NULL THEN NULL ELSE $2 END,
                        job_end = CASE WHEN job_end IS NULL THEN NULL ELSE $2 END WHERE id = $1",
                )
                .bind(id.to_string())
                .bind(at)
                .execute(&mut *c)
                .await?;
                sqlx::query("UPDATE run_output SET ts = $2 WHERE run_id = $1")
                    .bind(id.to_string())
                    .bind(at)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }
}

/// Creates a database with a fresh name (`<prefix>_<random>`) in the cluster that
/// `admin_url` reaches (as a user that may create databases); its URL.
pub async fn create_database(admin_url: &str, prefix: &str) -> Result<String> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(admin_url).await.map_err(|e| {
        let mut err = StoreError::from(e);
        if let StoreError::Database { message, .. } = &mut err {
            *message = format!(
                "cannot reach PostgreSQL at {}: {message}",
                redacted(admin_url)
            );
        }
        err
    })?;
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await?;
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin_url, String::new()),
    };
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    Ok(format!("{server}/{name}{query}"))
}

/// The pool size the URL asks for (`?max_connections=N`, read by Stoa, not sent to
/// the server), else [`DEFAULT_POOL`].
fn pool_size(url: &str) -> u32 {
    url.split_once('?')
        .into_iter()
        .flat_map(|(_, q)| q.split('&'))
        .find_map(|kv| kv.strip_prefix("max_connections=")?.parse().ok())
        .unwrap_or(DEFAULT_POOL)
}

/// `url` with its password replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.split_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

async fn migrate(pool: &PgPool) -> Result<Migrated> {
    let mut tx = pool.begin().await?;
    // Servers starting together: the second waits here, then finds the work done.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let applied: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await?;
    for (version, sql) in MIGRATIONS {
        if *version <= applied {
            continue;
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::Migration {
                version: *version,
                message: e.to_string(),
            })?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())")
            .bind(version)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let to = MIGRATIONS.last().map_or(applied, |(v, _)| applied.max(*v));
    Ok(Migrated { from: applied, to })
}

/// The columns of a run, in the order [`run_from_row`] reads them.
macro_rules! run_columns {
    () => {
        "id, org_id, status, job_type, execution_type, file_name, spec, timeout_s, created_at, job_start, job_end, return_code, error, timed_out, pending_reason, phases, worker_id, pgid, run_name, labels, metadata, callback_urls, output_truncated, price_per_hour, priority, parent_id, gpu_ids, seq, output_expired, lease_token, lease_expires_at, lease_heard_at, attempt, control, slurm_job_id, ports"
    };
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn run_from_row(row: &PgRow) -> Result<Run> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let kind: String = row.try_get("job_type")?;
    let Json(phases): Json<Vec<serde_json::Value>> = row.try_get("phases")?;
    Ok(Run {
        id: id.parse().map_err(|e| corrupt("run id", e))?,
        org_id: OrgId(row.try_get("org_id")?),
        status: status.parse().map_err(|e| corrupt("status", e))?,
        job_type: RunKind::parse(&kind).ok_or_else(|| corrupt("run kind", &kind))?,
        execution_type: row.try_get("execution_type")?,
        file_name: row.try_get("file_name")?,
        spec: row.try_get("spec")?,
        timeout_s: row.try_get("timeout_s")?,
        created_at: row.try_get("created_at")?,
        job_start: row.try_get("job_start")?,
        job_end: row.try_get("job_end")?,
        return_code: row.try_get("return_code")?,
        error: row.try_get("error")?,
        timed_out: row.try_get("timed_out")?,
        pending_reason: row.try_get("pending_reason")?,
        phases: phases
            .iter()
            .map(|p| {
                let at = p["at"].as_str().unwrap_or_default();
                Ok((
                    p["phase"].as_str().unwrap_or_default().to_string(),
                    stoa_core::time::parse(at).ok_or_else(|| corrupt("phase time", at))?,
                ))
            })
            .collect::<Result<_>>()?,
        worker_id: row.try_get("worker_id")?,
        pgid: row.try_get("pgid")?,
        run_name: row.try_get("run_name")?,
        labels: row.try_get::<Json<_>, _>("labels")?.0,
        metadata: row.try_get::<Json<_>, _>("metadata")?.0,
        callback_urls: row.try_get::<Json<_>, _>("callback_urls")?.0,
        output_truncated: row.try_get("output_truncated")?,
        price_per_hour: row.try_get("price_per_hour")?,
        priority: row.try_get("priority")?,
        parent_id: row
            .try_get::<Option<String>, _>("parent_id")?
            .map(|p| p.parse().map_err(|e| corrupt("parent id", e)))
            .transpose()?,
        gpu_ids: row.try_get::<Json<_>, _>("gpu_ids")?.0,
        seq: row.try_get("seq")?,
        output_expired: row.try_get("output_expired")?,
        lease: row
            .try_get::<Option<String>, _>("lease_token")?
            .map(|token| -> Result<Lease> {
                Ok(Lease {
                    token,
                    expires_at: row.try_get("lease_expires_at")?,
                    heard_at: row.try_get("lease_heard_at")?,
                    attempt: row.try_get("attempt")?,
                })
            })
            .transpose()?,
        control: row
            .try_get::<Option<String>, _>("control")?
            .and_then(|c| RunControl::parse(&c)),
        slurm_job_id: row.try_get("slurm_job_id")?,
        ports: row.try_get::<Json<_>, _>("ports")?.0,
    })
}

fn runs_from(rows: Vec<PgRow>) -> Result<Vec<Run>> {
    rows.iter().map(run_from_row).collect()
}

fn org_from_row(row: &PgRow) -> Result<Org> {
    Ok(Org {
        id: OrgId(row.try_get("id")?),
        slug: row.try_get("slug")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

fn key_from_row(row: &PgRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        org_id: OrgId(row.try_get("org_id")?),
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        hash: row.try_get("hash")?,
        is_admin: row.try_get("is_admin")?,
        is_active: row.try_get("is_active")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        sessions_after: row.try_get("sessions_after")?,
    })
}

fn sealed_from_row(r: &PgRow) -> Result<Sealed> {
    Ok(Sealed {
        ciphertext: r.try_get("ciphertext")?,
        nonce: r.try_get("nonce")?,
        key_id: r.try_get("key_id")?,
    })
}

fn secret_from_row(r: &PgRow) -> Result<Secret> {
    Ok(Secret {
        id: r.try_get("id")?,
        org_id: OrgId(r.try_get("org_id")?),
        name: r.try_get("name")?,
        sealed: sealed_from_row(r)?,
        is_secret: r.try_get("is_secret")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn delivery_from_row(r: &PgRow) -> Result<Delivery> {
    let run: String = r.try_get("run_id")?;
    let state: String = r.try_get("state")?;
    Ok(Delivery {
        id: r.try_get("id")?,
        run_id: run.parse().map_err(|e| corrupt("run id", e))?,
        org_id: OrgId(r.try_get("org_id")?),
        url: r.try_get("url")?,
        payload: r.try_get("payload")?,
        state: DeliveryState::parse(&state).ok_or_else(|| corrupt("delivery state", &state))?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_status: r.try_get("last_status")?,
        last_error: r.try_get("last_error")?,
    })
}

fn worker_from_row(r: &PgRow) -> Result<WorkerRecord> {
    Ok(WorkerRecord {
        name: r.try_get("name")?,
        token_hash: r.try_get("token_hash")?,
        offer: r.try_get("offer")?,
        registered_at: r.try_get("registered_at")?,
        last_heard_at: r.try_get("last_heard_at")?,
        draining: r.try_get("draining")?,
    })
}

fn chunk_from_row(r: &PgRow) -> Result<OutputChunk> {
    Ok(OutputChunk {
        seq: r.try_get("seq")?,
        stream: OutputStream::parse(&r.try_get::<String, _>("stream")?),
        content: r.try_get("content")?,
        ts: r.try_get("ts")?,
        service: r.try_get("service")?,
    })
}

/// A run by id, locked for the rest of the caller's transaction with `lock`.
async fn get_run_in(c: &mut PgConnection, id: RunId, lock: bool) -> Result<Option<Run>> {
    let row = if lock {
        sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE id = $1 FOR UPDATE"
        ))
    } else {
        sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE id = $1"
        ))
    }
    .bind(id.to_string())
    .fetch_optional(&mut *c)
    .await?;
    row.as_ref().map(run_from_row).transpose()
}

/// The run an org created with `key` within the idempotency window.
async fn idempotent_run(c: &mut PgConnection, org: &str, key: &str) -> Result<Option<Run>> {
    let window =
        chrono::Duration::from_std(stoa_core::record::IDEMPOTENCY_WINDOW).expect("the window fits");
    let row = sqlx::query(concat!(
        "SELECT ",
        run_columns!(),
        " FROM runs WHERE org_id = $1 AND idempotency_key = $2 AND created_at >= $3 ORDER BY seq LIMIT 1"
    ))
    .bind(org)
    .bind(key)
    .bind(chrono::Utc::now() - window)
    .fetch_optional(&mut *c)
    .await?;
    row.as_ref().map(run_from_row).transpose()
}

/// Inserts a run in `pending`, with its `queued` phase, inside the caller's transaction.
async fn insert_in(c: &mut PgConnection, r: &NewRun, at: Time) -> Result<()> {
    let phases = serde_json::json!([{"phase": "queued", "at": stoa_core::time::stamp(&at)}]);
    sqlx::query(
        "INSERT INTO runs (id, org_id, status, job_type, execution_type, file_name, spec, timeout_s, created_at, phases, run_name, labels, metadata, callback_urls, price_per_hour, pending_reason, priority, idempotency_key, parent_id)
         VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    )
    .bind(r.id.to_string())
    .bind(&r.org_id.0)
    .bind(r.job_type.as_str())
    .bind(&r.execution_type)
    .bind(&r.file_name)
    .bind(&r.spec)
    .bind(r.timeout_s)
    .bind(at)
    .bind(Json(phases))
    .bind(&r.run_name)
    .bind(Json(&r.labels))
    .bind(Json(&r.metadata))
    .bind(Json(&r.callback_urls))
    .bind(r.price_per_hour)
    .bind(&r.pending_reason)
    .bind(r.priority)
    .bind(&r.idempotency_key)
    .bind(r.parent_id.map(|p| p.to_string()))
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Locks the org's pending count for the rest of the caller's transaction (so inserts
/// of one org are checked one after the other, whichever server makes them) and
/// returns it.
async fn lock_org_pending(c: &mut PgConnection, org: &OrgId) -> Result<usize> {
    sqlx::query(
        "INSERT INTO org_pending (org_id, pending) VALUES ($1, 0) ON CONFLICT (org_id) DO NOTHING",
    )
    .bind(&org.0)
    .execute(&mut *c)
    .await?;
    let n: i64 = sqlx::query_scalar("SELECT pending FROM org_pending WHERE org_id = $1 FOR UPDATE")
        .bind(&org.0)
        .fetch_one(&mut *c)
        .await?;
    Ok(n.max(0) as usize)
}

/// A fresh lease token.
fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `ttl` from `at`.
fn after(at: Time, ttl: Duration) -> Time {
    at + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(365))
}

/// A `{phase, at}` entry of the timeline.
fn phase(name: &str, at: &Time) -> Json<serde_json::Value> {
    Json(serde_json::json!([{"phase": name, "at": stoa_core::time::stamp(at)}]))
}

/// Moves a run to `to` when the state machine (and, with a token, its lease) allows it,
/// with its timestamps and timeline; an end also writes the callback outbox and gives
/// the lease up. Inside the caller's transaction, holding the run's row lock.
async fn transition_in(
    c: &mut PgConnection,
    id: RunId,
    to: RunStatus,
    data: &TransitionData,
) -> Result<Option<Run>> {
    let Some(cur) = get_run_in(c, id, true).await? else {
        return Ok(None);
    };
    if crate::repeats_running(&cur, to, data) {
        return Ok(Some(cur));
    }
    if !stoa_core::can_transition(cur.status, to) {
        return Ok(None);
    }
    if let Some(token) = &data.lease_token
        && cur.lease.as_ref().map(|l| &l.token) != Some(token)
    {
        return Ok(None);
    }
    let at = stoa_core::time::now();
    let started = (to == RunStatus::Running).then_some(at);
    let ended = to.is_terminal().then_some(at);
    let row = sqlx::query(concat!(
        "UPDATE runs SET status = $2,
            job_start = COALESCE(job_start, $3),
            job_end = COALESCE($4, job_end),
            return_code = COALESCE($5, return_code),
            error = COALESCE($6, error),
            timed_out = timed_out OR $7,
            worker_id = COALESCE($8, worker_id),
            pgid = CASE WHEN $4::timestamptz IS NOT NULL THEN NULL ELSE COALESCE($9, pgid) END,
            lease_token = CASE WHEN $4::timestamptz IS NOT NULL THEN NULL ELSE lease_token END,
            lease_expires_at = CASE WHEN $4::timestamptz IS NOT NULL THEN NULL ELSE lease_expires_at END,
            control = CASE WHEN $4::timestamptz IS NOT NULL THEN NULL ELSE control END,
            pending_reason = NULL,
            phases = phases || $10
         WHERE id = $1
         RETURNING ",
        run_columns!()
    ))
    .bind(id.to_string())
    .bind(to.as_str())
    .bind(started)
    .bind(ended)
    .bind(data.return_code)
    .bind(&data.error)
    .bind(data.timed_out)
    .bind(&data.worker_id)
    .bind(data.pgid)
    .bind(phase(stoa_core::record::phase_for(to), &at))
    .fetch_optional(&mut *c)
    .await?;
    let run = row.as_ref().map(run_from_row).transpose()?;
    if let Some(r) = &run {
        notify(c, &r.id, "state").await?;
        if to.is_terminal() {
            // The outbox: deliveries are written with the state that triggers them.
            let payload = r.callback_payload();
            for url in &r.callback_urls {
                sqlx::query(
                    "INSERT INTO callback_deliveries (run_id, org_id, url, payload, next_attempt_at, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $5, $5)",
                )
                .bind(r.id.to_string())
                .bind(&r.org_id.0)
                .bind(url)
                .bind(&payload)
                .bind(at)
                .execute(&mut *c)
                .await?;
            }
        }
    }
    Ok(run)
}

/// Tells every server listening (at commit) that run `id` changed: `what` is `state`
/// or `output`. Only the id travels (and the sending process, the connection's
/// `application_name`); readers load what changed from the store.
async fn notify(c: &mut PgConnection, id: &RunId, what: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2 || ':' || current_setting('application_name'))")
        .bind(feed::CHANNEL)
        .bind(format!("{what}:{id}"))
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// Appends output to run `rid` inside the caller's transaction, counting its bytes;
/// returns the seq of the last chunk. Nothing is written for a deleted run. The count's
/// update locks the run's row first, so two writers number one after the other.
async fn append_in(c: &mut PgConnection, rid: &str, chunks: &[OutputPiece]) -> Result<i64> {
    let bytes: usize = chunks.iter().map(|p| p.content.len()).sum();
    let counted = sqlx::query("UPDATE runs SET output_bytes = output_bytes + $2 WHERE id = $1")
        .bind(rid)
        .bind(bytes as i64)
        .execute(&mut *c)
        .await?
        .rows_affected();
    let last = last_seq(c, rid).await?;
    if counted == 0 {
        // The run was deleted: rows written now would outlive its purge.
        return Ok(last);
    }
    let at = stoa_core::time::now();
    let n = chunks.len() as i64;
    let streams: Vec<&str> = chunks.iter().map(|p| p.stream.as_str()).collect();
    let contents: Vec<&str> = chunks.iter().map(|p| p.content.as_str()).collect();
    let services: Vec<Option<&str>> = chunks.iter().map(|p| p.service.as_deref()).collect();
    // One statement for the batch: numbered from `last + 1` in order.
    sqlx::query(
        "INSERT INTO run_output (run_id, seq, stream, content, ts, service)
         SELECT $1, $2 + t.ord, t.stream, t.content, $3, t.service
         FROM unnest($4::text[], $5::text[], $6::text[]) WITH ORDINALITY AS t(stream, content, service, ord)",
    )
    .bind(rid)
    .bind(last)
    .bind(at)
    .bind(&streams)
    .bind(&contents)
    .bind(&services)
    .execute(&mut *c)
    .await?;
    if let Ok(id) = rid.parse::<RunId>() {
        notify(c, &id, "output").await?;
    }
    Ok(last + n)
}

/// The seq of the run's last stored output chunk (0 when none).
async fn last_seq(c: &mut PgConnection, rid: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar(
            "SELECT COALESCE(MAX(seq), 0)::bigint FROM run_output WHERE run_id = $1",
        )
        .bind(rid)
        .fetch_one(&mut *c)
        .await?,
    )
}

/// What goes with a run whose row was just deleted: samples and deliveries now, its
/// output later (it may have millions of rows), by `purge_orphan_output`.
async fn forget_run(c: &mut PgConnection, rid: &str) -> Result<()> {
    for sql in [
        "DELETE FROM callback_deliveries WHERE run_id = $1",
        "DELETE FROM run_samples WHERE run_id = $1",
        "DELETE FROM run_gpu_samples WHERE run_id = $1",
        "INSERT INTO output_purge (run_id, deleted_at)
         SELECT $1, now() WHERE EXISTS (SELECT 1 FROM run_output WHERE run_id = $1)
         ON CONFLICT (run_id) DO NOTHING",
    ] {
        sqlx::query(sql).bind(rid).execute(&mut *c).await?;
    }
    Ok(())
}

/// Deletes the first `limit` output chunks of a run; returns how many and their bytes.
async fn delete_output_head(c: &mut PgConnection, rid: &str, limit: i64) -> Result<(i64, i64)> {
    let row = sqlx::query(
        "WITH gone AS (
            DELETE FROM run_output WHERE run_id = $1
              AND seq IN (SELECT seq FROM run_output WHERE run_id = $1 ORDER BY seq LIMIT $2)
            RETURNING octet_length(content) AS bytes)
         SELECT COUNT(*)::bigint AS n, COALESCE(SUM(bytes), 0)::bigint AS bytes FROM gone",
    )
    .bind(rid)
    .bind(limit)
    .fetch_one(&mut *c)
    .await?;
    Ok((row.try_get("n")?, row.try_get("bytes")?))
}

/// Output of run $1 is readable while the run exists and its output has not expired.
macro_rules! output_readable {
    () => {
        "EXISTS (SELECT 1 FROM runs WHERE id = $1 AND NOT output_expired)"
    };
}

/// States of runs that may still write output (never pruned).
macro_rules! active {
    () => {
        "('pending', 'starting', 'running')"
    };
}

/// The `WHERE` terms of `list_runs` and `count_runs`: $1 org, $2 states (all when
/// empty), $3 label, $4 run name.
macro_rules! run_filter {
    () => {
        "org_id = $1
        AND (cardinality($2::text[]) = 0 OR status = ANY($2::text[]))
        AND ($3::text IS NULL OR labels @> jsonb_build_array($3::text))
        AND ($4::text IS NULL OR run_name = $4)
        AND ($5::text IS NULL OR job_type = $5)
        AND ($6::text IS NULL OR execution_type = $6)"
    };
}

mod deliveries;
mod keys;
mod metrics;
mod output;
mod queue;
mod runs;
mod secrets;
mod workers;

#[cfg(test)]
mod tests;
