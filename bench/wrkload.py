"""Running wrk with bench/load.lua and reading back its `RKBENCH {json}` summary line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOAD_SCRIPT = Path(__file__).resolve().parent / "load.lua"
SUMMARY_PREFIX = "RKBENCH "


class WrkOutputError(RuntimeError):
    """wrk ended without the script's summary line (it crashed, or the script failed)."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str
    duration_s: int
    connections: int
    threads: int
    batch: int  # 0 = single events; N = batches of N events
    rate: float  # aggregate requests/s; 0 = as fast as the connections go
    send_s: float  # stop sending after this long, so in-flight requests finish before wrk stops
    nonce: str

    def argv(self, wrk: str = "wrk") -> list[str]:
        # wrk's rate argument is per thread: the script paces each thread on its own schedule.
        per_thread = self.rate / self.threads if self.rate > 0 else 0
        return [
            wrk,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{self.duration_s}s",
            "--latency",
            "-s",
            str(LOAD_SCRIPT),
            self.url,
            "--",
            f"nonce={self.nonce}",
            f"batch={self.batch}",
            f"rate={per_thread:.3f}",
            f"send_ms={int(self.send_s * 1000)}",
        ]


def send_window_s(duration_s: int) -> float:
    """Seconds of a run spent sending: the tail (10 %, between 0.5 and 2 s) lets in-flight requests end."""
    quiesce = min(2.0, max(0.5, duration_s * 0.1))
    if duration_s <= quiesce:
        raise ValueError(f"a run must last more than {quiesce} s")
    return duration_s - quiesce


@dataclass(frozen=True, slots=True)
class WrkResult:
    tally: dict[str, float]
    latency_us: dict[str, float]
    wrk: dict[str, float]

    def _t(self, key: str) -> int:
        return int(self.tally.get(key, 0))

    @property
    def active_s(self) -> float:
        """First request sent to last answer received."""
        return self.tally.get("active_ms", 0.0) / 1000

    @property
    def events_per_s(self) -> float:
        """Events in 2xx answers per second of activity (a batch answer counts its events)."""
        return self._t("events_2xx") / self.active_s if self.active_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self._t("answers") / self.active_s if self.active_s > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return self.latency_us.get("p50", math.nan) / 1000

    @property
    def p99_ms(self) -> float:
        return self.latency_us.get("p99", math.nan) / 1000

    @property
    def sent_requests(self) -> int:
        return self._t("sent_requests")

    @property
    def answers(self) -> int:
        return self._t("answers")

    @property
    def answers_2xx(self) -> int:
        return self._t("answers_2xx")

    @property
    def non_2xx(self) -> int:
        return self._t("answers_other")

    @property
    def events_2xx(self) -> int:
        return self._t("events_2xx")

    @property
    def accepted(self) -> int:
        """Events the server answered as accepted: `queued` + `degraded`, or the sum of batch `accepted`."""
        return self._t("accepted")

    @property
    def unanswered_requests(self) -> int:
        return self.sent_requests - self.answers

    @property
    def unanswered_events(self) -> int:
        return self._t("sent_events") - (self.answers * self.events_per_request)

    @property
    def events_per_request(self) -> int:
        sent = self.sent_requests
        return self._t("sent_events") // sent if sent else 1

    @property
    def socket_errors(self) -> int:
        keys = ("connect_errors", "read_errors", "write_errors", "timeouts")
        return sum(int(self.wrk.get(k, 0)) for k in keys)

    def count(self, key: str) -> int:
        """A raw tally (queued, degraded, duplicate, rejected, invalid, unlabelled, other_status)."""
        return self._t(key)


def parse_wrk_output(text: str) -> WrkResult:
    """The summary line printed by load.lua's done(); WrkOutputError if it is missing."""
    for line in text.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            data: dict[str, Any] = json.loads(line[len(SUMMARY_PREFIX) :])
            return WrkResult(
                tally={k: float(v) for k, v in data["tally"].items()},
                latency_us={k: float(v) for k, v in data["latency_us"].items()},
                wrk={k: float(v) for k, v in data["wrk"].items()},
            )
    tail = "\n".join(text.splitlines()[-15:])
    raise WrkOutputError(f"wrk printed no {SUMMARY_PREFIX.strip()} line; its output ended with:\n{tail}")
