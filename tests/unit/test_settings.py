"""Settings from the environment (SPEC §12): documented defaults, parsing, one clear error per bad value."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from shared.db import redact_dsn
from shared.settings import Settings, SettingsError, parse_networks


def test_empty_environment_gives_the_spec_defaults() -> None:
    s = Settings.from_env({})
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/revkernel"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.cron_secret is None
    assert s.auth_jwt_secret is None
    assert s.auth_jwt_audience is None and s.auth_jwt_issuer is None
    assert s.commit_sha is None and s.git_branch is None  # buildinfo falls back to git, then "unknown"
    assert s.idempotency_version == 1
    assert s.rate_limit_per_minute == 300
    assert s.default_monthly_limit == 1000
    assert s.publish_timeout_ms == 1000
    assert s.command_timeout_s == 30.0
    assert s.trusted_proxies == ()
    assert (s.reconciler_http_port, s.freezer_http_port) == (8081, 8082)
    assert (s.gateway_host, s.gateway_port) == ("0.0.0.0", 8080)
    assert s.site_cache_ttl_s == 30.0
    assert s.log_level == "info"
    assert s.database_role == "revkernel_service"


def test_every_variable_is_read() -> None:
    env = {
        "DATABASE_URL": "postgresql://u@db:5433/x",
        "REDIS_URL": "redis://r:6380/2",
        "AMQP_URL": "amqp://a:b@mq:5673/v",
        "CRON_SECRET": "cron",
        "AUTH_JWT_SECRET": "j" * 40,
        "AUTH_JWT_AUDIENCE": "aud",
        "AUTH_JWT_ISSUER": "iss",
        "COMMIT_SHA": "abc123",
        "GIT_BRANCH": "main",
        "IDEMPOTENCY_VERSION": "2",
        "RATE_LIMIT_PER_MINUTE": "50",
        "DEFAULT_MONTHLY_LIMIT": "0",
        "PUBLISH_TIMEOUT_MS": "250",
        "COMMAND_TIMEOUT_S": "2.5",
        "TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7,::1",
        "RECONCILER_HTTP_PORT": "9081",
        "FREEZER_HTTP_PORT": "9082",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": "9080",
        "SITE_CACHE_TTL_S": "0",
        "LOG_LEVEL": "debug",
        "DATABASE_ROLE": "billing_fleet",
    }
    s = Settings.from_env(env)
    assert s == Settings(
        database_url="postgresql://u@db:5433/x",
        redis_url="redis://r:6380/2",
        amqp_url="amqp://a:b@mq:5673/v",
        cron_secret="cron",
        auth_jwt_secret="j" * 40,
        auth_jwt_audience="aud",
        auth_jwt_issuer="iss",
        commit_sha="abc123",
        git_branch="main",
        idempotency_version=2,
        rate_limit_per_minute=50,
        default_monthly_limit=0,
        publish_timeout_ms=250,
        command_timeout_s=2.5,
        trusted_proxies=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.168.1.7/32"),
            ipaddress.ip_network("::1/128"),
        ),
        reconciler_http_port=9081,
        freezer_http_port=9082,
        gateway_host="127.0.0.1",
        gateway_port=9080,
        site_cache_ttl_s=0.0,
        log_level="debug",
        database_role="billing_fleet",
    )


def test_database_role_login_means_no_set_role() -> None:
    assert Settings.from_env({"DATABASE_ROLE": "login"}).database_role is None
    assert Settings.from_env({"DATABASE_ROLE": "LOGIN"}).database_role is None
    assert Settings.from_env({"DATABASE_ROLE": " "}).database_role == "revkernel_service"


def test_blank_values_mean_the_default() -> None:
    s = Settings.from_env({"CRON_SECRET": "  ", "GATEWAY_PORT": "", "TRUSTED_PROXIES": " , "})
    assert s.cron_secret is None
    assert s.gateway_port == 8080
    assert s.trusted_proxies == ()


def test_an_explicit_mapping_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "1234")
    assert Settings.from_env({}).gateway_port == 8080
    assert Settings.from_env().gateway_port == 1234


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GATEWAY_PORT", "http", "GATEWAY_PORT must be a whole number"),
        ("GATEWAY_PORT", "70000", "GATEWAY_PORT must be between 0 and 65535"),
        ("RECONCILER_HTTP_PORT", "-1", "RECONCILER_HTTP_PORT must be between 0 and 65535"),
        ("RATE_LIMIT_PER_MINUTE", "0", "RATE_LIMIT_PER_MINUTE must be >= 1"),
        ("RATE_LIMIT_PER_MINUTE", "2.5", "RATE_LIMIT_PER_MINUTE must be a whole number"),
        ("DEFAULT_MONTHLY_LIMIT", "-5", "DEFAULT_MONTHLY_LIMIT must be >= 0"),
        ("PUBLISH_TIMEOUT_MS", "0", "PUBLISH_TIMEOUT_MS must be >= 1"),
        ("COMMAND_TIMEOUT_S", "nan", "COMMAND_TIMEOUT_S must be a number"),
        ("COMMAND_TIMEOUT_S", "inf", "COMMAND_TIMEOUT_S must be a number"),
        ("COMMAND_TIMEOUT_S", "0", "COMMAND_TIMEOUT_S must be >= 0.1"),
        ("SITE_CACHE_TTL_S", "-1", "SITE_CACHE_TTL_S must be >= 0"),
        ("IDEMPOTENCY_VERSION", "3", "IDEMPOTENCY_VERSION must be 1 or 2"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip", "TRUSTED_PROXIES has an invalid entry 'not-an-ip'"),
        ("DATABASE_URL", "notaurl", "DATABASE_URL must be a postgresql:// or postgres:// URL"),
        ("DATABASE_URL", "mysql://x@127.0.0.1/db", "DATABASE_URL must be a postgresql://"),
        ("REDIS_URL", "127.0.0.1:6379", "REDIS_URL must be a redis:// or rediss:// or unix:// URL"),
        ("AMQP_URL", "notaurl", "AMQP_URL must be a amqp:// or amqps:// URL"),
        ("AMQP_URL", "amqp://guest:guest@h:99999/", "AMQP_URL is not a valid URL"),
        ("LOG_LEVEL", "verbose", "LOG_LEVEL must be one of debug, info, warning, error"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_urls_every_client_takes_are_accepted() -> None:
    for name, url in [
        ("DATABASE_URL", "postgres://u:p@db.internal:6432/revkernel?sslmode=require"),
        ("DATABASE_URL", "postgresql:///revkernel?host=/var/run/postgresql"),
        ("DATABASE_URL", "postgresql:///revkernel"),  # PGHOST or the default socket
        ("DATABASE_URL", "postgresql://db1:5432,db2:5433/revkernel"),  # failover hosts
        ("REDIS_URL", "rediss://:secret@cache:6380/2"),
        ("REDIS_URL", "unix:///run/redis.sock"),
        ("AMQP_URL", "amqps://u:p@mq/vhost"),
    ]:
        Settings.from_env({name: url})
    assert Settings.from_env({"LOG_LEVEL": "WARNING"}).log_level == "warning"


def test_settings_are_frozen_and_overrides_copy() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gateway_port = 1  # type: ignore[misc]
    t = s.with_overrides(gateway_port=1)
    assert (s.gateway_port, t.gateway_port) == (8080, 1)


def test_parse_networks_accepts_host_bits_and_ipv6() -> None:
    nets = parse_networks("10.1.2.3/8,fe80::1")
    assert ipaddress.ip_address("10.200.0.1") in nets[0]
    assert ipaddress.ip_address("fe80::1") in nets[1]
    assert len(nets) == 2


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://postgres@127.0.0.1:5432/revkernel", "postgresql://postgres@127.0.0.1:5432/revkernel"),
        ("postgresql://svc:s3cret@db:5432/rk", "postgresql://svc:***@db:5432/rk"),
        (
            "postgresql://svc@db/rk?sslmode=require&password=s3cret",
            "postgresql://svc@db/rk?sslmode=require&password=***",
        ),
    ],
)
def test_redact_dsn_hides_the_password(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
    assert "s3cret" not in redact_dsn(dsn)
