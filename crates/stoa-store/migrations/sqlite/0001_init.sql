-- Stoa's first schema: orgs, API keys, runs and their output.
CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    slug        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    is_admin     INTEGER NOT NULL DEFAULT 0,
    is_active    INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL,
    last_used_at TEXT
);

CREATE TABLE runs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    org_id         TEXT NOT NULL REFERENCES orgs(id),
    status         TEXT NOT NULL,
    job_type       TEXT NOT NULL,
    execution_type TEXT NOT NULL,
    file_name      TEXT,
    spec           TEXT NOT NULL,
    timeout_s      INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    job_start      TEXT,
    job_end        TEXT,
    return_code    INTEGER,
    error          TEXT,
    timed_out      INTEGER NOT NULL DEFAULT 0,
    pending_reason TEXT,
    phases         TEXT NOT NULL DEFAULT '[]',
    worker_id      TEXT,
    pgid           INTEGER,
    run_name       TEXT,
    labels         TEXT NOT NULL DEFAULT '[]',
    metadata       TEXT NOT NULL DEFAULT '{}',
    callback_urls  TEXT NOT NULL DEFAULT '[]',
    output_truncated INTEGER NOT NULL DEFAULT 0,
    price_per_hour REAL
);
CREATE INDEX runs_org_status ON runs(org_id, status);
CREATE INDEX runs_status ON runs(status, seq);

CREATE TABLE run_output (
    run_id   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    content  TEXT NOT NULL,
    ts       TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
