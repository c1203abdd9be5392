"""Plain torch reference of the paged multi-LoRA kernels (same signatures and names as the Triton ones).

Semantics, for every segment s whose offset is >= 0 and rank r = rank[s] > 0, and every token t in it:

    lora_shrink:  out[t, :r]  = x[t] @ A_s.T                 (A_s: [r, in],  read through the page table)
    lora_expand:  y[t]       += scale[s] * h[t, :r] @ B_s.T  (B_s: [out, r], stored as B_s.T [r, out])

A tensor of r rows of width w starting at page-table entry ``off`` is stored row-major over the pages
``page_table[off], page_table[off + 1], ...``: element (j, k) lives at
``pool[page_table[off + (j*w + k) // P], (j*w + k) % P]`` with P = pool.shape[1] (elements per page).
Other entries of ``out`` and rows of ``y`` are left unchanged. Accumulation is in float32.
"""

from __future__ import annotations

import torch

from kernels.checks import check_expand_args, check_shrink_args
from kernels.meta import Segments


def gather_rows(pool: torch.Tensor, page_table: torch.Tensor, offset: int, rows: int, width: int) -> torch.Tensor:
    """The [rows, width] tensor stored from page-table entry ``offset`` on (a copy, in pool dtype)."""
    page_elems = pool.shape[1]
    n = rows * width
    num_pages = -(-n // page_elems)
    pages = page_table[offset : offset + num_pages].long()  # [num_pages]
    return pool.index_select(0, pages).reshape(-1)[:n].view(rows, width)


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    segments: Segments,
    a_offset: torch.Tensor,
    rank: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[t, :r] = x[t] @ A.T per segment.

    x:          [T, in]                    activations (pool dtype)
    pool:       [num_pages, page_elems]    adapter pages
    page_table: [E] int32                  page ids, see module docstring
    a_offset:   [S] int32                  page-table entry of the segment's A, -1 for none
    rank:       [S] int32                  the segment adapter's rank for this (layer, module), 0 for none
    out:        [T, max_rank] float32      written in place
    """
    check_shrink_args(x, pool, page_table, segments, a_offset, rank, out)
    starts = segments.seg_start.tolist()
    for s, (off, r) in enumerate(zip(a_offset.tolist(), rank.tolist(), strict=True)):
        if off < 0 or r <= 0:
            continue
        a = gather_rows(pool, page_table, off, r, x.shape[1]).float()  # [r, in]
        t0, t1 = starts[s], starts[s + 1]
        out[t0:t1, :r] = x[t0:t1].float() @ a.T


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
    """y[t] += scale * h[t, :r] @ B.T per segment.

    h:          [T, max_rank] float32      shrink output
    pool:       [num_pages, page_elems]    adapter pages
    page_table: [E] int32                  page ids, see module docstring
    b_offset:   [S] int32                  page-table entry of the segment's B.T ([r, out]), -1 for none
    rank:       [S] int32                  rank, 0 for none
    scale:      [S] float32                the adapter's scale for this (layer, module)
    y:          [T, out]                   updated in place (may be a strided view)
    """
    check_expand_args(h, pool, page_table, segments, b_offset, rank, scale, y)
    starts = segments.seg_start.tolist()
    for s, (off, r, sc) in enumerate(zip(b_offset.tolist(), rank.tolist(), scale.tolist(), strict=True)):
        if off < 0 or r <= 0:
            continue
        bt = gather_rows(pool, page_table, off, r, y.shape[1]).float()  # [r, out]
        t0, t1 = starts[s], starts[s + 1]
        y[t0:t1] = (y[t0:t1].float() + sc * (h[t0:t1, :r] @ bt)).to(y.dtype)
