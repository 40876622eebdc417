"""`/api/sync`: the billing gate, in the order of SPEC §3 — shape → auth → rate limit → capture
(idempotency → quota → publish → fallback) → count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from services.gateway.bodies import read_whole_body
from services.gateway.context import CONTEXT, REQUEST_SITE, GatewayContext, request_id
from services.gateway.responses import error_response, json_response
from shared.content_coding import decode_body
from shared.db import close_pool, create_pool, keep_session_state
from shared.events import MAX_BODY_BYTES, EventShape, ShapeError, SyncBody, header_text, parse_sync_body
from shared.idempotency import compute_key
from shared.ingest import (
    PG_ERRORS,
    CaptureEvent,
    CaptureRequest,
    CaptureResult,
    EventResult,
    EventStatus,
    GateClosed,
    IngestPipeline,
)
from shared.logging import get_logger
from shared.months import seconds_until_next_month
from shared.quota import non_billable_reason
from shared.rate_limit import RateLimiter, client_ip
from shared.redis_scripts import GateScripts
from shared.site_cache import SiteCache
from shared.sites import Site

log = get_logger("sync")

CAPTURE_FAILED_RETRY_AFTER_S = 5
# Concurrent capture groups per process. Few slots make requests that arrive while a group is in flight
# share the next one: 2 beat 4 and 12 at peak and at half of peak (docs/performance.md).
CAPTURE_SLOTS = 2
# ...but the second slot opens only once the running group is this old: requests arriving during a
# normal group wait for it and share the next (fewer, larger groups: less CPU per event), and a group
# that stalls on an fsync does not hold up the requests behind it (docs/performance.md).
CAPTURE_OVERLAP_AFTER_S = 0.012
# Session settings of the capture connections (docs/performance.md):
# - backend_flush_after: they write most of Postgres's dirty pages (~1.2 KB per batched event); asking
#   the kernel to write them back every 256 kB instead of letting them pile up for its periodic flushes
#   keeps those flushes from stalling commits and confirms (p99 at half of the batch peak);
# - plan_cache_mode: the capture function's statements read their array arguments, so for small groups
#   the planner prefers a fresh plan per call; planning each call cost Postgres ~150 µs of a ~520 µs
#   one-event group. The generic plan is as good at every group size (1 to 200 events measured).
CAPTURE_SESSION_SETTINGS = {"backend_flush_after": "256kB", "plan_cache_mode": "force_generic_plan"}
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "86400",
}
# What a page's script may read of a POST answer beyond the safelisted headers: without them a tracker
# using fetch() sees every answer as a network error, and a retry after the 5 s bucket bills again.
EXPOSED_HEADERS = ", ".join(
    (
        "Retry-After",
        "x-request-id",
        "x-opsmantik-commit",
        "x-opsmantik-branch",
        "x-opsmantik-dedup",
        "x-opsmantik-quota-remaining",
        "x-opsmantik-quota-exceeded",
        "x-opsmantik-overage",
        "x-opsmantik-degraded",
        "x-opsmantik-fallback",
        "x-opsmantik-ratelimit",
        "x-opsmantik-error-code",
    )
)


@dataclass(slots=True)
class SyncGate:
    """The gate's collaborators, built once per process."""

    context: GatewayContext
    sites: SiteCache
    rate_limiter: RateLimiter
    pipeline: IngestPipeline


SYNC_GATE = web.AppKey("sync_gate", SyncGate)


# -- gates -------------------------------------------------------------------------------------


async def sync_post(request: web.Request) -> web.Response:
    """The gates of SPEC §3; a browser's page may read the answer unless its Origin was refused."""
    response = await _gates(request)
    origin = request.headers.get("Origin")
    if origin and response.status != 403:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"
    return response


