-- Retention and partition maintenance (SPEC §7). The guarded DDL is in migrations/0020_retention.sql.

-- name: retention_try_lock
-- One retention runner at a time across the fleet (session lock, released by retention_unlock).
SELECT pg_try_advisory_lock(hashtextextended('revkernel:retention', 0));

-- name: retention_unlock
SELECT pg_advisory_unlock(hashtextextended('revkernel:retention', 0));

-- name: retention_ensure_partitions
-- Current UTC month and the next two.
SELECT ingest_idempotency_ensure_partitions();

-- name: retention_partitions
-- Attached partitions of ingest_idempotency by name (month partitions and the DEFAULT one).
SELECT c.relname AS name
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'public.ingest_idempotency'::regclass
ORDER BY c.relname;

-- name: retention_drop_partition
SELECT ingest_idempotency_drop_expired_partition($1);

-- name: retention_trim_partition
SELECT ingest_idempotency_trim_expired($1, $2);

-- name: retention_purge_recovered_fallback
-- RECOVERED buffer rows whose recovery ($1 days ago or earlier; updated_at is set on recovery) is old;
-- at most $2 per call, oldest first, through ingest_fallback_buffer_recovered_idx.
WITH victims AS (
    SELECT b.id
    FROM ingest_fallback_buffer b
    WHERE b.status = 'RECOVERED' AND b.updated_at < now() - make_interval(days => $1)
    ORDER BY b.updated_at
    LIMIT $2
), purged AS (
    DELETE FROM ingest_fallback_buffer b USING victims v WHERE b.id = v.id RETURNING 1
)
SELECT count(*) FROM purged;
