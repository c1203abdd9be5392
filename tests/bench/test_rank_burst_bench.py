"""The rank-burst bench (`bench.rank_burst`): the burst's and the warm-up's composition, the statistics and the
report from hand-made per-call records, the metrics parsing, and one tiny burst through the in-process stack
(the tiny backbone, one worker, no scheduler metrics)."""

from __future__ import annotations

import collections
import itertools
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from bench.rank_burst import (
    LARGE,
    SMALL,
    BurstCall,
    BurstOptions,
    Metrics,
    adapters,
    burst_calls,
    compare,
    decisions_between,
    markdown,
    measure,
    parse_metric,
    summarise,
    warmup_schedule,
    write_adapters,
)
from tests.stacks import InProcessStack, in_process_stack

# -- composition -------------------------------------------------------------------------------------------------


def test_the_default_burst_is_three_quarters_rank_8_round_robin_with_the_rank_128_calls_spread() -> None:
    options = BurstOptions()
    burst = burst_calls(options)
    assert len(burst) == 48
    per_adapter = collections.Counter(a.name for a in burst)
    small = [a for a in adapters(options) if a.kind == SMALL]
    large = [a for a in adapters(options) if a.kind == LARGE]
    assert len(small) == 12 and {a.rank for a in small} == {8}
    assert len(large) == 4 and {a.rank for a in large} == {128}
    assert all(per_adapter[a.name] == 3 for a in small + large)  # 36 over 12, 12 over 4
    # spread: one rank-128 call in every four, never two in a row
    kinds = [a.kind for a in burst]
    assert all(kinds[i:i + 4].count(LARGE) == 1 for i in range(0, 48, 4))
    assert not any(kinds[i] == kinds[i + 1] == LARGE for i in range(47))


def test_a_burst_always_has_both_kinds_and_uneven_shares_round() -> None:
    assert collections.Counter(a.kind for a in burst_calls(BurstOptions(calls=2, small_share=0.99))) == {
        SMALL: 1, LARGE: 1}
    counts = collections.Counter(a.kind for a in burst_calls(BurstOptions(calls=10, small_share=0.66)))
    assert counts == {SMALL: 7, LARGE: 3}


def test_the_warm_up_calls_every_adapter_each_round_evenly_spaced() -> None:
    options = BurstOptions(warmup_s=20.0, warmup_rounds=3)
    schedule = warmup_schedule(options)
    assert len(schedule) == 16 * 3
    assert collections.Counter(a.name for _, a in schedule) == {a.name: 3 for a in adapters(options)}
    times = [t for t, _ in schedule]
    assert times[0] == 0.0 and times[-1] < 20.0
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {round(20.0 / 48, 9)}
    assert warmup_schedule(BurstOptions(warmup_rounds=0)) == []


@pytest.mark.parametrize("bad", [dict(small=0), dict(small_rank=128, large_rank=8), dict(small_share=1.0),
                                 dict(calls=1), dict(routers=("random",)), dict(routers=()), dict(warmup_s=-1.0)])
def test_bad_options_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BurstOptions(**bad)


# -- statistics and report ----------------------------------------------------------------------------------------


def records(small_ttft: list[float], large_ttft: list[float], *, failed: int = 0) -> list[BurstCall]:
    out = [BurstCall(i, f"s{i % 2}", 8, SMALL, status="ok", ttft_ms=t, latency_ms=t + 100, tier="device",
                     worker=f"w{1 + i % 2}", attempts=1, completion_tokens=16) for i, t in enumerate(small_ttft)]
    out += [BurstCall(100 + i, "l0", 128, LARGE, status="ok", ttft_ms=t, latency_ms=t + 300, tier="host", worker="w3",
                      attempts=2 if i == 0 else 1, completion_tokens=1 + i) for i, t in enumerate(large_ttft)]
    out += [BurstCall(200 + i, "s0", 8, SMALL, status="http_503:overloaded") for i in range(failed)]
    return out


def test_summarise_gives_nearest_rank_percentiles_per_class_over_the_ok_calls() -> None:
    s = summarise(records([float(t) for t in range(10, 110, 10)], [500.0, 900.0], failed=2))
    small, large = s["by_kind"][SMALL], s["by_kind"][LARGE]
    assert (small["calls"], small["ok"], small["failed"], small["ranks"]) == (12, 10, 2, [8])
    assert small["ttft_ms"] == {"p50": 50.0, "p99": 100.0, "max": 100.0}  # nearest rank over the 10 ok calls
    assert small["latency_ms"]["p50"] == 150.0
    assert small["workers"] == {"unknown": 2, "w1": 5, "w2": 5} and small["tiers"] == {"device": 10, "unknown": 2}
    assert large["ttft_ms"] == {"p50": 500.0, "p99": 900.0, "max": 900.0} and large["workers"] == {"w3": 2}
    assert small["tokens_mean"] == 16.0 and large["tokens_mean"] == 1.5
    assert s["per_worker"] == {"unknown": {SMALL: 2, LARGE: 0}, "w1": {SMALL: 5, LARGE: 0},
                               "w2": {SMALL: 5, LARGE: 0}, "w3": {SMALL: 0, LARGE: 2}}
    assert s["failed"] == 2 and s["failures"] == {"http_503:overloaded": 2} and s["redispatched"] == 1
    assert s["per_worker_ttft"]["w1"][SMALL] == {"calls": 5, "cold": 0, "ttft_ms_min": 10.0, "ttft_ms_median": 50.0,
                                                 "ttft_ms_max": 90.0}
    assert s["per_worker_ttft"]["w3"][LARGE]["ttft_ms_median"] == 700.0
    assert s["per_worker_ttft"]["unknown"][SMALL] == {"calls": 2, "cold": 0, "ttft_ms_min": None,
                                                      "ttft_ms_median": None, "ttft_ms_max": None}


