"""The gate's script connection against a real redis-server: pipelining, script cache loss, faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import exceptions as redis_errors

from shared.resp_wire import LuaScript, ScriptClient
from tests.conftest import RedisServer, free_port
from tests.support.proxy import TcpProxy


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A server that accepts connections, reads everything and never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


ECHO = LuaScript("return {tonumber(ARGV[1]), redis.call('INCRBY', KEYS[1], ARGV[1])}")


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    redis_url: str, redis_client: Any
) -> None:
    client = ScriptClient(redis_url)
    try:
        replies = await asyncio.gather(*(client.run(ECHO, ["total"], [n]) for n in range(1, 201)))
    finally:
        await client.close()
    assert [reply[0] for reply in replies] == list(range(1, 201))  # type: ignore[index]
    assert await redis_client.get("total") == str(sum(range(1, 201)))


async def test_script_cache_flushed_falls_back_to_eval(redis_url: str, redis_client: Any) -> None:
    client = ScriptClient(redis_url)
    try:
        assert await client.run(ECHO, ["k"], [2]) == [2, 2]
        await redis_client.script_flush()
        assert await client.run(ECHO, ["k"], [3]) == [3, 5]
    finally:
        await client.close()


async def test_script_errors_fail_their_call_only(redis_url: str) -> None:
    client = ScriptClient(redis_url)
    broken = LuaScript("return redis.call('NOSUCHCOMMAND')")
    try:
        bad, good = await asyncio.gather(
            client.run(broken, [], []), client.run(ECHO, ["k"], [1]), return_exceptions=True
        )
        assert isinstance(bad, redis_errors.ResponseError)
        assert good == [1, 1]
    finally:
        await client.close()


async def test_an_unencodable_argument_fails_alone_and_replies_stay_matched(redis_url: str) -> None:
    client = ScriptClient(redis_url)
    try:
        with pytest.raises(redis_errors.DataError):
            await client.run(ECHO, ["rl:fe80::1%\udcff"], [1])
        first, second = await asyncio.gather(client.run(ECHO, ["a"], [7]), client.run(ECHO, ["b"], [9]))
        assert first == [7, 7] and second == [9, 9]
    finally:
        await client.close()


async def test_callers_waiting_for_a_hung_server_share_one_connect_timeout(silent_port: int) -> None:
    """A server that accepts and never answers AUTH/SELECT: every waiting call fails after one timeout,
    not one timeout per caller queued ahead of it."""
    client = ScriptClient(f"redis://127.0.0.1:{silent_port}/3", timeout_s=0.3)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        calls = [client.run(ECHO, ["k"], [1]) for _ in range(8)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = loop.time() - started
        assert all(isinstance(o, redis_errors.TimeoutError) for o in outcomes), outcomes
        assert elapsed < 1.5  # serialised connects would take 8 x 0.3 s
    finally:
        await client.close()


async def test_dead_port_is_a_connection_error() -> None:
    client = ScriptClient(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(redis_errors.ConnectionError):
        await client.run(ECHO, ["k"], [1])


async def test_silent_server_times_out_and_fails_every_waiting_call(silent_port: int) -> None:
    """A server that accepts and never answers: calls time out instead of hanging the gate."""
    client = ScriptClient(f"redis://127.0.0.1:{silent_port}/0", timeout_s=0.3)
    try:
        calls = [client.run(ECHO, ["k"], [1]) for _ in range(5)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert any(isinstance(o, redis_errors.TimeoutError) for o in outcomes)
        assert all(isinstance(o, redis_errors.TimeoutError | redis_errors.ConnectionError) for o in outcomes)
    finally:
        await client.close()


async def test_cut_connection_fails_fast_and_the_next_call_reconnects(redis_server: RedisServer) -> None:
    proxy = await TcpProxy("127.0.0.1", redis_server.port).start()
    client = ScriptClient(f"redis://127.0.0.1:{proxy.port}/15", timeout_s=0.5)
    try:
        assert await client.run(ECHO, ["k"], [1]) == [1, 1]
        await proxy.cut()
        with pytest.raises(redis_errors.ConnectionError):
            await client.run(ECHO, ["k"], [1])
        proxy.restore()
        reply = await client.run(ECHO, ["k"], [1])
        assert reply[0] == 1  # type: ignore[index]
    finally:
        await client.close()
        await proxy.close()


async def test_server_restart_is_survived_by_the_next_call(redis_server: RedisServer) -> None:
    """A real outage of the private server: calls fail fast while it is down, work once it is back."""
    client = ScriptClient(redis_server.url(14), timeout_s=0.5)
    try:
        assert (await client.run(ECHO, ["k"], [1]))[0] == 1  # type: ignore[index]
        redis_server.stop()
        with pytest.raises(redis_errors.ConnectionError):
            await client.run(ECHO, ["k"], [1])
        redis_server.start()
        assert (await client.run(ECHO, ["k"], [4]))[0] == 4  # type: ignore[index]
    finally:
        await client.close()
