"""RESP encoding and the incremental reply parser of shared/resp_wire.py."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors

from shared.resp_wire import LuaScript, RedisAddress, encode_command, parse_reply


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command(["EVALSHA", "ab", 1, "k", -5, b"\x00\r\n"]) == (
        b"*6\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$2\r\n-5\r\n$3\r\n\x00\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        (b":42\r\n", 42),
        (b":-1\r\n", -1),
        (b"+OK\r\n", "OK"),
        (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*3\r\n:1\r\n*2\r\n:2\r\n$1\r\nx\r\n:0\r\n", [1, [2, b"x"], 0]),
    ],
)
def test_replies_parse_to_python_values(wire: bytes, value: object) -> None:
    assert parse_reply(wire + b":7\r\n", 0) == (value, len(wire))


def test_every_proper_prefix_of_a_reply_is_incomplete() -> None:
    wire = b"*3\r\n:1\r\n*2\r\n:22\r\n$3\r\nabc\r\n:0\r\n"
    for cut in range(len(wire)):
        assert parse_reply(wire[:cut], 0) is None, cut
    assert parse_reply(wire, 0) == ([1, [22, b"abc"], 0], len(wire))


def test_error_replies_are_values_and_noscript_is_recognised() -> None:
    error, end = parse_reply(b"-NOSCRIPT No matching script\r\n", 0) or (None, 0)
    assert isinstance(error, redis_errors.NoScriptError) and end == 30
    other, _ = parse_reply(b"-ERR wrong number of arguments\r\n", 0) or (None, 0)
    assert isinstance(other, redis_errors.ResponseError)
    assert not isinstance(other, redis_errors.NoScriptError)


def test_unknown_reply_type_is_a_protocol_error() -> None:
    with pytest.raises(redis_errors.InvalidResponse):
        parse_reply(b"%1\r\n", 0)


def test_script_sha_is_redis_script_id() -> None:
    assert LuaScript("return 1").sha == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6390/3", RedisAddress("127.0.0.1", 6390, 3, None, None)),
        ("redis://localhost", RedisAddress("localhost", 6379, 0, None, None)),
        ("redis://:s%40cret@cache:6379/0", RedisAddress("cache", 6379, 0, None, "s@cret")),
        ("redis://gate:pw@cache/2", RedisAddress("cache", 6379, 2, "gate", "pw")),
    ],
)
def test_redis_address_from_url(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == expected


def test_tls_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        RedisAddress.from_url("rediss://cache:6380/0")
