//! `stoa bench`: starts fresh local servers (this binary) on a temporary data directory
//! and measures trivial Python runs end to end through the HTTP API, beside bare
//! `python3 -c 'print(1)'`, then the start-request rate and memory with the worker off.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use stoa_client::Client;
use stoa_types::{PythonStartRequest, StreamEvent};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Trivial runs for the throughput measurement.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Runs measured one at a time for latency.
    #[arg(long, default_value_t = 50)]
    latency_runs: usize,
    /// Runs in flight during the throughput measurement.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Start requests sent to the server without a worker.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Instead: compare image runs of `true` in this local image with `docker run --rm`.
    #[arg(long)]
    image: Option<String>,
    /// With --image: runs measured back to back (Stoa's in a row, then docker's in a row).
    #[arg(long, default_value_t = 20)]
    in_a_row: usize,
    /// With --image: runs submitted at once (0: none), against as many `docker run --rm`
    /// with as many at a time as the server has run slots.
    #[arg(long, default_value_t = 200)]
    burst: usize,
    /// Instead: compare a one-service compose run of `true` in this local image with
    /// `docker compose up --abort-on-container-exit` followed by `down`.
    #[arg(long)]
    compose: Option<String>,
    /// Instead: time scheduling decisions with this many runs queued (3 profiles, 2 orgs).
    #[arg(long)]
    scheduler: Option<usize>,
    /// Instead: the sampler's CPU cost with this many runs (process groups) sampled each second.
    #[arg(long)]
    sampler: Option<usize>,
    /// Instead: the server's memory growth with this many parallel readers of the
    /// record and logs of a run that printed 15 MiB.
    #[arg(long)]
    readers: Option<usize>,
    /// Instead: upload and download an object of this many MiB through the S3
    /// endpoint (boto3 with the official client's transfer settings), against a plain
    /// copy of the file on the same disk.
    #[arg(long)]
    storage: Option<u64>,
    /// Instead: the control plane under a fleet of this many workers speaking the
    /// worker protocol over HTTP (claim, started, one line of output, finish per run),
    /// and the claim latency with `--queued` runs waiting.
    #[arg(long)]
    fleet: Option<usize>,
    /// With --fleet: runs the workers take.
    #[arg(long, default_value_t = 2000)]
    fleet_runs: usize,
    /// With --fleet: runs queued while claim latency is measured.
    #[arg(long, default_value_t = 10_000)]
    queued: usize,
    /// Instead: start requests/s and claim latency (with `--queued` runs waiting) on
    /// SQLite, on PostgreSQL with one server and with two sharing it. PostgreSQL: a
    /// fresh database per measure, in the cluster this URL reaches (as a user that may
    /// create databases); also `STOA_BENCH_DATABASE_URL`.
    #[arg(long, env = "STOA_BENCH_DATABASE_URL")]
    stores: Option<String>,
    /// Instead: this many trivial Python runs through a Slurm bridge against as many
    /// `sbatch --wrap` jobs of the same command (each waited for until Slurm says it
    /// completed), one at a time and in turn, each started on an idle cluster (the one
    /// `SLURM_CONF` names).
    #[arg(long)]
    slurm: Option<usize>,
    /// Instead: the dashboard's runs page (first page, a deep page, filtered, and the
    /// live rows) with this many runs stored, signed in like a browser.
    #[arg(long)]
    ui: Option<usize>,
    /// With --storage: a Python with boto3 (default: target/lyceum-venv/bin/python,
    /// else python3).
    #[arg(long)]
    boto_python: Option<std::path::PathBuf>,
    /// Instead: warm sandboxes. Trivial runs one at a time once their pool is warm,
    /// each paired with a bare interpreter start in an empty venv; a burst of `--runs`
    /// against as many bubblewrap sandboxes of the same interpreter, as many at a time as
    /// the server has run slots; a run whose prior import is slow (`--slow-import`,
    /// installed from the package index) from submit to its first statement; RSS of
    /// idle warm sandboxes.
    #[arg(long)]
    warm: bool,
    /// With --warm: the package (and module) whose import is slow.
    #[arg(long, default_value = "sympy")]
    slow_import: String,
}

