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
* an OPEN or FORCED_OPEN view rejects locally until its ``open_until``, by the
  store's clock (the breaker's plus the difference it measured, `CircuitStateStore.now`,
  so a worker whose clock is off neither rejects longer nor stops rejecting early);
* successes of CLOSED tickets are written behind: counted in memory and sent to the
  store in one batch on the next store interaction for that key, every
  ``flush_interval`` seconds (by the breaker's background task when it is used as
  ``async with``, otherwise by the next call: a breaker over a shared store used
  unentered says so once, a `ConfigurationWarning` at the caller's line), and on
  `aclose`.  (`guard` and `protect` check that interval against the call's admission
  time, their one clock read; `report` reads the clock when called.)

Everything else goes to the store inline: failures, rate limits, fatal errors (flushing
the written-behind successes of the key first, so this process's order is kept), every
HALF_OPEN admission and probe outcome (leases are granted by the store), and the first
call after the view expired.  Each store answer refreshes the view.  Hence: **a trip,
reset or force made by another process is seen here within ``local_view_ttl``
seconds**; a failure or a probe counts fleet-wide at once; a success reaches the store
within ``flush_interval``.  ``local_view_ttl=0`` (the exact mode) asks the store on every
admission and sends every outcome at once: failures and probe outcomes before the call
returns, the success of a CLOSED ticket right after it, from a task of the breaker's
(the caller does not wait for the store's answer; the next store operation for that key
in this process, and `flush`, `get_status` and `aclose`, wait for it, so this process's
order of outcomes is kept).

**Stores that announce changes** (Redis and PostgreSQL: `CircuitStateStore.change_feed`)
make the view both fresher and cheaper, with the same bound. While the breaker is used
as ``async with`` it listens to the store's announcements of new generations: a view of
a key another process has moved on is marked stale as soon as the announcement arrives
(usually within a millisecond), and an expired CLOSED or DISABLED view of a key with no
such announcement is served on, without a round trip, for ``local_view_ttl`` seconds
past the feed's last proof that it missed nothing (a PING or ``SELECT 1`` on the
subscription's connection, every quarter of ``local_view_ttl``, at most every second). A
rarely used key then costs what a busy one does. In the exact mode, an admission of a
key whose CLOSED or DISABLED view the feed vouches for waits for a sync point requested
after it began (a PING or ``SELECT 1`` round trip) instead of a store admission: it
reads the store's state as of a moment within the admission, as asking the store does.
When the subscription breaks, views fetched before it are never confirmed again: they
expire by their TTL, and the exact mode asks the store, as without a feed.

**The views stay bounded by the keys in use.**  Past `SWEEP_VIEWS` (4096) views, the
first view of a new key forgets, first, the views of keys idle for `IDLE_SECONDS` (60 s)
past their freshness that are safe to forget: CLOSED ones (a key without a view reads as
CLOSED) without successes written behind or on their way to the store.  Such a key's next
call asks the store, as one whose view expired does; views that refuse calls stay.  The
next sweep comes when the views have doubled, so a breaker keyed per tenant holds views
of the tenants of the last minute or so, not of every tenant it ever saw.

**On an in-process `MemoryStateStore`** (that class itself, given or the default),
there is nothing to gain from a local view or write-behind, and the breaker keeps
neither, whatever ``local_view_ttl``: every admission reads the stored state (a view
admits while the store holds its very state object; otherwise the store answers), and
every success is added to the stored state when the call ends, so breakers sharing the
store see each other's changes at once (the exact mode, at in-memory cost).  Stored
successes within one window bucket are kept as a count and folded into the state before
any other operation reads it; a view keeps that count's holder as a hint, so a CLOSED
call is one dict lookup however many keys there are.  What the store holds and every
call's fate are exactly what the general path gives with each success sent at once (the
tests run both side by side).

**Degraded mode.**  When the store raises `BackendError` (other than
`BackendClosedError`) or `OSError` (which covers `ConnectionError` and `TimeoutError`),
or does not answer within ``store_timeout`` seconds (default 5), and when a store the
breaker owns cannot be opened on entry, the breaker switches to a per-process
`MemoryStateStore` seeded with the last states it saw, logs one warning and emits one
``store_degraded`` event per outage; calls go on under the same policy.  At most every
``store_retry_interval`` seconds the next store interaction tries the store again; when
it answers, ``store_recovered`` is emitted and the store's state is adopted (an OPEN set
by others meanwhile included; local trips made during the outage are not pushed to the
store).  A call never fails because the store is down.  An operator's change
(`force_open`, `disable`, `reset`) is no call: made on the per-process store it would
be lost at the recovery, so it goes to the store itself, degraded or not, and raises
`StateStoreError` when the store does not take it, having changed nothing (the store
answering it ends the outage).

**Keys.**  A key is a non-empty string of at most 500 characters, without NUL characters
or lone surrogates: one every store can hold and announce.  Every method taking a key
raises `ConfigurationError` for any other, before a store sees it (on the hot path, only
for a key without a local view).

