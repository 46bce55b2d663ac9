"""
`EmpathyLLMExecutor.stream`: a streamed answer with the same routing, breaker, retry,
fallback, deadline and telemetry as `EmpathyLLMExecutor.run`.

::

    async with executor.stream("Tell me a story", ExecutionContext(workflow="chat")) as stream:
        async for delta in stream:
            print(delta, end="", flush=True)
        response = await stream.get_final_response()   # usage, cost, ttft_ms, decision

What happens, in order:

1. **Before the first delta** (inside ``async with``): routes are tried exactly as
   `run` tries them.  An attempt opens the stream and reads up to its first text delta;
   a failure before that (an HTTP error, a refused connection, a stall past the
   per-attempt timeout, an ``error`` event, a malformed event) is retried or falls back
   as in `run`, so the caller never sees part of an answer from a model that was then
   abandoned.  When every route fails, ``async with`` raises `AllRoutesFailedError`.
2. **After the first delta**: the deltas reach the caller as they arrive.  A failure
   now raises `StreamInterruptedError` (a `ProviderError`) with the partial text and the
   usage so far; the attempt is recorded as a failure (the breaker and the router hear
   it) with its ``ttft_ms``.  Nothing is retried or sent to another model.
3. **Timeouts**: ``context.timeout`` bounds the wait for the first byte and every gap
   between chunks (an idle timeout, not a limit on a long answer), and so does an HTTP
   provider's own ``timeout`` when shorter (its error names it); ``context.deadline``
   bounds the whole stream, the caller's reading included: a read past it raises
   `StreamInterruptedError` even when the pieces had arrived.
4. **Leaving early** (``break``, an exception, a cancelled task): the HTTP response is
   closed (the connection is not reused), the attempt is recorded as ``cancelled`` with
   the tokens seen (input tokens as below), and a half-open breaker probe lease is
   returned, even when a cancellation lands while the response is being closed.
   `EmpathyLLMExecutor.aclose` ends a stream in flight the same way; its reader gets
   `NotOpenError`.
5. **Records**: every attempt gets one `LLMCallRecord`, as in `run`; a streamed
   attempt's ``ttft_ms`` is the time from sending the request to its first delta.  The
   response's ``ttft_ms`` is the time from entering ``async with`` to the first delta
   (retries and fallbacks included): what the caller waited; the first delta is read
   inside ``async with``, so neither depends on the caller's reading.  A streamed
   attempt's ``latency_ms`` (and the response's, from entering ``async with``) ends
   when its answer arrived whole (`CompletionStream.ended_at`: for the HTTP providers
   the body's end as it arrived, or the network read that carried the end marker),
   however long the caller then took to read it: a caller that pauses between deltas
   does not make the model look slow to the router or in the records.  The
   OpenTelemetry spans end there too (`empathy_models.observability`).

6. **Response cache**: a context that sets ``cache_ttl`` (the executor having a
   ``cache``) reads the cache on entering, before any routing, as `run` does: a hit is
   replayed (its text as one delta, then each tool call as one `ToolCallDelta`; the
   final response has ``cached=True``; recorded as a hit) with no routing decision
   made, so it is served even when routing would fail (no model meeting the router's
   constraints, none able to serve the request).  The routes are planned on a miss, so
   such a stream's routing errors raise from ``async with``; a stream the cache cannot
   answer (no ``cache_ttl``, or a sampled answer) is planned by ``stream()``, which
   raises them.  A stream that ended whole stores its answer; one left early or
   interrupted stores nothing.  A stream is not coalesced with identical calls in
   flight (`empathy_models._cached.follow`), on purpose: it neither waits for a `run`
   (or stream) asking a model for the same request, since its first delta would then
   wait for that call's whole answer, nor is waited for, since its end comes when its
   caller has read it (a stream held open unread would hold the waiting copies up).

7. **Tool calls**: with ``tools``, ``stream.events()`` yields the pieces of each tool
   call (`ToolCallDelta`) beside the text deltas, in order; a piece counts as a delta
   for the rules above.  The final response has the calls parsed (arguments that are
   not a JSON object end the stream with `StreamInterruptedError` carrying an
   `InvalidResponseError`).

The provider slot (``concurrency_per_provider``) is held until the stream ends or is
left, since the connection is in use until then.  Usage: output tokens are estimated
until the provider reports them (OpenAI-format servers report usage only at the end;
the executor asks for it with ``stream_options.include_usage``): a quarter of the UTF-8
bytes of the text and tool-call pieces so far (and of the reasoning a stream carried
without a delta, which is billed as output too), rounded up, as the prompt is estimated,
and at least one token per delta; a record whose output tokens are that estimate (a
stream that did not finish, or one from a server that ignores ``include_usage``) has
``metadata["empathy_models.output_tokens_estimated"] = True``.  Input tokens are the
provider's count when it gave one (Anthropic's ``message_start`` does, before the
first delta); a stream that opened and ended without
one (an OpenAI-format stream left early or cut short, before its first delta too, or
from a server that ignores ``include_usage``) records the request's estimate of the
prompt (the one the router and rate limits use), with
``metadata["empathy_models.input_tokens_estimated"] = True``, and its budgets are
charged the prompt's worst case (what they reserved for it, its tool definitions and
schema included) and the output counted so far (not ``max_tokens``), so that they
never charge less than the provider bills for the prompt.  An error answered before
the stream opened (an HTTP error status, a refused connection) records no tokens, as
in `run`; a 2xx answer refused as malformed records the prompt's estimate, as in
`run`, when it has no usage to read.  A stream given up on before it opened
(cancelled, or its timeout or the run's deadline ran out) records no tokens either,
and is charged the prompt's worst case (`_feedback.charge_given_up`): the provider
has the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn

import anyio
import attrs

from ._attempt import Attempts, Opened, _deadline_ended, _partial_of, _timeout_error
from ._feedback import charge, streamed_usage
from ._inflight import Abort, closed_error
from ._otel_spans import _current
from ._request_options import required_capabilities
from ._run import _describe, _Run, _to_messages
from ._text import utf8_size
from ._values import SAMPLED, ExecutionContext, context_of, uncached
from .abc import Completion, CompletionStream
from .breaker import provider_outcome
from .content import ToolCallDelta
from .exceptions import (
    ProviderError,
    StreamInterruptedError,
)
from .limits.guard import Hold
from .outcomes import classify_error, retry_after_of
from .records import LLMCallRecord, Outcome, Ticket

if TYPE_CHECKING:
    from ._executor import EmpathyLLMExecutor
    from ._inflight import Tracked, _Untracked
    from ._run import Prompt
    from ._values import AttemptSummary, LLMResponse
    from .observability import _RunTrace
    from .records import ModelTier
    from .registry import ModelInfo

__all__ = ["LLMStream", "StreamEvents", "StreamManager"]

logger = logging.getLogger("empathy_models.executor")

_ERROR_MESSAGE_LIMIT: Final = 300


class StreamManager:
    """
    What `EmpathyLLMExecutor.stream` returns: ``async with`` it to get the `LLMStream`.

    Entering routes and opens the stream up to its first delta (raising what `run`
    would raise when no route answers); leaving closes it (recording a ``cancelled``
    attempt when it had not finished).
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: LLMStream) -> None:
        self._stream = stream

    async def __aenter__(self) -> LLMStream:
        await self._stream._open()
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stream.aclose()

    if not TYPE_CHECKING:  # at run time only: a type checker reports the misuse itself

        def __aiter__(self):
            raise TypeError(_READ_IN_ASYNC_WITH)

        def __await__(self):
            raise TypeError(_READ_IN_ASYNC_WITH)


