"""Paged multi-LoRA kernels: shrink (x @ A.T) and expand (y += scale * h @ B.T) through a page table.

`lora_shrink` / `lora_expand` pick the device path: the Triton kernels (kernels/shrink.py,
kernels/expand.py) for CUDA tensors, the torch reference otherwise. The serving engine's CPU path is
kernels/cpu.py: the native C kernel (kernels/native.py, built on first use) for decode, `lora_apply_cpu`
(torch.mm on views of the pool, grouped by adapter) for prefill and when the native kernel is off.
Triton is imported only when a CUDA tensor is seen, so CPU workers never import it.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.checks import KernelArgumentError
from kernels.cpu import CpuPlan, LoraSlice, lora_apply_cpu, plan_cpu
from kernels.meta import TOKEN_BLOCK, SegmentLengthError, Segments, make_segments

__all__ = [
    "TOKEN_BLOCK",
    "CpuPlan",
    "KernelArgumentError",
    "LoraSlice",
    "SegmentLengthError",
    "Segments",
    "lora_apply_cpu",
    "lora_expand",
    "lora_shrink",
    "make_segments",
    "plan_cpu",
]


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    segments: Segments,
    a_offset: torch.Tensor,
    rank: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[t, :r] = x[t] @ A.T per segment; Triton on CUDA, reference elsewhere (see kernels/shrink.py)."""
    if pool.is_cuda:
        from kernels.shrink import lora_shrink as device_shrink

        device_shrink(x, pool, page_table, segments, a_offset, rank, out)
    else:
        reference.lora_shrink(x, pool, page_table, segments, a_offset, rank, out)


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
    """y[t] += scale * h[t, :r] @ B.T per segment; Triton on CUDA, reference elsewhere (see kernels/expand.py)."""
    if pool.is_cuda:
        from kernels.expand import lora_expand as device_expand

        device_expand(h, pool, page_table, segments, b_offset, rank, scale, y)
    else:
        reference.lora_expand(h, pool, page_table, segments, b_offset, rank, scale, y)
