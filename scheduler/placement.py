"""Rank-aware placement and routing: which workers serve which rank class, which adapters live where, and
how each adapter's calls are split among its workers. Pure: plain data in, a plan out, no clock.

Adapters of very different ranks slow each other down when they share a worker: each decode step reads every
adapter of its batch (a rank-128 adapter is sixteen times a rank-8 one), a large adapter's load takes the
device pool room of many small ones, and the GPU shrink kernel sizes its rank block by the largest rank of the
batch. `plan_placement` keeps rank classes apart (LoRAServe places and routes by rank and demand for the same
reason):

1. each adapter's demand (decode tokens/s) becomes load, the fraction of one worker it needs, through its rank
   class's operating point (`scheduler.operating_points`);
2. rank classes get worker budgets in proportion to their load (largest remainders, at least one worker per
   class with demand; with fewer workers than classes, the lightest class joins the next one up, since a worker
   serves every rank up to its class);
3. workers are given classes keeping as many as possible in the class they had (then by worker id), never a
   class above a worker's `max_rank`;
4. within a class, adapters are placed hottest first: one whose load exceeds a worker's share is split over
   several workers with routing fractions; the others go to the worker they had if it still has room, else to
   the least loaded worker of the class with room (load and device bytes); an adapter that fits nowhere in its
   class goes to the least loaded worker whose class is at least its rank (a leftover), else to the least
   loaded of its class (over-subscribed: counted in the plan).

`RankAwareRouter` routes by the current plan. The scheduler core gives it demand every `placement_interval_s`
(and early when demand drifts) through `replan`; between plans a call of a placed adapter goes to the worker
of its routes with the least outstanding calls per routing fraction; a call of an adapter the plan does not
know goes to a worker of its class (a device holder first, then the least loaded). When none of those can take
it (full, draining, gone), or when the chosen one is busy (`offload_at` calls outstanding) and a worker whose
class covers the rank has `offload_margin` fewer, the call is offloaded (reason "offload"): to such a worker
holding the adapter on its device or in its host cache, else to the least loaded such worker (ServerlessLoRA's
offload under contention). With no plan yet (no demand seen) it routes as `AffinityRouter` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from protocol.messages import Tier
from scheduler.operating_points import OperatingPoints
from scheduler.policy import AdapterSpec, AffinityRouter, CallView, Residency, Route, WorkerView


@dataclass(frozen=True)
class Demand:
    """One adapter version's demand: decode tokens per second (recent history or a prediction)."""

    spec: AdapterSpec
    tokens_per_s: float


@dataclass(frozen=True)
class PlaceWorker:
    """A worker as placement sees it."""

    worker_id: str
    max_rank: int = 0  # largest rank its pool takes (0: any)
    device_bytes: int = 0  # bytes its device pool holds (0: unknown, not a constraint)


@dataclass(frozen=True)
class PlacementPlan:
    """Where every placed adapter lives and how its calls are split. `routes`: version -> ((worker, fraction),
    ...) with fractions summing to 1; `classes`: worker -> its rank class; `load`: worker -> planned load in
    workers (1.0 = its operating point); `moved`: adapters whose workers changed from the previous plan;
    `overloaded`: adapters placed on a worker beyond its operating point (no room anywhere)."""

    at: float
    classes: Mapping[str, int]
    routes: Mapping[str, tuple[tuple[str, float], ...]]
    load: Mapping[str, float]
    moved: int = 0
    overloaded: int = 0
    leftovers: int = 0
    demand_load: float = 0.0  # total load of the demand it was planned for, in workers

    def workers_of_class(self, rank_class: int) -> list[str]:
        return sorted(w for w, c in self.classes.items() if c == rank_class)


def _budgets(class_load: Mapping[int, float], workers: int) -> dict[int, int]:
    """Workers per class in proportion to load (largest remainders), at least one per class; `workers` must be
    at least the number of classes."""
    total = sum(class_load.values())
    quotas = {c: workers * load / total for c, load in class_load.items()}
    budgets = {c: max(1, math.floor(q)) for c, q in quotas.items()}
    while sum(budgets.values()) > workers:  # the minimum of one took more than the floors left
        c = max((c for c in budgets if budgets[c] > 1), key=lambda c: (budgets[c] - quotas[c], c))
        budgets[c] -= 1
    for c in sorted(quotas, key=lambda c: (budgets[c] - quotas[c], -c))[: workers - sum(budgets.values())]:
        budgets[c] += 1
    while sum(budgets.values()) < workers:  # more workers than remainders: the heaviest per worker gets one
        c = max(budgets, key=lambda c: (class_load[c] / budgets[c], c))
        budgets[c] += 1
    return budgets


