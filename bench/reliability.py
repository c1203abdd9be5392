"""Reliability: a soak and a chaos run against a real, supervised stack, each ending with an audit.

`python -m bench reliability soak --minutes 30` and `python -m bench reliability chaos --minutes 10` (with no
subcommand, and in `make bench`: both, 3 minutes each).

The stack is the one users run: `lorafn up --workers 2 --auto-ports` as a child process (NATS, Postgres,
SeaweedFS, the scheduler, two workers and the gateway, every process supervised and restarted by the
launcher, `lorafn.services`), on the tiny random backbone by default (`workers.tiny`: every code path is the
real one and a token costs milliseconds on a CPU; `--backbone` serves another one).

Load, for the whole run: `callers` closed-loop HTTP clients, each drawing one kind of call per turn (weights in
`ReliabilityOptions.weights`):

- sync: `POST /v1/functions/dev/<adapter>/invocations`, waiting for the result;
- async: the same with `Prefer: respond-async` (202 with the id), then polling `GET /v1/invocations/<id>`
  until the status is final;
- stream: `POST /v1/chat/completions` with `stream: true`, read to `[DONE]`;
- abandoned: the same with a long `max_tokens`, the connection closed after `abandon_after_events` events;

and one adapter churn loop that pushes (`POST /v1/adapters`) and deletes (`DELETE /v1/adapters/...`) adapters
of its own, some with the very bytes of a stable adapter (the blob shared by two names), and calls each once
before deleting it. Every few seconds a sampler reads the resident memory (VmRSS in /proc/<pid>/status) and
the open descriptors (/proc/<pid>/fd) of every process of the stack (pids from the launcher's stack.json:
servers, services and the launcher itself; a Postgres backend or any other child is counted under its parent
as "children").

Chaos, on top of the same load: every 30 to 60 s one service (gateway, scheduler or a worker) is killed with
SIGKILL, and NATS and Postgres are each restarted once (stopped with their shutdown signal, SIGTERM and
SIGINT) at a third and two thirds of the run; the launcher's supervisor brings every one of them back. The
plan is drawn up front from the seed (`chaos_plan`), so a run can be repeated.

The audit, after the load stops and a grace period: an invocation counts as accepted when its client got its
id (a 2xx answer, a 202, the first event of a stream, or an error answer that names it). Its final state is its
row in Postgres (the scheduler writes it from the results stream) or, where the row is not final, its result in
the results stream (`LORAFN_RESULTS`, one subject per invocation). `lost` = accepted with no final state
(succeeded, failed or cancelled) at the end of the grace period, abandoned streams apart: those still running
at the end are reported as `abandoned_running` (an abandoned stream should end `cancelled`).
`duplicated` = two or more results recorded for one invocation (the stream's per-subject message count) or a
client stream that finished twice. Rows written since the start that no client was told about and that never
finished (a gateway killed between its insert and its publish) are reported as `unaccepted_unfinished`.

The decisions (which kind of call, the chaos plan, the audit, the memory summary) are plain functions of plain
data, tested without a stack; `measure` does the I/O around them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import launcher
from bench.launcher import CALL_TIMEOUT_S, TENANT, Stack, wait_until
from lorafn.gateway_client import push_adapter
from protocol import subjects
from protocol.settings import split_nats_urls

log = logging.getLogger(__name__)

KINDS = ("sync", "async", "stream", "abandoned")
FINAL = frozenset({"succeeded", "failed", "cancelled"})
SERVICES = ("gateway", "scheduler", "worker-1", "worker-2")  # what chaos kills (names in stack.json)
SERVER_STOP = {"nats": signal.SIGTERM, "postgres": signal.SIGINT}  # a server's own shutdown signal
PROMPT = "Tell me about reliability under load."
POLL_S = 0.2
BACKOFF_S = 1.0  # a caller's pause after a connection error
RETRYABLE = frozenset({"connect_error", "connection_reset", "connection_dropped", "http_502", "http_503"})
ADAPTER_RANKS = (8, 16)
KB = 1024


@dataclass(frozen=True)
class ReliabilityOptions:
    """One run: its mode, length and load."""

    mode: str = "soak"  # soak | chaos
    minutes: float = 3.0
    callers: int = 4
    weights: tuple[float, ...] = (3.0, 2.0, 3.0, 1.0)  # of KINDS
    think_s: float = 0.2  # pause between a caller's calls: the stack shares its cores with the callers
    max_tokens: int = 16
    abandoned_max_tokens: int = 512  # long enough to be still generating when the client leaves
    abandon_after_events: int = 3
    stable_adapters: int = 3  # pushed before the load, invoked throughout
    churn_every_s: float = 2.0  # between two steps of the adapter churn
    sample_every_s: float = 5.0
    grace_s: float = 90.0  # after the load, for accepted invocations to reach a final state
    drain_s: float = 30.0  # for calls under way when the load stops (then they are dropped)
    kill_every_s: tuple[float, float] = (30.0, 60.0)
    restart_servers: bool = True  # chaos: NATS and Postgres restarted once each
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("soak", "chaos"):
            raise ValueError(f"mode {self.mode!r} must be 'soak' or 'chaos'")
        if len(self.weights) != len(KINDS) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights {self.weights} must be {len(KINDS)} non-negative numbers ({', '.join(KINDS)}),"
                             f" not all zero")
        if not 0 < self.kill_every_s[0] <= self.kill_every_s[1]:
            raise ValueError(f"kill_every_s {self.kill_every_s} must be 0 < low <= high")
        if self.callers < 1 or self.minutes <= 0:
            raise ValueError(f"callers ({self.callers}) must be at least 1 and minutes ({self.minutes}) positive")

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0


# -- plain decisions -------------------------------------------------------------------------------------------


def choose_kind(rng: random.Random, weights: Sequence[float]) -> str:
    """The kind of a caller's next call, drawn by weight."""
    return rng.choices(KINDS, weights=weights)[0]


