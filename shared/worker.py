"""The worker process runtime shared by the reconciler and the freezer.

A `Worker` owns the clients (asyncpg pool, Redis, a robust AMQP connection), one command consumer
(`shared.commands.CommandConsumer`), supervised side tasks (schedules), and a small aiohttp server
(`/healthz`, `/readyz`, plus whatever routes are added to `worker.app` or via `HTTP_EXTENSIONS`, e.g.
`/metrics`). It starts while Postgres or RabbitMQ is down (and is simply not ready until they are).

Lifecycle: `start()` → serve until `request_stop()` (SIGTERM/SIGINT via `run_worker`) or until a side
task dies → `stop()`: stop consuming, drain in-flight commands within `drain_timeout_s`, cancel side
tasks, close the HTTP server, then the AMQP connection, Redis and the pool last. `burst()` is the
drain-once mode for tests and cron-style runs: process every queued command, run each schedule once,
and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import redis.asyncio as aioredis
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiohttp import web

from shared import worker_metrics
from shared.amqp import connect_robust, declare_topology, reconnect_delays
from shared.commands import CommandConsumer, CommandHandler
from shared.db import create_pool
from shared.ids import new_request_id
from shared.logging import get_logger
from shared.redis_client import create_redis
from shared.settings import Settings

log = get_logger("worker")

# Postgres errors that a later attempt may not meet (the server back, the lock free, the conflict gone).
_POSTGRES_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)

# Errors of an unreachable dependency: a schedule iteration that meets one logs it and tries again at
# its next tick (the process stays up and reports not-ready); anything else is a bug and stops it.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    *_POSTGRES_TRANSIENT,
    aioredis.RedisError,
    aio_pika.exceptions.AMQPError,
)

# What a command handler waits out in place (shared.commands.CommandConsumer): a dependency that does not
# answer. Narrower than TRANSIENT_ERRORS: a Redis reply error or an AMQP channel error that would fail
# the same way on every attempt is a failed delivery at once (poison is dead-lettered, not waited on).
DEPENDENCY_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    *_POSTGRES_TRANSIENT,
    aioredis.ConnectionError,
    aioredis.TimeoutError,
    aio_pika.exceptions.AMQPConnectionError,
)

# Hooks that add routes to every worker's HTTP app (`hook(app, worker)`), e.g. Prometheus `/metrics`.
HTTP_EXTENSIONS: list[Callable[[web.Application, Worker], None]] = [worker_metrics.install]

WORKER_KEY = web.AppKey("worker", object)

Lifecycle = Callable[["Worker"], Awaitable[None]]
# A schedule's body: returns True when more work is pending (run again after `busy_interval_s`).
ScheduleBody = Callable[[], Awaitable[bool | None]]


def install_uvloop() -> bool:
    """Use uvloop when it is installed (it is on Linux); the stdlib loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


@dataclass(frozen=True, slots=True)
class Schedule:
    """A periodic body run every `interval_s`, or every `busy_interval_s` while it reports more work."""

    name: str
    body: ScheduleBody
    interval_s: float
    busy_interval_s: float | None = None
    run_at_start: bool = True


