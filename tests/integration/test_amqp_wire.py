"""The lean confirm connection against the real RabbitMQ: what a confirm means, and every way one fails.

Each test works in the session's own vhost; what it declares beyond the contract topology it deletes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from shared.amqp import INGEST_EXCHANGE, INGEST_QUEUE
from shared.amqp_wire import ConfirmConnection, OutgoingMessage, WireError
from shared.publisher import EventPublisher
from tests.conftest import AMQP_HOST, AMQP_PORT
from tests.support.proxy import TcpProxy


@pytest.fixture
async def wire(amqp_url: str) -> AsyncIterator[ConfirmConnection]:
    connection = await ConfirmConnection.open(amqp_url, timeout=5)
    try:
        yield connection
    finally:
        await connection.close()


async def drain(amqp_url: str, queue_name: str = INGEST_QUEUE) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        out = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(message)
        return out


def publication(body: bytes, routing_key: str = "event.wire", **headers: int | str) -> OutgoingMessage:
    return OutgoingMessage(body, routing_key, uuid.uuid4().hex, headers)


async def test_confirmed_messages_are_in_the_queue_with_the_contract_properties(
    wire: ConfirmConnection, amqp_url: str
) -> None:
    small = publication(b'{"n":1}')
    big = publication(b"x" * 300_000, **{"x-event-count": 100})  # spans three body frames
    latencies = await asyncio.gather(*wire.publish_many(INGEST_EXCHANGE, [small, big]))
    assert all(seconds >= 0 for seconds in latencies)
    assert wire.unconfirmed == 0
    messages = {m.message_id: m for m in await drain(amqp_url)}
    assert set(messages) == {small.message_id, big.message_id}
    first, second = messages[small.message_id], messages[big.message_id]
    assert first.body == small.body and second.body == big.body
    assert first.routing_key == "event.wire"
    assert first.content_type == "application/json"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert second.headers["x-event-count"] == 100


async def test_unroutable_message_fails_and_its_neighbours_do_not(
    wire: ConfirmConnection, amqp_url: str
) -> None:
    routed, lost = publication(b"{}"), publication(b"{}", routing_key="nowhere.wire")
    ok, unroutable = wire.publish_many(INGEST_EXCHANGE, [routed, lost])
    assert await ok >= 0
    with pytest.raises(WireError, match="unroutable"):
        await unroutable
    assert [m.message_id for m in await drain(amqp_url)] == [routed.message_id]
    assert wire.is_open  # a returned message does not cost the connection


async def test_a_nack_fails_the_message(wire: ConfirmConnection, amqp_url: str) -> None:
    """A queue that refuses new messages makes the broker nack them."""
    exchange, queue = f"wire-full-{uuid.uuid4().hex[:8]}", f"wire-full-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, auto_delete=False)
        q = await channel.declare_queue(queue, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        await q.bind(ex)
        try:
            [refused] = wire.publish_many(exchange, [OutgoingMessage(b"{}", "", "m-1")])
            with pytest.raises(WireError, match="nacked"):
                await refused
        finally:
            await q.delete(if_unused=False, if_empty=False)
            await ex.delete()


async def test_an_unencodable_message_fails_alone_and_confirms_stay_matched(
    wire: ConfirmConnection, amqp_url: str
) -> None:
    """A routing key over 255 bytes cannot be sent: it must fail by itself and take no delivery tag,
    or every later ack and nack would be matched to the wrong message."""
    exchange, queue = f"wire-one-{uuid.uuid4().hex[:8]}", f"wire-one-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT)
        q = await channel.declare_queue(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        await q.bind(ex)
        try:
            too_long_key = "é" * 128  # 256 bytes of UTF-8
            good, bad = wire.publish_many(
                exchange, [OutgoingMessage(b"1", "", "m-good"), OutgoingMessage(b"2", too_long_key, "m-bad")]
            )
            with pytest.raises(WireError, match="unencodable"):
                await bad
            assert await good >= 0  # the queue now holds its one message
            [refused] = wire.publish_many(exchange, [OutgoingMessage(b"3", "", "m-full")])
            with pytest.raises(WireError, match="nacked"):
                await refused
            await q.purge()
            [accepted] = wire.publish_many(exchange, [OutgoingMessage(b"4", "", "m-after")])
            assert await accepted >= 0
            assert wire.unconfirmed == 0
        finally:
            await q.delete(if_unused=False, if_empty=False)
            await ex.delete()


async def test_broker_closing_the_channel_fails_what_is_in_flight(wire: ConfirmConnection) -> None:
    [doomed] = wire.publish_many(f"no-such-{uuid.uuid4().hex}", [OutgoingMessage(b"{}", "k", "m-2")])
    with pytest.raises(WireError, match="404"):
        await doomed
    await asyncio.wait_for(wire.wait_closed(), timeout=5)
    assert not wire.is_open
    with pytest.raises(WireError):
        wire.publish_many(INGEST_EXCHANGE, [publication(b"{}")])


async def test_cut_connection_fails_every_pending_confirm(amqp_url: str) -> None:
    proxy = await TcpProxy(AMQP_HOST, AMQP_PORT).start()
    vhost = amqp_url.rsplit("/", 1)[1]
    try:
        wire = await ConfirmConnection.open(f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}", timeout=5)
        proxy.enabled = False  # bytes stop flowing: no confirm can come back
        futures = wire.publish_many(INGEST_EXCHANGE, [publication(b"{}") for _ in range(20)])
        await proxy.cut()
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout=5)
        assert all(isinstance(o, WireError) for o in outcomes)
        await asyncio.wait_for(wire.wait_closed(), timeout=5)
    finally:
        await proxy.close()


async def test_a_broker_that_stops_reading_fails_publishes_fast_instead_of_buffering(amqp_url: str) -> None:
    proxy = await TcpProxy(AMQP_HOST, AMQP_PORT).start()
    vhost = amqp_url.rsplit("/", 1)[1]
    wire = await ConfirmConnection.open(f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}", timeout=5)
    try:
        proxy.stall()
        written: list[asyncio.Future[float]] = []
        refused = None
        for _ in range(200):  # at most 200 MiB: kernel buffers, then our 8 MiB, then refusal
            try:
                written += wire.publish_many(INGEST_EXCHANGE, [publication(b"x" * 1024 * 1024)])
            except WireError as exc:
                refused = exc
                break
            await asyncio.sleep(0.01)
        assert refused is not None and str(refused) == "broker_not_reading"
        assert wire.is_open  # the connection is kept: the broker may come back
        proxy.resume()  # it reads again: what was written is confirmed, new publishes work
        await asyncio.wait_for(asyncio.gather(*written), timeout=30)
        [later] = wire.publish_many(INGEST_EXCHANGE, [publication(b"{}")])
        assert await asyncio.wait_for(later, timeout=10) >= 0
    finally:
        await wire.close()
        await proxy.close()


async def test_bad_credentials_fail_to_open(amqp_url: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    with pytest.raises((WireError, OSError, TimeoutError)):
        await ConfirmConnection.open(f"amqp://guest:wrong@{AMQP_HOST}:{AMQP_PORT}/{vhost}", timeout=5)


async def test_publisher_reopens_its_connection_after_the_broker_closed_it(amqp_url: str) -> None:
    publisher = EventPublisher(amqp_url, timeout_ms=2000, exchange_name=f"no-such-{uuid.uuid4().hex}")
    await publisher.start()
    try:
        await asyncio.wait_for(publisher.connected.wait(), timeout=10)
        [failure] = await publisher.publish_many([OutgoingMessage(b"{}", "event.x", "m-3")])
        assert failure is not None and "404" in str(failure)

        async def reopened() -> None:
            while not publisher.is_ready:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(reopened(), timeout=10)
    finally:
        await publisher.close()
