"""The CPU path (grouping by adapter, views into the pool) against the reference and a dense loop.

Runs at the default model's widths (576 / 192 / 1536) with two layers to keep loading cheap.
"""

from __future__ import annotations

import pytest
import torch

from kernels import make_segments, plan_cpu
from storage.backbone import MODULES, BackboneSpec
from workers.adapter_pool import AdapterPool, LoraWeights, ModuleLora

SPEC = BackboneSpec(
    name="smollm2-135m-2-layers", num_layers=2, hidden_size=576, intermediate_size=1536,
    num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152,
)
RANKS = (1, 3, 8, 16, 33, 64, 128)


def random_adapter(rank: int, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return {
        (layer, m): ModuleLora(
            a=torch.randn(rank, fin, generator=g) / fin**0.5,
            b=torch.randn(fout, rank, generator=g),
            scale=16 / rank,
        )
        for layer in range(SPEC.num_layers)
        for m, (fin, fout) in SPEC.module_shapes().items()
    }


@pytest.fixture(scope="module")
def loaded() -> tuple[AdapterPool, dict[str, LoraWeights]]:
    """A pool with fragmented adapters: holes are punched by evictions before the last loads."""
    rank_bytes = SPEC.num_layers * sum(fin + fout for fin, fout in SPEC.module_shapes().values()) * 4
    pool = AdapterPool(SPEC, rank_bytes * (sum(RANKS) + 12 + 40 + 20))
    adapters: dict[str, LoraWeights] = {}
    for i, r in enumerate((*RANKS, 12, 40)):
        adapters[f"v{i}"] = random_adapter(r, seed=i)
        pool.load(f"v{i}", adapters[f"v{i}"])
    for key in ("v1", "v3", "v5"):
        pool.evict(key)
        del adapters[key]
    for i, r in enumerate((90, 7, 3), start=20):  # 90 spans the 64, 20 and 16 holes
        adapters[f"v{i}"] = random_adapter(r, seed=i)
        pool.load(f"v{i}", adapters[f"v{i}"])
    pages = pool.pages_of("v20")
    assert int(pages[-1] - pages[0]) != pages.shape[0] - 1, "the fixture should fragment v20"
    return pool, adapters


def dense_delta(adapters: dict[str, LoraWeights], segments: list[tuple[str | None, int]], layer: int,
                module: str, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], SPEC.module_shapes()[module][1], dtype=torch.float64)
    start = 0
    for key, n in segments:
        w = adapters[key].get((layer, module)) if key is not None else None
        if w is not None:
            out[start : start + n] = w.scale * (x[start : start + n].double() @ w.a.double().T) @ w.b.double().T
        start += n
    return out


def traffic(keys: list[str]) -> dict[str, list[tuple[str | None, int]]]:
    return {
        "distinct_decode": [(k, 1) for k in keys],
        "popular_decode": [(keys[i % 3], 1) for i in range(12)],
        "one_adapter_prefill": [(keys[0], 23)],
        "no_adapter": [(None, 4)],
        "mixed_with_none": [(keys[1], 9), (None, 2), (keys[2], 1), (None, 1), (keys[1], 1), (keys[-1], 5)],
    }


@pytest.mark.parametrize("name", ["distinct_decode", "popular_decode", "one_adapter_prefill", "no_adapter",
                                  "mixed_with_none"])
@pytest.mark.parametrize("module", MODULES)
def test_cpu_matches_reference_and_dense(loaded: tuple[AdapterPool, dict[str, LoraWeights]], name: str,
                                         module: str) -> None:
    pool, adapters = loaded
    segments = traffic(sorted(adapters))[name]
    t = sum(n for _, n in segments)
    fin, fout = SPEC.module_shapes()[module]
    x = torch.randn(t, fin, generator=torch.Generator().manual_seed(7))
    y0 = torch.randn(t, fout)
    results = {}
    for backend in ("cpu", "reference"):
        y = y0.clone()
        pool.bind(segments, backend=backend).apply(1, module, x, y)
        results[backend] = y - y0
    expected = dense_delta(adapters, segments, 1, module, x).float()
    torch.testing.assert_close(results["cpu"], expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(results["reference"], expected, rtol=1e-4, atol=1e-3)


def test_cpu_adds_into_column_slice_of_fused_qkv(loaded: tuple[AdapterPool, dict[str, LoraWeights]]) -> None:
    pool, adapters = loaded
    segments = traffic(sorted(adapters))["mixed_with_none"]
    t = sum(n for _, n in segments)
    x = torch.randn(t, 576)
    fused = torch.randn(t, 576 + 192 + 192)
    before = fused.clone()
    batch = pool.bind(segments)
    for module, cols in (("q_proj", slice(0, 576)), ("k_proj", slice(576, 768)), ("v_proj", slice(768, 960))):
        batch.apply(0, module, x, fused[:, cols])
        expected = dense_delta(adapters, segments, 0, module, x).float()
        torch.testing.assert_close(fused[:, cols] - before[:, cols], expected, rtol=1e-4, atol=1e-3)


def test_plan_groups_by_adapter() -> None:
    plan = plan_cpu([0, -1, 1, 0, 2], [3, 1, 2, 1, 4])
    assert plan.split_sizes == (3, 1, 2, 1, 4)
    assert dict(plan.runs) == {1: 2, 2: 4}
    (slot, idx), = plan.gathers
    assert slot == 0 and idx.tolist() == [0, 1, 2, 6]


@pytest.mark.parametrize(
    ("lengths", "tiles"),
    [([1, 1, 1], [(0, 0, 1), (1, 1, 2), (2, 2, 3)]), ([40, 2], [(0, 0, 16), (0, 16, 32), (0, 32, 40), (1, 40, 42)])],
)
def test_segments_are_tiled(lengths: list[int], tiles: list[tuple[int, int, int]]) -> None:
    segs = make_segments(lengths)
    got = list(zip(segs.tile_seg.tolist(), segs.tile_start.tolist(), segs.tile_end.tolist(), strict=True))
    assert got == tiles
    assert segs.seg_start.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
