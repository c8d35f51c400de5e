//! Workers on other machines: `stoa worker` processes registered with a server over
//! the worker protocol (HTTP), executing its runs. Each worker here is the real binary
//! with its own data directory, talking to the server only over HTTP.

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stoa_store::Store;
use stoa_types::{RunId, RunStatus};

use super::restart::BinaryServer;
use super::*;

/// A `stoa worker` process.
struct RemoteWorker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl RemoteWorker {
    /// Starts a worker named `name` against `server`, taking `slots` cpu runs at once.
    fn start(server: &str, token: &str, name: &str, slots: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\nmax_concurrent_runs = {slots}\n\
                 [docker]\nnetwork_pool = 0\nnetwork_idle_s = 0\n\
                 [limits]\nshutdown_grace_s = 1\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
            .args([
                "worker", "--server", server, "--token", token, "--name", name,
            ])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the worker binary starts");
        RemoteWorker { child, _dir: dir }
    }

    /// SIGKILL: nothing of the worker runs on.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A join token made with `stoa workers token create` on the server's data directory.
fn join_token(data_dir: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "token", "create", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Waits until these workers registered with the server of `data_dir`.
async fn registered(store: &dyn Store, names: &[&str]) {
    for _ in 0..300 {
        let have = store.list_workers().await.unwrap();
        if names.iter().all(|n| have.iter().any(|w| w.name == *n)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("workers {names:?} did not register");
}

/// A server that executes nothing itself, with short leases and claims.
async fn control_plane() -> TestServer {
    TestServer::start_with(|c| {
        c.worker.enabled = false;
        c.worker.lease_s = 3;
        c.worker.claim_wait_s = 2;
    })
    .await
}

async fn worker_of(store: &Arc<dyn Store>, id: &str) -> Option<String> {
    let id: RunId = id.parse().unwrap();
    store.get_run(id).await.unwrap().unwrap().worker_id
}

const TICKER: &str = "import time\nfor i in range(1, 301):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)\n";

#[tokio::test]
async fn a_remote_worker_executes_python_and_image_runs_with_secrets_masked() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let _w = RemoteWorker::start(s.client.base(), &token, "w1", 2);
    registered(&*store, &["w1"]).await;
    s.client
        .env_set(&[("FLEET_SECRET", "s3cr3t-value-of-the-org")])
        .await
        .unwrap();
    let (id, url) = s
        .start_code("import os\nprint('hello from w1')\nprint(os.environ['FLEET_SECRET'])\n")
        .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "hello from w1\n***\n");
    assert_eq!(worker_of(&store, &id).await.as_deref(), Some("w1"));
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "hello from w1\n***\n");
    if super::docker_runs::engine_ready() {
        let started = s
            .client
            .start_image_json(&json!({"docker_image_ref": "local/busybox:full",
                "docker_run_cmd": ["sh", "-c", "echo from a container; exit 3"]}))
            .await
            .unwrap();
        let r = s.wait_end(&started.execution_id).await;
        assert_status(&r, RunStatus::Failed);
        assert_eq!(r.return_code, Some(3));
        assert_eq!(r.stdout, "from a container\n");
        assert_eq!(
            worker_of(&store, &started.execution_id).await.as_deref(),
            Some("w1")
        );
    }
    // The fleet as `stoa workers list` shows it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "list", "--json", "--data-dir"])
        .arg(s.data_dir())
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "w1");
    assert_eq!(list[0]["profiles"][0]["name"], "cpu");
    assert_eq!(list[0]["draining"], false);
}

