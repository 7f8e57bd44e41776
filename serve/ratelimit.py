"""A per-key sliding-window rate limit, in memory (each gateway process counts on its own)."""

from __future__ import annotations

import threading
import time
from collections import deque


class SlidingWindow:
    """At most `limit` events per `window` seconds for each key; limit 0 means no limit.
    Thread-safe: sync FastAPI handlers call it from the thread pool."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> float:
        """Count one event for `key` if the window allows it and return 0; otherwise count
        nothing and return the seconds until it would be allowed."""
        if self.limit <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                return events[0] + self.window - now
            events.append(now)
            return 0.0
