"""Request bodies sent with `Content-Encoding` (RFC 9110 §8.4), inflated with a bound on what comes out.

aiohttp's own decompression inflates a whole body before its size limit applies: a 250 KB gzip of
250 MB of spaces held the event loop ~0.9 s per request (every other request of the process waited,
answers arrived after clients had given up, and their retries were billed again). Here each step stops
one byte past the limit, so no body costs more than inflating `limit` bytes.
"""

from __future__ import annotations

import zlib

from shared.events import ShapeError

# Bounds on the work one body can ask for beyond inflating `limit` bytes per coding: a header listing
# hundreds of codings (stored gzip layers), ~1 MB of header lines to split, or a body of thousands of
# empty gzip members each cost ~100-180 ms before these (zlib copies what follows each member).
MAX_CODINGS = 2
MAX_CODINGS_CHARS = 64  # the header's value, all its lines together ("x-gzip, identity, gzip" is 22)
MAX_GZIP_MEMBERS = 256  # one member per event of a 100-event batch fits; 256 members cost ~3.5 ms
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS
SUPPORTED = "gzip, deflate or identity"


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body with its content codings undone (last applied, first undone).

    ShapeError `payload_too_large` when the decoded body exceeds `limit` bytes, `invalid_json` when a
    coding is unknown (`br`, `zstd`, ...) or the bytes are not what it says."""
    if not content_encoding:
        return raw
    if len(content_encoding) > MAX_CODINGS_CHARS:  # before splitting: ~1 MB of commas cost 150 ms
        raise ShapeError("invalid_json", f"Content-Encoding is longer than {MAX_CODINGS_CHARS} characters")
    listed = (c.strip().lower() for c in content_encoding.split(","))
    codings = [c for c in listed if c not in ("", "identity")]
    for coding in codings:
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise ShapeError(
                "invalid_json", f"Content-Encoding {coding!r} is not supported (use {SUPPORTED})"
            )
    if len(codings) > MAX_CODINGS:
        raise ShapeError(
            "invalid_json", f"at most {MAX_CODINGS} content codings are undone, got {len(codings)}"
        )
    try:
        for coding in reversed(codings):
            raw = _inflate_deflate(raw, limit) if coding == "deflate" else _inflate_gzip_members(raw, limit)
    except _TooLarge:
        raise ShapeError("payload_too_large", f"body is larger than {limit} bytes once decoded") from None
    return raw


class _TooLarge(Exception):
    pass


def _inflate_deflate(data: bytes, limit: int) -> bytes:
    """RFC 9110's deflate is the zlib format; some senders send a raw deflate stream instead."""
    wbits = _ZLIB_WBITS if data[:1] and data[0] & 0x0F == 8 else _RAW_DEFLATE_WBITS
    out, rest = _inflate(data, wbits, limit)
    if rest:
        raise ShapeError("invalid_json", "the body could not be decoded: data after the compressed stream")
    return out


def _inflate_gzip_members(data: bytes, limit: int) -> bytes:
    """A gzip body may hold several members one after another (RFC 1952 §2.2): their contents join."""
    out = b""
    for _ in range(MAX_GZIP_MEMBERS):
        part, rest = _inflate(data, _GZIP_WBITS, limit - len(out))
        out += part
        if not rest:
            return out
        data = rest
    raise ShapeError("invalid_json", f"the gzip body has more than {MAX_GZIP_MEMBERS} members")


def _inflate(data: bytes, wbits: int, limit: int) -> tuple[bytes, bytes]:
    """One compressed stream: (its content, the bytes after it)."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ShapeError("invalid_json", f"the body could not be decoded: {exc}") from None
    if len(out) > limit:
        raise _TooLarge
    if not inflater.eof:
        raise ShapeError("invalid_json", "the body could not be decoded: the compressed data is truncated")
    return out, inflater.unused_data
