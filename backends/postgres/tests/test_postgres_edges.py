"""PostgreSQL state store at its edges."""

from __future__ import annotations

import pytest

from empathy_models import CircuitBreaker, ConfigurationError, state_store_from_url
from tests._cancel_trials import cancel_during_admission


async def test_a_cancel_during_a_half_open_admission_never_leaks_the_probe_lease(
    postgres_url: str,
) -> None:
    async with CircuitBreaker(store=postgres_url, local_view_ttl=0) as breaker:
        result = await cancel_during_admission(breaker, "anthropic", trials=100)
    assert result.cancelled_before_the_body >= 10
    assert result.leaked == 0
    assert result.ran_after_cancel == 0


@pytest.mark.parametrize(
    "dsn", ["postgresql://h:notaport/db", "postgresql://h:99999/db", "postgresql://[::1/db"]
)
def test_a_malformed_dsn_is_a_configuration_error(dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="not a valid"):
        state_store_from_url(dsn)
