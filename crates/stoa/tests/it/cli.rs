//! The `stoa` CLI and the official `lyceum` CLI against a real server.

use std::path::{Path, PathBuf};

use stoa_types::RunStatus;

use super::*;

pub(crate) struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

async fn run_cmd(bin: &Path, args: &[&str], home: &Path, url: &str, cwd: &Path) -> Out {
    let o = tokio::process::Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env("COLUMNS", "200")
        .env("STOA_URL", url)
        .env("STOA_API_KEY", ADMIN_KEY)
        .output()
        .await
        .expect("command runs");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The run id a detached (`-d`) start printed.
fn detached_id(o: &Out) -> String {
    o.stdout
        .trim()
        .strip_prefix("Execution ID: ")
        .unwrap_or_else(|| panic!("an execution id: {}{}", o.stdout, o.stderr))
        .to_string()
}

pub(crate) async fn stoa(args: &[&str], s: &TestServer, cwd: &Path) -> Out {
    run_cmd(
        Path::new(env!("CARGO_BIN_EXE_stoa")),
        args,
        s.dir.path(),
        s.client.base(),
        cwd,
    )
    .await
}

#[tokio::test]
async fn stoa_python_run_bundles_local_imports_and_passes_arguments() {
    let s = TestServer::start().await;
    let w = tempfile::tempdir().unwrap();
    std::fs::write(
        w.path().join("helper.py"),
        "def shout(s):\n    return s.upper()\n",
    )
    .unwrap();
    std::fs::create_dir(w.path().join("pkg")).unwrap();
    std::fs::write(
        w.path().join("pkg/__init__.py"),
        "from .names import NAME\n",
    )
    .unwrap();
    std::fs::write(w.path().join("pkg/names.py"), "NAME = 'stoa'\n").unwrap();
    std::fs::write(
        w.path().join("main.py"),
        "from __future__ import annotations\nimport sys\nimport helper\nfrom pkg import NAME\nprint(helper.shout(NAME), sys.argv[1:])\n",
    )
    .unwrap();
    let o = stoa(
        &["python", "run", "main.py", "--", "x", "--flag"],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, "STOA ['x', '--flag']\n");
    assert!(o.stderr.contains("Execution ID: "), "{}", o.stderr);
}

#[tokio::test]
async fn stoa_exit_codes_follow_the_run() {
    let s = TestServer::start().await;
    let w = tempfile::tempdir().unwrap();
    let o = stoa(
        &["python", "run", "import sys; print('x'); sys.exit(3)"],
        &s,
        w.path(),
    )
    .await;
    assert_eq!((o.code, o.stdout.as_str()), (3, "x\n"), "{}", o.stderr);
    let o = stoa(
        &["python", "run", "import time; time.sleep(30)", "-t", "1"],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 124, "{}", o.stderr);
    assert!(o.stderr.contains("timeout after 1 s"));
    let o = stoa(&["python", "run", "raise SystemExit(0)"], &s, w.path()).await;
    assert_eq!(o.code, 0);
    let o = stoa(
        &["python", "run", "print(1)", "-m", "gpu.nope"],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("execution_type"), "{}", o.stderr);
}

#[tokio::test]
async fn stoa_jobs_commands() {
    let s = TestServer::start().await;
    let w = tempfile::tempdir().unwrap();
    let o = stoa(&["python", "run", "print('listed')", "-d"], &s, w.path()).await;
    assert_eq!(o.code, 0);
    let id = detached_id(&o);
    s.wait_end(&id).await;
    let o = stoa(&["jobs", "history", "--json"], &s, w.path()).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["executions"][0]["execution_id"], id.as_str());
    let o = stoa(&["jobs", "status", &id], &s, w.path()).await;
    assert!(
        o.stdout.contains("completed") && o.stdout.contains("timeline"),
        "{}",
        o.stdout
    );
    let o = stoa(&["jobs", "logs", &id], &s, w.path()).await;
    assert!(
        o.stdout.contains("listed") && o.stdout.contains("1 entries"),
        "{}",
        o.stdout
    );
    let o = stoa(&["jobs", "logs", &id, "--follow"], &s, w.path()).await;
    assert_eq!((o.code, o.stdout.as_str()), (0, "listed\n"));
    let o = stoa(&["jobs", "history"], &s, w.path()).await;
    assert!(o.stdout.starts_with("ID "), "{}", o.stdout);
    let o = stoa(&["jobs", "delete", &id], &s, w.path()).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = stoa(&["jobs", "status", &id], &s, w.path()).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("HTTP 404"), "{}", o.stderr);
}

