"""
The core QuotaStore contract, run against a real Redis through its URL, and a failed
settlement sent again by the executor's limiter.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisQuotaStore
from empathy_models_redis._quota import RETENTION
from redis.typing import EncodableT, FieldT

from empathy_models import Budget, ExecutionContext
from empathy_models.exceptions import StateStoreError
from empathy_models.limits import MemoryQuotaStore
from empathy_models.testing import FakeLLMServer
from empathy_models.testing.contracts import (
    QuotaStoreContract,
    ResponseCacheContract,
    StepQuotaClock,
)
from tests._fakes import CHEAP_ONLY, KEY, FailingSettle, http_executor


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _later(text: str, seconds: float) -> str:
    return repr(float(text) + seconds)


async def _move_window(client: aioredis.Redis, key: bytes, later: float) -> None:
    """A budget window's holds (fields ``h:<time>``, ``l:<time>``) and write time."""
    fields = {_text(f): _text(v) for f, v in (await client.hgetall(key)).items()}
    gone: list[str] = []
    moved: dict[FieldT, EncodableT] = {}
    for name, value in fields.items():
        if name == "at":
            moved[name] = _later(value, later)
        elif name[:2] in ("h:", "l:"):
            gone.append(name)
            bucket = int(name[2:]) + int(later)
            moved[f"{name[:2]}{bucket}"] = value if name[0] == "h" else _later(value, later)
    if gone:
        await client.hdel(key, *gone)
    if moved:
        await client.hset(key, mapping=moved)


class TestRedisQuotaStore(QuotaStoreContract):
    """Each test gets its own key prefix in the EMPATHY_TEST_REDIS_URL database."""

    @pytest.fixture
    def quota_store_url(self, redis_store_url: str) -> str:
        return redis_store_url

    @pytest.fixture
    def step_quota_clock(self, redis_url: str, redis_prefix: str) -> StepQuotaClock:
        """TIME cannot be stepped: every time the store holds moves later by the step."""

        async def step(seconds: float) -> float:
            later = -seconds
            assert later % 60 == 0, "holds are kept per whole minute"
            client = aioredis.Redis.from_url(redis_url)
            try:
                async for key in client.scan_iter(match=redis_prefix + "quota:*"):
                    if _text(await client.type(key)) == "hash":
                        await _move_window(client, key, later)
                    else:  # a schedule: "<end> [<reset>] @<written>"
                        parts = _text(await client.get(key) or b"").split(" ")
                        moved = [
                            "@" + _later(p[1:], later) if p[:1] == "@" else _later(p, later)
                            for p in parts
                        ]
                        await client.set(key, " ".join(moved), keepttl=True)
            finally:
                await client.aclose()
            return later

        return step


class TestRedisResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self, redis_store_url: str) -> str:
        return redis_store_url


async def test_a_window_made_longer_expires_a_week_after_its_own_end(
    redis_url: str, redis_prefix: str
) -> None:
    # a daily budget's write after a monthly one of the same name and start (two
    # executors, or one changed back) must not cut the monthly window's expiry short
    start = time.time() - 60.0
    day, month = start + 86_400.0, start + 31 * 86_400.0
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisQuotaStore(client, prefix=redis_prefix) as quota:
            for end in (month, day):
                await quota.reserve("team", window_start=start, window_end=end, amount=1, limit=9)
            (window,) = [k async for k in client.scan_iter(match=redis_prefix + "*")]
            ttl = await client.pttl(window) / 1000
    finally:
        await client.aclose()
    assert ttl >= month - time.time() + RETENTION - 60, ttl


@pytest.mark.parametrize("value", ["abc", "inf", ""])
async def test_an_unreadable_budget_window_is_a_state_store_error(
    redis_url: str, redis_prefix: str, value: str
) -> None:
    # a window whose counter is no number (another program's hash, a hand edit) raised
    # a bare ValueError or OverflowError from usage() and usages(): `budget status`
    # ended in a traceback
    client = aioredis.Redis.from_url(redis_url)
    await client.hset(f"{redis_prefix}b|team@0.0", mapping={"spent": value})
    await client.set(f"{redis_prefix}l|team", "1.5")
    try:
        async with RedisQuotaStore(redis_url, prefix=redis_prefix) as store:
            with pytest.raises(StateStoreError, match="unreadable budget window for 'team'"):
                await store.usage("team", window_start=0.0, window_end=60.0)
            with pytest.raises(StateStoreError, match="unreadable budget window for 'team'"):
                await store.usages()
            # named, as the window is: which of many limits to mend was left to guess
            with pytest.raises(
                StateStoreError, match=r"unreadable budget limit for 'team': '1\.5' is no whole"
            ):
                await store.limit_overrides()
    finally:
        await client.aclose()