async def _gates(request: web.Request) -> web.Response:
    gate = request.app[SYNC_GATE]
    settings = gate.context.settings
    try:
        raw = await read_whole_body(request)
    except RequestPayloadError as exc:  # the body's framing (chunked, Content-Length) is broken
        return error_response(400, "invalid_json", detail=f"the body could not be read: {exc}")
    try:
        # Repeated header lines are one list (RFC 9110 §5.3): two `Content-Encoding: gzip` = `gzip, gzip`.
        codings = request.headers.getall("Content-Encoding", None)
        if codings:
            raw = decode_body(raw, ", ".join(codings), MAX_BODY_BYTES)
        body = parse_sync_body(raw)
    except ShapeError as exc:
        status = 413 if exc.code == "payload_too_large" else 400
        return error_response(status, exc.code, detail=exc.detail)
    request[REQUEST_SITE] = body.site_public_id

    try:
        site = await gate.sites.get(body.site_public_id)
    except PG_ERRORS as exc:
        return _gate_closed(request, exc)
    if site is None:
        return error_response(400, "unknown_site", detail=f"no site with public id {body.site_public_id!r}")
    if not site.allows_origin(request.headers.get("Origin")):
        return error_response(403, "origin_not_allowed", detail="Origin is not one of the site's origins")

    ip = client_ip(request.remote, request.headers.get("X-Forwarded-For"), settings.trusted_proxies)
    limit = site.rate_limit_per_minute or settings.rate_limit_per_minute
    verdict = await gate.rate_limiter.check(site.id, ip, len(body.events), limit)
    if not verdict.allowed:
        gate.context.counters.add("billing_ingest_rate_limited_total", len(body.events))
        return error_response(
            429,
            "rate_limited",
            gate_status="rate_limited",
            headers={"x-opsmantik-ratelimit": "1", "Retry-After": str(verdict.retry_after_s)},
        )

    capture = _capture_request(request, body, site, ip, settings.idempotency_version)
    result: CaptureResult | None = None
    if capture.events:
        try:
            result = await gate.pipeline.capture(capture)
        except GateClosed as exc:
            await gate.rate_limiter.give_back(verdict)
            return _gate_closed(request, exc)
        if result.uncaptured:
            # Answered 503 with nothing captured (SPEC §1.5): its retry is processed afresh, units too.
            await gate.rate_limiter.give_back(verdict)
        _count(gate.context, result)
    if body.is_batch:
        return _batch_response(body, capture, result)
    assert result is not None
    return _single_response(capture.events[0], result)


def _capture_request(
    request: web.Request, body: SyncBody, site: Site, ip: str, version: int
) -> CaptureRequest:
    now = datetime.now(UTC)
    server_ms = int(now.timestamp() * 1000)
    events = [
        CaptureEvent(
            event=shape.event,
            key=compute_key(site.id, shape.event, server_ms, version),
            created_at=now,
            billing_reason=non_billable_reason(shape.event),
        )
        for shape in body.events
        if shape.error is None
    ]
    return CaptureRequest(
        site=site,
        events=events,
        is_batch=body.is_batch,
        client_ip=ip,
        user_agent=header_text(request.headers.get("User-Agent", "")),
    )


def _gate_closed(request: web.Request, exc: BaseException) -> web.Response:
    log.error(
        "BILLING_GATE_CLOSED", request_id=request_id(request), site=request.get(REQUEST_SITE), error=str(exc)
    )
    return error_response(500, "billing_gate_closed", gate_status="billing_gate_closed")


def _count(context: GatewayContext, result: CaptureResult) -> None:
    """SPEC §11 counters for one request: tallied here, added once per counter (not per event)."""
    allowed = overage = degraded = duplicate = rejected = 0
    for event_result in result.events:
        status = event_result.status
        if status is EventStatus.QUEUED or status is EventStatus.DEGRADED:
            allowed += 1
            overage += event_result.overage
            degraded += status is EventStatus.DEGRADED
        elif status is EventStatus.DUPLICATE:
            duplicate += 1
        elif status is EventStatus.REJECTED_QUOTA:
            rejected += 1
    counters = context.counters
    for name, amount in (
        ("billing_ingest_allowed_total", allowed),
        ("billing_ingest_overage_total", overage),
        ("billing_ingest_degraded_total", degraded),
        ("billing_ingest_duplicate_total", duplicate),
        ("billing_ingest_rejected_quota_total", rejected),
    ):
        if amount:
            counters.add(name, amount)


# -- answers -----------------------------------------------------------------------------------


def _event_body(item: CaptureEvent, result: EventResult) -> dict[str, Any]:
    body: dict[str, Any] = {"status": result.status.value}
    if result.status in (EventStatus.QUEUED, EventStatus.DEGRADED):
        body["ingest_id"] = item.ingest_id
        if not item.billable:
            body["billable"] = False
        if result.overage:
            body["overage"] = True
    return body


def _quota_headers(item: CaptureEvent, result: EventResult) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not item.billable or result.quota is None:
        return headers
    headers["x-opsmantik-quota-remaining"] = str(result.quota.remaining)
    if result.overage:
        headers["x-opsmantik-overage"] = "true"
    return headers


def _degraded_header(*reasons: str) -> dict[str, str]:
    present = [r for r in reasons if r]
    return {"x-opsmantik-degraded": ", ".join(present)} if present else {}


