"""OpenAI-compatible API: /v1/completions, /v1/chat/completions (streaming as server-sent events) and
/v1/models. `model` is `<tenant>/<adapter>`, or the base model's name (or "base") for no adapter. The
official `openai` client works against it unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from gateway.auth import current_tenant
from gateway.errors import BadRequest, GatewayError, InvocationFailed, error_status
from gateway.invoker import (
    CLIENT_CLOSED_REQUEST,
    Call,
    ClientGone,
    InvocationRequest,
    Target,
    cancel_when_gone,
    request_hash,
)
from gateway.params import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    MessageParam,
    SamplingParams,
    TokenLimit,
    Unsupported,
    chat_messages,
    check_prompt_chars,
)
from gateway.state import GatewayState, gateway_of, remember_headers
from protocol.messages import ErrorCode, InvocationResult, InvocationStarted, TokenChunk
from storage import repo
from storage.models import Tenant

router = APIRouter()

Kind = Literal["chat", "completion"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIParams(SamplingParams):
    """Fields both OpenAI endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    n: int = Field(1, ge=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def check_n(self) -> None:
        if self.n != 1:
            raise BadRequest(f"n={self.n} is not supported: lorafn returns one choice per request (n=1)",
                             param="n", code="unsupported_parameter")


class CompletionRequest(OpenAIParams):
    unsupported: ClassVar[Mapping[str, Unsupported]] = UNSUPPORTED_COMPLETION

    prompt: str | list[str]


class ChatCompletionRequest(OpenAIParams):
    unsupported: ClassVar[Mapping[str, Unsupported]] = UNSUPPORTED_CHAT

    messages: list[MessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def token_limit(gw: GatewayState) -> TokenLimit:
    """The largest max_tokens a call may ask for here: the deployment's cap and the backbone's context window."""
    return TokenLimit(cap=gw.settings.gateway.limits.max_tokens,
                      context=int(gw.registry.spec.max_position_embeddings))


def _finish_reason(result: InvocationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(result: InvocationResult) -> dict[str, int]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Chunks:
    """Builds the SSE objects of one streamed response."""

    def __init__(self, kind: Kind, invocation_id: str, model: str) -> None:
        self.kind, self.id, self.model, self.created = kind, invocation_id, model, int(time.time())

    def _wrap(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def text(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {"content": text} if text else {}
            return self._wrap([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        return self._wrap([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])

    def role(self) -> dict[str, Any]:
        return self._wrap([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}])

    def usage(self, result: InvocationResult) -> dict[str, Any]:
        return self._wrap([], usage=_usage(result))


async def _stream_body(
    gw: GatewayState, call: Call, events: AsyncIterator[Any], first: Any, kind: Kind, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body: role (chat), text deltas, the finish chunk, usage if asked, then [DONE]."""
    chunks = _Chunks(kind, call.invocation_id, model)
    streamed: list[str] = []
    try:
        if kind == "chat":
            yield _sse(chunks.role())
        event = first
        while True:
            if isinstance(event, TokenChunk) and event.text:
                streamed.append(event.text)
                yield _sse(chunks.text(event.text))
            elif isinstance(event, InvocationResult):
                gw.invoker.observe(call, event)
                if event.status != "succeeded":
                    error = event.error
                    exc = InvocationFailed(call.invocation_id, error.code if error else ErrorCode.internal,
                                           error.message if error else "the invocation failed")
                    yield _sse(error_status(exc)[1])
                else:
                    sent = "".join(streamed)
                    rest = event.text[len(sent):] if event.text.startswith(sent) else ""
                    if rest:  # chunks the worker did not send (or that were lost) are in the result
                        yield _sse(chunks.text(rest))
                    yield _sse(chunks.text("", finish_reason=_finish_reason(event)))
                    if include_usage:
                        yield _sse(chunks.usage(event))
                break
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
    except GatewayError as e:  # the sync timeout, mid-stream: tell the client in-band
        yield _sse(error_status(e)[1])
    finally:
        if not call.ended:  # the server stopped this body before the result: the client went away
            call.gone()
        await call.close()
    yield b"data: [DONE]\n\n"


class _CallStream(StreamingResponse):
    """The SSE response of a call: if it ends before the call did (the client went away, even before the body
    began, when the body's own cleanup never runs), the call's invocation is cancelled."""

    def __init__(self, call: Call, content: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.gone()  # nothing once the call has ended
            await self.call.close()


async def serve(
    request: Request, gw: GatewayState, target: Target, inv: InvocationRequest, *, stream: bool,
    on_result: Any, stream_kind: Kind | None = None, model: str = "", include_usage: bool = False,
    callback_url: str | None = None,
) -> Any:
    """Submit a synchronous invocation and answer with its result (JSON) or its stream (SSE)."""
    body = await request.body()
    submission = await gw.invoker.submit(
        target, inv, sync=True, stream=stream, body_hash=request_hash(request.url.path.encode(), body),
        idempotency_key=request.headers.get("idempotency-key"), callback_url=callback_url,
    )
    call = submission.call
    assert call is not None
    remember_headers(request, call.headers())
    if not stream or stream_kind is None:
        try:
            with cancel_when_gone(call, request.receive):  # a client that goes away cancels its invocation
                result = await call.result()
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            await call.close()
            remember_headers(request, call.headers())
        gw.invoker.observe(call, result)
        if result.status != "succeeded":
            error = result.error
            raise InvocationFailed(call.invocation_id, error.code if error else ErrorCode.internal,
                                   error.message if error else "the invocation failed")
        return JSONResponse(on_result(call, result), headers=call.headers())
    # Headers go out with the first event (started, a chunk or the result): they carry the adapter's tier.
    events = call.events()
    try:
        with cancel_when_gone(call, request.receive):  # until the stream begins; then the server watches
            first = await anext(events)
            while isinstance(first, InvocationStarted) and call.tier is None:
                first = await anext(events)
    except ClientGone:
        await call.close()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except BaseException:
        await call.close()
        remember_headers(request, call.headers())
        raise
    remember_headers(request, call.headers())
    if isinstance(first, InvocationResult) and first.status != "succeeded":
        await call.close()
        gw.invoker.observe(call, first)
        error = first.error
        raise InvocationFailed(call.invocation_id, error.code if error else ErrorCode.internal,
                               error.message if error else "the invocation failed")
    headers = {**call.headers(), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _CallStream(call, _stream_body(gw, call, events, first, stream_kind, model, include_usage), headers)


@router.post("/v1/completions")
async def completions(
    params: CompletionRequest, request: Request, tenant: Tenant = Depends(current_tenant),
    gw: GatewayState = Depends(gateway_of),
) -> Any:
    """OpenAI text completion of `prompt` by the adapter named in `model`."""
    params.check_n()
    if isinstance(params.prompt, list):
        if len(params.prompt) != 1:
            raise BadRequest(f"prompt must be one string (a list of {len(params.prompt)} was sent)",
                             param="prompt", code="unsupported_parameter")
        prompt = params.prompt[0]
    else:
        prompt = params.prompt
    check_prompt_chars(len(prompt), max_chars=gw.settings.gateway.http.max_prompt_chars, param="prompt")
    sampling = params.sampling(default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, limit=token_limit(gw))
    target = await gw.target_of_model(params.model, tenant)
    inv = InvocationRequest(prompt, None, sampling)

    def body(call: Call, result: InvocationResult) -> dict[str, Any]:
        return {
            "id": call.invocation_id, "object": "text_completion", "created": int(time.time()),
            "model": params.model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": _finish_reason(result)}],
            "usage": _usage(result),
        }

    include_usage = bool(params.stream_options and params.stream_options.include_usage)
    return await serve(request, gw, target, inv, stream=params.stream, on_result=body, stream_kind="completion",
                       model=params.model, include_usage=include_usage)


@router.post("/v1/chat/completions")
async def chat_completions(
    params: ChatCompletionRequest, request: Request, tenant: Tenant = Depends(current_tenant),
    gw: GatewayState = Depends(gateway_of),
) -> Any:
    """OpenAI chat completion of `messages` by the adapter named in `model`."""
    params.check_n()
    messages = chat_messages(params.messages, max_chars=gw.settings.gateway.http.max_prompt_chars)
    sampling = params.sampling(default_max_tokens=DEFAULT_CHAT_MAX_TOKENS, limit=token_limit(gw),
                               max_tokens=params.max_completion_tokens, max_tokens_param="max_completion_tokens")
    target = await gw.target_of_model(params.model, tenant)
    inv = InvocationRequest(None, messages, sampling)

    def body(call: Call, result: InvocationResult) -> dict[str, Any]:
        return {
            "id": call.invocation_id, "object": "chat.completion", "created": int(time.time()),
            "model": params.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": _finish_reason(result)}],
            "usage": _usage(result),
        }

    include_usage = bool(params.stream_options and params.stream_options.include_usage)
    return await serve(request, gw, target, inv, stream=params.stream, on_result=body, stream_kind="chat",
                       model=params.model, include_usage=include_usage)


@router.get("/v1/models")
async def models(tenant: Tenant = Depends(current_tenant), gw: GatewayState = Depends(gateway_of)) -> dict[str, Any]:
    """The caller's adapters (`<tenant>/<name>`) and the base model they all run on."""
    async with gw.sessions() as session:
        adapters = await repo.list_adapters(session, tenant=tenant)
    data: list[dict[str, Any]] = [
        {"id": gw.base_model, "object": "model", "created": 0, "owned_by": "lorafn", "root": gw.base_model,
         "parent": None, "base_model": None},
    ]
    for a in adapters:
        if a.current_version is None:
            continue
        data.append({
            "id": f"{tenant.name}/{a.name}", "object": "model", "created": int(a.created_at.timestamp()),
            "owned_by": tenant.name, "root": gw.base_model, "parent": gw.base_model, "base_model": gw.base_model,
            "version": a.current_version.sha256, "max_rank": a.current_version.max_rank,
        })
    return {"object": "list", "data": data}
