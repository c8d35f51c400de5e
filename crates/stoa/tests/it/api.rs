//! The runs API: records, lists, logs, delete, org isolation, validation and the
//! OpenAPI document.

use reqwest::Method;
use serde_json::{Value, json};
use stoa_client::Client;
use stoa_types::RunStatus;

use super::*;

async fn post_raw(s: &TestServer, body: &str) -> (u16, Value) {
    let r = s
        .client
        .raw(
            Method::POST,
            "/api/v2/external/execution/streaming/start",
            Some(body.to_string().into()),
        )
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn bad_start_requests_are_422_and_change_nothing() {
    let s = TestServer::start().await;
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            r#"{"code": "print(1)", "timeout": 0}"#,
            vec!["body.timeout"],
        ),
        (
            r#"{"code": "print(1)", "timeout": 601}"#,
            vec!["body.timeout"],
        ),
        (r#"{"timeout": 5}"#, vec!["body.code"]),
        (
            r#"{"code": "print(1)", "import_files": "{\"../evil.py\": \"x\"}"}"#,
            vec!["body.import_files.../evil.py"],
        ),
        (
            r#"{"code": "print(1)", "import_files": "{\"/etc/evil.py\": \"x\"}"}"#,
            vec!["body.import_files./etc/evil.py"],
        ),
        (
            r#"{"code": "print(1)", "execution_type": "gpu.h100"}"#,
            vec!["body.execution_type"],
        ),
        (r#"{"code": "print(1)", "#, vec!["body"]),
        (r#"[1, 2]"#, vec!["body"]),
    ];
    for (body, want) in cases {
        let (status, v) = post_raw(&s, body).await;
        assert_eq!(status, 422, "{body}: {v}");
        assert_eq!(locs(&v), want, "{body}: {v}");
        assert!(v["detail"][0]["msg"].as_str().unwrap().len() > 3);
    }
    let (_, v) = post_raw(&s, r#"{"code": "print(1)", "timeout": 601}"#).await;
    assert_eq!(v["detail"][0]["type"], "less_than_equal");
    let (_, v) = post_raw(&s, r#"{"code": "x", "execution_type": "gpu.h100"}"#).await;
    assert!(
        v["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("available: cpu")
    );
    let h = s.client.history(50, 0).await.unwrap();
    assert_eq!(h.total_executions, 0, "no bad request created a run");
}

#[tokio::test]
async fn unknown_fields_are_ignored_and_labels_kept() {
    let s = TestServer::start().await;
    let (id, _) = s
        .start_json(
            json!({"code": "print(1)", "nbcode": 0, "kernel_state": null, "future_field": {"x": 1},
            "run_name": "nightly", "labels": ["a", "b"], "metadata": {"team": "ml"}}),
        )
        .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.run_name.as_deref(), Some("nightly"));
    assert_eq!(r.labels, vec!["a", "b"]);
    assert_eq!(r.metadata.get("team").map(String::as_str), Some("ml"));
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let s = TestServer::start().await;
    let anon = Client::new(s.client.base(), "lk_not_a_real_key_at_all_0000");
    let err = anon.machine_types().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    let r = reqwest::get(format!("{}/api/v2/external/machine-types", s.client.base()))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("Authorization"));
}

#[tokio::test]
async fn catalogue_and_org_answer_what_the_client_needs() {
    let s = TestServer::start_with(|c| {
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "cpu.2".into(),
            price_per_hour: 0.5,
            cpus: Some(2.0),
            ..Default::default()
        });
    })
    .await;
    let m = s.client.machine_types().await.unwrap();
    let names: Vec<_> = m
        .machine_types
        .iter()
        .map(|t| t.hardware_profile.as_str())
        .collect();
    assert_eq!(names, vec!["cpu", "cpu.2"]);
    assert_eq!(m.machine_types[1].price_per_hour, Some(0.5));
    let a = s.client.available_hardware().await.unwrap();
    assert_eq!(a.available_hardware_profiles, vec!["cpu", "cpu.2"]);
    let o = s.client.user_org().await.unwrap();
    assert_eq!(o.slug, "default");
    assert!(o.is_key_scoped);
}

#[tokio::test]
async fn logs_respect_limit_and_range() {
    let s = TestServer::start().await;
    let (id, _) = s.start_code("import sys\nfor i in range(10):\n    print(f'line {i}')\nprint('oops', file=sys.stderr)\n").await;
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
    let all = s.client.logs(&id, 1000, 24).await.unwrap();
    assert_eq!(all.total, 11);
    assert_eq!(all.logs.len(), 11);
    assert_eq!(all.logs[0].message, "line 0\n");
    let err_line = all.logs.iter().find(|l| l.message == "oops\n").unwrap();
    assert_eq!(err_line.level, "error");
    assert_eq!(
        err_line.labels.get("stream").map(String::as_str),
        Some("stderr")
    );
    let last3 = s.client.logs(&id, 3, 1).await.unwrap();
    assert_eq!(last3.total, 11);
    let msgs: Vec<_> = last3.logs.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(msgs, vec!["line 8\n", "line 9\n", "oops\n"]);
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("hours=0", "hours"),
        ("hours=169", "hours"),
        ("limit=abc", "limit"),
    ] {
        let r = s
            .client
            .raw(
                Method::GET,
                &format!("/api/v2/external/logs/execution/{id}?{q}"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 422, "{q}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(locs(&v), vec![format!("query.{field}")]);
    }
}

#[tokio::test]
async fn history_list_timing_and_delete() {
    let s = TestServer::start().await;
    let (a, _) = s.start_code("print('a')").await;
    let (b, _) = s.start_code("import sys; sys.exit(2)").await;
    s.wait_end(&a).await;
    s.wait_end(&b).await;
    let h = s.client.history(50, 0).await.unwrap();
    assert_eq!(h.total_executions, 2);
    let ids: Vec<_> = h
        .executions
        .iter()
        .map(|e| e.execution_id.as_str())
        .collect();
    assert_eq!(ids, vec![b.as_str(), a.as_str()], "newest first");
    assert_eq!(h.counts_by_status.get("completed"), Some(&1));
    assert_eq!(h.counts_by_status.get("failed"), Some(&1));
    assert!(
        s.client.workloads(None).await.unwrap().is_empty(),
        "nothing active"
    );
    let failed = s.client.workloads(Some("failed")).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].execution_id, b);
    let t = s.client.timing(&a).await.unwrap();
    assert!(t.duration_seconds.unwrap() >= 0.0);

    let reply = s.client.delete(&a).await.unwrap();
    assert_eq!(reply.execution_id, a);
    assert_eq!(
        s.client.execution(&a).await.unwrap_err().status(),
        Some(404)
    );
    assert_eq!(
        s.client.logs(&a, 100, 24).await.unwrap_err().status(),
        Some(404)
    );
    assert_eq!(s.client.history(50, 0).await.unwrap().total_executions, 1);
    assert_eq!(s.client.delete(&a).await.unwrap_err().status(), Some(404));
}

