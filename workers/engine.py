"""The inference engine: continuous batching of many adapters' requests over one shared backbone.

    engine = Engine(backbone, EngineSettings(), tokenizer=tokenizer)
    engine.add_adapter("sha256-of-adapter", lora_weights_or_parsed_adapter)
    engine.submit("Hello", adapter="sha256-of-adapter", params=SamplingParams(temperature=0), on_token=cb)
    while engine.has_work:
        for completion in engine.step(): ...

One `step` is a sentence: plan the batch (CPU), make its adapters resident, run the model and sample
(device), commit the tokens (stream, stop, free). Requests join and leave at every step; one batch
mixes prefill chunks and decodes of requests of different adapters, ranks, and of the bare backbone.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, Field

from scheduler.policy import EvictionPolicy
from scheduler.staging import GreedyDualEviction
from storage.adapter_format import ParsedAdapter
from workers.adapter_pool import (
    DEFAULT_MAX_RANK,
    AdapterDtype,
    AdapterPool,
    LoraWeights,
    PendingLoad,
    adapter_pool_dtype,
)
from workers.adapters import ResidentAdapters, UnknownAdapter
from workers.batcher import (
    AdapterFootprint,
    Admission,
    Batcher,
    BatchPlan,
    BatchPolicy,
    Completion,
    Request,
    TokenCallback,
)
from workers.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from workers.model import Backbone
from workers.sampling import SamplerRow, SamplingParams, sample
from workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

AdapterLoad = Literal["background", "engine"]


class EngineError(Exception):
    """Base of the engine's request errors."""


class PromptTooLong(EngineError):
    """A prompt leaves no room for a generated token in the context window (or the KV cache)."""

    def __init__(self, *, tokens: int, max_tokens: int) -> None:
        super().__init__(f"prompt has {tokens} tokens; at most {max_tokens} fit in the context window")
        self.tokens = tokens
        self.max_tokens = max_tokens


class EmptyPrompt(EngineError):
    def __init__(self) -> None:
        super().__init__("prompt has no tokens")


class NoTokenizer(EngineError):
    """Text prompts and stop strings need a tokenizer, and the engine was built without one."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs a tokenizer; this engine has none")
        self.what = what


class EngineSettings(BaseModel):
    """Sizes and limits of one engine (built by the worker's main and passed down)."""

    kv_cache_bytes: int = Field(512 << 20, gt=0, description="bytes of the paged KV cache (K and V, all layers)")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1, description="tokens per KV cache block")
    adapter_pool_bytes: int = Field(1 << 30, gt=0, description="bytes of the paged adapter pool")
    adapter_dtype: AdapterDtype = Field(
        "auto",
        description="dtype of the adapter pool's pages: auto (bfloat16 on CPU when the native LoRA kernel is "
        "available, else float32; float16 on GPU), float32, bfloat16 or float16",
    )
    max_rank: int = Field(DEFAULT_MAX_RANK, ge=1, description="largest LoRA rank the adapter pool accepts")
    adapter_load: AdapterLoad = Field(
        "background",
        description="how a worker brings an adapter into the pool: background (converted and copied into "
        "reserved pages off the engine thread, then published between two steps) or engine (copied on the "
        "engine thread between two steps, which holds every decode of the worker meanwhile)",
    )
    max_batch_tokens: int = Field(2048, ge=1, description="tokens per step (prefill chunks + decodes)")
    max_running: int = Field(64, ge=1, description="requests holding KV blocks at once")
    max_adapters_per_batch: int | None = Field(None, ge=1, description="distinct adapters per step (None: any)")
    # Admission and adapter contention; the defaults and why are in `workers.batcher.BatchPolicy`.
    admission: Admission = Field(
        "slack", description="order of admission: slack (ascending TTFT slack) or arrival (first come, first served)"
    )
    ttft_target_s: float = Field(1.0, gt=0, description="TTFT target of a request that gives none (slack order)")
    prefill_s_per_token: float = Field(
        0.0016, ge=0, description="estimated prefill seconds per prompt token (slack order)"
    )
    max_pass_overs: int = Field(
        20, ge=0, description="steps a waiting request that does not fit may be passed over before admission "
        "stops at it (0: strict head-of-line order)",
    )
    max_adapter_bytes_per_step: int | None = Field(
        None, ge=1, description="bytes of distinct adapters (their pool pages) one step may read (None: no cap; "
        "a lone larger adapter still runs)",
    )
    group_by_rank: bool = Field(True, description="order a step's adapter segments by rank for the LoRA kernels")
    eviction: Literal["lru", "greedy_dual"] = Field(
        "lru", description="which unused adapters leave the pool when it is full: lru (least recently used) or "
        "greedy_dual (GreedyDual-Size-Frequency: use count x reload cost / size, aged; fewer cold starts than "
        "LRU in the scheduling bench, README 'Pre-staging')",
    )
    max_model_len: int | None = Field(
        None, ge=2, description="context window in tokens (None: the backbone's max_position_embeddings)"
    )
    seed: int = Field(0, description="seeds the generators of sampling requests that give no seed")

    def policy(self) -> BatchPolicy:
        return BatchPolicy(
            max_batch_tokens=self.max_batch_tokens,
            max_running=self.max_running,
            max_adapters_per_batch=self.max_adapters_per_batch,
            admission=self.admission,
            ttft_target_s=self.ttft_target_s,
            prefill_s_per_token=self.prefill_s_per_token,
            max_pass_overs=self.max_pass_overs,
            max_adapter_bytes_per_step=self.max_adapter_bytes_per_step,
            group_by_rank=self.group_by_rank,
        )


