"""
Span building for `empathy_models.observability`: the state of one traced run
(`_RunTrace`, current in `_current` while ``run`` is awaited), and the attributes and
events its spans carry, made from the run, the request, the call record and the answer.
Plain functions over plain values: the `Instrumentation` hooks call them, and
``opentelemetry`` is imported only by `_is_default_textmap`, when asked.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from ._otel_names import (
    _CACHE_READ,
    _CACHE_WRITES,
    _CACHED_INPUT,
    _ERROR_TYPE,
    _INPUT_ESTIMATED,
    _KEY,
    _OUTPUT_ESTIMATED,
    _RESPONSE_MODEL,
    _TEXT_LIMIT,
    _TTFC,
    _Attrs,
)
from .content import ImageBlock, TextBlock, ToolCall, ToolResult

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from ._run import _Run
    from ._values import LLMResponse
    from .abc import Completion, CompletionRequest, Message, Provider
    from .content import Tool
    from .observability import Instrumentation
    from .records import LLMCallRecord, Ticket


class _RunTrace:
    """
    One traced run: its span, the attempt span in flight, and what to record.

    The spans start at the wall time they are made, and end where the latency they stand
    for ends, on the executor's clock (the run's from `start`, an attempt's from when it
    was sent): ``start_ns`` and ``attempt_ns``, their start times, bound those ends.
    """

    __slots__ = (
        "attempt",
        "attempt_attrs",
        "attempt_ns",
        "capture",
        "context",
        "context_token",
        "ended",
        "events",
        "headers_token",
        "obs",
        "over",
        "recording",
        "run_attrs",
        "span",
        "stage",
        "start",
        "start_ns",
        "valid",
        "workflow",
    )

    def __init__(
        self,
        obs: Instrumentation,
        span: Span,
        context: Context,
        workflow: str,
        stage: str,
        start_ns: int,
    ) -> None:
        self.obs = obs
        self.span = span
        self.start_ns = start_ns  # the run span's start time (ns since the epoch)
        # where the run's latency starts, on the executor's clock (`Instrumentation.began`)
        self.start: float | None = None
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
        self.attempt_ns = start_ns  # its start time
        self.attempt_attrs: _Attrs = {}
        # the run span's attributes gathered during the run, set once when it ends
        self.run_attrs: _Attrs = {}
        self.context_token: Token[Context] | None = None
        self.headers_token: Token[Mapping[str, str] | None] | None = None
        # a failed attempt's span, kept until the executor decides to retry (the wait
        # is an event of that span) or moves on; ended at the time its latency ended
        self.ended: tuple[Span, int] | None = None
        # the breaker's events of the attempt in flight, as (name, attributes, time):
        # added to its span once its end is known, no later than it (`_add_events`)
        self.events: list[tuple[str, _Attrs, int]] | None = None
        # the run span has ended (a stream's: `Instrumentation.stream_ended`, which the
        # stream's ways to end may reach twice, the first one ending it); tasks the run
        # started, which keep this state, then add nothing to its spans
        self.over = False


def _add_events(span: Span, events: Iterable[tuple[str, _Attrs, int]], end: int | None) -> None:
    """
    Add an attempt's breaker events to its span, each stamped when it happened or, when
    that was after ``end`` (the span's end: where its call ended, before the feedback
    that caused them), at ``end``.
    """
    for name, attributes, at in events:
        span.add_event(name, attributes, at if end is None else min(at, end))


_current: ContextVar[_RunTrace | None] = ContextVar("empathy_models_run_trace", default=None)
"""The run traced in this task (set while a wrapped ``run`` is awaited)."""


def _wall_ns(clock: Callable[[], float], moment: float, floor: int) -> int:
    """
    A moment of the executor's clock as a span's time.

    Args:
        clock: The executor's clock.
        moment: A reading of it, now or before.
        floor: The span's start (ns since the epoch).

    Returns:
        Now, less how long ago ``moment`` was on ``clock`` (read first, so that a pause
        between the two readings can only make the time later), in ns since the epoch;
        never before ``floor`` (where a clock that is not the real time may put it).
    """
    ago = clock() - moment
    now = time.time_ns()
    if 0.0 < ago < math.inf:
        now -= int(ago * 1e9)
    return max(now, floor)


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


def _seedless(providers: Mapping[str, Provider]) -> frozenset[str]:
    """The names of ``providers`` that send no ``seed`` (the Anthropic API has none)."""
    module = sys.modules.get("empathy_models.providers.anthropic")  # none made unless imported
    if module is None:
        return frozenset()
    anthropic = module.AnthropicProvider
    return frozenset(n for n, p in providers.items() if isinstance(p, anthropic))


# the conventions' finish reasons, from each provider's words (others are kept as they are)
_FINISH_REASONS: Final[Mapping[str, str]] = {
    "end_turn": "stop",  # Anthropic
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",  # cut off at the context window
    "tool_use": "tool_call",
    "refusal": "content_filter",
    "tool_calls": "tool_call",  # OpenAI
    "function_call": "tool_call",
}


def _image_part(block: ImageBlock) -> dict[str, object]:
    """
    An image as the conventions' ``uri`` part (by URL, its credentials masked: a
    password, a signed URL's token) or ``blob`` part (inline).
    """
    if block.url is not None:
        from .providers._wire import masked_url  # not at import: observability stays a leaf

        uri = masked_url(block.url)
        part: dict[str, object] = {"type": "uri", "modality": "image", "uri": uri}
    else:
        part = {"type": "blob", "modality": "image", "content": block.data}
    if block.media_type is not None:
        part["mime_type"] = block.media_type
    return part


def _call_part(call: ToolCall) -> dict[str, object]:
    return {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}


def _parts(content: str | Sequence[object]) -> list[dict[str, object]]:
    """
    A message's content as the conventions' message parts: ``text``, ``uri`` / ``blob``
    (images), ``tool_call`` and ``tool_call_response`` (a `ToolResult`, its content a
    string or the parts of its blocks).
    """
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts: list[dict[str, object]] = []
    for block in content:
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "content": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image_part(block))
        elif isinstance(block, ToolCall):
            parts.append(_call_part(block))
        elif isinstance(block, ToolResult):
            response = block.content
            parts.append(
                {
                    "type": "tool_call_response",
                    "id": block.tool_call_id,
                    "response": response if isinstance(response, str) else _parts(response),
                }
            )
        else:  # pragma: no cover - `Message` holds no other block
            parts.append({"type": str(getattr(block, "type", "unknown"))})
    return parts


def _message_parts(message: Message) -> list[dict[str, object]]:
    """The parts of one input message: a tool's answer, or its content and calls."""
    if message.role == "tool" and message.tool_call_id is not None:
        content = message.content
        response = content if isinstance(content, str) else _parts(content)
        return [{"type": "tool_call_response", "id": message.tool_call_id, "response": response}]
    parts = _parts(message.content)
    parts.extend(_call_part(call) for call in message.tool_calls)
    return parts or [{"type": "text", "content": ""}]


