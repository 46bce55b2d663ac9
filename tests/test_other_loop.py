"""A breaker, router or executor opened in one event loop, used and closed from another."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
)
from empathy_models.exceptions import NotOpenError
from empathy_models.providers import OpenAIProvider
from empathy_models.testing import FakeLLMServer, ModelBehavior


# a Redis connection bound to the closed loop is dropped, and its socket closed by the
# garbage collector (asyncio warns "unclosed transport"): the warning is the dropping
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_breaker_used_and_closed_from_another_loop(tmp_path: Path, kind: str) -> None:
    url = os.environ.get("EMPATHY_TEST_REDIS_URL") if kind == "redis" else None
    if kind == "redis" and not url:
        pytest.skip("EMPATHY_TEST_REDIS_URL not set")
    _across_loops(url or f"sqlite:///{tmp_path / 'state.db'}")
    gc.collect()  # the dropped connections' sockets, within this test


def _across_loops(store: str) -> None:
    breaker = CircuitBreaker(store=store)

    async def first() -> None:
        await breaker.__aenter__()
        await breaker.admit("anthropic")

    async def second() -> None:
        with pytest.raises(NotOpenError, match="another event loop"):
            await breaker.admit("openai")
        with pytest.raises(NotOpenError, match="another event loop"):
            await breaker.get_status("anthropic")
        await _closed_from_another_loop(breaker)

    asyncio.run(first())
    asyncio.run(second())
    assert breaker.closed
    assert breaker.store.closed


async def _closed_from_another_loop(closable: CircuitBreaker | EmpathyLLMExecutor) -> None:
    """Close ``closable`` from a loop it was not opened in: it warns that it was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await closable.aclose()
    assert any("another event loop" in str(w.message) for w in caught)


@contextlib.contextmanager
def _opened_in_another_thread(
    opened: Callable[[], AbstractAsyncContextManager[object]],
) -> Iterator[None]:
    """
    Enter ``opened()`` in another thread's event loop, which then runs on until the
    block ends (and exits it then).
    """
    entered, done = threading.Event(), threading.Event()

    def home() -> None:
        async def main() -> None:
            async with opened():
                entered.set()
                await asyncio.to_thread(done.wait)

        asyncio.run(main())

    thread = threading.Thread(target=home)
    thread.start()
    try:
        assert entered.wait(30)
        yield
    finally:
        done.set()
        thread.join(30)


def test_memory_breaker_works_from_any_loop() -> None:
    breaker = CircuitBreaker()

    async def use() -> None:
        async with breaker.guard("anthropic"):
            pass
        await breaker.admit("openai")

    async def first() -> None:
        await breaker.__aenter__()
        await use()

    asyncio.run(first())
    asyncio.run(use())

    async def close() -> None:
        await breaker.aclose()

    asyncio.run(close())
    assert breaker.closed


def test_router_used_and_closed_from_another_loop(tmp_path: Path) -> None:
    router = AdaptiveModelRouter(
        ModelRegistry.default(), telemetry_store=f"sqlite:///{tmp_path / 't.db'}"
    )
    asyncio.run(router.start())

    async def second() -> None:
        with pytest.raises(NotOpenError, match="another event loop"):
            await router.refresh()
        with pytest.raises(NotOpenError, match="another event loop"):
            await router.get_routing_stats("w")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            await router.aclose()

    asyncio.run(second())
    assert router._store_obj is not None and router._store_obj.closed


def test_breaker_closed_from_another_thread_closes_in_its_own_loop(tmp_path: Path) -> None:
    breaker = CircuitBreaker(store=f"sqlite:///{tmp_path / 'state.db'}")

    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[None]:
        await breaker.__aenter__()
        yield

    with _opened_in_another_thread(opened):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # closed in its loop: nothing dropped
            asyncio.run(breaker.aclose())
        assert breaker.closed and breaker.store.closed


def _executor(server: FakeLLMServer, tmp_path: Path) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [OpenAIProvider(api_key="k-loops", base_url=server.openai_base_url)],
        telemetry_store=f"sqlite:///{tmp_path / 'calls.db'}",
    )


async def _answered(executor: EmpathyLLMExecutor) -> None:
    await executor.__aenter__()
    response = await executor.run("hello", ExecutionContext(model="gpt-4o-mini"))
    assert response.content == "ok"


# the HTTP connection bound to the closed loop is dropped, its socket closed by the
# garbage collector (asyncio and aiohttp warn): the warning is the dropping
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_executor_closed_from_another_loop_after_its_own_ended(tmp_path: Path) -> None:
    server = FakeLLMServer({"gpt-4o-mini": ModelBehavior(content="ok")}, api_key="k-loops")
    home = asyncio.new_event_loop()
    home.run_until_complete(server.__aenter__())
    executor = _executor(server, tmp_path)
    try:
        home.run_until_complete(_answered(executor))
    finally:
        home.run_until_complete(server.__aexit__(None, None, None))
        home.close()

    async def second() -> None:
        with pytest.raises(NotOpenError, match="another event loop"):
            await executor.run("again", ExecutionContext(model="gpt-4o-mini"))
        await _closed_from_another_loop(executor)
        await executor.aclose()  # closed: a second close does nothing

    asyncio.run(second())
    assert "state=closed" in repr(executor)
    gc.collect()  # the dropped connection's socket, within this test


def test_executor_closed_from_another_thread_closes_in_its_own_loop(tmp_path: Path) -> None:
    server = FakeLLMServer({"gpt-4o-mini": ModelBehavior(content="ok")}, api_key="k-loops")
    executors: list[EmpathyLLMExecutor] = []

    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[None]:
        async with server:
            executors.append(_executor(server, tmp_path))
            await _answered(executors[0])
            yield

    with _opened_in_another_thread(opened):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # closed in its loop: nothing dropped
            asyncio.run(executors[0].aclose())
        assert "state=closed" in repr(executors[0])
