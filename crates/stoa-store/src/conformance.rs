//! The lease rules every backend keeps, written once over the [`Store`] trait: each
//! backend's tests call these with a fresh, empty store of their own.
//!
//! Kept out of `cfg(test)` so another crate's backend (and its tests) can run them; it
//! holds no code the server uses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stoa_types::{OrgId, RunId, RunStatus};

use crate::{
    Appended, Directive, GpuSample, Inserted, NewRun, OutputPiece, OutputStream, Reap, RunControl,
    RunFilter, RunKind, Sample, Store, TransitionData,
};

const LONG: Duration = Duration::from_secs(300);

/// A python run of `org` on the `cpu` profile, as tests insert them.
pub fn new_run(org: &OrgId) -> NewRun {
    NewRun {
        id: RunId::new(),
        org_id: org.clone(),
        job_type: RunKind::Python,
        execution_type: "cpu".into(),
        file_name: None,
        spec: "{}".into(),
        timeout_s: 60,
        run_name: None,
        labels: vec![],
        metadata: BTreeMap::new(),
        callback_urls: vec![],
        price_per_hour: Some(0.0),
        pending_reason: None,
        priority: 50,
        idempotency_key: None,
        parent_id: None,
    }
}

async fn queued(s: &dyn Store, slug: &str) -> RunId {
    let org = match s.find_org(slug).await.unwrap() {
        Some(o) => o,
        None => s.create_org(slug, slug).await.unwrap(),
    };
    let run = NewRun {
        callback_urls: vec!["http://127.0.0.1:9/hook".into()],
        ..new_run(&org.id)
    };
    assert!(s.insert_run(&run).await.unwrap().is_none(), "a new run");
    run.id
}

/// Claims run `id` for `worker` under a lease of `ttl`; its token.
async fn lease_of(s: &dyn Store, id: RunId, worker: &str, ttl: Duration) -> String {
    let run = s.claim(id, worker, &[], Some(ttl)).await.unwrap().unwrap();
    run.lease.expect("a claim writes a lease").token
}

fn with_token(token: &str) -> TransitionData {
    TransitionData {
        lease_token: Some(token.to_string()),
        ..Default::default()
    }
}

/// Two workers claim the same run at once: exactly one gets it, under a lease that
/// names it; the loser's token (it has none) never counts.
pub async fn two_claimers_one_lease(s: Arc<dyn Store>) {
    for _ in 0..20 {
        let id = queued(&*s, "leases").await;
        let (a, b) = tokio::join!(
            s.claim(id, "worker-a", &[], Some(LONG)),
            s.claim(id, "worker-b", &[], Some(LONG)),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.is_some() != b.is_some(), "one claim wins: {a:?} {b:?}");
        let run = a.or(b).unwrap();
        let lease = run.lease.clone().expect("a claim writes a lease");
        assert_eq!(lease.attempt, 1);
        assert!(lease.expires_at > stoa_core::time::now(), "{lease:?}");
        assert_eq!(run.status, RunStatus::Starting);
        // A second claim of a run already claimed finds nothing.
        assert!(
            s.claim(id, "worker-c", &[], Some(LONG))
                .await
                .unwrap()
                .is_none()
        );
    }
}

