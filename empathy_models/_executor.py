"""
The executor: one call in, one answer out, with routing, breaking, retries, fallback
and a record of every attempt.

::

    async with EmpathyLLMExecutor(
        providers=[AnthropicProvider(), OpenAIProvider()],
        telemetry_store="sqlite:///calls.db",
        router=router,
        breaker=breaker,
    ) as executor:
        response = await executor.run(
            "Summarize ...", ExecutionContext(workflow="docs", stage="outline")
        )

What `EmpathyLLMExecutor.run` does, in order:

1. **Tier.** ``context.tier`` if given, else the tier of ``context.task_type``
   (`empathy_models.tasks.get_tier_for_task`; unknown tasks -> capable).
2. **Candidates.** The registry's models of that tier whose provider is configured
   and has an API key, cheapest first.  Providers without a key are not routed to:
   the executor warns once when built (`MissingAPIKeyWarning`), and every routing
   decision lists their models as excluded with that reason.  When the task's tier
   has no candidate, the next more capable tier that has one is used (then the
   nearest less capable one), stated in the decision's reason and logged once; an
   explicit ``context.tier`` without candidates raises `ConfigurationError`, which
   says which ``tier=``, ``task_type=`` or ``model=`` would work.
3. **First route.** A pinned ``context.model``; else the router's pick (when a router is
   given; models whose breaker is known to be open are passed as ``unavailable``; when
   every candidate of the tier is known to be open the router is not asked and the
   breakers decide); else the cheapest candidate whose breaker is not known to be open.
4. **Fallback order** (always towards *more* capable, never cheaper): the remaining
   candidates of the same tier, cheapest first, then, with ``FallbackPolicy.escalate``,
   the models of each higher tier (cheap -> capable -> premium).  A model is never
   tried twice in one run, and at most ``FallbackPolicy.max_routes`` models are called
   (a model counts once a call to it was sent, a retry the limiter refused included).
5. **Per route.** The breaker admits through the model's key and, when keys are per
   model (the default), the provider's key too (a `CircuitOpenError` from either moves
   to the next route without calling the provider; the provider key hears only
   provider-wide outcomes, see `empathy_models.breaker.provider_outcome`); the provider
   is called under the per-attempt ``context.timeout`` and the overall
   ``context.deadline``; retryable failures (`RetryPolicy.is_retryable`) are retried on
   the same route after the policy's delay, honouring ``Retry-After``.
6. **Decisions on failure.**

   ======================================  ==============================================
   error                                   what happens
   ======================================  ==============================================
   timeout, connection, 5xx, 429           retried on the route, then the next route
   429 whose Retry-After exceeds the cap   next route at once (no sleeping)
   any retryable failure after which the   next route at once (no sleeping): the
   route's circuit is open (a 429's        breaker would refuse the retry; retried
   Retry-After opens it)                   when no later route may be tried
   401, 402, 403, 404                      next route at once (no retry); a 404 (or a
                                           403 ``model_not_found``) names one model, so
                                           it is reported to a breaker key shared by
                                           the provider's models as ignored, not fatal
   no API key configured (local; only a    next route at once; recorded as
   pinned model gets here)                 ``not_sent``, which neither the router nor
                                           the breaker counts (not the provider's fault)
   request not built (local: aiohttp       next route at once; a `ConfigurationError`,
   refused it, nothing sent)               recorded as ``not_sent`` like a missing key
   malformed response, unknown error       next route at once (no retry)
   breaker open                            next route, provider not called
   a budget cannot cover the call          a cheaper model that fits, else
                                           `BudgetExceededError` (after routes that
                                           failed: `AllRoutesFailedError`, it last)
   400, content policy                     raised at once: a bad request stays bad
   context window exceeded                 next route with a larger context window,
                                           if ``FallbackPolicy.larger_context_on_overflow``
                                           and one remains; else raised at once
   overall deadline passed                 `AllRoutesFailedError` at once; a call the
                                           deadline cut short (not the per-attempt
                                           timeout) before it had 5 s is recorded as
                                           ``cancelled``, later as its timeout
   every route failed                      `AllRoutesFailedError` with every error
   ======================================  ==============================================

7. **Feedback.** Every attempt, including breaker rejections and cancellations, produces
   one `LLMCallRecord` (shared ``request_id``, ``attempt`` numbered 1.. across the whole
   run), which goes to the breaker (for admitted attempts), to the router's
   ``record_outcome`` and to the telemetry backend.  Feedback never fails the request:
   errors are logged on ``empathy_models.executor`` and counted (``telemetry_errors``,
   ``feedback_errors``).  A write-behind backend (the SQLite default batches) accepts a
   record at once and reports its own later write failures on the
   ``empathy_models.telemetry`` logger and in its ``failed`` counter instead.

The context is never mutated; the executor keeps no per-request state on itself, so
any number of `run` calls may proceed concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    AsyncExitStack,
    nullcontext,
)
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Never, Protocol, Self, cast

import anyio

from ._attempt import Attempts
from ._feedback import _Feedback, flush_borrowed
from ._inflight import CLOSE_WAIT, InFlight
from ._loops import close_at_home, dropped, elsewhere
from ._outage import Outage
from ._planner import _Planner
from ._request_options import (
    required_capabilities,
    run_options,
)
from ._run import (
    Prompt,
    _Run,
    _to_messages,
)
from ._setup import (
    NO_TELEMETRY,
    checked,
    checked_breaker,
    config_arguments,
    index_limits,
    index_providers,
    keyless_message,
    keyless_of,
    limiter_for,
)
from ._validators import MACHINERY, warn_at_site, warn_caller
from ._values import (
    SAMPLED,
    AttemptSummary,
    ExecutionContext,
    FallbackPolicy,
    LLMResponse,
    context_of,
    uncached,
)
from .abc import (
    Completion,
    Provider,
    QuotaStore,
    ResponseCache,
    TelemetryBackend,
)
from .backends import telemetry_from_url
from .breaker import CircuitBreaker
from .cache import cache_from_url
from .content import ResponseFormat, Tool
from .exceptions import (
    ConfigurationError,
    ConfigurationWarning,
    NotOpenError,
)
from .limits.guard import Limiter
from .limits.values import Budget, RateLimit
from .observability import instrumentation_for
from .records import (
    LLMCallRecord,
    Outcome,
    RoutingDecision,
    Ticket,
)
from .registry import ModelRegistry
from .retry import RetryPolicy

if TYPE_CHECKING:
    import aiohttp

    from .streaming import StreamManager

_open_stream: Callable[..., StreamManager] | None = None  # streaming.py, imported on first use

__all__ = [
    "AttemptSummary",
    "EmpathyLLMExecutor",
    "ExecutionContext",
    "FallbackPolicy",
    "LLMResponse",
    "MissingAPIKeyWarning",
    "Prompt",
    "TelemetryDisabledWarning",
]

logger = logging.getLogger("empathy_models.executor")
_cache_logger = logging.getLogger("empathy_models.cache")
_NOT_LEADING: AbstractContextManager[None] = nullcontext()  # see `_cached.Flight`
_SKIP = "calls skip the cache"

# the running event loop, or None (``asyncio.get_running_loop`` without the exception)
_running_loop = asyncio._get_running_loop

_ERROR_MESSAGE_LIMIT = 300

JSONScalar = str | int | float | bool | None
Sleep = Callable[[float], Awaitable[object]]
Clock = Callable[[], float]


class MissingAPIKeyWarning(ConfigurationWarning):
    """
    A configured provider has no API key, so its models are not routed to.

    Emitted once per executor, at construction, naming each such provider and the
    environment variable it reads.  Its models still appear in every routing decision,
    excluded with the reason.  Pass ``api_key=`` or set the variable, or leave the
    provider out of ``providers`` to silence it.
    """


class TelemetryDisabledWarning(ConfigurationWarning):
    """
    The executor was built without a telemetry store: calls work, records are not kept.

    Emitted once per executor, at construction.  Pass ``telemetry_store=`` (a backend or
    a URL such as ``"sqlite:///calls.db"``), or ``NullTelemetryBackend()`` to opt out
    explicitly and silence it.
    """


def _warn_once(
    providers: Mapping[str, Provider],
    keyless: frozenset[str],
    telemetry: TelemetryBackend | None,
) -> None:
    """A new executor's warnings: providers without a key, no telemetry store."""
    if not keyless and telemetry is not None:
        return
    level = _builders_level()
    given: list[tuple[str, type[Warning]]] = []
    if keyless:
        message = keyless_message(providers, keyless)
        logger.warning("%s", message)
        given.append((message, MissingAPIKeyWarning))
    if telemetry is None:
        given.append((NO_TELEMETRY, TelemetryDisabledWarning))
    for message, category in given:
        # built on an event loop (SyncExecutor's): at the line that asked for it
        if level is not None or not warn_at_site(message, category):
            warnings.warn(message, category, stacklevel=level or 3)


