//! PostgreSQL: the callback outbox.

use super::*;

/// The columns of a delivery.
macro_rules! delivery_columns {
    () => {
        "id, run_id, org_id, url, payload, state, attempts, next_attempt_at, last_status, last_error"
    };
}

#[async_trait]
impl DeliveryStore for PgStore {
    async fn claim_deliveries(
        &self,
        now: Time,
        limit: i64,
        hold: Duration,
    ) -> Result<Vec<Delivery>> {
        // SKIP LOCKED: two servers claiming at once take different deliveries.
        let rows = sqlx::query(concat!(
            "UPDATE callback_deliveries SET next_attempt_at = $2
             WHERE id IN (SELECT id FROM callback_deliveries WHERE state = 'pending' AND next_attempt_at <= $1
                          ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            delivery_columns!()
        ))
        .bind(now)
        .bind(after(now, hold))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut out = rows
            .iter()
            .map(delivery_from_row)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    async fn record_attempt(&self, d: &Delivery) -> Result<()> {
        sqlx::query(
            "UPDATE callback_deliveries SET state = $2, attempts = $3, next_attempt_at = $4,
                last_status = $5, last_error = $6, updated_at = $7 WHERE id = $1",
        )
        .bind(d.id)
        .bind(d.state.as_str())
        .bind(d.attempts)
        .bind(d.next_attempt_at)
        .bind(d.last_status)
        .bind(&d.last_error)
        .bind(stoa_core::time::now())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn deliveries_for_run(&self, id: RunId) -> Result<Vec<Delivery>> {
        sqlx::query(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM callback_deliveries WHERE run_id = $1 ORDER BY id"
        ))
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(delivery_from_row)
        .collect()
    }

    async fn next_delivery_at(&self) -> Result<Option<Time>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM callback_deliveries WHERE state = 'pending'",
        )
        .fetch_one(self.pool())
        .await?)
    }
}
