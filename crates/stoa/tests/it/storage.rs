//! Org storage over the S3 protocol: the official `lyceum storage` commands, boto3
//! straight against the endpoint, the storage mounted into every run type, quotas.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use stoa_types::RunStatus;

use super::cli::{Lyceum, lyceum_bin};
use super::docker_runs::engine_ready;
use super::*;

/// The Python of the official client's environment (it has boto3).
pub fn boto_python() -> Option<PathBuf> {
    let p = lyceum_bin()?.parent()?.join("python");
    if p.exists() {
        Some(p)
    } else {
        missing("boto3 (installed with lyceum-cli into target/lyceum-venv by scripts/test)");
        None
    }
}

/// S3 credentials of the client's org, from `storage/credentials`.
pub async fn credentials(c: &Client) -> Value {
    c.storage_credentials()
        .await
        .expect("credentials are handed out")
}

/// Runs a boto3 script with `s3` (a client from `creds`) and `bucket` defined; what
/// it prints last is parsed as JSON.
pub async fn boto(python: &Path, creds: &Value, script: &str) -> Value {
    let prelude = r#"
import json, os, sys
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
c = json.loads(os.environ["CREDS"])
s3 = boto3.client("s3", endpoint_url=c["endpoint"], aws_access_key_id=c["access_key"],
    aws_secret_access_key=c["secret_key"], aws_session_token=c.get("session_token"),
    region_name=c.get("region", "us-east-1"), config=Config(signature_version="s3v4", retries={"max_attempts": 1}))
bucket = c["bucket_name"]
def code(f):
    try:
        f()
        return "ok"
    except ClientError as e:
        return e.response["Error"]["Code"]
"#;
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(format!("{prelude}\n{script}"))
        .env("CREDS", creds.to_string())
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "boto3 script failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `n` bytes that are not all alike (so a misplaced part shows).
fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The org's id (its storage directory is named after it).
async fn org_id(c: &Client) -> String {
    c.user_org().await.unwrap().org_id
}

/// Files under `dir`, relative, links included (to see what a write left behind).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn official_lyceum_cli_storage_commands_round_trip() {
    let s = TestServer::start().await;
    let Some(ly) = Lyceum::login(&s).await else {
        return;
    };
    let home = ly.home.path();
    // 50 MiB: over the client's 8 MiB multipart threshold.
    let big = pattern(50 * 1024 * 1024);
    std::fs::write(home.join("big.bin"), &big).unwrap();
    std::fs::create_dir_all(home.join("folder/sub")).unwrap();
    std::fs::write(home.join("folder/a.txt"), "a\n").unwrap();
    std::fs::write(home.join("folder/sub/b.txt"), "b\n").unwrap();

    let o = ly
        .run(&["storage", "upload", "big.bin", "--key", "data/big.bin"])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    // It went up in parts: the upload's staging area was made, and emptied.
    let org = org_id(&s.client).await;
    let staging = s.data_dir().join("storage-uploads").join(&org);
    assert!(staging.is_dir(), "a multipart upload was made");
    assert_eq!(tree(&staging), Vec::<String>::new());

    let o = ly.run(&["storage", "upload", "folder", "-r", "-f"]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let o = ly.run(&["storage", "ls", "-r", "--json"]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let listed: Value = serde_json::from_str(&o.stdout).unwrap();
    let keys: Vec<(&str, u64)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["key"].as_str().unwrap(), f["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            ("data/big.bin", big.len() as u64),
            ("folder/a.txt", 2),
            ("folder/sub/b.txt", 2)
        ]
    );
    let o = ly.run(&["storage", "ls"]).await;
    assert!(
        o.stdout.contains("data/") && o.stdout.contains("folder/"),
        "{}",
        o.stdout
    );

    let o = ly
        .run(&["storage", "download", "data/big.bin", "-o", "back/big.bin"])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(std::fs::read(home.join("back/big.bin")).unwrap() == big);

    let o = ly.run(&["storage", "rm", "folder/a.txt", "-f"]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        storage_keys(&s.client).await,
        ["data/big.bin", "folder/sub/b.txt"]
    );
    let o = ly.run(&["storage", "rmdir", "folder", "-f"]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(storage_keys(&s.client).await, ["data/big.bin"]);
    // No empty folder is left behind.
    assert!(
        !s.data_dir()
            .join("storage")
            .join(&org)
            .join("folder")
            .exists()
    );
    let o = ly.run(&["storage", "rm", "nope.txt", "-f"]).await;
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
}

#[tokio::test]
async fn s3_clients_list_put_get_ranges_copy_and_delete() {
    let Some(py) = boto_python() else { return };
    let s = TestServer::start().await;
    let creds = credentials(&s.client).await;
    assert_eq!(creds["session_token"], Value::Null);
    assert!(
        creds["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    let r = boto(
        &py,
        &creds,
        r#"
out = {}
s3.head_bucket(Bucket=bucket)
out["buckets"] = [b["Name"] for b in s3.list_buckets()["Buckets"]]
s3.put_object(Bucket=bucket, Key="a/one.txt", Body=b"0123456789")
for k in ["a/two.txt", "a/sub/three.txt", "b.txt", "c d+e%.txt"]:
    s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
out["range"] = s3.get_object(Bucket=bucket, Key="a/one.txt", Range="bytes=2-5")["Body"].read().decode()
out["tail"] = s3.get_object(Bucket=bucket, Key="a/one.txt", Range="bytes=-3")["Body"].read().decode()
h = s3.head_object(Bucket=bucket, Key="a/one.txt")
out["size"] = h["ContentLength"]
out["same_etag"] = s3.get_object(Bucket=bucket, Key="a/one.txt", IfMatch=h["ETag"])["Body"].read().decode()
out["stale_etag"] = code(lambda: s3.get_object(Bucket=bucket, Key="a/one.txt", IfMatch='"0000"'))
out["missing"] = code(lambda: s3.head_object(Bucket=bucket, Key="nope"))
out["missing_get"] = code(lambda: s3.get_object(Bucket=bucket, Key="nope"))
s3.copy_object(Bucket=bucket, Key="copy.txt", CopySource={"Bucket": bucket, "Key": "a/one.txt"})
out["copy"] = s3.get_object(Bucket=bucket, Key="copy.txt")["Body"].read().decode()
r = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
out["top"] = [o["Key"] for o in r.get("Contents", [])]
out["dirs"] = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
r = s3.list_objects_v2(Bucket=bucket, Prefix="a/", Delimiter="/")
out["in_a"] = [o["Key"] for o in r.get("Contents", [])] + [p["Prefix"] for p in r.get("CommonPrefixes", [])]
pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
out["paged"] = [[o["Key"] for o in p.get("Contents", [])] for p in pages]
r = s3.list_objects(Bucket=bucket, Prefix="a/", Delimiter="/")
out["v1_in_a"] = [o["Key"] for o in r.get("Contents", [])] + [p["Prefix"] for p in r.get("CommonPrefixes", [])]
pages = s3.get_paginator("list_objects").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
out["v1_paged"] = [[o["Key"] for o in p.get("Contents", [])] for p in pages]
s3.delete_object(Bucket=bucket, Key="b.txt")
out["delete_missing"] = code(lambda: s3.delete_object(Bucket=bucket, Key="b.txt"))
r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a/one.txt"}, {"Key": "a/sub/three.txt"}, {"Key": "../x"}]})
out["deleted"] = sorted(d["Key"] for d in r.get("Deleted", []))
out["delete_errors"] = [e["Key"] for e in r.get("Errors", [])]
out["left"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
# A key the client names to start after is a key, also when it ends in '/'.
out["after_dir"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, StartAfter="a/").get("Contents", [])]
# Another delimiter, one entry a page: every entry once, no loop.
for k in ["x-1/a", "x-1/b", "x-2", "y"]:
    s3.put_object(Bucket=bucket, Key=k, Body=b"")
seen, token = [], None
for _ in range(20):
    kw = {"ContinuationToken": token} if token else {}
    r = s3.list_objects_v2(Bucket=bucket, Delimiter="-", MaxKeys=1, **kw)
    seen += [o["Key"] for o in r.get("Contents", [])] + [p["Prefix"] for p in r.get("CommonPrefixes", [])]
    if not r["IsTruncated"]:
        break
    token = r["NextContinuationToken"]
out["dash_pages"] = seen
out["empty_range"] = code(lambda: s3.get_object(Bucket=bucket, Key="y", Range="bytes=-3"))
# `folder/` deletes the folder only when it is empty.
s3.put_object(Bucket=bucket, Key="empty/", Body=b"")
out["delete_full_folder"] = code(lambda: s3.delete_object(Bucket=bucket, Key="x-1/"))
out["delete_empty_folder"] = code(lambda: s3.delete_object(Bucket=bucket, Key="empty/"))
out["deep"] = code(lambda: s3.put_object(Bucket=bucket, Key="d/" * 64 + "f", Body=b"x"))
print(json.dumps(out))
"#,
    )
    .await;
    let bucket = creds["bucket_name"].as_str().unwrap();
    assert_eq!(r["buckets"], json!([bucket]));
    assert_eq!(r["range"], "2345");
    assert_eq!(r["tail"], "789");
    assert_eq!(r["size"], 10);
    assert_eq!(r["same_etag"], "0123456789");
    assert_eq!(r["stale_etag"], "PreconditionFailed");
    assert_eq!(r["missing"], "404");
    assert_eq!(r["missing_get"], "NoSuchKey");
    assert_eq!(r["copy"], "0123456789");
    assert_eq!(r["top"], json!(["b.txt", "c d+e%.txt", "copy.txt"]));
    assert_eq!(r["dirs"], json!(["a/"]));
    assert_eq!(r["in_a"], json!(["a/one.txt", "a/two.txt", "a/sub/"]));
    assert_eq!(
        r["paged"],
        json!([
            ["a/one.txt", "a/sub/three.txt"],
            ["a/two.txt", "b.txt"],
            ["c d+e%.txt", "copy.txt"]
        ])
    );
    assert_eq!(r["v1_in_a"], r["in_a"]);
    assert_eq!(r["v1_paged"], r["paged"]);
    assert_eq!(r["delete_missing"], "ok");
    assert_eq!(r["deleted"], json!(["a/one.txt", "a/sub/three.txt"]));
    assert_eq!(r["delete_errors"], json!(["../x"]));
    assert_eq!(r["left"], json!(["a/two.txt", "c d+e%.txt", "copy.txt"]));
    assert_eq!(
        r["after_dir"],
        json!(["a/two.txt", "c d+e%.txt", "copy.txt"])
    );
    assert_eq!(
        r["dash_pages"],
        json!(["a/two.txt", "c d+e%.txt", "copy.txt", "x-", "y"])
    );
    assert_eq!(r["empty_range"], "InvalidRange");
    assert_eq!(r["delete_full_folder"], "ok");
    assert_eq!(r["delete_empty_folder"], "ok");
    assert_eq!(r["deep"], "InvalidArgument");
    assert!(
        !s.data_dir()
            .join("storage")
            .join(org_id(&s.client).await)
            .join("empty")
            .exists()
    );
    // The REST listing sees the same files.
    assert_eq!(
        storage_keys(&s.client).await,
        [
            "a/two.txt",
            "c d+e%.txt",
            "copy.txt",
            "x-1/a",
            "x-1/b",
            "x-2",
            "y"
        ]
    );
}

#[tokio::test]
async fn s3_requests_with_a_wrong_secret_or_another_orgs_credentials_are_refused() {
    let Some(py) = boto_python() else { return };
    let s = TestServer::start().await;
    let a = credentials(&s.client).await;
    let other = other_org(&s, "team-b").await;
    let b = credentials(&other).await;
    assert_ne!(a["bucket_name"], b["bucket_name"]);
    assert_ne!(a["access_key"], b["access_key"]);
    boto(
        &py,
        &a,
        r#"s3.put_object(Bucket=bucket, Key="secret.txt", Body=b"a's data"); print("{}")"#,
    )
    .await;

    let mut wrong = a.clone();
    wrong["secret_key"] = json!("0".repeat(40));
    let r = boto(
        &py,
        &wrong,
        r#"print(json.dumps({"get": code(lambda: s3.get_object(Bucket=bucket, Key="secret.txt")), "list": code(lambda: s3.list_objects_v2(Bucket=bucket))}))"#,
    )
    .await;
    assert_eq!(
        r,
        json!({"get": "SignatureDoesNotMatch", "list": "SignatureDoesNotMatch"})
    );

    // Org B's credentials, aimed at org A's bucket.
    let script = format!(
        r#"
a = {:?}
out = {{}}
out["get"] = code(lambda: s3.get_object(Bucket=a, Key="secret.txt"))
out["head"] = code(lambda: s3.head_object(Bucket=a, Key="secret.txt"))
out["list"] = code(lambda: s3.list_objects_v2(Bucket=a))
out["put"] = code(lambda: s3.put_object(Bucket=a, Key="planted.txt", Body=b"x"))
out["delete"] = code(lambda: s3.delete_object(Bucket=a, Key="secret.txt"))
out["copy"] = code(lambda: s3.copy_object(Bucket=bucket, Key="stolen.txt", CopySource={{"Bucket": a, "Key": "secret.txt"}}))
out["mpu"] = code(lambda: s3.create_multipart_upload(Bucket=a, Key="big"))
out["buckets"] = [b["Name"] for b in s3.list_buckets()["Buckets"]]
out["own"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
print(json.dumps(out))
"#,
        a["bucket_name"].as_str().unwrap()
    );
    let r = boto(&py, &b, &script).await;
    for op in ["get", "head", "list", "put", "delete", "copy", "mpu"] {
        // HEAD replies carry no body: boto3 names the status.
        let want = if op == "head" { "403" } else { "AccessDenied" };
        assert_eq!(r[op], want, "{op}: {r}");
    }
    assert_eq!(r["buckets"], json!([b["bucket_name"]]));
    assert_eq!(r["own"], json!([]));
    assert_eq!(storage_keys(&s.client).await, ["secret.txt"]);
    assert_eq!(storage_keys(&other).await, Vec::<String>::new());

    // Unsigned, and with made-up keys.
    let endpoint = a["endpoint"].as_str().unwrap();
    let bucket = a["bucket_name"].as_str().unwrap();
    let plain = reqwest::get(format!("{endpoint}/{bucket}/secret.txt"))
        .await
        .unwrap();
    assert_eq!(plain.status().as_u16(), 403);
    let body = plain.text().await.unwrap();
    assert!(
        body.contains("AccessDenied") && !body.contains("a's data"),
        "{body}"
    );
    // Signature Version 2, and a browser-form upload: refused before anything is read.
    let v2 = reqwest::Client::new()
        .get(format!("{endpoint}/{bucket}/secret.txt"))
        .header(
            "Authorization",
            format!("AWS {}:c2lnbmF0dXJl", a["access_key"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(v2.status().as_u16(), 403);
    assert!(v2.text().await.unwrap().contains("Signature Version 4"));
    let form = reqwest::Client::new()
        .post(format!("{endpoint}/{bucket}"))
        .header("Content-Type", "multipart/form-data; boundary=x")
        .body(vec![b'x'; 4 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 403);
    let mut forged = a.clone();
    forged["access_key"] = json!("AKIAIOSFODNN7EXAMPLE");
    let r = boto(
        &py,
        &forged,
        r#"print(json.dumps(code(lambda: s3.get_object(Bucket=bucket, Key="secret.txt"))))"#,
    )
    .await;
    assert_eq!(r, "InvalidAccessKeyId");
}

#[tokio::test]
async fn an_upload_over_the_quota_is_refused_and_leaves_nothing() {
    let Some(py) = boto_python() else { return };
    let s = TestServer::start_with(|c| c.storage.max_bytes_per_org = 12 * 1024 * 1024).await;
    let creds = credentials(&s.client).await;
    let org = org_id(&s.client).await;
    let r = boto(
        &py,
        &creds,
        r#"
from boto3.s3.transfer import TransferConfig
out = {}
out["small"] = code(lambda: s3.put_object(Bucket=bucket, Key="keep.bin", Body=b"k" * (4 * 1024 * 1024)))
out["over"] = code(lambda: s3.put_object(Bucket=bucket, Key="over.bin", Body=b"o" * (9 * 1024 * 1024)))
# Multipart: 10 MiB in 5 MiB parts, more than is left.
open("/tmp/stoa-quota-test.bin", "wb").write(b"m" * (10 * 1024 * 1024))
cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024, max_concurrency=2)
try:
    s3.upload_file("/tmp/stoa-quota-test.bin", bucket, "multi.bin", Config=cfg)
    out["multi"] = "ok"
except Exception as e:
    out["multi"] = "QuotaExceeded" if "QuotaExceeded" in str(e) else str(e)
out["replace"] = code(lambda: s3.put_object(Bucket=bucket, Key="keep.bin", Body=b"r" * (5 * 1024 * 1024)))
out["keys"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
print(json.dumps(out))
"#,
    )
    .await;
    assert_eq!(r["small"], "ok");
    assert_eq!(r["over"], "QuotaExceeded");
    assert_eq!(r["multi"], "QuotaExceeded", "{r}");
    // Replacing a file counts the room it frees.
    assert_eq!(r["replace"], "ok");
    assert_eq!(r["keys"], json!(["keep.bin"]));
    // Through the API too: 413, and nothing written.
    let up = s
        .client
        .raw(
            reqwest::Method::POST,
            "/api/v2/external/storage/upload?key=rest.bin",
            Some(vec![b'x'; 8 * 1024 * 1024].into()),
        )
        .await
        .unwrap();
    assert_eq!(up.status().as_u16(), 413);
    let detail = up.text().await.unwrap();
    assert!(detail.contains("storage.max_bytes_per_org"), "{detail}");
    // Not a partial file, not a temporary one, not a part.
    assert_eq!(tree(&s.data_dir().join("storage").join(&org)), ["keep.bin"]);
    let staging = s.data_dir().join("storage-uploads").join(&org);
    let parts: Vec<String> = tree(&staging)
        .into_iter()
        .filter(|p| !p.ends_with("/key") && p.contains('/'))
        .collect();
    assert!(parts.is_empty(), "parts left: {parts:?}");
}

#[tokio::test]
async fn a_file_uploaded_with_lyceum_is_read_by_every_run_type_and_run_files_are_listed() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let Some(ly) = Lyceum::login(&s).await else {
        return;
    };
    std::fs::write(ly.home.path().join("in.txt"), "hello storage\n").unwrap();
    let o = ly
        .run(&["storage", "upload", "in.txt", "--key", "shared/in.txt"])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);

    // A Python run (sandboxed: the storage is bound into its sandbox).
    let (id, _) = s
        .start_code(
            "import os, pathlib\nroot = os.environ['STOA_STORAGE']\nprint(root)\nprint(open(root + '/shared/in.txt').read(), end='')\npathlib.Path(root, 'out').mkdir(exist_ok=True)\nopen(root + '/out/py.txt', 'w').write('from python')\n",
        )
        .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "/mnt/s3\nhello storage\n");

    // An image run.
    let r = s
        .client
        .start_image_json(&json!({"docker_image_ref": "local/busybox:full", "docker_run_cmd": ["sh", "-c", "cat /mnt/s3/shared/in.txt && echo from-image > /mnt/s3/out/img.txt"]}))
        .await
        .unwrap();
    let r = s.wait_end(&r.execution_id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "hello storage\n");

    // A compose run: mounted into the service `x-stoa.s3-mount` names, not the other.
    let yaml = r#"
services:
  reader:
    image: local/busybox:full
    command: ["sh", "-c", "cat /data/shared/in.txt && echo from-compose > /data/out/compose.txt"]
  other:
    image: local/busybox:full
    command: ["sh", "-c", "test -e /data/shared/in.txt && echo other-sees-it || echo other-does-not"]
x-stoa:
  s3-mount: [reader]
"#;
    let r = s
        .client
        .start_compose_json(&json!({"compose_file_code": yaml, "execution_type": "cpu", "timeout": 120, "enable_s3_mount": true, "s3_mount_path": "/data"}))
        .await
        .unwrap();
    let r = s.wait_end(&r.execution_id).await;
    assert_status(&r, RunStatus::Completed);
    assert!(r.stdout.contains("hello storage"), "{}", r.stdout);
    assert!(r.stdout.contains("other-does-not"), "{}", r.stdout);
    // Without enable_s3_mount (the compose default) nothing is mounted.
    let r = s
        .client
        .start_compose_json(&json!({"compose_file_code": "services:\n  a:\n    image: local/busybox:full\n    command: [\"sh\", \"-c\", \"test -e /mnt/s3/shared/in.txt && echo mounted || echo not-mounted\"]\n", "execution_type": "cpu"}))
        .await
        .unwrap();
    let r = s.wait_end(&r.execution_id).await;
    assert!(r.stdout.contains("not-mounted"), "{}", r.stdout);

    let o = ly.run(&["storage", "ls", "-r", "--json"]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let keys: Vec<String> = serde_json::from_str::<Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "out/compose.txt",
            "out/img.txt",
            "out/py.txt",
            "shared/in.txt"
        ]
    );
    let o = ly
        .run(&["storage", "download", "out/py.txt", "-o", "py.txt"])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        std::fs::read_to_string(ly.home.path().join("py.txt")).unwrap(),
        "from python"
    );
    // Stopped, not dropped: the last run's network is given back before the end.
    let _ = s.stop().await;
}

#[tokio::test]
async fn a_bad_compose_s3_mount_list_is_refused() {
    let s = TestServer::start().await;
    let err = s
        .client
        .start_compose_json(&json!({"compose_file_code": "services:\n  a:\n    image: x\nx-stoa:\n  s3-mount: [b]\n", "enable_s3_mount": true, "s3_mount_path": "rel"}))
        .await
        .unwrap_err();
    let stoa_client::ClientError::Api {
        status: 422,
        detail,
    } = err
    else {
        panic!("422 expected: {err}");
    };
    let body = json!({ "detail": detail });
    let locs = locs(&body);
    assert!(
        locs.contains(&"body.compose_file_code.x-stoa.s3-mount.0".to_string())
            && locs.contains(&"body.s3_mount_path".to_string()),
        "{body}"
    );
}

#[tokio::test]
async fn stoa_storage_copies_lists_and_removes() {
    use super::cli::stoa;
    let s = TestServer::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let big = pattern(3 * 1024 * 1024 + 17);
    std::fs::write(w.join("big.bin"), &big).unwrap();
    std::fs::create_dir_all(w.join("tree/sub")).unwrap();
    std::fs::write(w.join("tree/a.txt"), "a").unwrap();
    std::fs::write(w.join("tree/sub/b c.txt"), "b").unwrap();

    let o = stoa(&["storage", "cp", "big.bin", "s3://data/"], &s, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let o = stoa(&["storage", "cp", "-r", "tree", "storage:t"], &s, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        storage_keys(&s.client).await,
        ["data/big.bin", "t/a.txt", "t/sub/b c.txt"]
    );
    let o = stoa(&["storage", "ls", "--json"], &s, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let listed: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(listed[0]["size"], big.len());

    let o = stoa(&["storage", "cp", "s3://data/big.bin", "back/"], &s, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(std::fs::read(w.join("back/big.bin")).unwrap() == big);
    let o = stoa(&["storage", "cp", "-r", "s3://t", "t-back"], &s, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        std::fs::read_to_string(w.join("t-back/sub/b c.txt")).unwrap(),
        "b"
    );

    // Plain messages, nothing sent.
    for bad in [
        vec!["storage", "cp", "big.bin", "other.bin"],
        vec!["storage", "cp", "s3://a", "s3://b"],
        vec!["storage", "cp", "missing.bin", "s3://x"],
    ] {
        let o = stoa(&bad, &s, w).await;
        assert_ne!(o.code, 0, "{bad:?}: {}", o.stdout);
        assert!(
            !o.stderr.is_empty() && !o.stderr.contains("panicked"),
            "{}",
            o.stderr
        );
    }
    let o = stoa(&["storage", "rm", "s3://nope"], &s, w).await;
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("nope"), "{}", o.stderr);

    let o = stoa(&["storage", "rm", "-r", "s3://t"], &s, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let o = stoa(&["storage", "rm", "s3://data/big.bin"], &s, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(storage_keys(&s.client).await.is_empty());
}

#[tokio::test]
async fn the_s3_endpoint_takes_a_free_port_when_the_next_one_is_taken() {
    // A port whose next port is held by someone else.
    let (port, held) = loop {
        let port = free_port();
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port + 1)) {
            break (port, l);
        }
    };
    let s = TestServer::start_with(|c| c.listen = format!("127.0.0.1:{port}")).await;
    let creds = credentials(&s.client).await;
    let endpoint = creds["endpoint"].as_str().unwrap().to_string();
    let s3_port = s.handle.as_ref().unwrap().s3_addr.unwrap().port();
    assert_ne!(s3_port, port + 1);
    assert_eq!(endpoint, format!("http://127.0.0.1:{s3_port}"));
    // It answers there (an unsigned request is refused by the S3 endpoint itself).
    let r = reqwest::get(format!("{endpoint}/")).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    drop(s);

    // A port the operator set is kept: taken, the server does not start.
    let taken = held.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = match TestServer::try_start_in(dir, |c| {
        c.storage.s3_listen = Some(taken.to_string());
    })
    .await
    {
        Ok(_) => panic!("the server started although storage.s3_listen is taken"),
        Err((e, _)) => format!("{e:#}"),
    };
    assert!(e.contains("storage.s3_listen"), "{e}");
    // Off: no endpoint, and the credentials say why.
    let s = TestServer::start_with(|c| c.storage.s3_listen = Some("off".into())).await;
    match s.client.storage_credentials().await {
        Err(stoa_client::ClientError::Api {
            status: 503,
            detail,
        }) => assert!(detail.to_string().contains("storage.s3_listen"), "{detail}"),
        other => panic!("credentials without an S3 endpoint: {other:?}"),
    }
}
