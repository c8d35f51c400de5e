//! Secrets (encrypted, injected, masked), completion callbacks (outbox, signatures,
//! retries, SSRF guard) and run labels.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use stoa_types::RunStatus;

use super::*;

const SECRET: &str = "hello-secret-value";

async fn set_secret(s: &TestServer, name: &str, value: &str) {
    s.client
        .env_set(&[(name, value)])
        .await
        .expect("secret stored");
}

#[tokio::test]
async fn secrets_reach_python_runs_masked_everywhere_and_never_stored_in_clear() {
    let s = TestServer::start().await;
    set_secret(&s, "GREETING", SECRET).await;
    let (id, url) = s
        // The expected value is built at run time so that the code itself does not hold it.
        .start_code("import os\nprint('value:', os.environ['GREETING'])\nprint('same:', os.environ['GREETING'] == 'hello-' + 'secret-value')\n")
        .await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "value: ***\nsame: True\n", "masked in the stream");
    let r = s.wait_end(&id).await;
    assert_eq!(r.stdout, "value: ***\nsame: True\n", "masked in the record");
    let logs = s.client.logs(&id, 100, 24).await.unwrap();
    assert!(
        logs.logs.iter().all(|l| !l.message.contains(SECRET)),
        "masked in the logs"
    );
    // The API never returns a value.
    let list = s.client.env_list().await.unwrap();
    assert_eq!(list["environment_variables"][0]["name"], "GREETING");
    assert!(!list.to_string().contains(SECRET));
    // The database holds ciphertext only.
    let dir = s.stop().await;
    for bytes in store_bytes(dir.path()).await {
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the store has no plain value"
        );
    }
}

#[tokio::test]
async fn secrets_reach_image_runs_and_docker_run_env_wins() {
    if !super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    set_secret(&s, "GREETING", SECRET).await;
    set_secret(&s, "OTHER", "other-secret-value").await;
    let r = s
        .client
        .start_image_json(&json!({"docker_image_ref": "local/busybox:full",
            "docker_run_cmd": ["sh", "-c", "echo g=$GREETING; echo o=$OTHER"], "docker_run_env": "OTHER=from-run-env"}))
        .await
        .unwrap();
    let rec = s.wait_end(&r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    assert_eq!(rec.stdout, "g=***\no=from-run-env\n");
}

#[tokio::test]
async fn secret_names_are_validated() {
    let s = TestServer::start().await;
    for body in [
        json!({"environment_variables": [{"name": "1BAD", "value": "x"}]}),
        json!({"environment_variables": [{"name": "A", "value": "x"}, {"name": "A", "value": "y"}]}),
        json!({"environment_variables": [{"name": "A"}]}),
        // Found by schemathesis: a flag that is not a boolean was taken.
        json!({"environment_variables": [{"name": "A", "value": "x", "is_secret": "yes"}]}),
        json!({"name": "A", "value": "x", "is_secret": 1}),
    ] {
        let r = s
            .client
            .raw(
                reqwest::Method::POST,
                "/api/v2/external/environment-variables/",
                Some(body.to_string().into()),
            )
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 422, "{body}");
    }
    assert_eq!(
        s.client.env_list().await.unwrap()["environment_variables"],
        json!([]),
        "nothing was stored"
    );
    set_secret(&s, "A", "one").await;
    assert_eq!(s.client.env_rm("A").await.unwrap()["deleted"], 1);
    assert_eq!(s.client.env_rm("A").await.unwrap_err().status(), Some(404));
}

#[tokio::test]
async fn a_wrong_master_key_is_a_clear_error_at_start_and_rotation_keeps_secrets() {
    let s = TestServer::start().await;
    set_secret(&s, "GREETING", SECRET).await;
    let dir = s.stop().await;
    let other = "11".repeat(32);
    let (err, dir) =
        match TestServer::try_start_in(dir, |c| c.secrets.master_key = Some(other.clone())).await {
            Ok(_) => panic!("a wrong master key must stop the start"),
            Err(e) => e,
        };
    let msg = format!("{err:#}");
    assert!(msg.contains("master key"), "{msg}");

    let key_before = std::fs::read_to_string(dir.path().join("data/master.key")).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["secrets", "rotate-key", "--data-dir"])
        .arg(dir.path().join("data"))
        .envs(database_env(&dir.path().join("data")))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("re-encrypted 1 values"));
    let key_after = std::fs::read_to_string(dir.path().join("data/master.key")).unwrap();
    assert_ne!(key_before, key_after);
    assert_eq!(
        key_after.lines().count(),
        1,
        "the old key is dropped once everything is re-encrypted"
    );

    let s = TestServer::start_in(dir, |_| {}).await;
    let (id, _) = s
        .start_code("import os\nprint(os.environ['GREETING'] == 'hello-' + 'secret-value')")
        .await;
    assert_eq!(s.wait_end(&id).await.stdout, "True\n");
    // The old key no longer opens anything.
    let dir = s.stop().await;
    std::fs::write(dir.path().join("data/master.key"), key_before).unwrap();
    assert!(TestServer::try_start_in(dir, |_| {}).await.is_err());
}

