"""
OpenTelemetry that fails: a tracer or a meter that raises never fails a call, and one
broken signal leaves the others whole (a broken tracer still lets the metrics through,
a broken meter the spans), against `FakeLLMServer` and the SDK's in-memory exporters.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from empathy_models import RetryPolicy
from empathy_models.exceptions import InvalidRequestError
from empathy_models.testing import FakeLLMServer

from .test_observability import CTX, PROMPT, Otel, make, otel, server

__all__ = ["otel", "server"]  # the fixtures, used by name

_SPAN_WRITES = ("set_attribute", "set_attributes", "add_event", "set_status")


class _BrokenTracerProvider:
    """A tracer provider whose tracer raises in ``start_span``."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> _BrokenTracerProvider:
        return self

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("exporter on fire")


class _BrokenSpan:
    """An SDK span whose writes raise (attributes, events, status); it still ends."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def __getattr__(self, name: str) -> Any:
        if name in _SPAN_WRITES:

            def broken(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError("span attribute limit plugin on fire")

            return broken
        return getattr(self._span, name)


class _BrokenSpansProvider:
    """The SDK's tracer provider, its spans `_BrokenSpan`s."""

    def __init__(self, sdk: Any) -> None:
        self._tracer = sdk.get_tracer("empathy_models")

    def get_tracer(self, *args: Any, **kwargs: Any) -> _BrokenSpansProvider:
        return self

    def start_span(self, *args: Any, **kwargs: Any) -> _BrokenSpan:
        return _BrokenSpan(self._tracer.start_span(*args, **kwargs))


class _BrokenInstrument:
    def record(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("metric view on fire")

    add = record


class _BrokenMeterProvider:
    """The SDK's meter provider, its synchronous instruments raising when used."""

    def __init__(self, sdk: Any) -> None:
        self._meter = sdk.get_meter("empathy_models")

    def get_meter(self, *args: Any, **kwargs: Any) -> _BrokenMeterProvider:
        return self

    def create_histogram(self, *args: Any, **kwargs: Any) -> _BrokenInstrument:
        return _BrokenInstrument()

    create_counter = create_histogram

    def __getattr__(self, name: str) -> Any:  # the observable instruments: the SDK's
        return getattr(self._meter, name)


def _measured(sdk: Otel) -> tuple[int, float, float]:
    """How many attempts were timed, the tokens counted and the cost summed."""
    durations = sum(p.count for p in sdk.points("gen_ai.client.operation.duration"))
    tokens = sum(p.sum for p in sdk.points("gen_ai.client.token.usage"))
    cost = sum(p.value for p in sdk.points("empathy_models.client.cost"))
    return durations, tokens, cost


async def test_a_tracer_that_cannot_start_spans_keeps_the_metrics(
    server: FakeLLMServer, otel: Otel
) -> None:
    async with make(server, otel, tracer_provider=_BrokenTracerProvider()) as executor:
        ran = await executor.run(PROMPT, CTX)
        async with executor.stream(PROMPT, CTX) as stream:
            streamed = await stream.get_final_response()
    durations, tokens, cost = _measured(otel)
    assert durations == 2
    assert tokens == sum(r.input_tokens + r.output_tokens for r in (ran, streamed))
    assert cost == pytest.approx(ran.cost_usd + streamed.cost_usd) and cost > 0
    assert sum(p.count for p in otel.points("gen_ai.client.operation.time_to_first_chunk")) == 1
    sent = server.last_request("claude-fake-haiku")
    assert sent is not None and "traceparent" not in sent.headers


async def test_spans_that_raise_keep_the_metrics_and_still_end(
    server: FakeLLMServer, otel: Otel
) -> None:
    broken = _BrokenSpansProvider(otel.tracer_provider)
    async with make(server, otel, tracer_provider=broken, retry=RetryPolicy.none()) as executor:
        answered = await executor.run(PROMPT, CTX)
        server.set_outage("*", action=400)
        with pytest.raises(InvalidRequestError):
            await executor.run(PROMPT, CTX)
    durations, tokens, cost = _measured(otel)
    assert durations == 2  # the answered attempt and the failed one
    failed = [
        p
        for p in otel.points("gen_ai.client.operation.duration")
        if p.attributes.get("error.type") == "InvalidRequestError"
    ]
    assert sum(p.count for p in failed) == 1
    assert tokens == answered.input_tokens + answered.output_tokens
    assert cost == pytest.approx(answered.cost_usd)
    # every span was ended and exported, the attempts' too
    names = sorted(s.name for s in otel.spans())
    assert names == ["chat claude-fake-haiku"] * 2 + ["run support/answer"] * 2


async def test_a_meter_that_raises_leaves_the_spans_whole(
    server: FakeLLMServer, otel: Otel
) -> None:
    meters = _BrokenMeterProvider(otel.meter_provider)
    async with make(server, otel, meter_provider=meters, retry=RetryPolicy.none()) as executor:
        answered = await executor.run(PROMPT, CTX)
        server.set_outage("*", action=400)
        with pytest.raises(InvalidRequestError):
            await executor.run(PROMPT, CTX)
    first, second = sorted(
        (s for s in otel.spans() if s.name == "chat claude-fake-haiku"),
        key=lambda s: s.start_time or 0,
    )
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["gen_ai.usage.output_tokens"] == answered.output_tokens
    assert first.attributes["gen_ai.response.model"] == answered.model
    assert second.attributes["error.type"] == "InvalidRequestError"
    assert second.status.status_code is StatusCode.ERROR
    # the cost counter, summed in process, is still reported
    assert sum(p.value for p in otel.points("empathy_models.client.cost")) == pytest.approx(
        answered.cost_usd
    )
