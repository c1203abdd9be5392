"""The official openai client against the gateway, unchanged: chat and completions, streamed and not."""

from __future__ import annotations

import openai
import pytest

from tests.gateway.conftest import EchoWorker, GatewayFactory, Keys, Pushed, RunningGateway


def _client(gateway: RunningGateway, keys: Keys) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=keys.acme, max_retries=0, timeout=30)


async def test_chat_completion(gateway: RunningGateway, keys: Keys, adapters: Pushed, worker: EchoWorker) -> None:
    client = _client(gateway, keys)
    raw = await client.chat.completions.with_raw_response.create(
        model=adapters.bot, messages=[{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hello there adapter"}],
        max_tokens=10, temperature=0.5, top_p=0.9, seed=7, stop=["zzz"],
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "hello there adapter"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        3, 3, 6)
    assert raw.headers["x-lorafn-invocation-id"] == completion.id
    assert raw.headers["x-lorafn-adapter-tier"] == "device"
    assert float(raw.headers["x-lorafn-load-ms"]) == pytest.approx(12.5)
    sent = worker.seen[-1]
    assert (sent.tenant, sent.adapter, sent.sampling.seed, sent.sampling.stop) == ("acme", "bot", 7, ["zzz"])
    assert sent.sampling.temperature == 0.5 and sent.sampling.top_p == 0.9 and sent.sampling.max_tokens == 10
    assert sent.messages is not None and [m.role for m in sent.messages] == ["system", "user"]
    assert sent.version is not None and len(sent.version) == 64


async def test_chat_completion_stream_with_usage(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                                 worker: EchoWorker) -> None:
    client = _client(gateway, keys)
    stream = await client.chat.completions.create(
        model=adapters.bot, messages=[{"role": "user", "content": "one two three four five"}], max_tokens=4,
        stream=True, stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == "one two three four"
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 4 and usage.prompt_tokens == 5
    assert len([p for p in pieces if p]) == 4  # streamed word by word, not in one piece


async def test_completion_and_stream(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                     worker: EchoWorker) -> None:
    client = _client(gateway, keys)
    done = await client.completions.create(model=adapters.bot, prompt="the quick brown fox", max_tokens=3)
    assert done.choices[0].text == "the quick brown"
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 3
    stream = await client.completions.create(model=adapters.bot, prompt="DUP jumps over", max_tokens=8, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "DUP jumps over"  # the resent chunks (indices already seen) were dropped


async def test_streaming_response_headers(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                          worker: EchoWorker) -> None:
    async with gateway.client(headers=keys.auth()) as http, http.stream(
        "POST", "/v1/chat/completions",
        json={"model": adapters.bot, "messages": [{"role": "user", "content": "a b"}], "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-lorafn-adapter-tier"] == "device"
        assert response.headers["x-lorafn-invocation-id"].startswith("inv_")
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"


async def test_base_model_and_models_list(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                          worker: EchoWorker) -> None:
    client = _client(gateway, keys)
    for model in ("base", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        out = await client.completions.create(model=model, prompt="plain backbone", max_tokens=5)
        assert out.choices[0].text == "plain backbone"
        assert worker.seen[-1].adapter is None and worker.seen[-1].version is None
    models = await client.models.list()
    ids = {m.id: m for m in models.data}
    assert set(ids) == {"HuggingFaceTB/SmolLM2-135M-Instruct", "acme/bot"}  # not other/secret
    assert ids["acme/bot"].owned_by == "acme"
    assert ids["acme/bot"].model_extra is not None
    assert ids["acme/bot"].model_extra["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


async def test_worker_failure_maps_to_openai_error(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                                   worker: EchoWorker) -> None:
    client = _client(gateway, keys)
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=adapters.bot, prompt="FAIL prompt_too_long", max_tokens=5)
    assert err.value.code == "prompt_too_long"
    assert err.value.response.headers["x-lorafn-invocation-id"].startswith("inv_")
    # Streamed: the headers went out with the started event, so the failure arrives in-band.
    stream = await client.chat.completions.create(
        model=adapters.bot, messages=[{"role": "user", "content": "FAIL internal"}], stream=True)
    with pytest.raises(openai.APIError, match="test worker failed it"):
        async for _ in stream:
            pass


async def test_unimplemented_parameters_at_their_defaults_are_accepted(gateway: RunningGateway, keys: Keys,
                                                                       adapters: Pushed, worker: EchoWorker) -> None:
    """Clients that send OpenAI's defaults explicitly are served; only a value that asks for the feature is
    refused (tests/gateway/test_bad_requests.py); max_tokens up to the cap is accepted."""
    async with gateway.client(headers=keys.auth()) as c:
        chat = await c.post("/v1/chat/completions", json={
            "model": adapters.bot, "messages": [{"role": "user", "content": "plain defaults"}],
            "tools": [], "tool_choice": "none", "functions": None, "response_format": {"type": "text"},
            "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
            "top_logprobs": None, "n": 1, "modalities": ["text"], "max_completion_tokens": 4096,
        })
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] == "plain defaults"
        completion = await c.post("/v1/completions", json={
            "model": adapters.bot, "prompt": "still fine", "echo": False, "suffix": None, "best_of": 1,
            "logprobs": None, "max_tokens": 4096,
        })
        assert completion.status_code == 200, completion.text
    assert worker.seen[-1].sampling.max_tokens == 4096


async def test_max_tokens_cap_is_a_setting(gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed,
                                           worker: EchoWorker) -> None:
    gw = await gateway_factory(max_tokens=8)
    async with gw.client(headers=keys.auth()) as c:
        over = await c.post("/v1/functions/acme/bot/invocations", json={"prompt": "hi", "max_tokens": 9})
        assert over.status_code == 400
        assert over.json()["error"]["code"] == "max_tokens_too_large"
        assert "limit of 8 tokens" in over.json()["error"]["message"]
        default = await c.post("/v1/chat/completions", json={"model": adapters.bot,
                                                              "messages": [{"role": "user", "content": "hi"}]})
        assert default.status_code == 200, default.text
    assert worker.seen[-1].sampling.max_tokens == 8  # the chat default (256) is lowered to the cap, not refused
