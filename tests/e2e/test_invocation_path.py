"""The invocation path end to end with the official `openai` client: gateway -> NATS -> scheduler placement ->
two worker processes -> back through the gateway, compared token for token with the engine run in-process."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e.conftest import Cluster, OpenAICall, Reference, openai_finish_reason, run_openai
from workers.batcher import Completion

pytestmark = pytest.mark.timeout(180)

# Three adapters of different ranks over different module subsets.
ADAPTERS = {
    "r4": (4, ("q_proj", "v_proj")),
    "r16": (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "r64": (64, ("o_proj", "gate_proj", "up_proj", "down_proj")),
}
PROMPTS = {"chat": "Tell me about the sea.", "completion": "Once upon a time"}
MAX_TOKENS = 24


@pytest_asyncio.fixture(scope="module")
async def pushed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """model name (`<tenant>/<adapter>`) -> sha256 of the adapter pushed through POST /v1/adapters."""
    tmp = tmp_path_factory.mktemp("adapters")
    out: dict[str, str] = {}
    for seed, (name, (rank, modules)) in enumerate(ADAPTERS.items()):
        body = await cluster.push(name, cluster.write_adapter(tmp, rank=rank, modules=modules, seed=seed))
        assert body["max_rank"] == rank and sorted(body["target_modules"]) == sorted(modules)
        out[f"{cluster.tenant}/{name}"] = body["sha256"]
    return out


def the_calls(pushed: dict[str, str]) -> list[OpenAICall]:
    """Chat and completion, streamed and not, for the base model and each adapter: the same four requests per
    model. Greedy: the engine's greedy tokens do not depend on the batch a request runs in, so the workers'
    batches (whatever mix of these calls each one gets) must give exactly the reference's tokens."""
    calls = []
    for model, sha in {"base": None, **pushed}.items():
        for kind, stream in itertools.product(("chat", "completion"), (False, True)):
            calls.append(OpenAICall(kind=kind, model=model, prompt=PROMPTS[kind] + (" Go on." if stream else ""),
                                    max_tokens=MAX_TOKENS, temperature=0.0, seed=0, stream=stream, adapter_sha=sha))
    return calls


async def check_outputs(cluster: Cluster, calls: list[OpenAICall], expected: list[Completion]) -> None:
    for call, want in zip(calls, expected, strict=True):
        label = call.label()
        assert call.text == want.text, label
        assert call.finish_reason == openai_finish_reason(want), label
        if call.stream:
            assert "".join(call.deltas) == want.text, label
        # Token for token: the result the worker recorded (exactly one) holds the engine's tokens.
        assert call.invocation_id.startswith("inv_"), label
        assert await cluster.results_recorded(call.invocation_id) == 1, label
        result = await cluster.recorded_result(call.invocation_id)
        assert result.status == "succeeded" and result.token_ids == want.token_ids, label
        assert result.adapter_tier == call.tier, label
        if call.adapter_sha is None:
            assert call.tier is None and call.load_ms is None, label  # the bare backbone has no adapter tier
        else:
            assert call.tier in ("object", "device") and call.load_ms is not None and call.load_ms >= 0.0, label


async def test_openai_chat_and_completions_match_the_engine_for_three_adapters_and_the_base(
    cluster: Cluster, reference: Reference, pushed: dict[str, str]
) -> None:
    first = the_calls(pushed)
    expected = await asyncio.to_thread(reference.expect, first)
    # Each adapter really changes the output: per request, the four models answer differently.
    for i in range(4):
        texts = [expected[i + 4 * m].text for m in range(4)]
        assert len(set(texts)) == 4, texts

    async with cluster.openai() as client:
        await asyncio.gather(*(run_openai(client, c) for c in first))
    await check_outputs(cluster, first, expected)
    # None of the adapters was loaded anywhere before: the call that caused each cold start says so.
    for model in pushed:
        tiers = [(c.tier, c.load_ms) for c in first if c.model == model]
        assert any(tier == "object" and (ms or 0.0) > 0.0 for tier, ms in tiers), (model, tiers)

    # The same sixteen calls again, all at once: every adapter is on a device now.
    again = the_calls(pushed)
    async with cluster.openai() as client:
        await asyncio.gather(*(run_openai(client, c) for c in again))
    await check_outputs(cluster, again, expected)
    for call in again:
        if call.adapter_sha is not None:
            assert (call.tier, call.load_ms) == ("device", 0.0), call.label()


async def test_a_first_call_is_cold_and_a_repeated_call_warm(
    cluster: Cluster, reference: Reference, tmp_path: Path
) -> None:
    body = await cluster.push("fresh", cluster.write_adapter(tmp_path, rank=8, modules=("q_proj", "k_proj", "v_proj",
                                                                                          "o_proj", "gate_proj",
                                                                                          "up_proj", "down_proj"),
                                                             seed=42))
    model = f"{cluster.tenant}/fresh"

    def call() -> OpenAICall:
        return OpenAICall(kind="chat", model=model, prompt="Hello?", max_tokens=12, temperature=0.0, seed=0,
                          stream=False, adapter_sha=body["sha256"])

    [want] = await asyncio.to_thread(reference.expect, [call()])
    async with cluster.openai() as client:
        cold = await run_openai(client, call())
        warm = await run_openai(client, call())
    assert cold.text == warm.text == want.text
    assert cold.tier == "object" and cold.load_ms is not None and cold.load_ms > 0.0
    assert warm.tier == "device" and warm.load_ms == 0.0
    assert cold.invocation_id != warm.invocation_id


async def test_a_seeded_sampling_call_gives_the_same_text_alone_or_in_a_batch(
    cluster: Cluster, reference: Reference, pushed: dict[str, str]
) -> None:
    model = next(iter(pushed))

    def seeded() -> OpenAICall:
        return OpenAICall(kind="completion", model=model, prompt="Seeded", max_tokens=120, temperature=0.8, seed=7,
                          stream=False, adapter_sha=pushed[model])

    async with cluster.openai() as client:
        alone = await run_openai(client, seeded())
        crowd = [OpenAICall(kind="chat", model=m, prompt=f"crowd {i}", max_tokens=120, temperature=0.0, seed=0,
                            stream=True, adapter_sha=sha) for i, (m, sha) in enumerate(pushed.items())]
        batched, *_ = await asyncio.gather(run_openai(client, seeded()), *(run_openai(client, c) for c in crowd))
    [want] = await asyncio.to_thread(reference.expect, [seeded()])
    assert alone.text == want.text
    assert batched.text == want.text
