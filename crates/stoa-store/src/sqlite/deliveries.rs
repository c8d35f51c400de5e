//! SQLite: the callback outbox.

use super::*;

#[async_trait]
impl DeliveryStore for SqliteStore {
    async fn claim_deliveries(
        &self,
        now: Time,
        limit: i64,
        hold: Duration,
    ) -> Result<Vec<Delivery>> {
        let held =
            stamp(&(now + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::days(1))));
        let now = stamp(&now);
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "UPDATE callback_deliveries SET next_attempt_at = ?2
                 WHERE id IN (SELECT id FROM callback_deliveries WHERE state = 'pending' AND next_attempt_at <= ?1
                              ORDER BY next_attempt_at, id LIMIT ?3)
                 RETURNING {DELIVERY_COLUMNS}"
            ))?;
            let mut rows = st
                .query_map(params![now, held, limit], delivery_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.sort_by_key(|d| d.id);
            Ok(rows)
        })
        .await
    }

    async fn record_attempt(&self, d: &Delivery) -> Result<()> {
        let d = d.clone();
        self.call(move |c| {
            c.execute(
                "UPDATE callback_deliveries SET state = ?2, attempts = ?3, next_attempt_at = ?4, last_status = ?5, last_error = ?6, updated_at = ?7 WHERE id = ?1",
                params![d.id, d.state.as_str(), d.attempts, stamp(&d.next_attempt_at), d.last_status, d.last_error, now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn deliveries_for_run(&self, id: RunId) -> Result<Vec<Delivery>> {
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM callback_deliveries WHERE run_id = ?1 ORDER BY id"
            ))?;
            let rows = st
                .query_map([id.to_string()], delivery_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn next_delivery_at(&self) -> Result<Option<Time>> {
        self.call(|c| {
            Ok(c.query_row(
                "SELECT MIN(next_attempt_at) FROM callback_deliveries WHERE state = 'pending'",
                [],
                |r| opt_time_at(r, 0),
            )?)
        })
        .await
    }
}
