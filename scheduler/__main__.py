"""`python -m scheduler`: the scheduler process (settings from LORAFN_* environment variables).

SIGTERM or SIGINT stops it: pending writes are flushed, NATS is drained, it exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from protocol.heap import freeze_startup_heap
from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings


async def serve(settings: SchedulerSettings) -> None:
    """Run the scheduler until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = SchedulerService(settings)  # its predictor and policies: the long-lived heap
    freeze_startup_heap()
    await service.run(stop)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(SchedulerSettings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
