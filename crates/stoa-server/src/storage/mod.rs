//! Per-org storage: a directory per org, mounted into runs at `s3_mount_path` so runs
//! can keep files between runs, served over the S3 protocol ([`s3`]) with per-org
//! credentials ([`creds`]), and listed, downloaded, uploaded and deleted through the
//! API. Keys are checked so that a key never leaves the org's directory, and no path
//! is ever followed through a link ([`fs`]); another org's files are never reachable.
//! Writes are counted against `storage.max_bytes_per_org`.

pub mod creds;
pub mod fs;
pub mod s3;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use stoa_types::{FieldError, OrgId};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use fs::PathError;

pub use stoa_config::org_storage_dir as org_dir;

/// The org's storage, and what is being written to it.
pub struct Storage {
    data_dir: PathBuf,
    max_bytes: u64,
    /// Bytes promised to writes in flight, per org; an org's count is locked while its
    /// storage is added up (other orgs' writes do not wait for it).
    reserved: Mutex<HashMap<String, Arc<Mutex<u64>>>>,
}

/// A write over `storage.max_bytes_per_org`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the org's storage quota (storage.max_bytes_per_org = {max} bytes) does not leave room for this write ({used} bytes used)"
)]
pub struct QuotaExceeded {
    pub max: u64,
    pub used: u64,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// The request body broke off, or does not match its length.
    #[error("{0}")]
    Body(String),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        WriteError::Path(PathError::Io(e))
    }
}

/// Room for one write, given back when dropped.
pub struct Reservation {
    /// The org's count of reserved bytes.
    cell: Arc<Mutex<u64>>,
    bytes: u64,
    max: u64,
    /// What the org held when the room was given.
    used: u64,
    /// The write announced its length (more is a bad body, not a full quota).
    exact: bool,
    /// Most bytes the write may hold.
    pub limit: u64,
}

impl Reservation {
    /// Why a write of `written` bytes went past the limit.
    fn over(&self, written: u64) -> WriteError {
        if self.exact {
            WriteError::Body(format!(
                "the body is longer than the {} bytes announced",
                self.limit
            ))
        } else {
            QuotaExceeded {
                max: self.max,
                used: self.used + written,
            }
            .into()
        }
    }
}

fn locked(m: &Mutex<u64>) -> std::sync::MutexGuard<'_, u64> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut n = locked(&self.cell);
        *n = n.saturating_sub(self.bytes);
    }
}

impl Storage {
    pub fn new(data_dir: &Path, max_bytes_per_org: u64) -> Arc<Storage> {
        Arc::new(Storage {
            data_dir: data_dir.to_path_buf(),
            max_bytes: max_bytes_per_org,
            reserved: Mutex::new(HashMap::new()),
        })
    }

    /// The org's count of reserved bytes.
    fn cell(&self, org: &OrgId) -> Arc<Mutex<u64>> {
        let mut all = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(org.0.clone()).or_default().clone()
    }

    /// The org's storage directory.
    pub fn root(&self, org: &OrgId) -> PathBuf {
        org_dir(&self.data_dir, org)
    }

    /// Where the org's unfinished multipart uploads are kept (never mounted in runs).
    pub fn staging(&self, org: &OrgId) -> PathBuf {
        self.data_dir.join("storage-uploads").join(&org.0)
    }

    /// Bytes the org holds: its files and its unfinished uploads. Blocks.
    pub fn used(&self, org: &OrgId) -> u64 {
        fs::usage(&self.root(org)) + fs::usage(&self.staging(org))
    }

