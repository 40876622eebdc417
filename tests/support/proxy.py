"""A TCP proxy a test can cut: the way to make Postgres, Redis or RabbitMQ unreachable for one client
without stopping the shared server."""

from __future__ import annotations

import asyncio
import contextlib


class _Connection:
    """Both sockets of one proxied connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.lose_next_reply = False

    def abort(self) -> None:
        for writer in (self.client, self.server):
            if writer.transport is not None:
                writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `cut()` drops every connection and refuses new ones;
    `stall()` stops reading what clients send (a server that stops reading: its replies still flow);
    `swallow()` drops it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.enabled = True
        self.upstream_flowing = asyncio.Event()
        self.upstream_flowing.set()
        self.swallowing = False
        self._reply_to_lose: bytes | None = None
        self.replies_lost = 0
        self._forward_lost_request = True
        self._cut_after_loss = False

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.enabled:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        connection = _Connection(writer, up_writer)
        for src, dst, gated in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pipe(src, dst, gated=gated, connection=connection))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, gated: bool, connection: _Connection
    ) -> None:
        try:
            while True:
                if gated:
                    await self.upstream_flowing.wait()
                data = await src.read(65536)
                if not data or not self.enabled:
                    break
                if gated and self.swallowing:
                    continue
                if gated and self._reply_to_lose is not None and self._reply_to_lose in data:
                    self._reply_to_lose = None
                    if not self._forward_lost_request:
                        connection.abort()  # the server never saw it
                        self.replies_lost += 1
                        break
                    connection.lose_next_reply = True
                elif not gated and connection.lose_next_reply:
                    connection.abort()  # the server acted on the request; its client never hears of it
                    self.replies_lost += 1
                    self.enabled = not self._cut_after_loss
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            return
        finally:
            self._writers.discard(dst)
            dst.close()

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.enabled = False
        for writer in list(self._writers):
            transport = writer.transport
            if transport is not None:
                transport.abort()
        self._writers.clear()
        await asyncio.sleep(0)

    def restore(self) -> None:
        self.enabled = True

    def stall(self) -> None:
        """Leave what clients send unread (their send buffers fill up); `resume()` reads it again."""
        self.upstream_flowing.clear()

    def swallow(self) -> None:
        """Drop what clients send from now on, connections left open: a server that reads and never
        answers (unlike `stall()`, a read already waiting is dropped too)."""
        self.swallowing = True

    def lose_reply_to(self, marker: bytes, *, forward: bool = True, then_refuse: bool = False) -> None:
        """Forward the next client message containing `marker` (e.g. b"COMMIT"), then drop the
        server's reply to it and reset both sides: the request took effect, its client cannot know.
        With `forward=False` the message itself is dropped with the connection (it took no effect);
        with `then_refuse` new connections are refused from then on (until `restore()`)."""
        self._reply_to_lose = marker
        self._forward_lost_request = forward
        self._cut_after_loss = then_refuse

    def resume(self) -> None:
        self.upstream_flowing.set()

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        for task in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError):
                await task
