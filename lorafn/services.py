"""The lorafn services (scheduler, workers, gateway) as child processes of `lorafn up` and `make demo`, and
the supervision that keeps `lorafn up`'s processes running.

Supervision. A process of `lorafn up` that exits while the stack runs is started again after a backoff
(`RestartPolicy`: 0.5 s, doubling per crash in a row, at most 30 s; a process that stayed up 60 s starts a
new streak), and the launcher logs each exit and restart. This holds for the services (scheduler, workers,
gateway: restarted with the same command and environment, so a worker keeps its id and host cache
directory) and for the servers under them (NATS, Postgres, S3: `LocalStack.restart`, on the same ports and
data, waiting until the server answers). Restarting the servers rather than stopping everything is safe
because their state is on disk (JetStream file storage, the Postgres data directory, the S3 volumes) and
every service reconnects by itself; a service that crashes while a server is away is restarted in turn.
A server that cannot come back keeps failing its restarts, each logged with the server's log path, at
the longest backoff. Shutdown (Ctrl-C, SIGTERM) is never a crash: no restart starts once stopping has
begun, and a restart in progress is abandoned.

The backoff is decided by `RestartPolicy` alone, from plain numbers (the time passed in), so it is tested
table-driven; `Supervisor` does the polling, logging and restarting around it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorafn.stack import ManagedProcess, StackEndpoints, StackError
from storage.settings import ObjectStoreSettings

log = logging.getLogger(__name__)


def child_env(
    *,
    nats_url: str,
    database_url: str | None = None,
    object_store: ObjectStoreSettings | None = None,
    extra: Mapping[str, str] | None = None,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a lorafn service process: `parent` (default: ours) without any LORAFN_* variable,
    plus the given endpoints, plus `extra` (which wins).

    Dropping the parent's LORAFN_* variables is the point: a child must reach the servers it is given, not
    whatever a developer's shell happens to export. Endpoints left out (None) are not set, e.g. a worker
    has no database.
    """
    env = {k: v for k, v in (os.environ if parent is None else parent).items() if not k.startswith("LORAFN_")}
    env["LORAFN_NATS__URL"] = nats_url
    if database_url is not None:
        env["LORAFN_DATABASE__URL"] = database_url
    if object_store is not None:
        env |= {
            "LORAFN_OBJECT_STORE__ENDPOINT": object_store.endpoint,
            "LORAFN_OBJECT_STORE__ACCESS_KEY": object_store.access_key,
            "LORAFN_OBJECT_STORE__SECRET_KEY": object_store.secret_key.get_secret_value(),
            "LORAFN_OBJECT_STORE__BUCKET": object_store.bucket,
            "LORAFN_OBJECT_STORE__SECURE": "true" if object_store.secure else "false",
        }
        if object_store.region is not None:
            env["LORAFN_OBJECT_STORE__REGION"] = object_store.region
    env |= extra or {}
    return env


def nats_env(endpoints: StackEndpoints, component: str) -> dict[str, str]:
    """The NATS identity of a service of `lorafn up`: its component's own user and inbox prefix
    (protocol.nats_auth), and for the scheduler the auth callout's user and signing key. Empty for a stack
    that has no per-component users (its admin URL from `service_env` stays)."""
    from protocol.nats_auth import inbox_prefix

    url = endpoints.nats_urls.get(component)
    if url is None:
        return {}
    env = {"LORAFN_NATS__URL": url, "LORAFN_NATS__INBOX_PREFIX": inbox_prefix(component),
           "LORAFN_NATS__STREAM_REPLICAS": str(endpoints.nats_stream_replicas)}
    if component == "scheduler" and "auth" in endpoints.nats_urls and endpoints.nats_callout_seed:
        env |= {"LORAFN_NATS_CALLOUT__URL": endpoints.nats_urls["auth"],
                "LORAFN_NATS_CALLOUT__ISSUER_SEED": endpoints.nats_callout_seed}
    return env


def service_env(endpoints: StackEndpoints) -> dict[str, str]:
    """The environment `lorafn up` gives its services: ours without LORAFN_*, plus the stack's endpoints."""
    from lorafn.bootstrap import object_store_settings

    return child_env(nats_url=endpoints.nats_url, database_url=endpoints.database_url,
                     object_store=object_store_settings(endpoints))


