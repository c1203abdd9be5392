"""The NATS auth callout: tenants' direct clients are let onto the bus by a credential checked in Postgres.

The server (configured by `protocol.nats_auth.server_config`) sends every connection that is not one of
lorafn's component users to `$SYS.REQ.USER.AUTH` as a signed authorization request. This service, run by
each scheduler (one queue group: the replicas share the requests), verifies the request's signature, looks
the presented user (a tenant's name) and password (its NATS credential) up in Postgres, and answers with a
user JWT signed by the callout's issuer key: the tenant's permissions (`tenant_permissions`: publish on
`lora.invoke.<tenant>.>`, read `lora.reply.<tenant>.>`), valid `grant_ttl_s`. Anything else is refused with
a reason the server logs. A credential created a second ago works at once; no server restart or reload.

Why in the scheduler: it already holds a Postgres pool and a NATS connection's worth of supervision, and a
bus with no scheduler dispatches nothing anyway. The issuer seed is given to the scheduler alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol import nats_auth, subjects
from protocol.settings import NatsCalloutSettings
from storage import repo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The callout's decision on one connection: the tenant it is let in as, or why not."""

    tenant: str | None
    reason: str = ""


class NatsCallout:
    """Run with `run(stop)`; `answer(request bytes)` is the whole decision (tests call it directly)."""

    def __init__(self, settings: NatsCalloutSettings, sessions: async_sessionmaker[AsyncSession], *,
                 clock: Callable[[], float] = time.time) -> None:
        if settings.url is None or settings.issuer_seed is None:
            raise ValueError("the NATS callout needs nats_callout.url and nats_callout.issuer_seed")
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.signer = nats_auth.Signer(settings.issuer_seed.get_secret_value())
        self.nc: NatsClient | None = None
        self.accepted = 0
        self.refused = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Answer authorization requests until `stop`."""
        assert self.settings.url is not None
        self.nc = await nats.connect(self.settings.servers, name="lorafn-auth-callout", max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.5, inbox_prefix=nats_auth.inbox_prefix("auth"))
        try:
            await self.nc.subscribe(nats_auth.AUTH_CALLOUT_SUBJECT, queue=self.settings.queue_group,
                                    cb=self._on_request)
            logger.info("NATS auth callout ready (issuer %s)", self.signer.public_key)
            await stop.wait()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.drain()

    async def _on_request(self, msg: Msg) -> None:
        answer = await self.answer(msg.data)
        if answer is None or not msg.reply:
            return  # not a request from our server: no answer (the server gives up after its auth timeout)
        try:
            await msg.respond(answer)
        except nats.errors.Error as e:
            logger.warning("NATS auth callout: answering failed: %s", e)

    async def answer(self, data: bytes) -> bytes | None:
        """The encoded authorization response to one request (None: the request itself is not valid)."""
        try:
            request = nats_auth.decode_jwt(data.decode("utf-8", "replace"), now=self.clock())
        except nats_auth.JwtInvalid as e:
            logger.warning("NATS auth callout: dropped a request that is not a signed server JWT (%s)", e)
            return None
        claims = request.get("nats") or {}
        if not str(request.get("iss", "")).startswith("N") or not claims.get("user_nkey"):
            logger.warning("NATS auth callout: dropped a request not issued by a server (iss %r)",
                           str(request.get("iss", ""))[:8])
            return None
        options = claims.get("connect_opts") or {}
        client = claims.get("client_info") or {}
        verdict = await self.decide(str(options.get("user") or ""), str(options.get("pass") or ""))
        host = client.get("host", "?")
        if verdict.tenant is None:
            self.refused += 1
            logger.warning("NATS auth callout: refused a connection from %s as %r: %s", host,
                           str(options.get("user") or "")[:64], verdict.reason)
            return nats_auth.authorization_response(request=request, signer=self.signer,
                                                    error=verdict.reason).encode()
        self.accepted += 1
        logger.info("NATS auth callout: tenant %s connected from %s", verdict.tenant, host)
        user = nats_auth.encode_jwt(nats_auth.user_claims(
            user_nkey=str(claims["user_nkey"]), name=f"tenant:{verdict.tenant}",
            permissions=nats_auth.tenant_permissions(verdict.tenant),
            expires_at=self.clock() + self.settings.grant_ttl_s,
        ), self.signer)
        return nats_auth.authorization_response(request=request, signer=self.signer, user_jwt=user).encode()

    async def decide(self, user: str, secret: str) -> Verdict:
        """Whether `user` (a tenant's name) may connect with password `secret` (one of its NATS credentials)."""
        if not subjects.NAME_PATTERN.match(user):
            return Verdict(None, "the user must be a tenant's name")
        if not secret:
            return Verdict(None, "no credential presented")
        try:
            async with self.sessions() as session, session.begin():
                row = await repo.find_nats_credential(session, tenant=user, secret=secret)
                if row is not None:
                    await repo.touch_nats_credential(session, credential_id=row.id)
        except (OSError, SQLAlchemyError) as e:
            logger.warning("NATS auth callout: credential lookup failed (%s)", e)
            return Verdict(None, "the credential store is unavailable; try again")
        if row is None:
            return Verdict(None, "unknown or revoked credential")
        return Verdict(user)
