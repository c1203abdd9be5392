"""`python -m bench live-replay --trace FILE`: a trace slice replayed live, reactive against a predictive policy,
and the simulator checked against both.

For one canonical trace CSV (`python -m bench.traces convert`), the slice `--start-h` .. `--start-h + --hours`
trace hours (shifted to start at 0 and written as its own canonical CSV beside the results), this:

1. plans the replay (`lorafn.replay.plan_replay`: every adapter key its own adapter, `--name-prefix`, ranks from
   `lorafn.replay.RANK_CYCLE` by popularity) and sizes the memory so that the slice's adapters do not all fit:
   each worker's device pool (LORAFN_ENGINE__ADAPTER_POOL_BYTES) is `--device-fraction` of the pool bytes of
   all the slice's adapters (at least the largest one), its host cache (LORAFN_HOST_CACHE__DISK_BYTES and
   __RAM_BYTES, both the same budget: RAM is a copy of part of the disk level) `--host-fraction` of their
   blob bytes;
2. starts the local stack (`lorafn up --auto-ports --workers N --env ...` as a child process, its state in a temporary
   directory; the default SmolLM2 backbone, or `--tiny`: the tiny random one) and pushes the adapters, then
   stops it, so that neither measured run pays for (or profits from) the pushes;
3. reactive run: starts the stack again on the same state (the adapters are in its object store; the
   workers' host caches, which `lorafn up` keeps in the state directory, are deleted first, so that they
   and the device pools start empty) with LORAFN_STAGING__PREDICTOR=none, sends one call of the
   bare backbone (warm-up), runs `lorafn replay SLICE --speed X --max-tokens-cap C --name-prefix P` (which
   reuses the pushed adapters) and stops the stack;
4. calibrates the simulator's `CostModel` on that run (`calibrate`: the step time from the device hits'
   time between tokens, prefill from their TTFT, the host -> device and object -> host load lines from the
   load times the calls reported per tier, fitted against rank) and writes it (`--cost-out`, JSON of
   CostModel fields) for `python -m bench simulate --cost`;
5. simulates the compressed slice (`sim_rows`: trace time / speed, output tokens capped like the replay's)
   with the same workers, budgets, staging interval and keep-alive, for `none`, `ewma` and `fallback`, and
   picks the predictive policy with the fewest simulated cold starts (then the lower mean TTFT), unless
   `--predictor` names one;
6. predictive run: as 3 with LORAFN_STAGING__PREDICTOR set to it (`--predictive-first --predictor P`: before
   the reactive run, so that the order's share of a difference can be told);
7. writes `bench/results/live_replay.json` and `.md`: live against simulated cold starts, host loads, device
   hits and mean TTFT for both policies, each ratio (simulated / live) and whether it is within `--tolerance`
   (15%), and the predictive policy against reactive, live and simulated, side by side; beside them how fast
   each live run's steps were (the machine is shared, and a run's speed moves its TTFT) and the predictive run
   simulated again with a calibration fitted on that run itself.

Time is compressed by `--speed`: the staging interval is `max(1, 60 / speed)` s and the keep-alive
`1800 / speed` s (the defaults, 60 s and 30 min, in trace time), in the live stack and the simulator alike.

Matching the simulator to the stack: the simulator sizes an adapter by its rank as if it adapted all seven
projections of SmolLM2-135M in bf16 (`bench.simulate.adapter_bytes`); the replay's adapters adapt q_proj and
v_proj. Both scale with rank, so each budget is given to the simulator multiplied by (simulated bytes per
rank) / (live bytes per rank) of its tier (pool bytes for the device, blob bytes for the host cache), which
keeps which adapters fit where, and the calibrated load bandwidths are in the simulator's bytes too. The
simulated stager is the one the scheduler service builds from the same settings (`scheduler.service.
staging_policies`), except that a fallback's LSTM trains inline (deterministic) rather than in a thread.

The pure parts (`scaled_staging`, `slice_rows`, `sim_rows`, `budgets`, `calibrate`, `compare`, `markdown`)
take plain data; `run` does the I/O.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import simulate as sim
from bench.launcher import Stack, running_stack
from bench.traces import TraceRequest, load_trace
from scheduler.settings import StagingSettings

POLICIES = ("ewma", "fallback")  # the predictive policies the simulator chooses between
DEFAULT_TOLERANCE = 0.15
DEFAULT_SPEED = 60.0
DEFAULT_STAGING = StagingSettings()  # its interval and keep-alive are in trace seconds here
FIGURES = ("cold_starts", "host_loads", "device_hits", "ttft_mean_ms")
SPEED_KEYS = ("gap_ms_median", "in_flight_median", "device_hit_ttft_ms_median")  # how fast a run's steps were
TARGETS = ("cold_starts", "ttft_mean_ms")  # the figures the simulator must match within the tolerance


# -- pure parts -----------------------------------------------------------------------------------------------------


def scaled_staging(speed: float) -> tuple[float, float]:
    """(staging interval s, keep-alive s) of a replay at `speed`: the defaults in trace time, the interval at
    least 1 s."""
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"speed must be a number > 0 (got {speed})")
    return max(1.0, DEFAULT_STAGING.interval_s / speed), DEFAULT_STAGING.keep_alive_s / speed


def slice_rows(rows: Sequence[TraceRequest], start_h: float, hours: float) -> list[TraceRequest]:
    """The rows from `start_h` trace hours after the first row, for `hours`, their times shifted to start at 0."""
    if hours <= 0 or start_h < 0:
        raise ValueError(f"a slice needs start >= 0 and hours > 0 (got {start_h}, {hours})")
    if not rows:
        raise ValueError("the trace has no requests")
    lo = rows[0].at_s + start_h * 3600
    chosen = [r for r in rows if lo <= r.at_s < lo + hours * 3600]
    if not chosen:
        raise ValueError(f"no requests between trace hours {start_h:g} and {start_h + hours:g}")
    t0 = chosen[0].at_s
    return [TraceRequest(r.at_s - t0, r.tenant, r.adapter, r.prompt_tokens, r.output_tokens) for r in chosen]


def write_canonical(rows: Sequence[TraceRequest], path: Path) -> None:
    """A canonical trace CSV (bench.traces) of `rows`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "adapter", "prompt_tokens", "output_tokens"])
        for r in rows:
            out.writerow([f"{r.at_s:g}", r.key, r.prompt_tokens, r.output_tokens])


