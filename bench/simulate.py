"""A deterministic discrete-event simulator that drives the scheduler core with a request trace.

`simulate` feeds the very `SchedulerCore` and policy objects that the live dispatcher runs with the events
a cluster of simulated workers would produce, and carries out the commands the core returns:

- each trace row becomes an `InvocationArrived` at its trace time (one adapter version per adapter key,
  `tenant/adapter` or the bare name; its rank drawn once per adapter from `ranks` with a seeded
  `random.Random`, its bytes from the rank and SmolLM2-135M's shapes in bf16);
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
  it cannot; the host cache drops blobs beyond its byte budget, by its own eviction policy (`host_eviction`:
  GreedyDual over the host tier) or least recently used first, never the blob of a version on the device or
  on its way there. Loads run beside the decode steps;
- `Defer`: the call is offered again at `retry_at` or, when no worker had room, at the first moment after
  `retry_at` at which a worker may have some (a call finished, a worker came up, a tick): between those
  events nothing the core decides on has changed, so polling would only defer it again. The core's
  "defer" count is therefore the number of offers deferred here, fewer than a polling driver would make;
- `Fail`: recorded; `Rescue`: the calls the dead worker held are offered again with the next epoch;
- `InvocationFinished` is reported when a call's last token is generated;
- pre-staging (a `predictor` and a `stager` given to the core, which runs them at each staging interval):
  `Fetch` brings a blob to the host cache, `Load` a version to the device (fetching it first), ahead of
  its calls; a staged load that finds no room without evicting a version in use is given up (calls never
  wait behind it). `Evict` takes a version off the device (to the host cache) or off the worker; a version
  that calls here still need leaves when the last of them ends, unless another call wants it meanwhile.
  Each worker's heartbeat carries its budgets (device pool and host cache bytes) and what each device
  version is used by, from which the core builds the stager's views.

The report (`SimReport`) counts the calls that arrive from `score_from_s` on (the earlier ones warm the
caches and the predictor): cold starts, host loads and device hits by where the adapter was at dispatch,
TTFT, latency, load wait; the device memory-time (bytes held on each worker's device, resident or being
loaded, times seconds, from `score_from_s` to the last arrival); per-call records, the core's interval
records (predictor, precision, recall, staged counts) and a fallback predictor's switches.

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
import json
import math
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
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
    Predict,
    Rescue,
    ResidentReport,
    SchedulerCore,
    Tick,
    WorkerReport,
    predict,
)
from scheduler.policy import (
    AdapterSpec,
    AffinityRouter,
    EvictionPolicy,
    LruEviction,
    PinnedRouter,
    RandomRouter,
    ResidentView,
    Router,
)
from scheduler.predict import PREDICTORS, Predictor
from scheduler.settings import StagingSettings
from scheduler.staging import GreedyDualEviction, PredictiveStager, Stager, TierCosts, staging_policies
from workers.host_cache import host_eviction

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
    A load takes `*_latency_ms + bytes / *_bytes_per_s` per tier crossed (object -> host -> device).

    `CostModel.load(path)` reads a calibration from a JSON object of these fields (any subset: the others keep
    their defaults), or from a file with such an object under "cost" (the simulator's own results files);
    `python -m bench simulate --cost FILE` runs with it. Where each default comes from is said beside it."""

    # Reading the fp32 backbone (0.54 GB) once per step at the 27-29 GB/s streaming bandwidth the engine
    # benchmark measures (README, "Engine decode": 0.54 GB / 27 GB/s = 20 ms).
    step_fixed_ms: float = 20.0
    # The rest of the measured base decode step per request: README, "Engine decode", base: 304 tok/s at 32
    # requests = 105 ms a step; (105 - 20) / 32.
    decode_ms_per_seq: float = 2.65
    # Prefill of one 256-1,024-token prompt alone in an engine step, 1.6-1.7 ms/token (2.3 ms/token at 2,048
    # as attention grows), measured on this machine when the simulator was written; not in the README's
    # tables (the engine benchmark times decode steps only).
    prefill_ms_per_token: float = 1.6
    # README, "Engine decode": one rank-64 adapter over 32 decode tokens added 13.2% (14 ms) to the 105 ms
    # step, 1.4% (1.5 ms) of it the adapter's read; 12 ms / (32 tokens x rank 64). The model then gives +13%
    # for 1 adapter, +12% for 8 and +34% for 32 (measured +13.2%, +16.4%, +34.3%).
    lora_ms_per_token_rank: float = 0.0059
    # README, "Engine decode": 32 distinct adapters (0.64 GB in bf16, ranks 8-64) added 36 ms a step, 6 ms
    # of it the LoRA compute above: 0.64 GB / 30 ms = 21 GB/s effective.
    adapter_read_bytes_per_s: float = 21e9
    # EngineSettings.max_batch_tokens default.
    max_batch_tokens: int = 2048
    # Object store -> host cache: a cold load of a rank-64 adapter (39 MB in bf16) took ~845 ms in the demo
    # (local S3, the host -> device load included; no benchmark of this project measures the GET alone): a
    # GET's round trips (latency assumed) and the rest of the 845 ms less the host load below (660 ms) at
    # this bandwidth.
    object_latency_ms: float = 50.0
    object_bytes_per_s: float = 64e6
    # Host cache -> device pool: parsing the blob, converting it and writing it into the pool's pages, and
    # publishing it between two steps. `python -m bench stall` (2026-11-30, 10 rounds, both load paths,
    # fp32 blobs from RAM while the engine decodes on the same 2 cores): median 180-189 ms at rank 64 (39 MB
    # in the pool), 245-257 ms at rank 128 (78 MB); the line through them: 120 ms + pool bytes / 0.6 GB/s.
    host_latency_ms: float = 120.0
    host_bytes_per_s: float = 0.6e9

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"cost {name} must be a finite number (got {value!r})")
        for name in ("adapter_read_bytes_per_s", "object_bytes_per_s", "host_bytes_per_s", "max_batch_tokens",
                     "step_fixed_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cost {name} must be > 0 (got {getattr(self, name)})")
        for name in ("decode_ms_per_seq", "prefill_ms_per_token", "lora_ms_per_token_rank", "object_latency_ms",
                     "host_latency_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name} must be >= 0 (got {getattr(self, name)})")

    @classmethod
    def load(cls, path: Path | str) -> CostModel:
        """A cost model from a JSON file (class docstring); unknown fields are an error."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from e
        if isinstance(data, dict) and isinstance(data.get("cost"), dict):
            data = data["cost"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a cost model is a JSON object of fields (got {type(data).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown cost field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def tier_costs(self) -> TierCosts:
        """The load costs as `scheduler.staging.TierCosts` (what the stager and GreedyDual eviction weigh)."""
        return TierCosts(object_latency_s=MS * self.object_latency_ms, object_bytes_per_s=self.object_bytes_per_s,
                         host_latency_s=MS * self.host_latency_ms, host_bytes_per_s=self.host_bytes_per_s)

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
    staged_fetches: int = 0  # of the fetches, those the core's Fetch asked for
    staged_loads: int = 0  # the core's Loads carried out (their fetches and loads are counted above too)
    staged_evictions: int = 0  # the core's Evicts carried out (device -> host counted in evictions too)
    stage_dropped: int = 0  # staged loads given up: no room on the device without evicting a version in use
    steps: int = 0
    busy_s: float = 0.0  # time spent in steps
    device_byte_s: float = 0.0  # device bytes held (resident or loading) x seconds, in the scored window
    peak_device_bytes: int = 0  # most device bytes held (resident or loading) at once
    peak_host_bytes: int = 0  # most bytes in the host cache at once


@dataclass(frozen=True)
class CallRecord:
    """One completed call."""

    id: str
    adapter: str  # its adapter's key: tenant/adapter, or the bare name
    arrived: float
    tier: str  # where its adapter was when the call was (last) dispatched: device, host or object
    worker: str
    load_wait_s: float  # dispatch -> its adapter on the device (0 when it was there)
    ttft_s: float  # arrival -> first token
    latency_s: float  # arrival -> last token


@dataclass
class SimReport:
    """Figures of one simulation (the same inputs and seed give an equal report). The call figures count the
    scored calls: those that arrived from `score_from_s` on (all by default)."""

    requests: int
    completed: int
    failed: dict[str, int]  # error code -> calls
    unfinished: int  # neither completed nor failed when the simulation stopped
    scored: int  # completed calls that arrived from score_from_s on
    cold_starts: int  # scored calls that waited for a load from the object store
    host_loads: int  # scored calls that waited for a load from the host cache
    device_hits: int  # scored calls whose adapter was on the device (or the bare backbone)
    ttft_s: dict[str, float]  # arrival -> first token, p50/p90/p99/mean
    latency_s: dict[str, float]  # arrival -> last token
    dispatch_wait_s: dict[str, float]  # arrival -> last dispatch
    load_wait_s: dict[str, float]  # last dispatch -> adapter on the device
    device_byte_s: float  # device bytes held x seconds, all workers, from score_from_s to the last arrival
    decisions: dict[str, int]  # the core's counts: dispatch reasons, deferrals, failures, workers up/gone, stage_*
    per_worker: dict[str, WorkerRecord]
    trace_s: float  # last arrival
    end_s: float  # when the last call finished (or the simulation stopped)
    events: int
    calls: list[CallRecord] = field(default_factory=list, repr=False)  # every completed call, in arrival order
    intervals: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the core's IntervalRecords
    switches: list[tuple[float, str, str, str]] = field(default_factory=list)  # fallback: (at, from, to, why)

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        """The figures; the per-call and per-interval records too when `full`."""
        out = asdict(self)
        if not full:
            del out["calls"], out["intervals"]
        return out


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
    ready_at: float = 0.0  # its adapter was on the device (after its last dispatch)
    first_token_at: float | None = None
    finished_at: float = 0.0
    prefill_left: int = 0
    done: bool = False


class _Worker:
    """A simulated worker: residency per tier, loads in flight, a queue and a continuously batched step."""

    def __init__(self, worker_id: str, config: WorkerConfig, cost: CostModel, eviction: EvictionPolicy,
                 schedule: Callable[[float, _Kind, Any], None], specs: Mapping[str, AdapterSpec],
                 host_eviction: EvictionPolicy | None = None) -> None:
        self.id, self.config, self.cost, self.eviction = worker_id, config, cost, eviction
        self.host_eviction = host_eviction  # None: the host cache is LRU
        self.used_at: dict[str, float] = {}  # version -> when a call here last asked for it
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
        self._resident: tuple[ResidentReport, ...] | None = None  # for heartbeats; None when it changed
        self.refs: Counter[str] = Counter()  # versions -> calls here that need them on the device
        self.loading: dict[str, list[_Call]] = {}  # version -> calls waiting for its load (fetch or load)
        self.fetching: set[str] = set()  # versions on their way from the object store
        self.blocked: deque[str] = deque()  # versions whose load waits for room in the device pool
        self.doomed: dict[str, Tier] = {}  # evictions waiting for the calls that use the version to end
        self.window = (0.0, math.inf)  # the memory-time counts within this
        self.device_since = 0.0  # device_used has held since then
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
        self.used_at[v] = now
        self._changed()
        self.doomed.pop(v, None)  # wanted again: an eviction waiting for its calls to end is called off
        if v in self.device:
            call.tier = Tier.device
            call.ready_at = now
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
        """Start bringing `version` (in `loading`) to the device: fetch it to the host first if it is not there."""
        if version in self.host:
            self.host.move_to_end(version)
            self._load(version, now)
        elif version not in self.fetching:  # else the fetch in flight goes on to the load
            self._fetch(version, now)

    def _fetch(self, version: str, now: float) -> None:
        self.fetching.add(version)
        self.record.fetches += 1
        self.schedule(now + self.cost.fetch_s(self.specs[version].bytes), _Kind.fetched, (self.id, version))

    def fetched(self, version: str, now: float) -> None:
        self.fetching.discard(version)
        self._cache_on_host(version)
        if version in self.loading:  # not when the core only asked for a fetch to the host
            self._load(version, now)

    def _pinned(self, version: str) -> bool:
        """A blob the host cache keeps whatever its budget: its version is on the device or on its way there."""
        return version in self.device or version in self.loading

    def _cache_on_host(self, version: str) -> None:
        """Put a blob in the host cache (or mark it used); the least recently used unpinned blobs leave while
        the cache is over its budget."""
        if version not in self.host:
            nbytes = self.specs[version].bytes
            self.host[version] = nbytes
            self.host_used += nbytes
            self._changed()
            if self.host_used > self.config.host_cache_bytes and self.host_eviction is not None:
                self._host_evict(version, nbytes)
            elif self.host_used > self.config.host_cache_bytes:
                for v in [v for v in self.host if v != version and not self._pinned(v)]:
                    self.host_used -= self.host.pop(v)
                    if self.host_used <= self.config.host_cache_bytes:
                        break
            self.record.peak_host_bytes = max(self.record.peak_host_bytes, self.host_used)
        self.host.move_to_end(version)

    def _host_evict(self, version: str, nbytes: int) -> None:
        """Make room in the host cache for `version` (just added, `nbytes`) with the host eviction policy; when it
        cannot make all the room (blobs pinned by the device), every unpinned blob leaves, as under LRU."""
        assert self.host_eviction is not None
        others = [ResidentView(v, b, self.used_at.get(v, 0.0), int(self._pinned(v)), b, self.specs[v].rank)
                  for v, b in self.host.items() if v != version]
        free = self.config.host_cache_bytes - (self.host_used - nbytes)
        victims = self.host_eviction.choose_victims(nbytes, max(free, 0), others)  # sized in bytes
        if victims is None:
            victims = [r.version for r in others if not r.in_use]
        for v in victims:
            self.host_used -= self.host.pop(v)

    def _load(self, version: str, now: float) -> None:
        """Host -> device, once the eviction policy has made room: a call's load waits for room, behind other
        waiting loads; a staged one (no call waiting for it) is given up."""
        if not self.blocked and self._make_room(version, now):
            self._start_load(version, now)
        elif self.loading.get(version):
            self.blocked.append(version)
        else:
            del self.loading[version]
            self.record.stage_dropped += 1

    def _start_load(self, version: str, now: float) -> None:
        self.record.loads += 1
        self.schedule(now + self.cost.load_s(self.specs[version].bytes), _Kind.loaded, (self.id, version))

    def _make_room(self, version: str, now: float) -> bool:
        nbytes = self.specs[version].bytes
        needed = -(-nbytes // POOL_PAGE_BYTES)
        free = (self.config.device_pool_bytes - self.device_used) // POOL_PAGE_BYTES
        specs = self.specs
        resident = [ResidentView(v, specs[v].bytes // POOL_PAGE_BYTES, last_used, self.refs.get(v, 0),
                                 specs[v].bytes, specs[v].rank) for v, last_used in self.device.items()]
        victims = self.eviction.choose_victims(needed, free, resident)
        if victims is None:
            return False
        for v in victims:
            self._leave_device(v, now)
        self._account(now)
        self.device_used += nbytes  # reserved while the load runs
        self.record.peak_device_bytes = max(self.record.peak_device_bytes, self.device_used)
        return True

    def _leave_device(self, version: str, now: float) -> None:
        """Device -> host cache (the blob stays there unless the cache is over its budget)."""
        self._account(now)
        del self.device[version]
        self.device_used -= self.specs[version].bytes
        self.record.evictions += 1
        self._changed()
        self._cache_on_host(version)

    def loaded(self, version: str, now: float) -> None:
        self.device[version] = now
        self._changed()
        for call in self.loading.pop(version, []):
            call.ready_at = now
            self.ready.append(call)
        if self.ready:
            self._cut_run(now)
        self.kick(now)
        self._retry_blocked(now)  # what it reserved is resident now, and may be evicted for them

    def _retry_blocked(self, now: float) -> None:
        """Start the loads that waited for room, in order, while they fit."""
        while self.blocked and self._make_room(self.blocked[0], now):
            self._start_load(self.blocked.popleft(), now)

    def release(self, version: str, now: float) -> None:
        """A call of `version` left this worker: unpin it, carry out an eviction that waited for it, and retry
        the loads that waited for room."""
        self.refs[version] -= 1
        self._changed()
        if self.refs[version] <= 0:
            del self.refs[version]
            if version in self.doomed:
                self.evict(version, self.doomed.pop(version), now)
        if version in self.device:
            self.device[version] = now
            self.device.move_to_end(version)
        self._retry_blocked(now)

    # -- staging commands -----------------------------------------------------------------------------------

    def stage_fetch(self, version: str, now: float) -> None:
        """The core's Fetch: object store -> host cache (nothing if it is there or on its way)."""
        if version in self.host or version in self.fetching:
            return
        self.record.staged_fetches += 1
        self._fetch(version, now)

    def stage_load(self, version: str, now: float) -> None:
        """The core's Load: bring a version to the device ahead of its calls (given up if there is no room)."""
        if version in self.device or version in self.loading:
            return
        self.record.staged_loads += 1
        self.loading[version] = []
        self._bring(version, now)

    def evict(self, version: str, to_tier: Tier, now: float) -> None:
        """The core's Evict: off the device (`to_tier` host) or off the worker (object). A version that calls
        here still need leaves when the last of them ends (unless another call wants it meanwhile); one being
        loaded stays (the next heartbeat tells the core)."""
        if self.refs.get(version):
            self.doomed[version] = to_tier
            return
        if version in self.loading:
            return
        done = version in self.device or (to_tier == Tier.object and version in self.host)
        if version in self.device:
            self._leave_device(version, now)
        if to_tier == Tier.object and version in self.host:
            self.host_used -= self.host.pop(version)
            self._changed()
        self.record.staged_evictions += done
        self._retry_blocked(now)

    # -- accounting -----------------------------------------------------------------------------------------

    def _changed(self) -> None:
        self._resident = None

    def _account(self, now: float) -> None:
        """Add the device bytes held since the last change to the memory-time, within the scored window."""
        lo, hi = self.window
        start, end = max(self.device_since, lo), min(now, hi)
        if end > start:
            self.record.device_byte_s += self.device_used * (end - start)
        self.device_since = now

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
        self._account(now)
        self.device_used = 0  # its memory is no longer held
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
        """A heartbeat: residency per tier (a device version's blob is in the host cache too, reported once,
        on the device), calls using each device version, budgets. The residency list is rebuilt only after
        a change."""
        if self._resident is None:
            specs, refs = self.specs, self.refs
            self._resident = tuple(
                [ResidentReport(v, Tier.device, specs[v].rank, specs[v].bytes, specs[v].bytes // POOL_PAGE_BYTES,
                                refs.get(v, 0), last_used) for v, last_used in self.device.items()]
                + [ResidentReport(v, Tier.host, specs[v].rank, n) for v, n in self.host.items() if v not in self.device])
        pool = self.config.device_pool_bytes
        return WorkerReport(
            at=now, worker_id=self.id, total_pages=pool // POOL_PAGE_BYTES,
            free_pages=(pool - self.device_used) // POOL_PAGE_BYTES, max_rank=self.config.max_rank,
            max_inflight=self.config.max_inflight, running=self.running,
            queue_depth=len(self.ready) + sum(len(c) for c in self.loading.values()),
            resident=self._resident, device_bytes=pool, host_bytes=self.config.host_cache_bytes,
            page_bytes=POOL_PAGE_BYTES,
        )


