"""Decode stall during adapter loads: how much longer a worker's decode steps take while an adapter comes
to its device, with the copy on the engine thread (before) and off it (after).

Workload: one engine (the default backbone, SmolLM2-135M, fp32, on CUDA when there is one) driven by its
`EngineThread` as in a worker, decoding a steady batch: `requests` prompts of `prompt_tokens` tokens cut
from real text, every other one with a resident adapter of rank `steady_rank`, each generating
`new_tokens` tokens greedily (no stop on EOS) and submitted again when it finishes. Meanwhile adapters of
the ranks `ranks` (random PEFT adapters over all seven projections, canonical blobs in the host cache's
RAM) are loaded one after another through the worker's `AdapterTiers` (parse -> device pool), each
evicted again `gap_steps` steps after its load returned, `gap_steps` steps before the next load. Every
load runs in both modes of `EngineSettings.adapter_load`, interleaved (round by round, rank by rank, the
order of the modes alternating) so that the noise of a shared machine hits both alike:
- "engine" (before): the copy into the pool runs on the engine thread, between two steps;
- "background" (after): the engine thread claims the pages and publishes the adapter; conversion and
  copy run in a worker thread while the engine steps.
Both modes parse the blob in a worker thread. The first round is a warm-up and is not counted.

The clock is the engine thread's: each step is timed from its start to its end, and a step's period runs
from the end of the previous step to its end, so it holds whatever the engine thread ran between the two
(a load's copy in "engine" mode). A period overlaps a load when it intersects the interval from the
`load` call to its return. Periods of steps that prefilled a request are left out (those steps are longer
for their own reason); the others that overlap no load are the idle baseline.

Figures per (rank, mode), over the periods that overlap a load: p50, p99 and max; the stall, each of them
minus the idle p50 (what a decode waits for beyond its usual step); the delay per load, the sum of
(period - idle p50) over the periods of one load (the time the whole batch lost to it; median over
loads); the engine thread's time per load between steps (the gaps of those periods beyond the idle gap,
summed per load; median over loads); the load's latency. Before/after ratio, per rank: engine-mode
figure / background-mode figure (stall max and p99, delay, engine thread). On a machine shared with other
jobs, single periods stall for their own reasons: the max and p99 of a few dozen periods carry that
noise, the delay and engine-thread medians much less.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import corpus
from bench.report import RESULTS_DIR, print_table, write
from storage.adapter_format import blob_sha256, canonical_blob, read_upload, validate, write_peft_adapter
from storage.backbone import DEFAULT_BACKBONE_NAME, default_gguf_path
from storage.objectstore import ObjectStore
from storage.settings import ObjectStoreSettings
from workers.adapter_pool import AdapterDtype, adapter_pool_dtype
from workers.batcher import Completion
from workers.engine import AdapterLoad, Engine, EngineSettings
from workers.engine_thread import EngineThread
from workers.host_cache import HostCache
from workers.kv_cache import DEFAULT_BLOCK_SIZE, block_bytes
from workers.model import Backbone
from workers.sampling import SamplingParams
from workers.tiers import AdapterTiers
from workers.tokenizer import Tokenizer
from workers.weights import load_backbone

logger = logging.getLogger(__name__)

MODES: tuple[AdapterLoad, ...] = ("engine", "background")
MB = 1 << 20


@dataclass(frozen=True)
class StallSettings:
    """What one run of the stall benchmark measures."""

    requests: int = 8
    prompt_tokens: int = 16
    new_tokens: int = 256
    ranks: tuple[int, ...] = (64, 128)
    rounds: int = 10  # counted rounds; one more runs first as a warm-up
    gap_steps: int = 4
    steady_rank: int = 16
    seed: int = 0
    adapter_dtype: AdapterDtype = "auto"

    def __post_init__(self) -> None:
        if min(self.requests, self.prompt_tokens, self.rounds, self.gap_steps, self.steady_rank) < 1:
            raise ValueError(
                f"requests ({self.requests}), prompt_tokens ({self.prompt_tokens}), rounds ({self.rounds}), "
                f"gap_steps ({self.gap_steps}) and steady_rank ({self.steady_rank}) must be >= 1"
            )
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens ({self.new_tokens}) must be >= 2: a request must decode")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks {self.ranks} must be >= 1 each")


@dataclass
class StepLog:
    """Start and end (perf_counter seconds) of every step of the engine thread, and whether it prefilled."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    prefill: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class LoadWindow:
    round: int
    rank: int
    mode: AdapterLoad
    start: float
    end: float


