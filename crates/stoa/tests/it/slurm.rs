//! The Slurm bridge against a real Slurm (slurmctld and slurmd from Debian's
//! slurm-wlm, started by the test command with `scripts/slurm.sh`; no fake `sbatch`):
//! `stoa worker --slurm` claims runs and submits each as a Slurm job whose batch script
//! runs `stoa exec` on the node. The tests share the one cluster, one at a time.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::json;
use stoa_types::{ExecutionRecord, RunStatus};

use super::cli::Lyceum;
use super::fleet::{join_token, registered};
use super::*;

/// One test at a time on the cluster (its node has the machine's few cores).
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cluster's `slurm.conf` (`STOA_TEST_SLURM_CONF`, set by `scripts/test`), or
/// `None` said as missing. Slurm tests run in the SQLite pass of the suite only.
fn slurm_conf() -> Option<String> {
    if on_postgres() {
        eprintln!("the Slurm tests run in the SQLite pass of the suite");
        return None;
    }
    match std::env::var("STOA_TEST_SLURM_CONF") {
        Ok(c) if Path::new(&c).exists() => Some(c),
        _ => {
            missing(
                "a Slurm cluster (STOA_TEST_SLURM_CONF; scripts/test starts one with scripts/slurm.sh)",
            );
            None
        }
    }
}

/// A server that executes nothing itself, and a Slurm bridge serving `cpu`.
struct Site {
    s: TestServer,
    bridge: Option<Child>,
    dir: tempfile::TempDir,
    conf: String,
    token: String,
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

impl Site {
    async fn start() -> Option<Site> {
        let conf = slurm_conf()?;
        let guard = CLUSTER.lock().await;
        // Nothing of an earlier test is left in Slurm.
        let _ = slurm_cmd(&conf, "scancel", &["--full", "-u", "root"]);
        let s = TestServer::start_with(|c| {
            c.worker.enabled = false;
            c.worker.lease_s = 6;
            c.worker.claim_wait_s = 2;
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bridge.toml"),
            format!(
                "[docker]\nnetwork_pool = 0\nnetwork_idle_s = 0\n\
                 [metrics]\ninterval_ms = 250\n\
                 [[profiles]]\nname = \"cpu\"\nprice_per_hour = 0.0\n\
                 [slurm]\npoll_interval_ms = 300\nend_grace_s = 2\nstop_margin_s = 3\n\
                 exec = \"{exe}\"\nnode_data_dir = \"{node}\"\njob_log = \"{logs}/job-%j.log\"\n\
                 [[slurm.profiles]]\nname = \"cpu\"\npartition = \"debug\"\ncpus_per_task = 1\n",
                exe = env!("CARGO_BIN_EXE_stoa"),
                node = dir.path().join("node").display(),
                logs = dir.path().display(),
            ),
        )
        .unwrap();
        let token = join_token(&s.data_dir());
        let mut site = Site {
            s,
            bridge: None,
            dir,
            conf,
            token,
            _one_at_a_time: guard,
        };
        site.start_bridge().await;
        Some(site)
    }

    /// Starts the bridge (again, on the same data directory).
    async fn start_bridge(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("bridge.log"))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
            .args(["worker", "--slurm", "--name", "slurm-bridge", "--server"])
            .arg(self.s.client.base())
            .arg("--token")
            .arg(&self.token)
            .arg("--config")
            .arg(self.dir.path().join("bridge.toml"))
            .arg("--data-dir")
            .arg(self.dir.path().join("bridge-data"))
            .env("SLURM_CONF", &self.conf)
            .env_remove("STOA_DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the bridge starts");
        self.bridge = Some(child);
        let store = self.s.handle.as_ref().unwrap().store.clone();
        registered(store.as_ref(), &["slurm-bridge"]).await;
    }

    /// SIGKILL of the bridge.
    fn kill_bridge(&mut self) {
        if let Some(mut c) = self.bridge.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn bridge_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bridge.log")).unwrap_or_default()
    }

