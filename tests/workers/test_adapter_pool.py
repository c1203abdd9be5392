"""Paged adapter pool: allocation, residency, errors, PEFT parsing and utilisation under churn."""

from __future__ import annotations

import math
import random

import pytest
import torch

from storage.backbone import MODULES, BackboneSpec
from workers.adapter_pool import (
    AdapterNotLoaded,
    AdapterPool,
    AdapterRankTooLarge,
    AdapterShapeMismatch,
    LoraWeights,
    ModuleLora,
    PageAllocator,
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

