-- Invoice freeze (SPEC §9). Counting and usage upsert reuse reconcile.sql (reconcile_month).

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

-- name: freeze_insert_snapshot
-- Immutable once written: an existing snapshot is kept as it is (the second freeze inserts nothing).
INSERT INTO invoice_snapshot (site_id, year_month, event_count, overage_count, snapshot_hash, commit_sha,
                              generated_by)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (site_id, year_month) DO NOTHING
RETURNING true;

-- name: freeze_lock_month
-- Freezes of one month run one at a time across the fleet (session lock; freeze_unlock_month).
SELECT pg_advisory_lock(hashtextextended('revkernel:freeze:' || $1::text, 0));

-- name: freeze_unlock_month
SELECT pg_advisory_unlock(hashtextextended('revkernel:freeze:' || $1::text, 0));
