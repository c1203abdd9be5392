"""The scheduler's warm state: heartbeats, expiry, fresh placements (a fake clock)."""

from __future__ import annotations

from protocol.messages import Heartbeat, ResidentAdapter
from scheduler.state import WarmState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hb(worker_id: str, *device: str, draining: bool = False) -> Heartbeat:
    return Heartbeat(
        worker_id=worker_id, host="h", device="cpu", started_at=0.0, draining=draining,
        capacity={"pool_pages": 1000}, free_pages=900, running=1, queue_depth=2,
        resident=[ResidentAdapter(tenant="t", adapter=f"a{v}", version=v, tier="device") for v in device],
    )


def test_heartbeats_expiry_and_views() -> None:
    clock = Clock()
    state = WarmState(heartbeat_timeout_s=3.0, placement_grace_s=5.0, clock=clock)
    state.observe(hb("w1", "v1"))
    state.observe(hb("w2", draining=True))
    [v1, v2] = state.views()
    assert (v1.worker_id, v1.total_pages, v1.free_pages, v1.load, v1.draining) == ("w1", 1000, 900, 3, False)
    assert v2.draining
    assert state.holders("v1") == ["w1"]
    assert {h.worker_id for h in state.dirty()} == {"w1", "w2"} and state.dirty() == []
    clock.now += 2.0
    state.observe(hb("w1", "v1"))
    clock.now += 2.0
    assert state.expire() == ["w2"]
    clock.now += 2.0
    assert state.expire() == ["w1"] and state.holders("v1") == []


def test_fresh_placement_counts_until_heartbeat_or_grace() -> None:
    clock = Clock()
    state = WarmState(heartbeat_timeout_s=30.0, placement_grace_s=5.0, clock=clock)
    state.observe(hb("w1"))
    state.placed("v9", "w1")
    assert state.holders("v9") == ["w1"]  # not in a heartbeat yet, but just loaded
    clock.now += 6.0
    state.observe(hb("w1"))
    assert state.holders("v9") == []  # the grace is over and heartbeats never showed it
    state.placed("v9", "w1")
    state.observe(hb("w1", "v9"))
    assert state.holders("v9") == ["w1"]
    state.unplaced("v8", "w1")  # unknown: nothing happens
