"""The native CPU kernels (kernels/native/cpu_kernels.c), built on first use: the multi-LoRA update and the
decode attention over the paged KV cache (`decode_attention`).

The C file has no dependency besides libc, libm and OpenMP, so it compiles in about two seconds:

    $CC -O3 -march=native -fopenmp -shared -fPIC cpu_kernels.c -lm      (CC defaults to gcc, then cc)

into a per-user cache directory (``$LORAFN_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/lorafn/native``, else
``~/.cache/lorafn/native``). The file name holds a hash of the source, the compiler, the flags and the
CPU's feature flags (-march=native code must not run on another CPU), so a changed source or a shared
home directory never loads a stale or foreign build. The build writes a temporary file and renames it
into place, so processes that build at the same time are safe (the last rename wins, both are equal).

The library is loaded with ctypes after torch: torch ships and loads ``libgomp.so.1``, and the dynamic
loader resolves the library's libgomp to that one (same soname), so both share one OpenMP thread pool.

When there is no compiler, the build fails or ``LORAFN_NATIVE=0`` is set, `library()` returns None after
one log line and callers use the torch path (kernels/cpu.py).

Descriptor of one adapter slot for one (layer, module), 5 int64 (`DESC_FIELDS`):

    a_offset   element offset of A [r, in] in the pool's flat storage, or -1 when A is paged
    b_offset   element offset of B.T [r, out], or -1 when paged
    a_pages    address of an int64 tensor of A's physical page ids (read only when a_offset is -1)
    b_pages    address of B.T's page ids (read only when b_offset is -1)
    rank       r, 0 when the adapter does not adapt this (layer, module)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)  # after the source, so that the linker keeps them
ABI = 2
DESC_FIELDS = 5
ENV_SWITCH = "LORAFN_NATIVE"
ENV_CACHE = "LORAFN_NATIVE_CACHE"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # storage dtypes the kernel reads

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None once tried


class NativeBuildError(RuntimeError):
    """The C kernel could not be compiled or loaded."""


def enabled() -> bool:
    """False when ``LORAFN_NATIVE=0`` (read at every call, so tests and operators can switch it)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C compiler: ``$CC``, else gcc, else cc (None when there is none)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or None
    return shutil.which("gcc") or shutil.which("cc")


def cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorafn" / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def library_path(cc: str) -> Path:
    """Where the build of the current source with compiler ``cc`` lives (it may not exist yet)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), " ".join(FLAGS + LIBS).encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"cpu_kernels-{h.hexdigest()[:20]}.so"


def build(cc: str, target: Path) -> Path:
    """Compile the source into ``target`` (atomically: a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise NativeBuildError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.lora_cpu_abi() != ABI:
        raise NativeBuildError(f"{path} has calling convention {lib.lora_cpu_abi()}, expected {ABI}")
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.lora_cpu_apply.argtypes = [p, i32, i64, p, p, i32, p, p, p, p, i64, i64, p, i64, i64, i32]
    lib.lora_cpu_apply.restype = i32
    lib.lora_cpu_max_threads.restype = i32
    f32 = ctypes.c_float
    lib.paged_decode_attention.argtypes = [p, p, i64, i32, i32, i32, i32, p, i64, p, p, i32, p, i32, f32, p, i64, i32]
    lib.paged_decode_attention.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (logged once) when it is disabled or cannot
    be built."""
    if not enabled():
        if "disabled" not in _state:
            _state["disabled"] = True
            logger.info("native LoRA kernel disabled by %s=0; using the torch CPU path", ENV_SWITCH)
        return None
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build_and_load()
    return _state["lib"]  # type: ignore[return-value]


def _build_and_load() -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None:
        logger.warning("native LoRA kernel unavailable (no C compiler: set CC or install gcc); using the torch CPU path")
        return None
    try:
        path = library_path(cc)
        if not path.exists():
            try:
                build(cc, path)
            except OSError:  # an unwritable cache directory: build into a private temporary one
                path = build(cc, Path(tempfile.mkdtemp(prefix="lorafn-native-")) / path.name)
        lib = _load(path)
    except (OSError, subprocess.SubprocessError, NativeBuildError) as e:
        logger.warning("native LoRA kernel unavailable (%s); using the torch CPU path", e)
        return None
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:  # two thread pools would spin against each other on the same cores
        logger.warning("native LoRA kernel: %d OpenMP runtimes are loaded: %s", len(runtimes), ", ".join(runtimes))
    logger.info("native LoRA kernel: %s", path)
    return lib


def available() -> bool:
    """Whether the native kernel is enabled and loaded (building it if needed)."""
    return library() is not None


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel reads pool storage of this dtype."""
    return dtype in DTYPES


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    found: set[str] = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libiomp", "libomp")):
                    found.add(os.path.realpath(path))
    except OSError:
        pass
    return sorted(found)


@dataclass(frozen=True)
class NativeTokens:
    """The tokens of the slots the native kernel handles in one batch (built once per batch).

    slots:   [K] int32   slot index of each entry (row of the batch's descriptor table)
    tok_ptr: [K+1] int32 entry k's tokens are tok_idx[tok_ptr[k]:tok_ptr[k+1]]
    tok_idx: [N] int32   token (row of x and y) indices, grouped by entry
    """

    slots: torch.Tensor
    tok_ptr: torch.Tensor
    tok_idx: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.slots.shape[0])


