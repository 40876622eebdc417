CREATE TABLE sites (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    public_id text NOT NULL UNIQUE CHECK (length(public_id) BETWEEN 1 AND 128),
    name text NOT NULL DEFAULT '',
    allowed_origins text[] NOT NULL DEFAULT '{}',
    rate_limit_per_minute integer CHECK (rate_limit_per_minute > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE site_members (
    site_id uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    user_id text NOT NULL CHECK (user_id <> ''),
    role text NOT NULL CHECK (role IN ('owner', 'admin', 'billing', 'viewer')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, user_id)
);
CREATE INDEX site_members_user_idx ON site_members (user_id);

CREATE TABLE platform_admins (
    user_id text PRIMARY KEY CHECK (user_id <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE site_plans (
    site_id uuid PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    plan_tier text NOT NULL DEFAULT 'free',
    monthly_limit integer NOT NULL CHECK (monthly_limit >= 0),
    soft_limit_enabled boolean NOT NULL DEFAULT false,
    hard_cap_multiplier numeric NOT NULL DEFAULT 2 CHECK (hard_cap_multiplier >= 1),
    overage_price_per_1k numeric CHECK (overage_price_per_1k >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER site_plans_updated_at BEFORE UPDATE ON site_plans
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE site_usage_monthly (
    site_id uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    year_month year_month_text NOT NULL,
    event_count bigint NOT NULL DEFAULT 0 CHECK (event_count >= 0),
    overage_count bigint NOT NULL DEFAULT 0 CHECK (overage_count >= 0),
    last_synced_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, year_month)
);

CREATE TABLE invoice_snapshot (
    site_id uuid NOT NULL REFERENCES sites (id),
    year_month year_month_text NOT NULL,
    event_count bigint NOT NULL CHECK (event_count >= 0),
    overage_count bigint NOT NULL CHECK (overage_count >= 0),
    snapshot_hash text NOT NULL,
    commit_sha text NOT NULL,
    generated_at timestamptz NOT NULL DEFAULT now(),
    generated_by text NOT NULL,
    PRIMARY KEY (site_id, year_month)
);
-- Immutable for every role, owner and service role included (SPEC §1.8).
CREATE TRIGGER invoice_snapshot_no_update BEFORE UPDATE OR DELETE ON invoice_snapshot
    FOR EACH ROW EXECUTE FUNCTION reject_mutation();
CREATE TRIGGER invoice_snapshot_no_truncate BEFORE TRUNCATE ON invoice_snapshot
    FOR EACH STATEMENT EXECUTE FUNCTION reject_mutation();
-- ALWAYS: the triggers fire even with session_replication_role = replica, the one setting that would
-- otherwise let a superuser session write past ordinary triggers.
ALTER TABLE invoice_snapshot ENABLE ALWAYS TRIGGER invoice_snapshot_no_update;
ALTER TABLE invoice_snapshot ENABLE ALWAYS TRIGGER invoice_snapshot_no_truncate;

CREATE TABLE billing_reconciliation_jobs (
    id bigserial PRIMARY KEY,
    site_id uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    year_month year_month_text NOT NULL,
    status text NOT NULL DEFAULT 'QUEUED'
        CHECK (status IN ('QUEUED', 'PROCESSING', 'COMPLETED', 'FAILED')),
    locked_at timestamptz,
    locked_by text,
    attempt_count integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    last_drift_pct numeric,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (site_id, year_month)
);
CREATE INDEX billing_reconciliation_jobs_claim_idx
    ON billing_reconciliation_jobs (status, next_attempt_at);
CREATE TRIGGER billing_reconciliation_jobs_updated_at BEFORE UPDATE ON billing_reconciliation_jobs
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE billing_audit_log (
    id bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    action text NOT NULL,
    actor text NOT NULL,
    site_id uuid,
    year_month year_month_text,
    request_id text,
    details jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX billing_audit_log_site_idx ON billing_audit_log (site_id, occurred_at);
CREATE TRIGGER billing_audit_log_append_only BEFORE UPDATE OR DELETE ON billing_audit_log
    FOR EACH ROW EXECUTE FUNCTION reject_mutation();
CREATE TRIGGER billing_audit_log_no_truncate BEFORE TRUNCATE ON billing_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION reject_mutation();
ALTER TABLE billing_audit_log ENABLE ALWAYS TRIGGER billing_audit_log_append_only;
ALTER TABLE billing_audit_log ENABLE ALWAYS TRIGGER billing_audit_log_no_truncate;
