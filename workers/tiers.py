"""The memory tiers of adapters on one worker: object store -> host cache -> device pool.

`AdapterTiers` moves adapter versions (identified by the sha256 of their canonical blob) between tiers:
- `fetch`: object store -> host cache (the object store verifies the hash; a tampered object raises
  `AdapterUnavailable(adapter_corrupted)` and is never cached). The cache keeps the blob narrowed to the
  pool's dtype (`narrowed_blob`: a float32 adapter in half the bytes when the pool holds bfloat16 or float16,
  the pool's pages bit for bit the same), so the host tier holds twice as many float32 adapters and a load
  parses and copies half the bytes;
- `load`: host cache -> device pool (fetching first if needed). The adapter is parsed and validated
  against the pool BEFORE anything is evicted, so a bad adapter never costs a good one its place; then
  the injected `EvictionPolicy` (the engine's, `LruEviction` by default) chooses, among the adapters no
  running invocation uses, those that leave to make room;
- `evict`: device -> host (or out of the host cache too).
Every transition is idempotent, counted and timed (`TransitionStats`), and reported in heartbeats.
Concurrent requests for the same version share one transition.

How a load reaches the pool (`EngineSettings.adapter_load`). "background" (the default): the engine
thread only removes the victims and claims the pages (`AdapterPool.reserve`; with no victims and no
version leaving, the claim is made here under the pool's lock without asking the engine thread); a worker
thread converts the weights and copies them into the claimed pages (`AdapterPool.write`; on CUDA from
pinned memory on a side stream) while the engine keeps stepping; then the engine thread publishes the
adapter between two steps (`Engine.adopt_adapter`). The engine thread's share is constant work, whatever
the adapter's size. A claimed page is invisible to steps until it is published, and a failure or a
cancellation at any stage frees it (`AdapterPool.cancel`). "engine": the whole copy runs on the engine
thread between two steps, so every decode of the worker waits for it (kept to measure the difference:
`python -m bench stall`).

Who records what. The adapter pool's page tables are the one record of which versions are on the device
and how many pages each holds (`AdapterPool.resident_pages`); nothing here copies it. `AdapterTiers`
keeps what the pool does not know: per version its blob's bytes, its rank (once a load parsed it), when
an invocation last used it, how many use it now, and where its latest load started and when it finished;
and, for the moments when the engine thread is changing the pool, the pages a load in flight has claimed
and the versions leaving. The host cache records the host tier (`HostCache.entries`, including the blobs
a previous process left on disk). `resident()` joins the three into what heartbeats report.

Invariant: the adapters registered with the engine are exactly the pool's residents, and the pool has
room for each load before the engine registers it, so a step never has to evict (the engine's
`ResidentAdapters` asks the policy only when it runs alone, as in `lorafn generate`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from protocol.messages import ErrorCode, Tier
from scheduler.policy import EvictionPolicy, ResidentView
from storage.adapter_format import load_canonical, narrowed_blob
from storage.errors import AdapterInvalid, ObjectCorrupted, ObjectMissing, StorageUnavailable
from storage.objectstore import ObjectStore
from workers.adapter_pool import AdapterPoolError, PendingLoad, PoolFull
from workers.adapters import AdaptersDoNotFit, BadEvictionChoice, choose_victims, lora_weights_from_parsed
from workers.engine import AdapterLoad, Engine
from workers.engine_thread import EngineThread
from workers.host_cache import HostCache

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ResidentEntry:
    """An adapter version on this worker, on the device or only in the host cache (what a heartbeat says)."""

    version: str  # sha256 of its canonical blob
    tier: Tier  # device or host
    rank: int  # largest rank of its modules; 0 when unknown (a host blob no load has parsed)
    bytes: int  # size of its canonical blob
    pages: int  # device pool pages it holds (0 on the host)
    in_use: int  # invocations using it now
    last_used: float | None  # unix seconds; None when never used


@dataclass
class _Facts:
    """What the ledger knows of a version beyond the pool's page table. Rank and bytes stay true after the
    version leaves the device, so they are kept while its blob is in the host cache."""

    bytes: int = 0
    rank: int = 0
    last_used: float | None = None  # unix seconds an invocation last used it (or its load finished)
    source: Tier = Tier.object  # where it was when its latest load began (host or object)
    load_ms: float = 0.0
    loaded_at: float | None = None  # unix seconds its latest load finished


class AdapterTiers:
    """Adapter versions of one worker across the three tiers (asyncio side; the engine via its thread).

    `eviction` chooses the versions that leave the device to make room; None takes the engine's, so that
    a worker has one policy (whoever builds both may pass the same instance to each). `on_load` hears of
    each load once, however many callers shared it. `load_mode` says how loads reach the pool (see the
    module docstring); None takes the engine's `adapter_load` setting."""

    def __init__(
        self,
        *,
        engine: EngineThread,
        store: ObjectStore,
        cache: HostCache,
        eviction: EvictionPolicy | None = None,
        on_load: Callable[[Tier, float], None] | None = None,
        load_mode: AdapterLoad | None = None,
    ) -> None:
        self.engine = engine
        self.load_mode: AdapterLoad = load_mode or engine.engine.settings.adapter_load
        self.on_load = on_load  # told (source tier, ms) of every load onto the device, once per load (metrics)
        self.store = store
        self.cache = cache
        self.eviction: EvictionPolicy = eviction or engine.engine.eviction
        self._pool = engine.engine.pool  # read here (atomically); changed only in the engine thread
        self.stats = {name: TransitionStats() for name in ("fetch", "load", "evict")}
        self._facts: dict[str, _Facts] = {}
        self._in_use: dict[str, int] = {}  # sha -> invocations that use it now
        self._loading: dict[str, int] = {}  # sha -> pages claimed by its load in flight
        self._leaving: set[str] = set()  # versions the engine thread is removing from the pool
        self._deferred_evictions: set[str] = set()  # in use: they leave when their invocations end
        self._flights: dict[tuple[str, str], asyncio.Future[float]] = {}
        self._tasks: set[asyncio.Task[Tier]] = set()  # background evictions (kept so they are not lost)

    # -- queries -----------------------------------------------------------------------------------------

    @property
    def total_pages(self) -> int:
        return self._pool.total_pages

    @property
    def page_bytes(self) -> int:
        return self._pool.page_bytes

    @property
    def max_rank(self) -> int:
        return self._pool.max_rank

    @property
    def free_pages(self) -> int:
        """Pages no version holds or has claimed. Counted from one snapshot of the pool: a version leaving
        counts as gone and a load in flight as done, whichever of the two states the snapshot caught."""
        pool = self._pool.resident_pages()
        held = sum(n for sha, n in pool.items() if sha not in self._leaving and sha not in self._loading)
        return self.total_pages - held - sum(self._loading.values())

    def tier(self, sha: str) -> Tier:
        """Where a version is now."""
        if self._on_device(sha):
            return Tier.device
        return Tier.host if sha in self.cache else Tier.object

    def arrival(self, sha: str, arrived_at: float) -> tuple[Tier, float]:
        """Where a device-resident version was at unix time `arrived_at` (when an invocation arrived), and
        the ms of its load that happened after then. An invocation that was queued while the scheduler
        placed its adapter (the usual cold start: the worker pulls it only once the adapter is loaded)
        waited for that load: it reports the tier the load started from, not "device"."""
        facts = self._facts.get(sha)
        if not self._on_device(sha) or facts is None or facts.loaded_at is None:
            return self.tier(sha), 0.0
        if arrived_at >= facts.loaded_at:
            return Tier.device, 0.0
        return facts.source, min(facts.load_ms, (facts.loaded_at - arrived_at) * 1e3)

    def resident(self) -> list[ResidentEntry]:
        """Every version on this worker: the device tier (the pool's residents), then the host tier (the
        cache's blobs not on the device, those found on disk at start included)."""
        device = self._device()
        entries = [
            ResidentEntry(
                version=sha, tier=Tier.device, rank=facts.rank, bytes=facts.bytes, pages=pages,
                in_use=self._in_use.get(sha, 0), last_used=facts.last_used,
            )
            for sha, pages in device.items()
            for facts in (self._facts.get(sha) or _Facts(),)
        ]
        for blob in self.cache.entries():
            if blob.sha256 in device:
                continue
            facts = self._facts.get(blob.sha256) or _Facts()
            used = [t for t in (blob.last_used, facts.last_used) if t]
            entries.append(ResidentEntry(
                version=blob.sha256, tier=Tier.host, rank=facts.rank, bytes=blob.bytes, pages=0,
                in_use=self._in_use.get(blob.sha256, 0), last_used=max(used) if used else None,
            ))
        return entries

    def _on_device(self, sha: str) -> bool:
        return sha in self._pool and sha not in self._leaving and sha not in self._loading

    def _device(self) -> dict[str, int]:
        """The device tier: the pool's residents and their pages, less versions leaving or still loading."""
        return {
            sha: n for sha, n in self._pool.resident_pages().items()
            if sha not in self._leaving and sha not in self._loading
        }

    # -- use (pins a device adapter against eviction) ----------------------------------------------------

    def acquire(self, sha: str) -> bool:
        """Pin a device-resident version for one invocation; False if it is not on the device. Call this
        synchronously after `load` returns (no await in between) and `release` when the call ends."""
        if not self._on_device(sha) or sha in self._deferred_evictions:
            return False
        self._in_use[sha] = self._in_use.get(sha, 0) + 1
        self._facts.setdefault(sha, _Facts()).last_used = time.time()
        return True

    def release(self, sha: str) -> None:
        n = self._in_use.get(sha, 0) - 1
        if n > 0:
            self._in_use[sha] = n
            return
        self._in_use.pop(sha, None)
        if sha in self._facts:
            self._facts[sha].last_used = time.time()
        if sha in self._deferred_evictions:
            self._deferred_evictions.discard(sha)
            self._spawn(self.evict(sha))

    def in_use(self, sha: str) -> int:
        return self._in_use.get(sha, 0)

    async def settle(self) -> None:
        """Wait for the evictions that `release` started in the background."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, transition: Coroutine[Any, Any, Tier]) -> None:
        task = asyncio.get_running_loop().create_task(transition)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Tier]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("a deferred eviction failed", exc_info=error)

    # -- transitions -------------------------------------------------------------------------------------

    async def fetch(self, sha: str) -> float:
        """object store -> host cache. Returns the ms it took (0 when it was cached already)."""
        if sha in self.cache:
            return 0.0
        return await self._once("fetch", sha, self._fetch)

    async def load(self, sha: str) -> float:
        """host cache -> device pool, fetching first if needed. Returns the ms it took (0 when resident)."""
        if self._on_device(sha) and sha not in self._deferred_evictions:
            return 0.0
        return await self._once("load", sha, self._load)

    async def evict(self, sha: str, *, tier: Tier = Tier.device) -> Tier:
        """Remove a version from the device (and from the host cache with tier=host). An adapter that a
        running invocation uses leaves the device when that invocation ends. Returns where it is now.
        tier=object is refused (`AdapterUnavailable(bad_request)`): the object store keeps every version."""
        if tier not in (Tier.device, Tier.host):
            raise AdapterUnavailable(
                ErrorCode.bad_request,
                f"evict takes tier device (leave the device) or host (leave the host cache too), not {tier}",
                terminal=True,
            )
        started = time.perf_counter()
        if self._on_device(sha):
            if self._in_use.get(sha):
                self._deferred_evictions.add(sha)
                logger.info("adapter %s is in use; it leaves the device when its invocations end", sha)
            else:
                self._deferred_evictions.discard(sha)
                self._leaving.add(sha)
                try:
                    await self.engine.call(lambda e: e.remove_adapter(sha))
                finally:
                    self._leaving.discard(sha)
                self.stats["evict"].add((time.perf_counter() - started) * 1e3)
        if tier == Tier.host:
            await asyncio.to_thread(self.cache.drop, sha)
        self._forget_gone()
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

    def _download(self, sha: str) -> bytes:
        """The verified blob from the object store, narrowed to the pool's dtype (what the host tier keeps)."""
        return narrowed_blob(self.store.get_blob(sha), self._pool.dtype)

    async def _fetch(self, sha: str) -> float:
        started = time.perf_counter()
        try:
            blob = await asyncio.to_thread(self._download, sha)
        except ObjectCorrupted as e:
            raise AdapterUnavailable(ErrorCode.adapter_corrupted, str(e), terminal=True) from e
        except ObjectMissing as e:
            raise AdapterUnavailable(
                ErrorCode.not_found, f"adapter version {sha} is not in the object store ({e})", terminal=True
            ) from e
        except StorageUnavailable as e:
            raise AdapterUnavailable(ErrorCode.unavailable, str(e), terminal=False) from e
        except AdapterInvalid as e:  # the stored blob is not a canonical adapter (never cached)
            raise AdapterUnavailable(ErrorCode.adapter_invalid, f"adapter version {sha}: {e}", terminal=True) from e
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
                blob = await asyncio.to_thread(self._download, sha)
        pool = self._pool

        def parse() -> PendingLoad:
            return pool.stage(sha, lora_weights_from_parsed(load_canonical(blob)))  # validated; holds nothing

        try:
            pending = await asyncio.to_thread(parse)
        except (AdapterInvalid, AdapterPoolError) as e:
            raise AdapterUnavailable(ErrorCode.adapter_invalid, f"adapter version {sha}: {e}", terminal=True) from e
        pages = pending.num_pages
        facts = self._facts.setdefault(sha, _Facts())
        facts.bytes = len(blob)
        facts.rank = pending.rank
        if pages > self.total_pages:
            raise AdapterUnavailable(
                ErrorCode.adapter_invalid,
                f"adapter version {sha} needs {pages} pages; the device pool has {self.total_pages}",
                terminal=True,
            )
        if self._on_device(sha):  # a deferred eviction that is now cancelled
            self._deferred_evictions.discard(sha)
            return 0.0
        victims = self._victims(pages)
        # Claim the pages and mark the victims leaving synchronously, so that no invocation pins a victim
        # and no other load counts these pages again while the engine works.
        self._leaving.update(victims)
        self._loading[sha] = pages
        try:
            if self.load_mode == "engine":
                await self.engine.call(lambda engine: self._install(engine, pending, victims))
            else:
                await self._load_in_background(pending, victims)
        except (PoolFull, AdaptersDoNotFit) as e:
            raise AdapterUnavailable(ErrorCode.overloaded, str(e), terminal=False) from e
        finally:
            pool.cancel(pending)  # nothing to do once published; otherwise its claimed pages go back
            self._loading.pop(sha, None)
            gone = [v for v in victims if v not in self._pool]
            self._leaving.difference_update(victims)
            for _ in gone:
                self.stats["evict"].add(0.0)
        ms = (time.perf_counter() - started) * 1e3
        facts.source, facts.load_ms = source, ms
        facts.loaded_at = facts.last_used = time.time()
        self.stats["load"].add(ms)
        if self.on_load is not None:
            self.on_load(source, ms)
        self._forget_gone()
        logger.info(
            "loaded adapter %s (%d pages, rank %d) in %.1f ms%s", sha, pages, facts.rank, ms,
            f", evicting {len(victims)}: {victims}" if victims else "",
        )
        return ms

    @staticmethod
    def _install(engine: Engine, pending: PendingLoad, victims: list[str]) -> None:
        """load_mode "engine", on the engine thread: remove the victims, then copy the adapter in."""
        for victim in victims:
            engine.remove_adapter(victim)
        sha = pending.key
        if engine.pool.free_pages < pending.num_pages:  # never let the engine's own policy evict
            raise PoolFull(sha, pending.num_pages, engine.pool.free_pages)
        engine.add_adapter(sha, pending.weights)
        try:
            engine.adapters.ensure_resident([sha])  # copy to the device pool now, not in a step
        except BaseException:
            engine.remove_adapter(sha)  # registered means resident
            raise
        finally:
            engine.adapters.release()

    async def _load_in_background(self, pending: PendingLoad, victims: list[str]) -> None:
        """load_mode "background": claim the pages (on the engine thread when victims must leave first),
        write them from a worker thread while the engine steps, publish on the engine thread."""
        pool = self._pool
        if victims or self._leaving:  # pages are freed on the engine thread: claim after them, in order

            def claim(engine: Engine) -> None:
                for victim in victims:
                    engine.remove_adapter(victim)
                pool.reserve(pending)

            await self.engine.call(claim)
        else:
            pool.reserve(pending)  # under the pool's lock: the engine thread need not stop for it
        await asyncio.to_thread(pool.write, pending)
        await self.engine.call(lambda engine: engine.adopt_adapter(pending))

    def _victims(self, pages: int) -> list[str]:
        """The device versions the policy evicts so that `pages` fit (none when they fit already)."""
        views = [
            ResidentView(
                version=sha, pages=n, last_used=facts.last_used or 0.0, in_use=self._in_use.get(sha, 0),
                bytes=facts.bytes, rank=facts.rank,
            )
            for sha, n in self._device().items()
            for facts in (self._facts.get(sha) or _Facts(),)
        ]
        free = self.free_pages
        try:
            victims = choose_victims(self.eviction, pages, free, views)
        except BadEvictionChoice as e:
            raise AdapterUnavailable(ErrorCode.internal, str(e), terminal=True) from e
        if victims is None:
            idle = sum(v.pages for v in views if not v.in_use)
            raise AdapterUnavailable(
                ErrorCode.overloaded,
                f"the device pool has {free} free pages for an adapter of {pages}; the eviction policy found "
                f"no room among the {idle} pages of adapters no invocation uses",
                terminal=False,
            )
        return victims

    def _forget_gone(self) -> None:
        """Drop the facts of versions that are neither on the device nor in the host cache."""
        for sha in [s for s in self._facts if s not in self._pool and s not in self._loading]:
            if sha not in self._in_use and sha not in self.cache:
                del self._facts[sha]
