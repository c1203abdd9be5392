"""The worker service: NATS consumer of invocations, adapter tiers, control verbs, heartbeats.

One process holds ONE backbone and one engine (run in its own thread, see `workers.engine_thread`);
this module is the asyncio side:

- pulls invocations from the shared durable consumer of the bare backbone (`invoke-base`) and from the
  consumer of every adapter it holds on the device (one durable consumer per adapter, shared by every
  worker holding it), at most `consumer.max_inflight` at a time;
- for each: returns the recorded result if the results stream already has one (a redelivery after the
  result was recorded), else brings its adapter to the device (cold start if needed), publishes
  `InvocationStarted`, generates, streams `TokenChunk`s to the caller's reply subject, records the
  `InvocationResult` in the results stream (deduplicated by `Nats-Msg-Id: result-<id>`), sends it to the
  reply subject, and only then acks. In-progress acks keep a long generation from being redelivered;
- answers the control verbs fetch / load / evict / drain on `lora.ctl.<worker id>.<verb>`;
- publishes a `Heartbeat` every `heartbeat_s`;
- on stop (SIGTERM): stops pulling, gives running invocations `drain_timeout_s` to finish, aborts and
  NAKs the rest (redelivered elsewhere at once), sends a last heartbeat with draining=true, drains NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

from protocol import subjects
from protocol.messages import (
    BASE_ADAPTER,
    ControlReply,
    ControlRequest,
    ControlVerb,
    ErrorCode,
    Heartbeat,
    Invocation,
    InvocationError,
    InvocationResult,
    InvocationStarted,
    MessageInvalid,
    ResidentAdapter,
    Timings,
    TokenChunk,
    Usage,
)
from protocol.results import record_result
from protocol.streams import ensure_streams
from storage.objectstore import ObjectStore
from workers.batcher import Completion, FinishReason, TokenEvent
from workers.engine import EmptyPrompt, Engine, EngineError, PromptTooLong
from workers.engine_thread import EngineThread, StepFailed
from workers.host_cache import HostCache
from workers.sampling import SamplingParams, SamplingParamsInvalid
from workers.settings import WorkerSettings
from workers.tiers import AdapterTiers, AdapterUnavailable
from workers.tokenizer import Tokenizer, TokenizerError
from workers.weights import load_backbone

logger = logging.getLogger(__name__)

# Header of every message on a reply subject: which message type the payload is.
KIND_HEADER = subjects.KIND_HEADER


def default_worker_id() -> str:
    """<host>-<pid>, reduced to the subject-token alphabet."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:48]
    return f"{host or 'worker'}-{os.getpid()}"


def invocation_seed(invocation_id: str) -> int:
    """The sampling seed of an invocation that gives none: derived from its id, so that a redelivered
    invocation samples the same tokens again."""
    return int.from_bytes(hashlib.sha256(invocation_id.encode()).digest()[:8], "big") >> 1


