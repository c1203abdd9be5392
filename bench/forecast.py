"""How long the scheduler's event loop stops at a staging interval's boundary, with the demand forecast run on
the loop against on the dispatcher's predictor thread.

`python -m bench forecast [--counts N ...] [--boundaries B]`: the live scheduler's default predictor (the
fallback chain: LSTM, histogram, EWMA; the LSTM trained in the background) warmed up on N adapters (N = 1,000
and 10,000 by default) until its LSTM answers, a core with the default stager and three workers, and calls of
every adapter in each interval (a third of them drawn anew each time). At each of B boundaries the core's
`Predict` is carried out one way or the other, alternately, on one asyncio loop:
- `inline`: `scheduler.core.predict` called on the loop, then the answer handled (how the dispatcher ran the
  predictor before `PredictorThread`; the simulator's way);
- `thread`: `PredictorThread.submit`, awaited, then the answer handled on the loop.
A probe coroutine sleeps 1 ms at a time and records how late it wakes; reported per N and way: the longest
stall of the loop from the boundary until the interval is staged (median over the boundaries), the loop's
time in `core.handle` for the boundary and the answer, and the forecast's own time. Timings are wall time on
whatever else runs on the machine; compare the ways side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from bench.report import print_table, write
from protocol.messages import Tier
from scheduler.core import (
    CoreConfig,
    InvocationArrived,
    InvocationFinished,
    Predict,
    ResidentReport,
    SchedulerCore,
    Tick,
    WorkerReport,
    predict,
)
from scheduler.dispatcher import PredictorThread
from scheduler.policy import AdapterSpec
from scheduler.predict import FallbackPredictor, Predictor
from scheduler.settings import StagingSettings
from scheduler.staging import staging_policies

COUNTS = (1_000, 10_000)
BOUNDARIES = 6
INTERVAL_S = 60.0
WORKERS = 3
MB = 1 << 20
WARMUP_TIMEOUT_S = 300.0


class Probe:
    """Wakes every `period_s` and keeps the worst lateness since the last `take()`."""

    def __init__(self, period_s: float = 0.001) -> None:
        self.period_s, self.worst = period_s, 0.0

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + self.period_s
            await asyncio.sleep(self.period_s)
            self.worst = max(self.worst, loop.time() - due)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


class Stack:
    """A core with a stager and `WORKERS` workers, fed one interval of calls at a time."""

    def __init__(self, n: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.specs = [AdapterSpec("t", f"a{i}", f"{i:064x}", 8 << (i % 4), 2 * MB) for i in range(n)]
        predictor, stager = staging_policies(StagingSettings(interval_s=INTERVAL_S))
        assert predictor is not None and stager is not None
        self.predictor: Predictor = predictor
        self.core = SchedulerCore(stager=stager, config=CoreConfig(staging_interval_s=INTERVAL_S,
                                                                  heartbeat_timeout_s=10 * INTERVAL_S))
        self.calls = 0

    def reports(self, at: float) -> None:
        per = max(1, len(self.specs) // (4 * WORKERS))  # a quarter of the adapters held, on device and host
        for w in range(WORKERS):
            held = self.specs[w * per:(w + 1) * per]
            resident = tuple(ResidentReport(s.version, Tier.device if k % 2 else Tier.host, s.rank, s.bytes, 2)
                             for k, s in enumerate(held))
            self.core.handle(WorkerReport(at=at, worker_id=f"w{w}", total_pages=4096, free_pages=2048,
                                          max_rank=64, device_bytes=4096 * 64 * 1024, host_bytes=1 << 34,
                                          page_bytes=64 * 1024, resident=resident))

    def interval(self, start: float) -> None:
        """Calls of a third of the adapters, drawn anew, within (start, start + INTERVAL_S)."""
        chosen = self.rng.sample(self.specs, max(1, len(self.specs) // 3))
        for k, spec in enumerate(chosen):
            at = start + 1.0 + (INTERVAL_S - 2.0) * k / len(chosen)
            self.calls += 1
            call = f"c{self.calls}"
            self.core.handle(InvocationArrived(at=at, invocation_id=call, adapter=spec, max_tokens=8))
            self.core.handle(InvocationFinished(at, call))

    def boundary(self, at: float) -> Predict:
        """Heartbeats just before `at`, then the Tick at `at`: the core's Predict (carried out by the caller)."""
        self.reports(at - 0.5)
        asks = [c for c in self.core.handle(Tick(at)) if isinstance(c, Predict)]
        assert len(asks) == 1, asks
        return asks[0]


