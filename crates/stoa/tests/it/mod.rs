//! Shared harness and the test modules.

mod api;
mod chaos;
mod cli;
mod compose_runs;
mod docker_runs;
mod fleet;
mod leases;
mod metrics;
mod packaging;
mod ports;
mod postgres;
mod python_runs;
mod restart;
mod retention;
mod scheduling;
mod secrets_callbacks;
mod security;
mod slurm;
mod storage;
mod streams;
mod ui;
mod warm;

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use stoa_client::{Client, SseEvent};
use stoa_server::{Config, ServerHandle};
use stoa_types::{ExecutionRecord, PythonStartRequest, RunStatus, StreamEvent};

/// The admin key every test server is preset with.
pub const ADMIN_KEY: &str = "lk_testtesttesttesttesttest0001";

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (30 s at most, then fails) until something accepts connections on loopback
/// `port`.
pub fn wait_listening(port: u16) {
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port} after 30 s");
}

/// Asserts that `text` is the lines `1` to `n`, then `last` when given: all of a run's
/// output kept, to its last line. `what` names it in the failure.
pub fn assert_counted(text: &str, n: u32, last: Option<&str>, what: &str) {
    let mut want: String = (1..=n).map(|i| format!("{i}\n")).collect();
    if let Some(l) = last {
        want.push_str(l);
        want.push('\n');
    }
    assert!(
        text == want,
        "{what}: {} lines, ending {:?}",
        text.lines().count(),
        &text[text.floor_char_boundary(text.len().saturating_sub(40))..]
    );
}

/// True when running under CI, where a missing engine is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says that a test cannot run without `what`; under CI that is a failure.
pub fn missing(what: &str) {
    if in_ci() {
        panic!("{what} is required under CI=true but is missing");
    }
    eprintln!("SKIPPED: {what} is missing; this test needs it");
}

/// Whether the test servers keep their state in PostgreSQL (`STOA_TEST_STORE=postgres`,
/// in databases made in the cluster `STOA_TEST_DATABASE_URL` names) rather than SQLite.
pub fn on_postgres() -> bool {
    std::env::var("STOA_TEST_STORE").as_deref() == Ok("postgres")
}

/// The PostgreSQL database of the server whose directory is `dir`, when the suite runs
/// on PostgreSQL: made for its first start, the same for every restart on `dir`.
pub async fn postgres_for(dir: &std::path::Path) -> Option<String> {
    if !on_postgres() {
        return None;
    }
    let file = dir.join("database.url");
    if let Ok(url) = std::fs::read_to_string(&file) {
        return Some(url);
    }
    let url = stoa_store::conformance::fresh_postgres_url()
        .await
        .expect("STOA_TEST_STORE=postgres needs STOA_TEST_DATABASE_URL");
    std::fs::write(&file, &url).unwrap();
    Some(url)
}

/// The `STOA_DATABASE_URL` setting (none on SQLite) for `stoa` commands run on the
/// data directory `data` of a test server, so they open the server's store.
pub fn database_env(data: &std::path::Path) -> Vec<(&'static str, String)> {
    [Some(data), data.parent()]
        .into_iter()
        .flatten()
        .find_map(|d| std::fs::read_to_string(d.join("database.url")).ok())
        .map(|url| ("STOA_DATABASE_URL", url))
        .into_iter()
        .collect()
}

/// Everything the store of the server in `dir` holds, as bytes: the SQLite database and
/// its write-ahead log, or a `pg_dump` of its PostgreSQL database (for tests that look
/// for a value that must never be stored in the clear).
pub async fn store_bytes(dir: &std::path::Path) -> Vec<Vec<u8>> {
    match postgres_for(dir).await {
        Some(url) => {
            let bin = std::fs::read_dir("/usr/lib/postgresql")
                .ok()
                .and_then(|d| d.flatten().map(|e| e.path().join("bin/pg_dump")).max())
                .unwrap_or_else(|| "pg_dump".into());
            let o = std::process::Command::new(bin)
                .args(["--data-only", "--dbname", &url])
                .output()
                .expect("pg_dump runs");
            assert!(o.status.success(), "pg_dump: {o:?}");
            vec![o.stdout]
        }
        None => ["stoa.db", "stoa.db-wal"]
            .iter()
            .map(|f| std::fs::read(dir.join("data").join(f)).unwrap_or_default())
            .collect(),
    }
}

