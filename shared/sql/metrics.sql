-- Observability (SPEC §11): /api/metrics, /metrics and the watchtower read these.

-- name: metrics_drift_sites_last1h
SELECT count(DISTINCT site_id)::bigint
FROM billing_reconciliation_jobs
WHERE status = 'COMPLETED'
  AND last_drift_pct > 0.01
  AND updated_at > now() - interval '1 hour';

-- name: metrics_fallback_backlog
-- Rows by status (RECOVERED rows are history, not backlog) and the age of the oldest PENDING row.
SELECT status,
       count(*)::bigint AS row_count,
       EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest_age_s
FROM ingest_fallback_buffer
WHERE status IN ('PENDING', 'PROCESSING', 'FAILED')
GROUP BY status;

-- name: metrics_reconciliation_jobs_by_status
SELECT status, count(*)::bigint AS job_count
FROM billing_reconciliation_jobs
GROUP BY status;

-- name: metrics_is_platform_admin
SELECT EXISTS (SELECT 1 FROM platform_admins WHERE user_id = $1);
