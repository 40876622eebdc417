-- The capture transaction of the gate (SPEC §3 gates 4-6), one function per round trip.
-- See docs/architecture.md "Quota" for the locking protocol these functions implement.

-- Marks a (site, month) whose quota was decided in Postgres while Redis was unreachable: the Redis
-- counter misses those events until it is re-seeded, so Redis-mode transactions must not trust it.
CREATE TABLE quota_pg_mode (
    site_id uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    year_month year_month_text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, year_month)
);

-- Gate 4: insert the idempotency rows of a group of events; return the ones that were new.
-- p_lock_mode 'shared' (Redis decides quota): take the (site, month) locks SHARED first; when a month
-- is marked in quota_pg_mode return only those marks (the caller rolls back and re-seeds Redis).
-- p_lock_mode 'held': the caller already holds the locks EXCLUSIVE (Postgres decides quota).
-- Billable new rows are added to this backend's stripe of quota_usage_stripes in the same transaction.
CREATE FUNCTION ingest_capture_rows(
    p_lock_mode text,
    p_site_ids uuid[],
    p_keys text[],
    p_versions smallint[],
    p_buckets timestamptz[],
    p_created timestamptz[],
    p_billable boolean[],
    p_reasons text[],
    p_categories text[],
    p_actions text[],
    p_labels text[]
) RETURNS TABLE (site_id uuid, idempotency_key text, pg_mode_year_month text)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_lock_mode = 'shared' THEN
        PERFORM pg_advisory_xact_lock_shared(x.k)
        FROM (
            SELECT DISTINCT quota_lock_key(t.s, utc_year_month(t.c)) AS k
            FROM unnest(p_site_ids, p_created, p_billable) AS t (s, c, b)
            WHERE t.b
            ORDER BY 1
        ) AS x;
        RETURN QUERY
            SELECT m.site_id, NULL::text, m.year_month::text
            FROM quota_pg_mode m
            JOIN (SELECT DISTINCT t.s, utc_year_month(t.c) AS ym
                  FROM unnest(p_site_ids, p_created, p_billable) AS t (s, c, b) WHERE t.b) AS x
              ON m.site_id = x.s AND m.year_month = x.ym;
        IF FOUND THEN
            RETURN;
        END IF;
    ELSIF p_lock_mode <> 'held' THEN
        RAISE EXCEPTION 'p_lock_mode must be shared or held, got %', p_lock_mode;
    END IF;

    RETURN QUERY
    WITH inserted AS (
        INSERT INTO ingest_idempotency AS i (
            site_id, idempotency_key, idempotency_version, bucket_at, created_at, expires_at,
            billable, billing_reason, event_category, event_action, event_label)
        SELECT t.s, t.k, t.v, t.b, t.c, t.c + interval '2160 hours', t.bl, t.r, t.ec, t.ea, t.el
        FROM unnest(p_site_ids, p_keys, p_versions, p_buckets, p_created, p_billable, p_reasons,
                    p_categories, p_actions, p_labels)
             AS t (s, k, v, b, c, bl, r, ec, ea, el)
        ON CONFLICT DO NOTHING
        RETURNING i.site_id, i.idempotency_key, i.billable, i.year_month
    ), counted AS (
        INSERT INTO quota_usage_stripes AS q (site_id, year_month, stripe, used)
        SELECT ins.site_id, ins.year_month, pg_backend_pid(), count(*)
        FROM inserted ins WHERE ins.billable
        GROUP BY ins.site_id, ins.year_month
        ON CONFLICT ON CONSTRAINT quota_usage_stripes_pkey DO UPDATE SET used = q.used + EXCLUDED.used
    )
    SELECT ins.site_id, ins.idempotency_key, NULL::text FROM inserted ins;
END
$$;

-- Redis unreachable: lock the (site, month) pairs EXCLUSIVE, mark them, return their exact usage.
-- A month whose stripes were never seeded (no stripe 0) is seeded from COUNT first, once.
CREATE FUNCTION quota_usage_exclusive(p_site_ids uuid[], p_year_months text[])
RETURNS TABLE (site_id uuid, year_month text, used bigint)
LANGUAGE plpgsql AS $$
DECLARE
    pair record;
BEGIN
    FOR pair IN
        SELECT DISTINCT t.s, t.ym, quota_lock_key(t.s, t.ym) AS k
        FROM unnest(p_site_ids, p_year_months) AS t (s, ym) ORDER BY 3
    LOOP
        PERFORM pg_advisory_xact_lock(pair.k);
        IF NOT EXISTS (SELECT 1 FROM quota_usage_stripes q
                       WHERE q.site_id = pair.s AND q.year_month = pair.ym AND q.stripe = 0) THEN
            PERFORM quota_reset_stripes(pair.s, pair.ym);
        END IF;
        INSERT INTO quota_pg_mode (site_id, year_month) VALUES (pair.s, pair.ym) ON CONFLICT DO NOTHING;
        site_id := pair.s;
        year_month := pair.ym;
        SELECT coalesce(sum(q.used), 0) INTO used
        FROM quota_usage_stripes q WHERE q.site_id = pair.s AND q.year_month = pair.ym;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Exact billable count of a month into stripe 0 (others removed). Caller holds the EXCLUSIVE lock.