def _time_steps(engine: Engine, log: StepLog) -> None:
    """Log every step of `engine` (its `step` replaced on this instance by a timed call of the original)."""
    step = engine.step

    def timed() -> list[Completion]:
        prefill = bool(engine.batcher.waiting)  # a waiting request is prefilled in this step
        started = time.perf_counter()
        done = step()
        log.ends.append(time.perf_counter())
        log.starts.append(started)
        log.prefill.append(prefill)
        return done

    engine.step = timed  # type: ignore[method-assign]


async def _steps(thread: EngineThread, n: int) -> None:
    """Return once the engine thread has run `n` more steps."""
    until = thread.steps + n
    while thread.steps < until:
        await asyncio.sleep(0.001)


class SteadyBatch:
    """`requests` requests decoding all along: each is submitted again as soon as it finishes."""

    def __init__(self, thread: EngineThread, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
                 new_tokens: int) -> None:
        self.thread = thread
        self.params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        self.stopping = False
        self.running: dict[int, str] = {}
        self.finished = 0
        self.tasks = [asyncio.ensure_future(self._decode(i, p, a))
                      for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]

    async def _decode(self, slot: int, prompt: Sequence[int], adapter: str | None) -> None:
        n = 0
        while not self.stopping:
            request_id = f"steady-{slot}-{n}"
            n += 1
            generation = await self.thread.submit(prompt, adapter=adapter, params=self.params, request_id=request_id)
            self.running[slot] = request_id
            while True:
                item = await generation.items.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Completion):
                    self.finished += 1
                    break
            self.running.pop(slot, None)

    async def stop(self) -> None:
        self.stopping = True
        for request_id in list(self.running.values()):
            await self.thread.abort(request_id)
        await asyncio.gather(*self.tasks)


def _engine_settings(backbone: Backbone, settings: StallSettings, adapter_elements: int) -> EngineSettings:
    spec = backbone.spec
    blocks = -(-(settings.prompt_tokens + settings.new_tokens) // DEFAULT_BLOCK_SIZE) + 1
    itemsize = adapter_pool_dtype(settings.adapter_dtype, backbone.device).itemsize
    return EngineSettings(
        kv_cache_bytes=settings.requests * blocks * block_bytes(spec, dtype=backbone.dtype),
        adapter_pool_bytes=adapter_elements * itemsize + MB,  # the steady adapter and one loading
        adapter_dtype=settings.adapter_dtype,
        max_rank=max(128, *settings.ranks, settings.steady_rank),
        max_batch_tokens=max(2048, settings.requests * (settings.prompt_tokens + 1)),
        max_running=max(64, settings.requests),
    )


def _blob(root: Path, backbone: Backbone, rank: int, seed: int, max_rank: int) -> bytes:
    path = write_peft_adapter(root / f"r{rank}-{seed}", backbone.spec, rank=rank, seed=seed)
    return canonical_blob(validate(read_upload(path), backbone.spec, max_rank=max_rank))


async def _drive(
    backbone: Backbone, prompts: Sequence[Sequence[int]], settings: StallSettings, workdir: Path
) -> tuple[StepLog, list[LoadWindow], EngineSettings, dict[str, Any]]:
    max_rank = max(128, *settings.ranks, settings.steady_rank)
    steady = _blob(workdir, backbone, settings.steady_rank, settings.seed, max_rank)
    blobs = {rank: _blob(workdir, backbone, rank, settings.seed + 1 + i, max_rank)
             for i, rank in enumerate(settings.ranks)}
    per_rank = sum(fin + fout for fin, fout in backbone.spec.module_shapes().values()) * backbone.spec.num_layers
    engine_settings = _engine_settings(backbone, settings, per_rank * (settings.steady_rank + max(settings.ranks)))
    engine = Engine(backbone, engine_settings)
    log = StepLog()
    _time_steps(engine, log)
    thread = EngineThread(engine, asyncio.get_running_loop())
    thread.start()
    windows: list[LoadWindow] = []
    try:
        cache_bytes = 2 * (len(steady) + sum(len(b) for b in blobs.values()))
        cache = HostCache(workdir / "cache", disk_bytes=cache_bytes, ram_bytes=cache_bytes)
        store = ObjectStore(ObjectStoreSettings())  # never asked: every blob is in the host cache
        tiers = AdapterTiers(engine=thread, store=store, cache=cache)
        for blob in (steady, *blobs.values()):
            cache.put(blob_sha256(blob), blob)
        steady_sha = blob_sha256(steady)
        await tiers.load(steady_sha)
        batch = SteadyBatch(thread, prompts, [steady_sha if i % 2 == 0 else None for i in range(len(prompts))],
                            settings.new_tokens)
        await _steps(thread, 2 * settings.gap_steps)
        for round_ in range(settings.rounds + 1):
            for rank, blob in blobs.items():
                sha = blob_sha256(blob)
                for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                    tiers.load_mode = mode
                    started = time.perf_counter()
                    await tiers.load(sha)
                    windows.append(LoadWindow(round_, rank, mode, started, time.perf_counter()))
                    await _steps(thread, settings.gap_steps)
                    await tiers.evict(sha)
                    await _steps(thread, settings.gap_steps)
            logger.info("round %d of %d done (%d steps)", round_, settings.rounds, thread.steps)
        await batch.stop()
        facts = {"steps": thread.steps, "requests_finished": batch.finished,
                 "adapter_pool_dtype": str(engine.pool.dtype).removeprefix("torch."),
                 "adapter_bytes": {rank: per_rank * rank * engine.pool.storage.element_size() for rank in blobs},
                 "blob_bytes": {rank: len(b) for rank, b in blobs.items()}}
    finally:
        await thread.stop()
    return log, windows, engine_settings, facts


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(len(ordered) * q / 100) - 1))]


