"""Leader election (scheduler.leader): the decision as table rows; the lock over the session's real Postgres
(taken by one connection only, free once its holder closes or its session is ended); the dispatcher of a
follower leaving staging verbs and rescues to the leader, over the session's real NATS."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import nats
import nats.js.errors
import pytest
from sqlalchemy import select, text, update

from protocol import subjects
from protocol.dispatch import WorkHeaders, dispatch
from protocol.messages import (
    ControlReply,
    ControlRequest,
    ControlVerb,
    Heartbeat,
    Invocation,
    InvocationStarted,
    Sampling,
)
from protocol.streams import ensure_streams
from scheduler.core import Command, Event, Load, Rescue, WorkerGone
from scheduler.dispatcher import AdapterDirectory, Dispatcher
from scheduler.leader import Change, Check, Election, LeaderElection, LeaderLock
from scheduler.metrics import SchedulerMetrics
from scheduler.service import STARTED_KEEP_S, SchedulerService
from scheduler.settings import PlacementSettings, SchedulerSettings
from storage import repo
from storage.models import InvocationStatus, Worker
from storage.settings import DatabaseSettings

pytestmark = pytest.mark.timeout(60)

TTL = 5.0

# -- the decision ---------------------------------------------------------------------------------------------

# (checks as (at, held), then the leadership after each, and why)
ROWS = [
    ([(0.0, True)], [True], "a free lock taken: leader"),
    ([(0.0, False)], [False], "another replica holds it: follower"),
    ([(0.0, None)], [False], "Postgres away: follower"),
    ([(0.0, True), (1.0, True), (2.0, True)], [True, True, True], "confirmed each second: stays leader"),
    ([(0.0, True), (1.0, None)], [True, False], "a failed check steps down at once"),
    ([(0.0, True), (1.0, False)], [True, False], "the lock found held by another session: step down"),
    ([(0.0, None), (1.0, True)], [False, True], "Postgres back: the lock taken"),
    ([(0.0, False), (1.0, False), (2.0, True)], [False, False, True], "the leader died: the lock taken"),
]


@pytest.mark.parametrize(("checks", "leading", "why"), ROWS, ids=[r[2] for r in ROWS])
def test_election_decides_from_checks(checks: list[tuple[float, bool | None]], leading: list[bool],
                                      why: str) -> None:
    election = Election(ttl_s=TTL)
    assert not election.leader
    for (at, held), expected in zip(checks, leading, strict=True):
        before = election.leader
        change = election.observe(Check(at, held))
        assert election.leader is expected, why
        assert election.leads(at) is expected, why
        assert (change is not None) is (before != expected), why  # a change is reported exactly when it happens
        if change is not None:
            assert change.leader is expected and change.at == at and change.reason


def test_a_leader_whose_lock_is_not_confirmed_for_the_ttl_stops_leading() -> None:
    election = Election(ttl_s=TTL)
    election.observe(Check(10.0, True))
    assert election.leads(10.0 + TTL) and election.expire(10.0 + TTL) is None
    assert not election.leads(10.0 + TTL + 0.1)  # no issuing past the lease, even before expire() runs
    change = election.expire(10.0 + TTL + 0.1)
    assert change is not None and not change.leader and "not confirmed for 5.1 s" in change.reason
    assert not election.leader and election.expire(20.0) is None  # reported once
    assert election.observe(Check(21.0, True)) == Change(21.0, True, "took the leader lock")


def test_a_slow_confirmation_counts_from_when_its_check_started() -> None:
    election = Election(ttl_s=TTL)
    election.observe(Check(0.0, True))
    election.observe(Check(4.0, True))  # a check started at 4 s that answered later
    assert election.leads(9.0) and not election.leads(9.5)


def test_failure_reasons_are_reported() -> None:
    election = Election(ttl_s=TTL)
    election.observe(Check(0.0, True))
    change = election.observe(Check(1.0, None, "the leader lock's connection failed (OSError())"))
    assert change is not None and change.reason == "the leader lock's connection failed (OSError())"
    election.observe(Check(2.0, True))
    change = election.observe(Check(3.0, False))
    assert change is not None and change.reason == "another scheduler holds the leader lock"


def test_election_timing_derives_from_the_ttl() -> None:
    election = Election(ttl_s=TTL)
    assert election.check_every_s == 1.0 and election.check_timeout_s == 2.5
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        Election(ttl_s=0)


# -- the lock on Postgres -------------------------------------------------------------------------------------


def a_key() -> int:
    """A lock key of this test's own (a live stack's schedulers compete for LEADER_LOCK_KEY)."""
    return secrets.randbits(62) + 1


async def eventually_taken(lock: LeaderLock) -> None:
    """Check until `lock` is taken: the server releases a lock when the backend of its ended session exits,
    a moment after the client closed it or the backend was told to terminate."""
    for _ in range(100):
        if await lock.check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the lock was not released")


async def eventually_leads(election: LeaderElection) -> None:
    for _ in range(100):
        await election.step()
        if election.leads():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the lock was not released")


async def terminate_holders(database: DatabaseSettings, key: int) -> int:
    """End the sessions holding advisory lock `key` from outside (as a Postgres restart would); how many."""
    engine = repo.create_engine(database)
    try:
        async with engine.begin() as conn:
            ended = await conn.scalar(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid::bigint = :hi AND objid::bigint = :lo AND objsubid = 1"),
                {"hi": key >> 32, "lo": key & 0xFFFFFFFF})
            return int(ended or 0)
    finally:
        await engine.dispose()


async def test_one_connection_holds_the_lock_until_it_closes(database_settings: DatabaseSettings) -> None:
    key = a_key()
    a, b = LeaderLock(database_settings, key=key), LeaderLock(database_settings, key=key)
    try:
        assert await a.check() is True
        assert await b.check() is False
        assert await a.check() is True  # confirmed (pg_locks), not taken again
        assert await b.check() is False
        await a.close()  # the server releases it with the session
        await eventually_taken(b)
        assert await b.check() is True
    finally:
        await a.close()
        await b.close()


async def test_a_holder_whose_session_is_ended_fails_its_check_and_the_lock_is_free(
        database_settings: DatabaseSettings) -> None:
    key = a_key()
    a, b = LeaderLock(database_settings, key=key), LeaderLock(database_settings, key=key)
    try:
        assert await a.check() is True
        assert await terminate_holders(database_settings, key) == 1
        await eventually_taken(b)  # free: the session that held it is gone
        with pytest.raises(Exception):  # noqa: B017 - the driver's own error for a terminated connection
            await a.check()
        await a.drop()
        assert await a.check() is False  # a new connection: the lock is b's now
    finally:
        await a.close()
        await b.close()


async def test_two_elections_one_leader_and_takeover(database_settings: DatabaseSettings) -> None:
    key = a_key()
    changes: dict[str, list[Change]] = {"a": [], "b": []}
    a = LeaderElection(LeaderLock(database_settings, key=key, ttl_s=1.0), ttl_s=1.0, on_change=changes["a"].append)
    b = LeaderElection(LeaderLock(database_settings, key=key, ttl_s=1.0), ttl_s=1.0, on_change=changes["b"].append)
    try:
        await a.step()
        await b.step()
        assert a.leads() and not b.leads()
        assert [c.leader for c in changes["a"]] == [True] and changes["b"] == []

        await terminate_holders(database_settings, key)  # a's session ended: a steps down at its next check
        await eventually_leads(b)
        await a.step()
        assert b.leads() and not a.leads()
        assert [c.leader for c in changes["a"]] == [True, False]
        assert "connection failed" in changes["a"][-1].reason

        await b.close()  # a graceful stop: released, and said
        assert [c.leader for c in changes["b"]] == [True, False] and "released" in changes["b"][-1].reason
        await eventually_leads(a)
    finally:
        await a.close()
        await b.close()


async def test_an_election_without_postgres_never_leads() -> None:
    changes: list[Change] = []
    election = LeaderElection(
        LeaderLock(DatabaseSettings(url="postgresql://nobody@127.0.0.1:1/none"), key=a_key(), ttl_s=1.0),
        ttl_s=1.0, on_change=changes.append)
    try:
        await election.step()
        assert not election.leads() and changes == []
    finally:
        await election.close()


# -- the dispatcher of a follower ---------------------------------------------------------------------------


@dataclass
class ScriptedCore:
    """Stands in for SchedulerCore: answers each event with the commands queued for it."""

    script: list[list[Command]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)
    workers_needed: int = 0

    def views(self) -> list[Any]:
        return []

    def handle(self, event: Event) -> list[Command]:
        self.events.append(event)
        return self.script.pop(0) if self.script else []

    def has_room(self) -> bool:
        return True


async def test_a_follower_leaves_staging_and_rescues_to_the_leader(services: Any) -> None:
    nc = await nats.connect(services.nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    worker = f"lead-{secrets.token_hex(3)}"
    requests: list[ControlRequest] = []

    async def answer(msg: Any) -> None:
        requests.append(ControlRequest.decode(msg.data))
        await msg.respond(ControlReply(ok=True).encode())

    await nc.subscribe(f"{subjects.CTL_PREFIX}.{worker}.*", cb=answer)
    # The worker's consumer and one invocation waiting on its subject: what a rescue deletes and requeues.
    await js.add_consumer(subjects.WORK_STREAM, durable_name=subjects.work_consumer(worker),
                          filter_subject=subjects.work(worker))
    inv = Invocation(id=f"inv-{secrets.token_hex(6)}", tenant="leadtest", adapter="a", prompt="hi",
                     sampling=Sampling(max_tokens=2))
    await dispatch(js, inv.encode(), secrets.randbits(40), worker, WorkHeaders(epoch=1, subject="lora.invoke.leadtest.a"))

    leading = [False]
    core = ScriptedCore()
    metrics = SchedulerMetrics()

    async def fail(*_: Any) -> None:
        raise AssertionError("nothing fails here")

    dispatcher = Dispatcher(nc=nc, js=js, core=core, directory=AdapterDirectory(None, ttl_s=0.0),  # type: ignore[arg-type]
                            cfg=PlacementSettings(), fail=fail, metrics=metrics, leading=lambda: leading[0])

    async def queued() -> int:
        info = await js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.work(worker))
        return int((info.state.subjects or {}).get(subjects.work(worker), 0))

    async def settle() -> None:
        await nc.flush()
        while dispatcher._tasks:
            await asyncio.wait(set(dispatcher._tasks), timeout=10)
        await nc.flush()

    try:
        # A follower: its core's staging verb and rescue are not carried out.
        core.script = [[Load("v" * 64, worker)], [Rescue(worker, "no heartbeat")]]
        dispatcher.apply(WorkerGone(0.0, "x"))
        dispatcher.apply(WorkerGone(0.0, "x"))
        await dispatcher.tick()  # a follower's tick does not carry out kept rescues
        await settle()
        assert requests == []
        assert await queued() == 1
        await js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(worker))  # still there
        body = metrics.render()[0].decode()
        assert 'lorafn_scheduler_dropped_commands_total{kind="load"} 1.0' in body
        assert 'lorafn_scheduler_dropped_commands_total{kind="rescue"} 1.0' in body

        # It becomes leader: the kept rescue is carried out at its next tick, and staging verbs go out.
        leading[0] = True
        await dispatcher.tick()
        core.script = [[Load("w" * 64, worker)]]
        dispatcher.apply(WorkerGone(0.0, "x"))
        await settle()
        assert [(r.verb, r.version) for r in requests] == [(ControlVerb.load, "w" * 64)]
        assert await queued() == 0  # requeued for its next dispatch
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(worker))
        last = await js.get_last_msg(subjects.INVOCATIONS_STREAM, "lora.invoke.leadtest.a")
        assert Invocation.decode(last.data or b"").id == inv.id and WorkHeaders.from_headers(
            dict(last.headers or {})).epoch == 2
    finally:
        await js.purge_stream(subjects.INVOCATIONS_STREAM, subject="lora.invoke.leadtest.a")
        await nc.close()


async def test_a_kept_rescue_is_forgotten_when_the_worker_heartbeats_again(services: Any) -> None:
    """A follower kept the rescue of a worker that then came back (a restart with its id): leading later, it
    leaves the worker's consumer alone."""
    nc = await nats.connect(services.nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    worker = f"back-{secrets.token_hex(3)}"
    await js.add_consumer(subjects.WORK_STREAM, durable_name=subjects.work_consumer(worker),
                          filter_subject=subjects.work(worker))
    leading = [False]
    core = ScriptedCore(script=[[Rescue(worker, "no heartbeat")]])

    async def fail(*_: Any) -> None:
        raise AssertionError("nothing fails here")

    dispatcher = Dispatcher(nc=nc, js=js, core=core, directory=AdapterDirectory(None, ttl_s=0.0),  # type: ignore[arg-type]
                            cfg=PlacementSettings(), fail=fail, leading=lambda: leading[0])
    try:
        dispatcher.apply(WorkerGone(0.0, worker))
        dispatcher.on_heartbeat(Heartbeat(worker_id=worker, host="h", device="cpu", started_at=1.0))
        leading[0] = True
        await dispatcher.tick()
        while dispatcher._tasks:
            await asyncio.wait(set(dispatcher._tasks), timeout=10)
        await js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(worker))  # not deleted
    finally:
        await js.delete_consumer(subjects.WORK_STREAM, subjects.work_consumer(worker))
        await nc.close()


