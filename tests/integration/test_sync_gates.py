"""Every row of the SPEC §3 response table, each asserting the answer, the rows in Postgres and what
reached `ingest.events`."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from shared.idempotency import compute_key
from shared.months import seconds_until_next_month
from shared.settings import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import MakeSite
from tests.support.gateway import (
    drain_queue,
    early_in_a_key_bucket,
    gateway_client,
    gateway_via_broker_proxy,
    published_events,
    raw_request,
    wait_for_amqp,
)
from tests.support.gateway import (
    post_sync as post,
)
from tests.support.gateway import (
    sync_event as event,
)
from tests.support.proxy import TcpProxy

Client = TestClient[Any, Any]


async def rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM ingest_idempotency ORDER BY id")


async def rate_limit_used(redis_client: Any, site_id: uuid.UUID) -> int:
    """Units the site's rate-limit windows hold in Redis, all clients together."""
    return sum([int(await redis_client.get(key)) async for key in redis_client.scan_iter(f"rl:{site_id}:*")])


def assert_build_headers(headers: Any) -> None:
    assert headers["x-opsmantik-commit"] == "testsha"
    assert headers["x-opsmantik-branch"] == "testbranch"
    assert len(headers["x-request-id"]) == 32


async def test_accepted(gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str) -> None:
    site = await make_site(monthly_limit=10)
    sent = event(ec="c", ea="e", el="l", sid="sess-1", custom="kept")
    status, body, headers = await post(gateway, sent, **{"User-Agent": "tracker/1.0"})

    assert status == 200
    assert body["ok"] is True and body["status"] == "queued"
    assert headers["x-opsmantik-dedup"] == "0"
    assert headers["x-opsmantik-quota-remaining"] == "9"
    assert_build_headers(headers)
    [row] = await rows(db)
    assert row["billable"] is True and row["billing_state"] == "ACCEPTED"
    assert row["site_id"] == site.id and row["idempotency_version"] == 1
    assert (row["event_category"], row["event_action"], row["event_label"]) == ("c", "e", "l")
    assert row["expires_at"] - row["created_at"] == __import__("datetime").timedelta(days=90)
    messages = await drain_queue(amqp_url)
    assert len(messages) == 1
    message = messages[0]
    assert message.message_id == body["ingest_id"]
    assert message.routing_key == "event.site-a"
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    published = orjson.loads(message.body)
    assert published["custom"] == "kept" and published["url"] == sent["url"]
    assert published["ingest_id"] == body["ingest_id"]
    assert published["idempotency_key"] == row["idempotency_key"]
    assert published["site_id"] == str(site.id)
    assert published["ip"] == "127.0.0.1" and published["ua"] == "tracker/1.0"
    received = datetime.fromisoformat(published["received_at"].replace("Z", "+00:00"))
    assert received == row["created_at"]


