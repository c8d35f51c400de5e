//! Retention and the paged workload list: old output and old runs go, a deleted run's
//! output is purged, and `workloads/list` pages stay bare arrays.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use stoa_store::{PgStore, SqliteStore};
use stoa_types::{ExecutionSummary, RunId, RunStatus};

use super::*;

/// The platform metrics, read with the admin key.
async fn metrics(s: &TestServer) -> String {
    let r = s.client.raw(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.text().await.unwrap()
}

/// The value of one series in the metrics text.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

/// Waits (15 s at most) until the metrics satisfy `ok`; returns them.
async fn wait_metrics(s: &TestServer, ok: impl Fn(&str) -> bool) -> String {
    for _ in 0..150 {
        let text = metrics(s).await;
        if ok(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("metrics never got there: {}", metrics(s).await);
}

/// Moves a run back in time (`days` ago), through a second handle on the database.
async fn backdate(s: &TestServer, id: &str, days: i64) {
    let (id, at) = (
        id.parse::<RunId>().unwrap(),
        chrono::Utc::now() - chrono::Duration::days(days),
    );
    match postgres_for(s.dir.path()).await {
        Some(url) => PgStore::connect(&url)
            .await
            .unwrap()
            .backdate_run(id, at)
            .await
            .unwrap(),
        None => SqliteStore::open(&s.data_dir().join("stoa.db"))
            .unwrap()
            .backdate_run(id, at)
            .await
            .unwrap(),
    }
}

/// The org of the admin key.
async fn admin_org(s: &TestServer) -> stoa_types::OrgId {
    stoa_types::OrgId(s.client.user_org().await.unwrap().org_id)
}

#[tokio::test]
async fn old_output_and_old_runs_are_removed_by_retention() {
    let s = TestServer::start_with(|c| {
        c.retention.output_days = 1;
        c.retention.runs_days = 3;
        c.retention.interval_s = 1;
    })
    .await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let mut ids = vec![];
    for _ in 0..3 {
        let (id, _) = s.start_code("print('hello')\nprint('world')").await;
        assert_status(&s.wait_end(&id).await, RunStatus::Completed);
        ids.push(id);
    }
    let [expired, removed, recent] = [&ids[0], &ids[1], &ids[2]];
    let org = admin_org(&s).await;
    assert_eq!(store.org_output_bytes(&org).await.unwrap(), 36);
    backdate(&s, expired, 2).await;
    backdate(&s, removed, 4).await;

    // Both old runs' output expires (a pass removes output first), then the older run.
    let text = wait_metrics(&s, |t| {
        series(t, "stoa_retention_removed_total{what=\"runs\"}") >= 1.0
            && series(t, "stoa_retention_removed_total{what=\"output\"}") >= 4.0
    })
    .await;
    assert_eq!(series(&text, "stoa_retention_last_pass_failed"), 0.0);
    assert!(series(&text, "stoa_retention_last_pass_timestamp_seconds") > 0.0);

    // Output older than output_days: gone everywhere, and the record says why.
    let r = s.client.execution(expired).await.unwrap();
    assert_status(&r, RunStatus::Completed);
    assert!(r.output_expired, "{r:#?}");
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
    let logs = s.client.logs(expired, 100, 168).await.unwrap();
    assert_eq!(logs.total, 0);
    let url = format!("{}/api/v1/stream/{expired}", s.client.base());
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "");
    assert_eq!(finished(&events).job.status, Some(RunStatus::Completed));
    // Runs older than runs_days: gone.
    assert_eq!(
        s.client.execution(removed).await.unwrap_err().status(),
        Some(404)
    );
    // A recent run keeps everything.
    let r = s.client.execution(recent).await.unwrap();
    assert!(!r.output_expired);
    assert_eq!(r.stdout, "hello\nworld\n");
    assert_eq!(store.org_output_bytes(&org).await.unwrap(), 12);
    let h = s.client.history(50, 0).await.unwrap();
    assert_eq!(h.total_executions, 2);
}

#[tokio::test]
async fn a_deleted_runs_output_is_purged_soon_and_never_readable() {
    // The default interval (an hour): the deletion itself wakes retention.
    let s = TestServer::start().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let org = admin_org(&s).await;
    let (id, url) = s.start_code("for i in range(50): print(i)").await;
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
    let (kept, _) = s.start_code("print('kept')").await;
    s.wait_end(&kept).await;
    let bytes = store.org_output_bytes(&org).await.unwrap();
    s.client.delete(&id).await.unwrap();
    // Gone for every reader at once.
    assert_eq!(
        store.org_output_bytes(&org).await.unwrap(),
        bytes - 140,
        "50 lines, 140 bytes"
    );
    let rid: RunId = id.parse().unwrap();
    assert!(
        store
            .read_output(rid, 0, 1000, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.client.logs(&id, 100, 24).await.unwrap_err().status(),
        Some(404)
    );
    let stream = s
        .client
        .raw(Method::POST, &url.replace(s.client.base(), ""), None)
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 404);
    // The rows themselves go in the background.
    wait_metrics(&s, |t| {
        series(t, "stoa_retention_removed_total{what=\"deleted_output\"}") >= 50.0
    })
    .await;
    // Recent output is kept by the default retention.
    let text = metrics(&s).await;
    assert_eq!(
        series(&text, "stoa_retention_removed_total{what=\"output\"}"),
        0.0
    );
    assert_eq!(s.client.execution(&kept).await.unwrap().stdout, "kept\n");
}

/// One raw `workloads/list` call: status, `X-Total-Count`, `Link`, body.
async fn list_page(s: &TestServer, query: &str) -> (u16, Option<i64>, Option<String>, Value) {
    let r = s
        .client
        .raw(
            Method::GET,
            &format!("/api/v2/external/workloads/list{query}"),
            None,
        )
        .await
        .unwrap();
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    let total = header("x-total-count").map(|v| v.parse().unwrap());
    let link = header("link");
    (r.status().as_u16(), total, link, r.json().await.unwrap())
}

#[tokio::test]
async fn the_workload_list_is_paged_and_stays_a_bare_array() {
    let s = TestServer::start_with(|c| c.worker.enabled = false).await;
    let mut ids = vec![];
    for _ in 0..5 {
        ids.push(s.start_code("print(1)").await.0);
    }
    ids.reverse(); // newest first

    // Without parameters (the official client): every active run, in one array.
    let (status, total, link, body) = list_page(&s, "").await;
    assert_eq!((status, total, link), (200, Some(5), None));
    assert_eq!(body.as_array().unwrap().len(), 5);
    assert_eq!(s.client.workloads(None).await.unwrap().len(), 5);

    // Pages of two, following `Link` to the end.
    let mut seen = vec![];
    let mut query = "?limit=2".to_string();
    loop {
        let (status, total, link, body) = list_page(&s, &query).await;
        assert_eq!((status, total), (200, Some(5)));
        let page: Vec<ExecutionSummary> = serde_json::from_value(body).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.into_iter().map(|e| e.execution_id));
        let Some(link) = link else { break };
        let next = link
            .strip_prefix('<')
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("link: {link}"));
        let rest = next
            .strip_prefix(&format!(
                "{}/api/v2/external/workloads/list",
                s.client.base()
            ))
            .unwrap_or_else(|| panic!("link on the server's URL: {next}"));
        query = rest.to_string();
    }
    assert_eq!(seen, ids);
    assert!(query.contains("offset=4"), "{query}");

    // Filters travel with the next link; an offset past the end is an empty page.
    let (_, total, link, body) = list_page(&s, "?status=pending,running&limit=4").await;
    assert_eq!(total, Some(5));
    assert_eq!(body.as_array().unwrap().len(), 4);
    let link = link.unwrap();
    assert!(
        link.contains("status=pending%2Crunning") && link.contains("limit=4&offset=4"),
        "{link}"
    );
    let (status, total, link, body) = list_page(&s, "?offset=10").await;
    assert_eq!((status, total, link), (200, Some(5), None));
    assert_eq!(body, serde_json::json!([]));

    // Bad values: 422 naming the parameter.
    for (query, loc) in [
        ("?limit=0", "query.limit"),
        ("?limit=1001", "query.limit"),
        ("?limit=ten", "query.limit"),
        ("?offset=-1", "query.offset"),
    ] {
        let (status, _, _, body) = list_page(&s, query).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(locs(&body), vec![loc], "{query}");
    }
}

