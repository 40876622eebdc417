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
# Lines go out in writes of at most this many bytes, split at line ends: POSIX keeps a pipe write of up
# to PIPE_BUF (4096 on Linux) in one piece, so the batches of several gateway workers sharing one
# stderr pipe (Docker, journald) never interleave inside a line.
MAX_WRITE_BYTES = 4096

_sink: BufferedLineLogger | None = None
# Where `log_request` writes: None until configure_logging runs, and while info lines are filtered out.
_write_request_line: Callable[[str], Any] | None = None


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def _byte_size(line: str) -> int:
    return len(line) + 1 if line.isascii() else len(line.encode()) + 1


def write_chunks(lines: list[str], limit_bytes: int = MAX_WRITE_BYTES) -> list[str]:
    """`lines` as newline-terminated chunks of at most `limit_bytes` (a longer line alone in its own)."""
    chunks: list[str] = []
    chunk: list[str] = []
    size = 0
    for line in lines:
        line_size = _byte_size(line)
        if chunk and size + line_size > limit_bytes:
            chunks.append("\n".join(chunk) + "\n")
            chunk, size = [], 0
        chunk.append(line)
        size += line_size
    if chunk:
        chunks.append("\n".join(chunk) + "\n")
    return chunks


class BufferedLineLogger:
    """structlog's output, written many lines per system call.

    Debug and info lines (the access log: one per request) wait up to `flush_after_s` on the running
    event loop; a warning or an error writes at once, after what waited, so the order holds (stdlib
    logging records flush the buffer first too, see `configure_logging`). Lines also go out when
    `max_chars` have gathered, when no event loop runs in the logging thread, on `flush_logs()` and at
    exit, in writes of at most `MAX_WRITE_BYTES`. A process killed with SIGKILL loses at most
    `flush_after_s` of info lines (docs/operations.md). A write the stream refuses drops its lines
    and counts them (`dropped_lines`) instead of failing the request that logged; the next write
    that succeeds starts with a `log_lines_dropped` warning.
    """

    def __init__(self, stream: TextIO, flush_after_s: float, max_chars: int = MAX_BUFFERED_CHARS) -> None:
        self._stream = stream
        self._flush_after_s = flush_after_s
        self._max_chars = max_chars
        self._lines: list[str] = []
        self._chars = 0
        # The running loop's pending flush; only that loop's thread touches the handle.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.dropped_lines = 0
        self._unreported_drops = 0  # reported as one warning line by the next write that succeeds

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
            self._timer = self._timer_loop = None  # set by a loop that has stopped: it never fires
            return False  # so write now
        self._timer = loop.call_later(self._flush_after_s, self._timer_due)
        self._timer_loop = loop
        return True

    def _timer_due(self) -> None:
        with self._lock:
            self._timer = self._timer_loop = None
        self.flush()

    def _write_now(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
        self.flush()

    def flush(self) -> None:
        """Write every waiting line (a pending timer then finds nothing to write)."""
        with self._lock:
            lines, self._lines, self._chars = self._lines, [], 0
            if not lines:
                return
            report = self._unreported_drops  # the first write that works says what was lost before it
            notice = {"event": "log_lines_dropped", "level": "warning", "lines": report}
            try:
                for chunk in write_chunks([_dumps(notice), *lines] if report else lines):
                    self._stream.write(chunk)
                    self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: a log line is not worth a request
                self.dropped_lines += len(lines)
                self._unreported_drops += len(lines)
            else:
                self._unreported_drops = 0

    debug = info = _buffer
    msg = log = warning = warn = error = err = critical = fatal = exception = failure = _write_now


class _JsonLineFormatter(logging.Formatter):
    """A stdlib record (aiohttp, asyncio, aio-pika, aiormq) as one JSON line shaped like structlog's:
    their tracebacks were multi-line plain text among the JSON lines (SPEC §11)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "component": record.name,
            "event": record.getMessage(),
            "level": record.levelname.lower(),
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=repr).decode()


class _FlushFirst(logging.Filter):
    """Before a stdlib logging record (aiohttp, asyncio, aio-pika) is written, write the buffered lines
    logged before it."""

    def filter(self, record: logging.LogRecord) -> bool:
        flush_logs()
        return True


def configure_logging(level: str = "info", stream: Any = None, *, flush_after_s: float = 0.0) -> None:
    """Route structlog and stdlib logging to JSON lines on stderr (or `stream`).

    With `flush_after_s` > 0, structlog's debug and info lines are written in batches
    (`BufferedLineLogger`); call `flush_logs()` before the process ends.
    """
    global _sink, _write_request_line
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(level=numeric, stream=stream or sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_JsonLineFormatter())
        handler.addFilter(_FlushFirst())
    for noisy in ("aiormq", "aio_pika", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    flush_logs()
    logger_factory: Any
    if flush_after_s > 0:
        sink = _sink = BufferedLineLogger(stream or sys.stderr, flush_after_s)
        logger_factory = lambda *_args: sink  # noqa: E731 - one sink for every logger
        write_line: Callable[[str], Any] = sink.info
    else:
        _sink = None
        # WriteLogger writes a line and its newline in one write (PrintLogger's print() makes two), so
        # processes sharing a stderr pipe (`revkernel run`, unbuffered stderr) never merge lines.
        line_logger = structlog.WriteLogger(stream or sys.stderr)
        logger_factory = lambda *_args: line_logger  # noqa: E731 - one writer for every logger
        write_line = line_logger.info
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
    write(orjson.dumps(line, default=repr).decode())  # repr for odd values, as structlog's renderer


def flush_logs() -> None:
    """Write the lines a buffering configuration still holds (a no-op otherwise)."""
    if _sink is not None:
        _sink.flush()


def get_logger(name: str) -> Any:
    """A structlog logger carrying the component name."""
    # Initial values (not .bind) keep the logger lazy, so module-level loggers made at import time
    # still use the configuration `configure_logging` installs later.
    return structlog.get_logger(name, component=name)


atexit.register(flush_logs)
