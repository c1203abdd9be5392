"""Predictive staging and cost-aware eviction: pure decisions over plain values, shared by the live scheduler
and the bench simulator, like the policies of `scheduler.policy`.

Adapter versions live in three tiers: the object store (always), a worker's host cache, its device pool. A
version on the device keeps its blob in the host cache (`workers.tiers`), so it counts against both of the
worker's budgets. What a copy is worth is what it would cost to bring it back from the tier it would fall
to, weighed by how likely it is to be needed and divided by the room it takes (GreedyDual-Size, Cao & Irani,
"Cost-Aware WWW Proxy Caching Algorithms", USITS 1997):

    value(version, tier) = score x reload_s(bytes, from the tier below) / bytes

with `TierCosts` giving the seconds (device: reloaded from the host cache; host: fetched from the object
store).

- `PredictiveStager.plan` (the `Stager` the core calls at each interval boundary, scores from a
  `scheduler.predict` predictor: the probability that each version is called in the next interval) returns
  `Stage`s, in the order they are to be carried out:
  1. keep-alive: a version on a worker's device whose score fell below `device_release_at` goes to the host
     tier, one below `host_release_at` (device or host) leaves the worker (to the object tier); never one
     in use. This is how an idle worker gives its adapters back.
  2. device: each version scoring at least `device_at` ("very likely") gets up to `max_replicas` device
     copies. A new copy goes to a worker holding the blob in its host cache when one does (never to another:
     that would fetch a second blob while the holder's stays), else to the one where it fits without
     evicting, least loaded (outstanding / capacity), most free device bytes, then by id. Room
     is made only by evicting (to host) unused device copies worth less than the newcomer, least valuable
     first; the load's implied fetch is made room for in the host cache likewise (not checked when the
     worker's host budget is unknown, 0).
  3. host: each version scoring at least `host_at` ("likely") that no worker holds gets fetched to one
     worker's host cache (same preferences, host budget, victims dropped to the object tier).
  0. (before 2 and 3) host copies the cluster holds twice: a worker whose host cache is at least
     `dedupe_host_at` full drops (to the object tier) the host-only copies of versions another worker holds
     (host or device), least recently used first, until it is at most `dedupe_host_to` full; never the last
     copy in the cluster, never one in use. A call of such a version goes to a holder (a host load, not a
     cold start), so the copy is worth nearly nothing here, and the room keeps a version no other worker
     holds from being dropped by the cache's own LRU: the cluster's host caches hold more distinct adapters.
  Hysteresis: a held copy is kept while its score stays at or above the release threshold of its tier,
  lower than the threshold that brings it, so a score wobbling between the two moves nothing. Transfers
  (fetches and loads) are capped at `max_stages_per_interval`, most valuable first (device candidates, then
  host candidates, each by value); evictions are not counted (each frees a held copy, so they are bounded by
  what the workers hold). Draining workers are left alone; a worker's `max_rank` (0: any) bounds what it is
  given; a version of unknown size (bytes 0, or absent from `adapters`) is never staged. Ties are broken by
  version and worker id, never by dict order.
- `GreedyDualEviction`: an `EvictionPolicy` for a worker's device pool, GreedyDual-Size-Frequency
  (Cherkasova, "Improving WWW Proxies Performance with Greedy-Dual-Size-Frequency Caching Policy", HP Labs
  HPL-98-69, 1998): priority H = L + frequency x cost / size, evict the lowest, L rises to the H of the last
  victim (so adapters that were hot long ago age out).
- `workers_needed`: the scale-to-zero signal, the workers the predicted load and hot set need (0 for none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from protocol.messages import Tier
from scheduler.policy import AdapterSpec, ResidentView
from scheduler.predict import Predictor, build_predictor

if TYPE_CHECKING:
    from scheduler.settings import StagingSettings

# -- costs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierCosts:
    """Seconds to move `nbytes` of an adapter between tiers: `latency + nbytes / bandwidth` per tier crossed.
    The defaults are the simulator's (`bench.simulate.CostModel`): a GET from the object store (50 ms, 64 MB/s
    effective: the rest of the demo's ~845 ms cold load of a 39 MB rank-64 adapter), a host -> device load
    (120 ms, 0.6 GB/s: `python -m bench stall`, 180-189 ms at rank 64 and 245-257 ms at rank 128 while the
    engine decodes)."""

    object_latency_s: float = 0.050
    object_bytes_per_s: float = 64e6
    host_latency_s: float = 0.120
    host_bytes_per_s: float = 0.6e9

    def __post_init__(self) -> None:
        if min(self.object_latency_s, self.host_latency_s) < 0:
            raise ValueError(f"latencies must be >= 0 (object {self.object_latency_s}, host {self.host_latency_s})")
        if min(self.object_bytes_per_s, self.host_bytes_per_s) <= 0:
            raise ValueError(f"bandwidths must be > 0 (object {self.object_bytes_per_s}, "
                             f"host {self.host_bytes_per_s})")

    def fetch_s(self, nbytes: int) -> float:
        """Object store -> host cache."""
        return self.object_latency_s + nbytes / self.object_bytes_per_s

    def load_s(self, nbytes: int) -> float:
        """Host cache -> device pool."""
        return self.host_latency_s + nbytes / self.host_bytes_per_s

    def reload_s(self, nbytes: int, tier: Tier) -> float:
        """Seconds to get a copy kept in `tier` back there once it has fallen to the tier below (device:
        from the host cache; host: from the object store; object: nothing to reload)."""
        if tier == Tier.device:
            return self.load_s(nbytes)
        if tier == Tier.host:
            return self.fetch_s(nbytes)
        return 0.0

    def value(self, score: float, nbytes: int, tier: Tier) -> float:
        """What keeping a copy in `tier` is worth per byte: score x reload seconds / bytes (GreedyDual-Size)."""
        return score * self.reload_s(nbytes, tier) / max(nbytes, 1)


# -- the stager's seams ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldView:
    """One adapter version a worker holds."""

    tier: Tier  # Tier.device or Tier.host
    bytes: int
    rank: int = 0
    in_use: int = 0  # calls using it now (never evict one in use)
    last_used: float = 0.0  # when a call last used it here (driver's clock; 0: unknown, long ago)


@dataclass(frozen=True)
class StageView:
    """A worker as the stager sees it."""

    worker_id: str
    device_bytes: int  # capacity of its device adapter pool, bytes (0: unknown -> no device staging)
    host_bytes: int  # capacity of its host cache, bytes (0: unknown -> no host staging)
    max_rank: int = 0  # 0: any rank
    outstanding: int = 0  # calls dispatched to it and not finished
    capacity: int = 32  # calls it may have outstanding
    draining: bool = False
    held: Mapping[str, HeldView] = field(default_factory=dict)  # version -> what it holds


@dataclass(frozen=True)
class Stage:
    """One staging action; the core turns it into a Fetch / Load / Evict command."""

    kind: Literal["fetch", "load", "evict"]
    version: str
    worker_id: str
    to_tier: Tier | None = None  # evict only: Tier.host (drop from device, keep blob) or Tier.object (drop both)
    reason: str = ""  # "release" (keep-alive), "make_room", "very_likely" (load), "likely" (fetch)


class Stager(Protocol):
    """Decides, each interval, what each worker fetches, loads and evicts ahead of the calls."""

    def plan(self, now: float, scores: Mapping[str, float], adapters: Mapping[str, AdapterSpec],
             workers: Sequence[StageView]) -> list[Stage]:
        """What to fetch/load/evict this interval given each version's probability of use next interval
        (`scores`; versions absent: 0). `adapters`: version -> scheduler.policy.AdapterSpec (rank, bytes)."""
        ...


# -- the predictive stager -------------------------------------------------------------------------------------


@dataclass
class _Planned:
    """A worker's holdings as the plan changes them (version -> bytes), and what the plan already touched."""

    view: StageView
    device: dict[str, int]
    host: dict[str, int]  # host tier only (the device's blobs are in `device`)
    touched: set[str] = field(default_factory=set)  # staged or evicted this interval: not moved again

    @property
    def device_free(self) -> int:
        return self.view.device_bytes - sum(self.device.values())

    @property
    def host_free(self) -> int:
        return self.view.host_bytes - sum(self.device.values()) - sum(self.host.values())

    @property
    def busy(self) -> float:
        return self.view.outstanding / max(self.view.capacity, 1)

    def takes_rank(self, rank: int) -> bool:
        return not self.view.max_rank or rank <= self.view.max_rank

    def in_use(self, version: str) -> bool:
        held = self.view.held.get(version)
        return held is not None and held.in_use > 0


