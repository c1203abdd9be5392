"""Per-tenant quotas and throttles: requests/s, generated tokens/min, invocations in flight, stored adapters
and bytes, API keys, and failed authentications per client address.

The decisions are plain objects with the time passed in (`TokenBucket`, `SlidingWindow`, `FailureLog`), so
tests run them over a table of instants without a server. `Limiter` keeps one of them per tenant (or client
address) for this gateway process and raises `QuotaExceeded` with the limit's name and numbers: 429 with
Retry-After for what waiting frees, 403 for what only deleting frees (storage, keys).

Why each gateway counts on its own: rates, tokens and concurrency live in this process, so a tenant whose
calls a load balancer spreads over G gateways can reach G times its limits (divide them by G where that
matters). Sharing the counters through a NATS key-value bucket would cost a round trip and a compare-and-set
on every request, retried under contention exactly when a burst arrives, and would make admission fail when
NATS is away; for limits that exist to cap abuse, the factor G is the cheaper error. Storage quotas are
exact across gateways: they are counted in Postgres at each push.
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import QuotaExceeded
from gateway.settings import QuotaSettings
from storage import repo
from storage.models import Tenant

TOKENS_WINDOW_S = 60.0  # "tokens per minute"
TOKENS_SLOTS = 60  # the window's resolution: a token leaves the window at most one second late
# A concurrency refusal cannot know when a call will finish; a second is what OpenAI-style clients wait anyway.
CONCURRENCY_RETRY_S = 1
IPV6_PREFIX = 64  # one IPv6 client usually holds a whole /64: its addresses share one failure log


def retry_seconds(wait_s: float) -> int:
    """Retry-After is whole seconds: the wait rounded up, at least 1."""
    return max(1, math.ceil(wait_s - 1e-9))


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `size` at once; starts full. One token is one request."""

    rate: float
    size: float
    level: float = field(default=-1.0)
    at: float | None = None

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.size

    def take(self, now: float, n: float = 1.0) -> float:
        """Take `n` tokens: 0.0 when they were there, else the seconds until they will be (nothing taken)."""
        if self.at is not None:
            self.level = min(self.size, self.level + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate


@dataclass
class SlidingWindow:
    """Amounts added over the last `window_s` seconds, kept in `slots` slots of window_s/slots seconds each
    (bounded memory; an amount leaves the window at most one slot late)."""

    window_s: float = TOKENS_WINDOW_S
    slots: int = TOKENS_SLOTS
    _counts: deque[list[int]] = field(default_factory=deque)  # [slot index, amount], oldest first
    _total: int = 0

    @property
    def slot_s(self) -> float:
        return self.window_s / self.slots

    def _expire(self, now: float) -> None:
        while self._counts and (self._counts[0][0] + 1) * self.slot_s <= now - self.window_s:
            self._total -= self._counts.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        """Count `amount` at `now`."""
        self._expire(now)
        slot = int(now // self.slot_s)
        if self._counts and self._counts[-1][0] >= slot:
            self._counts[-1][1] += amount  # same slot (or a clock that went back: counted in the newest)
        else:
            self._counts.append([slot, amount])
        self._total += amount

    def total(self, now: float) -> int:
        """What was added in the window ending at `now`."""
        self._expire(now)
        return self._total

    def wait(self, now: float, limit: int) -> float:
        """Seconds until the total falls below `limit` (0.0 if it is below now)."""
        self._expire(now)
        remaining = self._total
        if remaining < limit:
            return 0.0
        for slot, amount in self._counts:
            remaining -= amount
            if remaining < limit:
                return (slot + 1) * self.slot_s + self.window_s - now
        return 0.0  # unreachable: the last slot takes the total to 0 < limit


class FailureLog:
    """Failures per key (a client address): at most `limit` in any `window_s` seconds. Holds the last `limit`
    failure times of at most `max_keys` keys (the oldest key is dropped beyond that)."""

    def __init__(self, *, limit: int, window_s: float, max_keys: int) -> None:
        self.limit, self.window_s, self.max_keys = limit, window_s, max_keys
        self._log: dict[str, deque[float]] = {}

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` may fail again (0.0: it may now)."""
        times = self._log.get(key)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window_s - now)

    def failures(self, key: str, now: float) -> int:
        """Failures of `key` in the window ending at `now`."""
        return sum(1 for t in self._log.get(key, ()) if t > now - self.window_s)

    def record(self, key: str, now: float) -> None:
        """A failure of `key` at `now`."""
        times = self._log.get(key)
        if times is None:
            if len(self._log) >= self.max_keys:
                del self._log[next(iter(self._log))]
            times = self._log[key] = deque(maxlen=self.limit)
        times.append(now)


def address_key(host: str | None) -> str:
    """The failure log's key of a client address: the address, its /64 for IPv6, "unknown" when none."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


@dataclass(frozen=True)
class Quota:
    """A tenant's effective limits: its own `quota_*` columns, else the settings' defaults (None: no limit)."""

    requests_per_s: float | None
    burst: int | None
    tokens_per_min: int | None
    concurrent: int | None
    adapters: int | None
    stored_bytes: int | None

    @classmethod
    def of(cls, tenant: Tenant, defaults: QuotaSettings) -> Quota:
        def pick(name: str) -> float | int | None:
            own = getattr(tenant, f"quota_{name}", None)
            value: float | int | None = own if own is not None else getattr(defaults, name)
            return value

        return cls(
            requests_per_s=pick("requests_per_s"), burst=_int(pick("burst")), tokens_per_min=_int(pick("tokens_per_min")),
            concurrent=_int(pick("concurrent")), adapters=_int(pick("adapters")),
            stored_bytes=_int(pick("stored_bytes")),
        )

    @property
    def bucket_size(self) -> float:
        """The request bucket's size: `burst`, else one second's worth of requests (at least 1)."""
        if self.burst is not None:
            return float(self.burst)
        return float(max(1, math.ceil(self.requests_per_s or 1.0)))


def _int(value: float | int | None) -> int | None:
    return None if value is None else int(value)


@dataclass
class Pending:
    """An invocation this gateway accepted and whose result it has not seen."""

    tenant: str
    expires: float
    in_flight: bool = True


class Limiter:
    """The quota state of one gateway process; every method takes the time (`time.monotonic()`)."""

    def __init__(self, settings: QuotaSettings, on_refusal: Callable[[str], None] = lambda limit: None) -> None:
        self.settings = settings
        self.on_refusal = on_refusal  # told the limit's name at each refusal (the gateway counts them)
        self._buckets: dict[str, TokenBucket] = {}
        self._tokens: dict[str, SlidingWindow] = {}
        self._inflight: dict[str, int] = {}
        self._pending: dict[str, Pending] = {}  # invocation id -> its tenant, in order of acceptance
        self.auth_failures = FailureLog(limit=settings.auth_failures, window_s=settings.auth_failure_window_s,
                                        max_keys=settings.max_tracked)

    def quota(self, tenant: Tenant) -> Quota:
        return Quota.of(tenant, self.settings)

    def _refused(self, refusal: QuotaExceeded) -> QuotaExceeded:
        self.on_refusal(refusal.limit)
        return refusal

    # -- requests ------------------------------------------------------------------------------------

    def check_request(self, tenant: Tenant, now: float) -> None:
        """Count one API request of `tenant`; QuotaExceeded (429) above its rate."""
        q = self.quota(tenant)
        if q.requests_per_s is None:
            return
        bucket = self._buckets.get(tenant.name)
        if bucket is None or bucket.rate != q.requests_per_s or bucket.size != q.bucket_size:
            if len(self._buckets) >= self.settings.max_tracked:
                self._buckets.clear()
            bucket = self._buckets[tenant.name] = TokenBucket(q.requests_per_s, q.bucket_size)
        wait = bucket.take(now)
        if wait > 0:
            retry = retry_seconds(wait)
            raise self._refused(QuotaExceeded(
                "requests_per_s",
                f"tenant {tenant.name} is over its request rate of {q.requests_per_s:g} requests/s (bursts of "
                f"{q.bucket_size:g}); retry in {retry} s",
                value=q.requests_per_s, current=round(q.bucket_size - bucket.level, 3), retry_after_s=retry,
            ))

    # -- invocations ---------------------------------------------------------------------------------

    def check_invocation(self, tenant: Tenant, now: float) -> None:
        """May `tenant` start one more invocation? QuotaExceeded (429) when its tokens of the last minute or
        its invocations in flight are at their limit. Changes nothing (`acquire` counts it)."""
        q = self.quota(tenant)
        if q.tokens_per_min is not None:
            window = self._tokens.get(tenant.name)
            if window is not None and (wait := window.wait(now, q.tokens_per_min)) > 0:
                retry = retry_seconds(wait)
                used = window.total(now)
                raise self._refused(QuotaExceeded(
                    "tokens_per_min",
                    f"tenant {tenant.name} generated {used} tokens in the last {TOKENS_WINDOW_S:g} s, the limit is "
                    f"{q.tokens_per_min} per minute; retry in {retry} s",
                    value=q.tokens_per_min, current=used, retry_after_s=retry,
                ))
        if q.concurrent is not None:
            self._expire(now)
            n = self._inflight.get(tenant.name, 0)
            if n >= q.concurrent:
                raise self._refused(QuotaExceeded(
                    "concurrent",
                    f"tenant {tenant.name} has {n} invocations queued or running, the limit is {q.concurrent}; "
                    f"retry when one has finished",
                    value=q.concurrent, current=n, retry_after_s=CONCURRENCY_RETRY_S,
                ))

    def acquire(self, tenant: Tenant, invocation_id: str, now: float) -> None:
        """`invocation_id` of `tenant` was accepted: it counts as in flight until `release` or its result."""
        self._expire(now)
        if len(self._pending) >= self.settings.max_tracked:
            self._drop(next(iter(self._pending)))
        self._pending[invocation_id] = Pending(tenant.name, now + self.settings.pending_ttl_s)
        self._inflight[tenant.name] = self._inflight.get(tenant.name, 0) + 1

    def release(self, invocation_id: str) -> None:
        """The invocation no longer counts as in flight (its caller went away); its tokens still count when
        its result arrives. Idempotent; unknown ids are ignored."""
        pending = self._pending.get(invocation_id)
        if pending is not None and pending.in_flight:
            pending.in_flight = False
            n = self._inflight.get(pending.tenant, 0) - 1
            if n > 0:
                self._inflight[pending.tenant] = n
            else:
                self._inflight.pop(pending.tenant, None)

    def forget(self, invocation_id: str) -> None:
        """The invocation was never published: release it and expect no result."""
        self._drop(invocation_id)

    def tracks(self, invocation_id: str) -> bool:
        """This gateway waits for the result of `invocation_id` (cheap: checked before decoding a result)."""
        return invocation_id in self._pending

    def on_result(self, invocation_id: str, generated_tokens: int, now: float, *, cancel_record: bool = False) -> None:
        """The result of a tracked invocation: count its generated tokens for its tenant and release it.
        `cancel_record`: the result a cancel records (no usage: gateway.invoker.cancelled_result) only releases
        it; the worker that was running the call still publishes its own result, with the tokens it generated
        (recorded as a duplicate, but seen on the subject), and that one counts and ends the tracking."""
        pending = self._pending.get(invocation_id)
        if pending is None:
            return
        if cancel_record:
            self.release(invocation_id)
            return
        self._drop(invocation_id)
        if generated_tokens > 0:
            window = self._tokens.get(pending.tenant)
            if window is None:
                if len(self._tokens) >= self.settings.max_tracked:
                    self._tokens.clear()
                window = self._tokens[pending.tenant] = SlidingWindow()
            window.add(now, generated_tokens)

    def in_flight(self, tenant: str) -> int:
        """Invocations of `tenant` this gateway counts as queued or running."""
        return self._inflight.get(tenant, 0)

    def tokens(self, tenant: str, now: float) -> int:
        """Tokens generated for `tenant` in the last minute, as this gateway counted them."""
        window = self._tokens.get(tenant)
        return window.total(now) if window is not None else 0

    def _drop(self, invocation_id: str) -> None:
        self.release(invocation_id)
        self._pending.pop(invocation_id, None)

    def _expire(self, now: float) -> None:
        """Drop invocations whose result never came (lost, or recorded while NATS was away): all share one
        time to live, so the oldest are first."""
        while self._pending:
            invocation_id, pending = next(iter(self._pending.items()))
            if pending.expires > now:
                return
            self._drop(invocation_id)

    # -- authentication ------------------------------------------------------------------------------

    def check_auth(self, address: str | None, now: float) -> None:
        """QuotaExceeded (429) while `address` is over its failed authentications: answered without a lookup."""
        key = address_key(address)
        wait = self.auth_failures.wait(key, now)
        if wait > 0:
            retry = retry_seconds(wait)
            s = self.settings
            raise self._refused(QuotaExceeded(
                "auth_failures",
                f"{s.auth_failures} failed authentications from {key} within {s.auth_failure_window_s:g} s; "
                f"retry in {retry} s",
                value=s.auth_failures, current=self.auth_failures.failures(key, now), retry_after_s=retry,
            ))

    def auth_failed(self, address: str | None, now: float) -> None:
        """A request from `address` failed to authenticate."""
        self.auth_failures.record(address_key(address), now)


# -- storage (counted in Postgres, so exact across gateways) -------------------------------------------


async def check_storage(session: AsyncSession, *, tenant: Tenant, quota: Quota, adapter: str,
                        incoming_bytes: int) -> None:
    """May `tenant` push `incoming_bytes` as adapter `adapter`? QuotaExceeded (403) when a new adapter would
    exceed its adapter count, or its stored bytes plus the upload would exceed its byte quota."""
    use = await repo.storage_use(session, tenant=tenant, adapter=adapter)
    if quota.adapters is not None and not use.has_adapter and use.adapters >= quota.adapters:
        raise QuotaExceeded(
            "adapters",
            f"tenant {tenant.name} stores {use.adapters} adapters, the limit is {quota.adapters}; delete one "
            f"before pushing a new adapter ({adapter!r})",
            value=quota.adapters, current=use.adapters, retry_after_s=None,
        )
    if quota.stored_bytes is not None and use.bytes + incoming_bytes > quota.stored_bytes:
        raise QuotaExceeded(
            "stored_bytes",
            f"tenant {tenant.name} stores {use.bytes} bytes of adapters; this upload of {incoming_bytes} bytes "
            f"would make {use.bytes + incoming_bytes}, the limit is {quota.stored_bytes}",
            value=quota.stored_bytes, current=use.bytes, retry_after_s=None,
        )


async def check_api_keys(session: AsyncSession, *, tenant: Tenant, limit: int) -> None:
    """May `tenant` have one more active key? QuotaExceeded (403) at `limit`."""
    n = await repo.count_active_api_keys(session, tenant=tenant)
    if n >= limit:
        raise QuotaExceeded(
            "api_keys", f"tenant {tenant.name} has {n} active API keys, the limit is {limit}; revoke one first",
            value=limit, current=n, retry_after_s=None,
        )
