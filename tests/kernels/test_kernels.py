"""Triton shrink/expand (interpreter) and the torch reference against a dense per-adapter computation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kernels import KernelArgumentError, make_segments, reference
from kernels.expand import lora_expand
from kernels.shrink import lora_shrink

RANKS = (1, 3, 8, 16, 33, 64, 128)


@dataclass
class Case:
    x: torch.Tensor  # [T, in]
    pool: torch.Tensor  # [num_pages, P]
    page_table: torch.Tensor  # [E] int32
    lengths: list[int]
    a_offset: torch.Tensor  # [S] int32
    b_offset: torch.Tensor  # [S] int32
    rank: torch.Tensor  # [S] int32
    scale: torch.Tensor  # [S] float32
    expected_delta: torch.Tensor  # [T, out] float32, dense per-adapter result
    max_rank: int


def build_case(
    seg_adapters: list[int],
    lengths: list[int],
    ranks: list[int],
    *,
    in_f: int = 64,
    out_f: int = 32,
    page_elems: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    """Adapters with the given ranks stored on shuffled (non-contiguous) pages; segments reference them."""
    g = torch.Generator().manual_seed(seed)
    mats = [
        (torch.randn(r, in_f, generator=g).to(dtype), torch.randn(r, out_f, generator=g).to(dtype), 0.5 + i / 8)
        for i, r in enumerate(ranks)
    ]
    counts = [(-(-r * in_f // page_elems), -(-r * out_f // page_elems)) for r in ranks]
    total = sum(a + b for a, b in counts) + 5
    physical = torch.randperm(total, generator=g)
    pool = torch.zeros(total, page_elems, dtype=dtype)
    table: list[int] = []
    offsets: list[tuple[int, int]] = []
    for (a, bt, _), (na, nb) in zip(mats, counts, strict=True):
        pair = []
        for mat, n in ((a, na), (bt, nb)):
            pages = physical[len(table) : len(table) + n]
            pair.append(len(table))
            flat = torch.zeros(n * page_elems, dtype=dtype)
            flat[: mat.numel()] = mat.reshape(-1)
            pool[pages] = flat.view(n, page_elems)
            table.extend(pages.tolist())
        offsets.append((pair[0], pair[1]))
    t = sum(lengths)
    x = torch.randn(t, in_f, generator=g).to(dtype)
    delta = torch.zeros(t, out_f)
    start = 0
    for k, n in zip(seg_adapters, lengths, strict=True):
        if k >= 0:
            a, bt, s = mats[k]
            delta[start : start + n] = s * (x[start : start + n].float() @ a.float().T) @ bt.float()
        start += n

    def per_seg(values: list, none: float | int, dt: torch.dtype) -> torch.Tensor:
        return torch.tensor([values[k] if k >= 0 else none for k in seg_adapters], dtype=dt)

    return Case(
        x=x,
        pool=pool,
        page_table=torch.tensor(table, dtype=torch.int32),
        lengths=lengths,
        a_offset=per_seg([o[0] for o in offsets], -1, torch.int32),
        b_offset=per_seg([o[1] for o in offsets], -1, torch.int32),
        rank=per_seg(ranks, 0, torch.int32),
        scale=per_seg([m[2] for m in mats], 0.0, torch.float32),
        expected_delta=delta,
        max_rank=max(ranks),
    )


def run(case: Case, impl: str, out_f: int) -> torch.Tensor:
    shrink, expand = (lora_shrink, lora_expand) if impl == "triton" else (reference.lora_shrink, reference.lora_expand)
    segs = make_segments(case.lengths)
    h = torch.zeros(case.x.shape[0], case.max_rank)
    y0 = torch.randn(case.x.shape[0], out_f).to(case.x.dtype)
    y = y0.clone()
    shrink(case.x, case.pool, case.page_table, segs, case.a_offset, case.rank, h)
    expand(h, case.pool, case.page_table, segs, case.b_offset, case.rank, case.scale, y)
    return (y.float() - y0.float())


# name -> (segment adapters, segment lengths, adapter ranks)
TRAFFIC = {
    "distinct_decode": (list(range(7)), [1] * 7, list(RANKS)),
    "popular_decode": ([0, 1, 2, 0, 1, 2, 0, 0, 2, 1], [1] * 10, [8, 33, 128]),
    "one_adapter_prefill": ([0], [37], [16]),
    "no_adapter": ([-1, -1], [5, 1], [8]),
    "mixed_with_none": ([0, -1, 1, -1, 2, 3], [19, 2, 1, 1, 1, 17], [3, 64, 1, 128]),
    "prefill_and_decode": ([0, 1, 2, 3, 4, 5, 6], [20, 1, 1, 3, 1, 16, 1], list(RANKS)),
}


@pytest.mark.parametrize("name", sorted(TRAFFIC))
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_matches_dense_fp32(name: str, impl: str) -> None:
    seg_adapters, lengths, ranks = TRAFFIC[name]
    case = build_case(seg_adapters, lengths, ranks)
    got = run(case, impl, 32)
    torch.testing.assert_close(got, case.expected_delta, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("in_f", "out_f", "page_elems"),
    [(32, 64, 16), (64, 32, 40), (48, 80, 7)],  # page sizes that do not divide the widths straddle rows
)
def test_triton_widths_and_page_sizes(in_f: int, out_f: int, page_elems: int) -> None:
    case = build_case([0, 1, -1, 2], [3, 1, 2, 18], [5, 64, 17], in_f=in_f, out_f=out_f, page_elems=page_elems)
    got = run(case, "triton", out_f)
    torch.testing.assert_close(got, case.expected_delta, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_triton_half_precision_matches_reference(dtype: torch.dtype) -> None:
    seg_adapters, lengths, ranks = TRAFFIC["prefill_and_decode"]
    case = build_case(seg_adapters, lengths, ranks, dtype=dtype)
    got = run(case, "triton", 32)
    ref = run(case, "reference", 32)
    # y is stored in fp16 (and h is rounded to fp16 inside the kernel), so compare relative to magnitude
    scale = case.expected_delta.abs().max()
    assert (got - ref).abs().max() <= 2e-2 * scale
    assert (got - case.expected_delta).abs().max() <= 2e-2 * scale


def test_expand_into_column_slice_of_fused_output() -> None:
    case = build_case([0, 1], [2, 17], [8, 33])
    segs = make_segments(case.lengths)
    h = torch.zeros(19, case.max_rank)
    lora_shrink(case.x, case.pool, case.page_table, segs, case.a_offset, case.rank, h)
    fused = torch.randn(19, 96)
    before = fused.clone()
    lora_expand(h, case.pool, case.page_table, segs, case.b_offset, case.rank, case.scale, fused[:, 40:72])
    torch.testing.assert_close(fused[:, 40:72] - before[:, 40:72], case.expected_delta, rtol=1e-4, atol=1e-3)
    assert torch.equal(fused[:, :40], before[:, :40]) and torch.equal(fused[:, 72:], before[:, 72:])


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("x_dtype", torch.float16),
        ("out_dtype", torch.float16),
        ("rank_len", 3),
        ("tokens", 5),
    ],
)
def test_launcher_rejects_bad_arguments(field: str, bad: object) -> None:
    case = build_case([0, 1], [2, 2], [4, 8])
    segs = make_segments(case.lengths)
    x, h, rank = case.x, torch.zeros(4, 8), case.rank
    if field == "x_dtype":
        x = x.to(bad)
    elif field == "out_dtype":
        h = h.to(bad)
    elif field == "rank_len":
        rank = torch.zeros(bad, dtype=torch.int32)
    elif field == "tokens":
        x = torch.randn(bad, 64)
    with pytest.raises(KernelArgumentError):
        lora_shrink(x, case.pool, case.page_table, segs, case.a_offset, rank, h)
