//! The proxy to the ports runs serve on (a notebook, a web server), HTTP and WebSocket:
//! `/ports/{run id}/{port}/…` on the API address and, with `ports.base_domain` set,
//! every path of `{run id}-{port}.{base_domain}`.
//!
//! A request is let through only for a caller of the run's org (an API key, or the
//! dashboard's session), only while the run is `running`, and only to a port its worker
//! reported with the address it found (the container's, never one the run names).
//! Anything else is a 404, as for a run of another org. Stoa's own credentials (the
//! `Authorization` header that authenticated, the session cookie) are taken out before
//! the request reaches the run. Answers of the path form carry a sandboxing
//! `Content-Security-Policy`: they share the API's origin, so their scripts must not
//! act as the signed-in user there.

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use stoa_types::{RunId, RunStatus};

use crate::auth::{Caller, bearer_token};
use crate::error::ApiError;
use crate::state::AppState;

/// The policy of answers served under the API's origin: a sandbox, so that the page's
/// scripts run in an origin of their own.
const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// How long the proxy waits for a run's port to accept a connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Headers of one hop, never passed on (`Connection`, `Upgrade` are passed on for an
/// upgrade).
const HOP_BY_HOP: [&str; 7] = [
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-connection",
];

/// `/ports/{id}/{port}` (no slash): the same page with its slash, so that relative
/// links resolve under it.
pub async fn with_slash(Path((id, port)): Path<(String, String)>, uri: Uri) -> Response {
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, format!("/ports/{id}/{port}/{query}"))],
    )
        .into_response()
}

/// `/ports/{id}/{port}/{*rest}`: the request passed to the run's port.
pub async fn by_path(State(state): State<AppState>, req: Request) -> Response {
    // The path as sent (still percent-encoded): `/ports/{id}/{port}/{rest}`.
    let mut segments = req.uri().path().splitn(5, '/').skip(2);
    let (id, port) = (
        segments.next().unwrap_or_default().to_string(),
        segments.next().unwrap_or_default().to_string(),
    );
    let rest = segments.next().unwrap_or_default();
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let target = format!("/{rest}{query}");
    match proxy(&state, &id, &port, target, req, true).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The run and port a request's `Host` names under `ports.base_domain`
/// (`{run id}-{port}.{base_domain}`).
pub fn host_target<'a>(
    headers: &'a HeaderMap,
    uri: &'a Uri,
    base_domain: &str,
) -> Option<(&'a str, &'a str)> {
    // HTTP/2 names the host in the request's authority.
    let host = match headers.get(header::HOST) {
        Some(h) => h.to_str().ok()?,
        None => uri.authority()?.as_str(),
    };
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let label = host.strip_suffix(base_domain.trim_start_matches('.'))?;
    let label = label.strip_suffix('.')?;
    let (id, port) = label.rsplit_once('-')?;
    // Only a run's id and a port: other hosts under the domain stay the API's.
    (id.parse::<RunId>().is_ok() && port.parse::<u16>().is_ok()).then_some((id, port))
}

/// Middleware: a request for `{run id}-{port}.{base_domain}` goes to the run's port
/// whatever its path; others go on to the API.
pub async fn by_host(
    State(state): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(domain) = state.config.ports.base_domain.clone() else {
        return next.run(req).await;
    };
    let Some((id, port)) = host_target(req.headers(), req.uri(), &domain) else {
        return next.run(req).await;
    };
    let (id, port) = (id.to_string(), port.to_string());
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    match proxy(&state, &id, &port, target, req, false).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Who calls: an API key, else the dashboard's session.
async fn caller(parts: &mut Parts, state: &AppState) -> Option<Caller> {
    if parts.headers.contains_key(header::AUTHORIZATION)
        && let Ok(c) = Caller::from_request_parts(parts, state).await
    {
        return Some(c);
    }
    crate::ui::Session::from_request_parts(parts, state)
        .await
        .ok()
        .map(|s| s.caller)
}

/// Where a caller's request for `port` of run `id` goes (the run, the port and the
/// address); a 404 unless the caller is of the run's org, the run is running and its
/// worker reported that port.
async fn address(
    state: &AppState,
    parts: &mut Parts,
    id: &str,
    port: &str,
) -> Result<(RunId, u16, String), ApiError> {
    let not_found = || ApiError::NotFound("No such port of a running execution".into());
    let caller = caller(parts, state)
        .await
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer <api key>".into()))?;
    let id: RunId = id.parse().map_err(|_| not_found())?;
    let port: u16 = port.parse().map_err(|_| not_found())?;
    let run = state.store.get_run(id).await?.ok_or_else(not_found)?;
    if run.org_id != caller.org.id || run.status != RunStatus::Running {
        return Err(not_found());
    }
    let at = run.ports.get(&port).cloned().ok_or_else(not_found)?;
    if !proxied(state, &run) {
        return Err(ApiError::NotFound(format!(
            "execution {id} runs on worker {}, on another machine: its ports are reached there, not through this server",
            run.worker_id.as_deref().unwrap_or("?")
        )));
    }
    Ok((id, port, at))
}

/// Whether this server proxies the run's ports: it runs, on this server's own worker.
/// The address a worker reports is its container's on that worker's machine, so a run
/// of any other worker (another server's, or one elsewhere) is never proxied from
/// here: the same address here may be another run's.
pub fn proxied(state: &AppState, run: &stoa_store::Run) -> bool {
    run.status == RunStatus::Running
        && run.worker_id.is_some()
        && run.worker_id.as_deref() == state.engine.embedded_worker()
}

/// Takes Stoa's own credentials out of a request bound for a run: every
/// `Authorization` value that is a bearer token (whatever the scheme's case; a run's
/// own schemes are left alone) and the session cookie.
fn strip_credentials(headers: &mut HeaderMap) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| {
            let v = v.to_str().unwrap_or_default().trim_start();
            let scheme = v.split_whitespace().next().unwrap_or_default();
            !scheme.eq_ignore_ascii_case("bearer") && bearer_token(v).is_none()
        })
        .cloned()
        .collect();
    headers.remove(header::AUTHORIZATION);
    for v in kept {
        headers.append(header::AUTHORIZATION, v);
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(&format!("{}=", crate::ui::SESSION_COOKIE)))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Headers of one hop out; `Connection` and `Upgrade` too unless the exchange upgrades.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Headers `Connection` names are of this hop as well.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| n != header::UPGRADE)
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Resolves once port `port` of run `id` no longer leads to `at`: the run ended, or
/// its ports were forgotten (checked every 2 s).
async fn port_gone(state: &AppState, id: RunId, port: u16, at: &str) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        match state.store.get_run(id).await {
            Ok(Some(run))
                if proxied(state, &run) && run.ports.get(&port).map(String::as_str) == Some(at) => {
            }
            // The store being away is not the run's end.
            Err(_) => {}
            _ => return,
        }
    }
}

