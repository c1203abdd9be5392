"""A deterministic discrete-event simulator that drives the scheduler core with a request trace.

`simulate` feeds the very `SchedulerCore` and policy objects that the live dispatcher runs with the events
a cluster of simulated workers would produce, and carries out the commands the core returns:

- each trace row becomes an `InvocationArrived` at its trace time (its adapter's rank drawn once per
  adapter from `ranks` with a seeded `random.Random`, its bytes from the rank and SmolLM2-135M's shapes);
- a worker sends a `WorkerReport` every `heartbeat_s` (its device and host residency, running calls) and
  the driver a `Tick` every `tick_s`; as events, only the heartbeats and ticks that can change what the core
  decides are handled (a heartbeat after the worker's state changed, a tick before the next event), which
  gives the core the same inputs in the same order as handling every one of them (`eager=True` does, for
  the tests) and makes the cost of a run grow with its calls, not with its length times its workers;
- a worker's run of decode steps that admits nothing and finishes nothing is one event (each step of it
  takes the same time);
- `Dispatch`: the worker queues the call and admits it into its continuously batched decode loop (at most
  `max_inflight` running; prefill chunks and decodes share `max_batch_tokens` per step) once its adapter
  is on the device. An adapter not on the device is loaded first: from the host cache, or fetched from the
  object store into the host cache and then loaded. A load makes room in the device pool (a byte budget)
  with the eviction policy (`LruEviction` by default: never an adapter a call still needs) and waits while
  it cannot; the host cache drops its least recently used blobs beyond its byte budget. Loads run beside
  the decode steps (fetches are I/O; the copy into the pool is a few ms);
- `Defer`: the call is offered again at `retry_at` or, when no worker had room, at the first moment after
  `retry_at` at which a worker may have some (a call finished, a worker came up, a tick): between those
  events nothing the core decides on has changed, so polling would only defer it again. The core's
  "defer" count is therefore the number of offers deferred here, fewer than a polling driver would make;
- `Fail`: recorded; `Rescue`: the calls the dead worker held are offered again with the next epoch;
- `InvocationFinished` is reported when a call's last token is generated.

Time is the trace's (seconds from its first row); no wall clock is read, so two runs with the same inputs
and seed give the same `SimReport`. The costs are in `CostModel`, each default with the measurement it
comes from. `python -m bench simulate --trace FILE ...` runs it on a trace file, prints the figures and
writes them to bench/results/simulate_<trace>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import math
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from bench import traces
from bench.traces import TraceRequest
from protocol.messages import Tier
from scheduler.core import (
    Command,
    CoreConfig,
    Defer,
    Dispatch,
    Evict,
    Fail,
    Fetch,
    InvocationArrived,
    InvocationFinished,
    Load,
    Rescue,
    ResidentReport,
    SchedulerCore,
    Tick,
    WorkerReport,
)
from scheduler.policy import (
    AdapterSpec,
    AffinityRouter,
    EvictionPolicy,
    LruEviction,
    PinnedRouter,
    ResidentView,
    Router,
)

# SmolLM2-135M: 30 layers; LoRA A and B on q, k, v, o (hidden 576 -> 576 / kv 192) and gate, up, down (576 <-> 1536)
SMOLLM2_LAYERS = 30
SMOLLM2_PROJECTIONS = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
LORA_ELEMENTS_PER_RANK = SMOLLM2_LAYERS * sum(i + o for i, o in SMOLLM2_PROJECTIONS)  # 305,280
BF16_BYTES = 2
POOL_PAGE_BYTES = 192 * BF16_BYTES  # the pool's page: gcd of the projection widths, in bf16 (workers.adapter_pool)
DEFAULT_RANKS = (8, 16, 32, 64)
MS = 1e-3


def adapter_bytes(rank: int) -> int:
    """Bytes of a rank-`rank` adapter over all seven projections of SmolLM2-135M in bf16 (39 MB at rank 64)."""
    return rank * LORA_ELEMENTS_PER_RANK * BF16_BYTES


@dataclass(frozen=True)
class CostModel:
    """What a worker's work costs, fitted to this project's measurements (SmolLM2-135M fp32, 2 CPU cores).

    A step runs every admitted call: one token per decoding call, and prefill chunks of the calls still
    prefilling within what is left of `max_batch_tokens`. Its time is
    `step_fixed_ms + decode_ms_per_seq * decodes + prefill_ms_per_token * prefill tokens
     + lora_ms_per_token_rank * sum over the step's tokens of their adapter's rank
     + bytes of the distinct adapters in the step / adapter_read_bytes_per_s`.
    A load takes `*_latency_ms + bytes / *_bytes_per_s` per tier crossed (object -> host -> device)."""

    # Reading the fp32 backbone (0.54 GB) once per step at the 27-29 GB/s streaming bandwidth the engine
    # benchmark measures (README, "Engine decode").
    step_fixed_ms: float = 20.0
    # The rest of the measured base decode step, 105 ms at 32 requests (README: 304 tok/s), per request.
    decode_ms_per_seq: float = 2.65
    # Prefill of one 256-1,024-token prompt alone in an engine step on this machine: 1.6-1.7 ms/token
    # (longer prompts cost more per token as attention grows: 2.3 ms/token at 2,048).
    prefill_ms_per_token: float = 1.6
    # README: one rank-64 adapter over 32 decode tokens added 13.2% (14 ms) to the 105 ms step, 2 ms of
    # it the adapter's read; 12 ms / (32 tokens * rank 64).
    lora_ms_per_token_rank: float = 0.0059
    # README: 32 distinct adapters (0.59 GB in bf16, ranks 8-64) added 36 ms a step: ~20 GB/s effective.
    adapter_read_bytes_per_s: float = 20e9
    # EngineSettings.max_batch_tokens default.
    max_batch_tokens: int = 2048
    # The demo's cold load of a rank-64 adapter (39 MB): ~845 ms from the object store, host load included:
    # a GET's round trips (latency assumed) and the rest at the effective bandwidth.
    object_latency_ms: float = 50.0
    object_bytes_per_s: float = 50e6
    # Host cache -> device pool: a copy with a dtype conversion, not measured apart; taken at a tenth of
    # the streaming bandwidth (20 ms at rank 64).
    host_latency_ms: float = 1.0
    host_bytes_per_s: float = 2e9

    def step_s(self, decodes: int, prefill_tokens: int, token_ranks: int, adapter_bytes: int) -> float:
        return MS * (self.step_fixed_ms + self.decode_ms_per_seq * decodes + self.prefill_ms_per_token * prefill_tokens
                     + self.lora_ms_per_token_rank * token_ranks) + adapter_bytes / self.adapter_read_bytes_per_s

    def fetch_s(self, nbytes: int) -> float:
        """Object store -> host cache."""
        return MS * self.object_latency_ms + nbytes / self.object_bytes_per_s

    def load_s(self, nbytes: int) -> float:
        """Host cache -> device pool."""
        return MS * self.host_latency_ms + nbytes / self.host_bytes_per_s


@dataclass(frozen=True)
class WorkerConfig:
    """One simulated worker; the defaults are the live worker's settings."""

    max_inflight: int = 32  # ConsumerSettings.max_inflight: calls running at once
    max_rank: int = 128  # EngineSettings.max_rank (DEFAULT_MAX_RANK)
    device_pool_bytes: int = 1 << 30  # EngineSettings.adapter_pool_bytes
    host_cache_bytes: int = 9 << 30  # HostCacheSettings: 1 GiB of RAM + 8 GiB of disk
    heartbeat_s: float = 1.0  # WorkerSettings.heartbeat_s


