"""The engine end to end: preemption, seeds, stops, limits, adapter residency, and the default model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from storage.backbone import MODULES
from workers.adapter_pool import AdapterPool, AdapterRankTooLarge, LoraWeights, ModuleLora
from workers.adapters import AdaptersDoNotFit, ResidentAdapters, UnknownAdapter
from workers.batcher import FinishReason, TokenEvent
from workers.engine import Engine, EngineSettings, PromptTooLong
from workers.generate import generate_local
from workers.kv_cache import block_bytes
from workers.model import Backbone
from workers.sampling import SamplingParams
from workers.tokenizer import Tokenizer
from workers.weights import load_backbone

transformers = pytest.importorskip("transformers")

VOCAB = 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    path: Path = tmp_path_factory.mktemp("tiny_engine")
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return load_backbone(path)


def _adapter(backbone: Backbone, rank: int, seed: int, modules: tuple[str, ...] = MODULES) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = backbone.spec.module_shapes()
    return {
        (layer, m): ModuleLora(a=torch.randn(rank, shapes[m][0], generator=g) * 0.3,
                               b=torch.randn(shapes[m][1], rank, generator=g) * 0.3, scale=2.0 / rank)
        for layer in range(backbone.spec.num_layers) for m in modules
    }


def _engine(backbone: Backbone, *, adapters: int = 3, **settings: Any) -> Engine:
    engine = Engine(backbone, EngineSettings(**{"kv_cache_bytes": 1 << 22, "block_size": 4,
                                                "adapter_pool_bytes": 1 << 22, **settings}))
    for i in range(adapters):
        engine.add_adapter(f"a{i}", _adapter(backbone, rank=(4, 8, 16)[i % 3], seed=i))
    return engine


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(5 + 7 * (i % 4)),), generator=g).tolist() for i in range(n)]


def _workload(n: int = 6) -> tuple[list[list[int]], list[SamplingParams], list[str | None]]:
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=0 if i % 3 else 40, seed=i, max_tokens=24)
              for i in range(n)]
    return _prompts(n), params, [None, "a0", "a1", "a2", "a0", None][:n]


def test_preempted_requests_complete_with_unchanged_outputs(tiny: Backbone) -> None:
    prompts, params, adapters = _workload()
    big = _engine(tiny).generate(prompts, params, adapters=adapters)
    # 20 blocks of 4 tokens: a request grows to at most 26 + 24 = 50 tokens, six need ~170.
    small_engine = _engine(tiny, kv_cache_bytes=20 * block_bytes(tiny.spec, block_size=4))
    small = small_engine.generate(prompts, params, adapters=adapters)
    assert sum(c.preemptions for c in small) > 0
    assert [c.token_ids for c in small] == [c.token_ids for c in big]
    assert all(c.finish_reason is FinishReason.LENGTH and len(c.token_ids) == 24 for c in small)
    assert small_engine.kv.num_free_blocks == small_engine.kv.num_blocks


def test_a_seed_gives_the_same_tokens_alone_or_in_a_batch(tiny: Backbone) -> None:
    prompt = _prompts(1, seed=5)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20)
    alone = _engine(tiny).generate([prompt], seeded)[0].token_ids
    prompts, params, adapters = _workload()
    batched = _engine(tiny).generate([*prompts, prompt], [*params, seeded], adapters=[*adapters, None])
    assert batched[-1].token_ids == alone
    other_seed = _engine(tiny).generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=20))
    assert other_seed[0].token_ids != alone


def test_callbacks_stream_every_token_and_the_finish_reason(tiny: Backbone) -> None:
    engine = _engine(tiny)
    events: list[TokenEvent] = []
    request_id = engine.submit(_prompts(1)[0], params=SamplingParams(temperature=0.0, max_tokens=5),
                               on_token=events.append)
    (completion,) = engine.run_until_done()
    assert [e.token_id for e in events] == completion.token_ids
    assert {e.request_id for e in events} == {request_id}
    assert [e.finish_reason for e in events] == [None] * 4 + [FinishReason.LENGTH]


def test_stop_token_ids_end_a_request(tiny: Backbone) -> None:
    engine = _engine(tiny)
    prompt = _prompts(1)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    stopped = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_at,)))
    assert stopped[0].token_ids == free[: first + 1]
    assert stopped[0].finish_reason is FinishReason.STOP


def test_a_prompt_longer_than_the_window_is_refused_and_max_tokens_clamped(tiny: Backbone) -> None:
    engine = _engine(tiny, max_model_len=40)
    with pytest.raises(PromptTooLong) as e:
        engine.submit(list(range(40)))
    assert (e.value.tokens, e.value.max_tokens) == (40, 39)
    (completion,) = engine.generate([list(range(30))], SamplingParams(temperature=0.0, max_tokens=100))
    assert len(completion.token_ids) == 10 and completion.finish_reason is FinishReason.LENGTH
    window = _engine(tiny)  # the backbone's max_position_embeddings (128)
    with pytest.raises(PromptTooLong, match="at most 127"):
        window.submit([1] * 200)


def test_unknown_adapters_and_aborts(tiny: Backbone) -> None:
    engine = _engine(tiny)
    with pytest.raises(UnknownAdapter):
        engine.submit([1, 2, 3], adapter="nope")
    request_id = engine.submit([1, 2, 3], params=SamplingParams(temperature=0.0, max_tokens=50))
    engine.step()
    aborted = engine.abort(request_id)
    assert aborted is not None and aborted.finish_reason is FinishReason.ABORT and len(aborted.token_ids) == 1
    assert not engine.has_work and engine.kv.num_free_blocks == engine.kv.num_blocks


# ------------------------------------------------------------------------------------------ residency


def test_resident_adapters_evict_lru_but_never_the_running_step(tiny: Backbone) -> None:
    one = _adapter(tiny, rank=8, seed=0)
    probe = AdapterPool(tiny.spec, 1 << 22)
    pages = probe.pages_needed(one)
    manager = ResidentAdapters(AdapterPool(tiny.spec, 3 * pages * probe.page_bytes))
    for i in range(5):
        manager.register(f"a{i}", _adapter(tiny, rank=8, seed=i))
    manager.ensure_resident(["a0", "a1"])
    manager.release()
    manager.ensure_resident(["a2"])
    manager.release()
    manager.ensure_resident(["a0"])  # a0 is now the most recently used; a1 is the LRU
    manager.release()
    manager.ensure_resident(["a3", "a2"])  # needs a1's place
    assert set(manager.pool.keys) == {"a0", "a2", "a3"}
    manager.ensure_resident(["a4", "a2", "a3"])  # a0 must go; a2 and a3 are in use
    assert set(manager.pool.keys) == {"a2", "a3", "a4"}
    with pytest.raises(AdaptersDoNotFit):
        manager.ensure_resident(["a0", "a1", "a2", "a3"])


def test_a_bad_adapter_is_refused_at_registration_and_costs_no_place(tiny: Backbone) -> None:
    manager = ResidentAdapters(AdapterPool(tiny.spec, 1 << 22, max_rank=16))
    manager.register("good", _adapter(tiny, rank=8, seed=0))
    manager.ensure_resident(["good"])
    with pytest.raises(AdapterRankTooLarge):
        manager.register("bad", _adapter(tiny, rank=32, seed=1))
    assert "bad" not in manager and manager.pool.keys == ["good"]


# ------------------------------------------------------------------------------------------ default model


def _chat(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def smol(backbone: Backbone, tokenizer: Tokenizer) -> Engine:
    return Engine(backbone, EngineSettings(kv_cache_bytes=64 << 20, adapter_pool_bytes=8 << 20),
                  tokenizer=tokenizer)


def test_the_default_model_knows_the_capital_of_france(smol: Engine, tokenizer: Tokenizer) -> None:
    (completion,) = smol.generate([_chat(tokenizer, "What is the capital of France?")],
                                  SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in completion.text
    assert completion.finish_reason is FinishReason.STOP  # <|im_end|> ends the turn


def test_stop_strings_cut_the_text_across_token_boundaries(smol: Engine, tokenizer: Tokenizer) -> None:
    prompt = _chat(tokenizer, "Write one sentence about the sea.")
    free = smol.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    streamed: list[str] = []
    smol.submit(prompt, params=SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                on_token=lambda e: streamed.append(e.text))
    (same,) = smol.run_until_done()
    assert "".join(streamed) == same.text == free.text == tokenizer.decode(free.token_ids)
    # A stop string made of the end of one token and the start of the next.
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    before = "".join(pieces[:k])
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    expected = (before + pieces[k][:-2])
    expected = expected[: expected.find(stop)] if stop in expected else expected
    cut = smol.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=(stop,)))[0]
    assert cut.text == expected and cut.finish_reason is FinishReason.STOP
    assert stop not in cut.text
    assert len(cut.token_ids) <= k + 2


def test_text_prompts_and_max_tokens(smol: Engine) -> None:
    (completion,) = smol.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=3,
                                                                           ignore_eos=True))
    assert len(completion.token_ids) == 3 and completion.finish_reason is FinishReason.LENGTH
    assert completion.text


def _write_peft_dir(path: Path, backbone: Backbone, rank: int, seed: int) -> Path:
    """A PEFT adapter directory as PEFT writes it (config + safetensors), without PEFT."""
    path.mkdir()
    modules = ("q_proj", "v_proj", "down_proj")
    weights = _adapter(backbone, rank=rank, seed=seed, modules=modules)
    parent = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
    tensors = {}
    for (layer, module), w in weights.items():
        prefix = f"base_model.model.model.layers.{layer}.{parent[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = w.a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = w.b.contiguous() * 0.05
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules)}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_generate_local_runs_one_request_per_adapter_in_one_batch(
    smol: Engine, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    dirs = [_write_peft_dir(tmp_path / f"adapter{i}", smol.backbone, rank=r, seed=i) for i, r in enumerate((8, 16))]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    outputs = generate_local(None, [*dirs, None], "What is the capital of France?", greedy)
    assert [o.adapter for o in outputs] == [*dirs, None]
    (base,) = smol.generate([_chat(tokenizer, "What is the capital of France?")], greedy)
    assert outputs[2].token_ids == base.token_ids
    assert outputs[0].token_ids != base.token_ids or outputs[1].token_ids != base.token_ids
