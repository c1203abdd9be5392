"""Residency in heartbeats: the sender's deltas and full heartbeats, and the tracker that reads them (pure)."""

from __future__ import annotations

import random

import pytest

from protocol.messages import Heartbeat, ResidentAdapter, Tier
from protocol.residency import ResidencySender, ResidencyTracker, residency_headers
from protocol.subjects import RESIDENCY_HEADER

A, B, C = "a" * 64, "b" * 64, "c" * 64


def entry(version: str, tier: Tier = Tier.device, *, last_used: float | None = None, in_use: int = 0) -> ResidentAdapter:
    return ResidentAdapter(version=version, tier=tier, pages=2 if tier == Tier.device else 0, in_use=in_use,
                           last_used=last_used)


def beat(*resident: ResidentAdapter, worker: str = "w1", started_at: float = 100.0) -> Heartbeat:
    return Heartbeat(worker_id=worker, host="h", device="cpu", started_at=started_at, resident=list(resident))


def held(tracker: ResidencyTracker[ResidentAdapter], worker: str = "w1") -> dict[str, ResidentAdapter] | None:
    resident = tracker.resident(worker)
    return None if resident is None else {r.version: r for r in resident}


def test_the_sender_sends_changes_and_the_whole_residency_every_few_heartbeats() -> None:
    sender = ResidencySender(full_every=3)
    [first] = sender.stamp(beat(entry(A), entry(B, Tier.host)))
    assert first.full and first.resident_seq == 1 and {r.version for r in first.resident} == {A, B}
    assert residency_headers(first) == {RESIDENCY_HEADER: "1 100.0 w1"}

    [same] = sender.stamp(beat(entry(A), entry(B, Tier.host)))  # nothing changed
    assert (same.resident_seq, same.resident_base, same.resident, same.removed) == (2, 1, [], [])
    assert residency_headers(same) is None

    [used] = sender.stamp(beat(entry(A, last_used=5.0, in_use=1), entry(B, Tier.host)))
    assert (used.resident_seq, used.resident_base, used.removed) == (3, 2, [])
    assert used.resident == [entry(A, last_used=5.0, in_use=1)]

    # The third delta since the full one: followed by the whole residency under the same seq.
    delta, full = sender.stamp(beat(entry(A, last_used=5.0, in_use=1), entry(B), entry(C, Tier.host)))
    assert (delta.resident_seq, delta.resident_base, delta.removed) == (4, 3, [])
    assert {r.version: r.tier for r in delta.resident} == {B: Tier.device, C: Tier.host}  # a tier change, an addition
    assert full.full and full.resident_seq == 4 and {r.version for r in full.resident} == {A, B, C}
    assert residency_headers(full) == {RESIDENCY_HEADER: "4 100.0 w1"}

    [dropped] = sender.stamp(beat(entry(B), entry(C, Tier.host)))
    assert (dropped.resident_seq, dropped.resident_base, dropped.resident, dropped.removed) == (5, 4, [], [A])

    sender.reset()  # e.g. reconnected: the next one is whole, and alone
    [again] = sender.stamp(beat(entry(B), entry(C, Tier.host)))
    assert again.full and again.resident_seq == 6


def test_the_sender_takes_whole_heartbeats_only() -> None:
    with pytest.raises(ValueError, match="full_every must be >= 1"):
        ResidencySender(full_every=0)
    delta = Heartbeat(worker_id="w1", host="h", device="cpu", started_at=1.0, resident_seq=2, resident_base=1)
    with pytest.raises(ValueError, match="delta on 1"):
        ResidencySender().stamp(delta)


def test_the_tracker_applies_deltas_removals_and_tier_changes() -> None:
    sender, tracker = ResidencySender(full_every=100), ResidencyTracker.of_adapters()
    for hb in sender.stamp(beat(entry(A), entry(B, Tier.host))):
        assert tracker.apply(hb)
    assert held(tracker) == {A: entry(A), B: entry(B, Tier.host)}
    for hb in sender.stamp(beat(entry(B), entry(C, Tier.host, last_used=9.0))):  # B loaded, A dropped, C fetched
        assert tracker.apply(hb)
    assert held(tracker) == {B: entry(B), C: entry(C, Tier.host, last_used=9.0)}
    assert tracker.entries("w1").keys() == {B, C} and tracker.entries("w2") == {}
    assert tracker.ignored == 0


