-- Stoa's schema on PostgreSQL: the same tables as the SQLite schema at its version 9,
-- with PostgreSQL's types (times are timestamptz, lists and maps jsonb, flags boolean).
CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    slug        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    is_admin     BOOLEAN NOT NULL DEFAULT FALSE,
    is_active    BOOLEAN NOT NULL DEFAULT TRUE,
    created_at   TIMESTAMPTZ NOT NULL,
    last_used_at TIMESTAMPTZ
);

CREATE TABLE runs (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    org_id           TEXT NOT NULL REFERENCES orgs(id),
    status           TEXT NOT NULL,
    job_type         TEXT NOT NULL,
    execution_type   TEXT NOT NULL,
    file_name        TEXT,
    spec             TEXT NOT NULL,
    timeout_s        BIGINT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    job_start        TIMESTAMPTZ,
    job_end          TIMESTAMPTZ,
    return_code      BIGINT,
    error            TEXT,
    timed_out        BOOLEAN NOT NULL DEFAULT FALSE,
    pending_reason   TEXT,
    phases           JSONB NOT NULL DEFAULT '[]',
    worker_id        TEXT,
    pgid             BIGINT,
    run_name         TEXT,
    labels           JSONB NOT NULL DEFAULT '[]',
    metadata         JSONB NOT NULL DEFAULT '{}',
    callback_urls    JSONB NOT NULL DEFAULT '[]',
    output_truncated BOOLEAN NOT NULL DEFAULT FALSE,
    price_per_hour   DOUBLE PRECISION,
    priority         BIGINT NOT NULL DEFAULT 50,
    idempotency_key  TEXT,
    parent_id        TEXT,
    gpu_ids          JSONB NOT NULL DEFAULT '[]',
    metrics_summary  TEXT,
    output_bytes     BIGINT NOT NULL DEFAULT 0,
    output_expired   BOOLEAN NOT NULL DEFAULT FALSE,
    -- Leases (see the SQLite migration 0007).
    lease_token      TEXT,
    lease_expires_at TIMESTAMPTZ,
    lease_heard_at   TIMESTAMPTZ,
    attempt          BIGINT NOT NULL DEFAULT 0,
    control          TEXT
);
CREATE INDEX runs_org_status ON runs(org_id, status);
CREATE INDEX runs_org_seq ON runs(org_id, seq);
CREATE INDEX runs_status ON runs(status, seq);
-- Claims take the first pending run by priority, then age.
CREATE INDEX runs_pending ON runs(priority DESC, seq) WHERE status = 'pending';
CREATE INDEX runs_idempotency ON runs(org_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_parent ON runs(parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_org_output ON runs(org_id, output_bytes) WHERE output_bytes > 0;
CREATE INDEX runs_output_held ON runs((COALESCE(job_end, created_at))) WHERE output_bytes > 0;
CREATE INDEX runs_ended ON runs((COALESCE(job_end, created_at)));
CREATE INDEX runs_lease_expiry ON runs(lease_expires_at) WHERE lease_token IS NOT NULL;
CREATE INDEX runs_worker_active ON runs(worker_id) WHERE status IN ('starting', 'running');

CREATE TABLE run_output (
    run_id   TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    stream   TEXT NOT NULL,
    content  TEXT NOT NULL,
    ts       TIMESTAMPTZ NOT NULL,
    service  TEXT,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE output_purge (
    run_id     TEXT PRIMARY KEY,
    deleted_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE secrets (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    ciphertext  BYTEA NOT NULL,
    nonce       BYTEA NOT NULL,
    key_id      TEXT NOT NULL,
    is_secret   BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE org_callback_secrets (
    org_id      TEXT PRIMARY KEY REFERENCES orgs(id),
    ciphertext  BYTEA NOT NULL,
    nonce       BYTEA NOT NULL,
    key_id      TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE callback_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    run_id          TEXT NOT NULL,
    org_id          TEXT NOT NULL,
    url             TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_status     BIGINT,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX callback_deliveries_due ON callback_deliveries(state, next_attempt_at);
CREATE INDEX callback_deliveries_run ON callback_deliveries(run_id);

CREATE TABLE run_samples (
    run_id      TEXT NOT NULL,
    ts          TIMESTAMPTZ NOT NULL,
    cpu_percent DOUBLE PRECISION NOT NULL,
    ram_used    BIGINT NOT NULL,
    ram_total   BIGINT NOT NULL,
    PRIMARY KEY (run_id, ts)
);
CREATE INDEX run_samples_ts ON run_samples(ts);

CREATE TABLE run_gpu_samples (
    run_id        TEXT NOT NULL,
    ts            TIMESTAMPTZ NOT NULL,
    gpu           BIGINT NOT NULL,
    util          DOUBLE PRECISION,
    mem_util      DOUBLE PRECISION,
    mem_used      DOUBLE PRECISION,
    temp          DOUBLE PRECISION,
    power         DOUBLE PRECISION,
    power_limit   DOUBLE PRECISION,
    clock_sm      DOUBLE PRECISION,
    clock_mem     DOUBLE PRECISION,
    pcie_rx       DOUBLE PRECISION,
    pcie_tx       DOUBLE PRECISION,
    PRIMARY KEY (run_id, ts, gpu)
);

CREATE TABLE worker_join_tokens (
    id         TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,
    revoked    BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE workers (
    name          TEXT PRIMARY KEY,
    token_hash    TEXT NOT NULL UNIQUE,
    offer         TEXT NOT NULL,
    registered_at TIMESTAMPTZ NOT NULL,
    last_heard_at TIMESTAMPTZ NOT NULL,
    draining      BOOLEAN NOT NULL DEFAULT FALSE
);

-- Pending runs per org, kept by a trigger in the transaction of every change of a
-- run's state. An insert locks its org's row here (SELECT … FOR UPDATE) before it
-- checks the queued limit and the idempotency key, so concurrent inserts of one org,
-- on any server, are checked one after the other.
CREATE TABLE org_pending (
    org_id  TEXT PRIMARY KEY,
    pending BIGINT NOT NULL DEFAULT 0
);

CREATE FUNCTION stoa_count_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'pending'
       AND (TG_OP = 'DELETE' OR NEW.status <> 'pending') THEN
        UPDATE org_pending SET pending = pending - 1 WHERE org_id = OLD.org_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'pending'
       AND (TG_OP = 'INSERT' OR OLD.status <> 'pending') THEN
        INSERT INTO org_pending (org_id, pending) VALUES (NEW.org_id, 1)
            ON CONFLICT (org_id) DO UPDATE SET pending = org_pending.pending + 1;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_count_pending AFTER INSERT OR DELETE OR UPDATE OF status ON runs
    FOR EACH ROW EXECUTE FUNCTION stoa_count_pending();
