//! Per-org storage: a directory on the worker, mounted into image runs at
//! `s3_mount_path` so runs can keep files between runs, and listed, downloaded and
//! uploaded through the API. Paths are checked so that a key never leaves the org's
//! directory; another org's files are never reachable.

use std::path::{Path, PathBuf};

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use stoa_types::OrgId;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// The storage directory of an org.
pub fn org_dir(data_dir: &Path, org: &OrgId) -> PathBuf {
    data_dir.join("storage").join(&org.0)
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

fn checked_key(key: &str, field: &str) -> Result<String, ApiError> {
    if stoa_core::validate::safe_relative_path(key) {
        Ok(key.to_string())
    } else {
        Err(ApiError::query(
            field,
            "value_error",
            "key must be a relative path without '..'",
            Some(key.into()),
        ))
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<StoredFile>) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let e = e?;
        let ft = e.file_type()?;
        let p = e.path();
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else if ft.is_file() {
            let meta = e.metadata()?;
            let modified: chrono::DateTime<chrono::Utc> = meta.modified()?.into();
            out.push(StoredFile {
                key: p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned(),
                size: meta.len(),
                last_modified: modified.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            });
        }
    }
    Ok(())
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
    let root = org_dir(&state.config.data_dir, &caller.org.id);
    let files = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        walk(&root, &root, &mut out).map(|_| out)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut files: Vec<StoredFile> = files
        .into_iter()
        .filter(|f| q.prefix.as_deref().is_none_or(|p| f.key.starts_with(p)))
        .collect();
    files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Json(FileList { files }))
}

/// Downloads one file of the org's storage.
#[utoipa::path(get, path = "/api/v2/external/storage/download/{key}", tag = "storage",
    params(("key" = String, Path, description = "path of the file, may contain '/'")),
    responses((status = 200, description = "the file's bytes"), (status = 404, body = stoa_types::ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(key): UrlPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let key = checked_key(&key, "key")?;
    let path = org_dir(&state.config.data_dir, &caller.org.id).join(&key);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(_) => return Err(ApiError::NotFound(format!("file not found: {key}"))),
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

/// Uploads a file (the request body) to the org's storage at `key`.
#[utoipa::path(post, path = "/api/v2/external/storage/upload", tag = "storage",
    params(("key" = String, Query, description = "path to store the body at")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = StoredFile), (status = 422, body = stoa_types::ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<UploadQuery>,
    crate::api::Body(body): crate::api::Body,
) -> Result<Json<StoredFile>, ApiError> {
    let Some(key) = q.key else {
        return Err(ApiError::query("key", "missing", "Field required", None));
    };
    let key = checked_key(&key, "key")?;
    let path = org_dir(&state.config.data_dir, &caller.org.id).join(&key);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    tokio::fs::write(&path, &body)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(StoredFile {
        key,
        size: body.len() as u64,
        last_modified: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }))
}
