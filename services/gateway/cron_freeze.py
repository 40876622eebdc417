"""`POST /api/cron/invoice-freeze` (SPEC §9): validate the month here (400 for a malformed, current or
future one), then command the freezer over RabbitMQ and answer with its reply and this request's
`request_id` (504 `worker_timeout` when no freezer answers in COMMAND_TIMEOUT_S; the command stays
queued and still runs)."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from services.gateway import command_bus
from services.gateway.bodies import read_body
from services.gateway.command_bus import dispatch, require_cron
from services.gateway.context import request_id
from services.gateway.responses import error_response
from shared.amqp import FREEZER_QUEUE
from shared.freeze import FreezeRefused, freezable_month

PATH = "/api/cron/invoice-freeze"
MAX_BODY_BYTES = 16 * 1024


async def invoice_freeze(request: web.Request) -> web.Response:
    """Optional body `{year_month}` (default: the previous UTC month) →
    `{ok, year_month, inserted, skipped, total_sites, request_id}`."""
    if denied := require_cron(request):
        return denied
    rid = request_id(request)
    raw = await read_body(request, MAX_BODY_BYTES)
    if len(raw) > MAX_BODY_BYTES:
        return error_response(413, "payload_too_large", request_id=rid)
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        return error_response(400, "invalid_json", reason="body is not valid JSON", request_id=rid)
    if not isinstance(body, Mapping):
        return error_response(400, "invalid_json", reason="body must be a JSON object", request_id=rid)
    try:
        # Resolved here, so the month frozen is the one that was past when the request arrived.
        month = freezable_month(body.get("year_month"))
    except FreezeRefused as exc:
        return error_response(400, exc.code, reason=exc.reason, request_id=rid)
    return await dispatch(request, FREEZER_QUEUE, "freeze", {"year_month": month})


def setup(app: web.Application) -> None:
    command_bus.install(app)
    app.router.add_post(PATH, invoice_freeze)
