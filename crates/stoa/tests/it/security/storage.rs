//! Attacks: storage. A run writes into its org's storage as root, so it can plant
//! symbolic links there (to `/etc/passwd`, to `/`, to another org's storage) and FIFOs;
//! the storage API must then never read, write or list through them.

use std::time::Duration;

use serde_json::json;
use stoa_client::Client;
use stoa_types::RunStatus;

use super::super::docker_runs::engine_ready;
use super::super::{TestServer, assert_status, storage_keys, wait_end};
use super::other_org;

const IMAGE: &str = "local/busybox:full";

async fn upload(c: &Client, key: &str, body: &'static str) -> (u16, String) {
    let r = c
        .raw(
            reqwest::Method::POST,
            &format!("/api/v2/external/storage/upload?key={key}"),
            Some(body.into()),
        )
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn download(c: &Client, key: &str) -> (u16, String) {
    let path = format!("/api/v2/external/storage/download/{key}");
    // A FIFO opened for reading would block the server's reply: bounded here.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.raw(reqwest::Method::GET, &path, None),
    )
    .await
    .expect("the download answers")
    .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn links_planted_by_a_run_are_never_followed() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let victim = other_org(&s, "victim").await;
    let attacker = other_org(&s, "attacker").await;
    assert_eq!(upload(&victim, "secret.txt", "victim-secret").await.0, 200);
    let victim_id = victim.user_org().await.unwrap().org_id;
    let victim_dir = s.data_dir().join("storage").join(&victim_id);
    assert!(victim_dir.join("secret.txt").is_file(), "{victim_dir:?}");

    // Relative links reach the victim's directory from the attacker's, on the host.
    let plant = format!(
        "cd /mnt/s3 && echo mine > mine.txt && ln -s /etc/passwd passwd && ln -s / rootfs \
         && ln -s ../{victim_id} victim && ln -s ../{victim_id}/secret.txt stolen.txt \
         && mkdir -p d && ln -s /etc d/etc && mkfifo pipe && echo planted"
    );
    let r = attacker
        .start_image_json(
            &json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", plant]}),
        )
        .await
        .unwrap();
    let rec = wait_end(&attacker, &r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    assert_eq!(rec.stdout, "planted\n");

    // Listing: the attacker's own file only; no link is followed or descended into.
    assert_eq!(storage_keys(&attacker).await, ["mine.txt"]);
    assert_eq!(
        download(&attacker, "mine.txt").await,
        (200, "mine\n".into())
    );

    // Download: refused for a link and for any path through one.
    for key in [
        "passwd",
        "rootfs/etc/passwd",
        "rootfs/etc/shadow",
        "victim/secret.txt",
        "stolen.txt",
        "d/etc/passwd",
        "pipe",
    ] {
        let (status, body) = download(&attacker, key).await;
        assert!(status == 422 || status == 404, "{key}: {status} {body}");
        assert!(
            !body.contains("root:") && !body.contains("victim-secret"),
            "{key}: {body}"
        );
        if key != "pipe" {
            assert!(body.contains("symbolic link"), "{key}: {body}");
        }
    }

    // Upload: never written through a link, never creates one.
    let pwned = format!("/tmp/stoa-storage-pwned-{}", std::process::id());
    let through_root = format!("rootfs{pwned}");
    for key in [
        "passwd",
        "stolen.txt",
        "victim/planted.txt",
        "victim/secret.txt",
        through_root.as_str(),
        "d/etc/stoa-pwned",
    ] {
        let (status, body) = upload(&attacker, key, "pwned").await;
        assert_eq!(status, 422, "{key}: {body}");
        assert!(body.contains("symbolic link"), "{key}: {body}");
    }
    assert!(!std::path::Path::new(&pwned).exists());
    assert!(!std::path::Path::new("/etc/stoa-pwned").exists());
    assert!(
        std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .starts_with("root:")
    );
    assert_eq!(
        std::fs::read_to_string(victim_dir.join("secret.txt")).unwrap(),
        "victim-secret"
    );
    assert!(!victim_dir.join("planted.txt").exists());
    assert_eq!(storage_keys(&victim).await, ["secret.txt"]);
    assert_eq!(
        download(&victim, "secret.txt").await,
        (200, "victim-secret".into())
    );

    // The attacker's own uploads still work, and are regular files.
    assert_eq!(upload(&attacker, "out/new.txt", "fresh").await.0, 200);
    let attacker_id = attacker.user_org().await.unwrap().org_id;
    let meta = std::fs::symlink_metadata(
        s.data_dir()
            .join("storage")
            .join(&attacker_id)
            .join("out/new.txt"),
    )
    .unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(storage_keys(&attacker).await, ["mine.txt", "out/new.txt"]);
}

/// Over the S3 endpoint, with keys an attacker chooses: `..`, absolute keys, and the
/// links a (sandboxed Python) run of the attacker's org plants in its storage, aimed
/// at `/etc` and at the victim org's storage on the host.
#[tokio::test]
async fn s3_keys_and_planted_links_never_leave_the_org_storage() {
    let Some(py) = super::super::storage::boto_python() else {
        return;
    };
    let s = TestServer::start().await;
    let (victim, _) = super::super::org_with_key(&s, "victim").await;
    let (attacker, _) = super::super::org_with_key(&s, "attacker").await;
    assert_eq!(upload(&victim, "secret.txt", "victim-secret").await.0, 200);
    let victim_id = victim.user_org().await.unwrap().org_id;
    let victim_dir = s.data_dir().join("storage").join(&victim_id);

    let plant = format!(
        "import os\nos.chdir(os.environ['STOA_STORAGE'])\nos.symlink('/etc', 'etc')\n\
         os.symlink('/etc/passwd', 'passwd')\nos.symlink('../{victim_id}', 'victim')\n\
         open('mine.txt', 'w').write('mine')\nprint('planted')\n"
    );
    let r = attacker
        .start_python(&stoa_types::PythonStartRequest {
            code: plant,
            ..Default::default()
        })
        .await
        .unwrap();
    let r = wait_end(&attacker, &r.execution_id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "planted\n");

    let creds = super::super::storage::credentials(&attacker).await;
    let out = super::super::storage::boto(
        &py,
        &creds,
        &format!(
            r#"
v = {victim_id:?}
out = {{}}
def get(k):
    try:
        return s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode(errors="replace")
    except ClientError as e:
        return e.response["Error"]["Code"]
for k in ["etc/passwd", "passwd", "victim/secret.txt", "../" + v + "/secret.txt", "/etc/passwd", "a/../../" + v + "/secret.txt"]:
    out["get " + k] = get(k)
for k in ["etc/pwned-by-s3", "victim/planted.txt", "../" + v + "/planted.txt", "/tmp/pwned-by-s3"]:
    out["put " + k] = code(lambda: s3.put_object(Bucket=bucket, Key=k, Body=b"pwned"))
out["copy"] = code(lambda: s3.copy_object(Bucket=bucket, Key="copy.txt", CopySource={{"Bucket": bucket, "Key": "etc/passwd"}}))
out["delete"] = code(lambda: s3.delete_object(Bucket=bucket, Key="victim/secret.txt"))
out["keys"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
out["etc_keys"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="etc/").get("Contents", [])]
print(json.dumps(out))
"#
        ),
    )
    .await;
    let obj = out.as_object().unwrap();
    for (op, result) in obj {
        if op.starts_with("get ") || op.starts_with("put ") || op == "copy" || op == "delete" {
            let r = result.as_str().unwrap();
            assert!(
                r != "ok" && !r.contains("root:") && !r.contains("victim-secret"),
                "{op}: {r}"
            );
        }
    }
    assert_eq!(out["keys"], json!(["mine.txt"]));
    assert_eq!(out["etc_keys"], json!([]));
    // Nothing was written or removed outside the attacker's storage.
    assert!(!std::path::Path::new("/etc/pwned-by-s3").exists());
    assert!(!std::path::Path::new("/tmp/pwned-by-s3").exists());
    assert_eq!(
        std::fs::read_to_string(victim_dir.join("secret.txt")).unwrap(),
        "victim-secret"
    );
    assert_eq!(storage_keys(&victim).await, ["secret.txt"]);
    assert!(!victim_dir.join("planted.txt").exists());
}
