"""`python -m bench forecast`: both ways of carrying out the core's Predict at a boundary run on one loop, the
forecast is the live default predictor's, and every answer reaches the core (its interval is recorded with the
predictor that answered). Figures are the bench's to report, not asserted here."""

from __future__ import annotations

import asyncio

from bench import forecast


def test_both_ways_answer_every_boundary_and_the_core_stages_each_answer() -> None:
    got = asyncio.run(forecast.measure(300, boundaries=2, warmup_timeout_s=120.0))
    assert got["adapters"] == 300
    assert got["predictor"].startswith("fallback(lstm>histogram>ewma)")
    assert got["lstm_ready"]  # the LSTM forecasts (its forward is in the figures)
    for way in ("inline", "thread"):
        row = got[way]
        assert row["scored"] == 300  # every adapter called within the horizon is scored
        assert row["forecast_ms"] > 0 and row["core_ms"] > 0
        assert 0 <= row["loop_stall_ms"] <= row["loop_stall_ms_max"]
