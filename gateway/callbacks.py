"""Delivery of results to the X-Callback-Url of their invocation.

The gateway records `invocation id -> URL` in a JetStream key-value bucket when it accepts the call.
Whoever records the result of an invocation that carries a callback URL also publishes a copy of it on
`lora.callback.<id>` (`protocol.results`); the gateway reads those copies, and only those, through a
DURABLE pull consumer: a copy is acked only once its callback was delivered (2xx), found unnecessary
(no URL recorded by a gateway: a direct NATS client cannot make the gateway call a URL it never
validated), or given up after `max_attempts`. Retries are JetStream redeliveries
with a growing delay (nak with backoff), so a gateway restart loses no callback and several gateways
share the work.

Where a callback may go (server-side request forgery): the gateway would otherwise POST wherever a caller
says, its own network included (the object store's internal ports, a cloud's metadata address). So a
callback URL is https (http only with `allow_http`) and may reach only globally routable addresses: loopback,
private, link-local, multicast, reserved, shared (CGNAT) and documentation ranges, and IPv6 addresses that
embed one (IPv4-mapped, NAT64, 6to4), are refused unless `allow_networks` (addresses or CIDRs) or
`allow_hosts` (names, or `*.suffix`) says otherwise. The URL is checked when the call is submitted (400,
nothing recorded) and again at every delivery: the name is resolved, EVERY address it resolves to is
checked, and the POST goes to the checked address itself (Host header and TLS server name stay the URL's
host, so certificates are verified against it), never to the name again, so a DNS answer that changes
between the check and the connection (rebinding) cannot redirect it. Redirects are not followed, and a
delivery refused by these rules is given up at once (counted `refused`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from gateway.bus import NatsLink
from gateway.errors import BadRequest
from gateway.invoker import ensure_callback_bucket, result_json
from gateway.metrics import GatewayMetrics
from gateway.settings import CallbackSettings
from protocol import subjects
from protocol.consume import PullLoop
from protocol.messages import InvocationResult, MessageInvalid

log = logging.getLogger(__name__)

FETCH_BATCH = 16
FETCH_WAIT_S = 1.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses the host resolves to (blocking: it runs in a thread). Injected in tests.
Resolver = Callable[[str, int], Sequence[str]]

# Ranges refused besides what the `ipaddress` properties say (Python 3.11 calls some of them global).
SPECIAL_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in (
        ("0.0.0.0/8", "'this network'"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("240.0.0.0/4", "reserved"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments (Teredo included)"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "unique local (private)"),
        ("fec0::/10", "site-local"),
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class CallbackRefused(BadRequest):
    """A callback URL, or an address its host resolves to, that the callback rules refuse (400 at submit)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"X-Callback-Url {message}", param="X-Callback-Url", code="invalid_callback_url")


class CallbackUnresolved(CallbackRefused):
    """The callback host did not resolve (400 at submit; a delivery retries it later)."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives for host:port (TCP), in its order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refused_kind(ip: IPAddress) -> str | None:
    """Why a callback may not reach `ip` by default ("loopback", "private", ...), or None for a global address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF) if ip in NAT64 else None)
        if embedded is not None:
            inner = refused_kind(embedded)
            return f"an IPv6 address embedding {embedded}, {inner}" if inner else None
    for net, why in SPECIAL_NETWORKS:
        if ip.version == net.version and ip in net:
            return why
    for prop, why in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                      ("is_link_local", "link-local"), ("is_multicast", "multicast"), ("is_private", "private"),
                      ("is_reserved", "reserved")):
        if getattr(ip, prop):
            return why
    return None if ip.is_global else "not globally routable"


@dataclass(frozen=True)
class CallbackUrl:
    """A parsed callback URL: what is connected to (host, port) and what is sent (Host header, path)."""

    url: str
    scheme: str
    host: str  # lower case, without brackets
    port: int
    host_header: str  # the URL's host[:port], as a client would send it
    target: str  # path and query
    auth: tuple[str, str] | None


