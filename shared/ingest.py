"""Gates 4-6 of SPEC §3 for groups of concurrent requests: idempotency, quota, publish, fallback.

One Postgres transaction captures a group (group commit):
  insert the idempotency rows (ON CONFLICT DO NOTHING → duplicates)
  → reserve quota for the new billable rows (one Redis script call; Postgres under an exclusive
    per-(site, month) lock when Redis is down) and settle rejected / OVERAGE rows
  → publish each request's message with publisher confirms (all in flight at once)
  → write the payloads of unconfirmed messages to the fallback buffer (DEGRADED_CAPTURE)
  → discard the rows of requests whose buffer write failed too (503, nothing billed)
  → COMMIT.
Rows become visible, hence billable, only at the commit, after their events were durably captured
(SPEC §1.5); a crash before the commit leaves no row and at most a message consumers dedupe.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from shared.amqp import ingest_routing_key
from shared.batching import MicroBatcher
from shared.idempotency import IdempotencyKey
from shared.ids import new_ingest_id
from shared.logging import get_logger
from shared.months import year_month_of
from shared.publisher import EventPublisher, OutgoingMessage
from shared.queries import query
from shared.quota import (
    Decision,
    QuotaOutcome,
    acceptance_cap,
    decide_group,
    events_to_take,
    passes_monthly_limit,
    usage_key,
    usage_key_ttl_seconds,
)
from shared.redis_scripts import GateScripts
from shared.sites import Site

log = get_logger("ingest")

PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)
REDIS_ERRORS = (aioredis.RedisError, OSError, asyncio.TimeoutError)
MAX_ATTEMPTS = 3
# How long to ask a fresh connection whether a COMMIT whose reply was lost took effect.
COMMIT_OUTCOME_WAIT_S = 5.0
# How long a counter checked against Postgres at the monthly limit is trusted by this process.
LIMIT_CHECK_TTL_S = 60.0


class GateClosed(Exception):
    """Postgres could not record the events: nothing was billed (500 billing_gate_closed)."""


class _CommitUnconfirmed(Exception):
    """COMMIT did not answer success (typically: the connection broke before its reply came), so the
    transaction may have committed or not."""

    def __init__(self, xid: int | None, outcome: list[CaptureResult]) -> None:
        super().__init__(xid)
        self.xid = xid
        self.outcome = outcome


class EventStatus(enum.Enum):
    QUEUED = "queued"
    DUPLICATE = "duplicate"
    REJECTED_QUOTA = "rejected_quota"
    DEGRADED = "degraded"
    CAPTURE_FAILED = "capture_failed"


@dataclass(slots=True)
class CaptureEvent:
    """One well-formed event on its way through gates 4-6."""

    event: dict[str, Any]
    key: IdempotencyKey
    created_at: datetime
    billing_reason: str | None  # set for non-billable classes (SPEC §5)
    ingest_id: str = field(default_factory=lambda: new_ingest_id())

    @property
    def billable(self) -> bool:
        return self.billing_reason is None

    @property
    def year_month(self) -> str:
        return _year_month_of(self.created_at)


@dataclass(slots=True)
class CaptureRequest:
    site: Site
    events: list[CaptureEvent]
    is_batch: bool
    client_ip: str
    user_agent: str


@dataclass(frozen=True, slots=True)
class EventResult:
    status: EventStatus
    quota: QuotaOutcome | None = None

    @property
    def overage(self) -> bool:
        return self.quota is not None and self.quota.decision is Decision.OVERAGE


@dataclass(frozen=True, slots=True)
class CaptureResult:
    events: list[EventResult]
    quota_from_postgres: bool

    @property
    def uncaptured(self) -> bool:
        """Nothing of the request was captured (503): a request fails whole, never event by event."""
        return bool(self.events) and self.events[0].status is EventStatus.CAPTURE_FAILED


class _Reseeded(Exception):
    """Redis counters were (re)seeded from Postgres: run the group again."""


class _NeedsSeed(Exception):
    """Some (site, month) counters must be seeded before the group can reserve quota."""

    def __init__(self, pairs: list[tuple[uuid.UUID, str]], *, at_limit: bool = False) -> None:
        super().__init__(f"{len(pairs)} quota counter(s) to seed")
        self.pairs = pairs
        # Seeded because a group reached the monthly limit (`passes_monthly_limit`), not because a
        # counter was missing or marked for Postgres: only such a seed counts as the limit check.
        self.at_limit = at_limit


class _DataRejected(Exception):
    """A request of the group could not be captured for what it holds, not for an outage: Postgres
    refused a value, or building its rows or message failed. Its group is retried request by request,
    so it cannot fail the others."""


def _uncaptured_rows(rows: list[_Row], failed: set[int]) -> list[_Row]:
    """The new rows to remove when the requests `failed` (indices) end uncaptured; `failed` grows.

    A request that repeats one of those events fails with them: its answer cannot claim the repeat as
    a duplicate of a capture that did not happen, and a 503 must leave none of its rows (SPEC §1.5),
    so a batch that holds such a repeat loses its other rows too, even those already published (its
    retry re-captures them; downstream dedups on the idempotency key). Repeated to a fixed point.
    """
    while True:
        discarded = [row for row in rows if row.request_index in failed and row.new]
        repeating = {r_index for row in discarded for r_index, _ in row.repeats} - failed
        if not repeating:
            return discarded
        failed |= repeating


def _subtract(counts: dict[str, int], taken: dict[str, int]) -> None:
    for key, amount in taken.items():
        left = counts.get(key, 0) - amount
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)


class _RedisUnavailable(Exception):
    """Redis failed mid-group: run the group again with Postgres deciding quota."""


_year_month_of = lru_cache(maxsize=256)(year_month_of)  # every event of a request shares one instant


@lru_cache(maxsize=256)
def rfc3339(instant: datetime) -> str:
    """RFC 3339 UTC with microseconds; cached, since every event of a request shares one instant."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def enriched_event(request: CaptureRequest, item: CaptureEvent) -> dict[str, Any]:
    """The event as published (SPEC §3): the original plus the capture's identifiers."""
    return {
        **item.event,
        "ingest_id": item.ingest_id,
        "idempotency_key": item.key.key,
        "site_id": str(request.site.id),
        "received_at": rfc3339(item.created_at),
        "ip": request.client_ip,
        "ua": request.user_agent,
    }


