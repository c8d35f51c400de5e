//! The PostgreSQL store beyond what the whole suite shows on it: moving a SQLite store
//! up with `stoa store copy`.

use std::time::Duration;

use serde_json::{Value, json};
use stoa_types::RunStatus;

use super::*;

const IMAGE: &str = "local/busybox:full";

/// What a client sees of a run: its record, timing, logs and metrics, with the fields
/// that depend on the moment they are read (queue positions, "now") left out.
async fn seen(c: &Client, id: &str) -> Value {
    let mut rec = serde_json::to_value(c.execution(id).await.unwrap()).unwrap();
    // Deliveries go on being attempted (by either server): where they go is compared.
    let callbacks: Vec<Value> = rec["callbacks"]
        .as_array()
        .map(|d| d.iter().map(|d| d["url"].clone()).collect())
        .unwrap_or_default();
    rec["callbacks"] = json!(callbacks);
    let timing = serde_json::to_value(c.timing(id).await.unwrap()).unwrap();
    let logs = serde_json::to_value(c.logs(id, 1000, 168).await.unwrap()).unwrap();
    let metrics = c.metrics(id, "1s").await.unwrap();
    json!({"record": rec, "timing": timing, "logs": logs, "metrics": metrics})
}

fn copy(from: &std::path::Path, to: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["store", "copy", "--from"])
        .arg(from)
        .args(["--to", to])
        .output()
        .unwrap()
}