/// Every write after the claim names the token: a wrong one changes nothing, and a
/// heartbeat with it is told the run is lost.
pub async fn a_stale_token_is_rejected(s: Arc<dyn Store>) {
    let id = queued(&*s, "leases").await;
    let run = s
        .claim(id, "worker-a", &[], Some(LONG))
        .await
        .unwrap()
        .unwrap();
    let token = run.lease.unwrap().token;
    assert!(
        s.transition(id, RunStatus::Running, with_token("not-the-token"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        s.get_run(id).await.unwrap().unwrap().status,
        RunStatus::Starting
    );
    // A timeline phase is written under the lease only.
    assert!(!s.add_phase(id, "not-the-token", "forged").await.unwrap());
    assert!(s.add_phase(id, &token, "environment_ready").await.unwrap());
    let beat = s
        .heartbeat("worker-a", &[(id, "not-the-token".into())], LONG)
        .await
        .unwrap();
    assert_eq!(beat, vec![(id, Directive::Lost)]);
    // Another worker naming the right token is not the holder either.
    let beat = s
        .heartbeat("worker-b", &[(id, token.clone())], LONG)
        .await
        .unwrap();
    assert_eq!(beat, vec![(id, Directive::Lost)]);
    let running = s
        .transition(id, RunStatus::Running, with_token(&token))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(running.status, RunStatus::Running);
    let beat = s
        .heartbeat("worker-a", &[(id, token.clone())], LONG)
        .await
        .unwrap();
    assert_eq!(beat, vec![(id, Directive::Continue)]);
    // The end gives the lease up: the token counts for nothing after it.
    s.transition(id, RunStatus::Completed, with_token(&token))
        .await
        .unwrap()
        .unwrap();
    let ended = s.get_run(id).await.unwrap().unwrap();
    assert!(ended.lease.is_none(), "{:?}", ended.lease);
    assert!(!s.add_phase(id, &token, "late").await.unwrap());
    let phases: Vec<_> = s.get_run(id).await.unwrap().unwrap().phases;
    let phases: Vec<_> = phases.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        phases,
        vec!["queued", "placed", "environment_ready", "started", "ended"]
    );
    let beat = s.heartbeat("worker-a", &[(id, token)], LONG).await.unwrap();
    assert_eq!(beat, vec![(id, Directive::Lost)]);
}

/// A lease that is not renewed expires; the reaper ends the run `system_failure`
/// naming the worker and when it was last heard, keeps its output, writes its
/// callbacks; the worker that comes back can write nothing over it. Leases that are
/// renewed are left alone.
pub async fn an_expired_lease_is_reaped(s: Arc<dyn Store>) {
    let lost = queued(&*s, "leases").await;
    let kept = queued(&*s, "leases").await;
    let short = Duration::from_millis(200);
    let lost_token = lease_of(&*s, lost, "worker-a", short).await;
    let kept_token = lease_of(&*s, kept, "worker-b", short).await;
    s.transition(lost, RunStatus::Running, with_token(&lost_token))
        .await
        .unwrap()
        .unwrap();
    s.append_output(
        lost,
        &[(OutputStream::Stdout, "before\n".to_string()).into()],
    )
    .await
    .unwrap();
    // Nothing has expired yet.
    assert!(
        s.reap(Reap::Expired { except: None })
            .await
            .unwrap()
            .is_empty()
    );
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let beat = s
            .heartbeat("worker-b", &[(kept, kept_token.clone())], short)
            .await
            .unwrap();
        assert_eq!(beat, vec![(kept, Directive::Continue)]);
    }
    let reaped = s.reap(Reap::Expired { except: None }).await.unwrap();
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    let r = &reaped[0];
    assert_eq!((r.id, r.status), (lost, RunStatus::SystemFailure));
    let error = r.error.as_deref().unwrap();
    assert!(
        error.starts_with("worker lost: worker-a, last heard 20"),
        "{error}"
    );
    let out = s.read_output(lost, 0, 100, 1 << 20).await.unwrap();
    assert_eq!(out[0].content, "before\n");
    assert!(
        out[1].content.starts_with("[stoa] worker lost: worker-a"),
        "{out:?}"
    );
    assert_eq!(s.deliveries_for_run(lost).await.unwrap().len(), 1);
    // The worker comes back: what it writes does not count, and it hears the run is lost.
    let late = TransitionData {
        return_code: Some(0),
        ..with_token(&lost_token)
    };
    assert!(
        s.transition(lost, RunStatus::Completed, late)
            .await
            .unwrap()
            .is_none()
    );
    let beat = s
        .heartbeat("worker-a", &[(lost, lost_token)], short)
        .await
        .unwrap();
    assert_eq!(beat, vec![(lost, Directive::Lost)]);
    assert_eq!(
        s.get_run(lost).await.unwrap().unwrap().status,
        RunStatus::SystemFailure
    );
    assert_eq!(
        s.get_run(kept).await.unwrap().unwrap().status,
        RunStatus::Starting
    );
    // A second pass finds nothing more to do.
    assert!(
        s.reap(Reap::Expired { except: None })
            .await
            .unwrap()
            .is_empty()
    );
}

