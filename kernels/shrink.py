"""Triton kernel: paged multi-LoRA shrink.

Semantics (identical to `kernels.reference.lora_shrink`): for every segment s with a_offset[s] >= 0 and
r = rank[s] > 0, and every token t of s:

    out[t, :r] = x[t] @ A_s.T        A_s: [r, in], element (j, k) at
                                     pool[page_table[a_offset[s] + (j*in + k) // P], (j*in + k) % P]

Shapes:
    x:          [T, in]                  activations, pool dtype (fp16/bf16 on GPU, fp32 allowed), unit column stride
    pool:       [num_pages, P]           adapter pages (P elements each), contiguous
    page_table: [E] int32                physical page ids
    segments:   `kernels.meta.Segments`  S segments of consecutive tokens, cut into G tiles of <= 16 tokens
    a_offset:   [S] int32                page-table entry of the segment's first A page, -1 for no adapter
    rank:       [S] int32                rank of the segment's adapter for this (layer, module), 0 for none
    out:        [T, max_rank] float32    written at [t, :r] only; other entries are left unchanged

Grid: (G tiles, cdiv(max_rank, BLOCK_R)). Each program computes a [BLOCK_T, BLOCK_R] block of one tile,
looping over the in-features in BLOCK_K steps; A is gathered element-wise through the page table, so an
adapter's pages need not be contiguous. Accumulation is float32. All tl.dot operands are >= 16 in
every dimension (rank blocks are padded to 16 and masked), so the kernel compiles for tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import check_shrink_args
from kernels.meta import TOKEN_BLOCK, Segments


@triton.jit
def _shrink_kernel(
    x_ptr,
    pool_ptr,
    table_ptr,
    tile_seg_ptr,
    tile_start_ptr,
    tile_end_ptr,
    offset_ptr,
    rank_ptr,
    out_ptr,
    in_features,
    page_elems,
    stride_xm,
    stride_om,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    seg = tl.load(tile_seg_ptr + g)
    off = tl.load(offset_ptr + seg)
    r = tl.load(rank_ptr + seg)
    if (off >= 0) & (r0 < r):
        t0 = tl.load(tile_start_ptr + g)
        t1 = tl.load(tile_end_ptr + g)
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        mask_t = offs_t < t1
        offs_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        mask_r = offs_r < r
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            mask_k = offs_k < in_features
            xb = tl.load(
                x_ptr + offs_t[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                mask=mask_t[:, None] & mask_k[None, :],
                other=0.0,
            )  # [BLOCK_T, BLOCK_K]
            flat = offs_r[None, :] * in_features + offs_k[:, None]  # [BLOCK_K, BLOCK_R] element of A_s
            mask_a = mask_k[:, None] & mask_r[None, :]
            page = tl.load(table_ptr + off + flat // page_elems, mask=mask_a, other=0)
            at = tl.load(
                pool_ptr + page.to(tl.int64) * page_elems + flat % page_elems, mask=mask_a, other=0.0
            )  # [BLOCK_K, BLOCK_R] = A_s.T block
            acc += tl.dot(xb, at, input_precision=DOT_PRECISION)
        tl.store(
            out_ptr + offs_t[:, None].to(tl.int64) * stride_om + offs_r[None, :],
            acc,
            mask=mask_t[:, None] & mask_r[None, :],
        )


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    segments: Segments,
    a_offset: torch.Tensor,
    rank: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Launch the shrink kernel after checking shapes and dtypes (see module docstring)."""
    check_shrink_args(x, pool, page_table, segments, a_offset, rank, out)
    if segments.num_tiles == 0 or out.shape[1] == 0:
        return
    block_r = max(16, min(64, triton.next_power_of_2(out.shape[1])))
    block_k = max(16, min(64, triton.next_power_of_2(x.shape[1])))
    grid = (segments.num_tiles, triton.cdiv(out.shape[1], block_r))
    _shrink_kernel[grid](
        x,
        pool,
        page_table,
        segments.tile_seg,
        segments.tile_start,
        segments.tile_end,
        a_offset,
        rank,
        out,
        x.shape[1],
        pool.shape[1],
        x.stride(0),
        out.stride(0),
        BLOCK_T=TOKEN_BLOCK,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