#[tokio::test]
async fn stoa_login_and_keys_for_a_second_org() {
    let s = TestServer::start().await;
    let data = s.data_dir();
    let w = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_stoa"));
    let home = w.path();
    let db_env = &database_env(&data);
    let run = |args: Vec<String>| async move {
        let o = tokio::process::Command::new(bin)
            .args(&args)
            .env("HOME", home)
            .envs(db_env.iter().cloned())
            .env_remove("STOA_URL")
            .env_remove("STOA_API_KEY")
            .output()
            .await
            .unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let d = data.display().to_string();
    let (code, key, err) = run(vec![
        "keys".into(),
        "create".into(),
        "--org".into(),
        "team-c".into(),
        "--data-dir".into(),
        d.clone(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let key = key.trim().to_string();
    assert!(key.starts_with("lk_"));
    let (code, _, err) = run(vec![
        "login".into(),
        "--url".into(),
        s.client.base().into(),
        "--api-key".into(),
        key.clone(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(vec![
        "python".into(),
        "run".into(),
        "print('from c')".into(),
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "from c\n"));
    assert_eq!(
        s.client.history(10, 0).await.unwrap().total_executions,
        0,
        "team-c's run is not the default org's"
    );
    let (code, out, _) = run(vec![
        "keys".into(),
        "list".into(),
        "--json".into(),
        "--data-dir".into(),
        d.clone(),
    ])
    .await;
    assert_eq!(code, 0);
    assert!(!out.contains(&key), "secrets are never listed");
    let prefix: String = key.chars().take(11).collect();
    let (code, _, _) = run(vec![
        "keys".into(),
        "revoke".into(),
        prefix,
        "--data-dir".into(),
        d,
    ])
    .await;
    assert_eq!(code, 0);
    let (code, _, err) = run(vec!["jobs".into(), "list".into()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
}

/// The official client, installed by the test command into target/lyceum-venv.
/// The official CLI with a home of its own, logged in to a test server.
pub(crate) struct Lyceum {
    bin: PathBuf,
    pub home: tempfile::TempDir,
    url: String,
}

impl Lyceum {
    /// Logs in; `None` (said as missing) when the CLI is not installed.
    pub async fn login(s: &TestServer) -> Option<Self> {
        let Some(bin) = lyceum_bin() else {
            missing("the official lyceum CLI (lyceum-cli 1.2.2; scripts/test installs it)");
            return None;
        };
        let ly = Lyceum {
            bin,
            home: tempfile::tempdir().unwrap(),
            url: s.client.base().to_string(),
        };
        let o = ly
            .run(&["auth", "login", "--api-key", ADMIN_KEY, "--url", &ly.url])
            .await;
        assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
        Some(ly)
    }

    /// Runs `lyceum ARGS` in its home.
    pub async fn run(&self, args: &[&str]) -> Out {
        let w = self.home.path();
        run_cmd(&self.bin, args, w, &self.url, w).await
    }
}

pub fn lyceum_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LYCEUM_BIN") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/lyceum-venv/bin/lyceum");
    p.exists().then_some(p)
}

/// `stoa migrate` applies the store's migrations without a server, says so, is a no-op
/// the second time, and a server then starts on the migrated store.
#[tokio::test]
async fn stoa_migrate_applies_migrations_alone() {
    let w = tempfile::tempdir().unwrap();
    let data = w.path().join("data");
    // On PostgreSQL: the database the server below starts on.
    let url = postgres_for(w.path()).await;
    let migrate = |dir: &Path, url: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"));
        c.args(["migrate", "--data-dir"]).arg(dir);
        if let Some(u) = url {
            c.args(["--database-url", u]);
        }
        c.output().unwrap()
    };
    let o = migrate(&data, url.as_deref());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains("from schema version 0 to "), "{out}");
    let o = migrate(&data, url.as_deref());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("is up to date (schema version "), "{out}");
    if url.is_none() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("stoa.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the database is its owner's only: {mode:o}"
        );
        // A data directory that is a file: a plain error, exit 1.
        let file = w.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let o = migrate(&file, None);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("error: "), "{err}");
    }
    // A PostgreSQL nobody answers at: a plain error naming it (no password), exit 1.
    let port = free_port();
    let o = migrate(
        &data,
        Some(&format!("postgres://stoa:hunter2@127.0.0.1:{port}/stoa")),
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ")
            && err.contains("cannot reach PostgreSQL at postgres://stoa:***@127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    // The server starts on the migrated store.
    let s = TestServer::start_in(w, |_| {}).await;
    assert!(s.client.machine_types().await.is_ok());
}

#[tokio::test]
async fn official_lyceum_cli_logs_in_and_runs() {
    let Some(lyceum) = lyceum_bin() else {
        return missing("the official lyceum CLI (lyceum-cli 1.2.2; scripts/test installs it)");
    };
    let s = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let w = home.path();
    let url = s.client.base().to_string();
    let o = run_cmd(
        &lyceum,
        &["auth", "login", "--api-key", ADMIN_KEY, "--url", &url],
        w,
        &url,
        w,
    )
    .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("Successfully authenticated"),
        "{}",
        o.stdout
    );

    let o = run_cmd(
        &lyceum,
        &["python", "run", "print('hi')", "-m", "cpu"],
        w,
        &url,
        w,
    )
    .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.lines().any(|l| l == "hi"), "{}", o.stdout);

    let o = run_cmd(
        &lyceum,
        &["python", "run", "import sys; sys.exit(4)", "-m", "cpu"],
        w,
        &url,
        w,
    )
    .await;
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("exit code 4"), "{}", o.stdout);

    // A file with arguments and a local module, bundled by the official client.
    std::fs::write(w.join("util.py"), "VALUE = 7\n").unwrap();
    std::fs::write(
        w.join("job.py"),
        "import sys\nimport util\nprint('value', util.VALUE, sys.argv[1:])\n",
    )
    .unwrap();
    let o = run_cmd(
        &lyceum,
        &["python", "run", "job.py", "-m", "cpu", "--", "one", "two"],
        w,
        &url,
        w,
    )
    .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("value 7 ['one', 'two']"), "{}", o.stdout);

    let o = run_cmd(&lyceum, &["jobs", "history", "--json"], w, &url, w).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let id = s.client.history(1, 0).await.unwrap().executions[0]
        .execution_id
        .clone();
    let o = run_cmd(&lyceum, &["jobs", "status", &id], w, &url, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("completed"), "{}", o.stdout);
    let o = run_cmd(&lyceum, &["jobs", "logs", &id], w, &url, w).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("value 7"), "{}", o.stdout);
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::Completed);
}