# -- the simulator ------------------------------------------------------------------------------------------------


def adapter_specs(trace: Sequence[TraceRequest], *, ranks: Sequence[int] = DEFAULT_RANKS, seed: int = 0,
                  fixed: Mapping[str, int] | None = None) -> dict[str, tuple[str, int, int]]:
    """adapter key (`TraceRequest.key`: `tenant/adapter`, or the bare name) -> (version, rank, bytes). Ranks
    drawn with a `random.Random(seed)` over the keys in sorted order (so a key's rank does not depend on the
    trace's order); `fixed` (by key, or by bare adapter name) overrides."""
    rng = random.Random(seed)
    out = {}
    for key in sorted({r.key for r in trace}):
        rank = rng.choice(list(ranks))
        if fixed:
            rank = fixed.get(key, fixed.get(key.rpartition("/")[2], rank))
        version = hashlib.sha256(f"sim/{key}/{rank}".encode()).hexdigest()
        out[key] = (version, rank, adapter_bytes(rank))
    return out


def arrivals(trace: Sequence[TraceRequest], *, ranks: Sequence[int] = DEFAULT_RANKS, seed: int = 0,
             adapter_ranks: Mapping[str, int] | None = None) -> list[tuple[float, str]]:
    """(time, adapter version) of every row, the versions `simulate` gives them with the same arguments: what
    an oracle predictor (`scheduler.predict.Oracle`) is built from."""
    specs = adapter_specs(trace, ranks=ranks, seed=seed, fixed=adapter_ranks)
    return [(r.at_s, specs[r.key][0]) for r in trace]


