"""Request parameters shared by the OpenAI-compatible and the FaaS APIs, validated into protocol types.

Prompt length: the gateway does not tokenize (it must not import workers/). It refuses a prompt longer
than `http.max_prompt_chars` characters (default 256 Ki, far above any context window, so it only stops
absurd requests cheaply); a prompt that fits that bound but not the model's context window fails on the
worker with `prompt_too_long`, which the gateway answers with 400.

`max_tokens` is bounded by the smaller of the deployment's cap (`gateway.limits.max_tokens`) and the model's
context window; above it a call is refused with 400 before anything is recorded. The gateway cannot count the
prompt's tokens, so the worker still clamps `max_tokens` to the room the prompt leaves (finish_reason length).

Everything here runs while the body is validated, so a refused request leaves no invocation row: text that is
not valid Unicode (a lone UTF-16 surrogate, which JSON's `\\ud800` escape can carry and which cannot be
encoded as UTF-8 for the bus), and OpenAI parameters lorafn does not implement (`UNSUPPORTED_*`), refused with
code `unsupported_parameter` rather than silently ignored unless their value means "not used".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.errors import BadRequest
from protocol.messages import ChatMessage, Sampling

MAX_STOP_SEQUENCES = 4
# Defaults when the caller gives no max_tokens: OpenAI's completions default (16), and a bound for chat
# and FaaS calls (OpenAI's chat default is "until the context is full", which no caller wants by accident).
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Unsupported:
    """An OpenAI parameter lorafn does not implement: refused unless `unused(value)` (the value a client sends
    when it does not use the feature: some send defaults such as `presence_penalty: 0` explicitly)."""

    unused: Callable[[Any], bool]
    why: str


def _is_none_or(*values: Any) -> Callable[[Any], bool]:
    # `is` for booleans: 0 == False, and `logprobs: 0` on /v1/completions asks for the chosen tokens' logprobs.
    return lambda v: v is None or any(v is x if isinstance(x, bool) else (type(v) is type(x) and v == x)
                                      for x in values)


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


_NO_LOGPROBS = "log probabilities are not returned by lorafn's workers"
_NO_TOOLS = "lorafn generates plain text: no tool or function calling"
UNSUPPORTED_SAMPLING: Mapping[str, Unsupported] = {
    "logit_bias": Unsupported(_empty, "lorafn's sampler has no logit bias"),
    "presence_penalty": Unsupported(_is_none_or(0, 0.0), "lorafn's sampler has no presence penalty"),
    "frequency_penalty": Unsupported(_is_none_or(0, 0.0), "lorafn's sampler has no frequency penalty"),
    "logprobs": Unsupported(_is_none_or(False), _NO_LOGPROBS),
    "top_logprobs": Unsupported(_is_none_or(0), _NO_LOGPROBS),
    "response_format": Unsupported(lambda v: v is None or v == {"type": "text"},
                                   "lorafn generates plain text: no JSON mode or structured output"),
}
UNSUPPORTED_CHAT: Mapping[str, Unsupported] = {
    **UNSUPPORTED_SAMPLING,
    "tools": Unsupported(_empty, _NO_TOOLS),
    "tool_choice": Unsupported(_is_none_or("none"), _NO_TOOLS),
    "functions": Unsupported(_empty, _NO_TOOLS),
    "function_call": Unsupported(_is_none_or("none"), _NO_TOOLS),
    "audio": Unsupported(_is_none_or(), "lorafn serves text only"),
    "modalities": Unsupported(lambda v: v is None or v == ["text"], "lorafn serves text only"),
    "prediction": Unsupported(_is_none_or(), "lorafn has no predicted outputs"),
}
UNSUPPORTED_COMPLETION: Mapping[str, Unsupported] = {
    **UNSUPPORTED_SAMPLING,
    "echo": Unsupported(_is_none_or(False), "the prompt is not echoed"),
    "suffix": Unsupported(_is_none_or(""), "lorafn does not insert text before a suffix"),
    "best_of": Unsupported(_is_none_or(1), "lorafn generates one candidate per request (best_of=1)"),
}


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where (a dotted path) the JSON value holds a string with a lone UTF-16 surrogate, or None.

    Such a string cannot be encoded as UTF-8 (the bus, Postgres, the response); a valid pair of escapes
    already decodes to one code point, so any surrogate left in a Python str is a lone one.
    """
    if isinstance(value, str):
        return path or "body" if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and lone_surrogate_at(k) is not None:
                return path or "body"
            found = lone_surrogate_at(v, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = lone_surrogate_at(v, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class TokenLimit:
    """The most tokens a call may ask to generate: the deployment's cap and the model's context window."""

    cap: int
    context: int

    @property
    def bound(self) -> int:
        return min(self.cap, self.context)

    def check(self, value: int | None, *, param: str) -> None:
        """400 for a `max_tokens` above the bound (huge integers included: they must never reach the bus)."""
        if value is None or value <= self.bound:
            return
        if self.context <= self.cap:
            why = f"the model's context window of {self.context} tokens"
        else:
            why = f"this deployment's limit of {self.cap} tokens"
        shown = str(value) if value < 10**30 else f"a {len(str(value))}-digit number"
        raise BadRequest(f"{param} is {shown}, above {why}", param=param, code="max_tokens_too_large")


class SamplingParams(BaseModel):
    """Sampling fields common to every invocation API (OpenAI names and ranges)."""

    model_config = ConfigDict(extra="ignore")
    unsupported: ClassVar[Mapping[str, Unsupported]] = UNSUPPORTED_SAMPLING

    @model_validator(mode="before")
    @classmethod
    def _refuse_before_parsing(cls, data: Any) -> Any:
        """Lone surrogates anywhere in the body and parameters lorafn does not implement (see the module
        docstring); the error's `param` travels in its context (errors.py reads it)."""
        if not isinstance(data, dict):
            return data
        where = lone_surrogate_at(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode", "{param} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                "text must be valid Unicode", {"param": where})
        for name, rule in cls.unsupported.items():
            if name in data and not rule.unused(data[name]):
                raise PydanticCustomError(
                    "unsupported_parameter", "Unsupported parameter: '{param}' is not supported ({why}); "
                    "remove it or send its default", {"param": name, "why": rule.why})
        return data

    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(None, description="up to 4 stop sequences")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return v

    def sampling(self, *, default_max_tokens: int, limit: TokenLimit, max_tokens: int | None = None,
                 max_tokens_param: str = "max_tokens") -> Sampling:
        """The protocol's Sampling, defaults filled in; BadRequest for a max_tokens above `limit`.

        `max_tokens` (named `max_tokens_param`) overrides the body's own field (chat's max_completion_tokens);
        the default is lowered to the limit rather than refused (the caller did not ask for it).
        """
        limit.check(self.max_tokens, param="max_tokens")
        limit.check(max_tokens, param=max_tokens_param)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            max_tokens=max_tokens or self.max_tokens or min(default_max_tokens, limit.bound),
            stop=stop,
        )


class TextPart(BaseModel):
    """A text content part of a chat message (the only kind a text model serves)."""

    type: Literal["text"]
    text: str


class MessageParam(BaseModel):
    """A chat message as OpenAI clients send it; `developer` is the newer name of `system`."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def to_protocol(self) -> ChatMessage:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=content)


def chat_messages(messages: list[MessageParam], *, max_chars: int) -> list[ChatMessage]:
    """Protocol messages of a chat, refusing one longer than the character bound."""
    out = [m.to_protocol() for m in messages]
    check_prompt_chars(sum(len(m.content) for m in out), max_chars=max_chars, param="messages")
    return out


def check_prompt_chars(n: int, *, max_chars: int, param: str) -> None:
    """400 for a prompt over the gateway's cheap character bound (see the module docstring)."""
    if n > max_chars:
        raise BadRequest(
            f"the prompt has {n} characters, above the limit of {max_chars}; it cannot fit the context window",
            param=param, code="prompt_too_long",
        )
