"""RPC over AMQP for the fleet's commands (SPEC §2).

A cron/admin endpoint publishes `{name, args, request_id}` to the `billing.commands` exchange with the
worker's queue as routing key (persistent, confirmed, `reply_to` + `correlation_id`) and waits for the
reply a bounded time (`CommandClient`). A worker consumes its queue with `CommandConsumer`: one handler
per command name, the reply sent to `reply_to`, and the message acked only after the work (and the
reply) are done, so a crash mid-command never loses it.

Outcomes are typed: a handler returns a JSON object (the reply, `ok: true` added when missing), raises
`CommandRejected` for a request that will never succeed (reply `{ok: false, error, status: 400}`,
acked), and any other exception is a failure: the message is requeued, and the quorum queue's
`x-delivery-limit` dead-letters it after bounded redeliveries (a reply `{ok: false, error:
"command_failed", status: 500}` is sent on the last delivery, so the caller is not left waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from shared.amqp import (
    COMMAND_DELIVERY_LIMIT,
    COMMANDS_EXCHANGE,
    connect_robust,
    declare_topology,
    reconnect_delays,
)
from shared.logging import get_logger

log = get_logger("commands")

JsonObject = dict[str, Any]


class CommandError(Exception):
    """Base of the command outcomes a caller can see."""


class CommandTimeout(CommandError):
    """No reply within the timeout; the command stays queued and is still executed later."""


class CommandUnavailable(CommandError):
    """The broker is unreachable, so the command could not be queued at all."""


class CommandRejected(CommandError):
    """A handler's verdict that the request is invalid: replied as `{ok: false, error, status}`, acked."""

    def __init__(self, error: str, *, status: int = 400, **details: Any) -> None:
        super().__init__(error)
        self.error = error
        self.status = status
        self.details = details

    def reply(self) -> JsonObject:
        return {"ok": False, "error": self.error, "status": self.status, **self.details}


def reply_http_status(reply: Mapping[str, Any]) -> int:
    """The HTTP status an endpoint should answer a reply with: 200 when ok, else its `status` (500)."""
    if reply.get("ok") is True:
        return 200
    status = reply.get("status")
    return status if isinstance(status, int) and 400 <= status <= 599 else 500


def encode_command(name: str, args: Mapping[str, Any], request_id: str) -> bytes:
    return orjson.dumps({"name": name, "args": dict(args), "request_id": request_id})


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """One decoded command as a handler sees it."""

    name: str
    args: Mapping[str, Any]
    request_id: str
    redelivered: bool = False
    delivery_count: int = 0
    message_id: str | None = None


class _HandlerFailed(Exception):
    """A handler raised something unexpected (already logged); the message goes back to the queue."""


class MalformedCommand(ValueError):
    """The message is not a `{name, args, request_id}` JSON object."""


