"""Heartbeats with residency deltas, as the scheduler reads them: the dispatcher's `WorkerReports` hands the
core the whole residency, and the warm state gets heartbeats made whole (pure: no NATS)."""

from __future__ import annotations

from protocol.messages import Heartbeat, ResidentAdapter, Tier
from protocol.residency import ResidencySender, ResidencyTracker, residency_headers
from scheduler.core import SchedulerCore
from scheduler.dispatcher import WorkerReports, worker_report
from scheduler.service import LAST_USED_PRECISION_S, residency_changes, whole_heartbeat

A, B, C = "a" * 64, "b" * 64, "c" * 64


def beat(*resident: tuple[str, Tier], used: float = 0.0, gone: bool = False) -> Heartbeat:
    return Heartbeat(worker_id="w1", host="h", device="cpu", started_at=100.0, gone=gone,
                     capacity={"pool_pages": 64, "page_bytes": 1024, "max_rank": 16},
                     resident=[ResidentAdapter(version=v, tier=t, last_used=used or None) for v, t in resident])


def test_the_core_sees_the_whole_residency_through_deltas() -> None:
    sender, reports, core = ResidencySender(full_every=10), WorkerReports(), SchedulerCore()
    at = 1.0
    for hb in sender.stamp(beat((A, Tier.device), (B, Tier.host))):
        core.handle(reports.report(hb, at))
    assert core.residency() == {A: {"w1": Tier.device}, B: {"w1": Tier.host}}

    [delta] = sender.stamp(beat((A, Tier.device), (B, Tier.host), used=2.0))
    assert len(delta.resident) == 2  # both last used now
    report = reports.report(delta, 2.0)
    assert {r.version: r.last_used for r in report.resident} == {A: 2.0, B: 2.0}

    [delta] = sender.stamp(beat((A, Tier.device), (B, Tier.host), used=2.0))  # nothing changed
    report = reports.report(delta, 3.0)
    assert report.resident is reports.residency.resident("w1")  # the same tuple again: the core compares nothing
    core.handle(report)

    [delta] = sender.stamp(beat((B, Tier.device), (C, Tier.host), used=2.0))  # B loaded, A dropped, C fetched
    assert [r.version for r in delta.resident] == [B, C] and delta.removed == [A]
    report = reports.report(delta, 4.0)
    core.handle(report)
    assert core.residency() == {B: {"w1": Tier.device}, C: {"w1": Tier.host}}

    previous = {r.version: r for r in report.resident}
    b_used = ResidentAdapter(version=B, tier=Tier.device, last_used=5.0)
    [delta] = sender.stamp(beat((C, Tier.host), used=2.0).model_copy(update={"resident": [
        b_used, *beat((C, Tier.host), used=2.0).resident]}))
    assert delta.resident == [b_used]
    report = reports.report(delta, 5.0)
    after = {r.version: r for r in report.resident}
    assert after[C] is previous[C] and after[B] is not previous[B] and after[B].last_used == 5.0  # C reused


def test_a_reader_without_a_full_heartbeat_reports_nothing_held_and_keeps_a_stale_view_after_a_loss() -> None:
    sender, reports = ResidencySender(full_every=3), WorkerReports()
    sender.stamp(beat((A, Tier.device)))  # sent before this reader started
    [delta] = sender.stamp(beat((A, Tier.device), (B, Tier.device)))
    report = reports.report(delta, 1.0)
    assert report.worker_id == "w1" and report.resident == ()  # live, holding nothing it knows of
    [delta] = sender.stamp(beat((B, Tier.device)))
    assert reports.report(delta, 2.0).resident == ()
    delta, full = sender.stamp(beat((B, Tier.device), (C, Tier.host)))
    assert reports.report(delta, 3.0).resident == ()
    assert not reports.residency.has(residency_headers(full))
    assert {r.version for r in reports.report(full, 3.0).resident} == {B, C}

    sender.stamp(beat((C, Tier.host)))  # lost
    [delta] = sender.stamp(beat((C, Tier.device)))
    assert {r.version for r in reports.report(delta, 4.0).resident} == {B, C}  # the view before the loss

    goodbye, _ = sender.stamp(beat((C, Tier.device), gone=True))  # a delta, then the whole residency
    assert reports.report(goodbye, 5.0).draining
    assert reports.residency.resident("w1") is None


def test_the_warm_state_gets_heartbeats_made_whole() -> None:
    sender, tracker = ResidencySender(full_every=1), ResidencyTracker.of_adapters()
    sender.stamp(beat((A, Tier.device)))  # sent before this reader started
    delta, full = sender.stamp(beat((A, Tier.device), (B, Tier.host)))
    assert whole_heartbeat(tracker, delta) is None  # no full heartbeat yet: nothing recorded
    assert whole_heartbeat(tracker, full) is full
    delta, full = sender.stamp(beat((B, Tier.device)))
    whole = whole_heartbeat(tracker, delta)
    assert whole is not None and whole.full and whole.removed == [] and whole.resident_seq == delta.resident_seq
    assert {(r.version, r.tier) for r in whole.resident} == {(B, Tier.device)}
    assert tracker.has(residency_headers(full))  # what the scheduler drops undecoded


def test_a_flush_writes_only_the_residency_rows_that_changed() -> None:
    hb = beat((A, Tier.device), (B, Tier.host), used=1_000_000.0)
    marks, rows, dropped = residency_changes(hb, None)  # nothing written yet: every row, nothing to drop
    assert {(r.sha256, r.tier) for r in rows} == {(A, Tier.device), (B, Tier.host)} and dropped == []
    assert residency_changes(hb, marks) == (marks, [], [])  # the same residency: nothing
    # A last use within the rounding of the written one is not worth a write; a later one is.
    near = beat((A, Tier.device), (B, Tier.host), used=1_000_000.0 + LAST_USED_PRECISION_S / 2 - 1)
    assert residency_changes(near, marks)[1] == []
    later = beat((A, Tier.device), (B, Tier.host), used=1_000_000.0 + LAST_USED_PRECISION_S)
    assert len(residency_changes(later, marks)[1]) == 2
    # B moved to the device and C arrived: their rows; B's host row is dropped.
    moved = beat((A, Tier.device), (B, Tier.device), (C, Tier.host), used=1_000_000.0)
    now, rows, dropped = residency_changes(moved, marks)
    assert {(r.sha256, r.tier) for r in rows} == {(B, Tier.device), (C, Tier.host)}
    assert dropped == [(B, Tier.host)] and set(now) == {(A, Tier.device), (B, Tier.device), (C, Tier.host)}


def test_a_reports_host_budget_is_its_larger_level_since_ram_holds_copies_of_disk_blobs() -> None:
    hb = beat().model_copy(update={"capacity": {"host_ram_bytes": 1 << 30, "host_disk_bytes": 8 << 30}})
    assert worker_report(hb, 1.0, ()).host_bytes == 8 << 30
    ram_only = beat().model_copy(update={"capacity": {"host_ram_bytes": 1 << 30, "host_disk_bytes": 0}})
    assert worker_report(ram_only, 1.0, ()).host_bytes == 1 << 30
    assert worker_report(beat(), 1.0, ()).host_bytes == 0  # none reported: unknown
