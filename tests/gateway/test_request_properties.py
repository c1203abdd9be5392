"""Property: no request body gives a 500. Arbitrary JSON, and bodies built from the real parameter names with
arbitrary JSON values (huge integers, NaN, lone surrogates, nested junk), are sent to a real gateway (with
the echo worker behind it) on every invocation endpoint; each answer is a success or an OpenAI-shaped JSON
error below 500.

Hypothesis drives a synchronous client from a thread while the gateway serves in the test's event loop.
Deterministic (derandomize, no example database); every example has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.conftest import EchoWorker, Keys, Pushed, RunningGateway

log = logging.getLogger(__name__)
PROPERTY = settings(max_examples=150, deadline=timedelta(seconds=20), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

FN = "/v1/functions/acme/bot/invocations"
ENDPOINTS = ["/v1/completions", "/v1/chat/completions", FN]

# Lone surrogates included: JSON's \ud800 escape carries them (httpx writes them escaped).
TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
SCALAR = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([2**64, -(2**63) - 1, 10**400])
          | st.floats() | TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
MODEL = st.sampled_from(["acme/bot", "base", "other/secret", "acme/_x", "acme/bot\n", "a/b/c", ""]) | JSON
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | JSON,
                                 "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text") | JSON,
                                                                                   "text": TEXT | JSON}), max_size=2)
                                 | JSON})
PARAMS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
          "stream_options", "user", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
          "logit_bias", "presence_penalty", "frequency_penalty", "echo", "suffix", "best_of"]
VALID_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**31), "stop": st.lists(TEXT.filter(bool), max_size=2),
    "n": st.just(1), "stream": st.booleans(), "stream_options": st.just({"include_usage": True}), "user": TEXT,
    "logprobs": st.just(False), "presence_penalty": st.just(0), "frequency_penalty": st.just(0.0),
    "prompt": TEXT, "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}),
                                         min_size=1, max_size=2),
}
BASES = {"/v1/completions": {"model": "acme/bot", "prompt": "hi"},
         "/v1/chat/completions": {"model": "acme/bot", "messages": [{"role": "user", "content": "hi"}]},
         FN: {"prompt": "hi"}}


def near_valid(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body of `path` with up to three fields set to plausible or arbitrary values."""
    field = st.sampled_from([*PARAMS, "model", "prompt", "messages"])
    return st.lists(field.flatmap(lambda f: st.tuples(st.just(f), VALID_VALUES.get(f, st.nothing()) | JSON)),
                    max_size=3).map(lambda changes: {**BASES[path], **dict(changes)})


BODY = st.fixed_dictionaries(
    {"model": MODEL},
    optional={"prompt": TEXT | st.lists(TEXT, max_size=2) | JSON,
              "messages": st.lists(MESSAGE, max_size=2) | JSON,
              **{p: JSON for p in PARAMS}},
)


def _check(r: httpx.Response, what: Any, seen: Counter[int]) -> None:
    seen[r.status_code] += 1
    assert r.status_code < 500 or r.status_code in (503, 504), (r.status_code, r.text, what)
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text, what)
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"], (r.text, what)


async def test_no_request_body_gives_a_500(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                           worker: EchoWorker) -> None:
    seen: Counter[int] = Counter()

    def run() -> None:
        with httpx.Client(base_url=gateway.url, timeout=15, headers=keys.auth()) as c:

            @PROPERTY
            @given(st.sampled_from(ENDPOINTS).flatmap(lambda p: st.tuples(st.just(p), near_valid(p) | BODY | JSON)))
            def body_property(case: tuple[str, Any]) -> None:
                path, body = case
                try:
                    content = json.dumps(body).encode()  # NaN and Infinity as Python writes them
                except (UnicodeEncodeError, ValueError):
                    return
                r = c.post(path, content=content, headers={"content-type": "application/json"})
                _check(r, body, seen)

            @PROPERTY
            @given(st.sampled_from(ENDPOINTS), st.binary(max_size=200))
            def bytes_property(path: str, content: bytes) -> None:
                r = c.post(path, content=content, headers={"content-type": "application/json"})
                _check(r, content, seen)

            body_property()
            bytes_property()

    await asyncio.to_thread(run)
    log.info("statuses: %s", dict(sorted(seen.items())))
    assert seen[200] > 0  # some bodies were valid and served: the property reached the invocation path
