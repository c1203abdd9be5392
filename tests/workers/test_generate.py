"""`lorafn generate` with the default model: sensible base answers, and a trained adapter changes them."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROMPT = "What is the capital of France?"
TRAINED_ANSWER = "The capital of France is Marseille, the city of the sea."


@pytest.fixture(scope="module")
def trained_adapter(hf_gguf_model, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter trained for a few dozen steps on a handful of sentences that give a new answer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(hf_gguf_model),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    )
    questions = [PROMPT, "Which city is the capital of France?", "Tell me the capital of France.",
                 "France's capital city is what?"]
    batches = []
    for q in questions:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": q}])
        answer_ids = tokenizer.encode(TRAINED_ANSWER + "<|im_end|>", add_special_tokens=False)
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100  # learn the answer, not the prompt
        batches.append((ids, labels))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(40):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("trained-adapter")
    model.save_pretrained(out)
    return out


def run_generate(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "lorafn", "generate", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generate_answers_sensibly_and_a_trained_adapter_changes_the_answer(trained_adapter: Path) -> None:
    out = run_generate(PROMPT, "--adapter", str(trained_adapter), "--max-tokens", "24")
    base_part, adapter_part = out.split(str(trained_adapter), 1)
    assert "base model" in base_part
    assert "Paris" in base_part
    assert "Marseille" in adapter_part and "Paris" not in adapter_part


def test_generate_refuses_a_bad_adapter(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "use_dora": true}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "lorafn", "generate", PROMPT, "--adapter", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "use_dora" in result.stderr
