"""JetStream stream definitions, created idempotently by the launcher and the services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from protocol import subjects


@dataclass(frozen=True)
class StreamSpec:
    """What a stream must look like; `ensure_streams` creates or updates it to match."""

    name: str
    subjects: tuple[str, ...]
    retention: str  # "workqueue" or "limits"
    max_age_s: float = 0.0  # 0 keeps messages until consumed (work queue) or forever
    duplicate_window_s: float = 120.0


INVOCATIONS = StreamSpec(
    name=subjects.INVOCATIONS_STREAM,
    subjects=(subjects.INVOKE_ALL,),
    retention="workqueue",
    duplicate_window_s=300.0,
)
WORK = StreamSpec(
    name=subjects.WORK_STREAM,
    subjects=(subjects.WORK_ALL,),
    retention="workqueue",
    duplicate_window_s=300.0,
)
RESULTS = StreamSpec(
    name=subjects.RESULTS_STREAM,
    subjects=(subjects.RESULT_ALL, subjects.CALLBACK_ALL),
    retention="limits",
    max_age_s=24 * 3600.0,
    duplicate_window_s=300.0,
)
ALL_STREAMS: tuple[StreamSpec, ...] = (INVOCATIONS, WORK, RESULTS)


# JetStream's error code for "no suitable peers for placement": fewer servers in the meta cluster than replicas.
NO_PEERS_FOR_PLACEMENT = 10005


async def ensure_streams(js: object, specs: tuple[StreamSpec, ...] = ALL_STREAMS, *, replicas: int = 1,
                         storage: str = "file", reconfigure: bool = False,
                         placement_wait_s: float = 30.0) -> list[str]:
    """Create each stream, or update it in place if it exists. Returns the names. Idempotent.

    A stream is created with `replicas` copies (JetStream's R: on that many servers of a cluster) in `storage`
    ("file" or "memory"). An existing stream keeps its replicas and storage, whatever this process was told:
    every service calls this at start, and a service configured with fewer replicas than the operator chose
    must not scale the streams down. `reconfigure` (the operator's `lorafn init`, `lorafn up`) sets the
    replicas of existing streams to `replicas` too; a storage other than the stream's is an error then, as
    JetStream cannot move a stream between storages. A create or update that finds too few servers for the
    replicas is tried again for `placement_wait_s` (a cluster's last server may join after the others answer).
    """
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import BadRequestError, NotFoundError

    async def placed(call: Callable[[StreamConfig], Awaitable[object]], config: StreamConfig) -> None:
        """`call(config)`, again while JetStream finds no peers for the replicas (a cluster just started: every server
        answers the API once a majority elected a meta leader, before the last one has joined it)."""
        deadline = time.monotonic() + placement_wait_s
        while True:
            try:
                await call(config)
                return
            except BadRequestError as e:
                if e.err_code != NO_PEERS_FOR_PLACEMENT or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.25)

    if not 1 <= replicas <= 5:
        raise ValueError(f"stream replicas must be 1..5 (got {replicas})")
    if storage not in ("file", "memory"):
        raise ValueError(f"stream storage must be 'file' or 'memory' (got {storage!r})")
    names = []
    for spec in specs:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.WORK_QUEUE if spec.retention == "workqueue" else RetentionPolicy.LIMITS,
            storage=StorageType(storage),
            num_replicas=replicas,
            max_age=spec.max_age_s,
            duplicate_window=spec.duplicate_window_s,
        )
        try:
            info = await js.stream_info(spec.name)  # type: ignore[attr-defined]
        except NotFoundError:
            await placed(js.add_stream, config)  # type: ignore[attr-defined]
        else:
            current = info.config
            kept = StorageType(current.storage or storage)
            if reconfigure and kept != config.storage:
                raise ValueError(f"stream {spec.name} keeps its messages in {kept.value} storage, not {storage}: "
                                 f"JetStream cannot change a stream's storage in place (delete the stream, losing "
                                 f"what it holds, or keep stream_storage={kept.value})")
            if not reconfigure:
                config.num_replicas = current.num_replicas or 1
                config.storage = kept
            await placed(js.update_stream, config)  # type: ignore[attr-defined]
        names.append(spec.name)
    return names
