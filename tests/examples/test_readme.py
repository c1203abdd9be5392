"""The README's curl examples, run as written with the curl command against a real stack: the gateway on a
free port, the scheduler and a worker in-process (tiny backbone), NATS, Postgres and S3 from the session's
services, tenant `dev` and its key as `$KEY`.

Only what cannot be the same here is replaced: the gateway's address (http://127.0.0.1:8000), `$KEY`, and
`<id>` (the id the previous example's 202 answered). The upload example runs first, from a directory holding
`adapter_config.json` and `adapter_model.safetensors`, since the others call the adapter it pushes.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from storage.adapter_format import write_peft_adapter
from storage.backbone import BackboneSpec
from tests.stacks import in_process_stack

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which("curl") is None, reason="runs the README's examples with curl")]

ROOT = Path(__file__).parents[2]
README_GATEWAY = "http://127.0.0.1:8000"


def readme_curl_commands(text: str) -> list[list[str]]:
    """Every curl command in the README's bash blocks, continuation lines joined, comments dropped, as argv."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("curl "):
                commands.append(shlex.split(line, comments=True))
    return commands


@dataclass
class Stack:
    url: str
    key: str
    adapter_dir: Path


@pytest_asyncio.fixture
async def stack(services: Any, tmp_path: Path) -> AsyncIterator[Stack]:
    async with in_process_stack(services, tmp_path, tenant="dev", adapter_pool_bytes=1 << 20,
                                max_position_embeddings=512) as s:
        adapter_dir = write_peft_adapter(tmp_path / "adapter", BackboneSpec.from_hf_dir(s.backbone), rank=4,
                                         modules=("q_proj", "v_proj"), seed=5)
        yield Stack(url=s.url, key=s.key, adapter_dir=adapter_dir)


async def _curl(argv: list[str], *, cwd: Path) -> tuple[int, Any]:
    """Run one curl command; (HTTP status, JSON body)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, "--max-time", "120", "-S", "-w", "\n%{http_code}", cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{shlex.join(argv)}: curl exited with {proc.returncode}: {err.decode()}"
    body, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(body) if body else None


async def test_readme_curl_examples_succeed(stack: Stack) -> None:
    commands = readme_curl_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 5, commands
    commands.sort(key=lambda argv: not any(a.endswith("/v1/adapters") for a in argv))  # the upload first
    last_id: str | None = None
    for argv in commands:
        assert argv[0] == "curl" and any(a.startswith(README_GATEWAY) for a in argv), argv
        run = [a.replace(README_GATEWAY, stack.url).replace("$KEY", stack.key) for a in argv]
        if any("<id>" in a for a in run):
            assert last_id is not None, f"{shlex.join(argv)} needs the id of an earlier asynchronous call"
            run = [a.replace("<id>", last_id) for a in run]
        status, body = await _curl(run, cwd=stack.adapter_dir)
        assert 200 <= status < 300, f"{shlex.join(argv)} answered {status}: {body}"
        assert isinstance(body, dict) and body.get("error") is None, (argv, body)
        target = next(a for a in run if a.startswith(stack.url))
        if status == 202:
            last_id = body["id"]
        elif target.endswith("/v1/chat/completions"):
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"], body
        elif target.endswith("/invocations"):
            assert body["status"] == "succeeded" and body["output"]["text"], body
        elif "/v1/invocations/" in target:
            assert body["id"] == last_id and body["status"] in ("queued", "running", "succeeded"), body
    assert last_id is not None, "the README shows an asynchronous call"