@dataclass(slots=True)
class Worker:
    """One worker process: clients, a command consumer, schedules and an HTTP server."""

    name: str
    settings: Settings
    command_queue: str
    http_port: int
    http_host: str = "0.0.0.0"
    prefetch: int = 1
    drain_timeout_s: float = 20.0
    pool_max_size: int = 8
    on_start: list[Lifecycle] = field(default_factory=list)
    on_stop: list[Lifecycle] = field(default_factory=list)
    consumer: CommandConsumer = field(init=False)
    app: web.Application = field(init=False)
    pool: asyncpg.Pool = field(init=False)
    redis: aioredis.Redis = field(init=False)
    connection: AbstractRobustConnection | None = field(init=False, default=None)
    channel: AbstractChannel | None = field(init=False, default=None)
    exit_code: int = field(init=False, default=0)
    _schedules: list[Schedule] = field(init=False, default_factory=list)
    _side_tasks: dict[str, Callable[[], Awaitable[None]]] = field(init=False, default_factory=dict)
    _running: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _stop_event: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _runner: web.AppRunner | None = field(init=False, default=None)
    _amqp_task: asyncio.Task[None] | None = field(init=False, default=None)
    _stopping: bool = field(init=False, default=False)
    _started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.consumer = CommandConsumer(
            self.command_queue, prefetch=self.prefetch, transient_errors=DEPENDENCY_DOWN_ERRORS
        )
        self.app = web.Application()
        self.app[WORKER_KEY] = self
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)

    # ------------------------------------------------------------------------------ configuration

    def command(self, name: str, handler: CommandHandler) -> None:
        """Handle command `name` from this worker's queue."""
        self.consumer.add(name, handler)

    def schedule(self, schedule: Schedule) -> None:
        """Run `schedule` as a supervised side task (and once in `burst()`)."""
        self._schedules.append(schedule)

    def side_task(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """A supervised coroutine that should run for the life of the process (e.g. a flusher)."""
        self._side_tasks[name] = factory

    # ------------------------------------------------------------------------------ lifecycle

    async def open_clients(self) -> None:
        # min_size=0: the worker starts while Postgres is down, and is not ready until it answers.
        self.pool = await create_pool(
            self.settings.database_url,
            min_size=0,
            max_size=self.pool_max_size,
            timeout=3.0,
            role=self.settings.database_role,
        )
        self.redis = create_redis(self.settings.redis_url, timeout_s=1.0)

    async def start(self) -> None:
        """Open clients, run start hooks, serve HTTP, connect to the broker and start side tasks."""
        await self.open_clients()
        self._started = True
        for hook in self.on_start:
            await hook(self)
        for extension in HTTP_EXTENSIONS:
            extension(self.app, self)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.http_host, self.http_port, reuse_address=True)
        await site.start()
        if self.http_port == 0 and self._runner.addresses:
            self.http_port = int(self._runner.addresses[0][1])
        self._amqp_task = asyncio.create_task(self._connect_amqp(consume=True), name=f"{self.name}-amqp")
        self._supervise(self._amqp_task, "amqp-connect", finishing_is_fine=True)
        for schedule in self._schedules:
            body = functools.partial(self._run_schedule, schedule)
            self._start_side_task(f"schedule:{schedule.name}", body)
        for name, factory in self._side_tasks.items():
            self._start_side_task(name, factory)
        log.info("worker_started", worker=self.name, http_port=self.http_port, queue=self.command_queue)

    async def _connect_amqp(self, *, consume: bool) -> None:
        delays = reconnect_delays()
        while not self._stopping:
            connection: AbstractRobustConnection | None = None
            try:
                connection = await connect_robust(self.settings.amqp_url, timeout=3)
                channel = await connection.channel()
                await declare_topology(channel)
                if consume:
                    await self.consumer.start(channel)
            except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                delay = next(delays)
                log.warning(
                    "worker_amqp_connect_failed", error=str(exc) or type(exc).__name__, retry_in_s=delay
                )
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
                await asyncio.sleep(delay)
                continue
            self.connection, self.channel = connection, channel
            log.info("worker_amqp_connected", worker=self.name)
            return

    async def wait_amqp(self, timeout_s: float = 10.0) -> None:
        """Until the broker channel is open (tests, burst mode)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.channel is None or self.channel.is_closed:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("no broker channel")
            await asyncio.sleep(0.02)

    def _start_side_task(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        async def body() -> None:
            await factory()

        task = asyncio.create_task(body(), name=f"{self.name}:{name}")
        self._supervise(task, name)

    def _supervise(self, task: asyncio.Task[None], name: str, *, finishing_is_fine: bool = False) -> None:
        self._running.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if self._stopping or t.cancelled():
                return
            exc = t.exception()
            if exc is None and finishing_is_fine:
                return
            log.error(
                "worker_side_task_died",
                worker=self.name,
                task=name,
                error=repr(exc) if exc is not None else "returned",
                exc_info=exc,
            )
            self.exit_code = 1
            self._stop_event.set()

        task.add_done_callback(done)

    async def _run_schedule(self, schedule: Schedule) -> None:
        bound = log.bind(worker=self.name, schedule=schedule.name)
        if not schedule.run_at_start:
            await asyncio.sleep(schedule.interval_s)
        while True:
            more = False
            # Each iteration is a job run of its own: its lines share one request_id (SPEC §11).
            with structlog.contextvars.bound_contextvars(request_id=new_request_id()):
                try:
                    more = bool(await schedule.body())
                except TRANSIENT_ERRORS as exc:
                    bound.warning("schedule_iteration_failed", error=str(exc) or type(exc).__name__)
            busy = schedule.busy_interval_s
            await asyncio.sleep(busy if (more and busy is not None) else schedule.interval_s)

    def request_stop(self) -> None:
        """Ask `run()` to shut down (signal handlers call this)."""
        self._stop_event.set()

    async def wait_stopped(self) -> None:
        await self._stop_event.wait()

    async def run(self) -> int:
        """Start, serve until a stop request or a dead side task, stop; the process exit code."""
        try:
            try:
                await self.start()
            except Exception as exc:
                # One line that names the cause (e.g. the HTTP port in use), then stop and exit 1.
                log.error("worker_start_failed", worker=self.name, error=str(exc) or type(exc).__name__)
                self.exit_code = 1
            else:
                await self._stop_event.wait()
        finally:
            await self.stop()
        return self.exit_code

    async def stop(self) -> None:
        """Stop consuming, drain within the bound, cancel side tasks, close the server and clients."""
        if self._stopping:
            return
        self._stopping = True
        log.info("worker_stopping", worker=self.name, in_flight=self.consumer.in_flight)
        await self.consumer.stop(self.drain_timeout_s)
        for task in self._running:
            task.cancel()
        # A side task that died already said so (supervisor); here only its end is awaited.
        await asyncio.gather(*self._running, return_exceptions=True)
        for hook in reversed(self.on_stop):
            try:
                await hook(self)
            except Exception:
                log.exception("worker_stop_hook_failed", worker=self.name)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.connection is not None:
            try:
                if self.channel is not None and not self.channel.is_closed:
                    await asyncio.wait_for(self.channel.close(), timeout=5)
                await asyncio.wait_for(self.connection.close(), timeout=5)
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                log.warning("worker_amqp_close_failed", error=str(exc) or type(exc).__name__)
        if self._started:
            await self.redis.aclose()
            try:
                await asyncio.wait_for(self.pool.close(), timeout=5)
            except (TimeoutError, asyncpg.PostgresError, OSError):
                self.pool.terminate()
        log.info("worker_stopped", worker=self.name, exit_code=self.exit_code)

    async def burst(self) -> int:
        """Drain-once mode: process every queued command, run each schedule once, close; commands run."""
        await self.open_clients()
        self._started = True
        handled = 0
        try:
            for hook in self.on_start:
                await hook(self)
            await asyncio.wait_for(self._connect_amqp(consume=False), timeout=30)
            assert self.channel is not None
            handled = await self.consumer.drain_once(self.channel)
            for schedule in self._schedules:
                while await schedule.body():
                    pass
        finally:
            for task in self._running:
                task.cancel()
            await self.stop()
        return handled

    # ------------------------------------------------------------------------------ HTTP

    async def postgres_reachable(self, timeout_s: float = 2.0) -> bool:
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=timeout_s)
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return False
        return True

    @property
    def broker_ready(self) -> bool:
        channel = self.channel
        return channel is not None and not channel.is_closed and self.consumer.consuming

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "status": "alive", "worker": self.name})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks: dict[str, Any] = {"postgres": await self.postgres_reachable(), "rabbitmq": self.broker_ready}
        ready = all(checks.values()) and not self._stopping
        return web.json_response(
            {"ok": ready, "status": "ready" if ready else "not_ready", "worker": self.name, "checks": checks},
            status=200 if ready else 503,
        )


def run_worker(worker: Worker) -> int:
    """Entry point of a worker process: uvloop, signal handlers installed once, exit code."""
    install_uvloop()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.request_stop)
        return await worker.run()

    return asyncio.run(main())
