"""
OpenTelemetry for `EmpathyLLMExecutor.stream`: the same run span and CLIENT attempt
spans as `run()`, ended when the stream ends however it ends, the streamed request's
``traceparent``, and the ``time_to_first_chunk`` metric, against `FakeLLMServer`.
"""

from __future__ import annotations

import asyncio
import logging

import attrs
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from empathy_models import (
    AllRoutesFailedError,
    BreakerPolicy,
    RetryPolicy,
    StreamInterruptedError,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.breaker import CircuitBreaker
from empathy_models.records import LLMCallRecord
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior

from .test_observability import (
    CTX,
    PROMPT,
    Otel,
    RecordingSleep,
    every_text,
    make,
    otel,
    server,
    traceparent_of,
)

__all__ = ["otel", "server"]  # the fixtures, used by name

TTFC = "gen_ai.client.operation.time_to_first_chunk"
TTFC_ATTR = "gen_ai.response.time_to_first_chunk"


def attempts_of(sdk: Otel) -> list[ReadableSpan]:
    return sorted(
        (s for s in sdk.spans() if s.name.startswith("chat ")), key=lambda s: s.start_time or 0
    )


async def test_a_streamed_run_with_a_fallback_before_its_first_chunk(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.script("claude-fake-haiku", [503])
    async with (
        make(server, otel, sleep=RecordingSleep(), retry=RetryPolicy.none()) as executor,
        executor.stream(PROMPT, CTX) as stream,
    ):
        text = "".join([delta async for delta in stream])
        response = await stream.get_final_response()
    assert text == response.content and response.model == "gpt-fake-mini"
    run = otel.span("run support/answer")
    assert run.kind is SpanKind.INTERNAL and run.status.status_code is StatusCode.UNSET
    assert run.attributes is not None
    assert run.attributes["empathy_models.stream"] is True
    assert run.attributes["empathy_models.model"] == "gpt-fake-mini"
    assert run.attributes["empathy_models.fallback_chain"] == ("claude-fake-haiku", "gpt-fake-mini")
    assert run.attributes["empathy_models.request_id"] == response.request_id
    assert [e.name for e in run.events] == ["empathy_models.fallback"]
    failed, answer = attempts_of(otel)
    run_ctx = run.get_span_context()
    assert run_ctx is not None
    for span in (failed, answer):
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == run_ctx.span_id
    assert failed.name == "chat claude-fake-haiku"
    assert failed.status.status_code is StatusCode.ERROR
    attributes = answer.attributes
    assert attributes is not None and failed.attributes is not None
    assert failed.attributes["error.type"] == "ServerError"
    assert attributes["gen_ai.usage.output_tokens"] == response.output_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert str(attributes["gen_ai.response.id"]).startswith("chatcmpl-")
    # the answering request carried the answering attempt's trace context
    sent = server.last_request("gpt-fake-mini")
    assert sent is not None and sent.body["stream"] is True
    assert sent.headers["traceparent"] == traceparent_of(answer)
    # the time to first chunk, in seconds, for the streamed attempt that had one
    (point,) = otel.points(TTFC)
    assert point.count == 1 and 0 < point.sum < 5
    assert point.attributes["gen_ai.request.model"] == "gpt-fake-mini"
    # ... and on its span, the same figure (the failed attempt never had a first chunk)
    assert attributes[TTFC_ATTR] == pytest.approx(point.sum)
    assert TTFC_ATTR not in failed.attributes
    assert sum(p.count for p in otel.points("gen_ai.client.token.usage")) == 2


async def test_an_interrupted_stream_ends_its_spans_with_an_error(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.set_behavior(
        "claude-fake-haiku",
        ModelBehavior(content="one two three four five", stream=StreamBehavior(fault_after=2)),
    )
    async with make(server, otel) as executor:
        with pytest.raises(StreamInterruptedError):
            async with executor.stream(PROMPT, CTX) as stream:
                await stream.get_final_response()
    run = otel.span("run support/answer")
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None
    assert run.attributes["error.type"] == "StreamInterruptedError"
    (attempt,) = attempts_of(otel)
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.attributes is not None
    assert attempt.attributes["error.type"] == "OverloadedError"
    (point,) = otel.points(TTFC)  # it had its first chunk before failing
    assert point.attributes["error.type"] == "OverloadedError"
    assert attempt.attributes[TTFC_ATTR] == pytest.approx(point.sum)


async def test_a_stream_left_early_ends_its_spans_as_cancelled(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.set_behavior("claude-fake-haiku", ModelBehavior(content="one two three four five"))
    async with make(server, otel) as executor, executor.stream(PROMPT, CTX) as stream:
        async for _ in stream:
            break
    run = otel.span("run support/answer")
    (attempt,) = attempts_of(otel)
    assert run.end_time is not None and attempt.end_time is not None
    assert run.attributes is not None and run.attributes["empathy_models.outcome"] == "cancelled"
    assert attempt.attributes is not None
    assert attempt.attributes["empathy_models.outcome"] == "cancelled"
    ttfc = attempt.attributes[TTFC_ATTR]  # it had its first chunk
    assert isinstance(ttfc, float) and ttfc > 0
    assert run.status.status_code is StatusCode.UNSET
    assert attempt.status.status_code is StatusCode.UNSET


async def test_a_stream_left_early_counts_its_cached_prompt_in_its_spans_input_tokens(
    server: FakeLLMServer, otel: Otel
) -> None:
    """
    ``gen_ai.usage.input_tokens`` counts the prompt tokens Anthropic wrote to its cache
    (reported apart from ``input_tokens``), as an answered attempt's span does: the span
    of a stream left early gave the uncached rest alone (8 of the prompt's 1,333).
    """
    manual = "Each ledger field, what it means and how to read it. " * 100
    cached = {"system": [{"type": "text", "text": manual, "cache_control": {"type": "ephemeral"}}]}
    server.set_behavior("claude-fake-haiku", ModelBehavior(content="one two three four five"))
    telemetry = MemoryTelemetryBackend()
    pinned = attrs.evolve(CTX, model="claude-fake-haiku")
    async with (
        make(server, otel, telemetry_store=telemetry) as executor,
        executor.stream(PROMPT, pinned, extra_body=cached) as stream,
    ):
        async for _ in stream:
            break
    (record,) = await telemetry.recent(limit=10)
    written = record.metadata["empathy_models.cache_write_tokens"]
    assert isinstance(written, int) and written > record.input_tokens > 0
    (attempt,) = attempts_of(otel)
    assert attempt.attributes is not None
    assert attempt.attributes["empathy_models.outcome"] == "cancelled"
    assert attempt.attributes["gen_ai.usage.input_tokens"] == record.input_tokens + written
    assert attempt.attributes["gen_ai.usage.cache_creation.input_tokens"] == written
    assert "gen_ai.usage.cache_read.input_tokens" not in attempt.attributes


async def test_a_stream_no_route_answers_is_one_failed_run_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.set_outage("*")
    async with make(server, otel, sleep=RecordingSleep(), retry=RetryPolicy.none()) as executor:
        with pytest.raises(AllRoutesFailedError):
            async with executor.stream(PROMPT, CTX):
                pass
    run = otel.span("run support/answer")
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["error.type"] == "AllRoutesFailedError"
    assert len(attempts_of(otel)) == 2
    assert otel.points(TTFC) == []


async def test_no_stream_content_or_key_reaches_opentelemetry_unless_opted_in(
    server: FakeLLMServer, otel: Otel
) -> None:
    server.set_behavior("claude-fake-haiku", ModelBehavior(content="secret answer text"))
    async with make(server, otel) as executor, executor.stream("secret prompt text", CTX) as s:
        await s.get_final_response()
    texts = " ".join(every_text(otel))
    assert "secret" not in texts and "sk-ant-test" not in texts


class StalledTelemetry(MemoryTelemetryBackend):
    """Memory telemetry whose writes wait until released (says when one has begun)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def record(self, record: LLMCallRecord) -> None:
        self.entered.set()
        await self.release.wait()
        await super().record(record)


async def _cancelled_while_reported(
    server: FakeLLMServer, otel: Otel, *, leave_early: bool
) -> tuple[ReadableSpan, ReadableSpan]:
    """
    A stream read to its end (or left after its first delta), its reader cancelled
    while the attempt is reported (the telemetry write stalls); the run's span and
    the attempt's, both ended.
    """
    telemetry = StalledTelemetry()
    async with make(server, otel, telemetry_store=telemetry) as executor:

        async def read() -> None:
            async with executor.stream(PROMPT, CTX) as stream:
                async for _ in stream:
                    if leave_early:
                        break

        task = asyncio.create_task(read())
        await telemetry.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        telemetry.release.set()
    run = otel.span("run support/answer")
    (attempt,) = attempts_of(otel)
    assert run.end_time is not None and attempt.end_time is not None
    return run, attempt


async def test_a_stream_cancelled_while_its_answer_is_reported_still_ends_its_spans(
    server: FakeLLMServer, otel: Otel
) -> None:
    # the last delta is read, the answer is being reported, and the reader is cancelled
    run, attempt = await _cancelled_while_reported(server, otel, leave_early=False)
    # the provider answered in full: the attempt is a success, measured as one
    assert attempt.attributes is not None
    assert attempt.attributes["empathy_models.outcome"] == "success"
    assert attempt.status.status_code is StatusCode.UNSET
    assert sum(p.count for p in otel.points("gen_ai.client.token.usage")) == 2
    # ... but the caller never had it
    assert run.attributes is not None and run.attributes["empathy_models.outcome"] == "cancelled"


async def test_the_cost_counter_counts_attempts_that_failed_or_were_left(
    server: FakeLLMServer, otel: Otel
) -> None:
    # a stream left after its first delta and a streamed attempt cut short are charged
    # (their records say so): the cost counter agrees with the records, model by model
    telemetry = MemoryTelemetryBackend()
    server.set_behavior("claude-fake-haiku", ModelBehavior(content="one two three four five"))
    server.script("gpt-fake-mini", ["truncated"])
    pinned = attrs.evolve(CTX, model="gpt-fake-mini")
    async with make(server, otel, telemetry_store=telemetry) as executor:
        async with executor.stream(PROMPT, CTX) as stream:
            async for _ in stream:
                break
        async with executor.stream(PROMPT, pinned) as stream:
            await stream.get_final_response()
    records = await telemetry.recent()
    outcomes = {(r.model, r.outcome.value) for r in records if r.cost_usd > 0}
    assert {("claude-fake-haiku", "cancelled"), ("gpt-fake-mini", "failure")} <= outcomes
    recorded: dict[str, float] = {}
    for r in records:
        recorded[r.model] = recorded.get(r.model, 0.0) + r.cost_usd
    counted = {
        p.attributes["gen_ai.request.model"]: p.value
        for p in otel.points("empathy_models.client.cost")
    }
    assert counted == pytest.approx(recorded)


async def test_a_stream_left_early_whose_reader_is_cancelled_during_the_report_ends_its_run_span(
    server: FakeLLMServer, otel: Otel
) -> None:
    # the caller leaves after the first delta; while the left attempt is reported (the
    # telemetry write stalls) its task is cancelled: both spans still end
    server.set_behavior("claude-fake-haiku", ModelBehavior(content="one two three four five"))
    run, attempt = await _cancelled_while_reported(server, otel, leave_early=True)
    assert run.attributes is not None and run.attributes["empathy_models.outcome"] == "cancelled"
    assert attempt.attributes is not None
    assert attempt.attributes["empathy_models.outcome"] == "cancelled"


async def test_an_empty_streamed_answer_cancelled_while_reported_ends_its_run_span_once(
    server: FakeLLMServer, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    # an empty answer is complete inside `async with`: its report is cancelled there,
    # and the run span, ended by the report's failure, is not ended again by `async with`
    server.set_behavior("claude-fake-haiku", ModelBehavior(content=""))
    telemetry = StalledTelemetry()
    caplog.set_level(logging.WARNING, logger="opentelemetry")
    async with make(server, otel, telemetry_store=telemetry) as executor:

        async def read() -> None:
            async with executor.stream(PROMPT, CTX):
                pass

        task = asyncio.create_task(read())
        await telemetry.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        telemetry.release.set()
    run = otel.span("run support/answer")
    assert run.attributes is not None and run.attributes["empathy_models.outcome"] == "cancelled"
    assert run.status.status_code is StatusCode.UNSET
    ended_spans = [r.getMessage() for r in caplog.records if "ended span" in r.getMessage()]
    assert ended_spans == []


async def test_a_breaker_trip_is_an_event_of_the_streamed_attempt_that_caused_it(
    server: FakeLLMServer, otel: Otel
) -> None:
    # before the first chunk (haiku's 503) and after it (mini cut short): each trip is
    # an event of its attempt's span, as for `run`
    server.script("claude-fake-haiku", [503])
    server.set_behavior(
        "gpt-fake-mini",
        ModelBehavior(content="one two three four five", stream=StreamBehavior(fault_after=2)),
    )
    breaker = CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1))
    async with breaker, make(server, otel, breaker=breaker, retry=RetryPolicy.none()) as ex:
        with pytest.raises(StreamInterruptedError):
            async with ex.stream(PROMPT, CTX) as stream:
                await stream.get_final_response()
    for name, key in [
        ("chat claude-fake-haiku", "anthropic:claude-fake-haiku"),
        ("chat gpt-fake-mini", "openai:gpt-fake-mini"),
    ]:
        changed = [
            dict(e.attributes or {})
            for e in otel.span(name).events
            if e.name == "empathy_models.breaker.state_changed"
        ]
        assert [
            (c["empathy_models.breaker.key"], c["empathy_models.breaker.to"]) for c in changed
        ] == [(key, "open")]
        span = otel.span(name)  # stamped within the span, which ends before the feedback
        assert span.end_time is not None
        assert all(e.timestamp <= span.end_time for e in span.events)