def _merge_classes(class_load: dict[int, float], workers: int) -> dict[int, int]:
    """With fewer workers than classes, the lightest class joins the next one up (or, the top class, the one
    below it, whose label becomes the top): returns rank class -> the class that serves it."""
    served = {c: c for c in class_load}
    while len(class_load) > max(1, workers):
        ordered = sorted(class_load)
        light = min(ordered, key=lambda c: (class_load[c], c))
        i = ordered.index(light)
        into = ordered[i + 1] if i + 1 < len(ordered) else ordered[i - 1]
        top = max(light, into)
        merged = class_load.pop(light) + class_load.pop(into)
        class_load[top] = merged
        for c, s in served.items():
            if s in (light, into):
                served[c] = top
    return served


def plan_placement(demand: Sequence[Demand], workers: Sequence[PlaceWorker], points: OperatingPoints, *,
                   previous: PlacementPlan | None = None, at: float = 0.0) -> PlacementPlan:
    """The placement of the module docstring for `demand` over `workers`."""
    live = sorted(workers, key=lambda w: w.worker_id)
    if not live:
        return PlacementPlan(at, {}, {}, {})
    loads = {d.spec.version: points.load(d.spec.rank, d.tokens_per_s) for d in demand}
    specs = {d.spec.version: d.spec for d in demand}
    class_of = {v: points.rank_class(s.rank) for v, s in specs.items()}
    class_load: dict[int, float] = {}
    for v, c in class_of.items():
        class_load[c] = class_load.get(c, 0.0) + loads[v]
    if not class_load:
        return PlacementPlan(at, {}, {}, {})
    served = _merge_classes(dict(class_load), len(live))
    merged_load: dict[int, float] = {}
    for c, c_load in class_load.items():
        merged_load[served[c]] = merged_load.get(served[c], 0.0) + c_load
    if sum(merged_load.values()) <= 0:  # adapters known but idle: share the workers evenly
        merged_load = dict.fromkeys(merged_load, 1.0)
    budgets = _budgets(merged_load, len(live))

    # Workers to classes: those that had a class keep it while its budget lasts (the highest classes first),
    # then the rest fill the remaining budgets; a worker never gets a class above its max_rank.
    classes: dict[str, int] = {}
    left = dict(budgets)
    before = previous.classes if previous is not None else {}
    for w in live:
        kept = before.get(w.worker_id)
        if kept is not None and left.get(kept, 0) > 0 and (not w.max_rank or kept <= w.max_rank):
            classes[w.worker_id] = kept
            left[kept] -= 1
    for c in sorted(left, reverse=True):
        for w in live:
            if left[c] <= 0:
                break
            if w.worker_id not in classes and (not w.max_rank or c <= w.max_rank):
                classes[w.worker_id] = c
                left[c] -= 1
    for w in live:  # budgets no worker could take (max_rank): the worker joins the highest class it can serve
        if w.worker_id not in classes:
            serves = [c for c in budgets if not w.max_rank or c <= w.max_rank]
            if serves:
                classes[w.worker_id] = max(serves)
    by_id = {w.worker_id: w for w in live}
    load = dict.fromkeys(classes, 0.0)
    used_bytes = dict.fromkeys(classes, 0)
    old_routes = previous.routes if previous is not None else {}
    routes: dict[str, tuple[tuple[str, float], ...]] = {}
    moved = overloaded = leftovers = 0

    def room(worker_id: str, share: float, nbytes: int) -> bool:
        cap = by_id[worker_id].device_bytes
        return load[worker_id] + share <= 1.0 + 1e-9 and (not cap or used_bytes[worker_id] + nbytes <= cap)

    def put(version: str, worker_id: str, share: float) -> None:
        load[worker_id] += share
        used_bytes[worker_id] += specs[version].bytes

    for version in sorted(loads, key=lambda v: (-loads[v], v)):
        spec, share = specs[version], loads[version]
        mine = sorted(wid for wid, cls in classes.items() if cls == served[class_of[version]])
        if not mine:
            mine = sorted(wid for wid, cls in classes.items() if cls >= spec.rank) or sorted(classes)
        had = [wid for wid, _ in old_routes.get(version, ()) if wid in mine]
        if share > 1.0 and len(mine) > 1:  # a hot adapter: split over enough workers, its old ones first
            k = min(len(mine), math.ceil(share))
            chosen = had[:k] + sorted((wid for wid in mine if wid not in had), key=lambda wid: (load[wid], wid))[: k - len(had[:k])]
            for wid in chosen:
                put(version, wid, share / k)
            routes[version] = tuple((wid, 1.0 / k) for wid in chosen)
        else:
            target = next((wid for wid in had if room(wid, share, spec.bytes)), None)
            if target is None:
                fits = [wid for wid in mine if room(wid, share, spec.bytes)]
                if fits:
                    target = min(fits, key=lambda wid: (load[wid], wid))
            if target is None:
                above = [wid for wid, cls in classes.items() if cls >= spec.rank and wid not in mine
                         and room(wid, share, spec.bytes)]
                if above:
                    target = min(above, key=lambda wid: (load[wid], wid))
                    leftovers += 1
            if target is None:
                target = min(mine, key=lambda wid: (load[wid], wid))
                overloaded += 1
            put(version, target, share)
            routes[version] = ((target, 1.0),)
        if version in old_routes and {wid for wid, _ in old_routes[version]} != {wid for wid, _ in routes[version]}:
            moved += 1
    return PlacementPlan(at, classes, routes, load, moved, overloaded, leftovers, sum(loads.values()))


