"""What durability costs the invocation path: a JetStream publish of an invocation, acknowledged, on one NATS
server and on a 3-server cluster with the streams at 3 replicas, each with the server's default sync interval
(JetStream fsyncs its files every 2 minutes; a write is acknowledged once it is in the OS's page cache) and
with `sync_interval: always` (fsync before every acknowledgement).

`python -m bench durability [--quick] [--messages N] [--concurrency C] [--dir DIR]`

The four configurations run side by side: four local stacks (`lorafn.stack.LocalStack` with NATS alone, as
`lorafn up --nats-cluster N --nats-sync always` starts it) with the streams as `lorafn up` makes them, each
with a client connected to every server. The messages are real `Invocation`s (a chat of about 2 KB, the
gateway's `Nats-Msg-Id` header) published on `lora.invoke.<tenant>.<adapter>` as the gateway publishes them,
awaiting the ack. Two loads: one publish at a time (a lone caller's latency) and `concurrency` publishes in
flight (a busy gateway: latency under load and publishes per second). The configurations take turns, a slice
of messages each, so that the noise of a shared machine falls on all four alike; the first slice of each is
a warm-up and is not counted.

Figures per configuration and load: p50, p99 and mean latency of a publish (send to ack), publishes per
second; each against the same servers with the default sync interval, and the p50 against one server with the
default (what replication costs). fsync's cost is the disk's: the
file system of the store is recorded with the figures. Written to bench/results/durability.json and
durability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import corpus
from bench.report import RESULTS_DIR, machine, print_table, write
from protocol import subjects
from protocol.messages import ChatMessage, Invocation
from protocol.streams import ensure_streams

TENANT, ADAPTER = "bench", "durability"


@dataclass(frozen=True)
class Config:
    """One way to run NATS: how many servers (streams at as many replicas) and the sync interval."""

    servers: int
    sync: str | None  # None: the server's default (2 minutes)

    @property
    def label(self) -> str:
        where = "1 server" if self.servers == 1 else f"{self.servers} servers, R{self.servers}"
        return f"{where}, sync {self.sync or 'default (2m)'}"


CONFIGS = (Config(1, None), Config(1, "always"), Config(3, None), Config(3, "always"))


@dataclass(frozen=True)
class DurabilitySettings:
    messages: int = 2000  # per configuration and load, counted (a warm-up slice comes on top)
    concurrency: int = 16  # publishes in flight in the concurrent load
    slice_messages: int = 100  # messages a configuration publishes in its turn

    def __post_init__(self) -> None:
        if self.messages < 1 or self.concurrency < 1 or self.slice_messages < 1:
            raise ValueError(f"messages ({self.messages}), concurrency ({self.concurrency}) and slice_messages "
                             f"({self.slice_messages}) must be at least 1")


QUICK = DurabilitySettings(messages=300, slice_messages=50)


@dataclass
class Load:
    """Latencies (seconds) of the counted publishes of one load, and the time they took."""

    latencies: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
                "mean_ms": statistics.fmean(lat) * 1e3 if lat else 0.0,
                "per_s": len(lat) / self.elapsed_s if self.elapsed_s > 0 else 0.0, "count": len(lat)}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values sorted ascending; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def invocation_payload(i: int) -> tuple[str, bytes]:
    """(id, encoded Invocation): a chat of about 2 KB from the benchmark corpus, as the gateway sends it."""
    text = corpus.TEXT[(i * 97) % 1000:][:2000]
    inv = Invocation(id=f"inv_{secrets.token_urlsafe(16)}", tenant=TENANT, adapter=ADAPTER,
                     messages=[ChatMessage(role="user", content=text)],
                     reply_to=subjects.gateway_reply("bench", f"inv{i}", tenant=TENANT))
    return inv.id, inv.encode()


async def publish_slice(js: Any, count: int, concurrency: int, start: int) -> tuple[list[float], float]:
    """Publish `count` invocations with `concurrency` in flight, each awaiting its ack: (latencies, elapsed)."""
    messages = [invocation_payload(start + i) for i in range(count)]
    latencies: list[float] = []
    subject = subjects.invoke(TENANT, ADAPTER)
    gate = asyncio.Semaphore(concurrency)

    async def one(msg_id: str, payload: bytes) -> None:
        async with gate:
            t0 = time.perf_counter()
            await js.publish(subject, payload, timeout=30.0, stream=subjects.INVOCATIONS_STREAM,
                             headers={subjects.MSG_ID_HEADER: msg_id})
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in messages))
    return latencies, time.perf_counter() - t0


@contextlib.contextmanager
def nats_stacks(configs: Sequence[Config], root: Path) -> Iterator[list[Any]]:
    """A NATS-only local stack per configuration under `root`, started together; stopped on exit."""
    from lorafn.stack import LocalStack, StackConfig, free_stack_ports

    stacks: list[LocalStack] = []
    try:
        for i, c in enumerate(configs):
            avoid = [p for s in stacks for srv in s.config.ports.nats_servers(s.config.nats_cluster)
                     for p in (srv.client, srv.cluster, srv.monitor)]
            stack = LocalStack(StackConfig(state_dir=root / f"nats-{i}", nats_only=True, nats_cluster=c.servers,
                                           nats_sync=c.sync,
                                           ports=free_stack_ports(nats_servers=c.servers, avoid=avoid)))
            stacks.append(stack)
            stack.start()
        yield stacks
    finally:
        for stack in reversed(stacks):
            stack.stop()


def file_system(path: Path) -> str:
    """The type and device of the file system holding `path` (from /proc/mounts), or "unknown"."""
    best, found = "", "unknown"
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, found = mount, f"{kind} on {device}"
    return found


async def measure(settings: DurabilitySettings, root: Path, configs: Sequence[Config] = CONFIGS) -> dict[str, Any]:
    """Run both loads on every configuration, in turns (see the module docstring)."""
    import nats

    loads = {"one at a time": 1, f"{settings.concurrency} in flight": settings.concurrency}
    results: dict[tuple[int, str], Load] = {(i, name): Load() for i in range(len(configs)) for name in loads}
    with nats_stacks(configs, root) as stacks:
        clients = []
        try:
            for stack, c in zip(stacks, configs, strict=True):
                assert stack.endpoints is not None
                nc = await nats.connect(stack.endpoints.nats_admin.split(","), connect_timeout=5)
                clients.append(nc)
                await ensure_streams(nc.jetstream(), replicas=c.servers, reconfigure=True)
            full, rest = divmod(settings.messages, settings.slice_messages)
            slices = [settings.slice_messages] * full + ([rest] if rest else [])
            sent = 0
            for name, concurrency in loads.items():
                for r, count in enumerate([settings.slice_messages, *slices]):  # the first: a warm-up
                    for i, nc in enumerate(clients):
                        latencies, elapsed = await publish_slice(nc.jetstream(), count, concurrency, sent)
                        sent += count
                        if r > 0:
                            load = results[(i, name)]
                            load.latencies += latencies
                            load.elapsed_s += elapsed
                    for nc in clients:  # the stream stays small: a work queue no one consumes here
                        await nc.jetstream().purge_stream(subjects.INVOCATIONS_STREAM)
        finally:
            for nc in clients:
                with contextlib.suppress(Exception):
                    await nc.close()
    rows = []
    for i, c in enumerate(configs):
        for name in loads:
            s = results[(i, name)].summary()
            base = next(j for j, b in enumerate(configs) if b.servers == c.servers and b.sync is None)
            b = results[(base, name)].summary()
            one = results[(0, name)].summary()  # configs[0]: one server, the default sync
            rows.append({"config": asdict(c), "label": c.label, "load": name, **s,
                         "p50_vs_one_server": s["p50_ms"] / one["p50_ms"] if one["p50_ms"] else 0.0,
                         "p50_vs_default": s["p50_ms"] / b["p50_ms"] if b["p50_ms"] else 0.0,
                         "p99_vs_default": s["p99_ms"] / b["p99_ms"] if b["p99_ms"] else 0.0,
                         "per_s_vs_default": s["per_s"] / b["per_s"] if b["per_s"] else 0.0})
    return {"settings": asdict(settings), "store": file_system(root), "message_bytes": len(invocation_payload(0)[1]),
            "rows": rows}


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# Durability: the cost of `sync_interval: always` on the invocation path",
        "",
        f"`python -m bench durability`: a JetStream publish of an invocation ({payload['message_bytes']} bytes, as "
        f"the gateway publishes it), awaiting the ack; {s['messages']} counted publishes per configuration and "
        f"load, the configurations taking turns in slices of {s['slice_messages']}. Stores on "
        f"{payload['store']}; machine: {payload['machine']['cpu_count']} CPU cores.",
        "",
        "| NATS | load | p50 ms | p99 ms | mean ms | publishes/s | p50 vs default sync | p99 vs default sync | "
        "publishes/s vs default sync | p50 vs 1 server, default sync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(f"| {r['label']} | {r['load']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} | "
                     f"{r['per_s']:.0f} | {r['p50_vs_default']:.2f}x | {r['p99_vs_default']:.2f}x | "
                     f"{r['per_s_vs_default']:.2f}x | {r['p50_vs_one_server']:.2f}x |")
    lines += ["", f"An fsync costs what the disk makes it cost, and these figures are this machine's disk ({payload['store']}); "
              "measure on the disk the servers will use (`python -m bench durability --dir DIR`).",
              "", "What each setting loses on what failure: docs/nats.md, \"Cluster and durability\"."]
    return "\n".join(lines) + "\n"


def report(payload: dict[str, Any], *, results_dir: Path = RESULTS_DIR) -> Path:
    """Print the table, write results_dir/durability.json and durability.md."""
    print_table("JetStream publish of an invocation, acked", ["NATS", "load", "p50 ms", "p99 ms", "publishes/s",
                                                               "p50 vs default", "p99 vs default"],
                [[r["label"], r["load"], r["p50_ms"], r["p99_ms"], round(r["per_s"]), r["p50_vs_default"],
                  r["p99_vs_default"]] for r in payload["rows"]])
    path = write("durability", payload, results_dir=results_dir)
    (results_dir / "durability.md").write_text(markdown({**payload, "machine": machine()}))
    return path


def run(*, settings: DurabilitySettings = QUICK, directory: Path | None = None,
        results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """The benchmark (the quick run by default: `python -m bench` runs it); see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="lorafn-bench-durability-", dir=directory) as tmp:
        payload = asyncio.run(measure(settings, Path(tmp)))
    report(payload, results_dir=results_dir)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench durability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.messages} publishes per configuration and load")
    parser.add_argument("--messages", type=int, default=None, help="publishes per configuration and load")
    parser.add_argument("--concurrency", type=int, default=DurabilitySettings.concurrency,
                        help="publishes in flight in the concurrent load")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the servers keep their stores (fsync costs what this disk costs; default: the "
                             "system's temporary directory)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DurabilitySettings()
    settings = DurabilitySettings(messages=args.messages or base.messages, concurrency=args.concurrency,
                                  slice_messages=base.slice_messages)
    return run(settings=settings, directory=args.dir)
