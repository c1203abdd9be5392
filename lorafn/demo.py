"""`make demo`: a throwaway lorafn on this machine, three functions invoked over every route, then stopped.

1. starts NATS, Postgres and S3 (the `lorafn up` launcher, free ports, a temporary state directory) and
   bootstraps them (schema, bucket, streams, the dev tenant and its API key);
2. starts the services as `lorafn up` does (scheduler, two workers, the gateway on a free port) and waits
   until the gateway is ready and both workers heartbeat;
3. pushes three random adapters of ranks 8, 16 and 64 through the gateway (`POST /v1/adapters`);
4. invokes the bare backbone once, then each function over three routes: the OpenAI API with the official
   `openai` client (chat, streaming: tokens are printed as they arrive), the FaaS route asynchronously
   (`Prefer: respond-async`, then polling `GET /v1/invocations/<id>`), and NATS directly (an `Invocation`
   published to JetStream, chunks read from the reply subject, as examples/nats_invoke.py does);
5. prints each output with the adapter's tier on arrival, the load time, the time to first token and the
   total time, and stops every process it started.

Exit status 0 only if every step succeeded and every function's output differs from the bare backbone's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import nats
from nats.aio.msg import Msg
from rich.console import Console

from lorafn.bootstrap import BootstrapResult, bootstrap
from lorafn.gateway_client import header_float, push_adapter
from lorafn.services import running_services
from lorafn.stack import LocalStack, ManagedProcess, StackConfig, StackEndpoints, free_ports, free_stack_ports
from protocol import subjects
from protocol.messages import (
    ChatMessage,
    Heartbeat,
    Invocation,
    InvocationResult,
    MessageInvalid,
    Sampling,
    TokenChunk,
)
from protocol.nats_auth import tenant_inbox_prefix
from protocol.settings import split_nats_urls
from storage.adapter_format import write_peft_adapter
from storage.backbone import default_backbone_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoAdapter:
    """One function of the demo: a random adapter of `rank` on `modules`.

    `std` is the spread of lora_B: PEFT initialises it to zero (no effect); these values make every
    adapter change the backbone's greedy output within the first tokens without turning it into noise.
    """

    name: str
    rank: int
    modules: tuple[str, ...]
    std: float


DEMO_ADAPTERS = (
    DemoAdapter("support-bot", 8, ("q_proj", "v_proj"), 0.15),
    DemoAdapter("sql-writer", 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 0.08),
    DemoAdapter("poet", 64, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 0.03),
)
ROUTES = ("openai", "faas-async", "nats")
PROMPT = "Write one sentence about the sea."
MAX_TOKENS = 12
WORKERS = 2
READY_TIMEOUT_S = 150.0  # the workers load the backbone before their first heartbeat
CALL_TIMEOUT_S = 120.0  # one invocation, cold start included
POLL_S = 0.05  # polling interval of GET /v1/invocations/<id>


class DemoFailed(RuntimeError):
    """A step of the demo failed; the message says which."""


@dataclass
class Outcome:
    """What one invocation of a function over one route gave."""

    function: str
    route: str
    text: str = ""
    tier: str | None = None
    load_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.text)


# -- services -------------------------------------------------------------------------------------------


def _check_alive(procs: list[ManagedProcess]) -> None:
    dead = [p.name for p in procs if not p.alive()]
    if dead:
        raise DemoFailed(f"{', '.join(dead)} exited unexpectedly")


def _log_tails(procs: list[ManagedProcess], lines: int = 15) -> str:
    """The last lines of each service's log, credentials in URLs masked."""
    parts = []
    for p in procs:
        with contextlib.suppress(OSError):
            tail = p.log_path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {p.name} ({p.log_path.name}) ---\n" + "\n".join(tail))
    return re.sub(r"//[^/@\s]+@", "//***@", "\n".join(parts))


