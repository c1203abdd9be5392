"""Where callbacks may go: private, loopback, link-local... addresses are refused at submit (400, nothing
recorded) and again at delivery, on the address the host resolves to THEN (DNS rebinding), and a delivery
connects to the address it checked, with the URL's host as Host and TLS server name."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from nats.aio.client import Client

from gateway.callbacks import (
    CallbackPolicy,
    CallbackRefused,
    CallbackSender,
    CallbackUnresolved,
    check_callback_url,
    checked_addresses,
    refused_kind,
)
from gateway.settings import CallbackSettings
from storage import repo
from storage.settings import ObjectStoreSettings
from tests.gateway.conftest import (
    EchoWorker,
    GatewayFactory,
    Keys,
    Pushed,
    make_settings,
    read_body,
    stream_messages,
)

FN = "/v1/functions/acme/bot/invocations"


# -- the address rules (pure) -------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("100.64.0.1", "shared address space (CGNAT)"),
    ("0.0.0.0", "'this network'"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "documentation"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fd00::1", "unique local (private)"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "an IPv6 address embedding 127.0.0.1, loopback"),
    ("::ffff:10.0.0.1", "an IPv6 address embedding 10.0.0.1, private"),
    ("64:ff9b::a9fe:a9fe", "an IPv6 address embedding 169.254.169.254, link-local"),  # NAT64
    ("2002:7f00:1::", "an IPv6 address embedding 127.0.0.1, loopback"),  # 6to4
    ("2001:db8::1", "documentation"),
    ("93.184.215.14", None),
    ("2606:4700::1111", None),
    ("::ffff:93.184.215.14", None),
])
def test_refused_kind(address: str, kind: str | None) -> None:
    assert refused_kind(ipaddress.ip_address(address)) == kind


def resolver_of(table: dict[str, Sequence[str]]) -> Any:
    """A resolver answering from a table (OSError for other names, as getaddrinfo fails)."""
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"no such host {host}")
        return list(table[host])
    return resolve


async def _addresses(url: str, policy: CallbackPolicy, table: dict[str, Sequence[str]]) -> list[str]:
    return [str(a) for a in await checked_addresses(policy.parse(url), policy, resolver_of(table), 1.0)]


async def test_every_resolved_address_is_checked() -> None:
    policy = CallbackPolicy()
    assert await _addresses("https://hook.example/x", policy, {"hook.example": ["93.184.215.14"]}) == ["93.184.215.14"]
    for addresses in (["10.0.0.5"], ["93.184.215.14", "10.0.0.5"], ["::1"]):
        with pytest.raises(CallbackRefused, match="resolves to"):
            await _addresses("https://hook.example/x", policy, {"hook.example": addresses})
    with pytest.raises(CallbackRefused, match=r"'localhost' resolves to 127\.0\.0\.1, loopback"):
        await _addresses("https://localhost:9333/x", policy, {})  # never asks DNS
    with pytest.raises(CallbackUnresolved, match="does not resolve"):
        await _addresses("https://nowhere.example/x", policy, {})


async def test_allow_lists() -> None:
    table = {"hook.internal": ["10.0.0.5"], "a.corp.internal": ["192.168.0.9"], "evil.example": ["10.9.9.9"]}
    networks = CallbackPolicy(networks=(ipaddress.ip_network("10.0.0.0/24"),))
    assert await _addresses("https://hook.internal/x", networks, table) == ["10.0.0.5"]
    assert await _addresses("https://[::ffff:10.0.0.7]/x", networks, table) == ["::ffff:a00:7"]
    with pytest.raises(CallbackRefused):
        await _addresses("https://evil.example/x", networks, table)  # 10.9.9.9 is outside 10.0.0.0/24
    hosts = CallbackPolicy(hosts=("hook.internal", "*.corp.internal"))
    assert await _addresses("https://hook.internal/x", hosts, table) == ["10.0.0.5"]
    assert await _addresses("https://A.corp.internal./x", hosts, table) == ["192.168.0.9"]
    with pytest.raises(CallbackRefused):
        await _addresses("https://evil.example/x", hosts, table)


def test_https_only_unless_allowed() -> None:
    with pytest.raises(CallbackRefused, match="must use https"):
        CallbackPolicy().parse("http://hook.example/x")
    assert CallbackPolicy(allow_http=True).parse("http://hook.example/x").port == 80
    parsed = CallbackPolicy().parse("https://u:p@Hook.Example:8443/a/b?c=d")
    assert (parsed.host, parsed.port, parsed.host_header, parsed.target, parsed.auth) == (
        "hook.example", 8443, "Hook.Example:8443", "/a/b?c=d", ("u", "p"))


# -- delivery: real HTTP(S) receivers on 127.0.0.1, names resolved by an injected resolver ---------------------


@dataclass
class Receiver:
    """Records what reaches it: (Host header, path, body) per request; answers `status`."""

    status: int = 204
    location: str | None = None
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.seen.append((dict(scope["headers"])[b"host"].decode(), scope["path"], body))
        headers = [(b"location", self.location.encode())] if self.location else []
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Any]:
    """Start receivers on 127.0.0.1: `port = await serve(receiver, **uvicorn_config)`."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(app: Receiver, **config: Any) -> int:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                               **config))
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "the receiver did not start"
            await asyncio.sleep(0.01)
        servers.append((server, task))
        port: int = server.servers[0].sockets[0].getsockname()[1]
        return port

    try:
        yield start
    finally:
        for server, task in servers:
            server.should_exit = True
            await task