def analyse(log: StepLog, windows: Sequence[LoadWindow], settings: StallSettings) -> dict[str, Any]:
    """The figures of the module docstring from the step log and the load windows."""
    counted = [w for w in windows if w.round > 0]
    measured_from = min(w.start for w in counted)
    idle: list[float] = []
    idle_gaps: list[float] = []
    overlapping: dict[int, list[tuple[float, float]]] = {}  # window index -> (period, gap) of its periods
    for i in range(1, len(log.ends)):
        before, end = log.ends[i - 1], log.ends[i]
        if log.prefill[i] or before < measured_from:
            continue
        period, gap = end - before, log.starts[i] - before
        hits = [k for k, w in enumerate(counted) if before < w.end and end > w.start]
        for k in hits:
            overlapping.setdefault(k, []).append((period, gap))
        if not hits:
            idle.append(period)
            idle_gaps.append(gap)
    if not idle:
        raise RuntimeError("no idle step to compare with: raise gap_steps")
    base, base_gap = statistics.median(idle), statistics.median(idle_gaps)
    rows: list[dict[str, Any]] = []
    for rank in settings.ranks:
        for mode in MODES:
            mine = [k for k, w in enumerate(counted) if w.rank == rank and w.mode == mode]
            periods = [p for k in mine for p, _ in overlapping.get(k, [])]
            engine_ms = [1e3 * sum(max(0.0, g - base_gap) for _, g in overlapping.get(k, [])) for k in mine]
            delay_ms = [1e3 * sum(p - base for p, _ in overlapping.get(k, [])) for k in mine]
            p50, p99, top = (percentile(periods, q) for q in (50, 99, 100)) if periods else (base, base, base)
            rows.append({
                "rank": rank,
                "mode": mode,
                "loads": len(mine),
                "load_ms": [1e3 * (counted[k].end - counted[k].start) for k in mine],
                "load_ms_median": 1e3 * statistics.median(counted[k].end - counted[k].start for k in mine),
                "steps": len(periods),
                "period_ms": [1e3 * p for p in periods],
                "p50_ms": 1e3 * p50,
                "p99_ms": 1e3 * p99,
                "max_ms": 1e3 * top,
                "stall_p50_ms": 1e3 * (p50 - base),
                "stall_p99_ms": 1e3 * (p99 - base),
                "stall_max_ms": 1e3 * (top - base),
                "engine_thread_ms": engine_ms,
                "engine_thread_ms_per_load": statistics.median(engine_ms),
                "delay_ms": delay_ms,
                "delay_ms_per_load": statistics.median(delay_ms),
            })
    ratios = []
    for rank in settings.ranks:
        old, new = (next(r for r in rows if r["rank"] == rank and r["mode"] == m) for m in MODES)
        ratios.append({
            "rank": rank,
            "stall_max_ratio": _ratio(old["stall_max_ms"], new["stall_max_ms"]),
            "stall_p99_ratio": _ratio(old["stall_p99_ms"], new["stall_p99_ms"]),
            "max_period_ratio": old["max_ms"] / new["max_ms"],
            "delay_ratio": _ratio(old["delay_ms_per_load"], new["delay_ms_per_load"]),
            "engine_thread_ratio": _ratio(old["engine_thread_ms_per_load"], new["engine_thread_ms_per_load"]),
        })
    return {
        "idle": {"steps": len(idle), "p50_ms": 1e3 * base, "p99_ms": 1e3 * percentile(idle, 99),
                 "max_ms": 1e3 * max(idle), "gap_p50_ms": 1e3 * base_gap},
        "rows": rows,
        "ratios": ratios,
    }