def test_compare_is_affinity_over_rank_aware_and_judges_the_target() -> None:
    affinity = summarise(records([100.0, 200.0, 1000.0], [1000.0]))
    rank_aware = summarise(records([100.0, 150.0, 400.0], [2000.0]))
    c = compare({"affinity": affinity, "rank_aware": rank_aware})
    assert c["small_ttft_p99_ratio"] == pytest.approx(2.5) and c["small_ttft_p50_ratio"] == pytest.approx(200 / 150)
    assert c["large_ttft_p99_ratio"] == pytest.approx(0.5)
    assert c["target_met"] and c["no_failures"]
    slower = compare({"affinity": affinity, "rank_aware": summarise(records([100.0, 150.0, 600.0], [900.0],
                                                                              failed=1))})
    assert not slower["target_met"] and not slower["no_failures"]
    assert compare({"affinity": affinity}) == {}


def test_the_markdown_has_a_row_per_router_and_class_and_the_ratio() -> None:
    options = BurstOptions()
    runs = {}
    for router, small in (("affinity", [100.0, 900.0]), ("rank_aware", [100.0, 300.0])):
        summary = summarise(records(small, [700.0]))
        runs[router] = {"summary": summary, "decisions": {"device": 3}, "queue_peak": {"w1": 4.0},
                        "replans_before_burst": 1 if router == "rank_aware" else 0}
    payload = {"options": {**options.__dict__}, "backbone": "SmolLM2", "machine_note": "2 cores",
               "burst": {SMALL: 36, LARGE: 12}, "runs": runs,
               "comparison": compare({r: run["summary"] for r, run in runs.items()})}
    text = markdown(payload)
    assert "| affinity | small (rank 8) | 2 | 0 | 100 | 900 |" in text
    assert "| rank_aware | large (rank 128) | 1 | 0 | 700 | 700 | 1,000 | 1,000 | 1.0 | w3 1 |" in text
    assert "TTFT p99 3.00x" in text and "Target 2x on the rank-8 p99: met" in text
    assert "- rank_aware: w1: 1 rank 8 + 0 rank 128" in text and "Plans before the burst: 1." in text
    assert "| affinity | w2 | rank 8 | 1 | 0 | 900 | 900 | 900 |" in text


def test_metrics_are_read_from_prometheus_text() -> None:
    text = ('# HELP lorafn_dispatch_decisions_total x\nlorafn_dispatch_decisions_total{reason="device"} 12.0\n'
            'lorafn_dispatch_decisions_created{reason="device"} 1.7e9\n'
            'lorafn_dispatch_decisions_total{reason="replan"} 2.0\nlorafn_worker_queue{worker="w1"} 3.0\n')
    before = parse_metric(text, "lorafn_dispatch_decisions_total")
    assert before == {"device": 12.0, "replan": 2.0}
    assert parse_metric(text, "lorafn_worker_queue") == {"w1": 3.0}
    assert decisions_between(before, {"device": 20.0, "replan": 2.0, "offload": 3.0}) == {"device": 8, "offload": 3}


# -- a tiny burst through the in-process stack ----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def stack(services: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessStack]:
    async with in_process_stack(services, tmp_path_factory.mktemp("rank-burst"),
                                tenant=f"burst-{secrets.token_hex(3)}") as s:
        yield s


async def test_a_tiny_burst_runs_every_call_and_records_its_worker(stack: InProcessStack, services: Any,
                                                                   tmp_path: Path) -> None:
    from lorafn.replay import _backbone_spec

    options = BurstOptions(small=2, large=1, small_rank=4, large_rank=16, calls=6, max_tokens=4, warmup_s=0.3,
                           warmup_rounds=1, tiny=True)
    folders = write_adapters(tmp_path / "adapters", _backbone_spec(stack.backbone), options)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60,
                                 headers={"Authorization": f"Bearer {stack.key}"}) as http:
        result = await measure(http, tenant=stack.tenant, folders=folders, options=options,
                               database_url=services.database_url, metrics=Metrics(None), wait_for_plan=True,
                               log=lambda _: None)
    assert result["warmup"] == {"calls": 3, "failures": {}}
    calls = result["calls"]
    assert len(calls) == 6 and [c["kind"] for c in calls].count(LARGE) == 2
    assert all(c["status"] == "ok" for c in calls), calls
    assert all(c["latency_ms"] >= c["ttft_ms"] > 0 and c["tier"] in ("object", "host", "device") for c in calls)
    assert all(1 <= c["completion_tokens"] <= 4 for c in calls)
    workers = {c["worker"] for c in calls}
    assert len(workers) == 1 and next(iter(workers)).startswith("stack-")  # the stack's one worker ran them all
    s = result["summary"]
    assert s["failed"] == 0 and s["by_kind"][SMALL]["calls"] == 4 and s["by_kind"][LARGE]["ranks"] == [16]
    assert result["decisions"] == {} and result["queue_peak"] == {}  # no metrics endpoint given: nothing read