/// Abort and stop are written to the store and heard on the next heartbeat; an abort
/// asked for is not weakened into a stop; a run that is not active takes none.
pub async fn controls_reach_the_worker_by_heartbeat(s: Arc<dyn Store>) {
    let id = queued(&*s, "leases").await;
    let pending = s.request_control(id, RunControl::Abort).await.unwrap();
    assert!(pending.is_none(), "a pending run has no worker to tell");
    let token = lease_of(&*s, id, "worker-a", LONG).await;
    let stop = RunControl::Stop { grace_ms: 1500 };
    let r = s.request_control(id, stop).await.unwrap().unwrap();
    assert_eq!(r.control, Some(stop));
    let beat = s
        .heartbeat("worker-a", &[(id, token.clone())], LONG)
        .await
        .unwrap();
    assert_eq!(beat, vec![(id, Directive::Control(stop))]);
    s.request_control(id, RunControl::Abort)
        .await
        .unwrap()
        .unwrap();
    s.request_control(id, stop).await.unwrap().unwrap();
    let beat = s
        .heartbeat("worker-a", &[(id, token.clone())], LONG)
        .await
        .unwrap();
    assert_eq!(beat, vec![(id, Directive::Control(RunControl::Abort))]);
    s.transition(id, RunStatus::Aborted, with_token(&token))
        .await
        .unwrap()
        .unwrap();
    let ended = s.get_run(id).await.unwrap().unwrap();
    assert_eq!(ended.control, None);
    assert!(s.request_control(id, stop).await.unwrap().is_none());
}

/// A worker that restarted ends all its earlier runs at once, with its reason, and no
/// other worker's.
pub async fn a_restarted_worker_reaps_its_own_runs(s: Arc<dyn Store>) {
    let mine = queued(&*s, "leases").await;
    let theirs = queued(&*s, "leases").await;
    s.claim(mine, "embedded", &[], Some(LONG))
        .await
        .unwrap()
        .unwrap();
    s.claim(theirs, "worker-b", &[], Some(LONG))
        .await
        .unwrap()
        .unwrap();
    let reason = "the server restarted while the run was active";
    let reaped = s
        .reap(Reap::Worker {
            worker: "embedded",
            reason,
        })
        .await
        .unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].id, mine);
    assert_eq!(reaped[0].error.as_deref(), Some(reason));
    assert_eq!(
        s.get_run(theirs).await.unwrap().unwrap().status,
        RunStatus::Starting
    );
}

/// Output a worker numbers itself: a resent batch is stored once, a gap is refused with
/// the number expected, and a stale token stores nothing.
pub async fn numbered_output_is_stored_once_in_order(s: Arc<dyn Store>) {
    let id = queued(&*s, "leases").await;
    let token = lease_of(&*s, id, "worker-a", LONG).await;
    let piece = |t: &str| crate::OutputPiece::from((OutputStream::Stdout, format!("{t}\n")));
    let batch = [piece("one"), piece("two")];
    assert_eq!(
        s.append_output_at(id, &token, 1, &batch, u64::MAX)
            .await
            .unwrap(),
        Appended::Stored { next: 3 }
    );
    // The same batch again (its answer was lost on the way), then one overlapping it.
    assert_eq!(
        s.append_output_at(id, &token, 1, &batch, u64::MAX)
            .await
            .unwrap(),
        Appended::Stored { next: 3 }
    );
    assert_eq!(
        s.append_output_at(id, &token, 2, &[piece("two"), piece("three")], u64::MAX)
            .await
            .unwrap(),
        Appended::Stored { next: 4 }
    );
    assert_eq!(
        s.append_output_at(id, &token, 6, &[piece("six")], u64::MAX)
            .await
            .unwrap(),
        Appended::Gap { expected: 4 }
    );
    assert_eq!(
        s.append_output_at(id, "stale", 4, &[piece("four")], u64::MAX)
            .await
            .unwrap(),
        Appended::LeaseLost
    );
    // Numbers below 1 are a gap, not an overflow; past the limit nothing is stored.
    for first in [0, -1, i64::MIN] {
        assert_eq!(
            s.append_output_at(id, &token, first, &[piece("x")], u64::MAX)
                .await
                .unwrap(),
            Appended::Gap { expected: 4 }
        );
    }
    assert_eq!(
        s.append_output_at(id, &token, 4, &[piece("four")], 16)
            .await
            .unwrap(),
        Appended::OverLimit
    );
    assert!(s.lease_held(id, &token).await.unwrap());
    assert!(!s.lease_held(id, "stale").await.unwrap());
    let text: Vec<String> = s
        .read_output(id, 0, 100, 1 << 20)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.content)
        .collect();
    assert_eq!(text, ["one\n", "two\n", "three\n"]);
}