    fn squeue(&self) -> Vec<(String, String, String)> {
        let out = slurm_cmd(
            &self.conf,
            "squeue",
            &["-h", "--states=all", "-o", "%i|%j|%T"],
        );
        out.lines()
            .filter_map(|l| {
                let mut f = l.split('|');
                Some((
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                ))
            })
            .collect()
    }

    /// Slurm's state of job `job`.
    fn job_state(&self, job: &str) -> Option<String> {
        self.squeue()
            .into_iter()
            .find(|(id, _, _)| id == job)
            .map(|(_, _, s)| s)
    }

    /// Waits (up to a minute) until the run's record satisfies `f`.
    async fn wait_for(
        &self,
        id: &str,
        what: &str,
        f: impl Fn(&ExecutionRecord) -> bool,
    ) -> ExecutionRecord {
        self.wait_longer(id, what, Duration::from_secs(60), f).await
    }

    /// Waits up to `limit` until the run's record satisfies `f`.
    async fn wait_longer(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        f: impl Fn(&ExecutionRecord) -> bool,
    ) -> ExecutionRecord {
        let mut last = None;
        for _ in 0..limit.as_millis() / 100 {
            let r = self.s.client.execution(id).await.unwrap();
            if f(&r) {
                return r;
            }
            last = Some(r);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "run {id} never {what}: {last:#?}\nbridge log:\n{}",
            self.bridge_log()
        );
    }

    /// Waits until no job of Slurm is live any more (pending, running, completing).
    async fn slurm_idle(&self) {
        for _ in 0..300 {
            let live = self.squeue().into_iter().any(|(_, _, s)| {
                matches!(
                    s.as_str(),
                    "PENDING" | "RUNNING" | "COMPLETING" | "CONFIGURING"
                )
            });
            if !live {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Slurm still has live jobs: {:?}", self.squeue());
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill_bridge();
        let _ = slurm_cmd(&self.conf, "scancel", &["--full", "-u", "root"]);
    }
}

fn slurm_cmd(conf: &str, cmd: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(cmd)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} runs: {e}"));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The run's id from the official client's output.
fn execution_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Execution ID:")
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| panic!("an execution id in {stdout}"))
}

fn running_and_printed(r: &ExecutionRecord, line: &str) -> bool {
    r.status == RunStatus::Running && r.stdout.contains(line)
}

/// Python (requirements and a local module), image and compose runs submitted with
/// the official client to the profile the bridge serves complete in Slurm jobs with
/// their output, exit code and metrics; the fleet shows the bridge with its cluster.
#[tokio::test]
async fn slurm_runs_python_image_and_compose_from_the_official_client() {
    let Some(site) = Site::start().await else {
        return;
    };
    let s = &site.s;
    let Some(ly) = Lyceum::login(s).await else {
        return;
    };
    let w = ly.home.path();
    std::fs::write(w.join("util.py"), "VALUE = 7\n").unwrap();
    std::fs::write(w.join("requirements.txt"), "six==1.16.0\n").unwrap();
    std::fs::write(
        w.join("job.py"),
        "import sys, time\nimport six\nimport util\n\
         t = time.time()\nwhile time.time() - t < 1.5:\n    pass\n\
         print('value', util.VALUE, six.__version__, sys.argv[1:])\nsys.exit(3)\n",
    )
    .unwrap();
    let o = ly
        .run(&[
            "python",
            "run",
            "job.py",
            "-m",
            "cpu",
            "-r",
            "requirements.txt",
            "--",
            "one",
        ])
        .await;
    assert!(
        o.stdout.contains("value 7 1.16.0 ['one']"),
        "{}{}\n{}",
        o.stdout,
        o.stderr,
        site.bridge_log()
    );
    let id = execution_id(&o.stdout);
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.return_code, Some(3), "{r:#?}");
    let job = r
        .slurm_job_id
        .clone()
        .expect("the record names its Slurm job");
    // `stoa exec` reported the end, then leaves: its job completes.
    for _ in 0..100 {
        if matches!(site.job_state(&job).as_deref(), Some("COMPLETED") | None) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        matches!(site.job_state(&job).as_deref(), Some("COMPLETED") | None),
        "{:?}",
        site.squeue()
    );
    assert!(r.phases.iter().any(|p| p.phase == "started"), "{r:#?}");
    let m = s.client.metrics(&id, "1s").await.unwrap();
    let cpu = m["systemCpuUsagePercent"].as_array().unwrap();
    assert!(!cpu.is_empty(), "samples from the node: {m}");