def simulate(
    trace: Sequence[TraceRequest],
    *,
    workers: int | Sequence[WorkerConfig] = 3,
    router: Router | None = None,
    cost: CostModel | None = None,
    seed: int = 0,
    core_config: CoreConfig | None = None,
    eviction: Callable[[], EvictionPolicy] = LruEviction,
    host_eviction: Callable[[], EvictionPolicy] | None = None,
    predictor: Predictor | None = None,
    stager: Stager | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
    adapter_ranks: Mapping[str, int] | None = None,
    duration_s: float | None = None,
    score_from_s: float | None = None,
    tick_s: float = 1.0,
    failures: Sequence[tuple[float, str]] = (),
    max_drain_s: float = 86_400.0,
    eager: bool = False,
) -> SimReport:
    """Run `trace` (rows sorted by time) through a `SchedulerCore` with `router` (and, for pre-staging,
    `predictor` and `stager`, both or neither) over simulated workers w0, w1, ... (module docstring), each
    with its own `eviction()` policy for its device pool. `duration_s`: only rows that arrive before it;
    `score_from_s`: the figures count only the calls that arrive from then on, and the device memory-time
    only from then to the last arrival (the calls before it run all the same: they warm the caches and the
    predictor); `failures`: (time, worker id) at which a worker dies; the run stops `max_drain_s` after the
    last arrival at the latest. `eager`: every heartbeat and every tick an event (slow; the same report: the
    tests compare the two)."""
    return _Simulation(trace, workers=workers, router=router, cost=cost or CostModel(), seed=seed,
                       core_config=core_config, eviction=eviction, host_eviction=host_eviction, predictor=predictor,
                       stager=stager, ranks=ranks, adapter_ranks=adapter_ranks, duration_s=duration_s,
                       score_from_s=score_from_s, tick_s=tick_s, failures=failures, max_drain_s=max_drain_s,
                       eager=eager).run()


