//! PostgreSQL: run output: numbered lines, pages, logs, retention.

use super::*;

#[async_trait]
impl OutputStore for PgStore {
    async fn prune_output(&self, before: Time, limit: i64) -> Result<u64> {
        self.tx(move |c| {
            Box::pin(async move {
                let (mut budget, mut removed) = (limit, 0);
                // At most `limit` runs too: a run counted as holding output without rows
                // spends no budget, and must not stretch the transaction either.
                for _ in 0..limit {
                    if budget <= 0 {
                        break;
                    }
                    // SKIP LOCKED: another server's pass (or a writer) holds that run.
                    let rid: Option<String> = sqlx::query_scalar(concat!(
                        "SELECT id FROM runs
                         WHERE output_bytes > 0 AND COALESCE(job_end, created_at) < $1 AND status NOT IN ",
                        active!(),
                        " ORDER BY COALESCE(job_end, created_at) LIMIT 1 FOR UPDATE SKIP LOCKED"
                    ))
                    .bind(before)
                    .fetch_optional(&mut *c)
                    .await?;
                    let Some(rid) = rid else { break };
                    let (n, bytes) = delete_output_head(c, &rid, budget).await?;
                    let left: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM run_output WHERE run_id = $1)",
                    )
                    .bind(&rid)
                    .fetch_one(&mut *c)
                    .await?;
                    // Marked with its first batch (readers see no output from then on);
                    // counted down as rows go, held (> 0) until the last one has.
                    sqlx::query(
                        "UPDATE runs SET output_expired = TRUE,
                            output_bytes = CASE WHEN $2 THEN GREATEST(output_bytes - $3, 1) ELSE 0 END
                         WHERE id = $1",
                    )
                    .bind(&rid)
                    .bind(left)
                    .bind(bytes)
                    .execute(&mut *c)
                    .await?;
                    budget -= n;
                    removed += n;
                }
                Ok(removed as u64)
            })
        })
        .await
    }

    async fn purge_orphan_output(&self, limit: i64) -> Result<u64> {
        self.tx(move |c| {
            Box::pin(async move {
                let (mut budget, mut removed) = (limit, 0);
                for _ in 0..limit {
                    if budget <= 0 {
                        break;
                    }
                    let next: Option<(String, bool)> = sqlx::query_as(
                        "SELECT run_id, EXISTS (SELECT 1 FROM runs WHERE id = run_id)
                         FROM output_purge LIMIT 1 FOR UPDATE SKIP LOCKED",
                    )
                    .fetch_optional(&mut *c)
                    .await?;
                    let Some((rid, exists)) = next else { break };
                    // Only the output of a run that is gone: a live run keeps its own.
                    let n = if exists {
                        0
                    } else {
                        delete_output_head(c, &rid, budget).await?.0
                    };
                    if exists || n < budget {
                        sqlx::query("DELETE FROM output_purge WHERE run_id = $1")
                            .bind(&rid)
                            .execute(&mut *c)
                            .await?;
                    }
                    budget -= n;
                    removed += n;
                }
                Ok(removed as u64)
            })
        })
        .await
    }

    async fn org_output_bytes(&self, org: &OrgId) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(output_bytes), 0)::bigint FROM runs
             WHERE org_id = $1 AND output_bytes > 0",
        )
        .bind(&org.0)
        .fetch_one(self.pool())
        .await?;
        Ok(n.max(0) as u64)
    }

    async fn append_output(&self, id: RunId, chunks: &[OutputPiece]) -> Result<i64> {
        let chunks: Vec<OutputPiece> = chunks.to_vec();
        self.tx(move |c| Box::pin(async move { append_in(c, &id.to_string(), &chunks).await }))
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
        self.tx(move |c| {
            Box::pin(async move {
                let rid = id.to_string();
                // Locks the run: a resend racing its first send numbers after it.
                let stored: Option<i64> = sqlx::query_scalar(
                    "SELECT output_bytes FROM runs WHERE id = $1 AND lease_token = $2 FOR UPDATE",
                )
                .bind(&rid)
                .bind(&token)
                .fetch_optional(&mut *c)
                .await?;
                let Some(stored) = stored else {
                    return Ok(Appended::LeaseLost);
                };
                let last = last_seq(c, &rid).await?;
                // Pieces up to `last` were stored by an earlier send of the same batch.
                let skip = match crate::numbered_append(first, last, stored, &chunks, max_bytes) {
                    Ok(skip) => skip,
                    Err(refused) => return Ok(refused),
                };
                let next = if skip < chunks.len() {
                    append_in(c, &rid, &chunks[skip..]).await? + 1
                } else {
                    last + 1
                };
                Ok(Appended::Stored { next })
            })
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
        let rows = sqlx::query(concat!(
            "SELECT seq, stream, content, ts, service FROM run_output WHERE run_id = $1 AND seq > $2 AND ",
            output_readable!(),
            " ORDER BY seq LIMIT $3"
        ))
        .bind(id.to_string())
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        crate::take_within(rows.iter().map(chunk_from_row), max_bytes)
    }

    async fn read_logs(
        &self,
        id: RunId,
        since: Time,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<OutputChunk>, i64)> {
        let rid = id.to_string();
        let total: i64 = sqlx::query_scalar(concat!(
            "SELECT COUNT(*)::bigint FROM run_output WHERE run_id = $1 AND ts >= $2 AND ",
            output_readable!()
        ))
        .bind(&rid)
        .bind(since)
        .fetch_one(self.pool())
        .await?;
        // Newest first, so the byte budget keeps the last lines.
        let rows = sqlx::query(concat!(
            "SELECT seq, stream, content, ts, service FROM run_output WHERE run_id = $1 AND ts >= $2 AND ",
            output_readable!(),
            " ORDER BY seq DESC LIMIT $3"
        ))
        .bind(&rid)
        .bind(since)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut out = crate::take_within(rows.iter().map(chunk_from_row), max_bytes)?;
        out.reverse();
        Ok((out, total))
    }
}