@dataclass(frozen=True)
class ChaosAction:
    """At `at_s` seconds into the load, send `signal` to the process named `target` (a stack.json name)."""

    at_s: float
    target: str
    signal: int


def chaos_plan(duration_s: float, rng: random.Random, *, kill_every_s: tuple[float, float] = (30.0, 60.0),
               victims: Sequence[str] = SERVICES, restart_servers: bool = True) -> list[ChaosAction]:
    """The chaos of one run, in time order: a SIGKILL of a random service every `kill_every_s` (drawn
    uniformly), the first after one interval, none in the last 10 s (the audit must see the recovery), and
    NATS and Postgres stopped with their shutdown signal at a third and two thirds of the run."""
    actions: list[ChaosAction] = []
    at = rng.uniform(*kill_every_s)
    while at < duration_s - 10.0:
        actions.append(ChaosAction(at, rng.choice(list(victims)), signal.SIGKILL))
        at += rng.uniform(*kill_every_s)
    if restart_servers:
        for i, (server, sig) in enumerate(SERVER_STOP.items(), start=1):
            actions.append(ChaosAction(duration_s * i / (len(SERVER_STOP) + 1), server, sig))
    return sorted(actions, key=lambda a: a.at_s)


@dataclass
class Accepted:
    """An invocation whose client was given its id, and what that client saw of it."""

    id: str
    kind: str
    abandoned: bool = False  # the client closed the stream before its end (on purpose or at the drain)
    client_status: str | None = None  # the final status the client saw, None when it saw none
    finishes: int = 0  # final events a streaming client received (finish chunk or in-band error): more than 1 is a duplicate


@dataclass(frozen=True)
class Audit:
    """Every accepted invocation's fate; `lost` and `duplicated` must be 0."""

    accepted: int
    by_status: dict[str, int]  # final state -> invocations (accepted ones)
    lost: int
    lost_ids: list[str]
    duplicated: int
    duplicated_ids: list[str]
    abandoned: int
    abandoned_running: int  # abandoned streams not final at the end (no cancellation yet)
    abandoned_by_status: dict[str, int]
    row_behind_result: int  # a result recorded but the row not final (the scheduler's write lags or was lost)
    client_disagrees: int  # the client saw a final status other than the recorded one
    unaccepted_unfinished: int  # rows since the start, never given to a client, not final
    unaccepted_unfinished_ids: list[str]


