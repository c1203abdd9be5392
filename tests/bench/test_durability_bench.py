"""bench durability: its statistics and page from hand-made figures, and a tiny run on real NATS servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.durability import (
    Config,
    DurabilitySettings,
    Load,
    file_system,
    invocation_payload,
    markdown,
    measure,
    percentile,
)
from protocol.messages import Invocation


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) == 0.0


def test_a_load_summarises_its_latencies() -> None:
    load = Load(latencies=[0.001] * 98 + [0.010, 0.020], elapsed_s=0.5)
    s = load.summary()
    assert s["p50_ms"] == pytest.approx(1.0) and s["p99_ms"] == pytest.approx(10.0)
    assert s["per_s"] == pytest.approx(200.0) and s["count"] == 100


def test_the_message_is_an_invocation_as_the_gateway_sends_it() -> None:
    invocation_id, payload = invocation_payload(3)
    inv = Invocation.decode(payload)
    assert inv.id == invocation_id and inv.messages and 1500 < len(payload) < 4000
    assert invocation_payload(3)[0] != invocation_id  # ids are unique: the duplicate window drops nothing


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        DurabilitySettings(messages=0)


def test_the_page_shows_every_row_and_the_disk() -> None:
    row = {"label": Config(3, "always").label, "load": "one at a time", "p50_ms": 1.2, "p99_ms": 2.5, "mean_ms": 1.3,
           "per_s": 800.0, "p50_vs_default": 1.8, "p99_vs_default": 1.6, "per_s_vs_default": 0.55,
           "p50_vs_one_server": 5.7}
    page = markdown({"settings": {"messages": 10, "slice_messages": 5}, "store": "ext4 on /dev/x",
                     "message_bytes": 2286, "machine": {"cpu_count": 2}, "rows": [row]})
    assert "| 3 servers, R3, sync always | one at a time | 1.20 | 2.50 | 1.30 | 800 | 1.80x | 1.60x | 0.55x | 5.70x |" \
        in page
    assert "ext4 on /dev/x" in page and "2286 bytes" in page


def test_file_system_names_the_mount_of_a_path(tmp_path: Path) -> None:
    assert file_system(tmp_path) != "unknown"


def test_a_tiny_run_on_one_server_with_and_without_sync(tmp_path: Path) -> None:
    settings = DurabilitySettings(messages=6, concurrency=2, slice_messages=4)
    payload = asyncio.run(measure(settings, tmp_path, configs=(Config(1, None), Config(1, "always"))))
    rows = payload["rows"]
    assert [(r["label"], r["load"]) for r in rows] == [
        ("1 server, sync default (2m)", "one at a time"), ("1 server, sync default (2m)", "2 in flight"),
        ("1 server, sync always", "one at a time"), ("1 server, sync always", "2 in flight")]
    assert all(r["count"] == 6 and r["p50_ms"] > 0 and r["per_s"] > 0 for r in rows)  # warm-up slices not counted
    assert rows[0]["p50_vs_default"] == 1.0 and rows[2]["p50_vs_default"] > 0
