"""
OpenTelemetry traces and metrics for `EmpathyLLMExecutor` (the ``otel`` extra).

Off by default.  Turn it on with one of::

    EmpathyLLMExecutor(..., tracer_provider=tp, meter_provider=mp)  # these providers
    EmpathyLLMExecutor(..., otel=True)       # the global providers (trace/metrics.set_*)
    EMPATHY_OTEL=1                           # the same, for every executor built after

``pip install 'empathy-models[otel]'`` brings ``opentelemetry-api`` only: the SDK and
the exporters are the application's choice.  Without the API installed, turning it on
raises `ConfigurationError`; while off, nothing of OpenTelemetry is imported and the
executor pays one attribute check per hook.

**Conventions.**  Spans and metrics follow the OpenTelemetry GenAI semantic conventions
in their latest experimental form (status *development*, as published with semantic
conventions v1.41: ``gen_ai.provider.name``, ``gen_ai.input.messages``; what
``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` selects in the
instrumentations that still default to v1.36).  Everything the conventions do not cover
is under the ``empathy_models.`` namespace.

**Traces.**  Each ``run()`` is one INTERNAL span named ``run {workflow}/{stage}``
(the parent is whatever span is current when ``run`` is called), carrying the run's
``empathy_models.request_id``, ``.task_type`` and ``.tier``, the routing decision
(``empathy_models.route.model``, ``.reason``, ``.exploration`` and, for an exploration
pick, ``.exploration_kind``, ``.relaxed``, ``.policy``, ``.constraints_met``), the
outcome (``empathy_models.model``, ``.fallback_chain``, ``.attempts``, ``.cost_usd``; an
answer from the response cache: ``empathy_models.outcome`` ``cache_hit`` and its request
id, with no routing decision and no attempt spans) and, when it fails, ``error.type`` and
an ERROR status.  Its events: ``empathy_models.fallback`` (moving to the next model),
``empathy_models.breaker.rejected`` (a route skipped because its circuit is open; the
provider was not called) and breaker state changes seen while admitting.  Each call of
a provider is a CLIENT child span named ``chat {gen_ai.request.model}`` with
``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.request.max_tokens``,
``gen_ai.request.temperature``, ``gen_ai.request.top_p`` and
``gen_ai.request.stop_sequences`` (when set), ``gen_ai.output.type`` (``json``, when a
``response_format`` asks for it), ``gen_ai.request.seed`` (when sent: Anthropic takes
none), ``server.address`` / ``server.port`` (HTTP
providers; the host only, never the URL), ``gen_ai.conversation.id`` (the context's
``session_id``), and on success ``gen_ai.response.model``, ``gen_ai.response.id``,
``gen_ai.response.finish_reasons`` and ``gen_ai.usage.input_tokens`` /
``output_tokens`` (every prompt token: those a provider's prompt cache wrote or read
included, and counted apart in ``gen_ai.usage.cache_creation.input_tokens`` /
``cache_read.input_tokens``, as the input token usage counts them); a streamed call
also ``gen_ai.response.time_to_first_chunk`` (s, from the request to the first chunk)
once it had one; on failure ``error.type`` (the exception class, as
``LLMCallRecord.error_type``), ``http.response.status_code`` and an ERROR status.
Its events: ``empathy_models.breaker.admitted`` (per breaker key, with the state and
whether the call is a half-open probe), ``empathy_models.breaker.state_changed`` (a
trip or a recovery this call's outcome caused) and ``empathy_models.retry`` (the wait
before the same model is tried again, ``empathy_models.retry.delay_s``).

**Span ends.**  A span ends where the latency it stands for ends, on the executor's
``clock``.  An attempt span: where its call record's ``latency_ms`` ends (what
``gen_ai.client.operation.duration`` records; ``time_to_first_chunk`` is the record's
``ttft_ms``), before the feedback on the call (the telemetry write, the breaker's
report: a state change that report causes is an event of the span stamped at its end);
for a streamed call, when its answer arrived (`CompletionStream.ended_at`, or
when the executor first saw it whole), however long the caller then took to read it.  A
run span that answered (``run()``, a stream read to its end, an answer from the cache):
where the response's ``latency_ms`` ends.  Opened just before their clocks start, spans
last at least those latencies.  A run that failed, or a stream left early, ends its
span when the executor is done with it.

**Content** (``gen_ai.input.messages``, ``gen_ai.system_instructions``,
``gen_ai.output.messages``, as JSON in the conventions' message schema: ``text``,
``uri`` / ``blob`` (images), ``tool_call`` and ``tool_call_response`` parts, and the
output's ``finish_reason`` in the conventions' words: ``stop``, ``length``,
``tool_call``, ``content_filter``; ``gen_ai.response.finish_reasons`` keeps the
provider's), and ``gen_ai.tool.definitions`` (the tools offered to the model: each
function's name, description and parameters, in the conventions' schema), is recorded
only for runs with ``ExecutionContext(record_text=True)``, or for every run when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is ``true`` (or ``span_only`` /
``span_and_event``) when the executor is built.  API keys are never recorded: no
attribute, event or status holds a header or a URL with credentials (an image's
``uri`` part is its URL with a password and secret query options masked).

**Failures.**  A tracer, span processor or meter that raises never fails a call (see
`Instrumentation`), and one signal's failure leaves the other whole: a run whose span
the tracer cannot start goes on with a non-recording span and is still measured; a span
whose writes raise is still ended, its attempt still measured; a meter that raises
leaves the spans complete, and the cost counter (summed in process) still counts.

**Propagation.**  While an attempt span is open, the HTTP providers add the W3C
``traceparent`` (and whatever else the configured propagator writes, by default
``tracestate`` and ``baggage``) of that span to the request.

**Metrics.**

===============================================  ============  ====================================
instrument                                       unit          attributes
===============================================  ============  ====================================
``gen_ai.client.operation.duration``             s             operation, provider, request and
(histogram, the spec's buckets)                                response model, server, error.type
``gen_ai.client.token.usage`` (histogram)        {token}       ... and ``gen_ai.token.type``
``gen_ai.client.operation.time_to_first_chunk``  s             when a provider reports a first
                                                               chunk time (streaming)
``empathy_models.client.cost`` (counter)         USD           provider, model, workflow, stage
``empathy_models.breaker.state`` (gauge)         {state}       ``empathy_models.breaker.key``; 0
                                                               closed, 1 half-open, 2 open,
                                                               3 forced open, 4 disabled
``empathy_models.breaker.transitions``           {transition}  key, ``.from``, ``.to``
``empathy_models.router.picks`` (counter)        {pick}        model, ``.exploration`` (true:
                                                               an exploration pick), workflow,
                                                               stage
``empathy_models.telemetry.queue_depth``         {record}      records accepted, not yet written
``empathy_models.telemetry.records``             {record}      ``.result``: written, failed,
(counter)                                                      spooled, dropped
===============================================  ============  ====================================

The duration, tokens and cost are per provider call (an attempt); rejected routes are
not operations and are not measured.  The tokens are those of answered attempts, as
the provider reported them: a count it left out (a server that sends no usage, or
ignores ``stream_options.include_usage``), which the call record holds as an estimate
(``metadata["empathy_models.output_tokens_estimated"]`` or ``input_tokens_estimated``),
is not token usage, as the conventions require; the attempt span keeps the estimate in
``gen_ai.usage.*`` and says so with the same ``empathy_models.*_tokens_estimated``
attribute.  The cost
is that of every attempt, answered or not (a stream cut short or left by its caller is
charged what its call record says), so it sums to the records' ``cost_usd``.  Breaker
state and transitions are recorded once per breaker even when several executors share
it.  The cost and pick counters are summed in process and reported as observable counters
when a reader collects (the same cumulative sums a synchronous counter gives, with no SDK
measurement on the call path and so no exemplars).  The telemetry record counter sums the
counts of every backend an executor on this meter provider used, including those of
executors since closed, so it never goes down while another executor goes on.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._otel_breaker import _BreakerListener
from ._otel_metrics import _meters_for
from ._otel_names import (
    _ERROR_TYPE,
    _KEY,
    _OPERATION,
    _PROVIDER,
    _REQUEST_MODEL,
    _RESPONSE_MODEL,
    _SERVER_ADDRESS,
    _SERVER_PORT,
    _STAGE,
    _TEXT_LIMIT,
    _WORKFLOW,
    BREAKER_STATE_VALUES,
    DURATION_BUCKETS,
    SCOPE,
    TOKEN_BUCKETS,
    _Attrs,
)
from ._otel_spans import (
    _add_events,
    _admitted_event,
    _answer_attributes,
    _answered_attributes,
    _attempt_attributes,
    _current,
    _estimated,
    _failed_attributes,
    _input_tokens,
    _is_default_textmap,
    _left_attributes,
    _route_attributes,
    _run_error_attributes,
    _RunTrace as _RunTrace,  # the state a stream passes to each hook (streaming.py)
    _seedless,
    _server_of,
    _w3c_headers,
    _wall_ns,
)
from ._propagation import outgoing_headers
from ._validators import shown, warn_caller
from ._values import ExecutionContext, LLMResponse
from ._version import __version__
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

    from ._otel_metrics import _Meters
    from ._run import _Run
    from .abc import Completion, CompletionRequest, Provider
    from .exceptions import CircuitOpenError
    from .records import LLMCallRecord, Ticket
    from .registry import ModelInfo

__all__ = [
    "BREAKER_STATE_VALUES",
    "CAPTURE_CONTENT_ENV",
    "DURATION_BUCKETS",
    "ENABLE_ENV",
    "TOKEN_BUCKETS",
    "Instrumentation",
    "instrumentation_for",
]

logger = logging.getLogger("empathy_models.observability")

R = TypeVar("R")

ENABLE_ENV: Final = "EMPATHY_OTEL"
"""Set to ``1`` / ``true`` to instrument every executor built without ``otel=``."""
CAPTURE_CONTENT_ENV: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""The GenAI instrumentations' switch for recording prompts and answers on spans."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_CAPTURE_ON = frozenset({"1", "true", "span_only", "span_and_event"})
_CAPTURE_OFF = frozenset({"", "0", "false", "no_content", "event_only"})


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigurationError(
        f"{name}={value!r} is not a switch: use 1/true/yes/on or 0/false/no/off"
    )


def _capture_from_env() -> bool:
    value = os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower()
    if value in _CAPTURE_ON:
        return True
    if value not in _CAPTURE_OFF:
        message = (
            f"{CAPTURE_CONTENT_ENV}={value!r} is not understood (true, false, span_only, "
            "span_and_event, event_only, no_content): prompts and answers are not recorded "
            "on spans"
        )
        logger.warning("%s", message)
        warn_caller(message)  # at the line building the executor: seen without logging
    return False


def instrumentation_for(
    otel: object,
    tracer_provider: object,
    meter_provider: object,
    providers: Mapping[str, Provider],
) -> Instrumentation | None:
    """
    The executor's instrumentation, or ``None`` when it is off (the default).

    Args:
        otel: ``None`` means on when a provider is given or ``EMPATHY_OTEL`` says so;
            ``True`` on (the global providers fill in what is not given); ``False`` off.
        tracer_provider, meter_provider: OpenTelemetry providers, or ``None``.
        providers: the executor's providers, by name.

    Raises:
        ConfigurationError: a value of the wrong type, ``otel=False`` together with a
            provider, or OpenTelemetry missing.
    """
    if otel is not None and not isinstance(otel, bool):
        raise ConfigurationError(f"otel must be True, False or None, got {shown(otel)}")
    given = tracer_provider is not None or meter_provider is not None
    if otel is None:
        otel = given or _flag(ENABLE_ENV, os.environ.get(ENABLE_ENV, ""))
    elif not otel and given:
        raise ConfigurationError(
            "otel=False turns OpenTelemetry off, but a tracer_provider or meter_provider "
            "was given: drop one or the other"
        )
    if not otel:
        return None
    try:
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "OpenTelemetry is not installed: pip install 'empathy-models[otel]' (and the "
            "opentelemetry-sdk and exporters of your choice), or leave otel off"
        ) from None
    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise ConfigurationError(
            f"tracer_provider must be an OpenTelemetry TracerProvider, got {shown(tracer_provider)}"
        )
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise ConfigurationError(
            f"meter_provider must be an OpenTelemetry MeterProvider, got {shown(meter_provider)}"
        )
    return Instrumentation(
        tracer_provider,  # type: ignore[arg-type]
        meter_provider,  # type: ignore[arg-type]
        providers=providers,
        capture_content=_capture_from_env(),
    )


_ResponseSets = tuple[_Attrs, _Attrs, _Attrs]


def _response_sets(
    cache: dict[tuple[str, str, str], _ResponseSets],
    record: LLMCallRecord,
    response_model: str,
    common: _Attrs,
) -> _ResponseSets:
    """
    The metric attribute sets of an answered attempt of ``record``'s model: with the
    response model, and that with each token type; made once per model (in ``cache``).
    """
    key = (record.provider, record.model, response_model)
    sets = cache.get(key)
    if sets is None:
        response = {**common, _RESPONSE_MODEL: response_model}
        sets = (
            response,
            {**response, "gen_ai.token.type": "input"},
            {**response, "gen_ai.token.type": "output"},
        )
        if len(cache) > 4096:
            cache.clear()
        cache[key] = sets
    return sets


def _measure(
    meters: _Meters,
    response_sets: dict[tuple[str, str, str], _ResponseSets],
    state: _RunTrace,
    record: LLMCallRecord,
    completion: Completion | None,
    error_type: str | None,
) -> None:
    """
    The metrics of an attempt that ended: answered (``completion``), failed
    (``error_type``) or left by its caller (neither).  ``response_sets``: the
    instrumentation's cache of `_response_sets`.
    """
    # an answer's cost, or what was streamed before a stream was cut short or left:
    # summed first, whatever the SDK's instruments then raise
    if completion is not None or record.cost_usd > 0:
        key = (record.provider, record.model, state.workflow, state.stage)
        meters.cost[key] = meters.cost.get(key, 0.0) + record.cost_usd
    attributes = state.attempt_attrs
    seconds = record.latency_ms / 1000.0
    if completion is not None:
        response, input_attrs, output_attrs = _response_sets(
            response_sets, record, completion.model, attributes
        )
        meters.duration.record(seconds, response)
        # the conventions' rule: counts the provider did not report are not usage
        input_estimated, output_estimated = _estimated(record)
        if not input_estimated:
            meters.tokens.record(_input_tokens(record, completion), input_attrs)
        if not output_estimated:
            meters.tokens.record(record.output_tokens, output_attrs)
        attributes = response
    else:
        if error_type is not None:
            attributes = {**attributes, _ERROR_TYPE: error_type}
        meters.duration.record(seconds, attributes)
    if record.ttft_ms is not None:  # streamed (a failed one: after its first chunk)
        meters.first_chunk.record(record.ttft_ms / 1000.0, attributes)


def _common_attrs(
    cache: dict[tuple[str, str], _Attrs],
    servers: Mapping[str, tuple[str, int] | None],
    info: ModelInfo,
) -> _Attrs:
    """
    The attributes every attempt of ``info`` and its metrics share (operation, provider,
    model, server), made once per model (kept in ``cache``).
    """
    common: _Attrs = {
        _OPERATION: "chat",
        _PROVIDER: info.provider,
        _REQUEST_MODEL: info.id,
    }
    server = servers.get(info.provider)
    if server is not None:
        common[_SERVER_ADDRESS] = server[0]
        common[_SERVER_PORT] = server[1]
    if len(cache) > 4096:
        cache.clear()
    cache[(info.provider, info.id)] = common
    return common


def _log_failure(warned: set[str], where: str) -> None:
    """
    Log a failure inside OpenTelemetry (called in an ``except`` block): the first one in
    each ``where`` as a warning with its traceback, the others at DEBUG (a broken span
    processor or exporter fails on every call).  ``warned``: the places warned about.
    """
    first = where not in warned
    if first:
        if len(warned) > 64:  # the places are a fixed few; bounded all the same
            warned.clear()
        warned.add(where)
    logger.log(
        logging.WARNING if first else logging.DEBUG,
        "OpenTelemetry instrumentation failed in %s (the call goes on%s)",
        where,
        "; further failures there are logged at DEBUG" if first else "",
        exc_info=True,
    )


class Instrumentation:
    """
    The OpenTelemetry side of one executor (built by `instrumentation_for`).

    The executor calls its hooks at the points of a run; each hook does nothing unless
    the run is traced by this instrumentation, and none raises: a failure inside
    OpenTelemetry is logged on ``empathy_models.observability`` (the first at each place
    as a warning with its traceback, the next ones there at DEBUG) and counted in
    ``errors``, never raised into a request.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        *,
        providers: Mapping[str, Provider],
        capture_content: bool = False,
    ) -> None:
        from opentelemetry import baggage, context, metrics, propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracer_provider = tracer_provider or trace.get_tracer_provider()
        meter_provider = meter_provider or metrics.get_meter_provider()
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.capture_content = capture_content
        self.errors = 0
        self._warned: set[str] = set()  # where a failure was logged as a warning
        # the executor's clock, which its latencies are measured on (given by `bind`)
        self._clock: Callable[[], float] = time.perf_counter
        self.telemetry: object | None = None
        self._tracer = tracer_provider.get_tracer(SCOPE, __version__)
        self._meters = _meters_for(meter_provider, __version__)
        self._breakers = _BreakerListener(self, self._meters)
        self._attach = context.attach
        self._detach = context.detach
        self._in_context = trace.set_span_in_context
        # what stands in for a span the tracer failed to start: it records nothing
        self._untraced: Span = trace.INVALID_SPAN
        self._inject = propagate.inject
        self._client = SpanKind.CLIENT
        self._internal = SpanKind.INTERNAL
        self._status = Status
        self._error = StatusCode.ERROR
        self._servers: dict[str, tuple[str, int] | None] = {
            name: _server_of(p) for name, p in providers.items()
        }
        self._seedless = _seedless(providers)  # those that send no `seed`
        self._context_type = ExecutionContext
        self._default_context = ExecutionContext()
        self._response_type = LLMResponse
        # attribute sets reused by every attempt (metric attributes are never mutated)
        self._common: dict[tuple[str, str], _Attrs] = {}
        self._response_attrs: dict[tuple[str, str, str], _ResponseSets] = {}
        self._textmap: object = None
        self._textmap_is_default = False
        self._get_textmap = propagate.get_global_textmap
        self._baggage = baggage.get_all

    def __repr__(self) -> str:
        return (
            f"Instrumentation(tracer_provider={type(self.tracer_provider).__name__}, "
            f"meter_provider={type(self.meter_provider).__name__}, "
            f"capture_content={self.capture_content})"
        )

    def _failed(self, where: str) -> None:
        """Count a failure inside OpenTelemetry and log it (`_log_failure`)."""
        self.errors += 1
        _log_failure(self._warned, where)

    # ------------------------------------------------------------------ lifecycle

    def bind(self, breaker: object, telemetry: object, clock: Callable[[], float]) -> None:
        """
        Listen to ``breaker``'s events, report ``telemetry``'s counters and end spans
        where the latencies measured on ``clock`` end (on enter).
        """
        self._clock = clock
        self._meters.live.add(self)
        self.telemetry = telemetry
        self._breakers.attach(breaker)

    def unbind(self) -> None:
        """Undo `bind` (on exit)."""
        self._meters.live.discard(self)
        self.telemetry = None
        self._breakers.detach()

    # ------------------------------------------------------------------ the run

    def wrap(self, method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        """
        ``method`` (the executor's bound ``run``) inside a run span.  The wrapper holds
        the method weakly: stored on the executor, it makes no reference cycle, so an
        executor left open is still collected (and warned about) at once.
        """
        ref = weakref.WeakMethod(method)

        async def traced(prompt: Any, context: Any = None, *args: Any, **kwargs: Any) -> R:
            method = ref()
            if method is None:  # pragma: no cover - the executor is gone
                raise RuntimeError("the executor this run belonged to was garbage-collected")
            ctx = context if isinstance(context, self._context_type) else self._default_context
            state = self._open_run(ctx.workflow, ctx.stage, "starting the run span")
            span = state.span
            run_token = _current.set(state)
            try:
                context_token: Token[Context] | None = self._attach(state.context)
            except Exception:
                self._failed("making the run span current")
                context_token = None
            end: int | None = None
            try:
                response = await method(prompt, context, *args, **kwargs)
            except BaseException as exc:
                if state.recording:
                    self._run_failed(state, exc)
                raise
            else:
                if state.recording:
                    end = self._run_succeeded(state, response)
                return response
            finally:
                try:
                    if state.attempt is not None or state.ended is not None:
                        self._finish_attempts(state)
                except Exception:
                    self._failed("ending the run span")
                finally:  # the caller's context back, whatever OpenTelemetry raised
                    self._restore(context_token, run_token)
                state.over = True
                self._end(span, end)

        functools.update_wrapper(traced, method)
        traced.__dict__.pop("__wrapped__", None)  # a strong reference to the executor
        return traced

    def _restore(
        self, context_token: Token[Context] | None, run_token: Token[_RunTrace | None]
    ) -> None:
        """Make the context of before a run current again (the run's end)."""
        try:
            if context_token is not None:
                self._detach(context_token)
        except Exception:
            self._failed("restoring the caller's context")
        _current.reset(run_token)

    def _open_run(self, workflow: str, stage: str, where: str, stream: bool = False) -> _RunTrace:
        """
        A run's trace state, its span started.  When the tracer fails (``start_span``
        or the new span raises), a non-recording span stands in for it: the run goes
        on untraced, and its metrics are still recorded.
        """
        start_ns = time.time_ns()
        attributes: _Attrs = {_WORKFLOW: workflow, _STAGE: stage}
        if stream:
            attributes["empathy_models.stream"] = True
        span: Span | None = None
        try:
            span = self._tracer.start_span(
                f"run {workflow}/{stage}",
                kind=self._internal,
                attributes=attributes,
                start_time=start_ns,
            )
            return _RunTrace(self, span, self._in_context(span), workflow, stage, start_ns)
        except Exception:
            self._failed(where)
        if span is not None:  # started, then failed: ended at once, not left open
            self._end(span)
        untraced = self._untraced
        return _RunTrace(self, untraced, self._in_context(untraced), workflow, stage, start_ns)

    def _end(self, span: Span, end_time: int | None = None) -> None:
        """
        End ``span`` at ``end_time`` (ns; None: now).  A span processor that raises in
        ``on_end`` (the span is ended before it is called) is logged; what follows happens.
        """
        try:
            span.end(end_time)
        except Exception:
            self._failed("ending a span (a span processor raised)")

    def began(self, state: _RunTrace | None = None) -> float:
        """The executor's clock now: the run's start, where its answer's latency starts."""
        start = self._clock()
        if (state := state or self._state()) is not None:
            state.start = start
        return start

    # ------------------------------------------------------------------ streams

    def stream_started(self, workflow: str, stage: str) -> _RunTrace:
        """
        A stream's run span, started (not made current: the stream's life spans the
        caller's own code, so the stream passes its state to each hook instead).
        """
        return self._open_run(workflow, stage, "starting the stream span", stream=True)

    def stream_opened(self, state: _RunTrace) -> None:
        """The streamed attempt has its first chunk: stop sending its trace context."""
        try:
            self._release(state)
        except Exception:
            self._failed("recording the stream's first chunk")

    def stream_ended(
        self, state: _RunTrace, response: object = None, error: BaseException | None = None
    ) -> None:
        """
        The stream is over: answered (its span ends where the response's latency ends),
        failed, or left by its caller (neither given).

        Args:
            state: the run's trace state.
            response: the answer, when there was one.
            error: every route failed before the first chunk, `StreamInterruptedError`
                after it, or what reporting the answer raised.
        """
        if state.over:  # ended (an empty answer's failed report comes here twice)
            return
        state.over = True
        end: int | None = None
        try:
            if state.attempt is not None or state.ended is not None:
                self._finish_attempts(state)
            if state.recording:
                if error is not None:
                    self._run_failed(state, error)
                elif response is not None:
                    end = self._run_succeeded(state, response)
                else:
                    state.run_attrs["empathy_models.outcome"] = "cancelled"
                    state.span.set_attributes(state.run_attrs)
        except Exception:
            self._failed("ending the stream span")
        self._end(state.span, end)

    def _run_succeeded(self, state: _RunTrace, response: object) -> int | None:
        """
        The run answered: its span's attributes; its end, where the answer's
        ``latency_ms`` ends (None, now: not an answer, or a run `began` did not time).
        """
        try:
            answer = response if isinstance(response, self._response_type) else None
            if answer is not None:
                state.run_attrs.update(_answer_attributes(answer))
            state.span.set_attributes(state.run_attrs)
            if answer is None or state.start is None:
                return None
            return _wall_ns(self._clock, state.start + answer.latency_ms / 1e3, state.start_ns)
        except Exception:
            self._failed("ending the run span")
            return None

    def _run_failed(self, state: _RunTrace, exc: BaseException) -> None:
        try:
            state.run_attrs.update(_run_error_attributes(exc))
            state.span.set_attributes(state.run_attrs)
            message = f"{type(exc).__name__}: {str(exc)[:_TEXT_LIMIT]}"
            state.span.set_status(self._status(self._error, message))
        except Exception:
            self._failed("ending the run span")

    def _state(self) -> _RunTrace | None:
        state = _current.get()
        return state if state is not None and state.obs is self else None

    def planned(self, run: _Run, state: _RunTrace | None = None) -> None:
        """The run's routes are known: record the routing decision."""
        state = state or self._state()
        if state is None:
            return
        try:
            decision = run.decision
            if state.recording:
                if run.context.record_text:
                    state.capture = True
                state.run_attrs.update(_route_attributes(run))
            if decision is not None:
                self._pick(state, decision.model, decision.exploration)
        except Exception:
            self._failed("recording the routing decision")

    def _pick(self, state: _RunTrace, model: str, exploration: bool) -> None:
        picks = self._meters.picks
        key = (model, exploration, state.workflow, state.stage)
        picks[key] = picks.get(key, 0) + 1

    def fallback(self, run: _Run, info: ModelInfo, state: _RunTrace | None = None) -> None:
        """The run moves from its last model to ``info``."""
        state = state or self._state()
        if state is None:
            return
        try:
            self._finish_attempts(state)
            attributes: _Attrs = {
                "empathy_models.fallback.from": run.chain[-1],
                "empathy_models.fallback.to": info.id,
            }
            if run.errors:
                attributes[_ERROR_TYPE] = type(run.errors[-1]).__name__
            state.span.add_event("empathy_models.fallback", attributes)
        except Exception:
            self._failed("recording a fallback")

    def rejected(
        self,
        info: ModelInfo,
        key: str | None,
        exc: CircuitOpenError,
        state: _RunTrace | None = None,
    ) -> None:
        """An open circuit kept ``info`` from being called."""
        state = state or self._state()
        try:
            circuit = exc.state.value if exc.state is not None else "open"
            key = exc.key or key
            if key is not None:
                self._breakers.remember(key, circuit)
            if state is None:
                return
            self._finish_attempts(state)
            attributes: _Attrs = {
                _REQUEST_MODEL: info.id,
                _PROVIDER: info.provider,
                "empathy_models.breaker.state": circuit,
            }
            if key is not None:
                attributes[_KEY] = key
            if exc.retry_after is not None:
                attributes["empathy_models.breaker.retry_after_s"] = float(exc.retry_after)
            state.span.add_event("empathy_models.breaker.rejected", attributes)
        except Exception:
            self._failed("recording a breaker rejection")

    # ------------------------------------------------------------------ attempts

    def attempt_started(
        self,
        run: _Run,
        info: ModelInfo,
        request: CompletionRequest,
        attempt: int,
        tickets: tuple[Ticket | None, ...],
        state: _RunTrace | None = None,
    ) -> None:
        """``info`` is about to be called (admitted by the breaker, with ``tickets``)."""
        state = state or self._state()
        if state is None:
            return
        common = self._common.get((info.provider, info.id))
        if common is None:
            common = _common_attrs(self._common, self._servers, info)
        state.attempt_attrs = common  # the attempt's metrics' attributes, whatever follows
        try:
            self._finish_attempts(state)
            if not state.valid:  # a no-op tracer: only the metrics need the attempt
                state.attempt = state.span
                return
            seeded = info.provider not in self._seedless
            attributes = _attempt_attributes(common, run, request, attempt, state.capture, seeded)
            state.attempt_ns = start_ns = time.time_ns()
            span = self._tracer.start_span(
                f"chat {info.id}", state.context, self._client, attributes, start_time=start_ns
            )
            state.attempt = span
            admitted = [t for t in tickets if t is not None]
            if admitted and state.recording:
                circuits = self._breakers.circuits(admitted)
                span.add_event(
                    "empathy_models.breaker.admitted", _admitted_event(admitted, circuits)
                )
                self._breakers.admitted(admitted)
            current = self._in_context(span)
            if state.recording:  # the current span for HTTP instrumentation below us
                state.context_token = self._attach(current)
            state.headers_token = outgoing_headers.set(self._trace_headers(span, current))
        except Exception:
            self._failed("starting an attempt span")
            if state.attempt is None:  # no span: the attempt is still measured
                state.attempt = self._untraced

    def _trace_headers(self, span: Span, current: Context) -> Mapping[str, str] | None:
        """The headers carrying ``span``'s context: the configured propagator's."""
        textmap = self._get_textmap()
        if textmap is not self._textmap:
            self._textmap = textmap
            self._textmap_is_default = _is_default_textmap(textmap)
        if self._textmap_is_default and not self._baggage(current):
            return _w3c_headers(span)
        carrier: dict[str, str] = {}
        self._inject(carrier, context=current)
        return carrier or None

    def attempt_ended(
        self,
        record: LLMCallRecord,
        completion: Completion | None = None,
        error: BaseException | None = None,
        state: _RunTrace | None = None,
        sent: float | None = None,
    ) -> None:
        """
        The attempt of ``record`` ended (its feedback given, or cut short by a
        cancellation): with its ``completion``, its ``error``, or neither (a stream the
        caller left: cancelled).  ``sent``: when the call was sent (the executor's clock):
        the span ends where the record's latency ends, as the duration metric measures
        it (a stream's when its answer arrived, not when read; before the feedback).
        """
        state = state or self._state()
        if state is None:
            return
        span = state.attempt
        if span is None:
            return
        state.attempt = None
        events, state.events = state.events, None
        error_type = None
        if completion is None and error is not None:
            error_type = record.error_type or type(error).__name__
        # the metrics and the span apart: a tracer or a meter that raises fails its own
        # signal only
        try:
            _measure(self._meters, self._response_attrs, state, record, completion, error_type)
        except Exception:
            self._failed("measuring an attempt")
        try:
            self._release(state)
        except Exception:
            self._failed("ending an attempt span")
        end = None
        try:
            if sent is not None:
                end = _wall_ns(self._clock, sent + record.latency_ms / 1e3, state.attempt_ns)
            if events is not None:
                _add_events(span, events, end)
            if completion is not None:
                if state.recording:
                    tokens = _input_tokens(record, completion)  # its cached prompt tokens too
                    span.set_attributes(
                        _answered_attributes(record, completion, state.capture, tokens)
                    )
            elif error_type is None:  # a stream left early by its caller: not an error
                if state.recording:
                    span.set_attributes(_left_attributes(record))
            else:
                span.set_attributes(_failed_attributes(record, error_type))
                description = error_type
                if record.error_message:
                    description = f"{error_type}: {record.error_message}"
                span.set_status(self._status(self._error, description))
        except Exception:
            self._failed("ending an attempt span")
        if error_type is None:
            self._end(span, end)
        else:  # ended when the executor has decided whether to wait and retry (at `end`)
            state.ended = (span, time.time_ns() if end is None else end)

    def retry(self, delay: float, state: _RunTrace | None = None) -> None:
        """The executor waits ``delay`` seconds, then calls the same model again."""
        state = state or self._state()
        if state is None or state.ended is None:
            return
        span, at = state.ended
        state.ended = None
        try:
            span.add_event("empathy_models.retry", {"empathy_models.retry.delay_s": delay}, at)
        except Exception:
            self._failed("recording a retry")
        self._end(span, at)

    def _release(self, state: _RunTrace) -> None:
        """Stop sending the attempt's trace context and make the run span current again."""
        headers, state.headers_token = state.headers_token, None
        if headers is not None:
            outgoing_headers.reset(headers)
        token, state.context_token = state.context_token, None
        if token is not None:
            self._detach(token)

    def _finish_attempts(self, state: _RunTrace) -> None:
        ended, state.ended = state.ended, None
        if ended is not None:
            self._end(*ended)
        span, state.attempt = state.attempt, None
        if span is not None:  # left open by an error the executor did not expect
            self._release(state)
            events, state.events = state.events, None
            try:
                if events is not None:
                    _add_events(span, events, None)
                span.set_attribute(_ERROR_TYPE, "_OTHER")
                span.set_status(self._status(self._error, "the attempt did not finish"))
            except Exception:
                self._failed("ending an attempt span")
            self._end(span)
