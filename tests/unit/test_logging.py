"""The gateway's buffered log output: info lines batched per event-loop tick window, never reordered,
never stranded."""

from __future__ import annotations

import asyncio
import io

from shared.logging import BufferedLineLogger

FLUSH_AFTER_S = 0.05


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
