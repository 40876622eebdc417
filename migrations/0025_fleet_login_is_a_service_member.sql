-- The fleet runs as revkernel_service (SPEC §7): every pool of the gateway and the workers does
-- `SET ROLE revkernel_service` on each new connection (shared/db.py create_pool(role=...)), so whoever
-- DATABASE_URL logs in as, the fleet has the role's rights: DML, no DDL, no UPDATE or DELETE of
-- snapshots, no ALTER TABLE ... DISABLE TRIGGER. SET ROLE needs the login user to be a member of the
-- role; the user that migrates (the deployments share one DATABASE_URL) is made one here. A superuser
-- is a member of every role already, so nothing is granted then.
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'revkernel_service', 'MEMBER') THEN
        EXECUTE format('GRANT revkernel_service TO %I', current_user);
    END IF;
END
$$;
