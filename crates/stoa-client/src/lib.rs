//! A typed HTTP and SSE client for the Stoa API, used by the CLI and the tests.

pub mod worker;

use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stoa_types::{
    AvailableHardwareResponse, ComposeStartRequest, ExecutionRecord, ExecutionSummary,
    HistoryResponse, ImageStartRequest, LogsResponse, MachineTypesResponse, MessageResponse,
    OrgResponse, PythonStartRequest, StartResponse, StreamEvent, StreamingStatusResponse,
    TimingResponse,
};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not get an answer.
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an error status.
    #[error("HTTP {status}: {}", detail_text(.detail))]
    Api { status: u16, detail: Value },
    /// The answer could not be read.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// A local file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The `detail` of an error body in words.
pub fn detail_text(detail: &Value) -> String {
    match detail {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|e| {
                let loc: Vec<String> = e["loc"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .map(|x| {
                                x.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| x.to_string())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                format!("{}: {}", loc.join("."), e["msg"].as_str().unwrap_or(""))
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// Result type of the client.
pub type Result<T> = std::result::Result<T, ClientError>;

/// One event of an output stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `id:` of the event.
    pub id: Option<String>,
    /// The decoded `data:`.
    pub event: StreamEvent,
}

/// One file of the org's storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Path relative to the org's storage root, with `/`.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (ISO-8601).
    pub last_modified: String,
}

#[derive(Deserialize)]
struct FileList {
    files: Vec<StoredFile>,
}

/// A client for one server and API key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

const P: &str = "/api/v2/external";

impl Client {
    /// A client for `base` (the host root, e.g. `http://127.0.0.1:8080`) and `key`.
    pub fn new(base: &str, key: &str) -> Self {
        Client {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("a plain HTTP client builds"),
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request with the bearer key and returns the raw response.
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        Ok(req.send().await?)
    }

    /// The error of an answer with an error status, its `detail` when it has one.
    fn api_error(status: reqwest::StatusCode, bytes: &[u8]) -> ClientError {
        let detail = serde_json::from_slice::<Value>(bytes)
            .ok()
            .and_then(|v| v.get("detail").cloned())
            .unwrap_or_else(|| Value::String(String::from_utf8_lossy(bytes).into_owned()));
        ClientError::Api {
            status: status.as_u16(),
            detail,
        }
    }

    /// The response when its status is a success, its error otherwise.
    async fn success(resp: reqwest::Response) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        Err(Self::api_error(status, &resp.bytes().await?))
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T> {
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            return Err(Self::api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Self::decode(self.raw(reqwest::Method::GET, path, None).await?).await
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: Option<&Value>) -> Result<T> {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("JSON values serialise")));
        Self::decode(self.raw(reqwest::Method::POST, path, body).await?).await
    }

    /// Starts a Python run.
    pub async fn start_python(&self, req: &PythonStartRequest) -> Result<StartResponse> {
        let body = serde_json::to_value(req).expect("requests serialise");
        self.post(&format!("{P}/execution/streaming/start"), Some(&body))
            .await
    }

    /// Starts a Python run from a raw JSON body.
    pub async fn start_python_json(&self, body: &Value) -> Result<StartResponse> {
        self.post(&format!("{P}/execution/streaming/start"), Some(body))
            .await
    }

    /// Starts an image run.
    pub async fn start_image(&self, req: &ImageStartRequest) -> Result<StartResponse> {
        let body = serde_json::to_value(req).expect("requests serialise");
        self.post(&format!("{P}/execution/image/start"), Some(&body))
            .await
    }

    /// Starts an image run from a raw JSON body.
    pub async fn start_image_json(&self, body: &Value) -> Result<StartResponse> {
        self.post(&format!("{P}/execution/image/start"), Some(body))
            .await
    }

    /// Starts a compose run.
    pub async fn start_compose(&self, req: &ComposeStartRequest) -> Result<StartResponse> {
        let body = serde_json::to_value(req).expect("requests serialise");
        self.start_compose_json(&body).await
    }

    /// Starts a compose run from a raw JSON body.
    pub async fn start_compose_json(&self, body: &Value) -> Result<StartResponse> {
        self.post(&format!("{P}/execution/compose/start"), Some(body))
            .await
    }

    /// Starts a GPU selection run from a raw JSON body.
    pub async fn start_selection(&self, body: &Value) -> Result<Value> {
        self.post(&format!("{P}/execution/gpu_selection/start"), Some(body))
            .await
    }

    /// Status and comparison of a GPU selection run.
    pub async fn selection_status(&self, id: &str) -> Result<Value> {
        self.get(&format!("{P}/execution/gpu_selection/{id}/status"))
            .await
    }

    /// The full record of a run.
    pub async fn execution(&self, id: &str) -> Result<ExecutionRecord> {
        self.get(&format!("{P}/execution/{id}")).await
    }

    /// Timing of a run.
    pub async fn timing(&self, id: &str) -> Result<TimingResponse> {
        self.get(&format!("{P}/execution/{id}/timing")).await
    }

    /// Active runs, or runs in the given states (comma-separated).
    pub async fn workloads(&self, status: Option<&str>) -> Result<Vec<ExecutionSummary>> {
        match status {
            Some(s) => self.get(&format!("{P}/workloads/list?status={s}")).await,
            None => self.get(&format!("{P}/workloads/list")).await,
        }
    }

    /// Runs filtered by states, label and name (each optional).
    pub async fn workloads_filtered(
        &self,
        status: Option<&str>,
        label: Option<&str>,
        run_name: Option<&str>,
    ) -> Result<Vec<ExecutionSummary>> {
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = status {
            q.push(("status", s));
        }
        if let Some(l) = label {
            q.push(("label", l));
        }
        if let Some(n) = run_name {
            q.push(("run_name", n));
        }
        let resp = self
            .http
            .get(self.url(&format!("{P}/workloads/list")))
            .bearer_auth(&self.key)
            .query(&q)
            .send()
            .await?;
        Self::decode(resp).await
    }

    /// Metrics of a run, averaged per `step` (`5s`, `1m`).
    pub async fn metrics(&self, id: &str, step: &str) -> Result<Value> {
        self.get(&format!("{P}/execution/{id}/metrics?step={step}"))
            .await
    }

    /// Run history, newest first.
    pub async fn history(&self, limit: i64, offset: i64) -> Result<HistoryResponse> {
        self.get(&format!(
            "{P}/billing/history?limit={limit}&offset={offset}"
        ))
        .await
    }

    /// Stored log lines of a run.
    pub async fn logs(&self, id: &str, limit: i64, hours: i64) -> Result<LogsResponse> {
        self.get(&format!(
            "{P}/logs/execution/{id}?limit={limit}&hours={hours}"
        ))
        .await
    }

    /// Aborts a run.
    pub async fn abort(&self, id: &str) -> Result<MessageResponse> {
        self.post(&format!("{P}/workloads/abort/{id}"), None).await
    }

    /// Stops a run gracefully.
    pub async fn stop(&self, id: &str) -> Result<MessageResponse> {
        self.post(&format!("{P}/workloads/stop/{id}"), None).await
    }

    /// Deletes an ended run.
    pub async fn delete(&self, id: &str) -> Result<MessageResponse> {
        Self::decode(
            self.raw(
                reqwest::Method::DELETE,
                &format!("{P}/execution/{id}"),
                None,
            )
            .await?,
        )
        .await
    }

    /// State in the polling-fallback vocabulary.
    pub async fn streaming_status(&self, id: &str) -> Result<StreamingStatusResponse> {
        self.get(&format!("{P}/execution/streaming/{id}/status"))
            .await
    }

    /// Hardware profiles.
    pub async fn machine_types(&self) -> Result<MachineTypesResponse> {
        self.get(&format!("{P}/machine-types")).await
    }

    /// Profiles this key may use.
    pub async fn available_hardware(&self) -> Result<AvailableHardwareResponse> {
        self.get(&format!("{P}/user/quotas/available-hardware"))
            .await
    }

    /// The key's org.
    pub async fn user_org(&self) -> Result<OrgResponse> {
        self.get(&format!("{P}/user/org")).await
    }

    /// The org's environment variables (names only).
    pub async fn env_list(&self) -> Result<Value> {
        self.get(&format!("{P}/environment-variables/")).await
    }

    /// Sets environment variables (secrets) of the org.
    pub async fn env_set(&self, vars: &[(&str, &str)]) -> Result<Value> {
        let items: Vec<Value> = vars
            .iter()
            .map(|(n, v)| serde_json::json!({"name": n, "value": v}))
            .collect();
        self.post(
            &format!("{P}/environment-variables/"),
            Some(&serde_json::json!({"environment_variables": items})),
        )
        .await
    }

    /// Deletes one variable by id or name.
    pub async fn env_rm(&self, id_or_name: &str) -> Result<Value> {
        Self::decode(
            self.raw(
                reqwest::Method::DELETE,
                &format!("{P}/environment-variables/{id_or_name}"),
                None,
            )
            .await?,
        )
        .await
    }

    /// Deletes every variable of the org.
    pub async fn env_rm_all(&self) -> Result<Value> {
        Self::decode(
            self.raw(
                reqwest::Method::DELETE,
                &format!("{P}/environment-variables/"),
                None,
            )
            .await?,
        )
        .await
    }

    /// The org's callback signing secret; a new one with `rotate`.
    pub async fn callback_secret(&self, rotate: bool) -> Result<Value> {
        if rotate {
            self.post(&format!("{P}/callbacks/secret/rotate"), None)
                .await
        } else {
            self.get(&format!("{P}/callbacks/secret")).await
        }
    }

    /// The URL of `{P}/storage/{action}/{key}`, each segment of the key percent-encoded.
    fn storage_url(&self, action: &str, key: &str) -> Result<reqwest::Url> {
        let mut url = reqwest::Url::parse(&self.url(&format!("{P}/storage/{action}")))
            .map_err(|e| ClientError::Decode(format!("bad server URL {}: {e}", self.base)))?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Decode(format!("bad server URL {}", self.base)))?
            .extend(key.split('/'));
        Ok(url)
    }

    /// S3 credentials of the org's storage (`endpoint`, `access_key`, `secret_key`,
    /// `session_token`, `region`, `bucket_name`, `expires_at`).
    pub async fn storage_credentials(&self) -> Result<Value> {
        let resp = self
            .http
            .post(self.url(&format!("{P}/storage/credentials")))
            .bearer_auth(&self.key)
            .send()
            .await?;
        Self::decode(resp).await
    }

    /// Files of the org's storage whose key starts with `prefix` (all when empty),
    /// sorted by key.
    pub async fn storage_list(&self, prefix: &str) -> Result<Vec<StoredFile>> {
        let mut req = self
            .http
            .get(self.url(&format!("{P}/storage/list-files")))
            .bearer_auth(&self.key);
        if !prefix.is_empty() {
            req = req.query(&[("prefix", prefix)]);
        }
        let list: FileList = Self::decode(req.send().await?).await?;
        Ok(list.files)
    }

    /// Streams the stored file `key` into `out`, calling `progress` with the bytes
    /// written so far and the size the server announced; returns the bytes written.
    pub async fn storage_download<W>(
        &self,
        key: &str,
        out: &mut W,
        mut progress: impl FnMut(u64, Option<u64>),
    ) -> Result<u64>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let resp = self
            .http
            .get(self.storage_url("download", key)?)
            .bearer_auth(&self.key)
            .send()
            .await?;
        let resp = Self::success(resp).await?;
        let total = resp.content_length();
        let mut done = 0u64;
        progress(done, total);
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            out.write_all(&chunk).await?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        out.flush().await?;
        // A connection that closes early ends the stream without an error.
        if total.is_some_and(|t| t != done) {
            return Err(ClientError::Decode(format!(
                "the download of {key} broke off after {done} of {} bytes",
                total.unwrap_or_default()
            )));
        }
        Ok(done)
    }

    /// Uploads the local file at `path` to the org's storage at `key`, streamed from
    /// disk with its length announced; `progress` gets the bytes sent so far and the
    /// file's size.
    pub async fn storage_upload(
        &self,
        key: &str,
        path: &Path,
        mut progress: impl FnMut(u64, Option<u64>) + Send + 'static,
    ) -> Result<StoredFile> {
        let file = tokio::fs::File::open(path).await?;
        let size = file.metadata().await?.len();
        progress(0, Some(size));
        let mut sent = 0u64;
        let body =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
                if let Ok(c) = &chunk {
                    sent += c.len() as u64;
                    progress(sent, Some(size));
                }
                chunk
            });
        let resp = self
            .http
            .post(self.url(&format!("{P}/storage/upload")))
            .bearer_auth(&self.key)
            .query(&[("key", key)])
            .header("content-type", "application/octet-stream")
            .header("content-length", size)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await?;
        Self::decode(resp).await
    }

    /// Deletes the stored file `key`.
    pub async fn storage_delete(&self, key: &str) -> Result<()> {
        let resp = self
            .http
            .delete(self.storage_url("delete", key)?)
            .bearer_auth(&self.key)
            .send()
            .await?;
        Self::success(resp).await.map(drop)
    }

    /// The stream URL of a run when none was handed out.
    pub fn stream_url(&self, id: &str) -> String {
        self.url(&format!("/api/v1/stream/{id}"))
    }

    /// Opens an output stream (POST, no auth, like the official client), resuming
    /// after `last_event_id` when given.
    pub async fn stream(
        &self,
        url: &str,
        last_event_id: Option<&str>,
    ) -> Result<impl Stream<Item = Result<SseEvent>> + Unpin + use<>> {
        let mut req = self
            .http
            .post(url)
            .header("accept", "text/event-stream")
            .header("cache-control", "no-cache");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(Self::decode::<Value>(resp)
                .await
                .err()
                .unwrap_or(ClientError::Decode("error status".into())));
        }
        Ok(Box::pin(parse_sse(resp.bytes_stream())))
    }
}

