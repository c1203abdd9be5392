"""`python -m workers`: one worker process (settings from LORAFN_* environment variables).

SIGTERM or SIGINT drains it: no new invocations are pulled, running ones finish (bounded by
`drain_timeout_s`, the rest are handed back), a last heartbeat says draining, and it exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from protocol.heap import freeze_startup_heap
from workers.service import open_worker
from workers.settings import WorkerSettings

logger = logging.getLogger("workers")


async def serve(settings: WorkerSettings) -> None:
    """Run one worker until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_worker(settings) as worker:
        freeze_startup_heap()  # the backbone, the engine and their modules are built
        await worker.run(stop)
    logger.info("worker %s stopped", worker.worker_id)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = WorkerSettings()
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
