"""Loading backbone weights: Hugging Face checkpoint directories and GGUF files, into one naming.

Every loader returns a `Checkpoint`: the `BackboneSpec` and a dict of tensors under the Hugging Face
Llama names (`model.layers.3.self_attn.q_proj.weight`, ...), already in the requested dtype and device.
`load_backbone` turns one into a `workers.model.Backbone`.

GGUF specifics handled here:
- dequantisation of F32, F16, BF16, Q8_0, Q4_0, Q4_1 with vectorised torch ops (any other type the
  `gguf` package knows goes through its slower numpy dequantiser);
- llama.cpp's rotary row permutation of q/k (applied by its converter for the `llama` architecture)
  is undone per head;
- `rope_freqs.weight` (Llama-3 rope scaling baked into per-frequency divisors) is returned separately.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from storage.backbone import DEFAULT_BACKBONE_NAME, BackboneSpec, default_gguf_path
from storage.gguf_file import GGUFFile

if TYPE_CHECKING:
    from workers.model import Backbone

logger = logging.getLogger(__name__)

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# GGUF architectures whose converter permuted q/k rows for llama.cpp's interleaved rotary layout.
_ROTARY_PERMUTED_ARCHS = ("llama",)
_SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_ROPE_FREQS = "rope_freqs.weight"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message says which file and why."""


class UnsupportedArchitecture(CheckpointError):
    def __init__(self, architecture: str, supported: tuple[str, ...]) -> None:
        super().__init__(
            f"architecture {architecture!r} is not supported (supported: {', '.join(supported)})"
        )
        self.architecture = architecture
        self.supported = supported


class MissingWeight(CheckpointError):
    def __init__(self, name: str, source: Path) -> None:
        super().__init__(f"{source}: tensor {name!r} is missing")
        self.name = name
        self.source = source


@dataclass
class Checkpoint:
    """Weights of a Llama-family decoder under Hugging Face names, ready for `Backbone.from_checkpoint`."""

    spec: BackboneSpec
    tensors: dict[str, torch.Tensor]
    # [head_dim // 2] divisors of the rotary inverse frequencies (llama.cpp's rope_freqs), or None
    rope_freq_factors: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Dequantisation


