"""The invocation benchmark's code path with a handful of calls against the session's servers: the echo workers
behind a real scheduler, the gateway under uvicorn, every variant, the dispatch hop, the components, the
many-adapters table and the report. Structure only, no timing targets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nats
import pytest

from bench.invocation import BenchOptions, Servers, measure, print_report
from protocol import subjects
from protocol.streams import ALL_STREAMS, ensure_streams
from storage.settings import ObjectStoreSettings

OPTIONS = BenchOptions(warmup=2, rounds=2, calls_per_round=3, concurrency=2, concurrent_rounds=1,
                       concurrent_calls_per_round=4, component_calls=3, echo_workers=2, adapter_counts=(2, 5),
                       adapter_calls=8, adapter_rounds=2, adapter_concurrency=2)
VARIANTS = {"direct", "direct_work", "gateway", "gateway_httpx"}


async def _clean_invocation_stream(nats_url: str) -> None:
    """Other test modules may have left consumers and messages on the invocations stream; the benchmark's
    scheduler would dispatch those messages to its echo workers."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for consumer in await js.consumers_info(subjects.INVOCATIONS_STREAM):
            await js.delete_consumer(subjects.INVOCATIONS_STREAM, consumer.name)
        await js.purge_stream(subjects.INVOCATIONS_STREAM)
    finally:
        await nc.close()


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


async def test_benchmark_measures_both_tables_and_reports(services: Any, object_store_settings: ObjectStoreSettings,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await _clean_invocation_stream(services.nats_url)
    servers = Servers(nats_url=services.nats_url, database_url=services.database_url,
                      object_store=object_store_settings)

    payload = await measure(servers, OPTIONS, work_dir=tmp_path)  # the services' logs stay in tmp_path

    # Table 1: every variant, sequential and concurrent.
    assert set(payload["variants"]) == VARIANTS
    for name, figures in payload["variants"].items():
        seq, conc = figures["sequential"], figures["concurrent"]
        assert seq["calls"] == OPTIONS.rounds * OPTIONS.calls_per_round, name
        assert conc["calls"] == OPTIONS.concurrent_rounds * OPTIONS.concurrent_calls_per_round, name
        assert conc["concurrency"] == OPTIONS.concurrency
        for part in (seq, conc):
            assert 0 < part["p50_ms"] <= part["p99_ms"] <= part["max_ms"]
            assert part["invocations_per_s"] > 0
        for k in ("gateway_cpu_ms_per_call", "scheduler_cpu_ms_per_call"):  # /proc ticks: 0 is possible
            assert _finite(seq[k]) and seq[k] >= 0, (name, k)
    v = payload["variants"]
    added = payload["added"]
    assert added["p50_ms"] == pytest.approx(v["gateway"]["sequential"]["p50_ms"] - v["direct"]["sequential"]["p50_ms"])
    assert payload["added_httpx"]["p99_ms"] == pytest.approx(
        v["gateway_httpx"]["sequential"]["p99_ms"] - v["direct"]["sequential"]["p99_ms"])
    assert isinstance(added["p50_within_target"], bool) and isinstance(added["p99_within_target"], bool)

    # The dispatch hop: the difference of the two direct variants, and timed per call of the direct variant.
    hop = payload["dispatch_hop"]
    assert hop["difference"]["p50_ms"] == pytest.approx(
        v["direct"]["sequential"]["p50_ms"] - v["direct_work"]["sequential"]["p50_ms"])
    assert all(_finite(x) for x in hop["difference"].values())
    for mode, calls in (("sequential", OPTIONS.rounds * OPTIONS.calls_per_round),
                        ("concurrent", OPTIONS.concurrent_rounds * OPTIONS.concurrent_calls_per_round)):
        measured = hop["measured"][mode]
        assert measured["calls"] == calls
        assert _finite(measured["p50_ms"]) and measured["p50_ms"] <= measured["p99_ms"]
        pieces = hop["measured"][f"{mode}_pieces"]
        # every dispatched direct call was sampled by the echo workers (the stream timestamps of both hops)
        assert pieces["to_work_stream"]["calls"] == pieces["worker_pickup"]["calls"] == calls
        assert pieces["to_work_stream"]["p50_ms"] >= 0
        assert hop["without_dispatcher"][mode]["calls"] == calls

    assert set(payload["components"]) == {"http_healthz", "pg_invocation_insert", "pg_insert_transaction",
                                          "pg_select_1"}
    assert all(c["calls"] == OPTIONS.component_calls for c in payload["components"].values())

    # Table 2: the same calls for every adapter count; consumers and subscriptions do not grow with N.
    t = payload["adapters"]
    assert t["counts"] == [2, 5]
    assert set(t["by_count"]) == {"2", "5"}
    per_path = OPTIONS.adapter_calls
    for n, row in t["by_count"].items():
        for path in ("direct", "gateway"):
            x = row[path]
            assert x["calls"] == per_path
            assert all(_finite(x[k]) and x[k] > 0 for k in ("invocations_per_s", "p50_ms", "p99_ms"))
            r = t["ratios"][n][path]
            assert all(_finite(r[k]) and r[k] > 0 for k in ("invocations_per_s", "p50_ms", "p99_ms"))
        assert row["direct"]["hop"]["calls"] == per_path
        assert set(row["consumers"]) == {spec.name for spec in ALL_STREAMS}
        assert row["consumers"][subjects.INVOCATIONS_STREAM] == 1  # the dispatcher's, for every adapter
        assert len(row["echo_subscriptions"]) == OPTIONS.echo_workers
        # every adapter was called and stayed on the worker that took it first
        assert sum(row["echo_versions"].values()) == int(n)
    assert t["ratios"]["2"]["direct"]["invocations_per_s"] == pytest.approx(1.0)
    assert t["by_count"]["2"]["consumers"] == t["by_count"]["5"]["consumers"]
    assert t["by_count"]["2"]["echo_subscriptions"] == t["by_count"]["5"]["echo_subscriptions"]
    assert t["consumers_equal_across_counts"] and t["subscriptions_equal_across_counts"]
    # The control: the first count again, as many calls, its own ratios to the first (the run's noise).
    control = t["control"]
    assert control["of"] == 2 and all(control[path]["calls"] == per_path for path in ("direct", "gateway"))
    assert all(_finite(control["ratios"][path][k]) and control["ratios"][path][k] > 0
               for path in ("direct", "gateway") for k in ("invocations_per_s", "p50_ms", "p99_ms"))

    n_variants = len(VARIANTS)
    assert payload["total_calls"] == (
        n_variants * (OPTIONS.rounds * OPTIONS.calls_per_round + OPTIONS.concurrent_rounds
                      * OPTIONS.concurrent_calls_per_round + 2 * OPTIONS.warmup)
        + 2 * ((len(t["counts"]) + 1) * per_path + sum(t["counts"]) + t["counts"][0]))

    # The echo workers deleted their work consumers; the scheduler's dispatcher consumer stays (durable).
    nc = await nats.connect(services.nats_url)
    try:
        work = {c.name for c in await nc.jetstream().consumers_info(subjects.WORK_STREAM)}
        assert not any(name.startswith("work-echo-") for name in work)
    finally:
        await nc.close()

    print_report(payload)
    out = capsys.readouterr().out
    assert "added by" in out
    assert "dispatch hop" in out
    assert "2 again (control)" in out
    assert "many adapters" in out
    assert "Postgres" in out
