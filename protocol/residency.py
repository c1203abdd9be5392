"""A worker's residency in its heartbeats: the changes every second, the whole of it every few seconds.

A worker holds up to thousands of adapter versions (its device pool and its host cache) and heartbeats every
second. Sent whole every time, the residency cost every reader in proportion to its size although a second
changes few entries: at 1,000 versions a heartbeat was 137 KB and took the scheduler 3.7 ms to decode and
hand to its core, nearly all of it for entries that had not changed.

Sender (`ResidencySender`, one per worker process) turns each heartbeat, built with the whole residency, into
what is published, in order:
- every heartbeat is numbered (`resident_seq`: 1, 2, ... within the worker process, which `started_at` names);
- the first heartbeat, and the next after `reset()` (a reconnection to NATS, a publish that failed), is full
  (`resident_base` None: `resident` lists every version held);
- every other heartbeat is a delta on the heartbeat just before (`resident_base` = its seq): `resident` lists
  the versions added or changed (tier, pages, in-use count, last use, ...: a version used since the heartbeat
  before is among them), `removed` the versions no longer held. A version is held in one tier at a time (the
  device, else the host cache), so a tier change is a changed entry;
- every `full_every`-th delta is followed by the full heartbeat of the same seq, with `RESIDENCY_HEADER`
  ("<seq> <started_at> <worker id>", `residency_headers`).

Reader (`ResidencyTracker`, one per reader: the dispatcher, the scheduler's warm state, tests) keeps per worker
the view version -> entry. A delta applies only on the heartbeat it names (same worker process, view at the
delta's `resident_base`); a full heartbeat replaces the view. A reader in step with the worker (it applied the
delta of the same seq) has nothing to learn from the full heartbeat that follows, and `has()` tells it so from
the header alone: it drops the message undecoded, so its cost per second does not grow with the residency.
Heartbeats travel on core NATS, may be lost, and a reader may start at any time: a delta that does not apply
is ignored, and the reader keeps its last view (stale, as any view is until the next heartbeat) or, knowing
none, reports none, until the next full heartbeat, at most `full_every` heartbeats later. Each reader rebuilds
its view from the heartbeats alone; no process holds state another needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from protocol.messages import Heartbeat, ResidentAdapter
from protocol.subjects import RESIDENCY_HEADER

# A full heartbeat after every fifth delta: a reader that missed one is back in step within five heartbeats.
FULL_EVERY = 5

T = TypeVar("T")


def residency_headers(hb: Heartbeat) -> dict[str, str] | None:
    """The headers to publish `hb` with: `RESIDENCY_HEADER` on a numbered full heartbeat, else none."""
    if not hb.full or hb.resident_seq == 0:
        return None
    return {RESIDENCY_HEADER: f"{hb.resident_seq} {hb.started_at!r} {hb.worker_id}"}


class ResidencySender:
    """Turns a worker process's heartbeats into what is published (see the module docstring). Not
    thread-safe; one per process."""

    def __init__(self, full_every: int = FULL_EVERY) -> None:
        if full_every < 1:
            raise ValueError(f"full_every must be >= 1 (got {full_every})")
        self.full_every = full_every
        self._seq = 0
        self._deltas: int | None = None  # deltas since the last full heartbeat; None: the next is full alone
        self._sent: dict[str, ResidentAdapter] = {}  # the residency as of the last heartbeat stamped

    def reset(self) -> None:
        """Make the next heartbeat full (readers may have missed the last ones: a reconnection, a failed
        publish)."""
        self._deltas = None

    def stamp(self, hb: Heartbeat) -> list[Heartbeat]:
        """`hb`, built with the whole residency, as it is to be published, in order: a delta on the heartbeat
        stamped before it, followed by the full heartbeat when one is due; or the full heartbeat alone."""
        if not hb.full:
            raise ValueError(f"stamp takes a heartbeat with the whole residency (this one is a delta on "
                             f"{hb.resident_base})")
        self._seq += 1
        now = {r.version: r for r in hb.resident}
        before, self._sent = self._sent, now
        full = hb.model_copy(update={"resident_seq": self._seq})
        if self._deltas is None:
            self._deltas = 0
            return [full]
        changed = [r for v, r in now.items() if before.get(v) != r]
        removed = [v for v in before if v not in now]
        delta = hb.model_copy(update={"resident_seq": self._seq, "resident_base": self._seq - 1,
                                      "resident": changed, "removed": removed})
        self._deltas += 1
        if self._deltas < self.full_every:
            return [delta]
        self._deltas = 0
        return [delta, full]


@dataclass
class _View(Generic[T]):
    started_at: float
    seq: int
    entries: dict[str, T]
    resident: tuple[T, ...] | None = None  # the entries' values, built when asked after a change


class ResidencyTracker(Generic[T]):
    """Per worker, the residency its heartbeats describe, each entry as `convert` makes it from the
    `ResidentAdapter` (a reader keeps its own type, made once per change rather than once per heartbeat).
    See the module docstring. Not thread-safe."""

    def __init__(self, convert: Callable[[ResidentAdapter], T]) -> None:
        self.convert = convert
        self._views: dict[str, _View[T]] = {}
        self.ignored = 0  # deltas on a heartbeat this tracker did not apply (lost, or sent before it started)

    @staticmethod
    def of_adapters() -> ResidencyTracker[ResidentAdapter]:
        """A tracker whose entries are the heartbeats' own `ResidentAdapter`s."""
        return ResidencyTracker(lambda r: r)

    def has(self, headers: Mapping[str, str] | None) -> bool:
        """The message with these headers is a full heartbeat whose residency this tracker already has (it
        applied the delta of the same seq): nothing to decode for the residency."""
        value = (headers or {}).get(RESIDENCY_HEADER)
        if value is None:
            return False
        seq, started_at, worker_id = value.split(" ", 2)
        view = self._views.get(worker_id)
        return view is not None and str(view.seq) == seq and repr(view.started_at) == started_at

    def apply(self, hb: Heartbeat) -> bool:
        """Bring the worker's view up to `hb`; False: `hb` is a delta on a heartbeat this tracker did not
        apply, ignored (the view, if any, stays as it was until the next full heartbeat)."""
        view = self._views.get(hb.worker_id)
        if hb.full:
            in_step = view is not None and hb.resident_seq > 0 and (view.seq, view.started_at) == (
                hb.resident_seq, hb.started_at)
            if not in_step:  # in step: the view is this residency already (built from the same deltas)
                self._views[hb.worker_id] = _View(hb.started_at, hb.resident_seq,
                                                  {r.version: self.convert(r) for r in hb.resident})
            return True
        if view is None or view.started_at != hb.started_at or view.seq != hb.resident_base:
            self.ignored += 1
            return False
        view.seq = hb.resident_seq
        if hb.resident or hb.removed:
            entries = view.entries
            for version in hb.removed:
                entries.pop(version, None)
            for r in hb.resident:
                entries[r.version] = self.convert(r)
            view.resident = None
        return True

    def resident(self, worker_id: str) -> tuple[T, ...] | None:
        """The worker's entries as of the last heartbeat that applied; None: none has (no full one yet)."""
        view = self._views.get(worker_id)
        if view is None:
            return None
        if view.resident is None:
            view.resident = tuple(view.entries.values())
        return view.resident

    def entries(self, worker_id: str) -> dict[str, T]:
        """The worker's entries by version (empty: none known); the tracker's own dict, not to be changed."""
        view = self._views.get(worker_id)
        return view.entries if view is not None else {}

    def forget(self, worker_id: str) -> None:
        """Drop the worker's view (it said goodbye, or went silent)."""
        self._views.pop(worker_id, None)