class _Simulation:
    def __init__(self, trace: Sequence[TraceRequest], *, workers: int | Sequence[WorkerConfig], router: Router | None,
                 cost: CostModel, seed: int, core_config: CoreConfig | None, eviction: Callable[[], EvictionPolicy],
                 host_eviction: Callable[[], EvictionPolicy] | None, predictor: Predictor | None,
                 stager: Stager | None, ranks: Sequence[int],
                 adapter_ranks: Mapping[str, int] | None, duration_s: float | None, score_from_s: float | None,
                 tick_s: float, failures: Sequence[tuple[float, str]], max_drain_s: float, eager: bool) -> None:
        if tick_s <= 0:
            raise ValueError(f"tick_s must be > 0 (got {tick_s})")
        configs = [WorkerConfig()] * workers if isinstance(workers, int) else list(workers)
        if not configs:
            raise ValueError("a simulation needs at least one worker")
        rows = [r for r in trace if duration_s is None or r.at_s < duration_s]
        self.rng = random.Random(seed)
        if (predictor is None) != (stager is None):
            raise ValueError("pre-staging needs both a predictor and a stager (or neither)")
        self.core = SchedulerCore(router=router or AffinityRouter(), config=core_config, stager=stager)
        self.predictor = predictor  # the core's Predict commands are carried out with it inline
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
                version, rank, nbytes = by_name[r.key]
                spec = spec_of[(r.tenant, r.adapter)] = AdapterSpec(r.tenant, r.adapter, version, rank, nbytes)
                self.specs[version] = spec
            call = _Call(f"i{i:07d}", spec, r.prompt_tokens, r.output_tokens, r.at_s)
            self.calls.append(call)
            self._schedule(r.at_s, _Kind.arrive, call)
        self.by_id = {c.id: c for c in self.calls}
        self.trace_s = rows[-1].at_s if rows else 0.0
        self.score_from = score_from_s if score_from_s is not None else -math.inf

        self.workers: dict[str, _Worker] = {}
        for i, config in enumerate(configs):
            w = _Worker(f"w{i}", config, cost, eviction(), self._schedule, self.specs,
                        host_eviction() if host_eviction is not None else None)
            w.window = (max(self.score_from, self.now), self.trace_s)
            w.device_since = self.now
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
        self.interval_s: float | None = self.core.config.staging_interval_s if predictor is not None else None
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
                    if w.alive:
                        self._touch(w)
                        w.stage_fetch(c.version, now)
                case Load():
                    w = self.workers[c.worker_id]
                    if w.alive:
                        self._touch(w)
                        w.stage_load(c.version, now)
                case Evict():
                    w = self.workers[c.worker_id]
                    if w.alive:
                        self._touch(w)
                        w.evict(c.version, c.to_tier, now)
                case Predict():
                    assert self.predictor is not None
                    self._apply(self.core.handle(predict(self.predictor, c, now)))

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
        for w in self.workers.values():
            w._account(self.now)
        records = [CallRecord(c.id, _key(c.spec), c.arrived, c.tier.value, c.worker or "",
                              max(0.0, c.ready_at - c.dispatched_at), c.first_token_at - c.arrived,
                              c.finished_at - c.arrived)
                   for c in self.calls if c.done and c.first_token_at is not None]
        scored = [r for r in records if r.arrived >= self.score_from]
        tiers = Counter(r.tier for r in scored)
        switches = getattr(self.predictor, "switches", [])
        return SimReport(
            requests=len(self.calls),
            completed=len(records),
            failed=dict(sorted(self.failed.items())),
            unfinished=self.open,
            scored=len(scored),
            cold_starts=tiers[Tier.object.value],
            host_loads=tiers[Tier.host.value],
            device_hits=tiers[Tier.device.value],
            ttft_s=percentiles([r.ttft_s for r in scored]),
            latency_s=percentiles([r.latency_s for r in scored]),
            dispatch_wait_s=percentiles([c.dispatched_at - c.arrived for c in self.calls
                                         if c.done and c.first_token_at is not None and c.arrived >= self.score_from]),
            load_wait_s=percentiles([r.load_wait_s for r in scored]),
            device_byte_s=sum(w.record.device_byte_s for w in self.workers.values()),
            decisions=dict(sorted(self.core.decisions.items())),
            per_worker={w.id: w.record for w in self.workers.values()},
            trace_s=self.trace_s,
            end_s=self.end_s,
            events=self.events,
            calls=records,
            intervals=[{**asdict(r), "precision": r.precision, "recall": r.recall} for r in self.core.intervals],
            switches=[(x.at, x.from_, x.to, x.reason) for x in switches],
        )


