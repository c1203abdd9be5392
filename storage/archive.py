"""Reading uploaded archives (.tar, .tar.gz, .zip) with every limit enforced while reading, never after.

An archive is a file the caller already has on disk (or in a small buffer). It is read member by member in
chunks of `CHUNK_BYTES`; each size is checked before the bytes it announces are read or inflated:

- the number of entries (`max_members`);
- headers: a member name (`max_name_bytes`), a tar extended header (pax record or GNU long name) and a zip
  central directory (`max_header_bytes`): Python's tarfile reads a 1 GiB long name into memory, and
  zipfile the whole central directory, so the tar headers are parsed here and the zip directory is
  measured before zipfile sees it;
- inflated bytes: per member (the caller's `keep` says how many a member may have) and in total
  (`max_inflated_bytes`);
- the compression ratio: a zip member's declared sizes and the whole archive's are checked before
  anything is inflated; a .tar.gz is one compressed stream, so its inflated bytes are compared with the
  compressed bytes consumed so far, after every chunk. Ratios are only enforced beyond
  `ratio_grace_bytes` (small files such as a JSON config compress well and are harmless).

Members the caller keeps are spooled to temporary files (in memory up to `SPOOL_BYTES`, then on disk),
members it does not keep are read and discarded (tar) or never inflated (zip). So while an archive is read
the process holds a bounded amount of memory whatever the archive holds: one chunk, the inflater's state,
one extended header, the zip directory and at most `SPOOL_BYTES` per kept member (see `READ_MEMORY_BYTES`).

Policy about names (which files an adapter may hold) is the caller's, through `keep`.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import PurePosixPath
from tempfile import SpooledTemporaryFile
from typing import IO, BinaryIO

from storage.errors import (
    AdapterInvalid,
    ArchiveHeaderTooLarge,
    ArchiveInvalid,
    CompressionRatioTooHigh,
    TooManyMembers,
    UnsafeArchiveMember,
    UploadTooLarge,
)

CHUNK_BYTES = 1 << 20  # one read of member data; also the largest single allocation while reading
SPOOL_BYTES = 1 << 20  # a kept member stays in memory up to this size, then moves to a temporary file
BLOCK = 512  # tar block
# Measured bound (tests/gateway/test_upload_bombs.py) of what reading one archive adds to a process: the
# chunk, the zlib and gzip buffers (~0.4 MiB), up to two spooled members, one extended header and the zip
# directory's ZipInfo objects, with allocator slack.
READ_MEMORY_BYTES = 16 << 20

Keep = Callable[[str], int | None]
"""Asked for every regular member, before its data is read: the most bytes the caller keeps of it, or None
to skip it (its bytes still count towards the limits). Raises an AdapterInvalid to refuse the member."""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an uploaded archive may be. Defaults suit adapter uploads; see storage.settings.RegistrySettings."""

    max_upload_bytes: int = 1 << 30
    max_members: int = 64
    max_inflated_bytes: int = 1 << 30
    max_ratio: float = 100.0
    ratio_grace_bytes: int = 4 << 20
    max_header_bytes: int = 256 << 10
    max_name_bytes: int = 1024
    max_member_bytes: int = 1 << 30  # the largest member kept; the caller lowers it (an adapter's weights)


@dataclass
class Member:
    """A kept member: its name, size and contents (a spooled temporary file positioned at its start)."""

    name: str
    size: int
    file: IO[bytes]


def archive_kind(head: bytes) -> str | None:
    """'tar.gz', 'tar' or 'zip' from the first bytes of a file (at least 512 for a plain tar), else None."""
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    return None


@contextmanager
def extract(f: BinaryIO, size: int, limits: ArchiveLimits, keep: Keep) -> Iterator[dict[str, Member]]:
    """Read the archive in `f` (`size` bytes, seekable) and yield its kept members by name; their temporary
    files are closed on exit. Raises AdapterInvalid subclasses only."""
    if size > limits.max_upload_bytes:
        raise UploadTooLarge(f"upload is {size} bytes, above the limit of {limits.max_upload_bytes}",
                             size=size, limit=limits.max_upload_bytes)
    f.seek(0)
    kind = archive_kind(f.read(BLOCK))
    f.seek(0)
    with ExitStack() as stack:

        def spool() -> IO[bytes]:
            return stack.enter_context(SpooledTemporaryFile(max_size=SPOOL_BYTES))

        reader = _Reader(limits, keep, spool)
        if kind == "zip":
            reader.zip(f, size)
        elif kind in ("tar", "tar.gz"):
            reader.tar(f, size, compressed=kind == "tar.gz")
        else:
            raise ArchiveInvalid("upload is neither a directory, a .tar, a .tar.gz nor a .zip archive")
        for m in reader.kept.values():
            m.file.seek(0)
        yield reader.kept


