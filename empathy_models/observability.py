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
(the parent is whatever span is current when ``run`` is called), carrying the routing
decision (``empathy_models.route.model``, ``.reason``, ``.exploration``, ``.relaxed``,
``.policy``, ``.constraints_met``), the outcome (``empathy_models.model``,
``.fallback_chain``, ``.attempts``, ``.cost_usd``) and, when it fails,
``error.type`` and an ERROR status.  Its events: ``empathy_models.fallback`` (moving
to the next model), ``empathy_models.breaker.rejected`` (a route skipped because its
circuit is open; the provider was not called) and breaker state changes seen while
admitting.  Each call of a provider is a CLIENT child span named
``chat {gen_ai.request.model}`` with ``gen_ai.operation.name``,
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.request.max_tokens``,
``gen_ai.request.temperature`` (when set), ``server.address`` / ``server.port`` (HTTP
providers; the host only, never the URL), ``gen_ai.conversation.id`` (the context's
``session_id``), and on success ``gen_ai.response.model``, ``gen_ai.response.id``,
``gen_ai.response.finish_reasons`` and ``gen_ai.usage.input_tokens`` /
``output_tokens``; a streamed call also ``gen_ai.response.time_to_first_chunk`` (s,
from the request to the first chunk) once it had one; on failure ``error.type`` (the
exception class, as ``LLMCallRecord.error_type``), ``http.response.status_code`` and an
ERROR status.
Its events: ``empathy_models.breaker.admitted`` (per breaker key, with the state and
whether the call is a half-open probe), ``empathy_models.breaker.state_changed`` (a
trip or a recovery this call's outcome caused) and ``empathy_models.retry`` (the wait
before the same model is tried again, ``empathy_models.retry.delay_s``).