def test_after_a_lost_heartbeat_deltas_are_ignored_until_the_next_full_one() -> None:
    sender, tracker = ResidencySender(full_every=3), ResidencyTracker.of_adapters()
    [hb] = sender.stamp(beat(entry(A)))
    tracker.apply(hb)
    sender.stamp(beat(entry(A), entry(B)))  # lost: B's arrival
    [hb] = sender.stamp(beat(entry(A), entry(B), entry(C)))
    assert not tracker.apply(hb)  # a delta on the lost heartbeat: C alone would be a wrong view
    assert held(tracker) == {A: entry(A)}  # the view before the loss, kept
    delta, full = sender.stamp(beat(entry(B), entry(C)))
    assert not tracker.apply(delta) and not tracker.has(residency_headers(full))  # still out of step
    assert tracker.apply(full)
    assert held(tracker) == {B: entry(B), C: entry(C)} and tracker.ignored == 2
    [hb] = sender.stamp(beat(entry(C)))
    assert tracker.apply(hb) and held(tracker) == {C: entry(C)}  # in step again


def test_a_tracker_started_between_full_heartbeats_knows_nothing_until_one() -> None:
    sender, early, late = ResidencySender(full_every=2), ResidencyTracker.of_adapters(), ResidencyTracker.of_adapters()
    for hb in sender.stamp(beat(entry(A))):
        early.apply(hb)
    [hb] = sender.stamp(beat(entry(A), entry(B)))
    assert early.apply(hb) and not late.apply(hb)
    assert late.resident("w1") is None
    delta, full = sender.stamp(beat(entry(B)))
    for hb in (delta, full):
        if not early.has(residency_headers(hb)):  # in step: the full one needs no decoding
            assert hb is delta
            early.apply(hb)
        if not late.has(residency_headers(hb)):
            late.apply(hb)
    assert held(early) == held(late) == {B: entry(B)}


def test_a_restarted_worker_is_not_mistaken_for_its_earlier_process() -> None:
    tracker = ResidencyTracker.of_adapters()
    old = ResidencySender()
    for resident in ([entry(A)], [entry(A), entry(B)]):
        for hb in old.stamp(beat(*resident)):
            tracker.apply(hb)
    restarted = ResidencySender()
    [full] = restarted.stamp(beat(entry(C), started_at=200.0))  # lost
    [delta] = restarted.stamp(beat(entry(C), entry(A), started_at=200.0))  # a delta on seq 1, as is the old view's
    assert not tracker.apply(delta)
    assert not tracker.has(residency_headers(full))
    assert tracker.apply(full) and held(tracker) == {C: entry(C)}


def test_an_unchanged_residency_keeps_its_tuple_and_a_goodbye_is_forgotten() -> None:
    sender, tracker = ResidencySender(), ResidencyTracker.of_adapters()
    for hb in sender.stamp(beat(entry(A))):
        tracker.apply(hb)
    first = tracker.resident("w1")
    for hb in sender.stamp(beat(entry(A))):
        tracker.apply(hb)
    assert tracker.resident("w1") is first  # a reader may compare by identity
    tracker.forget("w1")
    assert tracker.resident("w1") is None


def test_the_tracked_residency_is_the_workers_whatever_was_lost() -> None:
    """Random residencies over many heartbeats, some lost: whenever the tracker says it applied a heartbeat
    its view is exactly the worker's, and a full heartbeat always brings it back in step."""
    rng = random.Random(7)
    versions = [f"{i:064x}" for i in range(30)]
    sender, tracker = ResidencySender(full_every=4), ResidencyTracker.of_adapters()
    now: dict[str, ResidentAdapter] = {}
    applied = 0
    for second in range(400):
        for v in rng.sample(versions, 3):
            roll = rng.random()
            if roll < 0.3:
                now.pop(v, None)
            else:
                now[v] = entry(v, Tier.device if roll < 0.65 else Tier.host, last_used=float(second),
                               in_use=rng.randint(0, 2))
        for hb in sender.stamp(beat(*now.values())):
            if rng.random() < 0.1 and not hb.full:
                continue  # lost on the way
            if tracker.has(residency_headers(hb)):
                assert held(tracker) == now
                continue
            if tracker.apply(hb):
                applied += 1
                assert held(tracker) == now
            elif hb.full:
                pytest.fail("a full heartbeat always applies")
    assert applied > 300 and tracker.ignored > 0
