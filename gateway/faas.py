"""The plain FaaS API: POST /v1/functions/<tenant>/<adapter>/invocations, GET /v1/invocations/<id> and
POST /v1/invocations/<id>/cancel.

Synchronous by default; `Prefer: respond-async` answers 202 at once. `X-Callback-Url` has the result
POSTed there when it is ready (gateway/callbacks.py); `Idempotency-Key` makes a retried call return the
first call's invocation. A synchronous caller that disconnects cancels its invocation; any invocation of the
caller's that has not finished can be cancelled explicitly.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import model_validator

from gateway.auth import current_tenant
from gateway.callbacks import check_callback_url
from gateway.errors import BadRequest, error_body
from gateway.invoker import Call, InvocationRequest, invocation_json, request_hash, result_json
from gateway.openai_api import serve, token_limit
from gateway.params import (
    DEFAULT_CHAT_MAX_TOKENS,
    MessageParam,
    SamplingParams,
    chat_messages,
    check_prompt_chars,
)
from gateway.state import GatewayState, gateway_of, remember_headers
from protocol.messages import InvocationResult
from storage.models import Tenant

router = APIRouter()

MAX_IDEMPOTENCY_KEY = 256  # the invocations.idempotency_key column


class FunctionCall(SamplingParams):
    """Body of a FaaS invocation: exactly one of `prompt` and `messages`, and sampling."""

    prompt: str | None = None
    messages: list[MessageParam] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> FunctionCall:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' and 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self


def _prefers_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "respond-async" for p in prefer.replace(";", ",").split(","))


@router.post("/v1/functions/{owner}/{adapter}/invocations")
async def invoke_function(
    owner: str, adapter: str, params: FunctionCall, request: Request, tenant: Tenant = Depends(current_tenant),
    gw: GatewayState = Depends(gateway_of),
) -> Any:
    """Invoke `owner/adapter` (the caller's own) with a prompt or chat messages."""
    options = gw.settings.gateway
    callback = request.headers.get("x-callback-url")
    if callback is not None:
        await check_callback_url(callback, options.callbacks)  # 400 for a private address (gateway/callbacks.py)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", param="Idempotency-Key")
    sampling = params.sampling(default_max_tokens=DEFAULT_CHAT_MAX_TOKENS, limit=token_limit(gw))
    if params.messages is not None:
        inv = InvocationRequest(None, chat_messages(params.messages, max_chars=options.http.max_prompt_chars),
                                sampling)
    else:
        assert params.prompt is not None
        check_prompt_chars(len(params.prompt), max_chars=options.http.max_prompt_chars, param="prompt")
        inv = InvocationRequest(params.prompt, None, sampling)
    target = await gw.target_of(owner, adapter, tenant)
    if _prefers_async(request):
        body = await request.body()
        submission = await gw.invoker.submit(
            target, inv, sync=False, stream=False, body_hash=request_hash(request.url.path.encode(), body),
            idempotency_key=key, callback_url=callback,
        )
        headers = {"x-lorafn-invocation-id": submission.invocation_id,
                   "Location": f"/v1/invocations/{submission.invocation_id}", "Preference-Applied": "respond-async"}
        remember_headers(request, headers)
        return JSONResponse({"id": submission.invocation_id, "object": "invocation", "status": submission.status},
                            status_code=202, headers=headers)

    def body_of(call: Call, result: InvocationResult) -> dict[str, Any]:
        out = result_json(result)
        out["id"] = call.invocation_id
        return out

    return await serve(request, gw, target, inv, stream=False, on_result=body_of, callback_url=callback)


@router.post("/v1/invocations/{invocation_id}/cancel")
async def cancel_invocation(
    invocation_id: str, request: Request, tenant: Tenant = Depends(current_tenant),
    gw: GatewayState = Depends(gateway_of),
) -> Any:
    """Cancel an invocation of the caller's that is queued or running: it never runs, or its worker stops it
    and frees what it held. Idempotent (a cancelled invocation answers 200 again); 409 with the final status
    when it already finished; 404 for an id the caller cannot see."""
    verdict, view = await gw.invoker.cancel(tenant, invocation_id)
    headers = {"x-lorafn-invocation-id": invocation_id}
    remember_headers(request, headers)
    if verdict == "finished":
        body = error_body(409, f"invocation {invocation_id} already {view.status}; only a queued or running "
                               f"invocation can be cancelled", code="invocation_finished")
        body["error"]["status"] = view.status  # the final status, as GET /v1/invocations/<id> shows it
        return JSONResponse(body, status_code=409, headers=headers)
    return JSONResponse(invocation_json(view), headers=headers)


@router.get("/v1/invocations/{invocation_id}")
async def get_invocation(
    invocation_id: str, request: Request, tenant: Tenant = Depends(current_tenant),
    gw: GatewayState = Depends(gateway_of),
) -> Any:
    """An invocation of the caller's: status, result or error, timestamps."""
    view = await gw.invoker.lookup(tenant, invocation_id)
    headers = {"x-lorafn-invocation-id": invocation_id}
    if view.result is not None:
        if view.result.adapter_tier is not None:
            headers["x-lorafn-adapter-tier"] = view.result.adapter_tier
        if view.result.timings.load_ms is not None:
            headers["x-lorafn-load-ms"] = f"{view.result.timings.load_ms:.1f}"
    remember_headers(request, headers)
    return JSONResponse(invocation_json(view), headers=headers)
