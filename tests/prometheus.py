"""Reading Prometheus text pages in tests (the metrics tests of every service)."""

from __future__ import annotations

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