def _input_messages(messages: Iterable[Message]) -> str:
    """``gen_ai.input.messages``: the request's messages in the conventions' schema."""
    return json.dumps(
        [{"role": m.role, "parts": _message_parts(m)} for m in messages],
        ensure_ascii=False,
        default=str,
    )


def _finish_reason(completion: Completion) -> str:
    """The answer's finish reason in the conventions' words, where it has one."""
    reason = completion.stop_reason
    if reason is None:
        return "tool_call" if completion.tool_calls else "stop"
    return _FINISH_REASONS.get(reason, reason)


def _output_messages(completion: Completion) -> str:
    """``gen_ai.output.messages``: the answer's text and tool calls, and why it ended."""
    parts = _parts(completion.content)
    parts.extend(_call_part(call) for call in completion.tool_calls)
    return json.dumps(
        [
            {
                "role": "assistant",
                "parts": parts or [{"type": "text", "content": ""}],
                "finish_reason": _finish_reason(completion),
            }
        ],
        ensure_ascii=False,
        default=str,
    )


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


def _w3c_headers(span: Span) -> dict[str, str] | None:
    """
    What the default propagator writes for ``span`` when there is no baggage, made
    directly (a fifth of the cost of going through it).

    Args:
        span: The attempt span.

    Returns:
        ``traceparent`` (and ``tracestate`` when the span has one), or None for a span
        without a valid context.
    """
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    carrier = {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"}
    if sc.trace_state:
        carrier["tracestate"] = sc.trace_state.to_header()
    return carrier


# ---------------------------------------------------------------------- the run span


def _route_attributes(run: _Run) -> _Attrs:
    """
    The run span's attributes for the routing decision of ``run``.

    Args:
        run: The run, its routes planned.

    Returns:
        The request id, task type, tier, the first route and why it was chosen (with
        the router's decision, when there was one).
    """
    attributes: _Attrs = {
        "empathy_models.request_id": run.request_id,
        "empathy_models.task_type": run.task_type,
        "empathy_models.tier": run.original.tier.value,
        "empathy_models.route.model": run.original.id,
    }
    decision = run.decision
    if decision is not None:
        attributes["empathy_models.route.reason"] = decision.reason[:_TEXT_LIMIT]
        attributes["empathy_models.route.exploration"] = decision.exploration
        if decision.exploration_kind is not None:
            attributes["empathy_models.route.exploration_kind"] = decision.exploration_kind
        attributes["empathy_models.route.constraints_met"] = decision.constraints_met
        if decision.relaxed:
            attributes["empathy_models.route.relaxed"] = list(decision.relaxed)
        if decision.policy_applied is not None:
            attributes["empathy_models.route.policy"] = decision.policy_applied
        if decision.change is not None:
            attributes["empathy_models.route.change"] = decision.change[:_TEXT_LIMIT]
    elif run.context.model is not None:
        attributes["empathy_models.route.reason"] = "pinned by ExecutionContext.model"
    else:
        attributes["empathy_models.route.reason"] = "cheapest available candidate"
    return attributes


def _answer_attributes(response: LLMResponse) -> _Attrs:
    """
    The run span's attributes for the run's answer.

    Args:
        response: The answer (from a model, or from the response cache).

    Returns:
        The model and provider, the fallback chain, the attempts' count and cost; for
        a cached answer, the outcome ``cache_hit`` and its request id (no routes were
        planned: the request id is the answer's).
    """
    attributes: _Attrs = {}
    if response.cached:
        attributes["empathy_models.outcome"] = "cache_hit"
        attributes["empathy_models.request_id"] = response.request_id
    attributes["empathy_models.model"] = response.model
    attributes["empathy_models.provider"] = response.provider
    attributes["empathy_models.fallback_chain"] = list(response.fallback_chain)
    attributes["empathy_models.fallback_used"] = response.fallback_used
    attributes["empathy_models.attempts"] = len(response.attempts)
    attributes["empathy_models.cost_usd"] = response.cost_usd
    return attributes


def _run_error_attributes(exc: BaseException) -> _Attrs:
    """
    The run span's attributes for a run that raised ``exc``.

    Args:
        exc: What the run raised.

    Returns:
        ``error.type`` (the class name) and, for `AllRoutesFailedError`, the number of
        attempts its message gives (the limits' refusals and a deadline that ran out
        before a call, which it holds, were no attempt), each error's class and the
        run's ``request_id``.
    """
    from .exceptions import AllRoutesFailedError, BudgetExceededError
    from .limits import LocalRateLimitError

    attributes: _Attrs = {_ERROR_TYPE: type(exc).__name__}
    if isinstance(exc, AllRoutesFailedError):
        attempts = exc._attempts
        if attempts is None:  # not a run's: its errors but the limits' refusals
            refused = (BudgetExceededError, LocalRateLimitError)
            attempts = sum(not isinstance(e, refused) for e in exc.exceptions)
        attributes["empathy_models.attempts"] = attempts
        attributes["empathy_models.errors"] = [type(e).__name__ for e in exc.exceptions]
        if exc.request_id is not None:
            attributes["empathy_models.request_id"] = exc.request_id
    return attributes


# ---------------------------------------------------------------------- attempt spans


def _attempt_attributes(
    common: _Attrs,
    run: _Run,
    request: CompletionRequest,
    attempt: int,
    capture: bool,
    seeded: bool,
) -> _Attrs:
    """
    An attempt span's attributes at its start.

    Args:
        common: The model's attributes shared with the metrics (operation, provider,
            model, server); copied, never changed.
        run: The run the attempt belongs to.
        request: The request sent to the provider.
        attempt: The attempt's number for this model (1 for the first).
        capture: Whether the prompt is recorded.
        seeded: Whether the provider sends a request's ``seed`` (Anthropic's has none).

    Returns:
        A new attribute dictionary: with ``gen_ai.output.type`` when the request asks
        for a JSON answer, and ``gen_ai.request.seed`` when it sends a seed (both
        conditionally required by the conventions); when ``capture``, the messages, the
        system instructions and the tools offered.
    """
    attributes = dict(common)
    attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if request.temperature is not None:
        attributes["gen_ai.request.temperature"] = float(request.temperature)
    if request.top_p is not None:
        attributes["gen_ai.request.top_p"] = float(request.top_p)
    if request.stop:
        attributes["gen_ai.request.stop_sequences"] = list(request.stop)
    if request.response_format is not None:
        attributes["gen_ai.output.type"] = "json"
    if request.seed is not None and seeded:
        attributes["gen_ai.request.seed"] = request.seed
    attributes["empathy_models.attempt"] = attempt
    session = run.context.session_id
    if session is not None:
        attributes["gen_ai.conversation.id"] = session
    if capture:
        attributes["gen_ai.input.messages"] = _input_messages(request.messages)
        if request.system is not None:
            attributes["gen_ai.system_instructions"] = json.dumps(
                [{"type": "text", "content": request.system}], ensure_ascii=False
            )
        if request.tools:
            attributes["gen_ai.tool.definitions"] = _tool_definitions(request.tools)
    return attributes


def _tool_definitions(tools: Iterable[Tool]) -> str:
    """
    ``gen_ai.tool.definitions``: the tools offered to the model, in the conventions'
    schema (a function's name, description, empty when it has none, and parameters).
    """
    return json.dumps(
        [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description or "",
                "parameters": tool.parameters,
            }
            for tool in tools
        ],
        ensure_ascii=False,
        default=str,
    )


