-- Row-level security of ingest_idempotency, decided once per query instead of once per row.
--
-- The dispute export (SPEC §10) reads up to millions of rows of one site under the tenant role. The
-- policy of 0004 calls tenant_can_read_site(site_id) for every row (two index probes each), which more
-- than doubled the export's time in bench/export_bench.py. The rule is unchanged - a platform admin
-- reads every row, a member the rows of its sites - but both parts are now uncorrelated scalar
-- subqueries, which Postgres evaluates once per query (InitPlan), leaving `site_id = ANY (array)` per
-- row. The other tenant tables keep 0004's policy (a few rows per site, no difference).

CREATE FUNCTION tenant_is_platform_admin() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM platform_admins WHERE user_id = current_setting('app.user_id', true))
$$;

-- The sites the current user (app.user_id) is a member of, in any role; empty when unset.
CREATE FUNCTION tenant_member_site_ids() RETURNS uuid[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce(array_agg(site_id), '{}'::uuid[])
    FROM site_members
    WHERE user_id = current_setting('app.user_id', true)
$$;

REVOKE ALL ON FUNCTION tenant_is_platform_admin() FROM PUBLIC;
REVOKE ALL ON FUNCTION tenant_member_site_ids() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_is_platform_admin() TO revkernel_tenant, revkernel_service;
GRANT EXECUTE ON FUNCTION tenant_member_site_ids() TO revkernel_tenant, revkernel_service;

DROP POLICY tenant_read ON ingest_idempotency;
CREATE POLICY tenant_read ON ingest_idempotency FOR SELECT TO revkernel_tenant
    USING ((SELECT tenant_is_platform_admin()) OR site_id = ANY ((SELECT tenant_member_site_ids())::uuid[]));
