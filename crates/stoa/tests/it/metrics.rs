//! Run metrics (sampled from procfs and the engine), the metrics endpoint, the summary,
//! and the platform's Prometheus metrics scraped by a real Prometheus.

use serde_json::{Value, json};
use stoa_types::RunStatus;

use super::*;

/// Allocates about 150 MiB, then keeps one core busy for 2.5 s, and prints the share of
/// a core it got meanwhile (other tests share the machine's cores).
const BURN: &str = "import time\nx = bytearray(150 * 2**20)\nt = time.time()\nc = time.process_time()\nwhile time.time() - t < 2.5:\n    pass\nprint('share', (time.process_time() - c) / (time.time() - t))\n";

/// A shell script that burns a CPU for 3 s, then prints the share of a core it had: its
/// CPU ticks (its own and its children's, 100 a second) over the uptime it spent.
const SH_BURN: &str = r#"c(){ set -- $(cat /proc/$$/stat); echo $((${14}+${15}+${16}+${17})) $(cut -d' ' -f1 /proc/uptime); }; set -- $(c); t=$(($(date +%s)+3)); while [ $(date +%s) -lt $t ]; do :; done; set -- $1 $2 $(c); echo share $(awk "BEGIN{print ($3-$1)/100/($4-$2)}")"#;

/// The CPU percent a sampler must have seen at its peak for a run that printed its
/// share of a core (`share 0.93`, on a line of its own or after a service's prefix):
/// near that share (60 % of a core when it had the core alone).
fn busy_floor(stdout: &str) -> f64 {
    let share: f64 = stdout
        .split_once("share ")
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the run prints its share of a core: {stdout:?}"));
    (share * 100.0 * 0.6).min(60.0)
}

