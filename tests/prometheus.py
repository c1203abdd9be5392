"""Reading Prometheus text pages in tests (the metrics tests of every service)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text page: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(page: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, None when the page lacks it."""
    return page.get((name, frozenset(labels.items())))


class Renders(Protocol):
    def render(self) -> tuple[bytes, str]: ...


def rendered(metrics: Renders) -> Samples:
    """The samples of a service's metrics page, which must be Prometheus text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return samples(body.decode())


async def poll(url: str, check: Callable[[Samples], bool], *, what: str, timeout: float = 15.0) -> Samples:
    """Scrape `url` until `check` holds for the page."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            page = samples((await client.get(url)).text)
            if check(page):
                return page
            assert time.monotonic() < deadline, f"{what} not seen in {timeout} s: {page}"
            await asyncio.sleep(0.1)
