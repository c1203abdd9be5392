"""Operating points of one worker: the decode throughput it sustains per LoRA rank class (and per mix of
classes) while the p95 TTFT of its calls stays within the SLO. `python -m bench operating-points [--quick]
[--tiny] [--slo S]` writes bench/results/operating_points.json and .md (`--quick`, which `make bench` runs:
operating_points_quick.*) and, from a full run on the default backbone, the points file the scheduler's
rank-aware placement reads (`scheduler/operating_points.json`, format in `scheduler.operating_points`).

Workload: one engine (the default backbone, SmolLM2-135M, fp32, on CUDA when there is one; `--tiny`: the
tiny random backbone) stepped by hand with a clock, one engine per series. A series is one rank class (8,
16, 32, 64, 128) or a mix of classes by share of calls (90% rank 8 + 10% rank 128; 50% each; most small,
a few large: half rank 8, a quarter 16, an eighth 32, a sixteenth each 64 and 128). Each class has
`max_adapters` distinct adapters (random PEFT adapters over all seven projections; one set of weights per
class registered under every key, so the pool holds a separate copy of each), all resident before the
first level and never evicted. Call n of a class uses that class's adapter n mod `max_adapters`, so the
calls in flight use as many distinct adapters as there are calls (up to `max_adapters`): each step reads
many adapters, as a worker serving thousands of them does. Every call has a `prompt_tokens` prompt cut
from real text (`bench.corpus`) and generates exactly `new_tokens` tokens greedily (no stop on EOS).

Method: a closed loop at a given concurrency c: c calls are in flight, and when one finishes a new one is
submitted at once (between two steps, as a client that sends its next call the moment the previous one
ends), so each step decodes c calls and prefills the newcomers. A level from c to a higher c' first
submits the c' - c new calls with staggered output lengths (1 .. `new_tokens`, so that they do not finish
together and arrive again in a convoy) and steps until each has its first token (the warm-up, not
counted); a level to a lower c aborts the newest calls. Then the window: only calls submitted from its
start are measured. It closes after `min_window_s` and `min_window_steps` steps (half an output: the
throughput of a few steps depends on how many prefills they happened to hold) once `min_calls` calls
have their first token or their p95 so far is within half the SLO (clearly within); at once when two
calls and over 5% of them are over the SLO (clearly over); at the latest after `max_window_s`.

Figures per level: tokens/s (every token generated in the window's steps / the window's length; the
scheduler's demand counts every output token), TTFT (submission to the end of the step that gave the
first token; a measured call still without one when the window closes counts the time it has waited)
p50, p95 (nearest rank) and max, the median step, the calls measured.

The search per series (`next_concurrency`, plain data): `start_concurrency` (4), then upward from the
highest level within the SLO by the factor SLO / its p95 (TTFT grows about linearly with c, from a floor,
so this approaches the crossing from below), at most doubling, at most `max_concurrency`; it stops when
that factor is below `near` (within 15% of the crossing by that estimate). After a level over the SLO it
bisects between the highest level within and the lowest over, `refine` times at most, while they are more
than `near` apart; while no level is within it halves down to one call. The operating point (`choose`) is
the level of highest tokens/s among those whose p95 TTFT is within the SLO (measured, not interpolated);
when even one call at a time misses the SLO the series has no point and the file gets the lowest level's
throughput, marked in the JSON.

TTFT here counts from a submission just before a step; a call that arrives at a random moment also waits
for the rest of the step under way (half a step on average), which this closed loop leaves out. The
machine's other jobs stall single steps (one stalled step can put a level over the SLO) and change its speed
from minute to minute: on 2 shared CPU cores a series measured twice a few minutes apart differed by up to
15%, more than ranks 8, 16 and 32 differ from each other. Throughput is flat near the SLO, so the point's
concurrency moves more between runs than its tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench import corpus
from bench.report import RESULTS_DIR, print_table, write
from scheduler.operating_points import DEFAULT_PATH, MixPoint, OperatingPoint, OperatingPoints
from storage.adapter_format import read_upload, validate, write_peft_adapter
from storage.backbone import DEFAULT_BACKBONE_NAME, default_gguf_path
from workers.adapter_pool import AdapterDtype, LoraWeights, adapter_pool_dtype
from workers.adapters import lora_weights_from_parsed
from workers.batcher import TokenEvent
from workers.engine import Engine, EngineSettings
from workers.kv_cache import DEFAULT_BLOCK_SIZE, block_bytes
from workers.model import Backbone
from workers.sampling import SamplingParams
from workers.tokenizer import Tokenizer
from workers.weights import load_backbone

logger = logging.getLogger(__name__)

MB = 1 << 20
CLASSES = (8, 16, 32, 64, 128)
# Shares of calls per rank class; the last one: half rank 8, a quarter 16, an eighth 32, a sixteenth 64 and 128.
MIXES: tuple[tuple[tuple[int, float], ...], ...] = (
    ((8, 0.9), (128, 0.1)),
    ((8, 0.5), (128, 0.5)),
    ((8, 0.5), (16, 0.25), (32, 0.125), (64, 0.0625), (128, 0.0625)),
)
CLEARLY_WITHIN = 0.5  # a window may close early once its p95 is within this fraction of the SLO
PROMPTS = 64  # distinct prompts, used in turn


@dataclass(frozen=True)
class PointsSettings:
    """What one run measures (module docstring)."""

    classes: tuple[int, ...] = CLASSES
    mixes: tuple[tuple[tuple[int, float], ...], ...] = MIXES
    slo_ttft_s: float = 1.0
    prompt_tokens: int = 128
    new_tokens: int = 32
    start_concurrency: int = 4
    max_concurrency: int = 128
    max_adapters: int = 64
    min_calls: int = 20
    min_window_steps: int = 16
    min_window_s: float = 2.0
    max_window_s: float = 8.0
    near: float = 1.15
    refine: int = 2
    max_levels: int = 12
    seed: int = 0
    adapter_dtype: AdapterDtype = "auto"

    def __post_init__(self) -> None:
        if not self.classes or min(self.classes) < 1:
            raise ValueError(f"rank classes {self.classes}: need at least one, each >= 1")
        for mix in self.mixes:
            if not mix or min(r for r, _ in mix) < 1 or min(s for _, s in mix) <= 0:
                raise ValueError(f"a mix is (rank >= 1, share > 0) pairs (got {mix})")
        if not self.slo_ttft_s > 0:
            raise ValueError(f"slo_ttft_s must be > 0 (got {self.slo_ttft_s})")
        if min(self.prompt_tokens, self.start_concurrency, self.max_concurrency, self.max_adapters, self.min_calls,
               self.min_window_steps, self.max_levels) < 1:
            raise ValueError(
                f"prompt_tokens ({self.prompt_tokens}), start_concurrency ({self.start_concurrency}), max_concurrency "
                f"({self.max_concurrency}), max_adapters ({self.max_adapters}), min_calls ({self.min_calls}), "
                f"min_window_steps ({self.min_window_steps}) and max_levels ({self.max_levels}) must be >= 1"
            )
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens ({self.new_tokens}) must be >= 2: a call must decode")
        if not 0 <= self.min_window_s <= self.max_window_s:
            raise ValueError(f"need 0 <= min_window_s ({self.min_window_s}) <= max_window_s ({self.max_window_s})")
        if not self.near > 1 or self.refine < 0:
            raise ValueError(f"near ({self.near}) must be > 1 and refine ({self.refine}) >= 0")

    @property
    def ranks(self) -> tuple[int, ...]:
        """Every rank class a series uses."""
        return tuple(sorted({*self.classes, *(r for mix in self.mixes for r, _ in mix)}))

    def series(self) -> list[tuple[tuple[int, float], ...]]:
        """Each series' shares of calls per class: the classes alone, then the mixes."""
        return [((rank, 1.0),) for rank in self.classes] + list(self.mixes)


