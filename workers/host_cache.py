"""The host tier of a worker: adapter blobs on local disk and in RAM, each with a byte budget.

A blob is kept under its adapter version's name (the sha256 of the canonical blob in the object store); what
is kept may be a narrower copy of it (`storage.adapter_format.narrowed_blob`: the pool's dtype, half the bytes
of a float32 adapter), so a disk copy starts with the sha256 of the bytes that follow and is either right or
dropped: one that no longer matches it is deleted on read and the caller fetches the blob again from the
object store. RAM is LRU and holds the hottest blobs; the disk, the larger, slower level, drops blobs by an
`EvictionPolicy` when one is given (`scheduler.staging.GreedyDualEviction` over the host tier: use count x
fetch cost / size, aged; the worker's default) and least recently used first otherwise. Every method is
synchronous and touches local files only: async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from protocol.messages import Tier
from protocol.subjects import NAME_PATTERN
from scheduler.policy import EvictionPolicy, ResidentView
from scheduler.staging import GreedyDualEviction, TierCosts

logger = logging.getLogger(__name__)

_SHA_LEN = 64
_DIGEST_BYTES = 32  # a disk copy: sha256(blob) (raw), then the blob
_HEX = frozenset("0123456789abcdef")


def _is_sha256(name: str) -> bool:
    return len(name) == _SHA_LEN and _HEX.issuperset(name)


def host_eviction(name: str, costs: TierCosts | None = None) -> EvictionPolicy | None:
    """The host tier's eviction policy by name (`HostCacheSettings.eviction`), sizing blobs in bytes: greedy_dual
    (weighing object-store fetches with `costs`, the simulator's by default), or lru (None: the cache's own
    least recently used order). The simulator's host caches use it too."""
    if name == "greedy_dual":
        return GreedyDualEviction(costs=costs or TierCosts(), page_bytes=1, tier=Tier.host)
    if name == "lru":
        return None
    raise ValueError(f"unknown host cache eviction {name!r}; known: greedy_dual, lru")


@dataclass(frozen=True)
class CachedBlob:
    """A blob of the host tier: its size and when it was last used (unix seconds)."""

    sha256: str
    bytes: int
    last_used: float


