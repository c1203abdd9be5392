"""A service's start-up heap leaves the collector's scans (run in a child: freezing is for the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import gc, json
from protocol.heap import YOUNG_THRESHOLD, freeze_startup_heap
class Node:
    pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a
kept = cycle()
before = gc.get_freeze_count()
frozen = freeze_startup_heap()
garbage = cycle(); del garbage  # built after the freeze: still collected
print(json.dumps({"before": before, "frozen": frozen, "count": gc.get_freeze_count(), "collected": gc.collect(),
                  "threshold": gc.get_threshold(), "young": YOUNG_THRESHOLD}))
"""


def test_freezing_exempts_startup_objects_but_not_later_garbage() -> None:
    out = json.loads(subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True, text=True).stdout)
    assert out["before"] == 0 and out["frozen"] == out["count"] > 1000  # modules, classes, the kept cycle
    assert out["collected"] >= 2  # the cycle made after the freeze is found and freed
    assert out["threshold"][0] == out["young"] > 700
