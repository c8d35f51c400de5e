//! Image runs on the real Docker engine, with images built locally
//! (`scripts/ci/make-busybox-image.sh`).

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use stoa_types::RunStatus;

use super::*;

const IMAGE: &str = "local/busybox:full";

/// Runs the docker CLI; returns (success, stdout+stderr).
pub fn docker(args: &[&str]) -> (bool, String) {
    docker_with(args, None)
}

fn docker_with(args: &[&str], config_dir: Option<&std::path::Path>) -> (bool, String) {
    let mut c = Command::new("docker");
    c.args(args);
    if let Some(d) = config_dir {
        c.env("DOCKER_CONFIG", d);
    }
    match c.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// True when the engine and the test image are there; says so otherwise.
pub fn engine_ready() -> bool {
    if !docker(&["info"]).0 {
        missing("a running Docker engine");
        return false;
    }
    if !docker(&["image", "inspect", IMAGE]).0 {
        missing("the local/busybox:full image (scripts/ci/make-busybox-image.sh)");
        return false;
    }
    true
}

/// Containers still labelled with the run.
fn leftovers(id: &str) -> String {
    let filter = format!("label=stoa.run={id}");
    docker(&["ps", "-aq", "--filter", &filter])
        .1
        .trim()
        .to_string()
}

/// Waits until the installation holds no network beyond its spares (run networks are
/// removed in the background once their container is gone).
async fn networks_settle(s: &TestServer) {
    let instance = std::fs::read_to_string(s.data_dir().join("instance-id"))
        .unwrap()
        .trim()
        .to_string();
    let filter = format!("label=stoa.instance={instance}");
    let mut count = 0;
    for _ in 0..300 {
        let (_, out) = docker(&["network", "ls", "-q", "--filter", &filter]);
        count = out.lines().count();
        if count <= s.spares {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{count} networks remain; only the {} spares should",
        s.spares
    );
}

#[tokio::test]
async fn spare_networks_are_made_ahead_recycled_and_removed_at_shutdown() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start_with(|c| {
        c.docker.network_pool = 2;
        c.docker.network_idle_s = 1;
    })
    .await;
    let instance = std::fs::read_to_string(s.data_dir().join("instance-id"))
        .unwrap()
        .trim()
        .to_string();
    let filter = format!("label=stoa.instance={instance}");
    let networks = || {
        let mut v: Vec<String> = docker(&[
            "network",
            "ls",
            "--format",
            "{{.Name}}",
            "--filter",
            &filter,
        ])
        .1
        .lines()
        .map(str::to_string)
        .collect();
        v.sort();
        v
    };
    for _ in 0..300 {
        if networks().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = networks();
    assert_eq!(before.len(), 2, "two spares are made at start");
    for _ in 0..3 {
        let (id, _) = start_image(
            &s,
            json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}),
        )
        .await;
        assert_status(&s.wait_end(&id).await, RunStatus::Completed);
        networks_settle(&s).await;
    }
    // Two runs at once: each has its own network; afterwards the pool shrinks back.
    let (a, _) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}),
    )
    .await;
    let (b, _) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"]}),
    )
    .await;
    assert_status(&s.wait_end(&a).await, RunStatus::Completed);
    assert_status(&s.wait_end(&b).await, RunStatus::Completed);
    networks_settle(&s).await;
    assert_eq!(
        networks(),
        before,
        "runs used the spares, which came back: no network was made or removed"
    );
    let _dir = s.stop().await;
    assert!(networks().is_empty(), "spares are removed at shutdown");
}

async fn start_image(s: &TestServer, body: Value) -> (String, String) {
    let r = s
        .client
        .start_image_json(&body)
        .await
        .expect("image run accepted");
    (r.execution_id, r.streaming_url)
}

#[tokio::test]
async fn env_exit_code_and_separate_streams() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let (id, url) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", "echo value=$FOO; echo to-stderr >&2; exit 5"],
               "docker_run_env": "FOO=bar\nMULTI=a=b\nBADVAR", "execution_type": "cpu", "timeout": 60}),
    )
    .await;
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert!(text.contains("value=bar\n"), "{text}");
    assert!(
        text.contains("skipped docker_run_env entry without '=': 'BADVAR'"),
        "{text}"
    );
    assert_eq!(finished(&events).job.result.return_code, Some(5));
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.return_code, Some(5));
    assert_eq!(r.stderr, "to-stderr\n");
    assert!(r.stdout.contains("value=bar\n"));
    assert_eq!(r.job_type, "image");
    assert_eq!(leftovers(&id), "", "the container is removed");
    networks_settle(&s).await;
}