# -- the leader's writes ----------------------------------------------------------------------------------------


@dataclass
class FixedElection:
    leader: bool = False

    def leads(self) -> bool:
        return self.leader


async def test_only_the_leader_writes_warm_state_and_prunes_silent_workers(
        sessions: Any, database_settings: DatabaseSettings) -> None:
    service = SchedulerService(SchedulerSettings(database=database_settings,
                                                 scheduler=PlacementSettings(worker_prune_after_s=3600.0)))
    service.sessions = sessions
    election = FixedElection()
    service.election = election  # type: ignore[assignment]
    async with sessions() as session, session.begin():  # a worker last heard of two hours ago
        await repo.upsert_worker(session, worker_id="w-old", host="h", device="cpu", capacity={})
        await session.execute(update(Worker).where(Worker.id == "w-old").values(
            last_heartbeat_at=datetime.now(UTC) - timedelta(hours=2)))
    service.state.observe(Heartbeat(worker_id="w-live", host="h", device="cpu", started_at=1.0))

    async def worker_ids() -> list[str]:
        async with sessions() as session:
            return sorted((await session.scalars(select(Worker.id))).all())

    await service.flush()  # a follower: the leader writes warm state
    assert await worker_ids() == ["w-old"]

    election.leader = True
    service._on_leader_change(Change(0.0, True, "took the leader lock"))
    await service.flush()
    assert await worker_ids() == ["w-live"]  # written whole; the silent one's row deleted
    assert "lorafn_scheduler_leader 1.0" in service.metrics.render()[0].decode()