@dataclass(frozen=True)
class PredictiveStager:
    """Stage each interval's likely versions to host caches and very likely ones to device pools, within
    each worker's budgets and rank limit; release what fell out of favour (module docstring).

    Defaults: load at p >= 0.5; fetch at p >= 0.1. Keep-alive releases a device copy to the host tier only
    when its score is below 0.2 and no call has used it for `keep_alive_s` (30 min): a score is about the
    next interval only, and a copy released while memory is not needed is a cold start saved for nothing
    (measured: releasing at the first low score made every predictor's cold starts 3-30x reactive LRU's
    at equal memory). Host blobs are not released by score (`host_release_at` 0): the host cache, disk
    mostly, drops its least recently used blobs when full, and room for a staged fetch is made by value.
    One device copy per version: a
    second copy of a busy adapter is the router's to make (`AffinityRouter` replicates on load), since a
    probability of use says nothing of how many calls come. 16 transfers per interval: about 14 s of object
    store reads at rank 64 (0.8 s each), well within a minute-long interval on one worker."""

    device_at: float = 0.5
    device_release_at: float = 0.2
    host_at: float = 0.1
    host_release_at: float = 0.0
    keep_alive_s: float = 1800.0
    max_replicas: int = 1
    max_stages_per_interval: int = 16
    dedupe_host_at: float = 0.9  # a host cache this full drops copies other workers hold ... (> 1: never)
    dedupe_host_to: float = 0.75  # ... until it is this full
    costs: TierCosts = field(default_factory=TierCosts)

    def __post_init__(self) -> None:
        for name, value in (("device_at", self.device_at), ("device_release_at", self.device_release_at),
                            ("host_at", self.host_at), ("host_release_at", self.host_release_at)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} ({value}) must be within 0..1")
        if self.device_release_at > self.device_at:
            raise ValueError(f"device_release_at ({self.device_release_at}) exceeds device_at ({self.device_at})")
        if self.host_release_at > self.host_at:
            raise ValueError(f"host_release_at ({self.host_release_at}) exceeds host_at ({self.host_at})")
        if self.max_replicas < 1:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= 1")
        if self.max_stages_per_interval < 0:
            raise ValueError(f"max_stages_per_interval ({self.max_stages_per_interval}) must be >= 0")
        if not 0.0 <= self.dedupe_host_to <= self.dedupe_host_at:
            raise ValueError(f"dedupe_host_to ({self.dedupe_host_to}) must be within 0..dedupe_host_at "
                             f"({self.dedupe_host_at})")

    def plan(self, now: float, scores: Mapping[str, float], adapters: Mapping[str, AdapterSpec],
             workers: Sequence[StageView]) -> list[Stage]:
        _check_scores(scores)
        ids = [w.worker_id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids are not unique: {sorted(ids)}")
        planned = [
            _Planned(
                view=w,
                device={v: _size(h, adapters.get(v)) for v, h in w.held.items() if h.tier == Tier.device},
                host={v: _size(h, adapters.get(v)) for v, h in w.held.items() if h.tier == Tier.host},
            )
            for w in sorted(workers, key=lambda w: w.worker_id)
            if not w.draining
        ]
        stages = self._release(now, scores, planned)
        stages += self._dedupe(planned)
        budget = self.max_stages_per_interval
        for version in self._candidates(scores, adapters, self.device_at, Tier.device) if budget else ():
            if not budget:
                break
            spec = adapters[version]
            while budget and sum(version in p.device for p in planned) < self.max_replicas:
                placed = self._place_on_device(version, spec, scores, planned)
                if not placed:
                    break
                stages += placed
                budget -= 1
        for version in self._candidates(scores, adapters, self.host_at, Tier.host) if budget else ():
            if not budget:
                break
            if any(version in p.device or version in p.host for p in planned):
                continue
            placed = self._place_on_host(version, adapters[version], scores, planned)
            if placed:
                stages += placed
                budget -= 1
        return stages

    def _release(self, now: float, scores: Mapping[str, float], planned: list[_Planned]) -> list[Stage]:
        """Keep-alive: held copies whose score fell below their tier's release threshold, unless in use or
        used within `keep_alive_s`."""
        stages: list[Stage] = []
        for p in planned:
            for version in sorted(p.view.held):
                if p.in_use(version) or now - p.view.held[version].last_used < self.keep_alive_s:
                    continue
                score = scores.get(version, 0.0)
                if score < self.host_release_at:
                    p.device.pop(version, None)
                    p.host.pop(version, None)
                    to = Tier.object
                elif version in p.device and score < self.device_release_at:
                    p.host[version] = p.device.pop(version)
                    to = Tier.host
                else:
                    continue
                p.touched.add(version)
                stages.append(Stage("evict", version, p.view.worker_id, to_tier=to, reason="release"))
        return stages

    def _dedupe(self, planned: list[_Planned]) -> list[Stage]:
        """Host copies that another worker also holds, dropped from host caches that are nearly full."""
        holders: dict[str, set[str]] = {}
        for p in planned:
            for version in (*p.device, *p.host):
                holders.setdefault(version, set()).add(p.view.worker_id)
        stages: list[Stage] = []
        for p in planned:
            budget = p.view.host_bytes
            used = budget - p.host_free
            if budget <= 0 or used < self.dedupe_host_at * budget:
                continue
            twice = sorted((p.view.held[v].last_used, v) for v in p.host
                           if v not in p.touched and not p.in_use(v) and len(holders[v]) > 1)
            for _, version in twice:
                if used <= self.dedupe_host_to * budget:
                    break
                if len(holders[version]) < 2:  # another worker's copy went first: this one is the last
                    continue
                used -= p.host.pop(version)
                holders[version].discard(p.view.worker_id)
                p.touched.add(version)
                stages.append(Stage("evict", version, p.view.worker_id, to_tier=Tier.object, reason="duplicate"))
        return stages

    def _candidates(self, scores: Mapping[str, float], adapters: Mapping[str, AdapterSpec], at: float,
                    tier: Tier) -> list[str]:
        """Versions scoring at least `at` with a known size, most valuable (in `tier`) first (sorted on plain
        tuples: no key function per version)."""
        value = self.costs.value
        found: list[tuple[float, str]] = []
        for version, score in scores.items():
            spec = adapters.get(version) if score >= at and score > 0 else None
            if spec is not None and spec.bytes > 0:
                found.append((-value(score, spec.bytes, tier), version))
        found.sort()
        return [version for _, version in found]

    def _place_on_device(self, version: str, spec: AdapterSpec, scores: Mapping[str, float],
                         planned: list[_Planned]) -> list[Stage]:
        size, score = spec.bytes, scores[version]
        options = [p for p in planned if p.view.device_bytes > 0 and p.takes_rank(spec.rank)
                   and version not in p.device]
        if any(version in p.host for p in options):  # a worker without the blob would fetch a second copy
            options = [p for p in options if version in p.host]
        options.sort(key=lambda p: (version not in p.host, size > p.device_free, p.busy, -p.device_free,
                                    p.view.worker_id))
        for p in options:
            device_victims = self._room(p, Tier.device, size, self.costs.value(score, size, Tier.device), scores)
            if device_victims is None:
                continue
            host_victims: list[str] = []
            if version not in p.host and p.view.host_bytes > 0:  # the load fetches the blob first
                found = self._room(p, Tier.host, size, self.costs.value(score, size, Tier.host), scores)
                if found is None:
                    continue
                host_victims = found
            stages = []
            for victim in device_victims:
                p.host[victim] = p.device.pop(victim)
                stages.append(Stage("evict", victim, p.view.worker_id, to_tier=Tier.host, reason="make_room"))
            for victim in host_victims:
                del p.host[victim]
                stages.append(Stage("evict", victim, p.view.worker_id, to_tier=Tier.object, reason="make_room"))
            p.touched.update(device_victims, host_victims, [version])
            p.host.pop(version, None)
            p.device[version] = size
            return [*stages, Stage("load", version, p.view.worker_id, reason="very_likely")]
        return []

    def _place_on_host(self, version: str, spec: AdapterSpec, scores: Mapping[str, float],
                       planned: list[_Planned]) -> list[Stage]:
        size, score = spec.bytes, scores[version]
        options = [p for p in planned if p.view.host_bytes > 0 and p.takes_rank(spec.rank)]
        options.sort(key=lambda p: (size > p.host_free, p.busy, -p.host_free, p.view.worker_id))
        for p in options:
            victims = self._room(p, Tier.host, size, self.costs.value(score, size, Tier.host), scores)
            if victims is None:
                continue
            stages = []
            for victim in victims:
                del p.host[victim]
                stages.append(Stage("evict", victim, p.view.worker_id, to_tier=Tier.object, reason="make_room"))
            p.touched.update(victims, [version])
            p.host[version] = size
            return [*stages, Stage("fetch", version, p.view.worker_id, reason="likely")]
        return []

    def _room(self, p: _Planned, tier: Tier, size: int, incoming: float,
              scores: Mapping[str, float]) -> list[str] | None:
        """Copies of `p` in `tier` to evict, least valuable first, so that `size` bytes fit there: only
        unused copies worth less than `incoming` that the plan has not touched. None when they cannot make
        room."""
        held, free = (p.device, p.device_free) if tier == Tier.device else (p.host, p.host_free)
        if size <= free:
            return []
        victims: list[str] = []
        last_used = {v: h.last_used for v, h in p.view.held.items()}
        worth = sorted(  # least valuable first; among equals (an unpredicted score is 0) least recently used
            (self.costs.value(scores.get(v, 0.0), b, tier), last_used.get(v, 0.0), v, b) for v, b in held.items()
            if v not in p.touched and not p.in_use(v)
        )
        for value, _, version, nbytes in worth:
            if value >= incoming:
                return None
            victims.append(version)
            free += nbytes
            if size <= free:
                return victims
        return None


def _size(held: HeldView, spec: AdapterSpec | None) -> int:
    """A held copy's bytes: as the worker reported them, else as the adapter's spec says (0: unknown)."""
    return held.bytes or (spec.bytes if spec is not None else 0)


def _check_scores(scores: Mapping[str, float]) -> None:
    for version, score in scores.items():
        if not 0.0 <= score <= 1.0:  # NaN fails this too
            raise ValueError(f"score of {version!r} is {score}, not a probability (0..1)")


# -- cost-aware eviction on a worker's device --------------------------------------------------------------------


@dataclass
class _Seen:
    frequency: int
    last_used: float
    priority: float


@dataclass
class GreedyDualEviction:
    """GreedyDual-Size-Frequency over a worker's device pool, or its host cache with `tier` host (Cherkasova
    1998; pages are then whatever unit the cache sizes blobs in): each resident version has
    priority H = L + frequency x cost / size; the lowest unused ones are evicted until the newcomer fits, and
    the inflation L becomes the H of the last victim, so a newcomer or a version just used starts above what
    was evicted and what sits unused sinks relative to it.

    - size: pages (what the pool is short of; one pool's pages are proportional to bytes);
    - cost: seconds to reload it from the tier below, `costs.reload_s(bytes, tier)` (device: a load from the
      host cache; host: a fetch from the object store). Bytes unknown (0): `pages x
      page_bytes` when `page_bytes` is set, else estimated from the residents whose bytes are known (their
      bytes per page), else cost = size for all (then H = L + frequency: LFU with aging);
    - frequency: counted from what the policy sees: a version is counted once when first seen, and once more
      at each call (`choose_victims` or `observe`) where its `last_used` moved. Uses between two calls count
      as one; a version evicted (or gone from the residents) starts over.
    Never evicts a version in use; None when the unused ones cannot make room. Keeps state: one instance per
    worker, like the engine's `LruEviction` it replaces."""

    costs: TierCosts = field(default_factory=TierCosts)
    page_bytes: int = 0  # bytes per pool page, for versions of unknown bytes (0: estimate, see above)
    tier: Tier = Tier.device  # the tier it keeps: a version's cost is its reload from the tier below
    inflation: float = 0.0  # L
    _seen: dict[str, _Seen] = field(default_factory=dict, repr=False)

    def observe(self, resident: Sequence[ResidentView]) -> None:
        """Count the uses `resident` shows since the last call and forget versions no longer resident."""
        known = [r for r in resident if r.bytes > 0 and r.pages > 0]
        per_page = self.page_bytes or (sum(r.bytes for r in known) / sum(r.pages for r in known) if known else 0)
        current = {r.version for r in resident}
        for version in [v for v in self._seen if v not in current]:
            del self._seen[version]
        for r in resident:
            seen = self._seen.get(r.version)
            if seen is not None and r.last_used <= seen.last_used:
                continue
            frequency = 1 if seen is None else seen.frequency + 1
            pages = max(r.pages, 1)
            nbytes = r.bytes or pages * per_page
            cost_per_page = self.costs.reload_s(round(nbytes), self.tier) / pages if nbytes else 1.0
            self._seen[r.version] = _Seen(frequency, r.last_used, self.inflation + frequency * cost_per_page)

    def choose_victims(self, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]) -> list[str] | None:
        self.observe(resident)
        if needed_pages <= free_pages:
            return []
        victims: list[str] = []
        free, priority = free_pages, self.inflation
        for r in sorted((r for r in resident if not r.in_use),
                        key=lambda r: (self._seen[r.version].priority, r.last_used, r.version)):
            victims.append(r.version)
            free += r.pages
            priority = self._seen[r.version].priority
            if free >= needed_pages:
                break
        if free < needed_pages:
            return None
        self.inflation = max(self.inflation, priority)
        for version in victims:
            del self._seen[version]
        return victims


