//! Dashboard sessions: an API key exchanged for a signed cookie, and the CSRF token
//! every POST carries.
//!
//! The cookie is `v1.<issued>.<expiry>.<nonce>.<key hash>.<signature>`: when it was
//! issued (Unix milliseconds), its expiry (Unix seconds), a random nonce and the stored
//! hash of the key (never the key), signed with HMAC-SHA256 under a key derived from
//! the secrets master key. Each request looks the key up by its hash: a revoked key
//! ends its sessions at once, and a sign-out records on the key (in the store, so on
//! every server) that its sessions issued until then are over. The CSRF token is an
//! HMAC of the session's nonce: a page of the session can read it, another site cannot.

use std::collections::HashMap;

use axum::Form;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use maud::{Markup, html};
use rand::Rng;
use sha2::Sha256;

use super::{UiError, layout};
use crate::auth::{Caller, hash_key};
use crate::state::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "stoa_session";

/// A signed-in browser.
pub struct Session {
    pub caller: Caller,
    csrf: String,
}

impl Session {
    /// The hidden form field that carries the CSRF token.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf); }
    }

    /// Refuses a form that lacks this session's CSRF token.
    pub fn check(&self, form: &HashMap<String, String>) -> Result<(), UiError> {
        let given = form.get("csrf").map(String::as_bytes).unwrap_or_default();
        if constant_eq(given, self.csrf.as_bytes()) {
            Ok(())
        } else {
            Err(UiError::Csrf)
        }
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn mac(state: &AppState, data: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(&state.keyring.session_key())
        .expect("HMAC takes any key length");
    m.update(data);
    m
}

fn csrf_of(state: &AppState, nonce: &str) -> String {
    hex::encode(
        mac(state, format!("csrf.{nonce}").as_bytes())
            .finalize()
            .into_bytes(),
    )
}

/// A new session cookie's value for the key with stored hash `key_hash`.
fn new_cookie(state: &AppState, key_hash: &str) -> String {
    let now = chrono::Utc::now();
    let issued = now.timestamp_millis();
    let expires = now.timestamp() + state.config.ui.session_ttl_s as i64;
    let nonce = hex::encode(rand::rng().random::<[u8; 16]>());
    let payload = format!("v1.{issued}.{expires}.{nonce}.{key_hash}");
    let sig = hex::encode(mac(state, payload.as_bytes()).finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// The parts of a well-signed, unexpired cookie value: (issued in Unix milliseconds,
/// nonce, key hash).
fn verify<'a>(state: &AppState, value: &'a str) -> Option<(i64, &'a str, &'a str)> {
    let (payload, sig) = value.rsplit_once('.')?;
    mac(state, payload.as_bytes())
        .verify_slice(&hex::decode(sig).ok()?)
        .ok()?;
    let mut parts = payload.split('.');
    let (Some("v1"), Some(issued), Some(exp), Some(nonce), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let exp: i64 = exp.parse().ok()?;
    let issued: i64 = issued.parse().ok()?;
    (exp > chrono::Utc::now().timestamp()).then_some((issued, nonce, hash))
}

/// The session cookie's value in a request.
fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v)
}

impl FromRequestParts<AppState> for Session {
    type Rejection = UiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let value = cookie_value(&parts.headers).ok_or(UiError::SignIn)?;
        let (issued, nonce, hash) = verify(state, value).ok_or(UiError::SignIn)?;
        let (key, org) = state
            .store
            .key_by_hash(hash)
            .await?
            .ok_or(UiError::SignIn)?;
        if key
            .sessions_after
            .is_some_and(|after| issued <= after.timestamp_millis())
        {
            return Err(UiError::SignIn);
        }
        crate::auth::note_use(state, &key).await;
        Ok(Session {
            csrf: csrf_of(state, nonce),
            caller: Caller {
                org,
                key_id: key.id,
                is_admin: key.is_admin,
            },
        })
    }
}

fn login_form(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            p { "Sign in with an API key of your organisation (" code { "lk_…" } "). The browser keeps a session, not the key." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.stack method="post" action="/ui/login" {
                label for="key" { "API key" }
                input #key name="key" type="password" autocomplete="current-password" required autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// The sign-in page.
pub async fn login_page() -> Markup {
    login_form(None)
}

/// Exchanges an API key for a session cookie.
pub async fn login(
    State(state): State<AppState>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let key = form.get("key").map(|k| k.trim()).unwrap_or_default();
    let hash = hash_key(key);
    if key.is_empty() || state.store.key_by_hash(&hash).await?.is_none() {
        return Ok((
            StatusCode::UNAUTHORIZED,
            login_form(Some("That API key is not valid, or it was revoked.")),
        )
            .into_response());
    }
    let secure = state
        .config
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        new_cookie(&state, &hash),
        state.config.ui.session_ttl_s,
        if secure { "; Secure" } else { "" }
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui/")).into_response())
}

/// Ends the sessions of the key (in every browser signed in with it, on every server)
/// and forgets the cookie.
pub async fn logout(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    session.check(&form)?;
    state
        .store
        .end_sessions(&session.caller.key_id, stoa_core::time::now())
        .await?;
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok(([(header::SET_COOKIE, clear)], Redirect::to("/ui/login")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_eq_compares() {
        assert!(constant_eq(b"abc", b"abc"));
        assert!(!constant_eq(b"abc", b"abd"));
        assert!(!constant_eq(b"", b"abc"));
    }
}
