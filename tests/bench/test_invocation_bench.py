"""The invocation benchmark's code path with a handful of calls against the session's servers: the echo peer,
the gateway under uvicorn, both variants, the components and the report. Structure only, no timings."""

from __future__ import annotations

import math
from typing import Any

import nats
import pytest

from bench.invocation import BenchOptions, Servers, measure, print_report
from protocol import subjects
from protocol.streams import ensure_streams
from storage.settings import ObjectStoreSettings

OPTIONS = BenchOptions(warmup=2, rounds=2, calls_per_round=3, concurrency=2, concurrent_rounds=1,
                       concurrent_calls_per_round=4, component_calls=3)


async def _free_invocation_subjects(nats_url: str) -> None:
    """Delete consumers other test modules left on the shared work-queue stream: one could overlap the echo's."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for consumer in await js.consumers_info(subjects.INVOCATIONS_STREAM):
            await js.delete_consumer(subjects.INVOCATIONS_STREAM, consumer.name)
    finally:
        await nc.close()


async def test_benchmark_measures_both_variants_and_reports(services: Any, object_store_settings: ObjectStoreSettings,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    await _free_invocation_subjects(services.nats_url)
    servers = Servers(nats_url=services.nats_url, database_url=services.database_url,
                      object_store=object_store_settings)

    payload = await measure(servers, OPTIONS)

    assert set(payload["variants"]) == {"direct", "gateway", "gateway_httpx"}
    for name in ("gateway", "gateway_httpx"):  # read from /proc in 10 ms ticks: 0 is possible for a few calls
        cpu = payload["variants"][name]["sequential"]["gateway_cpu_ms_per_call"]
        assert isinstance(cpu, float) and math.isfinite(cpu) and cpu >= 0
    for figures in payload["variants"].values():
        seq, conc = figures["sequential"], figures["concurrent"]
        assert seq["calls"] == OPTIONS.rounds * OPTIONS.calls_per_round
        assert conc["calls"] == OPTIONS.concurrent_rounds * OPTIONS.concurrent_calls_per_round
        assert conc["concurrency"] == OPTIONS.concurrency
        for part in (seq, conc):
            assert 0 < part["p50_ms"] <= part["p99_ms"] <= part["max_ms"]
            assert part["invocations_per_s"] > 0
    assert payload["added_httpx"]["p50_ms"] == pytest.approx(
        payload["variants"]["gateway_httpx"]["sequential"]["p50_ms"] - payload["variants"]["direct"]["sequential"]["p50_ms"])
    added = payload["added"]
    assert {"p50_ms", "p99_ms", "concurrent_p50_ms", "concurrent_p99_ms", "p50_within_target",
            "p99_within_target"} <= set(added)
    assert added["p50_ms"] == pytest.approx(payload["variants"]["gateway"]["sequential"]["p50_ms"]
                                            - payload["variants"]["direct"]["sequential"]["p50_ms"])
    assert set(payload["components"]) == {"http_healthz", "pg_invocation_insert", "pg_insert_transaction",
                                          "pg_select_1"}
    assert all(c["calls"] == OPTIONS.component_calls for c in payload["components"].values())
    assert payload["targets"] == {"added_p50_ms": 2.0, "added_p99_ms": 10.0}
    assert payload["total_calls"] == 3 * (OPTIONS.rounds * OPTIONS.calls_per_round
                                          + OPTIONS.concurrent_rounds * OPTIONS.concurrent_calls_per_round
                                          + 2 * OPTIONS.warmup)

    # The echo peer deleted its consumer: the stream's subjects are free for the next test module.
    nc = await nats.connect(services.nats_url)
    try:
        assert await nc.jetstream().consumers_info(subjects.INVOCATIONS_STREAM) == []
    finally:
        await nc.close()

    print_report(payload)
    out = capsys.readouterr().out
    assert "added by" in out
    assert "Postgres" in out