def audit(accepted: Mapping[str, Accepted], rows: Mapping[str, str], result_counts: Mapping[str, int],
          result_status: Mapping[str, str]) -> Audit:
    """Judge a run from what the clients saw and what was recorded.

    rows: invocation id -> status of its Postgres row (every row since the run started)
    result_counts: invocation id -> results recorded in the results stream
    result_status: invocation id -> status of its (last) recorded result
    """
    by_status: collections.Counter[str] = collections.Counter()
    abandoned_status: collections.Counter[str] = collections.Counter()
    lost, duplicated, running = [], [], 0
    behind = disagree = 0
    for inv_id, a in accepted.items():
        row = rows.get(inv_id)
        if row in FINAL:
            state = row
        elif inv_id in result_status:
            state = result_status[inv_id]
            behind += 1
        else:
            state = row or "missing"
        by_status[state] += 1
        if a.abandoned:
            abandoned_status[state] += 1
        if state not in FINAL:
            if a.abandoned:
                running += 1
            else:
                lost.append(inv_id)
        elif a.client_status is not None and a.client_status != state:
            disagree += 1
        if result_counts.get(inv_id, 0) > 1 or a.finishes > 1:
            duplicated.append(inv_id)
    stray = sorted(i for i, status in rows.items() if i not in accepted and status not in FINAL
                   and i not in result_status)
    # A result recorded twice for an invocation no client heard of is a duplicate all the same.
    duplicated += sorted(i for i, n in result_counts.items() if n > 1 and i not in accepted)
    return Audit(
        accepted=len(accepted), by_status=dict(sorted(by_status.items())), lost=len(lost), lost_ids=sorted(lost),
        duplicated=len(duplicated), duplicated_ids=duplicated,
        abandoned=sum(1 for a in accepted.values() if a.abandoned), abandoned_running=running,
        abandoned_by_status=dict(sorted(abandoned_status.items())), row_behind_result=behind,
        client_disagrees=disagree, unaccepted_unfinished=len(stray), unaccepted_unfinished_ids=stray,
    )


@dataclass(frozen=True)
class Sample:
    """One reading of one process: resident memory and open descriptors, its own and its children's."""

    at_s: float
    name: str
    pid: int
    rss_kb: int
    fds: int
    children: int = 0
    children_rss_kb: int = 0
    children_fds: int = 0


