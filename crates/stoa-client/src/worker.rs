//! The worker protocol's client side: the control plane of a `stoa worker` agent, over
//! HTTP (see [`stoa_types::worker`]).
//!
//! Every failure to reach the server (refused, cut, timed out, 5xx) is
//! [`PlaneError::Unavailable`]: the worker keeps its runs going and what it could not
//! send, and tries again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use stoa_core::plane::{
    Appended, Assignment, ControlPlane, Directive, GpuSample, OutputPiece, PlaneError, Progress,
    RunEnd, Sample, wire,
};
use stoa_types::worker::{
    ClaimedRun, FinishRequest, HeartbeatRequest, HeartbeatResponse, HeldResponse, HeldRun,
    OrgOutputUsed, OutputGap, OutputPieceWire, OutputRequest, OutputResponse, PREFIX,
    RegisterRequest, RegisterResponse, SamplesRequest,
};
use stoa_types::{OrgId, RunId};

use crate::{ClientError, Result};

/// How long registration may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP client for the worker protocol; `ca_file` adds a CA (PEM) to the system
/// roots for `https://` servers.
pub fn http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        // A connection idle across a cut link would hang the next call until its
        // timeout: idle ones are not kept long.
        .pool_idle_timeout(Duration::from_secs(2));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| ClientError::Decode(format!("{}: {e}", path.display())))?;
        b = b.add_root_certificate(cert);
    }
    Ok(b.build()?)
}

/// Registers this machine with a join token at the first of `servers` (the addresses of
/// one control plane) that answers; the answer holds the worker's own token. A server
/// that answers with a refusal ends it: the others would refuse too.
pub async fn register(
    http: &reqwest::Client,
    servers: &[String],
    join_token: &str,
    req: &RegisterRequest,
) -> Result<RegisterResponse> {
    let mut unreachable = None;
    for server in servers {
        let sent = http
            .post(format!("{}{PREFIX}/register", server.trim_end_matches('/')))
            .bearer_auth(join_token)
            .timeout(CALL_TIMEOUT)
            .json(req)
            .send()
            .await;
        match sent {
            Ok(resp) => return crate::Client::decode(resp).await,
            Err(e) => unreachable = Some(e),
        }
    }
    Err(match unreachable {
        Some(e) => e.into(),
        None => ClientError::Decode("no server URL given".into()),
    })
}

/// The control plane of a worker on another machine, at one or more addresses (several
/// servers behind one store): calls go to one until it cannot be reached, then to the
/// next.
pub struct HttpPlane {
    http: reqwest::Client,
    /// The protocol's base URL at each server.
    bases: Vec<String>,
    /// The server calls go to now (an index into `bases`, modulo its length).
    at: AtomicUsize,
    token: String,
    lease: Duration,
    /// How long one call may take: a third of the lease, so that a call lost on a cut
    /// link leaves time for the next heartbeat before the lease runs out.
    call_timeout: Duration,
    /// How long a claim may wait on the server (its long-poll) before it is cut.
    claim_timeout: Duration,
}

impl HttpPlane {
    /// A plane at `servers` (at least one) for the worker registered as `r`.
    pub fn new(http: reqwest::Client, servers: &[String], r: RegisterResponse) -> Self {
        let lease = Duration::from_secs(r.lease_s.max(1));
        let call_timeout = (lease / 3).clamp(Duration::from_secs(1), Duration::from_secs(30));
        HttpPlane {
            http,
            bases: servers
                .iter()
                .map(|s| format!("{}{PREFIX}", s.trim_end_matches('/')))
                .collect(),
            at: AtomicUsize::new(0),
            token: r.worker_token,
            lease,
            call_timeout,
            claim_timeout: Duration::from_secs(r.claim_wait_s) + call_timeout,
        }
    }

    /// The server calls go to now, and its index.
    fn base(&self) -> (usize, &str) {
        let at = self.at.load(Ordering::Relaxed);
        (at, &self.bases[at % self.bases.len()])
    }

