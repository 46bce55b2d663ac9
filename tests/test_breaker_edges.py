"""
The breaker at its edges with a real SQLite file (issue #14 items 6, 8, 11 and 13);
the Redis and PostgreSQL variants live with their plugins' tests.
"""

from __future__ import annotations

from pathlib import Path

from empathy_models import BreakerPolicy, CircuitBreaker
from tests._cancel_trials import cancel_during_admission


async def test_a_cancel_during_a_half_open_admission_never_leaks_the_probe_lease(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'state.db'}"
    async with CircuitBreaker(store=store, local_view_ttl=0, policy=BreakerPolicy()) as breaker:
        result = await cancel_during_admission(breaker, "anthropic", trials=100)
    assert result.trials == 100
    assert result.cancelled_before_the_body >= 10  # the window under test was hit
    assert result.leaked == 0
    assert result.ran_after_cancel == 0
