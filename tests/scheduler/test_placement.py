"""Rank-aware placement and routing over plain data (scheduler.placement), and the core's replanning."""

from __future__ import annotations

import pytest

from protocol.messages import Tier
from scheduler.core import CoreConfig, Dispatch, InvocationArrived, SchedulerCore, Tick, WorkerReport
from scheduler.operating_points import from_lists
from scheduler.placement import Demand, PlaceWorker, RankAwareRouter, plan_placement
from scheduler.policy import AdapterSpec, AffinityRouter, CallView, WorkerView

# One worker sustains 1,000 decode tokens/s of rank-8 adapters at the SLO, 250 of rank 128.
POINTS = from_lists(1.0, (8, 32, 128), (1000.0, 600.0, 250.0))


def spec(name: str, rank: int, nbytes: int = 1) -> AdapterSpec:
    return AdapterSpec("t", name, f"v-{name}", rank, nbytes)


def demand(name: str, rank: int, tokens_per_s: float, nbytes: int = 1) -> Demand:
    return Demand(spec(name, rank, nbytes), tokens_per_s)


def workers(n: int, **kw: int) -> list[PlaceWorker]:
    return [PlaceWorker(f"w{i}", **kw) for i in range(n)]


def test_rank_classes_get_workers_in_proportion_to_their_load_and_stay_apart() -> None:
    # rank 8: 30 adapters x 100 tokens/s = 3 workers of load; rank 128: 4 x 62.5 = 1 worker
    d = [demand(f"s{i}", 8, 100.0) for i in range(30)] + [demand(f"b{i}", 128, 62.5) for i in range(4)]
    plan = plan_placement(d, workers(4), POINTS)
    assert sorted(plan.classes.values()) == [8, 8, 8, 128]
    for x in d:
        (worker, fraction), = plan.routes[x.spec.version]
        assert fraction == 1.0
        assert plan.classes[worker] == (8 if x.spec.rank == 8 else 128), "a class's adapters stay on its workers"
    assert all(load == pytest.approx(1.0) for load in plan.load.values()), "packed within each worker's point"
    assert plan.overloaded == plan.leftovers == plan.moved == 0


def test_a_hot_adapter_is_split_over_several_workers_of_its_class() -> None:
    d = [demand("hot", 8, 2500.0), demand("cold", 8, 10.0)]
    plan = plan_placement(d, workers(4), POINTS)
    routes = plan.routes["v-hot"]
    assert len(routes) == 3 and sum(f for _, f in routes) == pytest.approx(1.0)
    assert len({w for w, _ in routes}) == 3


def test_replanning_the_same_demand_moves_nothing_and_a_drift_moves_few() -> None:
    d = [demand(f"s{i}", 8, 40.0 + i) for i in range(40)] + [demand(f"b{i}", 128, 20.0 + i) for i in range(6)]
    first = plan_placement(d, workers(5), POINTS)
    again = plan_placement(list(reversed(d)), workers(5), POINTS, previous=first)
    assert again.moved == 0 and again.routes == first.routes and again.classes == first.classes
    drifted = [Demand(x.spec, x.tokens_per_s * (1.3 if i % 7 == 0 else 1.0)) for i, x in enumerate(d)]
    after = plan_placement(drifted, workers(5), POINTS, previous=first)
    assert after.classes == first.classes
    assert after.moved <= len(d) // 4, f"{after.moved} of {len(d)} adapters moved"


def test_fewer_workers_than_classes_merge_the_lightest_class_upwards() -> None:
    d = [demand("a", 8, 500.0), demand("b", 32, 10.0), demand("c", 128, 100.0)]
    plan = plan_placement(d, workers(2), POINTS)
    assert sorted(plan.classes.values()) == [8, 128]
    (w, _), = plan.routes["v-b"]
    assert plan.classes[w] == 128, "rank 32 is served by a worker whose class covers it"
    single = plan_placement(d, workers(1), POINTS)
    assert single.classes == {"w0": 128} and {r[0][0] for r in single.routes.values()} == {"w0"}


def test_a_worker_never_gets_a_class_above_its_max_rank() -> None:
    d = [demand("a", 8, 100.0), demand("c", 128, 500.0)]
    fleet = [PlaceWorker("w0", max_rank=16), PlaceWorker("w1", max_rank=16), PlaceWorker("w2", max_rank=128)]
    plan = plan_placement(d, fleet, POINTS)
    assert plan.classes["w2"] == 128 and plan.classes["w0"] == plan.classes["w1"] == 8