_READ_IN_ASYNC_WITH: Final = (
    "executor.stream() is read inside `async with`: `async with executor.stream(...) as "
    "stream:`, then `async for delta in stream` (or `await stream.get_final_response()`)"
)


class LLMStream:
    """
    A streamed answer: ``async for delta in stream`` yields the text deltas (`str`);
    `events` yields them and the tool calls' pieces (`ToolCallDelta`);
    `get_final_response` returns the `LLMResponse` (reading what is left first).

    ``text`` is the text delivered so far; ``model`` / ``provider`` name the model
    answering; ``attempts`` lists the attempts so far; ``response`` is the
    `LLMResponse` once the stream has finished (None before).  Use it only inside the
    ``async with`` block that produced it.  A stream dropped while it holds its
    provider slot (entered without ``async with`` and never closed) emits a
    `ResourceWarning` when collected, and is closed then as `aclose` would: on the
    executor's event loop, which records the attempt as cancelled and gives back the
    slot and the budget hold (if that loop is closed already, only the slot is given
    back: nothing is recorded, and the hold lapses at its time).  Read it from one task
    at a time: a read while another task's read waits raises `RuntimeError`, and the
    stream goes on.
    """

    __slots__ = (
        "__weakref__",
        "_abort",
        "_attempt",
        "_cache_key",
        "_cached",
        "_deadline_at",
        "_ended_at",
        "_error",
        "_ex",
        "_first",
        "_first_at",
        "_hold",
        "_info",
        "_parts",
        "_per_attempt",
        "_pieces",
        "_reader",
        "_ready",
        "_response",
        "_routes",
        "_run",
        "_run_ttft",
        "_scope_ticket",
        "_semaphore",
        "_start",
        "_state",
        "_stream",
        "_t0",
        "_ticket",
        "_tier",
        "_trace",
        "_ttft",
    )

    def __init__(
        self,
        executor: EmpathyLLMExecutor,
        run: _Run,
        tier: ModelTier,
        cache_key: str | None = None,
    ) -> None:
        self._ex = executor
        self._run = run
        self._tier = tier  # the task type's, for `_plan`
        self._routes: Sequence[ModelInfo] = ()  # planned by `_plan`
        self._cache_key = cache_key  # the response cache's key (the context's cache_ttl)
        self._cached: LLMResponse | None = None  # the answer the cache held, replayed
        self._start = 0.0
        self._deadline_at: float | None = None
        self._ended_at: float | None = None  # when the stream was seen whole (`finished`)
        self._per_attempt = run.context.timeout
        self._state = "new"  # new -> streaming -> done | failed | cancelled
        self._parts: list[str] = []
        self._first: str | ToolCallDelta | None = None
        self._pieces = 0  # text deltas and tool-call pieces delivered
        self._ready: deque[str | ToolCallDelta] = deque()  # taken from the stream, not delivered
        self._error: BaseException | None = None
        self._response: LLMResponse | None = None
        self._info: ModelInfo | None = None
        self._stream: CompletionStream | None = None
        self._ticket: Ticket | None = None
        self._scope_ticket: Ticket | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._hold: Hold | None = None
        self._attempt = 0
        self._t0 = 0.0
        self._first_at = 0.0  # when the attempt's first delta was read (else when sent)
        self._ttft: float | None = None
        self._run_ttft: float | None = None
        self._trace: _RunTrace | None = None  # the OpenTelemetry run span's state, when on
        self._reader: asyncio.Task[Any] | None = None  # the task reading, while it reads
        self._abort: Abort | None = None  # the cancellation `_end_for_close` sent the reader

    def __repr__(self) -> str:
        model = None if self._info is None else self._info.id
        return f"LLMStream(model={model!r}, state={self._state!r}, chars={len(self.text)})"

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "streaming":  # dropped holding its slot
            _dropped(self)

    # ------------------------------------------------------------------ public

    @property
    def text(self) -> str:
        """The text delivered to the caller so far."""
        return "".join(self._parts)

    @property
    def model(self) -> str | None:
        """The registry id of the model answering (None before entering)."""
        if self._info is None:
            return None if self._cached is None else self._cached.model
        return self._info.id

    @property
    def provider(self) -> str | None:
        """The provider of the model answering (None before entering)."""
        if self._info is None:
            return None if self._cached is None else self._cached.provider
        return self._info.provider

    @property
    def attempts(self) -> tuple[AttemptSummary, ...]:
        """Every attempt so far, the streaming one included once it has ended."""
        return tuple(self._run.attempts)

    @property
    def request_id(self) -> str:
        """The run's id, shared by all its records."""
        return self._run.request_id

    @property
    def response(self) -> LLMResponse | None:
        """The `LLMResponse` once the stream has finished; None before."""
        return self._response

    def __aiter__(self) -> LLMStream:
        return self

    async def __anext__(self) -> str:
        ready = self._ready
        while True:
            if ready and self._state == "streaming" and self._deadline_at is None:
                # the common case, without a coroutine per piece (`_delivered`, inlined)
                piece = ready.popleft()
                self._pieces += 1
                if type(piece) is str:
                    self._parts.append(piece)
                    return piece
                continue
            piece = await self._next_piece()
            if type(piece) is str:
                return piece

    def events(self) -> StreamEvents:
        """
        Every piece of the answer in order: the text deltas (`str`) and the pieces of
        its tool calls (`ToolCallDelta`)::

            async for event in stream.events():
                if isinstance(event, str):
                    print(event, end="")
                else:
                    calls[event.index] = calls.get(event.index, "") + event.arguments

        It reads the same stream as ``async for delta in stream`` (which yields the text
        only): use one or the other.  `get_final_response` has the calls parsed.
        """
        return StreamEvents(self)

    async def _next_piece(self) -> str | ToolCallDelta:
        first = self._first
        if first is not None:
            self._first = None
            return self._delivered(first)
        if self._state != "streaming":
            if self._state == "cached":
                return _replayed(self)
            if self._state == "new":
                raise RuntimeError("use the stream inside `async with executor.stream(...)`")
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        deadline_at = self._deadline_at
        if deadline_at is not None and self._ex._clock() >= deadline_at:
            # it bounds the caller's reading too, with pieces taken and not delivered
            raise await self._interrupted(TimeoutError("the run's deadline passed"))
        ready = self._ready
        if not ready:
            if self._reader is not None:  # its read is under way: this one would spoil it
                raise RuntimeError("another task is reading this stream; read it from one")
            stream = self._stream
            assert stream is not None
            self._reader = asyncio.current_task()
            try:
                ready.extend(await stream.next_pieces())
            except BaseException as exc:
                self._reader = None
                await _read_failed(self, exc)
            self._reader = None
            if self._ended_at is None and stream.finished:  # seen whole (`_end_time`)
                self._ended_at = self._ex._clock()
            if self._abort is not None:  # `_end_for_close` cancelled the read; it went on
                await _read_failed(self, asyncio.CancelledError())
            if not ready:
                raise await self._interrupted(
                    RuntimeError(f"{type(stream).__name__}.next_pieces() returned no piece")
                )
        return self._delivered(ready.popleft())

    def _end_for_close(self) -> Awaitable[None] | None:
        """
        End the stream because the executor is closing (`InFlight.end`): the task
        reading it is cancelled (its read raises `NotOpenError`); a stream nobody is
        reading is closed by the awaitable returned, and its next read raises that
        error.  None for a stream already ending (its report is under way).
        """
        if self._state != "streaming":
            return None
        reader = self._reader
        if reader is not None:
            self._abort = abort = Abort(reader)
            abort.send()
            return None
        self._state = "cancelled"
        self._error = closed_error("stream")
        self._first = None
        self._ready.clear()
        return self._closed("the executor closed")

    def _delivered(self, piece: str | ToolCallDelta) -> str | ToolCallDelta:
        self._pieces += 1
        if type(piece) is str:
            self._parts.append(piece)
        return piece

    async def get_final_response(self) -> LLMResponse:
        """
        The `LLMResponse` (content, usage, cost, ``ttft_ms``, routing decision), after
        reading what is left of the stream.

        Raises:
            StreamInterruptedError: the stream failed.
            RuntimeError: it was closed before it finished.
        """
        async for _ in self:
            pass
        if self._response is None:
            if self._error is not None:
                raise self._error
            raise RuntimeError("the stream was closed before it finished; no final response")
        return self._response

    async def aclose(self) -> None:
        """Stop reading: close the connection and record the attempt as cancelled."""
        if self._state == "streaming":
            await self._close("cancelled")
        elif self._state == "cached":  # a cached answer left unread: nothing to close
            self._state = "cancelled"
            self._ready.clear()

    # ------------------------------------------------------------------ opening

    async def _open(self) -> None:
        """The cached answer (`_from_cache`), or the routes tried until one streams."""
        if self._state != "new":
            raise RuntimeError("an LLMStream can be entered only once")
        ex = self._ex
        ex._check_open()
        obs = ex._obs
        if obs is not None:
            ctx = self._run.context
            self._trace = obs.stream_started(ctx.workflow, ctx.stage)
        trace = self._trace  # the run span ends where the latency from `_start` does
        self._start = ex._clock() if obs is None or trace is None else obs.began(trace)
        # current while the routes are tried: the breaker's events find the attempt's span
        traced = None if trace is None else _current.set(trace)
        try:
            with ex._inflight.track("stream") as tracked:  # `aclose` ends it with NotOpenError
                if self._cache_key is not None and await _from_cache(self, self._cache_key):
                    return  # no routing decision made, as `run` makes none for a hit
                if not self._routes:  # the cache missed: planned now, as `run` plans
                    _plan(self)
                if obs is not None and self._trace is not None:
                    obs.planned(self._run, self._trace)
                await self._open_routes(tracked)
        except BaseException as exc:
            if self._state == "new":  # a failed lookup or plan: entered once all the same
                self._state = "failed"
            if obs is not None and self._trace is not None:
                obs.stream_ended(self._trace, error=exc)
            raise
        finally:
            if traced is not None:
                _current.reset(traced)

    async def _open_routes(self, tracked: Tracked | _Untracked) -> None:
        """
        Walk the routes with the executor's `Attempts`; adopt the one that opened (an
        empty answer, complete already, is ``tracked``'s answer: `aclose` lets it end).
        """
        self._state = "opening"
        ex = self._ex
        deadline = self._run.context.deadline
        self._deadline_at = None if deadline is None else self._start + deadline
        attempts = Attempts(ex, self._run, self._deadline_at, self._trace, streamed=True)
        try:
            # a budget may put a cheaper route next: the list is this stream's own
            info, opened = await attempts.walk(list(self._routes))
            assert isinstance(opened, Opened)
            self._adopt(info, opened)
            if opened.first is None:  # an empty answer: complete already
                tracked.answered = True
                await self._finish()
        except BaseException:
            self._state = "failed"
            raise

    def _adopt(self, info: ModelInfo, opened: Opened) -> None:
        """Take over the opened attempt: its stream, provider slot, hold and tickets."""
        self._info = info
        self._stream = opened.stream
        self._ticket = opened.ticket
        self._scope_ticket = opened.scope_ticket
        self._semaphore = self._ex._semaphores[info.provider]
        self._hold = opened.hold
        self._attempt = opened.attempt
        self._t0 = self._first_at = opened.t0
        self._first = opened.first
        if opened.first is not None:
            self._first_at = opened.at
            self._ttft = (opened.at - opened.t0) * 1000.0
            self._run_ttft = (opened.at - self._start) * 1000.0
        self._state = "streaming"
        self._ex._inflight.streams.add(self)  # until `_report` gives back what it holds

    # ------------------------------------------------------------------ ending

    def _release(self) -> None:
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is not None:
            semaphore.release()

    async def _report(
        self,
        outcome: Outcome,
        error: BaseException | None,
        usage: tuple[Completion, bool],
        *,
        breaker_outcome: Outcome | None = None,
        scope_outcome: Outcome | None = None,
    ) -> LLMResponse | None:
        """
        Record the attempt, tell the breaker, router and telemetry, free the slot.
        ``usage``: the completion so far and whether its input is estimated (`_partial`).
        """
        completion, estimated = usage
        ex = self._ex
        run = self._run
        info = self._info
        assert info is not None
        end = _end_time(self)
        record: LLMCallRecord | None = None
        try:  # whatever fails from here on, the slot and the hold are given back
            record = ex._fb.record(
                run,
                info,
                outcome,
                attempt=self._attempt,
                latency_ms=(end - self._t0) * 1000.0,
                ticket=self._ticket,
                exc=error,
                completion=completion,
                input_estimated=estimated,
                output_estimated=self._stream is not None and self._stream.output_estimated,
            )
            run.attempts.append(ex._fb.summary(record, error))
            try:  # the attempt's span ends even when the feedback is cancelled
                await _give(self, record, outcome, error, breaker_outcome, scope_outcome)
            finally:
                _attempt_ended(self, record, outcome, completion, error)
        finally:
            self._release()
            hold, self._hold = self._hold, None
            if hold is not None:
                if record is not None:  # an estimated prompt is charged its worst case
                    charge(hold, info, record, estimated, completion, run.cache_write)
                # the provider says a limit is exhausted: every worker waits it out
                hold.pushback = completion.rate_limit_reset
                assert ex._limiter is not None
                deadline_at = self._deadline_at
                left = None if deadline_at is None else deadline_at - ex._clock()
                try:  # carried through a cancellation, raised after; past the deadline behind
                    await ex._limiter.settle(hold, failed=False, time_left=left)
                finally:
                    ex._inflight.ended(self)
            else:
                ex._inflight.ended(self)
        if outcome is not Outcome.SUCCESS:
            return None
        run.attempts_cost = record.cost_usd
        return ex._fb.response(
            run, info, completion, self._start, record.cost_usd, ttft_ms=self._run_ttft, end=end
        )

    async def _finish(self) -> None:
        """The stream is complete: report the answer, end the run span (`_ended`), cache it."""
        self._state = "done"
        try:
            self._response = await self._report(Outcome.SUCCESS, None, _partial(self))
        except BaseException as exc:
            _ended(self, error=exc)
            raise
        _ended(self, response=self._response)
        if self._cache_key is not None:
            await _to_cache(self, self._cache_key)

    async def _interrupted(self, raised: Exception) -> StreamInterruptedError:
        """Record a failure after the first delta; the error to raise."""
        self._state = "failed"
        info = self._info
        stream = self._stream
        assert info is not None and stream is not None
        closing = await _closing(stream)  # reported even if this is cancelled
        by_deadline = _deadline_ended(raised, self._deadline_at, self._ex._clock())
        error = _timeout_error(raised, info, self._per_attempt, by_deadline)
        # the run's deadline is the caller's limit: its end says nothing about the model
        outcome = Outcome.CANCELLED if by_deadline else classify_error(error)
        usage = _partial(self)
        completion = usage[0]
        self._run.errors.append(error)
        interrupted = StreamInterruptedError(
            f"{info.provider}/{info.id}: the stream failed after "
            f"{self._pieces} delta(s): {_describe(error)}: "
            f"{str(error)[:_ERROR_MESSAGE_LIMIT]}",
            provider=info.provider,
            model=info.id,
            status=error.status if isinstance(error, ProviderError) else None,
            retry_after=retry_after_of(error),
            partial_text=self.text,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            ttft_ms=self._ttft,
            request_id=self._run.request_id,
            error=error if isinstance(error, ProviderError) else None,
        )
        interrupted.__cause__ = error
        self._error = interrupted
        try:
            await self._report(
                outcome, error, usage, scope_outcome=provider_outcome(outcome, error)
            )
        finally:  # the run span ends even when the report is cancelled
            _ended(self, error=interrupted)
        logger.info("%s/%s: %s", self._run.context.workflow, self._run.context.stage, interrupted)
        if closing is not None:
            raise closing
        return interrupted

    async def _close(self, why: str) -> None:
        """The caller stopped reading: close the connection, record ``cancelled``."""
        self._state = "cancelled"
        await self._closed(why)

    async def _closed(self, why: str) -> None:
        stream = self._stream
        assert stream is not None
        closing = await _closing(stream)  # the attempt is reported even if this is cancelled
        with anyio.CancelScope(shield=True):
            try:
                await self._report(Outcome.CANCELLED, None, _partial(self))
            finally:  # the run span ends even when the report is cancelled
                _ended(self)
        logger.debug("stream of %s closed early (%s)", self.model, why)
        if closing is not None:
            raise closing


