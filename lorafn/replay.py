"""`lorafn replay TRACE`: a trace's requests sent through a running gateway with their timing, every call recorded.

The trace is a canonical trace CSV (`timestamp,adapter,prompt_tokens,output_tokens`, bench/traces.py), or an
Azure LLM or Alibaba GenAI trace read with the converter's defaults. The replay:

1. plans (`plan_replay`, pure): the rows within `--duration` seconds of replay and the first `--limit` of them;
   call i is due `(at_s - first at_s) / speed` seconds after the start. The trace's adapter keys, ordered by
   popularity in the planned rows (most calls first, ties by key), map onto `--adapters N` replay adapters:
   key k of that order goes to adapter k mod N (every key its own adapter without `--adapters`). Adapter i is
   `<prefix>-<iii>` of rank `RANK_CYCLE[i % 10]` (8, 16, 64, 8, 32, 8, 16, 128, 8, 16: four of ten rank 8, one
   each of 32, 64 and 128) on q_proj and v_proj, random, seeded by its name (the same name, the same content:
   versions are content-addressed, so another prefix is what gives fresh adapters that start cold);
2. provisions: the backbone the adapters are made for (`--backbone`, else the registry's configured one, else
   the default) must be the gateway's base model (GET /v1/models names it); an adapter the caller's tenant
   already holds with that rank, modules and base model is reused, any other is written and pushed
   (POST /v1/adapters), so a second replay pushes nothing;
3. sends each call when it is due, unless `--concurrency-limit` calls are in flight: then it waits for one to
   finish, and so do the calls that fall due meanwhile (calls keep their order); those count as held back. `openai` route (default): POST /v1/completions,
   streamed, so the time to the first text is measured here; `faas` route: the synchronous FaaS invocation,
   whose time to first token is the worker's (from submission). The prompt is `prompt_tokens` words that are
   one token each in the default backbone's vocabulary; max_tokens is `output_tokens`, capped at
   `--max-tokens-cap`; greedy sampling;
4. records per call (`CallRecord`): when it was due and sent (lateness), the trace's adapter key and the
   adapter called, the status (`ok`, `http_<status>:<code>`, `stream_error:<code>`, `incomplete`, `timeout`,
   `transport:<error>`, `cancelled` if the replay was interrupted in flight, `not_sent` if it never started),
   the invocation id, the adapter's tier on arrival and load time (x-lorafn-* headers, or the result), TTFT,
   latency, tokens generated;
5. summarises (`summarise`, pure): counts per status (they add up to the calls planned), cold starts (tier
   `object`), host loads, device hits, TTFT / latency / load / lateness percentiles, the calls that waited for a
   slot and how long; written as JSON (`--report PATH`) with a markdown summary beside it (PATH with `.md`),
   and printed.

Exit status: 0 when every call succeeded, 1 when any failed or the replay could not start (the report is
written either way once calls were planned).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import httpx
import typer
from rich.console import Console

from bench.traces import TraceError, TraceRequest, load_trace
from lorafn.gateway_client import header_float, push_adapter

if TYPE_CHECKING:
    from storage.backbone import BackboneSpec

Route = Literal["openai", "faas"]
ROUTES: tuple[Route, ...] = ("openai", "faas")
RANK_CYCLE = (8, 16, 64, 8, 32, 8, 16, 128, 8, 16)  # adapter i has rank RANK_CYCLE[i % 10]: mostly small
ADAPTER_MODULES = ("q_proj", "v_proj")
ADAPTER_STD = 0.02  # the spread of lora_B (PEFT initialises it to zero: no effect at all)
DEFAULT_GATEWAY = "http://127.0.0.1:8000"  # `lorafn up`'s gateway
DEFAULT_CONCURRENCY_LIMIT = 64
DEFAULT_MAX_TOKENS_CAP = 512
DEFAULT_TIMEOUT_S = 300.0
START_LEAD_S = 0.05  # the first call is due this long after the clock starts
TIERS = ("object", "host", "device")
# Words that are one token each, with the space before them, in SmolLM2's byte-level BPE vocabulary (a test
# checks it): a prompt of n of them is n tokens.
_WORD_TEXT = (
    "the of and to in is it that was for on are with as at be this have from or one had by but not what all were "
    "we when your can said there use each which she do how their if will up other about out many then them these "
    "so some her would make like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part over new sound take only "
    "little work know place year live me back give most very after thing our just name good sentence man think say "
    "great where help through much before line right too mean old any same tell boy follow came want show also "
    "around form three small set put end does another well large must big even such because turn here why ask went"
)
WORDS = tuple(_WORD_TEXT.split())


class ReplayError(RuntimeError):
    """The replay cannot start or go on (the message says what to fix)."""


# -- the plan (pure) ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayAdapter:
    """One adapter the replay calls: the trace keys mapped onto it and how many planned calls it gets."""

    index: int
    name: str
    rank: int
    keys: tuple[str, ...]
    calls: int


@dataclass(frozen=True)
class PlannedCall:
    """One request of the trace as the replay sends it. `at_s`: seconds after the replay's start."""

    index: int
    at_s: float
    key: str
    adapter: int  # index into Plan.adapters
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Plan:
    calls: tuple[PlannedCall, ...]
    adapters: tuple[ReplayAdapter, ...]
    speed: float
    trace_rows: int  # rows in the trace, before --duration and --limit
    trace_span_s: float  # trace seconds the planned calls cover


