//! The change feed over PostgreSQL: every transaction that stores output or changes a
//! run's state sends `NOTIFY stoa_changes, '<what>:<run id>'` (delivered at commit, to
//! every server listening); [`PgFeed`] listens and tells the local readers to look
//! again. Only ids travel: the store stays the only source of lines.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgListener;
use stoa_types::RunId;
use tokio::sync::watch;

use crate::ChangeFeed;

/// The channel of run changes.
pub(super) const CHANNEL: &str = "stoa_changes";

/// Listens to the changes other servers make (see the module).
pub struct PgFeed {
    url: String,
}

impl PgFeed {
    pub(super) fn new(url: String) -> Self {
        PgFeed { url }
    }
}

#[async_trait]
impl ChangeFeed for PgFeed {
    async fn follow(
        &self,
        changed: &(dyn Fn(Option<RunId>) + Send + Sync),
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        while !*shutdown.borrow() {
            let mut listener = match PgListener::connect(&self.url).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "change feed: cannot connect; retrying in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "change feed: LISTEN failed");
                continue;
            }
            backoff = Duration::from_millis(100);
            // What happened while nobody listened is unknown: every reader looks again.
            changed(None);
            loop {
                tokio::select! {
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => {
                            let id = n.payload().split_once(':').and_then(|(_, id)| id.parse().ok());
                            if id.is_some() {
                                changed(id);
                            }
                        }
                        // The connection was lost: reconnect, then tell every reader.
                        Ok(None) | Err(_) => break,
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