    /// After a call to server `at` could not reach it: the next calls go to the next
    /// server (once, however many calls failed at the same time).
    fn unreachable(&self, at: usize, e: reqwest::Error) -> PlaneError {
        if self.bases.len() > 1
            && self
                .at
                .compare_exchange(at, at.wrapping_add(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let next = &self.bases[at.wrapping_add(1) % self.bases.len()];
            tracing::warn!(error = %e, next = %next, "the server is not reachable; trying the next one");
        }
        PlaneError::Unavailable(e.to_string())
    }

    async fn post<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> std::result::Result<reqwest::Response, PlaneError> {
        let (at, base) = self.base();
        self.http
            .post(format!("{base}{path}"))
            .bearer_auth(&self.token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(at, e))
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> std::result::Result<T, PlaneError> {
        let resp = self.post(path, body, self.call_timeout).await?;
        read(resp).await
    }
}

/// The answer's body, or why not.
async fn read<T: DeserializeOwned>(resp: reqwest::Response) -> std::result::Result<T, PlaneError> {
    crate::Client::decode(resp)
        .await
        .map_err(|e| PlaneError::Unavailable(e.to_string()))
}

#[async_trait]
impl ControlPlane for HttpPlane {
    async fn claim(&self) -> std::result::Result<Option<Assignment>, PlaneError> {
        let resp = self.post("/claim", &(), self.claim_timeout).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let c: ClaimedRun = read(resp).await?;
        Assignment::try_from(c)
            .map(Some)
            .map_err(PlaneError::Unavailable)
    }

    async fn heartbeat(
        &self,
        leases: &[(RunId, String)],
    ) -> std::result::Result<Vec<(RunId, Directive)>, PlaneError> {
        let req = HeartbeatRequest {
            runs: leases
                .iter()
                .map(|(id, token)| HeldRun {
                    run_id: id.to_string(),
                    lease_token: token.clone(),
                })
                .collect(),
        };
        let r: HeartbeatResponse = self.call("/heartbeat", &req).await?;
        r.runs
            .iter()
            .map(wire::directive_from_wire)
            .collect::<std::result::Result<_, _>>()
            .map_err(PlaneError::Unavailable)
    }

    async fn append_output(
        &self,
        run: RunId,
        token: &str,
        first: i64,
        pieces: &[OutputPiece],
        at_end: bool,
    ) -> std::result::Result<Appended, PlaneError> {
        let req = OutputRequest {
            lease_token: token.into(),
            first,
            pieces: pieces.iter().map(OutputPieceWire::from).collect(),
            at_end,
        };
        let resp = self
            .post(&format!("/runs/{run}/output"), &req, self.call_timeout)
            .await?;
        match resp.status() {
            reqwest::StatusCode::CONFLICT => {
                let gap: OutputGap = read(resp).await?;
                Ok(Appended::Gap {
                    expected: gap.expected,
                })
            }
            reqwest::StatusCode::GONE => Ok(Appended::LeaseLost),
            _ => {
                let r: OutputResponse = read(resp).await?;
                Ok(Appended::Stored { next: r.next })
            }
        }
    }

    async fn progress(
        &self,
        run: RunId,
        token: &str,
        p: Progress,
    ) -> std::result::Result<bool, PlaneError> {
        let req = wire::progress_to_wire(token, &p);
        let r: HeldResponse = self.call(&format!("/runs/{run}/progress"), &req).await?;
        Ok(r.held)
    }

    async fn finish(
        &self,
        run: RunId,
        token: &str,
        end: RunEnd,
    ) -> std::result::Result<bool, PlaneError> {
        let req = FinishRequest {
            lease_token: token.into(),
            status: end.status,
            return_code: end.return_code,
            error: end.error,
            timed_out: end.timed_out,
        };
        let r: HeldResponse = self.call(&format!("/runs/{run}/finish"), &req).await?;
        Ok(r.held)
    }

    async fn samples(
        &self,
        system: Vec<Sample>,
        gpus: Vec<GpuSample>,
    ) -> std::result::Result<(), PlaneError> {
        let req = SamplesRequest {
            system: system.iter().map(Into::into).collect(),
            gpus: gpus.iter().map(Into::into).collect(),
        };
        let resp = self.post("/samples", &req, self.call_timeout).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(PlaneError::Unavailable(format!("HTTP {}", resp.status())))
        }
    }

    async fn org_output_used(&self, org: &OrgId) -> std::result::Result<u64, PlaneError> {
        let (at, base) = self.base();
        let resp = self
            .http
            .get(format!("{base}/orgs/{}/output-used", org.0))
            .bearer_auth(&self.token)
            .timeout(self.call_timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(at, e))?;
        let r: OrgOutputUsed = read(resp).await?;
        Ok(r.used)
    }

    async fn assignment(
        &self,
        run: RunId,
        token: &str,
    ) -> std::result::Result<Option<Assignment>, PlaneError> {
        let req = stoa_types::worker::AssignmentRequest {
            lease_token: token.into(),
        };
        let resp = self
            .post(&format!("/runs/{run}/assignment"), &req, self.call_timeout)
            .await?;
        if resp.status() == reqwest::StatusCode::GONE {
            return Ok(None);
        }
        let c: ClaimedRun = read(resp).await?;
        Assignment::try_from(c)
            .map(Some)
            .map_err(PlaneError::Unavailable)
    }

    fn lease(&self) -> Duration {
        self.lease
    }
}
