"""
OpenTelemetry traces and metrics (`empathy_models.observability`), through the public
API: a real executor against `FakeLLMServer` on 127.0.0.1, the real HTTP providers and
breaker, and the OpenTelemetry SDK's in-memory span exporter and metric reader.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio.lowlevel
import attrs
import pytest
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    BreakerPolicy,
    Budget,
    ConfigurationError,
    ConfigurationWarning,
    EmpathyLLMExecutor,
    ExecutionContext,
    Message,
    ModelInfo,
    ModelRegistry,
    RetryPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.breaker import CircuitBreaker
from empathy_models.content import ImageBlock, TextBlock, Tool, ToolCall, ToolResult
from empathy_models.exceptions import InvalidRequestError
from empathy_models.observability import DURATION_BUCKETS, TOKEN_BUCKETS
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.records import CircuitBreakerState, OutcomeReport
from empathy_models.testing import FakeLLMServer, FakeReply
from empathy_models.testing.clock import FakeClock

KEY = "sk-ant-test-key-0123456789"

REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="claude-fake-haiku",
            provider="anthropic",
            tier="cheap",
            input_price_per_mtok=0.8,
            output_price_per_mtok=4.0,
            context_window=200_000,
            max_output_tokens=8192,
        ),
        ModelInfo(
            id="gpt-fake-mini",
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=5.0,
            context_window=128_000,
            max_output_tokens=16384,
        ),
    ],
    price_version="test-1",
)
CTX = ExecutionContext(workflow="support", stage="answer", tier="cheap", max_tokens=64)
PROMPT = "Where is my parcel number 4711?"


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await anyio.lowlevel.checkpoint()


class Otel:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        out: list[Any] = []
        if data is None:
            return out
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        out.extend(m.data.data_points)
        return out

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.close()


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=7) as fake:
        yield fake


def make(server: FakeLLMServer, sdk: Otel | None, **options: Any) -> EmpathyLLMExecutor:
    options.setdefault("retry", RetryPolicy(max_attempts=2, jitter=False))
    options.setdefault("telemetry_store", MemoryTelemetryBackend())
    if sdk is not None:
        options.setdefault("tracer_provider", sdk.tracer_provider)
        options.setdefault("meter_provider", sdk.meter_provider)
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        registry=REGISTRY,
        **options,
    )


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    assert ctx.trace_flags.sampled
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def every_text(otel: Otel) -> list[str]:
    """Every string and name OpenTelemetry received: attributes, events, statuses."""
    out: list[str] = []

    def add(attributes: Any) -> None:
        for key, value in (attributes or {}).items():
            out.append(key)
            values = value if isinstance(value, tuple | list) else (value,)
            out.extend(str(v) for v in values)

    for span in otel.spans():
        out.append(span.name)
        add(span.attributes)
        out.append(span.status.description or "")
        for event in span.events:
            out.append(event.name)
            add(event.attributes)
    data = otel.reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    add(point.attributes)
    return out


# --------------------------------------------------------------------------- traces


async def test_a_run_with_a_retry_and_a_fallback_is_one_run_span_with_attempt_children(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.script("claude-fake-haiku", [503, 503])
    sleep = RecordingSleep()
    async with make(server, otel, sleep=sleep) as executor:
        response = await executor.run(PROMPT, CTX)
    assert response.model == "gpt-fake-mini"
    assert sleep.delays == [1.0]

    run = otel.span("run support/answer")
    assert run.kind is SpanKind.INTERNAL
    assert run.parent is None
    attempts = sorted(
        (s for s in otel.spans() if s.name.startswith("chat ")), key=lambda s: s.start_time or 0
    )
    assert [s.name for s in attempts] == [
        "chat claude-fake-haiku",
        "chat claude-fake-haiku",
        "chat gpt-fake-mini",
    ]
    run_ctx = run.get_span_context()
    assert run_ctx is not None
    for span in attempts:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == run_ctx.span_id
        assert span.parent.trace_id == run_ctx.trace_id
        assert span.attributes is not None
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.request.max_tokens"] == 64
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["server.port"] == int(server.url.rsplit(":", 1)[1].strip("/"))
        assert "gen_ai.request.temperature" not in span.attributes  # not set, not sent

    first, second, answer = attempts
    for failed in (first, second):
        assert failed.attributes is not None
        assert failed.attributes["gen_ai.provider.name"] == "anthropic"
        assert failed.attributes["error.type"] == "ServerError"
        assert failed.attributes["http.response.status_code"] == 503
        assert failed.status.status_code is StatusCode.ERROR
    # the wait before the retry is an event of the attempt that failed
    assert [(e.name, dict(e.attributes or {})) for e in first.events] == [
        ("empathy_models.retry", {"empathy_models.retry.delay_s": 1.0})
    ]
    assert [e.name for e in second.events] == []

    assert answer.attributes is not None
    assert answer.status.status_code is StatusCode.UNSET
    assert "error.type" not in answer.attributes
    assert answer.attributes["gen_ai.provider.name"] == "openai"
    assert answer.attributes["gen_ai.request.model"] == "gpt-fake-mini"
    assert answer.attributes["gen_ai.response.model"] == response.response_model
    assert str(answer.attributes["gen_ai.response.id"]).startswith("chatcmpl-")
    assert answer.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert answer.attributes["gen_ai.usage.input_tokens"] == response.input_tokens
    assert answer.attributes["gen_ai.usage.output_tokens"] == response.output_tokens

    assert run.attributes is not None
    assert run.attributes["empathy_models.workflow"] == "support"
    assert run.attributes["empathy_models.route.model"] == "claude-fake-haiku"
    assert run.attributes["empathy_models.model"] == "gpt-fake-mini"
    assert run.attributes["empathy_models.fallback_chain"] == (
        "claude-fake-haiku",
        "gpt-fake-mini",
    )
    assert run.attributes["empathy_models.attempts"] == 3
    assert run.attributes["empathy_models.request_id"] == response.request_id
    assert run.attributes["empathy_models.cost_usd"] == pytest.approx(response.cost_usd)
    fallbacks = [e for e in run.events if e.name == "empathy_models.fallback"]
    assert len(fallbacks) == 1
    assert dict(fallbacks[0].attributes or {}) == {
        "empathy_models.fallback.from": "claude-fake-haiku",
        "empathy_models.fallback.to": "gpt-fake-mini",
        "error.type": "ServerError",
    }
    # the request that answered carried the answering attempt's trace context
    last = server.last_request("gpt-fake-mini")
    assert last is not None
    assert last.headers["traceparent"] == traceparent_of(answer)


async def test_the_traceparent_a_request_carries_is_its_attempt_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    async with make(server, otel) as executor:
        with tracer.start_as_current_span("handle ticket") as parent:
            await executor.run(PROMPT, CTX)
    attempt = otel.span("chat claude-fake-haiku")
    sent = server.last_request("claude-fake-haiku")
    assert sent is not None
    assert sent.headers["traceparent"] == traceparent_of(attempt)
    # the run span joins the caller's trace
    run = otel.span("run support/answer")
    assert run.parent is not None
    assert run.parent.span_id == parent.get_span_context().span_id
    assert attempt.context is not None and run.context is not None
    assert attempt.context.trace_id == run.context.trace_id == parent.get_span_context().trace_id


async def test_without_instrumentation_no_trace_context_is_sent(server: FakeLLMServer) -> None:
    async with make(server, None) as executor:
        await executor.run(PROMPT, CTX)
    sent = server.last_request("claude-fake-haiku")
    assert sent is not None
    assert "traceparent" not in {name.lower() for name in sent.headers}


async def test_a_requested_output_type_and_seed_are_on_the_attempt_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    # conditionally required by the conventions: gen_ai.output.type when the request
    # asks for a format, gen_ai.request.seed when it sends a seed (Anthropic takes none)
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    async with make(server, otel) as executor:
        for model in ("gpt-fake-mini", "claude-fake-haiku"):
            pinned = attrs.evolve(CTX, model=model)
            await executor.run(PROMPT, pinned, response_format=schema, seed=42)
        await executor.run(PROMPT, attrs.evolve(CTX, model="gpt-fake-mini"))
    asked, plain = sorted(
        (s for s in otel.spans() if s.name == "chat gpt-fake-mini"),
        key=lambda s: s.start_time or 0,
    )
    anthropic = otel.span("chat claude-fake-haiku")
    assert asked.attributes is not None and anthropic.attributes is not None
    assert asked.attributes["gen_ai.output.type"] == "json"
    assert asked.attributes["gen_ai.request.seed"] == 42
    assert anthropic.attributes["gen_ai.output.type"] == "json"
    assert "gen_ai.request.seed" not in anthropic.attributes  # not sent there
    assert plain.attributes is not None
    assert "gen_ai.output.type" not in plain.attributes
    assert "gen_ai.request.seed" not in plain.attributes


async def test_the_sampling_options_sent_are_on_the_attempt_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    # recommended by the conventions: each request option the provider is sent
    ctx = attrs.evolve(CTX, model="claude-fake-haiku", temperature=0.3)
    async with make(server, otel) as executor:
        await executor.run(PROMPT, ctx, top_p=0.9, stop=["END", "STOP"])
        await executor.run(PROMPT, attrs.evolve(CTX, model="claude-fake-haiku"))
    sent, plain = sorted(
        (s for s in otel.spans() if s.name == "chat claude-fake-haiku"),
        key=lambda s: s.start_time or 0,
    )
    assert sent.attributes is not None and plain.attributes is not None
    assert sent.attributes["gen_ai.request.temperature"] == pytest.approx(0.3)
    assert sent.attributes["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert sent.attributes["gen_ai.request.stop_sequences"] == ("END", "STOP")
    for name in ("top_p", "stop_sequences"):
        assert f"gen_ai.request.{name}" not in plain.attributes


async def test_all_routes_failed_sets_error_status_and_error_type(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.set_outage("anthropic", action=503)
    server.set_outage("openai", action=500)
    async with make(server, otel, retry=RetryPolicy.none()) as executor:
        with pytest.raises(AllRoutesFailedError):
            await executor.run(PROMPT, CTX)
    run = otel.span("run support/answer")
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description is not None
    assert run.status.description.startswith("AllRoutesFailedError: all routes failed")
    assert run.attributes is not None
    assert run.attributes["error.type"] == "AllRoutesFailedError"
    assert run.attributes["empathy_models.errors"] == ("ServerError", "ServerError")
    for name in ("chat claude-fake-haiku", "chat gpt-fake-mini"):
        span = otel.span(name)
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None and span.attributes["error.type"] == "ServerError"
    durations = otel.points("gen_ai.client.operation.duration")
    assert sorted(
        (p.attributes["gen_ai.request.model"], p.attributes["error.type"], p.count)
        for p in durations
    ) == [("claude-fake-haiku", "ServerError", 1), ("gpt-fake-mini", "ServerError", 1)]


async def test_a_failed_runs_span_counts_attempts_not_refusals_and_names_the_request(
    server: FakeLLMServer, otel: Otel
) -> None:
    # claude-fake-haiku answers 503; the budget cannot cover gpt-fake-mini, which is never
    # called: one attempt, two errors, and the run's request_id to find its records by
    server.set_outage("anthropic", action=503)
    budget = Budget(limit_usd=0.0045)
    async with make(server, otel, retry=RetryPolicy.none(), budgets=[budget]) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run(PROMPT, attrs.evolve(CTX, max_tokens=1000))
    run = otel.span("run support/answer")
    assert run.attributes is not None
    assert run.attributes["empathy_models.errors"] == ("ServerError", "BudgetExceededError")
    assert run.attributes["empathy_models.attempts"] == 1
    assert run.attributes["empathy_models.request_id"] == caught.value.request_id


async def test_a_failed_runs_span_counts_the_attempts_its_error_names(
    server: FakeLLMServer, otel: Otel
) -> None:
    # claude-fake-haiku answers 503; the wait before its retry oversleeps the deadline (a
    # stalled event loop), so the retry is never made: one attempt, as the error says,
    # and its error about the deadline was none
    clock = FakeClock()

    async def oversleep(delay: float) -> None:
        clock.advance(delay + 5.0)
        await asyncio.sleep(0)

    server.script("claude-fake-haiku", [503])
    retry = RetryPolicy(max_attempts=2, base_delay=0.5, jitter=False)
    async with make(server, otel, retry=retry, clock=clock, sleep=oversleep) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run(PROMPT, attrs.evolve(CTX, model="claude-fake-haiku", deadline=2.0))
    assert "after 1 attempt(s)" in str(caught.value)
    run = otel.span("run support/answer")
    assert run.attributes is not None
    assert run.attributes["empathy_models.errors"] == ("ServerError", "ProviderTimeoutError")
    assert run.attributes["empathy_models.attempts"] == 1
    assert [s.name for s in otel.spans() if s.name.startswith("chat ")] == [
        "chat claude-fake-haiku"
    ]


async def test_a_breaker_trip_is_an_event_and_moves_the_state_gauge(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.script("claude-fake-haiku", [503])
    breaker = CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1))
    async with breaker, make(server, otel, breaker=breaker, retry=RetryPolicy.none()) as ex:
        await ex.run(PROMPT, CTX)  # haiku fails once: its circuit opens; mini answers
        gauge = {
            p.attributes["empathy_models.breaker.key"]: p.value
            for p in otel.points("empathy_models.breaker.state")
        }
        assert gauge["anthropic:claude-fake-haiku"] == 2  # open
        assert gauge["openai:gpt-fake-mini"] == 0  # closed
        otel.exporter.clear()
        # pinned to haiku: its breaker rejects the call, mini answers
        response = await ex.run(PROMPT, attrs.evolve(CTX, model="claude-fake-haiku"))
    assert response.model == "gpt-fake-mini"
    assert server.request_counts().get("claude-fake-haiku") == 1

    transitions = otel.points("empathy_models.breaker.transitions")
    assert [(dict(p.attributes), p.value) for p in transitions] == [
        (
            {
                "empathy_models.breaker.key": "anthropic:claude-fake-haiku",
                "empathy_models.breaker.from": "closed",
                "empathy_models.breaker.to": "open",
            },
            1,
        )
    ]
    run = otel.span("run support/answer")
    rejected = [e for e in run.events if e.name == "empathy_models.breaker.rejected"]
    assert len(rejected) == 1
    assert rejected[0].attributes is not None
    assert rejected[0].attributes["gen_ai.request.model"] == "claude-fake-haiku"
    assert rejected[0].attributes["empathy_models.breaker.state"] == "open"
    # a rejected route calls nothing: no attempt span for it
    assert [s.name for s in otel.spans() if s.name.startswith("chat ")] == ["chat gpt-fake-mini"]


async def test_the_trip_is_an_event_of_the_attempt_that_caused_it(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.script("claude-fake-haiku", [503])
    breaker = CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1))
    async with breaker, make(server, otel, breaker=breaker, retry=RetryPolicy.none()) as ex:
        await ex.run(PROMPT, CTX)
    failed = otel.span("chat claude-fake-haiku")
    changed = [e for e in failed.events if e.name == "empathy_models.breaker.state_changed"]
    assert len(changed) == 1
    # the span ends where the call did, before the feedback that tripped the circuit:
    # the trip is stamped no later than that end, as the retry event is
    assert failed.end_time is not None
    assert all(e.timestamp <= failed.end_time for e in failed.events)
    assert changed[0].attributes is not None
    assert changed[0].attributes["empathy_models.breaker.to"] == "open"
    assert changed[0].attributes["empathy_models.breaker.key"] == "anthropic:claude-fake-haiku"
    # one admission event: through the provider's key and the model's, both closed
    admitted = [e for e in failed.events if e.name == "empathy_models.breaker.admitted"]
    assert len(admitted) == 1
    assert dict(admitted[0].attributes or {}) == {
        "empathy_models.breaker.key": ("anthropic", "anthropic:claude-fake-haiku"),
        "empathy_models.breaker.state": ("closed", "closed"),
        "empathy_models.breaker.probe": False,
    }


async def test_an_admission_through_a_disabled_circuit_says_so(
    server: FakeLLMServer, otel: Otel
) -> None:
    # a disabled key admits every call without a lease, as a closed one does: the
    # admission event gives the state the gauge holds, not "closed"
    breaker = CircuitBreaker()
    ctx = attrs.evolve(CTX, model="claude-fake-haiku")
    async with breaker, make(server, otel, breaker=breaker) as ex:
        await breaker.disable("anthropic:claude-fake-haiku")
        await ex.run(PROMPT, ctx)
        gauge = {
            p.attributes["empathy_models.breaker.key"]: p.value
            for p in otel.points("empathy_models.breaker.state")
        }
    assert gauge == {"anthropic": 0, "anthropic:claude-fake-haiku": 4}
    (admitted,) = [
        e for e in otel.span("chat claude-fake-haiku").events if e.name.endswith(".admitted")
    ]
    assert dict(admitted.attributes or {}) == {
        "empathy_models.breaker.key": ("anthropic", "anthropic:claude-fake-haiku"),
        "empathy_models.breaker.state": ("closed", "disabled"),
        "empathy_models.breaker.probe": False,
    }


async def test_a_state_change_seen_after_a_run_ended_is_no_event_of_its_span(
    server: FakeLLMServer, otel: Otel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # exact mode on a shared store: the run's success is sent by a task the run started,
    # which sees another worker's force only after the run ended
    url = f"sqlite:///{tmp_path / 'state.db'}"
    ours, other = CircuitBreaker(url, local_view_ttl=0), CircuitBreaker(url, local_view_ttl=0)
    ctx = attrs.evolve(CTX, model="claude-fake-haiku")
    async with ours, other, make(server, otel, breaker=ours, retry=RetryPolicy.none()) as ex:
        await ex.run(PROMPT, ctx)
        await other.force_open("anthropic:claude-fake-haiku", for_seconds=60)
        response = await ex.run(PROMPT, ctx)
    assert response.model == "gpt-fake-mini"
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]
    first, _ = sorted(
        (s for s in otel.spans() if s.name == "run support/answer"),
        key=lambda s: s.start_time or 0,
    )
    assert first.end_time is not None
    assert all((e.timestamp or 0) <= first.end_time for e in first.events)
    transitions = otel.points("empathy_models.breaker.transitions")
    assert [(p.attributes["empathy_models.breaker.to"], p.value) for p in transitions] == [
        ("forced_open", 1)
    ]


class TracedStore(SQLiteStateStore):
    """A shared store whose client an app traces itself (as a database instrumentation
    would): each ``record`` is a span of the app's tracer, under the current span."""

    def __init__(self, path: Path, tracer: trace.Tracer) -> None:
        super().__init__(path)
        self.tracer = tracer

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        with self.tracer.start_as_current_span("app.store.record"):
            return await super().record(key, policy, reports)


