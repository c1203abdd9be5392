"""`lorafn up` keeps its stack up, for real: `lorafn up --workers 2` on the tiny backbone, a worker killed with
SIGKILL comes back (same worker id, new pid) while every other process and the gateway carry on, and Ctrl-C
during a restart's backoff still stops everything.

The module shares one `lorafn up` (starting one takes 15 to 25 s on a small machine); the last test stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.msg import Msg

from lorafn.stack import StackEndpoints, port_is_free
from protocol import subjects
from protocol.messages import Heartbeat
from workers.tiny import write_tiny_backbone

LORAFN = [sys.executable, "-m", "lorafn"]
RESTART_DELAY_S = 3.0  # long enough to send Ctrl-C inside the backoff, short enough for "back within 10 s"
START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0


@dataclass
class Up:
    """A running `lorafn up` and what it printed so far (stdout and stderr, read by a thread)."""

    proc: subprocess.Popen[str]
    state: Path
    lines: list[str] = field(default_factory=list)
    gateway: str = ""
    api_key: str = ""

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def endpoints(self) -> StackEndpoints:
        return StackEndpoints.read(self.state / "stack.json")

    def wait(self, check: Callable[[], object], *, timeout: float, what: str) -> object:
        """Poll `check` until it returns something truthy; fail if `lorafn up` exits or after `timeout`."""
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lorafn up exited with {self.proc.returncode} waiting for {what}:\n{self.output}")
            try:
                value = check()
                if value:
                    return value
            except Exception as e:  # stack.json mid-write, a port not yet listening
                last_error = e
            time.sleep(0.1)
        raise AssertionError(f"{what} not reached in {timeout:.0f} s ({last_error!r})\n{self.output[-4000:]}")

    def call_base(self, client: httpx.Client, prompt: str) -> str:
        """A chat completion of the bare backbone through the gateway; its text."""
        r = client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 4, "temperature": 0,
                                                       "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text, r.text
        return str(text)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway, timeout=CALL_TIMEOUT_S,
                            headers={"Authorization": f"Bearer {self.api_key}"})


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited all the same
    except FileNotFoundError:
        return False


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def ports_of(endpoints: StackEndpoints, gateway: str) -> list[int]:
    return [
        int(endpoints.nats_url.rsplit(":", 1)[1]),
        int(endpoints.database_url.split("@")[1].split(":")[1].split("/")[0]),
        int(endpoints.s3_endpoint.rsplit(":", 1)[1]),
        int(gateway.rsplit(":", 1)[1]),
    ]


async def heartbeat_of(nats_url: str, worker_id: str, timeout: float) -> Heartbeat:
    """The next heartbeat of `worker_id` (a worker that heartbeats is connected and consuming)."""
    got: asyncio.Future[Heartbeat] = asyncio.get_running_loop().create_future()

    async def on_event(msg: Msg) -> None:
        with contextlib.suppress(Exception):
            beat = Heartbeat.decode(msg.data)
            if beat.worker_id == worker_id and not got.done():
                got.set_result(beat)

    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        await nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=on_event)
        return await asyncio.wait_for(got, timeout)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    root = tmp_path_factory.mktemp("supervised")
    backbone = write_tiny_backbone(root / "backbone")
    state = root / "state"
    proc = subprocess.Popen(
        [*LORAFN, "up", "--state-dir", str(state), "--auto-ports", "--workers", "2", "--backbone", str(backbone),
         "--restart-delay", str(RESTART_DELAY_S)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # four services on a small machine
    )
    running = Up(proc, state)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        gateway = running.wait(lambda: re.search(r"(http://127\.0\.0\.1:\d+)\s+\(OpenAI", running.output),
                               timeout=START_TIMEOUT_S, what="the stack table")
        assert isinstance(gateway, re.Match)
        running.gateway = gateway.group(1)
        running.api_key = (state / "dev-api-key").read_text().strip()
        running.wait(lambda: {"scheduler", "worker-1", "worker-2", "gateway"} <= set(running.endpoints().pids),
                     timeout=10, what="the services' pids in stack.json")
        with running.http() as client:
            running.wait(lambda: client.get("/readyz").status_code == 200, timeout=START_TIMEOUT_S,
                         what="the gateway ready")
            running.call_base(client, "warm up")  # a worker serves: the stack is up end to end
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(10)


def test_a_killed_worker_is_restarted_with_its_id_while_the_stack_stays_up(up: Up) -> None:
    before = up.endpoints().pids
    os.kill(before["worker-1"], signal.SIGKILL)
    killed_at = time.monotonic()

    new_pid = up.wait(lambda: (p := up.endpoints().pids["worker-1"]) != before["worker-1"] and pid_alive(p) and p,
                      timeout=10, what="worker-1 back with a new pid")
    assert isinstance(new_pid, int)
    back_after_s = time.monotonic() - killed_at
    assert RESTART_DELAY_S <= back_after_s + 0.2 < 10, back_after_s
    assert re.search(rf"worker-1 exited with code -9 \(SIGKILL\); restarting in {RESTART_DELAY_S:.1f} s \(restart 1\b",
                     up.output), up.output
    assert "restarted worker-1" in up.output

    # Nothing else was touched: same pids, all alive, the launcher still running.
    after = up.endpoints().pids
    assert {k: v for k, v in after.items() if k != "worker-1"} == {k: v for k, v in before.items() if k != "worker-1"}
    assert all(pid_alive(pid) for pid in after.values()), after
    assert up.proc.poll() is None
    # The restarted worker is the same worker: its configured id and host cache directory.
    env = environ_of(new_pid)
    assert env["LORAFN_WORKER_ID"] == "local-w1"
    assert env["LORAFN_HOST_CACHE__DIRECTORY"] == str(up.state / "host-cache" / "w1")

    with up.http() as client:
        # The gateway answers throughout; calls succeed while worker-1 starts again and after.
        assert client.get("/readyz").status_code == 200
        for i in range(3):
            up.call_base(client, f"during {i}")
        beat = asyncio.run(heartbeat_of(up.endpoints().nats_url, "local-w1", timeout=CALL_TIMEOUT_S))
        assert beat.worker_id == "local-w1"
        for i in range(5):
            up.call_base(client, f"after {i}")
    assert up.endpoints().pids == after  # no other restart happened meanwhile


def test_ctrl_c_during_a_restart_backoff_stops_everything(up: Up, processes_mentioning) -> None:  # type: ignore[no-untyped-def]
    endpoints = up.endpoints()
    ports = ports_of(endpoints, up.gateway)
    seen = len(up.lines)
    os.kill(endpoints.pids["worker-2"], signal.SIGKILL)
    up.wait(lambda: any("worker-2 exited with code -9" in line for line in up.lines[seen:]), timeout=5,
            what="worker-2's exit noticed")
    up.proc.send_signal(signal.SIGINT)  # inside the backoff: its restart was due RESTART_DELAY_S later
    up.proc.wait(120)
    time.sleep(0.2)  # the reader thread takes the last lines
    tail = "\n".join(up.lines[seen:])
    assert up.proc.returncode == 0, up.output
    assert "restarted worker-2" not in tail and "stopped: every process this stack started has exited" in tail, tail
    for name, pid in endpoints.pids.items():
        assert not pid_alive(pid), f"{name} (pid {pid}) survived Ctrl-C"
    assert processes_mentioning(str(up.state)) == []
    assert all(port_is_free("127.0.0.1", p) for p in ports)
    assert not (up.state / "stack.json").exists()
