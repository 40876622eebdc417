-- Re-seeding a Redis counter (after Redis lost it, or after a month was decided in Postgres) no longer
-- COUNTs the month under the EXCLUSIVE lock once the stripes are seeded: the stripes are maintained in
-- the same transactions as the rows, so under the lock their sum is the exact billable count. Only the
-- first seeding of a month (no stripe 0 yet) counts the rows.
CREATE OR REPLACE FUNCTION quota_reseed(p_site_id uuid, p_year_month text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    billable_rows bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(quota_lock_key(p_site_id, p_year_month));
    IF EXISTS (SELECT 1 FROM quota_usage_stripes q
               WHERE q.site_id = p_site_id AND q.year_month = p_year_month AND q.stripe = 0) THEN
        SELECT coalesce(sum(q.used), 0) INTO billable_rows
        FROM quota_usage_stripes q WHERE q.site_id = p_site_id AND q.year_month = p_year_month;
    ELSE
        billable_rows := quota_reset_stripes(p_site_id, p_year_month);
    END IF;
    DELETE FROM quota_pg_mode m WHERE m.site_id = p_site_id AND m.year_month = p_year_month;
    RETURN billable_rows;
END
$$;
