-- The billing source of truth: one row per captured event (SPEC §1.1, §4, §7).
--
-- Partitioning keeps deduplication exact. A unique constraint of a partitioned table must contain
-- the partition key, so the key is `bucket_at`: the time component `t` of the idempotency key's own
-- material (SPEC §4), not the arrival time. Two inserts of one key carry the same `t` (it is hashed into
-- the key), so they always route to the same partition and conflict on (site_id, idempotency_key,
-- bucket_at), whatever wall-clock instants they arrive at - also when a v2 key takes its time from the
-- client clock and the retry arrives in the next month. `year_month` stays the UTC month of
-- `created_at` (the billing month); bucket_at differs from created_at by less than the bucket width
-- (or the ±5 min v2 client-clock window), so both months agree except within minutes of a month edge.
CREATE TABLE ingest_idempotency (
    id bigint GENERATED ALWAYS AS IDENTITY,
    site_id uuid NOT NULL REFERENCES sites (id),
    idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    idempotency_version smallint NOT NULL DEFAULT 1 CHECK (idempotency_version IN (1, 2)),
    bucket_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,  -- created_at + 90 days unless given (trigger below)
    billing_state billing_state NOT NULL DEFAULT 'ACCEPTED',
    billable boolean NOT NULL DEFAULT true,
    billing_reason text,
    event_category text,
    event_action text,
    event_label text,
    year_month text NOT NULL GENERATED ALWAYS AS (utc_year_month(created_at)) STORED
        CHECK (year_month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    -- Rows live at least 90 days (2160 h: the same span in every time zone).
    CHECK (expires_at >= created_at + interval '2160 hours'),
    PRIMARY KEY (site_id, idempotency_key, bucket_at)
) PARTITION BY RANGE (bucket_at);

-- expires_at = created_at + 90 days, computed by the server (SPEC §4). A column DEFAULT cannot refer to
-- created_at, and `now() + 90 days` would reject a row whose created_at is ahead of the database clock.
CREATE FUNCTION ingest_idempotency_set_expiry() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.expires_at IS NULL THEN
        NEW.expires_at := NEW.created_at + interval '2160 hours';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER ingest_idempotency_expiry BEFORE INSERT ON ingest_idempotency
    FOR EACH ROW EXECUTE FUNCTION ingest_idempotency_set_expiry();

COMMENT ON COLUMN ingest_idempotency.bucket_at IS
    'Time component t of the idempotency key material (SPEC §4); the partition key, so one key always lands in one partition.';

-- Invoice counts: COUNT(*) WHERE billable, by site and month (and by state for OVERAGE).
CREATE INDEX ingest_idempotency_billable_idx
    ON ingest_idempotency (site_id, year_month, billing_state) WHERE billable;
-- Dispute export order, and the cheap "site active in this month / last 24 h" probes.
CREATE INDEX ingest_idempotency_export_idx
    ON ingest_idempotency (site_id, year_month, created_at, id);

-- Safety net only: rows here are a watchtower check, and ensure_partitions moves them out.
CREATE TABLE ingest_idempotency_default PARTITION OF ingest_idempotency DEFAULT;

-- Month partitions [p_from, p_from + p_months); moves matching rows out of the DEFAULT partition first.
CREATE FUNCTION ingest_idempotency_ensure_partitions(
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
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
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

SELECT ingest_idempotency_ensure_partitions();

-- Payloads of events the broker did not confirm (SPEC §6); the reconciler republishes them.
CREATE TABLE ingest_fallback_buffer (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    site_id uuid NOT NULL REFERENCES sites (id),
    idempotency_key text NOT NULL,
    bucket_at timestamptz NOT NULL,
    payload jsonb NOT NULL,
    routing_key text NOT NULL,
    error_reason text NOT NULL,
    status text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'PROCESSING', 'RECOVERED', 'FAILED')),
    attempt_count integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_at timestamptz,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ingest_fallback_buffer_claim_idx ON ingest_fallback_buffer (status, next_attempt_at)
    WHERE status IN ('PENDING', 'PROCESSING');
CREATE INDEX ingest_fallback_buffer_recovered_idx ON ingest_fallback_buffer (updated_at)
    WHERE status = 'RECOVERED';
CREATE TRIGGER ingest_fallback_buffer_updated_at BEFORE UPDATE ON ingest_fallback_buffer
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
