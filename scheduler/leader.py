"""Leader election among scheduler replicas: one of them does what must happen once.

Every replica dispatches (they share the dispatcher's durable consumer), records results (a shared durable
consumer too) and keeps its core's view of the workers from the same heartbeats and streams, so a replica that
becomes leader issues at once, without a warm-up. What must happen once is the leader's alone:
- staging verbs (Fetch / Load / Evict on `lora.ctl.<worker>.<verb>`) from the core's pre-staging;
- rescues of gone workers (their consumer deleted, their work requeued), and the retries of failed ones; a
  follower remembers the rescues its core called for and carries them out if it becomes leader before the
  worker is back;
- the warm state in Postgres: worker rows and their residency, workers marked down, invocations marked
  running, and the rows of workers silent for `worker_prune_after_s` deleted.
Dispatch decisions (dead letters and refusals included) are made by the replica that received the invocation,
demand is counted by the replica that dispatched the call, and each replica plans placement (rank-aware
routing) from the calls it dispatched.

The lock is a Postgres session advisory lock (`LEADER_LOCK_KEY`) taken with `pg_try_advisory_lock` on a
connection of its own (`storage.repo.create_lock_engine`: no pool, autocommit, TCP keepalives both ways). The
server releases it when that connection ends, so the lock of a leader that was SIGKILLed or crashed is free as
soon as its kernel closes the socket, and a follower takes it at its next attempt. Why not a NATS KV key with
a TTL: a dead leader's key outlives it by the TTL (takeover after 5 s rather than within one check), and a lease
must be renewed in time by a process that a loaded machine may stall, where a lock is held for as long as its
connection lives. What it costs: leadership needs Postgres (while Postgres is away no replica leads: dispatch
goes on; staging and rescues wait, and the work of a worker that died meanwhile stays on its subject until a
leader rescues it), and the database URL must reach Postgres itself or a pooler in session mode (a session
lock means nothing through transaction pooling).

`Election` decides, with no I/O and no clock: each check's outcome and the time go in, leader or not comes
out. `LeaderLock` is the Postgres side and `LeaderElection` runs the two: a check every fifth of
`leader_ttl_s` (taking the lock when this replica does not hold it, confirming it when it does), each bounded
by half of it; a failed check drops the connection (whatever it held is released by the server) and steps
down at once, and a leader whose lock has not been confirmed for `leader_ttl_s` stops leading even before its
check fails. At most one replica leads, except that a leader whose session the server ended (Postgres
restarted, the backend terminated) leads until its next check fails, at most `leader_ttl_s` / 5 later, while
another replica may take the lock: what the leader issues is idempotent (requeues are de-duplicated by
`<id>-epoch-<n>`, staging verbs are, writes are upserts), so an overlap costs repeats, never a lost or
doubled invocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage import repo
from storage.settings import DatabaseSettings

logger = logging.getLogger(__name__)

# The advisory lock every scheduler replica of one database competes for (a positive 63-bit number derived
# from a fixed name, so it does not collide with small hand-picked keys).
LEADER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"lorafn scheduler leader").digest()[:8], "big") >> 1
# Checks per `leader_ttl_s`: a leader's lock is confirmed, and a follower tries to take it, this often.
CHECKS_PER_TTL = 5


@dataclass(frozen=True)
class Check:
    """One look at the lock, started at `at`: `held` True (this replica holds it, taken now or confirmed),
    False (another replica holds it), None (the check failed: `detail` says how)."""

    at: float
    held: bool | None
    detail: str = ""


@dataclass(frozen=True)
class Change:
    """This replica became leader (`leader` True) or stopped leading, at `at`, for `reason`."""

    at: float
    leader: bool
    reason: str


class Election:
    """Leader or not, from checks of the lock and the time (see the module docstring). Times are seconds of
    one monotonic clock, the caller's."""

    def __init__(self, *, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"leader ttl_s must be > 0 (got {ttl_s})")
        self.ttl_s = ttl_s
        self.leader = False
        self._confirmed = 0.0  # start of the last check that found the lock held (meaningful while leader)

    @property
    def check_every_s(self) -> float:
        return self.ttl_s / CHECKS_PER_TTL

    @property
    def check_timeout_s(self) -> float:
        """How long one check may take before it counts as failed."""
        return self.ttl_s / 2

    def observe(self, check: Check) -> Change | None:
        """Take in one check; the change of leadership it makes, if any."""
        if check.held:
            self._confirmed = max(self._confirmed, check.at)
            if self.leader:
                return None
            self.leader = True
            return Change(check.at, True, check.detail or "took the leader lock")
        if not self.leader:
            return None
        self.leader = False
        if check.held is False:
            return Change(check.at, False, check.detail or "another scheduler holds the leader lock")
        return Change(check.at, False, check.detail or "checking the leader lock failed")

    def expire(self, now: float) -> Change | None:
        """Step down when the lock has not been confirmed for `ttl_s` (checks that hang, a stalled loop)."""
        if self.leader and now - self._confirmed > self.ttl_s:
            self.leader = False
            return Change(now, False, f"the leader lock was not confirmed for {now - self._confirmed:.1f} s "
                                      f"(ttl {self.ttl_s:.1f} s)")
        return None

    def leads(self, now: float) -> bool:
        """Whether this replica may issue what the leader issues, now."""
        return self.leader and now - self._confirmed <= self.ttl_s


