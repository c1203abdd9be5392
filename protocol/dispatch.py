"""Moving an invocation between the invocations stream and the workers' work subjects: the one way the
dispatcher, a rescue and a stopping worker do it.

- `dispatch` publishes an invocation to `lora.work.<worker>` with its `WorkHeaders` (de-duplicated by the
  sequence of its message in the invocations stream, so a dispatcher that dies between this publish and its
  ack puts it on one worker once).
- `requeue` publishes it back to its `lora.invoke.<tenant>.<adapter>` subject for the next epoch (de-duplicated
  by `<id>-epoch-<n>`: two schedulers rescuing the same dead worker requeue it once), keeping the time it
  first arrived. A dispatcher then routes it like any other invocation.
- `requeue_subject` requeues everything left on a worker's work subject, then deletes it there: a worker
  that is stopping hands its queue back; the dispatcher rescues the work of a worker that went silent; a
  worker restarted with its id hands back what its previous process had taken (up to a stream sequence).
  Publish first, delete second: a crash in between leaves a copy on both, and the copy on the dead worker's
  subject is requeued again under the same de-duplication id.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from protocol import subjects
from protocol.messages import BASE_ADAPTER, Invocation, MessageInvalid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkHeaders:
    """What travels with an invocation besides its body (see protocol.subjects for each header)."""

    epoch: int = 1
    arrived_at: float | None = None  # unix seconds it first reached the invocations stream
    subject: str | None = None  # the lora.invoke subject it was published to
    route: str | None = None  # why the dispatcher chose the worker

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> WorkHeaders:
        h = headers or {}
        try:
            epoch = max(1, int(h.get(subjects.EPOCH_HEADER, "1")))
        except ValueError:
            epoch = 1
        try:
            arrived = float(h[subjects.ARRIVED_HEADER]) if subjects.ARRIVED_HEADER in h else None
        except ValueError:
            arrived = None
        return cls(epoch, arrived, h.get(subjects.SUBJECT_HEADER), h.get(subjects.ROUTE_HEADER))

    @classmethod
    def read(cls, msg: Msg) -> WorkHeaders:
        return cls.from_headers(msg.headers)

    def headers(self) -> dict[str, str]:
        out = {subjects.EPOCH_HEADER: str(self.epoch)}
        if self.arrived_at is not None:
            out[subjects.ARRIVED_HEADER] = f"{self.arrived_at:.6f}"
        if self.subject is not None:
            out[subjects.SUBJECT_HEADER] = self.subject
        if self.route is not None:
            out[subjects.ROUTE_HEADER] = self.route
        return out


def invoke_subject(inv: Invocation) -> str:
    """The lora.invoke subject of an invocation."""
    return subjects.invoke(inv.tenant, inv.adapter if inv.adapter is not None else BASE_ADAPTER)


async def dispatch(js: JetStreamContext, data: bytes, source_seq: int, worker_id: str, work: WorkHeaders,
                   *, timeout: float = 5.0) -> None:
    """Put an encoded invocation (message `source_seq` of the invocations stream) on `worker_id`'s work
    subject, awaiting the stream's ack."""
    await js.publish(subjects.work(worker_id), data, timeout=timeout, headers={
        **work.headers(), subjects.MSG_ID_HEADER: subjects.dispatch_msg_id(source_seq),
    })


async def requeue(js: JetStreamContext, data: bytes, inv: Invocation, work: WorkHeaders, *,
                  timeout: float = 5.0) -> None:
    """Publish an invocation back to the invocations stream for its next dispatch (epoch + 1)."""
    subject = work.subject or invoke_subject(inv)
    nxt = WorkHeaders(epoch=work.epoch + 1, arrived_at=work.arrived_at, subject=subject)
    await js.publish(subject, data, timeout=timeout, headers={
        **nxt.headers(), subjects.MSG_ID_HEADER: subjects.requeue_msg_id(inv.id, nxt.epoch),
    })


async def requeue_subject(js: JetStreamContext, worker_id: str, *, up_to: int | None = None) -> int:
    """Requeue every invocation on `worker_id`'s work subject (those stored at stream sequence `up_to` or
    before, when given) and delete it there; how many."""
    subject = subjects.work(worker_id)
    seq, count = 1, 0
    while True:
        try:
            raw = await js.get_msg(subjects.WORK_STREAM, seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return count
        assert raw.seq is not None
        if up_to is not None and raw.seq > up_to:
            return count
        data = raw.data or b""
        try:
            inv = Invocation.decode(data)
        except MessageInvalid as e:
            logger.error("dropping an undecodable work message %d on %s: %s", raw.seq, subject, e)
        else:
            await requeue(js, data, inv, WorkHeaders.from_headers(dict(raw.headers or {})))
            count += 1
        # NotFound: acked by its worker meanwhile (it finished); the requeued copy finds the recorded result.
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_msg(subjects.WORK_STREAM, raw.seq)
        seq = raw.seq + 1