def lora_apply_native(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    y: torch.Tensor,
    tokens: NativeTokens,
    storage: torch.Tensor,
    desc: torch.Tensor,
    scales: torch.Tensor,
    page_elems: int,
    threads: int = 0,
) -> None:
    """y[t] += scale * (x[t] @ A.T) @ B.T for the tokens of every slot of ``tokens`` (in place).

    x:       [T, in] float32, unit column stride (any row stride)
    y:       [T, out] float32, unit column stride (e.g. a column slice of a fused output)
    storage: the pool's pages, float32 or bfloat16, contiguous
    desc:    [S, DESC_FIELDS] int64 contiguous, the batch's descriptors for this (layer, module)
    scales:  [S] float32 contiguous
    """
    if tokens.count == 0:
        return
    if x.dtype != torch.float32 or y.dtype != torch.float32 or x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y must be float32 with unit column stride")
    if not (storage.is_contiguous() and desc.is_contiguous() and scales.is_contiguous()):
        raise ValueError("storage, desc and scales must be contiguous")
    rc = lib.lora_cpu_apply(
        storage.data_ptr(), DTYPES[storage.dtype], page_elems, desc.data_ptr(), scales.data_ptr(),
        tokens.count, tokens.slots.data_ptr(), tokens.tok_ptr.data_ptr(), tokens.tok_idx.data_ptr(),
        x.data_ptr(), x.stride(0), x.shape[1], y.data_ptr(), y.stride(0), y.shape[1], threads,
    )
    if rc != 0:
        raise MemoryError("native LoRA kernel could not allocate its scratch memory")


