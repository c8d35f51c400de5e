-- A run's insert in one round trip: the org's pending count locked (inserts of one
-- org, on any server, are checked one after the other), the idempotency key looked
-- up, the queued limit checked, the run stored. (Other servers are told of new runs
-- by one notification per burst, sent after the inserts: a notification in each
-- insert's transaction made every start a quarter slower.) Returns
-- 'new', 'existing' (with the id of the run the key found) or 'over' (with the org's
-- pending count).
CREATE FUNCTION stoa_insert_run(
    p_id TEXT, p_org TEXT, p_job_type TEXT, p_execution_type TEXT, p_file_name TEXT,
    p_spec TEXT, p_timeout_s BIGINT, p_created_at TIMESTAMPTZ, p_phases JSONB,
    p_run_name TEXT, p_labels JSONB, p_metadata JSONB, p_callback_urls JSONB,
    p_price_per_hour DOUBLE PRECISION, p_pending_reason TEXT, p_priority BIGINT,
    p_idempotency_key TEXT, p_parent_id TEXT,
    -- NULL: no limit.
    p_max_queued BIGINT,
    -- Runs created before this are out of the idempotency window.
    p_window_start TIMESTAMPTZ,
    OUT outcome TEXT, OUT existing TEXT, OUT queued BIGINT
) LANGUAGE plpgsql AS $$
BEGIN
    IF p_idempotency_key IS NOT NULL OR p_max_queued IS NOT NULL THEN
        INSERT INTO org_pending (org_id, pending) VALUES (p_org, 0)
            ON CONFLICT (org_id) DO NOTHING;
        SELECT pending INTO queued FROM org_pending WHERE org_id = p_org FOR UPDATE;
        IF p_idempotency_key IS NOT NULL THEN
            SELECT id INTO existing FROM runs
                WHERE org_id = p_org AND idempotency_key = p_idempotency_key
                  AND created_at >= p_window_start
                ORDER BY seq LIMIT 1;
            IF existing IS NOT NULL THEN
                outcome := 'existing';
                RETURN;
            END IF;
        END IF;
        IF p_max_queued IS NOT NULL AND queued + 1 > p_max_queued THEN
            outcome := 'over';
            RETURN;
        END IF;
    END IF;
    INSERT INTO runs (id, org_id, status, job_type, execution_type, file_name, spec,
        timeout_s, created_at, phases, run_name, labels, metadata, callback_urls,
        price_per_hour, pending_reason, priority, idempotency_key, parent_id)
    VALUES (p_id, p_org, 'pending', p_job_type, p_execution_type, p_file_name, p_spec,
        p_timeout_s, p_created_at, p_phases, p_run_name, p_labels, p_metadata,
        p_callback_urls, p_price_per_hour, p_pending_reason, p_priority,
        p_idempotency_key, p_parent_id);
    outcome := 'new';
END
$$;