class ModelRunner:
    """Runs a `BatchPlan` through the backbone and samples one token per sampling chunk."""

    def __init__(self, backbone: Backbone, kv: PagedKVCache, pool: AdapterPool) -> None:
        self.backbone = backbone
        self.kv = kv
        self.pool = pool

    def run(self, plan: BatchPlan) -> list[int]:
        """Next token of every request in `plan.sampled` (in that order)."""
        logits = self.logits(plan)  # [num_sampled, vocab]
        return sample(logits, [SamplerRow(r.params, r.generator) for r in plan.sampled])

    @torch.inference_mode()
    def logits(self, plan: BatchPlan) -> torch.Tensor:
        """Write the plan's K/V into the cache; logits [num_sampled, vocab] of each sampling chunk's last
        token (only those rows go through the LM head)."""
        device = self.backbone.device
        input_ids = torch.tensor(plan.input_ids, dtype=torch.long, device=device)  # [T]
        positions = torch.tensor(plan.positions, dtype=torch.long, device=device)  # [T]
        attn = self.kv.metadata(plan.seq_ids, plan.query_lens)
        lora = self.pool.bind(plan.segments) if plan.adapters else None
        hidden = self.backbone(input_ids, positions, attn, self.kv, lora)  # [T, hidden]
        rows = torch.tensor(plan.sample_rows, dtype=torch.long, device=device)  # [num_sampled]
        return self.backbone.compute_logits(hidden.index_select(0, rows))


