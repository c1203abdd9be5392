"""`python -m bench rank-burst`: a burst of calls mixing small- and large-rank adapters on the live local stack,
routed by the affinity router (rank-blind, the default) and by the rank-aware router, side by side.

For each router in `--routers` (default: affinity, then rank_aware), on a fresh stack each time:

1. `lorafn up --workers 3` (`bench.launcher`: a child process, its state in a temporary directory, the default
   SmolLM2 backbone unless `--tiny`, one compute thread per process, LORAFN_SCHEDULER__ROUTER set to the
   router; every other setting the default) and, once the scheduler counts every worker alive, the same
   adapters pushed: `--small` adapters of rank `--small-rank` (8) and `--large` of rank `--large-rank` (128),
   random, on q_proj and v_proj (`lorafn.replay`'s module set), written once and pushed to each stack;
2. warm-up: every adapter called `--warmup-rounds` times, the calls spread evenly over `--warmup-s` seconds
   (ranks interleaved, `warmup_schedule`), streamed like the burst's, so that each adapter has been loaded
   somewhere and the rank-aware scheduler has demand to plan from; then, for rank_aware, a wait until the
   scheduler's metrics count a `replan` decision (the core's first plan comes about 5 s after the first call);
3. the burst: `--calls` calls sent at once, `--small-share` of them to the small adapters (round robin) and the
   rest to the large ones, interleaved (`burst_calls`), each `POST /v1/completions` streamed with the same short
   prompt (a story opening, so that no adapter ends its text at once) and `--max-tokens`, greedy; TTFT (the
   first chunk with text, or the finish chunk if it comes first), latency and tokens generated measured by the
   client (`stream_call`);
4. afterwards: the worker that ran each call and its dispatches (its invocation row in Postgres), the
   scheduler's dispatch decisions during the burst (the change of `lorafn_dispatch_decisions_total{reason}`)
   and each worker's peak queue while it lasted (`lorafn_worker_queue`, sampled every 0.25 s), from the
   scheduler's metrics endpoint (its URL is in the scheduler's log).

Reported per router and rank class (`summarise`, `compare`, pure functions of the per-call records): calls,
failures, p50/p99 TTFT and latency (nearest rank, `lorafn.replay.percentiles`), calls per worker and the
adapters' tiers on arrival; per worker, how many calls of each class it ran; and the ratio affinity /
rank_aware of the small-rank calls' p99 TTFT (and of the large-rank calls', which class separation may cost).
Written to bench/results/rank_burst.json and .md, and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROUTERS = ("affinity", "rank_aware")
PROMPT = "Once upon a time, in a small village by the sea, there lived"  # continues past 16 tokens
SMALL, LARGE = "small", "large"
METRICS_URL = re.compile(r"scheduler \S+ metrics on (http://\S+)")
SAMPLE_S = 0.25  # between two readings of the scheduler's metrics during the burst
PLAN_TIMEOUT_S = 30.0
WORKERS_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class BurstOptions:
    """One comparison: the stack, the adapters, the warm-up and the burst."""

    workers: int = 3
    small_rank: int = 8
    large_rank: int = 128
    small: int = 12  # adapters of small_rank
    large: int = 4  # adapters of large_rank
    calls: int = 48  # in the burst
    small_share: float = 0.75  # of the burst's calls, to the small adapters
    max_tokens: int = 16
    warmup_s: float = 20.0
    warmup_rounds: int = 3  # calls of each adapter during the warm-up
    routers: tuple[str, ...] = ROUTERS
    tiny: bool = False  # the tiny random backbone instead of SmolLM2

    def __post_init__(self) -> None:
        if self.small < 1 or self.large < 1:
            raise ValueError(f"need at least one adapter of each rank (small {self.small}, large {self.large})")
        if not 0 < self.small_rank < self.large_rank:
            raise ValueError(f"small_rank ({self.small_rank}) must be positive and below large_rank ({self.large_rank})")
        if not 0 < self.small_share < 1:
            raise ValueError(f"small_share ({self.small_share}) must be between 0 and 1")
        if self.calls < 2 or self.max_tokens < 1 or self.workers < 1:
            raise ValueError(f"calls ({self.calls}) must be at least 2, max_tokens ({self.max_tokens}) and workers "
                             f"({self.workers}) at least 1")
        if self.warmup_s < 0 or self.warmup_rounds < 0:
            raise ValueError(f"warmup_s ({self.warmup_s}) and warmup_rounds ({self.warmup_rounds}) must be >= 0")
        unknown = sorted(set(self.routers) - set(ROUTERS))
        if unknown or not self.routers:
            raise ValueError(f"routers {list(self.routers)}: choose among {', '.join(ROUTERS)}")


# -- plain decisions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BurstAdapter:
    name: str
    rank: int
    kind: str  # SMALL or LARGE


def adapters(options: BurstOptions) -> list[BurstAdapter]:
    """The adapters of a run: small ones first, then large ones."""
    return ([BurstAdapter(f"burst-r{options.small_rank}-{i:02d}", options.small_rank, SMALL) for i in range(options.small)]
            + [BurstAdapter(f"burst-r{options.large_rank}-{i:02d}", options.large_rank, LARGE)
               for i in range(options.large)])


def _interleave(small: Sequence[BurstAdapter], large: Sequence[BurstAdapter]) -> list[BurstAdapter]:
    """Both lists merged so that the large ones are spread evenly among the small ones (in order within each)."""
    n = len(small) + len(large)
    out: list[BurstAdapter] = []
    si = li = 0
    for i in range(n):
        # the large list's share of the first i + 1 places, rounded: take a large one when it falls behind
        if li < len(large) and (si >= len(small) or (li + 0.5) * n / len(large) <= i + 1):
            out.append(large[li])
            li += 1
        else:
            out.append(small[si])
            si += 1
    return out


def burst_calls(options: BurstOptions) -> list[BurstAdapter]:
    """The burst, in sending order: round(calls * small_share) calls over the small adapters round robin, the rest
    over the large ones, interleaved (at least one call of each kind)."""
    everything = adapters(options)
    small = [a for a in everything if a.kind == SMALL]
    large = [a for a in everything if a.kind == LARGE]
    n_small = min(options.calls - 1, max(1, round(options.calls * options.small_share)))
    return _interleave([small[i % len(small)] for i in range(n_small)],
                       [large[i % len(large)] for i in range(options.calls - n_small)])


def warmup_schedule(options: BurstOptions) -> list[tuple[float, BurstAdapter]]:
    """(seconds from the start, adapter) of every warm-up call: `warmup_rounds` rounds, each adapter once per
    round (ranks interleaved as in the burst), the calls evenly spaced over `warmup_s`."""
    everything = adapters(options)
    one_round = _interleave([a for a in everything if a.kind == SMALL], [a for a in everything if a.kind == LARGE])
    calls = one_round * options.warmup_rounds
    step = options.warmup_s / len(calls) if calls else 0.0
    return [(i * step, a) for i, a in enumerate(calls)]


@dataclass
class BurstCall:
    """One call of the burst and what was seen of it."""

    index: int
    adapter: str
    rank: int
    kind: str
    status: str = "not_sent"  # ok, http_<status>:<code>, stream_error:<code>, incomplete, transport:<error>
    error: str | None = None
    invocation_id: str | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    tier: str | None = None  # where the adapter was when the call arrived
    worker: str | None = None  # the worker that ran it (its invocation row)
    attempts: int | None = None  # dispatches of the invocation
    completion_tokens: int | None = None


def _pcts(values: Sequence[float]) -> dict[str, float | None]:
    from lorafn.replay import percentiles

    p = percentiles(values)
    return {"p50": p["p50"], "p99": p["p99"], "max": p["max"]}


def _group(calls: Sequence[BurstCall]) -> dict[tuple[str, str], list[BurstCall]]:
    out: dict[tuple[str, str], list[BurstCall]] = collections.defaultdict(list)
    for c in calls:
        out[(c.worker or "unknown", c.kind)].append(c)
    return out


def summarise(calls: Sequence[BurstCall]) -> dict[str, Any]:
    """Per kind (small, large): calls, ok, failed, TTFT and latency percentiles (ok calls, ms), mean tokens, calls
    per worker and per tier; per worker, calls of each kind, and per worker and kind the calls, the cold ones
    (adapter in the object store on arrival) and TTFT min / median / max; and the failures' statuses."""
    by_kind: dict[str, Any] = {}
    for kind in (SMALL, LARGE):
        mine = [c for c in calls if c.kind == kind]
        ok = [c for c in mine if c.status == "ok"]
        by_kind[kind] = {
            "ranks": sorted({c.rank for c in mine}),
            "calls": len(mine), "ok": len(ok), "failed": len(mine) - len(ok),
            "ttft_ms": _pcts([c.ttft_ms for c in ok if c.ttft_ms is not None]),
            "latency_ms": _pcts([c.latency_ms for c in ok if c.latency_ms is not None]),
            "tokens_mean": (sum(c.completion_tokens or 0 for c in ok) / len(ok)) if ok else None,
            "workers": dict(sorted(collections.Counter(c.worker or "unknown" for c in mine).items())),
            "tiers": dict(sorted(collections.Counter(c.tier or "unknown" for c in mine).items())),
        }
    per_worker: dict[str, dict[str, int]] = {}
    for c in calls:
        row = per_worker.setdefault(c.worker or "unknown", {SMALL: 0, LARGE: 0})
        row[c.kind] += 1
    ttft: dict[str, dict[str, Any]] = {}
    for (worker, kind), mine in sorted(_group(calls).items()):
        t = sorted(c.ttft_ms for c in mine if c.status == "ok" and c.ttft_ms is not None)
        ttft.setdefault(worker, {})[kind] = {
            "calls": len(mine), "cold": sum(1 for c in mine if c.tier == "object"),
            "ttft_ms_min": t[0] if t else None, "ttft_ms_median": statistics.median(t) if t else None,
            "ttft_ms_max": t[-1] if t else None}
    failures = collections.Counter(c.status for c in calls if c.status != "ok")
    return {"by_kind": by_kind, "per_worker": dict(sorted(per_worker.items())), "per_worker_ttft": ttft,
            "failures": dict(failures),
            "failed": sum(failures.values()),
            "redispatched": sum(1 for c in calls if c.attempts is not None and c.attempts > 1)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(summaries: Mapping[str, Mapping[str, Any]], *, target: float = 2.0) -> dict[str, Any]:
    """Affinity against rank-aware: the ratio affinity / rank_aware of each kind's p99 and p50 TTFT (above 1:
    rank-aware is faster), whether the small calls' p99 improved by `target` or more, and whether no call failed
    in either run. Empty unless both routers ran."""
    if not {"affinity", "rank_aware"} <= set(summaries):
        return {}
    a, r = summaries["affinity"]["by_kind"], summaries["rank_aware"]["by_kind"]
    out: dict[str, Any] = {}
    for kind in (SMALL, LARGE):
        for p in ("p50", "p99"):
            out[f"{kind}_ttft_{p}_ratio"] = _ratio(a[kind]["ttft_ms"][p], r[kind]["ttft_ms"][p])
    ratio = out[f"{SMALL}_ttft_p99_ratio"]
    out["target"] = target
    out["target_met"] = ratio is not None and ratio >= target
    out["no_failures"] = all(s["failed"] == 0 for s in summaries.values())
    return out


# -- metrics -----------------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^(\w+)\{(\w+)="([^"]*)"\}\s+(\S+)$')


def parse_metric(text: str, name: str) -> dict[str, float]:
    """label value -> sample of metric `name` with one label, from Prometheus text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            out[m.group(3)] = float(m.group(4))
    return out


def decisions_between(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, int]:
    """The dispatch decisions counted between two readings of `lorafn_dispatch_decisions_total`."""
    return {k: int(after[k] - before.get(k, 0.0)) for k in sorted(after) if after[k] - before.get(k, 0.0) > 0}


# -- report ----------------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def rows(payload: Mapping[str, Any]) -> list[list[Any]]:
    """The table: one row per router and kind."""
    out = []
    for router, run in payload["runs"].items():
        for kind, k in run["summary"]["by_kind"].items():
            out.append([router, f"{kind} (rank {', '.join(map(str, k['ranks']))})", k["calls"], k["failed"],
                        _ms(k["ttft_ms"]["p50"]), _ms(k["ttft_ms"]["p99"]), _ms(k["latency_ms"]["p50"]),
                        _ms(k["latency_ms"]["p99"]), "-" if k["tokens_mean"] is None else f"{k['tokens_mean']:.1f}",
                        ", ".join(f"{w} {n}" for w, n in k["workers"].items())])
    return out


COLUMNS = ["router", "calls to", "calls", "failed", "TTFT p50 ms", "TTFT p99 ms", "latency p50 ms", "latency p99 ms",
           "tokens (mean)", "calls per worker"]


def markdown(payload: Mapping[str, Any]) -> str:
    o = payload["options"]
    lines = [
        "# Rank burst: rank-aware against affinity routing on the live stack",
        "",
        f"`python -m bench rank-burst`: `lorafn up --workers {o['workers']}` ({payload['backbone']}, one compute "
        f"thread per process, {payload['machine_note']}), a fresh stack per router. {o['small']} adapters of rank "
        f"{o['small_rank']} and {o['large']} of rank {o['large_rank']} (q_proj, v_proj); warm-up: each adapter "
        f"called {o['warmup_rounds']} times over {o['warmup_s']:g} s; then {o['calls']} calls at once "
        f"({payload['burst']['small']} to the rank-{o['small_rank']} adapters round robin, "
        f"{payload['burst']['large']} to the rank-{o['large_rank']} ones), streamed, max_tokens {o['max_tokens']}, "
        f"greedy. TTFT and latency measured by the client; nearest-rank percentiles.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows(payload)]
    c = payload["comparison"]
    if c:
        lines += ["", f"Affinity / rank-aware, rank-{o['small_rank']} calls: TTFT p99 {_x(c['small_ttft_p99_ratio'])}, "
                      f"p50 {_x(c['small_ttft_p50_ratio'])}; rank-{o['large_rank']} calls: TTFT p99 "
                      f"{_x(c['large_ttft_p99_ratio'])}, p50 {_x(c['large_ttft_p50_ratio'])} (above 1: rank-aware "
                      f"is faster). Target {c['target']:g}x on the rank-{o['small_rank']} p99: "
                      f"{'met' if c['target_met'] else 'not met'}; "
                      f"{'no call failed' if c['no_failures'] else 'some calls failed'}."]
    lines += ["", "Where the burst's calls ran (calls of each rank per worker), the scheduler's dispatch decisions "
                  "during the burst, and each worker's peak queue (the scheduler's count, sampled every 0.25 s):", ""]
    for router, run in payload["runs"].items():
        workers = ", ".join(f"{w}: {n[SMALL]} rank {o['small_rank']} + {n[LARGE]} rank {o['large_rank']}"
                            for w, n in run["summary"]["per_worker"].items())
        decisions = ", ".join(f"{k} {v}" for k, v in run["decisions"].items()) or "-"
        peaks = ", ".join(f"{w} {v:g}" for w, v in run["queue_peak"].items()) or "-"
        lines.append(f"- {router}: {workers}. Decisions: {decisions}. Peak queues: {peaks}. Plans before the "
                     f"burst: {run['replans_before_burst']}.")
    lines += ["", "TTFT per worker and rank (ms; cold: the adapter was in the object store when the call arrived):",
              "", "| router | worker | calls to | calls | cold | TTFT min | TTFT median | TTFT max |", "|---" * 8 + "|"]
    for router, run in payload["runs"].items():
        for worker, kinds in run["summary"]["per_worker_ttft"].items():
            for kind, t in kinds.items():
                rank = o["small_rank"] if kind == SMALL else o["large_rank"]
                lines.append(f"| {router} | {worker} | rank {rank} | {t['calls']} | {t['cold']} | "
                             f"{_ms(t['ttft_ms_min'])} | {_ms(t['ttft_ms_median'])} | {_ms(t['ttft_ms_max'])} |")
    if payload.get("observations"):
        lines += ["", payload["observations"]]
    return "\n".join(lines) + "\n"


def print_report(payload: Mapping[str, Any]) -> None:
    from bench.report import print_table

    print_table("rank burst: TTFT and latency by router and rank", COLUMNS, rows(payload))
    c = payload["comparison"]
    if c:
        print(f"affinity / rank_aware TTFT p99: small {_x(c['small_ttft_p99_ratio'])}, large "
              f"{_x(c['large_ttft_p99_ratio'])}; target {c['target']:g}x {'met' if c['target_met'] else 'not met'}; "
              f"{'no call failed' if c['no_failures'] else 'some calls failed'}")
    for router, run in payload["runs"].items():
        print(f"{router}: per worker {run['summary']['per_worker']}, decisions {run['decisions']}, "
              f"peak queues {run['queue_peak']}")


# -- I/O -------------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[rank-burst {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_adapters(root: Path, spec: Any, options: BurstOptions) -> dict[str, Path]:
    """name -> folder of each adapter of the run (random, seeded by its name)."""
    from lorafn.replay import ADAPTER_MODULES, ADAPTER_STD
    from storage.adapter_format import write_peft_adapter

    return {a.name: write_peft_adapter(root / a.name, spec, rank=a.rank, modules=ADAPTER_MODULES,
                                       seed=zlib.crc32(a.name.encode()), std=ADAPTER_STD)
            for a in adapters(options)}


async def push_all(http: httpx.AsyncClient, folders: Mapping[str, Path]) -> None:
    from lorafn.gateway_client import push_adapter

    for name, folder in folders.items():
        r = await push_adapter(http, name, folder)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"pushing {name} answered {r.status_code}: {r.text}")


async def stream_call(http: httpx.AsyncClient, tenant: str, call: BurstCall, max_tokens: int) -> None:
    """One streamed completion through `lorafn.replay.call_openai` (greedy, usage asked for): the call's status,
    TTFT (its first text, or the finish chunk when no text came before it), latency, tokens generated, tier and
    invocation id."""
    from lorafn.replay import CallRecord, call_openai

    record = CallRecord(call.index, call.adapter, f"{tenant}/{call.adapter}", call.rank, 0, max_tokens, 0.0)
    try:
        await call_openai(http, record, PROMPT, time.perf_counter)
    except (httpx.HTTPError, OSError) as e:
        record.status, record.error = f"transport:{type(e).__name__}", str(e)
    call.status, call.error, call.invocation_id, call.tier = record.status, record.error, record.invocation_id, record.tier
    call.ttft_ms, call.latency_ms, call.completion_tokens = record.ttft_ms, record.latency_ms, record.completion_tokens


def read_workers(database_url: str, ids: Sequence[str]) -> dict[str, tuple[str | None, int]]:
    """invocation id -> (worker that ran it, dispatches), from the invocation rows."""
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, connect_timeout=5) as conn:
        found = conn.execute("SELECT id, worker_id, attempts FROM invocations WHERE id = ANY(%s)",
                             (list(ids),)).fetchall()
    return {str(i): (w, int(n or 0)) for i, w, n in found}


@dataclass
class Metrics:
    """The scheduler's metrics endpoint (None: not known, nothing read)."""

    url: str | None

    async def read(self, http: httpx.AsyncClient) -> str:
        if self.url is None:
            return ""
        with contextlib.suppress(httpx.HTTPError):
            r = await http.get(self.url, timeout=5)
            if r.status_code == 200:
                return r.text
        return ""

    async def decisions(self, http: httpx.AsyncClient) -> dict[str, float]:
        return parse_metric(await self.read(http), "lorafn_dispatch_decisions_total")


@dataclass
class Sampled:
    peaks: dict[str, float] = field(default_factory=dict)


async def sample_queues(metrics: Metrics, http: httpx.AsyncClient, stop: asyncio.Event, into: Sampled) -> None:
    while not stop.is_set():
        for worker, n in parse_metric(await metrics.read(http), "lorafn_worker_queue").items():
            into.peaks[worker] = max(into.peaks.get(worker, 0.0), n)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)


