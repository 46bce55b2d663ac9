"""
The breaker's local views over the Redis store stay bounded by the keys in use.

Redis expires an abandoned key's hash; the breaker forgets an idle key's view once many
new keys have come along (`CircuitBreaker`'s views, see ``tests/test_breaker_views.py``),
and the key's next call reads Redis again: a trip made elsewhere meanwhile is seen.
"""

from __future__ import annotations

import re

import pytest

from empathy_models import BreakerPolicy, CircuitBreaker, CircuitOpenError, CircuitState
from empathy_models._local_view import IDLE_SECONDS, SWEEP_VIEWS
from empathy_models.testing.clock import FakeClock

POLICY = BreakerPolicy(consecutive_failures=3, recovery_seconds=600.0)
KEY = "tenant-a"


def views(breaker: CircuitBreaker) -> int:
    found = re.search(r"keys=(\d+)", repr(breaker))
    assert found is not None, repr(breaker)
    return int(found.group(1))


async def ok() -> int:
    return 1


@pytest.mark.slow
async def test_an_idle_keys_view_is_forgotten_and_its_next_call_reads_redis(
    redis_store_url: str,
) -> None:
    clock = FakeClock()  # times the views (Redis times the states)
    async with (
        CircuitBreaker(redis_store_url, POLICY, clock=clock) as breaker,
        CircuitBreaker(redis_store_url, POLICY) as other,
    ):
        await breaker.call(KEY, ok)
        await breaker.flush()
        clock.advance(IDLE_SECONDS + 2)
        for day in range(2):
            for i in range(SWEEP_VIEWS):
                await breaker.call(f"tenant-{day}-{i}", ok)
            await breaker.flush()
            clock.advance(86400)
        # the old code kept a view of each of the 2 * SWEEP_VIEWS + 1 keys
        assert views(breaker) <= SWEEP_VIEWS + 1

        await other.force_open(KEY, reason="elsewhere")
        with pytest.raises(CircuitOpenError) as refused:
            await breaker.call(KEY, ok)
        assert refused.value.state is CircuitState.FORCED_OPEN
        assert refused.value.reason == "elsewhere"