def sim_rows(rows: Sequence[TraceRequest], speed: float, max_tokens_cap: int) -> list[TraceRequest]:
    """The slice as the replay sends it: times divided by `speed`, output tokens capped."""
    first = rows[0].at_s if rows else 0.0
    return [TraceRequest((r.at_s - first) / speed, r.tenant, r.adapter, r.prompt_tokens,
                         min(r.output_tokens, max_tokens_cap)) for r in rows]


def pool_bytes_per_rank(module_shapes: Mapping[str, tuple[int, int]], modules: Sequence[str], layers: int,
                        dtype_bytes: int) -> int:
    """Device-pool bytes per unit of rank of an adapter on `modules` (A [r, in] and B.T [r, out] per layer)."""
    return layers * sum(sum(module_shapes[m]) for m in modules) * dtype_bytes


@dataclass(frozen=True)
class Budgets:
    """Per-worker memory, live bytes and the simulator's (module docstring: the simulator's bytes per rank)."""

    device_bytes: int
    host_bytes: int
    sim_device_bytes: int
    sim_host_bytes: int
    adapters_pool_bytes: int  # all the slice's adapters, pool bytes
    adapters_blob_bytes: int  # all the slice's adapters, blob bytes


def budgets(ranks: Sequence[int], *, pool_per_rank: float, blob_per_rank: float, device_fraction: float,
            host_fraction: float) -> Budgets:
    """Memory that holds `device_fraction` of the adapters' pool bytes (at least the largest adapter) and
    `host_fraction` of their blob bytes, and the same budgets in the simulator's bytes."""
    if not ranks:
        raise ValueError("no adapters")
    for name, value in (("device fraction", device_fraction), ("host fraction", host_fraction)):
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1] (got {value})")
    total_rank = sum(ranks)
    pool_total, blob_total = round(total_rank * pool_per_rank), round(total_rank * blob_per_rank)
    device = max(round(device_fraction * pool_total), math.ceil(max(ranks) * pool_per_rank))
    host = max(round(host_fraction * blob_total), math.ceil(max(ranks) * blob_per_rank))
    per_rank = sim.adapter_bytes(1)
    return Budgets(device, host, math.ceil(device * per_rank / pool_per_rank), math.ceil(host * per_rank / blob_per_rank),
                   pool_total, blob_total)


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points; a flat line at the mean when the x
    do not vary or the slope comes out negative (a load does not get faster with more bytes)."""
    ys = [y for _, y in points]
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return statistics.fmean(ys), 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return my, 0.0
    intercept = my - slope * mx
    if intercept < 0:  # through the origin instead (flat at 0 when even that slopes down)
        return 0.0, max(0.0, sum(x * y for x, y in points) / sum(x * x for x in xs))
    return intercept, slope


def in_flight(spans: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """The mean number of `spans` (start, end) that overlap [start, end] over it (the instant's count when
    end <= start)."""
    if end <= start:
        return float(sum(1 for a, b in spans if a <= start <= b))
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans) / (end - start)


NO_BYTE_COST = 1e15  # bytes/s standing for "no per-byte cost measured"


def calibrate(calls: Sequence[Mapping[str, Any]], *, base: sim.CostModel | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """CostModel fields fitted to a replay's calls (`lorafn.replay.CallRecord`s as dicts), and how:

    - step: the device hits' time between tokens ((latency - TTFT) / (tokens - 1)) is one decode step with
      the calls then in flight: a line through (mean calls in flight over that time, gap) gives
      `step_fixed_ms` and `decode_ms_per_seq` (the simulator's step at that many decodes);
    - prefill: their TTFT less one and a half of that step at the calls in flight before their first token (a
      call waits for the step under way, half of one on average, then its own step prefills it), over their
      prompt tokens, the median: `prefill_ms_per_token` (so it carries the gateway -> scheduler -> worker path
      as well, which the simulator has no term for);
    - host -> device: the host loads' load_ms against rank, a line: `host_latency_ms` and, per rank,
      `host_bytes_per_s` in the simulator's bytes (`bench.simulate.adapter_bytes`);
    - object -> host: the cold starts' load_ms less that host line, against rank: `object_latency_ms`,
      `object_bytes_per_s`.
    A tier without calls keeps `base`'s figures."""
    base = base or sim.CostModel()
    per_rank = sim.adapter_bytes(1)
    ok = [c for c in calls if c.get("status") == "ok" and c.get("sent_ms") is not None
          and c.get("latency_ms") is not None]
    spans = [(c["sent_ms"], c["sent_ms"] + c["latency_ms"]) for c in ok]
    hits = [c for c in ok if c.get("tier") == "device" and c.get("ttft_ms") is not None]
    gaps = [(in_flight(spans, c["sent_ms"] + c["ttft_ms"], c["sent_ms"] + c["latency_ms"]),
             (c["latency_ms"] - c["ttft_ms"]) / (c["completion_tokens"] - 1))
            for c in hits if (c.get("completion_tokens") or 0) > 1]
    fields_: dict[str, float] = {}
    how: dict[str, Any] = {"device_hits": len(hits), "token_gaps": len(gaps)}
    fixed, per_seq = base.step_fixed_ms, base.decode_ms_per_seq
    if gaps:
        fixed, per_seq = _line(gaps)
        fixed = max(1.0, fixed)
        fields_ |= {"step_fixed_ms": fixed, "decode_ms_per_seq": per_seq}
        how |= {"gap_ms_median": statistics.median(g for _, g in gaps),
                "in_flight_median": statistics.median(n for n, _ in gaps)}
    if hits:
        prefill = [max(0.0, c["ttft_ms"] - 1.5 * (fixed + per_seq * in_flight(spans, c["sent_ms"],
                                                                              c["sent_ms"] + c["ttft_ms"])))
                   / max(c["prompt_tokens"], 1) for c in hits]
        fields_["prefill_ms_per_token"] = statistics.median(prefill)
        how |= {"device_hit_ttft_ms_median": statistics.median(c["ttft_ms"] for c in hits),
                "prompt_tokens_median": statistics.median(c["prompt_tokens"] for c in hits)}
    host = [(float(c["rank"]), float(c["load_ms"])) for c in calls if c.get("tier") == "host" and c.get("load_ms")]
    host_line = (base.host_latency_ms, 1000 * per_rank / base.host_bytes_per_s)
    if host:
        host_line = _line(host)
        fields_["host_latency_ms"] = host_line[0]
        fields_["host_bytes_per_s"] = 1000 * per_rank / host_line[1] if host_line[1] > 0 else NO_BYTE_COST
    how["host_loads"] = len(host)
    how["host_ms"] = {"at_rank_0": host_line[0], "per_rank": host_line[1]}
    cold = [(float(c["rank"]), float(c["load_ms"]) - (host_line[0] + host_line[1] * c["rank"]))
            for c in calls if c.get("tier") == "object" and c.get("load_ms")]
    if cold:
        line = _line(cold)
        fields_["object_latency_ms"] = max(0.0, line[0])
        fields_["object_bytes_per_s"] = 1000 * per_rank / line[1] if line[1] > 0 else NO_BYTE_COST
        how["object_ms"] = {"at_rank_0": line[0], "per_rank": line[1]}
    how["cold_starts"] = len(cold)
    return fields_, how


def calibration_note(fitted: Mapping[str, float], how: Mapping[str, Any], cost: sim.CostModel) -> str:
    """How `calibrate` came to its figures, in a sentence."""
    hs, oms = how.get("host_ms", {}), how.get("object_ms", {})
    parts = []
    if "step_fixed_ms" in fitted:
        parts.append(f"step {cost.step_fixed_ms:.1f} ms + {cost.decode_ms_per_seq:.1f} ms per call decoding (the "
                     f"time between tokens of {how['token_gaps']} device hits against the calls in flight: median "
                     f"{how['gap_ms_median']:.0f} ms at {how['in_flight_median']:.1f} in flight)")
    if "prefill_ms_per_token" in fitted:
        parts.append(f"prefill {cost.prefill_ms_per_token:.2f} ms/token (their TTFT, median "
                     f"{how['device_hit_ttft_ms_median']:.0f} ms, less 1.5 steps, over their prompt tokens, median "
                     f"{how['prompt_tokens_median']:g})")
    parts.append(f"host -> device {hs['at_rank_0']:.0f} ms + {hs['per_rank']:.2f} ms per rank ("
                 + (f"{how['host_loads']} host loads)" if how["host_loads"] else "the default: no host loads)"))
    if oms:
        parts.append(f"object -> host {cost.object_latency_ms:.0f} ms + {oms['per_rank']:.2f} ms per rank (the "
                     f"{how['cold_starts']} cold starts' load times less the host line"
                     + (f", whose intercept, {oms['at_rank_0']:.0f} ms, is taken as 0)" if oms["at_rank_0"] < 0 else ")"))
    else:
        parts.append("object -> host: the default (no cold starts)")
    return ", ".join(parts) + "."


def live_figures(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """The compared figures of a replay report's summary."""
    return {"cold_starts": summary["cold_starts"], "host_loads": summary["host_loads"],
            "device_hits": summary["device_hits"], "ttft_mean_ms": summary["ttft_ms"]["mean"],
            "calls": summary["calls"], "failed": summary["failed"]}


def sim_figures(report: sim.SimReport) -> dict[str, float | None]:
    """The compared figures of a simulation."""
    return {"cold_starts": report.cold_starts, "host_loads": report.host_loads, "device_hits": report.device_hits,
            "ttft_mean_ms": 1000 * report.ttft_s["mean"], "calls": report.requests,
            "failed": sum(report.failed.values()) + report.unfinished}


@dataclass(frozen=True)
class Row:
    policy: str
    figure: str
    live: float | None
    simulated: float | None
    ratio: float | None  # simulated / live
    within: bool | None  # |ratio - 1| <= tolerance; None: no ratio
    target: bool  # one of TARGETS


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0 (a ratio of 0 to 0 is 1)."""
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else None
    return a / b


def compare(live: Mapping[str, Mapping[str, float | None]], simulated: Mapping[str, Mapping[str, float | None]],
            tolerance: float = DEFAULT_TOLERANCE) -> list[Row]:
    """For each policy (live's order) and figure (`FIGURES`): live, simulated, their ratio and whether it is
    within `tolerance` of 1 (not when live is 0 and simulated is not; None when either is missing)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1) (got {tolerance})")
    rows = []
    for policy, figures in live.items():
        if policy not in simulated:
            raise ValueError(f"no simulated figures for policy {policy!r}")
        for name in FIGURES:
            lv, sv = figures.get(name), simulated[policy].get(name)
            r = ratio(sv, lv)
            within = None if lv is None or sv is None else r is not None and abs(r - 1) <= tolerance + 1e-12
            rows.append(Row(policy, name, lv, sv, r, within, name in TARGETS))
    return rows


def direction(figures: Mapping[str, Mapping[str, float | None]], policy: str, baseline: str = "none",
              ) -> dict[str, float | None]:
    """`policy`'s figure / the baseline's, for each of FIGURES."""
    return {name: ratio(figures[policy].get(name), figures[baseline].get(name)) for name in FIGURES}


LABELS = {"cold_starts": "cold starts", "host_loads": "host loads", "device_hits": "device hits",
          "ttft_mean_ms": "mean TTFT ms"}


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def comparison_table(rows: Sequence[Row], tolerance: float) -> list[str]:
    lines = ["| policy | figure | live | simulated | simulated / live | within "
             f"{tolerance:.0%} |", "|---|---|---|---|---|---|"]
    for r in rows:
        digits = 1 if r.figure == "ttft_mean_ms" else 0
        verdict = "-" if r.within is None else ("yes" if r.within else "**no**")
        label = LABELS[r.figure] + (" (target)" if r.target else "")
        lines.append(f"| {r.policy} | {label} | {_num(r.live, digits)} | {_num(r.simulated, digits)} | "
                     f"{_num(r.ratio, 2)} | {verdict} |")
    return lines


def direction_table(live: Mapping[str, Mapping[str, float | None]], simulated: Mapping[str, Mapping[str, float | None]],
                    policy: str) -> list[str]:
    lines = [f"| figure | live none | live {policy} | live {policy} / none | simulated none | simulated {policy} | "
             f"simulated {policy} / none |", "|---|---|---|---|---|---|---|"]
    lr, sr = direction(live, policy), direction(simulated, policy)
    for name in FIGURES:
        digits = 1 if name == "ttft_mean_ms" else 0
        lines.append(f"| {LABELS[name]} | {_num(live['none'].get(name), digits)} | "
                     f"{_num(live[policy].get(name), digits)} | {_num(lr[name], 2)} | "
                     f"{_num(simulated['none'].get(name), digits)} | {_num(simulated[policy].get(name), digits)} | "
                     f"{_num(sr[name], 2)} |")
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    """The results page of a run (`run`'s result)."""
    s, b, policy = result["setup"], result["budgets"], result["policy"]
    tol = result["tolerance"]
    rows = [Row(**r) for r in result["rows"]]
    targets = [r for r in rows if r.target]
    met = sum(1 for r in targets if r.within)
    choice = result["choice"]
    lines = [
        "# Live replay against the simulator",
        "",
        f"Measured {result['measured_at']} with `python -m bench live-replay` ({result['wall_s'] / 60:.1f} min).",
        "",
        f"Slice: {s['trace']}, trace hours {s['start_h']:g} to {s['start_h'] + s['hours']:g}: {s['calls']:,} calls "
        f"to {s['adapters']} adapters (ranks {s['ranks']}), replayed at speed {s['speed']:g} "
        f"({s['replay_s']:,.0f} s), max_tokens capped at {s['max_tokens_cap']}; backbone {s['backbone']}; "
        f"{s['workers']} worker(s), live runs {s.get('order', 'none first')}. Staging interval {s['interval_s']:g} s, keep-alive {s['keep_alive_s']:g} s "
        f"(60 s and 30 min of trace time).",
        "",
        f"Memory per worker: device pool {b['device_bytes'] / 1e6:.1f} MB, {b['device_bytes'] / b['adapters_pool_bytes']:.0%} "
        f"of the slice's adapters ({b['adapters_pool_bytes'] / 1e6:.1f} MB in the pool); host cache "
        f"{b['host_bytes'] / 1e6:.1f} MB, {b['host_bytes'] / b['adapters_blob_bytes']:.0%} of their blobs "
        f"({b['adapters_blob_bytes'] / 1e6:.1f} MB). In the simulator's bytes: {b['sim_device_bytes'] / 1e6:.1f} MB "
        f"and {b['sim_host_bytes'] / 1e6:.1f} MB (bench/live_replay.py says why).",
        "",
        f"Predictive policy: **{policy}** ({choice['how']}; simulated cold starts "
        + ", ".join(f"{k} {v['cold_starts']}" for k, v in choice["simulated"].items())
        + ", mean TTFT " + ", ".join(f"{k} {v['ttft_mean_ms']:.0f} ms" for k, v in choice["simulated"].items())
        + ").",
        "",
        f"## Predictive ({policy}) against reactive (none)",
        "",
        *direction_table(result["live"], result["simulated"], policy),
        "",
        f"## The simulator against the live runs ({met} of {len(targets)} targets within {tol:.0%})",
        "",
        *comparison_table(rows, tol),
        "",
        f"Simulated with the calibration {result['cost_file']} (`python -m bench simulate --cost`), fitted on the "
        "live reactive run: " + result["calibration_note"],
        "",
    ]
    speed = result.get("run_speed")
    if speed:
        lines += ["How fast the machine was in each live run (the 2 cores are shared): " + "; ".join(
            f"{p}: device hits' median time between tokens {v.get('gap_ms_median', 0):.0f} ms at "
            f"{v.get('in_flight_median', 0):.1f} calls in flight, their median TTFT "
            f"{v.get('device_hit_ttft_ms_median', 0):.0f} ms" for p, v in speed.items()) + "."]
    own = result.get("own_calibration")
    if own:
        live_ttft = result["live"][own["policy"]]["ttft_mean_ms"]
        lines += ["", f"Simulated with a calibration fitted on the live {own['policy']} run itself instead, "
                  f"{own['policy']} gives {own['simulated']['cold_starts']} cold starts and a mean TTFT of "
                  f"{own['simulated']['ttft_mean_ms']:.1f} ms ({_num(ratio(own['simulated']['ttft_mean_ms'], live_ttft), 2)}"
                  " of live).", ""]
    for name, live in result["live"].items():
        lines.append(f"Live {name}: {live['calls']:,} calls, {live['failed']:,} failed"
                     + (f" ({result['live_statuses'][name]})" if live["failed"] else "") + ".")
    for note in result.get("notes") or ():
        lines += ["", note]
    return "\n".join(lines) + "\n"


# -- the stack ------------------------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """`path` relative to the project's root when it is inside it, else its name."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path.name


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _replay(stack: Stack, slice_csv: Path, report: Path, *, speed: float, cap: int, prefix: str,
            backbone: Path | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "lorafn", "replay", str(slice_csv), "--speed", f"{speed:g}", "--max-tokens-cap",
               str(cap), "--name-prefix", prefix, "--gateway", stack.gateway, "--api-key", stack.api_key,
               "--report", str(report)]
    if backbone is not None:
        command += ["--backbone", str(backbone)]
    _log("$ " + " ".join(command[1:]).replace(stack.api_key, "KEY"))
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if not report.is_file():
        raise RuntimeError(f"lorafn replay wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")
    body: dict[str, Any] = json.loads(report.read_text())
    return body


# -- the simulation ---------------------------------------------------------------------------------------------------


def simulate_policy(rows: Sequence[TraceRequest], policy: str, *, workers: int, ranks: Mapping[str, int],
                    budgets_: Budgets, interval_s: float, keep_alive_s: float, cost: sim.CostModel,
                    seed: int = 0) -> sim.SimReport:
    """The compressed slice through the simulator with the live stack's policies and settings."""
    from scheduler.service import build_router, core_config
    from scheduler.settings import PlacementSettings
    from scheduler.staging import staging_policies
    from workers.settings import HostCacheSettings

    staging = StagingSettings(predictor=policy, interval_s=interval_s, keep_alive_s=keep_alive_s)
    placement = PlacementSettings()
    predictor, stager = staging_policies(staging, train="inline", seed=seed)  # as the service, the LSTM inline
    worker = sim.WorkerConfig(device_pool_bytes=budgets_.sim_device_bytes, host_cache_bytes=budgets_.sim_host_bytes)
    try:
        return sim.simulate(rows, workers=[worker] * workers, cost=cost, seed=seed,
                            router=build_router(placement), core_config=core_config(placement, staging),
                            host_eviction=sim.host_eviction_factory(HostCacheSettings().eviction, cost),
                            predictor=predictor, stager=stager, adapter_ranks=ranks)
    finally:
        close = getattr(predictor, "close", None)
        if close is not None:
            close()


# -- the command ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.report import RESULTS_DIR
    from lorafn.replay import ADAPTER_MODULES, plan_replay
    from storage.backbone import BackboneSpec
    from workers.adapter_pool import adapter_pool_dtype

    started = time.monotonic()
    interval_s, keep_alive_s = scaled_staging(args.speed)
    results = args.results_dir or RESULTS_DIR
    rows = slice_rows(load_trace(args.trace), args.start_h, args.hours)
    name = f"live_replay_{args.trace.stem}_h{args.start_h:g}-{args.start_h + args.hours:g}"
    with tempfile.TemporaryDirectory(prefix="lorafn-live-replay-") as tmp:
        root = Path(tmp)
        slice_csv = root / f"{name}.csv"
        write_canonical(rows, slice_csv)
        backbone: Path | None = None
        if args.tiny:
            from workers.tiny import write_tiny_backbone

            backbone = write_tiny_backbone(root / "backbone")
        from lorafn.replay import _backbone_spec

        spec: BackboneSpec = _backbone_spec(backbone)
        plan = plan_replay(rows, speed=args.speed, max_tokens_cap=args.max_tokens_cap, name_prefix=args.name_prefix)
        key_rank = {k: a.rank for a in plan.adapters for k in a.keys}
        dtype_bytes = adapter_pool_dtype("auto", "cpu").itemsize
        pool_per_rank = pool_bytes_per_rank(spec.module_shapes(), ADAPTER_MODULES, spec.num_layers, dtype_bytes)
        state = root / "state"
        _log(f"slice: {len(rows):,} calls, {len(plan.adapters)} adapters, {plan.calls[-1].at_s:.0f} s at speed "
             f"{args.speed:g}; interval {interval_s:g} s, keep-alive {keep_alive_s:g} s")

        # 2. push the adapters on a stack of their own
        import asyncio

        import httpx

        from lorafn.replay import provision

        with running_stack(state, workers=args.workers, backbone=backbone, env={}) as stack:
            async def push() -> list[dict[str, Any]]:
                async with httpx.AsyncClient(base_url=stack.gateway, timeout=120,
                                             headers={"Authorization": f"Bearer {stack.api_key}"}) as client:
                    await provision(client, plan, spec, root / "adapters", _log)
                    listed: list[dict[str, Any]] = (await client.get("/v1/adapters")).json()["data"]
                    return listed

            listed = asyncio.run(push())
        blob = {a["name"]: a["bytes"] for a in listed if a.get("bytes")}
        per_rank_blob = [blob[a.name] / a.rank for a in plan.adapters if a.name in blob]
        blob_per_rank = statistics.fmean(per_rank_blob) if per_rank_blob else pool_per_rank * 2
        b = budgets([a.rank for a in plan.adapters], pool_per_rank=pool_per_rank, blob_per_rank=blob_per_rank,
                    device_fraction=args.device_fraction, host_fraction=args.host_fraction)
        _log(f"budgets per worker: device {b.device_bytes / 1e6:.1f} MB of {b.adapters_pool_bytes / 1e6:.1f}, host "
             f"{b.host_bytes / 1e6:.1f} MB of {b.adapters_blob_bytes / 1e6:.1f}")
        env = {"LORAFN_ENGINE__ADAPTER_POOL_BYTES": str(b.device_bytes),
               "LORAFN_HOST_CACHE__DISK_BYTES": str(b.host_bytes), "LORAFN_HOST_CACHE__RAM_BYTES": str(b.host_bytes),
               "LORAFN_STAGING__INTERVAL_S": f"{interval_s:g}", "LORAFN_STAGING__KEEP_ALIVE_S": f"{keep_alive_s:g}"}

        def live(policy: str) -> dict[str, Any]:
            # `lorafn up` keeps each worker's host cache in the state directory across restarts: cold means none
            shutil.rmtree(state / "host-cache", ignore_errors=True)
            with running_stack(state, workers=args.workers, backbone=backbone,
                               env=env | {"LORAFN_STAGING__PREDICTOR": policy}) as stack:
                return _replay(stack, slice_csv, root / f"replay_{policy}.json", speed=args.speed,
                               cap=args.max_tokens_cap, prefix=args.name_prefix, backbone=backbone)

        first = live(args.predictor) if args.predictive_first else None  # the order's share of a difference
        reports: dict[str, dict[str, Any]] = {}
        reports["none"] = live("none")
        _log(f"reactive: {json.dumps(live_figures(reports['none']['summary']))}")

        # 4. calibrate on the reactive run
        fitted, how = calibrate(reports["none"]["calls"])
        cost = sim.CostModel(**(asdict(sim.CostModel()) | fitted))
        cost_file = args.cost_out
        cost_file.parent.mkdir(parents=True, exist_ok=True)
        cost_file.write_text(json.dumps(asdict(cost), indent=2) + "\n")
        _log(f"calibration: {json.dumps(fitted)} -> {cost_file}")

        # 5. simulate, choose the predictive policy
        srows = sim_rows(rows, args.speed, args.max_tokens_cap)
        simulated: dict[str, dict[str, Any]] = {}
        for policy in ("none", *POLICIES):
            simulated[policy] = sim_figures(simulate_policy(srows, policy, workers=args.workers, ranks=key_rank,
                                                            budgets_=b, interval_s=interval_s,
                                                            keep_alive_s=keep_alive_s, cost=cost))
            _log(f"simulated {policy}: {json.dumps(simulated[policy])}")
        if args.predictor:
            policy, how_chosen = args.predictor, "--predictor"
            if policy not in simulated:
                simulated[policy] = sim_figures(simulate_policy(srows, policy, workers=args.workers, ranks=key_rank,
                                                                budgets_=b, interval_s=interval_s,
                                                                keep_alive_s=keep_alive_s, cost=cost))
        else:
            policy = min(POLICIES, key=lambda p: (simulated[p]["cold_starts"], simulated[p]["ttft_mean_ms"]))
            how_chosen = "the simulator's best on this slice: fewest cold starts, then lower mean TTFT"
        _log(f"predictive policy: {policy}")
        reports[policy] = first if first is not None else live(policy)
        _log(f"{policy}: {json.dumps(live_figures(reports[policy]['summary']))}")
        # the predictive run's own calibration: how much of a difference is the machine's speed in that run
        own_fitted, own_how = calibrate(reports[policy]["calls"])
        own_cost = sim.CostModel(**(asdict(sim.CostModel()) | own_fitted))
        own = sim_figures(simulate_policy(srows, policy, workers=args.workers, ranks=key_rank, budgets_=b,
                                          interval_s=interval_s, keep_alive_s=keep_alive_s, cost=own_cost))
        _log(f"simulated {policy}, calibrated on its own run: {json.dumps(own)}")
        if args.replay_dir is not None:
            args.replay_dir.mkdir(parents=True, exist_ok=True)
            for p, r in reports.items():
                (args.replay_dir / f"replay_{p}.json").write_text(json.dumps(r, indent=2) + "\n")

    live_ = {p: live_figures(r["summary"]) for p, r in reports.items()}
    sims = {p: simulated[p] for p in reports}
    table = compare(live_, sims, args.tolerance)
    note = calibration_note(fitted, how, cost)
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.monotonic() - started,
        "setup": {"trace": args.trace.name, "start_h": args.start_h, "hours": args.hours, "calls": len(rows),
                  "adapters": len(plan.adapters),
                  "ranks": ", ".join(f"{n} x {r}" for r, n in sorted(
                      {r: sum(1 for a in plan.adapters if a.rank == r) for r in {a.rank for a in plan.adapters}}.items())),
                  "speed": args.speed, "replay_s": plan.calls[-1].at_s, "max_tokens_cap": args.max_tokens_cap,
                  "backbone": spec.name + (" (tiny random)" if args.tiny else ""), "workers": args.workers,
                  "interval_s": interval_s, "keep_alive_s": keep_alive_s, "name_prefix": args.name_prefix,
                  "device_fraction": args.device_fraction, "host_fraction": args.host_fraction,
                  "order": f"{policy} first" if args.predictive_first else "none first"},
        "budgets": asdict(b),
        "policy": policy,
        "choice": {"how": how_chosen, "simulated": {p: simulated[p] for p in POLICIES if p in simulated}},
        "tolerance": args.tolerance,
        "live": live_,
        "simulated": sims,
        "rows": [asdict(r) for r in table],
        "live_statuses": {p: ", ".join(f"{k} {v}" for k, v in r["summary"]["statuses"].items())
                          for p, r in reports.items()},
        "cost_file": _shown(cost_file),
        "cost": asdict(cost),
        "calibration": {"fitted": fitted, "how": how},
        "calibration_note": note,
        "live_summaries": {p: r["summary"] for p, r in reports.items()},
        "run_speed": {p: {k: v for k, v in h.items() if k in SPEED_KEYS}
                      for p, h in (("none", how), (policy, own_how))},
        "own_calibration": {"policy": policy, "fitted": own_fitted, "simulated": own},
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "live_replay.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "live_replay.md").write_text(markdown(result))
    _log(f"wrote {results / 'live_replay.md'} and .json")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, required=True, help="canonical trace CSV (python -m bench.traces convert)")
    parser.add_argument("--start-h", type=float, default=0.0, help="the slice starts this many trace hours in")
    parser.add_argument("--hours", type=float, default=4.0, help="trace hours in the slice (default 4)")
    parser.add_argument("--speed", type=float, default=DEFAULT_SPEED, help="time compression (default 60)")
    parser.add_argument("--max-tokens-cap", type=int, default=16, help="cap on a call's max_tokens (default 16)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--tiny", action="store_true", help="serve the tiny random backbone (default: SmolLM2-135M)")
    parser.add_argument("--device-fraction", type=float, default=0.25,
                        help="device pool per worker, a fraction of the slice's adapters' pool bytes (default 0.25)")
    parser.add_argument("--host-fraction", type=float, default=0.5,
                        help="host cache per worker, a fraction of their blob bytes (default 0.5)")
    parser.add_argument("--predictor", choices=("ewma", "fallback", "last_value", "histogram", "lstm"),
                        help="the predictive policy (default: ewma or fallback, the simulator's best on the slice)")
    parser.add_argument("--name-prefix", default="live", help="adapter names PREFIX-000, ... (default live)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="simulated / live within this")
    parser.add_argument("--cost-out", type=Path, default=Path(__file__).parent / "costs" / "smollm2_cpu.json",
                        help="where the calibration goes (default bench/costs/smollm2_cpu.json)")
    parser.add_argument("--results-dir", type=Path, help="where the results go (default bench/results)")
    parser.add_argument("--predictive-first", action="store_true",
                        help="run the predictive policy (--predictor) live before the reactive one")
    parser.add_argument("--replay-dir", type=Path, help="keep the live replays' reports (every call) here")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench live-replay", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.predictive_first and not args.predictor:
        parser.error("--predictive-first needs --predictor (the simulator's choice comes after the reactive run)")
    if args.workers < 1 or args.max_tokens_cap < 1:
        parser.error("--workers and --max-tokens-cap must be at least 1")
    try:
        scaled_staging(args.speed)
    except ValueError as e:
        parser.error(str(e))
    return run(args)
