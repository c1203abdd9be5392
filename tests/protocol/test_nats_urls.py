"""NATS URL settings that name several servers of a cluster, and the streams' durability settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.settings import NatsCalloutSettings, NatsSettings, redact_url, split_nats_urls


def test_a_comma_separated_url_gives_every_server() -> None:
    s = NatsSettings(url="nats://u:pw@nats-0:4222, nats://u:pw@nats-1:4222 ,tls://u:pw@nats-2:4443")
    assert s.servers == ["nats://u:pw@nats-0:4222", "nats://u:pw@nats-1:4222", "tls://u:pw@nats-2:4443"]
    assert s.url == ",".join(s.servers)  # stored without the spaces
    assert NatsSettings(url="nats://127.0.0.1:4222").servers == ["nats://127.0.0.1:4222"]


def test_every_server_is_redacted() -> None:
    s = NatsSettings(url="nats://u:s3cret@nats-0:4222,nats://u:s3cret@nats-1:4222")
    assert s.redacted_url == "nats://nats-0:4222,nats://nats-1:4222"
    assert redact_url("ws://a:b@host:80") == "ws://host:80"
    assert redact_url("nats://host:1") == "nats://host:1"


@pytest.mark.parametrize("url, message", [
    ("nats://u:pw@a:1,http://u:s3cret@b:2", "'http://b:2' must start with nats://"),
    ("nats://a:1,", "empty entry"),
    ("nats://a:1,,nats://b:2", "empty entry"),
    ("nats://u:s3cret@", "names no server"),
    ("a:4222", "'a:4222' must start with nats://"),
])
def test_each_server_url_is_checked(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        split_nats_urls(url)
    assert "s3cret" not in str(raised.value)  # the message never shows a password
    with pytest.raises(ValidationError, match=message):
        NatsSettings(url=url)


def test_the_callout_url_takes_several_servers_too() -> None:
    callout = NatsCalloutSettings(url="nats://auth:pw@a:1,nats://auth:pw@b:2", issuer_seed="SA...")  # type: ignore[arg-type]
    assert callout.servers == ["nats://auth:pw@a:1", "nats://auth:pw@b:2"]
    assert NatsCalloutSettings().servers == []
    with pytest.raises(ValidationError, match="must start with"):
        NatsCalloutSettings(url="nats://a:1,b:2", issuer_seed="SA...")  # type: ignore[arg-type]


def test_stream_durability_settings() -> None:
    default = NatsSettings()
    assert (default.stream_replicas, default.stream_storage) == (1, "file")
    s = NatsSettings(stream_replicas=3, stream_storage="memory")
    assert (s.stream_replicas, s.stream_storage) == (3, "memory")
    for bad in (0, 6):
        with pytest.raises(ValidationError, match="stream_replicas"):
            NatsSettings(stream_replicas=bad)
    with pytest.raises(ValidationError, match="stream_storage"):
        NatsSettings(stream_storage="disk")  # type: ignore[arg-type]


def test_the_environment_names_of_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.settings import WorkerSettings

    monkeypatch.setenv("LORAFN_NATS__URL", "nats://w:pw@n0:4222,nats://w:pw@n1:4222")
    monkeypatch.setenv("LORAFN_NATS__STREAM_REPLICAS", "3")
    monkeypatch.setenv("LORAFN_NATS__STREAM_STORAGE", "memory")
    nats = WorkerSettings().nats
    assert nats.servers == ["nats://w:pw@n0:4222", "nats://w:pw@n1:4222"]
    assert (nats.stream_replicas, nats.stream_storage) == (3, "memory")
