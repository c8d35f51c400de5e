-- Leases: which worker holds an active run, until when, and what the control plane asks
-- of it. A claim writes a fresh token; heartbeats move the expiry on; every write a
-- worker makes after the claim names the token, so a worker that lost its lease cannot
-- overwrite what the reaper wrote. `control` is an abort or stop the worker is told on
-- its next heartbeat ('abort' or 'stop:<grace in ms>').
ALTER TABLE runs ADD COLUMN lease_token TEXT;
ALTER TABLE runs ADD COLUMN lease_expires_at TEXT;
ALTER TABLE runs ADD COLUMN lease_heard_at TEXT;
ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN control TEXT;
-- The reaper: held leases by expiry.
CREATE INDEX runs_lease_expiry ON runs(lease_expires_at) WHERE lease_token IS NOT NULL;
