//! Attacks: api. Output, streams, pending reasons and URLs through the real API, as
//! another org: no reader grows the server's memory with a run's output size, output
//! streams are capped per run and per key, a pending reason does not reveal other
//! orgs' queue, and the `Host` header does not choose the URLs handed out.

use std::time::Duration;

use serde_json::{Value, json};
use stoa_client::Client;
use stoa_types::{ExecutionRecord, RunStatus};

use super::super::{TestServer, assert_status, read_stream, wait_end};
use super::{org_with_key, other_org};

/// One KiB lines a run prints: `MIB` MiB of output.
const MIB: usize = 15;

#[tokio::test]
async fn an_oversize_output_is_read_with_bounded_memory_per_reader() {
    let s = TestServer::start().await;
    let cap = stoa_server::Config::default()
        .limits
        .max_output_per_reply_bytes;
    let attacker = other_org(&s, "big-output").await;
    let code = format!(
        "import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range({}):\n    sys.stdout.write(line)\n",
        MIB * 1024
    );
    let id = attacker
        .start_python_json(&json!({"code": code}))
        .await
        .unwrap()
        .execution_id;
    let r = wait_end(&attacker, &id).await;
    assert_status(&r, RunStatus::Completed);
    assert!(!r.output_truncated, "the output fits the stored limit");

    // 40 readers at once: each reply holds at most the configured share of the output.
    let readers = (0..40).map(|_| {
        let c = attacker.clone();
        let path = format!("/api/v2/external/execution/{id}");
        async move {
            let resp = c.raw(reqwest::Method::GET, &path, None).await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp.bytes().await.unwrap()
        }
    });
    for body in futures::future::join_all(readers).await {
        assert!(
            body.len() <= cap + 16 * 1024,
            "a record reply is {} bytes for a {MIB} MiB output (cap {cap})",
            body.len()
        );
        let rec: ExecutionRecord = serde_json::from_slice(&body).unwrap();
        assert!(rec.record_output_truncated);
        assert_eq!(rec.stdout.len() + rec.stderr.len(), cap);
        assert!(rec.stdout.bytes().all(|b| b == b'x' || b == b'\n'));
    }

    // Stored logs: the newest lines, within the same bound.
    let resp = attacker
        .raw(
            reqwest::Method::GET,
            &format!("/api/v2/external/logs/execution/{id}?limit=10000&hours=1"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.bytes().await.unwrap();
    let logs: Value = serde_json::from_slice(&body).unwrap();
    let entries = logs["logs"].as_array().unwrap();
    let text: usize = entries
        .iter()
        .map(|e| e["message"].as_str().unwrap().len())
        .sum();
    assert!(text <= cap, "logs carry {text} bytes of output (cap {cap})");
    assert!(entries.len() < 10_000 && !entries.is_empty());
    assert_eq!(
        logs["total"],
        MIB * 1024,
        "the total still counts every line"
    );

    // The whole output is still there, read by pages through the stream.
    let url = attacker.stream_url(&id);
    let (all, _) = read_stream(&attacker, &url, None).await;
    assert_eq!(all.len(), MIB * 1024 * 1024);
}

/// Opens a stream; its HTTP status on refusal.
async fn open(c: &Client, id: &str) -> Result<impl Send + use<>, u16> {
    c.stream(&c.stream_url(id), None)
        .await
        .map_err(|e| e.status().unwrap_or(0))
}

#[tokio::test]
async fn output_streams_are_capped_per_run_and_per_key_and_freed_on_disconnect() {
    let s = TestServer::start_with(|c| {
        // Runs stay pending: their streams stay open.
        c.worker.enabled = false;
        c.limits.max_streams_per_run = 3;
        c.limits.max_streams_per_key = 5;
        c.limits.sse_keepalive_s = 1;
    })
    .await;
    let (attacker, key) = org_with_key(&s, "many-streams").await;
    let start = || async {
        attacker
            .start_python_json(&json!({"code": "print(1)"}))
            .await
            .unwrap()
            .execution_id
    };
    let (r1, r2, r3) = (start().await, start().await, start().await);

    // Per run: the fourth stream of r1 is refused.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open(&attacker, &r1).await.expect("under the cap"));
    }
    let e = attacker
        .stream(&attacker.stream_url(&r1), None)
        .await
        .err()
        .expect("over the per-run cap");
    assert_eq!(e.status(), Some(429));
    assert!(e.to_string().contains("limits.max_streams_per_run"), "{e}");

    // Closing one frees its slot once the server sees the disconnect.
    held.pop();
    let mut reopened = None;
    for _ in 0..100 {
        if let Ok(st) = open(&attacker, &r1).await {
            reopened = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held.push(reopened.expect("a slot is free again after a reader left"));

    // Per key: keyless streams count against the run's org; five in all.
    held.push(open(&attacker, &r2).await.unwrap());
    held.push(open(&attacker, &r2).await.unwrap());
    let e = attacker
        .stream(&attacker.stream_url(&r3), None)
        .await
        .err()
        .expect("over the per-key cap");
    assert_eq!(e.status(), Some(429));
    assert!(e.to_string().contains("limits.max_streams_per_key"), "{e}");

    // A stream opened with a key counts against that key.
    let with_key = reqwest::Client::new()
        .post(attacker.stream_url(&r3))
        .bearer_auth(&key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(with_key.status().as_u16(), 200);

    // Another org's streams are not affected by the attacker's.
    let own = s
        .client
        .start_python_json(&json!({"code": "print(1)"}))
        .await
        .unwrap()
        .execution_id;
    let _mine = open(&s.client, &own).await.expect("own org's cap");
    drop(held);
    drop(with_key);
}

#[tokio::test]
async fn streaming_url_does_not_echo_the_host_header() {
    let s = TestServer::start().await;
    let (_attacker, key) = org_with_key(&s, "host-spoofer").await;
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v2/external/execution/streaming/start",
            s.client.base()
        ))
        .bearer_auth(&key)
        .header("host", "evil.example")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "https")
        .json(&json!({"code": "print(1)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    let url = v["streaming_url"].as_str().unwrap();
    assert!(!url.contains("evil"), "{url}");
    assert_eq!(
        url,
        format!(
            "{}/api/v1/stream/{}",
            s.client.base(),
            v["execution_id"].as_str().unwrap()
        ),
        "the bound address when public_url is unset"
    );

    // With public_url set, that is the base.
    let s = TestServer::start_with(|c| c.public_url = Some("https://stoa.example/".into())).await;
    let r = s
        .client
        .start_python_json(&json!({"code": "print(1)"}))
        .await
        .unwrap();
    assert_eq!(
        r.streaming_url,
        format!("https://stoa.example/api/v1/stream/{}", r.execution_id)
    );
}

#[tokio::test]
async fn a_pending_reason_does_not_reveal_another_orgs_queue() {
    let s = TestServer::start_with(|c| c.profiles[0].slots = Some(1)).await;
    // The victim org fills the queue.
    let blocker = s
        .client
        .start_python_json(&json!({"code": "import time\ntime.sleep(30)"}))
        .await
        .unwrap()
        .execution_id;
    for _ in 0..300 {
        if s.client.execution(&blocker).await.unwrap().status == RunStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut victims = Vec::new();
    for _ in 0..6 {
        victims.push(
            s.client
                .start_python_json(&json!({"code": "print(1)", "priority": 100}))
                .await
                .unwrap()
                .execution_id,
        );
    }
    // The attacker's run waits behind them, and learns only its own place.
    let attacker = other_org(&s, "queue-prober").await;
    let mine = attacker
        .start_python_json(&json!({"code": "print(1)", "priority": 0}))
        .await
        .unwrap()
        .execution_id;
    let rec = attacker.execution(&mine).await.unwrap();
    assert_eq!(rec.status, RunStatus::Pending);
    let reason = rec.pending_reason.unwrap();
    assert_eq!(reason, "waiting for cpu: 1 of 1 in use, 1st in queue");
    let listed = attacker.workloads(None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pending_reason.as_deref(), Some(reason.as_str()));
    // The victim's own runs still see their places among their own runs.
    let last = s.client.execution(&victims[5]).await.unwrap();
    assert_eq!(
        last.pending_reason.as_deref(),
        Some("waiting for cpu: 1 of 1 in use, 6th in queue")
    );
    for id in victims.iter().chain([&blocker]) {
        s.client.abort(id).await.unwrap();
    }
    attacker.abort(&mine).await.unwrap();
}
