//! Workers on other machines: `stoa worker` processes registered with a server over
//! the worker protocol (HTTP), executing its runs. Each worker here is the real binary
//! with its own data directory, talking to the server only over HTTP.

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stoa_store::Store;
use stoa_types::{RunId, RunStatus};

use super::restart::BinaryServer;
use super::*;

/// A `stoa worker` process.
struct RemoteWorker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl RemoteWorker {
    /// Starts a worker named `name` against `server`, taking `slots` cpu runs at once.
    fn start(server: &str, token: &str, name: &str, slots: usize) -> Self {
        Self::start_in(None, server, token, name, &[("cpu", slots)])
    }

    /// Like `start`, with more arguments for `stoa worker`.
    fn start_with_args(server: &str, token: &str, name: &str, args: &[&str]) -> Self {
        Self::start_full(None, server, token, name, &[("cpu", 1)], args)
    }

    /// Like `start`, inside network namespace `netns` when given, offering these
    /// profiles with these slots.
    fn start_in(
        netns: Option<&str>,
        server: &str,
        token: &str,
        name: &str,
        offer: &[(&str, usize)],
    ) -> Self {
        Self::start_full(netns, server, token, name, offer, &[])
    }

    fn start_full(
        netns: Option<&str>,
        server: &str,
        token: &str,
        name: &str,
        offer: &[(&str, usize)],
        args: &[&str],
    ) -> Self {
        let slots: usize = offer.iter().map(|(_, n)| n).sum();
        let profiles: String = offer
            .iter()
            .map(|(p, n)| {
                format!("[[profiles]]\nname = \"{p}\"\nprice_per_hour = 0.0\nslots = {n}\n")
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\nmax_concurrent_runs = {slots}\n\
                 [docker]\nnetwork_pool = 0\nnetwork_idle_s = 0\n\
                 [limits]\nshutdown_grace_s = 1\n\
                 # A few lines in memory: an outage of the server spools to disk.\n\
                 max_held_output_bytes = 256\n{profiles}"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_stoa")]);
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_stoa")),
        };
        let child = cmd
            .args([
                "worker", "--server", server, "--token", token, "--name", name,
            ])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .env_remove("STOA_DATABASE_URL")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the worker binary starts");
        RemoteWorker { child, _dir: dir }
    }

    /// SIGKILL: nothing of the worker runs on.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A join token made with `stoa workers token create` on the server's data directory.
pub(crate) fn join_token(data_dir: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "token", "create", "--data-dir"])
        .arg(data_dir)
        .envs(database_env(data_dir))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Waits until these workers registered with the server of `data_dir`.
