"""The Redis response cache beyond its contract: how `clear` deletes."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from empathy_models_redis import RedisResponseCache


class _Noted(aioredis.Redis):
    """A client that notes each command it sends: its name and how many arguments follow."""

    sent: list[tuple[str, int]]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        self.sent.append((name.upper(), len(args) - 1))
        plain: Any = super()  # redis-py leaves execute_command untyped
        return await plain.execute_command(*args, **options)


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
