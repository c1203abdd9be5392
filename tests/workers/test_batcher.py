"""plan/commit without a model: a fake runner returns tokens, a real (tiny) KV cache holds blocks."""

from __future__ import annotations

import pytest

from storage.backbone import BackboneSpec
from workers.batcher import Batcher, BatchPlan, BatchPolicy, Completion, FinishReason, Request, TokenEvent
from workers.kv_cache import PagedKVCache
from workers.sampling import SamplingParams

SPEC = BackboneSpec(name="tiny", num_layers=1, hidden_size=8, intermediate_size=8, num_heads=1,
                    num_kv_heads=1, head_dim=2, vocab_size=100)


def _kv(num_blocks: int = 64, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(SPEC, num_blocks, block_size=block_size)


def _request(i: int, prompt_len: int, *, adapter: str | None = None, max_tokens: int = 4,
             stop_ids: frozenset[int] = frozenset(), events: list[TokenEvent] | None = None) -> Request:
    return Request(
        request_id=f"r{i}", adapter=adapter, prompt_ids=[(i * 7 + k) % 90 for k in range(prompt_len)],
        params=SamplingParams(temperature=0.0, max_tokens=max_tokens), max_tokens=max_tokens,
        stop_token_ids=stop_ids, arrival=i, callback=events.append if events is not None else None,
    )


def _fake_tokens(plan: BatchPlan) -> list[int]:
    """A deterministic 'model': request number * 10 + tokens generated so far."""
    return [int(r.request_id[1:]) * 10 + len(r.output_ids) for r in plan.sampled]


def _run(batcher: Batcher, plans: list[BatchPlan] | None = None) -> dict[str, Completion]:
    done: dict[str, Completion] = {}
    for _ in range(1000):
        if not batcher.has_work:
            return done
        plan = batcher.plan()
        assert plan, "work is waiting but nothing was scheduled"
        if plans is not None:
            plans.append(plan)
        done.update((c.request_id, c) for c in batcher.commit(plan, _fake_tokens(plan)))
    raise AssertionError("did not finish")


def test_a_plan_is_flat_lists_grouped_by_adapter() -> None:
    b = Batcher(_kv(), BatchPolicy(admission="arrival"))  # slack order would take the longest prompt first
    for i, (n, adapter) in enumerate([(3, "a"), (2, None), (4, "b"), (1, "a")]):
        b.add(_request(i, n, adapter=adapter))
    plan = b.plan()
    assert plan.seq_ids == ["r0", "r3", "r1", "r2"]
    assert plan.query_lens == [3, 1, 2, 4]
    assert plan.segments == [("a", 4), (None, 2), ("b", 4)]
    assert plan.adapters == ["a", "b"]
    assert plan.sample_rows == [2, 3, 5, 9]
    assert plan.positions == [0, 1, 2, 0, 0, 1, 0, 1, 2, 3]
    assert plan.input_ids[:3] == [0, 1, 2]


def test_decodes_run_every_step_while_a_long_prompt_is_chunked() -> None:
    b = Batcher(_kv(), BatchPolicy(max_batch_tokens=8))
    for i in range(3):
        b.add(_request(i, 2, max_tokens=20))
    b.commit(first := b.plan(), _fake_tokens(first))
    b.add(_request(3, 30, max_tokens=2))
    plans: list[BatchPlan] = []
    done = _run(b, plans)
    prefill = [p.query_lens[p.seq_ids.index("r3")] for p in plans if "r3" in p.seq_ids]
    assert prefill[:6] == [5, 5, 5, 5, 5, 5]  # the budget left after three decodes
    assert all(p.num_tokens <= 8 for p in plans)
    for p in plans[:6]:  # the three decodes are never stalled by the prompt
        assert {"r0", "r1", "r2"} <= set(p.seq_ids)
    assert not any(c.samples for p in plans[:5] for c in p.chunks if c.request.request_id == "r3")
    assert done["r3"].token_ids == [30, 31]


def test_commit_streams_tokens_and_finishes_on_stop_ids_and_max_tokens() -> None:
    kv = _kv()
    b = Batcher(kv, BatchPolicy())
    events: list[TokenEvent] = []
    b.add(_request(1, 3, max_tokens=3, events=events))
    b.add(_request(2, 3, max_tokens=10, stop_ids=frozenset({21})))
    done = _run(b)
    assert done["r1"].token_ids == [10, 11, 12] and done["r1"].finish_reason is FinishReason.LENGTH
    assert done["r2"].token_ids == [20, 21] and done["r2"].finish_reason is FinishReason.STOP
    assert [(e.token_id, e.finish_reason) for e in events] == [(10, None), (11, None), (12, FinishReason.LENGTH)]
    assert kv.num_free_blocks == kv.num_blocks


def test_preemption_requeues_the_latest_request_and_never_drops_it() -> None:
    kv = _kv(num_blocks=6, block_size=4)  # 24 tokens; three requests grow to 6 + 8 = 14 tokens each
    b = Batcher(kv, BatchPolicy())
    for i in range(3):
        b.add(_request(i, 6, max_tokens=8))
    plans: list[BatchPlan] = []
    done = _run(b, plans)
    assert sorted(done) == ["r0", "r1", "r2"]
    for i in range(3):
        assert done[f"r{i}"].token_ids == [i * 10 + k for k in range(8)]
    preempted = [r.request_id for p in plans for r in p.preempted]
    assert preempted and "r0" not in preempted  # the earliest request always makes progress
    # A preempted request is recomputed from its prompt and the tokens it had generated.
    victim = preempted[0]
    readmit = next(p for p in plans if any(c.request.request_id == victim and c.start == 0 for c in p.chunks)
                   and p is not plans[0])
    chunk = next(c for c in readmit.chunks if c.request.request_id == victim)
    assert chunk.length > 6
    assert kv.num_free_blocks == kv.num_blocks


def test_max_running_and_max_adapters_cap_a_step() -> None:
    b = Batcher(_kv(), BatchPolicy(max_running=3, max_adapters_per_batch=2))
    for i, adapter in enumerate(["a", "b", "c", "a", None]):
        b.add(_request(i, 2, adapter=adapter))
    plan = b.plan()
    assert plan.seq_ids == ["r0", "r3", "r1"]  # the third adapter is passed over; r3 (adapter a) joins
    assert len(plan.adapters) <= 2
    plans: list[BatchPlan] = []
    done = _run(b, plans)
    assert len(done) == 5
    assert all(len(p.adapters) <= 2 and len(p.seq_ids) <= 3 for p in plans)


def test_adapters_fit_callback_keeps_a_step_within_the_pool() -> None:
    pages = {"a": 3, "b": 3, "c": 3}
    b = Batcher(_kv(), BatchPolicy(), adapters_fit=lambda keys: sum(pages[k] for k in keys) <= 6)
    for i, adapter in enumerate(["a", "b", "c"]):
        b.add(_request(i, 2, adapter=adapter))
    plans: list[BatchPlan] = []
    assert len(_run(b, plans)) == 3
    assert plans[0].adapters == ["a", "b"]
    assert all(sum(pages[k] for k in p.adapters) <= 6 for p in plans)


def test_abort_frees_blocks_and_reports_the_reason() -> None:
    kv = _kv()
    b = Batcher(kv, BatchPolicy())
    events: list[TokenEvent] = []
    b.add(_request(0, 5, max_tokens=10, events=events))
    b.add(_request(1, 5))
    b.commit(plan := b.plan(), _fake_tokens(plan))
    completion = b.abort("r0")
    assert completion is not None and completion.finish_reason is FinishReason.ABORT
    assert completion.token_ids == [0]
    assert events[-1].finish_reason is FinishReason.ABORT
    assert b.abort("r0") is None
    b.abort("r1")
    assert kv.num_free_blocks == kv.num_blocks and not b.has_work


def test_a_duplicate_request_id_is_refused() -> None:
    b = Batcher(_kv(), BatchPolicy())
    b.add(_request(0, 2))
    with pytest.raises(ValueError, match="already"):
        b.add(_request(0, 2))


@pytest.mark.parametrize("field", ["max_batch_tokens", "max_running", "max_adapters_per_batch"])
def test_policy_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} \\(0\\)"):
        BatchPolicy(**{field: 0})


def test_an_aborted_request_gives_its_slot_and_blocks_to_the_next_one_at_once() -> None:
    """What a cancel relies on: the next plan admits a waiting request into the aborted one's place."""
    kv = _kv(num_blocks=4, block_size=4)  # 16 tokens: one request of 6 prompt tokens and up to 10 generated
    b = Batcher(kv, BatchPolicy(max_running=1))
    b.add(_request(0, 6, max_tokens=10))
    b.add(_request(1, 6, max_tokens=2))
    b.commit(plan := b.plan(), _fake_tokens(plan))
    assert [r.request_id for r in b.running] == ["r0"] and kv.num_free_blocks == 2
    b.abort("r0")
    assert kv.num_free_blocks == kv.num_blocks and not b.running
    plan = b.plan()
    assert plan.seq_ids == ["r1"] and plan.query_lens == [6]
    done = b.commit(plan, _fake_tokens(plan))
    assert not done and b.abort("r1") is not None  # a waiting or running request alike
    assert kv.num_free_blocks == kv.num_blocks and not b.has_work
