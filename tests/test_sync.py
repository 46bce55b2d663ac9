"""
`empathy_models.sync.SyncExecutor` from plain synchronous code: one executor reused by
every call, concurrent callers from threads, a timeout that cancels, and a clean close
(context manager, `close`, at interpreter exit in a separate process).  Also the
`ResourceWarning` of an executor left open.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import gc
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    AnthropicProvider,
    ConfigurationError,
    ConfigurationWarning,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    LLMResponse,
    NotOpenError,
    OpenAIProvider,
    Outcome,
    StreamInterruptedError,
    TelemetryDisabledWarning,
)
from empathy_models.abc import CompletionStream
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.content import ToolCallDelta
from empathy_models.sync import SyncExecutor
from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior, StreamBehavior

from ._fakes import CHEAP_ONLY, KEY, WEATHER, WrappedStream, WrappingAnthropic
from ._threaded_server import threaded_fake_server

REGISTRY = CHEAP_ONLY
CHEAP = ExecutionContext(workflow="script", stage="ask", tier="cheap")


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with threaded_fake_server(api_key=KEY, seed=1) as fake:
        yield fake


def providers(server: FakeLLMServer) -> list[AnthropicProvider | OpenAIProvider]:
    return [
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
    ]


def _line() -> int:
    """The line number its caller is at."""
    return sys._getframe(1).f_lineno


def test_the_warnings_of_its_work_point_at_the_callers_line(server: FakeLLMServer) -> None:
    # the work runs on SyncExecutor's own event loop, in another thread: each warning
    # names the line of the caller's code that asked for it (the test file's), not
    # asyncio's or the package's, so that the filters' once-per-line counts that line
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        llm = SyncExecutor(providers(server), registry=REGISTRY)  # no telemetry_store
        built = _line() - 1
        with llm:
            llm.run("hello", ExecutionContext(task_type="sumarize"))
            ran = _line() - 1
            cached = ExecutionContext(tier="cheap", temperature=0, cache_ttl=60)
            with llm.stream("hello", cached) as stream:
                streamed = _line() - 1
                stream.get_final_response()

            async def ask() -> None:  # on the loop: its own line is the caller's code
                await llm.executor.run("hello", ExecutionContext(task_type="sumarise"))
                asked.append(_line() - 1)

            asked: list[int] = []
            llm.call(ask)
    where = [(w.category, str(w.message).split(":")[0], w.filename, w.lineno) for w in seen]
    assert where == [
        (TelemetryDisabledWarning, "EmpathyLLMExecutor has no telemetry_store", __file__, built),
        (ConfigurationWarning, "unknown task type 'sumarize'", __file__, ran),
        (
            ConfigurationWarning,
            "ExecutionContext(cache_ttl=...) on an executor without a response cache",
            __file__,
            streamed,
        ),
        (ConfigurationWarning, "unknown task type 'sumarise'", __file__, *asked),
    ], where


def test_one_executor_serves_every_call_and_closes_with_the_block(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    router = AdaptiveModelRouter(REGISTRY, url, seed=1)
    with SyncExecutor(
        providers(server), registry=REGISTRY, telemetry_store=url, router=router
    ) as llm:
        executor = llm.executor
        answers = [llm.run(f"question {i}", CHEAP) for i in range(5)]
        assert llm.executor is executor
        telemetry = llm.executor.telemetry_store
        assert telemetry is not None
        llm.call(telemetry.flush)
        stats = llm.call(router.get_routing_stats, "script")
    assert all(isinstance(a, LLMResponse) and a.content for a in answers)
    assert llm.closed
    assert stats.total_calls == sum(len(a.attempts) for a in answers)
    with pytest.raises(RuntimeError, match="closed"):
        llm.run("again", CHEAP)
    llm.close()  # idempotent
    # everything was flushed on close: the file holds one record per attempt
    records = _records(tmp_path / "calls.db")
    assert len(records) == sum(len(a.attempts) for a in answers)


def test_from_config_builds_the_executor_from_empathy_toml(
    server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "empathy.toml"
    config.write_text(
        f"""
