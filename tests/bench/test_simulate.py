"""The trace simulator and the trace loaders: deterministic, complete, and driving the real core and policies."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import traces
from bench.simulate import (
    LORA_ELEMENTS_PER_RANK,
    CostModel,
    WorkerConfig,
    adapter_bytes,
    adapter_specs,
    percentiles,
    simulate,
)
from bench.traces import TraceRequest
from scheduler.policy import AffinityRouter, PinnedRouter

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
