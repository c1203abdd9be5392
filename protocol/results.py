"""Recording an invocation's result in the results stream: the one way workers, the scheduler's dead letters
and test peers do it.

A result goes to `lora.result.<id>` (de-duplicated by `result-<id>`). When the invocation asked for an
X-Callback-Url, a copy also goes to `lora.callback.<id>` (de-duplicated by `callback-<id>`): the gateway's
callback consumer reads only those, so the results of the (many) invocations without a callback cost the
gateway nothing. Both are published before the invocation is acked, so a crash between the two leaves the
invocation unacked: its redelivery finds the recorded result and calls `record_result` again, which the
de-duplication ids make harmless.

The first result recorded is the outcome: a cancel (`gateway.invoker.Invoker.cancel`) records a `cancelled`
result, and a worker that finishes the invocation afterwards has its own result dropped as a duplicate
(`record_result` returns False: it then answers with the recorded one).
"""

from __future__ import annotations

from nats.js import JetStreamContext

from protocol import subjects


async def record_result(js: JetStreamContext, invocation_id: str, payload: bytes, *, callback: bool,
                        timeout: float = 5.0, headers: dict[str, str] | None = None) -> bool:
    """Publish an encoded `InvocationResult` (and its callback copy when `callback`), awaiting the acks.

    headers: extra headers for both messages (e.g. the reply kind)
    Returns False when the stream already held a result of this invocation (within its duplicate window):
    this one was dropped, and the recorded one is the invocation's outcome (a cancel that came first, or the
    first copy of a redelivered invocation). Raises what `JetStreamContext.publish` raises; the caller retries
    (idempotent).
    """
    extra = headers or {}
    ack = await js.publish(subjects.result(invocation_id), payload, timeout=timeout,
                           headers={**extra, subjects.MSG_ID_HEADER: subjects.result_msg_id(invocation_id)})
    if callback:
        await record_callback(js, invocation_id, payload, timeout=timeout, headers=headers)
    return not ack.duplicate


async def record_callback(js: JetStreamContext, invocation_id: str, payload: bytes, *, timeout: float = 5.0,
                          headers: dict[str, str] | None = None) -> None:
    """Publish only the callback copy of a result (de-duplicated by `callback-<id>`)."""
    await js.publish(subjects.callback(invocation_id), payload, timeout=timeout,
                     headers={**(headers or {}), subjects.MSG_ID_HEADER: subjects.callback_msg_id(invocation_id)})
