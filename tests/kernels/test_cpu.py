"""The CPU path (grouping by adapter, views into the pool) against the reference and a dense loop.

Runs at the default model's widths (576 / 192 / 1536) with two layers to keep loading cheap, for float32
and bfloat16 pools, on the native kernel (when it builds here) and on the torch path.
"""

from __future__ import annotations

import pytest
import torch

from kernels import make_segments, native, plan_cpu
from kernels.cpu import NATIVE_MAX_TOKENS
from storage.backbone import MODULES, BackboneSpec
from workers.adapter_pool import AdapterPool, BoundBatch, LoraWeights, ModuleLora

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


def stored(adapters: dict[str, LoraWeights], dtype: torch.dtype) -> dict[str, LoraWeights]:
    """The weights as the pool holds them (rounded to its dtype)."""
    return {
        key: {lm: ModuleLora(w.a.to(dtype).float(), w.b.to(dtype).float(), w.scale) for lm, w in weights.items()}
        for key, weights in adapters.items()
    }


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def loaded(request: pytest.FixtureRequest) -> tuple[AdapterPool, dict[str, LoraWeights]]:
    """A pool with fragmented adapters: holes are punched by evictions before the last loads. Returns the
    pool and the weights it holds (rounded to its dtype)."""
    dtype = request.param
    itemsize = torch.tensor([], dtype=dtype).element_size()
    rank_bytes = SPEC.num_layers * sum(fin + fout for fin, fout in SPEC.module_shapes().values()) * itemsize
    pool = AdapterPool(SPEC, rank_bytes * (sum(RANKS) + 12 + 40 + 20), dtype=dtype)
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
    return pool, stored(adapters, dtype)


PATHS = ["native", "torch"]


def bind(pool: AdapterPool, segments: list[tuple[str | None, int]], path: str) -> BoundBatch:
    if path == "native" and not native.available():
        pytest.skip("the native kernel does not build here")
    batch = pool.bind(segments, native_kernel=path == "native")
    assert batch.native == (path == "native" and any(k is not None for k, _ in segments))
    return batch


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
        # keys[0] has more tokens than the native kernel takes: torch.mm for it, the kernel for the rest
        "prefill_beside_decodes": [(keys[0], NATIVE_MAX_TOKENS), (keys[-1], 1), (None, 2), (keys[0], 3),
                                   (keys[-2], 1), (keys[5], 2)],
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["distinct_decode", "popular_decode", "one_adapter_prefill", "no_adapter",
                                  "mixed_with_none", "prefill_beside_decodes"])
@pytest.mark.parametrize("module", MODULES)
def test_cpu_matches_reference_and_dense(loaded: tuple[AdapterPool, dict[str, LoraWeights]], name: str,
                                         module: str, path: str) -> None:
    pool, adapters = loaded
    segments = traffic(sorted(adapters))[name]
    t = sum(n for _, n in segments)
    fin, fout = SPEC.module_shapes()[module]
    x = torch.randn(t, fin, generator=torch.Generator().manual_seed(7))
    y0 = torch.randn(t, fout)
    y = y0.clone()
    bind(pool, segments, path).apply(1, module, x, y)
    expected = dense_delta(adapters, segments, 1, module, x).float()
    torch.testing.assert_close(y - y0, expected, rtol=1e-4, atol=1e-3)
    if pool.dtype == torch.float32:  # the reference computes in the pool's dtype
        y = y0.clone()
        pool.bind(segments, backend="reference").apply(1, module, x, y)
        torch.testing.assert_close(y - y0, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("path", PATHS)
def test_cpu_adds_into_column_slice_of_fused_qkv(loaded: tuple[AdapterPool, dict[str, LoraWeights]],
                                                 path: str) -> None:
    pool, adapters = loaded
    segments = traffic(sorted(adapters))["mixed_with_none"]
    t = sum(n for _, n in segments)
    x = torch.randn(t, 576)
    fused = torch.randn(t, 576 + 192 + 192)
    before = fused.clone()
    batch = bind(pool, segments, path)
    for module, cols in (("q_proj", slice(0, 576)), ("k_proj", slice(576, 768)), ("v_proj", slice(768, 960))):
        batch.apply(0, module, x, fused[:, cols])
        expected = dense_delta(adapters, segments, 0, module, x).float()
        torch.testing.assert_close(fused[:, cols] - before[:, cols], expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fused[:, 960:], before[:, 960:])  # nothing written outside the slices


def test_native_and_torch_paths_agree_on_a_whole_batch(loaded: tuple[AdapterPool, dict[str, LoraWeights]]) -> None:
    """Every layer and module of one mixed batch: the native kernel gives the torch path's numbers."""
    pool, adapters = loaded
    segments = traffic(sorted(adapters))["prefill_beside_decodes"]
    t = sum(n for _, n in segments)
    fast, slow = bind(pool, segments, "native"), bind(pool, segments, "torch")
    g = torch.Generator().manual_seed(3)
    for layer in range(SPEC.num_layers):
        for module, (fin, fout) in SPEC.module_shapes().items():
            x = torch.randn(t, fin, generator=g)
            ys = [torch.zeros(t, fout) for _ in range(2)]
            fast.apply(layer, module, x, ys[0])
            slow.apply(layer, module, x, ys[1])
            torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-4)