/// All an image run printed is kept, to its last line, however fast it printed just
/// before it ended: its container (and the engine's log of it) is removed only once
/// that output was read.
#[tokio::test]
async fn an_image_runs_output_is_kept_to_the_last_line() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (id, _) = start_image(
            &s,
            json!({"docker_image_ref": IMAGE, "execution_type": "cpu", "timeout": 120,
                   "docker_run_cmd": ["sh", "-c", "seq 1 40000; seq 1 20000 >&2; echo last line"]}),
        )
        .await;
        ids.push(id);
    }
    for id in ids {
        let r = s.wait_end(&id).await;
        assert_status(&r, RunStatus::Completed);
        assert_counted(&r.stdout, 40000, Some("last line"), "stdout");
        assert_counted(&r.stderr, 20000, None, "stderr");
        assert_eq!(leftovers(&id), "", "the container is removed");
    }
}

#[tokio::test]
async fn image_default_command_runs_without_docker_run_cmd() {
    if !engine_ready() {
        return;
    }
    let tag = "local/stoa-test-default:1";
    if !docker(&["image", "inspect", tag]).0 {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("Dockerfile"),
            format!("FROM {IMAGE}\nCMD [\"echo\", \"default command ran\"]\n"),
        )
        .unwrap();
        let (ok, out) = docker(&["build", "-q", "-t", tag, &d.path().display().to_string()]);
        assert!(ok, "building the test image: {out}");
    }
    let s = TestServer::start().await;
    let (id, url) = start_image(&s, json!({"docker_image_ref": tag})).await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "default command ran\n");
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
}

#[tokio::test]
async fn timeout_kills_the_container() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let (id, _) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sleep", "60"], "timeout": 1}),
    )
    .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.result.error.as_deref(), Some("timeout after 1 s"));
    assert_eq!(leftovers(&id), "");
}

#[tokio::test]
async fn abort_kills_and_removes_the_container_before_it_answers() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let (id, url) = start_image(&s, json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", "echo started; sleep 60"]})).await;
    wait_output(&s.client, &url, "started").await;
    assert_ne!(
        leftovers(&id),
        "",
        "the container exists while the run runs"
    );
    let t = Instant::now();
    let reply = s.client.abort(&id).await.unwrap();
    let took = t.elapsed();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    // Not the graceful stop's timeout: the container is killed at once.
    assert!(took < Duration::from_secs(10), "abort took {took:?}");
    assert_eq!(leftovers(&id), "", "no container is left");
    networks_settle(&s).await;
}

#[tokio::test]
async fn stop_runs_the_sigterm_handler_and_keeps_its_output() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let script =
        "trap 'echo got TERM, saving; exit 0' TERM; echo ready; while true; do sleep 0.2; done";
    let (id, url) = start_image(&s, json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", script], "graceful_timeout": 5})).await;
    wait_output(&s.client, &url, "ready").await;
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    let r = s.client.execution(&id).await.unwrap();
    assert!(r.stdout.contains("got TERM, saving"), "{}", r.stdout);
    assert_eq!(r.return_code, Some(0));
    assert_eq!(leftovers(&id), "");
}

#[tokio::test]
async fn out_of_memory_fails_the_run() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start_with(|c| {
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "cpu.small".into(),
            memory_mb: Some(64),
            cpus: Some(0.5),
            pids_limit: Some(64),
            ..Default::default()
        });
    })
    .await;
    let (id, _) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "execution_type": "cpu.small",
               "docker_run_cmd": ["sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; tail /dev/zero"]}),
    )
    .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.result.error.as_deref(), Some("out of memory"));
    assert_eq!(r.return_code, Some(137));
    assert!(
        r.stdout.starts_with("67108864"),
        "the profile's limit is applied: {}",
        r.stdout
    );
    assert_eq!(leftovers(&id), "");
}

#[tokio::test]
async fn runs_get_their_own_network() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let (a, a_url) = start_image(&s, json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", "echo ip=$(hostname -i); httpd -f -p 8080 -h /etc"]})).await;
    let mut st = s.client.stream(&a_url, None).await.unwrap();
    let mut ip = String::new();
    while let Some(ev) = st.next().await {
        if let StreamEvent::Output(o) = ev.unwrap().event
            && let Some(v) = o.content.trim().strip_prefix("ip=")
        {
            ip = v.to_string();
            break;
        }
    }
    assert!(!ip.is_empty());
    let probe = format!(
        "wget -T 3 -q -O - http://{ip}:8080/hostname && echo reachable || echo unreachable"
    );
    let (b, _) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", probe]}),
    )
    .await;
    let rb = s.wait_end(&b).await;
    assert_eq!(
        rb.stdout, "unreachable\n",
        "another run's container is not reachable"
    );
    s.client.abort(&a).await.unwrap();

    let s = TestServer::start_with(|c| c.docker.network = false).await;
    let (c, _) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", "ls /sys/class/net"]}),
    )
    .await;
    assert_eq!(
        s.wait_end(&c).await.stdout,
        "lo\n",
        "networking off: only loopback"
    );
}