QUICK = PointsSettings(classes=(8, 128), mixes=MIXES[:1], min_calls=10, min_window_steps=8, min_window_s=1.0,
                       max_window_s=4.0, refine=1, max_levels=8)


def label(shares: Sequence[tuple[int, float]]) -> str:
    """'rank 8' for a class alone, else '90% r8 + 10% r128'."""
    if len(shares) == 1:
        return f"rank {shares[0][0]}"
    total = sum(s for _, s in shares)
    return " + ".join(f"{100 * s / total:.4g}% r{r}" for r, s in shares)


# ----------------------------------------------------------------------------------------- decisions


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(len(ordered) * q / 100) - 1))]


def next_concurrency(levels: Sequence[tuple[int, float]], settings: PointsSettings) -> int | None:
    """The next concurrency to measure after `levels` ((concurrency, p95 TTFT s), in the order measured), or
    None when the search is over (module docstring)."""
    if not levels:
        return min(settings.start_concurrency, settings.max_concurrency)
    if len(levels) >= settings.max_levels:
        return None
    slo, tried = settings.slo_ttft_s, {c for c, _ in levels}
    within = [(c, p) for c, p in levels if p <= slo]
    lo, lo_p95 = max(within, default=(0, 0.0))
    over = [c for c, p in levels if p > slo and c > lo]
    if lo == 0:  # nothing within yet: halve down to one call at a time
        nxt = min(tried) // 2
        return nxt if nxt >= 1 else None
    if over:
        hi = min(over)
        first_over = next(i for i, (_, p) in enumerate(levels) if p > slo)
        if len(levels) - 1 - first_over >= settings.refine:
            return None
        mid = (lo + hi) // 2
        return mid if mid not in tried and hi - lo > max(1.0, lo * (settings.near - 1)) else None
    if lo >= settings.max_concurrency:
        return None
    factor = slo / lo_p95 if lo_p95 > 0 else math.inf
    if factor < settings.near:
        return None
    nxt = min(settings.max_concurrency, 2 * lo, math.floor(lo * factor) if math.isfinite(factor) else 2 * lo)
    return nxt if nxt > lo and nxt not in tried else None


