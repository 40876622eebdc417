"""`GET /metrics` and request latency on every worker's HTTP server (SPEC §11), installed through
`shared.worker.HTTP_EXTENSIONS`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from shared import prom

if TYPE_CHECKING:
    from shared.worker import Worker

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application, worker: Worker) -> None:
    """Add `/metrics` (scrape-time gauges read through this worker's pool and broker connection) and a
    latency middleware labelled with the worker's name."""
    probe = prom.QueueDepthProbe(lambda: worker.connection)

    @web.middleware
    async def request_latency(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        elapsed_s = time.perf_counter() - started
        route = prom.route_label(request)
        prom.observe_request(worker.name, route, request.method, response.status, elapsed_s)
        return response

    async def metrics(request: web.Request) -> web.Response:
        return prom.metrics_response(await prom.render_metrics(worker.pool, probe))

    async def close_probe(app: web.Application) -> None:
        await probe.close()

    app.middlewares.append(request_latency)
    app.router.add_get("/metrics", metrics)
    app.on_cleanup.append(close_probe)
