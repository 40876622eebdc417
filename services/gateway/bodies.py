"""Reading request bodies: whole, bounded, and telling a client that left from a server that failed."""

from __future__ import annotations

from aiohttp import web

from services.gateway.responses import error_response

# nginx's convention for "the client closed the connection before the answer": never sent, but logged
# and counted, so a beacon cut off by a page unload is not a 5xx that pages someone.
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client closed its connection before its body was read: nothing was done, nobody listens."""

    def response(self) -> web.Response:
        return error_response(CLIENT_CLOSED_REQUEST, "client_closed_request")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body as sent (content codings untouched): all of it, or its first `limit` + 1 bytes when it
    is longer (the caller answers 413). `content.read(n)` alone returns what has arrived so far: a body
    arriving in more than one TCP segment (a slow link, `Expect: 100-continue`) came back cut short."""
    body = bytearray()
    try:
        while len(body) <= limit:
            chunk = await request.content.read(limit + 1 - len(body))
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        if _client_gone(request):
            raise ClientGone() from None
        raise
    return bytes(body)


async def read_whole_body(request: web.Request) -> bytes:
    """`request.read()` (aiohttp's `client_max_size` applies: 413 beyond it), ClientGone when the
    client left mid-body."""
    try:
        return await request.read()
    except ConnectionResetError:
        if _client_gone(request):
            raise ClientGone() from None
        raise


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
