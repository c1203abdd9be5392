"""Pre-staging in the scheduler core: interval boundaries, the predictor's observations, the stager's commands
and what the core records per interval. Pure: a scripted predictor (scores set by the test) and the real
`PredictiveStager`; `Driven` carries out the core's `Predict` commands inline, as the simulator does."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from protocol.messages import Tier
from scheduler.core import (
    Command,
    CoreConfig,
    Dispatch,
    Event,
    Evict,
    Fetch,
    InvocationArrived,
    InvocationFinished,
    Load,
    Predict,
    Predicted,
    ResidentReport,
    SchedulerCore,
    Tick,
    WorkerReport,
    predict,
)
from scheduler.policy import AdapterSpec
from scheduler.staging import PredictiveStager

MB = 1 << 20


class Scripted:
    """A predictor whose scores the test sets; it records what it observed."""

    name = "scripted"

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.scores: dict[str, float] = {}
        self.observed: list[tuple[float, dict[str, int]]] = []
        self.asked: list[tuple[float, set[str]]] = []

    def observe(self, end: float, counts: Mapping[str, int]) -> None:
        self.observed.append((end, dict(counts)))

    def predict(self, now: float, keys: Collection[str]) -> dict[str, float]:
        self.asked.append((now, set(keys)))
        return {k: self.scores.get(k, 0.0) for k in keys}


def spec(name: str, rank: int = 8) -> AdapterSpec:
    return AdapterSpec("t", name, f"v-{name}", rank, 4 * MB)


def report(worker_id: str, at: float, *, device: tuple[str, ...] = (), host: tuple[str, ...] = (),
           in_use: tuple[str, ...] = ()) -> WorkerReport:
    resident = tuple(ResidentReport(f"v-{a}", Tier.device, 8, 4 * MB, 0, int(a in in_use)) for a in device)
    resident += tuple(ResidentReport(f"v-{a}", Tier.host, 8, 4 * MB) for a in host)
    return WorkerReport(at=at, worker_id=worker_id, total_pages=100, free_pages=100, max_rank=64,
                        device_bytes=64 * MB, host_bytes=256 * MB, resident=resident)


def call(name: str, at: float, n: int) -> InvocationArrived:
    return InvocationArrived(at=at, invocation_id=f"{name}-{n}", adapter=spec(name), prompt_tokens=8, max_tokens=8)


class Driven:
    """A core whose `Predict` commands are answered at once by `predictor` (the simulator's way): `handle`
    returns the other commands, a prediction's staging commands in its place."""

    def __init__(self, core: SchedulerCore, predictor: Scripted) -> None:
        self.core, self.predictor = core, predictor

    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        for c in self.core.handle(event):
            if isinstance(c, Predict):
                out += self.handle(predict(self.predictor, c, event.at))  # type: ignore[arg-type]
            else:
                out.append(c)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)


def core_with(predictor: Scripted, stager: PredictiveStager | None = None, **config: float) -> Driven:
    core = SchedulerCore(stager=stager or PredictiveStager(), config=CoreConfig(staging_interval_s=60.0, **config))
    return Driven(core, predictor)


def test_intervals_are_aligned_and_every_one_is_observed_with_its_first_dispatches() -> None:
    p = Scripted()
    core = core_with(p)
    core.handle(report("w1", 30.0))  # the first event opens the interval (0, 60]
    for i in range(3):
        core.handle(call("a", 40.0 + i, i))
    core.handle(call("b", 59.0, 0))
    core.handle(Tick(61.0))  # closes (0, 60]
    core.handle(report("w1", 62.0))
    core.handle(call("a", 100.0, 9))
    core.handle(Tick(250.0))  # closes (60, 120], (120, 180] and (180, 240], the last two empty
    assert p.observed == [(60.0, {"v-a": 3, "v-b": 1}), (120.0, {"v-a": 1}), (180.0, {}), (240.0, {})]
    assert [now for now, _ in p.asked] == [60.0, 240.0]  # one prediction per boundary crossed, for the next one
    assert p.asked[0][1] == {"v-a", "v-b"}
    assert core.intervals_closed == 4
    assert [(r.end, r.calls, r.called) for r in core.intervals] == [(60.0, 4, 2), (120.0, 1, 1), (180.0, 0, 0),
                                                                     (240.0, 0, 0)]


