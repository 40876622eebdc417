"""Loading migration files: order, naming, checksums (no database)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.migrate import MIGRATIONS_DIR, MigrationError, load_migrations


def write(directory: Path, name: str, sql: str) -> None:
    (directory / name).write_text(sql, encoding="utf-8")


def test_files_load_in_version_order_and_other_files_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, "0010_later.sql", "SELECT 10;")
    write(tmp_path, "0002_second.sql", "SELECT 2;")
    write(tmp_path, "0001_first.sql", "SELECT 1;")
    (tmp_path / "README.md").write_text("notes")
    loaded = load_migrations(tmp_path)
    assert [m.name for m in loaded] == ["0001_first.sql", "0002_second.sql", "0010_later.sql"]
    assert [m.version for m in loaded] == ["0001", "0002", "0010"]
    assert loaded[1].sql == "SELECT 2;"


@pytest.mark.parametrize(
    "name", ["1_short.sql", "0001-dash.sql", "0001_Upper.sql", "0001_.sql", "abcd_x.sql"]
)
def test_a_badly_named_file_is_an_error(tmp_path: Path, name: str) -> None:
    write(tmp_path, name, "SELECT 1;")
    with pytest.raises(MigrationError, match="must look like 0001_name.sql"):
        load_migrations(tmp_path)


def test_two_files_with_one_version_are_an_error(tmp_path: Path) -> None:
    write(tmp_path, "0003_a.sql", "SELECT 1;")
    write(tmp_path, "0003_b.sql", "SELECT 2;")
    with pytest.raises(MigrationError, match="two migrations share version 0003"):
        load_migrations(tmp_path)


def test_checksum_is_sha256_of_the_utf8_text_and_changes_with_any_edit(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "-- § ±\nSELECT 1;\n")
    before = load_migrations(tmp_path)[0]
    assert before.checksum == hashlib.sha256("-- § ±\nSELECT 1;\n".encode()).hexdigest()
    write(tmp_path, "0001_a.sql", "-- § ±\nSELECT 1; \n")
    assert load_migrations(tmp_path)[0].checksum != before.checksum


def test_the_project_migrations_load(tmp_path: Path) -> None:
    loaded = load_migrations(MIGRATIONS_DIR)
    assert [m.version for m in loaded][:5] == ["0001", "0002", "0003", "0004", "0005"]
    assert all(m.sql.strip() for m in loaded)
