"""
A synchronous facade for scripts and notebooks: `SyncExecutor`.

::

    from empathy_models import AnthropicProvider, ExecutionContext
    from empathy_models.sync import SyncExecutor

    with SyncExecutor([AnthropicProvider()], telemetry_store="sqlite:///calls.db") as llm:
        answer = llm.run("Summarize ...", ExecutionContext(task_type="summarize"))
        print(answer.content)

It owns one event loop, run by a background thread, and one `EmpathyLLMExecutor` on
it, reused by every `SyncExecutor.run` and `SyncExecutor.stream` (one HTTP session, one
breaker view, one router), so a script does not rebuild an executor per call.  Calls
may come from any thread, concurrently; in a notebook whose own loop is running, `run`
and `stream` work as well (they block that cell only, not the private loop).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from ._executor import (
    SYNC_LOOPS,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMResponse,
    Prompt,
    _Breaker,
    _Router,
)
from ._loops import submit
from ._sync_stream import SyncStream, SyncStreamManager
from ._validators import call_site, caller_site, check, failure, number
from .abc import Provider, TelemetryBackend
from .backends.batching import install_exit_hooks_from_caller
from .exceptions import ConfigurationError, NotOpenError

if TYPE_CHECKING:
    from .streaming import StreamManager

__all__ = ["SyncExecutor", "SyncStream", "SyncStreamManager"]

T = TypeVar("T")

logger = logging.getLogger("empathy_models.sync")


_timeout = number(
    failure(ConfigurationError),
    low=0,
    low_open=True,
    finite=False,
    optional=True,
    type_why="must be a number > 0 or None",
    why="must be a number > 0 (None or inf: no limit)",
)

# how long `close` waits for the calls it cancelled to finish unwinding (a coroutine
# given to `SyncExecutor.call` may ignore the cancellation) before closing the executor
_CANCEL_GRACE = 10.0

# how often the main thread, waiting for a call, wakes up: the kernel may give a Ctrl-C
# (SIGINT) to any thread, and Python raises it in the main thread only when that runs
_WAKE = 0.25


class _LoopThread:
    """A private event loop on a daemon thread; never refers back to its owner."""

    def __init__(self, name: str) -> None:
        self.pid = os.getpid()  # a forked child has the loop object, not its thread
        self.loop = asyncio.new_event_loop()
        SYNC_LOOPS.add(self.loop)  # its executor's other-loop error points to `run`
        self.stack: AsyncExitStack | None = None
        self.closed = False
        self._closed_all = threading.Event()  # set once the first `close` is over
        self._lock = threading.Lock()
        # the calls in flight: their futures (for the callers' threads) and their tasks
        # on the loop, which `close` cancels before it closes the executor
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutting_down = False  # set on the loop: calls starting later are refused
        # on the loop: `close`'s wait for the cancelled calls, which a Ctrl-C cuts short
        self._grace: asyncio.Task[Any] | None = None
        self._hurried = False
        self._shutdown: asyncio.Future[None] | None = None  # `_shut_down`'s one run
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        """Run the loop until `close` stops it, whatever escapes one of its callbacks."""
        asyncio.set_event_loop(self.loop)
        while True:
            try:
                self.loop.run_forever()
            except (SystemExit, KeyboardInterrupt) as exc:
                # asyncio lets these out of run_forever (a callback or task of the code
                # given to `call` raised one): the loop serves on, the calls wait for it
                logger.error(
                    "%s raised on the SyncExecutor's event loop (not by a call, which "
                    "would have raised it in its caller); the loop goes on",
                    type(exc).__name__,
                    exc_info=exc,
                )
                continue
            return  # stopped by `close`

    def on_loop_thread(self) -> bool:
        # the thread itself, not its id: a thread started after this one ended may get it
        return threading.current_thread() is self.thread

    def check_process(self) -> None:
        """Raise `NotOpenError` in a forked child: the loop thread did not survive the fork."""
        if os.getpid() != self.pid:
            raise NotOpenError(
                f"this SyncExecutor was created in process {self.pid}, and this is process "
                f"{os.getpid()} (a fork of it), where its event loop thread does not run; "
                "make a new one in this process (e.g. in gunicorn's post_fork hook, or in "
                "the multiprocessing target), and do not close the parent's here"
            )

    def call(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        if self.on_loop_thread():
            # the loop would wait for a call it can only run once this one returns
            raise ConfigurationError(
                "SyncExecutor.run(), .stream() or .call() called from inside one of its "
                "own calls (code running on its event loop), where it would wait for "
                "itself; there, await the EmpathyLLMExecutor directly (`await "
                "llm.executor.run(...)`, `async with llm.executor.stream(...)`, "
                "`await fn(...)`)"
            )

        # the caller's line, where the warnings of the work on the loop point
        site = call_site()

        async def body() -> T:
            caller_site.set(site)  # this task's context only (and its tasks')
            if self._shutting_down:
                raise _closed_during_call()
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                return await make()
            except (SystemExit, KeyboardInterrupt) as exc:
                # asyncio would let these out of the loop (ending its thread), never to
                # reach the caller: carried as an ordinary exception, raised there
                raise _Carried(exc) from None
            except asyncio.CancelledError as exc:
                if task.cancelling():  # cancelled by its caller (a timeout, Ctrl-C) or `close`
                    raise
                # raised by the call itself: the task would end cancelled, and its caller
                # hear of a concurrent.futures.CancelledError instead
                raise _Carried(exc) from None
            finally:
                self._tasks.discard(task)

        self.check_process()
        future: concurrent.futures.Future[T] | None = None
        try:
            # a Ctrl-C as soon as the call is submitted cancels it too (the `except`)
            with self._lock:
                if self.closed:
                    raise _closed_error()
                # a call its caller gave up on (a timeout, Ctrl-C) that then fails is logged
                future = submit(self.loop, body(), "a SyncExecutor call", logger)
                self._futures.add(future)
            if not _wait(future, timeout) and future.cancel():
                # the call is cancelled on the loop as well
                raise TimeoutError(
                    f"no answer within timeout={timeout:g} s: the call was cancelled"
                )
            return future.result()
        except _Carried as carried:
            raise carried.exc from None
        except concurrent.futures.CancelledError:
            if self.closed:
                raise _closed_during_call() from None
            raise
        except BaseException:
            # a timeout or Ctrl-C here cancels the call on the loop as well
            if future is not None:
                future.cancel()
            raise
        finally:
            if future is not None:
                with self._lock:
                    self._futures.discard(future)

    async def _shut_down(self) -> None:
        """
        On the loop: `_shut_down_once`, which runs once however often this is scheduled
        (again by a Ctrl-C that came while `close` was handing it over, its handle lost).
        """
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._shut_down_once())
        await asyncio.shield(self._shutdown)

    async def _shut_down_once(self) -> None:
        """On the loop: cancel the calls in flight, wait for them, close the stack."""
        self._shutting_down = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks and not self._hurried:
            self._grace = asyncio.ensure_future(asyncio.wait(tasks, timeout=_CANCEL_GRACE))
            await asyncio.wait({self._grace})  # done, or cancelled by `_hurry`
        stack, self.stack = self.stack, None
        if stack is not None:
            await stack.aclose()

    def _hurry(self) -> None:
        """On the loop: stop waiting for the cancelled calls (a Ctrl-C in `close`)."""
        self._hurried = True
        if self._grace is not None:
            self._grace.cancel()

    def _close_interruptibly(self) -> KeyboardInterrupt | None:
        """
        Run `_shut_down` and wait for it.  A first Ctrl-C only cuts short its wait for
        the cancelled calls (the executor is still closed, bounded by its own close) and
        is returned; a second one is raised.
        """
        try:
            shut = asyncio.run_coroutine_threadsafe(self._shut_down(), self.loop)
            _wait(shut, None)
        except KeyboardInterrupt as exc:
            logger.warning(
                "Ctrl-C while the SyncExecutor closes: the calls still running are no "
                "longer waited for; closing the executor and writing its records first "
                "(Ctrl-C again to stop at once, leaving them)"
            )
            self.loop.call_soon_threadsafe(self._hurry)
            # the same shut-down (it runs once), whether or not the Ctrl-C came before
            # it was handed over
            shut = asyncio.run_coroutine_threadsafe(self._shut_down(), self.loop)
            _wait(shut, None)
            shut.result()
            return exc
        shut.result()
        return None

    def close(self) -> None:
        """
        End the calls in flight, close what was entered, stop the loop, join the thread.

        Idempotent: a close racing another returns once that one is over.  Each call
        in flight is cancelled on the loop, and its caller gets `NotOpenError`; a call
        that does not end within `_CANCEL_GRACE` seconds is left behind (its caller is
        released all the same) and the executor closed regardless.  A Ctrl-C meanwhile
        ends that wait at once, and is raised once the executor is closed (a second one
        while it closes is raised at once, leaving it open).
        In a forked child (its finalizer runs at the child's exit) it only marks the
        copy closed: the loop thread, and what it holds, belong to the parent.
        """
        if os.getpid() != self.pid:
            self.closed = True  # no lock: a thread of the parent may have held it at the fork
            return
        with self._lock:
            closing = not self.closed
            self.closed = True
            futures = list(self._futures)
        if not closing:
            # on the loop thread the first close may be waiting for this very call
            if not self.on_loop_thread():
                self._closed_all.wait()
            return
        interrupted: KeyboardInterrupt | None = None
        try:
            if self.loop.is_running():
                interrupted = self._close_interruptibly()
        finally:
            try:
                # release any caller still waiting (a call that ignored its cancellation)
                # while the loop can still take the cancellation
                for future in futures:
                    future.cancel()
                if self.loop.is_running():
                    self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join()
                self.loop.close()
            finally:
                self._closed_all.set()
        if interrupted is not None:
            raise interrupted

    def close_from_anywhere(self) -> None:
        """`close`, handed to a thread of its own when run on the loop thread (by GC)."""
        if self.on_loop_thread():
            threading.Thread(target=self.close, name=self.thread.name + "-close").start()
        else:
            self.close()


def _wait(future: concurrent.futures.Future[Any], timeout: float | None) -> bool:
    """Whether ``future`` is done within ``timeout`` seconds (``None``: until it is)."""
    done = threading.Event()  # `concurrent.futures.wait` misses a cancellation
    future.add_done_callback(lambda _: done.set())
    end = None if timeout is None else time.monotonic() + timeout
    wake = _WAKE if threading.current_thread() is threading.main_thread() else None
    while True:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            return future.done()
        step = wake if left is None else left if wake is None else min(left, wake)
        if step is not None:
            # a lock's wait takes at most TIMEOUT_MAX s (``sys.maxsize`` overflows it)
            step = min(step, threading.TIMEOUT_MAX)
        if done.wait(step):
            return True


def _not_opened_here(resource: object, exc: NotOpenError) -> NotOpenError:
    return NotOpenError(
        f"the {type(resource).__name__} given to SyncExecutor cannot be opened on its event "
        f"loop ({exc}): pass it unopened, and SyncExecutor opens and closes it there"
    )


class _Carried(Exception):
    """
    A `SystemExit` or `KeyboardInterrupt` of a call, or a `asyncio.CancelledError` it
    raised itself, carried from the loop to its caller.
    """

    def __init__(self, exc: SystemExit | KeyboardInterrupt | asyncio.CancelledError) -> None:
        super().__init__(exc)
        self.exc = exc


def _closed_error() -> NotOpenError:
    return NotOpenError(
        "SyncExecutor is closed (close() was called, or its `with` block ended) and cannot "
        "be opened again: build a new SyncExecutor for more calls"
    )


def _closed_during_call() -> NotOpenError:
    return NotOpenError(
        "SyncExecutor was closed while this call was running, so the call was cancelled; "
        "close the SyncExecutor only after its calls have returned"
    )


class SyncExecutor:
    """
    `EmpathyLLMExecutor` for synchronous code, on an event loop of its own.

    Building it starts a daemon thread running a private event loop and opens the
    executor there.  Use it as a context manager or call `close`; an instance still open
    at interpreter exit is closed then, before the telemetry backends' exit flush (so
    what it queued is written by its own close, without a warning), and one that is
    garbage-collected unclosed is closed too.  Built in the main thread, it installs
    the backends' SIGTERM handler (see `empathy_models.backends.batching`).

    `from_config` builds it from ``empathy.toml``, as `EmpathyLLMExecutor.from_config`.
    `run` takes the same arguments as `EmpathyLLMExecutor.run` (and a ``timeout``),
    blocks until the answer, and raises what it raises; `stream` is
    `EmpathyLLMExecutor.stream` read with ``with`` and ``for`` (a `SyncStream`).
    `call` runs any other coroutine on the same loop
    (``llm.call(router.get_routing_stats, "docs")``).  Calling `run`, `stream` or
    `call` after `close` raises `NotOpenError` (a `RuntimeError`), and so does a call
    (or a stream's read) still running in another thread when `close` is called:
    `close` cancels it first.  Code running on the private loop (a coroutine given to
    `call`) cannot use `run`, `stream`, `call` or `close`, which would wait for it:
    they raise `ConfigurationError` there.

    It belongs to the process that built it: its loop thread does not survive
    `os.fork`, so in a forked child (``gunicorn --preload``, multiprocessing's
    ``fork``) `run`, `stream`, `call` and `executor` raise `NotOpenError` at once, and the
    child's exit (or `close`) leaves it to the parent.  Build one per process.

    Args:
        providers: as for `EmpathyLLMExecutor`.
        telemetry_store: as for `EmpathyLLMExecutor`.
        router: as for `EmpathyLLMExecutor`; an `AdaptiveModelRouter` given as an object
            is opened and closed with the executor, since synchronous code cannot
            ``async with`` it.
        breaker: as for `EmpathyLLMExecutor`; a `CircuitBreaker` given as an object is
            opened and closed with the executor as well.
        **options: the executor's other arguments (``registry``, ``retry``,
            ``fallback``, ...).
    """

    def __init__(
        self,
        providers: Sequence[Provider] | Mapping[str, Provider],
        *,
        telemetry_store: TelemetryBackend | str | None = None,
        router: _Router | None = None,
        breaker: _Breaker | str | None = None,
        **options: Any,
    ) -> None:
        self._start(
            (router, breaker),
            lambda: EmpathyLLMExecutor(
                providers,
                telemetry_store=telemetry_store,
                router=router,
                breaker=breaker,
                **options,
            ),
        )

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        router: bool | _Router | None = True,
        **options: Any,
    ) -> Self:
        """
        A `SyncExecutor` over `EmpathyLLMExecutor.from_config`: the executor built from
        ``empathy.toml`` (its providers, registry, telemetry backend, breaker and, with
        ``router=True``, a router over the same telemetry), on the private loop.

        Args:
            path: the file; by default found as `EmpathyLLMExecutor.from_config` finds it.
            router: ``True`` builds the router; ``False`` or ``None``: no router; an
                `AdaptiveModelRouter` given is opened and closed with the executor, as
                `SyncExecutor` opens one given to its constructor (and so is a
                `CircuitBreaker` given as ``breaker=``).
            **options: constructor arguments (``retry=``, ``fallback=``, ...); they win.

        Raises:
            ConfigurationError: an invalid file (its loop thread stopped again).
        """
        self = cls.__new__(cls)
        self._start(
            (router, options.get("breaker")),
            lambda: EmpathyLLMExecutor.from_config(path, router=router, **options),
        )
        return self

    def _start(
        self, resources: tuple[object, ...], build: Callable[[], EmpathyLLMExecutor]
    ) -> None:
        """
        Start the loop thread, open there each of ``resources`` that is an async context
        manager (a router or breaker object), then the executor ``build`` makes there.
        """
        self._worker = _LoopThread("empathy-models-sync")
        # at exit (or when collected unclosed) the loop thread still closes what it holds
        self._finalizer = weakref.finalize(self, self._worker.close_from_anywhere)
        self._executor: EmpathyLLMExecutor | None = None
        self._hooks_pending = True  # the SIGTERM handler not settled yet (see below)

        async def open_all() -> EmpathyLLMExecutor:
            stack = AsyncExitStack()
            try:
                for resource in resources:
                    # objects that are async context managers (AdaptiveModelRouter,
                    # CircuitBreaker) are opened here and closed with the executor
                    if hasattr(resource, "__aenter__") and hasattr(resource, "__aexit__"):
                        try:
                            await stack.enter_async_context(
                                cast(AbstractAsyncContextManager[object], resource)
                            )
                        except NotOpenError as exc:  # opened already, in another loop
                            raise _not_opened_here(resource, exc) from exc
                executor = build()
                await stack.enter_async_context(executor)
            except BaseException:
                await stack.aclose()
                raise
            self._worker.stack = stack
            return executor

        try:
            self._executor = self._worker.call(open_all)
        except BaseException:
            self.close()
            raise
        # the backends started on the loop thread: their SIGTERM handler is installed from
        # here (signal handlers need the main thread), and this instance closes itself at
        # exit before their exit flush runs (atexit runs the last registered first), so
        # what it queued is written by its own close, not flushed as "never closed"
        # (a backend the executor does not own starts at its first record: the next
        # `run` or `call` from the main thread installs the handler then)
        self._hooks_pending = not install_exit_hooks_from_caller()
        atexit.register(self._finalizer)

    @property
    def executor(self) -> EmpathyLLMExecutor:
        """The `EmpathyLLMExecutor` running on the private loop (for its properties)."""
        return self._open()

    @property
    def closed(self) -> bool:
        return self._worker.closed

    def _open(self) -> EmpathyLLMExecutor:
        self._worker.check_process()
        if self._worker.closed or self._executor is None:
            raise _closed_error()
        return self._executor

    def run(
        self,
        prompt: Prompt,
        context: ExecutionContext | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> LLMResponse:
        """
        Answer ``prompt`` (see `EmpathyLLMExecutor.run`), blocking until done.

        Args:
            prompt: as for `EmpathyLLMExecutor.run`.
            context: as for `EmpathyLLMExecutor.run`.
            timeout: seconds to wait, a number > 0 (``None`` or ``inf``: no limit); on
                expiry (or Ctrl-C) the call is cancelled on the loop and recorded as
                cancelled (an error it still ends with is logged on
                ``empathy_models.sync``).
            **options: ``tools``, ``tool_choice``, ``response_format``, ``stop``, ``top_p``,
                ``seed``, ``extra_body``, passed on.

        Returns:
            The `LLMResponse`.

        Raises:
            TimeoutError: when ``timeout`` expires (`KeyboardInterrupt` on Ctrl-C).
            ConfigurationError: ``timeout`` is not a number > 0 or None (before anything
                is sent).
            NotOpenError: (a `RuntimeError`) after `close`.
            ConfigurationError: when called from code running on the executor's own
                loop (a coroutine given to `call`), where it would wait for itself; await
                ``self.executor.run(...)`` there instead.
            Exception: whatever `EmpathyLLMExecutor.run` raises.
        """
        timeout = check(_timeout, "timeout", timeout)
        executor = self._open()
        if self._hooks_pending:
            self._hooks_pending = not install_exit_hooks_from_caller()
        limit = None if timeout is None or math.isinf(timeout) else timeout
        return self._worker.call(lambda: executor.run(prompt, context, **options), limit)

    def stream(
        self,
        prompt: Prompt,
        context: ExecutionContext | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> SyncStreamManager:
        """
        Answer ``prompt`` as a stream of text deltas (see `EmpathyLLMExecutor.stream`
        and `empathy_models.streaming`), read from synchronous code::

            with llm.stream("Tell me a story", ExecutionContext(workflow="chat")) as stream:
                for delta in stream:
                    print(delta, end="", flush=True)
                response = stream.get_final_response()

        The stream is read on the private loop; ``for event in stream.events()`` yields
        the tool calls' pieces beside the text.  Leaving the block early (``break``, an
        exception, Ctrl-C) closes the response there and records the attempt as
        ``cancelled``, as leaving ``async with`` does.

        Args:
            prompt: as for `EmpathyLLMExecutor.stream`.
            context: as for `EmpathyLLMExecutor.stream`.
            timeout: seconds each wait may take, a number > 0 (``None`` or ``inf``: no
                limit): entering the block (routing, up to the first delta), then each
                wait for the next delta.  On expiry (or Ctrl-C) the wait is cancelled on
                the loop, the stream closed and recorded as cancelled, and
                `TimeoutError` raised (`KeyboardInterrupt` on Ctrl-C).
            **options: ``tools``, ``tool_choice``, ``response_format``, ``stop``, ``top_p``,
                ``seed``, ``extra_body``, passed on.

        Returns:
            A `SyncStreamManager`: ``with`` it to get the `SyncStream`.

        Raises:
            ConfigurationError: ``timeout`` is not a number > 0 or None, or bad input
                (here, before anything is sent).
            NotOpenError: (a `RuntimeError`) after `close` (here, or from a read of a
                stream that `close` ended).
            ConfigurationError: when called from code running on the executor's own
                loop (a coroutine given to `call`), where it would wait for itself; use
                ``async with self.executor.stream(...)`` there instead.
            Exception: whatever `EmpathyLLMExecutor.stream` raises, here, from ``with``
                or from a read (`AllRoutesFailedError`, `StreamInterruptedError`, ...).
        """
        timeout = check(_timeout, "timeout", timeout)
        executor = self._open()
        if self._hooks_pending:
            self._hooks_pending = not install_exit_hooks_from_caller()
        limit = None if timeout is None or math.isinf(timeout) else timeout

        async def plan() -> StreamManager:  # on the loop, as the router's state is there
            return executor.stream(prompt, context, **options)

        manager = self._worker.call(plan, limit)
        return SyncStreamManager(SyncStream(self, manager, limit))

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """
        Run ``fn(*args, **kwargs)`` on the private loop and return its result.

        What it raises is raised here, `SystemExit`, `KeyboardInterrupt` and an
        `asyncio.CancelledError` it raises itself included (the loop serves on).  On
        Ctrl-C while it waits, the coroutine is cancelled on the loop; an error it still
        ends with is logged on ``empathy_models.sync``.

        Raises:
            NotOpenError: (a `RuntimeError`) after `close`.
            ConfigurationError: when called from code running on the executor's own
                loop (a coroutine given to `call`), where it would wait for itself; await
                ``fn(*args, **kwargs)`` there instead.
        """
        self._open()
        if self._hooks_pending:
            self._hooks_pending = not install_exit_hooks_from_caller()
        return self._worker.call(lambda: fn(*args, **kwargs))

    def close(self) -> None:
        """
        Close the executor (and the router and breaker it opened), then the loop.

        Calls still running in other threads are cancelled first (and recorded as
        cancelled); each of them raises `NotOpenError` in its thread.  Idempotent.

        Raises:
            ConfigurationError: when called from code running on the executor's own
                loop (a coroutine given to `call`), where it would wait for itself;
                close it after that call has returned.
        """
        if self._worker.on_loop_thread():
            raise ConfigurationError(
                "SyncExecutor.close() called from inside one of its own calls (code "
                "running on its event loop), where it would wait for itself; close it "
                "after that call has returned"
            )
        self._finalizer()
        self._worker.close()  # when another thread's close came first: once that is over
        atexit.unregister(self._finalizer)

    def __enter__(self) -> Self:
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._worker.closed else "open"
        return f"SyncExecutor({state}, executor={self._executor!r})"
