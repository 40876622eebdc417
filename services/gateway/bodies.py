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
        _raise_if_client_left(request)
        raise
    return bytes(body)


async def read_whole_body(request: web.Request) -> bytes:
    """`request.read()` (aiohttp's `client_max_size` applies: 413 beyond it), ClientGone when the
    client left mid-body."""
    try:
        return await request.read()  # on /api/sync: a plain try costs nothing when nothing is raised
    except ConnectionResetError:
        _raise_if_client_left(request)
        raise


def _raise_if_client_left(request: web.Request) -> None:
    """A reset while the request's own connection is closing is the client leaving: ClientGone."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ClientGone() from None