    // `stoa jobs status` shows the Slurm job.
    let o = super::cli::stoa(&["jobs", "status", &id], s, w).await;
    assert!(
        o.stdout.contains("slurm job") && o.stdout.contains(&job),
        "{}",
        o.stdout
    );

    if super::docker_runs::engine_ready() {
        let o = ly
            .run(&[
                "docker",
                "run",
                "local/busybox:full",
                "-m",
                "cpu",
                "-c",
                "sh -c 'echo image says $FOO; sleep 1'",
                "-e",
                "FOO=hello",
            ])
            .await;
        assert_eq!(o.code, 0, "{}{}\n{}", o.stdout, o.stderr, site.bridge_log());
        assert!(
            o.stdout.lines().any(|l| l == "image says hello"),
            "{}",
            o.stdout
        );
        let r = s.wait_end(&execution_id(&o.stdout)).await;
        assert_status(&r, RunStatus::Completed);
        assert_eq!(r.return_code, Some(0));
        assert!(r.slurm_job_id.is_some(), "{r:#?}");

        std::fs::write(
            w.join("compose.yml"),
            "services:\n  web:\n    image: local/busybox:full\n    command: [\"sh\", \"-c\", \"echo index > /tmp/index.html && exec httpd -f -p 8000 -h /tmp\"]\n    init: true\n    healthcheck: {test: [\"CMD\", \"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1:8000/\"], interval: 200ms, retries: 50}\n  check:\n    image: local/busybox:full\n    command: sh -c \"echo fetched $$(wget -qO- http://web:8000/)\"\n    depends_on: {web: {condition: service_healthy}}\n",
        )
        .unwrap();
        let o = ly
            .run(&["compose", "run", "compose.yml", "-m", "cpu"])
            .await;
        assert_eq!(o.code, 0, "{}{}\n{}", o.stdout, o.stderr, site.bridge_log());
        assert!(
            o.stdout.lines().any(|l| l == "check | fetched index"),
            "{}",
            o.stdout
        );
        let id = execution_id(&o.stdout);
        let r = s.wait_end(&id).await;
        assert_status(&r, RunStatus::Completed);
        assert!(r.slurm_job_id.is_some(), "{r:#?}");
        let left = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=stoa.run={id}")])
            .output()
            .unwrap();
        assert!(left.stdout.is_empty(), "no container of the run is left");
    }

    // The fleet: the bridge with its cluster and partition; the profile it serves.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["workers", "list", "--data-dir"])
        .arg(s.data_dir())
        .envs(database_env(&s.data_dir()))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(
        list.contains("slurm-bridge") && list.contains("slurm:stoa-test[debug]"),
        "{list}"
    );
    let o = ly
        .run(&["python", "run", "print(1)", "-m", "cpu", "-d"])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let types = s.client.machine_types().await.unwrap();
    assert!(format!("{types:?}").contains("cpu"), "{types:?}");
}

