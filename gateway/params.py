"""Request parameters shared by the OpenAI-compatible and the FaaS APIs, validated into protocol types.

Prompt length: the gateway does not tokenize (it must not import workers/). It refuses a prompt longer
than `http.max_prompt_chars` characters (default 256 Ki, far above any context window, so it only stops
absurd requests cheaply); a prompt that fits that bound but not the model's context window fails on the
worker with `prompt_too_long`, which the gateway answers with 400.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.errors import BadRequest
from protocol.messages import ChatMessage, Sampling

MAX_STOP_SEQUENCES = 4
# Defaults when the caller gives no max_tokens: OpenAI's completions default (16), and a bound for chat
# and FaaS calls (OpenAI's chat default is "until the context is full", which no caller wants by accident).
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SamplingParams(BaseModel):
    """Sampling fields common to every invocation API (OpenAI names and ranges)."""

    model_config = ConfigDict(extra="ignore")

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

    def sampling(self, *, default_max_tokens: int, max_tokens: int | None = None) -> Sampling:
        """The protocol's Sampling, defaults filled in."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            max_tokens=max_tokens or self.max_tokens or default_max_tokens,
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