#[tokio::test]
async fn org_storage_is_mounted_listed_and_private() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let up = s
        .client
        .raw(
            reqwest::Method::POST,
            "/api/v2/external/storage/upload?key=inputs/data.txt",
            Some("uploaded data".into()),
        )
        .await
        .unwrap();
    assert_eq!(up.status().as_u16(), 200);
    let (id, _) = start_image(
        &s,
        json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", "cat /mnt/s3/inputs/data.txt; echo; mkdir -p /mnt/s3/out && echo result-1 > /mnt/s3/out/r.txt"]}),
    )
    .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "uploaded data\n");
    // A later run sees what the first one kept.
    let (id2, _) = start_image(&s, json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["cat", "/data/out/r.txt"], "s3_mount_path": "/data"})).await;
    assert_eq!(s.wait_end(&id2).await.stdout, "result-1\n");
    assert_eq!(
        storage_keys(&s.client).await,
        vec!["inputs/data.txt", "out/r.txt"]
    );
    let body = s
        .client
        .raw(
            reqwest::Method::GET,
            "/api/v2/external/storage/download/out/r.txt",
            None,
        )
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "result-1\n");
    let bad = s
        .client
        .raw(
            reqwest::Method::POST,
            "/api/v2/external/storage/upload?key=../escape.txt",
            Some("x".into()),
        )
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 422);

    // Another org sees none of it, in the API or in its runs.
    let store = s.handle.as_ref().unwrap().store.clone();
    let org = store.create_org("team-s", "S").await.unwrap();
    let secret = stoa_server::auth::generate_key();
    store
        .insert_key(&stoa_server::auth::key_record(&secret, &org, "s", false))
        .await
        .unwrap();
    let other = stoa_client::Client::new(s.client.base(), &secret);
    let list: Value = other
        .raw(
            reqwest::Method::GET,
            "/api/v2/external/storage/list-files",
            None,
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["files"], json!([]));
    let dl = other
        .raw(
            reqwest::Method::GET,
            "/api/v2/external/storage/download/out/r.txt",
            None,
        )
        .await
        .unwrap();
    assert_eq!(dl.status().as_u16(), 404);
    let r = other
        .start_image_json(&json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", "ls -A /mnt/s3 | wc -l"]}))
        .await
        .unwrap();
    assert_eq!(wait_end(&other, &r.execution_id).await.stdout.trim(), "0");
}

#[tokio::test]
async fn missing_image_fails_with_the_engine_message() {
    if !engine_ready() {
        return;
    }
    // Nothing listens there; the registry is allowed so that the engine tries it.
    let s =
        TestServer::start_with(|c| c.docker.allowed_registries = vec!["127.0.0.1:9".into()]).await;
    let (id, _) = start_image(
        &s,
        json!({"docker_image_ref": "127.0.0.1:9/stoa/no-such-image:1"}),
    )
    .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert!(
        r.result
            .error
            .as_deref()
            .unwrap()
            .starts_with("pulling 127.0.0.1:9/stoa/no-such-image:1 failed"),
        "{r:?}"
    );
}

#[tokio::test]
async fn gpu_profile_without_nvidia_runtime_is_a_clean_system_failure() {
    if !engine_ready() {
        return;
    }
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("SKIPPED: this host has an NVIDIA GPU; scripts/gpu-check.sh covers it");
        return;
    }
    // The worker is told it has GPU 0 (as NVML discovery would on a GPU machine), so
    // the scheduler places the run and the engine is asked for that device.
    let s = TestServer::start_with(|c| {
        c.worker.gpu_ids = vec!["0".into()];
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "gpu.test".into(),
            gpu_count: 1,
            gpu_model: Some("test".into()),
            ..Default::default()
        });
    })
    .await;
    let (id, _) = start_image(&s, json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["true"], "execution_type": "gpu.test"})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::SystemFailure);
    assert!(
        r.result
            .error
            .as_deref()
            .unwrap()
            .contains("could not select device driver"),
        "{r:?}"
    );
    assert_eq!(leftovers(&id), "", "nothing is left behind");
}

