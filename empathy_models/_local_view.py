"""
The breaker's local view and write-behind: what lets a CLOSED call cost no store I/O.

`LocalView` keeps, per key, the last state a store returned (a `View`, fresh for
``local_view_ttl`` seconds) and the successes written behind for the key's CLOSED
generation (a `Pending` batch), and decides what `CircuitBreaker.report` may count
locally.  `Guard` (``breaker.guard``) and `protected` (``breaker.protect``) are the
inlined hot path over it: a dict lookup, one clock read, and one increment of the
view's batch on success; everything else goes through the breaker.

On an in-process `MemoryStateStore` there is no write-behind and no staleness: a view
admits while the store holds its very state, and a success goes into the stored state
at once (the store's per-key tail of successes, whose live holder the view keeps as a
hint: the hot path is then the view's lookup, the store's clock read and one increment).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Container, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio

from ._breaker_events import describe
from ._propagation import background
from ._settled import SHIELD_SECONDS
from ._validators import shown as shown_value
from .circuit import extends_open, unstepped
from .exceptions import ConfigurationError
from .outcomes import retry_after_of
from .records import CircuitBreakerState, CircuitState, Outcome, OutcomeReport, Ticket

if TYPE_CHECKING:
    from ._change_feed import ChangeFeed
    from .abc import CircuitStateStore
    from .backends.memory import MemoryStateStore, _Tail
    from .breaker import CircuitBreaker
    from .circuit import BreakerPolicy

logger = logging.getLogger("empathy_models.breaker")

P = ParamSpec("P")
T = TypeVar("T")

_CLOSED = CircuitState.CLOSED
_DISABLED = CircuitState.DISABLED
_OPEN = CircuitState.OPEN
_FORCED_OPEN = CircuitState.FORCED_OPEN
_SUCCESS = Outcome.SUCCESS

MAX_PENDING = 1000
"""Written-behind successes of one key are flushed at the latest when this many wait."""

MAX_ANNOUNCED = 100_000
"""Generations announced by a store's feed that a local view remembers (then forgets all)."""

SWEEP_VIEWS = 4096
"""Views a breaker holds before it first forgets the idle ones (`LocalView.sweep`)."""

IDLE_SECONDS = 60.0
"""How long a key must have gone unused (past its view's freshness) for its view to be forgotten."""


def view_ticket(state: CircuitBreakerState) -> Ticket | None:
    """
    The ticket a view of ``state`` hands out: one for CLOSED and DISABLED, else none;
    none either for a key no store has written (generation 0 without ``updated_at``: a
    status read, or a reset's answer for a key the store does not list), whose first
    admission goes to the store, which writes it: `CircuitStateStore.reset` then finds
    every key that has tickets out, and outdates them.
    """
    if state.state is _CLOSED or state.state is _DISABLED:
        if state.updated_at_ts is None and state.generation == 0:
            return None
        return Ticket(key=state.key, generation=state.generation)
    return None


class Pending:
    """
    The written-behind successes of one key's CLOSED generation, not yet in the store.

    Args:
        generation: The generation whose tickets the successes carry.
        count: How many successes wait.
        due: When the batch must be flushed (its first success + ``flush_interval``).
    """

    __slots__ = ("count", "due", "generation")

    def __init__(self, generation: int, count: int, due: float) -> None:
        self.generation = generation
        self.count = count
        self.due = due

    def reports(self, key: str) -> list[OutcomeReport]:
        """The batch as the store takes it: one report object, repeated ``count`` times."""
        ticket = Ticket(key=key, generation=self.generation)
        return [OutcomeReport(ticket=ticket, outcome=_SUCCESS)] * self.count