async def test_accepted_as_overage(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(monthly_limit=1, soft=True, multiplier="2")
    await post(gateway, event())
    status, body, headers = await post(gateway, event())

    assert status == 200 and body["status"] == "queued" and body["overage"] is True
    assert headers["x-opsmantik-overage"] == "true"
    assert headers["x-opsmantik-quota-remaining"] == "0"
    states = [r["billing_state"] for r in await rows(db)]
    assert states == ["ACCEPTED", "OVERAGE"]
    assert len(await drain_queue(amqp_url)) == 2


async def test_duplicate_is_not_published_or_counted(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    site = await make_site(monthly_limit=10)
    sent = event(ec="c", ea="e")
    await early_in_a_key_bucket()
    first = await post(gateway, sent)
    status, body, headers = await post(gateway, sent)

    assert first[1]["status"] == "queued"
    assert status == 200 and body == {"ok": True, "status": "duplicate"}
    assert headers["x-opsmantik-dedup"] == "1"
    assert len(await rows(db)) == 1
    assert len(await drain_queue(amqp_url)) == 1
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "1"


async def test_rate_limited_leaves_no_row(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(rate_limit_per_minute=2)
    assert (await post(gateway, event()))[0] == 200
    assert (await post(gateway, event()))[0] == 200
    status, body, headers = await post(gateway, event())

    assert status == 429
    assert body == {"ok": False, "error": "rate_limited", "status": "rate_limited"}
    assert headers["x-opsmantik-ratelimit"] == "1"
    assert headers["x-opsmantik-error-code"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert len(await rows(db)) == 2
    assert len(await drain_queue(amqp_url)) == 2


async def test_rate_limit_uses_forwarded_for_only_from_trusted_proxies(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(rate_limit_per_minute=1)
    trusted = settings.with_overrides(
        trusted_proxies=__import__("shared.settings").settings.parse_networks("127.0.0.1")
    )
    async with gateway_client(trusted) as client:
        await wait_for_amqp(client)
        assert (await post(client, event(), **{"X-Forwarded-For": "203.0.113.7"}))[0] == 200
        # another client behind the same proxy has its own window
        assert (await post(client, event(), **{"X-Forwarded-For": "203.0.113.8"}))[0] == 200
        assert (await post(client, event(), **{"X-Forwarded-For": "203.0.113.7"}))[0] == 429
    messages = await drain_queue(amqp_url)
    assert sorted(e["ip"] for e in published_events(messages)) == ["203.0.113.7", "203.0.113.8"]


async def test_forwarded_for_is_ignored_from_untrusted_peers(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite
) -> None:
    await make_site(rate_limit_per_minute=1)
    assert (await post(gateway, event(), **{"X-Forwarded-For": "203.0.113.7"}))[0] == 200
    assert (await post(gateway, event(), **{"X-Forwarded-For": "203.0.113.8"}))[0] == 429


async def test_quota_rejected_keeps_a_non_billable_row_and_publishes_nothing(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(monthly_limit=1)
    await post(gateway, event())
    before = seconds_until_next_month()
    status, body, headers = await post(gateway, event())

    assert status == 429
    assert body == {"ok": False, "error": "rejected_quota", "status": "rejected_quota"}
    assert headers["x-opsmantik-quota-exceeded"] == "1"
    assert headers["x-opsmantik-quota-remaining"] == "0"
    assert before - 5 <= int(headers["Retry-After"]) <= before
    second = (await rows(db))[1]
    assert second["billable"] is False and second["billing_reason"] == "rejected_quota"
    assert len(await drain_queue(amqp_url)) == 1
    assert await db.fetchval("SELECT count(*) FROM ingest_fallback_buffer") == 0


async def test_non_billable_classes_skip_quota_and_are_published(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(monthly_limit=0)
    status, body, headers = await post(gateway, event(ec="system", ea="boot"))
    status2, body2, _ = await post(gateway, event(ec="interaction", ea="scroll_depth"))
    status3, _, _ = await post(gateway, event(ec="interaction", ea="click"))

    assert (status, status2, status3) == (200, 200, 429)
    assert body["status"] == "queued" and body["billable"] is False
    assert "x-opsmantik-quota-remaining" not in headers
    reasons = [(r["billable"], r["billing_reason"]) for r in await rows(db)]
    assert reasons == [(False, "system"), (False, "scroll_depth"), (False, "rejected_quota")]
    assert len(await drain_queue(amqp_url)) == 2


async def test_degraded_capture_when_broker_unreachable(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(monthly_limit=10)
    async with gateway_via_broker_proxy(settings) as (client, broker):
        await broker.cut()
        status, body, headers = await post(client, event())

    assert status == 200 and body["status"] == "degraded" and body["ingest_id"]
    assert headers["x-opsmantik-degraded"] == "broker_publish_failed"
    assert headers["x-opsmantik-fallback"] == "true"
    [row] = await rows(db)
    assert row["billing_state"] == "DEGRADED_CAPTURE" and row["billable"] is True
    [buffered] = await db.fetch("SELECT * FROM ingest_fallback_buffer")
    assert buffered["status"] == "PENDING" and buffered["idempotency_key"] == row["idempotency_key"]
    assert buffered["payload"]["ingest_id"] == body["ingest_id"]
    assert buffered["routing_key"] == "event.site-a"
    assert await drain_queue(amqp_url) == []


@pytest.mark.parametrize(
    ("header", "ua"),
    [
        (b"User-Agent: caf\xe9/1.0", "caf\u00e9/1.0"),  # Latin-1, as old clients send it
        (b"User-Agent: Mozilla\xff\xfe/5.0", "Mozilla\u00ff\u00fe/5.0"),  # not UTF-8 at all
        (b"User-Agent: caf\xc3\xa9/2.0", "caf\u00e9/2.0"),  # UTF-8
    ],
)
async def test_user_agent_bytes_that_are_not_utf8_are_captured(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, header: bytes, ua: str
) -> None:
    """Non-UTF-8 header bytes reach the handler as lone surrogates, which JSON cannot encode: the event
    was refused with 500 `billing_gate_closed` on every retry. The `ua` is read as ISO-8859-1."""
    await make_site(monthly_limit=10)
    assert gateway.server.port is not None
    status, body = await raw_request(gateway.server.port, "POST", "/api/sync", header, orjson.dumps(event()))
    assert (status, body["status"]) == (200, "queued")
    [published] = published_events(await drain_queue(amqp_url))
    assert published["ua"] == ua and published["ingest_id"] == body["ingest_id"]
    assert len(await rows(db)) == 1


async def test_a_degraded_batch_says_so_in_its_headers(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """SPEC §3's degraded row holds for a batch too: it lacked `x-opsmantik-degraded`."""
    await make_site(monthly_limit=10)
    async with gateway_via_broker_proxy(settings) as (client, broker):
        await broker.cut()
        status, body, headers = await post(client, {"events": [event(), event()]})
    assert status == 200 and [r["status"] for r in body["results"]] == ["degraded", "degraded"]
    assert headers["x-opsmantik-degraded"] == "broker_publish_failed"
    assert headers["x-opsmantik-fallback"] == "true"
    assert await db.fetchval("SELECT count(*) FROM ingest_fallback_buffer") == 2


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_cannot_be_decompressed_is_400(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, encoding: str
) -> None:
    """aiohttp raises while it inflates such a body; it was answered 500 `internal_error`."""
    await make_site()
    response = await gateway.post(
        "/api/sync", data=b"this is not " + encoding.encode(), headers={"Content-Encoding": encoding}
    )
    body = await response.json()
    assert response.status == 400 and body["error"] == "invalid_json" and "decoded" in body["detail"]
    assert len(await rows(db)) == 0


async def test_postgres_unreachable_closes_the_gate(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    from structlog.testing import capture_logs

    site = await make_site(monthly_limit=10)
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    database = settings.database_url.rsplit("/", 1)[1]
    proxied = settings.with_overrides(database_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}")
    try:
        async with gateway_client(proxied) as client:
            await wait_for_amqp(client)
            assert (await post(client, event()))[0] == 200  # site now cached
            await proxy.cut()
            with capture_logs() as logs:
                status, body, headers = await post(client, event())
            cold_status, cold_body, _ = await post(client, event(site="site-unknown-to-cache"))
            ready = await client.get("/readyz")
            assert ready.status == 503
    finally:
        await proxy.close()

    assert status == 500 and cold_status == 500
    assert body == {"ok": False, "error": "billing_gate_closed", "status": "billing_gate_closed"}
    assert headers["x-opsmantik-error-code"] == "billing_gate_closed"
    assert cold_body["error"] == "billing_gate_closed"
    [closed] = [line for line in logs if line["event"] == "BILLING_GATE_CLOSED"]
    assert closed["request_id"] == headers["x-request-id"]  # the operator can find the answer's line
    # SPEC §1.6: nothing published, nothing buffered, no counter touched.
    assert len(await rows(db)) == 1
    assert len(await drain_queue(amqp_url)) == 1  # only the event sent before the cut
    assert await db.fetchval("SELECT count(*) FROM ingest_fallback_buffer") == 0
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "1"
    # Nor the rate-limit window: the unit the refused request took is given back.
    assert await rate_limit_used(redis_client, site.id) == 1


async def test_broker_and_buffer_both_failing_is_503_with_no_row(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    site = await make_site(monthly_limit=10)
    # The buffer write really fails: a trigger refuses every insert into the buffer.
    await db.execute(
        """CREATE FUNCTION refuse_buffer() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'disk full'; END $$;
           CREATE TRIGGER refuse_buffer BEFORE INSERT ON ingest_fallback_buffer
           FOR EACH ROW EXECUTE FUNCTION refuse_buffer();"""
    )
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    vhost = amqp_url.rsplit("/", 1)[1]
    sent = event()
    try:
        async with gateway_client(
            settings.with_overrides(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
        ) as client:
            await wait_for_amqp(client)
            await post(client, event())  # one accepted event before the fault
            await proxy.cut()
            status, body, headers = await post(client, sent)
            assert status == 503
            assert body == {"ok": False, "error": "capture_failed", "status": "capture_failed"}
            assert int(headers["Retry-After"]) > 0
            assert len(await rows(db)) == 1
            month = datetime.now(UTC).strftime("%Y-%m")
            assert await redis_client.get(f"usage:{site.id}:{month}") == "1"  # reservation released
            assert await rate_limit_used(redis_client, site.id) == 1  # and its rate-limit unit given back

            # the retry is processed afresh, not taken for a duplicate
            await db.execute("DROP TRIGGER refuse_buffer ON ingest_fallback_buffer")
            proxy.restore()
            await wait_for_amqp(client, timeout_s=30)
            retry_status, retry_body, _ = await post(client, sent)
    finally:
        await proxy.close()
    assert retry_status == 200 and retry_body["status"] in ("queued", "degraded")
    assert len(await rows(db)) == 2


async def test_quota_from_postgres_when_redis_is_down(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(monthly_limit=2)
    redis = RedisServer().start()
    try:
        async with gateway_client(settings.with_overrides(redis_url=redis.url())) as client:
            await wait_for_amqp(client)
            assert (await post(client, event()))[0] == 200
            redis.stop()
            status, body, headers = await post(client, event())
            rejected_status, _, rejected_headers = await post(client, event())
    finally:
        redis.stop()
    assert status == 200 and body["status"] == "queued"
    assert headers["x-opsmantik-degraded"] == "quota_pg_conservative"
    assert headers["x-opsmantik-quota-remaining"] == "0"
    assert rejected_status == 429 and rejected_headers["x-opsmantik-quota-exceeded"] == "1"
    assert [r["billable"] for r in await rows(db)] == [True, True, False]
    assert len(await drain_queue(amqp_url)) == 2


async def test_bad_input_answers(gateway: Client, db: asyncpg.Connection, make_site: MakeSite) -> None:
    await make_site(origins=["https://shop.example"])
    cases: list[tuple[bytes | Any, dict[str, str], int, str]] = [
        (b"{not json", {}, 400, "invalid_json"),
        ([1, 2], {}, 400, "invalid_json"),
        ({"url": "https://x"}, {}, 400, "invalid_payload"),
        ({"s": "site-a"}, {}, 400, "invalid_payload"),
        ({"s": "site-a", "url": "https://x", "ec": 5}, {}, 400, "invalid_payload"),
        ({"s": "site-a", "url": "x" * 4097}, {}, 400, "invalid_payload"),
        ({"events": []}, {}, 400, "invalid_batch"),
        ({"events": [event(), event(site="other")]}, {}, 400, "invalid_batch"),
        ({"events": [event()] * 101}, {}, 400, "invalid_batch"),
        (event(site="nope"), {}, 400, "unknown_site"),
        (event(), {"Origin": "https://evil.example"}, 403, "origin_not_allowed"),
        (
            b"{" + b'"s":"site-a","url":"https://x","pad":"' + b"x" * (257 * 1024) + b'"}',
            {},
            413,
            "payload_too_large",
        ),
    ]
    for body, headers, expected_status, code in cases:
        status, answer, answer_headers = await post(gateway, body, **headers)
        assert (status, answer.get("error")) == (expected_status, code), (
            body if len(str(body)) < 200 else code
        )
        assert answer["ok"] is False
        assert answer.get("detail"), code  # every refusal says what to fix
        assert answer_headers["x-opsmantik-error-code"] == code
    assert await rows(db) == []
    allowed = await post(gateway, event(), Origin="https://shop.example")
    assert allowed[0] == 200


async def test_origins_compare_as_browsers_serialize_them(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite
) -> None:
    """An allow-list entry written with capitals, the default port or a trailing slash matched no
    browser `Origin` (always `scheme://host`, lower case): every browser event of the site was 403."""
    await make_site(origins=["https://Shop.Example:443/", "http://intranet.test:8080"])
    for origin in ("https://shop.example", "https://SHOP.example", "http://intranet.test:8080"):
        status, body, _ = await post(gateway, event(), Origin=origin)
        assert (status, body["status"]) == (200, "queued"), origin
    for origin in ("http://shop.example", "https://shop.example:8443", "http://intranet.test"):
        status, body, _ = await post(gateway, event(), Origin=origin)
        assert (status, body["error"]) == (403, "origin_not_allowed"), origin
    assert len(await rows(db)) == 3


async def test_a_plan_with_an_absurd_multiplier_still_takes_events(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite
) -> None:
    """A multiplier of 1E+5000 (the CLI now refuses it; SQL does not) made a hard cap with more than
    4,300 digits, which could not be sent to Redis: every event of the site answered 500."""
    await make_site(monthly_limit=2, soft=True, multiplier="1E+5000")
    answers = [await post(gateway, event()) for _ in range(3)]
    assert [(status, body["status"]) for status, body, _ in answers] == [(200, "queued")] * 3
    assert [r["billing_state"] for r in await rows(db)] == ["ACCEPTED", "ACCEPTED", "OVERAGE"]


async def test_method_not_allowed_and_cors_preflight(gateway: Client) -> None:
    for method in ("GET", "PUT", "PATCH", "DELETE", "HEAD", "TRACE"):
        response = await gateway.request(method, "/api/sync")
        assert response.status == 405, method
        assert response.headers["Allow"] == "POST, OPTIONS", method
        assert response.headers["x-opsmantik-error-code"] == "method_not_allowed", method
        if method != "HEAD":
            assert (await response.json())["error"] == "method_not_allowed"

    preflight = await gateway.options("/api/sync", headers={"Origin": "https://shop.example"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert preflight.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert preflight.headers["Access-Control-Allow-Headers"] == "Content-Type"
    assert preflight.headers["Access-Control-Max-Age"] == "86400"


async def test_a_page_may_read_the_answers_of_its_allowed_origin(
    gateway: Client, make_site: MakeSite
) -> None:
    """A tracker posting with fetch() must be able to read `duplicate`, 429 and Retry-After; an answer
    it cannot read looks like a network error, and a retry after the 5 s bucket is billed again."""
    await make_site(origins=["https://shop.example"], rate_limit_per_minute=2)
    shop = {"Origin": "https://shop.example"}
    same = event()
    await early_in_a_key_bucket()
    answers = [await post(gateway, same, **shop) for _ in range(2)]
    answers.append(await post(gateway, event(), **shop))  # the third event of the minute: rate limited
    answers.append(await post(gateway, b"{", **shop))  # bad input: the page may read why
    assert [(a[0], a[1].get("status", a[1].get("error"))) for a in answers] == [
        (200, "queued"), (200, "duplicate"), (429, "rate_limited"), (400, "invalid_json"),
    ]  # fmt: skip
    for _status, _body, headers in answers:
        assert headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert headers["Vary"] == "Origin"
        exposed = {h.strip().lower() for h in headers["Access-Control-Expose-Headers"].split(",")}
        assert {"x-opsmantik-dedup", "retry-after", "x-opsmantik-ratelimit", "x-request-id"} <= exposed
    refused_status, _, refused = await post(gateway, event(), Origin="https://evil.example")
    assert refused_status == 403 and "Access-Control-Allow-Origin" not in refused
    _, _, server_side = await post(gateway, event())  # no Origin: a server-side sender, no CORS headers
    assert "Access-Control-Allow-Origin" not in server_side


async def test_batch_results_in_order_with_in_batch_duplicate(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(monthly_limit=3)
    same = event(ec="c", ea="e")
    batch = {"events": [event(), same, same, {"s": "site-a"}, event(), event(), event(ec="system")]}
    status, body, _ = await post(gateway, batch)

    assert status == 200 and body["ok"] is True
    assert [r["status"] for r in body["results"]] == [
        "queued",
        "queued",
        "duplicate",
        "invalid",
        "queued",
        "rejected_quota",
        "queued",
    ]
    assert body["results"][3]["error"] == "invalid_payload"
    assert (body["accepted"], body["duplicates"], body["rejected"], body["invalid"]) == (4, 1, 1, 1)
    assert len(await rows(db)) == 5
    messages = await drain_queue(amqp_url)
    assert len(messages) == 1
    assert messages[0].headers["x-event-count"] == 4
    events = published_events(messages)
    assert [e["ingest_id"] for e in events] == [
        r["ingest_id"] for r in body["results"] if r["status"] == "queued"
    ]


async def test_batch_of_one_is_a_batch_message(gateway: Client, make_site: MakeSite, amqp_url: str) -> None:
    await make_site()
    status, body, _ = await post(gateway, {"events": [event()]})
    assert status == 200 and body["accepted"] == 1
    [message] = await drain_queue(amqp_url)
    assert message.headers["x-event-count"] == 1
    assert len(orjson.loads(message.body)["events"]) == 1


async def test_batch_without_accepted_events_publishes_nothing(
    gateway: Client, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site()
    status, body, _ = await post(gateway, {"events": [{"s": "site-a"}, {"s": "site-a", "url": 3}]})
    assert status == 200 and body["invalid"] == 2 and body["accepted"] == 0
    assert await drain_queue(amqp_url) == []


async def test_v2_keys_are_stored_with_their_version(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite
) -> None:
    site = await make_site()
    async with gateway_client(settings.with_overrides(idempotency_version=2)) as client:
        await wait_for_amqp(client)
        sent = event(ea="click", sid="s1", ts=1)
        before_ms = int(datetime.now(UTC).timestamp() * 1000)
        await post(client, sent)
        after_ms = int(datetime.now(UTC).timestamp() * 1000)
    [row] = await rows(db)
    assert row["idempotency_version"] == 2 and row["idempotency_key"].startswith("v2:")
    candidates = {compute_key(site.id, sent, ms, 2).key for ms in range(before_ms, after_ms + 1)}
    assert row["idempotency_key"] in candidates


async def test_overage_captured_degraded_still_counts_as_overage(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    from shared.db import create_pool
    from shared.reconciliation import reconcile_month

    site = await make_site(monthly_limit=1, soft=True, multiplier="3")
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    vhost = amqp_url.rsplit("/", 1)[1]
    try:
        proxied = settings.with_overrides(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
        async with gateway_client(proxied) as client:
            await wait_for_amqp(client)
            assert (await post(client, event()))[1]["status"] == "queued"
            await proxy.cut()
            status, body, headers = await post(client, event())
    finally:
        await proxy.close()
    assert status == 200 and body["status"] == "degraded" and body["overage"] is True
    assert headers["x-opsmantik-overage"] == "true"
    degraded = (await rows(db))[1]
    assert (degraded["billing_state"], degraded["billing_reason"]) == ("DEGRADED_CAPTURE", "overage")
    pool = await create_pool(settings.database_url)
    try:
        result = await reconcile_month(pool, redis_client, site.id, datetime.now(UTC).strftime("%Y-%m"))
    finally:
        await pool.close()
    assert (result.event_count, result.overage_count) == (2, 1)


async def test_nul_characters_are_bad_input_and_never_fail_other_requests(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site()
    poisoned = [
        {"s": "site-a", "url": "https://x", "ec": "a\u0000b"},
        {"s": "site-a\u0000", "url": "https://x"},
        {"s": "site-a", "url": "https://x", "meta": {"k\u0000": 1}},
    ]
    good = [event() for _ in range(30)]
    answers = await asyncio.gather(*(post(gateway, body) for body in poisoned + good))
    for status, body, _headers in answers[: len(poisoned)]:
        assert (status, body["error"]) == (400, "invalid_payload")
    assert all(a[0] == 200 and a[1]["status"] == "queued" for a in answers[len(poisoned) :])
    status, body, _ = await post(
        gateway, {"events": [event(), {"s": "site-a", "url": "https://y", "el": "\u0000"}]}
    )
    assert status == 200 and [r["status"] for r in body["results"]] == ["queued", "invalid"]
    assert len(await rows(db)) == 31
    assert len(published_events(await drain_queue(amqp_url))) == 31


async def test_an_event_nested_too_deep_is_bad_input_and_never_fails_other_requests(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    """600 bytes of nested arrays once passed the shape gate, then failed when its message was built:
    500 for every request of its capture group, and their quota reservations were never given back."""
    site = await make_site(monthly_limit=100)
    deep = b'{"s":"site-a","url":"https://x","x":' + b"[" * 300 + b"]" * 300 + b"}"
    good = [event() for _ in range(20)]
    answers = await asyncio.gather(*(post(gateway, body) for body in [deep, *good, deep]))
    for status, body, _headers in (answers[0], answers[-1]):
        assert (status, body["error"]) == (400, "invalid_payload") and "deep" in body["detail"]
    assert all(a[0] == 200 and a[1]["status"] == "queued" for a in answers[1:-1]), answers
    status, body, _ = await post(gateway, b'{"events":[' + orjson.dumps(event()) + b"," + deep + b"]}")
    assert status == 200 and [r["status"] for r in body["results"]] == ["queued", "invalid"]
    assert len(await rows(db)) == 21
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "21"
    assert len(published_events(await drain_queue(amqp_url))) == 21


async def test_a_request_that_fails_its_capture_for_any_reason_never_fails_its_group(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any,
    monkeypatch: Any,
) -> None:
    """Defence in depth behind the shape gate: when building one request's message fails in a way no
    check foresaw, its group is retried request by request and its reservations are given back."""
    from shared.ingest import IngestPipeline

    site = await make_site(monthly_limit=100)
    build = IngestPipeline._message  # noqa: SLF001 - the fault is injected where it struck

    def failing_message(self: IngestPipeline, request: Any, rows: Any) -> Any:
        if any("poison" in row.item.event["url"] for row in rows):
            raise TypeError("Recursion limit reached")
        return build(self, request, rows)

    monkeypatch.setattr(IngestPipeline, "_message", failing_message)
    good = [event() for _ in range(20)]
    answers = await asyncio.gather(
        *(post(gateway, body) for body in [*good[:10], event(url="https://poison"), *good[10:]])
    )
    assert (answers[10][0], answers[10][1]["error"]) == (500, "billing_gate_closed")
    assert all(a[0] == 200 and a[1]["status"] == "queued" for a in answers[:10] + answers[11:]), answers
    assert len(await rows(db)) == 20
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "20"
    assert len(published_events(await drain_queue(amqp_url))) == 20


async def test_repeats_of_an_uncaptured_event_are_never_answered_duplicate(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """Concurrent copies of one event share a capture group; when broker and buffer both fail the first
    copy's row is removed, so the copies must fail too (503), not claim a capture as `duplicate`."""
    await make_site()
    await db.execute(
        """CREATE FUNCTION refuse_buffer() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'disk full'; END $$;
           CREATE TRIGGER refuse_buffer BEFORE INSERT ON ingest_fallback_buffer
           FOR EACH ROW EXECUTE FUNCTION refuse_buffer();"""
    )
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    vhost = amqp_url.rsplit("/", 1)[1]
    same = event(ec="c", ea="e")
    try:
        proxied = settings.with_overrides(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
        async with gateway_client(proxied) as client:
            await wait_for_amqp(client)
            await proxy.cut()
            answers = await asyncio.gather(*(post(client, same) for _ in range(12)))
    finally:
        await proxy.close()
    assert [a[0] for a in answers] == [503] * 12, [a[1] for a in answers]
    assert await rows(db) == []


async def test_a_batch_repeating_an_uncaptured_event_leaves_none_of_its_rows(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any,
    monkeypatch: Any,
) -> None:
    """One capture group: request A is event X alone, batch B is [X, Y]. The broker confirms B's message
    but not A's, and the buffer refuses A's row. B's X is a repeat of A's X, which is removed, so B must
    answer 503 and leave no row: before, Y stayed billed under B's 503 and B's retry billed Y again."""
    from services.gateway.sync import SYNC_GATE
    from shared.idempotency import compute_key
    from shared.ingest import CaptureEvent, CaptureRequest, EventStatus
    from shared.publisher import EventPublisher, OutgoingMessage, PublishFailed

    site_row = await make_site(monthly_limit=10)
    await db.execute(
        """CREATE FUNCTION refuse_buffer() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'disk full'; END $$;
           CREATE TRIGGER refuse_buffer BEFORE INSERT ON ingest_fallback_buffer
           FOR EACH ROW EXECUTE FUNCTION refuse_buffer();"""
    )
    confirm = EventPublisher.publish_many

    async def unconfirmed_singles(
        self: EventPublisher, messages: list[OutgoingMessage]
    ) -> list[PublishFailed | None]:
        """The broker really confirms the batch message; the single-event message is reported lost."""
        outcomes = await confirm(self, [m for m in messages if m.headers])
        confirmed = iter(outcomes)
        return [next(confirmed) if m.headers else PublishFailed("confirm_timeout") for m in messages]

    monkeypatch.setattr(EventPublisher, "publish_many", unconfirmed_singles)
    async with gateway_client(settings) as client:
        await wait_for_amqp(client)
        gate = client.app[SYNC_GATE]
        site = await gate.sites.get("site-a")
        now = datetime.now(UTC)
        server_ms = int(now.timestamp() * 1000)

        def capture_event(body: dict[str, Any]) -> CaptureEvent:
            return CaptureEvent(body, compute_key(site.id, body, server_ms), now, billing_reason=None)

        x, y = event(ec="c", ea="e"), event()
        a = CaptureRequest(site, [capture_event(x)], is_batch=False, client_ip="1.2.3.4", user_agent="t")
        b = CaptureRequest(
            site, [capture_event(x), capture_event(y)], is_batch=True, client_ip="1.2.3.4", user_agent="t"
        )
        results = await gate.pipeline._capture_group([a, b])  # noqa: SLF001 - one group, by construction
    assert all(not isinstance(r, Exception) for r in results), results
    statuses = [[e.status for e in r.events] for r in results]  # type: ignore[union-attr]
    assert statuses == [[EventStatus.CAPTURE_FAILED], [EventStatus.CAPTURE_FAILED] * 2]
    assert await rows(db) == []  # a 503 leaves no row: B's retry is processed afresh
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site_row.id}:{month}") == "0"  # every reservation given back


async def test_a_site_without_a_plan_row_gets_the_default_plan(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """SPEC §5: no `site_plans` row → `DEFAULT_MONTHLY_LIMIT`, soft limit off."""
    await make_site(monthly_limit=None)
    assert await db.fetchval("SELECT count(*) FROM site_plans") == 0
    async with gateway_client(settings.with_overrides(default_monthly_limit=2)) as client:
        await wait_for_amqp(client)
        answers = [await post(client, event()) for _ in range(3)]
    assert [(a[0], a[1]["status"]) for a in answers] == [
        (200, "queued"), (200, "queued"), (429, "rejected_quota")
    ]
    assert answers[1][2]["x-opsmantik-quota-remaining"] == "0"
    assert [r["billable"] for r in await rows(db)] == [True, True, False]
    assert len(await drain_queue(amqp_url)) == 2


async def test_a_site_without_its_own_rate_limit_gets_the_default(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """SPEC §3 gate 3: `RATE_LIMIT_PER_MINUTE` applies unless the site overrides it."""
    await make_site(monthly_limit=100)
    async with gateway_client(settings.with_overrides(rate_limit_per_minute=2)) as client:
        await wait_for_amqp(client)
        answers = [await post(client, event()) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 429]
    assert answers[2][1]["error"] == "rate_limited"
    assert len(await rows(db)) == 2


async def test_a_refused_batch_consumes_no_rate_limit_units(
    gateway: Client, db: asyncpg.Connection, make_site: MakeSite, redis_client: Any
) -> None:
    """SPEC §3 batches: N units at once, all or none; a refused batch leaves the window as it was."""
    site = await make_site(monthly_limit=100, rate_limit_per_minute=3)
    first = await post(gateway, {"events": [event(), event()]})
    refused = await post(gateway, {"events": [event(), event()]})
    single = await post(gateway, event())
    over = await post(gateway, event())

    assert first[0] == 200 and first[1]["accepted"] == 2
    assert refused[0] == 429 and refused[1]["error"] == "rate_limited"
    assert single[0] == 200 and single[1]["status"] == "queued"  # the unit the batch did not take
    assert over[0] == 429
    assert await rate_limit_used(redis_client, site.id) == 3
    assert len(await rows(db)) == 3


async def test_an_unknown_site_is_cached_negatively_then_found(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """SPEC §3 auth: sites are cached in process, negatively too; a site created meanwhile is found
    once the negative entry expires (`SITE_CACHE_TTL_S`, at most 5 s for an unknown id)."""
    async with gateway_client(settings.with_overrides(site_cache_ttl_s=2.0)) as client:
        await wait_for_amqp(client)
        unknown = await post(client, event())
        await make_site(monthly_limit=10)
        cached = await post(client, event())
        deadline = time.monotonic() + 10
        while (found := await post(client, event()))[0] != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    assert unknown[1]["error"] == "unknown_site"
    assert cached[0] == 400 and cached[1]["error"] == "unknown_site"  # the negative entry stands
    assert found[0] == 200 and found[1]["status"] == "queued"
    assert len(await rows(db)) == 1
