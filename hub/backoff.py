"""Capped exponential backoff with full jitter, for every loop that reconnects."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with full jitter (retry storms stay spread out)."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0
