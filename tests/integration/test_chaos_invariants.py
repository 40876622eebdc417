"""Chaos: a real `revkernel gateway` whose Postgres, Redis and RabbitMQ connections go through proxies
that a seeded chaos lane cuts or stalls (one dependency at a time, 0.3-2 s), while the process itself is
SIGKILLed and restarted twice, under tracker-like clients (singles and small batches, repeats of earlier
bodies, retries of the same body on 5xx and connection errors). Afterwards, with everything restored
and the fallback buffer recovered, the money invariants hold (SPEC §1, §3, §5, §6, §14):

1. answers ↔ rows: every `queued`/`degraded` answer (single or batch result) stands for exactly one
   billable row of its event, every `rejected_quota` answer for one unbilled row; no event has a row
   no answer accounts for, except a request whose answer a SIGKILL cut (in flight at the kill);
2. rows ↔ broker: every billable row's key and every accepted answer's ingest_id is in
   `ingest.events`; a published key without a billable row only for an event that got a 5xx or lost
   its answer at a kill (docs/gateway.md: crash before COMMIT, "If the COMMIT is not confirmed");
3. quota: per site, billable rows ≤ cap (hard: N, soft: floor(N × 1.5)); exactly the cap once any
   event was refused;
4. nothing left DEGRADED_CAPTURE, nothing PENDING/PROCESSING/FAILED in the buffer.

Every event carries a unique `el` (stored as ingest_idempotency.event_label), so answers map to rows.
The event of one `el` can be billed more than once only when it was sent more than once into different
5 s key buckets (a repeat, or a retry after a lost answer): SPEC §4's keys are time buckets. So the
check is per answer, not "one row per el". Seeded by RK_CHAOS_SEED; the interleaving is timing-bound.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest

from services.reconciler.recovery import RecoverySettings, recover_batch
from shared.db import create_pool
from shared.publisher import EventPublisher
from shared.queries import query
from shared.settings import Settings
from tests.conftest import AMQP_HOST, AMQP_PORT, PG_HOST, PG_PORT, RedisServer, settings_env
from tests.integration.conftest import MakeSite
from tests.integration.reconciler_support import poll
from tests.support.gateway import drain_queue, published_events
from tests.support.gateway_process import GatewayProcess
from tests.support.proxy import TcpProxy

SEED = int(os.environ.get("RK_CHAOS_SEED", "20251125"))
LOAD_S = 22.0
CLIENTS = 8
KILLS = 2
THINK_S = 0.02  # a client's pause between requests (0..THINK_S)
SMALL_EVERY_S = 0.1  # one request to a small site (hard/soft in turn) this often: caps reached mid-run
MAX_ATTEMPTS = 12
RETRY_WINDOW_S = 10.0  # retries go on this long after the load ends
HARD, SOFT, BIG = "chaos-hard", "chaos-soft", "chaos-big"
CAPS = {HARD: 40, SOFT: math.floor(30 * 1.5), BIG: 1_000_000}
ACCEPTED = ("queued", "degraded")
RETRIED = (0, 500, 502, 503, 504)  # 0: no answer (refused, reset, timeout)
FAILED = ("5xx", "lost_at_kill")  # answers after which a published copy without a billable row may exist


@dataclass
class Answer:
    """One attempt of one request: per-event outcomes in the order of `els`."""

    rid: int
    attempt: int
    site: str
    code: int
    els: list[str]
    outcomes: list[str]
    ingest_ids: list[str | None]


@dataclass
class Chaos:
    actions: Counter[str] = field(default_factory=Counter)
    timeline: list[str] = field(default_factory=list)


def via(url: str, proxy: TcpProxy) -> str:
    """`url` with its host and port replaced by the proxy's (credentials, path kept)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def per_event(code: int, payload: Any, n: int) -> tuple[list[str], list[str | None]]:
    """Each event's outcome in an answer, and its ingest_id when accepted."""
    body = payload if isinstance(payload, dict) else {}
    if code == 200 and isinstance(body.get("results"), list) and len(body["results"]) == n:
        results = body["results"]
        return [str(r.get("status")) for r in results], [r.get("ingest_id") for r in results]
    if code == 200 and "results" not in body and n == 1:
        return [str(body.get("status"))], [body.get("ingest_id")]
    if code == 429:
        return [str(body.get("status"))] * n, [None] * n
    outcome = "5xx" if code >= 500 else f"http_{code}"
    return [outcome] * n, [None] * n