async def test_starts_seen_while_following_are_written_by_the_next_leader(
        sessions: Any, database_settings: DatabaseSettings) -> None:
    """A call that starts while this replica follows is the leader's to mark running; when the leader dies
    before writing it (the takeover's gap), this replica writes it once it leads. Starts older than
    STARTED_KEEP_S are let go while following."""
    service = SchedulerService(SchedulerSettings(database=database_settings))
    service.sessions = sessions
    election = FixedElection()
    service.election = election  # type: ignore[assignment]
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
        for name in ("gap", "old"):
            await repo.create_invocation(session, invocation_id=name, tenant=acme, adapter=None)
    await service._on_started(SimpleNamespace(data=InvocationStarted(  # type: ignore[arg-type]
        invocation_id="gap", worker_id="w1", attempt=2, started_at=1_700_000_000.0).encode()))
    service._started.insert(0, (time.monotonic() - STARTED_KEEP_S - 1, InvocationStarted(
        invocation_id="old", worker_id="w1", started_at=1_699_999_000.0)))

    async def status(invocation_id: str) -> tuple[Any, ...]:
        async with sessions() as session:
            row = await repo.get_invocation(session, invocation_id=invocation_id)
        return row.status, row.worker_id, row.attempts

    await service.flush()  # following: nothing written, the recent start kept, the old one let go
    assert await status("gap") == (InvocationStatus.queued, None, 0)
    assert [s.invocation_id for _, s in service._started] == ["gap"]

    election.leader = True
    await service.flush()
    assert await status("gap") == (InvocationStatus.running, "w1", 2)
    assert await status("old") == (InvocationStatus.queued, None, 0)
    assert service._started == []