def decode_command(
    body: bytes, *, redelivered: bool = False, delivery_count: int = 0, message_id: str | None = None
) -> CommandRequest:
    """Parse `{name, args, request_id}`; MalformedCommand when the body cannot be a command."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedCommand("body is not JSON") from exc
    if not isinstance(data, dict):
        raise MalformedCommand("body is not a JSON object")
    name, args, request_id = data.get("name"), data.get("args", {}), data.get("request_id")
    if not isinstance(name, str) or not name:
        raise MalformedCommand("command has no name")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise MalformedCommand("command args is not an object")
    if not isinstance(request_id, str) or not request_id:
        request_id = uuid.uuid4().hex
    return CommandRequest(
        name=name,
        args=args,
        request_id=request_id,
        redelivered=redelivered,
        delivery_count=delivery_count,
        message_id=message_id,
    )


# --------------------------------------------------------------------------------------------- client


class CommandClient:
    """Publishes commands and awaits their replies (gateway side).

    Connects in the background (the gateway starts while the broker is down); one exclusive,
    auto-delete reply queue per client, replies matched to callers by `correlation_id`.
    """

    def __init__(self, amqp_url: str, *, timeout_s: float, connect_timeout_s: float = 3.0) -> None:
        self._url = amqp_url
        self.timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._reply_queue: AbstractQueue | None = None
        self._reply_queue_name = f"billing.commands.reply.{uuid.uuid4().hex}"
        self._pending: dict[str, asyncio.Future[JsonObject]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()

    async def start(self) -> None:
        """Begin connecting in the background; returns immediately."""
        self._task = asyncio.create_task(self._connect_forever(), name="command-client-connect")

    async def _connect_forever(self) -> None:
        delays = reconnect_delays()
        while not self._closing:
            try:
                await self._connect()
                self.connected.set()
                log.info("command_client_connected", reply_queue=self._reply_queue_name)
                return
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("command_client_connect_failed", error=str(exc) or type(exc).__name__)
                await self._discard_connection()
                await asyncio.sleep(next(delays))

    async def _connect(self) -> None:
        connection = await connect_robust(self._url, timeout=self._connect_timeout_s)
        self._connection = connection
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_topology(channel)
        # A fixed client-chosen name, so a robust reconnect re-declares the same queue (reply_to stays valid).
        reply_queue = await channel.declare_queue(self._reply_queue_name, exclusive=True, auto_delete=True)
        await reply_queue.consume(self._on_reply, no_ack=True)
        self._exchange = await channel.get_exchange(COMMANDS_EXCHANGE)
        self._channel, self._reply_queue = channel, reply_queue

    async def _discard_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = self._reply_queue = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    @property
    def is_ready(self) -> bool:
        channel = self._channel
        return self._exchange is not None and channel is not None and not channel.is_closed

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is None or future.done():
            # A reply after its caller gave up (504) - the command ran; nothing waits for the answer.
            log.info("command_reply_unclaimed", correlation_id=message.correlation_id)
            return
        try:
            reply = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            reply = {"ok": False, "error": "malformed_reply", "status": 502}
        if not isinstance(reply, dict):
            reply = {"ok": False, "error": "malformed_reply", "status": 502}
        future.set_result(reply)

    async def call(
        self,
        queue: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        request_id: str,
        timeout_s: float | None = None,
    ) -> JsonObject:
        """Queue command `name` for the worker consuming `queue` and return its reply.

        Raises CommandUnavailable when the broker does not take the command (nothing queued) and
        CommandTimeout when no reply arrives in time (the command stays queued).
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not self.is_ready:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.connected.wait(), timeout=min(timeout, 2.0))
        exchange = self._exchange
        if exchange is None or not self.is_ready:
            raise CommandUnavailable("broker_unavailable")
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            try:
                await asyncio.wait_for(
                    exchange.publish(
                        aio_pika.Message(
                            encode_command(name, args or {}, request_id),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            correlation_id=correlation_id,
                            reply_to=self._reply_queue_name,
                            message_id=request_id,
                            headers={"x-command": name},
                        ),
                        routing_key=queue,
                        mandatory=True,
                    ),
                    timeout=min(timeout, 5.0),
                )
            except (TimeoutError, aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
                raise CommandUnavailable(type(exc).__name__) from exc
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=timeout)
            except TimeoutError as exc:
                raise CommandTimeout(f"no reply to {name!r} within {timeout:g}s") from exc
        finally:
            self._pending.pop(correlation_id, None)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        await self._discard_connection()


# --------------------------------------------------------------------------------------------- worker

CommandHandler = Callable[[CommandRequest], Awaitable[JsonObject]]


