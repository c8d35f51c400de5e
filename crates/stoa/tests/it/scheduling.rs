//! Scheduling through the real server: capacity, queue places, priorities, org limits,
//! fair share, the queued limit and idempotency keys.

use serde_json::json;
use stoa_client::Client;
use stoa_types::RunStatus;

use super::*;

fn profile_of(slots: usize) -> impl FnOnce(&mut stoa_server::Config) {
    move |c| {
        c.profiles[0].slots = Some(slots);
    }
}

async fn start(c: &Client, body: serde_json::Value) -> String {
    c.start_python_json(&body).await.unwrap().execution_id
}

/// Waits until a run has started.
async fn wait_running(c: &Client, id: &str) {
    for _ in 0..300 {
        if c.execution(id).await.unwrap().status == RunStatus::Running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id} did not start");
}

/// Start times of runs, in the order they started.
async fn start_order(c: &Client, ids: &[String]) -> Vec<String> {
    let mut with_start = Vec::new();
    for id in ids {
        let r = wait_end(c, id).await;
        assert_eq!(r.status, RunStatus::Completed, "{r:?}");
        with_start.push((r.job_start.unwrap(), id.clone()));
    }
    with_start.sort();
    with_start.into_iter().map(|(_, id)| id).collect()
}

#[tokio::test]
async fn ten_runs_on_a_profile_that_holds_two() {
    let s = TestServer::start_with(profile_of(2)).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            start(
                &s.client,
                json!({"code": format!("import time\ntime.sleep(0.6)\nprint({i})")}),
            )
            .await,
        );
    }
    let mut max_running = 0;
    let mut saw_places = std::collections::BTreeSet::new();
    loop {
        let all = s.client.workloads(None).await.unwrap();
        if all.is_empty() {
            break;
        }
        let running = all
            .iter()
            .filter(|r| matches!(r.status, RunStatus::Running | RunStatus::Starting))
            .count();
        max_running = max_running.max(running);
        for r in all.iter().filter(|r| r.status == RunStatus::Pending) {
            let reason = r.pending_reason.clone().unwrap_or_default();
            // Just accepted: the scheduler has not placed it in the queue yet.
            if reason.starts_with("queued: ") {
                continue;
            }
            assert!(
                reason.starts_with("waiting for cpu: ") && reason.ends_with(" in queue"),
                "{reason}"
            );
            saw_places.insert(reason.split(", ").nth(1).unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(max_running, 2, "never more than two running");
    assert!(
        saw_places.contains("1st in queue") && saw_places.contains("8th in queue"),
        "{saw_places:?}"
    );
    for id in &ids {
        assert_status(&s.wait_end(id).await, RunStatus::Completed);
    }
}

#[tokio::test]
async fn priorities_are_respected() {
    let s = TestServer::start_with(profile_of(1)).await;
    let blocker = start(&s.client, json!({"code": "import time\ntime.sleep(5)"})).await;
    wait_running(&s.client, &blocker).await;
    let low = start(&s.client, json!({"code": "print('low')", "priority": 10})).await;
    let normal = start(&s.client, json!({"code": "print('normal')"})).await;
    let high = start(&s.client, json!({"code": "print('high')", "priority": 90})).await;
    let r = s.client.execution(&high).await.unwrap();
    assert_eq!(r.priority, 90);
    assert!(r.pending_reason.unwrap().ends_with("1st in queue"));
    assert!(
        s.client
            .execution(&low)
            .await
            .unwrap()
            .pending_reason
            .unwrap()
            .ends_with("3rd in queue")
    );
    let order = start_order(
        &s.client,
        &[blocker.clone(), low.clone(), normal.clone(), high.clone()],
    )
    .await;
    assert_eq!(order, vec![blocker, high, normal, low]);
    // Out of range is a 422.
    let e = s
        .client
        .start_python_json(&json!({"code": "x", "priority": 101}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(422));
}

#[tokio::test]
async fn an_org_at_its_limit_waits_while_another_orgs_run_starts() {
    let s = TestServer::start_with(|c| {
        c.profiles[0].slots = Some(4);
        c.limits.org_max_running = 1;
    })
    .await;
    let b = other_org(&s, "team-b").await;
    let a1 = start(&s.client, json!({"code": "import time\ntime.sleep(10)"})).await;
    wait_running(&s.client, &a1).await;
    let a2 = start(&s.client, json!({"code": "print('a2')"})).await;
    let b1 = start(&b, json!({"code": "print('b1')"})).await;
    let rb = wait_end(&b, &b1).await;
    assert_status(&rb, RunStatus::Completed);
    let ra2 = s.client.execution(&a2).await.unwrap();
    assert_eq!(
        ra2.status,
        RunStatus::Pending,
        "org a is at its limit while b ran"
    );
    assert_eq!(
        ra2.pending_reason.as_deref(),
        Some("org limit: 1 of 1 running")
    );
    let order = start_order(&s.client, &[a1.clone(), a2.clone()]).await;
    assert_eq!(order, vec![a1, a2]);
}

#[tokio::test]
async fn two_orgs_sharing_a_profile_take_turns() {
    let s = TestServer::start_with(profile_of(1)).await;
    let b = other_org(&s, "team-b").await;
    let blocker = start(&s.client, json!({"code": "import time\ntime.sleep(5)"})).await;
    wait_running(&s.client, &blocker).await;
    let mut a_runs = Vec::new();
    let mut b_runs = Vec::new();
    for i in 0..3 {
        a_runs.push(start(&s.client, json!({"code": format!("print('a{i}')")})).await);
    }
    for i in 0..3 {
        b_runs.push(start(&b, json!({"code": format!("print('b{i}')")})).await);
    }
    wait_end(&s.client, &blocker).await;
    let mut starts = Vec::new();
    for (org, c, ids) in [("a", &s.client, &a_runs), ("b", &b, &b_runs)] {
        for id in ids {
            let r = wait_end(c, id).await;
            starts.push((r.job_start.unwrap(), org));
        }
    }
    starts.sort();
    let orgs: Vec<&str> = starts.iter().map(|(_, o)| *o).collect();
    assert_eq!(
        orgs,
        vec!["b", "a", "b", "a", "b", "a"],
        "after org a's blocker, the orgs alternate"
    );
}

#[tokio::test]
async fn the_queued_limit_gives_429_and_idempotency_keys_return_the_same_run() {
    let s = TestServer::start_with(|c| {
        c.worker.enabled = false;
        c.limits.org_max_queued = 2;
    })
    .await;
    let first = s
        .client
        .start_python_json(&json!({"code": "print(1)", "idempotency_key": "nightly-2026-11-30"}))
        .await
        .unwrap();
    let again = s
        .client
        .start_python_json(&json!({"code": "print(1)", "idempotency_key": "nightly-2026-11-30"}))
        .await
        .unwrap();
    assert_eq!(
        first.execution_id, again.execution_id,
        "the same key returns the first run"
    );
    let other = s
        .client
        .start_python_json(&json!({"code": "print(2)", "idempotency_key": "other"}))
        .await
        .unwrap();
    assert_ne!(other.execution_id, first.execution_id);
    let r = s
        .client
        .raw(
            reqwest::Method::POST,
            "/api/v2/external/execution/streaming/start",
            Some(json!({"code": "print(3)"}).to_string().into()),
        )
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["detail"].as_str().unwrap().contains("2 of 2 runs queued"),
        "{v}"
    );
    // A retry with a known key still gets its run at the limit (nothing new is queued).
    let again = s
        .client
        .start_python_json(&json!({"code": "print(2)", "idempotency_key": "other"}))
        .await
        .unwrap();
    assert_eq!(again.execution_id, other.execution_id);
    // Another org has its own queue.
    let b = other_org(&s, "team-b").await;
    assert!(
        b.start_python_json(&json!({"code": "print(4)"}))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn gpu_profiles_wait_for_gpus_and_get_them_one_run_at_a_time() {
    let s = TestServer::start_with(|c| {
        c.worker.gpu_ids = vec!["0".into(), "1".into()];
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "gpu.fake".into(),
            gpu_count: 1,
            ..Default::default()
        });
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "gpu.big".into(),
            gpu_count: 4,
            ..Default::default()
        });
    })
    .await;
    let code = "import os, time\nprint(os.environ['CUDA_VISIBLE_DEVICES'])\ntime.sleep(1)";
    let ids: Vec<String> = futures::future::join_all((0..3).map(|_| {
        start(
            &s.client,
            json!({"code": code, "execution_type": "gpu.fake"}),
        )
    }))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = s.client.execution(&ids[2]).await.unwrap();
    if third.status == RunStatus::Pending {
        assert!(
            third
                .pending_reason
                .unwrap()
                .starts_with("waiting for gpu.fake: 2 of 2 GPUs in use")
        );
    }
    let mut seen = Vec::new();
    for id in &ids {
        let r = s.wait_end(id).await;
        assert_status(&r, RunStatus::Completed);
        assert_eq!(r.gpu_ids.len(), 1);
        assert_eq!(r.stdout.trim(), r.gpu_ids[0]);
        seen.push((
            r.job_start.clone().unwrap(),
            r.job_end.clone().unwrap(),
            r.gpu_ids[0].clone(),
        ));
    }
    // Two runs never held the same GPU at the same time.
    for (i, a) in seen.iter().enumerate() {
        for b in &seen[i + 1..] {
            let overlap = a.0 < b.1 && b.0 < a.1;
            assert!(!(overlap && a.2 == b.2), "{a:?} and {b:?} shared a GPU");
        }
    }
    let cpu = start(
        &s.client,
        json!({"code": "import os\nprint(repr(os.environ['CUDA_VISIBLE_DEVICES']))"}),
    )
    .await;
    assert_eq!(s.wait_end(&cpu).await.stdout, "''\n", "CPU runs see no GPU");
    let big = start(
        &s.client,
        json!({"code": "print(1)", "execution_type": "gpu.big"}),
    )
    .await;
    let r = s.client.execution(&big).await.unwrap();
    assert_eq!(r.status, RunStatus::Pending);
    assert!(
        r.pending_reason
            .unwrap()
            .contains("no worker has the GPUs gpu.big needs")
    );
}

