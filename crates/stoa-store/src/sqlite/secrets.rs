//! SQLite: sealed secrets: org variables and callback signing secrets.

use super::*;

#[async_trait]
impl SecretStore for SqliteStore {
    async fn upsert_secrets(
        &self,
        org: &OrgId,
        items: Vec<(String, Sealed, bool)>,
    ) -> Result<Vec<Secret>> {
        let org = org.0.clone();
        self.call(move |c| {
            let tx = c.transaction()?;
            let at = now();
            let mut out = Vec::new();
            for (name, sealed, is_secret) in items {
                let id = format!("env_{}", uuid::Uuid::now_v7().simple());
                tx.execute(
                    "INSERT INTO secrets (id, org_id, name, ciphertext, nonce, key_id, is_secret, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
                     ON CONFLICT (org_id, name) DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce,
                        key_id = excluded.key_id, is_secret = excluded.is_secret, updated_at = excluded.updated_at",
                    params![id, org, name, sealed.ciphertext, sealed.nonce, sealed.key_id, is_secret, at],
                )?;
                out.push(tx.query_row(
                    &format!("SELECT {SECRET_COLUMNS} FROM secrets WHERE org_id = ?1 AND name = ?2"),
                    params![org, name],
                    secret_from_row,
                )?);
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn list_secrets(&self, org: &OrgId) -> Result<Vec<Secret>> {
        let org = org.0.clone();
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {SECRET_COLUMNS} FROM secrets WHERE org_id = ?1 ORDER BY name"
            ))?;
            let rows = st
                .query_map([org], secret_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn delete_secret(&self, org: &OrgId, id_or_name: &str) -> Result<bool> {
        let org = org.0.clone();
        let key = id_or_name.to_string();
        self.call(move |c| {
            Ok(c.execute(
                "DELETE FROM secrets WHERE org_id = ?1 AND (id = ?2 OR name = ?2)",
                params![org, key],
            )? > 0)
        })
        .await
    }

    async fn delete_all_secrets(&self, org: &OrgId) -> Result<u64> {
        let org = org.0.clone();
        self.call(move |c| Ok(c.execute("DELETE FROM secrets WHERE org_id = ?1", [org])? as u64))
            .await
    }

    async fn all_sealed(&self) -> Result<Vec<(SealedRef, Sealed)>> {
        self.call(|c| {
            let mut out = Vec::new();
            let mut st = c.prepare("SELECT id, ciphertext, nonce, key_id FROM secrets")?;
            for r in st.query_map([], |r| {
                Ok((
                    SealedRef::Secret(r.get(0)?),
                    Sealed {
                        ciphertext: r.get(1)?,
                        nonce: r.get(2)?,
                        key_id: r.get(3)?,
                    },
                ))
            })? {
                out.push(r?);
            }
            let mut st =
                c.prepare("SELECT org_id, ciphertext, nonce, key_id FROM org_callback_secrets")?;
            for r in st.query_map([], |r| {
                Ok((
                    SealedRef::CallbackSecret(OrgId(r.get(0)?)),
                    Sealed {
                        ciphertext: r.get(1)?,
                        nonce: r.get(2)?,
                        key_id: r.get(3)?,
                    },
                ))
            })? {
                out.push(r?);
            }
            Ok(out)
        })
        .await
    }

    async fn reseal(&self, items: Vec<(SealedRef, Sealed)>) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            for (r, s) in items {
                match r {
                    SealedRef::Secret(id) => tx.execute(
                        "UPDATE secrets SET ciphertext = ?2, nonce = ?3, key_id = ?4 WHERE id = ?1",
                        params![id, s.ciphertext, s.nonce, s.key_id],
                    )?,
                    SealedRef::CallbackSecret(org) => tx.execute(
                        "UPDATE org_callback_secrets SET ciphertext = ?2, nonce = ?3, key_id = ?4 WHERE org_id = ?1",
                        params![org.0, s.ciphertext, s.nonce, s.key_id],
                    )?,
                };
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn callback_secret(&self, org: &OrgId) -> Result<Option<Sealed>> {
        let org = org.0.clone();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT ciphertext, nonce, key_id FROM org_callback_secrets WHERE org_id = ?1",
                [org],
                |r| {
                    Ok(Sealed {
                        ciphertext: r.get(0)?,
                        nonce: r.get(1)?,
                        key_id: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    async fn set_callback_secret(&self, org: &OrgId, sealed: Sealed) -> Result<()> {
        let org = org.0.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO org_callback_secrets (org_id, ciphertext, nonce, key_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (org_id) DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce,
                    key_id = excluded.key_id, updated_at = excluded.updated_at",
                params![org, sealed.ciphertext, sealed.nonce, sealed.key_id, now()],
            )?;
            Ok(())
        })
        .await
    }
}
