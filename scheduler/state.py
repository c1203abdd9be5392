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
        self._gone: set[str] = set()  # workers to mark down in Postgres (until a flush commits)

    def observe(self, heartbeat: Heartbeat) -> None:
        """Record a heartbeat (a worker's last one, `gone`, removes it at once)."""
        if heartbeat.gone:
            if self.workers.pop(heartbeat.worker_id, None) is not None:
                self._gone.add(heartbeat.worker_id)
            return
        self._gone.discard(heartbeat.worker_id)
        self.workers[heartbeat.worker_id] = WorkerRecord(heartbeat, self.clock())

    def expire(self) -> list[str]:
        """Forget workers silent for longer than the heartbeat timeout; their ids."""
        now = self.clock()
        gone = [w for w, r in self.workers.items() if now - r.last_seen > self.heartbeat_timeout_s]
        for worker_id in gone:
            del self.workers[worker_id]
        self._gone.update(gone)
        return gone

    def to_write(self) -> tuple[list[Heartbeat], list[str]]:
        """Heartbeats not yet written to Postgres and workers to mark down; both count as written until
        `unwritten` hands them back (a flush that failed)."""
        out = [r.heartbeat for r in self.workers.values() if r.dirty]
        for r in self.workers.values():
            r.dirty = False
        gone, self._gone = sorted(self._gone), set()
        return out, gone

    def unwritten(self, heartbeats: list[Heartbeat], gone: list[str]) -> None:
        """A flush failed: write these again next time (unless newer news replaced them)."""
        for hb in heartbeats:
            record = self.workers.get(hb.worker_id)
            if record is not None:
                record.dirty = True
        self._gone.update(w for w in gone if w not in self.workers)
