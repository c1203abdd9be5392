"""The CPU path of the multi-LoRA update, used by the serving engine when there is no GPU.

Semantics (the same as `kernels.reference` shrink followed by expand): for every adapter slot k of the
batch with weights (a_t, bt, scale) and every token t bound to slot k,

    y[t] += scale * (x[t] @ a_t) @ bt          a_t = A.T: [in, r],  bt = B.T: [r, out]

Work is grouped by adapter, never per token: a slot whose tokens form one run of consecutive tokens is
computed on views of x and y (`Tensor.split` cuts every run in one call); a slot with several runs is
gathered once (`index_select`) and scattered back with `index_add_`. Weights are views into the pool
when the adapter's pages for that (layer, module) are contiguous, so nothing is copied per step.

Alternatives measured on 2 cores at SmolLM2-135M widths, 32 decode tokens with 32 distinct adapters of
ranks {8, 16, 32, 64}, all 7 modules, 30 layers (fp32): this per-slot loop on pool views ~120 ms/step, of
which ~40 ms is reading the 1.27 GB of adapter weights and the rest op overhead (~1.6 us per mm); padding
per rank bucket into [n, r_max, w] and `torch.bmm` ~520 ms/step because the gather copies every weight
every step; bf16 weights ~480 ms/step (small bf16 matmuls are slow on CPU). Hence the loop on views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# (a_t [in, r], bt [r, out], scale) of one adapter for one (layer, module).
LoraSlice = tuple[torch.Tensor, torch.Tensor, float]


@dataclass(frozen=True)
class CpuPlan:
    """How the tokens of one batch are grouped by adapter slot (built once per batch by `plan_cpu`).

    split_sizes: lengths of the S segments, in token order (they cover all T tokens)
    runs:        (slot, segment index) for every slot whose tokens are exactly one segment
    gathers:     (slot, token indices [n] int64) for every slot whose tokens span several segments
    """

    split_sizes: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    gathers: tuple[tuple[int, torch.Tensor], ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.split_sizes)


def plan_cpu(segment_slots: Sequence[int], lengths: Sequence[int]) -> CpuPlan:
    """Group segments by slot; ``segment_slots[s]`` is the adapter slot of segment s, or -1 for none."""
    by_slot: dict[int, list[int]] = {}
    for s, slot in enumerate(segment_slots):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(s)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    runs: list[tuple[int, int]] = []
    gathers: list[tuple[int, torch.Tensor]] = []
    for slot, segs in by_slot.items():
        if len(segs) == 1:
            runs.append((slot, segs[0]))
        else:
            idx = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in segs])  # [n]
            gathers.append((slot, idx))
    return CpuPlan(split_sizes=tuple(lengths), runs=tuple(runs), gathers=tuple(gathers))


def lora_apply_cpu(
    x: torch.Tensor, y: torch.Tensor, plan: CpuPlan, weights: Sequence[LoraSlice | None]
) -> None:
    """y[t] += scale * (x[t] @ a_t) @ bt for every token t of every slot with weights (in place).

    x:       [T, in]    activations
    y:       [T, out]   updated in place; may be a non-contiguous view (e.g. a column slice of a fused output)
    plan:    token grouping from `plan_cpu`
    weights: per slot, its `LoraSlice` for this (layer, module), or None when it does not adapt it
    """
    if x.shape[0] != plan.num_tokens or y.shape[0] != plan.num_tokens:
        raise ValueError(
            f"x has {x.shape[0]} tokens and y {y.shape[0]}, but the plan covers {plan.num_tokens}"
        )
    if plan.runs:
        xs = x.split(plan.split_sizes)
        ys = y.split(plan.split_sizes)
        for slot, seg in plan.runs:
            w = weights[slot]
            if w is None:
                continue
            a_t, bt, scale = w
            xa = xs[seg] if xs[seg].dtype == a_t.dtype else xs[seg].to(a_t.dtype)
            h = torch.mm(xa, a_t)  # [n, r]
            if ys[seg].dtype == bt.dtype:
                ys[seg].addmm_(h, bt, alpha=scale)
            else:
                ys[seg].add_(torch.mm(h, bt).to(ys[seg].dtype), alpha=scale)
    for slot, idx in plan.gathers:
        w = weights[slot]
        if w is None:
            continue
        a_t, bt, scale = w
        xg = x.index_select(0, idx).to(a_t.dtype)  # [n, in]
        delta = torch.mm(torch.mm(xg, a_t), bt)  # [n, out]
        y.index_add_(0, idx, delta.to(y.dtype), alpha=scale)
