"""
What the executor calls around each provider call when it has budgets or rate limits:
`Limiter.admit` before (reserve the estimate in every budget that covers the call, then
take a place in each rate-limit schedule and wait for it), `Limiter.settle` after
(charge what the call cost, or its whole reservation when it was sent and given up on
before its answer came, `Hold.whole`; give back unused tokens: the calls this process
queued right behind the call move up, see `_places`).

A quota store that fails does not fail calls: the limiter logs one warning per outage
on ``empathy_models.limits``, counts it in ``degraded_events``, and for the next
``retry_interval`` seconds keeps budgets and rate limits in a per-process
`MemoryQuotaStore` (each process then enforces the full limits on its own), then tries
the shared store again.  A store operation that does not answer within
``store_timeout`` seconds counts as such a failure.

No store operation holds a call past its run's deadline: when the deadline runs out
while the store is answering, `Limiter.admit` raises `DeadlineRanOut` (the call is not
made) and `Limiter.settle` returns.  The operation itself goes on in the background and
its bookkeeping lands (a reservation granted late is given back, a settlement is made);
`Limiter.aclose` waits for it.

A budget settlement the store fails is sent again in the background, naming its hold
(`QuotaStore.hold_ids`: one that had landed is not counted twice), until it lands, its
hold lapses or the limiter closes (`_resettle`); one that never lands is counted in
``unsettled`` and ``unsettled_usd`` and logged once.  So is a rate-limit over-count (the
tokens a call used beyond its estimate), for a minute at most; one that never lands is
counted in ``unadjusted`` and ``unadjusted_tokens`` and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio

from .._outage import STORE_TIMEOUT, Outage
from .._settled import Expired, Settler
from .._validators import check, failure, number, shown
from ..abc import QuotaStore
from ..circuit import BreakerPolicy
from ..exceptions import (
    BackendClosedError,
    BackendError,
    BudgetExceededError,
    ConfigurationError,
    RateLimitedError,
)
from ._places import Places, give_back, wait_for_places
from ._resettle import ADJUSTMENT_KEPT, Adjustment, Resettler, Settlement
from .memory import MemoryQuotaStore
from .values import (
    WORST_PER_ESTIMATE,
    Budget,
    BudgetGrant,
    BudgetUsage,
    CacheWrite,
    RateGrant,
    RateLimit,
    to_nano,
    worst_cost,
)

_G = TypeVar("_G")  # what a quota store's operation grants

if TYPE_CHECKING:
    from ..registry import ModelInfo

__all__ = [
    "HOLD_GRACE",
    "UNBOUNDED_HOLD",
    "DeadlineRanOut",
    "Hold",
    "Limiter",
    "LocalRateLimitError",
    "quota_store_from_url",
]

logger = logging.getLogger("empathy_models.limits")

Sleep = Callable[[float], Awaitable[object]]

_MAX_PUSHBACK: Final[float] = BreakerPolicy().max_retry_after_open
"""
The longest one answer (a 429's Retry-After, an exhausted limit's reset header) pushes
a rate-limit schedule back: the breaker's own cap on such a hint (10 minutes), so one
answer cannot close a provider for a day.
"""

UNBOUNDED_HOLD: Final = 3600.0
"""
Seconds a budget hold lasts for a call that neither a deadline nor (unless streamed) a
timeout bounds, before it lapses (`Limiter.lease`).
"""

HOLD_GRACE: Final = 120.0
"""Seconds a budget hold outlasts its call's bound: time to settle it."""

REMEASURE_SKEW: Final = 60.0
"""
Seconds between two measurements of a shared quota store's clock against the limiter's
wall clock (`QuotaStore.now`), taken before a budget reservation that finds it due.
"""


class LocalRateLimitError(RateLimitedError):
    """
    A configured `RateLimit` has no capacity within the time the call may wait; the
    provider was not called.  ``retry_after`` is when the next place comes.  The
    executor moves to the next route (a cheaper or another provider's model).
    """


class DeadlineRanOut(TimeoutError):
    """
    The run's deadline ran out while the quota store was answering `Limiter.admit`: the
    call is not to be made.  What the store was doing goes on in the background, and a
    reservation or a place it grants is given back.
    """


def quota_store_from_url(url: str | QuotaStore, **options: Any) -> QuotaStore:
    """
    A quota store for ``url``.

    Args:
        url: ``memory://``, ``sqlite:///file.db``, or a plugin's (``redis://``,
            ``postgresql://``); a `QuotaStore` passes through unchanged.
        **options: passed to the store's constructor.

    Raises:
        ConfigurationError: an unknown scheme or an engine without quotas.
    """
    if isinstance(url, QuotaStore):
        return url
    from ..backends import _build, _plugin_for, redact_url

    if isinstance(url, str) and url.split("://", 1)[0].lower() == "memory":
        _plugin_for(url)  # the same checks as every memory:// URL
        memory: QuotaStore = _build(_memory_quota, url, "quota store", options)
        return memory
    if isinstance(url, str) and url.split("://", 1)[0].lower() == "sqlite":
        from .sqlite import quota_store

        _plugin_for(url)  # the same checks as every sqlite:// URL (an option given twice)

        store = _build(quota_store, url, "quota store", options)
    else:
        plugin = _plugin_for(url)
        if plugin.quota_store is None:
            raise ConfigurationError(
                f"{redact_url(url)!r}: the {plugin.package} backend holds no budgets or "
                "rate limits; use memory://, sqlite://, redis:// or postgresql://"
            )
        store = _build(plugin.quota_store, url, "quota store", options)
    if not isinstance(store, QuotaStore):
        raise ConfigurationError(f"the plugin for {redact_url(url)!r} returned {shown(store)}")
    return store


