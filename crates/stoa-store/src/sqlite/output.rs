//! SQLite: run output: numbered lines, pages, logs, retention.

use super::*;

#[async_trait]
impl OutputStore for SqliteStore {
    async fn prune_output(&self, before: Time, limit: i64) -> Result<u64> {
        let before = stamp(&before);
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
            // Pieces up to `last` were stored by an earlier send of the same batch.
            let skip = match crate::numbered_append(first, last, stored, &chunks, max_bytes) {
                Ok(skip) => skip,
                Err(refused) => return Ok(refused),
            };
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
            crate::take_within(rows, max_bytes)
        })
        .await
    }

    async fn read_logs(
        &self,
        id: RunId,
        since: Time,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<OutputChunk>, i64)> {
        let since = stamp(&since);
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
            let mut out = crate::take_within(rows, max_bytes)?;
            out.reverse();
            Ok((out, total))
        })
        .await
    }
}