class HostCache:
    """LRU blobs in RAM (`ram_bytes`) over files in `directory` (`disk_bytes`), dropped by `eviction` (whose
    pages are bytes) or least recently used first. Thread-safe."""

    def __init__(self, directory: Path, *, disk_bytes: int, ram_bytes: int,
                 eviction: EvictionPolicy | None = None) -> None:
        self.directory = directory
        self.disk_bytes = disk_bytes
        self.ram_bytes = ram_bytes
        self.eviction = eviction
        self._lock = threading.Lock()
        self._ram: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._disk: OrderedDict[str, int] = OrderedDict()  # sha -> size, least recently used first
        self._last_used: dict[str, float] = {}
        directory.mkdir(parents=True, exist_ok=True)
        self._index_disk()

    def _index_disk(self) -> None:
        """Adopt the blobs a previous process left in the directory (oldest access first): they are the
        host tier (`entries`, heartbeats) though no load of this process named them. Only names that are
        sha256 digests count; a half-written temporary file or a stray file is not a blob."""
        files = [p for p in self.directory.iterdir() if p.is_file() and _is_sha256(p.name)]
        for path in sorted(files, key=lambda p: p.stat().st_mtime):
            self._disk[path.name] = max(path.stat().st_size - _DIGEST_BYTES, 0)
            self._last_used[path.name] = path.stat().st_mtime
        for victim in self._trim_disk():
            with contextlib.suppress(FileNotFoundError):
                (self.directory / victim).unlink()

    # -- queries -----------------------------------------------------------------------------------------

    def __contains__(self, sha256: object) -> bool:
        with self._lock:
            return sha256 in self._ram or sha256 in self._disk

    def entries(self) -> list[CachedBlob]:
        """Every cached blob, least recently used first."""
        with self._lock:
            sizes = {**self._disk, **{k: len(v) for k, v in self._ram.items()}}
            return sorted(
                (CachedBlob(k, n, self._last_used.get(k, 0.0)) for k, n in sizes.items()),
                key=lambda b: b.last_used,
            )

    def usage(self) -> dict[str, int]:
        """Bytes used and budgeted per level (reported in heartbeats)."""
        with self._lock:
            return {
                "host_ram_bytes_used": sum(len(v) for v in self._ram.values()),
                "host_ram_bytes": self.ram_bytes,
                "host_disk_bytes_used": sum(self._disk.values()),
                "host_disk_bytes": self.disk_bytes,
            }

    # -- get / put / drop --------------------------------------------------------------------------------

    def get(self, sha256: str) -> bytes | None:
        """The blob, from RAM or disk (promoted to RAM), or None; a damaged disk copy is dropped."""
        self._check(sha256)
        with self._lock:
            blob = self._ram.get(sha256)
            if blob is not None:
                self._ram.move_to_end(sha256)
                self._touch(sha256)
                return blob
            on_disk = sha256 in self._disk
        if not on_disk:
            return None
        path = self.directory / sha256
        digest = blob = None
        try:
            with path.open("rb") as f:  # the digest, then the blob read straight into its own bytes
                digest, blob = f.read(_DIGEST_BYTES), f.read()
        except FileNotFoundError:
            pass
        if blob is None or hashlib.sha256(blob).digest() != digest:
            logger.warning("host cache: dropping damaged or vanished disk copy of %s", sha256)
            self.drop(sha256)
            return None
        with self._lock:
            if sha256 in self._disk:
                self._disk.move_to_end(sha256)
            self._remember_in_ram(sha256, blob)
            self._touch(sha256)
        with contextlib.suppress(OSError):
            os.utime(path)
        return blob

    def put(self, sha256: str, blob: bytes) -> None:
        """Keep a verified blob (or a narrower copy of it) of version `sha256` on disk and in RAM (idempotent),
        evicting blobs beyond the budgets."""
        self._check(sha256)
        path = self.directory / sha256
        with self._lock:
            known = sha256 in self._disk
        if not known and len(blob) <= self.disk_bytes:
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            with tmp.open("wb") as f:
                f.write(hashlib.sha256(blob).digest())
                f.write(blob)
            tmp.replace(path)  # atomic: a reader never sees half a blob
        with self._lock:
            if len(blob) <= self.disk_bytes:
                self._disk[sha256] = len(blob)
                self._disk.move_to_end(sha256)
            self._remember_in_ram(sha256, blob)
            self._touch(sha256)
            victims = self._trim_disk(keep=sha256)
        for victim in victims:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / victim).unlink()

    def drop(self, sha256: str) -> bool:
        """Forget a blob on both levels; True if it was cached."""
        self._check(sha256)
        with self._lock:
            found = self._ram.pop(sha256, None) is not None
            found = self._disk.pop(sha256, None) is not None or found
            self._last_used.pop(sha256, None)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / sha256).unlink()
        return found

    # -- internals (caller holds the lock) ---------------------------------------------------------------

    def _touch(self, sha256: str) -> None:
        self._last_used[sha256] = time.time()

    def _remember_in_ram(self, sha256: str, blob: bytes) -> None:
        if len(blob) > self.ram_bytes:
            return
        self._ram[sha256] = blob
        self._ram.move_to_end(sha256)
        used = sum(len(v) for v in self._ram.values())
        while used > self.ram_bytes:
            _, old = self._ram.popitem(last=False)
            used -= len(old)

    def _trim_disk(self, keep: str | None = None) -> list[str]:
        """Forget disk blobs beyond the budget, never `keep` (the blob just put) while others can go: those
        the eviction policy chooses, else (no policy, or it cannot make the room) least recently used first.
        Returns their names to delete."""
        used = sum(self._disk.values())
        if used <= self.disk_bytes:
            return []
        chosen: list[str] = []
        last = [keep] if keep is not None and keep in self._disk else []
        if self.eviction is not None and last:
            size = self._disk[last[0]]
            others = [ResidentView(sha, n, self._last_used.get(sha, 0.0), 0, n)
                      for sha, n in self._disk.items() if sha != keep]
            chosen = self.eviction.choose_victims(size, max(self.disk_bytes - (used - size), 0), others) or []
        order = [*chosen, *(sha for sha in self._disk if sha != keep), *last]
        victims: list[str] = []
        for sha in order:
            if used <= self.disk_bytes:
                break
            if sha not in self._disk:
                continue
            used -= self._disk.pop(sha)
            victims.append(sha)
            if sha not in self._ram:
                self._last_used.pop(sha, None)
        return victims

    @staticmethod
    def _check(sha256: str) -> None:
        if len(sha256) != _SHA_LEN or not NAME_PATTERN.match(sha256):
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