def summarise_samples(samples: Sequence[Sample], *, points: int = 60) -> dict[str, dict[str, Any]]:
    """Per process name: memory (MB) at the first and last reading and at its peak, descriptors likewise, the
    children's figures when it has any, how many pids it had (more than one: it was restarted), and about
    `points` readings (seconds, RSS MB, fds) spread over the run, to see a trend."""
    by_name: dict[str, list[Sample]] = collections.defaultdict(list)
    for s in sorted(samples, key=lambda s: s.at_s):
        by_name[s.name].append(s)
    out: dict[str, dict[str, Any]] = {}
    for name, ss in sorted(by_name.items()):
        first, last = ss[0], ss[-1]
        row: dict[str, Any] = {
            "samples": len(ss), "pids": len({s.pid for s in ss}),
            "rss_mb_start": first.rss_kb / KB, "rss_mb_end": last.rss_kb / KB,
            "rss_mb_peak": max(s.rss_kb for s in ss) / KB,
            "fds_start": first.fds, "fds_end": last.fds, "fds_peak": max(s.fds for s in ss),
            "series": [[round(s.at_s, 1), round(s.rss_kb / KB, 1), s.fds] for s in ss[::max(1, len(ss) // points)]],
        }
        if any(s.children for s in ss):
            row |= {"children_start": first.children, "children_end": last.children,
                    "children_peak": max(s.children for s in ss),
                    "children_rss_mb_start": first.children_rss_kb / KB, "children_rss_mb_end": last.children_rss_kb / KB,
                    "children_rss_mb_peak": max(s.children_rss_kb for s in ss) / KB,
                    "children_fds_start": first.children_fds, "children_fds_end": last.children_fds}
        out[name] = row
    return out


def error_kind(e: BaseException) -> str:
    """A short name for a client-side failure (the errors table's key)."""
    if isinstance(e, httpx.ConnectError):
        return "connect_error"
    if isinstance(e, httpx.TimeoutException):
        return "timeout"
    if isinstance(e, httpx.RemoteProtocolError):
        return "connection_dropped"
    if isinstance(e, httpx.ReadError | httpx.WriteError):
        return "connection_reset"
    return type(e).__name__


# -- /proc -----------------------------------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as f:
                out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int, parents: Mapping[int, int], *, apart: frozenset[int] = frozenset()) -> list[int]:
    """Children of `pid`, their children and so on, without the processes in `apart` and theirs (the
    launcher's children are the stack's processes, each counted under its own name)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for child, parent in parents.items():
        children[parent].append(child)
    out, todo = [], [c for c in children.get(pid, []) if c not in apart]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c in children.get(p, []) if c not in apart]
    return out


def sample_processes(pids: Mapping[str, int], at_s: float) -> list[Sample]:
    """Read every named process now (a process that just exited is skipped: the next reading has its
    successor). Children's memory is their anonymous memory (RssAnon): a Postgres backend's VmRSS counts the
    shared buffers it touched, which the postmaster's already holds."""
    parents = _parents()
    named = frozenset(pids.values())
    out = []
    for name, pid in pids.items():
        try:
            kids = _descendants(pid, parents, apart=named)
            kid_rss = kid_fds = 0
            for k in kids:
                with contextlib.suppress(OSError):
                    kid_rss += _status_kb(k, "RssAnon")
                    kid_fds += _fds(k)
            out.append(Sample(at_s, name, pid, _status_kb(pid, "VmRSS"), _fds(pid), len(kids), kid_rss, kid_fds))
        except OSError:
            continue
    return out


# -- the stack: `lorafn up` as a child process -------------------------------------------------------------------


@contextlib.contextmanager
def running_stack(root: Path, backbone: Path, *, workers: int = 2) -> Iterator[Stack]:
    """`lorafn up` on free ports with its state under `root`, serving `backbone` (`bench.launcher`), one compute
    thread per process (six services and the callers on a small machine), once every service has a pid."""
    with launcher.running_stack(root / "state", workers=workers, backbone=backbone, one_thread=True) as stack:
        wait_until(stack, lambda: set(SERVICES) <= set(stack.pids()), timeout=30, what="the services' pids")
        yield stack


# -- load -----------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients did: calls and outcomes per kind, the accepted invocations, adapter operations."""

    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    accepted: dict[str, Accepted] = field(default_factory=dict)
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    def note(self, kind: str, outcome: str) -> None:
        self.calls[kind] += 1
        self.outcomes[kind][outcome] += 1

    def accept(self, inv_id: str, kind: str) -> Accepted:
        return self.accepted.setdefault(inv_id, Accepted(inv_id, kind))


def _http_outcome(r: httpx.Response) -> str:
    code = ""
    with contextlib.suppress(Exception):
        code = str(r.json().get("error", {}).get("code") or "")
    return f"http_{r.status_code}" + (f" {code}" if code else "")


class Load:
    """The callers and the adapter churn of one run."""

    def __init__(self, stack: Stack, options: ReliabilityOptions, adapters: Sequence[Path], tally: Tally) -> None:
        self.stack, self.options, self.tally = stack, options, tally
        self.adapter_dirs = adapters  # [stable..., churn...]
        self.stable = [f"stable-{i}" for i in range(options.stable_adapters)]
        self.stop = asyncio.Event()

    def _adapter(self, rng: random.Random) -> str:
        """A stable adapter or the bare backbone."""
        return rng.choice([*self.stable, subjects.BASE_ADAPTER])

    async def caller(self, index: int) -> None:
        rng = random.Random(f"{self.options.seed}-caller-{index}")
        calls = {"sync": self._sync, "async": self._async, "stream": self._stream, "abandoned": self._abandoned}
        async with self.stack.http() as http:
            while not self.stop.is_set():
                kind = choose_kind(rng, self.options.weights)
                t0 = time.perf_counter()
                try:
                    outcome = await calls[kind](http, self._adapter(rng), rng)
                except (httpx.HTTPError, OSError) as e:
                    outcome = error_kind(e)
                self.tally.note(kind, outcome)
                if outcome == "ok":
                    self.tally.latencies_ms[kind].append((time.perf_counter() - t0) * 1000)
                # After a refused connection (the gateway restarting) a caller waits longer, as a client with
                # backoff would, so that the errors count calls rather than how fast a loop can fail.
                pause = self.options.think_s + (BACKOFF_S if outcome in RETRYABLE else 0.0)
                if pause:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), pause)

    def _body(self, rng: random.Random, max_tokens: int) -> dict[str, Any]:
        return {"prompt": f"{PROMPT} ({rng.randrange(1 << 30)})", "max_tokens": max_tokens, "temperature": 0.7}

    async def _sync(self, http: httpx.AsyncClient, adapter: str, rng: random.Random) -> str:
        r = await http.post(f"/v1/functions/{TENANT}/{adapter}/invocations", json=self._body(rng, self.options.max_tokens))
        if r.status_code == 200:
            body = r.json()
            self.tally.accept(body["id"], "sync").client_status = body["status"]
            return "ok"
        self._accept_error(r, "sync")
        return _http_outcome(r)

    def _accept_error(self, r: httpx.Response, kind: str) -> None:
        """An error answer that carries an invocation id (a failed invocation, a sync timeout) tells the client
        the invocation exists: it is accepted, its final state unknown to the client."""
        inv_id = r.headers.get("x-lorafn-invocation-id")
        if inv_id:
            self.tally.accept(inv_id, kind)

    async def _async(self, http: httpx.AsyncClient, adapter: str, rng: random.Random) -> str:
        r = await http.post(f"/v1/functions/{TENANT}/{adapter}/invocations", headers={"Prefer": "respond-async"},
                            json=self._body(rng, self.options.max_tokens))
        if r.status_code != 202:
            return _http_outcome(r)
        a = self.tally.accept(r.json()["id"], "async")
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            try:
                p = await http.get(f"/v1/invocations/{a.id}")
            except httpx.HTTPError:
                continue  # the gateway is restarting: poll again
            if p.status_code == 200 and p.json()["status"] in FINAL:
                a.client_status = p.json()["status"]
                return "ok" if a.client_status == "succeeded" else f"invocation_{a.client_status}"
        return "poll_timeout"

    async def _stream(self, http: httpx.AsyncClient, adapter: str, rng: random.Random, *,
                      abandon_after: int | None = None) -> str:
        model = "base" if adapter == subjects.BASE_ADAPTER else f"{TENANT}/{adapter}"
        max_tokens = self.options.abandoned_max_tokens if abandon_after else self.options.max_tokens
        body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
                "messages": [{"role": "user", "content": f"{PROMPT} ({rng.randrange(1 << 30)})"}]}
        kind = "abandoned" if abandon_after else "stream"
        a: Accepted | None = None
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self._accept_error(r, kind)
                    return _http_outcome(r)
                a = self.tally.accept(r.headers["x-lorafn-invocation-id"], kind)
                events = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    events += 1
                    event = json.loads(data)
                    if "error" in event:
                        a.finishes += 1
                        a.client_status = "failed"
                    elif any(c.get("finish_reason") for c in event.get("choices", [])):
                        a.finishes += 1
                        a.client_status = "succeeded"
                    if abandon_after is not None and events >= abandon_after and a.client_status is None:
                        a.abandoned = True
                        return "ok"  # leaving the block closes the connection mid-stream
        except asyncio.CancelledError:
            if a is not None and a.client_status is None:
                a.abandoned = True  # dropped at the drain: a disconnect like any other
            raise
        except (httpx.HTTPError, OSError) as e:
            if a is not None and a.client_status is None:
                a.abandoned = True  # the connection broke (a gateway killed): nobody reads the rest
            return error_kind(e)
        if a.client_status == "failed":
            return "invocation_failed"
        if a.client_status is None:
            a.abandoned = True
            return "stream_ended_without_result"
        return "ok"

    async def _abandoned(self, http: httpx.AsyncClient, adapter: str, rng: random.Random) -> str:
        return await self._stream(http, adapter, rng, abandon_after=self.options.abandon_after_events)

    async def churn(self) -> None:
        """Push an adapter of its own (every third one with the bytes of a stable adapter), call it once, delete
        it; the next step while the previous adapter's call may still run elsewhere."""
        rng = random.Random(f"{self.options.seed}-churn")
        churn_dirs = self.adapter_dirs[self.options.stable_adapters:]
        step = 0
        async with self.stack.http() as http:
            while not self.stop.is_set():
                name = f"churn-{step % 3}"
                source = rng.choice(self.adapter_dirs[:self.options.stable_adapters]) if step % 3 == 0 \
                    else rng.choice(churn_dirs)
                for op in ("push", "call", "delete"):
                    try:
                        if op == "push":
                            r = await push_adapter(http, name, source)
                            outcome = "ok" if r.status_code in (200, 201) else _http_outcome(r)
                        elif op == "call":
                            outcome = await self._sync(http, name, rng)
                        else:
                            r = await http.delete(f"/v1/adapters/{TENANT}/{name}")
                            outcome = "ok" if r.status_code == 200 else _http_outcome(r)
                    except (httpx.HTTPError, OSError) as e:
                        outcome = error_kind(e)
                    self.tally.note(f"adapter_{op}", outcome)
                step += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.options.churn_every_s)


