"""Local generation without any service: what `lorafn generate --adapter DIR ... "prompt"` runs.

Loads the backbone (the default SmolLM2 GGUF, another GGUF file, or a Hugging Face checkpoint
directory) and its tokenizer, reads each PEFT adapter directory through the same validation as uploads,
and runs one request per adapter in ONE continuous batch of the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.adapter_format import blob_sha256, canonical_blob, read_upload, validate
from workers.batcher import FinishReason
from workers.engine import Engine, EngineSettings
from workers.sampling import SamplingParams
from workers.tokenizer import Tokenizer
from workers.weights import load_backbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOutput:
    """The result of one prompt: which adapter (None = the bare backbone), its text and tokens."""

    adapter: Path | None
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


def generate_local(
    backbone_source: Path | None,
    adapters: Sequence[Path | None],
    prompts: str | Sequence[str],
    params: SamplingParams | None = None,
    *,
    chat: bool = True,
    settings: EngineSettings | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[GenerateOutput]:
    """Generate for every adapter in one batch; outputs in the order of `adapters`.

    backbone_source: a .gguf file or a checkpoint directory; None = the default backbone
    adapters:        PEFT adapter directories (or archives); None entries (or an empty list, meaning one
                     request) use the bare backbone
    prompts:         one prompt for every adapter, or one per adapter
    chat:            wrap each prompt as a user turn with the tokenizer's chat template (when it has one)
    Raises the storage layer's `AdapterInvalid` errors for an adapter the backbone cannot take, and
    `PromptTooLong` for a prompt beyond the context window.
    """
    adapter_list: list[Path | None] = list(adapters) or [None]
    prompt_list = [prompts] * len(adapter_list) if isinstance(prompts, str) else list(prompts)
    if len(prompt_list) == 1 and len(adapter_list) > 1:
        prompt_list *= len(adapter_list)
    if len(prompt_list) != len(adapter_list):
        raise ValueError(f"{len(prompt_list)} prompts for {len(adapter_list)} adapters")

    started = time.perf_counter()
    backbone = load_backbone(backbone_source, dtype=dtype)
    tokenizer = Tokenizer.load(backbone_source)
    engine = Engine(backbone, settings, tokenizer=tokenizer)
    keys: list[str | None] = []
    for path in adapter_list:
        if path is None:
            keys.append(None)
            continue
        parsed = validate(read_upload(Path(path)), backbone.spec, max_rank=engine.settings.max_rank)
        key = blob_sha256(canonical_blob(parsed))  # identity is the content, as in the registry
        engine.add_adapter(key, parsed)
        keys.append(key)
    logger.info("loaded the backbone and %d adapters in %.2f s", len(keys), time.perf_counter() - started)

    use_chat = chat and tokenizer.chat_template is not None
    encoded = [
        tokenizer.encode_chat([{"role": "user", "content": p}]) if use_chat else tokenizer.encode(p)
        for p in prompt_list
    ]
    started = time.perf_counter()
    completions = engine.generate(encoded, params or SamplingParams(), adapters=keys)
    elapsed = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for c in completions)
    logger.info("generated %d tokens for %d requests in %.2f s", tokens, len(completions), elapsed)
    return [
        GenerateOutput(
            adapter=path, prompt=prompt, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
        )
        for path, prompt, c in zip(adapter_list, prompt_list, completions, strict=True)
    ]