def _admitted_event(admitted: Sequence[Ticket], circuits: list[str]) -> _Attrs:
    """
    The ``empathy_models.breaker.admitted`` event's attributes: one event for the
    admission, whichever breaker keys it went through.

    Args:
        admitted: The breaker's tickets for the call (at least one).
        circuits: Their keys' states (`_BreakerListener.circuits`).

    Returns:
        The keys, their states and whether the call is a probe (a ticket with a lease).
    """
    return {
        _KEY: [t.key for t in admitted],
        "empathy_models.breaker.state": circuits,
        "empathy_models.breaker.probe": any(t.lease_id is not None for t in admitted),
    }


def _input_tokens(record: LLMCallRecord, completion: Completion) -> int:
    """
    ``gen_ai.usage.input_tokens`` of an answered attempt: every prompt token, those the
    provider wrote to its prompt cache or read from it included (Anthropic counts them
    apart from ``input_tokens``; OpenAI's ``cached_input_tokens`` are among them).
    """
    return (
        record.input_tokens
        + completion.cache_read_tokens
        + completion.cache_write_tokens
        + completion.cache_write_1h_tokens
    )


def _estimated(record: LLMCallRecord) -> tuple[bool, bool]:
    """
    Whether ``record``'s input and its output tokens are estimates (the provider did
    not report them), as its metadata says.
    """
    metadata = record.metadata
    return metadata.get(_INPUT_ESTIMATED) is True, metadata.get(_OUTPUT_ESTIMATED) is True