def _memory_quota(_url: str, **options: Any) -> MemoryQuotaStore:
    return MemoryQuotaStore(**options)


class Hold:
    """
    What one admitted call holds: budget reservations and rate-limit places.  ``closed``
    once settled: a reservation landing later (its caller was cancelled and stopped
    waiting for it) is given back by the task that made it.  A call settles at
    ``cost_usd``, or, with ``whole`` set (it was sent and given up on before its
    answer came, which the provider bills whole all the same), at what each budget
    reserved for it.
    """

    __slots__ = (
        "budgets",
        "closed",
        "cost_usd",
        "done",
        "due",
        "est_tokens",
        "id",
        "places",
        "pushback",
        "rates",
        "tokens",
        "waking",
        "whole",
    )

    def __init__(self) -> None:
        self.closed = False
        self.done = False  # settled, and the capacity it gives back given
        # (store, key, window start, window end, nano-dollars held, when the hold lapses)
        self.budgets: list[tuple[QuotaStore, str, float, float, int, float]] = []
        # (store, key, seconds per token) of every tpm schedule taken
        self.rates: list[tuple[QuotaStore, str, float]] = []
        # rate key -> where its schedule ended once this hold's place was taken (the
        # grant's ``place``; moved up with the place, `_places`)
        self.places: dict[str, float | None] = {}
        # rate key -> when its place comes (the limiter's monotonic clock), earlier once
        # a call ahead gives capacity back (`_places`), which then cancels ``waking``,
        # the scope of the sleep waiting for the places
        self.due: dict[str, float] = {}
        self.waking: anyio.CancelScope | None = None
        self.est_tokens = 0
        # the name its budgets' reservations and settlements give the hold, on a store
        # with ``hold_ids`` that can fail: a settlement sent again applies once
        # (`_resettle`)
        self.id: str | None = None
        self.cost_usd = 0.0  # set by the executor: what the call cost, or may have cost
        self.whole = False  # likewise: the call is charged its reservation
        self.tokens: int | None = None  # likewise: the tokens the call used
        # seconds the provider said to wait (a 429's Retry-After or rate-limit reset
        # headers): the schedules are pushed back that far for every worker, up to
        # ``_MAX_PUSHBACK``
        self.pushback: float | None = None


_max_wait = number(
    failure(ConfigurationError), low=0, why="must be a finite number of seconds >= 0"
)
_seconds = number(
    failure(ConfigurationError), low=0, low_open=True, why="must be a finite number of seconds > 0"
)


def _timing(
    max_wait: float, retry_interval: float, store_timeout: float | None, **clocks: object
) -> tuple[float, float, float | None]:
    """
    A `Limiter`'s ``max_wait``, ``retry_interval`` and ``store_timeout`` (None: none) as
    plain floats, its ``clocks`` (``sleep``, ``monotonic``) callables.

    Raises:
        ConfigurationError: naming the argument that is not.
    """
    for name, value in clocks.items():
        if not callable(value):
            raise ConfigurationError(f"{name} must be callable, got {shown(value)}")
    return (
        float(check(_max_wait, "max_wait", max_wait)),
        float(check(_seconds, "retry_interval", retry_interval)),
        None if store_timeout is None else float(check(_seconds, "store_timeout", store_timeout)),
    )


def _check_budgets(budgets: object) -> tuple[Budget, ...]:
    if budgets is None:
        return ()
    if isinstance(budgets, Budget):
        return (budgets,)
    if isinstance(budgets, str | bytes | Mapping) or not isinstance(budgets, Iterable):
        raise ConfigurationError(f"budgets must be a list of Budget, got {shown(budgets)}")
    out = tuple(budgets)
    for b in out:
        if not isinstance(b, Budget):
            raise ConfigurationError(f"budgets must hold Budget objects, got {shown(b)}")
    for i, a in enumerate(out):
        for b in out[:i]:
            if _share_keys(a, b) and not (_replaces(a, b) or _replaces(b, a)):
                la, lb = _label(a), _label(b)
                alike = f"named {la!r}" if la == lb else f"named alike ({lb!r} and {la!r})"
                raise ConfigurationError(
                    f"two budgets are {alike}: both could charge the same calls to one key "
                    "in the quota store; give one a name= of its own"
                )
    return out


def _shape(budget: Budget) -> tuple[str, str | None]:
    # (the store key, None) of a budget with one key; for a per-value budget, the
    # (prefix, suffix) around the scope value of each call
    if not budget.per_value:
        key = budget.key_for(budget.value)
        assert key is not None  # a global or single-value budget has one key
        return key, None
    if budget.name is not None:
        return f"{budget.name}:", ""
    return f"{budget.scope}=", f"/{budget.window_label}"


def _label(budget: Budget) -> str:
    first, suffix = _shape(budget)
    return first if suffix is None else f"{first}*{suffix}"


def _share_keys(a: Budget, b: Budget) -> bool:
    # True when some call could be charged to the same store key by both
    (pa, xa), (pb, xb) = _shape(a), _shape(b)
    if xa is None:
        return pa == pb if xb is None else _fits(pa, pb, xb)
    if xb is None:
        return _fits(pb, pa, xa)
    # any value may stand between prefix and suffix
    return (pa.startswith(pb) or pb.startswith(pa)) and (xa.endswith(xb) or xb.endswith(xa))


