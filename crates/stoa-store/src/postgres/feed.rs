//! The change feed over PostgreSQL: every transaction that stores output or changes a
//! run's state sends `NOTIFY stoa_changes, '<what>:<run id>'` (delivered at commit, to
//! every server listening); [`PgFeed`] listens and tells the local readers to look
//! again. Only ids travel: the store stays the only source of lines.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::{Change, ChangeFeed};

/// The channel of run changes.
pub(super) const CHANNEL: &str = "stoa_changes";

/// Listens to the changes other servers make (see the module).
pub struct PgFeed {
    url: String,
    /// The `application_name` of this process's store: its own notifications are
    /// skipped.
    own: String,
}

impl PgFeed {
    pub(super) fn new(url: String, origin: std::sync::Arc<str>) -> Self {
        PgFeed {
            url,
            own: format!("stoa-{origin}"),
        }
    }
}

/// What a notification says, unless this process sent it: `<what>:<run id>:<sender>`
/// (`output`, `state`), or `queued:-:<sender>`.
fn change_of(payload: &str, own: &str) -> Option<Change> {
    let mut parts = payload.splitn(3, ':');
    let (what, id, from) = (parts.next()?, parts.next()?, parts.next()?);
    if from == own {
        return None;
    }
    match what {
        "queued" => Some(Change::Queued),
        "output" => id.parse().ok().map(Change::Output),
        _ => id.parse().ok().map(Change::State),
    }
}

#[async_trait]
impl ChangeFeed for PgFeed {
    async fn follow(
        &self,
        changed: &(dyn Fn(Change) + Send + Sync),
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
                tracing::warn!(error = %e, "change feed: LISTEN failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            backoff = Duration::from_millis(100);
            // What happened while nobody listened is unknown: every reader looks again.
            changed(Change::Unknown);
            loop {
                tokio::select! {
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => {
                            if let Some(c) = change_of(n.payload(), &self.own) {
                                changed(c);
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

#[cfg(test)]
mod tests {
    use super::*;
    use stoa_types::RunId;

    #[test]
    fn a_notification_names_its_change_unless_this_process_sent_it() {
        let id = RunId::new();
        assert_eq!(
            change_of(&format!("output:{id}:stoa-other"), "stoa-me"),
            Some(Change::Output(id))
        );
        assert_eq!(change_of(&format!("state:{id}:stoa-me"), "stoa-me"), None);
        assert_eq!(change_of("state:not-an-id:stoa-other", "stoa-me"), None);
        assert_eq!(
            change_of(&format!("state:{id}:stoa-other"), "stoa-me"),
            Some(Change::State(id))
        );
        assert_eq!(change_of(&format!("state:{id}"), "stoa-me"), None);
        assert_eq!(
            change_of("queued:-:stoa-other", "stoa-me"),
            Some(Change::Queued)
        );
        assert_eq!(change_of("queued:-:stoa-me", "stoa-me"), None);
    }
}
