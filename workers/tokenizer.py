"""Tokenizer of the backbone: encode/decode, streaming detokenisation, the checkpoint's chat template.

Built from a GGUF file's metadata (byte-level BPE vocabulary + merges, llama.cpp pre-tokenizer name,
special token ids, `tokenizer.chat_template`) or from a Hugging Face directory (`tokenizer.json`,
`tokenizer_config.json`, optional `chat_template.jinja` and `generation_config.json`). Chat templates
are rendered with jinja2 in a sandbox, the way transformers renders them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from storage.gguf_file import GGUFFile

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of llama.cpp's pre-tokenizer names (llama-vocab.cpp), for byte-level BPE vocabularies.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS_BY_PRE = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Pre-tokenizers that split every digit on its own before the GPT-2 regex (SmolLM, StarCoder).
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact")
# Token strings that end a turn or a text in common formats; stop ids whenever the vocabulary has them.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
)


class TokenizerError(ValueError):
    """The tokenizer cannot be built or used as asked."""


class ChatTemplateMissing(TokenizerError):
    def __init__(self, source: str) -> None:
        super().__init__(f"{source} has no chat template")
        self.source = source


class ChatTemplateError(TokenizerError):
    """Rendering the checkpoint's chat template failed (bad messages or a template error)."""


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = _SPLITS_BY_PRE.get(pre or "")
    if split is None:
        return byte_level
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _render_chat(template: str, **context: Any) -> str:
    """Render a transformers-style chat template in a jinja2 sandbox."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(**context)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its chat template and stop tokens."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool = False,
        extra_stop_token_ids: Iterable[int] = (),
        source: str = "tokenizer",
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.source = source
        stops = {i for i in extra_stop_token_ids}
        if eos_token_id is not None:
            stops.add(eos_token_id)
        for token in _END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is not None:
                stops.add(token_id)
        self.stop_token_ids: frozenset[int] = frozenset(stops)

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build from the `tokenizer.*` metadata of a GGUF file (byte-level BPE vocabularies only)."""
        file = GGUFFile.open(path, string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
        meta = file.metadata
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = BackendTokenizer(
            models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        )
        backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        token_types = meta.get("tokenizer.ggml.token_type") or []
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(token_types)
            if t == _CONTROL
        ]
        user = [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types)
            if t == _USER_DEFINED
        ]
        backend.add_special_tokens(special)
        backend.add_tokens(user)
        return cls(
            backend,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            source=str(path),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from `tokenizer.json` (+ `tokenizer_config.json`, chat template files) of a checkpoint dir."""
        directory = Path(path)
        backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
        config = _read_json(directory / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        template_file = directory / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()

        def token_id(key: str) -> int | None:
            value = config.get(key)
            content = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(content) if isinstance(content, str) else None

        generation = _read_json(directory / "generation_config.json")
        eos = generation.get("eos_token_id", _read_json(directory / "config.json").get("eos_token_id"))
        extra = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
        eos_token_id = token_id("eos_token")
        return cls(
            backend,
            chat_template=template,
            bos_token_id=token_id("bos_token"),
            eos_token_id=eos_token_id if eos_token_id is not None else (extra[0] if extra else None),
            add_bos_token=bool(config.get("add_bos_token", False)),
            extra_stop_token_ids=extra,
            source=str(directory),
        )

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        """From a `.gguf` file or a checkpoint directory; the default backbone's when `path` is None."""
        if path is None:
            from storage.backbone import default_gguf_path

            path = default_gguf_path()
        path = Path(path)
        return cls.from_hf_dir(path) if path.is_dir() else cls.from_gguf(path)

    # -- text <-> ids ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. `<|im_start|>`) become their ids.

        With `add_special_tokens`, the BOS token is prepended when the checkpoint asks for it.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming decoder for the tokens generated after `prompt_ids`."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]) in the checkpoint's format."""
        if self.chat_template is None:
            raise ChatTemplateMissing(self.source)

        def token(token_id: int | None) -> str:
            return (self.backend.id_to_token(token_id) or "") if token_id is not None else ""

        return _render_chat(
            self.chat_template,
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=token(self.bos_token_id),
            eos_token=token(self.eos_token_id),
            **kwargs,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the chat prompt (the template writes any BOS itself, so none is added)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas without ever emitting a partial UTF-8 character.

    Each `push` decodes a short window of recent ids twice (without and with the new id) and returns
    what the new id added. A delta whose text ends in U+FFFD (a multi-byte character split across
    tokens) is held back until a later token completes it; `flush` emits whatever is left at the end.
    The window starts a few tokens back in the prompt so that decoders which strip a leading space
    (SentencePiece) see the same context as a full decode.
    """

    _PROMPT_CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._PROMPT_CONTEXT :])
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self._ids)  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """The text of ids still held back (only non-empty when generation ended mid-character)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