def _fits(key: str, prefix: str, suffix: str) -> bool:
    # True when a per-value budget gives some value the key ``key``
    return len(key) > len(prefix + suffix) and key.startswith(prefix) and key.endswith(suffix)


def _replaces(one: Budget, every: Budget) -> bool:
    """
    True when ``one``, a budget for one value, takes the place of the per-value budget
    ``every`` for that value: same scope, and ``every`` gives that value ``one``'s key
    (with the default names: the same window).
    """
    return (
        one.value is not None
        and every.per_value
        and one.scope == every.scope
        and every.key_for(one.value) == one.key_for(one.value)
    )


def _check_rates(rate_limits: object) -> dict[str, RateLimit]:
    if rate_limits is None:
        return {}
    if not isinstance(rate_limits, Mapping):
        raise ConfigurationError(
            "rate_limits must map provider names or model ids to RateLimit, "
            f"got {shown(rate_limits)}"
        )
    out: dict[str, RateLimit] = {}
    for name, limit in rate_limits.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"rate_limits keys must be non-empty strings, got {shown(name)}"
            )
        if not isinstance(limit, RateLimit):
            raise ConfigurationError(
                f"rate_limits[{shown(name)}] must be a RateLimit, got {shown(limit)}"
            )
        out[name] = limit
    return out


def _scope_value(budget: Budget, context: Any, info: ModelInfo) -> str | None:
    scope = budget.scope
    if scope == "global":
        return None
    if scope == "provider":
        return info.provider
    if scope == "model":
        return info.id
    value = getattr(context, scope)
    return value if isinstance(value, str) else None


def _pushback(hold: Hold) -> float | None:
    """
    How far ``hold``'s schedules are pushed back: the provider's wait, capped at
    ``_MAX_PUSHBACK`` (None: no push back).
    """
    pushback = hold.pushback
    if pushback is None or not pushback > 0 or not hold.rates:
        return None
    keys = ", ".join(key for _, key, _ in hold.rates)
    if pushback > _MAX_PUSHBACK:
        logger.warning(
            "the provider asked to wait %g s: pushing back %s for at most %g s",
            pushback,
            keys,
            _MAX_PUSHBACK,
        )
        return _MAX_PUSHBACK
    logger.info("the provider asked to wait %.1f s: pushing back %s", pushback, keys)
    return pushback