async def test_keys_under_the_prefix_that_hold_no_budget_window_are_passed_over(
    redis_url: str, redis_prefix: str
) -> None:
    # another program's keys where budget windows are kept: a string or a list failed
    # the whole listing with WRONGTYPE (`budget status` could show nothing), and a hash
    # whose name ends in no window start was listed as a budget of 1970
    client = aioredis.Redis.from_url(redis_url)
    await client.set(f"{redis_prefix}b|cache@1.0", "x")
    await client.rpush(f"{redis_prefix}b|queue@2.0", "x")
    await client.hset(f"{redis_prefix}b|session", mapping={"user": "alice"})
    await client.hset(f"{redis_prefix}b|session@abc", mapping={"user": "bob"})
    start = time.time() - 60.0
    try:
        async with RedisQuotaStore(redis_url, prefix=redis_prefix) as store:
            await store.reserve(
                "team", window_start=start, window_end=start + 60, amount=3, limit=9
            )
            listed = await store.usages()
    finally:
        await client.aclose()
    assert [(u.key, u.window_start, u.reserved) for u in listed] == [("team", start, 3)]


async def test_reset_counts_and_deletes_only_the_budgets_windows(
    redis_url: str, redis_prefix: str
) -> None:
    # reset_budget deleted another program's key named like a window of the budget (a
    # string, which usages() passes over) and counted it: `budget reset` said "2
    # window(s) forgotten" of a budget `budget status` listed with one
    client = aioredis.Redis.from_url(redis_url)
    await client.set(f"{redis_prefix}b|team@1.0", "x")
    start = time.time() - 60.0
    window: dict[str, Any] = {"window_start": start, "window_end": start + 60}
    try:
        async with RedisQuotaStore(redis_url, prefix=redis_prefix) as store:
            await store.reserve("team", **window, amount=3, limit=9)
            listed = len(await store.usages())
            reset = await store.reset_budget("team")
            again = await store.reset_budget("team")
        kept = await client.get(f"{redis_prefix}b|team@1.0")
    finally:
        await client.aclose()
    assert (listed, reset, again, kept) == (1, 1, 0, b"x")


async def test_a_settlement_sent_again_after_its_answer_was_lost_counts_once(
    redis_url: str, redis_prefix: str
) -> None:
    # the executor's limiter sends a failed settlement again, naming its hold: one that
    # had landed (the connection dropped on its answer) is not counted twice
    async with (
        FakeLLMServer(api_key=KEY) as server,
        RedisQuotaStore(redis_url, prefix=redis_prefix) as store,
    ):
        failing = FailingSettle(store, times=1, landing=True)
        budget = Budget(limit_usd=10)
        executor = http_executor(server, CHEAP_ONLY, budgets=[budget], quota_store=store)
        async with executor:
            response = await executor.run("hello", ExecutionContext(max_tokens=200))
        assert failing.calls >= 2  # sent again by the close, at once
        assert executor.limiter is not None and executor.limiter.unsettled == 0
        (usage,) = await store.usages()
    assert usage.spent_usd == pytest.approx(response.cost_usd)  # once
    assert (usage.held, usage.calls, usage.overrun) == (0, 1, 0)


async def test_the_script_settles_named_holds_as_the_python_steps_do(
    redis_url: str, redis_prefix: str
) -> None:
    # random reservations and settlements naming holds (some settled twice, some
    # never reserved, some lapsed; most sent again): the Lua port and `meter` end
    # every step alike
    rng = random.Random(36)
    now = time.time()
    kw: dict[str, Any] = {"window_start": now - 60, "window_end": now + 86_400}
    held: dict[str, tuple[int, float]] = {}  # hold id -> (amount, lapses_at)
    async with (
        RedisQuotaStore(redis_url, prefix=redis_prefix) as redis_store,
        MemoryQuotaStore() as memory,
    ):
        for step in range(300):
            if rng.random() < 0.5:
                hold_id, amount = f"h{step}", rng.randint(1, 400)
                lapses_at = now + rng.choice([-600.0, -120.0, 3600.0, 7200.0])
                args: dict[str, Any] = {"amount": amount, "limit": 10_000, "hold_id": hold_id}
                answers = [
                    (await store.reserve("b", **kw, **args, lapses_at=lapses_at)).usage
                    for store in (redis_store, memory)
                ]
                held[hold_id] = (amount, lapses_at)
            else:
                hold_id = rng.choice([*held, "never"]) if held else "never"
                amount, lapses_at = held.get(hold_id, (50, now + 3600.0))
                settle: dict[str, Any] = {"held": amount, "actual": rng.randint(0, 500)}
                settle.update(lapses_at=lapses_at, hold_id=hold_id, resent=rng.random() < 0.7)
                answers = [
                    await store.settle("b", **kw, **settle) for store in (redis_store, memory)
                ]
            assert answers[0] == answers[1], step
        assert await redis_store.usage("b", **kw) == await memory.usage("b", **kw)