async def test_a_background_task_a_run_started_is_not_part_of_its_trace(
    server: FakeLLMServer, otel: Otel, tmp_path: Path
) -> None:
    # exact mode: the run's success is sent by a task the run started, which outlives
    # it; the app's own spans in that task must not join the run's (ended) trace
    store = TracedStore(tmp_path / "state.db", otel.tracer_provider.get_tracer("app"))
    breaker = CircuitBreaker(store, local_view_ttl=0)
    ctx = attrs.evolve(CTX, model="claude-fake-haiku")
    async with (
        store,
        breaker,
        make(server, otel, breaker=breaker, retry=RetryPolicy.none()) as ex,
    ):
        await ex.run(PROMPT, ctx)
    sent = [s for s in otel.spans() if s.name == "app.store.record"]
    assert sent and [s.parent for s in sent] == [None] * len(sent)  # not the run's children


# --------------------------------------------------------------------------- content


CONTENT_KEYS = (
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.definitions",
)


async def test_no_content_is_recorded_unless_opted_in(server: FakeLLMServer, otel: Otel) -> None:
    ctx = ExecutionContext(workflow="support", stage="answer", tier="cheap", system="Be brief.")
    tool = Tool(name="track", description="Track a parcel by its number.")
    async with make(server, otel) as executor:
        response = await executor.run(PROMPT, ctx, tools=[tool])
    texts = every_text(otel)
    assert not any(key in texts for key in CONTENT_KEYS)
    assert not any(PROMPT in t or "Be brief." in t or "Track a" in t for t in texts)
    assert not any(response.content in t for t in texts)


