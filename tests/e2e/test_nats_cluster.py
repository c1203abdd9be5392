"""The invocation path on a 3-server NATS cluster with the streams at 3 replicas: the server that leads the
invocations stream is killed (SIGKILL) with 100 asynchronous invocations in flight, and every one of them
succeeds once; the stack keeps answering.

This module's `services` is the session's Postgres and S3 with a NATS cluster of its own (`lorafn up
--nats-cluster 3` without the other servers: `StackConfig.nats_only`), made as `lorafn up` makes it (streams
at R3); the e2e `cluster` fixture then runs the gateway, the scheduler and two worker processes on it, each
connected with every server's URL.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType

from lorafn.stack import LocalStack, StackConfig, free_stack_ports
from protocol import subjects
from protocol.settings import NatsSettings
from protocol.streams import ALL_STREAMS, INVOCATIONS, ensure_streams
from tests.conftest import Services
from tests.e2e.conftest import Cluster, OpenAICall, Reference, openai_finish_reason, run_openai, wait_for

pytestmark = pytest.mark.timeout(240)

log = logging.getLogger(__name__)
SERVERS = 3
CALLS = 100
# The workers' ack wait as deployed (the other e2e modules shorten it to see a killed worker's calls move fast):
# one shorter than a JetStream election (seconds) would have the new leader redeliver every call in flight.
WORKER_ENV = {"LORAFN_CONSUMER__ACK_WAIT_S": "30"}


class ClusterServices(Services):
    """Services whose components are told the streams' replicas, as `lorafn up --nats-cluster` tells them
    (LORAFN_NATS__STREAM_REPLICAS): what they create (the gateway's callback bucket) gets as many."""

    def nats_of(self, component: str) -> NatsSettings:
        return super().nats_of(component).model_copy(update={"stream_replicas": SERVERS})

    def nats_env_of(self, component: str) -> dict[str, str]:
        return {**super().nats_env_of(component), "LORAFN_NATS__STREAM_REPLICAS": str(SERVERS)}


async def _streams_at(admin_url: str, replicas: int) -> None:
    nc = await nats.connect(admin_url.split(","), connect_timeout=5)
    try:
        await ensure_streams(nc.jetstream(), replicas=replicas, reconfigure=True)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def services(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """The session's Postgres and S3, and a NATS cluster of SERVERS servers with the streams at R3."""
    stack = LocalStack(StackConfig(state_dir=tmp_path_factory.mktemp("nats-cluster"), nats_only=True,
                                   ports=free_stack_ports(nats_servers=SERVERS), nats_cluster=SERVERS))
    endpoints = stack.start()
    try:
        asyncio.run(_streams_at(endpoints.nats_admin, SERVERS))
        yield ClusterServices(nats_url=endpoints.nats_admin, database_url=services.database_url,
                       s3_endpoint=services.s3_endpoint, s3_access_key=services.s3_access_key,
                       s3_secret_key=services.s3_secret_key, stack=stack, nats_urls=endpoints.nats_urls,
                       nats_callout_seed=endpoints.nats_callout_seed)
    finally:
        stack.stop()


@pytest_asyncio.fixture
async def admin(services: Services) -> AsyncIterator[NatsClient]:
    """The admin user's connection, with every server's URL (it survives the loss of any one)."""
    nc = await nats.connect(services.nats_url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc
    finally:
        await nc.close()


async def results_by_invocation(js: Any) -> dict[str, int]:
    """Results the results stream holds per invocation id (one request for all of them)."""
    info = await js.stream_info(subjects.RESULTS_STREAM, subjects_filter=subjects.RESULT_ALL)
    return {s.rpartition(".")[2]: n for s, n in (info.state.subjects or {}).items()}


async def leaders(nc: NatsClient) -> dict[str, str | None]:
    """The server that leads each stream (lorafn's and the gateway's callback bucket) and each of its consumers
    ("<stream>" or "<stream>/<consumer>"). Names come from the NAMES APIs (the meta leader's own state): the
    LIST ones leave out, as `missing`, what a leader in transition did not answer in time."""
    js = nc.jetstream()
    out: dict[str, str | None] = {}
    for stream in [*(spec.name for spec in ALL_STREAMS), f"KV_{subjects.CALLBACKS_BUCKET}"]:
        out[stream] = (await js.stream_info(stream)).cluster.leader  # type: ignore[union-attr]
        names = json.loads((await nc.request(f"$JS.API.CONSUMER.NAMES.{stream}", b"{}", timeout=5)).data)
        for consumer in names.get("consumers") or []:
            info = await js.consumer_info(stream, consumer)
            out[f"{stream}/{consumer}"] = info.cluster.leader if info.cluster else None
    return out


async def lead_everything_from(nc: NatsClient, server: str) -> dict[str, str | None]:
    """Move the leadership of every stream and consumer to `server` (a leader stepdown naming it preferred):
    its death then leaves every stream and consumer without a leader at once, the worst case."""
    for name, leader in (await leaders(nc)).items():
        if leader != server:
            stream, _, consumer = name.partition("/")
            api = f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}" if consumer else f"STREAM.LEADER.STEPDOWN.{stream}"
            r = await nc.request(f"$JS.API.{api}", json.dumps({"placement": {"preferred": server}}).encode(), timeout=5)
            assert json.loads(r.data).get("success"), r.data

    async def moved() -> dict[str, str | None] | None:
        now = await leaders(nc)
        return now if set(now.values()) == {server} else None

    moved_to: dict[str, str | None] = await wait_for(moved, what=f"every leader on {server}")
    return moved_to


async def test_the_streams_are_replicated_on_every_server_and_a_service_keeps_their_replicas(
    admin: NatsClient,
) -> None:
    js = admin.jetstream()
    for spec in ALL_STREAMS:
        info = await js.stream_info(spec.name)
        assert info.config.num_replicas == SERVERS and info.config.storage == StorageType.FILE
        assert info.cluster is not None and info.cluster.leader is not None
        assert len(info.cluster.replicas or []) == SERVERS - 1
    # A service configured with one replica (the default) creates nothing and scales nothing down ...
    await ensure_streams(js, replicas=1)
    assert (await js.stream_info(INVOCATIONS.name)).config.num_replicas == SERVERS
    # ... and the operator cannot switch an existing stream's storage in place.
    with pytest.raises(ValueError, match="cannot change a stream's storage in place"):
        await ensure_streams(js, (INVOCATIONS,), replicas=SERVERS, storage="memory", reconfigure=True)


async def test_killing_the_invocations_leader_loses_and_duplicates_nothing(
    services: Services, cluster: Cluster, reference: Reference, admin: NatsClient
) -> None:
    assert services.stack is not None
    js = admin.jetstream()
    calls = [OpenAICall(kind="completion", model="base", prompt=f"cluster call {i}", max_tokens=64, temperature=0.0,
                        seed=0, stream=False) for i in range(CALLS)]
    expected = await asyncio.to_thread(reference.expect, calls)
    # The server that leads the invocations stream leads every other stream and every consumer too (the
    # dispatcher's, each worker's, the scheduler's results consumer): its death stops all of them at once.
    victim = (await js.stream_info(INVOCATIONS.name)).cluster.leader  # type: ignore[union-attr]
    assert victim in services.stack.config.nats_names
    led = await lead_everything_from(admin, victim)
    assert any("/" in name for name in led), led  # consumers included
    bucket = f"KV_{subjects.CALLBACKS_BUCKET}"
    assert bucket in led and (await js.stream_info(bucket)).config.num_replicas == SERVERS  # the gateway's, at R3
    seen = len(cluster.started)
    async with cluster.http() as http:
        async def submit(call: OpenAICall) -> httpx.Response:
            return await http.post(f"/v1/functions/{cluster.tenant}/{subjects.BASE_ADAPTER}/invocations",
                                   headers={"Prefer": "respond-async"},
                                   json={"prompt": call.prompt, "max_tokens": call.max_tokens,
                                         "temperature": call.temperature, "seed": call.seed})

        accepted = await asyncio.gather(*(submit(c) for c in calls))
        assert all(r.status_code == 202 for r in accepted), [r.text for r in accepted if r.status_code != 202]
        ids = [str(r.json()["id"]) for r in accepted]
        # Under way: workers run some, the rest wait in the streams. Then the leader of everything dies.
        await wait_for(lambda: len(cluster.started) - seen >= 4, what="the first invocations started")
        recorded = await results_by_invocation(js)
        done_before = sum(1 for i in ids if recorded.get(i))
        services.stack.process(victim).kill()
        killed_at = time.monotonic()
        assert done_before < CALLS // 2, f"{done_before} of {CALLS} done before the kill: give the calls more tokens"

        # A call during the election is answered: accepted (the gateway retries a publish to a stream without a
        # leader within its publish timeout), or 503 with Retry-After once that has passed; never an error.
        during = await submit(calls[0])
        assert during.status_code == 202 or (during.status_code == 503 and int(during.headers["retry-after"]) > 0), \
            during.text

        async def all_recorded() -> dict[str, int] | None:
            counts = await results_by_invocation(js)
            return counts if all(counts.get(i) for i in ids) else None

        counts = await wait_for(all_recorded, timeout=120, what=f"{CALLS} results recorded", interval=0.25)
        recovered_s = time.monotonic() - killed_at

        async def new_leader() -> str | None:
            leader = (await js.stream_info(INVOCATIONS.name)).cluster.leader  # type: ignore[union-attr]
            return leader if leader not in (None, victim) else None

        elected = await wait_for(new_leader, what="a new leader of the invocations stream")
        views = [(await http.get(f"/v1/invocations/{i}")).json() for i in ids]
        log.info("%d invocations, %d done when %s (leader of every stream and consumer) was killed; all done "
                 "%.1f s later; new invocations leader %s; a call during the election answered %d; %d invocations "
                 "started on a worker more than once", CALLS, done_before, victim, recovered_s, elected,
                 during.status_code, sum(1 for i in ids if len(cluster.started_by(i)) > 1))

        # Every one succeeded, with a clean run's text, has exactly one result, and ran once: no worker started
        # it a second time (a redelivery after the consumers' new leaders took over).
        for invocation_id, view, want in zip(ids, views, expected, strict=True):
            assert counts[invocation_id] == 1, invocation_id
            assert view["status"] == "succeeded" and view["output"]["text"] == want.text, view
            assert len(cluster.started_by(invocation_id)) <= 1, (invocation_id, cluster.started_by(invocation_id))

        # The stack keeps answering on the two servers left: an async call and a streamed OpenAI call.
        again = await submit(calls[1])
        assert again.status_code == 202, again.text
        async with cluster.openai() as client:
            sync = await run_openai(client, OpenAICall(kind="completion", model="base", prompt="after the kill",
                                                        max_tokens=8, temperature=0.0, seed=0, stream=True))
        [want_sync] = await asyncio.to_thread(reference.expect, [sync])
        assert sync.text == want_sync.text and sync.finish_reason == openai_finish_reason(want_sync)
        for response, want in ((during, expected[0]), (again, expected[1])):
            if response.status_code == 202:
                later_id = str(response.json()["id"])
                view = await wait_for(functools.partial(_finished, http, later_id), what=f"{later_id} finished")
                assert view["status"] == "succeeded" and view["output"]["text"] == want.text, view


async def _finished(http: httpx.AsyncClient, invocation_id: str) -> dict[str, Any] | None:
    r = await http.get(f"/v1/invocations/{invocation_id}")
    body: dict[str, Any] = r.json()
    return body if r.status_code == 200 and body["status"] in ("succeeded", "failed") else None
