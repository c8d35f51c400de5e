//! The SQLite backend: one connection in WAL mode behind a mutex, used from blocking
//! tasks so the async runtime never waits on disk.
//!
//! One connection serialises writers, which is what SQLite does anyway; every method
//! is a single transaction, so `claim_next` and `transition` are atomic.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};
use stoa_types::{OrgId, RunId, RunStatus};

use crate::{
    ApiKey, Appended, Delivery, Directive, GpuSample, Lease, NewRun, Org, OutputChunk, OutputPiece,
    OutputStream, Reap, Result, Run, RunControl, RunFilter, Sample, Sealed, SealedRef, Secret,
    Store, StoreError, TransitionData, WorkerRecord,
};

/// Embedded migrations, applied in order at open. Never edit one that has shipped.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_secrets_callbacks.sql")),
    (3, include_str!("../migrations/0003_scheduling.sql")),
    (4, include_str!("../migrations/0004_metrics.sql")),
    (5, include_str!("../migrations/0005_output_service.sql")),
    (6, include_str!("../migrations/0006_retention.sql")),
    (7, include_str!("../migrations/0007_leases.sql")),
    (8, include_str!("../migrations/0008_workers.sql")),
];

pub use stoa_core::plane::now;

/// SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
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

    fn init(mut conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode is durable across application crashes; only a power loss
        // can drop the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
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

fn migrate(conn: &mut Connection) -> Result<()> {
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
        tx.execute_batch(sql)
            .map_err(|source| StoreError::Migration {
                version: *version,
                source,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now()],
        )?;
        tx.commit()?;
    }
    Ok(())
}

const RUN_COLUMNS: &str = "id, org_id, status, job_type, execution_type, file_name, spec, timeout_s, created_at, job_start, job_end, return_code, error, timed_out, pending_reason, phases, worker_id, pgid, run_name, labels, metadata, callback_urls, output_truncated, price_per_hour, priority, parent_id, gpu_ids, seq, output_expired, lease_token, lease_expires_at, lease_heard_at, attempt, control";

fn corrupt(what: &str, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("{what}: {e}").into(),
    )
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
        job_type: row.get(3)?,
        execution_type: row.get(4)?,
        file_name: row.get(5)?,
        spec: row.get(6)?,
        timeout_s: row.get(7)?,
        created_at: row.get(8)?,
        job_start: row.get(9)?,
        job_end: row.get(10)?,
        return_code: row.get(11)?,
        error: row.get(12)?,
        timed_out: row.get(13)?,
        pending_reason: row.get(14)?,
        phases: phases
            .iter()
            .map(|p| {
                (
                    p["phase"].as_str().unwrap_or_default().to_string(),
                    p["at"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
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
                    expires_at: row.get::<_, Option<String>>(30)?.unwrap_or_default(),
                    heard_at: row.get::<_, Option<String>>(31)?.unwrap_or_default(),
                    attempt: row.get(32)?,
                })
            })
            .transpose()?,
        control: row
            .get::<_, Option<String>>(33)?
            .and_then(|c| RunControl::parse(&c)),
    })
}

fn org_from_row(row: &Row) -> rusqlite::Result<Org> {
    Ok(Org {
        id: OrgId(row.get(0)?),
        slug: row.get(1)?,
        name: row.get(2)?,
        created_at: row.get(3)?,
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
        created_at: row.get(7)?,
        last_used_at: row.get(8)?,
    })
}

const KEY_COLUMNS: &str = "k.id, k.org_id, k.name, k.prefix, k.hash, k.is_admin, k.is_active, k.created_at, k.last_used_at";

fn get_run_sync(c: &Connection, id: RunId) -> rusqlite::Result<Option<Run>> {
    c.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?
        .query_row([id.to_string()], run_from_row)
        .optional()
}

/// The JSON body of a run's completion callback.
pub fn callback_payload(r: &Run) -> String {
    serde_json::json!({
        "execution_id": r.id.to_string(),
        "status": r.status.as_str(),
        "return_code": r.return_code,
        "error": r.error,
        "execution_type": r.execution_type,
        "hardware_profile": r.execution_type,
        "job_type": r.job_type,
        "created_at": r.created_at,
        "job_start": r.job_start,
        "job_end": r.job_end,
        "run_name": r.run_name,
        "labels": r.labels,
        "metadata": r.metadata,
    })
    .to_string()
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
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
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
        state: r.get(5)?,
        attempts: r.get(6)?,
        next_attempt_at: r.get(7)?,
        last_status: r.get(8)?,
        last_error: r.get(9)?,
    })
}

const DELIVERY_COLUMNS: &str =
    "id, run_id, org_id, url, payload, state, attempts, next_attempt_at, last_status, last_error";

/// The run an org created with `key` within the last 24 hours.
fn idempotent_run(c: &Connection, org: &str, key: &str) -> rusqlite::Result<Option<Run>> {
    let cutoff = (chrono::Utc::now() - chrono::Duration::hours(24))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    c.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE org_id = ?1 AND idempotency_key = ?2 AND created_at >= ?3 ORDER BY seq LIMIT 1"
    ))?
    .query_row(params![org, key, cutoff], run_from_row)
    .optional()
}

/// The phase a transition into `to` records in the timeline.
fn phase_for(to: RunStatus) -> &'static str {
    match to {
        RunStatus::Pending => "queued",
        RunStatus::Starting => "placed",
        RunStatus::Running => "started",
        _ => "ended",
    }
}