/// A server with its own data directory, and a client with the admin key.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub client: Client,
    pub dir: tempfile::TempDir,
    /// Spare networks the server keeps (`docker.network_pool`).
    pub spares: usize,
}

impl TestServer {
    /// A server with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server with settings changed by `f`.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, f).await
    }

    /// A server on an existing data directory.
    pub async fn start_in(dir: tempfile::TempDir, f: impl FnOnce(&mut Config)) -> Self {
        match Self::try_start_in(dir, f).await {
            Ok(s) => s,
            Err((e, _)) => panic!("server starts: {e:#}"),
        }
    }

    /// Like `start_in`, handing back the error (and the directory) when start fails.
    pub async fn try_start_in(
        dir: tempfile::TempDir,
        f: impl FnOnce(&mut Config),
    ) -> Result<Self, (anyhow::Error, tempfile::TempDir)> {
        let mut cfg = Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join("data"),
            admin_key: Some(ADMIN_KEY.into()),
            ..Default::default()
        };
        cfg.limits.shutdown_grace_s = 1;
        // Many test servers share one engine and most are dropped without a graceful
        // stop: no spare networks, so none are left behind (the pool has its own test).
        cfg.docker.network_pool = 0;
        // A run's network goes when the run ends (it is recycled only while demand lasts).
        cfg.docker.network_idle_s = 0;
        // Hundreds of servers start in a run of the suite: a small reserve each (the
        // full-disk test sets its own).
        cfg.limits.disk_reserve_bytes = 1024 * 1024;
        cfg.store.url = postgres_for(dir.path()).await;
        f(&mut cfg);
        let spares = cfg.docker.network_pool;
        let handle = match stoa::start(cfg).await {
            Ok(h) => h,
            Err(e) => return Err((e, dir)),
        };
        let client = Client::new(&handle.url(), ADMIN_KEY);
        Ok(TestServer {
            handle: Some(handle),
            client,
            dir,
            spares,
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server and hands back its directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.handle.take().unwrap().shutdown().await.unwrap();
        self.dir
    }

    /// Starts a snippet and returns its id and stream URL.
    pub async fn start_code(&self, code: &str) -> (String, String) {
        let s = self
            .client
            .start_python(&PythonStartRequest {
                code: code.into(),
                ..Default::default()
            })
            .await
            .expect("start accepted");
        (s.execution_id, s.streaming_url)
    }

    /// Starts a run from a JSON body.
    pub async fn start_json(&self, body: serde_json::Value) -> (String, String) {
        let s = self
            .client
            .start_python_json(&body)
            .await
            .expect("start accepted");
        (s.execution_id, s.streaming_url)
    }

    /// The platform metrics from the unauthenticated `metrics.listen` address.
    pub async fn scrape_metrics(&self) -> String {
        let addr = self.handle.as_ref().unwrap().metrics_addr.unwrap();
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until the run has ended and returns its record.
    pub async fn wait_end(&self, id: &str) -> ExecutionRecord {
        wait_end(&self.client, id).await
    }
}

/// A client of a new org `slug` (another tenant than the admin's), and its key in
/// clear (to send raw requests with).
pub async fn org_with_key(s: &TestServer, slug: &str) -> (Client, String) {
    let store = s.handle.as_ref().unwrap().store.clone();
    let org = store.create_org(slug, slug).await.unwrap();
    let secret = stoa_server::auth::generate_key();
    store
        .insert_key(&stoa_server::auth::key_record(&secret, &org, slug, false))
        .await
        .unwrap();
    (Client::new(s.client.base(), &secret), secret)
}

/// A client of a new org `slug`: in the security tests, the attacker.
pub async fn other_org(s: &TestServer, slug: &str) -> Client {
    org_with_key(s, slug).await.0
}

/// The keys of an org's storage, as `storage/list-files` lists them.
pub async fn storage_keys(c: &Client) -> Vec<String> {
    let list: serde_json::Value = c
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
    list["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"].as_str().unwrap().to_string())
        .collect()
}

