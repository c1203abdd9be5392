"""Every message lorafn sends over NATS: small typed classes, msgpack on the wire.

Each subject carries one message type (see protocol/subjects.py):

| subject                                 | message              | from -> to                      |
|-----------------------------------------|----------------------|---------------------------------|
| `lora.invoke.<tenant>.<adapter>` (JS)   | `Invocation`         | gateway / any client -> dispatcher |
| `lora.work.<worker id>` (JS)            | `Invocation`         | dispatcher -> one worker        |
| `lora.reply.<tenant>.<...>` (core)      | `InvocationStarted`, `TokenChunk`s, then `InvocationResult` | worker -> caller |
| `lora.result.<invocation id>` (JS)      | `InvocationResult`   | worker -> results stream        |
| `lora.callback.<invocation id>` (JS)    | `InvocationResult`   | worker -> gateway (callbacks)   |
| `lora.ctl.<worker id>.<verb>` (core req)| `ControlRequest` / `ControlReply` | scheduler -> worker |
| `lora.evt.worker.<worker id>` (core)    | `Heartbeat`          | worker -> scheduler             |
| `lora.evt.adapter.<event>` (core)       | `AdapterEvent`       | registry -> scheduler, workers  |
| `lora.evt.invocation.started` (core)    | `InvocationStarted`  | worker -> scheduler             |
| `lora.evt.scheduler.<scheduler id>` (core) | `SchedulerHeartbeat` | scheduler -> gateways        |
| `lora.evt.key.<event>` (core)           | `KeyEvent`           | gateway / CLI -> gateways       |
| `lora.cancel.<invocation id>` (core)    | `CancelInvocation`   | gateway -> the worker running it |

Decoding ignores unknown fields, so a newer sender can add fields without breaking older readers;
a missing or mistyped field raises `MessageInvalid`.
"""

from __future__ import annotations

import enum
import time
from typing import Any, ClassVar, Literal, Self

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Re-exported: an invocation with adapter=None is published under lora.invoke.<tenant>.<BASE_ADAPTER>.
from protocol.subjects import BASE_ADAPTER as BASE_ADAPTER


class MessageInvalid(ValueError):
    """Bytes that do not decode to the expected message type."""

    def __init__(self, message_type: str, reason: str) -> None:
        super().__init__(f"invalid {message_type}: {reason}")
        self.message_type = message_type


class ErrorCode(enum.StrEnum):
    """Why an invocation failed; the gateway maps each to an HTTP status."""

    bad_request = "bad_request"  # 400: a parameter the worker cannot honour
    prompt_too_long = "prompt_too_long"  # 400: prompt beyond the context window
    not_found = "not_found"  # 404: adapter or version unknown
    forbidden = "forbidden"  # 403: a message on the bus named what its tenant may not use (never from a gateway)
    adapter_invalid = "adapter_invalid"  # 422: the stored adapter cannot be loaded
    adapter_corrupted = "adapter_corrupted"  # 502: the object store returned bytes with the wrong hash
    overloaded = "overloaded"  # 429: queue limits reached
    unavailable = "unavailable"  # 503: a dependency is down
    timeout = "timeout"  # 504: no worker answered in time
    dead_letter = "dead_letter"  # 500: delivered max_deliver times, never completed
    cancelled = "cancelled"  # 409: the caller cancelled it (or went away while waiting for it)
    internal = "internal"  # 500: a bug


class Tier(enum.StrEnum):
    """Where a copy of an adapter version is: the worker's device pool, its host cache, or only the object
    store (the source of truth, implied for every version). The one spelling of the concept everywhere."""

    device = "device"
    host = "host"
    object = "object"


