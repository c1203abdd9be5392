"""The CPU path of the multi-LoRA update, used by the serving engine when there is no GPU.

Semantics (the same as `kernels.reference` shrink followed by expand): for every adapter slot k of the
batch with weights (a_t, bt, scale) and every token t bound to slot k,

    y[t] += scale * (x[t] @ a_t) @ bt          a_t = A.T: [in, r],  bt = B.T: [r, out]

Two implementations, picked per slot by `plan_cpu` (the pool binds a batch once per step):

- the native kernel (kernels/native.py, kernels/native/cpu_kernels.c) for slots with at most
  `NATIVE_MAX_TOKENS` tokens in the batch (decode): one call per (layer, module) for all of them, reading
  every adapter's A and B.T straight from the pool pages (fp32 or bf16) on both cores;
- `lora_apply_cpu` below for the others (prefill), and for everything when the kernel is off or cannot
  be built: torch.mm per slot, grouped by adapter, never per token. A slot whose tokens form one run of
  consecutive tokens is computed on views of x and y (`Tensor.split` cuts every run in one call); a slot
  with several runs is gathered once (`index_select`) and scattered back with `index_add_`. Weights are
  views into the pool when the adapter's pages for that (layer, module) are contiguous; bf16 / fp16
  weights are widened to fp32 per call (never the activations narrowed).

Measured on 2 cores (Xeon, AVX-512) at SmolLM2-135M widths, one decode step's LoRA work through
`AdapterPool.bind` / `BoundBatch.apply`: 32 tokens, all 7 modules of 30 layers, adapters of ranks
{8, 16, 32, 64}, L3 flushed before each run as a decode step's backbone does (median of 5):

    adapters in the batch (mean rank)      32 (32.5)    8 (49)       1 (64)
    adapter bytes per step, fp32 / bf16    1.27 / 0.64  0.48 / 0.24  0.08 / 0.04 GB
    torch.mm loop on pool views, fp32      128 ms       67 ms        14.0 ms
    torch.mm loop, bf16 pool (widened)     187 ms       77 ms        17.2 ms
    native kernel, fp32 pool                52 ms       26 ms        12.3 ms
    native kernel, bf16 pool                33 ms       15 ms        11.8 ms

The torch loop pays ~1.6 us per mm for 13,440 small matmuls a step at 32 adapters; the native kernel is
bound by reading the weights there (20-25 GB/s of a ~29 GB/s machine), so bf16 pages nearly halve it;
with one adapter it is bound by multiply-adds (~110 GFLOP/s on 2 cores). End to end (bench/engine.py,
median decode step, 1 / 8 / 32 adapters): LoRA overhead +11% / +14% / +28% on bf16 pages, +12% / +27% /
+55% on fp32 pages, against +19% / +47% / +101% for the torch loop on fp32 pages. Earlier alternatives: padding per
rank bucket into [n, r_max, w] and `torch.bmm` ~520 ms/step (the gather copies every weight every step);
bf16 torch.mm on bf16 weights ~480 ms/step (small bf16 matmuls are slow on CPU).

NATIVE_MAX_TOKENS: per projection call with one slot of n tokens, the kernel is faster than torch.mm or
level with it up to n = 64 on fp32 pages (MKL's GEMM is 5-10% ahead from ~96 on at rank 64) and up to
n = 128 on bf16 pages, where torch must widen the weights first; 64 keeps prefill chunks on MKL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.native import NativeTokens

# (a_t [in, r], bt [r, out], scale) of one adapter for one (layer, module).
LoraSlice = tuple[torch.Tensor, torch.Tensor, float]

# Slots with at most this many tokens go to the native kernel (when it is in use), larger ones to
# torch.mm; see the module docstring for the measurement behind it.
NATIVE_MAX_TOKENS = 64


@dataclass(frozen=True)
class CpuPlan:
    """How the tokens of one batch are grouped by adapter slot (built once per batch by `plan_cpu`).

    split_sizes: lengths of the S segments, in token order (they cover all T tokens)
    runs:        (slot, segment index) for every torch-path slot whose tokens are exactly one segment
    gathers:     (slot, token indices [n] int64) for every torch-path slot whose tokens span several
                 segments
    native:      the slots left to the native kernel and their tokens (None: every slot takes the torch
                 path)
    """

    split_sizes: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    gathers: tuple[tuple[int, torch.Tensor], ...]
    native: NativeTokens | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.split_sizes)

    @property
    def torch_slots(self) -> list[int]:
        """Slots that `lora_apply_cpu` computes (the others are the native kernel's or have no tokens)."""
        return [slot for slot, _ in self.runs] + [slot for slot, _ in self.gathers]


def plan_cpu(segment_slots: Sequence[int], lengths: Sequence[int], *, native_max_tokens: int = 0) -> CpuPlan:
    """Group segments by slot; ``segment_slots[s]`` is the adapter slot of segment s, or -1 for none.

    Slots with at most ``native_max_tokens`` tokens are left to the native kernel (0: none are).
    """
    by_slot: dict[int, list[int]] = {}
    for s, slot in enumerate(segment_slots):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(s)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    runs: list[tuple[int, int]] = []
    gathers: list[tuple[int, torch.Tensor]] = []
    native_slots: list[int] = []
    tok_ptr = [0]
    tok_idx: list[int] = []
    for slot, segs in by_slot.items():
        if sum(lengths[s] for s in segs) <= native_max_tokens:
            native_slots.append(slot)
            for s in segs:
                tok_idx.extend(range(starts[s], starts[s + 1]))
            tok_ptr.append(len(tok_idx))
        elif len(segs) == 1:
            runs.append((slot, segs[0]))
        else:
            idx = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in segs])  # [n]
            gathers.append((slot, idx))
    native = None
    if native_max_tokens > 0:
        native = NativeTokens(
            slots=torch.tensor(native_slots, dtype=torch.int32),
            tok_ptr=torch.tensor(tok_ptr, dtype=torch.int32),
            tok_idx=torch.tensor(tok_idx, dtype=torch.int32),
        )
    return CpuPlan(split_sizes=tuple(lengths), runs=tuple(runs), gathers=tuple(gathers), native=native)


def lora_apply_cpu(
    x: torch.Tensor, y: torch.Tensor, plan: CpuPlan, weights: Sequence[LoraSlice | None]
) -> None:
    """y[t] += scale * (x[t] @ a_t) @ bt for every token t of every torch-path slot with weights (in place).

    x:       [T, in]    activations
    y:       [T, out]   updated in place; may be a non-contiguous view (e.g. a column slice of a fused output)
    plan:    token grouping from `plan_cpu` (its native slots are not touched here)
    weights: per slot, its `LoraSlice` for this (layer, module), or None when it does not adapt it

    Products are computed in the wider of x's and the weights' dtypes: bf16 weights with fp32
    activations are widened (a copy per call), never the activations narrowed.
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
            a_t, bt, scale = _widened(w, x.dtype)
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
        a_t, bt, scale = _widened(w, x.dtype)
        xg = x.index_select(0, idx).to(a_t.dtype)  # [n, in]
        delta = torch.mm(torch.mm(xg, a_t), bt)  # [n, out]
        y.index_add_(0, idx, delta.to(y.dtype), alpha=scale)


def _widened(w: LoraSlice, activation: torch.dtype) -> LoraSlice:
    """The slice in the wider of its dtype and the activations' (a copy only when it must widen)."""
    a_t, bt, scale = w
    dtype = torch.promote_types(a_t.dtype, activation)
    if a_t.dtype == dtype:
        return w
    return a_t.to(dtype), bt.to(dtype), scale
