"""The PEFT LoRA adapter format: reading uploads, validating them against the backbone, canonical blobs.

An upload is a directory, a .tar.gz or a .zip holding `adapter_config.json` and
`adapter_model.safetensors`. `read_upload` turns any of them into an `UploadFiles` without touching the
disk and without unpickling anything; `validate` checks everything against a `BackboneSpec` before a
single byte is stored, and `canonical_blob` re-encodes a valid adapter as one safetensors file with
normalised keys and its resolved configuration in the header metadata. That blob is what the object
store holds, and its sha256 is the adapter version's identity: identical content, identical version.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storage.archive import ArchiveLimits, Member, extract
from storage.backbone import MODULES, BackboneSpec
from storage.errors import (
    AdapterInvalid,
    ConfigInvalid,
    EmptyAdapter,
    EmptyArchive,
    HeaderTooLarge,
    InvalidRank,
    LayerOutOfRange,
    MissingFile,
    MissingLoraPair,
    NonFiniteValues,
    PickleRefused,
    SafetensorsInvalid,
    ShapeMismatch,
    UnexpectedFile,
    UnknownTensorKey,
    UnsupportedDtype,
    UnsupportedFeature,
    UnsupportedModule,
    UploadTooLarge,
)
from storage.settings import RegistrySettings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files that PEFT or the Hub put beside an adapter; accepted and ignored.
IGNORED_FILES = frozenset({"README.md", "training_args.json", ".gitattributes", "tokenizer.json",
                           "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                           "vocab.json", "merges.txt", "generation_config.json"})
CANONICAL_FORMAT = "lorafn.adapter.v1"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight  (PEFT may insert the adapter name)
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<module>\w+)"
    r"\.lora_(?P<ab>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_EMBEDDING_KEY = re.compile(r"lora_embedding_[AB]|embed_tokens|lm_head")
_CANONICAL_KEY = re.compile(r"^layers\.(\d+)\.(\w+)\.lora_([AB])$")


@dataclass
class UploadFiles:
    """The two files of an adapter, as bytes."""

    config: bytes
    weights: bytes


@dataclass(frozen=True)
class ModuleSpec:
    """Resolved LoRA settings of one adapted (layer, module)."""

    layer: int
    module: str
    rank: int
    alpha: float

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.module}"

    def scale(self, use_rslora: bool) -> float:
        """The factor PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)


@dataclass
class ParsedAdapter:
    """A validated adapter: resolved per-module settings and its tensors under canonical keys."""

    modules: dict[tuple[int, str], ModuleSpec]
    tensors: dict[str, torch.Tensor]  # "layers.{i}.{module}.lora_A" -> [r, in]; "...lora_B" -> [out, r]
    lora_alpha: float
    use_rslora: bool
    base_model: str | None
    dtype: str
    peft_config: dict[str, Any] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.module for m in self.modules.values()}, key=MODULES.index)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules.values()}

    @property
    def num_layers(self) -> int:
        return len({m.layer for m in self.modules.values()})

    def scale(self, layer: int, module: str) -> float:
        return self.modules[(layer, module)].scale(self.use_rslora)


# -- reading uploads -----------------------------------------------------------------------------------


def max_weights_bytes(spec: BackboneSpec, max_rank: int) -> int:
    """The largest adapter_model.safetensors a valid adapter of `spec` can be: every module of every layer
    at `max_rank` in F32, behind the largest header accepted. A bigger file is refused before it is read."""
    per_layer = sum((in_f + out_f) * max_rank for in_f, out_f in spec.module_shapes().values())
    return spec.num_layers * per_layer * DTYPE_SIZES["F32"] + 8 + MAX_HEADER_BYTES


def archive_limits(settings: RegistrySettings, spec: BackboneSpec) -> ArchiveLimits:
    """The limits an upload is read under (storage/archive.py): the registry's settings, and a member kept
    (the weights) no larger than any valid adapter of the backbone can be."""
    return ArchiveLimits(
        max_upload_bytes=settings.max_upload_bytes,
        max_members=settings.max_archive_members,
        max_inflated_bytes=settings.max_inflated_bytes,
        max_ratio=settings.max_compression_ratio,
        ratio_grace_bytes=settings.compression_ratio_grace_bytes,
        max_header_bytes=settings.max_archive_header_bytes,
        max_member_bytes=min(settings.max_inflated_bytes, max_weights_bytes(spec, settings.max_rank)),
    )


