"""Paged adapter pool: allocation, residency, loads in stages, errors, PEFT parsing and utilisation under churn."""

from __future__ import annotations

import math
import random
import threading

import pytest
import torch

from storage.backbone import MODULES, BackboneSpec
from workers.adapter_pool import (
    AdapterLoading,
    AdapterNotLoaded,
    AdapterPool,
    AdapterRankTooLarge,
    AdapterShapeMismatch,
    LoadCancelled,
    LoraWeights,
    ModuleLora,
    PageAllocator,
    PendingLoad,
    PoolFull,
    UnknownModule,
    simulate_churn,
)

SPEC = BackboneSpec(
    name="tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
    head_dim=16, vocab_size=128,
)
SMOLLM2 = BackboneSpec(
    name="smollm2-135m", num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
    num_kv_heads=3, head_dim=64, vocab_size=49152,
)
ROW_ELEMS = sum(fin + fout for fin, fout in SPEC.module_shapes().values())  # elements per rank per layer


def adapter(rank: int, seed: int, modules: tuple[str, ...] = MODULES, layers: tuple[int, ...] = (0, 1)) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return {
        (layer, m): ModuleLora(torch.randn(rank, fin, generator=g), torch.randn(fout, rank, generator=g), 2 / rank)
        for layer in layers
        for m, (fin, fout) in SPEC.module_shapes().items()
        if m in modules
    }


def outputs(pool: AdapterPool, keys: list[str]) -> dict[tuple[int, str], torch.Tensor]:
    """Every (layer, module) delta for one decode token per key."""
    batch = pool.bind([(k, 1) for k in keys])
    got = {}
    for layer in range(SPEC.num_layers):
        for m, (fin, fout) in SPEC.module_shapes().items():
            x = torch.ones(len(keys), fin)
            y = torch.zeros(len(keys), fout)
            batch.apply(layer, m, x, y)
            got[(layer, m)] = y
    return got


def owners(pool: AdapterPool) -> dict[int, str]:
    owned: dict[int, str] = {}
    for key in pool.keys:
        for p in pool.pages_of(key).tolist():
            assert p not in owned, f"page {p} owned by {owned[p]} and {key}"
            owned[p] = key
    return owned


def test_pages_in_proportion_to_rank_without_padding() -> None:
    pool = AdapterPool(SPEC, 2**20)
    assert pool.page_elems == math.gcd(64, 32, 128)
    for rank in (1, 3, 8, 16, 33, 64, 128):
        weights = adapter(rank, rank)
        assert pool.pages_needed(weights) == rank * SPEC.num_layers * ROW_ELEMS // pool.page_elems
    subset = adapter(5, 0, modules=("k_proj", "down_proj"), layers=(1,))
    assert pool.pages_needed(subset) == 5 * (64 + 32 + 128 + 64) // pool.page_elems


def test_random_load_evict_never_overlaps_and_frees_everything() -> None:
    pool = AdapterPool(SPEC, 3 * 2**20)
    total = pool.stats().free_pages
    rng = random.Random(1)
    loaded: dict[str, int] = {}
    for step in range(120):
        if loaded and rng.random() < 0.45:
            key = rng.choice(sorted(loaded))
            assert pool.evict(key)
            del loaded[key]
        else:
            rank = rng.randint(1, 128)
            key = f"k{step}"
            try:
                pool.load(key, adapter(rank, step, layers=(rng.randint(0, 1),)))
                loaded[key] = rank
            except PoolFull as e:
                assert e.needed_pages > e.free_pages == pool.stats().free_pages
        owned = owners(pool)
        assert len(owned) == total - pool.stats().free_pages
    for key in list(loaded):
        pool.evict(key)
    stats = pool.stats()
    assert stats.free_pages == total and stats.live_bytes == 0 and stats.reserved_bytes == 0
    assert pool.free_runs == [(0, total)]