/// Turns a byte stream of SSE into decoded events; comments and unknown events are skipped.
fn parse_sse(
    bytes: impl Stream<Item = reqwest::Result<Bytes>> + Unpin,
) -> impl Stream<Item = Result<SseEvent>> {
    struct St<S> {
        bytes: S,
        buf: Vec<u8>,
        id: Option<String>,
        data: String,
        done: bool,
    }
    futures::stream::unfold(
        St {
            bytes,
            buf: Vec::new(),
            id: None,
            data: String::new(),
            done: false,
        },
        |mut st| async move {
            loop {
                while let Some(pos) = st.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = st.buf.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim_end_matches(['\n', '\r']);
                    if line.is_empty() {
                        if st.data.is_empty() {
                            continue;
                        }
                        let data = std::mem::take(&mut st.data);
                        let id = st.id.take();
                        match serde_json::from_str::<StreamEvent>(&data) {
                            Ok(event) => return Some((Ok(SseEvent { id, event }), st)),
                            Err(_) => continue,
                        }
                    } else if let Some(d) = line.strip_prefix("data:") {
                        if !st.data.is_empty() {
                            st.data.push('\n');
                        }
                        st.data.push_str(d.strip_prefix(' ').unwrap_or(d));
                    } else if let Some(i) = line.strip_prefix("id:") {
                        st.id = Some(i.trim().to_string());
                    }
                }
                if st.done {
                    return None;
                }
                match st.bytes.next().await {
                    Some(Ok(b)) => st.buf.extend_from_slice(&b),
                    Some(Err(e)) => {
                        st.done = true;
                        return Some((Err(ClientError::Http(e)), st));
                    }
                    None => {
                        st.done = true;
                        st.buf.push(b'\n');
                    }
                }
            }
        },
    )
}