    /// Room for a write of `bytes` (all that is left when unknown) that replaces
    /// `replacing` bytes. Blocks (it adds up what the org holds).
    pub fn reserve(
        self: &Arc<Self>,
        org: &OrgId,
        bytes: Option<u64>,
        replacing: u64,
    ) -> Result<Reservation, QuotaExceeded> {
        let cell = self.cell(org);
        if self.max_bytes == 0 {
            return Ok(Reservation {
                cell,
                bytes: 0,
                max: 0,
                used: 0,
                exact: bytes.is_some(),
                limit: bytes.unwrap_or(u64::MAX),
            });
        }
        // Held while adding up: two writes of the org never both take the last of the
        // room.
        let mut reserved = locked(&cell);
        let used = self.used(org) + *reserved;
        let room = (self.max_bytes + replacing).saturating_sub(used);
        let want = bytes.unwrap_or(room);
        if want > room || room == 0 {
            return Err(QuotaExceeded {
                max: self.max_bytes,
                used,
            });
        }
        *reserved += want;
        drop(reserved);
        Ok(Reservation {
            cell,
            bytes: want,
            max: self.max_bytes,
            used,
            exact: bytes.is_some(),
            limit: want,
        })
    }

    /// Writes `body` (of `len` bytes, when known) at `key`: reserved, written into a
    /// new file, renamed into place; nothing is left when any step fails.
    pub async fn write<S, E>(
        self: &Arc<Self>,
        org: &OrgId,
        key: &str,
        len: Option<u64>,
        body: S,
    ) -> Result<fs::Meta, WriteError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (me, org2, key2) = (self.clone(), org.clone(), key.to_string());
        let (reservation, new, file) = blocking(move || {
            let root = me.root(&org2);
            // What the write replaces frees room; without a quota it is not looked up.
            let replacing = match me.max_bytes {
                0 => 0,
                _ => fs::open_file(&root, &key2).map_or(0, |(_, m)| m.size),
            };
            let r = me.reserve(&org2, len, replacing)?;
            let (new, file) = fs::create(&root, &key2)?;
            Ok::<_, WriteError>((r, new, file))
        })
        .await??;
        copy_body(body, file, len, &reservation).await?;
        let meta = blocking(move || new.commit()).await??;
        drop(reservation);
        Ok(meta)
    }
}

/// Runs blocking storage work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
}

/// Bytes gathered before a write to disk.
const WRITE_BUFFER: usize = 1024 * 1024;
/// Pieces gathered before a write to disk (one `writev` takes at most 1024).
const WRITE_PIECES: usize = 1024;

/// Copies a request body into `file`, refusing more than the reservation allows and a
/// body whose length is not `len`.
pub(crate) async fn copy_body<S, E>(
    mut body: S,
    file: std::fs::File,
    len: Option<u64>,
    reservation: &Reservation,
) -> Result<u64, WriteError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    // Bodies arrive in small pieces: gathered (without copying) into batches of about
    // `WRITE_BUFFER` bytes, each written by one vectored write on the blocking pool
    // while the next batch arrives.
    let file = Arc::new(file);
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut in_flight: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
    let mut written = 0u64;
    loop {
        let chunk = match body.next().await {
            Some(c) => Some(c.map_err(|e| WriteError::Body(format!("reading the body: {e}")))?),
            None => None,
        };
        if let Some(chunk) = &chunk {
            written += chunk.len() as u64;
            if written > reservation.limit {
                return Err(reservation.over(written));
            }
            batch_len += chunk.len();
            batch.push(chunk.clone());
        }
        let full = batch_len >= WRITE_BUFFER || batch.len() >= WRITE_PIECES;
        if full || (chunk.is_none() && batch_len > 0) {
            if let Some(w) = in_flight.take() {
                w.await.map_err(std::io::Error::other)??;
            }
            let (f, pieces) = (file.clone(), std::mem::take(&mut batch));
            batch_len = 0;
            in_flight = Some(tokio::task::spawn_blocking(move || {
                write_all_vectored(&f, &pieces)
            }));
        }
        if chunk.is_none() {
            break;
        }
    }
    if let Some(w) = in_flight.take() {
        w.await.map_err(std::io::Error::other)??;
    }
    if len.is_some_and(|l| l != written) {
        return Err(WriteError::Body(format!(
            "the body has {written} bytes, not the {} announced",
            len.unwrap_or_default()
        )));
    }
    Ok(written)
}

