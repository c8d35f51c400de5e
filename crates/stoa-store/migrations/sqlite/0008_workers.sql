-- Workers on other machines. A join token (made by an admin, only its hash kept) lets a
-- machine register as a worker; registration gives the worker its own token (only its
-- hash kept), which every later call of the worker names. `offer` is what the worker
-- said it offers (JSON: profiles, GPUs, host), kept so that a restarted server knows
-- its fleet before the workers call again.
CREATE TABLE worker_join_tokens (
    id         TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE workers (
    name          TEXT PRIMARY KEY,
    token_hash    TEXT NOT NULL UNIQUE,
    offer         TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    last_heard_at TEXT NOT NULL,
    draining      INTEGER NOT NULL DEFAULT 0
);