def _key(spec: AdapterSpec) -> str:
    return f"{spec.tenant}/{spec.adapter}" if spec.tenant else spec.adapter


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
    "random": RandomRouter,  # a uniformly random worker that can take the call (seed 0)
}
PREDICTOR_NAMES = ("none", *PREDICTORS)  # none: reactive (no pre-staging)
STAGERS = ("auto", "none", "predictive")  # auto: predictive when there is a predictor
EVICTIONS = ("lru", "greedy_dual")


def eviction_factory(name: str, cost: CostModel) -> Callable[[], EvictionPolicy]:
    """A worker's device-pool eviction policy by name: `lru` (LruEviction) or `greedy_dual`
    (scheduler.staging.GreedyDualEviction weighing reloads with `cost`)."""
    if name == "lru":
        return LruEviction
    if name == "greedy_dual":
        return lambda: GreedyDualEviction(costs=cost.tier_costs(), page_bytes=POOL_PAGE_BYTES)
    raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(EVICTIONS)}")


def host_eviction_factory(name: str, cost: CostModel) -> Callable[[], EvictionPolicy] | None:
    """A worker's host-cache eviction policy by name, as `simulate` takes it: the live worker's
    (`workers.host_cache.host_eviction`) weighing fetches with `cost`; None for `lru` (the cache's own order)."""
    if name not in EVICTIONS:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(EVICTIONS)}")
    if host_eviction(name) is None:
        return None

    def policy() -> EvictionPolicy:  # one per worker (the policy keeps state)
        made = host_eviction(name, cost.tier_costs())
        assert made is not None
        return made

    return policy


