//! The SQLite backend: one connection in WAL mode behind a mutex, used from blocking
//! tasks so the async runtime never waits on disk.
//!
//! One connection serialises writers, which is what SQLite does anyway; every method
//! is a single transaction, so `claim_next` and `transition` are atomic.
//!
//! This file holds the connection, the migrations and what several resources share
//! (row readers, the transition and output writers); each resource's operations are in
//! a file of its own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};
use stoa_core::time::stamp;
use stoa_types::{OrgId, RunId, RunStatus};

#[allow(unused_imports)]
use crate::prelude::*;
use crate::{
    ApiKey, Appended, DbFailure, Delivery, DeliveryState, Directive, GpuSample, Inserted, Lease,
    Migrated, NewRun, Org, OutputChunk, OutputPiece, OutputStream, Reap, Result, Run, RunControl,
    RunFilter, RunKind, Sample, Sealed, SealedRef, Secret, StoreError, StoredActive, StoredPending,
    Time, TransitionData, WorkerRecord,
};

/// Embedded migrations, applied in order at open. Never edit one that has shipped.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/sqlite/0002_secrets_callbacks.sql"),
    ),
    (
        3,
        include_str!("../../migrations/sqlite/0003_scheduling.sql"),
    ),
    (4, include_str!("../../migrations/sqlite/0004_metrics.sql")),
    (
        5,
        include_str!("../../migrations/sqlite/0005_output_service.sql"),
    ),
    (
        6,
        include_str!("../../migrations/sqlite/0006_retention.sql"),
    ),
    (7, include_str!("../../migrations/sqlite/0007_leases.sql")),
    (8, include_str!("../../migrations/sqlite/0008_workers.sql")),
    (
        9,
        include_str!("../../migrations/sqlite/0009_org_pending.sql"),
    ),
    (10, include_str!("../../migrations/sqlite/0010_slurm.sql")),
    (
        11,
        include_str!("../../migrations/sqlite/0011_runs_org_seq.sql"),
    ),
    (
        12,
        include_str!("../../migrations/sqlite/0012_key_sessions.sql"),
    ),
    (
        13,
        include_str!("../../migrations/sqlite/0013_run_ports.sql"),
    ),
];

pub use stoa_core::plane::now;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let kind = match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                rusqlite::ErrorCode::DiskFull => DbFailure::DiskFull,
                rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::DatabaseBusy => {
                    DbFailure::Unavailable
                }
                _ => DbFailure::Other,
            },
            _ => DbFailure::Other,
        };
        StoreError::Database {
            message: e.to_string(),
            kind,
        }
    }
}

/// SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    pub(crate) conn: Arc<Mutex<Connection>>,
    migrated: Migrated,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations. The
    /// database and its `-wal` and `-shm` files are its owner's only (0600).
    pub fn open(path: &Path) -> Result<Self> {
        create_private(path)?;
        let conn = Connection::open(path)?;
        let store = Self::init(conn)?;
        // SQLite gives the files it makes the database's mode; those left by an
        // earlier version may have another.
        chmod_private(path)?;
        Ok(store)
    }

    /// The schema versions before and after the migrations that ran at open.
    pub fn migrated(&self) -> Migrated {
        self.migrated
    }

    fn init(mut conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode is durable across application crashes; only a power loss
        // can drop the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let migrated = migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            migrated,
        })
    }

    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let started = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
        crate::record_op(started.elapsed());
        r
    }
}

/// Creates the database file 0600 when it is missing (SQLite would follow the umask).
/// Only before the connection opens: closing any descriptor of the database file
/// drops this process's POSIX locks on it, and SQLite's with them.
fn create_private(db: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if db.exists() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(db)
        .map(drop)
        .map_err(|source| StoreError::Io {
            path: db.to_path_buf(),
            source,
        })
}

/// Sets 0600 on the database and its `-wal` and `-shm` files where they exist, by path
/// (never opening them: see [`create_private`]).
fn chmod_private(db: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r.map_err(|source| StoreError::Io {
                path: db.to_path_buf(),
                source,
            })?,
        }
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<Migrated> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    let applied: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for (version, sql) in MIGRATIONS {
        if *version <= applied {
            continue;
        }
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|e| StoreError::Migration {
            version: *version,
            message: e.to_string(),
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now()],
        )?;
        tx.commit()?;
    }
    let to = MIGRATIONS.last().map_or(applied, |(v, _)| applied.max(*v));
    Ok(Migrated { from: applied, to })
}

