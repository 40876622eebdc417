-- Roles are cluster-wide: another database of the same cluster may already have made them.
DO $$
BEGIN
    BEGIN
        CREATE ROLE revkernel_service NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
        RAISE NOTICE 'role revkernel_service already exists';
    END;
    BEGIN
        CREATE ROLE revkernel_tenant NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
        RAISE NOTICE 'role revkernel_tenant already exists';
    END;
END
$$;

-- The fleet reads tenant-scoped data by SET LOCAL ROLE revkernel_tenant.
GRANT revkernel_tenant TO revkernel_service;

CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TYPE billing_state AS ENUM ('ACCEPTED', 'OVERAGE', 'DEGRADED_CAPTURE', 'RECOVERED');

-- YYYY-MM of an instant in UTC; immutable (digits only, no locale), so usable in generated columns.
CREATE FUNCTION utc_year_month(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT lpad(extract(year FROM (ts AT TIME ZONE 'UTC'))::int::text, 4, '0')
        || '-' || lpad(extract(month FROM (ts AT TIME ZONE 'UTC'))::int::text, 2, '0')
$$;

CREATE DOMAIN year_month_text AS text CHECK (VALUE ~ '^[0-9]{4}-(0[1-9]|1[0-2])$');

CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE FUNCTION reject_mutation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
