"""JetStream stream definitions, created idempotently by the launcher and the services."""

from __future__ import annotations

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


async def ensure_streams(js: object, specs: tuple[StreamSpec, ...] = ALL_STREAMS) -> list[str]:
    """Create each stream, or update it in place if it exists. Returns the names. Idempotent."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    names = []
    for spec in specs:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.WORK_QUEUE if spec.retention == "workqueue" else RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=spec.max_age_s,
            duplicate_window=spec.duplicate_window_s,
        )
        try:
            await js.stream_info(spec.name)  # type: ignore[attr-defined]
        except NotFoundError:
            await js.add_stream(config)  # type: ignore[attr-defined]
        else:
            await js.update_stream(config)  # type: ignore[attr-defined]
        names.append(spec.name)
    return names
