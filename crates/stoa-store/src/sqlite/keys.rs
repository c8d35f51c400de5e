//! SQLite: organisations and API keys.

use super::*;

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create_org(&self, slug: &str, name: &str) -> Result<Org> {
        let org = Org {
            id: OrgId(format!("org_{}", uuid::Uuid::now_v7().simple())),
            slug: slug.to_string(),
            name: name.to_string(),
            created_at: stoa_core::time::now(),
        };
        let o = org.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO orgs (id, slug, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![o.id.0, o.slug, o.name, stamp(&o.created_at)],
            )?;
            Ok(())
        })
        .await?;
        Ok(org)
    }

    async fn get_org(&self, id: &OrgId) -> Result<Option<Org>> {
        let id = id.0.clone();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id, slug, name, created_at FROM orgs WHERE id = ?1",
                [id],
                org_from_row,
            )
            .optional()?)
        })
        .await
    }

    async fn find_org(&self, slug_or_id: &str) -> Result<Option<Org>> {
        let s = slug_or_id.to_string();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id, slug, name, created_at FROM orgs WHERE id = ?1 OR slug = ?1",
                [s],
                org_from_row,
            )
            .optional()?)
        })
        .await
    }

    async fn list_orgs(&self) -> Result<Vec<Org>> {
        self.call(|c| {
            let mut st =
                c.prepare("SELECT id, slug, name, created_at FROM orgs ORDER BY created_at")?;
            let rows = st
                .query_map([], org_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_key(&self, key: &ApiKey) -> Result<()> {
        let k = key.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO api_keys (id, org_id, name, prefix, hash, is_admin, is_active, created_at, last_used_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![k.id, k.org_id.0, k.name, k.prefix, k.hash, k.is_admin, k.is_active, stamp(&k.created_at), k.last_used_at.as_ref().map(stamp)],
            )?;
            Ok(())
        })
        .await
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<(ApiKey, Org)>> {
        let h = hash.to_string();
        self.call(move |c| {
            Ok(c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS}, o.id, o.slug, o.name, o.created_at FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.hash = ?1 AND k.is_active = 1"
                ))?
                .query_row([h], |r| {
                    let key = key_from_row(r)?;
                    let org = Org {
                        id: OrgId(r.get(10)?),
                        slug: r.get(11)?,
                        name: r.get(12)?,
                        created_at: time_at(r, 13)?,
                    };
                    Ok((key, org))
                })
                .optional()?)
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.call(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys k ORDER BY k.created_at"
            ))?;
            let rows = st
                .query_map([], key_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn revoke_key(&self, id_or_prefix: &str) -> Result<bool> {
        let s = id_or_prefix.to_string();
        self.call(move |c| {
            let n = c.execute(
                "UPDATE api_keys SET is_active = 0 WHERE is_active = 1 AND (id = ?1 OR prefix = ?1)",
                [s],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn count_keys(&self) -> Result<i64> {
        self.call(|c| Ok(c.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?))
            .await
    }

    async fn touch_key(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn end_sessions(&self, id: &str, at: Time) -> Result<()> {
        let id = id.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE api_keys SET sessions_after = ?2 WHERE id = ?1",
                params![id, stamp(&at)],
            )?;
            Ok(())
        })
        .await
    }
}
