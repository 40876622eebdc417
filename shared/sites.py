"""Sites, plans and members: the tenancy records the gates and the admin CLI read and write."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from shared.queries import query

ROLES = ("owner", "admin", "billing", "viewer")


MAX_ROUTING_KEY_BYTES = 255


class SiteNotFound(LookupError):
    """No site has that UUID or public id."""


DEFAULT_PORTS = {"http": "80", "https": "443"}
# Largest hard cap the gate uses: a counter's reach in Redis's Lua numbers (doubles, exact to 2^53).
MAX_HARD_CAP = 2**53
# What `revkernel plan set` accepts as a hard-cap multiplier.
MAX_HARD_CAP_MULTIPLIER = Decimal(1000)


def origin_key(origin: str) -> str:
    """An origin as a browser serializes it (`scheme://host[:port]`): lower case, no default port, no
    trailing slash. An allow-list entry written `https://Example.com:443/` matches the `Origin:
    https://example.com` a browser sends."""
    text = origin.strip().rstrip("/").lower()
    scheme, sep, rest = text.partition("://")
    host, colon, port = rest.rpartition(":")
    if sep and colon and port == DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return text


@dataclass(frozen=True, slots=True)
class Plan:
    monthly_limit: int
    soft_limit_enabled: bool = False
    hard_cap_multiplier: Decimal = Decimal(2)
    plan_tier: str = "default"

    @property
    def hard_cap(self) -> int:
        """H = floor(N × multiplier) (SPEC §5), exactly (a Decimal product rounds at 28 digits, so
        3 × 1.99999999999999999999999999999 gave 6, not 5), at most `MAX_HARD_CAP` (a multiplier
        set in SQL to 1E+5000 made a cap Redis could not be sent)."""
        multiplier = self.hard_cap_multiplier
        if multiplier.is_nan():
            return self.monthly_limit  # a plan row Postgres let through ('NaN' >= 1): no overage
        if multiplier.is_infinite():
            return MAX_HARD_CAP
        numerator, denominator = multiplier.as_integer_ratio()
        return min(self.monthly_limit * numerator // denominator, MAX_HARD_CAP)


@dataclass(frozen=True, slots=True)
class Site:
    id: uuid.UUID
    public_id: str
    name: str
    allowed_origins: tuple[str, ...]
    rate_limit_per_minute: int | None
    plan: Plan
    origin_keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin_keys", frozenset(origin_key(o) for o in self.allowed_origins))

    def allows_origin(self, origin: str | None) -> bool:
        """No Origin = server-side sender; an entry that is exactly `*` allows any origin (not `*/` or
        ` * `: a typo must not open the site); others compare as `origin_key`s."""
        if origin is None:
            return True
        return "*" in self.allowed_origins or origin_key(origin) in self.origin_keys

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "public_id": self.public_id,
            "name": self.name,
            "allowed_origins": list(self.allowed_origins),
            "rate_limit_per_minute": self.rate_limit_per_minute,
            "plan_tier": self.plan.plan_tier,
            "monthly_limit": self.plan.monthly_limit,
            "soft_limit_enabled": self.plan.soft_limit_enabled,
            "hard_cap_multiplier": str(self.plan.hard_cap_multiplier),
        }


def site_from_row(row: asyncpg.Record, default_monthly_limit: int) -> Site:
    has_plan = row["monthly_limit"] is not None
    plan = (
        Plan(
            monthly_limit=row["monthly_limit"],
            soft_limit_enabled=row["soft_limit_enabled"],
            hard_cap_multiplier=Decimal(row["hard_cap_multiplier"]),
            plan_tier=row["plan_tier"],
        )
        if has_plan
        else Plan(monthly_limit=default_monthly_limit)
    )
    return Site(
        id=row["id"],
        public_id=row["public_id"],
        name=row["name"],
        allowed_origins=tuple(row["allowed_origins"] or ()),
        rate_limit_per_minute=row["rate_limit_per_minute"],
        plan=plan,
    )


async def fetch_site_by_public_id(
    conn: asyncpg.Connection | asyncpg.Pool, public_id: str, default_monthly_limit: int
) -> Site | None:
    row = await conn.fetchrow(query("site_by_public_id"), public_id)
    return None if row is None else site_from_row(row, default_monthly_limit)


async def resolve_site(
    conn: asyncpg.Connection | asyncpg.Pool, ref: str, default_monthly_limit: int = 1000
) -> Site:
    """A site by UUID or public id; SiteNotFound otherwise."""
    row = await conn.fetchrow(query("site_by_ref"), ref)
    if row is None:
        raise SiteNotFound(f"no site with id or public id {ref!r}")
    return site_from_row(row, default_monthly_limit)


async def create_site(
    conn: asyncpg.Connection,
    *,
    public_id: str,
    name: str = "",
    allowed_origins: list[str] | None = None,
    rate_limit_per_minute: int | None = None,
    monthly_limit: int | None = None,
    soft_limit_enabled: bool | None = None,
    hard_cap_multiplier: Decimal | None = None,
    plan_tier: str | None = None,
    default_monthly_limit: int = 1000,
) -> Site:
    """Insert a site (and its plan when any plan field is given) in one transaction.

    ValueError when its events could not be routed: `event.<public_id>` must fit an AMQP short
    string (255 bytes of UTF-8)."""
    from shared.amqp import ingest_routing_key  # here: CLI modules import this module, keep it light

    routing_key_bytes = len(ingest_routing_key(public_id).encode())
    if routing_key_bytes > MAX_ROUTING_KEY_BYTES:
        raise ValueError(
            f"public id too long: its routing key is {routing_key_bytes} bytes of UTF-8, at most "
            f"{MAX_ROUTING_KEY_BYTES} are allowed"
        )
    async with conn.transaction():
        site_id = await conn.fetchval(
            query("insert_site"), public_id, name, allowed_origins or [], rate_limit_per_minute
        )
        if monthly_limit is not None or soft_limit_enabled or hard_cap_multiplier is not None or plan_tier:
            await conn.fetchrow(
                query("upsert_plan"),
                site_id,
                plan_tier,
                default_monthly_limit if monthly_limit is None else monthly_limit,
                soft_limit_enabled,
                hard_cap_multiplier,
            )
    return await resolve_site(conn, str(site_id), default_monthly_limit)


async def set_plan(
    conn: asyncpg.Connection,
    site_id: uuid.UUID,
    *,
    monthly_limit: int,
    soft_limit_enabled: bool | None = None,
    hard_cap_multiplier: Decimal | None = None,
    plan_tier: str | None = None,
    actor: str = "cli",
) -> asyncpg.Record:
    """Create or change a site's plan; the change is written to the audit log."""
    async with conn.transaction():
        row = await conn.fetchrow(
            query("upsert_plan"), site_id, plan_tier, monthly_limit, soft_limit_enabled, hard_cap_multiplier
        )
        await conn.execute(
            query("insert_audit"),
            "plan_set",
            actor,
            site_id,
            None,
            None,
            {k: str(v) for k, v in dict(row).items()},
        )
    return row


async def add_member(conn: asyncpg.Connection, site_id: uuid.UUID, user_id: str, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    await conn.execute(query("upsert_member"), site_id, user_id, role)
