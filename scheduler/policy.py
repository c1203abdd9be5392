"""Routing and eviction policies: pure decisions over plain values, shared by the live scheduler and the
bench simulator (one implementation of each policy, injected into `scheduler.core.SchedulerCore`).

A policy sees the cluster as `WorkerView`s (the latest heartbeat plus what the core dispatched since) and a
residency map (which worker holds which adapter version in which tier, placements in flight counted on the
device); it changes nothing and reads no clock. The core turns its answers into commands; the live
dispatcher and the simulator carry them out.

- `Router.route`: which worker serves one invocation. `AffinityRouter` (the default): a worker that holds
  the adapter on its device, the least loaded of them; a second holder when the best one is busy
  (`replicate_at` calls and another worker is `replicate_margin` calls lighter), one with the blob in its
  host cache when there is such a lighter one; else a worker with the blob in its host cache unless it has
  `host_margin` calls more than the lightest (a fetch from the object store costs more than a few calls'
  wait in a continuous batch); else the least loaded worker (a cold start), among equals the one with the
  most room left in its host cache (the blob it fetches then pushes out no other adapter's, and the
  cluster's host caches fill evenly). Workers at capacity, draining, or whose pool cannot take the
  adapter's rank are never chosen.
- `EvictionPolicy.choose_victims`: which device-resident adapters of a worker to evict so that an
  adapter of `needed_pages` fits. `LruEviction`: least recently used first, never one in use.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from protocol.messages import Tier

# adapter version (sha256) -> worker id -> tier (device or host)
Residency = Mapping[str, Mapping[str, Tier]]


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter version as the scheduler sees it: identity, and the size facts that placement needs."""

    tenant: str
    adapter: str
    version: str
    rank: int = 0  # largest rank of its modules (0: unknown)
    bytes: int = 0  # size of its canonical blob


@dataclass(frozen=True)
class CallView:
    """One invocation to route. `adapter` is None for the bare backbone."""

    invocation_id: str
    adapter: AdapterSpec | None
    prompt_tokens: int = 0
    max_tokens: int = 0


@dataclass(frozen=True)
class WorkerView:
    """A worker as the core sees it: its latest heartbeat, and `outstanding` = calls dispatched to it that
    have not finished (queued in its work subject or running)."""

    worker_id: str
    total_pages: int = 0
    free_pages: int = 0
    max_rank: int = 0  # 0: unknown (any rank)
    capacity: int = 32  # calls it may have outstanding before the core stops dispatching to it
    outstanding: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    draining: bool = False
    host_free_bytes: int = 0  # room left in its host cache (0: none, or unknown)

    @property
    def load(self) -> int:
        """Calls this worker has now (dispatched and not finished)."""
        return self.outstanding

    @property
    def full(self) -> bool:
        return self.outstanding >= self.capacity

    def takes(self, adapter: AdapterSpec | None) -> bool:
        """Whether this worker may be sent a call of `adapter` now."""
        if self.draining or self.full:
            return False
        return adapter is None or not self.max_rank or adapter.rank <= self.max_rank


@dataclass(frozen=True)
class Route:
    """Where a call goes and why (the reason is counted in metrics and kept in decision records)."""

    worker_id: str
    reason: str  # "device", "replicate", "host", "cold", "base", or a policy's own word


class Router(Protocol):
    """Chooses the worker that serves one invocation."""

    def route(self, call: CallView, workers: Sequence[WorkerView], residency: Residency) -> Route | None:
        """The worker for `call`, or None when no worker can take it now (the core defers the call)."""
        ...


class EvictionPolicy(Protocol):
    """Chooses the adapters a worker evicts to make room on its device. One instance per worker, injected
    into its engine and its tiers (`workers.engine.Engine`, `workers.tiers.AdapterTiers`), which check
    every answer (`workers.adapters.choose_victims`)."""

    def choose_victims(self, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]) -> list[str] | None:
        """Versions to evict (in order) so that `needed_pages` fit; [] if they fit already, None if they
        cannot fit without evicting an adapter in use."""
        ...


