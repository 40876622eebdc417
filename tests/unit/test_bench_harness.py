"""The benchmark harness's pure parts (bench/): /proc parsing and CPU attribution, wrk summary, queue
message counting, the loss-check verdict and the report's ratios."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from bench.harness import LossCheck, RunResult, TargetResult, judge, parse_options
from bench.procs import count_listeners
from bench.procstat import (
    CLK_TCK,
    Proc,
    Snapshot,
    cpu_percent_by_group,
    make_classifier,
    parse_machine_busy,
    parse_stat,
    postgres_database,
)
from bench.report import ratio_lines, render
from bench.stores import Drained, count_message
from bench.wrkload import LoadSpec, WrkOutputError, WrkResult, parse_wrk_output, send_window_s


def wrk_result(**tally: float) -> WrkResult:
    base = {"sent_requests": 100, "sent_events": 100, "answers": 100, "answers_2xx": 100,
            "answers_other": 0, "events_2xx": 100, "accepted": 100, "active_ms": 2000.0}
    base.update(tally)
    return WrkResult(tally=base, latency_us={"p50": 1500.0, "p99": 9000.0}, wrk={"timeouts": 0})


def drained(events: int, messages: int | None = None, distinct: int | None = None,
            malformed: int = 0) -> Drained:
    return Drained(messages=events if messages is None else messages, events=events,
                   distinct_keys=events if distinct is None else distinct, malformed=malformed)


# ---- /proc ------------------------------------------------------------------------------------


def test_parse_stat_handles_spaces_and_parentheses_in_comm() -> None:
    # fields after comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    # cutime cstime priority nice threads itrealvalue starttime ...
    stat = "4242 (we ird) (name)) S 17 4242 4242 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 1 0 98765 0 0"
    proc = parse_stat(4242, stat, "python x.py")
    assert (proc.pid, proc.ppid, proc.comm) == (4242, 17, "we ird) (name)")
    assert proc.cpu_ticks == 300
    assert proc.start_ticks == 98765


def test_machine_busy_excludes_idle_and_iowait() -> None:
    text = "cpu  100 5 20 9999 77 3 2 1 0 0\ncpu0 50 2 10 5000 40 1 1 0 0 0\n"
    assert parse_machine_busy(text) == 100 + 5 + 20 + 3 + 2 + 1


@pytest.mark.parametrize(
    ("title", "database"),
    [
        ("postgres: 15/main: postgres rk_bench 127.0.0.1(54321) idle", "rk_bench"),
        ("postgres: postgres bench [local] INSERT", "bench"),
        ("postgres: 15/main: walwriter", None),
        ("postgres: 15/main: autovacuum launcher", None),
        ("/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main", None),
    ],
)
def test_postgres_backend_database(title: str, database: str | None) -> None:
    proc = Proc(pid=1, ppid=0, comm="postgres", start_ticks=1, cpu_ticks=0, title=title)
    assert postgres_database(proc) == database


def _proc(pid: int, ppid: int, ticks: int, comm: str = "python", title: str = "", start: int = 1) -> Proc:
    return Proc(pid=pid, ppid=ppid, comm=comm, start_ticks=start, cpu_ticks=ticks, title=title)


BENCH_BACKEND = "postgres: 15/main: postgres rk_bench 127.0.0.1(1) idle"
FOREIGN_BACKEND = "postgres: 15/main: postgres rk_t_9 127.0.0.1(2) idle"
BROKER = "/usr/lib/erlang/erts-13.1.5/bin/beam.smp -W w -- -noshell -noinput -s rabbit boot -boot start_sasl"
RABBITMQCTL = "/usr/lib/erlang/erts-13.1.5/bin/beam.smp -- -sname epmd-starter-92 -noshell -s erlang halt"


def test_cpu_by_group_attributes_trees_services_and_other() -> None:
    before = {
        10: _proc(10, 1, 100),  # server leader
        11: _proc(11, 10, 1000),  # server worker
        20: _proc(20, 1, 0, comm="wrk"),
        30: _proc(30, 1, 500, comm="postgres", title="postgres: 15/main: walwriter"),
        31: _proc(31, 30, 200, comm="postgres", title=BENCH_BACKEND),
        32: _proc(32, 30, 300, comm="postgres", title=FOREIGN_BACKEND),
        40: _proc(40, 1, 7000, comm="beam.smp", title=BROKER),
        41: _proc(41, 40, 10, comm="erl_child_setup"),
        42: _proc(42, 1, 0, comm="beam.smp", title=RABBITMQCTL),
        50: _proc(50, 1, 900, start=5),  # exits; its pid is reused by an unrelated process
    }
    after = {
        10: _proc(10, 1, 110),
        11: _proc(11, 10, 1150),
        12: _proc(12, 10, 40),  # a worker started during the run counts all its time
        20: _proc(20, 1, 60, comm="wrk"),
        30: _proc(30, 1, 510, comm="postgres", title="postgres: 15/main: walwriter"),
        31: _proc(31, 30, 280, comm="postgres", title=BENCH_BACKEND),
        32: _proc(32, 30, 999, comm="postgres", title=FOREIGN_BACKEND),
        40: _proc(40, 1, 7030, comm="beam.smp", title=BROKER),
        41: _proc(41, 40, 12, comm="erl_child_setup"),
        42: _proc(42, 1, 80, comm="beam.smp", title=RABBITMQCTL),  # someone's rabbitmqctl: other
        50: _proc(50, 12, 25, start=9),  # reused pid, now below the server: counts from zero
    }
    start = Snapshot(taken_at=100.0, procs=before, machine_busy_ticks=10_000)
    end = Snapshot(taken_at=102.0, procs=after, machine_busy_ticks=10_000 + 450)
    classify = make_classifier(after, {"server": [10], "wrk": [20]}, ["rk_bench"])
    cpu = cpu_percent_by_group(start, end, classify)

    def pct(ticks: int) -> float:
        return 100.0 * ticks / CLK_TCK / 2.0

    assert cpu["server"] == pytest.approx(pct(10 + 150 + 40 + 25))
    assert cpu["wrk"] == pytest.approx(pct(60))
    assert cpu["postgres"] == pytest.approx(pct(10 + 80))  # the rk_t_9 backend is someone else's
    assert cpu["rabbitmq"] == pytest.approx(pct(30 + 2))
    assert cpu["machine"] == pytest.approx(pct(450))
    assert cpu["other"] == pytest.approx(pct(450 - 225 - 60 - 90 - 32))


def test_count_listeners_counts_listen_sockets_of_the_port() -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout\n"
    tcp = header + (
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1\n"
        "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 2 1\n"
        "   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000 0 0 3 1\n"
        "   3: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 4 1\n"
    )
    any6 = "00000000000000000000000000000000"
    tcp6 = header + f"   0: {any6}:1F90 {any6}:0000 0A 0 0\n"
    assert count_listeners(0x1F90, [tcp, tcp6]) == 3
    assert count_listeners(0x1F92, [tcp]) == 0


# ---- wrk ------------------------------------------------------------------------------------------


def test_parse_wrk_output_reads_the_summary_line() -> None:
    summary = {"tally": {"sent_requests": 10, "sent_events": 500, "answers": 10, "answers_2xx": 10,
                         "events_2xx": 500, "accepted": 500, "active_ms": 250},
               "latency_us": {"p50": 2000, "p99": 8000}, "wrk": {"timeouts": 0, "read_errors": 0}}
    text = "Running 5s test @ http://x\n  Latency ...\nRKBENCH " + json.dumps(summary) + "\n"
    result = parse_wrk_output(text)
    assert result.events_per_s == pytest.approx(2000.0)
    assert result.requests_per_s == pytest.approx(40.0)
    assert (result.p50_ms, result.p99_ms) == (2.0, 8.0)
    assert result.events_per_request == 50
    assert (result.unanswered_requests, result.unanswered_events, result.socket_errors) == (0, 0, 0)


def test_parse_wrk_output_without_summary_raises_with_the_tail() -> None:
    with pytest.raises(WrkOutputError, match="PANIC"):
        parse_wrk_output("Running 5s test\nPANIC: unprotected error in call to Lua API\n")


def test_unanswered_events_of_batches() -> None:
    result = wrk_result(sent_requests=12, sent_events=600, answers=10)
    assert (result.unanswered_requests, result.unanswered_events) == (2, 100)


def test_send_window_leaves_a_tail_for_in_flight_requests() -> None:
    assert send_window_s(15) == 13.5
    assert send_window_s(3) == 2.5
    assert send_window_s(60) == 58.0
    with pytest.raises(ValueError):
        send_window_s(0)


def test_load_spec_paces_each_thread_at_its_share() -> None:
    argv = LoadSpec("http://127.0.0.1:1/api/sync", 15, 64, 2, 50, 300.0, 13.5, "n1").argv()
    assert argv[:5] == ["wrk", "-t2", "-c64", "-d15s", "--latency"]
    assert argv[-4:] == ["nonce=n1", "batch=50", "rate=150.000", "send_ms=13500"]


# ---- queue messages ------------------------------------------------------------------------------


def test_count_message_single_and_batch() -> None:
    keys: set[str] = set()
    assert count_message(b'{"s":"a","idempotency_key":"k1"}', {}, keys) == (1, True)
    batch = json.dumps({"events": [{"idempotency_key": f"b{i}"} for i in range(3)]}).encode()
    assert count_message(batch, {"x-event-count": 3}, keys) == (3, True)
    assert keys == {"k1", "b0", "b1", "b2"}


def test_count_message_flags_malformed_messages() -> None:
    keys: set[str] = set()
    two = json.dumps({"events": [{"idempotency_key": "x"}, {"idempotency_key": "y"}]}).encode()
    assert count_message(two, {"x-event-count": 3}, keys) == (2, False)  # header disagrees
    assert count_message(b'{"s":"a"}', {}, keys) == (1, False)  # no idempotency key
    assert count_message(b"not json", {}, keys) == (1, False)
    assert count_message(b'{"s":"a"}', {"x-event-count": 4}, keys) == (4, False)  # header, no events


# ---- loss check ---------------------------------------------------------------------------------


def test_judge_exact_run_without_loss() -> None:
    check = judge(wrk_result(), rows=100, fallback=0, drained=drained(100))
    assert check.ok and check.exact


def test_judge_counts_fallback_rows_as_captured() -> None:
    result = wrk_result(queued=90, degraded=10)
    assert judge(result, rows=100, fallback=10, drained=drained(90)).ok


def test_judge_detects_a_lost_row_and_a_lost_message() -> None:
    check = judge(wrk_result(), rows=99, fallback=0, drained=drained(98))
    assert not check.ok
    assert any("billable rows 99 != events answered accepted 100" in p for p in check.problems)
    assert any("queued events 98" in p for p in check.problems)


def test_judge_detects_a_phantom_row() -> None:
    check = judge(wrk_result(), rows=101, fallback=0, drained=drained(101))
    assert not check.ok


def test_judge_bounds_the_check_when_requests_were_left_unanswered() -> None:
    result = wrk_result(sent_requests=103, sent_events=103)
    assert judge(result, rows=102, fallback=0, drained=drained(102)).ok
    check = judge(result, rows=104, fallback=0, drained=drained(104))
    assert not check.exact and not check.ok


def test_judge_detects_events_queued_twice_and_unaccepted_answers() -> None:
    check = judge(wrk_result(accepted=99, duplicate=1), rows=99, fallback=0,
                  drained=drained(99, distinct=98))
    assert any("queued twice" in p for p in check.problems)
    assert any("1 events in 2xx answers were not accepted (duplicate 1" in p for p in check.problems)


# ---- report -----------------------------------------------------------------------------------


def _target(key: str, events_per_s: list[float], p99_ms: float = 10.0) -> TargetResult:
    runs = []
    for rate in events_per_s:
        result = wrk_result(events_2xx=rate * 2, answers=rate * 2, accepted=rate * 2)
        result.latency_us["p99"] = p99_ms * 1000
        loss = LossCheck(0, 0, 0, 0, 0, 0, 0, 0, True) if key != "bare" else None
        runs.append(RunResult("peak", result, {"server": 150.0, "postgres": 20.0}, 0.0, loss))
    return TargetResult(key, key, 0, runs=runs)


def test_ratios_use_the_median_of_the_runs() -> None:
    results = {"seed": _target("seed", [600, 700, 650]), "bare": _target("bare", [30_000, 20_000, 25_000]),
               "product": _target("product", [5000, 6500, 6000])}
    lines = ratio_lines(results)
    assert "**9.2×**" in lines[0]  # 6000 / 650
    assert "**0.24×**" in lines[1] and "24% of" in lines[1]  # 6000 / 25000


def test_render_reports_skipped_product_and_loss_table() -> None:
    skipped = TargetResult("product", "product gateway", 0, skipped="not wired")
    text = render({"command": "x"}, [_target("seed", [600]), skipped], datetime(2026, 1, 1, tzinfo=UTC),
                  datetime(2026, 1, 1, 0, 5, tzinfo=UTC))
    assert "| seed | **600** | 600 |" in text
    assert "product gateway: not measured: not wired" in text
    assert "no product ratios" in text
    assert "| seed | 1 | 100 / 1,200 |" in text


def test_profile_run_chooses_which_run_is_profiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROFILE_RUN", raising=False)
    assert parse_options(["--profile", "raw"]).profile_run == "peak"
    assert parse_options(["--profile", "raw", "--profile-run", "half"]).profile_run == "half"
    monkeypatch.setenv("PROFILE_RUN", "half")  # how bench/profile.sh passes it
    assert parse_options(["--profile", "raw"]).profile_run == "half"


def test_paced_runs_default_to_as_many_as_peak_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_HALF_RUNS", raising=False)
    monkeypatch.delenv("BENCH_RUNS", raising=False)
    assert parse_options([]).half_runs == 3
    assert parse_options(["--runs", "1"]).half_runs == 1  # bench/profile.sh: one peak run, one paced
    assert parse_options(["--runs", "1", "--half-runs", "2"]).half_runs == 2
    monkeypatch.setenv("BENCH_HALF_RUNS", "5")
    assert parse_options([]).half_runs == 5


def test_the_half_peak_cell_shows_the_median_p99_and_every_run() -> None:
    product = _target("product", [6000, 6200, 5800])
    for p99_ms in (48.0, 17.5, 19.0):
        paced = _target("product", [3000], p99_ms=p99_ms).runs[0]
        paced.kind, paced.target_rate = "half", 3000.0
        product.halves.append(paced)
    text = render({"command": "x"}, [product], datetime(2026, 1, 1, tzinfo=UTC),
                  datetime(2026, 1, 1, 0, 5, tzinfo=UTC))
    assert "| **19.00** (runs 48.0, 17.5, 19.0; at 3,000 ev/s) |" in text
    assert "ok (6 runs, exact)" in text
    assert "| product | ½ peak 3 |" in text
