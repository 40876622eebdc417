"""The gateway's log output: info lines written in batches (never reordered, never stranded) and the
access-log line, written without structlog's processor chain but in the same shape."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

import shared.logging as shared_logging
from shared.logging import (
    BufferedLineLogger,
    configure_logging,
    flush_logs,
    get_logger,
    log_request,
    write_chunks,
)

FLUSH_AFTER_S = 0.05


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """These tests configure logging for the whole process: put back what the other tests run with."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy_names = ("aiormq", "aio_pika", "asyncio", "aiohttp.access")
    noisy = {name: logging.getLogger(name).level for name in noisy_names}
    yield
    flush_logs()
    structlog.reset_defaults()
    shared_logging._sink = None
    shared_logging._write_request_line = None
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


class CountingStream(io.StringIO):
    """A stream that remembers how many writes reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def lines(stream: CountingStream) -> list[str]:
    return stream.getvalue().splitlines()


async def test_info_lines_wait_for_the_timer_and_go_out_in_one_write() -> None:
    stream = CountingStream()
    sink = BufferedLineLogger(stream, FLUSH_AFTER_S)
    for n in range(50):
        sink.info(f"line {n}")
    assert stream.writes == 0
    await asyncio.sleep(FLUSH_AFTER_S * 3)
    assert stream.writes == 1
    assert lines(stream) == [f"line {n}" for n in range(50)]


async def test_a_warning_goes_out_at_once_after_the_lines_before_it() -> None:
    stream = CountingStream()
    sink = BufferedLineLogger(stream, 60.0)
    sink.info("first")
    sink.info("second")
    sink.error("trouble")
    assert lines(stream) == ["first", "second", "trouble"]
    sink.warning("more trouble")
    assert lines(stream)[-1] == "more trouble"


def test_without_a_running_loop_every_line_is_written_at_once() -> None:
    stream = CountingStream()
    sink = BufferedLineLogger(stream, 60.0)
    sink.info("from a script")
    assert lines(stream) == ["from a script"]


async def test_a_full_buffer_is_written_before_the_timer() -> None:
    stream = CountingStream()
    sink = BufferedLineLogger(stream, 60.0, max_chars=100)
    for n in range(20):
        sink.info(f"{n:09d}")  # 10 characters with the newline: the tenth line fills the buffer
    assert stream.writes == 2
    assert lines(stream) == [f"{n:09d}" for n in range(20)]


def test_lines_left_by_a_stopped_loop_go_out_with_the_next_loop() -> None:
    """A timer of a loop that stopped never fires: the next line must not wait behind it forever."""
    stream = CountingStream()
    sink = BufferedLineLogger(stream, 60.0)

    async def log(text: str) -> None:
        sink.info(text)

    asyncio.run(log("from the first loop"))
    assert lines(stream) == []
    asyncio.run(log("from the second loop"))
    assert lines(stream) == ["from the first loop", "from the second loop"]


REQUEST_FIELDS = {"request_id": "ab" * 16, "method": "POST", "path": "/api/sync", "site": "s1", "status": 200,
                  "latency_ms": 1.5}


def test_the_access_log_line_has_the_shape_of_every_other_line() -> None:
    """`log_request` skips structlog's processor chain; its line must still read like structlog's."""
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    get_logger("gateway").info("request", **REQUEST_FIELDS)
    log_request("gateway", **REQUEST_FIELDS)
    by_structlog, ours = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(ours) == list(by_structlog)  # same keys, same order
    assert {k: v for k, v in ours.items() if k != "timestamp"} == {
        k: v for k, v in by_structlog.items() if k != "timestamp"
    }
    for stamp in (ours["timestamp"], by_structlog["timestamp"]):  # isoformat drops .000000
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp), stamp


async def test_the_access_log_goes_through_the_buffer_and_respects_the_level() -> None:
    stream = CountingStream()
    configure_logging("info", stream=stream, flush_after_s=FLUSH_AFTER_S)
    log_request("gateway", **REQUEST_FIELDS)
    assert stream.writes == 0  # buffered with the other info lines
    flush_logs()
    assert json.loads(stream.getvalue())["event"] == "request"
    quiet = CountingStream()
    configure_logging("warning", stream=quiet, flush_after_s=FLUSH_AFTER_S)
    log_request("gateway", **REQUEST_FIELDS)
    flush_logs()
    assert quiet.getvalue() == ""


def test_writes_stay_within_a_pipe_buffer_and_split_only_at_line_ends() -> None:
    """Several gateway workers share one stderr pipe: a write of at most 4096 bytes is never interleaved
    with another process's."""
    lines = [f"{n:03d}" + "é" * 60 for n in range(200)] + ["x" * 9000, "last"]
    chunks = write_chunks(lines, limit_bytes=4096)
    assert "".join(chunks).splitlines() == lines
    assert all(chunk.endswith("\n") for chunk in chunks)
    assert [len(c.encode()) > 4096 for c in chunks].count(True) == 1  # the one line longer than a chunk
    assert "x" * 9000 + "\n" in chunks