# -- scale to zero -----------------------------------------------------------------------------------------------


def workers_needed(expected_calls: Mapping[str, float], *, interval_s: float, service_s: float, max_inflight: int,
                   target_utilisation: float = 0.8, version_bytes: Mapping[str, int] | None = None,
                   device_bytes: int = 0, hot_at: float = 0.5) -> int:
    """Workers the predicted load of the next interval needs (0: nothing predicted, scale to zero).

    `expected_calls`: calls of each version expected in the next interval (expected counts, not probabilities:
    a probability of use stops at 1 however many calls come; a caller holding only probabilities may pass
    them, a lower bound of the expected count). `service_s`: seconds a call holds one of a worker's
    `max_inflight` slots. Then

        busy slots  = sum(expected_calls) x service_s / interval_s             (Little's law)
        by_load     = ceil(busy slots / (max_inflight x target_utilisation))
        hot bytes   = sum of version_bytes[v] over v with expected_calls[v] >= hot_at
        by_memory   = ceil(hot bytes / device_bytes)                            (0 when device_bytes is 0)
        workers     = max(by_load, by_memory), and at least 1 when any call is expected

    by_memory is a floor: the hot set may pack into more pools than its bytes divide into."""
    if interval_s <= 0 or service_s < 0 or max_inflight < 1 or not 0 < target_utilisation <= 1:
        raise ValueError(f"need interval_s > 0 ({interval_s}), service_s >= 0 ({service_s}), max_inflight >= 1 "
                         f"({max_inflight}), 0 < target_utilisation <= 1 ({target_utilisation})")
    if device_bytes < 0:
        raise ValueError(f"device_bytes ({device_bytes}) must be >= 0")
    for version, calls in expected_calls.items():
        if not 0.0 <= calls < math.inf:
            raise ValueError(f"expected calls of {version!r} is {calls}, not a count >= 0")
    total = sum(expected_calls.values())
    if total <= 0:
        return 0
    by_load = _ceil(total * service_s / interval_s / (max_inflight * target_utilisation))
    by_memory = 0
    if device_bytes and version_bytes:
        hot = sum(version_bytes.get(v, 0) for v, calls in expected_calls.items() if calls >= hot_at)
        by_memory = _ceil(hot / device_bytes)
    return max(by_load, by_memory, 1)