def adapter_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:03d}"


def plan_replay(rows: Sequence[TraceRequest], *, speed: float = 1.0, adapters: int | None = None,
                limit: int | None = None, duration_s: float | None = None, max_tokens_cap: int | None = None,
                name_prefix: str = "replay") -> Plan:
    """The calls of a replay of `rows` (module docstring, step 1)."""
    if not math.isfinite(speed) or speed <= 0:
        raise ReplayError(f"--speed must be a number > 0 (got {speed})")
    for option, value in (("--adapters", adapters), ("--limit", limit), ("--max-tokens-cap", max_tokens_cap)):
        if value is not None and value < 1:
            raise ReplayError(f"{option} must be at least 1 (got {value})")
    if duration_s is not None and not duration_s > 0:
        raise ReplayError(f"--duration must be > 0 seconds (got {duration_s})")
    if not rows:
        raise ReplayError("the trace has no requests")
    first = rows[0].at_s
    chosen = [r for r in rows if duration_s is None or (r.at_s - first) / speed < duration_s][:limit]
    popularity = Counter(r.key for r in chosen)
    order = sorted(popularity, key=lambda k: (-popularity[k], k))
    n = min(adapters or len(order), len(order))
    slot = {key: i % n for i, key in enumerate(order)}
    calls = tuple(
        PlannedCall(i, (r.at_s - first) / speed, r.key, slot[r.key], r.prompt_tokens,
                    min(r.output_tokens, max_tokens_cap or r.output_tokens))
        for i, r in enumerate(chosen)
    )
    per_adapter = Counter(c.adapter for c in calls)
    table = tuple(
        ReplayAdapter(i, adapter_name(name_prefix, i), RANK_CYCLE[i % len(RANK_CYCLE)],
                      tuple(k for k in order if slot[k] == i), per_adapter[i])
        for i in range(n)
    )
    return Plan(calls, table, speed, len(rows), chosen[-1].at_s - first)


