//! Ports of runs through the proxy (`/ports/{id}/{port}/`, `{id}-{port}.{base_domain}`),
//! HTTP and WebSocket, and notebooks (the official client's `notebook launch|list|stop`
//! and `stoa notebook`).

use std::time::Duration;

use serde_json::{Value, json};
use stoa_types::RunStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cli::{Lyceum, stoa};
use super::docker_runs::{docker, engine_ready};
use super::*;

/// A tiny image serving HTTP (a JSON echo of what it was sent) and a WebSocket echo on
/// `/ws`, on port 8888 (`EXPOSE`d) or the `--port=` given to `start-notebook.sh` (the
/// command the official client's `notebook launch` sends).
const IMAGE: &str = "local/stoa-test-ports:2";

const SERVER: &str = r#"import base64, hashlib, http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
            self.end_headers()
            self.wfile.flush()
            while True:
                h = self.rfile.read(2)
                if len(h) < 2:
                    return
                op, n = h[0] & 15, h[1] & 127
                mask = self.rfile.read(4) if h[1] & 128 else bytes(4)
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
                if op == 8:
                    return
                self.wfile.write(bytes([0x80 | op, len(data)]) + data)
                self.wfile.flush()
        body = json.dumps({"path": self.path, "authorization": self.headers.get("Authorization"), "cookie": self.headers.get("Cookie")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
print("serving", flush=True)
srv.serve_forever()
"#;

const START: &str = "#!/bin/sh\nport=8888\nfor a; do case $a in --port=*) port=${a#--port=};; esac; done\nexec python3 /srv.py $port\n";

/// Builds the test image once (from the local Python image).
fn image_ready() -> bool {
    if !engine_ready() {
        return false;
    }
    if docker(&["image", "inspect", IMAGE]).0 {
        return true;
    }
    if !docker(&["image", "inspect", "local/hostpython:3.11"]).0 {
        missing("the local/hostpython:3.11 image (scripts/ci/build-hostpython.sh)");
        return false;
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("srv.py"), SERVER).unwrap();
    std::fs::write(d.path().join("start-notebook.sh"), START).unwrap();
    std::fs::write(
        d.path().join("Dockerfile"),
        "FROM local/hostpython:3.11\nCOPY srv.py /srv.py\nCOPY start-notebook.sh /usr/local/bin/start-notebook.sh\nRUN chmod 755 /usr/local/bin/start-notebook.sh\nEXPOSE 8888\nCMD [\"python3\", \"/srv.py\", \"8888\"]\n",
    )
    .unwrap();
    let (ok, out) = docker(&["build", "-q", "-t", IMAGE, &d.path().display().to_string()]);
    assert!(ok, "building the test image: {out}");
    true
}

/// Waits until the run serves: it is running and its port is listed.
async fn wait_serving(c: &stoa_client::Client, id: &str, port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = c.execution(id).await.unwrap();
        assert!(!r.status.is_terminal(), "it ended: {r:?}");
        if r.ports.contains(&port) && r.stdout.contains("serving") {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never served: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A WebSocket exchange through the server at `base` (`http://…`) to `path`: the
/// status line of the answer to the upgrade, and the echo of one text message (empty
/// when there was no upgrade).
async fn websocket(base: &str, host: &str, path: &str, key: &str, text: &str) -> (String, Vec<u8>) {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.lines().next().unwrap_or_default().to_string();
    if !status.contains(" 101 ") {
        return (status, vec![]);
    }
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the run's accept key comes through: {head}"
    );
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend(mask);
    frame.extend(text.bytes().enumerate().map(|(i, c)| c ^ mask[i % 4]));
    tcp.write_all(&frame).await.unwrap();
    let mut echo = vec![0u8; 2 + text.len()];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echo))
        .await
        .expect("the echo comes back")
        .unwrap();
    (status, echo)
}

/// An image run's port through `/ports/{id}/{port}/` and its base-domain form: the
/// page, a WebSocket echo, Stoa's credentials kept from the run, the sandbox policy of
/// the path form; another org and an unknown port get 404; the port is gone once the
/// run ends.
#[tokio::test]
async fn an_image_runs_port_is_served_through_the_proxy_to_its_org_only() {
    if !image_ready() {
        return;
    }
    let s = TestServer::start_with(|c| c.ports.base_domain = Some("runs.test".into())).await;
    // No `ports` in the request: the image's EXPOSE names 8888.
    let r = s
        .client
        .start_image_json(&json!({"docker_image_ref": IMAGE, "timeout": 120}))
        .await
        .unwrap();
    let id = r.execution_id;
    wait_serving(&s.client, &id, 8888).await;
    let base = s.client.base().trim_end_matches('/').to_string();
    let http = reqwest::Client::new();

    // HTTP through the path form, with Stoa's key and session cookie kept from the run.
    let a = http
        .get(format!("{base}/ports/{id}/8888/hello/there?x=1"))
        .bearer_auth(ADMIN_KEY)
        .header("Cookie", "theirs=1; stoa_session=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    let csp = a.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.starts_with("sandbox"), "{csp}");
    let page: Value = a.json().await.unwrap();
    assert_eq!(page["path"], "/hello/there?x=1");
    assert_eq!(
        page["authorization"],
        Value::Null,
        "the key never reaches the run"
    );
    assert_eq!(page["cookie"], "theirs=1");
    // Without the slash: sent to it.
    let a = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}/ports/{id}/8888?token=t"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 308);
    assert_eq!(
        a.headers()["location"],
        format!("/ports/{id}/8888/?token=t")
    );

    // A WebSocket echo through the path form.
    let (status, echo) = websocket(
        &base,
        "127.0.0.1",
        &format!("/ports/{id}/8888/ws"),
        ADMIN_KEY,
        "ping",
    )
    .await;
    assert!(status.contains(" 101 "), "{status}");
    assert_eq!(echo, b"\x81\x04ping");

    // The base-domain form: the whole path is the run's, and no sandbox policy.
    let host = format!("{id}-8888.runs.test");
    let a = http
        .get(format!("{base}/tree?y=2"))
        .header("Host", &host)
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    assert!(a.headers().get("content-security-policy").is_none());
    let page: Value = a.json().await.unwrap();
    assert_eq!(page["path"], "/tree?y=2");
    let (status, echo) = websocket(&base, &host, "/ws", ADMIN_KEY, "pong").await;
    assert!(status.contains(" 101 "), "{status}");
    assert_eq!(echo, b"\x81\x04pong");

    // Another org: 404 for the page, the socket and the base-domain form, as for a run
    // that does not exist; no key at all: 401.
    let (_, other_key) = org_with_key(&s, "intruder").await;
    let a = http
        .get(format!("{base}/ports/{id}/8888/"))
        .bearer_auth(&other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 404);
    let (status, _) = websocket(
        &base,
        "127.0.0.1",
        &format!("/ports/{id}/8888/ws"),
        &other_key,
        "x",
    )
    .await;
    assert!(status.contains(" 404 "), "{status}");
    let a = http
        .get(format!("{base}/"))
        .header("Host", &host)
        .bearer_auth(&other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 404);
    let a = http
        .get(format!("{base}/ports/{id}/8888/"))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 401);
    // A port the run did not expose: 404.
    let a = http
        .get(format!("{base}/ports/{id}/22/"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 404);

    // A WebSocket open when the run ends is closed with it.
    let addr = base.trim_start_matches("http://").to_string();
    let mut open_ws = tokio::net::TcpStream::connect(&addr).await.unwrap();
    open_ws
        .write_all(format!("GET /ports/{id}/8888/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    open_ws.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");

    // Once the run ends, its port is gone: forgotten before its network could be the
    // next run's (the stored addresses are cleared), refused by the proxy.
    s.client.stop(&id).await.unwrap();
    let rec = s.wait_end(&id).await;
    assert_status(&rec, RunStatus::Cancelled);
    assert!(rec.ports.is_empty(), "{:?}", rec.ports);
    let store = s.handle.as_ref().unwrap().store.clone();
    let stored = store.get_run(id.parse().unwrap()).await.unwrap().unwrap();
    assert!(stored.ports.is_empty(), "{:?}", stored.ports);
    let mut rest = vec![];
    let closed =
        tokio::time::timeout(Duration::from_secs(10), open_ws.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the open WebSocket is closed with the run");
    let a = http
        .get(format!("{base}/ports/{id}/8888/"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 404);
}

/// `ports` and `job_type` are checked: 422 naming the field; a notebook's timeout may
/// pass the runs' cap up to `limits.notebook_max_timeout_s`.
#[tokio::test]
async fn ports_and_notebook_requests_are_checked() {
    let s = TestServer::start().await;
    for (body, field) in [
        (json!({"docker_image_ref": IMAGE, "ports": [0]}), "ports"),
        (json!({"docker_image_ref": IMAGE, "ports": "8888"}), "ports"),
        (
            json!({"docker_image_ref": IMAGE, "ports": (1..=9).collect::<Vec<u16>>()}),
            "ports",
        ),
        (
            json!({"docker_image_ref": IMAGE, "job_type": "miner"}),
            "job_type",
        ),
        (
            json!({"docker_image_ref": IMAGE, "timeout": 1200}),
            "timeout",
        ),
        (
            json!({"docker_image_ref": IMAGE, "timeout": 50000, "job_type": "customer_notebook"}),
            "timeout",
        ),
    ] {
        let r = s
            .client
            .raw(
                reqwest::Method::POST,
                "/api/v2/external/execution/image/start",
                Some(body.to_string().into()),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let detail: Value = r.json().await.unwrap();
        assert_eq!(
            locs(&detail),
            vec![format!("body.{field}")],
            "{body}: {detail}"
        );
    }
    // A compose file's services may not have more ports between them.
    let many: Vec<String> = (1..=9).map(|p| format!("\"{p}\"")).collect();
    let yaml = format!(
        "services:\n  web:\n    image: x\n    ports: [{}]\n",
        many.join(", ")
    );
    let r = s
        .client
        .raw(
            reqwest::Method::POST,
            "/api/v2/external/execution/compose/start",
            Some(json!({"compose_file_code": yaml}).to_string().into()),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let detail: Value = r.json().await.unwrap();
    assert_eq!(locs(&detail), vec!["body.compose_file_code"], "{detail}");
    assert_eq!(
        s.client.workloads(None).await.unwrap().len(),
        0,
        "nothing was stored"
    );
}

/// The official client's `notebook launch` (with a local image), `notebook list` and
/// `notebook stop`; then `stoa notebook launch` prints a URL that serves through this
/// server, `list` lists it and `stop` ends it `cancelled`.
#[tokio::test]
async fn notebooks_launch_list_and_stop_with_both_clients() {
    if !image_ready() {
        return;
    }
    let s = TestServer::start().await;
    let Some(ly) = Lyceum::login(&s).await else {
        return;
    };
    // Longer than the runs' 600 s cap: notebooks may.
    let o = ly
        .run(&[
            "notebook", "launch", "-m", "cpu", "--image", IMAGE, "-t", "1200",
        ])
        .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let listed = s.client.workloads(None).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0].execution_id.clone();
    assert_eq!(listed[0].job_type, "customer_notebook");
    assert!(o.stdout.contains(&id), "{}", o.stdout);
    let rec = s.client.execution(&id).await.unwrap();
    assert_eq!(rec.timeout, 1200);
    wait_serving(&s.client, &id, 8888).await;
    let o = ly.run(&["notebook", "list"]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains(&id[..8]), "{}", o.stdout);
    let o = ly.run(&["notebook", "stop", &id]).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_status(&s.wait_end(&id).await, RunStatus::Cancelled);

    // Stoa's own client: its URL is printed once the notebook answers through the
    // proxy, not as soon as the container runs (this one listens 2 s after it starts).
    let w = tempfile::tempdir().unwrap();
    let o = stoa(
        &[
            "notebook",
            "launch",
            "-i",
            IMAGE,
            "-t",
            "120",
            "--token",
            "tok",
            "-c",
            "sh -c 'sleep 2; exec start-notebook.sh --port=8888'",
        ],
        &s,
        w.path(),
    )
    .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let url = o.stdout.trim().to_string();
    let prefix = format!("{}/ports/", s.client.base().trim_end_matches('/'));
    let rest = url.strip_prefix(&prefix).unwrap_or_else(|| panic!("{url}"));
    let id = rest.split('/').next().unwrap().to_string();
    assert!(url.ends_with("/8888/?token=tok"), "{url}");
    let page: Value = reqwest::Client::new()
        .get(&url)
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["path"], "/?token=tok");
    let o = stoa(&["notebook", "list"], &s, w.path()).await;
    assert!(o.stdout.contains(&id), "{}{}", o.stdout, o.stderr);
    let o = stoa(&["notebook", "stop", &id], &s, w.path()).await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_status(&s.wait_end(&id).await, RunStatus::Cancelled);
    let o = stoa(&["notebook", "list"], &s, w.path()).await;
    assert!(o.stdout.contains("No notebooks running."), "{}", o.stdout);
}

/// A compose service's `ports:` are served by the proxy (as the published port, to the
/// container's), never published on the host; other services' are not reachable.
#[tokio::test]
async fn a_compose_services_ports_are_proxied_never_published() {
    if !image_ready() {
        return;
    }
    let s = TestServer::start().await;
    let yaml = format!(
        "services:\n  web:\n    image: {IMAGE}\n    ports: [\"8080:8888\"]\n  side:\n    image: local/busybox:full\n    command: [\"sleep\", \"60\"]\n"
    );
    let r = s
        .client
        .start_compose_json(&json!({"compose_file_code": yaml, "timeout": 120}))
        .await
        .unwrap();
    let id = r.execution_id;
    wait_serving(&s.client, &id, 8080).await;
    let base = s.client.base().trim_end_matches('/').to_string();
    let a = reqwest::Client::new()
        .get(format!("{base}/ports/{id}/8080/compose"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    let page: Value = a.json().await.unwrap();
    assert_eq!(page["path"], "/compose");
    let (status, echo) = websocket(
        &base,
        "127.0.0.1",
        &format!("/ports/{id}/8080/ws"),
        ADMIN_KEY,
        "hi",
    )
    .await;
    assert!(status.contains(" 101 "), "{status}");
    assert_eq!(echo, b"\x81\x02hi");
    // Nothing is bound on the host.
    let (ok, published) = docker(&["port", &format!("stoa-{id}-web")]);
    assert!(ok && published.trim().is_empty(), "{published}");
    let rec = s.client.execution(&id).await.unwrap();
    assert_eq!(rec.ports, vec![8080]);
    s.client.abort(&id).await.unwrap();
    assert_status(&s.wait_end(&id).await, RunStatus::Aborted);
    let store = s.handle.as_ref().unwrap().store.clone();
    let stored = store.get_run(id.parse().unwrap()).await.unwrap().unwrap();
    assert!(
        stored.ports.is_empty(),
        "forgotten before the network went back: {:?}",
        stored.ports
    );
}