def _ceil(x: float) -> int:
    """ceil, forgiving the last bits of float error (2.0000000000000004 workers are 2)."""
    return math.ceil(x - 1e-9)


def staging_policies(cfg: StagingSettings, *, train: Literal["background", "inline"] = "background", seed: int = 0,
                     costs: TierCosts | None = None, max_stages_per_interval: int | None = None,
                     arrivals: Sequence[tuple[float, str]] = ()) -> tuple[Predictor | None, PredictiveStager | None]:
    """The predictor and stager the staging settings name ((None, None) for `predictor: none`), for the live
    scheduler and the simulator alike. `train`: how an LSTM trains (live: a background thread, so that the
    dispatcher never waits for it; the simulator: inline, deterministic for `seed`); `arrivals`: the oracle's
    future; `costs`, `max_stages_per_interval`: the stager's (default: its own)."""
    if cfg.predictor == "none":
        return None, None
    # The histogram's bins are one interval wide over 240 intervals (1-minute bins over 4 hours at the default
    # interval), so that a time-compressed replay with a shorter interval keeps the policy's shape.
    histogram = {"bin_s": cfg.interval_s, "range_s": 240 * cfg.interval_s}
    lstm: dict[str, Any] = {"train": "background"} if train == "background" else {"seed": seed}
    options: dict[str, Any] = {}
    if cfg.predictor == "lstm":
        options = lstm
    elif cfg.predictor == "histogram":
        options = histogram
    elif cfg.predictor == "fallback":
        options = {"members": {"lstm": lstm, "histogram": histogram}}
    elif cfg.predictor == "oracle":
        options = {"arrivals": arrivals}
    defaults = PredictiveStager()
    stager = PredictiveStager(
        device_at=cfg.device_at, device_release_at=min(defaults.device_release_at, cfg.device_at),
        host_at=cfg.host_at, host_release_at=min(defaults.host_release_at, cfg.host_at),
        keep_alive_s=cfg.keep_alive_s, costs=costs or defaults.costs,
        max_stages_per_interval=defaults.max_stages_per_interval if max_stages_per_interval is None
        else max_stages_per_interval,
    )
    return build_predictor(cfg.predictor, cfg.interval_s, **options), stager