async def _give(
    stream: LLMStream,
    record: LLMCallRecord,
    outcome: Outcome,
    error: BaseException | None,
    breaker_outcome: Outcome | None,
    scope_outcome: Outcome | None,
) -> None:
    """
    ``stream``'s record to the breaker, the router and telemetry (`_Feedback.give`);
    its trace (when traced) current meanwhile, as while it opened, so that the
    breaker's events find the attempt's span.
    """
    fb, ticket, scope_ticket = stream._ex._fb, stream._ticket, stream._scope_ticket
    trace = stream._trace
    traced = None if trace is None else _current.set(trace)
    try:
        if error is None and outcome is Outcome.SUCCESS and breaker_outcome is None:
            # as `run` gives a success: shielded only where a probe lease rides on it
            await fb.answered(record, ticket, scope_ticket, stream._deadline_at)
            return
        scope = (
            None
            if scope_ticket is None
            else (scope_ticket, scope_outcome if scope_outcome is not None else outcome)
        )
        retry_after, why = None, None
        if error is not None:
            retry_after = retry_after_of(error)
            why = "cancelled" if outcome is Outcome.CANCELLED else _describe(error)
        given = fb.give(record, ticket, retry_after, why, breaker_outcome, scope)
        # the record survives a cancel; a stalled breaker store holds the stream's end no
        # longer than the run's deadline (the report goes on in the background)
        with anyio.CancelScope(shield=True):
            await fb.bounded(given, stream._deadline_at)
    finally:
        if traced is not None:
            _current.reset(traced)


