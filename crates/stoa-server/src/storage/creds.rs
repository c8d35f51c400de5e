//! S3 credentials of an org, derived from one server key so that nothing is stored and
//! every server that shares the key (`storage.credentials_key`) accepts them.
//!
//! An access key id names the org and an expiry and carries a MAC over both, so it
//! cannot be made for another org or stretched; its secret is a MAC of the access key
//! id. The S3 endpoint recomputes the secret from the id to check a request's
//! signature.

use std::path::Path;

use axum::Json;
use axum::extract::State;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use stoa_types::OrgId;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "STK";
/// Hex digits of the expiry (Unix seconds) and of the MAC at the end of an id.
const EXPIRY_HEX: usize = 10;
const MAC_HEX: usize = 24;

/// The key credentials are derived from.
pub struct CredentialKey([u8; 32]);

/// Why an access key id is not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the access key id is not one this server issued")]
    Invalid,
    #[error("the credentials expired; ask storage/credentials for new ones")]
    Expired,
}

impl CredentialKey {
    /// The configured key, else `DATA_DIR/storage.key` (made on first use, 0600).
    pub fn load(configured: Option<&str>, data_dir: &Path) -> anyhow::Result<CredentialKey> {
        let text = match configured {
            Some(k) => k.to_string(),
            None => {
                let path = data_dir.join("storage.key");
                if !path.exists() {
                    crate::auth::write_private(
                        &path,
                        &format!("{}\n", crate::secrets::generate_key_hex()),
                    )?;
                }
                std::fs::read_to_string(&path)?
            }
        };
        let bytes = hex::decode(text.trim())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("a storage credentials key is 64 hex characters"))?;
        Ok(CredentialKey(key))
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("any key length");
        for p in parts {
            m.update(p);
            m.update(b"\0");
        }
        m.finalize().into_bytes().to_vec()
    }

    /// Credentials of `org` valid until `expires` (Unix seconds).
    pub fn issue(&self, org: &OrgId, expires: i64) -> (String, String) {
        let expiry = format!("{:0width$X}", expires.max(0), width = EXPIRY_HEX);
        let mac = self.mac(&[b"access", org.0.as_bytes(), expiry.as_bytes()]);
        let id = format!(
            "{PREFIX}{}{expiry}{}",
            hex::encode_upper(org.0.as_bytes()),
            &hex::encode_upper(mac)[..MAC_HEX]
        );
        let secret = self.secret_of(&id);
        (id, secret)
    }

    fn secret_of(&self, id: &str) -> String {
        hex::encode(&self.mac(&[b"secret", id.as_bytes()])[..20])
    }

    /// The org and secret of an access key id this server issued and that has not
    /// expired at `now`.
    pub fn check(&self, id: &str, now: i64) -> Result<(OrgId, String), KeyError> {
        let body = id.strip_prefix(PREFIX).ok_or(KeyError::Invalid)?;
        if !body.is_ascii() || body.len() <= EXPIRY_HEX + MAC_HEX {
            return Err(KeyError::Invalid);
        }
        let (org_hex, rest) = body.split_at(body.len() - EXPIRY_HEX - MAC_HEX);
        let (expiry, mac) = rest.split_at(EXPIRY_HEX);
        let org = hex::decode(org_hex)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(KeyError::Invalid)?;
        let want = self.mac(&[b"access", org.as_bytes(), expiry.as_bytes()]);
        let want = &hex::encode_upper(want)[..MAC_HEX];
        if !constant_eq(want.as_bytes(), mac.as_bytes()) {
            return Err(KeyError::Invalid);
        }
        let expires = i64::from_str_radix(expiry, 16).map_err(|_| KeyError::Invalid)?;
        if expires <= now {
            return Err(KeyError::Expired);
        }
        Ok((OrgId(org), self.secret_of(id)))
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The org's bucket name (S3 rules: lowercase letters, digits and `-`).
pub fn bucket_of(org: &OrgId) -> String {
    let name: String = org
        .0
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let name = format!("stoa-{}", name.trim_matches('-'));
    name.chars().take(63).collect()
}

/// Reply of `storage/credentials`: what an S3 client needs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StorageCredentials {
    /// The S3 endpoint (path-style requests).
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// Always null: the access key itself expires.
    pub session_token: Option<String>,
    pub region: String,
    /// The org's bucket.
    pub bucket_name: String,
    /// When the credentials stop working (ISO-8601).
    pub expires_at: String,
}

/// S3 credentials for the caller's org storage.
#[utoipa::path(post, path = "/api/v2/external/storage/credentials", tag = "storage",
    responses((status = 200, body = StorageCredentials), (status = 503, body = stoa_types::ErrorBody)),
    security(("bearer" = [])))]
pub async fn credentials(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<StorageCredentials>, ApiError> {
    let Some(s3) = state.s3.as_ref() else {
        return Err(ApiError::Unavailable(
            "this server serves no S3 endpoint (storage.s3_listen = \"off\")".into(),
        ));
    };
    let ttl = state.config.storage.credentials_ttl_s as i64;
    let expires = chrono::Utc::now() + chrono::Duration::seconds(ttl);
    let (access_key, secret_key) = s3.key.issue(&caller.org.id, expires.timestamp());
    Ok(Json(StorageCredentials {
        endpoint: s3.endpoint.clone(),
        access_key,
        secret_key,
        session_token: None,
        region: state.config.storage.region.clone(),
        bucket_name: bucket_of(&caller.org.id),
        expires_at: crate::run_metrics::iso(expires),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_name_their_org_and_cannot_be_forged_or_stretched() {
        let key = CredentialKey([7; 32]);
        let org = OrgId("org_0192abc".into());
        let (id, secret) = key.issue(&org, 2_000_000_000);
        assert_eq!(key.check(&id, 1_000), Ok((org.clone(), secret.clone())));
        assert_eq!(key.check(&id, 2_000_000_000), Err(KeyError::Expired));
        // Another org's name or a later expiry in the id breaks the MAC.
        let other = id.replace(
            &hex::encode_upper("org_0192abc"),
            &hex::encode_upper("org_0192abd"),
        );
        assert_eq!(key.check(&other, 1_000), Err(KeyError::Invalid));
        let later = id.replace("0077359400", "0077359401");
        assert_ne!(later, id);
        assert_eq!(key.check(&later, 1_000), Err(KeyError::Invalid));
        // Another server's key issues ids this one refuses.
        let (theirs, _) = CredentialKey([8; 32]).issue(&org, 2_000_000_000);
        assert_eq!(key.check(&theirs, 1_000), Err(KeyError::Invalid));
        for junk in [
            "",
            "STK",
            "AKIAIOSFODNN7EXAMPLE",
            "STKzz",
            "STKé0000000000000000",
        ] {
            assert_eq!(key.check(junk, 1_000), Err(KeyError::Invalid), "{junk}");
        }
    }

    #[test]
    fn bucket_names_follow_the_s3_rules() {
        let b = bucket_of(&OrgId("org_0192ABCdef".into()));
        assert_eq!(b, "stoa-org-0192abcdef");
        let long = bucket_of(&OrgId("x".repeat(100)));
        assert_eq!(long.len(), 63);
    }
}
