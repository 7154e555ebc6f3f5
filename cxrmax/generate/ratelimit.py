"""Requests-per-minute and tokens-per-minute limits as token buckets (asyncio).

A bucket holds up to one minute's allowance and refills continuously, so short bursts are allowed
but the average rate stays under the limit. Tokens are charged before a request with an estimate
(prompt + max_tokens) and corrected with the usage the server reports."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """A bucket of ``per_minute`` units refilled continuously; ``acquire(n)`` waits until n are available."""

    def __init__(self, per_minute: float, burst: float | None = None):
        if per_minute <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = per_minute / 60.0
        self.capacity = burst if burst is not None else per_minute
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)  # a request larger than the bucket waits for a full bucket
        async with self._lock:
            while True:
                self._refill()
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)

    def adjust(self, delta: float) -> None:
        """Give back (negative delta) or charge (positive) units after the fact; the level may go negative."""
        self._refill()
        self.level = min(self.capacity, self.level - delta)


class RateLimiter:
    """Optional RPM and TPM limits; both None means no limit (acquire returns at once)."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None):
        self.requests = TokenBucket(rpm, burst=max(1.0, rpm / 60.0)) if rpm else None
        self.tokens = TokenBucket(tpm) if tpm else None

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    async def acquire(self, estimated_tokens: int) -> None:
        if self.requests is not None:
            await self.requests.acquire(1.0)
        if self.tokens is not None:
            await self.tokens.acquire(float(estimated_tokens))

    def settle(self, estimated_tokens: int, actual_tokens: int | None) -> None:
        if self.tokens is not None and actual_tokens is not None:
            self.tokens.adjust(actual_tokens - estimated_tokens)
