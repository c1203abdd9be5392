"""The scheduler's record of heartbeats for Postgres: dirty tracking, expiry, goodbyes (a fake clock)."""

from __future__ import annotations

from protocol.messages import Heartbeat, ResidentAdapter, Tier
from scheduler.state import WarmState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hb(worker_id: str, *device: str, gone: bool = False) -> Heartbeat:
    return Heartbeat(
        worker_id=worker_id, host="h", device="cpu", started_at=0.0, gone=gone,
        capacity={"pool_pages": 1000}, free_pages=900, running=1, queue_depth=2,
        resident=[ResidentAdapter(version=v, tier=Tier.device) for v in device],
    )


def test_heartbeats_are_written_once_and_expire() -> None:
    clock = Clock()
    state = WarmState(heartbeat_timeout_s=3.0, clock=clock)
    state.observe(hb("w1", "v1"))
    state.observe(hb("w2"))
    heartbeats, gone = state.to_write()
    assert {h.worker_id for h in heartbeats} == {"w1", "w2"} and gone == []
    assert state.to_write() == ([], [])  # written: nothing new until the next heartbeat
    clock.now += 2.0
    state.observe(hb("w1", "v1"))
    assert [h.worker_id for h in state.to_write()[0]] == ["w1"]
    clock.now += 2.0
    assert state.expire() == ["w2"]  # 4 s silent > 3 s
    assert state.to_write() == ([], ["w2"])
    clock.now += 2.0
    assert state.expire() == ["w1"]
    assert state.workers == {}


def test_a_failed_flush_keeps_what_it_could_not_write() -> None:
    clock = Clock()
    state = WarmState(heartbeat_timeout_s=3.0, clock=clock)
    state.observe(hb("w1"))
    state.observe(hb("w2"))
    clock.now += 4.0
    state.observe(hb("w1"))
    state.expire()
    heartbeats, gone = state.to_write()
    assert [h.worker_id for h in heartbeats] == ["w1"] and gone == ["w2"]
    state.unwritten(heartbeats, gone)  # Postgres was away
    heartbeats, gone = state.to_write()
    assert [h.worker_id for h in heartbeats] == ["w1"] and gone == ["w2"]  # the down-marking is not forgotten


def test_a_goodbye_removes_the_worker_at_once() -> None:
    state = WarmState(heartbeat_timeout_s=30.0, clock=Clock())
    state.observe(hb("w1"))
    state.observe(hb("w1", gone=True))
    assert state.workers == {} and state.expire() == []
    assert state.to_write()[1] == ["w1"]  # marked down at the next flush
