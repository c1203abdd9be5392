"""`python -m bench scheduling`: pre-staging policies compared on real traces with the simulator.

For each trace, every policy runs the whole trace through `bench.simulate` (the scheduler core, its router
and the policy's predictor, stager and eviction) with the same workers and the same device and host memory
per worker. The trace is split by time (`traces.split`): the calls of the earlier part (`warmup`, 60% of the
span by default) run like the others, warming the caches and training the predictors, and are not scored;
the figures are those of the later part.

Policies (`POLICIES`); every one but the baseline has the workers' host caches drop blobs by
GreedyDual-Size-Frequency over the host tier (`GreedyDualEviction(tier=host)`, the live worker's default):
- reactive LRU: no predictor, the workers evict the least recently used adapter from the device pool and
  the host cache (the baseline);
- reactive, GreedyDual host: no predictor, device pools LRU;
- reactive GreedyDual: no predictor, device pools by GreedyDual-Size-Frequency too;
- last_value, ewma, histogram, lstm, fallback (lstm -> histogram -> ewma), oracle: that predictor
  (`scheduler.predict.build_predictor`) with the predictive stager (`scheduler.staging.PredictiveStager`)
  at each staging interval, the device pools LRU when a call's load needs room;
- ewma + GreedyDual: the EWMA predictor and the stager, device pools by GreedyDual-Size-Frequency.

Traces (`default_setups`): the Alibaba GenAI trace with one adapter per model (77 models, 15 days) and the
Azure LLM conversation trace (19,366 requests in an hour) with Zipf(1.0)-assigned adapters, each on a
cluster whose device pools hold a fraction of the adapters (so that what a policy keeps there matters).

Written to the results folder: scheduling.md (the tables), scheduling.json (the figures) and five plots:
cold-start fraction, TTFT CDF and device memory-time per policy, the predictors' precision and recall over
time, and the fallback predictor's answering member over time. `--quick` runs a small slice of each trace.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import traces
from bench.simulate import (
    CostModel,
    SimReport,
    WorkerConfig,
    build_staging,
    eviction_factory,
    host_eviction_factory,
    load_cost,
    simulate,
)
from bench.traces import TraceRequest
from scheduler.core import CoreConfig
from scheduler.staging import PredictiveStager

ROOT = Path(__file__).resolve().parents[1]
TRACES_DIR = ROOT.parent / "shared" / "traces"  # the shared traces beside the project (its README)
ALIBABA = "alibaba_genai_requests_2024-11-15_to_11-30.csv"
AZURE_CONV = "AzureLLMInferenceTrace_conv.csv"
MIB = 1 << 20


@dataclass(frozen=True)
class Policy:
    name: str
    predictor: str  # bench.simulate.PREDICTOR_NAMES ("none": reactive)
    eviction: str = "lru"  # the workers' device-pool eviction: lru or greedy_dual
    host_eviction: str = "greedy_dual"  # the workers' host-cache eviction (the live worker's default)


POLICIES = (
    Policy("reactive LRU", "none", "lru", "lru"),
    Policy("reactive, GreedyDual host", "none", "lru"),
    Policy("reactive GreedyDual", "none", "greedy_dual"),
    Policy("last_value", "last_value"),
    Policy("ewma", "ewma"),
    Policy("ewma + GreedyDual", "ewma", "greedy_dual"),
    Policy("histogram", "histogram"),
    Policy("lstm", "lstm"),
    Policy("fallback", "fallback"),
    Policy("oracle", "oracle"),
)
BASELINE = POLICIES[0].name


@dataclass(frozen=True)
class Setup:
    """One trace and the cluster it runs on."""

    name: str
    title: str  # what the trace is, for the report
    rows: Sequence[TraceRequest]
    workers: int
    device_bytes: int  # per worker
    host_bytes: int  # per worker
    interval_s: float  # staging interval
    warmup: float = 0.6  # fraction of the span that only warms up


@dataclass
class PolicyResult:
    """One policy on one trace: the figures of the scored calls, and the series the plots draw."""

    policy: str
    scored: int
    cold_starts: int
    cold_fraction: float
    host_loads: int
    device_hits: int
    ttft_s: dict[str, float]  # mean, p50, p90, p99
    latency_s: dict[str, float]
    load_wait_s: dict[str, float]
    device_gb_h: float  # device memory-time over the scored span, all workers
    device_gb_mean: float  # mean device bytes held per worker over the scored span, GB
    staged_loads: int
    staged_fetches: int
    staged_evictions: int
    stage_dropped: int
    precision: float | None  # over the scored intervals: hits / predicted (None without a predictor)
    recall: float | None  # hits / versions called
    unfinished: int
    wall_s: float
    score_from: float  # trace time from which calls are scored
    switches: list[tuple[float, str, str, str]] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list, repr=False)
    intervals: list[dict[str, Any]] = field(default_factory=list, repr=False)  # all of them, warm-up included


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def run_policy(setup: Setup, policy: Policy, *, cost: CostModel, seed: int = 0) -> PolicyResult:
    """Simulate `setup`'s trace with `policy`; the figures of the calls after the warm-up."""
    rows = list(setup.rows)
    _, later = traces.split(rows, setup.warmup)
    score_from = later[0].at_s if later else math.inf
    predictor, stager = build_staging(policy.predictor, "auto", interval_s=setup.interval_s, cost=cost,
                                      workers=setup.workers, trace=rows, seed=seed)
    worker = WorkerConfig(device_pool_bytes=setup.device_bytes, host_cache_bytes=setup.host_bytes)
    started = time.perf_counter()
    try:
        report = simulate(rows, workers=[worker] * setup.workers, cost=cost, seed=seed,
                          core_config=CoreConfig(staging_interval_s=setup.interval_s),
                          eviction=eviction_factory(policy.eviction, cost),
                          host_eviction=host_eviction_factory(policy.host_eviction, cost), predictor=predictor,
                          stager=stager, score_from_s=score_from)
    finally:
        close = getattr(predictor, "close", None)
        if close is not None:
            close()
    wall = time.perf_counter() - started
    return _result(policy.name, report, score_from, setup.workers, wall)


