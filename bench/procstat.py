"""CPU time by process group, from /proc/<pid>/stat (utime + stime) sampled at the start and end of a run.

Groups: the server under test (its process and every descendant), the load generator, the private
Redis, Postgres (the postmaster, its auxiliary processes, and the backends of the bench databases
only: other engineers' test databases share the cluster), RabbitMQ (the broker's Erlang VM and its
helpers, shared by every vhost; not the VMs of rabbitmqctl calls), and `other` = whatever else the
machine spent (noise from concurrent work, and kernel time not charged to a process).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")

# "postgres: 15/main: postgres rk_bench 127.0.0.1(5432) idle" (the cluster prefix is optional).
_PG_BACKEND = re.compile(r"^postgres: (?:\S+: )?\S+ (\S+) (?:\S+\(\d+\)|\[local\])")
# The broker is the Erlang VM booting the `rabbit` application; rabbitmqctl also runs a beam.smp (of
# someone else, during a run), which is not the broker.
_RABBIT_BROKER = "-s rabbit boot"


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    start_ticks: int  # since boot; tells a reused pid from the process sampled before
    cpu_ticks: int  # utime + stime
    title: str  # /proc/<pid>/cmdline with NULs as spaces (Postgres writes its process title there)


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float  # time.monotonic()
    procs: Mapping[int, Proc]
    machine_busy_ticks: int  # all CPUs: user + nice + system + irq + softirq + steal


def parse_stat(pid: int, stat: str, title: str) -> Proc:
    """One /proc/<pid>/stat line; `comm` may hold spaces and parentheses, so split at the last ')'."""
    open_paren, close_paren = stat.index("("), stat.rindex(")")
    fields = stat[close_paren + 2 :].split()
    # fields[0] is field 3 (state): ppid = field 4, utime = 14, stime = 15, starttime = 22.
    return Proc(
        pid=pid,
        ppid=int(fields[1]),
        comm=stat[open_paren + 1 : close_paren],
        start_ticks=int(fields[19]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        title=title,
    )


def parse_machine_busy(proc_stat: str) -> int:
    """Busy jiffies of all CPUs from the `cpu` line of /proc/stat (idle and iowait excluded)."""
    for line in proc_stat.splitlines():
        if line.startswith("cpu "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in line.split()[1:9])
            return user + nice + system + irq + softirq + steal
    raise ValueError("no aggregate cpu line in /proc/stat")


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        title = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # the process exited while we were reading
    return parse_stat(pid, stat, title.strip())


def snapshot() -> Snapshot:
    procs = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (proc := _read_proc(int(entry.name))) is not None:
            procs[proc.pid] = proc
    return Snapshot(time.monotonic(), procs, parse_machine_busy((PROC / "stat").read_text()))


def descendants(procs: Mapping[int, Proc], roots: Iterable[int]) -> set[int]:
    """The roots that exist and every process below them."""
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    stack = [pid for pid in roots if pid in procs]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def postgres_database(proc: Proc) -> str | None:
    """The database of a Postgres backend, None for the postmaster and auxiliary processes."""
    match = _PG_BACKEND.match(proc.title)
    return match.group(1) if match else None


Classifier = Callable[[Proc], str | None]


def make_classifier(
    procs: Mapping[int, Proc], trees: Mapping[str, Iterable[int]], bench_databases: Iterable[str]
) -> Classifier:
    """Group of a process: a named process tree (server, wrk, redis), postgres, rabbitmq, or None."""
    brokers = [p.pid for p in procs.values() if p.comm == "beam.smp" and _RABBIT_BROKER in p.title]
    owner = {pid: "rabbitmq" for pid in descendants(procs, brokers)}
    owner.update({pid: group for group, roots in trees.items() for pid in descendants(procs, roots)})
    databases = frozenset(bench_databases)

    def classify(proc: Proc) -> str | None:
        if proc.pid in owner:
            return owner[proc.pid]
        if proc.comm == "postgres":
            database = postgres_database(proc)
            return "postgres" if database is None or database in databases else None
        if proc.comm == "epmd":  # the Erlang port mapper of the broker's node
            return "rabbitmq"
        return None

    return classify


def cpu_percent_by_group(start: Snapshot, end: Snapshot, classify: Classifier) -> dict[str, float]:
    """CPU of each group between two snapshots, in % of one core (200 = both cores of this machine).

    A process alive at both ends counts its difference; one started in between counts all its time;
    one that exited in between is lost (the servers and pools under test live across the run).
    `machine` is everything the kernel accounted, `other` the machine minus the named groups.
    """
    wall = end.taken_at - start.taken_at
    if wall <= 0:
        raise ValueError("the end snapshot must be taken after the start snapshot")
    ticks: dict[str, int] = {}
    for pid, proc in end.procs.items():
        group = classify(proc)
        if group is None:
            continue
        before = start.procs.get(pid)
        base = before.cpu_ticks if before is not None and before.start_ticks == proc.start_ticks else 0
        ticks[group] = ticks.get(group, 0) + max(0, proc.cpu_ticks - base)
    machine = max(0, end.machine_busy_ticks - start.machine_busy_ticks)
    ticks["machine"] = machine
    ticks["other"] = max(0, machine - sum(v for k, v in ticks.items() if k != "machine"))
    return {group: 100.0 * value / CLK_TCK / wall for group, value in ticks.items()}
