"""Paged adapter memory: one preallocated pool per device holding the A and B matrices of many LoRAs.

Page layout
-----------
The pool is a single tensor ``storage: [num_pages, page_elems]`` (one dtype, one device) under one byte
budget shared by every projection width. A *page* is a fixed number of elements, ``page_elems``, by
default the greatest common divisor of all projection widths (192 for SmolLM2-135M, whose widths are
576, 192 and 1536). Every (adapter, layer, module) stores two tensors, each row-major over its own
run of pages:

    A    [r, in]   (r rows of in_features)
    B.T  [r, out]  (B transposed: r rows of out_features)

A tensor of r rows of width w takes ceil(r*w / page_elems) pages; because page_elems divides every
width, that is exactly r*w / page_elems pages, so an adapter takes pages in proportion to its rank for
each (layer, module) it adapts, with no rounding and no padding to the maximum rank. The kernels
address element (j, k) through the page table (see kernels/reference.py), so pages need not be
contiguous: load and evict never compact.

Why one byte budget rather than one pool per row width: per-width pools must split the capacity by an
expected mix of modules and ranks, and whichever width class fills first wastes the others' free
pages. With one page unit that divides every width, any mix of modules, layers and ranks draws from
the same free pages and utilisation is limited only by the last adapter that does not fit (>= 98% in
`simulate_churn`, against ~50% for max-rank slots). Small pages cost page-table entries (4 bytes per
page_elems elements: 0.5% of fp32 weights at 192) but the allocator hands out *runs* of pages, best-fit
first, so most tensors lie on consecutive pages; the CPU path then reads them as plain views and only
tensors that straddle two runs are gathered.

Identity, place and state: an adapter is identified by its version key (a content hash string); its
place is its page table (`pages_of`); residency in this pool is `load` / `evict`, both idempotent. The
page tables are the only record on a worker of which adapters are on the device and how many pages each
holds (`resident_pages`): the engine's `ResidentAdapters` and the worker's `AdapterTiers` read it rather
than keeping their own copy.

Loading in stages
-----------------
`load` copies an adapter in on the calling thread. A worker brings adapters in while the engine decodes,
so the pool also loads in stages, each on the thread it suits:

    pending = pool.stage(key, weights)   # validate; pages needed; nothing changes       (any thread)
    pool.reserve(pending)                # claim free pages; batches cannot see them      (any thread)
    pool.write(pending)                  # convert, lay out and copy the weights in       (a worker thread)
    pool.publish(pending)                # a resident from now on: batches may bind it    (the batching thread)
    pool.cancel(pending)                 # any time before publish: the pages go back     (any thread)

A reserved page belongs to its pending load alone: the allocator does not hand it out again, `bind`
does not know the key (no batch reads the page while it is written) and `evict` does not see it (a
version still loading cannot be evicted). The allocation ledger (allocator and pending loads) is
changed under one lock; the residents change only in `publish` and `evict`, on the batching thread.
A cancel while the weights are being written is carried out by the writer when it finishes, so a page
is never freed under a copy. On CUDA `write` lays the weights out in pinned host memory and copies
them with one asynchronous copy per run of pages on a side stream, after the work queued before the
reservation (which may still read a victim's pages); `publish` makes the batching stream wait for that
copy (`wait_event`), so the host never blocks and the first step that uses the adapter runs after it.
On CPU `write` copies straight into the reserved pages.
"""

from __future__ import annotations

import ctypes
import logging
import math
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Literal

import torch

from kernels import CpuPlan, LoraSlice, Segments, lora_apply_cpu, make_segments, native, plan_cpu
from kernels.cpu import NATIVE_MAX_TOKENS
from storage.backbone import MODULES, BackboneSpec

logger = logging.getLogger(__name__)

DEFAULT_MAX_RANK = 128


# ----------------------------------------------------------------------------------------- errors


class AdapterPoolError(Exception):
    """Base class of adapter pool errors."""


class PoolFull(AdapterPoolError):
    """The adapter needs more free pages than the pool has; nothing was loaded."""

    def __init__(self, key: str, needed_pages: int, free_pages: int) -> None:
        super().__init__(f"adapter {key!r} needs {needed_pages} pages but only {free_pages} are free")
        self.key = key
        self.needed_pages = needed_pages
        self.free_pages = free_pages


class AdapterRankTooLarge(AdapterPoolError):
    """An adapted module has a rank outside 1..max_rank."""

    def __init__(self, rank: int, max_rank: int, layer: int | None = None, module: str | None = None) -> None:
        where = f" at layer {layer} {module}" if module is not None else ""
        super().__init__(f"rank {rank}{where} is outside 1..{max_rank}")
        self.rank = rank
        self.max_rank = max_rank
        self.layer = layer
        self.module = module


