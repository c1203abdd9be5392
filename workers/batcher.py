"""Continuous batching: which tokens of which requests run in the next step, and what their results do.

The engine step is `plan -> run -> commit`:

- `Batcher.plan()` (CPU only) picks the step's tokens under a `BatchPolicy`: first every running request
  (in arrival order) gets its next token, or the next chunk of a prompt that did not fit in one step;
  then waiting requests are admitted in arrival order while the token budget, the running limit, the
  adapter limits and the KV cache allow. It reserves their KV blocks and returns a `BatchPlan`, a plain
  dataclass that holds everything the runner needs (flat token ids, positions, per-sequence lengths,
  adapter segments). When the KV cache has no block for a running request's next token, the request
  that arrived last is preempted: its blocks are freed and it goes back to the waiting queue, to be
  recomputed (prompt and the tokens generated so far) when blocks are free again. Its sampling
  generator is kept, so its output does not change; a request is never dropped.
- The runner computes one token for every chunk that ends at its request's last known token.
- `Batcher.commit(plan, token_ids)` appends those tokens, streams them (with their text) to each
  request's callback, applies stop token ids, stop strings and max_tokens, and frees the blocks of the
  requests that finished. It returns their `Completion`s.

Tokens of the same adapter are placed next to each other in the batch, so each adapter is one segment
of the LoRA kernels.
"""

from __future__ import annotations

import bisect
import enum
import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.sampling import SamplingParams, StopStrings
from workers.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


class FinishReason(enum.StrEnum):
    """Why a request stopped generating."""

    STOP = "stop"  # a stop token id or a stop string
    LENGTH = "length"  # max_tokens (after clamping to the context window)
    ABORT = "abort"  # cancelled by the caller


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as streamed to a request's callback.

    token_id:      the token (a stop token id that ended the request is reported too)
    text:          the text this token adds to the output (may be empty: a partial character, text held
                   back because it may begin a stop string, or a stop token)
    finish_reason: set on the request's last event only
    """

    request_id: str
    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None


TokenCallback = Callable[[TokenEvent], None]


@dataclass(frozen=True)
class Completion:
    """A finished request: its generated tokens and text (without any stop string)."""

    request_id: str
    adapter: str | None
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    preemptions: int = 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """The mutable state of one request inside the batcher.

    max_tokens is the request's limit after clamping (see `Engine.submit`); stop_token_ids are all the
    ids that end it. num_computed counts tokens whose K/V are in the cache (0 while waiting, also after a
    preemption); the request's tokens are prompt_ids followed by output_ids.
    """

    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    arrival: int
    generator: torch.Generator | None = None
    callback: TokenCallback | None = None
    detokenizer: IncrementalDetokenizer | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    preemptions: int = 0
    stopper: StopStrings = field(init=False)

    def __post_init__(self) -> None:
        self.stopper = StopStrings(self.params.stop)

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]


@dataclass(frozen=True)
class BatchPolicy:
    """Limits of one step's batch (later scheduler work may cap or group adapters through it).

    max_batch_tokens:       tokens per step, prefill chunks and decodes together; a longer prompt is
                            prefilled in chunks over several steps, so it never stalls the decodes
    max_running:            requests holding KV blocks at once
    max_adapters_per_batch: distinct adapters in one step (None = no limit)
    """

    max_batch_tokens: int = 2048
    max_running: int = 64
    max_adapters_per_batch: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= 1")
        if self.max_running < 1:
            raise ValueError(f"max_running ({self.max_running}) must be >= 1")
        if self.max_adapters_per_batch is not None and self.max_adapters_per_batch < 1:
            raise ValueError(f"max_adapters_per_batch ({self.max_adapters_per_batch}) must be >= 1 or None")


class BlockSpace(Protocol):
    """The block bookkeeping of the KV cache that the batcher uses (`workers.kv_cache.PagedKVCache`)."""

    num_blocks: int
    block_size: int

    @property
    def num_free_blocks(self) -> int: ...

    def blocks_needed(self, num_tokens: int, seq_id: Hashable | None = None) -> int: ...

    def can_append(self, num_tokens: int, seq_id: Hashable | None = None) -> bool: ...

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]: ...

    def append(self, seq_id: Hashable, num_tokens: int = 1) -> list[int]: ...

    def free(self, seq_id: Hashable) -> int: ...


# Whether a set of adapters can be resident together (the adapter pool's capacity); None = always.
AdaptersFit = Callable[[frozenset[str]], bool]


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens [start, start + length) of one request run in this step; `samples` when they end at its
    last known token, so the logits of the chunk's last token give the request's next token."""

    request: Request
    start: int
    length: int
    samples: bool