def _builders_level() -> int | None:
    """
    The ``stacklevel`` of a warning `_warn_once` gives, for the line of the code that
    built the executor: the first frame outside this package past the constructor
    (``from_config`` is skipped); ``None`` when the package's frames lead back to the
    event loop or a thread (`SyncExecutor` builds it on its own loop; its caller's line
    is `caller_site`).
    """
    frame = sys._getframe(3)  # the constructor's caller (0: here, 1: _warn_once, 2: __init__)
    level = 3
    while frame.f_globals.get("__name__", "").startswith("empathy_models."):
        back = frame.f_back
        if back is None or back.f_globals.get("__name__", "").startswith(MACHINERY):
            return None
        frame, level = back, level + 1
    return level


# --------------------------------------------------------------------------- collaborators


class _Router(Protocol):
    """**Protocol:** what the executor calls on a router (`AdaptiveModelRouter`)."""

    def get_best_model(
        self,
        workflow: str,
        stage: str,
        *,
        candidates: Sequence[str] | None = ...,
        input_tokens: int | None = ...,
        max_tokens: int | None = ...,
        max_cost: float | None = ...,
        max_latency_ms: float | None = ...,
        min_success_rate: float | None = ...,
        on_no_match: str = ...,
        unavailable: Collection[str] = ...,
        max_ttft_ms: float | None = ...,
    ) -> RoutingDecision: ...

    def record_outcome(self, record: LLMCallRecord) -> None: ...


