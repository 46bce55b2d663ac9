"""The Redis store's change feed where Redis does not let it announce."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisCircuitStateStore

from empathy_models import CircuitBreaker, CircuitOpenError
from empathy_models.records import CircuitState


@contextlib.asynccontextmanager
async def _acl_user(redis_url: str, store_url: str, *rules: str) -> AsyncIterator[str]:
    """``store_url`` as a new ACL user with ``rules`` (deleted afterwards)."""
    user, password = f"empathy-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = aioredis.Redis.from_url(redis_url)
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", user, "on", f">{password}", *rules
    )
    parts = urlsplit(store_url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 6379}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc))
    finally:
        await admin.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]
        await admin.aclose()


@pytest.fixture
async def no_channels_url(redis_store_url: str, redis_url: str) -> AsyncIterator[str]:
    """The test store's URL as a user whose ACL grants every key and command but no
    pub/sub channel (what Redis 7 gives a new user unless told otherwise)."""
    async with _acl_user(redis_url, redis_store_url, "~*", "+@all", "resetchannels") as url:
        yield url


async def test_without_channel_rights_the_store_works_and_views_expire_by_their_ttl(
    no_channels_url: str, redis_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="empathy_models.breaker"):
        async with (
            RedisCircuitStateStore(no_channels_url) as store,
            CircuitBreaker(store, local_view_ttl=0.3, flush_interval=60.0) as breaker,
            RedisCircuitStateStore(redis_store_url) as other,
        ):
            # every write announces a new generation; PUBLISH is refused, the write is not
            async with breaker.guard("k"):
                pass
            await breaker.force_open("k", reason="by this user")
            await breaker.reset("k")
            assert (await other.snapshot("k")).generation == 2
            async with breaker.guard("k"):
                pass
            await other.force("k", CircuitState.FORCED_OPEN, reason="elsewhere")
            await anyio.sleep(0.4)  # the TTL: no feed confirms the view
            with pytest.raises(CircuitOpenError):
                async with breaker.guard("k"):
                    pass
            assert store.change_feed().synced_at == float("-inf")
    warnings = [r.getMessage() for r in caplog.records if "announces no changes" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "NOPERM" in warnings[0] or "permission" in warnings[0].lower(), warnings


async def test_leaving_the_breaker_while_its_feed_connects_returns(redis_store_url: str) -> None:
    # the feed's watcher is cancelled while redis-py connects its subscription, which
    # now and then swallows the cancellation: leaving must return all the same
    for i in range(60):
        with anyio.fail_after(10):  # a hang guard: leaving returns at once
            async with CircuitBreaker(store=redis_store_url):
                await asyncio.sleep((i % 20) * 0.0005)  # moments within the connection


class _Heard:
    """A feed listener that writes down the announcements it is told."""

    def __init__(self) -> None:
        self.generations: list[tuple[str, int]] = []
        self.restarts = 0

    def announced(self, key: str, generation: int) -> None:
        self.generations.append((key, generation))

    def restarted(self) -> None:
        self.restarts += 1


async def test_another_databases_announcements_are_not_heard(
    redis_url: str, redis_prefix: str
) -> None:
    # pub/sub channels are server-wide, not per database: a staging app in another
    # database with the same prefix must not stale this database's views
    parts = urlsplit(redis_url)
    database = int(parts.path.strip("/") or 0)
    other_url = urlunsplit(parts._replace(path=f"/{(database + 1) % 16}"))
    async with (
        RedisCircuitStateStore(redis_url, prefix=redis_prefix) as store,
        RedisCircuitStateStore(redis_url, prefix=redis_prefix) as same,
        RedisCircuitStateStore(other_url, prefix=redis_prefix) as elsewhere,
    ):
        feed = store.change_feed()
        try:
            async with _listening(feed) as heard:
                await elsewhere.reset("k")
                await elsewhere.reset("k")
                assert await feed.sync()
                assert heard.generations == []
                await same.reset("k")  # what this database announces is still heard
                assert await feed.sync()
                assert heard.generations == [("k", (await same.snapshot("k")).generation)]
        finally:
            client = aioredis.Redis.from_url(other_url)
            await client.delete(*[k async for k in client.scan_iter(match=redis_prefix + "*")])
            await client.aclose()


async def _hears_a_change(store: RedisCircuitStateStore, other: RedisCircuitStateStore) -> None:
    """``store``'s feed, once subscribed, hears the new generation ``other`` gives "k"."""
    feed = store.change_feed()
    async with _listening(feed) as heard:
        await other.reset("k")
        assert await feed.sync()
        assert heard.generations == [("k", (await other.snapshot("k")).generation)]


@contextlib.asynccontextmanager
async def _listening(feed: Any) -> AsyncIterator[_Heard]:
    """What ``feed`` hears once it has subscribed (it stops listening on leaving)."""
    heard = _Heard()
    feed.listen(heard, 0.2)
    try:
        mark = time.monotonic()
        with anyio.fail_after(10):
            while feed.synced_at <= mark:  # noqa: ASYNC110  # a feed signals no event
                await anyio.sleep(0.005)
        yield heard
    finally:
        await feed.unlisten(heard)


@pytest.mark.parametrize("part", ["café:", "ключи:", "a b\n:"])
async def test_a_prefix_of_any_characters_is_announced_and_heard(
    redis_url: str, redis_prefix: str, part: str
) -> None:
    # the subscription names itself after its channel (CLIENT SETNAME), which Redis
    # refuses outside ASCII ('!' to '~'): with a prefix such as "café:" every breaker
    # ran without announcements (views expired by their TTL, the exact mode asked the
    # store each time), warning that the store "announces no changes"
    prefix = redis_prefix + part
    async with (
        RedisCircuitStateStore(redis_url, prefix=prefix) as store,
        RedisCircuitStateStore(redis_url, prefix=prefix) as other,
    ):
        await _hears_a_change(store, other)


async def test_a_user_who_may_not_name_its_connection_still_hears_announcements(
    redis_url: str, redis_store_url: str
) -> None:
    # the subscription's CLIENT SETNAME (a name for operators' CLIENT LIST) refused by
    # the user's ACL (CLIENT is @dangerous on Redis 6, and hosted servers often deny it)
    # ended the subscription: no announcement was ever heard, with a warning that the
    # store "announces no changes"
    async with (
        _acl_user(redis_url, redis_store_url, "~*", "&*", "+@all", "-client") as url,
        RedisCircuitStateStore(url) as store,
        RedisCircuitStateStore(redis_store_url) as other,
    ):
        await _hears_a_change(store, other)


async def test_a_message_on_the_channel_the_feed_cannot_read_is_passed_over(
    redis_url: str, redis_store_url: str
) -> None:
    # a message on the store's channel whose text the client's encoding cannot read (a
    # Latin-1 client's "3 café", another program's bytes) or whose generation is no
    # ASCII number ("²") ended the subscription: every view was dropped and the feed
    # subscribed again after a warning that the store "announces no changes"
    async with (
        RedisCircuitStateStore(redis_store_url) as store,
        RedisCircuitStateStore(redis_store_url) as other,
    ):
        feed = store.change_feed()
        async with _listening(feed) as heard:
            client = aioredis.Redis.from_url(redis_url)
            try:
                for message in (b"3 caf\xe9", "\u00b2 k".encode()):
                    await client.publish(store.channel, message)
            finally:
                await client.aclose()
            restarts = heard.restarts
            await other.reset("k")
            assert await feed.sync()
            assert heard.generations == [("k", (await other.snapshot("k")).generation)]
            assert heard.restarts == restarts  # the same subscription, never ended
