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
}

const KEY: &str = "lk_benchbenchbenchbenchbench0000";

struct LocalServer {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    client: Client,
}

impl LocalServer {
    async fn start(no_worker: bool) -> anyhow::Result<Self> {
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
    // Bare Python, for comparison: the interpreter the server's runs use, in an empty
    // virtual environment like theirs (a version manager's `python3` shim, or the base
    // interpreter's site-packages, would add start-up time of their own).
    let base = stoa_runtime::Interpreter::probe("python3")?.path;
    let venv = std::env::temp_dir().join(format!("stoa-bench-venv-{}", std::process::id()));
    let st = tokio::process::Command::new(&base)
        .arg("-m")
        .arg("venv")
        .arg("--without-pip")
        .arg(&venv)
        .status()
        .await?;
    anyhow::ensure!(st.success(), "python3 -m venv failed");
    let python = venv.join("bin").join("python");
    let mut bare = Vec::new();
    for _ in 0..a.latency_runs {
        let t = Instant::now();
        let st = tokio::process::Command::new(&python)
            .args(["-c", "print(1)"])
            .stdout(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(st.success(), "python3 failed");
        bare.push(t.elapsed());
    }
    bare.sort();
    let _ = std::fs::remove_dir_all(&venv);

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