const RUN_COLUMNS: &str = "id, org_id, status, job_type, execution_type, file_name, spec, timeout_s, created_at, job_start, job_end, return_code, error, timed_out, pending_reason, phases, worker_id, pgid, run_name, labels, metadata, callback_urls, output_truncated, price_per_hour, priority, parent_id, gpu_ids, seq, output_expired, lease_token, lease_expires_at, lease_heard_at, attempt, control, slurm_job_id, ports";

fn corrupt(what: &str, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("{what}: {e}").into(),
    )
}

/// A time column (RFC 3339 text, as [`stamp`] writes it).
fn time_at(row: &Row, idx: usize) -> rusqlite::Result<Time> {
    let s: String = row.get(idx)?;
    stoa_core::time::parse(&s).ok_or_else(|| corrupt("time", &s))
}

/// A time column that may be NULL.
fn opt_time_at(row: &Row, idx: usize) -> rusqlite::Result<Option<Time>> {
    row.get::<_, Option<String>>(idx)?
        .map(|s| stoa_core::time::parse(&s).ok_or_else(|| corrupt("time", &s)))
        .transpose()
}

fn json_col<T: serde::de::DeserializeOwned>(
    row: &Row,
    idx: usize,
    what: &str,
) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s).map_err(|e| corrupt(what, e))
}

fn run_from_row(row: &Row) -> rusqlite::Result<Run> {
    let id: String = row.get(0)?;
    let status: String = row.get(2)?;
    let phases: Vec<serde_json::Value> = json_col(row, 15, "phases")?;
    Ok(Run {
        id: id.parse().map_err(|e| corrupt("run id", e))?,
        org_id: OrgId(row.get(1)?),
        status: status.parse().map_err(|e| corrupt("status", e))?,
        job_type: {
            let k: String = row.get(3)?;
            RunKind::parse(&k).ok_or_else(|| corrupt("run kind", &k))?
        },
        execution_type: row.get(4)?,
        file_name: row.get(5)?,
        spec: row.get(6)?,
        timeout_s: row.get(7)?,
        created_at: time_at(row, 8)?,
        job_start: opt_time_at(row, 9)?,
        job_end: opt_time_at(row, 10)?,
        return_code: row.get(11)?,
        error: row.get(12)?,
        timed_out: row.get(13)?,
        pending_reason: row.get(14)?,
        phases: phases
            .iter()
            .map(|p| {
                let at = p["at"].as_str().unwrap_or_default();
                Ok((
                    p["phase"].as_str().unwrap_or_default().to_string(),
                    stoa_core::time::parse(at).ok_or_else(|| corrupt("phase time", at))?,
                ))
            })
            .collect::<rusqlite::Result<_>>()?,
        worker_id: row.get(16)?,
        pgid: row.get(17)?,
        run_name: row.get(18)?,
        labels: json_col(row, 19, "labels")?,
        metadata: json_col(row, 20, "metadata")?,
        callback_urls: json_col(row, 21, "callback_urls")?,
        output_truncated: row.get(22)?,
        price_per_hour: row.get(23)?,
        priority: row.get(24)?,
        parent_id: row
            .get::<_, Option<String>>(25)?
            .map(|p| p.parse().map_err(|e| corrupt("parent id", e)))
            .transpose()?,
        gpu_ids: json_col(row, 26, "gpu_ids")?,
        seq: row.get(27)?,
        output_expired: row.get(28)?,
        lease: row
            .get::<_, Option<String>>(29)?
            .map(|token| -> rusqlite::Result<Lease> {
                Ok(Lease {
                    token,
                    expires_at: time_at(row, 30)?,
                    heard_at: time_at(row, 31)?,
                    attempt: row.get(32)?,
                })
            })
            .transpose()?,
        control: row
            .get::<_, Option<String>>(33)?
            .and_then(|c| RunControl::parse(&c)),
        slurm_job_id: row.get(34)?,
        ports: json_col(row, 35, "ports")?,
    })
}

