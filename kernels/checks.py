"""Argument checks shared by the kernel launchers and the reference (run before any launch)."""

from __future__ import annotations

import torch

from kernels.meta import Segments

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelArgumentError(ValueError):
    """A kernel argument has the wrong shape, dtype or device; the message carries the numbers."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise KernelArgumentError(message)


def _check_common(
    name: str,
    act: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    segments: Segments,
    offset: torch.Tensor,
    rank: torch.Tensor,
) -> None:
    _require(act.dim() == 2, f"{name}: activations must be 2-D [T, features], got shape {tuple(act.shape)}")
    _require(pool.dim() == 2, f"pool must be 2-D [num_pages, page_elems], got shape {tuple(pool.shape)}")
    _require(pool.is_contiguous(), "pool must be contiguous")
    _require(pool.dtype in FLOAT_DTYPES, f"pool dtype {pool.dtype} is not one of {FLOAT_DTYPES}")
    _require(page_table.dim() == 1, f"page_table must be 1-D, got shape {tuple(page_table.shape)}")
    _require(page_table.dtype == torch.int32, f"page_table dtype must be int32, got {page_table.dtype}")
    tokens = segments.num_tokens
    _require(act.shape[0] == tokens, f"{name} has {act.shape[0]} tokens but the segments cover {tokens}")
    s = segments.num_segments
    for label, t in (("offset", offset), ("rank", rank)):
        _require(t.shape == (s,), f"{label} must have shape ({s},), got {tuple(t.shape)}")
        _require(t.dtype == torch.int32, f"{label} dtype must be int32, got {t.dtype}")
    for label, t in (("page_table", page_table), ("offset", offset), ("rank", rank), ("seg", segments.tile_seg)):
        _require(t.device == pool.device, f"{label} is on {t.device} but the pool is on {pool.device}")
    _require(act.device == pool.device, f"{name} is on {act.device} but the pool is on {pool.device}")


def check_shrink_args(
    x: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    segments: Segments,
    a_offset: torch.Tensor,
    rank: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Check the arguments of `lora_shrink` (see kernels/shrink.py for their meaning)."""
    _check_common("x", x, pool, page_table, segments, a_offset, rank)
    _require(x.dtype == pool.dtype, f"x dtype {x.dtype} differs from pool dtype {pool.dtype}")
    _require(x.stride(1) == 1, f"x must have unit stride along features, got strides {x.stride()}")
    _require(out.dim() == 2 and out.shape[0] == x.shape[0], f"out must be [T={x.shape[0]}, max_rank], got {tuple(out.shape)}")
    _require(out.dtype == torch.float32, f"out dtype must be float32, got {out.dtype}")
    _require(out.stride(1) == 1, f"out must have unit stride along ranks, got strides {out.stride()}")
    _require(out.device == pool.device, f"out is on {out.device} but the pool is on {pool.device}")


def check_expand_args(
    h: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    segments: Segments,
    b_offset: torch.Tensor,
    rank: torch.Tensor,
    scale: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Check the arguments of `lora_expand` (see kernels/expand.py for their meaning)."""
    _check_common("h", h, pool, page_table, segments, b_offset, rank)
    _require(h.dtype == torch.float32, f"h dtype must be float32, got {h.dtype}")
    _require(h.stride(1) == 1, f"h must have unit stride along ranks, got strides {h.stride()}")
    s = segments.num_segments
    _require(scale.shape == (s,), f"scale must have shape ({s},), got {tuple(scale.shape)}")
    _require(scale.dtype == torch.float32, f"scale dtype must be float32, got {scale.dtype}")
    _require(y.dim() == 2 and y.shape[0] == h.shape[0], f"y must be [T={h.shape[0]}, out], got {tuple(y.shape)}")
    _require(y.dtype in FLOAT_DTYPES, f"y dtype {y.dtype} is not one of {FLOAT_DTYPES}")
    _require(y.device == pool.device, f"y is on {y.device} but the pool is on {pool.device}")
