"""A tiny random Llama backbone with the default backbone's tokenizer, for tests and demos.

`write_tiny_backbone(dir)` writes a Hugging Face checkpoint directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template) that `load_backbone(dir)` and
`Tokenizer.load(dir)` read like any other. Its weights are random, so its text is gibberish, but every
code path (chat template, stop tokens, adapters, paging) is the real one, and it generates on a CPU in
milliseconds per token. Adapters for it come from `storage.adapter_format.write_peft_adapter` with
`BackboneSpec.from_hf_dir(dir)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workers.tokenizer import Tokenizer


def write_tiny_backbone(
    directory: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write the checkpoint into `directory` (created if needed) and return it."""
    from safetensors.torch import save_file

    tok = tokenizer or Tokenizer.load()
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tok.vocab_size
    head_dim = hidden_size // num_heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden_size), "model.norm.weight": torch.ones(hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(hidden_size),
            p + "self_attn.q_proj.weight": rand(num_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.o_proj.weight": rand(hidden_size, num_heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": rand(hidden_size, intermediate_size),
        }
    save_file(tensors, str(directory / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tok.backend.save(str(directory / "tokenizer.json"))

    def name(token_id: int | None) -> str | None:
        return tok.id_to_token(token_id) if token_id is not None else None

    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template,
        "bos_token": name(tok.bos_token_id),
        "eos_token": name(tok.eos_token_id),
        "add_bos_token": tok.add_bos_token,
    }, indent=2))
    return directory
