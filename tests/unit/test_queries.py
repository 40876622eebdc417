"""Named SQL queries (`shared/sql/*.sql`): parsing rules and the project's own files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import queries
from shared.queries import parse_queries, query


def test_blocks_are_split_by_name_and_trimmed() -> None:
    text = """-- Sites: lookups and writes.

-- name: first
SELECT 1;

-- name: second_2
SELECT $1
FROM t;
"""
    assert parse_queries(text) == {"first": "SELECT 1;", "second_2": "SELECT $1\nFROM t;"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n", "duplicate query name 'a'"),
        ("SELECT 1;\n-- name: a\nSELECT 2;\n", "SQL before the first `-- name:` line: 'SELECT 1;'"),
        ("-- name: GetSite\nSELECT 1;\n", "bad query name 'GetSite'"),
        ("-- name: a\n\n-- name: b\nSELECT 1;\n", "query 'a' is empty"),
        ("-- name:\nSELECT 1;\n", "bad query name ''"),
    ],
)
def test_malformed_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_queries(text)
    assert str(info.value).startswith(message)


def test_every_project_query_file_parses_with_unique_names() -> None:
    seen: dict[str, str] = {}
    files = sorted(queries.SQL_DIR.glob("*.sql"))
    assert files, f"no query files in {queries.SQL_DIR}"
    for path in files:
        for name in parse_queries(path.read_text(encoding="utf-8")):
            assert name not in seen, f"query {name!r} is in both {seen[name]} and {path.name}"
            seen[name] = path.name
    for name in seen:
        assert query(name).strip()


def test_unknown_query_names_the_missing_one() -> None:
    with pytest.raises(KeyError, match="no SQL query named 'no_such_query'"):
        query("no_such_query")


def test_a_name_defined_in_two_files_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.sql").write_text("-- name: same\nSELECT 1;\n")
    (tmp_path / "b.sql").write_text("-- name: same\nSELECT 2;\n")
    monkeypatch.setattr(queries, "SQL_DIR", tmp_path)
    queries._all_queries.cache_clear()
    try:
        with pytest.raises(ValueError, match="query 'same' defined twice"):
            query("same")
    finally:
        monkeypatch.undo()
        queries._all_queries.cache_clear()