telemetry = "calls.db"
[providers.anthropic]
base_url = "{server.anthropic_base_url}"
api_key = "{KEY}"
[providers.openai]
base_url = "{server.openai_base_url}"
api_key = "{KEY}"
"""
    )
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "home"))
    with SyncExecutor.from_config(config, registry=REGISTRY) as llm:
        answer = llm.run("question", CHEAP)
        assert llm.executor.registry is REGISTRY
    assert answer.content and llm.closed
    assert len(_records(tmp_path / "calls.db")) == len(answer.attempts)
    router = AdaptiveModelRouter.from_config(config, registry=REGISTRY)
    with SyncExecutor.from_config(config, registry=REGISTRY, router=router) as llm:
        second = llm.run("question", CHEAP)
        telemetry = llm.executor.telemetry_store
        assert telemetry is not None
        llm.call(telemetry.flush)
        stats = llm.call(router.get_routing_stats, "script")
    assert stats.total_calls == len(answer.attempts) + len(second.attempts)
    config.write_text('telemetry = "nosuch://x"\n')
    with pytest.raises(ConfigurationError, match="telemetry"):
        SyncExecutor.from_config(config)


def _records(path: Path) -> list[LLMCallRecord]:
    async def read() -> list[LLMCallRecord]:
        async with SQLiteTelemetryBackend(path) as backend:
            return list(await backend.recent(limit=1000))

    return anyio.run(read)


def test_calls_from_many_threads_share_the_executor(server: FakeLLMServer) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:

        def worker(i: int) -> None:
            try:
                results.append(llm.run(f"q{i}", CHEAP).content)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == [] and len(results) == 8


def test_a_timeout_cancels_the_call_on_the_loop(server: FakeLLMServer, tmp_path: Path) -> None:
    server.script("claude-fake-haiku", ["hang"])
    pinned = ExecutionContext(workflow="script", stage="ask", model="claude-fake-haiku")
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store=url) as llm:
        # 3 s: the request reaches the server, and its hang, however busy the machine
        # (a hang left queued would be the next run's)
        with pytest.raises(TimeoutError, match=r"^no answer within timeout=3 s"):
            llm.run("hello", pinned, timeout=3.0)
        assert llm.run("hello", CHEAP, timeout=30).content  # the loop is still serving
    outcomes = [r.outcome for r in _records(tmp_path / "calls.db")]
    assert Outcome.CANCELLED in outcomes


def test_a_timeout_past_what_a_lock_can_wait_is_a_long_wait_in_any_thread(
    server: FakeLLMServer,
) -> None:
    # a worker thread waits for the call in one step of the whole timeout: sys.maxsize
    # (or 1e10 s) is past threading.TIMEOUT_MAX, which raised OverflowError there
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:
        answers: list[object] = []

        def ask(timeout: float) -> None:
            try:
                answers.append(llm.run("hello", CHEAP, timeout=timeout).content)
            except BaseException as exc:
                answers.append(exc)

        for timeout in (sys.maxsize, 1e10):
            worker = threading.Thread(target=ask, args=(timeout,))
            worker.start()
            worker.join()
        ask(sys.maxsize)  # the main thread
    assert [type(a) for a in answers] == [str, str, str], answers
    assert server.requests() == 3


def test_an_invalid_timeout_is_refused_before_anything_is_sent(server: FakeLLMServer) -> None:
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:
        for bad in (-1, 0, 0.0, math.nan, -math.inf, "5", True):
            with pytest.raises(ConfigurationError, match=r"^timeout must be a number > 0"):
                llm.run("hello", CHEAP, timeout=bad)  # type: ignore[arg-type]
        assert server.requests() == 0
        assert llm.run("hello", CHEAP, timeout=math.inf).content  # no limit, as None
        assert llm.run("hello", CHEAP, timeout=30).content
    assert server.requests() == 2


def test_an_executor_left_open_warns() -> None:
    async def leave_open() -> None:
        async with aiohttp.ClientSession() as session:
            executor = EmpathyLLMExecutor(
                [AnthropicProvider(api_key=KEY)],
                registry=REGISTRY,
                telemetry_store="null://",
                session=session,
            )
            await executor.__aenter__()
            with pytest.warns(ResourceWarning, match="unclosed EmpathyLLMExecutor"):
                del executor
                gc.collect()

    anyio.run(leave_open)


def test_an_unclosed_sync_executor_is_closed_at_interpreter_exit(tmp_path: Path) -> None:
    """A script that never closes it still exits promptly, its records flushed."""
    db = tmp_path / "calls.db"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests._threaded_server import threaded_fake_server
        from empathy_models import AnthropicProvider, ExecutionContext
        from empathy_models.sync import SyncExecutor

        with threaded_fake_server(api_key="k") as server:
            llm = SyncExecutor(
                [AnthropicProvider(api_key="k", base_url=server.anthropic_base_url)],
                telemetry_store="sqlite:///{db}",
            )
            print(llm.run("hi", ExecutionContext(tier="cheap")).model)
        # no close(): the record is still queued; exit must flush it and not hang
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert len(_records(db)) == 1


def test_close_cancels_a_call_running_in_another_thread(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """The waiting caller gets `NotOpenError` at once; the attempt is recorded cancelled."""
    server.script("claude-fake-haiku", ["hang"])
    pinned = ExecutionContext(workflow="script", stage="ask", model="claude-fake-haiku")
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    llm = SyncExecutor(providers(server), registry=REGISTRY, telemetry_store=url)
    raised: list[BaseException] = []

    def worker() -> None:
        try:
            llm.run("hello", pinned)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30  # a hang guard: the request is on the server
    while server.requests("claude-fake-haiku") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    llm.close()
    thread.join(10)
    assert not thread.is_alive(), "run() still blocked after close()"
    assert len(raised) == 1 and isinstance(raised[0], NotOpenError), raised
    assert "closed while this call was running" in str(raised[0])
    assert [r.outcome for r in _records(tmp_path / "calls.db")] == [Outcome.CANCELLED]


def _call_from_a_thread(llm: SyncExecutor, fn: Callable[[], Awaitable[object]]) -> BaseException:
    """What ``llm.call(fn)`` raises in a thread of its own (it must raise, and return)."""
    raised: list[BaseException] = []

    def worker() -> None:
        try:
            llm.call(fn)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{fn.__name__} on the loop thread deadlocked"
    assert len(raised) == 1, raised
    return raised[0]


def test_run_or_call_from_inside_a_call_is_refused_with_what_to_do(
    server: FakeLLMServer,
) -> None:
    """On its own loop `run` and `call` would wait for themselves: a library error."""
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:

        async def nothing() -> int:
            return 1

        async def run_inside() -> object:
            return llm.run("nested", CHEAP)

        async def call_inside() -> object:
            return llm.call(nothing)

        for inside in (run_inside, call_inside):
            error = _call_from_a_thread(llm, inside)
            assert isinstance(error, ConfigurationError), error
            assert "await" in str(error) and "EmpathyLLMExecutor" in str(error)
        assert llm.run("still there?", CHEAP).content
    assert server.requests() == 1


def test_close_from_inside_a_call_is_refused(server: FakeLLMServer) -> None:
    """On its own loop `close` would wait for itself: it raises, and the executor serves on."""
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:

        async def close_inside() -> None:
            llm.close()

        error = _call_from_a_thread(llm, close_inside)
        assert isinstance(error, ConfigurationError), error
        assert "after that call has returned" in str(error)
        assert not llm.closed
        assert llm.run("still there?", CHEAP).content
    assert llm.closed


def test_a_cancelled_error_a_call_raises_itself_reaches_its_caller_as_that_error(
    server: FakeLLMServer,
) -> None:
    # the task ended cancelled, and its caller got a bare concurrent.futures.CancelledError
    # (an Exception of another class), not what the coroutine raised
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:
        gave_up = asyncio.CancelledError("gave up")

        async def give_up() -> None:
            raise gave_up

        assert _call_from_a_thread(llm, give_up) is gave_up
        with pytest.raises(asyncio.CancelledError, match="gave up"):
            llm.call(give_up)
        assert llm.run("still there?", CHEAP).content
    assert llm.closed and server.requests() == 1


def test_system_exit_or_ctrl_c_in_a_call_reaches_its_caller_and_the_loop_serves_on(
    server: FakeLLMServer,
) -> None:
    """``sys.exit`` in a coroutine given to `call` is raised in the caller, not on the loop."""
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:
        for fatal in (SystemExit(3), KeyboardInterrupt()):

            async def bail(fatal: BaseException = fatal) -> None:
                raise fatal

            assert _call_from_a_thread(llm, bail) is fatal
            assert llm.run("still there?", CHEAP).content

        async def exit_later() -> None:
            # raised by a callback of its own on the loop, after this call returned
            asyncio.get_running_loop().call_soon(sys.exit, 4)

        llm.call(exit_later)
        assert llm.run("and now?", CHEAP).content

        async def time_out() -> None:
            raise TimeoutError("the call's own")

        assert str(_call_from_a_thread(llm, time_out)) == "the call's own"
    assert llm.closed and server.requests() == 3


def test_after_close_a_thread_reusing_the_loop_threads_id_is_not_taken_for_it(
    server: FakeLLMServer,
) -> None:
    """A new thread may get the ended loop thread's id: ``close`` is still a no-op there."""
    before = set(threading.enumerate())
    llm = SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://")
    [loop_thread] = [
        t for t in threading.enumerate() if t not in before and t.name == "empathy-models-sync"
    ]
    loop_id = loop_thread.ident
    llm.close()
    assert not loop_thread.is_alive()
    seen: list[tuple[bool, BaseException | None]] = []

    def close_again() -> None:
        same = threading.get_ident() == loop_id
        try:
            llm.close()
            llm.run("hi", CHEAP)
        except BaseException as exc:
            seen.append((same, exc))

    for _ in range(50):  # the OS reuses a joined thread's id at once, as a rule
        thread = threading.Thread(target=close_again)
        thread.start()
        thread.join(10)
        if seen[-1][0]:
            break
    else:
        pytest.skip("no new thread got the ended loop thread's id")
    assert isinstance(seen[-1][1], NotOpenError), seen[-1][1]


