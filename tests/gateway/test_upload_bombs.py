"""Decompression bombs and oversized headers, uploaded to a real gateway PROCESS (`python -m gateway`), are
refused with a clean JSON 413/400 while the process's memory stays under the stated bound and /healthz
stays fast.

The bound (storage.settings.RegistrySettings, docs/ARCHITECTURE.md): reading an upload grows the gateway's
peak RSS by at most storage.archive.READ_MEMORY_BYTES (16 MiB) per concurrent upload, and an upload refused
while it is read never costs more. The peak is the kernel's own high-water mark (VmHWM), reset just before
the bombs (/proc/<pid>/clear_refs), so no short spike escapes the measurement. Before this reader a 0.9 MB
zip bomb cost 2.2 GB of gateway memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from lorafn.stack import free_ports
from storage.adapter_format import write_peft_adapter
from storage.archive import READ_MEMORY_BYTES
from storage.backbone import default_backbone_spec
from storage.objectstore import ObjectStore
from storage.settings import ObjectStoreSettings
from tests.gateway.conftest import Keys
from tests.storage import bombs

log = logging.getLogger(__name__)
MIB = 1 << 20
CONCURRENT = 6  # uploads in flight at once in the concurrent rounds
ROUNDS = 8


@dataclass
class GatewayProcess:
    """A `python -m gateway` child process on its own port."""

    pid: int
    url: str

    def status(self, field: str) -> int:
        """A memory figure of /proc/<pid>/status, in bytes (VmRSS now, VmHWM the peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


@pytest_asyncio.fixture
async def gateway_process(services: Any, object_store_settings: ObjectStoreSettings, store: ObjectStore,
                          keys: Keys, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    (port,) = free_ports("127.0.0.1", 1)
    env = {
        **os.environ,
        "LORAFN_NATS__URL": services.nats_url,
        "LORAFN_DATABASE__URL": services.database_url,
        "LORAFN_OBJECT_STORE__ENDPOINT": object_store_settings.endpoint,
        "LORAFN_OBJECT_STORE__ACCESS_KEY": object_store_settings.access_key,
        "LORAFN_OBJECT_STORE__SECRET_KEY": object_store_settings.secret_key.get_secret_value(),
        "LORAFN_OBJECT_STORE__BUCKET": object_store_settings.bucket,
        "LORAFN_GATEWAY__HTTP__HOST": "127.0.0.1",
        "LORAFN_GATEWAY__HTTP__PORT": str(port),
    }
    with (tmp_path / "gateway.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as c:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited: {(tmp_path / 'gateway.log').read_text()[-4000:]}")
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the gateway process did not start")
                await asyncio.sleep(0.2)
        yield GatewayProcess(pid=proc.pid, url=url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _archive(filename: str, data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("archive", (filename, data, "application/octet-stream"))]


def _two_files(weights: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", ("adapter_config.json", b'{"r": 1}', "application/json")),
            ("files", ("adapter_model.safetensors", weights, "application/octet-stream"))]


# (case, multipart files, expected status, expected code)
BOMBS: list[tuple[str, Callable[[], list[Any]], int, str]] = [
    ("zip-deflate-1gib", lambda: _archive("a.zip", bombs.zip_bomb()), 413, "upload_too_large"),
    ("zip-deflate-160mib", lambda: _archive("a.zip", bombs.zip_bomb(160)), 413, "compression_ratio_too_high"),
    ("zip-overlapping", lambda: _archive("a.zip", bombs.zip_overlapping()), 413, "compression_ratio_too_high"),
    ("zip-overlapping-stored", lambda: _archive("a.zip", bombs.zip_overlapping(entries=30, inflated_mib=4,
                                                                                method=0)), 400, "archive_invalid"),
    ("zip-nested", lambda: _archive("a.zip", bombs.zip_nested(bombs.zip_bomb())), 413, "header_too_large"),
    ("zip-20k-members", lambda: _archive("a.zip", bombs.zip_many_members()), 413, "too_many_members"),
    ("tar-gz-160mib", lambda: _archive("a.tar.gz", bombs.tar_gz_bomb(160)), 413, "compression_ratio_too_high"),
    ("tar-gz-1gib", lambda: _archive("a.tar.gz", bombs.tar_gz_bomb(1024)), 413, "upload_too_large"),
    ("tar-gz-long-name-1gib", lambda: _archive("a.tar.gz", bombs.tar_gz_long_name()), 413,
     "archive_header_too_large"),
    ("tar-gz-pax-1gib", lambda: _archive("a.tar.gz", bombs.tar_gz_pax()), 413, "archive_header_too_large"),
    ("tar-gz-20k-members", lambda: _archive("a.tar.gz", bombs.tar_gz_many_members()), 413, "too_many_members"),
    ("safetensors-header-8gib", lambda: _two_files(bombs.safetensors_huge_header()), 413, "header_too_large"),
]


async def _upload(c: httpx.AsyncClient, name: str, files: list[Any]) -> httpx.Response:
    return await c.post("/v1/adapters", data={"name": name}, files=files)


async def test_bombs_are_refused_under_the_memory_bound(gateway_process: GatewayProcess, keys: Keys,
                                                        tmp_path: Path) -> None:
    gw = gateway_process
    bodies = {case: build() for case, build, _, _ in BOMBS}  # built here, before any measurement
    adapter = write_peft_adapter(tmp_path / "ok", default_backbone_spec(), rank=2, modules=("q_proj",))
    async with httpx.AsyncClient(base_url=gw.url, timeout=120, headers=keys.auth()) as c:
        # Warm-up: one valid upload and one refusal load every code path (imports, threads, S3 client).
        ok = await _upload(c, "warm", [("files", (p.name, p.read_bytes(), "application/octet-stream"))
                                       for p in sorted(adapter.iterdir())])
        assert ok.status_code == 201, ok.text
        assert (await _upload(c, "warm", bodies["zip-deflate-160mib"])).status_code == 413
        baseline = gw.status("VmRSS")
        gw.reset_peak()

        healthz: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as h:
                while not done.is_set():
                    started = time.monotonic()
                    assert (await h.get("/healthz")).status_code == 200
                    healthz.append(time.monotonic() - started)
                    await asyncio.sleep(0.02)

        prober = asyncio.create_task(probe())
        started = time.monotonic()
        for case, _, status, code in BOMBS:  # one at a time
            r = await _upload(c, "bomb", bodies[case])
            assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), (case, r.text)
            assert r.json()["error"]["code"] == code, (case, r.json())
        sequential_peak = gw.status("VmHWM") - baseline
        gw.reset_peak()
        concurrent_baseline = gw.status("VmRSS")
        cases = [BOMBS[i % len(BOMBS)] for i in range(CONCURRENT * ROUNDS)]
        for round_start in range(0, len(cases), CONCURRENT):  # CONCURRENT uploads in flight at once
            batch = cases[round_start:round_start + CONCURRENT]
            answers = await asyncio.gather(*(_upload(c, f"bomb{i}", bodies[case])
                                             for i, (case, _, _, _) in enumerate(batch)))
            for (case, _, status, code), r in zip(batch, answers, strict=True):
                assert r.status_code == status and r.json()["error"]["code"] == code, (case, r.text)
        concurrent_peak = gw.status("VmHWM") - concurrent_baseline
        elapsed = time.monotonic() - started
        done.set()
        await prober
    log.info("gateway RSS %.0f MiB; peak growth: %.1f MiB for %d bombs one at a time, %.1f MiB with %d at once; "
             "%d bombs in %.1f s; /healthz max %.0f ms over %d probes", baseline / MIB, sequential_peak / MIB,
             len(BOMBS), concurrent_peak / MIB, CONCURRENT, len(BOMBS) + len(cases), elapsed,
             max(healthz) * 1000, len(healthz))
    assert sequential_peak <= READ_MEMORY_BYTES, f"{sequential_peak / MIB:.1f} MiB for one upload at a time"
    assert concurrent_peak <= CONCURRENT * READ_MEMORY_BYTES, \
        f"{concurrent_peak / MIB:.1f} MiB for {CONCURRENT} uploads at once"
    assert max(healthz) < 1.0, f"/healthz took {max(healthz) * 1000:.0f} ms during the bombs"


@pytest.mark.parametrize("size_mib", [8])
async def test_an_upload_is_spooled_to_disk_not_held_in_memory(gateway_process: GatewayProcess, keys: Keys,
                                                               size_mib: int) -> None:
    """An upload of incompressible bytes (refused by content) does not grow the gateway by its size."""
    gw = gateway_process
    body = _archive("a.zip", os.urandom(size_mib * MIB))  # not an archive: read in full by the multipart parser
    async with httpx.AsyncClient(base_url=gw.url, timeout=120, headers=keys.auth()) as c:
        assert (await _upload(c, "noise", body)).status_code == 400  # warm-up
        baseline = gw.status("VmRSS")
        gw.reset_peak()
        r = await _upload(c, "noise", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "archive_invalid", r.text
    growth = gw.status("VmHWM") - baseline
    log.info("a %d MiB upload grew the gateway's peak RSS by %.1f MiB", size_mib, growth / MIB)
    assert growth < size_mib * MIB // 2, f"{growth / MIB:.1f} MiB for a {size_mib} MiB upload"


async def test_a_valid_adapter_costs_a_few_times_its_weights(gateway_process: GatewayProcess, keys: Keys,
                                                                  tmp_path: Path) -> None:
    """The bound after reading: a valid upload is validated and re-encoded in memory (its bytes, its tensors,
    the canonical blob and the encoder's copy of it): about four times its weights file, at most five."""
    gw = gateway_process
    small = write_peft_adapter(tmp_path / "small", default_backbone_spec(), rank=2, modules=("q_proj",))
    big = write_peft_adapter(tmp_path / "big", default_backbone_spec(), rank=32, seed=1)
    weights = (big / "adapter_model.safetensors").stat().st_size
    async with httpx.AsyncClient(base_url=gw.url, timeout=300, headers=keys.auth()) as c:
        def files(path: Path) -> list[Any]:
            return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(path.iterdir())]

        assert (await _upload(c, "small", files(small))).status_code == 201  # warm-up
        baseline = gw.status("VmRSS")
        gw.reset_peak()
        r = await _upload(c, "big", files(big))
    assert r.status_code == 201, r.text
    growth = gw.status("VmHWM") - baseline
    log.info("a valid adapter with %.1f MiB of weights grew the gateway's peak RSS by %.1f MiB (%.1fx)",
             weights / MIB, growth / MIB, growth / weights)
    assert growth <= 5 * weights + READ_MEMORY_BYTES, f"{growth / MIB:.1f} MiB for {weights / MIB:.1f} MiB of weights"
