"""The worker's host tier: blobs on disk and in RAM within their budgets, the disk's victims chosen by its
eviction policy (GreedyDual by default) or least recently used first."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from workers.host_cache import HostCache, host_eviction
from workers.settings import HostCacheSettings


def blob(tag: str, size: int) -> tuple[str, bytes]:
    data = tag.encode() * (size // len(tag))
    return hashlib.sha256(data).hexdigest(), data


def on_disk(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize("eviction", ["lru", "greedy_dual"])
def test_a_full_disk_drops_the_blob_its_policy_chooses(tmp_path: Path, eviction: str) -> None:
    # Two small blobs and a large one fill the disk; the large one was used last. A third small blob needs
    # room: LRU drops the oldest small blob, GreedyDual the large one (a byte of it costs less to fetch again).
    small0, small1, small2 = blob("a", 1_000), blob("b", 1_000), blob("c", 1_000)
    large = blob("L", 6_000)
    cache = HostCache(tmp_path, disk_bytes=8_500, ram_bytes=0, eviction=host_eviction(eviction))
    for sha, data in (small0, large, small1):
        cache.put(sha, data)
    assert cache.get(large[0]) == large[1]
    cache.put(*small2)
    gone = small0[0] if eviction == "lru" else large[0]
    assert gone not in cache and gone not in on_disk(tmp_path)
    kept = {small0[0], small1[0], small2[0], large[0]} - {gone}
    assert kept <= on_disk(tmp_path) and all(sha in cache for sha in kept)
    assert cache.usage()["host_disk_bytes_used"] <= 8_500


@pytest.mark.parametrize("eviction", ["lru", "greedy_dual"])
def test_greedy_dual_keeps_a_blob_used_again_and_again_over_newer_ones_used_once(tmp_path: Path,
                                                                                  eviction: str) -> None:
    # Equal sizes. The hot blob is used between every two puts, then three new blobs come without it being
    # used: LRU lets it go with the third, GreedyDual keeps it (the uses it saw at each eviction count).
    hot = blob("h", 1_000)
    cache = HostCache(tmp_path, disk_bytes=3_000, ram_bytes=0, eviction=host_eviction(eviction))
    cache.put(*hot)
    for i in range(6):
        cache.put(*blob(f"x{i}", 1_000))
        assert cache.get(hot[0]) == hot[1]
    for i in range(3):
        cache.put(*blob(f"y{i}", 1_000))
    assert (hot[0] in cache) == (eviction == "greedy_dual") == (hot[0] in on_disk(tmp_path))
    assert len(on_disk(tmp_path)) == 3


def test_the_blob_just_put_stays_when_it_alone_fits(tmp_path: Path) -> None:
    cache = HostCache(tmp_path, disk_bytes=2_000, ram_bytes=0, eviction=host_eviction("greedy_dual"))
    small = [blob(t, 500) for t in "pqr"]
    for sha, data in small:
        cache.put(sha, data)
    large = blob("Z", 2_000)
    cache.put(*large)  # every other blob has to go
    assert on_disk(tmp_path) == {large[0]}


def test_the_worker_drops_host_blobs_by_greedy_dual_unless_configured_otherwise() -> None:
    assert HostCacheSettings().eviction == "greedy_dual"
    assert host_eviction("lru") is None
    with pytest.raises(ValueError, match="unknown host cache eviction"):
        host_eviction("fifo")


def test_a_disk_copy_is_checked_against_the_digest_stored_with_it(tmp_path: Path) -> None:
    """A kept blob need not hash to its version's name (the host tier keeps it narrowed to the pool's dtype):
    each disk copy carries the sha256 of its own bytes; a restarted cache serves an intact copy, and drops a
    damaged one (the caller fetches it again) or one written before copies carried their digest."""
    version = hashlib.sha256(b"the canonical blob").hexdigest()
    kept = b"a narrower copy of it" * 100
    intact, damaged = hashlib.sha256(b"other").hexdigest(), hashlib.sha256(b"third").hexdigest()
    legacy = blob("old", 600)
    cache = HostCache(tmp_path, disk_bytes=1 << 20, ram_bytes=0)
    for sha in (version, intact, damaged):
        cache.put(sha, kept)
    (tmp_path / legacy[0]).write_bytes(legacy[1])  # a bare blob, as an earlier version kept it
    data = bytearray((tmp_path / damaged).read_bytes())
    data[-1] ^= 1
    (tmp_path / damaged).write_bytes(bytes(data))

    restarted = HostCache(tmp_path, disk_bytes=1 << 20, ram_bytes=0)
    assert {e.sha256: e.bytes for e in restarted.entries()}[version] == len(kept)
    assert restarted.get(version) == kept and restarted.get(intact) == kept
    assert restarted.get(damaged) is None and damaged not in restarted and damaged not in on_disk(tmp_path)
    assert restarted.get(legacy[0]) is None and legacy[0] not in on_disk(tmp_path)
