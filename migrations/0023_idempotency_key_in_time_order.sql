-- The idempotency primary key in time order: (site_id, bucket_at, idempotency_key) (docs/performance.md).
--
-- Same columns, same uniqueness: every conflict SPEC §4 asks for is still one key, and every lookup
-- (settle, buffer, discard, recovery) names all three columns. Only the order changes.
--
-- With the SHA-256 key second, each insert landed on a random leaf of an index as large as the
-- partition: after every checkpoint nearly each insert wrote a full-page image to the WAL, so WAL per
-- row grew with the table (690 → 1,480 bytes per row over the first 400,000 rows of a partition, and
-- towards 8 KB on a production-sized one), checkpoints came more often and commits waited on longer
-- WAL flushes. With the bucket second, a site's inserts fall within its current bucket: a few hot
-- leaves, one full-page image each per checkpoint. Measured on 500-row capture groups: WAL flat at
-- 690 bytes per row, 20.5 → 18.5 µs per row.
--
-- The key is a lowercase hex digest (or `v2:` + hex): the "C" collation compares it bytewise instead of
-- through the locale, and orders it as Python does.
--
-- Rebuilding the key takes an ACCESS EXCLUSIVE lock on every partition for as long as its index builds
-- (docs/operations.md: run in a maintenance window on a large table).

ALTER TABLE ingest_idempotency DROP CONSTRAINT ingest_idempotency_pkey;
ALTER TABLE ingest_idempotency ALTER COLUMN idempotency_key TYPE text COLLATE "C";
ALTER TABLE ingest_idempotency ADD PRIMARY KEY (site_id, bucket_at, idempotency_key);
