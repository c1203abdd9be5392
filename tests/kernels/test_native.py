"""The native CPU kernel on its own (descriptor tables built here), its build cache and its fallbacks.

The pool-level tests (traffic shapes at the default model's widths, fragmented pools, fp32 and bf16
pools, fused q/k/v slices) are in test_cpu.py; here the kernel meets odd widths, every token count from
1 to past the register-blocked path, ranks 1..128, paged tensors, row strides and one or two threads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from kernels import native
from workers.adapter_pool import adapter_pool_dtype

PAGE = 16  # elements per page of the synthetic pools below


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    loaded = native.library()
    if loaded is None:
        pytest.skip("the native kernel does not build here (no C compiler?)")
    return loaded


class Table:
    """A synthetic pool and one (layer, module) of descriptors: slot k has A [r_k, fin] and B.T [r_k, fout]
    (rank 0: not adapted). Paged tensors lie on shuffled pages at the front of the storage, the others
    one after the other behind them."""

    def __init__(self, ranks: list[int], fin: int, fout: int, dtype: torch.dtype, paged: list[bool], seed: int):
        g = torch.Generator().manual_seed(seed)
        # what the pool holds: rounded to its dtype
        self.a = [(torch.randn(r, fin, generator=g) / fin**0.5).to(dtype).float() for r in ranks]
        self.bt = [torch.randn(r, fout, generator=g).to(dtype).float() for r in ranks]
        self.scale = torch.rand(len(ranks), generator=g) + 0.5
        tensors = [(k, field, t) for k in range(len(ranks)) for field, t in ((0, self.a[k]), (1, self.bt[k]))]
        num_pages = sum(-(-t.numel() // PAGE) for k, _, t in tensors if paged[k])
        contiguous = sum(t.numel() for k, _, t in tensors if not paged[k])
        self.storage = torch.zeros(num_pages * PAGE + contiguous, dtype=dtype)
        order = torch.randperm(num_pages, generator=g).to(torch.int64)
        self.desc = torch.zeros(len(ranks), native.DESC_FIELDS, dtype=torch.int64)
        self.desc[:, 4] = torch.tensor(ranks)
        self.page_lists: list[torch.Tensor] = []  # kept alive: the descriptors hold their addresses
        next_page, offset = 0, num_pages * PAGE
        for k, field, t in tensors:
            n = t.numel()
            if paged[k]:
                count = -(-n // PAGE)
                pages = order[next_page : next_page + count].clone()
                next_page += count
                for i, page in enumerate(pages.tolist()):
                    chunk = t.reshape(-1)[i * PAGE : (i + 1) * PAGE]
                    self.storage[page * PAGE : page * PAGE + chunk.numel()] = chunk.to(dtype)
                self.page_lists.append(pages)
                self.desc[k, field] = -1
                self.desc[k, field + 2] = pages.data_ptr()
            else:
                self.storage[offset : offset + n] = t.reshape(-1).to(dtype)
                self.desc[k, field] = offset
                offset += n

    def expected(self, x: torch.Tensor, tokens: list[list[int]], slots: list[int], fout: int) -> torch.Tensor:
        out = torch.zeros(x.shape[0], fout, dtype=torch.float64)
        for slot, toks in zip(slots, tokens, strict=True):
            if not toks or self.a[slot].shape[0] == 0:
                continue
            xs = x[toks].double()
            out[toks] += float(self.scale[slot]) * (xs @ self.a[slot].double().T) @ self.bt[slot].double()
        return out


def native_tokens(slots: list[int], tokens: list[list[int]]) -> native.NativeTokens:
    ptr = [0]
    for toks in tokens:
        ptr.append(ptr[-1] + len(toks))
    return native.NativeTokens(
        slots=torch.tensor(slots, dtype=torch.int32),
        tok_ptr=torch.tensor(ptr, dtype=torch.int32),
        tok_idx=torch.tensor([t for toks in tokens for t in toks], dtype=torch.int32),
    )


def run(lib: ctypes.CDLL, table: Table, x: torch.Tensor, y: torch.Tensor, slots: list[int],
        tokens: list[list[int]], threads: int) -> None:
    batch = native.NativeBatch(
        lib, table.storage, PAGE, table.desc.unsqueeze(0), table.scale.unsqueeze(0),
        native_tokens(slots, tokens), threads=threads,
    )
    assert batch.takes(x, y)
    batch.apply(0, x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("fin", "fout"), [(576, 192), (37, 53), (64, 96), (1536, 576)])
def test_kernel_matches_dense_for_every_token_count(lib: ctypes.CDLL, dtype: torch.dtype, threads: int,
                                                    fin: int, fout: int) -> None:
    """Slots with 1..41 tokens (tiles of 4 tokens, the register-blocked expand past 4, tails), ranks 1..128
    (tiles of 4 rows and the rest), paged and contiguous tensors, a rank-0 slot, tokens interleaved."""
    ranks = [1, 3, 4, 7, 16, 33, 64, 128, 0, 5]
    counts = [1, 2, 3, 4, 5, 8, 41, 13, 2, 6]
    paged = [False, True, False, False, True, False, True, False, False, True]
    table = Table(ranks, fin, fout, dtype, paged, seed=fin + fout)
    total = sum(counts)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(1)).tolist()
    tokens, start = [], 0
    for n in counts:
        tokens.append(sorted(perm[start : start + n]))
        start += n
    slots = list(range(len(ranks)))
    x = torch.randn(total, fin, generator=torch.Generator().manual_seed(2))
    y0 = torch.randn(total, fout, generator=torch.Generator().manual_seed(3))
    y = y0.clone()
    run(lib, table, x, y, slots, tokens, threads)
    torch.testing.assert_close(y - y0, table.expected(x, tokens, slots, fout).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_reads_row_strided_x_and_writes_a_column_slice_of_y(lib: ctypes.CDLL, dtype: torch.dtype) -> None:
    table = Table([8, 16, 32], 64, 48, dtype, [False, True, False], seed=5)
    tokens, slots = [[0, 4], [1, 2, 5, 6, 7], [3]], [2, 0, 1]  # slots in any order, each named once
    wide_x = torch.randn(8, 100)
    x = wide_x[:, 10:74]  # row stride 100
    fused = torch.randn(8, 48 + 30)
    before = fused.clone()
    run(lib, table, x, fused[:, 30:], slots, tokens, threads=2)
    expected = table.expected(x.contiguous(), tokens, slots, 48).float()
    torch.testing.assert_close(fused[:, 30:] - before[:, 30:], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused[:, :30], before[:, :30])


def test_kernel_leaves_unlisted_tokens_and_slots_alone(lib: ctypes.CDLL) -> None:
    table = Table([4, 4], 32, 32, torch.float32, [False, False], seed=6)
    x, y = torch.randn(5, 32), torch.zeros(5, 32)
    run(lib, table, x, y, [1], [[1, 3]], threads=2)  # slot 0 and tokens 0, 2, 4 are not in the call
    assert y[[0, 2, 4]].abs().max() == 0
    torch.testing.assert_close(y, table.expected(x, [[1, 3]], [1], 32).float(), rtol=1e-5, atol=1e-5)


def test_batch_checks_its_tables(lib: ctypes.CDLL) -> None:
    table = Table([4], 32, 32, torch.float32, [False], seed=7)
    with pytest.raises(ValueError, match="slot"):
        native.NativeBatch(lib, table.storage, PAGE, table.desc.unsqueeze(0), table.scale.unsqueeze(0),
                           native_tokens([3], [[0]]))
    with pytest.raises(ValueError, match="float32/bfloat16"):
        native.NativeBatch(lib, table.storage.half(), PAGE, table.desc.unsqueeze(0), table.scale.unsqueeze(0),
                           native_tokens([0], [[0]]))
    batch = native.NativeBatch(lib, table.storage, PAGE, table.desc.unsqueeze(0), table.scale.unsqueeze(0),
                               native_tokens([0], [[0]]))
    assert not batch.takes(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(1, 32))
    assert not batch.takes(torch.zeros(2, 32), torch.zeros(32, 2).t())  # y with column stride 2


# ----------------------------------------------------------------------------------------- build


def test_one_openmp_runtime_shared_with_torch(lib: ctypes.CDLL) -> None:
    """The library's libgomp resolves to the one torch loaded: one thread pool, not two."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    runtimes = native.openmp_runtimes()
    assert len(runtimes) == 1, runtimes
    assert lib.lora_cpu_max_threads() == torch.get_num_threads()