def _result(name: str, r: SimReport, score_from: float, workers: int, wall: float) -> PolicyResult:
    span = max(r.trace_s - score_from, 1e-9)
    scored_intervals = [i for i in r.intervals if i["end"] > score_from]
    predicted = sum(i["predicted"] for i in scored_intervals)
    called = sum(i["called"] for i in scored_intervals)
    hits = sum(i["hits"] for i in scored_intervals)
    records = r.per_worker.values()
    return PolicyResult(
        policy=name, scored=r.scored, cold_starts=r.cold_starts, cold_fraction=r.cold_starts / max(r.scored, 1),
        host_loads=r.host_loads, device_hits=r.device_hits, ttft_s=r.ttft_s, latency_s=r.latency_s,
        load_wait_s=r.load_wait_s, device_gb_h=r.device_byte_s / 1e9 / 3600,
        device_gb_mean=r.device_byte_s / span / workers / 1e9,
        staged_loads=sum(w.staged_loads for w in records), staged_fetches=sum(w.staged_fetches for w in records),
        staged_evictions=sum(w.staged_evictions for w in records), stage_dropped=sum(w.stage_dropped for w in records),
        precision=_ratio(hits, predicted) if r.intervals else None, recall=_ratio(hits, called) if r.intervals else None,
        unfinished=r.unfinished, wall_s=wall, score_from=score_from, switches=r.switches,
        ttfts=sorted(c.ttft_s for c in r.calls if c.arrived >= score_from), intervals=r.intervals,
    )


# -- the traces ----------------------------------------------------------------------------------------------


