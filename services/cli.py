"""`revkernel`: the one console script (SPEC §13). Each process kind adds its commands via `register`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

from shared.logging import configure_logging
from shared.settings import Settings, SettingsError

T = TypeVar("T")

# Modules exposing `register(subparsers)`; each adds its own sub-commands.
COMMAND_MODULES = [
    "services.admin_cli",
    "services.gateway.cli",
    "services.reconciler.cli",
    "services.freezer.cli",
    "services.export_cli",
    "services.fleet",
]


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine to completion."""
    return asyncio.run(coro)


def build_parser() -> Parser:
    parser = Parser(prog="revkernel", description="Revenue Kernel: the billing gate and its workers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        handler: Callable[[argparse.Namespace, Settings], int] = args.handler
        return handler(args, settings)
    except (CliError, SettingsError) as exc:
        print(f"revkernel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