async def measure(http: httpx.AsyncClient, *, tenant: str, folders: Mapping[str, Path], options: BurstOptions,
                  database_url: str, metrics: Metrics, wait_for_plan: bool,
                  log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Push, warm up, wait for a plan (`wait_for_plan`), send the burst, read where it ran."""
    await push_all(http, folders)
    log(f"pushed {len(folders)} adapters; warming up for {options.warmup_s:g} s")
    started = asyncio.get_running_loop().time()

    async def warm(i: int, at: float, a: BurstAdapter) -> BurstCall:
        delay = started + at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        call = BurstCall(i, a.name, a.rank, a.kind)
        await stream_call(http, tenant, call, options.max_tokens)
        return call

    warmup = await asyncio.gather(*(warm(i, at, a) for i, (at, a) in enumerate(warmup_schedule(options))))
    warm_failed = collections.Counter(c.status for c in warmup if c.status != "ok")
    log(f"warm-up: {len(warmup)} calls, failures {dict(warm_failed) or 'none'}")
    replans = (await metrics.decisions(http)).get("replan", 0.0)
    if wait_for_plan and metrics.url is not None:
        deadline = time.monotonic() + PLAN_TIMEOUT_S
        while replans < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            replans = (await metrics.decisions(http)).get("replan", 0.0)
        log(f"plans so far: {replans:g}")
    await asyncio.sleep(1.5)  # the warm-up's last decisions reach the metrics at the core's next tick
    before = await metrics.decisions(http)
    sampled, stop = Sampled(), asyncio.Event()
    sampler = asyncio.create_task(sample_queues(metrics, http, stop, sampled))
    burst = [BurstCall(i, a.name, a.rank, a.kind) for i, a in enumerate(burst_calls(options))]
    t0 = time.monotonic()
    await asyncio.gather(*(stream_call(http, tenant, c, options.max_tokens) for c in burst))
    burst_s = time.monotonic() - t0
    stop.set()
    await sampler
    await asyncio.sleep(1.5)  # the core's decision counts reach the metrics each tick
    after = await metrics.decisions(http)
    ids = [c.invocation_id for c in burst if c.invocation_id]
    where = await asyncio.to_thread(read_workers, database_url, ids) if ids else {}
    for c in burst:
        if c.invocation_id in where:
            c.worker, c.attempts = where[c.invocation_id]
    summary = summarise(burst)
    log(f"burst: {len(burst)} calls in {burst_s:.1f} s, failed {summary['failed']}")
    return {"warmup": {"calls": len(warmup), "failures": dict(warm_failed)},
            "replans_before_burst": int(before.get("replan", 0.0)), "burst_s": burst_s, "summary": summary,
            "decisions": decisions_between(before, after), "queue_peak": dict(sorted(sampled.peaks.items())),
            "calls": [asdict(c) for c in burst]}


def _metrics_url(state: Path) -> str | None:
    log_file = state / "logs" / "scheduler.log"
    with contextlib.suppress(OSError):
        m = METRICS_URL.search(log_file.read_text(errors="replace"))
        if m:
            return m.group(1)
    return None


def run_router(router: str, options: BurstOptions, root: Path, folders: Mapping[str, Path],
               backbone: Path | None) -> dict[str, Any]:
    """One router on a fresh stack (module docstring, steps 1 to 4)."""
    from bench.launcher import TENANT, running_stack, wait_until

    state = root / f"state-{router}"
    t0 = time.monotonic()
    with running_stack(state, workers=options.workers, backbone=backbone,
                       env={"LORAFN_SCHEDULER__ROUTER": router}, one_thread=True) as stack:
        url = wait_until(stack, lambda: _metrics_url(state), timeout=60, what="the scheduler's metrics URL")
        metrics = Metrics(url)

        def all_alive() -> bool:
            with httpx.Client(timeout=5) as client:
                live = re.search(r"^lorafn_live_workers\s+(\S+)$", client.get(url).text, re.M)
                return live is not None and float(live.group(1)) >= options.workers

        wait_until(stack, all_alive, timeout=WORKERS_TIMEOUT_S, what=f"{options.workers} workers alive")
        _log(f"{router}: stack up in {time.monotonic() - t0:.0f} s, metrics {url}")

        async def go() -> dict[str, Any]:
            async with stack.http() as http:
                return await measure(http, tenant=TENANT, folders=folders, options=options,
                                     database_url=stack.database_url(), metrics=metrics,
                                     wait_for_plan=router == "rank_aware")

        return asyncio.run(go())


def run(options: BurstOptions, *, results_dir: Path | None = None, write: bool = True) -> dict[str, Any]:
    from bench.report import RESULTS_DIR
    from bench.report import write as write_json

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorafn-rank-burst-") as tmp:
        root = Path(tmp)
        backbone: Path | None = None
        if options.tiny:
            from workers.tiny import write_tiny_backbone

            backbone = write_tiny_backbone(root / "backbone")
        from lorafn.replay import _backbone_spec

        spec = _backbone_spec(backbone)
        folders = write_adapters(root / "adapters", spec, options)
        runs = {router: run_router(router, options, root, folders, backbone) for router in options.routers}
    burst = collections.Counter(a.kind for a in burst_calls(options))
    summaries = {r: run["summary"] for r, run in runs.items()}
    payload: dict[str, Any] = {
        "options": {**asdict(options), "routers": list(options.routers)},
        "backbone": spec.name + (" (tiny random)" if options.tiny else ""),
        "machine_note": f"{os.cpu_count()} CPU cores shared by the stack and the client",
        "burst": {SMALL: burst[SMALL], LARGE: burst[LARGE]},
        "runs": runs, "comparison": compare(summaries), "elapsed_s": time.monotonic() - started,
    }
    print_report(payload)
    if write:
        directory = results_dir or RESULTS_DIR
        write_json("rank_burst", payload, results_dir=directory)
        (directory / "rank_burst.md").write_text(markdown(payload))
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    d = BurstOptions()
    parser = argparse.ArgumentParser(prog="python -m bench rank-burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS))
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--small", type=int, default=d.small, help="adapters of the small rank")
    parser.add_argument("--large", type=int, default=d.large, help="adapters of the large rank")
    parser.add_argument("--small-rank", type=int, default=d.small_rank)
    parser.add_argument("--large-rank", type=int, default=d.large_rank)
    parser.add_argument("--calls", type=int, default=d.calls, help="calls in the burst")
    parser.add_argument("--small-share", type=float, default=d.small_share, help="of the burst, to small adapters")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens)
    parser.add_argument("--warmup-s", type=float, default=d.warmup_s)
    parser.add_argument("--warmup-rounds", type=int, default=d.warmup_rounds)
    parser.add_argument("--tiny", action="store_true", help="the tiny random backbone (default: SmolLM2-135M)")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        options = BurstOptions(workers=args.workers, small_rank=args.small_rank, large_rank=args.large_rank,
                               small=args.small, large=args.large, calls=args.calls, small_share=args.small_share,
                               max_tokens=args.max_tokens, warmup_s=args.warmup_s, warmup_rounds=args.warmup_rounds,
                               routers=tuple(args.routers), tiny=args.tiny)
    except ValueError as e:
        parser.error(str(e))
    return run(options, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
