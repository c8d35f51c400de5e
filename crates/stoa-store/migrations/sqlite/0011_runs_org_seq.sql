-- An org's runs newest first (runs lists, the dashboard) read in index order instead of
-- sorting all of the org's runs (PostgreSQL has had it from its first migration).
CREATE INDEX IF NOT EXISTS runs_org_seq ON runs(org_id, seq);