class Trackers:
    """The clients: each request's every attempt is recorded as an Answer."""

    def __init__(self, url: str, stop_at: float) -> None:
        self.url = url
        self.stop_at = stop_at
        self.answers: list[Answer] = []
        self.requests = 0
        self.in_flight: set[int] = set()
        self.cut_by_kill: set[int] = set()
        self.first_refusal: dict[str, float] = {}  # site -> seconds into the load
        self._tokens = itertools.count()
        self._rids = itertools.count()
        self._next_small = 0.0
        self._small_turn = itertools.cycle((HARD, SOFT))

    def kill_cuts_in_flight(self) -> int:
        """Called just before a SIGKILL: the attempts now in flight may or may not have been captured."""
        self.cut_by_kill |= self.in_flight
        return len(self.in_flight)

    def _site(self) -> str:
        now = time.monotonic()
        if now >= self._next_small:
            self._next_small = now + SMALL_EVERY_S
            return next(self._small_turn)
        return BIG

    def _request(self, rng: random.Random, recent: list[tuple[str, bytes, list[str]]]) -> tuple[
        str, bytes, list[str]
    ]:
        if recent and rng.random() < 0.08:
            return rng.choice(recent)  # a repeat of an earlier body
        site = self._site()

        def event() -> dict[str, Any]:
            el = f"{rng.getrandbits(64):016x}"
            return {"s": site, "url": f"https://shop.example/p/{el}", "ec": "page", "ea": "view", "el": el,
                    "meta": {"fp": f"fp{rng.randrange(10**6)}"}}

        if rng.random() < 0.6:
            one = event()
            request = (site, orjson.dumps(one), [one["el"]])
        else:
            events = [event() for _ in range(rng.randint(1, 3 if site != BIG else 6))]
            if len(events) > 1 and rng.random() < 0.2:
                events.append(dict(events[0]))  # an in-batch duplicate
            request = (site, orjson.dumps({"events": events}), [e["el"] for e in events])
        recent.append(request)
        del recent[:-20]
        return request

    async def client(self, cid: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(SEED * 1000 + cid)
        recent: list[tuple[str, bytes, list[str]]] = []
        while time.monotonic() < self.stop_at:
            site, body, els = self._request(rng, recent)
            rid = next(self._rids)
            self.requests += 1
            for attempt in range(MAX_ATTEMPTS):
                answer = await self._attempt(session, rid, attempt, site, body, els)
                self.answers.append(answer)
                if answer.code not in RETRIED or time.monotonic() > self.stop_at + RETRY_WINDOW_S:
                    break
                await asyncio.sleep(rng.uniform(0.2, 0.6))  # a tracker's retry: the same body
            await asyncio.sleep(rng.uniform(0, THINK_S))

    async def _attempt(
        self, session: aiohttp.ClientSession, rid: int, attempt: int, site: str, body: bytes, els: list[str]
    ) -> Answer:
        token = next(self._tokens)
        self.in_flight.add(token)
        try:
            async with session.post(
                f"{self.url}/api/sync", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                payload = await response.json(content_type=None)
                outcomes, ids = per_event(response.status, payload, len(els))
                if "rejected_quota" in outcomes:
                    self.first_refusal.setdefault(site, time.monotonic() - self.stop_at + LOAD_S)
                return Answer(rid, attempt, site, response.status, els, outcomes, ids)
        except aiohttp.ClientConnectorError:
            outcome = "refused"  # never reached a gateway
        except TimeoutError:
            outcome = "lost_at_kill" if token in self.cut_by_kill else "timeout"
        except aiohttp.ClientError:
            outcome = "lost_at_kill" if token in self.cut_by_kill else "lost"
        finally:
            self.in_flight.discard(token)
        return Answer(rid, attempt, site, 0, els, [outcome] * len(els), [None] * len(els))


async def chaos_lane(
    proxies: dict[str, TcpProxy], gateway: GatewayProcess, trackers: Trackers, chaos: Chaos, started: float
) -> None:
    """One fault at a time: cut or stall a dependency for 0.3-2 s; SIGKILL + restart KILLS times."""
    rng = random.Random(SEED)
    kills = 0
    turns = itertools.cycle(rng.sample(sorted(proxies), len(proxies)))  # every dependency gets faults
    while time.monotonic() < trackers.stop_at - 1.0:
        await asyncio.sleep(rng.uniform(0.2, 0.8))
        elapsed = time.monotonic() - started
        if kills < KILLS and elapsed >= (kills + 1) * LOAD_S / (KILLS + 1):
            kills += 1
            in_flight = trackers.kill_cuts_in_flight()
            gateway.kill()
            chaos.timeline.append(f"{elapsed:.1f}s sigkill({in_flight} in flight)")
            await gateway.start()
            chaos.timeline.append(f"{time.monotonic() - started:.1f}s restarted")
            chaos.actions["sigkill"] += 1
            continue
        name = next(turns)
        action = rng.choice(("cut", "cut", "stall"))
        duration = rng.uniform(0.3, 2.0)
        proxy = proxies[name]
        if action == "cut":
            await proxy.cut()
        else:
            proxy.stall()
        chaos.actions[f"{name}:{action}"] += 1
        chaos.timeline.append(f"{elapsed:.1f}s {name} {action} {duration:.1f}s")
        try:
            await asyncio.sleep(duration)
        finally:
            heal(proxy)


def heal(proxy: TcpProxy) -> None:
    proxy.restore()
    proxy.resume()


async def recover_buffer(database_url: str, amqp_url: str) -> int:
    """Run the reconciler's fallback recovery until nothing is PENDING or PROCESSING; the rows recovered."""
    pool = await create_pool(database_url, min_size=1, max_size=2)
    publisher = EventPublisher(amqp_url, timeout_ms=5000)
    await publisher.start()
    recovered = 0
    try:
        async def ready() -> bool:
            return publisher.is_ready

        async def drained() -> bool:
            nonlocal recovered
            recovered += (await recover_batch(pool, publisher, RecoverySettings(batch_size=500, lease_s=1))
                          ).recovered
            return int(await pool.fetchval(query("recovery_pending_count"))) == 0

        await poll(ready, timeout_s=15)
        await poll(drained, timeout_s=30, interval_s=0.1)
    finally:
        await publisher.close()
        await pool.close()
    return recovered


def by_event(answers: Iterable[Answer]) -> tuple[dict[str, Counter[str]], list[tuple[str, str]]]:
    """Per `el`: how often each outcome was answered; and (el, ingest_id) of every accepted answer."""
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    accepted: list[tuple[str, str]] = []
    for answer in answers:
        for el, outcome, ingest_id in zip(answer.els, answer.outcomes, answer.ingest_ids, strict=True):
            outcomes[el][outcome] += 1
            if outcome in ACCEPTED:
                accepted.append((el, str(ingest_id)))
    return outcomes, accepted


def check_rows_match_answers(
    outcomes: dict[str, Counter[str]], rows: list[asyncpg.Record], problems: list[str], tally: Counter[str]
) -> None:
    """Invariant 1: each accepted answer is one billable row, each refusal one unbilled row; any other
    row only for an answer cut by a SIGKILL."""
    rows_by_el: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        rows_by_el[row["event_label"]].append(row)
    for el in set(outcomes) | set(rows_by_el):
        seen = outcomes.get(el, Counter())
        billable = sum(1 for r in rows_by_el[el] if r["billable"])
        unbilled = sum(1 for r in rows_by_el[el] if not r["billable"])
        extra_billable = billable - sum(seen[o] for o in ACCEPTED)
        extra_unbilled = unbilled - seen["rejected_quota"]
        if extra_billable < 0 or extra_unbilled < 0:
            problems.append(f"1: {el} answered {dict(seen)}, rows {billable} billable/{unbilled} unbilled")
        elif extra_billable + extra_unbilled > seen["lost_at_kill"]:
            problems.append(f"1: {el} has rows no answer accounts for: answered {dict(seen)}, "
                            f"{billable} billable/{unbilled} unbilled rows")
        else:
            tally["rows_of_answers_cut_by_kill"] += extra_billable + extra_unbilled
        if any(o in ACCEPTED for o in seen) and not billable:
            problems.append(f"1: {el} accepted without a billable row: {dict(seen)}")
        if seen["duplicate"] and not rows_by_el[el]:
            # A duplicate answer means a committed row of its key; without one the event is lost (the
            # client stops retrying).
            problems.append(f"1: {el} answered duplicate but has no row: {dict(seen)}")


def check_rows_match_broker(
    outcomes: dict[str, Counter[str]],
    accepted: list[tuple[str, str]],
    rows: list[asyncpg.Record],
    published: list[dict[str, Any]],
    problems: list[str],
    tally: Counter[str],
) -> None:
    """Invariant 2: billed ⊆ published; published and not billed only after a failed answer."""
    published_keys = {e["idempotency_key"] for e in published}
    key_of_id = {e["ingest_id"]: e["idempotency_key"] for e in published}
    billable_keys = {r["idempotency_key"] for r in rows if r["billable"]}
    for row in rows:
        if row["billable"] and row["idempotency_key"] not in published_keys:
            problems.append(f"2: billable row of {row['event_label']} ({row['billing_state']}) not published")
    # Each accepted answer, through its published ingest_id, names its own billable row.
    answered_keys: Counter[str] = Counter()
    for el, ingest_id in accepted:
        key = key_of_id.get(ingest_id)
        if key is None:
            problems.append(f"2: {el} answered accepted, ingest_id {ingest_id} never published")
        elif key not in billable_keys:
            problems.append(f"2: {el} answered accepted, published as {key} without a billable row")
        else:
            answered_keys[key] += 1
    problems.extend(f"2: one row accepted {n} times: {key}" for key, n in answered_keys.items() if n > 1)
    for event in published:
        if event["idempotency_key"] in billable_keys:
            continue
        seen = outcomes.get(event.get("el", ""), Counter())
        if any(seen[o] for o in FAILED):
            tally["published_after_a_failed_answer"] += 1
        else:
            problems.append(f"2: {event.get('el')} published without a billable row, answered {dict(seen)}")


def check_quota(
    answers: list[Answer], rows: list[asyncpg.Record], problems: list[str], billed: dict[str, int]
) -> None:
    """Invariant 3: a site never bills past its cap, and refuses only once the cap is reached."""
    refused = {a.site for a in answers if "rejected_quota" in a.outcomes}
    for site, cap in CAPS.items():
        billed[site] = sum(1 for r in rows if r["public_id"] == site and r["billable"])
        if billed[site] > cap:
            problems.append(f"3: {site} billed {billed[site]} > cap {cap}")
        if site in refused and billed[site] != cap:
            problems.append(f"3: {site} refused events with {billed[site]} billed, cap {cap}")
    if not {HARD, SOFT} <= refused:
        problems.append(f"3: a small site never reached its cap (refused: {sorted(refused)}): load too light")


@pytest.mark.timeout(300)  # 22 s of load, retries, two restarts, a graceful stop and recovery
async def test_money_invariants_hold_through_dependency_faults_and_sigkills(
    settings: Settings,
    db: asyncpg.Connection,
    database_url: str,
    redis_server: RedisServer,
    redis_url: str,
    amqp_url: str,
    make_site: MakeSite,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    unlimited = 1_000_000
    await make_site(HARD, monthly_limit=CAPS[HARD], soft=False, rate_limit_per_minute=unlimited)
    await make_site(SOFT, monthly_limit=30, soft=True, multiplier="1.5", rate_limit_per_minute=unlimited)
    await make_site(BIG, monthly_limit=CAPS[BIG], rate_limit_per_minute=unlimited)

    proxies = {
        "pg": await TcpProxy(PG_HOST, PG_PORT).start(),
        "redis": await TcpProxy("127.0.0.1", redis_server.port).start(),
        "amqp": await TcpProxy(AMQP_HOST, AMQP_PORT).start(),
    }
    proxied = settings.with_overrides(
        database_url=via(database_url, proxies["pg"]),
        redis_url=via(redis_url, proxies["redis"]),
        amqp_url=via(amqp_url, proxies["amqp"]),
        publish_timeout_ms=1000,  # the product default: a stalled broker degrades in 1 s
    )
    gateway = GatewayProcess(settings_env(proxied), tmp_path / "gateway.log")
    chaos = Chaos()
    t0 = time.monotonic()
    try:
        await gateway.start()
        started = time.monotonic()
        trackers = Trackers(gateway.url, stop_at=started + LOAD_S)
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            lane = asyncio.create_task(chaos_lane(proxies, gateway, trackers, chaos, started))
            try:
                await asyncio.gather(*(trackers.client(cid, http) for cid in range(CLIENTS)))
            finally:
                await lane
                for proxy in proxies.values():
                    heal(proxy)
        load_s = time.monotonic() - started
        exit_code = await gateway.stop()
    finally:
        gateway.kill()
        for proxy in proxies.values():
            await proxy.close()
    assert exit_code == 0, gateway.log_tail()

    recovered = await recover_buffer(database_url, amqp_url)
    rows = await db.fetch(
        """SELECT s.public_id, i.event_label, i.idempotency_key, i.billable, i.billing_state::text
           FROM ingest_idempotency i JOIN sites s ON s.id = i.site_id"""
    )
    buffer = {r["status"]: r["n"] for r in await db.fetch(
        "SELECT status, count(*) AS n FROM ingest_fallback_buffer GROUP BY status")}
    published = published_events(await drain_queue(amqp_url))

    answers = trackers.answers
    outcomes, accepted = by_event(answers)
    problems: list[str] = []
    tally: Counter[str] = Counter()
    billed: dict[str, int] = {}
    check_rows_match_answers(outcomes, rows, problems, tally)
    check_rows_match_broker(outcomes, accepted, rows, published, problems, tally)
    check_quota(answers, rows, problems, billed)
    # Invariant 4: recovery settled everything the broker did not confirm at ingest time.
    left = Counter(r["billing_state"] for r in rows)["DEGRADED_CAPTURE"]
    if left or set(buffer) - {"RECOVERED"}:
        problems.append(f"4: {left} rows left DEGRADED_CAPTURE, buffer {buffer}")

    statuses = Counter(o for a in answers for o in a.outcomes)
    refusals = {site: round(t, 1) for site, t in trackers.first_refusal.items()}
    with capsys.disabled():
        print(
            f"\nchaos seed {SEED}: {trackers.requests} requests, {len(answers)} attempts in {load_s:.1f}s, "
            f"codes {dict(Counter(a.code for a in answers))}, events {dict(statuses)}; "
            f"faults {dict(chaos.actions)}; first refusal at {refusals}s; {len(rows)} rows, billed {billed}, "
            f"{len(published)} published, "
            f"{recovered} recovered, buffer {buffer}; tolerated {dict(tally)}; "
            f"total {time.monotonic() - t0:.1f}s\n  timeline: {'; '.join(chaos.timeline)}"
        )
    assert chaos.actions["sigkill"] == KILLS
    # The faults reached requests (the gateway really went through the proxies).
    assert statuses["degraded"] > 0 and statuses["5xx"] + statuses["refused"] > 0, dict(statuses)
    assert not problems, f"{len(problems)} violations:\n" + "\n".join(problems[:25])
