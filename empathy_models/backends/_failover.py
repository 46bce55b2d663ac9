"""
`FailoverStateStore`: a `CircuitStateStore` that keeps answering when its store fails.

It decorates a *primary* store.  While the primary answers, every operation is the
primary's.  When it raises `BackendError` (other than `BackendClosedError`) or `OSError`
(which covers `ConnectionError` and `TimeoutError`), or does not answer within
``timeout`` seconds, the operation is answered by a per-process `MemoryStateStore`
seeded with the states the owner last saw (``known``), and so is every operation after
it until the primary answers again.  The primary is tried again by at most one
operation every ``retry_interval`` seconds; when it answers, the fallback is dropped
and the primary's state is the truth again (what was changed in the fallback is not
pushed to the primary).  An operation that did not answer in time is cancelled and
not waited for (see `_within`): the caller is held ``timeout`` seconds at most, however
long the client takes to clean up after it.

A `StateStoreError` naming the key of the operation (the primary cannot read that
key's stored state) sends only that key to a fallback of its own, tried again on the
same schedule; the other keys stay on the primary.  Raised by an operation on every key
(`snapshot_all`), it reaches the caller: one unreadable row is not an outage.

An operator's change (a force, a reset) goes through `FailoverStateStore.control`
instead: to the primary alone, raising `StateStoreError` when it fails.

This is the degraded mode of `empathy_models.CircuitBreaker`, which passes its local
views as ``known`` and turns ``on_degraded`` / ``on_recovered`` into events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from .._breaker_events import describe
from .._loops import close_at_home, elsewhere, other_loop_error, running_loop
from ..abc import CircuitStateStore, force_for
from ..circuit import shown
from ..exceptions import BackendClosedError, BackendError, StateStoreError
from ..records import Admission, CircuitBreakerState, CircuitState, OutcomeReport
from .memory import MemoryStateStore

if TYPE_CHECKING:
    from ..circuit import BreakerPolicy

__all__ = ["FailoverStateStore"]

logger = logging.getLogger("empathy_models.breaker")

T = TypeVar("T")

Op = Callable[[CircuitStateStore], Awaitable[T]]
"""One store operation, to run on the primary or on a fallback."""


STRAY_SECONDS = 1.0
"""How long `FailoverStateStore.aclose` waits for primary operations it gave up on to
end (their client cleaning up) before it cancels them once more."""


async def _within(operation: Awaitable[T], seconds: float, strays: set[asyncio.Task[Any]]) -> T:
    """
    ``await operation``, in a task of its own, for at most ``seconds``.

    When the time is up (or the caller is cancelled) the task is cancelled and not
    waited for: a client may take far longer to clean up after a cancelled command
    than the command was allowed (asyncpg gives a connection back to its pool only
    once the server confirmed a cancel request sent on a new connection, which a
    network partition holds up for its ``command_timeout``).  Such a task is kept in
    ``strays`` until it ends, and its exception retrieved.

    Raises:
        TimeoutError: ``operation`` did not end within ``seconds``.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(_awaited(operation))
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    task.add_done_callback(wake)
    timer = loop.call_later(seconds, wake)
    try:
        await woken
    except BaseException:
        _let_go(task, strays)
        raise
    finally:
        timer.cancel()
    if not task.done():
        _let_go(task, strays)
        raise TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


async def _awaited(operation: Awaitable[T]) -> T:
    return await operation


def _let_go(task: asyncio.Task[Any], strays: set[asyncio.Task[Any]]) -> None:
    """Stop ``task`` without waiting for it (see `_within`)."""
    if task.done():
        if not task.cancelled():
            task.exception()  # nobody awaits it: asyncio need not log it as lost
        return
    task.cancel()
    strays.add(task)
    task.add_done_callback(partial(_ended, strays))


def _ended(strays: set[asyncio.Task[Any]], task: asyncio.Task[Any]) -> None:
    strays.discard(task)
    if not task.cancelled():
        task.exception()  # nobody awaits it: asyncio need not log it as lost


def unreadable_key(exc: BaseException) -> str | None:
    """The key whose stored state ``exc`` says is unreadable, if that is what it says."""
    return exc.key if isinstance(exc, StateStoreError) else None