/// An empty virtual environment of the interpreter runs use (a version manager's
/// `python3` shim, or the base interpreter's site-packages, would add start-up time of
/// their own), removed when dropped.
struct EmptyVenv {
    base: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl EmptyVenv {
    async fn make() -> anyhow::Result<Self> {
        let base = stoa_runtime::Interpreter::probe("python3")?.path;
        let dir = std::env::temp_dir().join(format!("stoa-bench-venv-{}", std::process::id()));
        let st = tokio::process::Command::new(&base)
            .args(["-m", "venv", "--without-pip"])
            .arg(&dir)
            .status()
            .await?;
        anyhow::ensure!(st.success(), "python3 -m venv failed");
        Ok(EmptyVenv { base, dir })
    }

    fn python(&self) -> std::path::PathBuf {
        self.dir.join("bin").join("python")
    }
}

impl Drop for EmptyVenv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `n` commands, `at_once` at a time, each checked to succeed; their durations,
/// sorted.
async fn timed<F, Fut>(n: usize, at_once: usize, cmd: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<std::process::ExitStatus>>,
{
    let results: Vec<anyhow::Result<Duration>> = futures::stream::iter(0..n)
        .map(|_| {
            let run = cmd();
            async move {
                let t = Instant::now();
                let st = run.await?;
                anyhow::ensure!(st.success(), "the command failed: {st}");
                Ok(t.elapsed())
            }
        })
        .buffer_unordered(at_once.max(1))
        .collect()
        .await;
    let mut out = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    out.sort();
    Ok(out)
}

const KEY: &str = "lk_benchbenchbenchbenchbench0000";

struct LocalServer {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    client: Client,
}

impl LocalServer {
    async fn start(no_worker: bool) -> anyhow::Result<Self> {
        Self::start_with(no_worker, &[]).await
    }

    /// A server with these `STOA_…` settings too.
    async fn start_with(no_worker: bool, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let dir = std::env::temp_dir().join(format!("stoa-bench-{}-{port}", std::process::id()));
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("server")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&dir);
        if no_worker {
            cmd.arg("--no-worker");
        }
        cmd.env("STOA_ADMIN_KEY", KEY)
            .env("STOA_LOG", "warn")
            // Workers of the fleet bench hear "none" soon when nothing is left.
            .env("STOA_WORKER__CLAIM_WAIT_S", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting the server")?;
        let client = Client::new(&format!("http://127.0.0.1:{port}"), KEY);
        for _ in 0..200 {
            if client.machine_types().await.is_ok() {
                return Ok(LocalServer { child, dir, client });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the bench server did not come up")
    }

    fn rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    /// A `/proc/PID/status` value in KiB (`VmRSS:`, `VmHWM:` for the peak).
    fn status_kb(&self, field: &str) -> u64 {
        let pid = self.child.id().unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
            })
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix_kill(pid);
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .map(|_| ())
}

/// Submits one trivial run and follows it to its end; returns the elapsed time.
async fn one_run(c: &Client) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let s = c
        .start_python(&PythonStartRequest {
            code: "print(1)".into(),
            ..Default::default()
        })
        .await?;
    finish(c, &s.streaming_url, t).await
}

/// Follows a run's stream to its end; the time since `t` when it completed.
async fn finish(c: &Client, url: &str, t: Instant) -> anyhow::Result<Duration> {
    let mut stream = c.stream(url, None).await?;
    while let Some(ev) = stream.next().await {
        if let StreamEvent::JobFinished(f) = ev?.event {
            anyhow::ensure!(
                f.job.result.return_code == Some(0),
                "bench run failed: {:?}",
                f.job.result
            );
            return Ok(t.elapsed());
        }
    }
    anyhow::bail!("stream ended early")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Submits one image run of `true` and follows it to its end.
async fn one_image_run(c: &Client, image: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let s = c
        .start_image(&stoa_types::ImageStartRequest {
            docker_image_ref: image.to_string(),
            docker_run_cmd: Some(vec!["true".into()]),
            enable_s3_mount: Some(false),
            ..Default::default()
        })
        .await?;
    finish(c, &s.streaming_url, t).await
}

/// Submits a one-service compose run of `true` and follows it to its end.
async fn one_compose_run(c: &Client, file: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let s = c
        .start_compose(&stoa_types::ComposeStartRequest {
            compose_file_code: file.to_string(),
            ..Default::default()
        })
        .await?;
    finish(c, &s.streaming_url, t).await
}

/// Runs docker CLI commands one after the other; their total time.
async fn docker_cli(commands: &[Vec<String>]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    for args in commands {
        let st = tokio::process::Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(st.success(), "docker {} failed", args.join(" "));
    }
    Ok(t.elapsed())
}

/// Medians of image runs of `true` through Stoa against `docker run --rm IMAGE true`,
/// or (with `compose`) of a one-service stack against `docker compose up
/// --abort-on-container-exit` then `down`. Interleaved, so that both see the same load.
async fn image_bench(a: &BenchArgs, image: &str, compose: bool) -> anyhow::Result<i32> {
    let srv = LocalServer::start(false).await?;
    let stack = format!("services:\n  job:\n    image: {image}\n    command: [\"true\"]\n");
    let file = std::env::temp_dir().join(format!("stoa-bench-{}.yml", std::process::id()));
    std::fs::write(&file, &stack)?;
    let f = file.display().to_string();
    let project = format!("stoa-bench-{}", std::process::id());
    let (label, bare_cmds): (String, Vec<Vec<String>>) = if compose {
        let base = ["compose", "-f", &f, "-p", &project];
        let with = |extra: &[&str]| {
            base.iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        };
        (
            "docker compose up --abort-on-container-exit; down".into(),
            vec![
                with(&["up", "--abort-on-container-exit", "--quiet-pull"]),
                with(&["down"]),
            ],
        )
    } else {
        (
            format!("docker run --rm {image} true"),
            vec![vec![
                "run".into(),
                "--rm".into(),
                image.into(),
                "true".into(),
            ]],
        )
    };
    let stoa_run = || async {
        if compose {
            one_compose_run(&srv.client, &stack).await
        } else {
            one_image_run(&srv.client, image).await
        }
    };
    for _ in 0..3 {
        stoa_run().await?;
        docker_cli(&bare_cmds).await?;
    }
    let mut stoa = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..a.latency_runs {
        stoa.push(stoa_run().await?);
        bare.push(docker_cli(&bare_cmds).await?);
    }
    let load = if compose {
        None
    } else {
        Some(image_load(a, &srv, image, &bare_cmds).await?)
    };
    srv.stop().await;
    let _ = std::fs::remove_file(&file);
    stoa.sort();
    bare.sort();
    let (s50, b50) = (percentile(&stoa, 0.5), percentile(&bare, 0.5));
    println!(
        "Stoa {} bench ({} cores, {image}, n={})",
        if compose { "compose" } else { "image" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        a.latency_runs
    );
    println!(
        "  {label}: p50 {}  p99 {}",
        ms(b50),
        ms(percentile(&bare, 0.99))
    );
    println!(
        "  Stoa submit→completed of true: p50 {}  p99 {}",
        ms(s50),
        ms(percentile(&stoa, 0.99))
    );
    println!(
        "  ratio of medians: {:.2}",
        s50.as_secs_f64() / b50.as_secs_f64()
    );
    if let Some(l) = load {
        println!("{l}");
    }
    Ok(0)
}

/// Image runs under load: back to back (Stoa's in a row, then docker's in a row), and a
/// burst submitted at once against as many `docker run --rm` with as many at a time as
/// the server has run slots; then the networks the server keeps once the burst is over.
async fn image_load(
    a: &BenchArgs,
    srv: &LocalServer,
    image: &str,
    bare_cmds: &[Vec<String>],
) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let mut stoa = Vec::new();
    for _ in 0..a.in_a_row {
        stoa.push(one_image_run(&srv.client, image).await?);
    }
    let mut bare = Vec::new();
    for _ in 0..a.in_a_row {
        bare.push(docker_cli(bare_cmds).await?);
    }
    // The same isolation as Stoa gives runs: a user-defined network (the engine sets
    // up its embedded DNS in each container, which the default bridge does not).
    let net = format!("stoa-bench-net-{}", std::process::id());
    docker_cli(&[vec!["network".into(), "create".into(), net.clone()]]).await?;
    let mut own_net = Vec::new();
    let with_net: Vec<Vec<String>> = bare_cmds
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.insert(1, format!("--network={net}"));
            c
        })
        .collect();
    for _ in 0..a.in_a_row {
        own_net.push(docker_cli(&with_net).await?);
    }

    stoa.sort();
    bare.sort();
    own_net.sort();
    let (s50, b50, n50) = (
        percentile(&stoa, 0.5),
        percentile(&bare, 0.5),
        percentile(&own_net, 0.5),
    );
    let _ = writeln!(
        out,
        "  back to back, {} in a row: Stoa p50 {}, docker run --rm p50 {} (ratio of medians {:.2}), docker run --rm --network=<user-defined> p50 {} (ratio {:.2})",
        a.in_a_row,
        ms(s50),
        ms(b50),
        s50.as_secs_f64() / b50.as_secs_f64(),
        ms(n50),
        s50.as_secs_f64() / n50.as_secs_f64()
    );
    if a.burst == 0 {
        docker_cli(&[vec!["network".into(), "rm".into(), net]]).await?;
        return Ok(out);
    }
    // The bench server runs with the default settings.
    let slots = stoa_server::Config::default().concurrency();
    let req = stoa_types::ImageStartRequest {
        docker_image_ref: image.to_string(),
        docker_run_cmd: Some(vec!["true".into()]),
        enable_s3_mount: Some(false),
        ..Default::default()
    };
    let t = Instant::now();
    let started = futures::stream::iter(0..a.burst)
        .map(|_| srv.client.start_image(&req))
        .buffer_unordered(a.burst)
        .collect::<Vec<_>>()
        .await;
    // Followed a few at a time (streams per key are limited), in the order they run.
    let results = futures::stream::iter(started)
        .map(|s| async {
            let s = s?;
            finish(&srv.client, &s.streaming_url, t).await
        })
        .buffered(16)
        .collect::<Vec<anyhow::Result<Duration>>>()
        .await;
    let stoa_s = t.elapsed().as_secs_f64();
    let failures = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        let _ = writeln!(out, "  first failure: {e:#}");
    }
    let t = Instant::now();
    let bare_results = futures::stream::iter(0..a.burst)
        .map(|_| docker_cli(bare_cmds))
        .buffer_unordered(slots)
        .collect::<Vec<_>>()
        .await;
    let bare_s = t.elapsed().as_secs_f64();
    let bare_failures = bare_results.iter().filter(|r| r.is_err()).count();
    let t = Instant::now();
    let net_results = futures::stream::iter(0..a.burst)
        .map(|_| docker_cli(&with_net))
        .buffer_unordered(slots)
        .collect::<Vec<_>>()
        .await;
    let net_s = t.elapsed().as_secs_f64();
    let net_failures = net_results.iter().filter(|r| r.is_err()).count();
    docker_cli(&[vec!["network".into(), "rm".into(), net]]).await?;
    let (stoa_rate, bare_rate, net_rate) = (
        a.burst as f64 / stoa_s,
        a.burst as f64 / bare_s,
        a.burst as f64 / net_s,
    );
    let _ = writeln!(
        out,
        "  burst of {}: Stoa {stoa_rate:.1} runs/s ({failures} failed); docker run --rm {slots} at a time {bare_rate:.1} runs/s ({bare_failures} failed), ratio {:.2}; with --network=<user-defined> {net_rate:.1} runs/s ({net_failures} failed), ratio {:.2}",
        a.burst,
        stoa_rate / bare_rate,
        stoa_rate / net_rate
    );
    // Spares beyond the pool go after docker.network_idle_s (10 s) without use.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let instance = std::fs::read_to_string(srv.dir.join("instance-id")).unwrap_or_default();
    let listed = tokio::process::Command::new("docker")
        .args(["network", "ls", "-q", "--filter"])
        .arg(format!("label=stoa.instance={}", instance.trim()))
        .output()
        .await?;
    let _ = writeln!(
        out,
        "  networks of the server after the burst: {} (docker.network_pool 2)",
        String::from_utf8_lossy(&listed.stdout).lines().count()
    );
    Ok(out)
}