def default_setups(traces_dir: Path = TRACES_DIR, *, quick: bool = False, seed: int = 0,
                   adapters: int = 1000) -> list[Setup]:
    """The two shared traces and their clusters (module docstring). Quick: the first 3 days of the Alibaba
    trace, the first 3,000 Azure requests over 200 adapters."""
    alibaba = traces.load_trace(traces_dir / ALIBABA, alibaba_key="model", seed=seed)
    azure = traces.load_trace(traces_dir / AZURE_CONV, adapters=200 if quick else adapters, zipf_s=1.0, seed=seed,
                              limit=3000 if quick else None)
    if quick:
        alibaba = [r for r in alibaba if r.at_s < 3 * 86_400]
    models = len({r.key for r in alibaba})
    return [
        Setup("alibaba", f"Alibaba GenAI trace, one adapter per model ({models} models, {len(alibaba):,} requests "
                         f"over {alibaba[-1].at_s / 86_400:.1f} days)",
              alibaba, workers=4, device_bytes=64 * MIB, host_bytes=256 * MIB, interval_s=60.0),
        Setup("azure_conv", f"Azure LLM conversation trace, {len({r.key for r in azure}):,} adapters by Zipf(1.0) "
                            f"({len(azure):,} requests over {azure[-1].at_s / 60:.0f} min)",
              azure, workers=24, device_bytes=256 * MIB, host_bytes=1024 * MIB, interval_s=10.0),
    ]


# -- the report ----------------------------------------------------------------------------------------------


def report(setups: Sequence[Setup], policies: Sequence[Policy] = POLICIES, *, out_dir: Path,
           cost: CostModel | None = None, seed: int = 0,
           progress: Callable[[str], None] | None = None) -> dict[str, list[PolicyResult]]:
    """Run every policy on every setup; write scheduling.md, scheduling.json and the plots to `out_dir`."""
    cost = cost or CostModel()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[PolicyResult]] = {}
    for setup in setups:
        results[setup.name] = []
        for policy in policies:
            result = run_policy(setup, policy, cost=cost, seed=seed)
            results[setup.name].append(result)
            if progress is not None:
                progress(f"{setup.name} / {policy.name}: {result.scored} scored, {result.cold_starts} cold starts, "
                         f"TTFT p50 {result.ttft_s['p50']:.3f} s, {result.wall_s:.1f} s")
    plots = _plots(setups, results, out_dir)
    (out_dir / "scheduling.md").write_text(_markdown(setups, results, cost, plots, seed, policies))
    _write_json(setups, results, cost, seed, out_dir)
    return results


