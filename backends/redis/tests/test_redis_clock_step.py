"""
The Lua ports under a server clock stepped back (`limits.meter.unstepped`,
`circuit.unstepped`): Redis's TIME cannot be stepped from a test, so a key is rewritten
as a write an hour later by its clock would have left it, which is what a clock stepped
back an hour since that write finds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from empathy_models import BreakerPolicy, CircuitState, Outcome
from empathy_models.backends import state_store_from_url
from empathy_models.limits import quota_store_from_url
from empathy_models.records import OutcomeReport

HOUR = 3600.0


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        await c.aclose()


async def _only_key(client: aioredis.Redis, pattern: str) -> bytes:
    keys: list[bytes] = [k async for k in client.scan_iter(match=pattern)]
    (key,) = keys
    return key


async def test_a_schedule_written_before_a_step_back_keeps_its_lead(
    redis_store_url: str, redis_prefix: str, client: aioredis.Redis
) -> None:
    args = {"cost": 1.0, "interval": 10.0, "burst": 1.0}
    async with quota_store_from_url(redis_store_url) as quota:
        assert (await quota.acquire("r", **args, max_wait=0.0)).granted
        key = await _only_key(client, redis_prefix + "quota:*")
        raw = await client.get(key)
        assert isinstance(raw, bytes)
        tat, at = raw.decode().split(" ")
        assert at.startswith("@")
        await client.set(key, f"{float(tat) + HOUR!r} @{float(at[1:]) + HOUR!r}")
        refused = await quota.acquire("r", **args, max_wait=0.0)
        assert not refused.granted
        assert 0 < refused.wait <= 10.0  # the lead it had, not an hour more
        again = await quota.acquire("r", **args, max_wait=0.0)
        assert not again.granted and again.wait <= refused.wait  # stored as moved


async def test_an_open_circuit_written_before_a_step_back_keeps_its_time(
    redis_store_url: str, redis_prefix: str, client: aioredis.Redis
) -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=60.0)
    async with state_store_from_url(redis_store_url) as store:
        admission = await store.admit("k", policy)
        assert admission.ticket is not None
        report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
        opened = await store.record("k", policy, [report])
        assert opened.state is CircuitState.OPEN
    key = await _only_key(client, redis_prefix + "cb:*")
    fields = ("opened_at_ts", "open_until_ts", "last_failure_ts", "updated_at_ts")
    values = [float(v) for v in await client.hmget(key, fields) if isinstance(v, bytes)]
    await client.hset(key, mapping={f: repr(v + HOUR) for f, v in zip(fields, values, strict=True)})
    async with state_store_from_url(redis_store_url) as store:
        refused = await store.admit("k", policy)
        assert not refused.admitted and refused.retry_after is not None
        assert 0 < refused.retry_after <= 60.0  # not an hour more
        state = await store.snapshot("k")
        assert state.open_until_ts is not None
        assert state.updated_at_ts is not None
        assert state.open_until_ts - state.updated_at_ts <= 60.0  # written as moved
