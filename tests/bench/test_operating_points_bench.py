"""The operating-points bench on the tiny backbone: structure and bookkeeping, the search and the choice of the
point as plain data, and the points file it writes; no timings (a modelled clock where a test needs a crossing)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.operating_points import PointsSettings, choose, measure, next_concurrency, points_from, report
from scheduler.operating_points import OperatingPoints
from workers.engine import Engine
from workers.model import Backbone
from workers.tiny import write_tiny_backbone
from workers.weights import load_backbone

SMALL = PointsSettings(classes=(2, 4), mixes=(((2, 0.5), (4, 0.5)),), prompt_tokens=8, new_tokens=4,
                       start_concurrency=1, max_concurrency=4, max_adapters=3, min_calls=3, min_window_s=0.0,
                       max_window_s=5.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return load_backbone(write_tiny_backbone(tmp_path_factory.mktemp("points") / "backbone"))


def prompts(n: int = 6, length: int = 8) -> list[list[int]]:
    return torch.randint(0, 200, (n, length), generator=torch.Generator().manual_seed(0)).tolist()


def test_every_series_is_measured_and_the_points_file_reads_back(tiny: Backbone, tmp_path: Path) -> None:
    settings = replace(SMALL, slo_ttft_s=60.0)  # every level within
    (tmp_path / "work").mkdir()
    payload = measure(tiny, prompts(), settings, workdir=tmp_path / "work")
    path = report(payload, results_dir=tmp_path / "results")

    written = json.loads(path.read_text())
    assert path.name == "operating_points.json" and written["benchmark"] == "operating_points"
    assert path.with_suffix(".md").read_text().startswith("# operating points")
    assert written["settings"]["slo_ttft_s"] == 60.0 and written["settings"]["model"]
    series = {s["name"]: s for s in written["series"]}
    assert list(series) == ["rank 2", "rank 4", "50% r2 + 50% r4"]
    for s in series.values():
        levels = s["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 2, 4], "doubling up to max_concurrency"
        for lv in levels:
            assert lv["calls"] >= 1 and lv["tokens"] > 0 and lv["steps"] >= settings.min_window_steps
            assert lv["tokens_per_s"] == pytest.approx(lv["tokens"] / lv["window_s"])
            assert lv["ttft_p50_s"] <= lv["ttft_p95_s"] <= lv["ttft_max_s"] < 60.0 and lv["within_slo"]
            assert 1 <= lv["adapters_in_flight"] <= min(lv["concurrency"], 2 * settings.max_adapters)
        # the rule: the highest throughput among the levels within the SLO
        assert s["point"] == max(levels, key=lambda lv: lv["tokens_per_s"])
        assert s["slo_met"] and s["capped"] == (s["point"]["concurrency"] == 4)
    assert set(series["rank 2"]["calls_per_class"]) == {"2"}
    mixed = series["50% r2 + 50% r4"]
    assert mixed["shares"] == [[2, 0.5], [4, 0.5]]
    assert all(n > 0 for n in mixed["calls_per_class"].values()) and set(mixed["calls_per_class"]) == {"2", "4"}
    assert mixed["harmonic_tokens_per_s"] == pytest.approx(
        1 / (0.5 / series["rank 2"]["point"]["tokens_per_s"] + 0.5 / series["rank 4"]["point"]["tokens_per_s"]))

    points = OperatingPoints.read(points_from(written).write(tmp_path / "points.json"))
    assert points.slo_ttft_s == 60.0 and points.classes == (2, 4)
    assert points.tokens_per_s(2) == series["rank 2"]["point"]["tokens_per_s"]
    assert points.points[1].concurrency == series["rank 4"]["point"]["concurrency"]
    (mix,) = points.mixes
    assert dict(mix.shares) == {2: 0.5, 4: 0.5} and mix.tokens_per_s == mixed["point"]["tokens_per_s"]
    assert points.mixed_tokens_per_s({2: 1, 4: 1}) == mix.tokens_per_s
    assert "p95 TTFT <= 60.0 s" in points.source and written["measured_on"] in points.source
    assert OperatingPoints.from_dict(written["points"]) == points


class ModelledClock:
    """Seconds that pass only in engine steps: 5 ms and 10 ms per call in the engine (waiting or running)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def stepped(self, step: Callable[[Engine], object]) -> Callable[[Engine], object]:
        def timed(engine: Engine) -> object:
            self.now += 0.005 + 0.01 * (len(engine.batcher.running) + len(engine.batcher.waiting))
            return step(engine)

        return timed