class Limiter:
    """
    Budgets and rate limits for one executor, kept in a `QuotaStore`.

    Args:
        budgets: one `Budget`, several, or None.
        rate_limits: provider names or model ids to their `RateLimit`.
        store: a `QuotaStore` or a URL for one (owned by the limiter); None: a fresh
            ``memory://`` store.
        max_wait: how long a call waits for rate-limit capacity (the run's deadline
            bounds it too); a call that would wait longer moves to the next route.
        retry_interval: seconds a failed store is replaced by a per-process
            `MemoryQuotaStore` before it is tried again.
        store_timeout: seconds one store operation may take before it counts as a
            failure (None: no limit but the run's deadline).
        sleep: how a call waits for its place in a schedule.
        wall_clock: UTC epoch seconds, for budget windows and the per-process store.
        monotonic: monotonic seconds, for waits and retries.

    Raises:
        ConfigurationError: an invalid argument.
    """

    def __init__(
        self,
        budgets: Sequence[Budget] | Budget | None,
        rate_limits: Mapping[str, RateLimit] | None,
        store: QuotaStore | str | None,
        *,
        max_wait: float = 30.0,
        retry_interval: float = 5.0,
        store_timeout: float | None = STORE_TIMEOUT,
        sleep: Sleep = anyio.sleep,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budgets = _check_budgets(budgets)
        self.rate_limits = _check_rates(rate_limits)
        self.max_wait, retry_interval, self._store_timeout = _timing(
            max_wait, retry_interval, store_timeout, sleep=sleep, monotonic=monotonic
        )
        self.owns_store = store is None or isinstance(store, str)
        self.store: QuotaStore = quota_store_from_url("memory://" if store is None else store)
        self._local = MemoryQuotaStore(clock=wall_clock)
        self._sleep = sleep
        self._wall, self._mono = wall_clock, monotonic
        self._outage = Outage(
            logger,
            f"quota store {self.store!r}",
            "budgets and rate limits are kept per process",
            retry_interval=retry_interval,
            monotonic=monotonic,
        )
        self._overrides: dict[str, int] = {}
        self._overrides_at = -math.inf
        # the shared store's clock minus the wall clock, and the monotonic time it was
        # last measured (`_skew_for`)
        self._skew = 0.0
        self._skew_at = -math.inf
        # rate key -> monotonic time its schedule was last seen to be booked until
        self._booked: dict[str, float] = {}
        # rate key -> monotonic time until which a provider's reset pushed it back
        self._pushed: dict[str, float] = {}
        # rate key -> this process's places in its schedule (`_places`)
        self._places: dict[str, Places] = {}
        self._from_registry: dict[str, RateLimit] = {}
        # reservations and settlements carried to their end through a cancellation of
        # their caller (see `_carry`), or in the background past the store's timeout or
        # the run's deadline (see `_bounded`)
        self._settler = Settler()
        # failed settlements sent again (`_resettle`), naming their holds when it can
        self._resettle = Resettler(self._failed, self._store_timeout, self._store_now)
        self._names_holds = _names_holds(self.store)

    @property
    def degraded_events(self) -> int:
        """Outages of the quota store (one per outage, logged once)."""
        return self._outage.events

    @property
    def store_errors(self) -> int:
        """
        Quota store operations that failed or did not answer within ``store_timeout``
        (each served by the local store instead).
        """
        return self._outage.errors

    @property
    def unsettled(self) -> int:
        """
        Budget settlements that never landed in the shared store (it failed them, and
        their retries until the hold lapsed or the close, `_resettle`): calls whose
        cost the store does not count.  Kept in this process only: the store shows
        their holds as lapsed (`BudgetUsage.lapsed`, below ``budget status``'s table).
        """
        return self._resettle.unsettled

    @property
    def unsettled_usd(self) -> float:
        """What the `unsettled` calls cost (or, given up on, reserved), in dollars."""
        return self._resettle.unsettled_nano / 1e9

    @property
    def unadjusted(self) -> int:
        """
        Rate-limit over-counts (the tokens a call used beyond its estimate) that never
        landed in the shared store (it failed them, and their retries for
        `ADJUSTMENT_KEPT` seconds or until the close, `_resettle`): the schedules
        count fewer tokens than the calls used.
        """
        return self._resettle.unadjusted

    @property
    def unadjusted_tokens(self) -> int:
        """The tokens the `unadjusted` over-counts would have added."""
        return self._resettle.unadjusted_tokens

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self.owns_store:
            await self.store.__aenter__()

    async def aclose(self) -> None:
        # operations whose caller stopped waiting (cancelled, out of time) land first,
        # and failed settlements are tried again at once (then often) meanwhile
        self._resettle.close()
        await self._settler.drain()
        self._resettle.abandon()  # those still failing: counted and logged
        if self.owns_store:
            await self.store.aclose()

    def _carry(self, operation: Coroutine[Any, Any, _G]) -> Awaitable[_G]:
        """
        ``operation`` carried to its end when the caller is cancelled meanwhile
        (asyncio-natively too, which anyio's shields do not stop): a reservation the
        store committed is then in the hold, and a settlement is done, before the
        cancellation is raised.  A `MemoryQuotaStore` never suspends: nothing to carry.
        """
        if type(self.store) is MemoryQuotaStore:
            return operation
        return self._settler.run(operation)

    # ------------------------------------------------------------------ the store

    @property
    def degraded(self) -> bool:
        """True while the limiter runs on per-process limits after a store failure."""
        return self._outage.down

    def _current(self) -> QuotaStore:
        return self._local if self._outage.skip() else self.store

    def _failed(self, exc: BaseException) -> None:
        self._outage.failed(exc)

    def _store_now(self) -> float:
        return self._wall() + self._skew  # the shared store's clock, as last measured

    async def _or_local(
        self, make: Callable[[], Coroutine[Any, Any, _G]], until: float | None
    ) -> _G:
        """`_bounded`, made again on the per-process store when the store timed out."""
        try:
            return await _bounded(self, make, until)
        except Expired:
            return await self._carry(make())  # degraded now: on the per-process store

    async def _on_store(
        self, operation: Callable[[QuotaStore], Awaitable[_G]]
    ) -> tuple[QuotaStore, _G]:
        # ``operation`` on the current store; on a store failure, degraded mode and the
        # same operation on the local store (a closed store, or the local one failing,
        # raises)
        store = self._current()
        try:
            return store, await operation(store)
        except BackendClosedError:
            raise
        except BackendError as exc:
            if store is self._local:
                raise
            self._failed(exc)
        return self._local, await operation(self._local)

    def _reserve(
        self,
        key: str,
        ws: float,
        we: float,
        amount: int,
        limit: int,
        hold: tuple[float, float, dict[str, str]],
    ) -> Awaitable[tuple[QuotaStore, BudgetGrant]]:
        lapses_at, skew, named = hold  # ``named``: the hold's id, if any
        return self._on_store(
            lambda store: store.reserve(
                key,
                window_start=ws,
                window_end=we,
                amount=amount,
                limit=limit,
                lapses_at=lapses_at if store is self.store else lapses_at - skew,
                **named,
            )
        )

    def _acquire(
        self, key: str, cost: float, interval: float, burst: float, max_wait: float
    ) -> Awaitable[tuple[QuotaStore, RateGrant]]:
        return self._on_store(
            lambda store: store.acquire(
                key, cost=cost, interval=interval, burst=burst, max_wait=max_wait
            )
        )

    # ------------------------------------------------------------------ planning aids

    def estimate(
        self, info: ModelInfo, input_tokens: int, max_tokens: int, *, cache_write: CacheWrite = None
    ) -> float:
        """
        The most a call can cost, what budgets reserve (`worst_cost`): the prompt's worst
        case (`WORST_PER_ESTIMATE` times its estimate ``input_tokens``, at the cache
        write price when the request asks for prompt-cache writes: ``cache_write``
        "5m" or "1h") plus ``max_tokens`` of output.
        """
        return worst_cost(info, input_tokens * WORST_PER_ESTIMATE, max_tokens, cache_write)

    def covers(self, context: Any, info: ModelInfo) -> list[tuple[Budget, str]]:
        """
        The budgets covering a call and the key each charges it to, one per key: a
        budget for one value takes the place of the per-value budget of its scope and
        window for that value (the only budgets `_check_budgets` lets share a key).
        """
        out: dict[str, Budget] = {}
        for budget in self.budgets:
            key = budget.key_for(_scope_value(budget, context, info))
            if key is not None and (key not in out or budget.value is not None):
                out[key] = budget
        return [(budget, key) for key, budget in out.items()]

    def _rates_for(self, info: ModelInfo) -> list[tuple[str, RateLimit]]:
        out = []
        for target in dict.fromkeys((info.provider, info.id)):  # a model named as its provider once
            limit = self.rate_limits.get(target)
            if limit is None and target == info.id and (info.rpm or info.tpm):
                limit = self._from_registry.get(info.id)
                if limit is None:  # the registry's limits for the model
                    limit = self._from_registry[info.id] = RateLimit(rpm=info.rpm, tpm=info.tpm)
            if limit is not None:
                out.append((target, limit))
        return out

    def saturated(self, models: Iterable[ModelInfo]) -> set[str]:
        """Ids of ``models`` whose rate-limit schedule is booked beyond ``max_wait``."""
        if not self._booked:
            return set()
        now = self._mono()
        out = set()
        for m in models:
            for target in (m.provider, m.id):
                for kind in ("rpm", "tpm"):
                    until = self._booked.get(f"{kind}:{target}")
                    if until is not None and until - now > self.max_wait:
                        out.add(m.id)
        return out

    # ------------------------------------------------------------------ admission

    def lease(self, context: Any, time_left: float | None, streamed: bool) -> float:
        """
        Seconds a call's budget holds may last: the longest the call may take (the
        deadline's ``time_left``, and the context's ``timeout`` unless ``streamed``;
        `UNBOUNDED_HOLD` when neither bounds it), its longest rate-limit wait, and
        `HOLD_GRACE` for its settlement.
        """
        bound = time_left
        timeout = None if streamed else getattr(context, "timeout", None)
        if timeout is not None:
            bound = timeout if bound is None else min(bound, timeout)
        wait = self.max_wait if time_left is None else max(0.0, min(self.max_wait, time_left))
        return max(0.0, UNBOUNDED_HOLD if bound is None else bound) + wait + HOLD_GRACE

    async def admit(
        self,
        context: Any,
        info: ModelInfo,
        input_tokens: int,
        max_tokens: int,
        time_left: float | None,
        *,
        streamed: bool = False,
        cache_write: CacheWrite = None,
        while_waiting: Callable[[], AbstractAsyncContextManager[object]] | None = None,
    ) -> Hold | None:
        """
        Reserve the call's estimate in every budget covering it and take its places in the
        rate-limit schedules, waiting for them.

        The budgets' holds lapse (`QuotaStore.reserve`'s ``lapses_at``) once the call
        can no longer be running: after the longest it may take (the run's deadline,
        or its ``timeout`` unless streamed; `UNBOUNDED_HOLD` seconds when neither
        bounds it) plus the longest rate-limit wait and `HOLD_GRACE`.  A process killed
        or cut off from the store mid-call thus holds its budgets no longer than that.

        Args:
            context: the run's `ExecutionContext` (its workflow, stage, user).
            info: the model called.
            input_tokens, max_tokens: the prompt's estimate and the output asked for.
                The estimate is a quarter of the prompt's worst case (the executor's:
                a token per UTF-8 byte of its text and of the tool definitions and
                schema sent, plus framing and images): budgets reserve the worst case
                (`estimate`), rate limits count the estimate.
            time_left: seconds left of the run's deadline (None: no deadline); no store
                operation is waited for longer.
            streamed: the call is a stream (its ``timeout`` is an idle timeout).
            cache_write: the prompt-cache writes the request asks for (`estimate`).
            while_waiting: entered around a wait for rate-limit places (the executor
                lets the call's provider slot go there, for the provider's other models).

        Returns:
            The `Hold` to settle, or None when no limit applies.

        Raises:
            BudgetExceededError: a budget cannot hold the estimate (nothing is left held).
            LocalRateLimitError: no place in a schedule within ``max_wait`` or ``time_left``
                (nothing is left held).
            DeadlineRanOut: ``time_left`` ran out while the store was answering (what it
                grants later is given back).
        """
        covered = self.covers(context, info) if self.budgets else []
        rates = self._rates_for(info)
        if not covered and not rates:
            return None
        hold = Hold()
        hold.est_tokens = input_tokens + max_tokens
        if covered and self._names_holds:
            hold.id = secrets.token_hex(8)
        until = None if time_left is None else self._mono() + time_left
        try:
            if covered:
                skew = await _skew_for(self, until)
                lease = self.lease(context, time_left, streamed)
                worst = self.estimate(info, input_tokens, max_tokens, cache_write=cache_write)
                await self._admit_budgets(hold, covered, info, worst, (lease, skew), until)
            if rates:
                await self._admit_rates(hold, rates, info, until, while_waiting)
        except BaseException:
            # carried through a cancellation; in the background past the deadline
            left = None if until is None else until - self._mono()
            await self.settle(hold, failed=True, time_left=left)
            raise
        return hold

    async def _admit_budgets(
        self,
        hold: Hold,
        covered: list[tuple[Budget, str]],
        info: ModelInfo,
        estimate: float,
        times: tuple[float, float],
        until: float | None,
    ) -> None:
        """
        Reserve ``estimate`` in each budget of ``covered``; ``times`` is the hold's lease
        (seconds) and the store's clock minus the wall clock (`_skew_for`): windows and
        lapse times are taken by the store's clock.
        """
        await _refresh_overrides(self, until)
        amount = to_nano(estimate, up=True)
        lease, skew = times
        now = self._wall() + skew
        for budget, key in covered:
            ws, we = budget.window_bounds(now)
            limit = self._overrides.get(key, to_nano(budget.limit_usd))
            grant = await self._or_local(
                partial(self._reserve_into, hold, key, (ws, we, now + lease, skew), amount, limit),
                until,
            )
            if not grant.granted:
                usage: BudgetUsage = grant.usage
                raise BudgetExceededError(
                    key,
                    limit_usd=usage.limit_usd,
                    remaining_usd=usage.remaining_usd,
                    needed_usd=estimate,
                    resets_at=we,
                    model=info.id,
                )

    async def _reserve_into(
        self,
        hold: Hold,
        key: str,
        times: tuple[float, float, float, float],
        amount: int,
        limit: int,
    ) -> BudgetGrant:
        """
        A reservation, kept in ``hold`` once granted (given back if ``hold`` is closed);
        ``times``: the window, the lapse time by the store's clock and its skew (taken
        off on the per-process store, which the wall clock times).
        """
        ws, we, lapses_at, skew = times
        named = {} if hold.id is None else {"hold_id": hold.id}
        store, grant = await self._reserve(key, ws, we, amount, limit, (lapses_at, skew, named))
        if store is not self.store:
            lapses_at -= skew
        if grant.granted:
            hold.budgets.append((store, key, ws, we, amount, lapses_at))
            if hold.closed:  # settled already: its caller stopped waiting for this
                hold.done = False  # this place is not given back yet (`Places.let_go`)
                await self._settle(hold, True)
        return grant

    async def _admit_rates(
        self,
        hold: Hold,
        rates: list[tuple[str, RateLimit]],
        info: ModelInfo,
        until: float | None,
        while_waiting: Callable[[], AbstractAsyncContextManager[object]] | None,
    ) -> None:
        allowed = self.max_wait
        if until is not None:
            allowed = max(0.0, min(allowed, until - self._mono()))
        wait = 0.0
        for target, limit in rates:
            for kind, per_minute, cost, burst in (
                ("rpm", limit.rpm, 1.0, limit.request_burst),
                ("tpm", limit.tpm, float(hold.est_tokens), limit.token_burst),
            ):
                if per_minute is None:
                    continue
                key = f"{kind}:{target}"
                interval = 60.0 / per_minute
                # a request slot's interval is negative in the hold (see `_settle`)
                held = -interval if kind == "rpm" else interval
                grant = await self._or_local(
                    partial(_acquire_into, self, hold, key, cost, interval, burst, allowed, held),
                    until,
                )
                # booked by the load: the wait a call beyond the burst has when idle is its own
                self._booked[key] = self._mono() + grant.wait - max(0.0, (cost - burst) * interval)
                if not grant.granted:
                    raise _no_place(key, (per_minute, cost, burst), allowed, grant.wait, info)
                wait = max(wait, grant.wait)
        await _waited(hold, wait, self, while_waiting)

    # ------------------------------------------------------------------ settlement

    async def settle(
        self, hold: Hold, *, failed: bool = False, time_left: float | None = None
    ) -> None:
        """
        Charge each budget what the call cost and give back the tokens it did not use.

        Never raises a store's error: a failure is counted, and a budget's settlement
        sent again in the background until it lands (`_resettle`).  A cancellation
        of the caller (an anyio scope, ``Task.cancel``, ``asyncio.timeout``) arriving
        meanwhile is raised once the settlement is done (see `_carry`).  A store that
        does not answer within ``store_timeout`` (a failure) or ``time_left`` is not
        waited for: the settlement lands in the background (`aclose` waits for it).

        Args:
            hold: from `admit`; it is charged ``hold.cost_usd``, or each budget what it
                reserved when ``hold.whole`` is set.
            failed: the call was not sent: it is charged 0 and its places given back.
            time_left: seconds left of the run's deadline (None: no deadline).
        """
        hold.closed = True
        if hold.budgets or hold.rates:
            until = None if time_left is None else self._mono() + time_left
            with contextlib.suppress(DeadlineRanOut, Expired):  # it lands in the background
                await _bounded(self, partial(self._settle, hold, failed), until)

    async def _settle(self, hold: Hold, failed: bool) -> None:
        # what the hold has now: a reservation landing later is given back by its task
        budgets, rates, pushback = hold.budgets[:], hold.rates[:], _pushback(hold)
        hold.budgets.clear()
        hold.rates.clear()
        actual = to_nano(hold.cost_usd)
        whole = hold.whole and not failed  # a call sent and given up on: what it reserved
        for store, key, ws, we, held, lapses_at in budgets:
            amounts = (held, held if whole else actual)
            await _send_or_retry(
                self, Settlement(store, key, (ws, we), amounts, lapses_at, hold.id)
            )
        try:
            await _settle_rates(self, hold, rates, pushback, failed)
        finally:
            hold.done = True


async def _acquire_into(
    limiter: Limiter,
    hold: Hold,
    key: str,
    cost: float,
    interval: float,
    burst: int,
    allowed: float,
    held: float,
) -> RateGrant:
    """A place in ``key``'s schedule, kept in ``hold`` once granted (given back if
    ``hold`` is closed)."""
    store, grant = await limiter._acquire(key, cost, interval, float(burst), allowed)
    if grant.granted:
        hold.rates.append((store, key, held))
        hold.places[key] = grant.place
        hold.due[key] = limiter._mono() + grant.wait
        if grant.place is not None:
            places = limiter._places.get(key)
            if places is None:
                places = limiter._places[key] = Places()
            places.taken(store, hold, grant.place, cost * interval)
        if hold.closed:  # settled already: its caller stopped waiting for this
            hold.done = False  # this place is not given back yet (`Places.let_go`)
            await limiter._settle(hold, True)
    return grant


async def _refresh_overrides(limiter: Limiter, until: float | None) -> None:
    now = limiter._mono()
    if now - limiter._overrides_at < 5.0 or limiter.degraded:
        return
    limiter._overrides_at = now
    try:
        limiter._overrides = await _bounded(limiter, limiter.store.limit_overrides, until)
    except Expired:
        pass  # counted: the limits last read stay
    except BackendClosedError:
        raise
    except BackendError as exc:
        limiter._failed(exc)


def _names_holds(store: QuotaStore) -> bool:
    """
    Whether ``store``'s reservations and settlements are given hold ids: it says it
    takes them (`QuotaStore.hold_ids`; a subclass that overrides `reserve` or `settle`
    without ``hold_id`` (and `settle` without ``resent``) is taken at its signature's
    word), and it can fail (not the in-process `MemoryQuotaStore`).
    """
    if not store.hold_ids or type(store) is MemoryQuotaStore:
        return False
    for method, names in ((store.reserve, {"hold_id"}), (store.settle, {"hold_id", "resent"})):
        try:
            parameters = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):  # no signature to read: take its word
            continue
        if not any(p.kind is p.VAR_KEYWORD for p in parameters) and not names <= {
            p.name for p in parameters
        }:
            return False
    return True


