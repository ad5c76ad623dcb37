"""The token bucket behind ws.max_publishes_per_second."""

from __future__ import annotations

import pytest

from aioqueue.ratelimit import TokenBucket


def test_a_burst_of_rate_then_one_per_interval() -> None:
    bucket = TokenBucket(rate=4.0)
    start = bucket._stamp
    assert [bucket.take(start) for _ in range(4)] == [0.0] * 4
    assert bucket.take(start) == pytest.approx(0.25)  # the next token is a quarter second away
    assert bucket.take(start + 0.1) == pytest.approx(0.15)  # a refused take takes nothing
    assert bucket.take(start + 0.25) == 0.0
    assert bucket.take(start + 0.25) > 0


def test_tokens_never_pile_up_beyond_the_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    start = bucket._stamp
    later = start + 3600  # an hour idle
    assert [bucket.take(later) for _ in range(3)] == [0.0] * 3
    assert bucket.take(later) > 0
