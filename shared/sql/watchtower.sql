-- Watchtower (SPEC §11): one round trip for every check that reads Postgres.

-- name: watchtower_checks
-- pending = rows not yet republished (PENDING, or PROCESSING under a claim); both use the partial
-- claim index. FAILED rows use ingest_fallback_buffer_failed_idx (migration 0010).
SELECT
    (SELECT count(*) FROM ingest_fallback_buffer b
      WHERE b.status IN ('PENDING', 'PROCESSING'))::bigint AS fallback_pending,
    (SELECT count(*) FROM ingest_fallback_buffer b WHERE b.status = 'FAILED')::bigint AS fallback_failed,
    (SELECT EXTRACT(EPOCH FROM now() - min(b.created_at)) FROM ingest_fallback_buffer b
      WHERE b.status IN ('PENDING', 'PROCESSING'))::float8 AS oldest_pending_age_s,
    (SELECT count(*) FROM billing_reconciliation_jobs j WHERE j.status = 'FAILED')::bigint AS jobs_failed,
    (SELECT count(*) FROM ingest_idempotency_default)::bigint AS default_partition_rows;
