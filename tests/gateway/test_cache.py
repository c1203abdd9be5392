"""The gateway's hot-path caches (gateway/cache.py): entries age from fresh to stale to missing; a loading cache
runs one load per key for all the calls that miss together, refreshes a stale entry in the background while
calls keep its value, and stores nothing a load read across an invalidation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.cache import REFRESH_AT, Freshness, LoadingCache, TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loads:
    """A load function whose calls are counted and which returns only when released."""

    def __init__(self, values: list[object]) -> None:
        self.values = values
        self.calls = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self) -> object:
        self.calls += 1
        value = self.values[min(self.calls, len(self.values)) - 1]
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return value


async def settle() -> None:
    """Let every ready task run until it waits (a caller's get, then the load it started)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def stored_old() -> tuple[Clock, LoadingCache[str, object], Loads]:
    """A 10 s cache whose "key" was loaded once ("old"; its next load gives "new"), at clock 1000."""
    clock = Clock()
    cache: LoadingCache[str, object] = LoadingCache(10.0, 100, clock)
    load = Loads(["old", "new"])
    load.release.set()
    assert await cache.get("key", load) == "old"
    return clock, cache, load


def test_entries_age_fresh_then_stale_then_missing() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(10.0, 100, clock)
    assert cache.lookup("k") == (Freshness.MISSING, None)
    cache.put("k", 1)
    assert cache.lookup("k") == (Freshness.FRESH, 1)
    clock.now += 10.0 * REFRESH_AT - 0.01
    assert cache.lookup("k") == (Freshness.FRESH, 1)
    clock.now += 0.02
    assert cache.lookup("k") == (Freshness.STALE, 1)
    assert cache.get("k") == (True, 1)
    clock.now = 1000.0 + 10.01
    assert cache.lookup("k") == (Freshness.MISSING, None)
    assert cache.get("k") == (False, None)


def test_bounded_and_ttl_zero_stores_nothing() -> None:
    cache: TtlCache[int, int] = TtlCache(10.0, 3, Clock())
    for i in range(3):
        cache.put(i, i)
    cache.put(1, 10)  # replacing an entry is not growth
    assert cache.get(0) == (True, 0)
    cache.put(3, 3)  # a fourth key clears the whole cache
    assert [cache.get(i)[0] for i in range(4)] == [False, False, False, True]
    off: TtlCache[int, int] = TtlCache(0.0, 3, Clock())
    off.put(1, 1)
    assert off.get(1) == (False, None)


async def test_calls_that_miss_together_share_one_load() -> None:
    cache: LoadingCache[str, object] = LoadingCache(10.0, 100, Clock())
    load = Loads(["owner"])
    calls = [asyncio.create_task(cache.get("key", load)) for _ in range(16)]
    await settle()
    load.release.set()
    assert await asyncio.gather(*calls) == ["owner"] * 16
    assert load.calls == 1
    assert await cache.get("key", load) == "owner" and load.calls == 1  # stored


async def test_stale_entry_is_served_while_one_refresh_runs() -> None:
    clock, cache, load = await stored_old()
    clock.now += 6.0  # past REFRESH_AT of the TTL, not expired
    load.release.clear()
    got = [await cache.get("key", load) for _ in range(16)]  # none of them waits for the database
    await settle()
    assert got == ["old"] * 16 and load.calls == 2  # one refresh for all 16
    load.release.set()
    await settle()
    assert await cache.get("key", load) == "new" and load.calls == 2
    clock.now += 4.9  # the refresh restarted the entry's clock: 10.9 s after the first load, still fresh
    assert cache.cached("key") == (True, "new") and load.calls == 2


async def test_expired_entry_waits_for_its_load() -> None:
    clock, cache, load = await stored_old()
    clock.now += 10.5
    assert await cache.get("key", load) == "new" and load.calls == 2


async def test_failed_load_reaches_every_waiter_and_stores_nothing() -> None:
    cache: LoadingCache[str, object] = LoadingCache(10.0, 100, Clock())
    load = Loads(["x", "y"])
    load.fail = ConnectionError("database down")
    calls = [asyncio.create_task(cache.get("key", load)) for _ in range(4)]
    await settle()
    load.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results) and load.calls == 1
    load.fail = None
    assert await cache.get("key", load) == "y" and load.calls == 2  # nothing stored: loaded again


async def test_failed_refresh_keeps_the_entry_until_it_expires() -> None:
    clock, cache, load = await stored_old()
    clock.now += 6.0
    load.fail = ConnectionError("database down")
    assert await cache.get("key", load) == "old"
    await settle()
    assert cache.cached("key") == (True, "old")
    clock.now += 4.5
    load.fail = None
    assert await cache.get("key", load) == "new" and load.calls == 3


async def test_load_across_an_invalidation_stores_nothing() -> None:
    cache: LoadingCache[str, object] = LoadingCache(10.0, 100, Clock())
    load = Loads(["read before the event", "read after it"])
    first = asyncio.create_task(cache.get("key", load))
    await settle()
    cache.discard("key")  # e.g. the key was revoked while its lookup ran
    second = asyncio.create_task(cache.get("key", load))  # does not join the load that straddles the event
    await settle()
    assert load.calls == 2
    load.release.set()
    assert await first == "read before the event"
    assert await second == "read after it"
    assert cache.cached("key") == (True, "read after it")

    for invalidate in (cache.clear, cache.abandon_loads):
        load = Loads(["straddles"])
        cache.discard("key")
        task = asyncio.create_task(cache.get("key", load))
        await settle()
        invalidate()
        load.release.set()
        await task
        assert cache.cached("key") == (False, None), invalidate


async def test_a_cancelled_caller_does_not_cancel_the_others_load() -> None:
    cache: LoadingCache[str, object] = LoadingCache(10.0, 100, Clock())
    load = Loads(["owner"])
    leaving = asyncio.create_task(cache.get("key", load))
    staying = asyncio.create_task(cache.get("key", load))
    await settle()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    load.release.set()
    assert await staying == "owner" and load.calls == 1
