"""Publishing invocations to NATS and collecting what the workers send back.

One `Invoker` per process. `submit` admits a request (429/503 before anything is written), records the
invocations row, and publishes the `Invocation` to JetStream, awaiting the ack: an accepted invocation is
never lost. A synchronous submission returns a `Call` that receives what arrives on its reply subject
`lora.reply.<tenant>.<gateway id>.<invocation id>`, in the tenant's reply namespace (one subscription per
gateway, `lora.reply.*.<gateway id>.*`, made when NATS connects, so it is in place before any publish;
messages are routed to their call by the last token) and yields the worker's `InvocationStarted`, `TokenChunk`s (deduplicated by index: a redelivered
invocation may resend tokens; and by epoch: once a rescued invocation's new worker spoke, what its old worker
still sends is dropped) and the final `InvocationResult`.

Cancellation: `Invoker.cancel` (POST /v1/invocations/<id>/cancel) and a synchronous caller that goes away
(`Call.gone`, from `cancel_when_gone` or the end of an unfinished stream) record a `cancelled` result in the
results stream, de-duplicated like a worker's (`result-<id>`): whichever result is recorded first is the
invocation's outcome, so a cancel that races the end of a generation is answered with what finished. Then
`lora.cancel.<id>` tells the worker running it to abort (slot and KV blocks freed at its next step); a worker
that picks it up later finds the record and never runs it. Asynchronous invocations have no caller waiting,
so only the endpoint cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.bus import NatsLink
from gateway.depths import QueueDepths
from gateway.errors import (
    IdempotencyMismatch,
    InvocationNotFound,
    InvocationTimeout,
    Overloaded,
    Unavailable,
)
from gateway.metrics import GatewayMetrics
from gateway.quotas import Limiter
from gateway.settings import CallbackSettings, LimitSettings
from protocol import subjects
from protocol.messages import (
    CancelInvocation,
    ChatMessage,
    ErrorCode,
    Invocation,
    InvocationError,
    InvocationResult,
    InvocationStarted,
    MessageInvalid,
    Sampling,
    TokenChunk,
)
from protocol.results import record_callback, record_result
from storage import repo
from storage.errors import NotFound
from storage.models import Adapter, InvocationStatus, Tenant
from storage.models import Invocation as InvocationRow

log = logging.getLogger(__name__)

KIND_HEADER = subjects.KIND_HEADER  # workers set it to "chunk" or "result" on the reply subject
MSG_ID_HEADER = subjects.MSG_ID_HEADER
ID_PREFIX = "inv_"
ID_RANDOM_BYTES = 16  # 22 URL-safe characters
# Between publishes to an invocations stream without a leader (a JetStream election takes seconds).
PUBLISH_RETRY_S = 0.25

Event = InvocationStarted | TokenChunk | InvocationResult
Receive = Callable[[], Awaitable[Mapping[str, Any]]]  # an ASGI receive()
# The status a server logs for a request whose client closed the connection first (nobody reads it).
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The HTTP client of a synchronous call went away before its result (the invocation is cancelled)."""

    def __init__(self, invocation_id: str) -> None:
        super().__init__(f"the client of invocation {invocation_id} went away")
        self.invocation_id = invocation_id


class _Gone:
    """Queued into a call when its client went away: `events()` raises ClientGone."""


CancelVerdict = Literal["cancel", "cancelled", "finished"]


def cancel_verdict(row_status: InvocationStatus, recorded: InvocationResult | None) -> CancelVerdict:
    """What a cancel request does to an invocation: "cancel" it (queued or running, no result yet), nothing
    because it is "cancelled" already (a repeated cancel answers as the first did), or nothing because it
    "finished" otherwise (409). The results stream is the outcome when it holds one; the row otherwise (a
    result older than the stream's max age, a row marked failed when its publish failed)."""
    if recorded is not None:
        return "cancelled" if recorded.status == "cancelled" else "finished"
    if row_status == InvocationStatus.cancelled:
        return "cancelled"
    if row_status in (InvocationStatus.succeeded, InvocationStatus.failed):
        return "finished"
    return "cancel"


def new_invocation_id() -> str:
    """A fresh id matching ^[A-Za-z0-9_-]{1,64}$ (a valid subject token)."""
    return ID_PREFIX + secrets.token_urlsafe(ID_RANDOM_BYTES)