/// Times placement decisions (decide + start + finish) over a large queue.
fn scheduler_bench(queued: usize) -> i32 {
    use stoa_core::scheduler::{ProfileCapacity, Scheduler};
    let profiles = ["cpu", "cpu.2", "gpu.x"]
        .iter()
        .map(|n| ProfileCapacity {
            name: n.to_string(),
            slots: 8,
            gpu_count: usize::from(n.starts_with("gpu")),
            gpu_shared: false,
        })
        .collect();
    let gpus = (0..8).map(|i| i.to_string()).collect();
    let mut s = Scheduler::new(profiles, gpus, 0);
    for i in 0..queued {
        let profile = ["cpu", "cpu.2", "gpu.x"][i % 3];
        let org = ["org-a", "org-b"][(i / 3) % 2];
        s.push(
            stoa_types::RunId::new(),
            org,
            profile,
            (i % 5) as i64 * 20,
            i as u64,
        );
    }
    let mut times = Vec::new();
    let mut running = std::collections::VecDeque::new();
    // Keep the queue full: each decision starts a run, and the oldest running one ends.
    for i in 0..5000 {
        let t = Instant::now();
        let d = s.decide();
        if let Some(d) = &d {
            s.start(d);
            running.push_back(d.run);
        }
        if (running.len() > 16 || d.is_none())
            && let Some(r) = running.pop_front()
        {
            s.finish(r);
        }
        let profile = ["cpu", "cpu.2", "gpu.x"][i % 3];
        s.push(
            stoa_types::RunId::new(),
            ["org-a", "org-b"][i % 2],
            profile,
            50,
            (queued + i) as u64,
        );
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "Stoa scheduler bench: {queued} runs queued across 3 profiles and 2 orgs, {} decisions",
        times.len()
    );
    println!(
        "  decision p50 {:.1} µs  p99 {:.1} µs  max {:.1} µs",
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times.last().unwrap().as_secs_f64() * 1e6
    );
    0
}

/// The CPU the sampler's procfs scan costs per second with `runs` process groups.
async fn sampler_bench(runs: usize) -> anyhow::Result<i32> {
    let mut children = Vec::new();
    for _ in 0..runs {
        let mut c = tokio::process::Command::new("sleep");
        c.arg("60").process_group(0).kill_on_drop(true);
        children.push(c.spawn()?);
    }
    let groups: Vec<i32> = children
        .iter()
        .filter_map(|c| c.id())
        .map(|p| p as i32)
        .collect();
    // CPU time of this process while it takes one snapshot per "second", 30 times.
    let cpu = || -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        (f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0))
            / 100.0
    };
    let ticks = 30;
    let before = cpu();
    let t = Instant::now();
    let mut seen = 0;
    for _ in 0..ticks {
        let snap = stoa_runtime::metrics::proc_snapshot();
        seen = groups
            .iter()
            .filter(|g| snap.groups.contains_key(g))
            .count();
    }
    let scan = t.elapsed();
    let used = cpu() - before;
    drop(children);
    println!("Stoa sampler bench: {runs} runs sampled ({seen} found), {ticks} ticks");
    println!(
        "  per tick: {:.2} ms wall, {:.2} ms CPU → {:.2} % of one core at one tick per second",
        scan.as_secs_f64() * 1000.0 / ticks as f64,
        used * 1000.0 / ticks as f64,
        used / ticks as f64 * 100.0
    );
    Ok(0)
}

/// Peak memory of the server while `readers` clients read the record, then the stored
/// logs, of a run with 15 MiB of output, all at once, three rounds each.
async fn readers_bench(readers: usize) -> anyhow::Result<i32> {
    const MIB: usize = 15;
    let srv = LocalServer::start(false).await?;
    let code = format!(
        "import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range({}):\n    sys.stdout.write(line)\n",
        MIB * 1024
    );
    let s = srv
        .client
        .start_python(&PythonStartRequest {
            code,
            ..Default::default()
        })
        .await?;
    finish(&srv.client, &s.streaming_url, Instant::now()).await?;
    let id = s.execution_id;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = srv.rss_kb();
    let peak_before = srv.status_kb("VmHWM:");
    let mut largest = 0;
    for logs in [false, true] {
        for _ in 0..3 {
            let replies = futures::future::join_all((0..readers).map(|_| {
                let c = srv.client.clone();
                let id = id.clone();
                async move {
                    // The size of the reply, as JSON.
                    anyhow::Ok(if logs {
                        serde_json::to_vec(&c.logs(&id, 10_000, 1).await?)?.len()
                    } else {
                        serde_json::to_vec(&c.execution(&id).await?)?.len()
                    })
                }
            }))
            .await;
            for r in replies {
                largest = largest.max(r?);
            }
        }
    }
    let peak = srv.status_kb("VmHWM:");
    srv.stop().await;
    let growth = peak.saturating_sub(peak_before.max(before));
    println!("Stoa readers bench: {readers} parallel readers of a run with {MIB} MiB of output");
    println!(
        "  server RSS before: {:.1} MB; peak growth while reading: {:.1} MB ({:.0} KB per reader); largest reply {:.1} KB",
        before as f64 / 1024.0,
        growth as f64 / 1024.0,
        growth as f64 / readers.max(1) as f64,
        largest as f64 / 1024.0
    );
    Ok(0)
}