**Content** (``gen_ai.input.messages``, ``gen_ai.system_instructions``,
``gen_ai.output.messages``, as JSON in the conventions' message schema) is recorded only
for runs with ``ExecutionContext(record_text=True)``, or for every run when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is ``true`` (or ``span_only`` /
``span_and_event``) when the executor is built.  API keys are never recorded: no
attribute, event or status holds a header or a URL with credentials.

**Propagation.**  While an attempt span is open, the HTTP providers add the W3C
``traceparent`` (and whatever else the configured propagator writes, by default
``tracestate`` and ``baggage``) of that span to the request.

**Metrics.**

=============================================  =========  ====================================
instrument                                     unit       attributes
=============================================  =========  ====================================
``gen_ai.client.operation.duration``           s          operation, provider, request and
(histogram, the spec's buckets)                           response model, server, error.type
``gen_ai.client.token.usage`` (histogram)      {token}    ... and ``gen_ai.token.type``
``gen_ai.client.operation.time_to_first_chunk``  s        when a provider reports a first
                                                          chunk time (streaming)
``empathy_models.client.cost`` (counter)       USD        provider, model, workflow, stage
``empathy_models.breaker.state`` (gauge)       1          ``empathy_models.breaker.key``; 0
                                                          closed, 1 half-open, 2 open,
                                                          3 forced open, 4 disabled
``empathy_models.breaker.transitions``         1          key, ``.from``, ``.to``
``empathy_models.router.picks`` (counter)      1          model, ``.exploration`` (true:
                                                          an exploration pick), workflow,
                                                          stage
``empathy_models.telemetry.queue_depth``       {record}   records accepted, not yet written
``empathy_models.telemetry.records``           {record}   ``.result``: written, failed,
(counter)                                                 spooled, dropped
=============================================  =========  ====================================

The duration, tokens and cost are per provider call (an attempt); rejected routes are
not operations and are not measured.  Breaker state and transitions are recorded once per
breaker even when several executors share it.  The cost and pick counters are summed in
process and reported as observable counters when a reader collects (the same cumulative
sums a synchronous counter gives, with no SDK measurement on the call path and so no
exemplars).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary, WeakSet

from ._propagation import outgoing_headers
from ._values import ExecutionContext, LLMResponse
from ._version import __version__
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from ._run import _Run
    from .abc import Completion, CompletionRequest, Message, Provider
    from .breaker import BreakerEvent
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
_Attrs = dict[str, "AttributeValue"]

ENABLE_ENV: Final = "EMPATHY_OTEL"
"""Set to ``1`` / ``true`` to instrument every executor built without ``otel=``."""
CAPTURE_CONTENT_ENV: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""The GenAI instrumentations' switch for recording prompts and answers on spans."""

SCOPE: Final = "empathy_models"
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
"""``gen_ai.client.operation.duration`` buckets, as the conventions specify (seconds)."""
TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
    67108864,
)  # fmt: skip
"""``gen_ai.client.token.usage`` buckets, as the conventions specify."""
BREAKER_STATE_VALUES: Final[Mapping[str, int]] = {
    "closed": 0,
    "half_open": 1,
    "open": 2,
    "forced_open": 3,
    "disabled": 4,
}
"""The value of the ``empathy_models.breaker.state`` gauge for each circuit state."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_CAPTURE_ON = frozenset({"1", "true", "span_only", "span_and_event"})
_CAPTURE_OFF = frozenset({"", "0", "false", "no_content", "event_only"})
_TEXT_LIMIT = 300

# attribute names (the conventions' and ours)
_OPERATION = "gen_ai.operation.name"
_PROVIDER = "gen_ai.provider.name"
_REQUEST_MODEL = "gen_ai.request.model"
_RESPONSE_MODEL = "gen_ai.response.model"
_ERROR_TYPE = "error.type"
_SERVER_ADDRESS = "server.address"
_SERVER_PORT = "server.port"
_WORKFLOW = "empathy_models.workflow"
_STAGE = "empathy_models.stage"
_KEY = "empathy_models.breaker.key"
_TTFC = "gen_ai.response.time_to_first_chunk"


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
        logger.warning(
            "%s=%r is not understood (true, false, span_only, span_and_event, event_only, "
            "no_content): prompts and answers are not recorded on spans",
            CAPTURE_CONTENT_ENV,
            value,
        )
    return False


def instrumentation_for(
    otel: object,
    tracer_provider: object,
    meter_provider: object,
    providers: Mapping[str, Provider],
) -> Instrumentation | None:
    """
    The executor's instrumentation, or ``None`` when it is off (the default).

    ``otel``: ``None`` means on when a provider is given or ``EMPATHY_OTEL`` says so;
    ``True`` on (the global providers fill in what is not given); ``False`` off.
    Raises `ConfigurationError` for a value of the wrong type, ``otel=False`` together
    with a provider, or OpenTelemetry missing.
    """
    if otel is not None and not isinstance(otel, bool):
        raise ConfigurationError(f"otel must be True, False or None, got {otel!r}")
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
            f"tracer_provider must be an OpenTelemetry TracerProvider, got {tracer_provider!r}"
        )
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise ConfigurationError(
            f"meter_provider must be an OpenTelemetry MeterProvider, got {meter_provider!r}"
        )
    return Instrumentation(
        tracer_provider,  # type: ignore[arg-type]
        meter_provider,  # type: ignore[arg-type]
        providers=providers,
        capture_content=_capture_from_env(),
    )


def _server_of(provider: Provider) -> tuple[str, int] | None:
    """(host, port) of an HTTP provider's endpoint; never credentials or a path."""
    base_url = getattr(provider, "base_url", None)
    if not isinstance(base_url, str):
        return None
    try:
        parts = urlsplit(base_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return host, port


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _input_messages(messages: Iterable[Message]) -> str:
    return json.dumps(
        [
            {"role": m.role, "parts": [{"type": "text", "content": _text(m.content)}]}
            for m in messages
        ],
        ensure_ascii=False,
    )


def _output_messages(completion: Completion) -> str:
    return json.dumps(
        [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": _text(completion.content)}],
                "finish_reason": completion.stop_reason or "stop",
            }
        ],
        ensure_ascii=False,
    )


class _RunTrace:
    """One traced run: its span, the attempt span in flight, and what to record."""

    __slots__ = (
        "attempt",
        "attempt_attrs",
        "capture",
        "context",
        "context_token",
        "ended",
        "headers_token",
        "obs",
        "recording",
        "run_attrs",
        "span",
        "stage",
        "valid",
        "workflow",
    )

    def __init__(
        self, obs: Instrumentation, span: Span, context: Context, workflow: str, stage: str
    ) -> None:
        self.obs = obs
        self.span = span
        self.context = context  # the run span's, the attempts' parent
        # false for a span sampled out or a no-op tracer's: no attributes or events then
        self.recording = span.is_recording()
        # false for a no-op tracer's span: its attempts are no-op spans too, and there is
        # no trace context to send
        self.valid = self.recording or span.get_span_context().is_valid
        self.workflow = workflow
        self.stage = stage
        self.capture = obs.capture_content
        self.attempt: Span | None = None  # the attempt span in flight (current)
        self.attempt_attrs: _Attrs = {}
        # the run span's attributes gathered during the run, set once when it ends
        self.run_attrs: dict[str, AttributeValue] = {}
        self.context_token: Token[Context] | None = None
        self.headers_token: Token[Mapping[str, str] | None] | None = None
        # a failed attempt's span, kept until the executor decides to retry (the wait
        # is an event of that span) or moves on; ended with the time it failed
        self.ended: tuple[Span, int] | None = None


def _is_default_textmap(textmap: object) -> bool:
    """True for OpenTelemetry's default propagator: W3C trace context, then baggage."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if type(textmap) is not CompositePropagator:
        return False
    inner = getattr(textmap, "_propagators", None)
    return isinstance(inner, list | tuple) and [type(p) for p in inner] == [
        TraceContextTextMapPropagator,
        W3CBaggagePropagator,
    ]


_current: ContextVar[_RunTrace | None] = ContextVar("empathy_models_run_trace", default=None)


class _Meters:
    """The instruments of one meter provider, shared by every executor using it."""

    def __init__(self, meter_provider: MeterProvider, version: str) -> None:
        from opentelemetry.metrics import Observation

        self._observation = Observation
        meter = meter_provider.get_meter(SCOPE, version)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk in a streaming response.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.transitions = meter.create_counter(
            "empathy_models.breaker.transitions",
            unit="1",
            description="Circuit breaker state changes seen by this process.",
        )
        # The cost and pick counters are summed here on the call path (a dict update) and
        # reported by observable counters when a reader collects: the same cumulative
        # series as synchronous counters, without an SDK measurement per call.
        self.cost: dict[tuple[str, str, str, str], float] = {}
        self.picks: dict[tuple[str, bool, str, str], int] = {}
        meter.create_observable_counter(
            "empathy_models.client.cost",
            callbacks=[self._observe_cost],
            unit="USD",
            description="Estimated cost of the provider calls, from the registry's prices.",
        )
        meter.create_observable_counter(
            "empathy_models.router.picks",
            callbacks=[self._observe_picks],
            unit="1",
            description="Routing decisions; exploration=true counts exploration picks.",
        )
        self.live: WeakSet[Instrumentation] = WeakSet()
        # per breaker: the instrumentation that records its metrics, and its key states
        self.breaker_owner: WeakKeyDictionary[object, Instrumentation] = WeakKeyDictionary()
        self.breaker_states: WeakKeyDictionary[object, dict[str, int]] = WeakKeyDictionary()
        meter.create_observable_gauge(
            "empathy_models.breaker.state",
            callbacks=[self._observe_breakers],
            unit="1",
            description="Circuit state per breaker key: 0 closed, 1 half-open, 2 open, "
            "3 forced open, 4 disabled.",
        )
        meter.create_observable_gauge(
            "empathy_models.telemetry.queue_depth",
            callbacks=[self._observe_queue],
            unit="{record}",
            description="Call records accepted by the telemetry backend, not yet written.",
        )
        meter.create_observable_counter(
            "empathy_models.telemetry.records",
            callbacks=[self._observe_records],
            unit="{record}",
            description="Call records by what became of them: written, failed, spooled "
            "(kept in the spool file for later), dropped.",
        )

    def _backends(self) -> Iterator[object]:
        seen: set[int] = set()
        for obs in list(self.live):
            backend = obs.telemetry
            if backend is not None and id(backend) not in seen:
                seen.add(id(backend))
                yield backend

    def _observe_cost(self, options: CallbackOptions) -> Iterable[Observation]:
        # dict.copy() is atomic under the GIL: a reader's thread may collect while the
        # event loop adds
        return [
            self._observation(
                total,
                {_PROVIDER: provider, _REQUEST_MODEL: model, _WORKFLOW: workflow, _STAGE: stage},
            )
            for (provider, model, workflow, stage), total in self.cost.copy().items()
        ]

    def _observe_picks(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(
                count,
                {
                    _REQUEST_MODEL: model,
                    "empathy_models.router.exploration": exploration,
                    _WORKFLOW: workflow,
                    _STAGE: stage,
                },
            )
            for (model, exploration, workflow, stage), count in self.picks.copy().items()
        ]

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        out: dict[str, int] = {}
        for breaker in list(self.breaker_owner.keys()):  # breakers some executor uses
            out.update(self.breaker_states.get(breaker, {}))
        return [self._observation(value, {_KEY: key}) for key, value in sorted(out.items())]

    def _observe_queue(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for backend in self._backends():
            pending = getattr(backend, "pending", None)
            if type(pending) is int:
                out.append(self._observation(pending))
        if len(out) > 1:  # one series: the sum over the backends in use
            return [self._observation(sum(int(o.value) for o in out))]
        return out

    def _observe_records(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[str, int] = {}
        for backend in self._backends():
            for result in ("written", "failed", "spooled", "dropped"):
                value = getattr(backend, result, None)
                if type(value) is int:
                    totals[result] = totals.get(result, 0) + value
        return [
            self._observation(value, {"empathy_models.telemetry.result": result})
            for result, value in totals.items()
        ]


_meters: WeakKeyDictionary[object, _Meters] = WeakKeyDictionary()
_meters_by_id: dict[int, tuple[object, _Meters]] = {}  # providers that take no weak reference


def _meters_for(meter_provider: MeterProvider, version: str) -> _Meters:
    try:
        meters = _meters.get(meter_provider)
        if meters is None:
            meters = _meters[meter_provider] = _Meters(meter_provider, version)
        return meters
    except TypeError:  # not weakly referenceable: keep it alive with its instruments
        entry = _meters_by_id.get(id(meter_provider))
        if entry is None or entry[0] is not meter_provider:
            entry = _meters_by_id[id(meter_provider)] = (
                meter_provider,
                _Meters(meter_provider, version),
            )
        return entry[1]


class Instrumentation:
    """
    The OpenTelemetry side of one executor (built by `instrumentation_for`).

    The executor calls its hooks at the points of a run; each hook does nothing unless
    the run is traced by this instrumentation, and none raises: a failure inside
    OpenTelemetry is logged on ``empathy_models.observability`` and counted in
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
        self.telemetry: object | None = None
        self._breaker: object | None = None
        self._tracer = tracer_provider.get_tracer(SCOPE, __version__)
        self._meters = _meters_for(meter_provider, __version__)
        self._attach = context.attach
        self._detach = context.detach
        self._in_context = trace.set_span_in_context
        self._inject = propagate.inject
        self._client = SpanKind.CLIENT
        self._internal = SpanKind.INTERNAL
        self._status = Status
        self._error = StatusCode.ERROR
        self._servers: dict[str, tuple[str, int] | None] = {
            name: _server_of(p) for name, p in providers.items()
        }
        self._context_type = ExecutionContext
        self._default_context = ExecutionContext()
        self._response_type = LLMResponse
        # attribute sets reused by every attempt (metric attributes are never mutated)
        self._common: dict[tuple[str, str], _Attrs] = {}
        self._response_attrs: dict[tuple[str, str, str], tuple[_Attrs, _Attrs, _Attrs]] = {}
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
        self.errors += 1
        logger.exception("OpenTelemetry instrumentation failed in %s (the call goes on)", where)

    # ------------------------------------------------------------------ lifecycle

    def bind(self, breaker: object, telemetry: object) -> None:
        """Listen to ``breaker``'s events and report ``telemetry``'s counters (on enter)."""
        meters = self._meters
        meters.live.add(self)
        self.telemetry = telemetry
        add = getattr(breaker, "add_listener", None)
        if callable(add):
            self._breaker = breaker
            add(self._on_breaker_event)
            try:
                if breaker not in meters.breaker_owner:
                    meters.breaker_owner[breaker] = self
                    meters.breaker_states.setdefault(breaker, {})
            except TypeError:  # a breaker without weak references: no breaker metrics
                pass

    def unbind(self) -> None:
        """Undo `bind` (on exit)."""
        breaker, self._breaker = self._breaker, None
        meters = self._meters
        meters.live.discard(self)
        self.telemetry = None
        if breaker is not None:
            remove = getattr(breaker, "remove_listener", None)
            if callable(remove):
                remove(self._on_breaker_event)
            try:
                if meters.breaker_owner.get(breaker) is self:
                    # another executor on the same breaker takes over its metrics
                    heir = next((o for o in meters.live if o._breaker is breaker), None)
                    if heir is not None:
                        meters.breaker_owner[breaker] = heir
                    else:
                        del meters.breaker_owner[breaker]
                        meters.breaker_states.pop(breaker, None)
            except TypeError:
                pass

    def _states(self) -> dict[str, int] | None:
        """The key states this instrumentation records, or None (another one does)."""
        breaker = self._breaker
        if breaker is None:
            return None
        meters = self._meters
        try:
            if meters.breaker_owner.get(breaker) is not self:
                return None
            return meters.breaker_states.get(breaker)
        except TypeError:
            return None

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
            try:
                span = self._tracer.start_span(
                    f"run {ctx.workflow}/{ctx.stage}",
                    kind=self._internal,
                    attributes={_WORKFLOW: ctx.workflow, _STAGE: ctx.stage},
                )
                run_context = self._in_context(span)
                state = _RunTrace(self, span, run_context, ctx.workflow, ctx.stage)
                run_token = _current.set(state)
                context_token = self._attach(run_context)
            except Exception:
                self._failed("starting the run span")
                return await method(prompt, context, *args, **kwargs)
            try:
                response = await method(prompt, context, *args, **kwargs)
            except BaseException as exc:
                if state.recording:
                    self._run_failed(state, exc)
                raise
            else:
                if state.recording:
                    self._run_succeeded(state, response)
                return response
            finally:
                try:
                    if state.attempt is not None or state.ended is not None:
                        self._finish_attempts(state)
                    self._detach(context_token)
                    _current.reset(run_token)
                    span.end()
                except Exception:
                    self._failed("ending the run span")

        functools.update_wrapper(traced, method)
        traced.__dict__.pop("__wrapped__", None)  # a strong reference to the executor
        return traced

    # ------------------------------------------------------------------ streams

    def stream_started(self, workflow: str, stage: str) -> _RunTrace | None:
        """
        A stream's run span, started (not made current: the stream's life spans the
        caller's own code, so the stream passes its state to each hook instead).
        """
        try:
            span = self._tracer.start_span(
                f"run {workflow}/{stage}",
                kind=self._internal,
                attributes={_WORKFLOW: workflow, _STAGE: stage, "empathy_models.stream": True},
            )
            return _RunTrace(self, span, self._in_context(span), workflow, stage)
        except Exception:
            self._failed("starting the stream span")
            return None

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
        The stream is over: answered (``response``), failed (``error``: every route
        failed before the first chunk, or `StreamInterruptedError` after it), or left
        by its caller (neither).
        """
        try:
            if state.attempt is not None or state.ended is not None:
                self._finish_attempts(state)
            if state.recording:
                if error is not None:
                    self._run_failed(state, error)
                elif response is not None:
                    self._run_succeeded(state, response)
                else:
                    state.run_attrs["empathy_models.outcome"] = "cancelled"
                    state.span.set_attributes(state.run_attrs)
            state.span.end()
        except Exception:
            self._failed("ending the stream span")

    def _run_succeeded(self, state: _RunTrace, response: object) -> None:
        try:
            attributes = state.run_attrs
            if not isinstance(response, self._response_type):
                state.span.set_attributes(attributes)
                return
            r: LLMResponse = response
            attributes["empathy_models.model"] = r.model
            attributes["empathy_models.provider"] = r.provider
            attributes["empathy_models.fallback_chain"] = list(r.fallback_chain)
            attributes["empathy_models.fallback_used"] = r.fallback_used
            attributes["empathy_models.attempts"] = len(r.attempts)
            attributes["empathy_models.cost_usd"] = r.cost_usd
            state.span.set_attributes(attributes)
        except Exception:
            self._failed("ending the run span")

    def _run_failed(self, state: _RunTrace, exc: BaseException) -> None:
        from .exceptions import AllRoutesFailedError

        try:
            span = state.span
            error_type = type(exc).__name__
            attributes = state.run_attrs
            attributes[_ERROR_TYPE] = error_type
            if isinstance(exc, AllRoutesFailedError):
                attributes["empathy_models.attempts"] = len(exc.exceptions)
                attributes["empathy_models.errors"] = [type(e).__name__ for e in exc.exceptions]
            span.set_attributes(attributes)
            message = str(exc)[:_TEXT_LIMIT]
            span.set_status(self._status(self._error, f"{error_type}: {message}"))
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
            ctx = run.context
            if not state.recording:
                decision = run.decision
                if decision is not None:
                    self._pick(state, decision.model, decision.exploration)
                return
            if ctx.record_text:
                state.capture = True
            attributes: dict[str, AttributeValue] = {
                "empathy_models.request_id": run.request_id,
                "empathy_models.task_type": run.task_type,
                "empathy_models.tier": run.original.tier.value,
                "empathy_models.route.model": run.original.id,
            }
            decision = run.decision
            if decision is not None:
                attributes["empathy_models.route.reason"] = decision.reason[:_TEXT_LIMIT]
                attributes["empathy_models.route.exploration"] = decision.exploration
                attributes["empathy_models.route.constraints_met"] = decision.constraints_met
                if decision.relaxed:
                    attributes["empathy_models.route.relaxed"] = list(decision.relaxed)
                if decision.policy_applied is not None:
                    attributes["empathy_models.route.policy"] = decision.policy_applied
                if decision.change is not None:
                    attributes["empathy_models.route.change"] = decision.change[:_TEXT_LIMIT]
                self._pick(state, decision.model, decision.exploration)
            elif ctx.model is not None:
                attributes["empathy_models.route.reason"] = "pinned by ExecutionContext.model"
            else:
                attributes["empathy_models.route.reason"] = "cheapest available candidate"
            state.run_attrs.update(attributes)
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
            attributes: dict[str, AttributeValue] = {
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
                self._remember(key, circuit)
            if state is None:
                return
            self._finish_attempts(state)
            attributes: dict[str, AttributeValue] = {
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
        try:
            self._finish_attempts(state)
            common = self._common.get((info.provider, info.id))
            if common is None:
                common = self._common_attrs(info)
            state.attempt_attrs = common
            if not state.valid:  # a no-op tracer: only the metrics need the attempt
                state.attempt = state.span
                return
            attributes = dict(common)
            attributes["gen_ai.request.max_tokens"] = request.max_tokens
            if request.temperature is not None:
                attributes["gen_ai.request.temperature"] = float(request.temperature)
            attributes["empathy_models.attempt"] = attempt
            session = run.context.session_id
            if session is not None:
                attributes["gen_ai.conversation.id"] = session
            if state.capture:
                attributes["gen_ai.input.messages"] = _input_messages(request.messages)
                if request.system is not None:
                    attributes["gen_ai.system_instructions"] = json.dumps(
                        [{"type": "text", "content": request.system}], ensure_ascii=False
                    )
            span = self._tracer.start_span(
                f"chat {info.id}", context=state.context, kind=self._client, attributes=attributes
            )
            state.attempt = span
            admitted = [t for t in tickets if t is not None]
            if admitted and state.recording:
                # one event for the admission, whichever keys it went through
                probe = any(t.lease_id is not None for t in admitted)
                span.add_event(
                    "empathy_models.breaker.admitted",
                    {
                        _KEY: [t.key for t in admitted],
                        "empathy_models.breaker.state": [
                            "half_open" if t.lease_id is not None else "closed" for t in admitted
                        ],
                        "empathy_models.breaker.probe": probe,
                    },
                )
                states = self._states()
                if states is not None:
                    for t in admitted:
                        if t.key not in states:
                            states[t.key] = 1 if t.lease_id is not None else 0
            current = self._in_context(span)
            if state.recording:  # the current span for HTTP instrumentation below us
                state.context_token = self._attach(current)
            state.headers_token = outgoing_headers.set(self._trace_headers(span, current))
        except Exception:
            self._failed("starting an attempt span")

    def _common_attrs(self, info: ModelInfo) -> _Attrs:
        common: _Attrs = {
            _OPERATION: "chat",
            _PROVIDER: info.provider,
            _REQUEST_MODEL: info.id,
        }
        server = self._servers.get(info.provider)
        if server is not None:
            common[_SERVER_ADDRESS] = server[0]
            common[_SERVER_PORT] = server[1]
        if len(self._common) > 4096:
            self._common.clear()
        self._common[(info.provider, info.id)] = common
        return common

    def _trace_headers(self, span: Span, current: Context) -> Mapping[str, str] | None:
        """The headers carrying ``span``'s context: the configured propagator's."""
        textmap = self._get_textmap()
        if textmap is not self._textmap:
            self._textmap = textmap
            self._textmap_is_default = _is_default_textmap(textmap)
        if self._textmap_is_default and not self._baggage(current):
            # what the default propagator (W3C trace context, then baggage) writes, made
            # directly: a fifth of the cost of going through it
            sc = span.get_span_context()
            if not sc.is_valid:
                return None
            carrier = {
                "traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
            }
            if sc.trace_state:
                carrier["tracestate"] = sc.trace_state.to_header()
            return carrier
        carrier = {}
        self._inject(carrier, context=current)
        return carrier or None

    def attempt_ended(
        self,
        record: LLMCallRecord,
        completion: Completion | None = None,
        error: BaseException | None = None,
        state: _RunTrace | None = None,
    ) -> None:
        """
        The attempt of ``record`` ended (its feedback already given): with its
        ``completion``, its ``error``, or neither (a stream the caller left: cancelled).
        """
        state = state or self._state()
        if state is None:
            return
        span = state.attempt
        if span is None:
            return
        state.attempt = None
        try:
            self._release(state)
            attributes = state.attempt_attrs
            meters = self._meters
            seconds = record.latency_ms / 1000.0
            if completion is not None:
                response, input_attrs, output_attrs = self._response_sets(
                    record.provider, record.model, completion.model, attributes
                )
                if state.recording:
                    extra: _Attrs = {
                        "empathy_models.outcome": record.outcome.value,
                        _RESPONSE_MODEL: completion.model,
                        "gen_ai.usage.input_tokens": record.input_tokens,
                        "gen_ai.usage.output_tokens": record.output_tokens,
                        "empathy_models.cost_usd": record.cost_usd,
                    }
                    if completion.stop_reason is not None:
                        extra["gen_ai.response.finish_reasons"] = [completion.stop_reason]
                    if completion.response_id is not None:
                        extra["gen_ai.response.id"] = completion.response_id
                    if record.ttft_ms is not None:
                        extra[_TTFC] = record.ttft_ms / 1000.0
                    if state.capture:
                        extra["gen_ai.output.messages"] = _output_messages(completion)
                    span.set_attributes(extra)
                span.end()
                meters.duration.record(seconds, response)
                meters.tokens.record(record.input_tokens, input_attrs)
                meters.tokens.record(record.output_tokens, output_attrs)
                if record.ttft_ms is not None:
                    meters.first_chunk.record(record.ttft_ms / 1000.0, response)
                cost = meters.cost
                key = (record.provider, record.model, state.workflow, state.stage)
                cost[key] = cost.get(key, 0.0) + record.cost_usd
                return
            if error is None:  # a stream left early by its caller: not an error
                if state.recording:
                    left: _Attrs = {
                        "empathy_models.outcome": record.outcome.value,
                        "gen_ai.usage.input_tokens": record.input_tokens,
                        "gen_ai.usage.output_tokens": record.output_tokens,
                    }
                    if record.ttft_ms is not None:
                        left[_TTFC] = record.ttft_ms / 1000.0
                    span.set_attributes(left)
                span.end()
                meters.duration.record(seconds, attributes)
                if record.ttft_ms is not None:
                    meters.first_chunk.record(record.ttft_ms / 1000.0, attributes)
                return
            error_type = record.error_type or type(error).__name__
            extra = {"empathy_models.outcome": record.outcome.value, _ERROR_TYPE: error_type}
            if record.status_code is not None:
                extra["http.response.status_code"] = record.status_code
            if record.ttft_ms is not None:
                extra[_TTFC] = record.ttft_ms / 1000.0
            span.set_attributes(extra)
            description = error_type
            if record.error_message:
                description = f"{error_type}: {record.error_message}"
            span.set_status(self._status(self._error, description))
            meters.duration.record(seconds, {**attributes, _ERROR_TYPE: error_type})
            if record.ttft_ms is not None:  # a stream that failed after its first chunk
                meters.first_chunk.record(
                    record.ttft_ms / 1000.0, {**attributes, _ERROR_TYPE: error_type}
                )
            # ended when the executor has decided whether to wait and retry
            state.ended = (span, time.time_ns())
        except Exception:
            self._failed("ending an attempt span")

    def _response_sets(
        self, provider: str, model: str, response_model: str, common: _Attrs
    ) -> tuple[_Attrs, _Attrs, _Attrs]:
        key = (provider, model, response_model)
        sets = self._response_attrs.get(key)
        if sets is None:
            response = {**common, _RESPONSE_MODEL: response_model}
            sets = (
                response,
                {**response, "gen_ai.token.type": "input"},
                {**response, "gen_ai.token.type": "output"},
            )
            if len(self._response_attrs) > 4096:
                self._response_attrs.clear()
            self._response_attrs[key] = sets
        return sets

    def retry(self, delay: float, state: _RunTrace | None = None) -> None:
        """The executor waits ``delay`` seconds, then calls the same model again."""
        state = state or self._state()
        if state is None or state.ended is None:
            return
        span, at = state.ended
        state.ended = None
        try:
            span.add_event("empathy_models.retry", {"empathy_models.retry.delay_s": delay}, at)
            span.end(at)
        except Exception:
            self._failed("recording a retry")

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
            ended[0].end(ended[1])
        span, state.attempt = state.attempt, None
        if span is not None:  # left open by an error the executor did not expect
            self._release(state)
            span.set_attribute(_ERROR_TYPE, "_OTHER")
            span.set_status(self._status(self._error, "the attempt did not finish"))
            span.end()

    # ------------------------------------------------------------------ the breaker

    def _remember(self, key: str, circuit: str, *, only_new: bool = False) -> None:
        states = self._states()
        if states is None or (only_new and key in states):
            return
        value = BREAKER_STATE_VALUES.get(circuit)
        if value is not None:
            states[key] = value

    def _on_breaker_event(self, event: BreakerEvent) -> None:
        try:
            kind = event.kind.value
            if kind == "call_rejected":
                return  # the executor reports its own rejections
            attributes: dict[str, AttributeValue] = {}
            if event.key is not None:
                attributes[_KEY] = event.key
            if kind == "state_changed":
                old = event.old_state.value if event.old_state is not None else "closed"
                new = event.new_state.value if event.new_state is not None else "closed"
                attributes["empathy_models.breaker.from"] = old
                attributes["empathy_models.breaker.to"] = new
                if self._states() is not None:
                    self._meters.transitions.add(1, dict(attributes))
                    if event.key is not None:
                        self._remember(event.key, new)
                if event.reason:
                    attributes["empathy_models.breaker.reason"] = event.reason[:_TEXT_LIMIT]
                if event.generation is not None:
                    attributes["empathy_models.breaker.generation"] = event.generation
            elif event.error:
                attributes["empathy_models.breaker.error"] = event.error[:_TEXT_LIMIT]
            state = self._state()
            if state is None:
                return
            span = state.attempt if state.attempt is not None else state.span
            span.add_event(f"empathy_models.breaker.{kind}", attributes)
        except Exception:
            self._failed("recording a breaker event")
