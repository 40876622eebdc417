-- Reconciler and watchtower support (docs/reconciler.md).

-- Watchtower counts FAILED fallback rows; the buffer also keeps RECOVERED rows for 30 days, so the
-- count must not scan them.
CREATE INDEX ingest_fallback_buffer_failed_idx ON ingest_fallback_buffer (created_at)
    WHERE status = 'FAILED';