#[tokio::test]
async fn official_lyceum_cli_docker_run_and_logs() {
    if !super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let Some(ly) = Lyceum::login(&s).await else {
        return;
    };

    let o = ly
        .run(&[
            "docker",
            "run",
            "local/busybox:full",
            "-m",
            "cpu",
            "-c",
            "sh -c 'echo hi $FOO'",
            "-e",
            "FOO=bar",
        ])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.lines().any(|l| l == "hi bar"), "{}", o.stdout);

    let o = ly
        .run(&[
            "docker",
            "run",
            "local/busybox:full",
            "-m",
            "cpu",
            "-c",
            "echo detached output",
            "-d",
        ])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let id = o
        .stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Execution ID:")
                .map(|x| x.trim().to_string())
        })
        .expect("an execution id");
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
    let o = ly.run(&["docker", "logs", &id]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("detached output"), "{}", o.stdout);

    let o = ly
        .run(&[
            "docker",
            "run",
            "local/busybox:full",
            "-m",
            "cpu",
            "-c",
            "sh -c 'exit 7'",
        ])
        .await;
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
}

#[tokio::test]
async fn stoa_env_callbacks_and_gpu_machines_commands() {
    let s = TestServer::start().await;
    let w = tempfile::tempdir().unwrap();
    let o = stoa(&["env", "set", "API_TOKEN", "tok-123456"], &s, w.path()).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = stoa(&["env", "list"], &s, w.path()).await;
    assert!(
        o.stdout.starts_with("NAME")
            && o.stdout.contains("API_TOKEN")
            && !o.stdout.contains("tok-123456"),
        "{}",
        o.stdout
    );
    let o = stoa(
        &["python", "run", "import os; print(os.environ['API_TOKEN'])"],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.stdout, "***\n", "exit {}: {}", o.code, o.stderr);
    let o = stoa(&["env", "rm", "API_TOKEN"], &s, w.path()).await;
    assert_eq!(o.code, 0);
    let o = stoa(&["env", "rm"], &s, w.path()).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("--all"), "{}", o.stderr);
    let o = stoa(&["callbacks", "secret"], &s, w.path()).await;
    assert!(o.stdout.starts_with("whsec_"), "{}", o.stdout);
    let o = stoa(&["gpu", "machines"], &s, w.path()).await;
    assert!(
        o.stdout.starts_with("PROFILE") && o.stdout.contains("cpu"),
        "{}",
        o.stdout
    );
    let o = stoa(
        &["python", "run", "print(1)", "--meta", "novalue"],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("KEY=VALUE"), "{}", o.stderr);
    // The official client's spellings too.
    let o = stoa(
        &[
            "python",
            "run",
            "print(1)",
            "--run-name",
            "parity",
            "--metadata",
            "k=v",
        ],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let runs = s.client.history(5, 0).await.unwrap().executions;
    let r = runs
        .iter()
        .find(|r| r.run_name.as_deref() == Some("parity"))
        .expect("the named run");
    assert_eq!(r.metadata.get("k").map(String::as_str), Some("v"));
}

