"""The Lua scripts of the gate, loaded once per client (EVALSHA, falling back to EVAL after a flush)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

LUA_DIR = Path(__file__).resolve().parent / "lua"


@cache
def script_source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


class GateScripts:
    """reserve_quota, release_quota and rate_limit registered on one client."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.reserve_quota: AsyncScript = redis.register_script(script_source("reserve_quota"))
        self.release_quota: AsyncScript = redis.register_script(script_source("release_quota"))
        self.rate_limit: AsyncScript = redis.register_script(script_source("rate_limit"))


async def run_script(script: AsyncScript, keys: list[str], args: list[Any]) -> list[int]:
    result = await script(keys=keys, args=args)
    return [int(x) for x in result]
