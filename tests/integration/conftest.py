"""Fixtures for gate tests: sites made through the product's own functions, and a running gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from shared.sites import Site, create_site
from tests.support.gateway import gateway_client, wait_for_amqp

MakeSite = Callable[..., Awaitable[Site]]


@pytest.fixture
def make_site(db: asyncpg.Connection) -> MakeSite:
    """Create a site (and plan) in this test's database."""

    async def make(
        public_id: str = "site-a",
        *,
        origins: list[str] | None = None,
        monthly_limit: int | None = 1_000_000,
        soft: bool | None = None,
        multiplier: str | None = None,
        rate_limit_per_minute: int | None = None,
    ) -> Site:
        return await create_site(
            db,
            public_id=public_id,
            allowed_origins=origins if origins is not None else ["*"],
            monthly_limit=monthly_limit,
            soft_limit_enabled=soft,
            hard_cap_multiplier=Decimal(multiplier) if multiplier else None,
            rate_limit_per_minute=rate_limit_per_minute,
        )

    return make


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The gateway on this test's database, Redis and vhost, connected to the broker."""
    async with gateway_client(settings) as client:
        await wait_for_amqp(client)
        yield client
