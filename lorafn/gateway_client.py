"""What the CLI's commands (`lorafn demo`, `lorafn replay`) and the benchmarks do against a gateway over HTTP:
push an adapter's folder, read the x-lorafn-* headers of an answer."""

from __future__ import annotations

from pathlib import Path

import httpx

from storage.adapter_format import CONFIG_FILE, WEIGHTS_FILE


async def push_adapter(http: httpx.AsyncClient, name: str, directory: Path) -> httpx.Response:
    """POST /v1/adapters: a PEFT adapter folder (its config and weights) as function `name`."""
    files = [("files", (f, (directory / f).read_bytes())) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    return await http.post("/v1/adapters", data={"name": name}, files=files)


def header_float(headers: httpx.Headers, name: str) -> float | None:
    """A number an answer carries in header `name` (x-lorafn-load-ms, ...); None when absent or not a number."""
    value = headers.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