def check_member_name(name: str, limits: ArchiveLimits) -> str:
    """Refuse names that could escape a directory, or that are too long to be a file of an adapter."""
    if len(name.encode("utf-8", "replace")) > limits.max_name_bytes:
        raise ArchiveHeaderTooLarge(
            f"an archive member name is {len(name.encode('utf-8', 'replace'))} bytes, above the limit of "
            f"{limits.max_name_bytes}", limit=limits.max_name_bytes)
    p = PurePosixPath(name)
    if (p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or "\\" in name or ":" in name
            or "\0" in name):
        raise UnsafeArchiveMember(f"archive member {name!r} has an unsafe path", member=name)
    return name


class _Counting:
    """A read-only file that counts the bytes read from it (the compressed bytes a gzip reader consumed)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.count = f, 0

    def read(self, n: int = -1, /) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self.f.seek(offset, whence)  # gzip only seeks when rewinding, which reading never does


class _Reader:
    """One archive's reading state: members seen, bytes inflated, members kept."""

    def __init__(self, limits: ArchiveLimits, keep: Keep, spool: Callable[[], IO[bytes]]) -> None:
        self.limits, self.keep, self.spool = limits, keep, spool
        self.members = 0
        self.inflated = 0
        self.kept: dict[str, Member] = {}
        self._wanted: dict[str, int | None] = {}

    # -- limits shared by both formats ----------------------------------------------------------------------

    def _count_member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise TooManyMembers(f"archive has more than {self.limits.max_members} members",
                                 limit=self.limits.max_members)

    def _admit(self, name: str, size: int) -> int | None:
        """Checks before a regular member's data is read: its name, the caller's policy, its declared size."""
        check_member_name(name, self.limits)
        wanted = self.keep(name)
        limit = self.limits.max_member_bytes if wanted is None else min(wanted, self.limits.max_member_bytes)
        if size > limit:
            raise UploadTooLarge(f"archive member {name!r} is {size} bytes, above the limit of {limit} for it",
                                 member=name, size=size, limit=limit)
        if self.inflated + size > self.limits.max_inflated_bytes:
            raise UploadTooLarge(
                f"archive expands to more than {self.limits.max_inflated_bytes} bytes (member {name!r} of {size} "
                f"bytes after {self.inflated})", member=name, limit=self.limits.max_inflated_bytes)
        return wanted

    def _check_ratio(self, inflated: int, compressed: int, what: str) -> None:
        lim = self.limits
        if inflated > lim.ratio_grace_bytes and inflated > lim.max_ratio * max(compressed, 1):
            raise CompressionRatioTooHigh(
                f"{what} inflates {compressed} compressed bytes to {inflated} or more ({inflated / max(compressed, 1):.0f}"
                f" times; the limit is {lim.max_ratio:g})", compressed=compressed, inflated=inflated,
                max_ratio=lim.max_ratio)

    def _grow(self, n: int, compressed: int) -> None:
        """Count `n` more inflated bytes against the total and the ratio to `compressed` bytes consumed."""
        self.inflated += n
        if self.inflated > self.limits.max_inflated_bytes:
            raise UploadTooLarge(f"archive expands to more than {self.limits.max_inflated_bytes} bytes",
                                 limit=self.limits.max_inflated_bytes)
        self._check_ratio(self.inflated, compressed, "the archive")

    def _sink(self, name: str, size: int) -> IO[bytes]:
        member = Member(name=name, size=size, file=self.spool())
        self.kept[name] = member
        return member.file

    # -- tar --------------------------------------------------------------------------------------------------

    def tar(self, f: BinaryIO, size: int, *, compressed: bool) -> None:
        raw = _Counting(f)
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        try:
            self._tar_members(stream, raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ArchiveInvalid(f"cannot read the {'gzip' if compressed else 'tar'} stream: {e}") from e

    def _read(self, stream: IO[bytes], n: int, raw: _Counting) -> bytes:
        """Exactly n bytes (n ≤ CHUNK_BYTES or a bounded header), counted as inflated; short read: truncated."""
        parts, left = [], n
        while left > 0:
            data = _read_upto(stream, min(left, CHUNK_BYTES))
            if not data:
                raise ArchiveInvalid(f"the tar archive is truncated ({n - left} of {n} bytes of an entry)")
            parts.append(data)
            left -= len(data)
            self._grow(len(data), raw.count)
        return b"".join(parts)

    def _tar_members(self, stream: IO[bytes], raw: _Counting) -> None:
        lim = self.limits
        long_name: str | None = None
        pax: dict[str, str] = {}
        extended_in_a_row = 0
        while True:
            block = _read_upto(stream, BLOCK)
            if len(block) == 0 or block == b"\0" * len(block):
                return  # end of archive (a zero block, or the end of the stream at a block boundary)
            if len(block) < BLOCK:
                raise ArchiveInvalid("the tar archive is truncated inside a header")
            self._grow(BLOCK, raw.count)
            header = _TarHeader.parse(block)
            padded = -(-header.size // BLOCK) * BLOCK
            if header.type in b"LKxg":
                extended_in_a_row += 1
                if extended_in_a_row > 4:
                    raise ArchiveInvalid("the tar archive has more than 4 extended headers before one member")
                limit = lim.max_name_bytes if header.type in b"LK" else lim.max_header_bytes
                if header.size > limit:
                    what = "long name" if header.type in b"LK" else "extended (pax) header"
                    raise ArchiveHeaderTooLarge(
                        f"a tar {what} is {header.size} bytes, above the limit of {limit}",
                        size=header.size, limit=limit)
                data = self._read(stream, padded, raw)[: header.size]
                if header.type == b"L":
                    long_name = _decode(data.split(b"\0", 1)[0])
                elif header.type == b"x":
                    pax = _pax_records(data)
                continue  # "K" (a link target: the link itself is refused) and "g" (global) are not used
            extended_in_a_row = 0
            name = pax.get("path") or long_name or header.name
            size = header.size
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise ArchiveInvalid(f"tar member {name!r} has an invalid pax size {pax['size']!r}") from None
                if size < 0:
                    raise ArchiveInvalid(f"tar member {name!r} has a negative size")
                padded = -(-size // BLOCK) * BLOCK
            long_name, pax = None, {}
            self._count_member()
            if header.type == b"5":
                check_member_name(name, lim)
                self._skip(stream, padded, raw)
                continue
            if header.type not in b"07\0":
                check_member_name(name, lim)
                raise UnsafeArchiveMember(f"archive member {name!r} is a link or special file", member=name)
            wanted = self._admit(name, size)
            if wanted is None:
                self._skip(stream, padded, raw)
                continue
            out = self._sink(name, size)
            left = size
            while left > 0:
                data = self._read(stream, min(left, CHUNK_BYTES), raw)
                out.write(data)
                left -= len(data)
            self._skip(stream, padded - size, raw)

    def _skip(self, stream: IO[bytes], n: int, raw: _Counting) -> None:
        while n > 0:
            step = min(n, CHUNK_BYTES)
            self._read(stream, step, raw)
            n -= step

    # -- zip --------------------------------------------------------------------------------------------------

    def zip(self, f: BinaryIO, size: int) -> None:
        entries, directory = _zip_directory(f, size)
        if entries > self.limits.max_members:
            raise TooManyMembers(f"archive has {entries} members, above the limit of {self.limits.max_members}",
                                 members=entries, limit=self.limits.max_members)
        if directory > self.limits.max_header_bytes:
            raise ArchiveHeaderTooLarge(
                f"the zip central directory is {directory} bytes, above the limit of {self.limits.max_header_bytes}",
                size=directory, limit=self.limits.max_header_bytes)
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                self._zip_check(infos, size)
                for info in infos:
                    self._zip_member(zf, info, size)
        except AdapterInvalid:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, NotImplementedError,
                RuntimeError, ValueError, struct.error) as e:
            raise ArchiveInvalid(f"cannot read the zip archive: {e}") from e

    def _zip_check(self, infos: list[zipfile.ZipInfo], size: int) -> None:
        """Everything the central directory declares, before a byte is inflated."""
        wanted: dict[str, int | None] = {}
        for info in infos:
            self._count_member()
            name = info.filename
            check_member_name(name, self.limits)
            if info.is_dir():
                continue
            kind = (info.external_attr >> 16) & 0o170000
            if kind not in (0, 0o100000):
                raise UnsafeArchiveMember(f"archive member {name!r} is a link or special file", member=name)
            if info.flag_bits & 0x1:
                raise ArchiveInvalid(f"archive member {name!r} is encrypted", member=name)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArchiveInvalid(
                    f"archive member {name!r} uses compression method {info.compress_type}; accepted: stored, "
                    f"deflate", member=name, method=info.compress_type)
            wanted[name] = self._admit(name, info.file_size)
            self.inflated += info.file_size
            self._check_ratio(info.file_size, info.compress_size, f"archive member {name!r}")
        self._check_ratio(self.inflated, size, "the archive")
        self.inflated = 0  # counted again, for real, as the members are inflated
        # Entries whose data overlap (one compressed stream shared by many names) multiply the inflated
        # bytes without adding compressed ones; every member's local header and data must lie apart.
        regions = sorted((i.header_offset, i.header_offset + 30 + i.compress_size, i.filename) for i in infos)
        for (_, end, name), (next_start, _, next_name) in pairwise(regions):
            if next_start < end:
                raise ArchiveInvalid(f"archive members {name!r} and {next_name!r} overlap", member=next_name)
        if regions and regions[-1][1] > size:
            raise ArchiveInvalid(f"archive member {regions[-1][2]!r} extends past the end of the archive")
        self._wanted = wanted

    def _zip_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int) -> None:
        if info.is_dir() or self._wanted.get(info.filename) is None:
            return  # skipped members are never inflated; their declared sizes were checked
        out = self._sink(info.filename, info.file_size)
        read = 0
        with zf.open(info) as src:  # zipfile never returns more than the declared file_size, and checks the CRC
            while data := src.read(CHUNK_BYTES):
                read += len(data)
                self._grow(len(data), size)
                self._check_ratio(read, info.compress_size, f"archive member {info.filename!r}")
                out.write(data)
        if read != info.file_size:
            raise ArchiveInvalid(f"archive member {info.filename!r} has {read} bytes, its header says "
                                 f"{info.file_size}", member=info.filename)


@dataclass(frozen=True)
class _TarHeader:
    name: str
    size: int
    type: bytes

    @classmethod
    def parse(cls, block: bytes) -> _TarHeader:
        stored = _tar_number(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        signed = sum(struct.unpack("148b", block[:148])) + 8 * 32 + sum(struct.unpack("356b", block[156:]))
        if stored not in (unsigned, signed):
            raise ArchiveInvalid("not a tar archive, or a corrupt tar header (bad checksum)")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:265] == b"ustar\x0000":  # POSIX ustar: a prefix holds the start of long paths
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        size = _tar_number(block[124:136], "size")
        if size < 0:
            raise ArchiveInvalid("a tar header has a negative size")
        return cls(name=_decode(name), size=size, type=block[156:157])


def _tar_number(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise ArchiveInvalid(f"a tar header has a negative {what}")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ArchiveInvalid(f"not a tar archive, or a corrupt tar header ({what} {text[:16]!r})") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """POSIX pax records `<len> <key>=<value>\\n`; bounded by the caller (max_header_bytes)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        record = data[pos:pos + length]
        if length <= space - pos + 2 or len(record) != length or not record.endswith(b"\n"):
            raise ArchiveInvalid("a tar pax header is malformed")
        key, eq, value = record[space - pos + 1 : -1].partition(b"=")
        if not eq:
            raise ArchiveInvalid("a tar pax header is malformed")
        out[_decode(key)] = _decode(value)
        pos += length
    return out


def _read_upto(stream: IO[bytes], n: int) -> bytes:
    """n bytes, fewer only at the end of the stream (a gzip reader may return less at a member boundary)."""
    data = stream.read(n)
    while 0 < len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _decode(raw: bytes) -> str:
    # "replace", not "surrogateescape": a name travels into error messages and JSON answers.
    return raw.decode("utf-8", "replace")


def _zip_directory(f: BinaryIO, size: int) -> tuple[int, int]:
    """(entries, bytes) of the central directory, read from the end records, before zipfile reads it."""
    tail_size = min(size, 22 + 0xFFFF)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise ArchiveInvalid("cannot read the zip archive: no end of central directory record")
    entries, directory = struct.unpack("<HI", tail[at + 10 : at + 16])
    if entries == 0xFFFF or directory == 0xFFFFFFFF:  # zip64: the real numbers are in the zip64 end record
        locator_at = size - tail_size + at - 20
        if locator_at < 0:
            raise ArchiveInvalid("cannot read the zip archive: no zip64 end record locator")
        f.seek(locator_at)
        locator = f.read(20)
        if locator[:4] != b"PK\x06\x07":
            raise ArchiveInvalid("cannot read the zip archive: no zip64 end record locator")
        (record_at,) = struct.unpack("<Q", locator[8:16])
        if record_at > size - 56:
            raise ArchiveInvalid("cannot read the zip archive: the zip64 end record is out of the file")
        f.seek(record_at)
        record = f.read(56)
        if record[:4] != b"PK\x06\x06":
            raise ArchiveInvalid("cannot read the zip archive: bad zip64 end record")
        entries, directory = struct.unpack("<QQ", record[32:48])
    return entries, directory
