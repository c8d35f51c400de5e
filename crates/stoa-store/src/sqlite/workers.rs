//! SQLite: join tokens and the workers of the fleet.

use super::*;

#[async_trait]
impl WorkerStore for SqliteStore {
    async fn insert_join_token(
        &self,
        id: &str,
        hash: &str,
        expires_at: Option<Time>,
    ) -> Result<()> {
        let (id, hash, exp) = (
            id.to_string(),
            hash.to_string(),
            expires_at.as_ref().map(stamp),
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

    async fn list_join_tokens(&self) -> Result<Vec<(String, Time, Option<Time>, bool)>> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT id, created_at, expires_at, revoked FROM worker_join_tokens ORDER BY created_at DESC",
            )?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, time_at(r, 1)?, opt_time_at(r, 2)?, r.get(3)?)))?
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
}
