-- name: ingest_capture_rows
SELECT site_id, idempotency_key, pg_mode_year_month
FROM ingest_capture_rows($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: quota_usage_exclusive
SELECT site_id, year_month, used FROM quota_usage_exclusive($1, $2);

-- name: quota_reseed
SELECT quota_reseed($1, $2);

-- name: ingest_settle_rows
SELECT ingest_settle_rows($1, $2, $3, $4, $5, $6);

-- name: ingest_buffer_rows
SELECT ingest_buffer_rows($1, $2, $3, $4, $5, $6);

-- name: ingest_discard_rows
SELECT ingest_discard_rows($1, $2, $3);
