-- Retention and per-org output quotas.
-- Stored output bytes of each run, kept by append_output (the per-org sum is the quota's
-- measure); output_expired marks runs whose output retention removed. Output already
-- stored is counted once here (octet_length reads sizes without loading the text).
ALTER TABLE runs ADD COLUMN output_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN output_expired INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET output_bytes = (
    SELECT COALESCE(SUM(octet_length(content)), 0) FROM run_output WHERE run_output.run_id = runs.id
) WHERE EXISTS (SELECT 1 FROM run_output WHERE run_output.run_id = runs.id);
-- org_output_bytes: a covering scan of the org's runs that hold output.
CREATE INDEX runs_org_output ON runs(org_id, output_bytes) WHERE output_bytes > 0;
-- prune_output: runs that hold output, by end (creation when they never started).
CREATE INDEX runs_output_held ON runs(COALESCE(job_end, created_at)) WHERE output_bytes > 0;
-- prune_runs: runs by end.
CREATE INDEX runs_ended ON runs(COALESCE(job_end, created_at));
-- Runs deleted whose output rows are still to be removed (in batches, by retention):
-- a deleted run's row goes at once, its output may be millions of rows.
CREATE TABLE output_purge (
    run_id     TEXT PRIMARY KEY,
    deleted_at TEXT NOT NULL
) WITHOUT ROWID;
