"""
Store operations carried to their end although the calling task is cancelled.

A failure must count and a probe lease must come back even when the caller is being
cancelled, and a batch of written-behind successes taken from memory must reach the
store; likewise a budget reservation must be settled (or, granted to a caller already
cancelled, given back) in the quota store.  But a hung store must not hold the caller
forever, nor past the time it had (its deadline, the store's timeout).  `Settler` runs
such an operation in a task of its own and waits for it, bounded by that time too,
before the cancellation is raised (a read nobody needs once its caller is gone is not
waited for at all); operations still running then are kept in ``releases`` for
`aclose` to await, and a stall that outlasts that time still reaches the caller's
bookkeeping (``late``).  A breaker has one, and so has the executor's limiter
(`empathy_models.limits.guard.Limiter`).

In exact mode (``local_view_ttl=0``) the successes of CLOSED tickets are sent to the store
right after the call, by a task per key (``behind``), so the caller does not wait for the
store's answer; a later store operation of this breaker on the key waits for it first
(`ordered`), which keeps this process's order of outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Container, Coroutine
from typing import Any, TypeVar

from ._propagation import background
from .abc import CircuitStateStore
from .circuit import BreakerPolicy, shown
from .records import Admission, Outcome, OutcomeReport

T = TypeVar("T")

logger = logging.getLogger("empathy_models.breaker")

SHIELD_SECONDS = 10.0
"""How long returning a probe lease (or any settled operation) may take while the caller
is being cancelled."""


class Settler:
    """
    Runs store operations to their end for one breaker (or one limiter).

    ``releases`` holds the operations still running after their caller gave up waiting;
    ``behind`` the task sending each key's successes in exact mode (`send_behind`).
    """

    __slots__ = ("behind", "drain_by", "releases")

    def __init__(self) -> None:
        self.releases: set[asyncio.Future[Any]] = set()
        self.behind: dict[str, asyncio.Task[None]] = {}
        # the event loop's time `drain` waits until at most (its owner's close, which
        # has one budget for all its waits, sets it)
        self.drain_by: float | None = None

    def send_behind(
        self, key: str, flush: Callable[[str], Awaitable[object]], pending: Container[str]
    ) -> None:
        """
        ``flush(key)`` in a task of its own while ``key`` is in ``pending`` (successes
        arriving meanwhile go too), unless such a task is running already or nothing
        is pending (a DISABLED key's successes are not kept).
        """
        if key in pending and key not in self.behind:
            task = background(self._send(key, flush, pending))
            self.behind[key] = task

    async def _send(
        self, key: str, flush: Callable[[str], Awaitable[object]], pending: Container[str]
    ) -> None:
        try:
            while key in pending:
                await flush(key)
        except Exception:  # nobody awaits this task: say what went wrong
            logger.exception(
                "circuit breaker: sending successes of %s to the store failed", shown(key)
            )
        finally:
            del self.behind[key]

    def ordered(self, key: str, operation: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """
        ``operation`` on ``key``, carried to its end (`run`) once the key's successes in
        flight (if any) have landed; from the task sending them, as is (nothing cancels
        that task: `aclose` waits for it).
        """
        task = self.behind.get(key)
        if task is None:
            return self.run(operation)
        if task is asyncio.current_task():
            return operation
        return self.run(_after(task, operation))

    async def settle(self, key: str | None = None) -> None:
        """Wait until ``key``'s (or every key's) successes in flight have landed."""
        current = asyncio.current_task()
        tasks = {
            task
            for name, task in self.behind.items()
            if (key is None or name == key) and task is not current
        }
        if tasks:
            await asyncio.wait(tasks)

    async def run(
        self,
        operation: Coroutine[Any, Any, T],
        within: float | None = None,
        *,
        carried: bool = True,
        late: Callable[[], object] | None = None,
    ) -> T:
        """
        ``await operation``, carried to its end even when the caller is cancelled
        (asyncio-natively or by an anyio scope) meanwhile: it runs in a task of its own
        and the caller waits for it, for at most `SHIELD_SECONDS` (and what is left of
        ``within``), before the cancellation is raised (with the result, if any, as
        ``_empathy_result``).  Not ``carried`` (a read nobody needs once its caller is
        gone), the cancellation is raised at once.  An operation still running then goes
        on in the background, kept in ``releases`` until it ends.

        With ``within``, the caller waits at most that many seconds: then `Expired` is
        raised and the operation goes on in the background, kept in ``releases`` until
        it ends (a stalled store does not hold the caller; what it does still lands).
        An operation that ended in the very turn of the event loop in which ``within``
        passed answers as if in time (its result returned, its error raised).
        When the caller was cancelled first, ``late`` (if any) is called instead, once
        ``within`` has passed with the operation still running: the store stalled
        although nobody is left to see `Expired`.

        Raises:
            asyncio.CancelledError: The caller was cancelled meanwhile.
            Expired: ``within`` seconds passed first.
        """
        loop = asyncio.get_running_loop()
        # the caller waits for a future the task resolves as it ends: a cancellation of
        # the caller cancels that future, never the task (as `asyncio.shield` would
        # arrange, one turn of the event loop later)
        answer: asyncio.Future[T] = loop.create_future()
        task = loop.create_task(_answering(operation, answer))
        timer = None
        if within is not None:
            timer = loop.call_later(max(within, 0.0), _expire, answer, task, late)
        try:
            return await answer
        except Expired:
            if not task.done() or task.cancelled():
                self._keep(task)
                raise
        except asyncio.CancelledError as exc:
            if carried:
                await _carried(task, timer)
            if not task.done():
                self._keep(task)
                if late is not None:
                    timer = None  # left to call ``late`` if ``within`` passes first
            elif not task.cancelled() and task.exception() is None:
                exc._empathy_result = task.result()  # type: ignore[attr-defined]
            raise
        except BaseException:
            if task.done() and not task.cancelled():
                task.exception()  # raised here: retrieved, so asyncio does not log it
            raise
        finally:
            if timer is not None:
                timer.cancel()
        # the operation ended in the turn of the event loop in which ``within`` passed,
        # before its caller saw `Expired`: its outcome is the answer (what it granted,
        # a probe lease or a reservation, is not dropped on the way)
        return task.result()

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """``task``, which its caller stopped waiting for, in ``releases`` until it ends."""
        if not task.done():
            self.releases.add(task)
            task.add_done_callback(self._released)

    def background(self, operation: Coroutine[Any, Any, object]) -> None:
        """``operation`` in a task of its own, not waited for: in ``releases`` until it ends."""
        self._keep(asyncio.get_running_loop().create_task(operation))

    async def drain(self, seconds: float = SHIELD_SECONDS) -> None:
        """
        Wait, at most ``seconds`` (and until ``drain_by``, if set), for the operations
        their callers stopped waiting for, also those they leave in turn (a write behind
        that stopped waiting for its store leaves the store's operation running).
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if self.drain_by is not None:
            until = min(until, self.drain_by)
        while self.releases:
            await asyncio.wait(set(self.releases), timeout=max(until - loop.time(), 0.0))
            if loop.time() >= until:
                break

    def _released(self, task: asyncio.Future[Any]) -> None:
        """An operation its caller stopped waiting for has ended."""
        self.releases.discard(task)
        if not task.cancelled():
            task.exception()  # nobody awaits it any more: asyncio need not log it as lost

    async def admit(self, store: CircuitStateStore, key: str, policy: BreakerPolicy) -> Admission:
        """
        The store's admission, such that a cancelled caller can neither leak a probe
        lease nor lose its cancellation.

        A store admission may grant a half-open probe lease.  If the caller is cancelled
        while it is in flight, the admission still finishes (see `run`) and a lease it
        granted is given back (reported as cancelled) before the cancellation is raised,
        instead of blocking the key for ``probe_lease_seconds``.  If the store's client
        swallowed a cancellation (redis-py's asyncio client does, now and then),
        ``Task.cancelling()`` still shows it: the lease is given back and
        `asyncio.CancelledError` raised, so the guarded call does not run.

        Raises:
            asyncio.CancelledError: The caller was cancelled meanwhile.
        """
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:
            admission = await self.run(store.admit(key, policy))
        except asyncio.CancelledError as exc:
            granted = getattr(exc, "_empathy_result", None)
            if isinstance(granted, Admission):
                await self._give_back_lease(store, granted, policy)
            raise
        if task is not None and task.cancelling() > cancelling:
            await self._give_back_lease(store, admission, policy)
            raise asyncio.CancelledError("cancelled during the circuit-breaker admission")
        return admission

    async def keeping_lease(
        self,
        step: Awaitable[object],
        store: CircuitStateStore,
        admission: Admission,
        policy: BreakerPolicy,
    ) -> None:
        """
        ``await step`` (what follows an admission: its listeners), giving back the
        probe lease the admission granted if ``step`` raises (a cancellation landing in
        an async listener), before re-raising: nobody would report that ticket.
        """
        try:
            await step
        except BaseException:
            await self._give_back_lease(store, admission, policy)
            raise

    async def _give_back_lease(
        self, store: CircuitStateStore, admission: Admission, policy: BreakerPolicy
    ) -> None:
        ticket = admission.ticket
        if ticket is None or ticket.lease_id is None:
            return
        report = OutcomeReport(ticket=ticket, outcome=Outcome.CANCELLED)
        with contextlib.suppress(asyncio.CancelledError):
            await self.run(store.record(ticket.key, policy, [report]))


class Expired(TimeoutError):
    """`Settler.run`'s ``within`` passed before the operation ended (it goes on)."""


def _expire(
    answer: asyncio.Future[Any], task: asyncio.Future[Any], late: Callable[[], object] | None
) -> None:
    """``within`` has passed: `Expired` for the caller, or ``late`` if it was cancelled."""
    if not answer.done():
        answer.set_exception(Expired())
    elif late is not None and not task.done():
        late()  # the caller was cancelled (the task resolves ``answer`` as it ends)


async def _carried(task: asyncio.Future[Any], timer: asyncio.TimerHandle | None) -> None:
    """
    Wait, through cancellations, until ``task`` ends, at most `SHIELD_SECONDS` and
    until ``timer`` (its ``within``) is due.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + SHIELD_SECONDS
    if timer is not None:
        end = min(end, timer.when())
    while not task.done() and loop.time() < end:
        try:
            await asyncio.wait({task}, timeout=end - loop.time())
        except asyncio.CancelledError:
            continue  # delivered again (an anyio scope): keep waiting, raise after


async def _answering(operation: Coroutine[Any, Any, T], answer: asyncio.Future[T]) -> T:
    """``await operation``, its outcome also given to ``answer`` (unless cancelled)."""
    try:
        result = await operation
    except asyncio.CancelledError:
        if not answer.done():
            answer.cancel()
        raise
    except BaseException as exc:
        if not answer.done():
            answer.set_exception(exc)
        raise
    if not answer.done():
        answer.set_result(result)
    return result


async def _after(task: asyncio.Task[None], operation: Coroutine[Any, Any, T]) -> T:
    await asyncio.wait({task})  # its own failure is logged there, not raised here
    return await operation
