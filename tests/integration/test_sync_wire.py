"""What arrives on the wire at `/api/sync`: content codings, a byte-order mark, a client that leaves
mid-body. Each either captures the event once or answers a JSON 4xx with its code (never a bare 400 from
the HTTP layer, never a 500)."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.conftest import CRON_SECRET, settings_env
from tests.integration.conftest import MakeSite
from tests.support.gateway import drain_queue, sync_event
from tests.support.gateway import post_sync as post_raw
from tests.support.gateway_process import GatewayProcess

Client = TestClient[Any, Any]


def event() -> bytes:
    return orjson.dumps(sync_event())



@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("x-gzip", gzip.compress),
        ("gzip, gzip", lambda body: gzip.compress(gzip.compress(body))),
        ("identity, gzip", gzip.compress),
    ],
)
async def test_every_spelling_of_gzip_is_captured(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, encoding: str, encode: Any
) -> None:
    """aiohttp undid one `gzip` only: these were 400 invalid_json ("surrogates not allowed")."""
    await make_site()
    status, body, _ = await post_raw(gateway, encode(event()), **{"Content-Encoding": encoding})
    assert (status, body["status"]) == (200, "queued"), body
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 1
    assert len(await drain_queue(amqp_url)) == 1


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "foo"])
async def test_an_unsupported_coding_is_a_json_400_with_its_code(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, encoding: str
) -> None:
    """`br`/`zstd` were refused by aiohttp's parser with a plain-text 400 and no error code; an unknown
    coding was taken for identity."""
    await make_site()
    status, body, headers = await post_raw(gateway, event(), **{"Content-Encoding": encoding})
    assert status == 400 and body["ok"] is False and body["error"] == "invalid_json"
    assert headers["x-opsmantik-error-code"] == "invalid_json"
    assert f"{encoding!r} is not supported" in body["detail"]
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 0


async def test_a_gzip_bomb_is_413_once_decoded(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite
) -> None:
    await make_site()
    bomb = gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", compresslevel=9)
    status, body, _ = await post_raw(gateway, bomb, **{"Content-Encoding": "gzip"})
    assert (status, body["error"]) == (413, "payload_too_large")
    assert body["detail"] == "body is larger than 262144 bytes once decoded"
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 0


async def test_a_byte_order_mark_is_ignored(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """RFC 8259 §8.1: a parser may ignore a leading UTF-8 BOM; .NET and PowerShell senders write one."""
    await make_site()
    status, body, _ = await post_raw(gateway, b"\xef\xbb\xbf" + event())
    assert (status, body["status"]) == (200, "queued"), body
    assert len(await drain_queue(amqp_url)) == 1


async def test_other_methods_on_sync_are_405_with_a_detail(gateway: Client) -> None:
    response = await gateway.request("PUT", "/api/sync", data=event())
    body = await response.json()
    assert response.status == 405 and response.headers["Allow"] == "POST, OPTIONS"
    assert body == {"ok": False, "error": "method_not_allowed", "detail": "Method Not Allowed"}


async def test_a_client_gone_mid_body_is_logged_as_499_not_as_a_server_error(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, tmp_path: Path
) -> None:
    """A real `revkernel gateway` (its handlers run on after a disconnect, unlike the test server's):
    reading the rest of the body fails. That was an `unhandled_error` with a traceback and a 500 in the
    latency histogram for every beacon a page unload cut off."""
    await make_site()
    gateway = GatewayProcess(settings_env(settings), tmp_path / "gateway.log")
    await gateway.start()
    try:
        for close in ("reset", "fin"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"POST /api/sync HTTP/1.1\r\nHost: t\r\nContent-Length: 77\r\n\r\n" + event()[:40])
            await writer.drain()
            await asyncio.sleep(0.3)  # the handler is reading the body
            if close == "reset":
                writer.transport.abort()
            else:
                writer.close()
                await writer.wait_closed()
        await asyncio.sleep(0.3)
    finally:
        assert await gateway.stop() == 0
    log = (tmp_path / "gateway.log").read_text().splitlines()
    lines = [json.loads(line) for line in log if line[:1] == "{"]
    assert not [line for line in lines if line.get("level") == "error"], lines
    requests = [line for line in lines if line.get("path") == "/api/sync"]
    assert [line["status"] for line in requests] == [499, 499]
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 0


async def test_repeated_content_encoding_lines_are_one_list(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """RFC 9110 §5.3: two `Content-Encoding: gzip` lines mean `gzip, gzip`; only the first was read."""
    await make_site()
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    body = gzip.compress(gzip.compress(event()))
    writer.write(
        b"POST /api/sync HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Encoding: gzip\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert orjson.loads(payload)["status"] == "queued"
    assert len(await drain_queue(amqp_url)) == 1


async def test_a_cron_body_split_across_segments_is_read_whole(gateway: Client) -> None:
    """`content.read(n)` returned what had arrived: the first segment alone, then 400 invalid_json."""
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    body = b'{"year_month": "2020-13"}'
    writer.write(
        b"POST /api/cron/invoice-freeze HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        + f"Authorization: Bearer {CRON_SECRET}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is waiting for the rest
    writer.write(body[10:])
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    payload = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert payload["error"] == "invalid_year_month", payload  # the whole body was read and judged

