"""The placement comparison's code path on a small synthetic trace: structure and bookkeeping, no timings."""

from __future__ import annotations

from bench.placement import (
    POLICIES,
    compress,
    markdown,
    measure,
    poisson_trace,
    run_policy,
    sim_operating_points,
)
from bench.simulate import CostModel
from scheduler.policy import CallView, RandomRouter, WorkerView


def test_operating_points_of_the_simulated_worker_fall_with_rank() -> None:
    points = sim_operating_points(CostModel(), classes=(8, 128), duration_s=120.0, iterations=3)
    assert points.classes == (8, 128)
    r8, r128 = points.points
    assert r8.tokens_per_s > r128.tokens_per_s > 0, "a rank-128 step costs more than a rank-8 one"
    assert all(p.ttft_p95_s <= points.slo_ttft_s for p in points.points), "each point is within the SLO"


def test_every_policy_serves_every_call_and_the_report_names_them() -> None:
    base = poisson_trace(2.0, 200.0, adapters=12, prompt=16, output=16, seed=1)
    rows = compress(base, 100.0)
    assert len(rows) == len(base) and abs(rows[-1].at_s - 100.0) < 1e-9 and rows[0].at_s == 0.0
    points = sim_operating_points(CostModel(), classes=(8, 128), duration_s=120.0, iterations=2)
    for policy in POLICIES:
        o = run_policy(rows, policy, 2, points, CostModel())
        assert o.failed == 0 and o.unfinished == 0 and o.scored > 0, policy
    result = measure(base, duration_s=100.0, throughput_workers=2, max_workers=3, log=lambda _: None)
    assert set(result.workers_needed) == set(result.throughput) == set(POLICIES)
    assert {r["policy"] for r in result.runs} == set(POLICIES)
    assert all(r["search"] in ("workers", "throughput") for r in result.runs)
    text = markdown(result)
    assert all(f"| {p} |" in text for p in POLICIES)


def test_the_random_router_is_seeded_and_only_picks_workers_that_can_take_the_call() -> None:
    workers = [WorkerView("w0"), WorkerView("w1", outstanding=32, capacity=32), WorkerView("w2")]
    first = RandomRouter(7).route(CallView("c", None), workers, {})
    router = RandomRouter(7)
    again = [router.route(CallView("c", None), workers, {}) for _ in range(40)]
    assert {r.worker_id for r in again if r} == {"w0", "w2"}, "never the full worker, both others in 40 picks"
    assert first == again[0], "the same seed, the same first pick"
    assert RandomRouter(0).route(CallView("c", None), [workers[1]], {}) is None