class FailoverStateStore(CircuitStateStore):
    """
    ``primary`` with a per-process fallback while it fails (see the module docstring).

    Args:
        primary: The store that holds the state.
        clock: UTC epoch seconds; times the retries and is the fallbacks' clock.
        retry_interval: Seconds between two attempts on a failed primary.
        timeout: Seconds one primary operation may take before it counts as a failure
            (``None``: no limit).  Not applied to an in-process primary.
        owns_primary: Whether `aclose` closes the primary too.
        known: ``known(key)`` returns the states to seed a fallback with: every state the
            owner last saw (``key=None``, a whole-store outage) or that of one key.
            Default: none (the fallback starts empty).
        on_degraded: Awaited as ``on_degraded(key, error, only_key)`` after switching to
            a fallback: ``key`` is the operation's key (``None`` for a whole-store
            operation), ``error`` the failure in one line, ``only_key`` true when only
            that key moved to a fallback.
        on_recovered: Awaited as ``on_recovered(key, only_key)`` after the primary (or,
            with ``only_key``, that key's stored state) answered again.
    """

    def __init__(
        self,
        primary: CircuitStateStore,
        *,
        clock: Callable[[], float] = time.time,
        retry_interval: float = 5.0,
        timeout: float | None = 5.0,
        owns_primary: bool = True,
        known: Callable[[str | None], Iterable[CircuitBreakerState]] | None = None,
        on_degraded: Callable[[str | None, str, bool], Awaitable[None]] | None = None,
        on_recovered: Callable[[str | None, bool], Awaitable[None]] | None = None,
    ) -> None:
        self._primary = primary
        self.shared = primary.shared  # type: ignore[misc]
        self._clock = clock
        self._retry_interval = retry_interval
        # a task per operation costs microseconds: only a primary doing I/O gets a timeout
        self._timeout = None if primary.in_process else timeout
        self._owns_primary = owns_primary
        self._known = known
        self._on_degraded = on_degraded
        self._on_recovered = on_recovered
        self._fallback: MemoryStateStore | None = None
        self._retry_at = 0.0
        # keys whose stored state is unreadable -> when to try the primary again, and
        # the fallback each of them runs on meanwhile
        self._unreadable: dict[str, float] = {}
        self._key_fallbacks: dict[str, MemoryStateStore] = {}
        # primary operations given up on (timed out or cancelled) until they end
        self._strays: set[asyncio.Task[Any]] = set()
        # a primary doing I/O works in the event loop it was opened (or first used) in
        self._bound = not primary.in_process
        self.loop: asyncio.AbstractEventLoop | None = None
        """The event loop the primary is bound to (None: not yet, or in-process)."""

    def __repr__(self) -> str:
        mode = " degraded" if self._fallback is not None else ""
        return f"FailoverStateStore({self._primary!r}{mode})"

    @property
    def primary(self) -> CircuitStateStore:
        """The decorated store."""
        return self._primary

    @property
    def degraded(self) -> bool:
        """True while the primary as a whole is failing and the fallback answers."""
        return self._fallback is not None

    def primary_answers(self, key: str) -> bool:
        """Whether an operation on ``key`` goes to the primary now (no fallback for it)."""
        return self._fallback is None and key not in self._unreadable

    @property
    def in_process(self) -> bool:
        """The primary's: a fallback never waits either."""
        return self._primary.in_process

    # ------------------------------------------------------------------ the operations

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        return await self._run(key, lambda store: store.admit(key, policy))

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        return await self._run(key, lambda store: store.record(key, policy, reports))

    async def force(
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        reason = self.checked_reason(reason)  # refused here, not taken for an outage
        if for_seconds is None or until is not None:
            self.checked_force_end(until, for_seconds)  # both given: refused here
            return await self._run(
                key, lambda store: store.force(key, state, until=until, reason=reason)
            )
        # through force_for: a store written before for_seconds still takes the call
        return await self._run(
            key, lambda store: force_for(store, key, state, for_seconds=for_seconds, reason=reason)
        )

    async def snapshot(self, key: str) -> CircuitBreakerState:
        return await self._run(key, lambda store: store.snapshot(key))

    async def now(self) -> float | None:
        """The primary's clock; the fallbacks' (``clock``) while degraded."""
        return await self._run(None, lambda store: store.now())

    async def snapshot_all(self) -> list[CircuitBreakerState]:
        return await self._run(None, lambda store: store.snapshot_all())

    async def reset(self, key: str | None = None) -> None:
        """
        The primary's reset (a fallback's while the primary fails), which is how a store
        repairs a state it cannot read: a key on a fallback of its own for that reason
        goes back to the primary at once (every such key, for a reset of all).
        """
        if key is not None:
            await self._run(key, lambda store: store.reset(key), repairs=True)
            return
        await self._run(None, lambda store: store.reset(None))
        if self._fallback is None:  # the primary reset every key
            for unreadable in list(self._unreadable):
                await self._readable_again(unreadable)

    async def control(self, key: str | None, op: Op[T], what: str) -> T:
        """
        ``op``, an operator's change (a force, a reset: ``what``, for the error), on the
        primary alone, degraded or not: made on a fallback, it would be lost when the
        primary comes back (a fallback's changes are not pushed there), so it reaches the
        store or fails.  The primary answering while degraded ends the outage (its state
        adopted), as a retry would, when it is the outage the call began in (one that
        began meanwhile goes on: the answer may have been sent before it); answering
        for a key whose stored state was unreadable (a reset repairs it), it takes the
        key back (every such key, for ``None``).

        Raises:
            StateStoreError: the primary failed or did not answer within ``timeout``:
                ``op`` was not applied (one that timed out may yet reach the store), on
                the primary or the fallback; or it cannot read ``key``'s stored state
                (the store's own error, naming the key).
        """
        if self._bound:
            self._check_loop()
        if key is not None:
            self.checked_key(key)
        fallback = self._fallback  # the outage this answer may end, as in _retry_primary
        try:
            result = await self._on_primary(op)
        except BackendClosedError:
            raise
        except (BackendError, OSError) as exc:
            if unreadable_key(exc) is not None:
                raise
            late = " (it may yet reach the store)" if isinstance(exc, TimeoutError) else ""
            raise StateStoreError(
                f"{what} was not applied{late}: the circuit state store is unreachable "
                f"({describe(exc)}); try again once it is back (calls go on meanwhile "
                "under the states last seen)"
            ) from exc
        if fallback is not None and self._fallback is fallback:
            await self._recover(key)
        for answered in list(self._unreadable) if key is None else [key]:
            if answered in self._unreadable:  # the primary took a change of its state
                await self._readable_again(answered)
        return result

    # ------------------------------------------------------------------ lifecycle

    async def _aopen(self) -> None:
        """Enter the primary; a primary that cannot be opened starts the fallback."""
        if self._bound:
            # opened again in another loop (a breaker given to `SyncExecutor`): refused,
            # it stays bound to the first, where its close is run
            self._check_loop()
        try:
            # in this task, not one of its own (`_within`): a store may enter a context
            # on entry that must be left from the same task
            async with asyncio.timeout(self._timeout):
                await self._primary.__aenter__()
        except BackendClosedError:
            raise
        except (BackendError, OSError) as exc:
            # a store that connects on entry is down: start degraded, as a store that
            # connects on first use would (the next operations retry it)
            if self._fallback is None:
                await self._degrade(None, exc)

    async def _aclose(self) -> None:
        home = self.loop
        if home is not None and elsewhere(home):
            if await close_at_home(home, self._aclose):
                return
            await self._drop()
            return
        try:
            if self._owns_primary:
                await self._primary.aclose()
        finally:
            strays = self._strays
            if strays:  # operations given up on, still cleaning up: a bounded wait
                await asyncio.wait(set(strays), timeout=STRAY_SECONDS)
                for task in strays:
                    task.cancel()
            if self._fallback is not None:
                await self._fallback.aclose()
            for fallback in self._key_fallbacks.values():
                await fallback.aclose()

    async def _drop(self) -> None:
        """
        Closed from another event loop than the primary's, which no longer runs: close
        the primary as far as that can be done from here (what is bound to that loop,
        its connections, is dropped) and the fallbacks; the operations given up on ended
        with their loop.
        """
        self._strays.clear()
        try:
            if self._owns_primary:
                await self._primary.aclose()
        except (RuntimeError, BackendError, OSError):  # bound to the loop that is gone
            self._primary._closed = True
        for fallback in (self._fallback, *self._key_fallbacks.values()):
            if fallback is not None:
                await fallback.aclose()

    # ------------------------------------------------------------------ routing

    def _check_loop(self) -> None:
        loop = running_loop()
        if loop is not self.loop:
            if self.loop is not None:
                raise other_loop_error(repr(self._primary))
            self.loop = loop  # a store opened on first use

    async def _run(self, key: str | None, op: Op[T], *, repairs: bool = False) -> T:
        if self._bound:
            self._check_loop()
        if key is not None:
            self.checked_key(key)  # before any store, primary or fallback, sees it
        if key is not None and key in self._unreadable:
            return await self._unreadable_op(key, op, repairs)
        try:
            return await self._shared_op(key, op)
        except StateStoreError as exc:
            if key is None or exc.key != key:
                raise
            return await self._isolate(key, exc, op)

    async def _shared_op(self, key: str | None, op: Op[T]) -> T:
        """``op`` on the primary, or on the fallback while the primary is failing."""
        fallback = self._fallback
        if fallback is not None:
            return await self._retry_primary(key, op, fallback)
        try:
            return await self._on_primary(op)
        except BackendClosedError:
            raise
        except (BackendError, OSError) as exc:
            unreadable = unreadable_key(exc)
            if unreadable is not None and (key is None or unreadable == key):
                # one key's state alone: _run isolates the key; an operation on every
                # key (a snapshot of all) fails naming it, the store is not down
                raise
            fallback = self._fallback  # another task may have switched already
            if fallback is None:
                fallback = await self._degrade(key, exc)
            return await op(fallback)

    async def _retry_primary(self, key: str | None, op: Op[T], fallback: MemoryStateStore) -> T:
        """While degraded: ``op`` on the fallback, or on the primary once per interval."""
        now = self._clock()
        if now < self._retry_at:
            return await op(fallback)
        # one attempt per interval, however many tasks are calling
        self._retry_at = now + self._retry_interval
        try:
            result = await self._on_primary(op)
        except BackendClosedError:
            raise
        except (BackendError, OSError) as exc:
            if key is not None and unreadable_key(exc) == key:
                raise  # this key's state alone: _run isolates the key
            logger.debug("circuit store still unavailable: %s", describe(exc))
            # another task may have recovered (closing this fallback) meanwhile: then
            # this failure is a new outage
            current = self._fallback
            if current is None:
                current = await self._degrade(key, exc)
            return await op(current)
        if self._fallback is fallback:
            await self._recover(key)
        return result

    async def _on_primary(self, op: Op[T]) -> T:
        if self._timeout is None:
            return await op(self._primary)
        return await _within(op(self._primary), self._timeout, self._strays)

    def _seeded(self, key: str | None) -> MemoryStateStore:
        """A fallback holding what the owner last saw (of ``key``, or of every key)."""
        known = () if self._known is None else self._known(key)
        return MemoryStateStore(clock=self._clock, states=known)

    # ------------------------------------------------------------------ one unreadable key

    async def _unreadable_op(self, key: str, op: Op[T], repairs: bool = False) -> T:
        """``op`` for a key whose stored state is unreadable: the key's own fallback,
        trying the primary again at most every ``retry_interval`` seconds (at once for
        an operation that ``repairs`` the state, a reset)."""
        fallback = self._key_fallbacks[key]
        now = self._clock()
        if now < self._unreadable[key] and not repairs:
            return await op(fallback)
        self._unreadable[key] = now + self._retry_interval
        try:
            result = await self._shared_op(key, op)
        except StateStoreError as exc:
            if exc.key != key:
                raise
            return await op(fallback)
        await self._readable_again(key)
        return result

    async def _readable_again(self, key: str) -> None:
        """The primary answered for ``key`` again: drop the key's own fallback."""
        del self._unreadable[key]
        fallback = self._key_fallbacks.pop(key)
        await fallback.aclose()
        logger.warning(
            "circuit %s: its stored state is readable again; using the store", shown(key)
        )
        if self._on_recovered is not None:
            await self._on_recovered(key, True)

    async def _isolate(self, key: str, exc: StateStoreError, op: Op[T]) -> T:
        """The primary holds an unreadable state for ``key``: run that key per-process."""
        fallback = self._key_fallbacks[key] = self._seeded(key)
        self._unreadable[key] = self._clock() + self._retry_interval
        description = describe(exc)
        logger.warning(
            "circuit %s: the state store cannot read its state (%s); this key runs on a "
            "per-process breaker until the state is repaired",
            shown(key),
            description,
        )
        if self._on_degraded is not None:
            await self._on_degraded(key, description, True)
        return await op(fallback)

    # ------------------------------------------------------------------ the whole store

    async def _degrade(self, key: str | None, exc: BaseException) -> MemoryStateStore:
        # start from what the owner last knew, so an open circuit stays open
        fallback = self._fallback = self._seeded(None)
        self._retry_at = self._clock() + self._retry_interval
        description = describe(exc)
        logger.warning(
            "circuit state store %s failed (%s); using a per-process breaker until it recovers",
            type(self._primary).__name__,
            description,
        )
        if self._on_degraded is not None:
            await self._on_degraded(key, description, False)
        return fallback

    async def _recover(self, key: str | None) -> None:
        fallback, self._fallback = self._fallback, None
        if fallback is not None:
            await fallback.aclose()
        logger.warning(
            "circuit state store %s recovered; adopting its state", type(self._primary).__name__
        )
        if self._on_recovered is not None:
            await self._on_recovered(key, False)
