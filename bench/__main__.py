"""`python -m bench [NAME ...]`: run the named benchmarks (all by default).
`python -m bench simulate --trace FILE ...`: simulate a trace through the scheduler core (`bench.simulate`).
`python -m bench scheduling [--quick]`: pre-staging policies compared on the shared traces (`bench.scheduling`).
`python -m bench live-replay --trace FILE ...`: a trace slice replayed live, checked against the simulator.
`python -m bench reliability [soak|chaos] --minutes M`: the soak and chaos runs with their audit (`bench.reliability`;
3 minutes each in the default run).
`python -m bench operating-points [--quick] [--slo S]`: one worker's decode tokens/s per rank class at the TTFT SLO,
and the scheduler's points file (`bench.operating_points`; its quick run in the default run).
`python -m bench placement [--quick]`: rank-aware placement against rank-blind routing in the simulator.
`python -m bench rank-burst`: a burst of rank-8 and rank-128 calls on the live stack, affinity against rank-aware.
`python -m bench durability [--quick]`: a JetStream publish of an invocation on 1 server and on 3 (R3), default sync
interval against `always` (`bench.durability`; its quick run in the default run).
`python -m bench forecast [--counts N ...]`: the scheduler's event loop at a staging boundary, the demand forecast
run on it against on the predictor thread (`bench.forecast`; in the default run)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from bench import durability, engine, forecast, invocation, operating_points, pool, reliability, stall

BENCHMARKS: dict[str, Callable[..., Any]] = {"pool": pool.run, "engine": engine.run, "invocation": invocation.run,
                                            "reliability": reliability.run, "stall": stall.run,
                                            "operating-points": operating_points.run, "durability": durability.run,
                                            "forecast": forecast.run}


def main() -> None:
    if sys.argv[1:2] == ["simulate"]:  # its own arguments; not one of the benchmarks run by default
        from bench import simulate

        simulate.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["live-replay"]:  # a trace slice live, reactive and predictive, against the simulator
        from bench import live_replay

        live_replay.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["placement"]:  # rank-aware against rank-blind routing (bench.placement)
        from bench import placement

        placement.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["rank-burst"]:  # the live burst, affinity against rank-aware routing (bench.rank_burst)
        from bench import rank_burst

        rank_burst.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["scheduling"]:  # pre-staging policies on the shared traces (bench.scheduling)
        from bench import scheduling

        scheduling.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["operating-points"]:  # its own arguments; bare `python -m bench` runs the quick one
        operating_points.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["forecast"] and sys.argv[2:]:  # its own arguments
        forecast.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["durability"] and sys.argv[2:]:  # its own arguments; bare `durability` runs the quick one
        durability.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["reliability"] and sys.argv[2:]:  # its own arguments; bare `reliability` runs the short pair
        reliability.main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    engine.add_arguments(parser)
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    options = {"engine": engine.options(args)}
    for name in args.names or list(BENCHMARKS):
        BENCHMARKS[name](**options.get(name, {}))


if __name__ == "__main__":
    main()
