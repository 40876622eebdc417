"""Named SQL queries loaded once from `shared/sql/*.sql` (`-- name: query_name` blocks)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent / "sql"
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of `-- name: x` blocks into {name: sql}."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = body.strip()
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        queries[name] = sql
    return queries


@cache
def _all_queries() -> dict[str, str]:
    merged: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        for name, sql in parse_queries(path.read_text()).items():
            if name in merged:
                raise ValueError(f"query {name!r} defined twice (in {path.name})")
            merged[name] = sql
    return merged


def query(name: str) -> str:
    """The SQL text of a named query; KeyError names the missing one."""
    try:
        return _all_queries()[name]
    except KeyError:
        raise KeyError(f"no SQL query named {name!r} in {SQL_DIR}") from None