#[tokio::test]
async fn an_orgs_stored_output_is_capped_by_its_limit_and_other_orgs_are_not() {
    let s = TestServer::start_with(|c| c.limits.output_bytes_per_org = 3000).await;
    // 20 lines of 100 bytes each.
    let code = "for i in range(20):\n    print('x' * 99)\n";
    let (first, _) = s.start_code(code).await;
    let r = s.wait_end(&first).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout.len(), 2000);
    assert!(!r.output_truncated);

    // The second run may store only what is left of the org's 3000 bytes.
    let (second, url) = s.start_code(code).await;
    let r = s.wait_end(&second).await;
    assert_status(&r, RunStatus::Completed);
    assert!(r.output_truncated, "{r:?}");
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert!(
        text.contains("limits.output_bytes_per_org"),
        "a notice names the limit: {text}"
    );
    assert_eq!(text.matches(&"x".repeat(99)).count(), 10, "{text}");

    // Another org has its own budget.
    let other = other_org(&s, "quota-other").await;
    let st = other
        .start_python(&stoa_types::PythonStartRequest {
            code: code.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = wait_end(&other, &st.execution_id).await;
    assert_eq!(r.stdout.len(), 2000);
    assert!(!r.output_truncated);

    // Deleting the first run gives its 2000 bytes back (about 1100 stay stored).
    s.client.delete(&first).await.unwrap();
    let (third, _) = s
        .start_code("for i in range(15):\n    print('x' * 99)\n")
        .await;
    let r = s.wait_end(&third).await;
    assert!(!r.output_truncated, "{r:?}");
    assert_eq!(r.stdout.len(), 1500);
}
