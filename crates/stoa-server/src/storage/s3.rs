//! The S3 endpoint over org storage: path-style, SigV4 (checked by `s3s` against the
//! secret [`creds`] derives from the access key id), one bucket per org.
//!
//! Every request must be signed; the access check lets a request touch only the
//! bucket of the org its access key names (anything else is `AccessDenied`, whether
//! that bucket exists or not). Keys go through [`fs::valid_key`] and the storage
//! layer's link-free path walk; multipart parts are kept outside the org's directory
//! (runs never see them) until the upload completes.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use stoa_types::OrgId;

use super::creds::{CredentialKey, KeyError, bucket_of};
use super::fs::{self, PathError};
use super::{QuotaExceeded, Storage, WriteError, blocking, copy_body};

/// Most keys a listing returns per page.
const MAX_KEYS: usize = 1000;
/// Highest part number of a multipart upload (as S3).
const MAX_PARTS: i32 = 10_000;

/// What the API needs of the S3 endpoint.
pub struct S3Endpoint {
    /// The endpoint URL handed out with credentials.
    pub endpoint: String,
    pub key: Arc<CredentialKey>,
}

/// The S3 operations over org storage.
pub struct StoaS3 {
    pub storage: Arc<Storage>,
    pub key: Arc<CredentialKey>,
    /// Days an unfinished multipart upload is kept.
    pub multipart_expiry_days: u64,
}

/// Checks signatures: the secret of an access key id is derived from it.
pub struct Auth(pub Arc<CredentialKey>);

#[async_trait::async_trait]
impl s3s::auth::S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<s3s::auth::SecretKey> {
        match self.0.check(access_key, chrono::Utc::now().timestamp()) {
            Ok((_, secret)) => Ok(secret.into()),
            Err(KeyError::Expired) => Err(s3_error!(ExpiredToken, "{}", KeyError::Expired)),
            Err(e) => Err(s3_error!(InvalidAccessKeyId, "{e}")),
        }
    }
}

/// Lets a signed request reach its own org's bucket only.
pub struct Access(pub Arc<CredentialKey>);

#[async_trait::async_trait]
impl s3s::access::S3Access for Access {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
        let Some(c) = cx.credentials() else {
            return Err(s3_error!(AccessDenied, "requests must be signed"));
        };
        let org = org_of(&self.0, &c.access_key)?;
        match cx.s3_path() {
            s3s::path::S3Path::Root => Ok(()),
            s3s::path::S3Path::Bucket { bucket } | s3s::path::S3Path::Object { bucket, .. } => {
                if **bucket == bucket_of(&org) {
                    Ok(())
                } else {
                    Err(s3_error!(AccessDenied, "Access Denied"))
                }
            }
        }
    }
}

fn org_of(key: &CredentialKey, access_key: &str) -> S3Result<OrgId> {
    key.check(access_key, chrono::Utc::now().timestamp())
        .map(|(org, _)| org)
        .map_err(|e| s3_error!(AccessDenied, "{e}"))
}

fn quota_error(e: &QuotaExceeded) -> S3Error {
    let mut err = S3Error::with_message(S3ErrorCode::Custom("QuotaExceeded".into()), e.to_string());
    err.set_status_code(axum::http::StatusCode::FORBIDDEN);
    err
}

fn path_error(e: PathError, key: &str) -> S3Error {
    match e {
        PathError::NotFound => s3_error!(NoSuchKey, "no such key: {key}"),
        e @ (PathError::Link { .. } | PathError::NotDir { .. }) => {
            s3_error!(InvalidArgument, "{key}: {e}")
        }
        PathError::NotFile => s3_error!(InvalidArgument, "{key} is not a regular file"),
        PathError::Io(e) => S3Error::internal_error(e),
    }
}

fn write_error(e: WriteError, key: &str) -> S3Error {
    match e {
        WriteError::Path(e) => path_error(e, key),
        WriteError::Quota(q) => quota_error(&q),
        WriteError::Body(m) => s3_error!(IncompleteBody, "{m}"),
    }
}

fn internal(e: impl std::error::Error + Send + Sync + 'static) -> S3Error {
    S3Error::internal_error(e)
}

