//! Chaos, as an operator meets it: the server killed with runs active, the engine gone
//! mid-run, a full disk, a shutdown with runs and readers, the reconciler racing a
//! burst. Each ends with no run left active, no output line lost without a notice, and
//! no container or network left behind.

use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use stoa_types::RunStatus;

use super::docker_runs::engine_ready;
use super::restart::BinaryServer;
use super::*;

const IMAGE: &str = "local/busybox:full";

/// A shell loop printing `line N` every 50 ms, forever.
const IMAGE_TICKER: &str = "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.05; done";

/// The same in Python.
const PYTHON_TICKER: &str = "import time\ni = 0\nwhile True:\n    i += 1\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)\n";

fn docker_out(args: &[&str]) -> String {
    let o = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Containers and networks of an installation: (containers, networks).
fn objects_of(instance: &str) -> (usize, usize) {
    let filter = format!("label=stoa.instance={instance}");
    let containers = docker_out(&["ps", "-aq", "--filter", &filter])
        .lines()
        .count();
    let networks = docker_out(&["network", "ls", "-q", "--filter", &filter])
        .lines()
        .count();
    (containers, networks)
}

/// Waits (30 s at most) until the installation holds at most `networks` networks and
/// no container; what it holds in the end.
async fn settle(instance: &str, networks: usize) -> (usize, usize) {
    let mut held = objects_of(instance);
    for _ in 0..300 {
        if held.0 == 0 && held.1 <= networks {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = objects_of(instance);
    }
    held
}

/// The numbers of the `line N` lines of an output, checked to be 1, 2, 3, … with no
/// gap and no repeat; how many there are.
fn gapless_lines(text: &str) -> usize {
    let numbers: Vec<usize> = text
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|n| n.trim().parse().unwrap())
        .collect();
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(*n, i + 1, "line {} is missing or repeated: {text}", i + 1);
    }
    numbers.len()
}

/// Reads a metric's value from the Prometheus text of `/metrics`.
async fn metric(c: &Client, name: &str) -> Option<f64> {
    let body = c
        .raw(reqwest::Method::GET, "/metrics", None)
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn kill_9_with_python_and_image_runs_active_loses_nothing_and_leaves_nothing() {
    if !engine_ready() {
        return;
    }
    let mut server = BinaryServer::start_with(&[
        ("STOA_DOCKER__RECONCILE_INTERVAL_S", "1"),
        ("STOA_WORKER__MAX_CONCURRENT_RUNS", "8"),
    ])
    .await;
    let c = server.client.clone();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let s = c
            .start_python_json(&json!({"code": PYTHON_TICKER, "timeout": 300}))
            .await
            .unwrap();
        runs.push(s);
        let s = c
            .start_image_json(&json!({"docker_image_ref": IMAGE, "timeout": 300,
                "docker_run_cmd": ["sh", "-c", IMAGE_TICKER]}))
            .await
            .unwrap();
        runs.push(s);
    }
    for r in &runs {
        wait_output(&c, &r.streaming_url, "line 20\n").await;
    }
    let instance = server.instance();
    server.crash();
    assert!(
        objects_of(&instance).0 >= 3,
        "the image runs' containers outlive the crash"
    );
    server.restart().await;
    // The API answers at once; the containers go in the background.
    assert!(c.workloads(None).await.unwrap().is_empty(), "0 runs active");
    let mut stored = 0;
    for r in &runs {
        let rec = c.execution(&r.execution_id).await.unwrap();
        assert_status(&rec, RunStatus::SystemFailure);
        let (text, events) = read_stream(&c, &r.streaming_url, None).await;
        assert!(finished(&events).job.result.error.is_some());
        assert!(text.contains("[stoa] the server restarted"), "{text}");
        let n = gapless_lines(&text);
        assert!(n >= 5, "{text}");
        stored += n;
    }
    let held = settle(&instance, 0).await;
    assert_eq!(held, (0, 0), "no container or network is left");
    // The pass that removed them reports it once it is over.
    let mut removed = 0.0;
    for _ in 0..100 {
        removed = metric(&c, "stoa_reconciler_removed_total").await.unwrap();
        if removed >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        removed >= 6.0,
        "the reconciler reports the 3 containers and 3 networks it removed: {removed}"
    );
    eprintln!(
        "kill -9 with 6 runs active: 0 active after restart, {stored} lines stored without a gap, {removed} orphans removed, 0 left"
    );
}

/// A TCP proxy to the local engine's socket that can be cut (every connection closed,
/// nothing accepted) and restored on the same port.
struct EngineProxy {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EngineProxy {
    async fn start() -> Self {
        let mut p = EngineProxy {
            port: free_port(),
            task: None,
        };
        p.restore().await;
        p
    }

