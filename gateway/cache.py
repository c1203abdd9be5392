"""A small TTL cache for the hot path (API keys, adapter names); bounded, per app, never global."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING = object()


class TtlCache(Generic[K, V]):
    """Entries expire `ttl_s` after they were stored; the whole cache is cleared when it reaches
    `max_entries` (simple and bounded: a burst of distinct keys cannot grow memory without limit)."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> tuple[bool, V | None]:
        """(hit, value); a miss or an expired entry is (False, None)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        expires, value = entry
        if expires < self._clock():
            self._entries.pop(key, None)
            return False, None
        return True, value

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (self._clock() + self.ttl_s, value)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
