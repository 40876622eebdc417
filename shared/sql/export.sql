-- Dispute export (SPEC §10). The row query runs under the tenant role, so RLS filters it as well.

-- name: export_access
-- Who may export this site: platform admin? member role? does the site exist? (service connection)
SELECT EXISTS (SELECT 1 FROM platform_admins WHERE user_id = $1) AS is_platform_admin,
       (SELECT role FROM site_members WHERE site_id = $2 AND user_id = $1) AS member_role,
       EXISTS (SELECT 1 FROM sites WHERE id = $2) AS site_exists;

-- name: export_rows
-- Served in order by ingest_idempotency_export_idx (site_id, year_month, created_at, id).
SELECT created_at, idempotency_key, idempotency_version, billing_state::text AS billing_state, billable
FROM ingest_idempotency
WHERE site_id = $1 AND year_month = $2
ORDER BY created_at, id;

-- name: export_snapshot_hash
SELECT snapshot_hash FROM invoice_snapshot WHERE site_id = $1 AND year_month = $2;

-- name: export_set_role
-- `revkernel export` without --user: read as the fleet's role, DATABASE_ROLE (for this transaction).
SELECT set_config('role', $1, true);