def synthetic_prompt(tokens: int, seed: int) -> str:
    """About `tokens` tokens of words (WORDS), the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


# -- what each call gave --------------------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """One planned call and what it gave. Times in ms from the replay's start; None: it never happened."""

    index: int
    key: str  # the trace's adapter key
    adapter: str  # the adapter called, tenant/name
    rank: int
    prompt_tokens: int
    max_tokens: int
    scheduled_ms: float
    sent_ms: float | None = None
    lateness_ms: float | None = None  # sent - scheduled
    waited_for_slot: bool = False  # held back by the concurrency limit (for itself or an earlier call)
    status: str = "not_sent"
    http_status: int | None = None
    error_code: str | None = None
    error: str | None = None
    invocation_id: str | None = None
    tier: str | None = None  # where the adapter was when the call arrived: object, host or device
    load_ms: float | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def new_records(plan: Plan, tenant: str) -> list[CallRecord]:
    return [CallRecord(c.index, c.key, f"{tenant}/{plan.adapters[c.adapter].name}", plan.adapters[c.adapter].rank,
                       c.prompt_tokens, c.max_tokens, c.at_s * 1000) for c in plan.calls]


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p90/p99, mean and max of `values`, and how many there were (None for none)."""
    s = sorted(values)
    out: dict[str, float | int | None] = {
        f"p{p}": (s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else None) for p in (50, 90, 99)}
    out["mean"] = sum(s) / len(s) if s else None
    out["max"] = s[-1] if s else None
    out["n"] = len(s)
    return out


def summarise(records: Sequence[CallRecord]) -> dict[str, Any]:
    """Counts and percentiles of a replay (module docstring, step 5). TTFT and latency are over the calls that
    succeeded; tiers over every call that reported one."""
    statuses = Counter(r.status for r in records)
    examples: dict[str, str] = {}
    for r in records:
        if not r.ok and r.status not in examples and r.status != "not_sent":
            examples[r.status] = r.error or ""
    tiers = Counter(r.tier for r in records if r.tier is not None)
    ok = [r for r in records if r.ok]
    waited = [r for r in records if r.waited_for_slot and r.lateness_ms is not None]
    first_tier: dict[str, str | None] = {}
    for r in sorted((r for r in records if r.sent_ms is not None), key=lambda r: (r.sent_ms, r.index)):
        first_tier.setdefault(r.adapter, r.tier)
    return {
        "calls": len(records),
        "sent": sum(1 for r in records if r.sent_ms is not None),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "statuses": dict(sorted(statuses.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))),
        "errors": examples,
        "tiers": {t: tiers.get(t, 0) for t in TIERS} | {"unknown": len(records) - sum(tiers.values())},
        "cold_starts": tiers.get("object", 0),
        "host_loads": tiers.get("host", 0),
        "device_hits": tiers.get("device", 0),
        "first_call_tiers": dict(Counter(str(t) for t in first_tier.values())),
        "ttft_ms": percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "latency_ms": percentiles([r.latency_ms for r in ok if r.latency_ms is not None]),
        "load_ms": percentiles([r.load_ms for r in records if r.load_ms]),
        "lateness_ms": percentiles([r.lateness_ms for r in records if r.lateness_ms is not None]),
        "waited_for_slot": {"calls": len(waited), "lateness_ms": percentiles([r.lateness_ms or 0.0 for r in waited])},
        "completion_tokens": sum(r.completion_tokens or 0 for r in ok),
    }


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The human summary of a report (`build_report`)."""
    s, o = report["summary"], report["options"]
    ranks = Counter(a["rank"] for a in report["adapters"])
    lines = [
        f"# Replay of {report['trace']}",
        "",
        f"{s['calls']:,} calls planned ({s['sent']:,} sent) over {report['planned_s']:,.1f} s of replay "
        f"({report['trace_span_s']:,.1f} trace seconds at speed {o['speed']:g}), {report['wall_s']:,.1f} s wall; "
        f"{len(report['adapters'])} adapters (ranks: "
        + ", ".join(f"{n} x {r}" for r, n in sorted(ranks.items())) + f"); route {o['route']}, "
        f"concurrency limit {o['concurrency_limit']}, max_tokens cap {o['max_tokens_cap']}, "
        f"gateway {report['gateway']}" + (" **(interrupted)**" if report["interrupted"] else "") + ".",
        "",
        "| status | calls | first error |",
        "|---|---|---|",
        *(f"| {k} | {v:,} | {s['errors'].get(k, '')[:160]} |" for k, v in s["statuses"].items()),
        "",
        "| adapter tier on arrival | calls |",
        "|---|---|",
        f"| object (cold start) | {s['cold_starts']:,} |",
        f"| host (host -> device load) | {s['host_loads']:,} |",
        f"| device (hit) | {s['device_hits']:,} |",
        f"| not reported | {s['tiers']['unknown']:,} |",
        "",
        "| ms | n | p50 | p90 | p99 | mean | max |",
        "|---|---|---|---|---|---|---|",
    ]
    ttft = "TTFT (ok calls, " + ("here" if o["route"] == "openai" else "the worker's, from submission") + ")"
    for label, name in ((ttft, "ttft_ms"), ("latency (ok calls)", "latency_ms"),
                        ("adapter load (calls that loaded)", "load_ms"), ("lateness (sent - due)", "lateness_ms")):
        p = s[name]
        lines.append(f"| {label} | {p['n']:,} | {_ms(p['p50'])} | {_ms(p['p90'])} | {_ms(p['p99'])} | "
                     f"{_ms(p['mean'])} | {_ms(p['max'])} |")
    w = s["waited_for_slot"]
    late = w["lateness_ms"]
    lines += ["", f"{w['calls']:,} calls were held back by the concurrency limit ({o['concurrency_limit']} in flight)"
              + (f", late by p50 {_ms(late['p50'])} ms, p99 {_ms(late['p99'])} ms, max {_ms(late['max'])} ms."
                 if w["calls"] else ".")]
    return "\n".join(lines) + "\n"


