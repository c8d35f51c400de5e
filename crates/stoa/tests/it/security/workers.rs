//! The worker protocol, attacked: an org's API key reaches none of it (no claim, so no
//! other org's run or secrets); a worker's token reaches nothing of the runs API; a
//! worker writes nothing to a run it does not hold; an expired join token registers
//! nothing; malformed numbers are refused, not panicked on.

use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use serde_json::json;
use stoa_types::RunStatus;

use super::super::*;
use super::{org_with_key, other_org};

/// A fresh join token's client.
async fn joiner(s: &TestServer) -> stoa_client::Client {
    let store = s.handle.as_ref().unwrap().store.clone();
    let join = format!("sjt_{}", &stoa_server::auth::generate_key()[3..]);
    let id = stoa_server::auth::hash_key(&join)[..16].to_string();
    store
        .insert_join_token(&id, &stoa_server::auth::hash_key(&join), None)
        .await
        .unwrap();
    stoa_client::Client::new(s.client.base(), &join)
}

fn offer(name: &str) -> serde_json::Value {
    json!({"name": name, "version": "0", "protocol": "v1",
        "profiles": [{"name": "cpu", "slots": 2}]})
}

/// A registered worker's client (its token as the bearer).
async fn worker_client(s: &TestServer, name: &str) -> stoa_client::Client {
    let anon = joiner(s).await;
    let r = anon
        .raw(
            Method::POST,
            "/api/worker/v1/register",
            Some(json_body(&offer(name))),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.json::<serde_json::Value>().await.unwrap()["worker_token"]
        .as_str()
        .unwrap()
        .to_string();
    stoa_client::Client::new(s.client.base(), &token)
}

fn json_body(v: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap())
}

