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

use stoa_client::Client;

use super::TestServer;

/// A client of a new org `slug` (a tenant other than the admin's), the attacker.
pub async fn other_org(s: &TestServer, slug: &str) -> Client {
    let store = s.handle.as_ref().unwrap().store.clone();
    let org = store.create_org(slug, slug).await.unwrap();
    let secret = stoa_server::auth::generate_key();
    store
        .insert_key(&stoa_server::auth::key_record(&secret, &org, slug, false))
        .await
        .unwrap();
    Client::new(s.client.base(), &secret)
}
