//! SQLite: runs: their records, states and timelines.

use super::*;

#[async_trait]
impl RunStore for SqliteStore {
    async fn insert_run_within(&self, run: &NewRun, max_queued: usize) -> Result<Inserted> {
        let r = run.clone();
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let at = now();
            if let Some(key) = &r.idempotency_key
                && let Some(existing) = idempotent_run(&tx, &r.org_id.0, key)?
            {
                return Ok(Inserted::Existing(Box::new(existing)));
            }
            if let Some(queued) = over_limit(&tx, &r.org_id, 1, max_queued)? {
                return Ok(Inserted::OverLimit { queued });
            }
            insert_sync(&tx, &r, &at)?;
            tx.commit()?;
            Ok(Inserted::New)
        })
        .await
    }

    async fn insert_selection(
        &self,
        parent: &NewRun,
        children: &[NewRun],
        max_queued: usize,
    ) -> Result<Inserted> {
        let (parent, children) = (parent.clone(), children.to_vec());
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(queued) = over_limit(&tx, &parent.org_id, children.len(), max_queued)? {
                return Ok(Inserted::OverLimit { queued });
            }
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
            Ok(Inserted::New)
        })
        .await
    }

    async fn run_by_idempotency_key(&self, org: &OrgId, key: &str) -> Result<Option<Run>> {
        let org = org.0.clone();
        let key = key.to_string();
        self.call(move |c| Ok(idempotent_run(c, &org, &key)?)).await
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
                    params![
                        org,
                        status_json,
                        f.limit,
                        f.offset,
                        f.label,
                        f.run_name,
                        f.kind,
                        f.profile
                    ],
                    run_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
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
                        f.run_name,
                        f.kind,
                        f.profile
                    ],
                    |r| r.get(0),
                )?;
            Ok(n)
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

    async fn set_slurm_job(&self, id: RunId, job: &str) -> Result<()> {
        let job = job.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET slurm_job_id = ?2 WHERE id = ?1 AND status IN ('starting', 'running')",
                params![id.to_string(), job],
            )?;
            Ok(())
        })
        .await
    }

    async fn set_run_ports(&self, id: RunId, ports: &BTreeMap<u16, String>) -> Result<()> {
        let ports = serde_json::to_string(ports).expect("a map of strings serialises");
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET ports = ?2 WHERE id = ?1 AND status IN ('starting', 'running')",
                params![id.to_string(), ports],
            )?;
            Ok(())
        })
        .await
    }

    async fn add_phase(&self, id: RunId, token: &str, phase: &str) -> Result<bool> {
        let (token, phase) = (token.to_string(), phase.to_string());
        self.call(move |c| {
            let n = c.prepare_cached(
                "UPDATE runs SET phases = json_insert(phases, '$[#]', json_object('phase', ?2, 'at', ?3))
                 WHERE id = ?1 AND lease_token = ?4 AND status IN ('starting', 'running')",
            )?
            .execute(params![id.to_string(), phase, now(), token])?;
            Ok(n > 0)
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

    async fn prune_runs(&self, before: Time, limit: i64) -> Result<u64> {
        let before = stamp(&before);
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
}
