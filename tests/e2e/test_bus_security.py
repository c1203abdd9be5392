"""Tenant isolation on the bus, against the real nats-server of the session (per-component users, the auth
callout run by the scheduler) and the e2e cluster (gateway, scheduler, two worker processes).

- A tenant's NATS credential (`lorafn keys create --nats`) invokes its own adapter directly and reads its
  reply; it can neither publish on another tenant's subjects nor read another tenant's replies (the server
  reports a permissions violation), and an unknown or revoked credential does not connect.
- Forged invocations (the payload naming another tenant, or a version that is not the subject's adapter's,
  or a reply subject outside the tenant's namespace) never reach a worker: a failed result, a log line.
- Components are held to their own subjects: only the scheduler may publish work.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from protocol import nats_auth, subjects
from protocol.messages import Invocation, InvocationResult, Sampling
from storage import repo
from tests.e2e.conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(180)


def nats_address(services: Any) -> str:
    return str(services.nats_url).rpartition("@")[2]


async def new_credential(cluster: Cluster, tenant: str) -> str:
    """A fresh NATS credential of `tenant` (the tenant is created if new), as `lorafn keys create --nats`."""
    engine = repo.create_engine(cluster.database)
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            row = await repo.get_or_create_tenant(session, name=tenant)
            return (await repo.new_nats_credential(session, tenant=row, label="bus security test"))[1]
    finally:
        await engine.dispose()


class TenantClient:
    """A direct NATS client with a tenant's credential; records the errors the server reports to it."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.errors: list[str] = []
        self.nc: NatsClient | None = None

    async def connect(self, url: str) -> TenantClient:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        self.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=5,
                                     inbox_prefix=nats_auth.tenant_inbox_prefix(self.tenant))
        return self

    async def violation(self, text: str, timeout: float = 5.0) -> str:
        """The permissions violation the server reported about `text` (waits for it)."""
        assert self.nc is not None
        await self.nc.flush()
        found: str = await wait_for(lambda: next((e for e in self.errors if "permissions violation" in e.lower()
                                                  and text in e), None), timeout=timeout,
                                    what=f"a permissions violation for {text}")
        return found

    async def invoke(self, inv: Invocation, subject: str | None = None) -> None:
        """Publish on the tenant's subject (JetStream, awaiting the ack)."""
        assert self.nc is not None
        await self.nc.jetstream().publish(subject or subjects.invoke(inv.tenant, inv.adapter or subjects.BASE_ADAPTER),
                                          inv.encode(), headers={subjects.MSG_ID_HEADER: inv.id})

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


