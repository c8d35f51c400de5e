//! Attacks: fairness. One org's high-priority runs cannot hold a shared profile until
//! they have all ended while another org's run waits: across orgs, fairness comes
//! before priority (`limits.priority_share`).

use serde_json::json;
use stoa_types::RunStatus;

use super::super::{TestServer, assert_status, wait_end};
use super::other_org;

#[tokio::test]
async fn another_orgs_low_priority_run_does_not_wait_for_all_high_priority_runs() {
    let s = TestServer::start_with(|c| c.profiles[0].slots = Some(1)).await;
    let flooder = other_org(&s, "flooder").await;
    let mut floods = Vec::new();
    for i in 0..4 {
        floods.push(
            flooder
                .start_python_json(&json!({
                    "code": format!("import time\ntime.sleep(1)\nprint({i})"),
                    "priority": 100,
                }))
                .await
                .unwrap()
                .execution_id,
        );
    }
    let waiting = s
        .client
        .start_python_json(&json!({"code": "print('mine')", "priority": 0}))
        .await
        .unwrap()
        .execution_id;
    let mine = wait_end(&s.client, &waiting).await;
    assert_status(&mine, RunStatus::Completed);
    let mut flood_starts = Vec::new();
    for id in &floods {
        let r = wait_end(&flooder, id).await;
        assert_status(&r, RunStatus::Completed);
        flood_starts.push(r.job_start.unwrap());
    }
    flood_starts.sort();
    let started = mine.job_start.unwrap();
    // The orgs take turns on the one slot: at most the run already placed goes first.
    assert!(
        started < flood_starts[1],
        "the low-priority run started at {started}, after the flood's second run ({:?})",
        flood_starts
    );
}