def choose(levels: Sequence[Mapping[str, Any]], slo_ttft_s: float) -> Mapping[str, Any] | None:
    """The level of highest tokens/s among those with p95 TTFT within the SLO; None when there is none."""
    within = [lv for lv in levels if lv["ttft_p95_s"] <= slo_ttft_s]
    return max(within, key=lambda lv: lv["tokens_per_s"]) if within else None


def points_from(payload: Mapping[str, Any]) -> OperatingPoints:
    """The scheduler's operating points from a run's payload: one point per class series, one mix per mix
    series (a series without a point within the SLO gives its lowest level, see the module docstring)."""
    s = payload["settings"]
    points, mixes = [], []
    for series in payload["series"]:
        p = series["point"]
        if len(series["shares"]) == 1:
            points.append(OperatingPoint(series["shares"][0][0], p["tokens_per_s"], p["concurrency"], p["ttft_p95_s"]))
        else:
            mixes.append(MixPoint({r: sh for r, sh in series["shares"]}, p["tokens_per_s"], p["concurrency"],
                                  p["ttft_p95_s"]))
    source = (f"python -m bench operating-points, {payload['measured_on']}: {s['model']} {s['dtype']} on {s['device']} "
              f"({s['threads']} threads), adapters {s['adapter_pool_dtype']}, one engine, closed loop, "
              f"{s['prompt_tokens']}-token prompts, {s['new_tokens']}-token outputs, up to {s['max_adapters']} "
              f"distinct adapters per class, p95 TTFT <= {s['slo_ttft_s']} s")
    return OperatingPoints(s["slo_ttft_s"], tuple(points), tuple(mixes), source)


# ----------------------------------------------------------------------------------------- the closed loop


@dataclass
class Call:
    adapter: str
    submitted: float
    measured: bool
    first: float | None = None