/// A GPU selection is created whole: the parent running under the coordinator (no
/// lease: no worker holds it), its children pending.
pub async fn a_selection_is_inserted_whole(s: Arc<dyn Store>) {
    let org = s.create_org("sel", "sel").await.unwrap();
    let run = |id: RunId, parent: Option<RunId>| NewRun {
        id,
        job_type: if parent.is_some() {
            RunKind::Python
        } else {
            RunKind::GpuSelection
        },
        parent_id: parent,
        ..new_run(&org.id)
    };
    let parent = RunId::new();
    let children = [
        run(RunId::new(), Some(parent)),
        run(RunId::new(), Some(parent)),
    ];
    // Over the org's queued limit, nothing of it is stored.
    assert_eq!(
        s.insert_selection(&run(parent, None), &children, 1)
            .await
            .unwrap(),
        Inserted::OverLimit { queued: 0 }
    );
    assert!(s.get_run(parent).await.unwrap().is_none());
    assert_eq!(
        s.insert_selection(&run(parent, None), &children, 2)
            .await
            .unwrap(),
        Inserted::New
    );
    let p = s.get_run(parent).await.unwrap().unwrap();
    assert_eq!(p.status, RunStatus::Running);
    assert_eq!(p.worker_id.as_deref(), Some("coordinator"));
    assert!(p.lease.is_none());
    let kids = s.children(parent).await.unwrap();
    assert_eq!(kids.len(), 2);
    assert!(kids.iter().all(|k| k.status == RunStatus::Pending));
    // A child id already taken: nothing of the selection is stored.
    let again = RunId::new();
    let clash = [
        run(RunId::new(), Some(again)),
        run(children[0].id, Some(again)),
    ];
    assert!(
        s.insert_selection(&run(again, None), &clash, usize::MAX)
            .await
            .is_err()
    );
    assert!(s.get_run(again).await.unwrap().is_none());
    assert!(s.get_run(clash[0].id).await.unwrap().is_none());
}

/// The queued limit is the database's: of concurrent inserts, only as many as fit are
/// stored; a retry with an idempotency key finds its run even at the limit; a claimed
/// run no longer counts.
pub async fn the_queued_limit_holds_for_concurrent_inserts(s: Arc<dyn Store>) {
    let org = s.create_org("limited", "limited").await.unwrap();
    let runs: Vec<NewRun> = (0..6)
        .map(|i| NewRun {
            idempotency_key: Some(format!("key-{i}")),
            ..new_run(&org.id)
        })
        .collect();
    let inserts: Vec<_> = runs
        .iter()
        .map(|r| {
            let s = s.clone();
            let r = r.clone();
            tokio::spawn(async move { s.insert_run_within(&r, 2).await.unwrap() })
        })
        .collect();
    let mut new = Vec::new();
    for (r, i) in runs.iter().zip(inserts) {
        match i.await.unwrap() {
            Inserted::New => new.push(r.clone()),
            Inserted::OverLimit { queued } => assert_eq!(queued, 2),
            Inserted::Existing(e) => panic!("no key was used before: {e:?}"),
        }
    }
    assert_eq!(new.len(), 2, "exactly the limit is stored");
    // The same key again, at the limit: the first run, nothing new.
    match s.insert_run_within(&new[0], 2).await.unwrap() {
        Inserted::Existing(e) => assert_eq!(e.id, new[0].id),
        other => panic!("{other:?}"),
    }
    let fresh = new_run(&org.id);
    assert_eq!(
        s.insert_run_within(&fresh, 2).await.unwrap(),
        Inserted::OverLimit { queued: 2 }
    );
    // Once one starts, there is room for one more.
    s.claim(new[0].id, "w", &[], Some(LONG))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.insert_run_within(&fresh, 2).await.unwrap(), Inserted::New);
    assert!(s.get_run(fresh.id).await.unwrap().is_some());
    let third = new_run(&org.id);
    assert_eq!(
        s.insert_run_within(&third, 2).await.unwrap(),
        Inserted::OverLimit { queued: 2 }
    );
    // A queued run aborted leaves room; deleting it once ended changes nothing.
    s.transition(fresh.id, RunStatus::Aborted, TransitionData::default())
        .await
        .unwrap()
        .expect("a pending run may be aborted");
    assert_eq!(s.insert_run_within(&third, 2).await.unwrap(), Inserted::New);
    assert!(s.delete_run(fresh.id).await.unwrap());
    assert_eq!(
        s.insert_run_within(&new_run(&org.id), 2).await.unwrap(),
        Inserted::OverLimit { queued: 2 }
    );
}

