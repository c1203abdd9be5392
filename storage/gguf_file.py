"""Reading the container of a GGUF file: its metadata and its tensor table, without decoding any tensor.

`gguf.GGUFReader` parses every metadata array element by element (about 2 s for the default backbone's
49k-token vocabulary); this reader maps the file and walks it with `struct`, skipping the string arrays
(vocabulary, merges) unless they are asked for, so opening a file costs milliseconds. Decoding the
tensors themselves (dequantisation) is `workers.weights`' job.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types with a fixed width: type id -> struct format.
_SCALAR_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    shape: tuple[int, ...]  # torch order (slowest dimension first), i.e. GGUF's dims reversed
    ggml_type: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int

    @property
    def num_elements(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file opened for reading: metadata values, tensor table and a read-only memory map.

    String arrays that were not asked for (`string_arrays` of `open`) are stored as their length.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    blob: np.ndarray  # uint8 memmap of the whole file

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def arch_field(self, key: str, default: Any = None) -> Any:
        """`<architecture>.<key>` from the metadata, or `default`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (a read-only uint8 view into the memory map)."""
        info = self.tensors[name]
        return self.blob[info.offset : info.offset + info.nbytes]

    @classmethod
    def open(cls, path: str | Path, *, string_arrays: Container[str] = ()) -> GGUFFile:
        """Parse the header of `path`; `string_arrays` names the string-array keys to read in full."""
        path = Path(path)
        blob = np.memmap(path, mode="r", dtype=np.uint8)
        buf = blob.data  # memoryview of the mapping
        if bytes(buf[:4]) != _MAGIC:
            raise GGUFFormatError(path, "does not start with the GGUF magic bytes")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version not in _VERSIONS:
            raise GGUFFormatError(path, f"GGUF version {version} is not one of {_VERSIONS}")
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, pos = _read_string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = _read_value(buf, pos + 4, value_type, key in string_arrays, path)
        if "general.architecture" not in metadata:
            raise GGUFFormatError(path, "metadata has no general.architecture")

        entries = []
        for _ in range(tensor_count):
            name, pos = _read_string(buf, pos)
            (ndims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndims)
            pos += 4 + 8 * ndims + 12
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (pos + alignment - 1) // alignment * alignment

        tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, type_id, offset in entries:
            try:
                ggml_type = GGMLQuantizationType(type_id)
            except ValueError as e:
                raise GGUFFormatError(path, f"tensor {name} has unknown ggml type {type_id}") from e
            block_elements, block_bytes = GGML_QUANT_SIZES[ggml_type]
            nbytes = prod(shape) // block_elements * block_bytes
            tensors[name] = GGUFTensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
        return cls(path=path, metadata=metadata, tensors=tensors, blob=blob)


def _read_string(blob: memoryview, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    return bytes(blob[pos : pos + length]).decode("utf-8", errors="replace"), pos + length


def _read_value(
    blob: memoryview, pos: int, value_type: int, keep_strings: bool, path: Path
) -> tuple[Any, int]:
    """One metadata value and the offset just past it."""
    if value_type in _SCALAR_FORMAT:
        fmt = "<" + _SCALAR_FORMAT[value_type]
        (value,) = struct.unpack_from(fmt, blob, pos)
        return value, pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(blob, pos)
    if value_type == _ARRAY:
        element_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element_type in _SCALAR_FORMAT:
            fmt = f"<{count}{_SCALAR_FORMAT[element_type]}"
            return list(struct.unpack_from(fmt, blob, pos)), pos + struct.calcsize(fmt)
        if element_type != _STRING:
            raise GGUFFormatError(path, f"metadata array of element type {element_type} is not supported")
        if keep_strings:
            values = []
            for _ in range(count):
                value, pos = _read_string(blob, pos)
                values.append(value)
            return values, pos
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", blob, pos)
            pos += 8 + length
        return count, pos
    raise GGUFFormatError(path, f"metadata value type {value_type} is not supported")