class _Breaker(Protocol):
    """**Protocol:** what the executor calls on a circuit breaker (`CircuitBreaker`)."""

    def key_for(self, provider: str, model: str | None = ...) -> str: ...

    async def admit(self, key: str) -> Ticket: ...

    async def report(
        self,
        ticket: Ticket,
        outcome: Outcome,
        *,
        retry_after: float | None = ...,
        error: str | None = ...,
    ) -> Any: ...

    def available_hint(self, key: str) -> bool: ...


_CACHED: Any = None


def _cached_module() -> Any:
    """`empathy_models._cached`, imported at the first call that uses the cache."""
    global _CACHED
    if _CACHED is None:
        from . import _cached

        _CACHED = _cached
    return _CACHED


async def _read_cache(executor: EmpathyLLMExecutor, ctx: ExecutionContext, *request: Any) -> Any:
    """
    `_cached.read_or_lead`'s ``(hit, key, flight)`` for a run whose context sets
    ``cache_ttl``; none, and a warning once per executor (`uncached`), without a cache
    to read, and the warning for a request not cached because it samples (no ``key``).
    """
    if executor._cache is None:
        uncached(executor)
        return None, None, None
    hit, key, flight = await _cached_module().read_or_lead(executor, ctx, *request)
    if hit is None and key is None:
        uncached(executor, SAMPLED)
    return hit, key, flight


# --------------------------------------------------------------------------- the executor


def _entered_again(state: str) -> NotOpenError:
    if state == "open":
        return NotOpenError(
            "EmpathyLLMExecutor is already open: enter it once (one 'async with' block), "
            "and share it, or build another for another block"
        )
    return NotOpenError("EmpathyLLMExecutor is closed and cannot be entered again; build a new one")


SYNC_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
"""The event loops `SyncExecutor` runs (each its own executor's, opened there)."""


def _not_open(state: str, home: asyncio.AbstractEventLoop | None = None) -> NotOpenError:
    # outside ``async with`` (``state`` is "new" or "closed"), or in another event loop
    if state == "new":
        return NotOpenError(
            "EmpathyLLMExecutor has not been opened yet: run and stream inside "
            "`async with EmpathyLLMExecutor(...) as executor:` (synchronous code: "
            "empathy_models.sync.SyncExecutor, which opens itself)"
        )
    if state != "open":
        return NotOpenError(
            "EmpathyLLMExecutor is closed (aclose() was called, or its `async with` block "
            "ended) and cannot be opened again: build a new EmpathyLLMExecutor for more calls"
        )
    if home in SYNC_LOOPS:
        return NotOpenError(
            "EmpathyLLMExecutor is a SyncExecutor's, run on that SyncExecutor's own event "
            "loop, and cannot be awaited in another (its HTTP session and stores are bound "
            "to that loop): call the SyncExecutor instead, `llm.run(...)` (it blocks this "
            "loop until the answer), or `llm.call(fn, ...)` for another coroutine"
        )
    return NotOpenError(
        "EmpathyLLMExecutor was opened in another event loop and can only be used in that "
        "one (its HTTP session and stores are bound to it): open one per event loop, e.g. "
        "inside each asyncio.run(), or use empathy_models.sync.SyncExecutor, whose loop "
        "outlives the calls"
    )


def _session_here(
    session: aiohttp.ClientSession | None, limits: Mapping[str, int]
) -> aiohttp.ClientSession | None:
    """
    A borrowed ``session``, refused when made in another loop than the running one;
    a connection pool smaller than the calls ``limits`` (`concurrency_per_provider`)
    let in flight is logged (`_pool_too_small`).
    """
    home = getattr(session, "_loop", None)  # aiohttp's; a session-like without it passes
    if home is not None and home is not _running_loop():
        # its connector and timeouts are bound to that loop: every request would fail,
        # recorded as the model's failure
        raise ConfigurationError(
            "session= is an aiohttp.ClientSession created in another event loop than the "
            "one the executor is opened in, where it cannot send requests: create it in "
            "that loop (for SyncExecutor: leave session= out, and it makes its own)"
        )
    if session is not None:
        _pool_too_small(session, limits)
    return session


def _pool_too_small(session: aiohttp.ClientSession, limits: Mapping[str, int]) -> None:
    """
    Log a warning when ``session``'s connector holds fewer connections (``limit``, or
    ``limit_per_host`` for one provider) than the calls ``limits`` let in flight: the
    calls beyond would wait for a connection inside their attempt, the wait counted
    against their timeout, and a timeout recorded as the model's failure.
    """
    connector = getattr(session, "connector", None)
    pool = getattr(connector, "limit", 0) or 0
    per_host = getattr(connector, "limit_per_host", 0) or 0
    calls, most = sum(limits.values()), max(limits.values(), default=0)
    if (isinstance(pool, int) and 0 < pool < calls) or (
        isinstance(per_host, int) and 0 < per_host < most
    ):
        message = (
            f"session=: its connector allows {pool} connection(s) in all and {per_host} per "
            f"host (0: no limit), fewer than the {calls} call(s) concurrency_per_provider "
            f"lets in flight ({most} for one provider): the calls beyond wait for a "
            "connection within their attempt, the wait counted against their timeout (a "
            "timeout recorded as the model's failure); raise the connector's limit or lower "
            "concurrency_per_provider"
        )
        logger.warning("%s", message)
        warn_caller(message)  # at the caller's `async with`: seen without logging set up


