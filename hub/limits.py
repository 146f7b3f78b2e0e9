"""Connection limits per instance and per user, and a per-connection message rate limit."""

from __future__ import annotations

import time
from collections import Counter


class ConnectionLimits:
    """Counts open connections of both transports on this instance."""

    def __init__(self, per_instance: int, per_user: int) -> None:
        self.per_instance = per_instance
        self.per_user = per_user
        self.total = 0
        self._by_user: Counter[str] = Counter()

    def acquire(self, user_id: str) -> str | None:
        """Take a slot; return the reason it was refused, or None."""
        if self.total >= self.per_instance:
            return "instance connection limit reached"
        if self._by_user[user_id] >= self.per_user:
            return "per-user connection limit reached"
        self.total += 1
        self._by_user[user_id] += 1
        return None

    def release(self, user_id: str) -> None:
        self.total -= 1
        self._by_user[user_id] -= 1
        if self._by_user[user_id] <= 0:
            del self._by_user[user_id]


class TokenBucket:
    """``rate`` messages a second on average, bursts of up to ``burst``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
