"""Paged KV cache: block bookkeeping, budgets, and attention over blocks vs dense causal attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import native
from storage.backbone import BackboneSpec
from workers.kv_cache import (
    AttentionMetadata,
    KVBudgetTooSmall,
    OutOfBlocks,
    PagedKVCache,
    SequenceExists,
    UnknownSequence,
    block_bytes,
    blocks_for_budget,
)

SPEC = BackboneSpec(
    name="tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=6, num_kv_heads=2, head_dim=8,
    vocab_size=64,
)  # fmt: skip


def _state(kv: PagedKVCache) -> tuple:
    seqs = sorted((s for s in ("a", "b", "c", "d") if s in kv), key=str)
    return kv.num_free_blocks, [(s, kv.length(s), kv.block_table(s)) for s in seqs]


def test_blocks_for_budget_uses_spec_numbers() -> None:
    per_block = block_bytes(SPEC, block_size=16, dtype=torch.float32)
    assert per_block == 2 * 2 * 16 * 2 * 8 * 4
    assert blocks_for_budget(10 * per_block + per_block // 2, SPEC, block_size=16) == 10
    assert block_bytes(SPEC, block_size=16, dtype=torch.bfloat16) == per_block // 2
    with pytest.raises(KVBudgetTooSmall) as e:
        blocks_for_budget(per_block - 1, SPEC, block_size=16)
    assert e.value.block_bytes == per_block and e.value.budget_bytes == per_block - 1
    kv = PagedKVCache.from_budget(SPEC, 3 * per_block, block_size=16)
    assert kv.num_blocks == 3 and kv.k.numel() * 4 * 2 == 3 * per_block


def test_allocate_append_free() -> None:
    kv = PagedKVCache(SPEC, 8, block_size=4)
    assert kv.allocate("a", 5) == [0, 1] and kv.num_free_blocks == 6
    assert kv.blocks_needed(3, "a") == 0 and kv.blocks_needed(4, "a") == 1
    kv.append("a", 3)  # fills block 1 exactly
    assert kv.block_table("a") == [0, 1] and kv.length("a") == 8
    kv.append("a")
    assert kv.block_table("a") == [0, 1, 2]
    kv.allocate("b", 1)
    assert kv.free("a") == 3 and kv.num_free_blocks == 7
    assert kv.free("a") == 0  # idempotent
    assert "a" not in kv and kv.length("b") == 1
    assert sorted(kv.allocate("c", 12)) == [0, 1, 2]  # freed blocks are reused


def test_out_of_blocks_leaves_the_cache_intact() -> None:
    kv = PagedKVCache(SPEC, 4, block_size=4)
    kv.allocate("a", 6)
    kv.allocate("b", 3)
    before = _state(kv)
    with pytest.raises(OutOfBlocks) as e:
        kv.allocate("c", 9)
    assert (e.value.needed, e.value.free) == (3, 1)
    assert _state(kv) == before and "c" not in kv
    with pytest.raises(OutOfBlocks) as e:
        kv.append("a", 7)  # 13 tokens need 4 blocks, holds 2, 1 free
    assert (e.value.needed, e.value.free) == (2, 1)
    assert _state(kv) == before
    assert kv.can_append(2, "a") and not kv.can_append(7, "a")
    kv.append("b", 5)  # exactly the last free block
    assert kv.num_free_blocks == 0


def test_typed_errors_for_unknown_and_duplicate_sequences() -> None:
    kv = PagedKVCache(SPEC, 4, block_size=4)
    kv.allocate("a", 1)
    with pytest.raises(SequenceExists):
        kv.allocate("a", 1)
    with pytest.raises(UnknownSequence):
        kv.append("zz")
    with pytest.raises(UnknownSequence):
        kv.length("zz")


def test_metadata_layout() -> None:
    attn = AttentionMetadata.build(
        query_lens=[3, 1, 2], context_lens=[3, 6, 5], block_tables=[[4], [2, 0], [1, 3]], block_size=4
    )
    assert attn.query_starts == [0, 3, 4] and attn.num_tokens == 6
    # seq0 positions 0-2 in block 4; seq1 position 5 -> block 0 slot 1; seq2 positions 3,4 -> block 1 slot 3, block 3 slot 0
    assert attn.slot_mapping.tolist() == [16, 17, 18, 1, 7, 12]
    assert attn.decode_tokens.tolist() == [3] and attn.decode_blocks.tolist() == [[2, 0]]
    assert attn.last_token_indices.tolist() == [2, 3, 5]
    assert [(p.start, p.end, p.slots is None) for p in attn.prefills] == [(0, 3, True), (4, 6, False)]
    with pytest.raises(ValueError, match="query length 4"):
        AttentionMetadata.build(query_lens=[4], context_lens=[3], block_tables=[[0]], block_size=4)
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build(query_lens=[1], context_lens=[5], block_tables=[[0]], block_size=4)


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal GQA attention over one whole sequence. q: [L, H, D], k/v: [L, KVH, D] -> [L, H * D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    length = q.shape[0]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, -1)


@pytest.mark.parametrize("native_attention", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("head_dim", [8, 32])  # 8: the kernel's scalar loop; 32: its vector loop
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_equals_dense_causal_attention(block_size: int, head_dim: int, native_attention: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill and decode over scattered blocks; decode through the native kernel (which reads the cache in
    place) or the torch gather + matmuls."""
    if native_attention and not native.available():
        pytest.skip("the native kernels do not build here (no C compiler?)")
    native_calls: list[bool] = []
    kernel = native.decode_attention

    def counted(*args: object, **kw: object) -> bool:
        native_calls.append(kernel(*args, **kw))  # type: ignore[arg-type]
        return native_calls[-1]

    monkeypatch.setattr(native, "decode_attention", counted)
    g = torch.Generator().manual_seed(block_size)
    # per sequence: chunks fed per step (prefill, chunked prefill, decode-only, late joiner)
    schedules = [[7, 1, 1, 1], [3, 4, 5, 1], [1, 1, 1, 1], [0, 0, 9, 1], [20, 1]]
    lengths = [sum(s) for s in schedules]
    spec = dataclasses.replace(SPEC, head_dim=head_dim)
    heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    qs = [torch.randn(n, heads, dim, generator=g) for n in lengths]
    ks = [torch.randn(n, kv_heads, dim, generator=g) for n in lengths]
    vs = [torch.randn(n, kv_heads, dim, generator=g) for n in lengths]

    kv = PagedKVCache(spec, 64, block_size=block_size)
    assert kv.native_attention  # on by default for fp32 on CPU
    kv.native_attention = native_attention
    for b in range(64):  # scatter the free list so tables are not contiguous
        kv.allocate(("x", b), 1)
    for b in torch.randperm(64, generator=g).tolist():
        kv.free(("x", b))
    fed = [0] * len(schedules)
    decode_steps = 0
    for step in range(max(len(s) for s in schedules)):
        batch = [(i, s[step]) for i, s in enumerate(schedules) if step < len(s) and s[step]]
        for i, n in batch:
            kv.append(i, n) if i in kv else kv.allocate(i, n)
        attn = kv.metadata([i for i, _ in batch], [n for _, n in batch])
        decode_steps += attn.decode_tokens.numel() > 0
        q, k, v = (torch.cat([xs[i][fed[i] : fed[i] + n] for i, n in batch]) for xs in (qs, ks, vs))
        for layer in range(SPEC.num_layers):  # layers must not see each other's K/V
            out = kv.attend(layer, q * (layer + 1), k, v, attn)
            for (i, n), start in zip(batch, attn.query_starts, strict=True):
                expected = _dense_attention(qs[i] * (layer + 1), ks[i], vs[i])[fed[i] : fed[i] + n]
                torch.testing.assert_close(out[start : start + n], expected, rtol=1e-5, atol=1e-5)
        for i, n in batch:
            fed[i] += n
    assert fed == lengths
    assert native_calls == ([True] * len(native_calls) if native_attention else [])  # never a silent fallback
    assert len(native_calls) == (SPEC.num_layers * decode_steps if native_attention else 0)
