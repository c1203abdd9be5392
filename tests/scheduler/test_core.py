"""The scheduler core: events in, commands out. Pure logic, table-driven, time inside the events."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from protocol.messages import ErrorCode, Tier
from scheduler.core import (
    CoreConfig,
    Defer,
    Dispatch,
    Event,
    Fail,
    InvocationArrived,
    InvocationFinished,
    Rescue,
    ResidentReport,
    SchedulerCore,
    Tick,
    WorkerReport,
    WorkQueues,
    replay,
)
from scheduler.policy import AdapterSpec, AffinityRouter, PinnedRouter

_ids = iter(range(1_000_000))


def spec(name: str = "a", rank: int = 8) -> AdapterSpec:
    return AdapterSpec(tenant="t", adapter=name, version=f"v-{name}", rank=rank, bytes=rank * 610_560)


def report(worker_id: str, at: float = 0.0, *, max_rank: int = 128, max_inflight: int = 32,
           device: tuple[str, ...] = (), host: tuple[str, ...] = (), draining: bool = False) -> WorkerReport:
    resident = tuple(ResidentReport(f"v-{a}", Tier.device) for a in device)
    resident += tuple(ResidentReport(f"v-{a}", Tier.host) for a in host)
    return WorkerReport(at=at, worker_id=worker_id, total_pages=1000, free_pages=1000, max_rank=max_rank,
                        max_inflight=max_inflight, draining=draining, resident=resident)


def call(adapter: str | None = "a", at: float = 1.0, *, rank: int = 8, epoch: int = 1) -> InvocationArrived:
    return InvocationArrived(at=at, invocation_id=f"i{next(_ids)}", adapter=spec(adapter, rank) if adapter else None,
                             prompt_tokens=16, max_tokens=16, epoch=epoch)


def loads(**counts: int) -> WorkQueues:
    """The work stream's counts: sets each worker's load (calls waiting or running there)."""
    return WorkQueues(at=0.5, counts=tuple(counts.items()))


@dataclass(frozen=True)
class Want:
    """The one command expected for the last call of a row."""

    kind: type
    worker: str | None = None
    reason: str | None = None
    code: ErrorCode | None = None


@dataclass(frozen=True)
class Row:
    why: str
    setup: list[Event]
    last: InvocationArrived
    want: Want
    config: CoreConfig = field(default_factory=CoreConfig)


ROWS = [
    Row("an adapter's first call goes cold to the least loaded worker",
        [report("w1"), report("w2"), loads(w1=3, w2=1)], call("a"), Want(Dispatch, "w2", "cold")),
    Row("its next call sticks to that worker (the placement in flight counts as on its device), though w2 is lighter",
        [report("w1"), report("w2"), call("a")], call("a"), Want(Dispatch, "w1", "device")),
    Row("a worker holding the adapter on its device is preferred to a lighter one",
        [report("w1", device=("a",)), report("w2"), loads(w1=3, w2=0)], call("a"), Want(Dispatch, "w1", "device")),
    Row("of two holders, the lighter serves",
        [report("w1", device=("a",)), report("w2", device=("a",)), loads(w1=3, w2=2)], call("a"),
        Want(Dispatch, "w2", "device")),
    Row("a busy holder (replicate_at 8 calls) is replicated to a worker replicate_margin (4) calls lighter",
        [report("w1", device=("a",)), report("w2"), loads(w1=8, w2=4)], call("a"), Want(Dispatch, "w2", "replicate")),
    Row("not replicated when the other worker is less than the margin lighter",
        [report("w1", device=("a",)), report("w2"), loads(w1=8, w2=5)], call("a"), Want(Dispatch, "w1", "device")),
    Row("not replicated below replicate_at, however light the other worker",
        [report("w1", device=("a",)), report("w2"), loads(w1=7, w2=0)], call("a"), Want(Dispatch, "w1", "device")),
    Row("a worker with the blob in its host cache is preferred to a cold start on a lighter one",
        [report("w1", host=("a",)), report("w2"), loads(w1=2, w2=0)], call("a"), Want(Dispatch, "w1", "host")),
    Row("... with a few more calls",
        [report("w1", host=("a",)), report("w2"), loads(w1=7, w2=0)], call("a"), Want(Dispatch, "w1", "host")),
    Row("... unless it is host_margin calls heavier",
        [report("w1", host=("a",)), report("w2"), loads(w1=8, w2=0)], call("a"), Want(Dispatch, "w2", "cold")),
    Row("a device holder beats a host holder",
        [report("w1", host=("a",)), report("w2", device=("a",)), loads(w1=0, w2=3)], call("a"),
        Want(Dispatch, "w2", "device")),
    Row("a worker whose max_rank is below the adapter's rank is never chosen, even idle",
        [report("w1", max_rank=16), report("w2", max_rank=64), loads(w1=0, w2=20)], call("a", rank=32),
        Want(Dispatch, "w2", "cold")),
    Row("... not even when it holds the adapter",
        [report("w1", max_rank=16, device=("a",)), report("w2", max_rank=64)], call("a", rank=32),
        Want(Dispatch, "w2", "cold")),
    Row("a rank no worker can hold fails at once: adapter_invalid",
        [report("w1", max_rank=16), report("w2", max_rank=64)], call("a", rank=128),
        Want(Fail, code=ErrorCode.adapter_invalid)),
    Row("no workers: defer", [], call("a"), Want(Defer, reason="no_workers")),
    Row("every worker at capacity (max_inflight + queue_per_worker): defer",
        [report("w1", max_inflight=2), report("w2", max_inflight=2), loads(w1=4, w2=4)], call("a"),
        Want(Defer, reason="all_busy"), CoreConfig(queue_per_worker=2)),
    Row("a holder at capacity is passed over for a worker with room",
        [report("w1", max_inflight=2, device=("a",)), report("w2", max_inflight=2), loads(w1=4, w2=3)], call("a"),
        Want(Dispatch, "w2", "cold"), CoreConfig(queue_per_worker=2)),
    Row("a draining worker takes nothing",
        [report("w1", device=("a",), draining=True), report("w2"), loads(w1=0, w2=9)], call("a"),
        Want(Dispatch, "w2", "cold")),
    Row("the bare backbone goes to the least loaded worker",
        [report("w1"), report("w2"), loads(w1=2, w2=1)], call(None), Want(Dispatch, "w2", "base")),
    Row("a call dispatched max_epochs (5) times fails as a dead letter",
        [report("w1")], call("a", epoch=6), Want(Fail, code=ErrorCode.dead_letter)),
    Row("its fifth dispatch still goes out",
        [report("w1")], call("a", epoch=5), Want(Dispatch, "w1", "cold")),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.why for r in ROWS])
def test_route(row: Row) -> None:
    core = SchedulerCore(config=row.config)
    replay(core, row.setup)
    commands = core.handle(row.last)
    assert len(commands) == 1, commands
    got = commands[0]
    assert isinstance(got, row.want.kind), got
    if isinstance(got, Dispatch):
        assert (got.invocation_id, got.worker_id, got.reason) == (row.last.invocation_id, row.want.worker, row.want.reason)
        assert got.epoch == row.last.epoch
    elif isinstance(got, Defer):
        assert got.reason == row.want.reason
        assert got.retry_at == pytest.approx(row.last.at + row.config.defer_s)
    elif isinstance(got, Fail):
        assert got.code == row.want.code


@pytest.mark.parametrize(
    ("waited", "want"),
    [
        (0.0, Defer),  # just published: the adapter may be being uploaded
        (9.5, Defer),  # within the grace (10 s)
        (10.0, Fail),  # the grace is over: not_found
        (60.0, Fail),
    ],
)
def test_unknown_adapter_defers_until_the_grace_then_fails(waited: float, want: type) -> None:
    core = SchedulerCore()
    core.handle(report("w1"))
    e = InvocationArrived(at=100.0 + waited, invocation_id="i1", unknown=True, name="t/ghost", published_at=100.0)
    [got] = core.handle(e)
    assert isinstance(got, want)
    if isinstance(got, Defer):
        assert got.reason == "unknown_adapter"
        assert e.at < got.retry_at <= 100.0 + core.config.unknown_adapter_grace_s
    else:
        assert isinstance(got, Fail) and got.code == ErrorCode.not_found and "t/ghost" in got.message


def test_a_silent_worker_is_rescued_on_tick_and_no_longer_routed_to() -> None:
    core = SchedulerCore(config=CoreConfig(heartbeat_timeout_s=5.0))
    replay(core, [report("w1", 0.0, device=("a",)), report("w2", 0.0)])
    first = call("a", at=1.0)
    assert core.handle(first) == [Dispatch(first.invocation_id, "w1", "device")]
    assert core.handle(report("w2", 4.0)) == []
    assert core.handle(Tick(4.9)) == []  # w1 silent 4.9 s: not yet
    assert core.handle(Tick(5.1)) == [Rescue("w1", "no heartbeat for 5.1 s (timeout 5.0 s)")]
    assert core.workers() == ["w2"]
    assert core.decisions["worker_gone"] == 1
    # its adapter and its calls are gone with it: every call, the rescued one again (epoch 2) included, goes to w2
    again = InvocationArrived(at=5.2, invocation_id=first.invocation_id, adapter=first.adapter, epoch=2)
    assert core.handle(again) == [Dispatch(first.invocation_id, "w2", "cold", 2)]
    later = [c for e in [call("a", 5.3) for _ in range(5)] for c in core.handle(e)]
    assert [(type(c), getattr(c, "worker_id", None)) for c in later] == [(Dispatch, "w2")] * 5
    assert core.handle(Tick(5.5)) == []  # rescued once only


def test_invocation_finished_frees_capacity() -> None:
    core = SchedulerCore(config=CoreConfig(queue_per_worker=0))
    core.handle(report("w1", max_inflight=1))
    a, b = call("a", 1.0), call("a", 1.1)
    assert core.handle(a) == [Dispatch(a.invocation_id, "w1", "cold")]
    [deferred] = core.handle(b)
    assert isinstance(deferred, Defer) and deferred.reason == "all_busy"
    assert core.outstanding("w1") == 1
    assert core.handle(InvocationFinished(1.5, a.invocation_id, "w1")) == []
    assert core.outstanding("w1") == 0
    retry = InvocationArrived(at=deferred.retry_at, invocation_id=b.invocation_id, adapter=b.adapter)
    assert core.handle(retry) == [Dispatch(b.invocation_id, "w1", "device")]  # its placement is still in flight


def test_work_queues_give_a_restarted_core_the_load_of_every_worker() -> None:
    """A fresh core (the dispatcher restarted) knows nothing of the calls dispatched before; the work stream's
    per-worker counts tell it, and it fills the emptier worker up to the other's load first."""
    core = SchedulerCore()
    replay(core, [report("w1"), report("w2"), WorkQueues(at=0.5, counts=(("w1", 5), ("w2", 1)))])
    chosen = [cmd.worker_id for i in range(6) for cmd in core.handle(call(f"x{i}", 1.0)) if isinstance(cmd, Dispatch)]
    assert chosen == ["w2"] * 5 + ["w1"]  # w2's load 1..5 with its own dispatches; then the tie goes by name
    fresh = SchedulerCore()  # without the counts, the first call would go to w1 (ties go by name)
    replay(fresh, [report("w1"), report("w2")])
    assert [c.worker_id for c in fresh.handle(call("y")) if isinstance(c, Dispatch)] == ["w1"]


