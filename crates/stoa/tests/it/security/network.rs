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
    // A public address of this machine, when it has one: reachable with network on.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let public = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                .find(|a| a.is_ipv4() && !stoa_core::netguard::is_internal(*a))
        })
        .map(|a| a.to_string());
    if public.is_none() {
        eprintln!("this machine has no public address: the positive check is left out");
    }
    let mut all = targets.to_vec();
    if let Some(p) = &public {
        all.push((p.as_str(), port));
    }
    for profile in ["cpu", "cpu.net"] {
        let (rec, out) = run_to_end(
            &attacker,
            serde_json::json!({ "code": probe(&all), "execution_type": profile }),
        )
        .await;
        assert_status(&rec, RunStatus::Completed);
        for (host, port) in targets {
            assert!(
                out.contains(&format!("REFUSED {host}:{port}")),
                "{profile}: {host}:{port} is unreachable: {out}"
            );
        }
        if let Some(p) = &public {
            let want = if profile == "cpu" {
                "REFUSED"
            } else {
                "REACHED"
            };
            assert!(
                out.contains(&format!("{want} {p}:{port}")),
                "{profile}: {p}:{port} {want}: {out}"
            );
        }
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
