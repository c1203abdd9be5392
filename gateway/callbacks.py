"""Delivery of results to the X-Callback-Url of their invocation.

The gateway records `invocation id -> URL` in a JetStream key-value bucket when it accepts the call.
Whoever records the result of an invocation that carries a callback URL also publishes a copy of it on
`lora.callback.<id>` (`protocol.results`); the gateway reads those copies, and only those, through a
DURABLE pull consumer: a copy is acked only once its callback was delivered (2xx), found unnecessary
(no URL recorded by a gateway: a direct NATS client cannot make the gateway call a URL it never
validated), or given up after `max_attempts`. Retries are JetStream redeliveries
with a growing delay (nak with backoff), so a gateway restart loses no callback and several gateways
share the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from gateway.bus import NatsLink
from gateway.invoker import ensure_callback_bucket, result_json
from gateway.metrics import GatewayMetrics
from gateway.settings import CallbackSettings
from protocol import subjects
from protocol.consume import PullLoop
from protocol.messages import InvocationResult, MessageInvalid

log = logging.getLogger(__name__)

FETCH_BATCH = 16
FETCH_WAIT_S = 1.0


class CallbackDispatcher:
    """Runs the durable consumer of the results stream and POSTs results to their callback URLs."""

    def __init__(self, *, link: NatsLink, http: httpx.AsyncClient, settings: CallbackSettings,
                 metrics: GatewayMetrics) -> None:
        self.link, self.http, self.settings, self.metrics = link, http, settings, metrics
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._kv: KeyValue | None = None
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(FETCH_BATCH * 4)
        link.on_connect(self._setup)

    async def _setup(self, nc: Client, js: JetStreamContext) -> None:
        self._kv = await ensure_callback_bucket(js, self.settings)
        self._task = asyncio.create_task(self._run(js), name="callbacks")

    def backoff_s(self, delivered: int) -> float:
        """Delay before delivery `delivered + 1`: exponential from backoff_initial_s, capped."""
        s = self.settings
        return float(min(s.backoff_max_s, s.backoff_initial_s * (2 ** max(0, delivered - 1))))

    async def _run(self, js: JetStreamContext) -> None:
        s = self.settings
        config = ConsumerConfig(
            durable_name=s.consumer,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.timeout_s * 3,
            max_deliver=s.max_attempts + 1,  # + 1: the last delivery only terminates it
            filter_subject=subjects.CALLBACK_ALL,
        )
        if s.consumer != subjects.CALLBACKS_CONSUMER_OLD:  # earlier versions' consumer read every result
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(subjects.RESULTS_STREAM, subjects.CALLBACKS_CONSUMER_OLD)
        loop = PullLoop(js, stream=subjects.RESULTS_STREAM, config=config, fetch_timeout_s=FETCH_WAIT_S)

        async def want() -> int:
            await self._slots.acquire()  # one delivery may start: fetch up to a batch
            self._slots.release()
            return FETCH_BATCH

        async def handle(batch: list[Msg]) -> None:
            for msg in batch:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._done)

        await loop.run(self._stop, handle, want)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        try:
            result = InvocationResult.decode(msg.data)
        except MessageInvalid:
            await msg.term()
            return
        assert self._kv is not None
        try:
            entry = await self._kv.get(result.invocation_id)
        except KeyNotFoundError:
            await msg.ack()  # no callback asked for this invocation
            return
        except (nats.errors.Error, TimeoutError):
            await msg.nak(delay=self.backoff_s(1))
            return
        url = (entry.value or b"").decode()
        delivered = msg.metadata.num_delivered
        if delivered > self.settings.max_attempts:
            await self._give_up(msg, result, url, delivered - 1)
            return
        try:
            response = await self.http.post(url, json=result_json(result), timeout=self.settings.timeout_s,
                                            headers={"x-lorafn-invocation-id": result.invocation_id})
            ok = 200 <= response.status_code < 300
            reason = f"HTTP {response.status_code}"
        except httpx.HTTPError as e:
            ok, reason = False, repr(e)
        if ok:
            self.metrics.callbacks.labels("delivered").inc()
            await msg.ack()
            await self._forget(result.invocation_id)
            return
        if delivered >= self.settings.max_attempts:
            await self._give_up(msg, result, url, delivered, reason)
            return
        self.metrics.callbacks.labels("retried").inc()
        log.info("callback of %s to %s failed (%s); retry %d", result.invocation_id, url, reason, delivered)
        await msg.nak(delay=self.backoff_s(delivered))

    async def _give_up(self, msg: Msg, result: InvocationResult, url: str, attempts: int, reason: str = "") -> None:
        self.metrics.callbacks.labels("failed").inc()
        log.warning("callback of %s to %s given up after %d attempts %s", result.invocation_id, url, attempts,
                    reason)
        await msg.term()
        await self._forget(result.invocation_id)

    async def _forget(self, invocation_id: str) -> None:
        """Drop a delivered (or given up) callback URL; its bucket's TTL removes it anyway if this fails."""
        if self._kv is None:
            return
        try:
            await self._kv.delete(invocation_id)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            log.debug("callbacks: could not delete the URL of %s (%s); its TTL will", invocation_id, e)

    async def close(self) -> None:
        """Stop fetching (between two fetches: no fetched message is stranded); deliveries in progress are
        cancelled and will be redelivered (not acked)."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), FETCH_WAIT_S + 2.0)
            except TimeoutError:
                self._task.cancel()
            except Exception:  # the loop failed earlier; it is logged by asyncio
                log.debug("callbacks: the consumer loop had failed", exc_info=True)
        tasks = list(self._inflight)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