def test_a_worker_missing_from_the_counts_has_nothing_queued() -> None:
    core = SchedulerCore()
    replay(core, [report("w1"), report("w2"), loads(w1=5, w2=1)])
    core.handle(WorkQueues(at=0.6, counts=(("w2", 1),)))  # w1's subject is empty now: not listed
    assert {v.worker_id: v.outstanding for v in core.views()} == {"w1": 0, "w2": 1}


def test_calls_the_work_stream_no_longer_holds_are_forgotten_once_settled() -> None:
    """A call whose result never reached this core (another scheduler dispatched it too and the worker had
    finished it; a result missed during a reconnection) must not hold its worker's capacity: once it was
    dispatched `work_settle_s` ago and the work stream holds fewer calls for that worker, the oldest go."""
    core = SchedulerCore(config=CoreConfig(queue_per_worker=0, work_settle_s=2.0))
    replay(core, [report("w1", max_inflight=3)])
    first = [call(f"a{i}", 1.0) for i in range(2)]
    last = call("a9", 2.5)
    for e in (*first, last):
        assert [type(c) for c in core.handle(e)] == [Dispatch]
    assert not core.has_room()
    core.handle(WorkQueues(at=2.9, counts=()))  # dispatched less than 2 s ago: maybe not stored yet
    assert core.outstanding("w1") == 3 and not core.has_room()
    core.handle(WorkQueues(at=3.2, counts=(("w1", 1),)))  # the one held may be a settled one: one of two goes
    assert core.outstanding("w1") == 2 and core.has_room()
    core.handle(WorkQueues(at=4.6, counts=(("w1", 1),)))  # all settled now: the oldest goes
    assert core.outstanding("w1") == 1 and core.decisions["outstanding_forgotten"] == 2
    core.handle(InvocationFinished(3.3, last.invocation_id, "w1"))  # the one that was still there
    assert core.outstanding("w1") == 0
    core.handle(WorkQueues(at=10.0, counts=(("w1", 5),)))  # more queued than it knows of (another scheduler's)
    assert core.decisions["outstanding_forgotten"] == 2 and [v.outstanding for v in core.views()] == [5]


