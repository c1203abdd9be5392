"""End to end: a pool bound with the Triton backend (interpreter) equals its CPU path, fragmentation included."""

from __future__ import annotations

import pytest
import torch

from storage.backbone import MODULES, BackboneSpec
from workers.adapter_pool import AdapterPool, LoraWeights, ModuleLora

SPEC = BackboneSpec(
    name="tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
    head_dim=16, vocab_size=128,
)


def random_adapter(rank: int, seed: int, modules: tuple[str, ...] = MODULES) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return {
        (layer, m): ModuleLora(torch.randn(rank, fin, generator=g), torch.randn(fout, rank, generator=g), 1 / rank)
        for layer in range(SPEC.num_layers)
        for m, (fin, fout) in SPEC.module_shapes().items()
        if m in modules
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_matches_cpu_backend(dtype: torch.dtype) -> None:
    pool = AdapterPool(SPEC, 2 * 2**20, dtype=dtype)
    for i, r in enumerate((1, 3, 8, 16, 33, 64, 128)):
        pool.load(f"a{i}", random_adapter(r, i, MODULES if i % 2 == 0 else ("q_proj", "down_proj")))
    pool.evict("a2")
    pool.evict("a4")
    pool.load("late", random_adapter(20, 99))  # lands in holes
    segments = [("a0", 1), ("late", 18), (None, 2), ("a1", 1), ("a6", 3), ("a0", 1), ("a5", 1)]
    t = sum(n for _, n in segments)
    for module in ("k_proj", "down_proj"):
        fin, fout = SPEC.module_shapes()[module]
        x = torch.randn(t, fin).to(dtype)
        fused = torch.zeros(t, fout + 8, dtype=dtype)
        cpu_y = torch.zeros(t, fout, dtype=dtype)
        pool.bind(segments, backend="triton").apply(1, module, x, fused[:, 4 : 4 + fout])
        ref_pool_batch = pool.bind(segments, backend="reference" if dtype == torch.float16 else "cpu")
        ref_pool_batch.apply(1, module, x, cpu_y)
        tol = 1e-3 if dtype == torch.float32 else 2e-2 * float(cpu_y.abs().max())
        torch.testing.assert_close(fused[:, 4 : 4 + fout].float(), cpu_y.float(), rtol=1e-3, atol=tol)
        assert not fused[:, :4].any() and not fused[:, 4 + fout :].any()