def _partial(stream: LLMStream) -> tuple[Completion, bool]:
    """
    The attempt's completion so far, with its ttft, and whether its input tokens are
    the request's estimate (the provider had not reported them: `streamed_usage`).
    """
    assert stream._stream is not None and stream._info is not None
    completion = _partial_of(stream._stream)
    if completion is None:  # a provider's own stream could not give it (logged)
        completion = _unreported(stream)
    got, estimated = streamed_usage(stream._run, completion)
    return attrs.evolve(got, ttft_ms=stream._ttft), estimated


def _unreported(stream: LLMStream) -> Completion:
    """The completion of a stream whose provider could not give it: the text delivered,
    its output tokens estimated as a provider that reported none has them (the input
    is the request's estimate, `streamed_usage`)."""
    from .providers._wire import estimated_output_tokens

    assert stream._info is not None
    text = stream.text
    return Completion(
        content=text,
        model=stream._info.id,
        output_tokens=estimated_output_tokens(utf8_size(text), stream._pieces),
        usage_reported=False,
    )


def _attempt_ended(
    stream: LLMStream,
    record: LLMCallRecord,
    outcome: Outcome,
    completion: Completion,
    error: BaseException | None,
) -> None:
    """
    ``stream``'s attempt span ended with ``record`` (when traced): `attempt_ended`, the
    span ending where the record's latency does (when the answer arrived, `_end_time`).
    """
    obs, trace = stream._ex._obs, stream._trace
    if obs is not None and trace is not None:
        obs.attempt_ended(
            record,
            completion if outcome is Outcome.SUCCESS else None,
            error,  # None for a stream its caller left
            trace,
            sent=stream._t0,
        )


