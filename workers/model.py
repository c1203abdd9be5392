"""The backbone: a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a flattened batch.

A step of the serving engine runs the tokens of many sequences at once (prefill chunks and decode
tokens mixed) as one flat `[num_tokens]` batch; `AttentionMetadata` says which tokens belong to which
sequence and where their context lives in the `PagedKVCache`.

    backbone = load_backbone()                             # workers.weights: default SmolLM2 GGUF
    hidden = backbone(input_ids, positions, attn, kv)      # [num_tokens, hidden_size], final norm applied
    logits = backbone.compute_logits(hidden[attn.last_token_indices])   # [num_seqs, vocab_size]

The q/k/v projections run as one fused matmul and gate/up as another. After each of the seven
projections the optional `LoraApplier` adds its delta in place into that projection's output (a
column-slice view of the fused output for q/k/v and gate/up).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storage.backbone import BackboneSpec
from workers.kv_cache import AttentionMetadata, PagedKVCache

if TYPE_CHECKING:
    from workers.weights import Checkpoint

__all__ = ["AttentionMetadata", "Backbone", "LoraApplier", "PagedKVCache", "UnsupportedRopeScaling"]


class LoraApplier(Protocol):
    """Adds the LoRA deltas of the batch's adapters to the backbone's projections."""

    def apply(self, layer: int, module: str, x: Tensor, y: Tensor) -> None:
        """In place: `y += delta` of projection `module` ("q_proj".."down_proj") of `layer` for input `x`.

        x: [num_tokens, in_features]; y: [num_tokens, out_features], possibly a column-slice view of a
        fused output (so not contiguous).
        """
        ...


class UnsupportedRopeScaling(ValueError):
    def __init__(self, rope_type: str) -> None:
        super().__init__(
            f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
        )
        self.rope_type = rope_type


class MissingTensor(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(f"checkpoint has no tensor {name!r}")
        self.name = name


def rope_inv_freq(spec: BackboneSpec, freq_factors: Tensor | None = None) -> Tensor:
    """Rotary inverse frequencies [head_dim // 2] (fp32), with the spec's rope scaling applied.

    freq_factors: llama.cpp's `rope_freqs` divisors; when given they replace `rope_scaling`.
    """
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if freq_factors is not None:
        return inv_freq / freq_factors.float().cpu()
    scaling = spec.rope_scaling or {}
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        raise UnsupportedRopeScaling(rope_type)
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32. x: [num_tokens, hidden]."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding. x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP, with fused q/k/v and gate/up projections."""

    def __init__(self, spec: BackboneSpec, index: int, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.index = index
        self.eps = spec.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_width, self.kv_width = spec.q_width, spec.kv_width
        self.ffn_width = spec.intermediate_size
        prefix = f"model.layers.{index}."

        def get(name: str) -> Tensor:
            if prefix + name not in tensors:
                raise MissingTensor(prefix + name)
            return tensors[prefix + name]

        def optional(name: str) -> nn.Parameter | None:
            t = tensors.get(prefix + name)
            return None if t is None else _frozen(t)

        def fused_bias(names: tuple[str, ...], widths: tuple[int, ...]) -> nn.Parameter | None:
            biases = [tensors.get(prefix + n) for n in names]
            if all(b is None for b in biases):
                return None
            like = next(b for b in biases if b is not None)
            return _frozen(
                torch.cat(
                    [b if b is not None else like.new_zeros(w) for b, w in zip(biases, widths, strict=True)]
                )
            )

        attn, mlp = "self_attn.", "mlp."
        self.input_norm = _frozen(get("input_layernorm.weight"))
        self.post_attention_norm = _frozen(get("post_attention_layernorm.weight"))
        # [q_width + 2 * kv_width, hidden]
        self.qkv_weight = _frozen(torch.cat([get(attn + f"{p}_proj.weight") for p in "qkv"]))
        self.qkv_bias = fused_bias(
            tuple(attn + f"{p}_proj.bias" for p in "qkv"), (self.q_width, self.kv_width, self.kv_width)
        )
        self.o_weight = _frozen(get(attn + "o_proj.weight"))  # [hidden, q_width]
        self.o_bias = optional(attn + "o_proj.bias")
        # [2 * intermediate, hidden]
        self.gate_up_weight = _frozen(torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]))
        self.gate_up_bias = fused_bias((mlp + "gate_proj.bias", mlp + "up_proj.bias"), (self.ffn_width,) * 2)
        self.down_weight = _frozen(get(mlp + "down_proj.weight"))  # [hidden, intermediate]
        self.down_bias = optional(mlp + "down_proj.bias")

    def forward(
        self,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn: AttentionMetadata,
        kv: PagedKVCache,
        lora: LoraApplier | None,
    ) -> Tensor:
        """hidden: [num_tokens, hidden] residual stream in, residual stream out."""
        layer, t = self.index, hidden.shape[0]
        q_end, k_end = self.q_width, self.q_width + self.kv_width

        x = rms_norm(hidden, self.input_norm, self.eps)  # [T, hidden]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # [T, q_width + 2 * kv_width]
        if lora is not None:
            lora.apply(layer, "q_proj", x, qkv[:, :q_end])
            lora.apply(layer, "k_proj", x, qkv[:, q_end:k_end])
            lora.apply(layer, "v_proj", x, qkv[:, k_end:])
        q = apply_rope(qkv[:, :q_end].view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(qkv[:, q_end:k_end].view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = qkv[:, k_end:].view(t, self.num_kv_heads, self.head_dim)
        context = kv.attend(layer, q, k, v, attn)  # [T, q_width]
        o = F.linear(context, self.o_weight, self.o_bias)  # [T, hidden]
        if lora is not None:
            lora.apply(layer, "o_proj", context, o)
        hidden = hidden + o

        x = rms_norm(hidden, self.post_attention_norm, self.eps)
        gate_up = F.linear(x, self.gate_up_weight, self.gate_up_bias)  # [T, 2 * intermediate]
        gate, up = gate_up[:, : self.ffn_width], gate_up[:, self.ffn_width :]
        if lora is not None:
            lora.apply(layer, "gate_proj", x, gate)
            lora.apply(layer, "up_proj", x, up)
        act = F.silu(gate).mul_(up)  # [T, intermediate]
        down = F.linear(act, self.down_weight, self.down_bias)  # [T, hidden]
        if lora is not None:
            lora.apply(layer, "down_proj", act, down)
        return hidden + down


class Backbone(nn.Module):
    """Llama-family decoder over a flattened batch; weights are frozen (inference only)."""

    inv_freq: Tensor  # [head_dim // 2] fp32 rotary inverse frequencies (a non-persistent buffer)

    def __init__(
        self, spec: BackboneSpec, tensors: Mapping[str, Tensor], *, rope_freq_factors: Tensor | None = None
    ) -> None:
        """Build from tensors under Hugging Face names; tensors are used as given (no copy, except fusing)."""
        super().__init__()
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(
                f"{spec.num_heads} attention heads are not a multiple of {spec.num_kv_heads} KV heads"
            )
        self.spec = spec
        if "model.embed_tokens.weight" not in tensors:
            raise MissingTensor("model.embed_tokens.weight")
        self.embed_tokens = _frozen(tensors["model.embed_tokens.weight"])  # [vocab, hidden]
        self.layers = nn.ModuleList(DecoderLayer(spec, i, tensors) for i in range(spec.num_layers))
        if "model.norm.weight" not in tensors:
            raise MissingTensor("model.norm.weight")
        self.norm = _frozen(tensors["model.norm.weight"])
        if spec.tie_word_embeddings or "lm_head.weight" not in tensors:
            if not spec.tie_word_embeddings:
                raise MissingTensor("lm_head.weight")
            self.lm_head = self.embed_tokens  # the same Parameter: tied, never copied
        else:
            self.lm_head = _frozen(tensors["lm_head.weight"])  # [vocab, hidden]
        inv_freq = rope_inv_freq(spec, rope_freq_factors).to(self.embed_tokens.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim // 2] fp32

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Backbone:
        return cls(checkpoint.spec, checkpoint.tensors, rope_freq_factors=checkpoint.rope_freq_factors)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [num_tokens, 1, head_dim] for positions [num_tokens]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        attn: AttentionMetadata,
        kv: PagedKVCache,
        lora: LoraApplier | None = None,
    ) -> Tensor:
        """Run one step of the flattened batch and write its K/V into `kv`.

        input_ids: LongTensor [num_tokens]; positions: LongTensor [num_tokens] (position of each token in
        its sequence); returns the final-normed hidden states [num_tokens, hidden_size].
        """
        if input_ids.shape != positions.shape or input_ids.shape[0] != attn.num_tokens:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                f"must both be [{attn.num_tokens}] as the attention metadata says"
            )
        cos, sin = self.rotary(positions)
        hidden = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attn, kv, lora)
        return rms_norm(hidden, self.norm, self.spec.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden_size] (from `forward`) -> logits [N, vocab_size]."""
        return F.linear(hidden, self.lm_head)


def _frozen(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
