"""`make bench` (single events) and `make bench-batch` (batches of 50): the seed-style gate, the bare
aiohttp handler and the product gateway under the same wrk load (bench/load.lua), in turn.

Each target is started, waited for until every worker listens, probed with one event and warmed up;
then the peak runs go round-robin over the targets (BENCH_RUNS rounds), then one run per target paced
at half of its median peak rate; then they are stopped. Each run samples CPU by process group
(bench/procstat.py) over the sending window; after each run of a gate that writes (seed-style,
product) the loss check compares what the server answered with the billable rows it committed and
the events it put on its queue (drained from the harness's own vhost).

Everything runs against resources the harness creates and removes: a private redis-server, the
RabbitMQ vhost `rk-bench`, the database `rk_bench` (product, dropped and migrated afresh) and `bench`
(seed-style gate, its own tables). Results: a markdown report on stdout and in bench/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import aio_pika
import asyncpg

from bench import report
from bench.procs import Launcher, StartError, free_port
from bench.procstat import cpu_percent_by_group, make_classifier, snapshot
from bench.stores import (
    Drained,
    connect_patiently,
    create_vhost,
    delete_vhost,
    drain_queue,
    drop_database,
    execute,
    fetch_count,
    wait_stable,
)
from bench.wrkload import LoadSpec, WrkOutputError, WrkResult, parse_wrk_output, send_window_s
from shared.migrate import create_database_if_missing
from shared.sites import create_site

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
REFERENCE = BENCH_DIR / "reference"
PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672"
N_SITES = 16
SITE_RATE_LIMIT = 100_000_000
SITE_MONTHLY_LIMIT = 1_000_000_000
TARGETS = ("seed", "bare", "product")
PROFILE_FORMATS = {"flamegraph": "svg", "speedscope": "speedscope.json", "raw": "txt"}


@dataclass(frozen=True, slots=True)
class Options:
    batch: int
    duration_s: int
    runs: int
    connections: int
    threads: int
    workers: int
    targets: tuple[str, ...]
    half_fraction: float
    half_runs: int
    warmup_s: int
    gateway_log_level: str
    product_db: str
    naive_db: str
    vhost: str
    keep: bool
    out_dir: Path
    profile: str | None = None  # py-spy output format; profiles the product's first run of `profile_run`
    profile_native: bool = False
    profile_run: str = "peak"  # "peak" or "half" (the paced run)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def parse_options(argv: Sequence[str] | None = None) -> Options:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=_env_int("BENCH_BATCH", 0),
                   help="events per request (0 = single events) [BENCH_BATCH]")
    p.add_argument("--duration", type=int, default=_env_int("BENCH_DURATION", 15),
                   help="seconds per wrk run [BENCH_DURATION=15]")
    p.add_argument("--runs", type=int, default=_env_int("BENCH_RUNS", 3),
                   help="peak runs per target; the table shows their median [BENCH_RUNS=3]")
    p.add_argument("--connections", type=int, default=_env_int("BENCH_CONNECTIONS", 64))
    p.add_argument("--threads", type=int, default=_env_int("BENCH_THREADS", 1))
    p.add_argument("--workers", type=int, default=_env_int("BENCH_WORKERS", 2),
                   help="processes per server [BENCH_WORKERS=2]")
    p.add_argument("--targets", default=env("BENCH_TARGETS", ",".join(TARGETS)),
                   help="comma-separated subset of seed,bare,product [BENCH_TARGETS]")
    p.add_argument("--half", type=float, default=float(env("BENCH_HALF", "0.5")),
                   help="paced runs at this fraction of the peak rate; 0 skips them [BENCH_HALF=0.5]")
    p.add_argument("--half-runs", type=int, default=None,
                   help="paced runs per target; the table shows the median p99 [BENCH_HALF_RUNS, "
                        "default: as many as --runs]")
    p.add_argument("--warmup", type=int, default=_env_int("BENCH_WARMUP", 3),
                   help="seconds of unmeasured load before the runs [BENCH_WARMUP=3]")
    p.add_argument("--gateway-log-level", default=env("BENCH_GATEWAY_LOG_LEVEL", "info"),
                   help="LOG_LEVEL of the product gateway; info = one log line per request, as deployed")
    p.add_argument("--keep", action="store_true", default=env("BENCH_KEEP", "") == "1",
                   help="keep the rk_bench database and the vhost afterwards [BENCH_KEEP=1]")
    p.add_argument("--out", type=Path, default=Path(env("BENCH_OUT", str(BENCH_DIR / "out"))))
    p.add_argument("--profile", choices=PROFILE_FORMATS,
                   help="py-spy the product gateway (all workers) during one run (--profile-run); "
                        "bench/profile.sh sets this")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C extension frames)")
    p.add_argument("--profile-run", choices=("peak", "half"), default=env("PROFILE_RUN", "peak"),
                   help="which run --profile records: the first peak run or the paced one [PROFILE_RUN]")
    a = p.parse_args(argv)
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        p.error(f"--targets: choose among {', '.join(TARGETS)} (got {a.targets!r})")
    if a.batch < 0 or a.batch > 100:
        p.error("--batch must be between 0 and 100 (SPEC §3)")
    half_runs = a.half_runs if a.half_runs is not None else _env_int("BENCH_HALF_RUNS", a.runs)
    if a.runs < 1 or a.connections < a.threads or a.workers < 1 or not 0 <= a.half < 1 or half_runs < 1:
        p.error("need --runs >= 1, --half-runs >= 1, --connections >= --threads, --workers >= 1, "
                "0 <= --half < 1")
    send_window_s(a.duration)  # validates the duration
    return Options(
        batch=a.batch, duration_s=a.duration, runs=a.runs, connections=a.connections, threads=a.threads,
        workers=a.workers, targets=targets, half_fraction=a.half, half_runs=half_runs,
        warmup_s=max(0, a.warmup),
        gateway_log_level=a.gateway_log_level, product_db=env("BENCH_DB", "rk_bench"),
        naive_db=env("BENCH_NAIVE_DB", "bench"), vhost=env("BENCH_VHOST", "rk-bench"), keep=a.keep,
        out_dir=a.out, profile=a.profile, profile_native=a.profile_native, profile_run=a.profile_run,
    )


@dataclass(slots=True)
class LossCheck:
    """Answers of one run against what the server wrote: billable rows, queued events, fallback rows."""

    answered_accepted: int
    answered_events_2xx: int
    rows: int
    queue_events: int
    queue_messages: int
    fallback: int
    distinct_keys: int
    unanswered_events: int
    exact: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def judge(result: WrkResult, rows: int, fallback: int, drained: Drained) -> LossCheck:
    """The loss check of one run (pure). Every event of the load is unique and no limit can trip, so
    every event in a 2xx answer must be accepted, and each accepted event must be exactly one billable
    row and exactly one queued event (or one fallback row, for a degraded capture).

    When every request sent was answered (the script stops sending before wrk stops), rows must equal
    the accepted answers; otherwise the unanswered events bound the difference.
    """
    accepted = result.accepted
    unanswered = max(0, result.unanswered_events)
    exact = result.unanswered_requests == 0 and result.socket_errors == 0
    check = LossCheck(
        answered_accepted=accepted, answered_events_2xx=result.events_2xx, rows=rows,
        queue_events=drained.events, queue_messages=drained.messages, fallback=fallback,
        distinct_keys=drained.distinct_keys, unanswered_events=unanswered, exact=exact,
    )
    problems = check.problems
    if exact and rows != accepted:
        problems.append(f"billable rows {rows} != events answered accepted {accepted}")
    if not exact and not accepted <= rows <= accepted + unanswered:
        problems.append(f"billable rows {rows} outside [{accepted}, {accepted + unanswered}] "
                        f"(accepted answers + unanswered events)")
    if drained.events + fallback != rows:
        problems.append(f"queued events {drained.events} + fallback rows {fallback} != billable rows {rows}")
    if drained.distinct_keys != drained.events:
        duplicated = drained.events - drained.distinct_keys
        problems.append(f"{duplicated} events queued twice (same idempotency key)")
    if drained.malformed:
        problems.append(f"{drained.malformed} malformed queue messages")
    if accepted != result.events_2xx:
        problems.append(f"{result.events_2xx - accepted} events in 2xx answers were not accepted "
                        f"(duplicate {result.count('duplicate')}, rejected {result.count('rejected')}, "
                        f"invalid {result.count('invalid')}, unlabelled {result.count('unlabelled')}, "
                        f"other {result.count('other_status')}) though every event is unique")
    if result.non_2xx:
        problems.append(f"{result.non_2xx} non-2xx answers")
    return check


@dataclass(slots=True)
class RunResult:
    kind: str  # warmup | peak | half
    wrk: WrkResult
    cpu: dict[str, float]
    target_rate: float  # requests/s asked for; 0 = peak
    loss: LossCheck | None


@dataclass(slots=True)
class TargetResult:
    key: str
    label: str
    batch: int
    runs: list[RunResult] = field(default_factory=list)
    halves: list[RunResult] = field(default_factory=list)  # the paced runs
    skipped: str | None = None
    exit_code: int | None = None


@dataclass
class Target:
    key: str
    label: str
    argv: list[str]
    env: dict[str, str] | None
    port: int
    batch: int
    rows_dsn: str | None = None  # the database whose billable rows the loss check counts
    queue: str | None = None  # the queue the gate publishes to, drained after every run
    fallback: bool = False  # the product's ingest_fallback_buffer counts as captured
    prepare: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/sync"


@dataclass(slots=True)
class Live:
    """A target that is up and being measured."""

    target: Target
    result: TargetResult
    pid: int


# What makes one target fail without stopping the others.
FAILURES = (StartError, WrkOutputError, TimeoutError, subprocess.SubprocessError, OSError,
            asyncpg.PostgresError, aio_pika.exceptions.AMQPError)


class Bench:
    def __init__(self, opts: Options, runner: asyncio.Runner) -> None:
        self.opts = opts
        self.run_async = runner.run
        self.launcher = Launcher(opts.out_dir / ".pids", opts.out_dir / "logs")
        self.redis_port = 0
        self.redis_pid = 0
        self.amqp_url = f"{AMQP}/{opts.vhost}"
        self.product_dsn = f"{PG}/{opts.product_db}"
        self.naive_dsn = f"{PG}/{opts.naive_db}"
        self.profiles: list[Path] = []
        self.results: list[TargetResult] = []

    def log(self, message: str) -> None:
        print(f"[bench {datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)

    # ---- shared resources -------------------------------------------------------------------

    def setup(self) -> None:
        self.redis_port = free_port()
        self.redis_pid = self.launcher.start("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
        ])
        self.launcher.wait_listening("redis", self.redis_port, 1)
        create_vhost(self.opts.vhost)
        self.log(f"private redis on :{self.redis_port}, vhost {self.opts.vhost}")

    def teardown(self) -> None:
        try:
            self.launcher.stop_all()
        finally:
            if not self.opts.keep:
                try:
                    delete_vhost(self.opts.vhost)
                finally:
                    if "product" in self.opts.targets:
                        drop_database(self.opts.product_db)

    # ---- targets ----------------------------------------------------------------------------

    def build(self, key: str) -> Target:
        port, w, python = free_port(), str(self.opts.workers), sys.executable
        if key == "seed":
            self.run_async(create_database_if_missing(self.naive_dsn))
            return Target(
                key, "seed-style gate" + (" (single events: no batch API)" if self.opts.batch else ""),
                [python, str(REFERENCE / "naive_gate.py"), "--host", "127.0.0.1", "--port", str(port),
                 "--workers", w, "--dsn", self.naive_dsn, "--redis-port", str(self.redis_port),
                 "--amqp", self.amqp_url],
                None, port, batch=0, rows_dsn=self.naive_dsn, queue="naive.events",
                prepare=lambda: self.run_async(execute(self.naive_dsn, "bench_naive_reset")),
            )
        if key == "bare":
            return Target(key, "bare aiohttp handler",
                          [python, str(REFERENCE / "bare.py"), "--port", str(port), "--procs", w, "--uvloop"],
                          None, port, batch=self.opts.batch)
        env = {
            **os.environ,
            "DATABASE_URL": self.product_dsn,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AMQP_URL": self.amqp_url,
            "RATE_LIMIT_PER_MINUTE": str(SITE_RATE_LIMIT),
            "LOG_LEVEL": self.opts.gateway_log_level,
        }
        revkernel = str(Path(python).with_name("revkernel"))
        drop_database(self.opts.product_db)
        subprocess.run([revkernel, "migrate"], env=env, check=True, capture_output=True, timeout=300)
        self.run_async(self._create_sites())
        return Target(key, "product gateway",
                      [revkernel, "gateway", "--host", "127.0.0.1", "--port", str(port), "--workers", w],
                      env, port, batch=self.opts.batch, rows_dsn=self.product_dsn, queue="ingest.events",
                      fallback=True)

    async def _create_sites(self) -> None:
        conn = await connect_patiently(self.product_dsn)
        try:
            for i in range(1, N_SITES + 1):
                await create_site(conn, public_id=f"site-pub-{i}", name=f"bench site {i}",
                                  allowed_origins=["*"], rate_limit_per_minute=SITE_RATE_LIMIT,
                                  monthly_limit=SITE_MONTHLY_LIMIT)
        finally:
            await conn.close()

    def probe(self, target: Target) -> str | None:
        """POST one event until the target answers 200 (queued, for a gate); a reason to skip it, or None."""
        body = json.dumps({"s": "site-pub-1", "url": f"https://example.com/probe/{uuid.uuid4().hex}"})
        give_up, last = time.monotonic() + 30, ""
        while time.monotonic() < give_up:
            request = urllib.request.Request(target.url, data=body.encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = response.read().decode(errors="replace")
                if target.rows_dsn is None or '"queued"' in answer:
                    return None
                last = f"200 {answer[:200]}"
            except urllib.error.HTTPError as exc:
                if exc.code == 404 and target.key == "product":
                    return "POST /api/sync answers 404: the ingest route is not wired into the gateway yet"
                last = f"{exc.code} {exc.read()[:200].decode(errors='replace')}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise StartError(f"{target.key}: the probe event was never queued; last answer: {last}")

    def bring_up(self, key: str) -> Live | None:
        """Start one target, probe it, warm it up; None when it is skipped (result recorded)."""
        result = TargetResult(key, key, self.opts.batch)
        self.results.append(result)
        try:
            target = self.build(key)
            result.label, result.batch = target.label, target.batch
            self.log(f"{key}: starting {' '.join(target.argv[:3])} ... on :{target.port}")
            pid = self.launcher.start(key, target.argv, target.env)
            self.launcher.wait_listening(key, target.port, self.opts.workers)
            result.skipped = self.probe(target)
            if result.skipped:
                self.log(f"{key}: skipped: {result.skipped}")
                result.exit_code = self.launcher.stop(key)
                return None
            if target.prepare is not None:
                target.prepare()
            if target.queue is not None:  # the probe's message: the first loss check starts from empty
                self.run_async(drain_queue(self.amqp_url, target.queue))
            live = Live(target, result, pid)
            if self.opts.warmup_s:
                warm = self.run_load(target, pid, "warmup", max(2, self.opts.warmup_s), 0)
                self.log(f"{key}: warm-up {self._line(warm)}")
        except FAILURES as exc:
            self.fail(result, exc)
            return None
        return live

    def fail(self, result: TargetResult, exc: BaseException) -> None:
        self.log(f"{result.key}: FAILED: {exc}")
        result.skipped = f"failed: {exc}"
        result.exit_code = self.launcher.stop(result.key)

    def bench_all(self) -> None:
        """Every target up at once, then the runs round-robin (seed, bare, product, seed, ...): noise
        from concurrent work on the machine drifts over minutes, and interleaving spreads it evenly
        over the targets instead of loading it onto whichever ran last."""
        live = [entry for key in self.opts.targets if (entry := self.bring_up(key)) is not None]
        self._round_robin(live, "peak", self.opts.runs)
        self._round_robin(live, "half", self.opts.half_runs if self.opts.half_fraction else 0)
        for entry in live:
            entry.result.exit_code = self.launcher.stop(entry.target.key)

    def _round_robin(self, live: list[Live], kind: str, rounds: int) -> None:
        """`rounds` rounds of one `kind` run per live target (peak, or paced at `half_fraction` of the
        target's median peak); a target whose run fails is stopped and leaves `live`."""
        for i in range(rounds):
            for entry in list(live):
                rate = 0.0
                if kind == "half":
                    peak = statistics.median(r.wrk.requests_per_s for r in entry.result.runs)
                    rate = self.opts.half_fraction * peak
                try:
                    run = self.run_load(entry.target, entry.pid, kind, self.opts.duration_s, rate)
                except FAILURES as exc:
                    self.fail(entry.result, exc)
                    live.remove(entry)
                    continue
                (entry.result.halves if kind == "half" else entry.result.runs).append(run)
                what = f"paced run {i + 1}/{rounds} at {rate:,.0f} req/s" if rate else f"run {i + 1}/{rounds}"
                self.log(f"{entry.target.key}: {what} {self._line(run)}")

    @staticmethod
    def _line(run: RunResult) -> str:
        w = run.wrk
        loss = "" if run.loss is None else (" loss check ok" if run.loss.ok else
                                           " LOSS CHECK FAILED: " + "; ".join(run.loss.problems))
        return (f"{w.events_per_s:,.0f} events/s, {w.requests_per_s:,.0f} req/s, p50 {w.p50_ms:.2f} ms, "
                f"p99 {w.p99_ms:.2f} ms, server CPU {run.cpu.get('server', 0):.0f}%{loss}")

    # ---- one wrk run ------------------------------------------------------------------------

    def _start_profiler(self, target: Target, server_pid: int, kind: str, send_s: float) -> str | None:
        """py-spy on the gateway and its workers over the sending window of its first `profile_run` run."""
        fmt = self.opts.profile
        if fmt is None or target.key != "product" or kind != self.opts.profile_run or self.profiles:
            return None
        mode = (f"batch{target.batch}" if target.batch else "single") + ("-half" if kind == "half" else "")
        path = self.opts.out_dir / f"profile-{mode}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.{PROFILE_FORMATS[fmt]}"
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        argv = [py_spy, "record", "--pid", str(server_pid), "--subprocesses", "--duration",
                str(max(1, int(send_s))), "--rate", "100", "--format", fmt, "--output", str(path)]
        if self.opts.profile_native:
            argv.append("--native")
        self.profiles.append(path)
        self.launcher.start("py-spy", argv)
        return "py-spy"

    def _finish_profiler(self, name: str) -> None:
        proc = self.launcher.running[name]
        proc.wait(timeout=60)
        self.launcher.stop(name)
        path = self.profiles[-1]
        if proc.returncode != 0 or not path.exists():
            raise StartError(f"py-spy failed ({proc.returncode}); see {self.launcher.log_path(name)}:\n"
                             + self.launcher.log_tail(name))
        self.log(f"profile written to {path}")

    def _counts(self, target: Target) -> tuple[int, int]:
        assert target.rows_dsn is not None
        dsn = target.rows_dsn

        async def rows() -> int:
            return await fetch_count(dsn, "bench_billable_rows")

        billable = self.run_async(wait_stable(rows))
        fallback = self.run_async(fetch_count(dsn, "bench_fallback_rows")) if target.fallback else 0
        return billable, fallback

    def run_load(self, target: Target, server_pid: int, kind: str, duration_s: int, rate: float) -> RunResult:
        before = self._counts(target) if target.rows_dsn else (0, 0)
        send_s = send_window_s(duration_s)
        spec = LoadSpec(target.url, duration_s, self.opts.connections, self.opts.threads, target.batch,
                        rate, send_s, uuid.uuid4().hex[:12])
        name = f"wrk-{target.key}-{kind}-{uuid.uuid4().hex[:4]}"
        profiler = self._start_profiler(target, server_pid, kind, send_s)
        wrk_pid = self.launcher.start(name, spec.argv())
        start = snapshot()
        # The CPU window is the sending window: after it, only the last in-flight requests finish.
        time.sleep(max(0.0, start.taken_at + send_s - time.monotonic()))
        end = snapshot()
        proc = self.launcher.running[name]
        proc.wait(timeout=duration_s + 60)
        self.launcher.stop(name)
        if profiler is not None:
            self._finish_profiler(profiler)
        wrk = parse_wrk_output(self.launcher.log_path(name).read_text(errors="replace"))
        classify = make_classifier(
            end.procs, {"server": [server_pid], "wrk": [wrk_pid], "redis": [self.redis_pid]},
            [self.opts.product_db, self.opts.naive_db],
        )
        cpu = cpu_percent_by_group(start, end, classify)
        loss = None
        if target.rows_dsn is not None and target.queue is not None:
            rows, fallback = self._counts(target)
            drained = self.run_async(drain_queue(self.amqp_url, target.queue))
            loss = judge(wrk, rows - before[0], fallback - before[1], drained)
        return RunResult(kind, wrk, cpu, rate, loss)


def _sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _sigterm)
    started = datetime.now(UTC)
    summary = opts_summary(opts, argv)  # now: the commit under test, not whatever lands during the run
    with asyncio.Runner() as runner:
        bench = Bench(opts, runner)
        try:
            bench.setup()
            bench.bench_all()
        finally:
            bench.teardown()
    results = bench.results
    text = report.render(summary, results, started, datetime.now(UTC))
    print(text)
    mode = f"batch{opts.batch}" if opts.batch else "single"
    path = opts.out_dir / f"bench-{mode}-{started:%Y%m%dT%H%M%SZ}.md"
    path.write_text(text)
    print(f"[bench] report written to {path}", file=sys.stderr)
    checks = [run.loss for r in results for run in [*r.runs, *r.halves]]
    if any(r.skipped and r.skipped.startswith("failed") for r in results):
        return 2
    return 1 if any(c is not None and not c.ok for c in checks) else 0

def opts_summary(opts: Options, argv: Sequence[str] | None) -> dict[str, str]:
    args = list(sys.argv[1:] if argv is None else argv)
    paced = (f", {opts.half_runs} run(s) paced at {opts.half_fraction:g} x the median peak rate (median p99 "
             "shown)") if opts.half_fraction else ""
    return {
        "command": "bash bench/run.sh" + (" " + " ".join(args) if args else ""),
        "load": (f"wrk -t{opts.threads} -c{opts.connections} -d{opts.duration_s}s --latency -s bench/load.lua"
                 f" (batch={opts.batch}), {opts.runs} peak run(s) per target (median shown), warm-up "
                 f"{opts.warmup_s} s{paced}"),
        "servers": f"{opts.workers} processes each (SO_REUSEPORT); "
                   f"product LOG_LEVEL={opts.gateway_log_level}",
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "commit": _git_commit(),
        **({"profile": f"py-spy record ({opts.profile}{', --native' if opts.profile_native else ''}) on the "
                       "product's first peak run: its figures include the sampling overhead"}
           if opts.profile else {}),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as exc:
        return f"unknown CPU ({exc})"
    return "unknown CPU"


def _git_commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
