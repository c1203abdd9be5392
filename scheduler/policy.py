"""Placement and eviction policies: pure decisions over plain values, shared by the live scheduler and
the bench simulator (one implementation of each policy).

A policy sees the cluster as `WorkerView`s (what the latest heartbeats said) and a residency map (which
worker holds which adapter version in which tier); it changes nothing. The live scheduler turns its
answers into control verbs; the simulator applies them to its model of the cluster.

- `PlacementPolicy.choose_worker`: which worker should load an adapter version nobody holds.
  `LeastLoadedPlacement` (reactive, first version): the live, non-draining worker with the fewest
  running and queued invocations whose pool can take the adapter; ties go to a worker that has the
  blob in its host cache (no object-store download), then to the most free pages, then to the name.
- `EvictionPolicy.choose_victims`: which device-resident adapters of a worker to evict so that an
  adapter of `needed_pages` fits. `LruEviction`: least recently used first, never one in use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Tier = Literal["device", "host"]
# adapter version (sha256) -> worker id -> tier
Residency = Mapping[str, Mapping[str, Tier]]


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version to place. `pages` is its size in pool pages when known (0: unknown)."""

    tenant: str
    adapter: str
    version: str
    pages: int = 0


@dataclass(frozen=True)
class WorkerView:
    """A worker as its latest heartbeat described it."""

    worker_id: str
    total_pages: int
    free_pages: int
    running: int = 0
    queue_depth: int = 0
    tokens_per_s: float = 0.0
    draining: bool = False

    @property
    def load(self) -> int:
        """Invocations this worker has now (running and waiting)."""
        return self.running + self.queue_depth


@dataclass(frozen=True)
class ResidentView:
    """A device-resident adapter of one worker, as an eviction policy sees it."""

    version: str
    pages: int
    last_used: float  # unix seconds
    in_use: int = 0  # invocations using it now


class PlacementPolicy(Protocol):
    """Chooses where an adapter version that no live worker holds on its device is loaded."""

    def choose_worker(
        self, adapter: AdapterRef, workers: Sequence[WorkerView], residency: Residency
    ) -> str | None:
        """The id of the worker that should load `adapter`, or None when no worker can."""
        ...


class EvictionPolicy(Protocol):
    """Chooses the adapters a worker evicts to make room on its device."""

    def choose_victims(self, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]) -> list[str] | None:
        """Versions to evict (in order) so that `needed_pages` fit; [] if they fit already, None if they
        cannot fit without evicting an adapter in use."""
        ...


@dataclass(frozen=True)
class LeastLoadedPlacement:
    """Reactive placement on the least-loaded worker (see module docstring)."""

    prefer_host_cached: bool = True
    exclude: frozenset[str] = field(default_factory=frozenset)

    def choose_worker(
        self, adapter: AdapterRef, workers: Sequence[WorkerView], residency: Residency
    ) -> str | None:
        holders = residency.get(adapter.version, {})
        candidates = [
            w for w in workers
            if not w.draining and w.worker_id not in self.exclude and adapter.pages <= w.total_pages
        ]
        if not candidates:
            return None
        on_device = sorted(w.worker_id for w in candidates if holders.get(w.worker_id) == "device")
        if on_device:
            return on_device[0]

        def rank(w: WorkerView) -> tuple[int, int, int, str]:
            cached = 0 if self.prefer_host_cached and holders.get(w.worker_id) == "host" else 1
            return (w.load, cached, -w.free_pages, w.worker_id)

        return min(candidates, key=rank).worker_id


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