@dataclass
class ClosedLoop:
    """Calls of one series kept in flight on one engine (module docstring); `clock` in seconds."""

    engine: Engine
    prompts: Sequence[Sequence[int]]
    pick: Callable[[], str]  # the adapter of the next call
    settings: PointsSettings
    clock: Callable[[], float]
    calls: dict[str, Call] = field(default_factory=dict)  # in flight, in submission order
    measuring: bool = False
    samples: list[float] = field(default_factory=list)  # TTFTs of measured calls
    submitted: int = 0
    _tokens: int = 0  # tokens of the step under way
    _firsts: list[Call] = field(default_factory=list)  # calls whose first token came in the step under way

    def _on_token(self, event: TokenEvent) -> None:
        if event.token_id is None:  # an abort's final event
            return
        self._tokens += 1
        call = self.calls.get(event.request_id)
        if call is not None and call.first is None:
            self._firsts.append(call)

    def submit(self, new_tokens: int) -> str:
        adapter = self.pick()
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        request_id = f"call-{self.submitted}"
        prompt = self.prompts[self.submitted % len(self.prompts)]
        self.submitted += 1
        self.calls[request_id] = Call(adapter, self.clock(), self.measuring)
        self.engine.submit(prompt, adapter=adapter, params=params, on_token=self._on_token, request_id=request_id)
        return request_id

    def step(self) -> int:
        """One engine step; stamps first tokens, submits a call for each one that finished; returns the tokens
        the step generated."""
        self._tokens, self._firsts = 0, []
        done = self.engine.step()
        now = self.clock()
        for call in self._firsts:
            call.first = now
            if call.measured:
                self.samples.append(now - call.submitted)
        for completion in done:
            del self.calls[completion.request_id]
        for _ in done:
            self.submit(self.settings.new_tokens)
        return self._tokens

    def resize(self, concurrency: int) -> float:
        """Bring the calls in flight to `concurrency` (module docstring); returns the warm-up's seconds."""
        started = self.clock()
        self.measuring = False
        extra = concurrency - len(self.calls)
        if extra < 0:
            for request_id in list(self.calls)[extra:]:
                self.engine.abort(request_id)
                del self.calls[request_id]
        new = {self.submit(max(1, math.ceil(self.settings.new_tokens * (k + 1) / extra))) for k in range(extra)}
        while any(self.calls[i].first is None for i in new if i in self.calls):
            self.step()
        return self.clock() - started

    def _window_done(self, elapsed: float, steps: int) -> bool:
        s, n = self.settings, len(self.samples)
        if elapsed >= s.max_window_s:
            return True
        over = sum(t > s.slo_ttft_s for t in self.samples)
        if over >= 2 and over > 0.05 * n:  # clearly over: its throughput is never a point's
            return True
        if elapsed < s.min_window_s or steps < s.min_window_steps or n == 0:
            return False
        return n >= s.min_calls or percentile(self.samples, 95) <= CLEARLY_WITHIN * s.slo_ttft_s

    def level(self, concurrency: int) -> dict[str, Any]:
        """Measure one level (module docstring)."""
        warmup_s = self.resize(concurrency)
        self.measuring, self.samples = True, []
        start = self.clock()
        tokens, steps, last_start = 0, [], start
        while True:
            last_start = self.clock()
            tokens += self.step()
            end = self.clock()
            steps.append(end - last_start)
            if self._window_done(end - start, len(steps)):
                break
        waiting = [end - c.submitted for c in self.calls.values()
                   if c.measured and c.first is None and c.submitted <= last_start]
        ttfts = self.samples + waiting
        window = max(end - start, 1e-9)
        return {
            "concurrency": concurrency,
            "calls": len(ttfts),
            "calls_waiting": len(waiting),
            "adapters_in_flight": len({c.adapter for c in self.calls.values()}),
            "ttft_p50_s": percentile(ttfts, 50) if ttfts else math.inf,
            "ttft_p95_s": percentile(ttfts, 95) if ttfts else math.inf,
            "ttft_max_s": max(ttfts) if ttfts else math.inf,
            "tokens": tokens,
            "window_s": window,
            "tokens_per_s": tokens / window,
            "steps": len(steps),
            "step_ms_median": 1e3 * statistics.median(steps),
            "warmup_s": warmup_s,
            "within_slo": bool(ttfts) and percentile(ttfts, 95) <= self.settings.slo_ttft_s,
        }

    def stop(self) -> None:
        for request_id in list(self.calls):
            self.engine.abort(request_id)
        self.calls.clear()


# ----------------------------------------------------------------------------------------- measure


