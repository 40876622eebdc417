-- Queries of the benchmark harness (bench/), in the `-- name:` format of shared/sql/.
-- They run against the bench databases only (rk_bench for the product, bench for the seed-style gate).

-- name: bench_billable_rows
SELECT count(*) FROM ingest_idempotency WHERE billable;

-- name: bench_fallback_rows
SELECT count(*) FROM ingest_fallback_buffer;

-- name: bench_naive_reset
TRUNCATE ingest_idempotency;
