"""The memory tiers of adapters on one worker: object store -> host cache -> device pool.

`AdapterTiers` moves adapter versions (identified by the sha256 of their canonical blob) between tiers:
- `fetch`: object store -> host cache (the object store verifies the hash; a tampered object raises
  `AdapterUnavailable(adapter_corrupted)` and is never cached);
- `load`: host cache -> device pool (fetching first if needed). The adapter is parsed and validated
  against the pool BEFORE anything is evicted, so a bad adapter never costs a good one its place; then
  least recently used adapters that no running invocation uses are evicted until it fits;
- `evict`: device -> host (or out of the host cache too).
Every transition is idempotent, counted and timed (`TransitionStats`), and reported in heartbeats.
Concurrent requests for the same version share one transition.

Invariant: the adapters registered with the engine are exactly the device tier, and their pages fit
the pool together, so a step never has to evict (the engine's own LRU stays idle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from protocol.messages import ErrorCode
from storage.adapter_format import load_canonical
from storage.errors import AdapterInvalid, ObjectCorrupted, ObjectMissing, StorageUnavailable
from storage.objectstore import ObjectStore
from workers.adapter_pool import AdapterPoolError, LoraWeights, PoolFull
from workers.adapters import lora_weights_from_parsed
from workers.engine import Engine
from workers.engine_thread import EngineThread
from workers.host_cache import HostCache

logger = logging.getLogger(__name__)

Tier = Literal["device", "host", "object"]


class AdapterUnavailable(Exception):
    """An adapter version cannot be brought to the device. `terminal` errors fail the invocation; the
    others (storage down, pool busy) are retried by redelivering it."""

    def __init__(self, code: ErrorCode, message: str, *, terminal: bool) -> None:
        super().__init__(message)
        self.code = code
        self.terminal = terminal


@dataclass
class TransitionStats:
    """Count and latency of one kind of tier transition."""

    count: int = 0
    total_ms: float = 0.0
    last_ms: float = 0.0

    def add(self, ms: float) -> None:
        self.count += 1
        self.total_ms += ms
        self.last_ms = ms

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "last_ms": round(self.last_ms, 3),
                "mean_ms": round(self.total_ms / self.count, 3) if self.count else 0.0}


@dataclass
class DeviceEntry:
    """An adapter version registered with the engine and resident in its pool."""

    sha256: str
    pages: int
    bytes: int
    load_ms: float
    last_used: float = field(default_factory=time.time)
    source: Tier = "object"  # where the version was when its load began (host or object)
    loaded_at: float = field(default_factory=time.time)  # unix seconds the load finished


class AdapterTiers:
    """Adapter versions of one worker across the three tiers (asyncio side; the engine via its thread)."""

    def __init__(self, *, engine: EngineThread, store: ObjectStore, cache: HostCache) -> None:
        self.engine = engine
        self.store = store
        self.cache = cache
        self.total_pages = engine.engine.adapters.total_pages
        self.device: dict[str, DeviceEntry] = {}
        self.stats = {name: TransitionStats() for name in ("fetch", "load", "evict")}
        self._in_use: dict[str, int] = {}  # sha -> invocations that use it now
        self._reserved: dict[str, int] = {}  # sha -> pages of a load in flight
        self._deferred_evictions: set[str] = set()
        self._flights: dict[tuple[str, str], asyncio.Future[float]] = {}
        self.on_evicted: Callable[[str], None] = lambda sha: None

    # -- queries -----------------------------------------------------------------------------------------

    def tier(self, sha: str) -> Tier:
        """Where a version is now."""
        if sha in self.device:
            return "device"
        return "host" if sha in self.cache else "object"

    def arrival(self, sha: str, arrived_at: float) -> tuple[Tier, float]:
        """Where a device-resident version was at unix time `arrived_at` (when an invocation arrived), and
        the ms of its load that happened after then. An invocation that was queued while the scheduler
        placed its adapter (the usual cold start: the worker pulls it only once the adapter is loaded)
        waited for that load: it reports the tier the load started from, not "device"."""
        entry = self.device.get(sha)
        if entry is None:
            return self.tier(sha), 0.0
        if arrived_at >= entry.loaded_at:
            return "device", 0.0
        return entry.source, min(entry.load_ms, (entry.loaded_at - arrived_at) * 1e3)

    @property
    def free_pages(self) -> int:
        return self.total_pages - sum(e.pages for e in self.device.values()) - sum(self._reserved.values())

    # -- use (pins a device adapter against eviction) ----------------------------------------------------

    def acquire(self, sha: str) -> bool:
        """Pin a device-resident version for one invocation; False if it is not on the device. Call this
        synchronously after `load` returns (no await in between) and `release` when the call ends."""
        entry = self.device.get(sha)
        if entry is None or sha in self._deferred_evictions:
            return False
        self._in_use[sha] = self._in_use.get(sha, 0) + 1
        entry.last_used = time.time()
        return True

    def release(self, sha: str) -> None:
        n = self._in_use.get(sha, 0) - 1
        if n > 0:
            self._in_use[sha] = n
            return
        self._in_use.pop(sha, None)
        if sha in self.device:
            self.device[sha].last_used = time.time()
        if sha in self._deferred_evictions:
            self._deferred_evictions.discard(sha)
            asyncio.get_running_loop().create_task(self.evict(sha))

    def in_use(self, sha: str) -> int:
        return self._in_use.get(sha, 0)

    # -- transitions -------------------------------------------------------------------------------------

    async def fetch(self, sha: str) -> float:
        """object store -> host cache. Returns the ms it took (0 when it was cached already)."""
        if sha in self.cache:
            return 0.0
        return await self._once("fetch", sha, self._fetch)

    async def load(self, sha: str) -> float:
        """host cache -> device pool, fetching first if needed. Returns the ms it took (0 when resident)."""
        if sha in self.device and sha not in self._deferred_evictions:
            return 0.0
        return await self._once("load", sha, self._load)

    async def evict(self, sha: str, *, tier: Literal["device", "host"] = "device") -> Tier:
        """Remove a version from the device (and from the host cache with tier='host'). An adapter that a
        running invocation uses leaves the device when that invocation ends. Returns where it is now."""
        started = time.perf_counter()
        if sha in self.device:
            if self._in_use.get(sha):
                self._deferred_evictions.add(sha)
                logger.info("adapter %s is in use; it leaves the device when its invocations end", sha)
            else:
                self.device.pop(sha)
                self._deferred_evictions.discard(sha)
                await self.engine.call(lambda e: e.remove_adapter(sha))
                self.stats["evict"].add((time.perf_counter() - started) * 1e3)
                self.on_evicted(sha)
        if tier == "host":
            await asyncio.to_thread(self.cache.drop, sha)
        return self.tier(sha)

    async def _once(self, kind: str, sha: str, run: Callable[[str], Awaitable[float]]) -> float:
        """Run a transition of `sha` once, however many callers ask for it at the same time."""
        key = (kind, sha)
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(run(sha))
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)

    async def _fetch(self, sha: str) -> float:
        started = time.perf_counter()
        try:
            blob = await asyncio.to_thread(self.store.get_blob, sha)
        except ObjectCorrupted as e:
            raise AdapterUnavailable(ErrorCode.adapter_corrupted, str(e), terminal=True) from e
        except ObjectMissing as e:
            raise AdapterUnavailable(
                ErrorCode.not_found, f"adapter version {sha} is not in the object store ({e})", terminal=True
            ) from e
        except StorageUnavailable as e:
            raise AdapterUnavailable(ErrorCode.unavailable, str(e), terminal=False) from e
        await asyncio.to_thread(self.cache.put, sha, blob)
        ms = (time.perf_counter() - started) * 1e3
        self.stats["fetch"].add(ms)
        logger.info("fetched adapter %s (%d bytes) into the host cache in %.1f ms", sha, len(blob), ms)
        return ms

    async def _load(self, sha: str) -> float:
        started = time.perf_counter()
        source = self.tier(sha)
        blob = await asyncio.to_thread(self.cache.get, sha)
        if blob is None:
            await self.fetch(sha)
            blob = await asyncio.to_thread(self.cache.get, sha)
            if blob is None:  # the cache budget is smaller than the blob: take it straight from the store
                blob = await asyncio.to_thread(self.store.get_blob, sha)
        pool = self.engine.engine.adapters.pool

        def parse() -> tuple[LoraWeights, int]:
            weights = lora_weights_from_parsed(load_canonical(blob))
            return weights, pool.pages_needed(weights)  # validates against the pool; changes nothing

        try:
            weights, pages = await asyncio.to_thread(parse)
        except (AdapterInvalid, AdapterPoolError) as e:
            raise AdapterUnavailable(ErrorCode.adapter_invalid, f"adapter version {sha}: {e}", terminal=True) from e
        if pages > self.total_pages:
            raise AdapterUnavailable(
                ErrorCode.adapter_invalid,
                f"adapter version {sha} needs {pages} pages; the device pool has {self.total_pages}",
                terminal=True,
            )
        if sha in self.device:  # a deferred eviction that is now cancelled
            self._deferred_evictions.discard(sha)
            return 0.0
        victims = self._victims(pages)
        # Claim the pages and drop the victims synchronously, so that no invocation pins a victim and no
        # other load counts these pages again while the engine works.
        for victim in victims:
            self.device.pop(victim)
        self._reserved[sha] = pages
        try:

            def install(engine: Engine) -> None:
                for victim in victims:
                    engine.remove_adapter(victim)
                engine.add_adapter(sha, weights)
                engine.adapters.ensure_resident([sha])  # copy to the device pool now, not in a step
                engine.adapters.release()

            await self.engine.call(install)
        except PoolFull as e:
            raise AdapterUnavailable(ErrorCode.overloaded, str(e), terminal=False) from e
        finally:
            self._reserved.pop(sha, None)
            for victim in victims:
                self.stats["evict"].add(0.0)
                self.on_evicted(victim)
        ms = (time.perf_counter() - started) * 1e3
        self.device[sha] = DeviceEntry(sha, pages, len(blob), ms, source=source)
        self.stats["load"].add(ms)
        logger.info(
            "loaded adapter %s (%d pages) in %.1f ms%s", sha, pages, ms,
            f", evicting {len(victims)} least recently used: {victims}" if victims else "",
        )
        return ms

    def _victims(self, pages: int) -> list[str]:
        """Least recently used device adapters that no invocation uses, enough to free `pages`."""
        free = self.free_pages
        victims: list[str] = []
        for entry in sorted(self.device.values(), key=lambda e: e.last_used):
            if free >= pages:
                break
            if self._in_use.get(entry.sha256):
                continue
            victims.append(entry.sha256)
            free += entry.pages
        if free < pages:
            raise AdapterUnavailable(
                ErrorCode.overloaded,
                f"the device pool has {free} free pages for an adapter of {pages}; every other adapter is in use",
                terminal=False,
            )
        return victims
