"""Inflating request bodies with a bound (shared.content_coding)."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.content_coding import decode_body
from shared.events import ShapeError

LIMIT = 256 * 1024
BODY = b'{"s":"site-a","url":"https://example.com/"}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "sent"),
    [
        (None, BODY),
        ("", BODY),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("GZIP", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),  # RFC 9110 §8.4.1.3: a recipient should treat it as gzip
        ("deflate", zlib.compress(BODY)),
        ("deflate", raw_deflate(BODY)),  # what some senders call deflate
        ("gzip, gzip", gzip.compress(gzip.compress(BODY))),  # undone last first
        ("gzip, identity, gzip", gzip.compress(gzip.compress(BODY))),  # identity is no coding to undo
        ("deflate, gzip", gzip.compress(zlib.compress(BODY))),
        ("gzip, identity", gzip.compress(BODY)),
        ("identity,gzip", gzip.compress(BODY)),
    ],
)
def test_codings_are_undone(encoding: str | None, sent: bytes) -> None:
    assert decode_body(sent, encoding, LIMIT) == BODY


def test_gzip_members_join() -> None:
    assert decode_body(gzip.compress(b'{"a":') + gzip.compress(b"1}"), "gzip", LIMIT) == b'{"a":1}'


@pytest.mark.parametrize(
    ("encoding", "sent", "words"),
    [
        ("br", BODY, "'br' is not supported"),
        ("zstd", BODY, "'zstd' is not supported"),
        ("gzip, br", BODY, "'br' is not supported"),
        ("gzip", b"not gzip at all", "could not be decoded"),
        ("gzip", gzip.compress(BODY)[:-6], "truncated"),
        ("deflate", zlib.compress(BODY) + b"junk", "after the compressed stream"),
        ("gzip", gzip.compress(BODY) + b"\x00\x00", "could not be decoded"),
    ],
)
def test_what_cannot_be_decoded_is_invalid_json(encoding: str, sent: bytes, words: str) -> None:
    with pytest.raises(ShapeError) as refused:
        decode_body(sent, encoding, LIMIT)
    assert refused.value.code == "invalid_json" and words in refused.value.detail


def test_a_gzip_bomb_stops_one_byte_past_the_limit() -> None:
    """250 MB of spaces in 250 KB of gzip: refused without inflating it (aiohttp inflated it all)."""
    bomb = gzip.compress(b"{" + b" " * (250 * 1024 * 1024) + b"}", compresslevel=9)
    inflater_calls: list[int] = []
    real = zlib.decompressobj

    def counting(wbits: int) -> object:
        inner = real(wbits)

        class Counting:
            eof = property(lambda self: inner.eof)
            unused_data = property(lambda self: inner.unused_data)

            def decompress(self, data: bytes, max_length: int = 0) -> bytes:
                out = inner.decompress(data, max_length)
                inflater_calls.append(len(out))
                return out

        return Counting()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zlib, "decompressobj", counting)
        with pytest.raises(ShapeError) as refused:
            decode_body(bomb, "gzip", LIMIT)
    assert refused.value.code == "payload_too_large"
    assert sum(inflater_calls) == LIMIT + 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "gzip, gzip"])
def test_the_limit_holds_exactly(encoding: str) -> None:
    def encode(data: bytes) -> bytes:
        for coding in encoding.split(", "):
            data = gzip.compress(data) if coding == "gzip" else zlib.compress(data)
        return data

    assert decode_body(encode(b"x" * LIMIT), encoding, LIMIT) == b"x" * LIMIT
    with pytest.raises(ShapeError) as refused:
        decode_body(encode(b"x" * (LIMIT + 1)), encoding, LIMIT)
    assert refused.value.code == "payload_too_large"


@given(
    st.binary(max_size=512),
    st.sampled_from(["gzip", "deflate", "x-gzip", "gzip, deflate", "gzip, gzip, gzip"]),
)
def test_any_bytes_decode_or_are_refused_with_a_code(sent: bytes, encoding: str) -> None:
    try:
        decode_body(sent, encoding, LIMIT)
    except ShapeError as refused:
        assert refused.code in ("invalid_json", "payload_too_large")


def test_more_codings_than_two_are_refused_before_any_inflating() -> None:
    """Hundreds of stored gzip layers in one header cost ~180 ms of inflating; unknown codings anywhere
    in the list are refused before the known ones are undone."""
    layered = BODY
    for _ in range(3):
        layered = gzip.compress(layered, compresslevel=0)
    with pytest.raises(ShapeError) as refused:
        decode_body(layered, "gzip, gzip, gzip", LIMIT)
    assert refused.value.code == "invalid_json" and "at most 2" in refused.value.detail
    with pytest.raises(ShapeError) as unknown:
        decode_body(b"not gzip", "foo, gzip", LIMIT)
    assert "'foo' is not supported" in unknown.value.detail


def test_a_body_of_many_gzip_members_is_refused() -> None:
    """Thousands of empty members cost ~100 ms (zlib copies the rest of the body after each); one
    member per event of a 100-event batch is fine."""
    assert decode_body(gzip.compress(b"") * 255 + gzip.compress(BODY), "gzip", LIMIT) == BODY
    with pytest.raises(ShapeError) as refused:
        decode_body(gzip.compress(b"") * 256 + gzip.compress(BODY), "gzip", LIMIT)
    assert refused.value.code == "invalid_json" and "more than 256 members" in refused.value.detail


def test_a_long_coding_list_is_refused_before_it_is_split() -> None:
    """128 header lines of commas (~1 MB, what aiohttp reads) cost ~150 ms to split and filter."""
    assert decode_body(gzip.compress(BODY), "identity, identity, x-gzip, identity", LIMIT) == BODY
    with pytest.raises(ShapeError) as refused:
        decode_body(BODY, ", ".join([","] * 40_000), LIMIT)
    assert refused.value.code == "invalid_json" and "longer than 64 characters" in refused.value.detail
