-- Pending runs per org, kept by triggers in the same transaction as every change of a
-- run's state, so that the org's queued limit is checked in constant time inside the
-- insert's transaction (counting the org's pending runs there made each start slower
-- the longer its queue).
CREATE TABLE org_pending (
    org_id TEXT PRIMARY KEY,
    pending INTEGER NOT NULL DEFAULT 0
);

INSERT INTO org_pending (org_id, pending)
    SELECT org_id, COUNT(*) FROM runs WHERE status = 'pending' GROUP BY org_id;

CREATE TRIGGER runs_pending_insert AFTER INSERT ON runs WHEN NEW.status = 'pending'
BEGIN
    INSERT INTO org_pending (org_id, pending) VALUES (NEW.org_id, 1)
        ON CONFLICT (org_id) DO UPDATE SET pending = pending + 1;
END;

CREATE TRIGGER runs_pending_leave AFTER UPDATE OF status ON runs
    WHEN OLD.status = 'pending' AND NEW.status != 'pending'
BEGIN
    UPDATE org_pending SET pending = pending - 1 WHERE org_id = OLD.org_id;
END;

CREATE TRIGGER runs_pending_enter AFTER UPDATE OF status ON runs
    WHEN OLD.status != 'pending' AND NEW.status = 'pending'
BEGIN
    INSERT INTO org_pending (org_id, pending) VALUES (NEW.org_id, 1)
        ON CONFLICT (org_id) DO UPDATE SET pending = pending + 1;
END;

CREATE TRIGGER runs_pending_delete AFTER DELETE ON runs WHEN OLD.status = 'pending'
BEGIN
    UPDATE org_pending SET pending = pending - 1 WHERE org_id = OLD.org_id;
END;