fn org_from_row(row: &Row) -> rusqlite::Result<Org> {
    Ok(Org {
        id: OrgId(row.get(0)?),
        slug: row.get(1)?,
        name: row.get(2)?,
        created_at: time_at(row, 3)?,
    })
}

fn key_from_row(row: &Row) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: row.get(0)?,
        org_id: OrgId(row.get(1)?),
        name: row.get(2)?,
        prefix: row.get(3)?,
        hash: row.get(4)?,
        is_admin: row.get(5)?,
        is_active: row.get(6)?,
        created_at: time_at(row, 7)?,
        last_used_at: opt_time_at(row, 8)?,
        sessions_after: opt_time_at(row, 9)?,
    })
}

const KEY_COLUMNS: &str = "k.id, k.org_id, k.name, k.prefix, k.hash, k.is_admin, k.is_active, k.created_at, k.last_used_at, k.sessions_after";

fn get_run_sync(c: &Connection, id: RunId) -> rusqlite::Result<Option<Run>> {
    c.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?
        .query_row([id.to_string()], run_from_row)
        .optional()
}

fn secret_from_row(r: &Row) -> rusqlite::Result<Secret> {
    Ok(Secret {
        id: r.get(0)?,
        org_id: OrgId(r.get(1)?),
        name: r.get(2)?,
        sealed: Sealed {
            ciphertext: r.get(3)?,
            nonce: r.get(4)?,
            key_id: r.get(5)?,
        },
        is_secret: r.get(6)?,
        created_at: time_at(r, 7)?,
        updated_at: time_at(r, 8)?,
    })
}

const SECRET_COLUMNS: &str =
    "id, org_id, name, ciphertext, nonce, key_id, is_secret, created_at, updated_at";

fn delivery_from_row(r: &Row) -> rusqlite::Result<Delivery> {
    let run: String = r.get(1)?;
    Ok(Delivery {
        id: r.get(0)?,
        run_id: run.parse().map_err(|e| corrupt("run id", e))?,
        org_id: OrgId(r.get(2)?),
        url: r.get(3)?,
        payload: r.get(4)?,
        state: {
            let s: String = r.get(5)?;
            DeliveryState::parse(&s).ok_or_else(|| corrupt("delivery state", &s))?
        },
        attempts: r.get(6)?,
        next_attempt_at: time_at(r, 7)?,
        last_status: r.get(8)?,
        last_error: r.get(9)?,
    })
}

const DELIVERY_COLUMNS: &str =
    "id, run_id, org_id, url, payload, state, attempts, next_attempt_at, last_status, last_error";

/// The run an org created with `key` within the last 24 hours.
fn idempotent_run(c: &Connection, org: &str, key: &str) -> rusqlite::Result<Option<Run>> {
    let window =
        chrono::Duration::from_std(stoa_core::record::IDEMPOTENCY_WINDOW).expect("the window fits");
    let cutoff = (chrono::Utc::now() - window).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    c.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE org_id = ?1 AND idempotency_key = ?2 AND created_at >= ?3 ORDER BY seq LIMIT 1"
    ))?
    .query_row(params![org, key, cutoff], run_from_row)
    .optional()
}

/// The `WHERE` terms of `list_runs` and `count_runs`: ?1 org, ?2 states (JSON list, all
/// when empty), ?5 label, ?6 run name.
const RUN_FILTER: &str = "org_id = ?1
    AND (?2 = '[]' OR status IN (SELECT value FROM json_each(?2)))
    AND (?5 IS NULL OR EXISTS (SELECT 1 FROM json_each(labels) WHERE value = ?5))
    AND (?6 IS NULL OR run_name = ?6)
    AND (?7 IS NULL OR job_type = ?7)
    AND (?8 IS NULL OR execution_type = ?8)";

/// Output of run ?1 is readable while the run exists and its output has not expired:
/// rows of a deleted run wait for their purge, those of an expiring run go in batches,
/// and no reader sees either.
const OUTPUT_READABLE: &str = "EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND output_expired = 0)";

/// States of runs that may still write output (never pruned).
const ACTIVE: &str = "('pending', 'starting', 'running')";