def test_build_is_keyed_by_source_and_atomic(lib: ctypes.CDLL, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cc = native.compiler()
    assert cc is not None
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    target = native.library_path(cc)
    assert target.parent == tmp_path / "cache" and target.name.startswith("cpu_kernels-")
    errors: list[BaseException] = []

    def build() -> None:
        try:
            native.build(cc, target)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    builders = [threading.Thread(target=build) for _ in range(2)]  # two builds racing for one file
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    assert not errors
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary file left
    assert native._load(target).lora_cpu_abi() == native.ABI
    changed = tmp_path / "cpu_kernels.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native.library_path(cc) != target


def test_no_compiler_falls_back_with_one_log_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="kernels.native"):
        assert native.library() is None
        assert native.library() is None  # tried once
        assert not native.available()
    assert [r.getMessage() for r in caplog.records] == [
        "native LoRA kernel unavailable (no C compiler: set CC or install gcc); using the torch CPU path"
    ]


def test_failed_build_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    if native.compiler() is None:
        pytest.skip("no C compiler")
    bad = tmp_path / "cpu_kernels.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="kernels.native"):
        assert native.library() is None
    assert len(caplog.records) == 1 and "exited with" in caplog.records[0].getMessage()
    assert list((tmp_path / "cache").iterdir()) == []  # the failed build left nothing behind


def test_switch_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.enabled() and native.library() is None
    assert adapter_pool_dtype("auto", "cpu") == torch.float32  # no kernel: fp32 (no conversion per call)
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    assert native.enabled()


def test_auto_adapter_dtype() -> None:
    expected = torch.bfloat16 if native.available() else torch.float32
    assert adapter_pool_dtype("auto", "cpu") == expected
    assert adapter_pool_dtype("auto", torch.device("cuda")) == torch.float16
    assert adapter_pool_dtype("float32", "cpu") == torch.float32
    assert adapter_pool_dtype("bfloat16", "cpu") == torch.bfloat16