def read_upload(source: Path | bytes | BinaryIO, *, limits: ArchiveLimits | None = None) -> UploadFiles:
    """Read an adapter from a directory, or from a .tar, .tar.gz or .zip archive given as a path, as bytes or
    as a seekable file. Archives are read in bounded chunks with every limit enforced while reading; only
    the two adapter files are kept, and only once the archive passed (see storage/archive.py)."""
    limits = limits or ArchiveLimits()
    if isinstance(source, Path):
        if source.is_dir():
            return _read_directory(source, max_bytes=limits.max_upload_bytes)
        if not source.exists():
            raise MissingFile(f"{source} does not exist", path=str(source))
        with source.open("rb") as f:
            return _read_archive(f, limits)
    if isinstance(source, bytes | bytearray):
        return _read_archive(io.BytesIO(source), limits)
    return _read_archive(source, limits)


def read_files(files: Mapping[str, BinaryIO], *, limits: ArchiveLimits | None = None) -> UploadFiles:
    """The adapter sent as separate files (multipart parts: name -> seekable file): the same checks of names
    and sizes as an archive's members, each before the file is read into memory."""
    policy = _AdapterMembers(limits or ArchiveLimits())
    kept: dict[str, Member] = {}
    for name, f in files.items():
        size = f.seek(0, os.SEEK_END)
        wanted = policy(name)
        if wanted is None:
            continue
        if size > wanted:
            raise UploadTooLarge(f"{name} is {size} bytes, above the limit of {wanted} for it",
                                 file=name, size=size, limit=wanted)
        f.seek(0)
        kept[name] = Member(name=name, size=size, file=f)
    return policy.upload(kept)


class _AdapterMembers:
    """The archive policy of an adapter upload (`storage.archive.Keep`): which members are kept and how big
    they may be; pickles and unexpected files are refused by name, before a byte of them is read."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.seen: list[str] = []

    def __call__(self, name: str) -> int | None:
        base = PurePosixPath(name).name
        if base.endswith(PICKLE_SUFFIXES):
            raise PickleRefused(
                f"{name} is a pickle checkpoint; lorafn accepts only {WEIGHTS_FILE} (pickles are never loaded)",
                file=name,
            )
        if base in (CONFIG_FILE, WEIGHTS_FILE) and any(PurePosixPath(n).name == base for n in self.seen):
            raise UnexpectedFile(f"the upload holds more than one {base}", file=name)
        self.seen.append(name)
        if base == CONFIG_FILE:
            return MAX_CONFIG_BYTES
        if base == WEIGHTS_FILE:
            return self.limits.max_member_bytes
        if base in IGNORED_FILES:
            return None
        raise UnexpectedFile(f"unexpected file {name!r}: an adapter is {CONFIG_FILE} and {WEIGHTS_FILE}", file=name)

    def upload(self, kept: Mapping[str, Member]) -> UploadFiles:
        """The two files out of the kept members; the weights' header length is checked before they are read."""
        by_base = {PurePosixPath(name).name: m for name, m in kept.items()}
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if required not in by_base:
                raise MissingFile(f"{required} is missing from the upload", file=required)
        weights = by_base[WEIGHTS_FILE]
        prefix = weights.file.read(8)
        if len(prefix) == 8:
            _check_header_length(struct.unpack("<Q", prefix)[0], weights.size - 8, MAX_HEADER_BYTES)
        weights.file.seek(0)
        return UploadFiles(config=by_base[CONFIG_FILE].file.read(), weights=weights.file.read())


