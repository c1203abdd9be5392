"""The engine benchmark's code path on a tiny random Llama with 2 requests: structure only, no timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import corpus
from bench.engine import BenchSettings, measure, report, write_adapters
from kernels import native
from storage.backbone import default_backbone_spec
from workers.tokenizer import Tokenizer
from workers.weights import load_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_bench")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("clock", ["stream", "subtract"])
def test_benchmark_runs_every_variant_and_writes_its_figures(tiny_dir: Path, tmp_path: Path, clock: str) -> None:
    settings = BenchSettings(
        requests=2, prompt_tokens=8, new_tokens=4, repeats=2, adapter_counts=(1, 8), ranks=(2, 4),
        peft_clock=clock, pool_seeds=(0,), pool_rounds=50, bandwidth_bytes=1 << 20,  # type: ignore[arg-type]
    )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (2, 8), generator=g).tolist()
    (tmp_path / "adapters").mkdir()
    payload = measure(load_checkpoint(tiny_dir), prompts, settings, workdir=tmp_path / "adapters")
    path = report(payload, results_dir=tmp_path / "results")

    written = json.loads(path.read_text())
    assert path.name == "engine.json" and written["benchmark"] == "engine" and "machine" in written
    assert written["settings"]["counts"] == [1, 2]  # 8 adapters clamped to the 2 requests
    assert [a["rank"] in (2, 4) for a in written["adapters"]] == [True, True]
    variants = {v["variant"]: v for v in written["variants"]}
    assert set(variants) == {f"{e} {k}" for e in ("lorafn", "peft") for k in ("base", "1", "2")}
    for v in variants.values():
        assert len(v["decode_s"]) == settings.repeats
        assert v["decode_tok_s_median"] > 0 and v["decode_tok_s_best"] >= v["decode_tok_s_median"]
        assert 0.0 <= v["greedy_vs_peft"]["identical"] <= 1.0
        assert (v["adapter_bytes_per_step"] > 0) == (v["adapters"] > 0)
        assert v["outputs_stable_across_rounds"] is True
        # the subtract clock cannot see single decode steps
        assert (v["step_ms_median"] is None) == (v["engine"] == "peft" and clock == "subtract")
    lorafn = [v for v in variants.values() if v["engine"] == "lorafn"]
    assert all(v["speedup_vs_peft"] > 0 for v in lorafn)
    assert all(v["greedy_vs_peft"]["min_prefix"] >= 1 for v in lorafn)  # the prefill's token agrees
    assert variants["lorafn 2"]["adapter_ranks"] == [a["rank"] for a in written["adapters"]]
    assert len(written["targets"]) == 3 and all(isinstance(ok, bool) for ok in written["targets"].values())
    assert written["targets_basis"] == ("median step" if clock == "stream" else "decode time")
    assert {"paged_mean", "padded_mean", "contiguous_mean", "paged_min"} <= set(written["pool_utilisation"])
    assert written["bytes_floor"]["backbone_bytes_per_step"] > 0
    # the floors: a bigger adapter mix costs a bigger FLOP share and read time; none for the base
    one, two = variants["lorafn 1"], variants["lorafn 2"]
    assert variants["lorafn base"]["lora_flop_share"] == 0 and variants["lorafn base"]["adapter_read_floor_ms"] == 0
    assert 0 < one["lora_flop_share"] < 1 and 0 < one["adapter_read_floor_ms"] < two["adapter_read_floor_ms"]
    ranks = [a["rank"] for a in written["adapters"]]
    assert two["lora_flop_share"] == pytest.approx(one["lora_flop_share"] * (ranks[0] + ranks[1]) / (2 * ranks[0]))
    assert one["adapter_read_floor"] > 0  # over lorafn's own base step, which both clocks have
    # the engine's default pool dtype; adapter bytes follow it
    expected_dtype = "bfloat16" if native.available() else "float32"
    assert written["settings"]["adapter_pool_dtype"] == expected_dtype
    assert written["settings"]["native_lora_kernel"] == native.available()
    itemsize = 2 if expected_dtype == "bfloat16" else 4
    assert variants["lorafn 2"]["adapter_bytes_per_step"] == sum(a["bytes"] for a in written["adapters"])
    assert all(a["bytes"] % itemsize == 0 for a in written["adapters"])


def test_benchmark_adapters_are_bf16_representable(tmp_path: Path) -> None:
    """PEFT (fp32) and a bf16 adapter pool hold exactly the same weights."""
    spec = default_backbone_spec()
    (adapter,) = write_adapters(tmp_path, spec, count=1, ranks=(4,), seed=3)
    tensors = adapter.parsed.tensors
    assert len(tensors) == 2 * 7 * spec.num_layers
    for t in tensors.values():
        assert t.dtype == torch.float32 and t.abs().max() > 0
        assert torch.equal(t, t.bfloat16().float())
    assert adapter.elements == sum(t.numel() for t in tensors.values())


def test_prompts_are_exactly_the_asked_length_and_distinct() -> None:
    prompts = corpus.prompts(Tokenizer.load(), 32, 128)
    assert len(prompts) == 32 and all(len(p) == 128 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 32
