"""`make demo` end to end: `python -m lorafn.demo` as a subprocess, from stack start to stop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lorafn.bootstrap import DEV_TENANT
from lorafn.demo import DEMO_ADAPTERS, ROUTES

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420.0  # the demo takes 1 to 3 minutes


def test_demo_invokes_every_function_over_every_route_and_stops_everything(processes_mentioning) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-m", "lorafn.demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the demo stops every process it started before it exits
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{out[-6000:]}\n{err[-3000:]}"
    for adapter in DEMO_ADAPTERS:
        for route in ROUTES:
            line = rf"^{re.escape(f'{DEV_TENANT}/{adapter.name}')}\s+{re.escape(route)}\s+ok\s+tier .*\s(['\"]).+\1$"
            assert re.search(line, out, re.MULTILINE), f"no output of {adapter.name} via {route}:\n{out[-6000:]}"
    assert "stopped: every process the demo started has exited" in out
    state = re.search(r"^state and logs: (\S+)", out, re.MULTILINE)
    assert state is not None
    assert processes_mentioning(state.group(1)) == []