def test_a_likely_version_is_loaded_ahead_and_its_next_call_goes_to_that_worker_as_a_device_hit() -> None:
    p = Scripted()
    core = core_with(p)
    core.handle(report("w1", 1.0))
    core.handle(report("w2", 1.0, device=("x",)))
    core.handle(call("a", 2.0, 0))  # a is now known; it went somewhere cold, and ran, and left
    core.handle(InvocationFinished(3.0, "a-0"))
    core.handle(report("w1", 58.0))  # its placement's grace is over and no report shows it: a is nowhere
    core.handle(report("w2", 58.0, device=("x",)))
    p.scores = {"v-a": 0.9}
    staged = core.handle(Tick(60.0))
    loads = [c for c in staged if isinstance(c, Load)]
    assert len(loads) == 1 and loads[0].version == "v-a"
    target = loads[0].worker_id
    out = core.handle(call("a", 61.0, 1))
    assert out == [Dispatch("a-1", target, "device")]
    core.handle(report("w1", 118.0))
    core.handle(Tick(120.0))
    rec = core.intervals[-1]
    assert (rec.loads, rec.calls, rec.device_hits, rec.hits, rec.unused_loaded_bytes) == (1, 1, 1, 1, 0)


def test_a_version_whose_score_falls_is_released_to_the_host_tier_unless_in_use() -> None:
    p = Scripted()
    core = core_with(p, PredictiveStager(keep_alive_s=30.0))
    core.handle(report("w1", 58.0, device=("a", "b"), in_use=("b",)))  # not used for 58 s (last_used 0)
    p.scores = {"v-a": 0.1, "v-b": 0.1}  # below the device's keep threshold
    staged = core.handle(Tick(60.0))
    evicts = [c for c in staged if isinstance(c, Evict)]
    assert [(c.version, c.worker_id, c.to_tier) for c in evicts] == [("v-a", "w1", Tier.host)]
    # the core stops routing to w1 as a device holder at once; its report puts it back if it stayed
    assert core.residency()["v-a"]["w1"] == Tier.host
    core.handle(report("w1", 61.0, device=("a", "b")))
    assert core.residency()["v-a"]["w1"] == Tier.device


def test_interval_records_score_the_predictions_made_for_them() -> None:
    p = Scripted()
    core = core_with(p)
    core.handle(report("w1", 1.0))
    core.handle(call("a", 2.0, 0))
    core.handle(call("b", 3.0, 0))
    for i in ("a-0", "b-0"):
        core.handle(InvocationFinished(4.0, i))
    core.handle(report("w1", 58.0))
    p.scores = {"v-a": 0.9, "v-b": 0.8}  # predicted for (60, 120]: both loaded
    core.handle(Tick(60.0))
    core.handle(call("a", 70.0, 1))  # only a is called
    core.handle(call("c", 71.0, 0))  # and c, not predicted
    core.handle(report("w1", 118.0, device=("a", "b")))
    core.handle(Tick(120.0))
    rec = core.intervals[-1]
    assert rec.end == 120.0 and rec.predictor == "scripted"
    assert (rec.predicted, rec.called, rec.hits) == (2, 2, 1)
    assert rec.precision == 0.5 and rec.recall == 0.5
    assert rec.loads == 2 and rec.unused_loaded_bytes == 4 * MB  # b was loaded and not called
    assert rec.calls == 2 and rec.device_hits == 1  # a found its staged copy; c was cold


def test_workers_needed_is_zero_without_predicted_demand_and_grows_with_it() -> None:
    p = Scripted()
    core = core_with(p, service_s=30.0)
    core.handle(report("w1", 1.0))
    core.handle(call("a", 2.0, 0))
    core.handle(report("w1", 58.0))
    core.handle(Tick(60.0))
    assert core.workers_needed == 0
    for i in range(200):
        core.handle(call("a", 61.0, i + 1))
    p.scores = {"v-a": 1.0}
    core.handle(report("w1", 118.0))
    core.handle(Tick(120.0))
    assert core.workers_needed >= 2  # 200 calls of 30 s in a minute: 100 busy slots, 32 per worker


