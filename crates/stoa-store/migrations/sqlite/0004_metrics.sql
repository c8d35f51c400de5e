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
CREATE TABLE run_gpu_samples (
    run_id        TEXT NOT NULL,
    ts            TEXT NOT NULL,
    gpu           INTEGER NOT NULL,
    util          REAL,
    mem_util      REAL,
    mem_used      REAL,
    temp          REAL,
    power         REAL,
    power_limit   REAL,
    clock_sm      REAL,
    clock_mem     REAL,
    pcie_rx       REAL,
    pcie_tx       REAL,
    PRIMARY KEY (run_id, ts, gpu)
) WITHOUT ROWID;