async def push_stable(stack: Stack, load: Load) -> None:
    """The adapters the callers invoke, pushed before the load (each retried while the stack settles)."""
    async with stack.http() as http:
        for name, directory in zip(load.stable, load.adapter_dirs, strict=False):
            for attempt in range(10):
                r = await push_adapter(http, name, directory)
                if r.status_code in (200, 201):
                    break
                log.warning("pushing %s answered %d (attempt %d): %s", name, r.status_code, attempt + 1, r.text)
                await asyncio.sleep(1.0)
            else:
                raise RuntimeError(f"could not push {name}: {r.status_code} {r.text}")


def write_adapters(root: Path, backbone: Path, count: int) -> list[Path]:
    """`count` random adapters for the stack's backbone (ranks alternate over ADAPTER_RANKS)."""
    from storage.adapter_format import write_peft_adapter
    from storage.backbone import resolve_backbone_spec

    spec = resolve_backbone_spec(gguf=backbone if backbone.is_file() else None,
                                 hf_dir=None if backbone.is_file() else backbone)
    return [write_peft_adapter(root / f"adapter-{i}", spec, rank=ADAPTER_RANKS[i % len(ADAPTER_RANKS)], seed=i)
            for i in range(count)]


# -- chaos and sampling ------------------------------------------------------------------------------------------