async def test_record_text_puts_the_messages_on_the_attempt_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    ctx = ExecutionContext(
        workflow="support", stage="answer", tier="cheap", system="Be brief.", record_text=True
    )
    async with make(server, otel) as executor:
        response = await executor.run(PROMPT, ctx)
    attempt = otel.span("chat claude-fake-haiku")
    assert attempt.attributes is not None
    assert json.loads(str(attempt.attributes["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}
    ]
    assert json.loads(str(attempt.attributes["gen_ai.system_instructions"])) == [
        {"type": "text", "content": "Be brief."}
    ]
    assert json.loads(str(attempt.attributes["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": response.content}],
            "finish_reason": "stop",  # Anthropic's "end_turn", in the conventions' words
        }
    ]


async def test_recorded_messages_follow_the_conventions_message_schema(
    server: FakeLLMServer, otel: Otel
) -> None:
    # content blocks, images, the calls an assistant made and the tool's answer, each in
    # the part type the GenAI conventions give it
    pixel = ImageBlock.from_bytes(b"\x89PNG-not-really", "image/png")
    messages = [
        Message(
            role="user",
            content=[
                TextBlock(text="What is the weather?"),
                ImageBlock.from_url("https://example.com/a.png"),
                pixel,
            ],
        ),
        Message(
            role="assistant",
            content="Let me look.",
            tool_calls=[
                ToolCall(id="c1", name="weather", arguments={"city": "Paris"}),
                ToolCall(id="c2", name="weather", arguments={"city": "Oslo"}),
            ],
        ),
        Message(role="tool", content="sunny", tool_call_id="c1"),
        Message(role="user", content=[ToolResult(tool_call_id="c2", content="rainy")]),
    ]
    tool = Tool(
        name="weather",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
    ctx = attrs.evolve(CTX, record_text=True)
    async with make(server, otel) as executor:
        await executor.run(messages, attrs.evolve(ctx, model="gpt-fake-mini"))
        called = await executor.run(
            "Weather in Paris?",
            attrs.evolve(ctx, model="claude-fake-haiku"),
            tools=[tool],
            tool_choice="required",
        )
    attempt = otel.span("chat gpt-fake-mini")
    assert attempt.attributes is not None
    assert json.loads(str(attempt.attributes["gen_ai.input.messages"])) == [
        {
            "role": "user",
            "parts": [
                {"type": "text", "content": "What is the weather?"},
                {"type": "uri", "modality": "image", "uri": "https://example.com/a.png"},
                {
                    "type": "blob",
                    "modality": "image",
                    "mime_type": "image/png",
                    "content": pixel.data,
                },
            ],
        },
        {
            "role": "assistant",
            "parts": [
                {"type": "text", "content": "Let me look."},
                {
                    "type": "tool_call",
                    "id": "c1",
                    "name": "weather",
                    "arguments": {"city": "Paris"},
                },
                {
                    "type": "tool_call",
                    "id": "c2",
                    "name": "weather",
                    "arguments": {"city": "Oslo"},
                },
            ],
        },
        {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": "c1", "response": "sunny"}],
        },
        {
            "role": "user",
            "parts": [{"type": "tool_call_response", "id": "c2", "response": "rainy"}],
        },
    ]
    (call,) = called.tool_calls
    attempt = otel.span("chat claude-fake-haiku")
    assert attempt.attributes is not None
    assert json.loads(str(attempt.attributes["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [
                {"type": "tool_call", "id": call.id, "name": "weather", "arguments": call.arguments}
            ],
            "finish_reason": "tool_call",  # Anthropic's "tool_use"
        }
    ]
    # the tools the model was offered, in the conventions' tool definition schema
    assert json.loads(str(attempt.attributes["gen_ai.tool.definitions"])) == [
        {
            "type": "function",
            "name": "weather",
            "description": "",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),  # Anthropic: cut off at the window
        ("refusal", "content_filter"),
    ],
)
async def test_a_cut_off_answers_finish_reason_is_the_conventions(
    server: FakeLLMServer, otel: Otel, stop_reason: str, finish_reason: str
) -> None:
    server.script("claude-fake-haiku", [FakeReply(content="Your parcel", stop_reason=stop_reason)])
    ctx = attrs.evolve(CTX, model="claude-fake-haiku", record_text=True)
    async with make(server, otel) as executor:
        await executor.run(PROMPT, ctx)
    attempt = otel.span("chat claude-fake-haiku")
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.response.finish_reasons"] == (stop_reason,)
    (message,) = json.loads(str(attempt.attributes["gen_ai.output.messages"]))
    assert message["finish_reason"] == finish_reason


async def test_a_recorded_image_urls_credentials_are_masked(
    server: FakeLLMServer, otel: Otel
) -> None:
    # the prompt is recorded, but no attribute holds a URL with credentials
    secret = "hunter2-image-store"
    url = f"https://reader:{secret}@images.example.com/a.png?X-Amz-Security-Token={secret}&w=64"
    image = Message(role="user", content=[TextBlock(text="What is it?"), ImageBlock.from_url(url)])
    ctx = attrs.evolve(CTX, model="gpt-fake-mini", record_text=True)
    async with make(server, otel) as executor:
        await executor.run([image], ctx)
    attempt = otel.span("chat gpt-fake-mini")
    assert attempt.attributes is not None
    (message,) = json.loads(str(attempt.attributes["gen_ai.input.messages"]))
    assert message["parts"][1]["uri"] == (
        "https://reader:***@images.example.com/a.png?X-Amz-Security-Token=***&w=64"
    )
    assert not any(secret in text for text in every_text(otel))


async def test_the_capture_content_switch_records_content_for_every_run(
    server: FakeLLMServer, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    async with make(server, otel) as executor:
        await executor.run(PROMPT, CTX)
    attempt = otel.span("chat claude-fake-haiku")
    assert attempt.attributes is not None
    assert PROMPT in str(attempt.attributes["gen_ai.input.messages"])


async def test_a_capture_content_switch_not_understood_is_a_configuration_warning(
    server: FakeLLMServer, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "yes please")
    with pytest.warns(ConfigurationWarning, match="'yes please' is not understood") as given:
        executor = make(server, otel)
    assert given[0].filename == __file__  # seen without logging set up, at the caller's line
    async with executor:
        await executor.run(PROMPT, CTX)
    attempt = otel.span("chat claude-fake-haiku")
    assert attempt.attributes is not None
    assert "gen_ai.input.messages" not in attempt.attributes


async def test_no_api_key_reaches_opentelemetry(server: FakeLLMServer, otel: Otel) -> None:
    server.script("claude-fake-haiku", [401])
    ctx = ExecutionContext(workflow="support", stage="answer", tier="cheap", record_text=True)
    async with make(server, otel) as executor:
        await executor.run(PROMPT, ctx)
    texts = every_text(otel)
    assert any("AuthenticationError" in t for t in texts)  # the failure is there ...
    assert not any(KEY in t or KEY[:12] in t for t in texts)  # ... the key is not
    assert not any(t.lower() in ("authorization", "x-api-key") for t in texts)


# --------------------------------------------------------------------------- metrics


async def test_genai_metrics_follow_the_conventions(
    server: FakeLLMServer, otel: Otel, tmp_path: Path
) -> None:
    telemetry = MemoryTelemetryBackend()
    router = AdaptiveModelRouter(REGISTRY, telemetry, seed=3, refresh_interval=None)
    async with router, make(server, otel, telemetry_store=telemetry, router=router) as executor:
        responses = [await executor.run(PROMPT, CTX) for _ in range(3)]

    durations = otel.points("gen_ai.client.operation.duration")
    assert sum(p.count for p in durations) == 3
    for point in durations:
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS
        assert point.attributes["gen_ai.operation.name"] == "chat"
        assert point.attributes["server.address"] == "127.0.0.1"
        assert "error.type" not in point.attributes
    tokens = otel.points("gen_ai.client.token.usage")
    assert tuple(tokens[0].explicit_bounds) == TOKEN_BUCKETS
    by_type = {
        kind: sum(p.sum for p in tokens if p.attributes["gen_ai.token.type"] == kind)
        for kind in ("input", "output")
    }
    assert by_type == {
        "input": sum(r.input_tokens for r in responses),
        "output": sum(r.output_tokens for r in responses),
    }
    cost = otel.points("empathy_models.client.cost")
    assert sum(p.value for p in cost) == pytest.approx(sum(r.cost_usd for r in responses))
    picks = otel.points("empathy_models.router.picks")
    assert sum(p.value for p in picks) == 3
    explored = sum(
        p.value for p in picks if p.attributes["empathy_models.router.exploration"] is True
    )
    assert explored == sum(
        1 for r in responses if r.routing_decision is not None and r.routing_decision.exploration
    )
    # each run's span says what an exploration pick was for (a cold start: "unproven")
    runs = sorted(
        (s for s in otel.spans() if s.name.startswith("run ")), key=lambda s: s.start_time or 0
    )
    kinds = [(s.attributes or {}).get("empathy_models.route.exploration_kind") for s in runs]
    assert kinds == [r.routing_decision and r.routing_decision.exploration_kind for r in responses]
    assert "unproven" in kinds


async def test_metric_units_follow_the_conventions_naming_rules(
    server: FakeLLMServer, otel: Otel
) -> None:
    # a count is annotated in curly braces ({token}); "1" is the unit of a ratio, which
    # none of these is (an OTLP-to-Prometheus translation names a gauge in "1" *_ratio)
    server.script("claude-fake-haiku", [503])
    telemetry = MemoryTelemetryBackend()
    router = AdaptiveModelRouter(REGISTRY, telemetry, seed=3, refresh_interval=None)
    breaker = CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1))
    async with (
        router,
        breaker,
        make(server, otel, telemetry_store=telemetry, router=router, breaker=breaker) as executor,
    ):
        await executor.run(PROMPT, CTX)
        data = otel.reader.get_metrics_data()
    assert data is not None
    units = {
        metric.name: metric.unit
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert units == {
        "gen_ai.client.operation.duration": "s",
        "gen_ai.client.token.usage": "{token}",
        "empathy_models.client.cost": "USD",
        "empathy_models.router.picks": "{pick}",
        "empathy_models.breaker.transitions": "{transition}",
        "empathy_models.breaker.state": "{state}",
    }  # (the telemetry's record counts, in {record}: a memory backend keeps none)


async def test_anthropic_prompt_cache_tokens_are_input_tokens(
    server: FakeLLMServer, otel: Otel
) -> None:
    # Anthropic reports the prompt tokens written to its cache and read from it apart
    # from input_tokens; the conventions count them in gen_ai.usage.input_tokens (and the
    # input token usage) and name them in their own attributes
    manual = "Each ledger field, what it means and how to read it. " * 100
    cached = {"system": [{"type": "text", "text": manual, "cache_control": {"type": "ephemeral"}}]}
    telemetry = MemoryTelemetryBackend()
    pinned = attrs.evolve(CTX, model="claude-fake-haiku")
    async with make(server, otel, telemetry_store=telemetry) as executor:
        for _ in range(2):
            await executor.run(PROMPT, pinned, extra_body=cached)
    wrote, read = sorted(await telemetry.recent(limit=10), key=lambda r: r.timestamp)
    written = wrote.metadata["empathy_models.cache_write_tokens"]
    assert isinstance(written, int)
    assert written > 0 and read.metadata["empathy_models.cache_read_tokens"] == written
    first, second = sorted(
        (s for s in otel.spans() if s.name == "chat claude-fake-haiku"),
        key=lambda s: s.start_time or 0,
    )
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["gen_ai.usage.input_tokens"] == wrote.input_tokens + written
    assert first.attributes["gen_ai.usage.cache_creation.input_tokens"] == written
    assert "gen_ai.usage.cache_read.input_tokens" not in first.attributes
    assert second.attributes["gen_ai.usage.input_tokens"] == read.input_tokens + written
    assert second.attributes["gen_ai.usage.cache_read.input_tokens"] == written
    assert "gen_ai.usage.cache_creation.input_tokens" not in second.attributes
    inputs = [
        p
        for p in otel.points("gen_ai.client.token.usage")
        if p.attributes["gen_ai.token.type"] == "input"
    ]
    assert sum(p.sum for p in inputs) == wrote.input_tokens + read.input_tokens + 2 * written


async def test_token_counts_the_provider_did_not_report_are_not_token_usage(
    server: FakeLLMServer, otel: Otel
) -> None:
    # an OpenAI-compatible server that reports the prompt's tokens and leaves the
    # output's out: the output count is an estimate, which the conventions keep out of
    # the usage metric; the span keeps it, flagged
    telemetry = MemoryTelemetryBackend()
    pinned = attrs.evolve(CTX, model="gpt-fake-mini")
    server.script("gpt-fake-mini", [FakeReply(usage={"prompt_tokens": 12})])
    async with make(server, otel, telemetry_store=telemetry) as executor:
        partial = await executor.run(PROMPT, pinned)
        whole = await executor.run(PROMPT, pinned)
    assert partial.output_tokens > 0  # estimated from the answer's text
    by_type = {
        kind: sum(
            p.sum
            for p in otel.points("gen_ai.client.token.usage")
            if p.attributes["gen_ai.token.type"] == kind
        )
        for kind in ("input", "output")
    }
    assert by_type == {"input": 12 + whole.input_tokens, "output": whole.output_tokens}
    first, second = sorted(
        (s for s in otel.spans() if s.name == "chat gpt-fake-mini"),
        key=lambda s: s.start_time or 0,
    )
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["gen_ai.usage.output_tokens"] == partial.output_tokens
    assert first.attributes["empathy_models.output_tokens_estimated"] is True
    assert "empathy_models.input_tokens_estimated" not in first.attributes
    assert "empathy_models.output_tokens_estimated" not in second.attributes


async def test_telemetry_queue_and_record_counters_are_reported(
    server: FakeLLMServer, otel: Otel, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    async with make(server, otel, telemetry_store=url) as executor:
        await executor.run(PROMPT, CTX)
        depth = otel.points("empathy_models.telemetry.queue_depth")
        assert len(depth) == 1 and depth[0].value >= 0
        results = {
            p.attributes["empathy_models.telemetry.result"]
            for p in otel.points("empathy_models.telemetry.records")
        }
        assert {"failed", "spooled", "dropped"} <= results


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "direct"])
async def test_the_records_written_to_sqlite_are_counted(
    server: FakeLLMServer, otel: Otel, tmp_path: Path, batch: bool
) -> None:
    # the default persistent store: its writes are the records counter's "written"
    url = f"sqlite:///{tmp_path / 'calls.db'}?batch={str(batch).lower()}"
    async with make(server, otel, telemetry_store=url) as executor:
        for _ in range(3):
            await executor.run(PROMPT, CTX)
        store = executor.telemetry_store
        assert store is not None
        await store.flush()
        counts = {
            p.attributes["empathy_models.telemetry.result"]: p.value
            for p in otel.points("empathy_models.telemetry.records")
        }
    assert counts.get("written") == 3