def files_from_mapping(files: dict[str, bytes]) -> UploadFiles:
    """Pick the config and weights out of named files (a directory's)."""
    for name in files:
        base = PurePosixPath(name).name
        if base.endswith(PICKLE_SUFFIXES):
            raise PickleRefused(
                f"{name} is a pickle checkpoint; lorafn accepts only {WEIGHTS_FILE} (pickles are never loaded)",
                file=name,
            )
    by_base: dict[str, bytes] = {}
    for name, data in files.items():
        base = PurePosixPath(name).name
        if base in by_base and base in (CONFIG_FILE, WEIGHTS_FILE):
            raise UnexpectedFile(f"the upload holds more than one {base}", file=name)
        by_base[base] = data
    for name in files:
        base = PurePosixPath(name).name
        if base not in (CONFIG_FILE, WEIGHTS_FILE) and base not in IGNORED_FILES:
            raise UnexpectedFile(
                f"unexpected file {name!r}: an adapter is {CONFIG_FILE} and {WEIGHTS_FILE}", file=name
            )
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in by_base:
            raise MissingFile(f"{required} is missing from the upload", file=required)
    return UploadFiles(config=by_base[CONFIG_FILE], weights=by_base[WEIGHTS_FILE])


def _read_directory(path: Path, *, max_bytes: int) -> UploadFiles:
    files: dict[str, bytes] = {}
    total = 0
    for entry in sorted(path.iterdir()):
        if entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name.endswith(PICKLE_SUFFIXES):
            files[entry.name] = b""  # refused by name below; never read, never unpickled
            continue
        if entry.name not in (CONFIG_FILE, WEIGHTS_FILE):
            continue  # a checkpoint directory often holds other files; only the two matter
        total += entry.stat().st_size
        if total > max_bytes:
            raise UploadTooLarge(f"adapter files exceed the limit of {max_bytes} bytes", limit=max_bytes)
        files[entry.name] = entry.read_bytes()
    return files_from_mapping(files)


def _read_archive(f: BinaryIO, limits: ArchiveLimits) -> UploadFiles:
    size = f.seek(0, os.SEEK_END)
    policy = _AdapterMembers(limits)
    with extract(f, size, limits, policy) as kept:
        if not policy.seen:
            raise EmptyArchive("the archive holds no files")
        return policy.upload(kept)


# -- validation ----------------------------------------------------------------------------------------


def parse_config(data: bytes) -> dict[str, Any]:
    """Parse and check adapter_config.json; refuse features lorafn does not serve, naming the field."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigInvalid(f"{CONFIG_FILE} is {len(data)} bytes, above {MAX_CONFIG_BYTES}", size=len(data))
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as e:  # also: nesting too deep, integers of over 4300 digits
        raise ConfigInvalid(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConfigInvalid(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedFeature(f"peft_type is {peft_type!r}; lorafn serves LORA adapters", field="peft_type")
    if config.get("use_dora"):
        raise UnsupportedFeature("use_dora is true: DoRA adapters are not supported", field="use_dora")
    if config.get("modules_to_save"):
        raise UnsupportedFeature(
            f"modules_to_save is {config['modules_to_save']!r}: fully trained modules cannot share the backbone",
            field="modules_to_save",
        )
    if config.get("fan_in_fan_out"):
        raise UnsupportedFeature("fan_in_fan_out is true: Conv1D (GPT-2 style) layouts are not supported",
                                 field="fan_in_fan_out")
    if config.get("bias", "none") not in ("none", None):
        raise UnsupportedFeature(f"bias is {config['bias']!r}: adapters that train biases are not supported",
                                 field="bias")
    for key in ("trainable_token_indices", "layer_replication"):
        if config.get(key):
            raise UnsupportedFeature(f"{key} is set: not supported", field=key)
    targets = config.get("target_modules")
    if not isinstance(targets, str | list | None):
        raise ConfigInvalid(f"target_modules must be a list of names or a pattern, got {targets!r}",
                            field="target_modules")
    target_list = [targets] if isinstance(targets, str) else list(targets or [])
    for t in target_list:
        if isinstance(t, str) and _EMBEDDING_KEY.search(t):
            raise UnsupportedFeature(f"target_modules names {t!r}: embedding and lm_head LoRA are not supported",
                                     field="target_modules")
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool):
        raise ConfigInvalid(f"r must be an integer, got {r!r}", field="r")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ConfigInvalid(f"lora_alpha must be a finite number, got {alpha!r}", field="lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ConfigInvalid(f"{key} must be an object, got {pattern!r}", field=key)
        for k, v in pattern.items():
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigInvalid(f"{key}[{k!r}] must be a finite number, got {v!r}", field=key)
            try:
                re.compile(_pattern_regex(k))  # as _pattern_value uses it
            except (re.error, RecursionError, OverflowError) as e:
                raise ConfigInvalid(f"{key} key {k!r} is not a valid pattern: {e}", field=key) from e
    base_model = config.get("base_model_name_or_path")
    if not isinstance(base_model, str | None):
        raise ConfigInvalid(f"base_model_name_or_path must be a string, got {base_model!r}",
                            field="base_model_name_or_path")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ConfigInvalid(f"use_rslora must be true or false, got {config['use_rslora']!r}", field="use_rslora")
    return config


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _pattern_value(pattern: dict[str, Any], module_path: str, default: float) -> float:
    """PEFT's rule: the first key K such that the module path matches `(.*\\.)?(K)$` wins."""
    for key, value in pattern.items():
        if re.match(_pattern_regex(key), module_path):
            return value
    return default


