"""The bridge between the synchronous engine and the worker's asyncio side.

The engine runs in ONE dedicated thread, which owns it: it steps while there is work and, between
steps, runs the commands the asyncio side queued (submit a request, add or remove an adapter, abort).
Nothing else touches the engine, so it needs no locks. Tokens go the other way: the thread collects
the `TokenEvent`s of one step and hands them, with the step's completions, to the event loop with
ONE `call_soon_threadsafe` per step; each request's `Generation` receives them on an asyncio queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from workers.batcher import BatcherStats, Completion, TokenEvent
from workers.engine import Engine
from workers.sampling import SamplingParams
from workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

StreamItem = list[TokenEvent] | Completion | BaseException


class EngineStopped(RuntimeError):
    """The engine thread has stopped; no command can run any more."""

    def __init__(self) -> None:
        super().__init__("the engine thread has stopped")


class StepFailed(RuntimeError):
    """A step of the engine raised; every request of the engine was aborted."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"engine step failed: {reason}")


@dataclass
class Generation:
    """One request in the engine, seen from asyncio: the tokens of each step, then its `Completion`."""

    request_id: str
    items: asyncio.Queue[StreamItem] = field(default_factory=asyncio.Queue)


@dataclass
class _Command:
    fn: Callable[[Engine], object]
    future: concurrent.futures.Future[object]


class EngineThread:
    """Owns an `Engine` in a dedicated thread; `call` runs a function on it between two steps."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, *, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._loop = loop
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._generations: dict[str, Generation] = {}  # loop thread only
        self._step_events: dict[str, list[TokenEvent]] = {}  # engine thread only
        self._live: set[str] = set()  # engine thread only: requests submitted and not finished
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._token_times: deque[tuple[float, int]] = deque(maxlen=256)
        self.tokens_per_s = 0.0
        self.steps = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Stop after the current step; requests still in the engine are dropped (callers abort first)."""
        self._stopped.set()
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- asyncio side ------------------------------------------------------------------------------------

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` in the engine thread between two steps; its result or exception."""
        if self._stopped.is_set():
            raise EngineStopped()
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._commands.put(_Command(fn, future))
        return await asyncio.wrap_future(future)  # type: ignore[arg-type]

    async def submit(
        self, prompt_ids: Sequence[int], *, adapter: str | None, params: SamplingParams, request_id: str
    ) -> Generation:
        """Queue a request; its tokens and completion arrive on the returned `Generation`."""
        generation = Generation(request_id)
        self._generations[request_id] = generation

        def submit(engine: Engine) -> None:
            engine.submit(list(prompt_ids), adapter=adapter, params=params, on_token=self._collect,
                          request_id=request_id)
            self._live.add(request_id)

        try:
            await self.call(submit)
        except BaseException:
            self._generations.pop(request_id, None)
            raise
        return generation

    async def abort(self, request_id: str) -> None:
        """Cancel a request; its `Generation` ends with a completion whose finish reason is abort."""
        def abort(engine: Engine) -> Completion | None:
            self._live.discard(request_id)
            return engine.abort(request_id)

        completion = await self.call(abort)
        generation = self._generations.pop(request_id, None)
        if generation is not None and completion is not None:
            generation.items.put_nowait(completion)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """`Engine.check_prompt`, from the asyncio side (it reads only the fixed context window)."""
        self.engine.check_prompt(prompt_ids)

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The engine's tokenizer (read-only; safe from any thread)."""
        return self.engine.tokenizer

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests of the engine (a racy but harmless read for heartbeats)."""
        batcher = self.engine.batcher
        return len(batcher.waiting), len(batcher.running)

    def batcher_stats(self) -> BatcherStats:
        """The batcher's contention counters (a racy but harmless read: they only grow)."""
        return self.engine.batcher.stats

    def kv_blocks(self) -> tuple[int, int]:
        """(free, total) blocks of the engine's KV cache (a racy but harmless read for heartbeats: what a
        cancelled or finished request held is back in `free` after the step that dropped it)."""
        kv = self.engine.kv
        return kv.num_free_blocks, kv.num_blocks

    def _deliver(self, events: dict[str, list[TokenEvent]], done: list[Completion], error: str | None) -> None:
        for request_id, evs in events.items():
            generation = self._generations.get(request_id)
            if generation is not None:
                generation.items.put_nowait(evs)
        for completion in done:
            generation = self._generations.pop(completion.request_id, None)
            if generation is not None:
                generation.items.put_nowait(completion)
        if error is not None:
            for generation in self._generations.values():
                generation.items.put_nowait(StepFailed(error))
            self._generations.clear()

    # -- engine thread -----------------------------------------------------------------------------------

    def _collect(self, event: TokenEvent) -> None:
        self._step_events.setdefault(event.request_id, []).append(event)

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            if command.future.set_running_or_notify_cancel():
                try:
                    command.future.set_result(command.fn(self.engine))
                except BaseException as e:
                    command.future.set_exception(e)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._run_commands(block=not self.engine.has_work)
            if self._stopped.is_set() or not self.engine.has_work:
                continue
            self._step_events = {}
            error: str | None = None
            done: list[Completion] = []
            try:
                done = self.engine.step()
            except Exception as e:
                logger.exception("engine step failed; aborting every request")
                error = f"{type(e).__name__}: {e}"
                for request_id in self._live:
                    self.engine.abort(request_id)
                self._live.clear()
            self._live.difference_update(c.request_id for c in done)
            self.steps += 1
            self._account(sum(len(v) for v in self._step_events.values()))
            self._loop.call_soon_threadsafe(self._deliver, self._step_events, done, error)
        while True:  # fail whatever was queued after the stop
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is not None and command.future.set_running_or_notify_cancel():
                command.future.set_exception(EngineStopped())

    def _account(self, tokens: int) -> None:
        now = time.monotonic()
        self._token_times.append((now, tokens))
        while self._token_times and now - self._token_times[0][0] > 5.0:
            self._token_times.popleft()
        span = now - self._token_times[0][0] if len(self._token_times) > 1 else 0.0
        total = sum(n for _, n in self._token_times)
        self.tokens_per_s = total / span if span > 0 else 0.0
