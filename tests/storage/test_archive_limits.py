"""Archive limits are enforced while reading: bombs are refused before they inflate, with little memory.

Memory is measured with tracemalloc (every bytes object the reader, zlib and zipfile allocate); the bound
per upload read is storage.archive.READ_MEMORY_BYTES, which also covers what tracemalloc cannot see.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from storage import errors
from storage.adapter_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    archive_limits,
    max_weights_bytes,
    read_files,
    read_upload,
)
from storage.archive import READ_MEMORY_BYTES, ArchiveLimits
from storage.backbone import default_backbone_spec
from storage.settings import RegistrySettings
from tests.storage import bombs
from tests.storage.test_adapter_format import files

SPEC = default_backbone_spec()
LIMITS = archive_limits(RegistrySettings(), SPEC)

# (case, archive builder, error, why)
BOMBS: list[tuple[str, Callable[[], bytes], type[errors.AdapterInvalid], str]] = [
    ("zip-deflate-1gib", bombs.zip_bomb, errors.UploadTooLarge,
     "a weights member of 1 GiB: larger than any adapter of the backbone, refused from the central directory"),
    ("zip-deflate-160mib", lambda: bombs.zip_bomb(160), errors.CompressionRatioTooHigh,
     "a member declares 160 MiB for 160 KB: refused from the central directory, nothing inflated"),
    ("zip-overlapping", bombs.zip_overlapping, errors.CompressionRatioTooHigh,
     "40 entries share one deflated 32 MiB stream"),
    ("zip-overlapping-stored", lambda: bombs.zip_overlapping(entries=30, inflated_mib=4, method=0),
     errors.ArchiveInvalid, "30 stored entries share one 4 MiB region: ratio 30 is allowed, the overlap is not"),
    ("zip-nested", lambda: bombs.zip_nested(bombs.zip_bomb()), errors.HeaderTooLarge,
     "the weights member is itself a zip bomb: its first 8 bytes read as a header length of 80 GB"),
    ("zip-20k-members", bombs.zip_many_members, errors.TooManyMembers, "counted from the end record"),
    ("tar-gz-160mib", lambda: bombs.tar_gz_bomb(160), errors.CompressionRatioTooHigh,
     "one gzip stream inflating ~1000x: stopped a few MiB in"),
    ("tar-gz-1gib-declared", lambda: bombs.tar_gz_bomb(1024), errors.UploadTooLarge,
     "the tar header declares more than any adapter of the backbone"),
    ("tar-gz-long-name-1gib", bombs.tar_gz_long_name, errors.ArchiveHeaderTooLarge,
     "a GNU long name of 1 GiB: refused on its header, never read"),
    ("tar-gz-pax-1gib", bombs.tar_gz_pax, errors.ArchiveHeaderTooLarge, "a pax record of 1 GiB"),
    ("tar-gz-20k-members", bombs.tar_gz_many_members, errors.TooManyMembers, "refused at member 65"),
    ("zip-huge-safetensors-header", lambda: bombs.zip_nested(bombs.safetensors_huge_header()),
     errors.HeaderTooLarge, "weights whose header length claims 8 GiB"),
]


@pytest.mark.parametrize(("case", "build", "error", "why"), BOMBS, ids=[b[0] for b in BOMBS])
def test_bomb_is_refused_while_reading_with_bounded_memory(
    case: str, build: Callable[[], bytes], error: type[errors.AdapterInvalid], why: str
) -> None:
    archive = build()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        started = time.monotonic()
        with pytest.raises(error) as info:
            read_upload(archive, limits=LIMITS)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert isinstance(info.value, errors.UploadLimitExceeded | errors.ArchiveInvalid), why
    assert peak < READ_MEMORY_BYTES // 2, f"{case}: {peak / 2**20:.1f} MiB traced ({why})"
    assert elapsed < 10, f"{case} took {elapsed:.1f} s: it was inflated ({why})"
    assert str(info.value) and info.value.detail  # the refusal names what crossed which limit


def _tar(members: dict[str, bytes], *, fmt: int = tarfile.PAX_FORMAT, gz: bool = True,
         dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


LONG_DIR = "checkpoints/" + "very-long-directory-name/" * 8  # > 100 bytes: pax path / GNU long name / ustar prefix


@pytest.mark.parametrize("packing", ["tar.gz-pax", "tar-plain", "tar.gz-gnu-long-name", "tar.gz-ustar-prefix",
                                     "tar.gz-with-dirs-and-readme", "zip-deflated", "zip-stored"])
def test_valid_archives_read_the_same(packing: str) -> None:
    f = files()
    long = {f"{LONG_DIR}{k}": v for k, v in f.items()}
    archive = {
        "tar.gz-pax": lambda: _tar(long),
        "tar-plain": lambda: _tar(f, gz=False),
        "tar.gz-gnu-long-name": lambda: _tar(long, fmt=tarfile.GNU_FORMAT),
        "tar.gz-ustar-prefix": lambda: _tar({f"{'d' * 60}/{'e' * 60}/{k}": v for k, v in f.items()},
                                            fmt=tarfile.USTAR_FORMAT),
        "tar.gz-with-dirs-and-readme": lambda: _tar({**f, "adapter/README.md": b"# hi"}, dirs=("adapter/",)),
        "zip-deflated": lambda: _zip({**f, "README.md": b"# hi"}),
        "zip-stored": lambda: _zip(f, zipfile.ZIP_STORED),
    }[packing]()
    upload = read_upload(archive, limits=LIMITS)
    assert upload.config == f[CONFIG_FILE] and upload.weights == f[WEIGHTS_FILE]


def test_member_count_limit_is_exact() -> None:
    f = files()
    readmes = {f"docs{i}/README.md": b"x" for i in range(6)}
    limits = replace(LIMITS, max_members=8)
    assert read_upload(_zip({**f, **readmes}), limits=limits).config == f[CONFIG_FILE]
    assert read_upload(_tar({**f, **readmes}), limits=limits).config == f[CONFIG_FILE]
    for archive in (_zip({**f, **readmes, "x/README.md": b""}), _tar({**f, **readmes, "x/README.md": b""})):
        with pytest.raises(errors.TooManyMembers):
            read_upload(archive, limits=limits)


def test_ratio_applies_only_beyond_the_grace() -> None:
    """A config of zeros-like JSON compresses far beyond 100x but is tiny: accepted."""
    cfg = json.loads(files()[CONFIG_FILE])
    cfg["notes"] = " " * 500_000
    f = files(cfg)
    assert read_upload(_zip(f), limits=LIMITS).config == f[CONFIG_FILE]
    assert read_upload(_tar(f), limits=LIMITS).config == f[CONFIG_FILE]
    tight = replace(LIMITS, ratio_grace_bytes=0)
    with pytest.raises(errors.CompressionRatioTooHigh) as info:
        read_upload(_zip(f), limits=tight)
    assert info.value.detail["max_ratio"] == 100.0


def test_inflated_total_counts_skipped_members() -> None:
    f = files()
    limits = replace(LIMITS, max_inflated_bytes=len(f[WEIGHTS_FILE]) + 10_000, ratio_grace_bytes=1 << 30)
    padded = {**f, "README.md": b" " * 20_000}
    for archive in (_zip(padded), _tar(padded)):
        with pytest.raises(errors.UploadTooLarge) as info:
            read_upload(archive, limits=limits)
        assert info.value.detail["limit"] == limits.max_inflated_bytes


def test_weights_larger_than_any_adapter_of_the_backbone_are_refused_before_reading() -> None:
    biggest = max_weights_bytes(SPEC, 128)
    # 30 layers x 7 modules at rank 128 in F32, plus the largest header
    per_layer = sum((i + o) * 128 for i, o in SPEC.module_shapes().values())
    assert biggest == 30 * per_layer * 4 + 8 + (16 << 20)
    assert LIMITS.max_member_bytes == biggest
    limits = replace(LIMITS, max_member_bytes=1000)
    with pytest.raises(errors.UploadTooLarge) as info:
        read_upload(_tar(files()), limits=limits)
    assert info.value.detail["limit"] == 1000 and info.value.detail["member"] == WEIGHTS_FILE
    with pytest.raises(errors.UploadTooLarge):
        read_files({k: io.BytesIO(v) for k, v in files().items()}, limits=limits)


def test_separate_files_with_a_huge_header_length_are_refused_before_reading() -> None:
    weights = io.BytesIO(bombs.safetensors_huge_header(5 << 30))
    with pytest.raises(errors.HeaderTooLarge) as info:
        read_files({CONFIG_FILE: io.BytesIO(files()[CONFIG_FILE]), WEIGHTS_FILE: weights}, limits=LIMITS)
    assert info.value.detail["header_bytes"] == 5 << 30


@pytest.mark.parametrize(("case", "archive", "error"), [
    ("zip-bzip2", lambda: _zip(files(), zipfile.ZIP_BZIP2), errors.ArchiveInvalid),
    ("zip-lzma", lambda: _zip(files(), zipfile.ZIP_LZMA), errors.ArchiveInvalid),
    ("tar-hardlink", lambda: _tar_with_type(tarfile.LNKTYPE), errors.UnsafeArchiveMember),
    ("tar-fifo", lambda: _tar_with_type(tarfile.FIFOTYPE), errors.UnsafeArchiveMember),
    ("tar-long-member-name", lambda: _tar({"d/" * 600 + "README.md": b""}), errors.ArchiveHeaderTooLarge),
    ("zip-symlink", lambda: _zip_symlink(), errors.UnsafeArchiveMember),
    ("zip-duplicate-weights", lambda: _zip({**files(), f"x/{WEIGHTS_FILE}": b""}), errors.UnexpectedFile),
    ("tar-truncated", lambda: _tar(files(), gz=False)[:5000], errors.ArchiveInvalid),
    ("zip-truncated", lambda: _zip(files())[:-30], errors.ArchiveInvalid),
])
def test_unsupported_or_unsafe_members(case: str, archive: Callable[[], bytes],
                                       error: type[errors.AdapterInvalid]) -> None:
    with pytest.raises(error):
        read_upload(archive(), limits=LIMITS)


def _tar_with_type(kind: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.type, info.linkname = kind, "adapter_config.json"
        tar.addfile(info)
    return buf.getvalue()


def _zip_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(WEIGHTS_FILE)
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_defaults_match_the_settings() -> None:
    """ArchiveLimits() (read_upload without limits) is what RegistrySettings() gives, but for the weights bound."""
    assert replace(LIMITS, max_member_bytes=ArchiveLimits().max_member_bytes) == ArchiveLimits()


def test_a_bomb_on_disk_is_streamed_too(tmp_path: Path) -> None:
    """`lorafn adapters push FILE` reads a path: the same limits, the file is never read whole."""
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(bombs.tar_gz_bomb(160))
    tracemalloc.start()
    try:
        with pytest.raises(errors.CompressionRatioTooHigh):
            read_upload(path, limits=LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < READ_MEMORY_BYTES // 2