@pytest_asyncio.fixture(scope="module")
async def adapters(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tenant A (the cluster's) owns `own`; tenant B owns `secret`. name -> sha256."""
    tmp = tmp_path_factory.mktemp("bus")
    own = await cluster.push("own", cluster.write_adapter(tmp, rank=4, modules=("q_proj",), seed=11))
    other_tenant = f"{cluster.tenant}b"
    engine = repo.create_engine(cluster.database)
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            key = await repo.create_api_key(session, tenant=await repo.get_or_create_tenant(session, name=other_tenant))
    finally:
        await engine.dispose()
    source = cluster.write_adapter(tmp, rank=8, modules=("v_proj",), seed=12)
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(source.iterdir())]
    async with cluster.http() as http:
        r = await http.post("/v1/adapters", data={"name": "secret"}, files=files,
                            headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return {"own": own["sha256"], "secret": r.json()["sha256"], "other_tenant": other_tenant}


@pytest_asyncio.fixture
async def tenant_a(services: Any, cluster: Cluster) -> AsyncIterator[TenantClient]:
    if not services.callout().enabled:
        pytest.skip("the NATS server is not ours: no per-tenant credentials")
    secret = await new_credential(cluster, cluster.tenant)
    client = await TenantClient(cluster.tenant).connect(f"nats://{cluster.tenant}:{secret}@{nats_address(services)}")
    try:
        yield client
    finally:
        await client.close()


def invocation(tenant: str, adapter: str | None, **fields: Any) -> Invocation:
    return Invocation(id=f"inv_{secrets.token_hex(8)}", tenant=tenant, adapter=adapter,
                      prompt="hello", sampling=Sampling(temperature=0.0, max_tokens=4), **fields)


async def collect(nc: NatsClient, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return got


async def test_a_tenant_credential_invokes_its_own_adapter_and_reads_its_reply(
    cluster: Cluster, adapters: dict[str, str], tenant_a: TenantClient
) -> None:
    assert tenant_a.nc is not None
    inv = invocation(cluster.tenant, "own", reply_to=subjects.tenant_reply(cluster.tenant, "x" + secrets.token_hex(6)))
    assert inv.reply_to is not None
    replies = await collect(tenant_a.nc, inv.reply_to)
    await tenant_a.invoke(inv)
    await wait_for(lambda: any((m.headers or {}).get(subjects.KIND_HEADER) == subjects.KIND_RESULT for m in replies),
                   timeout=60, what="the result on the tenant's reply subject")
    result = InvocationResult.decode(replies[-1].data)
    assert result.status == "succeeded" and result.usage.completion_tokens == 4, result
    assert tenant_a.errors == []


async def test_a_tenant_credential_cannot_publish_on_or_read_another_tenants_subjects(
    services: Any, cluster: Cluster, adapters: dict[str, str], tenant_a: TenantClient
) -> None:
    other = adapters["other_tenant"]
    assert tenant_a.nc is not None
    # Read another tenant's replies, or everyone's: refused by the server.
    stolen = await collect(tenant_a.nc, f"lora.reply.{other}.>")
    everything = await collect(tenant_a.nc, "lora.reply.>")
    await tenant_a.violation(f'subscription to "lora.reply.{other}.>"')
    await tenant_a.violation('subscription to "lora.reply.>"')
    # Tenant B invokes with its own credential meanwhile: its result reaches B, and nothing reaches A.
    b = await TenantClient(other).connect(f"nats://{other}:{await new_credential(cluster, other)}@"
                                          f"{nats_address(services)}")
    try:
        assert b.nc is not None
        inv_b = invocation(other, "secret", reply_to=subjects.tenant_reply(other, "b" + secrets.token_hex(6)))
        assert inv_b.reply_to is not None
        b_replies = await collect(b.nc, inv_b.reply_to)
        await b.invoke(inv_b)
        await wait_for(lambda: any((m.headers or {}).get(subjects.KIND_HEADER) == subjects.KIND_RESULT
                                   for m in b_replies), timeout=60, what="B's result")
        assert InvocationResult.decode(b_replies[-1].data).status == "succeeded"
    finally:
        await b.close()
    assert stolen == [] and everything == []
    # Publish on another tenant's subject (JetStream never sees it: no ack), or on a worker's work subject.
    with pytest.raises(nats.errors.TimeoutError):
        await tenant_a.nc.jetstream().publish(subjects.invoke(other, "secret"),
                                              invocation(other, "secret").encode(), timeout=1.0)
    await tenant_a.violation(f'publish to "lora.invoke.{other}.secret"')
    await tenant_a.nc.publish(subjects.work("e2e-w1"), invocation(cluster.tenant, "own").encode())
    await tenant_a.violation('publish to "lora.work.e2e-w1"')
    assert await cluster.queued(subjects.invoke(other, "secret")) == 0


async def test_unknown_and_revoked_credentials_do_not_connect(services: Any, cluster: Cluster) -> None:
    if not services.callout().enabled:
        pytest.skip("the NATS server is not ours: no per-tenant credentials")
    address = nats_address(services)
    secret = await new_credential(cluster, cluster.tenant)
    other = await new_credential(cluster, f"{cluster.tenant}c")
    for url in (f"nats://{cluster.tenant}:lfnats_000000000000_nope@{address}",  # unknown
                f"nats://{cluster.tenant}:{other}@{address}",  # another tenant's credential
                f"nats://lorafn.gateway:{secret}@{address}"):  # a component's user name
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    ok = await nats.connect(f"nats://{cluster.tenant}:{secret}@{address}", allow_reconnect=False)
    await ok.close()
    engine = repo.create_engine(cluster.database)
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            assert await repo.revoke_nats_credential(session, secret_or_prefix=secret)
    finally:
        await engine.dispose()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(f"nats://{cluster.tenant}:{secret}@{address}", allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=5)


async def test_forged_invocations_are_refused_logged_and_never_run(
    cluster: Cluster, adapters: dict[str, str], tenant_a: TenantClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert tenant_a.nc is not None
    me, other = cluster.tenant, adapters["other_tenant"]
    reply = subjects.tenant_reply(me, "forged" + secrets.token_hex(4))
    replies = await collect(tenant_a.nc, reply)
    forged = {
        # on A's subject, the payload names B's adapter (B's tenant and version)
        "wrong tenant": (invocation(other, "secret", version=adapters["secret"]), subjects.invoke(me, "own"),
                         "forbidden"),
        # A's adapter, with B's version: the registry does not resolve it for A/own
        "foreign version": (invocation(me, "own", version=adapters["secret"], reply_to=reply),
                            subjects.invoke(me, "own"), "forbidden"),
        # results sent to B's reply namespace
        "foreign reply": (invocation(me, "own", reply_to=subjects.tenant_reply(other, "x1")),
                          subjects.invoke(me, "own"), "forbidden"),
        # another adapter than the subject's
        "wrong adapter": (invocation(me, "secret"), subjects.invoke(me, "own"), "forbidden"),
    }
    with caplog.at_level(logging.WARNING, logger="scheduler.dispatcher"):
        for inv, subject, _ in forged.values():
            await tenant_a.invoke(inv, subject)
        for what, (inv, _, code) in forged.items():
            await wait_for(lambda inv=inv: cluster.results_recorded(inv.id), timeout=30, what=f"{what}: a result")
            result = await cluster.recorded_result(inv.id)
            assert result.status == "failed" and result.error is not None, what
            assert result.error.code == code and result.worker_id is None, (what, result)
            assert cluster.started_by(inv.id) == [], what  # no worker ever started it
            assert any(inv.id in r.getMessage() and "refused invocation" in r.getMessage() for r in caplog.records), what
    # The forged-version call's failure reached A's own reply subject; nothing went to B's namespace.
    await wait_for(lambda: replies, timeout=10, what="the refusal on A's reply subject")
    assert InvocationResult.decode(replies[-1].data).error.code == "forbidden"  # type: ignore[union-attr]
    assert tenant_a.errors == []


async def test_components_are_held_to_their_own_subjects(services: Any, cluster: Cluster) -> None:
    if "worker" not in services.nats_urls:
        pytest.skip("the NATS server is not ours: no per-component users")
    for component, forbidden_subject in (("worker", subjects.work("e2e-w2")), ("gateway", subjects.work("e2e-w1")),
                                         ("worker", "lora.reply.>"), ("gateway", subjects.WORKER_EVENTS_ALL)):
        errors: list[str] = []

        async def on_error(e: Exception, errors: list[str] = errors) -> None:
            errors.append(str(e))

        nc = await nats.connect(services.nats_url_of(component), error_cb=on_error, allow_reconnect=False,
                                inbox_prefix=nats_auth.inbox_prefix(component))
        try:
            if forbidden_subject.endswith(">") or (component == "gateway" and "evt" in forbidden_subject):
                await nc.subscribe(forbidden_subject)
            else:
                await nc.publish(forbidden_subject, b"x")
            await nc.flush()
            await wait_for(lambda errors=errors: any("permissions violation" in e.lower() for e in errors),
                           timeout=5, what=f"{component}: a violation for {forbidden_subject}")
        finally:
            await nc.close()
    # The monitoring port listens on loopback only.
    if services.stack is not None and services.stack.config.nats_monitor:
        assert "127.0.0.1" in (services.stack.state_dir / "nats.conf").read_text().split("http:")[1].splitlines()[0]
    await asyncio.sleep(0)


async def test_an_id_of_another_tenants_call_is_not_answered_from_its_record(
    services: Any, cluster: Cluster, adapters: dict[str, str], tenant_a: TenantClient
) -> None:
    """Ids are the callers' choice on the bus: B's recorded result of id X never answers A's call of id X."""
    other = adapters["other_tenant"]
    assert tenant_a.nc is not None
    b = await TenantClient(other).connect(f"nats://{other}:{await new_credential(cluster, other)}@"
                                          f"{nats_address(services)}")
    shared = f"job-{secrets.token_hex(4)}"
    try:
        assert b.nc is not None
        inv_b = Invocation(id=shared, tenant=other, adapter="secret", prompt="b's secret prompt",
                           sampling=Sampling(temperature=0.0, max_tokens=6),
                           reply_to=subjects.tenant_reply(other, "b" + secrets.token_hex(4)))
        assert inv_b.reply_to is not None
        b_replies = await collect(b.nc, inv_b.reply_to)
        await b.invoke(inv_b)
        await wait_for(lambda: any((m.headers or {}).get(subjects.KIND_HEADER) == subjects.KIND_RESULT
                                   for m in b_replies), timeout=60, what="B's result")
        b_result = InvocationResult.decode(b_replies[-1].data)
        assert b_result.status == "succeeded" and b_result.token_ids
    finally:
        await b.close()
    inv_a = Invocation(id=shared, tenant=cluster.tenant, adapter=None, prompt="hello",
                       sampling=Sampling(temperature=0.0, max_tokens=6),
                       reply_to=subjects.tenant_reply(cluster.tenant, "a" + secrets.token_hex(4)))
    assert inv_a.reply_to is not None
    a_replies = await collect(tenant_a.nc, inv_a.reply_to)
    await tenant_a.nc.jetstream().publish(subjects.invoke(cluster.tenant, subjects.BASE_ADAPTER), inv_a.encode(),
                                          headers={subjects.MSG_ID_HEADER: f"{shared}-a"})
    await wait_for(lambda: any((m.headers or {}).get(subjects.KIND_HEADER) == subjects.KIND_RESULT
                               for m in a_replies), timeout=60, what="A's answer")
    a_result = InvocationResult.decode(a_replies[-1].data)
    assert a_result.status == "failed" and a_result.error is not None and a_result.error.code == "bad_request"
    assert "already used" in a_result.error.message and a_result.token_ids == [] and a_result.text == ""
    # The record is still B's.
    recorded = await cluster.recorded_result(shared)
    assert recorded.token_ids == b_result.token_ids
