"""
The attempt runner `EmpathyLLMExecutor.run` and `EmpathyLLMExecutor.stream` share:
`Attempts.walk` tries the planned routes in order (fallback, a cheaper route when a
budget refuses, a larger context window after an overflow, the deadline);
`Attempts.route` makes one route's attempts (a provider slot within the deadline, budgets
and rate limits, the breaker's admission, the call, its feedback through `_Feedback`,
and whether to retry).

A run's attempt is ``provider.complete``; a stream's opens the stream and reads up to its
first delta (`Opened`), then keeps the provider slot and the limiter's hold for the rest
of the stream (`empathy_models.streaming`).  Everything else is one code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Final, NoReturn

import anyio
import attrs

from ._feedback import charge_given_up
from ._inflight import UNTRACKED
from ._planner import TIER_ORDER
from ._request_options import required_capabilities
from ._run import _DeadlineExceeded, _describe, _request_for, _Run
from ._settled import Expired
from .abc import AttemptTimeout, Completion, CompletionRequest, CompletionStream, Provider
from .exceptions import (
    AllRoutesFailedError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigurationError,
    ContextWindowExceededError,
    InvalidResponseError,
    ModelNotFoundError,
    ProviderTimeoutError,
)
from .limits.guard import DeadlineRanOut, Hold, Limiter, LocalRateLimitError
from .outcomes import retry_after_of
from .providers._wire import is_own_timeout
from .records import LLMCallRecord, Outcome, Ticket

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ._executor import EmpathyLLMExecutor, _Breaker
    from ._feedback import _Feedback
    from ._inflight import Tracked, _Untracked
    from .content import ToolCallDelta
    from .observability import _RunTrace
    from .registry import ModelInfo

__all__: list[str] = []

logger = logging.getLogger("empathy_models.executor")

_ERROR_MESSAGE_LIMIT: Final = 300
_SLACK: Final = 0.002  # a timer may fire up to the loop's clock resolution early

STARVED_SECONDS: Final = 5.0
"""
A call the run's deadline cut short after less than this is recorded as cancelled, which
neither the breaker nor the router counts: what it was left says nothing of the model
(a fallback left a few milliseconds).  Cut after this long or more, it is the model's
timeout, so a model that hangs is still found out by runs whose deadline is short.
"""


@attrs.define(slots=True, eq=False)
class Opened:
    """
    A streamed attempt that produced its first delta (``first``; None: it ended empty),
    with what it holds until the stream ends: the breaker's tickets and the limiter's
    ``hold`` (and the provider slot).  ``t0`` is when it was sent, ``at`` when it opened.
    """

    stream: CompletionStream
    first: str | ToolCallDelta | None
    ticket: Ticket | None
    scope_ticket: Ticket | None
    hold: Hold | None
    attempt: int
    t0: float
    at: float


class Failed:
    """
    How a route failed (`Attempts.route` returns it instead of an answer): whether the
    provider was called, and whether the context window overflowed (a larger one may
    serve).  Only the module's three constants exist: an answer costs no allocation.
    """

    __slots__ = ("called", "overflow")

    def __init__(self, called: bool, overflow: bool = False) -> None:
        self.called = called
        self.overflow = overflow

    def __repr__(self) -> str:
        return f"Failed(called={self.called}, overflow={self.overflow})"


_NO_TICKETS: Final[tuple[Ticket | None, Ticket | None]] = (None, None)
_NOT_CALLED: Final = Failed(False)
_CALLED: Final = Failed(True)
_OVERFLOWED: Final = Failed(True, overflow=True)


# --------------------------------------------------------------------------- the runner


class Attempts:
    """
    One run's attempts: `walk` tries the routes, `route` one route with its retries.
    Made per run (``streamed`` for a stream's, whose hooks get its ``trace``); never
    shared between runs.  A run's ``tracked`` (`InFlight.track`) is told when its answer
    came, so that `EmpathyLLMExecutor.aclose` lets it return that answer.
    """

    __slots__ = (
        "deadline_at",
        "ex",
        "obs",
        "partial",
        "run",
        "slot_out",
        "streamed",
        "trace",
        "tracked",
        "walked",
    )

    def __init__(
        self,
        ex: EmpathyLLMExecutor,
        run: _Run,
        deadline_at: float | None,
        trace: _RunTrace | None = None,
        streamed: bool = False,
        tracked: Tracked | _Untracked = UNTRACKED,
    ) -> None:
        self.ex = ex
        self.run = run
        self.deadline_at = deadline_at
        self.trace = trace
        self.streamed = streamed
        self.tracked = tracked
        self.slot_out = False  # the route's slot let go while it waits for rate limits
        # a stream's hooks need its trace (it has one whenever the executor is instrumented)
        self.obs = ex._obs if trace is not None or not streamed else None
        # what a stream that opened had when it failed before its first delta (its usage
        # is recorded): set by `_first_delta`, taken by the attempt's record
        self.partial: Completion | None = None
        # the routes `walk` tries and how many it called before the one being tried
        self.walked: tuple[list[ModelInfo], int] = ([], 0)

    async def walk(self, routes: list[ModelInfo]) -> tuple[ModelInfo, Completion | Opened]:
        """
        Try ``routes`` in order until one answers (a budget may put a cheaper route next
        in the list).

        Returns:
            The answering model and its answer (`Completion`; `Opened` when streamed).

        Raises:
            AllRoutesFailedError: every route failed (a budget's refusal of a route
                in its place among them), or the deadline passed.
            InvalidRequestError: the provider's, at once: the request is bad, or no
                remaining route holds its context.
            BudgetExceededError: a budget refuses and no cheaper candidate fits.
        """
        ex, run, obs = self.ex, self.run, self.obs
        ctx = run.context
        called_routes = 0
        min_context = 0
        reprobed = _reprobed(self)
        try:
            for info in routes:
                if called_routes >= ex._fallback.max_routes:
                    break
                if info.context_window <= min_context:
                    continue
                if run.chain:
                    logger.info(
                        "%s/%s falling back from %s to %s",
                        ctx.workflow,
                        ctx.stage,
                        run.chain[-1],
                        info.id,
                    )
                    if obs is not None:
                        obs.fallback(run, info, self.trace)
                run.chain.append(info.id)
                # a re-probe that fails is not retried when another route can answer: the
                # request does not wait for the router's measurement of a degraded model
                probe = info.id == reprobed and self._can_fall_back(info, routes, called_routes)
                self.walked = (routes, called_routes)
                try:
                    tried = await self.route(info, probe=probe)
                except BudgetExceededError as refused:
                    # a budget cannot cover this model: a cheaper route, a later one it
                    # does not cover, or raise; the refusal joins the run's errors
                    run.chain.pop()
                    if not self.cheaper_route(info, refused, routes):
                        raise _refused(run, refused) from None
                    run.errors.append(refused)
                    continue
                except LocalRateLimitError as busy:
                    run.errors.append(busy)  # no capacity in time: the next route
                    continue
                if not isinstance(tried, Failed):
                    return info, tried
                called_routes += tried.called
                if tried.overflow:
                    min_context = info.context_window
                    if not any(
                        m.context_window > min_context for m in routes[routes.index(info) + 1 :]
                    ):
                        raise run.errors[-1]
        except _DeadlineExceeded as exc:
            if exc.error is not None:
                run.errors.append(exc.error)
            raise _deadline_passed(run) from None
        raise _all_failed(run)

    def cheaper_route(
        self, refused: ModelInfo, error: BudgetExceededError, routes: list[ModelInfo]
    ) -> bool:
        """
        Put the most capable candidate cheaper than ``refused`` whose estimate fits what
        the budget has left, or that the budget does not cover (one of a model, a
        provider), next in ``routes`` (the decision says why): one that can serve the
        request (`_needs_of`).  The budgets covering it judge it when it is admitted.

        Returns:
            False when no candidate fits and no later route is outside the budget.  The
            log and the run's decision say where the refusal sends the run.
        """
        ex, run = self.ex, self.run
        limiter = ex._limiter
        assert limiter is not None
        tokens = run.estimate()
        tried = {*run.chain, refused.id}
        needs, overflowed = _needs_of(self, routes)
        best: tuple[float, ModelInfo] | None = None
        for tier in TIER_ORDER:
            for m in ex._planner.candidates[tier]:
                if m.id in tried or not needs <= m.capabilities or m.context_window <= overflowed:
                    continue
                estimate = limiter.estimate(
                    run.priced(m), tokens, run.max_output(m), cache_write=run.cache_write
                )
                fits = estimate < error.needed_usd and (
                    estimate <= error.remaining_usd
                    or all(key != error.budget for _, key in limiter.covers(run.context, m))
                )
                if fits and (best is None or estimate > best[0]):
                    best = (estimate, m)
        if best is None:  # the next route the budget does not cover, if any
            outside = _outside(self, refused, error, routes, overflowed)
            if outside is None:
                return False
            _noted(run, refused, error, f"on to {outside.id}, which it does not cover")
            return True
        cheaper = best[1]
        here = routes.index(refused)
        later = [m for m in routes[here + 1 :] if m is not cheaper]
        routes[:] = [*routes[: here + 1], cheaper, *later]
        _noted(run, refused, error, f"{cheaper.id} instead")
        return True

    def _can_fall_back(self, info: ModelInfo, routes: list[ModelInfo], called: int) -> bool:
        """
        Whether a route after ``info`` may be tried and its circuit looks closed (a
        breaker whose hint fails is counted and logged, and the route taken as closed,
        as when planning).
        """
        ex = self.ex
        if called + 1 >= ex._fallback.max_routes:
            return False
        breaker = ex._breaker
        for later in routes[routes.index(info) + 1 :]:
            key, scope_key = ex._planner.route_keys(later)
            if breaker is None or key is None:
                return True
            try:
                if breaker.available_hint(key) and (
                    scope_key is None or breaker.available_hint(scope_key)
                ):
                    return True
            except Exception:
                ex._fb.hint_failed(later.id)
                return True
        return False

    async def route(self, info: ModelInfo, *, probe: bool = False) -> Completion | Opened | Failed:
        """
        ``info``'s attempts, retried unless a ``probe``; an `Opened` answer keeps the slot.

        Raises:
            _DeadlineExceeded: the deadline passed (before the call too: not sent).
            InvalidRequestError: the provider's, at once: a bad request stays bad.
            BudgetExceededError, LocalRateLimitError: the limiter's, before any call (a
                retry it refuses ends the route as called).
        """
        ex, run, obs, trace, streamed = self.ex, self.run, self.obs, self.trace, self.streamed
        breaker, limiter, fb, clock = ex._breaker, ex._limiter, ex._fb, ex._clock
        provider, semaphore = ex._providers[info.provider], ex._semaphores[info.provider]
        request, (key, scope_key) = _request_for(info, run), ex._planner.route_keys(info)
        deadline_at, per_attempt, called = self.deadline_at, run.context.timeout, False
        for route_attempt in range(1, ex._retry.max_attempts + 1):
            await self._slot(info, semaphore)
            holding, sent = True, False  # an opened stream keeps the slot until it ends
            hold: Hold | None = None
            try:
                if limiter is not None:
                    admitted = await self._admit(info, limiter, called, semaphore)
                    if isinstance(admitted, Failed):
                        return admitted
                    hold = admitted
                attempt, (ticket, scope_ticket) = len(run.attempts) + 1, _NO_TICKETS
                if key is not None and breaker is not None:
                    try:
                        if scope_key is not None:
                            scope_ticket = await _admitted(self, breaker, scope_key, info)
                        ticket = await _admitted(self, breaker, key, info)
                    except CircuitOpenError as exc:
                        await self._rejected(info, exc, attempt, key, scope_ticket)
                        return _CALLED if called else _NOT_CALLED
                    except BaseException:  # a cancel: the provider key's probe lease back
                        await fb.give_back(scope_ticket, deadline_at)
                        raise
                if deadline_at is not None and deadline_at - clock() <= 0:  # not sent: raises
                    await _unsent(self, info, attempt, ticket, scope_ticket)
                if obs is not None:
                    obs.attempt_started(run, info, request, attempt, (scope_ticket, ticket), trace)
                remaining = None if deadline_at is None else deadline_at - clock()
                budget, by_deadline = _within(per_attempt, remaining, streamed)  # the time limit
                called = sent = True
                t0, held = clock(), (ticket, scope_ticket, hold)
                terms = (key, budget, by_deadline, _cancels())  # the call's, for `_failed`
                try:
                    if streamed:
                        opening = await _first_delta(provider, request, per_attempt, budget, self)
                    else:
                        completion = await provider.complete(request, timeout=budget)
                except Exception as raised:
                    record, error, cut = await _failed(self, raised, info, attempt, t0, held, terms)
                    # nothing sent: not counted against max_routes, the hold freed whole
                    called = (sent := record.outcome is not Outcome.NOT_SENT) or route_attempt > 1
                except BaseException as raised:  # a cancel: recorded, lease returned, re-raised
                    await _cancelled(self, info, raised, attempt, t0, held)
                    raise
                else:
                    if streamed:
                        holding = False  # the stream has them now
                        return self._opened(opening, ticket, scope_ticket, hold, attempt, t0)
                    record, completion = fb.succeeded(run, info, completion, attempt, t0, held)
                    self.tracked.answered = True  # `aclose` waits for its bookkeeping
                    await fb.answered(record, ticket, scope_ticket, deadline_at)
                    if obs is not None:  # the span ends where the latency did, before `answered`
                        obs.attempt_ended(record, completion, None, trace, sent=t0)
                    return completion
            finally:
                if holding:
                    self._release_slot(semaphore)
                    if hold is not None:
                        await _settle(self, hold, sent)  # this attempt's, not the route's
            delay = self._after_failure(info, record, error, route_attempt, cut, probe)
            if isinstance(delay, Failed):
                return delay if called else _NOT_CALLED
            if obs is not None:
                obs.retry(delay, trace)
            await ex._sleep(delay)
        return _CALLED if called else _NOT_CALLED

    # ------------------------------------------------------------------ its steps

    def _opened(
        self,
        opening: tuple[CompletionStream, str | ToolCallDelta | None],
        ticket: Ticket | None,
        scope_ticket: Ticket | None,
        hold: Hold | None,
        attempt: int,
        t0: float,
    ) -> Opened:
        """A stream that opened: what it holds goes with it to the `LLMStream`."""
        stream, first = opening
        opened = Opened(stream, first, ticket, scope_ticket, hold, attempt, t0, self.ex._clock())
        if self.obs is not None:
            assert self.trace is not None
            self.obs.stream_opened(self.trace)
        return opened

    def _release_slot(self, semaphore: asyncio.Semaphore) -> None:
        """The route's slot given back, unless `_slot_let_go` let it go and did not get it
        back (the wait for a rate limit failed)."""
        if self.slot_out:
            self.slot_out = False
        else:
            semaphore.release()

    def _slot(self, info: ModelInfo, semaphore: asyncio.Semaphore) -> Awaitable[object]:
        """A provider slot, waited for no longer than the deadline allows."""
        deadline_at = self.deadline_at
        if deadline_at is None:
            return semaphore.acquire()
        return self._slot_within(info, semaphore, deadline_at - self.ex._clock())

    async def _slot_within(
        self, info: ModelInfo, semaphore: asyncio.Semaphore, remaining: float
    ) -> None:
        """`_slot` with the deadline ``remaining`` seconds away."""
        if remaining <= 0:  # spent by the attempts before, which their records account for
            raise _DeadlineExceeded(_ran_out_error(self, info, f"before calling {info.id}"))
        try:
            async with asyncio.timeout(remaining):
                await semaphore.acquire()
                return
        except TimeoutError:
            pass
        await _ran_out(self, info, f"waiting for a {info.provider} slot")

    async def _admit(
        self, info: ModelInfo, limiter: Limiter, called: bool, semaphore: asyncio.Semaphore
    ) -> Hold | Failed | None:
        """
        The limiter's admission, within the deadline.  A retry it refuses (``called``:
        the route was called already) ends the route, which counts as called: its error
        joins the run's and the route comes to `Failed`.  While it waits for its places
        in rate-limit schedules, the route's provider ``semaphore`` slot is let go
        (`_slot_let_go`), so a model waiting for its rate limit holds up no other.

        Raises:
            _DeadlineExceeded: the deadline ran out while the quota store answered.
            BudgetExceededError, LocalRateLimitError: the limiter's, before any call.
        """
        run, deadline_at = self.run, self.deadline_at
        try:
            return await limiter.admit(
                run.context,
                run.priced(info),
                run.estimate(),
                run.max_output(info),
                None if deadline_at is None else deadline_at - self.ex._clock(),
                streamed=self.streamed,
                cache_write=run.cache_write,
                while_waiting=partial(_slot_let_go, self, info, semaphore),
            )
        except DeadlineRanOut:
            pass
        except (BudgetExceededError, LocalRateLimitError) as refused:
            if not called:
                raise
            run.errors.append(refused)
            logger.info("%s not retried: %s", info.id, str(refused)[:_ERROR_MESSAGE_LIMIT])
            return _CALLED
        await _ran_out(self, info, f"waiting for the quota store before calling {info.id}")

    async def _rejected(
        self,
        info: ModelInfo,
        exc: CircuitOpenError,
        attempt: int,
        key: str,
        scope_ticket: Ticket | None,
    ) -> None:
        """An open circuit refused ``info``: recorded, said, the provider not called."""
        run = self.run
        await self.ex._fb.rejected(run, info, exc, attempt, scope_ticket, self.deadline_at)
        logger.info(
            "%s/%s: circuit %s is %s, %s not called",
            run.context.workflow,
            run.context.stage,
            key,
            exc.state.value if exc.state is not None else "open",
            info.id,
        )
        if self.obs is not None:
            self.obs.rejected(info, key, exc, self.trace)

    def _after_failure(
        self,
        info: ModelInfo,
        record: LLMCallRecord,
        error: Exception,
        route_attempt: int,
        deadline_hit: bool,
        probe: bool = False,
    ) -> float | Failed:
        """
        What follows a failed attempt: the delay before retrying the route, or what the
        route came to (the attempt's summary is added either way).  A re-probe
        (``probe``) is not retried: the next route answers.

        Raises:
            _DeadlineExceeded: the deadline ended the attempt.
            InvalidRequestError: ``error`` itself, when the request is bad.
        """
        ex, run = self.ex, self.run
        outcome = record.outcome
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s/%s %s %d on %s failed: %s (%s): %s",
                run.context.workflow,
                run.context.stage,
                "streamed attempt" if self.streamed else "attempt",
                record.attempt,
                info.id,
                _describe(error),
                outcome.value,
                str(error)[:_ERROR_MESSAGE_LIMIT],
            )
        summary = ex._fb.summary
        if deadline_hit:
            run.attempts.append(summary(record, error))
            raise _DeadlineExceeded(None) from None  # the error is in run.errors
        if outcome is Outcome.IGNORED:
            run.attempts.append(summary(record, error))
            if (
                isinstance(error, ContextWindowExceededError)
                and ex._fallback.larger_context_on_overflow
            ):
                return _OVERFLOWED
            raise error
        retry = ex._retry
        delay = None
        if probe and retry.should_retry(error, route_attempt):
            logger.info("%s failed a re-probe: falling back instead of retrying it", info.id)
        elif retry.should_retry(error, route_attempt):
            retry_after = retry_after_of(error)
            delay = retry.compute_delay(route_attempt, retry_after)
            if delay is None:
                logger.info(
                    "%s asked to retry after %.1fs, more than the policy allows (%.1fs); "
                    "falling back",
                    info.id,
                    retry_after,
                    retry.retry_after_limit,
                )
            elif _circuit_opened(self, info):
                logger.info("%s's circuit is open: falling back instead of retrying it", info.id)
                delay = None
        deadline_at = self.deadline_at
        if delay is None or (deadline_at is not None and ex._clock() + delay >= deadline_at):
            # no retry, or a wait that would outlast the run: the next route uses the time left
            run.attempts.append(summary(record, error))
            return _CALLED
        run.attempts.append(summary(record, error, delay))
        logger.info(
            "%s/%s retrying %s in %.2fs (attempt %d of %d on this route)",
            run.context.workflow,
            run.context.stage,
            info.id,
            delay,
            route_attempt + 1,
            retry.max_attempts,
        )
        return delay


def _reprobed(self: Attempts) -> str | None:
    """The model the run's routing decision re-probes, if it is a re-probe."""
    decision = self.run.decision
    if decision is None or decision.exploration_kind != "re-probe":
        return None
    return decision.model


def _circuit_opened(self: Attempts, info: ModelInfo) -> bool:
    """
    Whether the breaker's local view shows ``info``'s circuit (its key, or the
    provider-wide key) open after its failed attempt was reported, while a later route
    may be tried: a retry would be refused once its wait was over, so the next route
    answers at once instead.  With no route left the retry waits (the circuit may let
    a probe through by then).  A hint that fails is counted and logged, and the circuit
    taken as closed.
    """
    ex = self.ex
    breaker = ex._breaker
    key, scope_key = ex._planner.route_keys(info)
    if breaker is None or key is None:
        return False
    try:
        opened = not breaker.available_hint(key) or (
            scope_key is not None and not breaker.available_hint(scope_key)
        )
    except Exception:
        ex._fb.hint_failed(info.id)
        return False
    routes, called = self.walked
    return opened and self._can_fall_back(info, routes, called)


def _restated(
    self: Attempts, raised: Exception, info: ModelInfo, budget: float | None, by_deadline: bool
) -> tuple[Exception, bool]:
    """
    The error to record for ``raised`` (a timeout says which limit ran out) and
    whether the run's deadline ended the attempt.
    """
    if self.streamed:
        by_deadline = _deadline_ended(raised, self.deadline_at, self.ex._clock())
        return _timeout_error(raised, info, self.run.context.timeout, by_deadline), by_deadline
    if not isinstance(raised, AttemptTimeout):
        return raised, False
    limit = "the run's deadline" if by_deadline else "the per-attempt timeout"
    error = ProviderTimeoutError(
        f"{info.provider}/{info.id} gave no answer within {budget:.3f}s ({limit})",
        provider=info.provider,
        model=info.id,
    )
    error.__cause__ = raised
    error.__suppress_context__ = True
    return error, by_deadline


def _within(
    per_attempt: float | None, remaining: float | None, streamed: bool
) -> tuple[float | None, bool]:
    """
    The call's time limit with the deadline ``remaining`` seconds away (None: no
    deadline), and whether the deadline is what limits it.  A stream's limit bounds the
    whole stream, so only the deadline sets one: its per-attempt timeout is an idle
    timeout, passed apart (`_first_delta`), and a long answer whose chunks keep coming
    is not cut off.
    """
    if streamed:
        return (None if remaining is None else max(remaining, 0.001)), False
    if remaining is None or (per_attempt is not None and remaining >= per_attempt):
        return per_attempt, False
    return remaining, True


def _admitted(self: Attempts, breaker: _Breaker, key: str, info: ModelInfo) -> Awaitable[Ticket]:
    """
    The breaker's admission through ``key``, within the deadline: past it the
    admission goes on in the background (`EmpathyLLMExecutor.aclose` waits for it)
    and a probe lease it grants is given back.

    Raises:
        _DeadlineExceeded: the deadline ran out while the breaker's store answered.
        CircuitOpenError: the breaker's.
    """
    if self.deadline_at is None:
        return breaker.admit(key)
    return _admitted_within(self, breaker, key, info, self.deadline_at)


@contextlib.asynccontextmanager
async def _slot_let_go(
    attempts: Attempts, info: ModelInfo, semaphore: asyncio.Semaphore
) -> AsyncIterator[None]:
    """
    The route's provider slot let go around a wait, taken back after it (within the
    deadline: `Attempts._slot`).  A wait that fails, or a deadline that runs out before
    the slot comes back, leaves it let go: ``slot_out`` tells the route not to release it.
    """
    semaphore.release()
    attempts.slot_out = True
    yield
    await attempts._slot(info, semaphore)
    attempts.slot_out = False


async def _admitted_within(
    self: Attempts, breaker: _Breaker, key: str, info: ModelInfo, deadline_at: float
) -> Ticket:
    ex = self.ex
    late: list[bool] = []
    try:
        return await ex._fb.behind.run(
            _admission(breaker, key, ex._fb, late), deadline_at - ex._clock()
        )
    except Expired:
        late.append(True)  # its lease, if any, comes back when it lands
    except asyncio.CancelledError as exc:  # nobody will report the ticket: its lease back
        granted = getattr(exc, "_empathy_result", None)
        if granted is None:
            late.append(True)  # still in flight: given back when it lands
        else:
            await ex._fb.give_back(granted, deadline_at)
        raise
    await _ran_out(self, info, f"waiting for the circuit breaker's store before calling {info.id}")


async def _cancelled(
    self: Attempts,
    info: ModelInfo,
    raised: BaseException,
    attempt: int,
    t0: float,
    held: tuple[Ticket | None, Ticket | None, Hold | None],
) -> None:
    """
    A call sent at ``t0``, cancelled (or interrupted): recorded, its leases returned;
    ``held`` as for `_failed`, and a stream that opened has its usage recorded and
    charged; with none, it is charged what it may have cost (`charge_given_up`).
    """
    latency_ms = (self.ex._clock() - t0) * 1000.0
    ticket, scope_ticket, hold = held
    partial, self.partial = self.partial, None
    if partial is None and hold is not None:
        charge_given_up(hold, info, self.run, self.streamed)
    fb = self.ex._fb
    record = await fb.cancelled(
        self.run,
        info,
        raised,
        attempt,
        latency_ms,
        ticket,
        scope_ticket,
        partial,
        hold,
        self.deadline_at,
    )
    if self.obs is not None:
        self.obs.attempt_ended(record, None, raised, self.trace, sent=t0)


def _cancels() -> int:
    """How many cancels the current task has pending (`asyncio.Task.cancelling`)."""
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


async def _failed(
    self: Attempts,
    raised: Exception,
    info: ModelInfo,
    attempt: int,
    t0: float,
    held: tuple[Ticket | None, Ticket | None, Hold | None],
    terms: tuple[str | None, float | None, bool, int],
) -> tuple[LLMCallRecord, Exception, bool]:
    """
    A call sent at ``t0`` that raised ``raised``: its feedback; the record, the error
    restated (`_restated`) and whether the run's deadline ended the call.  ``held``:
    the attempt's ticket, scope ticket and the limiter's hold; ``terms``: the model's
    breaker key, the call's time limit, whether the deadline set it, and the cancels
    the task had pending when the call began.  A call cut by the deadline before
    `STARVED_SECONDS` is recorded as cancelled (`_Feedback.failed`).  The usage known
    (`_charged`) is charged; with none, a call our own timeout or the deadline ended
    is charged what it may have cost (`charge_given_up`).

    Raises:
        asyncio.CancelledError: the task was cancelled during the call, and the
            provider's client turned the cancel into an error of its own (aiohttp's
            timeout, when the cancel lands as its timer fires): the cancel is what
            ended the call, recorded as `_cancelled`.
    """
    key, budget, by_deadline, cancels = terms
    if _cancels() > cancels:
        await _cancelled(self, info, raised, attempt, t0, held)
        raise asyncio.CancelledError() from raised
    error, cut = _restated(self, raised, info, budget, by_deadline)
    latency_ms = (self.ex._clock() - t0) * 1000.0
    ticket, scope_ticket, hold = held
    partial, self.partial = _charged(self.partial, error, info.id), None
    if partial is None and hold is not None and _timed_out(error):
        charge_given_up(hold, info, self.run, self.streamed)
    planner = self.ex._planner
    # a 404 names one model: it must not force open a key every model of the provider
    # shares (the record still says fatal)
    ignored = (
        isinstance(error, ModelNotFoundError)
        and key is not None
        and key == planner.provider_key(info.provider)
    )
    record = await self.ex._fb.failed(
        self.run,
        info,
        error,
        attempt,
        latency_ms,
        ticket,
        scope_ticket,
        hold,
        ignored,
        partial,
        self.deadline_at,
        cut and latency_ms < STARVED_SECONDS * 1000.0,
    )
    if self.obs is not None:
        self.obs.attempt_ended(record, None, error, self.trace, sent=t0)
    return record, error, cut


async def _ran_out(self: Attempts, info: ModelInfo, why: str) -> NoReturn:
    """
    The deadline passed ``why``, while ``info``'s attempt waited to be admitted: it
    is recorded as not sent, like one admitted too late (`_unsent`), so that the time
    the run spent waiting shows in its telemetry.

    Raises:
        _DeadlineExceeded: always (the error is in ``run.errors``).
    """
    run, error = self.run, _ran_out_error(self, info, why)
    attempt = len(run.attempts) + 1
    await self.ex._fb.unsent(run, info, error, attempt, None, None, self.deadline_at)
    raise _DeadlineExceeded(None)


def _ran_out_error(self: Attempts, info: ModelInfo, why: str) -> ProviderTimeoutError:
    """The run's deadline passed ``why`` (before ``info`` was sent)."""
    return ProviderTimeoutError(
        f"deadline of {self.run.context.deadline}s exceeded {why}",
        provider=info.provider,
        model=info.id,
    )


async def _unsent(
    self: Attempts,
    info: ModelInfo,
    attempt: int,
    ticket: Ticket | None,
    scope_ticket: Ticket | None,
) -> NoReturn:
    """
    The deadline ran out before ``info`` was sent (admitted by the limiter and the
    breaker, which took the time): recorded as not sent, the leases given back.

    Raises:
        _DeadlineExceeded: always.
    """
    error = ProviderTimeoutError(
        f"deadline of {self.run.context.deadline}s ran out before the call to "
        f"{info.provider}/{info.id} was sent",
        provider=info.provider,
        model=info.id,
    )
    await self.ex._fb.unsent(self.run, info, error, attempt, ticket, scope_ticket, self.deadline_at)
    raise _DeadlineExceeded(None)  # the error is in run.errors


async def _settle(self: Attempts, hold: Hold, sent: bool) -> None:
    """
    The limiter settles ``hold`` (in the background past the run's deadline); a call
    not ``sent`` (refused by the breaker, or the deadline ran out first) gives back its
    places whole, even when an earlier attempt of its route was sent.
    """
    limiter, deadline_at = self.ex._limiter, self.deadline_at
    assert limiter is not None
    left = None if deadline_at is None else deadline_at - self.ex._clock()
    await limiter.settle(hold, failed=not sent, time_left=left)


async def _admission(breaker: _Breaker, key: str, fb: _Feedback, late: list[bool]) -> Ticket:
    """``breaker.admit(key)``; a probe lease given back when its caller gave up (``late``)."""
    ticket = await breaker.admit(key)
    if late:
        await fb.give_back(ticket)
    return ticket


async def _first_delta(
    provider: Provider,
    request: CompletionRequest,
    idle_timeout: float | None,
    total_timeout: float | None,
    attempts: Attempts,
) -> tuple[CompletionStream, str | ToolCallDelta | None]:
    """
    Open the stream and read up to its first delta (None: the answer is empty, complete
    already).  The stream is closed when that fails (shielded from a cancel), and what
    it had is left in ``attempts.partial``: the request was sent and accepted, and the
    usage reported so far (Anthropic's ``message_start``) is the attempt's.
    """
    stream = await provider.stream(request, idle_timeout=idle_timeout, total_timeout=total_timeout)
    try:
        first: str | ToolCallDelta | None = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except Exception:
        attempts.partial = _partial_of(stream)
        await stream.aclose()
        raise
    except BaseException:
        attempts.partial = _partial_of(stream)
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream, first


def _charged(partial: Completion | None, error: Exception, model: str) -> Completion | None:
    """
    What a failed call to ``model`` is recorded and charged for: ``partial``, what a
    stream that opened had; else, for a 2xx answer refused as malformed (the request
    was sent and accepted: the provider bills it all the same), the usage it reported
    (`InvalidResponseError.billed`), or, with none to read, an empty answer, whose
    input tokens are then the request's estimate, as for a stream cut off before its
    usage (`_feedback.streamed_usage`); else None.
    """
    if partial is not None or not isinstance(error, InvalidResponseError):
        return partial
    if error.billed is not None:
        return error.billed
    status = error.status
    if status is not None and 200 <= status < 300:
        return Completion(content="", model=model)
    return None


def _timed_out(error: Exception) -> bool:
    """
    Whether ``error`` (as `_restated`) ended a call that was sent because the client
    stopped waiting: a timeout of its own (the per-attempt timeout, the provider's own,
    the run's deadline), not a server's answer (an HTTP 408 or 409 carries its status).
    """
    return isinstance(error, TimeoutError) and getattr(error, "status", None) is None


def _partial_of(stream: CompletionStream) -> Completion | None:
    """``stream.completion()``; None when a provider's own stream cannot give it."""
    try:
        return stream.completion()
    except Exception:
        logger.exception("%s.completion() failed; no usage recorded", type(stream).__name__)
        return None


def _deadline_ended(raised: BaseException, deadline_at: float | None, now: float) -> bool:
    """
    Whether the run's deadline (``deadline_at``, passed at ``now``) is what ended a
    stream that raised ``raised``: a timeout of our own making (a server's HTTP 408 is
    the server's), raised once the deadline has come.
    """
    return (
        isinstance(raised, TimeoutError)
        and getattr(raised, "status", None) is None
        and deadline_at is not None
        and now >= deadline_at - _SLACK
    )


def _timeout_error(
    error: Exception, info: ModelInfo, per_attempt: float | None, by_deadline: bool
) -> Exception:
    """
    A stream's timeout restated with the limit that ran out: the run's deadline, which
    bounds the whole stream, or else the per-attempt timeout, which bounds each wait for
    data (the only other limit the stream was given; a provider says it ran out with a
    `ProviderTimeoutError`, `Provider.stream`), unless the provider's own timeout was
    shorter (an HTTP provider's, marked `is_own_timeout`: its error names it).  A
    server's own timeout (an HTTP 408 answer) and the provider's are kept as they are,
    as is a provider's own that is no `ProviderTimeoutError` (its client's, as `run`
    keeps it).
    """
    if not isinstance(error, TimeoutError) or getattr(error, "status", None) is not None:
        return error
    if not by_deadline and not isinstance(error, ProviderTimeoutError):
        return error
    if by_deadline:
        why = "the run's deadline passed (it bounds the whole stream)"
    elif is_own_timeout(error):
        return error  # the provider's own timeout, shorter than ours: it names it
    elif per_attempt is not None:
        why = f"no data for {per_attempt:.3f}s (the per-attempt timeout, an idle timeout)"
    else:
        why = str(error)
    restated = ProviderTimeoutError(
        f"{info.provider}/{info.id}: {why} while streaming",
        provider=info.provider,
        model=info.id,
    )
    restated.__cause__ = error
    restated.__suppress_context__ = True
    return restated


def _all_failed(run: _Run) -> Exception:
    """The error of a run whose routes all failed (every error in the group)."""
    if not run.errors:  # pragma: no cover - every route adds an error or answers
        return ConfigurationError("no route could be tried")
    ctx = run.context
    return _group(
        run,
        f"all routes failed for {ctx.workflow}/{ctx.stage}: tried "
        f"{', '.join(run.chain)} in {len(run.attempts)} attempt(s); {_last_error(run)}",
    )


def _deadline_passed(run: _Run) -> AllRoutesFailedError:
    """
    The error of a run whose deadline passed (every error in the group, the one that
    says what the run was doing then last: a call, or a wait for a store or a slot).
    """
    ctx = run.context
    return _group(
        run,
        f"deadline of {ctx.deadline}s exceeded for {ctx.workflow}/{ctx.stage} after "
        f"{len(run.attempts)} attempt(s) on {', '.join(run.chain) or 'no route'}; "
        f"{_last_error(run)}",
    )


def _group(run: _Run, message: str) -> AllRoutesFailedError:
    """
    The run's `AllRoutesFailedError`: its errors, its ``request_id`` and its number of
    attempts (what its message and OpenTelemetry span count: some errors were none, as
    a limit's refusal or a deadline that ran out before a call).
    """
    error = AllRoutesFailedError(message, run.errors)
    error.request_id = run.request_id
    error._attempts = len(run.attempts)
    return error


def _last_error(run: _Run) -> str:
    """The run's last error, as its `AllRoutesFailedError` message ends."""
    last = run.errors[-1]
    return f"last error: {_describe(last)}: {str(last)[:_ERROR_MESSAGE_LIMIT]}"


def _refused(run: _Run, refused: BudgetExceededError) -> Exception:
    """
    The error of a run a budget ``refused`` with no cheaper route left: the refusal,
    when budgets refused every route before it too (or there was none); else every
    error in the group (the earlier budgets' refusals included), the refusal last
    (their failures, an outage say, are the caller's to know too).
    """
    if all(isinstance(error, BudgetExceededError) for error in run.errors):
        return refused
    run.errors.append(refused)
    return _all_failed(run)


def _outside(
    attempts: Attempts,
    refused: ModelInfo,
    error: BudgetExceededError,
    routes: list[ModelInfo],
    overflowed: int,
) -> ModelInfo | None:
    """
    The first route after ``refused`` that the budget that refused it does not cover (a
    budget of one provider or model), and the walk would try (its context window is
    larger than ``overflowed``, the largest that overflowed in the run), if any: the
    walk goes on as after a failure.
    """
    limiter = attempts.ex._limiter
    assert limiter is not None
    context = attempts.run.context
    for later in routes[routes.index(refused) + 1 :]:
        if later.context_window > overflowed and all(
            key != error.budget for _, key in limiter.covers(context, later)
        ):
            return later
    return None


def _noted(run: _Run, refused: ModelInfo, error: BudgetExceededError, then: str) -> None:
    """Log, and add to the run's decision, where a budget's refusal of ``refused`` sends it."""
    note = (
        f"budget {error.budget!r} has ${error.remaining_usd:.6f} left, not the "
        f"${error.needed_usd:.6f} {refused.id} may cost: {then}"
    )
    logger.info("%s/%s: %s", run.context.workflow, run.context.stage, note)
    if run.decision is not None:
        run.decision = attrs.evolve(run.decision, reason=f"{run.decision.reason}; {note}")


def _needs_of(attempts: Attempts, routes: list[ModelInfo]) -> tuple[frozenset[str], int]:
    """
    What a model needs to serve ``attempts``' run, as its routes were planned: the
    request's capabilities (`required_capabilities`; ``"streaming"`` for a stream, as
    `empathy_models.streaming` plans one), and a context window larger than the
    largest of ``routes`` that overflowed in the run (0: none did).
    """
    run = attempts.run
    needs = required_capabilities(run.messages, run.options)
    if attempts.streamed:
        needs |= {"streaming"}
    windows = {m.id: m.context_window for m in routes}
    overflowed = [
        windows.get(error.model or "", 0)
        for error in run.errors
        if isinstance(error, ContextWindowExceededError)
    ]
    return needs, max(overflowed, default=0)
