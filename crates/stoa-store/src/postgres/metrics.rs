//! PostgreSQL: metric samples and summaries.

use super::*;

#[async_trait]
impl MetricStore for PgStore {
    async fn insert_samples(&self, samples: Vec<Sample>) -> Result<()> {
        // One statement may not write a row twice: the last sample of a (run, time)
        // wins, as a replace would.
        let mut by_key = BTreeMap::new();
        for s in samples {
            by_key.insert((s.run_id, s.ts), s);
        }
        let samples: Vec<Sample> = by_key.into_values().collect();
        if samples.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = samples.iter().map(|s| s.run_id.to_string()).collect();
        let ts: Vec<Time> = samples.iter().map(|s| s.ts).collect();
        let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_percent).collect();
        let used: Vec<i64> = samples.iter().map(|s| s.ram_used).collect();
        let total: Vec<i64> = samples.iter().map(|s| s.ram_total).collect();
        sqlx::query(
            "INSERT INTO run_samples (run_id, ts, cpu_percent, ram_used, ram_total)
             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::float8[], $4::int8[], $5::int8[])
             ON CONFLICT (run_id, ts) DO UPDATE SET cpu_percent = excluded.cpu_percent,
                ram_used = excluded.ram_used, ram_total = excluded.ram_total",
        )
        .bind(&ids)
        .bind(&ts)
        .bind(&cpu)
        .bind(&used)
        .bind(&total)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn samples(&self, id: RunId, start: Time, end: Time) -> Result<Vec<Sample>> {
        let rows: Vec<(Time, f64, i64, i64)> = sqlx::query_as(
            "SELECT ts, cpu_percent, ram_used, ram_total FROM run_samples
             WHERE run_id = $1 AND ts >= $2 AND ts <= $3 ORDER BY ts",
        )
        .bind(id.to_string())
        .bind(start)
        .bind(end)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(ts, cpu_percent, ram_used, ram_total)| Sample {
                run_id: id,
                ts,
                cpu_percent,
                ram_used,
                ram_total,
            })
            .collect())
    }

    async fn insert_gpu_samples(&self, run: RunId, samples: Vec<GpuSample>) -> Result<()> {
        self.tx(move |c| {
            Box::pin(async move {
                for s in &samples {
                    let v = &s.values;
                    sqlx::query(
                        "INSERT INTO run_gpu_samples (run_id, ts, gpu, util, mem_util, mem_used, temp, power, power_limit, clock_sm, clock_mem, pcie_rx, pcie_tx)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                         ON CONFLICT (run_id, ts, gpu) DO UPDATE SET util = excluded.util, mem_util = excluded.mem_util,
                            mem_used = excluded.mem_used, temp = excluded.temp, power = excluded.power,
                            power_limit = excluded.power_limit, clock_sm = excluded.clock_sm,
                            clock_mem = excluded.clock_mem, pcie_rx = excluded.pcie_rx, pcie_tx = excluded.pcie_tx",
                    )
                    .bind(run.to_string())
                    .bind(s.ts)
                    .bind(s.gpu)
                    .bind(v[0])
                    .bind(v[1])
                    .bind(v[2])
                    .bind(v[3])
                    .bind(v[4])
                    .bind(v[5])
                    .bind(v[6])
                    .bind(v[7])
                    .bind(v[8])
                    .bind(v[9])
                    .execute(&mut *c)
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn gpu_samples(&self, id: RunId, start: Time, end: Time) -> Result<Vec<GpuSample>> {
        let rows = sqlx::query(
            "SELECT ts, gpu, util, mem_util, mem_used, temp, power, power_limit, clock_sm, clock_mem, pcie_rx, pcie_tx
             FROM run_gpu_samples WHERE run_id = $1 AND ts >= $2 AND ts <= $3 ORDER BY ts, gpu",
        )
        .bind(id.to_string())
        .bind(start)
        .bind(end)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let mut values = [None; 10];
                for (i, v) in values.iter_mut().enumerate() {
                    *v = r.try_get(2 + i)?;
                }
                Ok(GpuSample {
                    run_id: Some(id),
                    ts: r.try_get(0)?,
                    gpu: r.try_get(1)?,
                    values,
                })
            })
            .collect()
    }

    async fn set_metrics_summary(&self, id: RunId, summary: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET metrics_summary = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(summary)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn metrics_summary(&self, id: RunId) -> Result<Option<String>> {
        Ok(sqlx::query_scalar::<_, Option<String>>(
            "SELECT metrics_summary FROM runs WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(self.pool())
        .await?
        .flatten())
    }

    async fn prune_samples(&self, before: Time) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM run_samples WHERE ts < $1")
            .bind(before)
            .execute(self.pool())
            .await?
            .rows_affected())
    }
}
