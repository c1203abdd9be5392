"""The JetStream pull loop, written once: the dispatcher, every worker, the scheduler's results consumer and
the gateway's callback consumer all run `PullLoop`.

- It creates (or binds to) its durable consumer and re-creates it when it disappears (a worker that was
  paused past its heartbeat timeout finds its consumer deleted by the rescue; an operator deleted it).
- It fetches only as many messages as the caller can take now (`want`), so a fetched message never waits
  in this process while another worker could run it, and it is never cancelled in the middle of a fetch:
  `stop` is checked between fetches (at most `fetch_timeout_s` late), so no fetched message is stranded
  until its ack wait.
- Errors are retried after `retry_s`; a timeout (nothing to fetch) is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

logger = logging.getLogger(__name__)

# How many empty fetches in a row before the loop checks that its consumer still exists (a fetch against a
# deleted consumer can simply time out).
CHECK_EVERY_EMPTY_FETCHES = 10
# How long a follow-up fetch of messages the consumer reported pending may wait (they are there already,
# unless another instance of the consumer took them).
MORE_TIMEOUT_S = 0.05


def stream_time(msg: Msg) -> float | None:
    """Unix seconds the stream stored `msg` (None for a message that did not come from a stream)."""
    try:
        ts = msg.metadata.timestamp
    except (ValueError, nats.errors.Error):
        return None
    return ts.timestamp() if isinstance(ts, datetime) else None


class PullLoop:
    """Fetch from one durable pull consumer and hand each batch to `handle` until `stop` is set."""

    def __init__(self, js: JetStreamContext, *, stream: str, config: ConsumerConfig, fetch_timeout_s: float = 1.0,
                 retry_s: float = 0.5) -> None:
        if not config.durable_name or not config.filter_subject:
            raise ValueError("a PullLoop needs a durable consumer with a filter subject")
        self.js = js
        self.stream = stream
        self.config = config
        self.durable: str = config.durable_name
        self.fetch_timeout_s = fetch_timeout_s
        self.retry_s = retry_s
        self._sub: nats.js.JetStreamContext.PullSubscription | None = None

    async def _subscription(self) -> nats.js.JetStreamContext.PullSubscription:
        if self._sub is None:
            subject = self.config.filter_subject
            assert subject is not None  # checked in __init__
            self._sub = await self.js.pull_subscribe(subject, durable=self.durable, stream=self.stream,
                                                     config=self.config)
        return self._sub

    async def _reset(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _consumer_exists(self) -> bool:
        try:
            await self.js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, nats.js.errors.Error, OSError):
            return True  # cannot tell now; the next fetch error will reset
        return True

    async def _fetch(self, sub: nats.js.JetStreamContext.PullSubscription, count: int) -> list[Msg]:
        """Up to `count` messages without waiting for a batch to fill: one message (a long poll of up to
        `fetch_timeout_s`), then as many more as the consumer says are pending. nats-py's `fetch(n)` for
        n > 1 can linger until n messages came or the request expired: 100-500 ms for a lone message."""
        batch = await sub.fetch(1, timeout=self.fetch_timeout_s)
        pending = batch[-1].metadata.num_pending if batch else 0
        if count > 1 and pending:
            with contextlib.suppress(TimeoutError):  # another consumer instance took them meanwhile
                batch += await sub.fetch(min(count - 1, pending), timeout=MORE_TIMEOUT_S)
        return batch

    async def run(self, stop: asyncio.Event, handle: Callable[[list[Msg]], Awaitable[None]],
                  want: Callable[[], Awaitable[int]]) -> None:
        """Until `stop`: wait until `want()` says how many messages the caller takes, fetch up to that many,
        and await `handle(batch)` (which acks, naks or hands each message to a task of its own). `handle` is
        called after every `want`, with an empty batch when nothing came, so a caller that reserves capacity
        in `want` (a worker's free slots) gets it back."""
        empty = 0
        while not stop.is_set():
            count = await want()
            if stop.is_set():
                break
            try:
                sub = await self._subscription()
                batch = await self._fetch(sub, count)
            except TimeoutError:  # nats.errors.TimeoutError is one: nothing to fetch
                await handle([])  # the caller gets back what `want` reserved
                empty += 1
                if empty % CHECK_EVERY_EMPTY_FETCHES == 0 and not await self._consumer_exists():
                    logger.info("consumer %s is gone; creating it again", self.durable)
                    await self._reset()
                continue
            except (nats.errors.Error, nats.js.errors.Error, OSError) as e:
                logger.warning("pull from %s failed (%r); retrying in %.1f s", self.durable, e, self.retry_s)
                await handle([])
                await self._reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.retry_s)
                continue
            empty = 0
            await handle(batch)
        await self._reset()
