"""The Redis response cache beyond its contract: how `clear` deletes, keys of other types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisResponseCache

from empathy_models import ExecutionContext
from empathy_models.testing import FakeLLMServer, ModelBehavior
from tests._fakes import KEY, http_executor, priced_registry

REGISTRY = priced_registry([("gpt-a", 1.0)], "redis-cache-test-1")
CTX = ExecutionContext(workflow="faq", temperature=0, cache_ttl=600)


class _Noted(aioredis.Redis):
    """A client that notes each command it sends: its name and how many arguments follow."""

    sent: list[tuple[str, int]]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        self.sent.append((name.upper(), len(args) - 1))
        plain: Any = super()  # redis-py leaves execute_command untyped
        return await plain.execute_command(*args, **options)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer({"gpt-a": ModelBehavior(content="The answer.")}, api_key=KEY) as fake:
        yield fake


async def test_clear_deletes_in_bounded_batches_and_counts_what_it_deleted(
    redis_url: str, redis_prefix: str
) -> None:
    # one DEL of every key would hold Redis up for the whole deletion of a big cache
    client = _Noted.from_url(redis_url)
    assert isinstance(client, _Noted)
    client.sent = []
    try:
        async with RedisResponseCache(client, prefix=redis_prefix) as cache:
            for i in range(1_200):
                await cache.set(f"k{i}", b"v", 600)
            client.sent.clear()
            assert await cache.clear() == 1_200
            assert await cache.get("k0") is None
    finally:
        await client.aclose()
    deletes = [n for name, n in client.sent if name == "DEL"]
    assert sum(deletes) == 1_200 and len(deletes) >= 3, deletes
    assert max(deletes) <= 500, deletes


async def test_a_key_of_another_type_is_a_miss_not_an_outage(
    server: FakeLLMServer, redis_url: str, redis_prefix: str, redis_store_url: str
) -> None:
    # another program left a hash where an answer would be: the request is a miss (and
    # its answer replaces the hash), never a store outage that skips the cache for all
    async with http_executor(server, REGISTRY, cache=redis_store_url) as one:
        await one.run("hello", CTX)
    client = aioredis.Redis.from_url(redis_url)
    try:
        (key,) = [k async for k in client.scan_iter(match=redis_prefix + "cache:*")]
        await client.delete(key)
        await client.hset(key, "field", "value")
        async with http_executor(server, REGISTRY, cache=redis_store_url) as two:
            again = await two.run("hello", CTX)
            third = await two.run("hello", CTX)  # the answer stored anew is served
            errors, skipped = two.cache_errors, two.cache_skipped
        kind = await client.type(key)
    finally:
        await client.aclose()
    assert not again.cached and third.cached
    assert (errors, skipped) == (0, 0) and server.requests() == 2
    assert kind == b"string"


async def test_get_and_a_take_of_a_key_of_another_type_read_none(
    redis_url: str, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.rpush(redis_prefix + "listed", "x")
        async with RedisResponseCache(client, prefix=redis_prefix) as cache:
            assert await cache.get("listed") is None
            assert await cache.acquire_lease_and_get("listed", "holder", 30) == (None, None)
            await cache.set("listed", b"answer", 60)
            assert await cache.get("listed") == b"answer"
    finally:
        await client.aclose()