    fn host(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    async fn restore(&mut self) {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut tcp, _)) = l.accept().await {
                conns.spawn(async move {
                    if let Ok(mut unix) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                    }
                });
            }
        }));
    }

    /// Closes every connection and the listener (the connections' tasks are in the
    /// aborted task's set, which drops them).
    async fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

#[tokio::test]
async fn the_engine_cut_mid_run_fails_the_run_saying_so_and_nothing_is_left() {
    if !engine_ready() {
        return;
    }
    let mut proxy = EngineProxy::start().await;
    let host = proxy.host();
    let s = TestServer::start_with(|c| {
        c.docker.host = Some(host);
        c.docker.reconcile_interval_s = 1;
        c.docker.network_idle_s = 0;
    })
    .await;
    let r = s
        .client
        .start_image_json(&json!({"docker_image_ref": IMAGE, "timeout": 300,
            "docker_run_cmd": ["sh", "-c", IMAGE_TICKER]}))
        .await
        .unwrap();
    wait_output(&s.client, &r.streaming_url, "line 3\n").await;
    let instance = std::fs::read_to_string(s.data_dir().join("instance-id"))
        .unwrap()
        .trim()
        .to_string();
    proxy.cut().await;
    let rec = s.wait_end(&r.execution_id).await;
    assert_status(&rec, RunStatus::SystemFailure);
    let error = rec.result.error.clone().unwrap();
    assert!(
        error.starts_with("Docker engine unreachable: "),
        "the error says what happened: {error}"
    );
    assert!(!error.contains("hyper"), "{error}");
    // While the engine is away the API answers, and new image runs fail saying why.
    let r2 = s
        .client
        .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}))
        .await
        .unwrap();
    let rec2 = s.wait_end(&r2.execution_id).await;
    assert_status(&rec2, RunStatus::SystemFailure);
    assert!(
        rec2.result
            .error
            .as_deref()
            .unwrap()
            .starts_with("Docker engine unreachable: "),
        "{rec2:?}"
    );
    assert!(
        objects_of(&instance).0 >= 1,
        "the container outlived the cut"
    );
    proxy.restore().await;
    let held = settle(&instance, 0).await;
    assert_eq!(
        held,
        (0, 0),
        "once the engine is back the reconciler removes the container and the run's network"
    );
    let (text, _) = read_stream(&s.client, &r.streaming_url, None).await;
    assert!(gapless_lines(&text) >= 3);
    // And runs work again.
    let r3 = s
        .client
        .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}))
        .await
        .unwrap();
    assert_status(&s.wait_end(&r3.execution_id).await, RunStatus::Completed);
    let _ = s.stop().await;
    assert_eq!(settle(&instance, 0).await, (0, 0));
}

