-- Arrangement and baseline queries of bench/export_bench.py (parsed with shared.queries.parse_queries).

-- name: ensure_month
SELECT ingest_idempotency_ensure_partitions($1::date, 1);

-- name: insert_site
INSERT INTO sites (public_id) VALUES ($1) RETURNING id;

-- name: insert_sites
INSERT INTO sites (public_id) SELECT $1 || g FROM generate_series(1, $2::int) AS g;

-- name: add_owner
INSERT INTO site_members (site_id, user_id, role) VALUES ($1, $2, 'owner');

-- name: insert_export_rows
-- $3 rows of site $1 spread evenly over month starting $2 (one in 10 not billable, one in 20 OVERAGE);
-- keys look like the gateway's (64 hex chars).
INSERT INTO ingest_idempotency (site_id, idempotency_key, idempotency_version, bucket_at, created_at,
                                expires_at, billing_state, billable, billing_reason)
SELECT $1::uuid, encode(sha256(convert_to($1::uuid::text || ':' || g, 'UTF8')), 'hex'), 1,
       $2::timestamptz + (g * interval '2.4 seconds'),
       $2::timestamptz + (g * interval '2.4 seconds') + interval '123 microseconds',
       $2::timestamptz + (g * interval '2.4 seconds') + interval '2200 hours',
       CASE WHEN g % 20 = 0 THEN 'OVERAGE' ELSE 'ACCEPTED' END::billing_state,
       g % 10 <> 0, CASE WHEN g % 10 = 0 THEN 'rejected_quota' END
FROM generate_series(1, $3::int) AS g;

-- name: insert_rows_per_site
-- $3 rows for every site whose public id starts with $1, in the month starting $2.
INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at, expires_at, billing_state)
SELECT s.id, md5(s.id::text || ':' || g), $2::timestamptz + g * interval '1 minute',
       $2::timestamptz + g * interval '1 minute', $2::timestamptz + interval '2200 hours',
       CASE WHEN g % 4 = 0 THEN 'OVERAGE' ELSE 'ACCEPTED' END::billing_state
FROM sites s, generate_series(1, $3::int) AS g
WHERE s.public_id LIKE $1 || '%';

-- name: baseline_rows
-- The floor for reading the export's rows: Postgres alone writing them as CSV (same rows, same order,
-- same index), run with COPY (...) TO STDOUT.
SELECT created_at, idempotency_key, idempotency_version, billing_state, billable
FROM ingest_idempotency WHERE site_id = $1 AND year_month = $2
ORDER BY created_at, id

-- name: baseline_group_count
-- The floor for counting a month: one set-based pass over it.
SELECT count(*) FROM (
    SELECT site_id, count(*) FILTER (WHERE billable), count(*) FILTER (WHERE billable AND billing_state = 'OVERAGE')
    FROM ingest_idempotency WHERE year_month = $1 GROUP BY site_id) AS per_site;