pub(crate) async fn registered(store: &dyn Store, names: &[&str]) {
    for _ in 0..300 {
        let have = store.list_workers().await.unwrap();
        if names.iter().all(|n| have.iter().any(|w| w.name == *n)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("workers {names:?} did not register");
}

/// A server that executes nothing itself, with short leases and claims.
async fn control_plane() -> TestServer {
    TestServer::start_with(|c| {
        c.worker.enabled = false;
        c.worker.lease_s = 3;
        c.worker.claim_wait_s = 2;
    })
    .await
}

async fn worker_of(store: &Arc<dyn Store>, id: &str) -> Option<String> {
    let id: RunId = id.parse().unwrap();
    store.get_run(id).await.unwrap().unwrap().worker_id
}

const TICKER: &str = "import time\nfor i in range(1, 301):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)\n";

#[tokio::test]
async fn a_remote_worker_executes_python_and_image_runs_with_secrets_masked() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let _w = RemoteWorker::start(s.client.base(), &token, "w1", 2);
    registered(&*store, &["w1"]).await;
    s.client
        .env_set(&[("FLEET_SECRET", "s3cr3t-value-of-the-org")])
        .await
        .unwrap();
    let (id, url) = s
        .start_code("import os\nprint('hello from w1')\nprint(os.environ['FLEET_SECRET'])\n")
        .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "hello from w1\n***\n");
    assert_eq!(worker_of(&store, &id).await.as_deref(), Some("w1"));
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "hello from w1\n***\n");
    if super::docker_runs::engine_ready() {
        let started = s
            .client
            .start_image_json(&json!({"docker_image_ref": "local/busybox:full",
                "docker_run_cmd": ["sh", "-c", "echo from a container; exit 3"]}))
            .await
            .unwrap();
        let r = s.wait_end(&started.execution_id).await;
        assert_status(&r, RunStatus::Failed);
        assert_eq!(r.return_code, Some(3));
        assert_eq!(r.stdout, "from a container\n");
        assert_eq!(
            worker_of(&store, &started.execution_id).await.as_deref(),
            Some("w1")
        );
        // Abort of a remote image run: it answers once the container is gone.
        let long = s
            .client
            .start_image_json(
                &json!({"docker_image_ref": "local/busybox:full", "timeout": 300,
                "docker_run_cmd": ["sh", "-c", "echo up; sleep 300"]}),
            )
            .await
            .unwrap();
        wait_output(&s.client, &long.streaming_url, "up\n").await;
        let reply = s.client.abort(&long.execution_id).await.unwrap();
        assert_eq!(reply.status, Some(RunStatus::Aborted));
        let left = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=stoa.run={}", long.execution_id))
            .output()
            .unwrap();
        assert!(left.stdout.is_empty(), "no container is left");
        // A remote run's ports: its worker reports them (over the worker protocol),
        // but they are its machine's addresses, so this server does not proxy them
        // (the same address here may be another run's).
        let served = s
            .client
            .start_image_json(
                &json!({"docker_image_ref": "local/busybox:full", "timeout": 300,
                "ports": [8080], "docker_run_cmd": ["sh", "-c", "echo up; exec httpd -f -p 8080"]}),
            )
            .await
            .unwrap();
        let id = served.execution_id;
        wait_output(&s.client, &served.streaming_url, "up\n").await;
        let run_id: RunId = id.parse().unwrap();
        let mut reported = Default::default();
        for _ in 0..100 {
            reported = store.get_run(run_id).await.unwrap().unwrap().ports;
            if !reported.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(reported.keys().copied().collect::<Vec<u16>>(), vec![8080]);
        assert!(s.client.execution(&id).await.unwrap().ports.is_empty());
        let r = reqwest::Client::new()
            .get(format!(
                "{}/ports/{id}/8080/",
                s.client.base().trim_end_matches('/')
            ))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let body = r.text().await.unwrap();
        assert!(
            body.contains("runs on worker w1, on another machine"),
            "{body}"
        );
        s.client.abort(&id).await.unwrap();
    }
    // The fleet as `stoa workers list` shows it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "list", "--json", "--data-dir"])
        .arg(s.data_dir())
        .envs(database_env(&s.data_dir()))
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "w1");
    assert_eq!(list[0]["profiles"][0]["name"], "cpu");
    assert_eq!(list[0]["draining"], false);
}

#[tokio::test]
async fn a_killed_worker_loses_its_run_and_the_other_worker_goes_on() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let base = s.client.base().to_string();
    let mut w1 = RemoteWorker::start(&base, &token, "w1", 1);
    let _w2 = RemoteWorker::start(&base, &token, "w2", 1);
    registered(&*store, &["w1", "w2"]).await;
    let (a, a_url) = s.start_code(TICKER).await;
    let (b, b_url) = s.start_code(TICKER).await;
    wait_output(&s.client, &a_url, "tick 3\n").await;
    wait_output(&s.client, &b_url, "tick 3\n").await;
    // One slot each: the two runs spread over both workers.
    let (wa, wb) = (worker_of(&store, &a).await, worker_of(&store, &b).await);
    let mut on = [wa.clone().unwrap(), wb.clone().unwrap()];
    on.sort();
    assert_eq!(on, ["w1", "w2"], "{wa:?} {wb:?}");
    let (lost, lost_url, kept) = if wa.as_deref() == Some("w1") {
        (a, a_url, b)
    } else {
        (b, b_url, a)
    };
    w1.kill();
    let r = s.wait_end(&lost).await;
    assert_status(&r, RunStatus::SystemFailure);
    let error = r.result.error.clone().unwrap();
    assert!(error.starts_with("worker lost: w1, last heard "), "{error}");
    let (text, _) = read_stream(&s.client, &lost_url, None).await;
    assert!(text.starts_with("tick 1\ntick 2\ntick 3\n"), "{text}");
    // The sandbox went down with its worker.
    let left = processes_gone(&lost).await;
    assert!(left.is_empty(), "{left:?}");
    // The other worker's run went on; abort reaches it through its heartbeat.
    assert_eq!(
        s.client.execution(&kept).await.unwrap().status,
        RunStatus::Running
    );
    let reply = s.client.abort(&kept).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    assert!(
        run_processes(&kept).is_empty(),
        "abort answers once the worker confirmed the run is gone"
    );
}

