"""Small TTL caches for the hot path (API keys, adapter names); bounded, per app, never global.

A busy key or adapter must not make every concurrent call wait for the database when its entry expires:
measured with 16 callers of one key, the 5 s API-key entry expired under all 16 at once, each ran its own
lookup and `last_used_at` update, and the 16 updates of one row queued on its lock and on 16 commits, a
100-170 ms stall of the whole gateway path every 5 s. `LoadingCache` therefore
- runs at most one load per key at a time (single flight): calls that miss together share it;
- refreshes an entry in the background once it is older than `REFRESH_AT` of its TTL while calls keep getting
  the stored value, so that a key or adapter in steady use never expires under its calls;
- never stores what a load read across an invalidation (`discard`, `clear`): that load may have read what the
  invalidating event just changed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar, cast

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger(__name__)

REFRESH_AT = 0.5  # an entry older than this fraction of its TTL is reloaded in the background when used


class Freshness(enum.Enum):
    FRESH = "fresh"  # stored less than REFRESH_AT x ttl ago
    STALE = "stale"  # still valid, due for a refresh
    MISSING = "missing"  # never stored, or expired


class TtlCache(Generic[K, V]):
    """Entries expire `ttl_s` after they were stored; the whole cache is cleared when it reaches
    `max_entries` (simple and bounded: a burst of distinct keys cannot grow memory without limit)."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: dict[K, tuple[float, V]] = {}  # key -> (stored at, value)

    def lookup(self, key: K) -> tuple[Freshness, V | None]:
        """How fresh the entry is, and its value (None when missing)."""
        entry = self._entries.get(key)
        if entry is None:
            return Freshness.MISSING, None
        stored, value = entry
        age = self._clock() - stored
        if age > self.ttl_s:
            self._entries.pop(key, None)
            return Freshness.MISSING, None
        return (Freshness.STALE if age >= self.ttl_s * REFRESH_AT else Freshness.FRESH), value

    def get(self, key: K) -> tuple[bool, V | None]:
        """(hit, value); a miss or an expired entry is (False, None)."""
        freshness, value = self.lookup(key)
        return freshness is not Freshness.MISSING, value

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries and key not in self._entries:
            self._entries.clear()
        self._entries[key] = (self._clock(), value)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class LoadingCache(Generic[K, V]):
    """A TtlCache that loads its own misses: one load per key at a time, shared by every call that needs it,
    and stale entries refreshed in the background (see the module docstring). A failed load reaches every call
    that waited for it and stores nothing; a failed background refresh leaves the entry to expire."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.entries: TtlCache[K, V] = TtlCache(ttl_s, max_entries, clock)
        self._flights: dict[K, asyncio.Task[V]] = {}
        self._generation = 0  # +1 per invalidation: a load that straddles one does not store what it read

    def cached(self, key: K) -> tuple[bool, V | None]:
        """(hit, value) without loading or refreshing anything."""
        return self.entries.get(key)

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The stored value, or the one `load` returns (awaited by every caller that missed meanwhile)."""
        freshness, value = self.entries.lookup(key)
        if freshness is Freshness.MISSING:
            # shield: a caller that goes away (a client disconnect) must not cancel the others' load
            return await asyncio.shield(self._flight(key, load))
        if freshness is Freshness.STALE:
            self._flight(key, load)
        return cast(V, value)  # FRESH and STALE carry the stored value

    def discard(self, key: K) -> None:
        """Forget `key`: the next call loads it anew, and a load already running does not store."""
        self._generation += 1
        self.entries.discard(key)
        self._flights.pop(key, None)

    def clear(self) -> None:
        self.abandon_loads()
        self.entries.clear()

    def abandon_loads(self) -> None:
        """Loads running now store nothing, and the next miss starts a load of its own (for an invalidation of
        a key that is not stored: a load of it may be running)."""
        self._generation += 1
        self._flights.clear()

    def _flight(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, load, self._generation))
            self._flights[key] = task
            task.add_done_callback(lambda t: self._landed(key, t))
        return task

    async def _load(self, key: K, load: Callable[[], Awaitable[V]], generation: int) -> V:
        value = await load()
        if generation == self._generation:
            self.entries.put(key, value)
        return value

    def _landed(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled() and task.exception() is not None:  # retrieved here: waiters got it too
            log.debug("cache load of %r failed: %r", key, task.exception())