#[tokio::test]
async fn official_lyceum_cli_env_commands() {
    let Some(lyceum) = super::cli::lyceum_bin() else {
        return missing("the official lyceum CLI (lyceum-cli 1.2.2; scripts/test installs it)");
    };
    let s = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let url = s.client.base().to_string();
    // Async: the server runs on this test's runtime.
    let run = |args: Vec<&str>| {
        let mut c = tokio::process::Command::new(&lyceum);
        c.args(args).env("HOME", home.path()).env("COLUMNS", "200");
        async move { c.output().await.unwrap() }
    };
    assert!(
        run(vec!["auth", "login", "--api-key", ADMIN_KEY, "--url", &url])
            .await
            .status
            .success()
    );
    let o = run(vec!["env", "set", "GREETING", "hi"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = run(vec![
        "python",
        "run",
        "import os; print('uses it:', os.environ['GREETING'] == 'hi')",
        "-m",
        "cpu",
    ])
    .await;
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("uses it: True"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = run(vec!["env", "list", "--json"]).await;
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("GREETING") && !out.contains("\"hi\""), "{out}");
    let o = run(vec!["env", "rm", "GREETING"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        s.client.env_list().await.unwrap()["environment_variables"],
        json!([])
    );
}

/// A callback receiver on loopback: records every request; each path answers with the
/// statuses queued for it (200 when none), or never answers for `/hang`.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(String, HeaderMap, String)>>>,
    plans: Arc<Mutex<std::collections::HashMap<String, Vec<u16>>>>,
}

async fn receive(
    AxState(r): AxState<Receiver>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    r.got.lock().unwrap().push((path.clone(), headers, body));
    if path == "hang" {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let code = r
        .plans
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(|p| (!p.is_empty()).then(|| p.remove(0)))
        .unwrap_or(200);
    StatusCode::from_u16(code).unwrap()
}

async fn start_receiver(addr: &str) -> (Receiver, SocketAddr) {
    let r = Receiver::default();
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(receive))
        .with_state(r.clone());
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (r, a)
}

impl Receiver {
    fn hits(&self, path: &str) -> Vec<(HeaderMap, String)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, h, b)| (h.clone(), b.clone()))
            .collect()
    }

    async fn wait_hits(&self, path: &str, n: usize) -> Vec<(HeaderMap, String)> {
        for _ in 0..200 {
            let h = self.hits(path);
            if h.len() >= n {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{path}: expected {n} requests, got {}",
            self.hits(path).len()
        );
    }
}

/// Verifies `Stoa-Signature` the way the README tells receivers to.
fn verify(secret: &str, headers: &HeaderMap, body: &str) -> bool {
    let sig = headers
        .get("stoa-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut t = "";
    let mut v1 = "";
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x,
            Some(("v1", x)) => v1 = x,
            _ => {}
        }
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let fresh = t
        .parse::<i64>()
        .is_ok_and(|ts| (chrono::Utc::now().timestamp() - ts).abs() < 300);
    fresh
        && mac
            .verify_slice(&hex::decode(v1).unwrap_or_default())
            .is_ok()
}

fn allow_loopback(c: &mut stoa_server::Config) {
    c.callbacks.allow_hosts = vec!["127.0.0.1".into()];
    c.callbacks.backoff_base_ms = 100;
}