async def _send_or_retry(limiter: Limiter, pending: Settlement | Adjustment) -> None:
    """
    ``pending`` (a budget's settlement, a rate limit's over-count) sent to its store; a
    failure counted (degraded mode) and ``pending`` sent again in the background until
    it lands (`_resettle`), a retry that `aclose` waits for.
    """
    try:
        await pending.send()
    except BackendError as exc:
        limiter._failed(exc)
        task = limiter._resettle.retry(pending, exc)
        if task is not None:
            limiter._settler._keep(task)


def _no_place(
    key: str, limit: tuple[int, float, int], allowed: float, wait: float, info: ModelInfo
) -> LocalRateLimitError:
    """
    The refusal of a place in ``key``'s schedule that comes in ``wait`` seconds, past the
    ``allowed`` wait; ``limit``: the schedule's count per minute, the call's cost and the
    burst.  A call costing more than the burst waits ``(cost - burst)`` intervals even
    when the schedule is idle: when that alone is past ``allowed``, no later try does
    better, and the error says so and what to change.
    """
    per_minute, cost, burst = limit
    idle_wait = (cost - burst) * 60.0 / per_minute
    if idle_wait > allowed:
        why = (
            f"a call of {cost:.0f} tokens is more than the burst of {key} ({burst} tokens): "
            f"it waits {idle_wait:.2f} s even when it is idle, past the {allowed:.2f} s it "
            "may wait; lower max_tokens, or raise rate_limit_wait (or the RateLimit's "
            "burst_tokens)"
        )
    else:
        why = f"no capacity within {allowed:.2f} s (next in {wait:.2f} s)"
    return LocalRateLimitError(
        f"rate limit {key} ({per_minute} per minute): {why}; {info.id} not called",
        provider=info.provider,
        model=info.id,
        retry_after=wait,
    )


