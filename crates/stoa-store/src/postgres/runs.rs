//! PostgreSQL: runs: their records, states and timelines.

use super::*;

impl PgStore {
    /// One try of an insert (see migration 0002); `None` when the run its key found was
    /// deleted before it could be read.
    async fn insert_once(&self, run: &NewRun, max_queued: usize) -> Result<Option<Inserted>> {
        let started = std::time::Instant::now();
        let r = run;
        let at = stoa_core::time::now();
        let window = chrono::Duration::from_std(stoa_core::record::IDEMPOTENCY_WINDOW)
            .expect("the window fits");
        // One round trip (see migration 0002): the insert of a start is the hot path.
        let (outcome, existing, queued): (String, Option<String>, Option<i64>) = sqlx::query_as(
            "SELECT * FROM stoa_insert_run($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
        )
        .bind(r.id.to_string())
        .bind(&r.org_id.0)
        .bind(r.job_type.as_str())
        .bind(&r.execution_type)
        .bind(&r.file_name)
        .bind(&r.spec)
        .bind(r.timeout_s)
        .bind(at)
        .bind(Json(serde_json::json!([{"phase": "queued", "at": stoa_core::time::stamp(&at)}])))
        .bind(&r.run_name)
        .bind(Json(&r.labels))
        .bind(Json(&r.metadata))
        .bind(Json(&r.callback_urls))
        .bind(r.price_per_hour)
        .bind(&r.pending_reason)
        .bind(r.priority)
        .bind(&r.idempotency_key)
        .bind(r.parent_id.map(|p| p.to_string()))
        .bind((max_queued != usize::MAX).then(|| i64::try_from(max_queued).unwrap_or(i64::MAX)))
        .bind(at - window)
        .fetch_one(self.pool())
        .await?;
        crate::record_op(started.elapsed());
        match outcome.as_str() {
            "new" => {
                self.announce_queued();
                Ok(Some(Inserted::New))
            }
            "over" => Ok(Some(Inserted::OverLimit {
                queued: queued.unwrap_or(0).max(0) as usize,
            })),
            "existing" => {
                let id: RunId = existing
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| corrupt("run id", e))?;
                Ok(self
                    .get_run(id)
                    .await?
                    .map(|r| Inserted::Existing(Box::new(r))))
            }
            other => Err(corrupt("stoa_insert_run outcome", other)),
        }
    }
}

#[async_trait]
impl RunStore for PgStore {
    async fn insert_run_within(&self, run: &NewRun, max_queued: usize) -> Result<Inserted> {
        // The run a key found may be deleted before it is read: then the key is free.
        for _ in 0..3 {
            if let Some(i) = self.insert_once(run, max_queued).await? {
                return Ok(i);
            }
        }
        Err(corrupt(
            "idempotent run",
            "deleted while it was read, three times",
        ))
    }

    async fn insert_selection(
        &self,
        parent: &NewRun,
        children: &[NewRun],
        max_queued: usize,
    ) -> Result<Inserted> {
        let (parent, children) = (parent.clone(), children.to_vec());
        self.tx(move |c| {
            Box::pin(async move {
                let queued = lock_org_pending(c, &parent.org_id).await?;
                if max_queued != usize::MAX && queued.saturating_add(children.len()) > max_queued
                {
                    return Ok(Inserted::OverLimit { queued });
                }
                let at = stoa_core::time::now();
                insert_in(c, &parent, at).await?;
                sqlx::query(
                    "UPDATE runs SET status = 'starting', worker_id = 'coordinator', pending_reason = NULL,
                        phases = phases || $2
                     WHERE id = $1",
                )
                .bind(parent.id.to_string())
                .bind(phase("placed", &at))
                .execute(&mut *c)
                .await?;
                transition_in(c, parent.id, RunStatus::Running, &TransitionData::default())
                    .await?;
                for child in &children {
                    insert_in(c, child, at).await?;
                }
                Ok(Inserted::New)
            })
        })
        .await
        .inspect(|i| {
            if *i == Inserted::New {
                self.announce_queued();
            }
        })
    }

    async fn run_by_idempotency_key(&self, org: &OrgId, key: &str) -> Result<Option<Run>> {
        let (org, key) = (org.0.clone(), key.to_string());
        self.tx(move |c| Box::pin(async move { idempotent_run(c, &org, &key).await }))
            .await
    }

