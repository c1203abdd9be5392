"""Trace loaders: real request traces as plain rows for the simulator and for replay.

Every loader returns `TraceRequest`s sorted by arrival, time in seconds from the trace's first row, with
token lengths already fitted to the serving model (SmolLM2-135M: a 2,048-token context). Any path to a
file of the format is accepted; the shared traces and their provenance are described beside them
(`traces/README.md` of the shared folder).

- Azure LLM inference trace 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`): one service's arrivals and
  lengths, no adapter ids. Adapters are assigned by a Zipf popularity over `adapters` names with exponent
  `zipf_s` (adapter a000 the most popular), deterministically for a seed. Lengths were measured on 7B-70B
  models with long contexts, so the output is capped at `max_output_tokens` and the prompt clipped to the
  rest of the context window.
- Alibaba GenAI serving trace (`gmt_create, ..., groupId, prompt_length, ...,
  checkpoint_model_version_id`): each checkpoint model version is one adapter, called by many tenants
  (the groupId is the row's tenant; the simulator keys adapter versions on the adapter alone), prompt tokens are prompt characters / `chars_per_token`, and the
  output length is fixed or drawn (seeded) from given lengths, since the trace serves images, not text.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

TraceFormat = Literal["azure", "alibaba"]
FORMATS: tuple[TraceFormat, ...] = ("azure", "alibaba")

CONTEXT_TOKENS = 2048  # the serving model's context window (SmolLM2-135M)
MAX_OUTPUT_TOKENS = 512  # cap on generated tokens: Azure conv's p50 is 129, its tail runs to thousands
AZURE_TENANT = "azure"
AZURE_TIMESTAMP_CHARS = 26  # "%Y-%m-%d %H:%M:%S.%f" (the file has 100 ns resolution: 7 fraction digits)


class TraceError(ValueError):
    """A trace file that is not of the expected format (the message names the file, line and column)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace. `at_s`: seconds after the trace's first request."""

    at_s: float
    tenant: str
    adapter: str
    prompt_tokens: int
    output_tokens: int


def fit_lengths(prompt_tokens: int, output_tokens: int, *, context_tokens: int = CONTEXT_TOKENS,
                max_output_tokens: int = MAX_OUTPUT_TOKENS) -> tuple[int, int]:
    """(prompt, output) fitted to the context window: output capped first, the prompt takes the rest; each
    at least one token (a trace row with 0 generated tokens still costs a prefill and one step)."""
    output = max(1, min(output_tokens, max_output_tokens, context_tokens - 1))
    prompt = max(1, min(prompt_tokens, context_tokens - output))
    return prompt, output


def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative weights of a Zipf popularity over n items: item i (0-based) has weight 1 / (i + 1) ** s."""
    if n < 1:
        raise ValueError(f"a popularity needs at least one adapter (got {n})")
    if s < 0:
        raise ValueError(f"the Zipf exponent must be >= 0 (got {s})")
    return list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))


def adapter_name(i: int, n: int) -> str:
    """The name of adapter i of n, zero-padded so that names sort by popularity rank."""
    return f"a{i:0{max(3, len(str(n - 1)))}d}"


def load_azure(path: Path | str, *, adapters: int = 100, zipf_s: float = 1.0, seed: int = 0,
               context_tokens: int = CONTEXT_TOKENS, max_output_tokens: int = MAX_OUTPUT_TOKENS,
               limit: int | None = None) -> list[TraceRequest]:
    """An Azure LLM inference trace, adapters assigned by Zipf popularity (module docstring)."""
    cum = zipf_cum_weights(adapters, zipf_s)
    total = cum[-1]
    names = [adapter_name(i, adapters) for i in range(adapters)]
    rng = random.Random(seed)
    rows: list[tuple[datetime, int, int]] = []
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        _require(path, reader.fieldnames, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
        for line, row in enumerate(itertools.islice(reader, limit), start=2):
            try:
                at = datetime.fromisoformat(row["TIMESTAMP"][:AZURE_TIMESTAMP_CHARS])
                rows.append((at, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (TypeError, ValueError) as e:
                raise TraceError(f"{path}:{line}: not an Azure trace row ({e}): {row}") from e
    rows.sort(key=lambda r: r[0])
    out = []
    for at, context, generated in rows:
        prompt, output = fit_lengths(context, generated, context_tokens=context_tokens,
                                     max_output_tokens=max_output_tokens)
        # bisect over the cumulative weights: what random.choices does, without a list per call
        adapter = names[min(bisect.bisect(cum, rng.random() * total), adapters - 1)]
        out.append(TraceRequest((at - rows[0][0]).total_seconds(), AZURE_TENANT, adapter, prompt, output))
    return out


def load_alibaba(path: Path | str, *, output_tokens: int | Sequence[int] = 128, chars_per_token: float = 4.0,
                 seed: int = 0, context_tokens: int = CONTEXT_TOKENS, max_output_tokens: int = MAX_OUTPUT_TOKENS,
                 limit: int | None = None) -> list[TraceRequest]:
    """The Alibaba GenAI serving trace: one adapter per checkpoint model version (module docstring).
    `output_tokens`: a fixed length, or lengths to draw from uniformly (seeded)."""
    lengths = [output_tokens] if isinstance(output_tokens, int) else list(output_tokens)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"output lengths must be >= 1 (got {output_tokens})")
    if chars_per_token <= 0:
        raise ValueError(f"chars_per_token must be > 0 (got {chars_per_token})")
    rng = random.Random(seed)
    rows: list[tuple[datetime, str, str, int]] = []
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        _require(path, reader.fieldnames, ("gmt_create", "groupId", "prompt_length", "checkpoint_model_version_id"))
        for line, row in enumerate(itertools.islice(reader, limit), start=2):
            try:
                at = datetime.fromisoformat(row["gmt_create"])
                chars = float(row["prompt_length"] or 0)  # empty: no prompt text
            except (TypeError, ValueError) as e:
                raise TraceError(f"{path}:{line}: not an Alibaba trace row ({e}): {row}") from e
            rows.append((at, row["groupId"], row["checkpoint_model_version_id"], math.ceil(chars / chars_per_token)))
    rows.sort(key=lambda r: r[0])  # stable: rows of the same second keep the file's order
    out = []
    for at, tenant, model, prompt in rows:
        fitted = fit_lengths(prompt, rng.choice(lengths), context_tokens=context_tokens,
                             max_output_tokens=max_output_tokens)
        out.append(TraceRequest((at - rows[0][0]).total_seconds(), tenant, model, *fitted))
    return out


def detect_format(path: Path | str) -> TraceFormat:
    """The format of a trace file, from its header."""
    with Path(path).open(newline="") as f:
        header = next(csv.reader(f), [])
    if "TIMESTAMP" in header and "GeneratedTokens" in header:
        return "azure"
    if "gmt_create" in header and "checkpoint_model_version_id" in header:
        return "alibaba"
    raise TraceError(f"{path}: header {header} is neither an Azure LLM trace nor the Alibaba GenAI trace")


def _require(path: Path, fieldnames: Sequence[str] | None, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in (fieldnames or ())]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)} (header: {list(fieldnames or ())})")
