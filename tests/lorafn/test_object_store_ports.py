"""The local S3 server (SeaweedFS) answers only through its S3 API with the keys.

`weed server` opens a master, a volume server, a filer and an S3 gateway, each with an HTTP and a gRPC
port, plus unix sockets. Out of the box all but the S3 port take requests from anyone who can connect:
the master hands out write grants and deletes whole buckets, the filer lists, reads, writes and deletes
every file. These tests find every socket the running weed process listens on (from /proc, not from the
launcher's configuration, so a port nobody thought of is probed too) and attack each as a client without
keys would: HTTP list/read/write/delete of a real object (by its path and by its volume file id), and a
gRPC call in clear text and over TLS without a client certificate. Every attempt must fail, while the S3
API with the keys still works and the object is unchanged afterwards.
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import ssl
import stat
import struct
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from minio import Minio

from lorafn.stack import SEAWEEDFS_CONFIG_DIR, LocalStack
from storage.settings import ObjectStoreSettings

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")


# -- what the weed process listens on -------------------------------------------------------------------


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listening_tcp_ports(pid: int) -> list[int]:
    """Ports in LISTEN state (0A) whose socket belongs to `pid`."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def listening_unix_sockets(pid: int) -> list[str]:
    """Paths of unix sockets that `pid` accepts connections on (flag __SO_ACCEPTCON)."""
    inodes = _socket_inodes(pid)
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[6]) in inodes and int(fields[3], 16) & 0x10000:
            paths.add(fields[7])
    return sorted(paths)


# -- a client without keys ------------------------------------------------------------------------------

