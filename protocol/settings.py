"""Settings sections for the messaging substrate (NATS).

A NATS URL setting may name several servers of one cluster, comma-separated
(`nats://u:p@nats-0:4222,nats://u:p@nats-1:4222`): a client connects to one of them and, when that server
goes away, reconnects to another (`servers` is the list to give nats-py). The JetStream durability
settings (`stream_replicas`, `stream_storage`) say how the streams are created: see protocol.streams and
docs/nats.md, "Cluster and durability".
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict


def service_settings_config() -> SettingsConfigDict:
    """The config of every service's settings class (gateway, scheduler, workers, the `lorafn` command): read
    from LORAFN_* variables, sections nested with "__", other variables ignored; a rejected value is named but
    not printed, since it may be a URL with its password or a secret key."""
    return SettingsConfigDict(env_prefix="LORAFN_", env_nested_delimiter="__", extra="ignore",
                              hide_input_in_errors=True)


NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


def split_nats_urls(value: str) -> list[str]:
    """The server URLs of a comma-separated NATS URL setting, each checked: a scheme of NATS_SCHEMES and a
    host after it. Raises ValueError naming the bad entry (without its credentials)."""
    urls = [part.strip() for part in value.split(",")]
    for url in urls:
        if not url:
            raise ValueError(f"NATS url list has an empty entry ({len(urls)} comma-separated entries)")
        if not url.startswith(NATS_SCHEMES):
            raise ValueError(f"NATS url {redact_url(url)!r} must start with nats://, tls://, ws:// or wss://"
                             + (" (several servers are separated by commas)" if len(urls) > 1 else ""))
        if not url.partition("://")[2].rpartition("@")[2]:
            raise ValueError(f"NATS url {redact_url(url)!r} names no server")
    return urls


def redact_url(url: str) -> str:
    """A server URL (NATS, Postgres, ...) without its credentials, for logs and errors: everything up to the last
    '@' goes, so a password holding '/' or '@' never shows (a path or query holding '@' shows cut short)."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # no scheme (a malformed setting): the credentials are still cut
        return url.rpartition("@")[2]
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


class NatsSettings(BaseModel):
    """Where the NATS servers are, as whom this process connects, and how durable the streams it creates are."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a rejected value may carry a password

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL, credentials included if any; several "
                     "servers of a cluster comma-separated (the client fails over between them)")
    connect_timeout_s: float = Field(5.0, description="seconds to wait for the first connection")
    inbox_prefix: str = Field(
        "_INBOX", description="prefix of this connection's inboxes (JetStream API replies, pulled messages); each "
        "component's NATS user may read only its own (protocol.nats_auth.inbox_prefix)")
    stream_replicas: int = Field(1, ge=1, le=5, description="copies of each stream on distinct servers of the "
                                 "cluster (JetStream's R; 3 survives the loss of one server)")
    stream_storage: Literal["file", "memory"] = Field(
        "file", description="where the streams keep their messages: file (survives a server restart) or memory")

    @property
    def servers(self) -> list[str]:
        """The server URLs to connect with (nats-py's `servers`)."""
        return split_nats_urls(self.url)

    @property
    def redacted_url(self) -> str:
        """The URL(s) without their credentials, for logs."""
        return ",".join(redact_url(u) for u in self.servers)

    @field_validator("url")
    @classmethod
    def _nats_scheme(cls, v: str) -> str:
        return ",".join(split_nats_urls(v))

    @field_validator("inbox_prefix")
    @classmethod
    def _inbox_token(cls, v: str) -> str:
        if not v or any(c in v for c in " *>\t\r\n") or v.startswith(".") or v.endswith("."):
            raise ValueError(f"inbox prefix {v!r} must be a plain subject (no wildcard, space or edge dot)")
        return v


class NatsCalloutSettings(BaseModel):
    """The NATS auth callout (run by the scheduler): it checks the credentials of tenants' direct clients
    against Postgres and answers the server with a signed grant (protocol.nats_auth)."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a rejected value may carry a password

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

    @property
    def servers(self) -> list[str]:
        """The server URLs of the callout's connection (comma-separated in `url`); empty when unset."""
        return [] if self.url is None else split_nats_urls(self.url)

    @field_validator("url")
    @classmethod
    def _nats_scheme(cls, v: str | None) -> str | None:
        return None if v is None else ",".join(split_nats_urls(v))

    @model_validator(mode="after")
    def _seed_with_url(self) -> NatsCalloutSettings:
        if self.url is not None and self.issuer_seed is None:
            raise ValueError("nats_callout.url is set but nats_callout.issuer_seed is not: the callout cannot sign")
        return self
