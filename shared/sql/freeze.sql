-- Invoice freeze (SPEC §9), set-based: a chunk of sites per statement (bench/export_bench.py: 10,000
-- sites one by one through reconcile_month took 32 s on 2 cores, longer than COMMAND_TIMEOUT_S).

-- name: freeze_sites_with_rows
-- Sites with at least one row in month $1: one index probe per site on ingest_idempotency_export_idx
-- (site_id, year_month, created_at, id). LATERAL ... LIMIT 1 keeps the plan a per-site probe; a plain
-- EXISTS may be planned as a semi-join over the whole month.
SELECT s.id
FROM sites s
CROSS JOIN LATERAL (
    SELECT 1 FROM ingest_idempotency i WHERE i.site_id = s.id AND i.year_month = $1 LIMIT 1
) AS hit
ORDER BY s.id;

-- name: freeze_unfrozen_site_count
-- Sites with rows in month $1 and no snapshot of it yet (the start-up / schedule check).
SELECT count(*)
FROM sites s
CROSS JOIN LATERAL (
    SELECT 1 FROM ingest_idempotency i WHERE i.site_id = s.id AND i.year_month = $1 LIMIT 1
) AS hit
WHERE NOT EXISTS (SELECT 1 FROM invoice_snapshot n WHERE n.site_id = s.id AND n.year_month = $1);

-- name: freeze_lock_sites
-- Wait for the ingest transactions of sites $1 in month $2 that are still in flight, and keep new ones
-- out until this chunk commits: the (site, month) quota locks EXCLUSIVE, which ingest holds SHARED
-- until its rows commit. A freeze right after midnight would otherwise count without a row that
-- commits a moment later. Key order, as ingest and quota_usage_exclusive take them: no deadlock.
SELECT count(pg_advisory_xact_lock(x.k))
FROM (SELECT DISTINCT quota_lock_key(t.site_id, $2::text) AS k FROM unnest($1::uuid[]) AS t (site_id) ORDER BY 1) AS x;

-- name: freeze_reconcile_sites
-- Reconcile the sites $1 for month $2 from the source of truth: count billable rows and billable
-- OVERAGE rows (the rule of reconcile_count_month, which the freeze tests hold it equal to), store the
-- counts in site_usage_monthly, and return them. One index-only probe per site on
-- ingest_idempotency_billable_idx.
WITH counts AS (
    SELECT t.site_id, c.event_count, c.overage_count
    FROM unnest($1::uuid[]) AS t (site_id)
    CROSS JOIN LATERAL (
        SELECT count(*) AS event_count,
               count(*) FILTER (WHERE i.billing_state = 'OVERAGE' OR i.billing_reason = 'overage') AS overage_count
        FROM ingest_idempotency i
        WHERE i.site_id = t.site_id AND i.year_month = $2 AND i.billable
    ) AS c
), usage AS (
    INSERT INTO site_usage_monthly (site_id, year_month, event_count, overage_count, last_synced_at)
    SELECT site_id, $2, event_count, overage_count, now() FROM counts
    ON CONFLICT (site_id, year_month) DO UPDATE SET
        event_count = EXCLUDED.event_count,
        overage_count = EXCLUDED.overage_count,
        last_synced_at = EXCLUDED.last_synced_at
)
SELECT site_id, event_count, overage_count FROM counts ORDER BY site_id;

-- name: freeze_insert_snapshots
-- Immutable once written: an existing snapshot is kept as it is (the second freeze inserts nothing).
-- Returns the sites whose snapshot this statement inserted.
INSERT INTO invoice_snapshot (site_id, year_month, event_count, overage_count, snapshot_hash, commit_sha,
                              generated_by)
SELECT t.site_id, $2, t.event_count, t.overage_count, t.snapshot_hash, $6, $7
FROM unnest($1::uuid[], $3::bigint[], $4::bigint[], $5::text[])
    AS t (site_id, event_count, overage_count, snapshot_hash)
ON CONFLICT (site_id, year_month) DO NOTHING
RETURNING site_id;

-- name: freeze_lock_month
-- Freezes of one month run one at a time across the fleet (session lock; freeze_unlock_month).
SELECT pg_advisory_lock(hashtextextended('revkernel:freeze:' || $1::text, 0));

-- name: freeze_unlock_month
SELECT pg_advisory_unlock(hashtextextended('revkernel:freeze:' || $1::text, 0));