**Keys per model, trips per provider.**  With ``per_model=True`` (the default)
`key_for` returns ``"provider:model"``; ``per_model=False`` keys every call by the
provider alone (one outage then shuts out all of its models).  The provider's own key
(``key_for(provider)``) stays for what is provider-wide: the executor admits a call
through both keys and reports to the provider key only what `provider_outcome` says
concerns the whole provider (account errors force it open, and the model's own key
does not count them; connection failures count as failures).  And when
``provider_open_models`` (default 3) distinct models of one provider are OPEN at once
in this breaker's view, the provider key is forced open for
``policy.recovery_seconds`` (then probed like any other key), unless it is open already
or DISABLED (judged by the store's state when this breaker has no fresh view of it).
``None`` turns that rule off.

State changes are logged on ``empathy_models.breaker`` with the key, the reason and
the generation: a WARNING when a key opens or is forced open, INFO when it goes
half-open, closes or is disabled.

**Concurrency.**  One breaker may be used by any number of tasks of one event loop;
nothing is held across the guarded call (unlike pybreaker's per-call lock).  State that
must be atomic lives in the store.  Listeners run in the task whose call caused the
event, after the store operation; async listeners are awaited there, so keep them
short.  Every listener hears the events in the order this breaker saw them: an event
seen while an async listener of another is still running is delivered after it, by the
task delivering that one, in the context of the task that saw it (the call returns
without waiting for it).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import datetime
from types import CoroutineType, FunctionType, MethodType
from typing import Any, Final, NoReturn, ParamSpec, TypeVar

import anyio

from ._breaker_events import (
    BreakerEvent,
    BreakerEventKind,
    BreakerListener,
    Events,
)
from ._local_view import (
    MAX_PENDING,
    Guard,
    LocalView,
    View,
    not_awaitable,
    protected,
    view_ticket,
)
from ._loops import close_at_home, dropped, elsewhere
from ._settled import Settler
from ._store_clock import StoreClock
from ._validators import (
    check,
    escaped,
    failure,
    integer,
    number,
    shown as shown_value,
    warn_caller,
)
from .abc import AsyncResource, CircuitStateStore, force_for
from .backends import state_store_from_url
from .backends._failover import FailoverStateStore
from .backends.memory import MemoryStateStore
from .circuit import BreakerPolicy, as_of, checked_key, shown, unstepped
from .exceptions import (
    AuthenticationError,
    CircuitOpenError,
    ConfigurationError,
    ProviderConnectionError,
)
from .outcomes import OutcomeClassifier, classify_error
from .records import (
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


def provider_outcome(outcome: Outcome, exc: BaseException | None) -> Outcome:
    """
    What an attempt's outcome tells the breaker key of its *provider* (keys per model).

    Only what is provider-wide counts there: a success is a success (it ends a streak and
    closes a half-open provider key); an account error (401, 402, 403, OpenAI's
    ``insufficient_quota``, Anthropic's out-of-credit or disabled-organization 400:
    `AuthenticationError`) is fatal; a connection-level failure (refused, reset, DNS:
    `ProviderConnectionError`) is a failure; a cancellation stays a cancellation (a
    probe gets its lease back).  Everything else that names one model
    (a 5xx, a timeout, a 429, a 404, a bad answer) is ``ignored`` by the provider key and
    counts only on the model's own key.  An account error is the other way round: the
    executor reports it to the model's key as ``ignored``, since the provider key,
    forced open, holds off every model of it, and a reset of that key alone (the fixed
    API key's) lets them in again.

    Args:
        outcome: how the attempt ended.
        exc: what it raised (``None`` on success).

    Returns:
        The outcome to report on the provider's key.
    """
    if outcome is Outcome.SUCCESS or outcome is Outcome.CANCELLED:
        return outcome
    if isinstance(exc, AuthenticationError):
        return Outcome.FATAL
    if isinstance(exc, ProviderConnectionError):
        return Outcome.FAILURE
    return Outcome.IGNORED


_new = object.__new__


_fail = failure(ConfigurationError, owner="CircuitBreaker")
_duration = number(_fail, low=0, why="must be a finite number >= 0")
_store_timeout = number(_fail, low=0, low_open=True, optional=True, why="must be > 0 or None")
_retry_after = number(
    failure(ConfigurationError), finite=False, why="must be a number of seconds or None"
)
_provider_open_models = integer(_fail, low=1, optional=True, why="must be an integer >= 1 or None")


def _check_durations(
    local_view_ttl: float,
    flush_interval: float,
    store_retry_interval: float,
    store_timeout: float | None,
    provider_open_models: int | None,
) -> tuple[float, float | None, int | None]:
    """
    Check the breaker's durations and its provider rule.

    Returns:
        ``store_retry_interval``, ``store_timeout`` and ``provider_open_models``, a
        number of another type (numpy's) as the plain one it stands for (the caller
        takes the other two as floats).

    Raises:
        ConfigurationError: A negative or non-finite duration, a zero flush interval or
            store timeout, or a ``provider_open_models`` that is not an integer >= 1.
    """
    check(_duration, "local_view_ttl", local_view_ttl)
    flush = check(_duration, "flush_interval", flush_interval)
    store_retry_interval = check(_duration, "store_retry_interval", store_retry_interval)
    if flush == 0:
        raise ConfigurationError("CircuitBreaker.flush_interval must be > 0, got 0")
    return (
        store_retry_interval,
        check(_store_timeout, "store_timeout", store_timeout),
        check(_provider_open_models, "provider_open_models", provider_open_models),
    )


def _checked_policy(policy: BreakerPolicy | None) -> BreakerPolicy:
    """``policy``, or the default one for ``None``; raises `ConfigurationError` otherwise."""
    if policy is None:
        return BreakerPolicy()
    if not isinstance(policy, BreakerPolicy):
        raise ConfigurationError(
            f"CircuitBreaker.policy must be a BreakerPolicy, got {shown_value(policy)}"
        )
    return policy


def _store_of(
    store: CircuitStateStore | str | None, clock: Callable[[], float]
) -> tuple[CircuitStateStore, bool]:
    """
    The breaker's store and whether the breaker owns it (built from a URL or ``None``).

    Raises:
        ConfigurationError: ``store`` is none of a store, a URL or ``None``, or the URL's
            scheme is unknown.
    """
    if store is None:
        return MemoryStateStore(clock=clock), True
    if isinstance(store, str):
        return state_store_from_url(store), True
    if isinstance(store, CircuitStateStore):
        return store, False
    raise ConfigurationError(
        f"CircuitBreaker.store must be a CircuitStateStore, a URL or None, got {shown_value(store)}"
    )


def _view_of(views: dict[str, View], key: str) -> View | None:
    """
    ``key``'s view, if any; for a key without one, `_checked_key` first (a key with a
    view is one a store has answered for).

    Raises:
        ConfigurationError: a key no store can hold.
    """
    try:
        view = views.get(key)
    except TypeError:  # unhashable: not a key
        view = None
    if view is None:
        checked_key(key)
    return view


def _capped_retry_after(policy: BreakerPolicy, key: str, retry_after: float) -> float | None:
    """``retry_after`` capped at the policy's ``max_retry_after_open`` (NaN: None)."""
    retry_after = check(_retry_after, "retry_after", retry_after)
    if math.isnan(retry_after) or retry_after < 0:
        return None
    cap = policy.max_retry_after_open
    if retry_after > cap:
        logger.warning(
            "circuit %s: the provider asked to wait %gs (Retry-After); holding the "
            "circuit open for at most max_retry_after_open=%gs",
            shown(key),
            retry_after,
            cap,
        )
        return cap
    return retry_after


def _failover(
    store: CircuitStateStore,
    owns_store: bool,
    local: LocalView,
    events: Events,
    retry_interval: float,
    timeout: float | None,
) -> FailoverStateStore:
    """
    The breaker's store behind the failover decorator (its degraded mode): the fallback
    starts from the breaker's views; an outage or a recovery makes the views concerned
    stale (one key's, or all of them) and is told to the listeners.
    """

    async def degraded(key: str | None, error: str, only_key: bool) -> None:
        local.stale(key if only_key else None)
        local.restarted()  # no answer in flight is confirmed by the store's change feed
        await events.store_degraded(key, error)

    async def recovered(key: str | None, only_key: bool) -> None:
        if not only_key:
            local.stale()  # adopt the store's state
        await events.store_recovered(key)

    return FailoverStateStore(
        store,
        clock=local.clock,
        retry_interval=float(retry_interval),
        timeout=None if timeout is None else float(timeout),
        owns_primary=owns_store,
        known=local.known,
        on_degraded=degraded,
        on_recovered=recovered,
    )


async def _close_elsewhere(
    breaker: CircuitBreaker, stores: FailoverStateStore, local: LocalView
) -> bool:
    """
    A breaker's close from another event loop than its store's: in that loop if it still
    runs (another thread; True), else what is bound to it (the flusher, the successes
    written behind, the store's connections) is dropped, and a `ResourceWarning` says so
    (True).  False: the running loop is the store's own.
    """
    home = stores.loop
    if home is None or not elsewhere(home):
        return False
    if await close_at_home(home, breaker._aclose):
        return True
    pending = len(local.pending)
    local.flusher = local.feed = None
    try:
        await stores.aclose()
    finally:
        local.close()
    dropped(
        repr(breaker),
        f"its flusher, {pending} written-behind successes (not reported) and the store's "
        "connections",
        home,
    )
    return True


def _open_error(state: CircuitBreakerState, retry_after: float | None) -> CircuitOpenError:
    """The error a call rejected in ``state`` raises."""
    return CircuitOpenError(
        state.key,
        state=state.state,
        retry_after=retry_after,
        last_error=state.last_error,
        reason=state.reason,
    )


def _force_for(
    store: CircuitStateStore, key: str, reason: str, seconds: float
) -> Awaitable[CircuitBreakerState]:
    """Force ``key`` open for ``seconds`` of the store's clock."""
    return store.force(key, _FORCED_OPEN, reason=reason, for_seconds=seconds)


_GENERATOR_FLAGS: Final = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _coroutine_function(fn: object) -> bool:
    """
    Whether ``fn`` is a plain function, or a method of one, that is no generator
    function: what `CircuitBreaker.call` takes without `_protectable`'s full check,
    which costs a third of a call on the breaker's hot path.
    """
    if type(fn) is MethodType:
        fn = fn.__func__
    return type(fn) is FunctionType and not fn.__code__.co_flags & _GENERATOR_FLAGS


def _protectable(
    fn: Callable[P, Awaitable[T]], owner: str = "protect"
) -> Callable[P, Awaitable[T]]:
    """
    ``fn``, refusing before any admission what `CircuitBreaker.protect` (or ``owner``,
    `CircuitBreaker.call`) cannot await the call of (each call would otherwise fail only
    once guarded, counted against the key).

    Raises:
        ConfigurationError: ``fn`` is not callable or is a generator function.
    """
    if not callable(fn):
        raise ConfigurationError(
            f"CircuitBreaker.{owner} awaits a coroutine function's call, got {shown_value(fn)} "
            "(guard other code with `async with breaker.guard(key)`)"
        )
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise ConfigurationError(
            f"CircuitBreaker.{owner} cannot guard the generator function {shown_value(fn)}: "
            "its calls give nothing to await (guard each use with `async with "
            "breaker.guard(key)` instead)"
        )
    return fn


def _admits(state: CircuitBreakerState, policy: BreakerPolicy, now: float) -> bool:
    """Whether ``state`` would admit a call at ``now`` (the store's clock)."""
    state = unstepped(state, now)
    s = state.state
    if s is _CLOSED or s is _DISABLED:
        return True
    if s is _HALF_OPEN:
        live = sum(1 for lease in state.leases if lease[1] > now)
        return live < policy.half_open_probes
    until = state.open_until_ts
    return until is not None and now >= until


class CircuitBreaker(AsyncResource):
    """
    A circuit breaker per key: by default one per model (``"anthropic:claude-x"``, see
    `key_for`), so one model's outage never refuses calls to the provider's other models.

    Args:
        store: a `CircuitStateStore`, a URL for one (``"sqlite:///state.db"``), or
            ``None`` for a fresh `MemoryStateStore` on ``clock``; `aclose` closes it
            unless it is an object the caller gave.
        policy: thresholds and open periods (default `BreakerPolicy()`).
        clock: UTC epoch seconds (default `time.time`); it times the local view, the
            write-behind and the store retries, and is the default memory store's clock.
        local_view_ttl: the local view's staleness bound (0: always ask the store).
        flush_interval: how long a written-behind success waits at most (a shared store
            gets a background flusher while the breaker is entered with ``async with``;
            `aclose` stops it and flushes what is left).
        store_retry_interval: how often a failed store is tried again.
        store_timeout: how long one store operation may take before it counts as a store
            failure (``None``: no limit; a hung store would then hang the calls).
        classify: a predicate consulted before `classify_error`; it returns an `Outcome`
            to override the default class of an exception, or ``None``.
        listeners, rejection_events: `BreakerEvent` receivers; the flag adds ``call_rejected``.
        per_model, provider_open_models: keys per model and trips per provider (module docs).
        sleep: how the background flusher waits between flushes (tests inject their own).

    Raises:
        ConfigurationError: a negative or non-finite duration, an unknown URL scheme or a
            missing plugin.
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
        durations = (local_view_ttl, flush_interval, store_retry_interval, store_timeout)
        store_retry_interval, store_timeout, provider_open_models = _check_durations(
            *durations, provider_open_models
        )
        self.policy = _checked_policy(policy)
        self._store, self._owns_store = _store_of(store, clock)
        self.per_model = bool(per_model)
        self.provider_open_models = provider_open_models
        # model key -> its provider's key, for the keys `key_for` handed out per model
        self._provider_of: dict[str, str] = {}
        self._clock = clock
        self._ttl = float(local_view_ttl)
        self._flush_interval = float(flush_interval)
        memory = self._store if type(self._store) is MemoryStateStore else None
        self._settler = Settler()
        busy = self._settler.behind  # keys whose views a sweep keeps (exact mode's sends)
        self._local = LocalView(clock, self._ttl, self._flush_interval, memory, busy)
        self._views = self._local.views  # read by the hot path (Guard, protected)
        self._classify = classify
        self._events = Events(listeners, clock)
        self._rejection_events = bool(rejection_events)
        self._sleep = sleep
        # cancel scopes (timeouts, shields) cost microseconds: only stores doing I/O need them
        self._scoped = not self._store.in_process
        # every store operation goes through the failover decorator (degraded mode)
        self._stores = _failover(
            self._store,
            self._owns_store,
            self._local,
            self._events,
            store_retry_interval,
            store_timeout,
        )
        # the store's clock, which times its states' open ends and leases
        self._store_clock = StoreClock(self._stores, clock)
        # a shared store used without ``async with`` is warned about once (`_unentered`)
        self._unentered = self._store.shared

    def __repr__(self) -> str:
        mode = " degraded" if self._stores.degraded else ""
        return f"CircuitBreaker(store={type(self._store).__name__}, keys={len(self._views)}{mode})"

    # ------------------------------------------------------------------ properties

    @property
    def store(self) -> CircuitStateStore:
        """The store this breaker was built with (not the fallback)."""
        return self._store

    @property
    def degraded(self) -> bool:
        """True while the store is unreachable and the per-process fallback is in use."""
        return self._stores.degraded

    @property
    def local_view_ttl(self) -> float:
        """Seconds a store answer is trusted locally: the staleness bound across processes."""
        return self._ttl

    def key_for(self, provider: str, model: str | None = None) -> str:
        """
        The breaker key for a call: ``"provider:model"`` when a model is given and the
        breaker is per model (the default), else ``provider`` (the provider-wide key).

        Raises:
            ConfigurationError: an empty provider, or a key no store can hold (`admit`).
        """
        checked_key(provider, "provider")
        if self.per_model and model:
            key = f"{provider}:{model}"
            if key not in self._provider_of:
                self._provider_of[checked_key(key)] = provider
            return key
        return provider

    def add_listener(self, listener: BreakerListener) -> None:
        """Call ``listener`` (sync or async) with every future `BreakerEvent`."""
        self._events.listeners.add(listener)

    def remove_listener(self, listener: BreakerListener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        self._events.listeners.discard(listener)

    def classify(self, exc: BaseException) -> Outcome:
        """
        The outcome class of a call that raised ``exc``: the ``classify`` predicate
        first, then `classify_error` (a group by its leaves).  Interrupts that are not
        exceptions (`KeyboardInterrupt`, `SystemExit`, `GeneratorExit`) count as cancelled.
        """
        if isinstance(exc, Exception | BaseExceptionGroup):
            return classify_error(exc, self._classify)
        outcome = classify_error(exc, self._classify)
        return Outcome.CANCELLED if outcome is Outcome.FAILURE else outcome

    # ------------------------------------------------------------------ lifecycle

    async def _aopen(self) -> None:
        self._unentered = False
        if self._owns_store:
            # a store that cannot be opened starts the breaker degraded
            await self._stores.__aenter__()
        if self._store.shared:
            self._local.start(self._store, self._flush_all, self._sleep, f"{self!r} flusher")

    async def _aclose(self) -> None:
        """Stop the flusher, flush every written-behind success, close an owned store."""
        if await _close_elsewhere(self, self._stores, self._local):
            return
        try:
            if self._settler.releases:  # leases given back reach the store first
                with anyio.CancelScope(shield=True):
                    await self._settler.drain()
            await self._local.stop()
            with anyio.CancelScope(shield=True):
                await self._flush_all()
        finally:
            await self._stores.aclose()  # the fallbacks, and the store if it is owned
            # then admissions and reports take the general path: refused, outcomes dropped
            self._local.close()

    # ------------------------------------------------------------------ admission

    def guard(self, key: str) -> Guard:
        """
        ``async with breaker.guard(key):`` admits one call for ``key``, runs the block,
        classifies how it ended (`classify`) and reports it; the context value is the `Ticket`.

        The block's own exceptions propagate unchanged; a cancelled block (asyncio or anyio
        cancel scope) is recorded as nothing, and a half-open probe gets its lease back.

        Raises:
            CircuitOpenError: on entry, when the circuit rejects the call.
        """
        guard = _new(Guard)  # no __init__ call: this is on every guarded call's path
        guard._breaker = self
        guard._key = key
        return guard

    async def call(
        self, key: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """
        ``await fn(*args, **kwargs)`` under `guard` for ``key``; return its result (a
        stream it returns is read unguarded: guard its reading with `guard` instead).

        Raises:
            CircuitOpenError: when rejected; and whatever ``fn`` raises.
            ConfigurationError: ``fn`` is not callable, is a generator function (before
                admission), or its call returned what cannot be awaited (reported
                ``not_sent``: nothing counts, a probe gets its lease back).
        """
        if not _coroutine_function(fn):
            _protectable(fn, "call")  # refused, or another callable checked in full
        async with Guard(self, key):
            awaitable = fn(*args, **kwargs)
            if type(awaitable) is not CoroutineType and not inspect.isawaitable(awaitable):
                raise not_awaitable("call", fn, awaitable)
            return await awaitable

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
        A bad key, and (when decorating) a generator function or what is not callable,
        are a `ConfigurationError`.
        """
        checked_key(key)
        return lambda fn: protected(self, key, _protectable(fn))

    async def admit(self, key: str) -> Ticket:
        """
        Admit one call for ``key`` and return its ticket (for `report`).

        Served from the local view while it is fresh (see the module docstring), otherwise
        by the store, which performs the lazy OPEN -> HALF_OPEN step and grants probe leases.

        Raises:
            CircuitOpenError: (with the state, ``retry_after``, reason and last error) when
                the call must not go ahead.
            ConfigurationError: a key no store can hold (see the module docs).
            BackendClosedError: after `aclose`.
        """
        if self._closed:
            self._check_open()
        view = _view_of(self._views, key)
        if view is not None:
            now = self._clock()
            if self._local.current(view, now):
                ticket = view.ticket
                if ticket is not None:
                    return ticket
                state = view.state
                if state.state is _OPEN or state.state is _FORCED_OPEN:
                    until = state.open_until_ts
                    if until is None:
                        await self._reject(state, None)
                    now += self._store_clock.skew(key)  # the store's now: it times open ends
                    # a clock stepped back (`circuit.unstepped`): the store moves the end
                    if now < until and unstepped(state, now) is state:
                        await self._reject(state, until - now)
            elif (ticket := await self._local.vouched(view)) is not None:
                return ticket  # the exact mode on a store that announces changes
        return await _admitted_by_store(self, key)

    async def _reject(self, state: CircuitBreakerState, retry_after: float | None) -> NoReturn:
        if self._rejection_events:
            await self._events.rejected(state)
        raise _open_error(state, retry_after)

    # ------------------------------------------------------------------ outcomes

    async def report(
        self,
        ticket: Ticket,
        outcome: Outcome,
        *,
        retry_after: float | None = None,
        error: str | None = None,
    ) -> None:
        """
        Report how the call admitted with ``ticket`` ended; never raises for a store down.

        Successes of CLOSED tickets are written behind (in exact mode: sent at once, off the
        call's path); every other outcome that can change the state goes to the store at
        once.  Outcomes that teach nothing (ignored, cancelled, rejected) of non-probe
        tickets cost no I/O; for a probe they return its lease.  The store operation is
        shielded from cancellation (for at most 10 s), so a failure still counts and a
        probe lease still comes back when the reporting task is being cancelled.  Outcomes
        of an older generation or reported after `aclose` are dropped (see the module docs).

        Args:
            ticket, outcome: the call's `Ticket` (from `admit`) and how the call ended.
            retry_after: a 429's hint in seconds, capped at the policy's
                ``max_retry_after_open`` (the rest is logged).
            error: a short description of the failure (class and status; never a key or prompt).
        """
        if self._closed:
            logger.debug("circuit breaker closed; dropping the %s outcome", outcome.value)
            return
        key = ticket.key
        view = _view_of(self._views, key)
        if retry_after is not None:
            retry_after = _capped_retry_after(self.policy, key, retry_after)
        if outcome is _SUCCESS and self._local.added(view, ticket, self.policy):
            return  # the in-process store: in the stored state at once
        if view is not None and outcome is _SUCCESS and self._ttl > 0:
            pending = view.pending  # LocalView.write_behind's first case, inlined
            if (
                pending is not None
                and pending.generation == ticket.generation
                and ticket.lease_id is None
            ):
                count = pending.count = pending.count + 1
                due: bool | None = count >= MAX_PENDING or self._clock() >= pending.due
            else:
                due = self._local.write_behind(view, ticket)
            if due is not None:
                if due:
                    await self._flush_key(key)
                return
        elif outcome is _SUCCESS and self._scoped and self._local.counted(view, ticket):
            # the exact mode: counted, and sent at once off the call's path
            self._settler.send_behind(key, self._flush_key, self._local.pending)
            return
        await self._report_inline(ticket, outcome, retry_after, error)

    async def _report_inline(
        self, ticket: Ticket, outcome: Outcome, retry_after: float | None, error: str | None
    ) -> None:
        key = ticket.key
        if ticket.lease_id is None and not outcome.is_sample:
            return  # the machine learns nothing from it outside a probe
        if self._ttl > 0 and self._local.outdated(
            ticket, outcome, retry_after, self._store_clock.skew(key)
        ):
            return
        if ticket.lease_expires_ts is not None and outcome.is_sample:
            _warn_if_late(self, ticket, outcome)
        if error is not None:
            error = escaped(error)
        report = OutcomeReport(ticket=ticket, outcome=outcome, retry_after=retry_after, error=error)
        await self._record(key, [*self._local.take(key), report])

    async def _record(self, key: str, reports: list[OutcomeReport]) -> CircuitBreakerState:
        """Send ``reports`` to the store and adopt the state it answers."""
        policy = self.policy
        epoch = self._local.epoch if self._stores.primary_answers(key) else -1
        if not self._scoped:  # an in-process store never suspends: nothing to shield
            state = await self._stores.record(key, policy, reports)
        else:
            # settled: a failure must count, a probe lease must come back and a batch no
            # longer in memory must arrive even when the caller is being cancelled
            # (bounded, so a hung store cannot hold the caller)
            state = await self._settler.ordered(key, self._stores.record(key, policy, reports))
        await self._observe(state, epoch=epoch)
        return state

    async def _flush_key(self, key: str) -> CircuitBreakerState | None:
        reports = self._local.take(key)
        if not reports:
            await self._settler.settle(key)  # the exact mode's successes in flight
            return None
        return await self._record(key, reports)

    async def _flush_all(self) -> None:
        await self._settler.settle()
        for key in list(self._local.pending):
            await self._flush_key(key)

    async def flush(self) -> None:
        """Send every written-behind success to the store now."""
        self._check_open()
        await self._flush_all()

    # ------------------------------------------------------------------ inspection and control

    def available_hint(self, key: str) -> bool:
        """
        Whether ``key`` would likely admit a call, from the local view only (no I/O):
        true for a key never seen, CLOSED or DISABLED; OPEN and FORCED_OPEN once
        ``open_until`` has passed (the next call may probe), FORCED_OPEN until a reset
        while its view is current only; HALF_OPEN while the view shows a free probe slot
        (times judged by the store's clock, as the breaker last measured it).  The view
        may be up to ``local_view_ttl`` old (older for keys not used lately);
        `is_available` gives the store's answer.
        """
        view = _view_of(self._views, key)
        if view is None or view.state.state is _CLOSED or view.state.state is _DISABLED:
            return True
        return _refusing_hint(self, view)

    def all_available_hint(self) -> bool:
        """True when no local view shows a key OPEN, FORCED_OPEN or HALF_OPEN: then
        `available_hint` is true for every key (no I/O, however many keys)."""
        return not self._local.refusing

    async def get_status(self, key: str) -> CircuitBreakerState:
        """
        The store's state of ``key`` (its written-behind successes flushed) as of the
        store's clock, as the breaker estimates it (`empathy_models.circuit.as_of`:
        expired probe leases and failures out of the window not shown;
        `CircuitBreakerState.open_ended` tells an OPEN whose time is up); a key never
        seen reads as CLOSED, generation 0.
        """
        self._check_open()
        await self._flush_key(checked_key(key))
        state = await self._stores.snapshot(key)
        await self._observe(state)
        return as_of(state, self.policy, self._clock() + self._store_clock.skew(key))

    async def is_available(self, key: str) -> bool:
        """
        Whether a call for ``key`` would be admitted now, by the store's state: CLOSED
        and DISABLED yes; HALF_OPEN if a probe slot is free; OPEN and FORCED_OPEN once
        ``open_until`` has passed.  Takes no lease and changes nothing.
        """
        status = await self.get_status(key)
        return _admits(status, self.policy, self._clock() + self._store_clock.skew(key))

    async def snapshot(self) -> list[CircuitBreakerState]:
        """Every key's state in the store (after flushing) as of now, sorted by key; a
        state it cannot read raises `StateStoreError` naming the key (`reset` repairs it)."""
        self._check_open()
        await self._flush_all()
        states = await self._stores.snapshot_all()
        now, policy = self._clock(), self.policy
        return [as_of(state, policy, now + self._store_clock.skew(state.key)) for state in states]

    async def reset(self, key: str | None = None) -> None:
        """
        Return ``key`` (or every key) to a fresh CLOSED state, forgetting trips (a state the
        store cannot read is replaced); tickets issued before stop counting.
        Written-behind successes of the key are dropped.

        Raises:
            StateStoreError: the store is unreachable: nothing was reset (see `force_open`).
        """
        self._check_open()
        await _reset(self, key)

    async def force_open(
        self,
        key: str,
        until: datetime | None = None,
        reason: str = "forced open by operator",
        *,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        """
        Reject every call for ``key`` until ``until`` (an aware datetime), for
        ``for_seconds`` of the store's clock (which a worker whose clock is off should
        give instead), or, with neither, until `reset`; return the new state.

        Forcing an already forced-open key never moves its end earlier; an ``until`` given
        for a key held until `reset` sets that end.

        Raises:
            RecordValidationError: a naive ``until``, a ``for_seconds`` that is not a
                finite number >= 0, or both.
            StateStoreError: the store is unreachable: nothing was forced, here or in
                any other process (degraded mode's per-process state would lose it when
                the store is back); try again then.  One that did not answer within
                ``store_timeout`` may yet apply it late (the error says so).
        """
        self._check_open()
        return await _forced(self, key, _FORCED_OPEN, "force_open", until, reason, for_seconds)

    async def disable(self, key: str, reason: str = "disabled by operator") -> CircuitBreakerState:
        """
        Let every call for ``key`` through and never trip, until `reset`; returns the state.

        Raises:
            StateStoreError: the store is unreachable: nothing changed (see `force_open`).
        """
        self._check_open()
        return await _forced(self, key, _DISABLED, "disable", None, reason)

    # ------------------------------------------------------------------ views and events

    async def _observe(
        self,
        state: CircuitBreakerState,
        reason: str | None = None,
        *,
        newer_only: bool = True,
        epoch: int = -1,
    ) -> None:
        """Adopt ``state`` as its key's view (see `LocalView.adopt` for ``epoch``); tell
        of a change and apply the provider rule; measure the store's clock when due and
        ``state`` holds times to judge (`StoreClock`)."""
        now = self._clock()
        old_state = self._local.adopt(state, now, newer_only=newer_only, epoch=epoch)
        if old_state is not None and old_state is not state.state:
            await self._events.changed(state, old_state, reason or state.reason)
            if state.state is _OPEN and self.provider_open_models is not None:
                provider = self._provider_of.get(state.key)
                if provider is not None:
                    await _maybe_open_provider(self, provider, now)
        s = state.state
        if s is not _CLOSED and s is not _DISABLED and self._store_clock.due(now):
            await self._store_clock.measure()


async def _admitted_by_store(breaker: CircuitBreaker, key: str) -> Ticket:
    """`CircuitBreaker.admit` by the store (its written-behind successes flushed first)."""
    if breaker._unentered:  # each key's first admission comes here
        _warn_unentered(breaker)
    if key in breaker._local.pending and key not in breaker._settler.behind:
        # the flush answers with the store's state: a CLOSED one admits like `admit` would
        # (in exact mode a task sending the key's successes takes the batch instead)
        state = await breaker._flush_key(key)
        if state is not None:
            ticket = view_ticket(state)
            if ticket is not None:
                return ticket
    policy = breaker.policy
    epoch = breaker._local.epoch if breaker._stores.primary_answers(key) else -1
    if breaker._scoped:
        # a cancelled caller neither leaks a probe lease nor loses its cancellation
        admission = await breaker._settler.admit(breaker._stores, key, policy)
    else:  # an in-process store never suspends: nothing can interrupt it
        admission = await breaker._stores.admit(key, policy)
    # a cancel landing in an async listener must not keep a probe lease taken
    observed = breaker._observe(admission.state, epoch=epoch)
    await breaker._settler.keeping_lease(observed, breaker._stores, admission, policy)
    if admission.admitted and admission.ticket is not None:
        return admission.ticket
    await breaker._reject(admission.state, admission.retry_after)  # raises


def _warn_unentered(breaker: CircuitBreaker) -> None:
    """
    Say once that a breaker over a shared store is used without ``async with``: no
    task sends the successes it writes behind (each waits for its key's next call, and
    those left at exit are lost), other processes' changes are not listened for, and a
    store it built from a URL is never closed.
    """
    breaker._unentered = False
    message = (
        f"CircuitBreaker over a shared {type(breaker._store).__name__} is used without "
        "being entered (use `async with breaker:`, or give the executor the store's URL, "
        "breaker='sqlite:///state.db', and it opens and closes its own): the successes it "
        "writes behind then wait for their key's next call, those left at exit are lost, "
        "and a store it built from a URL is never closed"
    )
    logger.warning("%s", message)
    warn_caller(message)  # the caller's code is to change: seen without logging set up


def _warn_if_late(breaker: CircuitBreaker, ticket: Ticket, outcome: Outcome) -> None:
    """
    Log a probe's ``outcome`` that the store drops, its lease (``ticket``'s) over by the
    store's clock: a key whose calls outlast ``probe_lease_seconds`` would otherwise stay
    HALF_OPEN without a word, every probe's answer dropped.
    """
    ends = ticket.lease_expires_ts
    assert ends is not None
    now = breaker._clock() + breaker._store_clock.skew(ticket.key)
    if now >= ends:
        lease = breaker.policy.probe_lease_seconds
        logger.warning(
            "circuit %s: a half-open probe's %s came %gs after its admission, past its "
            "lease (probe_lease_seconds=%g), and is not counted; keep probe_lease_seconds "
            "above the longest call the breaker guards, or such a key cannot close",
            shown(ticket.key),
            outcome.value,
            round(now - (ends - lease), 3),
            lease,
        )


def _refusing_hint(breaker: CircuitBreaker, view: View) -> bool:
    """
    `CircuitBreaker.available_hint` of a key whose view is neither CLOSED nor DISABLED.
    A FORCED_OPEN until a reset counts only while its view is current: the store may
    have been reset since, and a key routed around for that hint would never be asked.
    """
    state = view.state
    now = breaker._clock()
    if state.open_until_ts is None and not breaker._local.current(view, now):
        return True
    return _admits(state, breaker.policy, now + breaker._store_clock.skew(state.key))


async def _maybe_open_provider(breaker: CircuitBreaker, provider: str, now: float) -> None:
    """Force ``provider``'s key open when the provider rule says so (see the class)."""
    threshold = breaker.provider_open_models
    assert threshold is not None
    local = breaker._local
    reason = local.provider_trip(breaker._provider_of, provider, now, threshold)
    if reason is not None and local.fresh(provider, now) is None:
        # no fresh view of the provider's key: judge by the store's state of it (another
        # worker may have disabled it, or opened it already), then by the rule again
        await breaker._observe(await breaker._stores.snapshot(provider))
        reason = local.provider_trip(breaker._provider_of, provider, breaker._clock(), threshold)
    if reason is not None:  # recovery_seconds on the store's clock
        span = breaker.policy.recovery_seconds
        await breaker._observe(await _force_for(breaker._stores, provider, reason, span))


async def _forced(
    breaker: CircuitBreaker,
    key: str,
    target: CircuitState,
    name: str,
    until: datetime | None,
    reason: str,
    for_seconds: float | None = None,
) -> CircuitBreakerState:
    """
    `CircuitBreaker.force_open` or `disable` (``name``) of ``key``: made in the store
    alone (`FailoverStateStore.control`), then adopted; a disabled key's written-behind
    successes are dropped.
    """
    key = checked_key(key)
    # refused here, not taken for an outage
    breaker._stores.checked_force_end(until, for_seconds)
    checked = breaker._stores.checked_reason(reason)

    def force(store: CircuitStateStore) -> Awaitable[CircuitBreakerState]:
        if for_seconds is None:
            return store.force(key, target, until=until, reason=checked)
        return force_for(store, key, target, for_seconds=for_seconds, reason=checked)

    state = await breaker._stores.control(key, force, f"CircuitBreaker.{name}({shown(key)})")
    if target is _DISABLED:
        breaker._local.drop(key)
    await breaker._observe(state)
    return state


async def _reset(breaker: CircuitBreaker, key: str | None) -> None:
    """`CircuitBreaker.reset`: made in the store alone (`FailoverStateStore.control`),
    then the written-behind successes of the key (or of every key) dropped."""
    keys = list(breaker._local.pending) if key is None else [checked_key(key)]
    what = "CircuitBreaker.reset()" if key is None else f"CircuitBreaker.reset({shown(key)})"
    await breaker._stores.control(key, lambda store: store.reset(key), what)
    for pending_key in keys:
        breaker._local.drop(pending_key)
    if key is None:
        await _reset_all(breaker)
        return
    state = await breaker._stores.snapshot(key)
    await breaker._observe(state, reason="reset", newer_only=False)


async def _reset_all(breaker: CircuitBreaker) -> None:
    """`CircuitBreaker.reset` of every key, once the store has reset them."""
    keys = list(breaker._views)
    states = await breaker._stores.snapshot_all()
    for state in states:
        await breaker._observe(state, reason="reset", newer_only=False)
    listed = {state.key for state in states}
    for key in (key for key in keys if key not in listed):
        # a key the store no longer lists reads as fresh CLOSED
        at = breaker._clock() + breaker._store_clock.skew(key)
        fresh = CircuitBreakerState(key=key, closed_at_ts=at)
        await breaker._observe(fresh, reason="reset", newer_only=False)