@runtime_checkable
class Replanning(Protocol):
    """A router that places adapters from demand (the core calls `replan` every `placement_interval_s`)."""

    def replan(self, at: float, demand: Sequence[Demand], workers: Sequence[PlaceWorker]) -> PlacementPlan: ...


@dataclass
class RankAwareRouter:
    """Routes by the latest `PlacementPlan` (module docstring). Its only state is that plan, rebuilt from the
    core's demand at every replan."""

    points: OperatingPoints
    fallback: AffinityRouter = field(default_factory=AffinityRouter)
    plan: PlacementPlan | None = None
    offload_at: int = 8  # a planned worker with this many calls outstanding is busy ...
    offload_margin: int = 4  # ... when a worker whose class covers the rank has at least this many fewer

    def replan(self, at: float, demand: Sequence[Demand], workers: Sequence[PlaceWorker]) -> PlacementPlan:
        self.plan = plan_placement(demand, workers, self.points, previous=self.plan, at=at)
        return self.plan

    def route(self, call: CallView, workers: Sequence[WorkerView], residency: Residency) -> Route | None:
        plan, adapter = self.plan, call.adapter
        if plan is None or not plan.classes or adapter is None:
            return self.fallback.route(call, workers, residency)
        candidates = {w.worker_id: w for w in workers if w.takes(adapter)}
        if not candidates:
            return None
        holders = residency.get(adapter.version, {})
        # workers whose class covers the rank: where an offloaded call may go
        able = [w for w in candidates.values() if plan.classes.get(w.worker_id, 0) >= adapter.rank] or list(
            candidates.values())
        chosen: Route | None = None
        routes = plan.routes.get(adapter.version)
        if routes:
            open_ = [(candidates[w], f) for w, f in routes if w in candidates and f > 0]
            if open_:
                best, _ = min(open_, key=lambda x: ((x[0].load + 1) / x[1], x[0].worker_id))
                chosen = Route(best.worker_id, "placed")
        else:
            rank_class = self.points.rank_class(adapter.rank)
            served = [c for c in set(plan.classes.values()) if c >= rank_class]
            home = min(served) if served else max(plan.classes.values())
            mine = [candidates[w] for w in plan.workers_of_class(home) if w in candidates]
            if mine:
                on_device = [w for w in mine if holders.get(w.worker_id) == Tier.device]
                best = min(on_device or mine, key=lambda w: (w.load, w.worker_id))
                chosen = Route(best.worker_id, "class")
        if chosen is not None:
            # Offload under contention: the planned worker is busy and a covering worker is much lighter.
            load = candidates[chosen.worker_id].load
            lightest = min(able, key=lambda w: (w.load, w.worker_id))
            if load < self.offload_at or lightest.load + self.offload_margin > load:
                return chosen
        # Offload: the planned workers cannot take it now, or are busy; a covering worker, holders first.
        for tier in (Tier.device, Tier.host):
            held = [w for w in able if holders.get(w.worker_id) == tier
                    and (chosen is None or w.worker_id != chosen.worker_id)]
            if held:
                best = min(held, key=lambda w: (w.load, w.worker_id))
                if chosen is None or best.load + self.offload_margin <= candidates[chosen.worker_id].load:
                    return Route(best.worker_id, "offload")
        return Route(min(able, key=lambda w: (w.load, w.worker_id)).worker_id, "offload")
