"""What the invocation path adds: HTTP -> gateway -> NATS JetStream -> the scheduler's dispatcher -> a worker's
work subject -> worker -> reply, with instant workers; and whether the path stays as fast with 1,000 adapters
as with 10.

The engine is replaced by a pool of echo workers (`EchoWorker`, all in one process of their own): each speaks
the worker protocol to the real scheduler (`python -m scheduler`, a child process): it heartbeats on
`lora.evt.worker.<id>` with its capacity and the adapter versions it holds (every version it has echoed
for, tier device), consumes its own `lora.work.<id>` through one durable consumer (`protocol.consume.PullLoop`)
and answers every invocation at once following the worker contract (started event, token chunks when
streaming, the result recorded in the results stream, then sent to the reply subject, then the ack; every
message carries the dispatch epoch of its `WorkHeaders`). The answer is the prompt's first `max_tokens` words.

Table 1, the invocation path (one call of the bare backbone each: a short prompt, 4 tokens, no streaming):

- direct: this process publishes the `Invocation` to `lora.invoke.<tenant>._base` (awaiting the publish ack)
  and waits for the result on its reply subject (`lora.reply.<tenant>.<id>`, subscribed before the publish), as a
  NATS client does; the dispatcher routes it to an echo worker;
- direct_work: the same call published straight to an echo worker's `lora.work.<id>` (the workers in turn),
  bypassing the dispatcher: direct - direct_work is what the dispatch hop costs;
- gateway: this process POSTs `/v1/functions/<tenant>/_base/invocations` (synchronous FaaS call) to the
  gateway, run as `python -m gateway` (uvicorn) on a free port, over one keep-alive connection per
  concurrent caller of a minimal HTTP/1.1 client (`RawHttpCaller`);
- gateway_httpx: the same call with httpx, a full HTTP library, which costs about 0.5 ms of the caller's CPU
  per request here (on the same 2 cores as every service, so it shows up as latency).

Added latency = gateway - direct, per percentile (p50 - p50, p99 - p99); the targets are judged on the lean
client (what the path adds, not the caller's HTTP library) and the httpx figures are reported beside them.
The dispatch hop is also timed per call: from the invocations stream's publish ack (in this process) to the
echo worker holding the work message (its `InvocationStarted.started_at`, stamped when its fetch returned),
split with the streams' own timestamps into the dispatcher's part (invocation stored -> work message stored)
and the worker's pickup (work message stored -> fetched). The gateway's and the scheduler's CPU time per call
are read from /proc around each sequential round. The variants are interleaved in rounds (A, B, C, D, A, ...)
after a warm-up of each, so that the noise of a shared machine hits all alike: first sequential rounds (one
call at a time: latency, sequential invocations/s), then rounds with `concurrency` callers.

To say where the gateway's time goes, the same process then times, one at a time, the pieces the gateway
does per call besides the NATS work both variants share: an HTTP round trip to the gateway that does
nothing (`GET /healthz`, with the same client), the Postgres insert of the invocation row exactly as the
gateway does it (`repo.insert_invocation`), the same row through an ORM session for comparison, and a bare
Postgres round trip (`SELECT 1`).

Table 2, many adapters: `adapter_counts[-1]` adapters registered in Postgres (rows only: the echo workers
load nothing), then for each N in `adapter_counts` (in increasing order, so that the workers hold N versions
while N is measured) calls rotating over N adapters (call i goes to adapter i mod N) directly over NATS and
through the gateway (lean client), the two interleaved in rounds, the same number of calls and callers for
every N, after a warm-up that calls each adapter once: invocations/s and p50/p99 per N, their ratios to the
first N (the target: within 10%); a control row measures the first N a second time with callers of its own in
the same rounds, so its ratios show how far two measurements of the same thing differ in this run; the
JetStream consumers of each stream and each echo worker's NATS subscriptions (neither may grow with N), and the bytes an echo worker published per heartbeat during N's
warm-up (the largest over the workers; the residency's changes every heartbeat, the whole of it every fifth).

`run()` starts NATS, Postgres and S3 with the `lorafn up` launcher on free ports in a temporary directory;
`measure()` takes running servers (the test fixtures' for the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from protocol import subjects
from protocol.consume import PullLoop, stream_time
from protocol.dispatch import WorkHeaders
from protocol.heap import freeze_startup_heap
from protocol.messages import (
    Heartbeat,
    Invocation,
    InvocationResult,
    InvocationStarted,
    MessageInvalid,
    ResidentAdapter,
    Sampling,
    SchedulerHeartbeat,
    Tier,
    Timings,
    TokenChunk,
    Usage,
)
from protocol.residency import ResidencySender, residency_headers
from protocol.results import record_result
from protocol.settings import split_nats_urls
from protocol.streams import ALL_STREAMS, ensure_streams
from storage.settings import ObjectStoreSettings

log = logging.getLogger(__name__)

KIND_HEADER = subjects.KIND_HEADER
PROMPT = "hello from the invocation benchmark"
MAX_TOKENS = 4
TARGET_P50_MS = 2.0  # targets of the gateway's added latency
TARGET_P99_MS = 10.0
TARGET_ADAPTER_RATIO = 0.10  # many adapters: throughput and latency within 10% of the fewest adapters
CONTROL = "control"  # many adapters: the first adapter count measured again (the run's noise)
ECHO_READY = "ready"
ECHO_STATS = "stats"  # the command the echo pool answers on its stdin with one JSON line
ECHO_BATCH = 32  # most messages per pull request of an echo peer
ECHO_MAX_INFLIGHT = 64  # invocations an echo peer answers at once
ECHO_POOL_PAGES = 4096  # capacity an echo worker reports (it holds one page per version it has echoed for)
ECHO_MAX_RANK = 64
ECHO_HEARTBEAT_S = 1.0  # the workers' default
ECHO_SEEN_KEPT = 10_000  # invocations an echo peer remembers (tests look at the last ones)
ADAPTER_RANK = 8  # the rank registered for the benchmark's adapters
ADAPTER_BYTES = 1 << 20
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0
STATS_TIMEOUT_S = 10.0
IDLE_REUSE_S = 2.0  # the lean client reuses a keep-alive connection idle for less than this
CHILD_LINE_LIMIT = 1 << 24  # bytes of one line a child writes to its stdout (the echo pool's stats)


@dataclass(frozen=True)
class Servers:
    """The NATS, Postgres and S3 servers the benchmark runs against."""

    nats_url: str
    database_url: str
    object_store: ObjectStoreSettings


@dataclass(frozen=True)
class BenchOptions:
    """How many calls. Table 1: `warmup` per variant, then rounds of each variant in turn. Table 2: for each
    adapter count, one call per adapter to warm up, then `adapter_rounds` rounds of each path in turn,
    `adapter_calls` calls per path in all."""

    warmup: int = 100
    rounds: int = 10  # sequential rounds per variant
    calls_per_round: int = 100
    concurrency: int = 16
    concurrent_rounds: int = 4  # rounds per variant with `concurrency` callers
    concurrent_calls_per_round: int = 320
    component_calls: int = 200  # calls of each component measured on its own
    echo_workers: int = 3
    adapter_counts: tuple[int, ...] = (10, 100, 1000)
    adapter_calls: int = 6000  # per path and adapter count (fewer leave p99 at the mercy of a few stalls)
    adapter_rounds: int = 30  # short rounds: a spell of the shared machine running slow falls on every N alike
    adapter_concurrency: int = 16

    def __post_init__(self) -> None:
        if self.echo_workers < 1:
            raise ValueError(f"echo_workers ({self.echo_workers}) must be at least 1")
        if list(self.adapter_counts) != sorted(set(self.adapter_counts)) or any(n < 1 for n in self.adapter_counts):
            raise ValueError(f"adapter_counts {self.adapter_counts} must be positive and increasing")
        if self.adapter_rounds < 1 or self.adapter_calls < self.adapter_rounds:
            raise ValueError(f"adapter_calls ({self.adapter_calls}) must be at least adapter_rounds "
                             f"({self.adapter_rounds}), which must be at least 1")


# -- the echo peer and the echo workers -----------------------------------------------------------------


@dataclass
class EchoPeer:
    """An instant engine: answers every invocation of `filter_subject` (in `stream`) at once.

    Follows the worker contract: `InvocationStarted` on lora.evt.invocation.started and on `reply_to`,
    `TokenChunk`s (one per word) with their indices when the invocation streams, the `InvocationResult`
    recorded in the results stream (`Nats-Msg-Id: result-<id>`, awaited) and then sent to `reply_to`, and
    the ack last; each message carries the dispatch epoch of the work message's `WorkHeaders`. The output is
    the prompt's first `max_tokens` words. Pulls through `PullLoop`, at most `max_inflight` at once.
    Subclasses change the answer through `respond` and `chunk_rounds` (the gateway tests use one that fails,
    stalls or repeats chunks on request); `EchoWorker` is one the scheduler dispatches to.
    """

    nc: Client
    consumer: str
    filter_subject: str
    worker_id: str = "bench-echo"
    tier: str | None = None  # reported as adapter_tier
    load_ms: float = 0.0  # reported as the adapter's load time
    batch: int = ECHO_BATCH  # most messages per pull request
    stream: str = subjects.INVOCATIONS_STREAM
    max_inflight: int = ECHO_MAX_INFLIGHT
    fetch_timeout_s: float = 1.0  # the workers' default
    answered: int = 0
    seen: collections.deque[Invocation] = field(default_factory=lambda: collections.deque(maxlen=ECHO_SEEN_KEPT))
    # invocation id -> (invocation stored -> work message stored, work message stored -> fetched), ms; only
    # for dispatched invocations (their work headers say when the invocation arrived)
    samples: dict[str, tuple[float, float]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _slots: asyncio.Semaphore | None = None
    _taken: int = 0
    _answering: set[asyncio.Task[None]] = field(default_factory=set)

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(durable_name=self.consumer, filter_subject=self.filter_subject,
                              ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=3, max_ack_pending=-1)

    async def start(self) -> None:
        """Create the durable consumer (replacing one left by an earlier run) and start pulling."""
        js = self.nc.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(self.stream, self.consumer)
        await js.add_consumer(self.stream, self.consumer_config())
        self._slots = asyncio.Semaphore(self.max_inflight)
        loop = PullLoop(js, stream=self.stream, config=self.consumer_config(), fetch_timeout_s=self.fetch_timeout_s)
        self._task = asyncio.create_task(loop.run(self._stop, self._take, self._want), name=f"echo-{self.worker_id}")

    async def stop(self) -> None:
        """Stop pulling, finish the answers under way, delete the consumer.

        The pull loop is cancelled rather than left to end at its next check (up to `fetch_timeout_s`, paid by
        every test that stops a peer): a fetch it cancels loses nothing, as the consumer goes with it."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._answering:
            await asyncio.gather(*self._answering, return_exceptions=True)
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            # A work-queue stream takes one consumer per subject: leave the subjects free for others.
            await self.nc.jetstream().delete_consumer(self.stream, self.consumer)

    async def _want(self) -> int:
        """Wait for a free slot; take every free one, up to `batch` (the pull loop fetches that many)."""
        assert self._slots is not None
        await self._slots.acquire()
        n = 1
        while n < self.batch and not self._slots.locked():
            await self._slots.acquire()
            n += 1
        self._taken = n
        return n

    async def _take(self, batch: list[Msg]) -> None:
        assert self._slots is not None
        fetched = time.time()
        for msg in batch:
            task = asyncio.create_task(self._answer(msg, fetched))
            self._answering.add(task)
            task.add_done_callback(self._answered)
        for _ in range(self._taken - len(batch)):  # slots taken for messages that did not come
            self._slots.release()
        self._taken = 0

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._answering.discard(task)
        assert self._slots is not None
        self._slots.release()

    def words(self, inv: Invocation) -> list[str]:
        """The words of the prompt (or of the last chat message)."""
        source = inv.prompt if inv.prompt is not None else (inv.messages or [])[-1].content
        return source.split()

    def chunk_rounds(self, inv: Invocation) -> int:
        """How many times the chunks are sent (a redelivered generation sends them again)."""
        return 1

    def taking(self, inv: Invocation) -> None:
        """Called for every invocation before it is answered (an `EchoWorker` notes the version it holds)."""

    async def respond(self, inv: Invocation, started: float) -> InvocationResult:
        """The result of an invocation: the echo of its first `max_tokens` words."""
        words = self.words(inv)
        out = words[: inv.sampling.max_tokens]
        return InvocationResult(
            invocation_id=inv.id, status="succeeded", text=" ".join(out), token_ids=list(range(len(out))),
            finish_reason="length" if len(out) < len(words) else "stop",
            usage=Usage(prompt_tokens=len(words), completion_tokens=len(out)),
            timings=Timings(queued_ms=(started - inv.submitted_at) * 1000, load_ms=self.load_ms,
                            first_token_ms=0.0, total_ms=(time.time() - inv.submitted_at) * 1000),
            worker_id=self.worker_id, adapter_tier=self.tier,  # type: ignore[arg-type]
        )

    async def _answer(self, msg: Msg, fetched: float) -> None:
        try:
            inv = Invocation.decode(msg.data)
        except MessageInvalid:
            log.warning("not an Invocation; terminating it", exc_info=True)
            await msg.term()
            return
        work = WorkHeaders.read(msg)
        stored = stream_time(msg)
        if work.arrived_at is not None and stored is not None:
            self.samples[inv.id] = ((stored - work.arrived_at) * 1000, (fetched - stored) * 1000)
        self.seen.append(inv)
        self.taking(inv)
        event = InvocationStarted(invocation_id=inv.id, worker_id=self.worker_id, started_at=fetched,
                                  adapter_tier=self.tier, load_ms=self.load_ms, epoch=work.epoch).encode()  # type: ignore[arg-type]
        await self.nc.publish(subjects.invocation_event("started"), event)
        if inv.reply_to:
            await self.nc.publish(inv.reply_to, event, headers={KIND_HEADER: subjects.KIND_STARTED})
        result = (await self.respond(inv, fetched)).model_copy(update={"epoch": work.epoch})
        if inv.stream and inv.reply_to and result.status == "succeeded":
            words = result.text.split(" ") if result.text else []
            for _ in range(self.chunk_rounds(inv)):
                for i, word in enumerate(words):
                    chunk = TokenChunk(invocation_id=inv.id, index=i, token_ids=[i], text=word if i == 0 else " " + word,
                                       epoch=work.epoch)
                    await self.nc.publish(inv.reply_to, chunk.encode(), headers={KIND_HEADER: subjects.KIND_CHUNK})
        payload = result.encode()
        await record_result(self.nc.jetstream(), inv.id, payload, callback=inv.callback_url is not None,
                            headers={KIND_HEADER: subjects.KIND_RESULT})
        if inv.reply_to:
            await self.nc.publish(inv.reply_to, payload, headers={KIND_HEADER: subjects.KIND_RESULT})
        await msg.ack()
        self.answered += 1