pub async fn run(a: BenchArgs) -> anyhow::Result<i32> {
    if let Some(n) = a.ui {
        return ui_bench(n.max(1)).await;
    }
    if let Some(n) = a.slurm {
        return slurm_bench(n.max(1)).await;
    }
    if let Some(url) = &a.stores {
        return stores_bench(url, a.requests, a.queued).await;
    }
    if let Some(n) = a.fleet {
        return fleet_bench(n.max(1), a.fleet_runs, a.queued).await;
    }
    if let Some(mib) = a.storage {
        return storage_bench(mib, a.boto_python.clone()).await;
    }
    if let Some(n) = a.readers {
        return readers_bench(n).await;
    }
    if let Some(n) = a.sampler {
        return sampler_bench(n).await;
    }
    if let Some(n) = a.scheduler {
        return Ok(scheduler_bench(n));
    }
    if let Some(image) = a.compose.clone() {
        return image_bench(&a, &image, true).await;
    }
    if let Some(image) = a.image.clone() {
        return image_bench(&a, &image, false).await;
    }
    if a.warm {
        return warm_bench(&a).await;
    }
    let venv = EmptyVenv::make().await?;
    let base = venv.base.clone();
    let bare = timed(a.latency_runs, 1, || {
        tokio::process::Command::new(venv.python())
            .args(["-c", "print(1)"])
            .stdout(Stdio::null())
            .status()
    })
    .await?;
    drop(venv);

    let srv = LocalServer::start(false).await?;
    for _ in 0..3 {
        one_run(&srv.client).await?; // builds and warms the cached environment
    }
    let mut lat = Vec::new();
    for _ in 0..a.latency_runs {
        lat.push(one_run(&srv.client).await?);
    }
    lat.sort();
    let t = Instant::now();
    let c = Arc::new(srv.client.clone());
    let results: Vec<anyhow::Result<Duration>> = futures::stream::iter(0..a.runs)
        .map(|_| {
            let c = c.clone();
            async move { one_run(&c).await }
        })
        .buffer_unordered(a.concurrency)
        .collect()
        .await;
    let wall = t.elapsed();
    for r in &results {
        if let Err(e) = r {
            anyhow::bail!("a bench run failed: {e}");
        }
    }
    srv.stop().await;

    let idle = LocalServer::start(true).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = idle.rss_kb();
    let c = Arc::new(idle.client.clone());
    let t = Instant::now();
    let accepted: Vec<bool> = futures::stream::iter(0..a.requests)
        .map(|_| {
            let c = c.clone();
            async move {
                c.start_python(&PythonStartRequest {
                    code: "print(1)".into(),
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let req_wall = t.elapsed();
    let ok = accepted.iter().filter(|x| **x).count();
    let rss_queued = idle.rss_kb();
    idle.stop().await;

    let overhead = percentile(&lat, 0.5).saturating_sub(percentile(&bare, 0.5));
    println!(
        "Stoa bench ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "  bare {} -c 'print(1)' (in an empty venv): p50 {}  p99 {}  (n={})",
        base.display(),
        ms(percentile(&bare, 0.5)),
        ms(percentile(&bare, 0.99)),
        bare.len()
    );
    println!(
        "  submit→completed, one at a time: p50 {}  p99 {}  (n={})",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        lat.len()
    );
    println!("  p50 overhead over bare Python: {}", ms(overhead));
    println!(
        "  throughput: {:.1} runs/s ({} runs, {} in flight, {:.2} s)",
        a.runs as f64 / wall.as_secs_f64(),
        a.runs,
        a.concurrency,
        wall.as_secs_f64()
    );
    println!(
        "  start requests accepted (--no-worker): {:.0} req/s ({ok} of {} in {:.2} s)",
        ok as f64 / req_wall.as_secs_f64(),
        a.requests,
        req_wall.as_secs_f64()
    );
    println!(
        "  server RSS idle: {:.1} MB; with {ok} queued runs: {:.1} MB ({:.1} KB per queued run)",
        rss_idle as f64 / 1024.0,
        rss_queued as f64 / 1024.0,
        (rss_queued.saturating_sub(rss_idle)) as f64 / ok.max(1) as f64
    );
    Ok(0)
}

/// The S3 transfer the official client makes (`lyceum storage upload|download`), with
/// the page cache flushed before each direction.
const BOTO_TRANSFER: &str = r#"
import json, os, sys, time
import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
c = json.loads(os.environ["CREDS"])
s3 = boto3.client("s3", endpoint_url=c["endpoint"], aws_access_key_id=c["access_key"],
    aws_secret_access_key=c["secret_key"], region_name=c["region"], config=Config(signature_version="s3v4"))
cfg = TransferConfig(max_concurrency=10, multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
src, back = sys.argv[1], sys.argv[2]
os.sync()
t = time.monotonic()
s3.upload_file(src, c["bucket_name"], "bench/object.bin", Config=cfg)
up = time.monotonic() - t
os.sync()
t = time.monotonic()
s3.download_file(c["bucket_name"], "bench/object.bin", back, Config=cfg)
down = time.monotonic() - t
print(json.dumps({"up": up, "down": down}))
"#;

/// Rounds of each storage measurement (medians are reported).
const STORAGE_ROUNDS: usize = 3;

/// Flushes dirty pages, so that one measurement does not pay for the last one's writes.
fn sync_disk() {
    let _ = std::process::Command::new("sync").status();
}

/// Throughput of the S3 endpoint against a plain file copy on the same disk.
async fn storage_bench(mib: u64, python: Option<std::path::PathBuf>) -> anyhow::Result<i32> {
    let python = python.unwrap_or_else(|| {
        let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/lyceum-venv/bin/python");
        if venv.exists() {
            venv
        } else {
            "python3".into()
        }
    });
    let server = LocalServer::start(true).await?;
    let work = server.dir.join("bench-files");
    std::fs::create_dir_all(&work)?;
    let src = work.join("object.bin");
    let back = work.join("back.bin");
    let bytes = mib * 1024 * 1024;
    write_pattern(&src, mib)?;
    let creds = server.client.storage_credentials().await?;
    let s3 = SigV4::from_creds(&creds)?;
    let names = [
        "copy",
        "read/write copy",
        "boto3 up",
        "boto3 down",
        "native PUT",
        "native GET",
        "native GET discarded",
    ];
    let mut times: Vec<Vec<f64>> = vec![vec![]; names.len()];
    for round in 0..STORAGE_ROUNDS {
        eprintln!("round {}/{STORAGE_ROUNDS}", round + 1);
        sync_disk();
        let t = Instant::now();
        std::fs::copy(&src, work.join("copy.bin"))?;
        times[0].push(t.elapsed().as_secs_f64());
        std::fs::remove_file(work.join("copy.bin"))?;
        sync_disk();
        times[1].push(read_write_copy(&src, &work.join("copy.bin"))?);
        std::fs::remove_file(work.join("copy.bin"))?;

        let (up, down) = boto_transfer(&python, &creds, &src, &back).await?;
        times[2].push(up);
        times[3].push(down);
        anyhow::ensure!(
            files_equal(&src, &back)?,
            "the object downloaded with boto3 differs from the uploaded file"
        );
        std::fs::remove_file(&back)?;

        sync_disk();
        times[4].push(s3.put_file("bench/native.bin", &src, bytes).await?);
        sync_disk();
        times[5].push(s3.get_file("bench/native.bin", Some(&back)).await?);
        times[6].push(s3.get_file("bench/native.bin", None).await?);
        anyhow::ensure!(
            files_equal(&src, &back)?,
            "the object downloaded natively differs from the uploaded file"
        );
        std::fs::remove_file(&back)?;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let medians: Vec<f64> = times.iter_mut().map(median).collect();
    let rate = |secs: f64| bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9);
    let (cp, rw) = (medians[0], medians[1]);
    println!(
        "Stoa storage bench ({} cores, {mib} MiB object, medians of {STORAGE_ROUNDS} rounds, page cache flushed before each)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  cp (copy_file_range, in the kernel):     {:>5.0} MiB/s ({cp:.2} s)",
        rate(cp)
    );
    println!(
        "  read/write copy, 1 MiB buffers:          {:>5.0} MiB/s ({rw:.2} s)",
        rate(rw)
    );
    println!(
        "  through the S3 endpoint:                                     ratio to cp, to read/write"
    );
    let labels = [
        "boto3 upload (official client settings)",
        "boto3 download",
        "one streamed PUT (Rust, unsigned body)",
        "one streamed GET to a file",
        "one streamed GET, bytes discarded",
    ];
    for (label, secs) in labels.iter().zip(&medians[2..]) {
        println!(
            "  {label:<40} {:>5.0} MiB/s ({secs:.2} s)   {:.2}  {:.2}",
            rate(*secs),
            cp / secs,
            rw / secs
        );
    }
    println!("  downloaded bytes equal the uploaded ones");
    server.stop().await;
    Ok(0)
}

/// Copies `src` to `dst` by reading and writing 1 MiB at a time; the seconds it took.
fn read_write_copy(src: &std::path::Path, dst: &std::path::Path) -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let t = Instant::now();
    let (mut from, mut to) = (std::fs::File::open(src)?, std::fs::File::create(dst)?);
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// A file of `mib` MiB of varied bytes.
fn write_pattern(path: &std::path::Path, mib: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1024 * 1024];
    for _ in 0..mib {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()
}

/// Upload and download seconds of one boto3 transfer.
async fn boto_transfer(
    python: &std::path::Path,
    creds: &serde_json::Value,
    src: &std::path::Path,
    back: &std::path::Path,
) -> anyhow::Result<(f64, f64)> {
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(BOTO_TRANSFER)
        .arg(src)
        .arg(back)
        .env("CREDS", creds.to_string())
        .output()
        .await
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "the boto3 transfer failed (is boto3 installed for {}?): {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        t["up"].as_f64().unwrap_or(f64::MAX),
        t["down"].as_f64().unwrap_or(f64::MAX),
    ))
}

fn files_equal(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(fb.read(&mut bb)? == 0);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Signs path-style S3 requests (AWS Signature Version 4, unsigned payload).
struct SigV4 {
    endpoint: String,
    bucket: String,
    access_key: String,
    secret_key: String,
    region: String,
    http: reqwest::Client,
}

impl SigV4 {
    fn from_creds(c: &serde_json::Value) -> anyhow::Result<SigV4> {
        let field = |k: &str| {
            c[k].as_str()
                .map(str::to_string)
                .with_context(|| format!("credentials without {k}"))
        };
        Ok(SigV4 {
            endpoint: field("endpoint")?.trim_end_matches('/').to_string(),
            bucket: field("bucket_name")?,
            access_key: field("access_key")?,
            secret_key: field("secret_key")?,
            region: field("region")?,
            http: reqwest::Client::new(),
        })
    }

    fn hmac(key: &[u8], data: &str) -> Vec<u8> {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
        m.update(data.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// Uploads `path` (`bytes` long) in one streamed PUT; the seconds it took.
    async fn put_file(&self, key: &str, path: &std::path::Path, bytes: u64) -> anyhow::Result<f64> {
        let t = Instant::now();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::open(path).await?,
            1024 * 1024,
        ));
        let put = self
            .request(reqwest::Method::PUT, key)
            .header(reqwest::header::CONTENT_LENGTH, bytes)
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(put.status().is_success(), "PUT: {}", put.text().await?);
        Ok(t.elapsed().as_secs_f64())
    }

    /// Downloads `key` in one GET, into `path` or nowhere; the seconds it took.
    async fn get_file(&self, key: &str, path: Option<&std::path::Path>) -> anyhow::Result<f64> {
        use tokio::io::AsyncWriteExt;
        let t = Instant::now();
        let mut get = self.request(reqwest::Method::GET, key).send().await?;
        anyhow::ensure!(get.status().is_success(), "GET: {}", get.status());
        let mut f = match path {
            Some(p) => Some(tokio::io::BufWriter::with_capacity(
                1024 * 1024,
                tokio::fs::File::create(p).await?,
            )),
            None => None,
        };
        while let Some(chunk) = get.chunk().await? {
            if let Some(f) = &mut f {
                f.write_all(&chunk).await?;
            }
        }
        if let Some(f) = &mut f {
            f.flush().await?;
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// A request for `key` (letters, digits, `/`, `.`, `-` and `_` only) in the bucket.
    fn request(&self, method: reqwest::Method, key: &str) -> reqwest::RequestBuilder {
        use sha2::Digest;
        let now = chrono::Utc::now();
        let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
        let day = now.format("%Y%m%d").to_string();
        let url = format!("{}/{}/{key}", self.endpoint, self.bucket);
        let host = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
            .to_string();
        let path = format!("/{}/{key}", self.bucket);
        let canonical = format!(
            "{method}\n{path}\n\nhost:{host}\nx-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:{amz_date}\n\nhost;x-amz-content-sha256;x-amz-date\nUNSIGNED-PAYLOAD"
        );
        let scope = format!("{day}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(sha2::Sha256::digest(canonical.as_bytes()))
        );
        let mut key_bytes = Self::hmac(format!("AWS4{}", self.secret_key).as_bytes(), &day);
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key_bytes = Self::hmac(&key_bytes, part);
        }
        let signature = hex::encode(Self::hmac(&key_bytes, &to_sign));
        self.http
            .request(method, url)
            .header("x-amz-date", amz_date)
            .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
            .header(
                reqwest::header::AUTHORIZATION,
                format!(
                    "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}",
                    self.access_key
                ),
            )
    }
}

/// Registers a simulated worker offering `slots` cpu runs with the server at `dir`.
async fn fleet_worker(
    srv: &LocalServer,
    name: &str,
    slots: usize,
) -> anyhow::Result<stoa_client::worker::HttpPlane> {
    fleet_worker_on(srv, None, name, slots).await
}

/// Like `fleet_worker`, on the server's PostgreSQL database when it has one.
async fn fleet_worker_on(
    srv: &LocalServer,
    database: Option<&str>,
    name: &str,
    slots: usize,
) -> anyhow::Result<stoa_client::worker::HttpPlane> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["workers", "token", "create", "--data-dir"])
        .arg(&srv.dir);
    if let Some(url) = database {
        cmd.args(["--database-url", url]);
    }
    let out = cmd.stderr(Stdio::null()).output().await?;
    anyhow::ensure!(out.status.success(), "stoa workers token create failed");
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let http = stoa_client::worker::http_client(None)?;
    let base = srv.client.base().to_string();
    let req = stoa_types::worker::RegisterRequest {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: "v1".into(),
        profiles: vec![stoa_types::worker::OfferedProfile {
            name: "cpu".into(),
            slots,
        }],
        gpus: vec![],
        host: None,
        previous_token: None,
        cluster: None,
    };
    let servers = [base];
    let r = stoa_client::worker::register(&http, &servers, &token, &req).await?;
    Ok(stoa_client::worker::HttpPlane::new(http, &servers, r))
}

/// Submits `n` trivial runs, 16 requests at a time.
async fn submit(c: &Client, n: usize) -> anyhow::Result<()> {
    submit_to(std::slice::from_ref(c), n).await
}

/// Submits `n` trivial runs, 16 requests at a time, to these servers in turn.
async fn submit_to(clients: &[Client], n: usize) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let c = clients[i % clients.len()].clone();
            async move {
                c.start_python(&PythonStartRequest {
                    code: "print(1)".into(),
                    ..Default::default()
                })
                .await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The times of `n` claims in a row, sorted (each must get a run).
async fn claim_latencies(
    plane: &stoa_client::worker::HttpPlane,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    use stoa_core::plane::ControlPlane;
    let mut claims = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        anyhow::ensure!(plane.claim().await?.is_some(), "nothing to claim");
        claims.push(t.elapsed());
    }
    claims.sort();
    Ok(claims)
}

/// One run through the protocol as a worker does it: claim, started, a line, finish.
/// `None` when nothing was claimed.
async fn protocol_run(
    plane: &stoa_client::worker::HttpPlane,
) -> anyhow::Result<Option<(Duration, Duration)>> {
    use stoa_core::plane::{ControlPlane, OutputStream, Progress, RunEnd};
    let t = Instant::now();
    let Some(run) = plane.claim().await? else {
        return Ok(None);
    };
    let claimed = t.elapsed();
    anyhow::ensure!(
        plane
            .progress(run.id, &run.lease_token, Progress::Running { pgid: None })
            .await?,
        "the run was not held"
    );
    let line = (OutputStream::Stdout, "1\n".to_string()).into();
    plane
        .append_output(run.id, &run.lease_token, 1, &[line], false)
        .await?;
    let end = RunEnd {
        status: stoa_types::RunStatus::Completed,
        return_code: Some(0),
        error: None,
        timed_out: false,
    };
    plane.finish(run.id, &run.lease_token, end).await?;
    Ok(Some((claimed, t.elapsed())))
}

/// The control plane under a fleet: throughput of `workers` protocol clients over
/// `runs` runs, then claim latency with `queued` runs waiting.
async fn fleet_bench(workers: usize, runs: usize, queued: usize) -> anyhow::Result<i32> {
    let srv = LocalServer::start(true).await?;
    let mut planes = Vec::new();
    for i in 0..workers {
        planes.push(Arc::new(
            fleet_worker(&srv, &format!("bench-{i}"), 4).await?,
        ));
    }
    let t = Instant::now();
    submit(&srv.client, runs).await?;
    let submitted = t.elapsed();
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(runs));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for p in &planes {
        let (p, left) = (p.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let (mut per_run, mut last) = (Vec::new(), Instant::now());
            while left.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                // The last claims wait (long-poll) for runs that others took: the
                // measure ends with the last run finished.
                if let Some((_, whole)) = protocol_run(&p).await? {
                    left.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    per_run.push(whole);
                    last = Instant::now();
                }
            }
            anyhow::Ok((per_run, last))
        }));
    }
    let mut per_run = Vec::new();
    let mut last = t;
    for task in tasks {
        let (runs, at) = task.await??;
        per_run.extend(runs);
        last = last.max(at);
    }
    let took = last - t;
    per_run.sort();
    println!(
        "fleet: {workers} workers over HTTP, {runs} runs (submitted in {:.1} s)",
        submitted.as_secs_f64()
    );
    println!(
        "  {:.0} runs/s through the control plane (claim, started, output, finish)",
        runs as f64 / took.as_secs_f64()
    );
    println!(
        "  control plane time per run (4 calls): p50 {}  p99 {}",
        ms(percentile(&per_run, 0.5)),
        ms(percentile(&per_run, 0.99))
    );
    // One worker, one run at a time: what the protocol adds to each run over the
    // embedded worker's in-process calls (the same store operations, no HTTP).
    submit(&srv.client, 200).await?;
    let mut alone = Vec::new();
    while alone.len() < 200 {
        if let Some((_, whole)) = protocol_run(&planes[0]).await? {
            alone.push(whole);
        }
    }
    alone.sort();
    println!(
        "  one worker, one run at a time: p50 {}  p99 {} per run (claim, started, output, finish over HTTP)",
        ms(percentile(&alone, 0.5)),
        ms(percentile(&alone, 0.99))
    );
    srv.stop().await;

    // Claim latency with many runs waiting: one worker with room for all of them.
    let srv = LocalServer::start(true).await?;
    let plane = fleet_worker(&srv, "bench-claims", queued + 1).await?;
    let t = Instant::now();
    submit(&srv.client, queued).await?;
    let submitted = t.elapsed();
    let samples = 1000.min(queued);
    let claims = claim_latencies(&plane, samples).await?;
    println!(
        "claim latency with {queued} queued (submitted in {:.1} s), {samples} claims over HTTP: p50 {}  p99 {}",
        submitted.as_secs_f64(),
        ms(percentile(&claims, 0.5)),
        ms(percentile(&claims, 0.99))
    );
    srv.stop().await;
    Ok(0)
}

