"""Hot-path ids from a pool of OS randomness: valid version 4 UUIDs, never shared with a forked child."""

from __future__ import annotations

import os
import uuid

from shared.ids import new_ingest_id, new_request_id


def test_ingest_ids_are_version_4_uuids() -> None:
    ids = {new_ingest_id() for _ in range(2000)}
    assert len(ids) == 2000
    for value in list(ids)[:200]:
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_never_repeats_the_parents_ingest_ids() -> None:
    """Ids come from a buffer of OS randomness: a child forked with that buffer must not reuse it."""
    new_ingest_id()  # the buffer now holds unused bytes the child inherits
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next id, leave without running any test machinery
        os.close(read_end)
        os.write(write_end, new_ingest_id().encode())
        os._exit(0)
    os.close(write_end)
    parent_next = new_ingest_id()
    child_next = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_next) == 36 and child_next != parent_next


def test_request_ids_are_version_4_uuids_as_32_hex_digits() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for value in list(ids)[:200]:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122
