"""Weight loading: GGUF container reading, dequantisation, q/k un-permutation, HF directories."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from storage.backbone import DEFAULT_BACKBONE_NAME, BackboneSpec, default_backbone_spec
from storage.gguf_file import GGUFFile, GGUFFormatError
from workers.model import Backbone, rope_inv_freq
from workers.weights import (
    CheckpointError,
    UnsupportedArchitecture,
    dequantize,
    load_checkpoint,
    load_gguf,
    load_hf_dir,
    unpermute_rotary_rows,
)

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute` (what the loader must undo)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_matches_gguf_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    values = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    packed = gguf_quantize(values, qtype)  # [48, bytes per row] (or float values for F32/F16)
    reference = gguf_dequantize(packed, qtype)
    ours = dequantize(np.ascontiguousarray(packed).view(np.uint8).reshape(-1), qtype, (48, 96))
    assert ours.dtype == torch.float32 and ours.shape == (48, 96)
    torch.testing.assert_close(
        ours, torch.from_numpy(np.asarray(reference, dtype=np.float32)), rtol=0, atol=0
    )
    # and the round trip is within the format's resolution
    step = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 15}[qtype]
    assert (ours - torch.from_numpy(values)).abs().max() <= step * np.abs(values).max() + 1e-6


def test_dequantize_hand_built_blocks() -> None:
    nibbles = np.arange(32) % 16  # value i of a block sits in byte i % 16, low nibble for i < 16
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    half = lambda x: np.array([x], dtype=np.float16).view(np.uint8)  # noqa: E731

    q4_1 = np.concatenate([half(0.5), half(-1.0), packed])
    expected = torch.tensor(0.5 * nibbles - 1.0, dtype=torch.float32)
    torch.testing.assert_close(dequantize(q4_1, Q.Q4_1, (32,)), expected, rtol=0, atol=0)

    q4_0 = np.concatenate([half(2.0), packed])
    torch.testing.assert_close(
        dequantize(q4_0, Q.Q4_0, (32,)),
        torch.tensor(2.0 * (nibbles - 8.0), dtype=torch.float32),
        rtol=0,
        atol=0,
    )

    ints = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.concatenate([half(0.25), ints.view(np.uint8)])
    torch.testing.assert_close(
        dequantize(q8_0, Q.Q8_0, (32,)), torch.tensor(0.25 * ints, dtype=torch.float32)
    )


def test_dequantize_rejects_wrong_size() -> None:
    with pytest.raises(CheckpointError, match="Q8_0"):
        dequantize(np.zeros(34, dtype=np.uint8), Q.Q8_0, (2, 32))


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    for heads in (1, 3, 9):
        weight = np.random.default_rng(heads).standard_normal((heads * 64, 40)).astype(np.float32)
        restored = unpermute_rotary_rows(torch.from_numpy(_llama_cpp_permute(weight, heads)), heads)
        assert torch.equal(restored, torch.from_numpy(weight))


def test_gguf_reader_reads_the_default_backbone_spec(gguf_path: Path) -> None:
    file = GGUFFile.open(gguf_path)
    spec = BackboneSpec.from_gguf(file, name=DEFAULT_BACKBONE_NAME)
    assert spec == default_backbone_spec()
    # SmolLM2-135M-Instruct's published architecture.
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (30, 576, 1536)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (9, 3, 64, 49152)
    assert spec.rope_theta == 100000.0 and spec.tie_word_embeddings and spec.rope_scaling is None
    assert spec.rms_norm_eps == pytest.approx(1e-5)
    info = file.tensors["blk.0.attn_q.weight"]
    assert info.ggml_type == Q.Q4_1 and info.shape == (576, 576) and info.nbytes == 576 * 576 // 32 * 20
    assert file.tensors["token_embd.weight"].ggml_type == Q.Q8_0
    assert isinstance(file.metadata["tokenizer.ggml.tokens"], int)  # vocabulary skipped unless asked for


def test_gguf_reader_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "not.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GGUFFormatError, match="magic"):
        GGUFFile.open(path)


def test_default_gguf_loads_fast(default_backbone: tuple[Backbone, float]) -> None:
    model, seconds = default_backbone
    logger.info("default GGUF load: %.2f s", seconds)
    assert model.spec.num_layers == 30 and model.dtype == torch.float32
    assert seconds < 20  # about 0.5-2.5 s on an idle 2-core machine; generous for a loaded CI box


def test_default_gguf_weights_match_transformers_gguf_loading(backbone: Backbone, hf_gguf_model) -> None:
    """Every weight equals transformers' independent dequantisation and q/k un-permutation."""
    hf = dict(hf_gguf_model.named_parameters())
    torch.testing.assert_close(backbone.embed_tokens, hf["model.embed_tokens.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(backbone.norm, hf["model.norm.weight"], rtol=0, atol=0)
    for i, layer in enumerate(backbone.layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        gate_up = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        torch.testing.assert_close(layer.qkv_weight, qkv, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.o_weight, hf[p + "self_attn.o_proj.weight"], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.gate_up_weight, gate_up, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.down_weight, hf[p + "mlp.down_proj.weight"], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.input_norm, hf[p + "input_layernorm.weight"], rtol=0, atol=0)


def _write_tiny_gguf(
    path: Path, tensors: dict[str, np.ndarray], *, heads: int, kv_heads: int, rope_freqs=None
) -> None:
    """A llama GGUF as llama.cpp's converter writes it: q/k permuted, 2-D weights in Q8_0."""
    writer = GGUFWriter(str(path), "llama")
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(tensors["model.layers.0.mlp.up_proj.weight"].shape[0])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
             "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    for name, value in tensors.items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            parts = name.split(".")
            gguf_name = f"blk.{parts[2]}.{names[parts[-2]]}.weight"
        if ".q_proj." in name:
            value = _llama_cpp_permute(value, heads)
        elif ".k_proj." in name:
            value = _llama_cpp_permute(value, kv_heads)
        if value.ndim == 2:
            packed = gguf_quantize(value, Q.Q8_0)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(gguf_name, value)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_round_trip(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf")
    original = {k: v.detach().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    rope_freqs = np.linspace(1, 8, 8, dtype=np.float32)
    _write_tiny_gguf(tmp_path / "tiny.gguf", original, heads=4, kv_heads=2, rope_freqs=rope_freqs)

    checkpoint = load_checkpoint(tmp_path / "tiny.gguf")
    hf_spec, spec = load_hf_dir(tmp_path / "hf").spec, checkpoint.spec
    for field in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "rope_theta", "tie_word_embeddings", "attention_bias"):  # fmt: skip
        assert getattr(spec, field) == getattr(hf_spec, field), field
    for name, value in original.items():
        expected = torch.from_numpy(value)
        if value.ndim == 2:  # Q8_0: compare with gguf's own decoding of the unpermuted values
            expected = torch.from_numpy(gguf_dequantize(gguf_quantize(value, Q.Q8_0), Q.Q8_0))
        torch.testing.assert_close(checkpoint.tensors[name], expected, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(checkpoint.rope_freq_factors, torch.from_numpy(rope_freqs))
    plain = rope_inv_freq(checkpoint.spec)
    torch.testing.assert_close(
        Backbone.from_checkpoint(checkpoint).inv_freq, plain / torch.from_numpy(rope_freqs)
    )

    half = load_gguf(tmp_path / "tiny.gguf", dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.tensors.values())


def test_hf_dir_dtype_and_errors(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, rope_theta=12345.0)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    checkpoint = load_hf_dir(tmp_path, dtype=torch.bfloat16)
    assert checkpoint.spec.rope_theta == 12345.0  # read from transformers 5's `rope_parameters`
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.tensors.values())
    assert Backbone.from_checkpoint(checkpoint).dtype == torch.bfloat16

    config_path = tmp_path / "config.json"
    config_dict = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config_dict, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        load_hf_dir(tmp_path)
    config_path.write_text(json.dumps(config_dict))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf_dir(tmp_path)
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path / "missing.bin")


def test_hf_config_with_rope_parameters_keeps_theta_and_scaling() -> None:
    config = {
        "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 100, "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    spec = BackboneSpec.from_hf_config(config)
    assert spec.rope_theta == 500000.0
    assert spec.rope_scaling is not None and spec.rope_scaling["rope_type"] == "llama3"
    assert spec.rope_scaling["factor"] == 8.0
