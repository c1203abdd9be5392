"""Tokenizer: GGUF vocabulary, round trips, ChatML template, streaming detokenisation, HF directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.tokenizer import ChatTemplateError, ChatTemplateMissing, Tokenizer

TEXTS = [
    "Hello 2024 world!",
    "  leading spaces\n\nnew lines\ttabs   trailing  ",
    "héllo wörld — ünïcödé 日本語 🤗 emoji",
    "<|im_start|>user\nhi<|im_end|>\n",
    "x = 123456789; y'll don't WE'RE",
    "def f(a, b):\n    return a ** 2 + b  # comment",
]

CHATML_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_special_tokens_and_stops(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert 2 in tokenizer.stop_token_ids and tokenizer.id_to_token(2) == "<|im_end|>"
    assert tokenizer.decode([1, 4093, 2]) == "user"  # specials skipped by default
    assert tokenizer.vocab_size == 49152
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)  # SmolLM adds no BOS


def test_ids_match_transformers_gguf_tokenizer(tokenizer: Tokenizer, gguf_dir: Path, gguf_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    for text in TEXTS:
        assert tokenizer.encode(text) == hf(text, add_special_tokens=False).input_ids, text


def test_chat_template_is_chatml(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text == (
        f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    assert ids[0] == 1 and ids[-2:] == [2, tokenizer.encode("\n")[0]]


def test_streaming_detokenizer_never_splits_characters(tokenizer: Tokenizer) -> None:
    text = "Ça coûte 5€ — 日本語のテキスト 🤗🚀 naïve café"
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    detok = tokenizer.detokenizer(prompt)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some characters span several tokens and were held back
    assert "".join(pieces) + detok.flush() == text


def test_streaming_detokenizer_flushes_an_unfinished_character(tokenizer: Tokenizer) -> None:
    partial = tokenizer.encode("🤗")[:1]  # the first bytes of a 4-byte character
    detok = tokenizer.detokenizer()
    assert detok.push(partial[0]) == ""
    assert detok.flush() == tokenizer.decode(partial)


def test_hf_directory_tokenizer(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False}
        )
    )
    (tmp_path / "chat_template.jinja").write_text(tokenizer.chat_template or "")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.load(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, 2) and {0, 2} <= loaded.stop_token_ids


def test_chat_template_errors(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ raise_exception('only user turns') }}"})
    )
    with pytest.raises(ChatTemplateError, match="only user turns"):
        Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ChatTemplateMissing):
        Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
