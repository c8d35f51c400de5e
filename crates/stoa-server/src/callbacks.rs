//! Completion callbacks: the outbox deliverer, signatures and the SSRF guard.
//!
//! Deliveries are written by the store in the transaction that ends a run; this task
//! POSTs them, retries with exponential backoff up to `callbacks.max_attempts`, and
//! survives restarts (pending rows are picked up at start). Each POST carries
//! `Stoa-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` under the
//! org's signing secret. Addresses that are loopback, private, link-local or metadata
//! are refused after DNS resolution (and the connection goes to the address checked),
//! unless `callbacks.allow_hosts` lists them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use stoa_core::loops::{Loop, Pass};
use stoa_core::netguard;
use stoa_store::{Delivery, DeliveryState, Store};
use stoa_types::OrgId;
use tokio::sync::watch;

use crate::auth::Caller;
use crate::config::CallbacksConfig;
use crate::error::ApiError;
use crate::secrets::Keyring;
use crate::state::AppState;

/// The signature header value for `body` sent at unix time `ts`.
pub fn sign(secret: &str, ts: i64, body: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{ts}.{body}").as_bytes());
    format!("t={ts},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether an address is one a callback must not reach by default (see
/// [`stoa_core::netguard`]: loopback, private, link-local, metadata, CGNAT,
/// benchmarking, multicast, reserved, and IPv6 forms embedding such an IPv4 address).
pub fn is_internal(ip: IpAddr) -> bool {
    netguard::is_internal(ip)
}

/// Whether `ip` (of `host`) is in the allow-list (hostnames, IPs or CIDRs).
fn allowed(allow: &[String], host: &str, ip: IpAddr) -> bool {
    allow.iter().any(|entry| {
        let entry = entry.trim();
        entry.eq_ignore_ascii_case(host)
            || netguard::Cidr::parse(entry).is_some_and(|c| c.contains(ip))
    })
}

/// Why a callback URL is not called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// By policy (scheme, internal address): never retried.
    #[error("{0}")]
    Refused(String),
    /// It may work later (the name does not resolve now).
    #[error("{0}")]
    Transient(String),
}

/// Resolves a callback URL and checks every address; returns the host and the
/// addresses to connect to. Messages never contain the URL's credentials.
pub async fn check_url(url: &str, allow: &[String]) -> Result<(String, Vec<SocketAddr>), UrlError> {
    let u = reqwest::Url::parse(url).map_err(|e| UrlError::Refused(format!("invalid URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(UrlError::Refused(
            "only http and https URLs are called".into(),
        ));
    }
    let host = u
        .host_str()
        .ok_or_else(|| UrlError::Refused("the URL has no host".into()))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = u.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| UrlError::Transient(format!("cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(UrlError::Transient(format!(
            "{host} resolves to no address"
        )));
    }
    for a in &addrs {
        if is_internal(a.ip()) && !allowed(allow, &host, a.ip()) {
            return Err(UrlError::Refused(format!(
                "refused: {host} resolves to {}, a loopback, private, link-local or metadata address (allow it with callbacks.allow_hosts)",
                a.ip()
            )));
        }
    }
    Ok((host, addrs))
}

/// Delivers callbacks from the outbox.
pub struct Deliverer {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    cfg: CallbacksConfig,
    /// The delivery loop: its outcome (for `/metrics`) and its trigger.
    pub passes: Loop,
    /// Serialises creation of signing secrets.
    secret_lock: tokio::sync::Mutex<()>,
}