#[tokio::test]
async fn engine_unreachable_is_a_system_failure_and_the_api_still_answers() {
    let s = TestServer::start_with(|c| {
        c.docker.host = Some("unix:///tmp/stoa-no-engine-here.sock".into())
    })
    .await;
    let (id, _) = start_image(&s, json!({"docker_image_ref": IMAGE})).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::SystemFailure);
    assert!(
        r.result
            .error
            .as_deref()
            .unwrap()
            .contains("Docker engine unreachable"),
        "{r:?}"
    );
    assert!(s.client.machine_types().await.is_ok());
    let (py, _) = s.start_code("print('python still runs')").await;
    assert_eq!(s.wait_end(&py).await.stdout, "python still runs\n");
}

#[tokio::test]
async fn reconciler_removes_orphans_after_a_restart() {
    if !engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let instance = std::fs::read_to_string(s.data_dir().join("instance-id"))
        .unwrap()
        .trim()
        .to_string();
    let dir = s.stop().await;
    let orphan_run = stoa_types::RunId::new().to_string();
    let (ok, out) = docker(&[
        "create",
        "--label",
        &format!("stoa.run={orphan_run}"),
        "--label",
        &format!("stoa.instance={instance}"),
        "--name",
        &format!("stoa-orphan-{orphan_run}"),
        IMAGE,
        "sleep",
        "60",
    ]);
    assert!(ok, "{out}");
    docker(&["start", &format!("stoa-orphan-{orphan_run}")]);
    // What a crashed compose run leaves: a volume and its own network.
    for kind in ["volume", "network"] {
        let (ok, out) = docker(&[
            kind,
            "create",
            "--label",
            &format!("stoa.run={orphan_run}"),
            "--label",
            &format!("stoa.instance={instance}"),
            &format!("stoa-orphan-{kind}-{orphan_run}"),
        ]);
        assert!(ok, "{out}");
    }
    // Another installation's container with the same kind of label is not touched.
    let foreign_run = stoa_types::RunId::new().to_string();
    let (ok, out) = docker(&[
        "create",
        "--label",
        &format!("stoa.run={foreign_run}"),
        "--label",
        "stoa.instance=someone-else",
        IMAGE,
        "true",
    ]);
    assert!(ok, "{out}");
    assert_ne!(leftovers(&orphan_run), "");
    let _s = TestServer::start_in(dir, |_| {}).await;
    // Removed by the reconciler's first pass, in the background of the start.
    for _ in 0..300 {
        if leftovers(&orphan_run).is_empty()
            && super::compose_runs::stack_leftovers(&orphan_run).is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(leftovers(&orphan_run), "", "the orphan is removed at start");
    assert_eq!(
        super::compose_runs::stack_leftovers(&orphan_run),
        "",
        "its volume and network too"
    );
    assert_ne!(
        leftovers(&foreign_run),
        "",
        "another installation's container stays"
    );
    docker(&["rm", "-f", out.trim()]);
}

#[tokio::test]
async fn private_registry_with_basic_auth() {
    if !engine_ready() {
        return;
    }
    let Some(registry) = which("docker-registry") else {
        return missing("Debian's docker-registry package");
    };
    let Some(htpasswd) = which("htpasswd") else {
        return missing("htpasswd (apache2-utils)");
    };
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let o = Command::new(htpasswd)
        .args(["-Bbn", "stoauser", "s3cret-pass"])
        .output()
        .unwrap();
    std::fs::write(d.path().join("htpasswd"), &o.stdout).unwrap();
    let cfg = format!(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: stoa\n    path: {pw}\n",
        root = d.path().join("data").display(),
        pw = d.path().join("htpasswd").display(),
    );
    std::fs::write(d.path().join("config.yml"), cfg).unwrap();
    let mut reg = Command::new(registry)
        .args(["serve", &d.path().join("config.yml").display().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    let reference = format!("127.0.0.1:{port}/private/busybox:1");
    let cli_cfg = d.path().join("docker-cli");
    std::fs::create_dir_all(&cli_cfg).unwrap();
    let (ok, out) = docker_with(
        &[
            "login",
            "-u",
            "stoauser",
            "-p",
            "s3cret-pass",
            &format!("127.0.0.1:{port}"),
        ],
        Some(&cli_cfg),
    );
    assert!(ok, "docker login: {out}");
    assert!(docker(&["tag", IMAGE, &reference]).0);
    let (ok, out) = docker_with(&["push", &reference], Some(&cli_cfg));
    assert!(ok, "docker push: {out}");
    assert!(
        docker(&["rmi", &reference]).0,
        "the image must be pulled, not found locally"
    );

    // A loopback registry is refused unless the operator allows it.
    let s = TestServer::start_with(|c| {
        c.docker.allowed_registries = vec![format!("127.0.0.1:{port}")];
    })
    .await;
    let with = |password: &str| {
        json!({"docker_image_ref": reference, "docker_run_cmd": ["echo", "pulled privately"],
               "docker_registry_credential_type": "basic", "docker_username": "stoauser", "docker_password": password})
    };
    let (bad, _) = start_image(&s, with("wrong-password")).await;
    let r = s.wait_end(&bad).await;
    assert_status(&r, RunStatus::Failed);
    let err = r.result.error.clone().unwrap();
    assert!(
        err.starts_with(&format!("pulling {reference} failed")),
        "{err}"
    );
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("denied"),
        "{err}"
    );
    assert!(!err.contains("wrong-password"));

    let mut missing_repo = with("s3cret-pass");
    missing_repo["docker_image_ref"] = json!(format!("127.0.0.1:{port}/private/nothing-here:1"));
    let (nf, _) = start_image(&s, missing_repo).await;
    let r = s.wait_end(&nf).await;
    assert_status(&r, RunStatus::Failed);
    let err = r.result.error.clone().unwrap().to_lowercase();
    assert!(
        err.contains("not found") || err.contains("unknown"),
        "{err}"
    );

    let (good, url) = start_image(&s, with("s3cret-pass")).await;
    let (_, events) = read_stream(&s.client, &url, None).await;
    let reasons: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            StreamEvent::Status(st) => st.pending_reason.clone(),
            _ => None,
        })
        .collect();
    let r = s.wait_end(&good).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "pulled privately\n");
    assert!(
        reasons.iter().any(|x| x.starts_with("pulling image")),
        "{reasons:?}"
    );
    // A stack mixing the private image with a local one: the credentials go to the
    // private registry's image only.
    docker(&["rmi", &reference]);
    let stack = format!(
        "services:\n  private:\n    image: {reference}\n    command: [echo, private ok]\n  local:\n    image: {IMAGE}\n    command: sh -c 'sleep 0.5; echo local ok'\n    depends_on: {{private: {{condition: service_completed_successfully}}}}\n"
    );
    let r = s
        .client
        .start_compose_json(
            &json!({"compose_file_code": stack, "docker_registry_credential_type": "basic",
            "docker_username": "stoauser", "docker_password": "s3cret-pass"}),
        )
        .await
        .unwrap();
    let rec = s.wait_end(&r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    assert!(
        rec.stdout.contains("private | private ok\n") && rec.stdout.contains("local | local ok\n"),
        "{}",
        rec.stdout
    );
    // The password is nowhere in the store.
    for bytes in store_bytes(s.dir.path()).await {
        assert!(
            !bytes.windows(11).any(|w| w == b"s3cret-pass"),
            "the registry password is not stored"
        );
    }
    docker(&["rmi", &reference]);
    let _ = reg.kill();
    let _ = reg.wait();
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    stoa_runtime::python::find_on_path(name)
}