/// What goes with a run whose row was just deleted: samples and deliveries now (a run
/// has few), its output later (it may have millions of rows), by
/// `purge_orphan_output`.
/// Inserts a run in `pending`, with its `queued` phase, inside the caller's transaction.
fn insert_sync(tx: &Connection, r: &NewRun, at: &str) -> rusqlite::Result<()> {
    let phases = serde_json::json!([{"phase": "queued", "at": at}]).to_string();
    tx.prepare_cached(
        "INSERT INTO runs (id, org_id, status, job_type, execution_type, file_name, spec, timeout_s, created_at, phases, run_name, labels, metadata, callback_urls, price_per_hour, pending_reason, priority, idempotency_key, parent_id)
         VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )?
    .execute(params![
        r.id.to_string(),
        r.org_id.0,
        r.job_type.as_str(),
        r.execution_type,
        r.file_name,
        r.spec,
        r.timeout_s,
        at,
        phases,
        r.run_name,
        serde_json::to_string(&r.labels).expect("strings serialise"),
        serde_json::to_string(&r.metadata).expect("strings serialise"),
        serde_json::to_string(&r.callback_urls).expect("strings serialise"),
        r.price_per_hour,
        r.pending_reason,
        r.priority,
        r.idempotency_key,
        r.parent_id.map(|p| p.to_string()),
    ])?;
    Ok(())
}

/// The org's pending runs when `n` more would take it past `max` (inside the caller's
/// transaction, so concurrent inserts see each other).
fn over_limit(
    tx: &Connection,
    org: &OrgId,
    n: usize,
    max: usize,
) -> rusqlite::Result<Option<usize>> {
    if max == usize::MAX {
        return Ok(None);
    }
    // Kept by triggers (migration 0009): constant time however long the queue.
    let queued: i64 = tx
        .prepare_cached("SELECT pending FROM org_pending WHERE org_id = ?1")?
        .query_row([&org.0], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let queued = queued.max(0) as usize;
    Ok((queued.saturating_add(n) > max).then_some(queued))
}

/// A fresh lease token.
fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `ttl` from now, as stored (RFC 3339 UTC with microseconds, which sorts as text).
fn after(ttl: Duration) -> String {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(365));
    (chrono::Utc::now() + ttl).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Moves a run to `to` when the state machine (and, with a token, its lease) allows it,
/// with its timestamps and timeline; an end also writes the callback outbox and gives
/// the lease up. Inside the caller's transaction.
fn transition_sync(
    tx: &Connection,
    id: RunId,
    to: RunStatus,
    data: &TransitionData,
) -> rusqlite::Result<Option<Run>> {
    let Some(cur) = get_run_sync(tx, id)? else {
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
    let at = now();
    let started = (to == RunStatus::Running).then(|| at.clone());
    let ended = to.is_terminal().then(|| at.clone());
    tx.execute(
        "UPDATE runs SET status = ?2,
            job_start = COALESCE(job_start, ?3),
            job_end = COALESCE(?4, job_end),
            return_code = COALESCE(?5, return_code),
            error = COALESCE(?6, error),
            timed_out = MAX(timed_out, ?7),
            worker_id = COALESCE(?8, worker_id),
            pgid = CASE WHEN ?4 IS NOT NULL THEN NULL ELSE COALESCE(?9, pgid) END,
            lease_token = CASE WHEN ?4 IS NOT NULL THEN NULL ELSE lease_token END,
            lease_expires_at = CASE WHEN ?4 IS NOT NULL THEN NULL ELSE lease_expires_at END,
            control = CASE WHEN ?4 IS NOT NULL THEN NULL ELSE control END,
            pending_reason = NULL,
            phases = json_insert(phases, '$[#]', json_object('phase', ?10, 'at', ?11))
         WHERE id = ?1",
        params![
            id.to_string(),
            to.as_str(),
            started,
            ended,
            data.return_code,
            data.error,
            data.timed_out,
            data.worker_id,
            data.pgid,
            stoa_core::record::phase_for(to),
            at,
        ],
    )?;
    let run = get_run_sync(tx, id)?;
    if let Some(r) = &run
        && to.is_terminal()
    {
        // The outbox: deliveries are written with the state that triggers them.
        let payload = r.callback_payload();
        for url in &r.callback_urls {
            tx.execute(
                "INSERT INTO callback_deliveries (run_id, org_id, url, payload, next_attempt_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)",
                params![r.id.to_string(), r.org_id.0, url, payload, at],
            )?;
        }
    }
    Ok(run)
}

/// Appends output to run `rid` inside the caller's transaction, counting its bytes;
/// returns the seq of the last chunk. Nothing is written for a deleted run.
fn append_sync(tx: &Connection, rid: &str, chunks: &[OutputPiece]) -> rusqlite::Result<i64> {
    let mut last: i64 = tx.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM run_output WHERE run_id = ?1",
        [rid],
        |r| r.get(0),
    )?;
    let bytes: usize = chunks.iter().map(|p| p.content.len()).sum();
    let counted = tx
        .prepare_cached("UPDATE runs SET output_bytes = output_bytes + ?2 WHERE id = ?1")?
        .execute(params![rid, bytes as i64])?;
    if counted == 0 {
        // The run was deleted: rows written now would outlive its purge.
        return Ok(last);
    }
    let at = now();
    let mut st = tx.prepare_cached(
        "INSERT INTO run_output (run_id, seq, stream, content, ts, service) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for p in chunks {
        last += 1;
        st.execute(params![
            rid,
            last,
            p.stream.as_str(),
            p.content,
            at,
            p.service
        ])?;
    }
    Ok(last)
}

fn worker_from_row(r: &Row) -> rusqlite::Result<WorkerRecord> {
    Ok(WorkerRecord {
        name: r.get(0)?,
        token_hash: r.get(1)?,
        offer: r.get(2)?,
        registered_at: time_at(r, 3)?,
        last_heard_at: time_at(r, 4)?,
        draining: r.get(5)?,
    })
}

fn forget_run(tx: &Connection, rid: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM callback_deliveries WHERE run_id = ?1")?
        .execute([rid])?;
    tx.prepare_cached("DELETE FROM run_samples WHERE run_id = ?1")?
        .execute([rid])?;
    tx.prepare_cached("DELETE FROM run_gpu_samples WHERE run_id = ?1")?
        .execute([rid])?;
    tx.prepare_cached(
        "INSERT OR IGNORE INTO output_purge (run_id, deleted_at)
         SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM run_output WHERE run_id = ?1)",
    )?
    .execute(params![rid, now()])?;
    Ok(())
}

