"""
`CircuitBreaker`: the async, keyed circuit breaker over any `CircuitStateStore`.

The semantics live in the pure machine `empathy_models.circuit` (see its docstring);
this module adds what needs I/O and time: admission through a store,
outcome classification, a short-lived local view that keeps the per-call cost near the
in-memory one, write-behind of successes, listeners, and a degraded mode that keeps
calls going when a shared store is unreachable.

Use it as a context manager around the call, or wrap a coroutine function::

    async with CircuitBreaker(store="sqlite:///state.db") as breaker:
        async with breaker.guard("anthropic"):
            reply = await client.messages.create(...)
        reply = await breaker.call("anthropic", fetch, prompt)

        @breaker.protect("anthropic")  # the cheapest form: no object per call
        async def ask(prompt: str) -> str: ...

**The local view and its staleness bound.**  For every key the breaker keeps the last
state a store returned and when it got it.  While that view is younger than
``local_view_ttl`` seconds (default 1.0):

* a CLOSED (or DISABLED) view admits locally, without a store round trip, with a ticket
  of the viewed generation;
* an OPEN or FORCED_OPEN view rejects locally until its ``open_until``;
* successes of CLOSED tickets are written behind: counted in memory and sent to the
  store in one batch on the next store interaction for that key, every
  ``flush_interval`` seconds (by the breaker's background task when it is used as
  ``async with``, otherwise by the next call), and on `aclose`.  (`guard` and
  `protect` check that interval against the call's admission time, their one clock
  read; `report` reads the clock when called.)

Everything else goes to the store inline: failures, rate limits, fatal errors (flushing
the written-behind successes of the key first, so this process's order is kept), every
HALF_OPEN admission and probe outcome (leases are granted by the store), and the first
call after the view expired.  Each store answer refreshes the view.  Hence: **a trip,
reset or force made by another process is seen here within ``local_view_ttl``
seconds**; a failure or a probe counts fleet-wide at once; a success reaches the store
within ``flush_interval``.  ``local_view_ttl=0`` asks the store on every admission and
writes every outcome inline (the exact, slow mode).

**Degraded mode.**  When the store raises `BackendError` (other than
`BackendClosedError`) or `OSError` (which covers `ConnectionError` and `TimeoutError`),
or does not answer within ``store_timeout`` seconds (default 5), and when a store the
breaker owns cannot be opened on entry, the breaker switches to a per-process
`MemoryStateStore` seeded with the last states it saw, logs one warning and emits one
``store_degraded`` event per outage; calls go on under the same policy.  At most every
``store_retry_interval`` seconds the next store interaction tries the store again; when
it answers, ``store_recovered`` is emitted and the store's state is adopted (an OPEN set
by others meanwhile included; local trips made during the outage are not pushed to the
store).  A call never fails because the store is down.

**Concurrency.**  One breaker may be used by any number of tasks of one event loop;
nothing is held across the guarded call (unlike pybreaker's per-call lock).  State that
must be atomic lives in the store.  Listeners run in the task whose call caused the
event, after the store operation; async listeners are awaited there, so keep them
short.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NoReturn, ParamSpec, TypeVar

import anyio

from ._breaker_events import BreakerEvent, BreakerEventKind, BreakerListener, Listeners
from .abc import AsyncResource, CircuitStateStore, TransactionalStateStore
from .backends import state_store_from_url
from .backends.memory import MemoryStateStore
from .circuit import BreakerPolicy, extends_open
from .exceptions import (
    AuthenticationError,
    BackendClosedError,
    BackendError,
    CircuitOpenError,
    ConfigurationError,
    ProviderConnectionError,
    StateStoreError,
)
from .outcomes import OutcomeClassifier, classify_error, retry_after_of
from .records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    Outcome,
    OutcomeReport,
    Ticket,
)

__all__ = [
    "BreakerEvent",
    "BreakerEventKind",
    "BreakerListener",
    "CircuitBreaker",
    "provider_outcome",
]

logger = logging.getLogger("empathy_models.breaker")

P = ParamSpec("P")
T = TypeVar("T")

_CLOSED = CircuitState.CLOSED
_DISABLED = CircuitState.DISABLED
_OPEN = CircuitState.OPEN
_FORCED_OPEN = CircuitState.FORCED_OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_SUCCESS = Outcome.SUCCESS

_MAX_PENDING = 1000
"""Written-behind successes of one key are flushed at the latest when this many wait."""

_REPORT_SHIELD_SECONDS = 10.0
"""How long returning a probe lease may take while the caller is being cancelled."""


def provider_outcome(outcome: Outcome, exc: BaseException | None) -> Outcome:
    """
    What an attempt that ended with ``outcome`` (raising ``exc``, or ``None`` on success)
    tells the breaker key of its *provider* when breaker keys are per model.

    Only what is provider-wide counts there: a success is a success (it ends a streak and
    closes a half-open provider key); an account error (401, 402, 403, OpenAI's
    ``insufficient_quota``: `AuthenticationError`) is fatal; a connection-level failure
    (refused, reset, DNS: `ProviderConnectionError`) is a failure; a cancellation stays
    a cancellation (a probe gets its lease back).  Everything else that names one model
    (a 5xx, a timeout, a 429, a 404, a bad answer) is ``ignored`` by the provider key and
    counts only on the model's own key.
    """
    if outcome is Outcome.SUCCESS or outcome is Outcome.CANCELLED:
        return outcome
    if isinstance(exc, AuthenticationError):
        return Outcome.FATAL
    if isinstance(exc, ProviderConnectionError):
        return Outcome.FAILURE
    return Outcome.IGNORED


_new = object.__new__


def _encodable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) escaped, for any store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _describe(exc: BaseException) -> str:
    text = str(exc)
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    described = _encodable(described)
    return described if len(described) <= 300 else described[:297] + "..."


def _ts(value: float | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        # beyond year 9999 (an absurd Retry-After): the latest instant a datetime holds
        return datetime.max.replace(tzinfo=UTC)


def _view_ticket(state: CircuitBreakerState) -> Ticket | None:
    if state.state is _CLOSED or state.state is _DISABLED:
        return Ticket(key=state.key, generation=state.generation)
    return None


class _View:
    """
    The last state a store returned for one key, as the hot path needs it.

    ``at`` is when it was fetched (by the breaker's clock) and ``until`` when it stops
    being fresh (``at + local_view_ttl``; ``-inf`` once marked stale).  ``ticket`` is the
    ticket a CLOSED or DISABLED view hands out.  ``pending`` is the written-behind
    success counter of this CLOSED view's generation (``[generation, count, flush due]``,
    the very list in ``CircuitBreaker._pending``) while this view is the key's current
    one; it is unset when the view is replaced or the counter is flushed, so a guard
    that admitted from this view counts a success with one increment and anything
    else takes the general path.
    """

    __slots__ = ("at", "pending", "state", "ticket", "until")

    def __init__(
        self,
        state: CircuitBreakerState,
        at: float,
        until: float,
        pending: list[Any] | None,
    ) -> None:
        self.state = state
        self.at = at
        self.until = until
        self.ticket = _view_ticket(state)
        self.pending = pending


class _Guard:
    """
    The async context manager returned by `CircuitBreaker.guard`.

    The CLOSED path is inlined: entry is a dict lookup of the key's view and one clock
    read; a success is one increment of the view's written-behind counter.  Everything
    else (rejections, store admissions, probes, failures, the first success of a batch)
    goes through `CircuitBreaker.admit` / `CircuitBreaker.report`.
    """

    __slots__ = ("_breaker", "_key", "_now", "_view", "ticket")
    _view: _View | None
    _now: float
    ticket: Ticket

    def __init__(self, breaker: CircuitBreaker, key: str) -> None:
        self._breaker = breaker
        self._key = key

    async def __aenter__(self) -> Ticket:
        breaker = self._breaker
        view = breaker._views.get(self._key)
        if view is not None:
            now = breaker._clock()
            if view.at <= now < view.until:
                ticket = view.ticket
                if ticket is not None:
                    self._view = view
                    self._now = now
                    return ticket
        self._view = None
        self.ticket = ticket = await breaker.admit(self._key)
        return ticket

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # (no __aexit__ without a successful __aenter__, so _view is set)
        view = self._view
        if view is None:
            ticket = self.ticket
        else:
            if exc is None:
                pending = view.pending
                if pending is not None:
                    # report()'s write-behind, inlined; the flush deadline is checked
                    # against the admission time (the one clock read of this call)
                    count = pending[1] = pending[1] + 1
                    if count >= _MAX_PENDING or self._now >= pending[2]:
                        await self._breaker._flush_key(self._key)
                    return
            ticket = view.ticket  # type: ignore[assignment]  # fast-path views hand one out
        if exc is None:
            await self._breaker.report(ticket, _SUCCESS)
        else:
            await self._breaker._report_error(ticket, exc)


class CircuitBreaker(AsyncResource):
    """
    A circuit breaker per key: by default one per model (``"anthropic:claude-x"``, see
    `key_for`), so one model's outage never refuses calls to the provider's other models.

    ``store`` is a `CircuitStateStore`, a URL for one (``"sqlite:///state.db"``), or
    ``None`` for a fresh `MemoryStateStore` on ``clock``.  A store given as a URL or
    ``None`` belongs to the breaker and is closed by `aclose`; a store object given by
    the caller is left open.  ``clock`` returns UTC epoch seconds (default
    `time.time`); it times the local view, the write-behind and the store retries, and
    is the default memory store's clock.  ``local_view_ttl`` is the staleness bound
    described in the module docstring (0 = always ask the store).  ``classify`` is a
    predicate consulted before `classify_error`; return an `Outcome` to override the
    default class of an exception, or ``None``.  ``listeners`` receive `BreakerEvent`s.
    ``flush_interval`` bounds how long a written-behind success waits; ``sleep`` is how
    the background flusher waits between flushes (tests inject their own).
    ``store_retry_interval`` is how often a failed store is tried again, and
    ``store_timeout`` how long one store operation may take before it counts as a store
    failure (``None``: no limit; a hung store would then hang the calls).
    ``rejection_events`` emits ``call_rejected``.

    **Keys per model, trips per provider.**  With ``per_model=True`` (the default)
    `key_for` returns ``"provider:model"``; ``per_model=False`` keys every call by the
    provider alone (one outage then shuts out all of its models).  The provider's own key
    (``key_for(provider)``) stays for what is provider-wide: the executor admits a call
    through both keys and reports to the provider key only what `provider_outcome` says
    concerns the whole provider (account errors force it open, connection failures count
    as failures).  And when ``provider_open_models`` (default 3) distinct models of one
    provider are OPEN at once in this breaker's view, the provider key is forced open for
    ``policy.recovery_seconds`` (then probed like any other key).  ``None`` turns that rule
    off.

    State changes are logged on ``empathy_models.breaker`` with the key, the reason and
    the generation: a WARNING when a key opens or is forced open, INFO when it goes
    half-open, closes or is disabled.

    A shared store gets a background flusher (a task of the breaker's own) while the
    breaker is entered with ``async with``; `aclose` stops it and flushes what is left.

    Raises `ConfigurationError` for a negative or non-finite duration, an unknown URL
    scheme or a missing plugin.
    """

    def __init__(
        self,
        store: CircuitStateStore | str | None = None,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        local_view_ttl: float = 1.0,
        flush_interval: float = 0.5,
        store_retry_interval: float = 5.0,
        store_timeout: float | None = 5.0,
        classify: OutcomeClassifier | None = None,
        listeners: Iterable[BreakerListener] = (),
        per_model: bool = True,
        provider_open_models: int | None = 3,
        rejection_events: bool = False,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        for name, value in (
            ("local_view_ttl", local_view_ttl),
            ("flush_interval", flush_interval),
            ("store_retry_interval", store_retry_interval),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigurationError(
                    f"CircuitBreaker.{name} must be a finite number >= 0, got {value!r}"
                )
        if flush_interval == 0:
            raise ConfigurationError("CircuitBreaker.flush_interval must be > 0, got 0")
        if store_timeout is not None and (
            isinstance(store_timeout, bool)
            or not isinstance(store_timeout, int | float)
            or not math.isfinite(store_timeout)
            or store_timeout <= 0
        ):
            raise ConfigurationError(
                f"CircuitBreaker.store_timeout must be > 0 or None, got {store_timeout!r}"
            )
        if provider_open_models is not None and (
            isinstance(provider_open_models, bool)
            or not isinstance(provider_open_models, int)
            or provider_open_models < 1
        ):
            raise ConfigurationError(
                "CircuitBreaker.provider_open_models must be an integer >= 1 or None, "
                f"got {provider_open_models!r}"
            )
        if policy is None:
            policy = BreakerPolicy()
        elif not isinstance(policy, BreakerPolicy):
            raise ConfigurationError(
                f"CircuitBreaker.policy must be a BreakerPolicy, got {policy!r}"
            )
        if store is None:
            self._store: CircuitStateStore = MemoryStateStore(clock=clock)
            self._owns_store = True
        elif isinstance(store, str):
            self._store = state_store_from_url(store)
            self._owns_store = True
        elif isinstance(store, CircuitStateStore):
            self._store = store
            self._owns_store = False
        else:
            raise ConfigurationError(
                f"CircuitBreaker.store must be a CircuitStateStore, a URL or None, got {store!r}"
            )
        self.policy = policy
        self.per_model = bool(per_model)
        self.provider_open_models = provider_open_models
        # model key -> its provider's key, for the keys `key_for` handed out per model
        self._provider_of: dict[str, str] = {}
        self._clock = clock
        self._ttl = float(local_view_ttl)
        self._flush_interval = float(flush_interval)
        self._retry_interval = float(store_retry_interval)
        self._classify = classify
        self._listeners = Listeners(listeners)
        self._rejection_events = bool(rejection_events)
        self._sleep = sleep
        self._store_timeout = None if store_timeout is None else float(store_timeout)
        # cancel scopes (timeouts, shields) cost microseconds: only stores doing I/O need them
        self._scoped = not self._store.in_process
        self._views: dict[str, _View] = {}
        # written-behind successes per key: [generation, count, flush due (first + interval)]
        self._pending: dict[str, list[Any]] = {}
        self._fallback: MemoryStateStore | None = None
        self._retry_at = 0.0
        # keys whose stored state is unreadable -> when to try the store again; they run
        # on a fallback of their own meanwhile
        self._unreadable: dict[str, float] = {}
        self._key_fallback: MemoryStateStore | None = None
        self._flusher: asyncio.Task[None] | None = None
        # probe leases being given back for admissions whose caller was cancelled
        self._releases: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        mode = " degraded" if self._fallback is not None else ""
        return f"CircuitBreaker(store={type(self._store).__name__}, keys={len(self._views)}{mode})"

    # ------------------------------------------------------------------ properties

    @property
    def store(self) -> CircuitStateStore:
        """The store this breaker was built with (not the fallback)."""
        return self._store

    @property
    def degraded(self) -> bool:
        """True while the store is unreachable and the per-process fallback is in use."""
        return self._fallback is not None

    @property
    def local_view_ttl(self) -> float:
        """Seconds a store answer is trusted locally: the staleness bound across processes."""
        return self._ttl

    def key_for(self, provider: str, model: str | None = None) -> str:
        """
        The breaker key for a call: ``"provider:model"`` when a model is given and the
        breaker is per model (the default), else ``provider`` (the provider-wide key).

        Raises `ConfigurationError` for an empty provider.
        """
        if not isinstance(provider, str) or not provider:
            raise ConfigurationError(f"provider must be a non-empty string, got {provider!r}")
        if self.per_model and model:
            key = f"{provider}:{model}"
            if key not in self._provider_of:
                self._provider_of[key] = provider
            return key
        return provider

    def add_listener(self, listener: BreakerListener) -> None:
        """Call ``listener`` (sync or async) with every future `BreakerEvent`."""
        self._listeners.add(listener)

    def remove_listener(self, listener: BreakerListener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        self._listeners.discard(listener)

    def classify(self, exc: BaseException) -> Outcome:
        """
        The outcome class of a call that raised ``exc``: the ``classify`` predicate
        first, then `classify_error`.  Interrupts that are not exceptions
        (`KeyboardInterrupt`, `SystemExit`, `GeneratorExit`) count as cancelled.
        """
        if isinstance(exc, Exception):
            return classify_error(exc, self._classify)
        outcome = classify_error(exc, self._classify)
        return Outcome.CANCELLED if outcome is Outcome.FAILURE else outcome

    # ------------------------------------------------------------------ lifecycle

    async def _aopen(self) -> None:
        if self._owns_store:
            try:
                await self._on_store(lambda store: store.__aenter__())
            except BackendClosedError:
                raise
            except (BackendError, OSError) as exc:
                # a store that connects on entry is down: start degraded, as a store that
                # connects on first use would (the next operations retry it)
                if self._fallback is None:
                    await self._degrade(None, exc)
        if self._store.shared and self._ttl > 0 and self._flusher is None:
            # a task the breaker owns, not a task group held open across the caller's
            # code: nothing the caller does inside ``async with`` (task groups, except*,
            # cancel scopes) can be cancelled or interleaved by the flusher, or cancel it
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_loop(), name=f"{self!r} flusher"
            )

    async def _aclose(self) -> None:
        """Stop the flusher, flush every written-behind success, close an owned store."""
        flusher, self._flusher = self._flusher, None
        try:
            if self._releases:  # leases being given back must reach the store first
                with anyio.CancelScope(shield=True):
                    await asyncio.wait(set(self._releases), timeout=_REPORT_SHIELD_SECONDS)
            if flusher is not None:
                flusher.cancel()
                # wait for it without taking its cancellation for this task's own
                with anyio.CancelScope(shield=True):
                    await asyncio.wait({flusher})
            with anyio.CancelScope(shield=True):
                await self._flush_all()
        finally:
            if self._owns_store:
                await self._store.aclose()
            if self._fallback is not None:
                await self._fallback.aclose()
            if self._key_fallback is not None:
                await self._key_fallback.aclose()
            # from here on every admission and report takes the general path, which
            # refuses admissions and drops outcomes once closed
            for view in self._views.values():
                view.pending = None
            self._mark_views_stale()

    async def _flush_loop(self) -> None:
        while True:
            await self._sleep(self._flush_interval)
            try:
                # shielded: a batch already taken from memory must reach the store even
                # when aclose cancels the flusher meanwhile (bounded, like report's shield)
                with anyio.move_on_after(_REPORT_SHIELD_SECONDS, shield=True):
                    await self._flush_all()
            except Exception:  # never let the flusher take the breaker down
                logger.exception("circuit breaker: flushing written-behind successes failed")

    # ------------------------------------------------------------------ admission

    def guard(self, key: str) -> _Guard:
        """
        ``async with breaker.guard(key):`` admits one call for ``key``, runs the block,
        classifies how it ended and reports it.

        Raises `CircuitOpenError` on entry when the circuit rejects the call.  The
        block's own exceptions propagate unchanged; a cancelled block (asyncio or anyio
        cancel scope) is recorded as nothing, and a half-open probe gets its lease back.
        The context value is the `Ticket`.
        """
        guard = _new(_Guard)  # no __init__ call: this is on every guarded call's path
        guard._breaker = self
        guard._key = key
        return guard

    async def call(
        self, key: str, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """
        ``await fn(*args, **kwargs)`` under `guard` for ``key``; return its result.

        Raises `CircuitOpenError` when rejected, and whatever ``fn`` raises.
        """
        async with _Guard(self, key):
            return await fn(*args, **kwargs)

    def protect(
        self, key: str
    ) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
        """
        A decorator: the decorated coroutine function runs under `guard` for ``key``.

        ``@breaker.protect("anthropic")`` on ``async def ask(prompt)`` makes every
        ``await ask(prompt)`` admit, run, classify and report exactly like ``async with
        breaker.guard("anthropic"): await original(prompt)``, with the same exceptions
        (`CircuitOpenError` when rejected, the function's own exceptions unchanged).
        It is the cheapest way to guard a call: the CLOSED path costs one dict lookup,
        one clock read and one increment, without a context-manager object per call.
        """
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"a breaker key must be a non-empty string, got {key!r}")
        views = self._views
        clock = self._clock

        def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
            @functools.wraps(fn)
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
                view = views.get(key)
                if view is not None:
                    now = clock()
                    if view.at <= now < view.until:
                        ticket = view.ticket
                        if ticket is not None:
                            try:
                                result = await fn(*args, **kwargs)
                            except BaseException as exc:
                                await self._report_error(ticket, exc)
                                raise
                            pending = view.pending
                            if pending is not None:
                                # as in _Guard.__aexit__
                                count = pending[1] = pending[1] + 1
                                if count >= _MAX_PENDING or now >= pending[2]:
                                    await self._flush_key(key)
                                return result
                            await self.report(ticket, _SUCCESS)
                            return result
                async with _Guard(self, key):
                    return await fn(*args, **kwargs)

            return guarded

        return decorate

    async def admit(self, key: str) -> Ticket:
        """
        Admit one call for ``key`` and return its ticket (for `report`).

        Served from the local view while it is fresh (see the module docstring),
        otherwise by the store, which performs the lazy OPEN -> HALF_OPEN step and
        grants probe leases.  Raises `CircuitOpenError` (with the state, ``retry_after``,
        reason and last error) when the call must not go ahead, and
        `BackendClosedError` after `aclose`.
        """
        if self._closed:
            self._check_open()
        view = self._views.get(key)
        if view is not None:
            now = self._clock()
            if view.at <= now < view.until:
                ticket = view.ticket
                if ticket is not None:
                    return ticket
                state = view.state
                if state.state is _OPEN or state.state is _FORCED_OPEN:
                    until = state.open_until_ts
                    if until is None or now < until:
                        await self._reject(
                            state, None if until is None else until - now, notify=True
                        )
        return await self._admit_from_store(key)

    async def _admit_from_store(self, key: str) -> Ticket:
        if key in self._pending:
            # the flush answers with the store's state: a CLOSED one admits like `admit` would
            state = await self._flush_key(key)
            if state is not None:
                ticket = _view_ticket(state)
                if ticket is not None:
                    return ticket
        policy = self.policy
        if self._scoped:
            admission = await self._admit_detached(key, policy)
        else:  # an in-process store never suspends: nothing can interrupt it
            admission = await self._store_op(key, lambda store: store.admit(key, policy))
        await self._observe(admission.state)
        if admission.admitted and admission.ticket is not None:
            return admission.ticket
        await self._reject(admission.state, admission.retry_after, notify=True)

    async def _admit_detached(self, key: str, policy: BreakerPolicy) -> Admission:
        """
        The store's admission, such that a cancelled caller can neither leak a probe
        lease nor lose its cancellation.

        A store admission may grant a half-open probe lease.  If the caller is cancelled
        while it is in flight, the admission still finishes (see `_settled`) and a
        lease it granted is given back (reported as cancelled) before the cancellation
        is raised, instead of blocking the key for ``probe_lease_seconds``.  If the
        store's client swallowed a cancellation (redis-py's asyncio client does, now
        and then), ``Task.cancelling()`` still shows it: the lease is given back and
        `asyncio.CancelledError` raised, so the guarded call does not run.
        """
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:
            admission = await self._settled(key, lambda store: store.admit(key, policy))
        except asyncio.CancelledError as exc:
            granted = getattr(exc, "_empathy_result", None)
            if isinstance(granted, Admission):
                await self._give_back_lease(granted)
            raise
        if task is not None and task.cancelling() > cancelling:
            await self._give_back_lease(admission)
            raise asyncio.CancelledError("cancelled during the circuit-breaker admission")
        return admission

    async def _give_back_lease(self, admission: Admission) -> None:
        ticket = admission.ticket
        if ticket is None or ticket.lease_id is None:
            return
        report = OutcomeReport(ticket=ticket, outcome=Outcome.CANCELLED)
        policy = self.policy
        key = ticket.key
        with contextlib.suppress(asyncio.CancelledError):
            await self._settled(key, lambda store: store.record(key, policy, [report]))

    async def _settled(self, key: str | None, op: Callable[[CircuitStateStore], Awaitable[T]]) -> T:
        """
        ``_store_op(key, op)`` carried to its end even when the caller is cancelled
        (asyncio-natively or by an anyio scope) meanwhile: it runs in a task of its own
        and the caller waits for it, for at most ``_REPORT_SHIELD_SECONDS``, before the
        cancellation is raised (with the result, if any, as ``_empathy_result``).
        """
        task = asyncio.ensure_future(self._store_op(key, op))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _REPORT_SHIELD_SECONDS
            while not task.done() and loop.time() < deadline:
                try:
                    await asyncio.wait({task}, timeout=deadline - loop.time())
                except asyncio.CancelledError:
                    continue  # delivered again (an anyio scope): keep waiting, raise after
            if task.done() and not task.cancelled() and task.exception() is None:
                exc._empathy_result = task.result()  # type: ignore[attr-defined]
            elif not task.done():
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
            elif not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it as lost
            raise

    async def _reject(
        self, state: CircuitBreakerState, retry_after: float | None, *, notify: bool
    ) -> NoReturn:
        if notify and self._rejection_events and self._listeners:
            await self._emit(
                BreakerEvent(
                    kind=BreakerEventKind.CALL_REJECTED,
                    key=state.key,
                    new_state=state.state,
                    reason=state.reason,
                    generation=state.generation,
                    open_until=_ts(state.open_until_ts),
                    at=self._now_dt(),
                )
            )
        raise CircuitOpenError(
            state.key,
            state=state.state,
            retry_after=retry_after,
            last_error=state.last_error,
            reason=state.reason,
        )

    # ------------------------------------------------------------------ outcomes

    async def _report_error(self, ticket: Ticket, exc: BaseException) -> None:
        """Report the end of a guarded call that raised ``exc`` (by `classify`)."""
        outcome = self.classify(exc)
        if outcome is Outcome.CANCELLED:
            # learn nothing; a probe gets its lease back (report shields itself)
            if ticket.lease_id is not None:
                await self.report(ticket, outcome)
            return
        retry_after = retry_after_of(exc)
        if retry_after is not None and math.isnan(retry_after):
            retry_after = None  # no usable hint (an infinite one is capped by report)
        await self.report(ticket, outcome, retry_after=retry_after, error=_describe(exc))

    async def report(
        self,
        ticket: Ticket,
        outcome: Outcome,
        *,
        retry_after: float | None = None,
        error: str | None = None,
    ) -> None:
        """
        Report how the call admitted with ``ticket`` ended.

        ``retry_after`` is a 429's hint in seconds, capped at the policy's
        ``max_retry_after_open`` (the rest is logged); ``error`` a short description of the
        failure (class and status; never a key or a prompt).  Successes of CLOSED
        tickets are written behind; every other outcome that can change the state goes
        to the store at once.  Outcomes that teach nothing (ignored, cancelled,
        rejected) of non-probe tickets cost no I/O; for a probe they return its lease.
        The store operation is shielded from cancellation (for at most 10 s), so a
        failure still counts and a probe lease still comes back when the reporting task
        is being cancelled.  Outcomes of an older generation are dropped, and so are
        outcomes reported after `aclose` (with a debug log).  Never raises because the
        store is down (see degraded mode).
        """
        if self._closed:
            logger.debug("circuit breaker closed; dropping the %s outcome", outcome.value)
            return
        key = ticket.key
        if retry_after is not None:
            retry_after = self._capped_retry_after(key, retry_after)
        view = self._views.get(key)
        if view is not None and outcome is _SUCCESS and self._ttl > 0:
            pending = view.pending  # set only while the view is CLOSED and counting
            if pending is not None and pending[0] == ticket.generation and ticket.lease_id is None:
                count = pending[1] = pending[1] + 1
                if count >= _MAX_PENDING or self._clock() >= pending[2]:
                    await self._flush_key(key)
                return
            state = view.state
            if state.generation == ticket.generation and ticket.lease_id is None:
                if state.state is _CLOSED:
                    pending = self._pending.get(key)
                    if pending is None or pending[0] != ticket.generation:
                        # successes of an older generation would be dropped by the store
                        self._pending[key] = view.pending = [
                            ticket.generation,
                            1,
                            self._clock() + self._flush_interval,
                        ]
                        return
                    pending[1] += 1
                    if pending[1] >= _MAX_PENDING or (self._clock() >= pending[2]):
                        await self._flush_key(key)
                    return
                if state.state is _DISABLED:
                    return
        await self._report_inline(ticket, outcome, retry_after, error, view)

    def _capped_retry_after(self, key: str, retry_after: float) -> float | None:
        """``retry_after`` capped at the policy's ``max_retry_after_open`` (NaN: None)."""
        if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
            raise ConfigurationError(
                f"retry_after must be a number of seconds or None, got {retry_after!r}"
            )
        if math.isnan(retry_after) or retry_after < 0:
            return None
        cap = self.policy.max_retry_after_open
        if retry_after > cap:
            logger.warning(
                "circuit %r: the provider asked to wait %gs (Retry-After); holding the "
                "circuit open for at most max_retry_after_open=%gs",
                key,
                retry_after,
                cap,
            )
            return cap
        return retry_after

    async def _report_inline(
        self,
        ticket: Ticket,
        outcome: Outcome,
        retry_after: float | None,
        error: str | None,
        view: _View | None,
    ) -> None:
        key = ticket.key
        if ticket.lease_id is None and not outcome.is_sample:
            return  # the machine learns nothing from it outside a probe
        if view is not None and self._ttl > 0:
            fresh = view.at <= self._clock() < view.until
            if (
                fresh
                and ticket.generation < view.state.generation
                and not extends_open(view.state, outcome, retry_after, self._clock())
            ):
                return  # the store's generation is at least the view's: it would drop it
            if view.state.state is _DISABLED and view.state.generation == ticket.generation:
                return
        if error is not None:
            error = _encodable(error)
        report = OutcomeReport(ticket=ticket, outcome=outcome, retry_after=retry_after, error=error)
        reports = [*self._take_pending(key), report]
        policy = self.policy
        if not self._scoped:  # an in-process store never suspends: nothing to shield
            state = await self._store_op(key, lambda store: store.record(key, policy, reports))
            await self._observe(state)
            return
        # settled: a failure must count and a probe lease must come back even when the
        # caller is being cancelled (bounded, so a hung store cannot hold the caller)
        state = await self._settled(key, lambda store: store.record(key, policy, reports))
        await self._observe(state)

    def _drop_pending(self, key: str) -> list[Any] | None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            view = self._views.get(key)
            if view is not None and view.pending is pending:
                view.pending = None  # the next success starts a new batch
        return pending

    def _take_pending(self, key: str) -> list[OutcomeReport]:
        pending = self._drop_pending(key)
        if pending is None:
            return []
        generation, count = pending[0], pending[1]
        report = OutcomeReport(ticket=Ticket(key=key, generation=generation), outcome=_SUCCESS)
        return [report] * count

    async def _flush_key(self, key: str) -> CircuitBreakerState | None:
        reports = self._take_pending(key)
        if not reports:
            return None
        policy = self.policy
        if not self._scoped:  # an in-process store never suspends: nothing to shield
            state = await self._store_op(key, lambda store: store.record(key, policy, reports))
            await self._observe(state)
            return state
        # shielded: the batch is no longer in memory, so it must reach the store even when
        # the calling task is being cancelled (bounded, like report's shield)
        flushed = await self._settled(key, lambda store: store.record(key, policy, reports))
        await self._observe(flushed)
        return flushed

    async def _flush_all(self) -> None:
        for key in list(self._pending):
            await self._flush_key(key)

    async def flush(self) -> None:
        """Send every written-behind success to the store now."""
        self._check_open()
        await self._flush_all()

    # ------------------------------------------------------------------ inspection and control

    def available_hint(self, key: str) -> bool:
        """
        Whether ``key`` would likely admit a call, from the local view only (no I/O).

        True for a key never seen, CLOSED or DISABLED; for OPEN and FORCED_OPEN, true
        once ``open_until`` has passed (the next call may probe); for HALF_OPEN, true
        while the view shows a free probe slot.  The view may be up to
        ``local_view_ttl`` old (older for keys not used lately); use `is_available` for
        the store's answer.
        """
        view = self._views.get(key)
        if view is None:
            return True
        state = view.state
        s = state.state
        if s is _CLOSED or s is _DISABLED:
            return True
        now = self._clock()
        if s is _HALF_OPEN:
            live = sum(1 for lease in state.leases if lease[1] > now)
            return live < self.policy.half_open_probes
        until = state.open_until_ts
        return until is not None and now >= until

    async def get_status(self, key: str) -> CircuitBreakerState:
        """
        The store's current state of ``key`` (after flushing its written-behind
        successes); a key never seen reads as CLOSED, generation 0.

        The returned `CircuitBreakerState` also offers convenience properties:
        ``failure_count`` (consecutive failures), ``is_open`` (OPEN, FORCED_OPEN or
        HALF_OPEN) and ``opened_at`` (aware UTC datetime).
        """
        self._check_open()
        await self._flush_key(key)
        state = await self._store_op(key, lambda store: store.snapshot(key))
        await self._observe(state)
        return state

    async def is_available(self, key: str) -> bool:
        """
        Whether a call for ``key`` would be admitted now, by the store's state: CLOSED
        and DISABLED yes; HALF_OPEN if a probe slot is free; OPEN and FORCED_OPEN once
        ``open_until`` has passed.  Takes no lease and changes nothing.
        """
        state = await self.get_status(key)
        s = state.state
        if s is _CLOSED or s is _DISABLED:
            return True
        now = self._clock()
        if s is _HALF_OPEN:
            live = sum(1 for lease in state.leases if lease[1] > now)
            return live < self.policy.half_open_probes
        until = state.open_until_ts
        return until is not None and now >= until

    async def snapshot(self) -> list[CircuitBreakerState]:
        """Every key's state in the store (after flushing), sorted by key."""
        self._check_open()
        await self._flush_all()
        return await self._store_op(None, lambda store: store.snapshot_all())

    async def reset(self, key: str | None = None) -> None:
        """
        Return ``key`` (or every key) to a fresh CLOSED state, forgetting trips; tickets
        issued before stop counting.  Written-behind successes of the key are dropped.
        """
        self._check_open()
        if key is None:
            for pending_key in list(self._pending):
                self._drop_pending(pending_key)
        else:
            self._drop_pending(key)
        await self._store_op(key, lambda store: store.reset(key))
        if key is None:
            keys = list(self._views)
            for state in await self._store_op(None, lambda store: store.snapshot_all()):
                await self._observe(state, reason="reset", newer_only=False)
                if state.key in keys:
                    keys.remove(state.key)
            for stale in keys:  # keys the store no longer lists read as fresh CLOSED
                await self._observe(
                    CircuitBreakerState(key=stale, closed_at_ts=self._clock()),
                    reason="reset",
                    newer_only=False,
                )
        else:
            state = await self._store_op(key, lambda store: store.snapshot(key))
            await self._observe(state, reason="reset", newer_only=False)

    async def force_open(
        self, key: str, until: datetime | None = None, reason: str = "forced open by operator"
    ) -> CircuitBreakerState:
        """
        Reject every call for ``key`` until ``until`` (an aware datetime; ``None``: until
        `reset`).  Forcing an already forced-open key never moves its end earlier; an
        ``until`` given for a key held until `reset` sets that end.  Returns the new
        state.  Raises `RecordValidationError` for a naive ``until``.
        """
        self._check_open()
        state = await self._store_op(
            key, lambda store: store.force(key, _FORCED_OPEN, until=until, reason=reason)
        )
        await self._observe(state)
        return state

    async def disable(self, key: str, reason: str = "disabled by operator") -> CircuitBreakerState:
        """Let every call for ``key`` through and never trip, until `reset`; returns the state."""
        self._check_open()
        self._drop_pending(key)
        state = await self._store_op(key, lambda store: store.force(key, _DISABLED, reason=reason))
        await self._observe(state)
        return state

    # ------------------------------------------------------------------ views and events

    def _now_dt(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def _observe(
        self, state: CircuitBreakerState, reason: str | None = None, *, newer_only: bool = True
    ) -> None:
        key = state.key
        old = self._views.get(key)
        now = self._clock()
        if (
            newer_only
            and old is not None
            and state.generation < old.state.generation
            and old.at <= now < old.until
        ):
            # an answer sent before the one this fresh view came from (concurrent calls
            # on a network store): adopting it would bring back a state already left
            return
        pending = None
        if state.state is _CLOSED:
            pending = self._pending.get(key)
            if pending is not None and pending[0] != state.generation:
                pending = None
        if old is not None:
            old.pending = None  # guards admitted from the old view take the general path
        self._views[key] = _View(state, now, now + self._ttl, pending)
        old_state = _CLOSED if old is None else old.state.state
        if old_state is state.state:
            return
        _log_transition(state, old_state, reason or state.reason)
        if self._listeners:
            await self._emit(
                BreakerEvent(
                    kind=BreakerEventKind.STATE_CHANGED,
                    key=key,
                    old_state=old_state,
                    new_state=state.state,
                    reason=reason or state.reason,
                    generation=state.generation,
                    open_until=_ts(state.open_until_ts),
                    at=self._now_dt(),
                )
            )
        if state.state is _OPEN and self.provider_open_models is not None:
            provider = self._provider_of.get(key)
            if provider is not None:
                await self._maybe_open_provider(provider, now)

    async def _maybe_open_provider(self, provider: str, now: float) -> None:
        """
        Force ``provider``'s key open when at least ``provider_open_models`` of its
        models are OPEN (tripped by failures, not forced) in this breaker's views.
        """
        assert self.provider_open_models is not None
        open_models = sorted(
            key
            for key, owner in self._provider_of.items()
            if owner == provider
            and (view := self._views.get(key)) is not None
            and view.state.state is _OPEN
            and (view.state.open_until_ts is None or view.state.open_until_ts > now)
        )
        if len(open_models) < self.provider_open_models:
            return
        current = self._views.get(provider)
        if current is not None and current.at <= now < current.until:
            s = current.state
            if (s.state is _OPEN or s.state is _FORCED_OPEN) and (
                s.open_until_ts is None or s.open_until_ts > now
            ):
                return  # already open, as far as a fresh view tells
            if s.state is _DISABLED:
                return  # an operator said: never trip this key
        until = _ts(now + self.policy.recovery_seconds)
        shown = ", ".join(key.removeprefix(f"{provider}:") for key in open_models)
        reason = f"{len(open_models)} models of {provider} open ({shown})"
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        state = await self._store_op(
            provider, lambda store: store.force(provider, _FORCED_OPEN, until=until, reason=reason)
        )
        await self._observe(state)

    async def _emit(self, event: BreakerEvent) -> None:
        await self._listeners.emit(event)

    # ------------------------------------------------------------------ degraded mode

    async def _store_op(
        self, key: str | None, op: Callable[[CircuitStateStore], Awaitable[T]]
    ) -> T:
        if key is not None and key in self._unreadable:
            return await self._unreadable_op(key, op)
        try:
            return await self._shared_op(key, op)
        except StateStoreError as exc:
            if key is None or exc.key != key:
                raise
            return await self._isolate(key, exc, op)

    async def _unreadable_op(self, key: str, op: Callable[[CircuitStateStore], Awaitable[T]]) -> T:
        """``op`` for a key whose stored state is unreadable: the key's own fallback,
        trying the store again at most every ``store_retry_interval`` seconds."""
        fallback = self._key_fallback
        assert fallback is not None
        now = self._clock()
        if now < self._unreadable[key]:
            return await op(fallback)
        self._unreadable[key] = now + self._retry_interval
        try:
            result = await self._shared_op(key, op)
        except StateStoreError as exc:
            if exc.key != key:
                raise
            return await op(fallback)
        del self._unreadable[key]
        await fallback._clear(key)
        logger.warning("circuit %r: its stored state is readable again; using the store", key)
        if self._listeners:
            await self._emit(
                BreakerEvent(kind=BreakerEventKind.STORE_RECOVERED, key=key, at=self._now_dt())
            )
        return result

    async def _isolate(
        self, key: str, exc: StateStoreError, op: Callable[[CircuitStateStore], Awaitable[T]]
    ) -> T:
        """The store holds an unreadable state for ``key``: run that key per-process."""
        fallback = self._key_fallback
        if fallback is None:
            fallback = self._key_fallback = MemoryStateStore(clock=self._clock)
        view = self._views.get(key)
        if view is not None:
            await _seed(fallback, view.state)
            view.at = view.until = -math.inf
        self._unreadable[key] = self._clock() + self._retry_interval
        description = _describe(exc)
        logger.warning(
            "circuit %r: the state store cannot read its state (%s); this key runs on a "
            "per-process breaker until the state is repaired",
            key,
            description,
        )
        if self._listeners:
            await self._emit(
                BreakerEvent(
                    kind=BreakerEventKind.STORE_DEGRADED,
                    key=key,
                    error=description,
                    at=self._now_dt(),
                )
            )
        return await op(fallback)

    async def _shared_op(
        self, key: str | None, op: Callable[[CircuitStateStore], Awaitable[T]]
    ) -> T:
        fallback = self._fallback
        if fallback is not None:
            now = self._clock()
            if now < self._retry_at:
                return await op(fallback)
            # one attempt per interval, however many tasks are calling
            self._retry_at = now + self._retry_interval
            try:
                result = await self._on_store(op)
            except BackendClosedError:
                raise
            except (BackendError, OSError) as exc:
                if key is not None and _unreadable_key(exc) == key:
                    raise  # this key's state alone: _store_op isolates the key
                logger.debug("circuit store still unavailable: %s", _describe(exc))
                # another task may have recovered (closing this fallback) meanwhile: then
                # this failure is a new outage
                current = self._fallback
                if current is None:
                    current = await self._degrade(key, exc)
                return await op(current)
            if self._fallback is fallback:
                await self._recover(key)
            return result
        try:
            return await self._on_store(op)
        except BackendClosedError:
            raise
        except (BackendError, OSError) as exc:
            if key is not None and _unreadable_key(exc) == key:
                raise  # this key's state alone: _store_op isolates the key
            fallback = self._fallback  # another task may have switched already
            if fallback is None:
                fallback = await self._degrade(key, exc)
            return await op(fallback)

    async def _on_store(self, op: Callable[[CircuitStateStore], Awaitable[T]]) -> T:
        if self._store_timeout is None or not self._scoped:
            return await op(self._store)
        with anyio.fail_after(self._store_timeout):
            return await op(self._store)

    async def _degrade(self, key: str | None, exc: BaseException) -> MemoryStateStore:
        fallback = MemoryStateStore(clock=self._clock)
        # start from what this process last knew, so an open circuit stays open (the
        # memory store never suspends, so no other task sees a half-seeded fallback)
        for view in list(self._views.values()):
            await _seed(fallback, view.state)
        self._fallback = fallback
        self._retry_at = self._clock() + self._retry_interval
        self._mark_views_stale()
        description = _describe(exc)
        logger.warning(
            "circuit state store %s failed (%s); using a per-process breaker until it recovers",
            type(self._store).__name__,
            description,
        )
        if self._listeners:
            await self._emit(
                BreakerEvent(
                    kind=BreakerEventKind.STORE_DEGRADED,
                    key=key,
                    error=description,
                    at=self._now_dt(),
                )
            )
        return fallback

    async def _recover(self, key: str | None) -> None:
        fallback, self._fallback = self._fallback, None
        self._mark_views_stale()
        if fallback is not None:
            await fallback.aclose()
        logger.warning(
            "circuit state store %s recovered; adopting its state", type(self._store).__name__
        )
        if self._listeners:
            await self._emit(
                BreakerEvent(kind=BreakerEventKind.STORE_RECOVERED, key=key, at=self._now_dt())
            )

    def _mark_views_stale(self) -> None:
        # keep the states (for events and hints) but make the next admission ask the store
        for view in self._views.values():
            view.at = view.until = -math.inf


def _log_transition(state: CircuitBreakerState, old: CircuitState, reason: str | None) -> None:
    """One log line per state change this process sees (WARNING when a key opens)."""
    new = state.state
    level = logging.WARNING if new is _OPEN or new is _FORCED_OPEN else logging.INFO
    if not logger.isEnabledFor(level):
        return
    if new is _OPEN or new is _FORCED_OPEN:
        until = _ts(state.open_until_ts)
        held = "until reset" if until is None else f"until {until.isoformat(timespec='seconds')}"
        logger.log(
            level,
            "circuit %r %s (was %s, generation %d, %s): %s",
            state.key,
            "opened" if new is _OPEN else "forced open",
            old.value,
            state.generation,
            held,
            reason or "no reason given",
        )
    else:
        logger.log(
            level,
            "circuit %r %s (was %s, generation %d)%s",
            state.key,
            {"half_open": "half-open", "closed": "closed", "disabled": "disabled"}.get(
                new.value, new.value
            ),
            old.value,
            state.generation,
            f": {reason}" if reason else "",
        )


def _unreadable_key(exc: BaseException) -> str | None:
    """The key whose stored state ``exc`` says is unreadable, if that is what it says."""
    return exc.key if isinstance(exc, StateStoreError) else None


async def _seed(store: TransactionalStateStore, state: CircuitBreakerState) -> None:
    def put(
        current: CircuitBreakerState | None, now: float
    ) -> tuple[CircuitBreakerState | None, None]:
        return state, None

    await store._transact(state.key, put)