fn checked(key: &str) -> S3Result<()> {
    if fs::valid_key(key) {
        Ok(())
    } else {
        Err(s3_error!(InvalidArgument, "{}", fs::KEY_RULES))
    }
}

fn etag(s: &str) -> ETag {
    ETag::Strong(s.to_string())
}

/// Percent-encodes a key for `encoding-type=url` listings (`/` kept).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl StoaS3 {
    fn org<T>(&self, req: &S3Request<T>) -> S3Result<OrgId> {
        // The access check has accepted the key already; here it only names the org.
        let c = req
            .credentials
            .as_ref()
            .ok_or_else(|| s3_error!(AccessDenied, "requests must be signed"))?;
        org_of(&self.key, &c.access_key)
    }

    /// The org's directory, made if missing (the bucket always exists).
    async fn root(&self, org: &OrgId) -> S3Result<PathBuf> {
        let root = self.storage.root(org);
        let r = root.clone();
        blocking(move || fs::make_root(&r))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        Ok(root)
    }

    /// The directory of one multipart upload, after checking its id.
    fn upload_dir(&self, org: &OrgId, upload_id: &str) -> S3Result<PathBuf> {
        if upload_id.len() != 32 || !upload_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(s3_error!(NoSuchUpload));
        }
        Ok(self.storage.staging(org).join(upload_id))
    }
}

/// One page of a listing: files and common prefixes in key order.
struct Page {
    prefix: String,
    delimiter: Option<String>,
    max: usize,
    contents: Vec<fs::Entry>,
    prefixes: Vec<String>,
    truncated: bool,
    /// The last key or common prefix of the page.
    last: Option<String>,
    /// Keys are percent-encoded (`encoding-type=url`).
    url: bool,
}

impl Page {
    fn encoder(&self) -> impl Fn(&str) -> String + use<> {
        let url = self.url;
        move |s: &str| if url { url_encode(s) } else { s.to_string() }
    }

    /// Where the next page starts, when there is one.
    fn next(&self) -> Option<String> {
        self.truncated.then(|| self.last.clone()).flatten()
    }

    fn objects(&self) -> Vec<Object> {
        let enc = self.encoder();
        self.contents
            .iter()
            .map(|e| Object {
                key: Some(enc(&e.key)),
                size: Some(e.meta.size as i64),
                last_modified: Some(e.meta.modified.into()),
                e_tag: Some(etag(&e.meta.etag)),
                storage_class: Some(ObjectStorageClass::from_static(
                    ObjectStorageClass::STANDARD,
                )),
                ..Default::default()
            })
            .collect()
    }

    fn common_prefixes(&self) -> Vec<CommonPrefix> {
        let enc = self.encoder();
        self.prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(enc(p)),
            })
            .collect()
    }
}

impl StoaS3 {
    /// The page of the org's listing under `prefix` that starts after `after` (a key
    /// or a common prefix), folding keys at `delimiter` into common prefixes.
    async fn page(
        &self,
        org: &OrgId,
        prefix: &Option<String>,
        delimiter: &Option<String>,
        after: Option<String>,
        max_keys: Option<i32>,
        encoding: &Option<EncodingType>,
    ) -> S3Result<Page> {
        let prefix = prefix.clone().unwrap_or_default();
        let delimiter = delimiter.clone().filter(|d| !d.is_empty());
        let max = max_keys.map_or(MAX_KEYS, |m| (m.max(0) as usize).min(MAX_KEYS));
        let root = self.storage.root(org);
        let p = prefix.clone();
        let entries = blocking(move || fs::list(&root, &p))
            .await
            .map_err(internal)?
            .map_err(|e| path_error(e, &prefix))?;
        let mut page = Page {
            prefix,
            delimiter,
            max,
            contents: vec![],
            prefixes: vec![],
            truncated: false,
            last: None,
            url: encoding
                .as_ref()
                .is_some_and(|t| t.as_str() == EncodingType::URL),
        };
        for e in entries {
            // What the entry shows as: its common prefix, else its key. These go up
            // with the keys, so a page resumes after the last one shown, whether that
            // was a key or a common prefix (or a key the client names).
            let common = page.delimiter.as_ref().and_then(|d| {
                let rest = &e.key[page.prefix.len()..];
                rest.find(d.as_str())
                    .map(|i| e.key[..page.prefix.len() + i + d.len()].to_string())
            });
            let shown = common.as_deref().unwrap_or(&e.key);
            if after.as_deref().is_some_and(|a| shown <= a) {
                continue;
            }
            if let Some(c) = &common
                && page.prefixes.last() == Some(c)
            {
                continue;
            }
            if page.contents.len() + page.prefixes.len() >= max {
                page.truncated = true;
                break;
            }
            match common {
                Some(c) => {
                    page.last = Some(c.clone());
                    page.prefixes.push(c);
                }
                None => {
                    page.last = Some(e.key.clone());
                    page.contents.push(e);
                }
            }
        }
        Ok(page)
    }
}