async def test_the_records_counter_keeps_the_counts_of_executors_that_closed(
    server: FakeLLMServer, otel: Otel, tmp_path: Path
) -> None:
    # a counter never goes down: the records of an executor closed (and freed) while
    # another one goes on stay counted
    def written() -> int:
        counts = {
            p.attributes["empathy_models.telemetry.result"]: p.value
            for p in otel.points("empathy_models.telemetry.records")
        }
        return int(counts.get("written", 0))

    seen = []
    async with make(server, otel, telemetry_store=f"sqlite:///{tmp_path / 'a.db'}") as first:
        second = make(server, otel, telemetry_store=f"sqlite:///{tmp_path / 'b.db'}")
        async with second:
            for executor in (first, first, second):
                await executor.run(PROMPT, CTX)
            for executor in (first, second):
                store = executor.telemetry_store
                assert store is not None
                await store.flush()
            seen.append(written())
        del second, store
        gc.collect()
        seen.append(written())
        await first.run(PROMPT, CTX)
        first_store = first.telemetry_store
        assert first_store is not None
        await first_store.flush()
        seen.append(written())
    assert seen == [3, 3, 4]


# --------------------------------------------------------------------------- switches


async def test_a_failing_tracer_never_fails_a_run(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            return self

        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter on fire")

    async with make(server, None, tracer_provider=Broken(), meter_provider=MeterProvider()) as ex:
        response = await ex.run(PROMPT, CTX)
    assert response.content
    assert "OpenTelemetry instrumentation failed" in caplog.text


class FailingProcessor(SpanProcessor):
    """A span processor whose backend is down: ending a run or attempt span raises."""

    def on_end(self, span: ReadableSpan) -> None:
        if span.name.startswith(("run ", "chat ")):
            raise ConnectionError("collector unreachable")


async def test_a_span_processor_that_raises_leaves_the_callers_context_and_metrics(
    server: FakeLLMServer, otel: Otel
) -> None:
    otel.tracer_provider.add_span_processor(FailingProcessor())
    app = otel.tracer_provider.get_tracer("app")
    async with make(server, otel, retry=RetryPolicy.none()) as executor:
        with app.start_as_current_span("request") as mine:
            answered = await executor.run(PROMPT, CTX)
            assert trace.get_current_span() is mine
            server.set_outage("*", action=400)
            with pytest.raises(InvalidRequestError):
                await executor.run(PROMPT, CTX)
            # the caller's span is current again, whatever the processor did
            assert trace.get_current_span() is mine
    # the answered attempt is measured in full, the failed ones timed
    tokens = otel.points("gen_ai.client.token.usage")
    assert sum(p.sum for p in tokens) == answered.input_tokens + answered.output_tokens
    (cost,) = otel.points("empathy_models.client.cost")
    assert cost.value == pytest.approx(answered.cost_usd)
    assert sum(p.count for p in otel.points("gen_ai.client.operation.duration")) == 2
    # every span was still ended and exported
    assert len([s for s in otel.spans() if s.name == "run support/answer"]) == 2


async def test_a_span_processor_that_keeps_failing_is_warned_about_once(
    server: FakeLLMServer, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    otel.tracer_provider.add_span_processor(FailingProcessor())
    caplog.set_level(logging.DEBUG, logger="empathy_models.observability")
    async with make(server, otel) as executor:
        for _ in range(5):
            await executor.run(PROMPT, CTX)
    failures = [
        r
        for r in caplog.records
        if r.name == "empathy_models.observability"
        and "OpenTelemetry instrumentation failed" in r.getMessage()
    ]
    warnings = [r for r in failures if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].exc_info is not None  # the first one with its traceback
    assert "ConnectionError: collector unreachable" in caplog.text
    # the others (a run span and an attempt span each run) only at DEBUG
    assert len(failures) == 10
    assert all(r.levelno == logging.DEBUG for r in failures if r is not warnings[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"otel": "yes"}, "otel must be True, False or None"),
        ({"otel": False, "tracer_provider": TracerProvider()}, "otel=False"),
        ({"tracer_provider": object()}, "tracer_provider must be an OpenTelemetry"),
        ({"meter_provider": "prometheus"}, "meter_provider must be an OpenTelemetry"),
    ],
)
def test_bad_switches_raise_configuration_error(
    server: FakeLLMServer, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make(server, None, **options)


def test_a_bad_enable_variable_raises(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMPATHY_OTEL", "maybe")
    with pytest.raises(ConfigurationError, match="EMPATHY_OTEL='maybe'"):
        make(server, None)


_SCRIPT = """
import asyncio, os, sys
from empathy_models import EmpathyLLMExecutor, ExecutionContext
from empathy_models.backends import NullTelemetryBackend
from empathy_models.testing.fakes import FakeProvider

async def main():
    async with EmpathyLLMExecutor(
        [FakeProvider(name="openai")], telemetry_store=NullTelemetryBackend()
    ) as executor:
        await executor.run("hi", ExecutionContext(tier="cheap"))
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

if os.environ.get("SETUP_GLOBAL"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
asyncio.run(main())
if os.environ.get("SETUP_GLOBAL"):
    print([s.name for s in exporter.get_finished_spans()])
"""


def _script(**env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return out.stdout.strip().splitlines()


def test_off_by_default_opentelemetry_is_not_even_imported() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EMPATHY_OTEL"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    assert out == "[]"


def test_the_environment_switch_uses_the_global_providers() -> None:
    names = ast.literal_eval(_script(EMPATHY_OTEL="1", SETUP_GLOBAL="1")[-1])
    assert len(names) == 2
    assert names[1] == "run default/default"
    assert names[0].startswith("chat ")  # the attempt ends first


# --------------------------------------------------------------------------- edges


async def test_a_cancelled_call_ends_its_spans_with_cancelled_error(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.script("claude-fake-haiku", ["hang"])
    async with make(server, otel) as executor:
        task = asyncio.create_task(executor.run(PROMPT, CTX))
        await server.wait_for_requests(1, model="claude-fake-haiku")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    attempt = otel.span("chat claude-fake-haiku")
    assert attempt.attributes is not None
    assert attempt.attributes["error.type"] == "CancelledError"
    assert attempt.status.status_code is StatusCode.ERROR
    run = otel.span("run support/answer")
    assert run.attributes is not None and run.attributes["error.type"] == "CancelledError"


async def test_a_run_answered_from_the_cache_says_so_on_its_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    ctx = attrs.evolve(CTX, temperature=0, cache_ttl=60)
    async with make(server, otel, cache="memory://") as executor:
        called = await executor.run(PROMPT, ctx)
        hit = await executor.run(PROMPT, ctx)
    assert not called.cached and hit.cached
    first, second = sorted(
        (s for s in otel.spans() if s.name == "run support/answer"),
        key=lambda s: s.start_time or 0,
    )
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["empathy_models.request_id"] == called.request_id
    assert "empathy_models.outcome" not in first.attributes
    assert second.attributes["empathy_models.outcome"] == "cache_hit"
    assert second.attributes["empathy_models.request_id"] == hit.request_id
    assert second.attributes["empathy_models.attempts"] == 0
    assert len([s for s in otel.spans() if s.name.startswith("chat ")]) == 1


async def test_a_stream_answered_from_the_cache_says_so_on_its_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    ctx = attrs.evolve(CTX, temperature=0, cache_ttl=60)
    answers = []
    async with make(server, otel, cache="memory://") as executor:
        for _ in range(2):
            async with executor.stream(PROMPT, ctx) as stream:
                answers.append(await stream.get_final_response())
    called, hit = answers
    assert not called.cached and hit.cached
    first, second = sorted(
        (s for s in otel.spans() if s.name == "run support/answer"),
        key=lambda s: s.start_time or 0,
    )
    assert first.attributes is not None and second.attributes is not None
    assert "empathy_models.outcome" not in first.attributes
    assert second.attributes["empathy_models.stream"] is True
    assert second.attributes["empathy_models.outcome"] == "cache_hit"
    assert second.attributes["empathy_models.request_id"] == hit.request_id
    assert second.attributes["empathy_models.attempts"] == 0
    assert len([s for s in otel.spans() if s.name.startswith("chat ")]) == 1


async def test_a_stream_whose_routing_fails_after_a_cache_miss_ends_its_span_with_it(
    server: FakeLLMServer, otel: Otel
) -> None:
    # constraints and no router to judge them: routing fails once the cache has missed
    ctx = attrs.evolve(CTX, temperature=0, cache_ttl=60, max_cost=0.5)
    async with make(server, otel, cache="memory://") as executor:
        with pytest.raises(ConfigurationError, match="no router"):
            await executor.run(PROMPT, ctx)
        with pytest.raises(ConfigurationError, match="no router"):
            async with executor.stream(PROMPT, ctx):
                pass
    ran, streamed = sorted(
        (s for s in otel.spans() if s.name == "run support/answer"),
        key=lambda s: s.start_time or 0,
    )
    for span in (ran, streamed):
        assert span.attributes is not None
        assert span.attributes["error.type"] == "ConfigurationError"
        assert span.status.status_code is StatusCode.ERROR
    assert streamed.attributes is not None and streamed.attributes["empathy_models.stream"]
    assert not [s for s in otel.spans() if s.name.startswith("chat ")]
    assert server.requests() == 0


async def test_a_sampled_out_run_still_propagates_its_trace_context_and_counts(
    server: FakeLLMServer,
) -> None:
    sdk = Otel()
    sdk.tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    sdk.tracer_provider.add_span_processor(SimpleSpanProcessor(sdk.exporter))
    try:
        async with make(server, sdk) as executor:
            await executor.run(PROMPT, CTX)
        assert sdk.spans() == []
        sent = server.last_request("claude-fake-haiku")
        assert sent is not None
        version, trace_id, span_id, flags = sent.headers["traceparent"].split("-")
        assert version == "00"
        assert int(flags, 16) & 1 == 0  # valid ids, not sampled
        assert int(trace_id, 16) and int(span_id, 16)
        assert sum(p.count for p in sdk.points("gen_ai.client.operation.duration")) == 1
    finally:
        sdk.close()


async def test_metrics_without_a_tracer_and_counters_that_only_grow(
    server: FakeLLMServer, otel: Otel
) -> None:
    # metrics on, traces off (the API's no-op tracer): the attempts are still measured,
    # no trace context is sent, and the cost counter is a cumulative sum across
    # collections
    async with make(server, otel, tracer_provider=trace.NoOpTracerProvider()) as executor:
        first = await executor.run(PROMPT, CTX)
        cost_1 = sum(p.value for p in otel.points("empathy_models.client.cost"))
        second = await executor.run(PROMPT, CTX)
    sent = server.last_request("claude-fake-haiku")
    assert sent is not None and "traceparent" not in sent.headers
    assert otel.spans() == []
    durations = otel.points("gen_ai.client.operation.duration")
    assert sum(p.count for p in durations) == 2
    assert {p.attributes["gen_ai.request.model"] for p in durations} == {"claude-fake-haiku"}
    (cost,) = otel.points("empathy_models.client.cost")
    assert cost_1 == pytest.approx(first.cost_usd) and first.cost_usd > 0
    assert cost.value == pytest.approx(first.cost_usd + second.cost_usd)
    assert cost.attributes == {
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-fake-haiku",
        "empathy_models.workflow": "support",
        "empathy_models.stage": "answer",
    }


class _HeaderPropagator(TextMapPropagator):
    """A propagator of the application's own (as B3 or Jaeger would be)."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        return context

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        span = trace.get_current_span(context)
        carrier["x-app-trace"] = f"{span.get_span_context().span_id:016x}"

    @property
    def fields(self) -> set[str]:
        return {"x-app-trace"}


async def test_the_configured_propagator_writes_the_headers(
    server: FakeLLMServer, otel: Otel
) -> None:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(_HeaderPropagator())
    try:
        async with make(server, otel) as executor:
            await executor.run(PROMPT, CTX)
    finally:
        propagate.set_global_textmap(before)
    sent = server.last_request("claude-fake-haiku")
    assert sent is not None
    attempt = otel.span("chat claude-fake-haiku")
    assert attempt.context is not None
    assert sent.headers["x-app-trace"] == f"{attempt.context.span_id:016x}"
    assert "traceparent" not in sent.headers


async def test_a_breaker_shared_by_two_executors_is_counted_once(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.script("claude-fake-haiku", [503])
    breaker = CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1))
    options: dict[str, Any] = {"breaker": breaker, "retry": RetryPolicy.none()}
    async with breaker, make(server, otel, **options) as one, make(server, otel, **options):
        await one.run(PROMPT, CTX)
    transitions = otel.points("empathy_models.breaker.transitions")
    assert sum(p.value for p in transitions) == 1


def test_an_instrumented_executor_is_freed_without_the_cycle_collector(
    server: FakeLLMServer, otel: Otel
) -> None:
    gc.disable()
    try:
        executor = make(server, otel)
        ref = weakref.ref(executor)
        del executor
        assert ref() is None
    finally:
        gc.enable()


def test_the_public_names_stay_importable_from_observability() -> None:
    from empathy_models import observability

    for name in observability.__all__:
        assert hasattr(observability, name), name
    assert observability.BREAKER_STATE_VALUES["open"] == 2
    assert list(observability.DURATION_BUCKETS) == sorted(observability.DURATION_BUCKETS)