@dataclass(frozen=True)
class CallbackPolicy:
    """Where callbacks may go (see the module docstring); plain data, built from CallbackSettings."""

    allow_http: bool = False
    networks: tuple[IPNetwork, ...] = ()
    hosts: tuple[str, ...] = ()  # lower case; "*.example.internal" matches its subdomains
    max_url_length: int = 2048

    @classmethod
    def from_settings(cls, s: CallbackSettings) -> CallbackPolicy:
        return cls(allow_http=s.allow_http, networks=tuple(ipaddress.ip_network(n, strict=False)
                                                           for n in s.allow_networks),
                   hosts=tuple(h.lower().rstrip(".") for h in s.allow_hosts), max_url_length=s.max_url_length)

    def parse(self, url: str) -> CallbackUrl:
        """Syntax and scheme: an absolute https URL (http if allowed) of bounded length, or CallbackRefused."""
        if len(url) > self.max_url_length:
            raise CallbackRefused(f"is {len(url)} characters long, the limit is {self.max_url_length}")
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise CallbackRefused("must not contain whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise CallbackRefused(f"is not a valid URL: {e}") from e
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
            raise CallbackRefused(f"must be an absolute {' or '.join(s + '://' for s in schemes)} URL, got {url!r}")
        if parts.scheme not in schemes:
            raise CallbackRefused(f"must use https (this gateway does not call http:// URLs), got {url!r}")
        host = parts.hostname.rstrip(".")
        port = port or (443 if parts.scheme == "https" else 80)
        netloc = parts.netloc.rpartition("@")[2]
        auth = (parts.username or "", parts.password or "") if parts.username is not None else None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return CallbackUrl(url=url, scheme=parts.scheme, host=host, port=port, host_header=netloc, target=target,
                           auth=auth)

    def host_allowed(self, host: str) -> bool:
        """`host` is listed in allow_hosts (exactly, or under a `*.` entry): any address it resolves to is fine."""
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    def check_address(self, host: str, ip: IPAddress) -> None:
        """CallbackRefused unless `ip` is global or inside allow_networks."""
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)  # an allow-listed IPv4 network covers its mapped form
        if any(c.version == n.version and c in n for c in candidates for n in self.networks):
            return
        kind = refused_kind(ip)
        if kind is not None:
            shown = f"host {host}" if _literal(host) == ip else f"{host!r} resolves to {ip}"
            raise CallbackRefused(
                f"refused: {shown}, {kind}; callbacks go to public addresses only (allow it with "
                f"LORAFN_GATEWAY__CALLBACKS__ALLOW_NETWORKS or ALLOW_HOSTS)"
            )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def checked_addresses(url: CallbackUrl, policy: CallbackPolicy, resolver: Resolver,
                            timeout_s: float) -> list[IPAddress]:
    """The addresses of the URL's host, every one checked against the policy (CallbackRefused if any fails).

    `localhost` and its subdomains are loopback without asking DNS (RFC 6761).
    """
    literal = _literal(url.host)
    if literal is not None:
        addresses = [literal]
    elif url.host == "localhost" or url.host.endswith(".localhost"):
        addresses = [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    else:
        try:
            found = await asyncio.wait_for(asyncio.to_thread(resolver, url.host, url.port), timeout_s)
        except (OSError, TimeoutError) as e:
            reason = "timed out" if isinstance(e, TimeoutError) else str(e)
            raise CallbackUnresolved(f"host {url.host!r} does not resolve ({reason})") from e
        addresses = [a for a in (_literal(str(x).partition("%")[0]) for x in found) if a is not None]
        if not addresses:
            raise CallbackUnresolved(f"host {url.host!r} resolves to no address")
    if not policy.host_allowed(url.host):
        for ip in addresses:
            policy.check_address(url.host, ip)
    return addresses


async def check_callback_url(url: str, settings: CallbackSettings, resolver: Resolver = system_resolver) -> str:
    """The submit-time check of an X-Callback-Url: syntax, scheme, and every address of its host (400)."""
    policy = CallbackPolicy.from_settings(settings)
    await checked_addresses(policy.parse(url), policy, resolver, settings.resolve_timeout_s)
    return url


@dataclass(frozen=True)
class Delivery:
    """What one delivery attempt came to: delivered (2xx), refused by the rules (never retried), or failed."""

    ok: bool
    reason: str
    refused: bool = False


class CallbackSender:
    """POSTs a result to a callback URL, on an address it has just checked (see the module docstring)."""

    def __init__(self, *, http: httpx.AsyncClient, settings: CallbackSettings,
                 resolver: Resolver = system_resolver) -> None:
        self.http, self.settings, self.resolver = http, settings, resolver
        self.policy = CallbackPolicy.from_settings(settings)

    async def post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> Delivery:
        try:
            target = self.policy.parse(url)
            address = (await checked_addresses(target, self.policy, self.resolver, self.settings.resolve_timeout_s))[0]
        except CallbackUnresolved as e:
            return Delivery(False, str(e))
        except CallbackRefused as e:
            return Delivery(False, str(e), refused=True)
        netloc = f"[{address}]" if address.version == 6 else str(address)
        # The connection goes to `address`; Host and the TLS server name (SNI, and the name the certificate is
        # verified against) stay the URL's host. `Connection: close`: a pooled connection to this address must
        # not carry a later callback of another host name (its certificate was checked for this one).
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            response = await self.http.post(
                f"{target.scheme}://{netloc}:{target.port}{target.target}", json=body, timeout=self.settings.timeout_s,
                headers={**headers, "Host": target.host_header, "Connection": "close"}, extensions=extensions,
                follow_redirects=False, auth=target.auth or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as e:
            return Delivery(False, repr(e))
        return Delivery(200 <= response.status_code < 300, f"HTTP {response.status_code}")


class CallbackDispatcher:
    """Runs the durable consumer of the results stream and POSTs results to their callback URLs."""

    def __init__(self, *, link: NatsLink, http: httpx.AsyncClient, settings: CallbackSettings,
                 metrics: GatewayMetrics, resolver: Resolver = system_resolver) -> None:
        self.link, self.http, self.settings, self.metrics = link, http, settings, metrics
        self.sender = CallbackSender(http=http, settings=settings, resolver=resolver)
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._kv: KeyValue | None = None
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(FETCH_BATCH * 4)
        link.on_connect(self._setup)

    async def _setup(self, nc: Client, js: JetStreamContext) -> None:
        self._kv = await ensure_callback_bucket(js, self.settings, replicas=self.link.settings.stream_replicas)
        self._task = asyncio.create_task(self._run(js), name="callbacks")

    def backoff_s(self, delivered: int) -> float:
        """Delay before delivery `delivered + 1`: exponential from backoff_initial_s, capped."""
        s = self.settings
        return float(min(s.backoff_max_s, s.backoff_initial_s * (2 ** max(0, delivered - 1))))

    async def _run(self, js: JetStreamContext) -> None:
        s = self.settings
        config = ConsumerConfig(
            durable_name=s.consumer,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.timeout_s * 3,
            max_deliver=s.max_attempts + 1,  # + 1: the last delivery only terminates it
            filter_subject=subjects.CALLBACK_ALL,
        )
        if s.consumer != subjects.CALLBACKS_CONSUMER_OLD:  # earlier versions' consumer read every result
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(subjects.RESULTS_STREAM, subjects.CALLBACKS_CONSUMER_OLD)
        loop = PullLoop(js, stream=subjects.RESULTS_STREAM, config=config, fetch_timeout_s=FETCH_WAIT_S)

        async def want() -> int:
            await self._slots.acquire()  # one delivery may start: fetch up to a batch
            self._slots.release()
            return FETCH_BATCH

        async def handle(batch: list[Msg]) -> None:
            for msg in batch:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._done)

        await loop.run(self._stop, handle, want)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        try:
            result = InvocationResult.decode(msg.data)
        except MessageInvalid:
            await msg.term()
            return
        assert self._kv is not None
        try:
            entry = await self._kv.get(result.invocation_id)
        except KeyNotFoundError:
            await msg.ack()  # no callback asked for this invocation
            return
        except (nats.errors.Error, TimeoutError):
            await msg.nak(delay=self.backoff_s(1))
            return
        url = (entry.value or b"").decode()
        delivered = msg.metadata.num_delivered
        if delivered > self.settings.max_attempts:
            await self._give_up(msg, result, url, delivered - 1)
            return
        delivery = await self.sender.post(url, result_json(result), {"x-lorafn-invocation-id": result.invocation_id})
        ok, reason = delivery.ok, delivery.reason
        if delivery.refused:
            self.metrics.callbacks.labels("refused").inc()
            log.warning("callback of %s to %s refused: %s", result.invocation_id, url, reason)
            await msg.term()
            await self._forget(result.invocation_id)
            return
        if ok:
            self.metrics.callbacks.labels("delivered").inc()
            await msg.ack()
            await self._forget(result.invocation_id)
            return
        if delivered >= self.settings.max_attempts:
            await self._give_up(msg, result, url, delivered, reason)
            return
        self.metrics.callbacks.labels("retried").inc()
        log.info("callback of %s to %s failed (%s); retry %d", result.invocation_id, url, reason, delivered)
        await msg.nak(delay=self.backoff_s(delivered))

    async def _give_up(self, msg: Msg, result: InvocationResult, url: str, attempts: int, reason: str = "") -> None:
        self.metrics.callbacks.labels("failed").inc()
        log.warning("callback of %s to %s given up after %d attempts %s", result.invocation_id, url, attempts,
                    reason)
        await msg.term()
        await self._forget(result.invocation_id)

    async def _forget(self, invocation_id: str) -> None:
        """Drop a delivered (or given up) callback URL; its bucket's TTL removes it anyway if this fails."""
        if self._kv is None:
            return
        try:
            await self._kv.delete(invocation_id)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            log.debug("callbacks: could not delete the URL of %s (%s); its TTL will", invocation_id, e)

    async def close(self) -> None:
        """Stop fetching (between two fetches: no fetched message is stranded); deliveries in progress are
        cancelled and will be redelivered (not acked)."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), FETCH_WAIT_S + 2.0)
            except TimeoutError:
                self._task.cancel()
            except Exception:  # the loop failed earlier; it is logged by asyncio
                log.debug("callbacks: the consumer loop had failed", exc_info=True)
        tasks = list(self._inflight)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