/// A run waits behind a Slurm job that holds the node with Slurm's own reason, its
/// Slurm job shown; it runs once the node frees.
#[tokio::test]
async fn slurm_pending_reason_is_slurms_own() {
    let Some(site) = Site::start().await else {
        return;
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let blocker = slurm_cmd(
        &site.conf,
        "sbatch",
        &[
            "--parsable",
            "-J",
            "holds-the-node",
            &format!("--cpus-per-task={cpus}"),
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 300",
        ],
    )
    .trim()
    .to_string();
    for _ in 0..100 {
        if site.job_state(&blocker).as_deref() == Some("RUNNING") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(site.job_state(&blocker).as_deref(), Some("RUNNING"));
    let (id, _) = site.s.start_code("print('ran after the node freed')").await;
    let r = site
        .wait_for(&id, "waited for Slurm: Resources", |r| {
            r.pending_reason.as_deref() == Some("Slurm: Resources")
        })
        .await;
    assert_eq!(r.status, RunStatus::Starting, "{r:#?}");
    let job = r.slurm_job_id.clone().expect("its Slurm job is named");
    assert_eq!(site.job_state(&job).as_deref(), Some("PENDING"));
    // Still waiting a little later: the reason holds while the node is held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = site.s.client.execution(&id).await.unwrap();
    assert_eq!(r.pending_reason.as_deref(), Some("Slurm: Resources"));
    slurm_cmd(&site.conf, "scancel", &[&blocker]);
    let r = site.s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert!(r.stdout.contains("ran after the node freed"), "{r:#?}");
    assert!(r.pending_reason.is_none());
}

/// Abort and stop of a run Slurm placed: its Slurm job is gone, its processes on the
/// node are gone, and it ends `aborted` or `cancelled` (a stop lets the run's TERM
/// handler finish within the grace period).
#[tokio::test]
async fn slurm_abort_and_stop_end_the_job_and_its_processes() {
    let Some(site) = Site::start().await else {
        return;
    };
    let s = &site.s;
    let (id, _) = s
        .start_code("import time\nprint('up', flush=True)\ntime.sleep(300)\n")
        .await;
    let r = site
        .wait_for(&id, "ran", |r| running_and_printed(r, "up"))
        .await;
    let job = r.slurm_job_id.clone().unwrap();
    s.client.abort(&id).await.unwrap();
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Aborted);
    assert!(
        processes_gone(&id).await.is_empty(),
        "the run's processes are gone"
    );
    site.slurm_idle().await;
    assert_ne!(site.job_state(&job).as_deref(), Some("RUNNING"));

    let code = "import signal, sys, time\n\
                def term(*_):\n    print('stopping cleanly', flush=True)\n    sys.exit(5)\n\
                signal.signal(signal.SIGTERM, term)\n\
                print('up', flush=True)\ntime.sleep(300)\n";
    let (id, _) = s.start_code(code).await;
    let r = site
        .wait_for(&id, "ran", |r| running_and_printed(r, "up"))
        .await;
    let job = r.slurm_job_id.clone().unwrap();
    s.client.stop(&id).await.unwrap();
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Cancelled);
    assert!(r.stdout.contains("stopping cleanly"), "{r:#?}");
    assert!(
        processes_gone(&id).await.is_empty(),
        "the run's processes are gone"
    );
    site.slurm_idle().await;
    assert_ne!(site.job_state(&job).as_deref(), Some("RUNNING"));
}