@dataclass(slots=True)
class CommandConsumer:
    """Consumes one command queue: a handler per command name, ack after the work, reply to `reply_to`.

    `start(channel)` begins consuming (at most `prefetch` commands at once); `stop(drain_timeout_s)`
    cancels the consumer tag, lets in-flight commands finish within the bound, and cancels the rest,
    whose messages are returned unacked (redelivered to another worker).
    """

    queue_name: str
    handlers: dict[str, CommandHandler] = field(default_factory=dict)
    prefetch: int = 1
    delivery_limit: int = COMMAND_DELIVERY_LIMIT
    # Errors of an unreachable dependency: the handler is run again in place, with backoff, for up to
    # `transient_retry_s`, instead of returning the message at once (each return is a delivery, and
    # the queue dead-letters a good command after x-delivery-limit of them within milliseconds).
    transient_errors: tuple[type[BaseException], ...] = ()
    transient_retry_s: float = 300.0
    _queue: AbstractQueue | None = None
    _channel: AbstractChannel | None = None
    _consumer_tag: str | None = None
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)
    _stopping: bool = False

    def add(self, name: str, handler: CommandHandler) -> None:
        if name in self.handlers:
            raise ValueError(f"command {name!r} already has a handler")
        self.handlers[name] = handler

    async def start(self, channel: AbstractChannel) -> None:
        self._channel = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        self._queue = await channel.get_queue(self.queue_name, ensure=True)
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("command_consumer_started", queue=self.queue_name, commands=sorted(self.handlers))

    @property
    def consuming(self) -> bool:
        channel = self._channel
        return self._consumer_tag is not None and channel is not None and not channel.is_closed

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await self.process(message)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def process(self, message: AbstractIncomingMessage) -> None:
        """Run one delivery to its end: reply, then ack; or requeue / dead-letter."""
        delivery_count = _delivery_count(message)
        try:
            request = decode_command(
                message.body,
                redelivered=bool(message.redelivered),
                delivery_count=delivery_count,
                message_id=message.message_id,
            )
        except MalformedCommand as exc:
            log.error("command_malformed", queue=self.queue_name, error=str(exc))
            await self._reply(message, {"ok": False, "error": "malformed_command", "status": 400})
            await _settle(message.reject(requeue=False))  # straight to the dead-letter exchange
            return
        bound = log.bind(command=request.name, request_id=request.request_id, queue=self.queue_name)
        try:
            await self._run_handler(message, request, bound)
        except _HandlerFailed:
            return  # logged, and the message was returned to the queue
        except (aio_pika.exceptions.AMQPError, RuntimeError, OSError) as exc:
            # Ack or reject on a channel that closed meanwhile: the broker redelivers the message.
            bound.warning("command_settle_failed", error=str(exc) or type(exc).__name__)

    async def _run_handler(
        self, message: AbstractIncomingMessage, request: CommandRequest, bound: Any
    ) -> None:
        # requeue=True: an unexpected failure (or a cancellation at shutdown) returns the message; the
        # quorum queue counts deliveries and dead-letters it past x-delivery-limit.
        # Every line the handler logs (jobs included) carries the command's request_id (SPEC §11).
        with structlog.contextvars.bound_contextvars(request_id=request.request_id):
            await self._run_in_context(message, request, bound)

    async def _run_in_context(
        self, message: AbstractIncomingMessage, request: CommandRequest, bound: Any
    ) -> None:
        async with message.process(requeue=True, ignore_processed=True):
            handler = self.handlers.get(request.name)
            if handler is None:
                bound.warning("command_unknown")
                await self._reply(message, CommandRejected("unknown_command", command=request.name).reply())
                return
            try:
                reply = await self._call(handler, request, bound)
            except CommandRejected as exc:
                bound.info("command_rejected", error=exc.error)
                await self._reply(message, exc.reply())
                return
            except asyncio.CancelledError:
                bound.warning("command_cancelled_unfinished")
                raise
            except Exception as exc:
                # The quorum queue dead-letters once the delivery count exceeds x-delivery-limit, so
                # this delivery (count == limit) is the last one anyone will see.
                last = request.delivery_count >= self.delivery_limit
                bound.exception(
                    "command_failed", delivery_count=request.delivery_count, will_dead_letter=last
                )
                if last:
                    await self._reply(
                        message, {"ok": False, "error": "command_failed", "status": 500, "detail": str(exc)}
                    )
                raise _HandlerFailed from exc
            reply.setdefault("ok", True)
            await self._reply(message, reply)
            bound.info("command_done", ok=reply.get("ok"))

    async def _call(self, handler: CommandHandler, request: CommandRequest, bound: Any) -> JsonObject:
        """The handler's reply; a dependency outage is waited out (backoff) up to `transient_retry_s`,
        unless the consumer is stopping, then it counts as a failure of this delivery."""
        deadline = time.monotonic() + self.transient_retry_s
        delays = reconnect_delays()
        while True:
            try:
                return await handler(request)
            except self.transient_errors as exc:
                delay = next(delays)
                if self._stopping or time.monotonic() + delay > deadline:
                    raise
                bound.warning(
                    "command_dependency_unavailable", error=str(exc) or type(exc).__name__, retry_in_s=delay
                )
                await asyncio.sleep(delay)

    async def _reply(self, message: AbstractIncomingMessage, reply: JsonObject) -> None:
        channel = self._channel
        if not message.reply_to or channel is None:
            return
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(reply),
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                ),
                routing_key=message.reply_to,
            )
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
            # The caller will time out (504); the work itself is done and will still be acked.
            log.warning("command_reply_failed", error=str(exc) or type(exc).__name__)

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop consuming, wait for in-flight commands up to the bound, cancel the rest."""
        self._stopping = True
        queue, tag = self._queue, self._consumer_tag
        self._consumer_tag = None
        if queue is not None and tag is not None:
            try:
                await asyncio.wait_for(queue.cancel(tag), timeout=5)
            except (TimeoutError, aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
                log.warning("command_consumer_cancel_failed", error=str(exc) or type(exc).__name__)
        pending = set(self._in_flight)
        if pending:
            _, still = await asyncio.wait(pending, timeout=drain_timeout_s)
            if still:
                log.warning("command_drain_timeout", unfinished=len(still), queue=self.queue_name)
                for task in still:
                    task.cancel()
                await asyncio.wait(still, timeout=5)

    async def drain_once(self, channel: AbstractChannel) -> int:
        """Process every command queued now, one by one, then return how many (burst mode)."""
        self._channel = channel
        queue = await channel.get_queue(self.queue_name, ensure=True)
        handled = 0
        while True:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                return handled
            await self.process(message)
            handled += 1


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """Previous deliveries of this message (quorum queues set `x-delivery-count` on redelivery)."""
    raw = (message.headers or {}).get("x-delivery-count", 0)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


async def _settle(action: Awaitable[None]) -> None:
    try:
        await action
    except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
        # The channel is gone: the broker returns the unacked message to the queue by itself.
        log.warning("command_settle_failed", error=str(exc) or type(exc).__name__)
