//! Attacks: callbacks. Every way of writing an internal address (loopback in IPv6
//! forms that embed it, NAT64, 6to4, site-local, benchmarking, shorthand IPv4, the
//! metadata address) is refused before any connection, and credentials in a callback
//! URL never show in what the server reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use stoa_types::ExecutionRecord;

use super::super::{TestServer, wait_end};
use super::other_org;

/// A listener on every IPv4 and IPv6 address that counts the connections it gets.
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let v4 = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = v4.local_addr().unwrap().port();
    let mut listeners = vec![v4];
    // IPv6-only on the same port, when the host has IPv6.
    if let Ok(v6) = tokio::net::TcpListener::bind(("::", port)).await {
        listeners.push(v6);
    }
    for l in listeners {
        let hits = hits.clone();
        tokio::spawn(async move {
            while let Ok((_conn, _)) = l.accept().await {
                hits.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    (port, hits)
}

async fn settled(c: &stoa_client::Client, id: &str) -> ExecutionRecord {
    for _ in 0..300 {
        let r = c.execution(id).await.unwrap();
        if !r.callbacks.is_empty() && r.callbacks.iter().all(|d| d.state != "pending") {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("callbacks of {id} did not settle");
}

#[tokio::test]
async fn every_internal_address_form_is_refused() {
    let (port, hits) = counting_listener().await;
    let s = TestServer::start_with(|c| {
        c.callbacks.max_urls = 32;
        c.callbacks.backoff_base_ms = 100;
    })
    .await;
    let attacker = other_org(&s, "cb-attacker").await;
    let urls: Vec<String> = [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "localhost",
        "[::1]",
        "[::]",
        "[::127.0.0.1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[64:ff9b::7f00:1]",
        "[64:ff9b::a9fe:a9fe]",
        "[2002:7f00:1::]",
        "[fec0::1]",
        "[fe80::1]",
        "[fd00::1]",
        "169.254.169.254",
        "198.18.0.1",
        "100.64.0.1",
        "192.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
    ]
    .iter()
    .map(|h| format!("http://{h}:{port}/cb"))
    .collect();
    let r = attacker
        .start_python_json(&json!({"code": "print(1)", "user_callback_urls": urls}))
        .await
        .unwrap();
    wait_end(&attacker, &r.execution_id).await;
    let rec = settled(&attacker, &r.execution_id).await;
    assert_eq!(rec.callbacks.len(), urls.len());
    for d in &rec.callbacks {
        assert_eq!(d.state, "failed", "{d:?}");
        assert_eq!(d.attempts, 1, "a refusal is not retried: {d:?}");
        let e = d.last_error.as_deref().unwrap_or("");
        assert!(e.starts_with("refused"), "{}: {e}", d.url);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no connection was made");
}

#[tokio::test]
async fn credentials_in_callback_urls_are_not_reported() {
    // Loopback is allowed here so that the delivery is attempted; nothing listens.
    let port = super::super::free_port();
    let s = TestServer::start_with(|c| {
        c.callbacks.allow_hosts = vec!["127.0.0.1".into()];
        c.callbacks.max_attempts = 1;
        c.callbacks.timeout_s = 2;
    })
    .await;
    let attacker = other_org(&s, "cb-creds").await;
    let url = format!("http://hook-user:hunter2-pass@127.0.0.1:{port}/cb");
    let r = attacker
        .start_python_json(&json!({"code": "print(1)", "user_callback_urls": [url]}))
        .await
        .unwrap();
    wait_end(&attacker, &r.execution_id).await;
    let rec = settled(&attacker, &r.execution_id).await;
    let d = &rec.callbacks[0];
    assert_eq!(d.state, "failed", "{d:?}");
    let e = d.last_error.as_deref().unwrap();
    assert!(e.starts_with("request failed"), "{e}");
    assert!(
        !e.contains("hunter2-pass") && !e.contains("hook-user"),
        "{e}"
    );
}
