"""Admin commands: migrate, site create, plan set, member add, token."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import asyncpg

from services.cli import CliError, run_async
from services.cli_types import non_negative_int, positive_int, print_json
from shared.auth import AuthMisconfigured, issue_token
from shared.db import connect, redact_dsn
from shared.migrate import MigrationError, migrate
from shared.settings import Settings
from shared.sites import (
    MAX_HARD_CAP_MULTIPLIER,
    ROLES,
    Site,
    SiteNotFound,
    add_member,
    create_site,
    resolve_site,
    set_plan,
)

T = TypeVar("T")


def _multiplier(raw: str) -> Decimal:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not value.is_finite() or not 1 <= value <= MAX_HARD_CAP_MULTIPLIER:
        raise argparse.ArgumentTypeError(
            f"the hard cap multiplier must be a number between 1 and {MAX_HARD_CAP_MULTIPLIER}"
        )
    return value


MAX_TOKEN_TTL_S = 31 * 24 * 3600


def _token_ttl(raw: str) -> int:
    """A token's lifetime: a dispute-export credential that never expires is not one to print."""
    value = positive_int(raw)
    if value > MAX_TOKEN_TTL_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TOKEN_TTL_S} (31 days)")
    return value


def _non_empty(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (Postgres messages may carry a DETAIL line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _with_db(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `work` on one connection; Postgres failures become one-line CLI errors."""

    async def go() -> T:
        try:
            conn = await connect(settings.database_url)
        except (OSError, asyncpg.PostgresError) as exc:
            raise CliError(
                f"cannot reach Postgres at {redact_dsn(settings.database_url)}: {_one_line(exc)}"
            ) from exc
        try:
            return await work(conn)
        except SiteNotFound as exc:
            raise CliError(str(exc)) from None
        except asyncpg.UndefinedTableError as exc:
            raise CliError(f"database not migrated (run `revkernel migrate`): {_one_line(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise CliError(_one_line(exc)) from None
        finally:
            await conn.close()

    return run_async(go())


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    try:
        applied = run_async(migrate(settings.database_url))
    except (MigrationError, OSError, asyncpg.PostgresError) as exc:
        raise CliError(f"migrate failed ({redact_dsn(settings.database_url)}): {_one_line(exc)}") from exc
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_site_create(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: asyncpg.Connection) -> Site:
        try:
            return await create_site(
                conn,
                public_id=args.public_id,
                name=args.name or args.public_id,
                allowed_origins=args.origin or [],
                rate_limit_per_minute=args.rate_limit_per_minute,
                monthly_limit=args.monthly_limit,
                soft_limit_enabled=args.soft_limit,
                hard_cap_multiplier=args.hard_cap_multiplier,
                plan_tier=args.tier,
                default_monthly_limit=settings.default_monthly_limit,
            )
        except asyncpg.UniqueViolationError:
            raise CliError(f"a site with public id {args.public_id!r} already exists") from None
        except asyncpg.CheckViolationError as exc:
            raise CliError(f"invalid site: {_one_line(exc)}") from None
        except ValueError as exc:
            raise CliError(f"invalid site: {exc}") from None

    print_json(_with_db(settings, work).as_dict())
    return 0


def cmd_plan_set(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: asyncpg.Connection) -> Site:
        site = await resolve_site(conn, args.site, settings.default_monthly_limit)
        await set_plan(
            conn,
            site.id,
            monthly_limit=args.monthly_limit,
            soft_limit_enabled=args.soft_limit,
            hard_cap_multiplier=args.hard_cap_multiplier,
            plan_tier=args.tier,
        )
        return await resolve_site(conn, str(site.id), settings.default_monthly_limit)

    print_json(_with_db(settings, work).as_dict())
    return 0


def cmd_member_add(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: asyncpg.Connection) -> Site:
        site = await resolve_site(conn, args.site, settings.default_monthly_limit)
        await add_member(conn, site.id, args.user, args.role)
        return site

    site = _with_db(settings, work)
    print_json(
        {"site_id": str(site.id), "public_id": site.public_id, "user_id": args.user, "role": args.role}
    )
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    try:
        print(issue_token(settings, args.user, args.ttl))
    except AuthMisconfigured as exc:
        raise CliError(str(exc)) from None
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("migrate", help="create the database if missing and apply pending migrations")
    p.set_defaults(handler=cmd_migrate)

    site = sub.add_parser("site", help="manage sites").add_subparsers(dest="site_command", metavar="ACTION")
    site.required = True
    p = site.add_parser("create", help="create a site and print it as JSON")
    p.add_argument("--public-id", required=True, type=_non_empty)
    p.add_argument("--name")
    p.add_argument("--origin", action="append", help="allowed Origin (repeatable; '*' allows any)")
    p.add_argument("--rate-limit-per-minute", type=positive_int)
    p.add_argument("--monthly-limit", type=non_negative_int)
    p.add_argument("--soft-limit", action="store_true", default=None)
    p.add_argument("--hard-cap-multiplier", type=_multiplier)
    p.add_argument("--tier", help="plan tier name")
    p.set_defaults(handler=cmd_site_create)

    plan = sub.add_parser("plan", help="manage plans").add_subparsers(dest="plan_command", metavar="ACTION")
    plan.required = True
    p = plan.add_parser("set", help="create or change a site's plan")
    p.add_argument("--site", required=True, type=_non_empty, help="site UUID or public id")
    p.add_argument("--monthly-limit", type=non_negative_int, required=True)
    soft = p.add_mutually_exclusive_group()
    soft.add_argument("--soft-limit", dest="soft_limit", action="store_true", default=None)
    soft.add_argument("--no-soft-limit", dest="soft_limit", action="store_false")
    p.add_argument("--hard-cap-multiplier", type=_multiplier)
    p.add_argument("--tier", type=_non_empty)
    p.set_defaults(handler=cmd_plan_set)

    member = sub.add_parser("member", help="manage site members").add_subparsers(
        dest="member_command", metavar="ACTION"
    )
    member.required = True
    p = member.add_parser("add", help="add (or change) a member of a site")
    p.add_argument("--site", required=True, type=_non_empty, help="site UUID or public id")
    p.add_argument("--user", required=True, type=_non_empty)
    p.add_argument("--role", required=True, choices=ROLES)
    p.set_defaults(handler=cmd_member_add)

    p = sub.add_parser("token", help="print a signed JWT for a user (needs AUTH_JWT_SECRET)")
    p.add_argument("--user", required=True, type=_non_empty)
    p.add_argument("--ttl", type=_token_ttl, default=3600, help="lifetime in seconds (at most 31 days)")
    p.set_defaults(handler=cmd_token)