def test_staging_commands_only_name_live_workers_and_fetches_go_to_host_caches() -> None:
    p = Scripted()
    core = core_with(p)
    core.handle(report("w1", 1.0))
    core.handle(call("a", 2.0, 0))
    core.handle(InvocationFinished(3.0, "a-0"))
    core.handle(report("w1", 58.0))
    p.scores = {"v-a": 0.3}  # likely, not very likely: host tier only
    staged = core.handle(Tick(60.0))
    assert staged == [Fetch("v-a", "w1")]


def test_prediction_is_a_command_and_routing_goes_on_while_it_is_answered() -> None:
    """The core asks for the prediction of an interval with every interval closed since the last ask, and
    keeps routing calls before the answer comes (a live forecast runs on a thread of its own); the answer then
    stages, and the calls made meanwhile count in the interval's record."""
    core = SchedulerCore(stager=PredictiveStager(), config=CoreConfig(staging_interval_s=60.0))
    core.handle(report("w1", 30.0))
    core.handle(call("a", 40.0, 0))
    core.handle(call("b", 41.0, 0))
    core.handle(InvocationFinished(42.0, "b-0"))
    out = core.handle(report("w1", 180.5, device=("a",)))  # closes (0, 60], (60, 120] and (120, 180]
    asks = [c for c in out if isinstance(c, Predict)]
    assert len(asks) == 1 and out[0] == asks[0]  # before the event's own commands
    ask = asks[0]
    assert ask.start == 180.0 and sorted(ask.keys) == ["v-a", "v-b"]
    assert [(end, dict(counts)) for end, counts in ask.observed] == [
        (60.0, {"v-a": 1, "v-b": 1}), (120.0, {}), (180.0, {})]
    core.handle(Tick(181.0))  # b's placement on w1 (no heartbeat shows it) lapses
    routed = core.handle(call("a", 182.0, 1))  # no answer yet: routed all the same
    assert routed == [Dispatch("a-1", "w1", "device")]
    staged = core.handle(Predicted(183.0, 180.0, {"v-b": 0.3}, "scripted"))  # likely: to a host cache
    assert staged == [Fetch("v-b", "w1")]
    core.handle(report("w1", 240.5, device=("a",)))
    rec = next(r for r in core.intervals if r.end == 240.0)
    assert (rec.predictor, rec.calls, rec.device_hits, rec.called, rec.predicted, rec.fetches) == (
        "scripted", 1, 1, 1, 0, 1)


def test_an_answer_for_an_interval_that_has_closed_is_dropped() -> None:
    """A prediction that comes after its interval closed stages nothing; the next interval's ask carries only
    the intervals closed since (each interval is observed once)."""
    core = SchedulerCore(stager=PredictiveStager(), config=CoreConfig(staging_interval_s=60.0))
    core.handle(report("w1", 30.0))
    core.handle(call("a", 40.0, 0))
    core.handle(InvocationFinished(41.0, "a-0"))
    core.handle(report("w1", 59.5))
    first = next(c for c in core.handle(Tick(60.5)) if isinstance(c, Predict))
    core.handle(report("w1", 119.5))
    second = next(c for c in core.handle(Tick(120.5)) if isinstance(c, Predict))
    assert [end for end, _ in first.observed] == [60.0] and [end for end, _ in second.observed] == [120.0]
    assert core.handle(Predicted(121.0, first.start, {"v-a": 0.3}, "late")) == []
    assert core.decisions["prediction_stale"] == 1
    staged = core.handle(Predicted(121.5, second.start, {"v-a": 0.3}, "on time"))
    assert staged == [Fetch("v-a", "w1")]
    core.handle(report("w1", 179.5))
    core.handle(Tick(180.5))
    assert [r.predictor for r in core.intervals if r.end in (120.0, 180.0)] == ["", "on time"]