@dataclass
class ChaosLog:
    done: list[dict[str, Any]] = field(default_factory=list)


async def run_chaos(stack: Stack, plan: Sequence[ChaosAction], started: float, stop: asyncio.Event,
                    record: ChaosLog) -> None:
    """Carry out the plan (times from `started`, a time.monotonic()); a target not running at its time (still
    being restarted) is noted and skipped."""
    for action in plan:
        delay = started + action.at_s - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        entry: dict[str, Any] = {"at_s": round(time.monotonic() - started, 1), "target": action.target,
                                 "signal": signal.Signals(action.signal).name}
        try:
            pid = stack.pids()[action.target]
            os.kill(pid, action.signal)
            entry["pid"] = pid
        except (KeyError, OSError, ValueError) as e:
            entry["skipped"] = f"{type(e).__name__}: {e}"
        log.warning("chaos: %s", entry)
        record.done.append(entry)


async def run_sampler(stack: Stack, every_s: float, started: float, stop: asyncio.Event,
                      samples: list[Sample]) -> None:
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            samples += sample_processes(stack.pids(), time.monotonic() - started)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


# -- the audit's reads -------------------------------------------------------------------------------------------


def read_rows(database_url: str, since: float) -> dict[str, str]:
    """id -> status of every invocation row submitted since `since` (a time.time())."""
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT id, status::text FROM invocations WHERE submitted_at >= to_timestamp(%s)",
                            (since - 1.0,)).fetchall()
    return {str(i): str(s) for i, s in rows}


async def read_results(nats_url: str, ids: Sequence[str]) -> tuple[dict[str, int], dict[str, str]]:
    """(id -> results recorded, id -> status of the last one) from the results stream: the per-subject
    message counts of `lora.result.>` (paged), and the last result of each of `ids` (those whose row is not
    final) that has one."""
    import msgpack
    import nats
    import nats.js.errors

    nc = await nats.connect(split_nats_urls(nats_url), connect_timeout=5)
    counts: dict[str, int] = {}
    status: dict[str, str] = {}
    try:
        offset = 0
        while True:
            req = json.dumps({"subjects_filter": subjects.RESULT_ALL, "offset": offset}).encode()
            msg = await nc.request(f"$JS.API.STREAM.INFO.{subjects.RESULTS_STREAM}", req, timeout=10)
            info = json.loads(msg.data)
            page = info.get("state", {}).get("subjects") or {}
            for subject, n in page.items():
                counts[subject.removeprefix(subjects.RESULT_PREFIX + ".")] = int(n)
            offset += len(page)
            if not page or offset >= int(info.get("total", 0)):
                break
        js = nc.jetstream()
        for inv_id in ids:
            if inv_id not in counts:
                continue
            with contextlib.suppress(nats.js.errors.NotFoundError):
                m = await js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(inv_id))
                status[inv_id] = str(msgpack.unpackb(m.data, raw=False).get("status"))
    finally:
        await nc.close()
    return counts, status