#[tokio::test]
async fn a_killed_worker_loses_its_run_and_the_other_worker_goes_on() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let base = s.client.base().to_string();
    let mut w1 = RemoteWorker::start(&base, &token, "w1", 1);
    let _w2 = RemoteWorker::start(&base, &token, "w2", 1);
    registered(&*store, &["w1", "w2"]).await;
    let (a, a_url) = s.start_code(TICKER).await;
    let (b, b_url) = s.start_code(TICKER).await;
    wait_output(&s.client, &a_url, "tick 3\n").await;
    wait_output(&s.client, &b_url, "tick 3\n").await;
    // One slot each: the two runs spread over both workers.
    let (wa, wb) = (worker_of(&store, &a).await, worker_of(&store, &b).await);
    let mut on = [wa.clone().unwrap(), wb.clone().unwrap()];
    on.sort();
    assert_eq!(on, ["w1", "w2"], "{wa:?} {wb:?}");
    let (lost, lost_url, kept) = if wa.as_deref() == Some("w1") {
        (a, a_url, b)
    } else {
        (b, b_url, a)
    };
    w1.kill();
    let r = s.wait_end(&lost).await;
    assert_status(&r, RunStatus::SystemFailure);
    let error = r.result.error.clone().unwrap();
    assert!(error.starts_with("worker lost: w1, last heard "), "{error}");
    let (text, _) = read_stream(&s.client, &lost_url, None).await;
    assert!(text.starts_with("tick 1\ntick 2\ntick 3\n"), "{text}");
    // The sandbox went down with its worker.
    let mut left = run_processes(&lost);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = run_processes(&lost);
    }
    assert!(left.is_empty(), "{left:?}");
    // The other worker's run went on; abort reaches it through its heartbeat.
    assert_eq!(
        s.client.execution(&kept).await.unwrap().status,
        RunStatus::Running
    );
    let reply = s.client.abort(&kept).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    assert!(
        run_processes(&kept).is_empty(),
        "abort answers once the worker confirmed the run is gone"
    );
}

#[tokio::test]
async fn stop_and_drain_of_a_remote_worker() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let _w = RemoteWorker::start(s.client.base(), &token, "w1", 2);
    registered(&*store, &["w1"]).await;
    let code = "import signal, sys, time\n\
                def bye(*_):\n    print('got SIGTERM', flush=True)\n    sys.exit(0)\n\
                signal.signal(signal.SIGTERM, bye)\n\
                print('ready', flush=True)\ntime.sleep(120)\n";
    let (id, url) = s.start_code(code).await;
    wait_output(&s.client, &url, "ready").await;
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    let r = s.client.execution(&id).await.unwrap();
    assert!(r.stdout.contains("got SIGTERM"), "{}", r.stdout);
    assert!(run_processes(&id).is_empty());
    // Drained, the worker takes no new run; the run waits and says why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "drain", "w1", "--data-dir"])
        .arg(s.data_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The server follows the mark at the worker's next call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (waiting, _) = s.start_code("print('after the drain')").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = s.client.execution(&waiting).await.unwrap();
    assert_status(&r, RunStatus::Pending);
    assert_eq!(
        r.pending_reason.as_deref(),
        Some("no worker offers cpu: the one that does is draining"),
        "{r:?}"
    );
    std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "drain", "w1", "--undo", "--data-dir"])
        .arg(s.data_dir())
        .output()
        .unwrap();
    let r = s.wait_end(&waiting).await;
    assert_status(&r, RunStatus::Completed);
}

#[tokio::test]
async fn a_server_killed_mid_run_loses_no_line_of_a_remote_run() {
    let mut server = BinaryServer::start_with(&[
        ("STOA_WORKER__ENABLED", "false"),
        ("STOA_WORKER__LEASE_S", "6"),
        ("STOA_WORKER__CLAIM_WAIT_S", "2"),
    ])
    .await;
    let c = server.client.clone();
    let token = join_token(server.dir.path());
    let _w = RemoteWorker::start(c.base(), &token, "w1", 2);
    // 100 lines over 10 s.
    let code = "import time\nfor i in range(1, 101):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n";
    let started = c
        .start_python(&stoa_types::PythonStartRequest {
            code: code.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = started.execution_id.clone();
    wait_output(&c, &started.streaming_url, "line 20\n").await;
    server.crash();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().await;
    let r = wait_end(&c, &id).await;
    assert_status(&r, RunStatus::Completed);
    let want: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    assert_eq!(r.stdout, want, "every line once, in order");
    let (text, _) = read_stream(&c, &started.streaming_url, None).await;
    assert_eq!(text, want, "a late reader replays all of them");
}