/// A request's body, or an empty one when it has none.
fn body_or_empty(body: Option<StreamingBlob>) -> StreamingBlob {
    body.unwrap_or_else(|| {
        StreamingBlob::wrap(futures::stream::empty::<Result<Bytes, std::io::Error>>())
    })
}

/// Opens the object at `key`, after checking the key.
async fn open_object(root: PathBuf, key: String) -> S3Result<(std::fs::File, fs::Meta)> {
    checked(&key)?;
    blocking(move || fs::open_file(&root, &key).map_err(|e| path_error(e, &key)))
        .await
        .map_err(internal)?
}

fn check_conditions(
    meta: &fs::Meta,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
) -> S3Result<()> {
    let matches = |c: &ETagCondition| match c {
        ETagCondition::Any => true,
        ETagCondition::ETag(t) => t.value() == meta.etag,
    };
    if if_match.is_some_and(|c| !matches(c)) {
        return Err(s3_error!(PreconditionFailed));
    }
    if if_none_match.is_some_and(matches) {
        return Err(s3_error!(NotModified));
    }
    Ok(())
}

#[async_trait::async_trait]
impl S3 for StoaS3 {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let org = self.org(&req)?;
        let root = self.root(&org).await?;
        let created = std::fs::metadata(&root)
            .and_then(|m| m.modified())
            .map_err(internal)?;
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(vec![Bucket {
                name: Some(bucket_of(&org)),
                creation_date: Some(created.into()),
                ..Default::default()
            }]),
            ..Default::default()
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let org = self.org(&req)?;
        self.root(&org).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let org = self.org(&req)?;
        self.root(&org).await?;
        Err(s3_error!(
            BucketAlreadyOwnedByYou,
            "the org's bucket always exists"
        ))
    }

    async fn get_bucket_location(
        &self,
        _req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let org = self.org(&req)?;
        let input = req.input;
        // The token is the last key or common prefix of the previous page, in hex.
        let after = match &input.continuation_token {
            Some(t) => Some(
                hex::decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| s3_error!(InvalidArgument, "bad continuation token"))?,
            ),
            None => input.start_after.clone(),
        };
        let page = self
            .page(
                &org,
                &input.prefix,
                &input.delimiter,
                after,
                input.max_keys,
                &input.encoding_type,
            )
            .await?;
        let enc = page.encoder();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(enc(&page.prefix)),
            delimiter: page.delimiter.as_deref().map(&enc),
            max_keys: Some(page.max as i32),
            key_count: Some((page.contents.len() + page.prefixes.len()) as i32),
            is_truncated: Some(page.truncated),
            continuation_token: input.continuation_token,
            next_continuation_token: page.next().map(|l| hex::encode(l.as_bytes())),
            start_after: input.start_after.as_deref().map(&enc),
            encoding_type: input.encoding_type,
            contents: Some(page.objects()),
            common_prefixes: Some(page.common_prefixes()),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let org = self.org(&req)?;
        let input = req.input;
        let page = self
            .page(
                &org,
                &input.prefix,
                &input.delimiter,
                input.marker.clone(),
                input.max_keys,
                &input.encoding_type,
            )
            .await?;
        let enc = page.encoder();
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(enc(&page.prefix)),
            delimiter: page.delimiter.as_deref().map(&enc),
            max_keys: Some(page.max as i32),
            is_truncated: Some(page.truncated),
            marker: input.marker.as_deref().map(&enc),
            next_marker: page.next().map(|m| enc(&m)),
            encoding_type: input.encoding_type,
            contents: Some(page.objects()),
            common_prefixes: Some(page.common_prefixes()),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let org = self.org(&req)?;
        let input = req.input;
        let (_, meta) = open_object(self.storage.root(&org), input.key.clone()).await?;
        check_conditions(&meta, input.if_match.as_ref(), input.if_none_match.as_ref())?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(meta.size as i64),
            content_type: Some("application/octet-stream".into()),
            e_tag: Some(etag(&meta.etag)),
            last_modified: Some(meta.modified.into()),
            accept_ranges: Some("bytes".into()),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let org = self.org(&req)?;
        let input = req.input;
        let (file, meta) = open_object(self.storage.root(&org), input.key.clone()).await?;
        check_conditions(&meta, input.if_match.as_ref(), input.if_none_match.as_ref())?;
        let range = match &input.range {
            Some(r) => Some(
                r.check(meta.size)
                    .ok()
                    .filter(|r| r.start < r.end)
                    .ok_or_else(|| s3_error!(InvalidRange, "the range is outside the object"))?,
            ),
            None => None,
        };
        let (start, len) = range
            .as_ref()
            .map_or((0, meta.size), |r| (r.start, r.end - r.start));
        let mut file = tokio::fs::File::from_std(file);
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(internal)?;
        }
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(stream)),
            content_length: Some(len as i64),
            content_range: range.map(|r| format!("bytes {}-{}/{}", r.start, r.end - 1, meta.size)),
            content_type: Some("application/octet-stream".into()),
            e_tag: Some(etag(&meta.etag)),
            last_modified: Some(meta.modified.into()),
            accept_ranges: Some("bytes".into()),
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let org = self.org(&req)?;
        let input = req.input;
        let len = input.content_length.map(|l| l.max(0) as u64);
        // `folder/` with no content: the folder.
        if let Some(dir) = input.key.strip_suffix('/') {
            checked(dir)?;
            if len.unwrap_or(0) > 0 {
                return Err(s3_error!(
                    InvalidArgument,
                    "a key ending in '/' names a folder and holds no content"
                ));
            }
            let root = self.storage.root(&org);
            let d = dir.to_string();
            blocking(move || fs::make_dir(&root, &d))
                .await
                .map_err(internal)?
                .map_err(|e| path_error(e, &input.key))?;
            return Ok(S3Response::new(PutObjectOutput::default()));
        }
        checked(&input.key)?;
        let body = body_or_empty(input.body);
        let meta = self
            .storage
            .write(&org, &input.key, len, body)
            .await
            .map_err(|e| write_error(e, &input.key))?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&meta.etag)),
            size: Some(meta.size as i64),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let org = self.org(&req)?;
        let key = req.input.key;
        let root = self.storage.root(&org);
        let k = key.clone();
        // Deleting what is not there succeeds, as in S3; `folder/` is the folder, gone
        // only when empty.
        let removed = match key.strip_suffix('/') {
            Some(dir) => {
                checked(dir)?;
                let d = dir.to_string();
                blocking(move || fs::remove_empty_dir(&root, &d)).await
            }
            None => {
                checked(&key)?;
                blocking(move || fs::remove(&root, &k)).await
            }
        };
        removed
            .map_err(internal)?
            .map_err(|e| path_error(e, &key))?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let org = self.org(&req)?;
        let quiet = req.input.delete.quiet.unwrap_or(false);
        let keys: Vec<String> = req
            .input
            .delete
            .objects
            .into_iter()
            .map(|o| o.key)
            .collect();
        if keys.len() > 1000 {
            return Err(s3_error!(
                MalformedXML,
                "at most 1000 keys per DeleteObjects"
            ));
        }
        let root = self.storage.root(&org);
        let results = blocking(move || {
            keys.into_iter()
                .map(|k| {
                    let r = if fs::valid_key(&k) {
                        fs::remove(&root, &k)
                            .map(|_| ())
                            .map_err(|e| path_error(e, &k))
                    } else {
                        checked(&k)
                    };
                    (k, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(internal)?;
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for (key, r) in results {
            match r {
                Ok(()) if !quiet => deleted.push(DeletedObject {
                    key: Some(key),
                    ..Default::default()
                }),
                Ok(()) => {}
                Err(e) => errors.push(Error {
                    code: Some(e.code().as_str().to_string()),
                    key: Some(key),
                    message: e.message().map(str::to_string),
                    ..Default::default()
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let org = self.org(&req)?;
        let input = req.input;
        let CopySource::Bucket {
            bucket, key: src, ..
        } = &input.copy_source
        else {
            return Err(s3_error!(NotImplemented, "copies name a bucket and key"));
        };
        if **bucket != bucket_of(&org) {
            return Err(s3_error!(AccessDenied, "Access Denied"));
        }
        let src = src.to_string();
        checked(&input.key)?;
        let (file, meta) = open_object(self.storage.root(&org), src).await?;
        let body = tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(file),
            256 * 1024,
        );
        let meta = self
            .storage
            .write(&org, &input.key, Some(meta.size), body)
            .await
            .map_err(|e| write_error(e, &input.key))?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(etag(&meta.etag)),
                last_modified: Some(meta.modified.into()),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let org = self.org(&req)?;
        let input = req.input;
        checked(&input.key)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = self.upload_dir(&org, &id)?;
        let staging = self.storage.staging(&org);
        let days = self.multipart_expiry_days;
        let key = input.key.clone();
        blocking(move || {
            expire_uploads(&staging, days);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("key"), key)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let org = self.org(&req)?;
        let input = req.input;
        let dir = self.upload_dir(&org, &input.upload_id)?;
        let n = input.part_number;
        if !(1..=MAX_PARTS).contains(&n) {
            return Err(s3_error!(
                InvalidArgument,
                "part numbers go from 1 to {MAX_PARTS}"
            ));
        }
        let len = input.content_length.map(|l| l.max(0) as u64);
        let storage = self.storage.clone();
        let (o, d) = (org.clone(), dir.clone());
        let tmp = dir.join(format!("{n}.{}", uuid::Uuid::new_v4().simple()));
        let t = tmp.clone();
        let (reservation, file) = blocking(move || {
            if std::fs::read_to_string(d.join("key")).is_err() {
                return Err(s3_error!(NoSuchUpload));
            }
            let replacing = std::fs::metadata(d.join(n.to_string())).map_or(0, |m| m.len());
            let r = storage
                .reserve(&o, len, replacing)
                .map_err(|q| quota_error(&q))?;
            let f = std::fs::File::create(&t).map_err(internal)?;
            Ok((r, f))
        })
        .await
        .map_err(internal)??;
        let body = body_or_empty(input.body);
        // Removed however this ends (a dropped request included), unless renamed.
        let guard = TempPart(Some(tmp.clone()));
        let written = copy_body(body, file, len, &reservation).await;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let part = dir.join(n.to_string());
        let done = blocking(move || match written {
            Ok(_) => {
                let mut guard = guard;
                let t = guard.0.take().expect("set above");
                std::fs::rename(&t, &part).map_err(|e| write_error(e.into(), "part"))
            }
            Err(e) => Err(write_error(e, "part")),
        })
        .await
        .map_err(internal)?;
        drop(reservation);
        done?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&tag)),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let org = self.org(&req)?;
        let input = req.input;
        checked(&input.key)?;
        let dir = self.upload_dir(&org, &input.upload_id)?;
        let mut numbers: Vec<i32> = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.part_number)
            .collect();
        if numbers.is_empty() || numbers.windows(2).any(|w| w[0] >= w[1]) {
            numbers.sort();
            if numbers.is_empty() {
                return Err(s3_error!(
                    InvalidPart,
                    "a completion names at least one part"
                ));
            }
            return Err(s3_error!(InvalidPartOrder));
        }
        let root = self.storage.root(&org);
        let key = input.key.clone();
        let meta = blocking(move || -> S3Result<fs::Meta> {
            match std::fs::read_to_string(dir.join("key")) {
                Ok(k) if k == key => {}
                Ok(_) => return Err(s3_error!(InvalidArgument, "the upload is for another key")),
                Err(_) => return Err(s3_error!(NoSuchUpload)),
            }
            let parts: Vec<PathBuf> = numbers.iter().map(|n| dir.join(n.to_string())).collect();
            if let Some(n) = numbers.iter().zip(&parts).find(|(_, p)| !p.is_file()) {
                return Err(s3_error!(InvalidPart, "part {} was not uploaded", n.0));
            }
            let (new, mut out) = fs::create(&root, &key).map_err(|e| path_error(e, &key))?;
            for p in &parts {
                let mut f = std::fs::File::open(p).map_err(internal)?;
                std::io::copy(&mut f, &mut out).map_err(internal)?;
            }
            drop(out);
            let meta = new.commit().map_err(|e| path_error(e, &key))?;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(meta)
        })
        .await
        .map_err(internal)??;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(etag(&meta.etag)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let org = self.org(&req)?;
        let dir = self.upload_dir(&org, &req.input.upload_id)?;
        blocking(move || {
            if !dir.join("key").is_file() {
                return Err(s3_error!(NoSuchUpload));
            }
            std::fs::remove_dir_all(&dir).map_err(internal)
        })
        .await
        .map_err(internal)??;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}

/// A part being received, removed when dropped before it is renamed into place.
struct TempPart(Option<PathBuf>);

impl Drop for TempPart {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes the org's multipart uploads untouched for `days` days.
fn expire_uploads(staging: &std::path::Path, days: u64) {
    let Ok(rd) = std::fs::read_dir(staging) else {
        return;
    };
    let horizon = std::time::Duration::from_secs(days * 86_400);
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > horizon);
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Why a request is refused before `s3s` reads any of it: every request must carry a
/// Signature Version 4 (header or presigned query); Version 2 signatures (no body
/// hash, no expiry) and browser-form uploads are not accepted.
fn refused_at_the_door(req: &axum::extract::Request) -> Option<&'static str> {
    let auth = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let query = req.uri().query().unwrap_or_default();
    let presigned_v4 = query.split('&').any(|p| p.starts_with("X-Amz-Signature="));
    let is_form = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().starts_with("multipart/form-data"));
    if req.method() == axum::http::Method::POST && is_form {
        return Some("browser-form uploads (POST Object) are not supported");
    }
    match auth {
        Some(a) if a.starts_with("AWS4-HMAC-SHA256 ") => None,
        Some(_) => Some("only AWS Signature Version 4 is accepted"),
        None if presigned_v4 => None,
        None => Some("requests must be signed (AWS Signature Version 4)"),
    }
}

/// The S3 error reply of a request refused at the door.
fn refusal(why: &'static str) -> axum::response::Response {
    match s3_error!(AccessDenied, "{why}").to_http_response() {
        Ok(r) => r.map(axum::body::Body::new),
        Err(_) => {
            let mut r = axum::response::Response::new(axum::body::Body::from(why));
            *r.status_mut() = axum::http::StatusCode::FORBIDDEN;
            r
        }
    }
}

/// Serves the S3 endpoint on `listener` until `shutdown` flips.
pub async fn serve(
    listener: tokio::net::TcpListener,
    s3: StoaS3,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let key = s3.key.clone();
    let mut b = s3s::service::S3ServiceBuilder::new(s3);
    b.set_auth(Auth(key.clone()));
    b.set_access(Access(key));
    // No browser-form uploads (POST Object): s3s would read their file into memory
    // before any access check.
    let mut config = s3s::config::S3Config::default();
    config.post_object_max_file_size = 0;
    config.form_max_fields_size = 64 * 1024;
    b.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(
        config,
    ))));
    let service = b.build();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let service = service.clone();
        async move {
            if let Some(why) = refused_at_the_door(&req) {
                return refusal(why);
            }
            let req = req.map(s3s::Body::http_body_unsync);
            match service.call(req).await {
                Ok(resp) => resp.map(axum::body::Body::new),
                Err(e) => {
                    tracing::warn!(error = ?e, "S3 request failed");
                    let mut r = axum::response::Response::new(axum::body::Body::empty());
                    *r.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }
            }
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|v| *v).await;
        })
        .await
}