class LeaderLock:
    """The Postgres side: one connection of its own that takes, then holds, the session advisory lock `key`."""

    def __init__(self, database: DatabaseSettings, *, key: int = LEADER_LOCK_KEY, ttl_s: float = 5.0,
                 name: str = "lorafn") -> None:
        self.key = key
        self.engine: AsyncEngine = repo.create_lock_engine(
            database, keepalive_s=max(1, round(ttl_s / CHECKS_PER_TTL)), name=name)
        self._conn: AsyncConnection | None = None
        self._held = False

    async def check(self) -> bool:
        """True: this connection holds the lock (taken now if it was free); False: another session holds it.
        Raises when Postgres cannot be reached or the connection failed; call `drop` then."""
        if self._conn is None:
            self._conn = await self.engine.connect()
            self._held = False
        if self._held:
            self._held = await repo.holds_advisory_lock(self._conn, key=self.key)
        else:
            self._held = await repo.try_advisory_lock(self._conn, key=self.key)
        return self._held

    async def drop(self, *, timeout_s: float = 2.0) -> None:
        """Give up the connection, and with it the lock (the server releases it when the session ends). A
        connection that does not close in `timeout_s` (its peer vanished) is abandoned."""
        conn, self._conn, self._held = self._conn, None, False
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), timeout_s)
        except Exception as e:  # a broken connection: dropping it is all that is left to do
            logger.debug("closing the leader lock's connection failed: %r", e)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.invalidate(), timeout_s)

    async def close(self) -> None:
        await self.drop()
        await self.engine.dispose()


class LeaderElection:
    """Runs `Election` over a `LeaderLock`: `step` once, then `run(stop)`; `leads()` says whether this replica
    leads now, and `on_change` hears of every change (log, metric, what a new leader does first). `close`
    releases the lock (a follower takes over at its next check)."""

    def __init__(self, lock: LeaderLock, *, ttl_s: float, on_change: Callable[[Change], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = lock
        self.election = Election(ttl_s=ttl_s)
        self.on_change = on_change
        self.clock = clock

    def leads(self) -> bool:
        return self.election.leads(self.clock())

    def _changed(self, change: Change | None) -> None:
        if change is not None:
            self.on_change(change)

    async def step(self) -> None:
        """One check of the lock, its outcome taken in."""
        self._changed(self.election.expire(self.clock()))
        started = self.clock()
        try:
            held: bool | None = await asyncio.wait_for(self.lock.check(), self.election.check_timeout_s)
            detail = ""
        except Exception as e:  # Postgres away, the connection broken, a check that hung: not leading
            held, detail = None, f"the leader lock's connection failed ({e!r:.200})"
            await self.lock.drop()
        self._changed(self.election.observe(Check(started, held, detail)))

    async def run(self, stop: asyncio.Event) -> None:
        """Check every `check_every_s` until `stop` (the lock stays held until `close`)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.election.check_every_s)
            if stop.is_set():
                break
            try:
                await self.step()
            except Exception:  # never let the election die: the next step tries again
                logger.exception("leader election step failed")

    async def close(self) -> None:
        """Release the lock and stop leading."""
        await self.lock.close()
        if self.election.leader:
            self._changed(self.election.observe(Check(self.clock(), None, "stopping: released the leader lock")))