@dataclass
class EchoWorker(EchoPeer):
    """An echo peer that is a worker to the scheduler: it consumes its own work subject through its one durable
    consumer (`work-<id>`), and heartbeats every `heartbeat_s` with the capacity the dispatcher routes by and,
    as device-resident, every adapter version it has echoed for (so that the dispatcher's affinity keeps an
    adapter on the worker that served it first). Stopping sends a last heartbeat with gone=true."""

    pool_pages: int = ECHO_POOL_PAGES
    max_rank: int = ECHO_MAX_RANK
    heartbeat_s: float = ECHO_HEARTBEAT_S
    started_at: float = field(default_factory=time.time)
    held: dict[str, float] = field(default_factory=dict)  # version -> last used (unix seconds)
    residency: ResidencySender = field(default_factory=ResidencySender)  # full residency or the changes
    sent_bytes: list[int] = field(default_factory=lambda: [0, 0])  # heartbeat bytes, heartbeats (since stats)
    _beats: asyncio.Task[None] | None = None

    @classmethod
    def for_worker(cls, nc: Client, worker_id: str) -> EchoWorker:
        return cls(nc, consumer=subjects.work_consumer(worker_id), filter_subject=subjects.work(worker_id),
                   worker_id=subjects.check_name("worker", worker_id), stream=subjects.WORK_STREAM)

    def taking(self, inv: Invocation) -> None:
        if inv.version is not None:
            self.held[inv.version] = time.time()

    def heartbeat(self, *, gone: bool = False) -> Heartbeat:
        return Heartbeat(
            worker_id=self.worker_id, host=socket.gethostname(), device="echo", started_at=self.started_at,
            gone=gone,
            capacity={"pool_pages": self.pool_pages, "max_rank": self.max_rank, "max_inflight": self.max_inflight},
            resident=[ResidentAdapter(version=v, tier=Tier.device, pages=1, last_used=t) for v, t in self.held.items()],
            free_pages=max(0, self.pool_pages - len(self.held)), running=len(self._answering),
        )

    async def beat(self, *, gone: bool = False) -> None:
        for hb in self.residency.stamp(self.heartbeat(gone=gone)):
            data = hb.encode()
            self.sent_bytes[0] += len(data)
            await self.nc.publish(subjects.worker_event(self.worker_id), data, headers=residency_headers(hb))
        self.sent_bytes[1] += 1

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.beat()
            except nats.errors.Error as e:
                log.warning("heartbeat of %s failed: %s", self.worker_id, e)
            await asyncio.sleep(self.heartbeat_s)

    async def start(self) -> None:
        await super().start()
        self._beats = asyncio.create_task(self._heartbeats(), name=f"heartbeats-{self.worker_id}")

    async def stop(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beats
        with contextlib.suppress(nats.errors.Error):
            await self.beat(gone=True)  # the dispatcher sends nothing more here
            await self.nc.flush(timeout=2)
        await super().stop()

    def subscriptions(self) -> int:
        """The NATS subscriptions this worker's connection holds now (read from the client's own table)."""
        return len(self.nc._subs)


async def serve_echo(nats_url: str, prefix: str, count: int) -> None:
    """`python -m bench.invocation echo`: run `count` echo workers (`<prefix>-<i>`, one NATS connection each)
    until SIGTERM/SIGINT or the end of stdin; print ECHO_READY when they pull and have sent a heartbeat; answer
    each ECHO_STATS line on stdin with one JSON line (`pool_stats`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stdin = asyncio.StreamReader(limit=CHILD_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with contextlib.AsyncExitStack() as stack:
        workers: list[EchoWorker] = []
        for i in range(count):
            worker_id = f"{prefix}-{i}"
            nc = await nats.connect(split_nats_urls(nats_url), connect_timeout=5, name=f"lorafn-echo-{worker_id}")
            # Closed, not drained: a worker's stop returns once it has answered all it took, and a drain would
            # wait on the subscription of the pull it cancelled.
            stack.push_async_callback(nc.close)
            worker = EchoWorker.for_worker(nc, worker_id)
            await worker.start()
            stack.push_async_callback(worker.stop)
            workers.append(worker)
        for worker in workers:
            await worker.beat()
            await worker.nc.flush()
        sys.stdout.write(ECHO_READY + "\n")
        sys.stdout.flush()
        stopping = asyncio.create_task(stop.wait())
        while not stop.is_set():
            line = asyncio.create_task(stdin.readline())
            await asyncio.wait({line, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not line.done():
                line.cancel()
                break
            command = line.result().decode().strip()
            if not command:  # end of stdin: the benchmark is gone
                break
            if command == ECHO_STATS:
                sys.stdout.write(json.dumps(pool_stats(workers)) + "\n")
                sys.stdout.flush()
        stopping.cancel()
    log.info("echo workers answered %s invocations", [w.answered for w in workers])


def pool_stats(workers: Sequence[EchoWorker]) -> dict[str, Any]:
    """Per worker: invocations answered, versions held, NATS subscriptions, bytes published per heartbeat
    since the last call (None when it sent none since); and the hop samples taken since the last call (which
    forgets both)."""
    samples: dict[str, tuple[float, float]] = {}
    for w in workers:
        samples.update(w.samples)
        w.samples = {}
    sent = {w.worker_id: w.sent_bytes[0] / w.sent_bytes[1] if w.sent_bytes[1] else None for w in workers}
    for w in workers:
        w.sent_bytes = [0, 0]
    return {
        "workers": {w.worker_id: {"answered": w.answered, "versions": len(w.held), "subscriptions": w.subscriptions(),
                                  "heartbeat_bytes": sent[w.worker_id]} for w in workers},
        "samples": samples,
    }


# -- child processes ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def child_process(argv: list[str], *, env: dict[str, str], log_path: Path,
                        ready: Callable[[asyncio.subprocess.Process], Awaitable[None]],
                        stdin: bool = False, stop_timeout_s: float = 10.0) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process (its own session) that is ready once `ready(proc)` returns; SIGTERM, then SIGKILL,
    when the context exits. Its stdout is a pipe, its stdin one when `stdin`; its stderr goes to `log_path`."""
    logf: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in finally
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=logf, start_new_session=True, limit=CHILD_LINE_LIMIT,
        )
        try:
            await asyncio.wait_for(ready(proc), START_TIMEOUT_S)
        except BaseException as e:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            if isinstance(e, Exception):
                raise RuntimeError(f"{argv[2]} did not start ({e!r}); its log ends with:\n" + "\n".join(tail)) from e
            raise
        yield proc
    finally:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        logf.close()


