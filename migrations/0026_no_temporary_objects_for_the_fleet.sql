-- SPEC §7: the fleet's and the tenants' roles run no DDL. A new database grants TEMPORARY to PUBLIC, so
-- both could still create temporary tables and functions (found by audit); `revkernel migrate` now
-- revokes it on every run (shared/migrate.py: a database's own privileges are not copied by CREATE
-- DATABASE ... TEMPLATE nor restored by a plain pg_dump, so a one-off migration would not hold).
-- And a temporary table named like a coming month's partition made
-- ingest_idempotency_ensure_partitions (SECURITY DEFINER, search_path public, pg_temp) take it for the
-- partition and skip that month, whose rows then went to the DEFAULT partition: it now looks its
-- partitions up in `public` only (the body of 0003 with that one line changed; applied migrations are
-- never edited).
CREATE OR REPLACE FUNCTION ingest_idempotency_ensure_partitions(
    p_from date DEFAULT date_trunc('month', now() AT TIME ZONE 'UTC')::date,
    p_months integer DEFAULT 3
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    month_start date := date_trunc('month', p_from)::date;
    lo timestamptz;
    hi timestamptz;
    part text;
    created integer := 0;
    cols text;
BEGIN
    IF p_months < 1 OR p_months > 120 THEN
        RAISE EXCEPTION 'p_months must be between 1 and 120, got %', p_months;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('ingest_idempotency_ensure_partitions'));
    FOR i IN 0 .. p_months - 1 LOOP
        lo := (month_start + make_interval(months => i))::timestamp AT TIME ZONE 'UTC';
        hi := (month_start + make_interval(months => i + 1))::timestamp AT TIME ZONE 'UTC';
        part := format('ingest_idempotency_p%s', to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM'));
        CONTINUE WHEN to_regclass(format('public.%I', part)) IS NOT NULL;  -- never a pg_temp table
        IF EXISTS (SELECT 1 FROM ingest_idempotency_default WHERE bucket_at >= lo AND bucket_at < hi) THEN
            -- Every stored column, read from the catalog so a column added later moves with the row
            -- (generated ones are recomputed; `id` is copied: the new table has no identity yet).
            SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
            FROM pg_attribute
            WHERE attrelid = 'ingest_idempotency'::regclass AND attnum > 0 AND NOT attisdropped
              AND attgenerated = '';
            EXECUTE format('CREATE TABLE %I (LIKE ingest_idempotency INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED)', part);
            EXECUTE format(
                'WITH moved AS (DELETE FROM ingest_idempotency_default WHERE bucket_at >= $1 AND bucket_at < $2 RETURNING %s) '
                || 'INSERT INTO %I (%s) SELECT %s FROM moved', cols, part, cols, cols)
                USING lo, hi;
            EXECUTE format('ALTER TABLE ingest_idempotency ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        ELSE
            EXECUTE format('CREATE TABLE %I PARTITION OF ingest_idempotency FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        END IF;
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;
