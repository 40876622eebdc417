"""`revkernel run`: the whole fleet on one machine, each process kind as a child, for development."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

from shared.settings import Settings

# One entry per process kind: the `revkernel` sub-command that runs it.
FLEET = [
    ["gateway"],
    ["reconciler"],
    ["freezer"],
]


def run_fleet(args: argparse.Namespace, settings: Settings) -> int:
    """Start every process kind; stop them all (SIGTERM, then wait) when one dies or on SIGTERM/SIGINT."""
    children = [
        subprocess.Popen([sys.executable, "-m", "services.cli", *argv], env=os.environ.copy())
        for argv in FLEET
    ]
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_code = 0
    while not stopping:
        for child, argv in zip(children, FLEET, strict=True):
            code = child.poll()
            if code is not None:
                print(
                    f"revkernel run: {' '.join(argv)} exited with {code}; stopping the fleet", file=sys.stderr
                )
                exit_code = code or 1
                stopping = True
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    return exit_code


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("run", help="run the whole fleet locally (gateway, reconciler, freezer)")
    p.set_defaults(handler=run_fleet)
