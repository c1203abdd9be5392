"""Rank-aware placement against rank-blind routing, in the simulator: `python -m bench placement [--quick]`.

The trace: the shared Alibaba GenAI trace (real adapter identities and popularity; 15 days, 76 adapters),
compressed in time so that a few workers are busy, its adapters given ranks drawn once from `RANK_MIX` (most
small, a few large: half rank 8, a quarter 16, an eighth 32, a sixteenth each 64 and 128). Every policy runs the
same calls through the same scheduler core and simulated workers (`bench.simulate`, this project's CPU cost
model); only the router differs:

- `random`: a uniformly random worker that can take the call (`RandomRouter`);
- `least_loaded`: the worker with the fewest calls outstanding, whatever it holds;
- `affinity`: today's router (`AffinityRouter`: device holders, a replica when busy, host holders, else the least
  loaded worker);
- `rank_aware`: `scheduler.placement.RankAwareRouter`, replanned by the core from the recent demand.

Rank-aware placement sizes rank classes with operating points. The simulator's own are derived here from the
cost model (`sim_operating_points`: one simulated worker, calls of one rank class at rising Poisson rates, the
highest decode throughput whose p95 TTFT is within the SLO), so the policy and the workers it is judged on agree.

Figures: the fewest workers each policy needs to keep p95 TTFT within the SLO (`workers_needed`), and at a fixed
number of workers the highest call rate it sustains within the SLO (`throughput_at_slo`, bisection over the time
compression). Written to bench/results/placement.json and placement.md, with a plot.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import traces
from bench.simulate import CostModel, SimReport, percentiles, simulate
from bench.traces import TraceRequest
from scheduler.core import CoreConfig
from scheduler.operating_points import OperatingPoint, OperatingPoints
from scheduler.placement import RankAwareRouter
from scheduler.policy import AffinityRouter, RandomRouter, Router

TRACES_DIR = Path(__file__).resolve().parents[2] / "shared" / "traces"
ALIBABA = "alibaba_genai_requests_2024-11-15_to_11-30.csv"
RANK_MIX = (8,) * 8 + (16,) * 4 + (32,) * 2 + (64,) + (128,)
CLASSES = (8, 16, 32, 64, 128)
POLICIES = ("random", "least_loaded", "affinity", "rank_aware")
SLO_S = 1.0  # p95 TTFT target


def make_router(name: str, points: OperatingPoints, seed: int = 0) -> Router:
    if name == "random":
        return RandomRouter(seed)
    if name == "least_loaded":
        return AffinityRouter(replicate_at=0, replicate_margin=0, prefer_host_cached=False)
    if name == "affinity":
        return AffinityRouter()
    if name == "rank_aware":
        return RankAwareRouter(points)
    raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")


def compress(rows: Sequence[TraceRequest], duration_s: float) -> list[TraceRequest]:
    """The rows with their times scaled so that the whole trace spans `duration_s`."""
    span = rows[-1].at_s - rows[0].at_s if rows else 0.0
    k = duration_s / span if span > 0 else 1.0
    return [TraceRequest((r.at_s - rows[0].at_s) * k, r.tenant, r.adapter, r.prompt_tokens, r.output_tokens)
            for r in rows]


def poisson_trace(rate: float, duration_s: float, *, adapters: int, prompt: int, output: int,
                  seed: int) -> list[TraceRequest]:
    """Each adapter called once at the start (their loads warm the worker), then Poisson calls from 60 s on."""
    rng = random.Random(seed)
    out = [TraceRequest(0.1 * i, "op", f"a{i}", prompt, 1) for i in range(adapters)]
    t = 60.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(TraceRequest(t, "op", f"a{rng.randrange(adapters)}", prompt, output))


@dataclass(frozen=True)
class Outcome:
    policy: str
    workers: int
    calls_per_s: float  # arrival rate of the scored calls
    scored: int
    failed: int
    unfinished: int
    ttft_p50_s: float
    ttft_p95_s: float
    cold_starts: int
    host_loads: int
    device_hits: int
    decisions: dict[str, int] = field(default_factory=dict)

    @property
    def within(self) -> bool:
        return self.failed == 0 and self.unfinished == 0


def outcome(policy: str, workers: int, r: SimReport, score_from: float) -> Outcome:
    ttfts = [c.ttft_s for c in r.calls if c.arrived >= score_from]
    pct = percentiles(ttfts, (50, 95))
    span = max(r.trace_s - score_from, 1e-9)
    return Outcome(policy, workers, len(ttfts) / span, r.scored, sum(r.failed.values()), r.unfinished,
                   pct["p50"], pct["p95"], r.cold_starts, r.host_loads, r.device_hits, dict(r.decisions))


def run_policy(rows: Sequence[TraceRequest], policy: str, workers: int, points: OperatingPoints, cost: CostModel, *,
               seed: int = 0, ranks: Sequence[int] = RANK_MIX, warmup: float = 0.1) -> Outcome:
    score_from = rows[-1].at_s * warmup if rows else 0.0
    report = simulate(rows, workers=workers, router=make_router(policy, points, seed), cost=cost, seed=seed,
                      ranks=ranks, score_from_s=score_from, core_config=CoreConfig(), max_drain_s=3600.0)
    return outcome(policy, workers, report, score_from)


def sim_operating_points(cost: CostModel, *, slo_s: float = SLO_S, classes: Sequence[int] = CLASSES,
                         prompt: int = 16, output: int = 128, adapters: int = 8, duration_s: float = 360.0,
                         seed: int = 0, iterations: int = 8) -> OperatingPoints:
    """Each class's operating point on one simulated worker (module docstring): bisection over the Poisson rate
    of calls to `adapters` adapters of that rank (each loaded first; scored over the second half)."""
    points = []
    for rank in classes:
        def p95(rate: float, rank: int = rank) -> float:
            rows = poisson_trace(rate, duration_s, adapters=adapters, prompt=prompt, output=output, seed=seed)
            report = simulate(rows, workers=1, cost=cost, seed=seed, adapter_ranks={f"a{i}": rank for i in range(adapters)},
                              score_from_s=duration_s / 2, max_drain_s=600.0)
            ttfts = [c.ttft_s for c in report.calls if c.arrived >= duration_s / 2]
            return percentiles(ttfts, (95,))["p95"] if report.unfinished == 0 else math.inf

        lo, hi = 0.05, 64.0
        for _ in range(iterations + 4):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if p95(mid) <= slo_s else (lo, mid)
        points.append(OperatingPoint(rank, lo * output, ttft_p95_s=p95(lo)))
    return OperatingPoints(slo_s, tuple(points), source=f"simulated worker ({prompt}-token prompts, {output}-token "
                                                        f"outputs, {adapters} adapters per class, p95 TTFT <= {slo_s} s)")


def workers_needed(rows: Sequence[TraceRequest], policy: str, points: OperatingPoints, cost: CostModel, *,
                   slo_s: float, max_workers: int, seed: int = 0) -> tuple[int | None, list[Outcome]]:
    """The fewest workers (1..max_workers) with p95 TTFT within the SLO, and every run made to find it."""
    runs = []
    for n in range(1, max_workers + 1):
        o = run_policy(rows, policy, n, points, cost, seed=seed)
        runs.append(o)
        if o.within and o.ttft_p95_s <= slo_s:
            return n, runs
    return None, runs


def throughput_at_slo(base: Sequence[TraceRequest], policy: str, workers: int, points: OperatingPoints,
                      cost: CostModel, *, slo_s: float, durations: tuple[float, float], seed: int = 0,
                      iterations: int = 6) -> tuple[float, list[Outcome]]:
    """The highest call rate (the trace compressed into a shorter span) whose p95 TTFT is within the SLO."""
    slow, fast = durations  # long span: low rate (must pass); short span: high rate
    runs: list[Outcome] = []
    best = 0.0
    for _ in range(iterations):
        mid = math.sqrt(slow * fast)
        o = run_policy(compress(base, mid), policy, workers, points, cost, seed=seed)
        runs.append(o)
        if o.within and o.ttft_p95_s <= slo_s:
            best, slow = max(best, o.calls_per_s), mid
        else:
            fast = mid
    return best, runs


@dataclass
class PlacementResult:
    slo_s: float
    workers_needed: dict[str, int | None]
    throughput: dict[str, float]
    throughput_workers: int
    points: dict[str, Any]
    runs: list[dict[str, Any]]
    settings: dict[str, Any]


def measure(base: Sequence[TraceRequest], *, duration_s: float, throughput_workers: int, max_workers: int,
            slo_s: float = SLO_S, seed: int = 0, cost: CostModel | None = None,
            policies: Sequence[str] = POLICIES, log: Callable[[str], None] = print) -> PlacementResult:
    cost = cost or CostModel()
    started = time.perf_counter()
    points = sim_operating_points(cost, slo_s=slo_s, seed=seed)
    log(f"operating points: {', '.join(f'r{p.rank} {p.tokens_per_s:.0f} tok/s' for p in points.points)} "
        f"({time.perf_counter() - started:.0f} s)")
    rows = compress(base, duration_s)
    needed: dict[str, int | None] = {}
    throughput: dict[str, float] = {}
    runs: list[dict[str, Any]] = []
    for policy in policies:
        n, tried = workers_needed(rows, policy, points, cost, slo_s=slo_s, max_workers=max_workers, seed=seed)
        needed[policy] = n
        runs += [{"search": "workers", **asdict(o)} for o in tried]
        best, tried = throughput_at_slo(base, policy, throughput_workers, points, cost, slo_s=slo_s,
                                        durations=(duration_s * 4, duration_s / 8), seed=seed)
        throughput[policy] = best
        runs += [{"search": "throughput", **asdict(o)} for o in tried]
        log(f"{policy}: workers needed {n}, {best:.2f} calls/s at the SLO on {throughput_workers} workers "
            f"({time.perf_counter() - started:.0f} s)")
    return PlacementResult(slo_s, needed, throughput, throughput_workers, points.to_dict(), runs,
                           {"duration_s": duration_s, "calls": len(base), "adapters": len({r.key for r in base}),
                            "rank_mix": list(RANK_MIX), "seed": seed, "max_workers": max_workers,
                            "cost": asdict(cost)})


def markdown(result: PlacementResult) -> str:
    blind = [p for p in result.workers_needed if p != "rank_aware"]
    best_blind_n = min((n for p in blind if (n := result.workers_needed[p]) is not None), default=None)
    best_blind_t = max(result.throughput[p] for p in blind) if blind else 0.0
    aware_n, aware_t = result.workers_needed.get("rank_aware"), result.throughput.get("rank_aware", 0.0)
    s = result.settings
    lines = [
        "# Rank-aware placement against rank-blind routing (simulator)",
        "",
        f"`python -m bench placement`: the Alibaba trace ({s['calls']:,} calls, {s['adapters']} adapters) compressed "
        f"into {s['duration_s']:.0f} s, ranks drawn from the mix {sorted(set(s['rank_mix']))} (half rank 8, a quarter "
        f"16, an eighth 32, a sixteenth each 64 and 128; seed {s['seed']}); SLO: p95 TTFT <= {result.slo_s} s. "
        "The simulated workers are this project's CPU cost model (`bench.simulate.CostModel`).",
        "",
        "| policy | workers needed | calls/s at the SLO on "
        f"{result.throughput_workers} workers |",
        "|---|---|---|",
    ]
    for p in result.workers_needed:
        n = result.workers_needed[p]
        shown = str(n) if n is not None else f"> {s['max_workers']}"
        lines.append(f"| {p} | {shown} | {result.throughput[p]:.2f} |")
    ratio_n = (aware_n / best_blind_n) if aware_n and best_blind_n else None
    ratio_t = (aware_t / best_blind_t) if best_blind_t else None
    lines += ["", f"Rank-aware against the best rank-blind policy: workers needed "
                  f"{'n/a' if ratio_n is None else f'{ratio_n:.2f}x'}, throughput at the SLO "
                  f"{'n/a' if ratio_t is None else f'{ratio_t:.2f}x'}.", "",
              "Operating points of the simulated worker (decode tokens/s at the SLO): "
              + ", ".join(f"rank {p['rank']} {p['tokens_per_s']:.0f}" for p in result.points["points"]) + ".", ""]
    return "\n".join(lines)


def plot(result: PlacementResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for policy in result.workers_needed:
        pts = sorted((r["workers"], r["ttft_p95_s"]) for r in result.runs
                     if r["policy"] == policy and r["search"] == "workers")
        ax.plot([w for w, _ in pts], [t for _, t in pts], marker="o", label=policy)
    ax.axhline(result.slo_s, color="grey", linestyle="--", label="SLO")
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("p95 TTFT (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> PlacementResult:
    from bench.report import RESULTS_DIR, write

    parser = argparse.ArgumentParser(prog="python -m bench placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=TRACES_DIR / ALIBABA)
    parser.add_argument("--duration-s", type=float, default=1800.0, help="the trace compressed into this span")
    parser.add_argument("--workers", type=int, default=4, help="workers of the throughput comparison")
    parser.add_argument("--max-workers", type=int, default=16)
    parser.add_argument("--slo", type=float, default=SLO_S, help="p95 TTFT target in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the first 3,000 calls only")
    args = parser.parse_args(argv)
    base = traces.load_trace(args.trace)
    if args.quick:
        base = base[:3000]
    result = measure(base, duration_s=args.duration_s, throughput_workers=args.workers, max_workers=args.max_workers,
                     slo_s=args.slo, seed=args.seed)
    write("placement", asdict(result))
    (RESULTS_DIR / "placement.md").write_text(markdown(result) + "\n![p95 TTFT by workers](placement.png)\n")
    plot(result, RESULTS_DIR / "placement.png")
    print(markdown(result))
    return result
