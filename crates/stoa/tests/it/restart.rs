//! Restart safety: a server killed with a run active leaves no run `running` forever.

use std::process::Stdio;

use stoa_types::RunStatus;

use super::*;

fn spawn_server(dir: &std::path::Path, port: u16, env: &[(String, String)]) -> std::process::Child {
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
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server binary starts")
}

/// The `stoa` binary serving a data directory on a fixed port, so that it can be
/// killed and started again where clients expect it.
pub(crate) struct BinaryServer {
    pub dir: tempfile::TempDir,
    port: u16,
    pub child: std::process::Child,
    pub client: Client,
    /// Settings (`STOA_…` variables) of every start.
    env: Vec<(String, String)>,
}

impl BinaryServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server with these `STOA_…` settings.
    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let client = Client::new(&format!("http://127.0.0.1:{port}"), ADMIN_KEY);
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if !env.iter().any(|(k, _)| k == "STOA_DATABASE_URL")
            && let Some(url) = postgres_for(dir.path()).await
        {
            env.push(("STOA_DATABASE_URL".into(), url));
        }
        let child = spawn_server(dir.path(), port, &env);
        wait_up(&client).await;
        BinaryServer {
            dir,
            port,
            child,
            client,
            env,
        }
    }

    /// SIGKILL: no graceful shutdown.
    pub fn crash(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the binary again on the same directory and port.
    pub async fn restart(&mut self) {
        self.child = spawn_server(self.dir.path(), self.port, &self.env);
        wait_up(&self.client).await;
    }

    /// This installation's id (the `stoa.instance` label of its containers).
    pub fn instance(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("instance-id"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn wait_up(c: &Client) {
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
    let mut server = BinaryServer::start().await;
    let c = server.client.clone();
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

    server.crash();
    server.restart().await;
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
    let mut server = BinaryServer::start().await;
    let c = server.client.clone();
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
    server.crash();
    server.restart().await;
    assert_eq!(
        c.execution(&child).await.unwrap().status,
        RunStatus::SystemFailure
    );
    let st = c.selection_status(&id).await.unwrap();
    assert_eq!(
        st["status"], "failed",
        "the parent does not stay running: {st}"
    );
}