async def _push_back(limiter: Limiter, store: QuotaStore, key: str, seconds: float) -> None:
    try:
        await store.push_back(key, seconds=seconds)
    except BackendError as exc:
        limiter._failed(exc)


async def _adjust(
    limiter: Limiter, store: QuotaStore, key: str, delta: float, place: float | None = None
) -> None:
    """
    A give-back (``delta`` < 0) at ``place``; a failure counted (degraded mode), not
    sent again: the capacity is lost for a while, no call goes past the limit.
    """
    try:
        if place is None:
            await store.adjust(key, delta=delta)
        else:
            await store.adjust(key, delta=delta, place=place)
    except BackendError as exc:
        limiter._failed(exc)
        logger.debug("giving back %.3f s of rate limit %s failed: %r", -delta, key, exc)


async def _over_count(
    limiter: Limiter, store: QuotaStore, key: str, delta: float, tokens: int
) -> None:
    """
    The ``tokens`` a call used beyond its estimate (``delta`` seconds) added to ``key``'s
    schedule; a failure counted (degraded mode) and the adjustment sent again in the
    background (`_resettle`), a retry that `aclose` waits for.
    """
    lapses_at = limiter._store_now() + ADJUSTMENT_KEPT
    await _send_or_retry(limiter, Adjustment(store, key, delta, tokens, lapses_at))