fn two_cpu_profiles(c: &mut stoa_server::Config) {
    c.profiles = vec![
        stoa_server::config::ProfileConfig {
            name: "cpu.1".into(),
            cpus: Some(1.0),
            price_per_hour: 3.6,
            ..Default::default()
        },
        stoa_server::config::ProfileConfig {
            name: "cpu.2".into(),
            cpus: Some(2.0),
            price_per_hour: 7.2,
            ..Default::default()
        },
    ];
}

/// A selection names the GPU profiles when there are some (the CPU ones only when
/// asked), and stopping its parent stops every profile's run gracefully.
#[tokio::test]
async fn gpu_selection_skips_cpu_profiles_unless_asked_and_stop_stops_every_profile() {
    let s = TestServer::start_with(|c| {
        // Profiles that reserve no cores, so all three children run at once.
        c.profiles = ["cpu.a", "cpu.b"]
            .map(|name| stoa_server::config::ProfileConfig {
                name: name.into(),
                ..Default::default()
            })
            .to_vec();
        c.worker.gpu_ids = vec!["0".into(), "1".into()];
        c.worker.stop_grace_s = 5;
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "gpu.fake".into(),
            gpu_count: 1,
            ..Default::default()
        });
    })
    .await;
    let code = "import signal, sys, time\n\
                def bye(*_):\n    print('stopping', flush=True)\n    sys.exit(0)\n\
                signal.signal(signal.SIGTERM, bye)\n\
                print('up', flush=True)\ntime.sleep(120)\n";
    let profiles_of = |st: &serde_json::Value| -> Vec<String> {
        let mut p: Vec<String> = st["profiling_results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["profile"].as_str().unwrap().to_string())
            .collect();
        p.sort();
        p
    };
    let started = s
        .client
        .start_selection(&json!({"code": code}))
        .await
        .unwrap();
    let gpu_only = started["execution_id"].as_str().unwrap().to_string();
    let st = s.client.selection_status(&gpu_only).await.unwrap();
    assert_eq!(profiles_of(&st), vec!["gpu.fake"], "{st}");
    s.client.abort(&gpu_only).await.unwrap();

    let started = s
        .client
        .start_selection(&json!({"code": code, "include_cpu": true}))
        .await
        .unwrap();
    let id = started["execution_id"].as_str().unwrap().to_string();
    let st = s.client.selection_status(&id).await.unwrap();
    assert_eq!(profiles_of(&st), vec!["cpu.a", "cpu.b", "gpu.fake"], "{st}");
    let children: Vec<String> = st["profiling_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["execution_id"].as_str().unwrap().to_string())
        .collect();
    for c in &children {
        let mut up = false;
        for _ in 0..300 {
            if s.client.execution(c).await.unwrap().stdout.contains("up") {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            up,
            "child {c} never started: {:?}",
            s.client.execution(c).await.unwrap()
        );
    }
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    for c in &children {
        let r = s.client.execution(c).await.unwrap();
        assert_status(&r, RunStatus::Cancelled);
        assert_eq!(
            r.stdout, "up\nstopping\n",
            "each profile's run was stopped, not killed"
        );
        assert!(run_processes(c).is_empty());
    }
    let st = s.client.selection_status(&id).await.unwrap();
    assert_eq!(st["status"], "cancelled", "{st}");
    // A wrong type is a 422 that names the field.
    let e = s
        .client
        .start_selection(&json!({"code": "print(1)", "include_cpu": "yes"}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(422));
    assert!(e.to_string().contains("include_cpu"), "{e}");
}

async fn selection_done(c: &Client, id: &str) -> serde_json::Value {
    for _ in 0..600 {
        let s = c.selection_status(id).await.unwrap();
        if !matches!(
            s["status"].as_str(),
            Some("pending" | "starting" | "running")
        ) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("selection {id} did not end");
}

#[tokio::test]
async fn gpu_selection_across_two_cpu_profiles_recommends_one() {
    let s = TestServer::start_with(two_cpu_profiles).await;
    let started = s
        .client
        .start_selection(&json!({"code": "import os, time\ntime.sleep(0.3)\nprint('on', os.environ['STOA_HARDWARE_PROFILE'])"}))
        .await
        .unwrap();
    let id = started["execution_id"].as_str().unwrap().to_string();
    assert!(
        started["message"]
            .as_str()
            .unwrap()
            .contains("cpu.1, cpu.2")
    );
    let st = selection_done(&s.client, &id).await;
    assert_eq!(st["status"], "completed", "{st}");
    let results = st["profiling_results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(r["status"], "completed");
        let t = r["execution_time"].as_f64().unwrap();
        // From the stored start, written once the process runs: under load (or over a
        // database's round trips) a little of the sleep may come before it.
        assert!(t >= 0.25, "{r}");
        let price = if r["profile"] == "cpu.1" { 3.6 } else { 7.2 };
        assert!(
            (r["cost"].as_f64().unwrap() - t * price / 3600.0).abs() < 1e-5,
            "{r}"
        );
        let child = s
            .client
            .execution(r["execution_id"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(child.parent_execution_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            child.stdout,
            format!("on {}\n", r["profile"].as_str().unwrap())
        );
    }
    let sel = &st["selection_results"];
    for k in ["best", "fastest", "cheapest"] {
        assert!(
            ["cpu.1", "cpu.2"].contains(&sel[k].as_str().unwrap()),
            "{sel}"
        );
    }
    assert_eq!(sel["metrics"]["cpu.1"]["status"], "completed");
    assert_eq!(st["metadata"]["selection_results"], st["selection_results"]);
    assert_eq!(st["system_errors"], json!([]));

    // The stoa CLI shows the comparison and names the recommendation.
    let w = tempfile::tempdir().unwrap();
    std::fs::write(w.path().join("bench.py"), "print('x')\n").unwrap();
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["gpu", "select", "bench.py"])
        .current_dir(w.path())
        .env("STOA_URL", s.client.base())
        .env("STOA_API_KEY", ADMIN_KEY)
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.starts_with("PROFILE") && out.contains("cpu.2") && out.contains("Recommendation: cpu."),
        "{out}"
    );
}

#[tokio::test]
async fn a_failing_profile_is_a_system_error_and_aborting_the_parent_aborts_children() {
    let s = TestServer::start_with(two_cpu_profiles).await;
    let started = s
        .client
        .start_selection(&json!({"code": "import os, sys\nsys.exit(3 if os.environ['STOA_HARDWARE_PROFILE'] == 'cpu.2' else 0)"}))
        .await
        .unwrap();
    let st = selection_done(&s.client, started["execution_id"].as_str().unwrap()).await;
    assert_eq!(st["status"], "completed", "one profile completed: {st}");
    let errors = st["system_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{st}");
    assert!(
        errors[0].as_str().unwrap().starts_with("cpu.2: failed"),
        "{errors:?}"
    );
    assert_eq!(st["selection_results"]["best"], "cpu.1");

    let started = s
        .client
        .start_selection(&json!({"code": "import time\nprint('up', flush=True)\ntime.sleep(60)", "profiles": ["cpu.1", "cpu.2"]}))
        .await
        .unwrap();
    let id = started["execution_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let reply = s.client.abort(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    let st = s.client.selection_status(&id).await.unwrap();
    assert_eq!(st["status"], "aborted");
    for r in st["profiling_results"].as_array().unwrap() {
        assert_eq!(r["status"], "aborted", "{r}");
        assert!(run_processes(r["execution_id"].as_str().unwrap()).is_empty());
    }
    // Unknown profiles are a 422.
    let e = s
        .client
        .start_selection(&json!({"code": "print(1)", "profiles": ["gpu.h100"]}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(422));
}