/// Writes `pieces` in order, as few `writev` calls as the kernel allows.
fn write_all_vectored(mut f: &std::fs::File, pieces: &[Bytes]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut i = 0;
    let mut offset = 0;
    while i < pieces.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&pieces[i][offset..]))
            .chain(pieces[i + 1..].iter().map(|p| IoSlice::new(p)))
            .collect();
        let mut n = f.write_vectored(&slices)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Skips what was written.
        while i < pieces.len() && n >= pieces[i].len() - offset {
            n -= pieces[i].len() - offset;
            i += 1;
            offset = 0;
        }
        offset += n;
    }
    Ok(())
}

/// One stored file.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredFile {
    /// Path relative to the org's storage root, with `/`.
    pub key: String,
    pub size: u64,
    /// Modification time (ISO-8601).
    pub last_modified: String,
}

impl From<fs::Entry> for StoredFile {
    fn from(e: fs::Entry) -> Self {
        StoredFile {
            key: e.key,
            size: e.meta.size,
            last_modified: iso(e.meta.modified),
        }
    }
}

fn iso(t: std::time::SystemTime) -> String {
    crate::run_metrics::iso(t.into())
}

/// Reply of `storage/list-files`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileList {
    pub files: Vec<StoredFile>,
}

/// Query of `storage/list-files`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    prefix: Option<String>,
}

/// Query of `storage/upload`.
#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    key: Option<String>,
}

impl PathError {
    /// The API's answer: links and other refusals are 422s on the key, a missing file
    /// a 404, the rest internal.
    fn into_api(self, loc: &str, key: &str) -> ApiError {
        let refused = |msg: String| {
            ApiError::Validation(vec![FieldError {
                loc: vec![loc.into(), "key".into()],
                msg,
                kind: "value_error".into(),
                input: Some(key.into()),
            }])
        };
        match self {
            PathError::NotFound => ApiError::NotFound(format!("file not found: {key}")),
            e @ (PathError::Link { .. } | PathError::NotDir { .. }) => refused(e.to_string()),
            PathError::NotFile => refused(format!("{key} is not a regular file")),
            PathError::Io(e) => ApiError::Internal(format!("storage: {e}")),
        }
    }
}

fn checked_key(key: &str, loc: &str) -> Result<String, ApiError> {
    if fs::valid_key(key) {
        Ok(key.to_string())
    } else {
        Err(ApiError::Validation(vec![FieldError {
            loc: vec![loc.into(), "key".into()],
            msg: fs::KEY_RULES.into(),
            kind: "value_error".into(),
            input: Some(key.into()),
        }]))
    }
}

fn join_error(e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("storage: {e}"))
}

/// Files in the org's storage, optionally under a prefix.
#[utoipa::path(get, path = "/api/v2/external/storage/list-files", tag = "storage",
    params(("prefix" = Option<String>, Query)),
    responses((status = 200, body = FileList)), security(("bearer" = [])))]