#[tokio::test]
async fn active_runs_are_listed_and_cannot_be_deleted() {
    let s = TestServer::start_with(|c| c.worker.enabled = false).await;
    let (id, _) = s.start_code("print(1)").await;
    let list = s.client.workloads(None).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, RunStatus::Pending);
    assert!(
        list[0]
            .pending_reason
            .as_deref()
            .unwrap()
            .contains("no worker")
    );
    assert_eq!(s.client.delete(&id).await.unwrap_err().status(), Some(409));
    let st = s.client.streaming_status(&id).await.unwrap();
    assert_eq!(st.status, "pending");
}

#[tokio::test]
async fn another_orgs_runs_are_invisible() {
    let s = TestServer::start().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let org = store.create_org("team-b", "Team B").await.unwrap();
    let secret = stoa_server::auth::generate_key();
    store
        .insert_key(&stoa_server::auth::key_record(&secret, &org, "b", false))
        .await
        .unwrap();
    let b = Client::new(s.client.base(), &secret);

    let (id, url) = s.start_code("print('secret of org a')").await;
    s.wait_end(&id).await;
    assert_eq!(b.execution(&id).await.unwrap_err().status(), Some(404));
    assert_eq!(b.logs(&id, 10, 24).await.unwrap_err().status(), Some(404));
    assert_eq!(b.abort(&id).await.unwrap_err().status(), Some(404));
    assert_eq!(b.delete(&id).await.unwrap_err().status(), Some(404));
    assert_eq!(
        b.streaming_status(&id).await.unwrap_err().status(),
        Some(404)
    );
    assert_eq!(b.history(50, 0).await.unwrap().total_executions, 0);
    assert_eq!(b.user_org().await.unwrap().slug, "team-b");
    // Org b's own run is its own.
    let r = b
        .start_python(&stoa_types::PythonStartRequest {
            code: "print('b')".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let rec = wait_end(&b, &r.execution_id).await;
    assert_eq!(rec.stdout, "b\n");
    assert_eq!(
        s.client
            .execution(&r.execution_id)
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    let _ = url;
}

/// The server's OpenAPI document.
async fn openapi(s: &TestServer) -> Value {
    reqwest::get(format!("{}/api/v2/external/openapi.json", s.client.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn openapi_document_matches_the_snapshot() {
    let s = TestServer::start().await;
    let doc = openapi(&s).await;
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert!(
        paths
            .iter()
            .any(|p| *p == "/api/v2/external/execution/streaming/start")
    );
    insta::assert_json_snapshot!("openapi", doc);
}

/// Found by schemathesis: error answers did not match the document (`detail` was
/// declared an object; it is a message, or a list for 422) and most operations did not
/// document their 401, 404, 422 or 503. Every operation now documents them, and real
/// error answers match the declared `ErrorBody`.
#[tokio::test]
async fn every_operation_documents_its_error_answers() {
    let s = TestServer::start().await;
    let doc = openapi(&s).await;
    let detail = &doc["components"]["schemas"]["ErrorBody"]["properties"]["detail"]["oneOf"];
    assert_eq!(detail[0]["type"], "string", "{detail}");
    assert_eq!(detail[1]["type"], "array", "{detail}");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let codes = op["responses"].as_object().unwrap();
            let mut want = vec!["422", "500", "503"];
            if op.get("security").is_some() {
                want.push("401");
            }
            if path.contains('{') {
                want.push("404");
            }
            for code in want {
                let r = &codes
                    .get(code)
                    .unwrap_or_else(|| panic!("{method} {path}: no {code}"));
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {code}"
                );
            }
        }
    }
    // Real answers: a 404's detail is a message, a 422's a list of fields.
    let r = s
        .client
        .raw(
            reqwest::Method::GET,
            "/api/v2/external/execution/nope",
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["detail"].is_string());
    let r = s
        .client
        .raw(
            reqwest::Method::GET,
            "/api/v2/external/billing/history?limit=0",
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(locs(&r.json::<Value>().await.unwrap()), vec!["query.limit"]);
    // An empty status filter is the active runs, as the document says.
    let r = s
        .client
        .raw(
            reqwest::Method::GET,
            "/api/v2/external/workloads/list?status=",
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn billing_is_running_time_times_price() {
    let s = TestServer::start_with(|c| c.profiles[0].price_per_hour = 3600.0).await;
    let (id, _) = s.start_code("import time; time.sleep(1)").await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    // 3600 per hour is 1 per second of running time (job_start → job_end).
    let secs =
        |t: &Option<String>| chrono::DateTime::parse_from_rfc3339(t.as_deref().unwrap()).unwrap();
    let running = (secs(&r.job_end) - secs(&r.job_start))
        .num_microseconds()
        .unwrap() as f64
        / 1e6;
    assert!(running >= 1.0, "the run slept 1 s: {running}");
    assert!(
        (r.billed - running).abs() < 2e-3,
        "billed {} for {running} s",
        r.billed
    );
    let h = s.client.history(50, 0).await.unwrap();
    assert!(
        (h.total_credits_spent - r.billed).abs() < 1e-3,
        "{} vs {}",
        h.total_credits_spent,
        r.billed
    );
}

#[tokio::test]
async fn an_oversized_body_is_413_with_the_limit_named() {
    let s = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let big = json!({"code": "x".repeat(4096)}).to_string();
    let (status, v) = post_raw(&s, &big).await;
    assert_eq!(status, 413);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("limits.max_body_bytes (1024 bytes)"),
        "{v}"
    );
    assert_eq!(s.client.history(10, 0).await.unwrap().total_executions, 0);
}