def request_hash(*parts: bytes) -> str:
    """Hash of what identifies a request for Idempotency-Key reuse (route and body)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


async def ensure_callback_bucket(js: JetStreamContext, settings: CallbackSettings, *, replicas: int = 1) -> KeyValue:
    """The key-value bucket of callback URLs (invocation id -> URL), created if missing, with `replicas` copies
    (the streams' replicas: LORAFN_NATS__STREAM_REPLICAS)."""
    try:
        return await js.key_value(settings.bucket)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=settings.bucket, ttl=settings.bucket_ttl_s,
                                                        replicas=replicas))


@dataclass(frozen=True)
class Target:
    """What an invocation calls: a tenant's adapter, or the bare backbone (adapter None)."""

    tenant: Tenant
    adapter: Adapter | None

    @property
    def adapter_name(self) -> str:
        return self.adapter.name if self.adapter is not None else subjects.BASE_ADAPTER

    @property
    def subject(self) -> str:
        return subjects.invoke(self.tenant.name, self.adapter_name)

    @property
    def label(self) -> str:
        """`tenant/adapter` (metrics label); the base model is `tenant/_base`."""
        return f"{self.tenant.name}/{self.adapter_name}"

    @property
    def version(self) -> str | None:
        v = self.adapter.current_version if self.adapter is not None else None
        return v.sha256 if v is not None else None


@dataclass(frozen=True)
class InvocationRequest:
    """A validated request, protocol-shaped: a prompt or chat messages, and sampling."""

    prompt: str | None
    messages: list[ChatMessage] | None
    sampling: Sampling


