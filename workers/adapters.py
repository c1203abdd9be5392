"""Adapters on a worker: the one converter from the stored format to pool weights, and residency.

`lora_weights_from_parsed` turns a `storage.adapter_format.ParsedAdapter` (from `load_canonical` for a
blob of the object store, or `validate(read_upload(dir))` for a PEFT directory) into the `LoraWeights`
that `AdapterPool.load` takes. Ranks, alphas and the rsLoRA scale were resolved by the storage layer
(rank_pattern / alpha_pattern included), so nothing is re-derived here. (`workers.adapter_pool.
lora_weights_from_peft` resolves PEFT patterns a second time from a raw state dict; workers receive
adapters through `storage.adapter_format`, so this converter is the one the engine uses.)

`ResidentAdapters` keeps the host copy of every registered adapter and makes the adapters of a step
resident in the device pool before the step runs: it loads the missing ones and, when the pool is full,
evicts the least recently used adapters that the step does not use. The new adapter is validated
before anything is evicted (and `AdapterPool.load` validates before it reports `PoolFull`), so a bad
adapter never costs a good one its place.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

from storage.adapter_format import ParsedAdapter
from workers.adapter_pool import AdapterPool, LoraWeights, ModuleLora, PoolFull

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
    place; `register` / `ensure_resident` / `unregister` move it between states. The adapters passed to
    the latest `ensure_resident` are in use by the running step and are never evicted until the next
    call or `release`.
    """

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool
        self._host: dict[str, LoraWeights] = {}
        self._pages: dict[str, int] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident keys, least recently used first
        self._in_use: frozenset[str] = frozenset()
        self.loads = 0
        self.evictions = 0

    @property
    def total_pages(self) -> int:
        return self.pool.stats().total_pages

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

    def unregister(self, key: str) -> None:
        """Forget an adapter (evicting it if resident); refuses one the running step uses."""
        if key in self._in_use:
            raise ValueError(f"adapter {key!r} is used by the running step")
        if self.pool.evict(key):
            self.evictions += 1
        self._lru.pop(key, None)
        self._host.pop(key, None)
        self._pages.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._host

    def pages(self, key: str) -> int:
        if key not in self._pages:
            raise UnknownAdapter(key)
        return self._pages[key]

    def fits(self, keys: frozenset[str]) -> bool:
        """Whether these adapters can be resident together (pages are never fragmented away)."""
        return sum(self.pages(k) for k in keys) <= self.total_pages

    def ensure_resident(self, keys: Iterable[str]) -> None:
        """Make `keys` resident (the adapters of the step about to run), marking them in use.

        Missing adapters are loaded; when the pool is full, least recently used adapters outside `keys`
        are evicted one at a time until the new one fits. Raises `UnknownAdapter` for an unregistered
        key and `AdaptersDoNotFit` when `keys` together exceed the pool.
        """
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            if key not in self._host:
                raise UnknownAdapter(key)
        self._in_use = frozenset(wanted)
        for key in wanted:
            if key not in self.pool:
                self._load(key)
            self._lru[key] = None
            self._lru.move_to_end(key)

    def release(self) -> None:
        """The running step is over: its adapters may be evicted again."""
        self._in_use = frozenset()

    def _load(self, key: str) -> None:
        started = time.perf_counter()
        evicted: list[str] = []
        while True:
            try:
                self.pool.load(key, self._host[key])
                break
            except PoolFull as full:
                victim = next((k for k in self._lru if k not in self._in_use), None)
                if victim is None:
                    needed = sum(self._pages[k] for k in self._in_use)
                    raise AdaptersDoNotFit(self._in_use, needed, self.total_pages) from full
                self.pool.evict(victim)
                del self._lru[victim]
                evicted.append(victim)
        self.loads += 1
        self.evictions += len(evicted)
        logger.debug(
            "loaded adapter %s (%d pages) in %.1f ms, evicting %d: %s",
            key, self._pages[key], (time.perf_counter() - started) * 1e3, len(evicted), evicted,
        )
