"""The backbone's logits against Hugging Face transformers, through the paged, flattened-batch path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from storage.backbone import MODULES
from workers.kv_cache import PagedKVCache
from workers.model import Backbone, rope_inv_freq
from workers.weights import load_backbone, load_hf_dir

transformers = pytest.importorskip("transformers")

logger = logging.getLogger(__name__)

TOLERANCE = 1e-3
VOCAB = 256
# Per sequence, the chunks it is fed in: prefill + decodes, chunked prefill + decodes, decode-only
# from a one-token prompt, a long prefill in three chunks, and a sequence that ends early.
SCHEDULES = [[9, 1, 1, 1], [5, 7, 1, 1], [1, 1, 1, 1, 1], [16, 8, 3, 1], [2, 1]]


def _tiny_config(**overrides):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    base.update(overrides)
    return base


def _save_tiny(
    tmp_path: Path, model_class, config_class, *, max_shard_size: str | None = None, **overrides
) -> object:
    torch.manual_seed(0)
    hf = model_class(config_class(**_tiny_config(**overrides))).eval()
    with torch.no_grad():  # random biases, so a wrong bias layout shows
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(tmp_path, **kwargs)
    return hf


def _reference_logits(hf, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf(seq[None]).logits[0] for seq in sequences]


def _sequences(vocab: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (sum(s),), generator=g) for s in SCHEDULES]


def _max_diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True))


TINY_VARIANTS = {
    "llama_tied": dict(),
    "llama_untied": dict(tie_word_embeddings=False),
    "llama3_rope_scaling": dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama_attention_bias": dict(attention_bias=True),
    "llama_sharded": dict(max_shard_size="50KB", tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_llama_matches_transformers(variant: str, tmp_path: Path, paged_logits) -> None:
    overrides = dict(TINY_VARIANTS[variant])
    shard = overrides.pop("max_shard_size", None)
    hf = _save_tiny(
        tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, max_shard_size=shard, **overrides
    )
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_backbone(tmp_path)
    seqs = _sequences(VOCAB)
    diff = _max_diff(paged_logits(model, seqs, SCHEDULES), _reference_logits(hf, seqs))
    logger.info("%s: max |logits - transformers| = %.3g", variant, diff)
    assert diff <= TOLERANCE


def test_tiny_qwen2_with_qkv_bias_matches_transformers(tmp_path: Path, paged_logits) -> None:
    if not hasattr(transformers, "Qwen2ForCausalLM"):
        pytest.skip("transformers has no Qwen2ForCausalLM")
    hf = _save_tiny(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config)
    model = load_backbone(tmp_path)
    assert model.layers[0].qkv_bias is not None and model.layers[0].o_bias is None
    seqs = _sequences(VOCAB)
    diff = _max_diff(paged_logits(model, seqs, SCHEDULES), _reference_logits(hf, seqs))
    logger.info("qwen2: max |logits - transformers| = %.3g", diff)
    assert diff <= TOLERANCE


def test_tied_embeddings_share_one_tensor(tmp_path: Path, backbone: Backbone) -> None:
    _save_tiny(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig)
    for model in (load_backbone(tmp_path), backbone):
        assert model.lm_head is model.embed_tokens
        assert model.lm_head.data_ptr() == model.embed_tokens.data_ptr()


def test_llama3_inv_freq_matches_transformers(tmp_path: Path) -> None:
    overrides = TINY_VARIANTS["llama3_rope_scaling"]
    _save_tiny(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, **overrides)
    spec = load_hf_dir(tmp_path).spec
    assert spec.rope_theta == 500000.0 and spec.rope_scaling["rope_type"] == "llama3"
    config = transformers.LlamaConfig(**_tiny_config(**overrides))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    torch.testing.assert_close(rope_inv_freq(spec), rotary.inv_freq, rtol=0, atol=0)


class _RecordingLora:
    """Adds x @ delta[layer, module].T in place and records the call order."""

    def __init__(self, deltas: dict[tuple[int, str], torch.Tensor]) -> None:
        self.deltas = deltas
        self.calls: list[tuple[int, str]] = []

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.calls.append((layer, module))
        y += x @ self.deltas[layer, module].T


def test_lora_applier_is_called_per_projection_and_adds_into_views(tmp_path: Path, paged_logits) -> None:
    _save_tiny(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig)
    checkpoint = load_hf_dir(tmp_path)
    spec = checkpoint.spec
    g = torch.Generator().manual_seed(3)
    deltas, merged = {}, dict(checkpoint.tensors)
    for layer in range(spec.num_layers):
        for module, (fan_in, fan_out) in spec.module_shapes().items():
            delta = torch.randn(fan_out, fan_in, generator=g) * 0.05
            deltas[layer, module] = delta
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"model.layers.{layer}.{group}.{module}.weight"
            merged[key] = merged[key] + delta
    lora = _RecordingLora(deltas)
    seqs = _sequences(VOCAB, seed=2)
    with_lora = paged_logits(Backbone(spec, checkpoint.tensors), seqs, SCHEDULES, lora=lora)
    reference = paged_logits(Backbone(spec, merged), seqs, SCHEDULES)
    assert _max_diff(with_lora, reference) <= TOLERANCE
    steps = max(len(s) for s in SCHEDULES)
    assert lora.calls == [
        (layer, m) for _ in range(steps) for layer in range(spec.num_layers) for m in MODULES
    ]


def test_forward_rejects_mismatched_batch(backbone: Backbone) -> None:
    kv = PagedKVCache(backbone.spec, 4)
    kv.allocate("a", 3)
    attn = kv.metadata(["a"], [3])
    with pytest.raises(ValueError, match=r"\[3\]"):
        backbone(torch.tensor([1, 2]), torch.tensor([0, 1]), attn, kv)


def test_default_gguf_matches_transformers_gguf(
    backbone: Backbone, hf_gguf_model, tokenizer, paged_logits
) -> None:
    """Our GGUF loading + paged batch vs transformers' own GGUF loading + full forward, per sequence."""
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Paged attention keeps the KV cache in fixed-size blocks",
        "1 2 3",
        "Bonjour! Comment ça va aujourd'hui? Très bien, merci.",
    ]
    prompts = [torch.tensor(tokenizer.encode(t)) for t in texts]
    g = torch.Generator().manual_seed(5)
    a, b, c, d = (len(p) for p in prompts)
    # prefill + chunked continuation + decodes, plain prefill + decodes, all-decode, chunked prefill
    schedules = [[a - 3, 3, 1, 1], [b, 1, 1], [1] * (c + 1), [d - 4, 4, 1]]
    seqs = [
        torch.cat([p, torch.randint(0, backbone.spec.vocab_size, (sum(s) - len(p),), generator=g)])
        for p, s in zip(prompts, schedules, strict=True)
    ]
    ours = paged_logits(backbone, seqs, schedules, block_size=16, num_blocks=64)
    diff = _max_diff(ours, _reference_logits(hf_gguf_model, seqs))
    logger.info("SmolLM2 GGUF: max |logits - transformers| = %.3g", diff)
    assert diff <= TOLERANCE


def test_default_model_greedy_answers_paris(backbone: Backbone, tokenizer) -> None:
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    kv = PagedKVCache(backbone.spec, 16, block_size=16)
    kv.allocate("q", len(prompt))
    ids, positions, query_len = torch.tensor(prompt), torch.arange(len(prompt)), len(prompt)
    detok = tokenizer.detokenizer(prompt)
    text = ""
    for _ in range(24):
        attn = kv.metadata(["q"], [query_len])
        hidden = backbone(ids, positions, attn, kv)
        token = int(backbone.compute_logits(hidden[attn.last_token_indices]).argmax(-1))
        if token in tokenizer.stop_token_ids:
            break
        text += detok.push(token)
        kv.append("q", 1)
        ids, positions, query_len = torch.tensor([token]), torch.tensor([kv.length("q") - 1]), 1
    text += detok.flush()
    logger.info("greedy answer: %r", text)
    assert "Paris" in text
