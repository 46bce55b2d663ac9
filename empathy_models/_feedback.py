"""
What the executor learns from each provider call: the `LLMCallRecord` it builds, the
breaker's report, the router's outcome and the telemetry write (`_Feedback.give`: a
failure of any of them is logged and counted, never raised into the request), per kind
of attempt end (`rejected`, `failed`, `cancelled`, `succeeded` then `answered`), and the
`AttemptSummary` / `LLMResponse` values a run returns.  A record always gets built: a
reported token count it cannot hold (not an int from 0 to 2**63 - 1) counts as 0, and
the cost is finite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from ._loops import elsewhere
from ._propensity import routing_propensity
from ._request_options import structured_result
from ._run import _describe, _plain_non_negative, _Run, _status_of
from ._settled import Expired, Settler
from ._validators import plain_number
from ._values import AttemptSummary, LLMResponse, _new_response, _new_summary
from .abc import Completion, TelemetryBackend
from .breaker import provider_outcome
from .exceptions import NotOpenError
from .limits.values import WORST_PER_ESTIMATE, CacheWrite, worst_cost
from .outcomes import classify_error, retry_after_of
from .records import (
    _INT_LIMIT,
    CircuitState,
    LLMCallRecord,
    Outcome,
    Ticket,
    _trusted_call_record,
)
from .registry import ModelInfo, ModelRegistry

if TYPE_CHECKING:
    from ._executor import _Breaker, _Router
    from .exceptions import CircuitOpenError
    from .limits.guard import Hold
    from .serialization import JSONScalar

__all__: list[str] = []

logger = logging.getLogger("empathy_models.executor")

_ERROR_MESSAGE_LIMIT = 300

FAILURE_REPORT_WAIT: Final = 1.0
"""
Seconds at most (and half the run's time left at most) that a failed or rejected
attempt waits for the breaker's report before the next attempt may start: a store that
stalls does not spend the fallback's time; the report lands in the background.
"""

BORROWED_FLUSH_WAIT: Final = 1.0
"""The least the executor's exit waits for a borrowed telemetry backend's flush (it
waits for what is left of its close budget, `CLOSE_WAIT`, when that is longer)."""

INPUT_ESTIMATED: Final = "empathy_models.input_tokens_estimated"
"""
The metadata key set (to True) on the record of an attempt whose input tokens are the
request's estimate (`_run._estimate_tokens`): the provider never reported them (a stream
that did not get to its usage, an answer whose usage left them out:
`Completion.usage_reported`, a 2xx answer refused as malformed with no usage to read).
"""

OUTPUT_ESTIMATED: Final = "empathy_models.output_tokens_estimated"
"""
The metadata key set (to True) on the record of a streamed attempt whose output tokens
are an estimate (`CompletionStream.output_estimated`; the HTTP providers': a quarter of
the pieces' UTF-8 bytes, at least one token per delta): the provider had not reported
them (a server ignoring ``stream_options.include_usage`` never does; OpenAI-format
servers report them only at the end); and on the record of a whole answer whose usage
was not all reported (`Completion.usage_reported`), whose output tokens the provider
estimated when they were left out (the HTTP providers:
`providers._wire.estimated_output_tokens`).
"""


CACHE_WRITE_TOKENS: Final = "empathy_models.cache_write_tokens"
"""
The metadata key of a record whose call wrote prompt tokens to the 5-minute prompt
cache (Anthropic's ``cache_creation_input_tokens``): how many (not in ``input_tokens``;
``cost_usd`` includes them).  The keys below are set the same way, only when not 0.
"""

CACHE_WRITE_1H_TOKENS: Final = "empathy_models.cache_write_1h_tokens"
"""The metadata key of the prompt tokens a call wrote to the 1-hour prompt cache."""

CACHE_READ_TOKENS: Final = "empathy_models.cache_read_tokens"
"""The metadata key of the prompt tokens a call read from the prompt cache."""

WEB_SEARCH_REQUESTS: Final = "empathy_models.web_search_requests"
"""The metadata key of the server-side web searches a call ran."""

CACHED_INPUT_TOKENS: Final = "empathy_models.cached_input_tokens"
"""The metadata key of the input tokens a call's provider served from its prompt cache
(among ``input_tokens``; OpenAI's ``cached_tokens``)."""

SERVICE_TIER: Final = "empathy_models.service_tier"
"""The metadata key of the service tier a call's answer reported (OpenAI's
``service_tier``, Anthropic's ``usage.service_tier``) when not the standard one: the
tier whose prices its cost is at, where its registry entry gives them
(`ModelInfo.at_service_tier`)."""

_TIER_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""A service tier name a record keeps (a provider's odd value is left out)."""

_EXTRAS: Final = (
    ("cache_write_tokens", CACHE_WRITE_TOKENS),
    ("cache_write_1h_tokens", CACHE_WRITE_1H_TOKENS),
    ("cache_read_tokens", CACHE_READ_TOKENS),
    ("web_search_requests", WEB_SEARCH_REQUESTS),
    ("cached_input_tokens", CACHED_INPUT_TOKENS),
)
"""The `Completion` counts beyond input and output that a call is billed for, and the
record metadata key of each."""


def _extras(completion: Completion | None) -> dict[str, int]:
    """
    ``completion``'s counts beyond input and output tokens (`_EXTRAS`) that are not 0,
    by field name; one that is no count (see `_count`) is left out.
    """
    if completion is None:
        return {}
    found = {}
    for name, _ in _EXTRAS:
        value = getattr(completion, name, 0)
        if value and (count := _count(value)):
            found[name] = count
    return found


def _is_count(value: object) -> bool:
    """Whether ``value`` can be a token count: an int from 0 to 2**63 - 1 (what records hold)."""
    return type(value) is int and 0 <= value < _INT_LIMIT


def _count(value: object) -> int | None:
    """
    ``value`` as a token count (`_is_count`): an integer of another type (a provider
    counting with numpy) as the plain ``int``; None when it is none.
    """
    count = value if type(value) is int else plain_number(value, reals=False)
    return count if isinstance(count, int) and 0 <= count < _INT_LIMIT else None


def _shown(value: object) -> str:
    """A reported count as the log shows it: an absurd integer by its size, else its type."""
    if type(value) is int:
        return str(value) if abs(value) < _INT_LIMIT else f"a {value.bit_length()}-bit integer"
    return f"a {type(value).__name__}"


def _usage(info: ModelInfo, completion: Completion, *, quiet: bool = False) -> tuple[int, int]:
    """
    ``completion``'s token counts as its record and response hold them: one that is no
    count (see `_count`) is 0, the usage unknown, and logged unless ``quiet``.  The
    HTTP providers refuse such an answer as malformed; another `Provider` may still hand
    one back, and its call must keep its record.
    """
    given = (completion.input_tokens, completion.output_tokens)
    counts = (_count(given[0]), _count(given[1]))
    if not quiet and None in counts:
        logger.warning(
            "%s/%s reported token counts a record cannot hold (input %s, output %s); "
            "any that is not an integer from 0 to 2**63 - 1 is recorded as 0",
            info.provider,
            info.id,
            _shown(given[0]),
            _shown(given[1]),
        )
    return (counts[0] or 0, counts[1] or 0)


def _spent(
    info: ModelInfo, completion: Completion | None
) -> tuple[int, int, float, dict[str, int]]:
    """
    The input and output tokens, the cost (finite) and the cache and web-search counts
    (`_extras`, priced too) a call's record says it spent.
    """
    if completion is None:
        return 0, 0, 0.0, {}
    input_tokens, output_tokens = completion.input_tokens, completion.output_tokens
    if not (_is_count(input_tokens) and _is_count(output_tokens)):
        input_tokens, output_tokens = _usage(info, completion)
    extras = _extras(completion)
    if completion.service_tier is not None:  # at the prices of the tier that served it
        info = info.at_service_tier(completion.service_tier)
    return input_tokens, output_tokens, info.cost(input_tokens, output_tokens, **extras), extras


def streamed_usage(run: _Run, completion: Completion) -> tuple[Completion, bool]:
    """
    The usage of a streamed attempt whose stream opened (the request was sent and
    accepted, so the provider bills its prompt), and whether its input is estimated.

    A stream's input tokens stay 0 until the provider reports them
    (`CompletionStream.completion`), and OpenAI-format servers report them only in the
    last chunk: a stream left early or cut short counts the prompt as the request's
    estimate (`_Run.estimate`: its tool definitions and schema included), the one the
    router and rate limits use.  Input tokens that are not 0 are the provider's, kept.
    """
    if completion.input_tokens != 0:
        return completion, False
    return attrs.evolve(completion, input_tokens=run.estimate()), True


def answered_usage(run: _Run, completion: Completion) -> tuple[Completion, bool]:
    """
    The usage of a whole answer, and whether its input is estimated: as reported, or,
    for an answer whose usage was not all reported (`Completion.usage_reported` False:
    the output tokens it left out the provider's estimate), with the request's estimate
    of the prompt for input tokens it left out (0), as a stream without usage has it
    (`streamed_usage`).
    """
    if completion.usage_reported:
        return completion, False
    return streamed_usage(run, completion)


def charge(
    hold: Hold,
    info: ModelInfo,
    record: LLMCallRecord,
    estimated: bool,
    completion: Completion,
    cache_write: CacheWrite = None,
) -> None:
    """
    What the limiter's ``hold`` settles for ``record``'s call (whose answer so far is
    ``completion``): its cost, or, when its input tokens are an estimate
    (``estimated``), the prompt's worst case as its budgets reserved it (at the cache
    write price when the request asked for ``cache_write``s: `worst_cost`), with the
    output recorded (a stream's deltas so far, never ``max_tokens``), so that what they
    charge never falls short of what the provider bills for the prompt; rate limits
    count the tokens recorded and the prompt-cache writes reported apart from them
    (Anthropic counts those against its input tokens per minute; its cache reads, and
    OpenAI's cached tokens, already among the input, are not counted again).
    """
    input_tokens, output_tokens = record.input_tokens, record.output_tokens
    extras = _extras(completion)
    if estimated:
        hold.cost_usd = worst_cost(
            info, input_tokens * WORST_PER_ESTIMATE, output_tokens, cache_write
        ) + (info.cost(0, 0, **extras) if extras else 0.0)
    else:
        hold.cost_usd = record.cost_usd
    hold.tokens = input_tokens + output_tokens
    if extras:
        hold.tokens += extras.get("cache_write_tokens", 0) + extras.get("cache_write_1h_tokens", 0)


def charge_given_up(hold: Hold, info: ModelInfo, run: _Run, streamed: bool) -> None:
    """
    What the limiter's ``hold`` settles for a call to ``info`` that was sent and given
    up on before any of its answer came (cancelled, or ended by its timeout or the
    run's deadline): a provider bills a request it received whether or not anyone
    waits for the answer, so budgets charge what it may have cost, never $0.  A run's
    call, whose answer the provider generates and bills whole, is charged its whole
    reservation (`Hold.whole`; rate limits count the tokens they reserved for it, as
    for any call sent whose usage is unknown).  A stream that did not open is charged
    as one left early (`charge`): the prompt's worst case and the output it streamed,
    none; rate limits count the prompt's estimate.
    """
    if not streamed:
        hold.whole = True
        return
    estimate = run.estimate()
    hold.cost_usd = worst_cost(info, estimate * WORST_PER_ESTIMATE, 0, run.cache_write)
    hold.tokens = estimate


def _router_failed(fb: _Feedback, record: LLMCallRecord, exc: Exception) -> None:
    """The router refused ``record``'s outcome: counted in ``feedback_errors``, logged."""
    fb.feedback_errors += 1
    if not isinstance(exc, NotOpenError):
        logger.error("router.record_outcome failed for %s", record.model, exc_info=exc)
    elif not fb._said_router_closed:
        # closed by its owner while this call ran: the record still goes to telemetry,
        # and a run that asks the router again raises
        fb._said_router_closed = True
        logger.info(
            "the router was closed while calls were running: their outcomes go to "
            "telemetry only (counted in feedback_errors)"
        )


class _Feedback:
    """
    The executor's bookkeeping of calls (see the module docstring).  ``feedback_errors``
    and ``telemetry_errors`` count what failed (the executor shows them).
    """

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        router: _Router | None,
        breaker: _Breaker | None,
        telemetry: TelemetryBackend | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._router = router
        self._breaker = breaker
        self._telemetry = telemetry
        self._clock = clock
        self._wall_clock = wall_clock
        self.feedback_errors = 0
        self.telemetry_errors = 0
        self._said_router_closed = False  # a closed router's refusal is logged once
        # feedback and store operations no run waits for any more (past its deadline;
        # the executor's cache writes behind): the executor's `aclose` waits for them
        self.behind = Settler()

    async def give(
        self,
        record: LLMCallRecord,
        ticket: Ticket | None,
        retry_after: float | None,
        error: str | None,
        breaker_outcome: Outcome | None = None,
        scope: tuple[Ticket, Outcome] | None = None,
    ) -> None:
        """
        ``record`` to the router and to telemetry, then its outcome to the breaker (for
        ``ticket`` and the provider-wide ``scope`` ticket).

        A cancellation arriving in one step does not skip the others: it is raised once
        they are done.  The record goes first, since a write-behind backend (the SQLite
        default, PostgreSQL) queues it without suspending, so no cancellation can lose
        it; the breaker's store operations are carried to their end (see `_settled`).
        """
        if self._router is not None:
            try:
                self._router.record_outcome(record)
            except Exception as exc:
                _router_failed(self, record, exc)
        cancelled: asyncio.CancelledError | None = None
        if self._telemetry is not None:
            try:
                await self._telemetry.record(record)
            except asyncio.CancelledError as exc:
                cancelled = exc
            except Exception:
                self.telemetry_errors += 1
                logger.exception(
                    "telemetry write failed (record %s of request %s dropped)",
                    record.call_id,
                    record.request_id,
                )
        breaker = self._breaker
        if breaker is not None:  # (inlined twice: this is every call's path)
            if ticket is not None:
                if scope is not None and scope[1] is Outcome.FATAL:
                    # an account error: the provider's key, forced open, holds off every
                    # model of it, and its reset alone lets them in again
                    breaker_outcome = Outcome.IGNORED
                try:
                    await breaker.report(
                        ticket,
                        record.outcome if breaker_outcome is None else breaker_outcome,
                        retry_after=retry_after,
                        error=error,
                    )
                except asyncio.CancelledError as exc:
                    cancelled = cancelled or exc
                except Exception:
                    self.feedback_errors += 1
                    logger.exception("breaker.report failed for %s", ticket.key)
            if scope is not None:
                # the provider-wide key hears only what concerns the whole provider
                try:
                    await breaker.report(scope[0], scope[1], error=error)
                except asyncio.CancelledError as exc:
                    cancelled = cancelled or exc
                except Exception:
                    self.feedback_errors += 1
                    logger.exception("breaker.report failed for %s", scope[0].key)
        if cancelled is not None:
            raise cancelled

    async def give_back(self, ticket: Ticket | None, deadline_at: float | None = None) -> None:
        """
        A probe lease ``ticket`` holds (if any) comes back, reported cancelled: its call
        will not be made.  Shielded from anyio's cancellation; the breaker carries its
        store operation through asyncio's.  With the run's ``deadline_at``, waited for
        until then at most (`bounded`).
        """
        if ticket is None or ticket.lease_id is None or self._breaker is None:
            return
        with anyio.CancelScope(shield=True):
            await self.bounded(self._returned(ticket), deadline_at)

    async def _returned(self, ticket: Ticket) -> None:
        assert self._breaker is not None
        try:
            await self._breaker.report(ticket, Outcome.CANCELLED)
        except Exception:
            self.feedback_errors += 1
            logger.exception("breaker.report failed for %s", ticket.key)

    def bounded(
        self, given: Coroutine[Any, Any, None], deadline_at: float | None
    ) -> Awaitable[None]:
        """
        ``given`` (feedback that reports to the breaker), waited for until the run's
        ``deadline_at`` at most: a breaker store that stalls does not hold the run past
        it, the feedback goes on in the background (in ``behind``, which the executor's
        `aclose` waits for), so the breaker's counts stay exact.  Without a deadline,
        ``given`` itself.
        """
        return given if deadline_at is None else self._until(given, deadline_at)

    def _before_next(self, deadline_at: float | None) -> float | None:
        """
        The wait's end for the report of an attempt another may follow: `FAILURE_REPORT_WAIT`
        and half the time left at most (``None`` without a deadline: the store's timeout).
        """
        if deadline_at is None:
            return None
        now = self._clock()
        return now + min(FAILURE_REPORT_WAIT, max(deadline_at - now, 0.0) / 2)

    def hint_failed(self, model_id: str) -> None:
        """The breaker's ``available_hint`` raised while planning (called in ``except``)."""
        self.feedback_errors += 1
        logger.exception("breaker.available_hint failed for %s", model_id)

    # ------------------------------------------------------------------ attempt ends

    async def rejected(
        self,
        run: _Run,
        info: ModelInfo,
        exc: CircuitOpenError,
        attempt: int,
        scope_ticket: Ticket | None,
        deadline_at: float | None = None,
    ) -> None:
        """
        An open circuit refused ``info`` (``scope_ticket``: the provider's key admitted
        it first, and hears the rejection when it holds a probe lease).  ``deadline_at``:
        the run's: the breaker's report is waited for at most `FAILURE_REPORT_WAIT`
        seconds and half the time left (`bounded`), then goes on in the background.
        """
        record = self.record(
            run,
            info,
            Outcome.REJECTED,
            attempt=attempt,
            latency_ms=0.0,
            ticket=None,
            exc=exc,
            circuit_state=exc.state,
        )
        run.errors.append(exc)
        run.attempts.append(self.summary(record, exc))
        # the provider's probe slot comes back (this call never ran); the record
        # survives a cancel
        scope = None
        if scope_ticket is not None and scope_ticket.lease_id is not None:
            scope = (scope_ticket, Outcome.REJECTED)
        with anyio.CancelScope(shield=True):
            await self.bounded(
                self.give(record, None, None, None, None, scope), self._before_next(deadline_at)
            )

    async def failed(
        self,
        run: _Run,
        info: ModelInfo,
        error: Exception,
        attempt: int,
        latency_ms: float,
        ticket: Ticket | None,
        scope_ticket: Ticket | None,
        hold: Hold | None,
        ignored: bool,
        partial: Completion | None = None,
        deadline_at: float | None = None,
        cut: bool = False,
    ) -> LLMCallRecord:
        """
        A call that raised ``error`` (added to ``run.errors``; its summary is the
        caller's, which knows whether a retry follows).  ``ignored``: the breaker key
        hears `Outcome.IGNORED`, whatever the record says; the provider-wide key hears
        `provider_outcome`.  A 429's Retry-After goes to the limiter's ``hold``.
        ``partial``: what a stream that opened had, or a malformed 2xx answer's usage
        (recorded and charged, see `streamed_usage`).  ``deadline_at``:
        the run's, as for `rejected`: a retry or the next route does not wait for a
        stalled breaker store.  ``cut``: the run's deadline, not the model's own
        timeout, ended the call before it had `_attempt.STARVED_SECONDS`, which says
        nothing about the model: it is recorded as `Outcome.CANCELLED`, which neither
        the router nor the breaker counts.
        """
        outcome = Outcome.CANCELLED if cut else classify_error(error)
        record = _unanswered(
            self, run, info, outcome, (attempt, latency_ms, ticket, error), partial, hold
        )
        retry_after = retry_after_of(error)
        if hold is not None and outcome is Outcome.RATE_LIMITED:
            # the provider's own reset (its rate-limit headers): every worker waits
            hold.pushback = retry_after
        run.errors.append(error)
        # a cancel arriving now must not lose the record or the breaker's report (a
        # half-open lease); it is delivered right after
        scope = None if scope_ticket is None else (scope_ticket, provider_outcome(outcome, error))
        breaker_outcome = Outcome.IGNORED if ignored else None
        with anyio.CancelScope(shield=True):
            await self.bounded(
                self.give(record, ticket, retry_after, _describe(error), breaker_outcome, scope),
                self._before_next(deadline_at),
            )
        return record

    async def cancelled(
        self,
        run: _Run,
        info: ModelInfo,
        raised: BaseException,
        attempt: int,
        latency_ms: float,
        ticket: Ticket | None,
        scope_ticket: Ticket | None,
        partial: Completion | None = None,
        hold: Hold | None = None,
        deadline_at: float | None = None,
    ) -> LLMCallRecord:
        """
        A call cancelled (or interrupted): recorded, its leases returned, shielded.
        ``partial``, ``hold``, ``deadline_at``: as for `failed`.
        """
        record = _unanswered(
            self, run, info, Outcome.CANCELLED, (attempt, latency_ms, ticket, raised), partial, hold
        )
        run.attempts.append(self.summary(record, raised))
        scope = None if scope_ticket is None else (scope_ticket, Outcome.CANCELLED)
        with anyio.CancelScope(shield=True):
            await self.bounded(
                self.give(record, ticket, None, "cancelled", None, scope), deadline_at
            )
        return record

    async def unsent(
        self,
        run: _Run,
        info: ModelInfo,
        error: Exception,
        attempt: int,
        ticket: Ticket | None,
        scope_ticket: Ticket | None,
        deadline_at: float | None = None,
    ) -> LLMCallRecord:
        """
        An admitted call that was not sent (the run's deadline ran out first): recorded
        as ``not_sent``, which neither the router nor the breaker counts; its leases
        returned, shielded, and in the background once the run's ``deadline_at`` (past
        already) is (`bounded`).  ``error`` joins ``run.errors``.
        """
        record = self.record(
            run, info, Outcome.NOT_SENT, attempt=attempt, latency_ms=0.0, ticket=ticket, exc=error
        )
        run.errors.append(error)
        run.attempts.append(self.summary(record, error))
        scope = None if scope_ticket is None else (scope_ticket, Outcome.NOT_SENT)
        with anyio.CancelScope(shield=True):
            await self.bounded(
                self.give(record, ticket, None, _describe(error), None, scope), deadline_at
            )
        return record

    def succeeded(
        self,
        run: _Run,
        info: ModelInfo,
        completion: Completion,
        attempt: int,
        t0: float,
        held: tuple[Ticket | None, Ticket | None, Hold | None],
    ) -> tuple[LLMCallRecord, Completion]:
        """
        A call sent at ``t0`` that answered: its record, summary and cost (charged to the
        hold in ``held``), and its completion as recorded (`answered_usage`).
        """
        completion, estimated = answered_usage(run, completion)
        record = self.record(
            run,
            info,
            Outcome.SUCCESS,
            attempt=attempt,
            latency_ms=(self._clock() - t0) * 1000.0,
            ticket=held[0],
            completion=completion,
            input_estimated=estimated,
        )
        run.attempts.append(self.summary(record, None))
        run.attempts_cost = record.cost_usd
        if (hold := held[2]) is not None:
            charge(hold, info, record, estimated, completion, run.cache_write)
            hold.pushback = completion.rate_limit_reset  # a limit is exhausted: every worker waits
        return record, completion

    def answered(
        self,
        record: LLMCallRecord,
        ticket: Ticket | None,
        scope_ticket: Ticket | None,
        deadline_at: float | None = None,
    ) -> Awaitable[None]:
        """
        `give` for a success (the awaitable itself, no frame of its own); shielded when
        a ticket holds a half-open probe lease, whose success must reach the breaker
        (the shield costs a few microseconds, so the closed-circuit path skips it).
        With the run's ``deadline_at``, waited for until then at most: a breaker store
        that stalls does not hold the answer, the feedback goes on in the background.
        """
        scope = None if scope_ticket is None else (scope_ticket, Outcome.SUCCESS)
        if (ticket is not None and ticket.lease_id is not None) or (
            scope_ticket is not None and scope_ticket.lease_id is not None
        ):
            given = self._shielded(record, ticket, scope)
        else:
            given = self.give(record, ticket, None, None, None, scope)
        if deadline_at is None or ticket is None:
            return given
        return self._until(given, deadline_at)

    async def _until(self, given: Coroutine[Any, Any, None], deadline_at: float) -> None:
        with contextlib.suppress(Expired):  # it goes on in the background
            await self.behind.run(given, max(deadline_at - self._clock(), 0.0))

    async def _shielded(
        self, record: LLMCallRecord, ticket: Ticket | None, scope: tuple[Ticket, Outcome] | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.give(record, ticket, None, None, None, scope)

    # ------------------------------------------------------------------ the record

    def record(
        self,
        run: _Run,
        info: ModelInfo,
        outcome: Outcome,
        *,
        attempt: int,
        latency_ms: float,
        ticket: Ticket | None,
        exc: BaseException | None = None,
        completion: Completion | None = None,
        circuit_state: CircuitState | None = None,
        input_estimated: bool = False,
        output_estimated: bool = False,
    ) -> LLMCallRecord:
        """The attempt's record; counts ``*_estimated`` are flagged (`_flagged`)."""
        ctx = run.context
        input_tokens, output_tokens, cost, extras = _spent(info, completion)
        message = None if exc is None else (str(exc)[:_ERROR_MESSAGE_LIMIT] or None)
        if circuit_state is None and ticket is not None and ticket.lease_id is not None:
            circuit_state = CircuitState.HALF_OPEN
        decision = run.decision
        ttft_ms = completion.ttft_ms if completion is not None else None
        response_text = completion.content if completion is not None and ctx.record_text else None
        generation = None if ticket is None else ticket.generation
        latency_ms = max(0.0, latency_ms)
        # Every value below is validated already (context, registry, clock arithmetic)
        # except those a provider or a breaker hands back; when those are plainly valid
        # too, skip the record's validators (a third of the in-process call cost).
        # Anything unusual (including a rejection's state) takes the validated path, so
        # it fails exactly as before.
        make: Callable[..., LLMCallRecord] = (
            _trusted_call_record
            if latency_ms < math.inf
            and (ttft_ms is None or _plain_non_negative(ttft_ms))
            and (response_text is None or type(response_text) is str)
            and (generation is None or (type(generation) is int and generation >= 0))
            and (circuit_state is None or circuit_state is CircuitState.HALF_OPEN)
            else LLMCallRecord
        )
        return make(
            provider=info.provider,
            model=info.id,
            outcome=outcome,
            call_id=os.urandom(16).hex(),
            request_id=run.request_id,
            timestamp=datetime.fromtimestamp(self._wall_clock(), UTC),
            workflow=ctx.workflow,
            stage=ctx.stage,
            task_type=run.task_type,
            tier=info.tier,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            actual_cost_usd=None,
            price_version=self._registry.price_version,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            error_type=None if exc is None else type(exc).__name__,
            error_message=message,
            status_code=None if exc is None else _status_of(exc),
            attempt=attempt,
            fallback_used=info.id != run.original.id,
            fallback_chain=tuple(run.chain),
            original_provider=run.original.provider,
            original_model=run.original.id,
            exploration=bool(
                decision is not None and decision.exploration and decision.model == info.id
            ),
            routing_propensity=routing_propensity(decision, getattr(self._router, "policy", None))
            if decision is not None and decision.model == info.id
            else None,
            breaker_generation=generation,
            circuit_state=circuit_state,
            user_id=ctx.user_id,
            session_id=ctx.session_id,
            metadata=_flagged(ctx.metadata, input_estimated, output_estimated, extras, completion),
            prompt_text=run.prompt_text,
            response_text=response_text,
        )

    def response(
        self,
        run: _Run,
        info: ModelInfo,
        completion: Completion,
        start: float,
        cost: float,
        ttft_ms: float | None = None,
        end: float | None = None,
    ) -> LLMResponse:
        """
        The run's answer from ``info``'s ``completion`` (``ttft_ms``: a stream's; ``end``:
        when a stream's answer was seen whole, the end of its latency; default now).
        """
        parsed, parse_error = (
            (None, None) if not run.options else structured_result(completion, run.options)
        )
        input_tokens, output_tokens = completion.input_tokens, completion.output_tokens
        if not (_is_count(input_tokens) and _is_count(output_tokens)):
            input_tokens, output_tokens = _usage(info, completion, quiet=True)  # as recorded
        return _new_response(
            content=completion.content,
            model=info.id,
            provider=info.provider,
            tier=info.tier,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            latency_ms=max(0.0, ((self._clock() if end is None else end) - start) * 1000.0),
            attempts=tuple(run.attempts),
            fallback_chain=tuple(run.chain),
            fallback_used=info.id != run.original.id,
            routing_decision=run.decision,
            request_id=run.request_id,
            response_model=completion.model,
            price_version=self._registry.price_version,
            stop_reason=completion.stop_reason,
            tool_calls=completion.tool_calls,
            parsed=parsed,
            parse_error=parse_error,
            ttft_ms=ttft_ms,
        )

    @staticmethod
    def summary(
        record: LLMCallRecord, exc: BaseException | None, delay: float | None = None
    ) -> AttemptSummary:
        return _new_summary(
            attempt=record.attempt,
            call_id=record.call_id,
            provider=record.provider,
            model=record.model,
            outcome=record.outcome,
            latency_ms=record.latency_ms,
            error_type=record.error_type,
            status_code=record.status_code,
            retry_after=None if exc is None else retry_after_of(exc),
            delay_s=delay,
        )


def _flagged(
    metadata: Mapping[str, JSONScalar],
    input_estimated: bool,
    output_estimated: bool,
    extras: Mapping[str, int],
    completion: Completion | None,
) -> Mapping[str, JSONScalar]:
    """
    A record's ``metadata``, saying which of its token counts are estimated
    (`INPUT_ESTIMATED`, `OUTPUT_ESTIMATED`: also the output of a ``completion`` whose
    usage was not all reported, `Completion.usage_reported`) and what cache and web-search counts
    its call was billed for (``extras``, under the keys of `_EXTRAS`) and the service tier
    it was served at (`SERVICE_TIER`); as it is when none.
    """
    if completion is not None and not completion.usage_reported:
        output_estimated = True
    tier = None if completion is None else completion.service_tier
    if tier is not None and (tier in ("default", "standard") or not _TIER_NAME.fullmatch(tier)):
        tier = None
    if not (input_estimated or output_estimated or extras or tier):
        return metadata
    flags: dict[str, JSONScalar] = {INPUT_ESTIMATED: True} if input_estimated else {}
    if tier is not None:
        flags[SERVICE_TIER] = tier
    if output_estimated:
        flags[OUTPUT_ESTIMATED] = True
    for name, key in _EXTRAS:
        if name in extras:
            flags[key] = extras[name]
    return MappingProxyType({**metadata, **flags})


def _unanswered(
    fb: _Feedback,
    run: _Run,
    info: ModelInfo,
    outcome: Outcome,
    attempt: tuple[int, float, Ticket | None, BaseException],
    partial: Completion | None,
    hold: Hold | None,
) -> LLMCallRecord:
    """
    The record of a call that ended without an answer (``attempt``: its number,
    latency, ticket and error); with the ``partial`` answer of a stream that opened, its
    usage (`streamed_usage`), charged to ``hold`` (`charge`).
    """
    number, latency_ms, ticket, exc = attempt
    estimated = False
    if partial is not None:
        partial, estimated = streamed_usage(run, partial)
    record = fb.record(
        run,
        info,
        outcome,
        attempt=number,
        latency_ms=latency_ms,
        ticket=ticket,
        exc=exc,
        completion=partial,
        input_estimated=estimated,
    )
    if partial is not None and hold is not None:
        charge(hold, info, record, estimated, partial, run.cache_write)
    return record


async def flush_borrowed(self: _Feedback) -> None:
    """
    Flush the (borrowed) telemetry backend on the executor's exit, for what is left
    of the close budget (``behind.drain_by``), at least `BORROWED_FLUSH_WAIT`
    seconds; never raises.  A flush that takes longer is left (logged, counted in
    ``telemetry_errors``): the records it had not written stay in the backend, which
    its owner closes.  So are they, at once, when the backend's background work runs
    in another event loop (it was opened there after the executor was): a flush from
    here would wait for that loop, which may be the caller's, blocked.
    """
    telemetry = self._telemetry
    assert telemetry is not None
    if elsewhere(telemetry._home_loop()):
        self.telemetry_errors += 1
        logger.warning(
            "the telemetry backend %r runs in another event loop (it was opened there "
            "after the executor was), where the executor's exit cannot flush it: the "
            "records it has not written stay in it until that loop writes them or "
            "closes it",
            telemetry,
        )
        return
    drain_by = self.behind.drain_by
    seconds = BORROWED_FLUSH_WAIT
    if drain_by is not None:
        seconds = max(seconds, drain_by - asyncio.get_running_loop().time())
    try:
        with anyio.move_on_after(seconds) as waited:
            await telemetry.flush()
    except Exception:
        self.telemetry_errors += 1
        logger.exception("flushing the telemetry backend on exit failed")
        return
    if waited.cancelled_caught:
        self.telemetry_errors += 1
        logger.warning(
            "the telemetry backend %r did not finish flushing within %.3g s of the "
            "executor's exit: the records it has not written stay in it until it is "
            "closed",
            telemetry,
            seconds,
        )