/// A SQLite store with runs of every kind is copied into PostgreSQL: a server on the
/// copy answers the same for every run and decrypts the org's secrets; a second copy
/// into the now non-empty database is refused.
#[tokio::test]
async fn store_copy_moves_every_run_to_postgres() {
    let Some(url) = stoa_store::conformance::fresh_postgres_url().await else {
        return;
    };
    let docker = super::docker_runs::engine_ready();
    let s = TestServer::start_with(|c| {
        c.store.url = None;
        c.metrics.interval_ms = 200;
    })
    .await;
    let c = &s.client;
    c.env_set(&[("TOKEN", "copy-secret-value")]).await.unwrap();
    c.callback_secret(false).await.unwrap();
    let mut ids = Vec::new();
    let py = c
        .start_python_json(&json!({
            "code": "import os, time\nprint('token', os.environ['TOKEN'])\nfor i in range(5):\n    print('line', i)\n    time.sleep(0.1)\nraise SystemExit(3)\n",
            "user_callback_urls": ["http://127.0.0.1:9/never"],
            "labels": ["copied"],
        }))
        .await
        .unwrap();
    ids.push(py.execution_id);
    if docker {
        let img = c
            .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", "echo from image; echo to stderr >&2"]}))
            .await
            .unwrap();
        ids.push(img.execution_id);
        let stack =
            format!("services:\n  a:\n    image: {IMAGE}\n    command: [echo, from compose]\n");
        let cmp = c
            .start_compose_json(&json!({"compose_file_code": stack}))
            .await
            .unwrap();
        ids.push(cmp.execution_id);
    }
    for id in &ids {
        s.wait_end(id).await;
    }
    // One run never started: deleted runs and pending ones are copied as they are.
    let aborted = c
        .start_python_json(&json!({"code": "print(1)", "timeout": 5}))
        .await
        .unwrap();
    let _ = c.abort(&aborted.execution_id).await;
    s.wait_end(&aborted.execution_id).await;
    ids.push(aborted.execution_id);
    let mut before = Vec::new();
    for id in &ids {
        before.push(seen(c, id).await);
    }
    assert_eq!(before[0]["record"]["return_code"], json!(3));
    assert!(
        before[0]["record"]["callbacks"]
            .as_array()
            .is_some_and(|d| d.len() == 1),
        "a delivery to copy: {}",
        before[0]["record"]
    );
    assert!(
        before[0]["record"]["stdout"]
            .as_str()
            .unwrap()
            .contains("token ***\nline 0\n"),
        "{}",
        before[0]["record"]
    );
    let dir = s.stop().await;
    let data = dir.path().join("data");

    let o = copy(&data, &url);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    for table in [
        "orgs",
        "api_keys",
        "runs",
        "run_output",
        "secrets",
        "callback_deliveries",
        "run_samples",
    ] {
        assert!(out.contains(table), "{table} in {out}");
    }
    assert!(!out.contains(" 0 rows\nrun_output"), "{out}");

    // A server on the copy (same data directory: same master key).
    let s = TestServer::start_in(dir, |c| c.store.url = Some(url.clone())).await;
    let c = &s.client;
    for (id, want) in ids.iter().zip(&before) {
        assert_eq!(&seen(c, id).await, want, "run {id} reads the same");
    }
    // The secret decrypts: a new run gets its value.
    let r = c
        .start_python_json(
            &json!({"code": "import os\nprint(os.environ['TOKEN'] == 'copy-secret-' + 'value')\n"}),
        )
        .await
        .unwrap();
    let rec = s.wait_end(&r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    assert_eq!(rec.stdout, "True\n");
    // New runs number after the copied ones.
    let history = c.history(100, 0).await.unwrap();
    assert_eq!(
        history.executions[0].execution_id, r.execution_id,
        "newest first"
    );
    assert_eq!(history.total_executions as usize, ids.len() + 1);

    // The target is no longer empty: refused, nothing changed.
    let o = copy(&s.data_dir(), &url);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(
        c.history(100, 0).await.unwrap().total_executions,
        history.total_executions
    );
}

/// A PostgreSQL cluster of the test's own (restarting the one the suite shares would
/// disturb every other test), through `scripts/postgres.sh`.
struct OwnCluster {
    dir: tempfile::TempDir,
}

impl OwnCluster {
    fn script(cmd: &str, dir: &std::path::Path) -> String {
        let o = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/postgres.sh"
        ))
        .arg(cmd)
        .arg(dir)
        .output()
        .unwrap();
        assert!(o.status.success(), "postgres.sh {cmd}: {o:?}");
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    /// A fresh cluster and its URL; `None` (saying so) without PostgreSQL's binaries.
    fn start() -> Option<(Self, String)> {
        let have = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| d.flatten().any(|e| e.path().join("bin/initdb").exists()))
            .unwrap_or(false);
        if !have {
            missing("PostgreSQL's server binaries (/usr/lib/postgresql/*/bin/initdb)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let url = Self::script("start", dir.path());
        Some((OwnCluster { dir }, url))
    }

    fn stop(&self) {
        Self::script("stop", self.dir.path());
    }

    fn resume(&self) {
        Self::script("resume", self.dir.path());
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PostgreSQL restarted while runs run: meanwhile the API answers 503 saying the
/// database is unavailable; then the server goes on (its pool reconnects), and every
/// run ends, none lost, with all of its output.
#[tokio::test]
async fn a_postgres_restart_mid_load_loses_no_run() {
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        return missing("bubblewrap (/usr/bin/bwrap)");
    }
    let Some((pg, url)) = OwnCluster::start() else {
        return;
    };
    let s = TestServer::start_with(|c| {
        c.store.url = Some(url.clone());
        c.worker.max_concurrent_runs = 4;
    })
    .await;
    let code = "import time\nfor i in range(1, 31):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n";
    let mut runs = Vec::new();
    for _ in 0..8 {
        runs.push(s.start_code(code).await);
    }
    wait_output(&s.client, &runs[0].1, "line 5\n").await;
    pg.stop();
    // The API says what is wrong, and that it passes.
    let mut said = None;
    for _ in 0..50 {
        let r = s
            .client
            .raw(
                reqwest::Method::GET,
                &format!("/api/v2/external/execution/{}", runs[0].0),
                None,
            )
            .await
            .unwrap();
        if r.status().as_u16() == 503 {
            said = Some(r.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = said.expect("a 503 while the database is down");
    assert!(said.contains("the database is unavailable"), "{said}");
    // Controls too (nothing can be recorded meanwhile).
    let r = s
        .client
        .raw(
            reqwest::Method::POST,
            &format!("/api/v2/external/workloads/abort/{}", runs[1].0),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503, "{:?}", r.text().await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.resume();
    let want: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    for (id, _) in &runs {
        let r = s.wait_end(id).await;
        assert_status(&r, RunStatus::Completed);
        assert_eq!(r.stdout, want, "run {id} kept all of its output");
    }
    let h = s.client.history(100, 0).await.unwrap();
    assert_eq!(h.total_executions, runs.len() as i64, "no run lost");
    // New runs go on.
    let (id, _) = s.start_code("print('after the restart')").await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
}