async fn status(
    c: &stoa_client::Client,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> u16 {
    c.raw(method, path, Some(json_body(&body)))
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn an_org_key_reaches_nothing_of_the_worker_protocol() {
    let s = TestServer::start_with(|c| {
        c.worker.enabled = false;
        c.worker.claim_wait_s = 1;
    })
    .await;
    let victim = other_org(&s, "victim").await;
    victim
        .env_set(&[("VICTIM_SECRET", "the-victims-secret-value")])
        .await
        .unwrap();
    let (id, _) = {
        let r = victim
            .start_python_json(&json!({"code": "print(1)"}))
            .await
            .unwrap();
        (r.execution_id, r.streaming_url)
    };
    let (attacker, _) = org_with_key(&s, "attacker").await;
    let admin = s.client.clone();
    for c in [&attacker, &admin] {
        for path in [
            "/api/worker/v1/register",
            "/api/worker/v1/claim",
            "/api/worker/v1/heartbeat",
            "/api/worker/v1/samples",
        ] {
            assert_eq!(
                status(c, Method::POST, path, json!({})).await,
                401,
                "{path} with an API key"
            );
        }
        for path in ["output", "progress", "finish"] {
            let p = format!("/api/worker/v1/runs/{id}/{path}");
            assert_eq!(status(c, Method::POST, &p, json!({})).await, 401, "{p}");
        }
    }
    // The run was claimed by no one: still pending, its secret never handed out.
    assert_eq!(
        victim.execution(&id).await.unwrap().status,
        RunStatus::Pending
    );
}

#[tokio::test]
async fn a_worker_writes_nothing_to_runs_it_does_not_hold_and_reaches_no_run_api() {
    let s = TestServer::start_with(|c| {
        c.worker.enabled = false;
        c.worker.claim_wait_s = 1;
    })
    .await;
    let holder = worker_client(&s, "holder").await;
    let intruder = worker_client(&s, "intruder").await;
    let (id, url) = s.start_code("print('never here')").await;
    // The holder claims it (and with it the lease token).
    let r = holder
        .raw(Method::POST, "/api/worker/v1/claim", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let claimed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(claimed["run_id"], id.as_str());
    let token = claimed["lease_token"].as_str().unwrap().to_string();

    // Another worker, guessing or replaying without the token, changes nothing.
    let out = format!("/api/worker/v1/runs/{id}/output");
    let forged = json!({"lease_token": "guessed", "first": 1,
        "pieces": [{"stream": "stdout", "content": "forged\n"}]});
    assert_eq!(status(&intruder, Method::POST, &out, forged).await, 410);
    for (path, body) in [
        (
            "finish",
            json!({"lease_token": "guessed", "status": "completed", "return_code": 0, "error": null}),
        ),
        (
            "progress",
            json!({"lease_token": "guessed", "kind": "running"}),
        ),
        (
            "progress",
            json!({"lease_token": "guessed", "kind": "reason", "text": "forged reason"}),
        ),
        (
            "progress",
            json!({"lease_token": "guessed", "kind": "phase", "text": "forged"}),
        ),
    ] {
        let p = format!("/api/worker/v1/runs/{id}/{path}");
        let r = intruder
            .raw(Method::POST, &p, Some(json_body(&body)))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{p}");
        let held: serde_json::Value = r.json().await.unwrap();
        assert_eq!(held["held"], false, "{p} {body}");
    }
    // A heartbeat naming the run under a wrong token is told it is lost.
    let beat = intruder
        .raw(
            Method::POST,
            "/api/worker/v1/heartbeat",
            Some(json_body(
                &json!({"runs": [{"run_id": id, "lease_token": token}]}),
            )),
        )
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(
        beat["runs"][0]["directive"], "lost",
        "another worker's lease: {beat}"
    );
    let rec = s.client.execution(&id).await.unwrap();
    assert_eq!(rec.status, RunStatus::Starting);
    assert_eq!(rec.stdout, "");
    assert!(
        !rec.phases.iter().any(|p| p.phase == "forged"),
        "{:?}",
        rec.phases
    );
    assert_ne!(rec.pending_reason.as_deref(), Some("forged reason"));

    // Numbers out of range are refused, not panicked on.
    for first in [i64::MIN, -1, 0, i64::MAX] {
        let body = json!({"lease_token": token, "first": first,
            "pieces": [{"stream": "stdout", "content": "x\n"}]});
        let code = status(&holder, Method::POST, &out, body).await;
        assert!(code == 409 || code == 422, "first = {first}: {code}");
    }
    assert!(s.client.execution(&id).await.unwrap().stdout.is_empty());

    // A worker token opens nothing of the runs API.
    for path in [
        "/api/v2/external/workloads/list".to_string(),
        format!("/api/v2/external/execution/{id}"),
        "/api/v2/external/environment-variables/".to_string(),
    ] {
        assert_eq!(
            holder.raw(Method::GET, &path, None).await.unwrap().status(),
            401,
            "{path}"
        );
    }
    // Another machine with a join token cannot take the holder's name (and with it
    // the holder's runs) while the holder is heard.
    let thief = joiner(&s).await;
    let r = thief
        .raw(
            Method::POST,
            "/api/worker/v1/register",
            Some(json_body(&offer("holder"))),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let detail: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        detail["detail"][0]["loc"],
        json!(["body", "name"]),
        "{detail}"
    );
    // Nor end another worker's run, nor make it look running.
    let finish =
        json!({"lease_token": token, "status": "running", "return_code": null, "error": null});
    let p = format!("/api/worker/v1/runs/{id}/finish");
    assert_eq!(status(&holder, Method::POST, &p, finish).await, 422);
    // The holder, with its token, is heard.
    let body = json!({"lease_token": token, "first": 1,
        "pieces": [{"stream": "stdout", "content": "from the holder\n"}]});
    assert_eq!(status(&holder, Method::POST, &out, body).await, 200);
    let _ = url;
}

#[tokio::test]
async fn an_expired_or_unknown_join_token_registers_nothing() {
    let s = TestServer::start_with(|c| c.worker.enabled = false).await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let expired = "sjt_expiredexpiredexpiredexpiredexpired0001";
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    store
        .insert_join_token("old", &stoa_server::auth::hash_key(expired), Some(past))
        .await
        .unwrap();
    let body = json!({"name": "sneaky", "version": "0", "protocol": "v1",
        "profiles": [{"name": "cpu", "slots": 64}]});
    for token in [expired, "sjt_neverissuedneverissuedneverissued0001"] {
        let c = stoa_client::Client::new(s.client.base(), token);
        assert_eq!(
            status(&c, Method::POST, "/api/worker/v1/register", body.clone()).await,
            401
        );
    }
    assert!(store.list_workers().await.unwrap().is_empty());
    // Nothing claims: a run stays pending and says no worker is there.
    let (id, _) = s.start_code("print(1)").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.client.execution(&id).await.unwrap();
    assert_eq!(r.status, RunStatus::Pending);
}