/// A tmpfs of `mb` MiB mounted on a new directory; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mb: u32) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            missing("root (to mount a small tmpfs)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing("mount -t tmpfs");
            return None;
        }
        Some(SmallDisk { dir })
    }

    /// Free bytes on the disk (`stat -f`).
    fn free(&self) -> u64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    }

    /// Fills the disk up to `margin` bytes: a file grows, then stops growing, so that
    /// what the server frees for itself (its reserve) is not taken again by the filler.
    /// The run's own output takes the margin.
    fn fill(&self, margin: u64) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while self.free() > margin + chunk.len() as u64 && f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_keeps_the_api_up_refuses_new_runs_and_loses_no_line_silently() {
    if !engine_ready() {
        return;
    }
    let Some(disk) = SmallDisk::mount(64) else {
        return;
    };
    let data = disk.dir.path().join("data");
    let cfg = |c: &mut Config| {
        c.data_dir = data.clone();
        c.limits.min_free_bytes = 24 * 1024 * 1024;
        // More than a checkpoint of the store's write-ahead log can take, plus what
        // the run holds back.
        c.limits.disk_reserve_bytes = 16 * 1024 * 1024;
        c.limits.max_output_bytes = 64 * 1024 * 1024;
    };
    let s = TestServer::start_with(cfg).await;
    // 20,000 lines of 100 bytes over a few seconds (more than the 1 MiB a run holds
    // back while the disk is full), then exit 0.
    let script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); printf 'line %d %090d\\n' $i 0; \
                  [ $((i % 1000)) = 0 ] && sleep 0.1; done; exit 0";
    let r = s
        .client
        .start_image_json(&json!({"docker_image_ref": IMAGE, "timeout": 300,
            "docker_run_cmd": ["sh", "-c", script]}))
        .await
        .unwrap();
    // A key never used yet: its first use is recorded (bookkeeping) on the full disk.
    let fresh = other_org(&s, "tenant-on-full-disk").await;
    wait_output(&s.client, &r.streaming_url, "line 100 ").await;
    let filler = disk.fill(256 * 1024);

    // Reads and authentication keep working.
    assert!(fresh.workloads(None).await.is_ok());
    let rec = s.client.execution(&r.execution_id).await.unwrap();
    assert!(!rec.status.is_terminal() || rec.status == RunStatus::Completed);

    // The run's process ends; its end is stored although the disk is full, with its exit code.
    let mut rec = s.client.execution(&r.execution_id).await.unwrap();
    for _ in 0..1200 {
        if rec.status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rec = s.client.execution(&r.execution_id).await.unwrap();
    }
    assert_status(&rec, RunStatus::Completed);
    assert_eq!(rec.return_code, Some(0), "the exit code is kept");

    // New runs are refused while space is low, with a clear 503.
    let mut refused = None;
    for _ in 0..50 {
        match s
            .client
            .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}))
            .await
        {
            Err(stoa_client::ClientError::Api {
                status: 503,
                detail,
            }) => {
                refused = Some(detail.to_string());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let refused = refused.expect("a new run is refused with 503 while the disk is full");
    assert!(refused.contains("limits.min_free_bytes"), "{refused}");
    assert_eq!(
        metric(&s.client, "stoa_data_dir_low_space").await,
        Some(1.0)
    );

    // Space comes back: runs are accepted again.
    std::fs::remove_file(&filler).unwrap();
    let mut accepted = None;
    for _ in 0..50 {
        match s
            .client
            .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}))
            .await
        {
            Ok(a) => {
                accepted = Some(a);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let a = accepted.expect("runs are accepted once space is back");
    assert_status(&s.wait_end(&a.execution_id).await, RunStatus::Completed);

    // Every line is stored, in order, or a notice says how many were not.
    let (text, _) = read_stream(&s.client, &r.streaming_url, None).await;
    let numbers: Vec<usize> = text
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "lines stay in order"
    );
    let missing_lines = 20_000 - numbers.len();
    let rec = s.client.execution(&r.execution_id).await.unwrap();
    if missing_lines > 0 {
        let notice = format!("[stoa] {missing_lines} lines (");
        assert!(
            text.contains(&notice),
            "{missing_lines} lines are missing and a notice says so"
        );
        assert!(rec.output_truncated, "the run is marked truncated");
    }
    eprintln!(
        "full disk: run completed with exit code 0, {} of 20000 lines stored, {missing_lines} told lost, new runs refused with 503 until space came back",
        numbers.len()
    );
    let _ = s.stop().await;
}

