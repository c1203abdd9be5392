"""Bad requests: each answered with its documented status in OpenAI's error shape, and NOTHING changed:
no invocation row, no message in the invocations stream, no adapter registered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from nats.aio.client import Client

from storage import repo
from tests.gateway.conftest import GatewayFactory, Keys, Pushed, stream_messages

FN = "/v1/functions/acme/bot/invocations"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    """One bad request and the status it must get."""

    name: str
    status: int
    path: str
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content: Any = None
    files: Any = None
    data: Any = None
    auth: str | None = "acme"  # "acme", "bad", or None for no Authorization header
    code: str | None = None


async def _chunks(total: int) -> AsyncIterator[bytes]:
    piece = b" " * 65536
    for _ in range(total // len(piece) + 1):
        yield piece


def cases(keys: Keys) -> list[Case]:
    big = "x" * (2 << 20)
    return [
        Case("max_tokens of the wrong type", 400, FN, {"prompt": "hi", "max_tokens": "many"}),
        Case("temperature of the wrong type", 400, COMPLETIONS, {"model": "acme/bot", "prompt": "hi",
                                                                 "temperature": "hot"}),
        Case("negative max_tokens", 400, COMPLETIONS, {"model": "acme/bot", "prompt": "hi", "max_tokens": -1}),
        Case("zero max_completion_tokens", 400, CHAT, {"model": "acme/bot", "messages": USER,
                                                       "max_completion_tokens": 0}),
        Case("n=2", 400, CHAT, {"model": "acme/bot", "messages": USER, "n": 2}, code="unsupported_parameter"),
        Case("unknown adapter", 404, CHAT, {"model": "acme/nope", "messages": USER}, code="model_not_found"),
        Case("unknown adapter (FaaS)", 404, "/v1/functions/acme/nope/invocations", {"prompt": "hi"}),
        Case("another tenant's adapter", 404, COMPLETIONS, {"model": "other/secret", "prompt": "hi"}),
        Case("another tenant's adapter (FaaS)", 404, "/v1/functions/other/secret/invocations", {"prompt": "hi"}),
        Case("missing key", 401, FN, {"prompt": "hi"}, auth=None, code="invalid_api_key"),
        Case("bad key", 401, FN, {"prompt": "hi"}, auth="bad", code="invalid_api_key"),
        Case("oversized body (Content-Length)", 413, FN, {"prompt": big}, code="request_too_large"),
        Case("oversized body (chunked, no Content-Length)", 413, FN, content=_chunks(2 << 20),
             headers={"content-type": "application/json"}),
        Case("callback URL not http(s)", 400, FN, {"prompt": "hi"}, {"X-Callback-Url": "ftp://example.com/x"},
             code="invalid_callback_url"),
        Case("callback URL relative", 400, FN, {"prompt": "hi"}, {"X-Callback-Url": "/hooks/done"}),
        Case("callback URL too long", 400, FN, {"prompt": "hi"},
             {"X-Callback-Url": "https://example.com/" + "a" * 3000}),
        Case("Idempotency-Key reused with another body", 422, FN, {"prompt": "different"},
             {"Idempotency-Key": "k1", "Prefer": "respond-async"}, code="idempotency_key_reused"),
        Case("five stop sequences", 400, COMPLETIONS, {"model": "acme/bot", "prompt": "hi",
                                                       "stop": ["a", "b", "c", "d", "e"]}),
        Case("temperature above 2", 400, CHAT, {"model": "acme/bot", "messages": USER, "temperature": 2.5}),
        Case("top_p of 0", 400, FN, {"prompt": "hi", "top_p": 0}),
        Case("malformed JSON", 400, FN, content=b'{"prompt": "hi",', headers={"content-type": "application/json"}),
        Case("neither prompt nor messages", 400, FN, {"max_tokens": 3}),
        Case("both prompt and messages", 400, FN, {"prompt": "hi", "messages": USER}),
        Case("chat without messages", 400, CHAT, {"model": "acme/bot"}),
        Case("empty messages", 400, CHAT, {"model": "acme/bot", "messages": []}),
        Case("model name with a dot", 400, CHAT, {"model": "acme/bad.name", "messages": USER},
             code="invalid_model"),
        Case("model name without a tenant", 400, COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}),
        Case("reserved adapter name", 400, COMPLETIONS, {"model": "acme/_secret", "prompt": "hi"}),
        Case("unsupported role", 400, CHAT, {"model": "acme/bot", "messages": [{"role": "tool", "content": "x"}]}),
        Case("two prompts", 400, COMPLETIONS, {"model": "acme/bot", "prompt": ["a", "b"]}),
        Case("prompt over the character bound", 400, FN, {"prompt": "y" * 300_000}, code="prompt_too_long"),
        Case("invalid adapter upload", 422, "/v1/adapters", data={"name": "broken"},
             files=[("f", ("adapter_config.json", b"{not json", "application/json")),
                    ("f", ("adapter_model.safetensors", b"garbage", "application/octet-stream"))],
             code="config_invalid"),
        Case("pickle adapter upload", 422, "/v1/adapters", data={"name": "pickled"},
             files=[("f", ("adapter_model.bin", b"\x80\x04", "application/octet-stream")),
                    ("f", ("adapter_config.json", b"{}", "application/json"))], code="pickle_refused"),
        Case("upload without a name field", 400, "/v1/adapters",
             files=[("f", ("adapter_config.json", b"{}", "application/json"))], code="missing_field"),
        Case("upload with an invalid name", 400, "/v1/adapters", data={"name": "a b"},
             files=[("f", ("adapter_config.json", b"{}", "application/json"))]),
        Case("upload as JSON", 400, "/v1/adapters", {"name": "x"}),
        *small_cases(),
    ]


HUGE = 2**70  # past int64: it used to reach the bus encoder and answer 500 text/plain
JSON = {"content-type": "application/json"}


def small_cases() -> list[Case]:
    """Text that is not Unicode, huge integers, names with control characters, unimplemented OpenAI
    parameters and max_tokens above the cap (4096 by default) or the context window (8192 for SmolLM2)."""
    def raw(path: str, body: str, code: str, name: str) -> Case:
        return Case(name, 400, path, content=body.encode(), headers=JSON, code=code)

    model = '"model": "acme/bot"'
    return [
        raw(FN, '{"prompt": "a \\ud800 b"}', "invalid_unicode", "lone surrogate in a prompt"),
        raw(FN, '{"prompt": "\\udfff"}', "invalid_unicode", "lone low surrogate alone"),
        raw(CHAT, '{' + model + ', "messages": [{"role": "user", "content": "hi \\ud83d"}]}', "invalid_unicode",
            "lone surrogate in a chat message"),
        raw(CHAT, '{' + model + ', "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
            "invalid_unicode", "lone surrogate in a content part"),
        raw(COMPLETIONS, '{' + model + ', "prompt": "hi", "stop": ["\\ud800"]}', "invalid_unicode",
            "lone surrogate in a stop sequence"),
        raw(FN, '{"messages": [{"role": "user", "content": "ok", "name": "\\udc00"}]}', "invalid_unicode",
            "lone surrogate in a message name"),
        Case("max_tokens 2^70 (FaaS)", 400, FN, {"prompt": "hi", "max_tokens": HUGE}, code="max_tokens_too_large"),
        Case("max_tokens 2^70", 400, COMPLETIONS, {"model": "acme/bot", "prompt": "hi", "max_tokens": HUGE},
             code="max_tokens_too_large"),
        Case("max_completion_tokens 2^70", 400, CHAT, {"model": "acme/bot", "messages": USER,
                                                       "max_completion_tokens": HUGE}, code="max_tokens_too_large"),
        Case("max_tokens 1e9", 400, CHAT, {"model": "acme/bot", "messages": USER, "max_tokens": 10**9},
             code="max_tokens_too_large"),
        Case("max_tokens above the cap", 400, FN, {"prompt": "hi", "max_tokens": 4097}, code="max_tokens_too_large"),
        Case("seed 2^70", 400, FN, {"prompt": "hi", "seed": HUGE}),
        Case("n 2^70", 400, CHAT, {"model": "acme/bot", "messages": USER, "n": HUGE}, code="unsupported_parameter"),
        Case("best_of 2^70", 400, COMPLETIONS, {"model": "acme/bot", "prompt": "hi", "best_of": HUGE},
             code="unsupported_parameter"),
        Case("temperature 2^70", 400, FN, {"prompt": "hi", "temperature": HUGE}),
        Case("adapter name with a trailing newline", 400, "/v1/adapters", data={"name": "bot\n"},
             files=[("f", ("adapter_config.json", b"{}", "application/json"))], code="invalid_name"),
        Case("adapter name with a control character", 400, "/v1/adapters", data={"name": "b\x01ot"},
             files=[("f", ("adapter_config.json", b"{}", "application/json"))], code="invalid_name"),
        Case("model name with a trailing newline", 400, CHAT, {"model": "acme/bot\n", "messages": USER},
             code="invalid_model"),
        *[Case(f"unsupported {name}", 400, path, {**base, name: value}, code="unsupported_parameter")
          for path, base, name, value in UNSUPPORTED],
    ]


_C = {"model": "acme/bot", "messages": USER}
_P = {"model": "acme/bot", "prompt": "hi"}
UNSUPPORTED: list[tuple[str, dict[str, Any], str, Any]] = [
    (CHAT, _C, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    (CHAT, _C, "tool_choice", "auto"),
    (CHAT, _C, "functions", [{"name": "f", "parameters": {}}]),
    (CHAT, _C, "function_call", "auto"),
    (CHAT, _C, "response_format", {"type": "json_object"}),
    (CHAT, _C, "logit_bias", {"50256": -100}),
    (CHAT, _C, "presence_penalty", 0.5),
    (CHAT, _C, "frequency_penalty", 1),
    (CHAT, _C, "logprobs", True),
    (CHAT, _C, "top_logprobs", 3),
    (COMPLETIONS, _P, "logprobs", 0),  # on completions, 0 still asks for the chosen tokens' logprobs
    (COMPLETIONS, _P, "echo", True),
    (COMPLETIONS, _P, "suffix", "the end"),
    (COMPLETIONS, _P, "best_of", 2),
    (COMPLETIONS, _P, "presence_penalty", -1.0),
    (FN, {"prompt": "hi"}, "logit_bias", {"1": 5}),
    (FN, {"prompt": "hi"}, "frequency_penalty", 0.1),
]


async def test_bad_requests_change_nothing(gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed,
                                           nc: Client, sessions: Any) -> None:
    gw = await gateway_factory()
    auth = {"acme": keys.auth(), "bad": {"Authorization": "Bearer lfn_0000_nope"}, None: {}}
    async with gw.client() as c:
        setup = await c.post(FN, json={"prompt": "first"}, headers={"Idempotency-Key": "k1",
                                                                    "Prefer": "respond-async", **keys.auth()})
        assert setup.status_code == 202
        async with sessions() as session:
            rows_before = await repo.count_rows(session)
        messages_before = await stream_messages(nc)
        wrong = []
        table = cases(keys)
        assert len(table) >= 20
        for case in table:
            kw: dict[str, Any] = {"headers": {**auth[case.auth], **case.headers}}
            for name in ("json", "content", "files", "data"):
                if getattr(case, name) is not None:
                    kw[name] = getattr(case, name)
            try:
                r = await c.post(case.path, **kw)
            except httpx.HTTPError as e:  # the server may close a connection whose body it refused
                wrong.append(f"{case.name}: {e!r}")
                continue
            error = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
            if r.status_code != case.status or not isinstance(error, dict):
                wrong.append(f"{case.name}: got {r.status_code} {r.text[:200]}")
                continue
            if set(error) < {"message", "type", "param", "code"} or not error["message"]:
                wrong.append(f"{case.name}: not OpenAI's error shape: {error}")
            if case.code is not None and error["code"] != case.code:
                wrong.append(f"{case.name}: code {error['code']!r}, expected {case.code!r}")
            if case.code == "unsupported_parameter" and case.json and error["param"] not in case.json:
                wrong.append(f"{case.name}: param {error['param']!r} names no parameter of the request")
        assert not wrong, "\n".join(wrong)
        async with sessions() as session:
            assert await repo.count_rows(session) == rows_before
        assert await stream_messages(nc) == messages_before