const TWO_SERVICES: &str = r#"
services:
  web:
    image: local/busybox:full
    command: ["sh", "-c", "echo index > /tmp/index.html && exec httpd -f -p 8000 -h /tmp"]
    init: true
    healthcheck: {test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/"], interval: 200ms, retries: 50}
  check:
    image: local/busybox:full
    command: sh -c "echo fetched $$(wget -qO- http://web:8000/); exit ${CHECK_EXIT:-0}"
    depends_on: {web: {condition: service_healthy}}
"#;

#[tokio::test]
async fn official_lyceum_cli_compose_run() {
    if !super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let Some(ly) = Lyceum::login(&s).await else {
        return;
    };
    let w = ly.home.path();
    std::fs::write(w.join("compose.yml"), TWO_SERVICES).unwrap();
    let o = ly
        .run(&["compose", "run", "compose.yml", "-m", "cpu"])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.lines().any(|l| l == "check | fetched index"),
        "{}",
        o.stdout
    );
    std::fs::write(
        w.join("failing.yml"),
        TWO_SERVICES.replace("${CHECK_EXIT:-0}", "${CHECK_EXIT:-6}"),
    )
    .unwrap();
    let o = ly
        .run(&["compose", "run", "failing.yml", "-m", "cpu"])
        .await;
    assert_eq!(o.code, 1, "a failed run fails: {}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("check | fetched index"), "{}", o.stdout);
}

#[tokio::test]
async fn stoa_compose_run_streams_detaches_and_explains_rejections() {
    if !super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let w = tempfile::tempdir().unwrap();
    std::fs::write(w.path().join("compose.yml"), TWO_SERVICES).unwrap();
    let o = stoa(&["compose", "run", "compose.yml"], &s, w.path()).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("check | fetched index\n"), "{}", o.stdout);

    let o = stoa(&["compose", "run", "compose.yml", "-d"], &s, w.path()).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let id = detached_id(&o);
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.file_name.as_deref(), Some("compose.yml"));
    let o = stoa(&["compose", "logs", &id], &s, w.path()).await;
    assert!(o.stdout.contains("check | fetched index"), "{}", o.stdout);

    std::fs::write(
        w.path().join("bad.yml"),
        "services:\n  web:\n    image: x\n    build: .\n    privileged: true\n",
    )
    .unwrap();
    let o = stoa(&["compose", "run", "bad.yml"], &s, w.path()).await;
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("services.web.build") && o.stderr.contains("services.web.privileged"),
        "{}",
        o.stderr
    );
}

