//! Leases: the store says which worker holds a run; a worker that stops answering
//! loses its runs to the reaper (`worker lost`), controls reach a worker through its
//! heartbeat, and a worker's supervisor that panics fails only its own run.
//!
//! A worker on another machine is played here by the test itself, writing to the
//! server's store exactly what a worker does (claim, heartbeat, state writes naming
//! its lease token); the server under test is the real one, with the embedded worker
//! off so that it claims nothing itself.

use std::sync::Arc;
use std::time::Duration;

use stoa_store::{Directive, RunControl, Store, TransitionData};
use stoa_types::{RunId, RunStatus};

use super::*;

/// A server that executes nothing itself, with short leases.
async fn control_plane() -> (TestServer, Arc<dyn Store>) {
    let s = TestServer::start_with(|c| {
        c.worker.enabled = false;
        c.worker.lease_s = 3;
        c.metrics.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let store = s.handle.as_ref().unwrap().store.clone();
    (s, store)
}

/// Claims run `id` as worker `name` under a lease of `ttl`, starts it and writes a line
/// of output, as a worker does; returns the lease token.
async fn take(store: &Arc<dyn Store>, id: &str, name: &str, ttl: Duration) -> String {
    let id: RunId = id.parse().unwrap();
    let run = store
        .claim(id, name, &[], Some(ttl))
        .await
        .unwrap()
        .expect("the run is pending");
    let token = run.lease.unwrap().token;
    store
        .transition(id, RunStatus::Running, with_token(&token))
        .await
        .unwrap()
        .expect("the lease holder starts it");
    store
        .append_output(
            id,
            &[(
                stoa_store::OutputStream::Stdout,
                "hello from afar\n".to_string(),
            )
                .into()],
        )
        .await
        .unwrap();
    token
}

fn with_token(token: &str) -> TransitionData {
    TransitionData {
        lease_token: Some(token.to_string()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_worker_that_stops_answering_loses_its_run_to_the_reaper() {
    let (s, store) = control_plane().await;
    let (id, url) = s.start_code("print('never here')").await;
    let token = take(&store, &id, "gpu-box-7", Duration::from_secs(3)).await;
    assert_eq!(
        s.client.execution(&id).await.unwrap().status,
        RunStatus::Running
    );
    // No heartbeat comes: the lease runs out and the reaper ends the run.
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::SystemFailure);
    let error = r.result.error.clone().unwrap();
    assert!(
        error.starts_with("worker lost: gpu-box-7, last heard 20"),
        "{error}"
    );
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert!(text.starts_with("hello from afar\n"), "{text}");
    assert!(text.contains("[stoa] worker lost: gpu-box-7"), "{text}");
    assert_eq!(
        finished(&events).job.result.error.as_deref(),
        Some(error.as_str())
    );
    // The worker comes back: it hears the run is lost, and its late end does not count.
    let rid: RunId = id.parse().unwrap();
    let beat = store
        .heartbeat("gpu-box-7", &[(rid, token.clone())], Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(beat, vec![(rid, Directive::Lost)]);
    let late = TransitionData {
        return_code: Some(0),
        ..with_token(&token)
    };
    assert!(
        store
            .transition(rid, RunStatus::Completed, late)
            .await
            .unwrap()
            .is_none()
    );
    assert_status(
        &s.client.execution(&id).await.unwrap(),
        RunStatus::SystemFailure,
    );
    // The reaper's passes are in the platform's metrics.
    let text = s.scrape_metrics().await;
    assert!(text.contains("stoa_reaper_removed_total 1"), "{text}");
    assert!(text.contains("stoa_reaper_last_pass_failed 0"), "{text}");
}

#[tokio::test]
async fn abort_reaches_a_worker_through_its_heartbeat() {
    let (s, store) = control_plane().await;
    let (id, _) = s.start_code("print('never here')").await;
    let token = take(&store, &id, "gpu-box-7", Duration::from_secs(30)).await;
    let rid: RunId = id.parse().unwrap();
    let client = s.client.clone();
    let abort = tokio::spawn({
        let id = id.clone();
        async move { client.abort(&id).await }
    });
    // The worker's next heartbeats carry the abort.
    let mut heard = None;
    for _ in 0..100 {
        let beat = store
            .heartbeat(
                "gpu-box-7",
                &[(rid, token.clone())],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        if let [(_, Directive::Control(c))] = beat[..] {
            heard = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(heard, Some(RunControl::Abort));
    assert!(
        !abort.is_finished(),
        "abort answers only once the worker confirms the run is gone"
    );
    // The worker killed it and says so.
    let gone = TransitionData {
        error: Some("aborted by user".into()),
        ..with_token(&token)
    };
    store
        .transition(rid, RunStatus::Aborted, gone)
        .await
        .unwrap()
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), abort)
        .await
        .expect("abort answers once the run ended")
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    assert_status(&s.client.execution(&id).await.unwrap(), RunStatus::Aborted);
}

#[tokio::test]
async fn abort_of_a_run_on_an_unreachable_worker_says_so() {
    let (s, store) = control_plane().await;
    let (id, _) = s.start_code("print('never here')").await;
    take(&store, &id, "gpu-box-7", Duration::from_secs(3)).await;
    // The worker never hears it: the answer comes when the lease expired.
    let reply = s.client.abort(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::SystemFailure));
    assert!(
        reply.message.contains("worker lost: gpu-box-7"),
        "{}",
        reply.message
    );
}

#[tokio::test]
async fn a_panicking_supervisor_fails_only_its_run_and_frees_its_slot() {
    let s = TestServer::start_with(|c| c.worker.max_concurrent_runs = 1).await;
    let (id, _) = s
        .start_json(serde_json::json!({
            "code": "import subprocess, time\nsubprocess.Popen(['sleep', '120'])\nprint('alive', flush=True)\ntime.sleep(120)\n",
            "run_name": stoa_worker::FAULT_SUPERVISOR_PANIC,
        }))
        .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::SystemFailure);
    assert!(
        r.result
            .error
            .as_deref()
            .unwrap()
            .contains("the run's supervisor failed"),
        "{r:?}"
    );
    assert!(r.stdout.contains("[stoa] internal error"), "{}", r.stdout);
    let left = processes_gone(&id).await;
    assert!(left.is_empty(), "nothing of the run is left: {left:?}");
    // Its one slot is free again: the next run starts and completes.
    let (next, _) = s.start_code("print('next')").await;
    let r = s.wait_end(&next).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "next\n");
}
