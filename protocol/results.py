"""Recording an invocation's result in the results stream: the one way workers, the scheduler's dead letters
and test peers do it.

A result goes to `lora.result.<id>` (de-duplicated by `result-<id>`). When the invocation asked for an
X-Callback-Url, a copy also goes to `lora.callback.<id>` (de-duplicated by `callback-<id>`): the gateway's
callback consumer reads only those, so the results of the (many) invocations without a callback cost the
gateway nothing. Both are published before the invocation is acked, so a crash between the two leaves the
invocation unacked: its redelivery finds the recorded result and calls `record_result` again, which the
de-duplication ids make harmless.
"""

from __future__ import annotations

from nats.js import JetStreamContext

from protocol import subjects


async def record_result(js: JetStreamContext, invocation_id: str, payload: bytes, *, callback: bool,
                        timeout: float = 5.0, headers: dict[str, str] | None = None) -> None:
    """Publish an encoded `InvocationResult` (and its callback copy when `callback`), awaiting the acks.

    headers: extra headers for both messages (e.g. the reply kind)
    Raises what `JetStreamContext.publish` raises; the caller retries (idempotent).
    """
    extra = headers or {}
    await js.publish(subjects.result(invocation_id), payload, timeout=timeout,
                     headers={**extra, subjects.MSG_ID_HEADER: subjects.result_msg_id(invocation_id)})
    if callback:
        await js.publish(subjects.callback(invocation_id), payload, timeout=timeout,
                         headers={**extra, subjects.MSG_ID_HEADER: subjects.callback_msg_id(invocation_id)})