def _borrow_telemetry(stack: AsyncExitStack, fb: _Feedback) -> None:
    """
    Take the borrowed telemetry backend, flushed when ``stack`` closes: refused when
    bound to another event loop than the running one.
    """
    backend = fb._telemetry
    assert backend is not None
    if not elsewhere(backend._home_loop()):
        stack.push_async_callback(flush_borrowed, fb)
        return
    # its flusher runs there: records queued from here would wait for that loop (blocked,
    # for a notebook cell that built a SyncExecutor), and so would the flush on exit
    if _running_loop() in SYNC_LOOPS:
        fix = (
            "pass its URL instead (telemetry_store='sqlite:///calls.db'), and SyncExecutor "
            "opens and closes it on its own event loop"
        )
    else:
        fix = (
            "open the executor in that loop, or pass the backend's URL, and the executor "
            "opens and closes one of its own"
        )
    raise NotOpenError(
        f"telemetry_store={backend!r} was opened in another event loop and can only be "
        f"used in that one (its background flusher runs there): {fix}"
    )


async def _close_elsewhere(executor: EmpathyLLMExecutor) -> bool:
    """
    ``executor.aclose()`` from another event loop than the one it was opened in: in that
    loop if it still runs (another thread); else the runs in flight there are gone with
    it, and the session and owned backends are closed as far as they can be from here
    (the session's connections, bound to the dead loop, are dropped: a `ResourceWarning`
    says so).  Always True (closed).
    """
    home = executor._loop
    assert home is not None
    if await close_at_home(home, executor.aclose):
        return True
    executor._state = "closed"
    stack, executor._stack = executor._stack, None
    if executor._cache is not None:
        executor._cache._drop_memo()
    if stack is not None:
        try:
            await stack.aclose()
        except Exception:  # what is bound to the dead loop cannot be closed from here
            logger.debug("closing from another event loop", exc_info=True)
    dropped("EmpathyLLMExecutor", "its HTTP connections and the runs in flight", home)
    return True


async def _close_here(executor: EmpathyLLMExecutor) -> None:
    """`aclose` in the executor's own loop: end what is in flight, close what it holds."""
    executor._state = "closed"
    stack, executor._stack = executor._stack, None
    over = executor._inflight.over = asyncio.get_running_loop().create_future()
    with anyio.CancelScope(shield=True):
        try:
            await _wind_down(executor)
        finally:
            try:
                if executor._cache is not None:
                    executor._cache._drop_memo()  # the answers decoded for its hits (`_cached`)
                if stack is not None:
                    await stack.aclose()
            finally:
                over.set_result(None)


async def _close_over(executor: EmpathyLLMExecutor) -> None:
    """
    `aclose` of an executor closed already: returns once the close under way (in this
    loop) is over.  Cancelling the wait leaves that close alone.
    """
    over = executor._inflight.over
    if over is not None and not over.done() and not elsewhere(over.get_loop()):
        await asyncio.shield(over)


async def _wind_down(executor: EmpathyLLMExecutor) -> None:
    """
    End the runs and streams in flight and wait for the store operations left in the
    background, `CLOSE_WAIT` seconds in all (the owned breaker's and the limiter's own
    waits as they close included).
    """
    drain_by = asyncio.get_running_loop().time() + CLOSE_WAIT
    executor._fb.behind.drain_by = drain_by
    if executor._limiter is not None:
        executor._limiter._settler.drain_by = drain_by
    breaker = executor._breaker
    if executor._owns_breaker and isinstance(breaker, CircuitBreaker):
        breaker._settler.drain_by = drain_by
    await executor._inflight.end(drain_by - asyncio.get_running_loop().time())
    await executor._fb.behind.drain()  # cache writes behind, feedback past a deadline


async def _close_together(closers: list[Callable[[], Awaitable[None]]]) -> None:
    """
    Call every closer at once (an owned store each: the total is the longest close, not
    the sum); one that raises does not stop the others.

    Raises:
        BaseException: the first closer's error (the others' are logged).
    """
    if len(closers) < 2:
        for close in closers:
            await close()
        return
    ended = await asyncio.gather(*(close() for close in closers), return_exceptions=True)
    errors = [e for e in ended if isinstance(e, BaseException)]
    for error in errors[1:]:
        logger.error("closing a store failed", exc_info=error)
    if errors:
        raise errors[0]


