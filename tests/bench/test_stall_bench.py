"""The stall benchmark's code path on the tiny backbone: structure and bookkeeping, no timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.stall import MODES, LoadWindow, StallSettings, StepLog, analyse, measure, percentile, report
from workers.model import Backbone
from workers.tiny import write_tiny_backbone
from workers.weights import load_backbone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return load_backbone(write_tiny_backbone(tmp_path_factory.mktemp("stall") / "backbone"))


def test_the_benchmark_loads_in_both_modes_while_the_batch_decodes(tiny: Backbone, tmp_path: Path) -> None:
    # long generations: a resubmitted request's prefill step is left out of the figures, so prefills are kept rare
    settings = StallSettings(requests=2, prompt_tokens=4, new_tokens=32, ranks=(4, 8), rounds=2, gap_steps=2,
                             steady_rank=2)
    prompts = torch.randint(0, 200, (2, 4), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "work").mkdir()
    payload = measure(tiny, prompts, settings, workdir=tmp_path / "work")
    path = report(payload, results_dir=tmp_path / "results")

    written = json.loads(path.read_text())
    assert path.name == "stall.json" and written["benchmark"] == "stall" and "machine" in written
    assert written["settings"]["modes"] == list(MODES) == ["engine", "background"]
    assert written["settings"]["requests_finished"] > 0, "the batch decoded and was submitted again"
    assert written["engine_settings"]["adapter_load"] == "background"
    rows = {(r["rank"], r["mode"]): r for r in written["rows"]}
    assert set(rows) == {(rank, mode) for rank in (4, 8) for mode in MODES}
    for r in rows.values():
        assert r["loads"] == settings.rounds and len(r["load_ms"]) == settings.rounds
        assert r["steps"] == len(r["period_ms"])
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["stall_max_ms"] == pytest.approx(r["max_ms"] - written["idle"]["p50_ms"])
        assert r["engine_thread_ms_per_load"] >= 0 and len(r["engine_thread_ms"]) == len(r["delay_ms"]) == r["loads"]
    # which periods a load overlaps is timing (a load that falls within a prefill step overlaps none counted)
    assert sum(r["steps"] for r in rows.values()) >= len(rows), "loads overlapped decode steps"
    assert written["idle"]["steps"] > 0 and written["idle"]["p50_ms"] > 0
    assert [r["rank"] for r in written["ratios"]] == [4, 8]
    assert all(r["max_period_ratio"] > 0 for r in written["ratios"])
    assert written["settings"]["adapter_bytes"] == {"4": 4 * written["settings"]["adapter_bytes"]["8"] // 8,
                                                    "8": written["settings"]["adapter_bytes"]["8"]}


def test_periods_are_sorted_into_loads_idle_and_prefill() -> None:
    """A hand-made clock in whole seconds (exact sums): steps of 10 s, the engine thread busy 50 s between
    steps 4 and 5 during an engine-mode load, step 9 a prefill."""
    log = StepLog()
    t = 0.0
    for i in range(12):
        t += 50 if i == 5 else 0
        log.starts.append(t)
        t += 10
        log.ends.append(t)
        log.prefill.append(i == 9)
    windows = [
        LoadWindow(0, 4, "engine", 0, 5),  # warm-up: not counted, nor any step that ended before 35
        LoadWindow(1, 4, "engine", 35, 95),  # periods 40-50 and 50-110
        LoadWindow(1, 4, "background", 115, 118),  # period 110-120
    ]
    figures = analyse(log, windows, StallSettings(ranks=(4,), rounds=1))
    idle = figures["idle"]  # periods ending at 130, 140, 160, 170 (150 is the prefill)
    assert (idle["steps"], idle["p50_ms"], idle["gap_p50_ms"]) == (4, 10_000, 0)
    engine, background = figures["rows"]
    assert (engine["mode"], engine["steps"], engine["period_ms"]) == ("engine", 2, [10_000, 60_000])
    assert (engine["stall_p50_ms"], engine["stall_max_ms"], engine["engine_thread_ms_per_load"]) == (0, 50_000, 50_000)
    assert engine["delay_ms"] == [50_000]
    assert (background["mode"], background["steps"], background["stall_max_ms"]) == ("background", 1, 0)
    assert background["engine_thread_ms_per_load"] == background["delay_ms_per_load"] == 0
    ratios = figures["ratios"][0]
    assert ratios["stall_max_ratio"] is None and ratios["engine_thread_ratio"] is None  # nothing to divide by
    assert ratios["delay_ratio"] is None
    assert ratios["max_period_ratio"] == 6


def test_percentile_is_nearest_rank() -> None:
    assert [percentile([3.0, 1.0, 2.0, 4.0], q) for q in (25, 50, 99, 100)] == [1.0, 2.0, 4.0, 4.0]
    assert percentile([7.0], 50) == 7.0
