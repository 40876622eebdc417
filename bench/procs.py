"""Processes the harness starts: each in its own session (process group), logged to a file, listed in a
pid file that bench/run.sh's EXIT trap also reads, and always stopped: SIGTERM to the leader (servers
forward it to their workers and drain), SIGKILL to the whole group if anything is left after the grace."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LISTEN = "0A"  # TCP state code in /proc/net/tcp*


class StartError(RuntimeError):
    """A process under test did not come up (it exited, or never listened)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def count_listeners(port: int, tables: Sequence[str]) -> int:
    """Listening sockets on `port` in /proc/net/tcp-format text (one per SO_REUSEPORT process)."""
    wanted = f"{port:04X}"
    found = 0
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[1].rsplit(":", 1)[1] == wanted and fields[3] == LISTEN:
                found += 1
    return found


def listeners(port: int) -> int:
    tables = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            tables.append(Path(name).read_text())
        except FileNotFoundError:
            continue  # no IPv6 on this kernel
    return count_listeners(port, tables)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> bool:
    """SIGKILL every process of the group; False when it was already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Launcher:
    pid_file: Path
    log_dir: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*.log"):  # the previous session's
            old.unlink()
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text("")

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Start `argv` in a new session; returns its pid (= its process group id)."""
        if name in self.running:
            raise ValueError(f"{name} is already running")
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[name] = proc
        self._write_pid_file()
        return proc.pid

    def _write_pid_file(self) -> None:
        self.pid_file.write_text("".join(f"{p.pid}\n" for p in self.running.values()))

    def check_alive(self, name: str) -> None:
        proc = self.running[name]
        if proc.poll() is not None:
            raise StartError(f"{name} exited with {proc.returncode}; see {self.log_path(name)}:\n"
                             + self.log_tail(name))

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_listening(self, name: str, port: int, count: int, deadline_s: float = 60.0) -> None:
        """Until `count` sockets listen on `port` (every worker process has bound it)."""
        give_up = time.monotonic() + deadline_s
        while listeners(port) < count:
            self.check_alive(name)
            if time.monotonic() > give_up:
                raise StartError(f"{name}: {listeners(port)} of {count} listeners on port {port} after "
                                 f"{deadline_s} s; see {self.log_path(name)}")
            time.sleep(0.1)

    def stop(self, name: str, grace_s: float = 25.0) -> int | None:
        """SIGTERM the leader, wait up to `grace_s`, then SIGKILL the group; the leader's exit code."""
        proc = self.running.pop(name, None)
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            give_up = time.monotonic() + 5
            while _group_alive(proc.pid) and time.monotonic() < give_up:
                time.sleep(0.05)  # workers exit right after their leader
            if _group_alive(proc.pid):
                _kill_group(proc.pid)
        finally:
            self._write_pid_file()
        return proc.returncode

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)
