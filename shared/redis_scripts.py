"""The Lua scripts of the gate, run over a lean pipelined connection (shared/resp_wire.py): EVALSHA,
falling back to EVAL after a Redis restart or SCRIPT FLUSH."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import cast

from redis import exceptions as redis_errors

from shared.resp_wire import LuaScript, ScriptClient

LUA_DIR = Path(__file__).resolve().parent / "lua"


@cache
def script_source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


class GateScripts:
    """reserve_quota, release_quota and rate_limit, run on one connection per process."""

    def __init__(self, redis_url: str, *, timeout_s: float = 0.5) -> None:
        self.client = ScriptClient(redis_url, timeout_s=timeout_s)
        self.reserve_quota = LuaScript(script_source("reserve_quota"))
        self.release_quota = LuaScript(script_source("release_quota"))
        self.rate_limit = LuaScript(script_source("rate_limit"))

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[int | str]) -> list[int]:
        """The script's reply: a list of integers (every gate script answers one)."""
        reply = await self.client.run(script, keys, args)
        if not isinstance(reply, list) or not all(isinstance(x, int) for x in reply):
            raise redis_errors.ResponseError(f"unexpected script reply {reply!r}")
        return cast(list[int], reply)

    async def close(self) -> None:
        await self.client.close()