def _ended(
    stream: LLMStream, response: LLMResponse | None = None, error: BaseException | None = None
) -> None:
    """
    ``stream``'s run span ended (when traced): answered with ``response``, failed with
    ``error``, or left by its caller (neither; a cancellation of the reader is that too).
    """
    obs, trace = stream._ex._obs, stream._trace
    if obs is None or trace is None:
        return
    if isinstance(error, asyncio.CancelledError):
        error = None
    obs.stream_ended(trace, response, error)


async def _read_failed(stream: LLMStream, exc: BaseException) -> NoReturn:
    """``stream``'s read raised ``exc``: the stream ended, failed or was cancelled."""
    abort = stream._abort
    if abort is not None:  # by `_end_for_close`: the executor is closing
        await stream._close("the executor closed")
        if abort.taken():
            stream._error = closed_error("stream")  # later reads raise it too
            raise stream._error from None
        raise exc
    if stream._state != "streaming":
        # another task ended it under this read (its `aclose`), and reported it: the
        # read ends as a read after that end does (a cancellation is raised as it is)
        if not isinstance(exc, Exception):
            raise exc
        if stream._error is not None:
            raise stream._error
        raise StopAsyncIteration from None
    if isinstance(exc, StopAsyncIteration):
        await stream._finish()
        raise exc
    if isinstance(exc, Exception):
        # its cause is the error it carries (a timeout restated with the limit that ran
        # out, itself caused by ``exc``), as `_interrupted` set it
        raise await stream._interrupted(exc)
    await stream._close("cancelled")
    raise exc