#[tokio::test]
async fn python_runs_inside_the_profiles_image_with_a_cached_environment() {
    if !engine_ready() {
        return;
    }
    if !docker(&["image", "inspect", "local/hostpython:3.11"]).0 {
        return missing("the local/hostpython:3.11 image (scripts/ci/build-hostpython.sh)");
    }
    let s = TestServer::start_with(|c| {
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "cpu.container".into(),
            python_image: Some("local/hostpython:3.11".into()),
            memory_mb: Some(512),
            ..Default::default()
        });
    })
    .await;
    let body = json!({
        "code": "import os, sys, six, helper\nprint(sys.version.split()[0], six.__version__, helper.X)\nprint('host pyenv visible:', os.path.exists('/root/.pyenv'))\nprint('data dir visible:', os.path.exists(os.environ['HOME'] + '/../../stoa.db'))\n",
        "execution_type": "cpu.container",
        "requirements_content": "six==1.16.0\nhelper\n",
        "import_files": json!({"helper.py": "X = 'bundled'\n"}).to_string(),
    });
    let (id, url) = s.start_json(body.clone()).await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(
        text, "3.11.2 1.16.0 bundled\nhost pyenv visible: False\ndata dir visible: False\n",
        "{r:?}"
    );
    assert_eq!(leftovers(&id), "");
    // The environment is cached: the second run builds nothing.
    let (id2, url2) = s.start_json(body).await;
    let (_, events) = read_stream(&s.client, &url2, None).await;
    assert_status(&s.wait_end(&id2).await, RunStatus::Completed);
    assert!(
        !events.iter().any(|e| matches!(&e.event, StreamEvent::Status(st) if st.pending_reason.as_deref() == Some("building Python environment"))),
        "the second run reuses the environment"
    );
}
