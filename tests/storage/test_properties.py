"""Properties of the archive reader and the adapter validator: whatever the bytes, they either accept or
raise the project's own AdapterInvalid, quickly.

Arbitrary bytes rarely reach deep code, so most inputs are valid adapters with something broken: a tar,
tar.gz or zip with bytes flipped, cut or inserted (the tar is also mutated before it is gzipped, so the
header parser sees the damage), configs with arbitrary JSON in every field, safetensors headers with
arbitrary entries. Deterministic (derandomize, no example database) so CI is stable; every example has a
deadline, so a hang is a failure.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import struct
import tarfile
import zipfile
from datetime import timedelta
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from storage.adapter_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    UploadFiles,
    canonical_blob,
    load_canonical,
    parse_config,
    read_upload,
    validate,
)
from storage.archive import ArchiveLimits
from storage.backbone import default_backbone_spec
from storage.errors import AdapterInvalid, SafetensorsInvalid

SPEC = default_backbone_spec()
# Small limits: a mutation that makes a member "large" is refused quickly instead of being inflated.
LIMITS = ArchiveLimits(max_upload_bytes=1 << 20, max_inflated_bytes=4 << 20, max_member_bytes=2 << 20,
                       ratio_grace_bytes=64 << 10, max_members=16)
PROPERTY = settings(max_examples=120, deadline=timedelta(seconds=5), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
CONFIG: dict[str, Any] = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"],
                          "bias": "none", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _weights() -> bytes:
    g = torch.Generator().manual_seed(0)
    return save_safetensors({KEY_A: torch.randn(1, SPEC.hidden_size, generator=g) * 0.02,
                             KEY_B: torch.randn(SPEC.q_width, 1, generator=g) * 0.02})


WEIGHTS = _weights()
FILES = {CONFIG_FILE: json.dumps(CONFIG).encode(), WEIGHTS_FILE: WEIGHTS}


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


TAR = _tar(FILES)
ARCHIVES = {"tar": TAR, "tar.gz": gzip.compress(TAR, mtime=0), "zip": _zip(FILES)}


def check(source: bytes) -> None:
    """read + validate + canonical blob: accepted, or refused with an AdapterInvalid (anything else fails)."""
    try:
        upload = read_upload(source, limits=LIMITS)
        adapter = validate(upload, SPEC, max_rank=16)
    except AdapterInvalid as e:
        assert e.code and str(e)
        json.dumps(e.detail, default=str)  # the gateway answers it as JSON
        return
    assert adapter.base_model is None or isinstance(adapter.base_model, str)
    assert load_canonical(canonical_blob(adapter)).modules == adapter.modules


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few flips, an insertion, a deletion or a truncation."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at:at + 8] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=600))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 600))]
        else:
            del out[at:]
    return bytes(out)


@PROPERTY
@given(st.tuples(st.sampled_from([b"", b"\x1f\x8b\x08\x00", b"PK\x03\x04", b"PK\x05\x06", b"\x00" * 257 + b"ustar"]),
                 st.binary(max_size=2048)))
def test_arbitrary_bytes(parts: tuple[bytes, bytes]) -> None:
    check(parts[0] + parts[1])


@PROPERTY
@given(st.sampled_from(sorted(ARCHIVES)).flatmap(lambda kind: mutated(ARCHIVES[kind])))
def test_mutated_archives(archive: bytes) -> None:
    check(archive)


@PROPERTY
@given(mutated(TAR), st.booleans())
def test_mutated_tar_headers_inside_gzip(tar: bytes, compress: bool) -> None:
    check(gzip.compress(tar, mtime=0) if compress else tar)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
               "use_dora", "bias", "modules_to_save", "fan_in_fan_out", "base_model_name_or_path",
               "trainable_token_indices", "layer_replication"]


@PROPERTY
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=5))
@example({"alpha_pattern": {"(?i)q_proj": 4}})  # valid alone, invalid inside PEFT's `(.*\.)?(K)$`
@example({"alpha_pattern": {"q_proj": float("inf")}})
@example({"rank_pattern": {"(" * 2000 + ")" * 2000: 1}})
@example({"target_modules": 7})
def test_configs_with_arbitrary_fields(overrides: dict[str, Any]) -> None:
    check(_zip({CONFIG_FILE: json.dumps({**CONFIG, **overrides}).encode(), WEIGHTS_FILE: WEIGHTS}))


@PROPERTY
@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000)  # nesting deeper than the recursion limit
@example(b'{"r": ' + b"9" * 5000 + b"}")  # an integer above Python's 4300-digit conversion limit
def test_arbitrary_config_bytes(data: bytes) -> None:
    with contextlib.suppress(AdapterInvalid):
        parse_config(data)


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


ENTRY = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "F64", ""]) | st.text(max_size=4),
     "shape": st.lists(st.integers(-2, 600) | st.sampled_from([SPEC.hidden_size, SPEC.q_width, 1 << 40]),
                       max_size=3) | JSON,
     "data_offsets": st.lists(st.integers(-1, 5000) | st.sampled_from([1 << 63, 2304, 4608]), max_size=3) | JSON},
)


@PROPERTY
@given(st.dictionaries(st.sampled_from([KEY_A, KEY_B, "__metadata__", "lm_head.lora_A.weight"]) | st.text(max_size=30),
                       ENTRY | JSON, max_size=4),
       st.binary(max_size=64).map(lambda b: b * 80))
def test_arbitrary_safetensors_headers(header: dict[str, Any], data: bytes) -> None:
    weights = _safetensors(header, data)
    with contextlib.suppress(AdapterInvalid):
        validate(UploadFiles(config=FILES[CONFIG_FILE], weights=weights), SPEC, max_rank=16)


def test_the_unmutated_inputs_are_valid() -> None:
    """The properties start from valid adapters (else they would only test refusals of the base case)."""
    for archive in ARCHIVES.values():
        assert validate(read_upload(archive, limits=LIMITS), SPEC, max_rank=16).ranks == {"layers.0.q_proj": 1}


def test_a_header_nested_beyond_the_recursion_limit_is_refused() -> None:
    raw = b"[" * 100_000
    weights = struct.pack("<Q", len(raw)) + raw
    with pytest.raises(SafetensorsInvalid):
        validate(UploadFiles(config=FILES[CONFIG_FILE], weights=weights), SPEC, max_rank=16)
