-- Tenant security (SPEC §1.9, §7): enforced by Postgres, not only by application code.

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
-- No DDL for anyone but the owner (PostgreSQL 15 already defaults to this; an upgraded cluster may not).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO revkernel_service, revkernel_tenant;

-- The fleet: DML on operational tables, only SELECT/INSERT on the append-only ones, no DDL.
GRANT SELECT, INSERT, UPDATE, DELETE ON
    sites, site_members, platform_admins, site_plans, site_usage_monthly,
    ingest_idempotency, ingest_fallback_buffer, billing_reconciliation_jobs
    TO revkernel_service;
GRANT SELECT, INSERT ON invoice_snapshot, billing_audit_log TO revkernel_service;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO revkernel_service;
-- Partition maintenance runs with the owner's rights (it creates tables): the fleet only, never tenants.
REVOKE ALL ON FUNCTION ingest_idempotency_ensure_partitions(date, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ingest_idempotency_ensure_partitions(date, integer) TO revkernel_service;
-- Watchtower counts rows left in the safety-net partition. Month partitions get no grants: every read
-- goes through the parent table, where the grants and RLS policies are.
GRANT SELECT ON ingest_idempotency_default TO revkernel_service;

-- Tenants: SELECT only, row-filtered below. No INSERT/UPDATE/DELETE grant exists, so no billing
-- column can be written whatever the policies say.
GRANT SELECT ON
    sites, site_plans, site_usage_monthly, ingest_idempotency, invoice_snapshot,
    billing_reconciliation_jobs
    TO revkernel_tenant;

-- Membership is read with the definer's rights so policies need no grant on site_members and
-- cannot recurse through RLS.
CREATE FUNCTION tenant_can_read_site(p_site_id uuid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT EXISTS (
        SELECT 1 FROM platform_admins WHERE user_id = current_setting('app.user_id', true)
    ) OR EXISTS (
        SELECT 1 FROM site_members
        WHERE site_id = p_site_id AND user_id = current_setting('app.user_id', true)
    )
$$;
REVOKE ALL ON FUNCTION tenant_can_read_site(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_can_read_site(uuid) TO revkernel_tenant, revkernel_service;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['site_plans', 'site_usage_monthly', 'ingest_idempotency', 'invoice_snapshot',
                             'billing_reconciliation_jobs']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_read ON %I FOR SELECT TO revkernel_tenant '
                       'USING (tenant_can_read_site(site_id))', t);
        EXECUTE format('CREATE POLICY service_all ON %I TO revkernel_service USING (true) WITH CHECK (true)', t);
    END LOOP;
END
$$;

ALTER TABLE sites ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_read ON sites FOR SELECT TO revkernel_tenant USING (tenant_can_read_site(id));
CREATE POLICY service_all ON sites TO revkernel_service USING (true) WITH CHECK (true);
