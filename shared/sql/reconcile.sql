-- Reconciliation (SPEC §8) and fallback recovery (SPEC §6). See docs/reconciler.md.

-- name: reconcile_count_month
-- Invoice count of a (site, month): billable rows, and those of them taken as overage (state OVERAGE,
-- or billing_reason 'overage' for overage events captured degraded: DEGRADED_CAPTURE / RECOVERED).
SELECT count(*) AS event_count,
       count(*) FILTER (WHERE i.billing_state = 'OVERAGE' OR i.billing_reason = 'overage') AS overage_count
FROM ingest_idempotency i
WHERE i.site_id = $1 AND i.year_month = $2 AND i.billable;

-- name: reconcile_lock_month
-- EXCLUSIVE quota lock of the (site, month): waits for every uncommitted ingest transaction holding it
-- SHARED, so a COUNT taken after it misses no row whose reservation is already in Redis.
SELECT pg_advisory_xact_lock(quota_lock_key($1::uuid, $2::text));

-- name: reconcile_set_lock_timeout
SELECT set_config('lock_timeout', $1::text, true);

-- name: reconcile_reset_stripes
-- Under the EXCLUSIVE lock: the month's usage stripes become one stripe 0 holding the exact COUNT
-- (the same function the gate uses when it seeds a month).
SELECT quota_reset_stripes($1, $2);