async def _from_cache(stream: LLMStream, key: str) -> bool:
    """
    Whether the response cache held ``stream``'s answer (`_cached.lookup`, recorded as
    `run` records a hit: outcome ``cache_hit``, cost 0), which it then replays: its text
    as one delta, then each tool call as one `ToolCallDelta`.  The run span ends here.
    """
    from ._cached import lookup

    ex, run = stream._ex, stream._run
    hit = await lookup(
        ex, key, run.context, run.task_type, run.messages, run.system, run.options, stream._start
    )
    if hit is None:
        return False
    run.request_id = hit.request_id  # the hit's record's
    pieces = stream._ready
    if hit.content:
        pieces.append(hit.content)
    for index, call in enumerate(hit.tool_calls):
        arguments = json.dumps(dict(call.arguments), separators=(",", ":"), ensure_ascii=False)
        pieces.append(ToolCallDelta(index=index, id=call.id, name=call.name, arguments=arguments))
    stream._cached = hit
    stream._state = "cached"
    _ended(stream, response=hit)
    return True


async def _to_cache(stream: LLMStream, key: str) -> None:
    """Keep the answer of ``stream``, which ended whole, in the response cache."""
    from ._cached import store

    if stream._response is not None:
        await store(stream._ex, key, stream._response, stream._run.context)