def _check_header_length(header_len: int, available: int, max_header_bytes: int) -> None:
    """The safetensors header length (the file's first 8 bytes) against the limit and the bytes that follow."""
    if header_len > max_header_bytes:
        raise HeaderTooLarge(
            f"{WEIGHTS_FILE} header claims {header_len} bytes, above the limit of {max_header_bytes}",
            header_bytes=header_len, limit=max_header_bytes,
        )
    if header_len > available:
        raise SafetensorsInvalid(
            f"{WEIGHTS_FILE} is truncated: header claims {header_len} bytes but the file has {available}",
            header_bytes=header_len, size=available + 8,
        )


def parse_safetensors_header(data: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Check the safetensors framing and every tensor entry before safetensors itself reads the file."""
    if len(data) < 8:
        raise SafetensorsInvalid(f"{WEIGHTS_FILE} is {len(data)} bytes: too short to hold a header", size=len(data))
    (header_len,) = struct.unpack("<Q", data[:8])
    _check_header_length(header_len, len(data) - 8, max_header_bytes)
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as e:
        raise SafetensorsInvalid(f"{WEIGHTS_FILE} header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise SafetensorsInvalid(f"{WEIGHTS_FILE} header must be a JSON object")
    data_len = len(data) - 8 - header_len
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise SafetensorsInvalid(f"tensor {key!r} has a malformed header entry", key=key)
        dtype = entry["dtype"]
        if dtype not in DTYPES:
            raise UnsupportedDtype(f"tensor {key!r} has dtype {dtype}; accepted: F16, BF16, F32", key=key, dtype=dtype)
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsInvalid(f"tensor {key!r} has an invalid shape {shape!r}", key=key)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise SafetensorsInvalid(f"tensor {key!r} has invalid data_offsets {offsets!r}", key=key)
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (0 <= begin <= end <= data_len) or end - begin != expected:
            raise SafetensorsInvalid(
                f"tensor {key!r} has data_offsets {offsets} that do not fit its shape {shape} ({expected} bytes) "
                f"within {data_len} bytes of data: the file is truncated or corrupt",
                key=key, offsets=offsets, expected_bytes=expected,
            )
    return header


def validate(files: UploadFiles, spec: BackboneSpec, *, max_rank: int = 128) -> ParsedAdapter:
    """Validate an upload against the backbone; return the parsed adapter or raise an AdapterInvalid."""
    config = parse_config(files.config)
    header = parse_safetensors_header(files.weights)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in header:
        if key == "__metadata__":
            continue
        if _EMBEDDING_KEY.search(key):
            raise UnsupportedFeature(f"tensor {key!r} is an embedding or lm_head LoRA weight: not supported", key=key)
        m = _KEY.match(key)
        if m is None:
            raise UnknownTensorKey(
                f"tensor key {key!r} is not a LoRA weight of a decoder projection "
                f"(expected base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight)",
                key=key,
            )
        layer, parent, module, ab = int(m["layer"]), m["parent"], m["module"], m["ab"]
        if module not in _MODULE_PARENT or _MODULE_PARENT[module] != parent:
            raise UnsupportedModule(
                f"tensor {key!r} adapts {parent}.{module}; supported: {', '.join(MODULES)}", key=key, module=module
            )
        if layer >= spec.num_layers:
            raise LayerOutOfRange(
                f"tensor {key!r} names layer {layer} but the backbone has {spec.num_layers} layers",
                key=key, layer=layer, num_layers=spec.num_layers,
            )
        slot = pairs.setdefault((layer, module), {})
        if ab in slot:
            raise UnknownTensorKey(f"tensor {key!r} duplicates {slot[ab]!r}", key=key)
        slot[ab] = key
    if not pairs:
        raise EmptyAdapter(f"{WEIGHTS_FILE} holds no LoRA weights")
    for (layer, module), slot in sorted(pairs.items()):
        if set(slot) != {"A", "B"}:
            have = next(iter(slot.values()))
            raise MissingLoraPair(
                f"layers.{layer}.{module} has only lora_{next(iter(slot))} ({have!r}); both A and B are needed",
                key=have,
            )

    try:
        raw = load_safetensors(files.weights)
    except Exception as e:  # safetensors raises its own error types; any failure here is a corrupt file
        raise SafetensorsInvalid(f"{WEIGHTS_FILE} cannot be read: {e}") from e

    r_default = config.get("r", 8)
    alpha_default = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    shapes = spec.module_shapes()
    modules: dict[tuple[int, str], ModuleSpec] = {}
    tensors: dict[str, torch.Tensor] = {}
    dtypes = set()
    for (layer, module), slot in sorted(pairs.items()):
        a, b = raw[slot["A"]], raw[slot["B"]]
        in_f, out_f = shapes[module]
        if a.dim() != 2 or b.dim() != 2:
            raise ShapeMismatch(
                f"{slot['A']!r} is {list(a.shape)} and {slot['B']!r} is {list(b.shape)}: LoRA matrices are 2-D",
                key=slot["A"],
            )
        rank = a.shape[0]
        if a.shape[1] != in_f:
            raise ShapeMismatch(
                f"{slot['A']!r} has shape {list(a.shape)}; {module} of this backbone needs [r, {in_f}]",
                key=slot["A"], shape=list(a.shape), expected=["r", in_f],
            )
        if b.shape[0] != out_f:
            raise ShapeMismatch(
                f"{slot['B']!r} has shape {list(b.shape)}; {module} of this backbone needs [{out_f}, r]",
                key=slot["B"], shape=list(b.shape), expected=[out_f, "r"],
            )
        if b.shape[1] != rank:
            raise ShapeMismatch(
                f"{slot['B']!r} has rank {b.shape[1]} but {slot['A']!r} has rank {rank}",
                key=slot["B"], shape=list(b.shape),
            )
        if rank < 1 or rank > max_rank:
            raise InvalidRank(
                f"layers.{layer}.{module} has rank {rank}; accepted ranks are 1..{max_rank}",
                key=slot["A"], rank=rank, max_rank=max_rank,
            )
        path = f"model.layers.{layer}.{_MODULE_PARENT[module]}.{module}"
        declared = _pattern_value(rank_pattern, path, r_default)
        if declared != rank:
            raise InvalidRank(
                f"layers.{layer}.{module} has rank {rank} in its tensors but the config declares {declared} "
                f"(r / rank_pattern)", key=slot["A"], rank=rank, declared=declared,
            )
        for key, t in ((slot["A"], a), (slot["B"], b)):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteValues(f"tensor {key!r} holds NaN or infinite values", key=key)
            dtypes.add(_DTYPE_NAMES[t.dtype])
        alpha = float(_pattern_value(alpha_pattern, path, alpha_default))
        modules[(layer, module)] = ModuleSpec(layer=layer, module=module, rank=rank, alpha=alpha)
        tensors[f"layers.{layer}.{module}.lora_A"] = a.contiguous()
        tensors[f"layers.{layer}.{module}.lora_B"] = b.contiguous()
    return ParsedAdapter(
        modules=modules,
        tensors=tensors,
        lora_alpha=alpha_default,
        use_rslora=bool(config.get("use_rslora", False)),
        base_model=config.get("base_model_name_or_path"),
        dtype="+".join(sorted(dtypes)),
        peft_config=config,
    )


# -- canonical blob ------------------------------------------------------------------------------------


def canonical_blob(adapter: ParsedAdapter) -> bytes:
    """One safetensors file: canonical keys, resolved settings in `__metadata__`. Deterministic."""
    settings = {
        "format": CANONICAL_FORMAT,
        "use_rslora": adapter.use_rslora,
        "lora_alpha": adapter.lora_alpha,
        "base_model": adapter.base_model,
        "modules": {m.name: {"rank": m.rank, "alpha": m.alpha} for _, m in sorted(adapter.modules.items())},
    }
    metadata = {"lorafn": json.dumps(settings, sort_keys=True, separators=(",", ":"))}
    ordered = {k: adapter.tensors[k] for k in sorted(adapter.tensors)}
    return save_safetensors(ordered, metadata=metadata)


def blob_sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def load_canonical(blob: bytes) -> ParsedAdapter:
    """Read a blob written by `canonical_blob` (what workers download) back into a ParsedAdapter."""
    header = parse_safetensors_header(blob)
    meta = header.get("__metadata__") or {}
    try:
        settings = json.loads(meta["lorafn"])
    except (KeyError, json.JSONDecodeError) as e:
        raise SafetensorsInvalid("blob is not a lorafn canonical adapter (no lorafn metadata)") from e
    if settings.get("format") != CANONICAL_FORMAT:
        raise SafetensorsInvalid(f"blob format {settings.get('format')!r} is not {CANONICAL_FORMAT}")
    tensors = load_safetensors(blob)
    modules: dict[tuple[int, str], ModuleSpec] = {}
    for name, s in settings["modules"].items():
        _, layer, module = name.split(".")
        modules[(int(layer), module)] = ModuleSpec(int(layer), module, int(s["rank"]), float(s["alpha"]))
    for key in tensors:
        if not _CANONICAL_KEY.match(key):
            raise SafetensorsInvalid(f"blob has a non-canonical tensor key {key!r}")
    dtypes = {_DTYPE_NAMES[t.dtype] for t in tensors.values()}
    return ParsedAdapter(
        modules=modules,
        tensors=tensors,
        lora_alpha=float(settings["lora_alpha"]),
        use_rslora=bool(settings["use_rslora"]),
        base_model=settings.get("base_model"),
        dtype="+".join(sorted(dtypes)),
    )


def narrowed_blob(blob: bytes, dtype: torch.dtype) -> bytes:
    """A canonical blob with its floating tensors wider than `dtype` cast to it: what a worker whose adapter pool
    holds `dtype` keeps in its host tier (workers.tiers). A float32 blob takes half the bytes in bfloat16 or
    float16, and the pool's pages come out bit for bit the same: the pool rounds a tensor to its dtype when it
    copies one in (round to nearest even), and this rounds it the same way, only earlier. The same blob when no
    tensor is wider than `dtype` (or `dtype` is 32-bit). Still a canonical blob: `load_canonical` reads it."""
    if dtype.itemsize >= 4:
        return blob
    tensors = load_canonical(blob).tensors
    if all(not t.is_floating_point() or t.element_size() <= dtype.itemsize for t in tensors.values()):
        return blob
    metadata = parse_safetensors_header(blob).get("__metadata__")
    narrowed = {k: t.to(dtype) if t.is_floating_point() and t.element_size() > dtype.itemsize else t
                for k, t in sorted(tensors.items())}
    return save_safetensors(narrowed, metadata=metadata)


def refusal_summary(error: AdapterInvalid) -> dict[str, Any]:
    """A JSON-able description of a refusal (for the CLI and the HTTP API)."""
    return {"code": error.code, "message": str(error), **error.detail}


def write_peft_adapter(
    path: Path,
    spec: BackboneSpec,
    *,
    rank: int,
    modules: tuple[str, ...] = MODULES,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.02,
    base_model: str | None = None,
) -> Path:
    """Write a random LoRA adapter in PEFT's on-disk format (config + safetensors) for every layer.

    For demos and benchmarks that need many adapters of chosen ranks without training; the files are
    what `peft.PeftModel.save_pretrained` writes, so PEFT itself loads them too.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = spec.module_shapes()
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(spec.num_layers):
        for module in modules:
            in_f, out_f = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{_MODULE_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * (1.0 / math.sqrt(in_f))
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or spec.name,
        "r": rank,
        "lora_alpha": lora_alpha if lora_alpha is not None else 2 * rank,
        "target_modules": list(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (path / WEIGHTS_FILE).write_bytes(save_safetensors(tensors))
    return path
