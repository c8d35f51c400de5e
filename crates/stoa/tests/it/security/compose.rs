//! Attacks: compose. A 422 never hands back a value that interpolation put into the
//! file (an org's secrets are write-only through the API), another org's variables are
//! not interpolated, and a YAML tag does not slip a key past the check.

use serde_json::json;

use super::super::TestServer;
use super::other_org;

/// The secret the attacker's org holds (its members may use it, never read it).
const TOKEN: &str = "tok-7f3a91-do-not-show";

/// Sends a compose start and returns the status and the raw body.
async fn start_raw(c: &stoa_client::Client, yaml: &str) -> (u16, String) {
    let body = json!({"compose_file_code": yaml, "execution_type": "cpu"});
    let r = c
        .raw(
            reqwest::Method::POST,
            "/api/v2/external/execution/compose/start",
            Some(body.to_string().into()),
        )
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// True when the org has no run in any state.
pub async fn no_runs(c: &stoa_client::Client) -> bool {
    c.workloads(Some("pending,running,completed,failed"))
        .await
        .unwrap()
        .is_empty()
}

/// The `loc` of every 422 entry of a reply body, joined with dots.
fn locs(body: &str) -> Vec<String> {
    super::super::locs(&serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn a_422_never_shows_an_interpolated_secret() {
    let s = TestServer::start().await;
    let attacker = other_org(&s, "compose-leak").await;
    attacker.env_set(&[("TOKEN", TOKEN)]).await.unwrap();
    // Each file puts the secret where a check fails on it, at a different step.
    let cases = [
        ("    init: ${TOKEN}\n", "services.a.init"),
        ("    shm_size: ${TOKEN}\n", "services.a.shm_size"),
        ("    depends_on: [\"${TOKEN}\"]\n", "services.a.depends_on"),
        ("    volumes: [\"${TOKEN}:/x\"]\n", "services.a.volumes[0]"),
        ("    tmpfs: [\"${TOKEN}\"]\n", "services.a.tmpfs"),
        ("    command: \"echo '${TOKEN}\"\n", "services.a.command"),
        (
            "    environment: [\"${TOKEN}=1\"]\n",
            "services.a.environment[0]",
        ),
        (
            "    healthcheck: {test: [CMD, \"true\"], interval: \"${TOKEN}\"}\n",
            "services.a.healthcheck.interval",
        ),
        (
            "    deploy: {resources: {limits: {cpus: \"${TOKEN}\"}}}\n",
            "services.a.deploy.resources.limits.cpus",
        ),
        (
            "    stop_grace_period: \"${TOKEN}\"\n",
            "services.a.stop_grace_period",
        ),
        ("    labels: \"${X:?${TOKEN}}\"\n", "services.a.labels"),
    ];
    for (extra, path) in cases {
        let yaml = format!("services:\n  a:\n    image: local/busybox:full\n{extra}");
        let (status, body) = start_raw(&attacker, &yaml).await;
        assert_eq!(status, 422, "{yaml}: {body}");
        assert!(
            !body.contains(TOKEN),
            "{yaml}: the 422 shows the secret: {body}"
        );
        assert!(
            !body.contains("7f3a91"),
            "{yaml}: part of the secret: {body}"
        );
        let want = format!("body.compose_file_code.{path}");
        assert!(locs(&body).contains(&want), "{want} not in {body}");
    }
    let yaml =
        "x-stoa: {exit-code-from: \"${TOKEN}\"}\nservices:\n  a: {image: local/busybox:full}\n";
    let (status, body) = start_raw(&attacker, yaml).await;
    assert_eq!(status, 422, "{body}");
    assert!(!body.contains(TOKEN), "{body}");
    assert!(no_runs(&attacker).await, "no run was created");
}

#[tokio::test]
async fn another_orgs_variables_are_not_interpolated() {
    let s = TestServer::start().await;
    s.client.env_set(&[("ADMIN_TOKEN", TOKEN)]).await.unwrap();
    let attacker = other_org(&s, "compose-peek").await;
    let yaml = "services:\n  a:\n    image: local/busybox:full\n    init: ${ADMIN_TOKEN:?}\n";
    let (status, body) = start_raw(&attacker, yaml).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("required variable ADMIN_TOKEN is missing a value"),
        "{body}"
    );
    assert!(!body.contains(TOKEN), "{body}");
}

#[tokio::test]
async fn yaml_tags_are_refused_with_their_path() {
    let s = TestServer::start().await;
    let attacker = other_org(&s, "compose-tags").await;
    for (yaml, path) in [
        // The tag used to hide `privileged` (and anything else) from the key check.
        (
            "services: !x {a: {image: local/busybox:full, privileged: true, network_mode: host}}\n",
            "services",
        ),
        (
            "services:\n  a:\n    image: local/busybox:full\n    volumes: [!bind \"/:/host\"]\n",
            "services.a.volumes[0]",
        ),
        (
            "services:\n  a: !svc\n    image: local/busybox:full\n    privileged: true\n",
            "services.a",
        ),
    ] {
        let (status, body) = start_raw(&attacker, yaml).await;
        assert_eq!(status, 422, "{yaml}: {body}");
        assert_eq!(
            locs(&body),
            [format!("body.compose_file_code.{path}")],
            "{body}"
        );
        assert!(body.contains("YAML tags"), "{body}");
    }
    assert!(no_runs(&attacker).await);
}