@dataclass
class WorkerRecord:
    """What one simulated worker did."""

    dispatched: int = 0
    completed: int = 0
    adapters: dict[str, int] = field(default_factory=dict)  # "tenant/adapter" -> calls dispatched here
    fetches: int = 0  # object store -> host
    loads: int = 0  # host -> device
    evictions: int = 0  # device -> host
    steps: int = 0
    busy_s: float = 0.0  # time spent in steps


@dataclass
class SimReport:
    """Figures of one simulation (the same inputs and seed give an equal report)."""

    requests: int
    completed: int
    failed: dict[str, int]  # error code -> calls
    unfinished: int  # neither completed nor failed when the simulation stopped
    cold_starts: int  # completed calls that waited for a load from the object store
    host_loads: int  # completed calls that waited for a load from the host cache
    device_hits: int  # completed calls whose adapter was on the device (or the bare backbone)
    ttft_s: dict[str, float]  # arrival -> first token, p50/p90/p99/mean
    latency_s: dict[str, float]  # arrival -> last token
    dispatch_wait_s: dict[str, float]  # arrival -> last dispatch
    decisions: dict[str, int]  # the core's counts: dispatch reasons, deferrals, failures, workers up/gone
    per_worker: dict[str, WorkerRecord]
    trace_s: float  # last arrival
    end_s: float  # when the last call finished (or the simulation stopped)
    events: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Kind(IntEnum):
    """Event kinds (events at the same time are handled in the order they were scheduled)."""

    arrive = 0
    offer = 1  # a deferred call's retry_at
    retry_round = 2  # offer the calls deferred for want of a worker
    step_end = 3
    fetched = 4
    loaded = 5
    heartbeat = 6
    tick = 7
    worker_fails = 8


@dataclass(slots=True, eq=False)
class _Call:
    id: str
    spec: AdapterSpec
    prompt_tokens: int
    output_tokens: int
    arrived: float
    epoch: int = 1
    retry_at: float = 0.0
    worker: str | None = None
    tier: Tier = Tier.device  # where its adapter was when it was last dispatched
    dispatched_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float = 0.0
    prefill_left: int = 0
    done: bool = False


