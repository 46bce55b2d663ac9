"""
Where the OpenTelemetry spans end: an attempt span where its call record's
``latency_ms`` ends, a run span that answered where the response's ``latency_ms`` ends,
so that the spans, the records and the duration metrics tell one story.  Time the
executor spends after that (a caller pausing between a stream's deltas, a slow telemetry
write of the record) is in none of them.

Real HTTP against `FakeLLMServer`, the real providers and the OpenTelemetry SDK's
in-memory exporter and reader.  Every span is compared with the record or response it
stands for (it lasts at least the latency, as it starts before the latency's clock does)
and with the pause it must not contain, as wide as `tests/test_streaming_latency.py`'s:
a local answer measured under `PAUSE` while the pause is `PAUSE`.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import attrs
import pytest
from opentelemetry.sdk.trace import ReadableSpan

from empathy_models import (
    EmpathyLLMExecutor,
    LLMCallRecord,
    LLMResponse,
    LLMStream,
    Outcome,
    RetryPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.providers import OpenAIProvider
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior

from ._fakes import WrappedStream, WrappingAnthropic
from .test_observability import (
    CTX,
    KEY,
    PROMPT,
    REGISTRY,
    Otel,
    RecordingSleep,
    make,
    otel,
    server,
)

__all__ = ["otel", "server"]  # the fixtures, used by name

PAUSE = 1.0  # s: the caller's pause after the first delta, a slow telemetry write
LATER_PAUSE = 0.3  # s: the caller's pause after each later delta
TEXT = "one two three four"  # four deltas: the fake streams a word per chunk
NS = 1_000_000_000
ROUNDING_NS = 1_000  # the float <-> integer nanosecond conversions, nothing more
DURATION = "gen_ai.client.operation.duration"
TTFC = "gen_ai.client.operation.time_to_first_chunk"
TTFC_ATTR = "gen_ai.response.time_to_first_chunk"
PINNED = attrs.evolve(CTX, model="claude-fake-haiku")


@pytest.fixture(autouse=True)
def fast_stream(server: FakeLLMServer) -> None:
    # its chunks 20 ms apart: the whole answer arrives while the caller sleeps after
    # the first delta
    server.set_behavior(
        "claude-fake-haiku",
        ModelBehavior(content=TEXT, output_tokens=4, stream=StreamBehavior(chunk_interval_ms=20)),
    )


class SlowTelemetry(MemoryTelemetryBackend):
    """Memory telemetry whose writes take ``pause`` seconds (a slow store)."""

    def __init__(self, pause: float = PAUSE) -> None:
        super().__init__()
        self.pause = pause

    async def record(self, record: LLMCallRecord) -> None:
        await asyncio.sleep(self.pause)
        await super().record(record)


def duration_ns(span: ReadableSpan) -> int:
    assert span.start_time is not None and span.end_time is not None
    return span.end_time - span.start_time


def attempts_of(sdk: Otel) -> list[ReadableSpan]:
    return sorted(
        (s for s in sdk.spans() if s.name.startswith("chat ")), key=lambda s: s.start_time or 0
    )


def lasts(span: ReadableSpan, latency_ms: float) -> None:
    """``span`` stands for ``latency_ms``: it lasts that at least, and less than `PAUSE`."""
    took = duration_ns(span)
    assert took >= latency_ms * 1e6 - ROUNDING_NS, (took, latency_ms)
    assert took < PAUSE * NS, (took, latency_ms)


def ns_of(when: datetime) -> int:
    return round(when.timestamp() * 1e6) * 1000


async def read_pausing(stream: LLMStream) -> list[str]:
    """Every delta of ``stream``, pausing `PAUSE` after the first, `LATER_PAUSE` after others."""
    deltas: list[str] = []
    async for delta in stream:
        deltas.append(delta)
        await asyncio.sleep(PAUSE if len(deltas) == 1 else LATER_PAUSE)
    return deltas


async def test_a_streamed_spans_end_when_the_answer_arrived_not_when_its_caller_finished(
    server: FakeLLMServer, otel: Otel
) -> None:
    telemetry = MemoryTelemetryBackend()
    async with (
        make(server, otel, telemetry_store=telemetry) as executor,
        executor.stream(PROMPT, PINNED) as stream,
    ):
        deltas = await read_pausing(stream)
        response = await stream.get_final_response()
    assert "".join(deltas) == TEXT and len(deltas) == 4  # 1.9 s of pauses in all
    (record,) = await telemetry.recent()
    assert record.outcome is Outcome.SUCCESS and record.ttft_ms is not None
    (attempt,) = attempts_of(otel)
    run = otel.span("run support/answer")
    # the attempt span and the run span last what the record and the response say
    lasts(attempt, record.latency_ms)
    lasts(run, response.latency_ms)
    # ... and ended long before the record was made, after the caller's last pauses
    assert attempt.end_time is not None and run.end_time is not None
    assert ns_of(record.timestamp) - attempt.end_time >= 3 * LATER_PAUSE * NS
    # the metrics are the record's: the operation's duration, the time to first chunk
    (duration,) = otel.points(DURATION)
    assert duration.count == 1 and duration.sum == pytest.approx(record.latency_ms / 1000)
    assert duration.sum * NS <= duration_ns(attempt) + ROUNDING_NS
    (first,) = otel.points(TTFC)
    assert first.count == 1 and first.sum == pytest.approx(record.ttft_ms / 1000)
    assert attempt.attributes is not None
    assert attempt.attributes[TTFC_ATTR] == pytest.approx(record.ttft_ms / 1000)


async def test_attempt_spans_end_where_their_records_latency_does_not_after_the_feedback(
    server: FakeLLMServer, otel: Otel
) -> None:
    # a failed attempt, retried, then an answer, each record written slowly: neither
    # attempt span holds its record's write
    server.script("claude-fake-haiku", [503])
    telemetry = SlowTelemetry()
    async with make(server, otel, telemetry_store=telemetry, sleep=RecordingSleep()) as executor:
        response = await executor.run(PROMPT, PINNED)
    assert response.content == TEXT
    failure, success = sorted(await telemetry.recent(), key=lambda r: r.attempt)
    assert failure.outcome is Outcome.FAILURE and success.outcome is Outcome.SUCCESS
    failed, answered = attempts_of(otel)
    lasts(failed, failure.latency_ms)
    lasts(answered, success.latency_ms)
    # the wait before the retry starts where the failed attempt ended
    (retry,) = [e for e in failed.events if e.name == "empathy_models.retry"]
    assert retry.timestamp == failed.end_time
    assert sum(p.sum for p in otel.points(DURATION)) == pytest.approx(
        (failure.latency_ms + success.latency_ms) / 1000
    )
    # the run's response counts the feedback in (it waited for it): so does its span
    run = otel.span("run support/answer")
    assert duration_ns(run) >= response.latency_ms * 1e6 - ROUNDING_NS


@pytest.mark.parametrize("how", ["run", "stream"])
async def test_a_cache_hits_run_span_ends_where_its_latency_does_not_after_its_record(
    server: FakeLLMServer, otel: Otel, how: str
) -> None:
    telemetry = SlowTelemetry(pause=0.0)
    cached = attrs.evolve(PINNED, temperature=0, cache_ttl=600)
    async with make(server, otel, telemetry_store=telemetry, cache="memory://") as executor:
        first = await executor.run(PROMPT, cached)
        telemetry.pause = PAUSE  # the hit's record is written slowly
        otel.exporter.clear()
        if how == "run":
            hit = await executor.run(PROMPT, cached)
        else:
            async with executor.stream(PROMPT, cached) as stream:
                assert "".join(await read_pausing(stream)) == TEXT
                hit = await stream.get_final_response()
    assert isinstance(hit, LLMResponse) and hit.cached and hit.content == first.content
    run = otel.span("run support/answer")
    assert run.attributes is not None and run.attributes["empathy_models.outcome"] == "cache_hit"
    records = await telemetry.recent()
    (record,) = [r for r in records if r.outcome is Outcome.CACHE_HIT]
    assert record.latency_ms == hit.latency_ms
    lasts(run, hit.latency_ms)


class _NoArrivalStream(WrappedStream):
    """An HTTP stream, less its `ended_at`: it cannot say when its answer arrived."""


async def test_a_stream_without_ended_at_ends_its_spans_where_its_record_says(
    server: FakeLLMServer, otel: Otel
) -> None:
    # the executor first sees the answer whole at the read after the first pause: the
    # record counts that pause (the stream could not say better), the later ones not,
    # and the spans end where the record and the response do
    telemetry = MemoryTelemetryBackend()
    executor = EmpathyLLMExecutor(
        [
            WrappingAnthropic(_NoArrivalStream, api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        registry=REGISTRY,
        telemetry_store=telemetry,
        retry=RetryPolicy.none(),
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    async with executor, executor.stream(PROMPT, PINNED) as stream:
        assert "".join(await read_pausing(stream)) == TEXT
        response = await stream.get_final_response()
    (record,) = await telemetry.recent()
    assert record.outcome is Outcome.SUCCESS
    assert PAUSE * 1000 <= record.latency_ms < (PAUSE + LATER_PAUSE) * 1000
    (attempt,) = attempts_of(otel)
    run = otel.span("run support/answer")
    for span, latency_ms in ((attempt, record.latency_ms), (run, response.latency_ms)):
        took = duration_ns(span)
        assert took >= latency_ms * 1e6 - ROUNDING_NS
        assert took < (latency_ms / 1000 + LATER_PAUSE) * NS  # not the later pauses
    (duration,) = otel.points(DURATION)
    assert duration.sum == pytest.approx(record.latency_ms / 1000)
