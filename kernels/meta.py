"""Per-batch segment metadata shared by every LoRA kernel implementation.

A batch is the flattened token dimension [T] of one engine step. It is cut into *segments*: runs of
consecutive tokens that use the same adapter (a prefill of one request is one segment, each decoding
request is a segment of one token). Each segment carries, for the (layer, module) being computed,
the offset of its adapter's A and B^T into the page table, its rank and its scale; a segment without
an adapter (or whose adapter does not adapt that (layer, module)) has offset -1 and rank 0.

The Triton kernels iterate over *tiles*: at most ``TOKEN_BLOCK`` consecutive tokens of one segment, so
that a long prefill segment is split across programs and decode segments (one token) each get one.
Tiles are planned once per batch by `make_segments`, never per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Tokens per tile: the M dimension of every tl.dot in the kernels (tl.dot needs at least 16).
TOKEN_BLOCK = 16


class SegmentLengthError(ValueError):
    """A segment length is not positive."""

    def __init__(self, index: int, length: int) -> None:
        super().__init__(f"segment {index} has length {length}; segment lengths must be >= 1")
        self.index = index
        self.length = length


@dataclass(frozen=True)
class Segments:
    """Token segments of one batch and the tiles the Triton kernels run over.

    seg_start:  [S + 1] int32   token boundaries; segment s covers tokens seg_start[s] .. seg_start[s+1]-1
    tile_seg:   [G]     int32   segment of tile g
    tile_start: [G]     int32   first token of tile g
    tile_end:   [G]     int32   one past the last token of tile g (tile_end - tile_start <= TOKEN_BLOCK)
    lengths:    host copy of the S segment lengths (for the CPU path and the reference)
    """

    seg_start: torch.Tensor
    tile_seg: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_tiles(self) -> int:
        return int(self.tile_seg.shape[0])


def make_segments(
    lengths: Sequence[int], *, device: torch.device | str = "cpu", token_block: int = TOKEN_BLOCK
) -> Segments:
    """Build `Segments` (boundaries and tiles) from segment lengths, on ``device``."""
    for i, n in enumerate(lengths):
        if n < 1:
            raise SegmentLengthError(i, n)
    lens = torch.tensor(list(lengths), dtype=torch.int64)  # [S]
    seg_start = torch.zeros(len(lengths) + 1, dtype=torch.int64)  # [S + 1]
    torch.cumsum(lens, 0, out=seg_start[1:])
    tiles_per_seg = (lens + token_block - 1) // token_block  # [S]
    tile_seg = torch.repeat_interleave(torch.arange(len(lengths)), tiles_per_seg)  # [G]
    first_tile = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg  # [S]
    tile_rank_in_seg = torch.arange(tile_seg.shape[0]) - first_tile[tile_seg]  # [G]
    tile_start = seg_start[tile_seg] + tile_rank_in_seg * token_block  # [G]
    tile_end = torch.minimum(tile_start + token_block, seg_start[tile_seg + 1])  # [G]

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=torch.int32, device=device)

    return Segments(
        seg_start=dev(seg_start),
        tile_seg=dev(tile_seg),
        tile_start=dev(tile_start),
        tile_end=dev(tile_end),
        lengths=tuple(int(n) for n in lengths),
    )
