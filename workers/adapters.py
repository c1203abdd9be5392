"""Adapters on a worker: the one converter from the stored format to pool weights, and residency.

`lora_weights_from_parsed` turns a `storage.adapter_format.ParsedAdapter` (from `load_canonical` for a
blob of the object store, or `validate(read_upload(dir))` for a PEFT directory) into the `LoraWeights`
that `AdapterPool.load` takes. Ranks, alphas and the rsLoRA scale were resolved by the storage layer
(rank_pattern / alpha_pattern included), so nothing is re-derived here. (`workers.adapter_pool.
lora_weights_from_peft` resolves PEFT patterns a second time from a raw state dict; workers receive
adapters through `storage.adapter_format`, so this converter is the one the engine uses.)

`ResidentAdapters` keeps the host copy of every registered adapter and makes the adapters of a step
resident in the device pool before the step runs: it loads the missing ones and, when the pool is full,
evicts the adapters that the injected `scheduler.policy.EvictionPolicy` chooses (`LruEviction` by
default) among those the step does not use. It keeps no record of residency of its own: the pool's page
tables say what is resident and how many pages it holds; this class adds only what the pool does not
know (host copies, pages each registered adapter needs, when each was last used). The new adapter is
validated at registration, before anything is evicted, so a bad adapter never costs a good one its place.

A worker loads adapters off the engine thread (`workers.tiers.AdapterTiers`): it stages, reserves and
writes the adapter's pages in the pool from other threads (`AdapterPool.stage` / `reserve` / `write`),
and the engine thread only `adopt`s the written load, which publishes it in the pool and registers it
here in one step: an adapter is known to the engine only once its pages hold all its weights.

`choose_victims` is the one place where a policy's answer is asked for and checked; the worker's
`AdapterTiers` uses it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from scheduler.policy import EvictionPolicy, LruEviction, ResidentView
from storage.adapter_format import ParsedAdapter
from workers.adapter_pool import AdapterPool, LoraWeights, ModuleLora, PendingLoad, PoolFull

logger = logging.getLogger(__name__)


class UnknownAdapter(KeyError):
    """A request names an adapter that was never registered with the engine."""

    def __init__(self, key: str) -> None:
        super().__init__(f"adapter {key!r} is not registered")
        self.key = key


class AdaptersDoNotFit(RuntimeError):
    """The adapters of one step need more pages than the pool has, even with everything else evicted."""

    def __init__(self, keys: Iterable[str], needed_pages: int, total_pages: int) -> None:
        self.keys = sorted(keys)
        super().__init__(
            f"{len(self.keys)} adapters of one step need {needed_pages} pages; the pool has {total_pages}"
        )
        self.needed_pages = needed_pages
        self.total_pages = total_pages


class BadEvictionChoice(RuntimeError):
    """An eviction policy answered with versions that are not resident, are in use, or free too little."""

    def __init__(self, reason: str, *, victims: Sequence[str], needed_pages: int, free_pages: int) -> None:
        super().__init__(
            f"eviction policy chose {list(victims)} for an adapter of {needed_pages} pages with {free_pages} "
            f"free: {reason}"
        )
        self.victims = list(victims)
        self.needed_pages = needed_pages
        self.free_pages = free_pages


def choose_victims(
    policy: EvictionPolicy, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]
) -> list[str] | None:
    """Ask `policy` which of `resident` to evict so that `needed_pages` fit, and check its answer: every
    victim is resident, unused and named once, and together they make room. None when the policy finds
    no room (every adapter that would have to go is in use). Raises `BadEvictionChoice` otherwise, before
    anything is evicted: a policy is injected code, and a wrong answer must not cost a running call its
    adapter."""
    if needed_pages <= free_pages:
        return []
    victims = policy.choose_victims(needed_pages, free_pages, resident)
    if victims is None:
        return None
    by_version = {r.version: r for r in resident}
    freed = 0
    for version in victims:
        view = by_version.pop(version, None)
        if view is None:
            raise BadEvictionChoice(f"{version!r} is not resident (or named twice)", victims=victims,
                                    needed_pages=needed_pages, free_pages=free_pages)
        if view.in_use:
            raise BadEvictionChoice(f"{version!r} is used by {view.in_use} calls", victims=victims,
                                    needed_pages=needed_pages, free_pages=free_pages)
        freed += view.pages
    if free_pages + freed < needed_pages:
        raise BadEvictionChoice(f"they free {freed} pages, {needed_pages - free_pages} are missing",
                                victims=victims, needed_pages=needed_pages, free_pages=free_pages)
    return list(victims)


def lora_weights_from_parsed(parsed: ParsedAdapter) -> LoraWeights:
    """Pool weights of a parsed adapter: for each adapted (layer, module), A [r, in], B [out, r] and
    the scale PEFT applies (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    weights: LoraWeights = {}
    for (layer, module), spec in sorted(parsed.modules.items()):
        prefix = f"layers.{layer}.{module}."
        weights[(layer, module)] = ModuleLora(
            a=parsed.tensors[prefix + "lora_A"],
            b=parsed.tensors[prefix + "lora_B"],
            scale=spec.scale(parsed.use_rslora),
        )
    return weights


class ResidentAdapters:
    """Registered adapters (host copies) and their residency in one `AdapterPool`.

    Identity is the key (an adapter version's content hash in production); the pool's page table is its
    place and the only record that it is resident; `register` / `ensure_resident` / `unregister` move it
    between states. The adapters passed to the latest `ensure_resident` are in use by the running step
    and are never evicted until the next call or `release`. When a step needs room, `eviction` chooses
    the victims.
    """

    def __init__(self, pool: AdapterPool, eviction: EvictionPolicy | None = None) -> None:
        self.pool = pool
        self.eviction: EvictionPolicy = eviction or LruEviction()
        self._host: dict[str, LoraWeights] = {}
        self._pages: dict[str, int] = {}  # pages each registered adapter takes when resident
        self._ranks: dict[str, int] = {}  # largest rank of each registered adapter's modules
        self._last_used: dict[str, float] = {}  # unix seconds a step last used it (strictly increasing)
        self._clock = 0.0
        self._in_use: frozenset[str] = frozenset()
        self.loads = 0
        self.evictions = 0

    @property
    def total_pages(self) -> int:
        return self.pool.total_pages

    def register(self, key: str, adapter: LoraWeights | ParsedAdapter) -> None:
        """Keep the host copy of an adapter; idempotent by key. Validates it against the pool now, so a
        bad adapter is refused here (pool errors: rank, shape, module) rather than in a step; raises
        `PoolFull` when it could never fit, even in an empty pool."""
        if key in self._host:
            return
        weights = lora_weights_from_parsed(adapter) if isinstance(adapter, ParsedAdapter) else adapter
        pages = self.pool.pages_needed(weights)
        if pages > self.total_pages:
            raise PoolFull(key, pages, self.total_pages)
        self._host[key] = weights
        self._pages[key] = pages
        self._ranks[key] = max((w.rank for w in weights.values()), default=0)

    def adopt(self, pending: PendingLoad) -> None:
        """Publish a load written off this thread (`AdapterPool.write`) and register its adapter: resident
        and known to the steps from now on. Constant work: the weights were copied already. Raises
        `ValueError` for a key registered already and `LoadCancelled` for a cancelled load."""
        key = pending.key
        if key in self._host:
            raise ValueError(f"adapter {key!r} is registered already")
        self.pool.publish(pending)
        self._host[key] = pending.weights
        self._pages[key] = pending.num_pages
        self._ranks[key] = pending.rank
        self.loads += 1

    def unregister(self, key: str) -> None:
        """Forget an adapter (evicting it if resident); refuses one the running step uses."""
        if key in self._in_use:
            raise ValueError(f"adapter {key!r} is used by the running step")
        if self.pool.evict(key):
            self.evictions += 1
        for facts in (self._host, self._pages, self._ranks, self._last_used):
            facts.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._host

    def pages(self, key: str) -> int:
        if key not in self._pages:
            raise UnknownAdapter(key)
        return self._pages[key]

    def rank(self, key: str) -> int:
        """The largest rank of a registered adapter's modules."""
        if key not in self._ranks:
            raise UnknownAdapter(key)
        return self._ranks[key]

    def fits(self, keys: frozenset[str]) -> bool:
        """Whether these adapters can be resident together (pages are never fragmented away)."""
        return sum(self.pages(k) for k in keys) <= self.total_pages

    def resident(self) -> list[ResidentView]:
        """The resident adapters as an eviction policy sees them (the pool's page tables, with the use
        facts kept here)."""
        return [
            ResidentView(version=key, pages=pages, last_used=self._last_used.get(key, 0.0),
                         in_use=int(key in self._in_use), rank=self._ranks.get(key, 0))
            for key, pages in self.pool.resident_pages().items()
        ]

    def ensure_resident(self, keys: Iterable[str]) -> None:
        """Make `keys` resident (the adapters of the step about to run), marking them in use.

        Missing adapters are loaded; when the pool is full, the eviction policy chooses adapters outside
        `keys` to evict until the new one fits. Raises `UnknownAdapter` for an unregistered key and
        `AdaptersDoNotFit` when the policy finds no room (with `LruEviction`: `keys` together exceed the
        pool).
        """
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            if key not in self._host:
                raise UnknownAdapter(key)
        self._in_use = frozenset(wanted)
        for key in wanted:
            if key not in self.pool:
                self._load(key)
            self._last_used[key] = self._tick()

    def release(self) -> None:
        """The running step is over: its adapters may be evicted again."""
        self._in_use = frozenset()

    def _tick(self) -> float:
        """Now in unix seconds, strictly after the previous tick: adapters used one after the other in
        the same step (or within the clock's resolution) keep their order for the policy."""
        self._clock = max(time.time(), self._clock + 1e-6)
        return self._clock

    def _load(self, key: str) -> None:
        started = time.perf_counter()
        needed = self._pages[key]
        victims = choose_victims(self.eviction, needed, self.pool.free_pages, self.resident())
        if victims is None:
            in_use = sum(self._pages[k] for k in self._in_use)
            raise AdaptersDoNotFit(self._in_use, in_use, self.total_pages)
        for victim in victims:
            self.pool.evict(victim)
        self.pool.load(key, self._host[key])  # free pages suffice: the allocator splits runs as needed
        self.loads += 1
        self.evictions += len(victims)
        logger.debug(
            "loaded adapter %s (%d pages) in %.1f ms, evicting %d: %s",
            key, needed, (time.perf_counter() - started) * 1e3, len(victims), victims,
        )
