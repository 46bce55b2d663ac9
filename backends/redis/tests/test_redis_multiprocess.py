"""Three OS processes share one breaker through Redis (see ``breaker_fleet_check``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

pytestmark = pytest.mark.multiprocess


@pytest.mark.slow
async def test_three_processes_share_one_breaker_through_redis(
    redis_store_url: str, breaker_fleet_check: Callable[[str], Awaitable[None]]
) -> None:
    await breaker_fleet_check(redis_store_url)
