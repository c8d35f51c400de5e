//! SQLite: the queue and its leases: claims, heartbeats, controls, the reaper.

use super::*;

#[async_trait]
impl QueueStore for SqliteStore {
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
                let (why, line) = crate::reaped_because(&run, reason.as_deref());
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

    async fn queue_snapshot(&self) -> Result<(Vec<StoredPending>, Vec<StoredActive>)> {
        self.call(|c| {
            let pending = c
                .prepare_cached(
                    "SELECT id, org_id, execution_type, priority, seq FROM runs WHERE status = 'pending' ORDER BY seq",
                )?
                .query_map([], |r| {
                    let id: String = r.get(0)?;
                    Ok(StoredPending {
                        run: id.parse().map_err(|e| corrupt("run id", e))?,
                        org: r.get(1)?,
                        profile: r.get(2)?,
                        priority: r.get(3)?,
                        seq: r.get::<_, i64>(4)? as u64,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let active = c
                .prepare_cached(
                    "SELECT id, worker_id, org_id, execution_type, gpu_ids FROM runs
                     WHERE status IN ('starting', 'running') AND lease_token IS NOT NULL AND worker_id IS NOT NULL",
                )?
                .query_map([], |r| {
                    let id: String = r.get(0)?;
                    Ok(StoredActive {
                        run: id.parse().map_err(|e| corrupt("run id", e))?,
                        worker: r.get(1)?,
                        org: r.get(2)?,
                        profile: r.get(3)?,
                        gpus: json_col(r, 4, "gpu_ids")?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((pending, active))
        })
        .await
    }
}