class View:
    """
    The last state a store returned for one key, as the hot path needs it.

    ``at`` is when it was fetched (by the breaker's clock) and ``until`` when it stops
    being fresh (``at + local_view_ttl``, later when a store's change feed confirms it;
    ``-inf`` once marked stale).  ``epoch`` is the `LocalView` epoch when the request
    it answers was sent (-1: never confirmed by a feed).  ``ticket`` is the
    ticket a CLOSED or DISABLED view hands out.  ``pending`` is the key's `Pending`
    batch while this CLOSED view of its generation is the key's current one; it is unset
    when the view is replaced or the batch is flushed, so a guard that admitted from
    this view counts a success with one increment and anything else takes the general
    path.  ``tail`` is, on the in-process store, the stored state's tail of successes
    as last seen (`MemoryStateStore._add_successes`): while live (its ``state`` is this
    view's), the store holds this view's state, without a lookup.
    """

    __slots__ = ("at", "entered", "epoch", "exited", "pending", "state", "tail", "ticket", "until")

    def __init__(
        self,
        state: CircuitBreakerState,
        at: float,
        until: float,
        pending: Pending | None,
        epoch: int = -1,
    ) -> None:
        self.state = state
        self.at = at
        self.until = until
        self.epoch = epoch
        self.ticket = view_ticket(state)
        # completed futures of the ticket and of None: what Guard's fast path hands out
        self.entered: asyncio.Future[Ticket] | None = None
        self.exited: asyncio.Future[None] | None = None
        self.pending = pending
        self.tail: _Tail | None = None

    def stale(self) -> None:
        """Keep the state (for events and hints) but make the next admission ask the store."""
        self.at = self.until = -math.inf


def _idle_in_store(view: View, before: float) -> bool:
    """
    On the in-process store, whether no success of ``view``'s key was added since
    ``before`` (the store's clock) as far as the view shows: neither in the tail it
    last saw nor in its state (a tail folded into the state stamps it).
    """
    tail = view.tail
    updated = view.state.updated_at_ts
    return (tail is None or tail.now < before) and (updated is None or updated < before)


def _open_at(state: CircuitBreakerState, now: float) -> bool:
    """OPEN or FORCED_OPEN, and not past its end at ``now``."""
    return (state.state is _OPEN or state.state is _FORCED_OPEN) and (
        state.open_until_ts is None or state.open_until_ts > now
    )


