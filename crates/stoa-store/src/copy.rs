//! Moving up: copies a SQLite store, every row of it, into an empty PostgreSQL one.
//!
//! Rows are copied as stored (secrets stay sealed under the same master key, run ids,
//! numbers and times are kept), table by table in one PostgreSQL transaction: a copy
//! that fails leaves the target empty. Each table is read by one statement on a
//! blocking thread and written in batches as it is read, so a store of any size is
//! copied in bounded memory.

use std::path::Path;

use rusqlite::types::Value;
use sqlx::{Postgres, QueryBuilder};

use crate::{PgStore, Result, SqliteStore, StoreError};

/// How a column is read from SQLite and written to PostgreSQL.
#[derive(Clone, Copy)]
enum Ty {
    Text,
    Int,
    Real,
    Bool,
    /// RFC 3339 text in SQLite, `timestamptz` in PostgreSQL.
    Time,
    /// JSON text in SQLite, `jsonb` in PostgreSQL.
    Json,
    Blob,
}

use Ty::*;

/// The tables in the order they are copied (referenced rows first), with their columns.
const TABLES: &[(&str, &[(&str, Ty)])] = &[
    (
        "orgs",
        &[
            ("id", Text),
            ("slug", Text),
            ("name", Text),
            ("created_at", Time),
        ],
    ),
    (
        "api_keys",
        &[
            ("id", Text),
            ("org_id", Text),
            ("name", Text),
            ("prefix", Text),
            ("hash", Text),
            ("is_admin", Bool),
            ("is_active", Bool),
            ("created_at", Time),
            ("last_used_at", Time),
            ("sessions_after", Time),
        ],
    ),
    (
        "runs",
        &[
            ("seq", Int),
            ("id", Text),
            ("org_id", Text),
            ("status", Text),
            ("job_type", Text),
            ("execution_type", Text),
            ("file_name", Text),
            ("spec", Text),
            ("timeout_s", Int),
            ("created_at", Time),
            ("job_start", Time),
            ("job_end", Time),
            ("return_code", Int),
            ("error", Text),
            ("timed_out", Bool),
            ("pending_reason", Text),
            ("phases", Json),
            ("worker_id", Text),
            ("pgid", Int),
            ("run_name", Text),
            ("labels", Json),
            ("metadata", Json),
            ("callback_urls", Json),
            ("output_truncated", Bool),
            ("price_per_hour", Real),
            ("priority", Int),
            ("idempotency_key", Text),
            ("parent_id", Text),
            ("gpu_ids", Json),
            ("metrics_summary", Text),
            ("output_bytes", Int),
            ("output_expired", Bool),
            ("lease_token", Text),
            ("lease_expires_at", Time),
            ("lease_heard_at", Time),
            ("attempt", Int),
            ("control", Text),
            ("slurm_job_id", Text),
            ("ports", Json),
        ],
    ),
    (
        "run_output",
        &[
            ("run_id", Text),
            ("seq", Int),
            ("stream", Text),
            ("content", Text),
            ("ts", Time),
            ("service", Text),
        ],
    ),
    ("output_purge", &[("run_id", Text), ("deleted_at", Time)]),
    (
        "secrets",
        &[
            ("id", Text),
            ("org_id", Text),
            ("name", Text),
            ("ciphertext", Blob),
            ("nonce", Blob),
            ("key_id", Text),
            ("is_secret", Bool),
            ("created_at", Time),
            ("updated_at", Time),
        ],
    ),
    (
        "org_callback_secrets",
        &[
            ("org_id", Text),
            ("ciphertext", Blob),
            ("nonce", Blob),
            ("key_id", Text),
            ("updated_at", Time),
        ],
    ),
    (
        "callback_deliveries",
        &[
            ("id", Int),
            ("run_id", Text),
            ("org_id", Text),
            ("url", Text),
            ("payload", Text),
            ("state", Text),
            ("attempts", Int),
            ("next_attempt_at", Time),
            ("last_status", Int),
            ("last_error", Text),
            ("created_at", Time),
            ("updated_at", Time),
        ],
    ),
    (
        "run_samples",
        &[
            ("run_id", Text),
            ("ts", Time),
            ("cpu_percent", Real),
            ("ram_used", Int),
            ("ram_total", Int),
        ],
    ),
    (
        "run_gpu_samples",
        &[
            ("run_id", Text),
            ("ts", Time),
            ("gpu", Int),
            ("util", Real),
            ("mem_util", Real),
            ("mem_used", Real),
            ("temp", Real),
            ("power", Real),
            ("power_limit", Real),
            ("clock_sm", Real),
            ("clock_mem", Real),
            ("pcie_rx", Real),
            ("pcie_tx", Real),
        ],
    ),
    (
        "worker_join_tokens",
        &[
            ("id", Text),
            ("hash", Text),
            ("created_at", Time),
            ("expires_at", Time),
            ("revoked", Bool),
        ],
    ),
    (
        "workers",
        &[
            ("name", Text),
            ("token_hash", Text),
            ("offer", Text),
            ("registered_at", Time),
            ("last_heard_at", Time),
            ("draining", Bool),
        ],
    ),
];