def lstm_answers(predictor: Predictor) -> bool:
    """Whether the fallback chain's LSTM has had a training round published (so that it, not its warm-up
    fallback, forecasts)."""
    lstm = predictor.member("lstm") if isinstance(predictor, FallbackPredictor) else None
    return bool(getattr(lstm, "ready", False))


async def measure(n: int, *, boundaries: int = BOUNDARIES, seed: int = 0,
                  warmup_timeout_s: float = WARMUP_TIMEOUT_S) -> dict[str, Any]:
    stack = Stack(n, seed)
    start = 1_000 * INTERVAL_S
    stack.reports(start)
    # Warm-up: intervals answered inline until the LSTM forecasts (60 intervals and a training round).
    deadline = time.monotonic() + warmup_timeout_s
    while True:
        stack.interval(start)
        start += INTERVAL_S
        stack.core.handle(predict(stack.predictor, stack.boundary(start), start))
        if lstm_answers(stack.predictor) or time.monotonic() > deadline:
            break
    lstm_ready = lstm_answers(stack.predictor)  # else the figures leave the LSTM's forward out
    thread = PredictorThread(stack.predictor, clock=lambda: start)  # answers on the bench's clock
    probe, stop = Probe(), asyncio.Event()
    probing = asyncio.create_task(probe.run(stop))
    rows: dict[str, list[dict[str, float]]] = {"inline": [], "thread": []}
    predictor_name = ""
    try:
        for b in range(2 * boundaries):
            way = "inline" if b % 2 == 0 else "thread"
            stack.interval(start)
            start += INTERVAL_S
            await asyncio.sleep(0.01)
            probe.take()
            t0 = time.perf_counter()
            ask = stack.boundary(start)
            t1 = time.perf_counter()
            if way == "inline":
                answer = predict(stack.predictor, ask, start)
            else:
                answer = (await thread.submit(ask)).event
            t2 = time.perf_counter()
            stack.core.handle(answer)
            t3 = time.perf_counter()
            await asyncio.sleep(0.005)  # one more probe wake-up after the staging
            predictor_name = answer.predictor
            rows[way].append({"loop_stall_ms": probe.take() * 1e3, "core_ms": ((t1 - t0) + (t3 - t2)) * 1e3,
                              "forecast_ms": (t2 - t1) * 1e3, "scored": float(len(ask.keys))})
    finally:
        stop.set()
        await probing
        await asyncio.to_thread(thread.close)
    out: dict[str, Any] = {"adapters": n, "predictor": predictor_name, "lstm_ready": lstm_ready}
    for way, got in rows.items():
        out[way] = {k: statistics.median(r[k] for r in got) for k in got[0]}
        out[way]["loop_stall_ms_max"] = max(r["loop_stall_ms"] for r in got)
    return out


def run(*, counts: tuple[int, ...] = COUNTS, boundaries: int = BOUNDARIES) -> dict[str, Any]:
    by_count = {str(n): asyncio.run(measure(n, boundaries=boundaries)) for n in counts}
    rows = []
    for n, r in by_count.items():
        i, t = r["inline"], r["thread"]
        name = r["predictor"] if r["lstm_ready"] else f"{r['predictor']} (LSTM not trained yet)"
        rows.append([n, name, round(i["scored"]), i["forecast_ms"], t["forecast_ms"], i["loop_stall_ms"],
                     t["loop_stall_ms"], f"{t['loop_stall_ms'] / i['loop_stall_ms']:.3f}", i["loop_stall_ms_max"],
                     t["loop_stall_ms_max"], i["core_ms"], t["core_ms"]])
    print_table(
        f"forecast at a staging boundary: the event loop's longest stall, forecast on the loop (inline) against "
        f"on the predictor thread (median over {boundaries} boundaries each; ms)",
        ["N", "predictor", "scored", "forecast inline", "forecast thread", "stall inline", "stall thread",
         "thread ÷ inline", "worst inline", "worst thread", "core inline", "core thread"],
        rows,
    )
    payload = {"counts": list(counts), "boundaries": boundaries, "interval_s": INTERVAL_S, "by_count": by_count}
    write("forecast", payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench forecast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="adapters called")
    parser.add_argument("--boundaries", type=int, default=BOUNDARIES, help="boundaries measured per way")
    args = parser.parse_args(argv)
    run(counts=tuple(args.counts), boundaries=args.boundaries)


if __name__ == "__main__":
    main()