#[tokio::test]
async fn stop_and_drain_of_a_remote_worker() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let _w = RemoteWorker::start(s.client.base(), &token, "w1", 2);
    registered(&*store, &["w1"]).await;
    let code = "import signal, sys, time\n\
                def bye(*_):\n    print('got SIGTERM', flush=True)\n    sys.exit(0)\n\
                signal.signal(signal.SIGTERM, bye)\n\
                print('ready', flush=True)\ntime.sleep(120)\n";
    let (id, url) = s.start_code(code).await;
    wait_output(&s.client, &url, "ready").await;
    // machine-types shows the fleet: who offers the profile, with its free slots.
    let cpu = |m: stoa_types::MachineTypesResponse| {
        m.machine_types
            .into_iter()
            .find(|t| t.hardware_profile == "cpu")
            .unwrap()
    };
    let t = cpu(s.client.machine_types().await.unwrap());
    assert_eq!(
        t.workers,
        vec![stoa_types::ProfileWorker {
            name: "w1".into(),
            slots: 2,
            free_slots: 1,
            draining: false
        }],
        "{t:?}"
    );
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    let r = s.client.execution(&id).await.unwrap();
    assert!(r.stdout.contains("got SIGTERM"), "{}", r.stdout);
    assert!(run_processes(&id).is_empty());
    // Drained, the worker takes no new run; the run waits and says why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "drain", "w1", "--data-dir"])
        .arg(s.data_dir())
        .envs(database_env(&s.data_dir()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The server follows the mark at the worker's next call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (waiting, _) = s.start_code("print('after the drain')").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = s.client.execution(&waiting).await.unwrap();
    assert_status(&r, RunStatus::Pending);
    assert_eq!(
        r.pending_reason.as_deref(),
        Some("no worker offers cpu: the one that does is draining"),
        "{r:?}"
    );
    let t = cpu(s.client.machine_types().await.unwrap());
    assert_eq!((t.workers[0].free_slots, t.workers[0].draining), (0, true));
    assert_eq!(t.queued, 1);
    std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "drain", "w1", "--undo", "--data-dir"])
        .arg(s.data_dir())
        .envs(database_env(&s.data_dir()))
        .output()
        .unwrap();
    let r = s.wait_end(&waiting).await;
    assert_status(&r, RunStatus::Completed);
}

/// A plain TCP front to `backend` that the test can close: it then stops accepting and
/// cuts the connections it carries.
struct TcpFront {
    port: u16,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl TcpFront {
    async fn start(backend: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut front, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut back) = tokio::net::TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
                    }
                });
                conns.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        TcpFront { port, tasks }
    }

    fn close(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// A worker given several addresses of the control plane (servers sharing one store)
/// goes on through the next when the one it uses cannot be reached: here the first is a
/// TCP front, closed mid-run. The run completes with every line, once, in order.
#[tokio::test]
async fn a_worker_with_several_server_urls_goes_on_through_the_next() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let front = TcpFront::start(s.handle.as_ref().unwrap().addr).await;
    let servers = format!("http://127.0.0.1:{},{}", front.port, s.client.base());
    let _w = RemoteWorker::start(&servers, &token, "w1", 1);
    registered(&*store, &["w1"]).await;
    let code = "import time\nfor i in range(1, 61):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n";
    let (id, url) = s.start_code(code).await;
    wait_output(&s.client, &url, "line 10\n").await;
    front.close();
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    let want: String = (1..=60).map(|i| format!("line {i}\n")).collect();
    assert_eq!(r.stdout, want);
    // New runs reach it through the address left.
    let (next, _) = s.start_code("print('after the cut')").await;
    let r = s.wait_end(&next).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(worker_of(&store, &next).await.as_deref(), Some("w1"));
}