class FlakyStream(io.StringIO):
    """A stream whose writes fail while `broken` is set."""

    broken = True

    def write(self, text: str) -> int:
        if self.broken:
            raise BrokenPipeError("reader gone")
        return super().write(text)


def test_a_stream_that_refuses_the_write_costs_lines_not_the_request() -> None:
    stream = FlakyStream()
    sink = BufferedLineLogger(stream, 60.0)
    sink.error("nowhere to go")  # must not raise into the code that logged
    sink.error("nor here")
    assert sink.dropped_lines == 2
    stream.broken = False
    sink.error("back")
    notice, line = stream.getvalue().splitlines()
    assert json.loads(notice) == {"event": "log_lines_dropped", "level": "warning", "lines": 2}
    assert line == "back"
    sink.error("again")  # reported once, not on every later write
    assert stream.getvalue().splitlines()[-1] == "again" and stream.getvalue().count("log_lines_dropped") == 1


async def test_a_stdlib_record_goes_out_after_the_lines_logged_before_it() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream, flush_after_s=60.0)
    get_logger("gateway").info("structlog first")
    logging.getLogger("aiohttp.server").error("stdlib second")
    first, second = stream.getvalue().splitlines()
    assert json.loads(first)["event"] == "structlog first"
    assert json.loads(second)["event"] == "stdlib second"


def test_a_stdlib_record_is_one_json_line_traceback_included() -> None:
    """aiormq's and aiohttp's records (a broker disconnect, an error answering a request) were
    multi-line plain text among the JSON lines."""
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        raise ConnectionResetError("broker went away")
    except ConnectionResetError:
        logging.getLogger("aiormq.connection").exception("Unexpected connection close from %s", "remote")
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["component"] == "aiormq.connection" and record["level"] == "error"
    assert record["event"] == "Unexpected connection close from remote"
    assert "ConnectionResetError: broker went away" in record["exception"]
    assert record["timestamp"].endswith("Z")


def test_without_batching_each_line_is_one_write_with_its_newline() -> None:
    """Processes sharing a stderr pipe (`revkernel run`, the gateway's workers) must not split a line
    between two writes, or another process's line can land between its text and its newline."""
    stream = CountingStream()
    configure_logging("info", stream=stream)
    log = get_logger("worker")
    log.info("worker_started", queue="reconciler.commands")
    log.warning("worker_stopping", exit_code=0)
    log_request("gateway", **REQUEST_FIELDS)
    assert stream.writes == 3
    events = [json.loads(line)["event"] for line in lines(stream)]
    assert events == ["worker_started", "worker_stopping", "request"]


def test_processes_writing_to_one_pipe_never_merge_lines() -> None:
    """The symptom itself: two processes logging at once into one unbuffered stderr pipe."""
    script = (
        "import shared.logging as l\n"
        "l.configure_logging('info')\n"
        "log = l.get_logger('worker')\n"
        "for i in range(3000):\n"
        "    log.info('worker_tick', i=i)\n"
    )
    read_end, write_end = os.pipe()
    unbuffered = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children = [
        subprocess.Popen([sys.executable, "-c", script], stderr=write_end, env=unbuffered) for _ in range(2)
    ]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        output = reader.read().decode()
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    ticks = [json.loads(line) for line in output.splitlines()]  # a merged or empty line fails here
    assert len(ticks) == 6000
