//! PostgreSQL: the queue and its leases: claims, heartbeats, controls, the reaper.

use super::*;

/// A lease's length in milliseconds (the database adds it to its own clock).
fn millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2)
}

#[async_trait]
impl QueueStore for PgStore {
    async fn claim(
        &self,
        id: RunId,
        worker_id: &str,
        gpu_ids: &[String],
        lease: Option<Duration>,
    ) -> Result<Option<Run>> {
        let at = stoa_core::time::now();
        let (token, ttl_ms) = match lease {
            Some(ttl) => (Some(new_token()), Some(millis(ttl))),
            None => (None, None),
        };
        // A concurrent claim of the same run waits for this one's row lock, then finds
        // the run no longer pending: one claimer wins. Lease times are the database's
        // (servers' clocks may differ); the other servers hear of the claim.
        let row = sqlx::query(concat!(
            "WITH claimed AS (
                UPDATE runs SET status = 'starting', worker_id = $2, pending_reason = NULL, gpu_ids = $3,
                    phases = phases || $4, lease_token = $5,
                    lease_expires_at = now() + $6 * interval '1 millisecond',
                    lease_heard_at = CASE WHEN $5::text IS NULL THEN NULL ELSE now() END,
                    attempt = attempt + 1, control = NULL
                WHERE id = $1 AND status = 'pending'
                RETURNING ",
            run_columns!(),
            ")
             SELECT claimed.*, pg_notify('stoa_changes', 'state:' || id || ':' || current_setting('application_name'))
             FROM claimed"
        ))
        .bind(id.to_string())
        .bind(worker_id)
        .bind(Json(gpu_ids))
        .bind(phase("placed", &at))
        .bind(token)
        .bind(ttl_ms)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        leases: &[(RunId, String)],
        ttl: Duration,
    ) -> Result<Vec<(RunId, Directive)>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = leases.iter().map(|(id, _)| id.to_string()).collect();
        let tokens: Vec<&str> = leases.iter().map(|(_, t)| t.as_str()).collect();
        // One statement for all of the worker's leases.
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "UPDATE runs r SET lease_expires_at = now() + $4 * interval '1 millisecond',
                lease_heard_at = now()
             FROM unnest($1::text[], $2::text[]) AS l(id, token)
             WHERE r.id = l.id AND r.lease_token = l.token AND r.worker_id = $3
               AND r.status IN ('starting', 'running')
             RETURNING r.id, r.control",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(worker_id)
        .bind(millis(ttl))
        .fetch_all(self.pool())
        .await?;
        let held: BTreeMap<String, Option<String>> = rows.into_iter().collect();
        Ok(leases
            .iter()
            .map(|(id, _)| {
                let d = match held.get(&id.to_string()) {
                    None => Directive::Lost,
                    Some(c) => match c.as_deref().and_then(RunControl::parse) {
                        Some(c) => Directive::Control(c),
                        None => Directive::Continue,
                    },
                };
                (*id, d)
            })
            .collect())
    }

    async fn lease_held(&self, id: RunId, token: &str) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, i32>(
            "SELECT 1 FROM runs WHERE id = $1 AND lease_token = $2
               AND status IN ('starting', 'running')",
        )
        .bind(id.to_string())
        .bind(token)
        .fetch_optional(self.pool())
        .await?
        .is_some())
    }

    async fn request_control(&self, id: RunId, control: RunControl) -> Result<Option<Run>> {
        let row = sqlx::query(concat!(
            "UPDATE runs SET control = CASE WHEN control = 'abort' THEN control ELSE $2 END
             WHERE id = $1 AND status IN ('starting', 'running')
             RETURNING ",
            run_columns!()
        ))
        .bind(id.to_string())
        .bind(control.to_stored())
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn reap(&self, scope: Reap<'_>) -> Result<Vec<Run>> {
        let (worker, reason, except) = match scope {
            Reap::Expired { except } => (None, None, except.map(str::to_string)),
            Reap::Worker { worker, reason } => {
                (Some(worker.to_string()), Some(reason.to_string()), None)
            }
        };
        self.tx(move |c| {
            Box::pin(async move {
                // SKIP LOCKED: reapers of several servers take different runs; a run
                // whose worker is writing right now is looked at next time.
                let ids: Vec<String> = match &worker {
                    None => {
                        sqlx::query_scalar(
                            "SELECT id FROM runs WHERE lease_token IS NOT NULL AND lease_expires_at < now()
                               AND status IN ('starting', 'running')
                               AND ($1::text IS NULL OR worker_id IS DISTINCT FROM $1)
                             ORDER BY seq FOR UPDATE SKIP LOCKED",
                        )
                        .bind(&except)
                        .fetch_all(&mut *c)
                        .await?
                    }
                    Some(w) => {
                        sqlx::query_scalar(
                            "SELECT id FROM runs WHERE worker_id = $1
                               AND status IN ('starting', 'running') ORDER BY seq FOR UPDATE",
                        )
                        .bind(w)
                        .fetch_all(&mut *c)
                        .await?
                    }
                };
                let mut out = Vec::with_capacity(ids.len());
                for rid in ids {
                    let id: RunId = rid.parse().map_err(|e| corrupt("run id", e))?;
                    let Some(run) = get_run_in(c, id, true).await? else {
                        continue;
                    };
                    let (why, line) = crate::reaped_because(&run, reason.as_deref());
                    append_in(c, &rid, std::slice::from_ref(&line)).await?;
                    let data = TransitionData {
                        error: Some(why),
                        ..Default::default()
                    };
                    if let Some(r) =
                        transition_in(c, id, RunStatus::SystemFailure, &data).await?
                    {
                        out.push(r);
                    }
                }
                Ok(out)
            })
        })
        .await
    }

    async fn claim_next(&self, worker_id: &str, lease: Duration) -> Result<Option<Run>> {
        let at = stoa_core::time::now();
        // SKIP LOCKED: concurrent claimers each take a different run instead of
        // queueing on the first one's lock.
        let row = sqlx::query(concat!(
            "WITH claimed AS (
                UPDATE runs SET status = 'starting', worker_id = $1, pending_reason = NULL,
                    phases = phases || $2, lease_token = $3,
                    lease_expires_at = now() + $4 * interval '1 millisecond', lease_heard_at = now(),
                    attempt = attempt + 1, control = NULL
                WHERE seq = (SELECT seq FROM runs WHERE status = 'pending'
                             ORDER BY priority DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED)
                RETURNING ",
            run_columns!(),
            ")
             SELECT claimed.*, pg_notify('stoa_changes', 'state:' || id || ':' || current_setting('application_name'))
             FROM claimed"
        ))
        .bind(worker_id)
        .bind(phase("placed", &at))
        .bind(new_token())
        .bind(millis(lease))
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn queue_snapshot(&self) -> Result<(Vec<StoredPending>, Vec<StoredActive>)> {
        // Both lists as of one moment.
        let mut tx = self.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let pending: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT id, org_id, execution_type, priority, seq FROM runs WHERE status = 'pending' ORDER BY seq",
        )
        .fetch_all(&mut *tx)
        .await?;
        let active: Vec<(String, String, String, String, Json<Vec<String>>)> = sqlx::query_as(
            "SELECT id, worker_id, org_id, execution_type, gpu_ids FROM runs
             WHERE status IN ('starting', 'running') AND lease_token IS NOT NULL AND worker_id IS NOT NULL",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            pending
                .into_iter()
                .map(|(id, org, profile, priority, seq)| {
                    Ok(StoredPending {
                        run: id.parse().map_err(|e| corrupt("run id", e))?,
                        org,
                        profile,
                        priority,
                        seq: seq as u64,
                    })
                })
                .collect::<Result<_>>()?,
            active
                .into_iter()
                .map(|(id, worker, org, profile, gpus)| {
                    Ok(StoredActive {
                        run: id.parse().map_err(|e| corrupt("run id", e))?,
                        worker,
                        org,
                        profile,
                        gpus: gpus.0,
                    })
                })
                .collect::<Result<_>>()?,
        ))
    }
}
