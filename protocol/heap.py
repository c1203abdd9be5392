"""What a long-running lorafn process does with the heap it built while starting.

CPython's cyclic garbage collector scans, on every full (oldest-generation) collection, every container
object alive: with torch imported (the scheduler's LSTM predictor, a worker's engine) that is some 370,000
objects in the scheduler, and one full collection took 100-210 ms on this project's 2-core machine, in one
stretch during which no other code of the process runs: the scheduler dispatched nothing, a worker decoded
nothing. Those pauses were the tail of the invocation path (p99 of the direct path 80-110 ms against a p50 of
15 ms in `python -m bench invocation`), and they grew with the number of adapters, whose state makes the
long-lived heap larger and full collections more frequent.

`freeze_startup_heap()` is called by each service's entry point once its modules are imported and its
long-lived objects are built: it collects what start-up left behind, then moves every surviving object to the
collector's permanent generation (`gc.freeze()`), which no collection scans again. What the process builds
afterwards (per-adapter state, messages in flight) is still collected. The price: a frozen object that later
becomes cyclic garbage is never freed; start-up objects (modules, classes, the model, settings, connections'
machinery) live as long as the process anyway.

It also lets the youngest generation grow to `YOUNG_THRESHOLD` objects before a collection (CPython's default is
700). A service handling a thousand messages a second keeps a few thousand objects in flight for a millisecond
or two: with 700, collections ran every few hundred microseconds, caught those objects alive and promoted
them, and the promoted ones soon triggered full collections. Measured on the invocation benchmark's stack (10 and
1,000 adapters, 6,000 direct and 6,000 gateway calls each), after the freeze: the scheduler spent 238 ms in 322
collections (one full, 24 ms) with the default and 54 ms in 9 young ones (the longest 21 ms) with 10,000; the
benchmark's echo workers 896 ms (6 full collections, the longest 157 ms) against 294 ms (none full).

Only entry points call it (`python -m scheduler`, `python -m workers`, `python -m gateway`, the benchmark's
echo workers): a test process that builds services over and over must not freeze each one's garbage.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


# Objects allocated (net of those freed) before the youngest generation is collected.
YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> int:
    """Collect start-up's garbage, exempt every object alive now from future collections, and let the youngest
    generation grow to YOUNG_THRESHOLD; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    frozen = gc.get_freeze_count()
    logger.info("froze %d start-up objects out of the garbage collector's scans", frozen)
    return frozen