#[tokio::test]
async fn a_server_killed_mid_run_loses_no_line_of_a_remote_run() {
    let mut server = BinaryServer::start_with(&[
        ("STOA_WORKER__ENABLED", "false"),
        ("STOA_WORKER__LEASE_S", "6"),
        ("STOA_WORKER__CLAIM_WAIT_S", "2"),
    ])
    .await;
    let c = server.client.clone();
    let token = join_token(server.dir.path());
    let _w = RemoteWorker::start(c.base(), &token, "w1", 2);
    let start = |code: String| {
        let c = c.clone();
        async move {
            c.start_python(&stoa_types::PythonStartRequest {
                code,
                ..Default::default()
            })
            .await
            .unwrap()
        }
    };
    // A 20 s run, a line every 100 ms; and a short one that ends while the server is
    // away (its output and its end wait on the worker's disk).
    let long = start("import time\nfor i in range(1, 201):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n".into()).await;
    let short = start("import time\nfor i in range(1, 301):\n    print(f'short {i}', flush=True)\n    time.sleep(0.01)\n".into()).await;
    wait_output(&c, &long.streaming_url, "line 20\n").await;
    wait_output(&c, &short.streaming_url, "short 10\n").await;
    server.crash();
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.restart().await;
    for (run, want) in [
        (
            &long,
            (1..=200).map(|i| format!("line {i}\n")).collect::<String>(),
        ),
        (
            &short,
            (1..=300)
                .map(|i| format!("short {i}\n"))
                .collect::<String>(),
        ),
    ] {
        let r = wait_end(&c, &run.execution_id).await;
        assert_status(&r, RunStatus::Completed);
        assert_eq!(r.stdout, want, "every line once, in order");
        let (text, _) = read_stream(&c, &run.streaming_url, None).await;
        assert_eq!(text, want, "a late reader replays all of them");
    }
}

/// A network namespace joined to the host by a veth pair: a machine of its own on
/// the network, whose link the test can cut.
struct Netns {
    name: String,
    host_if: String,
    /// The host's address on the link (servers listen there for the namespace).
    host_ip: String,
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// A fresh namespace; `None` (said, and a failure under CI) when this cannot be
    /// done here (not root, no `ip`).
    fn create() -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // Only root makes namespaces and links.
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        if !root || !ip(&["-V"]) {
            missing("root and iproute2 (ip netns) for workers in their own network namespace");
            return None;
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A /30 of its own per namespace, apart for every test process.
        let k = (std::process::id() * 8 + n) % 16000;
        let tag = format!("{k:04}");
        let (second, third, fourth) = (240 + k / 4000, (k % 4000) / 16, (k % 16) * 4);
        let ns = Netns {
            name: format!("stoa-t{tag}"),
            // Not `stoa…`: links of that name are run networks, closed to the host.
            host_if: format!("svt{tag}h"),
            host_ip: format!("10.{second}.{third}.{}", fourth + 1),
        };
        let ns_ip = format!("10.{second}.{third}.{}", fourth + 2);
        let ns_if = format!("svt{tag}n");
        let _ = ip(&["netns", "del", &ns.name]);
        let _ = ip(&["link", "del", &ns.host_if]);
        let ok = ip(&["netns", "add", &ns.name])
            && ip(&[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns_if,
            ])
            && ip(&["link", "set", &ns_if, "netns", &ns.name])
            && ip(&[
                "addr",
                "add",
                &format!("{}/30", ns.host_ip),
                "dev",
                &ns.host_if,
            ])
            && ip(&["link", "set", &ns.host_if, "up"])
            && ip(&[
                "netns",
                "exec",
                &ns.name,
                "ip",
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &ns_if,
            ])
            && ip(&["netns", "exec", &ns.name, "ip", "link", "set", &ns_if, "up"])
            && ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        assert!(ok, "setting up network namespace {}", ns.name);
        Some(ns)
    }

    /// Cuts the link (`up == false`) or brings it back.
    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" }
        ]));
    }

    /// Starts a worker inside the namespace.
    fn worker(
        &self,
        server_port: u16,
        token: &str,
        name: &str,
        offer: &[(&str, usize)],
    ) -> RemoteWorker {
        RemoteWorker::start_in(
            Some(&self.name),
            &format!("http://{}:{server_port}", self.host_ip),
            token,
            name,
            offer,
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// A server listening on every address (workers in namespaces reach it over their link).
async fn control_plane_for_namespaces(lease_s: u64) -> (TestServer, u16) {
    let s = TestServer::start_with(|c| {
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "cpu.big".into(),
            price_per_hour: 1.0,
            ..Default::default()
        });
        c.listen = "0.0.0.0:0".into();
        c.worker.enabled = false;
        c.worker.lease_s = lease_s;
        c.worker.claim_wait_s = 2;
    })
    .await;
    let port = s.handle.as_ref().unwrap().addr.port();
    (s, port)
}