pub async fn list_files(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<FileList>, ApiError> {
    let root = state.storage.root(&caller.org.id);
    let prefix = q.prefix.unwrap_or_default();
    let files = blocking(move || fs::list(&root, &prefix))
        .await
        .map_err(join_error)?
        .map_err(|e| ApiError::Internal(format!("storage: {e}")))?;
    Ok(Json(FileList {
        files: files.into_iter().map(StoredFile::from).collect(),
    }))
}

/// Downloads one file of the org's storage (streamed; `Content-Length` is its size).
// A key that is, or passes through, a symbolic link is refused (422); one that names
// no regular file is a 404 or a 422. (Not in the doc comment: it is the OpenAPI text.)
#[utoipa::path(get, path = "/api/v2/external/storage/download/{key}", tag = "storage",
    params(("key" = String, Path, description = "path of the file, may contain '/'")),
    responses((status = 200, description = "the file's bytes"), (status = 404, body = stoa_types::ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(key): UrlPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let key = checked_key(&key, "path")?;
    let root = state.storage.root(&caller.org.id);
    let k = key.clone();
    let (file, meta) = blocking(move || fs::open_file(&root, &k))
        .await
        .map_err(join_error)?
        .map_err(|e| e.into_api("path", &key))?;
    // No more than the announced length, should a run append while it is read.
    let stream = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(tokio::fs::File::from_std(file), meta.size),
        256 * 1024,
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, meta.size.into());
    Ok((headers, axum::body::Body::from_stream(stream)))
}

/// Uploads a file (the request body, streamed to disk) to the org's storage at `key`.
// A key that is, or passes through, a symbolic link or a file is refused (422); a body
// over the org's storage quota is refused (413) and leaves nothing.
#[utoipa::path(post, path = "/api/v2/external/storage/upload", tag = "storage",
    params(("key" = String, Query, description = "path to store the body at")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = StoredFile), (status = 413, body = stoa_types::ErrorBody),
        (status = 422, body = stoa_types::ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<StoredFile>, ApiError> {
    let Some(key) = q.key else {
        return Err(ApiError::query("key", "missing", "Field required", None));
    };
    let key = checked_key(&key, "query")?;
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let meta = state
        .storage
        .write(&caller.org.id, &key, len, body.into_data_stream())
        .await
        .map_err(|e| match e {
            WriteError::Path(e) => e.into_api("query", &key),
            WriteError::Quota(e) => ApiError::PayloadTooLarge(e.to_string()),
            WriteError::Body(m) => ApiError::BadRequest(m),
        })?;
    Ok(Json(StoredFile {
        key,
        size: meta.size,
        last_modified: iso(meta.modified),
    }))
}

/// Deletes one file of the org's storage (folders it leaves empty go with it).
#[utoipa::path(delete, path = "/api/v2/external/storage/delete/{key}", tag = "storage",
    params(("key" = String, Path, description = "path of the file, may contain '/'")),
    responses((status = 204, description = "deleted"), (status = 404, body = stoa_types::ErrorBody),
        (status = 422, body = stoa_types::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(key): UrlPath<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let key = checked_key(&key, "path")?;
    let root = state.storage.root(&caller.org.id);
    let k = key.clone();
    let removed = blocking(move || fs::remove(&root, &k))
        .await
        .map_err(join_error)?
        .map_err(|e| e.into_api("path", &key))?;
    if removed {
        Ok(axum::http::StatusCode::NO_CONTENT)
    } else {
        Err(PathError::NotFound.into_api("path", &key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_writes_keep_every_piece_in_order() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        let pieces: Vec<Bytes> = (0..300u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; (i as usize * 37) % 5000]))
            .collect();
        let f = std::fs::File::create(&path).unwrap();
        write_all_vectored(&f, &pieces).unwrap();
        let want: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[tokio::test]
    async fn a_body_over_the_reservation_or_its_length_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let storage = Storage::new(d.path(), 10);
        let org = OrgId("org_t".into());
        let chunks = |n: usize| {
            futures::stream::iter(
                (0..n).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"xxxx"))),
            )
        };
        let over = storage.write(&org, "a.bin", None, chunks(3)).await;
        assert!(matches!(over, Err(WriteError::Quota(_))), "{over:?}");
        let short = storage.write(&org, "a.bin", Some(9), chunks(2)).await;
        assert!(matches!(short, Err(WriteError::Body(_))), "{short:?}");
        assert!(fs::list(&storage.root(&org), "").unwrap().is_empty());
        let ok = storage
            .write(&org, "a.bin", Some(8), chunks(2))
            .await
            .unwrap();
        assert_eq!(ok.size, 8);
        // The reservations were given back: the room is what the file leaves.
        assert_eq!(*locked(&storage.cell(&org)), 0);
        assert!(storage.reserve(&org, Some(3), 0).is_err());
        assert!(storage.reserve(&org, Some(2), 0).is_ok());
    }
}
