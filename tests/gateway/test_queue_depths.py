"""The gateway's per-adapter queue depths: one stream read for every adapter, stale reads used while the next
runs, too old ones refused (gateway/depths.py)."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from nats.aio.client import Client

from gateway.depths import DepthBook, QueueDepths
from protocol import subjects


def test_book_due_usable_and_counts() -> None:
    book = DepthBook(interval_s=0.25, max_age_s=5.0)
    assert book.due(100.0) and not book.usable(100.0)
    book.replace({"lora.invoke.t.a": 3}, read_at=100.0)
    assert book.depth("lora.invoke.t.a") == 3 and book.depth("lora.invoke.t.b") == 0
    book.added("lora.invoke.t.b")
    book.added("lora.invoke.t.a")
    assert book.depth("lora.invoke.t.a") == 4 and book.depth("lora.invoke.t.b") == 1
    assert not book.due(100.2) and book.due(100.3)
    assert book.usable(105.0) and not book.usable(105.1)
    book.replace({}, read_at=106.0)  # the dispatcher took everything: the read replaces the local counts
    assert book.depth("lora.invoke.t.a") == 0 and book.depth("lora.invoke.t.b") == 0


def test_book_max_age_below_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="max_age_s"):
        DepthBook(interval_s=2.0, max_age_s=1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_one_read_serves_every_adapter(nc: Client) -> None:
    js = nc.jetstream()
    names = [f"depth{i}" for i in range(50)]
    for i, name in enumerate(names):
        for _ in range(i % 3):
            await js.publish(subjects.invoke("acme", name), b"{}")
    clock = Clock()
    depths = QueueDepths(interval_s=0.25, max_age_s=5.0, clock=clock)
    got = [await depths.depth(js, subjects.invoke("acme", name)) for name in names]
    assert got == [i % 3 for i in range(len(names))]
    assert depths.reads == 1  # 50 adapters, one STREAM.INFO
    depths.added(subjects.invoke("acme", "depth0"))
    assert await depths.depth(js, subjects.invoke("acme", "depth0")) == 1
    assert depths.reads == 1


async def test_stale_book_answers_while_the_next_read_runs(nc: Client) -> None:
    js = nc.jetstream()
    clock = Clock()
    depths = QueueDepths(interval_s=0.25, max_age_s=5.0, clock=clock)
    subject = subjects.invoke("acme", "stale")
    assert await depths.depth(js, subject) == 0
    await js.publish(subject, b"{}")
    await js.publish(subject, b"{}")
    clock.now += 1.0  # past the interval, within the max age: the old answer now, a read in the background
    assert await depths.depth(js, subject) == 0
    for _ in range(100):
        if depths.reads == 2 and depths.book.read_at == clock.now:
            break
        await asyncio.sleep(0.01)
    assert depths.reads == 2
    assert await depths.depth(js, subject) == 2


async def test_too_old_book_waits_for_a_read_and_its_failure_raises(nc: Client) -> None:
    js = nc.jetstream()
    clock = Clock()
    depths = QueueDepths(interval_s=0.25, max_age_s=5.0, clock=clock)
    subject = subjects.invoke("acme", "old")
    assert await depths.depth(js, subject) == 0
    await js.publish(subject, b"{}")
    clock.now += 10.0  # older than max_age_s: the call waits for the read and sees the publish
    assert await depths.depth(js, subject) == 1
    await nc.close()
    clock.now += 10.0
    with pytest.raises(nats.errors.Error):  # the gateway answers 503 for it
        await depths.depth(js, subject)