@pytest.mark.usefixtures("interruptible_children")
def test_a_call_given_up_by_ctrl_c_that_then_fails_is_logged_not_left_unretrieved() -> None:
    """
    Ctrl-C while waiting for `call` cancels the coroutine on the loop; one that fails on
    its way out (here: its cleanup raises) has its error logged once, never left to the
    loop's "Task exception was never retrieved".  In a child process: a real SIGINT.
    """
    script = textwrap.dedent(
        f"""
        import asyncio, gc, json, logging, os, signal, sys, threading, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests._threaded_server import threaded_fake_server
        from empathy_models import AnthropicProvider
        from empathy_models.sync import SyncExecutor

        class CleanupError(Exception):
            pass

        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(
            [record.getMessage(), type(record.exc_info[1]).__name__]
        )
        logging.getLogger("empathy_models").addHandler(handler)
        started, unhandled = threading.Event(), []

        async def watch():
            asyncio.get_running_loop().set_exception_handler(
                lambda _, context: unhandled.append(context["message"])
            )

        async def stubborn():
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise CleanupError("the cleanup failed") from None

        async def collect():
            gc.collect()

        def interrupt():
            started.wait(30)
            os.kill(os.getpid(), signal.SIGINT)

        with threaded_fake_server(api_key="k") as server:
            provider = AnthropicProvider(api_key="k", base_url=server.anthropic_base_url)
            with SyncExecutor([provider], telemetry_store="null://") as llm:
                llm.call(watch)
                threading.Thread(target=interrupt).start()
                try:
                    llm.call(stubborn)
                except KeyboardInterrupt:
                    print("interrupted")
                for _ in range(600):  # until the coroutine's end is heard of, either way
                    llm.call(collect)
                    if logged or unhandled:
                        break
                    time.sleep(0.05)
        print(json.dumps({{"logged": logged, "unhandled": unhandled}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    interrupted, outcome = done.stdout.strip().splitlines()
    assert interrupted == "interrupted"
    assert json.loads(outcome) == {
        "logged": [
            ["a SyncExecutor call failed after its caller stopped waiting for it", "CleanupError"]
        ],
        "unhandled": [],
    }


@pytest.mark.usefixtures("interruptible_children")
def test_ctrl_c_delivered_to_another_thread_still_interrupts_a_waiting_call() -> None:
    """
    The kernel may hand a process's SIGINT to any of its threads; Python then runs the
    handler in the main thread at its next bytecode.  A caller waiting for `call` must
    get to it: here the signal is sent to a helper thread while the call hangs.
    """
    script = textwrap.dedent(
        f"""
        import asyncio, signal, sys, threading
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests._threaded_server import threaded_fake_server
        from empathy_models import AnthropicProvider, ExecutionContext
        from empathy_models.sync import SyncExecutor

        started, cancelled = threading.Event(), threading.Event()

        async def hang():
            started.set()
            try:
                await asyncio.sleep(20)  # a hang guard: the wait was never interrupted
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "not interrupted"

        def interrupt():
            started.wait(30)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

        with threaded_fake_server(api_key="k") as server:
            provider = AnthropicProvider(api_key="k", base_url=server.anthropic_base_url)
            with SyncExecutor([provider], telemetry_store="null://") as llm:
                threading.Thread(target=interrupt).start()
                try:
                    print(llm.call(hang))
                except KeyboardInterrupt:
                    print("interrupted")
                print("cancelled" if cancelled.wait(30) else "not cancelled")
                print(bool(llm.run("still there?", ExecutionContext(tier="cheap")).content))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert done.stdout.split() == ["interrupted", "cancelled", "True"], done.stderr
    assert done.returncode == 0, done.stderr


def test_a_close_racing_another_returns_once_the_executor_is_closed(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """Two threads closing at once: neither `close` returns before the records are written."""
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    llm = SyncExecutor(providers(server), registry=REGISTRY, telemetry_store=url)
    assert llm.run("hello", CHEAP).content  # its record is queued until the close
    running, unwinding = threading.Event(), threading.Event()

    async def slow_to_cancel() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            unwinding.set()
            await asyncio.sleep(1)  # the first close waits for this
            raise

    caller = threading.Thread(target=_call_from_a_thread, args=(llm, slow_to_cancel))
    caller.start()
    assert running.wait(30)
    first = threading.Thread(target=llm.close)
    first.start()
    assert unwinding.wait(30), "the first close did not cancel the call"
    llm.close()  # the second close, while the first waits
    assert len(_records(tmp_path / "calls.db")) == 1
    first.join(30)
    caller.join(30)


def _in_a_notebook_cell(opened: str, given: str, *, opened_after: bool = False) -> str:
    """
    A notebook cell, its event loop running (and blocked while SyncExecutor works): it
    opens ``it = {opened}`` and builds ``SyncExecutor(..., {given})`` with ``it`` (with
    ``opened_after``, builds it first, then opens ``it``) and, built, runs one call (its
    provider unreachable: a failed call, recorded), closes it, then closes ``it``.  In
    a child process, with a hang guard.  Its output: the error building it raised (type
    and message), or "opened", then "closed" and any warning logged.
    """
    script = textwrap.dedent(
        f"""
        import asyncio, faulthandler, logging, sys
        faulthandler.dump_traceback_later(60, exit=True)  # a hang guard
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests._fakes import CHEAP_ONLY
        from empathy_models import (
            AdaptiveModelRouter, AnthropicProvider, CircuitBreaker, ExecutionContext
        )
        from empathy_models.backends.sqlite import SQLiteTelemetryBackend
        from empathy_models.sync import SyncExecutor
        logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")

        async def cell():
            it = {opened}
            try:
                if not {opened_after}:
                    await it.__aenter__()
                try:
                    llm = SyncExecutor(
                        # a port nothing listens on: the call fails at once
                        [AnthropicProvider(api_key="k", base_url="http://127.0.0.1:9")],
                        registry=CHEAP_ONLY,
                        {given},
                    )
                except Exception as exc:
                    print(type(exc).__name__, exc)
                    return
                print("opened", flush=True)
                if {opened_after}:
                    await it.__aenter__()
                try:
                    llm.run("hello", ExecutionContext(workflow="w", stage="s", tier="cheap"))
                except Exception:
                    pass
                llm.close()
                print("closed", flush=True)
            finally:
                await it.aclose()

        asyncio.run(cell())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_breaker_already_open_in_a_notebooks_loop_is_refused_not_deadlocked(
    tmp_path: Path,
) -> None:
    """
    A notebook cell (its loop running) opened a `CircuitBreaker` on a shared store and
    gives it to `SyncExecutor`, whose loop cannot use it: a clear error at once.  Opened
    again there, it was bound to both loops, and `close` waited for ever for its flusher.
    """
    url = f"sqlite:///{tmp_path / 'state.db'}"
    out = _in_a_notebook_cell(
        f"CircuitBreaker(store={url!r})", 'breaker=it, telemetry_store="null://"'
    )
    assert out.startswith("NotOpenError "), out
    assert "opened in another event loop" in out


def test_its_executor_awaited_from_another_loop_points_to_run_not_to_sync_executor(
    server: FakeLLMServer,
) -> None:
    """
    ``await llm.executor.run(...)`` in another event loop (a notebook cell's) cannot
    work: the error points to ``llm.run``, not to the SyncExecutor the user already has.
    """
    llm = SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://")
    with llm, pytest.raises(NotOpenError) as raised:
        asyncio.run(llm.executor.run("hello", CHEAP))
    assert "llm.run(" in str(raised.value), raised.value


def test_a_router_already_started_in_a_notebooks_loop_is_refused_up_front(
    tmp_path: Path,
) -> None:
    """
    A notebook cell (its loop running) started an `AdaptiveModelRouter` on a SQLite
    store and gives it to `SyncExecutor`, whose loop cannot use it: a clear error when
    it is built, naming the router and saying to pass it unopened.  Accepted, its start
    there did nothing, and `close` then waited twice `HOME_CLOSE_SECONDS` for the cell's
    blocked loop.
    """
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    out = _in_a_notebook_cell(
        f"AdaptiveModelRouter(CHEAP_ONLY, {url!r})", 'router=it, telemetry_store="null://"'
    )
    assert out.startswith("NotOpenError "), out
    assert "AdaptiveModelRouter" in out
    assert "unopened" in out, out


def test_a_telemetry_backend_already_open_in_a_notebooks_loop_is_refused_up_front(
    tmp_path: Path,
) -> None:
    """
    A notebook cell (its loop running) opened a `SQLiteTelemetryBackend` and gives it to
    `SyncExecutor`, whose loop cannot use it (its flusher task runs in the cell's loop):
    a clear error when it is built, naming the backend and saying to pass its URL.
    Accepted, the records of its calls were queued for a flusher that the blocked cell
    could not run, and `close` waited out its whole budget (10 s) flushing them.
    """
    path = tmp_path / "calls.db"
    out = _in_a_notebook_cell(f"SQLiteTelemetryBackend({str(path)!r})", "telemetry_store=it")
    assert out.startswith("NotOpenError "), out
    assert "SQLiteTelemetryBackend" in out and "opened in another event loop" in out, out
    assert "sqlite:///" in out, out  # what to pass instead


@pytest.mark.slow
def test_a_telemetry_backend_opened_in_a_notebooks_loop_after_is_left_to_it_at_once(
    tmp_path: Path,
) -> None:
    """
    A `SQLiteTelemetryBackend` given unopened to `SyncExecutor` (accepted), then opened
    in the notebook cell's loop: its flusher runs there, blocked while the cell waits,
    so `close` cannot flush it.  It says so at once, in a warning naming that loop, and
    leaves the records to the backend, which the cell's close writes.  It waited out
    its whole budget (10 s), then warned that the flush did not finish in time.
    """
    path = tmp_path / "calls.db"
    out = _in_a_notebook_cell(
        f"SQLiteTelemetryBackend({str(path)!r})", "telemetry_store=it", opened_after=True
    )
    assert out.startswith("opened\n") and "closed" in out, out
    assert "runs in another event loop" in out, out
    # not lost: the call's attempts, written by the backend's own close
    assert {r.outcome for r in _records(path)} == {Outcome.FAILURE}


def test_a_session_made_in_another_loop_is_refused_when_built_not_charged_to_models(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """
    ``session=`` an aiohttp session created in another event loop (a notebook cell's)
    cannot serve the private loop's requests: `ConfigurationError` saying so when the
    SyncExecutor is built.  Accepted, every run failed with "attached to a different
    loop" recorded as the model's failure, counting against it and its breaker.
    """
    other = asyncio.new_event_loop()

    async def make() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    session = other.run_until_complete(make())
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    try:
        with pytest.raises(ConfigurationError, match="another event loop"):
            llm = SyncExecutor(
                providers(server), registry=REGISTRY, telemetry_store=url, session=session
            )
            try:
                llm.run("hello", CHEAP)
            finally:
                llm.close()
    finally:
        other.run_until_complete(session.close())
        other.close()
    assert [r.outcome for r in _records(tmp_path / "calls.db")] == []


@pytest.mark.parametrize("when", ["waiting", "handing over"])
@pytest.mark.usefixtures("interruptible_children")
def test_one_ctrl_c_during_close_still_closes_the_executor_and_writes_its_records(
    tmp_path: Path, when: str
) -> None:
    """
    Ctrl-C while `close` waits for a call that ignores its cancellation (or the moment
    it hands its shut-down to the loop, before it waits): the wait is given up, the
    executor still closed (its queued record written) before the `KeyboardInterrupt`
    is raised.  It stopped the loop part-way: nothing was closed, the record left
    unwritten.  In a child process: a real SIGINT, with a hang guard.
    """
    script = textwrap.dedent(
        f"""
        import asyncio, faulthandler, os, signal, sys, threading
        faulthandler.dump_traceback_later(60, exit=True)  # a hang guard
        if {when == "handing over"!r}:
            # the SIGINT raised the moment close has handed its shut-down over
            handed, raised = asyncio.run_coroutine_threadsafe, []

            def handing(coro, loop):
                future = handed(coro, loop)
                if getattr(coro, "__name__", "") == "_shut_down" and not raised:
                    raised.append(True)  # one Ctrl-C
                    signal.raise_signal(signal.SIGINT)
                return future

            asyncio.run_coroutine_threadsafe = handing
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests._fakes import CHEAP_ONLY
        from tests._threaded_server import threaded_fake_server
        from empathy_models import AnthropicProvider, ExecutionContext
        from empathy_models.backends.sqlite import SQLiteTelemetryBackend
        from empathy_models.sync import SyncExecutor

        path = {str(tmp_path / "calls.db")!r}
        running, cancelled = threading.Event(), threading.Event()

        async def stubborn():
            running.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                await asyncio.sleep(30)  # ignores its cancellation

        def call(llm):
            try:
                llm.call(stubborn)
            except BaseException:
                pass

        def interrupt():
            cancelled.wait(30)
            os.kill(os.getpid(), signal.SIGINT)

        async def count():
            async with SQLiteTelemetryBackend(path) as backend:
                return len(await backend.recent(limit=100))

        with threaded_fake_server(api_key="k") as server:
            provider = AnthropicProvider(api_key="k", base_url=server.anthropic_base_url)
            llm = SyncExecutor(
                [provider], registry=CHEAP_ONLY, telemetry_store="sqlite:///" + path
            )
            llm.run("hello", ExecutionContext(tier="cheap"))  # its record is queued
            threading.Thread(target=call, args=(llm,), daemon=True).start()
            running.wait(30)
            if {when == "waiting"!r}:
                threading.Thread(target=interrupt, daemon=True).start()
            try:
                llm.close()
            except KeyboardInterrupt:
                print("interrupted")
            print("records", asyncio.run(count()), flush=True)
            os._exit(0)  # no exit flush: only what close wrote counts
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["interrupted", "records", "1"], done.stdout + done.stderr


# --------------------------------------------------------------------------- stream()

WORDS = ["one", " two", " three", " four", " five", " six", " seven", " eight"]
HAIKU = ExecutionContext(workflow="script", stage="stream", model="claude-fake-haiku")


def _streams(server: FakeLLMServer, **stream: Any) -> None:
    """The pinned model answers ``WORDS``, one word per chunk, streamed as ``stream`` says."""
    behavior = ModelBehavior(
        content="".join(WORDS), output_tokens=(8, 8), stream=StreamBehavior(**stream)
    )
    server.set_behavior("claude-fake-haiku", behavior)


def _recent(llm: SyncExecutor) -> list[LLMCallRecord]:
    telemetry = llm.executor.telemetry_store
    assert telemetry is not None
    return sorted(llm.call(telemetry.recent, limit=100), key=lambda r: r.timestamp)


def test_a_stream_yields_its_deltas_then_the_response(server: FakeLLMServer) -> None:
    _streams(server)
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="memory://") as llm:
        with llm.stream("Count to eight", HAIKU, timeout=30) as stream:
            deltas = list(stream)
            assert stream.text == "".join(WORDS)
            response = stream.get_final_response()
        assert stream.response is response
        (record,) = _recent(llm)
    assert deltas == WORDS
    assert response.content == "".join(WORDS) and response.output_tokens == 8
    assert response.ttft_ms is not None and stream.model == "claude-fake-haiku"
    assert record.outcome is Outcome.SUCCESS and record.call_id == response.attempts[0].call_id


def test_a_streams_events_carry_its_tool_calls(server: FakeLLMServer) -> None:
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    server.script("claude-fake-haiku", [FakeReply(content="Let me look.", tool_calls=[call])])
    with (
        SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm,
        llm.stream("Weather in Oslo?", HAIKU, tools=[WEATHER]) as stream,
    ):
        events = list(stream.events())
        response = stream.get_final_response()
    texts = [e for e in events if isinstance(e, str)]
    pieces = [e for e in events if isinstance(e, ToolCallDelta)]
    assert "".join(texts) == "Let me look." and pieces
    assert json.loads("".join(p.arguments for p in pieces)) == {"city": "Oslo"}
    assert [(c.name, dict(c.arguments)) for c in response.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]


def test_get_final_response_reads_what_is_left_of_a_stream(server: FakeLLMServer) -> None:
    _streams(server, chunk_interval_ms=5)
    with (
        SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm,
        llm.stream("Count to eight", HAIKU) as stream,
    ):
        first = next(stream)
        response = stream.get_final_response()
        assert list(stream) == []
    assert first == "one" and response.content == stream.text == "".join(WORDS)


@pytest.mark.parametrize("arrival", ["apart", "together"])
@pytest.mark.parametrize("leave", ["break", "exception", "ctrl-c"])
def test_leaving_a_stream_early_closes_it_on_the_loop_and_records_cancelled(
    server: FakeLLMServer, leave: str, arrival: str
) -> None:
    # the pieces come 5 ms apart, each read on its own, or all at once: the read that
    # hands over " two" hands over the pieces behind it too (as on a busy machine)
    _streams(server, chunk_interval_ms=5 if arrival == "apart" else 0)
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="memory://") as llm:
        with (
            contextlib.suppress(ValueError, KeyboardInterrupt),
            llm.stream("Count to eight", HAIKU, timeout=30) as stream,
        ):
            for delta in stream:
                if delta == " two":
                    if leave == "exception":
                        raise ValueError("the caller failed")
                    if leave == "ctrl-c":
                        raise KeyboardInterrupt
                    break
        assert stream.text == "one two"  # pieces read but not yielded are not counted
        assert list(stream) == []  # closed: nothing more is read
        with pytest.raises(RuntimeError, match="closed before it finished"):
            stream.get_final_response()
        (record,) = _recent(llm)
        assert llm.run("still there?", CHEAP, timeout=30).content
    assert record.outcome is Outcome.CANCELLED and record.ttft_ms is not None


class _CtrlCAt(WrappedStream):
    """A provider's stream that presses Ctrl-C as it hands over the piece ``at``."""

    def __init__(self, inner: CompletionStream, at: str) -> None:
        super().__init__(inner)
        self.at = at

    def _pressing(self, pieces: list[str | ToolCallDelta]) -> list[str | ToolCallDelta]:
        if self.at in pieces:
            _thread.interrupt_main()
        return pieces

    async def __anext__(self) -> str | ToolCallDelta:
        return self._pressing([await self.inner.__anext__()])[0]

    async def next_pieces(self) -> list[str | ToolCallDelta]:
        return self._pressing(await self.inner.next_pieces())

    @property
    def ended_at(self) -> float | None:
        return self.inner.ended_at


@pytest.mark.usefixtures("interruptible_children")
def test_ctrl_c_as_a_streams_read_takes_its_pieces_closes_it(server: FakeLLMServer) -> None:
    # Ctrl-C comes as the read on the loop takes its pieces: that read's pieces are lost
    # to the caller's thread, so the stream is closed, as on a timeout, and a later read
    # ends (before: the stream went on, the next read skipping the pieces that read took)
    _streams(server, chunk_interval_ms=5)  # (pieces apart: the read with WORDS[2] not the last)
    provider = WrappingAnthropic(
        lambda inner: _CtrlCAt(inner, WORDS[2]), api_key=KEY, base_url=server.anthropic_base_url
    )
    read: list[str] = []
    with (
        SyncExecutor([provider], registry=REGISTRY, telemetry_store="null://") as llm,
        llm.stream("Count", HAIKU) as stream,
    ):
        with pytest.raises(KeyboardInterrupt):
            read.extend(stream)
        assert WORDS[2] not in read
        assert list(stream) == []


@pytest.mark.usefixtures("interruptible_children")
def test_ctrl_c_while_a_stream_waits_closes_it_and_records_cancelled(
    server: FakeLLMServer,
) -> None:
    _streams(server, fault_after=2, fault="hang")
    waiting = threading.Event()

    def interrupt() -> None:
        waiting.wait(30)
        _thread.interrupt_main()

    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="memory://") as llm:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt), llm.stream("Count", HAIKU) as stream:
            assert [next(stream), next(stream)] == WORDS[:2]
            waiting.set()
            next(stream)  # the server says no more (a hang guard: the fixture's timeout)
        (record,) = _recent(llm)
        assert record.outcome is Outcome.CANCELLED
        assert llm.run("still there?", CHEAP, timeout=30).content


def test_a_stream_waiting_past_its_timeout_is_cancelled_and_recorded(
    server: FakeLLMServer,
) -> None:
    _streams(server, fault_after=2, fault="hang")
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="memory://") as llm:
        # 3 s: the stream opens within it however busy the machine
        with llm.stream("Count", HAIKU, timeout=3.0) as stream:
            assert [next(stream), next(stream)] == WORDS[:2]
            with pytest.raises(TimeoutError, match=r"^no answer within timeout=3 s"):
                next(stream)
            assert list(stream) == [] and stream.text == "one two"
        (record,) = _recent(llm)
        assert record.outcome is Outcome.CANCELLED and record.output_tokens == 2
        assert llm.run("still there?", CHEAP, timeout=30).content


def test_a_streams_timeout_bounds_each_wait_not_the_whole_answer(server: FakeLLMServer) -> None:
    # eight chunks 250 ms apart take at least 1.75 s: past the timeout, each gap well
    # inside it (a machine busy with other work may stall a gap by a second)
    _streams(server, chunk_interval_ms=250)
    with (
        SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm,
        llm.stream("Count", HAIKU, timeout=1.5) as stream,
    ):
        assert list(stream) == WORDS


def test_a_stream_timeout_before_the_first_delta_cancels_the_opening(
    server: FakeLLMServer,
) -> None:
    server.script("claude-fake-haiku", ["hang"])
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="memory://") as llm:
        manager = llm.stream("Count", HAIKU, timeout=0.3)
        with pytest.raises(TimeoutError), manager:
            pytest.fail("entered a stream that never answered")  # pragma: no cover
        (record,) = _recent(llm)
        assert record.outcome is Outcome.CANCELLED


