"""The engine against Hugging Face PEFT: one mixed batch of adapters of different ranks and modules.

A tiny random Llama is saved with `save_pretrained` and loaded by our HF loader; four PEFT adapters
(ranks 4, 8, 16, 64; different module subsets; one rsLoRA; one with rank_pattern / alpha_pattern) are
saved with PEFT and read through `storage.adapter_format` (the path uploads take). Every request's
logits must match PEFT with that adapter active, and greedy outputs must be identical, with a float32
and with a bfloat16 adapter pool (the adapters' weights are bf16-representable, so both hold them
exactly).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from storage.adapter_format import read_upload, validate
from workers.batcher import BatchPlan
from workers.engine import Engine, EngineSettings, ModelRunner
from workers.sampling import SamplerRow, SamplingParams, sample
from workers.weights import load_backbone

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOLERANCE = 1e-3
NEW_TOKENS = 32
VOCAB = 256
ADAPTERS: dict[str, dict[str, Any]] = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8_all": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
    "r16_rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"]),
    "r64_patterns": dict(r=64, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                         rank_pattern={"q_proj": 8, "model.layers.1.mlp.up_proj": 32},
                         alpha_pattern={"down_proj": 16}),
}
PROMPT_LENS = {"r4_qv": 7, "r8_all": 12, "r16_rslora": 3, "r64_patterns": 9, None: 10}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny backbone (ours), its directory, and the adapters' directories."""
    root = tmp_path_factory.mktemp("tiny_peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    dirs: dict[str, Path] = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        model = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        lora = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **kwargs))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # PEFT starts B at zero; random B makes every adapter change the output
            for key, p in lora.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if "lora_" in key:  # bf16-representable: a bfloat16 adapter pool holds them exactly
                    p.copy_(p.bfloat16().float())
        lora.save_pretrained(root / name)
        dirs[name] = root / name
    return {"backbone": load_backbone(root / "base"), "base_dir": root / "base", "adapters": dirs}


@pytest.fixture(scope="module")
def reference(tiny: dict[str, Any]) -> Any:
    """One PeftModel holding every adapter (`set_adapter` picks one; `disable_adapter` gives the base)."""
    base = transformers.LlamaForCausalLM.from_pretrained(tiny["base_dir"], dtype=torch.float32).eval()
    names = list(ADAPTERS)
    model = peft.PeftModel.from_pretrained(base, tiny["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tiny["adapters"][name], adapter_name=name)
    return model.eval()


def _prompt(name: str | None) -> list[int]:
    g = torch.Generator().manual_seed(len(str(name)) * 31 + PROMPT_LENS[name])
    return torch.randint(0, VOCAB, (PROMPT_LENS[name],), generator=g).tolist()


@torch.no_grad()
def _reference_logits(model: Any, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of PEFT with `adapter` active (None: adapters disabled)."""
    x = torch.tensor([ids])
    if adapter is None:
        with model.disable_adapter():
            return model(x).logits[0]
    model.set_adapter(adapter)
    return model(x).logits[0]


def _reference_greedy(model: Any, adapter: str | None, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        ids.append(int(_reference_logits(model, adapter, ids)[-1].argmax()))
    return ids[len(prompt) :]


class RecordingRunner:
    """Wraps the engine's runner and keeps the logits each request was sampled from."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.plans: list[BatchPlan] = []

    def run(self, plan: BatchPlan) -> list[int]:
        self.plans.append(plan)
        logits = self.inner.logits(plan)  # [num_sampled, vocab]
        for req, row in zip(plan.sampled, logits, strict=True):
            self.logits[req.request_id].append(row.clone())
        return sample(logits, [SamplerRow(r.params, r.generator) for r in plan.sampled])


def _engine(tiny: dict[str, Any], **settings: Any) -> Engine:
    engine = Engine(tiny["backbone"], EngineSettings(kv_cache_bytes=1 << 22, block_size=4,
                                                     adapter_pool_bytes=1 << 22, **settings))
    for name, path in tiny["adapters"].items():
        engine.add_adapter(name, validate(read_upload(path), tiny["backbone"].spec))
    return engine


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
NAMES: list[str | None] = [*ADAPTERS, None]


def test_adapters_change_the_output(tiny: dict[str, Any], reference: Any) -> None:
    prompt = _prompt(None)
    base = _reference_logits(reference, None, prompt)
    for name in ADAPTERS:
        assert (_reference_logits(reference, name, prompt) - base).abs().max() > 0.1, name


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_one_mixed_batch_matches_peft_logits_and_greedy_tokens(
    tiny: dict[str, Any], reference: Any, adapter_dtype: str
) -> None:
    engine = _engine(tiny, adapter_dtype=adapter_dtype)
    assert engine.runner.pool.dtype == getattr(torch, adapter_dtype)
    recorder = RecordingRunner(engine.runner)
    engine.runner = recorder  # type: ignore[assignment]
    ids = [engine.submit(_prompt(n), adapter=n, params=GREEDY) for n in NAMES]
    done = {c.request_id: c for c in engine.run_until_done()}
    first = recorder.plans[0]
    assert first.adapters == list(ADAPTERS) and len(first.seq_ids) == len(NAMES)  # one batch, all five
    assert all(len(p.seq_ids) == len(NAMES) for p in recorder.plans)
    for request_id, name in zip(ids, NAMES, strict=True):
        prompt, tokens = _prompt(name), done[request_id].token_ids
        ours = torch.stack(recorder.logits[request_id])  # [NEW_TOKENS, vocab]
        theirs = _reference_logits(reference, name, prompt + tokens)[len(prompt) - 1 : -1]
        assert (ours - theirs).abs().max().item() < TOLERANCE, name
        assert tokens == _reference_greedy(reference, name, prompt), name


def test_requests_joining_midway_give_the_same_greedy_outputs_as_alone(tiny: dict[str, Any]) -> None:
    alone: dict[str | None, list[int]] = {}
    for name in NAMES:
        engine = _engine(tiny)
        alone[name] = engine.generate([_prompt(name)], GREEDY, adapters=[name])[0].token_ids

    # Small steps force chunked prefill beside decodes; requests join at different steps.
    engine = _engine(tiny, max_batch_tokens=6)
    joins = {0: [NAMES[0], NAMES[4]], 3: [NAMES[1]], 5: [NAMES[2]], 11: [NAMES[3]]}
    ids: dict[str, str | None] = {}
    done: dict[str, list[int]] = {}
    step = 0
    while step <= max(joins) or engine.has_work:
        for name in joins.get(step, []):
            ids[engine.submit(_prompt(name), adapter=name, params=GREEDY)] = name
        done.update((c.request_id, c.token_ids) for c in engine.step())
        step += 1
    assert {ids[i]: tokens for i, tokens in done.items()} == alone
