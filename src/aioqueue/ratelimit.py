"""A token bucket: at most `rate` actions per second on average, in bursts of up to `burst`."""

from __future__ import annotations

import time


class TokenBucket:
    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self._rate = rate
        self._burst = rate if burst is None else burst
        self._tokens = self._burst
        self._stamp = time.monotonic()

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be (and
        nothing is taken)."""
        now = time.monotonic() if now is None else now
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled by `now`: it is as if it had never been used."""
        return self._tokens + (now - self._stamp) * self._rate >= self._burst


class Buckets:
    """A token bucket per key (a principal), at `rate` per second each. Buckets that have
    refilled are dropped when there are many, so the keys a client can invent (a JWT's `sub`)
    cost memory only while they are in use."""

    __slots__ = ("_buckets", "_prune_at", "_rate")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = 1024

    def take(self, key: str) -> float:
        """As `TokenBucket.take`, from `key`'s bucket."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune()
            bucket = self._buckets[key] = TokenBucket(self._rate)
        return bucket.take()

    def _prune(self) -> None:
        now = time.monotonic()
        self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
        # Amortised: what is left in use doubles the threshold, so pruning stays linear.
        self._prune_at = max(1024, 2 * len(self._buckets))
