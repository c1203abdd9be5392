"""Settings sections for the messaging substrate (NATS)."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator


class NatsSettings(BaseModel):
    """Where the NATS server is, and as whom this process connects."""

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL, credentials included if any")
    connect_timeout_s: float = Field(5.0, description="seconds to wait for the first connection")
    inbox_prefix: str = Field(
        "_INBOX", description="prefix of this connection's inboxes (JetStream API replies, pulled messages); each "
        "component's NATS user may read only its own (protocol.nats_auth.inbox_prefix)")

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

    @field_validator("inbox_prefix")
    @classmethod
    def _inbox_token(cls, v: str) -> str:
        if not v or any(c in v for c in " *>\t\r\n") or v.startswith(".") or v.endswith("."):
            raise ValueError(f"inbox prefix {v!r} must be a plain subject (no wildcard, space or edge dot)")
        return v


class NatsCalloutSettings(BaseModel):
    """The NATS auth callout (run by the scheduler): it checks the credentials of tenants' direct clients
    against Postgres and answers the server with a signed grant (protocol.nats_auth)."""

    url: str | None = Field(None, description="NATS URL of the callout's own user (lorafn.auth); unset: no callout")
    issuer_seed: SecretStr | None = Field(None, description="account nkey seed (SA...) whose public key the server "
                                                             "names as the callout's issuer")
    grant_ttl_s: float = Field(600.0, ge=10.0, le=86400.0,
                               description="seconds a grant is valid; the server then closes the connection and "
                               "its reconnection is checked again (a revoked credential is out within this)")
    queue_group: str = Field("lorafn-auth", description="scheduler replicas share the requests in this group")

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @model_validator(mode="after")
    def _seed_with_url(self) -> NatsCalloutSettings:
        if self.url is not None and self.issuer_seed is None:
            raise ValueError("nats_callout.url is set but nats_callout.issuer_seed is not: the callout cannot sign")
        return self