def test_half_precision_activations_take_the_torch_path(loaded: tuple[AdapterPool, dict[str, LoraWeights]]) -> None:
    """bf16 activations (a bf16 backbone) are not the kernel's: the same batch falls back to torch."""
    pool, adapters = loaded
    segments = traffic(sorted(adapters))["mixed_with_none"]
    t = sum(n for _, n in segments)
    x = torch.randn(t, 576, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(t, 576, dtype=torch.bfloat16)
    bind(pool, segments, "native").apply(1, "o_proj", x.bfloat16(), y)
    expected = dense_delta(adapters, segments, 1, "o_proj", x.bfloat16().float()).float()
    # products in bf16 (both operands are bf16): errors of a few bf16 ulps of the largest values
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=1e-2 * float(expected.abs().max()))


def test_native_apply_checks_shapes(loaded: tuple[AdapterPool, dict[str, LoraWeights]]) -> None:
    pool, adapters = loaded
    batch = bind(pool, [(sorted(adapters)[0], 2)], "native")
    with pytest.raises(ValueError, match="must be"):
        batch.apply(0, "q_proj", torch.zeros(2, 192), torch.zeros(2, 576))  # k_proj's input width
    with pytest.raises(ValueError, match="must be"):
        batch.apply(0, "q_proj", torch.zeros(3, 576), torch.zeros(3, 576))  # not the batch's tokens


def test_plan_groups_by_adapter() -> None:
    plan = plan_cpu([0, -1, 1, 0, 2], [3, 1, 2, 1, 4])
    assert plan.split_sizes == (3, 1, 2, 1, 4)
    assert dict(plan.runs) == {1: 2, 2: 4}
    (slot, idx), = plan.gathers
    assert slot == 0 and idx.tolist() == [0, 1, 2, 6]
    assert plan.native is None


def test_plan_leaves_slots_with_few_tokens_to_the_native_kernel() -> None:
    plan = plan_cpu([0, -1, 1, 0, 2], [3, 1, 2, 1, 4], native_max_tokens=3)
    assert dict(plan.runs) == {2: 4}  # slots 0 and 2 have 4 tokens each: torch
    assert [(slot, idx.tolist()) for slot, idx in plan.gathers] == [(0, [0, 1, 2, 6])]
    assert plan.native is not None
    assert plan.native.slots.tolist() == [1]
    assert plan.native.tok_ptr.tolist() == [0, 2]
    assert plan.native.tok_idx.tolist() == [4, 5]
    everything = plan_cpu([0, -1, 1, 0, 2], [3, 1, 2, 1, 4], native_max_tokens=4)
    assert everything.runs == () and everything.gathers == ()
    assert everything.native is not None
    assert everything.native.slots.tolist() == [0, 1, 2]
    assert everything.native.tok_ptr.tolist() == [0, 4, 6, 10]
    assert everything.native.tok_idx.tolist() == [0, 1, 2, 6, 4, 5, 7, 8, 9, 10]


@pytest.mark.parametrize(
    ("lengths", "tiles"),
    [([1, 1, 1], [(0, 0, 1), (1, 1, 2), (2, 2, 3)]), ([40, 2], [(0, 0, 16), (0, 16, 32), (0, 32, 40), (1, 40, 42)])],
)
def test_segments_are_tiled(lengths: list[int], tiles: list[tuple[int, int, int]]) -> None:
    segs = make_segments(lengths)
    got = list(zip(segs.tile_seg.tolist(), segs.tile_start.tolist(), segs.tile_end.tolist(), strict=True))
    assert got == tiles
    assert segs.seg_start.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
