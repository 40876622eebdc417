"""`revkernel` argument mistakes: refused before any I/O, exit code 2, exactly one line on stderr."""

from __future__ import annotations

import pytest

from services.cli import main

CASES = [
    (["token", "--user", "alice", "--ttl", "3153600000000"], "--ttl: must be at most 2678400 (31 days)"),
    (
        ["plan", "set", "--site", "shop", "--monthly-limit", "5", "--hard-cap-multiplier", "1e5000"],
        "--hard-cap-multiplier: the hard cap multiplier must be a number between 1 and 1000",
    ),
    (["gateway", "--port", "70000"], "--port: must be between 0 and 65535"),
    (["gateway", "--port", "-1"], "--port: must be >= 0"),
    (["gateway", "--workers", "0"], "--workers: must be > 0"),
    (
        ["member", "add", "--site", "shop", "--user", "u", "--role", "superuser"],
        "--role: invalid choice: 'superuser'",
    ),
    (["member", "add", "--site", "shop", "--user", " ", "--role", "owner"], "--user: must not be empty"),
    (["member", "add", "--site", "shop", "--role", "owner"], "the following arguments are required: --user"),
    (["plan", "set", "--site", "shop", "--monthly-limit", "-5"], "--monthly-limit: must be >= 0"),
    (
        ["plan", "set", "--site", "shop", "--monthly-limit", "ten"],
        "--monthly-limit: not a whole number: 'ten'",
    ),
    (["plan", "set", "--site", "shop"], "the following arguments are required: --monthly-limit"),
    (["plan", "set", "--site", "", "--monthly-limit", "5"], "--site: must not be empty"),
    (
        ["plan", "set", "--site", "shop", "--monthly-limit", "5", "--hard-cap-multiplier", "0.5"],
        "--hard-cap-multiplier: the hard cap multiplier must be a number between 1 and 1000",
    ),
    (
        ["plan", "set", "--site", "shop", "--monthly-limit", "5", "--hard-cap-multiplier", "NaN"],
        "--hard-cap-multiplier: the hard cap multiplier must be a number between 1 and 1000",
    ),
    (
        ["plan", "set", "--site", "shop", "--monthly-limit", "5", "--soft-limit", "--no-soft-limit"],
        "argument --no-soft-limit: not allowed with argument --soft-limit",
    ),
    (["site", "create", "--name", "x"], "the following arguments are required: --public-id"),
    (["site", "create", "--public-id", ""], "--public-id: must not be empty"),
    (["site", "create", "--public-id", "new", "--monthly-limit", "-1"], "--monthly-limit: must be >= 0"),
    (
        ["site", "create", "--public-id", "new", "--rate-limit-per-minute", "0"],
        "--rate-limit-per-minute: must be > 0",
    ),
    (["site", "delete"], "invalid choice: 'delete'"),
    (["site"], "the following arguments are required: ACTION"),
    (["token", "--user", "alice", "--ttl", "0"], "--ttl: must be > 0"),
    (["token"], "the following arguments are required: --user"),
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(argv) or "(none)" for argv, _ in CASES])
def test_argument_mistakes_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("revkernel")
    assert message in lines[0]