Connect = Callable[[], socket.socket]

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header 'literal without indexing, new name' (RFC 7541 6.2.2), both strings shorter than 127 bytes."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _grpc_call(method: str) -> bytes:
    """An HTTP/2 connection preface, then one unary gRPC call of `method` with an empty message."""
    headers = b"".join(_hpack_literal(k, v) for k, v in [
        (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", "localhost"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ])
    return (_H2_PREFACE + _h2_frame(0x4, 0, 0, b"")  # SETTINGS
            + _h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + _h2_frame(0x0, 0x1, 1, b"\x00" + struct.pack(">I", 0)))  # DATA, END_STREAM


def grpc_answers(connect: Connect, *, tls: ssl.SSLContext | None = None, timeout_s: float = 3.0) -> bool:
    """True when a gRPC call reached the server's handlers: it answered with HEADERS on the call's stream
    (any status, UNIMPLEMENTED included). A refused TLS handshake, a reset or a GOAWAY is False."""
    deadline = time.monotonic() + timeout_s
    sock: socket.socket | None = None
    try:
        sock = connect()
        sock.settimeout(0.5)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(_grpc_call("/filer_pb.SeaweedFiler/ListEntries"))
        buf = b""
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return False
            buf += chunk
            while len(buf) >= 9:
                length, kind, stream = int.from_bytes(buf[:3], "big"), buf[3], int.from_bytes(buf[5:9], "big")
                if len(buf) < 9 + length:
                    break
                if kind == 0x1 and stream & 0x7FFFFFFF == 1:
                    return True
                if kind == 0x7:  # GOAWAY
                    return False
                buf = buf[9 + length :]
        return False
    except OSError:  # ssl.SSLError included
        return False
    finally:
        if sock is not None:
            sock.close()


def tls_context(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """TLS that trusts any server (an attacker does not care who answers), presenting `cert` if given."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(path)
    return sock


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def http_attempt(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None
                 ) -> tuple[int | str, bytes]:
    """(status, body) of one request without credentials, or (the name of the transport error, b"")."""
    try:
        conn.request(method, path, body=body, headers={"Accept": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__, b""
    finally:
        conn.close()


def data_attacks(bucket: str, key: str, fid: str) -> list[tuple[str, str, str, bytes | None, bytes | None]]:
    """(what, method, path, body, must not name): list, read, write and delete the object through each
    server's API. Any success (2xx, 3xx) is a leak, except where `must not name` is given: there a success
    leaks only if its body names it (the master answers GET / with its cluster status page, which names
    volume ids and addresses but no bucket, object or file id)."""
    return [
        ("list the bucket (filer)", "GET", f"/buckets/{bucket}/", None, None),
        ("list the root (filer)", "GET", "/?pretty=y", None, bucket.encode()),
        ("read the object (filer)", "GET", f"/buckets/{bucket}/{key}", None, None),
        ("write a file (filer)", "PUT", f"/buckets/{bucket}/planted", b"planted", None),
        ("write a file (filer, form)", "POST", f"/buckets/{bucket}/planted", b"planted", None),
        ("delete the object (filer)", "DELETE", f"/buckets/{bucket}/{key}", None, None),
        ("get a write grant (master)", "GET", "/dir/assign", None, None),
        ("find the volumes (master)", "GET", "/vol/status", None, None),
        ("locate the object (master)", "GET", f"/dir/lookup?volumeId={fid.split(',')[0]}", None, None),
        ("delete the bucket's collection (master)", "GET", f"/col/delete?collection={bucket}", None, None),
        ("read the object (volume)", "GET", f"/{fid}", None, None),
        ("overwrite the object (volume)", "PUT", f"/{fid}", b"planted", None),
        ("delete the object (volume)", "DELETE", f"/{fid}", None, None),
    ]


def volume_file_id(data_dir: Path, bucket: str) -> str:
    """The SeaweedFS file id (`<volume>,<needle id><cookie>`) of the first needle of the bucket's volume, read
    from its files on disk: what a client without keys would need to address the object on the volume port."""
    idx = sorted(data_dir.glob(f"{bucket}_*.idx"))
    assert idx, f"no volume of collection {bucket} in {data_dir}"
    volume = idx[0].name.rsplit("_", 1)[1].removesuffix(".idx")
    needle_id = idx[0].read_bytes()[:8]  # an index entry starts with the needle id (big-endian)
    dat = idx[0].with_suffix(".dat").read_bytes()
    at = dat.find(needle_id, 8)  # a needle's header: cookie (4 bytes), id (8), size (4); 8 bytes of superblock first
    assert at >= 12, f"needle {needle_id.hex()} not found in {idx[0].with_suffix('.dat')}"
    return f"{volume},{int.from_bytes(needle_id, 'big'):x}{dat[at - 4 : at].hex()}"


# -- tests ----------------------------------------------------------------------------------------------


@pytest.fixture
def seaweedfs(services) -> LocalStack:  # type: ignore[no-untyped-def]
    stack = getattr(services, "stack", None)
    if stack is None or Path(stack.process("s3").argv[0]).name != "weed":
        pytest.skip("the S3 server is not the local stack's SeaweedFS")
    return stack


def test_every_port_of_the_object_store_refuses_a_client_without_keys(
    seaweedfs: LocalStack, object_store_settings: ObjectStoreSettings
) -> None:
    s = object_store_settings
    client = Minio(s.endpoint, access_key=s.access_key, secret_key=s.secret_key.get_secret_value(), secure=False)
    client.make_bucket(s.bucket)
    key, blob = "blobs/sha256/probe", os.urandom(64 << 10)
    client.put_object(s.bucket, key, io.BytesIO(blob), len(blob))
    fid = volume_file_id(seaweedfs.state_dir / "s3", s.bucket)
    pid = seaweedfs.process("s3").pid
    assert pid is not None
    host = seaweedfs.config.host
    ports = listening_tcp_ports(pid)
    unix_sockets = listening_unix_sockets(pid)
    # Every port the launcher reserved, and nothing else: a new listener would show up here.
    assert set(ports) == {seaweedfs.config.ports.s3, *seaweedfs.config.ports.s3_internal()}, ports

    leaks = []
    http_targets: list[tuple[str, Callable[[], http.client.HTTPConnection]]] = [
        *((f"tcp {port}", partial(http.client.HTTPConnection, host, port, timeout=3)) for port in ports),
        *((f"unix {path}", partial(_UnixHTTPConnection, path, timeout=3)) for path in unix_sockets),
    ]
    for where, connection in http_targets:
        for what, method, path, body, must_not_name in data_attacks(s.bucket, key, fid):
            status, answer = http_attempt(connection(), method, path, body)
            succeeded = isinstance(status, int) and 200 <= status < 400
            if succeeded and (must_not_name is None or must_not_name in answer):
                leaks.append(f"{where}: {what} ({method} {path}) -> {status}")
    grpc_targets: list[tuple[str, Connect]] = [
        *((f"tcp {port}", partial(socket.create_connection, (host, port), timeout=2)) for port in ports),
        *((f"unix {path}", partial(_connect_unix, path)) for path in unix_sockets),
    ]
    security = seaweedfs.state_dir / SEAWEEDFS_CONFIG_DIR
    with_certificate = tls_context(security / "grpc.crt", security / "grpc.key")
    answered_with_certificate = []
    for where, connect in grpc_targets:
        if grpc_answers(connect):
            leaks.append(f"{where}: a gRPC call in clear text was answered")
        if grpc_answers(connect, tls=tls_context()):
            leaks.append(f"{where}: a gRPC call over TLS without a client certificate was answered")
        if grpc_answers(connect, tls=with_certificate):
            answered_with_certificate.append(where)
    assert leaks == []

    # The probes can tell: the launcher's own certificate opens the gRPC ports of the master, the volume
    # server, the filer and the S3 gateway (over TCP and over their unix sockets).
    assert len([w for w in answered_with_certificate if w.startswith("tcp")]) == 4, answered_with_certificate
    # The S3 API with the keys still lists, reads and writes, and the attacks changed nothing.
    assert [o.object_name for o in client.list_objects(s.bucket, recursive=True)] == [key]
    response = client.get_object(s.bucket, key)
    try:
        assert response.read() == blob
    finally:
        response.close()
        response.release_conn()
    client.put_object(s.bucket, "after", io.BytesIO(b"x"), 1)
    assert client.bucket_exists(s.bucket)


def test_security_settings_are_private_and_no_ca_key_is_left(seaweedfs: LocalStack) -> None:
    """The JWT keys and the gRPC key are readable by their owner only; the CA's key was deleted once it
    signed, so no one can make another certificate the servers accept."""
    security = seaweedfs.state_dir / SEAWEEDFS_CONFIG_DIR
    assert stat.S_IMODE(security.stat().st_mode) == 0o700
    for name in ("security.toml", "grpc.key"):
        assert stat.S_IMODE((security / name).stat().st_mode) == 0o600, name
    assert not list(security.glob("*ca.key*"))
    text = (security / "security.toml").read_text()
    for section in ("[jwt.signing]", "[jwt.signing.read]", "[jwt.filer_signing]", "[jwt.filer_signing.read]",
                    "[grpc.master]", "[grpc.volume]", "[grpc.filer]", "[grpc.s3]", "[grpc.client]"):
        assert section in text
    assert 'key = ""' not in text
    argv = seaweedfs.process("s3").argv
    assert f"-config_dir={security}" in argv and "-disableHttp" in argv and "-master.telemetry=false" in argv