class EchoPool:
    """The benchmark's handle on the echo workers' process: their ids, and their stats on request."""

    def __init__(self, proc: asyncio.subprocess.Process, worker_ids: list[str]) -> None:
        self.proc = proc
        self.worker_ids = worker_ids

    async def stats(self) -> dict[str, Any]:
        """`pool_stats` of the child (its hop samples since the last call)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(ECHO_STATS.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), STATS_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"the echo workers' process exited (code {self.proc.returncode})")
        out: dict[str, Any] = json.loads(line)
        return out


def _service_env(servers: Servers, **extra: str) -> dict[str, str]:
    """The environment `lorafn up` gives its services (ours without LORAFN_*, plus the endpoints)."""
    from lorafn.services import child_env

    return child_env(nats_url=servers.nats_url, database_url=servers.database_url,
                     object_store=servers.object_store, extra=extra)


def _free_port() -> int:
    from lorafn.stack import free_ports

    return free_ports("127.0.0.1", 1)[0]


# -- measuring ------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    return {"calls": len(latencies_ms), "p50_ms": percentile(latencies_ms, 50), "p90_ms": percentile(latencies_ms, 90),
            "p99_ms": percentile(latencies_ms, 99), "mean_ms": sum(latencies_ms) / len(latencies_ms),
            "max_ms": max(latencies_ms)}


Call = Callable[[], Awaitable[None]]


async def timed_sequential(call: Call, n: int) -> tuple[list[float], float]:
    """`n` calls one after another: each call's latency (ms) and the wall time (s)."""
    out: list[float] = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t) * 1000)
    return out, time.perf_counter() - t0


