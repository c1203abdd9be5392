"""What the invocation path adds: HTTP -> gateway -> NATS JetStream -> worker -> reply, with an instant worker.

The engine is replaced by an echo peer (`EchoPeer`, run in a process of its own): a real JetStream pull
consumer that answers every invocation at once following the worker contract (started event, token chunks
when streaming, the result recorded in the results stream, then sent to the reply subject, then the ack).
Two variants call the same echo, one call of the bare backbone each (a short prompt, 4 tokens, no
streaming):

- direct: this process publishes the `Invocation` to JetStream (awaiting the publish ack) and waits for the
  result on its reply subject (`lora.reply.<id>`, subscribed before the publish), as a NATS client does;
- gateway: this process POSTs `/v1/functions/<tenant>/_base/invocations` (synchronous FaaS call) to the
  gateway, run as `python -m gateway` (uvicorn) on a free port, over one keep-alive connection per
  concurrent caller of a minimal HTTP/1.1 client (`RawHttpCaller`);
- gateway_httpx: the same call with httpx, a full HTTP library, which costs about 0.5 ms of the caller's CPU
  per request here (on the same 2 cores as every service, so it shows up as latency).

Added latency = gateway - direct, per percentile (p50 - p50, p99 - p99); the targets are judged on the lean
client (what the path adds, not the caller's HTTP library) and the httpx figures are reported beside them.
The gateway process's CPU time per call is read from /proc around each sequential round. The variants are
interleaved in rounds (A, B, C, A, B, C, ...) after a warm-up of both, so that the noise of a shared machine hits both alike:
first sequential rounds (one call at a time: latency, sequential invocations/s), then rounds with
`concurrency` callers (invocations/s under load, and the latency it costs).

To say where the gateway's time goes, the same process then times, one at a time, the pieces the gateway
does per call besides the NATS work both variants share: an HTTP round trip to the gateway that does
nothing (`GET /healthz`, with the same client), the Postgres insert of the invocation row exactly as the
gateway does it (`repo.insert_invocation`: one autocommit statement, `synchronous_commit off`), the same row
through an ORM session for comparison (pre-ping, BEGIN, INSERT, COMMIT) and a bare Postgres round trip
(`SELECT 1`).

`run()` starts NATS, Postgres and S3 with the `lorafn up` launcher on free ports in a temporary directory;
`measure()` takes running servers (the test fixtures' for the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from protocol import subjects
from protocol.messages import (
    Invocation,
    InvocationResult,
    InvocationStarted,
    Sampling,
    Timings,
    TokenChunk,
    Usage,
)
from protocol.results import record_result
from protocol.streams import ensure_streams
from storage.settings import ObjectStoreSettings

log = logging.getLogger(__name__)

KIND_HEADER = subjects.KIND_HEADER
PROMPT = "hello from the invocation benchmark"
MAX_TOKENS = 4
TARGET_P50_MS = 2.0  # targets of the gateway's added latency
TARGET_P99_MS = 10.0
ECHO_READY = "ready"
ECHO_BATCH = 32  # messages per pull request of the echo peer
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0
IDLE_REUSE_S = 2.0  # the lean client reuses a keep-alive connection idle for less than this


@dataclass(frozen=True)
class Servers:
    """The NATS, Postgres and S3 servers the benchmark runs against."""

    nats_url: str
    database_url: str
    object_store: ObjectStoreSettings


@dataclass(frozen=True)
class BenchOptions:
    """How many calls: `warmup` per variant, then rounds of each variant in turn."""

    warmup: int = 100
    rounds: int = 10  # sequential rounds per variant
    calls_per_round: int = 100
    concurrency: int = 16
    concurrent_rounds: int = 4  # rounds per variant with `concurrency` callers
    concurrent_calls_per_round: int = 320
    component_calls: int = 200  # calls of each component measured on its own


# -- the echo peer ------------------------------------------------------------------------------------


@dataclass
class EchoPeer:
    """A worker with an instant engine: answers every invocation of `filter_subject` at once.

    Follows the worker contract: `InvocationStarted` on lora.evt.invocation.started, `TokenChunk`s with
    their indices when the invocation streams, the `InvocationResult` recorded in the results stream
    (`Nats-Msg-Id: result-<id>`, awaited) and then sent to `reply_to`, and the ack last. The output is the
    prompt's first `max_tokens` words. Subclasses change the answer through `respond` and `chunk_rounds`
    (the gateway tests use one that fails, stalls or repeats chunks on request).
    """

    nc: Client
    consumer: str
    filter_subject: str
    worker_id: str = "bench-echo"
    tier: str | None = None  # reported as adapter_tier
    load_ms: float = 0.0  # reported as the adapter's load time
    batch: int = ECHO_BATCH  # messages per pull request
    answered: int = 0
    seen: list[Invocation] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _psub: Any = None
    _answering: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        """Create the durable consumer (replacing one left by an earlier run) and start pulling."""
        js = self.nc.jetstream()
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(subjects.INVOCATIONS_STREAM, self.consumer)
        config = ConsumerConfig(durable_name=self.consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
                                max_deliver=3, filter_subject=self.filter_subject)
        self._psub = await js.pull_subscribe(self.filter_subject, durable=self.consumer,
                                             stream=subjects.INVOCATIONS_STREAM, config=config)
        self._task = asyncio.create_task(self._run(), name="echo-pull")

    async def stop(self) -> None:
        """Stop pulling, finish the answers under way, delete the consumer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._answering:
            await asyncio.gather(*self._answering, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
        with contextlib.suppress(Exception):
            # A work-queue stream takes one consumer per subject: leave the subjects free for others.
            await self.nc.jetstream().delete_consumer(subjects.INVOCATIONS_STREAM, self.consumer)

    async def _run(self) -> None:
        while True:
            try:
                msgs = await self._psub.fetch(self.batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in msgs:
                task = asyncio.create_task(self._answer(msg))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)

    def words(self, inv: Invocation) -> list[str]:
        """The words of the prompt (or of the last chat message)."""
        source = inv.prompt if inv.prompt is not None else (inv.messages or [])[-1].content
        return source.split()

    def chunk_rounds(self, inv: Invocation) -> int:
        """How many times the chunks are sent (a redelivered generation sends them again)."""
        return 1

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

    async def _answer(self, msg: Msg) -> None:
        try:
            inv = Invocation.decode(msg.data)
        except Exception:
            log.warning("not an Invocation; terminating it", exc_info=True)
            await msg.term()
            return
        self.seen.append(inv)
        started = time.time()
        event = InvocationStarted(invocation_id=inv.id, worker_id=self.worker_id, adapter_tier=self.tier,  # type: ignore[arg-type]
                                  load_ms=self.load_ms).encode()
        await self.nc.publish(subjects.invocation_event("started"), event)
        if inv.reply_to:
            await self.nc.publish(inv.reply_to, event, headers={KIND_HEADER: subjects.KIND_STARTED})
        result = await self.respond(inv, started)
        if inv.stream and inv.reply_to and result.status == "succeeded":
            words = result.text.split(" ") if result.text else []
            for _ in range(self.chunk_rounds(inv)):
                for i, word in enumerate(words):
                    chunk = TokenChunk(invocation_id=inv.id, index=i, token_ids=[i], text=word if i == 0 else " " + word)
                    await self.nc.publish(inv.reply_to, chunk.encode(), headers={KIND_HEADER: subjects.KIND_CHUNK})
        await record_result(self.nc.jetstream(), inv.id, result.encode(), callback=inv.callback_url is not None,
                            headers={KIND_HEADER: subjects.KIND_RESULT})
        if inv.reply_to:
            await self.nc.publish(inv.reply_to, result.encode(), headers={KIND_HEADER: subjects.KIND_RESULT})
        await msg.ack()
        self.answered += 1


async def serve_echo(nats_url: str, consumer: str, filter_subject: str) -> None:
    """`python -m bench.invocation echo`: run an EchoPeer until SIGTERM/SIGINT; print ECHO_READY when pulling."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        peer = EchoPeer(nc, consumer=consumer, filter_subject=filter_subject)
        await peer.start()
        try:
            sys.stdout.write(ECHO_READY + "\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            await peer.stop()
        log.info("echo peer answered %d invocations", peer.answered)
    finally:
        await nc.drain()


# -- child processes ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def child_process(argv: list[str], *, env: dict[str, str], log_path: Path,
                        ready: Callable[[asyncio.subprocess.Process], Awaitable[None]],
                        stop_timeout_s: float = 10.0) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process (its own session) that is ready once `ready(proc)` returns; SIGTERM, then SIGKILL,
    when the context exits. Its stderr goes to `log_path`."""
    logf: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in finally
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=logf,
            start_new_session=True,
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


def _service_env(servers: Servers, **extra: str) -> dict[str, str]:
    """The environment `lorafn up` gives its services (ours without LORAFN_*, plus the endpoints)."""
    from lorafn.services import child_env

    return child_env(nats_url=servers.nats_url, database_url=servers.database_url,
                     object_store=servers.object_store, extra=extra)


def _free_port() -> int:
    from lorafn.stack import free_ports

    return free_ports("127.0.0.1", 1)[0]


# -- measuring ------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(latencies_ms: list[float]) -> dict[str, float]:
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
    """Invokes over NATS without the gateway, as a NATS client does (docs/nats.md)."""

    def __init__(self, nc: Client, tenant: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.tenant = tenant
        self.subject = subjects.invoke(tenant, subjects.BASE_ADAPTER)

    async def __call__(self) -> None:
        invocation_id = f"inv-{secrets.token_hex(12)}"
        reply = subjects.reply(invocation_id)
        done: asyncio.Future[InvocationResult] = asyncio.get_running_loop().create_future()

        async def on_reply(msg: Msg) -> None:
            if (msg.headers or {}).get(KIND_HEADER) == subjects.KIND_RESULT and not done.done():
                done.set_result(InvocationResult.decode(msg.data))

        sub = await self.nc.subscribe(reply, cb=on_reply)  # before publishing, so nothing is missed
        try:
            invocation = Invocation(id=invocation_id, tenant=self.tenant, prompt=PROMPT,
                                    sampling=Sampling(max_tokens=MAX_TOKENS), stream=False, reply_to=reply)
            await self.js.publish(self.subject, invocation.encode(), headers={"Nats-Msg-Id": invocation_id})
            result = await asyncio.wait_for(done, CALL_TIMEOUT_S)
        finally:
            await sub.unsubscribe()
        if result.status != "succeeded":
            raise RuntimeError(f"direct invocation {invocation_id} failed: {result.error}")


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
    once, the response read by its Content-Length): what the path costs without an HTTP library's overhead
    in the caller. httpx spends about 0.5 ms of CPU per request on this machine, on the same 2 cores as the
    services, so it would be counted as latency the gateway adds."""

    def __init__(self, host: str, port: int, tenant: str, key: str) -> None:
        self.host, self.port = host, port
        body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode()
        path = f"/v1/functions/{tenant}/{subjects.BASE_ADAPTER}/invocations"
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
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
        reader, writer = await self._connection()
        writer.write(self.request)
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
            with contextlib.suppress(Exception):
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


async def measure(servers: Servers, options: BenchOptions = BenchOptions(), *,
                  work_dir: Path | None = None) -> dict[str, Any]:
    """Start the echo peer and the gateway against `servers`, run the interleaved rounds, return the figures."""
    started = time.monotonic()
    tenant, key = await _bench_tenant(servers.database_url)
    nc = await nats.connect(servers.nats_url, connect_timeout=5)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(nc.close)
        await ensure_streams(nc.jetstream())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lorafn-bench-"))) \
            if work_dir is None else work_dir

        async def echo_ready(proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if line.decode().strip() != ECHO_READY:
                raise RuntimeError(f"the echo peer said {line!r}")

        await stack.enter_async_context(child_process(
            [sys.executable, "-m", "bench.invocation", "echo", "--consumer", f"bench-echo-{tenant}",
             "--filter", f"{subjects.INVOKE_PREFIX}.{tenant}.>"],
            env=_service_env(servers), log_path=tmp / "echo.log", ready=echo_ready,
        ))
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
        raw = RawHttpCaller("127.0.0.1", port, tenant, key)
        stack.push_async_callback(raw.aclose)
        variants: dict[str, Call] = {"direct": DirectCaller(nc, tenant), "gateway": raw,
                                     "gateway_httpx": GatewayCaller(http, tenant)}
        setup_s = time.monotonic() - started

        for call in variants.values():  # warm-up: connections, caches, JIT-free but lazy imports
            await timed_sequential(call, options.warmup)
            await timed_concurrent([call] * options.concurrency, options.warmup)

        seq: dict[str, list[float]] = {name: [] for name in variants}
        seq_wall: dict[str, float] = dict.fromkeys(variants, 0.0)
        gateway_cpu: dict[str, float] = dict.fromkeys(variants, 0.0)  # the gateway process's CPU seconds
        for _ in range(options.rounds):
            for name, call in variants.items():  # A, B, C, A, B, C, ...
                cpu = process_cpu_s(gateway.pid)
                lat, wall = await timed_sequential(call, options.calls_per_round)
                gateway_cpu[name] += process_cpu_s(gateway.pid) - cpu
                seq[name] += lat
                seq_wall[name] += wall

        conc: dict[str, list[float]] = {name: [] for name in variants}
        conc_wall: dict[str, float] = dict.fromkeys(variants, 0.0)
        for _ in range(options.concurrent_rounds):
            for name, call in variants.items():
                lat, wall = await timed_concurrent([call] * options.concurrency, options.concurrent_calls_per_round)
                conc[name] += lat
                conc_wall[name] += wall

        components = await _components(servers, tenant, http, options.component_calls)

    result: dict[str, Any] = {
        "options": {**options.__dict__},
        "prompt_words": len(PROMPT.split()),
        "max_tokens": MAX_TOKENS,
        "targets": {"added_p50_ms": TARGET_P50_MS, "added_p99_ms": TARGET_P99_MS},
        "setup_s": setup_s,
        "variants": {},
        "components": components,
    }
    for name in variants:
        result["variants"][name] = {
            "sequential": {**summary(seq[name]), "invocations_per_s": len(seq[name]) / seq_wall[name],
                           "gateway_cpu_ms_per_call": gateway_cpu[name] / len(seq[name]) * 1000},
            "concurrent": {**summary(conc[name]), "concurrency": options.concurrency,
                           "invocations_per_s": len(conc[name]) / conc_wall[name]},
        }
    d = result["variants"]["direct"]

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

    result["added"] = added_by(result["variants"]["gateway"])  # the targets are judged on the lean client
    result["added_httpx"] = added_by(result["variants"]["gateway_httpx"])
    result["total_calls"] = sum(len(v) for v in seq.values()) + sum(len(v) for v in conc.values()) \
        + 2 * len(variants) * options.warmup
    result["elapsed_s"] = time.monotonic() - started
    return result


# -- report ---------------------------------------------------------------------------------------------


def print_report(payload: dict[str, Any]) -> None:
    """The benchmark's tables: both variants, the added latency against its targets, the components."""
    from bench.report import print_table

    v, a, ah, c = payload["variants"], payload["added"], payload["added_httpx"], payload["components"]
    conc = payload["options"]["concurrency"]
    rows: list[list[Any]] = []
    for name, label in (("direct", "direct (NATS)"), ("gateway", "via gateway (HTTP, lean client)"),
                        ("gateway_httpx", "via gateway (HTTP, httpx client)")):
        s, k = v[name]["sequential"], v[name]["concurrent"]
        cpu = s["gateway_cpu_ms_per_call"] if name != "direct" else ""
        rows.append([label, s["calls"], s["p50_ms"], s["p99_ms"], s["invocations_per_s"], k["p50_ms"], k["p99_ms"],
                     k["invocations_per_s"], cpu])
    for label, x in (("added by the gateway (lean client)", a), ("added by the gateway (httpx client)", ah)):
        rows.append([label, "", x["p50_ms"], x["p99_ms"], "", x["concurrent_p50_ms"], x["concurrent_p99_ms"], "", ""])
    rows.append(["target (added, lean client)", "", f"<= {TARGET_P50_MS:g}", f"<= {TARGET_P99_MS:g}", "", "", "", "",
                 ""])
    rows.append(["target met", "", "yes" if a["p50_within_target"] else "NO", "yes" if a["p99_within_target"] else "NO",
                 "", "", "", "", ""])
    print_table(
        f"invocation path, instant echo worker (ms; one caller, then {conc} concurrent callers)",
        ["path", "calls", "p50", "p99", "inv/s seq", f"p50 c{conc}", f"p99 c{conc}", f"inv/s c{conc}",
         "gateway CPU/call"],
        rows,
    )
    labels = {"http_healthz": "HTTP round trip, no work (GET /healthz)",
              "pg_invocation_insert": "Postgres row insert as the gateway does it (one statement, autocommit)",
              "pg_insert_transaction": "the same row through an ORM session (pre-ping, BEGIN, INSERT, COMMIT)",
              "pg_select_1": "Postgres round trip (SELECT 1)"}
    print_table("pieces of the gateway's per-call work, timed alone (ms)",
                ["piece", "calls", "p50", "p99", "mean"],
                [[labels[k], s["calls"], s["p50_ms"], s["p99_ms"], s["mean_ms"]] for k, s in c.items()])


def run(*, options: BenchOptions | None = None) -> dict[str, Any]:
    """`python -m bench invocation`: a throwaway stack on free ports, the benchmark, its table and JSON."""
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
            payload = asyncio.run(measure(servers, options or BenchOptions(), work_dir=Path(tmp)))
        finally:
            stack.stop()
    print_report(payload)
    write("invocation", payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.invocation echo ...` runs the echo peer (NATS URL from LORAFN_NATS__URL)."""
    parser = argparse.ArgumentParser(prog="python -m bench.invocation")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="run the echo peer until SIGTERM")
    echo.add_argument("--consumer", required=True)
    echo.add_argument("--filter", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_echo(os.environ["LORAFN_NATS__URL"], args.consumer, args.filter))


if __name__ == "__main__":
    main()