impl Deliverer {
    /// A deliverer.
    pub fn new(store: Arc<dyn Store>, keyring: Arc<Keyring>, cfg: CallbacksConfig) -> Self {
        Deliverer {
            store,
            keyring,
            cfg,
            passes: Loop::new(
                "deliverer",
                "attempts",
                "Callback delivery attempts made (successful or not).",
                &[""],
            ),
            secret_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Tells the deliverer that new deliveries may be due.
    pub fn wake(&self) {
        self.passes.wake();
    }

    /// The org's signing secret, made on first use.
    pub async fn signing_secret(&self, org: &OrgId) -> anyhow::Result<String> {
        let _g = self.secret_lock.lock().await;
        if let Some(s) = self.store.callback_secret(org).await? {
            return Ok(self.keyring.open_string(&s)?);
        }
        self.rotate_secret_locked(org).await
    }

    /// Replaces the org's signing secret.
    pub async fn rotate_secret(&self, org: &OrgId) -> anyhow::Result<String> {
        let _g = self.secret_lock.lock().await;
        self.rotate_secret_locked(org).await
    }

    async fn rotate_secret_locked(&self, org: &OrgId) -> anyhow::Result<String> {
        let mut b = [0u8; 24];
        rand::rng().fill(&mut b);
        let secret = format!("whsec_{}", hex::encode(b));
        self.store
            .set_callback_secret(org, self.keyring.seal(secret.as_bytes()))
            .await?;
        Ok(secret)
    }

    /// Runs until shutdown: delivers what is due, then sleeps until the next attempt
    /// (at most 30 s), or until woken.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let me = self.clone();
        self.passes
            .run(Duration::ZERO, Duration::from_secs(30), shutdown, || {
                let me = me.clone();
                async move {
                    let n = me.deliver_due().await.map_err(|e| {
                        tracing::error!(error = %e, "callback delivery pass failed");
                        e.to_string()
                    })?;
                    let next = match me.store.next_delivery_at().await {
                        Ok(Some(t)) => (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO),
                        _ => Duration::from_secs(30),
                    };
                    Ok(Pass {
                        next: Some(next),
                        ..Pass::did(n)
                    })
                }
            })
            .await
    }

    /// Attempts every delivery that is due now (concurrently, bounded).
    /// Returns how many were attempted.
    pub async fn deliver_due(&self) -> anyhow::Result<u64> {
        use futures::StreamExt;
        let mut attempted = 0;
        loop {
            // Held past any attempt (the check and the POST, each within the
            // timeout), so another server never attempts it at the same time.
            let hold = Duration::from_secs(self.cfg.timeout_s.saturating_mul(3) + 30);
            let due = self
                .store
                .claim_deliveries(chrono::Utc::now(), 32, hold)
                .await?;
            if due.is_empty() {
                return Ok(attempted);
            }
            attempted += due.len() as u64;
            futures::stream::iter(due)
                .for_each_concurrent(8, |d| async move {
                    if let Err(e) = self.attempt(d).await {
                        tracing::error!(error = %e, "recording a callback attempt failed");
                    }
                })
                .await;
        }
    }

    async fn attempt(&self, mut d: Delivery) -> anyhow::Result<()> {
        d.attempts += 1;
        let result = self.post(&d).await;
        match result {
            Ok(status) if (200..300).contains(&status) => {
                d.state = DeliveryState::Delivered;
                d.last_status = Some(status as i64);
                d.last_error = None;
            }
            Ok(status) => {
                d.last_status = Some(status as i64);
                d.last_error = Some(format!("receiver answered HTTP {status}"));
                self.retry_or_give_up(&mut d);
            }
            Err(Refused(reason)) => {
                // Not retried: the address will not become acceptable.
                d.state = DeliveryState::Failed;
                d.last_error = Some(reason);
            }
            Err(Transient(reason)) => {
                d.last_status = None;
                d.last_error = Some(reason);
                self.retry_or_give_up(&mut d);
            }
        }
        if d.state == DeliveryState::Failed {
            let url = netguard::strip_credentials(&d.url);
            tracing::warn!(run = %d.run_id, url = %url, attempts = d.attempts, error = ?d.last_error, "callback given up");
        }
        self.store.record_attempt(&d).await?;
        Ok(())
    }

    fn retry_or_give_up(&self, d: &mut Delivery) {
        if d.attempts >= self.cfg.max_attempts {
            d.state = DeliveryState::Failed;
            d.last_error = d
                .last_error
                .take()
                .map(|e| format!("{e}; gave up after {} attempts", d.attempts));
            return;
        }
        let exp = (d.attempts - 1).clamp(0, 20) as u32;
        let delay = Duration::from_millis(self.cfg.backoff_base_ms.saturating_mul(1u64 << exp))
            .min(Duration::from_secs(self.cfg.backoff_max_s));
        let next = chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        d.next_attempt_at = next;
    }

    async fn post(&self, d: &Delivery) -> Result<u16, AttemptError> {
        let (host, addrs) =
            check_url(&d.url, &self.cfg.allow_hosts)
                .await
                .map_err(|e| match e {
                    UrlError::Refused(m) => Refused(m),
                    UrlError::Transient(m) => Transient(m),
                })?;
        let secret = self
            .signing_secret(&d.org_id)
            .await
            .map_err(|e| Transient(format!("signing secret: {e}")))?;
        // Connect to the addresses that were checked, not to a second resolution, and
        // directly: a proxy from the environment would connect anywhere. Redirects are
        // not followed (a 3xx is an answer that is not 2xx), so none leads inside.
        let client = reqwest::Client::builder()
            .no_proxy()
            .resolve_to_addrs(&host, &addrs)
            .timeout(Duration::from_secs(self.cfg.timeout_s))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Transient(e.to_string()))?;
        let ts = chrono::Utc::now().timestamp();
        let resp = client
            .post(&d.url)
            .header("content-type", "application/json")
            .header("user-agent", "stoa-callbacks")
            .header("stoa-signature", sign(&secret, ts, &d.payload))
            .header("stoa-delivery", d.id.to_string())
            .body(d.payload.clone())
            .send()
            .await
            // Without the URL: reqwest's message would repeat its credentials.
            .map_err(|e| Transient(format!("request failed: {}", root_cause(&e.without_url()))))?;
        Ok(resp.status().as_u16())
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    if e.to_string() == cur.to_string() {
        e.to_string()
    } else {
        format!("{e}: {cur}")
    }
}

enum AttemptError {
    /// The URL is refused by policy.
    Refused(String),
    /// Worth retrying.
    Transient(String),
}
use AttemptError::{Refused, Transient};

/// The signing secret of the caller's org.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SigningSecret {
    pub signing_secret: String,
    /// How receivers verify deliveries.
    pub header: String,
}