def test_work_queues_ignore_unknown_workers() -> None:
    core = SchedulerCore()
    replay(core, [report("w1"), WorkQueues(at=0.5, counts=(("gone", 40),))])
    assert [v.worker_id for v in core.views()] == ["w1"]


def test_pinned_router_is_obeyed_for_every_call_of_its_adapter() -> None:
    core = SchedulerCore(router=PinnedRouter(pins={"t/a": "w2"}, fallback=AffinityRouter()),
                         config=CoreConfig(queue_per_worker=0))
    replay(core, [report("w1", device=("a",), max_inflight=20), report("w2", max_inflight=20)])
    for i in range(20):  # w2 gets heavier with each; w1 holds the adapter and stays idle
        e = call("a", 1.0 + i / 100)
        assert core.handle(e) == [Dispatch(e.invocation_id, "w2", "pinned")]
    # w2 (20 calls) is full: the pinned adapter waits for it rather than go to w1, which holds it on its device
    [deferred] = core.handle(call("a", 2.0))
    assert isinstance(deferred, Defer) and deferred.reason == "all_busy"
    # other adapters are routed by the fallback
    assert [c.worker_id for c in core.handle(call("b", 2.0)) if isinstance(c, Dispatch)] == ["w1"]


def test_a_heartbeat_replaces_the_residency_it_reported_before() -> None:
    core = SchedulerCore()
    replay(core, [report("w1", device=("a",)), report("w2"), loads(w1=2, w2=0)])
    assert dict(core.residency()["v-a"]) == {"w1": Tier.device}
    core.handle(report("w1", 1.0, host=("a",)))  # evicted to the host cache
    assert dict(core.residency()["v-a"]) == {"w1": Tier.host}
    core.handle(report("w1", 2.0))  # dropped
    assert "v-a" not in core.residency()
    assert [c.reason for c in core.handle(call("a", 2.5)) if isinstance(c, Dispatch)] == ["cold"]