async def wait_ready(gateway: str, nats_url: str, procs: list[ManagedProcess], *, workers: int,
                     timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the gateway answers /readyz with 200 and `workers` workers have sent a heartbeat."""
    seen: set[str] = set()

    async def on_heartbeat(msg: Msg) -> None:
        with contextlib.suppress(MessageInvalid):
            seen.add(Heartbeat.decode(msg.data).worker_id)

    deadline = time.monotonic() + timeout_s
    nc = await nats.connect(split_nats_urls(nats_url), connect_timeout=5)
    try:
        await nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=on_heartbeat)
        async with httpx.AsyncClient(base_url=gateway, timeout=2.0) as http:
            gateway_ready = False
            while not (gateway_ready and len(seen) >= workers):
                _check_alive(procs)
                if time.monotonic() > deadline:
                    raise DemoFailed(f"not ready after {timeout_s:.0f} s (gateway ready: {gateway_ready}, "
                                     f"workers heartbeating: {len(seen)}/{workers})")
                if not gateway_ready:
                    with contextlib.suppress(httpx.HTTPError):
                        gateway_ready = (await http.get("/readyz")).status_code == 200
                await asyncio.sleep(0.25)
    finally:
        await nc.close()


# -- adapters -------------------------------------------------------------------------------------------


async def push_adapters(http: httpx.AsyncClient, work: Path, console: Console) -> None:
    """Write the demo adapters and upload each through POST /v1/adapters."""
    spec = default_backbone_spec()
    for i, a in enumerate(DEMO_ADAPTERS):
        path = await asyncio.to_thread(write_peft_adapter, work / a.name, spec, rank=a.rank, modules=a.modules,
                                       seed=i, std=a.std)
        t0 = time.perf_counter()
        r = await push_adapter(http, a.name, path)
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code not in (200, 201):
            raise DemoFailed(f"pushing {a.name} answered {r.status_code}: {r.text}")
        body = r.json()
        console.print(f"pushed {body['id']:<16} rank {body['max_rank']:>3}  {len(a.modules)} modules  "
                      f"{body['bytes'] / 1e6:6.1f} MB  sha256 {body['sha256'][:12]}  {ms:5.0f} ms", highlight=False)
    listed = (await http.get("/v1/adapters")).json()["data"]
    console.print(f"GET /v1/adapters lists {len(listed)} functions: {', '.join(a['id'] for a in listed)}")


# -- the three routes ------------------------------------------------------------------------------------


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


async def call_openai(client: Any, model: str, console: Console) -> Outcome:
    """Chat completion over HTTP with the official openai client, streaming, tokens printed as they come."""
    out = Outcome(model, "openai")
    t0 = time.perf_counter()
    async with client.chat.completions.with_streaming_response.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], stream=True, max_tokens=MAX_TOKENS,
        temperature=0,
    ) as response:
        out.tier = response.headers.get("x-lorafn-adapter-tier")
        out.load_ms = header_float(response.headers, "x-lorafn-load-ms")
        parts: list[str] = []
        async for chunk in await response.parse():
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                if out.ttft_ms is None:
                    out.ttft_ms = _ms(t0)
                parts.append(delta)
                console.print(delta, end="", markup=False, highlight=False, soft_wrap=True)
    out.total_ms = _ms(t0)
    out.text = "".join(parts)
    return out


async def call_faas_async(http: httpx.AsyncClient, tenant: str, name: str) -> Outcome:
    """POST /v1/functions/<tenant>/<name>/invocations with Prefer: respond-async, then poll the invocation."""
    out = Outcome(f"{tenant}/{name}", "faas-async")
    t0 = time.perf_counter()
    r = await http.post(f"/v1/functions/{tenant}/{name}/invocations", headers={"Prefer": "respond-async"},
                        json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
                              "temperature": 0})
    if r.status_code != 202:
        raise DemoFailed(f"async invocation answered {r.status_code}: {r.text}")
    location = r.headers["location"]
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while True:
        r = await http.get(location)
        r.raise_for_status()
        body = r.json()
        if body["status"] in ("succeeded", "failed"):
            break
        if time.monotonic() > deadline:
            raise DemoFailed(f"{location} still {body['status']} after {CALL_TIMEOUT_S:.0f} s")
        await asyncio.sleep(POLL_S)
    out.total_ms = _ms(t0)
    if body["status"] != "succeeded":
        raise DemoFailed(f"invocation {body['id']} failed: {body.get('error')}")
    out.text = body["output"]["text"]
    out.tier = r.headers.get("x-lorafn-adapter-tier")
    out.load_ms = header_float(r.headers, "x-lorafn-load-ms")
    out.ttft_ms = (body.get("timings") or {}).get("first_token_ms")  # measured by the worker from submission
    return out


async def tenant_nats_url(endpoints: StackEndpoints, tenant: str) -> str:
    """A NATS credential of `tenant` (what `lorafn keys create --nats` makes), as a URL: the demo's direct client
    connects as the tenant, with only the tenant's permissions, never as an operator."""
    from storage import repo
    from storage.settings import DatabaseSettings

    engine = repo.create_engine(DatabaseSettings(url=endpoints.database_url))
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            row = await repo.get_or_create_tenant(session, name=tenant)
            _, secret = await repo.new_nats_credential(session, tenant=row, label="lorafn demo")
    finally:
        await engine.dispose()
    return f"nats://{tenant}:{secret}@{endpoints.nats_url.rpartition('@')[2]}"


async def call_nats(nats_url: str, tenant: str, name: str, console: Console) -> Outcome:
    """Publish an Invocation to JetStream and read chunks and the result from the reply subject (`nats_url`
    carries the tenant's NATS credential: it may read only the tenant's reply namespace)."""
    out = Outcome(f"{tenant}/{name}", "nats")
    invocation_id = f"inv-{secrets.token_hex(12)}"
    reply_subject = subjects.tenant_reply(tenant, invocation_id)
    invocation = Invocation(
        id=invocation_id, tenant=tenant, adapter=name, messages=[ChatMessage(role="user", content=PROMPT)],
        sampling=Sampling(temperature=0.0, max_tokens=MAX_TOKENS), reply_to=reply_subject,
    )
    done: asyncio.Future[InvocationResult] = asyncio.get_running_loop().create_future()
    seen: set[int] = set()
    t0 = time.perf_counter()

    async def on_reply(msg: Msg) -> None:
        kind = (msg.headers or {}).get("Lorafn-Kind")
        if kind == "chunk":
            chunk = TokenChunk.decode(msg.data)
            if chunk.index not in seen:  # a redelivered invocation generates again from index 0
                seen.add(chunk.index)
                if out.ttft_ms is None and chunk.token_ids:
                    out.ttft_ms = _ms(t0)
                console.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
        elif kind == "result" and not done.done():
            done.set_result(InvocationResult.decode(msg.data))

    nc = await nats.connect(split_nats_urls(nats_url), connect_timeout=5, inbox_prefix=tenant_inbox_prefix(tenant))
    try:
        await nc.subscribe(reply_subject, cb=on_reply)  # before publishing, so no chunk is missed
        await nc.jetstream().publish(subjects.invoke(tenant, name), invocation.encode(),
                                     headers={"Nats-Msg-Id": invocation_id})
        result = await asyncio.wait_for(done, CALL_TIMEOUT_S)
    finally:
        await nc.close()
    out.total_ms = _ms(t0)
    if result.status != "succeeded":
        error = result.error
        raise DemoFailed(f"invocation {invocation_id} failed: {error.code if error else '?'}: "
                         f"{error.message if error else ''}")
    out.text = result.text
    out.tier = result.adapter_tier
    out.load_ms = result.timings.load_ms
    return out


def _fmt(value: float | None, unit: str = " ms") -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def _where(out: Outcome) -> str:
    """The adapter's tier on arrival and its load time: response headers over HTTP, result fields over NATS."""
    load = "-" if out.load_ms is None else f"{out.load_ms:.1f}"
    if out.route == "nats":
        return f"result adapter_tier {out.tier or '-'}, timings.load_ms {load}"
    return f"x-lorafn-adapter-tier: {out.tier or '-'}, x-lorafn-load-ms: {load}"


async def invoke_all(gateway: str, nats_url: str, boot: BootstrapResult, work: Path,
                     console: Console) -> list[Outcome]:
    """The bare backbone once, then every demo function over every route, one call at a time."""
    from openai import AsyncOpenAI

    tenant = boot.dev_tenant
    outcomes: list[Outcome] = []
    headers = {"Authorization": f"Bearer {boot.dev_api_key}"}
    async with (
        httpx.AsyncClient(base_url=gateway, headers=headers, timeout=CALL_TIMEOUT_S) as http,
        AsyncOpenAI(base_url=f"{gateway}/v1", api_key=boot.dev_api_key, max_retries=0,
                    timeout=CALL_TIMEOUT_S) as client,
    ):
        t0 = time.perf_counter()
        base = await client.chat.completions.create(model="base", messages=[{"role": "user", "content": PROMPT}],
                                                    max_tokens=MAX_TOKENS, temperature=0)
        base_text = base.choices[0].message.content or ""
        console.print(f"\n[bold]bare backbone[/] ({_ms(t0):.0f} ms): {base_text!r}", highlight=False)
        await push_adapters(http, work, console)
        for a in DEMO_ADAPTERS:
            function = f"{tenant}/{a.name}"
            for route in ROUTES:
                console.print(f"\n[bold]{function}[/] rank {a.rank} via [bold]{route}[/]: ", end="", highlight=False)
                try:
                    if route == "openai":
                        out = await call_openai(client, function, console)
                    elif route == "faas-async":
                        out = await call_faas_async(http, tenant, a.name)
                        console.print(out.text, end="", markup=False, highlight=False, soft_wrap=True)
                    else:
                        out = await call_nats(nats_url, tenant, a.name, console)
                except Exception as e:
                    out = Outcome(function, route, error=f"{type(e).__name__}: {e}")
                    console.print(f"[red]failed: {out.error}[/]", highlight=False)
                else:
                    console.print(f"\n  {_where(out)}, TTFT {_fmt(out.ttft_ms)}, total {_fmt(out.total_ms)}",
                                  highlight=False)
                outcomes.append(out)
    _summarise(outcomes, base_text, console)
    return outcomes


def _summarise(outcomes: list[Outcome], base_text: str, console: Console) -> None:
    """Print one line per call (function, route, status, figures, output) and fail on a bad outcome."""
    console.print("\n[bold]summary[/] (TTFT of faas-async: the worker's, from submission)")
    for o in outcomes:
        status = "ok" if o.ok else "FAILED"
        console.print(f"{o.function:<16} {o.route:<10} {status:<6} tier {o.tier or '-':<6} load {_fmt(o.load_ms):>7} "
                      f"TTFT {_fmt(o.ttft_ms):>7} total {_fmt(o.total_ms):>8}  {o.text!r}",
                      markup=False, highlight=False, soft_wrap=True)
    failed = [f"{o.function} via {o.route}: {o.error or 'empty output'}" for o in outcomes if not o.ok]
    if failed:
        raise DemoFailed("; ".join(failed))
    same = sorted({o.function for o in outcomes if o.text == base_text})
    if same:
        raise DemoFailed(f"the output of {', '.join(same)} is the bare backbone's: the adapter had no effect")


# -- main -----------------------------------------------------------------------------------------------


def run(tmp: Path, console: Console) -> list[Outcome]:
    """The whole demo under `tmp`; every process it starts is stopped before it returns or raises."""
    t0 = time.monotonic()
    console.print(f"state and logs: {tmp} (removed at the end)", highlight=False)
    stack = LocalStack(StackConfig(state_dir=tmp / "stack", ports=free_stack_ports()))
    with contextlib.ExitStack() as resources:
        endpoints = stack.start()  # stops what it started if it fails
        resources.callback(stack.stop)
        boot = asyncio.run(bootstrap(endpoints, state_dir=stack.state_dir))
        console.print(f"NATS, Postgres and S3 up and bootstrapped in {time.monotonic() - t0:.1f} s")
        port = free_ports("127.0.0.1", 1)[0]
        gateway = f"http://127.0.0.1:{port}"
        procs = resources.enter_context(running_services(endpoints, stack.state_dir, workers=WORKERS,
                                                         gateway_port=port))
        try:
            t1 = time.monotonic()
            asyncio.run(wait_ready(gateway, endpoints.nats_url, procs, workers=WORKERS))
            console.print(f"{', '.join(p.name for p in procs)} ready in {time.monotonic() - t1:.1f} s "
                          f"(gateway {gateway})")
            tenant_url = asyncio.run(tenant_nats_url(endpoints, boot.dev_tenant))
            outcomes = asyncio.run(invoke_all(gateway, tenant_url, boot, tmp / "adapters", console))
        except BaseException:
            console.print(_log_tails(procs), markup=False, highlight=False, soft_wrap=True)
            raise
        console.print("stopping ...")
    console.print("stopped: every process the demo started has exited")
    return outcomes


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    """Run the demo in a temporary directory; 0 if every step succeeded."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console(soft_wrap=True)  # long lines stay whole when stdout is not a terminal
    signal.signal(signal.SIGTERM, _interrupt)  # stop everything on SIGTERM as on Ctrl-C
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lorafn-demo-") as tmp:
            run(Path(tmp), console)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]; every process the demo started has been stopped")
        return 130
    except Exception as e:
        console.print(f"[bold red]demo failed:[/] {e}", highlight=False)
        return 1
    console.print(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
