"""Per-adapter queue depths for the gateway's admission, read for all adapters at once.

The gateway answers 429 when an adapter already has `max_queue_per_adapter` invocations pending in the
invocations stream. Read per adapter, that depth cost one JetStream API request (`STREAM.INFO` with the
adapter's subject as filter) for every call whose adapter had not been read within the interval: once calls
spread over more adapters than one interval's worth of calls (100 adapters at ~200 calls/s), nearly every
call paid a request before its publish, and the request path grew with the number of adapters.

Here one `STREAM.INFO` with the filter `lora.invoke.>` reads the depth of every subject that has invocations
pending (a work-queue stream holds only pending ones, so the answer's size follows the backlog, not the
number of adapters), at most once per `interval_s` per gateway, whatever the number of adapters. Between
reads the gateway adds its own publishes. The server lists at most 100,000 subjects in one answer; a subject
beyond them reads as empty (admission is then lenient, never wrong the other way).

A book older than `interval_s` is still used while the next read runs in the background (a call never waits
for it); a book older than `max_age_s` (NATS has been unreachable for that long) is not: the call waits for a
fresh read, and if that fails the caller answers 503. `DepthBook` holds the numbers and decides (plain data,
time passed in); `QueueDepths` does the reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from nats.js import JetStreamContext

from protocol import subjects

logger = logging.getLogger(__name__)


class DepthBook:
    """Pending invocations per subject as last read from the stream, plus the publishes counted since."""

    def __init__(self, *, interval_s: float, max_age_s: float) -> None:
        if max_age_s < interval_s:
            raise ValueError(f"max_age_s ({max_age_s}) must be at least interval_s ({interval_s})")
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self.read_at: float | None = None
        self._depths: dict[str, int] = {}

    def due(self, now: float) -> bool:
        """A new read should start (none yet, or the last one is older than the interval)."""
        return self.read_at is None or now - self.read_at > self.interval_s

    def usable(self, now: float) -> bool:
        """The book may answer without waiting for a read."""
        return self.read_at is not None and now - self.read_at <= self.max_age_s

    def replace(self, depths: Mapping[str, int], read_at: float) -> None:
        """A read of the stream: its counts replace everything (the publishes counted since the last read are
        in them, or have been taken by the dispatcher)."""
        self._depths = dict(depths)
        self.read_at = read_at

    def depth(self, subject: str) -> int:
        return self._depths.get(subject, 0)

    def added(self, subject: str) -> None:
        """This gateway published one invocation on `subject`: pending until the next read says otherwise."""
        self._depths[subject] = self._depths.get(subject, 0) + 1


class QueueDepths:
    """`depth(js, subject)` for admission; `added(subject)` after a publish. One read in flight at a time."""

    def __init__(self, *, interval_s: float, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.book = DepthBook(interval_s=interval_s, max_age_s=max_age_s)
        self.clock = clock
        self.reads = 0  # STREAM.INFO requests made (the benchmark and tests count them)
        self._reading: asyncio.Task[None] | None = None

    async def depth(self, js: JetStreamContext, subject: str) -> int:
        """Pending invocations on `subject`. Raises what the read raises when the book is too old to use."""
        now = self.clock()
        if self.book.due(now):
            reading = self._read(js)
            if not self.book.usable(now):
                await asyncio.shield(reading)  # a failed read raises here; the next call tries again
        return self.book.depth(subject)

    def added(self, subject: str) -> None:
        self.book.added(subject)

    def _read(self, js: JetStreamContext) -> asyncio.Task[None]:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read_now(js))
            self._reading.add_done_callback(self._read_done)
        return self._reading

    async def _read_now(self, js: JetStreamContext) -> None:
        self.reads += 1
        info = await js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subjects.INVOKE_ALL)
        self.book.replace(info.state.subjects or {}, self.clock())

    @staticmethod
    def _read_done(task: asyncio.Task[None]) -> None:
        # A background read that fails leaves the book as it was: the calls that need a fresh one see the error.
        if not task.cancelled() and task.exception() is not None:
            logger.debug("reading the invocations stream's queue depths failed: %r", task.exception())