def test_a_stream_refuses_a_bad_timeout_or_input_before_anything_is_sent(
    server: FakeLLMServer,
) -> None:
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:
        for bad in (-1, 0, math.nan, "5", True):
            with pytest.raises(ConfigurationError, match=r"^timeout must be a number > 0"):
                llm.stream("hello", HAIKU, timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="empty"):
            llm.stream("   ", HAIKU)
        assert server.requests() == 0
    for use in (lambda: llm.stream("hello", HAIKU), lambda: llm.run("hello", HAIKU)):
        with pytest.raises(NotOpenError) as closed:
            use()
        # its state in words, and what to do
        assert "SyncExecutor is closed (close() was called, or its `with` block ended)" in str(
            closed.value
        )
        assert "build a new SyncExecutor" in str(closed.value)


def test_a_stream_is_read_from_another_thread_one_thread_at_a_time(
    server: FakeLLMServer,
) -> None:
    _streams(server, fault_after=1, fault="hang")
    raised: list[BaseException] = []
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:
        with llm.stream("Count", HAIKU) as stream:

            def read() -> None:
                try:
                    next(stream)
                except BaseException as exc:
                    raised.append(exc)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(30)
            assert raised == [] and stream.text == "one"  # the first delta, in that thread
            reader = threading.Thread(target=read, daemon=True)
            reader.start()  # waits for a piece that does not come
            while not stream._lock.locked() and reader.is_alive():
                time.sleep(0.005)
            with pytest.raises(RuntimeError, match="another thread is reading"):
                next(stream)
        reader.join(30)  # leaving the block closed the stream under the waiting read
    assert not reader.is_alive()
    assert [type(e) for e in raised] == [StopIteration]  # it ended as a read after close