def backbone_env(backbone: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """(worker, gateway) environment that selects `backbone` (a .gguf file or a checkpoint directory):
    the workers load it, the gateway checks uploaded adapters against its shapes. None: the default."""
    if backbone is None:
        return {}, {}
    registry_key = "LORAFN_REGISTRY__BACKBONE_GGUF" if backbone.is_file() else "LORAFN_REGISTRY__BACKBONE_HF_DIR"
    return {"LORAFN_BACKBONE__PATH": str(backbone)}, {registry_key: str(backbone)}


@contextlib.contextmanager
def running_services(endpoints: StackEndpoints, state_dir: Path, *, workers: int, gateway_port: int,
                     backbone: Path | None = None, settings: Mapping[str, str] | None = None,
                     ) -> Iterator[list[ManagedProcess]]:
    """Scheduler, `workers` workers and the gateway as child processes, started with the same commands and
    environment as `lorafn up` (the gateway on `gateway_port`); stopped in reverse order on exit. `settings`:
    variables given to every service (`lorafn up --env`); the endpoints and ids set here win over them.

    Worker i is `local-w<i>` with its host cache in `<state_dir>/host-cache/w<i>`, which a restart keeps.
    """
    env = {**(settings or {}), **service_env(endpoints)}
    worker_backbone, gateway_backbone = backbone_env(backbone)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    specs: list[tuple[str, str, dict[str, str]]] = [("scheduler", "scheduler", nats_env(endpoints, "scheduler"))]
    specs += [
        (f"worker-{i}", "workers", {"LORAFN_WORKER_ID": f"local-w{i}",
                                    "LORAFN_HOST_CACHE__DIRECTORY": str(state_dir / "host-cache" / f"w{i}"),
                                    **worker_backbone, **nats_env(endpoints, "worker")})
        for i in range(1, workers + 1)
    ]
    specs.append(("gateway", "gateway", {"LORAFN_GATEWAY__HTTP__PORT": str(gateway_port), **gateway_backbone,
                                         **nats_env(endpoints, "gateway")}))
    procs: list[ManagedProcess] = []
    try:
        for name, module, extra in specs:
            proc = ManagedProcess(name, [sys.executable, "-m", module], logs / f"{name}.log", env={**env, **extra},
                                  stop_timeout_s=30.0 if module == "workers" else 10.0)
            procs.append(proc)
            proc.start()
        yield procs
    finally:
        for proc in reversed(procs):
            try:
                proc.stop()
            except Exception:
                log.warning("stopping %s failed", proc.name, exc_info=True)


# -- supervision ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """How long to wait before starting a crashed process again: exponential backoff, reset by uptime.

    The first crash waits `first_delay_s`, each further crash in a row `factor` times longer, up to
    `max_delay_s`. A crash after the process stayed up `reset_after_s` starts a new streak: one crash an
    hour is not a crash loop.
    """

    first_delay_s: float = 0.5
    factor: float = 2.0
    max_delay_s: float = 30.0
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ValueError(f"first_delay_s ({self.first_delay_s}) must be between 0 and max_delay_s "
                             f"({self.max_delay_s})")
        if self.factor < 1:
            raise ValueError(f"factor ({self.factor}) must be at least 1")

    def streak(self, *, now: float, started_at: float, restarts: int) -> int:
        """Crashes in a row, the one at `now` included, of a process started at `started_at` after
        `restarts` restarts in a row."""
        return 1 if now - started_at >= self.reset_after_s else restarts + 1

    def next_delay(self, *, now: float, started_at: float, restarts: int) -> float:
        """Seconds to wait before restarting a process (started at `started_at`, after `restarts` restarts in
        a row) that exited at `now`."""
        streak = self.streak(now=now, started_at=started_at, restarts=restarts)
        # The exponent is capped so that a long crash loop cannot overflow the float.
        return min(self.max_delay_s, self.first_delay_s * self.factor ** min(streak - 1, 64))


def describe_exit(code: int | None) -> str:
    """'code 3', or 'code -9 (SIGKILL)' for a process killed by a signal."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"code {code} ({signal.Signals(-code).name})"
    return f"code {code}"


@dataclass
class Supervised:
    """One process under supervision and where it stands."""

    process: ManagedProcess
    restart: Callable[[], None]  # starts the (exited) process again; may raise StackError or OSError
    started_at: float
    restarts: int = 0  # restarts in a row: since the process last stayed up RestartPolicy.reset_after_s
    restart_at: float | None = None  # when the pending restart is due; None: none pending


@dataclass
class Supervisor:
    """Restarts the processes of `lorafn up` that exit on their own, each after its backoff.

    `check(now)` is called every fraction of a second by the launcher's loop: a process found dead gets
    a restart scheduled (and logged), a restart that is due is done. `stopping()` true means shutdown has
    begun: nothing is restarted any more. `on_restart` runs after each restart (the launcher records the
    new pids).
    """

    units: Sequence[Supervised]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    stopping: Callable[[], bool] = lambda: False
    on_restart: Callable[[], None] = lambda: None

    def check(self, now: float) -> None:
        """Schedule the restart of every process found dead, and do the restarts due at `now`."""
        for unit in self.units:
            if self.stopping():
                return
            if unit.restart_at is None:
                if not unit.process.alive():
                    self._schedule(unit, now)
            elif now >= unit.restart_at:
                self._restart(unit, now)

    def pending(self) -> list[str]:
        """Names of the processes waiting for their restart."""
        return [u.process.name for u in self.units if u.restart_at is not None]

    def _schedule(self, unit: Supervised, now: float) -> None:
        delay = self.policy.next_delay(now=now, started_at=unit.started_at, restarts=unit.restarts)
        unit.restarts = self.policy.streak(now=now, started_at=unit.started_at, restarts=unit.restarts)
        unit.restart_at = now + delay
        proc = unit.process
        log.warning("%s exited with %s; restarting in %.1f s (restart %d; log: %s)", proc.name,
                    describe_exit(proc.proc.returncode if proc.proc else None), delay, unit.restarts, proc.log_path)

    def _restart(self, unit: Supervised, now: float) -> None:
        unit.restart_at = None
        unit.started_at = now  # a restart that fails at once counts as a crash in a row
        try:
            unit.restart()
        except (StackError, OSError) as e:
            # The process is dead again: the next check schedules the next restart, with a longer delay.
            # (A server's wait for readiness is cancelled when shutdown begins: no failure to report.)
            if not self.stopping():
                log.warning("restarting %s failed: %s", unit.process.name, e)
            return
        log.warning("restarted %s (pid %s)", unit.process.name, unit.process.pid)
        self.on_restart()