/// Start requests/s and claim latency on each store: SQLite, PostgreSQL with one
/// server, PostgreSQL with two servers sharing it (starts sent to both alternately,
/// claims through the first).
async fn stores_bench(admin_url: &str, requests: usize, queued: usize) -> anyhow::Result<i32> {
    println!(
        "stores: {requests} start requests (16 in flight), then {} claims over HTTP with the runs queued",
        1000.min(queued)
    );
    for (label, postgres, servers) in [
        ("SQLite, one server", false, 1),
        ("PostgreSQL, one server", true, 1),
        ("PostgreSQL, two servers", true, 2),
    ] {
        let database = if postgres {
            Some(stoa_store::create_database(admin_url, "stoa_bench").await?)
        } else {
            None
        };
        let mut env = vec![
            (
                "STOA_LIMITS__ORG_MAX_QUEUED",
                (requests + queued + 10).to_string(),
            ),
            // The servers share the key their secrets are sealed with.
            ("STOA_SECRETS__MASTER_KEY", "42".repeat(32)),
        ];
        if let Some(url) = &database {
            env.push(("STOA_DATABASE_URL", url.clone()));
        }
        let mut srvs = Vec::new();
        for _ in 0..servers {
            srvs.push(LocalServer::start_with(true, &env).await?);
        }
        let clients: Vec<Client> = srvs.iter().map(|s| s.client.clone()).collect();
        let t = Instant::now();
        submit_to(&clients, requests).await?;
        let took = t.elapsed();
        // Claims with the runs queued: one worker with room for all of them.
        let plane =
            fleet_worker_on(&srvs[0], database.as_deref(), "bench-claims", requests + 1).await?;
        // The first server follows what the second queued (a second at most).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let claims = claim_latencies(&plane, 1000.min(requests)).await?;
        println!(
            "  {label:<24} {:>6.0} starts/s   claim p50 {}  p99 {}  ({} queued)",
            requests as f64 / took.as_secs_f64(),
            ms(percentile(&claims, 0.5)),
            ms(percentile(&claims, 0.99)),
            requests,
        );
        for s in srvs {
            s.stop().await;
        }
    }
    Ok(0)
}

