"""Named SQL queries loaded once from `shared/sql/*.sql` (`-- name: query_name` blocks)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent / "sql"
_NAME = re.compile(r"^--\s*name:\s*(\S*)\s*$", re.MULTILINE)
_VALID_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of `-- name: x` blocks into {name: sql}.

    Only comments may precede the first block; a bad or repeated name and an empty block are errors,
    so a typo cannot silently glue two queries together.
    """
    parts = _NAME.split(text)
    stray = [line for line in parts[0].splitlines() if line.strip() and not line.lstrip().startswith("--")]
    if stray:
        raise ValueError(f"SQL before the first `-- name:` line: {stray[0].strip()!r}")
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if not _VALID_NAME.match(name):
            raise ValueError(f"bad query name {name!r} (lowercase letters, digits and _)")
        sql = body.strip()
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = sql
    return queries


@cache
def _all_queries() -> dict[str, str]:
    merged: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        for name, sql in parse_queries(path.read_text(encoding="utf-8")).items():
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