def _replayed(stream: LLMStream) -> str | ToolCallDelta:
    """The next piece of a cached answer; at its end, the answer is the response."""
    if stream._ready:
        return stream._delivered(stream._ready.popleft())
    stream._state = "done"
    stream._response = stream._cached
    raise StopAsyncIteration


def _end_time(stream: LLMStream) -> float:
    """
    When ``stream``'s answer arrived whole, on the executor's clock: the provider's
    stream's `CompletionStream.ended_at` when it gives one, else when the stream was
    first seen whole; now when it was not (the caller's pauses are not the model's time).
    """
    clock = stream._ex._clock
    seen = stream._ended_at
    end = clock() if seen is None else seen
    provider = stream._stream
    arrived = None if provider is None else provider.ended_at
    if arrived is None:
        return end
    if clock is not time.perf_counter:  # the same instant, as long before now
        arrived = clock() - max(0.0, time.perf_counter() - arrived)
    # neither after it was seen nor before the first delta was (read with it, or clocks
    # apart: the first delta is timed once decoded, the end as its bytes came)
    return max(stream._first_at, min(arrived, end))


def _dropped(stream: LLMStream) -> None:
    """
    ``stream``, collected while it holds its provider slot: say so, like an unclosed
    file, and close it on the executor's loop (the stream lives on until then).
    """
    try:  # noqa: SIM105 - a finalizer must not raise (modules torn down at exit)
        warnings.warn(
            f"unclosed {stream!r}: use 'async with executor.stream(...) as stream:' or "
            "'await stream.aclose()'; closing it now (its attempt recorded as cancelled)",
            ResourceWarning,
            stacklevel=2,
            source=stream,
        )
    except Exception:  # pragma: no cover - interpreter shutdown
        pass
    loop = stream._ex._loop
    try:
        if loop is None:
            raise RuntimeError("never opened")
        loop.call_soon_threadsafe(_close_dropped, stream)
    except RuntimeError:  # the loop is closed: nothing to record on, the slot freed
        stream._release()