def test_a_placement_in_flight_expires_when_no_call_holds_it() -> None:
    core = SchedulerCore(config=CoreConfig(placement_grace_s=5.0))
    replay(core, [report("w1", 0.0), report("w2", 0.0)])
    first = call("a", 1.0)
    core.handle(first)
    assert dict(core.residency()["v-a"]) == {"w1": Tier.device}
    core.handle(InvocationFinished(2.0, first.invocation_id, "w1"))
    replay(core, [report("w1", 5.0), report("w2", 5.0), Tick(5.5)])
    assert dict(core.residency()["v-a"]) == {"w1": Tier.device}  # within the grace: the load may be under way
    replay(core, [report("w1", 6.5), report("w2", 6.5), Tick(6.5)])
    assert "v-a" not in core.residency()  # its worker never reported it and no call of it is there


def test_a_cold_call_goes_to_the_worker_with_the_most_host_cache_left() -> None:
    def held(worker_id: str, at: float, host_bytes: int, *blobs: int) -> WorkerReport:
        resident = tuple(ResidentReport(f"v-{worker_id}{i}", Tier.host, bytes=b) for i, b in enumerate(blobs))
        return WorkerReport(at=at, worker_id=worker_id, total_pages=1000, free_pages=1000, max_rank=128,
                            host_bytes=host_bytes, resident=resident)

    core = SchedulerCore()
    replay(core, [held("w1", 0.0, 1000, 300), held("w2", 0.0, 1000, 600), loads(w1=0, w2=0)])
    assert [v.host_free_bytes for v in core.views()] == [700, 400]
    assert [(c.worker_id, c.reason) for c in core.handle(call("x", 1.0)) if isinstance(c, Dispatch)] == [("w1", "cold")]
    core.handle(held("w1", 2.0, 1000, 300, 500))  # it fetched x (and more): w2 has the room now
    assert [v.host_free_bytes for v in core.views()] == [200, 400]
    core.handle(loads(w1=0, w2=0))
    assert [(c.worker_id, c.reason) for c in core.handle(call("y", 3.0)) if isinstance(c, Dispatch)] == [("w2", "cold")]
    core.handle(held("w2", 4.0, 0, 600))  # a host budget it does not report: no room known
    assert [v.host_free_bytes for v in core.views()] == [200, 0]
