"""The core CircuitStateStore contract, run against a real Redis through its URL."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisCircuitStateStore
from empathy_models_redis._feed import client_name
from redis.typing import EncodableT, FieldT

from empathy_models import BreakerPolicy
from empathy_models.abc import CircuitStateStore
from empathy_models.testing.contracts import (
    ChangeFeedContract,
    CircuitStateStoreContract,
    CutChangeFeed,
    ExpireStateKeys,
    StepStateClock,
)

_TIMES = ("opened_at_ts", "open_until_ts", "closed_at_ts", "last_failure_ts", "updated_at_ts")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _later(text: str, seconds: float) -> str:
    return repr(float(text) + seconds)


def _moved_window(text: str, buckets: int) -> str:
    rows = (row.split(":") for row in text.split(";") if row)
    return ";".join(f"{int(float(b)) + buckets}:{c}:{f}" for b, c, f in rows)


def _moved_leases(text: str, seconds: float) -> str:
    pairs = (pair.rsplit(":", 1) for pair in text.split(";") if pair)
    return ";".join(f"{lease}:{_later(ends, seconds)}" for lease, ends in pairs)


class TestRedisStateStore(CircuitStateStoreContract):
    """Each test gets its own key prefix in the EMPATHY_TEST_REDIS_URL database."""

    @pytest.fixture
    def state_store_url(self, redis_store_url: str) -> str:
        return redis_store_url

    @pytest.fixture
    def step_state_clock(self, redis_url: str, redis_prefix: str) -> StepStateClock:
        """TIME cannot be stepped: every key's times move later by the step instead."""

        async def step(seconds: float, policy: BreakerPolicy) -> float:
            later = -seconds
            buckets = round(later / policy.bucket_seconds)
            assert buckets * policy.bucket_seconds == pytest.approx(later)
            client = aioredis.Redis.from_url(redis_url)
            try:
                async for key in client.scan_iter(match=redis_prefix + "cb:*"):
                    raw = await client.hgetall(key)
                    fields = {_text(f): _text(v) for f, v in raw.items()}
                    moved: dict[FieldT, EncodableT] = {
                        f: _later(fields[f], later) for f in _TIMES if fields.get(f)
                    }
                    moved["window"] = _moved_window(fields.get("window", ""), buckets)
                    moved["leases"] = _moved_leases(fields.get("leases", ""), later)
                    # without a revision, the next operation answers with every field
                    await client.hdel(key, "rev")
                    await client.hset(key, mapping=moved)
            finally:
                await client.aclose()
            return later

        return step

    @pytest.fixture
    def expire_state_keys(self, redis_url: str, redis_prefix: str) -> ExpireStateKeys:
        """What Redis does when a key's TTL runs out: each key with a TTL goes."""

        async def expire() -> None:
            client = aioredis.Redis.from_url(redis_url)
            try:
                async for key in client.scan_iter(match=redis_prefix + "cb:*"):
                    if await client.pttl(key) > 0:
                        await client.delete(key)
            finally:
                await client.aclose()

        return expire


class TestRedisChangeFeed(ChangeFeedContract):
    """The store's pub/sub announcements, under this test's key prefix."""

    @pytest.fixture
    def state_store_url(self, redis_store_url: str) -> str:
        return redis_store_url

    @pytest.fixture
    def cut_change_feed(self, redis_url: str) -> CutChangeFeed:
        async def cut(store: CircuitStateStore) -> None:
            assert isinstance(store, RedisCircuitStateStore)
            name = client_name(store.channel)
            client = aioredis.Redis.from_url(redis_url)
            try:
                clients = [c for c in await client.client_list() if c.get("name") == name]
                assert len(clients) == 1, clients
                await client.client_kill_filter(_id=clients[0]["id"])
            finally:
                await client.aclose()

        return cut