def dequantize(
    raw: np.ndarray | torch.Tensor,
    ggml_type: GGMLQuantizationType,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode the stored bytes of one GGUF tensor into a `shape` tensor of `dtype` (CPU).

    raw:   uint8 [nbytes], exactly the bytes the file stores for the tensor
    shape: torch order (rows first); the last dimension is the one GGML blocks run along
    Quantised types are decoded in float32 with the same operation order as `gguf.quants`, then cast.
    """
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)) if isinstance(raw, np.ndarray) else raw
    numel = int(np.prod(shape)) if shape else 1
    if ggml_type == GGMLQuantizationType.F32:
        values = data.view(torch.float32)
    elif ggml_type == GGMLQuantizationType.F16:
        values = data.view(torch.float16)
    elif ggml_type == GGMLQuantizationType.BF16:
        values = data.view(torch.bfloat16)
    elif ggml_type in _DEQUANTIZERS:
        block_bytes = GGML_QUANT_SIZES[ggml_type][1]
        blocks = data.view(-1, block_bytes)  # [num_blocks, block_bytes]
        values = _DEQUANTIZERS[ggml_type](blocks).reshape(-1)  # [num_blocks * block_elements] fp32
    else:
        from gguf.quants import dequantize as gguf_dequantize

        values = torch.from_numpy(
            np.ascontiguousarray(gguf_dequantize(data.numpy(), ggml_type), dtype=np.float32)
        )
    if values.numel() != numel:
        raise CheckpointError(
            f"{ggml_type.name} data holds {values.numel()} values, shape {shape} needs {numel}"
        )
    return values.reshape(shape).to(dtype)


def _block_scale(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scalar at byte `start` of each block, as fp32 [num_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 16] packed bytes -> [num_blocks, 32] values: low nibbles first, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: fp16 d, 32 x int8 q; value = d * q
    return _block_scale(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: fp16 d, 16 bytes of nibbles; value = d * (q - 8)
    q = _nibbles(blocks[:, 2:18]).to(torch.int8) - 8
    return _block_scale(blocks, 0) * q.float()


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block: fp16 d, fp16 m, 16 bytes of nibbles; value = d * q + m
    q = _nibbles(blocks[:, 4:20]).float()
    return _block_scale(blocks, 0) * q + _block_scale(blocks, 2)


_DEQUANTIZERS = {
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
}


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`), head by head.

    llama.cpp stores each head's rows interleaved as (pair, 2); Hugging Face's rotate-half layout keeps
    them as (2, pair). weight: [num_heads * head_dim, ...] (a weight or a bias); same shape returned.
    """
    pair = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, pair, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------------------
# GGUF


def _hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor name, or None for tensors the model does not use."""
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def load_gguf(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: str | None = None,
) -> Checkpoint:
    """Read and dequantise every model tensor of a GGUF file into `dtype` on `device`."""
    started = time.perf_counter()
    file = GGUFFile.open(path)
    if file.architecture not in _SUPPORTED_GGUF_ARCHS:
        raise UnsupportedArchitecture(file.architecture, _SUPPORTED_GGUF_ARCHS)
    spec = BackboneSpec.from_gguf(file, name=name)
    permute = file.architecture in _ROTARY_PERMUTED_ARCHS
    tensors: dict[str, torch.Tensor] = {}
    rope_freq_factors = None
    for info in file.tensors.values():
        hf_name = _hf_name(info.name)
        if info.name == _GGUF_ROPE_FREQS:
            rope_freq_factors = dequantize(file.raw(info.name), info.ggml_type, info.shape).to(device)
            continue
        if hf_name is None:
            logger.debug("ignoring GGUF tensor %s", info.name)
            continue
        tensor = dequantize(file.raw(info.name), info.ggml_type, info.shape, dtype=dtype)
        if permute and ".q_proj." in hf_name:
            tensor = unpermute_rotary_rows(tensor, spec.num_heads)
        elif permute and ".k_proj." in hf_name:
            tensor = unpermute_rotary_rows(tensor, spec.num_kv_heads)
        tensors[hf_name] = tensor.to(device)
    logger.info(
        "loaded %s (%d tensors) in %.2f s", file.path.name, len(tensors), time.perf_counter() - started
    )
    return Checkpoint(spec=spec, tensors=tensors, rope_freq_factors=rope_freq_factors)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json exists")


def load_hf_dir(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: str | None = None,
) -> Checkpoint:
    """Read a Hugging Face checkpoint directory (config.json + single or sharded safetensors)."""
    from safetensors import safe_open

    directory = Path(path)
    config = json.loads((directory / "config.json").read_text())
    model_type = str(config.get("model_type", "llama"))
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(model_type, _SUPPORTED_MODEL_TYPES)
    spec = BackboneSpec.from_hf_config(config, name=name)
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not (key.startswith("model.") or key == "lm_head.weight") or key.endswith(
                    "rotary_emb.inv_freq"
                ):
                    continue
                if key == "lm_head.weight" and spec.tie_word_embeddings:
                    continue
                tensors[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    return Checkpoint(spec=spec, tensors=tensors)


# ---------------------------------------------------------------------------------------------------------
# Entry points


def load_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: str | None = None,
) -> Checkpoint:
    """A GGUF file (`*.gguf`) or a Hugging Face checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype, device=device, name=name)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, dtype=dtype, device=device, name=name)
    raise CheckpointError(f"{path} is neither a checkpoint directory nor a .gguf file")


def load_backbone(
    path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: str | None = None,
) -> Backbone:
    """Load a `Backbone` from `path`, or the default backbone (SmolLM2-135M-Instruct GGUF) when None."""
    from workers.model import Backbone

    if path is None:
        path, name = default_gguf_path(), name or DEFAULT_BACKBONE_NAME
    return Backbone.from_checkpoint(load_checkpoint(path, dtype=dtype, device=device, name=name))