/// The state of Slurm job `job` (`squeue`), `None` once it is gone.
async fn slurm_state(job: &str) -> anyhow::Result<Option<String>> {
    let out = tokio::process::Command::new("squeue")
        .args(["-h", "--states=all", "-o", "%T", "-j", job])
        .output()
        .await?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((!s.is_empty()).then_some(s))
}

/// Waits until the cluster has no live job (each measure starts on an idle node).
async fn slurm_quiet() -> anyhow::Result<()> {
    for _ in 0..500 {
        let out = tokio::process::Command::new("squeue")
            .args([
                "-h",
                "--states=PENDING,CONFIGURING,RUNNING,COMPLETING",
                "-o",
                "%i",
            ])
            .output()
            .await?;
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the cluster did not go idle")
}

/// `sbatch --wrap CMD`, waited for (squeue every 20 ms) until Slurm says it completed.
async fn sbatch_wrap(cmd: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = tokio::process::Command::new("sbatch")
        .args([
            "--parsable",
            "--output=/dev/null",
            "--cpus-per-task=1",
            "--wrap",
            cmd,
        ])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "sbatch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = stoa_worker::slurm::parsable_job_id(&String::from_utf8_lossy(&out.stdout));
    loop {
        match slurm_state(&job).await?.as_deref() {
            Some("COMPLETED") | None => return Ok(t.elapsed()),
            Some(s @ ("FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL")) => {
                anyhow::bail!("the sbatch job ended {s}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Trivial Python runs through the Slurm bridge against `sbatch --wrap` of the same
/// command on the same cluster.
async fn slurm_bench(n: usize) -> anyhow::Result<i32> {
    anyhow::ensure!(
        std::env::var_os("SLURM_CONF").is_some()
            || std::path::Path::new("/etc/slurm/slurm.conf").exists(),
        "--slurm needs a Slurm cluster (SLURM_CONF; scripts/slurm.sh start DIR makes one)"
    );
    let srv = LocalServer::start(true).await?;
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["workers", "token", "create", "--data-dir"])
        .arg(&srv.dir)
        .stderr(Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "stoa workers token create failed");
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    // The interpreter itself, as a node has it (not a version manager's shim, which
    // costs both sides a shell script per start).
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("python3 on PATH")?;
    let python = String::from_utf8(python.stdout)?.trim().to_string();
    let config = srv.dir.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "log = \"warn\"\n[python]\ninterpreter = \"{python}\"\n\
             [[profiles]]\nname = \"cpu\"\nprice_per_hour = 0.0\n\
             [slurm]\npoll_interval_ms = 500\nnode_data_dir = \"{}\"\njob_log = \"/dev/null\"\n\
             [[slurm.profiles]]\nname = \"cpu\"\ncpus_per_task = 1\n",
            srv.dir.join("node").display()
        ),
    )?;
    let mut bridge = tokio::process::Command::new(std::env::current_exe()?)
        .args(["worker", "--slurm", "--name", "bench-bridge", "--server"])
        .arg(srv.client.base())
        .arg("--token")
        .arg(&token)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(srv.dir.join("bridge"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the bridge")?;
    // The first run builds the node's environment.
    one_run(&srv.client).await.context("the warm-up run")?;
    let wrap = format!("{python} -c 'print(1)'");
    sbatch_wrap(&wrap).await.context("the warm-up sbatch job")?;
    let (mut stoa, mut slurm) = (Vec::new(), Vec::new());
    for i in 0..n {
        slurm_quiet().await?;
        stoa.push(one_run(&srv.client).await?);
        slurm_quiet().await?;
        slurm.push(sbatch_wrap(&wrap).await?);
        eprint!("\r{}/{n}", i + 1);
    }
    eprintln!();
    stoa.sort();
    slurm.sort();
    let (s50, w50) = (percentile(&stoa, 0.5), percentile(&slurm, 0.5));
    println!(
        "slurm bench: {n} trivial Python runs each way, one at a time, in turn, each on an idle cluster"
    );
    println!(
        "  through the Slurm bridge (submit -> completed): p50 {}  p90 {}  max {}",
        ms(s50),
        ms(percentile(&stoa, 0.9)),
        ms(percentile(&stoa, 1.0))
    );
    println!(
        "  sbatch --wrap + squeue until COMPLETED:         p50 {}  p90 {}  max {}",
        ms(w50),
        ms(percentile(&slurm, 0.9)),
        ms(percentile(&slurm, 1.0))
    );
    let added = s50.as_secs_f64() - w50.as_secs_f64();
    println!(
        "  Stoa's added latency at p50: {:+.1} ms (target <= 200 ms)",
        added * 1000.0
    );
    let _ = bridge.start_kill();
    let _ = bridge.wait().await;
    srv.stop().await;
    Ok(0)
}

/// The dashboard's runs page with `n` runs stored: each page asked 50 times in a row by
/// a signed-in browser's session.
async fn ui_bench(n: usize) -> anyhow::Result<i32> {
    let env = [("STOA_LIMITS__ORG_MAX_QUEUED", (n + 10).to_string())];
    let srv = LocalServer::start_with(true, &env).await?;
    println!("ui: storing {n} runs…");
    let t = Instant::now();
    submit(&srv.client, n).await?;
    println!("  stored in {:.1} s", t.elapsed().as_secs_f64());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let base = srv.client.base().to_string();
    let login = http
        .post(format!("{base}/ui/login"))
        .header(reqwest::header::ORIGIN, &base)
        .form(&[("key", KEY)])
        .send()
        .await?;
    let cookie = login
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("the sign-in set no session cookie")?
        .to_string();
    let deep = (n / 50 / 2).max(1);
    let pages = [
        ("first page", "/ui/".to_string()),
        ("middle page", format!("/ui/?page={deep}")),
        (
            "filtered",
            "/ui/?state=pending&kind=python&profile=cpu".to_string(),
        ),
        ("live rows", "/ui/runs/rows?page=1".to_string()),
    ];
    println!("ui: the runs page with {n} runs stored, 50 requests each (target: p50 <= 100 ms)");
    for (label, path) in pages {
        let mut times = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let r = http
                .get(format!("{base}{path}"))
                .header(reqwest::header::COOKIE, &cookie)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
            let body = r.text().await?;
            times.push(t.elapsed());
            anyhow::ensure!(body.contains("data-id="), "{path}: no rows");
        }
        times.sort();
        println!(
            "  {label:<12} {path:<45} p50 {}  p90 {}",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.9))
        );
    }
    srv.stop().await;
    Ok(0)
}

/// Trivial run started with `body`: its time from submit to completed, and how it
/// started (`warm` or `cold`, from its timeline).
async fn timed_run(
    c: &Client,
    body: &serde_json::Value,
) -> anyhow::Result<(Duration, String, String)> {
    let t = Instant::now();
    let s = c.start_python_json(body).await?;
    let d = finish(c, &s.streaming_url, t).await?;
    let r = c.execution(&s.execution_id).await?;
    let kind = r
        .phases
        .iter()
        .map(|p| p.phase.clone())
        .find(|p| p == "warm" || p == "cold")
        .unwrap_or_default();
    Ok((d, kind, r.stdout))
}

/// Resident bytes of each idle warm sandbox under process `server`: its Python and the
/// two bubblewrap processes above it.
fn warm_rss(server: u32) -> Vec<(u64, u64)> {
    let stat = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let parent = |pid: u32| -> Option<u32> {
        let s = stat(pid)?;
        s.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let rss = |pid: u32| -> u64 {
        stat(pid)
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(21)?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 4096
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains("_stoa_warm()") || cmd.starts_with(b"bwrap") {
            continue;
        }
        // Only Python itself (bubblewrap's command line holds the program too).
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "bwrap") {
            continue;
        }
        let mut chain = vec![pid];
        let mut p = pid;
        while let Some(pp) = parent(p) {
            if pp == server || pp <= 1 || chain.len() > 3 {
                break;
            }
            chain.push(pp);
            p = pp;
        }
        if parent(p) == Some(server) {
            out.push((rss(pid), chain.iter().map(|p| rss(*p)).sum()));
        }
    }
    out
}

/// CPU seconds process `pid` itself has used (not its children).
fn own_cpu_s(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the name: utime is field 14, stime 15 (1-based; state is 3).
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) as f64)
        })
        .unwrap_or(0.0)
        / stoa_runtime::metrics::CLOCK_TICKS
}