def _flag_estimates(attributes: _Attrs, record: LLMCallRecord) -> None:
    """Say on a span which of its ``gen_ai.usage`` counts are estimates."""
    input_estimated, output_estimated = _estimated(record)
    if input_estimated:
        attributes[_INPUT_ESTIMATED] = True
    if output_estimated:
        attributes[_OUTPUT_ESTIMATED] = True


def _answered_attributes(
    record: LLMCallRecord, completion: Completion, capture: bool, input_tokens: int
) -> _Attrs:
    """
    The attributes an answered attempt's span ends with.

    Args:
        record: The attempt's call record.
        completion: The provider's answer.
        capture: Whether the answer is recorded.
        input_tokens: Its prompt tokens, cached ones included (`_input_tokens`).

    Returns:
        The outcome, response model and id, finish reason, token usage (with the
        prompt tokens written to the provider's cache and read from it, when any, and
        which counts are estimates), cost, time to the first chunk (streams) and, when
        ``capture``, the answer.
    """
    extra: _Attrs = {
        "empathy_models.outcome": record.outcome.value,
        _RESPONSE_MODEL: completion.model,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": record.output_tokens,
        "empathy_models.cost_usd": record.cost_usd,
    }
    _cache_usage(
        extra,
        completion.cache_write_tokens + completion.cache_write_1h_tokens,
        completion.cache_read_tokens + completion.cached_input_tokens,
    )
    if completion.stop_reason is not None:
        extra["gen_ai.response.finish_reasons"] = [completion.stop_reason]
    if completion.response_id is not None:
        extra["gen_ai.response.id"] = completion.response_id
    if record.ttft_ms is not None:
        extra[_TTFC] = record.ttft_ms / 1000.0
    if capture:
        extra["gen_ai.output.messages"] = _output_messages(completion)
    _flag_estimates(extra, record)
    return extra


