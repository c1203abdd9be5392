"""Handing a worker's work back for its next dispatch (protocol/dispatch.requeue_subject), on a real NATS: all of
it (a stopping worker, a rescue), or only what was stored up to a stream sequence (a restarted worker hands back
what its previous process had taken and keeps what was queued for it since)."""

from __future__ import annotations

import secrets
from typing import Any

import nats

from protocol import subjects
from protocol.dispatch import WorkHeaders, dispatch, requeue_subject
from protocol.messages import Invocation, Sampling
from protocol.streams import ensure_streams


async def test_requeue_all_or_up_to_a_sequence(services: Any) -> None:
    nc = await nats.connect(services.nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        tenant, worker = f"rq{secrets.token_hex(3)}", f"rq-{secrets.token_hex(3)}"
        subject = f"lora.invoke.{tenant}.a"
        calls = [Invocation(id=f"inv-{secrets.token_hex(6)}", tenant=tenant, adapter="a", prompt=f"p{i}",
                            sampling=Sampling(max_tokens=2)) for i in range(5)]
        for i, inv in enumerate(calls):
            await dispatch(js, inv.encode(), secrets.randbits(40), worker,
                           WorkHeaders(epoch=1 + (i == 0), arrived_at=100.0 + i, subject=subject))

        async def on_work() -> int:
            info = await js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.work(worker))
            return int((info.state.subjects or {}).get(subjects.work(worker), 0))

        assert await on_work() == 5
        last_seq = (await js.get_last_msg(subjects.WORK_STREAM, subjects.work(worker))).seq
        assert last_seq is not None
        # The first three (stored at sequences last_seq - 4 .. last_seq - 2) were "delivered" before a restart.
        assert await requeue_subject(js, worker, up_to=last_seq - 2) == 3
        assert await on_work() == 2  # the two stored after stay on the worker's subject

        info = await js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subject)
        assert (info.state.subjects or {}).get(subject) == 3
        seq = info.state.first_seq
        back: list[tuple[str, WorkHeaders]] = []
        while len(back) < 3:
            raw = await js.get_msg(subjects.INVOCATIONS_STREAM, seq, subject=subject, next=True)
            assert raw.seq is not None
            back.append((Invocation.decode(raw.data or b"").id, WorkHeaders.from_headers(dict(raw.headers or {}))))
            seq = raw.seq + 1
        assert [i for i, _ in back] == [c.id for c in calls[:3]]
        assert [(h.epoch, h.arrived_at, h.subject) for _, h in back] == [
            (3, 100.0, subject), (2, 101.0, subject), (2, 102.0, subject)]  # the next epoch, first arrival kept

        assert await requeue_subject(js, worker) == 2  # no limit: everything left
        assert await on_work() == 0
    finally:
        await nc.close()