@pytest.mark.parametrize(("slo", "expected"), [(0.11, [1, 2, 4, 8, 10]), (0.08, [1, 2, 4, 7])])
def test_the_search_stops_near_the_crossing_and_the_point_is_the_best_within(
    tiny: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slo: float, expected: list[int]
) -> None:
    """A call waits one step: p95 TTFT = 5 ms + c * 10 ms at c calls in flight. From the SLO of 0.11 s: 1, 2, 4, 8
    (85 ms: 8 * 0.11 / 0.085 = 10.4), 10 (105 ms: 0.11 / 0.105 < near)."""
    clock = ModelledClock()
    monkeypatch.setattr(Engine, "step", clock.stepped(Engine.step))
    settings = replace(SMALL, classes=(4,), mixes=(), slo_ttft_s=slo,
                                 max_concurrency=64, min_calls=4)
    payload = measure(tiny, prompts(), settings, workdir=tmp_path, clock=clock)
    (series,) = payload["series"]
    levels = series["levels"]
    assert [lv["concurrency"] for lv in levels] == expected
    assert [lv["ttft_p95_s"] for lv in levels] == pytest.approx([0.005 + 0.01 * c for c in expected])
    assert series["point"]["concurrency"] == expected[-1] and series["slo_met"] and not series["capped"]
    # closed loop, one token per call and step: tokens/s = c / step, rising with c
    assert [lv["tokens_per_s"] for lv in levels] == pytest.approx([c / (0.005 + 0.01 * c) for c in expected])


def test_a_series_that_misses_the_slo_at_one_call_halves_down_and_keeps_its_lowest_level(
    tiny: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ModelledClock()
    monkeypatch.setattr(Engine, "step", clock.stepped(Engine.step))
    settings = replace(SMALL, classes=(4,), mixes=(), slo_ttft_s=0.005,
                                 start_concurrency=4)
    (series,) = measure(tiny, prompts(), settings, workdir=tmp_path, clock=clock)["series"]
    assert [lv["concurrency"] for lv in series["levels"]] == [4, 2, 1]
    assert not series["slo_met"] and series["point"]["concurrency"] == 1
    assert not any(lv["within_slo"] for lv in series["levels"])


SEARCH = PointsSettings(start_concurrency=4, max_concurrency=64, slo_ttft_s=1.0, near=1.15, refine=2, max_levels=12)


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        ([], 4),
        ([(4, 0.3)], 8),  # at most doubling
        ([(4, 0.3), (8, 0.6)], 13),  # 8 * 1.0 / 0.6
        ([(4, 0.3), (8, 0.6), (13, 0.9)], None),  # 1.0 / 0.9 < near: close enough
        ([(4, 0.0)], 8),  # no TTFT at all: doubling
        ([(4, 0.3), (8, 0.6), (16, 1.5)], 12),  # over: bisect
        ([(4, 0.3), (8, 0.6), (16, 1.5), (12, 0.9)], 14),
        ([(4, 0.3), (8, 0.6), (16, 1.5), (12, 0.9), (14, 1.1)], None),  # refine used up
        ([(4, 0.3), (8, 0.6), (16, 1.5), (12, 1.2)], 10),
        ([(4, 0.3), (8, 0.9), (9, 1.1)], None),  # the bracket is within near
        ([(4, 2.0)], 2),  # nothing within: halve down
        ([(4, 2.0), (2, 1.5)], 1),
        ([(4, 2.0), (2, 1.5), (1, 1.2)], None),
        ([(4, 0.1), (8, 0.1), (16, 0.1), (32, 0.1)], 64),
        ([(4, 0.1), (8, 0.1), (16, 0.1), (32, 0.1), (64, 0.1)], None),  # max_concurrency
    ],
)
def test_next_concurrency(levels: list[tuple[int, float]], expected: int | None) -> None:
    assert next_concurrency(levels, SEARCH) == expected


def test_next_concurrency_stops_after_max_levels() -> None:
    capped = replace(SEARCH, max_levels=2)
    assert next_concurrency([(4, 0.1)], capped) == 8
    assert next_concurrency([(4, 0.1), (8, 0.2)], capped) is None


def test_choose_takes_the_highest_throughput_within_the_slo() -> None:
    levels = [{"concurrency": 8, "tokens_per_s": 50.0, "ttft_p95_s": 0.4},
              {"concurrency": 16, "tokens_per_s": 90.0, "ttft_p95_s": 0.7},
              {"concurrency": 24, "tokens_per_s": 85.0, "ttft_p95_s": 0.95},  # within, but less throughput
              {"concurrency": 32, "tokens_per_s": 120.0, "ttft_p95_s": 1.3}]
    assert choose(levels, 1.0) == levels[1]
    assert choose(levels, 2.0) == levels[3]
    assert choose(levels, 0.3) is None


def test_settings_refuse_what_cannot_be_measured() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PointsSettings(classes=())
    with pytest.raises(ValueError, match="new_tokens"):
        PointsSettings(new_tokens=1)
    with pytest.raises(ValueError, match="share > 0"):
        PointsSettings(mixes=(((8, 0.0),),))
    with pytest.raises(ValueError, match="slo_ttft_s"):
        PointsSettings(slo_ttft_s=0)
