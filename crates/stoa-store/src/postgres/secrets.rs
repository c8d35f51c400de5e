//! PostgreSQL: sealed secrets: org variables and callback signing secrets.

use super::*;

#[async_trait]
impl SecretStore for PgStore {
    async fn upsert_secrets(
        &self,
        org: &OrgId,
        items: Vec<(String, Sealed, bool)>,
    ) -> Result<Vec<Secret>> {
        let org = org.0.clone();
        self.tx(move |c| {
            Box::pin(async move {
                let at = stoa_core::time::now();
                let mut out = Vec::new();
                for (name, sealed, is_secret) in items {
                    let id = format!("env_{}", uuid::Uuid::now_v7().simple());
                    let row = sqlx::query(
                        "INSERT INTO secrets (id, org_id, name, ciphertext, nonce, key_id, is_secret, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
                         ON CONFLICT (org_id, name) DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce,
                            key_id = excluded.key_id, is_secret = excluded.is_secret, updated_at = excluded.updated_at
                         RETURNING id, org_id, name, ciphertext, nonce, key_id, is_secret, created_at, updated_at",
                    )
                    .bind(id)
                    .bind(&org)
                    .bind(&name)
                    .bind(&sealed.ciphertext)
                    .bind(&sealed.nonce)
                    .bind(&sealed.key_id)
                    .bind(is_secret)
                    .bind(at)
                    .fetch_one(&mut *c)
                    .await?;
                    out.push(secret_from_row(&row)?);
                }
                Ok(out)
            })
        })
        .await
    }

    async fn list_secrets(&self, org: &OrgId) -> Result<Vec<Secret>> {
        sqlx::query(
            "SELECT id, org_id, name, ciphertext, nonce, key_id, is_secret, created_at, updated_at
             FROM secrets WHERE org_id = $1 ORDER BY name",
        )
        .bind(&org.0)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(secret_from_row)
        .collect()
    }

    async fn delete_secret(&self, org: &OrgId, id_or_name: &str) -> Result<bool> {
        Ok(
            sqlx::query("DELETE FROM secrets WHERE org_id = $1 AND (id = $2 OR name = $2)")
                .bind(&org.0)
                .bind(id_or_name)
                .execute(self.pool())
                .await?
                .rows_affected()
                > 0,
        )
    }

    async fn delete_all_secrets(&self, org: &OrgId) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM secrets WHERE org_id = $1")
            .bind(&org.0)
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    async fn all_sealed(&self) -> Result<Vec<(SealedRef, Sealed)>> {
        let mut out = Vec::new();
        for r in sqlx::query("SELECT id, ciphertext, nonce, key_id FROM secrets")
            .fetch_all(self.pool())
            .await?
        {
            out.push((SealedRef::Secret(r.try_get("id")?), sealed_from_row(&r)?));
        }
        for r in sqlx::query("SELECT org_id, ciphertext, nonce, key_id FROM org_callback_secrets")
            .fetch_all(self.pool())
            .await?
        {
            out.push((
                SealedRef::CallbackSecret(OrgId(r.try_get("org_id")?)),
                sealed_from_row(&r)?,
            ));
        }
        Ok(out)
    }

    async fn reseal(&self, items: Vec<(SealedRef, Sealed)>) -> Result<()> {
        self.tx(move |c| {
            Box::pin(async move {
                for (r, s) in items {
                    let (sql, key) = match r {
                        SealedRef::Secret(id) => (
                            "UPDATE secrets SET ciphertext = $2, nonce = $3, key_id = $4 WHERE id = $1",
                            id,
                        ),
                        SealedRef::CallbackSecret(org) => (
                            "UPDATE org_callback_secrets SET ciphertext = $2, nonce = $3, key_id = $4 WHERE org_id = $1",
                            org.0,
                        ),
                    };
                    sqlx::query(sql)
                        .bind(key)
                        .bind(&s.ciphertext)
                        .bind(&s.nonce)
                        .bind(&s.key_id)
                        .execute(&mut *c)
                        .await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn callback_secret(&self, org: &OrgId) -> Result<Option<Sealed>> {
        sqlx::query("SELECT ciphertext, nonce, key_id FROM org_callback_secrets WHERE org_id = $1")
            .bind(&org.0)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(sealed_from_row)
            .transpose()
    }

    async fn set_callback_secret(&self, org: &OrgId, sealed: Sealed) -> Result<()> {
        sqlx::query(
            "INSERT INTO org_callback_secrets (org_id, ciphertext, nonce, key_id, updated_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (org_id) DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce,
                key_id = excluded.key_id, updated_at = excluded.updated_at",
        )
        .bind(&org.0)
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(&sealed.key_id)
        .bind(stoa_core::time::now())
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