@dataclass(frozen=True)
class AffinityRouter:
    """Route to the adapter's holders, replicate a busy one, else the least loaded worker (module docstring)."""

    replicate_at: int = 8  # a holder with this many calls outstanding counts as busy ...
    replicate_margin: int = 4  # ... when another worker has at least this many fewer
    prefer_host_cached: bool = True
    # a worker with the blob in its host cache takes the call (a host load) unless it has this many more calls
    # than the lightest worker (which would fetch the blob from the object store: a cold start)
    host_margin: int = 8

    def route(self, call: CallView, workers: Sequence[WorkerView], residency: Residency) -> Route | None:
        candidates = [w for w in workers if w.takes(call.adapter)]
        if not candidates:
            return None
        if call.adapter is None:
            return Route(min(candidates, key=lambda w: (w.load, w.worker_id)).worker_id, "base")
        holders = residency.get(call.adapter.version, {})
        on_device = [w for w in candidates if holders.get(w.worker_id) == Tier.device]
        lightest = min(candidates, key=lambda w: (w.load, -w.host_free_bytes, -w.free_pages, w.worker_id))
        if on_device:
            best = min(on_device, key=lambda w: (w.load, w.worker_id))
            if best.load >= self.replicate_at and lightest.load + self.replicate_margin <= best.load:
                # a second copy: from a host cache that has it when that worker is lighter too, else cold
                host = self._host_holder(candidates, holders, lightest)
                if host is not None and host.load + self.replicate_margin <= best.load:
                    return Route(host.worker_id, "replicate")
                return Route(lightest.worker_id, "replicate")
            return Route(best.worker_id, "device")
        host = self._host_holder(candidates, holders, lightest)
        if host is not None:
            return Route(host.worker_id, "host")
        return Route(lightest.worker_id, "cold")

    def _host_holder(self, candidates: Sequence[WorkerView], holders: Mapping[str, Tier],
                     lightest: WorkerView) -> WorkerView | None:
        """The least loaded candidate with the blob in its host cache, unless it has `host_margin` calls more than
        the lightest (a cold start there costs less than the wait)."""
        cached = [w for w in candidates if holders.get(w.worker_id) == Tier.host] if self.prefer_host_cached else []
        host = min(cached, key=lambda w: (w.load, w.worker_id)) if cached else None
        return host if host is not None and host.load < lightest.load + self.host_margin else None


@dataclass
class RandomRouter:
    """A uniformly random worker among those that can take the call (a rank- and residency-blind baseline for
    the simulator; seeded, so a run is reproducible)."""

    seed: int = 0
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def route(self, call: CallView, workers: Sequence[WorkerView], residency: Residency) -> Route | None:
        candidates = [w for w in workers if w.takes(call.adapter)]
        return Route(self.rng.choice(candidates).worker_id, "random") if candidates else None


@dataclass(frozen=True)
class PinnedRouter:
    """Send every call of the listed adapter versions (or adapter names, `tenant/adapter`) to one worker when
    it can take them; everything else goes to `fallback`. For operators (pin a tenant's adapters) and tests."""

    pins: Mapping[str, str] = field(default_factory=dict)  # version or "tenant/adapter" -> worker id
    fallback: Router = field(default_factory=AffinityRouter)

    def route(self, call: CallView, workers: Sequence[WorkerView], residency: Residency) -> Route | None:
        if call.adapter is not None:
            a = call.adapter
            pinned = self.pins.get(a.version) or self.pins.get(f"{a.tenant}/{a.adapter}")
            if pinned is not None:
                target = next((w for w in workers if w.worker_id == pinned), None)
                return Route(pinned, "pinned") if target is not None and target.takes(a) else None
        return self.fallback.route(call, workers, residency)


@dataclass(frozen=True)
class ResidentView:
    """A device-resident adapter of one worker, as an eviction policy sees it. A worker builds these from
    its one residency ledger (its tiers, or its engine's resident adapters when it runs alone)."""

    version: str
    pages: int
    last_used: float  # unix seconds
    in_use: int = 0  # invocations (or, in a standalone engine, the running step) using it now
    bytes: int = 0  # size of its canonical blob (0: unknown)
    rank: int = 0  # largest rank of its modules (0: unknown)


@dataclass(frozen=True)
class LruEviction:
    """Evict the least recently used adapters that no invocation uses, until the new one fits."""

    def choose_victims(self, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]) -> list[str] | None:
        victims: list[str] = []
        free = free_pages
        for r in sorted(resident, key=lambda r: (r.last_used, r.version)):
            if free >= needed_pages:
                break
            if r.in_use:
                continue
            victims.append(r.version)
            free += r.pages
        return victims if free >= needed_pages else None