@dataclass(slots=True)
class _Row:
    """An event of the group that reached Postgres (first of its key in the group)."""

    request_index: int
    event_index: int
    item: CaptureEvent
    site: Site
    new: bool = False
    quota: QuotaOutcome | None = None
    # Later events of the group with the same key: (request_index, event_index), answered duplicate.
    repeats: list[tuple[int, int]] = field(default_factory=list)


class IngestPipeline:
    """Runs CaptureRequests in shared transactions; `capture` is what a request awaits."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        scripts: GateScripts,
        publisher: EventPublisher,
        *,
        max_requests_per_group: int = 128,
        max_concurrent_groups: int = 6,
        group_overlap_after_s: float | None = None,
        redis_retry_s: float = 1.0,
        limit_check_ttl_s: float = LIMIT_CHECK_TTL_S,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._scripts = scripts
        self._publisher = publisher
        self._redis_retry_s = redis_retry_s
        self._redis_down_until = 0.0
        self._limit_check_ttl_s = limit_check_ttl_s
        # (site, month) → monotonic time until which its Redis counter counts as checked against
        # Postgres (set when this process seeds it).
        self._checked_until: dict[tuple[uuid.UUID, str], float] = {}
        self._batcher: MicroBatcher[CaptureRequest, CaptureResult] = MicroBatcher(
            self._capture_group,
            max_items=max_requests_per_group,
            max_concurrency=max_concurrent_groups,
            overlap_after_s=group_overlap_after_s,
            name="capture",
        )

    async def capture(self, request: CaptureRequest) -> CaptureResult:
        """Gates 4-6 for one request; GateClosed when Postgres failed."""
        return await self._batcher.submit(request)

    async def drain(self) -> None:
        await self._batcher.wait_idle()

    # -- one group ---------------------------------------------------------------------------------

    async def _capture_group(self, requests: list[CaptureRequest]) -> list[CaptureResult | Exception]:
        try:
            return list(await self._capture_requests(requests))
        except _DataRejected as exc:
            if len(requests) == 1:
                raise GateClosed(f"the request could not be captured: {exc.__cause__!r}") from exc
        # One request's data was refused: run each alone, so it cannot fail the others.
        outcomes: list[CaptureResult | Exception] = []
        for request in requests:
            try:
                outcomes.extend(await self._capture_requests([request]))
            except (_DataRejected, GateClosed) as exc:
                outcomes.append(exc if isinstance(exc, GateClosed) else GateClosed(repr(exc.__cause__)))
        return outcomes

    async def _capture_requests(self, requests: list[CaptureRequest]) -> list[CaptureResult]:
        for _ in range(MAX_ATTEMPTS):
            use_redis = time.monotonic() >= self._redis_down_until
            try:
                return await self._attempt(requests, use_redis)
            except _Reseeded:
                continue
            except _RedisUnavailable:
                self._redis_down_until = time.monotonic() + self._redis_retry_s
        return await self._attempt(requests, use_redis=False)

    async def _attempt(self, requests: list[CaptureRequest], use_redis: bool) -> list[CaptureResult]:
        results: list[list[EventResult | None]] = [[None] * len(r.events) for r in requests]
        rows = self._first_occurrences(requests, results)
        try:
            conn: asyncpg.Connection = await self._pool.acquire()
        except PG_ERRORS as exc:
            raise GateClosed(f"postgres unavailable: {exc!r}") from exc
        reserved: dict[str, int] = {}
        lost: _CommitUnconfirmed | None = None
        try:
            try:
                outcome = await self._in_transaction(conn, requests, rows, results, use_redis, reserved)
            except _CommitUnconfirmed as exc:
                lost = exc
            except (_Reseeded, _RedisUnavailable):
                raise
            except asyncpg.DataError as exc:
                await self._release(reserved)
                raise _DataRejected from exc
            except PG_ERRORS as exc:
                await self._release(reserved)  # normally already released under the lock
                raise GateClosed(f"postgres failed during capture: {exc!r}") from exc
            except Exception as exc:
                # Not an outage: something about one request that no check foresaw. The transaction is
                # rolled back; give back its reservations, then isolate the request.
                log.error("capture_group_failed", error=repr(exc), requests=len(requests), exc_info=True)
                await self._release(reserved)
                raise _DataRejected from exc
        finally:
            await self._pool.release(conn)
        if lost is not None:
            return await self._settle_unconfirmed_commit(lost, reserved)
        return outcome

    async def _settle_unconfirmed_commit(
        self, lost: _CommitUnconfirmed, reserved: dict[str, int]
    ) -> list[CaptureResult]:
        """The answer to a group whose COMMIT was not confirmed is what Postgres decided. Committed: its
        results stand (a 500 would have the client bill its events again after the key's bucket, and
        giving back the reservations would let a hard plan take more than N). Aborted: nothing was
        billed. Unknown (Postgres unreachable meanwhile): 500, the reservations kept, so the counter
        errs high until the check at the monthly limit re-seeds it."""
        if lost.xid is None:  # no row was inserted: nothing to bill either way (duplicates only)
            log.info("capture_commit_unconfirmed", transaction="no_rows", error=repr(lost.__cause__))
            return lost.outcome
        status = await self._transaction_status(lost.xid)
        log.warning("capture_commit_unconfirmed", transaction=status or "unknown", error=repr(lost.__cause__))
        if status == "committed":
            return lost.outcome
        if status == "aborted":
            await self._release(reserved)
        raise GateClosed(f"postgres failed during commit ({status or 'outcome unknown'})") from lost.__cause__

    async def _transaction_status(self, xid: int) -> str | None:
        """'committed' or 'aborted' as a fresh connection sees it, or None when it cannot tell in time."""
        deadline = time.monotonic() + COMMIT_OUTCOME_WAIT_S
        while time.monotonic() < deadline:
            try:
                async with self._pool.acquire(timeout=1.0) as conn:
                    status = await conn.fetchval(query("transaction_status"), xid, timeout=1.0)
            except PG_ERRORS:
                status = None
            if status in ("committed", "aborted"):
                return str(status)
            await asyncio.sleep(0.05)  # still in progress (the server has not seen the client go), or down
        return None

    def _first_occurrences(
        self, requests: list[CaptureRequest], results: list[list[EventResult | None]]
    ) -> list[_Row]:
        """Rows to insert; a repeated key within the group is a duplicate of its first occurrence."""
        first: dict[tuple[uuid.UUID, str, int], _Row] = {}
        rows: list[_Row] = []
        for r_index, request in enumerate(requests):
            for e_index, item in enumerate(request.events):
                identity = (request.site.id, item.key.key, item.key.t_ms)
                if identity in first:
                    results[r_index][e_index] = EventResult(EventStatus.DUPLICATE)
                    first[identity].repeats.append((r_index, e_index))
                    continue
                first[identity] = row = _Row(r_index, e_index, item, request.site)
                rows.append(row)
        return rows

    async def _in_transaction(
        self,
        conn: asyncpg.Connection,
        requests: list[CaptureRequest],
        rows: list[_Row],
        results: list[list[EventResult | None]],
        use_redis: bool,
        reserved: dict[str, int],
    ) -> list[CaptureResult]:
        xid: int | None = None
        committing = False
        try:
            async with conn.transaction():
                usage_before: dict[tuple[uuid.UUID, str], int] = {}
                if not use_redis:
                    usage_before = await self._lock_usage_in_postgres(conn, rows)
                flagged, xid = await self._insert_rows(conn, rows, "shared" if use_redis else "held")
                if flagged:
                    raise _NeedsSeed(flagged)
                groups = self._billable_groups(rows)
                if use_redis:
                    usage_before = await self._reserve_in_redis(groups, reserved)
                try:
                    await self._settle_quota(conn, groups, usage_before)
                    released = await self._publish_and_buffer(conn, requests, rows, results)
                    # Give back what ended uncaptured while our SHARED lock still stands, so a seed or
                    # a drift correction (EXCLUSIVE) never reads a counter that still holds it.
                    await self._release(released)
                    _subtract(reserved, released)
                except PG_ERRORS:
                    await self._release(reserved)
                    reserved.clear()
                    raise
                committing = True
        except _NeedsSeed as exc:
            # The transaction is rolled back: our shared locks are gone, so the seed can take its lock.
            await self._reseed(conn, exc.pairs, at_limit=exc.at_limit)
            raise _Reseeded from None
        except PG_ERRORS as exc:
            if committing:  # a definite failure reads as aborted below; a lost reply is settled by asking
                raise _CommitUnconfirmed(xid, self._results(results, use_redis)) from exc
            raise
        return self._results(results, use_redis)

    @staticmethod
    def _results(results: list[list[EventResult | None]], use_redis: bool) -> list[CaptureResult]:
        return [
            CaptureResult([res for res in request_results if res is not None], not use_redis)
            for request_results in results
        ]

    async def _lock_usage_in_postgres(
        self, conn: asyncpg.Connection, rows: list[_Row]
    ) -> dict[tuple[uuid.UUID, str], int]:
        pairs = sorted({(r.site.id, r.item.year_month) for r in rows if r.item.billable})
        if not pairs:
            return {}
        records = await conn.fetch(
            query("quota_usage_exclusive"), [p[0] for p in pairs], [p[1] for p in pairs]
        )
        return {(rec["site_id"], rec["year_month"]): int(rec["used"]) for rec in records}

    async def _insert_rows(
        self, conn: asyncpg.Connection, rows: list[_Row], lock_mode: str
    ) -> tuple[list[tuple[uuid.UUID, str]], int | None]:
        """(site, month) pairs Postgres wants re-seeded first, and the transaction id (None when no row
        was inserted: then the transaction billed nothing)."""
        if not rows:
            return [], None
        # Key order: two groups inserting the same keys wait on each other in one order, never in a
        # cycle. (The k-th rule follows arrival order from `rows`, not this order.)
        rows = sorted(rows, key=lambda r: (r.site.id, r.item.key.key, r.item.key.t_ms))
        records = await conn.fetch(
            query("ingest_capture_rows"),
            lock_mode,
            [r.site.id for r in rows],
            [r.item.key.key for r in rows],
            [r.item.key.version for r in rows],
            [r.item.key.bucket_at for r in rows],
            [r.item.created_at for r in rows],
            [r.item.billable for r in rows],
            [r.item.billing_reason for r in rows],
            [r.item.event.get("ec") if isinstance(r.item.event.get("ec"), str) else None for r in rows],
            [r.item.event.get("ea") if isinstance(r.item.event.get("ea"), str) else None for r in rows],
            [r.item.event.get("el") if isinstance(r.item.event.get("el"), str) else None for r in rows],
        )
        flagged = [
            (rec["site_id"], rec["pg_mode_year_month"]) for rec in records if rec["pg_mode_year_month"]
        ]
        if flagged:
            return flagged, None
        inserted = {(rec["site_id"], rec["idempotency_key"]) for rec in records}
        for row in rows:
            row.new = (row.site.id, row.item.key.key) in inserted
        return [], records[0]["xid"] if records else None

    def _billable_groups(self, rows: list[_Row]) -> OrderedDict[tuple[uuid.UUID, str], list[_Row]]:
        """New billable rows by (site, month), in arrival order: the order the k-th rule counts."""
        groups: OrderedDict[tuple[uuid.UUID, str], list[_Row]] = OrderedDict()
        for row in rows:
            if row.new and row.item.billable:
                groups.setdefault((row.site.id, row.item.year_month), []).append(row)
        return groups

    async def _reserve_in_redis(
        self,
        groups: OrderedDict[tuple[uuid.UUID, str], list[_Row]],
        reserved: dict[str, int],
    ) -> dict[tuple[uuid.UUID, str], int]:
        if not groups:
            return {}
        keys = [usage_key(site_id, ym) for site_id, ym in groups]
        args: list[int] = []
        for group in groups.values():
            args += [len(group), acceptance_cap(group[0].site.plan)]
        try:
            reply = await self._scripts.run(self._scripts.reserve_quota, keys, args)
        except REDIS_ERRORS as exc:
            log.warning("quota_redis_unavailable", error=str(exc) or type(exc).__name__)
            raise _RedisUnavailable from exc
        if reply[0] == 0:
            raise _NeedsSeed([list(groups)[i - 1] for i in reply[1:]])
        usage_before: dict[tuple[uuid.UUID, str], int] = {}
        unchecked: list[tuple[uuid.UUID, str]] = []
        now = time.monotonic()
        for (pair, group), key, used in zip(groups.items(), keys, reply[1:], strict=True):
            usage_before[pair] = used
            take = events_to_take(used, len(group), group[0].site.plan)
            if take:
                reserved[key] = reserved.get(key, 0) + take
            if passes_monthly_limit(used, len(group), group[0].site.plan) and self._checked_until.get(
                pair, 0.0
            ) <= now:
                unchecked.append(pair)
        if unchecked:
            # At the limit a counter that runs ahead of Postgres (the reservation of a process killed
            # mid-group, a release Redis did not take) would refuse or bill as overage events the plan
            # still covers. Give our reservations back under our SHARED lock, then seed those counters
            # exactly (EXCLUSIVE lock) and run the group again.
            await self._release(reserved)
            reserved.clear()
            raise _NeedsSeed(unchecked, at_limit=True)
        return usage_before

    async def _reseed(
        self, conn: asyncpg.Connection, pairs: list[tuple[uuid.UUID, str]], *, at_limit: bool = False
    ) -> None:
        """Seed Redis counters exactly from Postgres under the exclusive (site, month) lock; `at_limit`:
        this seed is the limit check, trusted for `limit_check_ttl_s` (a seed of a missing key is not:
        a reservation leaked after it must still be found when the month reaches its limit)."""
        for site_id, year_month in sorted(set(pairs)):
            async with conn.transaction():
                count = await conn.fetchval(query("quota_reseed"), site_id, year_month)
                try:
                    await self._redis.set(
                        usage_key(site_id, year_month), int(count), ex=usage_key_ttl_seconds(year_month)
                    )
                except REDIS_ERRORS as exc:
                    raise _RedisUnavailable from exc  # rolls back: the month stays marked for Postgres
            if at_limit:
                self._checked_until[(site_id, year_month)] = time.monotonic() + self._limit_check_ttl_s
            log.info("quota_counter_seeded", site_id=str(site_id), year_month=year_month, used=int(count))
        self._forget_stale_checks()

    def _forget_stale_checks(self) -> None:
        if len(self._checked_until) > 10_000:
            now = time.monotonic()
            self._checked_until = {p: t for p, t in self._checked_until.items() if t > now}

    async def _settle_quota(
        self,
        conn: asyncpg.Connection,
        groups: OrderedDict[tuple[uuid.UUID, str], list[_Row]],
        usage_before: dict[tuple[uuid.UUID, str], int],
    ) -> None:
        changed: list[tuple[_Row, str, bool, str]] = []
        for pair, group in groups.items():
            outcomes = decide_group(usage_before[pair], len(group), group[0].site.plan)
            for row, outcome in zip(group, outcomes, strict=True):
                row.quota = outcome
                if outcome.decision is Decision.REJECTED:
                    changed.append((row, "ACCEPTED", False, "rejected_quota"))
                elif outcome.decision is Decision.OVERAGE:
                    changed.append((row, "OVERAGE", True, "overage"))
        if changed:
            await conn.execute(
                query("ingest_settle_rows"),
                [c[0].site.id for c in changed],
                [c[0].item.key.key for c in changed],
                [c[0].item.key.bucket_at for c in changed],
                [c[1] for c in changed],
                [c[2] for c in changed],
                [c[3] for c in changed],
            )

    async def _publish_and_buffer(
        self,
        conn: asyncpg.Connection,
        requests: list[CaptureRequest],
        rows: list[_Row],
        results: list[list[EventResult | None]],
    ) -> dict[str, int]:
        """Publish each request's accepted events; buffer or discard what the broker did not confirm.

        Returns the Redis reservations to give back after the commit (events that ended uncaptured).
        """
        by_request: dict[int, list[_Row]] = {}
        for row in rows:
            if not row.new:
                results[row.request_index][row.event_index] = EventResult(EventStatus.DUPLICATE)
            elif row.quota is not None and row.quota.decision is Decision.REJECTED:
                results[row.request_index][row.event_index] = EventResult(
                    EventStatus.REJECTED_QUOTA, row.quota
                )
            else:
                by_request.setdefault(row.request_index, []).append(row)
        if not by_request:
            return {}
        order = list(by_request)
        messages = [self._message(requests[i], by_request[i]) for i in order]
        failures = await self._publisher.publish_many(messages)
        unconfirmed = [i for i, failure in zip(order, failures, strict=True) if failure is not None]
        for i, failure in zip(order, failures, strict=True):
            if failure is None:
                for row in by_request[i]:
                    results[i][row.event_index] = EventResult(EventStatus.QUEUED, row.quota)
        if not unconfirmed:
            return {}
        reason = next(str(f) for f in failures if f is not None)
        return await self._buffer_or_discard(conn, requests, rows, by_request, unconfirmed, reason, results)

    async def _buffer_or_discard(
        self,
        conn: asyncpg.Connection,
        requests: list[CaptureRequest],
        rows: list[_Row],
        by_request: dict[int, list[_Row]],
        unconfirmed: list[int],
        reason: str,
        results: list[list[EventResult | None]],
    ) -> dict[str, int]:
        buffered = [row for i in unconfirmed for row in by_request[i]]
        try:
            async with conn.transaction():  # a savepoint: its failure leaves the group's transaction usable
                await conn.execute(
                    query("ingest_buffer_rows"),
                    [r.site.id for r in buffered],
                    [r.item.key.key for r in buffered],
                    [r.item.key.bucket_at for r in buffered],
                    [enriched_event(requests[r.request_index], r.item) for r in buffered],
                    [ingest_routing_key(r.site.public_id) for r in buffered],
                    f"broker_publish_failed: {reason}",
                )
        except asyncpg.PostgresError as exc:
            log.error("fallback_buffer_write_failed", error=repr(exc), events=len(buffered))
        else:
            for row in buffered:
                results[row.request_index][row.event_index] = EventResult(EventStatus.DEGRADED, row.quota)
            return {}
        # Neither captured them: every row of those requests goes, so their retries start afresh.
        failed = set(unconfirmed)
        discarded = _uncaptured_rows(rows, failed)
        await conn.execute(
            query("ingest_discard_rows"),
            [r.site.id for r in discarded],
            [r.item.key.key for r in discarded],
            [r.item.key.bucket_at for r in discarded],
        )
        release: dict[str, int] = {}
        for row in discarded:
            if row.quota is not None and row.quota.decision is not Decision.REJECTED:
                key = usage_key(row.site.id, row.item.year_month)
                release[key] = release.get(key, 0) + 1
        for i in failed:
            results[i] = [EventResult(EventStatus.CAPTURE_FAILED)] * len(requests[i].events)
        return release

    def _message(self, request: CaptureRequest, rows: list[_Row]) -> OutgoingMessage:
        """One message per request: the event itself, or `{"events": [...]}` for a batch."""
        routing_key = ingest_routing_key(request.site.public_id)
        events = [enriched_event(request, row.item) for row in rows]
        if not request.is_batch:
            return OutgoingMessage(orjson.dumps(events[0]), routing_key, rows[0].item.ingest_id)
        return OutgoingMessage(
            orjson.dumps({"events": events}),
            routing_key,
            str(uuid.uuid4()),
            headers={"x-event-count": len(events)},
        )

    async def _release(self, reservations: dict[str, int]) -> None:
        """Give back Redis reservations of events that were not captured (best effort: a leak only
        makes the counter conservative until reconciliation corrects it)."""
        if not reservations:
            return
        keys = list(reservations)
        try:
            await self._scripts.run(self._scripts.release_quota, keys, [reservations[k] for k in keys])
        except REDIS_ERRORS as exc:
            log.warning("quota_release_failed", error=str(exc) or type(exc).__name__, keys=len(keys))
