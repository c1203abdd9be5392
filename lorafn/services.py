"""The lorafn services (scheduler, workers, gateway) as child processes of `lorafn up` and `make demo`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lorafn.stack import ManagedProcess, StackEndpoints

log = logging.getLogger(__name__)


def service_env(endpoints: StackEndpoints) -> dict[str, str]:
    """The environment `lorafn up` gives its services: ours without LORAFN_*, plus the stack's endpoints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFN_")}
    env |= {
        "LORAFN_NATS__URL": endpoints.nats_url,
        "LORAFN_DATABASE__URL": endpoints.database_url,
        "LORAFN_OBJECT_STORE__ENDPOINT": endpoints.s3_endpoint,
        "LORAFN_OBJECT_STORE__ACCESS_KEY": endpoints.s3_access_key,
        "LORAFN_OBJECT_STORE__SECRET_KEY": endpoints.s3_secret_key,
        "LORAFN_OBJECT_STORE__BUCKET": endpoints.bucket,
    }
    return env


@contextlib.contextmanager
def running_services(endpoints: StackEndpoints, state_dir: Path, *, workers: int,
                     gateway_port: int) -> Iterator[list[ManagedProcess]]:
    """Scheduler, `workers` workers and the gateway as child processes, started with the same commands and
    environment as `lorafn up` (the gateway on `gateway_port`); stopped in reverse order on exit."""
    env = service_env(endpoints)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    specs: list[tuple[str, str, dict[str, str]]] = [("scheduler", "scheduler", {})]
    specs += [
        (f"worker-{i}", "workers", {"LORAFN_WORKER_ID": f"local-w{i}",
                                    "LORAFN_HOST_CACHE__DIRECTORY": str(state_dir / "host-cache" / f"w{i}")})
        for i in range(1, workers + 1)
    ]
    specs.append(("gateway", "gateway", {"LORAFN_GATEWAY__HTTP__PORT": str(gateway_port)}))
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