/// Passes `req` to port `port` of run `id` as `target` (path and query) and its answer
/// back; an upgrade (WebSocket) is then joined byte for byte in both directions.
async fn proxy(
    state: &AppState,
    id: &str,
    port: &str,
    target: String,
    mut req: Request,
    under_api_origin: bool,
) -> Result<Response, ApiError> {
    let upgrade = is_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let (run_id, port_no, addr) = address(state, &mut parts, id, port).await?;
    strip_credentials(&mut parts.headers);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.uri = target
        .parse()
        .map_err(|_| ApiError::BadRequest("not a valid path".into()))?;
    parts.version = axum::http::Version::HTTP_11;
    let unreachable = |e: &dyn std::fmt::Display| {
        tracing::debug!(run = %id, %addr, error = %e, "a run's port could not be reached");
        ApiError::BadGateway(format!("the run's port {port} does not answer: {e}"))
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|e| unreachable(&e))?
        .map_err(|e| unreachable(&e))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut answer = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| unreachable(&e))?;
    let upgraded = answer.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_side)) = (upgraded, client_side) {
        let run_side = hyper::upgrade::on(&mut answer);
        let (state, at) = (state.clone(), addr.clone());
        tokio::spawn(async move {
            if let (Ok(client), Ok(run)) = (client_side.await, run_side.await) {
                let (mut client, mut run) = (TokioIo::new(client), TokioIo::new(run));
                let join = tokio::io::copy_bidirectional(&mut client, &mut run);
                // The connection ends with the run (or its port): its container's
                // end does not reach an idle connection by itself.
                tokio::select! {
                    _ = join => {}
                    _ = port_gone(&state, run_id, port_no, &at) => {}
                }
            }
        });
    }
    let (mut parts, body) = answer.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgraded);
    if under_api_origin {
        // The API's origin is not the run's: no cookie of its own there (they would
        // reach other runs, or stand in for Stoa's), nothing cleared there.
        parts.headers.remove(header::SET_COOKIE);
        parts.headers.remove("clear-site-data");
        parts.headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(SANDBOX),
        );
    }
    Ok(Response::from_parts(parts, axum::body::Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        m
    }

    #[test]
    fn the_host_names_a_run_and_a_port_under_the_base_domain_only() {
        let id = "0b7e6c1e-7f4a-4c1e-9d2a-1c2b3d4e5f60";
        let uri = Uri::from_static("/");
        let h = host(&format!("{id}-8888.runs.example:8080"));
        assert_eq!(host_target(&h, &uri, "runs.example"), Some((id, "8888")));
        assert_eq!(host_target(&h, &uri, ".runs.example"), Some((id, "8888")));
        let h = host(&format!("{id}-8888.runs.example"));
        assert_eq!(host_target(&h, &uri, "runs.example"), Some((id, "8888")));
        let too_big = format!("{id}-99999.runs.example");
        for other in [
            "runs.example",
            "api.example",
            "x.y-1.runs.example",
            "evilruns.example",
            "nodash.runs.example",
            "my-stoa.runs.example",
            too_big.as_str(),
        ] {
            assert_eq!(
                host_target(&host(other), &uri, "runs.example"),
                None,
                "{other}"
            );
        }
        // HTTP/2: the authority.
        let uri: Uri = format!("https://{id}-80.runs.example/x").parse().unwrap();
        assert_eq!(
            host_target(&HeaderMap::new(), &uri, "runs.example"),
            Some((id, "80"))
        );
    }

    #[test]
    fn stoa_credentials_are_kept_from_the_run() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer lk_x"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; stoa_session=s"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        strip_credentials(&mut h);
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, HeaderValue::from_static("token abc"));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("BEARER lk_y"),
        );
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer lk_z"),
        );
        strip_credentials(&mut h);
        let left: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(left, ["token abc"], "the run's own scheme only");
    }
}
