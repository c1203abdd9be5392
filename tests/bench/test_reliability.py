"""The reliability suite: its plain decisions (audit, chaos plan, memory summary) table-driven, and a short soak
and chaos run against one real `lorafn up --workers 2` on the tiny backbone, whose audits must find nothing lost
and nothing duplicated."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.reliability import (
    KINDS,
    SERVICES,
    Accepted,
    ReliabilityOptions,
    Sample,
    Stack,
    audit,
    chaos_plan,
    choose_kind,
    measure,
    print_report,
    running_stack,
    summarise_samples,
    write_adapters,
)
from workers.tiny import write_tiny_backbone

# -- the audit, table-driven ---------------------------------------------------------------------------------------

A = Accepted
AUDIT_CASES = [
    # (why, accepted, rows, result counts, result status, expected fields)
    ("every final state counts, cancelled included",
     {"a": A("a", "sync"), "b": A("b", "async"), "c": A("c", "abandoned", abandoned=True)},
     {"a": "succeeded", "b": "failed", "c": "cancelled"}, {"a": 1, "b": 1, "c": 1}, {},
     {"lost": 0, "duplicated": 0, "by_status": {"cancelled": 1, "failed": 1, "succeeded": 1}}),
    ("an accepted invocation still running is lost",
     {"a": A("a", "stream")}, {"a": "running"}, {}, {},
     {"lost": 1, "lost_ids": ["a"]}),
    ("an accepted invocation without a row nor a result is lost",
     {"a": A("a", "async")}, {}, {}, {},
     {"lost": 1, "by_status": {"missing": 1}}),
    ("an abandoned stream still running is reported apart, not lost",
     {"a": A("a", "abandoned", abandoned=True)}, {"a": "running"}, {}, {},
     {"lost": 0, "abandoned": 1, "abandoned_running": 1, "abandoned_by_status": {"running": 1}}),
    ("a result recorded while the row lags is final (and counted as the row behind)",
     {"a": A("a", "sync")}, {"a": "running"}, {"a": 1}, {"a": "succeeded"},
     {"lost": 0, "row_behind_result": 1, "by_status": {"succeeded": 1}}),
    ("two results recorded for one invocation are a duplicate",
     {"a": A("a", "sync")}, {"a": "succeeded"}, {"a": 2}, {"a": "succeeded"},
     {"duplicated": 1, "duplicated_ids": ["a"]}),
    ("a stream that finished twice is a duplicate",
     {"a": A("a", "stream", finishes=2)}, {"a": "succeeded"}, {"a": 1}, {},
     {"duplicated": 1}),
    ("a duplicate no client heard of still counts",
     {}, {"x": "succeeded"}, {"x": 3}, {},
     {"duplicated": 1, "duplicated_ids": ["x"], "accepted": 0}),
    ("a row no client was told about that never finished is an unaccepted unfinished row, not lost",
     {}, {"x": "queued", "y": "succeeded"}, {"y": 1}, {},
     {"lost": 0, "unaccepted_unfinished": 1, "unaccepted_unfinished_ids": ["x"]}),
    ("a client that saw another status than the one recorded",
     {"a": A("a", "sync", client_status="succeeded")}, {"a": "failed"}, {"a": 1}, {},
     {"client_disagrees": 1, "lost": 0}),
]


@pytest.mark.parametrize(("why", "accepted", "rows", "counts", "status", "expected"), AUDIT_CASES,
                         ids=[c[0] for c in AUDIT_CASES])
def test_audit(why: str, accepted: dict[str, Accepted], rows: dict[str, str], counts: dict[str, int],
               status: dict[str, str], expected: dict[str, object]) -> None:
    verdict = audit(accepted, rows, counts, status)
    for key, value in expected.items():
        assert getattr(verdict, key) == value, (why, key, verdict)


def test_chaos_plan_kills_a_service_every_interval_and_restarts_each_server_once() -> None:
    plan = chaos_plan(600.0, random.Random(1), kill_every_s=(30.0, 60.0))
    kills = [a for a in plan if a.signal == signal.SIGKILL]
    assert [a.at_s for a in plan] == sorted(a.at_s for a in plan)
    assert {a.target for a in kills} <= set(SERVICES)
    assert 9 <= len(kills) <= 20  # 600 s at one kill every 30 to 60 s
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(kills)]
    assert all(30.0 <= g <= 60.0 for g in gaps), gaps
    assert kills[0].at_s >= 30.0 and kills[-1].at_s < 590.0
    servers = [(a.target, a.signal, a.at_s) for a in plan if a.signal != signal.SIGKILL]
    assert servers == [("nats", signal.SIGTERM, 200.0), ("postgres", signal.SIGINT, 400.0)]
    assert chaos_plan(600.0, random.Random(1)) == plan  # a seed gives the same plan
    short = chaos_plan(35.0, random.Random(2), kill_every_s=(15.0, 22.0), restart_servers=False)
    assert len(short) == 1 and short[0].signal == signal.SIGKILL  # one kill, nothing in the last 10 s


def test_choose_kind_follows_the_weights() -> None:
    rng = random.Random(0)
    drawn = [choose_kind(rng, (1.0, 0.0, 3.0, 0.0)) for _ in range(4000)]
    assert set(drawn) == {"sync", "stream"}
    assert 2.5 < drawn.count("stream") / drawn.count("sync") < 3.5


def test_samples_are_summarised_per_process_with_start_end_peak_and_restarts() -> None:
    samples = [Sample(0.0, "gateway", 10, 100 * 1024, 20), Sample(5.0, "gateway", 10, 300 * 1024, 40),
               Sample(10.0, "gateway", 11, 200 * 1024, 25),
               Sample(0.0, "postgres", 5, 20 * 1024, 9, children=3, children_rss_kb=3072, children_fds=60),
               Sample(5.0, "postgres", 5, 20 * 1024, 9, children=4, children_rss_kb=4096, children_fds=80)]
    out = summarise_samples(samples)
    g = out["gateway"]
    assert (g["rss_mb_start"], g["rss_mb_end"], g["rss_mb_peak"]) == (100.0, 200.0, 300.0)
    assert (g["fds_start"], g["fds_end"], g["fds_peak"], g["pids"], g["samples"]) == (20, 25, 40, 2, 3)
    assert "children_end" not in g
    p = out["postgres"]
    assert (p["children_start"], p["children_end"], p["children_rss_mb_end"], p["children_fds_end"]) == (3, 4, 4.0, 80)


def test_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="mode"):
        ReliabilityOptions(mode="storm")
    with pytest.raises(ValueError, match=r"weights \(1.0,\)"):
        ReliabilityOptions(weights=(1.0,))
    with pytest.raises(ValueError, match="kill_every_s"):
        ReliabilityOptions(kill_every_s=(60.0, 30.0))


# -- a short soak and chaos run against one real stack -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[Path]]]:
    root = tmp_path_factory.mktemp("reliability")
    backbone = write_tiny_backbone(root / "backbone")
    adapters = write_adapters(root / "adapters", backbone, 5)
    with running_stack(root, backbone) as stack:
        yield stack, adapters


def _check_audit(payload: dict[str, Any]) -> dict[str, Any]:
    a = payload["audit"]
    assert isinstance(a, dict)
    assert payload["results_stream_error"] is None  # duplicates were looked for in the results stream
    assert a["lost"] == 0, (a["lost_ids"], payload["supervision"])
    assert a["duplicated"] == 0, a["duplicated_ids"]
    assert a["accepted"] >= 10, payload
    return a


def test_short_soak_loses_and_duplicates_nothing(live: tuple[Stack, list[Path]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    stack, adapters = live
    options = ReliabilityOptions(mode="soak", minutes=20 / 60, callers=3, sample_every_s=2.0, grace_s=60.0,
                                 stable_adapters=2, churn_every_s=1.0)
    payload = asyncio.run(measure(stack, options, adapters))
    a = _check_audit(payload)
    calls = payload["calls"]
    assert set(KINDS) <= set(calls), calls  # every kind of call was made
    assert {"adapter_push", "adapter_delete"} <= set(calls)
    assert payload["outcomes"]["sync"].get("ok", 0) > 0
    assert a["abandoned"] > 0
    names = set(payload["processes"])
    assert {"gateway", "scheduler", "worker-1", "worker-2", "nats", "postgres", "s3", "launcher"} <= names
    for p in payload["processes"].values():
        assert p["rss_mb_end"] > 0 and p["fds_end"] > 0 and p["samples"] >= 5
    assert payload["chaos"] == [] and payload["supervision"] == []  # a soak kills nothing, nothing restarts
    print_report(payload)
    assert "audit of accepted invocations" in capsys.readouterr().out


def test_short_chaos_with_one_kill_loses_and_duplicates_nothing(live: tuple[Stack, list[Path]]) -> None:
    stack, adapters = live
    options = ReliabilityOptions(mode="chaos", minutes=35 / 60, callers=3, sample_every_s=2.0, grace_s=60.0,
                                 stable_adapters=2, churn_every_s=1.0, kill_every_s=(12.0, 20.0),
                                 restart_servers=False, seed=3)
    payload = asyncio.run(measure(stack, options, adapters))
    _check_audit(payload)
    (kill,) = payload["chaos"]
    assert kill["signal"] == "SIGKILL" and "pid" in kill, kill
    assert any(f"{kill['target']} exited with code -9" in line for line in payload["supervision"]), payload["supervision"]
    assert any(f"restarted {kill['target']}" in line for line in payload["supervision"]), payload["supervision"]
    assert payload["processes"][kill["target"]]["pids"] == 2  # sampled before and after its restart
