-- Quota bookkeeping (SPEC §5). Redis `usage:{site}:{YYYY-MM}` is the fast reservation counter; these
-- rows let the gate stay exact when Redis is down without a COUNT over the month per request.

-- One advisory-lock key per (site, month). Ingest transactions hold it SHARED while their rows are
-- uncommitted (Redis mode) and EXCLUSIVE when they decide quota in Postgres (Redis down). Seeding a
-- missing Redis counter and correcting drift take it EXCLUSIVE, so they never race an uncommitted row.
CREATE FUNCTION quota_lock_key(p_site_id uuid, p_year_month text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT hashtextextended(p_site_id::text || ':' || p_year_month, 7305)
$$;

-- Exact count of billable rows per (site, month), striped so concurrent transactions of different
-- connections never wait on one row: a transaction adds its billable rows to the stripe of its own
-- backend, in the same transaction as the rows. The sum over stripes is the month's billable count
-- (stripe 0 holds the COUNT taken when the month was (re)seeded).
CREATE TABLE quota_usage_stripes (
    site_id uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    year_month year_month_text NOT NULL,
    stripe integer NOT NULL,
    used bigint NOT NULL,
    PRIMARY KEY (site_id, year_month, stripe)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON quota_usage_stripes TO revkernel_service;
GRANT EXECUTE ON FUNCTION quota_lock_key(uuid, text) TO revkernel_service;
