"""`lorafn up` as a child process for the benchmarks that need a whole local stack (`bench.reliability`,
`bench.live_replay`): started on free ports with its state in a given folder, its output read by a thread,
yielded once the gateway is ready and a call of the bare backbone succeeds, stopped with SIGINT (as Ctrl-C).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from protocol import subjects

TENANT = "dev"  # the tenant `lorafn up` creates, with its key in <state>/dev-api-key
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 120.0


@dataclass
class Stack:
    """A running `lorafn up` and what it printed."""

    proc: subprocess.Popen[str]
    state: Path
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=5000))
    supervision: list[str] = field(default_factory=list)  # the launcher's exit and restart lines
    gateway: str = ""
    api_key: str = ""

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def pids(self) -> dict[str, int]:
        """Every process of the stack now: servers, services and the launcher."""
        endpoints = json.loads((self.state / "stack.json").read_text())
        return {**endpoints["pids"], "launcher": endpoints["launcher_pid"]}

    def nats_url(self) -> str:
        return str(json.loads((self.state / "stack.json").read_text())["nats_url"])

    def database_url(self) -> str:
        return str(json.loads((self.state / "stack.json").read_text())["database_url"])

    def http(self, timeout: float = CALL_TIMEOUT_S) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.gateway, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.api_key}"},
                                 limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))


def wait_until(stack: Stack, check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """`check()`'s first truthy value, polled; an error if `lorafn up` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if stack.proc.poll() is not None:
            raise RuntimeError(f"lorafn up exited with code {stack.proc.returncode} waiting for {what}; its output:\n"
                               f"{stack.output[-4000:]}")
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # stack.json mid-write, the table not printed yet, the gateway not yet listening
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{what} not reached in {timeout:.0f} s ({last!r}); lorafn up printed:\n{stack.output[-4000:]}")


@contextlib.contextmanager
def running_stack(state: Path, *, workers: int, backbone: Path | None = None, env: Mapping[str, str] | None = None,
                  one_thread: bool = False) -> Iterator[Stack]:
    """`lorafn up --auto-ports` with its state in `state`, `env` given to its services (`--env`: they see no
    other LORAFN_* variable), until a call of the bare backbone succeeds; stopped with SIGINT on exit.
    `one_thread`: one compute thread per process (several services and the callers on a small machine)."""
    command = [sys.executable, "-m", "lorafn", "up", "--state-dir", str(state), "--auto-ports", "--workers", str(workers)]
    if backbone is not None:
        command += ["--backbone", str(backbone)]
    for name, value in (env or {}).items():
        command += ["--env", f"{name}={value}"]
    # A wide table, so that the gateway's address is printed on one line.
    proc_env = {**os.environ, "COLUMNS": "200", **({"OMP_NUM_THREADS": "1"} if one_thread else {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=proc_env)
    stack = Stack(proc, state)

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            stack.lines.append(line)
            if " exited with " in line or "restarted " in line or "restarting " in line:
                stack.supervision.append(line)

    reader = threading.Thread(target=read, daemon=True, name="lorafn-up-output")
    reader.start()
    try:
        found = wait_until(stack, lambda: re.search(r"(http://[\d.]+:\d+)\s+\(OpenAI", stack.output),
                           timeout=START_TIMEOUT_S, what="the stack's table")
        stack.gateway = found.group(1)
        stack.api_key = (state / "dev-api-key").read_text().strip()

        def ready() -> bool:
            with httpx.Client(base_url=stack.gateway, timeout=CALL_TIMEOUT_S,
                              headers={"Authorization": f"Bearer {stack.api_key}"}) as client:
                if client.get("/readyz").status_code != 200:
                    return False
                r = client.post(f"/v1/functions/{TENANT}/{subjects.BASE_ADAPTER}/invocations",
                                json={"prompt": "warm up", "max_tokens": 2})
                return r.status_code == 200

        wait_until(stack, ready, timeout=START_TIMEOUT_S, what="the gateway ready and a worker serving")
        yield stack
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(10)