def _left_attributes(record: LLMCallRecord) -> _Attrs:
    """
    The attributes of a streamed attempt its caller left early (not an error).

    Args:
        record: The attempt's call record.

    Returns:
        The outcome, the tokens counted so far (and which are estimates; the input with
        the prompt tokens the provider's cache wrote or read, which the record's
        metadata holds, as an answered attempt's span has them) and the time to the
        first chunk.
    """
    metadata = record.metadata
    written = sum(_count(metadata, key) for key in _CACHE_WRITES)
    read = _count(metadata, _CACHE_READ)
    left: _Attrs = {
        "empathy_models.outcome": record.outcome.value,
        "gen_ai.usage.input_tokens": record.input_tokens + written + read,
        "gen_ai.usage.output_tokens": record.output_tokens,
    }
    _cache_usage(left, written, read + _count(metadata, _CACHED_INPUT))
    if record.ttft_ms is not None:
        left[_TTFC] = record.ttft_ms / 1000.0
    _flag_estimates(left, record)
    return left


def _cache_usage(attributes: _Attrs, written: int, read: int) -> None:
    """The prompt tokens an attempt wrote to the provider's cache and read from it, if any."""
    if written:
        attributes["gen_ai.usage.cache_creation.input_tokens"] = written
    if read:
        attributes["gen_ai.usage.cache_read.input_tokens"] = read


def _count(metadata: Mapping[str, object], key: str) -> int:
    """The token count ``metadata`` holds under ``key`` (0 when none)."""
    value = metadata.get(key)
    return value if type(value) is int else 0


def _failed_attributes(record: LLMCallRecord, error_type: str) -> _Attrs:
    """
    The attributes a failed attempt's span ends with.

    Args:
        record: The attempt's call record.
        error_type: The error's class name.

    Returns:
        The outcome, ``error.type``, the HTTP status (when there was a response) and the
        time to the first chunk (a stream that failed after it).
    """
    extra: _Attrs = {"empathy_models.outcome": record.outcome.value, _ERROR_TYPE: error_type}
    if record.status_code is not None:
        extra["http.response.status_code"] = record.status_code
    if record.ttft_ms is not None:
        extra[_TTFC] = record.ttft_ms / 1000.0
    return extra
