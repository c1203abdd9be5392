"""Triton kernel: paged multi-LoRA expand.

Semantics (identical to `kernels.reference.lora_expand`): for every segment s with b_offset[s] >= 0 and
r = rank[s] > 0, and every token t of s:

    y[t] += scale[s] * h[t, :r] @ B_s.T      B_s.T: [r, out], element (j, n) at
                                             pool[page_table[b_offset[s] + (j*out + n) // P], (j*out + n) % P]

Shapes:
    h:          [T, max_rank] float32    shrink output (cast to the pool dtype for the dot, as punica does)
    pool:       [num_pages, P]           adapter pages (P elements each), contiguous
    page_table: [E] int32                physical page ids
    segments:   `kernels.meta.Segments`  S segments, G tiles of <= 16 tokens
    b_offset:   [S] int32                page-table entry of the segment's first B.T page, -1 for no adapter
    rank:       [S] int32                rank, 0 for none
    scale:      [S] float32              alpha / r (or alpha / sqrt(r)) of the segment's adapter
    y:          [T, out]                 updated in place; any strides (a column slice of a fused output works)

Grid: (G tiles, cdiv(out, BLOCK_N)). Each program owns a [BLOCK_T, BLOCK_N] block of y, loops over the
rank in BLOCK_R (>= 16, masked) steps and accumulates in float32; tiles never share tokens, so no
atomics are needed. Rows of tokens without an adapter are not touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import check_expand_args
from kernels.meta import TOKEN_BLOCK, Segments


@triton.jit
def _expand_kernel(
    h_ptr,
    pool_ptr,
    table_ptr,
    tile_seg_ptr,
    tile_start_ptr,
    tile_end_ptr,
    offset_ptr,
    rank_ptr,
    scale_ptr,
    y_ptr,
    out_features,
    page_elems,
    stride_hm,
    stride_ym,
    stride_yn,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    seg = tl.load(tile_seg_ptr + g)
    off = tl.load(offset_ptr + seg)
    r = tl.load(rank_ptr + seg)
    if (off >= 0) & (r > 0):
        scale = tl.load(scale_ptr + seg)
        t0 = tl.load(tile_start_ptr + g)
        t1 = tl.load(tile_end_ptr + g)
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        mask_t = offs_t < t1
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        mask_n = offs_n < out_features
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, r, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
            mask_r = offs_r < r
            hb = tl.load(
                h_ptr + offs_t[:, None].to(tl.int64) * stride_hm + offs_r[None, :],
                mask=mask_t[:, None] & mask_r[None, :],
                other=0.0,
            )  # [BLOCK_T, BLOCK_R] float32
            flat = offs_r[:, None] * out_features + offs_n[None, :]  # [BLOCK_R, BLOCK_N] element of B_s.T
            mask_b = mask_r[:, None] & mask_n[None, :]
            page = tl.load(table_ptr + off + flat // page_elems, mask=mask_b, other=0)
            bt = tl.load(pool_ptr + page.to(tl.int64) * page_elems + flat % page_elems, mask=mask_b, other=0.0)
            acc += tl.dot(hb.to(bt.dtype), bt, input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        mask_y = mask_t[:, None] & mask_n[None, :]
        yb = tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yb + scale * acc).to(y_ptr.dtype.element_ty), mask=mask_y)


def lora_expand(
    h: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    segments: Segments,
    b_offset: torch.Tensor,
    rank: torch.Tensor,
    scale: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Launch the expand kernel after checking shapes and dtypes (see module docstring)."""
    check_expand_args(h, pool, page_table, segments, b_offset, rank, scale, y)
    if segments.num_tiles == 0 or y.shape[1] == 0:
        return
    block_r = max(16, min(32, triton.next_power_of_2(h.shape[1])))
    block_n = max(16, min(64, triton.next_power_of_2(y.shape[1])))
    grid = (segments.num_tiles, triton.cdiv(y.shape[1], block_n))
    _expand_kernel[grid](
        h,
        pool,
        page_table,
        segments.tile_seg,
        segments.tile_start,
        segments.tile_end,
        b_offset,
        rank,
        scale,
        y,
        y.shape[1],
        pool.shape[1],
        h.stride(0),
        y.stride(0),
        y.stride(1),
        BLOCK_T=TOKEN_BLOCK,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if pool.dtype == torch.float32 else "tf32",
    )
