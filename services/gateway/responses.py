"""JSON responses and error bodies shared by every gateway route (SPEC §3 error contract)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

ERROR_CODE_HEADER = "x-opsmantik-error-code"
JSON_CONTENT_TYPE = "application/json"


def json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=JSON_CONTENT_TYPE, headers=headers
    )


def error_response(
    status: int,
    code: str,
    *,
    gate_status: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """`{"ok": false, "error": code}` with the matching `x-opsmantik-error-code` header."""
    body: dict[str, Any] = {"ok": False, "error": code}
    if gate_status is not None:
        body["status"] = gate_status
    body.update(extra)
    return json_response(status, body, {ERROR_CODE_HEADER: code, **(headers or {})})