fn reply(secret: String) -> Json<SigningSecret> {
    Json(SigningSecret {
        signing_secret: secret,
        header: "Stoa-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<body>\")>"
            .into(),
    })
}

/// Shows the org's callback signing secret (made on first use).
#[utoipa::path(get, path = "/api/v2/external/callbacks/secret", tag = "callbacks",
    responses((status = 200, body = SigningSecret)), security(("bearer" = [])))]
pub async fn get_secret(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SigningSecret>, ApiError> {
    let s = state
        .deliverer
        .signing_secret(&caller.org.id)
        .await
        .map_err(ApiError::from)?;
    Ok(reply(s))
}

/// Replaces the org's callback signing secret.
#[utoipa::path(post, path = "/api/v2/external/callbacks/secret/rotate", tag = "callbacks",
    responses((status = 200, body = SigningSecret)), security(("bearer" = [])))]
pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SigningSecret>, ApiError> {
    let s = state
        .deliverer
        .rotate_secret(&caller.org.id)
        .await
        .map_err(ApiError::from)?;
    Ok(reply(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn allow_list_matches_hosts_ips_and_cidrs() {
        let allow = vec![
            "localhost".to_string(),
            "10.0.0.0/8".to_string(),
            "::1".to_string(),
        ];
        assert!(allowed(&allow, "localhost", "127.0.0.1".parse().unwrap()));
        assert!(allowed(&allow, "x", "10.9.8.7".parse().unwrap()));
        assert!(allowed(&allow, "x", "::1".parse().unwrap()));
        assert!(!allowed(&allow, "x", "127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn signature_is_hmac_of_timestamp_and_body() {
        // Known answer computed independently (Python hmac, sha256).
        assert_eq!(
            sign("whsec_test", 1700000000, "{}"),
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }

    #[tokio::test]
    async fn every_internal_address_form_is_refused() {
        for url in [
            "http://127.0.0.1/cb",
            "http://127.1/cb",
            "http://2130706433/cb",
            "http://0x7f000001/cb",
            "http://0/cb",
            "http://[::1]/cb",
            "http://[::]/cb",
            "http://[::127.0.0.1]/cb",
            "http://[::ffff:127.0.0.1]/cb",
            "http://[::ffff:169.254.169.254]/cb",
            "http://[64:ff9b::7f00:1]/cb",
            "http://[2002:7f00:1::]/cb",
            "http://[fec0::1]/cb",
            "http://[fe80::1]/cb",
            "http://[fd00::1]/cb",
            "http://169.254.169.254/latest/meta-data/",
            "http://198.18.0.1/cb",
            "http://100.64.0.1/cb",
            "http://192.0.0.1/cb",
            "http://224.0.0.1/cb",
            "http://user:pw@10.0.0.1:8080/cb",
        ] {
            match check_url(url, &[]).await {
                Err(UrlError::Refused(m)) => {
                    assert!(m.starts_with("refused"), "{url}: {m}");
                    assert!(!m.contains("pw"), "{url}: {m}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed() {
        let e = check_url("http://127.0.0.1:9/cb", &[]).await.unwrap_err();
        assert!(
            matches!(&e, UrlError::Refused(m) if m.starts_with("refused")),
            "{e}"
        );
        assert!(
            check_url("http://127.0.0.1:9/cb", &["127.0.0.1".into()])
                .await
                .is_ok()
        );
        assert!(check_url("ftp://example.com/", &[]).await.is_err());
    }
}