def _write_json(setups: Sequence[Setup], results: dict[str, list[PolicyResult]], cost: CostModel, seed: int,
                out_dir: Path) -> None:
    from bench.report import write  # imports torch (machine info)

    payload = {
        "cost": asdict(cost), "seed": seed,
        "setups": [{"name": s.name, "title": s.title, "requests": len(s.rows), "workers": s.workers,
                    "device_bytes": s.device_bytes, "host_bytes": s.host_bytes, "interval_s": s.interval_s,
                    "warmup": s.warmup} for s in setups],
        "results": {name: [{k: v for k, v in asdict(r).items() if k not in ("ttfts", "intervals")} for r in rs]
                    for name, rs in results.items()},
    }
    write("scheduling", payload, results_dir=out_dir)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _markdown(setups: Sequence[Setup], results: dict[str, list[PolicyResult]], cost: CostModel,
              plots: list[str], seed: int, policies: Sequence[Policy] = POLICIES) -> str:
    out = [
        "# Pre-staging policies on real traces",
        "",
        "`python -m bench scheduling` (bench/scheduling.py): every policy runs the whole trace through the "
        "simulator (`bench.simulate`: the scheduler core, the affinity router, the policy's predictor, stager "
        "and eviction; the cost model below), on the same workers with the same device and host memory per "
        "worker. The earlier part of each trace warms the caches and trains the predictors and is not scored; "
        "the figures are those of the calls of the later part. Deterministic for a seed "
        f"(seed {seed}); wall seconds are this machine's.",
        "",
        "- cold start: the call's adapter was only in the object store when it was dispatched (it waited for a "
        "fetch and a load, or for a staged load still under way); host load: it was in the host cache; device "
        "hit: on the device;",
        "- device memory-time: device bytes held (resident or being loaded) x time, summed over the workers, "
        "over the scored span; GB mean: per worker;",
        "- precision / recall: over the scored staging intervals, of the versions the answering predictor gave a "
        "probability >= 0.5 against the versions called in the interval (the core's interval records);",
        "- vs reactive: cold starts of the policy / cold starts of reactive LRU.",
        "",
        _host_note(policies),
        "",
        _release_note(PredictiveStager()),
        "",
        f"Cost model: {', '.join(f'{k} {v:g}' for k, v in asdict(cost).items())}.",
        "",
    ]
    for setup in setups:
        rs = results[setup.name]
        base = next((r for r in rs if r.policy == BASELINE), None)
        warm_s = setup.warmup * (setup.rows[-1].at_s - setup.rows[0].at_s) if setup.rows else 0.0
        fewest = min(rs, key=lambda r: (r.cold_starts, r.policy)) if rs else None
        leanest = min(rs, key=lambda r: (r.device_gb_h, r.policy)) if rs else None
        out += [
            f"## {setup.title}",
            "",
            f"{setup.workers} workers, each with a {_size(setup.device_bytes)} device adapter pool and a "
            f"{_size(setup.host_bytes)} host cache; staging interval {setup.interval_s:g} s. The first "
            f"{setup.warmup:.0%} of the span ({_duration(warm_s)}) warms up: the {rs[0].scored if rs else 0:,} "
            f"calls from {_duration(rs[0].score_from if rs else 0.0)} on are scored.",
            "",
            "| policy | cold starts | cold fraction | vs reactive | host loads | device hits | TTFT mean s | "
            "TTFT p50 s | TTFT p99 s | device GB·h | GB mean | precision | recall | staged loads / fetches / "
            "evictions | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            vs = _ratio(r.cold_starts, base.cold_starts) if base is not None else None
            out.append(
                f"| {r.policy} | {r.cold_starts:,} | {r.cold_fraction:.3f} | {_fmt(vs, 2)}{'x' if vs is not None else ''} | "
                f"{r.host_loads:,} | "
                f"{r.device_hits:,} | {r.ttft_s['mean']:.3f} | {r.ttft_s['p50']:.3f} | {r.ttft_s['p99']:.3f} | "
                f"{r.device_gb_h:.3f} | {r.device_gb_mean:.3f} | {_fmt(r.precision, 2)} | {_fmt(r.recall, 2)} | "
                f"{r.staged_loads:,} / {r.staged_fetches:,} / {r.staged_evictions:,} | {r.wall_s:.1f} |"
            )
        if fewest is not None and leanest is not None:
            out += ["", f"Fewest cold starts: {fewest.policy} ({fewest.cold_starts:,}); least device memory-time: "
                        f"{leanest.policy} ({leanest.device_gb_h:.3g} GB·h"
                        + (f", {leanest.device_gb_h / base.device_gb_h:.0%} of reactive LRU's" if base and
                           base.device_gb_h else "") + ")."]
        if base is not None and base.ttft_s["mean"] > 0:
            out += ["", _wait_note(rs, base)]
        unfinished = [r for r in rs if r.unfinished]
        if unfinished:
            out += ["", "Unfinished calls: " + ", ".join(f"{r.policy} {r.unfinished}" for r in unfinished) + "."]
        switches = [(r.policy, s) for r in rs for s in r.switches]
        out += ["", f"Fallback switches: {len(switches)}" + (":" if switches else ".")]
        if switches:
            out += ["", "| policy | at (trace s) | from | to | reason |", "|---|---|---|---|---|"]
            for policy, (at, frm, to, why) in switches[:20]:
                out.append(f"| {policy} | {at:.0f} | {frm} | {to} | {why} |")
            if len(switches) > 20:
                out.append(f"| ... {len(switches) - 20} more | | | | |")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def _wait_note(rs: Sequence[PolicyResult], base: PolicyResult) -> str:
    """How much of the mean TTFT staging can remove at all: the calls' wait for their adapter after dispatch
    (a fetch and a load, or a load from the host cache) against the rest (queueing and prefill), which no
    staging policy changes much."""
    ttft, wait = base.ttft_s["mean"], base.load_wait_s["mean"]
    rest = sorted({f"{r.ttft_s['mean'] - r.load_wait_s['mean']:.3f}" for r in rs}, key=float)
    span = rest[0] if len(rest) == 1 else f"{rest[0]}-{rest[-1]}"
    return (f"Waiting for adapters is {wait:.3f} s of {base.policy}'s {ttft:.3f} s mean TTFT ({wait / ttft:.0%}); "
            f"the rest (queueing, prefill) is {span} s under every policy. A policy whose "
            f"calls never waited for an adapter would have a mean TTFT of about {ttft - wait:.3f} s, "
            f"{(ttft - wait) / ttft:.2f}x {base.policy}'s.")


def _host_note(policies: Sequence[Policy]) -> str:
    """How the policies' host caches drop blobs (`Policy.host_eviction`), and the routing all of them share."""
    lru = ", ".join(p.name for p in policies if p.host_eviction == "lru")
    greedy = ("GreedyDual-Size-Frequency over the host tier (use count x object-store fetch seconds / bytes, aged; "
              "the live worker's default)")
    if not lru:
        caches = f"Every policy has the host caches drop blobs by {greedy}."
    elif all(p.host_eviction == "lru" for p in policies):
        caches = "Every policy has the host caches drop their least recently used blobs first."
    else:
        caches = f"Every policy but {lru} has the host caches drop blobs by {greedy}, {lru} least recently used first."
    return ("Every policy routes a cold call, among equally loaded workers, to the one with the most room left in "
            "its host cache. " + caches)


def _release_note(stager: PredictiveStager) -> str:
    host = (f"below {stager.host_release_at:g} it leaves the worker" if stager.host_release_at > 0
            else "host blobs leave only when the host cache is full")
    dedupe = ("" if stager.dedupe_host_at > 1 else
              f" A host cache at least {stager.dedupe_host_at:.0%} full drops, down to {stager.dedupe_host_to:.0%}, "
              "the host-only copies of adapters another worker holds (least recently used first, never the last "
              "copy): a call of one goes to a holder, so the room keeps more distinct adapters in the cluster.")
    return ("The predictive policies also release: the stager takes a device copy back to the host cache when its "
            f"probability of a call in the next interval is below {stager.device_release_at:g} and no call has used "
            f"it for {stager.keep_alive_s / 60:g} min ({host}); the reactive policies keep whatever fits until a "
            "load needs the room. Releases save device memory-time and cost a host load when the adapter is "
            "called again." + dedupe)


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.3g} GiB" if nbytes >= 1 << 30 else f"{nbytes / MIB:.3g} MiB"


