-- Retention never removes a billable row that no invoice snapshot has counted yet (SPEC §1.1, §9).
--
-- The invoice of a (site, month) is its snapshot, else the live COUNT of its billable rows. 0020's
-- functions dropped or trimmed expired rows whatever their month's freeze state, so a month left
-- unfrozen until its rows passed 90 days (a freezer down over a month's end, rows imported into an old
-- month) lost its rows: retention dropped the partition before the start-up freeze counted it (no
-- invoice at all), or between the freeze's site list and its count (an immutable zero invoice).
-- Now a partition holding a billable row of a (site, month) without a snapshot is not dropped
-- ('unfrozen_rows'; shared/retention.py leaves it whole rather than deleting its other rows one by
-- one), and trimming a partly expired partition deletes only rows that are not billable or whose
-- (site, month) is frozen. Once the freezer has frozen the month, the next run drops it.

-- True when partition `rel` holds a billable row of a (site, month) with no invoice snapshot. Rows are
-- partitioned by bucket_at but billed by created_at's month, and rows written by SQL (an import) may
-- put the two far apart, so the check takes the (site, month) pairs the partition really holds: a
-- loose scan of its billable index, one descent per distinct pair, never a scan of the month.
CREATE FUNCTION ingest_idempotency_has_unfrozen_rows(rel regclass) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
DECLARE
    found_one boolean;
BEGIN
    EXECUTE format(
        'WITH RECURSIVE pairs (site_id, year_month) AS ('
        || '  (SELECT i.site_id, i.year_month FROM %1$s i WHERE i.billable'
        || '   ORDER BY i.site_id, i.year_month LIMIT 1)'
        || '  UNION ALL'
        || '  SELECT n.site_id, n.year_month FROM pairs p CROSS JOIN LATERAL ('
        || '    SELECT i.site_id, i.year_month FROM %1$s i'
        || '    WHERE i.billable AND (i.site_id, i.year_month) > (p.site_id, p.year_month)'
        || '    ORDER BY i.site_id, i.year_month LIMIT 1) AS n'
        || ') SELECT EXISTS (SELECT 1 FROM pairs WHERE NOT EXISTS ('
        || '  SELECT 1 FROM invoice_snapshot s WHERE s.site_id = pairs.site_id AND s.year_month = pairs.year_month))',
        rel)
        INTO found_one;
    RETURN found_one;
END
$$;

-- As 0020, plus: 'unfrozen_rows' when a billable row of the partition is not in any snapshot yet.
CREATE OR REPLACE FUNCTION ingest_idempotency_drop_expired_partition(p_partition text) RETURNS text
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
        -- unexpired or unfrozen row can arrive between the checks and the DROP. A snapshot committed
        -- meanwhile only makes a row removable.
        EXECUTE format('LOCK TABLE %s IN SHARE MODE', rel);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE expires_at >= now())', rel) INTO has_live;
        IF has_live THEN
            RETURN 'unexpired_rows';
        END IF;
        IF ingest_idempotency_has_unfrozen_rows(rel) THEN
            RETURN 'unfrozen_rows';
        END IF;
        EXECUTE format('DROP TABLE %s', rel);
        RETURN 'dropped';
    EXCEPTION WHEN lock_not_available THEN
        RETURN 'busy';
    END;
END
$$;

-- As 0020, but a billable row is deleted only once its (site, month) has a snapshot.
CREATE OR REPLACE FUNCTION ingest_idempotency_trim_expired(p_partition text, p_batch integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET lock_timeout = '2s' AS $$
DECLARE
    part_month date := ingest_idempotency_partition_month(p_partition);
    floor_at timestamptz := ingest_idempotency_retention_floor()::timestamp AT TIME ZONE 'UTC';
    rel regclass;
    deleted bigint;
    frozen_or_free constant text :=
        '(NOT i.billable OR EXISTS (SELECT 1 FROM invoice_snapshot n '
        || 'WHERE n.site_id = i.site_id AND n.year_month = i.year_month))';
BEGIN
    IF p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'p_batch must be between 1 and 100000, got %', p_batch;
    END IF;
    rel := ingest_idempotency_child(p_partition);
    IF p_partition = 'ingest_idempotency_default' THEN
        EXECUTE format(
            'DELETE FROM %s WHERE ctid = ANY (ARRAY (SELECT i.ctid FROM %s i '
            || 'WHERE i.expires_at < now() AND i.bucket_at < $1 AND %s LIMIT $2))', rel, rel, frozen_or_free)
            USING floor_at, p_batch;
    ELSIF part_month IS NULL THEN
        RAISE EXCEPTION 'not a monthly partition name: %', p_partition USING ERRCODE = 'invalid_parameter_value';
    ELSIF part_month >= ingest_idempotency_retention_floor() THEN
        RETURN 0;
    ELSE
        EXECUTE format(
            'DELETE FROM %s WHERE ctid = ANY (ARRAY (SELECT i.ctid FROM %s i '
            || 'WHERE i.expires_at < now() AND %s LIMIT $1))', rel, rel, frozen_or_free)
            USING p_batch;
    END IF;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

REVOKE ALL ON FUNCTION ingest_idempotency_has_unfrozen_rows(regclass) FROM PUBLIC;
