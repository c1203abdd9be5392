"""The quota decisions as plain objects, the time passed in: token bucket, sliding window, failure log, and
the Limiter's bookkeeping of invocations (no server)."""

from __future__ import annotations

import pytest

from gateway.errors import QuotaExceeded, error_status
from gateway.quotas import FailureLog, Limiter, Quota, SlidingWindow, TokenBucket, address_key, retry_seconds
from gateway.settings import QuotaSettings
from storage.models import Tenant


def tenant(name: str = "acme", **quotas: float | int | None) -> Tenant:
    return Tenant(name=name, **{f"quota_{k}": v for k, v in quotas.items()})


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        # (time, expected wait) for a bucket of rate 2/s and size 2 that starts full
        ([(0.0, 0.0), (0.0, 0.0), (0.0, 0.5)], "a full bucket serves its size at once, then asks for 1/rate"),
        ([(0.0, 0.0), (0.0, 0.0), (0.25, 0.25)], "half a token refilled after 0.25 s: 0.25 s to go"),
        ([(0.0, 0.0), (0.0, 0.0), (0.5, 0.0), (0.5, 0.5)], "one token back after 1/rate"),
        ([(0.0, 0.0), (10.0, 0.0), (10.0, 0.0), (10.0, 0.5)], "refill stops at the size (no credit for idling)"),
        ([(5.0, 0.0), (4.0, 0.0), (4.0, 0.5)], "a clock that goes back refills nothing"),
    ],
)
def test_token_bucket(steps: list[tuple[float, float]], why: str) -> None:
    bucket = TokenBucket(rate=2.0, size=2.0)
    for now, wait in steps:
        assert bucket.take(now) == pytest.approx(wait), why


def test_refused_take_takes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, size=1.0)
    assert bucket.take(0.0) == 0.0
    for _ in range(100):
        assert bucket.take(0.5) == pytest.approx(0.5)  # refusals do not dig the bucket deeper
    assert bucket.take(1.0) == 0.0


@pytest.mark.parametrize(
    ("adds", "now", "total", "limit", "wait", "why"),
    [
        ([(0.5, 10)], 0.5, 10, 11, 0.0, "below the limit: no wait"),
        ([(0.5, 10)], 0.5, 10, 10, 60.5, "at the limit: wait until slot [0, 1) leaves, at 61"),
        ([(0.5, 10), (30.2, 5)], 40.0, 15, 12, 21.0, "the first slot's 10 must leave (at 61) to drop below 12"),
        ([(0.5, 10), (30.2, 5)], 40.0, 15, 5, 51.0, "both must leave: the second at 91"),
        ([(0.5, 10), (30.2, 5)], 61.0, 5, 12, 0.0, "the first slot left the window at 61"),
        ([(0.5, 10), (0.9, 10)], 0.9, 20, 20, 60.1, "one slot per second: both in slot 0"),
    ],
)
def test_sliding_window(adds: list[tuple[float, int]], now: float, total: int, limit: int, wait: float,
                        why: str) -> None:
    window = SlidingWindow(window_s=60.0, slots=60)
    for t, n in adds:
        window.add(t, n)
    assert window.total(now) == total, why
    assert window.wait(now, limit) == pytest.approx(wait), why


def test_failure_log_blocks_after_the_limit_until_the_oldest_failure_leaves() -> None:
    log = FailureLog(limit=3, window_s=10.0, max_keys=10)
    for t in (0.0, 1.0, 2.0):
        assert log.wait("a", t) == 0.0
        log.record("a", t)
    assert log.wait("a", 2.0) == pytest.approx(8.0)  # the failure at 0 leaves at 10
    assert log.wait("b", 2.0) == 0.0  # per key
    assert log.failures("a", 5.0) == 3
    assert log.wait("a", 10.0) == 0.0
    log.record("a", 10.0)
    assert log.wait("a", 10.0) == pytest.approx(1.0)  # the last three: 1, 2, 10; 1 leaves at 11


def test_failure_log_is_bounded() -> None:
    log = FailureLog(limit=1, window_s=10.0, max_keys=2)
    for key in ("a", "b", "c"):
        log.record(key, 0.0)
    assert log.wait("a", 0.0) == 0.0  # the oldest key was dropped
    assert log.wait("c", 0.0) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("host", "key"),
    [("10.1.2.3", "10.1.2.3"), ("2001:db8::1", "2001:db8::/64"), ("2001:db8::ffff:1", "2001:db8::/64"),
     (None, "unknown"), ("testclient", "testclient")],
)
def test_address_key(host: str | None, key: str) -> None:
    assert address_key(host) == key


@pytest.mark.parametrize(("wait", "retry"), [(0.01, 1), (1.0, 1), (1.2, 2), (59.0, 59)])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, retry: int) -> None:
    assert retry_seconds(wait) == retry