class Engine:
    """Continuous batching over one backbone, one paged KV cache and one paged adapter pool."""

    def __init__(
        self,
        backbone: Backbone,
        settings: EngineSettings | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        eviction: EvictionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`eviction` chooses the adapters a step evicts when the pool is full (when None, the settings' choice);
        a worker passes the same policy to its `AdapterTiers`. `clock` (seconds) stamps the requests'
        arrivals and gives each step's `now` for the batcher's slack order."""
        self.settings = settings = settings or EngineSettings()
        self.backbone = backbone
        self.tokenizer = tokenizer
        spec = backbone.spec
        self.kv = PagedKVCache.from_budget(
            spec, settings.kv_cache_bytes, block_size=settings.block_size, dtype=backbone.dtype,
            device=backbone.device,
        )
        pool = AdapterPool(
            spec, settings.adapter_pool_bytes, device=backbone.device, max_rank=settings.max_rank,
            dtype=adapter_pool_dtype(settings.adapter_dtype, backbone.device),
        )
        self.pool = pool
        if eviction is None and settings.eviction == "greedy_dual":
            eviction = GreedyDualEviction(page_bytes=pool.page_bytes)
        self.adapters = ResidentAdapters(pool, eviction)
        self.batcher = Batcher(self.kv, settings.policy(), adapters_fit=self.adapters.fits,
                               adapter_info=self._footprint)
        self.clock = clock
        self.runner = ModelRunner(backbone, self.kv, pool)
        window = settings.max_model_len or spec.max_position_embeddings
        # A request's prompt and output must fit both the context window and the whole KV cache.
        self.max_len = min(window, self.kv.num_blocks * self.kv.block_size)
        self._seeds = random.Random(settings.seed)
        self._ids = itertools.count()
        logger.info(
            "engine: %d KV blocks of %d tokens, adapter pool of %d pages (%s), max length %d tokens",
            self.kv.num_blocks, self.kv.block_size, self.adapters.total_pages,
            str(pool.dtype).removeprefix("torch."), self.max_len,
        )

    # -- adapters ----------------------------------------------------------------------------------------

    def add_adapter(self, key: str, adapter: LoraWeights | ParsedAdapter) -> None:
        """Register an adapter under `key` (validated now; loaded into the pool when a step needs it)."""
        self.adapters.register(key, adapter)

    def adopt_adapter(self, pending: PendingLoad) -> None:
        """Register an adapter whose pages were reserved and written off the engine thread
        (`AdapterPool.stage` / `reserve` / `write`): it is resident and usable from the next step on."""
        self.adapters.adopt(pending)

    def remove_adapter(self, key: str) -> None:
        self.adapters.unregister(key)

    def _footprint(self, key: str) -> AdapterFootprint:
        """An adapter's bytes in the pool (whole pages) and rank, for the batcher."""
        return AdapterFootprint(self.adapters.pages(key) * self.pool.page_bytes, self.adapters.rank(key))

    @property
    def eviction(self) -> EvictionPolicy:
        """The policy that chooses which adapters leave the pool to make room."""
        return self.adapters.eviction

    # -- requests ----------------------------------------------------------------------------------------

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise `EmptyPrompt` or `PromptTooLong` for a prompt `submit` would refuse (reads only the fixed
        context window: safe from any thread)."""
        if not prompt_ids:
            raise EmptyPrompt()
        if len(prompt_ids) >= self.max_len:
            raise PromptTooLong(tokens=len(prompt_ids), max_tokens=self.max_len - 1)

    def submit(
        self,
        prompt: str | Sequence[int],
        *,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        request_id: str | None = None,
        ttft_target_s: float | None = None,
        arrived_s: float | None = None,
    ) -> str:
        """Queue a request; returns its id. It starts at a later `step` (see `workers.batcher`, Admission).

        prompt:        text (encoded with the tokenizer, BOS added if the checkpoint asks) or token ids
        adapter:       a registered adapter key, or None for the bare backbone
        on_token:      called with a `TokenEvent` for every generated token, the last one with its finish
                       reason
        ttft_target_s: this request's TTFT target (None: the settings' `ttft_target_s`)
        arrived_s:     when it arrived on the engine's `clock` (None: now), e.g. earlier when it queued
                       before reaching the engine
        The prompt must leave room for one generated token: at most `max_len - 1` tokens, where
        `max_len` is the context window (`max_model_len` or the backbone's) capped by the KV cache's
        capacity; a longer one raises `PromptTooLong`. `params.max_tokens` is clamped to
        `max_len - len(prompt)`, so a request ends with finish reason "length" at the window's edge.
        """
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NoTokenizer("a text prompt")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        self.check_prompt(prompt_ids)
        if adapter is not None and adapter not in self.adapters:
            raise UnknownAdapter(adapter)
        if params.stop and self.tokenizer is None:
            raise NoTokenizer("stop strings")
        if ttft_target_s is not None and not ttft_target_s > 0:
            raise ValueError(f"ttft_target_s ({ttft_target_s}) must be > 0 or None")
        max_tokens = min(params.max_tokens, self.max_len - len(prompt_ids))
        if max_tokens < params.max_tokens:
            logger.debug("max_tokens %d clamped to %d by the context window", params.max_tokens, max_tokens)
        stop_ids = set(params.stop_token_ids)
        if self.tokenizer is not None and not params.ignore_eos:
            stop_ids |= self.tokenizer.stop_token_ids
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        arrival = next(self._ids)
        request = Request(
            request_id=request_id if request_id is not None else f"req-{arrival}",
            adapter=adapter,
            prompt_ids=prompt_ids,
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=frozenset(stop_ids),
            arrival=arrival,
            arrived_s=self.clock() if arrived_s is None else arrived_s,
            ttft_target_s=ttft_target_s,
            generator=generator,
            callback=on_token,
            detokenizer=self.tokenizer.detokenizer(prompt_ids) if self.tokenizer is not None else None,
        )
        self.batcher.add(request)
        return request.request_id

    def abort(self, request_id: str) -> Completion | None:
        """Cancel a request (waiting or running); None if it is unknown or already finished."""
        return self.batcher.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.batcher.has_work

    # -- the step ----------------------------------------------------------------------------------------

    def step(self) -> list[Completion]:
        """Run one batch; returns the requests that finished in it."""
        plan = self.batcher.plan(self.clock())  # CPU only: which tokens of which requests, KV blocks reserved
        if not plan:
            return []
        self.adapters.ensure_resident(plan.adapters)  # may copy host -> device pages
        try:
            token_ids = self.runner.run(plan)  # device: forward, logits of last tokens, sampling
        finally:
            self.adapters.release()  # the step's adapters may be evicted again
        return self.batcher.commit(plan, token_ids)  # append tokens, stream, stop, free blocks

    def run_until_done(self) -> list[Completion]:
        """Step until no request is waiting or running; completions in the order they finished."""
        done: list[Completion] = []
        while self.has_work:
            finished = self.step()
            if not finished and not self.batcher.running and self.batcher.waiting:
                raise RuntimeError(f"{len(self.batcher.waiting)} requests wait but none can be scheduled")
            done.extend(finished)
        return done

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Submit every prompt (with `adapters[i]`, default none) and run them all in one continuous
        batch; completions in the order of `prompts`."""
        per_params = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        per_adapter = adapters if adapters is not None else [None] * len(prompts)
        if not len(per_params) == len(per_adapter) == len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts, {len(per_params)} sampling params and {len(per_adapter)} adapters"
            )
        ids = [
            self.submit(p, adapter=a, params=sp) for p, a, sp in zip(prompts, per_adapter, per_params, strict=True)
        ]
        by_id = {c.request_id: c for c in self.run_until_done()}
        return [by_id[i] for i in ids]