#[tokio::test]
async fn sigterm_keeps_the_api_up_through_the_grace_period_and_streams_get_their_end() {
    if !engine_ready() {
        return;
    }
    let mut server = BinaryServer::start_with(&[("STOA_LIMITS__SHUTDOWN_GRACE_S", "3")]).await;
    let c = server.client.clone();
    let py = c
        .start_python_json(&json!({"code": PYTHON_TICKER, "timeout": 300}))
        .await
        .unwrap();
    let img = c
        .start_image_json(&json!({"docker_image_ref": IMAGE, "timeout": 300,
            "docker_run_cmd": ["sh", "-c", IMAGE_TICKER]}))
        .await
        .unwrap();
    wait_output(&c, &py.streaming_url, "line 3\n").await;
    wait_output(&c, &img.streaming_url, "line 3\n").await;
    let instance = server.instance();
    // A reader follows the Python run through the shutdown.
    let reader = {
        let c = c.clone();
        let url = py.streaming_url.clone();
        tokio::spawn(async move { read_stream(&c, &url, None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // During the grace period: reads and aborts work; new runs are refused (they
    // would wait for the next start).
    let rec = c.execution(&img.execution_id).await.unwrap();
    assert_eq!(rec.status, RunStatus::Running);
    match c
        .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}))
        .await
    {
        Err(stoa_client::ClientError::Api {
            status: 503,
            detail,
        }) => {
            assert!(detail.to_string().contains("shutting down"), "{detail}")
        }
        other => panic!("a run submitted during shutdown: {other:?}"),
    }
    let aborted = c.abort(&img.execution_id).await;
    assert!(
        aborted.is_ok(),
        "abort during the grace period: {aborted:?}"
    );
    assert_status(
        &c.execution(&img.execution_id).await.unwrap(),
        RunStatus::Aborted,
    );

    let (text, events) = reader.await.unwrap();
    let fin = finished(&events);
    assert_eq!(fin.job.status, Some(RunStatus::SystemFailure));
    assert!(
        text.contains("[stoa] the server shut down while the run was active"),
        "the run's output says why it ended: {text}"
    );
    gapless_lines(&text);
    let exited = tokio::task::spawn_blocking(move || {
        let st = server.child.wait().unwrap();
        (server, st)
    })
    .await
    .unwrap();
    let (mut server, status) = exited;
    assert!(status.success(), "the server exits cleanly: {status}");
    assert!(run_processes(&py.execution_id).is_empty());
    assert_eq!(objects_of(&instance).0, 0, "no container is left");
    server.restart().await;
    let rec = c.execution(&py.execution_id).await.unwrap();
    assert_status(&rec, RunStatus::SystemFailure);
    assert!(rec.result.error.unwrap().contains("shut down"));
}

#[tokio::test]
async fn a_burst_with_the_reconciler_every_second_has_no_failure_and_leaves_the_pool() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start_with(|c| {
        c.docker.reconcile_interval_s = 1;
        c.docker.network_pool = 2;
        c.docker.network_idle_s = 1;
        c.limits.org_max_queued = 1000;
    })
    .await;
    let instance = std::fs::read_to_string(s.data_dir().join("instance-id"))
        .unwrap()
        .trim()
        .to_string();
    let c = Arc::new(s.client.clone());
    let ids: Vec<String> = futures::future::join_all((0..200).map(|_| {
        let c = c.clone();
        async move {
            c.start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}))
                .await
                .unwrap()
                .execution_id
        }
    }))
    .await;
    let mut by_status = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let r = wait_end(&c, id).await;
        if r.status != RunStatus::Completed {
            eprintln!("{id}: {:?} {:?}", r.status, r.result.error);
        }
        *by_status.entry(r.status.to_string()).or_default() += 1;
    }
    assert_eq!(
        by_status.get("completed").copied(),
        Some(200),
        "every run of the burst completes: {by_status:?}"
    );
    let held = settle(&instance, 2).await;
    assert_eq!(
        held,
        (0, 2),
        "after the burst only the pool's networks remain"
    );
    let passes = metric(&c, "stoa_reconciler_passes_total").await.unwrap();
    assert!(
        passes >= 2.0,
        "the reconciler ran during the burst: {passes}"
    );
    eprintln!(
        "burst: 200 image runs, {by_status:?}, {passes} reconciler passes, networks left {}",
        held.1
    );
    let _ = s.stop().await;
    assert_eq!(settle(&instance, 0).await, (0, 0));
}

#[tokio::test]
async fn a_network_removed_behind_stoas_back_is_replaced_at_the_start() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start_with(|c| c.docker.network_pool = 1).await;
    let instance = std::fs::read_to_string(s.data_dir().join("instance-id"))
        .unwrap()
        .trim()
        .to_string();
    let filter = format!("label=stoa.instance={instance}");
    let mut spare = String::new();
    for _ in 0..300 {
        spare = docker_out(&["network", "ls", "-q", "--filter", &filter]);
        if !spare.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spare = spare.trim().to_string();
    assert!(!spare.is_empty(), "the spare network is made");
    // An operator's cleanup removes it.
    assert!(
        Command::new("docker")
            .args(["network", "rm", &spare])
            .status()
            .unwrap()
            .success()
    );
    let r = s
        .client
        .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}))
        .await
        .unwrap();
    assert_status(&s.wait_end(&r.execution_id).await, RunStatus::Completed);

    // The same for a compose stack: its recycled network is removed before it starts.
    let mut spare = String::new();
    for _ in 0..300 {
        spare = docker_out(&["network", "ls", "-q", "--filter", &filter]);
        if spare.trim().lines().count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        Command::new("docker")
            .args(["network", "rm", spare.trim()])
            .status()
            .unwrap()
            .success()
    );
    let stack = format!("services:\n  job:\n    image: {IMAGE}\n    command: [\"true\"]\n");
    let r = s
        .client
        .start_compose_json(&json!({"compose_file_code": stack}))
        .await
        .unwrap();
    assert_status(&s.wait_end(&r.execution_id).await, RunStatus::Completed);
    let _ = s.stop().await;
    assert_eq!(settle(&instance, 0).await, (0, 0));
}

#[tokio::test]
async fn output_in_big_bursts_on_a_healthy_disk_is_all_stored() {
    let s = TestServer::start().await;
    // 40 lines of 60 KB at once: batches far above what a run holds back on a full disk.
    let (id, url) = s
        .start_code("import sys\nfor i in range(40):\n    sys.stdout.write(str(i).rjust(60000, 'x') + '\\n')\n")
        .await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert!(!r.output_truncated);
    assert!(
        !text.contains("could not be stored"),
        "nothing is told lost"
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 40);
    for (i, l) in lines.iter().enumerate() {
        assert!(l.len() == 60000 && l.ends_with(&i.to_string()), "line {i}");
    }
}