def test_close_ends_a_stream_read_in_another_thread(server: FakeLLMServer, tmp_path: Path) -> None:
    _streams(server, fault_after=1, fault="hang")
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    llm = SyncExecutor(providers(server), registry=REGISTRY, telemetry_store=url)
    raised: list[BaseException] = []
    opened = threading.Event()

    def read() -> None:
        try:
            with llm.stream("Count", HAIKU) as stream:
                opened.set()
                list(stream)
        except BaseException as exc:
            raised.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    opened.wait(30)
    llm.close()
    reader.join(10)
    assert not reader.is_alive(), "the stream's read still blocked after close()"
    assert len(raised) == 1 and isinstance(raised[0], NotOpenError), raised
    assert [r.outcome for r in _records(tmp_path / "calls.db")] == [Outcome.CANCELLED]


def test_a_stream_works_in_a_notebooks_running_loop_and_is_refused_on_its_own(
    server: FakeLLMServer,
) -> None:
    _streams(server)
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://") as llm:

        async def cell() -> list[str]:  # a notebook cell: its loop running, blocked
            with llm.stream("Count", HAIKU) as stream:
                return list(stream)

        assert asyncio.run(cell()) == WORDS

        async def inside() -> object:
            return llm.stream("nested", HAIKU)

        error = _call_from_a_thread(llm, inside)
        assert isinstance(error, ConfigurationError), error
        assert "async with llm.executor.stream(" in str(error)
    assert server.requests() == 1