LOCAL_HTTP = CallbackSettings(allow_http=True, allow_networks=("127.0.0.1/32",), timeout_s=5.0)


async def test_delivery_connects_to_the_checked_address_with_the_urls_host(serve: Any) -> None:
    receiver = Receiver()
    port = await serve(receiver)
    async with httpx.AsyncClient() as http:
        sender = CallbackSender(http=http, settings=LOCAL_HTTP, resolver=resolver_of({"hook.test": ["127.0.0.1"]}))
        delivery = await sender.post(f"http://hook.test:{port}/done?x=1", {"id": "inv_1"}, {})
    assert delivery.ok, delivery.reason
    assert receiver.seen == [(f"hook.test:{port}", "/done", b'{"id":"inv_1"}')]


async def test_delivery_refuses_a_name_that_now_resolves_to_a_private_address(serve: Any) -> None:
    """DNS rebinding: the name passed the submit-time check with a public address, and resolves to a
    private one at delivery; the delivery is refused without any connection."""
    receiver = Receiver()
    port = await serve(receiver)
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])

    def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    settings = CallbackSettings(allow_http=True)
    url = f"http://rebind.test:{port}/done"
    assert await check_callback_url(url, settings, rebinding) == url  # submit: public
    async with httpx.AsyncClient() as http:
        delivery = await CallbackSender(http=http, settings=settings, resolver=rebinding).post(url, {}, {})
    assert delivery.refused and not delivery.ok
    assert "'rebind.test' resolves to 127.0.0.1, loopback" in delivery.reason
    assert receiver.seen == []


async def test_delivery_does_not_follow_redirects(serve: Any) -> None:
    target = Receiver()
    target_port = await serve(target)
    redirect = Receiver(status=307, location=f"http://127.0.0.1:{target_port}/inside")
    port = await serve(redirect)
    async with httpx.AsyncClient() as http:
        sender = CallbackSender(http=http, settings=LOCAL_HTTP, resolver=resolver_of({}))
        delivery = await sender.post(f"http://127.0.0.1:{port}/hook", {}, {})
    assert not delivery.ok and not delivery.refused and delivery.reason == "HTTP 307"
    assert len(redirect.seen) == 1 and target.seen == []