#[tokio::test]
async fn workers_on_other_addresses_take_what_they_offer_within_their_capacity() {
    let (Some(a), Some(b)) = (Netns::create(), Netns::create()) else {
        return;
    };
    let (s, port) = control_plane_for_namespaces(6).await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let _w1 = a.worker(port, &token, "w1", &[("cpu", 2)]);
    let _w2 = b.worker(port, &token, "w2", &[("cpu", 2), ("cpu.big", 1)]);
    registered(&*store, &["w1", "w2"]).await;
    // A profile only w2 offers: its runs land there, one at a time.
    let mut big = Vec::new();
    for _ in 0..2 {
        let (id, _) = s
            .start_json(json!({"code": "print('big')", "execution_type": "cpu.big"}))
            .await;
        big.push(id);
    }
    for id in &big {
        assert_status(&s.wait_end(id).await, RunStatus::Completed);
        assert_eq!(worker_of(&store, id).await.as_deref(), Some("w2"));
    }
    // A burst of 8 runs of 1.5 s: they spread over both, never more than 2 on either.
    let code = "import time\ntime.sleep(1.5)\nprint('done')\n";
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(s.start_code(code).await.0);
    }
    let mut most = std::collections::BTreeMap::<String, usize>::new();
    loop {
        let active = store.active_runs().await.unwrap();
        for w in ["w1", "w2"] {
            let n = active
                .iter()
                .filter(|r| r.worker_id.as_deref() == Some(w))
                .count();
            let m = most.entry(w.to_string()).or_default();
            *m = (*m).max(n);
        }
        let mut ended = 0;
        for id in &ids {
            if s.client.execution(id).await.unwrap().status.is_terminal() {
                ended += 1;
            }
        }
        if ended == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most["w1"], 2, "{most:?}");
    assert_eq!(most["w2"], 2, "{most:?}");
    let mut on = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let r = s.client.execution(id).await.unwrap();
        assert_status(&r, RunStatus::Completed);
        *on.entry(worker_of(&store, id).await.unwrap()).or_default() += 1;
    }
    assert_eq!(on.values().sum::<usize>(), 8);
    assert!(on["w1"] >= 2 && on["w2"] >= 2, "the burst spreads: {on:?}");
}

#[tokio::test]
async fn a_cut_shorter_than_the_lease_loses_nothing_a_longer_one_loses_the_run() {
    let Some(ns) = Netns::create() else {
        return;
    };
    // A lease well above the cut: TCP's retransmissions back off (about 0.2, 0.6, 1.4,
    // 3.0, 6.2 s after a loss), so a worker may stay silent twice as long as a cut.
    let (s, port) = control_plane_for_namespaces(10).await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let _w = ns.worker(port, &token, "w1", &[("cpu", 2)]);
    registered(&*store, &["w1"]).await;
    let code = "import time\nfor i in range(1, 81):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n";
    let (id, url) = s.start_code(code).await;
    wait_output(&s.client, &url, "line 10\n").await;
    // Less than the lease: the run completes with every line once.
    ns.link(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    ns.link(true);
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    let want: String = (1..=80).map(|i| format!("line {i}\n")).collect();
    assert_eq!(r.stdout, want);

    // Longer than the lease: the run is lost; when the link is back the worker hears
    // it and kills what is left of it.
    let (id, url) = s.start_code(TICKER).await;
    wait_output(&s.client, &url, "tick 5\n").await;
    assert!(!run_processes(&id).is_empty());
    ns.link(false);
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::SystemFailure);
    assert!(
        r.result
            .error
            .as_deref()
            .unwrap()
            .starts_with("worker lost: w1"),
        "{r:?}"
    );
    assert!(
        !run_processes(&id).is_empty(),
        "cut off, the worker does not know yet"
    );
    ns.link(true);
    let left = processes_gone(&id).await;
    assert!(left.is_empty(), "the worker killed the lost run: {left:?}");
    // And it takes new runs again.
    let (next, _) = s.start_code("print('back')").await;
    let r = s.wait_end(&next).await;
    assert_status(&r, RunStatus::Completed);
}