_DROPPED: set[asyncio.Task[None]] = set()
"""The closings of streams dropped unclosed (`LLMStream.__del__`), kept until done."""


def _close_dropped(stream: LLMStream) -> None:
    """Close ``stream``, dropped while streaming, in a task of the running loop."""
    if stream._state != "streaming":  # the executor's aclose got to it first
        return
    stream._ex._inflight.streams.add(stream)  # the executor's aclose waits for it
    task = asyncio.get_running_loop().create_task(stream._close("dropped unclosed"))
    _DROPPED.add(task)
    task.add_done_callback(_dropped_closed)


def _dropped_closed(task: asyncio.Task[None]) -> None:
    _DROPPED.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("closing a stream dropped unclosed failed: %r", task.exception())


async def _closing(stream: CompletionStream) -> BaseException | None:
    """
    ``stream.aclose()`` (shielded from anyio's cancellation) and what it raised, if
    anything: an asyncio cancellation, or a custom stream's own error, for the caller
    to raise once the attempt is reported.
    """
    try:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
    except BaseException as exc:
        return exc
    return None


_STREAMING: Final = frozenset({"streaming"})


def _some_model_cannot_stream(executor: EmpathyLLMExecutor) -> bool:
    """Whether the registry has a model without ``"streaming"`` (then routes need it)."""
    known: bool | None = executor.__dict__.get("_stream_filter")
    if known is None:
        known = any("streaming" not in m.capabilities for m in executor._registry.models)
        executor.__dict__["_stream_filter"] = known  # the registry is fixed per executor
    return known


def _plan(stream: LLMStream) -> None:
    """
    ``stream``'s routes and the router's decision (`_Planner.plan`, models that cannot
    stream left out).

    Raises:
        ConfigurationError: no configured model can serve the request.
        NoModelMeetsConstraintsError: the router's policy says so.
    """
    ex, run = stream._ex, stream._run
    needs = required_capabilities(run.messages, run.options)
    if _some_model_cannot_stream(ex):
        needs |= _STREAMING
    stream._routes = run.planned(ex._planner.plan(run, stream._tier, needs))


def open_stream(
    executor: EmpathyLLMExecutor,
    prompt: Prompt,
    context: ExecutionContext | None,
    options: Mapping[str, Any],
) -> StreamManager:
    """
    `EmpathyLLMExecutor.stream`'s body (see there); ``options`` from `run_options`.

    The input is checked here.  A stream the response cache may answer is planned only
    on entering, after the cache missed, as `EmpathyLLMExecutor.run` plans; any other
    is planned here, so that its routing errors raise from ``stream()``.
    """
    executor._check_open()
    ctx = context_of(context)
    messages, system = _to_messages(prompt, ctx.system)
    task_type, task_tier = executor._planner.task(ctx.task_type, ctx.tier)
    key: str | None = None
    if ctx.cache_ttl is not None:
        if executor._cache is None:
            uncached(executor)  # warned: the setting does nothing here
        else:
            from ._cached import cache_key_of

            key = cache_key_of(ctx, task_type, messages, system, options)
            if key is None:  # a sampled request: warned, as it is not cached
                uncached(executor, SAMPLED)
    stream = LLMStream(executor, _Run(ctx, messages, task_type, system, options), task_tier, key)
    if key is None:
        _plan(stream)
    return StreamManager(stream)


def _ready_pieces(stream: LLMStream, limit: int) -> list[str | ToolCallDelta]:
    """
    Up to ``limit`` pieces that ``stream`` has taken from the provider and not yet
    delivered, delivered now (as `StreamEvents` delivers them without waiting), for
    `empathy_models.sync`'s batches.  None (an empty list) while the run's deadline
    bounds the reading: each read checks it then, so each piece is read on its own.
    """
    ready = stream._ready
    if not ready or stream._state != "streaming" or stream._deadline_at is not None:
        return []
    taken: list[str | ToolCallDelta] = []
    while ready and len(taken) < limit:
        taken.append(stream._delivered(ready.popleft()))
    return taken


class StreamEvents:
    """What `LLMStream.events` returns: an async iterator over every piece."""

    __slots__ = ("_stream",)

    def __init__(self, stream: LLMStream) -> None:
        self._stream = stream

    def __aiter__(self) -> StreamEvents:
        return self

    async def __anext__(self) -> str | ToolCallDelta:
        stream = self._stream
        if stream._ready and stream._state == "streaming" and stream._deadline_at is None:
            # as in `LLMStream.__anext__`
            return stream._delivered(stream._ready.popleft())
        return await stream._next_piece()