class EmpathyLLMExecutor:
    """
    Routes, guards, retries, falls back and records LLM calls.

    Args:
        providers: the providers to use, as a sequence (keyed by each ``provider.name``)
            or a mapping from the provider name used in the registry to the provider.
        registry: models, tiers and prices (default `ModelRegistry.default`).  Every
            configured provider must have at least one model in it.
        telemetry_store: a `TelemetryBackend`, or a URL (``"sqlite:///calls.db"``) the
            executor opens on enter and closes on exit.  ``None`` keeps no records and
            emits one `TelemetryDisabledWarning`.
        router: an `AdaptiveModelRouter` (or anything with its ``get_best_model`` and
            ``record_outcome``); without one the cheapest candidate goes first.
        breaker: a `CircuitBreaker` (or anything with ``key_for``, ``admit``, ``report``
            and ``available_hint``), or a state-store URL (``"sqlite:///state.db"``,
            ``"redis://..."``) for a `CircuitBreaker` the executor owns; without one
            every call is admitted.
        retry: retries of one route (default `RetryPolicy()`: 3 attempts, 1 s, x2, 30 s
            cap, jitter).
        fallback: where to go when a route fails (default `FallbackPolicy()`).
        concurrency_per_provider: the most calls in flight per provider (an int for
            all, or a mapping by provider name; default 64; 1 to ``2**63 - 1``).
            Further calls wait for a slot.
        session: an ``aiohttp.ClientSession`` to borrow (not closed), made in the loop the
            executor is opened in; by default one is created on enter, closed on exit,
            whose connector holds as many connections as ``concurrency_per_provider``
            lets calls be in flight.  A borrowed one holding fewer is logged on enter:
            the calls beyond would wait for a connection within their attempt.
        sleep: the coroutine used to wait between retries and for rate-limit places
            (tests inject a recorder).
        clock: monotonic seconds, for latencies, the deadline and rate-limit waits
            (give it the time ``sleep`` keeps; a stream's end is carried over).
        wall_clock: UTC epoch seconds, for the records' timestamps (default
            `time.time`); give it the router's clock when that is not the real time,
            since the router buckets evidence by record timestamp.
        tracer_provider, meter_provider, otel: OpenTelemetry traces and metrics (the
            ``otel`` extra; see `empathy_models.observability`).  Off by default; on
            with a provider given, with ``otel=True`` (the global providers), or with
            ``EMPATHY_OTEL=1`` in the environment.
        budgets: spend limits (`empathy_models.limits.Budget`): each call reserves its
            estimate (prompt plus ``max_tokens`` at list prices) in every budget that
            covers it and settles at what it cost; a call a budget cannot cover goes to
            a cheaper candidate that fits, else `BudgetExceededError`.
        rate_limits: requests and tokens per minute (`empathy_models.limits.RateLimit`)
            by provider name or model id; a call waits for its place (at most
            ``rate_limit_wait`` seconds and the deadline), else the next route is tried.
            A registry model's ``rpm`` / ``tpm`` apply too, unless a limit is given here
            for that model id; any other name raises `ConfigurationError`.
        quota_store: where budgets and rate limits are counted: a `QuotaStore` or a URL
            (``"sqlite:///state.db"``, ``"redis://..."``, ``"postgresql://..."``) shared
            by every worker; default ``memory://`` (this process only).
        cache: a `ResponseCache` or URL (``"memory://"``, ``"sqlite:///cache.db"``,
            ``"redis://..."``) for runs and streams whose context sets ``cache_ttl``;
            see `empathy_models.cache`.

    Objects passed in (backend, router, breaker, session) are borrowed: the executor
    neither opens nor closes them (a borrowed telemetry backend is flushed on exit,
    bounded; one running in another event loop, its flusher there, is refused on enter
    with `NotOpenError`).  What it builds from a URL it owns and closes.  Use it as
    ``async with``; `run` raises `RuntimeError` outside that block.  An executor
    garbage-collected while still open emits a `ResourceWarning`.  Left open, its HTTP
    session is never closed and the work it does behind (cache writes, store operations
    past a deadline) is lost if the event loop ends first; telemetry still queued is
    written at interpreter exit (`empathy_models.backends.batching`), and an SQLite
    backend's worker thread, a daemon, does not keep the interpreter from exiting.
    Synchronous code uses `empathy_models.sync.SyncExecutor`, which closes itself.
    """

    def __init__(
        self,
        providers: Sequence[Provider] | Mapping[str, Provider],
        *,
        registry: ModelRegistry | None = None,
        telemetry_store: TelemetryBackend | str | None = None,
        router: _Router | None = None,
        breaker: _Breaker | str | None = None,
        retry: RetryPolicy | None = None,
        fallback: FallbackPolicy | None = None,
        concurrency_per_provider: int | Mapping[str, int] = 64,
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep = anyio.sleep,
        clock: Clock = time.perf_counter,
        wall_clock: Clock = time.time,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        otel: bool | None = None,
        budgets: Sequence[Budget] | Budget | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        quota_store: QuotaStore | str | None = None,
        rate_limit_wait: float = 30.0,
        cache: ResponseCache | str | None = None,
    ) -> None:
        self._registry = checked(registry, ModelRegistry.default, ModelRegistry, "registry")
        self._providers = index_providers(providers, self._registry)
        self._retry = checked(retry, RetryPolicy, RetryPolicy, "retry")
        self._fallback = checked(fallback, FallbackPolicy, FallbackPolicy, "fallback")
        self._limits = index_limits(concurrency_per_provider, self._providers)
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._router = router
        self._owns_breaker = isinstance(breaker, str)
        self._breaker: _Breaker | None = (
            CircuitBreaker(store=breaker) if isinstance(breaker, str) else checked_breaker(breaker)
        )
        self._session = session
        self._sleep = sleep
        self._clock, self._wall_clock = clock, wall_clock
        self._owns_telemetry = isinstance(telemetry_store, str)
        self._telemetry: TelemetryBackend | None = (
            None if telemetry_store is None else telemetry_from_url(telemetry_store)
        )
        self._keyless = keyless_of(self._providers)  # not routed to (see keyless_of)
        # resources built by `from_config` for this executor: entered first, closed last
        self._owned: tuple[AbstractAsyncContextManager[Any], ...] = ()
        self._stack: AsyncExitStack | None = None
        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it was opened in
        self._inflight = InFlight()  # the runs and streams `aclose` ends first
        self._fb = _Feedback(
            registry=self._registry,
            router=self._router,
            breaker=self._breaker,
            telemetry=self._telemetry,
            clock=self._clock,
            wall_clock=self._wall_clock,
        )
        # OpenTelemetry (None when off): `run` becomes the instrumentation's wrapper
        self._obs = instrumentation_for(otel, tracer_provider, meter_provider, self._providers)
        if self._obs is not None:
            self.__dict__["run"] = self._obs.wrap(self.run)
        self._owns_cache = isinstance(cache, str)
        self._cache: ResponseCache | None = None if cache is None else cache_from_url(cache)
        # cache reads or writes failed or late (the call went on); skipped while degraded
        self.cache_errors = self.cache_skipped = 0
        self._cache_outage = Outage(_cache_logger, f"response cache {self._cache!r}", _SKIP)
        self._cache_pending: dict[str, tuple[int, bytes]] = {}  # (generation, value): `_cached`
        self._limiter = limiter_for(
            self._registry,
            self._providers,
            budgets,
            rate_limits,
            quota_store,
            max_wait=rate_limit_wait,
            sleep=sleep,
            wall_clock=wall_clock,
            clock=clock,
        )
        self._planner = self._new_planner()
        _warn_once(self._providers, self._keyless, self._telemetry)

    def _new_planner(self) -> _Planner:
        """The executor's planner (a failed breaker hint is counted by the feedback)."""
        return _Planner(
            registry=self._registry,
            providers=self._providers,
            keyless=self._keyless,
            router=self._router,
            breaker=self._breaker,
            limiter=self._limiter,
            escalate=self._fallback.escalate,
            on_hint_error=self._fb.hint_failed,  # no cycle through the planner
        )

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        router: bool | _Router | None = True,
        **options: Any,
    ) -> EmpathyLLMExecutor:
        """
        An executor built from ``empathy.toml`` (see `empathy_models.config`).

        It owns what it builds: the file's providers, registry, telemetry backend, breaker
        and (with ``router=True``) an `AdaptiveModelRouter` over the same telemetry, opened
        on enter and closed on exit.  The router reads the backend the executor writes (a
        ``telemetry_store`` URL is built once; a given router's ``memory://`` backend is lent).

        Args:
            path: the file; by default found like the CLI finds it (``EMPATHY_CONFIG``,
                ``./empathy.toml``, ``$EMPATHY_HOME/empathy.toml``; none: the defaults,
                telemetry and breaker state in ``$EMPATHY_HOME/empathy.db``).
            router: ``True`` builds the router; ``False`` or ``None``: no router; a
                router object (an `AdaptiveModelRouter`) is used as given, borrowed
                like every object passed in (the caller opens and closes it).
            **options: constructor arguments (``retry=``, ``fallback=``, ...); they win.

        Raises:
            ConfigurationError: an invalid file.
        """
        providers, arguments, owned = config_arguments(path, router, options)
        executor = cls(providers, **arguments)
        executor._owned = owned
        return executor

    # ------------------------------------------------------------------ properties

    @property
    def telemetry_errors(self) -> int:
        """Telemetry writes that failed (logged, never raised into a request)."""
        return self._fb.telemetry_errors

    @telemetry_errors.setter
    def telemetry_errors(self, value: int) -> None:
        self._fb.telemetry_errors = value

    @property
    def feedback_errors(self) -> int:
        """Router or breaker feedback calls that failed (logged, never raised)."""
        return self._fb.feedback_errors

    @feedback_errors.setter
    def feedback_errors(self, value: int) -> None:
        self._fb.feedback_errors = value

    @property
    def telemetry_enabled(self) -> bool:
        """True when records are kept (a backend other than the null one was given)."""
        return self._telemetry is not None and self._telemetry.stores_records

    @property
    def telemetry_store(self) -> TelemetryBackend | None:
        return self._telemetry

    @property
    def limiter(self) -> Limiter | None:
        """
        The budgets and rate limits in force (`empathy_models.limits.Limiter`: its ``store``,
        ``degraded``, ``degraded_events``, ``store_errors``, ``unsettled`` and
        ``unadjusted``), or None.
        """
        return self._limiter

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    @property
    def providers(self) -> Mapping[str, Provider]:
        return MappingProxyType(self._providers)

    def __repr__(self) -> str:
        return (
            f"EmpathyLLMExecutor(providers={sorted(self._providers)}, state={self._state}, "
            f"telemetry={self._telemetry!r})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise _entered_again(self._state)
        stack = AsyncExitStack()
        try:
            for resource in self._owned:
                await stack.enter_async_context(resource)
            if self._telemetry is not None:
                if self._owns_telemetry:
                    await stack.enter_async_context(self._telemetry)
                else:
                    _borrow_telemetry(stack, self._fb)
            stores: list[Callable[[], Awaitable[None]]] = []  # closed together, at close
            stack.push_async_callback(_close_together, stores)
            if self._owns_breaker:
                assert isinstance(self._breaker, CircuitBreaker)
                await self._breaker.__aenter__()
                stores.append(self._breaker.aclose)
            if self._limiter is not None:
                await self._limiter.open()
                stores.append(self._limiter.aclose)
            if self._cache is not None and self._owns_cache:
                await self._cache.__aenter__()
                stores.append(self._cache.aclose)
            # the calls that may be in flight: a provider without a key sends none
            sent = {n: limit for n, limit in self._limits.items() if n not in self._keyless}
            session = _session_here(self._session, sent)
            if session is None:
                import aiohttp  # loaded here, not by `import empathy_models`

                connector = aiohttp.TCPConnector(limit=sum(self._limits.values()))
                # no trust_env: each provider reads its proxy from the environment once,
                # when bound (aiohttp's trust_env would look it and ~/.netrc up in a
                # worker thread on every request)
                session = aiohttp.ClientSession(connector=connector)
                stack.push_async_callback(session.close)
            for provider in self._providers.values():
                await provider.bind(session)
                stack.push_async_callback(provider.unbind)
            self._semaphores = {
                name: asyncio.Semaphore(limit) for name, limit in self._limits.items()
            }
            if self._obs is not None:
                self._obs.bind(self._breaker, self._telemetry, self._clock)
                stack.callback(self._obs.unbind)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._loop = _running_loop()
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """
        End the runs and streams in flight, then unbind providers, close the session and
        owned backends, and drop the answers decoded for cache hits.  Safe to call twice;
        a call while another is closing the executor returns once that one is over.

        Each run or stream in flight raises `NotOpenError` (at once; a stream nobody is
        reading, at its next read) after its attempt is recorded as cancelled, its breaker
        lease given back and its budget reservation settled (given back when its call
        was not sent, else charged: `_feedback.charge_given_up`); a run whose answer
        came already returns it.  That bookkeeping, the cache's writes behind and store
        operations left at a deadline or by a cancelled run are waited for first,
        `CLOSE_WAIT` seconds (10) in all.  Then the owned breaker, quota and
        cache stores close together, each within its own bound (a stalled store adds its
        close timeout once, not once per store), and the telemetry backend last (it
        flushes within its ``close_timeout``).  A cancelled anyio scope around the
        ``async with`` does not stop these steps halfway (each is bounded).
        """
        if self._state == "closed":
            await _close_over(self)
        elif not (elsewhere(self._loop) and await _close_elsewhere(self)):
            await _close_here(self)

    def __del__(self) -> None:
        # an executor left open holds an HTTP session and, for URLs it was given, backends
        # whose pending work is only written at interpreter exit, if at all: say so, like
        # an unclosed file (shown with `python -X dev` or `-W default`, errors under pytest)
        if getattr(self, "_state", None) != "open":
            return
        # a plain try (not contextlib.suppress): at interpreter shutdown module globals
        # may already be torn down, and a __del__ must not raise
        try:  # noqa: SIM105
            warnings.warn(
                f"unclosed {self!r}: use 'async with EmpathyLLMExecutor(...) as executor:' "
                "or 'await executor.aclose()' (or empathy_models.sync.SyncExecutor in "
                "synchronous code)",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )
        except Exception:  # pragma: no cover - interpreter shutdown: modules torn down
            pass

    # ------------------------------------------------------------------ the call

    def _check_open(self) -> None:
        # one identity check: the loop it was opened in (its HTTP session, its backends'
        # tasks and connections belong to that loop)
        if self._state != "open" or _running_loop() is not self._loop:
            raise _not_open(self._state, self._loop)

    async def run(
        self,
        prompt: Prompt,
        context: ExecutionContext | None = None,
        *,
        tools: Sequence[Tool | Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        stop: str | Sequence[str] | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **unknown: Never,
    ) -> LLMResponse:
        """
        Answer ``prompt`` with the best available model; see the module docs for the flow.

        Safe to call concurrently from many tasks.  Cancellation is recorded (outcome
        ``cancelled``, breaker lease returned) and re-raised untouched.

        Args:
            prompt: a string (one user message) or a list of `Message` objects (content
                blocks, tool calls and results included) and OpenAI-style ``{"role": ...,
                "content": ...}`` dicts; ``"system"`` messages become the system prompt
                (after ``context.system``).
            context: the run's `ExecutionContext`.
            tools, tool_choice: functions offered to the model (`Tool` objects or either
                API's tool dicts; ``"auto"``, ``"none"``, ``"required"`` or a tool's name,
                or either API's own object for one of them); its calls are in
                `LLMResponse.tool_calls`.
            response_format: a JSON Schema or `ResponseFormat` (JSON answers: `LLMResponse.parsed`).
            stop, top_p, seed: sent to the provider (Anthropic has no seed: not sent there).
            extra_body: merged into every route's JSON body (not model, messages, stream; n=1).
            unknown: none is taken: ``temperature=``, ``max_tokens=``, ``model=`` and the
                other run settings are `ExecutionContext`'s; the error says where each goes.

        Raises:
            ConfigurationError: bad values (a malformed message names its position), before
                any call; or no model can serve the context.
            TypeError: a keyword argument ``run`` does not take (``unknown``).
            AllRoutesFailedError: no route answered or the deadline passed (an
                `ExceptionGroup` holding every attempt's error, in order).
            InvalidRequestError: the provider's (400, content policy, or a context window no
                remaining route can hold), at once.
            NoModelMeetsConstraintsError: the router's policy says so.
            NotOpenError: outside ``async with``, in another event loop, or ended by `aclose`.
        """
        self._check_open()
        with self._inflight.track("run") as tracked:  # `aclose` ends it with NotOpenError
            ctx = context_of(context)
            messages, system = _to_messages(prompt, ctx.system)
            options = run_options(
                tools, tool_choice, response_format, stop, top_p, seed, extra_body, unknown, "run"
            )
            start = self._clock() if self._obs is None else self._obs.began()
            deadline_at = None if ctx.deadline is None else start + ctx.deadline
            task_type, tier = self._planner.task(ctx.task_type, ctx.tier)
            needs = required_capabilities(messages, options)
            cache_key, lead = None, _NOT_LEADING
            if ctx.cache_ttl is not None:
                hit, cache_key, flight = await _read_cache(
                    self, ctx, task_type, messages, system, options, start, deadline_at
                )
                if hit is not None:
                    return cast(LLMResponse, hit)
                lead = flight or lead
            with lead:  # a run asking for others too wakes them however it ends
                run = _Run(ctx, messages, task_type, system, options)
                routes = run.planned(self._planner.plan(run, tier, needs))
                if self._obs is not None:
                    self._obs.planned(run)
                info, reply = await Attempts(self, run, deadline_at, tracked=tracked).walk(routes)
                answer = self._fb.response(
                    run, info, cast(Completion, reply), start, run.attempts_cost
                )
                if cache_key is not None:
                    await _cached_module().store(self, cache_key, answer, ctx)
                return answer

    def stream(
        self,
        prompt: Prompt,
        context: ExecutionContext | None = None,
        *,
        tools: Sequence[Tool | Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        stop: str | Sequence[str] | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **unknown: Never,
    ) -> StreamManager:
        """
        Answer ``prompt`` as a stream of text deltas; see `empathy_models.streaming`.

        ::

            async with executor.stream("...", ExecutionContext(workflow="chat")) as stream:
                async for delta in stream:
                    print(delta, end="")
                response = await stream.get_final_response()

        Same routing, breaker, retries, fallback, deadline, records and response cache
        as `run`: failures before the first delta are retried or fall back; leaving the
        block early closes the response and records the attempt as ``cancelled``.
        ``context.timeout`` bounds the first byte and each gap between chunks.  With
        ``context.cache_ttl``, the cache is read before any routing, as by `run`: a hit is
        replayed as a stream, no routing decision made; a stream that ended whole is stored.
        Unlike `run`, a stream is not coalesced with identical calls in flight: it asks a
        model for its first delta, and no run waits for a stream (read at its caller's pace).

        Args:
            prompt, context, tools, ...: `run`'s, checked the same way; with ``tools``,
                ``stream.events()`` yields the tool calls' pieces (`ToolCallDelta`) beside
                the text, and the final response has them parsed in ``tool_calls``.

        Raises:
            ConfigurationError: bad input, here, before anything is sent.
            TypeError: a keyword argument ``stream`` does not take, as for `run`.
            NoModelMeetsConstraintsError, ConfigurationError: no route (the router's policy,
                no model able): here, or from ``async with`` after a cache miss when the
                cache may answer (see `empathy_models.streaming`).
            AllRoutesFailedError: from ``async with``, when no route answers.
            StreamInterruptedError: a failure after the first delta (with the partial text).
        """
        options = run_options(
            tools, tool_choice, response_format, stop, top_p, seed, extra_body, unknown, "stream"
        )
        global _open_stream
        opener = _open_stream
        if opener is None:
            from .streaming import open_stream

            opener = _open_stream = open_stream
        return opener(self, prompt, context, options)