def test_device_bytes_and_load_bound_a_worker_and_leftovers_go_to_a_higher_class() -> None:
    # each class-8 worker's pool holds two adapters; the third rank-8 adapter goes to the class-128 worker,
    # whose class covers rank 8 and who has room
    d = [demand(f"s{i}", 8, 300.0, nbytes=10) for i in range(5)] + [demand("b", 128, 25.0, nbytes=10)]
    plan = plan_placement(d, workers(3, device_bytes=20), POINTS)
    assert sorted(plan.classes.values()) == [8, 8, 128]
    per_worker: dict[str, int] = {}
    for routes in plan.routes.values():
        for w, _ in routes:
            per_worker[w] = per_worker.get(w, 0) + 1
    assert max(per_worker.values()) <= 2, "no pool holds more than its bytes"
    assert plan.leftovers == 1 and plan.overloaded == 0
    # one more rank-8 adapter: every pool is full, and the rank-128 adapter (placed last, the coolest) has to be
    # over-subscribed on its own class's worker
    crowded = plan_placement([*d, demand("s5", 8, 300.0, nbytes=10)], workers(3, device_bytes=20), POINTS)
    assert crowded.leftovers == 2 and crowded.overloaded == 1
    assert crowded.classes[crowded.routes["v-b"][0][0]] == 128


def view(worker_id: str, outstanding: int = 0, capacity: int = 32) -> WorkerView:
    return WorkerView(worker_id, total_pages=100, free_pages=100, outstanding=outstanding, capacity=capacity)


def test_the_router_follows_the_plan_and_offloads_when_the_planned_worker_is_full() -> None:
    router = RankAwareRouter(POINTS)
    d = [demand(f"s{i}", 8, 100.0) for i in range(20)] + [demand("b", 128, 200.0)]
    plan = router.replan(0.0, d, workers(3))
    views = [view("w0"), view("w1"), view("w2")]
    for x in d:
        route = router.route(CallView("c", x.spec), views, {})
        assert route is not None and route.reason == "placed" and route.worker_id == plan.routes[x.spec.version][0][0]
    big = plan.routes["v-b"][0][0]
    small_home = plan.routes["v-s0"][0][0]
    # an adapter the plan does not know goes to a worker of its class (a device holder first)
    unknown = spec("new", 4)
    holders = {unknown.version: {w: Tier.device for w in plan.classes if plan.classes[w] == 8 and w != small_home}}
    route = router.route(CallView("c", unknown), views, holders)
    assert route is not None and route.reason == "class" and plan.classes[route.worker_id] == 8
    assert holders[unknown.version].get(route.worker_id) == Tier.device
    # rank 16 is above class 8: the plan has no class-32 worker, so the next class up serves it
    route = router.route(CallView("c", spec("mid", 16)), views, {})
    assert route is not None and route.reason == "class" and plan.classes[route.worker_id] == 128
    # the planned worker is full: offload to a worker whose class covers the rank, a holder first
    full = [view(w, outstanding=32) if w == small_home else view(w) for w in ("w0", "w1", "w2")]
    route = router.route(CallView("c", spec("s0", 8)), full, {"v-s0": {big: Tier.host}})
    assert route is not None and route.reason == "offload" and route.worker_id != small_home
    # a rank-128 call never goes to a class-8 worker, even offloaded
    full_big = [view(w, outstanding=32) if w == big else view(w) for w in ("w0", "w1", "w2")]
    route = router.route(CallView("c", spec("b", 128)), full_big, {})
    assert route is not None and route.worker_id != big and route.reason == "offload"


def test_without_a_plan_the_router_routes_by_affinity() -> None:
    route = RankAwareRouter(POINTS).route(CallView("c", spec("a", 8)), [view("w0"), view("w1", 3)],
                                          {"v-a": {"w1": Tier.device}})
    assert route is not None and (route.worker_id, route.reason) == ("w1", "device")


def report(worker_id: str, at: float) -> WorkerReport:
    return WorkerReport(at, worker_id, total_pages=1000, free_pages=1000, max_rank=128, max_inflight=64)


