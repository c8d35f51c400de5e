//! PostgreSQL: organisations and API keys.

use super::*;

#[async_trait]
impl KeyStore for PgStore {
    async fn create_org(&self, slug: &str, name: &str) -> Result<Org> {
        let org = Org {
            id: OrgId(format!("org_{}", uuid::Uuid::now_v7().simple())),
            slug: slug.to_string(),
            name: name.to_string(),
            created_at: stoa_core::time::now(),
        };
        sqlx::query("INSERT INTO orgs (id, slug, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&org.id.0)
            .bind(&org.slug)
            .bind(&org.name)
            .bind(org.created_at)
            .execute(self.pool())
            .await?;
        Ok(org)
    }

    async fn get_org(&self, id: &OrgId) -> Result<Option<Org>> {
        sqlx::query("SELECT id, slug, name, created_at FROM orgs WHERE id = $1")
            .bind(&id.0)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(org_from_row)
            .transpose()
    }

    async fn find_org(&self, slug_or_id: &str) -> Result<Option<Org>> {
        sqlx::query("SELECT id, slug, name, created_at FROM orgs WHERE id = $1 OR slug = $1")
            .bind(slug_or_id)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(org_from_row)
            .transpose()
    }

    async fn list_orgs(&self) -> Result<Vec<Org>> {
        sqlx::query("SELECT id, slug, name, created_at FROM orgs ORDER BY created_at")
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(org_from_row)
            .collect()
    }

    async fn insert_key(&self, k: &ApiKey) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, org_id, name, prefix, hash, is_admin, is_active, created_at, last_used_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&k.id)
        .bind(&k.org_id.0)
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(&k.hash)
        .bind(k.is_admin)
        .bind(k.is_active)
        .bind(k.created_at)
        .bind(k.last_used_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<(ApiKey, Org)>> {
        let row = sqlx::query(
            "SELECT k.id, k.org_id, k.name, k.prefix, k.hash, k.is_admin, k.is_active, k.created_at,
                    k.last_used_at, k.sessions_after, o.slug, o.name AS org_name, o.created_at AS org_created_at
             FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.hash = $1 AND k.is_active",
        )
        .bind(hash)
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let key = key_from_row(&r)?;
        let org = Org {
            id: key.org_id.clone(),
            slug: r.try_get("slug")?,
            name: r.try_get("org_name")?,
            created_at: r.try_get("org_created_at")?,
        };
        Ok(Some((key, org)))
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        sqlx::query(
            "SELECT id, org_id, name, prefix, hash, is_admin, is_active, created_at, last_used_at, sessions_after
             FROM api_keys ORDER BY created_at",
        )
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(key_from_row)
        .collect()
    }

    async fn revoke_key(&self, id_or_prefix: &str) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE api_keys SET is_active = FALSE WHERE is_active AND (id = $1 OR prefix = $1)",
        )
        .bind(id_or_prefix)
        .execute(self.pool())
        .await?
        .rows_affected()
            > 0)
    }

    async fn count_keys(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*)::bigint FROM api_keys")
            .fetch_one(self.pool())
            .await?)
    }

    async fn touch_key(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
            .bind(id)
            .bind(stoa_core::time::now())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn end_sessions(&self, id: &str, at: Time) -> Result<()> {
        sqlx::query("UPDATE api_keys SET sessions_after = $2 WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
