"""Settings sections for the messaging substrate (NATS)."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator


class NatsSettings(BaseModel):
    """Where the NATS server is."""

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL, credentials included if any")
    connect_timeout_s: float = Field(5.0, description="seconds to wait for the first connection")

    @property
    def redacted_url(self) -> str:
        """The URL without its credentials, for logs."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    @field_validator("url")
    @classmethod
    def _nats_scheme(cls, v: str) -> str:
        if not v.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError(f"NATS url {v!r} must start with nats://, tls://, ws:// or wss://")
        return v