def build_report(*, trace: Path, gateway: str, plan: Plan, records: Sequence[CallRecord], options: dict[str, Any],
                 wall_s: float, interrupted: bool, pushed: dict[str, str]) -> dict[str, Any]:
    return {
        "trace": str(trace),
        "gateway": gateway,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": options,
        "trace_rows": plan.trace_rows,
        "trace_span_s": plan.trace_span_s,
        "planned_s": plan.calls[-1].at_s if plan.calls else 0.0,
        "wall_s": wall_s,
        "interrupted": interrupted,
        "adapters": [asdict(a) | {"provisioned": pushed.get(a.name, "-")} for a in plan.adapters],
        "summary": summarise(records),
        "calls": [asdict(r) for r in records],
    }


# -- talking to the gateway -----------------------------------------------------------------------------------------


def _error_of(response_body: bytes) -> tuple[str | None, str]:
    """(code, message) of an OpenAI error body, or (None, the body's start)."""
    try:
        error = json.loads(response_body)["error"]
        return (error.get("code") or error.get("type")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, response_body[:300].decode(errors="replace")


def _headers(record: CallRecord, headers: httpx.Headers) -> None:
    record.invocation_id = headers.get("x-lorafn-invocation-id") or record.invocation_id
    record.tier = headers.get("x-lorafn-adapter-tier") or record.tier
    load = header_float(headers, "x-lorafn-load-ms")
    record.load_ms = load if load is not None else record.load_ms


async def call_openai(client: httpx.AsyncClient, record: CallRecord, prompt: str, now: Callable[[], float]) -> None:
    """POST /v1/completions, streamed: the record's status, headers' figures, TTFT and latency."""
    body = {"model": record.adapter, "prompt": prompt, "max_tokens": record.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = now()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        record.http_status = response.status_code
        _headers(record, response.headers)
        if response.status_code != 200:
            record.error_code, record.error = _error_of(await response.aread())
            record.status = f"http_{response.status_code}:{record.error_code or 'error'}"
            record.latency_ms = (now() - t0) * 1000
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ").strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"] or {}
                record.error_code = error.get("code") or error.get("type") or "error"
                record.error = str(error.get("message", ""))
                record.status = f"stream_error:{record.error_code}"
                continue
            for choice in event.get("choices") or ():
                # the first chunk: its first text, or the finish chunk of a call that streamed no text before it
                # (its tokens' text held back, e.g. parts of a character, or none at all): a completed call has a TTFT
                if record.ttft_ms is None:
                    record.ttft_ms = (now() - t0) * 1000
                record.finish_reason = choice.get("finish_reason") or record.finish_reason
            if event.get("usage"):
                record.completion_tokens = int(event["usage"].get("completion_tokens", 0))
    record.latency_ms = (now() - t0) * 1000
    if record.status == "not_sent":
        if done and record.finish_reason is not None:
            record.status = "ok"
        else:
            record.status = "incomplete"
            record.error = "the stream ended without " + ("its finish chunk" if done else "[DONE]")


async def call_faas(client: httpx.AsyncClient, record: CallRecord, prompt: str, now: Callable[[], float]) -> None:
    """The synchronous FaaS invocation: status, tier, load and the worker's TTFT from the result."""
    tenant, _, name = record.adapter.partition("/")
    t0 = now()
    response = await client.post(f"/v1/functions/{tenant}/{name}/invocations",
                                 json={"prompt": prompt, "max_tokens": record.max_tokens, "temperature": 0})
    record.latency_ms = (now() - t0) * 1000
    record.http_status = response.status_code
    _headers(record, response.headers)
    if response.status_code != 200:
        record.error_code, record.error = _error_of(response.content)
        record.status = f"http_{response.status_code}:{record.error_code or 'error'}"
        return
    result = response.json()
    timings = result.get("timings") or {}
    record.invocation_id = result.get("id") or record.invocation_id
    record.tier = result.get("adapter_tier") or record.tier
    record.load_ms = timings.get("load_ms") if timings.get("load_ms") is not None else record.load_ms
    record.ttft_ms = timings.get("first_token_ms")
    record.completion_tokens = (result.get("usage") or {}).get("completion_tokens")
    record.finish_reason = (result.get("output") or {}).get("finish_reason")
    if result.get("status") == "succeeded":
        record.status = "ok"
    else:
        error = result.get("error") or {}
        record.error_code, record.error = error.get("code") or "error", str(error.get("message", ""))
        record.status = f"failed:{record.error_code}"


async def send_all(plan: Plan, records: Sequence[CallRecord], call: Callable[..., Any], client: httpx.AsyncClient, *,
                   concurrency_limit: int, timeout_s: float, now: Callable[[], float] | None = None) -> None:
    """Send every planned call when it is due, at most `concurrency_limit` in flight (module docstring, step 3).
    Every record ends with a status; if this is cancelled, calls in flight are cancelled and marked so."""
    now = now or asyncio.get_running_loop().time
    slots = asyncio.Semaphore(concurrency_limit)
    tasks: set[asyncio.Task[None]] = set()
    start = now() + START_LEAD_S

    async def one(planned: PlannedCall, record: CallRecord) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await call(client, record, synthetic_prompt(planned.prompt_tokens, planned.index),
                           lambda: now() - start)
        except TimeoutError:
            record.status, record.error = "timeout", f"no answer within {timeout_s:g} s"
        except asyncio.CancelledError:
            record.status, record.error = "cancelled", "the replay was interrupted while the call was in flight"
            raise
        except httpx.HTTPError as e:
            record.status, record.error = f"transport:{type(e).__name__}", str(e) or type(e).__name__
        except Exception as e:  # a malformed answer: counted like any other failure
            record.status, record.error = f"error:{type(e).__name__}", str(e) or type(e).__name__
        finally:
            if record.latency_ms is None and record.sent_ms is not None and record.status != "not_sent":
                record.latency_ms = (now() - start) * 1000 - record.sent_ms
            slots.release()

    unblocked = -math.inf  # when the dispatcher last got a slot it had to wait for
    try:
        for planned, record in zip(plan.calls, records, strict=True):
            due = start + planned.at_s
            if due > now():
                await asyncio.sleep(due - now())
            # held back by the limit: no slot free now, or it fell due while the dispatcher waited for one (for
            # an earlier call: calls keep their order)
            record.waited_for_slot = slots.locked() or due < unblocked
            if slots.locked():
                await slots.acquire()
                unblocked = now()
            else:
                await slots.acquire()
            record.sent_ms = (now() - start) * 1000
            record.lateness_ms = max(0.0, record.sent_ms - record.scheduled_ms)
            task = asyncio.create_task(one(planned, record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(set(tasks))
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        for record in records:  # a task cancelled before it began never ran its own handler
            if record.sent_ms is not None and record.status == "not_sent":
                record.status, record.error = "cancelled", "the replay was interrupted as the call was sent"
        raise


async def _check_gateway(client: httpx.AsyncClient, spec: BackboneSpec) -> None:
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise ReplayError(f"the gateway at {client.base_url} does not answer ({type(e).__name__}: {e}); is "
                          "`lorafn up` running? (--gateway)") from None
    if response.status_code != 200:
        raise ReplayError(f"GET /v1/models answered {response.status_code}: {_error_of(response.content)[1]}"
                          + (" (--api-key)" if response.status_code == 401 else ""))
    base = response.json()["data"][0]["id"]
    if base != spec.name:
        raise ReplayError(f"the gateway serves the base model {base!r}, and the adapters would be made for "
                          f"{spec.name!r}: pass --backbone, the .gguf file or checkpoint directory the workers serve")


async def provision(client: httpx.AsyncClient, plan: Plan, spec: BackboneSpec, work: Path,
                    log: Callable[[str], None]) -> tuple[str, dict[str, str]]:
    """Reuse or push the plan's adapters (module docstring, step 2); (the caller's tenant, name -> what was
    done: "reused", "pushed" or "pushed (new version)")."""
    from storage.adapter_format import write_peft_adapter

    await _check_gateway(client, spec)
    listed = (await client.get("/v1/adapters")).json()["data"]
    held = {a["name"]: a for a in listed}
    tenant = listed[0]["tenant"] if listed else None
    done: dict[str, str] = {}
    for a in plan.adapters:
        have = held.get(a.name)
        if (have is not None and have["max_rank"] == a.rank and sorted(have["target_modules"]) == sorted(
                ADAPTER_MODULES) and have["base_model"] == spec.name):
            done[a.name] = "reused"
            continue
        path = await asyncio.to_thread(write_peft_adapter, work / a.name, spec, rank=a.rank, modules=ADAPTER_MODULES,
                                       seed=zlib.crc32(a.name.encode()), std=ADAPTER_STD)
        t0 = time.perf_counter()
        response = await push_adapter(client, a.name, path)
        if response.status_code not in (200, 201):
            raise ReplayError(f"pushing {a.name} (rank {a.rank}) answered {response.status_code}: "
                              f"{_error_of(response.content)[1]}")
        body = response.json()
        tenant = body["tenant"]
        done[a.name] = "pushed" if have is None else "pushed (new version)"
        log(f"pushed {body['id']} rank {a.rank}, {body['bytes'] / 1e6:.1f} MB in "
            f"{(time.perf_counter() - t0) * 1000:.0f} ms")
    assert tenant is not None  # a plan has at least one adapter, listed or pushed
    return tenant, done


async def run_replay(plan: Plan, *, gateway: str, api_key: str, spec: BackboneSpec, route: Route = "openai",
                     concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT, timeout_s: float = DEFAULT_TIMEOUT_S,
                     log: Callable[[str], None] = lambda _: None,
                     on_records: Callable[[list[CallRecord], dict[str, str]], None] = lambda *_: None,
                     ) -> tuple[list[CallRecord], dict[str, str]]:
    """Provision the adapters and send the calls; (records, what was done per adapter). `on_records` receives the
    records before the first call is sent, so a caller holds them even if this is cancelled midway."""
    if concurrency_limit < 1:
        raise ReplayError(f"--concurrency-limit must be at least 1 (got {concurrency_limit})")
    limits = httpx.Limits(max_connections=concurrency_limit + 2, max_keepalive_connections=concurrency_limit + 2)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {api_key}"}, limits=limits,
                                 timeout=timeout) as client:
        with tempfile.TemporaryDirectory(prefix="lorafn-replay-") as work:
            tenant, provisioned = await provision(client, plan, spec, Path(work), log)
        records = new_records(plan, tenant)
        on_records(records, provisioned)
        log(f"replaying {len(plan.calls):,} calls over {plan.calls[-1].at_s:,.1f} s ...")
        await send_all(plan, records, call_openai if route == "openai" else call_faas, client,
                       concurrency_limit=concurrency_limit, timeout_s=timeout_s)
    return records, provisioned


# -- the command ----------------------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _backbone_spec(backbone: Path | None) -> BackboneSpec:
    from storage.backbone import resolve_backbone_spec
    from storage.settings import RegistrySettings

    if backbone is not None:
        return resolve_backbone_spec(gguf=backbone if backbone.is_file() else None,
                                     hf_dir=None if backbone.is_file() else backbone)
    registry = RegistrySettings()
    return resolve_backbone_spec(gguf=registry.backbone_gguf, hf_dir=registry.backbone_hf_dir)


def replay_command(
    trace: Annotated[Path, typer.Argument(help="a canonical trace CSV (python -m bench.traces convert), or an Azure "
                                               "LLM or Alibaba GenAI trace", exists=True, dir_okay=False)],
    speed: Annotated[float, typer.Option(help="compress time: a trace second lasts 1/X s")] = 1.0,
    adapters: Annotated[int | None, typer.Option(
        min=1, help="map the trace's adapter keys, by popularity, onto N adapters of mixed ranks (default: one "
                    "per key)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="replay only the first N requests")] = None,
    duration: Annotated[float | None, typer.Option(help="replay only the requests due in the first S seconds "
                                                        "of the replay (after --speed)")] = None,
    concurrency_limit: Annotated[int, typer.Option(
        min=1, help="calls in flight at most; a call due over it waits (counted in the report)")]
    = DEFAULT_CONCURRENCY_LIMIT,
    gateway: Annotated[str, typer.Option(envvar="LORAFN_GATEWAY_URL", help="the gateway's URL")] = DEFAULT_GATEWAY,
    api_key: Annotated[str | None, typer.Option(
        envvar="LORAFN_API_KEY", help="API key (default: the dev tenant's key of the local stack)")] = None,
    max_tokens_cap: Annotated[int, typer.Option(min=1, help="cap on a call's max_tokens")] = DEFAULT_MAX_TOKENS_CAP,
    report: Annotated[Path | None, typer.Option(help="write the report as JSON here and a markdown summary "
                                                     "beside it (.md)")] = None,
    route: Annotated[str, typer.Option(help="openai: /v1/completions streamed (TTFT measured here); faas: the "
                                            "synchronous FaaS invocation (TTFT the worker's)")] = "openai",
    backbone: Annotated[Path | None, typer.Option(
        help="the .gguf file or checkpoint dir the workers serve, for the adapters' shapes (default: "
             "LORAFN_REGISTRY__BACKBONE_*, else SmolLM2-135M)", exists=True)] = None,
    name_prefix: Annotated[str, typer.Option(
        help="adapters are named PREFIX-000, PREFIX-001, ... (another prefix: other adapters, cold)")] = "replay",
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds one call may take")] = DEFAULT_TIMEOUT_S,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="state directory of the local stack")]
    = None,
) -> None:
    """Send a trace's requests through the running gateway with their timing; report statuses, tiers, TTFT,
    latency and lateness (lorafn/replay.py describes every step)."""
    from lorafn.settings import LorafnSettings
    from protocol.subjects import NAME_PATTERN

    console, err = Console(soft_wrap=True), Console(stderr=True)

    def fail(message: str) -> typer.Exit:
        err.print(f"[bold red]error:[/] {message}", highlight=False)
        return typer.Exit(1)

    if route not in ROUTES:
        raise fail(f"--route must be one of {', '.join(ROUTES)} (got {route!r})")
    if not NAME_PATTERN.match(adapter_name(name_prefix, 0)):
        raise fail(f"--name-prefix {name_prefix!r} makes no valid adapter name (letters, digits, _ and -)")
    if report is not None and report.suffix == ".md":
        raise fail(f"--report names the JSON file; the markdown summary goes beside it ({report})")
    if api_key is None:
        key_file = (state_dir or LorafnSettings().state_dir) / "dev-api-key"
        if not key_file.is_file():
            raise fail(f"no API key: pass --api-key (or LORAFN_API_KEY); {key_file} does not exist")
        api_key = key_file.read_text().strip()
    try:
        rows = load_trace(trace)
        plan = plan_replay(rows, speed=speed, adapters=adapters, limit=limit, duration_s=duration,
                           max_tokens_cap=max_tokens_cap, name_prefix=name_prefix)
        spec = _backbone_spec(backbone)
    except (TraceError, ReplayError, OSError, ValueError) as e:
        raise fail(str(e)) from None
    console.print(f"{trace}: {len(plan.calls):,} of {plan.trace_rows:,} requests, {len(plan.adapters)} adapters, "
                  f"{plan.calls[-1].at_s:,.1f} s at speed {speed:g}", highlight=False)
    held: dict[str, Any] = {"records": [], "provisioned": {}}

    def keep(records: list[CallRecord], provisioned: dict[str, str]) -> None:
        held["records"], held["provisioned"] = records, provisioned

    t0 = time.monotonic()
    interrupted = False
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # SIGTERM ends the replay as Ctrl-C does: calls in flight cancelled, the report written
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        asyncio.run(run_replay(plan, gateway=gateway.rstrip("/"), api_key=api_key, spec=spec,
                               route=cast(Route, route),
                               concurrency_limit=concurrency_limit, timeout_s=timeout,
                               log=lambda m: console.print(m, highlight=False), on_records=keep))
    except ReplayError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        interrupted = True
        if not held["records"]:
            raise fail("interrupted before the first call") from None
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    options = {"speed": speed, "adapters": adapters, "limit": limit, "duration_s": duration,
               "concurrency_limit": concurrency_limit, "max_tokens_cap": max_tokens_cap, "route": route,
               "timeout_s": timeout, "backbone": spec.name}
    body = build_report(trace=trace, gateway=gateway, plan=plan, records=held["records"], options=options,
                        wall_s=time.monotonic() - t0, interrupted=interrupted, pushed=held["provisioned"])
    summary = markdown(body)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(body, indent=2) + "\n")
        report.with_suffix(".md").write_text(summary)
    console.print(summary, markup=False, highlight=False)
    if report is not None:
        console.print(f"report: {report} and {report.with_suffix('.md')}", highlight=False)
    if interrupted or body["summary"]["failed"]:
        raise typer.Exit(1)
