"""Random ids for the hot path: version 4 UUIDs from a pool of OS randomness (one syscall per 256 ids)."""

from __future__ import annotations

import os


class _RandomPool:
    """Random bytes fetched from the OS 4 KiB at a time, not 16 bytes per id.

    Cleared in a forked child, so parent and child never hand out the same bytes."""

    CHUNK = 4096

    def __init__(self) -> None:
        self._bytes = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self.clear)

    def clear(self) -> None:
        self._bytes, self._offset = b"", 0

    def take16(self) -> bytes:
        if self._offset + 16 > len(self._bytes):
            self._bytes, self._offset = os.urandom(self.CHUNK), 0
        start = self._offset
        self._offset = start + 16
        return self._bytes[start : start + 16]


_RANDOM = _RandomPool()


# Formatted straight from the random hex (no uuid.UUID): version nibble 4, RFC 4122 variant nibble.
_VARIANT = "89ab89ab89ab89ab"  # indexed by the random nibble it replaces


def new_request_id() -> str:
    """The `x-request-id` of every answer: like `uuid4().hex`."""
    h = _RANDOM.take16().hex()
    return f"{h[:12]}4{h[13:16]}{_VARIANT[int(h[16], 16)]}{h[17:]}"


def new_ingest_id() -> str:
    """An event's id: like `str(uuid4())` (one per event)."""
    h = _RANDOM.take16().hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}"
