"""Process settings (SPEC §12): one frozen object, built once from the environment in `main`."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# DATABASE_ROLE's value for "no SET ROLE: the login user's own rights".
LOGIN_ROLE = "login"
LOG_LEVELS = ("debug", "info", "warning", "error")
# URL variables and the schemes their clients take (asyncpg, redis-py, aio-pika).
URL_SCHEMES = {
    "DATABASE_URL": ("postgresql", "postgres"),
    "REDIS_URL": ("redis", "rediss", "unix"),
    "AMQP_URL": ("amqp", "amqps"),
}


class SettingsError(ValueError):
    """An environment variable holds a value the fleet cannot run with."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/revkernel"
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    cron_secret: str | None = None
    auth_jwt_secret: str | None = None
    auth_jwt_audience: str | None = None
    auth_jwt_issuer: str | None = None
    commit_sha: str | None = None
    git_branch: str | None = None
    idempotency_version: int = 1
    rate_limit_per_minute: int = 300
    default_monthly_limit: int = 1000
    publish_timeout_ms: int = 1000
    command_timeout_s: float = 30.0
    trusted_proxies: tuple[IpNetwork, ...] = field(default_factory=tuple)
    reconciler_http_port: int = 8081
    freezer_http_port: int = 8082
    gateway_host: str = "0.0.0.0"
    gateway_port: int = 8080
    site_cache_ttl_s: float = 30.0
    log_level: str = "info"
    # The role the fleet's pools SET on each connection (SPEC §7: the fleet works as revkernel_service).
    # None (DATABASE_ROLE=login): work as the login user, for a transaction-mode pooler, where a
    # session's SET ROLE would outlive its client (docs/operations.md).
    database_role: str | None = "revkernel_service"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read SPEC §12 variables; unset or empty means the documented default."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}

        def text(name: str, attr: str) -> None:
            raw = env.get(name, "").strip() or _read_secret_file(name, env.get(f"{name}_FILE", "").strip())
            if raw:
                values[attr] = raw

        def number(name: str, attr: str, kind: type, minimum: float, maximum: float = math.inf) -> None:
            raw = env.get(name, "").strip()
            if not raw:
                return
            what = "a whole number" if kind is int else "a number"
            try:
                parsed = kind(raw)
            except ValueError as exc:
                raise SettingsError(f"{name} must be {what}, got {raw!r}") from exc
            if not math.isfinite(parsed):
                raise SettingsError(f"{name} must be {what}, got {raw!r}")
            if parsed < minimum or parsed > maximum:
                bounds = f">= {minimum}" if maximum == math.inf else f"between {minimum} and {maximum}"
                raise SettingsError(f"{name} must be {bounds}, got {raw!r}")
            values[attr] = parsed

        for name, attr in [
            ("DATABASE_URL", "database_url"),
            ("REDIS_URL", "redis_url"),
            ("AMQP_URL", "amqp_url"),
            ("CRON_SECRET", "cron_secret"),
            ("AUTH_JWT_SECRET", "auth_jwt_secret"),
            ("AUTH_JWT_AUDIENCE", "auth_jwt_audience"),
            ("AUTH_JWT_ISSUER", "auth_jwt_issuer"),
            ("COMMIT_SHA", "commit_sha"),
            ("GIT_BRANCH", "git_branch"),
            ("GATEWAY_HOST", "gateway_host"),
            ("LOG_LEVEL", "log_level"),
        ]:
            text(name, attr)
        _check_texts(values)
        role = env.get("DATABASE_ROLE", "").strip()
        if role:
            values["database_role"] = None if role.lower() == LOGIN_ROLE else role
        number("IDEMPOTENCY_VERSION", "idempotency_version", int, 1)
        number("RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute", int, 1)
        number("DEFAULT_MONTHLY_LIMIT", "default_monthly_limit", int, 0)
        number("PUBLISH_TIMEOUT_MS", "publish_timeout_ms", int, 1)
        number("COMMAND_TIMEOUT_S", "command_timeout_s", float, 0.1)
        number("RECONCILER_HTTP_PORT", "reconciler_http_port", int, 0, 65535)
        number("FREEZER_HTTP_PORT", "freezer_http_port", int, 0, 65535)
        number("GATEWAY_PORT", "gateway_port", int, 0, 65535)
        number("SITE_CACHE_TTL_S", "site_cache_ttl_s", float, 0)
        if values.get("idempotency_version", 1) not in (1, 2):
            raise SettingsError("IDEMPOTENCY_VERSION must be 1 or 2")
        values["trusted_proxies"] = parse_networks(env.get("TRUSTED_PROXIES", ""))
        return cls(**values)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (CLI flags, tests)."""
        return replace(self, **changes)


def _check_texts(values: dict[str, Any]) -> None:
    """The URLs name their clients' schemes and a host; LOG_LEVEL is a level (lower-cased)."""
    for name in URL_SCHEMES:
        if name.lower() in values:
            check_url(name, values[name.lower()])
    if "log_level" in values:
        level = values["log_level"].lower()
        if level not in LOG_LEVELS:
            allowed = ", ".join(LOG_LEVELS)
            raise SettingsError(f"LOG_LEVEL must be one of {allowed}, got {values['log_level']!r}")
        values["log_level"] = level


def check_url(name: str, url: str) -> None:
    """A URL variable must name its client's scheme, and (Redis, AMQP) a host or a unix socket path.

    A Postgres URL may name no host (libpq's PGHOST or the default socket) or several (failover, e.g.
    `postgresql://db1:5432,db2:5433/rk`), as asyncpg accepts them."""
    schemes = URL_SCHEMES[name]
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in schemes:
        raise SettingsError(f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL, got {url!r}")
    if scheme.startswith("postgres"):
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        raise SettingsError(f"{name} is not a valid URL: {exc}") from exc
    if not (parts.hostname or (scheme == "unix" and parts.path)):
        raise SettingsError(f"{name} names no host: {url!r}")


def parse_networks(raw: str) -> tuple[IpNetwork, ...]:
    """Parse a comma-separated list of IPs or CIDRs (TRUSTED_PROXIES)."""
    networks: list[IpNetwork] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise SettingsError(f"TRUSTED_PROXIES has an invalid entry {part!r}") from exc
    return tuple(networks)


def _read_secret_file(name: str, path: str) -> str:
    """`NAME_FILE=/run/secrets/x` (docker/compose secrets): the file's content stands for NAME."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise SettingsError(f"{name}_FILE points at {path!r}, which cannot be read: {exc.strerror}") from exc
