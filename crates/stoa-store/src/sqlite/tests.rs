use super::*;

const LEASE: Duration = Duration::from_secs(60);

/// The rules of [`crate::conformance`], on this backend.
mod conformance {
    use super::*;

    async fn fresh() -> Option<(tempfile::TempDir, Arc<dyn Store>)> {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("stoa.db")).unwrap();
        Some((dir, Arc::new(s)))
    }

    crate::conformance_suite!(fresh());
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

async fn ended_run(s: &SqliteStore, org: &Org, lines: usize) -> RunId {
    crate::conformance::ended_run(s, &org.id, lines).await
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
    s.backdate_run(
        older,
        stoa_core::time::parse("2000-01-01T00:00:00Z").unwrap(),
    )
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
    s.backdate_run(
        active.id,
        stoa_core::time::parse("2000-01-01T00:00:00Z").unwrap(),
    )
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
    s.backdate_run(
        pending.id,
        stoa_core::time::parse("2000-01-01T00:00:00Z").unwrap(),
    )
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