def _certificates(tmp: Path, name: str) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for `name` signed by it (openssl): (ca, cert, key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=lorafn test CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={name}")
    (tmp / "san.ext").write_text(f"subjectAltName=DNS:{name}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_https_delivery_keeps_the_server_name_for_tls(serve: Any, tmp_path: Path) -> None:
    """Connected to 127.0.0.1, the TLS handshake still names hook.test (SNI) and the certificate is verified
    against hook.test: a certificate for hook.test passes, the same URL with another name fails."""
    ca, cert, key = _certificates(tmp_path, "hook.test")
    receiver = Receiver()
    port = await serve(receiver, ssl_certfile=str(cert), ssl_keyfile=str(key))
    settings = CallbackSettings(allow_networks=("127.0.0.1/32",), timeout_s=5.0)
    names = resolver_of({"hook.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as http:
        sender = CallbackSender(http=http, settings=settings, resolver=names)
        good = await sender.post(f"https://hook.test:{port}/done", {"ok": True}, {})
        wrong = await sender.post(f"https://other.test:{port}/done", {"ok": False}, {})
    assert good.ok, good.reason
    assert not wrong.ok and not wrong.refused and "certificate" in wrong.reason.lower()
    assert receiver.seen == [(f"hook.test:{port}", "/done", b'{"ok":true}')]


# -- submit: the gateway refuses such URLs with 400 and records nothing ---------------------------------------

REFUSED_AT_SUBMIT = [
    "https://127.0.0.1/hook",
    "https://127.0.0.1:9333/hook",
    "https://10.0.0.8/hook",
    "https://169.254.169.254/latest/meta-data/",
    "https://[::1]/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://localhost/hook",
    "https://localhost:8888/hook",
    "https://2130706433/hook",  # 127.0.0.1 written as one number: the resolver reads it so
    "https://0x7f.1/hook",
    "https://100.64.1.1/hook",
    "https://[fe80::1]/hook",
    "http://example.com/hook",  # http without allow_http
]


async def test_private_callback_urls_are_refused_at_submit(
    gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed, nc: Client, sessions: Any, services: Any,
    object_store_settings: ObjectStoreSettings,
) -> None:
    settings = make_settings(services, object_store_settings)
    settings.gateway.callbacks = CallbackSettings()  # the defaults: https, public addresses only
    gw = await gateway_factory(settings=settings)
    async with sessions() as session:
        rows_before = await repo.count_rows(session)
    messages_before = await stream_messages(nc)
    async with gw.client(headers=keys.auth()) as c:
        for url in REFUSED_AT_SUBMIT:
            for prefer in ({"Prefer": "respond-async"}, {}):
                r = await c.post(FN, json={"prompt": "hi"}, headers={"X-Callback-Url": url, **prefer})
                assert r.status_code == 400, (url, r.text)
                error = r.json()["error"]
                assert error["code"] == "invalid_callback_url" and error["param"] == "X-Callback-Url", (url, error)
                assert "refused" in error["message"] or "https" in error["message"], (url, error)
    async with sessions() as session:
        assert await repo.count_rows(session) == rows_before
    assert await stream_messages(nc) == messages_before


async def test_the_gateway_refuses_at_delivery_what_it_no_longer_allows(
    gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed, worker: EchoWorker, serve: Any, services: Any,
    object_store_settings: ObjectStoreSettings,
) -> None:
    """A callback accepted by one gateway (127.0.0.1 allowed) is delivered by another that refuses it: the
    delivery is given up at once (no HTTP request, no retry) and counted `refused`."""
    receiver = Receiver()
    port = await serve(receiver)
    first = await gateway_factory()  # the tests' settings: http and 127.0.0.1 allowed
    async with first.client(headers=keys.auth()) as c:
        r = await c.post(FN, json={"prompt": "SLOW 1 later"},
                         headers={"Prefer": "respond-async", "X-Callback-Url": f"http://127.0.0.1:{port}/hook"})
    assert r.status_code == 202, r.text
    await first.stop()  # gone before the result exists
    strict = make_settings(services, object_store_settings)
    strict.gateway.callbacks = CallbackSettings(allow_http=True)  # http still, but no private addresses
    second = await gateway_factory(settings=strict)
    line = 'lorafn_callbacks_total{outcome="refused"} 1.0'
    deadline = asyncio.get_running_loop().time() + 15
    while line not in second.app.state.gateway.metrics.render()[0].decode():
        assert asyncio.get_running_loop().time() < deadline, "the delivery was not refused"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # a retry would come after backoff_initial_s (0.5 s)
    assert receiver.seen == []
    page = second.app.state.gateway.metrics.render()[0].decode()
    assert 'outcome="delivered"' not in page and 'outcome="retried"' not in page
