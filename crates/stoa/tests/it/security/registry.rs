//! Attacks: registry and container egress. An image reference naming a loopback,
//! private, link-local or metadata registry makes the engine (a host process)
//! contact that address, so it is refused at submit (and, for names that resolve
//! there, at pull time). Containers cannot reach the host (the server's API through
//! their network's gateway) nor internal addresses such as the metadata service, and
//! still reach the services of their own stack.

use std::process::Command;

use serde_json::{Value, json};
use stoa_client::Client;
use stoa_types::RunStatus;

use super::super::docker_runs::engine_ready;
use super::super::{TestServer, assert_status, in_ci, missing, wait_end};
use super::other_org;

const IMAGE: &str = "local/busybox:full";

async fn post(c: &Client, path: &str, body: &Value) -> (u16, Value) {
    let r = c
        .raw(
            reqwest::Method::POST,
            &format!("/api/v2/external/execution/{path}"),
            Some(body.to_string().into()),
        )
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn internal_registries_are_refused_at_submit() {
    let s = TestServer::start().await;
    let attacker = other_org(&s, "reg-attacker").await;
    let port = super::super::free_port();
    for image in [
        format!("127.0.0.1:{port}/x"),
        "localhost:5000/x".into(),
        "169.254.169.254/latest/x".into(),
        "[::1]:5000/x".into(),
        "10.0.0.5/x".into(),
        "2130706433:5000/x".into(),
    ] {
        let (status, body) = post(
            &attacker,
            "image/start",
            &json!({"docker_image_ref": image}),
        )
        .await;
        assert_eq!(status, 422, "{image}: {body}");
        let d = &body["detail"][0];
        assert_eq!(
            d["loc"],
            json!(["body", "docker_image_ref"]),
            "{image}: {body}"
        );
        assert!(
            d["msg"]
                .as_str()
                .unwrap()
                .contains("docker.allowed_registries"),
            "{body}"
        );
    }
    let stack =
        format!("services:\n  ok:\n    image: {IMAGE}\n  web:\n    image: 127.0.0.1:{port}/web\n");
    let (status, body) = post(
        &attacker,
        "compose/start",
        &json!({"compose_file_code": stack}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["detail"][0]["loc"],
        json!(["body", "compose_file_code", "services", "web", "image"]),
        "{body}"
    );
    assert!(
        attacker.workloads(None).await.unwrap().is_empty(),
        "no run was made"
    );
}

/// A name other than `localhost` that the host resolves to a loopback address (from
/// `/etc/hosts`), when there is one.
fn loopback_name() -> Option<String> {
    use std::net::ToSocketAddrs;
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|n| !n.contains("localhost") && !n.contains('.') && !n.is_empty())
        .find(|n| {
            (n.as_str(), 0)
                .to_socket_addrs()
                .is_ok_and(|mut a| a.all(|a| a.ip().is_loopback()))
        })
}

#[tokio::test]
async fn a_registry_name_resolving_inside_is_refused_at_pull() {
    if !engine_ready() {
        return;
    }
    let Some(name) = loopback_name() else {
        return missing("a host name other than localhost that resolves to loopback");
    };
    let s = TestServer::start().await;
    let attacker = other_org(&s, "reg-dns").await;
    let image = format!("{name}:{}/x:1", super::super::free_port());
    let r = attacker
        .start_image_json(&json!({"docker_image_ref": image}))
        .await
        .expect("a name is only resolved when the image is pulled");
    let rec = wait_end(&attacker, &r.execution_id).await;
    assert_status(&rec, RunStatus::Failed);
    let err = rec.result.error.clone().unwrap_or_default();
    assert!(
        err.contains("refused") && err.contains("docker.allowed_registries"),
        "{err}"
    );
}

/// Whether the egress rules are in place (then no probe packet leaves the machine).
fn egress_rules_installed() -> bool {
    let ok = |args: &[&str]| {
        Command::new("iptables")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ok(&[
        "-w",
        "-C",
        "DOCKER-USER",
        "-i",
        "stoa+",
        "-j",
        "STOA-EGRESS",
    ]) && ok(&["-w", "-C", "INPUT", "-i", "stoa+", "-j", "STOA-INPUT"])
        && ok(&[
            "-w",
            "-C",
            "STOA-EGRESS",
            "-d",
            "169.254.0.0/16",
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-admin-prohibited",
        ])
}

/// Shell lines printing `NAME reached` or `NAME refused` for an HTTP GET; `dollar` is
/// `$`, or `$$` inside a compose file.
fn probe(name: &str, url: &str, dollar: &str) -> String {
    format!(
        "if timeout 10 wget -q -O /dev/null {url} 2>/tmp/{name}.err; then echo {name} reached; else echo {name} refused {dollar}(cat /tmp/{name}.err); fi; "
    )
}

/// The address after `gateway ` in a run's output, read from its stream.
async fn gateway_of(c: &Client, url: &str) -> String {
    use futures::StreamExt;
    let mut events = c.stream(url, None).await.expect("stream opens");
    let mut text = String::new();
    let read = async {
        while let Some(ev) = events.next().await {
            if let stoa_types::StreamEvent::Output(o) = ev.expect("stream event").event {
                text.push_str(&o.content);
                if let Some(gw) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("gateway "))
                    .filter(|_| text.contains('\n'))
                {
                    return gw.trim().to_string();
                }
            }
        }
        panic!("the run ended before printing its gateway: {text}");
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("the gateway is printed in time")
}

#[tokio::test]
async fn containers_reach_neither_the_host_nor_metadata_but_their_own_services() {
    if !engine_ready() {
        return;
    }
    // On every address, so that only the firewall stands between a container and it.
    let s = TestServer::start_with(|c| c.listen = "0.0.0.0:0".into()).await;
    if !egress_rules_installed() {
        if in_ci() {
            panic!("the egress rules were not installed (iptables -S DOCKER-USER)");
        }
        return missing("iptables egress rules (root and iptables)");
    }
    let port = s.handle.as_ref().unwrap().addr.port();
    let attacker = other_org(&s, "egress").await;
    let api = "/api/v2/external/openapi.json";
    let script = format!(
        "GW=$(ip route | awk '/^default/ {{print $3}}'); echo gateway $GW; sleep 3; {}{}",
        probe("api", &format!("http://$GW:{port}{api}"), "$"),
        probe("metadata", "http://169.254.169.254/latest/meta-data/", "$"),
    );
    let r = attacker
        .start_image_json(
            &json!({"docker_image_ref": IMAGE, "docker_run_cmd": ["sh", "-c", script]}),
        )
        .await
        .unwrap();
    // While the run's network exists, the host itself reaches the API at the
    // gateway's address: only the container is kept out.
    let gw = gateway_of(&attacker, &r.streaming_url).await;
    let from_host = reqwest::get(format!("http://{gw}:{port}{api}"))
        .await
        .unwrap();
    assert_eq!(from_host.status().as_u16(), 200);
    let rec = wait_end(&attacker, &r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    let out = rec.stdout.clone();
    assert!(out.contains("api refused"), "{out}");
    assert!(out.contains("metadata refused"), "{out}");

    // A stack: its services reach each other, not the host nor metadata.
    let stack = format!(
        r#"
services:
  web:
    image: {IMAGE}
    command: ["sh", "-c", "echo index > /tmp/index.html && exec httpd -f -p 8000 -h /tmp"]
    init: true
    healthcheck: {{test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/"], interval: 200ms, retries: 50}}
  probe:
    image: {IMAGE}
    command: ["sh", "-c", "GW=$$(ip route | awk '/^default/ {{print $$3}}'); {own}{api}{meta}"]
    depends_on: {{web: {{condition: service_healthy}}}}
"#,
        own = probe("own", "http://web:8000/", "$$"),
        api = probe("api", &format!("http://$$GW:{port}{api}"), "$$"),
        meta = probe("metadata", "http://169.254.169.254/", "$$"),
    );
    let r = attacker
        .start_compose_json(&json!({"compose_file_code": stack, "timeout": 120}))
        .await
        .unwrap();
    let rec = wait_end(&attacker, &r.execution_id).await;
    assert_status(&rec, RunStatus::Completed);
    let out = rec.stdout.clone();
    assert!(out.contains("probe | own reached"), "{out}");
    assert!(out.contains("probe | api refused"), "{out}");
    assert!(out.contains("probe | metadata refused"), "{out}");
}
