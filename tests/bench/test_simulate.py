"""The trace simulator and the trace loaders: deterministic, complete, and driving the real core and policies."""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench import traces
from bench.simulate import (
    LORA_ELEMENTS_PER_RANK,
    CostModel,
    WorkerConfig,
    adapter_bytes,
    adapter_specs,
    build_staging,
    eviction_factory,
    host_eviction_factory,
    percentiles,
    simulate,
)
from bench.simulate import main as simulate_main
from bench.traces import TraceRequest
from protocol.messages import Tier
from scheduler.core import CoreConfig
from scheduler.policy import AdapterSpec, AffinityRouter, PinnedRouter
from scheduler.staging import Stage, StageView

ROOT = Path(__file__).resolve().parents[2]
AZURE_CONV = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def synthetic(n: int = 300, *, adapters: int = 12, rate: float = 2.0, seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals at `rate` per second, adapters a Zipf(1) pick of `adapters`, short prompts and outputs."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(adapters)]
    at, rows = 0.0, []
    for _ in range(n):
        at += rng.expovariate(rate)
        adapter = rng.choices([f"a{i:02d}" for i in range(adapters)], weights)[0]
        rows.append(TraceRequest(at, "t", adapter, rng.randint(8, 200), rng.randint(1, 40)))
    return rows


# -- the simulator ------------------------------------------------------------------------------------------------


def test_same_seed_same_report() -> None:
    trace = synthetic(400, rate=6.0)
    assert simulate(trace, workers=3, seed=7) == simulate(trace, workers=3, seed=7)
    assert simulate(trace, workers=3, seed=7) != simulate(trace, workers=3, seed=8)  # ranks and phases differ


def test_same_report_whatever_the_hash_seed(tmp_path: Path) -> None:
    """No decision may depend on set order of strings (which PYTHONHASHSEED changes between processes)."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([asdict(r) for r in synthetic(300, rate=6.0)]))
    script = ("import json, sys; from bench.simulate import simulate; from bench.traces import TraceRequest;"
              f"trace = [TraceRequest(**r) for r in json.load(open({str(rows)!r}))];"
              "json.dump(simulate(trace, workers=2, seed=3).to_dict(), sys.stdout)")
    outs = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)]
    assert json.loads(outs[0]) == json.loads(outs[1])


def test_a_small_trace_runs_to_completion() -> None:
    trace = synthetic(300, adapters=12, rate=2.0)
    r = simulate(trace, workers=2, seed=1)
    assert (r.requests, r.completed, r.failed, r.unfinished) == (300, 300, {}, 0)
    assert r.cold_starts + r.host_loads + r.device_hits == 300
    distinct = len({row.adapter for row in trace})
    assert sum(w.fetches for w in r.per_worker.values()) >= distinct  # each adapter came from the object store once
    assert r.cold_starts >= distinct
    assert sum(w.completed for w in r.per_worker.values()) == 300
    assert sum(r.decisions[k] for k in ("cold", "device", "host", "replicate") if k in r.decisions) == 300
    assert 0 < r.ttft_s["p50"] <= r.latency_s["p50"] and r.ttft_s["p99"] <= r.latency_s["p99"] + 1e-9
    assert r.end_s >= r.trace_s


def test_one_request_costs_a_cold_load_a_prefill_and_its_decode_steps() -> None:
    """The cost model, end to end: alone on a worker, a call's TTFT is the fetch, the load and its prefill step;
    each further token is one decode step of a batch of one."""
    cost = CostModel()
    trace = [TraceRequest(0.0, "t", "a", 100, 10)]
    r = simulate(trace, workers=1, cost=cost, adapter_ranks={"a": 16})
    nbytes = adapter_bytes(16)
    ttft = cost.fetch_s(nbytes) + cost.load_s(nbytes) + cost.step_s(0, 100, 100 * 16, nbytes)
    assert r.cold_starts == 1
    assert r.ttft_s["p50"] == pytest.approx(ttft)
    assert r.latency_s["p50"] == pytest.approx(ttft + 9 * cost.step_s(1, 0, 16, nbytes))
    assert cost.fetch_s(adapter_bytes(64)) + cost.load_s(adapter_bytes(64)) == pytest.approx(0.845, rel=0.02)


def test_a_second_call_of_a_resident_adapter_is_a_device_hit() -> None:
    trace = [TraceRequest(0.0, "t", "a", 50, 5), TraceRequest(30.0, "t", "a", 50, 5)]
    r = simulate(trace, workers=2)
    assert (r.cold_starts, r.device_hits) == (1, 1)
    assert r.decisions["device"] == 1
    assert sum(w.dispatched for w in r.per_worker.values() if w.adapters.get("t/a") == 2) == 2  # the same worker


def test_the_base_step_matches_the_engine_benchmark() -> None:
    """README, engine decode: 105 ms per step at 32 requests without adapters."""
    assert CostModel().step_s(32, 0, 0, 0) == pytest.approx(0.105, rel=0.01)


def test_adapter_bytes_follow_the_backbone_shapes() -> None:
    from storage.backbone import default_backbone_spec

    spec = default_backbone_spec()
    assert spec.num_layers * sum(i + o for i, o in spec.module_shapes().values()) == LORA_ELEMENTS_PER_RANK
    assert adapter_bytes(64) == 64 * LORA_ELEMENTS_PER_RANK * 2  # bf16


def test_pinned_router_sends_every_call_of_its_adapter_to_the_pinned_worker() -> None:
    trace = synthetic(400, adapters=6, rate=8.0, seed=2)
    calls_of_a = sum(1 for row in trace if row.adapter == "a00")
    router = PinnedRouter(pins={"t/a00": "w2"}, fallback=AffinityRouter())
    r = simulate(trace, workers=3, router=router, seed=2)
    assert r.completed == 400
    assert r.per_worker["w2"].adapters["t/a00"] == calls_of_a == r.decisions["pinned"]
    assert all("t/a00" not in r.per_worker[w].adapters for w in ("w0", "w1"))
    # the unpinned run spreads a00 (the most popular adapter) when its holder gets busy
    free = simulate(trace, workers=3, seed=2)
    assert sum(1 for w in free.per_worker.values() if "t/a00" in w.adapters) > 1


def test_a_small_device_pool_evicts_and_reloads_from_the_host_cache() -> None:
    trace = [TraceRequest(i * 2.0, "t", f"a{i % 6}", 20, 3) for i in range(60)]  # round robin over 6 adapters
    pool = 3 * adapter_bytes(64)  # room for three
    r = simulate(trace, workers=[WorkerConfig(device_pool_bytes=pool)], adapter_ranks={f"a{i}": 64 for i in range(6)})
    assert r.completed == 60
    w = r.per_worker["w0"]
    assert w.fetches == 6  # each blob came from the object store once, then stayed in the host cache
    assert w.evictions >= 60 - 6 - 3 and r.host_loads >= 60 - 6 - 3
    assert r.cold_starts == 6


@pytest.mark.parametrize("host_eviction", ["lru", "greedy_dual"])
def test_the_host_cache_drops_by_its_eviction_policy(host_eviction: str) -> None:
    # One worker; its device pool holds the rank-64 adapter or two rank-8 ones, its host cache all but one small
    # one. When s2 comes, the unpinned host blobs are s0 (older) and big: LRU drops s0, GreedyDual big (a byte of
    # it is worth less: its fetch costs less per byte); s0's next call is then cold under LRU only.
    trace = [TraceRequest(10.0 * i, "t", a, 16, 2) for i, a in enumerate(["s0", "big", "s1", "s2", "s0"])]
    small, big = adapter_bytes(8), adapter_bytes(64)
    worker = WorkerConfig(device_pool_bytes=big + small // 2, host_cache_bytes=big + 2 * small + small // 2)
    r = simulate(trace, workers=[worker], adapter_ranks={"s0": 8, "s1": 8, "s2": 8, "big": 64},
                 host_eviction=host_eviction_factory(host_eviction, CostModel()))
    assert r.completed == 5
    assert [c.tier for c in r.calls] == ["object"] * 4 + ["object" if host_eviction == "lru" else "host"]
    with pytest.raises(ValueError, match="unknown eviction policy"):
        host_eviction_factory("fifo", CostModel())


def test_a_worker_that_dies_has_its_calls_rescued() -> None:
    trace = synthetic(200, adapters=5, rate=4.0, seed=4)
    r = simulate(trace, workers=3, failures=[(20.0, "w0")], seed=4)
    assert (r.completed, r.unfinished, r.failed) == (200, 0, {})
    assert r.decisions["worker_gone"] == 1
    w0 = r.per_worker["w0"]
    assert w0.completed < w0.dispatched  # it held calls when it died; others finished them
    assert sum(w.completed for w in r.per_worker.values()) == 200


def test_a_rank_no_worker_holds_fails() -> None:
    trace = [TraceRequest(0.0, "t", "big", 10, 2), TraceRequest(0.1, "t", "small", 10, 2)]
    r = simulate(trace, workers=[WorkerConfig(max_rank=64)], adapter_ranks={"big": 128, "small": 8})
    assert (r.completed, r.failed) == (1, {"adapter_invalid": 1})


def test_duration_cuts_the_trace() -> None:
    trace = synthetic(300, rate=2.0)
    r = simulate(trace, workers=2, duration_s=50.0)
    assert r.requests == sum(1 for row in trace if row.at_s < 50.0) == r.completed


def test_adapter_ranks_do_not_depend_on_the_trace_order() -> None:
    trace = synthetic(100)
    assert adapter_specs(trace, seed=5) == adapter_specs(list(reversed(trace)), seed=5)


def test_percentiles() -> None:
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    assert percentiles([float(i) for i in range(1, 101)]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "mean": 50.5}


# -- sparse events: the same report as one event per heartbeat, tick and step ----------------------------------


def _staging(name: str, trace: list[TraceRequest], seed: int, interval_s: float = 10.0) -> dict[str, Any]:
    predictor, stager = build_staging(name, "auto", interval_s=interval_s, cost=CostModel(), workers=2,
                                      trace=trace, seed=seed)
    return {"predictor": predictor, "stager": stager, "core_config": CoreConfig(staging_interval_s=interval_s)}


@pytest.mark.parametrize("case", ["plain", "failure", "small_pool", "greedy_dual", "ewma", "oracle"])
def test_sparse_heartbeats_and_ticks_give_the_eager_report(case: str) -> None:
    """Heartbeats only after a change, ticks caught up before the next event, runs of decode steps as one
    event: the core sees the same inputs in the same order as with every heartbeat, tick and step an event."""
    trace = synthetic(300, adapters=15, rate=0.5, seed=3)
    trace += [TraceRequest(r.at_s + 3600.0, r.tenant, r.adapter, r.prompt_tokens, r.output_tokens)
              for r in synthetic(150, adapters=15, rate=5.0, seed=4)]  # a silence past the keep-alive, a burst
    kwargs: dict[str, Any] = {"workers": 3, "seed": 3}
    if case == "failure":
        kwargs["failures"] = [(3610.0, "w1")]
    if case == "small_pool":
        kwargs["workers"] = [WorkerConfig(device_pool_bytes=2 * adapter_bytes(64))] * 2
    if case == "greedy_dual":
        kwargs["eviction"] = eviction_factory("greedy_dual", CostModel())
        kwargs["workers"] = [WorkerConfig(device_pool_bytes=3 * adapter_bytes(64))] * 2
    reports = []
    for eager in (True, False):
        if case in ("ewma", "oracle"):
            kwargs.update(_staging(case, trace, seed=3))
        reports.append(simulate(trace, eager=eager, **kwargs))
    eager_report, sparse = reports
    assert sparse.events < eager_report.events / 3
    a, b = eager_report.to_dict(full=True), sparse.to_dict(full=True)
    del a["events"], b["events"]
    assert _close(a, b)
    if case == "failure":
        assert sparse.decisions["worker_gone"] == 1 and sparse.completed == len(trace)
    if case in ("ewma", "oracle"):
        assert sparse.intervals and sum(r.staged_evictions + r.staged_loads for r in sparse.per_worker.values())


def _close(a: Any, b: Any) -> bool:
    """Equal, floats within 1e-9 (a run of steps ends at start + k x step, k steps one by one add up)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


@pytest.mark.parametrize("name", ["ewma", "histogram", "fallback"])
def test_same_seed_same_report_with_a_predictor_and_the_stager(name: str) -> None:
    trace = synthetic(250, adapters=20, rate=0.5, seed=5)
    runs = [simulate(trace, workers=2, seed=5, **_staging(name, trace, seed=5)) for _ in range(2)]
    assert runs[0] == runs[1]  # calls, interval records and fallback switches included
    assert runs[0].intervals and runs[0].calls


def test_a_sparse_trace_on_many_workers_costs_events_per_call() -> None:
    """Two days, 64 workers, 200 calls: idle workers and quiet seconds are no events."""
    rng = random.Random(1)
    trace = sorted((TraceRequest(rng.uniform(0, 2 * 86_400), "", f"a{rng.randrange(50)}", 64, 16)
                    for _ in range(200)), key=lambda r: r.at_s)
    r = simulate(trace, workers=64, seed=1)
    assert r.completed == 200 and r.unfinished == 0
    assert r.events < 40 * 200  # every heartbeat and tick would be 64 x 172,800 + 172,800 events


def test_scale_smoke_thousands_of_adapters_and_64_workers() -> None:
    trace = traces_zipf(4000, adapters=3000, rate=60.0, seed=2)
    r = simulate(trace, workers=64, seed=2, score_from_s=trace[len(trace) // 2].at_s)
    assert (r.completed, r.unfinished) == (4000, 0)
    assert r.scored == sum(1 for c in r.calls if c.arrived >= trace[len(trace) // 2].at_s)
    assert r.cold_starts + r.host_loads + r.device_hits == r.scored
    assert len({c.adapter for c in r.calls}) > 1000
    assert r.events < 30 * 4000


def traces_zipf(n: int, *, adapters: int, rate: float, seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    cum = traces.zipf_cum_weights(adapters, 1.0)
    at, rows = 0.0, []
    for _ in range(n):
        at += rng.expovariate(rate)
        i = min(bisect.bisect(cum, rng.random() * cum[-1]), adapters - 1)
        rows.append(TraceRequest(at, "", f"a{i:05d}", rng.randint(8, 120), rng.randint(1, 24)))
    return rows


# -- staging commands carried out by the workers -------------------------------------------------------------


@dataclass
class ScriptedStager:
    """Stages given per interval start (seconds -> stages), whatever the scores; checks that the workers'
    budgets reach it (through their heartbeats and the core's StageViews)."""

    script: dict[float, list[Stage]]
    device_bytes: int
    host_bytes: int
    asked: list[float] = field(default_factory=list)

    def plan(self, now: float, scores: Mapping[str, float], adapters: Mapping[str, AdapterSpec],
             workers: Sequence[StageView]) -> list[Stage]:
        self.asked.append(now)
        assert [(v.device_bytes, v.host_bytes) for v in workers] == [(self.device_bytes, self.host_bytes)]
        return self.script.get(now, [])


class Silent:
    name = "silent"
    interval_s = 10.0

    def observe(self, end: float, counts: Mapping[str, int]) -> None:
        pass

    def predict(self, now: float, keys: Collection[str]) -> dict[str, float]:
        return dict.fromkeys(keys, 0.0)


def test_fetch_load_and_evict_are_carried_out_within_the_budgets() -> None:
    """One worker whose pool holds two rank-64 adapters. At 10 s, b and c run long calls: a staged load of d
    finds no room and is given up (its blob, fetched first, stays in the host cache), a staged fetch of a lands
    in the host cache. At 20 s, an eviction of c (in use) waits for its call to end. At 60 s, a leaves the
    device and e is loaded ahead of its call."""
    ranks = dict.fromkeys("abcde", 64)
    trace = [TraceRequest(9.0, "", "b", 16, 1500), TraceRequest(9.0, "", "c", 16, 1200),
             TraceRequest(12.0, "", "a", 16, 4), TraceRequest(63.0, "", "e", 16, 4),
             TraceRequest(200.0, "", "c", 16, 4), TraceRequest(300.0, "", "d", 16, 4)]
    v = {name: version for name, (version, _, _) in adapter_specs(trace, fixed=ranks).items()}
    pool, host = 2 * adapter_bytes(64), 5 * adapter_bytes(64)
    stager = ScriptedStager({
        10.0: [Stage("load", v["d"], "w0"), Stage("fetch", v["a"], "w0")],
        20.0: [Stage("evict", v["c"], "w0", to_tier=Tier.host)],
        60.0: [Stage("evict", v["a"], "w0", to_tier=Tier.host), Stage("load", v["e"], "w0")],
    }, pool, host)
    r = simulate(trace, workers=[WorkerConfig(device_pool_bytes=pool, host_cache_bytes=host)], adapter_ranks=ranks,
                 predictor=Silent(), stager=stager, core_config=CoreConfig(staging_interval_s=10.0))
    assert (r.completed, r.unfinished) == (6, 0)
    assert {10.0, 20.0, 60.0} <= set(stager.asked)
    w = r.per_worker["w0"]
    assert (w.stage_dropped, w.staged_fetches, w.staged_loads, w.staged_evictions) == (1, 1, 2, 2)
    assert w.peak_device_bytes <= pool and w.peak_host_bytes <= host
    tiers = {c.adapter: c.tier for c in r.calls if c.arrived < 100}
    assert tiers["a"] == "host"  # fetched ahead of its call
    assert next(c for c in r.calls if c.adapter == "a").load_wait_s > 20  # the pool was full of b and c in use
    assert tiers["e"] == "device"  # loaded ahead of its call
    later = {c.adapter: c.tier for c in r.calls if c.arrived >= 100}
    assert later == {"c": "host", "d": "host"}  # c left the device when its call ended; d's blob stayed
    assert (r.decisions["stage_load"], r.decisions["stage_fetch"], r.decisions["stage_evict"]) == (2, 1, 2)


def test_a_call_waiting_for_room_loads_when_a_staged_load_lands() -> None:
    """A staged load reserves the pool; a call whose load finds no room waits, and its load starts as soon as
    the staged adapter is resident (and may be evicted), not at the next call's end on that worker (40 s)."""
    ranks = dict.fromkeys("ab", 64)
    trace = [TraceRequest(10.0, "", "b", 16, 2), TraceRequest(20.3, "", "b", 16, 2),
             TraceRequest(40.0, "", "a", 16, 2)]
    v = {name: version for name, (version, _, _) in adapter_specs(trace, fixed=ranks).items()}
    pool = adapter_bytes(64)
    cost = CostModel(host_latency_ms=500.0)  # host -> device loads of half a second
    stager = ScriptedStager({10.0: [Stage("fetch", v["a"], "w0")], 20.0: [Stage("load", v["a"], "w0")]},
                            pool, 3 * pool)
    r = simulate(trace, workers=[WorkerConfig(device_pool_bytes=pool, host_cache_bytes=3 * pool)], cost=cost,
                 adapter_ranks=ranks, predictor=Silent(), stager=stager, core_config=CoreConfig(staging_interval_s=10.0))
    assert (r.completed, r.unfinished) == (3, 0)
    second_b = r.calls[1]
    assert second_b.tier == "host"  # the staged load of a evicted it
    assert second_b.arrived + second_b.load_wait_s == pytest.approx(20.0 + 2 * cost.load_s(pool), abs=1e-6)
    assert r.calls[2].tier == "host"  # and b's load then evicted a


# -- calibration and the command line ------------------------------------------------------------------------


def test_cost_model_loads_from_json(tmp_path: Path) -> None:
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"host_latency_ms": 40.0, "host_bytes_per_s": 2.5e8}))
    cost = CostModel.load(path)
    assert (cost.host_latency_ms, cost.host_bytes_per_s, cost.step_fixed_ms) == (40.0, 2.5e8, CostModel().step_fixed_ms)
    assert cost.load_s(adapter_bytes(64)) == pytest.approx(0.040 + adapter_bytes(64) / 2.5e8)
    results = tmp_path / "simulate_x.json"
    results.write_text(json.dumps({"benchmark": "simulate_x", "cost": asdict(cost)}))
    assert CostModel.load(results) == cost  # a results file's "cost"
    assert cost.tier_costs().load_s(1000) == pytest.approx(cost.load_s(1000))
    for bad, message in (({"host_latency": 1}, "unknown cost field"), ({"host_bytes_per_s": 0}, "must be > 0"),
                         ({"prefill_ms_per_token": "fast"}, "finite number"), ([1, 2], "JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            CostModel.load(path)


def test_cli_runs_a_predictor_with_a_cost_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.csv"
    traces.write_trace(trace, synthetic(200, adapters=10, rate=1.0, seed=6))
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"object_latency_ms": 80.0}))
    payload = simulate_main(["--trace", str(trace), "--workers", "2", "--predictor", "ewma", "--interval-s", "20",
                             "--eviction", "greedy_dual", "--device-bytes", str(4 * adapter_bytes(64)),
                             "--score-from", "0.5", "--cost", str(cost), "--results-dir", str(tmp_path)])
    assert payload["completed"] == 200 and 0 < payload["scored"] < 200
    assert payload["cost"]["object_latency_ms"] == 80.0 and payload["worker"]["device_pool_bytes"] == 4 * adapter_bytes(64)
    assert payload["staging"]["intervals"] > 0 and payload["staging"]["precision"] is not None
    assert "calls" not in payload and (tmp_path / "simulate_trace.json").exists()
    out = capsys.readouterr().out
    assert "load wait s" in out and "predictor ewma" in out
    with pytest.raises(SystemExit, match="needs a stager"):
        simulate_main(["--trace", str(trace), "--predictor", "ewma", "--stager", "none"])


# -- the loaders --------------------------------------------------------------------------------------------------

AZURE_ROWS = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,3000,109
2023-11-16 18:15:49.2224670,879,0
2023-11-16 18:16:51.3910170,91,4000
"""

ALIBABA_ROWS = """gmt_create,predict_type,predict_status,exec_time_seconds,groupId,prompt_length,negative_prompt_length,\
num_images_per_prompt,num_inference_steps,checkpoint_model_version_id,num_lora
2024-11-15 16:57:50,TXT_2_IMG,SUCCEED,32.0,G0000,63.0,26.0,1.0,30.0,M0000,0
2024-11-15 18:16:14,TXT_2_IMG,SUCCEED,43.0,G0001,93.0,,1.0,40.0,M0001,0
2024-11-15 16:57:50,IMG_2_IMG,SUCCEED,53.0,G0001,,,8.0,40.0,M0001,0
2024-11-15 18:17:16,IMG_2_IMG,FAILED,53.0,G0002,20000.0,,8.0,40.0,M0000,0
"""


def test_azure_loader(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_ROWS)
    rows = traces.load_azure(path, adapters=10, zipf_s=1.0, seed=0, max_output_tokens=512)
    assert [r.at_s for r in rows] == pytest.approx([0.0, 2.541877, 4.314579, 64.710427])  # sorted, from the first
    assert [(r.prompt_tokens, r.output_tokens) for r in rows] == [
        (374, 44),
        (879, 1),  # 0 generated tokens: still one step
        (2048 - 109, 109),  # the prompt clipped to the context window
        (91, 512),  # the output capped
    ]
    assert all(r.tenant == "azure" and r.adapter.startswith("a") for r in rows)
    assert traces.load_azure(path, adapters=10, seed=0) == rows
    assert len(traces.load_azure(path, limit=2)) == 2
    assert traces.detect_format(path) == "azure"


def test_azure_adapters_follow_zipf_popularity_deterministically(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    lines = [f"2023-11-16 18:{i // 600:02d}:{i // 10 % 60:02d}.{i % 10}000000,100,10" for i in range(3000)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(lines) + "\n")
    rows = traces.load_azure(path, adapters=50, zipf_s=1.0, seed=1)
    assert rows == traces.load_azure(path, adapters=50, zipf_s=1.0, seed=1)
    assert [r.adapter for r in rows] != [r.adapter for r in traces.load_azure(path, adapters=50, zipf_s=1.0, seed=2)]
    counts = {a: sum(1 for r in rows if r.adapter == a) for a in {r.adapter for r in rows}}
    top = max(counts, key=lambda a: counts[a])
    assert top == "a000"
    assert counts["a000"] / len(rows) == pytest.approx(1 / sum(1 / (i + 1) for i in range(50)), abs=0.03)  # 22%
    uniform = traces.load_azure(path, adapters=50, zipf_s=0.0, seed=1)
    assert max(sum(1 for r in uniform if r.adapter == a) for a in {r.adapter for r in uniform}) < counts["a000"] / 2


def test_alibaba_loader(tmp_path: Path) -> None:
    path = tmp_path / "alibaba.csv"
    path.write_text(ALIBABA_ROWS)
    rows = traces.load_alibaba(path, output_tokens=64)
    assert [(r.at_s, r.tenant, r.adapter, r.prompt_tokens, r.output_tokens) for r in rows] == [
        (0.0, "G0000", "M0000", 16, 64),  # 63 characters / 4, rounded up
        (0.0, "G0001", "M0001", 1, 64),  # no prompt: one token; rows of the same second keep the file's order
        (4704.0, "G0001", "M0001", 24, 64),
        (4766.0, "G0002", "M0000", 2048 - 64, 64),  # clipped to the context window
    ]
    sampled = traces.load_alibaba(path, output_tokens=(10, 20, 30), seed=3)
    assert {r.output_tokens for r in sampled} <= {10, 20, 30}
    assert sampled == traces.load_alibaba(path, output_tokens=(10, 20, 30), seed=3)
    assert traces.detect_format(path) == "alibaba"


def test_loaders_reject_other_files(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(traces.TraceError, match="missing column"):
        traces.load_azure(path)
    with pytest.raises(traces.TraceError, match="neither"):
        traces.detect_format(path)
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(traces.TraceError, match=r"bad\.csv:2"):
        traces.load_azure(bad)


def test_loaded_rows_simulate(tmp_path: Path) -> None:
    path = tmp_path / "alibaba.csv"
    path.write_text(ALIBABA_ROWS)
    r = simulate(traces.load_alibaba(path, output_tokens=8), workers=2)
    assert r.completed == 4
    # each checkpoint version is one adapter, whoever calls it: M0001's second call found it loaded
    assert r.cold_starts + r.host_loads + r.device_hits == 4 and r.cold_starts <= 3


# -- the command line ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not AZURE_CONV.exists(), reason=f"the shared Azure trace is not at {AZURE_CONV}")
def test_cli_on_the_head_of_the_azure_trace(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "simulate", "--trace", str(AZURE_CONV), "--limit", "500", "--workers", "3",
         "--adapters", "100", "--zipf", "1.0", "--seed", "0", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for figure in ("requests", "completed", "cold starts", "host loads", "TTFT s p50 / p90 / p99",
                   "latency s p50 / p90 / p99", "decision: cold"):
        assert figure in done.stdout
    payload = json.loads((tmp_path / "simulate_AzureLLMInferenceTrace_conv.json").read_text())
    assert (payload["requests"], payload["completed"], payload["unfinished"]) == (500, 500, 0)
    assert payload["settings"]["workers"] == 3 and payload["cost"] == asdict(CostModel())
    assert sum(w["dispatched"] for w in payload["per_worker"].values()) >= 500
