-- name: ingest_capture_rows
-- `xid`: the group's transaction id, to ask Postgres its fate when the end of it is not confirmed.
SELECT site_id, idempotency_key, pg_mode_year_month, pg_current_xact_id() AS xid
FROM ingest_capture_rows($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: transaction_status
-- 'committed', 'aborted', 'in progress', or NULL when it is too old to know.
SELECT pg_xact_status($1::xid8);

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
