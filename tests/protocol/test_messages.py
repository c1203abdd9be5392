"""Wire messages round-trip through msgpack, ignore unknown fields and refuse malformed bytes."""

from __future__ import annotations

import msgpack
import pytest

from protocol import subjects
from protocol.messages import (
    ErrorCode,
    Heartbeat,
    Invocation,
    InvocationError,
    InvocationResult,
    MessageInvalid,
    ResidentAdapter,
    Sampling,
    TokenChunk,
)


@pytest.mark.parametrize(
    "message",
    [
        Invocation(id="inv_1", tenant="acme", adapter="bot", version="a" * 64, prompt="hi",
                   sampling=Sampling(temperature=0, max_tokens=8, stop=["\n"], seed=3)),
        Invocation(id="inv-2", tenant="acme", messages=[{"role": "user", "content": "hello"}]),
        TokenChunk(invocation_id="inv_1", index=4, token_ids=[1, 2], text="ab"),
        InvocationResult(invocation_id="inv_1", status="failed",
                         error=InvocationError(code=ErrorCode.dead_letter, message="gave up after 3 deliveries")),
        Heartbeat(worker_id="w1", host="h", device="cpu", started_at=1.0,
                  resident=[ResidentAdapter(tenant="acme", adapter="bot", version="a" * 64, tier="device", pages=3)]),
        Heartbeat(worker_id="w1", host="h", device="cpu", started_at=1.0, resident_seq=7,
                  resident=[ResidentAdapter(version="a" * 64, tier="host", last_used=5.0)]),
        Heartbeat(worker_id="w1", host="h", device="cpu", started_at=1.0, resident_seq=8, resident_base=7,
                  resident=[ResidentAdapter(version="b" * 64, tier="device", pages=2, in_use=1)], removed=["a" * 64]),
    ],
)
def test_round_trip(message) -> None:  # type: ignore[no-untyped-def]
    assert type(message).decode(message.encode()) == message


def test_a_heartbeat_without_residency_numbers_is_full() -> None:
    """A sender that numbers no heartbeats (fields it does not know are absent) sends the whole residency."""
    old = {"worker_id": "w1", "host": "h", "device": "cpu", "started_at": 1.0,
           "resident": [{"version": "a" * 64, "tier": "device"}]}
    hb = Heartbeat.decode(msgpack.packb(old))
    assert hb.full and hb.resident_seq == 0 and hb.removed == []


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({"resident_seq": 3, "resident_base": 3}, "resident_base 3 is not before resident_seq 3"),
     ({"resident_seq": 0, "resident_base": 1}, "resident_base 1 is not before resident_seq 0"),
     ({"resident_seq": 2, "removed": ["a" * 64]}, "a full heartbeat removes nothing"),
     ({"resident_seq": -1}, "resident_seq")],
)
def test_inconsistent_residency_numbers_are_refused(fields: dict[str, object], reason: str) -> None:
    data = msgpack.packb({"worker_id": "w1", "host": "h", "device": "cpu", "started_at": 1.0, **fields})
    with pytest.raises(MessageInvalid, match=reason):
        Heartbeat.decode(data)


def test_unknown_fields_are_ignored_and_missing_ones_refused() -> None:
    data = msgpack.packb({"invocation_id": "x", "index": 0, "token_ids": [], "text": "", "future_field": 1})
    assert TokenChunk.decode(data).invocation_id == "x"
    with pytest.raises(MessageInvalid, match="TokenChunk"):
        TokenChunk.decode(msgpack.packb({"invocation_id": "x"}))
    with pytest.raises(MessageInvalid, match="not msgpack"):
        TokenChunk.decode(b"\xc1")
    with pytest.raises(MessageInvalid, match="expected a map"):
        TokenChunk.decode(msgpack.packb([1, 2]))


@pytest.mark.parametrize(
    "bad",
    [{"id": "has.dot", "tenant": "t"}, {"id": "ok", "tenant": "t", "sampling": {"temperature": -1}},
     {"id": "ok", "tenant": "t", "sampling": {"max_tokens": 0}},
     {"id": "ok", "tenant": "t", "messages": [{"role": "robot", "content": "x"}]}],
)
def test_invalid_invocations_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(MessageInvalid):
        Invocation.decode(msgpack.packb(bad))


def test_subjects_are_tokens() -> None:
    assert subjects.invoke("acme", "bot") == "lora.invoke.acme.bot"
    assert subjects.reply("inv_1") == "lora.reply.inv_1"
    assert subjects.control("w1", "load") == "lora.ctl.w1.load"
    for bad in ("a.b", "a b", "*", ">", "", "x" * 65):
        with pytest.raises(subjects.InvalidName):
            subjects.invoke("acme", bad)
    assert subjects.split_qualified_name("acme/bot") == ("acme", "bot")
    with pytest.raises(subjects.InvalidName):
        subjects.split_qualified_name("acme.bot")


def test_nats_url_is_redacted_for_logs() -> None:
    from protocol.settings import NatsSettings

    assert NatsSettings(url="nats://lorafn:s3cret@127.0.0.1:4222").redacted_url == "nats://127.0.0.1:4222"
    assert "s3cret" not in NatsSettings(url="tls://a:s3cret@host:1").redacted_url
