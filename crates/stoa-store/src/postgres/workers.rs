//! PostgreSQL: join tokens and the workers of the fleet.

use super::*;

#[async_trait]
impl WorkerStore for PgStore {
    async fn insert_join_token(
        &self,
        id: &str,
        hash: &str,
        expires_at: Option<Time>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO worker_join_tokens (id, hash, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(hash)
        .bind(stoa_core::time::now())
        .bind(expires_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn join_token_valid(&self, hash: &str) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, i32>(
            "SELECT 1 FROM worker_join_tokens WHERE hash = $1 AND NOT revoked
               AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(hash)
        .bind(stoa_core::time::now())
        .fetch_optional(self.pool())
        .await?
        .is_some())
    }

    async fn list_join_tokens(&self) -> Result<Vec<(String, Time, Option<Time>, bool)>> {
        Ok(sqlx::query_as(
            "SELECT id, created_at, expires_at, revoked FROM worker_join_tokens ORDER BY created_at DESC",
        )
        .fetch_all(self.pool())
        .await?)
    }

    async fn revoke_join_token(&self, id: &str) -> Result<bool> {
        Ok(
            sqlx::query("UPDATE worker_join_tokens SET revoked = TRUE WHERE id = $1")
                .bind(id)
                .execute(self.pool())
                .await?
                .rows_affected()
                > 0,
        )
    }

    async fn remove_worker(&self, name: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM workers WHERE name = $1")
            .bind(name)
            .execute(self.pool())
            .await?
            .rows_affected()
            > 0)
    }

    async fn register_worker(&self, w: &WorkerRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO workers (name, token_hash, offer, registered_at, last_heard_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (name) DO UPDATE SET token_hash = $2, offer = $3,
                registered_at = $4, last_heard_at = $4",
        )
        .bind(&w.name)
        .bind(&w.token_hash)
        .bind(&w.offer)
        .bind(stoa_core::time::now())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn worker_by_token(&self, hash: &str) -> Result<Option<WorkerRecord>> {
        sqlx::query(
            "SELECT name, token_hash, offer, registered_at, last_heard_at, draining
             FROM workers WHERE token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(self.pool())
        .await?
        .as_ref()
        .map(worker_from_row)
        .transpose()
    }

    async fn touch_worker(&self, name: &str) -> Result<()> {
        sqlx::query("UPDATE workers SET last_heard_at = $2 WHERE name = $1")
            .bind(name)
            .bind(stoa_core::time::now())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        sqlx::query(
            "SELECT name, token_hash, offer, registered_at, last_heard_at, draining FROM workers ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(worker_from_row)
        .collect()
    }

    async fn set_worker_draining(&self, name: &str, draining: bool) -> Result<bool> {
        Ok(
            sqlx::query("UPDATE workers SET draining = $2 WHERE name = $1")
                .bind(name)
                .bind(draining)
                .execute(self.pool())
                .await?
                .rows_affected()
                > 0,
        )
    }
}