#[tokio::test]
async fn a_revoked_join_token_registers_no_worker_and_a_removed_worker_is_refused() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let stoa = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
            .args(args)
            .arg("--data-dir")
            .arg(s.data_dir())
            .envs(database_env(&s.data_dir()))
            .output()
            .unwrap()
    };
    let token = join_token(&s.data_dir());
    let listed = String::from_utf8(stoa(&["workers", "token", "list"]).stdout).unwrap();
    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(listed.contains("valid"), "{listed}");
    assert!(stoa(&["workers", "token", "revoke", &id]).status.success());
    let listed = String::from_utf8(stoa(&["workers", "token", "list"]).stdout).unwrap();
    assert!(listed.contains("revoked"), "{listed}");
    let mut w = RemoteWorker::start(s.client.base(), &token, "w1", 1);
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Some(st) = w.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|st| !st.success()),
        "the worker gives up: {status:?}"
    );
    assert!(store.list_workers().await.unwrap().is_empty());

    // A worker removed by hand is refused from its next call.
    let token = join_token(&s.data_dir());
    let _w = RemoteWorker::start(s.client.base(), &token, "w2", 1);
    registered(&*store, &["w2"]).await;
    assert!(stoa(&["workers", "remove", "w2"]).status.success());
    assert!(store.list_workers().await.unwrap().is_empty());
    let (id, _) = s.start_code("print('not on w2')").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.client.execution(&id).await.unwrap().status,
        RunStatus::Pending
    );
}

#[tokio::test]
async fn a_worker_stopped_with_sigterm_ends_its_runs_saying_so() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let mut w = RemoteWorker::start(s.client.base(), &token, "w1", 1);
    registered(&*store, &["w1"]).await;
    let (id, url) = s.start_code(TICKER).await;
    wait_output(&s.client, &url, "tick 3\n").await;
    // SIGTERM: the worker waits `limits.shutdown_grace_s` (1 s here), then ends it.
    let pid = w.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::SystemFailure);
    assert_eq!(
        r.result.error.as_deref(),
        Some("the worker shut down while the run was active")
    );
    assert!(
        r.stdout.contains(
            "[stoa] the worker shut down while the run was active; output up to that point is kept"
        ),
        "{}",
        r.stdout
    );
    assert!(processes_gone(&id).await.is_empty());
    let exited = tokio::task::spawn_blocking(move || w.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success(), "{exited:?}");
}

/// A TLS front for a plain-HTTP server (as an operator's proxy is), with a certificate
/// for `localhost` from a CA made for the test. Returns its port and the CA file.
async fn tls_front(
    dir: &std::path::Path,
    backend: std::net::SocketAddr,
) -> (u16, std::path::PathBuf) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let sh = |script: &str| {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    };
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.pem -days 1 -subj '/CN=stoa test CA' \
        -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign'",
    );
    sh(
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout srv.key -out srv.csr -subj '/CN=localhost'",
    );
    sh(
        "printf 'subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext \
        && openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 1 -extfile ext",
    );
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("srv.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("srv.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    (port, dir.join("ca.pem"))
}

#[tokio::test]
async fn a_worker_reaches_an_https_server_trusting_the_given_ca() {
    let s = control_plane().await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let token = join_token(&s.data_dir());
    let certs = tempfile::tempdir().unwrap();
    let (port, ca) = tls_front(certs.path(), s.handle.as_ref().unwrap().addr).await;
    let url = format!("https://localhost:{port}");
    // Without the CA the server's certificate is not trusted: no registration.
    let mut untrusting = RemoteWorker::start(&url, &token, "w-untrusting", 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(store.list_workers().await.unwrap().is_empty());
    untrusting.kill();
    // With it, the worker registers and runs over TLS.
    let _w =
        RemoteWorker::start_with_args(&url, &token, "w-tls", &["--ca-file", ca.to_str().unwrap()]);
    registered(&*store, &["w-tls"]).await;
    let (id, _) = s.start_code("print('over tls')").await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, "over tls\n");
    assert_eq!(worker_of(&store, &id).await.as_deref(), Some("w-tls"));
}

