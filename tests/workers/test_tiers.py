"""One ledger of device residency per worker: the pool's page tables say what is on the device, the
injected eviction policy says what leaves, and both the worker's `AdapterTiers` and the standalone
engine (`lorafn generate`) obey it. Loads written off the engine thread give the tokens of loads on it,
and no step sees an adapter before all its pages are written. Adapters are real canonical blobs; the
object store is the test session's S3 server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from protocol.messages import ErrorCode, Tier
from scheduler.policy import EvictionPolicy, LruEviction, ResidentView
from scheduler.staging import GreedyDualEviction
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
from workers.adapters import AdaptersDoNotFit, UnknownAdapter, lora_weights_from_parsed
from workers.batcher import Completion
from workers.engine import AdapterLoad, Engine, EngineSettings
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
    tiny: Backbone, directory: Path, store: ObjectStore, pool_pages: int, eviction: EvictionPolicy | None = None,
    load_mode: AdapterLoad | None = None,
) -> AsyncIterator[AdapterTiers]:
    engine = Engine(tiny, _settings(tiny, pool_pages), eviction=eviction)
    thread = EngineThread(engine, asyncio.get_running_loop())
    thread.start()
    try:
        yield AdapterTiers(engine=thread, store=store, load_mode=load_mode,
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


def test_the_settings_choose_the_engines_eviction_policy(tiny: Backbone) -> None:
    assert isinstance(Engine(tiny, _settings(tiny, 8)).eviction, LruEviction)  # the default
    dual = Engine(tiny, _settings(tiny, 8).model_copy(update={"eviction": "greedy_dual"}))
    assert isinstance(dual.eviction, GreedyDualEviction) and dual.eviction.page_bytes == dual.pool.page_bytes
    policy = LargestFirst()
    assert Engine(tiny, _settings(tiny, 8), eviction=policy).eviction is policy  # an injected one wins


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


# ----------------------------------------------------------------------------------------- loads off the engine thread

PROMPT = [5, 9, 2, 7, 11]


def _greedy(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)


LONG = 100  # tokens of the request that decodes while adapters load
SHORT = 8


@pytest.fixture(scope="module")
def reference(tiny: Backbone, adapters: dict[str, Adapter]) -> dict[str, list[int]]:
    """Greedy tokens (LONG) of PROMPT with each adapter, on a standalone engine that copies adapters in on
    its own thread; a shorter request's tokens are their prefix."""
    engine = Engine(tiny, _settings(tiny, 4 * _full_pool(adapters)))
    names = "abcd"
    for name in names:
        engine.add_adapter(adapters[name].sha, load_canonical(adapters[name].blob))
    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # steps off the main thread, as a worker runs them
        done = thread.submit(
            engine.generate, [PROMPT] * len(names), _greedy(LONG), adapters=[adapters[n].sha for n in names]
        ).result()
    return {name: c.token_ids for name, c in zip(names, done, strict=True)}


async def _generate(tiers: AdapterTiers, sha: str, tokens: int, request_id: str) -> list[int]:
    generation = await tiers.engine.submit(PROMPT, adapter=sha, params=_greedy(tokens), request_id=request_id)
    while True:
        item = await generation.items.get()
        if isinstance(item, Completion):
            return item.token_ids
        if isinstance(item, BaseException):
            raise item


class _HeldWrite:
    """Holds the copy of an adapter into the engine's pool after its first tensor until `resume` (an
    instance attribute of that one pool); with `fail`, the second tensor's copy raises, nothing waits."""

    def __init__(self, pool: AdapterPool, *, fail: bool = False) -> None:
        self.entered = threading.Event()
        self.resume = threading.Event()
        self.calls = 0
        store = pool._store

        def held(pages: torch.Tensor, first: int, mat: torch.Tensor) -> None:
            self.calls += 1
            if fail and self.calls == 2:
                raise RuntimeError("the copy failed")
            store(pages, first, mat)
            if self.calls == 1 and not fail:
                self.entered.set()
                assert self.resume.wait(10)

        pool._store = held  # type: ignore[method-assign]
        self._pool = pool

    def remove(self) -> None:
        self.resume.set()
        del self._pool._store

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


async def _steps(tiers: AdapterTiers, n: int) -> None:
    """Wait until the engine thread has run `n` more steps."""
    until = tiers.engine.steps + n
    while tiers.engine.steps < until:
        await asyncio.sleep(0.005)


async def test_both_load_modes_write_the_same_pages_and_give_the_same_tokens(
    tiny: Backbone, adapters: dict[str, Adapter], reference: dict[str, list[int]], store: ObjectStore,
    tmp_path: Path,
) -> None:
    pages: dict[str, list[torch.Tensor]] = {}
    for mode in ("engine", "background"):
        async with _tiers(tiny, tmp_path / mode, store, _full_pool(adapters), load_mode=mode) as tiers:
            assert tiers.load_mode == mode
            for name in "abcd":  # d evicts a: its pages are a's again
                tiers.cache.put(adapters[name].sha, adapters[name].blob)
                assert await tiers.load(adapters[name].sha) > 0
            pool = tiers.engine.engine.pool
            pages[mode] = [pool.storage[pool.pages_of(adapters[n].sha).long()].clone() for n in "bcd"]
            tokens = await asyncio.gather(*(_generate(tiers, adapters[n].sha, SHORT, n) for n in "bcd"))
            assert dict(zip("bcd", tokens, strict=True)) == {n: reference[n][:SHORT] for n in "bcd"}, mode
            assert tiers.stats["load"].count == 4 and tiers.stats["evict"].count == 1
            assert tiers.engine.engine.adapters.loads == 4
    assert all(torch.equal(e, b) for e, b in zip(pages["engine"], pages["background"], strict=True))


