"""Continuous batching: which tokens of which requests run in the next step, and what their results do.

The engine step is `plan -> run -> commit`:

- `Batcher.plan(now)` (CPU only) picks the step's tokens under a `BatchPolicy`: first every running
  request (in arrival order) gets its next token, or the next chunk of a prompt that did not fit in one
  step; then waiting requests are admitted (see "Admission") while the token budget, the running limit,
  the adapter limits and the KV cache allow. It reserves their KV blocks and returns a `BatchPlan`, a
  plain dataclass that holds everything the runner needs (flat token ids, positions, per-sequence
  lengths, adapter segments). When the KV cache has no block for a running request's next token, the
  request that arrived last is preempted: its blocks are freed and it goes back to the waiting queue,
  keeping its arrival, to be recomputed (prompt and the tokens generated so far) when blocks are free
  again. Its sampling generator is kept, so its output does not change; a request is never dropped. A
  step that had to preempt admits no new request (the cache is short of blocks already).
- The runner computes one token for every chunk that ends at its request's last known token.
- `Batcher.commit(plan, token_ids)` appends those tokens, streams them (with their text) to each
  request's callback, applies stop token ids, stop strings and max_tokens, and frees the blocks of the
  requests that finished. It returns their `Completion`s.

Admission. Waiting requests are tried in ascending SLO slack (`admission="slack"`, the default) or in
arrival order (`"arrival"`). A request's slack is its TTFT target (its own `ttft_target_s`, else the
policy's) minus the time it has waited (`now - arrived_s`, both on the engine's clock; the batcher reads
no clock) minus its estimated prefill time (its tokens x `prefill_s_per_token`); ties go by arrival. A
request that has waited longer, has a tighter target or needs more prefill is tried first; a preempted
request keeps its arrival, so its slack only shrinks and it cannot starve behind newer ones. (Every
waiting request's waited time grows with `now` alike, so the order depends on `now` only through the
requests' own arrivals; `now` makes the slack values true seconds.)

No head-of-line blocking. A waiting request that does not fit now (KV blocks, `max_adapters_per_batch`,
the adapter pool, `max_adapter_bytes_per_step`) is passed over and the next ones are tried. Each step in
which a request was passed over and some request behind it was admitted counts against it; once that
count reaches `max_pass_overs`, the request becomes a wall: admission stops at it whenever it does not
fit, so nothing behind it takes the blocks or adapter room that running requests give back as they
finish, and it starts as soon as they suffice. `max_pass_overs=0` is strict arrival-order blocking.

Adapter limits on running requests. The adapters of the running requests are taken in an order that
rotates: first those whose requests were left out of the most steps in a row, then by their earliest
request; an adapter joins the step while `max_adapters_per_batch`, the adapter pool (`adapters_fit`) and
`max_adapter_bytes_per_step` allow. Requests of an adapter left out wait for a later step; the one left
out longest always comes first, and the first adapter of a step is never refused, so every running
request progresses (a single adapter larger than the byte cap runs alone). Requests without an adapter
are never left out for adapter reasons. Admission checks the same limits against the step's adapters,
so the running requests' adapters fit together as long as the limits stay; they take turns when the
limits tighten between steps (`batcher.policy` replaced).

Tokens of the same adapter are placed next to each other in the batch, so each adapter is one segment
of the LoRA kernels; with `group_by_rank` (and an `adapter_info`) the segments are ordered by rank, so
that the kernels' tiles of similar rank are adjacent.
"""

from __future__ import annotations