def _duration(s: float) -> str:
    if s >= 2 * 86_400:
        return f"{s / 86_400:.1f} days"
    if s >= 2 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.0f} min"


# -- plots ---------------------------------------------------------------------------------------------------


def _plots(setups: Sequence[Setup], results: dict[str, list[PolicyResult]], out_dir: Path) -> list[str]:
    """The five PNGs (module docstring); their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in setups]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    def bars(name: str, ylabel: str, value: Callable[[PolicyResult], float]) -> None:
        fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
        for ax, setup in zip(axes[0], setups, strict=True):
            rs = results[setup.name]
            ax.bar(range(len(rs)), [value(r) for r in rs], color="tab:blue")
            ax.set_xticks(range(len(rs)), [r.policy for r in rs], rotation=40, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(setup.name)
        save(fig, name)

    bars("scheduling_cold_fraction.png", "cold-start fraction of scored calls", lambda r: r.cold_fraction)
    bars("scheduling_device_memory.png", "device memory-time, GB·h (all workers)", lambda r: r.device_gb_h)

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, setup in zip(axes[0], setups, strict=True):
        for r in results[setup.name]:
            xs = [max(t, 1e-3) for t in r.ttfts]
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r.policy, linewidth=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT, s (log)")
        ax.set_ylabel("fraction of scored calls")
        ax.set_title(setup.name)
        ax.legend(fontsize=7)
    save(fig, "scheduling_ttft_cdf.png")

    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 6.5), squeeze=False)
    for col, setup in enumerate(setups):
        for r in results[setup.name]:
            if not r.intervals:
                continue
            for row, key in enumerate(("precision", "recall")):
                xs, ys = _rolling(r.intervals, key)
                if xs:
                    axes[row][col].plot(xs, ys, label=r.policy, linewidth=1.0)
        for row, key in enumerate(("precision", "recall")):
            if results[setup.name]:
                axes[row][col].axvline(results[setup.name][0].score_from / 3600, color="black", linestyle="--",
                                       linewidth=0.8)
            axes[row][col].set_ylabel(f"{key} (sliding window)")
            axes[row][col].set_ylim(-0.02, 1.02)
            axes[row][col].set_title(f"{setup.name}: {key} per interval")
            axes[row][col].set_xlabel("trace time, h (dashed: end of the warm-up)")
            axes[row][col].legend(fontsize=7)
    save(fig, "scheduling_precision_recall.png")

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.6), squeeze=False)
    for ax, setup in zip(axes[0], setups, strict=True):
        fallback = next((r for r in results[setup.name] if r.policy == "fallback"), None)
        if fallback is None or not fallback.intervals:
            ax.set_title(f"{setup.name}: no fallback run")
            continue
        answered = [i for i in fallback.intervals if i["predictor"]]  # the first interval had no prediction
        members = sorted({i["predictor"] for i in answered})
        ax.step([i["end"] / 3600 for i in answered], [members.index(i["predictor"]) for i in answered],
                where="post", linewidth=1.0)
        ax.set_yticks(range(len(members)), [m.split(":")[-1] for m in members])
        for switch in fallback.switches:
            ax.axvline(switch[0] / 3600, color="tab:red", alpha=0.3, linewidth=0.8)
        ax.axvline(fallback.score_from / 3600, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("trace time, h (red: switches; dashed: end of the warm-up)")
        ax.set_title(f"{setup.name}: answering member ({len(fallback.switches)} switches)")
    save(fig, "scheduling_fallback.png")
    return written


def _rolling(intervals: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """`key` (precision or recall) pooled over a sliding window of intervals (hits / predicted, hits / called:
    30 intervals, or a 150th of the trace if more), at each interval's end in hours; NaN (a gap in the line)
    where the window predicted (or called) nothing."""
    window = max(30, len(intervals) // 150)
    total = "predicted" if key == "precision" else "called"
    xs: list[float] = []
    ys: list[float] = []
    hits = count = 0
    for n, i in enumerate(intervals):
        hits, count = hits + i["hits"], count + i[total]
        if n >= window:
            hits, count = hits - intervals[n - window]["hits"], count - intervals[n - window][total]
        xs.append(i["end"] / 3600)
        ys.append(hits / count if count else math.nan)
    return xs, ys


# -- command line --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, list[PolicyResult]]:
    from bench.report import RESULTS_DIR

    parser = argparse.ArgumentParser(prog="python -m bench scheduling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small slice of each trace (a smoke run)")
    parser.add_argument("--traces-dir", type=Path, default=TRACES_DIR,
                        help="folder of the shared traces (default ../shared/traces beside the project)")
    parser.add_argument("--adapters", type=int, default=1000, help="Zipf adapters of the Azure trace (default 1000)")
    parser.add_argument("--policies", help=f"comma-separated subset of: {', '.join(p.name for p in POLICIES)}")
    parser.add_argument("--trace", action="append", choices=("alibaba", "azure_conv"), help="only these traces")
    parser.add_argument("--warmup", type=float, default=0.6, help="fraction of each trace that only warms up (0.6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost", type=Path, help="JSON file of CostModel fields (default: the built-in)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the report goes")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < 1:
        raise SystemExit(f"--warmup must be between 0 and 1 (got {args.warmup})")
    policies: Sequence[Policy] = POLICIES
    if args.policies:
        wanted = [p.strip() for p in args.policies.split(",")]
        unknown = sorted(set(wanted) - {p.name for p in POLICIES})
        if unknown:
            raise SystemExit(f"unknown policies {unknown}; known: {', '.join(p.name for p in POLICIES)}")
        policies = [p for p in POLICIES if p.name in wanted]
    try:
        setups = default_setups(args.traces_dir, quick=args.quick, seed=args.seed, adapters=args.adapters)
    except OSError as e:
        raise SystemExit(f"cannot read the traces in {args.traces_dir}: {e}") from e
    setups = [Setup(s.name, s.title, s.rows, s.workers, s.device_bytes, s.host_bytes, s.interval_s, args.warmup)
              for s in setups if not args.trace or s.name in args.trace]
    started = time.perf_counter()
    results = report(setups, policies, out_dir=args.results_dir, cost=load_cost(args.cost), seed=args.seed,
                     progress=lambda line: print(line, flush=True))
    print(f"wrote {args.results_dir / 'scheduling.md'} in {time.perf_counter() - started:.0f} s")
    return results
