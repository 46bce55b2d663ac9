"""A breaker, router or executor opened in one event loop, used and closed from another."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
    _loops,
)
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.exceptions import NotOpenError
from empathy_models.providers import OpenAIProvider
from empathy_models.testing import FakeLLMServer, ModelBehavior
from tests._namespaces import drop_namespace, private_url

T = TypeVar("T")


# a Redis connection bound to the closed loop is dropped, and its socket closed by the
# garbage collector (asyncio warns "unclosed transport"): the warning is the dropping
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_breaker_used_and_closed_from_another_loop(tmp_path: Path, kind: str) -> None:
    url = os.environ.get("EMPATHY_TEST_REDIS_URL") if kind == "redis" else None
    if kind == "redis" and not url:
        pytest.skip("EMPATHY_TEST_REDIS_URL not set")
    if url is None:
        _across_loops(f"sqlite:///{tmp_path / 'state.db'}")
    else:
        url = private_url(url)  # keys of its own on the shared server, deleted after
        try:
            _across_loops(url)
        finally:
            drop_namespace(url)
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


def test_a_borrowed_telemetry_backend_running_in_another_loop_is_refused_on_enter(
    tmp_path: Path,
) -> None:
    """
    A batching backend whose flusher runs in another thread's loop, given to an executor
    opened in this one: `NotOpenError` on entering, saying to pass its URL.  Accepted,
    its records were queued for that loop's flusher (woken from the wrong thread), and
    the exit's flush waited on it for the whole close budget.
    """
    backend = SQLiteTelemetryBackend(str(tmp_path / "calls.db"))
    executor = EmpathyLLMExecutor(
        [OpenAIProvider(api_key="k-loops", base_url="http://127.0.0.1:9")],
        telemetry_store=backend,
    )

    async def enter() -> None:
        async with executor:
            pass

    with (
        _opened_in_another_thread(lambda: backend),
        pytest.raises(NotOpenError, match="another event loop") as raised,
    ):
        asyncio.run(enter())
    assert "SQLiteTelemetryBackend" in str(raised.value)
    assert "URL" in str(raised.value)


# ------------------------------------------- a close in its own loop that ends with an error


class GoodbyeError(Exception):
    """A provider's own error: its goodbye to the server failed."""


class SlowGoodbye(OpenAIProvider):
    """
    An OpenAI provider whose `unbind` waits until ``go`` is set (from any thread), then
    raises `GoodbyeError`; cancelled while it waits, it raises `GoodbyeError` as well.
    ``waiting`` is set once it waits.
    """

    def __init__(self, base_url: str) -> None:
        super().__init__(api_key="k-loops", base_url=base_url)
        self.waiting, self.go = threading.Event(), threading.Event()

    async def unbind(self) -> None:
        await super().unbind()
        self.waiting.set()
        try:
            await asyncio.to_thread(self.go.wait)
        except asyncio.CancelledError:
            raise GoodbyeError("the goodbye was cut short") from None
        raise GoodbyeError("the server refused the goodbye")


class _Home:
    """An event loop run by another thread, with its exception handler's messages."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.unhandled: list[str] = []
        self.loop.set_exception_handler(
            lambda _, context: self.unhandled.append(context["message"])
        )
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def collect(self) -> None:
        """Collect the garbage in the loop's thread (a task left with an unretrieved
        error says so to the loop's exception handler when collected)."""

        async def collect() -> None:
            gc.collect()

        self.run(collect())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@contextlib.contextmanager
def _executor_at_home(tmp_path: Path) -> Iterator[tuple[_Home, EmpathyLLMExecutor, SlowGoodbye]]:
    """An executor opened, and used once, in a `_Home` loop, with a `SlowGoodbye` provider."""
    home = _Home()
    server = FakeLLMServer({"gpt-4o-mini": ModelBehavior(content="ok")}, api_key="k-loops")
    home.run(server.__aenter__())
    provider = SlowGoodbye(server.openai_base_url)
    executor = EmpathyLLMExecutor([provider], telemetry_store=f"sqlite:///{tmp_path / 'calls.db'}")
    try:
        home.run(_answered(executor))
        yield home, executor, provider
    finally:
        provider.go.set()
        home.run(server.__aexit__(None, None, None))
        home.close()


def _until(home: _Home, ended: Callable[[], bool]) -> None:
    """Wait until ``ended()``, collecting the garbage in ``home`` meanwhile."""
    for _ in range(600):
        home.collect()
        if ended():
            return
        time.sleep(0.05)


async def _given_up(executor: EmpathyLLMExecutor) -> None:
    # the close in the executor's loop outlasts the wait: the caller is told it could
    # not close it there (the warning), and the close is cancelled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await executor.aclose()
    (message,) = [str(w.message) for w in caught if "another event loop" in str(w.message)]
    # that loop still runs: the warning must not say it stopped
    assert "no longer runs" not in message, message
    assert "did not finish closing it within 0.05 s" in message, message


async def _cancelled(executor: EmpathyLLMExecutor, provider: SlowGoodbye) -> None:
    # the caller's own close is cancelled while the executor's loop runs it
    closing = asyncio.ensure_future(executor.aclose())
    await asyncio.to_thread(provider.waiting.wait, 30)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing


