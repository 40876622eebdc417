"""structlog JSON logs: one line per event, context (request_id, site_id, job_id) bound per unit of work."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

MAX_BUFFERED_CHARS = 64 * 1024  # a buffer this full is written at once, before its timer

_sink: BufferedLineLogger | None = None
# Where `log_request` writes: None until configure_logging runs, and while info lines are filtered out.
_write_request_line: Callable[[str], Any] | None = None


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


class BufferedLineLogger:
    """structlog's output, written many lines per system call.

    Debug and info lines (the access log: one per request) wait up to `flush_after_s` on the running
    event loop; a warning or an error writes at once, after what waited, so the order holds. Lines
    also go out when `max_chars` have gathered, when no event loop runs in the logging thread, on
    `flush_logs()` and at exit. A process killed with SIGKILL loses at most `flush_after_s` of info
    lines (docs/operations.md).
    """

    def __init__(self, stream: TextIO, flush_after_s: float, max_chars: int = MAX_BUFFERED_CHARS) -> None:
        self._stream = stream
        self._flush_after_s = flush_after_s
        self._max_chars = max_chars
        self._lines: list[str] = []
        self._chars = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _buffer(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            self._chars += len(line) + 1
            if self._chars < self._max_chars and self._flush_scheduled():
                return
        self.flush()

    def _flush_scheduled(self) -> bool:
        """True when a timer of the running loop will write the buffer (scheduling one if needed)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._timer is not None  # another thread: the loop's timer, if any, writes it
        if self._timer is not None and self._timer_loop is loop:
            return True
        if self._timer is not None:
            return False  # set by a loop that has stopped: write now, then start afresh
        self._timer = loop.call_later(self._flush_after_s, self.flush)
        self._timer_loop = loop
        return True

    def _write_now(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
        self.flush()

    def flush(self) -> None:
        """Write every waiting line in one call."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_loop = None
            lines, self._lines, self._chars = self._lines, [], 0
            if lines:
                lines.append("")
                self._stream.write("\n".join(lines))
                self._stream.flush()

    debug = info = _buffer
    msg = log = warning = warn = error = err = critical = fatal = exception = failure = _write_now


def configure_logging(level: str = "info", stream: Any = None, *, flush_after_s: float = 0.0) -> None:
    """Route structlog and stdlib logging to JSON lines on stderr (or `stream`).

    With `flush_after_s` > 0, structlog's debug and info lines are written in batches
    (`BufferedLineLogger`); call `flush_logs()` before the process ends.
    """
    global _sink, _write_request_line
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(level=numeric, stream=stream or sys.stderr, format="%(message)s", force=True)
    for noisy in ("aiormq", "aio_pika", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    flush_logs()
    logger_factory: Any
    if flush_after_s > 0:
        sink = _sink = BufferedLineLogger(stream or sys.stderr, flush_after_s)
        atexit.register(sink.flush)
        logger_factory = lambda *_args: sink  # noqa: E731 - one sink for every logger
        write_line: Callable[[str], Any] = sink.info
    else:
        _sink = None
        print_logger = structlog.PrintLogger(stream or sys.stderr)
        logger_factory = lambda *_args: print_logger  # noqa: E731 - one writer for every logger
        write_line = print_logger.info
    _write_request_line = write_line if numeric <= logging.INFO else None
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )


def log_request(component: str, **fields: Any) -> None:
    """The access log's line (info, `"event":"request"`), shaped as structlog shapes every other line
    but without its processor chain: this runs once per request. Context variables are not merged
    into it; the gateway binds none."""
    write = _write_request_line
    if write is None:
        return
    timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    line = {"component": component, **fields, "event": "request", "level": "info", "timestamp": timestamp}
    write(orjson.dumps(line).decode())


def flush_logs() -> None:
    """Write the lines a buffering configuration still holds (a no-op otherwise)."""
    if _sink is not None:
        _sink.flush()


def get_logger(name: str) -> Any:
    """A structlog logger carrying the component name."""
    # Initial values (not .bind) keep the logger lazy, so module-level loggers made at import time
    # still use the configuration `configure_logging` installs later.
    return structlog.get_logger(name, component=name)