class LocalView:
    """
    The views and written-behind batches of one breaker.

    With an in-process `MemoryStateStore` (``memory``) there is no write-behind and no
    staleness: a view is current exactly while the store holds its very state object
    (`current`), and a success goes into the stored state at once (`added`), so every
    breaker sharing the store sees it at once.

    With a store's `ChangeFeed` (``feed``, set by the breaker), the view listens to it:
    an announced generation other than a view's marks the view stale, and an expired
    CLOSED or DISABLED view is confirmed (served until the feed's last sync plus
    ``ttl``) when its key had no such announcement since the request it answers was
    sent and the feed has not restarted since (``epoch`` counts the restarts).

    Args:
        clock: UTC epoch seconds (the breaker's clock).
        ttl: Seconds a view stays fresh (``local_view_ttl``).
        flush_interval: Seconds a written-behind success may wait.
        memory: The breaker's store when it is a `MemoryStateStore` (exactly that class).
        busy: The keys whose successes are on their way to the store in exact mode
            (the breaker's `Settler.behind`): their views are never forgotten.

    The views are bounded by the keys in use: past `SWEEP_VIEWS` views, adding one for a
    new key first forgets the views that are safe to forget (`sweep`).
    """

    __slots__ = (
        "_flush_interval",
        "busy",
        "clock",
        "epoch",
        "feed",
        "flusher",
        "latest",
        "memory",
        "pending",
        "refusing",
        "sweep_at",
        "ttl",
        "views",
    )

    def __init__(
        self,
        clock: Callable[[], float],
        ttl: float,
        flush_interval: float,
        memory: MemoryStateStore | None = None,
        busy: Container[str] = (),
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self._flush_interval = flush_interval
        self.memory = memory
        self.busy = busy
        self.views: dict[str, View] = {}
        self.sweep_at = SWEEP_VIEWS
        """How many views there may be before a new key's view sweeps first."""
        self.refusing: set[str] = set()
        """Keys whose view's state may refuse a call (neither CLOSED nor DISABLED)."""
        self.pending: dict[str, Pending] = {}
        self.feed: ChangeFeed | None = None
        self.flusher: asyncio.Task[None] | None = None
        self.epoch = 0
        self.latest: dict[str, int] = {}
        """Per key, the generation the feed last announced (since its last restart)."""

    def current(self, view: View, now: float) -> bool:
        """
        Whether ``view`` may answer an admission at ``now``: on the in-process store,
        while the store holds its very state (read, not timed); elsewhere while fresh,
        or confirmed by the store's change feed (which then extends it).
        """
        memory = self.memory
        if memory is not None:
            return memory._holds(view.state)
        if view.at <= now < view.until:
            return True
        feed = self.feed
        if feed is None or not self.confirmable(view):
            return False
        left = feed.synced_at + self.ttl - time.monotonic()
        if left <= 0:
            return False
        view.until = now + left
        return True

    def confirmable(self, view: View) -> bool:
        """
        Whether the change feed vouches for ``view`` as of its last sync: a CLOSED or
        DISABLED view, not marked stale, fetched by a request sent since the feed last
        restarted, of a key with no other generation announced since.
        """
        if view.epoch != self.epoch or view.ticket is None or view.at == -math.inf:
            return False
        state = view.state
        return self.latest.get(state.key, state.generation) == state.generation

    async def vouched(self, view: View) -> Ticket | None:
        """
        The ticket of ``view``'s key once a sync point of the change feed after this
        call vouches for the key's view (a round trip, as asking the store is, and a
        cheaper one; a store answer may have replaced the view meanwhile); ``None``
        when the feed cannot (none, not subscribed, a view it does not vouch for).
        """
        feed = self.feed
        if feed is None or not self.confirmable(view) or not await feed.sync():
            return None
        view = self.views.get(view.state.key, view)
        return view.ticket if self.confirmable(view) else None

    # ------------------------------------------------------------------ upkeep

    def start(
        self,
        store: CircuitStateStore,
        flush_all: Callable[[], Awaitable[None]],
        sleep: Callable[[float], Awaitable[None]],
        name: str,
    ) -> None:
        """
        Keep a shared store's views and batches: listen to the store's change feed, if
        it has one, and with write-behind (``ttl > 0``) start the background flusher
        (named ``name``; `flush_loop`).

        The flusher is a task of its own, not one of a task group held open across the
        caller's code: nothing the caller does inside the breaker's ``async with`` (task
        groups, except*, cancel scopes) can cancel or interleave with it, or be cancelled
        by it.
        """
        if self.ttl > 0 and self.flusher is None:
            self.flusher = background(flush_loop(flush_all, sleep, self._flush_interval), name)
        feed = store.change_feed()
        if feed is not None and self.feed is None:
            self.feed = feed
            feed.listen(self, self.ttl)

    async def stop(self) -> None:
        """Stop listening and stop the flusher (waited for without taking its
        cancellation for the caller's own)."""
        flusher, self.flusher = self.flusher, None
        feed, self.feed = self.feed, None
        if feed is not None:
            await feed.unlisten(self)
        if flusher is not None:
            flusher.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({flusher})

    # ------------------------------------------------------------------ a feed's listener

    def announced(self, key: str, generation: int) -> None:
        """The store's feed: ``key`` has ``generation`` now; a view of another is stale."""
        latest = self.latest
        if len(latest) >= MAX_ANNOUNCED and key not in latest:
            self.restarted()
        latest[key] = generation
        view = self.views.get(key)
        if view is not None and view.state.generation != generation:
            view.stale()

    def restarted(self) -> None:
        """The store's feed (re)subscribed: no view fetched before is confirmed by it."""
        self.epoch += 1
        self.latest.clear()

    def added(self, view: View | None, ticket: Ticket, policy: BreakerPolicy) -> bool:
        """
        On the in-process store, the success of ``ticket`` (not a probe's) added to the
        stored state at once, exactly as `record` would; ``view`` (the key's, if any)
        then shows the stored object.  False (nothing done): `CircuitBreaker.report`
        decides (another generation, a state that is not CLOSED, a closed store).
        """
        memory = self.memory
        if memory is None or ticket.lease_id is not None:
            return False
        tail = None if view is None else view.tail
        state = memory._add_successes(ticket.key, policy, ticket.generation, 1, tail)
        if state is None:
            return False
        if view is not None and (tail is None or tail.state is not state):
            if view.state is not state and view.ticket == ticket:
                # CLOSED to CLOSED in one generation: no event, the ticket stays
                view.state = state
            if view.state is state:
                # the hint for the next call (only a tail of this breaker's policy)
                tail = memory._tail(ticket.key)
                view.tail = tail if tail is not None and tail.policy is policy else None
        return True

    def fresh(self, key: str, now: float) -> View | None:
        """``key``'s view if it is fresh at ``now``, else ``None``."""
        view = self.views.get(key)
        if view is not None and self.current(view, now):
            return view
        return None

    def known(self, key: str | None) -> list[CircuitBreakerState]:
        """The last state seen of ``key`` (none if never seen), or of every key."""
        if key is None:
            return [view.state for view in self.views.values()]
        view = self.views.get(key)
        return [] if view is None else [view.state]

    def adopt(
        self, state: CircuitBreakerState, now: float, *, newer_only: bool, epoch: int = -1
    ) -> CircuitState | None:
        """
        Make ``state`` its key's view (fresh from ``now``), carrying the key's batch over
        when it is of the same CLOSED generation; ``epoch`` is `epoch` when the request
        that returned ``state`` was sent (-1: the view is never confirmed by a feed).

        Returns:
            The state the previous view showed (CLOSED for a key never seen), or ``None``
            when ``newer_only`` and a fresh view of a later generation is kept instead.
        """
        key = state.key
        old = self.views.get(key)
        if (
            newer_only
            and old is not None
            and state.generation < old.state.generation
            and old.at <= now < old.until
        ):
            # an answer sent before the one this fresh view came from (concurrent calls
            # on a network store): adopting it would bring back a state already left
            return None
        pending = None
        if state.state is _CLOSED:
            pending = self.pending.get(key)
            if pending is not None and pending.generation != state.generation:
                pending = None
        if old is not None:
            old.pending = None  # guards admitted from the old view take the general path
        elif len(self.views) >= self.sweep_at:
            self.sweep(now)
        view = self.views[key] = View(state, now, now + self.ttl, pending, epoch)
        if state.state is _CLOSED or state.state is _DISABLED:
            self.refusing.discard(key)
        else:
            self.refusing.add(key)
        announced = self.latest.get(key)
        if announced is not None and announced != state.generation:
            # the feed announced another generation: an answer that was on its way when
            # that change was made (or one made since, whose announcement is on its way)
            view.stale()
        return _CLOSED if old is None else old.state.state

    def sweep(self, now: float) -> int:
        """
        Forget the views that are safe to forget at ``now``; return how many.

        Such a view is CLOSED (a key without a view reads as CLOSED: to events, hints,
        `all_available_hint` and the provider rule it makes no difference), its key has
        no batch written behind nor successes on their way to the store (``busy``), and
        the key is idle: its view neither fetched nor confirmed by a change feed within
        `IDLE_SECONDS` before ``now`` (past its freshness, so an expired view only), and
        on the in-process store no success of the key added in that time either (the
        tail's and the state's last times, by the store's clock).  The next call of a
        forgotten key asks the store, as one whose view expired does; a guard still in
        flight from a forgotten view reports through the breaker's general path, which
        counts its success all the same.  The store keeps what it holds of the key.

        The next sweep comes when the views have doubled (and at `SWEEP_VIEWS` at the
        earliest): each sweep's cost is spread over at least as many new keys as views
        it kept.
        """
        before = now - IDLE_SECONDS
        memory = self.memory
        store_before = -math.inf if memory is None else memory._clock() - IDLE_SECONDS
        views, pending, busy = self.views, self.pending, self.busy
        idle = [
            key
            for key, view in views.items()
            if view.state.state is _CLOSED
            and view.until < before
            and key not in pending
            and key not in busy
            and (memory is None or _idle_in_store(view, store_before))
        ]
        for key in idle:
            del views[key]
        self.sweep_at = max(SWEEP_VIEWS, 2 * len(views))
        return len(idle)

    def write_behind(self, view: View, ticket: Ticket) -> bool | None:
        """
        Count a success of ``ticket`` (a CLOSED or DISABLED view's) without the store.

        Returns:
            ``None`` when it must go to the store inline (a probe, another generation, a
            view that is neither CLOSED nor DISABLED); otherwise whether the key's batch
            is now due for a flush.
        """
        if ticket.lease_id is not None:
            return None
        pending = view.pending  # set only while the view is CLOSED and counting
        if pending is not None and pending.generation == ticket.generation:
            count = pending.count = pending.count + 1
            return count >= MAX_PENDING or self.clock() >= pending.due
        state = view.state
        if state.generation != ticket.generation:
            return None
        if state.state is _DISABLED:
            return False
        if state.state is not _CLOSED:
            return None
        key = ticket.key
        pending = self.pending.get(key)
        if pending is None or pending.generation != ticket.generation:
            # successes of an older generation would be dropped by the store
            self.pending[key] = view.pending = Pending(
                ticket.generation, 1, self.clock() + self._flush_interval
            )
            return False
        pending.count += 1
        return pending.count >= MAX_PENDING or self.clock() >= pending.due

    def counted(self, view: View | None, ticket: Ticket) -> bool:
        """`write_behind` for the exact mode, whose batches are sent at once: whether the
        success of ``ticket`` was counted in the key's batch (or dropped: DISABLED)."""
        return view is not None and self.write_behind(view, ticket) is not None

    def outdated(
        self, ticket: Ticket, outcome: Outcome, retry_after: float | None, skew: float = 0.0
    ) -> bool:
        """
        Whether the store would drop ``outcome`` of ``ticket`` anyway, as the key's view
        tells: a fresh view of a later generation (unless a 429 holds it open longer, by
        the store's clock: this one plus ``skew``, and the open end a clock stepped back
        leaves, `unstepped`), or a DISABLED view of the ticket's generation.
        """
        view = self.views.get(ticket.key)
        if view is None:
            return False
        state = view.state
        now = self.clock()
        if (
            self.current(view, now)
            and ticket.generation < state.generation
            and not extends_open(unstepped(state, now + skew), outcome, retry_after, now + skew)
        ):
            return True  # the store's generation is at least the view's
        return state.state is _DISABLED and state.generation == ticket.generation

    def provider_trip(
        self, provider_of: dict[str, str], provider: str, now: float, threshold: int
    ) -> str | None:
        """
        The reason to force ``provider``'s key open, or ``None``: at least ``threshold``
        of its models (``provider_of`` maps model keys to providers) are OPEN (tripped by
        failures, not forced) in these views, and a fresh view of the provider's key
        shows it neither open already nor DISABLED (an operator said: never trip it);
        without a fresh view the breaker reads the store's state of the key and asks again.

        Open periods end on the store's clock, which need not be this one (``now``, the
        views' freshness): they are judged at the latest time the store stamped on the
        views of the provider and its models, a time the store has reached.
        """
        views = self.views
        models = [
            (key, view)
            for key, owner in provider_of.items()
            if owner == provider and (view := views.get(key)) is not None
        ]
        current = self.fresh(provider, now)
        store_now = max(
            (
                at
                for view in [*(view for _, view in models), current]
                if view is not None and (at := view.state.updated_at_ts) is not None
            ),
            default=-math.inf,
        )
        open_models = sorted(
            key
            for key, view in models
            if view.state.state is _OPEN and _open_at(view.state, store_now)
        )
        if len(open_models) < threshold:
            return None
        if current is not None and (
            _open_at(current.state, store_now) or current.state.state is _DISABLED
        ):
            return None
        shown = ", ".join(key.removeprefix(f"{provider}:") for key in open_models)
        reason = f"{len(open_models)} models of {provider} open ({shown})"
        return reason if len(reason) <= 300 else reason[:297] + "..."

    def drop(self, key: str) -> Pending | None:
        """Forget ``key``'s batch (the next success starts a new one); return it."""
        pending = self.pending.pop(key, None)
        if pending is not None:
            view = self.views.get(key)
            if view is not None and view.pending is pending:
                view.pending = None
        return pending

    def take(self, key: str) -> list[OutcomeReport]:
        """``key``'s batch as reports for the store (empty if none), forgotten here."""
        pending = self.drop(key)
        return [] if pending is None else pending.reports(key)

    def stale(self, key: str | None = None) -> None:
        """Make the next admission of ``key`` (or of every key) ask the store."""
        if key is None:
            for view in self.views.values():
                view.stale()
        elif (one := self.views.get(key)) is not None:
            one.stale()

    def close(self) -> None:
        """From here on every admission and report takes the breaker's general path."""
        self.memory = None  # nothing admitted or added in process: the breaker refuses
        self.feed = None
        for view in self.views.values():
            view.pending = None
            view.tail = None
        self.stale()


def _hint(breaker: CircuitBreaker, exc: BaseException) -> float | None:
    """
    The Retry-After hint ``exc`` carries, if usable (an infinite one is capped later);
    an exception group's from the leaves that decide its class (`CircuitBreaker.classify`).
    """
    retry_after = retry_after_of(exc, breaker._classify)
    return None if retry_after is not None and math.isnan(retry_after) else retry_after


async def report_error(breaker: CircuitBreaker, ticket: Ticket, exc: BaseException) -> None:
    """Report the end of a guarded call that raised ``exc`` (by `CircuitBreaker.classify`)."""
    outcome = breaker.classify(exc)
    if outcome is Outcome.CANCELLED:
        # learn nothing; a probe gets its lease back (report shields itself)
        if ticket.lease_id is not None:
            await breaker.report(ticket, outcome)
        return
    await breaker.report(ticket, outcome, retry_after=_hint(breaker, exc), error=describe(exc))


class Guard:
    """
    The async context manager returned by `CircuitBreaker.guard`.

    The CLOSED path is inlined.  On the in-process store, entry is a dict lookup of the
    key's view and one of the stored state (the very object the view shows admits), and
    a success is added to the stored state at once; elsewhere, entry is the view's lookup
    and one clock read, and a success one increment of the view's written-behind batch.
    Everything else (rejections, store admissions, probes, failures, the first success
    of a batch) goes through `CircuitBreaker.admit` / `CircuitBreaker.report`.
    """

    __slots__ = ("_breaker", "_key", "_now", "_view", "ticket")
    _view: View | None
    _now: float
    ticket: Ticket

    def __init__(self, breaker: CircuitBreaker, key: str) -> None:
        self._breaker = breaker
        self._key = key

    def _enter(self) -> Awaitable[Ticket]:
        # __aenter__, a plain method: on the CLOSED path it hands back the view's already-completed
        # future of its ticket (awaiting one is C code all through), a coroutine only
        # when the store must be asked.
        breaker = self._breaker
        key = self._key
        try:
            view = breaker._views.get(key)
        except TypeError:  # not a key (unhashable): `CircuitBreaker.admit` says why
            view = None
        if view is not None:
            tail = view.tail
            if tail is not None and tail.state is view.state:
                # the in-process store holds the view's (CLOSED) state: its live tail says
                # so (a closed store or breaker has killed every tail)
                self._view = view
                return view.entered or _entered(view)
            memory = breaker._local.memory
            if memory is not None:
                # MemoryStateStore._holds, inlined
                if (
                    memory._states.get(key) is view.state
                    and not memory._closed
                    and view.ticket is not None
                ):
                    self._view = view
                    return view.entered or _entered(view)
            else:
                now = breaker._clock()
                if view.at <= now < view.until and view.ticket is not None:
                    self._view = view
                    self._now = now
                    return view.entered or _entered(view)
        self._view = None
        return self._admit()

    async def _admit(self) -> Ticket:
        self.ticket = ticket = await self._breaker.admit(self._key)
        return ticket

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        # __aexit__ (none without a successful __aenter__, so _view is set); a plain
        # method like __aenter__: a success counted in memory ends with a completed future
        view = self._view
        if view is not None and exc is None:
            tail = view.tail
            if tail is not None and tail.state is view.state:
                # MemoryStateStore._add_successes' common case, inlined: one more
                # success in the bucket of the live tail's last run (the tail's state
                # is the view's, of the ticket's generation, under this policy), the
                # clock not stepped back since the tail's last write (a time in that
                # bucket; a step back of any size goes to the store: `circuit.unstepped`)
                now = tail.clock()
                if tail.now <= now < tail.end:
                    tail.count += 1
                    tail.now = now
                    return view.exited  # type: ignore[return-value]  # set with entered
            local = self._breaker._local
            memory = local.memory  # unset once the breaker is closed
            if memory is not None:
                if local.added(view, view.ticket, self._breaker.policy):  # type: ignore[arg-type]
                    return view.exited  # type: ignore[return-value]  # set with entered
            else:
                pending = view.pending
                if pending is not None:
                    # LocalView.write_behind, inlined; the flush deadline is checked
                    # against the admission time (the one clock read of this call)
                    count = pending.count = pending.count + 1
                    if count < MAX_PENDING and self._now < pending.due:
                        return view.exited  # type: ignore[return-value]  # set with entered
                    return self._flush()
        return self._report(exc)

    if TYPE_CHECKING:  # the protocol as `async with` and its other users see it

        async def __aenter__(self) -> Ticket: ...

        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None: ...

    else:
        __aenter__ = _enter
        __aexit__ = _exit

    async def _flush(self) -> None:
        await self._breaker._flush_key(self._key)

    async def _report(self, exc: BaseException | None) -> None:
        view = self._view
        # fast-path views hand out a ticket
        ticket = self.ticket if view is None else view.ticket
        assert ticket is not None
        if exc is None:
            await self._breaker.report(ticket, _SUCCESS)
        else:
            await report_error(self._breaker, ticket, exc)


def _entered(view: View) -> asyncio.Future[Ticket]:
    """
    ``view``'s completed future of its ticket (and ``exited``, of ``None``), made the
    first time a guard enters through it.
    """
    loop = asyncio.get_running_loop()
    view.exited = loop.create_future()
    view.exited.set_result(None)
    entered = view.entered = loop.create_future()
    entered.set_result(view.ticket)
    return entered


def not_awaitable(owner: str, fn: object, returned: object) -> ConfigurationError:
    """
    The error of a guarded ``fn`` whose call returned ``returned``, which cannot be
    awaited (an async generator, say): raised inside the guard, so it is reported as
    ``not_sent`` (`classify_error`), counting nothing against the key.
    """
    return ConfigurationError(
        f"CircuitBreaker.{owner} awaits what {shown_value(fn)} returns, got "
        f"{shown_value(returned)}, which cannot be awaited (guard the use of a stream or "
        "generator with `async with breaker.guard(key)` instead)"
    )


async def _refused(
    breaker: CircuitBreaker, fn: object, ticket: Ticket, exc: BaseException, awaitable: object
) -> BaseException:
    """
    Report the end of `protected`'s call of ``fn`` that raised ``exc``; return ``exc``, or
    what to raise instead when the call's value, ``awaitable``, cannot be awaited.
    """
    unset = awaitable is _UNSET  # fn itself raised
    if type(exc) is TypeError and not unset and not inspect.isawaitable(awaitable):
        exc = not_awaitable("protect", fn, awaitable)
    await report_error(breaker, ticket, exc)
    return exc


def protected(
    breaker: CircuitBreaker, key: str, fn: Callable[P, Awaitable[T]]
) -> Callable[P, Coroutine[Any, Any, T]]:
    """
    ``fn`` guarded by ``breaker`` for ``key``, with `Guard`'s hot path inlined.  A call
    of ``fn`` that returns what cannot be awaited is refused (`not_awaitable`).
    """
    view_of = breaker._views.get  # the dict is the breaker's for its lifetime
    positional: Callable[..., Awaitable[T]] = fn  # ``fn`` called without keywords
    clock = breaker._clock
    local = breaker._local
    policy = breaker.policy

    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        view = view_of(key)
        if view is not None:
            tail = view.tail
            if (tail is not None and tail.state is view.state) or (
                (memory := local.memory) is not None
                and memory._states.get(key) is view.state
                and not memory._closed
            ):
                # the in-process store holds the view's state, as in Guard.__aenter__
                ticket = view.ticket
                if ticket is not None:
                    awaitable: Awaitable[T] = _UNSET
                    try:
                        # without keywords, the call skips unpacking an empty dict
                        awaitable = fn(*args, **kwargs) if kwargs else positional(*args)
                        result = await awaitable
                    except BaseException as exc:
                        error = await _refused(breaker, fn, ticket, exc, awaitable)
                        if error is not exc:
                            raise error from None
                        raise
                    tail = view.tail  # as in Guard.__aexit__
                    if tail is not None and tail.state is view.state:
                        now = tail.clock()
                        if tail.now <= now < tail.end:
                            tail.count += 1
                            tail.now = now
                            return result
                    if not local.added(view, ticket, policy):
                        await breaker.report(ticket, _SUCCESS)
                    return result
            elif local.memory is None:
                now = clock()
                if view.at <= now < view.until:
                    ticket = view.ticket
                    if ticket is not None:
                        awaitable = _UNSET
                        try:
                            awaitable = fn(*args, **kwargs) if kwargs else positional(*args)
                            result = await awaitable
                        except BaseException as exc:
                            error = await _refused(breaker, fn, ticket, exc, awaitable)
                            if error is not exc:
                                raise error from None
                            raise
                        pending = view.pending
                        if pending is not None:
                            # as in Guard.__aexit__
                            count = pending.count = pending.count + 1
                            if count >= MAX_PENDING or now >= pending.due:
                                await breaker._flush_key(key)
                            return result
                        await breaker.report(ticket, _SUCCESS)
                        return result
        async with Guard(breaker, key):
            call = fn(*args, **kwargs)
            if not inspect.isawaitable(call):
                raise not_awaitable("protect", fn, call)
            return await call

    return guarded


_UNSET: Any = object()
"""No call of the guarded function made yet (it raised before returning)."""


async def flush_loop(
    flush_all: Callable[[], Awaitable[None]],
    sleep: Callable[[float], Awaitable[None]],
    interval: float,
) -> None:
    """
    The background flusher of a breaker on a shared store: ``flush_all()`` every
    ``interval`` seconds (waiting with ``sleep``), until cancelled.  A failed flush is
    logged; it never ends the loop.
    """
    while True:
        await sleep(interval)
        try:
            # shielded: a batch already taken from memory must reach the store even
            # when aclose cancels the flusher meanwhile (bounded, like report's shield)
            with anyio.move_on_after(SHIELD_SECONDS, shield=True):
                await flush_all()
        except Exception:  # never let the flusher take the breaker down
            logger.exception("circuit breaker: flushing written-behind successes failed")
