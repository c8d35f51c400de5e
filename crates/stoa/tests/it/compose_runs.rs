//! Compose runs on the real Docker engine (images built by `scripts/ci/`).

use std::process::Command;

use serde_json::{Value, json};
use stoa_types::RunStatus;

use super::docker_runs::engine_ready;
use super::*;

fn docker_out(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Containers, volumes and networks still labelled with the run (empty when none).
pub fn stack_leftovers(id: &str) -> String {
    let filter = format!("label=stoa.run={id}");
    [
        docker_out(&["ps", "-aq", "--filter", &filter]),
        docker_out(&["volume", "ls", "-q", "--filter", &filter]),
        docker_out(&["network", "ls", "-q", "--filter", &filter]),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join("\n")
}

async fn start_compose(s: &TestServer, yaml: &str, extra: Value) -> (String, String) {
    let mut body = json!({"compose_file_code": yaml, "execution_type": "cpu", "timeout": 120});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let r = s
        .client
        .start_compose_json(&body)
        .await
        .expect("compose run accepted");
    (r.execution_id, r.streaming_url)
}

const STACK: &str = r#"
services:
  client:
    image: local/busybox:full
    command: ["sh", "-c", "echo got: $$(wget -qO- http://server:8080/) && cat /data/seed && echo ${GREETING:-hello from the default}"]
    depends_on:
      server: {condition: service_healthy}
      setup: {condition: service_completed_successfully}
    volumes: [shared:/data]
  server:
    image: local/busybox:full
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-server > /www/index.html && echo serving && exec httpd -f -p 8080 -h /www"]
    init: true
    expose: [8080]
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/"]
      interval: 200ms
      retries: 50
  setup:
    image: local/busybox:full
    command: sh -c "sleep 0.5; echo seeded > /data/seed; echo setup done"
    volumes: [shared:/data]
volumes:
  shared:
"#;

#[tokio::test]
async fn client_waits_for_a_healthy_server_and_an_init_service() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let (id, url) = start_compose(&s, STACK, json!({"file_name": "compose.yml"})).await;
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert!(text.contains("server | serving\n"), "{text}");
    assert!(
        text.contains(
            "[stoa] client waits for server to be healthy and setup to complete successfully\n"
        ),
        "why the client waits is said: {text}"
    );
    assert!(text.contains("setup | setup done\n"), "{text}");
    assert!(
        text.contains("client | got: hello-from-server\n"),
        "the client reached the server by name: {text}"
    );
    assert!(
        text.contains("client | seeded\n"),
        "the named volume is shared: {text}"
    );
    assert!(
        text.contains("client | hello from the default\n"),
        "interpolation default: {text}"
    );
    // Start order: the client's line comes after the setup finished.
    assert!(text.find("setup | setup done").unwrap() < text.find("client | got:").unwrap());
    assert_eq!(finished(&events).job.result.return_code, Some(0));
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.job_type, "compose");
    let logs = s.client.logs(&id, 100, 1).await.unwrap();
    let client_line = logs
        .logs
        .iter()
        .find(|l| l.message.starts_with("client | got:"))
        .expect("the client's line is in the logs");
    assert_eq!(
        client_line.labels.get("service").map(String::as_str),
        Some("client")
    );
    assert_eq!(stack_leftovers(&id), "", "nothing of the stack is left");
}

/// All the services printed is kept, to their last lines, however fast they printed
/// just before the stack ended: the containers are removed only once their output was
/// read.
#[tokio::test]
async fn a_stacks_output_is_kept_to_the_last_line() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let yaml = r#"
services:
  burst:
    image: local/busybox:full
    command: sh -c "seq 1 30000; echo last line"
  other:
    image: local/busybox:full
    command: ["sh", "-c", "trap 'exit 0' TERM; seq 1 10000 >&2; while true; do sleep 0.1; done"]