@dataclass
class Call:
    """One synchronous invocation in flight: the worker's events, in order, deduplicated."""

    invocation_id: str
    label: str
    deadline: float  # time.monotonic() after which the call times out
    timeout_s: float
    submitted: float = field(default_factory=time.monotonic)
    tier: str | None = None
    load_ms: float | None = None
    first_token_at: float | None = None
    _queue: asyncio.Queue[Event | _Gone] = field(default_factory=asyncio.Queue)
    _next_index: int = 0
    _epoch: int = 1  # the highest dispatch of the invocation heard from (see InvocationStarted.epoch)
    _done: bool = False
    _ended: bool = False  # the result arrived or the call timed out: nothing to cancel when it closes
    _gone: bool = False
    _subs: list[Subscription] = field(default_factory=list)
    _on_close: list[Any] = field(default_factory=list)
    _on_gone: list[Callable[[], None]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """Whether the call reached its result or its deadline (a call closed before either was abandoned)."""
        return self._ended

    def gone(self) -> None:
        """The client went away before the result: `events()` raises ClientGone, and the invocation is
        cancelled (once; a replayed Idempotency-Key call only stops waiting, the invocation is the first
        caller's). Synchronous, so that it also runs where the request's task is being cancelled."""
        if self._ended or self._gone:
            return
        self._gone = True
        self._queue.put_nowait(_Gone())
        hooks, self._on_gone = self._on_gone, []
        for hook in hooks:
            hook()

    def headers(self) -> dict[str, str]:
        """The x-lorafn-* headers known so far."""
        h = {"x-lorafn-invocation-id": self.invocation_id}
        if self.tier is not None:
            h["x-lorafn-adapter-tier"] = self.tier
        if self.load_ms is not None:
            h["x-lorafn-load-ms"] = f"{self.load_ms:.1f}"
        return h

    def push(self, event: Event) -> None:
        """Queue an event (called from NATS callbacks)."""
        if not self._done:
            self._queue.put_nowait(event)

    async def on_reply(self, msg: Msg) -> None:
        """A message on the call's reply subject: InvocationStarted, a TokenChunk, or the final InvocationResult
        (in that order: one subject, so the worker's order is kept)."""
        try:
            kind = (msg.headers or {}).get(KIND_HEADER)
            event: Event
            if kind == subjects.KIND_RESULT:
                event = InvocationResult.decode(msg.data)
            elif kind == subjects.KIND_STARTED:
                event = InvocationStarted.decode(msg.data)
            else:
                event = TokenChunk.decode(msg.data)
        except MessageInvalid as e:
            log.warning("invocation %s: dropped an undecodable reply (%s)", self.invocation_id, e)
            return
        self.push(event)

    async def on_result(self, msg: Msg) -> None:
        """A message on lora.result.<id> (replays wait on the results subject)."""
        try:
            self.push(InvocationResult.decode(msg.data))
        except MessageInvalid as e:
            log.warning("invocation %s: dropped an undecodable result (%s)", self.invocation_id, e)

    def _note(self, event: Event) -> None:
        if isinstance(event, InvocationStarted | InvocationResult):
            self.tier = event.adapter_tier or self.tier
        if isinstance(event, InvocationStarted) and event.load_ms is not None:
            self.load_ms = event.load_ms
        if isinstance(event, InvocationResult) and event.timings.load_ms is not None:
            self.load_ms = event.timings.load_ms

    async def events(self) -> AsyncIterator[Event]:
        """Started events, new token chunks, then the result (last). InvocationTimeout at the deadline,
        ClientGone once `gone()` was called."""
        while not self._done:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self._ended = True
                raise InvocationTimeout(self.invocation_id, self.timeout_s)
            try:
                event = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                self._ended = True
                raise InvocationTimeout(self.invocation_id, self.timeout_s) from None
            if isinstance(event, _Gone):
                raise ClientGone(self.invocation_id)
            if isinstance(event, InvocationResult) and event.invocation_id != self.invocation_id:
                continue
            if isinstance(event, InvocationStarted | TokenChunk):
                if event.epoch < self._epoch:
                    continue  # a worker the dispatcher gave up on (paused past its heartbeats) still talking
                self._epoch = event.epoch
            self._note(event)
            if isinstance(event, TokenChunk):
                if event.index < self._next_index:
                    continue  # a redelivered generation resending tokens already passed on
                self._next_index = event.index + len(event.token_ids)
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
            elif isinstance(event, InvocationResult):
                self._done = self._ended = True
            yield event

    async def result(self) -> InvocationResult:
        """Wait for the final result (chunks are dropped: the result carries the whole text)."""
        async for event in self.events():
            if isinstance(event, InvocationResult):
                return event
        raise AssertionError("events() ends only after a result")  # pragma: no cover

    async def close(self) -> None:
        """Unsubscribe and release the call's admission slot (idempotent)."""
        self._done = True
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        hooks, self._on_close = self._on_close, []
        for hook in hooks:
            hook()


@contextlib.contextmanager
def cancel_when_gone(call: Call, receive: Receive) -> Iterator[None]:
    """While inside, a disconnect of the call's HTTP client calls `call.gone()` (so whoever waits on the call
    raises ClientGone and the invocation is cancelled). The request body must have been read already: from
    then on the server's `receive()` answers only when the client disconnects."""

    async def watch() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server could not tell; the call goes on
            log.debug("watching the client of %s failed", call.invocation_id, exc_info=True)
            return
        call.gone()

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()


@dataclass(frozen=True)
class Submission:
    """An accepted invocation: a new one, or the first one of its Idempotency-Key (replay)."""

    invocation_id: str
    status: str
    replay: bool
    call: Call | None = None  # set for synchronous submissions


@dataclass(frozen=True)
class InvocationView:
    """What GET /v1/invocations/<id> shows: the row, completed by the results stream."""

    row: InvocationRow
    result: InvocationResult | None

    @property
    def status(self) -> str:
        if self.result is not None:
            return self.result.status
        return InvocationStatus(self.row.status).value


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat() if t is not None else None


class Invoker:
    """Admission, recording and publishing of invocations; routing of replies to their calls."""

    def __init__(
        self,
        *,
        link: NatsLink,
        sessions: async_sessionmaker[AsyncSession],
        rows: AsyncEngine,
        limits: LimitSettings,
        callbacks: CallbackSettings,
        metrics: GatewayMetrics,
        quotas: Limiter | None = None,
    ) -> None:
        self.link = link
        self.quotas = quotas  # per-tenant tokens/min and concurrency (gateway/quotas.py); None: no quotas
        self.sessions = sessions
        self.rows = rows  # autocommit engine of the invocation rows (repo.create_fast_write_engine)
        self.limits = limits
        self.callbacks = callbacks
        self.metrics = metrics
        self.inflight = 0
        self._calls: dict[str, Call] = {}
        # pending invocations per adapter subject, read for all adapters at once (gateway/depths.py)
        self.depths = QueueDepths(interval_s=limits.queue_check_interval_s, max_age_s=limits.queue_depth_max_age_s)
        self._callback_urls: KeyValue | None = None
        self._expiring: set[asyncio.Future[None]] = set()
        self._cancelling: set[asyncio.Future[Any]] = set()  # cancels of calls whose client went away
        self.gateway_id = f"gw-{secrets.token_hex(6)}"
        link.on_connect(self._subscribe_events)

    async def _subscribe_events(self, nc: Client, js: JetStreamContext) -> None:
        self._callback_urls = await ensure_callback_bucket(js, self.callbacks,
                                                           replicas=self.link.settings.stream_replicas)
        await nc.subscribe(subjects.gateway_replies(self.gateway_id), cb=self._on_reply)
        await nc.subscribe(subjects.CANCEL_ALL, cb=self._on_cancel)

    async def _on_reply(self, msg: Msg) -> None:
        call = self._calls.get(msg.subject.rpartition(".")[2])
        if call is not None:
            await call.on_reply(msg)

    async def _on_cancel(self, msg: Msg) -> None:
        """A cancel of a call this gateway holds (cancelled through another request, maybe on another gateway):
        answer its caller now rather than when a worker picks the cancelled invocation up."""
        call = self._calls.get(msg.subject.rpartition(".")[2])
        if call is None:
            return
        try:
            reason = CancelInvocation.decode(msg.data).reason
        except MessageInvalid:
            reason = "cancelled"
        call.push(cancelled_result(call.invocation_id, reason))

    # -- admission -------------------------------------------------------------------------------

    def _bus(self) -> tuple[Client, JetStreamContext]:
        if not self.link.connected or self.link.nc is None or self.link.js is None:
            raise Unavailable("nats", "not connected", self.limits.unavailable_retry_after_s)
        return self.link.nc, self.link.js

    async def _admit(self, js: JetStreamContext, target: Target) -> None:
        limits = self.limits
        if self.inflight >= limits.max_inflight:
            self.metrics.rejections.labels("gateway_busy").inc()
            raise Overloaded("this gateway", self.inflight, limits.max_inflight, limits.retry_after_s)
        try:
            depth = await self.depths.depth(js, target.subject)
        except (nats.errors.Error, TimeoutError) as e:
            raise Unavailable("nats", f"cannot read the queue depth ({e!r})", limits.unavailable_retry_after_s) from e
        if depth >= limits.max_queue_per_adapter:
            self.metrics.rejections.labels("queue_full").inc()
            raise Overloaded(f"the queue of {target.label}", depth, limits.max_queue_per_adapter,
                             limits.retry_after_s)

    # -- submission ------------------------------------------------------------------------------

    async def _find_idempotent(self, session: AsyncSession, target: Target, key: str,
                               body_hash: str) -> Submission | None:
        row = await repo.find_idempotent_invocation(session, tenant=target.tenant, key=key)
        if row is None:
            return None
        if row.request_hash != body_hash:
            raise IdempotencyMismatch(key, row.id)
        return Submission(row.id, InvocationStatus(row.status).value, replay=True)

    async def _record(self, target: Target, invocation_id: str, key: str | None, body_hash: str) -> Submission | None:
        """Insert the row; on an Idempotency-Key race return the winner's submission instead."""
        try:
            # One statement, one round trip; the invocation is durable in JetStream once published, so its
            # row skips the WAL flush (see repo.create_fast_write_engine).
            await repo.insert_invocation(
                self.rows, invocation_id=invocation_id, tenant=target.tenant, adapter=target.adapter,
                idempotency_key=key, request_hash=body_hash,
            )
        except IntegrityError:
            if key is None:
                raise
            async with self.sessions() as session:
                found = await self._find_idempotent(session, target, key, body_hash)
            if found is None:
                raise
            return found
        return None

    async def submit(
        self,
        target: Target,
        request: InvocationRequest,
        *,
        sync: bool,
        stream: bool,
        body_hash: str,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> Submission:
        """Admit, record and publish an invocation (or find the first one of its Idempotency-Key)."""
        _, js = self._bus()
        if idempotency_key is not None:
            async with self.sessions() as session:
                found = await self._find_idempotent(session, target, idempotency_key, body_hash)
            if found is not None:
                return await self._replay(found, target, sync)
        await self._admit(js, target)
        if self.quotas is not None:
            self.quotas.check_invocation(target.tenant, time.monotonic())  # 429 before anything is written
        invocation_id = new_invocation_id()
        if callback_url is not None:  # before the row: a stray URL of an unused id expires harmlessly
            await self._remember_callback(js, invocation_id, callback_url)
        found = await self._record(target, invocation_id, idempotency_key, body_hash)
        if found is not None:
            return await self._replay(found, target, sync)
        self.inflight += 1
        self.metrics.inflight.inc()
        if self.quotas is not None:  # in flight for its tenant until its result reaches this gateway
            self.quotas.acquire(target.tenant, invocation_id, time.monotonic())
        call: Call | None = None
        try:
            if sync:
                call = self._new_call(invocation_id, target)
            message = Invocation(
                id=invocation_id, tenant=target.tenant.name, adapter=target.adapter.name if target.adapter else None,
                version=target.version, prompt=request.prompt, messages=request.messages,
                sampling=request.sampling, stream=sync and stream,
                reply_to=subjects.gateway_reply(self.gateway_id, invocation_id, tenant=target.tenant.name)
                if sync else None,
                callback_url=callback_url,
            )
            await self._publish(js, target, message)
        except BaseException as e:
            if self.quotas is not None:
                self.quotas.forget(invocation_id)
            if call is not None:
                await call.close()  # releases the slot
            else:
                self._release()
            if isinstance(e, Exception):
                await self._mark_failed(invocation_id, ErrorCode.unavailable, f"not published: {e!r}")
            raise
        self.depths.added(target.subject)  # pending now, until the next read of the stream
        if call is None:
            self._release()
            self.metrics.invocations.labels(target.label, "queued").inc()
        return Submission(invocation_id, InvocationStatus.queued.value, replay=False, call=call)

    def _release(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()

    def _new_call(self, invocation_id: str, target: Target, *, cancel_when_gone: bool = True) -> Call:
        timeout = self.limits.sync_timeout_s
        call = Call(invocation_id, target.label, deadline=time.monotonic() + timeout, timeout_s=timeout)
        self._calls[invocation_id] = call
        if cancel_when_gone:
            call._on_gone.append(lambda: self._cancel_abandoned(call, target.tenant.name))

        def forget() -> None:
            self._calls.pop(invocation_id, None)
            self._release()

        # Safety net: a call nobody closes (a stream whose client vanished before it began) still gives its
        # admission slot back shortly after its deadline.
        timer = asyncio.get_running_loop().call_later(timeout + 5.0, self._expire, call)
        call._on_close.append(forget)
        call._on_close.append(timer.cancel)
        return call

    def _expire(self, call: Call) -> None:
        task = asyncio.ensure_future(call.close())
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _publish(self, js: JetStreamContext, target: Target, message: Invocation) -> None:
        """Publish and await the ack, within `publish_timeout_s`. A stream without a leader (an election, after
        the server that led it died) answers at once with no responders: the publish is tried again until the
        timeout (the message id de-duplicates a copy that was stored after all)."""
        deadline = time.monotonic() + self.limits.publish_timeout_s
        while True:
            try:
                await js.publish(
                    target.subject, message.encode(), timeout=max(deadline - time.monotonic(), 0.1),
                    stream=subjects.INVOCATIONS_STREAM, headers={MSG_ID_HEADER: message.id},
                )
                return
            except NoStreamResponseError as e:
                if time.monotonic() + PUBLISH_RETRY_S < deadline:
                    await asyncio.sleep(PUBLISH_RETRY_S)
                    continue
                raise Unavailable("nats", f"publishing the invocation failed ({e!r}): the invocations stream has "
                                  "no leader", self.limits.unavailable_retry_after_s) from e
            except (nats.errors.Error, TimeoutError, OSError) as e:
                raise Unavailable("nats", f"publishing the invocation failed ({e!r})",
                                  self.limits.unavailable_retry_after_s) from e

    async def _mark_failed(self, invocation_id: str, code: ErrorCode, message: str) -> None:
        """Best effort: a row whose publish failed must not stay queued for ever."""
        try:
            async with self.sessions() as session, session.begin():
                await repo.update_invocation(
                    session, invocation_id=invocation_id, status=InvocationStatus.failed,
                    finished_at=datetime.now(UTC), error=f"{code.value}: {message}",
                )
        except Exception:
            log.warning("could not mark invocation %s failed", invocation_id, exc_info=True)

    async def _remember_callback(self, js: JetStreamContext, invocation_id: str, url: str) -> None:
        try:
            kv = self._callback_urls or await ensure_callback_bucket(
                js, self.callbacks, replicas=self.link.settings.stream_replicas)
            await kv.put(invocation_id, url.encode())
        except (nats.errors.Error, TimeoutError) as e:
            raise Unavailable("nats", f"cannot record the callback URL ({e!r})",
                              self.limits.unavailable_retry_after_s) from e

    async def _replay(self, found: Submission, target: Target, sync: bool) -> Submission:
        """The first invocation of an Idempotency-Key: async callers get its status; sync callers wait for
        its result (already in the results stream, or when it arrives there). Nothing is generated again."""
        if not sync:
            view = await self.lookup(target.tenant, found.invocation_id)
            return Submission(found.invocation_id, view.status, replay=True)
        nc, _ = self._bus()
        self.inflight += 1
        self.metrics.inflight.inc()
        call = self._new_call(found.invocation_id, target, cancel_when_gone=False)
        try:
            call._subs.append(await nc.subscribe(subjects.result(found.invocation_id), cb=call.on_result))
            recorded = await self._recorded_result(found.invocation_id)
        except BaseException:
            await call.close()
            raise
        if recorded is not None:
            call.push(recorded)
        return Submission(found.invocation_id, found.status, replay=True, call=call)

    def observe(self, call: Call, result: InvocationResult) -> None:
        """Record a finished synchronous call in the metrics."""
        self.metrics.observe_result(call.label, result)
        self.metrics.latency.labels(call.label).observe(time.monotonic() - call.submitted)
        if call.first_token_at is not None:
            self.metrics.ttft.labels(call.label).observe(call.first_token_at - call.submitted)
        elif result.timings.first_token_ms is not None:
            self.metrics.ttft.labels(call.label).observe(result.timings.first_token_ms / 1000.0)

    # -- cancelling ------------------------------------------------------------------------------

    def _cancel_abandoned(self, call: Call, tenant: str) -> None:
        """The client of a synchronous call went away: cancel its invocation in the background (the request's
        own task may be being cancelled)."""
        self.metrics.invocations.labels(call.label, "cancelled").inc()
        task = asyncio.ensure_future(self._cancel_quietly(call.invocation_id, tenant))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def _cancel_quietly(self, invocation_id: str, tenant: str) -> None:
        try:
            result = await self._record_cancel(invocation_id, tenant, "the client went away before the result")
        except Unavailable as e:  # the generation runs to its end; its result is recorded as usual
            log.warning("could not cancel invocation %s whose client went away: %s", invocation_id, e)
            return
        log.info("invocation %s cancelled: its client went away (outcome %s)", invocation_id, result.status)

    async def cancel(self, tenant: Tenant, invocation_id: str) -> tuple[CancelVerdict, InvocationView]:
        """POST /v1/invocations/<id>/cancel: cancel an invocation of `tenant` that has not finished. The verdict
        (see `cancel_verdict`; "cancel" when this request cancelled it) and the invocation as it is now.
        InvocationNotFound for an id of another tenant."""
        view = await self.lookup(tenant, invocation_id)
        verdict = cancel_verdict(InvocationStatus(view.row.status), view.result)
        if verdict != "cancel":
            return verdict, view
        result = await self._record_cancel(invocation_id, tenant.name, "cancelled through the API")
        if result.status != "cancelled":  # it finished between the lookup and the cancel
            return "finished", InvocationView(view.row, result)
        return "cancel", InvocationView(view.row, result)

    async def _record_cancel(self, invocation_id: str, tenant: str, reason: str) -> InvocationResult:
        """Record the invocation of `tenant` cancelled unless a result is recorded first, then tell its worker
        to stop; the invocation's outcome (this cancel, or the result recorded before it)."""
        nc, js = self._bus()
        result = cancelled_result(invocation_id, reason)
        payload = result.encode()
        timeout = self.limits.publish_timeout_s
        headers = {subjects.TENANT_HEADER: tenant}  # whose call the record answers (as a worker's records)
        try:
            if not await record_result(js, invocation_id, payload, callback=False, timeout=timeout, headers=headers):
                return await self._recorded_result(invocation_id) or result
            if await self._callback_url(js, invocation_id) is not None:
                await record_callback(js, invocation_id, payload, timeout=timeout, headers=headers)
            await nc.publish(subjects.cancel(invocation_id),
                             CancelInvocation(invocation_id=invocation_id, reason=reason).encode())
        except (nats.errors.Error, TimeoutError) as e:
            raise Unavailable("nats", f"recording the cancel of {invocation_id} failed ({e!r})",
                              self.limits.unavailable_retry_after_s) from e
        return result

    async def _callback_url(self, js: JetStreamContext, invocation_id: str) -> str | None:
        kv = self._callback_urls or await ensure_callback_bucket(
            js, self.callbacks, replicas=self.link.settings.stream_replicas)
        try:
            entry = await kv.get(invocation_id)
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode()

    # -- reading ---------------------------------------------------------------------------------

    async def _recorded_result(self, invocation_id: str) -> InvocationResult | None:
        """The invocation's result in the results stream, if it is there (and NATS answers)."""
        js = self.link.js
        if js is None or not self.link.connected:
            return None
        try:
            raw = await js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(invocation_id))
        except NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError):
            log.warning("could not read the result of %s from the results stream", invocation_id)
            return None
        try:
            return InvocationResult.decode(raw.data or b"")
        except MessageInvalid:
            return None

    async def lookup(self, tenant: Tenant, invocation_id: str) -> InvocationView:
        """The invocation's row (of this tenant only) and its result if one is recorded."""
        if not subjects.ID_PATTERN.match(invocation_id):
            raise InvocationNotFound(invocation_id)
        try:
            async with self.sessions() as session:
                row = await repo.get_invocation(session, invocation_id=invocation_id, tenant=tenant)
        except NotFound:
            raise InvocationNotFound(invocation_id) from None
        # The result carries the output, so read it even for a terminal row (the row has no text).
        return InvocationView(row, await self._recorded_result(invocation_id))


def invocation_json(view: InvocationView) -> dict[str, Any]:
    """The body of GET /v1/invocations/<id>."""
    row, result = view.row, view.result
    body: dict[str, Any] = {
        "id": row.id,
        "object": "invocation",
        "status": view.status,
        "result": None,
        "error": None,
        "submitted_at": _iso(row.submitted_at),
        "started_at": _iso(row.started_at),
        "first_token_at": _iso(row.first_token_at),
        "finished_at": _iso(row.finished_at),
    }
    if result is not None:
        body.update(result_json(result))
        body.pop("id", None)
        body["id"] = row.id
    elif row.error:
        code, sep, message = row.error.partition(": ")
        body["error"] = {"code": code if sep and code in ErrorCode.__members__ else ErrorCode.internal.value,
                         "message": message if sep else row.error}
    return body


def cancelled_result(invocation_id: str, reason: str) -> InvocationResult:
    """The result a cancel records (a worker that ran the invocation records its own, with what it generated,
    when it got there first)."""
    return InvocationResult(invocation_id=invocation_id, status="cancelled", finish_reason="abort",
                            error=InvocationError(code=ErrorCode.cancelled, message=reason))


def result_json(result: InvocationResult) -> dict[str, Any]:
    """A result as the FaaS API shows it: {id, status, output|error, usage, timings}."""
    usage = result.usage
    body: dict[str, Any] = {
        "id": result.invocation_id,
        "status": result.status,
        "result": None,
        "error": None,
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens},
        "timings": result.timings.model_dump(),
        "adapter_tier": result.adapter_tier,
        "attempt": result.attempt,
    }
    if result.status == "succeeded":
        output = {"text": result.text, "finish_reason": result.finish_reason}
        body["output"] = output
        body["result"] = output
    else:
        error = result.error or InvocationError(code=ErrorCode.internal, message="the invocation failed")
        body["error"] = {"code": error.code.value, "message": error.message}
    return body
