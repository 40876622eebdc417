"""What every gateway route shares: settings, build info and the three clients."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from shared.billing_counters import BillingCounters
from shared.buildinfo import BuildInfo
from shared.publisher import EventPublisher
from shared.settings import Settings


@dataclass(slots=True)
class GatewayContext:
    settings: Settings
    build: BuildInfo
    pool: asyncpg.Pool
    redis: aioredis.Redis
    publisher: EventPublisher
    counters: BillingCounters


CONTEXT = web.AppKey("context", GatewayContext)
SETTINGS = web.AppKey("settings", Settings)
REQUEST_ID = web.RequestKey("request_id", str)
# The site public id a request named (for its log line).
REQUEST_SITE = web.RequestKey("site", str)


def request_id(request: web.Request) -> str:
    """The id the middleware gave this request (also sent as `x-request-id`)."""
    return str(request[REQUEST_ID])
