-- Scheduling: priorities, idempotency keys, parent runs (GPU selection), assigned GPUs.
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 50;
ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
ALTER TABLE runs ADD COLUMN parent_id TEXT;
ALTER TABLE runs ADD COLUMN gpu_ids TEXT NOT NULL DEFAULT '[]';
CREATE INDEX runs_idempotency ON runs(org_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_parent ON runs(parent_id) WHERE parent_id IS NOT NULL;