async def test_steps_never_see_an_adapter_whose_pages_are_being_written(
    tiny: Backbone, adapters: dict[str, Adapter], reference: dict[str, list[int]], store: ObjectStore,
    tmp_path: Path,
) -> None:
    a, b = adapters["a"], adapters["b"]
    async with _tiers(tiny, tmp_path, store, 4 * _full_pool(adapters), load_mode="background") as tiers:
        for name in "abcd":
            tiers.cache.put(adapters[name].sha, adapters[name].blob)
        await tiers.load(a.sha)
        decoding = asyncio.ensure_future(_generate(tiers, a.sha, LONG, "steady"))  # steps all along
        pool = tiers.engine.engine.pool
        held = _HeldWrite(pool)
        loading = asyncio.ensure_future(tiers.load(b.sha))
        await held.wait_entered()
        await _steps(tiers, 3)  # steps run while b's pages are half written
        assert b.sha not in pool and b.sha not in tiers.engine.engine.adapters
        assert tiers.tier(b.sha) == Tier.host and not tiers.acquire(b.sha)
        with pytest.raises(UnknownAdapter):
            await _generate(tiers, b.sha, 1, "too-early")
        assert await tiers.evict(b.sha) == Tier.host and not loading.done(), "a load in flight is not evicted"
        assert pool.free_pages == tiers.free_pages == tiers.total_pages - a.pages - b.pages
        held.remove()
        await loading
        assert tiers.tier(b.sha) == Tier.device and tiers.free_pages == tiers.total_pages - a.pages - b.pages
        assert await _generate(tiers, b.sha, SHORT, "b") == reference["b"][:SHORT]
        for name in "cdc":  # more loads and evictions while a decodes
            await tiers.load(adapters[name].sha)
            assert await _generate(tiers, adapters[name].sha, SHORT, name) == reference[name][:SHORT]
            assert await tiers.evict(adapters[name].sha) == Tier.host
        assert not decoding.done(), "the steady request decoded through every load"
        assert await decoding == reference["a"]


async def test_a_load_that_fails_or_is_cancelled_while_writing_gives_its_pages_back(
    tiny: Backbone, adapters: dict[str, Adapter], reference: dict[str, list[int]], store: ObjectStore,
    tmp_path: Path,
) -> None:
    a, b = adapters["a"], adapters["b"]
    async with _tiers(tiny, tmp_path, store, 4 * _full_pool(adapters), load_mode="background") as tiers:
        for name in "ab":
            tiers.cache.put(adapters[name].sha, adapters[name].blob)
        await tiers.load(a.sha)
        pool = tiers.engine.engine.pool
        free = tiers.total_pages - a.pages
        failing = _HeldWrite(pool, fail=True)
        with pytest.raises(RuntimeError, match="the copy failed"):
            await tiers.load(b.sha)
        failing.remove()
        assert pool.free_pages == tiers.free_pages == free and tiers.tier(b.sha) == Tier.host

        held = _HeldWrite(pool)
        load = asyncio.ensure_future(tiers._load(b.sha))
        await held.wait_entered()
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        assert pool.free_pages == free - b.pages, "the writer still holds the pages"
        held.remove()
        while pool.free_pages != free:  # the writer frees them when its copy ends
            await asyncio.sleep(0.005)
        assert tiers.free_pages == free and b.sha not in pool

        await tiers.load(b.sha)
        assert await _generate(tiers, b.sha, SHORT, "b") == reference["b"][:SHORT]
        assert await _generate(tiers, a.sha, SHORT, "a") == reference["a"][:SHORT]


async def test_the_host_tier_keeps_a_float32_adapter_in_the_pools_dtype(
    tiny: Backbone, adapters: dict[str, Adapter], store: ObjectStore, tmp_path: Path
) -> None:
    """With a bfloat16 pool, a fetched float32 adapter is kept in the host cache in bfloat16 (about half the
    bytes, reported as such), and its load writes the very pages that loading the float32 blob writes."""
    b = adapters["b"]
    store.put_blob(b.blob)
    settings = EngineSettings(kv_cache_bytes=1 << 20, block_size=4, adapter_dtype="bfloat16", max_rank=MAX_RANK,
                              adapter_pool_bytes=1 << 20)
    pages = []
    for fetched in (True, False):
        engine = Engine(tiny, settings)
        thread = EngineThread(engine, asyncio.get_running_loop())
        thread.start()
        try:
            cache = HostCache(tmp_path / f"cache-{fetched}", disk_bytes=1 << 26, ram_bytes=1 << 26)
            tiers = AdapterTiers(engine=thread, store=store, cache=cache)
            if not fetched:
                cache.put(b.sha, b.blob)  # the float32 blob itself: the pool converts it
            await tiers.load(b.sha)
            kept = cache.get(b.sha)
            assert kept is not None
            if fetched:
                assert len(kept) < 0.55 * len(b.blob) and load_canonical(kept).dtype == "BF16"
                assert {e.version: e.bytes for e in tiers.resident()} == {b.sha: len(kept)}
            else:
                assert kept == b.blob
            pool = engine.pool
            assert pool.dtype == torch.bfloat16
            pages.append(pool.storage[pool.pages_of(b.sha).long()].clone())
        finally:
            await thread.stop()
    assert torch.equal(pages[0], pages[1])