def _ratio(before: float, after: float) -> float | None:
    """before / after; None when `after` is no stall at all (<= 0: within the idle p50)."""
    return before / after if after > 0 else None


def measure(
    backbone: Backbone, prompts: Sequence[Sequence[int]], settings: StallSettings, *, workdir: Path
) -> dict[str, Any]:
    """Drive the engine with the steady batch and the loads, and return every figure (see the docstring)."""
    if len(prompts) != settings.requests:
        raise ValueError(f"{len(prompts)} prompts for {settings.requests} requests")
    started = time.perf_counter()
    log, windows, engine_settings, facts = asyncio.run(_drive(backbone, prompts, settings, workdir))
    figures = analyse(log, windows, settings)
    return {
        "settings": {**asdict(settings), "modes": list(MODES), "model": backbone.spec.name,
                     "dtype": str(backbone.dtype).removeprefix("torch."), "device": str(backbone.device),
                     "threads": torch.get_num_threads(), **facts},
        "engine_settings": engine_settings.model_dump(),
        **figures,
        "total_s": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _times(x: float | None) -> str:
    return "no stall after" if x is None else f"{x:.1f}x"


def report(payload: dict[str, Any], *, results_dir: Path = RESULTS_DIR) -> Path:
    """Print the tables and write results_dir/stall.json."""
    s, idle = payload["settings"], payload["idle"]
    print_table(
        f"decode step period while adapters load: {s['requests']} requests decoding, {s['model']} {s['dtype']} on "
        f"{s['device']}, adapters {s['adapter_pool_dtype']}; idle p50 {idle['p50_ms']:.1f} ms, p99 "
        f"{idle['p99_ms']:.1f} ms over {idle['steps']} steps",
        ["rank", "load path", "loads", "load ms", "steps", "p50 ms", "p99 ms", "max ms", "stall p50", "stall p99",
         "stall max", "delay ms/load", "engine thread ms/load"],
        [[r["rank"], r["mode"], r["loads"], _ms(r["load_ms_median"]), r["steps"], _ms(r["p50_ms"]), _ms(r["p99_ms"]),
          _ms(r["max_ms"]), _ms(r["stall_p50_ms"]), _ms(r["stall_p99_ms"]), _ms(r["stall_max_ms"]),
          _ms(r["delay_ms_per_load"]), _ms(r["engine_thread_ms_per_load"])] for r in payload["rows"]],
    )
    print_table(
        "before / after: stall with the copy on the engine thread / stall with it off (stall: period - idle p50)",
        ["rank", "stall max", "stall p99", "max period", "delay per load", "engine thread per load"],
        [[r["rank"], _times(r["stall_max_ratio"]), _times(r["stall_p99_ratio"]), _times(r["max_period_ratio"]),
          _times(r["delay_ratio"]), _times(r["engine_thread_ratio"])] for r in payload["ratios"]],
    )
    return write("stall", payload, results_dir=results_dir)


# ----------------------------------------------------------------------------------------- entry


def run(*, rounds: int = StallSettings.rounds, device: str | None = None) -> dict[str, Any]:
    """The stall benchmark on the default backbone (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = StallSettings(rounds=rounds)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(default_gguf_path(), device=device, name=DEFAULT_BACKBONE_NAME)
    prompts = corpus.prompts(Tokenizer.load(), settings.requests, settings.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="lorafn-bench-stall-") as tmp:
        payload = measure(backbone, prompts, settings, workdir=Path(tmp))
    report(payload)
    return payload