@dataclass
class BatchPlan:
    """One step's batch: everything the runner needs, as plain lists (token order = chunk order).

    chunks:      scheduled chunks, grouped by adapter
    seq_ids:     [S] KV cache sequence id of each chunk
    query_lens:  [S] tokens of each chunk
    input_ids:   [T] token ids, flattened over chunks
    positions:   [T] position of each token in its request
    segments:    (adapter key or None, tokens) runs for `AdapterPool.bind`
    adapters:    distinct adapter keys of the step, in batch order
    sample_rows: flattened index of the last token of each sampling chunk (order of `sampled`)
    preempted:   requests preempted while planning this step
    """

    chunks: list[ScheduledChunk] = field(default_factory=list)
    seq_ids: list[str] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[tuple[str | None, int]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @classmethod
    def build(cls, chunks: Iterable[ScheduledChunk], preempted: Sequence[Request] = ()) -> BatchPlan:
        """Group chunks by adapter (first appearance order) and derive the flat lists."""
        groups: dict[str | None, list[ScheduledChunk]] = {}
        for chunk in chunks:
            groups.setdefault(chunk.request.adapter, []).append(chunk)
        plan = cls(preempted=list(preempted))
        offset = 0
        for key, group in groups.items():
            group_tokens = 0
            for chunk in group:
                req = chunk.request
                plan.chunks.append(chunk)
                plan.seq_ids.append(req.request_id)
                plan.query_lens.append(chunk.length)
                plan.input_ids.extend(req.tokens(chunk.start, chunk.start + chunk.length))
                plan.positions.extend(range(chunk.start, chunk.start + chunk.length))
                offset += chunk.length
                group_tokens += chunk.length
                if chunk.samples:
                    plan.sample_rows.append(offset - 1)
            plan.segments.append((key, group_tokens))
            if key is not None:
                plan.adapters.append(key)
        return plan

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def sampled(self) -> list[Request]:
        """Requests that receive a token from this step, in the order of `sample_rows`."""
        return [c.request for c in self.chunks if c.samples]

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Batcher:
    """Waiting and running requests, and the KV blocks they hold (see the module docstring)."""

    def __init__(self, kv: BlockSpace, policy: BatchPolicy, *, adapters_fit: AdaptersFit | None = None) -> None:
        self.kv = kv
        self.policy = policy
        self.adapters_fit = adapters_fit
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival
        self._by_id: dict[str, Request] = {}

    # -- requests ----------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in the batcher")
        self._by_id[request.request_id] = request
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=lambda r: r.arrival)

    def abort(self, request_id: str) -> Completion | None:
        """Stop a request now (its callback gets a final ABORT event); None if it is not here."""
        req = self._by_id.get(request_id)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._emit(req, None, "", FinishReason.ABORT)
        return self._finish(req, FinishReason.ABORT)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def __len__(self) -> int:
        return len(self._by_id)

    # -- plan --------------------------------------------------------------------------------------------

    def plan(self) -> BatchPlan:
        """Choose this step's chunks and reserve their KV blocks (see the module docstring)."""
        budget = self.policy.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        adapters: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if not self._adapter_allowed(req.adapter, adapters):
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self.kv.can_append(n, req.request_id) and self.running[-1] is not req:
                preempted.append(self._preempt(self.running[-1]))
            if not self.kv.can_append(n, req.request_id):
                preempted.append(self._preempt(req))
                break
            self.kv.append(req.request_id, n)
            chunks.append(ScheduledChunk(req, req.num_computed, n, req.num_computed + n == req.num_tokens))
            if req.adapter is not None:
                adapters.add(req.adapter)
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.policy.max_running:
            req = self.waiting[0]
            if req in preempted or not self._adapter_allowed(req.adapter, adapters):
                break
            # Admit only when the blocks for all its known tokens and the next one are free, so that a
            # new request does not start just to be preempted; the blocks are taken chunk by chunk.
            if self.kv.blocks_needed(req.num_tokens + 1) > self.kv.num_free_blocks:
                break
            n = min(req.num_tokens, budget)
            self.kv.allocate(req.request_id, n)
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.arrival)
            chunks.append(ScheduledChunk(req, 0, n, n == req.num_tokens))
            if req.adapter is not None:
                adapters.add(req.adapter)
            budget -= n
        return BatchPlan.build(chunks, preempted)

    def _adapter_allowed(self, key: str | None, adapters: set[str]) -> bool:
        """Whether a request of adapter `key` may join a step that already has `adapters`."""
        if key is None or key in adapters or not adapters:
            return True
        cap = self.policy.max_adapters_per_batch
        if cap is not None and len(adapters) >= cap:
            return False
        return self.adapters_fit is None or self.adapters_fit(frozenset(adapters | {key}))

    def _preempt(self, req: Request) -> Request:
        """Free a running request's blocks and requeue it for recompute (generator state kept)."""
        self.kv.free(req.request_id)
        self.running.remove(req)
        req.num_computed = 0
        req.preemptions += 1
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)
        logger.debug(
            "preempted request %s (%d tokens to recompute, %d free blocks)",
            req.request_id, req.num_tokens, self.kv.num_free_blocks,
        )
        return req

    # -- commit ------------------------------------------------------------------------------------------

    def commit(self, plan: BatchPlan, token_ids: Sequence[int]) -> list[Completion]:
        """Record that the plan ran: `token_ids[i]` is the next token of `plan.sampled[i]`.

        Streams each token to its request's callback and returns the requests that finished.
        """
        sampled = plan.sampled
        if len(token_ids) != len(sampled):
            raise ValueError(f"{len(token_ids)} tokens for {len(sampled)} sampling requests")
        for chunk in plan.chunks:
            chunk.request.num_computed += chunk.length
        done: list[Completion] = []
        for req, token in zip(sampled, token_ids, strict=True):
            finish = self._append(req, int(token))
            if finish is not None:
                self.running.remove(req)
                done.append(self._finish(req, finish))
        return done

    def _append(self, req: Request, token: int) -> FinishReason | None:
        """Add one generated token; stream it; return the finish reason if the request is done."""
        req.output_ids.append(token)
        finish: FinishReason | None = None
        text, hit = "", False
        if token in req.stop_token_ids:
            finish = FinishReason.STOP
        else:
            delta = req.detokenizer.push(token) if req.detokenizer is not None else ""
            text, hit = req.stopper.push(delta)
            if hit:
                finish = FinishReason.STOP
        if finish is None and len(req.output_ids) >= req.max_tokens:
            finish = FinishReason.LENGTH
        if finish is not None and not hit:
            text += self._drain(req)
        req.text += text
        self._emit(req, token, text, finish)
        return finish

    @staticmethod
    def _drain(req: Request) -> str:
        """Text still held back when a request ends for a reason other than a stop string."""
        leftover = req.detokenizer.flush() if req.detokenizer is not None else ""
        text, hit = req.stopper.push(leftover)
        return text if hit else text + req.stopper.flush()

    @staticmethod
    def _emit(req: Request, token: int | None, text: str, finish: FinishReason | None) -> None:
        if req.callback is not None:
            req.callback(TokenEvent(req.request_id, token, text, finish))

    def _finish(self, req: Request, reason: FinishReason) -> Completion:
        self.kv.free(req.request_id)
        del self._by_id[req.request_id]
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        return Completion(
            request_id=req.request_id,
            adapter=req.adapter,
            prompt_tokens=len(req.prompt_ids),
            token_ids=list(req.output_ids),
            text=req.text,
            finish_reason=reason,
            preemptions=req.preemptions,
        )