/// The master key servers sharing a store share (their secrets are sealed with it).
const SHARED_MASTER_KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// A join token made with `stoa workers token create` on the store at `url`.
fn join_token_on(url: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "token", "create", "--data-dir"])
        .arg(dir.path())
        .args(["--database-url", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Settings of a server on the shared database at `url`: the shared master key, short
/// leases and claims, the `cpu` profile with `cpu_slots` for its embedded worker and a
/// `remote` profile only remote workers offer.
fn on_shared(c: &mut Config, url: &str, cpu_slots: usize) {
    c.store.url = Some(url.to_string());
    c.secrets.master_key = Some(SHARED_MASTER_KEY.into());
    c.worker.lease_s = 6;
    c.worker.claim_wait_s = 2;
    let mut cpu = stoa_server::config::ProfileConfig::builtin_cpu();
    cpu.slots = Some(cpu_slots);
    let mut remote = cpu.clone();
    remote.name = "remote".into();
    remote.slots = Some(0);
    c.profiles = vec![cpu, remote];
}

/// The most runs that held a slot at once, from their stored timelines (placed to
/// ended).
fn most_at_once(records: &[ExecutionRecord]) -> usize {
    let mut edges: Vec<(String, i32)> = Vec::new();
    for r in records {
        let at = |name: &str| {
            r.phases
                .iter()
                .find(|p| p.phase == name)
                .map(|p| p.at.clone())
                .unwrap_or_else(|| panic!("{} has no {name} phase: {:?}", r.execution_id, r.phases))
        };
        edges.push((at("placed"), 1));
        edges.push((at("ended"), -1));
    }
    // At the same instant, an end frees its slot before a start takes it.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// Two servers on one PostgreSQL, one without an embedded worker, with workers attached
/// to either: 500 runs submitted alternately to both each end once with all of their
/// output, never more at once than the fleet's capacity, on workers of both servers;
/// an SSE reader on one server follows a run whose output comes through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_share_the_queue_the_workers_and_the_streams() {
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        return missing("bubblewrap (/usr/bin/bwrap)");
    }
    let Some(url) = stoa_store::conformance::fresh_postgres_url().await else {
        return;
    };
    // A: its embedded worker (2 cpu slots); B: none.
    let a = TestServer::start_with(|c| on_shared(c, &url, 2)).await;
    let b = TestServer::start_with(|c| {
        on_shared(c, &url, 0);
        c.worker.enabled = false;
    })
    .await;
    let store = a.handle.as_ref().unwrap().store.clone();
    let token = join_token_on(&url);
    // w1 through B (2 cpu slots, the only `remote` slot), w2 through A (1 cpu slot).
    let _w1 = RemoteWorker::start_in(
        None,
        b.client.base(),
        &token,
        "w1",
        &[("cpu", 2), ("remote", 1)],
    );
    let _w2 = RemoteWorker::start_in(None, a.client.base(), &token, "w2", &[("cpu", 1)]);
    registered(&*store, &["w1", "w2"]).await;
    let capacity = 2 + 2 + 1;

    // A run only w1 (B's worker) can take, read live on A.
    let lines = 40;
    let fed = a
        .client
        .start_python(&stoa_types::PythonStartRequest {
            code: format!("import time\nfor i in range(1, {}):\n    print(f'via b {{i}}', flush=True)\n    time.sleep(0.05)\n", lines + 1),
            execution_type: Some("remote".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let reader = {
        let (c, url) = (a.client.clone(), fed.streaming_url.clone());
        tokio::spawn(async move { read_stream(&c, &url, None).await })
    };

    // 500 runs, alternately to A and B, ten requests in flight.
    use futures::StreamExt;
    let clients = [a.client.clone(), b.client.clone()];
    let ids: Vec<(usize, String)> = futures::stream::iter((0..500).map(|i| {
        let c = clients[i % 2].clone();
        async move {
            let r = c
                .start_python(&stoa_types::PythonStartRequest {
                    code: format!("print('run {i}')\nprint('done')\n"),
                    ..Default::default()
                })
                .await
                .unwrap();
            (i, r.execution_id)
        }
    }))
    .buffer_unordered(10)
    .collect()
    .await;

    let (text, _) = reader.await.unwrap();
    let want: String = (1..=lines).map(|i| format!("via b {i}\n")).collect();
    assert_eq!(
        text, want,
        "A's reader got every line B stored, in order, once"
    );
    assert_eq!(
        worker_of(&store, &fed.execution_id).await.as_deref(),
        Some("w1")
    );

    // Every run ends (read through the server it was not submitted to).
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    for (i, id) in &ids {
        let other = &clients[(i + 1) % 2];
        let r = loop {
            let r = other.execution(id).await.unwrap();
            if r.status.is_terminal() {
                break r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run {i} did not end: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_status(&r, RunStatus::Completed);
        assert_eq!(
            r.stdout,
            format!("run {i}\ndone\n"),
            "all of run {i}'s output"
        );
        let ends = r.phases.iter().filter(|p| p.phase == "ended").count();
        assert_eq!(ends, 1, "run {i} ended once: {:?}", r.phases);
        records.push(r);
    }
    let most = most_at_once(&records);
    assert!(
        most <= capacity,
        "{most} runs at once on {capacity} cpu slots"
    );
    // Workers of both servers took runs of both servers.
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    for (_, id) in &ids {
        *by_worker
            .entry(worker_of(&store, id).await.unwrap_or_default())
            .or_default() += 1;
    }
    eprintln!(
        "{} runs; at most {most} at once on {capacity} cpu slots; by worker {by_worker:?}",
        ids.len()
    );
    assert_eq!(by_worker.len(), 3, "{by_worker:?}");
    assert!(
        by_worker.contains_key("w1") && by_worker.contains_key("w2"),
        "{by_worker:?}"
    );
}

/// kill -9 of one of two servers on one PostgreSQL, mid-run: the other goes on serving;
/// a stream reader moves to it with `Last-Event-ID` and gets every line once; the
/// worker moves to it (it was given both addresses) and its run ends with all its
/// output.
#[tokio::test]
async fn a_server_killed_leaves_the_other_serving_its_readers_and_workers() {
    let Some(url) = stoa_store::conformance::fresh_postgres_url().await else {
        return;
    };
    let mut one = BinaryServer::start_with(&[
        ("STOA_DATABASE_URL", &url),
        ("STOA_SECRETS__MASTER_KEY", SHARED_MASTER_KEY),
        ("STOA_WORKER__ENABLED", "false"),
        ("STOA_WORKER__LEASE_S", "6"),
        ("STOA_WORKER__CLAIM_WAIT_S", "2"),
    ])
    .await;
    let two = TestServer::start_with(|c| {
        on_shared(c, &url, 0);
        c.worker.enabled = false;
    })
    .await;
    let token = join_token_on(&url);
    let servers = format!("{},{}", one.client.base(), two.client.base());
    let _w = RemoteWorker::start(&servers, &token, "w1", 2);
    registered(&*two.handle.as_ref().unwrap().store, &["w1"]).await;
    let run = one
        .client
        .start_python(&stoa_types::PythonStartRequest {
            code: "import time\nfor i in range(1, 81):\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)\n".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Read on server one until line 20, then it dies.
    use futures::StreamExt;
    let mut stream = one.client.stream(&run.streaming_url, None).await.unwrap();
    let (mut text, mut last_id) = (String::new(), None);
    while !text.contains("line 20\n") {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("output in time")
            .expect("the stream goes on")
            .unwrap();
        if let stoa_types::StreamEvent::Output(o) = &ev.event {
            text.push_str(&o.content);
            last_id = ev.id.clone();
        }
    }
    drop(stream);
    one.crash();
    // The same stream, on server two, from the last event seen.
    let on_two = run
        .streaming_url
        .replace(one.client.base(), two.client.base());
    let (rest, _) = read_stream(&two.client, &on_two, last_id.as_deref()).await;
    text.push_str(&rest);
    let want: String = (1..=80).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text, want, "no gap, no duplicate across the two servers");
    let r = wait_end(&two.client, &run.execution_id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.stdout, want);
    // Server two goes on serving; the worker now claims through it.
    let (next, _) = two.start_code("print('after the kill')").await;
    let r = two.wait_end(&next).await;
    assert_status(&r, RunStatus::Completed);
    let store = two.handle.as_ref().unwrap().store.clone();
    assert_eq!(worker_of(&store, &next).await.as_deref(), Some("w1"));
}