def test_a_streams_deadline_bounds_the_callers_reading_of_pieces_already_there(
    server: FakeLLMServer,
) -> None:
    _streams(server)  # the whole answer at once: every piece there before it is read
    # 3 s: the stream opens within it however busy the machine
    context = ExecutionContext(workflow="script", model="claude-fake-haiku", deadline=3.0)
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="memory://") as llm:
        with llm.stream("Count", context) as stream:
            entered = time.monotonic()  # the deadline counts from before this
            assert [next(stream), next(stream)] == WORDS[:2]  # the rest read with the second
            while time.monotonic() < entered + 3.0:
                time.sleep(0.05)
            with pytest.raises(StreamInterruptedError, match="deadline"):
                next(stream)
        (record,) = _recent(llm)
    assert record.outcome is Outcome.CANCELLED


def test_a_stream_keeps_a_sync_executor_nothing_else_holds_open(server: FakeLLMServer) -> None:
    _streams(server)
    with SyncExecutor(providers(server), registry=REGISTRY, telemetry_store="null://").stream(
        "Count", HAIKU
    ) as stream:
        gc.collect()  # the executor is referred to by the stream alone
        assert list(stream) == WORDS


def test_a_sync_stream_read_without_with_says_how_to_read_it() -> None:
    # `for delta in llm.stream(...)` raised a bare "'SyncStreamManager' object is not
    # iterable"
    from empathy_models.providers import OpenAIProvider

    from ._threaded_server import threaded_fake_server

    with (
        threaded_fake_server() as server,
        SyncExecutor(
            [OpenAIProvider(api_key="k", base_url=server.openai_base_url)],
            telemetry_store="null://",
        ) as llm,
    ):
        with pytest.raises(TypeError, match=r"with llm\.stream\(\.\.\.\) as stream"):
            for _ in llm.stream("hi"):  # type: ignore[attr-defined]
                pass
        assert server.requests() == 0
        with llm.stream("hi") as stream:  # as the error says
            assert "".join(stream)
