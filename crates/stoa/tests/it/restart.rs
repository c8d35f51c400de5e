//! Restart safety: a server killed with a run active leaves no run `running` forever.

use std::process::Stdio;

use stoa_types::RunStatus;

use super::*;

fn spawn_server(dir: &std::path::Path, port: u16) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        .env("STOA_ADMIN_KEY", ADMIN_KEY)
        // Killed without a graceful stop: keep no spare networks that would be left behind.
        .env("STOA_DOCKER__NETWORK_POOL", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server binary starts")
}

async fn wait_up(c: &Client) {
    for _ in 0..200 {
        if c.machine_types().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not come up");
}

#[tokio::test]
async fn crash_with_an_active_run_ends_it_as_system_failure_keeping_output() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Client::new(&format!("http://127.0.0.1:{port}"), ADMIN_KEY);
    let mut server = spawn_server(dir.path(), port);
    wait_up(&c).await;
    let started = c
        .start_python(&stoa_types::PythonStartRequest {
            code: "import time\nprint('before the crash', flush=True)\ntime.sleep(120)\n".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = started.execution_id.clone();
    wait_output(&c, &started.streaming_url, "before the crash").await;
    assert_eq!(c.execution(&id).await.unwrap().status, RunStatus::Running);

    server.kill().unwrap(); // SIGKILL: no graceful shutdown
    server.wait().unwrap();

    let mut server = spawn_server(dir.path(), port);
    wait_up(&c).await;
    let r = c.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::SystemFailure);
    assert!(
        r.result
            .error
            .as_deref()
            .unwrap()
            .contains("server restarted"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("before the crash"),
        "output before the crash is kept: {}",
        r.stdout
    );
    assert!(
        run_processes(&id).is_empty(),
        "nothing of the run survives the restart"
    );
    let (_, events) = read_stream(&c, &started.streaming_url, None).await;
    assert!(finished(&events).job.result.error.is_some());
    // The restarted server runs new work.
    let s2 = c
        .start_python(&stoa_types::PythonStartRequest {
            code: "print('after')".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(wait_end(&c, &s2.execution_id).await.stdout, "after\n");
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test]
async fn graceful_shutdown_ends_active_runs() {
    let s = TestServer::start().await;
    let (id, url) = s
        .start_code("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
        .await;
    wait_output(&s.client, &url, "up").await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let _dir = s.stop().await;
    let run = store.get_run(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::SystemFailure);
    assert!(run.error.unwrap().contains("shut down"));
    assert!(run_processes(&id).is_empty());
}

#[tokio::test]
async fn a_selection_whose_children_were_lost_in_a_crash_ends() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Client::new(&format!("http://127.0.0.1:{port}"), ADMIN_KEY);
    let mut server = spawn_server(dir.path(), port);
    wait_up(&c).await;
    let started = c
        .start_selection(&serde_json::json!({"code": "import time\nprint('profiling', flush=True)\ntime.sleep(120)"}))
        .await
        .unwrap();
    let id = started["execution_id"].as_str().unwrap().to_string();
    let child = loop {
        let st = c.selection_status(&id).await.unwrap();
        let r = &st["profiling_results"][0];
        if r["status"] == "running" {
            break r["execution_id"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    server.kill().unwrap();
    server.wait().unwrap();
    let mut server = spawn_server(dir.path(), port);
    wait_up(&c).await;
    assert_eq!(
        c.execution(&child).await.unwrap().status,
        RunStatus::SystemFailure
    );
    let st = c.selection_status(&id).await.unwrap();
    assert_eq!(
        st["status"], "failed",
        "the parent does not stay running: {st}"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}
