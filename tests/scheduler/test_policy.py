"""Placement and eviction policies: pure logic, table-driven."""

from __future__ import annotations

import pytest

from scheduler.policy import AdapterRef, LeastLoadedPlacement, LruEviction, ResidentView, WorkerView

A = AdapterRef(tenant="t", adapter="a", version="v1", pages=100)


def w(worker_id: str, *, load: int = 0, free: int = 1000, total: int = 1000, draining: bool = False) -> WorkerView:
    return WorkerView(worker_id=worker_id, total_pages=total, free_pages=free, running=load, draining=draining)


@pytest.mark.parametrize(
    ("workers", "residency", "expected"),
    [
        ([], {}, None),
        ([w("w1")], {}, "w1"),
        ([w("w1", load=3), w("w2", load=1)], {}, "w2"),  # least loaded
        ([w("w1", draining=True), w("w2", load=9)], {}, "w2"),  # draining workers take nothing
        ([w("w1", draining=True)], {}, None),
        ([w("w1", total=50), w("w2", load=5)], {}, "w2"),  # w1's pool could never hold 100 pages
        ([w("w1"), w("w2")], {}, "w1"),  # ties: the name decides, deterministically
        ([w("w1", free=100), w("w2", free=900)], {}, "w2"),  # ties: more free pages
        ([w("w1"), w("w2")], {"v1": {"w2": "host"}}, "w2"),  # ties: the blob is in w2's host cache
        ([w("w1"), w("w2", load=1)], {"v1": {"w2": "host"}}, "w1"),  # load beats a cached blob
        ([w("w1"), w("w2", load=7)], {"v1": {"w2": "device"}}, "w2"),  # already on a device: keep it there
        ([w("w1"), w("w2", load=7, draining=True)], {"v1": {"w2": "device"}}, "w1"),
        ([w("w1", load=1), w("w2")], {"v2": {"w1": "device"}}, "w2"),  # another version's residency is irrelevant
    ],
)
def test_least_loaded_placement(workers, residency, expected) -> None:  # type: ignore[no-untyped-def]
    assert LeastLoadedPlacement().choose_worker(A, workers, residency) == expected


def test_least_loaded_placement_skips_excluded_workers() -> None:
    policy = LeastLoadedPlacement(exclude=frozenset({"w1"}))
    assert policy.choose_worker(A, [w("w1"), w("w2", load=4)], {}) == "w2"


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
