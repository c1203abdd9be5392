"""The scheduler's cost per worker heartbeat against the number of adapter versions the worker holds.

`python -m bench.heartbeats [--beats B] [--changes K]`: a worker holding N versions (N = 10, 100, 1,000 and
10,000; half on the device, half in the host cache) heartbeats B times; before each heartbeat K versions were
used (their last use and in-use count change), one moved from the host cache to the device and one from the
device back. Each heartbeat is built whole as the worker builds it, stamped by the worker's
`ResidencySender`, encoded, then decoded and handled as the scheduler does: the warm state's whole view
(`scheduler.service.whole_heartbeat`), the dispatcher's `WorkerReports`, and `SchedulerCore.handle`.

Two ways of sending, side by side: `full`, every heartbeat carrying the whole residency (as every heartbeat
did before deltas), and `deltas`, the whole residency every `FULL_EVERY`-th heartbeat and the changes in
between. Reported per N: bytes per heartbeat (mean), the scheduler's CPU per heartbeat (mean and median,
full heartbeats included in the mean) and the worker's (build, stamp, encode). Timings are wall time of one
thread with nothing else running in the process; on a shared machine compare the columns side by side.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from bench.report import print_table, write
from protocol.messages import Heartbeat, ResidentAdapter, Tier
from protocol.residency import FULL_EVERY, ResidencySender, ResidencyTracker, residency_headers
from scheduler.core import SchedulerCore
from scheduler.dispatcher import WorkerReports
from scheduler.service import whole_heartbeat

COUNTS = (10, 100, 1_000, 10_000)
BEATS = 100
CHANGES = 5
CAPACITY = {"pool_pages": 4096, "page_bytes": 1 << 16, "max_rank": 64, "max_inflight": 32,
            "host_ram_bytes": 1 << 30, "host_disk_bytes": 0}


class Worker:
    """The residency of a worker that serves a few of its adapters every second."""

    def __init__(self, n: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.entries = {
            f"{i:064x}": {"tier": Tier.device if i < n // 2 else Tier.host, "in_use": 0, "last_used": 1000.0 + i}
            for i in range(n)
        }
        self.versions = list(self.entries)

    def second(self, now: float, changes: int) -> None:
        for v in self.rng.sample(self.versions, min(changes, len(self.versions))):
            e = self.entries[v]
            e["last_used"], e["in_use"] = now, self.rng.randint(0, 2)
        up, down = self.rng.sample(self.versions, 2) if len(self.versions) >= 2 else (None, None)
        if up is not None and down is not None:
            self.entries[up]["tier"], self.entries[down]["tier"] = Tier.device, Tier.host

    def heartbeat(self, now: float) -> Heartbeat:
        resident = [
            ResidentAdapter(version=v, tier=e["tier"], rank=16, pages=4 if e["tier"] == Tier.device else 0,
                            bytes=1 << 20, in_use=e["in_use"], last_used=e["last_used"])
            for v, e in self.entries.items()
        ]
        return Heartbeat(worker_id="bench-w", host="bench", device="cpu", started_at=1.0, sent_at=now,
                         capacity=CAPACITY, resident=resident, free_pages=1024)


def measure(n: int, *, deltas: bool, beats: int = BEATS, changes: int = CHANGES, seed: int = 0) -> dict[str, Any]:
    """One worker of `n` versions heartbeating `beats` times (after a warm-up) to one scheduler; `deltas`:
    through a `ResidencySender`, else whole every time."""
    worker, sender = Worker(n, seed), ResidencySender()
    warm, reports, core = ResidencyTracker.of_adapters(), WorkerReports(), SchedulerCore()
    sizes: list[int] = []
    scheduler_ms: list[float] = []
    worker_ms: list[float] = []
    now = 2000.0
    for i in range(FULL_EVERY + 1 + beats):
        now += 1.0
        worker.second(now, changes)
        t0 = time.perf_counter()
        hb = worker.heartbeat(now)
        sent = [(h.encode(), residency_headers(h)) for h in (sender.stamp(hb) if deltas else [hb])]
        t1 = time.perf_counter()
        for data, headers in sent:  # as SchedulerService._on_heartbeat
            if warm.has(headers) and reports.residency.has(headers):
                continue
            got = Heartbeat.decode(data)
            whole_heartbeat(warm, got)
            core.handle(reports.report(got, now))
        t2 = time.perf_counter()
        if i > FULL_EVERY:
            sizes.append(sum(len(data) for data, _ in sent))
            worker_ms.append((t1 - t0) * 1e3)
            scheduler_ms.append((t2 - t1) * 1e3)
    tracked = reports.residency.resident("bench-w") or ()
    assert len(tracked) == n and {r.version: r.tier for r in tracked} == {
        v: e["tier"] for v, e in worker.entries.items()}, "the tracked residency differs from the worker's"
    return {"bytes": statistics.mean(sizes), "scheduler_ms_mean": statistics.mean(scheduler_ms),
            "scheduler_ms_p50": statistics.median(scheduler_ms), "scheduler_ms_max": max(scheduler_ms),
            "worker_ms_mean": statistics.mean(worker_ms)}


def run(*, counts: tuple[int, ...] = COUNTS, beats: int = BEATS, changes: int = CHANGES) -> dict[str, Any]:
    by_count = {str(n): {mode: measure(n, deltas=mode == "deltas", beats=beats, changes=changes)
                         for mode in ("full", "deltas")} for n in counts}
    rows = []
    for n, row in by_count.items():
        f, d = row["full"], row["deltas"]
        rows.append([n, round(f["bytes"]), round(d["bytes"]), f["scheduler_ms_mean"], d["scheduler_ms_mean"],
                     f"{d['scheduler_ms_mean'] / f['scheduler_ms_mean']:.2f}", f["scheduler_ms_p50"],
                     d["scheduler_ms_p50"], f["worker_ms_mean"], d["worker_ms_mean"]])
    print_table(
        f"heartbeats: a worker holding N versions, {changes} used and 2 moved between tiers per heartbeat "
        f"({beats} heartbeats; deltas: full every {FULL_EVERY}th; ms per heartbeat)",
        ["N", "bytes full", "bytes deltas", "scheduler full", "scheduler deltas", "deltas ÷ full",
         "scheduler p50 full", "scheduler p50 deltas", "worker full", "worker deltas"],
        rows,
    )
    payload = {"counts": list(counts), "beats": beats, "changes": changes, "full_every": FULL_EVERY,
               "by_count": by_count}
    write("heartbeats", payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heartbeats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beats", type=int, default=BEATS, help="heartbeats measured per N and way of sending")
    parser.add_argument("--changes", type=int, default=CHANGES, help="versions used between two heartbeats")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="versions held")
    args = parser.parse_args(argv)
    run(counts=tuple(args.counts), beats=args.beats, changes=args.changes)


if __name__ == "__main__":
    main()
