//! Attacks: the smaller findings. A secret cut in two by a 64 KiB output piece is
//! still masked, bundled paths that need a file and a directory of one name are a 422,
//! and the data directory and its files are the server's only.

use std::os::unix::fs::PermissionsExt;

use serde_json::json;
use stoa_types::RunStatus;

use super::super::{TestServer, assert_status, read_stream, wait_end};
use super::compose::no_runs;
use super::other_org;

const TOKEN: &str = "tok-5e2b-straddle";

#[tokio::test]
async fn a_secret_straddling_an_output_piece_boundary_is_masked() {
    let s = TestServer::start().await;
    let attacker = other_org(&s, "mask-split").await;
    attacker.env_set(&[("TOKEN", TOKEN)]).await.unwrap();
    // One 200 KiB line, read in 64 KiB pieces; the secret crosses the first two piece
    // boundaries (at different offsets into it) and sits whole at the end.
    let code = r#"
import os, sys
t = os.environ['TOKEN']
line = ''
for boundary in (65536, 2 * 65536):
    line += 'a' * (boundary - len(line) - 5) + t
line += 'b' * (200 * 1024 - len(line) - len(t)) + t
sys.stdout.write(line + '\n')
sys.stderr.write('e' * (65536 - 3) + t + '\n')
"#;
    let start = attacker
        .start_python_json(&json!({"code": code}))
        .await
        .unwrap();
    let (streamed, _) = read_stream(&attacker, &start.streaming_url, None).await;
    let r = wait_end(&attacker, &start.execution_id).await;
    assert_status(&r, RunStatus::Completed);
    // The same line built here, then masked.
    let mut line = String::new();
    for boundary in [65536, 2 * 65536] {
        line += &"a".repeat(boundary - line.len() - 5);
        line += TOKEN;
    }
    line += &"b".repeat(200 * 1024 - line.len() - TOKEN.len());
    line += TOKEN;
    let want = format!("{}\n", line.replace(TOKEN, "***"));
    assert!(
        !r.stdout.contains("5e2b"),
        "no part of the secret is stored"
    );
    assert_eq!(r.stdout.len(), want.len(), "nothing is lost or doubled");
    assert!(r.stdout == want, "the stored line is the masked line");
    assert_eq!(
        r.stderr,
        format!("{}***\n", "e".repeat(65536 - 3)),
        "stderr is masked the same way"
    );
    assert!(
        !streamed.contains("5e2b"),
        "no part of the secret is streamed"
    );
    assert!(streamed.contains(&want), "the stream has the masked line");
}

#[tokio::test]
async fn secrets_dense_in_a_long_image_run_line_are_all_masked() {
    if !super::super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let attacker = other_org(&s, "mask-split-image").await;
    attacker.env_set(&[("TOKEN", TOKEN)]).await.unwrap();
    // The secret every 19 bytes of a 200 KiB line: whatever the sizes of the pieces
    // the engine's log stream comes in, the piece boundaries cut secrets.
    let cmd = "yes \"ab$TOKEN\" | head -n 11000 | tr -d '\\n' | head -c 204800; echo";
    let start = attacker
        .start_image_json(&json!({"docker_image_ref": "local/busybox:full",
            "docker_run_cmd": ["sh", "-c", cmd]}))
        .await
        .unwrap();
    let (streamed, _) = read_stream(&attacker, &start.streaming_url, None).await;
    let r = wait_end(&attacker, &start.execution_id).await;
    assert_status(&r, RunStatus::Completed);
    let line: String = format!("ab{TOKEN}").repeat(11000)[..204800].to_string();
    let want = format!("{}\n", line.replace(TOKEN, "***"));
    assert_eq!(r.stdout.len(), want.len(), "nothing is lost or doubled");
    assert!(
        r.stdout == want,
        "every secret is masked in the stored line"
    );
    assert!(streamed == want, "every secret is masked in the stream");
}

#[tokio::test]
async fn a_path_that_is_a_file_and_a_directory_is_a_422() {
    let s = TestServer::start().await;
    let attacker = other_org(&s, "import-clash").await;
    for (files, extra) in [
        (json!({"a": "x = 1", "a/b": "y = 2"}), json!({})),
        (json!({"pkg/a.py": "", "pkg/a.py/b/c": ""}), json!({})),
        (json!({"main.py/x": ""}), json!({"file_name": "main.py"})),
    ] {
        let mut body = json!({"code": "print(1)", "import_files": files.to_string()});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let err = attacker
            .start_python_json(&body)
            .await
            .expect_err("refused");
        assert_eq!(err.status(), Some(422), "{files}: {err}");
        let text = err.to_string();
        assert!(text.contains("import_files"), "{text}");
        assert!(text.contains("a path cannot be both"), "{text}");
    }
    assert!(no_runs(&attacker).await, "no run was created");
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Asserts the data directory is 0700 and the files at its top 0600.
fn assert_private(data: &std::path::Path) {
    assert_eq!(mode(data), 0o700, "the data directory");
    let db: &[&str] = if crate::it::on_postgres() {
        &[]
    } else {
        &["stoa.db", "stoa.db-wal", "stoa.db-shm"]
    };
    for f in db.iter().chain(&["admin.key", "master.key"]) {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    for e in std::fs::read_dir(data).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
    }
}

#[tokio::test]
async fn the_data_directory_and_its_files_are_private() {
    let s = TestServer::start().await;
    let data = s.data_dir();
    assert_private(&data);
    // A data directory left readable by an earlier version is fixed at the next start.
    let dir = s.stop().await;
    let set = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set(&data, 0o755);
    for f in ["admin.key", "master.key"] {
        set(&data.join(f), 0o644);
    }
    if !crate::it::on_postgres() {
        set(&data.join("stoa.db"), 0o644);
        // A leftover WAL (never truncated: it may hold the last transactions).
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("stoa.db-wal"))
            .unwrap();
        set(&data.join("stoa.db-wal"), 0o644);
    }
    let s = TestServer::start_in(dir, |_| {}).await;
    assert_private(&s.data_dir());
}