async def settle(stack: Stack, tally: Tally, since: float, grace_s: float) -> dict[str, str]:
    """Wait (up to `grace_s`) until every accepted invocation that is not an abandoned stream has a final row;
    the rows then."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            rows = await asyncio.to_thread(read_rows, stack.database_url(), since)
        except Exception as e:  # Postgres restarting
            log.warning("reading the invocation rows failed: %s", e)
            rows = {}
        open_ = [i for i, a in tally.accepted.items() if rows.get(i) not in FINAL and not a.abandoned]
        if (rows and not open_) or time.monotonic() >= deadline:
            return rows
        await asyncio.sleep(2.0)


# -- one run ----------------------------------------------------------------------------------------------------


def _summary_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"p50_ms": ordered[len(ordered) // 2], "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]}


async def measure(stack: Stack, options: ReliabilityOptions, adapters: Sequence[Path]) -> dict[str, Any]:
    """Load (and chaos) for `options.minutes` against a running stack, then the audit."""
    tally = Tally()
    load = Load(stack, options, adapters, tally)
    await push_stable(stack, load)
    since = time.time()
    started = time.monotonic()
    samples: list[Sample] = []
    sampler_stop = asyncio.Event()
    chaos = ChaosLog()
    plan = chaos_plan(options.duration_s, random.Random(f"{options.seed}-chaos"), kill_every_s=options.kill_every_s,
                      restart_servers=options.restart_servers) if options.mode == "chaos" else []
    supervision_before = len(stack.supervision)
    sampler = asyncio.create_task(run_sampler(stack, options.sample_every_s, started, sampler_stop, samples))
    tasks = [asyncio.create_task(load.caller(i)) for i in range(options.callers)]
    tasks.append(asyncio.create_task(load.churn()))
    chaos_task = asyncio.create_task(run_chaos(stack, plan, started, load.stop, chaos))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(load.stop.wait(), options.duration_s)
    load.stop.set()
    load_s = time.monotonic() - started
    await chaos_task
    _, pending = await asyncio.wait(tasks, timeout=options.drain_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    rows = await settle(stack, tally, since, options.grace_s)
    results_error = None
    try:
        unfinished = sorted(i for i in set(tally.accepted) | set(rows) if rows.get(i) not in FINAL)
        counts, status = await read_results(stack.nats_url(), unfinished)
    except Exception as e:  # the audit then rests on the rows and on what the clients saw: said in the report
        log.warning("reading the results stream failed: %r", e)
        counts, status, results_error = {}, {}, repr(e)
    # Only this run's invocations: the stream also holds the results of earlier runs on the same stack.
    mine = set(tally.accepted) | set(rows)
    counts = {i: n for i, n in counts.items() if i in mine}
    verdict = audit(tally.accepted, rows, counts, status)
    sampler_stop.set()
    await sampler
    return {
        "options": {**asdict(options), "weights": dict(zip(KINDS, options.weights, strict=True))},
        "load_s": load_s,
        "calls": dict(sorted(tally.calls.items())),
        "outcomes": {k: dict(v.most_common()) for k, v in sorted(tally.outcomes.items())},
        "latency": {k: _summary_ms(v) for k, v in sorted(tally.latencies_ms.items())},
        "audit": asdict(verdict),
        "results_stream_error": results_error,  # None: duplicates were counted in the results stream too
        "processes": summarise_samples(samples),
        "chaos": chaos.done,
        "supervision": list(stack.supervision)[supervision_before:],
    }


# -- report ----------------------------------------------------------------------------------------------------


def print_report(payload: dict[str, Any]) -> None:
    from bench.report import print_table

    mode, minutes = payload["options"]["mode"], payload["options"]["minutes"]
    rows = []
    for kind, n in payload["calls"].items():
        outcomes = payload["outcomes"][kind]
        errors = {k: v for k, v in outcomes.items() if k != "ok"}
        lat = payload["latency"].get(kind, {})
        rows.append([kind, n, outcomes.get("ok", 0), sum(errors.values()),
                     ", ".join(f"{k} {v}" for k, v in errors.items()) or "-",
                     lat.get("p50_ms", ""), lat.get("p99_ms", "")])
    print_table(f"reliability {mode}, {minutes:g} min, {payload['options']['callers']} callers + adapter churn: calls",
                ["kind", "calls", "ok", "errors", "errors by kind", "p50 ms (ok)", "p99 ms (ok)"], rows)
    a = payload["audit"]
    if payload.get("results_stream_error"):
        log.warning("the results stream could not be read (%s): duplicates counted from the clients only",
                    payload["results_stream_error"])
    print_table(f"reliability {mode}: audit of accepted invocations",
                ["accepted", "final states", "lost", "duplicated", "abandoned (by state)", "abandoned still running",
                 "row behind result", "client saw other status", "unaccepted unfinished rows"],
                [[a["accepted"], ", ".join(f"{k} {v}" for k, v in a["by_status"].items()), a["lost"], a["duplicated"],
                  f"{a['abandoned']} (" + ", ".join(f"{k} {v}" for k, v in a["abandoned_by_status"].items()) + ")",
                  a["abandoned_running"], a["row_behind_result"], a["client_disagrees"], a["unaccepted_unfinished"]]])
    prow = []
    for name, p in payload["processes"].items():
        prow.append([name, p["pids"], p["rss_mb_start"], p["rss_mb_end"], p["rss_mb_peak"], p["fds_start"],
                     p["fds_end"], p["fds_peak"],
                     f"{p['children_end']} / {p['children_rss_mb_end']:.1f} MB / {p['children_fds_end']} fds"
                     if "children_end" in p else ""])
    print_table(f"reliability {mode}: memory (VmRSS) and open descriptors per process, sampled every "
                f"{payload['options']['sample_every_s']:g} s",
                ["process", "pids", "RSS MB start", "RSS MB end", "RSS MB peak", "fds start", "fds end", "fds peak",
                 "children at end (count / RssAnon / fds)"], prow)
    if payload["chaos"]:
        print_table(f"reliability {mode}: chaos", ["at s", "target", "signal", "pid"],
                    [[c["at_s"], c["target"], c["signal"], c.get("pid", c.get("skipped", ""))]
                     for c in payload["chaos"]])


def run_one(options: ReliabilityOptions, *, backbone: Path | None = None, write: bool = True,
            logs: Path | None = None) -> dict[str, Any]:
    """A throwaway `lorafn up` in a temporary directory, one run, its tables and JSON
    (bench/results/reliability-<mode>.json); `logs`: where the services' logs and the launcher's output are
    copied before the directory goes (the evidence behind an error or a lost invocation)."""
    from bench.report import write as write_json

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"lorafn-bench-{options.mode}-") as tmp:
        root = Path(tmp)
        if backbone is None:
            from workers.tiny import write_tiny_backbone

            backbone = write_tiny_backbone(root / "backbone")
        adapters = write_adapters(root / "adapters", backbone, options.stable_adapters + 3)
        with running_stack(root, backbone) as stack:
            setup_s = time.monotonic() - started
            try:
                payload = asyncio.run(measure(stack, options, adapters))
            finally:
                if logs is not None:
                    shutil.copytree(stack.state / "logs", logs, dirs_exist_ok=True)
                    (logs / "lorafn-up.log").write_text(stack.output + "\n")
    payload = {"setup_s": setup_s, **payload, "elapsed_s": time.monotonic() - started}
    print_report(payload)
    if write:
        write_json(f"reliability-{options.mode}", payload)
    return payload


def run(*, soak_minutes: float = 3.0, chaos_minutes: float = 3.0) -> dict[str, Any]:
    """`python -m bench` (and `python -m bench reliability`): a short soak and a short chaos run."""
    return {"soak": run_one(ReliabilityOptions(mode="soak", minutes=soak_minutes)),
            "chaos": run_one(ReliabilityOptions(mode="chaos", minutes=chaos_minutes))}


def main(argv: list[str] | None = None) -> None:
    """`python -m bench reliability [soak|chaos] [--minutes M] ...`."""
    parser = argparse.ArgumentParser(prog="python -m bench reliability", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("soak", "chaos"), help="one run (default: both, short)")
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the load (full runs: soak 30, chaos 10+)")
    parser.add_argument("--callers", type=int, default=ReliabilityOptions.callers, help="concurrent HTTP callers")
    parser.add_argument("--backbone", type=Path, default=None,
                        help=".gguf file or checkpoint dir the workers serve (default: the tiny random backbone)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the calls and the chaos plan")
    parser.add_argument("--logs", type=Path, default=None,
                        help="copy the services' logs and the launcher's output to LOGS/<mode>/ at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backbone = args.backbone.resolve() if args.backbone else None
    for mode in [args.mode] if args.mode else ["soak", "chaos"]:
        run_one(ReliabilityOptions(mode=mode, minutes=args.minutes, callers=args.callers, seed=args.seed),
                backbone=backbone, logs=args.logs / mode if args.logs else None)


if __name__ == "__main__":
    main()
