"""A lean, pipelined Redis connection for the gate's Lua scripts (EVALSHA on the hot path).

Why it exists: redis-py spends ~90 µs of CPU per call in its connection pool, retry and parser
layers; the gate makes two script calls per capture group (rate limit, quota reservation), which at
small groups is a tenth of a request's CPU (docs/performance.md). Here a call is one write of a
pre-encoded command and one future resolved by an incremental RESP2 parser; calls from concurrent
groups share the one connection, pipelined. Everything else (seeding, reconciliation, counters)
keeps using redis-py.

Failure semantics match the client it replaces (short socket timeouts, fail fast): a call that gets
no reply within the timeout aborts the connection (replies could no longer be matched to calls),
every call still waiting fails, and the next call reconnects. Errors are redis-py's exception
classes, so callers keep catching `redis.RedisError`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote, urlsplit

from redis import exceptions as redis_errors

CRLF = b"\r\n"
Reply = int | bytes | str | None | list["Reply"] | redis_errors.ResponseError


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A script's source and its SHA-1 (the EVALSHA handle), computed once."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode()).hexdigest()  # noqa: S324 - Redis's script id, not security
        object.__setattr__(self, "sha", sha)


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """`redis://[[user]:password@]host[:port][/db]`."""
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        path = parts.path.strip("/")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse_reply(buffer: bytes | bytearray, start: int) -> tuple[Reply, int] | None:
    """One RESP2 reply starting at `start`: (value, end offset), or None while it is incomplete.

    An error reply is returned (not raised) as a ResponseError, so that it fails only its own call."""
    line_end = buffer.find(CRLF, start)
    if line_end < 0:
        return None
    kind = buffer[start : start + 1]
    line = bytes(buffer[start + 1 : line_end])
    after = line_end + 2
    if kind == b":":
        return int(line), after
    if kind == b"+":
        return line.decode(), after
    if kind == b"-":
        return _response_error(line.decode()), after
    if kind == b"$":
        length = int(line)
        if length < 0:
            return None, after
        if len(buffer) < after + length + 2:
            return None
        return bytes(buffer[after : after + length]), after + length + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        offset = after
        for _ in range(count):
            parsed = parse_reply(buffer, offset)
            if parsed is None:
                return None
            item, offset = parsed
            items.append(item)
        return items, offset
    raise redis_errors.InvalidResponse(f"unknown RESP type {kind!r}")


def _response_error(message: str) -> redis_errors.ResponseError:
    if message.startswith("NOSCRIPT"):
        return redis_errors.NoScriptError(message)
    return redis_errors.ResponseError(message)


class RespConnection(asyncio.Protocol):
    """One connection; replies resolve the waiting calls in order."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiting: deque[asyncio.Future[Reply]] = deque()
        self._closed = False

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._closed

    def call(self, args: Sequence[bytes | str | int]) -> asyncio.Future[Reply]:
        if self._transport is None or self._closed:
            raise redis_errors.ConnectionError("redis connection is closed")
        try:
            command = encode_command(args)
        except UnicodeEncodeError as exc:
            # Before a reply slot is taken: one bad argument must never shift replies onto other calls.
            raise redis_errors.DataError(f"argument not encodable: {exc}") from None
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._transport.write(command)
        return future

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._fail_all(redis_errors.ConnectionError("redis connection aborted"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(redis_errors.ConnectionError(f"redis connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        try:
            while offset < len(buffer):
                parsed = parse_reply(buffer, offset)
                if parsed is None:
                    break
                reply, offset = parsed
                if not self._waiting:
                    raise redis_errors.InvalidResponse("a reply nobody asked for")
                future = self._waiting.popleft()
                if future.done():
                    continue
                if isinstance(reply, redis_errors.ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (redis_errors.InvalidResponse, ValueError) as exc:
            self._fail_all(redis_errors.ConnectionError(f"redis protocol error: {exc}"))
            if self._transport is not None:
                self._transport.abort()
            return
        del buffer[:offset]

    def _fail_all(self, error: redis_errors.RedisError) -> None:
        self._closed = True
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(error)


class ScriptClient:
    """Runs Lua scripts over one lazily (re)opened RespConnection, with a per-call timeout."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        self._address = RedisAddress.from_url(url)
        self._timeout_s = timeout_s
        self._connection: RespConnection | None = None
        self._connecting: asyncio.Future[RespConnection] | None = None

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[int | str]) -> Reply:
        """EVALSHA; EVAL when Redis does not know the script (restart, SCRIPT FLUSH)."""
        command: list[bytes | str | int] = ["EVALSHA", script.sha, len(keys), *keys, *args]
        try:
            return await self._call(command)
        except redis_errors.NoScriptError:
            command[0:2] = ["EVAL", script.source]
            return await self._call(command)

    async def _call(self, args: Sequence[bytes | str | int]) -> Reply:
        connection = await self._open()
        future = connection.call(args)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError:
            connection.abort()  # the reply may still come: it could no longer be matched to its call
            raise redis_errors.TimeoutError(f"no reply from redis within {self._timeout_s}s") from None

    async def _open(self) -> RespConnection:
        """The open connection, or one connect attempt shared by every caller waiting for it (so a
        hung server costs each of them one timeout, not one per caller ahead of it)."""
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[RespConnection]) -> None:
        if not attempt.cancelled() and attempt.exception() is None:
            self._connection = attempt.result()

    async def _connect(self) -> RespConnection:
        loop = asyncio.get_running_loop()
        address = self._address
        try:
            async with asyncio.timeout(self._timeout_s):
                _, connection = await loop.create_connection(RespConnection, address.host, address.port)
        except TimeoutError:
            raise redis_errors.TimeoutError(f"redis connect timed out after {self._timeout_s}s") from None
        except OSError as exc:
            raise redis_errors.ConnectionError(f"redis connect failed: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout_s):
                if address.password is not None:
                    user = [address.username] if address.username else []
                    await connection.call(["AUTH", *user, address.password])
                if address.db:
                    await connection.call(["SELECT", address.db])
        except BaseException as exc:
            connection.abort()
            if isinstance(exc, TimeoutError):
                raise redis_errors.TimeoutError("redis AUTH/SELECT timed out") from None
            raise
        return connection

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.abort()
            self._connection = None