/// CPU time the whole machine spent busy (not idle, not waiting for I/O), in seconds:
/// a sandbox's processes are not all waited for by a process of ours (bubblewrap's
/// inside one are reaped in its PID namespace), so only the machine counts them all.
fn machine_busy_s() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(
                [0, 1, 2, 5, 6, 7]
                    .iter()
                    .filter_map(|&i| f.get(i))
                    .sum::<u64>() as f64,
            )
        })
        .unwrap_or(0.0)
        / stoa_runtime::metrics::CLOCK_TICKS
}

/// `stoa bench --warm`.
async fn warm_bench(a: &BenchArgs) -> anyhow::Result<i32> {
    let venv = EmptyVenv::make().await?;
    let python = venv.python();
    let bare_start = || {
        tokio::process::Command::new(&python)
            .args(["-c", "print(1)"])
            .stdout(Stdio::null())
            .status()
    };
    let slots = a.concurrency.clamp(1, 64);
    let srv = LocalServer::start_with(
        false,
        &[
            ("STOA_WORKER__MAX_CONCURRENT_RUNS", slots.to_string()),
            // The burst follows every run's stream at once.
            (
                "STOA_LIMITS__MAX_STREAMS_PER_KEY",
                (a.runs + 16).to_string(),
            ),
        ],
    )
    .await?;
    let c = &srv.client;
    let trivial = serde_json::json!({"code": "print(1)"});
    // Until the pool is made and warm.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if timed_run(c, &trivial).await?.1 == "warm" {
            break;
        }
    }
    // Each warm run is paired with a bare start right after it, so that both see the
    // machine as it is at that moment (this machine's speed drifts over a bench).
    let (mut warm, mut bare, mut cold) = (Vec::new(), Vec::new(), 0usize);
    for _ in 0..a.latency_runs {
        // The pool is refilled between runs, and done refilling before the bare start.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (d, kind, _) = timed_run(c, &trivial).await?;
        if kind == "warm" {
            warm.push(d);
        } else {
            cold += 1;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        bare.extend(timed(1, 1, bare_start).await?);
    }
    warm.sort();
    bare.sort();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = warm_rss(srv.child.id().unwrap_or(0));

    // A burst: all at once, against as many sandboxes of the same interpreter made by
    // bubblewrap itself, as many at a time as the server has slots.
    let server_pid = srv.child.id().unwrap_or(0) as i32;
    let me = std::process::id() as i32;
    let (cpu_before, machine_before, client_before) =
        (own_cpu_s(server_pid), machine_busy_s(), own_cpu_s(me));
    let t = Instant::now();
    let burst: Vec<anyhow::Result<(Duration, String, String)>> = futures::stream::iter(0..a.runs)
        .map(|_| timed_run(c, &trivial))
        .buffer_unordered(a.runs.max(1))
        .collect()
        .await;
    let burst_wall = t.elapsed();
    // The server's own CPU time, this client's, and the whole machine's, per run of
    // the burst.
    let server_cpu = own_cpu_s(server_pid) - cpu_before;
    let client_cpu = own_cpu_s(me) - client_before;
    let machine_cpu = machine_busy_s() - machine_before;
    let mut burst_warm = 0;
    for r in burst {
        if r?.1 == "warm" {
            burst_warm += 1;
        }
    }
    let bwrap = stoa_runtime::python::find_on_path("bwrap").context("bwrap on PATH")?;
    let floor_before = machine_busy_s();
    let t = Instant::now();
    timed(a.runs, slots, || {
        tokio::process::Command::new(&bwrap)
            .args([
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/tmp",
            ])
            .arg("--ro-bind")
            .args([&venv.dir, &venv.dir])
            .args([
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-net",
            ])
            .args(["--new-session", "--die-with-parent", "--"])
            .arg(&python)
            .args(["-u", "-c", "print(1)"])
            .stdout(Stdio::null())
            .status()
    })
    .await?;
    let floor_wall = t.elapsed();
    let floor_cpu = machine_busy_s() - floor_before;

    // A slow prior import, from the index.
    let m = &a.slow_import;
    let probe = serde_json::json!({
        "code": format!("import time\nt = time.perf_counter()\nimport {m}\nprint(time.perf_counter() - t)\n"),
        "requirements_content": m,
    });
    let slow = match timed_run(c, &probe).await {
        Ok((_, _, out)) => {
            let import_s: f64 = out.trim().parse().unwrap_or(f64::NAN);
            let body = serde_json::json!({
                "code": "import time\nprint(time.time())\n",
                "requirements_content": m,
                "prior_imports": [m],
            });
            // Each started once its pool had time to import it again.
            let gap = Duration::from_secs_f64(if import_s.is_finite() {
                import_s * 2.0 + 0.5
            } else {
                5.0
            });
            let mut starts = Vec::new();
            for _ in 0..a.latency_runs.min(10) + 2 {
                tokio::time::sleep(gap).await;
                let submitted = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs_f64();
                let (_, kind, out) = timed_run(c, &body).await?;
                let first: f64 = out.trim().parse().unwrap_or(f64::NAN);
                if kind == "warm" {
                    starts.push(Duration::from_secs_f64((first - submitted).max(0.0)));
                }
            }
            starts.sort();
            Some((import_s, starts))
        }
        Err(e) => {
            eprintln!("the slow import could not be measured ({m} from the index): {e}");
            None
        }
    };
    srv.stop().await;

    let (b50, w50) = (percentile(&bare, 0.5), percentile(&warm, 0.5));
    println!(
        "warm bench ({} cores, {slots} run slots)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "  bare {} -c 'print(1)' in an empty venv: p50 {}  p99 {}  (n={})",
        venv.base.display(),
        ms(b50),
        ms(percentile(&bare, 0.99)),
        bare.len()
    );
    println!(
        "  warm run submit -> completed, one at a time: p50 {}  p90 {}  p99 {}  (n={}, {cold} started cold)",
        ms(w50),
        ms(percentile(&warm, 0.9)),
        ms(percentile(&warm, 0.99)),
        warm.len()
    );
    println!(
        "  warm p50 / bare p50: {:.2} (target <= 0.5)",
        w50.as_secs_f64() / b50.as_secs_f64().max(1e-9)
    );
    let (rate, floor) = (
        a.runs as f64 / burst_wall.as_secs_f64(),
        a.runs as f64 / floor_wall.as_secs_f64(),
    );
    let per_run = |s: f64| s * 1000.0 / a.runs.max(1) as f64;
    println!(
        "  burst of {}: {rate:.1} runs/s ({burst_warm} warm, server CPU {:.1} ms per run); bubblewrap + python, {slots} at a time: {floor:.1}/s; ratio {:.2} (target >= 0.9)",
        a.runs,
        per_run(server_cpu),
        rate / floor
    );
    println!(
        "    machine CPU per run: {:.1} ms (the server {:.1}, this client {:.1}, the sandboxes and the kernel {:.1}); the floor's: {:.1} ms",
        per_run(machine_cpu),
        per_run(server_cpu),
        per_run(client_cpu),
        per_run(machine_cpu - server_cpu - client_cpu),
        per_run(floor_cpu)
    );
    if let Some((import_s, starts)) = slow {
        println!(
            "  prior import {m} ({:.0} ms to import cold): submit -> first statement when warm p50 {}  max {}  (n={}; target <= 20 ms)",
            import_s * 1000.0,
            ms(percentile(&starts, 0.5)),
            ms(percentile(&starts, 1.0)),
            starts.len()
        );
    }
    let n = idle.len().max(1) as f64;
    println!(
        "  idle warm sandboxes: {}; RSS per sandbox {:.1} MB (its Python {:.1} MB; target <= 15 MB)",
        idle.len(),
        idle.iter().map(|x| x.1).sum::<u64>() as f64 / n / 1e6,
        idle.iter().map(|x| x.0).sum::<u64>() as f64 / n / 1e6,
    );
    Ok(0)
}