def _single_response(item: CaptureEvent, capture: CaptureResult) -> web.Response:
    result = capture.events[0]
    pg_quota = "quota_pg_conservative" if capture.quota_from_postgres and item.billable else ""
    status = result.status
    if status is EventStatus.DUPLICATE:
        return json_response(200, {"ok": True, "status": "duplicate"}, {"x-opsmantik-dedup": "1"})
    if status is EventStatus.REJECTED_QUOTA:
        return error_response(
            429,
            "rejected_quota",
            gate_status="rejected_quota",
            headers={
                "x-opsmantik-quota-exceeded": "1",
                "Retry-After": str(seconds_until_next_month()),
                "x-opsmantik-quota-remaining": "0",
                **_degraded_header(pg_quota),
            },
        )
    if status is EventStatus.CAPTURE_FAILED:
        return error_response(
            503,
            "capture_failed",
            gate_status="capture_failed",
            headers={"Retry-After": str(CAPTURE_FAILED_RETRY_AFTER_S)},
        )
    headers = {"x-opsmantik-dedup": "0", **_quota_headers(item, result)}
    if status is EventStatus.DEGRADED:
        headers.update(_degraded_header("broker_publish_failed", pg_quota))
        headers["x-opsmantik-fallback"] = "true"
    else:
        headers.update(_degraded_header(pg_quota))
    return json_response(200, {"ok": True, **_event_body(item, result)}, headers)


def _batch_response(body: SyncBody, capture: CaptureRequest, result: CaptureResult | None) -> web.Response:
    outcomes = iter(zip(capture.events, result.events, strict=True)) if result else iter(())
    entries: list[dict[str, Any]] = []
    tally = {"accepted": 0, "duplicates": 0, "rejected": 0, "invalid": 0}
    for shape in body.events:
        if shape.error is not None:
            entries.append(_invalid_entry(shape))
            tally["invalid"] += 1
            continue
        item, event_result = next(outcomes)
        if event_result.status is EventStatus.CAPTURE_FAILED:
            return error_response(
                503,
                "capture_failed",
                gate_status="capture_failed",
                headers={"Retry-After": str(CAPTURE_FAILED_RETRY_AFTER_S)},
            )
        entries.append(_event_body(item, event_result))
        if event_result.status in (EventStatus.QUEUED, EventStatus.DEGRADED):
            tally["accepted"] += 1
        elif event_result.status is EventStatus.DUPLICATE:
            tally["duplicates"] += 1
        else:
            tally["rejected"] += 1
    headers: dict[str, str] = {}
    degraded = result is not None and any(r.status is EventStatus.DEGRADED for r in result.events)
    pg_quota = "quota_pg_conservative" if result is not None and result.quota_from_postgres else ""
    headers.update(_degraded_header("broker_publish_failed" if degraded else "", pg_quota))
    if degraded:
        headers["x-opsmantik-fallback"] = "true"
    return json_response(200, {"ok": True, "results": entries, **tally}, headers)


def _invalid_entry(shape: EventShape) -> dict[str, Any]:
    return {"status": "invalid", "error": shape.error, "detail": shape.detail}


# -- other methods -----------------------------------------------------------------------------


async def sync_options(request: web.Request) -> web.Response:
    """CORS preflight: the site (hence its allow-list) is only known from the POST body."""
    headers = dict(CORS_HEADERS)
    origin = request.headers.get("Origin")
    if origin:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Vary"] = "Origin"
    return web.Response(status=204, headers=headers)


async def sync_method_not_allowed(request: web.Request) -> web.Response:
    return error_response(
        405, "method_not_allowed", detail="Method Not Allowed", headers={"Allow": "POST, OPTIONS"}
    )


async def _sync_gate(app: web.Application) -> AsyncIterator[None]:
    context = app[CONTEXT]
    settings = context.settings
    # Capture groups hold one connection each; only transactions run on them, so no reset query.
    capture_pool = await create_pool(
        settings.database_url,
        min_size=0,
        max_size=CAPTURE_SLOTS,
        timeout=2.0,
        reset=keep_session_state,
        session_settings=CAPTURE_SESSION_SETTINGS,
        role=settings.database_role,
    )
    scripts = GateScripts(settings.redis_url)  # one connection, shared by the rate limit and the capture
    app[SYNC_GATE] = gate = SyncGate(
        context=context,
        sites=SiteCache(
            context.pool,
            ttl_s=settings.site_cache_ttl_s,
            default_monthly_limit=settings.default_monthly_limit,
        ),
        rate_limiter=RateLimiter(scripts),
        pipeline=IngestPipeline(
            capture_pool, context.redis, scripts, context.publisher, max_concurrent_groups=CAPTURE_SLOTS,
            group_overlap_after_s=CAPTURE_OVERLAP_AFTER_S,
        ),
    )
    yield
    try:
        await asyncio.wait_for(gate.pipeline.drain(), timeout=30)
    finally:
        await scripts.close()
        await close_pool(capture_pool)


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_sync_gate)
    app.router.add_post("/api/sync", sync_post)
    app.router.add_route("OPTIONS", "/api/sync", sync_options)
    # Any other method (HEAD and TRACE included) is 405 with the right `Allow`; a list of methods left
    # the others to aiohttp's 405, whose `Allow` named every method registered here.
    app.router.add_route("*", "/api/sync", sync_method_not_allowed)
