"""Demand predictors and the health monitor: pure logic, small series with known answers."""

from __future__ import annotations

import math

import pytest

from scheduler.predict import (
    NEGLIGIBLE,
    Ewma,
    FallbackPredictor,
    HybridHistogram,
    LastValue,
    Oracle,
    Switch,
    build_predictor,
)

IV = 60.0  # interval, seconds


def feed(p, series: list[dict[str, int]], start: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Observes `series[j]` as the interval ending at (start + j + 1) x IV."""
    for j, counts in enumerate(series):
        p.observe((start + j + 1) * IV, counts)


def test_last_value_is_poisson_in_the_last_count() -> None:
    p = LastValue(IV)
    feed(p, [{"a": 1, "b": 2, "c": 0}])
    assert p.predict(IV, ["a", "b", "c", "never"]) == {
        "a": pytest.approx(1 - math.exp(-1)), "b": pytest.approx(1 - math.exp(-2)), "c": 0.0, "never": 0.0}
    p.observe(2 * IV, {})
    assert p.predict(2 * IV, ["a", "b"]) == {"a": 0.0, "b": 0.0}  # only the last interval counts


def test_ewma_by_hand() -> None:
    p = Ewma(IV, alpha=0.5)
    feed(p, [{"a": 2}, {}, {"a": 1, "b": 4}])
    # a: 0.5*2 = 1.0; idle: 0.5; then 0.5*1 + 0.5*0.5 = 0.75. b: 0.5*4 = 2.0
    assert p.rates().tolist() == [0.75, 2.0]
    assert p.predict(3 * IV, ["a", "b", "z"]) == {
        "a": pytest.approx(1 - math.exp(-0.75)), "b": pytest.approx(1 - math.exp(-2.0)), "z": 0.0}
    feed(p, [{}, {}], start=3)  # decay applied lazily: a = 0.75 / 4, b = 2 / 4
    assert p.predict(5 * IV, ["a", "b"]) == {
        "a": pytest.approx(1 - math.exp(-0.1875)), "b": pytest.approx(1 - math.exp(-0.5))}


def test_ewma_forgets_a_key_idle_for_long() -> None:
    p = Ewma(IV, alpha=0.5)
    feed(p, [{"a": 1}] + [{}] * 20)  # 0.5 * 0.5**20 < 1e-6
    assert NEGLIGIBLE > 0.5 * 0.5**20
    assert p.predict(21 * IV, ["a"]) == {"a": 0.0}


def test_a_skipped_boundary_counts_as_empty_intervals() -> None:
    p = Ewma(IV, alpha=0.5)
    p.observe(IV, {"a": 4})
    p.observe(4 * IV, {})  # intervals 2 and 3 were never reported: 4 * 0.5 * 0.5**3
    assert p.rates().tolist() == [0.25]


@pytest.mark.parametrize(
    ("predictor", "ends", "counts", "message"),
    [
        (LastValue(IV), [IV, IV], {}, "not after"),
        (Ewma(IV), [IV, 0.5 * IV], {}, "not after"),
        (Ewma(IV), [IV], {"a": -1}, "non-negative integer"),
        (HybridHistogram(IV), [IV], {"a": 1.5}, "non-negative integer"),
        (Ewma(IV), [math.nan], {}, "finite"),
    ],
)
def test_bad_input_is_refused(predictor, ends, counts, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        for end in ends:
            predictor.observe(end, counts)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Ewma(0.0), "interval_s"),
        (lambda: Ewma(IV, alpha=0.0), "alpha"),
        (lambda: HybridHistogram(IV, bin_s=60.0, range_s=30.0), "bin_s"),
        (lambda: HybridHistogram(IV, min_idle_times=0), "min_idle_times"),
        (lambda: FallbackPredictor([]), "at least one"),
        (lambda: FallbackPredictor([Ewma(IV), Ewma(IV)]), "distinct names"),
        (lambda: FallbackPredictor([Ewma(IV), LastValue(2 * IV)]), "one interval"),
        (lambda: build_predictor("arima", IV), "unknown predictor"),
        (lambda: build_predictor("oracle", IV), "arrivals"),
        (lambda: build_predictor("fallback", IV, chain=["ewma", "fallback"]), "another fallback"),
        (lambda: build_predictor("fallback", IV, chain=["ewma"], members={"lstm": {}}), "not in the chain"),
    ],
)
def test_bad_settings_are_refused(build, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        build()


# -- hybrid histogram ----------------------------------------------------------------------------------------


def periodic(period: int, intervals: int, key: str = "a") -> list[dict[str, int]]:
    """`key` called once in intervals 0, period, 2 x period, ..."""
    return [{key: 1} if j % period == 0 else {} for j in range(intervals)]


def test_histogram_of_a_periodic_key_prewarms_just_before_each_call() -> None:
    p = HybridHistogram(IV, bin_s=60.0, range_s=4 * 3600.0, min_idle_times=5)
    series = periodic(5, 60)
    for j, counts in enumerate(series):
        now = (j + 1) * IV
        p.observe(now, counts)
        pa = p.predict(now, ["a"])["a"]
        idle_times = j // 5  # gaps seen so far
        if idle_times < 5:
            assert p.windows("a") == (0.0, 4 * 3600.0, "range"), j  # too few idle times: keep alive
            assert pa == 1.0, j
        else:
            # every idle time is 300 s, bin [300, 360): pre-warm 300 x 0.9, keep-alive 360 x 1.1
            assert p.windows("a") == (pytest.approx(270.0), pytest.approx(396.0), "histogram")
            assert pa == (1.0 if (j + 1) % 5 == 0 else 0.0), j  # exactly the interval before each call


def test_histogram_keeps_alive_after_a_missed_call_until_the_tail() -> None:
    p = HybridHistogram(IV, min_idle_times=5)
    feed(p, periodic(5, 26))  # calls at 0, 5, ..., 25: windows fitted, last call ends at 26 x IV
    last = 26 * IV
    feed(p, [{}] * 8, start=26)  # the call due at interval 30 does not come
    got = [p.predict(last + k * IV, ["a"])["a"] for k in range(8)]
    # (now, now + 60] meets [last + 270, last + 396] for now = last + 240, + 300, + 360
    assert got == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_histogram_without_a_pattern_keeps_alive_for_the_range() -> None:
    p = HybridHistogram(IV, bin_s=60.0, range_s=3600.0, min_idle_times=5)
    series: list[dict[str, int]] = []
    for gap in range(1, 31):  # 30 idle times, one in each of 30 bins of 60: CV = sqrt(60/30 - 1) = 1 < 2
        series += [{"a": 1}] + [{}] * (gap - 1)
    series.append({"a": 1})
    feed(p, series)
    assert p.windows("a") == (0.0, 3600.0, "range")
    now = len(series) * IV
    p.observe(now + 30 * IV, {})
    assert p.predict(now + 30 * IV, ["a"])["a"] == 1.0  # still inside the hour after its last call
    p.observe(now + 60 * IV, {})
    assert p.predict(now + 60 * IV, ["a"])["a"] == 0.0


def test_histogram_out_of_bounds_idle_times_fall_back_to_a_forecast() -> None:
    p = HybridHistogram(IV, bin_s=60.0, range_s=600.0, min_idle_times=3, forecast_margin=0.15)
    feed(p, periodic(20, 61))  # idle times of 1200 s, all beyond the 600 s range
    assert p.windows("a") == (pytest.approx(1020.0), pytest.approx(1380.0), "forecast")
    last = 61 * IV  # the end of interval 60, the last call's
    feed(p, [{}] * 20, start=61)
    at = {k: p.predict(last + k * IV, ["a"])["a"] for k in (0, 15, 16, 19, 22, 23)}
    assert at == {0: 0.0, 15: 0.0, 16: 1.0, 19: 1.0, 22: 1.0, 23: 0.0}


def test_histogram_mixed_idle_times_use_the_histogram_when_at_most_half_are_out_of_bounds() -> None:
    p = HybridHistogram(IV, bin_s=60.0, range_s=600.0, min_idle_times=4)
    # gaps: 2, 20, 2, 20, 2 intervals -> 3 in range (120 s), 2 out (1200 s): 2/5 out of bounds
    series = [{"a": 1}, {}, {"a": 1}] + [{}] * 19 + [{"a": 1}, {}, {"a": 1}] + [{}] * 19 + [{"a": 1}, {}, {"a": 1}]
    feed(p, series)
    # in-range idle times all in bin [120, 180): pre-warm 108, keep-alive 198
    assert p.windows("a") == (pytest.approx(108.0), pytest.approx(198.0), "histogram")
    feed(p, [{}] * 19 + [{"a": 1}], start=len(series))  # a third out-of-bounds gap: 3 of 6, still not more than half
    assert p.windows("a")[2] == "histogram"
    feed(p, [{}] * 19 + [{"a": 1}], start=len(series) + 20)  # 4 of 7 out of bounds
    assert p.windows("a")[2] == "forecast"


def test_histogram_answers_unseen_keys_with_the_floor() -> None:
    p = HybridHistogram(IV, floor=0.01)
    feed(p, [{"a": 1}])
    assert p.windows("b") == (0.0, 0.0, "unseen")
    assert p.predict(IV, ["a", "b"]) == {"a": 1.0, "b": 0.01}


def test_histogram_bins_scale_with_a_compressed_replay() -> None:
    # the periodic key of the first test, 60x faster: intervals of 1 s, bins of 1 s, range 4 minutes
    p = HybridHistogram(1.0, bin_s=1.0, range_s=240.0, min_idle_times=5)
    for j, counts in enumerate(periodic(5, 36)):  # the last call in interval 35, which ends at 36 s
        p.observe(j + 1.0, counts)
    assert p.windows("a") == (pytest.approx(4.5), pytest.approx(6.6), "histogram")
    got = []
    for now in (36.0, 37.0, 38.0, 39.0, 40.0):
        if now > 36.0:
            p.observe(now, {})
        got.append(p.predict(now, ["a"])["a"])
    assert got == [0.0, 0.0, 0.0, 0.0, 1.0]  # only (40, 41], the interval of the call due, meets [40.5, 42.6]


# -- oracle --------------------------------------------------------------------------------------------------


def test_oracle_knows_the_next_interval() -> None:
    arrivals = [(130.0, "b"), (60.0, "a"), (120.0, "a"), (61.0, "c")]
    p = Oracle(arrivals, IV)
    # (60, 120] holds c at 61 and a at 120; a at 60 belongs to the interval before
    assert p.predict(60.0, ["a", "b", "c", "d"]) == {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    assert p.predict(120.0, ["a", "b", "c"]) == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert p.predict(0.0, ["a"]) == {"a": 1.0}


# -- health monitor ------------------------------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(10)]


def steady(t: int) -> dict[str, int]:
    """The same three keys every interval: what was called last interval is called again."""
    return {"k0": 1, "k1": 2, "k2": 1}


def rotating(t: int) -> dict[str, int]:
    """Two of k3..k8 each interval, never those of the interval before nor steady's: last value is always
    wrong."""
    return {KEYS[3 + 2 * (t % 3)]: 1, KEYS[4 + 2 * (t % 3)]: 1}


def drive(p: FallbackPredictor, pattern, first: int, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Observes `count` intervals from interval `first`, predicting after each; the active member after each."""
    active = []
    for t in range(first, first + count):
        p.observe((t + 1) * IV, pattern(t))
        p.predict((t + 1) * IV, KEYS)
        active.append(p.active)
    return active


def test_fallback_switches_away_from_a_failing_member_and_back_when_it_recovers() -> None:
    arrivals = [((t + 0.5) * IV, k) for t in range(60) for k in (steady(t) if t < 10 or t >= 25 else rotating(t))]
    p = FallbackPredictor([LastValue(IV), Oracle(arrivals, IV)], threshold=0.5, patience=3, recover=4, cutoff=0.5)
    assert p.name == "fallback(last_value>oracle)" and p.active == "last_value"
    assert drive(p, steady, 0, 10) == ["last_value"] * 10
    assert p.health()["last_value"].precision == 1.0 and p.health()["last_value"].recall == 1.0

    # unpredictable: last value predicts last interval's keys, none of them come again
    active = drive(p, rotating, 10, 15)
    assert active[:2] == ["last_value"] * 2 and active[2:] == ["oracle"] * 13  # after 3 intervals below 0.5
    h = p.health()
    assert h["last_value"].precision == 0.0 and not h["last_value"].healthy and h["last_value"].below == 15
    assert h["oracle"].precision == 1.0 and h["oracle"].healthy
    (switch,) = p.take_switches()
    assert switch == Switch(at=13 * IV, from_="last_value", to="oracle", reason=switch.reason)
    assert "last_value precision below 0.5 for 3 intervals (last 0.00)" in switch.reason

    # the good pattern resumes: the first interval still scores the rotating prediction, then 4 at 1.0
    active = drive(p, steady, 25, 8)
    assert active == ["oracle"] * 4 + ["last_value"] * 4
    (back,) = p.take_switches()
    assert (back.at, back.from_, back.to) == (30 * IV, "oracle", "last_value")
    assert "last_value precision at or above 0.5 for 4 intervals" in back.reason
    assert p.take_switches() == [] and len(p.switches) == 2  # drained, the record stays


def test_fallback_idle_intervals_and_empty_predictions_count_neither_way() -> None:
    p = FallbackPredictor([LastValue(IV), Ewma(IV)], threshold=0.5, patience=2, recover=2)
    drive(p, rotating, 0, 2)  # interval 1 scores the rotating guess of interval 0: one failure
    assert p.health()["last_value"].below == 1
    drive(p, lambda t: {}, 2, 5)  # idle: the first scores a failure, then nothing predicted, nothing called
    h = p.health()["last_value"]
    assert (h.precision, h.recall, h.healthy) == (None, None, False) and h.below == 2
    assert p.active == "ewma"


def test_fallback_with_no_healthy_member_answers_with_the_last() -> None:
    p = FallbackPredictor([LastValue(IV), Ewma(IV, alpha=1.0)], threshold=0.5, patience=2, recover=2)
    assert drive(p, rotating, 0, 8)[-1] == "ewma"
    assert not any(h.healthy for h in p.health().values())
    (switch,) = p.take_switches()
    assert switch.to == "ewma" and "no member is healthy" in switch.reason


def test_fallback_answers_with_the_active_member_and_scores_every_member() -> None:
    p = FallbackPredictor([LastValue(IV), Ewma(IV, alpha=0.5)])
    p.observe(IV, {"a": 2})
    assert p.predict(IV, ["a", "b"]) == LastValue_after({"a": 2}, ["a", "b"])
    p.observe(2 * IV, {"a": 1})
    h = p.health()
    # last value predicted a (0.86), Ewma's rate 1.0 gives 0.63: both said a, a came
    assert (h["last_value"].precision, h["ewma"].precision) == (1.0, 1.0)


def LastValue_after(counts: dict[str, int], keys: list[str]) -> dict[str, float]:
    lv = LastValue(IV)
    lv.observe(IV, counts)
    return lv.predict(IV, keys)


# -- by name -------------------------------------------------------------------------------------------------


def test_build_predictor_by_name() -> None:
    assert isinstance(build_predictor("last_value", IV), LastValue)
    ewma = build_predictor("ewma", IV, alpha=0.2)
    assert isinstance(ewma, Ewma) and ewma.alpha == 0.2
    hist = build_predictor("histogram", 1.0, bin_s=1.0, range_s=240.0)
    assert isinstance(hist, HybridHistogram) and hist.n_bins == 240
    oracle = build_predictor("oracle", IV, arrivals=[(30.0, "a")])
    assert oracle.predict(0.0, ["a"]) == {"a": 1.0}
    fb = build_predictor("fallback", IV, chain=["histogram", "ewma"], members={"ewma": {"alpha": 0.9}}, patience=2)
    assert isinstance(fb, FallbackPredictor) and fb.name == "fallback(histogram>ewma)" and fb.patience == 2
    with pytest.raises(TypeError):
        build_predictor("ewma", IV, window=3)  # an option the predictor does not take
