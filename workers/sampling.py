"""Choosing the next token of every sequence of a step, and cutting generated text at stop strings.

`sample` turns the step's logits `[num_seqs, vocab]` into one token id per sequence:
- greedy rows (temperature 0) take `argmax` over the whole batch at once;
- the other rows are scaled by their temperature, filtered by top-k and top-p (all rows together, in
  one sort), and each draws ONE uniform number from its own `torch.Generator`, turned into a token by
  inverse-CDF (`searchsorted` on the filtered, sorted probabilities, again all rows together).
A request's tokens therefore depend only on its own logits and its own generator: the same seed gives
the same tokens whatever else is in the batch, and a preempted request that is recomputed later keeps
its generator (which advances only when a token is sampled), so its output is unchanged.

`StopStrings` watches the detokenized text of one request for its stop strings, holding back the tail
that could still become one (a stop string may span token boundaries), and never emits the stop
string itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class SamplingParamsInvalid(ValueError):
    """A sampling parameter is out of range; the message names it and its value."""

    def __init__(self, name: str, value: object, accepted: str) -> None:
        super().__init__(f"{name} is {value!r}; accepted: {accepted}")
        self.name = name
        self.value = value
        self.accepted = accepted


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    temperature:    0 = greedy (argmax); otherwise logits are divided by it before softmax
    top_p:          keep the smallest set of most likely tokens whose probability reaches top_p (1 = all)
    top_k:          keep the k most likely tokens (0 = all)
    seed:           seed of the request's own generator; None draws one from the engine's seed sequence
    max_tokens:     most tokens to generate (the engine clamps it to the context window and KV capacity)
    stop:           strings that end generation when they appear in the text; not included in the output
    stop_token_ids: token ids that end generation, besides the tokenizer's eos / end-of-turn ids
    ignore_eos:     do not stop at the tokenizer's eos / end-of-turn ids (explicit stop_token_ids still stop)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise SamplingParamsInvalid("temperature", self.temperature, ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsInvalid("top_p", self.top_p, "0 < top_p <= 1")
        if self.top_k < 0:
            raise SamplingParamsInvalid("top_k", self.top_k, ">= 0 (0 = no limit)")
        if self.max_tokens < 1:
            raise SamplingParamsInvalid("max_tokens", self.max_tokens, ">= 1")
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise SamplingParamsInvalid("stop", self.stop, "non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplerRow:
    """What `sample` needs of one sequence: its parameters and its generator (None when greedy)."""

    params: SamplingParams
    generator: torch.Generator | None


def sample(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> list[int]:
    """One token id per row of `logits` [num_seqs, vocab] (any float dtype), following `rows[i]`.

    Greedy rows need no generator; every other row must have one and advances it by exactly one draw.
    """
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(rows)} sampler rows")
    if not rows:
        return []
    chosen = logits.argmax(dim=-1)  # [N] int64
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        picked = _sample_random(logits[random_rows], [rows[i] for i in random_rows])  # [n]
        chosen[random_rows] = picked
    return chosen.tolist()


def _sample_random(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
    """Temperature, top-k, top-p and one inverse-CDF draw per row. logits: [n, vocab] -> [n] int64."""
    vocab = logits.shape[1]
    temperature = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)  # [n]
    scaled = logits.float() / temperature[:, None]  # [n, vocab]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [n, vocab] each
    sorted_probs = sorted_logits.softmax(dim=-1)  # [n, vocab], descending
    rank = torch.arange(vocab)[None, :]  # [1, vocab]
    top_k = torch.tensor([r.params.top_k or vocab for r in rows])  # [n]
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32)  # [n]
    # A token is kept when it is among the top k and the mass strictly before it is below top_p (so the
    # most likely token is always kept).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [n, vocab]
    keep_sorted = (rank < top_k[:, None]) & (mass_before < top_p[:, None])
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)  # [n, vocab], token-id order
    # The draw walks the distribution in token-id order, in float64: the last-bit differences that other
    # batch shapes cause in the logits then move the CDF by a rounding error instead of reordering
    # near-equal tokens, so a seed gives the same token alone or in any batch (and on a redelivery).
    probs = scaled.double().softmax(dim=-1).masked_fill_(~keep, 0.0)  # [n, vocab]
    cdf = probs.cumsum(dim=-1)  # [n, vocab]
    uniform = torch.cat([torch.rand(1, generator=_generator(r), dtype=torch.float64) for r in rows])  # [n]
    target = (uniform * cdf[:, -1]).unsqueeze(1)  # [n, 1]
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)  # [n, 1]
    # Filtered tokens add no mass, so the search never stops on one, except past the last kept token
    # through rounding at the top of the cdf.
    last_kept = torch.where(keep, rank, -1).amax(dim=-1, keepdim=True)  # [n, 1]
    return torch.minimum(index, last_kept).squeeze(1)


def _generator(row: SamplerRow) -> torch.Generator:
    if row.generator is None:
        raise ValueError(f"a request with temperature {row.params.temperature} needs a generator")
    return row.generator


# ------------------------------------------------------------------------------------------ stop strings


@dataclass
class StopStrings:
    """Cuts one request's streamed text at the first stop string, which is never emitted.

    `push(delta)` returns (text safe to emit now, whether a stop string was found). Text that could be
    the beginning of a stop string is held back until the following text rules that out; `flush`
    returns it when generation ends for another reason.
    """

    stops: tuple[str, ...]
    _pending: str = field(default="", init=False)
    _longest: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._longest = max((len(s) for s in self.stops), default=0)

    def push(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self._pending + delta
        # The held-back text is shorter than the longest stop string, so this search stays short.
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        keep = self._held_tail(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
