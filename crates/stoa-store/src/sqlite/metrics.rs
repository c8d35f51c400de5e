//! SQLite: metric samples and summaries.

use super::*;

#[async_trait]
impl MetricStore for SqliteStore {
    async fn insert_samples(&self, samples: Vec<Sample>) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO run_samples (run_id, ts, cpu_percent, ram_used, ram_total) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for s in &samples {
                    st.execute(params![s.run_id.to_string(), stamp(&s.ts), s.cpu_percent, s.ram_used, s.ram_total])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn samples(&self, id: RunId, start: Time, end: Time) -> Result<Vec<Sample>> {
        let (start, end) = (stamp(&start), stamp(&end));
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT ts, cpu_percent, ram_used, ram_total FROM run_samples WHERE run_id = ?1 AND ts >= ?2 AND ts <= ?3 ORDER BY ts",
            )?;
            let rows = st
                .query_map(params![id.to_string(), start, end], |r| {
                    Ok(Sample { run_id: id, ts: time_at(r, 0)?, cpu_percent: r.get(1)?, ram_used: r.get(2)?, ram_total: r.get(3)? })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_gpu_samples(&self, run: RunId, samples: Vec<GpuSample>) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO run_gpu_samples (run_id, ts, gpu, util, mem_util, mem_used, temp, power, power_limit, clock_sm, clock_mem, pcie_rx, pcie_tx)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )?;
                for s in &samples {
                    let v = &s.values;
                    st.execute(params![run.to_string(), stamp(&s.ts), s.gpu, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn gpu_samples(&self, id: RunId, start: Time, end: Time) -> Result<Vec<GpuSample>> {
        let (start, end) = (stamp(&start), stamp(&end));
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT ts, gpu, util, mem_util, mem_used, temp, power, power_limit, clock_sm, clock_mem, pcie_rx, pcie_tx
                 FROM run_gpu_samples WHERE run_id = ?1 AND ts >= ?2 AND ts <= ?3 ORDER BY ts, gpu",
            )?;
            let rows = st
                .query_map(params![id.to_string(), start, end], |r| {
                    let mut values = [None; 10];
                    for (i, v) in values.iter_mut().enumerate() {
                        *v = r.get(2 + i)?;
                    }
                    Ok(GpuSample { run_id: Some(id), ts: time_at(r, 0)?, gpu: r.get(1)?, values })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn set_metrics_summary(&self, id: RunId, summary: &str) -> Result<()> {
        let summary = summary.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET metrics_summary = ?2 WHERE id = ?1",
                params![id.to_string(), summary],
            )?;
            Ok(())
        })
        .await
    }

    async fn metrics_summary(&self, id: RunId) -> Result<Option<String>> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT metrics_summary FROM runs WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
        })
        .await
    }

    async fn prune_samples(&self, before: Time) -> Result<u64> {
        let before = stamp(&before);
        self.call(move |c| Ok(c.execute("DELETE FROM run_samples WHERE ts < ?1", [before])? as u64))
            .await
    }
}