/// A job an admin cancels with `scancel`, and a job Slurm kills at its time limit:
/// the run ends with the mapped state and a reason naming Slurm's state; its output so
/// far is kept.
#[tokio::test]
async fn slurm_admin_scancel_and_time_limit_end_the_run_with_slurms_reason() {
    let Some(site) = Site::start().await else {
        return;
    };
    let s = &site.s;
    let code = "import time\nprint('up', flush=True)\ntime.sleep(300)\n";
    let (id, _) = s.start_code(code).await;
    let r = site
        .wait_for(&id, "ran", |r| running_and_printed(r, "up"))
        .await;
    let job = r.slurm_job_id.clone().unwrap();
    slurm_cmd(&site.conf, "scancel", &[&job]);
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Aborted);
    let err = r.result.error.clone().unwrap_or_default();
    assert!(err.starts_with("Slurm: CANCELLED"), "{r:#?}");
    assert!(r.stdout.contains("up"), "output so far is kept: {r:#?}");
    assert!(
        processes_gone(&id).await.is_empty(),
        "the run's processes are gone"
    );

    // The time limit: an admin shortens it to Slurm's least, a minute; slurmctld
    // enforces limits on its own tick (every 30 s).
    let (id, _) = s.start_json(json!({"code": code, "timeout": 300})).await;
    let r = site
        .wait_for(&id, "ran", |r| running_and_printed(r, "up"))
        .await;
    let job = r.slurm_job_id.clone().unwrap();
    slurm_cmd(
        &site.conf,
        "scontrol",
        &["update", &format!("JobId={job}"), "TimeLimit=1"],
    );
    let r = site
        .wait_longer(&id, "ended", Duration::from_secs(150), |r| {
            r.status.is_terminal()
        })
        .await;
    assert_status(&r, RunStatus::Failed);
    let err = r.result.error.clone().unwrap_or_default();
    assert!(err.starts_with("Slurm: TIMEOUT"), "{r:#?}");
    let full = s.client.execution(&id).await.unwrap();
    assert!(full.stdout.contains("up"), "{full:#?}");
    assert!(
        processes_gone(&id).await.is_empty(),
        "the run's processes are gone"
    );
}

/// kill -9 of the bridge while two runs are in Slurm: after its restart both finish,
/// and each run was submitted once.
#[tokio::test]
async fn slurm_bridge_killed_mid_run_restarts_without_submitting_twice() {
    let Some(mut site) = Site::start().await else {
        return;
    };
    let code = "import time\nprint('up', flush=True)\ntime.sleep(4)\nprint('done')\n";
    let (a, _) = site.s.start_code(code).await;
    let (b, _) = site.s.start_code(code).await;
    for id in [&a, &b] {
        site.wait_for(id, "was submitted", |r| r.slurm_job_id.is_some())
            .await;
    }
    site.kill_bridge();
    tokio::time::sleep(Duration::from_secs(1)).await;
    site.start_bridge().await;
    for id in [&a, &b] {
        let r = site.s.wait_end(id).await;
        assert_status(&r, RunStatus::Completed);
        assert!(r.stdout.contains("done"), "{r:#?}");
        let jobs: Vec<_> = site
            .squeue()
            .into_iter()
            .filter(|(_, name, _)| *name == format!("stoa-{id}"))
            .collect();
        assert_eq!(jobs.len(), 1, "one job per run: {jobs:?}");
    }
    // Nothing is left of them in the bridge's records.
    let records = site.dir.path().join("bridge-data/slurm");
    let empty = || std::fs::read_dir(&records).unwrap().next().is_none();
    for _ in 0..50 {
        if empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(empty(), "the bridge forgets ended runs");
}

/// A run in a Slurm job cannot reach what its job was given to reach the server (the
/// bridge's worker token and the lease token in the job's environment): neither its
/// environment nor any process it can see holds them.
#[tokio::test]
async fn slurm_job_credentials_are_out_of_the_runs_reach() {
    let Some(site) = Site::start().await else {
        return;
    };
    let code = r#"
import os
found = [k for k in os.environ if k.startswith(('STOA_EXEC_', 'SLURM'))]
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            env = open(f'/proc/{pid}/environ', 'rb').read()
        except OSError:
            continue
        if b'STOA_EXEC_WORKER_TOKEN' in env or b'swk_' in env:
            found.append(pid)
print('found', found)
"#;
    let (id, _) = site.s.start_json(json!({"code": code})).await;
    let r = site.s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert!(r.stdout.contains("found []"), "{r:#?}");
    // The token the job was given is the bridge's; nothing of it is in the output.
    assert!(!r.stdout.contains("swk_"));
}
