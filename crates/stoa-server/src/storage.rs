//! Per-org storage: a directory on the worker, mounted into image runs at
//! `s3_mount_path` so runs can keep files between runs, and listed, downloaded and
//! uploaded through the API. Paths are checked so that a key never leaves the org's
//! directory; another org's files are never reachable.
//!
//! Runs write into this directory as root, so anything may be planted there: symbolic
//! links (to `/etc/passwd`, to `/`, to another org's directory), FIFOs, device nodes.
//! Every path is therefore walked one component at a time from a descriptor of the
//! org's directory, each component opened with `O_NOFOLLOW` (and `O_DIRECTORY` for
//! directories) relative to the previous one: a link is never followed, wherever it
//! sits in the path. Listing skips links and does not descend into them; download
//! reads regular files only, checked before opening (so a device is never opened) and
//! again on the open descriptor; upload writes a new file under a fresh name and
//! renames it into place, so it never opens, truncates or writes through what a run
//! left at the key, and it creates directories and regular files only, never links.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use stoa_types::{FieldError, OrgId};

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

/// Directories deeper than this are not listed (a run can nest them without end).
const MAX_DEPTH: usize = 64;
/// Names of upload files before they are renamed into place (never listed).
const UPLOAD_PREFIX: &str = ".stoa-upload-";

/// Why a key cannot be read or written.
#[derive(Debug, thiserror::Error)]
enum PathError {
    #[error("not found")]
    NotFound,
    /// `at` (a prefix of the key) is a symbolic link.
    #[error("{at} is a symbolic link; storage never follows links")]
    Link { at: String },
    /// `at` is not a directory although the key goes on below it.
    #[error("{at} is not a directory")]
    NotDir { at: String },
    /// The key names something other than a regular file.
    #[error("not a regular file")]
    NotFile,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<Errno> for PathError {
    fn from(e: Errno) -> Self {
        PathError::Io(e.into())
    }
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

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the org's own directory (made by the server, never by a run).
fn open_root(root: &Path) -> Result<OwnedFd, PathError> {
    match rustix::fs::open(root, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOENT) => Err(PathError::NotFound),
        Err(e) => Err(e.into()),
    }
}

/// What is at `name` in `dir`, without following a link.
fn kind_at(dir: &OwnedFd, name: &str) -> Result<Option<FileType>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the directory `parts` below `root`, one component at a time and never through
/// a link; with `create`, missing directories are made.
fn open_dir(root: OwnedFd, parts: &[&str], create: bool) -> Result<OwnedFd, PathError> {
    let mut dir = root;
    for (i, part) in parts.iter().enumerate() {
        let at = || parts[..=i].join("/");
        let next = match rustix::fs::openat(&dir, *part, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&dir, *part, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                // Opened like any other component: a link planted since is refused.
                rustix::fs::openat(&dir, *part, DIR_FLAGS, Mode::empty())
                    .map_err(|e| classify(&dir, part, e, at()))?
            }
            Err(e) => return Err(classify(&dir, part, e, at())),
        };
        dir = next;
    }
    Ok(dir)
}

/// Turns a failed directory open into the reason: a link, not a directory, missing.
fn classify(dir: &OwnedFd, name: &str, e: Errno, at: String) -> PathError {
    match kind_at(dir, name) {
        Ok(Some(FileType::Symlink)) => PathError::Link { at },
        Ok(Some(FileType::Directory)) => PathError::Io(e.into()),
        Ok(Some(_)) => PathError::NotDir { at },
        Ok(None) => PathError::NotFound,
        Err(e) => e.into(),
    }
}

/// Splits a checked key into its directories and file name.
fn split_key(key: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = key.split('/').collect();
    let name = parts.pop().expect("a checked key has a part");
    (parts, name)
}