class _Worker:
    """A simulated worker: residency per tier, loads in flight, a queue and a continuously batched step."""

    def __init__(self, worker_id: str, config: WorkerConfig, cost: CostModel, eviction: EvictionPolicy,
                 schedule: Callable[[float, _Kind, Any], None], specs: Mapping[str, AdapterSpec]) -> None:
        self.id, self.config, self.cost, self.eviction = worker_id, config, cost, eviction
        self.schedule, self.specs = schedule, specs
        self.alive = True
        self.record = WorkerRecord()
        self.ready: deque[_Call] = deque()  # adapter on the device, waiting for a running slot
        self.prefilling: deque[_Call] = deque()
        self.decoding: list[tuple[int, int, _Call]] = []  # heap of (step it finishes at, seq, call)
        self.step_no = 0
        self.in_step: list[tuple[_Call, int]] | None = None  # prefill chunks of the step in flight
        self.step_started = 0.0
        # Steps that only decode, with no call finishing or waiting to be admitted, all take as long as the
        # first: such a run is one event of `run_steps` steps of `step_s` each (`kick`), cut short at the end
        # of its current step when a call becomes ready to be admitted (`_cut_run`).
        self.run_steps = 1
        self.step_s = 0.0
        self.step_gen = 0  # the step_end event of the step (run) in flight carries this
        self.device: OrderedDict[str, float] = OrderedDict()  # version -> last used (LRU order)
        self.device_used = 0  # bytes resident or reserved by a load in flight
        self.host: OrderedDict[str, int] = OrderedDict()  # version -> bytes (LRU order)
        self.host_used = 0
        self._resident: tuple[ResidentReport, ...] | None = None  # for heartbeats; None when residency changed
        self.refs: Counter[str] = Counter()  # versions -> calls here that need them on the device
        self.loading: dict[str, list[_Call]] = {}  # version -> calls waiting for its load (fetch or load)
        self.blocked: deque[str] = deque()  # versions whose load waits for room in the device pool
        self.batch: Counter[str] = Counter()  # versions of the decoding calls
        self.batch_bytes = 0
        self.batch_ranks = 0
        self._seq = itertools.count()
        # heartbeats (see _Simulation: sent when the worker's state changed, refreshed for liveness otherwise)
        self.hb_first = 0.0  # heartbeat k is at hb_first + k * heartbeat_s
        self.hb_pending = False  # a heartbeat event is scheduled
        self.last_report: WorkerReport | None = None
        self.reported = -1  # the heartbeat the core last got
        self.refresh_due = -math.inf  # when the core should be given a heartbeat again if nothing changes

    def heartbeat_at(self, k: int) -> float:
        return self.hb_first + k * self.config.heartbeat_s

    def heartbeat_before(self, t: float) -> int:
        """The last heartbeat at or before `t`."""
        k = math.floor((t - self.hb_first) / self.config.heartbeat_s)
        return k - 1 if self.heartbeat_at(k) > t else k

    @property
    def idle(self) -> bool:
        """No call here and no step or load in flight."""
        return not (self.in_step is not None or self.ready or self.prefilling or self.decoding or self.loading
                    or self.blocked)

    # -- calls ----------------------------------------------------------------------------------------------

    def accept(self, call: _Call, now: float) -> None:
        """A dispatched call: queue it, after a load of its adapter when it is not on the device."""
        v = call.spec.version
        self.refs[v] += 1
        if v in self.device:
            call.tier = Tier.device
            self.device.move_to_end(v)
            self.ready.append(call)
            self._cut_run(now)
            self.kick(now)
        elif v in self.loading:
            call.tier = Tier.host if v in self.host else Tier.object
            self.loading[v].append(call)
        else:
            call.tier = Tier.host if v in self.host else Tier.object
            self.loading[v] = [call]
            self._bring(v, now)

    def _bring(self, version: str, now: float) -> None:
        """Start bringing `version` to the device: fetch it to the host first if it is not there."""
        if version in self.host:
            self.host.move_to_end(version)
            self._load(version, now)
        else:
            self.record.fetches += 1
            self.schedule(now + self.cost.fetch_s(self.specs[version].bytes), _Kind.fetched, (self.id, version))

    def fetched(self, version: str, now: float) -> None:
        self._cache_on_host(version)
        if version in self.loading:  # not when the core only asked for a fetch to the host
            self._load(version, now)

    def _cache_on_host(self, version: str) -> None:
        if version not in self.host:
            nbytes = self.specs[version].bytes
            self.host[version] = nbytes
            self.host_used += nbytes
            self._resident = None
            while self.host_used > self.config.host_cache_bytes and len(self.host) > 1:
                _, dropped = self.host.popitem(last=False)
                self.host_used -= dropped
        self.host.move_to_end(version)

    def _load(self, version: str, now: float) -> None:
        """Host -> device, once the eviction policy has made room; queued behind other blocked loads."""
        if self.blocked or not self._make_room(version):
            self.blocked.append(version)
            return
        self.record.loads += 1
        self.schedule(now + self.cost.load_s(self.specs[version].bytes), _Kind.loaded, (self.id, version))

    def _make_room(self, version: str) -> bool:
        nbytes = self.specs[version].bytes
        needed, free = -(-nbytes // POOL_PAGE_BYTES), (self.config.device_pool_bytes - self.device_used) // POOL_PAGE_BYTES
        resident = [ResidentView(v, self.specs[v].bytes // POOL_PAGE_BYTES, last_used, self.refs.get(v, 0))
                    for v, last_used in self.device.items()] if free < needed else []
        victims = self.eviction.choose_victims(needed, free, resident)
        if victims is None:
            return False
        for v in victims:
            del self.device[v]
            self.device_used -= self.specs[v].bytes
            self._resident = None
            self.record.evictions += 1
            self._cache_on_host(v)
        self.device_used += nbytes
        return True

    def loaded(self, version: str, now: float) -> None:
        self.device[version] = now
        self._resident = None
        for call in self.loading.pop(version, []):
            self.ready.append(call)
        if self.ready:
            self._cut_run(now)
        self.kick(now)

    def evict(self, version: str) -> None:
        """The core's Evict: drop an adapter from the device when no call here needs it."""
        if version in self.device and not self.refs.get(version):
            del self.device[version]
            self.device_used -= self.specs[version].bytes
            self._resident = None
            self.record.evictions += 1
            self._cache_on_host(version)

    def release(self, version: str, now: float) -> None:
        """A call of `version` left this worker: unpin it, and retry the loads that waited for room."""
        self.refs[version] -= 1
        if self.refs[version] <= 0:
            del self.refs[version]
        if version in self.device:
            self.device[version] = now
            self.device.move_to_end(version)
        while self.blocked and self._make_room(self.blocked[0]):
            v = self.blocked.popleft()
            self.record.loads += 1
            self.schedule(now + self.cost.load_s(self.specs[v].bytes), _Kind.loaded, (self.id, v))

    # -- steps ----------------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def kick(self, now: float) -> None:
        """Start a step if none is in flight and there is work: admit ready calls, then plan the step."""
        if self.in_step is not None or not self.alive:
            return
        while self.ready and self.running < self.config.max_inflight:
            call = self.ready.popleft()
            call.prefill_left = call.prompt_tokens
            self.prefilling.append(call)
        if not self.running:
            return
        decodes = len(self.decoding)
        budget = self.cost.max_batch_tokens - decodes
        chunks: list[tuple[_Call, int]] = []
        prefill = ranks = extra_bytes = 0
        fresh: set[str] = set()
        for call in self.prefilling:
            if budget <= 0:
                break
            n = min(call.prefill_left, budget)
            chunks.append((call, n))
            budget -= n
            prefill += n
            ranks += n * call.spec.rank
            v = call.spec.version
            if v not in self.batch and v not in fresh:
                fresh.add(v)
                extra_bytes += call.spec.bytes
        self.in_step, self.step_started = chunks, now
        duration = self.cost.step_s(decodes, prefill, self.batch_ranks + ranks, self.batch_bytes + extra_bytes)
        # a run of decode steps up to the one in which the next call finishes (module docstring)
        # (calls still ready here wait for a running slot, which only a finish frees)
        self.run_steps = self.decoding[0][0] - self.step_no if not chunks and duration > 0 else 1
        self.step_s = duration
        self.step_gen += 1
        self.schedule(now + duration * self.run_steps, _Kind.step_end, (self.id, self.step_gen))

    def _cut_run(self, now: float) -> None:
        """A call became ready during a run of decode steps: end the run with the step in progress."""
        if self.in_step is None or self.run_steps == 1 or self.running >= self.config.max_inflight:
            return
        done = min(int((now - self.step_started) / self.step_s) + 1, self.run_steps)
        if done < self.run_steps:
            self.run_steps = done
            self.step_gen += 1
            self.schedule(self.step_started + self.step_s * done, _Kind.step_end, (self.id, self.step_gen))

    def step_end(self, now: float) -> list[_Call]:
        """Finish the step in flight: first tokens of completed prefills, the last tokens of finished calls."""
        assert self.in_step is not None
        self.step_no += self.run_steps
        self.record.steps += self.run_steps
        self.record.busy_s += now - self.step_started
        finished: list[_Call] = []
        for call, n in self.in_step:
            call.prefill_left -= n
            if call.prefill_left:
                continue
            # chunks are taken from the front of the queue, so the completed prefills are at its front
            assert self.prefilling[0] is call
            self.prefilling.popleft()
            call.first_token_at = now
            if call.output_tokens <= 1:
                finished.append(call)
                continue
            heapq.heappush(self.decoding, (self.step_no + call.output_tokens - 1, next(self._seq), call))
            v = call.spec.version
            if not self.batch[v]:
                self.batch_bytes += call.spec.bytes
            self.batch[v] += 1
            self.batch_ranks += call.spec.rank
        while self.decoding and self.decoding[0][0] <= self.step_no:
            _, _, call = heapq.heappop(self.decoding)
            v = call.spec.version
            self.batch[v] -= 1
            if not self.batch[v]:
                del self.batch[v]
                self.batch_bytes -= call.spec.bytes
            self.batch_ranks -= call.spec.rank
            finished.append(call)
        self.in_step = None
        return finished

    # -- failure --------------------------------------------------------------------------------------------

    def fail(self, now: float) -> None:
        """The worker dies: it stops stepping and heartbeating; its calls wait for the core's Rescue. The steps
        of a run of decode steps that ended before it died count as done (each was an event of its own)."""
        if self.in_step is not None and self.run_steps > 1:
            done = min(int((now - self.step_started) / self.step_s), self.run_steps - 1)
            self.step_no += done
            self.record.steps += done
            self.record.busy_s += done * self.step_s
        self.alive = False
        self.in_step = None

    def take_calls(self) -> list[_Call]:
        """Every call this (dead) worker held, in the order it got them."""
        calls = [c for waiting in self.loading.values() for c in waiting]
        calls += [*self.ready, *self.prefilling, *(c for _, _, c in sorted(self.decoding, key=lambda x: x[1]))]
        for held in (self.ready, self.prefilling, self.decoding, self.loading, self.refs, self.blocked):
            held.clear()
        return [c for c in calls if not c.done]

    def heartbeat(self, now: float) -> WorkerReport:
        """A heartbeat. Residency without `in_use` (the core does not read it), so that the list is rebuilt
        only when residency changes: heartbeats are most of a long simulation's events."""
        if self._resident is None:
            specs = self.specs
            self._resident = tuple(
                [ResidentReport(v, Tier.device, specs[v].rank, specs[v].bytes, specs[v].bytes // POOL_PAGE_BYTES)
                 for v in self.device]
                + [ResidentReport(v, Tier.host, specs[v].rank, n) for v, n in self.host.items() if v not in self.device])
        pool = self.config.device_pool_bytes
        return WorkerReport(
            at=now, worker_id=self.id, total_pages=pool // POOL_PAGE_BYTES,
            free_pages=(pool - self.device_used) // POOL_PAGE_BYTES, max_rank=self.config.max_rank,
            max_inflight=self.config.max_inflight, running=self.running,
            queue_depth=len(self.ready) + sum(len(c) for c in self.loading.values()),
            resident=self._resident,
        )


# -- the simulator ------------------------------------------------------------------------------------------------


def adapter_specs(trace: Sequence[TraceRequest], *, ranks: Sequence[int] = DEFAULT_RANKS, seed: int = 0,
                  fixed: Mapping[str, int] | None = None) -> dict[str, tuple[str, int, int]]:
    """adapter name -> (version, rank, bytes). Ranks drawn with a `random.Random(seed)` over the names in
    sorted order (so a name's rank does not depend on the trace's order); `fixed` overrides."""
    rng = random.Random(seed)
    out = {}
    for name in sorted({r.adapter for r in trace}):
        rank = rng.choice(list(ranks))
        if fixed and name in fixed:
            rank = fixed[name]
        version = hashlib.sha256(f"sim/{name}/{rank}".encode()).hexdigest()
        out[name] = (version, rank, adapter_bytes(rank))
    return out


def simulate(
    trace: Sequence[TraceRequest],
    *,
    workers: int | Sequence[WorkerConfig] = 3,
    router: Router | None = None,
    cost: CostModel | None = None,
    seed: int = 0,
    core_config: CoreConfig | None = None,
    eviction: Callable[[], EvictionPolicy] = LruEviction,
    ranks: Sequence[int] = DEFAULT_RANKS,
    adapter_ranks: Mapping[str, int] | None = None,
    duration_s: float | None = None,
    tick_s: float = 1.0,
    failures: Sequence[tuple[float, str]] = (),
    max_drain_s: float = 86_400.0,
    eager: bool = False,
) -> SimReport:
    """Run `trace` (rows sorted by time) through a `SchedulerCore` with `router` over simulated workers
    w0, w1, ... (module docstring). `duration_s`: only rows that arrive before it; `failures`: (time,
    worker id) at which a worker dies; the run stops `max_drain_s` after the last arrival at the latest.
    `eager`: every heartbeat and every tick an event (slow; the same report: the tests compare the two)."""
    return _Simulation(trace, workers=workers, router=router, cost=cost or CostModel(), seed=seed,
                       core_config=core_config, eviction=eviction, ranks=ranks, adapter_ranks=adapter_ranks,
                       duration_s=duration_s, tick_s=tick_s, failures=failures, max_drain_s=max_drain_s,
                       eager=eager).run()


class _Simulation:
    def __init__(self, trace: Sequence[TraceRequest], *, workers: int | Sequence[WorkerConfig], router: Router | None,
                 cost: CostModel, seed: int, core_config: CoreConfig | None, eviction: Callable[[], EvictionPolicy],
                 ranks: Sequence[int], adapter_ranks: Mapping[str, int] | None, duration_s: float | None,
                 tick_s: float, failures: Sequence[tuple[float, str]], max_drain_s: float, eager: bool) -> None:
        if tick_s <= 0:
            raise ValueError(f"tick_s must be > 0 (got {tick_s})")
        configs = [WorkerConfig()] * workers if isinstance(workers, int) else list(workers)
        if not configs:
            raise ValueError("a simulation needs at least one worker")
        rows = [r for r in trace if duration_s is None or r.at_s < duration_s]
        self.rng = random.Random(seed)
        self.core = SchedulerCore(router=router or AffinityRouter(), config=core_config)
        self.cost, self.tick_s, self.max_drain_s, self.eager = cost, tick_s, max_drain_s, eager
        self.heap: list[tuple[float, int, _Kind, Any]] = []
        self.seq = itertools.count()
        self.now = -max(c.heartbeat_s for c in configs)  # workers come up (and report) before the first arrival
        self.events = 0

        by_name = adapter_specs(rows, ranks=ranks, seed=seed, fixed=adapter_ranks)
        for _, rank, nbytes in by_name.values():
            fits = [c for c in configs if rank <= c.max_rank]
            if fits and all(nbytes > c.device_pool_bytes for c in fits):
                raise ValueError(f"a rank-{rank} adapter ({nbytes} bytes) fits in no worker's device pool "
                                 f"(largest {max(c.device_pool_bytes for c in fits)} bytes)")
        self.specs: dict[str, AdapterSpec] = {}  # version -> spec (bytes and rank for the workers)
        spec_of: dict[tuple[str, str], AdapterSpec] = {}
        self.calls: list[_Call] = []
        for i, r in enumerate(rows):
            spec = spec_of.get((r.tenant, r.adapter))
            if spec is None:
                version, rank, nbytes = by_name[r.adapter]
                spec = spec_of[(r.tenant, r.adapter)] = AdapterSpec(r.tenant, r.adapter, version, rank, nbytes)
                self.specs.setdefault(version, spec)
            call = _Call(f"i{i:07d}", spec, r.prompt_tokens, r.output_tokens, r.at_s)
            self.calls.append(call)
            self._schedule(r.at_s, _Kind.arrive, call)
        self.by_id = {c.id: c for c in self.calls}
        self.trace_s = rows[-1].at_s if rows else 0.0

        self.workers: dict[str, _Worker] = {}
        for i, config in enumerate(configs):
            w = _Worker(f"w{i}", config, cost, eviction(), self._schedule, self.specs)
            self.workers[w.id] = w
            # workers come up before the first arrival, their heartbeats out of phase
            w.hb_first = -config.heartbeat_s * (1.0 - self.rng.random())
            w.hb_pending = True
            self._schedule(w.hb_first, _Kind.heartbeat, (w.id, 0))
        for at, worker_id in failures:
            if worker_id not in self.workers:
                raise ValueError(f"failure of unknown worker {worker_id!r} (workers: {', '.join(self.workers)})")
            self._schedule(at, _Kind.worker_fails, worker_id)
        self.tick_no = 0  # the next tick not given to the core is at tick_no * tick_s ...
        self.next_tick_at = 0.0  # ... this
        self.tick_event: tuple[int, float] = (0, math.inf)  # (generation, time) of the tick event scheduled
        self.dying: set[str] = set()  # workers that died and that the core has not declared gone yet
        staging = getattr(self.core, "predictor", None) is not None
        self.interval_s: float | None = self.core.config.staging_interval_s if staging else None
        self.known: set[str] = set()  # workers the core has heard from (and not declared gone)
        # a worker whose state did not change is heard from at least every this many heartbeats (see _refresh)
        timeout = self.core.config.heartbeat_timeout_s
        self.refresh_every = {w.id: max(1, math.floor(timeout / w.config.heartbeat_s) - 1)
                              for w in self.workers.values()}

        self.deferred: deque[_Call] = deque()  # deferred for want of a worker, in order
        self.round_at: float | None = None  # a retry_round event is scheduled for then
        self.open = len(self.calls)  # calls neither completed nor failed
        self.failed: Counter[str] = Counter()
        self.end_s = 0.0

    def _schedule(self, at: float, kind: _Kind, payload: Any) -> None:
        heapq.heappush(self.heap, (at, next(self.seq), kind, payload))

    def run(self) -> SimReport:
        stop_at = self.trace_s + self.max_drain_s
        self._plan_tick()
        while self.heap and self.open:
            at, _, kind, payload = heapq.heappop(self.heap)
            if at > stop_at:
                break
            if at > self.next_tick_at:
                self._catch_up(at)
            self.now = max(self.now, at)
            self.events += 1
            self._handle(kind, payload)
        return self._report()

    def _handle(self, kind: _Kind, payload: Any) -> None:
        now = self.now
        if kind == _Kind.arrive or kind == _Kind.offer:
            self._offer(payload)
        elif kind == _Kind.step_end:
            w = self.workers[payload[0]]
            if w.alive and w.in_step is not None and payload[1] == w.step_gen:
                self._touch(w)
                for call in w.step_end(now):
                    self._finish(w, call)
                w.kick(now)
                self._retry()
        elif kind == _Kind.fetched:
            worker_id, version = payload
            w = self.workers[worker_id]
            if w.alive:
                self._touch(w)
                w.fetched(version, now)
        elif kind == _Kind.loaded:
            worker_id, version = payload
            w = self.workers[worker_id]
            if w.alive:
                self._touch(w)
                w.loaded(version, now)
        elif kind == _Kind.heartbeat:
            w = self.workers[payload[0]]
            w.hb_pending = False
            if w.alive:
                self._deliver(w, payload[1], w.heartbeat(now))
                if self.eager:
                    self._touch(w)
        elif kind == _Kind.tick:
            generation, k = payload
            if generation == self.tick_event[0]:
                self.tick_event = (generation, math.inf)
                self._tick(k)
                self._plan_tick()
        elif kind == _Kind.retry_round:
            self.round_at = None
            self._retry()
        elif kind == _Kind.worker_fails:
            w = self.workers[payload]
            if w.alive:
                self._refresh(w, now, 1)  # its last heartbeat before it died
                w.fail(now)
                if w.id in self.known:
                    self.dying.add(w.id)
                    self._plan_tick()

    # -- heartbeats and ticks ----------------------------------------------------------------------------------
    #
    # A worker's heartbeat says what it holds and runs; between two changes of its state every heartbeat says
    # the same, and the core's state after the second is what it was after the first but for when it last
    # heard from the worker, which only its liveness check (on a Tick) reads. So a heartbeat is an event only
    # at the first heartbeat time after the worker's state changed (`_touch`); before each Tick, a worker not
    # heard from for `heartbeat_timeout_s - heartbeat_s` gets its latest heartbeat as of then, with what it
    # said last (`_refresh`), so no live worker is ever declared gone and a dead one is declared gone when
    # heartbeats every `heartbeat_s` would have it.
    #
    # A Tick declares silent workers gone, lets the core forget placements and calls that are past their time
    # (removals that a later tick makes as well as all the ticks before it, as long as no call was routed in
    # between), retries deferred calls, and closes staging intervals. So the ticks are given to the core every
    # `tick_s` only while a worker is dying or calls are deferred; otherwise the last tick due is given before
    # each routing decision (`_catch_up`) and the first one of each staging interval when it is due
    # (`_plan_tick`). Days of a sparse trace then cost events per call and per interval, not per second.

    def _touch(self, w: _Worker) -> None:
        """`w`'s state is about to change: it reports at its next heartbeat time."""
        if not w.hb_pending and w.alive:  # (a heartbeat is always pending when eager)
            w.hb_pending = True
            k = w.heartbeat_before(self.now) + 1
            self._schedule(w.heartbeat_at(k), _Kind.heartbeat, (w.id, k))

    def _deliver(self, w: _Worker, k: int, report: WorkerReport) -> None:
        """Give the core heartbeat k of `w`."""
        w.last_report, w.reported = report, k
        # half a heartbeat early: _refresh decides on the heartbeat's number, not on float times
        w.refresh_due = w.heartbeat_at(k + self.refresh_every[w.id]) - w.config.heartbeat_s / 2
        first = w.id not in self.known
        self.known.add(w.id)
        self._apply(self.core.handle(report))
        if first:
            self._retry()

    def _refresh(self, w: _Worker, at: float, every: int) -> None:
        """Give the core `w`'s last heartbeat at or before `at` if the core's latest is at least `every`
        heartbeats older (saying what the worker said last: any change since has a heartbeat event after `at`)."""
        k = w.heartbeat_before(at)
        if w.last_report is not None and k - w.reported >= every:
            self._deliver(w, k, WorkerReport(**{**w.last_report.__dict__, "at": w.heartbeat_at(k)}))  # replace()

    def _catch_up(self, at: float) -> None:
        """Before an event at `at`: the last tick before it, if the core has not had it."""
        k = math.ceil(at / self.tick_s) - 1
        if k >= self.tick_no:
            self._tick(k)
            self._plan_tick()

    def _tick(self, k: int) -> None:
        """Give the core tick k (standing for the ticks since the last one given: see above)."""
        at = k * self.tick_s
        self.now = max(self.now, at)
        self.tick_no, self.next_tick_at = k + 1, (k + 1) * self.tick_s
        for w in self.workers.values():
            if w.alive and at >= w.refresh_due:
                self._refresh(w, at, self.refresh_every[w.id])
        self._apply(self.core.handle(Tick(at)))
        self._retry()

    def _plan_tick(self) -> None:
        """Schedule the next tick the core must get when it is due: the next one while a worker is dying or a
        call is deferred, else the first one of the next staging interval."""
        if self.eager or self.dying or self.deferred:
            k = max(self.tick_no, math.ceil(self.now / self.tick_s))
        elif self.interval_s is not None:
            covered = (self.tick_no - 1) * self.tick_s  # the last tick given
            boundary = (math.floor(covered / self.interval_s) + 1) * self.interval_s
            k = max(self.tick_no, math.ceil(boundary / self.tick_s))
        else:
            return
        at = k * self.tick_s
        if at < self.tick_event[1]:
            self.tick_event = (self.tick_event[0] + 1, at)
            self._schedule(at, _Kind.tick, (self.tick_event[0], k))

    def _offer(self, call: _Call) -> None:
        event = InvocationArrived(
            at=self.now, invocation_id=call.id, adapter=call.spec, published_at=call.arrived,
            prompt_tokens=call.prompt_tokens, max_tokens=call.output_tokens, epoch=call.epoch,
        )
        self._apply(self.core.handle(event))

    def _apply(self, commands: list[Command]) -> None:
        now = self.now
        for c in commands:
            match c:
                case Dispatch():
                    call = self.by_id[c.invocation_id]
                    w = self.workers[c.worker_id]
                    self._touch(w)
                    call.worker, call.dispatched_at = c.worker_id, now
                    w.record.dispatched += 1
                    name = f"{call.spec.tenant}/{call.spec.adapter}"
                    w.record.adapters[name] = w.record.adapters.get(name, 0) + 1
                    w.accept(call, now)  # a dead worker holds it until the core rescues it
                case Defer():
                    call = self.by_id[c.invocation_id]
                    call.retry_at = c.retry_at
                    if c.reason in ("all_busy", "no_workers"):
                        self.deferred.append(call)
                        self._wake(c.retry_at)
                        self._plan_tick()
                    else:
                        self._schedule(c.retry_at, _Kind.offer, call)
                case Fail():
                    call = self.by_id[c.invocation_id]
                    if not call.done:
                        call.done = True
                        self.open -= 1
                        self.failed[str(c.code)] += 1
                case Rescue():
                    self.known.discard(c.worker_id)
                    self.dying.discard(c.worker_id)
                    for call in self.workers[c.worker_id].take_calls():
                        call.epoch += 1
                        call.first_token_at = None
                        self._offer(call)
                case Fetch():
                    w = self.workers[c.worker_id]
                    self._touch(w)
                    if c.version not in w.host and c.version not in w.loading:
                        w.record.fetches += 1
                        self._schedule(now + self.cost.fetch_s(self.specs[c.version].bytes), _Kind.fetched,
                                       (w.id, c.version))
                case Load():
                    w = self.workers[c.worker_id]
                    self._touch(w)
                    if c.version not in w.device and c.version not in w.loading:
                        w.loading[c.version] = []
                        w._bring(c.version, now)
                case Evict():
                    self._touch(self.workers[c.worker_id])
                    self.workers[c.worker_id].evict(c.version)

    def _wake(self, at: float) -> None:
        """Have a retry round at `at` (or earlier, if one is already due)."""
        if self.round_at is None or at < self.round_at:
            self.round_at = at
            self._schedule(at, _Kind.retry_round, None)

    def _retry(self) -> None:
        """Offer the calls deferred for want of a worker, in order, while some worker has room."""
        if not self.deferred:
            return
        now = self.now
        kept: list[_Call] = []
        while self.deferred:
            call = self.deferred[0]
            if call.retry_at > now:
                self._wake(call.retry_at)
                break
            if all(v.full or v.draining for v in self.core.views()):
                break
            self.deferred.popleft()
            before = len(self.deferred)
            self._offer(call)
            if len(self.deferred) > before:  # deferred again: it keeps its place ahead of later calls
                kept.append(self.deferred.pop())
        self.deferred.extendleft(reversed(kept))

    def _finish(self, w: _Worker, call: _Call) -> None:
        call.done, call.finished_at = True, self.now
        self.open -= 1
        self.end_s = self.now
        w.record.completed += 1
        w.release(call.spec.version, self.now)
        self._apply(self.core.handle(InvocationFinished(self.now, call.id, w.id)))

    def _report(self) -> SimReport:
        done = [c for c in self.calls if c.done and c.first_token_at is not None]
        tiers = Counter(c.tier for c in done)
        return SimReport(
            requests=len(self.calls),
            completed=len(done),
            failed=dict(sorted(self.failed.items())),
            unfinished=self.open,
            cold_starts=tiers[Tier.object],
            host_loads=tiers[Tier.host],
            device_hits=tiers[Tier.device],
            ttft_s=percentiles([c.first_token_at - c.arrived for c in done if c.first_token_at is not None]),
            latency_s=percentiles([c.finished_at - c.arrived for c in done]),
            dispatch_wait_s=percentiles([c.dispatched_at - c.arrived for c in done]),
            decisions=dict(sorted(self.core.decisions.items())),
            per_worker={w.id: w.record for w in self.workers.values()},
            trace_s=self.trace_s,
            end_s=self.end_s,
            events=self.events,
        )


def percentiles(xs: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles and the mean (zeros for no values)."""
    s = sorted(xs)
    out = {f"p{p}": s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else 0.0 for p in ps}
    out["mean"] = sum(s) / len(s) if s else 0.0
    return out


# -- command line -------------------------------------------------------------------------------------------------

ROUTERS: dict[str, Callable[[], Router]] = {
    "affinity": AffinityRouter,
    # the affinity router told to replicate at once and never prefer a cached blob: the least loaded worker
    # for every call, whatever it holds (the baseline that ignores residency)
    "least_loaded": lambda: AffinityRouter(replicate_at=0, replicate_margin=0, prefer_host_cached=False),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, required=True, help="trace file (Azure LLM or Alibaba GenAI CSV)")
    parser.add_argument("--format", choices=traces.FORMATS, help="trace format (default: from the header)")
    parser.add_argument("--workers", type=int, default=3, help="simulated workers (default 3)")
    parser.add_argument("--adapters", type=int, default=100, help="adapters of the Zipf popularity (Azure; default 100)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (Azure; default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of adapter assignment, ranks and heartbeat phases")
    parser.add_argument("--duration-s", type=float, help="simulate only the requests of the first D trace seconds")
    parser.add_argument("--limit", type=int, help="read only the first N rows of the trace file")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply trace time by this (2: the same requests at half the rate; default 1)")
    parser.add_argument("--router", choices=sorted(ROUTERS), default="affinity", help="routing policy (default affinity)")
    parser.add_argument("--pin", action="append", default=[], metavar="TENANT/ADAPTER=WORKER",
                        help="send every call of an adapter to one worker (PinnedRouter over --router); repeatable")
    parser.add_argument("--ranks", type=lambda s: tuple(int(x) for x in s.split(",")), default=DEFAULT_RANKS,
                        help="adapter ranks to draw from, comma-separated (default 8,16,32,64)")
    parser.add_argument("--max-output-tokens", type=int, default=traces.MAX_OUTPUT_TOKENS,
                        help=f"cap on a request's output tokens (default {traces.MAX_OUTPUT_TOKENS})")
    parser.add_argument("--output-tokens", type=int, default=128, help="output tokens of an Alibaba request (default 128)")
    parser.add_argument("--results-dir", type=Path, help="where the JSON goes (default bench/results)")


def load_trace(args: argparse.Namespace) -> list[TraceRequest]:
    fmt = args.format or traces.detect_format(args.trace)
    rows: list[TraceRequest]
    if fmt == "azure":
        rows = traces.load_azure(args.trace, adapters=args.adapters, zipf_s=args.zipf, seed=args.seed,
                                 max_output_tokens=args.max_output_tokens, limit=args.limit)
    else:
        rows = traces.load_alibaba(args.trace, output_tokens=args.output_tokens, seed=args.seed,
                                   max_output_tokens=args.max_output_tokens, limit=args.limit)
    if args.time_scale != 1.0:
        if args.time_scale <= 0:
            raise SystemExit(f"--time-scale must be > 0 (got {args.time_scale})")
        rows = [TraceRequest(r.at_s * args.time_scale, r.tenant, r.adapter, r.prompt_tokens, r.output_tokens)
                for r in rows]
    return rows


def build_router(name: str, pins: Sequence[str]) -> Router:
    router = ROUTERS[name]()
    if not pins:
        return router
    parsed = dict(p.rsplit("=", 1) for p in pins if "=" in p)
    if len(parsed) != len(pins):
        raise SystemExit(f"--pin takes TENANT/ADAPTER=WORKER (got {list(pins)})")
    return PinnedRouter(pins=parsed, fallback=router)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m bench simulate ...`: simulate a trace, print the figures, write the JSON."""
    from bench.report import RESULTS_DIR, print_table, write  # imports torch: only for the command line

    parser = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trace = load_trace(args)
    loaded = time.perf_counter()
    report = simulate(trace, workers=args.workers, router=build_router(args.router, args.pin), seed=args.seed,
                      ranks=args.ranks, duration_s=args.duration_s)
    finished = time.perf_counter()

    def pct(d: dict[str, float]) -> str:
        return " / ".join(f"{d[k]:.2f}" for k in ("p50", "p90", "p99"))

    rows: list[list[Any]] = [
        ["requests", report.requests], ["completed", report.completed],
        ["failed", sum(report.failed.values())], ["unfinished", report.unfinished],
        ["cold starts (waited for the object store)", report.cold_starts],
        ["host loads (waited for host -> device)", report.host_loads], ["device hits", report.device_hits],
        ["TTFT s p50 / p90 / p99", pct(report.ttft_s)], ["latency s p50 / p90 / p99", pct(report.latency_s)],
        ["dispatch wait s p50 / p90 / p99", pct(report.dispatch_wait_s)],
        ["trace s / last finish s", f"{report.trace_s:.0f} / {report.end_s:.0f}"],
        ["events", report.events], ["wall s (load trace + simulate)", f"{loaded - started:.2f} + {finished - loaded:.2f}"],
    ]
    rows += [[f"decision: {k}", v] for k, v in report.decisions.items()]
    print_table(f"simulated {args.trace.name}: {args.workers} workers, router {args.router}, seed {args.seed}",
                ["figure", "value"], rows)
    print_table("per worker", ["worker", "dispatched", "completed", "adapters", "fetches", "loads", "evictions",
                               "busy"],
                [[k, r.dispatched, r.completed, len(r.adapters), r.fetches, r.loads, r.evictions,
                  f"{r.busy_s / max(report.end_s, 1e-9):.0%}"] for k, r in report.per_worker.items()])
    payload = {
        "trace": args.trace.name, "format": args.format or traces.detect_format(args.trace),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cost": asdict(CostModel()), "worker": asdict(WorkerConfig()), "core": asdict(CoreConfig()),
        "wall_s": {"load": loaded - started, "simulate": finished - loaded},
        **report.to_dict(),
    }
    write(f"simulate_{args.trace.stem}", payload, results_dir=args.results_dir or RESULTS_DIR)
    return payload
