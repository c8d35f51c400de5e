//! API keys: generation, hashing, the first-start bootstrap, and the extractor that
//! turns a bearer token into the calling org.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::Rng;
use sha2::{Digest, Sha256};
use stoa_store::{ApiKey, Org, Store};

use crate::error::ApiError;
use crate::state::AppState;

/// Characters of a key kept in clear as its prefix (`lk_` and 8 more).
const PREFIX_LEN: usize = 11;

/// A new random API key: `lk_` and 40 base-62 characters.
pub fn generate_key() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("lk_{body}")
}

/// The stored hash of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Builds the stored form of `secret` for `org`.
pub fn key_record(secret: &str, org: &Org, name: &str, is_admin: bool) -> ApiKey {
    ApiKey {
        id: format!("key_{}", uuid::Uuid::now_v7().simple()),
        org_id: org.id.clone(),
        name: name.to_string(),
        prefix: secret.chars().take(PREFIX_LEN).collect(),
        hash: hash_key(secret),
        is_admin,
        is_active: true,
        created_at: stoa_core::time::now(),
        last_used_at: None,
        sessions_after: None,
    }
}

/// What the first start created, when it created anything.
pub struct Bootstrap {
    /// The admin key in clear; `None` when it was preset by config.
    pub generated_key: Option<String>,
}

/// On a store without keys: creates the default org and an admin key (the preset one
/// when given) and writes it to `DATA_DIR/admin.key` with mode 0600.
pub async fn bootstrap(
    store: &dyn Store,
    preset: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<Bootstrap>> {
    if store.count_keys().await? > 0 {
        return Ok(None);
    }
    let org = match store.find_org("default").await? {
        Some(o) => o,
        None => store.create_org("default", "Default").await?,
    };
    let secret = preset.map(str::to_string).unwrap_or_else(generate_key);
    store
        .insert_key(&key_record(&secret, &org, "admin", true))
        .await?;
    let path = data_dir.join("admin.key");
    write_private(&path, &format!("{secret}\n"))?;
    Ok(Some(Bootstrap {
        generated_key: preset.is_none().then_some(secret),
    }))
}

pub use stoa_config::write_private;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub org: Org,
    pub key_id: String,
    pub is_admin: bool,
}

/// Records that a key was used (by the API or the dashboard), at most once a minute so
/// reads stay reads; best effort: a full disk must not turn every request into a 500.
pub async fn note_use(state: &AppState, key: &ApiKey) {
    let stale = key
        .last_used_at
        .is_none_or(|t| chrono::Utc::now().signed_duration_since(t).num_seconds() > 60);
    if stale && let Err(e) = state.store.touch_key(&key.id).await {
        tracing::debug!(key = %key.id, error = %e, "recording the key's last use failed");
    }
}

/// The API key of an `Authorization: Bearer <key>` header value.
pub fn bearer_token(header: &str) -> Option<&str> {
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthorized("missing Authorization: Bearer <api key>".into())
            })?;
        let token = bearer_token(header).ok_or_else(|| {
            ApiError::Unauthorized("Authorization must be 'Bearer <api key>'".into())
        })?;
        let (key, org) = state
            .store
            .key_by_hash(&hash_key(token))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("invalid or revoked API key".into()))?;
        note_use(state, &key).await;
        Ok(Caller {
            org,
            key_id: key.id,
            is_admin: key.is_admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_look_right() {
        let k = generate_key();
        assert!(k.starts_with("lk_") && k.len() == 43);
        assert_ne!(k, generate_key());
        assert_eq!(hash_key("lk_a").len(), 64);
    }
}
