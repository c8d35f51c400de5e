-- Per-run system samples and the summary kept with a run once it ends.
CREATE TABLE run_samples (
    run_id      TEXT NOT NULL,
    ts          TEXT NOT NULL,
    cpu_percent REAL NOT NULL,
    ram_used    INTEGER NOT NULL,
    ram_total   INTEGER NOT NULL,
    PRIMARY KEY (run_id, ts)
) WITHOUT ROWID;
CREATE INDEX run_samples_ts ON run_samples(ts);
ALTER TABLE runs ADD COLUMN metrics_summary TEXT;
