"""`make demo`: a throwaway local stack, three adapters of different ranks pushed and listed, then stopped."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafn.bootstrap import bootstrap, object_store_settings
from lorafn.stack import LocalStack, StackConfig, free_stack_ports
from storage import repo
from storage.adapter_format import write_peft_adapter
from storage.backbone import default_backbone_spec
from storage.objectstore import ObjectStore
from storage.registry import Registry
from storage.settings import DatabaseSettings, RegistrySettings

DEMO_ADAPTERS = (
    ("support-bot", 8, ("q_proj", "v_proj")),
    ("sql-writer", 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("poet", 64, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
)


async def _push_all(stack_dir: Path, work: Path, console: Console) -> None:
    stack = LocalStack(StackConfig(state_dir=stack_dir, ports=free_stack_ports()))
    started = time.monotonic()
    endpoints = stack.start()
    try:
        result = await bootstrap(endpoints, state_dir=stack.state_dir)
        console.print(f"stack up in {time.monotonic() - started:.1f} s (streams: {', '.join(result.streams)})")
        spec = default_backbone_spec()
        engine = repo.create_engine(DatabaseSettings(url=endpoints.database_url))
        registry = Registry(sessions=repo.session_factory(engine), store=ObjectStore(object_store_settings(endpoints)),
                            spec=spec, settings=RegistrySettings())
        table = Table("function", "rank", "modules", "bytes", "sha256", "push ms")
        try:
            for i, (name, rank, modules) in enumerate(DEMO_ADAPTERS):
                path = write_peft_adapter(work / name, spec, rank=rank, modules=modules, seed=i)
                t0 = time.perf_counter()
                pushed = await registry.push(tenant=result.dev_tenant, name=name, source=path)
                ms = (time.perf_counter() - t0) * 1000
                table.add_row(f"{pushed.tenant}/{pushed.name}", str(rank), ",".join(pushed.target_modules),
                              str(pushed.bytes), pushed.sha256[:16], f"{ms:.0f}")
            listed = await registry.list_adapters(tenant=result.dev_tenant)
        finally:
            await engine.dispose()
        console.print(table)
        console.print(f"registry lists {len(listed)} functions for tenant {result.dev_tenant}")
    finally:
        stack.stop()
        console.print("stack stopped")


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="lorafn-demo-") as tmp:
        asyncio.run(_push_all(Path(tmp) / "stack", Path(tmp) / "adapters", console))


if __name__ == "__main__":
    main()