    async fn pending_runs(&self) -> Result<Vec<Run>> {
        runs_from(
            sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM runs WHERE status = 'pending' ORDER BY seq"
            ))
            .fetch_all(self.pool())
            .await?,
        )
    }

    async fn children(&self, parent: RunId) -> Result<Vec<Run>> {
        runs_from(
            sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM runs WHERE parent_id = $1 ORDER BY seq"
            ))
            .bind(parent.to_string())
            .fetch_all(self.pool())
            .await?,
        )
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>> {
        sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool())
        .await?
        .as_ref()
        .map(run_from_row)
        .transpose()
    }

    async fn list_runs(&self, org: &OrgId, filter: &RunFilter) -> Result<Vec<Run>> {
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        runs_from(
            sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM runs WHERE ",
                run_filter!(),
                " ORDER BY seq DESC LIMIT $7 OFFSET $8"
            ))
            .bind(&org.0)
            .bind(&statuses)
            .bind(&filter.label)
            .bind(&filter.run_name)
            .bind(&filter.kind)
            .bind(&filter.profile)
            .bind(filter.limit)
            .bind(filter.offset)
            .fetch_all(self.pool())
            .await?,
        )
    }

    async fn count_runs_by_status(&self, org: &OrgId) -> Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*)::bigint FROM runs WHERE org_id = $1 GROUP BY status",
        )
        .bind(&org.0)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn total_billed(&self, org: &OrgId) -> Result<f64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(SUM(COALESCE(price_per_hour, 0) *
                EXTRACT(EPOCH FROM (COALESCE(job_end, $2) - job_start))::double precision / 3600.0), 0.0)::double precision
             FROM runs WHERE org_id = $1 AND job_start IS NOT NULL",
        )
        .bind(&org.0)
        .bind(stoa_core::time::now())
        .fetch_one(self.pool())
        .await?)
    }

    async fn count_runs(&self, org: &OrgId, filter: &RunFilter) -> Result<i64> {
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        Ok(sqlx::query_scalar(concat!(
            "SELECT COUNT(*)::bigint FROM runs WHERE ",
            run_filter!()
        ))
        .bind(&org.0)
        .bind(&statuses)
        .bind(&filter.label)
        .bind(&filter.run_name)
        .bind(&filter.kind)
        .bind(&filter.profile)
        .fetch_one(self.pool())
        .await?)
    }

    async fn delete_run(&self, id: RunId) -> Result<bool> {
        self.tx(move |c| {
            Box::pin(async move {
                let rid = id.to_string();
                let n = sqlx::query(concat!(
                    "DELETE FROM runs WHERE id = $1 AND status NOT IN ",
                    active!()
                ))
                .bind(&rid)
                .execute(&mut *c)
                .await?
                .rows_affected();
                if n > 0 {
                    forget_run(c, &rid).await?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn transition(
        &self,
        id: RunId,
        to: RunStatus,
        data: TransitionData,
    ) -> Result<Option<Run>> {
        self.tx(move |c| Box::pin(async move { transition_in(c, id, to, &data).await }))
            .await
    }

    async fn set_pending_reason(&self, id: RunId, reason: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET pending_reason = $2 WHERE id = $1 AND status IN ('pending', 'starting')
               AND pending_reason IS DISTINCT FROM $2",
        )
        .bind(id.to_string())
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn set_slurm_job(&self, id: RunId, job: &str) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET slurm_job_id = $2 WHERE id = $1 AND status IN ('starting', 'running')",
        )
        .bind(id.to_string())
        .bind(job)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn set_run_ports(&self, id: RunId, ports: &BTreeMap<u16, String>) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET ports = $2 WHERE id = $1 AND status IN ('starting', 'running')",
        )
        .bind(id.to_string())
        .bind(Json(ports))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn add_phase(&self, id: RunId, token: &str, name: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE runs SET phases = phases || $2
             WHERE id = $1 AND lease_token = $3 AND status IN ('starting', 'running')",
        )
        .bind(id.to_string())
        .bind(phase(name, &stoa_core::time::now()))
        .bind(token)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn set_output_truncated(&self, id: RunId) -> Result<()> {
        sqlx::query("UPDATE runs SET output_truncated = TRUE WHERE id = $1")
            .bind(id.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn active_runs(&self) -> Result<Vec<Run>> {
        runs_from(
            sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM runs WHERE status IN ('starting', 'running') ORDER BY seq"
            ))
            .fetch_all(self.pool())
            .await?,
        )
    }

    async fn prune_runs(&self, before: Time, limit: i64) -> Result<u64> {
        self.tx(move |c| {
            Box::pin(async move {
                // SKIP LOCKED: two servers' retention passes take different runs.
                let ids: Vec<String> = sqlx::query_scalar(concat!(
                    "SELECT id FROM runs WHERE COALESCE(job_end, created_at) < $1 AND status NOT IN ",
                    active!(),
                    " ORDER BY COALESCE(job_end, created_at) LIMIT $2 FOR UPDATE SKIP LOCKED"
                ))
                .bind(before)
                .bind(limit)
                .fetch_all(&mut *c)
                .await?;
                for rid in &ids {
                    sqlx::query("DELETE FROM runs WHERE id = $1")
                        .bind(rid)
                        .execute(&mut *c)
                        .await?;
                    forget_run(c, rid).await?;
                }
                Ok(ids.len() as u64)
            })
        })
        .await
    }

    async fn count_all_by_status(&self) -> Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*)::bigint FROM runs GROUP BY status")
                .fetch_all(self.pool())
                .await?;
        Ok(rows.into_iter().collect())
    }
}