"#;
    let (id, _) = start_compose(&s, yaml, json!({})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    // A service's lines, without their `service | ` prefix.
    let of = |text: &str, service: &str| -> String {
        let prefix = format!("{service} | ");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert_counted(&of(&r.stdout, "burst"), 30000, Some("last line"), "burst");
    assert_counted(&of(&r.stderr, "other"), 10000, None, "other");
    assert_eq!(stack_leftovers(&id), "", "nothing of the stack is left");
}

#[tokio::test]
async fn exit_codes_come_from_the_ending_service_or_exit_code_from() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let failing = r#"
services:
  worker:
    image: local/busybox:full
    command: sh -c "echo failing; sleep 0.3; exit 3"
  idle:
    image: local/busybox:full
    command: sleep 60
    init: true
"#;
    let (id, _) = start_compose(&s, failing, json!({})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.return_code, Some(3), "the failing service's code");
    assert!(r.stdout.contains("worker | failing\n"), "{}", r.stdout);

    // The app ends the stack; the code is the tester's, which stops on its own
    // stop signal (SIGUSR1) and exits 9.
    let code_from = r#"
x-stoa:
  exit-code-from: tester
services:
  app:
    image: local/busybox:full
    command: sh -c "sleep 4; echo app done"
  tester:
    image: local/busybox:full
    stop_signal: SIGUSR1
    stop_grace_period: 5s
    command: ["sh", "-c", "trap 'echo tester stopping; exit 9' USR1; echo tester up; while true; do sleep 0.1; done"]
"#;
    let (id, _) = start_compose(&s, code_from, json!({})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.return_code, Some(9), "{}", r.stdout);
    assert!(r.stdout.contains("app | app done\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains("tester | tester stopping\n"),
        "{}",
        r.stdout
    );
    assert_eq!(stack_leftovers(&id), "");
}

#[tokio::test]
async fn failed_dependencies_fail_the_run_clearly() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let unhealthy = r#"
services:
  db:
    image: local/busybox:full
    command: sleep 60
    init: true
    healthcheck: {test: ["CMD", "false"], interval: 100ms, retries: 2}
  app:
    image: local/busybox:full
    command: echo never
    depends_on: {db: {condition: service_healthy}}
"#;
    let (id, _) = start_compose(&s, unhealthy, json!({})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    let err = r.result.error.clone().unwrap_or_default();
    assert!(
        err.contains("service db did not become healthy") && err.contains("app waits"),
        "{err}"
    );
    assert!(!r.stdout.contains("never"), "app never started");
    assert_eq!(stack_leftovers(&id), "");

    let init_fails = r#"
services:
  migrate:
    image: local/busybox:full
    command: sh -c "echo migration failed; exit 4"
  app:
    image: local/busybox:full
    command: echo never
    depends_on: {migrate: {condition: service_completed_successfully}}
"#;
    let (id, _) = start_compose(&s, init_fails, json!({})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.return_code, Some(4));
    let err = r.result.error.clone().unwrap_or_default();
    assert!(
        err.contains("service migrate exited with code 4") && err.contains("app"),
        "{err}"
    );
    assert!(r.stdout.contains("migrate | migration failed\n"));
    assert!(!r.stdout.contains("never"));
    assert_eq!(stack_leftovers(&id), "");
}

#[tokio::test]
async fn abort_and_timeout_tear_the_whole_stack_down() {
    if !engine_ready() {
        return;
    }
    // Without a network switch the stack gets its own internal network, labelled
    // with the run like its containers and volumes.
    let s = TestServer::start_with(|c| c.docker.network = false).await;
    let stack = r#"
services:
  a:
    image: local/busybox:full
    command: sh -c "echo a up; sleep 60"
    volumes: [data:/data]
  b:
    image: local/busybox:full
    command: sh -c "ping -c 1 -W 1 a >/dev/null && echo b sees a; sleep 60"
    depends_on: [a]
volumes:
  data:
"#;
    let (id, url) = start_compose(&s, stack, json!({})).await;
    wait_output(&s.client, &url, "b sees a").await;
    let during = stack_leftovers(&id);
    assert_eq!(
        during.lines().count(),
        4,
        "two containers, a volume and a network: {during}"
    );
    let reply = s.client.abort(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    assert_eq!(stack_leftovers(&id), "", "abort leaves nothing");

    // Stop: every service gets its stop signal; the run ends cancelled.
    let trapped = r#"
services:
  a:
    image: local/busybox:full
    command: ["sh", "-c", "trap 'echo a saving; exit 0' TERM; echo a up; while true; do sleep 0.1; done"]
  b:
    image: local/busybox:full
    command: ["sh", "-c", "trap 'echo b saving; exit 0' TERM; echo b up; while true; do sleep 0.1; done"]
"#;
    let (id, url) = start_compose(&s, trapped, json!({"graceful_timeout": 5})).await;
    wait_output(&s.client, &url, "b up").await;
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    let r = s.client.execution(&id).await.unwrap();
    assert!(
        r.stdout.contains("a | a saving") && r.stdout.contains("b | b saving"),
        "{}",
        r.stdout
    );
    assert_eq!(r.return_code, Some(0), "both handlers exited 0");
    assert_eq!(stack_leftovers(&id), "", "a stop leaves nothing");

    let (id, _) = start_compose(&s, stack, json!({"timeout": 2})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.result.error.as_deref(), Some("timeout after 2 s"));
    assert_eq!(stack_leftovers(&id), "", "a timeout leaves nothing");
}

#[tokio::test]
async fn bad_compose_files_are_422_and_change_nothing() {
    let s = TestServer::start().await;
    let cases = [
        (
            "services:\n  web:\n    image: nginx\n    build: .\n    ports: [\"80:80\"]\n    privileged: true\n    volumes: [\"/etc:/host\"]\n  db:\n    image: x\n    network_mode: host\n",
            vec![
                "services.web.build",
                "services.web.privileged",
                "services.db.network_mode",
            ],
        ),
        ("services: [unclosed", vec!["invalid YAML"]),
        // Found by the fuzzer: this panicked the handler.
        (
            "services:\n  a:\n    image: \"x${V\u{20ac}}\"\n",
            vec!["services.a.image"],
        ),
        (
            "services:\n  a:\n    image: x\n    depends_on: [ghost]\n",
            vec!["\"ghost\" is not a service of this file"],
        ),
        (
            "services:\n  a:\n    image: ${IMAGE:?set IMAGE to the image to run}\n",
            vec!["required variable IMAGE is missing a value: set IMAGE to the image to run"],
        ),
    ];
    for (yaml, wants) in cases {
        let err = s
            .client
            .start_compose_json(&json!({"compose_file_code": yaml}))
            .await
            .expect_err("rejected");
        assert_eq!(err.status(), Some(422), "{err}");
        let text = err.to_string();
        for w in wants {
            assert!(text.contains(w), "{w:?} missing from {text}");
        }
    }
    let err = s
        .client
        .start_compose_json(&json!({"timeout": 5}))
        .await
        .expect_err("rejected");
    assert!(err.to_string().contains("compose_file_code"), "{err}");
    assert!(
        s.client
            .workloads(Some("pending,running,completed,failed"))
            .await
            .unwrap()
            .is_empty()
    );
    // With the variable set for the org, the same file is accepted.
    s.client
        .env_set(&[("IMAGE", "local/busybox:full")])
        .await
        .unwrap();
    s.client
        .start_compose_json(&json!({"compose_file_code": "services:\n  a:\n    image: ${IMAGE:?set IMAGE}\n    command: [\"true\"]\n"}))
        .await
        .expect("accepted once IMAGE is set");
}

#[tokio::test]
async fn a_server_shutdown_tears_the_stack_down() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let stack = r#"
services:
  a:
    image: local/busybox:full
    command: sh -c "echo a up; sleep 60"
  b:
    image: local/busybox:full
    command: sh -c "echo b up; sleep 60"
"#;
    let (id, url) = start_compose(&s, stack, json!({})).await;
    wait_output(&s.client, &url, "b up").await;
    let dir = s.stop().await;
    assert_eq!(stack_leftovers(&id), "", "shutdown leaves nothing");
    let s = TestServer::start_in(dir, |_| {}).await;
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::SystemFailure);
    assert!(
        r.stdout.contains("a | a up\n"),
        "output is kept: {}",
        r.stdout
    );
}
