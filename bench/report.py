"""The markdown report of a bench session: throughput and latency, CPU by process, ratios, loss checks."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.harness import RunResult, TargetResult

CPU_GROUPS = ("server", "postgres", "redis", "rabbitmq", "wrk", "other", "machine")
STACK = ("server", "postgres", "redis", "rabbitmq")


def median(values: Iterable[float]) -> float:
    data = [v for v in values if not math.isnan(v)]
    return statistics.median(data) if data else math.nan


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _med(runs: Sequence[RunResult], metric: Callable[[RunResult], float]) -> float:
    return median(metric(r) for r in runs)


def events_per_s(result: TargetResult) -> float:
    return _med(result.runs, lambda r: r.wrk.events_per_s)


def p99_ms(result: TargetResult) -> float:
    return _med(result.runs, lambda r: r.wrk.p99_ms)


def cpu_ms_per_1k(run: RunResult, groups: Sequence[str]) -> float:
    """CPU milliseconds spent by `groups` per 1000 events answered (CPU % over the run / events/s)."""
    rate = run.wrk.events_per_s
    if rate <= 0:
        return math.nan
    return sum(run.cpu.get(g, 0.0) for g in groups) / 100 / rate * 1_000_000


def _half_cell(result: TargetResult) -> str:
    """Median p99 of the paced runs, each run's p99, the rate; a note when a run fell short of its rate."""
    halves = result.halves
    if not halves:
        return "—"
    short = [h for h in halves if h.wrk.requests_per_s < 0.9 * h.target_rate]
    note = "".join(f"; only {h.wrk.requests_per_s:,.0f} of {h.target_rate:,.0f} req/s achieved"
                   for h in short)
    events = _med(halves, lambda h: h.wrk.events_per_s)
    median_p99 = fmt(_med(halves, lambda h: h.wrk.p99_ms), 2)
    if len(halves) == 1:
        return f"{median_p99} (at {fmt(events)} ev/s{note})"
    each = ", ".join(fmt(h.wrk.p99_ms, 1) for h in halves)
    return f"**{median_p99}** (runs {each}; at {fmt(events)} ev/s{note})"


def _loss_cell(result: TargetResult) -> str:
    checks = [r.loss for r in [*result.runs, *result.halves] if r.loss is not None]
    if not checks:
        return "n/a (writes nothing)"
    failed = sum(not c.ok for c in checks)
    exact = all(c.exact for c in checks)
    return (f"ok ({len(checks)} runs{', exact' if exact else ''})" if not failed
            else f"**FAILED in {failed} of {len(checks)} runs**")


def ratio_lines(results: Mapping[str, TargetResult]) -> list[str]:
    def measured(key: str) -> TargetResult | None:
        r = results.get(key)
        return r if r is not None and r.runs else None

    product, seed, bare = measured("product"), measured("seed"), measured("bare")
    if product is None:
        return ["- product gateway not measured in this session: no product ratios."]
    lines = []
    ev = events_per_s(product)
    if seed is not None:
        lines.append(f"- product / seed-style: **{ev / events_per_s(seed):.1f}×** events/s; p99 "
                     f"{fmt(p99_ms(product), 1)} ms vs {fmt(p99_ms(seed), 1)} ms")
    if bare is not None:
        lines.append(f"- product / bare handler: **{ev / events_per_s(bare):.2f}×** events/s "
                     f"({100 * ev / events_per_s(bare):.0f}% of the framework's ceiling on this machine)")
    return lines


def render(summary: Mapping[str, str], results: Sequence[TargetResult], started: datetime,
           finished: datetime) -> str:
    out = [f"## Bench {started:%Y-%m-%d %H:%M} UTC ({(finished - started).total_seconds():.0f} s)", ""]
    out += [f"- {key}: {value}" for key, value in summary.items()]
    out.append("")
    measured = [r for r in results if r.runs]
    rows = []
    for r in measured:
        per_run = ", ".join(fmt(run.wrk.events_per_s) for run in r.runs)
        rows.append([
            r.label, f"**{fmt(events_per_s(r))}**", per_run,
            fmt(_med(r.runs, lambda x: x.wrk.requests_per_s)),
            fmt(_med(r.runs, lambda x: x.wrk.p50_ms), 2), fmt(p99_ms(r), 2), _half_cell(r), _loss_cell(r),
        ])
    out.append(table(["target", "events/s", "runs (events/s)", "req/s", "p50 ms", "p99 ms",
                      "p99 ms at ½ peak", "loss check"], rows))
    out.append("")
    out.append("CPU in % of one core over the sending window (200% = both cores), median of the peak runs; "
               "`other` = machine minus the named groups (concurrent work on the machine); "
               "cost = CPU ms of server + postgres + redis + rabbitmq per 1000 events.")
    out.append("")
    cpu_rows = []
    for r in measured:
        cpu_rows.append([r.label, *(fmt(median(run.cpu.get(g, 0.0) for run in r.runs)) for g in CPU_GROUPS),
                         fmt(_med(r.runs, lambda x: cpu_ms_per_1k(x, ("server",))), 1),
                         fmt(_med(r.runs, lambda x: cpu_ms_per_1k(x, STACK)), 1)])
    out.append(table(["target", *CPU_GROUPS, "server ms/1k ev", "stack ms/1k ev"], cpu_rows))
    out.append("")
    out.append("Ratios (medians of this session):")
    out += ratio_lines({r.key: r for r in results}) or ["- no seed-style or bare figures to compare with."]
    skipped = [r for r in results if r.skipped]
    if skipped:
        out.append("")
        out += [f"- {r.label}: not measured: {r.skipped}" for r in skipped]
    out.append("")
    out.append(loss_table(results))
    return "\n".join(out) + "\n"


def loss_table(results: Sequence[TargetResult]) -> str:
    rows = []
    for r in results:
        named = [(str(i), run) for i, run in enumerate(r.runs, 1)]
        named += [("½ peak" if len(r.halves) == 1 else f"½ peak {i}", run)
                  for i, run in enumerate(r.halves, 1)]
        for name, run in named:
            c = run.loss
            if c is None:
                continue
            if c.ok:
                verdict = "ok (exact)" if c.exact else "ok (bounded)"
            else:
                verdict = "**" + "; ".join(c.problems) + "**"
            rows.append([r.key, name, f"{run.wrk.sent_requests:,} / {run.wrk.answers:,}",
                         f"{c.answered_events_2xx:,}", f"{c.answered_accepted:,}", f"{c.rows:,}",
                         f"{c.queue_events:,} ({c.queue_messages:,} msgs)", f"{c.fallback:,}",
                         f"{c.distinct_keys:,}", verdict])
    if not rows:
        return "Loss check: no gate that writes was measured."
    header = ["target", "run", "requests sent / answered", "events in 2xx", "answered accepted",
              "billable rows", "queued events", "fallback rows", "distinct keys queued", "verdict"]
    intro = "Loss check per run (answers counted by bench/load.lua; rows and queue counted by the harness):"
    return intro + "\n\n" + table(header, rows)
