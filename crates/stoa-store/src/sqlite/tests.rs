use super::*;

const LEASE: Duration = Duration::from_secs(60);

/// The lease rules of [`crate::conformance`], on this backend.
mod leases {
    use super::*;
    use crate::conformance as c;

    fn fresh() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("stoa.db")).unwrap();
        (dir, Arc::new(s))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_claimers_one_lease() {
        let (_d, s) = fresh();
        c::two_claimers_one_lease(s).await;
    }

    #[tokio::test]
    async fn a_stale_token_is_rejected() {
        let (_d, s) = fresh();
        c::a_stale_token_is_rejected(s).await;
    }

    #[tokio::test]
    async fn an_expired_lease_is_reaped() {
        let (_d, s) = fresh();
        c::an_expired_lease_is_reaped(s).await;
    }

    #[tokio::test]
    async fn controls_reach_the_worker_by_heartbeat() {
        let (_d, s) = fresh();
        c::controls_reach_the_worker_by_heartbeat(s).await;
    }

    #[tokio::test]
    async fn numbered_output_is_stored_once_in_order() {
        let (_d, s) = fresh();
        c::numbered_output_is_stored_once_in_order(s).await;
    }

    #[tokio::test]
    async fn a_selection_is_inserted_whole() {
        let (_d, s) = fresh();
        c::a_selection_is_inserted_whole(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queued_limit_holds_for_concurrent_inserts() {
        let (_d, s) = fresh();
        c::the_queued_limit_holds_for_concurrent_inserts(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_due_delivery_is_claimed_once() {
        let (_d, s) = fresh();
        c::a_due_delivery_is_claimed_once(s).await;
    }

    #[tokio::test]
    async fn a_restarted_worker_reaps_its_own_runs() {
        let (_d, s) = fresh();
        c::a_restarted_worker_reaps_its_own_runs(s).await;
    }
}

async fn store_with_org() -> (tempfile::TempDir, SqliteStore, Org) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("stoa.db")).unwrap();
    let org = s.create_org("default", "Default").await.unwrap();
    (dir, s, org)
}

#[tokio::test]
async fn the_database_files_are_private_whatever_the_umask_or_earlier_modes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("stoa.db");
    let mode = |f: &str| {
        std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let s = SqliteStore::open(&db).unwrap();
    s.create_org("default", "Default").await.unwrap();
    for f in ["stoa.db", "stoa.db-wal", "stoa.db-shm"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    drop(s);
    // Files an earlier version left readable are made private at the next open.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _s = SqliteStore::open(&db).unwrap();
    assert_eq!(mode("stoa.db"), 0o600);
}

fn new_run(org: &Org) -> NewRun {
    crate::conformance::new_run(&org.id)
}

/// Many claimers racing over one store: every run is handed out exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_run_is_claimed_twice() {
    let (_d, s, org) = store_with_org().await;
    for _ in 0..200 {
        s.insert_run(&new_run(&org)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(r) = s.claim_next(&format!("w{w}"), LEASE).await.unwrap() {
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

#[tokio::test]
async fn terminal_state_is_written_once() {
    let (_d, s, org) = store_with_org().await;
    let r = new_run(&org);
    s.insert_run(&r).await.unwrap();
    s.claim_next("w", LEASE).await.unwrap().unwrap();
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

#[tokio::test]
async fn output_has_gapless_sequence_and_logs_window() {
    let (_d, s, org) = store_with_org().await;
    let r = new_run(&org);
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

#[tokio::test]
async fn output_is_read_in_pages_bounded_by_lines_and_bytes() {
    let (_d, s, org) = store_with_org().await;
    let r = new_run(&org);
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

/// A run of `org` that ran and completed, with `lines` lines of output (`x\n`).
async fn ended_run(s: &SqliteStore, org: &Org, lines: usize) -> RunId {
    let mut r = new_run(org);
    r.callback_urls = vec!["http://127.0.0.1:9/cb".into()];
    s.insert_run(&r).await.unwrap();
    s.claim(r.id, "w", &[], Some(LEASE)).await.unwrap().unwrap();
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

/// Rows of `table` that belong to run `id`, read past every guard.
async fn rows_of(s: &SqliteStore, table: &'static str, id: RunId) -> i64 {
    s.call(move |c| {
        Ok(c.query_row(
            &format!("SELECT COUNT(*) FROM {table} WHERE run_id = ?1"),
            [id.to_string()],
            |r| r.get(0),
        )?)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn deleting_a_run_hides_its_output_at_once_and_the_purge_removes_it_in_batches() {
    let (_d, s, org) = store_with_org().await;
    let other = s.create_org("other", "Other").await.unwrap();
    let gone = ended_run(&s, &org, 10).await;
    let kept = ended_run(&s, &org, 3).await;
    let theirs = ended_run(&s, &other, 4).await;
    assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 26);
    assert_eq!(s.org_output_bytes(&other.id).await.unwrap(), 8);
    assert!(s.delete_run(gone).await.unwrap());
    // Gone for every reader, and from the org's bytes, before any row is removed.
    assert!(s.get_run(gone).await.unwrap().is_none());
    assert!(
        s.read_output(gone, 0, 100, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    let (logs, total) = s.read_logs(gone, epoch(), 100, usize::MAX).await.unwrap();
    assert!(logs.is_empty() && total == 0);
    assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 6);
    assert_eq!(rows_of(&s, "run_output", gone).await, 10);
    for t in ["run_samples", "run_gpu_samples", "callback_deliveries"] {
        assert_eq!(rows_of(&s, t, gone).await, 0, "{t}");
    }
    // Output written after the deletion is not stored.
    s.append_output(gone, &[(OutputStream::Stdout, "late\n".to_string()).into()])
        .await
        .unwrap();
    assert_eq!(rows_of(&s, "run_output", gone).await, 10);
    // Batches of at most 4 chunks: 4, 4, 2, then nothing.
    let mut batches = vec![];
    loop {
        let n = s.purge_orphan_output(4).await.unwrap();
        batches.push(n);
        if n < 4 {
            break;
        }
    }
    assert_eq!(batches, vec![4, 4, 2]);
    assert_eq!(s.purge_orphan_output(4).await.unwrap(), 0);
    assert_eq!(rows_of(&s, "run_output", gone).await, 0);
    // Other runs keep theirs.
    assert_eq!(
        s.read_output(kept, 0, 100, usize::MAX).await.unwrap().len(),
        3
    );
    assert_eq!(
        s.read_output(theirs, 0, 100, usize::MAX)
            .await
            .unwrap()
            .len(),
        4
    );
    // Deleting a run without output leaves nothing to purge.
    let quiet = ended_run(&s, &org, 0).await;
    assert!(s.delete_run(quiet).await.unwrap());
    assert_eq!(s.purge_orphan_output(4).await.unwrap(), 0);
}

#[tokio::test]
async fn prune_output_expires_runs_that_ended_before_the_cutoff_in_batches() {
    let (_d, s, org) = store_with_org().await;
    let old = ended_run(&s, &org, 5).await;
    let older = ended_run(&s, &org, 2).await;
    s.backdate_run(older, "2000-01-01T00:00:00.000000Z")
        .await
        .unwrap();
    let cutoff = stoa_core::time::now();
    let recent = ended_run(&s, &org, 3).await;
    // Running, and created before the cutoff: never pruned.
    let mut active = new_run(&org);
    active.priority = 0;
    s.insert_run(&active).await.unwrap();
    s.claim(active.id, "w", &[], Some(LEASE))
        .await
        .unwrap()
        .unwrap();
    s.append_output(
        active.id,
        &[(OutputStream::Stdout, "live\n".to_string()).into()],
    )
    .await
    .unwrap();
    s.backdate_run(active.id, "2000-01-01T00:00:00.000000Z")
        .await
        .unwrap();
    assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 25);

    // The oldest first: `older` (2 chunks) whole, then the start of `old`.
    assert_eq!(s.prune_output(cutoff, 3).await.unwrap(), 3);
    let r = s.get_run(older).await.unwrap().unwrap();
    assert!(r.output_expired);
    assert_eq!(rows_of(&s, "run_output", older).await, 0);
    // `old` is marked with its first batch: its remaining output is hidden, and
    // still counted until its rows are gone.
    assert!(s.get_run(old).await.unwrap().unwrap().output_expired);
    assert_eq!(rows_of(&s, "run_output", old).await, 4);
    assert!(
        s.read_output(old, 0, 100, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 8 + 6 + 5);
    assert_eq!(s.prune_output(cutoff, 3).await.unwrap(), 3);
    assert_eq!(s.prune_output(cutoff, 3).await.unwrap(), 1);
    assert_eq!(s.prune_output(cutoff, 3).await.unwrap(), 0);
    assert_eq!(rows_of(&s, "run_output", old).await, 0);
    assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 6 + 5);
    // The run itself stays, with its record.
    let r = s.get_run(old).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Completed);
    assert_eq!(rows_of(&s, "run_samples", old).await, 1);
    // Runs that ended after the cutoff, and active runs, keep their output.
    assert!(!s.get_run(recent).await.unwrap().unwrap().output_expired);
    assert_eq!(
        s.read_output(recent, 0, 100, usize::MAX)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        s.read_output(active.id, 0, 100, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn prune_runs_deletes_old_ended_runs_with_all_they_own() {
    let (_d, s, org) = store_with_org().await;
    let a = ended_run(&s, &org, 2).await;
    let b = ended_run(&s, &org, 3).await;
    let cutoff = stoa_core::time::now();
    let recent = ended_run(&s, &org, 1).await;
    let mut pending = new_run(&org);
    pending.priority = 0;
    s.insert_run(&pending).await.unwrap();
    s.backdate_run(pending.id, "2000-01-01T00:00:00.000000Z")
        .await
        .unwrap();
    // One run per batch, oldest first.
    assert_eq!(s.prune_runs(cutoff, 1).await.unwrap(), 1);
    assert!(s.get_run(a).await.unwrap().is_none());
    assert!(s.get_run(b).await.unwrap().is_some());
    assert_eq!(s.prune_runs(cutoff, 1).await.unwrap(), 1);
    assert_eq!(s.prune_runs(cutoff, 1).await.unwrap(), 0);
    for id in [a, b] {
        assert!(s.get_run(id).await.unwrap().is_none());
        for t in ["run_samples", "run_gpu_samples", "callback_deliveries"] {
            assert_eq!(rows_of(&s, t, id).await, 0, "{t}");
        }
    }
    assert_eq!(s.org_output_bytes(&org.id).await.unwrap(), 2);
    assert_eq!(s.purge_orphan_output(100).await.unwrap(), 5);
    assert_eq!(rows_of(&s, "run_output", a).await, 0);
    assert_eq!(rows_of(&s, "run_output", b).await, 0);
    // A recent run and a pending one (however old) stay.
    assert!(s.get_run(recent).await.unwrap().is_some());
    assert!(s.get_run(pending.id).await.unwrap().is_some());
    assert_eq!(rows_of(&s, "callback_deliveries", recent).await, 1);
}

#[tokio::test]
async fn count_runs_counts_what_list_runs_pages_through() {
    let (_d, s, org) = store_with_org().await;
    for i in 0..5 {
        let mut r = new_run(&org);
        r.labels = if i % 2 == 0 {
            vec!["even".into()]
        } else {
            vec![]
        };
        s.insert_run(&r).await.unwrap();
    }
    ended_run(&s, &org, 0).await;
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
}

/// Output stored before per-run byte counts existed is counted by the migration.
#[tokio::test]
async fn the_migration_counts_output_already_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stoa.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .unwrap();
        for (v, sql) in &MIGRATIONS[..5] {
            c.execute_batch(sql).unwrap();
            c.execute(
                "INSERT INTO schema_migrations VALUES (?1, ?2)",
                params![v, now()],
            )
            .unwrap();
        }
        c.execute_batch(
            "INSERT INTO orgs VALUES ('o', 'o', 'o', '2000-01-01T00:00:00Z');
             INSERT INTO runs (id, org_id, status, job_type, execution_type, spec, timeout_s, created_at)
                VALUES ('0190a0a0-0000-7000-8000-000000000001', 'o', 'completed', 'python', 'cpu', '{}', 60, '2000-01-01T00:00:00Z');
             INSERT INTO run_output (run_id, seq, stream, content, ts)
                VALUES ('0190a0a0-0000-7000-8000-000000000001', 1, 'stdout', 'héllo\n', '2000-01-01T00:00:00Z'),
                       ('0190a0a0-0000-7000-8000-000000000001', 2, 'stdout', 'x\n', '2000-01-01T00:00:00Z');",
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    // Bytes, not characters: "é" is two.
    assert_eq!(s.org_output_bytes(&OrgId("o".into())).await.unwrap(), 9);
    assert_eq!(
        s.prune_output(stoa_core::time::now(), 100).await.unwrap(),
        2
    );
    assert_eq!(s.org_output_bytes(&OrgId("o".into())).await.unwrap(), 0);
}

/// Migration 0009 counts the runs already pending: an org at its queued limit before the
/// upgrade is at it after.
#[tokio::test]
async fn the_migration_counts_runs_already_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stoa.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .unwrap();
        for (v, sql) in &MIGRATIONS[..8] {
            c.execute_batch(sql).unwrap();
            c.execute(
                "INSERT INTO schema_migrations VALUES (?1, ?2)",
                params![v, now()],
            )
            .unwrap();
        }
        c.execute_batch(
            "INSERT INTO orgs VALUES ('o', 'o', 'o', '2000-01-01T00:00:00Z');
             INSERT INTO runs (id, org_id, status, job_type, execution_type, spec, timeout_s, created_at)
                VALUES ('0190a0a0-0000-7000-8000-000000000001', 'o', 'pending', 'python', 'cpu', '{}', 60, '2000-01-01T00:00:00Z'),
                       ('0190a0a0-0000-7000-8000-000000000002', 'o', 'pending', 'python', 'cpu', '{}', 60, '2000-01-01T00:00:00Z'),
                       ('0190a0a0-0000-7000-8000-000000000003', 'o', 'completed', 'python', 'cpu', '{}', 60, '2000-01-01T00:00:00Z');",
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.migrated().from, 8);
    let org = OrgId("o".into());
    assert_eq!(
        s.insert_run_within(&crate::conformance::new_run(&org), 2)
            .await
            .unwrap(),
        Inserted::OverLimit { queued: 2 }
    );
    assert_eq!(
        s.insert_run_within(&crate::conformance::new_run(&org), 3)
            .await
            .unwrap(),
        Inserted::New
    );
}

/// The earliest time, for reads without a lower bound.
fn epoch() -> Time {
    chrono::DateTime::UNIX_EPOCH
}