async def timed_concurrent(calls: list[Call], n: int) -> tuple[list[float], float]:
    """`n` calls by len(calls) callers at once (caller i uses calls[i]): latencies (ms) and wall time (s)."""
    out: list[float] = []
    left = iter(range(n))

    async def caller(call: Call) -> None:
        for _ in left:  # the callers share one counter
            t = time.perf_counter()
            await call()
            out.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in calls))
    return out, time.perf_counter() - t0


class DirectCaller:
    """Invokes over NATS without the gateway, as a NATS client does (docs/nats.md): publishes to
    lora.invoke.<tenant>.<adapter> for the dispatcher, call i to adapter i mod len(adapters). With `workers`,
    publishes straight to those workers' work subjects in turn instead (no dispatcher).

    Per call it keeps the invocation id and the hop: from the publish ack to the worker's `started_at` (when
    its fetch of the work message returned)."""

    def __init__(self, nc: Client, tenant: str, *, adapters: Sequence[str] = (subjects.BASE_ADAPTER,),
                 workers: Sequence[str] = ()) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.tenant = tenant
        self.adapters = list(adapters)
        self.subjects = [subjects.invoke(tenant, a) for a in self.adapters]
        self.workers = [subjects.work(w) for w in workers]
        self._count = itertools.count()
        self.ids: list[str] = []
        self.hops_ms: list[float] = []

    def take(self) -> tuple[list[str], list[float]]:
        """The ids and hops of the calls since the last take."""
        out = self.ids, self.hops_ms
        self.ids, self.hops_ms = [], []
        return out

    async def __call__(self) -> None:
        i = next(self._count)
        adapter = self.adapters[i % len(self.adapters)]
        invocation_id = f"inv-{secrets.token_hex(12)}"
        reply = subjects.tenant_reply(self.tenant, invocation_id)  # the tenant's reply namespace
        loop = asyncio.get_running_loop()
        started: asyncio.Future[InvocationStarted] = loop.create_future()
        done: asyncio.Future[InvocationResult] = loop.create_future()

        async def on_reply(msg: Msg) -> None:
            kind = (msg.headers or {}).get(KIND_HEADER)
            if kind == subjects.KIND_STARTED and not started.done():
                started.set_result(InvocationStarted.decode(msg.data))
            elif kind == subjects.KIND_RESULT and not done.done():
                done.set_result(InvocationResult.decode(msg.data))

        sub = await self.nc.subscribe(reply, cb=on_reply)  # before publishing, so nothing is missed
        try:
            invocation = Invocation(id=invocation_id, tenant=self.tenant,
                                    adapter=None if adapter == subjects.BASE_ADAPTER else adapter, prompt=PROMPT,
                                    sampling=Sampling(max_tokens=MAX_TOKENS), stream=False, reply_to=reply)
            headers = {subjects.MSG_ID_HEADER: invocation_id}
            if self.workers:
                subject = self.workers[i % len(self.workers)]
                headers |= WorkHeaders(subject=self.subjects[i % len(self.subjects)]).headers()
            else:
                subject = self.subjects[i % len(self.subjects)]
            await self.js.publish(subject, invocation.encode(), headers=headers)
            acked = time.time()
            result = await asyncio.wait_for(done, CALL_TIMEOUT_S)
        finally:
            await sub.unsubscribe()
        if result.status != "succeeded":
            raise RuntimeError(f"direct invocation {invocation_id} of {adapter} failed: {result.error}")
        if not started.done():
            raise RuntimeError(f"direct invocation {invocation_id} got its result without a started event")
        self.ids.append(invocation_id)
        self.hops_ms.append((started.result().started_at - acked) * 1000)


class GatewayCaller:
    """Invokes through the gateway: a synchronous FaaS call of the bare backbone, with httpx."""

    def __init__(self, http: httpx.AsyncClient, tenant: str) -> None:
        self.http = http
        self.path = f"/v1/functions/{tenant}/{subjects.BASE_ADAPTER}/invocations"
        self.body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS}

    async def __call__(self) -> None:
        r = await self.http.post(self.path, json=self.body)
        if r.status_code != 200 or r.json().get("status") != "succeeded":
            raise RuntimeError(f"gateway invocation answered {r.status_code}: {r.text[:300]}")