async def _settle_rates(
    limiter: Limiter,
    hold: Hold,
    rates: list[tuple[QuotaStore, str, float]],
    pushback: float | None,
    failed: bool,
) -> None:
    """
    ``hold``'s rate-limit places settled: each schedule pushed back to the provider's
    reset, the tokens the call used beyond
    its estimate taken, those it did not use given back, and the place of a call that
    never went out given back.
    """
    for store, key, interval in rates:
        if pushback is not None:
            # the schedule ends at the store's now plus the provider's wait, or
            # later (`QuotaStore.push_back`); calls ending together all carry the
            # same reset, so a later one asks the store again only when it is later
            ends = limiter._mono() + pushback
            if ends > limiter._pushed.get(key, -math.inf):
                limiter._pushed[key] = ends
                await _push_back(limiter, store, key, pushback)
        if interval < 0:
            if failed and not hold.tokens:
                # never sent (refused or cancelled before the call): free the slot
                await _give_back(limiter, hold, store, key, interval)
            continue
        used = hold.tokens
        if used is None:
            used = 0 if failed else hold.est_tokens
        delta = (used - hold.est_tokens) * interval
        if delta > 0:
            await _over_count(limiter, store, key, delta, used - hold.est_tokens)
        elif delta < 0:
            await _give_back(limiter, hold, store, key, delta)