import bisect
import enum
import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

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

    arrival is the request's place in arrival order; arrived_s when it arrived, in seconds of the clock
    that passes `now` to `Batcher.plan`; ttft_target_s overrides the policy's TTFT target for it.
    pass_overs counts the steps in which it waited while a request behind it was admitted; adapter_skips
    the steps in a row in which it was running but left out for an adapter limit.
    """

    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    arrival: int
    arrived_s: float = 0.0
    ttft_target_s: float | None = None
    generator: torch.Generator | None = None
    callback: TokenCallback | None = None
    detokenizer: IncrementalDetokenizer | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    preemptions: int = 0
    pass_overs: int = 0
    adapter_skips: int = 0
    stopper: StopStrings = field(init=False)

    def __post_init__(self) -> None:
        if self.ttft_target_s is not None and not self.ttft_target_s > 0:
            raise ValueError(f"ttft_target_s ({self.ttft_target_s}) must be > 0 or None")
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


Admission = Literal["slack", "arrival"]


@dataclass(frozen=True)
class BatchPolicy:
    """Limits of one step's batch and the order of admission (see the module docstring).

    max_batch_tokens:       tokens per step, prefill chunks and decodes together; a longer prompt is
                            prefilled in chunks over several steps, so it never stalls the decodes
    max_running:            requests holding KV blocks at once
    max_adapters_per_batch: distinct adapters in one step (None = no limit)
    admission:              "slack" (ascending SLO slack) or "arrival" (first come, first served)
    ttft_target_s:          TTFT target of a request that gives none. 1 s: the p95 TTFT SLO that the
                            placement benchmark sizes workers for (bench/placement.py); only differences
                            between requests' targets change the order, so the value matters little
    prefill_s_per_token:    estimated prefill time per token, for the slack. 1.6 ms: a 256-1,024-token
                            prompt alone in a step of the 135M backbone on 2 CPU cores (the simulator's
                            calibration, bench/simulate.py); on a GPU it is smaller, and a deployment that
                            measures its own should set it
    max_pass_overs:         steps in which a waiting request may be passed over before admission stops at
                            it. 20: at the 20-100 ms of a decode step, 0.4-2 s, within about two TTFT
                            targets, while a stream of small requests still flows past one that needs the
                            blocks of several; 0 = strict head-of-line order
    max_adapter_bytes_per_step: the distinct adapters of one step read at most this many bytes (their pool
                            pages; None = no cap, a lone larger adapter still runs). Off by default: the
                            adapter pool already bounds a step's adapters, and the bytes a step can afford
                            are the device's bandwidth times the read time the deployment tolerates per
                            step (27 GB/s on the 2-core CPU, terabytes per second on a GPU), so no one
                            value suits both; with it set, the batcher needs `adapter_info`
    group_by_rank:          order the plan's adapter segments by rank (needs `adapter_info`; free: a sort
                            of a step's few segments), so that tiles of similar rank are adjacent for the
                            LoRA kernels
    """

    max_batch_tokens: int = 2048
    max_running: int = 64
    max_adapters_per_batch: int | None = None
    admission: Admission = "slack"
    ttft_target_s: float = 1.0
    prefill_s_per_token: float = 0.0016
    max_pass_overs: int = 20
    max_adapter_bytes_per_step: int | None = None
    group_by_rank: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= 1")
        if self.max_running < 1:
            raise ValueError(f"max_running ({self.max_running}) must be >= 1")
        if self.max_adapters_per_batch is not None and self.max_adapters_per_batch < 1:
            raise ValueError(f"max_adapters_per_batch ({self.max_adapters_per_batch}) must be >= 1 or None")
        if self.admission not in ("slack", "arrival"):
            raise ValueError(f"admission ({self.admission!r}) must be 'slack' or 'arrival'")
        if not self.ttft_target_s > 0:
            raise ValueError(f"ttft_target_s ({self.ttft_target_s}) must be > 0")
        if not self.prefill_s_per_token >= 0:
            raise ValueError(f"prefill_s_per_token ({self.prefill_s_per_token}) must be >= 0")
        if self.max_pass_overs < 0:
            raise ValueError(f"max_pass_overs ({self.max_pass_overs}) must be >= 0")
        if self.max_adapter_bytes_per_step is not None and self.max_adapter_bytes_per_step < 1:
            raise ValueError(
                f"max_adapter_bytes_per_step ({self.max_adapter_bytes_per_step}) must be >= 1 or None"
            )


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
class AdapterFootprint:
    """What the batcher knows of one adapter: the bytes a step reads for it (its pages in the adapter pool)
    and its rank (the largest over its modules)."""

    nbytes: int
    rank: int


# The footprint of a registered adapter (the engine's, from `ResidentAdapters`).
AdapterInfo = Callable[[str], AdapterFootprint]


@dataclass
class BatcherStats:
    """Counters of the batcher's contention decisions since it started.

    passed_over:    (request, step) pairs in which a waiting request was passed over by one behind it
    walls:          steps in which admission stopped at a request passed over `max_pass_overs` times
    adapter_skips:  (request, step) pairs in which a running request was left out for an adapter limit
    byte_cap_steps: steps in which `max_adapter_bytes_per_step` left out an adapter (running or waiting)
    """

    passed_over: int = 0
    walls: int = 0
    adapter_skips: int = 0
    byte_cap_steps: int = 0


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
    segments:    (adapter key or None, tokens) runs for `AdapterPool.bind`, one per adapter: in order
                 of first appearance, or by ascending rank (no adapter first) when built with `rank`
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
    def build(
        cls,
        chunks: Iterable[ScheduledChunk],
        preempted: Sequence[Request] = (),
        *,
        rank: Callable[[str], int] | None = None,
    ) -> BatchPlan:
        """Group chunks by adapter (first appearance order; then stably by `rank` when given) and derive
        the flat lists."""
        groups: dict[str | None, list[ScheduledChunk]] = {}
        for chunk in chunks:
            groups.setdefault(chunk.request.adapter, []).append(chunk)
        ordered = list(groups.items())
        if rank is not None:
            ordered.sort(key=lambda item: 0 if item[0] is None else rank(item[0]))
        plan = cls(preempted=list(preempted))
        offset = 0
        for key, group in ordered:
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
    """Waiting and running requests, and the KV blocks they hold (see the module docstring).

    adapters_fit: whether a set of adapters fits the adapter pool together (None: always)
    adapter_info: each adapter's bytes and rank, for `max_adapter_bytes_per_step` and `group_by_rank`
                  (None: no byte cap may be set, and segments keep their order)
    """

    def __init__(
        self,
        kv: BlockSpace,
        policy: BatchPolicy,
        *,
        adapters_fit: AdaptersFit | None = None,
        adapter_info: AdapterInfo | None = None,
    ) -> None:
        if policy.max_adapter_bytes_per_step is not None and adapter_info is None:
            raise ValueError("max_adapter_bytes_per_step needs adapter_info (each adapter's bytes)")
        self.kv = kv
        self.policy = policy
        self.adapters_fit = adapters_fit
        self.adapter_info = adapter_info
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival
        self.stats = BatcherStats()
        self._by_id: dict[str, Request] = {}
        self._footprints: dict[str, AdapterFootprint] = {}  # asked once per plan
        self._byte_cap_bound = False

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

    def slack(self, req: Request, now: float) -> float:
        """Seconds to spare before `req` misses its TTFT target: target - waited - estimated prefill."""
        target = req.ttft_target_s if req.ttft_target_s is not None else self.policy.ttft_target_s
        return target - (now - req.arrived_s) - req.num_tokens * self.policy.prefill_s_per_token

    # -- plan --------------------------------------------------------------------------------------------

    def plan(self, now: float = 0.0) -> BatchPlan:
        """Choose this step's chunks and reserve their KV blocks (see the module docstring); `now` is the
        clock of the requests' `arrived_s`."""
        self._footprints.clear()
        self._byte_cap_bound = False
        budget = self.policy.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        adapters: set[str] = set()

        allowed = self._running_adapters()
        for req in self.running:
            if req.adapter is not None and req.adapter not in allowed:
                req.adapter_skips += 1
                self.stats.adapter_skips += 1
            else:
                req.adapter_skips = 0
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.adapter is not None and req.adapter not in allowed:
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

        if not preempted:
            budget = self._admit(now, budget, adapters, chunks)
        if self._byte_cap_bound:
            self.stats.byte_cap_steps += 1
        rank = self._rank if self.policy.group_by_rank and self.adapter_info is not None else None
        return BatchPlan.build(chunks, preempted, rank=rank)

    def _admit(self, now: float, budget: int, adapters: set[str], chunks: list[ScheduledChunk]) -> int:
        """Admit waiting requests into this step (in admission order, passing over those that do not fit
        until one of them is a wall); returns the token budget left."""
        if self.policy.admission == "slack":
            order = sorted(self.waiting, key=lambda r: (self.slack(r, now), r.arrival))
        else:
            order = list(self.waiting)
        passed: list[Request] = []
        jumped = 0  # passed[:jumped] had a request behind them admitted in this step
        for req in order:
            if budget <= 0 or len(self.running) >= self.policy.max_running:
                break
            # Admit only when the blocks for all its known tokens and the next one are free, so that a
            # new request does not start just to be preempted; the blocks are taken chunk by chunk.
            fits = (self._adapter_allowed(req.adapter, adapters)
                    and self.kv.blocks_needed(req.num_tokens + 1) <= self.kv.num_free_blocks)
            if not fits:
                if req.pass_overs >= self.policy.max_pass_overs:
                    self.stats.walls += 1
                    break
                passed.append(req)
                continue
            n = min(req.num_tokens, budget)
            self.kv.allocate(req.request_id, n)
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            req.pass_overs = req.adapter_skips = 0
            bisect.insort(self.running, req, key=lambda r: r.arrival)
            chunks.append(ScheduledChunk(req, 0, n, n == req.num_tokens))
            if req.adapter is not None:
                adapters.add(req.adapter)
            budget -= n
            jumped = len(passed)
        for req in passed[:jumped]:
            req.pass_overs += 1
        self.stats.passed_over += jumped
        return budget

    def _running_adapters(self) -> set[str]:
        """The adapters whose running requests may run in this step: those left out longest first, then
        by their earliest request, each while the adapter limits allow."""
        groups: dict[str, tuple[int, int]] = {}  # adapter -> (most steps left out in a row, first arrival)
        for req in self.running:
            if req.adapter is not None:
                skips, first = groups.get(req.adapter, (0, req.arrival))
                groups[req.adapter] = (max(skips, req.adapter_skips), first)
        allowed: set[str] = set()
        for key in sorted(groups, key=lambda k: (-groups[k][0], groups[k][1])):
            if self._adapter_allowed(key, allowed):
                allowed.add(key)
        return allowed

    def _adapter_allowed(self, key: str | None, adapters: set[str]) -> bool:
        """Whether a request of adapter `key` may join a step that already has `adapters`."""
        if key is None or key in adapters or not adapters:
            return True
        cap = self.policy.max_adapters_per_batch
        if cap is not None and len(adapters) >= cap:
            return False
        byte_cap = self.policy.max_adapter_bytes_per_step
        if byte_cap is not None and self._nbytes(key) + sum(self._nbytes(k) for k in adapters) > byte_cap:
            self._byte_cap_bound = True
            return False
        return self.adapters_fit is None or self.adapters_fit(frozenset(adapters | {key}))

    def _footprint(self, key: str) -> AdapterFootprint:
        footprint = self._footprints.get(key)
        if footprint is None:
            assert self.adapter_info is not None
            footprint = self._footprints[key] = self.adapter_info(key)
        return footprint

    def _nbytes(self, key: str) -> int:
        return self._footprint(key).nbytes

    def _rank(self, key: str) -> int:
        return self._footprint(key).rank

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