class InvocationFailed(Exception):
    """An invocation that cannot succeed (terminal: a failed result is recorded and the message acked)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Retry(Exception):
    """An invocation to hand back (NAK) so that it is delivered again, here or elsewhere."""

    def __init__(self, reason: str, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


@dataclass
class _Running:
    """An invocation being generated on this worker."""

    invocation: Invocation
    request_id: str | None = None
    aborted: bool = False


class WorkerService:
    """One worker: call `run(stop)`; it returns after a clean drain once `stop` is set."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        worker_id: str,
        engine: EngineThread,
        tiers: AdapterTiers,
        device: str,
    ) -> None:
        self.settings = settings
        self.worker_id = subjects.check_name("worker", worker_id)
        self.engine = engine
        self.tiers = tiers
        self.tokenizer = engine.engine.tokenizer
        self.device = device
        self.host = socket.gethostname()
        self.started_at = time.time()
        self.draining = False
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self._slots = asyncio.Semaphore(settings.consumer.max_inflight)
        self._pullers: dict[str, asyncio.Task[None]] = {}  # consumer name -> pull loop
        self._adapter_consumers: dict[str, tuple[str, str]] = {}  # consumer -> (tenant, adapter)
        self._current: dict[tuple[str, str], str] = {}  # (tenant, adapter) -> version loaded by `load`
        self._names: dict[str, tuple[str, str]] = {}  # version -> (tenant, adapter)
        self._handlers: set[asyncio.Task[None]] = set()
        self._running: dict[str, _Running] = {}
        self._pending_submit = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        tiers.on_evicted = self._on_evicted

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain and return."""
        async with AsyncExitStack() as stack:
            self.nc = await nats.connect(
                self.settings.nats.url,
                connect_timeout=self.settings.nats.connect_timeout_s,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                name=f"lorafn-worker-{self.worker_id}",
            )
            stack.push_async_callback(self._close_nats)
            self.js = self.nc.jetstream()
            await ensure_streams(self.js)
            for verb in ControlVerb:
                await self.nc.subscribe(subjects.control(self.worker_id, verb.value), cb=self._on_control)
            heartbeats = asyncio.create_task(self._heartbeat_loop(stop), name="heartbeats")
            stack.push_async_callback(self._cancel, heartbeats)
            self._start_puller(subjects.BASE_CONSUMER, subjects.base_invocations())
            logger.info("worker %s ready on %s (%d adapter pages)", self.worker_id, self.device,
                        self.tiers.total_pages)
            await stop.wait()
            await self._drain()

    async def _close_nats(self) -> None:
        assert self.nc is not None
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    @staticmethod
    async def _cancel(task: asyncio.Task[Any]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _drain(self) -> None:
        """Stop pulling, let running invocations finish (bounded), NAK the rest, say goodbye."""
        logger.info("worker %s draining: %d invocations running", self.worker_id, len(self._handlers))
        self.draining = True
        await self._stop_pulling()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=self.settings.drain_timeout_s)
            if pending:
                logger.warning("%d invocations did not finish in %.0f s; handing them back",
                               len(pending), self.settings.drain_timeout_s)
                for running in list(self._running.values()):
                    running.aborted = True
                    if running.request_id is not None:
                        with contextlib.suppress(Exception):
                            await self.engine.abort(running.request_id)
                await asyncio.wait(pending, timeout=10.0)
        await self._publish_heartbeat()
        for task in list(self._tasks):
            task.cancel()

    async def _stop_pulling(self) -> None:
        pullers = list(self._pullers.values())
        self._pullers.clear()
        for task in pullers:
            task.cancel()
        await asyncio.gather(*pullers, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- pulling -----------------------------------------------------------------------------------------

    def _consumer_config(self, durable: str, filter_subject: str) -> ConsumerConfig:
        c = self.settings.consumer
        return ConsumerConfig(
            durable_name=durable,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=c.ack_wait_s,
            max_deliver=c.max_deliver,
            max_ack_pending=-1,
        )

    def _start_puller(self, durable: str, filter_subject: str) -> None:
        if durable in self._pullers or self.draining:
            return
        self._pullers[durable] = asyncio.create_task(self._pull(durable, filter_subject), name=f"pull-{durable}")

    def _stop_puller(self, durable: str) -> None:
        task = self._pullers.pop(durable, None)
        if task is not None:
            task.cancel()
            logger.info("stopped pulling %s", durable)

    async def _pull(self, durable: str, filter_subject: str) -> None:
        """Pull invocations one at a time while a slot is free; each runs in its own task."""
        assert self.js is not None
        c = self.settings.consumer
        sub = None
        while sub is None:
            try:
                sub = await self.js.pull_subscribe(
                    filter_subject, durable=durable, stream=subjects.INVOCATIONS_STREAM,
                    config=self._consumer_config(durable, filter_subject),
                )
            except (nats.errors.Error, nats.js.errors.Error, OSError) as e:
                logger.warning("cannot subscribe to consumer %s yet (%s); retrying", durable, e)
                await asyncio.sleep(1.0)
        logger.info("pulling %s (%s)", durable, filter_subject)
        try:
            while True:
                await self._slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=c.fetch_timeout_s)
                except nats.errors.TimeoutError:
                    self._slots.release()
                    continue
                except (nats.errors.Error, nats.js.errors.Error, OSError) as e:
                    self._slots.release()
                    logger.debug("pull from %s failed (%s); retrying", durable, e)
                    await asyncio.sleep(0.5)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                for i, msg in enumerate(msgs):
                    if i > 0:
                        await self._slots.acquire()
                    task = asyncio.create_task(self._handle(msg), name=f"invocation-{durable}")
                    self._handlers.add(task)
                    task.add_done_callback(self._handler_done)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()

    # -- one invocation ----------------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        """Run one delivered invocation to its recorded result (or hand it back)."""
        try:
            inv = Invocation.decode(msg.data)
        except MessageInvalid as e:
            logger.error("dropping an undecodable invocation on %s: %s", msg.subject, e)
            await msg.term()
            return
        attempt = msg.metadata.num_delivered or 1
        arrived_at = self._arrival(msg, inv)
        ticker = asyncio.create_task(self._keep_alive(msg), name=f"in-progress-{inv.id}")
        try:
            existing = await self._recorded_result(inv.id)
            if existing is not None:
                logger.info("invocation %s already has a result; sending it again", inv.id)
                if inv.callback_url is not None:
                    try:
                        await self._record(inv, existing)
                    except Exception as e:
                        raise Retry(f"cannot record the callback copy: {e}", self.settings.consumer.retry_delay_s) from e
                await self._reply(inv, existing, subjects.KIND_RESULT)
                await msg.ack()
                return
            result = await self._execute(inv, attempt, arrived_at)
        except Retry as e:
            logger.info("invocation %s (attempt %d) handed back: %s", inv.id, attempt, e)
            with contextlib.suppress(Exception):
                await msg.nak(delay=e.delay_s)
            return
        except Exception as e:
            logger.exception("invocation %s failed with an internal error", inv.id)
            result = self._failed(inv, attempt, ErrorCode.internal, f"{type(e).__name__}: {e}")
        finally:
            ticker.cancel()
        try:
            await self._record(inv, result.encode())
        except Exception as e:
            logger.warning("could not record the result of %s (%s); handing it back", inv.id, e)
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        await self._reply(inv, result.encode(), subjects.KIND_RESULT)
        with contextlib.suppress(Exception):
            await msg.ack()

    @staticmethod
    def _arrival(msg: Msg, inv: Invocation) -> float:
        """Unix seconds the invocations stream stored the message (the invocation's arrival in lorafn; a
        redelivery keeps it), else the submitter's `submitted_at`."""
        try:
            return msg.metadata.timestamp.timestamp()
        except Exception:
            return inv.submitted_at

    async def _keep_alive(self, msg: Msg) -> None:
        """In-progress acks while the invocation runs, so ack_wait does not redeliver it."""
        while True:
            await asyncio.sleep(self.settings.consumer.in_progress_every_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _recorded_result(self, invocation_id: str) -> bytes | None:
        assert self.js is not None
        try:
            raw = await self.js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(invocation_id))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise Retry(f"cannot read the results stream: {e}", self.settings.consumer.retry_delay_s) from e
        return raw.data

    async def _record(self, inv: Invocation, payload: bytes) -> None:
        """Publish the encoded result (and its callback copy) to the results stream and wait for the acks,
        retrying through reconnects. Idempotent: a redelivered invocation whose result exists calls it again
        in case the callback copy was not published before a crash."""
        assert self.js is not None
        deadline = time.monotonic() + self.settings.consumer.ack_wait_s
        while True:
            try:
                await record_result(self.js, inv.id, payload, callback=inv.callback_url is not None)
                return
            except (nats.errors.Error, nats.js.errors.Error) as e:
                if time.monotonic() > deadline:
                    raise
                logger.debug("recording the result of %s failed (%s); retrying", inv.id, e)
                await asyncio.sleep(0.5)

    async def _reply(self, inv: Invocation, payload: bytes, kind: str) -> None:
        if inv.reply_to is None or self.nc is None:
            return
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(inv.reply_to, payload, headers={KIND_HEADER: kind})

    def _failed(self, inv: Invocation, attempt: int, code: ErrorCode, message: str,
                tier: str | None = None) -> InvocationResult:
        return InvocationResult(
            invocation_id=inv.id, status="failed", worker_id=self.worker_id, attempt=attempt,
            adapter_tier=tier,  # type: ignore[arg-type]
            error=InvocationError(code=code, message=message),
            timings=Timings(total_ms=(time.time() - inv.submitted_at) * 1e3),
        )

    def _version_of(self, inv: Invocation) -> str | None:
        """The adapter version an invocation needs (None: the bare backbone)."""
        if inv.adapter is None or inv.adapter == BASE_ADAPTER:
            return None
        if inv.version is not None:
            self._names.setdefault(inv.version, (inv.tenant, inv.adapter))
            return inv.version
        current = self._current.get((inv.tenant, inv.adapter))
        if current is None:
            raise InvocationFailed(
                ErrorCode.not_found,
                f"adapter {inv.tenant}/{inv.adapter}: the invocation names no version and this worker was "
                "never told to load one",
            )
        return current

    async def _bring_to_device(self, sha: str, arrived_at: float) -> tuple[str, float]:
        """Load `sha` if needed and pin it; (tier on arrival, load ms).

        An adapter already on the device may have been loaded for this very invocation: the scheduler
        places an adapter when its first invocation is published, and the worker pulls that invocation only
        after the load. Such an invocation still paid the cold start, so it reports where the adapter was
        when the invocation arrived and the part of the load it waited for (`AdapterTiers.arrival`)."""
        tier = self.tiers.tier(sha)
        load_ms = 0.0
        for _ in range(3):
            try:
                load_ms += await self.tiers.load(sha)
            except AdapterUnavailable as e:
                if e.terminal:
                    raise InvocationFailed(e.code, str(e)) from e
                raise Retry(str(e), self.settings.consumer.retry_delay_s) from e
            if self.tiers.acquire(sha):  # no await since load returned: nothing evicted it meanwhile
                if tier == "device":
                    return self.tiers.arrival(sha, arrived_at)
                return tier, load_ms
        raise Retry(f"adapter {sha} was evicted while loading", self.settings.consumer.retry_delay_s)

    def _prompt_ids(self, inv: Invocation) -> list[int]:
        if self.tokenizer is None:
            raise InvocationFailed(ErrorCode.internal, "this worker's engine has no tokenizer")
        try:
            if inv.messages:
                return self.tokenizer.encode_chat([m.model_dump() for m in inv.messages])
            if inv.prompt is not None:
                return self.tokenizer.encode(inv.prompt)
        except TokenizerError as e:
            raise InvocationFailed(ErrorCode.bad_request, str(e)) from e
        raise InvocationFailed(ErrorCode.bad_request, "an invocation needs a prompt or messages")

    @staticmethod
    def _params(inv: Invocation) -> SamplingParams:
        s = inv.sampling
        seed = s.seed if s.seed is not None else invocation_seed(inv.id)
        try:
            return SamplingParams(
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed, max_tokens=s.max_tokens,
                stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
            )
        except SamplingParamsInvalid as e:
            raise InvocationFailed(ErrorCode.bad_request, str(e)) from e

    async def _execute(self, inv: Invocation, attempt: int, arrived_at: float | None = None) -> InvocationResult:
        """Generate one invocation; its result (succeeded, or failed for a terminal reason)."""
        tier: str | None = None
        sha: str | None = None
        try:
            sha = self._version_of(inv)
            load_ms: float | None = None
            if sha is not None:
                tier, load_ms = await self._bring_to_device(
                    sha, arrived_at if arrived_at is not None else inv.submitted_at)
            try:
                return await self._generate(inv, attempt, sha, tier, load_ms)
            finally:
                if sha is not None:
                    self.tiers.release(sha)
        except InvocationFailed as e:
            logger.info("invocation %s failed (%s): %s", inv.id, e.code, e)
            return self._failed(inv, attempt, e.code, str(e), tier)

    async def _generate(
        self, inv: Invocation, attempt: int, sha: str | None, tier: str | None, load_ms: float | None
    ) -> InvocationResult:
        assert self.nc is not None
        started = time.time()
        event = InvocationStarted(
            invocation_id=inv.id, worker_id=self.worker_id, attempt=attempt, started_at=started,
            adapter_tier=tier, load_ms=load_ms,  # type: ignore[arg-type]
        ).encode()
        await self.nc.publish(subjects.invocation_event("started"), event)  # the scheduler's record
        # The caller gets it on its reply subject, where it arrives before the first chunk: the gateway sends
        # the adapter's tier in the response headers, which leave with the first event.
        await self._reply(inv, event, subjects.KIND_STARTED)
        prompt_ids = self._prompt_ids(inv)
        params = self._params(inv)
        request_id = f"{inv.id}#{attempt}"
        running = _Running(inv)
        self._running[inv.id] = running
        self._pending_submit += 1
        try:
            try:
                generation = await self.engine.submit(prompt_ids, adapter=sha, params=params, request_id=request_id)
            except PromptTooLong as e:
                raise InvocationFailed(ErrorCode.prompt_too_long, str(e)) from e
            except (EmptyPrompt, EngineError) as e:
                raise InvocationFailed(ErrorCode.bad_request, str(e)) from e
            finally:
                self._pending_submit -= 1
            running.request_id = request_id
            if running.aborted:
                await self.engine.abort(request_id)
            completion, first_token_at = await self._stream(inv, generation.items)
        finally:
            self._running.pop(inv.id, None)
        if completion.finish_reason == FinishReason.ABORT:
            raise Retry("aborted while draining")
        ended = time.time()
        return InvocationResult(
            invocation_id=inv.id,
            status="succeeded",
            text=completion.text,
            token_ids=completion.token_ids,
            finish_reason=completion.finish_reason.value,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=len(completion.token_ids)),
            timings=Timings(
                queued_ms=(started - inv.submitted_at) * 1e3,
                load_ms=load_ms,
                first_token_ms=(first_token_at - inv.submitted_at) * 1e3 if first_token_at else None,
                total_ms=(ended - inv.submitted_at) * 1e3,
            ),
            worker_id=self.worker_id,
            adapter_tier=tier,  # type: ignore[arg-type]
            attempt=attempt,
        )

    async def _stream(
        self, inv: Invocation, items: asyncio.Queue[list[TokenEvent] | Completion | BaseException]
    ) -> tuple[Completion, float | None]:
        """Forward each step's tokens as one chunk until the completion arrives."""
        index = 0
        first_token_at: float | None = None
        while True:
            item = await items.get()
            if isinstance(item, Completion):
                return item, first_token_at
            if isinstance(item, StepFailed):
                raise InvocationFailed(ErrorCode.internal, str(item))
            if isinstance(item, BaseException):
                raise item
            token_ids = [e.token_id for e in item if e.token_id is not None]
            if not token_ids:
                continue
            if first_token_at is None:
                first_token_at = time.time()
            if inv.stream:
                chunk = TokenChunk(invocation_id=inv.id, index=index, token_ids=token_ids,
                                   text="".join(e.text for e in item))
                await self._reply(inv, chunk.encode(), subjects.KIND_CHUNK)
            index += len(token_ids)

    # -- control -----------------------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        self._spawn(self._control(msg), f"control-{msg.subject}")

    async def _control(self, msg: Msg) -> None:
        try:
            request = ControlRequest.decode(msg.data)
            reply = await asyncio.wait_for(self.control(request), timeout=self.settings.control_timeout_s)
        except MessageInvalid as e:
            reply = ControlReply(ok=False, error=InvocationError(code=ErrorCode.bad_request, message=str(e)))
        except TimeoutError:
            reply = ControlReply(ok=False, error=InvocationError(
                code=ErrorCode.timeout, message=f"not done in {self.settings.control_timeout_s} s"))
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(reply.encode())

    async def control(self, request: ControlRequest) -> ControlReply:
        """Run one control verb (each is idempotent)."""
        verb = request.verb
        if verb == ControlVerb.drain:
            self.draining = True
            await self._stop_pulling()
            return ControlReply(ok=True)
        sha = request.version
        if sha is None:
            return ControlReply(ok=False, error=InvocationError(
                code=ErrorCode.bad_request, message=f"{verb.value} needs the adapter version"))
        if request.tenant is not None and request.adapter is not None:
            self._names[sha] = (request.tenant, request.adapter)
        try:
            if verb == ControlVerb.fetch:
                ms = await self.tiers.fetch(sha)
                return ControlReply(ok=True, tier=self.tiers.tier(sha), load_ms=ms)
            if verb == ControlVerb.load:
                if self.draining:
                    return ControlReply(ok=False, tier=self.tiers.tier(sha), error=InvocationError(
                        code=ErrorCode.unavailable, message=f"worker {self.worker_id} is draining"))
                ms = await self.tiers.load(sha)
                if request.tenant is not None and request.adapter is not None:
                    self._hold(request.tenant, request.adapter, sha)
                return ControlReply(ok=True, tier=self.tiers.tier(sha), load_ms=ms)
            tier = await self.tiers.evict(sha, tier=request.tier or "device")
            return ControlReply(ok=True, tier=tier)
        except AdapterUnavailable as e:
            if verb == ControlVerb.load and e.terminal and request.tenant is not None and request.adapter is not None:
                # Pull its invocations anyway: each fails with this error on arrival instead of waiting
                # in the stream for a worker that can never load the adapter.
                self._hold(request.tenant, request.adapter, sha)
            return ControlReply(ok=False, tier=self.tiers.tier(sha),
                                error=InvocationError(code=e.code, message=str(e)))

    def _hold(self, tenant: str, adapter: str, sha: str) -> None:
        """This worker holds `tenant/adapter` at version `sha`: pull its invocations."""
        self._current[(tenant, adapter)] = sha
        durable = subjects.consumer_name(tenant, adapter)
        self._adapter_consumers[durable] = (tenant, adapter)
        self._start_puller(durable, subjects.invoke(tenant, adapter))

    def _on_evicted(self, sha: str) -> None:
        """An adapter left the device: stop pulling the consumers whose current version it was."""
        for durable, name in list(self._adapter_consumers.items()):
            if self._current.get(name) == sha:
                self._stop_puller(durable)
                del self._adapter_consumers[durable]

    # -- heartbeats --------------------------------------------------------------------------------------

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                await self._publish_heartbeat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.heartbeat_s)

    def heartbeat(self) -> Heartbeat:
        """This worker's state now."""
        waiting, running = self.engine.counts()
        resident: list[ResidentAdapter] = []
        for entry in self.tiers.device.values():
            name = self._names.get(entry.sha256)
            if name is not None:
                resident.append(ResidentAdapter(
                    tenant=name[0], adapter=name[1], version=entry.sha256, tier="device", pages=entry.pages,
                    bytes=entry.bytes, last_used=entry.last_used,
                ))
        for blob in self.tiers.cache.entries():
            name = self._names.get(blob.sha256)
            if name is not None and blob.sha256 not in self.tiers.device:
                resident.append(ResidentAdapter(
                    tenant=name[0], adapter=name[1], version=blob.sha256, tier="host", bytes=blob.bytes,
                    last_used=blob.last_used,
                ))
        pool = self.engine.engine.adapters.pool
        return Heartbeat(
            worker_id=self.worker_id,
            host=self.host,
            device=self.device,
            started_at=self.started_at,
            draining=self.draining,
            capacity={
                "pool_pages": self.tiers.total_pages,
                "page_bytes": pool.page_bytes,
                "max_rank": pool.max_rank,
                "max_inflight": self.settings.consumer.max_inflight,
                **self.tiers.cache.usage(),
                "transitions": {k: v.as_dict() for k, v in self.tiers.stats.items()},
            },
            resident=resident,
            free_pages=self.tiers.free_pages,
            queue_depth=waiting + self._pending_submit,
            running=running,
            tokens_per_s=round(self.engine.tokens_per_s, 2),
        )

    async def _publish_heartbeat(self) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        await self.nc.publish(subjects.worker_event(self.worker_id), self.heartbeat().encode())


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.asynccontextmanager
async def open_worker(settings: WorkerSettings, *, worker_id: str | None = None) -> AsyncIterator[WorkerService]:
    """Load the backbone (once), start the engine thread, open the host cache and the object store, and
    yield the service; everything is released on exit. `workers.__main__` and the tests use this."""
    async with AsyncExitStack() as stack:
        backbone = await asyncio.to_thread(
            load_backbone, settings.backbone.path, dtype=_DTYPES[settings.backbone.dtype],
            device=settings.backbone.device,
        )
        tokenizer = await asyncio.to_thread(Tokenizer.load, settings.backbone.path)
        engine = Engine(backbone, settings.engine, tokenizer=tokenizer)
        thread = EngineThread(engine, asyncio.get_running_loop())
        thread.start()
        stack.push_async_callback(thread.stop)
        directory = settings.host_cache.directory
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lorafn-host-cache-")))
        cache = HostCache(directory, disk_bytes=settings.host_cache.disk_bytes, ram_bytes=settings.host_cache.ram_bytes)
        tiers = AdapterTiers(engine=thread, store=ObjectStore(settings.object_store), cache=cache)
        yield WorkerService(
            settings, worker_id=worker_id or settings.worker_id or default_worker_id(), engine=thread,
            tiers=tiers, device=str(backbone.device),
        )
