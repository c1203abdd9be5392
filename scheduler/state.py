"""The scheduler's record of worker heartbeats for Postgres (the core keeps its own view for decisions).

`SchedulerService` writes the heartbeats that changed to Postgres every `flush_every_s` (workers and their
residency per tier), so operators, other processes and a restarted scheduler see the same warm state, and
marks workers silent for `heartbeat_timeout_s` down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.messages import Heartbeat


@dataclass
class WorkerRecord:
    """The latest heartbeat of a worker and when it arrived (monotonic seconds)."""

    heartbeat: Heartbeat
    last_seen: float
    dirty: bool = True


class WarmState:
    """Live workers' latest heartbeats, and which of them are not yet written to Postgres."""

    def __init__(self, *, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}

    def observe(self, heartbeat: Heartbeat) -> None:
        """Record a heartbeat (a worker's last one, `gone`, removes it at once)."""
        if heartbeat.gone:
            self.workers.pop(heartbeat.worker_id, None)
            return
        self.workers[heartbeat.worker_id] = WorkerRecord(heartbeat, self.clock())

    def expire(self) -> list[str]:
        """Forget workers silent for longer than the heartbeat timeout; their ids."""
        now = self.clock()
        gone = [w for w, r in self.workers.items() if now - r.last_seen > self.heartbeat_timeout_s]
        for worker_id in gone:
            del self.workers[worker_id]
        return gone

    def dirty(self) -> list[Heartbeat]:
        """Heartbeats not yet written to Postgres (and mark them written)."""
        out = [r.heartbeat for r in self.workers.values() if r.dirty]
        for r in self.workers.values():
            r.dirty = False
        return out