class Message(BaseModel):
    """Base of every wire message: immutable, msgpack-encoded, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: ClassVar[str] = "message"

    def encode(self) -> bytes:
        return msgpack.packb(self.model_dump(mode="json"), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
            raise MessageInvalid(cls.__name__, f"not msgpack ({e})") from e
        if not isinstance(raw, dict):
            raise MessageInvalid(cls.__name__, f"expected a map, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise MessageInvalid(cls.__name__, e.errors(include_url=False).__repr__()) from e


class Sampling(Message):
    """Sampling parameters of one invocation (temperature 0 is greedy)."""

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    max_tokens: int = Field(16, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=4)
    stop_token_ids: list[int] = Field(default_factory=list)


class ChatMessage(Message):
    role: Literal["system", "user", "assistant"]
    content: str


class Invocation(Message):
    """One call of a function. Published to the invocations stream with `Nats-Msg-Id: <id>`."""

    kind: ClassVar[str] = "invocation"
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    tenant: str
    adapter: str | None = None  # None: the bare backbone
    version: str | None = None  # sha256 of the adapter version the gateway resolved
    prompt: str | None = None  # a completion prompt ...
    messages: list[ChatMessage] | None = None  # ... or a chat, with the backbone's chat template
    sampling: Sampling = Field(default_factory=Sampling)
    stream: bool = True  # send TokenChunks to the reply subject as they come
    reply_to: str | None = None  # core subject of the caller, in its tenant's namespace lora.reply.<tenant>.>
    callback_url: str | None = None
    submitted_at: float = Field(default_factory=time.time)  # unix seconds


class TokenChunk(Message):
    """Tokens of an invocation, in order. `index` counts tokens from 0, so a redelivered invocation that
    generates again (same seed, same tokens) lets the caller drop what it has already seen."""

    kind: ClassVar[str] = "chunk"
    invocation_id: str
    index: int = Field(ge=0)  # index of the first token of this chunk in the completion
    token_ids: list[int]
    text: str
    epoch: int = 1  # the dispatch this chunk comes from (see InvocationStarted.epoch)


class Usage(Message):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(Message):
    """Milliseconds from submission; None when the step never happened."""

    queued_ms: float | None = None  # submitted -> a worker started it
    load_ms: float | None = None  # time spent bringing the adapter to the device for this call
    first_token_ms: float | None = None
    total_ms: float | None = None


class InvocationError(Message):
    code: ErrorCode
    message: str


class InvocationResult(Message):
    """The outcome of an invocation: the last message on the reply subject and the record in the
    results stream (which makes retries idempotent)."""

    kind: ClassVar[str] = "result"
    invocation_id: str
    status: Literal["succeeded", "failed", "cancelled"]  # cancelled: error.code is `cancelled`
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: Literal["stop", "length", "abort"] | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    worker_id: str | None = None
    adapter_tier: Tier | None = None  # where the adapter was on arrival
    attempt: int = 1
    epoch: int = 1  # the dispatch that produced this result
    error: InvocationError | None = None


class CancelInvocation(Message):
    """Stop an invocation (on lora.cancel.<invocation id>). Its cancelled result is recorded in the results
    stream first, so a worker that has not started it yet refuses it when it picks it up; the worker running
    it aborts the generation (freeing its batch slot and KV blocks) and acks it."""

    kind: ClassVar[str] = "cancel"
    invocation_id: str
    reason: str = "cancelled"
    sent_at: float = Field(default_factory=time.time)


class InvocationStarted(Message):
    """A worker admitted an invocation into its batch (on lora.evt.invocation.started, and first on the
    invocation's reply subject)."""

    kind: ClassVar[str] = "started"
    invocation_id: str
    worker_id: str
    attempt: int = 1
    started_at: float = Field(default_factory=time.time)
    adapter_tier: Tier | None = None  # where the adapter was on arrival
    load_ms: float | None = None
    # Dispatches of this invocation so far: 1, then +1 each time the dispatcher rescued it from a worker that
    # stopped heartbeating. A caller follows the highest epoch it has seen and drops messages of lower ones
    # (a worker that was only paused may still send some).
    epoch: int = 1


class ControlVerb(enum.StrEnum):
    """Scheduler -> worker lifecycle verbs; each is idempotent."""

    fetch = "fetch"  # object store -> host cache
    load = "load"  # host cache -> device pool (fetching first if needed)
    evict = "evict"  # device pool -> host cache (or drop the host copy with tier=host)
    drain = "drain"  # stop taking new work


class ControlRequest(Message):
    kind: ClassVar[str] = "control"
    verb: ControlVerb
    tenant: str | None = None
    adapter: str | None = None
    version: str | None = None  # sha256 of the adapter version
    tier: Tier | None = None  # device or host


class ControlReply(Message):
    ok: bool
    tier: Tier | None = None  # where the adapter is after the command
    load_ms: float | None = None
    error: InvocationError | None = None


class ResidentAdapter(Message):
    """An adapter version a worker holds (by content hash: two names with identical bytes are one version)."""

    version: str
    tier: Tier  # device or host
    rank: int = 0  # largest rank of its modules (0: unknown, e.g. a host-cache blob not parsed yet)
    pages: int = 0
    bytes: int = 0
    in_use: int = 0  # invocations using it now
    last_used: float | None = None  # unix seconds


class Heartbeat(Message):
    """A worker's state, published every second. Its residency is the whole of it every few heartbeats and
    the changes since the heartbeat before in between (`protocol.residency`: the sender that stamps them and
    the tracker that reads them): `resident_base` None: `resident` lists every version the worker holds;
    otherwise `resident` lists the versions added or changed since heartbeat `resident_base` of the same worker
    process (same `started_at`) and `removed` those it no longer holds. `resident_seq` numbers the worker
    process's heartbeats from 1 (0: a sender that numbers none; its heartbeats are all full)."""

    kind: ClassVar[str] = "heartbeat"
    worker_id: str
    host: str
    device: str
    started_at: float
    sent_at: float = Field(default_factory=time.time)
    draining: bool = False
    gone: bool = False  # the last heartbeat of a worker that is stopping: dispatch nothing more to it
    capacity: dict[str, Any] = Field(default_factory=dict)  # pool pages, page bytes, host cache bytes, ...
    resident: list[ResidentAdapter] = Field(default_factory=list)
    free_pages: int = 0
    queue_depth: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    resident_seq: int = Field(0, ge=0)
    resident_base: int | None = Field(None, ge=1)  # None: `resident` is full; else a delta on this heartbeat
    removed: list[str] = Field(default_factory=list)  # versions dropped since `resident_base` (deltas only)

    @model_validator(mode="after")
    def _residency_consistent(self) -> Self:
        if self.resident_base is not None and self.resident_base >= self.resident_seq:
            raise ValueError(f"a delta applies on an earlier heartbeat: resident_base {self.resident_base} "
                             f"is not before resident_seq {self.resident_seq}")
        if self.resident_base is None and self.removed:
            raise ValueError(f"a full heartbeat removes nothing (removed lists {len(self.removed)} versions)")
        return self

    @property
    def full(self) -> bool:
        """`resident` lists every version the worker holds (not only what changed)."""
        return self.resident_base is None


class AdapterEvent(Message):
    """An adapter was pushed (new current version) or deleted."""

    kind: ClassVar[str] = "adapter_event"
    event: Literal["pushed", "deleted"]
    tenant: str
    adapter: str
    version: str | None = None


class KeyEvent(Message):
    """An API key was revoked (`revoked`, also when rotated), or a tenant's quotas changed (`tenant_changed`,
    key_id None): every gateway drops what its auth cache holds about it at once, so a revoked key stops
    working everywhere within a second rather than the cache's lifetime. Carries the key's id, never the key
    nor its hash."""

    kind: ClassVar[str] = "key_event"
    event: Literal["revoked", "tenant_changed"]
    tenant: str
    key_id: str | None = None


class SchedulerHeartbeat(Message):
    """A scheduler (dispatcher) is alive, published every second; gateways are ready only while one is."""

    kind: ClassVar[str] = "scheduler_heartbeat"
    scheduler_id: str
    workers: int = 0  # live workers it routes to
    sent_at: float = Field(default_factory=time.time)
