"""Shared fixtures of the engine tests: the default backbone (loaded once), its tokenizer, an HF reference.

`paged_logits` runs a model through the paged path the way the engine will: every step is one
flattened batch holding the next chunk of each sequence (prefill chunks and decode tokens mixed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from storage.backbone import default_gguf_path
from workers.kv_cache import PagedKVCache
from workers.model import Backbone, LoraApplier
from workers.tokenizer import Tokenizer
from workers.weights import load_backbone

logger = logging.getLogger(__name__)

PagedRunner = Callable[..., list[torch.Tensor]]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def gguf_dir(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding (a link to) the default GGUF, as transformers' `gguf_file=` loading expects."""
    directory = tmp_path_factory.mktemp("gguf")
    (directory / gguf_path.name).symlink_to(gguf_path)
    return directory


@pytest.fixture(scope="session")
def default_backbone() -> tuple[Backbone, float]:
    """The default backbone from its GGUF file, and the seconds loading took."""
    started = time.perf_counter()
    model = load_backbone()
    return model, time.perf_counter() - started


@pytest.fixture(scope="session")
def backbone(default_backbone: tuple[Backbone, float]) -> Backbone:
    return default_backbone[0]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_dir: Path, gguf_path: Path):
    """transformers' own loading of the same GGUF (its own dequantisation and q/k un-permutation)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


def run_paged(
    model: Backbone,
    sequences: Sequence[torch.Tensor],
    schedules: Sequence[Sequence[int]],
    *,
    block_size: int = 4,
    num_blocks: int = 256,
    lora: LoraApplier | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Logits [len(seq), vocab] of every token of every sequence, computed step by step.

    schedules[i] lists the chunk sizes in which sequence i is fed (e.g. [7, 5, 1, 1]: a prefill of 7,
    a chunked-prefill continuation of 5, two decode steps). Step s runs chunk s of every sequence that
    has one, all in one flattened batch. Free blocks are shuffled so block tables are not contiguous.
    """
    for seq, schedule in zip(sequences, schedules, strict=True):
        assert sum(schedule) == len(seq)
    kv = PagedKVCache(model.spec, num_blocks, block_size=block_size, dtype=model.dtype)
    for b in range(num_blocks):  # take every block, then give them back in random order: tables scatter
        kv.allocate(("scatter", b), 1)
    for b in torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist():
        kv.free(("scatter", b))
    fed = [0] * len(sequences)
    logits: list[list[torch.Tensor]] = [[] for _ in sequences]
    for step in range(max(len(s) for s in schedules)):
        seq_ids, query_lens, ids, positions = [], [], [], []
        for i, schedule in enumerate(schedules):
            if step >= len(schedule):
                continue
            n = schedule[step]
            if i in kv:
                kv.append(i, n)
            else:
                kv.allocate(i, n)
            seq_ids.append(i)
            query_lens.append(n)
            ids.append(sequences[i][fed[i] : fed[i] + n])
            positions.append(torch.arange(fed[i], fed[i] + n))
            fed[i] += n
        attn = kv.metadata(seq_ids, query_lens)
        hidden = model(torch.cat(ids), torch.cat(positions), attn, kv, lora)
        step_logits = model.compute_logits(hidden)
        for i, start, n in zip(seq_ids, attn.query_starts, query_lens, strict=True):
            logits[i].append(step_logits[start : start + n])
    return [torch.cat(parts) for parts in logits]


@pytest.fixture(scope="session")
def paged_logits() -> PagedRunner:
    return run_paged
