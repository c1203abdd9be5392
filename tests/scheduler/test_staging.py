"""Predictive staging, GreedyDual-Size-Frequency eviction and the scale-to-zero signal: pure logic."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from protocol.messages import Tier
from scheduler.policy import AdapterSpec, LruEviction, ResidentView
from scheduler.staging import (
    GreedyDualEviction,
    HeldView,
    PredictiveStager,
    Stage,
    StageView,
    TierCosts,
    workers_needed,
)

D, H, OBJ = Tier.device, Tier.host, Tier.object
MB = 1 << 20


def spec(version: str, nbytes: int = 10 * MB, rank: int = 16) -> AdapterSpec:
    return AdapterSpec(tenant="t", adapter=version, version=version, rank=rank, bytes=nbytes)


def worker(worker_id: str, *, device: int = 100 * MB, host: int = 400 * MB, max_rank: int = 0, outstanding: int = 0,
           draining: bool = False, held: Mapping[str, HeldView] | None = None) -> StageView:
    return StageView(worker_id, device_bytes=device, host_bytes=host, max_rank=max_rank, outstanding=outstanding,
                     draining=draining, held=dict(held or {}))


def apply(stages: Sequence[Stage], workers: Sequence[StageView], adapters: Mapping[str, AdapterSpec]) -> list[StageView]:
    """Carry the stages out as a worker would (a load of a blob not on the host fetches it first)."""
    held = {w.worker_id: dict(w.held) for w in workers}
    for s in stages:
        mine = held[s.worker_id]
        before = mine.get(s.version)
        if s.kind == "evict":
            assert before is not None, s
            assert before.in_use == 0, f"evicted in use: {s}"
            assert s.to_tier in (H, OBJ), s
            if s.to_tier == OBJ:
                del mine[s.version]
            else:
                assert before.tier == D, s
                mine[s.version] = replace(before, tier=H)
        else:
            a = adapters[s.version]
            tier = D if s.kind == "load" else H
            base = before or HeldView(tier, a.bytes, a.rank)
            mine[s.version] = replace(base, tier=D if D in (tier, base.tier) else H)
    return [replace(w, held=held[w.worker_id]) for w in workers]


def used(w: StageView) -> tuple[int, int]:
    """(device bytes, host bytes): a device copy keeps its blob in the host cache too."""
    device = sum(h.bytes for h in w.held.values() if h.tier == D)
    return device, device + sum(h.bytes for h in w.held.values() if h.tier == H)


def kinds(stages: Sequence[Stage]) -> list[tuple[str, str, str, Tier | None]]:
    return [(s.kind, s.version, s.worker_id, s.to_tier) for s in stages]


STAGER = PredictiveStager()


# -- TierCosts ---------------------------------------------------------------------------------------------------


def test_tier_costs_are_latency_plus_bytes_over_bandwidth() -> None:
    c = TierCosts(object_latency_s=0.05, object_bytes_per_s=50e6, host_latency_s=0.001, host_bytes_per_s=2e9)
    assert c.fetch_s(50_000_000) == pytest.approx(0.05 + 1.0)
    assert c.load_s(2_000_000_000) == pytest.approx(0.001 + 1.0)
    assert c.reload_s(10, D) == c.load_s(10) and c.reload_s(10, H) == c.fetch_s(10) and c.reload_s(10, OBJ) == 0
    # per byte, a small adapter is worth more to keep (the latency is paid whatever its size)
    assert c.value(0.5, 1 * MB, D) > c.value(0.5, 64 * MB, D)
    assert c.value(0.0, 1 * MB, H) == 0.0
    with pytest.raises(ValueError, match="bandwidths"):
        TierCosts(host_bytes_per_s=0)


# -- the stager --------------------------------------------------------------------------------------------------


def test_very_likely_goes_to_a_device_likely_to_a_host_cache_unlikely_nowhere() -> None:
    adapters = {v: spec(v) for v in ("hot", "warm", "cold")}
    stages = STAGER.plan(0.0, {"hot": 0.9, "warm": 0.3, "cold": 0.05}, adapters, [worker("w1")])
    assert kinds(stages) == [("load", "hot", "w1", None), ("fetch", "warm", "w1", None)]
    assert [s.reason for s in stages] == ["very_likely", "likely"]


def test_budgets_are_never_exceeded_nor_rank_limits_nor_in_use() -> None:
    """Random clusters over many intervals: after carrying out each plan, every worker is within its device
    and host budgets, holds no rank above its limit, and `apply` asserts nothing in use was evicted."""
    rng = random.Random(7)
    for _ in range(40):
        adapters = {f"v{i:02d}": spec(f"v{i:02d}", rng.choice([2, 5, 10, 20, 40]) * MB, rng.choice([8, 16, 32, 64]))
                    for i in range(30)}
        workers = [worker(f"w{j}", device=rng.choice([0, 30, 60, 100]) * MB, host=rng.choice([0, 60, 120]) * MB,
                          max_rank=rng.choice([0, 16, 32, 64]), outstanding=rng.randrange(10),
                          draining=rng.random() < 0.1)
                   for j in range(rng.randint(1, 4))]
        stager = PredictiveStager(max_replicas=rng.choice([1, 2]), max_stages_per_interval=rng.choice([3, 16]))
        for _interval in range(8):
            scores = {v: rng.choice([0.0, 0.01, 0.05, 0.15, 0.3, 0.6, 0.95]) for v in adapters if rng.random() < 0.6}
            # some held copies are in use this interval
            workers = [replace(w, held={v: replace(h, in_use=int(rng.random() < 0.2)) for v, h in w.held.items()})
                       for w in workers]
            stages = stager.plan(0.0, scores, adapters, workers)
            transfers = [s for s in stages if s.kind != "evict"]
            assert len(transfers) <= stager.max_stages_per_interval
            copies_before = {v: sum(w.held.get(v, HeldView(H, 0)).tier == D for w in workers) for v in adapters}
            workers = apply(stages, workers, adapters)
            for w in workers:
                device, host = used(w)
                assert device <= w.device_bytes or (w.device_bytes == 0 and device == 0)
                assert host <= w.host_bytes or w.host_bytes == 0
                if w.draining:
                    assert not [s for s in stages if s.worker_id == w.worker_id]
                for v, h in w.held.items():
                    assert not w.max_rank or h.rank <= w.max_rank, (w, v)
            for v in adapters:
                copies = sum(w.held.get(v, HeldView(H, 0)).tier == D for w in workers)
                assert copies <= max(stager.max_replicas, copies_before[v])


def test_the_rank_limit_is_obeyed_and_a_version_no_worker_takes_is_skipped() -> None:
    adapters = {"big": spec("big", rank=64)}
    small = [worker("w1", max_rank=16), worker("w2", max_rank=32)]
    assert STAGER.plan(0.0, {"big": 0.9}, adapters, small) == []
    stages = STAGER.plan(0.0, {"big": 0.9}, adapters, [*small, worker("w3", max_rank=0, outstanding=20)])
    assert kinds(stages) == [("load", "big", "w3", None)]


def test_a_version_in_use_is_never_evicted() -> None:
    adapters = {"busy": spec("busy", 100 * MB), "new": spec("new", 100 * MB)}
    w = worker("w1", device=100 * MB, held={"busy": HeldView(D, 100 * MB, 16, in_use=2)})
    # not released though its score is 0, nor evicted to make room for a very likely newcomer (which gets
    # only the host cache)
    assert kinds(STAGER.plan(0.0, {"new": 1.0}, adapters, [w])) == [("fetch", "new", "w1", None)]
    idle = replace(w, held={"busy": HeldView(D, 100 * MB, 16, in_use=0)})
    assert kinds(STAGER.plan(0.0, {"new": 1.0}, adapters, [idle])) == [
        ("evict", "busy", "w1", H), ("load", "new", "w1", None)]


def test_room_is_made_only_by_evicting_what_is_worth_less() -> None:
    adapters = {v: spec(v, 50 * MB) for v in ("kept", "new")}
    full = worker("w1", device=50 * MB, held={"kept": HeldView(D, 50 * MB, 16)})
    # worth more (0.9 > 0.6, same size): stays, and the newcomer gets only the host cache
    assert kinds(STAGER.plan(0.0, {"kept": 0.9, "new": 0.6}, adapters, [full])) == [("fetch", "new", "w1", None)]
    # worth less (0.3, kept by hysteresis): it steps down to the host tier for the newcomer; evictions first
    stages = STAGER.plan(0.0, {"kept": 0.3, "new": 0.6}, adapters, [full])
    assert kinds(stages) == [("evict", "kept", "w1", H), ("load", "new", "w1", None)]
    assert stages[0].reason == "make_room"


def test_value_per_byte_decides_between_sizes() -> None:
    """Same score, the device pool holds one: the small newcomer is worth more per byte than the large
    resident (a reload costs its latency whatever the size), so it takes the room; not the other way."""
    adapters = {"large": spec("large", 64 * MB), "small": spec("small", 1 * MB)}
    large_held = worker("w1", device=64 * MB, held={"large": HeldView(D, 64 * MB, 16)})
    assert kinds(STAGER.plan(0.0, {"large": 0.6, "small": 0.6}, adapters, [large_held]))[:2] == [
        ("evict", "large", "w1", H), ("load", "small", "w1", None)]
    small_held = worker("w1", device=64 * MB, held={"small": HeldView(D, 1 * MB, 16)})
    assert [s for s in STAGER.plan(0.0, {"large": 0.6, "small": 0.6}, adapters, [small_held])
            if s.kind != "fetch"] == []


def test_hysteresis_a_wobbling_score_moves_nothing_after_the_first_stage() -> None:
    adapters = {"d": spec("d"), "h": spec("h")}
    workers = [worker("w1")]
    moves = []
    for i in range(12):
        # d wobbles between device_release_at (0.2) and device_at (0.5); h between host_release_at and host_at
        scores = {"d": 0.6 if i % 2 == 0 else 0.25, "h": 0.12 if i % 2 == 0 else 0.03}
        stages = STAGER.plan(float(i), scores, adapters, workers)
        moves += kinds(stages)
        workers = apply(stages, workers, adapters)
    assert moves == [("load", "d", "w1", None), ("fetch", "h", "w1", None)]
    # starting below the bring thresholds, nothing is ever staged
    assert STAGER.plan(0.0, {"d": 0.49, "h": 0.09}, adapters, [worker("w1", held={"d": HeldView(H, 10 * MB)})]) \
        == []


def test_a_worker_already_holding_the_version_is_preferred() -> None:
    adapters = {"v": spec("v")}
    on_host = {"v": HeldView(H, 10 * MB, 16)}
    busy_holder = worker("w2", outstanding=30, held=on_host)
    assert kinds(STAGER.plan(0.0, {"v": 0.9}, adapters, [worker("w1"), busy_holder])) == [("load", "v", "w2", None)]
    on_device = worker("w3", held={"v": HeldView(D, 10 * MB, 16)})
    assert STAGER.plan(0.0, {"v": 0.9}, adapters, [worker("w1"), busy_holder, on_device]) == []
    # a likely version any worker holds is not fetched again
    assert STAGER.plan(0.0, {"v": 0.3}, adapters, [worker("w1"), busy_holder]) == []
    # a holder whose device cannot take it (everything there is in use): no second blob fetched elsewhere
    in_use = {"u": HeldView(D, 100 * MB, 16, in_use=1)}
    stuck_holder = worker("w2", held={**on_host, **in_use})
    assert STAGER.plan(0.0, {"v": 0.9}, {**adapters, "u": spec("u", 100 * MB)}, [worker("w1"), stuck_holder]) == []


def test_new_copies_spread_by_load_and_free_budget() -> None:
    adapters = {v: spec(v) for v in ("a", "b", "c")}
    scores = {"a": 0.9, "b": 0.8, "c": 0.7}
    stages = STAGER.plan(0.0, scores, adapters, [worker("w1"), worker("w2")])
    # a: tie, by id; b: w2 has more free device bytes; c: tie again (both hold 10 MB), by id
    assert kinds(stages) == [("load", "a", "w1", None), ("load", "b", "w2", None), ("load", "c", "w1", None)]
    stages = STAGER.plan(0.0, scores, adapters, [worker("w1", outstanding=16), worker("w2", outstanding=2)])
    assert [s.worker_id for s in stages] == ["w2", "w2", "w2"]  # the lighter worker while it has room
    # fitting without evicting comes before load: w1 would have to evict x (worth less) to take a
    full = worker("w1", device=10 * MB, held={"x": HeldView(D, 10 * MB, 16)})
    stages = STAGER.plan(0.0, {"a": 0.9, "x": 0.3}, {**adapters, "x": spec("x")}, [full, worker("w2", outstanding=20)])
    assert kinds(stages) == [("load", "a", "w2", None)]


def test_replicas_are_capped() -> None:
    adapters = {"v": spec("v")}
    workers = [worker("w1"), worker("w2"), worker("w3")]
    assert len(STAGER.plan(0.0, {"v": 1.0}, adapters, workers)) == 1
    stages = PredictiveStager(max_replicas=2).plan(0.0, {"v": 1.0}, adapters, workers)
    assert kinds(stages) == [("load", "v", "w1", None), ("load", "v", "w2", None)]


def test_draining_workers_and_unknown_sizes_are_left_alone() -> None:
    adapters = {"v": spec("v"), "sizeless": spec("sizeless", 0)}
    draining = worker("w1", draining=True, held={"old": HeldView(D, 10 * MB)})
    assert STAGER.plan(0.0, {"v": 0.9, "sizeless": 0.9, "unknown": 0.9}, adapters, [draining]) == []
    stages = STAGER.plan(0.0, {"v": 0.9, "sizeless": 0.9, "unknown": 0.9}, adapters, [draining, worker("w2")])
    assert kinds(stages) == [("load", "v", "w2", None)]
    # budgets unknown (0): no staging in that tier
    assert STAGER.plan(0.0, {"v": 0.9}, adapters, [worker("w3", device=0, host=0)]) == []
    assert kinds(STAGER.plan(0.0, {"v": 0.9}, adapters, [worker("w3", device=0)])) == [("fetch", "v", "w3", None)]


def test_keep_alive_releases_an_idle_unlikely_device_copy_to_host_and_keeps_blobs() -> None:
    adapters = {"v": spec("v")}
    keep = STAGER.keep_alive_s
    workers = [worker("w1", held={"v": HeldView(D, 10 * MB, 16, last_used=100.0)})]
    assert STAGER.plan(100.0 + keep, {"v": 0.3}, adapters, workers) == []  # still worth its place
    assert STAGER.plan(100.0 + keep - 1, {"v": 0.1}, adapters, workers) == []  # unlikely, but used lately
    stages = STAGER.plan(100.0 + keep, {"v": 0.1}, adapters, workers)
    assert kinds(stages) == [("evict", "v", "w1", H)] and stages[0].reason == "release"
    workers = apply(stages, workers, adapters)
    assert STAGER.plan(1e9, {}, adapters, workers) == []  # the blob stays: the host cache drops it when full
    # never while in use
    on_device = worker("w1", held={"v": HeldView(D, 10 * MB, 16), "u": HeldView(D, 10 * MB, 16, in_use=1)})
    assert kinds(STAGER.plan(keep, {}, adapters, [on_device])) == [("evict", "v", "w1", H)]
    # a stager told to release blobs too drops them below host_release_at, from the device straight out
    dropping = PredictiveStager(host_release_at=0.02)
    assert kinds(dropping.plan(keep, {"v": 0.05}, adapters, [on_device])) == [("evict", "v", "w1", H)]
    assert kinds(dropping.plan(keep, {}, adapters, [on_device])) == [("evict", "v", "w1", OBJ)]


def test_among_unpredicted_copies_the_least_recently_used_makes_room_first() -> None:
    adapters = {v: spec(v, 10 * MB) for v in ("a", "b", "c", "new")}
    held = {"a": HeldView(D, 10 * MB, 16, last_used=30.0), "b": HeldView(D, 10 * MB, 16, last_used=10.0),
            "c": HeldView(D, 10 * MB, 16, last_used=20.0)}
    full = worker("w1", device=30 * MB, held=held)
    assert kinds(STAGER.plan(40.0, {"new": 0.9}, adapters, [full])) == [
        ("evict", "b", "w1", H), ("load", "new", "w1", None)]


def test_transfers_are_capped_most_valuable_first() -> None:
    adapters = {f"v{i:02d}": spec(f"v{i:02d}", MB) for i in range(30)}
    scores = {f"v{i:02d}": 0.5 + i / 100 for i in range(30)}
    stager = PredictiveStager(max_stages_per_interval=5)
    stages = stager.plan(0.0, scores, adapters, [worker("w1"), worker("w2")])
    assert [s.version for s in stages] == ["v29", "v28", "v27", "v26", "v25"]
    assert PredictiveStager(max_stages_per_interval=0).plan(0.0, scores, adapters, [worker("w1")]) == []
    # releases are not transfers: they happen even at cap 0
    held = worker("w1", held={"old": HeldView(D, MB)})
    assert kinds(PredictiveStager(max_stages_per_interval=0, host_release_at=0.02).plan(
        1e4, scores, adapters, [held])) == [
        ("evict", "old", "w1", OBJ)]


def test_plans_are_deterministic() -> None:
    rng = random.Random(3)
    adapters = {f"v{i}": spec(f"v{i}", rng.choice([1, 10, 30]) * MB) for i in range(40)}
    scores = {v: rng.choice([0.0, 0.1, 0.3, 0.5, 0.5, 0.9]) for v in adapters}  # many ties
    workers = [worker(f"w{j}", device=40 * MB, held={f"v{j}": HeldView(D, adapters[f"v{j}"].bytes)}) for j in range(4)]
    first = STAGER.plan(0.0, scores, adapters, workers)
    for seed in range(5):
        shuffled = list(scores.items())
        random.Random(seed).shuffle(shuffled)
        again = STAGER.plan(0.0, dict(shuffled), dict(reversed(list(adapters.items()))), list(reversed(workers)))
        assert again == first
    assert len(first) > 4


def test_a_nearly_full_host_cache_drops_copies_another_worker_holds_never_the_last() -> None:
    """w1's host cache is 95% full: it drops host-only copies that w2 also holds, least recently used first,
    down to 75% full; it keeps what only it holds, what it has on its device, and what is in use."""
    adapters = {v: spec(v) for v in "abcdefghij"}
    w1 = worker("w1", host=100 * MB, held={
        "a": HeldView(H, 10 * MB, last_used=5.0), "b": HeldView(H, 10 * MB, last_used=1.0),  # both on w2
        "c": HeldView(H, 10 * MB, last_used=3.0), "d": HeldView(H, 10 * MB, last_used=2.0, in_use=1),  # on w2
        "e": HeldView(D, 10 * MB, last_used=0.0),  # on w2 too, but on w1's device
        **{v: HeldView(H, 10 * MB, last_used=0.0) for v in "fgh"},  # only here
        "i": HeldView(H, 15 * MB, last_used=0.0)})  # only here: 95 MB in all
    w2 = worker("w2", host=1000 * MB, held={v: HeldView(H, 10 * MB) for v in "abcde"})
    stages = STAGER.plan(10.0, {}, adapters, [w1, w2])
    # 95 -> 85 (b, oldest) -> 75 (c): done; a (newer) and d (in use) stay, e is on the device
    assert kinds(stages) == [("evict", "b", "w1", OBJ), ("evict", "c", "w1", OBJ)]
    assert all(s.reason == "duplicate" for s in stages)
    after = apply(stages, [w1, w2], adapters)
    assert used(after[0])[1] == 75 * MB
    assert STAGER.plan(10.0, {}, adapters, after) == []  # 75% full: nothing more
    # Two full workers holding the same copies: one of each pair goes, never both.
    full = [worker(w, host=20 * MB, held={"a": HeldView(H, 10 * MB), "b": HeldView(H, 10 * MB)}) for w in ("w1", "w2")]
    stages = STAGER.plan(10.0, {}, adapters, full)
    left = apply(stages, full, adapters)
    assert {v for w in left for v in w.held} == {"a", "b"}
    # A draining worker's copies do not count as another holder; a stager told not to dedupe does not.
    draining = replace(w2, draining=True)
    assert STAGER.plan(10.0, {}, adapters, [w1, draining]) == []
    assert PredictiveStager(dedupe_host_at=2.0, dedupe_host_to=2.0).plan(10.0, {}, adapters, [w1, w2]) == []


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="not a probability"):
        STAGER.plan(0.0, {"v": 1.5}, {}, [])
    with pytest.raises(ValueError, match="not a probability"):
        STAGER.plan(0.0, {"v": float("nan")}, {}, [])
    with pytest.raises(ValueError, match="not unique"):
        STAGER.plan(0.0, {}, {}, [worker("w1"), worker("w1")])
    with pytest.raises(ValueError, match=r"device_release_at \(0.6\) exceeds device_at \(0.5\)"):
        PredictiveStager(device_release_at=0.6)
    with pytest.raises(ValueError, match="max_replicas"):
        PredictiveStager(max_replicas=0)
    with pytest.raises(ValueError, match="dedupe_host_to"):
        PredictiveStager(dedupe_host_at=0.5, dedupe_host_to=0.6)


# -- GreedyDual-Size-Frequency -------------------------------------------------------------------------------------


def rv(version: str, pages: int, last_used: float, in_use: int = 0, nbytes: int | None = None) -> ResidentView:
    return ResidentView(version, pages, last_used, in_use, pages * 2 * MB if nbytes is None else nbytes)


def test_gdsf_keeps_a_small_frequently_used_adapter_that_lru_drops() -> None:
    """A 2-page adapter used three times, two 8-page ones used once or twice, more recently: to fit 8 pages
    LRU drops the small one (least recently used) and a large one; GDSF drops one large adapter only."""
    gdsf = GreedyDualEviction()
    gdsf.observe([rv("small", 2, 1.0), rv("big1", 8, 2.0)])
    gdsf.observe([rv("small", 2, 3.0), rv("big1", 8, 2.0)])
    gdsf.observe([rv("small", 2, 5.0), rv("big1", 8, 2.0), rv("big2", 8, 6.0)])
    resident = [rv("small", 2, 5.0), rv("big1", 8, 7.0), rv("big2", 8, 6.0)]
    assert LruEviction().choose_victims(8, 2, resident) == ["small", "big2"]
    assert gdsf.choose_victims(8, 2, resident) == ["big2"]
    # the inflation rose to the victim's priority: what comes next starts above it
    assert gdsf.inflation > 0


def test_gdsf_counts_uses_through_choose_victims_alone() -> None:
    gdsf = GreedyDualEviction()
    resident = [rv("small", 2, 0.0), rv("big", 8, 0.0)]
    for t in range(1, 4):  # the small adapter is used between eviction calls; each call needs no room
        resident[0] = rv("small", 2, float(t))
        assert gdsf.choose_victims(1, 10, resident) == []
    resident[1] = rv("big", 8, 10.0)  # the big one was used last
    assert gdsf.choose_victims(12, 10, resident) == ["big"]
    assert LruEviction().choose_victims(12, 10, resident) == ["small"]


def test_gdsf_never_evicts_in_use_and_says_none_when_it_cannot() -> None:
    gdsf = GreedyDualEviction()
    resident = [rv("a", 4, 1.0, in_use=1), rv("b", 4, 2.0), rv("c", 4, 3.0, in_use=2)]
    assert gdsf.choose_victims(4, 0, resident) == ["b"]
    assert gdsf.choose_victims(8, 0, resident) is None
    assert gdsf.choose_victims(4, 4, resident) == []
    assert GreedyDualEviction().choose_victims(1, 0, []) is None


def test_gdsf_ages_out_what_was_hot_long_ago() -> None:
    """Frequency earned long ago loses to the inflation: after enough evictions, newcomers start above it."""
    gdsf = GreedyDualEviction()
    for t in range(1, 6):
        gdsf.observe([rv("old", 2, float(t))])  # used five times, then never again
    old = rv("old", 2, 5.0)
    victims = []
    for i in range(40):  # a stream of one-off adapters through a 4-page pool
        newcomer = rv(f"n{i}", 2, 10.0 + i)
        victims += gdsf.choose_victims(2, 0, [old, newcomer]) or []
        if "old" in victims:
            break
    assert "old" in victims


def test_gdsf_falls_back_to_pages_when_bytes_are_unknown() -> None:
    unknown = [rv("a", 2, 1.0, nbytes=0), rv("b", 6, 2.0, nbytes=0)]
    gdsf = GreedyDualEviction()
    gdsf.observe(unknown)
    unknown[0] = rv("a", 2, 3.0, nbytes=0)  # a used again: frequency 2
    assert gdsf.choose_victims(4, 0, unknown) == ["b"]  # LFU with aging
    # with page_bytes, the cost has its latency term again: per page, a small adapter is worth more
    sized = GreedyDualEviction(page_bytes=2 * MB)
    assert sized.choose_victims(2, 0, [rv("a", 2, 2.0, nbytes=0), rv("b", 6, 1.0, nbytes=0)]) == ["b"]
    # mixed: the unknown one is sized from the others' bytes per page
    mixed = GreedyDualEviction()
    assert mixed.choose_victims(2, 0, [rv("a", 2, 2.0), rv("b", 6, 1.0, nbytes=0)]) == ["b"]


# -- workers_needed ----------------------------------------------------------------------------------------------


def test_workers_needed_is_zero_without_demand() -> None:
    assert workers_needed({}, interval_s=60, service_s=2, max_inflight=32) == 0
    assert workers_needed({"a": 0.0, "b": 0.0}, interval_s=60, service_s=2, max_inflight=32,
                          version_bytes={"a": 10 * MB}, device_bytes=MB) == 0
    assert workers_needed({"a": 0.01}, interval_s=60, service_s=2, max_inflight=32) == 1  # any demand: one


def test_workers_needed_follows_the_formula_and_is_monotone() -> None:
    # 100 calls x 2 s / 10 s = 20 busy slots; 8 slots at 80 % = 6.4 per worker -> 4 workers
    assert workers_needed({"a": 60, "b": 40}, interval_s=10, service_s=2, max_inflight=8) == 4
    assert workers_needed({"a": 64}, interval_s=10, service_s=1, max_inflight=8, target_utilisation=0.8) == 1
    previous = 0
    for calls in range(0, 2000, 37):
        n = workers_needed({"a": calls / 2, "b": calls / 2}, interval_s=10, service_s=2, max_inflight=8)
        assert n >= previous
        previous = n
    assert previous > 10


def test_workers_needed_holds_the_hot_set() -> None:
    sizes = {v: 40 * MB for v in "abcde"}
    calls = {v: 1.0 for v in "abcde"}  # light load, five hot adapters of 40 MB in 100 MB pools
    assert workers_needed(calls, interval_s=60, service_s=1, max_inflight=32) == 1
    assert workers_needed(calls, interval_s=60, service_s=1, max_inflight=32, version_bytes=sizes,
                          device_bytes=100 * MB) == 2
    cold = {**calls, "c": 0.1, "d": 0.1, "e": 0.1}  # below hot_at: not counted
    assert workers_needed(cold, interval_s=60, service_s=1, max_inflight=32, version_bytes=sizes,
                          device_bytes=70 * MB) == 2


def test_workers_needed_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        workers_needed({}, interval_s=0, service_s=1, max_inflight=1)
    with pytest.raises(ValueError, match="not a count"):
        workers_needed({"a": -1.0}, interval_s=1, service_s=1, max_inflight=1)
