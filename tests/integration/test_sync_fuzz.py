"""Bad input never yields a 5xx or a row: random JSON, random bytes, huge strings, deep nesting and
wrong types thrown at a running gateway process."""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.settings import Settings
from tests.conftest import free_port, settings_env
from tests.integration.conftest import MakeSite
from tests.support.gateway import GatewayProcesses

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=30,
)
field_values = (
    json_values | st.text(min_size=4000, max_size=5000) | st.just("site-a") | st.just("https://example.com/")
)
eventish = st.fixed_dictionaries(
    {},
    optional={
        "s": st.sampled_from(["site-a", "", "nope", "x" * 129]) | field_values,
        "url": field_values,
        "u": field_values,
        "ec": field_values,
        "ea": st.sampled_from(["heartbeat", "click", "page_view"]) | field_values,
        "el": field_values,
        "ev": field_values,
        "sid": field_values,
        "meta": json_values | st.fixed_dictionaries({"fp": field_values}),
        "ts": field_values,
    },
)


def encode(value: Any) -> bytes:
    """stdlib json: it writes integers beyond 64 bits too, which the gateway must refuse cleanly."""
    return json.dumps(value).encode()


def deep(depth: int) -> bytes:
    return b'{"s":"site-a","url":"https://x","meta":' + b"[" * depth + b"]" * depth + b"}"


bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(encode),
    eventish.map(encode),
    st.lists(eventish, max_size=120).map(lambda events: encode({"events": events})),
    st.integers(min_value=10, max_value=5000).map(deep),
    st.just(b'{"s":"site-a","url":"' + b"a" * (300 * 1024) + b'"}'),
)


@pytest.fixture
async def gateway_process(settings: Settings, make_site: MakeSite) -> AsyncIterator[GatewayProcesses]:
    await make_site(monthly_limit=1_000_000, rate_limit_per_minute=1_000_000)
    gateway = await GatewayProcesses(settings_env(settings), free_port(), workers=1).start()
    yield gateway
    assert gateway.stop() == 0


def test_bad_input_never_5xx_and_rows_only_for_accepted_events(
    gateway_process: GatewayProcesses, database_url: str
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", gateway_process.port, timeout=10)
    expected_rows = 0

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def throw(body: bytes) -> None:
        nonlocal expected_rows
        connection.request("POST", "/api/sync", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        assert response.status < 500, (response.status, raw[:300])
        answer: dict[str, Any] = orjson.loads(raw)
        if response.status != 200:
            assert answer["ok"] is False and response.getheader("x-opsmantik-error-code") == answer["error"]
        elif "results" in answer:
            expected_rows += answer["accepted"] + answer["rejected"]
        elif answer["status"] == "queued":
            expected_rows += 1

    throw()
    connection.close()

    import asyncio

    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM ingest_idempotency"))
        finally:
            await conn.close()

    loop = asyncio.new_event_loop()  # closed: an unclosed loop leaks its self-pipe into the next test
    try:
        assert loop.run_until_complete(count()) == expected_rows
    finally:
        loop.close()
