"""Admission under contention: slack order, no head-of-line blocking with its starvation bound, the per-step
adapter-bytes cap, rank-ordered segments; plan/commit over a real (tiny) KV cache, and once through the engine."""

from __future__ import annotations

import itertools

import pytest
import torch

from storage.backbone import MODULES, BackboneSpec
from workers.adapter_pool import LoraWeights, ModuleLora
from workers.batcher import AdapterFootprint, Batcher, BatchPlan, BatchPolicy, Completion, Request
from workers.engine import Engine, EngineSettings
from workers.kv_cache import PagedKVCache
from workers.model import Backbone
from workers.sampling import SamplingParams
from workers.tiny import write_tiny_backbone
from workers.weights import load_backbone

SPEC = BackboneSpec(name="tiny", num_layers=1, hidden_size=8, intermediate_size=8, num_heads=1,
                    num_kv_heads=1, head_dim=2, vocab_size=100)


def _kv(num_blocks: int = 64, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(SPEC, num_blocks, block_size=block_size)


def _request(i: int, prompt_len: int, *, adapter: str | None = None, max_tokens: int = 4, arrived_s: float = 0.0,
             ttft_target_s: float | None = None) -> Request:
    return Request(
        request_id=f"r{i}", adapter=adapter, prompt_ids=[(i * 7 + k) % 90 for k in range(prompt_len)],
        params=SamplingParams(temperature=0.0, max_tokens=max_tokens), max_tokens=max_tokens,
        stop_token_ids=frozenset(), arrival=i, arrived_s=arrived_s, ttft_target_s=ttft_target_s,
    )


def _step(b: Batcher, now: float = 0.0) -> tuple[BatchPlan, list[Completion]]:
    plan = b.plan(now)
    return plan, b.commit(plan, [7] * len(plan.sampled))


def _admitted(plan: BatchPlan) -> list[str]:
    """Requests that start (or restart after a preemption) in this plan."""
    return [c.request.request_id for c in plan.chunks if c.start == 0]


# ------------------------------------------------------------------------------------------ head of line


def test_small_requests_are_admitted_past_one_that_cannot_get_blocks() -> None:
    kv = _kv(num_blocks=8, block_size=4)  # 32 tokens
    b = Batcher(kv, BatchPolicy(admission="arrival"))
    b.add(_request(0, 12, max_tokens=8))
    _step(b)  # r0 holds 3 blocks (12 tokens + the next one)
    b.add(_request(1, 20))  # needs 6 blocks, 5 are free
    b.add(_request(2, 2))
    b.add(_request(3, 2))
    plan, _ = _step(b)
    assert _admitted(plan) == ["r2", "r3"]
    assert [r.request_id for r in b.waiting] == ["r1"]
    assert b.waiting[0].pass_overs == 1 and b.stats.passed_over == 1


def test_strict_order_with_no_pass_overs_blocks_as_before() -> None:
    kv = _kv(num_blocks=8, block_size=4)
    b = Batcher(kv, BatchPolicy(admission="arrival", max_pass_overs=0))
    b.add(_request(0, 12, max_tokens=8))
    _step(b)
    b.add(_request(1, 20))
    b.add(_request(2, 2))
    plan, _ = _step(b)
    assert _admitted(plan) == [] and b.stats.walls == 1


def test_requests_are_admitted_past_one_whose_adapter_does_not_fit() -> None:
    b = Batcher(_kv(), BatchPolicy(admission="arrival", max_adapters_per_batch=1))
    b.add(_request(0, 2, adapter="a", max_tokens=8))
    _step(b)
    b.add(_request(1, 2, adapter="b"))
    b.add(_request(2, 2, adapter="a"))
    b.add(_request(3, 2))
    plan, _ = _step(b)
    assert _admitted(plan) == ["r2", "r3"] and plan.adapters == ["a"]


def _stream(max_pass_overs: int, steps: int = 60) -> tuple[list[list[str]], dict[str, Completion]]:
    """A big request (6 of 8 blocks) behind one running request, and two small requests arriving every step."""
    b = Batcher(_kv(num_blocks=8, block_size=4), BatchPolicy(admission="arrival", max_pass_overs=max_pass_overs))
    b.add(_request(0, 12, max_tokens=6))
    _step(b)
    b.add(_request(1, 20, max_tokens=2))
    admitted: list[list[str]] = []
    done: dict[str, Completion] = {}
    for k in range(steps):
        for j in range(2):
            b.add(_request(100 + 2 * k + j, 2, max_tokens=3))
        plan, finished = _step(b)
        admitted.append(_admitted(plan))
        done.update((c.request_id, c) for c in finished)
    return admitted, done


def test_a_passed_over_request_becomes_a_wall_after_the_bound() -> None:
    # Without a bound the stream of small requests keeps the big one out for good.
    unbounded, _ = _stream(max_pass_overs=10**6)
    assert not any("r1" in step for step in unbounded)
    admitted, done = _stream(max_pass_overs=3)
    start = next(k for k, step in enumerate(admitted) if "r1" in step)
    passed_steps = [k for k in range(start) if admitted[k]]  # steps in which something else started
    assert len(passed_steps) == 3  # passed over exactly max_pass_overs times
    # From the wall on, nothing behind it starts before it does; then the stream flows again.
    assert all(step == [] for step in admitted[passed_steps[-1] + 1 : start])
    assert admitted[start][0] == "r1"
    assert any(admitted[start + 1 :]) and done["r1"].token_ids == [7, 7]


# ------------------------------------------------------------------------------------------ slack order


def test_a_tight_target_that_arrived_later_is_admitted_first() -> None:
    def first(policy: BatchPolicy) -> list[str]:
        b = Batcher(_kv(), policy)
        b.add(_request(0, 8, arrived_s=0.0, ttft_target_s=5.0))
        b.add(_request(1, 8, arrived_s=0.5, ttft_target_s=0.2))
        return _admitted(b.plan(now=0.6))

    assert first(BatchPolicy(max_running=1)) == ["r1"]
    assert first(BatchPolicy(max_running=1, admission="arrival")) == ["r0"]
    b = Batcher(_kv(), BatchPolicy(prefill_s_per_token=0.01))
    req = _request(0, 8, arrived_s=1.0, ttft_target_s=2.0)
    assert b.slack(req, now=1.5) == pytest.approx(2.0 - 0.5 - 0.08)


def test_slack_falls_back_to_the_policy_target_and_breaks_ties_by_arrival() -> None:
    b = Batcher(_kv(), BatchPolicy(max_running=2, ttft_target_s=1.0, prefill_s_per_token=0.0))
    b.add(_request(0, 4, arrived_s=0.0))  # slack 1.0 - 1.0 = 0.0 at now = 1.0
    b.add(_request(1, 4, arrived_s=0.5, ttft_target_s=0.5))  # 0.5 - 0.5 = 0.0: a tie, r0 arrived first
    b.add(_request(2, 4, arrived_s=0.9, ttft_target_s=0.1))  # 0.0 too, the latest
    b.add(_request(3, 4, arrived_s=0.0, ttft_target_s=0.9))  # -0.1: the most urgent
    assert _admitted(b.plan(now=1.0)) == ["r3", "r0"]


def test_a_preempted_request_keeps_its_arrival_and_goes_before_newer_ones() -> None:
    kv = _kv(num_blocks=6, block_size=4)  # 24 tokens: three requests growing to 14 tokens each must preempt
    b = Batcher(kv, BatchPolicy())
    for i in range(3):
        b.add(_request(i, 6, max_tokens=8, arrived_s=0.1 * i))
    preempted: list[Request] = []
    done: dict[str, Completion] = {}
    for k in range(60):
        if not b.has_work:
            break
        now = 1.0 + k
        plan, finished = _step(b, now)
        done.update((c.request_id, c) for c in finished)
        if plan.preempted:
            assert _admitted(plan) == []  # a step that preempts admits no one
            preempted += plan.preempted
            newer = _request(10 + k, 2, max_tokens=2, arrived_s=now)
            b.add(newer)
            for victim in plan.preempted:
                assert victim.arrived_s == pytest.approx(0.1 * victim.arrival)
                assert b.slack(victim, now) < b.slack(newer, now)
    assert preempted and not b.has_work and kv.num_free_blocks == kv.num_blocks
    assert all(len(done[r.request_id].token_ids) == 8 for r in preempted)


# ------------------------------------------------------------------------------------------ adapter bytes


SIZES = {f"a{i}": (10, 25, 40, 60, 90, 150)[i % 6] for i in range(12)}  # a5 and a11 exceed the cap alone
RANKS = {k: {10: 4, 25: 8, 40: 16, 60: 16, 90: 32, 150: 64}[v] for k, v in SIZES.items()}
CAP = 100


def _info(key: str) -> AdapterFootprint:
    return AdapterFootprint(SIZES[key], RANKS[key])


def _check_cap(plan: BatchPlan, cap: int = CAP) -> None:
    total = sum(SIZES[k] for k in plan.adapters)
    assert total <= cap or len(plan.adapters) == 1, (plan.adapters, total)


def test_the_byte_cap_holds_in_every_step_and_every_request_finishes() -> None:
    b = Batcher(_kv(num_blocks=128), BatchPolicy(max_batch_tokens=64, max_adapter_bytes_per_step=CAP),
                adapter_info=_info)
    keys = sorted(SIZES)
    expected: set[str] = set()
    done: dict[str, Completion] = {}
    oversized_alone = 0
    n = 0
    for step in range(400):
        if step < 40:  # a burst: three requests a step over twelve adapters (and the bare backbone)
            for _ in range(3):
                adapter = None if n % 7 == 6 else keys[(n * 5) % len(keys)]
                b.add(_request(n, 3 + n % 9, adapter=adapter, max_tokens=2 + n % 6, arrived_s=step * 0.02))
                expected.add(f"r{n}")
                n += 1
        if not b.has_work:
            break
        plan, finished = _step(b, now=step * 0.02)
        _check_cap(plan)
        oversized_alone += any(SIZES[k] > CAP for k in plan.adapters)
        done.update((c.request_id, c) for c in finished)
    assert set(done) == expected  # every request finished, those of the two oversized adapters too
    assert all(len(c.token_ids) == 2 + int(c.request_id[1:]) % 6 for c in done.values())
    assert oversized_alone > 0
    assert b.stats.byte_cap_steps > 0 and b.stats.passed_over > 0


def test_running_adapters_over_a_tightened_cap_take_turns() -> None:
    """Admission keeps the running requests' adapters within the limits; when the limits tighten between
    steps (here the cap), the adapters left out take turns, the one left out longest first."""
    b = Batcher(_kv(), BatchPolicy(max_adapter_bytes_per_step=200), adapter_info=_info)
    for i, key in enumerate(["a2", "a3", "a4", None]):  # 40 + 60 + 90 bytes
        b.add(_request(i, 2, adapter=key, max_tokens=12))
    plan, _ = _step(b)
    assert sorted(plan.adapters) == ["a2", "a3", "a4"]
    b.policy = BatchPolicy(max_adapter_bytes_per_step=100)
    runs = [plan.seq_ids]
    while b.has_work:
        plan, _ = _step(b)
        _check_cap(plan)
        assert "r3" in plan.seq_ids or not any(r.request_id == "r3" for r in b.running)  # no adapter: never out
        runs.append([s for s in plan.seq_ids if s != "r3"])
    for rid in ("r0", "r1", "r2"):
        ran = [k for k, step in enumerate(runs) if rid in step]
        assert max(j - i for i, j in itertools.pairwise(ran)) <= 2  # never left out two steps in a row
    assert b.stats.adapter_skips > 0


def test_a_byte_cap_needs_adapter_info() -> None:
    with pytest.raises(ValueError, match="adapter_info"):
        Batcher(_kv(), BatchPolicy(max_adapter_bytes_per_step=100))


@pytest.mark.parametrize(("field", "value"), [("admission", "lifo"), ("ttft_target_s", 0.0),
                                              ("prefill_s_per_token", -1.0), ("max_pass_overs", -1),
                                              ("max_adapter_bytes_per_step", 0)])
def test_bad_contention_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        BatchPolicy(**{field: value})  # type: ignore[arg-type]


def test_segments_are_ordered_by_rank_when_asked() -> None:
    def plan(group_by_rank: bool) -> BatchPlan:
        b = Batcher(_kv(), BatchPolicy(admission="arrival", group_by_rank=group_by_rank), adapter_info=_info)
        for i, key in enumerate(["a4", "a0", None, "a2", "a0", "a1"]):  # ranks 32, 4, -, 16, 4, 8
            b.add(_request(i, 2, adapter=key))
        return b.plan()

    assert [k for k, _ in plan(True).segments] == [None, "a0", "a1", "a2", "a4"]
    assert plan(True).seq_ids == ["r2", "r1", "r4", "r5", "r3", "r0"]
    assert [k for k, _ in plan(False).segments] == ["a4", "a0", None, "a2", "a1"]


# ------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return load_backbone(write_tiny_backbone(tmp_path_factory.mktemp("tiny_contention") / "backbone"))


def _adapter(backbone: Backbone, rank: int, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = backbone.spec.module_shapes()
    return {
        (layer, m): ModuleLora(a=torch.randn(rank, shapes[m][0], generator=g) * 0.3,
                               b=torch.randn(shapes[m][1], rank, generator=g) * 0.3, scale=2.0 / rank)
        for layer in range(backbone.spec.num_layers) for m in MODULES
    }


def _engine(backbone: Backbone, **settings: object) -> Engine:
    engine = Engine(backbone, EngineSettings.model_validate({"kv_cache_bytes": 1 << 22, "block_size": 4,
                                                             "adapter_pool_bytes": 1 << 22, **settings}))
    for i, rank in enumerate((4, 8, 16, 16)):
        engine.add_adapter(f"a{i}", _adapter(backbone, rank=rank, seed=i))
    return engine


def test_the_engine_passes_the_settings_and_a_capped_step_gives_the_same_tokens(tiny: Backbone) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (5 + 3 * i,), generator=g).tolist() for i in range(8)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=10) for i in range(8)]
    adapters: list[str | None] = ["a0", "a1", "a2", "a3", None, "a2", "a0", "a3"]
    free = _engine(tiny).generate(prompts, params, adapters=adapters)

    probe = _engine(tiny)
    nbytes = {k: probe.batcher.adapter_info(k).nbytes for k in ("a0", "a1", "a2", "a3")}  # type: ignore[misc]
    cap = nbytes["a2"] + nbytes["a0"]  # a rank-16 adapter and a rank-4 one; never two rank-16 ones
    capped = _engine(tiny, max_adapter_bytes_per_step=cap, max_pass_overs=5, ttft_target_s=0.5)
    assert capped.batcher.policy == capped.settings.policy()
    assert (capped.batcher.policy.max_adapter_bytes_per_step, capped.batcher.policy.ttft_target_s) == (cap, 0.5)
    plans: list[BatchPlan] = []
    plan_step = capped.batcher.plan

    def recorded(now: float = 0.0) -> BatchPlan:
        plans.append(plan := plan_step(now))
        return plan

    capped.batcher.plan = recorded  # type: ignore[method-assign]
    out = capped.generate(prompts, params, adapters=adapters)
    assert [c.token_ids for c in out] == [c.token_ids for c in free]
    assert plans and all(sum(nbytes[k] for k in p.adapters) <= cap for p in plans)
    assert capped.batcher.stats.byte_cap_steps > 0
    assert {k for p in plans for k in p.adapters} == {"a0", "a1", "a2", "a3"}
