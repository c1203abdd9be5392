"""One ledger of device residency per worker: the pool's page tables say what is on the device, the
injected eviction policy says what leaves, and both the worker's `AdapterTiers` and the standalone
engine (`lorafn generate`) obey it. Adapters are real canonical blobs; the object store is the test
session's S3 server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from protocol.messages import ErrorCode, Tier
from scheduler.policy import EvictionPolicy, LruEviction, ResidentView
from storage.adapter_format import (
    blob_sha256,
    canonical_blob,
    load_canonical,
    read_upload,
    validate,
    write_peft_adapter,
)
from storage.objectstore import ObjectStore
from workers.adapter_pool import AdapterPool
from workers.adapters import AdaptersDoNotFit, lora_weights_from_parsed
from workers.engine import Engine, EngineSettings
from workers.engine_thread import EngineThread
from workers.host_cache import HostCache
from workers.model import Backbone
from workers.sampling import SamplingParams
from workers.tiers import AdapterTiers, AdapterUnavailable
from workers.tiny import write_tiny_backbone
from workers.weights import load_backbone

MAX_RANK = 16
RANKS = {"a": 2, "b": 6, "c": 4, "d": 2, "bad": 64}  # "bad" is beyond the pool's max rank


@dataclass(frozen=True)
class LargestFirst:
    """A test policy: evict the adapters holding the most pages first, never one in use."""

    def choose_victims(self, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]) -> list[str] | None:
        victims: list[str] = []
        free = free_pages
        for r in sorted(resident, key=lambda r: (-r.pages, r.version)):
            if free >= needed_pages:
                break
            if not r.in_use:
                victims.append(r.version)
                free += r.pages
        return victims if free >= needed_pages else None


@dataclass(frozen=True)
class EvictEverything:
    """A wrong policy: it names every resident adapter, those in use too."""

    def choose_victims(self, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]) -> list[str] | None:
        return [r.version for r in resident]


@dataclass(frozen=True)
class Adapter:
    name: str
    sha: str
    blob: bytes
    rank: int
    pages: int  # in the pool of these tests (0 for "bad")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return load_backbone(write_tiny_backbone(tmp_path_factory.mktemp("tiers") / "backbone"))


@pytest.fixture(scope="module")
def adapters(tiny: Backbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Adapter]:
    root = tmp_path_factory.mktemp("tier_adapters")
    probe = AdapterPool(tiny.spec, 1 << 20, dtype=torch.float32, max_rank=128)
    out: dict[str, Adapter] = {}
    for seed, (name, rank) in enumerate(RANKS.items()):
        path = write_peft_adapter(root / name, tiny.spec, rank=rank, modules=("q_proj", "v_proj"), seed=seed)
        blob = canonical_blob(validate(read_upload(path), tiny.spec, max_rank=128))
        pages = probe.pages_needed(lora_weights_from_parsed(load_canonical(blob))) if rank <= MAX_RANK else 0
        out[name] = Adapter(name, blob_sha256(blob), blob, rank, pages)
    return out


def _page_bytes(tiny: Backbone) -> int:
    return AdapterPool(tiny.spec, 1 << 20, dtype=torch.float32).page_bytes


def _settings(tiny: Backbone, pool_pages: int) -> EngineSettings:
    """A float32 pool of exactly `pool_pages` pages."""
    return EngineSettings(kv_cache_bytes=1 << 20, block_size=4, adapter_dtype="float32", max_rank=MAX_RANK,
                          adapter_pool_bytes=pool_pages * _page_bytes(tiny))


def _full_pool(adapters: dict[str, Adapter]) -> int:
    """Pages that hold a, b and c exactly: d fits only once something leaves."""
    return sum(adapters[n].pages for n in "abc")


@contextlib.asynccontextmanager
async def _tiers(
    tiny: Backbone, directory: Path, store: ObjectStore, pool_pages: int, eviction: EvictionPolicy | None = None
) -> AsyncIterator[AdapterTiers]:
    engine = Engine(tiny, _settings(tiny, pool_pages), eviction=eviction)
    thread = EngineThread(engine, asyncio.get_running_loop())
    thread.start()
    try:
        yield AdapterTiers(engine=thread, store=store,
                           cache=HostCache(directory, disk_bytes=1 << 26, ram_bytes=1 << 26))
    finally:
        await thread.stop()


def _on_device(tiers: AdapterTiers, adapters: dict[str, Adapter]) -> set[str]:
    names = {a.sha: a.name for a in adapters.values()}
    return {names[e.version] for e in tiers.resident() if e.tier == Tier.device}


# (policy, adapters in use while d loads, adapters on the device afterwards or None: no room, why)
EVICTION_ROWS = [
    (LruEviction(), (), {"b", "c", "d"}, "the least recently used leaves"),
    (LruEviction(), ("a",), {"a", "c", "d"}, "never one in use: the next least recently used leaves"),
    (LargestFirst(), (), {"a", "c", "d"}, "the injected policy is obeyed: the largest leaves"),
    (LargestFirst(), ("b",), {"a", "b", "d"}, "the largest that no one uses leaves"),
    (LargestFirst(), ("a", "b", "c"), None, "no room without evicting an adapter in use"),
    (LruEviction(), ("a", "b", "c"), None, "no room without evicting an adapter in use"),
]
ROW_IDS = [f"{type(p).__name__}-{'+'.join(u) or 'idle'}" for p, u, _, _ in EVICTION_ROWS]


@pytest.mark.parametrize(("policy", "in_use", "expected", "why"), EVICTION_ROWS, ids=ROW_IDS)
async def test_the_tiers_evict_what_the_injected_policy_chooses(
    tiny: Backbone, adapters: dict[str, Adapter], store: ObjectStore, tmp_path: Path,
    policy: EvictionPolicy, in_use: tuple[str, ...], expected: set[str] | None, why: str,
) -> None:
    async with _tiers(tiny, tmp_path, store, _full_pool(adapters), policy) as tiers:
        for name in "abcd":
            tiers.cache.put(adapters[name].sha, adapters[name].blob)
        for name in "abc":  # used in this order: a is the least recently used
            await tiers.load(adapters[name].sha)
            assert tiers.acquire(adapters[name].sha)
            tiers.release(adapters[name].sha)
        assert tiers.free_pages == 0
        for name in in_use:
            assert tiers.acquire(adapters[name].sha)
        if expected is None:
            with pytest.raises(AdapterUnavailable) as refused:
                await tiers.load(adapters["d"].sha)
            assert refused.value.code is ErrorCode.overloaded and not refused.value.terminal, why
            assert _on_device(tiers, adapters) == {"a", "b", "c"}
        else:
            await tiers.load(adapters["d"].sha)
            assert _on_device(tiers, adapters) == expected, why
            assert tiers.free_pages == _full_pool(adapters) - sum(adapters[n].pages for n in expected)
            assert tiers.stats["evict"].count == 1
        for name in in_use:
            assert tiers.tier(adapters[name].sha) == Tier.device, "an adapter in use never leaves"


@pytest.mark.parametrize(("policy", "in_use", "expected", "why"), EVICTION_ROWS, ids=ROW_IDS)
def test_the_standalone_engine_evicts_what_the_injected_policy_chooses(
    tiny: Backbone, adapters: dict[str, Adapter],
    policy: EvictionPolicy, in_use: tuple[str, ...], expected: set[str] | None, why: str,
) -> None:
    engine = Engine(tiny, _settings(tiny, _full_pool(adapters)), eviction=policy)
    assert engine.eviction is policy
    for name in "abcd":
        engine.add_adapter(name, load_canonical(adapters[name].blob))
    for name in "abc":  # one step each, in this order: a is the least recently used
        engine.adapters.ensure_resident([name])
        engine.adapters.release()
    step = ["d", *in_use]  # the running step uses `in_use` too
    if expected is None:
        with pytest.raises(AdaptersDoNotFit):
            engine.adapters.ensure_resident(step)
        assert set(engine.pool.resident_pages()) == {"a", "b", "c"}
        return
    engine.adapters.ensure_resident(step)
    assert set(engine.pool.resident_pages()) == expected, why
    assert {v.version: v.rank for v in engine.adapters.resident()} == {n: RANKS[n] for n in expected}


def test_generate_on_the_standalone_engine_follows_the_policy(tiny: Backbone, adapters: dict[str, Adapter]) -> None:
    engine = Engine(tiny, _settings(tiny, _full_pool(adapters)), eviction=LargestFirst())
    for name in "abcd":
        engine.add_adapter(name, load_canonical(adapters[name].blob))
    one_token = SamplingParams(temperature=0.0, max_tokens=1)
    engine.generate([[1, 2, 3]] * 3, one_token, adapters=["a", "b", "c"])
    assert set(engine.pool.resident_pages()) == {"a", "b", "c"}
    (completion,) = engine.generate([[1, 2, 3]], one_token, adapters=["d"])
    assert len(completion.token_ids) == 1
    assert set(engine.pool.resident_pages()) == {"a", "c", "d"}  # b, the largest, left
    assert engine.adapters.evictions == 1


async def test_resident_reports_both_tiers_and_the_blobs_a_restart_finds_on_disk(
    tiny: Backbone, adapters: dict[str, Adapter], store: ObjectStore, tmp_path: Path
) -> None:
    a, b = adapters["a"], adapters["b"]
    store.put_blob(a.blob)
    pool_pages = 4 * _full_pool(adapters)
    async with _tiers(tiny, tmp_path / "cache", store, pool_pages) as tiers:
        assert tiers.tier(a.sha) == Tier.object
        await tiers.load(a.sha)  # object store -> host cache -> device
        tiers.cache.put(b.sha, b.blob)
        await tiers.load(b.sha)
        assert await tiers.evict(b.sha) == Tier.host
        assert tiers.page_bytes == _page_bytes(tiny) and tiers.max_rank == MAX_RANK
        assert tiers.total_pages == pool_pages and tiers.free_pages == pool_pages - a.pages
        entries = {e.version: e for e in tiers.resident()}
        assert set(entries) == {a.sha, b.sha}
        da, hb = entries[a.sha], entries[b.sha]
        assert (da.tier, da.rank, da.pages, da.bytes, da.in_use) == (Tier.device, 2, a.pages, len(a.blob), 0)
        assert (hb.tier, hb.rank, hb.pages, hb.bytes) == (Tier.host, 6, 0, len(b.blob)), "rank kept on host"
        assert da.last_used is not None and hb.last_used is not None
        assert tiers.acquire(a.sha) and tiers.resident()[0].in_use == 1
        tiers.release(a.sha)
    (tmp_path / "cache" / "notablob").write_bytes(b"x")
    (tmp_path / "cache" / f"{a.sha}.1.2.tmp").write_bytes(b"half")
    async with _tiers(tiny, tmp_path / "cache", store, pool_pages) as restarted:
        entries = {e.version: e for e in restarted.resident()}
        assert set(entries) == {a.sha, b.sha}, "blobs on disk are the host tier though no load named them"
        assert all(e.tier == Tier.host and e.rank == 0 and e.pages == 0 for e in entries.values())
        assert entries[a.sha].bytes == len(a.blob) and entries[a.sha].last_used is not None
        await restarted.load(a.sha)
        assert {e.version: e.rank for e in restarted.resident()} == {a.sha: 2, b.sha: 0}


async def test_an_adapter_in_use_leaves_when_its_last_invocation_ends(
    tiny: Backbone, adapters: dict[str, Adapter], store: ObjectStore, tmp_path: Path
) -> None:
    a = adapters["a"]
    async with _tiers(tiny, tmp_path, store, _full_pool(adapters)) as tiers:
        tiers.cache.put(a.sha, a.blob)
        await tiers.load(a.sha)
        assert tiers.acquire(a.sha) and tiers.acquire(a.sha)
        assert await tiers.evict(a.sha) == Tier.device
        assert not tiers.acquire(a.sha), "a version on its way out takes no new invocation"
        tiers.release(a.sha)
        assert tiers.tier(a.sha) == Tier.device
        tiers.release(a.sha)  # the last one: the eviction runs in the background
        await tiers.settle()
        assert tiers.tier(a.sha) == Tier.host and tiers.free_pages == tiers.total_pages
        assert tiers.stats["evict"].count == 1
        assert await tiers.evict(a.sha, tier=Tier.host) == Tier.object
        assert tiers.resident() == []
        with pytest.raises(AdapterUnavailable) as refused:
            await tiers.evict(a.sha, tier=Tier.object)
        assert refused.value.code is ErrorCode.bad_request


async def test_a_bad_adapter_costs_no_good_one_its_place(
    tiny: Backbone, adapters: dict[str, Adapter], store: ObjectStore, tmp_path: Path
) -> None:
    async with _tiers(tiny, tmp_path, store, _full_pool(adapters), LargestFirst()) as tiers:
        for name in ("a", "b", "c", "bad"):
            tiers.cache.put(adapters[name].sha, adapters[name].blob)
        for name in "abc":
            await tiers.load(adapters[name].sha)
        with pytest.raises(AdapterUnavailable) as refused:
            await tiers.load(adapters["bad"].sha)
        assert refused.value.code is ErrorCode.adapter_invalid and refused.value.terminal
        assert f"rank {RANKS['bad']}" in str(refused.value)
        assert _on_device(tiers, adapters) == {"a", "b", "c"} and tiers.stats["evict"].count == 0


async def test_a_policy_that_names_an_adapter_in_use_evicts_nothing(
    tiny: Backbone, adapters: dict[str, Adapter], store: ObjectStore, tmp_path: Path
) -> None:
    async with _tiers(tiny, tmp_path, store, _full_pool(adapters), EvictEverything()) as tiers:
        for name in "abcd":
            tiers.cache.put(adapters[name].sha, adapters[name].blob)
        for name in "abc":
            await tiers.load(adapters[name].sha)
        assert tiers.acquire(adapters["b"].sha)
        with pytest.raises(AdapterUnavailable) as refused:
            await tiers.load(adapters["d"].sha)
        assert refused.value.code is ErrorCode.internal and "used by 1 calls" in str(refused.value)
        assert _on_device(tiers, adapters) == {"a", "b", "c"}