def build_staging(predictor: str, stager: str, *, interval_s: float, cost: CostModel, workers: int = 1,
                  trace: Sequence[TraceRequest] = (), ranks: Sequence[int] = DEFAULT_RANKS, seed: int = 0,
                  adapter_ranks: Mapping[str, int] | None = None) -> tuple[Predictor | None, Stager | None]:
    """(predictor, stager) by name (`PREDICTOR_NAMES`, `STAGERS`): (None, None) for the reactive policies. The
    oracle reads the future from `trace` (the rows given to `simulate`, with the same ranks and seed); the
    LSTM trains inline with `seed`, so that a run is deterministic. The stager's cap on transfers per interval
    is its default for one worker and a minute (16) scaled to `workers` and `interval_s` (at least 1)."""
    if predictor not in PREDICTOR_NAMES:
        raise ValueError(f"unknown predictor {predictor!r}; known: {', '.join(PREDICTOR_NAMES)}")
    if stager not in STAGERS:
        raise ValueError(f"unknown stager {stager!r}; known: {', '.join(STAGERS)}")
    if predictor == "none":
        if stager == "predictive":
            raise ValueError("the predictive stager needs a predictor (--predictor)")
        return None, None
    if stager == "none":
        raise ValueError(f"predictor {predictor!r} needs a stager: pre-staging runs both (--stager predictive)")
    cap = max(1, round(PredictiveStager.max_stages_per_interval * workers * interval_s / 60.0))
    future = arrivals(trace, ranks=ranks, seed=seed, adapter_ranks=adapter_ranks) if predictor == "oracle" else ()
    return staging_policies(StagingSettings(predictor=predictor, interval_s=interval_s), train="inline", seed=seed,
                            costs=cost.tier_costs(), max_stages_per_interval=cap, arrivals=future)


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"ranks are comma-separated integers (got {text!r})") from e
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be >= 1 (got {text!r})")
    return ranks


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1) (got {text})")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {text})")
    return value


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of how a trace is read and sized (shared with `python -m bench scheduling`)."""
    parser.add_argument("--adapters", type=_positive_int, default=100,
                        help="adapters of the Zipf popularity (Azure; default 100)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (Azure; default 1.0)")
    parser.add_argument("--alibaba-key", choices=traces.ALIBABA_KEYS, default="model",
                        help="Alibaba: one adapter per model (default) or per (groupId, model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of adapter assignment, ranks and heartbeat phases")
    parser.add_argument("--limit", type=int, help="read only the first N rows of the trace file")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply trace time by this (2: the same requests at half the rate; default 1)")
    parser.add_argument("--ranks", type=_ranks, default=DEFAULT_RANKS,
                        help="adapter ranks to draw from, comma-separated (default 8,16,32,64)")
    parser.add_argument("--max-output-tokens", type=int, default=traces.MAX_OUTPUT_TOKENS,
                        help=f"cap on a request's output tokens (default {traces.MAX_OUTPUT_TOKENS})")
    parser.add_argument("--output-tokens", type=int, default=128, help="output tokens of an Alibaba request (default 128)")
    parser.add_argument("--cost", type=Path, help="JSON file of CostModel fields (a calibration; default: the built-in)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, required=True,
                        help="trace file (Azure LLM CSV, Alibaba GenAI CSV, or the canonical lorafn CSV)")
    parser.add_argument("--format", choices=(*traces.FORMATS, "lorafn"), help="trace format (default: from the header)")
    parser.add_argument("--workers", type=_positive_int, default=3, help="simulated workers (default 3)")
    parser.add_argument("--duration-s", type=float, help="simulate only the requests of the first D trace seconds")
    add_trace_arguments(parser)
    parser.add_argument("--router", choices=sorted(ROUTERS), default="affinity", help="routing policy (default affinity)")
    parser.add_argument("--pin", action="append", default=[], metavar="TENANT/ADAPTER=WORKER",
                        help="send every call of an adapter to one worker (PinnedRouter over --router); repeatable")
    parser.add_argument("--predictor", choices=PREDICTOR_NAMES, default="none",
                        help="demand predictor for pre-staging (default none: reactive)")
    parser.add_argument("--stager", choices=STAGERS, default="auto",
                        help="staging policy (default auto: predictive when there is a predictor)")
    parser.add_argument("--eviction", choices=EVICTIONS, default="lru", help="workers' device-pool eviction (default lru)")
    parser.add_argument("--host-eviction", choices=EVICTIONS, default="lru",
                        help="workers' host-cache eviction (default lru; the live worker's default is greedy_dual)")
    parser.add_argument("--interval-s", type=float, default=CoreConfig.staging_interval_s,
                        help=f"pre-staging interval (default {CoreConfig.staging_interval_s:g})")
    parser.add_argument("--device-bytes", type=_positive_int, default=WorkerConfig.device_pool_bytes,
                        help=f"device adapter pool per worker, bytes (default {WorkerConfig.device_pool_bytes})")
    parser.add_argument("--host-bytes", type=_positive_int, default=WorkerConfig.host_cache_bytes,
                        help=f"host cache per worker, bytes (default {WorkerConfig.host_cache_bytes})")
    parser.add_argument("--score-from", type=_fraction, default=0.0,
                        help="score only the calls after this fraction of the trace's span (the earlier ones warm "
                             "the caches and the predictor; default 0: all)")
    parser.add_argument("--results-dir", type=Path, help="where the JSON goes (default bench/results)")


def load_trace(args: argparse.Namespace) -> list[TraceRequest]:
    """The trace of `args` (`add_trace_arguments`) as rows, time-scaled."""
    if args.time_scale <= 0:
        raise SystemExit(f"--time-scale must be > 0 (got {args.time_scale})")
    try:
        rows = traces.load_trace(args.trace, fmt=args.format, adapters=args.adapters, zipf_s=args.zipf,
                                 seed=args.seed, alibaba_key=args.alibaba_key, output_tokens=args.output_tokens,
                                 max_output_tokens=args.max_output_tokens, limit=args.limit)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read the trace: {e}") from e
    if args.time_scale != 1.0:
        rows = [TraceRequest(r.at_s * args.time_scale, r.tenant, r.adapter, r.prompt_tokens, r.output_tokens)
                for r in rows]
    return rows


def load_cost(path: Path | None) -> CostModel:
    if path is None:
        return CostModel()
    try:
        return CostModel.load(path)
    except ValueError as e:
        raise SystemExit(f"--cost: {e}") from e


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
    cost = load_cost(args.cost)
    started = time.perf_counter()
    trace = load_trace(args)
    if args.duration_s is not None:
        trace = [r for r in trace if r.at_s < args.duration_s]
    loaded = time.perf_counter()
    if args.interval_s <= 0:
        raise SystemExit(f"--interval-s must be > 0 (got {args.interval_s})")
    try:
        predictor, stager = build_staging(args.predictor, args.stager, interval_s=args.interval_s, cost=cost,
                                          workers=args.workers, trace=trace, ranks=args.ranks, seed=args.seed)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    score_from = trace[0].at_s + args.score_from * (trace[-1].at_s - trace[0].at_s) if trace else 0.0
    worker = WorkerConfig(device_pool_bytes=args.device_bytes, host_cache_bytes=args.host_bytes)
    core = CoreConfig(staging_interval_s=args.interval_s)
    try:
        report = simulate(trace, workers=[worker] * args.workers, router=build_router(args.router, args.pin),
                          cost=cost, seed=args.seed, core_config=core, ranks=args.ranks,
                          eviction=eviction_factory(args.eviction, cost),
                          host_eviction=host_eviction_factory(args.host_eviction, cost), predictor=predictor,
                          stager=stager, score_from_s=score_from)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    finally:
        close = getattr(predictor, "close", None)
        if close is not None:
            close()
    finished = time.perf_counter()

    def pct(d: dict[str, float]) -> str:
        return " / ".join(f"{d[k]:.2f}" for k in ("p50", "p90", "p99"))

    window = max(report.trace_s - max(score_from, 0.0), 1e-9)
    scored = [i for i in report.intervals if i["end"] > score_from]
    hits, predicted, called = (sum(i[k] for i in scored) for k in ("hits", "predicted", "called"))
    staging = {"intervals": len(scored), "precision": hits / predicted if predicted else None,
               "recall": hits / called if called else None}
    rows: list[list[Any]] = [
        ["requests", report.requests], ["completed", report.completed],
        ["failed", sum(report.failed.values())], ["unfinished", report.unfinished],
        ["scored (arrived after the warm-up)", report.scored],
        ["cold starts (waited for the object store)", report.cold_starts],
        ["host loads (waited for host -> device)", report.host_loads], ["device hits", report.device_hits],
        ["TTFT s p50 / p90 / p99", pct(report.ttft_s)], ["latency s p50 / p90 / p99", pct(report.latency_s)],
        ["dispatch wait s p50 / p90 / p99", pct(report.dispatch_wait_s)],
        ["load wait s p50 / p90 / p99", pct(report.load_wait_s)],
        ["device memory GB mean per worker", f"{report.device_byte_s / window / args.workers / 1e9:.3f}"],
        ["staging intervals scored / precision / recall",
         " / ".join("-" if x is None else f"{x:.3g}" for x in staging.values())],
        ["trace s / last finish s", f"{report.trace_s:.0f} / {report.end_s:.0f}"],
        ["events", report.events], ["wall s (load trace + simulate)", f"{loaded - started:.2f} + {finished - loaded:.2f}"],
    ]
    rows += [[f"decision: {k}", v] for k, v in report.decisions.items()]
    policy = (f"router {args.router}, predictor {args.predictor}, eviction {args.eviction}, "
              f"host eviction {args.host_eviction}")
    print_table(f"simulated {args.trace.name}: {args.workers} workers, {policy}, seed {args.seed}",
                ["figure", "value"], rows)
    print_table("per worker", ["worker", "dispatched", "completed", "adapters", "fetches", "loads", "evictions",
                               "staged", "busy"],
                [[k, r.dispatched, r.completed, len(r.adapters), r.fetches, r.loads, r.evictions,
                  r.staged_fetches + r.staged_loads + r.staged_evictions,
                  f"{r.busy_s / max(report.end_s, 1e-9):.0%}"] for k, r in report.per_worker.items()])
    payload = {
        "trace": args.trace.name, "format": args.format or traces.detect_format(args.trace),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cost": asdict(cost), "worker": asdict(worker), "core": asdict(core),
        "wall_s": {"load": loaded - started, "simulate": finished - loaded}, "staging": staging,
        **report.to_dict(),
    }
    write(f"simulate_{args.trace.stem}", payload, results_dir=args.results_dir or RESULTS_DIR)
    return payload
