"""`revkernel gateway`: N processes sharing one port (SO_REUSEPORT), graceful on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import sys
from types import FrameType

from aiohttp import web

from services.gateway.app import build_app
from shared.logging import configure_logging, flush_logs, get_logger
from shared.settings import Settings

# In-flight requests get this long to finish after SIGTERM before the clients close.
SHUTDOWN_GRACE_S = 15.0
GC_THRESHOLDS = (50_000, 20, 100)
# The access log (one info line per request) is written in batches: one write per 100 ms instead of one
# per request; warnings and errors go out at once (shared.logging.BufferedLineLogger).
LOG_FLUSH_AFTER_S = 0.1


def install_uvloop() -> bool:
    """Use uvloop when it is installed (it is on Linux); the stdlib loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections: with CPython's default thresholds (700, 10, 10) the collector
    ran every few requests and its full passes over the whole heap put 100-200 ms pauses into the
    tail. The objects alive after start-up (modules, settings, caches) are frozen out of every pass;
    young cycles are still collected by generations 0 and 1, a full pass runs every ~10^8
    allocations (docs/performance.md: +15 % events/s in batches, p99 at half peak 45-221 → 27-43 ms).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve_gateway(settings: Settings, *, reuse_port: bool = False) -> int:
    """One gateway process until SIGTERM/SIGINT: stop accepting, drain, close clients; exit code.

    `reuse_port` only for the processes of one `--workers N` gateway: a lone gateway must not share
    its port silently with another one already serving it (maybe on another database)."""
    configure_logging(settings.log_level, flush_after_s=LOG_FLUSH_AFTER_S)
    install_uvloop()
    tune_garbage_collector()
    log = get_logger("gateway")
    log.info("gateway_starting", host=settings.gateway_host, port=settings.gateway_port, pid=os.getpid())
    try:
        web.run_app(
            build_app(settings),
            host=settings.gateway_host,
            port=settings.gateway_port,
            reuse_port=reuse_port,
            access_log=None,
            print=None,
            handle_signals=True,
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
    except OSError as exc:  # the listening socket: port in use, an address that does not resolve
        log.error("gateway_start_failed", error=str(exc) or type(exc).__name__)
        return 1
    finally:
        flush_logs()
    return 0


def _serve_worker(settings: Settings) -> None:
    """One of `--workers N` processes (a multiprocessing target: its exit code is the result)."""
    sys.exit(serve_gateway(settings, reuse_port=True))


def run_gateways(settings: Settings, workers: int) -> int:
    """Run `workers` gateway processes and forward SIGTERM/SIGINT to them; exit 0 when all drained."""
    if workers <= 1:
        return serve_gateway(settings)
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_serve_worker, args=(settings,), daemon=False) for _ in range(workers)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    failed = [c.exitcode for c in children if c.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"gateway workers exited with {failed}", file=sys.stderr)
        return 1
    return 0