/// Deletes the first `limit` output chunks of a run; returns how many and their bytes.
fn delete_output_head(tx: &Connection, rid: &str, limit: i64) -> rusqlite::Result<(i64, i64)> {
    let mut st = tx.prepare_cached(
        "DELETE FROM run_output WHERE run_id = ?1
           AND seq IN (SELECT seq FROM run_output WHERE run_id = ?1 ORDER BY seq LIMIT ?2)
         RETURNING octet_length(content)",
    )?;
    let mut rows = st.query(params![rid, limit])?;
    let (mut n, mut bytes) = (0, 0);
    while let Some(r) = rows.next()? {
        n += 1;
        bytes += r.get::<_, i64>(0)?;
    }
    Ok((n, bytes))
}

impl SqliteStore {
    /// Moves a run's creation, start and end times (and those of its output) back to
    /// `at`, as if it had run then. For tests of retention only.
    #[doc(hidden)]
    pub async fn backdate_run(&self, id: RunId, at: Time) -> Result<()> {
        let at = stamp(&at);
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE runs SET created_at = ?2, job_start = CASE WHEN job_start IS NULL THEN NULL ELSE ?2 END,
                    job_end = CASE WHEN job_end IS NULL THEN NULL ELSE ?2 END WHERE id = ?1",
                params![id.to_string(), at],
            )?;
            tx.execute(
                "UPDATE run_output SET ts = ?2 WHERE run_id = ?1",
                params![id.to_string(), at],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn chunk_from_row(r: &Row) -> rusqlite::Result<OutputChunk> {
    Ok(OutputChunk {
        seq: r.get(0)?,
        stream: OutputStream::parse(&r.get::<_, String>(1)?),
        content: r.get(2)?,
        ts: time_at(r, 3)?,
        service: r.get(4)?,
    })
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
