"""The scheduler's in-memory view of the cluster, built from heartbeats (Postgres gets a batched copy).

Decisions are taken on this view (placement must not wait for a database round trip per invocation);
`SchedulerService` writes it to Postgres every `flush_every_s`, so other processes and a restarted
scheduler see the same warm state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.messages import Heartbeat
from scheduler.policy import Residency, Tier, WorkerView


@dataclass
class WorkerRecord:
    """The latest heartbeat of a worker and when it arrived (monotonic seconds)."""

    heartbeat: Heartbeat
    last_seen: float
    dirty: bool = True


class WarmState:
    """Workers, what they hold, and placements not yet confirmed by a heartbeat."""

    def __init__(self, *, heartbeat_timeout_s: float, placement_grace_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.placement_grace_s = placement_grace_s
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}
        self._placements: dict[str, dict[str, float]] = {}  # version -> worker -> when placed

    def observe(self, heartbeat: Heartbeat) -> None:
        """Record a heartbeat."""
        self.workers[heartbeat.worker_id] = WorkerRecord(heartbeat, self.clock())
        for version in [r.version for r in heartbeat.resident if r.tier == "device"]:
            self._placements.get(version, {}).pop(heartbeat.worker_id, None)

    def placed(self, version: str, worker_id: str) -> None:
        """A worker confirmed a load: count it as a holder until its heartbeats show it."""
        self._placements.setdefault(version, {})[worker_id] = self.clock()

    def unplaced(self, version: str, worker_id: str) -> None:
        self._placements.get(version, {}).pop(worker_id, None)

    def expire(self) -> list[str]:
        """Forget workers silent for longer than the heartbeat timeout; their ids."""
        now = self.clock()
        gone = [w for w, r in self.workers.items() if now - r.last_seen > self.heartbeat_timeout_s]
        for worker_id in gone:
            del self.workers[worker_id]
            for holders in self._placements.values():
                holders.pop(worker_id, None)
        return gone

    def dirty(self) -> list[Heartbeat]:
        """Heartbeats not yet written to Postgres (and mark them written)."""
        out = [r.heartbeat for r in self.workers.values() if r.dirty]
        for r in self.workers.values():
            r.dirty = False
        return out

    def views(self) -> list[WorkerView]:
        """Live workers (draining ones included, flagged) as placement policies see them."""
        return [
            WorkerView(
                worker_id=w, total_pages=int(r.heartbeat.capacity.get("pool_pages", 0)),
                free_pages=r.heartbeat.free_pages, running=r.heartbeat.running,
                queue_depth=r.heartbeat.queue_depth, tokens_per_s=r.heartbeat.tokens_per_s,
                draining=r.heartbeat.draining,
            )
            for w, r in sorted(self.workers.items())
        ]

    def residency(self) -> Residency:
        """version -> worker -> tier over live workers, with fresh placements counted on the device."""
        out: dict[str, dict[str, Tier]] = {}
        for worker_id, record in self.workers.items():
            for r in record.heartbeat.resident:
                tiers = out.setdefault(r.version, {})
                if tiers.get(worker_id) != "device":
                    tiers[worker_id] = r.tier
        now = self.clock()
        for version, holders in self._placements.items():
            for worker_id, at in list(holders.items()):
                if now - at > self.placement_grace_s:
                    del holders[worker_id]
                elif worker_id in self.workers:
                    out.setdefault(version, {})[worker_id] = "device"
        return out

    def holders(self, version: str) -> list[str]:
        """Live, non-draining workers that hold `version` on their device (or were just told to)."""
        tiers = self.residency().get(version, {})
        return sorted(
            w for w, t in tiers.items() if t == "device" and not self.workers[w].heartbeat.draining
        )