async fn metrics(s: &TestServer, id: &str, query: &str) -> (u16, Value) {
    let r = s
        .client
        .raw(
            reqwest::Method::GET,
            &format!("/api/v2/external/execution/{id}/metrics{query}"),
            None,
        )
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn values(v: &Value, series: &str) -> Vec<f64> {
    v[series]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect()
}

fn fast_sampler(c: &mut stoa_server::Config) {
    c.metrics.interval_ms = 250;
}

#[tokio::test]
async fn a_python_run_shows_its_cpu_and_memory() {
    let s = TestServer::start_with(fast_sampler).await;
    let (id, _) = s.start_code(BURN).await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    let (code, m) = metrics(&s, &id, "?step=1s").await;
    assert_eq!(code, 200, "{m}");
    let cpu = values(&m, "systemCpuUsagePercent");
    let ram = values(&m, "systemRamUsedBytes");
    assert!(cpu.len() >= 2, "{m}");
    let floor = busy_floor(&r.stdout);
    assert!(
        cpu.iter().cloned().fold(0.0, f64::max) >= floor,
        "CPU near the share of a core the run had ({floor:.0} % at least): {cpu:?}"
    );
    assert!(
        ram.iter().cloned().fold(0.0, f64::max) >= 150.0 * 1048576.0,
        "RAM rises to what was allocated: {ram:?}"
    );
    assert!(values(&m, "systemRamTotalBytes")[0] > 150.0 * 1048576.0);
    assert_eq!(
        m["gpuUtilizationPercent"],
        json!([]),
        "no GPU: empty, not zeros"
    );
    assert_eq!(m["executionId"], id.as_str());
    assert!(m["timeRange"]["start"].is_string() && m["hostname"].is_string());
    // Coarser steps average into fewer points.
    let (_, coarse) = metrics(&s, &id, "?step=1m").await;
    assert_eq!(values(&coarse, "systemCpuUsagePercent").len(), 1);
    // The record keeps a summary.
    let summary = r
        .metrics_summary
        .clone()
        .or(s.client.execution(&id).await.unwrap().metrics_summary)
        .unwrap();
    assert!(
        summary["peak_ram_bytes"].as_f64().unwrap() >= 150.0 * 1048576.0,
        "{summary}"
    );
    assert!(
        summary["peak_cpu_percent"].as_f64().unwrap() >= floor,
        "{summary}"
    );
    assert!(
        summary["mean_cpu_percent"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
}

#[tokio::test]
async fn an_image_run_shows_its_cpu_and_memory() {
    if !super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start_with(fast_sampler).await;
    let script = format!("x=$(head -c 120000000 /dev/zero | tr '\\0' a); {SH_BURN}");
    let r = s
        .client
        .start_image_json(&json!({"docker_image_ref": "local/busybox:full", "docker_run_cmd": ["sh", "-c", script]}))
        .await
        .unwrap();
    let rec = s.wait_end(&r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    assert_busy_and_big(&s, &r.execution_id, busy_floor(&rec.stdout)).await;
}

#[tokio::test]
async fn bad_metric_queries_are_422() {
    let s = TestServer::start().await;
    let (id, _) = s.start_code("print(1)").await;
    s.wait_end(&id).await;
    for (q, field) in [
        ("?step=abc", "step"),
        ("?step=0s", "step"),
        (
            "?start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z",
            "end",
        ),
        ("?start=yesterday", "start"),
    ] {
        let (code, v) = metrics(&s, &id, q).await;
        assert_eq!(code, 422, "{q}: {v}");
        assert_eq!(v["detail"][0]["loc"], json!(["query", field]), "{q}");
    }
}

#[tokio::test]
async fn official_lyceum_cli_prints_a_metrics_summary() {
    let Some(lyceum) = super::cli::lyceum_bin() else {
        return missing("the official lyceum CLI (lyceum-cli 1.2.2; scripts/test installs it)");
    };
    let s = TestServer::start_with(fast_sampler).await;
    let (id, _) = s.start_code(BURN).await;
    s.wait_end(&id).await;
    let home = tempfile::tempdir().unwrap();
    let url = s.client.base().to_string();
    let run = |args: Vec<&str>| {
        let mut c = tokio::process::Command::new(&lyceum);
        c.args(args).env("HOME", home.path()).env("COLUMNS", "200");
        async move { c.output().await.unwrap() }
    };
    assert!(
        run(vec!["auth", "login", "--api-key", ADMIN_KEY, "--url", &url])
            .await
            .status
            .success()
    );
    let o = run(vec!["jobs", "metrics", &id]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("CPU usage") && out.contains("RAM used"),
        "{out}"
    );
}

#[tokio::test]
async fn prometheus_scrapes_the_platform_metrics() {
    let s = TestServer::start_with(|c| c.metrics.listen = Some("127.0.0.1:0".into())).await;
    let (id, _) = s.start_code("print(1)").await;
    s.wait_end(&id).await;
    let addr = s.handle.as_ref().unwrap().metrics_addr.unwrap();
    let text = s.scrape_metrics().await;
    assert!(text.contains("stoa_runs{state=\"completed\"} 1"), "{text}");
    assert!(text.contains("stoa_queue_depth{profile=\"cpu\"} 0"));
    assert!(
        text.contains("stoa_run_duration_seconds_count{type=\"python\",state=\"completed\"} 1")
    );
    assert!(text.contains("stoa_store_operation_seconds_count"));
    // On the API address /metrics needs an admin key.
    let store = s.handle.as_ref().unwrap().store.clone();
    let org = store.find_org("default").await.unwrap().unwrap();
    let secret = stoa_server::auth::generate_key();
    store
        .insert_key(&stoa_server::auth::key_record(&secret, &org, "user", false))
        .await
        .unwrap();
    let user = stoa_client::Client::new(s.client.base(), &secret);
    assert_eq!(
        user.raw(reqwest::Method::GET, "/metrics", None)
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        s.client
            .raw(reqwest::Method::GET, "/metrics", None)
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    let Some(prometheus) = stoa_runtime::python::find_on_path("prometheus") else {
        return missing("Debian's prometheus package");
    };
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        d.path().join("prometheus.yml"),
        format!("global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: stoa\n    static_configs: [{{targets: [\"{addr}\"]}}]\n"),
    )
    .unwrap();
    let mut prom = tokio::process::Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            d.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            d.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Prometheus' first scrape comes about 6 s after start.
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=stoa_runs%7Bstate%3D%22completed%22%7D"
    );
    let mut got = Value::Null;
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(&url).await
            && let Ok(v) = r.json::<Value>().await
            && v["data"]["result"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        {
            got = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = prom.kill().await;
    assert_eq!(
        got["data"]["result"][0]["value"][1], "1",
        "Prometheus sees the runs-by-state series: {got}"
    );
}

#[tokio::test]
async fn gpu_readings_are_averaged_into_the_gpu_series() {
    // No GPU here: the readings NVML would give for two GPUs are stored as the sampler
    // stores them, and the endpoint averages them per step.
    let s = TestServer::start().await;
    let (id, _) = s.start_code("import time\ntime.sleep(1.2)").await;
    let r = s.wait_end(&id).await;
    let store = s.handle.as_ref().unwrap().store.clone();
    let run: stoa_types::RunId = id.parse().unwrap();
    let start = chrono::DateTime::parse_from_rfc3339(r.job_start.as_deref().unwrap()).unwrap();
    let at = |ms: i64| (start + chrono::Duration::milliseconds(ms)).with_timezone(&chrono::Utc);
    let reading = |ts: stoa_store::Time, gpu: i64, util: f64| stoa_store::GpuSample {
        run_id: Some(run),
        ts,
        gpu,
        values: [
            Some(util),
            Some(50.0),
            Some(1e9),
            Some(60.0),
            Some(300.0),
            Some(700.0),
            Some(1980.0),
            Some(2619.0),
            Some(1e6),
            Some(2e6),
        ],
    };
    store
        .insert_gpu_samples(
            run,
            vec![
                reading(at(100), 0, 80.0),
                reading(at(100), 1, 40.0),
                reading(at(600), 0, 100.0),
                reading(at(600), 1, 60.0),
            ],
        )
        .await
        .unwrap();
    let (_, m) = metrics(&s, &id, "?step=1m").await;
    assert_eq!(values(&m, "gpuUtilizationPercent"), vec![70.0]);
    assert_eq!(values(&m, "gpuPowerWatt"), vec![300.0]);
    assert_eq!(values(&m, "gpuPcieThroughputTxBytesPerSec"), vec![2e6]);
    assert_eq!(
        values(&m, "systemCpuUsagePercent").len(),
        1,
        "system series are there too"
    );
}

#[tokio::test]
async fn a_compose_run_sums_its_services() {
    if !super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start_with(fast_sampler).await;
    // Two services hold ~60 MB each (only their sum passes 100 MB); one burns a CPU for
    // 3 s, prints the share of a core it had (its CPU ticks over the uptime it spent),
    // and ends the run.
    let burn =
        format!("x=$(head -c 60000000 /dev/zero | tr '\\0' a); {SH_BURN}").replace('$', "$$");
    let yaml = format!(
        r#"
x-hold: &hold
  image: local/busybox:full
  init: true
services:
  burn:
    <<: *hold
    command: ["sh", "-c", {burn}]
  hold:
    <<: *hold
    command: ["sh", "-c", "x=$$(head -c 60000000 /dev/zero | tr '\\0' a); sleep 30; echo $${{#x}}"]
"#,
        burn = serde_json::to_string(&burn).unwrap()
    );
    let r = s
        .client
        .start_compose_json(&json!({"compose_file_code": yaml, "timeout": 60}))
        .await
        .unwrap();
    let rec = s.wait_end(&r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    assert_busy_and_big(&s, &r.execution_id, busy_floor(&rec.stdout)).await;
}

/// The run's 1 s series show a busy CPU (`floor` percent or more) and 100 MiB or more of
/// memory.
async fn assert_busy_and_big(s: &TestServer, id: &str, floor: f64) {
    let (_, m) = metrics(s, id, "?step=1s").await;
    let cpu = values(&m, "systemCpuUsagePercent");
    let ram = values(&m, "systemRamUsedBytes");
    assert!(
        cpu.iter().cloned().fold(0.0, f64::max) >= floor,
        "CPU near the share of a core the run had ({floor:.0} % at least): {cpu:?}"
    );
    assert!(
        ram.iter().cloned().fold(0.0, f64::max) >= 100.0 * 1048576.0,
        "{ram:?}"
    );
}