/// `stoa docker run` and `stoa compose run` take the official client's spellings:
/// `-f/--file-name`, `--registry-creds` with `--registry-type`, `--s3/--no-s3`,
/// `--s3-mount-path`, `--graceful-timeout`; what they cannot do is a plain error.
#[tokio::test]
async fn stoa_takes_the_official_clients_spellings() {
    let s = TestServer::start().await;
    let w = tempfile::tempdir().unwrap();
    let o = stoa(
        &[
            "docker",
            "run",
            "stoa-test/missing:1",
            "-d",
            "-f",
            "named-run",
            "--registry-creds",
            r#"{"username": "u", "password": "p"}"#,
            "--registry-type",
            "basic",
            "--s3",
            "--s3-mount-path",
            "/data",
            "--graceful-timeout",
            "3",
            "--run-name",
            "spelled",
            "--metadata",
            "k=v",
        ],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let id = detached_id(&o);
    let r = s.client.execution(&id).await.unwrap();
    assert_eq!(r.file_name.as_deref(), Some("named-run"));
    assert_eq!(r.run_name.as_deref(), Some("spelled"));
    assert_eq!(r.metadata.get("k").map(String::as_str), Some("v"));

    std::fs::write(
        w.path().join("c.yml"),
        "services:\n  a:\n    image: busybox\n",
    )
    .unwrap();
    let o = stoa(
        &[
            "compose",
            "run",
            "c.yml",
            "-d",
            "--file-name",
            "stack",
            "--graceful-timeout",
            "2",
        ],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let id = detached_id(&o);
    assert_eq!(
        s.client.execution(&id).await.unwrap().file_name.as_deref(),
        Some("stack")
    );

    // What cannot be done is said, and nothing is started.
    // Every run of the org, whatever its state.
    let all_runs = || {
        s.client.workloads(Some(
            "pending,starting,running,completed,failed,system_failure,aborted,cancelled",
        ))
    };
    let before = all_runs().await.unwrap().len();
    assert_eq!(before, 2);
    for (args, says) in [
        (
            vec!["--registry-type", "aws", "--registry-creds", "{}"],
            "not supported",
        ),
        (
            vec!["--registry-type", "basic", "--registry-creds", "not json"],
            "not JSON",
        ),
        (
            vec![
                "--registry-type",
                "basic",
                "--registry-creds",
                r#"{"username": "u"}"#,
            ],
            "\"password\"",
        ),
        (vec!["--registry-type", "basic"], "--registry-creds"),
        (vec!["--no-s3", "--s3-mount-path", "/data"], "--no-s3"),
    ] {
        let mut all = vec!["docker", "run", "busybox", "-d"];
        all.extend(args);
        let o = stoa(&all, &s, w.path()).await;
        assert_ne!(o.code, 0, "{all:?}");
        assert!(o.stderr.contains(says), "{all:?}: {}", o.stderr);
    }
    assert_eq!(all_runs().await.unwrap().len(), before);
}

/// The completion script loads in bash and completes `stoa`'s commands; the manual
/// pages are written for every command and render with `man -l`.
#[tokio::test]
async fn completions_load_in_bash_and_man_pages_render() {
    let bin = env!("CARGO_BIN_EXE_stoa");
    let w = tempfile::tempdir().unwrap();
    let script = w.path().join("stoa.bash");
    let out = std::process::Command::new(bin)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&script, &out.stdout).unwrap();
    // Sourced without error, it completes the subcommands after `stoa `.
    let probe = format!(
        "set -e; source {}; COMP_WORDS=(stoa wor); COMP_CWORD=1; COMP_LINE='stoa wor'; COMP_POINT=8; _stoa stoa wor stoa; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let o = std::process::Command::new("bash")
        .args(["-c", &probe])
        .output()
        .unwrap();
    let words = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        words.lines().any(|l| l == "worker") && words.lines().any(|l| l == "workers"),
        "{words}"
    );
    for shell in ["zsh", "fish"] {
        let o = std::process::Command::new(bin)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success() && !o.stdout.is_empty(), "{shell}");
    }
    // A shell it does not know: a plain error.
    let o = std::process::Command::new(bin)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("tcsh"));

    let man_dir = w.path().join("man");
    let o = std::process::Command::new(bin)
        .arg("man")
        .arg(&man_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for page in [
        "stoa.1",
        "stoa-server.1",
        "stoa-worker.1",
        "stoa-jobs-abort.1",
    ] {
        assert!(man_dir.join(page).is_file(), "{page}");
    }
    if std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_err()
    {
        missing("man (Debian's man-db) to render the manual pages");
        return;
    }
    let o = std::process::Command::new("man")
        .arg("-l")
        .arg(man_dir.join("stoa-server.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("NAME") && text.contains("stoa-server"),
        "{text}"
    );
    assert!(text.contains("--listen"), "{text}");
    let o = std::process::Command::new("man")
        .arg("-l")
        .arg(man_dir.join("stoa.1"))
        .env("MANPAGER", "cat")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ephemeral compute runs"),
        "the description is on the main page"
    );
}
