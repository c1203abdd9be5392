"""The worker's metrics: `WorkerMetrics` fed plain values, then a live worker (in-process, tiny backbone, the
session's NATS and S3) scraped over HTTP after it served an adapter call and a base call and evicted."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from protocol import subjects
from protocol.dispatch import WorkHeaders, dispatch
from protocol.messages import (
    BASE_ADAPTER,
    ControlReply,
    ControlRequest,
    ControlVerb,
    Heartbeat,
    Invocation,
    InvocationError,
    InvocationResult,
    ResidentAdapter,
    Sampling,
    Tier,
    Timings,
    Usage,
)
from scheduler.metrics import MetricsSettings
from storage.adapter_format import blob_sha256, canonical_blob, read_upload, validate, write_peft_adapter
from storage.backbone import BackboneSpec
from storage.objectstore import ObjectStore
from storage.settings import ObjectStoreSettings
from tests.prometheus import poll, rendered, value
from workers.metrics import WorkerMetrics
from workers.service import open_worker
from workers.settings import WorkerSettings
from workers.tiny import write_tiny_backbone


def heartbeat(*, running: int = 0, waiting: int = 0, free_pages: int = 0, pool_pages: int = 0, evicted: int = 0,
              resident: tuple[tuple[str, Tier], ...] = ()) -> Heartbeat:
    return Heartbeat(
        worker_id="w", host="h", device="cpu", started_at=0.0, running=running, queue_depth=waiting,
        free_pages=free_pages,
        capacity={"pool_pages": pool_pages, "transitions": {"evict": {"count": evicted, "last_ms": 0.0}}},
        resident=[ResidentAdapter(version=v, tier=t) for v, t in resident],
    )


# -- plain values ----------------------------------------------------------------------------------------------


def test_heartbeat_gauges_and_evictions() -> None:
    m = WorkerMetrics()
    m.observe_heartbeat(heartbeat(running=3, waiting=5, free_pages=40, pool_pages=100, evicted=2,
                                  resident=(("a", Tier.device), ("b", Tier.device), ("c", Tier.host))))
    page = rendered(m)
    assert value(page, "vllm:num_requests_running") == 3
    assert value(page, "vllm:num_requests_waiting") == 5
    assert value(page, "lorafn_resident_adapters", tier="device") == 2
    assert value(page, "lorafn_resident_adapters", tier="host") == 1
    assert value(page, "lorafn_adapter_pool_pages") == 100
    assert value(page, "lorafn_adapter_pool_free_pages") == 40
    assert value(page, "lorafn_adapter_evictions_total") == 2
    # The next heartbeat: gauges follow it, the eviction counter adds only what is new.
    m.observe_heartbeat(heartbeat(free_pages=100, pool_pages=100, evicted=5, resident=(("c", Tier.host),)))
    page = rendered(m)
    assert value(page, "vllm:num_requests_running") == 0
    assert value(page, "lorafn_resident_adapters", tier="device") == 0
    assert value(page, "lorafn_resident_adapters", tier="host") == 1
    assert value(page, "lorafn_adapter_evictions_total") == 5


def test_loads_by_source_tier() -> None:
    m = WorkerMetrics()
    m.observe_load(Tier.object, 120.0)
    m.observe_load(Tier.host, 3.0)
    m.observe_load(Tier.host, 7.0)
    page = rendered(m)
    assert value(page, "lorafn_adapter_loads_total", source_tier="object") == 1
    assert value(page, "lorafn_adapter_loads_total", source_tier="host") == 2
    assert value(page, "lorafn_adapter_load_seconds_count", source_tier="host") == 2
    assert value(page, "lorafn_adapter_load_seconds_sum", source_tier="host") == pytest.approx(0.010)
    assert value(page, "lorafn_adapter_load_seconds_bucket", source_tier="host", le="0.005") == 1
    assert value(page, "lorafn_adapter_load_seconds_sum", source_tier="object") == pytest.approx(0.120)


def test_batcher_contention_counts_only_what_is_new() -> None:
    from workers.batcher import BatcherStats

    m = WorkerMetrics()
    m.observe_batcher(BatcherStats(passed_over=3, walls=1))
    m.observe_batcher(BatcherStats(passed_over=5, walls=1, adapter_skips=2, byte_cap_steps=4))
    page = rendered(m)
    assert value(page, "lorafn_batch_contention_total", decision="passed_over") == 5
    assert value(page, "lorafn_batch_contention_total", decision="wall") == 1
    assert value(page, "lorafn_batch_contention_total", decision="adapter_skip") == 2
    assert value(page, "lorafn_batch_contention_total", decision="byte_cap") == 4


def test_results_and_endings() -> None:
    m = WorkerMetrics()
    m.observe_result(InvocationResult(
        invocation_id="i1", status="succeeded", finish_reason="length", usage=Usage(prompt_tokens=7, completion_tokens=12),
        timings=Timings(queued_ms=5.0, first_token_ms=30.0, total_ms=400.0),
    ))
    m.observe_result(InvocationResult(
        invocation_id="i2", status="succeeded", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=1),
        timings=Timings(first_token_ms=10.0, total_ms=10.0),
    ))
    m.observe_result(InvocationResult(
        invocation_id="i3", status="failed", error=InvocationError(code="bad_request", message="no prompt"),
        timings=Timings(total_ms=1.0),
    ))
    m.observe_ending("rescued")
    m.observe_ending("handed_back")
    m.observe_ending("handed_back")
    page = rendered(m)
    assert value(page, "lorafn_worker_invocations_total", status="succeeded") == 2
    assert value(page, "lorafn_worker_invocations_total", status="failed") == 1
    assert value(page, "lorafn_worker_invocations_total", status="rescued") == 1
    assert value(page, "lorafn_worker_invocations_total", status="handed_back") == 2
    assert value(page, "vllm:prompt_tokens_total") == 10
    assert value(page, "vllm:generation_tokens_total") == 13
    assert value(page, "vllm:request_success_total", finished_reason="length") == 1
    assert value(page, "vllm:request_success_total", finished_reason="stop") == 1
    # Latencies of the calls that generated only (the failed one has no first token, and its total is not an
    # e2e latency of a request that was served).
    assert value(page, "vllm:time_to_first_token_seconds_count") == 2
    assert value(page, "vllm:time_to_first_token_seconds_sum") == pytest.approx(0.040)
    assert value(page, "vllm:e2e_request_latency_seconds_count") == 2
    assert value(page, "vllm:e2e_request_latency_seconds_sum") == pytest.approx(0.410)


def test_each_instance_has_its_own_registry() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.observe_ending("rescued")
    assert value(rendered(a), "lorafn_worker_invocations_total", status="rescued") == 1
    assert value(rendered(b), "lorafn_worker_invocations_total", status="rescued") == 0


# -- a live worker ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_live_worker_metrics(services, object_store_settings: ObjectStoreSettings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    backbone = await asyncio.to_thread(write_tiny_backbone, tmp_path / "backbone")
    spec = BackboneSpec.from_hf_dir(backbone)
    blob = canonical_blob(validate(read_upload(write_peft_adapter(tmp_path / "adapter", spec, rank=4,
                                                                  modules=("q_proj", "v_proj"))), spec))
    store = ObjectStore(object_store_settings)
    store.ensure_bucket()
    sha, _ = await asyncio.to_thread(store.put_blob, blob)
    assert sha == blob_sha256(blob)
    worker_id = f"mw-{secrets.token_hex(4)}"
    settings = WorkerSettings(
        worker_id=worker_id, nats={"url": services.nats_url}, object_store=object_store_settings,
        backbone={"path": backbone}, host_cache={"directory": tmp_path / "cache"}, heartbeat_s=0.2,
        engine={"kv_cache_bytes": 8 << 20, "adapter_pool_bytes": 1 << 20, "adapter_dtype": "float32"},
        metrics=MetricsSettings(port=0),
    )
    nc = await nats.connect(services.nats_url)
    js = nc.jetstream()
    results: dict[str, InvocationResult] = {}
    done = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        if (msg.headers or {}).get(subjects.KIND_HEADER) == subjects.KIND_RESULT:
            result = InvocationResult.decode(msg.data)
            results[result.invocation_id] = result
            if len(results) == 2:
                done.set()

    reply_prefix = f"lora.reply.metrics-{secrets.token_hex(4)}"
    await nc.subscribe(f"{reply_prefix}.*", cb=on_reply)
    stop = asyncio.Event()
    try:
        async with open_worker(settings) as worker:
            serving = asyncio.create_task(worker.run(stop))
            try:
                deadline = time.monotonic() + 30
                while worker.metrics_endpoint is None:
                    assert not serving.done() and time.monotonic() < deadline, "the metrics endpoint did not open"
                    await asyncio.sleep(0.05)
                url = worker.metrics_endpoint.url
                # What the dispatcher would do: one call of the adapter (a cold start from the object store),
                # one of the bare backbone, each put on this worker's work subject.
                for adapter, version in (("bot", sha), (BASE_ADAPTER, None)):
                    inv_id = f"inv-{secrets.token_hex(6)}"
                    inv = Invocation(id=inv_id, tenant="metrics", adapter=adapter, version=version, prompt="Hello",
                                     sampling=Sampling(temperature=0.0, max_tokens=6),
                                     reply_to=f"{reply_prefix}.{inv_id}")
                    await dispatch(js, inv.encode(), secrets.randbelow(1 << 62), worker_id,
                                   WorkHeaders(arrived_at=time.time(), subject=subjects.invoke("metrics", adapter)))
                await asyncio.wait_for(done.wait(), 60)
                assert all(r.status == "succeeded" for r in results.values()), results
                page = await poll(url, lambda p: value(p, "lorafn_resident_adapters", tier="device") == 1,
                                  what="the adapter on the device in a heartbeat")
                assert value(page, "lorafn_worker_invocations_total", status="succeeded") == 2
                assert value(page, "vllm:generation_tokens_total") == sum(
                    r.usage.completion_tokens for r in results.values())
                assert value(page, "vllm:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in results.values())
                assert value(page, "vllm:time_to_first_token_seconds_count") == 2
                assert value(page, "vllm:e2e_request_latency_seconds_count") == 2
                assert value(page, "lorafn_adapter_loads_total", source_tier="object") == 1
                assert value(page, "lorafn_adapter_load_seconds_count", source_tier="object") == 1
                pool = value(page, "lorafn_adapter_pool_pages")
                free = value(page, "lorafn_adapter_pool_free_pages")
                assert pool == worker.tiers.total_pages and free is not None and 0 <= free < pool
                assert value(page, "vllm:num_requests_running") == 0

                msg = await nc.request(subjects.control(worker_id, ControlVerb.evict.value),
                                       ControlRequest(verb=ControlVerb.evict, version=sha).encode(), timeout=30)
                assert ControlReply.decode(msg.data).ok
                page = await poll(url, lambda p: value(p, "lorafn_adapter_evictions_total") == 1,
                                  what="the eviction in a heartbeat")
                assert value(page, "lorafn_resident_adapters", tier="device") == 0
                assert value(page, "lorafn_resident_adapters", tier="host") == 1
                assert value(page, "lorafn_adapter_pool_free_pages") == pool
            finally:
                stop.set()
                await asyncio.wait_for(serving, 30)
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(subjects.WORK_STREAM, subjects.work_consumer(worker_id))
        await nc.drain()
