-- Secrets (encrypted environment variables) and the callback outbox.
CREATE TABLE secrets (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    ciphertext  BLOB NOT NULL,
    nonce       BLOB NOT NULL,
    key_id      TEXT NOT NULL,
    is_secret   INTEGER NOT NULL DEFAULT 1,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    UNIQUE (org_id, name)
);

-- The signing secret of each org's callbacks, encrypted like the secrets.
CREATE TABLE org_callback_secrets (
    org_id      TEXT PRIMARY KEY REFERENCES orgs(id),
    ciphertext  BLOB NOT NULL,
    nonce       BLOB NOT NULL,
    key_id      TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- One row per (terminal run, callback URL), written in the transaction that ends the run.
CREATE TABLE callback_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id          TEXT NOT NULL,
    org_id          TEXT NOT NULL,
    url             TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX callback_deliveries_due ON callback_deliveries(state, next_attempt_at);
CREATE INDEX callback_deliveries_run ON callback_deliveries(run_id);