-- name: reconcile_upsert_usage
INSERT INTO site_usage_monthly (site_id, year_month, event_count, overage_count, last_synced_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (site_id, year_month) DO UPDATE SET
    event_count = EXCLUDED.event_count,
    overage_count = EXCLUDED.overage_count,
    last_synced_at = EXCLUDED.last_synced_at;

-- name: reconcile_active_sites
-- Sites with rows in the current month ($1), or in the previous month ($2) since $3 (now - 24 h): one
-- index probe per site on ingest_idempotency_export_idx (site_id, year_month, created_at, id).
SELECT s.id
FROM sites s
WHERE EXISTS (SELECT 1 FROM ingest_idempotency i WHERE i.site_id = s.id AND i.year_month = $1)
   OR EXISTS (SELECT 1 FROM ingest_idempotency i
              WHERE i.site_id = s.id AND i.year_month = $2 AND i.created_at >= $3)
ORDER BY s.id;

-- name: reconcile_enqueue_jobs
-- Jobs for every (site, month) given: new ones inserted; COMPLETED ones re-queued (open months keep
-- being refreshed); FAILED ones that used up their attempts ($3) re-armed with attempt_count = 0.
-- Returns one row per job inserted or re-queued.
INSERT INTO billing_reconciliation_jobs AS j (site_id, year_month)
SELECT t.site_id, t.year_month
FROM unnest($1::uuid[], $2::text[]) AS t (site_id, year_month)
ON CONFLICT (site_id, year_month) DO UPDATE SET
    status = 'QUEUED',
    attempt_count = 0,
    next_attempt_at = now(),
    locked_at = NULL,
    locked_by = NULL
WHERE j.status = 'COMPLETED' OR (j.status = 'FAILED' AND j.attempt_count >= $3)
RETURNING j.id;

-- name: reconcile_insert_missing_jobs
-- Backfill: only (site, month) pairs without a job.
INSERT INTO billing_reconciliation_jobs (site_id, year_month)
SELECT t.site_id, t.year_month
FROM unnest($1::uuid[], $2::text[]) AS t (site_id, year_month)
ON CONFLICT (site_id, year_month) DO NOTHING
RETURNING id;

-- name: reconcile_sites_with_rows_in_months
SELECT s.id
FROM sites s
WHERE EXISTS (SELECT 1 FROM ingest_idempotency i
              WHERE i.site_id = s.id AND i.year_month = ANY($1::text[]))
ORDER BY s.id;

-- name: reconcile_site_exists
SELECT EXISTS (SELECT 1 FROM sites WHERE id = $1);

-- name: reconcile_claim_jobs
-- One statement: QUEUED jobs, FAILED jobs whose backoff elapsed with attempts left ($3), PROCESSING
-- jobs whose lease ($2 seconds) expired. $4 is the claim token written to locked_by.
WITH claimable AS (
    SELECT j.id
    FROM billing_reconciliation_jobs j
    WHERE j.status = 'QUEUED'
       OR (j.status = 'FAILED' AND j.attempt_count < $3 AND j.next_attempt_at <= now())
       OR (j.status = 'PROCESSING' AND j.locked_at < now() - make_interval(secs => $2::double precision))
    ORDER BY j.next_attempt_at, j.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE billing_reconciliation_jobs j
SET status = 'PROCESSING', locked_at = now(), locked_by = $4
FROM claimable c
WHERE j.id = c.id
RETURNING j.id, j.site_id, j.year_month, j.attempt_count;

-- name: reconcile_complete_job
UPDATE billing_reconciliation_jobs
SET status = 'COMPLETED', last_drift_pct = $3, last_error = NULL, attempt_count = 0,
    locked_at = NULL, locked_by = NULL
WHERE id = $1 AND status = 'PROCESSING' AND locked_by = $2
RETURNING id;

-- name: reconcile_fail_job
-- attempt_count counts failed attempts; the next one is due after $4 seconds.
UPDATE billing_reconciliation_jobs
SET status = 'FAILED', last_error = $3, attempt_count = attempt_count + 1,
    next_attempt_at = now() + make_interval(secs => $4::double precision),
    locked_at = NULL, locked_by = NULL
WHERE id = $1 AND status = 'PROCESSING' AND locked_by = $2
RETURNING attempt_count;

-- name: reconcile_release_jobs
-- Shutdown: claimed jobs this worker will not finish go back to the queue at once.
UPDATE billing_reconciliation_jobs
SET status = 'QUEUED', locked_at = NULL, locked_by = NULL
WHERE id = ANY($1::bigint[]) AND status = 'PROCESSING' AND locked_by = $2;

-- name: recovery_claim_rows
-- PENDING rows whose backoff elapsed, and PROCESSING rows whose claim ($2 seconds) expired.
WITH claimable AS (
    SELECT b.id
    FROM ingest_fallback_buffer b
    WHERE (b.status = 'PENDING' AND b.next_attempt_at <= now())
       OR (b.status = 'PROCESSING' AND b.locked_at < now() - make_interval(secs => $2::double precision))
    ORDER BY b.next_attempt_at, b.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE ingest_fallback_buffer b
SET status = 'PROCESSING', locked_at = now()
FROM claimable c
WHERE b.id = c.id
RETURNING b.id, b.site_id, b.idempotency_key, b.bucket_at, b.payload, b.routing_key, b.attempt_count;

-- name: recovery_mark_recovered
UPDATE ingest_fallback_buffer
SET status = 'RECOVERED', locked_at = NULL, last_error = NULL
WHERE id = ANY($1::uuid[]) AND status = 'PROCESSING';

-- name: recovery_mark_idempotency_recovered
-- Still billable: billing happened at capture (SPEC §6); only the capture state changes.
UPDATE ingest_idempotency i
SET billing_state = 'RECOVERED'
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS t (site_id, idempotency_key, bucket_at)
WHERE i.site_id = t.site_id AND i.idempotency_key = t.idempotency_key AND i.bucket_at = t.bucket_at
  AND i.billing_state = 'DEGRADED_CAPTURE';

-- name: recovery_mark_failed
-- Back to PENDING with backoff, or FAILED once attempts reach $4.
UPDATE ingest_fallback_buffer b
SET attempt_count = b.attempt_count + 1,
    status = CASE WHEN b.attempt_count + 1 >= $4 THEN 'FAILED' ELSE 'PENDING' END,
    next_attempt_at = now() + make_interval(secs => least($3::double precision * power(2, b.attempt_count), 3600)),
    locked_at = NULL,
    last_error = t.error
FROM unnest($1::uuid[], $2::text[]) AS t (id, error)
WHERE b.id = t.id AND b.status = 'PROCESSING';

-- name: recovery_pending_count
SELECT count(*) FROM ingest_fallback_buffer WHERE status IN ('PENDING', 'PROCESSING');
