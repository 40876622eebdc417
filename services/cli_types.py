"""Argument types and output shared by every `revkernel` sub-command (one-line argparse errors)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from shared.months import is_year_month


def year_month(raw: str) -> str:
    if not is_year_month(raw):
        raise argparse.ArgumentTypeError(f"not a YYYY-MM month: {raw!r}")
    return raw


def positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def non_negative_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def positive_int(raw: str) -> int:
    value = non_negative_int(raw)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def port_number(raw: str) -> int:
    value = non_negative_int(raw)
    if value > 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