CREATE FUNCTION quota_reset_stripes(p_site_id uuid, p_year_month text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    billable_rows bigint;
BEGIN
    SELECT count(*) INTO billable_rows FROM ingest_idempotency i
    WHERE i.site_id = p_site_id AND i.year_month = p_year_month AND i.billable;
    DELETE FROM quota_usage_stripes q WHERE q.site_id = p_site_id AND q.year_month = p_year_month;
    INSERT INTO quota_usage_stripes (site_id, year_month, stripe, used)
    VALUES (p_site_id, p_year_month, 0, billable_rows);
    RETURN billable_rows;
END
$$;

-- Seeding the Redis counter (SPEC §5: exactly, once, under a per-site guard): in a transaction that
-- the caller commits only after it has written the returned count to Redis. The EXCLUSIVE lock waits
-- for every uncommitted ingest row of the month, so the count misses no reservation.
CREATE FUNCTION quota_reseed(p_site_id uuid, p_year_month text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    billable_rows bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(quota_lock_key(p_site_id, p_year_month));
    billable_rows := quota_reset_stripes(p_site_id, p_year_month);
    DELETE FROM quota_pg_mode m WHERE m.site_id = p_site_id AND m.year_month = p_year_month;
    RETURN billable_rows;
END
$$;

-- Gate 5 outcome: rows the quota rejected (billable = false) or took as OVERAGE.
CREATE FUNCTION ingest_settle_rows(
    p_site_ids uuid[], p_keys text[], p_buckets timestamptz[], p_states billing_state[],
    p_billable boolean[], p_reasons text[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    WITH changed AS (
        UPDATE ingest_idempotency i
        SET billing_state = t.st, billable = t.bl, billing_reason = t.r
        FROM unnest(p_site_ids, p_keys, p_buckets, p_states, p_billable, p_reasons) AS t (s, k, b, st, bl, r)
        WHERE i.site_id = t.s AND i.idempotency_key = t.k AND i.bucket_at = t.b
          AND i.billable AND NOT t.bl
        RETURNING i.site_id, i.year_month
    )
    UPDATE quota_usage_stripes q SET used = q.used - c.n
    FROM (SELECT ch.site_id, ch.year_month, count(*) AS n FROM changed ch GROUP BY 1, 2) AS c
    WHERE q.site_id = c.site_id AND q.year_month = c.year_month AND q.stripe = pg_backend_pid();

    UPDATE ingest_idempotency i
    SET billing_state = t.st, billing_reason = t.r
    FROM unnest(p_site_ids, p_keys, p_buckets, p_states, p_billable, p_reasons) AS t (s, k, b, st, bl, r)
    WHERE i.site_id = t.s AND i.idempotency_key = t.k AND i.bucket_at = t.b AND t.bl;
END
$$;

-- Gate 6 fallback: the broker did not confirm; keep each event's payload and mark its row.
CREATE FUNCTION ingest_buffer_rows(
    p_site_ids uuid[], p_keys text[], p_buckets timestamptz[], p_payloads jsonb[], p_routing_keys text[],
    p_error text
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ingest_fallback_buffer (site_id, idempotency_key, bucket_at, payload, routing_key, error_reason)
    SELECT t.s, t.k, t.b, t.p, t.rk, p_error
    FROM unnest(p_site_ids, p_keys, p_buckets, p_payloads, p_routing_keys) AS t (s, k, b, p, rk);

    UPDATE ingest_idempotency i SET billing_state = 'DEGRADED_CAPTURE'
    FROM unnest(p_site_ids, p_keys, p_buckets) AS t (s, k, b)
    WHERE i.site_id = t.s AND i.idempotency_key = t.k AND i.bucket_at = t.b;
END
$$;

-- Neither the broker nor the buffer took the events: remove their rows (SPEC §1.5), so a retry is
-- processed afresh; billable ones are taken off this backend's stripe.
CREATE FUNCTION ingest_discard_rows(p_site_ids uuid[], p_keys text[], p_buckets timestamptz[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    WITH removed AS (
        DELETE FROM ingest_idempotency i
        USING unnest(p_site_ids, p_keys, p_buckets) AS t (s, k, b)
        WHERE i.site_id = t.s AND i.idempotency_key = t.k AND i.bucket_at = t.b
        RETURNING i.site_id, i.year_month, i.billable
    )
    UPDATE quota_usage_stripes q SET used = q.used - c.n
    FROM (SELECT r.site_id, r.year_month, count(*) AS n FROM removed r WHERE r.billable GROUP BY 1, 2) AS c
    WHERE q.site_id = c.site_id AND q.year_month = c.year_month AND q.stripe = pg_backend_pid();
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON quota_pg_mode TO revkernel_service;
GRANT EXECUTE ON FUNCTION
    ingest_capture_rows(text, uuid[], text[], smallint[], timestamptz[], timestamptz[], boolean[], text[], text[], text[], text[]),
    quota_usage_exclusive(uuid[], text[]),
    quota_reset_stripes(uuid, text),
    quota_reseed(uuid, text),
    ingest_settle_rows(uuid[], text[], timestamptz[], billing_state[], boolean[], text[]),
    ingest_buffer_rows(uuid[], text[], timestamptz[], jsonb[], text[], text),
    ingest_discard_rows(uuid[], text[], timestamptz[])
    TO revkernel_service;