/// A due delivery is claimed by one caller only, and comes due again when its hold ends
/// without an attempt recorded (its server died).
pub async fn a_due_delivery_is_claimed_once(s: Arc<dyn Store>) {
    let id = queued(&*s, "outbox").await;
    let token = lease_of(&*s, id, "w", LONG).await;
    s.transition(id, RunStatus::Completed, with_token(&token))
        .await
        .unwrap()
        .expect("it ends");
    let now = stoa_core::time::now() + chrono::Duration::seconds(1);
    let hold = Duration::from_secs(60);
    let claims: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.claim_deliveries(now, 10, hold).await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for c in claims {
        got.extend(c.await.unwrap());
    }
    assert_eq!(got.len(), 1, "one claimer gets it: {got:?}");
    assert_eq!(got[0].run_id, id);
    assert!(s.claim_deliveries(now, 10, hold).await.unwrap().is_empty());
    // Its server died before recording the attempt: due again after the hold.
    let later = now + chrono::Duration::seconds(61);
    let again = s.claim_deliveries(later, 10, hold).await.unwrap();
    assert_eq!(again.len(), 1);
    // A recorded attempt is what the next claim sees.
    let mut d = again[0].clone();
    d.state = crate::DeliveryState::Delivered;
    d.attempts = 1;
    s.record_attempt(&d).await.unwrap();
    let far = later + chrono::Duration::days(1);
    assert!(s.claim_deliveries(far, 10, hold).await.unwrap().is_empty());
}

/// A run of `org` that ran and completed, with `lines` lines of output (`x\n`).
pub async fn ended_run(s: &dyn Store, org: &OrgId, lines: usize) -> RunId {
    let mut r = new_run(org);
    r.callback_urls = vec!["http://127.0.0.1:9/cb".into()];
    s.insert_run(&r).await.unwrap();
    s.claim(r.id, "w", &[], Some(LONG)).await.unwrap().unwrap();
    s.transition(r.id, RunStatus::Running, TransitionData::default())
        .await
        .unwrap()
        .unwrap();
    let pieces: Vec<OutputPiece> = (0..lines)
        .map(|_| (OutputStream::Stdout, "x\n".to_string()).into())
        .collect();
    s.append_output(r.id, &pieces).await.unwrap();
    s.insert_samples(vec![Sample {
        run_id: r.id,
        ts: stoa_core::time::now(),
        cpu_percent: 1.0,
        ram_used: 1,
        ram_total: 2,
    }])
    .await
    .unwrap();
    s.insert_gpu_samples(
        r.id,
        vec![GpuSample {
            ts: stoa_core::time::now(),
            ..Default::default()
        }],
    )
    .await
    .unwrap();
    s.transition(r.id, RunStatus::Completed, TransitionData::default())
        .await
        .unwrap()
        .unwrap();
    r.id
}