def class_weights(backbone: Backbone, ranks: Sequence[int], workdir: Path, seed: int) -> dict[int, LoraWeights]:
    """One random PEFT adapter per rank (all seven projections), as pool weights."""
    weights = {}
    for rank in ranks:
        path = write_peft_adapter(workdir / f"r{rank}", backbone.spec, rank=rank, seed=seed * 1000 + rank)
        weights[rank] = lora_weights_from_parsed(validate(read_upload(path), backbone.spec, max_rank=max(ranks)))
    return weights


def engine_settings(backbone: Backbone, settings: PointsSettings, adapter_elements: int) -> EngineSettings:
    """Sized for `max_concurrency` calls and `adapter_elements` of resident adapters; the batch policy is the
    engine's default (its TTFT target the SLO)."""
    blocks = -(-(settings.prompt_tokens + settings.new_tokens) // DEFAULT_BLOCK_SIZE) + 1
    itemsize = adapter_pool_dtype(settings.adapter_dtype, backbone.device).itemsize
    return EngineSettings(
        kv_cache_bytes=(settings.max_concurrency + 1) * blocks * block_bytes(backbone.spec, dtype=backbone.dtype),
        adapter_pool_bytes=adapter_elements * itemsize + MB,
        adapter_dtype=settings.adapter_dtype,
        max_rank=max(settings.ranks),
        max_running=settings.max_concurrency,
        ttft_target_s=settings.slo_ttft_s,
    )


def measure_series(backbone: Backbone, weights: Mapping[int, LoraWeights], prompts: Sequence[Sequence[int]],
                   shares: Sequence[tuple[int, float]], settings: PointsSettings, *,
                   clock: Callable[[], float] = time.perf_counter,
                   progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Every level of one series and its operating point."""
    k = settings.max_adapters
    keys = {rank: [f"r{rank}-{i:03d}" for i in range(k)] for rank, _ in shares}
    elements = sum(k * sum(w.a.numel() + w.b.numel() for w in weights[rank].values()) for rank in keys)
    engine = Engine(backbone, engine_settings(backbone, settings, elements), clock=clock)
    for rank, names in keys.items():
        for name in names:
            engine.add_adapter(name, weights[rank])
    engine.adapters.ensure_resident([name for names in keys.values() for name in names])
    engine.adapters.release()

    rng = random.Random(settings.seed)
    ranks, share = [r for r, _ in shares], [s for _, s in shares]
    used = dict.fromkeys(ranks, 0)

    def pick() -> str:
        rank = ranks[0] if len(ranks) == 1 else rng.choices(ranks, share)[0]
        used[rank] += 1
        return keys[rank][(used[rank] - 1) % k]

    loop = ClosedLoop(engine, prompts, pick, settings, clock)
    name = label(shares)
    levels: list[dict[str, Any]] = []
    while (c := next_concurrency([(lv["concurrency"], lv["ttft_p95_s"]) for lv in levels], settings)) is not None:
        levels.append(loop.level(c))
        lv = levels[-1]
        progress(f"{name}: {c} in flight: {lv['tokens_per_s']:.1f} tok/s, TTFT p95 {lv['ttft_p95_s']:.3f} s over "
                 f"{lv['calls']} calls, step {lv['step_ms_median']:.0f} ms (warm-up {lv['warmup_s']:.1f} s)")
    loop.stop()
    point = choose(levels, settings.slo_ttft_s)
    calls = {rank: n for rank, n in used.items()}
    pool_bytes = engine.settings.adapter_pool_bytes
    del engine, loop
    gc.collect()
    lowest = min(levels, key=lambda lv: lv["concurrency"])
    return {
        "name": name,
        "shares": [[r, s] for r, s in shares],
        "levels": levels,
        "point": dict(point if point is not None else lowest),
        "slo_met": point is not None,
        "capped": point is not None and point["concurrency"] >= settings.max_concurrency,
        "calls_per_class": {str(r): n for r, n in calls.items()},
        "adapter_pool_bytes": pool_bytes,
    }


def measure(backbone: Backbone, prompts: Sequence[Sequence[int]], settings: PointsSettings, *, workdir: Path,
            clock: Callable[[], float] = time.perf_counter,
            progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Every series (module docstring); returns the JSON payload."""
    if any(len(p) != settings.prompt_tokens for p in prompts) or not prompts:
        raise ValueError(f"need prompts of {settings.prompt_tokens} tokens each")
    started = time.perf_counter()
    weights = class_weights(backbone, settings.ranks, workdir, settings.seed)
    series = [measure_series(backbone, weights, prompts, shares, settings, clock=clock, progress=progress)
              for shares in settings.series()]
    probe = engine_settings(backbone, settings, 0)
    payload: dict[str, Any] = {
        "settings": {**asdict(settings), "model": backbone.spec.name, "dtype": str(backbone.dtype).removeprefix("torch."),
                     "device": str(backbone.device), "threads": torch.get_num_threads(),
                     "adapter_pool_dtype": str(adapter_pool_dtype(settings.adapter_dtype, backbone.device))
                     .removeprefix("torch."), "clearly_within": CLEARLY_WITHIN},
        "engine_settings": probe.model_dump(exclude={"adapter_pool_bytes"}),
        "measured_on": time.strftime("%Y-%m-%d", time.gmtime()),
        "series": series,
        "total_s": time.perf_counter() - started,
    }
    points = points_from(payload)
    payload["points"] = points.to_dict()
    by_rank = {p.rank: p.tokens_per_s for p in points.points}
    for s in series:
        ranks = [r for r, _ in s["shares"]]
        if len(ranks) > 1 and set(ranks) <= set(by_rank):  # each token at its own class's cost (harmonic)
            classes_only = OperatingPoints(points.slo_ttft_s, points.points)
            s["harmonic_tokens_per_s"] = classes_only.mixed_tokens_per_s({r: sh for r, sh in s["shares"]})
    return payload


# ----------------------------------------------------------------------------------------- report


def _s(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3f}"


def summary_rows(payload: Mapping[str, Any]) -> list[list[Any]]:
    series = payload["series"]
    base = next((s["point"]["tokens_per_s"] for s in series if s["shares"] == [[8, 1.0]]), None)
    rows = []
    for s in series:
        p = s["point"]
        note = "" if s["slo_met"] else "SLO missed at 1 call"
        if s["capped"]:
            note = "within at max concurrency"
        rows.append([s["name"], str(p["concurrency"]), f"{p['tokens_per_s']:.1f}", _s(p["ttft_p95_s"]),
                     f"{p['step_ms_median']:.0f}", f"{p['tokens_per_s'] / base:.2f}" if base else "-",
                     f"{s['harmonic_tokens_per_s']:.1f}" if "harmonic_tokens_per_s" in s else "-", note])
    return rows


SUMMARY_COLUMNS = ["series", "in flight", "tok/s", "TTFT p95 s", "step ms", "vs rank 8", "harmonic tok/s", "note"]
LEVEL_COLUMNS = ["series", "in flight", "calls", "TTFT p50 s", "TTFT p95 s", "TTFT max s", "tok/s", "step ms",
                 "window s", "warm-up s", "within"]


def level_rows(payload: Mapping[str, Any]) -> list[list[Any]]:
    return [[s["name"], str(lv["concurrency"]), str(lv["calls"]), _s(lv["ttft_p50_s"]), _s(lv["ttft_p95_s"]),
             _s(lv["ttft_max_s"]), f"{lv['tokens_per_s']:.1f}", f"{lv['step_ms_median']:.0f}",
             f"{lv['window_s']:.1f}", f"{lv['warmup_s']:.1f}", "yes" if lv["within_slo"] else "no"]
            for s in payload["series"] for lv in s["levels"]]


def _title(payload: Mapping[str, Any]) -> str:
    s = payload["settings"]
    return (f"operating points: {s['model']} {s['dtype']} on {s['device']}, adapters {s['adapter_pool_dtype']}, "
            f"{s['prompt_tokens']}-token prompts, {s['new_tokens']}-token outputs, p95 TTFT <= {s['slo_ttft_s']} s")


def markdown(payload: Mapping[str, Any]) -> str:
    def table(columns: list[str], rows: list[list[Any]]) -> list[str]:
        return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                *["| " + " | ".join(row) + " |" for row in rows]]

    return "\n".join([
        f"# {_title(payload)}", "",
        f"`python -m bench operating-points`, measured {payload['measured_on']} in {payload['total_s']:.0f} s "
        "(method: bench/operating_points.py). The point of a series is its level of highest tokens/s with p95 "
        "TTFT within the SLO; harmonic tok/s is a mix's estimate from its classes' points alone "
        "(`OperatingPoints.mixed_tokens_per_s`).", "",
        *table(SUMMARY_COLUMNS, summary_rows(payload)), "", "## Every level", "",
        *table(LEVEL_COLUMNS, level_rows(payload)), "",
    ])


def report(payload: dict[str, Any], *, results_dir: Path = RESULTS_DIR, name: str = "operating_points") -> Path:
    """Print the tables and write results_dir/<name>.json and .md."""
    print_table(_title(payload) + ": every level", LEVEL_COLUMNS, level_rows(payload))
    print_table("operating points (highest tok/s within the SLO)", SUMMARY_COLUMNS, summary_rows(payload))
    path = write(name, payload, results_dir=results_dir)
    path.with_suffix(".md").write_text(markdown(payload))
    return path


# ----------------------------------------------------------------------------------------- entry


def run(*, quick: bool = True, tiny: bool = False, slo_ttft_s: float | None = None,
        classes: Sequence[int] | None = None, max_concurrency: int | None = None, device: str | None = None,
        points_path: Path | None = None, results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """One run (module docstring); `make bench` runs the quick one. `points_path`: where the scheduler's points
    file goes (None: not written)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = QUICK if quick else PointsSettings()
    changes: dict[str, Any] = {}
    if slo_ttft_s is not None:
        changes["slo_ttft_s"] = slo_ttft_s
    if classes is not None:
        changes["classes"] = tuple(classes)
    if max_concurrency is not None:
        changes["max_concurrency"] = max_concurrency
    settings = replace(settings, **changes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.load()
    with tempfile.TemporaryDirectory(prefix="lorafn-bench-points-") as tmp:
        if tiny:
            from workers.tiny import write_tiny_backbone

            backbone = load_backbone(write_tiny_backbone(Path(tmp) / "tiny", tokenizer=tokenizer), device=device)
        else:
            backbone = load_backbone(default_gguf_path(), device=device, name=DEFAULT_BACKBONE_NAME)
        prompts = corpus.prompts(tokenizer, PROMPTS, settings.prompt_tokens)
        (Path(tmp) / "adapters").mkdir()
        payload = measure(backbone, prompts, settings, workdir=Path(tmp) / "adapters")
    payload["quick"] = quick
    path = report(payload, results_dir=results_dir, name="operating_points_quick" if quick else "operating_points")
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    if points_path is not None:
        print(f"wrote {points_from(payload).write(points_path)}")
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench operating-points", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="shorter windows, one mix, fewer refinements (results in operating_points_quick.json; "
                             "the points file only with --points)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random backbone (a smoke run)")
    parser.add_argument("--slo", type=float, help=f"p95 TTFT SLO in seconds (default {PointsSettings.slo_ttft_s})")
    parser.add_argument("--classes", type=int, nargs="+", help=f"rank classes (default {' '.join(map(str, CLASSES))})")
    parser.add_argument("--max-concurrency", type=int, help="the most calls in flight tried")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--points", type=Path,
                        help="where the scheduler's points file goes (default: scheduler/operating_points.json for "
                             "a full run on the default backbone, none otherwise)")
    parser.add_argument("--no-points", action="store_true", help="write no points file")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the report goes")
    args = parser.parse_args(argv)
    points = args.points or (DEFAULT_PATH if not (args.quick or args.tiny) else None)
    try:
        return run(quick=args.quick, tiny=args.tiny, slo_ttft_s=args.slo, classes=args.classes,
                   max_concurrency=args.max_concurrency, device=args.device,
                   points_path=None if args.no_points else points, results_dir=args.results_dir)
    except ValueError as e:
        raise SystemExit(f"python -m bench operating-points: {e}") from e