/// Rows per batch sent from the reading thread.
const BATCH_ROWS: usize = 1000;

/// Copies the SQLite store at `from` into the empty PostgreSQL store at `to`; calls
/// `progress(table, rows copied so far)` as it goes. Returns the rows copied per table.
/// Refuses a target that holds any org, key or run.
pub async fn sqlite_to_postgres(
    from: &Path,
    to: &str,
    progress: &(dyn Fn(&str, u64) + Send + Sync),
) -> Result<Vec<(&'static str, u64)>> {
    if !from.exists() {
        return Err(refused(format!("no SQLite store at {}", from.display())));
    }
    // Brings the source to the current schema, which the table list describes.
    let src = {
        let from = from.to_path_buf();
        tokio::task::spawn_blocking(move || SqliteStore::open(&from))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??
    };
    let dst = PgStore::connect(to).await?;
    let mut tx = dst.pool.begin().await?;
    let held: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM orgs), (SELECT COUNT(*) FROM api_keys), (SELECT COUNT(*) FROM runs)",
    )
    .fetch_one(&mut *tx)
    .await?;
    if held != (0, 0, 0) {
        return Err(refused(format!(
            "the target store at {} is not empty ({} orgs, {} keys, {} runs); copy into an empty database",
            dst.display_url(),
            held.0,
            held.1,
            held.2
        )));
    }
    // Every table as of one moment (a server still writing to the source changes
    // nothing of the copy).
    let conn = src.conn.clone();
    sqlite_call(move || {
        let c = conn.lock().unwrap_or_else(|p| p.into_inner());
        c.execute_batch("BEGIN DEFERRED")
    })
    .await?;
    let copied = copy_tables(&src, &mut tx, progress).await;
    let conn = src.conn.clone();
    // The numbers SQLite handed out, deleted rows' included: new ones go after them.
    let handed_out = sqlite_call(move || {
        let c = conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = c.prepare("SELECT name, seq FROM sqlite_sequence")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<rusqlite::Result<std::collections::HashMap<_, _>>>();
        c.execute_batch("COMMIT")?;
        rows
    })
    .await?;
    let copied = copied?;
    for (table, col) in [("runs", "seq"), ("callback_deliveries", "id")] {
        let floor = handed_out.get(table).copied().unwrap_or(0);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT setval(pg_get_serial_sequence('{table}', '{col}'), GREATEST(COALESCE(MAX({col}), 0), $1) + 1, false) FROM {table}"
        )))
        .bind(floor)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(copied)
}

/// Runs `f` on a blocking thread (the SQLite connection's calls).
async fn sqlite_call<T: Send + 'static>(
    f: impl FnOnce() -> rusqlite::Result<T> + Send + 'static,
) -> Result<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??)
}

/// Copies every table, in order; the rows copied per table.
async fn copy_tables(
    src: &SqliteStore,
    tx: &mut sqlx::PgConnection,
    progress: &(dyn Fn(&str, u64) + Send + Sync),
) -> Result<Vec<(&'static str, u64)>> {
    let mut copied = Vec::new();
    for (table, cols) in TABLES {
        let n = copy_table(src, tx, table, cols, progress).await?;
        copied.push((*table, n));
    }
    Ok(copied)
}