def test_the_core_replans_from_recent_demand_every_interval_and_on_drift() -> None:
    router = RankAwareRouter(POINTS)
    config = CoreConfig(placement_interval_s=30.0, placement_min_interval_s=5.0, placement_window_s=60.0)
    core = SchedulerCore(router=router, config=config)
    for w in ("w0", "w1", "w2", "w3"):
        core.handle(report(w, 0.0))
    at, n = 0.0, 0
    # 10 s of 4 calls/s, 100 tokens each, rank-8 adapters; one rank-128 adapter at 1 call/s
    while at < 10.0:
        at += 0.25
        n += 1
        core.handle(InvocationArrived(at, f"i{n}", spec(f"s{n % 8}", 8), max_tokens=100))
        if n % 4 == 0:
            core.handle(InvocationArrived(at, f"b{n}", spec("b", 128), max_tokens=100))
        for w in ("w0", "w1", "w2", "w3"):
            core.handle(report(w, at))
    assert core.plans >= 1 and core.plan is router.plan and core.plan is not None
    tokens = {d.spec.version: d.tokens_per_s for d in core.demand()}
    assert tokens["v-b"] == pytest.approx(100.0 * 10 / 10.0, rel=0.15)
    assert 128 in core.plan.classes.values() and 8 in core.plan.classes.values()
    plans, planned_at = core.plans, core.plan.at
    assert planned_at <= 5.5, "the first plan comes once demand is seen, not a whole interval later"
    core.handle(Tick(at + 1.0))
    assert core.plans == plans, "no drift, not yet the interval"
    # demand quadruples: a replan comes before the interval, once the minimum interval has passed
    t = at + 1.0
    for k in range(200):
        t += 0.01
        commands = core.handle(InvocationArrived(t, f"x{k}", spec(f"s{k % 8}", 8), max_tokens=100))
        assert isinstance(commands[0], Dispatch) and commands[0].reason in ("placed", "class", "offload")
    core.handle(Tick(t + 5.0))
    assert core.plans > plans and core.plan.at < planned_at + config.placement_interval_s
    assert core.decisions["replan"] == core.plans


def test_the_scheduler_builds_the_router_its_settings_name(tmp_path) -> None:
    from scheduler.service import build_router
    from scheduler.settings import PlacementSettings

    assert isinstance(build_router(PlacementSettings()), AffinityRouter)
    router = build_router(PlacementSettings(router="rank_aware"))
    assert isinstance(router, RankAwareRouter) and router.points.classes  # the committed points file
    bad = tmp_path / "points.json"
    bad.write_text('{"slo_ttft_s": 1.0, "points": []}')
    with pytest.raises(ValueError, match="at least one rank class"):
        build_router(PlacementSettings(router="rank_aware", operating_points=bad))


def test_a_busy_planned_worker_offloads_to_a_much_lighter_covering_worker_holders_first() -> None:
    router = RankAwareRouter(POINTS, offload_at=8, offload_margin=4)
    d = [demand(f"s{i}", 8, 100.0) for i in range(20)] + [demand("b", 128, 200.0)]
    plan = router.replan(0.0, d, workers(3))
    home = plan.routes["v-s0"][0][0]
    big = plan.routes["v-b"][0][0]
    others = [w for w in ("w0", "w1", "w2") if w != home]
    # busy, but nobody is 4 calls lighter: it stays
    views = [view(w, outstanding=9 if w == home else 6) for w in ("w0", "w1", "w2")]
    route = router.route(CallView("c", spec("s0", 8)), views, {})
    assert route is not None and (route.worker_id, route.reason) == (home, "placed")
    # busy, and the others are idle: offloaded, to the one holding the adapter in its host cache
    views = [view(w, outstanding=9 if w == home else 0) for w in ("w0", "w1", "w2")]
    holder = others[-1]
    route = router.route(CallView("c", spec("s0", 8)), views, {"v-s0": {holder: Tier.host}})
    assert route is not None and (route.worker_id, route.reason) == (holder, "offload")
    # a rank-128 call is never offloaded to a class-8 worker
    views = [view(w, outstanding=9 if w == big else 0) for w in ("w0", "w1", "w2")]
    route = router.route(CallView("c", spec("b", 128)), views, {})
    assert route is not None and plan.classes[route.worker_id] == 128