class NativeBatch:
    """The native kernel bound to one batch: descriptor tables of every (layer, module) and the tokens.

    desc:   [R, S, DESC_FIELDS] int64, R rows (one per (layer, module)), S slots
    scales: [R, S] float32
    Addresses are computed once here; `apply` only adds the row's offset, so a call costs a few us.
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        storage: torch.Tensor,
        page_elems: int,
        desc: torch.Tensor,
        scales: torch.Tensor,
        tokens: NativeTokens,
        threads: int = 0,
    ) -> None:
        if storage.dtype not in DTYPES or storage.device.type != "cpu" or not storage.is_contiguous():
            raise ValueError(f"the native kernel reads contiguous CPU float32/bfloat16 storage, not {storage.dtype}")
        slots = desc.shape[1]
        if desc.shape != (scales.shape[0], slots, DESC_FIELDS) or scales.shape[1] != slots:
            raise ValueError(f"descriptor table {tuple(desc.shape)} and scales {tuple(scales.shape)} disagree")
        if tokens.count and int(tokens.slots.max()) >= slots:
            raise ValueError(f"tokens name slot {int(tokens.slots.max())} of a table with {slots} slots")
        self._fn = lib.lora_cpu_apply
        self._keep = (storage, desc.contiguous(), scales.contiguous().float(), tokens)
        self.tokens = tokens
        self._storage = storage.data_ptr()
        self._bf16 = DTYPES[storage.dtype]
        self._page_elems = page_elems
        self._desc = self._keep[1].data_ptr()
        self._desc_row = slots * DESC_FIELDS * 8
        self._scales = self._keep[2].data_ptr()
        self._scales_row = slots * 4
        self._count = tokens.count
        self._adapted = (self._keep[1][:, :, 4] > 0).any(dim=1).tolist()  # per row: does any slot adapt it
        self._ptrs = (tokens.slots.data_ptr(), tokens.tok_ptr.data_ptr(), tokens.tok_idx.data_ptr())
        self._threads = threads

    @staticmethod
    def takes(x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether `apply` can take these activations (fp32, unit column stride)."""
        return x.dtype == y.dtype == torch.float32 and x.stride(1) == 1 and y.stride(1) == 1

    def apply(self, row: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[t] += scale * (x[t] @ A.T) @ B.T with row ``row`` of the tables, for the batch's native slots.

        x: [T, in], y: [T, out] float32 with unit column stride (check with `takes`)
        """
        if self._count == 0 or not self._adapted[row]:
            return
        rc = self._fn(
            self._storage, self._bf16, self._page_elems, self._desc + row * self._desc_row,
            self._scales + row * self._scales_row, self._count, *self._ptrs,
            x.data_ptr(), x.stride(0), x.shape[1], y.data_ptr(), y.stride(0), y.shape[1], self._threads,
        )
        if rc != 0:
            raise MemoryError("native LoRA kernel could not allocate its scratch memory")


def decode_attention(
    k_layer: torch.Tensor, v_layer: torch.Tensor, block_size: int, q: torch.Tensor, rows: torch.Tensor,
    tables: torch.Tensor, lens: torch.Tensor, scale: float, out: torch.Tensor,
) -> bool:
    """Decode attention over one layer's paged KV cache, in place into ``out``; False (nothing written) when
    the native library is unavailable or the tensors are not what it reads (fp32, CPU, contiguous rows).

    k_layer, v_layer: [kv_heads, num_blocks * block_size, head_dim]
    q, out:           [num_tokens, num_heads, head_dim] (rows contiguous)
    rows:             [n] int64, the row of q and out of each decode token
    tables:           [n, max_blocks] int64 block ids; lens: [n] int64 context lengths
    """
    lib = library()
    tensors = (k_layer, v_layer, q, out)
    if lib is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    if not (k_layer.is_contiguous() and v_layer.is_contiguous() and q.is_contiguous() and out.is_contiguous()):
        return False
    kv_heads, slots, head_dim = k_layer.shape
    num_heads = q.shape[1]
    n, max_blocks = tables.shape
    rows, tables, lens = (t.to(torch.int64).contiguous() for t in (rows, tables, lens))
    rc = lib.paged_decode_attention(
        k_layer.data_ptr(), v_layer.data_ptr(), slots // block_size, block_size, head_dim, kv_heads,
        num_heads // kv_heads, q.data_ptr(), num_heads * head_dim, rows.data_ptr(), tables.data_ptr(), max_blocks,
        lens.data_ptr(), n, scale, out.data_ptr(), num_heads * head_dim, 0,
    )
    if rc != 0:
        raise MemoryError("native decode attention could not allocate its scratch memory")
    return True
