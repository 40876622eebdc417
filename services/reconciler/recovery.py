"""Fallback buffer recovery (SPEC §6): republish what the broker did not confirm at ingest time.

Rows are claimed in batches (`FOR UPDATE SKIP LOCKED`, → PROCESSING with `locked_at`), published with
confirms, then marked RECOVERED together with their idempotency rows. A worker that dies between the
confirm and the mark loses nothing: the claim's lease expires, another worker publishes the row again,
and downstream consumers dedup that copy on `idempotency_key` (delivery is at-least-once).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from shared.logging import get_logger
from shared.publisher import EventPublisher, OutgoingMessage
from shared.queries import query

log = get_logger("recovery")


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    batch_size: int = 100
    lease_s: float = 60.0
    max_attempts: int = 10
    retry_base_s: float = 5.0


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    claimed: int
    recovered: int
    failed: int

    def as_dict(self) -> dict[str, int]:
        return {"claimed": self.claimed, "recovered": self.recovered, "failed": self.failed}


def outgoing_message(row: asyncpg.Record | dict[str, Any]) -> OutgoingMessage:
    """The message a buffer row stands for: its one event exactly, to its stored routing key.

    A buffer row always holds one enriched event (a batch's events are buffered one row each), so it
    is republished as a single-event message whatever fields the client put in the event: an event's
    own `events` list is data, not a batch envelope.
    """
    payload = row["payload"]
    ingest_id = payload.get("ingest_id") if isinstance(payload, dict) else None
    return OutgoingMessage(
        body=orjson.dumps(payload),
        routing_key=row["routing_key"],
        message_id=ingest_id if isinstance(ingest_id, str) and ingest_id else str(row["id"]),
    )


def idempotency_row(row: asyncpg.Record | dict[str, Any]) -> tuple[uuid.UUID, str, datetime]:
    """(site_id, idempotency_key, bucket_at) of the idempotency row a buffer row carries."""
    return (row["site_id"], row["idempotency_key"], row["bucket_at"])


async def recover_batch(
    pool: asyncpg.Pool, publisher: EventPublisher, settings: RecoverySettings = RecoverySettings()
) -> RecoveryResult:
    """Claim, republish and settle one batch; nothing is claimed while the broker is unreachable."""
    if not publisher.is_ready:
        return RecoveryResult(0, 0, 0)
    rows = await pool.fetch(query("recovery_claim_rows"), settings.batch_size, settings.lease_s)
    if not rows:
        return RecoveryResult(0, 0, 0)
    outcomes = await publisher.publish_many([outgoing_message(r) for r in rows])
    recovered = [r for r, failure in zip(rows, outcomes, strict=True) if failure is None]
    failed = [
        (r["id"], str(failure)) for r, failure in zip(rows, outcomes, strict=True) if failure is not None
    ]
    async with pool.acquire() as conn, conn.transaction():
        if recovered:
            await conn.execute(query("recovery_mark_recovered"), [r["id"] for r in recovered])
            marks = [idempotency_row(r) for r in recovered]
            await conn.execute(
                query("recovery_mark_idempotency_recovered"),
                [m[0] for m in marks],
                [m[1] for m in marks],
                [m[2] for m in marks],
            )
        if failed:
            await conn.execute(
                query("recovery_mark_failed"),
                [f[0] for f in failed],
                [f[1] for f in failed],
                settings.retry_base_s,
                settings.max_attempts,
            )
    if failed:
        log.warning("fallback_recovery_publish_failed", failed=len(failed), error=failed[0][1])
    log.info("fallback_recovery_batch", claimed=len(rows), recovered=len(recovered), failed=len(failed))
    return RecoveryResult(claimed=len(rows), recovered=len(recovered), failed=len(failed))