def test_pool_full_is_typed_and_leaves_pool_intact() -> None:
    pages_per_rank = SPEC.num_layers * ROW_ELEMS // 32
    pool = AdapterPool(SPEC, 100 * pages_per_rank * 32 * 4)  # room for rank 100 in total
    pool.load("a", adapter(40, 1))
    pool.load("b", adapter(50, 2))
    pool.evict("a")
    pool.load("c", adapter(30, 3))
    before_stats = pool.stats()
    before = outputs(pool, ["b", "c"])
    with pytest.raises(PoolFull) as err:
        pool.load("big", adapter(21, 4))
    assert err.value.needed_pages == 21 * pages_per_rank
    assert err.value.free_pages == 20 * pages_per_rank
    assert pool.stats() == before_stats and "big" not in pool
    after = outputs(pool, ["b", "c"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    pool.load("fits", adapter(20, 5))  # the 10-page hole and the tail: split across runs
    assert pool.stats().free_pages == 0
    assert all(torch.equal(before[k], outputs(pool, ["b", "c"])[k]) for k in before)


def test_load_is_idempotent_by_key_and_evict_too() -> None:
    pool = AdapterPool(SPEC, 2**20)
    pool.load("v1", adapter(8, 0))
    stats = pool.stats()
    pages = pool.pages_of("v1").clone()
    pool.load("v1", adapter(8, 0))
    assert pool.stats() == stats and torch.equal(pool.pages_of("v1"), pages)
    assert pool.evict("v1") is True
    assert pool.evict("v1") is False


def test_the_page_tables_are_the_record_of_residency() -> None:
    pool = AdapterPool(SPEC, 2**20)
    pool.load("a", adapter(3, 0))
    pool.load("b", adapter(17, 1, modules=("q_proj",), layers=(1,)))
    snapshot = pool.resident_pages()
    assert snapshot == {"a": pool.pages_of("a").numel(), "b": pool.pages_of("b").numel()}
    assert pool.free_pages == pool.total_pages - sum(snapshot.values()) == pool.stats().free_pages
    pool.evict("a")
    assert snapshot.keys() == {"a", "b"}, "a snapshot is a copy"
    assert pool.resident_pages() == {"b": snapshot["b"]}


def test_stats_report_live_reserved_and_utilisation() -> None:
    pool = AdapterPool(SPEC, 2**20)
    pool.load("a", adapter(3, 0))
    pool.load("b", adapter(17, 1, modules=("q_proj",), layers=(1,)))
    s = pool.stats()
    live = (3 * SPEC.num_layers * ROW_ELEMS + 17 * (64 + 64)) * 4
    assert s.live_bytes == live == s.reserved_bytes
    assert s.capacity_bytes == s.total_pages * s.page_bytes <= 2**20
    assert s.utilisation == pytest.approx(live / s.capacity_bytes)
    assert s.adapters == 2


@pytest.mark.parametrize(
    ("weights", "error"),
    [
        (lambda: adapter(129, 0), AdapterRankTooLarge),
        (lambda: {(0, "q_proj"): ModuleLora(torch.zeros(4, 63), torch.zeros(64, 4), 1.0)}, AdapterShapeMismatch),
        (lambda: {(0, "k_proj"): ModuleLora(torch.zeros(4, 64), torch.zeros(64, 4), 1.0)}, AdapterShapeMismatch),
        (lambda: {(0, "lm_head"): ModuleLora(torch.zeros(4, 64), torch.zeros(128, 4), 1.0)}, UnknownModule),
        (lambda: {(2, "q_proj"): ModuleLora(torch.zeros(4, 64), torch.zeros(64, 4), 1.0)}, UnknownModule),
    ],
)
def test_invalid_adapters_are_refused_with_numbers(weights, error: type[Exception]) -> None:
    pool = AdapterPool(SPEC, 2**20)
    with pytest.raises(error):
        pool.load("bad", weights())
    assert "bad" not in pool and pool.stats().free_pages == pool.stats().total_pages


def test_rank_too_large_carries_numbers() -> None:
    err = AdapterRankTooLarge(rank=256, max_rank=128)
    assert (err.rank, err.max_rank) == (256, 128) and "256" in str(err)


def test_bind_unknown_adapter_and_module() -> None:
    pool = AdapterPool(SPEC, 2**20)
    pool.load("a", adapter(4, 0))
    with pytest.raises(AdapterNotLoaded):
        pool.bind([("a", 1), ("missing", 2)])
    with pytest.raises(UnknownModule):
        pool.bind([("a", 1)]).apply(0, "lm_head", torch.zeros(1, 64), torch.zeros(1, 128))


def test_ranks_and_subsets_compute_dense_result() -> None:
    pool = AdapterPool(SPEC, 4 * 2**20)
    cases = {
        f"r{r}": adapter(r, r, modules=MODULES[: 1 + r % 7], layers=(r % 2,) if r % 3 else (0, 1))
        for r in (1, 3, 8, 16, 33, 64, 128)
    }
    for key, w in cases.items():
        pool.load(key, w)
    tokens = [k for k in cases for _ in range(2)] + [None]
    batch = pool.bind_tokens(tokens)
    for layer in range(2):
        for m, (fin, fout) in SPEC.module_shapes().items():
            x = torch.randn(len(tokens), fin)
            y = torch.zeros(len(tokens), fout)
            batch.apply(layer, m, x, y)
            for t, key in enumerate(tokens):
                w = cases[key].get((layer, m)) if key else None
                expected = w.scale * (x[t] @ w.a.T) @ w.b.T if w else torch.zeros(fout)
                torch.testing.assert_close(y[t], expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- loads in stages


HOLES = {f"hole{i}": adapter(3, 100 + i, layers=(i % 2,)) for i in range(6)}


def _fragmented_pool(page_elems: int | None, then: dict[str, LoraWeights], device: str = "cpu") -> AdapterPool:
    """A pool with holes that holds exactly the adapters `then` besides, so that they straddle runs."""
    probe = AdapterPool(SPEC, 2**20, page_elems=page_elems, device=device)
    kept = sum(probe.pages_needed(w) for i, w in enumerate(HOLES.values()) if i % 2)
    pages = kept + sum(probe.pages_needed(w) for w in then.values())
    pool = AdapterPool(SPEC, pages * probe.page_bytes, page_elems=page_elems, device=device)
    for key, w in HOLES.items():
        pool.load(key, w)
    for key in list(HOLES)[::2]:
        pool.evict(key)
    return pool


def _contents(pool: AdapterPool, key: str) -> torch.Tensor:
    return pool.storage[pool.pages_of(key).long()]


@pytest.mark.parametrize("via_host_buffer", [False, True])
@pytest.mark.parametrize("page_elems", [None, 48])  # 48 does not divide 32: tensors end inside a page
def test_a_staged_load_computes_what_a_direct_load_does(via_host_buffer: bool, page_elems: int | None) -> None:
    weights = {"x": adapter(24, 1), "y": adapter(9, 2, modules=("q_proj", "down_proj"))}
    direct, staged = (_fragmented_pool(page_elems, weights) for _ in range(2))
    loads = []
    for key, w in weights.items():
        direct.load(key, w)
        pending = staged.stage(key, w)
        loads.append(pending)
        staged.reserve(pending)
        staged.write(pending, via_host_buffer=via_host_buffer)
        staged.publish(pending)
        assert pending.state == "published" and pending.rank == max(m.rank for m in w.values())
    assert staged.free_pages == 0 and min(len(p.runs) for p in loads) > 1, "both straddle runs of pages"
    for key in weights:
        assert torch.equal(staged.pages_of(key), direct.pages_of(key))
        if page_elems is None:  # no page tails: the pages are identical
            assert torch.equal(_contents(staged, key), _contents(direct, key))
    got, expected = outputs(staged, ["x", "y", "hole1"]), outputs(direct, ["x", "y", "hole1"])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert staged.stats() == direct.stats()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream's copy needs a CUDA device")
def test_on_cuda_the_write_copies_from_pinned_memory_on_a_side_stream() -> None:
    weights = {"x": adapter(24, 1), "y": adapter(9, 2, modules=("q_proj", "down_proj"))}
    direct, staged = (_fragmented_pool(None, weights, device="cuda") for _ in range(2))
    for key, w in weights.items():
        direct.load(key, w)
        pending = staged.stage(key, w)
        staged.reserve(pending)
        staged.write(pending)
        assert pending._ready is not None and pending._host is not None and pending._host.is_pinned()
        staged.publish(pending)
        assert pending._host is None
    for key in weights:  # the default stream waited for the side stream's copy
        assert torch.equal(_contents(staged, key), _contents(direct, key))
    staged.evict("y")
    free = staged.free_pages
    pending = staged.stage("y", weights["y"])
    staged.reserve(pending)
    staged.write(pending)
    assert staged.cancel(pending) and staged.free_pages == free and "y" not in staged


def test_reserved_pages_belong_to_their_load_alone_until_published() -> None:
    pool = AdapterPool(SPEC, 2**20)
    pool.load("old", adapter(5, 0))
    total, free = pool.total_pages, pool.free_pages
    pending = pool.stage("new", adapter(7, 1))
    assert pool.free_pages == free and pending.state == "staged", "staging holds nothing"
    pool.reserve(pending)
    assert pool.free_pages == free - pending.num_pages and pending.state == "reserved"
    assert "new" not in pool and pool.resident_pages() == {"old": pool.pages_of("old").numel()}
    with pytest.raises(AdapterNotLoaded):
        pool.bind([("new", 1)])
    assert pool.evict("new") is False, "a version still loading cannot be evicted"
    with pytest.raises(AdapterLoading):
        pool.reserve(pool.stage("new", adapter(7, 1)))
    with pytest.raises(AdapterLoading):
        pool.load("new", adapter(7, 1))
    pool.load("other", adapter(4, 2))  # never on the reserved pages
    reserved = {p for start, n in pending.runs for p in range(start, start + n)}
    assert not reserved & set(owners(pool)) and len(reserved) == pending.num_pages
    pool.write(pending)
    assert "new" not in pool and pending.state == "written"
    with pytest.raises(AdapterNotLoaded):
        pool.bind([("new", 1)])
    pool.publish(pending)
    assert "new" in pool and set(owners(pool).values()) == {"old", "new", "other"}
    assert len(owners(pool)) == total - pool.free_pages
    assert pool.cancel(pending) is False and "new" in pool, "a published load is evicted, not cancelled"
    with pytest.raises(ValueError, match="published, not written"):
        pool.publish(pending)


@pytest.mark.parametrize("stage", ["staged", "reserved", "written"])
def test_a_cancelled_load_gives_its_pages_back_at_every_stage(stage: str) -> None:
    pool = AdapterPool(SPEC, 2**20)
    pool.load("old", adapter(5, 0))
    free, runs = pool.free_pages, pool.free_runs
    pending = pool.stage("new", adapter(7, 1))
    if stage != "staged":
        pool.reserve(pending)
    if stage == "written":
        pool.write(pending)
    assert pool.cancel(pending) is True and pending.state == "cancelled"
    assert pool.cancel(pending) is False
    assert (pool.free_pages, pool.free_runs) == (free, runs) and "new" not in pool
    for step in (pool.reserve, pool.write, pool.publish):
        with pytest.raises(LoadCancelled):
            step(pending)
    assert (pool.free_pages, pool.free_runs) == (free, runs)
    pool.load("new", adapter(7, 1))  # the key is free for a new load
    assert set(pool.resident_pages()) == {"old", "new"}


class _PausedWrites:
    """Holds `AdapterPool.write` after its first tensor until released (an instance attribute of one pool)."""

    def __init__(self, pool: AdapterPool, *, fail_at: int | None = None) -> None:
        self.entered = threading.Event()
        self.resume = threading.Event()
        self.calls = 0
        store = pool._store

        def paused(pages: torch.Tensor, first: int, mat: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == fail_at:
                raise RuntimeError("the copy failed")
            store(pages, first, mat)
            if self.calls == 1:
                self.entered.set()
                assert self.resume.wait(10)

        pool._store = paused  # type: ignore[method-assign]


def test_a_cancel_during_the_write_frees_the_pages_when_the_write_ends() -> None:
    pool = AdapterPool(SPEC, 2**20)
    free = pool.free_pages
    pending = pool.stage("new", adapter(7, 1))
    pool.reserve(pending)
    gate = _PausedWrites(pool)
    errors: list[BaseException] = []

    def write(p: PendingLoad) -> None:
        try:
            pool.write(p)
        except BaseException as e:
            errors.append(e)

    writer = threading.Thread(target=write, args=(pending,))
    writer.start()
    assert gate.entered.wait(10)
    assert pool.cancel(pending) is True
    assert pending.state == "writing" and pool.free_pages == free - pending.num_pages, "not under a copy"
    gate.resume.set()
    writer.join(10)
    assert [type(e) for e in errors] == [LoadCancelled] and pending.state == "cancelled"
    assert pool.free_pages == free and "new" not in pool
    with pytest.raises(LoadCancelled):
        pool.publish(pending)


def test_a_write_that_fails_frees_the_pages() -> None:
    pool = AdapterPool(SPEC, 2**20)
    pool.load("old", adapter(5, 0))
    free, before = pool.free_pages, outputs(pool, ["old"])
    pending = pool.stage("new", adapter(7, 1))
    pool.reserve(pending)
    gate = _PausedWrites(pool, fail_at=3)
    gate.resume.set()
    with pytest.raises(RuntimeError, match="the copy failed"):
        pool.write(pending)
    assert pending.state == "cancelled" and pool.free_pages == free and "new" not in pool
    assert all(torch.equal(before[k], outputs(pool, ["old"])[k]) for k in before)
    assert pool.cancel(pending) is False


def test_page_allocator_prefers_best_fit_then_longest_runs() -> None:
    alloc = PageAllocator(100)
    a, b, c, d = (alloc.allocate(n) for n in (10, 20, 30, 40))
    alloc.free(a)
    alloc.free(c)
    assert alloc.allocate(8) == [(0, 8)]  # best fit: the 10-run, not the 30-run
    assert alloc.allocate(25) == [(30, 25)]
    assert alloc.allocate(7) == [(55, 5), (8, 2)]  # longest first, then the rest
    assert alloc.allocate(1) is None
    alloc.free([(55, 5), (8, 2), (30, 25), (0, 8), *b, *d])
    assert alloc.free_runs == [(0, 100)]


def test_churn_simulation_is_deterministic_and_meets_targets() -> None:
    report = simulate_churn(0, spec=SMOLLM2, rounds=600)
    assert report == simulate_churn(0, spec=SMOLLM2, rounds=600)
    assert report.paged >= 0.95 and report.paged_min >= 0.9
    assert 0.40 <= report.padded <= 0.60
    assert report.padded < report.contiguous < report.paged
    assert report.samples > 100


# ----------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_matches_peft_delta(use_rslora: bool, tmp_path) -> None:
    """A PEFT adapter read through the registry's format and loaded into the pool adds PEFT's delta."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from storage.adapter_format import read_upload, validate
    from workers.adapters import lora_weights_from_parsed

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=64,
    )
    base = LlamaForCausalLM(cfg)
    rank_pattern = {} if use_rslora else {"model.layers.1.self_attn.k_proj": 4, "down_proj": 16}
    alpha_pattern = {} if use_rslora else {"q_proj": 32}
    lcfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=list(MODULES), rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, use_rslora=use_rslora, lora_dropout=0.0,
    )
    model = get_peft_model(base, lcfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.eval()
    model.save_pretrained(tmp_path)
    weights = lora_weights_from_parsed(validate(read_upload(tmp_path), SPEC))
    assert len(weights) == SPEC.num_layers * len(MODULES)
    if not use_rslora:
        assert weights[(1, "k_proj")].rank == 4 and weights[(0, "k_proj")].rank == 8
        assert weights[(0, "down_proj")].rank == 16
        assert weights[(0, "q_proj")].scale == pytest.approx(32 / 8)
    pool = AdapterPool(SPEC, 2**20)
    pool.load("peft", weights)
    batch = pool.bind([("peft", 5)])
    layers = model.base_model.model.model.layers
    for layer in range(2):
        for m, (fin, fout) in SPEC.module_shapes().items():
            peft_layer = getattr(layers[layer].self_attn if m in MODULES[:4] else layers[layer].mlp, m)
            x = torch.randn(5, fin)
            with torch.no_grad():
                expected = peft_layer(x) - peft_layer.base_layer(x)
            y = torch.zeros(5, fout)
            batch.apply(layer, m, x, y)
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)