@pytest.mark.parametrize("how", ["given up", "cancelled"])
def test_a_close_in_its_own_loop_failing_after_its_caller_left_is_logged_not_unretrieved(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="empathy_models.loops")
    if how == "given up":
        monkeypatch.setattr(_loops, "HOME_CLOSE_SECONDS", 0.05)
    caller_unhandled: list[str] = []

    async def close(executor: EmpathyLLMExecutor, provider: SlowGoodbye) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: caller_unhandled.append(ctx["message"]))
        if how == "given up":
            await _given_up(executor)
        else:
            await _cancelled(executor, provider)

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "empathy_models.loops"]

    with _executor_at_home(tmp_path) as (home, executor, provider):
        asyncio.run(close(executor, provider))
        _until(home, lambda: bool(failures() or home.unhandled))
        gc.collect()  # the caller's loop's futures
        assert home.unhandled == caller_unhandled == []  # nothing "never retrieved"
        (record,) = failures()  # the close's error, said once
        assert record.getMessage() == (
            "EmpathyLLMExecutor.aclose() in its own event loop failed after its caller "
            "stopped waiting for it"
        )
        assert record.exc_info is not None and isinstance(record.exc_info[1], GoodbyeError)


def test_a_close_in_its_own_loop_failing_in_time_raises_its_error_to_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="empathy_models.loops")
    with _executor_at_home(tmp_path) as (home, executor, provider):
        provider.go.set()
        with pytest.raises(GoodbyeError, match="refused"):
            asyncio.run(executor.aclose())
        home.collect()
        assert home.unhandled == [] and caplog.records == []
        assert "state=closed" in repr(executor)


class _InterruptedScheduling:
    """A loop whose ``call_soon_threadsafe`` is interrupted by a Ctrl-C (a
    `KeyboardInterrupt`) before it schedules the callback, or just after."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, scheduled: bool) -> None:
        self.loop = loop
        self.scheduled = scheduled

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> None:
        if self.scheduled:
            self.loop.call_soon_threadsafe(callback, *args)
        raise KeyboardInterrupt

    def __getattr__(self, name: str) -> Any:  # the rest is the loop's own
        return getattr(self.loop, name)


@pytest.mark.parametrize("scheduled", [False, True], ids=["before", "after"])
def test_a_call_interrupted_while_handed_to_another_loop_never_runs_and_is_closed(
    scheduled: bool,
) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ran: list[bool] = []

    async def call() -> None:
        ran.append(True)

    coro = call()
    try:
        interrupted: Any = _InterruptedScheduling(loop, scheduled=scheduled)
        with pytest.raises(KeyboardInterrupt):
            _loops.submit(interrupted, coro, "a call", logging.getLogger(__name__))
        # whatever the loop had scheduled has run
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), loop).result(10)
        if not scheduled:
            assert ran == []
        # else the loop's thread may have started the call before the interrupted caller
        # cancelled it (the wake-up's send lets it in): it ran, or was cancelled unstarted
        # closed either way: never "was never awaited"
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class _StopsBeforeStarting:
    """A loop (running in another thread) that stops right after ``call_soon_threadsafe``
    schedules a callback, before it runs it: the callback is left in its queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> None:
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # runs the loop's current round, which then stops it
            held.set()
            release.wait(30)
            self.loop.stop()

        self.loop.call_soon_threadsafe(hold)
        assert held.wait(30)
        self.loop.call_soon_threadsafe(callback, *args)  # for the round after: never run
        release.set()

    def __getattr__(self, name: str) -> Any:  # the rest is the loop's own
        return getattr(self.loop, name)


@contextlib.contextmanager
def _stopping_loop() -> Iterator[Any]:
    """A `_StopsBeforeStarting` loop; closed at the end (what it left queued is dropped)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield _StopsBeforeStarting(loop)
    finally:
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_call_handed_to_a_loop_that_stops_before_starting_it_is_closed_when_cancelled() -> None:
    ran: list[bool] = []

    async def call() -> None:
        ran.append(True)

    coro = call()
    with _stopping_loop() as stopping:
        future = _loops.submit(stopping, coro, "a call", logging.getLogger(__name__))
        assert future.cancel()  # the caller gives up: the call will never run
        # closed at once, not left to the garbage collector's "never awaited"
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert ran == []


def test_a_close_at_home_whose_loop_stops_before_starting_it_ends_at_once_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    `close_at_home` to a loop that stops before running the close: False (the loop no
    longer runs) as soon as it has stopped, the close never started and closed.  It
    waited the whole `HOME_CLOSE_SECONDS` (made an hour here), then left the close's
    coroutine to "was never awaited" when the loop was closed.
    """
    monkeypatch.setattr(_loops, "HOME_CLOSE_SECONDS", 3600.0)
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    async def at_home(loop: Any) -> bool:
        return await asyncio.wait_for(_loops.close_at_home(loop, close), 30)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _stopping_loop() as stopping:
            done = asyncio.run(at_home(stopping))
        gc.collect()
    assert done is False and closed == []
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
