"""`lorafn replay`, for real: the command (typer's runner, in a thread) replays short traces through a gateway on a
free port, the scheduler and a worker in-process on the tiny backbone, NATS, Postgres and S3 from the session's
services. Pure parts (the plan, the summary, the prompt's length in tokens) are tested without a stack."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from typer.testing import CliRunner

from bench.traces import TraceRequest, write_trace
from lorafn.cli import app
from lorafn.replay import (
    RANK_CYCLE,
    WORDS,
    CallRecord,
    ReplayError,
    call_openai,
    new_records,
    plan_replay,
    send_all,
    summarise,
    synthetic_prompt,
)
from scheduler.settings import StagingSettings
from tests.stacks import InProcessStack, in_process_stack
from workers.tokenizer import Tokenizer

SPEED = 4.0
CAP = 8  # --max-tokens-cap
LIMIT = 2  # --concurrency-limit


# -- pure parts -----------------------------------------------------------------------------------------------------


def test_plan_maps_keys_by_popularity_onto_adapters_of_mixed_ranks() -> None:
    rows = [TraceRequest(10.0 + t, "", k, 5, o) for t, k, o in [
        (0.0, "b", 4), (1.0, "a", 700), (2.0, "a", 3), (3.0, "c", 1), (4.0, "b", 2), (5.0, "a", 9), (6.0, "d", 1)]]
    plan = plan_replay(rows, speed=2.0, adapters=2, max_tokens_cap=8, name_prefix="p")
    assert [c.at_s for c in plan.calls] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # from the first row, / speed
    # popularity: a (3), b (2), then c and d (1 each, by key); key k goes to adapter k mod 2
    assert [(a.name, a.rank, a.keys, a.calls) for a in plan.adapters] == [
        ("p-000", RANK_CYCLE[0], ("a", "c"), 4), ("p-001", RANK_CYCLE[1], ("b", "d"), 3)]
    assert [c.max_tokens for c in plan.calls] == [4, 8, 3, 1, 2, 8, 1]  # capped at 8
    assert [a.keys for a in plan_replay(rows).adapters] == [("a",), ("b",), ("c",), ("d",)]  # one each by default
    assert len(plan_replay(rows, speed=2.0, duration_s=1.5).calls) == 3  # due before 1.5 s of replay
    assert len(plan_replay(rows, limit=2).calls) == 2
    assert sorted(RANK_CYCLE).count(8) > len(RANK_CYCLE) / 3 and max(RANK_CYCLE) == 128  # mostly small, some large
    for bad in ({"speed": 0.0}, {"adapters": 0}, {"duration_s": -1.0}, {"limit": 0}):
        with pytest.raises(ReplayError):
            plan_replay(rows, **bad)  # type: ignore[arg-type]
    with pytest.raises(ReplayError, match="no requests"):
        plan_replay([])


def test_summary_counts_add_up_and_failures_are_kept() -> None:
    def record(i: int, status: str, tier: str | None, **kw: Any) -> CallRecord:
        return CallRecord(i, "k", "t/a", 8, 5, 5, i * 10.0, sent_ms=i * 10.0 + 1, lateness_ms=1.0, status=status,
                          tier=tier, **kw)

    records = [record(0, "ok", "object", ttft_ms=50.0, latency_ms=90.0, load_ms=30.0),
               record(1, "ok", "device", ttft_ms=10.0, latency_ms=20.0),
               record(2, "http_429:rate_limited", None, error="slow down"),
               record(3, "timeout", "host", error="no answer"),
               CallRecord(4, "k", "t/b", 8, 5, 5, 40.0)]  # never sent
    s = summarise(records)
    assert s["statuses"] == {"ok": 2, "http_429:rate_limited": 1, "not_sent": 1, "timeout": 1}
    assert sum(s["statuses"].values()) == s["calls"] == 5 and (s["ok"], s["failed"], s["sent"]) == (2, 3, 4)
    assert s["errors"] == {"http_429:rate_limited": "slow down", "timeout": "no answer"}
    assert (s["cold_starts"], s["host_loads"], s["device_hits"], s["tiers"]["unknown"]) == (1, 1, 1, 2)
    assert s["ttft_ms"]["p50"] == 10.0 and s["ttft_ms"]["max"] == 50.0 and s["ttft_ms"]["n"] == 2  # ok calls only
    assert s["load_ms"]["n"] == 1 and s["first_call_tiers"] == {"object": 1}


async def test_calls_over_the_limit_wait_in_order_and_every_outcome_is_recorded() -> None:
    """send_all with stand-in calls: a burst over a limit of 1 is held back in order; a failing call, a transport
    error and a cancelled replay each leave their status."""
    rows = [TraceRequest(t, "", k, 3, 2) for t, k in
            [(0.0, "a"), (0.0, "b"), (0.0, "a"), (0.0, "a"), (0.3, "b"), (0.3, "a"), (0.3, "c")]]
    plan = plan_replay(rows)
    order: list[int] = []
    release = asyncio.Event()

    async def call(client: Any, record: CallRecord, prompt: str, now: Any) -> None:
        order.append(record.index)
        assert len(prompt.split()) == record.prompt_tokens
        await asyncio.sleep(0)
        if record.index == 4:
            raise ValueError("a malformed answer")
        if record.index == 5:
            raise httpx.ConnectError("refused")
        if record.index == 6:
            await release.wait()  # in flight when the replay is cancelled
        record.status = "ok"

    records = new_records(plan, "t")
    task = asyncio.create_task(send_all(plan, records, call, None, concurrency_limit=1,  # type: ignore[arg-type]
                                        timeout_s=30))
    while len(order) < 7:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert order == list(range(7))  # in the trace's order
    assert [r.status for r in records] == ["ok"] * 4 + ["error:ValueError", "transport:ConnectError", "cancelled"]
    assert [r.waited_for_slot for r in records[:4]] == [False, True, True, True]  # the burst of 4 over a limit of 1
    assert records[4].waited_for_slot is False  # due 0.3 s later, when no call was in flight
    assert records[4].error == "a malformed answer"
    assert all(r.sent_ms is not None and r.lateness_ms is not None for r in records)
    assert summarise(records)["statuses"] == {"ok": 4, "cancelled": 1, "error:ValueError": 1,
                                              "transport:ConnectError": 1}


def test_a_synthetic_prompt_is_as_many_tokens_as_words() -> None:
    tokenizer = Tokenizer.load()
    assert all(len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1 for w in WORDS)
    for n in (1, 17, 500):
        prompt = synthetic_prompt(n, seed=n)
        assert prompt == synthetic_prompt(n, seed=n) != synthetic_prompt(n, seed=n + 1)
        assert len(tokenizer.encode(prompt, add_special_tokens=False)) == n


# -- against a running stack ----------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def stack(services: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessStack]:
    # tiers are asserted where the calls left them: no predictive pre-staging moving adapters between tiers
    async with in_process_stack(services, tmp_path_factory.mktemp("replay"), tenant=f"replay-{secrets.token_hex(3)}",
                                staging=StagingSettings(predictor="none")) as s:
        yield s


async def replay(stack: InProcessStack, trace: Path, report: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    """`lorafn replay` against the stack, in a thread (it runs its own event loop); (exit code, output, report)."""
    argv = ["replay", str(trace), "--gateway", stack.url, "--api-key", stack.key, "--backbone", str(stack.backbone),
            "--report", str(report), *args]
    result = await asyncio.to_thread(CliRunner().invoke, app, argv)
    assert report.exists(), f"no report; exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    return result.exit_code, result.output, json.loads(report.read_text())


def short_trace() -> list[TraceRequest]:
    """32 requests over 8 trace seconds: a burst of 6 at 0, then one every 0.3 s; 5 keys of skewed popularity,
    every key called again at least 4 trace seconds (1 s of replay) after its first call."""
    burst = ["acme/chat", "acme/code", "b", "c", "acme/chat", "d"]
    cycle = ["acme/chat", "acme/code", "acme/chat", "b", "acme/chat", "c", "acme/code", "d"]
    rows = [TraceRequest(0.0, *k.rpartition("/")[::2], 6 + i, 4 + i % 9) for i, k in enumerate(burst)]
    rows += [TraceRequest(round(0.5 + 0.3 * i, 3), *k.rpartition("/")[::2], 5 + i % 30, 3 + i % 11)
             for i, k in enumerate(cycle * 3 + ["b", "c"])]
    return rows


async def test_replay_records_every_call_cold_then_warm(stack: InProcessStack, tmp_path: Path) -> None:
    trace, report = tmp_path / "trace.csv", tmp_path / "out" / "replay.json"
    rows = short_trace()
    write_trace(trace, rows)
    code, output, body = await replay(stack, trace, report, "--speed", str(SPEED), "--adapters", "4",
                                      "--max-tokens-cap", str(CAP), "--concurrency-limit", str(LIMIT))
    s, calls = body["summary"], body["calls"]
    assert code == 0, output
    # every call recorded, with a status; the counts add up
    assert len(calls) == s["calls"] == len(rows) == 32
    assert sum(s["statuses"].values()) == 32 and s["statuses"] == {"ok": 32}, s["errors"]
    assert s["cold_starts"] + s["host_loads"] + s["device_hits"] + s["tiers"]["unknown"] == 32
    assert all(c["invocation_id"] and c["tier"] in ("object", "host", "device") for c in calls)
    assert all(c["ttft_ms"] is not None and c["latency_ms"] >= c["ttft_ms"] > 0 for c in calls)
    assert all(c["completion_tokens"] <= c["max_tokens"] <= CAP for c in calls)
    # the schedule: trace seconds / speed; keys mapped by popularity onto 4 adapters, ranks from the cycle
    assert [c["scheduled_ms"] for c in calls] == pytest.approx([r.at_s / SPEED * 1000 for r in rows])
    assert all(c["sent_ms"] >= c["scheduled_ms"] and c["lateness_ms"] >= 0 for c in calls)
    assert [(a["keys"], a["rank"], a["provisioned"]) for a in body["adapters"]] == [
        (["acme/chat", "d"], 8, "pushed"), (["acme/code"], 16, "pushed"), (["b"], 64, "pushed"), (["c"], 8, "pushed")]
    # the burst of 6 found 2 calls in flight for 4 of them: they waited, and are counted late
    waited = [c for c in calls if c["waited_for_slot"]]
    assert len(waited) >= 4 and s["waited_for_slot"]["calls"] == len(waited)
    assert all(c["lateness_ms"] > 0 for c in waited)
    # the first call of each adapter found it cold; its last call, a replay second later, found it on the device
    by_adapter: dict[str, list[dict[str, Any]]] = {}
    for c in sorted(calls, key=lambda c: c["sent_ms"]):
        by_adapter.setdefault(c["adapter"], []).append(c)
    assert len(by_adapter) == 4
    for adapter, seq in by_adapter.items():
        assert seq[0]["tier"] != "device", (adapter, [c["tier"] for c in seq])
        assert seq[-1]["tier"] == "device", (adapter, [c["tier"] for c in seq])
    assert s["first_call_tiers"].get("device", 0) == 0 and s["device_hits"] >= 4
    assert "| ok | 32 |" in output and "| device (hit) |" in output
    assert report.with_suffix(".md").read_text() in output


async def test_a_second_replay_reuses_the_adapters_and_counts_failures(stack: InProcessStack, tmp_path: Path) -> None:
    trace, report = tmp_path / "trace.csv", tmp_path / "replay.json"
    write_trace(trace, [TraceRequest(0.0, "acme", "chat", 5, 3), TraceRequest(0.1, "acme", "code", 5, 3),
                        TraceRequest(0.2, "acme", "chat", 3000, 3),  # longer than the backbone's 2,048 positions
                        TraceRequest(0.3, "", "b", 5, 3)])
    code, output, body = await replay(stack, trace, report, "--speed", "10")
    s = body["summary"]
    assert code == 1, output  # a call failed
    # a streamed call whose prompt the worker refuses: a 400 before any event of the stream
    assert s["statuses"] == {"ok": 3, "http_400:prompt_too_long": 1} and s["failed"] == 1
    failed = next(c for c in body["calls"] if c["status"] != "ok")
    assert failed["prompt_tokens"] == 3000 and failed["error_code"] == "prompt_too_long" and failed["error"]
    assert failed["http_status"] == 400
    assert "| http_400:prompt_too_long | 1 |" in output
    # the same three adapters (by popularity: chat, code, b) as the first test's: reused, still on the device
    assert [(a["name"], a["provisioned"]) for a in body["adapters"]] == [
        ("replay-000", "reused"), ("replay-001", "reused"), ("replay-002", "reused")]
    assert s["first_call_tiers"] == {"device": 3}


def test_a_call_whose_text_comes_only_with_its_finish_chunk_still_has_a_ttft() -> None:
    """The SSE parsing of `call_openai` alone (the gateway's own streams are tested against it above): a completion
    whose tokens streamed no text of their own before the finish chunk is ok and its TTFT is that chunk's time."""
    finish = {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    body = "".join(f"data: {json.dumps(x)}\n\n" for x in (finish, usage)) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body,
                                                                   headers={"content-type": "text/event-stream"}))
    ticks = iter([0.0, 0.25, 0.5, 0.75])
    record = CallRecord(0, "k", "t/a", 8, 3, 4, 0.0)

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            await call_openai(client, record, "hi", lambda: next(ticks))

    asyncio.run(go())
    assert (record.status, record.finish_reason, record.completion_tokens) == ("ok", "length", 4)
    assert record.ttft_ms == 250.0 and record.latency_ms == 500.0
