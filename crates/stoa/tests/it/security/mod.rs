//! Attacks, each run through the real API as another org would, against a server
//! running as root (as CI does). Every test here failed on the code before the
//! hardening of issue #11 and passes after it.

mod api;
mod callbacks;
mod compose;
mod fairness;
mod misc;
mod network;
mod registry;
mod sandbox;
mod storage;
mod workers;

pub use super::{org_with_key, other_org};

/// Starts a Python run from a JSON body as `c`, reads its whole stream, and returns its
/// final record and output.
pub async fn run_to_end(
    c: &stoa_client::Client,
    body: serde_json::Value,
) -> (stoa_types::ExecutionRecord, String) {
    let r = c.start_python_json(&body).await.unwrap();
    let (out, _) = super::read_stream(c, &r.streaming_url, None).await;
    (super::wait_end(c, &r.execution_id).await, out)
}