/// The `loc` of every entry of a 422 reply's `detail`, joined with dots.
pub fn locs(v: &serde_json::Value) -> Vec<String> {
    v["detail"]
        .as_array()
        .expect("422 detail is a list")
        .iter()
        .map(|e| {
            e["loc"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect()
}

/// Polls until a run has ended (60 s at most).
pub async fn wait_end(client: &Client, id: &str) -> ExecutionRecord {
    let mut last = None;
    for _ in 0..600 {
        let r = client.execution(id).await.unwrap();
        if r.status.is_terminal() {
            return r;
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Where it stopped, to tell a hang from a slow start.
    let r = last.expect("polled at least once");
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|p| format!("{} {}", p.phase, p.at))
        .collect();
    panic!(
        "run {id} did not end in time: {}, pending reason {:?}, phases {phases:?}, output {:?}",
        r.status, r.pending_reason, r.stdout
    );
}

/// Everything a stream delivers until it closes: (output text, events in order).
pub async fn read_stream(
    client: &Client,
    url: &str,
    last_event_id: Option<&str>,
) -> (String, Vec<SseEvent>) {
    let mut s = client
        .stream(url, last_event_id)
        .await
        .expect("stream opens");
    let mut text = String::new();
    let mut events = Vec::new();
    let read = async {
        while let Some(ev) = s.next().await {
            let ev = ev.expect("stream event");
            if let StreamEvent::Output(o) = &ev.event {
                text.push_str(&o.content);
            }
            events.push(ev);
        }
    };
    tokio::time::timeout(Duration::from_secs(90), read)
        .await
        .expect("stream ends in time");
    (text, events)
}

/// Reads a stream until its output contains `needle`, then drops it.
pub async fn wait_output(client: &Client, url: &str, needle: &str) {
    let mut s = client.stream(url, None).await.expect("stream opens");
    let mut text = String::new();
    let read = async {
        while let Some(ev) = s.next().await {
            if let StreamEvent::Output(o) = ev.expect("stream event").event {
                text.push_str(&o.content);
                if text.contains(needle) {
                    return;
                }
            }
        }
        panic!("stream ended before {needle:?} appeared; got {text:?}");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("output in time");
}

/// The jobFinished event of a finished stream.
pub fn finished(events: &[SseEvent]) -> &stoa_types::JobFinished {
    let fins: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            StreamEvent::JobFinished(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(fins.len(), 1, "exactly one jobFinished");
    assert!(
        matches!(events.last().unwrap().event, StreamEvent::JobFinished(_)),
        "jobFinished comes last"
    );
    fins[0]
}

/// Pids of live processes carrying the run's id in their environment.
/// Waits (up to 15 s) until no process of run `id` is left; returns those left.
pub async fn processes_gone(id: &str) -> Vec<u32> {
    let mut left = run_processes(id);
    for _ in 0..150 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = run_processes(id);
    }
    left
}

pub fn run_processes(id: &str) -> Vec<u32> {
    let want = format!("STOA_EXECUTION_ID={id}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().starts_with('Z'))
            .unwrap_or(true)
        {
            continue;
        }
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
            && env.split(|&b| b == 0).any(|kv| kv == want.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// Asserts the status of a record, showing the record when it differs.
pub fn assert_status(r: &ExecutionRecord, want: RunStatus) {
    assert_eq!(r.status, want, "record: {r:#?}");
}
