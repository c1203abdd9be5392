"""Hostile adapter archives, built in milliseconds without inflating them here.

A deflate stream of a repeated unit is built from one compressed unit: after a full flush the compressor
starts afresh, so every further copy of the unit compresses to the same bytes. A 1 GiB bomb is thus ~1 MB
and costs one CRC pass (zip and gzip carry the CRC of the inflated bytes, so the bombs are valid archives).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from functools import cache

MIB = 1 << 20
ZEROS = bytes(MIB)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def deflate_repeat(head: bytes, unit: bytes, times: int, tail: bytes = b"") -> bytes:
    """Raw deflate (no zlib/gzip framing) of head + unit * times + tail."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    return first + again * (times - 1) + c.compress(tail) + c.flush()


def crc_repeat(head: bytes, unit: bytes, times: int, tail: bytes = b"") -> int:
    crc = zlib.crc32(head)
    for _ in range(times):
        crc = zlib.crc32(unit, crc)
    return zlib.crc32(tail, crc)


def gzip_repeat(head: bytes, unit: bytes, times: int, tail: bytes = b"") -> bytes:
    """A gzip file of head + unit * times + tail."""
    size = len(head) + len(unit) * times + len(tail)
    crc = crc_repeat(head, unit, times, tail)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + deflate_repeat(head, unit, times, tail)
            + struct.pack("<II", crc, size & 0xFFFFFFFF))


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _local_header(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    return struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, csize, usize, len(name), 0) + name


def _central_entry(name: bytes, method: int, crc: int, csize: int, usize: int, offset: int) -> bytes:
    return struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, csize, usize, len(name),
                       0, 0, 0, 0, 0, offset) + name


def _end(entries: int, directory: int, directory_at: int) -> bytes:
    return struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, entries, entries, directory, directory_at, 0)


@cache
def zip_bomb(inflated_mib: int = 1024, name: str = WEIGHTS) -> bytes:
    """One deflated member of `inflated_mib` MiB of zeros (~1 KB compressed per MiB)."""
    data = deflate_repeat(b"", ZEROS, inflated_mib)
    crc, size = crc_repeat(b"", ZEROS, inflated_mib), inflated_mib * MIB
    local = _local_header(name.encode(), 8, crc, len(data), size) + data
    central = _central_entry(name.encode(), 8, crc, len(data), size, 0)
    return local + central + _end(1, len(central), len(local))


@cache
def zip_overlapping(entries: int = 40, inflated_mib: int = 32, method: int = 8) -> bytes:
    """Many central directory entries sharing ONE member's data (Fifield's overlapping-file bomb)."""
    name = b"README.md"
    data = deflate_repeat(b"", ZEROS, inflated_mib) if method == 8 else ZEROS * inflated_mib
    crc, size = crc_repeat(b"", ZEROS, inflated_mib), inflated_mib * MIB
    local = _local_header(name, method, crc, len(data), size) + data
    central = b"".join(_central_entry(name, method, crc, len(data), size, 0) for _ in range(entries))
    return local + central + _end(entries, len(central), len(local))


def zip_nested(inner: bytes) -> bytes:
    """A zip whose weights member is itself a (bomb) zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(CONFIG, b"{}")
        zf.writestr(WEIGHTS, inner)
    return buf.getvalue()


@cache
def zip_many_members(count: int = 20_000) -> bytes:
    """`count` empty stored members (README.md each)."""
    name = b"README.md"
    offsets, local = [], io.BytesIO()
    for _ in range(count):
        offsets.append(local.tell())
        local.write(_local_header(name, 0, 0, 0, 0))
    central = b"".join(_central_entry(name, 0, 0, 0, 0, o) for o in offsets)
    return local.getvalue() + central + _end(min(count, 0xFFFE), len(central), local.tell())


@cache
def tar_gz_bomb(inflated_mib: int = 1024) -> bytes:
    """A .tar.gz whose weights member is `inflated_mib` MiB of zeros."""
    return gzip_repeat(tar_header(WEIGHTS, inflated_mib * MIB), ZEROS, inflated_mib, bytes(1024))


@cache
def tar_gz_long_name(name_mib: int = 1024) -> bytes:
    """A GNU long-name header announcing a name of `name_mib` MiB (and holding it, compressed)."""
    return gzip_repeat(tar_header("././@LongLink", name_mib * MIB, tarfile.GNUTYPE_LONGNAME), b"a" * MIB,
                       name_mib, tar_header(WEIGHTS, 0) + bytes(1024))


@cache
def tar_gz_pax(record_mib: int = 1024) -> bytes:
    """A pax extended header of `record_mib` MiB: one `path` record of that length."""
    length = record_mib * MIB
    prefix = f"{length} path=".encode()
    # The record's declared length counts itself; padding the value keeps the arithmetic exact enough
    # for a reader that would trust it (ours refuses on the header's size first).
    return gzip_repeat(tar_header("././@PaxHeader", length, tarfile.XHDTYPE) + prefix, b"a" * MIB, record_mib,
                       b"\n" + tar_header(WEIGHTS, 0) + bytes(1024))


@cache
def tar_gz_many_members(count: int = 20_000) -> bytes:
    """`count` empty README.md members."""
    return gzip_repeat(b"", tar_header("README.md", 0), count, bytes(1024))


def safetensors_huge_header(claimed: int = 8 << 30) -> bytes:
    """A weights file whose 8-byte header length claims `claimed` bytes."""
    return struct.pack("<Q", claimed) + b'{"__metadata__": {}}'
