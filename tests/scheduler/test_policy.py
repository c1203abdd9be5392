"""Placement and eviction policies: pure logic, table-driven."""

from __future__ import annotations

import pytest

from protocol.messages import Tier
from scheduler.policy import (
    AdapterSpec,
    AffinityRouter,
    CallView,
    LruEviction,
    PinnedRouter,
    ResidentView,
    WorkerView,
)

A = AdapterSpec(tenant="t", adapter="a", version="v1", rank=16)
CALL = CallView("inv-1", A)
D, H = Tier.device, Tier.host


def w(worker_id: str, *, load: int = 0, free: int = 1000, capacity: int = 64, max_rank: int = 0,
      draining: bool = False, host_free: int = 0) -> WorkerView:
    return WorkerView(worker_id=worker_id, total_pages=1000, free_pages=free, outstanding=load, capacity=capacity,
                      max_rank=max_rank, draining=draining, host_free_bytes=host_free)


@pytest.mark.parametrize(
    ("workers", "residency", "expected"),
    [
        ([], {}, None),  # nobody to run it: the core defers
        ([w("w1")], {}, ("w1", "cold")),
        ([w("w1", load=3), w("w2", load=1)], {}, ("w2", "cold")),  # least loaded
        ([w("w1", draining=True), w("w2", load=9)], {}, ("w2", "cold")),  # draining workers take nothing
        ([w("w1", draining=True)], {}, None),
        ([w("w1", load=64), w("w2", load=9)], {}, ("w2", "cold")),  # w1 is at capacity
        ([w("w1", max_rank=8), w("w2", load=5)], {}, ("w2", "cold")),  # w1's pool cannot hold rank 16
        ([w("w1"), w("w2")], {}, ("w1", "cold")),  # ties: the name decides, deterministically
        ([w("w1", free=100), w("w2", free=900)], {}, ("w2", "cold")),  # ties: more free pages
        # ties: more room in the host cache first (the fetched blob pushes out no other), then free pages
        ([w("w1", free=900, host_free=10), w("w2", free=100, host_free=500)], {}, ("w2", "cold")),
        ([w("w1", load=1, host_free=500), w("w2", host_free=10)], {}, ("w2", "cold")),  # load comes first
        ([w("w1"), w("w2")], {"v1": {"w2": H}}, ("w2", "host")),  # the blob is in w2's host cache
        ([w("w1"), w("w2", load=7)], {"v1": {"w2": H}}, ("w2", "host")),  # ... worth some extra load
        ([w("w1"), w("w2", load=8)], {"v1": {"w2": H}}, ("w1", "cold")),  # ... not host_margin more
        ([w("w1"), w("w2", load=7)], {"v1": {"w2": D}}, ("w2", "device")),  # on a device: keep it there
        ([w("w1"), w("w2", load=8)], {"v1": {"w2": D}}, ("w1", "replicate")),  # a busy holder: replicate
        # ... to a worker with the blob in its host cache when it is lighter too (a host load, not a cold start)
        ([w("w1"), w("w2", load=8), w("w3", load=3)], {"v1": {"w2": D, "w3": H}}, ("w3", "replicate")),
        ([w("w1"), w("w2", load=8), w("w3", load=5)], {"v1": {"w2": D, "w3": H}}, ("w1", "replicate")),
        ([w("w1", load=5), w("w2", load=8)], {"v1": {"w2": D}}, ("w2", "device")),  # not much lighter: stay
        ([w("w1", load=9), w("w2", load=8)], {"v1": {"w1": D, "w2": D}}, ("w2", "device")),  # lighter holder
        ([w("w1"), w("w2", load=7, draining=True)], {"v1": {"w2": D}}, ("w1", "cold")),
        ([w("w1", load=1), w("w2")], {"v2": {"w1": D}}, ("w2", "cold")),  # another version is irrelevant
    ],
)
def test_affinity_router(workers, residency, expected) -> None:  # type: ignore[no-untyped-def]
    route = AffinityRouter(replicate_at=8, replicate_margin=4).route(CALL, workers, residency)
    assert (None if route is None else (route.worker_id, route.reason)) == expected


def test_base_model_calls_go_to_the_least_loaded_worker() -> None:
    route = AffinityRouter().route(CallView("inv-2", None), [w("w1", load=2), w("w2", load=1)], {"v1": {"w1": D}})
    assert route is not None and (route.worker_id, route.reason) == ("w2", "base")


@pytest.mark.parametrize(
    ("pins", "workers", "expected"),
    [
        ({"v1": "w2"}, [w("w1"), w("w2", load=30)], ("w2", "pinned")),  # pinned by version, even if loaded
        ({"t/a": "w2"}, [w("w1"), w("w2", load=30)], ("w2", "pinned")),  # pinned by name
        ({"v1": "w2"}, [w("w1"), w("w2", load=64)], None),  # the pinned worker is full: wait for it
        ({"v1": "w3"}, [w("w1"), w("w2")], None),  # the pinned worker is not alive: wait for it
        ({"other": "w2"}, [w("w1"), w("w2")], ("w1", "cold")),  # not pinned: the fallback decides
    ],
)
def test_pinned_router(pins, workers, expected) -> None:  # type: ignore[no-untyped-def]
    route = PinnedRouter(pins=pins).route(CALL, workers, {})
    assert (None if route is None else (route.worker_id, route.reason)) == expected


def r(version: str, pages: int, last_used: float, in_use: int = 0) -> ResidentView:
    return ResidentView(version=version, pages=pages, last_used=last_used, in_use=in_use)


@pytest.mark.parametrize(
    ("needed", "free", "resident", "expected"),
    [
        (10, 10, [r("a", 50, 1.0)], []),  # fits already
        (60, 10, [r("a", 50, 2.0), r("b", 50, 1.0)], ["b"]),  # least recently used first
        (110, 10, [r("a", 50, 2.0), r("b", 50, 1.0)], ["b", "a"]),
        (60, 10, [r("a", 50, 2.0), r("b", 50, 1.0, in_use=1)], ["a"]),  # never one in use
        (60, 10, [r("a", 50, 2.0, in_use=2), r("b", 50, 1.0, in_use=1)], None),  # cannot fit
        (500, 10, [r("a", 50, 2.0)], None),
        (30, 0, [r("a", 10, 1.0), r("b", 10, 2.0), r("c", 10, 3.0), r("d", 10, 4.0)], ["a", "b", "c"]),
    ],
)
def test_lru_eviction(needed, free, resident, expected) -> None:  # type: ignore[no-untyped-def]
    assert LruEviction().choose_victims(needed, free, resident) == expected