def test_tenant_columns_override_the_defaults() -> None:
    defaults = QuotaSettings(requests_per_s=10.0, tokens_per_min=100, concurrent=None)
    assert Quota.of(tenant(), defaults).requests_per_s == 10.0
    q = Quota.of(tenant(requests_per_s=2.5, concurrent=3), defaults)
    assert (q.requests_per_s, q.tokens_per_min, q.concurrent) == (2.5, 100, 3)
    assert q.bucket_size == 3.0  # one second's worth, rounded up
    assert Quota.of(tenant(burst=7), defaults).bucket_size == 7.0


def _refusal(call: object, *args: object) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def test_request_rate_refusal_names_the_limit_with_numbers() -> None:
    limiter = Limiter(QuotaSettings(requests_per_s=2.0, burst=2))
    acme = tenant()
    limiter.check_request(acme, 0.0)
    limiter.check_request(acme, 0.0)
    refused = _refusal(limiter.check_request, acme, 0.0)
    status, body, headers = error_status(refused)
    assert status == 429 and headers == {"Retry-After": "1"}
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["limit"] == "requests_per_s"
    assert body["error"]["limit_value"] == 2.0 and "2 requests/s" in body["error"]["message"]
    limiter.check_request(tenant("other"), 0.0)  # per tenant
    limiter.check_request(acme, 0.5)


def test_concurrency_counts_until_the_result_or_a_failed_publish() -> None:
    limiter = Limiter(QuotaSettings(concurrent=2, tokens_per_min=None))
    acme = tenant()
    for i in range(2):
        limiter.check_invocation(acme, 0.0)
        limiter.acquire(acme, f"inv-{i}", 0.0)
    refused = _refusal(limiter.check_invocation, acme, 0.0)
    assert (refused.limit, refused.value, refused.current, refused.retry_after_s) == ("concurrent", 2, 2, 1)
    limiter.on_result("inv-0", 5, 1.0)
    limiter.check_invocation(acme, 1.0)
    limiter.forget("inv-1")  # never published
    assert limiter.in_flight("acme") == 0 and not limiter.tracks("inv-1")
    limiter.on_result("inv-1", 5, 1.0)  # unknown: ignored
    limiter.release("inv-1")


def test_released_invocation_still_counts_its_tokens() -> None:
    limiter = Limiter(QuotaSettings(concurrent=1, tokens_per_min=10))
    acme = tenant()
    limiter.acquire(acme, "inv-0", 0.0)
    limiter.release("inv-0")
    limiter.release("inv-0")  # idempotent
    assert limiter.in_flight("acme") == 0 and limiter.tracks("inv-0")
    limiter.on_result("inv-0", 12, 2.0)
    refused = _refusal(limiter.check_invocation, acme, 3.0)
    assert (refused.limit, refused.value, refused.current) == ("tokens_per_min", 10, 12)
    assert refused.retry_after_s == 60  # slot [2, 3) leaves at 63
    limiter.check_invocation(acme, 63.0)


def test_tokens_of_a_cancelled_call_count_from_the_worker_result_after_the_cancel_record() -> None:
    limiter = Limiter(QuotaSettings(concurrent=1, tokens_per_min=10))
    acme = tenant()
    limiter.acquire(acme, "inv-0", 0.0)
    limiter.on_result("inv-0", 0, 1.0, cancel_record=True)  # the cancel is recorded first: no usage in it
    assert limiter.in_flight("acme") == 0 and limiter.tracks("inv-0")
    limiter.on_result("inv-0", 11, 1.5)  # the worker's own result, with what it generated before aborting
    assert not limiter.tracks("inv-0")
    assert _refusal(limiter.check_invocation, acme, 2.0).current == 11


def test_pending_invocations_expire() -> None:
    limiter = Limiter(QuotaSettings(concurrent=1, pending_ttl_s=30.0))
    acme = tenant()
    limiter.acquire(acme, "lost", 0.0)
    _refusal(limiter.check_invocation, acme, 29.0)
    limiter.check_invocation(acme, 30.0)  # its result never came: no longer in flight
    assert not limiter.tracks("lost")


def test_auth_throttle_per_address() -> None:
    limiter = Limiter(QuotaSettings(auth_failures=3, auth_failure_window_s=60.0))
    for i in range(3):
        limiter.check_auth("10.0.0.1", float(i))
        limiter.auth_failed("10.0.0.1", float(i))
    refused = _refusal(limiter.check_auth, "10.0.0.1", 2.0)
    assert (refused.limit, refused.value, refused.current, refused.retry_after_s) == ("auth_failures", 3, 3, 58)
    limiter.check_auth("10.0.0.2", 2.0)
    limiter.check_auth("10.0.0.1", 60.0)


def test_storage_refusal_is_403_without_retry_after() -> None:
    refused = QuotaExceeded("adapters", "too many", value=2, current=2, retry_after_s=None)
    status, body, headers = error_status(refused)
    assert status == 403 and headers == {}
    assert body["error"]["code"] == "quota_exceeded" and body["error"]["type"] == "insufficient_quota"
