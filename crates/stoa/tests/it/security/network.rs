//! Attacks: runs reaching the server's loopback API, the metadata address and private
//! ranges.

use stoa_types::RunStatus;

use super::super::{TestServer, assert_status, read_stream};
use super::{other_org, run_to_end};

/// A snippet that tries TCP connections and prints one line per target.
fn probe(targets: &[(&str, u16)]) -> String {
    let mut code = String::from("import socket\n");
    for (host, port) in targets {
        code.push_str(&format!(
            "try:\n    socket.create_connection(({host:?}, {port}), timeout=3).close()\n    print('REACHED {host}:{port}')\nexcept OSError as e:\n    print('REFUSED {host}:{port}', e)\n"
        ));
    }
    code
}

#[tokio::test]
async fn runs_cannot_reach_loopback_or_metadata() {
    if stoa_runtime::python::find_on_path("bwrap").is_none() {
        super::super::missing("bubblewrap (bwrap)");
        return;
    }
    let s = TestServer::start_with(|c| {
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "cpu.net".into(),
            network: Some(true),
            ..Default::default()
        });
    })
    .await;
    let api_port = s.handle.as_ref().unwrap().addr.port();
    let attacker = other_org(&s, "prober").await;
    let targets = [
        ("127.0.0.1", api_port),
        ("169.254.169.254", 80),
        ("10.0.0.1", 80),
        ("::1", api_port),
    ];
    // The machine's own addresses, public ones too: a service listening on all
    // interfaces is the host's, not the runs'.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let own: Vec<String> = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut all = targets.to_vec();
    all.extend(own.iter().map(|a| (a.as_str(), port)));
    // With network on, the resolver answers: the run does have network.
    let dns = "\nimport socket\nns = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]\ns = socket.socket(socket.AF_INET6 if ':' in ns else socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(5)\ntry:\n    s.sendto(bytes.fromhex('123401000001000000000000') + b'\\x00\\x00\\x02\\x00\\x01', (ns, 53))\n    s.recvfrom(512)\n    print('DNS ANSWERED')\nexcept OSError as e:\n    print('DNS FAILED', e)\n";
    for profile in ["cpu", "cpu.net"] {
        let (rec, out) = run_to_end(
            &attacker,
            serde_json::json!({ "code": probe(&all) + dns, "execution_type": profile }),
        )
        .await;
        assert_status(&rec, RunStatus::Completed);
        for (host, port) in &all {
            assert!(
                out.contains(&format!("REFUSED {host}:{port}")),
                "{profile}: {host}:{port} is unreachable: {out}"
            );
        }
        let want = if profile == "cpu" {
            "DNS FAILED"
        } else {
            "DNS ANSWERED"
        };
        assert!(out.contains(want), "{profile}: {want}: {out}");
    }
    drop(listener);
}

#[tokio::test]
async fn a_profile_without_network_gives_containers_none() {
    if !super::super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start_with(|c| {
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "cpu.offline".into(),
            network: Some(false),
            ..Default::default()
        });
    })
    .await;
    let attacker = other_org(&s, "offline").await;
    let r = attacker
        .start_image_json(&serde_json::json!({
            "docker_image_ref": "local/busybox:full",
            "docker_run_cmd": ["ls", "/sys/class/net"],
            "execution_type": "cpu.offline",
        }))
        .await
        .unwrap();
    let (out, _) = read_stream(&attacker, &r.streaming_url, None).await;
    assert_status(
        &super::super::wait_end(&attacker, &r.execution_id).await,
        RunStatus::Completed,
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"], "{out}");
}

/// The run's IP, from a `ip=…` line its output starts with.
async fn ip_of(c: &stoa_client::Client, url: &str) -> String {
    use futures::StreamExt;
    let mut st = c.stream(url, None).await.unwrap();
    while let Some(ev) = st.next().await {
        if let stoa_types::StreamEvent::Output(o) = ev.unwrap().event
            && let Some(v) = o.content.trim().strip_prefix("ip=")
        {
            return v.to_string();
        }
    }
    panic!("no ip= line");
}

/// Networks are recycled: another org's run must never share one with a live run,
/// nor find anything of the run that used it before.
#[tokio::test]
async fn a_recycled_network_is_never_shared_and_carries_nothing_of_the_last_run() {
    if !super::super::docker_runs::engine_ready() {
        return;
    }
    const IMAGE: &str = "local/busybox:full";
    let s = TestServer::start_with(|c| {
        c.docker.network_pool = 1;
        c.docker.network_idle_s = 600;
    })
    .await;
    let victim = other_org(&s, "net-victim").await;
    let attacker = other_org(&s, "net-attacker").await;
    let serve = "echo ip=$(hostname -i); echo secret > /tmp/s; httpd -f -p 8080 -h /tmp";
    let v = victim
        .start_image_json(
            &serde_json::json!({"docker_image_ref": IMAGE, "timeout": 120,
            "docker_run_cmd": ["sh", "-c", serve]}),
        )
        .await
        .unwrap();
    let ip = ip_of(&victim, &v.streaming_url).await;
    let probe = format!(
        "echo ip=$(hostname -i); wget -T 3 -q -O - http://{ip}:8080/s && echo REACHED || echo REFUSED"
    );
    let body =
        serde_json::json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", probe]});
    // While the victim runs: the attacker's run is on another network.
    let a = attacker.start_image_json(&body).await.unwrap();
    let (out, _) = read_stream(&attacker, &a.streaming_url, None).await;
    assert!(out.contains("REFUSED") && !out.contains("secret"), "{out}");
    // The victim ends; its network is recycled for the attacker's next runs, which
    // find nothing at its old address.
    victim.abort(&v.execution_id).await.unwrap();
    for _ in 0..3 {
        let a = attacker.start_image_json(&body).await.unwrap();
        let (out, _) = read_stream(&attacker, &a.streaming_url, None).await;
        assert!(out.contains("REFUSED") && !out.contains("secret"), "{out}");
        assert_status(
            &super::super::wait_end(&attacker, &a.execution_id).await,
            RunStatus::Completed,
        );
    }
    let _ = s.stop().await;
}
