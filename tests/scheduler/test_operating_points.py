"""Operating points as plain data (scheduler.operating_points): rank classes, loads, mixes, and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.operating_points import DEFAULT_PATH, MixPoint, OperatingPoint, OperatingPoints, from_lists

# One worker: 1,000 decode tokens/s of rank-8 adapters at the SLO, 600 of rank 32, 250 of rank 128.
POINTS = from_lists(1.0, (32, 8, 128), (600.0, 1000.0, 250.0), source="made up")


def test_points_are_sorted_by_rank_and_a_rank_takes_the_smallest_class_that_holds_it() -> None:
    assert POINTS.classes == (8, 32, 128)
    assert [POINTS.rank_class(r) for r in (0, 1, 8, 9, 32, 33, 128, 129, 1024)] == [8, 8, 8, 32, 32, 128, 128, 128,
                                                                                     128]
    assert [POINTS.tokens_per_s(r) for r in (4, 8, 16, 32, 64, 128)] == [1000.0, 1000.0, 600.0, 600.0, 250.0, 250.0]


def test_a_rank_above_the_largest_class_is_scaled_down_by_the_rank_ratio() -> None:
    assert POINTS.tokens_per_s(256) == pytest.approx(125.0)
    assert POINTS.tokens_per_s(512) == pytest.approx(62.5)
    assert POINTS.load(256, 125.0) == pytest.approx(1.0)


def test_load_is_the_fraction_of_one_worker_a_demand_needs() -> None:
    assert POINTS.load(8, 500.0) == pytest.approx(0.5)
    assert POINTS.load(20, 600.0) == pytest.approx(1.0)  # rank 20 costs like rank 32
    assert POINTS.load(128, 500.0) == pytest.approx(2.0)
    assert POINTS.load(8, -3.0) == 0.0  # no negative load


def test_a_mix_without_a_measured_one_costs_each_token_at_its_own_class() -> None:
    # half the tokens at 1000/s and half at 250/s: 1 / (0.5/1000 + 0.5/250) = 400
    assert POINTS.mixed_tokens_per_s({8: 1.0, 128: 1.0}) == pytest.approx(400.0)
    assert POINTS.mixed_tokens_per_s({4: 3.0, 8: 1.0}) == pytest.approx(1000.0)  # one class: its own point
    assert POINTS.mixed_tokens_per_s({8: 0.9, 100: 0.1, 64: 0.0}) == pytest.approx(1 / (0.9 / 1000 + 0.1 / 250))
    with pytest.raises(ValueError, match="positive share"):
        POINTS.mixed_tokens_per_s({8: 0.0})


def test_a_measured_mix_of_the_same_classes_wins_the_nearest_shares() -> None:
    mixes = (MixPoint({8: 0.9, 128: 0.1}, 900.0), MixPoint({8: 0.5, 128: 0.5}, 450.0),
             MixPoint({8: 0.5, 32: 0.5}, 777.0))
    points = OperatingPoints(1.0, POINTS.points, mixes)
    assert points.mixed_tokens_per_s({8: 0.8, 128: 0.2}) == 900.0
    assert points.mixed_tokens_per_s({8: 40, 128: 60}) == 450.0  # shares are normalised
    assert points.mixed_tokens_per_s({4: 1, 32: 1}) == 777.0  # ranks fold into their classes first
    # no measured mix of these classes: the harmonic estimate
    assert points.mixed_tokens_per_s({32: 1, 128: 1}) == pytest.approx(1 / (0.5 / 600 + 0.5 / 250))


def test_the_file_round_trips(tmp_path: Path) -> None:
    points = OperatingPoints(0.5, (OperatingPoint(8, 100.0, 32, 0.41), OperatingPoint(128, 60.0, 16, 0.47)),
                             (MixPoint({8: 0.9, 128: 0.1}, 90.0, 24, 0.45),), "a bench run")
    path = points.write(tmp_path / "points.json")
    assert OperatingPoints.read(path) == points
    data = json.loads(path.read_text())
    assert data["mixes"][0]["shares"] == {"8": 0.9, "128": 0.1}
    # mixes and the per-point details are optional
    (tmp_path / "bare.json").write_text(json.dumps({"slo_ttft_s": 1, "points": [{"rank": 16, "tokens_per_s": 5}]}))
    bare = OperatingPoints.read(tmp_path / "bare.json")
    assert bare.classes == (16,) and bare.mixes == () and bare.source == ""


def test_the_committed_points_file_reads() -> None:
    points = OperatingPoints.read(DEFAULT_PATH)
    assert points.classes == (8, 16, 32, 64, 128) and points.source
    assert all(p.tokens_per_s > 0 and p.ttft_p95_s <= points.slo_ttft_s for p in points.points)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "operating points are a JSON object"),
        ('{"points": [{"rank": 8, "tokens_per_s": 1}]}', "not an operating points object.*slo_ttft_s"),
        ('{"slo_ttft_s": 1, "points": [{"rank": 8}]}', "not an operating points object.*tokens_per_s"),
        ('{"slo_ttft_s": 1, "points": []}', "at least one rank class"),
        ('{"slo_ttft_s": 0, "points": [{"rank": 8, "tokens_per_s": 1}]}', "slo_ttft_s must be > 0"),
        ('{"slo_ttft_s": 1, "points": [{"rank": 8, "tokens_per_s": 0}]}', "rank 8: tokens_per_s must be > 0"),
        ('{"slo_ttft_s": 1, "points": [{"rank": 0, "tokens_per_s": 1}]}', "rank must be >= 1"),
        ('{"slo_ttft_s": 1, "points": [{"rank": 8, "tokens_per_s": 1}, {"rank": 8, "tokens_per_s": 2}]}',
         "rank classes repeat"),
    ],
)
def test_a_bad_file_gives_a_clear_error_naming_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "points.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        OperatingPoints.read(path)
    assert str(path) in str(e.value)


def test_a_missing_file_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a readable JSON file"):
        OperatingPoints.read(tmp_path / "nope.json")