/// Many claimers racing over one store: every run is handed out exactly once.
pub async fn no_run_is_claimed_twice(s: Arc<dyn Store>) {
    let org = s.create_org("default", "Default").await.unwrap();
    for _ in 0..200 {
        s.insert_run(&new_run(&org.id)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(r) = s.claim_next(&format!("w{w}"), LONG).await.unwrap() {
                got.push(r.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, 200);
    assert_eq!(all.len(), 200);
}

pub async fn terminal_state_is_written_once(s: Arc<dyn Store>) {
    let org = s.create_org("default", "Default").await.unwrap();
    let r = new_run(&org.id);
    s.insert_run(&r).await.unwrap();
    s.claim_next("w", LONG).await.unwrap().unwrap();
    let run = s
        .transition(r.id, RunStatus::Running, TransitionData::default())
        .await
        .unwrap()
        .unwrap();
    assert!(run.job_start.is_some());
    let a = s
        .transition(
            r.id,
            RunStatus::Aborted,
            TransitionData {
                error: Some("aborted".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let b = s
        .transition(
            r.id,
            RunStatus::Completed,
            TransitionData {
                return_code: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(a.is_some() && b.is_none());
    let run = s.get_run(r.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Aborted);
    let phases: Vec<_> = run.phases.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(phases, vec!["queued", "placed", "started", "ended"]);
}

pub async fn output_has_gapless_sequence_and_logs_window(s: Arc<dyn Store>) {
    let org = s.create_org("default", "Default").await.unwrap();
    let r = new_run(&org.id);
    s.insert_run(&r).await.unwrap();
    let last = s
        .append_output(
            r.id,
            &[
                (OutputStream::Stdout, "a\n".to_string()).into(),
                OutputPiece {
                    stream: OutputStream::Stderr,
                    service: Some("web".into()),
                    content: "b\n".into(),
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(last, 2);
    assert_eq!(
        s.append_output(r.id, &[(OutputStream::Stdout, "c\n".to_string()).into()])
            .await
            .unwrap(),
        3
    );
    let out = s.read_output(r.id, 1, 10, usize::MAX).await.unwrap();
    assert_eq!(out.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(out[0].service.as_deref(), Some("web"));
    assert_eq!(out[1].service, None);
    let (logs, total) = s.read_logs(r.id, epoch(), 2, usize::MAX).await.unwrap();
    assert_eq!(total, 3);
    assert_eq!(
        logs.iter().map(|c| c.content.as_str()).collect::<Vec<_>>(),
        vec!["b\n", "c\n"]
    );
}

pub async fn output_is_read_in_pages_bounded_by_lines_and_bytes(s: Arc<dyn Store>) {
    let org = s.create_org("default", "Default").await.unwrap();
    let r = new_run(&org.id);
    s.insert_run(&r).await.unwrap();
    // 1,000 lines of 1 KiB each.
    let line = format!("{}\n", "x".repeat(1023));
    let pieces: Vec<OutputPiece> = (0..1000)
        .map(|_| (OutputStream::Stdout, line.clone()).into())
        .collect();
    s.append_output(r.id, &pieces).await.unwrap();
    // At most `limit` lines.
    let page = s.read_output(r.id, 0, 100, usize::MAX).await.unwrap();
    assert_eq!(page.len(), 100);
    // At most `max_bytes` of content: 10 KiB holds ten lines.
    let page = s.read_output(r.id, 0, 500, 10 * 1024).await.unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(page.last().unwrap().seq, 10);
    // Paging on from the last seq reads everything exactly once.
    let (mut after, mut seen) = (0, 0);
    loop {
        let page = s.read_output(r.id, after, 500, 64 * 1024).await.unwrap();
        let Some(last) = page.last() else { break };
        assert!(page.len() <= 64);
        assert_eq!(page[0].seq, after + 1);
        after = last.seq;
        seen += page.len();
    }
    assert_eq!(seen, 1000);
    // A budget smaller than one line still makes progress.
    assert_eq!(s.read_output(r.id, 0, 500, 1).await.unwrap().len(), 1);
    // Logs keep the newest lines that fit.
    let (logs, total) = s.read_logs(r.id, epoch(), 10_000, 4 * 1024).await.unwrap();
    assert_eq!(total, 1000);
    assert_eq!(
        logs.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![997, 998, 999, 1000]
    );
}

pub async fn count_runs_counts_what_list_runs_pages_through(s: Arc<dyn Store>) {
    let org = s.create_org("default", "Default").await.unwrap();
    for i in 0..5 {
        let mut r = new_run(&org.id);
        r.labels = if i % 2 == 0 {
            vec!["even".into()]
        } else {
            vec![]
        };
        s.insert_run(&r).await.unwrap();
    }
    ended_run(&*s, &org.id, 0).await;
    let pending = RunFilter {
        statuses: vec![RunStatus::Pending],
        limit: 2,
        offset: 4,
        ..Default::default()
    };
    assert_eq!(s.count_runs(&org.id, &pending).await.unwrap(), 5);
    assert_eq!(s.list_runs(&org.id, &pending).await.unwrap().len(), 1);
    let even = RunFilter {
        label: Some("even".into()),
        ..pending.clone()
    };
    assert_eq!(s.count_runs(&org.id, &even).await.unwrap(), 3);
    let all = RunFilter::default();
    assert_eq!(s.count_runs(&org.id, &all).await.unwrap(), 6);
    // By kind and by profile (the dashboard's filters).
    let mut image = new_run(&org.id);
    image.job_type = RunKind::Image;
    image.execution_type = "gpu.a100".into();
    s.insert_run(&image).await.unwrap();
    let of = |kind: Option<&str>, profile: Option<&str>| RunFilter {
        kind: kind.map(str::to_string),
        profile: profile.map(str::to_string),
        limit: 100,
        ..Default::default()
    };
    let images = s
        .list_runs(&org.id, &of(Some("image"), None))
        .await
        .unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].id, image.id);
    assert_eq!(
        s.count_runs(&org.id, &of(None, Some("gpu.a100")))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.count_runs(&org.id, &of(Some("python"), Some("gpu.a100")))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.count_runs(&org.id, &of(Some("python"), None))
            .await
            .unwrap(),
        6
    );
}

/// A key's sign-out time is kept (to the microsecond) and read with the key by its
/// hash and in the list; other keys keep none.
pub async fn a_keys_sessions_end_at_its_sign_out(s: Arc<dyn Store>) {
    let org = s.create_org("signout", "signout").await.unwrap();
    let key = |id: &str, hash: &str| crate::ApiKey {
        id: id.into(),
        org_id: org.id.clone(),
        name: id.into(),
        prefix: "lk_x".into(),
        hash: hash.into(),
        is_admin: false,
        is_active: true,
        created_at: stoa_core::time::now(),
        last_used_at: None,
        sessions_after: None,
    };
    s.insert_key(&key("key_a", "ha")).await.unwrap();
    s.insert_key(&key("key_b", "hb")).await.unwrap();
    assert_eq!(
        s.key_by_hash("ha").await.unwrap().unwrap().0.sessions_after,
        None
    );
    let at = stoa_core::time::now();
    s.end_sessions("key_a", at).await.unwrap();
    let (a, o) = s.key_by_hash("ha").await.unwrap().unwrap();
    assert_eq!(o.id, org.id);
    let kept = a.sessions_after.expect("kept");
    assert!(
        (kept - at).num_microseconds().unwrap().abs() <= 1,
        "{kept} vs {at}"
    );
    assert_eq!(
        s.key_by_hash("hb").await.unwrap().unwrap().0.sessions_after,
        None
    );
    let listed = s.list_keys().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|k| k.id == "key_a" && k.sessions_after.is_some())
    );
}

/// The earliest time, for reads without a lower bound.
fn epoch() -> crate::Time {
    chrono::DateTime::UNIX_EPOCH
}

/// The Slurm job of a run is recorded while the run is active (a bridge submitted it),
/// kept through its end, and never written on a pending or ended run.
pub async fn a_slurm_job_is_recorded_on_an_active_run(s: Arc<dyn Store>) {
    let id = queued(s.as_ref(), "slurm").await;
    s.set_slurm_job(id, "7").await.unwrap();
    assert_eq!(s.get_run(id).await.unwrap().unwrap().slurm_job_id, None);
    let token = lease_of(s.as_ref(), id, "bridge", LONG).await;
    s.set_slurm_job(id, "42").await.unwrap();
    assert_eq!(
        s.get_run(id)
            .await
            .unwrap()
            .unwrap()
            .slurm_job_id
            .as_deref(),
        Some("42")
    );
    for to in [RunStatus::Running, RunStatus::Completed] {
        s.transition(id, to, with_token(&token))
            .await
            .unwrap()
            .expect("the lease holder moves it on");
    }
    s.set_slurm_job(id, "43").await.unwrap();
    let run = s.get_run(id).await.unwrap().unwrap();
    assert_eq!(
        run.slurm_job_id.as_deref(),
        Some("42"),
        "kept after the end"
    );
}

/// Instantiates every rule of this module as a test, each over a fresh, empty store
/// from `$fresh` (an `async` expression giving `Option<(guard, Arc<dyn Store>)>`, where
/// `None` means the backend is missing here and the test says so).
#[macro_export]
macro_rules! conformance_suite {
    ($fresh:expr) => {
        #[tokio::test]
        async fn a_slurm_job_is_recorded_on_an_active_run() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::a_slurm_job_is_recorded_on_an_active_run(s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_claimers_one_lease() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::two_claimers_one_lease(s).await;
        }

        #[tokio::test]
        async fn a_stale_token_is_rejected() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::a_stale_token_is_rejected(s).await;
        }

        #[tokio::test]
        async fn an_expired_lease_is_reaped() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::an_expired_lease_is_reaped(s).await;
        }

        #[tokio::test]
        async fn controls_reach_the_worker_by_heartbeat() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::controls_reach_the_worker_by_heartbeat(s).await;
        }

        #[tokio::test]
        async fn numbered_output_is_stored_once_in_order() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::numbered_output_is_stored_once_in_order(s).await;
        }

        #[tokio::test]
        async fn a_selection_is_inserted_whole() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::a_selection_is_inserted_whole(s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_queued_limit_holds_for_concurrent_inserts() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::the_queued_limit_holds_for_concurrent_inserts(s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_due_delivery_is_claimed_once() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::a_due_delivery_is_claimed_once(s).await;
        }

        #[tokio::test]
        async fn a_restarted_worker_reaps_its_own_runs() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::a_restarted_worker_reaps_its_own_runs(s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn no_run_is_claimed_twice() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::no_run_is_claimed_twice(s).await;
        }

        #[tokio::test]
        async fn terminal_state_is_written_once() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::terminal_state_is_written_once(s).await;
        }

        #[tokio::test]
        async fn output_has_gapless_sequence_and_logs_window() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::output_has_gapless_sequence_and_logs_window(s).await;
        }

        #[tokio::test]
        async fn output_is_read_in_pages_bounded_by_lines_and_bytes() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::output_is_read_in_pages_bounded_by_lines_and_bytes(s).await;
        }

        #[tokio::test]
        async fn count_runs_counts_what_list_runs_pages_through() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::count_runs_counts_what_list_runs_pages_through(s).await;
        }

        #[tokio::test]
        async fn a_keys_sessions_end_at_its_sign_out() {
            let Some((_keep, s)) = $fresh.await else {
                return;
            };
            $crate::conformance::a_keys_sessions_end_at_its_sign_out(s).await;
        }
    };
}

/// A fresh, empty PostgreSQL database for a test: created in the cluster that
/// `STOA_TEST_DATABASE_URL` names (any database of it, as a user that may create
/// databases); its URL. `None`, saying so, when the variable is unset; under `CI=true`
/// that is a failure.
pub async fn fresh_postgres_url() -> Option<String> {
    let Ok(admin) = std::env::var("STOA_TEST_DATABASE_URL") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "STOA_TEST_DATABASE_URL is not set: PostgreSQL tests need a cluster under CI (scripts/test starts one)"
        );
        eprintln!("skipped: STOA_TEST_DATABASE_URL is not set, no PostgreSQL to test against");
        return None;
    };
    Some(
        crate::create_database(&admin, "stoa_t")
            .await
            .unwrap_or_else(|e| panic!("a test database in STOA_TEST_DATABASE_URL's cluster: {e}")),
    )
}

/// A fresh PostgreSQL store (see [`fresh_postgres_url`]).
pub async fn fresh_postgres() -> Option<((), Arc<dyn Store>)> {
    let url = fresh_postgres_url().await?;
    let s = crate::PgStore::connect(&url)
        .await
        .expect("connecting to the test database");
    Some(((), Arc::new(s)))
}