async fn wait_callbacks_settled(s: &TestServer, id: &str) -> stoa_types::ExecutionRecord {
    for _ in 0..1200 {
        let r = s.client.execution(id).await.unwrap();
        if !r.callbacks.is_empty() && r.callbacks.iter().all(|c| c.state != "pending") {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("callbacks of {id} did not settle");
}

#[tokio::test]
async fn signed_callbacks_for_completed_failed_and_aborted_runs() {
    let (rx, addr) = start_receiver("127.0.0.1:0").await;
    let s = TestServer::start_with(allow_loopback).await;
    let secret = s.client.callback_secret(false).await.unwrap()["signing_secret"]
        .as_str()
        .unwrap()
        .to_string();
    let urls = |tag: &str| {
        json!([
            format!("http://{addr}/{tag}-a"),
            format!("http://{addr}/{tag}-b")
        ])
    };
    let (ok, _) = s
        .start_json(json!({"code": "print(1)", "user_callback_urls": urls("ok"), "run_name": "cb"}))
        .await;
    let (bad, _) = s
        .start_json(json!({"code": "raise SystemExit(3)", "user_callback_urls": urls("bad")}))
        .await;
    let (ab, ab_url) = s.start_json(json!({"code": "import time\nprint('up', flush=True)\ntime.sleep(60)", "user_callback_urls": urls("ab")})).await;
    wait_output(&s.client, &ab_url, "up").await;
    s.client.abort(&ab).await.unwrap();
    for (tag, id, status) in [
        ("ok", &ok, "completed"),
        ("bad", &bad, "failed"),
        ("ab", &ab, "aborted"),
    ] {
        for side in ["a", "b"] {
            let hits = rx.wait_hits(&format!("{tag}-{side}"), 1).await;
            assert_eq!(hits.len(), 1, "one POST per URL");
            let (headers, body) = &hits[0];
            assert!(verify(&secret, headers, body), "the signature verifies");
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["execution_id"], id.as_str());
            assert_eq!(v["status"], status);
        }
        let r = wait_callbacks_settled(&s, id).await;
        assert!(
            r.callbacks
                .iter()
                .all(|c| c.state == "delivered" && c.attempts == 1 && c.last_status == Some(200)),
            "{:?}",
            r.callbacks
        );
    }
    let v: Value = serde_json::from_str(&rx.hits("ok-a")[0].1).unwrap();
    assert_eq!(v["return_code"], 0);
    assert_eq!(v["run_name"], "cb");
    // A tampered body does not verify.
    let (h, b) = &rx.hits("bad-a")[0];
    assert!(!verify(&secret, h, &b.replace("failed", "completed")));
    // Rotating the secret changes what later deliveries are signed with.
    let new_secret = s.client.callback_secret(true).await.unwrap()["signing_secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_secret, secret);
}

#[tokio::test]
async fn failing_receivers_are_retried_then_given_up() {
    let (rx, addr) = start_receiver("127.0.0.1:0").await;
    rx.plans
        .lock()
        .unwrap()
        .insert("flaky".into(), vec![500, 500]);
    let s = TestServer::start_with(|c| {
        allow_loopback(c);
        c.callbacks.max_attempts = 3;
        c.callbacks.timeout_s = 1;
    })
    .await;
    let (id, _) = s
        .start_json(json!({"code": "print(1)", "user_callback_urls": [format!("http://{addr}/flaky"), format!("http://{addr}/hang")]}))
        .await;
    let r = wait_callbacks_settled(&s, &id).await;
    let flaky = r
        .callbacks
        .iter()
        .find(|c| c.url.ends_with("/flaky"))
        .unwrap();
    assert_eq!(
        (flaky.state.as_str(), flaky.attempts, flaky.last_status),
        ("delivered", 3, Some(200)),
        "{flaky:?}"
    );
    assert_eq!(rx.hits("flaky").len(), 3);
    let hang = r
        .callbacks
        .iter()
        .find(|c| c.url.ends_with("/hang"))
        .unwrap();
    assert_eq!(
        (hang.state.as_str(), hang.attempts),
        ("failed", 3),
        "{hang:?}"
    );
    assert!(
        hang.last_error
            .as_deref()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{hang:?}"
    );
}

#[tokio::test]
async fn a_pending_delivery_goes_out_after_a_restart() {
    // A port where nothing listens yet.
    let port = free_port();
    let s = TestServer::start_with(|c| {
        allow_loopback(c);
        c.callbacks.backoff_base_ms = 1500;
    })
    .await;
    let (id, _) = s.start_json(json!({"code": "print(1)", "user_callback_urls": [format!("http://127.0.0.1:{port}/later")]})).await;
    s.wait_end(&id).await;
    for _ in 0..100 {
        if s.client
            .execution(&id)
            .await
            .unwrap()
            .callbacks
            .first()
            .is_some_and(|c| c.attempts >= 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = s.client.execution(&id).await.unwrap().callbacks[0].clone();
    assert_eq!(
        (first.state.as_str(), first.attempts),
        ("pending", 1),
        "{first:?}"
    );
    let dir = s.stop().await;
    let (rx, _) = start_receiver(&format!("127.0.0.1:{port}")).await;
    let s = TestServer::start_in(dir, allow_loopback).await;
    rx.wait_hits("later", 1).await;
    let r = wait_callbacks_settled(&s, &id).await;
    assert_eq!(r.callbacks[0].state, "delivered");
    assert_eq!(r.callbacks[0].attempts, 2);
}

#[tokio::test]
async fn loopback_callbacks_are_refused_without_the_allow_list() {
    let (rx, addr) = start_receiver("127.0.0.1:0").await;
    let s = TestServer::start().await;
    let (id, _) = s
        .start_json(
            json!({"code": "print(1)", "user_callback_urls": [format!("http://{addr}/nope")]}),
        )
        .await;
    let r = wait_callbacks_settled(&s, &id).await;
    let c = &r.callbacks[0];
    assert_eq!(c.state, "failed");
    assert!(
        c.last_error.as_deref().unwrap().starts_with("refused"),
        "{c:?}"
    );
    assert!(
        rx.hits("nope").is_empty(),
        "no request reached the receiver"
    );
    // Bad URLs and too many URLs are 422s.
    for urls in [
        json!(["ftp://example.com/x"]),
        json!(
            (0..6)
                .map(|i| format!("https://example.com/{i}"))
                .collect::<Vec<_>>()
        ),
    ] {
        let r = s
            .client
            .raw(
                reqwest::Method::POST,
                "/api/v2/external/execution/streaming/start",
                Some(
                    json!({"code": "print(1)", "user_callback_urls": urls})
                        .to_string()
                        .into(),
                ),
            )
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 422);
    }
}

#[tokio::test]
async fn runs_are_filtered_by_label_and_name() {
    let s = TestServer::start().await;
    let (a, _) = s
        .start_json(
            json!({"code": "print(1)", "labels": ["nightly", "team-a"], "run_name": "train"}),
        )
        .await;
    let (b, _) = s.start_json(json!({"code": "print(2)", "labels": ["team-b"], "run_name": "eval", "metadata": {"k": "v"}})).await;
    s.wait_end(&a).await;
    s.wait_end(&b).await;
    let by_label = s
        .client
        .workloads_filtered(Some("completed"), Some("team-a"), None)
        .await
        .unwrap();
    assert_eq!(
        by_label
            .iter()
            .map(|r| r.execution_id.clone())
            .collect::<Vec<_>>(),
        vec![a.clone()]
    );
    let by_name = s
        .client
        .workloads_filtered(Some("completed"), None, Some("eval"))
        .await
        .unwrap();
    assert_eq!(
        by_name
            .iter()
            .map(|r| r.execution_id.clone())
            .collect::<Vec<_>>(),
        vec![b.clone()]
    );
    assert_eq!(by_name[0].metadata.get("k").map(String::as_str), Some("v"));
    let h: Value = s
        .client
        .raw(
            reqwest::Method::GET,
            "/api/v2/external/billing/history?label=nightly",
            None,
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["executions"].as_array().unwrap().len(), 1);
    assert_eq!(h["executions"][0]["labels"], json!(["nightly", "team-a"]));
}

/// Two servers on one PostgreSQL, both woken for every run that ends: each callback is
/// delivered once (a refused attempt retried once), never by both.
#[tokio::test]
async fn a_callback_is_delivered_once_with_two_servers() {
    let Some(url) = stoa_store::conformance::fresh_postgres_url().await else {
        return;
    };
    let key = "6b".repeat(32);
    let shared = |c: &mut stoa_server::Config| {
        allow_loopback(c);
        c.store.url = Some(url.clone());
        c.secrets.master_key = Some(key.clone());
    };
    let a = TestServer::start_with(shared).await;
    let b = TestServer::start_with(|c| {
        shared(c);
        c.worker.enabled = false;
    })
    .await;
    let (recv, addr) = start_receiver("127.0.0.1:0").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        // Every other receiver refuses the first attempt.
        if i % 2 == 1 {
            recv.plans
                .lock()
                .unwrap()
                .insert(format!("r{i}"), vec![500]);
        }
        let c = if i % 2 == 0 { &a.client } else { &b.client };
        let r = c
            .start_python_json(&serde_json::json!({
                "code": format!("print({i})"),
                "user_callback_urls": [format!("http://{addr}/r{i}")],
            }))
            .await
            .unwrap();
        ids.push(r.execution_id);
    }
    for id in &ids {
        let r = wait_callbacks_settled(&a, id).await;
        assert_eq!(r.callbacks[0].state, "delivered", "{:?}", r.callbacks);
    }
    // Both servers had their chance at every delivery by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..20 {
        let want = if i % 2 == 1 { 2 } else { 1 };
        assert_eq!(recv.hits(&format!("r{i}")).len(), want, "r{i}");
    }
}
