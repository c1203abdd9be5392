"""The gateway's one NATS connection: connected in the background, reconnecting for ever.

The app starts even while NATS is down (invocations answer 503 and /readyz is not ready until the first
connection); nats-py then reconnects by itself and restores the subscriptions after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from protocol.settings import NatsSettings
from protocol.streams import ensure_streams

log = logging.getLogger(__name__)

OnConnect = Callable[[Client, JetStreamContext], Awaitable[None]]


class NatsLink:
    """Owns the process's NATS connection. `on_connect` hooks run once, after the first connection."""

    def __init__(self, settings: NatsSettings, *, reconnect_wait_s: float, name: str = "lorafn-gateway") -> None:
        self.settings = settings
        self.reconnect_wait_s = reconnect_wait_s
        self.name = name
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.ready = asyncio.Event()
        self._hooks: list[OnConnect] = []
        self._reconnect_hooks: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    def on_connect(self, hook: OnConnect) -> None:
        """Run `hook(nc, js)` after the first connection (subscriptions survive reconnects)."""
        self._hooks.append(hook)

    def on_reconnect(self, hook: Callable[[], None]) -> None:
        """Call `hook()` after every reconnection (e.g. to drop caches that events missed while away)."""
        self._reconnect_hooks.append(hook)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected and self.ready.is_set()

    def start(self) -> None:
        """Begin connecting in the background."""
        self._task = asyncio.create_task(self._connect(), name="nats-connect")

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the first connection and its hooks; True if connected."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        return self.connected

    async def _on_error(self, e: Exception) -> None:
        log.debug("nats: %s", e)

    async def _on_disconnect(self) -> None:
        log.warning("nats: disconnected from %s; reconnecting", self.settings.redacted_url)

    async def _on_reconnect(self) -> None:
        log.info("nats: reconnected")
        for hook in self._reconnect_hooks:
            hook()

    async def _connect(self) -> None:
        while True:
            nc: Client | None = None
            try:
                # max_reconnect_attempts=-1 makes nats-py retry the FIRST connection for ever too.
                nc = await nats.connect(
                    self.settings.servers,
                    name=self.name,
                    connect_timeout=max(1, int(self.settings.connect_timeout_s)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self.reconnect_wait_s,  # type: ignore[arg-type]
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                    inbox_prefix=self.settings.inbox_prefix,
                )
                js = nc.jetstream()
                await ensure_streams(js, replicas=self.settings.stream_replicas,
                                     storage=self.settings.stream_storage)
                for hook in self._hooks:
                    await hook(nc, js)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("nats: setup after connecting failed (%s); retrying", e)
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.close()
                await asyncio.sleep(self.reconnect_wait_s)
                continue
            self.nc, self.js = nc, js
            self.ready.set()
            log.info("nats: connected to %s", self.settings.redacted_url)
            return

    async def close(self) -> None:
        """Stop connecting, drain the connection."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5.0)
            with contextlib.suppress(Exception):
                await self.nc.close()
