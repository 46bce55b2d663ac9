"""
Cancelled runs and a cancelled close, with shared stores (Redis, PostgreSQL) behind a
`TcpProxy` that the test partitions.

A run cancelled while it waits on a stalled store ends at once for a cache read, at
its deadline at the latest for the breaker's and the limiter's stores, and the stall
still counts (the cache skipped, the limiter degraded).  Leaving ``async with
EmpathyLLMExecutor(...)`` in a cancelled anyio scope still closes every store's
connections.  `EmpathyLLMExecutor.aclose` closes its stores together, so a
partition costs the longest store close once, not one close per store.

What is asserted is an order of events (the run ended before the store's timeout
fired, every store began closing before any had closed), never a duration:
``anyio.fail_after`` only guards against a hang.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import attrs
import pytest

from empathy_models import (
    Budget,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
    Outcome,
)
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.limits import quota_store_from_url
from empathy_models.testing import FakeLLMServer, ModelBehavior
from tests._fakes import KEY, fake_model, http_executor

from ._proxy import TcpProxy
from .conftest import POSTGRES_DSN_ENV, through

REDIS_URL_ENV = "EMPATHY_TEST_REDIS_URL"
REGISTRY = ModelRegistry(
    models=[fake_model("m", "openai", "cheap", 1.0, max_output_tokens=4096)],
    price_version="cancel-stalls-1",
)
CACHED = ExecutionContext(
    workflow="w", stage="s", model="m", max_tokens=20, temperature=0, cache_ttl=60
)
# shorter than the stores' timeouts (the breaker's and the limiter's store_timeout, 5 s)
DEADLINE = ExecutionContext(workflow="w", stage="s", model="m", max_tokens=20, deadline=1.0)
GUARD = 30.0  # seconds: a guard against a hang, not a measure
# the first run, which opens the connections (no deadline: a busy machine may take
# more than DEADLINE to connect)
WARM = ExecutionContext(workflow="w", stage="s", model="m", max_tokens=20)


@attrs.define
class Proxied:
    """Store URLs of one engine through ``proxy`` (one test's keys or schema)."""

    kind: str
    proxy: TcpProxy
    target: str
    schema: str = attrs.field(factory=lambda: f"empathy_fault_{uuid.uuid4().hex[:16]}")

    def url(self) -> str:
        if self.kind == "postgresql":
            return through(self.target, self.proxy, self.schema)
        parts = urlsplit(self.target)
        # the client's own timeout far off: only the library's bounds end a wait here
        return (
            f"redis://127.0.0.1:{self.proxy.port}{parts.path}?prefix=empathy-fault:"
            f"{self.schema}:&socket_timeout=120"
        )


async def _proxied(kind: str) -> Proxied:
    env = POSTGRES_DSN_ENV if kind == "postgresql" else REDIS_URL_ENV
    target = os.environ.get(env)
    if not target:
        pytest.skip(f"{env} is not set; these {kind} fault tests need it")
    parts = urlsplit(target)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    return Proxied(kind, proxy, target)


async def _cleanup(store: Proxied) -> None:
    await store.proxy.aclose()
    if store.kind == "postgresql":
        import asyncpg

        conn = await asyncpg.connect(store.target)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')
        finally:
            await conn.close()
    else:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(store.target)
        try:
            match = f"empathy-fault:{store.schema}:*"
            keys = [k async for k in client.scan_iter(match=match, count=500)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@pytest.fixture(params=["redis", "postgresql"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Proxied]:
    store = await _proxied(request.param)
    try:
        yield store
    finally:
        await _cleanup(store)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer({"m": ModelBehavior(latency=1)}, api_key=KEY) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    return http_executor(server, REGISTRY, **options)


async def _until(condition: Callable[[], object]) -> None:
    """Return once ``condition()`` holds; fail after `GUARD` seconds (a hang)."""
    for _ in range(int(GUARD / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never came to pass")


async def _cancelled_in_the_partition(
    proxy: TcpProxy, executor: EmpathyLLMExecutor, prompt: str, ctx: ExecutionContext
) -> None:
    """Start a run, cancel it once the store's request reached the partition, see it end."""
    proxy.partition()
    task = asyncio.ensure_future(executor.run(prompt, ctx))
    await _until(lambda: proxy.dropped)
    task.cancel()
    with anyio.fail_after(GUARD), pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- cancelled runs


async def test_a_run_cancelled_during_a_stalled_cache_read_ends_at_once_and_the_stall_counts(
    server: FakeLLMServer, stores: Proxied
) -> None:
    async with make(server, cache=stores.url()) as executor:
        await executor.run("warm", WARM)  # no cache_ttl: nothing written behind
        await _cancelled_in_the_partition(stores.proxy, executor, "hello", CACHED)
        # ended before the read's 1 s were up: it was not waited for
        assert executor.cache_errors == 0
        # the read given up on did not answer in its time: counted, the cache skipped
        await _until(lambda: executor.cache_errors == 1)
        answer = await asyncio.wait_for(executor.run("again", CACHED), GUARD)
        assert (answer.cached, executor.cache_skipped) == (False, 2)  # its read and write
        await stores.proxy.restore()


@pytest.mark.slow
async def test_a_run_cancelled_while_the_quota_store_stalls_ends_and_the_limiter_degrades(
    server: FakeLLMServer, stores: Proxied
) -> None:
    budget = Budget(limit_usd=10, window="day", name=f"stall-{stores.schema}")
    async with make(server, budgets=[budget], quota_store=stores.url()) as executor:
        limiter = executor.limiter
        assert limiter is not None
        await executor.run("warm", WARM)
        await _cancelled_in_the_partition(stores.proxy, executor, "hello", DEADLINE)
        assert not limiter.degraded  # ended by its deadline, before the store's timeout
        # the reservation given up on has not answered within the store's timeout: the
        # limiter is degraded, so the next runs do not wait on the store either
        await _until(lambda: limiter.degraded)
        # 4 s: a call's time on a busy machine, still short of the store's timeout
        again = attrs.evolve(DEADLINE, deadline=4.0)
        answer = await asyncio.wait_for(executor.run("again", again), GUARD)
        assert answer.content
        await stores.proxy.restore()


async def test_a_run_cancelled_while_the_breaker_store_stalls_ends_by_its_deadline(
    server: FakeLLMServer, stores: Proxied
) -> None:
    async with (
        CircuitBreaker(store=stores.url(), local_view_ttl=0) as breaker,
        make(server, breaker=breaker) as executor,
    ):
        await executor.run("warm", WARM)
        await breaker.get_status(breaker.key_for("openai", "m"))  # its success has landed
        await _cancelled_in_the_partition(stores.proxy, executor, "hello", DEADLINE)
        # ended by its deadline: the admission was not waited for until the breaker's
        # store_timeout (5 s), when the breaker would have answered degraded
        assert not breaker.degraded
        await stores.proxy.restore()


# --------------------------------------------------------------------------- closing


async def test_a_cancelled_anyio_scope_around_the_executor_still_closes_every_store(
    server: FakeLLMServer, stores: Proxied, tmp_path: Path
) -> None:
    url, calls = stores.url(), tmp_path / "calls.db"
    budget = Budget(limit_usd=10, window="day", name=f"scope-{stores.schema}")
    executor = make(
        server,
        telemetry_store=f"sqlite:///{calls}",
        breaker=url,
        budgets=[budget],
        quota_store=url,
        cache=url,
    )
    ctx = CACHED

    async def cancel_once_sent(scope: anyio.CancelScope) -> None:
        await server.wait_for_requests(2, "m")
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with executor:
            await executor.run("warm", ctx)
            server.set_behavior("m", ModelBehavior.always("hang"))
            helper = asyncio.ensure_future(cancel_once_sent(scope))
            await executor.run("hangs", ctx)  # the scope is cancelled during this call
    await helper
    assert scope.cancelled_caught
    await _until(lambda: stores.proxy.clients == 0)  # every store's connections closed
    async with SQLiteTelemetryBackend(calls) as telemetry:
        outcomes = [r.outcome for r in await telemetry.recent()]
    assert sorted(outcomes, key=str) == sorted([Outcome.SUCCESS, Outcome.CANCELLED], key=str)
    async with quota_store_from_url(url) as quota:
        assert [u.held for u in await quota.usages()] == [0]


async def test_aclose_closes_its_stalled_stores_together(
    server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one PostgreSQL proxy per store: each store's close, in a partition, sends its
    # goodbye (dropped) and then waits for the pool's close timeout before it cuts the
    # connections; closed together, both have begun before either has ended
    quota, cache = await _proxied("postgresql"), await _proxied("postgresql")
    # the pools' close timeout is 5 s; 2 s is still far longer than both closes take
    # to begin (milliseconds apart)
    monkeypatch.setattr("empathy_models_postgres._common.CLOSE_TIMEOUT", 2.0)
    try:
        budget = Budget(limit_usd=10, window="day", name=f"close-{quota.schema}")
        executor = make(server, budgets=[budget], quota_store=quota.url(), cache=cache.url())
        async with executor:
            await executor.run("warm", WARM)  # no cache_ttl: nothing written behind
            assert quota.proxy.clients and cache.proxy.clients  # each pool's connection
            quota.proxy.partition()
            cache.proxy.partition()
            cut = quota.proxy.closed, cache.proxy.closed
            closing = asyncio.ensure_future(executor.aclose())
            await _until(lambda: quota.proxy.dropped and cache.proxy.dropped)
            assert (quota.proxy.closed, cache.proxy.closed) == cut, "one ended before one began"
            with anyio.fail_after(GUARD):
                await closing
        await _until(lambda: quota.proxy.clients == cache.proxy.clients == 0)
    finally:
        await _cleanup(quota)
        await _cleanup(cache)