/// Reads the regular file at `key`.
fn read_key(root: &Path, key: &str) -> Result<Vec<u8>, PathError> {
    let (parts, name) = split_key(key);
    let dir = open_dir(open_root(root)?, &parts, false)?;
    // Checked before opening: opening a device or a FIFO can block or act.
    match kind_at(&dir, name)? {
        None => return Err(PathError::NotFound),
        Some(FileType::Symlink) => {
            return Err(PathError::Link {
                at: key.to_string(),
            });
        }
        Some(FileType::RegularFile) => {}
        Some(_) => return Err(PathError::NotFile),
    }
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let fd = match rustix::fs::openat(&dir, name, flags | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        // Replaced by a run between the check and the open.
        Err(Errno::LOOP) => {
            return Err(PathError::Link {
                at: key.to_string(),
            });
        }
        Err(Errno::NOENT) => return Err(PathError::NotFound),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
        return Err(PathError::NotFile);
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `body` at `key`: into a new file next to it, then renamed over it.
fn write_key(root: &Path, key: &str, body: &[u8]) -> Result<(), PathError> {
    std::fs::create_dir_all(root)?;
    let (parts, name) = split_key(key);
    let dir = open_dir(open_root(root)?, &parts, true)?;
    match kind_at(&dir, name)? {
        None | Some(FileType::RegularFile) => {}
        Some(FileType::Symlink) => {
            return Err(PathError::Link {
                at: key.to_string(),
            });
        }
        Some(_) => return Err(PathError::NotFile),
    }
    let tmp = format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_str(),
        flags | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    let written = std::fs::File::from(fd).write_all(body);
    // A rename replaces the entry itself: whatever a run put at the key since the
    // check (a link included) is replaced, never written through.
    let renamed = written
        .map_err(PathError::from)
        .and_then(|()| Ok(rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)?));
    if renamed.is_err() {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
    }
    renamed
}

/// Lists the regular files below `dir` (whose key prefix is `prefix`), never
/// following or descending into links.
fn walk(dir: &OwnedFd, prefix: &str, depth: usize, out: &mut Vec<StoredFile>) -> Result<(), Errno> {
    let entries = rustix::fs::Dir::read_from(dir)?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = OsStr::from_bytes(name).to_string_lossy().into_owned();
        let raw = OsStr::from_bytes(entry.file_name().to_bytes());
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        // Gone or replaced since it was read: skipped.
        let Ok(st) = rustix::fs::statat(dir, raw, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory if depth < MAX_DEPTH => {
                // O_NOFOLLOW: a directory swapped for a link since the stat is not entered.
                // A run may change what it holds while it is read: skipped, not a 500.
                if let Ok(sub) = rustix::fs::openat(dir, raw, DIR_FLAGS, Mode::empty()) {
                    let _ = walk(&sub, &key, depth + 1, out);
                }
            }
            FileType::RegularFile if !name.starts_with(UPLOAD_PREFIX) => {
                let modified = chrono::DateTime::from_timestamp(st.st_mtime, 0).unwrap_or_default();
                out.push(StoredFile {
                    key,
                    size: st.st_size as u64,
                    last_modified: modified.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                });
            }
            _ => {}
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
        match open_root(&root) {
            Ok(fd) => walk(&fd, "", 0, &mut out).map_err(PathError::from)?,
            Err(PathError::NotFound) => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("storage: {e}")))?;
    let mut files: Vec<StoredFile> = files
        .into_iter()
        .filter(|f| q.prefix.as_deref().is_none_or(|p| f.key.starts_with(p)))
        .collect();
    files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Json(FileList { files }))
}

/// Downloads one file of the org's storage.
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
    let key = checked_key(&key, "key")?;
    let root = org_dir(&state.config.data_dir, &caller.org.id);
    let k = key.clone();
    let bytes = tokio::task::spawn_blocking(move || read_key(&root, &k))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| e.into_api("path", &key))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

/// Uploads a file (the request body) to the org's storage at `key`.
// A key that is, or passes through, a symbolic link or a file is refused (422).
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
    let root = org_dir(&state.config.data_dir, &caller.org.id);
    let size = body.len() as u64;
    let k = key.clone();
    tokio::task::spawn_blocking(move || write_key(&root, &k, &body))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| e.into_api("query", &key))?;
    Ok(Json(StoredFile {
        key,
        size,
        last_modified: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn keys(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        walk(&open_root(root).unwrap(), "", 0, &mut out).unwrap();
        let mut k: Vec<String> = out.into_iter().map(|f| f.key).collect();
        k.sort();
        k
    }

    #[test]
    fn links_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("org");
        let other = d.path().join("other");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("secret"), "theirs").unwrap();
        std::fs::write(root.join("sub/mine.txt"), "mine").unwrap();
        symlink("/etc/passwd", root.join("passwd")).unwrap();
        symlink("/", root.join("rootfs")).unwrap();
        symlink(&other, root.join("other")).unwrap();
        symlink("../../other", root.join("sub/up")).unwrap();

        assert_eq!(keys(&root), ["sub/mine.txt"]);
        assert_eq!(read_key(&root, "sub/mine.txt").unwrap(), b"mine");
        for key in [
            "passwd",
            "rootfs/etc/passwd",
            "other/secret",
            "sub/up/secret",
        ] {
            let e = read_key(&root, key).unwrap_err();
            assert!(matches!(e, PathError::Link { .. }), "{key}: {e:?}");
        }
        assert!(matches!(read_key(&root, "nope"), Err(PathError::NotFound)));
        assert!(matches!(read_key(&root, "sub"), Err(PathError::NotFile)));

        for key in [
            "passwd",
            "other/secret",
            "other/new",
            "rootfs/tmp/x",
            "sub/up/x",
        ] {
            let e = write_key(&root, key, b"pwned").unwrap_err();
            assert!(matches!(e, PathError::Link { .. }), "{key}: {e:?}");
        }
        assert_eq!(std::fs::read(other.join("secret")).unwrap(), b"theirs");
        assert!(!other.join("new").exists());
        assert!(matches!(
            write_key(&root, "sub/mine.txt/x", b"x"),
            Err(PathError::NotDir { .. })
        ));
        write_key(&root, "a/b/c.txt", b"new").unwrap();
        write_key(&root, "a/b/c.txt", b"newer").unwrap();
        assert_eq!(std::fs::read(root.join("a/b/c.txt")).unwrap(), b"newer");
        assert_eq!(keys(&root), ["a/b/c.txt", "sub/mine.txt"]);
    }

    #[test]
    fn fifos_are_neither_opened_nor_listed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("org");
        std::fs::create_dir_all(&root).unwrap();
        let st = std::process::Command::new("mkfifo")
            .arg(root.join("pipe"))
            .status();
        if !st.is_ok_and(|s| s.success()) {
            return;
        }
        assert!(keys(&root).is_empty());
        assert!(matches!(read_key(&root, "pipe"), Err(PathError::NotFile)));
        assert!(matches!(
            write_key(&root, "pipe", b"x"),
            Err(PathError::NotFile)
        ));
    }
}
