//! Shared state of the running server.

use std::sync::Arc;

use stoa_core::Limits;
use stoa_store::Store;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::Engine;
use crate::hub::Hub;

/// Everything a request handler may use. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    pub engine: Arc<Engine>,
    /// Limits start requests are validated against.
    pub limits: Arc<Limits>,
    /// Flips to true when the server shuts down (ends live streams).
    pub shutdown: watch::Receiver<bool>,
    /// This machine's name, for log entries.
    pub hostname: Arc<str>,
    /// Master keys of secrets.
    pub keyring: Arc<crate::secrets::Keyring>,
    /// Callback outbox deliverer.
    pub deliverer: Arc<crate::callbacks::Deliverer>,
    /// Org storage.
    pub storage: Arc<crate::storage::Storage>,
    /// The S3 endpoint, unless `storage.s3_listen = "off"`.
    pub s3: Option<Arc<crate::storage::s3::S3Endpoint>>,
    /// The retention loop's outcome and trigger.
    pub retention: Arc<stoa_core::loops::Loop>,
}