def _give_back(
    limiter: Limiter, hold: Hold, store: QuotaStore, key: str, delta: float
) -> Awaitable[None]:
    """
    Give ``-delta`` seconds of ``key``'s schedule back for ``hold`` (`_places.give_back`):
    the calls this process queued right behind it move up with the schedule's end;
    when another worker's place came after it, nothing moves (those calls keep their
    times, and moving the end back would give the next call one of their instants: a
    burst past the limit).  A little capacity is then lost, never exceeded.  A store
    that names no place (a `RateGrant` without one) gets nothing back.
    """
    return give_back(limiter._places.get(key), partial(_adjust, limiter), hold, store, key, delta)


def _within(limiter: Limiter, until: float | None) -> tuple[float | None, bool]:
    """
    How long a store operation may be waited for: the store's timeout, or less when
    the deadline ``until`` (monotonic; None: none) is nearer; and whether it is.
    """
    within = limiter._store_timeout
    if until is not None:
        left = max(until - limiter._mono(), 0.0)
        if within is None or left < within:
            return left, True
    return within, False


async def _waited(
    hold: Hold,
    wait: float,
    limiter: Limiter,
    while_waiting: Callable[[], AbstractAsyncContextManager[object]] | None,
) -> None:
    """`wait_for_places`, inside ``while_waiting()`` when there is a wait."""
    if wait > 0 and while_waiting is not None:
        async with while_waiting():
            await wait_for_places(hold, wait, limiter._sleep, limiter._mono)
    else:
        await wait_for_places(hold, wait, limiter._sleep, limiter._mono)


async def _skew_for(limiter: Limiter, until: float | None) -> float:
    """
    ``limiter``'s shared store's clock minus its wall clock, measured again
    (`QuotaStore.now`, one round trip within the store's timeout and ``until``) when
    `REMEASURE_SKEW` seconds have passed; 0 for a store that is not shared or while
    degraded.  A failed measurement keeps the last one (logged at DEBUG, tried again
    later).
    """
    store = limiter.store
    if not store.shared or limiter._current() is not store:
        return 0.0
    start = limiter._mono()
    if limiter._skew_at <= start < limiter._skew_at + REMEASURE_SKEW:
        return limiter._skew
    limiter._skew_at = start
    within = limiter._store_timeout
    if until is not None:
        within = until - start if within is None else min(within, until - start)
    before = limiter._wall()
    try:
        with anyio.fail_after(within) if within is not None else contextlib.nullcontext():
            told = await store.now()
    except Exception as exc:  # a failed measurement must not fail a call
        logger.debug("reading the quota store's clock failed: %r", exc)
        return limiter._skew
    if told is not None:
        limiter._skew = told - (before + limiter._wall()) / 2
    return limiter._skew


async def _bounded(
    limiter: Limiter, make: Callable[[], Coroutine[Any, Any, _G]], until: float | None
) -> _G:
    """
    ``make()``'s store operation carried to its end (`_carry`), waited for at most the
    store's timeout and until ``until`` (a cancelled caller too); it goes on in the
    background past that (`Settler.releases`, awaited by `aclose`).

    Raises:
        DeadlineRanOut: the deadline came first (the operation still counts as a
            store failure if it has not ended within the store's timeout).
        Expired: the store's timeout came first (counted as a store failure: the
            limiter is degraded now).
    """
    if type(limiter.store) is MemoryQuotaStore:
        return await make()  # in-process: never held up
    within, by_deadline = _within(limiter, until)
    ended: list[bool] = []
    # ``late``: a caller cancelled meanwhile waits until ``within`` at most, and the
    # store's stall still counts (as it does below, for a caller waiting)
    late = None if within is None else partial(_watch, limiter, ended, within)
    try:
        return await limiter._settler.run(_noting(make(), ended), within, late=late)
    except Expired:
        if by_deadline:
            _watch(limiter, ended, within or 0.0)
            raise DeadlineRanOut("the run's deadline ran out waiting for the quota store") from None
        limiter._failed(TimeoutError(f"no answer within {within:g} s"))
        raise


def _watch(limiter: Limiter, ended: list[bool], waited: float) -> None:
    """
    An operation given up on at a deadline (or by a cancelled caller), ``waited``
    seconds after it began, counts as a store failure if it has not ``ended`` within
    the store's timeout: a store that stalls puts the limiter in degraded mode, however
    short the deadlines.
    """
    timeout = limiter._store_timeout
    if timeout is None:
        return

    def check() -> None:
        if not ended:
            limiter._failed(TimeoutError(f"no answer within {timeout:g} s"))

    asyncio.get_running_loop().call_later(max(timeout - waited, 0.0), check)


async def _noting(operation: Coroutine[Any, Any, _G], ended: list[bool]) -> _G:
    """``await operation``, noting in ``ended`` that it ended (whichever way)."""
    try:
        return await operation
    finally:
        ended.append(True)