fn refused(message: String) -> StoreError {
    StoreError::Database {
        message,
        kind: crate::DbFailure::Other,
    }
}

/// Copies one table: a thread reads it in one statement, batches come over a bounded
/// channel, each is written as one multi-row insert.
async fn copy_table(
    src: &SqliteStore,
    tx: &mut sqlx::PgConnection,
    table: &'static str,
    cols: &'static [(&'static str, Ty)],
    progress: &(dyn Fn(&str, u64) + Send + Sync),
) -> Result<u64> {
    let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
    let select = format!("SELECT {} FROM {table}", names.join(", "));
    let (batches_tx, mut batches) = tokio::sync::mpsc::channel::<Vec<Vec<Value>>>(4);
    let conn = src.conn.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        let c = conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = c.prepare(&select)?;
        let mut rows = st.query([])?;
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        while let Some(r) = rows.next()? {
            batch.push(
                (0..cols.len())
                    .map(|i| r.get::<_, Value>(i))
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            );
            if batch.len() == BATCH_ROWS {
                if batches_tx
                    .blocking_send(std::mem::take(&mut batch))
                    .is_err()
                {
                    return Ok(());
                }
                batch.reserve(BATCH_ROWS);
            }
        }
        if !batch.is_empty() {
            let _ = batches_tx.blocking_send(batch);
        }
        Ok(())
    });
    let mut n = 0u64;
    let head = format!("INSERT INTO {table} ({}) ", names.join(", "));
    while let Some(batch) = batches.recv().await {
        let mut qb = QueryBuilder::<Postgres>::new(head.clone());
        let mut bad = None;
        qb.push_values(&batch, |mut b, row| {
            for ((name, ty), v) in cols.iter().zip(row) {
                if let Err(e) = bind(&mut b, *ty, v) {
                    bad.get_or_insert(format!("{table}.{name}: {e}"));
                }
            }
        });
        if let Some(e) = bad {
            return Err(StoreError::Corrupt(e));
        }
        qb.build().execute(&mut *tx).await?;
        n += batch.len() as u64;
        progress(table, n);
    }
    reader
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    Ok(n)
}

/// Binds one SQLite value as the PostgreSQL type of its column.
fn bind(
    b: &mut sqlx::query_builder::Separated<'_, Postgres, &'static str>,
    ty: Ty,
    v: &Value,
) -> std::result::Result<(), String> {
    let text = |v: &Value| match v {
        Value::Null => Ok(None),
        Value::Text(s) => Ok(Some(s.clone())),
        Value::Integer(i) => Ok(Some(i.to_string())),
        Value::Real(f) => Ok(Some(f.to_string())),
        Value::Blob(_) => Err("a blob where text belongs".to_string()),
    };
    let int = |v: &Value| match v {
        Value::Null => Ok(None),
        Value::Integer(i) => Ok(Some(*i)),
        other => Err(format!("not an integer: {other:?}")),
    };
    match ty {
        Text => {
            b.push_bind(text(v)?);
        }
        Int => {
            b.push_bind(int(v)?);
        }
        Bool => {
            b.push_bind(int(v)?.map(|i| i != 0));
        }
        Real => {
            b.push_bind(match v {
                Value::Null => None,
                Value::Real(f) => Some(*f),
                Value::Integer(i) => Some(*i as f64),
                other => return Err(format!("not a number: {other:?}")),
            });
        }
        Time => {
            let t = text(v)?
                .map(|s| stoa_core::time::parse(&s).ok_or(format!("not a time: {s}")))
                .transpose()?;
            b.push_bind(t);
        }
        Ty::Json => {
            let j = text(v)?
                .map(|s| {
                    serde_json::from_str::<serde_json::Value>(&s).map_err(|e| format!("{e}: {s}"))
                })
                .transpose()?;
            b.push_bind(j.map(sqlx::types::Json));
        }
        Blob => {
            b.push_bind(match v {
                Value::Null => None,
                Value::Blob(x) => Some(x.clone()),
                Value::Text(s) => Some(s.clone().into_bytes()),
                other => return Err(format!("not bytes: {other:?}")),
            });
        }
    }
    Ok(())
}
