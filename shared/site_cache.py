"""The auth gate's site lookup: cached in process with expiry, negatively too, one query per miss."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from shared.sites import Site, fetch_site_by_public_id

NEGATIVE_TTL_CAP_S = 5.0


class SiteCache:
    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float, default_monthly_limit: int) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._negative_ttl_s = min(ttl_s, NEGATIVE_TTL_CAP_S)
        self._default_monthly_limit = default_monthly_limit
        self._entries: dict[str, tuple[Site | None, float]] = {}
        self._loading: dict[str, asyncio.Future[Site | None]] = {}

    async def get(self, public_id: str) -> Site | None:
        """The site, or None when no site has this public id. Database errors propagate."""
        entry = self._entries.get(public_id)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        loading = self._loading.get(public_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Site | None] = asyncio.get_running_loop().create_future()
        self._loading[public_id] = future
        try:
            site = await fetch_site_by_public_id(self._pool, public_id, self._default_monthly_limit)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters re-raise it; mark it retrieved for the lone caller
            raise
        finally:
            self._loading.pop(public_id, None)
        ttl = self._ttl_s if site is not None else self._negative_ttl_s
        self._entries[public_id] = (site, time.monotonic() + ttl)
        future.set_result(site)
        return site