/// The `WHERE` terms of `list_runs` and `count_runs`: ?1 org, ?2 states (JSON list, all
/// when empty), ?5 label, ?6 run name.
const RUN_FILTER: &str = "org_id = ?1
    AND (?2 = '[]' OR status IN (SELECT value FROM json_each(?2)))
    AND (?5 IS NULL OR EXISTS (SELECT 1 FROM json_each(labels) WHERE value = ?5))
    AND (?6 IS NULL OR run_name = ?6)";

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
        r.job_type,
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
            phase_for(to),
            at,
        ],
    )?;
    let run = get_run_sync(tx, id)?;
    if let Some(r) = &run
        && to.is_terminal()
    {
        // The outbox: deliveries are written with the state that triggers them.
        let payload = callback_payload(r);
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
        registered_at: r.get(3)?,
        last_heard_at: r.get(4)?,
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
    pub async fn backdate_run(&self, id: RunId, at: &str) -> Result<()> {
        let at = at.to_string();
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

#[async_trait]
impl Store for SqliteStore {
    async fn create_org(&self, slug: &str, name: &str) -> Result<Org> {
        let org = Org {
            id: OrgId(format!("org_{}", uuid::Uuid::now_v7().simple())),
            slug: slug.to_string(),
            name: name.to_string(),
            created_at: now(),
        };
        let o = org.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO orgs (id, slug, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![o.id.0, o.slug, o.name, o.created_at],
            )?;
            Ok(())
        })
        .await?;
        Ok(org)
    }

    async fn get_org(&self, id: &OrgId) -> Result<Option<Org>> {
        let id = id.0.clone();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id, slug, name, created_at FROM orgs WHERE id = ?1",
                [id],
                org_from_row,
            )
            .optional()?)
        })
        .await
    }

    async fn find_org(&self, slug_or_id: &str) -> Result<Option<Org>> {
        let s = slug_or_id.to_string();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id, slug, name, created_at FROM orgs WHERE id = ?1 OR slug = ?1",
                [s],
                org_from_row,
            )
            .optional()?)
        })
        .await
    }

    async fn list_orgs(&self) -> Result<Vec<Org>> {
        self.call(|c| {
            let mut st =
                c.prepare("SELECT id, slug, name, created_at FROM orgs ORDER BY created_at")?;
            let rows = st
                .query_map([], org_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_key(&self, key: &ApiKey) -> Result<()> {
        let k = key.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO api_keys (id, org_id, name, prefix, hash, is_admin, is_active, created_at, last_used_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![k.id, k.org_id.0, k.name, k.prefix, k.hash, k.is_admin, k.is_active, k.created_at, k.last_used_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<(ApiKey, Org)>> {
        let h = hash.to_string();
        self.call(move |c| {
            Ok(c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS}, o.id, o.slug, o.name, o.created_at FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.hash = ?1 AND k.is_active = 1"
                ))?
                .query_row([h], |r| {
                    let key = key_from_row(r)?;
                    let org = Org {
                        id: OrgId(r.get(9)?),
                        slug: r.get(10)?,
                        name: r.get(11)?,
                        created_at: r.get(12)?,
                    };
                    Ok((key, org))
                })
                .optional()?)
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.call(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys k ORDER BY k.created_at"
            ))?;
            let rows = st
                .query_map([], key_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn revoke_key(&self, id_or_prefix: &str) -> Result<bool> {
        let s = id_or_prefix.to_string();
        self.call(move |c| {
            let n = c.execute(
                "UPDATE api_keys SET is_active = 0 WHERE is_active = 1 AND (id = ?1 OR prefix = ?1)",
                [s],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn count_keys(&self) -> Result<i64> {
        self.call(|c| Ok(c.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?))
            .await
    }

    async fn touch_key(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn insert_run(&self, run: &NewRun) -> Result<Option<Run>> {
        let r = run.clone();
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let at = now();
            if let Some(key) = &r.idempotency_key {
                let existing = idempotent_run(&tx, &r.org_id.0, key)?;
                if existing.is_some() {
                    return Ok(existing);
                }
            }
            insert_sync(&tx, &r, &at)?;
            tx.commit()?;
            Ok(None)
        })
        .await
    }

    async fn insert_selection(&self, parent: &NewRun, children: &[NewRun]) -> Result<()> {
        let (parent, children) = (parent.clone(), children.to_vec());
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let at = now();
            insert_sync(&tx, &parent, &at)?;
            tx.execute(
                "UPDATE runs SET status = 'starting', worker_id = 'coordinator', pending_reason = NULL,
                    phases = json_insert(phases, '$[#]', json_object('phase', 'placed', 'at', ?2))
                 WHERE id = ?1",
                params![parent.id.to_string(), at],
            )?;
            transition_sync(&tx, parent.id, RunStatus::Running, &TransitionData::default())?;
            for child in &children {
                insert_sync(&tx, child, &at)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn run_by_idempotency_key(&self, org: &OrgId, key: &str) -> Result<Option<Run>> {
        let org = org.0.clone();
        let key = key.to_string();
        self.call(move |c| Ok(idempotent_run(c, &org, &key)?)).await
    }

    async fn claim(
        &self,
        id: RunId,
        worker_id: &str,
        gpu_ids: &[String],
        lease: Option<Duration>,
    ) -> Result<Option<Run>> {
        let w = worker_id.to_string();
        let gpus = serde_json::to_string(gpu_ids).expect("strings serialise");
        self.call(move |c| {
            let at = now();
            let (token, expires) = match lease {
                Some(ttl) => (Some(new_token()), Some(after(ttl))),
                None => (None, None),
            };
            Ok(c.prepare_cached(&format!(
                "UPDATE runs SET status = 'starting', worker_id = ?2, pending_reason = NULL, gpu_ids = ?3,
                    phases = json_insert(phases, '$[#]', json_object('phase', 'placed', 'at', ?4)),
                    lease_token = ?5, lease_expires_at = ?6, lease_heard_at = ?4,
                    attempt = attempt + 1, control = NULL
                 WHERE id = ?1 AND status = 'pending'
                 RETURNING {RUN_COLUMNS}"
            ))?
            .query_row(params![id.to_string(), w, gpus, at, token, expires], run_from_row)
            .optional()?)
        })
        .await
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        leases: &[(RunId, String)],
        ttl: Duration,
    ) -> Result<Vec<(RunId, Directive)>> {
        let w = worker_id.to_string();
        let leases = leases.to_vec();
        self.call(move |c| {
            let tx = c.transaction()?;
            let (at, expires) = (now(), after(ttl));
            let mut out = Vec::with_capacity(leases.len());
            {
                let mut st = tx.prepare_cached(
                    "UPDATE runs SET lease_expires_at = ?4, lease_heard_at = ?5
                     WHERE id = ?1 AND lease_token = ?2 AND worker_id = ?3
                       AND status IN ('starting', 'running')
                     RETURNING control",
                )?;
                for (id, token) in &leases {
                    let control = st
                        .query_row(params![id.to_string(), token, w, expires, at], |r| {
                            r.get::<_, Option<String>>(0)
                        })
                        .optional()?;
                    let d = match control {
                        None => Directive::Lost,
                        Some(c) => match c.as_deref().and_then(RunControl::parse) {
                            Some(c) => Directive::Control(c),
                            None => Directive::Continue,
                        },
                    };
                    out.push((*id, d));
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn lease_held(&self, id: RunId, token: &str) -> Result<bool> {
        let token = token.to_string();
        self.call(move |c| {
            Ok(c.prepare_cached(
                "SELECT 1 FROM runs WHERE id = ?1 AND lease_token = ?2
                   AND status IN ('starting', 'running')",
            )?
            .query_row(params![id.to_string(), token], |_| Ok(()))
            .optional()?
            .is_some())
        })
        .await
    }

    async fn request_control(&self, id: RunId, control: RunControl) -> Result<Option<Run>> {
        self.call(move |c| {
            Ok(c.prepare_cached(&format!(
                "UPDATE runs SET control = CASE WHEN control = 'abort' THEN control ELSE ?2 END
                 WHERE id = ?1 AND status IN ('starting', 'running')
                 RETURNING {RUN_COLUMNS}"
            ))?
            .query_row(params![id.to_string(), control.to_stored()], run_from_row)
            .optional()?)
        })
        .await
    }

    async fn reap(&self, scope: Reap<'_>) -> Result<Vec<Run>> {
        let (worker, reason, except) = match scope {
            Reap::Expired { except } => (None, None, except.map(str::to_string)),
            Reap::Worker { worker, reason } => {
                (Some(worker.to_string()), Some(reason.to_string()), None)
            }
        };
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let ids: Vec<String> = match &worker {
                None => tx
                    .prepare_cached(
                        "SELECT id FROM runs WHERE lease_token IS NOT NULL AND lease_expires_at < ?1
                           AND status IN ('starting', 'running')
                           AND (?2 IS NULL OR worker_id IS NOT ?2) ORDER BY seq",
                    )?
                    .query_map(params![now(), except], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?,
                Some(w) => tx
                    .prepare_cached(
                        "SELECT id FROM runs WHERE worker_id = ?1
                           AND status IN ('starting', 'running') ORDER BY seq",
                    )?
                    .query_map([w], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?,
            };
            let mut out = Vec::with_capacity(ids.len());
            for rid in ids {
                let id: RunId = rid.parse().map_err(|e| corrupt("run id", e))?;
                let Some(run) = get_run_sync(&tx, id)? else {
                    continue;
                };
                let why = reason.clone().unwrap_or_else(|| {
                    format!(
                        "worker lost: {}, last heard {}",
                        run.worker_id.as_deref().unwrap_or("unknown"),
                        run.lease
                            .as_ref()
                            .map(|l| l.heard_at.as_str())
                            .unwrap_or("never"),
                    )
                });
                let line = OutputPiece::from((
                    OutputStream::System,
                    format!("[stoa] {why}; output up to that point is kept\n"),
                ));
                append_sync(&tx, &rid, std::slice::from_ref(&line))?;
                let data = TransitionData {
                    error: Some(why),
                    ..Default::default()
                };
                if let Some(r) = transition_sync(&tx, id, RunStatus::SystemFailure, &data)? {
                    out.push(r);
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn pending_runs(&self) -> Result<Vec<Run>> {
        self.call(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE status = 'pending' ORDER BY seq"
            ))?;
            let rows = st
                .query_map([], run_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn children(&self, parent: RunId) -> Result<Vec<Run>> {
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE parent_id = ?1 ORDER BY seq"
            ))?;
            let rows = st
                .query_map([parent.to_string()], run_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>> {
        self.call(move |c| Ok(get_run_sync(c, id)?)).await
    }

    async fn list_runs(&self, org: &OrgId, filter: &RunFilter) -> Result<Vec<Run>> {
        let org = org.0.clone();
        let f = filter.clone();
        self.call(move |c| {
            let statuses: Vec<String> = f.statuses.iter().map(|s| s.as_str().to_string()).collect();
            let status_json = serde_json::to_string(&statuses).expect("strings serialise");
            let mut st = c.prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE {RUN_FILTER} ORDER BY seq DESC LIMIT ?3 OFFSET ?4"
            ))?;
            let rows = st
                .query_map(
                    params![org, status_json, f.limit, f.offset, f.label, f.run_name],
                    run_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn count_runs(&self, org: &OrgId, filter: &RunFilter) -> Result<i64> {
        let org = org.0.clone();
        let f = filter.clone();
        self.call(move |c| {
            let statuses: Vec<String> = f.statuses.iter().map(|s| s.as_str().to_string()).collect();
            let status_json = serde_json::to_string(&statuses).expect("strings serialise");
            // The numbered parameters of `list_runs`; ?3 and ?4 (limit, offset) unused.
            let n = c
                .prepare_cached(&format!("SELECT COUNT(*) FROM runs WHERE {RUN_FILTER}"))?
                .query_row(
                    params![
                        org,
                        status_json,
                        None::<i64>,
                        None::<i64>,
                        f.label,
                        f.run_name
                    ],
                    |r| r.get(0),
                )?;
            Ok(n)
        })
        .await
    }

    async fn count_runs_by_status(&self, org: &OrgId) -> Result<BTreeMap<String, i64>> {
        let org = org.0.clone();
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT status, COUNT(*) FROM runs WHERE org_id = ?1 GROUP BY status",
            )?;
            let rows = st
                .query_map([org], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn total_billed(&self, org: &OrgId) -> Result<f64> {
        let org = org.0.clone();
        let now = now();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT COALESCE(SUM(COALESCE(price_per_hour, 0) * 24.0 *
                    (julianday(COALESCE(job_end, ?2)) - julianday(job_start))), 0.0)
                 FROM runs WHERE org_id = ?1 AND job_start IS NOT NULL",
                params![org, now],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn delete_run(&self, id: RunId) -> Result<bool> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "DELETE FROM runs WHERE id = ?1 AND status NOT IN ('pending', 'starting', 'running')",
                [id.to_string()],
            )?;
            if n > 0 {
                forget_run(&tx, &id.to_string())?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    async fn claim_next(&self, worker_id: &str, lease: Duration) -> Result<Option<Run>> {
        let w = worker_id.to_string();
        self.call(move |c| {
            let at = now();
            let (token, expires) = (new_token(), after(lease));
            // One statement: the subquery and the update see the same snapshot, so a
            // run is handed to exactly one claimer.
            let run = c
                .prepare_cached(&format!(
                    "UPDATE runs SET status = 'starting', worker_id = ?1, pending_reason = NULL,
                        phases = json_insert(phases, '$[#]', json_object('phase', 'placed', 'at', ?2)),
                        lease_token = ?3, lease_expires_at = ?4, lease_heard_at = ?2,
                        attempt = attempt + 1, control = NULL
                     WHERE seq = (SELECT seq FROM runs WHERE status = 'pending' ORDER BY priority DESC, seq LIMIT 1)
                     RETURNING {RUN_COLUMNS}"
                ))?
                .query_row(params![w, at, token, expires], run_from_row)
                .optional()?;
            Ok(run)
        })
        .await
    }

    async fn transition(
        &self,
        id: RunId,
        to: RunStatus,
        data: TransitionData,
    ) -> Result<Option<Run>> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let run = transition_sync(&tx, id, to, &data)?;
            tx.commit()?;
            Ok(run)
        })
        .await
    }

    async fn set_pending_reason(&self, id: RunId, reason: Option<&str>) -> Result<()> {
        let reason = reason.map(str::to_string);
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET pending_reason = ?2 WHERE id = ?1 AND status IN ('pending', 'starting')",
                params![id.to_string(), reason],
            )?;
            Ok(())
        })
        .await
    }

    async fn add_phase(&self, id: RunId, phase: &str) -> Result<()> {
        let phase = phase.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET phases = json_insert(phases, '$[#]', json_object('phase', ?2, 'at', ?3)) WHERE id = ?1",
                params![id.to_string(), phase, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn set_output_truncated(&self, id: RunId) -> Result<()> {
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET output_truncated = 1 WHERE id = ?1",
                [id.to_string()],
            )?;
            Ok(())
        })
        .await
    }

    async fn active_runs(&self) -> Result<Vec<Run>> {
        self.call(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('starting', 'running') ORDER BY seq"
            ))?;
            let rows = st.query_map([], run_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_join_token(
        &self,
        id: &str,
        hash: &str,
        expires_at: Option<&str>,
    ) -> Result<()> {
        let (id, hash, exp) = (
            id.to_string(),
            hash.to_string(),
            expires_at.map(str::to_string),
        );
        self.call(move |c| {
            c.execute(
                "INSERT INTO worker_join_tokens (id, hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, hash, now(), exp],
            )?;
            Ok(())
        })
        .await
    }

    async fn join_token_valid(&self, hash: &str) -> Result<bool> {
        let hash = hash.to_string();
        self.call(move |c| {
            Ok(c.prepare_cached(
                "SELECT 1 FROM worker_join_tokens WHERE hash = ?1 AND revoked = 0
                       AND (expires_at IS NULL OR expires_at > ?2)",
            )?
            .query_row(params![hash, now()], |_| Ok(()))
            .optional()?
            .is_some())
        })
        .await
    }

    async fn list_join_tokens(&self) -> Result<Vec<(String, String, Option<String>, bool)>> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT id, created_at, expires_at, revoked FROM worker_join_tokens ORDER BY created_at DESC",
            )?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn revoke_join_token(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.call(move |c| {
            Ok(c.execute(
                "UPDATE worker_join_tokens SET revoked = 1 WHERE id = ?1",
                [id],
            )? > 0)
        })
        .await
    }

    async fn remove_worker(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.call(move |c| Ok(c.execute("DELETE FROM workers WHERE name = ?1", [name])? > 0))
            .await
    }

    async fn register_worker(&self, w: &WorkerRecord) -> Result<()> {
        let w = w.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO workers (name, token_hash, offer, registered_at, last_heard_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (name) DO UPDATE SET token_hash = ?2, offer = ?3,
                    registered_at = ?4, last_heard_at = ?4",
                params![w.name, w.token_hash, w.offer, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn worker_by_token(&self, hash: &str) -> Result<Option<WorkerRecord>> {
        let hash = hash.to_string();
        self.call(move |c| {
            Ok(c.prepare_cached(
                "SELECT name, token_hash, offer, registered_at, last_heard_at, draining
                 FROM workers WHERE token_hash = ?1",
            )?
            .query_row([hash], worker_from_row)
            .optional()?)
        })
        .await
    }

    async fn touch_worker(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE workers SET last_heard_at = ?2 WHERE name = ?1",
                params![name, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT name, token_hash, offer, registered_at, last_heard_at, draining FROM workers ORDER BY name",
            )?;
            let rows = st
                .query_map([], worker_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn set_worker_draining(&self, name: &str, draining: bool) -> Result<bool> {
        let name = name.to_string();
        self.call(move |c| {
            Ok(c.execute(
                "UPDATE workers SET draining = ?2 WHERE name = ?1",
                params![name, draining],
            )? > 0)
        })
        .await
    }

    async fn upsert_secrets(
        &self,
        org: &OrgId,
        items: Vec<(String, Sealed, bool)>,
    ) -> Result<Vec<Secret>> {
        let org = org.0.clone();
        self.call(move |c| {
            let tx = c.transaction()?;
            let at = now();
            let mut out = Vec::new();
            for (name, sealed, is_secret) in items {
                let id = format!("env_{}", uuid::Uuid::now_v7().simple());
                tx.execute(
                    "INSERT INTO secrets (id, org_id, name, ciphertext, nonce, key_id, is_secret, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
                     ON CONFLICT (org_id, name) DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce,
                        key_id = excluded.key_id, is_secret = excluded.is_secret, updated_at = excluded.updated_at",
                    params![id, org, name, sealed.ciphertext, sealed.nonce, sealed.key_id, is_secret, at],
                )?;
                out.push(tx.query_row(
                    &format!("SELECT {SECRET_COLUMNS} FROM secrets WHERE org_id = ?1 AND name = ?2"),
                    params![org, name],
                    secret_from_row,
                )?);
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn list_secrets(&self, org: &OrgId) -> Result<Vec<Secret>> {
        let org = org.0.clone();
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {SECRET_COLUMNS} FROM secrets WHERE org_id = ?1 ORDER BY name"
            ))?;
            let rows = st
                .query_map([org], secret_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn delete_secret(&self, org: &OrgId, id_or_name: &str) -> Result<bool> {
        let org = org.0.clone();
        let key = id_or_name.to_string();
        self.call(move |c| {
            Ok(c.execute(
                "DELETE FROM secrets WHERE org_id = ?1 AND (id = ?2 OR name = ?2)",
                params![org, key],
            )? > 0)
        })
        .await
    }

    async fn delete_all_secrets(&self, org: &OrgId) -> Result<u64> {
        let org = org.0.clone();
        self.call(move |c| Ok(c.execute("DELETE FROM secrets WHERE org_id = ?1", [org])? as u64))
            .await
    }

    async fn all_sealed(&self) -> Result<Vec<(SealedRef, Sealed)>> {
        self.call(|c| {
            let mut out = Vec::new();
            let mut st = c.prepare("SELECT id, ciphertext, nonce, key_id FROM secrets")?;
            for r in st.query_map([], |r| {
                Ok((
                    SealedRef::Secret(r.get(0)?),
                    Sealed {
                        ciphertext: r.get(1)?,
                        nonce: r.get(2)?,
                        key_id: r.get(3)?,
                    },
                ))
            })? {
                out.push(r?);
            }
            let mut st =
                c.prepare("SELECT org_id, ciphertext, nonce, key_id FROM org_callback_secrets")?;
            for r in st.query_map([], |r| {
                Ok((
                    SealedRef::CallbackSecret(OrgId(r.get(0)?)),
                    Sealed {
                        ciphertext: r.get(1)?,
                        nonce: r.get(2)?,
                        key_id: r.get(3)?,
                    },
                ))
            })? {
                out.push(r?);
            }
            Ok(out)
        })
        .await
    }

    async fn reseal(&self, items: Vec<(SealedRef, Sealed)>) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            for (r, s) in items {
                match r {
                    SealedRef::Secret(id) => tx.execute(
                        "UPDATE secrets SET ciphertext = ?2, nonce = ?3, key_id = ?4 WHERE id = ?1",
                        params![id, s.ciphertext, s.nonce, s.key_id],
                    )?,
                    SealedRef::CallbackSecret(org) => tx.execute(
                        "UPDATE org_callback_secrets SET ciphertext = ?2, nonce = ?3, key_id = ?4 WHERE org_id = ?1",
                        params![org.0, s.ciphertext, s.nonce, s.key_id],
                    )?,
                };
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn callback_secret(&self, org: &OrgId) -> Result<Option<Sealed>> {
        let org = org.0.clone();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT ciphertext, nonce, key_id FROM org_callback_secrets WHERE org_id = ?1",
                [org],
                |r| {
                    Ok(Sealed {
                        ciphertext: r.get(0)?,
                        nonce: r.get(1)?,
                        key_id: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    async fn set_callback_secret(&self, org: &OrgId, sealed: Sealed) -> Result<()> {
        let org = org.0.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO org_callback_secrets (org_id, ciphertext, nonce, key_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (org_id) DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce,
                    key_id = excluded.key_id, updated_at = excluded.updated_at",
                params![org, sealed.ciphertext, sealed.nonce, sealed.key_id, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn due_deliveries(&self, now: &str, limit: i64) -> Result<Vec<Delivery>> {
        let now = now.to_string();
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM callback_deliveries WHERE state = 'pending' AND next_attempt_at <= ?1 ORDER BY next_attempt_at, id LIMIT ?2"
            ))?;
            let rows = st.query_map(params![now, limit], delivery_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn record_attempt(&self, d: &Delivery) -> Result<()> {
        let d = d.clone();
        self.call(move |c| {
            c.execute(
                "UPDATE callback_deliveries SET state = ?2, attempts = ?3, next_attempt_at = ?4, last_status = ?5, last_error = ?6, updated_at = ?7 WHERE id = ?1",
                params![d.id, d.state, d.attempts, d.next_attempt_at, d.last_status, d.last_error, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn deliveries_for_run(&self, id: RunId) -> Result<Vec<Delivery>> {
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM callback_deliveries WHERE run_id = ?1 ORDER BY id"
            ))?;
            let rows = st
                .query_map([id.to_string()], delivery_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn next_delivery_at(&self) -> Result<Option<String>> {
        self.call(|c| {
            Ok(c.query_row(
                "SELECT MIN(next_attempt_at) FROM callback_deliveries WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn insert_samples(&self, samples: Vec<Sample>) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO run_samples (run_id, ts, cpu_percent, ram_used, ram_total) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for s in &samples {
                    st.execute(params![s.run_id.to_string(), s.ts, s.cpu_percent, s.ram_used, s.ram_total])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn samples(&self, id: RunId, start: &str, end: &str) -> Result<Vec<Sample>> {
        let (start, end) = (start.to_string(), end.to_string());
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT ts, cpu_percent, ram_used, ram_total FROM run_samples WHERE run_id = ?1 AND ts >= ?2 AND ts <= ?3 ORDER BY ts",
            )?;
            let rows = st
                .query_map(params![id.to_string(), start, end], |r| {
                    Ok(Sample { run_id: id, ts: r.get(0)?, cpu_percent: r.get(1)?, ram_used: r.get(2)?, ram_total: r.get(3)? })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_gpu_samples(&self, run: RunId, samples: Vec<GpuSample>) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO run_gpu_samples (run_id, ts, gpu, util, mem_util, mem_used, temp, power, power_limit, clock_sm, clock_mem, pcie_rx, pcie_tx)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )?;
                for s in &samples {
                    let v = &s.values;
                    st.execute(params![run.to_string(), s.ts, s.gpu, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn gpu_samples(&self, id: RunId, start: &str, end: &str) -> Result<Vec<GpuSample>> {
        let (start, end) = (start.to_string(), end.to_string());
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT ts, gpu, util, mem_util, mem_used, temp, power, power_limit, clock_sm, clock_mem, pcie_rx, pcie_tx
                 FROM run_gpu_samples WHERE run_id = ?1 AND ts >= ?2 AND ts <= ?3 ORDER BY ts, gpu",
            )?;
            let rows = st
                .query_map(params![id.to_string(), start, end], |r| {
                    let mut values = [None; 10];
                    for (i, v) in values.iter_mut().enumerate() {
                        *v = r.get(2 + i)?;
                    }
                    Ok(GpuSample { run_id: Some(id), ts: r.get(0)?, gpu: r.get(1)?, values })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn set_metrics_summary(&self, id: RunId, summary: &str) -> Result<()> {
        let summary = summary.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET metrics_summary = ?2 WHERE id = ?1",
                params![id.to_string(), summary],
            )?;
            Ok(())
        })
        .await
    }

    async fn metrics_summary(&self, id: RunId) -> Result<Option<String>> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT metrics_summary FROM runs WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
        })
        .await
    }

    async fn prune_samples(&self, before: &str) -> Result<u64> {
        let before = before.to_string();
        self.call(move |c| Ok(c.execute("DELETE FROM run_samples WHERE ts < ?1", [before])? as u64))
            .await
    }

    async fn prune_output(&self, before: &str, limit: i64) -> Result<u64> {
        let before = before.to_string();
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (mut budget, mut removed) = (limit, 0);
            // At most `limit` runs too: a run counted as holding output without rows
            // spends no budget, and must not stretch the transaction either.
            for _ in 0..limit {
                if budget <= 0 {
                    break;
                }
                let rid: Option<String> = tx
                    .prepare_cached(&format!(
                        "SELECT id FROM runs INDEXED BY runs_output_held
                         WHERE output_bytes > 0 AND COALESCE(job_end, created_at) < ?1 AND status NOT IN {ACTIVE}
                         ORDER BY COALESCE(job_end, created_at) LIMIT 1"
                    ))?
                    .query_row([&before], |r| r.get(0))
                    .optional()?;
                let Some(rid) = rid else { break };
                let (n, bytes) = delete_output_head(&tx, &rid, budget)?;
                let left: bool = tx
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM run_output WHERE run_id = ?1)")?
                    .query_row([&rid], |r| r.get(0))?;
                // Marked with its first batch (readers see no output from then on);
                // counted down as rows go, held (> 0) until the last one has.
                tx.prepare_cached(
                    "UPDATE runs SET output_expired = 1,
                        output_bytes = CASE WHEN ?2 THEN MAX(output_bytes - ?3, 1) ELSE 0 END
                     WHERE id = ?1",
                )?
                .execute(params![rid, left, bytes])?;
                budget -= n;
                removed += n;
            }
            tx.commit()?;
            Ok(removed as u64)
        })
        .await
    }

    async fn prune_runs(&self, before: &str, limit: i64) -> Result<u64> {
        let before = before.to_string();
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let ids = tx
                .prepare_cached(&format!(
                    "SELECT id FROM runs INDEXED BY runs_ended
                     WHERE COALESCE(job_end, created_at) < ?1 AND status NOT IN {ACTIVE}
                     ORDER BY COALESCE(job_end, created_at) LIMIT ?2"
                ))?
                .query_map(params![before, limit], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for rid in &ids {
                tx.prepare_cached("DELETE FROM runs WHERE id = ?1")?
                    .execute([rid])?;
                forget_run(&tx, rid)?;
            }
            tx.commit()?;
            Ok(ids.len() as u64)
        })
        .await
    }

    async fn purge_orphan_output(&self, limit: i64) -> Result<u64> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (mut budget, mut removed) = (limit, 0);
            for _ in 0..limit {
                if budget <= 0 {
                    break;
                }
                let next: Option<(String, bool)> = tx
                    .prepare_cached(
                        "SELECT run_id, EXISTS (SELECT 1 FROM runs WHERE id = run_id) FROM output_purge LIMIT 1",
                    )?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let Some((rid, exists)) = next else { break };
                // Only the output of a run that is gone: a live run keeps its own.
                let n = if exists {
                    0
                } else {
                    delete_output_head(&tx, &rid, budget)?.0
                };
                if exists || n < budget {
                    tx.prepare_cached("DELETE FROM output_purge WHERE run_id = ?1")?
                        .execute([&rid])?;
                }
                budget -= n;
                removed += n;
            }
            tx.commit()?;
            Ok(removed as u64)
        })
        .await
    }

    async fn org_output_bytes(&self, org: &OrgId) -> Result<u64> {
        let org = org.0.clone();
        self.call(move |c| {
            let n: i64 = c
                .prepare_cached(
                    "SELECT COALESCE(SUM(output_bytes), 0) FROM runs INDEXED BY runs_org_output
                     WHERE org_id = ?1 AND output_bytes > 0",
                )?
                .query_row([org], |r| r.get(0))?;
            Ok(n.max(0) as u64)
        })
        .await
    }

    async fn count_all_by_status(&self) -> Result<BTreeMap<String, i64>> {
        self.call(|c| {
            let mut st = c.prepare_cached("SELECT status, COUNT(*) FROM runs GROUP BY status")?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn append_output(&self, id: RunId, chunks: &[OutputPiece]) -> Result<i64> {
        let chunks: Vec<OutputPiece> = chunks.to_vec();
        self.call(move |c| {
            let tx = c.transaction()?;
            let last = append_sync(&tx, &id.to_string(), &chunks)?;
            tx.commit()?;
            Ok(last)
        })
        .await
    }

    async fn append_output_at(
        &self,
        id: RunId,
        token: &str,
        first: i64,
        chunks: &[OutputPiece],
        max_bytes: u64,
    ) -> Result<Appended> {
        let chunks: Vec<OutputPiece> = chunks.to_vec();
        let token = token.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            let rid = id.to_string();
            let stored: Option<i64> = tx
                .prepare_cached("SELECT output_bytes FROM runs WHERE id = ?1 AND lease_token = ?2")?
                .query_row(params![rid, token], |r| r.get(0))
                .optional()?;
            let Some(stored) = stored else {
                return Ok(Appended::LeaseLost);
            };
            let last: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM run_output WHERE run_id = ?1",
                [&rid],
                |r| r.get(0),
            )?;
            if first < 1 || first > last + 1 {
                return Ok(Appended::Gap { expected: last + 1 });
            }
            // Pieces up to `last` were stored by an earlier send of the same batch.
            let skip = usize::try_from(last + 1 - first).unwrap_or(0);
            let adding: u64 = chunks
                .iter()
                .skip(skip)
                .map(|p| p.content.len() as u64)
                .sum();
            if (stored.max(0) as u64).saturating_add(adding) > max_bytes {
                return Ok(Appended::OverLimit);
            }
            let next = if skip < chunks.len() {
                append_sync(&tx, &rid, &chunks[skip..])? + 1
            } else {
                last + 1
            };
            tx.commit()?;
            Ok(Appended::Stored { next })
        })
        .await
    }

    async fn read_output(
        &self,
        id: RunId,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<OutputChunk>> {
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT seq, stream, content, ts, service FROM run_output WHERE run_id = ?1 AND seq > ?2 AND {OUTPUT_READABLE} ORDER BY seq LIMIT ?3"
            ))?;
            let rows = st.query_map(params![id.to_string(), after, limit], chunk_from_row)?;
            take_within(rows, max_bytes)
        })
        .await
    }

    async fn read_logs(
        &self,
        id: RunId,
        since: &str,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<OutputChunk>, i64)> {
        let since = since.to_string();
        self.call(move |c| {
            let rid = id.to_string();
            let total: i64 = c.query_row(
                &format!("SELECT COUNT(*) FROM run_output WHERE run_id = ?1 AND ts >= ?2 AND {OUTPUT_READABLE}"),
                params![rid, since],
                |r| r.get(0),
            )?;
            // Newest first, so the byte budget keeps the last lines.
            let mut st = c.prepare_cached(&format!(
                "SELECT seq, stream, content, ts, service FROM run_output WHERE run_id = ?1 AND ts >= ?2 AND {OUTPUT_READABLE}
                    ORDER BY seq DESC LIMIT ?3"
            ))?;
            let rows = st.query_map(params![rid, since, limit], chunk_from_row)?;
            let mut out = take_within(rows, max_bytes)?;
            out.reverse();
            Ok((out, total))
        })
        .await
    }
}

/// Collects rows while their content fits in `max_bytes` (always at least one row, so
/// a reader paging through output makes progress). Rows come from the cursor one at a
/// time: a page never holds more than the budget and one chunk.
fn take_within(
    rows: impl Iterator<Item = rusqlite::Result<OutputChunk>>,
    max_bytes: usize,
) -> Result<Vec<OutputChunk>> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for r in rows {
        let chunk = r?;
        bytes += chunk.content.len();
        if bytes > max_bytes && !out.is_empty() {
            break;
        }
        out.push(chunk);
    }
    Ok(out)
}

fn chunk_from_row(r: &Row) -> rusqlite::Result<OutputChunk> {
    Ok(OutputChunk {
        seq: r.get(0)?,
        stream: OutputStream::parse(&r.get::<_, String>(1)?),
        content: r.get(2)?,
        ts: r.get(3)?,
        service: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    /// The lease rules of [`crate::conformance`], on this backend.
    mod leases {
        use super::*;
        use crate::conformance as c;

        fn fresh() -> (tempfile::TempDir, Arc<dyn Store>) {
            let dir = tempfile::tempdir().unwrap();
            let s = SqliteStore::open(&dir.path().join("stoa.db")).unwrap();
            (dir, Arc::new(s))
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_claimers_one_lease() {
            let (_d, s) = fresh();
            c::two_claimers_one_lease(s).await;
        }

        #[tokio::test]
        async fn a_stale_token_is_rejected() {
            let (_d, s) = fresh();
            c::a_stale_token_is_rejected(s).await;
        }

        #[tokio::test]
        async fn an_expired_lease_is_reaped() {
            let (_d, s) = fresh();
            c::an_expired_lease_is_reaped(s).await;
        }

        #[tokio::test]
        async fn controls_reach_the_worker_by_heartbeat() {
            let (_d, s) = fresh();
            c::controls_reach_the_worker_by_heartbeat(s).await;
        }

        #[tokio::test]
        async fn numbered_output_is_stored_once_in_order() {
            let (_d, s) = fresh();
            c::numbered_output_is_stored_once_in_order(s).await;
        }

        #[tokio::test]
        async fn a_selection_is_inserted_whole() {
            let (_d, s) = fresh();
            c::a_selection_is_inserted_whole(s).await;
        }

        #[tokio::test]
        async fn a_restarted_worker_reaps_its_own_runs() {
            let (_d, s) = fresh();
            c::a_restarted_worker_reaps_its_own_runs(s).await;
        }
    }

    async fn store_with_org() -> (tempfile::TempDir, SqliteStore, Org) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("stoa.db")).unwrap();
        let org = s.create_org("default", "Default").await.unwrap();
        (dir, s, org)
    }

    #[tokio::test]
    async fn the_database_files_are_private_whatever_the_umask_or_earlier_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("stoa.db");
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        let s = SqliteStore::open(&db).unwrap();
        s.create_org("default", "Default").await.unwrap();
        for f in ["stoa.db", "stoa.db-wal", "stoa.db-shm"] {
            assert_eq!(mode(f), 0o600, "{f}");
        }
        drop(s);
        // Files an earlier version left readable are made private at the next open.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _s = SqliteStore::open(&db).unwrap();
        assert_eq!(mode("stoa.db"), 0o600);
    }

    fn new_run(org: &Org) -> NewRun {
        crate::conformance::new_run(&org.id)
    }

    /// Many claimers racing over one store: every run is handed out exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_run_is_claimed_twice() {
        let (_d, s, org) = store_with_org().await;
        for _ in 0..200 {
            s.insert_run(&new_run(&org)).await.unwrap();
        }
        let mut tasks = Vec::new();
        for w in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(r) = s.claim_next(&format!("w{w}"), LEASE).await.unwrap() {
                    got.push(r.id);
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(n, 200);
        assert_eq!(all.len(), 200);
    }

    #[tokio::test]
    async fn terminal_state_is_written_once() {
        let (_d, s, org) = store_with_org().await;
        let r = new_run(&org);
        s.insert_run(&r).await.unwrap();
        s.claim_next("w", LEASE).await.unwrap().unwrap();
        let run = s
            .transition(r.id, RunStatus::Running, TransitionData::default())
            .await
            .unwrap()
            .unwrap();
        assert!(run.job_start.is_some());
        let a = s
            .transition(
                r.id,
                RunStatus::Aborted,
                TransitionData {
                    error: Some("aborted".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let b = s
            .transition(
                r.id,
                RunStatus::Completed,
                TransitionData {
                    return_code: Some(0),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(a.is_some() && b.is_none());
        let run = s.get_run(r.id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Aborted);
        let phases: Vec<_> = run.phases.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(phases, vec!["queued", "placed", "started", "ended"]);
    }

    #[tokio::test]
    async fn output_has_gapless_sequence_and_logs_window() {
        let (_d, s, org) = store_with_org().await;
        let r = new_run(&org);
        s.insert_run(&r).await.unwrap();
        let last = s
            .append_output(
                r.id,
                &[
                    (OutputStream::Stdout, "a\n".to_string()).into(),
                    OutputPiece {
                        stream: OutputStream::Stderr,
                        service: Some("web".into()),
                        content: "b\n".into(),
                    },
                ],
            )
            .await
            .unwrap();
        assert_eq!(last, 2);
        assert_eq!(
            s.append_output(r.id, &[(OutputStream::Stdout, "c\n".to_string()).into()])
                .await
                .unwrap(),
            3
        );
        let out = s.read_output(r.id, 1, 10, usize::MAX).await.unwrap();
        assert_eq!(out.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(out[0].service.as_deref(), Some("web"));
        assert_eq!(out[1].service, None);
        let (logs, total) = s
            .read_logs(r.id, "1970-01-01T00:00:00Z", 2, usize::MAX)
            .await
            .unwrap();
        assert_eq!(total, 3);
        assert_eq!(
            logs.iter().map(|c| c.content.as_str()).collect::<Vec<_>>(),
            vec!["b\n", "c\n"]
        );
    }

    #[tokio::test]
    async fn output_is_read_in_pages_bounded_by_lines_and_bytes() {
        let (_d, s, org) = store_with_org().await;
        let r = new_run(&org);
        s.insert_run(&r).await.unwrap();
        // 1,000 lines of 1 KiB each.
        let line = format!("{}\n", "x".repeat(1023));
        let pieces: Vec<OutputPiece> = (0..1000)
            .map(|_| (OutputStream::Stdout, line.clone()).into())
            .collect();
        s.append_output(r.id, &pieces).await.unwrap();
        // At most `limit` lines.
        let page = s.read_output(r.id, 0, 100, usize::MAX).await.unwrap();
        assert_eq!(page.len(), 100);
        // At most `max_bytes` of content: 10 KiB holds ten lines.
        let page = s.read_output(r.id, 0, 500, 10 * 1024).await.unwrap();
        assert_eq!(page.len(), 10);
        assert_eq!(page.last().unwrap().seq, 10);
        // Paging on from the last seq reads everything exactly once.
        let (mut after, mut seen) = (0, 0);
        loop {
            let page = s.read_output(r.id, after, 500, 64 * 1024).await.unwrap();
            let Some(last) = page.last() else { break };
            assert!(page.len() <= 64);
            assert_eq!(page[0].seq, after + 1);
            after = last.seq;
            seen += page.len();
        }
        assert_eq!(seen, 1000);
        // A budget smaller than one line still makes progress.
        assert_eq!(s.read_output(r.id, 0, 500, 1).await.unwrap().len(), 1);
        // Logs keep the newest lines that fit.
        let (logs, total) = s
            .read_logs(r.id, "1970-01-01T00:00:00Z", 10_000, 4 * 1024)
            .await
            .unwrap();
        assert_eq!(total, 1000);
        assert_eq!(
            logs.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![997, 998, 999, 1000]
        );
    }

    /// A run of `org` that ran and completed, with `lines` lines of output (`x\n`).
    async fn ended_run(s: &SqliteStore, org: &Org, lines: usize) -> RunId {
        let mut r = new_run(org);
        r.callback_urls = vec!["http://127.0.0.1:9/cb".into()];
        s.insert_run(&r).await.unwrap();
        s.claim(r.id, "w", &[], Some(LEASE)).await.unwrap().unwrap();
        s.transition(r.id, RunStatus::Running, TransitionData::default())
            .await
            .unwrap()
            .unwrap();
        let pieces: Vec<OutputPiece> = (0..lines)
            .map(|_| (OutputStream::Stdout, "x\n".to_string()).into())
            .collect();
        s.append_output(r.id, &pieces).await.unwrap();
        s.insert_samples(vec![Sample {
            run_id: r.id,
            ts: now(),
            cpu_percent: 1.0,
            ram_used: 1,
            ram_total: 2,
        }])
        .await
        .unwrap();
        s.insert_gpu_samples(
            r.id,
            vec![GpuSample {
                ts: now(),
                ..Default::default()
            }],
        )
        .await
        .unwrap();
        s.transition(r.id, RunStatus::Completed, TransitionData::default())
            .await
            .unwrap()
            .unwrap();
        r.id
    }

    /// Rows of `table` that belong to run `id`, read past every guard.
    async fn rows_of(s: &SqliteStore, table: &'static str, id: RunId) -> i64 {
        s.call(move |c| {
            Ok(c.query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE run_id = ?1"),
                [id.to_string()],
                |r| r.get(0),
            )?)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn deleting_a_run_hides_its_output_at_once_and_the_purge_removes_it_in_batches() {
        let (_d, s, org) = store_with_org().await;
        let other = s.create_org("other", "Other").await.unwrap();
        let gone = ended_run(&s, &org, 10).await;
        let kept = ended_run(&s, &org, 3).await;
        let theirs = ended_run(&s, &other, 4).await;
        assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 26);
        assert_eq!(s.org_output_bytes(&other.id).await.unwrap(), 8);
        assert!(s.delete_run(gone).await.unwrap());
        // Gone for every reader, and from the org's bytes, before any row is removed.
        assert!(s.get_run(gone).await.unwrap().is_none());
        assert!(
            s.read_output(gone, 0, 100, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        let (logs, total) = s
            .read_logs(gone, "1970-01-01T00:00:00Z", 100, usize::MAX)
            .await
            .unwrap();
        assert!(logs.is_empty() && total == 0);
        assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 6);
        assert_eq!(rows_of(&s, "run_output", gone).await, 10);
        for t in ["run_samples", "run_gpu_samples", "callback_deliveries"] {
            assert_eq!(rows_of(&s, t, gone).await, 0, "{t}");
        }
        // Output written after the deletion is not stored.
        s.append_output(gone, &[(OutputStream::Stdout, "late\n".to_string()).into()])
            .await
            .unwrap();
        assert_eq!(rows_of(&s, "run_output", gone).await, 10);
        // Batches of at most 4 chunks: 4, 4, 2, then nothing.
        let mut batches = vec![];
        loop {
            let n = s.purge_orphan_output(4).await.unwrap();
            batches.push(n);
            if n < 4 {
                break;
            }
        }
        assert_eq!(batches, vec![4, 4, 2]);
        assert_eq!(s.purge_orphan_output(4).await.unwrap(), 0);
        assert_eq!(rows_of(&s, "run_output", gone).await, 0);
        // Other runs keep theirs.
        assert_eq!(
            s.read_output(kept, 0, 100, usize::MAX).await.unwrap().len(),
            3
        );
        assert_eq!(
            s.read_output(theirs, 0, 100, usize::MAX)
                .await
                .unwrap()
                .len(),
            4
        );
        // Deleting a run without output leaves nothing to purge.
        let quiet = ended_run(&s, &org, 0).await;
        assert!(s.delete_run(quiet).await.unwrap());
        assert_eq!(s.purge_orphan_output(4).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn prune_output_expires_runs_that_ended_before_the_cutoff_in_batches() {
        let (_d, s, org) = store_with_org().await;
        let old = ended_run(&s, &org, 5).await;
        let older = ended_run(&s, &org, 2).await;
        s.backdate_run(older, "2000-01-01T00:00:00.000000Z")
            .await
            .unwrap();
        let cutoff = now();
        let recent = ended_run(&s, &org, 3).await;
        // Running, and created before the cutoff: never pruned.
        let mut active = new_run(&org);
        active.priority = 0;
        s.insert_run(&active).await.unwrap();
        s.claim(active.id, "w", &[], Some(LEASE))
            .await
            .unwrap()
            .unwrap();
        s.append_output(
            active.id,
            &[(OutputStream::Stdout, "live\n".to_string()).into()],
        )
        .await
        .unwrap();
        s.backdate_run(active.id, "2000-01-01T00:00:00.000000Z")
            .await
            .unwrap();
        assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 25);

        // The oldest first: `older` (2 chunks) whole, then the start of `old`.
        assert_eq!(s.prune_output(&cutoff, 3).await.unwrap(), 3);
        let r = s.get_run(older).await.unwrap().unwrap();
        assert!(r.output_expired);
        assert_eq!(rows_of(&s, "run_output", older).await, 0);
        // `old` is marked with its first batch: its remaining output is hidden, and
        // still counted until its rows are gone.
        assert!(s.get_run(old).await.unwrap().unwrap().output_expired);
        assert_eq!(rows_of(&s, "run_output", old).await, 4);
        assert!(
            s.read_output(old, 0, 100, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 8 + 6 + 5);
        assert_eq!(s.prune_output(&cutoff, 3).await.unwrap(), 3);
        assert_eq!(s.prune_output(&cutoff, 3).await.unwrap(), 1);
        assert_eq!(s.prune_output(&cutoff, 3).await.unwrap(), 0);
        assert_eq!(rows_of(&s, "run_output", old).await, 0);
        assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 6 + 5);
        // The run itself stays, with its record.
        let r = s.get_run(old).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Completed);
        assert_eq!(rows_of(&s, "run_samples", old).await, 1);
        // Runs that ended after the cutoff, and active runs, keep their output.
        assert!(!s.get_run(recent).await.unwrap().unwrap().output_expired);
        assert_eq!(
            s.read_output(recent, 0, 100, usize::MAX)
                .await
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            s.read_output(active.id, 0, 100, usize::MAX)
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn prune_runs_deletes_old_ended_runs_with_all_they_own() {
        let (_d, s, org) = store_with_org().await;
        let a = ended_run(&s, &org, 2).await;
        let b = ended_run(&s, &org, 3).await;
        let cutoff = now();
        let recent = ended_run(&s, &org, 1).await;
        let mut pending = new_run(&org);
        pending.priority = 0;
        s.insert_run(&pending).await.unwrap();
        s.backdate_run(pending.id, "2000-01-01T00:00:00.000000Z")
            .await
            .unwrap();
        // One run per batch, oldest first.
        assert_eq!(s.prune_runs(&cutoff, 1).await.unwrap(), 1);
        assert!(s.get_run(a).await.unwrap().is_none());
        assert!(s.get_run(b).await.unwrap().is_some());
        assert_eq!(s.prune_runs(&cutoff, 1).await.unwrap(), 1);
        assert_eq!(s.prune_runs(&cutoff, 1).await.unwrap(), 0);
        for id in [a, b] {
            assert!(s.get_run(id).await.unwrap().is_none());
            for t in ["run_samples", "run_gpu_samples", "callback_deliveries"] {
                assert_eq!(rows_of(&s, t, id).await, 0, "{t}");
            }
        }
        assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 2);
        assert_eq!(s.purge_orphan_output(100).await.unwrap(), 5);
        assert_eq!(rows_of(&s, "run_output", a).await, 0);
        assert_eq!(rows_of(&s, "run_output", b).await, 0);
        // A recent run and a pending one (however old) stay.
        assert!(s.get_run(recent).await.unwrap().is_some());
        assert!(s.get_run(pending.id).await.unwrap().is_some());
        assert_eq!(rows_of(&s, "callback_deliveries", recent).await, 1);
    }

    #[tokio::test]
    async fn count_runs_counts_what_list_runs_pages_through() {
        let (_d, s, org) = store_with_org().await;
        for i in 0..5 {
            let mut r = new_run(&org);
            r.labels = if i % 2 == 0 {
                vec!["even".into()]
            } else {
                vec![]
            };
            s.insert_run(&r).await.unwrap();
        }
        ended_run(&s, &org, 0).await;
        let pending = RunFilter {
            statuses: vec![RunStatus::Pending],
            limit: 2,
            offset: 4,
            ..Default::default()
        };
        assert_eq!(s.count_runs(&org.id, &pending).await.unwrap(), 5);
        assert_eq!(s.list_runs(&org.id, &pending).await.unwrap().len(), 1);
        let even = RunFilter {
            label: Some("even".into()),
            ..pending.clone()
        };
        assert_eq!(s.count_runs(&org.id, &even).await.unwrap(), 3);
        let all = RunFilter::default();
        assert_eq!(s.count_runs(&org.id, &all).await.unwrap(), 6);
    }

    /// Output stored before per-run byte counts existed is counted by the migration.
    #[tokio::test]
    async fn the_migration_counts_output_already_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stoa.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
            )
            .unwrap();
            for (v, sql) in &MIGRATIONS[..5] {
                c.execute_batch(sql).unwrap();
                c.execute(
                    "INSERT INTO schema_migrations VALUES (?1, ?2)",
                    params![v, now()],
                )
                .unwrap();
            }
            c.execute_batch(
                "INSERT INTO orgs VALUES ('o', 'o', 'o', '2000-01-01T00:00:00Z');
                 INSERT INTO runs (id, org_id, status, job_type, execution_type, spec, timeout_s, created_at)
                    VALUES ('0190a0a0-0000-7000-8000-000000000001', 'o', 'completed', 'python', 'cpu', '{}', 60, '2000-01-01T00:00:00Z');
                 INSERT INTO run_output (run_id, seq, stream, content, ts)
                    VALUES ('0190a0a0-0000-7000-8000-000000000001', 1, 'stdout', 'héllo\n', '2000-01-01T00:00:00Z'),
                           ('0190a0a0-0000-7000-8000-000000000001', 2, 'stdout', 'x\n', '2000-01-01T00:00:00Z');",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        // Bytes, not characters: "é" is two.
        assert_eq!(s.org_output_bytes(&OrgId("o".into())).await.unwrap(), 9);
        assert_eq!(s.prune_output(&now(), 100).await.unwrap(), 2);
        assert_eq!(s.org_output_bytes(&OrgId("o".into())).await.unwrap(), 0);
    }
}
