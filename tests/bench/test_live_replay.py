"""bench.live_replay's pure parts: the slice, the scaled settings, the budgets, the calibration and the comparison."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from bench import live_replay as lr
from bench.simulate import CostModel, adapter_bytes
from bench.traces import TraceRequest, load_trace


def rows(*at: float, key: str = "a") -> list[TraceRequest]:
    return [TraceRequest(t, "", key, 10, 100) for t in at]


def test_staging_is_scaled_to_the_speed_with_an_interval_of_at_least_a_second() -> None:
    assert lr.scaled_staging(1) == (60.0, 1800.0)
    assert lr.scaled_staging(30) == (2.0, 60.0)
    assert lr.scaled_staging(120) == (1.0, 15.0)
    with pytest.raises(ValueError, match="speed"):
        lr.scaled_staging(0)


def test_a_slice_starts_at_zero_and_compresses_with_capped_outputs(tmp_path: Path) -> None:
    trace = rows(0, 3000, 3700, 7300, 7400)
    got = lr.slice_rows(trace, 0.5, 1)  # trace seconds [1800, 5400)
    assert [r.at_s for r in got] == [0.0, 700.0]
    compressed = lr.sim_rows(got, 70, 16)
    assert [(r.at_s, r.output_tokens) for r in compressed] == [(0.0, 16), (10.0, 16)]
    path = tmp_path / "slice.csv"
    lr.write_canonical(got, path)
    assert [(r.at_s, r.key, r.prompt_tokens, r.output_tokens) for r in load_trace(path)] == [
        (0.0, "a", 10, 100), (700.0, "a", 10, 100)]
    with pytest.raises(ValueError, match="no requests"):
        lr.slice_rows(trace, 10, 1)


def test_budgets_hold_a_fraction_and_the_largest_adapter_in_both_byte_units() -> None:
    b = lr.budgets([8, 8, 64], pool_per_rank=100, blob_per_rank=200, device_fraction=0.25, host_fraction=0.5)
    assert (b.adapters_pool_bytes, b.adapters_blob_bytes) == (8000, 16000)
    assert b.device_bytes == 6400  # the rank-64 adapter, more than a quarter of 8000
    assert b.host_bytes == 12800  # also the largest, more than half of 16000
    assert b.sim_device_bytes == adapter_bytes(64)  # the same adapters fit in the simulator's bytes
    assert b.sim_host_bytes == adapter_bytes(64)
    b = lr.budgets([8] * 20, pool_per_rank=100, blob_per_rank=200, device_fraction=0.25, host_fraction=0.5)
    assert b.device_bytes == 4000 and b.sim_device_bytes == 5 * adapter_bytes(8)
    with pytest.raises(ValueError, match="fraction"):
        lr.budgets([8], pool_per_rank=1, blob_per_rank=1, device_fraction=0, host_fraction=0.5)


def call(tier: str, rank: int, load_ms: float | None = None, ttft: float = 50.0, latency: float = 200.0,
         tokens: int = 16, status: str = "ok", sent: float = 0.0) -> dict[str, object]:
    return {"status": status, "tier": tier, "rank": rank, "load_ms": load_ms, "ttft_ms": ttft,
            "latency_ms": latency, "completion_tokens": tokens, "prompt_tokens": 10, "sent_ms": sent}


def test_calls_in_flight_are_averaged_over_a_window() -> None:
    spans = [(0.0, 10.0), (5.0, 15.0), (20.0, 30.0)]
    assert lr.in_flight(spans, 0, 10) == pytest.approx(1.5)
    assert lr.in_flight(spans, 5, 5) == 2.0
    assert lr.in_flight(spans, 16, 19) == 0.0


def test_calibration_fits_the_step_prefill_and_a_load_line_per_tier() -> None:
    per_rank = adapter_bytes(1)
    # alone, 10 ms between tokens; two at a time (the same span), 14 ms: a step of 6 ms + 4 ms per call
    calls = [call("device", 8, ttft=30, latency=30 + 15 * 10, sent=1000 * i) for i in range(3)]
    calls += [call("device", 8, ttft=30, latency=30 + 15 * 14, sent=5000) for _ in range(2)]
    calls += [call("host", 8, 120 + 8 * 2, sent=10_000), call("host", 64, 120 + 64 * 2, sent=11_000)]
    calls += [call("object", 8, 120 + 8 * 2 + 300 + 8 * 5, sent=12_000),
              call("object", 64, 120 + 64 * 2 + 300 + 64 * 5, sent=13_000)]
    calls += [call("device", 8, ttft=9999, status="http_503:overloaded", sent=14_000)]  # failed: not in the fit
    fitted, how = lr.calibrate(calls)
    assert fitted["step_fixed_ms"] == pytest.approx(6)
    assert fitted["decode_ms_per_seq"] == pytest.approx(4)
    assert fitted["prefill_ms_per_token"] == pytest.approx((30 - 1.5 * 10) / 10)  # the median: alone
    assert fitted["host_latency_ms"] == pytest.approx(120)
    assert fitted["host_bytes_per_s"] == pytest.approx(1000 * per_rank / 2)
    assert fitted["object_latency_ms"] == pytest.approx(300)
    assert fitted["object_bytes_per_s"] == pytest.approx(1000 * per_rank / 5)
    assert (how["device_hits"], how["host_loads"], how["cold_starts"]) == (5, 2, 2)
    cost = CostModel(**(asdict(CostModel()) | fitted))
    assert cost.load_s(adapter_bytes(64)) * 1000 == pytest.approx(120 + 64 * 2)
    note = lr.calibration_note(fitted, how, cost)
    assert "step 6.0 ms + 4.0 ms per call decoding" in note
    assert "host -> device 120 ms + 2.00 ms per rank (2 host loads)" in note
    assert "object -> host 300 ms + 5.00 ms per rank (the 2 cold starts' load times less the host line)" in note


def test_calibration_keeps_the_defaults_of_a_tier_it_did_not_see_and_never_fits_a_negative_slope() -> None:
    fitted, _ = lr.calibrate([call("object", 8, 500), call("object", 64, 400)])
    assert "host_latency_ms" not in fitted and "step_fixed_ms" not in fitted
    assert fitted["object_bytes_per_s"] == lr.NO_BYTE_COST  # no per-byte cost: a flat line at the mean
    base = CostModel()
    mean_host = base.host_latency_ms + 36 * 1000 * adapter_bytes(1) / base.host_bytes_per_s
    assert fitted["object_latency_ms"] == pytest.approx(450 - mean_host)
    assert lr._line([(1, -5.0), (2, -1.0), (3, -2.0)]) == (0.0, 0.0)  # below the origin: flat at 0


def test_the_comparison_gives_ratios_and_the_verdict_per_figure() -> None:
    live = {"none": {"cold_starts": 40, "host_loads": 10, "device_hits": 350, "ttft_mean_ms": 200.0},
            "ewma": {"cold_starts": 20, "host_loads": 0, "device_hits": 380, "ttft_mean_ms": 150.0}}
    simulated = {"none": {"cold_starts": 45, "host_loads": 12, "device_hits": 343, "ttft_mean_ms": 240.0},
                 "ewma": {"cold_starts": 23, "host_loads": 0, "device_hits": 377, "ttft_mean_ms": 160.0},
                 "fallback": {"cold_starts": 30, "host_loads": 0, "device_hits": 370, "ttft_mean_ms": 170.0}}
    table = {(r.policy, r.figure): r for r in lr.compare(live, simulated)}
    assert len(table) == 8
    assert table["none", "cold_starts"].ratio == pytest.approx(1.125) and table["none", "cold_starts"].within
    assert table["none", "ttft_mean_ms"].ratio == pytest.approx(1.2) and not table["none", "ttft_mean_ms"].within
    assert table["ewma", "cold_starts"].ratio == pytest.approx(1.15) and table["ewma", "cold_starts"].within
    assert table["ewma", "host_loads"].ratio == 1.0  # 0 of 0
    live["ewma"]["host_loads"] = 0
    simulated["ewma"]["host_loads"] = 3
    missed = {(r.policy, r.figure): r for r in lr.compare(live, simulated)}["ewma", "host_loads"]
    assert missed.ratio is None and missed.within is False  # 3 of 0: no ratio, and a miss
    assert table["none", "cold_starts"].target and not table["none", "host_loads"].target
    assert lr.direction(live, "ewma")["cold_starts"] == pytest.approx(0.5)
    assert lr.ratio(3, 0) is None and lr.ratio(None, 2) is None
    with pytest.raises(ValueError, match="no simulated figures"):
        lr.compare({"lstm": live["none"]}, simulated)


def test_the_page_says_the_figures_and_the_misses() -> None:
    live = {"none": {"cold_starts": 40, "host_loads": 10, "device_hits": 350, "ttft_mean_ms": 200.0, "calls": 400,
                     "failed": 0},
            "ewma": {"cold_starts": 20, "host_loads": 0, "device_hits": 380, "ttft_mean_ms": 150.0, "calls": 400,
                     "failed": 1}}
    simulated = {"none": {"cold_starts": 45, "host_loads": 12, "device_hits": 343, "ttft_mean_ms": 240.0},
                 "ewma": {"cold_starts": 23, "host_loads": 0, "device_hits": 377, "ttft_mean_ms": 160.0}}
    b = lr.budgets([8, 64], pool_per_rank=100, blob_per_rank=200, device_fraction=0.25, host_fraction=0.5)
    result = {
        "measured_at": "2026-01-01 00:00 UTC", "wall_s": 600.0, "tolerance": 0.15, "policy": "ewma",
        "setup": {"trace": "t.csv", "start_h": 1, "hours": 4, "calls": 400, "adapters": 2, "ranks": "1 x 8, 1 x 64",
                  "speed": 60, "replay_s": 240, "max_tokens_cap": 16, "backbone": "b", "workers": 1, "interval_s": 1,
                  "keep_alive_s": 30},
        "budgets": asdict(b), "choice": {"how": "chosen", "simulated": {"ewma": simulated["ewma"]}},
        "live": live, "simulated": simulated, "rows": [asdict(r) for r in lr.compare(live, simulated)],
        "live_statuses": {"none": "ok 400", "ewma": "ok 399, timeout 1"}, "cost_file": "bench/costs/x.json",
        "calibration_note": "fitted.",
    }
    page = lr.markdown(result)
    assert "(3 of 4 targets within 15%)" in page
    assert "| none | mean TTFT ms (target) | 200.0 | 240.0 | 1.20 | **no** |" in page
    assert "| cold starts | 40 | 20 | 0.50 | 45 | 23 | 0.51 |" in page
    assert "Live ewma: 400 calls, 1 failed (ok 399, timeout 1)." in page
