-- Retention of ingest_idempotency (SPEC §7): rows live at least 90 days (expires_at); whole expired
-- partitions are dropped, partly expired ones trimmed in batches; the current and previous UTC month are
-- never touched. The fleet's role has no DDL, so dropping runs in SECURITY DEFINER functions that check
-- every guard themselves (whatever the caller asks, they never remove an unexpired row or a row of a
-- partition of the current or previous month). See docs/freeze-and-export.md "Retention".

-- expires_at follows insertion order within a partition, so a BRIN index answers "any unexpired row
-- here?" and "which blocks hold expired rows?" by reading a few summary pages instead of the partition.
-- It costs the ingest path next to nothing (no per-row index entry); autosummarize keeps new ranges
-- summarized.
CREATE INDEX ingest_idempotency_expires_brin ON ingest_idempotency USING brin (expires_at)
    WITH (autosummarize = on);

-- The month of a partition named ingest_idempotency_pYYYY_MM (the only names ensure_partitions makes),
-- or NULL for any other name.
CREATE FUNCTION ingest_idempotency_partition_month(p_partition text) RETURNS date
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT make_date(m[1]::int, m[2]::int, 1)
    FROM regexp_match(p_partition, '^ingest_idempotency_p([0-9]{4})_(0[1-9]|1[0-2])$') AS m
$$;

-- First day of the previous UTC month: partitions of this month and later are never touched.
CREATE FUNCTION ingest_idempotency_retention_floor() RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 month')::date
$$;

-- The attached partition `p_partition` of ingest_idempotency, or an exception.
CREATE FUNCTION ingest_idempotency_child(p_partition text) RETURNS regclass
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(format('public.%I', p_partition));
BEGIN
    IF rel IS NULL OR NOT EXISTS (
        SELECT 1 FROM pg_inherits WHERE inhrelid = rel AND inhparent = 'public.ingest_idempotency'::regclass
    ) THEN
        RAISE EXCEPTION 'not a partition of ingest_idempotency: %', p_partition
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN rel;
END
$$;

-- Drop month partition `p_partition` when every row in it has expired. Returns what happened:
-- 'dropped', 'protected' (its month is the previous month or later), 'unexpired_rows' (some row still
-- lives; trim instead), 'busy' (a lock could not be had within lock_timeout: try again later).
-- Dropping a partition takes an ACCESS EXCLUSIVE lock on the parent table; the short lock_timeout makes
-- it give up instead of queueing the ingest path behind a long reader.
CREATE FUNCTION ingest_idempotency_drop_expired_partition(p_partition text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET lock_timeout = '2s' AS $$
DECLARE
    part_month date := ingest_idempotency_partition_month(p_partition);
    rel regclass;
    has_live boolean;
BEGIN
    IF part_month IS NULL THEN
        RAISE EXCEPTION 'not a monthly partition name: %', p_partition USING ERRCODE = 'invalid_parameter_value';
    END IF;
    rel := ingest_idempotency_child(p_partition);
    IF part_month >= ingest_idempotency_retention_floor() THEN
        RETURN 'protected';
    END IF;
    BEGIN
        -- SHARE blocks writers of this partition (not of the others) from here to the drop, so no
        -- unexpired row can arrive between the check and the DROP.
        EXECUTE format('LOCK TABLE %s IN SHARE MODE', rel);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE expires_at >= now())', rel) INTO has_live;
        IF has_live THEN
            RETURN 'unexpired_rows';
        END IF;
        EXECUTE format('DROP TABLE %s', rel);
        RETURN 'dropped';
    EXCEPTION WHEN lock_not_available THEN
        RETURN 'busy';
    END;
END
$$;

-- Delete up to p_batch expired rows of `p_partition` (a month partition older than the previous month,
-- or the DEFAULT partition, where only rows bucketed before the previous month qualify); returns how
-- many. One batch per call, so the caller commits between batches.
CREATE FUNCTION ingest_idempotency_trim_expired(p_partition text, p_batch integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET lock_timeout = '2s' AS $$
DECLARE
    part_month date := ingest_idempotency_partition_month(p_partition);
    floor_at timestamptz := ingest_idempotency_retention_floor()::timestamp AT TIME ZONE 'UTC';
    rel regclass;
    deleted bigint;
BEGIN
    IF p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'p_batch must be between 1 and 100000, got %', p_batch;
    END IF;
    rel := ingest_idempotency_child(p_partition);
    IF p_partition = 'ingest_idempotency_default' THEN
        EXECUTE format(
            'DELETE FROM %s WHERE ctid = ANY (ARRAY (SELECT ctid FROM %s '
            || 'WHERE expires_at < now() AND bucket_at < $1 LIMIT $2))', rel, rel)
            USING floor_at, p_batch;
    ELSIF part_month IS NULL THEN
        RAISE EXCEPTION 'not a monthly partition name: %', p_partition USING ERRCODE = 'invalid_parameter_value';
    ELSIF part_month >= ingest_idempotency_retention_floor() THEN
        RETURN 0;
    ELSE
        EXECUTE format(
            'DELETE FROM %s WHERE ctid = ANY (ARRAY (SELECT ctid FROM %s WHERE expires_at < now() LIMIT $1))',
            rel, rel)
            USING p_batch;
    END IF;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

REVOKE ALL ON FUNCTION ingest_idempotency_partition_month(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ingest_idempotency_retention_floor() FROM PUBLIC;
REVOKE ALL ON FUNCTION ingest_idempotency_child(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ingest_idempotency_drop_expired_partition(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ingest_idempotency_trim_expired(text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ingest_idempotency_partition_month(text) TO revkernel_service;
GRANT EXECUTE ON FUNCTION ingest_idempotency_retention_floor() TO revkernel_service;
GRANT EXECUTE ON FUNCTION ingest_idempotency_drop_expired_partition(text) TO revkernel_service;
GRANT EXECUTE ON FUNCTION ingest_idempotency_trim_expired(text, integer) TO revkernel_service;