class RawHttpCaller:
    """The same FaaS call over a minimal HTTP/1.1 keep-alive client (asyncio streams, the request bytes built
    once per adapter, the response read by its Content-Length): what the path costs without an HTTP library's
    overhead in the caller. httpx spends about 0.5 ms of CPU per request on this machine, on the same 2 cores
    as the services, so it would be counted as latency the gateway adds. Call i goes to adapter
    i mod len(adapters)."""

    def __init__(self, host: str, port: int, tenant: str, key: str, *,
                 adapters: Sequence[str] = (subjects.BASE_ADAPTER,)) -> None:
        self.host, self.port = host, port
        body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode()
        self.requests = [
            (f"POST /v1/functions/{tenant}/{adapter}/invocations HTTP/1.1\r\nHost: {host}:{port}\r\n"
             f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            for adapter in adapters
        ]
        self._count = itertools.count()
        # Idle keep-alive connections (reader, writer, last used): one per concurrent caller.
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle connection the server cannot have closed yet (uvicorn drops idle ones after 5 s), or a new one."""
        while self._idle:
            reader, writer, used = self._idle.pop()
            if time.monotonic() - used < IDLE_REUSE_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def __call__(self) -> None:
        request = self.requests[next(self._count) % len(self.requests)]
        reader, writer = await self._connection()
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CALL_TIMEOUT_S)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = {k.strip().lower(): v.strip() for k, v in fields.items()}.get("content-length")
        if length is None:
            writer.close()
            raise RuntimeError(f"the gateway answered {status} without a Content-Length")
        body = await asyncio.wait_for(reader.readexactly(int(length)), CALL_TIMEOUT_S)
        self._idle.append((reader, writer, time.monotonic()))
        if status != 200 or json.loads(body).get("status") != "succeeded":
            raise RuntimeError(f"gateway invocation answered {status}: {body[:300]!r}")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer, _ in idle:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _bench_tenant(database_url: str) -> tuple[str, str]:
    """A tenant of the benchmark's own (a fresh name: its subjects overlap no other consumer) and its key."""
    from storage import repo
    from storage.settings import DatabaseSettings

    name = f"bench-{secrets.token_hex(4)}"
    engine = repo.create_engine(DatabaseSettings(url=database_url))
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            tenant = await repo.get_or_create_tenant(session, name=name)
            key = await repo.create_api_key(session, tenant=tenant, label="invocation benchmark")
    finally:
        await engine.dispose()
    return name, key


def adapter_names(count: int) -> list[str]:
    return [f"a{i:05d}" for i in range(count)]


async def _register_adapters(database_url: str, tenant: str, count: int) -> list[str]:
    """Register `count` adapters of `tenant` in Postgres (rows only, each with one version of rank
    ADAPTER_RANK whose sha256 is made up: the echo workers load nothing); their names."""
    from storage import repo
    from storage.settings import DatabaseSettings

    names = adapter_names(count)
    engine = repo.create_engine(DatabaseSettings(url=database_url))
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            row = await repo.get_tenant(session, name=tenant)
            assert row is not None
            for name in names:
                sha = hashlib.sha256(f"{tenant}/{name}".encode()).hexdigest()
                facts = repo.VersionFacts(
                    sha256=sha, max_rank=ADAPTER_RANK, ranks={"q_proj": ADAPTER_RANK}, lora_alpha=16.0,
                    use_rslora=False, target_modules=["q_proj"], num_layers=1, base_model=None, dtype="float16",
                    bytes=ADAPTER_BYTES, object_key=f"bench/{sha}")
                await repo.register_version(session, tenant=row, name=name, facts=facts)
    finally:
        await engine.dispose()
    return names


async def _components(servers: Servers, tenant: str, http: httpx.AsyncClient, n: int) -> dict[str, Any]:
    """Pieces of the gateway's per-call work, each timed alone, one call at a time."""
    from sqlalchemy import text

    from storage import repo
    from storage.settings import DatabaseSettings

    async def healthz() -> None:
        (await http.get("/healthz")).raise_for_status()

    settings = DatabaseSettings(url=servers.database_url)
    engine = repo.create_engine(settings)  # the gateway's engine for everything but invocation rows
    rows = repo.create_fast_write_engine(settings)  # ... and the one for invocation rows
    try:
        async with repo.session_factory(engine)() as session:
            row = await repo.get_tenant(session, name=tenant)
        assert row is not None

        async def insert_as_gateway() -> None:
            await repo.insert_invocation(rows, invocation_id=f"inv_bench{secrets.token_hex(10)}", tenant=row,
                                         adapter=None, request_hash="0" * 64)

        async def insert_in_transaction() -> None:  # the ORM way: pre-ping, BEGIN, INSERT, COMMIT
            async with repo.session_factory(engine)() as session, session.begin():
                await repo.create_invocation(session, invocation_id=f"inv_bench{secrets.token_hex(10)}",
                                             tenant=row, adapter=None, request_hash="0" * 64)

        async with engine.connect() as conn:
            async def select_1() -> None:
                await conn.execute(text("SELECT 1"))

            out: dict[str, Any] = {}
            pieces: dict[str, Call] = {"http_healthz": healthz, "pg_invocation_insert": insert_as_gateway,
                                       "pg_insert_transaction": insert_in_transaction, "pg_select_1": select_1}
            for name, call in pieces.items():
                await timed_sequential(call, min(n, 20))  # warm
                out[name] = summary((await timed_sequential(call, n))[0])
    finally:
        await rows.dispose()
        await engine.dispose()
    return out


# -- the stack --------------------------------------------------------------------------------------------


@dataclass
class BenchStack:
    """The running services of one benchmark: the echo workers, the scheduler and the gateway (child
    processes), and this process's clients."""

    servers: Servers
    nc: Client
    tenant: str
    key: str
    echo: EchoPool
    scheduler_pid: int
    gateway_pid: int
    port: int
    http: httpx.AsyncClient

    def raw(self, adapters: Sequence[str] = (subjects.BASE_ADAPTER,)) -> RawHttpCaller:
        return RawHttpCaller("127.0.0.1", self.port, self.tenant, self.key, adapters=adapters)


@contextlib.asynccontextmanager
async def bench_stack(servers: Servers, options: BenchOptions, tenant: str, key: str,
                      work_dir: Path | None = None) -> AsyncIterator[BenchStack]:
    """Start the echo workers, then the scheduler (ready once it routes to all of them), then the gateway
    (ready once /readyz says so); stop them in the reverse order."""
    nc = await nats.connect(split_nats_urls(servers.nats_url), connect_timeout=5)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(nc.close)
        await ensure_streams(nc.jetstream())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lorafn-bench-"))) \
            if work_dir is None else work_dir

        async def echo_ready(proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if line.decode().strip() != ECHO_READY:
                raise RuntimeError(f"the echo workers said {line!r}")

        prefix = f"echo-{tenant}"
        echo_proc = await stack.enter_async_context(child_process(
            [sys.executable, "-m", "bench.invocation", "echo", "--prefix", prefix,
             "--workers", str(options.echo_workers)],
            env=_service_env(servers), log_path=tmp / "echo.log", ready=echo_ready, stdin=True,
        ))
        echo = EchoPool(echo_proc, [f"{prefix}-{i}" for i in range(options.echo_workers)])

        beats: asyncio.Queue[SchedulerHeartbeat] = asyncio.Queue()

        async def on_scheduler(msg: Msg) -> None:
            with contextlib.suppress(MessageInvalid):
                beats.put_nowait(SchedulerHeartbeat.decode(msg.data))

        beat_sub = await nc.subscribe(subjects.SCHEDULER_EVENTS_ALL, cb=on_scheduler)

        async def scheduler_ready(proc: asyncio.subprocess.Process) -> None:
            while True:  # its id ends with its pid; it counts the workers it routes to
                beat = await beats.get()
                if beat.scheduler_id.endswith(f"-{proc.pid}") and beat.workers >= options.echo_workers:
                    return

        scheduler = await stack.enter_async_context(child_process(
            [sys.executable, "-m", "scheduler"], env=_service_env(servers), log_path=tmp / "scheduler.log",
            ready=scheduler_ready,
        ))
        await beat_sub.unsubscribe()
        port = _free_port()
        gateway_url = f"http://127.0.0.1:{port}"

        async def gateway_ready(proc: asyncio.subprocess.Process) -> None:
            async with httpx.AsyncClient(base_url=gateway_url, timeout=1.0) as probe:
                while True:
                    if proc.returncode is not None:
                        raise RuntimeError(f"the gateway exited with code {proc.returncode}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await probe.get("/readyz")).status_code == 200:
                            return
                    await asyncio.sleep(0.1)

        gateway = await stack.enter_async_context(child_process(
            [sys.executable, "-m", "gateway"], env=_service_env(servers, LORAFN_GATEWAY__HTTP__PORT=str(port)),
            log_path=tmp / "gateway.log", ready=gateway_ready,
        ))
        limits = httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency)
        http = await stack.enter_async_context(httpx.AsyncClient(
            base_url=gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=CALL_TIMEOUT_S, limits=limits))
        yield BenchStack(servers=servers, nc=nc, tenant=tenant, key=key, echo=echo, scheduler_pid=scheduler.pid,
                         gateway_pid=gateway.pid, port=port, http=http)


# -- table 1: the invocation path -------------------------------------------------------------------------


def _hop_pieces(samples: dict[str, list[float]], ids: list[str]) -> dict[str, Any]:
    """The echo workers' samples of the given calls: the dispatcher's part and the worker's pickup."""
    got = [samples[i] for i in ids if i in samples]
    if not got:
        return {}
    return {"to_work_stream": summary([s[0] for s in got]), "worker_pickup": summary([s[1] for s in got])}


async def measure_path(s: BenchStack, options: BenchOptions) -> dict[str, Any]:
    """Table 1: the four variants, interleaved; the dispatch hop; the gateway's pieces."""
    direct = DirectCaller(s.nc, s.tenant)
    direct_work = DirectCaller(s.nc, s.tenant, workers=s.echo.worker_ids)
    raw = s.raw()
    try:
        variants: dict[str, Call] = {"direct_work": direct_work, "direct": direct, "gateway": raw,
                                     "gateway_httpx": GatewayCaller(s.http, s.tenant)}
        for call in variants.values():  # warm-up: connections, caches, lazy imports
            await timed_sequential(call, options.warmup)
            await timed_concurrent([call] * options.concurrency, options.warmup)
        direct.take()
        direct_work.take()
        await s.echo.stats()  # forget the warm-up's samples

        seq: dict[str, list[float]] = {name: [] for name in variants}
        seq_wall: dict[str, float] = dict.fromkeys(variants, 0.0)
        cpu: dict[str, dict[str, float]] = {name: {"gateway": 0.0, "scheduler": 0.0} for name in variants}
        pids = {"gateway": s.gateway_pid, "scheduler": s.scheduler_pid}
        for _ in range(options.rounds):
            for name, call in variants.items():  # A, B, C, D, A, B, C, D, ...
                before = {k: process_cpu_s(pid) for k, pid in pids.items()}
                lat, wall = await timed_sequential(call, options.calls_per_round)
                for k, pid in pids.items():
                    cpu[name][k] += process_cpu_s(pid) - before[k]
                seq[name] += lat
                seq_wall[name] += wall
        hops = {"sequential": direct.take(), "sequential_work": direct_work.take()}
        samples = {"sequential": (await s.echo.stats())["samples"]}

        conc: dict[str, list[float]] = {name: [] for name in variants}
        conc_wall: dict[str, float] = dict.fromkeys(variants, 0.0)
        for _ in range(options.concurrent_rounds):
            for name, call in variants.items():
                lat, wall = await timed_concurrent([call] * options.concurrency, options.concurrent_calls_per_round)
                conc[name] += lat
                conc_wall[name] += wall
        hops |= {"concurrent": direct.take(), "concurrent_work": direct_work.take()}
        samples["concurrent"] = (await s.echo.stats())["samples"]
    finally:
        await raw.aclose()
    components = await _components(s.servers, s.tenant, s.http, options.component_calls)

    result: dict[str, Any] = {"variants": {}, "components": components}
    for name in variants:
        result["variants"][name] = {
            "sequential": {**summary(seq[name]), "invocations_per_s": len(seq[name]) / seq_wall[name],
                           "gateway_cpu_ms_per_call": cpu[name]["gateway"] / len(seq[name]) * 1000,
                           "scheduler_cpu_ms_per_call": cpu[name]["scheduler"] / len(seq[name]) * 1000},
            "concurrent": {**summary(conc[name]), "concurrency": options.concurrency,
                           "invocations_per_s": len(conc[name]) / conc_wall[name]},
        }
    v = result["variants"]
    d = v["direct"]

    def added_by(g: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "p50_ms": g["sequential"]["p50_ms"] - d["sequential"]["p50_ms"],
            "p99_ms": g["sequential"]["p99_ms"] - d["sequential"]["p99_ms"],
            "concurrent_p50_ms": g["concurrent"]["p50_ms"] - d["concurrent"]["p50_ms"],
            "concurrent_p99_ms": g["concurrent"]["p99_ms"] - d["concurrent"]["p99_ms"],
        }
        out["p50_within_target"] = out["p50_ms"] <= TARGET_P50_MS
        out["p99_within_target"] = out["p99_ms"] <= TARGET_P99_MS
        return out

    result["added"] = added_by(v["gateway"])  # the targets are judged on the lean client
    result["added_httpx"] = added_by(v["gateway_httpx"])
    w = v["direct_work"]
    result["dispatch_hop"] = {
        # what going through the dispatcher adds to a direct call, per percentile
        "difference": {
            "p50_ms": d["sequential"]["p50_ms"] - w["sequential"]["p50_ms"],
            "p99_ms": d["sequential"]["p99_ms"] - w["sequential"]["p99_ms"],
            "concurrent_p50_ms": d["concurrent"]["p50_ms"] - w["concurrent"]["p50_ms"],
            "concurrent_p99_ms": d["concurrent"]["p99_ms"] - w["concurrent"]["p99_ms"],
        },
        # publish ack (lora.invoke) -> the echo worker's fetch of the work message returned, per call
        "measured": {"sequential": summary(hops["sequential"][1]), "concurrent": summary(hops["concurrent"][1]),
                     **{f"{k}_pieces": _hop_pieces(samples[k], hops[k][0]) for k in ("sequential", "concurrent")}},
        # publish ack (lora.work) -> the echo worker's fetch returned: the pickup alone, no dispatcher
        "without_dispatcher": {"sequential": summary(hops["sequential_work"][1]),
                               "concurrent": summary(hops["concurrent_work"][1])},
    }
    result["calls"] = sum(len(x) for x in seq.values()) + sum(len(x) for x in conc.values()) \
        + 2 * len(variants) * options.warmup
    return result


# -- table 2: many adapters ----------------------------------------------------------------------------------


async def consumer_counts(js: JetStreamContext) -> dict[str, int]:
    """JetStream consumers of each lorafn stream now."""
    return {spec.name: int((await js.stream_info(spec.name)).state.consumer_count) for spec in ALL_STREAMS}


async def measure_adapters(s: BenchStack, options: BenchOptions, names: Sequence[str]) -> dict[str, Any]:
    """Table 2: for each adapter count N, calls rotating over N adapters, directly and through the gateway; and a
    control: the first N measured a second time, by callers of their own, in the same rounds. The control's
    ratios to the first N are this run's noise: what the ratios of the other N would be if the adapter count
    made no difference at all."""
    paths = ("direct", "gateway")
    per_round = options.adapter_calls // options.adapter_rounds
    first = options.adapter_counts[0]
    groups = {str(n): n for n in options.adapter_counts} | {CONTROL: first}
    # Rounds interleave the groups (round 1 of N=10, 100, 1000 and the control, then round 2, ...), so that drift
    # over the run (tables growing, the machine's other load) falls on every N alike.
    callers: dict[str, dict[str, Any]] = {}
    lat: dict[str, dict[str, list[float]]] = {}
    wall: dict[str, dict[str, float]] = {}
    scheduler_cpu: dict[str, dict[str, float]] = {}
    counted: dict[str, tuple[dict[str, int], dict[str, Any]]] = {}  # consumers and echo stats after the warm-up
    try:
        for group, n in groups.items():
            callers[group] = {"direct": DirectCaller(s.nc, s.tenant, adapters=names[:n]),
                              "gateway": s.raw(names[:n])}
            for call in callers[group].values():  # each adapter once: resolved, placed on a worker, cached
                await timed_concurrent([call] * options.adapter_concurrency, n)
            callers[group]["direct"].take()
            counted[group] = (await consumer_counts(s.nc.jetstream()), await s.echo.stats())
            lat[group] = {p: [] for p in paths}
            wall[group] = dict.fromkeys(paths, 0.0)
            scheduler_cpu[group] = dict.fromkeys(paths, 0.0)
        for _ in range(options.adapter_rounds):
            for group in groups:
                for name in paths:
                    call = callers[group][name]
                    before = process_cpu_s(s.scheduler_pid)
                    got, took = await timed_concurrent([call] * options.adapter_concurrency, per_round)
                    scheduler_cpu[group][name] += process_cpu_s(s.scheduler_pid) - before
                    lat[group][name] += got
                    wall[group][name] += took
    finally:
        for c in callers.values():
            await c["gateway"].aclose()
    rows: dict[str, Any] = {}
    for group in groups:
        consumers, stats = counted[group]
        row: dict[str, Any] = {p: {**summary(lat[group][p]), "invocations_per_s": len(lat[group][p]) / wall[group][p],
                                   "scheduler_cpu_ms_per_call": scheduler_cpu[group][p] / len(lat[group][p]) * 1000}
                               for p in paths}
        row["direct"]["hop"] = summary(callers[group]["direct"].take()[1])
        row["consumers"] = consumers
        row["echo_subscriptions"] = {w: x["subscriptions"] for w, x in stats["workers"].items()}
        row["echo_versions"] = {w: x["versions"] for w, x in stats["workers"].items()}
        beats = [x["heartbeat_bytes"] for x in stats["workers"].values() if x["heartbeat_bytes"] is not None]
        row["echo_heartbeat_bytes"] = max(beats, default=None)  # None: no heartbeat during this N's warm-up
        rows[group] = row

    base = rows[str(first)]
    ratios: dict[str, Any] = {}
    for group, row in rows.items():
        ratios[group] = {}
        for p in paths:
            r = {k: row[p][k] / base[p][k] for k in ("invocations_per_s", "p50_ms", "p99_ms")}
            r["within_target"] = (r["invocations_per_s"] >= 1 - TARGET_ADAPTER_RATIO
                                  and r["p50_ms"] <= 1 + TARGET_ADAPTER_RATIO and r["p99_ms"] <= 1 + TARGET_ADAPTER_RATIO)
            ratios[group][p] = r
    by_count = {group: rows[group] for group in groups if group != CONTROL}
    counts_equal = len({json.dumps(row["consumers"], sort_keys=True) for row in by_count.values()}) == 1
    subs_equal = len({json.dumps(row["echo_subscriptions"], sort_keys=True) for row in by_count.values()}) == 1
    return {"counts": list(options.adapter_counts), "calls_per_path": per_round * options.adapter_rounds,
            "concurrency": options.adapter_concurrency, "rounds": options.adapter_rounds,
            "echo_workers": options.echo_workers, "by_count": by_count,
            "ratios": {g: r for g, r in ratios.items() if g != CONTROL},
            "control": {"label": CONTROL, "of": first, **rows[CONTROL], "ratios": ratios[CONTROL]},
            "consumers_equal_across_counts": counts_equal, "subscriptions_equal_across_counts": subs_equal,
            "calls": len(groups) * len(paths) * per_round * options.adapter_rounds
            + len(paths) * (sum(options.adapter_counts) + first)}


async def measure(servers: Servers, options: BenchOptions = BenchOptions(), *,
                  work_dir: Path | None = None) -> dict[str, Any]:
    """Register the adapters, start the echo workers, the scheduler and the gateway against `servers`, and
    measure both tables."""
    started = time.monotonic()
    tenant, key = await _bench_tenant(servers.database_url)
    names = await _register_adapters(servers.database_url, tenant, max(options.adapter_counts, default=0))
    async with bench_stack(servers, options, tenant, key, work_dir) as s:
        setup_s = time.monotonic() - started
        path = await measure_path(s, options)
        adapters = await measure_adapters(s, options, names)
    return {
        "options": {**options.__dict__, "adapter_counts": list(options.adapter_counts)},
        "prompt_words": len(PROMPT.split()),
        "max_tokens": MAX_TOKENS,
        "targets": {"added_p50_ms": TARGET_P50_MS, "added_p99_ms": TARGET_P99_MS,
                    "adapter_ratio": TARGET_ADAPTER_RATIO},
        "setup_s": setup_s,
        **path,
        "adapters": adapters,
        "total_calls": path["calls"] + adapters["calls"],
        "elapsed_s": time.monotonic() - started,
    }


# -- report ---------------------------------------------------------------------------------------------


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _bytes(n: float | None) -> str:
    return "-" if n is None else str(round(n))


def print_report(payload: dict[str, Any]) -> None:
    """The benchmark's tables: the variants, the added latency against its targets, the dispatch hop, the
    gateway's pieces, and the many-adapters table."""
    from bench.report import print_table

    v, a, ah, c = payload["variants"], payload["added"], payload["added_httpx"], payload["components"]
    hop = payload["dispatch_hop"]
    conc = payload["options"]["concurrency"]
    rows: list[list[Any]] = []
    for name, label in (("direct", "direct (NATS, through the dispatcher)"),
                        ("direct_work", "direct to a worker's work subject (no dispatcher)"),
                        ("gateway", "via gateway (HTTP, lean client)"),
                        ("gateway_httpx", "via gateway (HTTP, httpx client)")):
        s, k = v[name]["sequential"], v[name]["concurrent"]
        gw_cpu = s["gateway_cpu_ms_per_call"] if name.startswith("gateway") else ""
        rows.append([label, s["calls"], s["p50_ms"], s["p99_ms"], s["invocations_per_s"], k["p50_ms"], k["p99_ms"],
                     k["invocations_per_s"], gw_cpu, s["scheduler_cpu_ms_per_call"]])
    diff = hop["difference"]
    rows.append(["dispatch hop (direct - direct to the work subject)", "", diff["p50_ms"], diff["p99_ms"], "",
                 diff["concurrent_p50_ms"], diff["concurrent_p99_ms"], "", "", ""])
    m = hop["measured"]
    rows.append(["dispatch hop, timed per call (publish ack -> worker has it)", m["sequential"]["calls"],
                 m["sequential"]["p50_ms"], m["sequential"]["p99_ms"], "", m["concurrent"]["p50_ms"],
                 m["concurrent"]["p99_ms"], "", "", ""])
    for label, x in (("added by the gateway (lean client)", a), ("added by the gateway (httpx client)", ah)):
        rows.append([label, "", x["p50_ms"], x["p99_ms"], "", x["concurrent_p50_ms"], x["concurrent_p99_ms"], "", "", ""])
    rows.append(["target (added, lean client)", "", f"<= {TARGET_P50_MS:g}", f"<= {TARGET_P99_MS:g}", "", "", "", "",
                 "", ""])
    rows.append(["target met", "", _yes(a["p50_within_target"]), _yes(a["p99_within_target"]), "", "", "", "", "", ""])
    print_table(
        f"invocation path, {payload['options']['echo_workers']} instant echo workers behind the scheduler "
        f"(ms; one caller, then {conc} concurrent callers)",
        ["path", "calls", "p50", "p99", "inv/s seq", f"p50 c{conc}", f"p99 c{conc}", f"inv/s c{conc}",
         "gateway CPU/call", "scheduler CPU/call"],
        rows,
    )
    hop_rows: list[list[Any]] = []
    for mode in ("sequential", "concurrent"):
        pieces = m.get(f"{mode}_pieces") or {}
        for key, label in (("to_work_stream", "dispatcher: invocation stored -> work message stored"),
                           ("worker_pickup", "worker: work message stored -> its fetch returned")):
            if key in pieces:
                x = pieces[key]
                hop_rows.append([mode, label, x["calls"], x["p50_ms"], x["p99_ms"], x["mean_ms"]])
        x = m[mode]
        hop_rows.append([mode, "whole hop: publish ack -> the worker's fetch returned", x["calls"], x["p50_ms"],
                         x["p99_ms"], x["mean_ms"]])
        x = hop["without_dispatcher"][mode]
        hop_rows.append([mode, "no dispatcher: publish ack (work subject) -> fetch returned", x["calls"], x["p50_ms"],
                         x["p99_ms"], x["mean_ms"]])
    print_table("the dispatch hop, direct calls (ms; stream timestamps and the worker's clock)",
                ["callers", "piece", "calls", "p50", "p99", "mean"], hop_rows)
    labels = {"http_healthz": "HTTP round trip, no work (GET /healthz)",
              "pg_invocation_insert": "Postgres row insert as the gateway does it (one statement, autocommit)",
              "pg_insert_transaction": "the same row through an ORM session (pre-ping, BEGIN, INSERT, COMMIT)",
              "pg_select_1": "Postgres round trip (SELECT 1)"}
    print_table("pieces of the gateway's per-call work, timed alone (ms)",
                ["piece", "calls", "p50", "p99", "mean"],
                [[labels[k], x["calls"], x["p50_ms"], x["p99_ms"], x["mean_ms"]] for k, x in c.items()])
    print_adapters(payload["adapters"])


def print_adapters(t: dict[str, Any]) -> None:
    from bench.report import print_table

    rows: list[list[Any]] = []
    control = t.get("control")
    groups = [(n, row, t["ratios"][n]) for n, row in t["by_count"].items()]
    if control is not None:
        groups.append((f"{control['of']} again (control)", control, control["ratios"]))
    for n, row, ratios in groups:
        consumers = "/".join(str(row["consumers"][spec.name]) for spec in ALL_STREAMS)
        subs = "/".join(str(x) for x in row["echo_subscriptions"].values())
        for p, label in (("direct", "direct (NATS)"), ("gateway", "gateway (lean client)")):
            x, r = row[p], ratios[p]
            rows.append([n, label, x["calls"], x["invocations_per_s"], x["p50_ms"], x["p99_ms"],
                         f"{r['invocations_per_s']:.2f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                         _yes(r["within_target"]), x["hop"]["p50_ms"] if "hop" in x else "",
                         x["scheduler_cpu_ms_per_call"], _bytes(row["echo_heartbeat_bytes"]), consumers, subs])
    first = t["counts"][0]
    streams = "/".join(spec.name.removeprefix("LORAFN_").lower() for spec in ALL_STREAMS)
    print_table(
        f"many adapters: calls rotating over N adapters, {t['concurrency']} callers, {t['echo_workers']} echo "
        f"workers (ms; ratios to N={first}, target within {TARGET_ADAPTER_RATIO:.0%})",
        ["N", "path", "calls", "inv/s", "p50", "p99", f"inv/s ÷ N={first}", f"p50 ÷ N={first}", f"p99 ÷ N={first}",
         "within 10%", "hop p50", "scheduler CPU/call", "heartbeat bytes", f"consumers {streams}",
         "echo subs per worker"],
        rows,
    )


def run(*, options: BenchOptions | None = None) -> dict[str, Any]:
    """`python -m bench invocation`: a throwaway stack on free ports, the benchmark, its tables and JSON."""
    from bench.report import write
    from lorafn.bootstrap import object_store_settings, prepare_services
    from lorafn.stack import LocalStack, StackConfig, free_stack_ports

    with tempfile.TemporaryDirectory(prefix="lorafn-bench-invocation-") as tmp:
        stack = LocalStack(StackConfig(state_dir=Path(tmp) / "stack", ports=free_stack_ports()))
        endpoints = stack.start()
        try:
            store = object_store_settings(endpoints)
            asyncio.run(prepare_services(nats_url=endpoints.nats_url, database_url=endpoints.database_url,
                                         object_store=store))
            servers = Servers(nats_url=endpoints.nats_url, database_url=endpoints.database_url, object_store=store)
            freeze_startup_heap()  # the callers' own collector pauses are not the path's latency
            payload = asyncio.run(measure(servers, options or BenchOptions(), work_dir=Path(tmp)))
        finally:
            stack.stop()
    print_report(payload)
    write("invocation", payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.invocation echo ...` runs the echo workers (NATS URL from LORAFN_NATS__URL)."""
    parser = argparse.ArgumentParser(prog="python -m bench.invocation")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="run echo workers until SIGTERM or the end of stdin")
    echo.add_argument("--prefix", required=True, help="worker ids are <prefix>-0, <prefix>-1, ...")
    echo.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    freeze_startup_heap()  # as the workers it stands in for do
    asyncio.run(serve_echo(os.environ["LORAFN_NATS__URL"], args.prefix, args.workers))


if __name__ == "__main__":
    main()