class AdapterShapeMismatch(AdapterPoolError):
    """A LoRA matrix does not have the shape the backbone requires."""

    def __init__(self, layer: int, module: str, matrix: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(f"layer {layer} {module} {matrix}: expected shape {expected}, got {got}")
        self.layer = layer
        self.module = module
        self.matrix = matrix
        self.expected = expected
        self.got = got


class UnknownModule(AdapterPoolError):
    """A module name is not one of the adaptable projections, or a layer is out of range."""

    def __init__(self, module: str, layer: int, num_layers: int) -> None:
        super().__init__(f"cannot adapt {module!r} at layer {layer}: modules are {MODULES}, layers 0..{num_layers - 1}")
        self.module = module
        self.layer = layer
        self.num_layers = num_layers


class AdapterNotLoaded(AdapterPoolError):
    """A batch refers to an adapter that is not resident in this pool."""

    def __init__(self, key: str) -> None:
        super().__init__(f"adapter {key!r} is not loaded in this pool")
        self.key = key


class AdapterLoading(AdapterPoolError):
    """A key is resident or has a pending load already; a second load of it is refused."""

    def __init__(self, key: str) -> None:
        super().__init__(f"adapter {key!r} is resident or being loaded already")
        self.key = key


class LoadCancelled(AdapterPoolError):
    """A pending load was cancelled (or its write failed): its pages are free again, nothing was published."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the load of adapter {key!r} was cancelled")
        self.key = key


class PoolTooSmall(AdapterPoolError):
    """The capacity does not hold a single page."""

    def __init__(self, capacity_bytes: int, page_bytes: int) -> None:
        super().__init__(f"capacity {capacity_bytes} bytes is smaller than one page of {page_bytes} bytes")
        self.capacity_bytes = capacity_bytes
        self.page_bytes = page_bytes


# ----------------------------------------------------------------------------------------- input format


@dataclass(frozen=True)
class ModuleLora:
    """LoRA weights of one (layer, module): delta(x) = scale * (x @ a.T) @ b.T.

    a:     [r, in_features]
    b:     [out_features, r]
    scale: alpha / r (or alpha / sqrt(r) for rsLoRA), computed by the caller
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


# (layer, module) -> weights; any subset of layers and of the seven projections.
LoraWeights = dict[tuple[int, str], ModuleLora]

Run = tuple[int, int]  # (first page, number of pages)


class PageAllocator:
    """Free-page bookkeeping as runs of consecutive pages (pure Python; no tensors).

    `allocate` prefers one run (best fit, so large runs stay whole); when no run is long enough and
    ``contiguous`` is False it takes the longest runs first, so an adapter is split into few pieces.
    Freed runs are merged with their free neighbours.
    """

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free_by_start: dict[int, int] = {0: num_pages} if num_pages > 0 else {}
        self._free_by_end: dict[int, int] = {num_pages: 0} if num_pages > 0 else {}
        self.free_pages = num_pages

    @property
    def free_runs(self) -> list[Run]:
        return sorted(self._free_by_start.items())

    def _take(self, start: int, n: int) -> None:
        length = self._free_by_start.pop(start)
        del self._free_by_end[start + length]
        if n < length:
            self._free_by_start[start + n] = length - n
            self._free_by_end[start + length] = start + n
        self.free_pages -= n

    def allocate(self, n: int, *, contiguous: bool = False, first_fit: bool = False) -> list[Run] | None:
        """Take n pages; returns their runs in logical order, or None (nothing taken) if they do not fit."""
        if n <= 0:
            return []
        if n > self.free_pages:
            return None
        fitting = [(start, length) for start, length in self._free_by_start.items() if length >= n]
        if fitting:
            start = min(fitting)[0] if first_fit else min(fitting, key=lambda run: (run[1], run[0]))[0]
            self._take(start, n)
            return [(start, n)]
        if contiguous:
            return None
        runs: list[Run] = []
        left = n
        for start, length in sorted(self._free_by_start.items(), key=lambda run: (-run[1], run[0])):
            take = min(length, left)
            self._take(start, take)
            runs.append((start, take))
            left -= take
            if left == 0:
                break
        return runs

    def free(self, runs: Iterable[Run]) -> None:
        """Return runs of pages (from `allocate`) to the free set."""
        for start, n in runs:
            if n <= 0:
                continue
            end = start + n
            self.free_pages += n
            left_start = self._free_by_end.pop(start, None)
            if left_start is not None:
                del self._free_by_start[left_start]
                start = left_start
            right_len = self._free_by_start.pop(end, None)
            if right_len is not None:
                del self._free_by_end[end + right_len]
                end = end + right_len
            self._free_by_start[start] = end - start
            self._free_by_end[end] = start


# ----------------------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class PoolStats:
    """Occupancy of the pool.

    capacity_bytes: bytes preallocated for pages (total_pages * page_bytes)
    reserved_bytes: bytes of pages owned by resident adapters
    live_bytes:     bytes of adapter weights stored (sum of r * (in + out) * itemsize); equals
                    reserved_bytes when page_elems divides every width
    utilisation:    live_bytes / capacity_bytes
    """

    capacity_bytes: int
    reserved_bytes: int
    live_bytes: int
    total_pages: int
    free_pages: int
    page_bytes: int
    adapters: int

    @property
    def utilisation(self) -> float:
        return self.live_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


@dataclass(frozen=True)
class _Fragmented:
    """A (layer, module) whose pages are not consecutive: gathered from the pool when used on CPU."""

    a_pages: torch.Tensor  # [pa] int64
    b_pages: torch.Tensor  # [pb] int64
    rank: int
    in_features: int
    out_features: int
    scale: float

    def gather(self, storage: torch.Tensor) -> LoraSlice:
        n_a, n_b = self.rank * self.in_features, self.rank * self.out_features
        a = storage.index_select(0, self.a_pages).view(-1)[:n_a].view(self.rank, self.in_features)
        bt = storage.index_select(0, self.b_pages).view(-1)[:n_b].view(self.rank, self.out_features)
        return a.t(), bt, self.scale


@dataclass
class _Resident:
    """One loaded adapter: its pages (page table), per-(layer, module) offsets, and CPU views."""

    key: str
    runs: list[Run]
    pages: torch.Tensor  # [N] int32, physical page of each logical page (CPU)
    a_offset: torch.Tensor  # [L, M] int32, logical page of A's first page, -1 where not adapted
    b_offset: torch.Tensor  # [L, M] int32, logical page of B.T's first page, -1 where not adapted
    rank: torch.Tensor  # [L, M] int32, 0 where not adapted
    scale: torch.Tensor  # [L, M] float32
    slices: list[LoraSlice | _Fragmented | None]  # [L * M] CPU weights, views into the pool where possible
    desc: torch.Tensor  # [L * M, native.DESC_FIELDS] int64, where the native kernel finds the weights
    live_bytes: int
    modules: frozenset[tuple[int, str]] = field(default_factory=frozenset)

    @property
    def num_pages(self) -> int:
        return int(self.pages.shape[0])


LoadState = Literal["staged", "reserved", "writing", "written", "published", "cancelled"]


@dataclass(eq=False)
class PendingLoad:
    """One adapter on its way into an `AdapterPool` (see "Loading in stages" in the module docstring).

    state: staged (validated, nothing held) -> reserved (`runs` claimed) -> writing -> written ->
    published (a resident), or cancelled from any state before published (pages free again).
    """

    key: str
    weights: LoraWeights = field(repr=False)
    num_pages: int
    rank: int  # largest rank of its modules
    state: LoadState = "staged"
    runs: list[Run] = field(default_factory=list)
    _resident: _Resident | None = field(default=None, repr=False)
    _cancel_requested: bool = field(default=False, repr=False)
    _after: Any = field(default=None, repr=False)  # CUDA event: work queued before the reservation
    _ready: Any = field(default=None, repr=False)  # CUDA event: the copy into the pages is done
    _host: torch.Tensor | None = field(default=None, repr=False)  # pinned staging buffer of the copy


Backend = Literal["cpu", "triton", "reference"]
AdapterDtype = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_pool_dtype(setting: AdapterDtype, device: torch.device | str) -> torch.dtype:
    """The pool dtype for a setting: "auto" is bfloat16 on CPU when the native kernel is available (a
    decode step reads every adapter of the batch once, so half the bytes is nearly half the time; the
    torch fallback would pay a conversion per call), float32 on CPU without it, float16 elsewhere.

    bfloat16 is exact for adapters saved in bfloat16 and rounds fp32 and fp16 ones to bfloat16's 8
    significant bits."""
    if setting != "auto":
        return _DTYPES[setting]
    if torch.device(device).type != "cpu":
        return torch.float16
    return torch.bfloat16 if native.available() else torch.float32


class AdapterPool:
    """A preallocated, paged store of LoRA adapters on one device (see module docstring for the layout).

    spec:           the backbone's layers and projection widths
    capacity_bytes: bytes of the page storage (rounded down to whole pages)
    device, dtype:  storage placement; dtype defaults to float32 on CPU and float16 elsewhere. On CPU the
                    native kernel reads float32 and bfloat16 pages directly; the torch path widens
                    bfloat16 / float16 weights to the activations' dtype per call
    max_rank:       largest accepted rank (1..max_rank)
    page_elems:     elements per page; default gcd of all projection widths (no rounding waste)
    """

    def __init__(
        self,
        spec: BackboneSpec,
        capacity_bytes: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_rank: int = DEFAULT_MAX_RANK,
        page_elems: int | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.float16)
        self.max_rank = max_rank
        self.module_shapes = spec.module_shapes()
        self.module_index = {m: i for i, m in enumerate(MODULES)}
        widths = [w for shape in self.module_shapes.values() for w in shape]
        self.page_elems = page_elems or reduce(math.gcd, widths)
        self.page_bytes = self.page_elems * torch.tensor([], dtype=self.dtype).element_size()
        num_pages = capacity_bytes // self.page_bytes
        if num_pages < 1:
            raise PoolTooSmall(capacity_bytes, self.page_bytes)
        self.storage = torch.zeros(num_pages, self.page_elems, dtype=self.dtype, device=self.device)
        self._flat = self.storage.view(-1)  # [num_pages * page_elems]
        self._allocator = PageAllocator(num_pages)
        self._residents: dict[str, _Resident] = {}
        self._arena: tuple[torch.Tensor, dict[str, int]] | None = None  # (page table, key -> base)
        self._pending: dict[str, PendingLoad] = {}  # reserved and not yet published, by key
        self._lock = threading.Lock()  # the allocation ledger: allocator, pending loads, residents' runs
        self._stream: Any = None  # CUDA: the side stream of pending loads' copies

    # ------------------------------------------------------------------ sizing

    def pages_for(self, rows: int, width: int) -> int:
        """Pages taken by a tensor of ``rows`` rows of ``width`` elements."""
        return -(-rows * width // self.page_elems)

    def pages_needed(self, weights: LoraWeights) -> int:
        """Pages an adapter would take (validating it first)."""
        self._validate(weights)
        total = 0
        for (_, module), w in weights.items():
            fin, fout = self.module_shapes[module]
            total += self.pages_for(w.rank, fin) + self.pages_for(w.rank, fout)
        return total

    def _validate(self, weights: LoraWeights) -> None:
        for (layer, module), w in weights.items():
            if module not in self.module_shapes or not 0 <= layer < self.spec.num_layers:
                raise UnknownModule(module, layer, self.spec.num_layers)
            r = w.rank
            if not 1 <= r <= self.max_rank:
                raise AdapterRankTooLarge(r, self.max_rank, layer, module)
            fin, fout = self.module_shapes[module]
            if tuple(w.a.shape) != (r, fin):
                raise AdapterShapeMismatch(layer, module, "A", (r, fin), tuple(w.a.shape))
            if tuple(w.b.shape) != (fout, r):
                raise AdapterShapeMismatch(layer, module, "B", (fout, r), tuple(w.b.shape))

    # ------------------------------------------------------------------ lifecycle

    def __contains__(self, key: object) -> bool:
        return key in self._residents

    @property
    def keys(self) -> list[str]:
        return list(self._residents)

    def load(self, key: str, weights: LoraWeights) -> None:
        """Copy an adapter into free pages on this thread. Idempotent by key: a resident key is left as it is.

        Raises `PoolFull` (nothing changed) when its pages do not fit, `AdapterRankTooLarge`,
        `AdapterShapeMismatch` or `UnknownModule` (nothing changed) for weights the backbone cannot take,
        and `AdapterLoading` while a pending load of the key is under way.
        """
        if key in self._residents:
            return
        pending = self.stage(key, weights)
        self.reserve(pending)
        self.write(pending, via_host_buffer=False)
        self.publish(pending)
        logger.debug("loaded adapter %s: %d pages in %d runs", key, pending.num_pages, len(pending.runs))

    def stage(self, key: str, weights: LoraWeights) -> PendingLoad:
        """A pending load of `weights` under `key`, validated against the pool (errors as `load`); it holds
        nothing yet."""
        pages = self.pages_needed(weights)
        return PendingLoad(key, weights, pages, max((w.rank for w in weights.values()), default=0))

    def reserve(self, pending: PendingLoad) -> None:
        """Claim the pages of a staged load. Until `publish` they belong to it alone: no other load gets
        them, no batch can bind the key, `evict` does not see it. Raises `PoolFull` (nothing claimed),
        `AdapterLoading` when the key is resident or has another pending load, `LoadCancelled` when the
        load was cancelled first."""
        with self._lock:
            if pending.state == "cancelled":
                raise LoadCancelled(pending.key)
            if pending.state != "staged":
                raise ValueError(f"the load of {pending.key!r} is {pending.state}, not staged")
            if pending.key in self._residents or pending.key in self._pending:
                raise AdapterLoading(pending.key)
            runs = self._allocator.allocate(pending.num_pages)
            if runs is None:
                raise PoolFull(pending.key, pending.num_pages, self._allocator.free_pages)
            if self.device.type == "cuda":  # the pages may belong to a victim that queued work still reads
                pending._after = torch.cuda.Event()
                pending._after.record(torch.cuda.current_stream(self.device))
            pending.runs = runs
            pending.state = "reserved"
            self._pending[pending.key] = pending

    def write(self, pending: PendingLoad, *, via_host_buffer: bool | None = None) -> None:
        """Convert, lay out and copy the weights of a reserved load into its pages: the heavy part of a
        load, safe on any thread while batches run (none reads these pages). `via_host_buffer` (default:
        on CUDA) lays the weights out page by page in a host buffer (pinned on CUDA) and copies each run
        of pages in one piece (on a side stream on CUDA); otherwise each tensor is copied into its pages.
        A failure frees the pages and re-raises; `LoadCancelled` when the load was cancelled before or
        during the write (the pages are free again when this returns)."""
        with self._lock:
            if pending.state == "cancelled":
                raise LoadCancelled(pending.key)
            if pending.state != "reserved":
                raise ValueError(f"the load of {pending.key!r} is {pending.state}, not reserved")
            pending.state = "writing"
        try:
            resident, tensors = self._place(pending.key, pending.runs, pending.weights)
            if via_host_buffer if via_host_buffer is not None else self.device.type == "cuda":
                self._copy_runs(pending, tensors)
            else:
                pages = resident.pages.to(torch.int64)
                for first, mat in tensors:
                    self._store(pages, first, mat)
        except BaseException:
            with self._lock:
                self._free_locked(pending)
            raise
        with self._lock:
            if pending._cancel_requested:
                self._free_locked(pending)
                raise LoadCancelled(pending.key)
            pending._resident = resident
            pending.state = "written"

    def publish(self, pending: PendingLoad) -> None:
        """Make a written load a resident: from now on `bind` takes the key. Call this on the thread that
        runs the batches (on CUDA its current stream waits for the copy, the host does not). Raises
        `LoadCancelled` when the load was cancelled."""
        with self._lock:
            if pending.state == "cancelled":
                raise LoadCancelled(pending.key)
            if pending.state != "written" or pending._resident is None:
                raise ValueError(f"the load of {pending.key!r} is {pending.state}, not written")
            if pending._ready is not None:
                torch.cuda.current_stream(self.device).wait_event(pending._ready)
            del self._pending[pending.key]
            self._residents[pending.key] = pending._resident
            pending.state = "published"
            pending._host = None  # the caching host allocator keeps its block until the copy is done
            self._arena = None

    def cancel(self, pending: PendingLoad) -> bool:
        """Give up a load that is not published: its pages go back to the free set (at the end of the
        write when one is under way). Idempotent; False when there was nothing to cancel (published or
        cancelled already)."""
        with self._lock:
            if pending.state in ("published", "cancelled"):
                return False
            if pending.state == "writing":
                pending._cancel_requested = True
            else:
                self._free_locked(pending)
            return True

    def _free_locked(self, pending: PendingLoad) -> None:
        """Free a load's pages once no copy into them is in flight (the lock is held); it is cancelled."""
        if pending._ready is not None:
            pending._ready.synchronize()
        elif pending._host is not None and self.device.type == "cuda":
            self._side_stream().synchronize()  # a write that failed part way through its copies
        self._allocator.free(pending.runs)  # none while staged
        if self._pending.get(pending.key) is pending:
            del self._pending[pending.key]
        pending.state = "cancelled"
        pending._resident = pending._host = None

    def evict(self, key: str) -> bool:
        """Free an adapter's pages (no compaction). Idempotent: returns False if it was not resident (a
        pending load is not: it leaves through `cancel`).

        A batch bound before the eviction must not be applied afterwards (its pages may be reused).
        """
        with self._lock:
            resident = self._residents.pop(key, None)
            if resident is None:
                return False
            self._allocator.free(resident.runs)
            self._arena = None
        logger.debug("evicted adapter %s: %d pages", key, resident.num_pages)
        return True

    def _place(
        self, key: str, runs: list[Run], weights: LoraWeights
    ) -> tuple[_Resident, list[tuple[int, torch.Tensor]]]:
        """Where every tensor of an adapter goes in its pages, copying nothing: its `_Resident` (page
        table, offsets, views into the storage) and (first logical page, matrix [rows, width]) per tensor."""
        pages = torch.cat([torch.arange(s, s + n, dtype=torch.int64) for s, n in runs])  # [N]
        num_layers, num_modules = self.spec.num_layers, len(MODULES)
        a_offset = torch.full((num_layers, num_modules), -1, dtype=torch.int32)
        b_offset = torch.full((num_layers, num_modules), -1, dtype=torch.int32)
        rank = torch.zeros((num_layers, num_modules), dtype=torch.int32)
        scale = torch.zeros((num_layers, num_modules), dtype=torch.float32)
        slices: list[LoraSlice | _Fragmented | None] = [None] * (num_layers * num_modules)
        desc = torch.zeros((num_layers * num_modules, native.DESC_FIELDS), dtype=torch.int64)
        tensors: list[tuple[int, torch.Tensor]] = []
        cursor = 0
        live = 0
        itemsize = self.storage.element_size()
        # in the order a forward pass applies them (layer by layer, q k v o gate up down): a decode step
        # reads each adapter's tensors front to back, which is what the hardware prefetchers follow
        for (layer, module), w in sorted(weights.items(), key=lambda item: (item[0][0], MODULES.index(item[0][1]))):
            mi = self.module_index[module]
            fin, fout = self.module_shapes[module]
            r = w.rank
            a_pos, a_view = cursor, self._view(pages, cursor, r, fin)
            cursor += self.pages_for(r, fin)
            b_pos, bt_view = cursor, self._view(pages, cursor, r, fout)
            cursor += self.pages_for(r, fout)
            tensors += [(a_pos, w.a), (b_pos, w.b.t())]
            a_offset[layer, mi], b_offset[layer, mi] = a_pos, b_pos
            rank[layer, mi] = r
            scale[layer, mi] = w.scale
            row = desc[layer * num_modules + mi]
            row[4] = r
            if a_view is not None and bt_view is not None:
                slices[layer * num_modules + mi] = (a_view.t(), bt_view, float(w.scale))
            else:
                frag = _Fragmented(
                    a_pages=pages[a_pos : a_pos + self.pages_for(r, fin)].to(self.device),
                    b_pages=pages[b_pos : b_pos + self.pages_for(r, fout)].to(self.device),
                    rank=r,
                    in_features=fin,
                    out_features=fout,
                    scale=float(w.scale),
                )
                slices[layer * num_modules + mi] = frag
                row[2], row[3] = frag.a_pages.data_ptr(), frag.b_pages.data_ptr()  # kept alive by slices
            row[0] = int(a_view.storage_offset()) if a_view is not None else -1  # element offsets in storage
            row[1] = int(bt_view.storage_offset()) if bt_view is not None else -1
            live += r * (fin + fout) * itemsize
        assert cursor == pages.shape[0], (cursor, pages.shape[0])
        resident = _Resident(
            key=key,
            runs=runs,
            pages=pages.to(torch.int32),
            a_offset=a_offset,
            b_offset=b_offset,
            rank=rank,
            scale=scale,
            slices=slices,
            desc=desc,
            live_bytes=live,
            modules=frozenset(weights),
        )
        return resident, tensors

    def _view(self, pages: torch.Tensor, first: int, rows: int, width: int) -> torch.Tensor | None:
        """The storage as a [rows, width] tensor on logical pages from `first`, when those pages are
        consecutive (the tensor is read in place); None otherwise."""
        count = self.pages_for(rows, width)
        p0 = int(pages[first])
        if int(pages[first + count - 1]) - p0 != count - 1:
            return None
        return self._flat[p0 * self.page_elems : p0 * self.page_elems + rows * width].view(rows, width)

    def _store(self, pages: torch.Tensor, first: int, mat: torch.Tensor) -> None:
        """Copy ``mat`` [rows, width] onto logical pages from ``first`` (converted to the pool's dtype)."""
        rows, width = mat.shape
        n = rows * width
        count = self.pages_for(rows, width)
        mine = pages[first : first + count]  # [count]
        src = mat.detach().to(device=self.device, dtype=self.dtype).reshape(-1)  # [n]
        p0 = int(mine[0])
        if int(mine[-1]) - p0 == count - 1:
            self._flat[p0 * self.page_elems : p0 * self.page_elems + n].copy_(src)
            return
        padded = torch.zeros(count * self.page_elems, dtype=self.dtype, device=self.device)
        padded[:n] = src
        self.storage[mine.to(self.device)] = padded.view(count, self.page_elems)

    def _copy_runs(self, pending: PendingLoad, tensors: list[tuple[int, torch.Tensor]]) -> None:
        """Lay the tensors out in a host buffer of the load's logical pages (conversion and transposition
        happen here), then copy each run of pages in one piece: on CUDA from pinned memory on the side
        stream, after the work queued before the reservation, recording `pending._ready`."""
        cuda = self.device.type == "cuda"
        pe = self.page_elems
        host = torch.empty(pending.num_pages * pe, dtype=self.dtype, pin_memory=cuda)
        for first, mat in tensors:
            rows, width = mat.shape
            start, n = first * pe, rows * width
            host[start : start + n].view(rows, width).copy_(mat.detach())
            host[start + n : (first + self.pages_for(rows, width)) * pe].zero_()  # page tails, if any
        logical = host.view(pending.num_pages, pe)
        if not cuda:
            offset = 0
            for start, count in pending.runs:
                self.storage[start : start + count].copy_(logical[offset : offset + count])
                offset += count
            return
        pending._host = host  # alive until published or released
        stream = self._side_stream()
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            if pending._after is not None:
                stream.wait_event(pending._after)
            offset = 0
            for start, count in pending.runs:
                self.storage[start : start + count].copy_(logical[offset : offset + count], non_blocking=True)
                offset += count
            ready = torch.cuda.Event()
            ready.record(stream)
        pending._ready = ready

    def _side_stream(self) -> Any:
        """The CUDA stream that copies pending loads in (made on first use)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    # ------------------------------------------------------------------ introspection

    @property
    def total_pages(self) -> int:
        return self._allocator.num_pages

    @property
    def free_pages(self) -> int:
        return self._allocator.free_pages

    def resident_pages(self) -> dict[str, int]:
        """Pages of every resident adapter, in load order: the record of device residency.

        The engine thread loads and evicts; the asyncio side reads this while it does. The copy of the
        residents is one C-level dict copy (atomic under the GIL), so the answer is one consistent state,
        either before or after any load or evict."""
        residents = self._residents.copy()
        return {key: r.num_pages for key, r in residents.items()}

    @property
    def free_runs(self) -> list[Run]:
        """Free pages as sorted (first page, count) runs."""
        return self._allocator.free_runs

    def pages_of(self, key: str) -> torch.Tensor:
        """Physical pages of a resident adapter in logical order: its page table, [N] int32 (CPU)."""
        if key not in self._residents:
            raise AdapterNotLoaded(key)
        return self._residents[key].pages

    def stats(self) -> PoolStats:
        """Capacity, reserved and live bytes, free pages and utilisation."""
        total = self._allocator.num_pages
        free = self._allocator.free_pages
        return PoolStats(
            capacity_bytes=total * self.page_bytes,
            reserved_bytes=(total - free) * self.page_bytes,
            live_bytes=sum(r.live_bytes for r in self._residents.values()),
            total_pages=total,
            free_pages=free,
            page_bytes=self.page_bytes,
            adapters=len(self._residents),
        )

    def _page_table(self) -> tuple[torch.Tensor, dict[str, int]]:
        """All residents' page tables concatenated on the device (rebuilt only after a load/evict).

        This is metadata (4 bytes per page), so rebuilding it is cheap; weights never move."""
        if self._arena is None:
            bases: dict[str, int] = {}
            parts: list[torch.Tensor] = []
            offset = 0
            for key, r in self._residents.items():
                bases[key] = offset
                parts.append(r.pages)
                offset += r.num_pages
            table = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.int32)
            self._arena = (table.to(self.device), bases)
        return self._arena

    # ------------------------------------------------------------------ batches

    def bind(
        self,
        segments: Sequence[tuple[str | None, int]],
        *,
        backend: Backend | None = None,
        native_kernel: bool | None = None,
    ) -> BoundBatch:
        """Bind one batch: ``segments`` are (adapter key or None, number of consecutive tokens) in token order.

        All per-batch metadata is built here, once; the returned `BoundBatch.apply` is what the model
        calls at every projection. ``backend`` defaults to "triton" for CUDA pools and "cpu" otherwise.
        The "cpu" backend hands adapters with few tokens in the batch (decode) to the native kernel
        (kernels/native.py) when it is available and reads this pool's dtype, and the others (prefill)
        to torch.mm; ``native_kernel=False`` sends everything to torch (None: use it when available).
        Raises `AdapterNotLoaded` for a key that is not resident.
        """
        merged: list[tuple[str | None, int]] = []
        for key, n in segments:
            if n < 1:
                raise ValueError(f"segment for adapter {key!r} has {n} tokens; must be >= 1")
            if merged and merged[-1][0] == key:
                merged[-1] = (key, merged[-1][1] + n)
            else:
                merged.append((key, n))
        slot_of: dict[str, int] = {}
        residents: list[_Resident] = []
        seg_slots: list[int] = []
        for key, _ in merged:
            if key is None:
                seg_slots.append(-1)
                continue
            if key not in slot_of:
                if key not in self._residents:
                    raise AdapterNotLoaded(key)
                slot_of[key] = len(residents)
                residents.append(self._residents[key])
            seg_slots.append(slot_of[key])
        lengths = [n for _, n in merged]
        chosen: Backend = backend or ("triton" if self.device.type == "cuda" else "cpu")
        if chosen == "cpu":
            lib = self._native_library() if native_kernel is not False and residents else None
            plan = plan_cpu(seg_slots, lengths, native_max_tokens=NATIVE_MAX_TOKENS if lib is not None else 0)
            kernel = None
            if lib is not None and plan.native is not None and plan.native.count:
                kernel = native.NativeBatch(
                    lib, self.storage, self.page_elems,
                    torch.stack([r.desc for r in residents], dim=1),  # [L * M, S, DESC_FIELDS]
                    torch.stack([r.scale.view(-1) for r in residents], dim=1),  # [L * M, S]
                    plan.native, threads=torch.get_num_threads(),
                )
            return BoundBatch(self, chosen, residents, plan, None, kernel, (seg_slots, lengths))
        return BoundBatch(self, chosen, residents, None, self._device_meta(residents, seg_slots, lengths))

    @property
    def native_kernel(self) -> bool:
        """Whether CPU batches of this pool run their decode slots on the native kernel."""
        return self._native_library() is not None

    def _native_library(self) -> ctypes.CDLL | None:
        """The native kernel when it can read this pool (CPU, float32 or bfloat16 pages)."""
        if self.device.type != "cpu" or not native.supports(self.dtype):
            return None
        return native.library()

    def bind_tokens(self, token_adapters: Sequence[str | None], *, backend: Backend | None = None) -> BoundBatch:
        """Bind from a per-token list of adapter keys (None = no adapter); runs become segments."""
        segments: list[tuple[str | None, int]] = []
        for key in token_adapters:
            if segments and segments[-1][0] == key:
                segments[-1] = (key, segments[-1][1] + 1)
            else:
                segments.append((key, 1))
        return self.bind(segments, backend=backend)

    def _device_meta(self, residents: list[_Resident], seg_slots: list[int], lengths: list[int]) -> _DeviceMeta:
        table, bases = self._page_table()
        num_layers, num_modules = self.spec.num_layers, len(MODULES)
        none_i = torch.full((1, num_layers, num_modules), -1, dtype=torch.int32)
        a_rows = [none_i] + [_rebase(r.a_offset, bases[r.key]).unsqueeze(0) for r in residents]
        b_rows = [none_i] + [_rebase(r.b_offset, bases[r.key]).unsqueeze(0) for r in residents]
        rank_rows = [torch.zeros(1, num_layers, num_modules, dtype=torch.int32)] + [
            r.rank.unsqueeze(0) for r in residents
        ]
        scale_rows = [torch.zeros(1, num_layers, num_modules)] + [r.scale.unsqueeze(0) for r in residents]
        index = torch.tensor(seg_slots, dtype=torch.int64) + 1  # [S], slot 0 = no adapter

        def per_segment(rows: list[torch.Tensor]) -> torch.Tensor:
            # [slots+1, L, M] -> [L, M, S] contiguous, so apply() takes a contiguous [S] view
            return torch.cat(rows)[index].permute(1, 2, 0).contiguous().to(self.device)

        max_rank = max((int(r.rank.max()) for r in residents), default=0)
        total = sum(lengths)
        return _DeviceMeta(
            page_table=table,
            segments=make_segments(lengths, device=self.device),
            a_offset=per_segment(a_rows),
            b_offset=per_segment(b_rows),
            rank=per_segment(rank_rows),
            scale=per_segment(scale_rows),
            shrink_out=torch.zeros(total, max(max_rank, 1), dtype=torch.float32, device=self.device),
        )


def _rebase(offset: torch.Tensor, base: int) -> torch.Tensor:
    """Logical page offsets [L, M] -> offsets into the concatenated page table (-1 stays -1)."""
    return torch.where(offset >= 0, offset + base, offset)


@dataclass(frozen=True)
class _DeviceMeta:
    """Kernel metadata of one batch (built once in `AdapterPool.bind`).

    page_table: [E] int32           all residents' page tables concatenated
    a_offset:   [L, M, S] int32     per (layer, module, segment) page-table entry of A, -1 none
    b_offset:   [L, M, S] int32     same for B.T
    rank:       [L, M, S] int32
    scale:      [L, M, S] float32
    shrink_out: [T, max_rank] float32  shrink output buffer reused by every apply
    """

    page_table: torch.Tensor
    segments: Segments
    a_offset: torch.Tensor
    b_offset: torch.Tensor
    rank: torch.Tensor
    scale: torch.Tensor
    shrink_out: torch.Tensor


class BoundBatch:
    """One batch bound to resident adapters; `apply` adds the LoRA deltas at one projection."""

    def __init__(
        self,
        pool: AdapterPool,
        backend: Backend,
        residents: list[_Resident],
        plan: CpuPlan | None,
        meta: _DeviceMeta | None,
        kernel: native.NativeBatch | None = None,
        grouping: tuple[list[int], list[int]] | None = None,
    ) -> None:
        self._pool = pool
        self.backend = backend
        self._residents = residents
        self._plan = plan
        self._meta = meta
        self._kernel = kernel
        self._grouping = grouping  # (segment slots, lengths): to re-plan all on torch if the kernel cannot
        self._all_torch: CpuPlan | None = None
        self._num_modules = len(MODULES)

    @property
    def native(self) -> bool:
        """Whether this batch's decode slots run on the native kernel."""
        return self._kernel is not None

    @property
    def adapter_keys(self) -> list[str]:
        return [r.key for r in self._residents]

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[t] += scale * (x[t] @ A.T) @ B.T for tokens whose adapter adapts (layer, module); in place.

        x: [T, in_features]   input of the projection
        y: [T, out_features]  its output; may be a non-contiguous view (a column slice of a fused q/k/v)
        """
        mi = self._pool.module_index.get(module)
        if mi is None or not 0 <= layer < self._pool.spec.num_layers:
            raise UnknownModule(module, layer, self._pool.spec.num_layers)
        plan = self._plan
        if plan is not None:
            row = layer * self._num_modules + mi
            kernel = self._kernel
            if kernel is not None:
                fin, fout = self._pool.module_shapes[module]
                t = plan.num_tokens
                if tuple(x.shape) != (t, fin) or tuple(y.shape) != (t, fout):
                    raise ValueError(
                        f"{module}: x {tuple(x.shape)} and y {tuple(y.shape)} must be [{t}, {fin}] and [{t}, {fout}]"
                    )
                if x.stride(1) != 1:
                    x = x.contiguous()
                if kernel.takes(x, y):
                    kernel.apply(row, x, y)
                else:  # e.g. a half-precision backbone: this call goes to torch entirely
                    plan = self._torch_plan()
            if plan.runs or plan.gathers:
                storage = self._pool.storage
                weights: list[LoraSlice | None] = [None] * len(self._residents)
                for slot in plan.torch_slots:
                    s = self._residents[slot].slices[row]
                    weights[slot] = s.gather(storage) if isinstance(s, _Fragmented) else s
                lora_apply_cpu(x, y, plan, weights)
            return
        meta = self._meta
        assert meta is not None
        if self.backend == "triton":
            from kernels.expand import lora_expand
            from kernels.shrink import lora_shrink
        else:
            from kernels.reference import lora_expand, lora_shrink
        pool = self._pool.storage
        xd = x if x.dtype == pool.dtype and x.stride(1) == 1 else x.to(pool.dtype).contiguous()
        h = meta.shrink_out
        lora_shrink(xd, pool, meta.page_table, meta.segments, meta.a_offset[layer, mi], meta.rank[layer, mi], h)
        lora_expand(
            h, pool, meta.page_table, meta.segments, meta.b_offset[layer, mi], meta.rank[layer, mi],
            meta.scale[layer, mi], y,
        )

    def _torch_plan(self) -> CpuPlan:
        """Every slot on the torch path (built on first need, then kept)."""
        if self._all_torch is None:
            assert self._grouping is not None
            self._all_torch = plan_cpu(*self._grouping)
        return self._all_torch


# ----------------------------------------------------------------------------------------- churn simulation


@dataclass(frozen=True)
class ChurnReport:
    """Mean (and minimum) utilisation, live bytes / capacity, sampled whenever a load is refused.

    paged:      this pool (pages in proportion to rank, any free pages)
    padded:     max-rank slots (vLLM/SGLang layout: every adapter takes a max_rank slot)
    contiguous: each adapter's bytes as one contiguous extent, first fit (external fragmentation)
    """

    paged: float
    padded: float
    contiguous: float
    paged_min: float
    padded_min: float
    contiguous_min: float
    samples: int


def _churn_one(
    rng: random.Random,
    capacity: int,
    fits: Callable[[int], bool],
    take: Callable[[int], Any],
    release: Callable[[int, Any], None],
    live_of: Callable[[int], int],
    ranks: tuple[int, int],
    rounds: int,
) -> list[float]:
    resident: list[tuple[int, Any]] = []  # (rank, handle)
    samples: list[float] = []
    for _ in range(rounds):
        r = rng.randint(*ranks)
        refused = False
        while not fits(r):
            if not refused:
                samples.append(sum(live_of(rr) for rr, _ in resident) / capacity)
                refused = True
            rank_out, handle = resident.pop(rng.randrange(len(resident)))
            release(rank_out, handle)
        resident.append((r, take(r)))
    return samples


def simulate_churn(
    seed: int,
    *,
    spec: BackboneSpec,
    capacity_max_rank_adapters: int = 32,
    min_rank: int = 4,
    max_rank: int = DEFAULT_MAX_RANK,
    rounds: int = 2000,
    page_elems: int | None = None,
) -> ChurnReport:
    """Deterministic churn: adapters of ranks uniform in min_rank..max_rank (all seven modules, all
    layers) are loaded; when one does not fit, utilisation is sampled and random residents are evicted
    until it fits. The pool's capacity is ``capacity_max_rank_adapters`` max-rank adapters. The same
    seed gives every layout the same stream of ranks and evictions choices drawn from its own RNG.
    """
    shapes = spec.module_shapes()
    widths = [w for shape in shapes.values() for w in shape]
    p = page_elems or reduce(math.gcd, widths)
    row_elems = spec.num_layers * sum(widths)  # elements per unit of rank

    def pages(r: int) -> int:
        return spec.num_layers * sum(-(-r * w // p) for w in widths)

    capacity = capacity_max_rank_adapters * max_rank * row_elems
    ranks = (min_rank, max_rank)

    paged = PageAllocator(capacity // p)
    paged_samples = _churn_one(
        random.Random(seed), capacity,
        lambda r: pages(r) <= paged.free_pages,
        lambda r: paged.allocate(pages(r)),
        lambda r, runs: paged.free(runs),
        lambda r: r * row_elems, ranks, rounds,
    )

    free_slots = [capacity_max_rank_adapters]

    def take_slot(r: int) -> None:
        free_slots[0] -= 1

    def release_slot(r: int, handle: None) -> None:
        free_slots[0] += 1

    padded_samples = _churn_one(
        random.Random(seed), capacity,
        lambda r: free_slots[0] > 0, take_slot, release_slot,
        lambda r: r * row_elems, ranks, rounds,
    )

    extents = PageAllocator(capacity // row_elems)  # unit: one rank-row of every module, contiguous
    contiguous_samples = _churn_one(
        random.Random(seed), capacity,
        lambda r: any(length >= r for _, length in extents.free_runs),
        lambda r: extents.allocate(r, contiguous=True, first_fit=True),
        lambda r, runs: extents.free(runs),
        lambda r: r * row_elems, ranks, rounds,
    )

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return ChurnReport(
        paged=mean(paged_samples),
        padded=mean(padded_samples),
        contiguous=mean(contiguous_samples),
        paged_min=min(paged_samples, default=0.0),
        padded_min=min(padded_samples, default=0.0),
        contiguous_min=min(contiguous_samples, default=0.0),
        samples=len(paged_samples),
    )
