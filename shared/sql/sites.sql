-- name: site_by_ref
-- A site by its UUID or its public id. Public ids are free text, so one may look like another site's
-- UUID: the UUID wins, an operator naming a site by its id always gets that site.
SELECT s.id, s.public_id, s.name, s.allowed_origins, s.rate_limit_per_minute,
       p.plan_tier, p.monthly_limit, p.soft_limit_enabled, p.hard_cap_multiplier, p.overage_price_per_1k
FROM sites s
LEFT JOIN site_plans p ON p.site_id = s.id
WHERE s.public_id = $1 OR s.id::text = lower($1)
ORDER BY s.id::text = lower($1) DESC
LIMIT 1;

-- name: site_by_public_id
SELECT s.id, s.public_id, s.name, s.allowed_origins, s.rate_limit_per_minute,
       p.plan_tier, p.monthly_limit, p.soft_limit_enabled, p.hard_cap_multiplier, p.overage_price_per_1k
FROM sites s
LEFT JOIN site_plans p ON p.site_id = s.id
WHERE s.public_id = $1;

-- name: insert_site
INSERT INTO sites (public_id, name, allowed_origins, rate_limit_per_minute)
VALUES ($1, $2, $3, $4)
RETURNING id;

-- name: upsert_plan
INSERT INTO site_plans (site_id, plan_tier, monthly_limit, soft_limit_enabled, hard_cap_multiplier)
VALUES ($1, coalesce($2::text, 'free'), $3::integer, coalesce($4::boolean, false), coalesce($5::numeric, 2))
ON CONFLICT (site_id) DO UPDATE SET
    plan_tier = coalesce($2, site_plans.plan_tier),
    monthly_limit = $3,
    soft_limit_enabled = coalesce($4, site_plans.soft_limit_enabled),
    hard_cap_multiplier = coalesce($5, site_plans.hard_cap_multiplier)
RETURNING plan_tier, monthly_limit, soft_limit_enabled, hard_cap_multiplier;

-- name: upsert_member
INSERT INTO site_members (site_id, user_id, role) VALUES ($1, $2, $3)
ON CONFLICT (site_id, user_id) DO UPDATE SET role = EXCLUDED.role;

-- name: insert_audit
INSERT INTO billing_audit_log (action, actor, site_id, year_month, request_id, details)
VALUES ($1, $2, $3, $4, $5, $6);
