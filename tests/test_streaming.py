"""
`EmpathyLLMExecutor.stream` over real HTTP: `FakeLLMServer` on 127.0.0.1, the real
providers, breaker, router and memory telemetry.  Retry waits go through an injected
sleep; the only waits are the timeout tests' short budgets against a stalled server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
import attrs
import pytest
from aiohttp import web

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    BreakerPolicy,
    CircuitState,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    StreamInterruptedError,
)
from empathy_models.abc import Completion, CompletionRequest, CompletionStream, Provider
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.breaker import CircuitBreaker
from empathy_models.content import ToolCallDelta
from empathy_models.exceptions import (
    InvalidResponseError,
    OverloadedError,
    ProviderTimeoutError,
    ServerError,
)
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.testing import FakeClock, FakeLLMServer, ModelBehavior, StreamBehavior

from ._cli import run_cli
from ._fakes import WEATHER, OtherInt
from ._serving import serving

pytestmark = pytest.mark.filterwarnings("error")  # an unclosed response would warn

KEY = "test-key-0123"
TEXT = "one two three four five six seven eight"
PIECES = ["one", " two", " three", " four", " five", " six", " seven", " eight"]

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
    price_version="stream-test-1",
)

CHEAP = ExecutionContext(workflow="chat", stage="answer", tier="cheap")


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await anyio.lowlevel.checkpoint()


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    behavior = ModelBehavior(content=TEXT, output_tokens=(8, 8))
    async with FakeLLMServer(
        {"claude-fake-haiku": behavior, "gpt-fake-mini": behavior}, api_key=KEY, seed=7
    ) as fake:
        yield fake


@pytest.fixture
def telemetry() -> MemoryTelemetryBackend:
    return MemoryTelemetryBackend()


def make(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, **options: Any
) -> EmpathyLLMExecutor:
    options.setdefault("retry", RetryPolicy(jitter=False))
    options.setdefault("sleep", RecordingSleep())
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        registry=REGISTRY,
        telemetry_store=telemetry,
        **options,
    )


async def records_of(telemetry: MemoryTelemetryBackend) -> list[LLMCallRecord]:
    return sorted(await telemetry.recent(limit=100_000), key=lambda r: (r.timestamp, r.attempt))


def stream_behavior(**options: Any) -> ModelBehavior:
    return ModelBehavior(content=TEXT, output_tokens=(8, 8), stream=StreamBehavior(**options))


# --------------------------------------------------------------------------- the answer


async def test_a_stream_yields_the_deltas_then_the_response_with_usage_and_ttft(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    async with (
        AdaptiveModelRouter(REGISTRY, telemetry, seed=3) as router,
        make(server, telemetry, router=router) as executor,
    ):
        async with executor.stream("Count to eight", CHEAP) as stream:
            deltas = [delta async for delta in stream]
            assert stream.text == TEXT
            response = await stream.get_final_response()
        assert stream.response is response
    assert deltas == PIECES
    assert response.content == TEXT
    assert response.model == "claude-fake-haiku"
    assert response.output_tokens == 8 and response.input_tokens > 0
    assert response.cost_usd == pytest.approx(
        REGISTRY.cost("claude-fake-haiku", response.input_tokens, 8)
    )
    assert response.routing_decision is not None
    assert response.routing_decision.model == "claude-fake-haiku"
    assert response.ttft_ms is not None and 0 < response.ttft_ms <= response.latency_ms
    assert response.stop_reason == "end_turn"
    (record,) = await records_of(telemetry)
    assert record.outcome is Outcome.SUCCESS
    assert record.ttft_ms is not None and 0 < record.ttft_ms <= record.latency_ms
    assert record.output_tokens == 8 and record.cost_usd == response.cost_usd
    assert record.call_id == response.attempts[0].call_id
    (performance,) = await telemetry.aggregate()
    assert performance.ttft_p50_ms == performance.ttft_p95_ms == record.ttft_ms


async def test_get_final_response_reads_what_is_left(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    pinned = ExecutionContext(model="gpt-fake-mini", record_text=True)
    async with make(server, telemetry) as executor, executor.stream("hi", pinned) as stream:
        first = await stream.__anext__()
        response = await stream.get_final_response()
    assert first == "one"
    assert response.content == TEXT and response.provider == "openai"
    assert response.output_tokens == 8  # the usage chunk was asked for and read
    (record,) = await records_of(telemetry)
    assert record.response_text == TEXT


async def test_bad_input_is_refused_before_anything_is_sent(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    executor = make(server, telemetry)
    with pytest.raises(RuntimeError, match="has not been opened yet"):
        executor.stream("hi")
    async with executor:
        with pytest.raises(ConfigurationError, match="empty"):
            executor.stream("   ")
        with pytest.raises(ConfigurationError, match="ExecutionContext"):
            executor.stream("hi", {"tier": "cheap"})  # type: ignore[arg-type]
    assert server.requests() == 0


# --------------------------------------------------------------------------- before the first delta


async def test_a_fault_before_the_first_chunk_falls_back_and_gives_one_answer(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_outage("claude-fake-haiku", action=503)
    async with make(server, telemetry) as executor, executor.stream("hi", CHEAP) as stream:
        deltas = [delta async for delta in stream]
        response = await stream.get_final_response()
    assert deltas == PIECES  # only the answering model's text, once
    assert response.model == "gpt-fake-mini" and response.fallback_used
    assert response.fallback_chain == ("claude-fake-haiku", "gpt-fake-mini")
    records = await records_of(telemetry)
    assert [(r.model, r.outcome) for r in records] == [
        ("claude-fake-haiku", Outcome.FAILURE),
        ("claude-fake-haiku", Outcome.FAILURE),
        ("claude-fake-haiku", Outcome.FAILURE),
        ("gpt-fake-mini", Outcome.SUCCESS),
    ]
    assert len(records) == len(response.attempts)
    assert all(r.ttft_ms is None for r in records[:3])


async def test_an_error_event_before_the_first_delta_is_retried(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_behavior("claude-fake-haiku", stream_behavior(fault_after=0, fault="error"))
    sleep = RecordingSleep()
    async with (
        make(server, telemetry, sleep=sleep) as executor,
        executor.stream("hi", CHEAP) as stream,
    ):
        response = await stream.get_final_response()
    assert response.model == "gpt-fake-mini"
    assert sleep.delays == [1.0, 2.0]  # an overloaded error is retried, as in run()
    records = await records_of(telemetry)
    assert [r.error_type for r in records[:3]] == ["OverloadedError"] * 3


@pytest.mark.parametrize("status", [401, 402, 403])
async def test_an_account_error_before_the_first_delta_falls_back_at_once_and_forces_open(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, status: int
) -> None:
    """As in `run`: no retry, the next route at once, the provider's circuit forced open."""
    server.script("claude-fake-haiku", [status])
    sleep = RecordingSleep()
    async with (
        CircuitBreaker() as breaker,
        make(server, telemetry, sleep=sleep, breaker=breaker) as executor,
    ):
        async with executor.stream("hi", CHEAP) as stream:
            response = await stream.get_final_response()
        provider_status = await breaker.get_status("anthropic")
    assert response.model == "gpt-fake-mini"
    assert sleep.delays == []
    failed = (await records_of(telemetry))[0]
    assert (failed.error_type, failed.status_code, failed.outcome) == (
        "AuthenticationError",
        status,
        Outcome.FATAL,
    )
    assert provider_status.state is CircuitState.FORCED_OPEN


async def test_a_streams_failures_retries_and_fallbacks_are_logged_as_runs_are(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    server.set_outage("claude-fake-haiku", action=503)
    sleep = RecordingSleep()
    with caplog.at_level(logging.INFO, logger="empathy_models.executor"):
        async with (
            make(server, telemetry, sleep=sleep) as executor,
            executor.stream("hi", CHEAP) as stream,
        ):
            await stream.get_final_response()
    messages = [r.getMessage() for r in caplog.records if r.name == "empathy_models.executor"]
    assert any("streamed attempt 1 on claude-fake-haiku failed" in m for m in messages)
    assert any("retrying claude-fake-haiku in 1.00s (attempt 2 of 3" in m for m in messages)
    assert any("falling back from claude-fake-haiku to gpt-fake-mini" in m for m in messages)


async def test_every_route_failing_raises_all_routes_failed(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_outage("*", action=500)
    async with make(server, telemetry, retry=RetryPolicy.none()) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            async with executor.stream("hi", CHEAP):
                pytest.fail("the block must not run")  # pragma: no cover
    assert all(isinstance(e, ServerError) for e in caught.value.exceptions)
    assert len(await records_of(telemetry)) == 2


async def test_a_stall_before_the_first_chunk_times_out_and_falls_back(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    # the timeout also bounds the fallback's connection and first chunk: 3 s, which a
    # busy machine does not reach
    server.set_behavior("claude-fake-haiku", stream_behavior(first_chunk_ms=60_000))
    context = ExecutionContext(tier="cheap", timeout=3.0)
    async with make(server, telemetry, retry=RetryPolicy.none()) as executor:
        with anyio.fail_after(30):
            async with executor.stream("hi", context) as stream:
                response = await stream.get_final_response()
    assert response.model == "gpt-fake-mini"
    first = (await records_of(telemetry))[0]
    assert first.error_type == "ProviderTimeoutError" and first.outcome is Outcome.FAILURE
    assert first.latency_ms >= 3000.0  # not before the per-attempt timeout
    assert "per-attempt timeout" in (first.error_message or "")


# --------------------------------------------------------------------------- after the first delta


async def test_a_fault_after_three_chunks_raises_stream_interrupted_with_the_partial_text(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_behavior("claude-fake-haiku", stream_behavior(fault_after=3))
    sleep = RecordingSleep()
    async with make(server, telemetry, sleep=sleep) as executor:
        deltas: list[str] = []
        with pytest.raises(StreamInterruptedError) as caught:
            async with executor.stream("hi", CHEAP) as stream:
                async for delta in stream:
                    deltas.append(delta)  # noqa: PERF401 - keeps the deltas before the error
        with pytest.raises(StreamInterruptedError):
            await stream.get_final_response()
    error = caught.value
    assert deltas == PIECES[:3]
    assert error.partial_text == "one two three"
    assert isinstance(error.__cause__, OverloadedError) and error.error is error.__cause__
    # no count came (message_start's 1 is a placeholder): the estimate, a quarter of the
    # 13 bytes delivered, rounded up
    assert error.model == "claude-fake-haiku" and error.output_tokens == 4
    assert error.input_tokens > 0 and error.ttft_ms is not None
    assert server.requests("gpt-fake-mini") == 0  # no silent fallback
    assert sleep.delays == []  # and no retry
    (record,) = await records_of(telemetry)
    assert record.outcome is Outcome.FAILURE and record.error_type == "OverloadedError"
    assert record.ttft_ms == error.ttft_ms
    assert record.output_tokens == 4 and record.request_id == error.request_id


def _anthropic_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()


def _word(text: str) -> bytes:
    delta = {"index": 0, "delta": {"type": "text_delta", "text": text}}
    return _anthropic_event("content_block_delta", delta)


@contextlib.asynccontextmanager
async def _long_answer(first_read: asyncio.Event, words: int) -> AsyncIterator[str]:
    """
    A Messages API server streaming ``words`` words: the first, then, once the test has
    read it (``first_read``), the others in one write.  Its base URL.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant"}
        message |= {"content": [], "model": "claude-fake-haiku"}
        message |= {"usage": {"input_tokens": 3, "output_tokens": 1}}
        block = {"index": 0, "content_block": {"type": "text", "text": ""}}
        head = _anthropic_event("message_start", {"message": message})
        await response.write(head + _anthropic_event("content_block_start", block) + _word("word"))
        await first_read.wait()
        with contextlib.suppress(ConnectionError):  # the client stops reading at its bound
            await response.write(b"".join(_word(" word") for _ in range(words - 1)))
            await response.write(_anthropic_event("message_stop", {}))
        return response

    async with serving("/v1/messages", handler) as url:
        yield url


async def test_a_stream_over_max_stream_bytes_is_interrupted_and_recorded_as_malformed(
    telemetry: MemoryTelemetryBackend,
) -> None:
    # a long answer (some 40 KiB of events) from a provider bounded at 16 KiB; the rest
    # comes once the first word was read (a busy client could read all of it at once,
    # then past the bound before its first delta: no stream to interrupt)
    first_read = asyncio.Event()
    async with _long_answer(first_read, 400) as url:
        provider = AnthropicProvider(api_key=KEY, base_url=url, max_stream_bytes=16 << 10)
        executor = EmpathyLLMExecutor(
            [provider], registry=REGISTRY, telemetry_store=telemetry, sleep=RecordingSleep()
        )
        async with executor:
            with pytest.raises(StreamInterruptedError) as caught:
                async with executor.stream("hi", CHEAP) as stream:
                    first_read.set()
                    async for _ in stream:
                        pass
    error = caught.value
    assert isinstance(error.error, InvalidResponseError) and error.error.status == 200
    assert "max_stream_bytes=16,384" in str(error)
    assert 0 < len(error.partial_text) < len("word " * 400)
    (record,) = await records_of(telemetry)
    assert record.outcome is Outcome.FAILURE and record.error_type == "InvalidResponseError"
    assert "max_stream_bytes" in (record.error_message or "")


async def test_a_stream_over_max_stream_bytes_in_one_piece_delivers_what_fits_first(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    # the same long answer, its whole event stream sent in one write (a relay that
    # buffers): the deltas within the first 16 KiB are delivered, then the stream fails,
    # as when the events come one by one (before: it failed before its first delta)
    server.set_behavior("claude-fake-haiku", ModelBehavior(content="word " * 400))
    url = f"{server.anthropic_base_url}/v1/messages"
    body = {"model": "claude-fake-haiku", "max_tokens": 2000, "stream": True}
    body["messages"] = [{"role": "user", "content": "hi"}]
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        events = await r.read()
    assert len(events) > 32 << 10

    async def whole(_: web.Request) -> web.Response:
        return web.Response(body=events, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/messages", whole)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    provider = AnthropicProvider(
        api_key=KEY, base_url=f"http://127.0.0.1:{port}", max_stream_bytes=16 << 10
    )
    executor = EmpathyLLMExecutor(
        [provider], registry=REGISTRY, telemetry_store=telemetry, sleep=RecordingSleep()
    )
    try:
        async with executor:
            with pytest.raises(StreamInterruptedError) as caught:
                async with executor.stream("hi", CHEAP) as stream:
                    async for _ in stream:
                        pass
    finally:
        await runner.cleanup()
    fits = events[: 16 << 10]  # its whole events: the deltas delivered
    delivered = fits[: fits.rfind(b"\n\n")].count(b'"text_delta"')
    assert delivered > 100
    assert caught.value.partial_text.split() == ["word"] * delivered
    assert "max_stream_bytes=16,384" in str(caught.value)


async def test_a_connection_reset_mid_stream_is_recorded_with_the_answers_status(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    # the request was accepted (200) and its answer had begun: the record says so, as
    # for a whole answer's body cut short
    server.set_behavior("claude-fake-haiku", stream_behavior(fault_after=2, fault="reset"))
    async with make(server, telemetry) as executor:
        with pytest.raises(StreamInterruptedError) as caught:
            async with executor.stream("hi", CHEAP) as stream:
                async for _ in stream:
                    pass
    assert caught.value.partial_text == "one two"
    assert caught.value.error is not None and caught.value.error.status == 200
    (record,) = await records_of(telemetry)
    assert record.outcome is Outcome.FAILURE and record.status_code == 200


async def test_a_stalled_stream_times_out_on_the_idle_timeout(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    # the timeout also bounds the wait for the first chunk: 3 s, which a busy machine
    # does not reach
    server.set_behavior("claude-fake-haiku", stream_behavior(fault_after=2, fault="hang"))
    context = ExecutionContext(tier="cheap", timeout=3.0)
    async with make(server, telemetry) as executor:
        with anyio.fail_after(30), pytest.raises(StreamInterruptedError) as caught:
            async with executor.stream("hi", context) as stream:
                async for _ in stream:
                    pass
    assert caught.value.partial_text == "one two"
    assert isinstance(caught.value.__cause__, ProviderTimeoutError)
    assert "per-attempt timeout" in str(caught.value)
    (record,) = await records_of(telemetry)
    assert record.error_type == "ProviderTimeoutError" and record.outcome is Outcome.FAILURE
    assert record.latency_ms >= 3000.0


async def test_the_deadline_bounds_the_whole_stream(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    # every gap (1 s) is well inside the idle timeout; the whole takes some 7 s, the
    # first chunk comes at once (3 s is the margin for it on a busy machine)
    server.set_behavior("claude-fake-haiku", stream_behavior(chunk_interval_ms=1000))
    context = ExecutionContext(tier="cheap", timeout=10, deadline=3.0)
    async with make(server, telemetry) as executor:
        with anyio.fail_after(30), pytest.raises(StreamInterruptedError) as caught:
            async with executor.stream("hi", context) as stream:
                async for _ in stream:
                    pass
    assert "deadline" in str(caught.value)
    assert 0 < len(caught.value.partial_text) < len(TEXT)


async def test_a_second_task_reading_the_stream_gets_a_runtime_error_and_spoils_nothing(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_behavior("gpt-fake-mini", stream_behavior(chunk_interval_ms=20))
    context = ExecutionContext(model="gpt-fake-mini")

    async def read(stream: Any) -> str | BaseException:
        try:
            return "".join([delta async for delta in stream])
        except Exception as exc:
            return exc

    async with make(server, telemetry) as executor, executor.stream("hi", context) as stream:
        first, second = await asyncio.gather(read(stream), read(stream))
        response = await stream.get_final_response()
    # the first reader took the first delta and waits for the next when the second comes
    assert isinstance(second, RuntimeError) and "another task" in str(second)
    assert first == TEXT  # it read on as if alone
    assert stream.text == response.content == TEXT
    (record,) = await telemetry.recent(limit=10)
    assert record.outcome is Outcome.SUCCESS


# --------------------------------------------------------------------------- leaving early


async def test_breaking_out_records_cancelled_and_releases_the_connection(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_behavior("claude-fake-haiku", stream_behavior(chunk_interval_ms=5))
    # one connection to the server (one call in flight per provider, which it holds): a
    # response left open would block the next call
    connector = aiohttp.TCPConnector(limit_per_host=1)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        make(server, telemetry, session=session, concurrency_per_provider=1) as executor,
    ):
        deltas: list[str] = []
        async with executor.stream("hi", CHEAP) as stream:
            async for delta in stream:
                deltas.append(delta)
                if len(deltas) == 2:
                    break
        with pytest.raises(RuntimeError, match="closed before it finished"):
            await stream.get_final_response()
        with anyio.fail_after(10):
            response = await executor.run("hi", CHEAP)
    assert response.content == TEXT
    assert deltas == PIECES[:2]
    cancelled, answered = await records_of(telemetry)
    assert cancelled.outcome is Outcome.CANCELLED
    assert cancelled.output_tokens == 2 and cancelled.ttft_ms is not None
    assert answered.outcome is Outcome.SUCCESS
    gc.collect()  # an unclosed response or session would warn now (warnings are errors)


async def test_a_half_read_stream_dropped_unclosed_warns_records_cancelled_and_frees_its_slot(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_behavior("claude-fake-haiku", stream_behavior(chunk_interval_ms=200))
    async with make(server, telemetry, concurrency_per_provider=1) as executor:
        stream = await executor.stream("hi", CHEAP).__aenter__()  # never exited
        assert await stream.__anext__() == PIECES[0]
        with pytest.warns(ResourceWarning, match="unclosed LLMStream"):
            del stream
            gc.collect()
        # the one anthropic slot is given back: the next call is not kept waiting for it
        with anyio.fail_after(10):
            response = await executor.run("hi", CHEAP)
    assert response.content == TEXT
    cancelled, answered = await records_of(telemetry)
    assert cancelled.outcome is Outcome.CANCELLED and cancelled.output_tokens == 1
    assert answered.outcome is Outcome.SUCCESS


async def test_a_cancelled_task_records_cancelled_and_reraises(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.set_behavior("claude-fake-haiku", stream_behavior(fault_after=2, fault="hang"))
    got_two = asyncio.Event()

    async def consume(executor: EmpathyLLMExecutor) -> None:
        async with executor.stream("hi", CHEAP) as stream:
            count = 0
            async for _ in stream:
                count += 1
                if count == 2:
                    got_two.set()

    async with make(server, telemetry) as executor:
        task = asyncio.create_task(consume(executor))
        with anyio.fail_after(10):
            await got_two.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (record,) = await records_of(telemetry)
    assert record.outcome is Outcome.CANCELLED and record.output_tokens == 2


@pytest.mark.parametrize("model", ["claude-fake-haiku", "gpt-fake-mini"])
async def test_aclose_from_another_task_while_a_read_waits_records_one_cancelled_attempt(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, model: str
) -> None:
    server.set_behavior(model, stream_behavior(fault_after=2, fault="hang"))
    got_two = asyncio.Event()
    read: list[str] = []

    async def consume(stream: Any) -> None:
        async for delta in stream:
            read.append(delta)
            if len(read) == 2:
                got_two.set()  # its next read waits: the server sends nothing more

    async with make(server, telemetry) as executor:
        async with executor.stream("hi", ExecutionContext(model=model)) as stream:
            reader = asyncio.create_task(consume(stream))
            with anyio.fail_after(10):
                await got_two.wait()
            await stream.aclose()  # as a handler does when its client goes away
            with anyio.fail_after(10):
                await reader  # the waiting read ends as a read after `aclose` does
        with pytest.raises(RuntimeError, match="closed before it finished"):
            await stream.get_final_response()
    assert read == PIECES[:2]
    (record,) = await records_of(telemetry)
    assert record.outcome is Outcome.CANCELLED and record.output_tokens == 2
    assert [a.outcome for a in stream.attempts] == [Outcome.CANCELLED]


async def test_leaving_early_returns_a_half_open_probe_lease(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, fake_clock: FakeClock
) -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=30)
    pinned = ExecutionContext(model="claude-fake-haiku")
    async with (
        CircuitBreaker(policy=policy, clock=fake_clock) as breaker,
        make(server, telemetry, breaker=breaker, retry=RetryPolicy.none()) as executor,
    ):
        server.script("claude-fake-haiku", [500])
        async with executor.stream("hi", pinned) as stream:
            await stream.get_final_response()  # the fallback answered; haiku's circuit opened
        assert stream.model == "gpt-fake-mini"
        key = breaker.key_for("anthropic", "claude-fake-haiku")
        assert (await breaker.get_status(key)).state is CircuitState.OPEN
        fake_clock.advance(31)  # past the recovery time: the next call is the probe
        async with executor.stream("hi", pinned) as stream:
            assert stream.model == "claude-fake-haiku"
            await stream.__anext__()
        # the probe's lease came back (cancelled): another probe may go at once
        async with executor.stream("hi", pinned) as stream:
            assert stream.model == "claude-fake-haiku"
            await stream.get_final_response()
        assert (await breaker.get_status(key)).state is CircuitState.CLOSED
    outcomes = [r.outcome for r in await records_of(telemetry)]
    assert outcomes == [
        Outcome.FAILURE,
        Outcome.SUCCESS,
        Outcome.CANCELLED,
        Outcome.SUCCESS,
    ]


# --------------------------------------------------------------------------- load


async def test_two_hundred_concurrent_streams_leave_one_record_per_attempt(
    telemetry: MemoryTelemetryBackend,
) -> None:
    behavior = ModelBehavior(
        content=TEXT,
        failure_rate=0.2,
        failures=(500, 529),
        stream=StreamBehavior(fault_after=4, fault="error"),
    )
    flaky = ModelBehavior(content=TEXT, failure_rate=0.1, failures=(503,))
    async with FakeLLMServer(
        {"claude-fake-haiku": behavior, "gpt-fake-mini": flaky}, api_key=KEY, seed=11
    ) as server:
        attempts = 0
        outcomes: dict[str, int] = {}

        async def one(executor: EmpathyLLMExecutor, i: int) -> None:
            nonlocal attempts
            manager = executor.stream(f"hi {i}", CHEAP)
            try:
                async with manager as stream:
                    async for _ in stream:
                        if i % 10 == 0:
                            break  # some callers leave early
                if i % 10:
                    response = await stream.get_final_response()
                    assert len(response.attempts) == len(stream.attempts)
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                else:
                    outcomes["left"] = outcomes.get("left", 0) + 1
                attempts += len(stream.attempts)
            except StreamInterruptedError:
                outcomes["interrupted"] = outcomes.get("interrupted", 0) + 1
                attempts += len(stream.attempts)
            except AllRoutesFailedError as exc:
                outcomes["failed"] = outcomes.get("failed", 0) + 1
                attempts += len(exc.exceptions)

        async with make(server, telemetry, concurrency_per_provider=64) as executor:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    for i in range(200):
                        group.start_soon(one, executor, i)
        records = await records_of(telemetry)
    assert sum(outcomes.values()) == 200
    assert outcomes.get("interrupted", 0) > 0 and outcomes.get("left", 0) > 0
    assert len(records) == attempts
    assert len({r.call_id for r in records}) == len(records)
    sent = [r for r in records if r.outcome is not Outcome.REJECTED]
    assert len(sent) == server.requests("claude-fake-haiku") + server.requests("gpt-fake-mini")
    with warnings.catch_warnings():
        gc.collect()


# --------------------------------------------------------------------------- telemetry


async def test_streamed_ttft_is_aggregated_by_sqlite_and_shown_by_the_cli(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    db = tmp_path / "calls.db"
    executor = EmpathyLLMExecutor(
        [AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)],
        registry=REGISTRY,
        telemetry_store=f"sqlite:///{db}",
    )
    async with executor:
        for _ in range(5):
            async with executor.stream("hi", CHEAP) as stream:
                await stream.get_final_response()
        await executor.run("hi", CHEAP)  # not streamed: no ttft, not in the percentiles
    async with SQLiteTelemetryBackend(db) as backend:
        records = await backend.recent(limit=10)
        ttfts = sorted(r.ttft_ms for r in records if r.ttft_ms is not None)
        (performance,) = await backend.aggregate()
    assert len(ttfts) == 5
    assert (performance.ttft_p50_ms, performance.ttft_p95_ms) == (ttfts[2], ttfts[4])
    # the CLI in this process (tests/_cli.py), as a user would run it on that file
    command = ("telemetry", "summary", "--db", str(db))
    shown = run_cli(tmp_path / "home", *command)
    assert shown.returncode == 0, shown.stderr
    assert "TTFT p50 ms" in shown.stdout and f"{ttfts[2]:.1f}" in shown.stdout
    listed = run_cli(tmp_path / "home", *command, "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["models"][0]["ttft_p95_ms"] == ttfts[4]


async def test_a_provider_that_cannot_stream_gives_its_whole_answer_as_one_delta() -> None:
    from empathy_models.testing import FakeProvider

    async with (
        EmpathyLLMExecutor(
            [FakeProvider(name="openai")], telemetry_store=MemoryTelemetryBackend()
        ) as executor,
        executor.stream("hi", ExecutionContext(tier="cheap")) as stream,
    ):
        deltas = [delta async for delta in stream]
        response = await stream.get_final_response()
    assert len(deltas) == 1 and deltas[0] == response.content != ""
    assert response.ttft_ms is not None


async def test_a_stream_left_before_a_non_streaming_providers_tool_call_keeps_its_usage(
    telemetry: MemoryTelemetryBackend,
) -> None:
    """
    A provider that cannot stream has its whole answer (text, then a tool call) before
    the first delta, and bills it whole: a caller leaving after the text recorded the
    attempt with 0 output tokens and the prompt's cost alone.
    """
    from empathy_models.testing import FakeProvider, FakeReply

    provider = FakeProvider(name="openai", seed=3)
    reply = FakeReply(content="Let me look.", tool_calls=[{"name": "get_weather", "arguments": {}}])
    provider.script("gpt-fake-mini", [reply, reply])
    context = ExecutionContext(workflow="chat", stage="answer", model="gpt-fake-mini")
    executor = EmpathyLLMExecutor([provider], registry=REGISTRY, telemetry_store=telemetry)
    async with executor:
        answered = await executor.run("Weather?", context, tools=[WEATHER])
        async with executor.stream("Weather?", context, tools=[WEATHER]) as stream:
            async for event in stream.events():
                assert event == "Let me look."
                break
    whole, left = await records_of(telemetry)
    assert (whole.outcome, left.outcome) == (Outcome.SUCCESS, Outcome.CANCELLED)
    assert answered.output_tokens > 0 and answered.tool_calls
    assert (left.input_tokens, left.output_tokens, left.cost_usd) == (
        whole.input_tokens,
        whole.output_tokens,
        whole.cost_usd,
    )


async def test_models_that_cannot_stream_are_left_out_of_a_stream(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    registry = ModelRegistry(
        models=[
            attrs.evolve(REGISTRY.get("claude-fake-haiku"), capabilities=("tools",)),
            REGISTRY.get("gpt-fake-mini"),
        ],
        price_version="stream-test-2",
    )
    executor = EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        registry=registry,
        telemetry_store=telemetry,
    )
    async with executor:
        assert (await executor.run("hi", CHEAP)).model == "claude-fake-haiku"
        async with executor.stream("hi", CHEAP) as stream:
            response = await stream.get_final_response()
    assert response.model == "gpt-fake-mini" and not response.fallback_used
    assert server.requests("claude-fake-haiku") == 1  # only the run() call


# ------------------------------------------------------------------ a provider's own stream


class _OwnStream(CompletionStream):
    """A provider's own stream: pieces from ``__anext__`` (the default `next_pieces`),
    or, with ``empty_batch``, a `next_pieces` that hands over nothing after the first."""

    def __init__(
        self, pieces: list[str], empty_batch: bool, input_tokens: int, broken: bool = False
    ) -> None:
        self._pieces = list(pieces)
        self._taken: list[str] = []
        self._empty_batch = empty_batch
        self._input_tokens = input_tokens
        self._broken = broken
        self.closed = False

    async def __anext__(self) -> str:
        if not self._pieces:
            raise StopAsyncIteration
        piece = self._pieces.pop(0)
        self._taken.append(piece)
        return piece

    async def next_pieces(self) -> list[str | ToolCallDelta]:
        if self._empty_batch:
            return []
        return await super().next_pieces()

    async def aclose(self) -> None:
        self.closed = True

    @property
    def finished(self) -> bool:
        return not self._pieces

    def completion(self) -> Completion:
        if self._broken:
            raise RuntimeError("this provider's stream cannot say its usage")
        text = "".join(self._taken)
        return Completion(
            content=text,
            model="own-model",
            input_tokens=self._input_tokens,
            output_tokens=len(text),
        )


class _OwnStreamProvider(Provider):
    name = "own"

    def __init__(
        self, empty_batch: bool = False, input_tokens: int = 3, broken: bool = False
    ) -> None:
        self.empty_batch = empty_batch
        self.input_tokens = input_tokens
        self.broken = broken
        self.streams: list[_OwnStream] = []

    async def _complete(self, request: CompletionRequest) -> Completion:
        raise AssertionError("only streamed here")

    async def stream(
        self,
        request: CompletionRequest,
        *,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> CompletionStream:
        stream = _OwnStream(
            ["Hel", "lo", ", ", "world"], self.empty_batch, self.input_tokens, self.broken
        )
        self.streams.append(stream)
        return stream


OWN_REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="own-model",
            provider="own",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=2.0,
            context_window=8_000,
            max_output_tokens=1_000,
        )
    ],
    price_version="own",
)


async def test_a_providers_own_stream_is_read_piece_by_piece_through_the_default_batch() -> None:
    provider = _OwnStreamProvider()
    telemetry = MemoryTelemetryBackend()
    async with (
        EmpathyLLMExecutor([provider], registry=OWN_REGISTRY, telemetry_store=telemetry) as ex,
        ex.stream("Hi", ExecutionContext(workflow="w", stage="s", tier="cheap")) as stream,
    ):
        deltas = [delta async for delta in stream]
        response = await stream.get_final_response()
    assert deltas == ["Hel", "lo", ", ", "world"]
    assert response.content == "Hello, world"
    assert [r.outcome for r in await telemetry.recent(limit=10)] == [Outcome.SUCCESS]


async def test_a_stream_whose_batch_is_empty_fails_instead_of_hanging() -> None:
    provider = _OwnStreamProvider(empty_batch=True)
    telemetry = MemoryTelemetryBackend()
    context = ExecutionContext(workflow="w", stage="s", tier="cheap")
    executor = EmpathyLLMExecutor([provider], registry=OWN_REGISTRY, telemetry_store=telemetry)
    async with executor as ex:
        with pytest.raises(StreamInterruptedError, match=r"next_pieces\(\) returned no piece"):
            async with ex.stream("Hi", context) as stream:
                async for _ in stream:
                    pass
        assert provider.streams[0].closed
        assert [r.outcome for r in await telemetry.recent(limit=10)] == [Outcome.FAILURE]


class _TimingOutProvider(Provider):
    """A provider that cannot stream, whose own client times out at once."""

    name = "own"

    async def _complete(self, request: CompletionRequest) -> Completion:
        raise TimeoutError("the upstream read timed out after 2s")


@pytest.mark.parametrize("limit", [None, 30.0])
async def test_a_non_streaming_providers_own_timeout_fails_the_stream_as_it_fails_a_run(
    limit: float | None,
) -> None:
    """
    Streaming a provider that cannot stream bounds its call by the stream's timeouts:
    its own client's timeout was restated as theirs ("no data for 30.000s (the
    per-attempt timeout...)", after no time at all) or, with no timeout, crashed in the
    message (``min()`` of nothing: a ValueError in the stream's error where `run` has
    the provider's timeout).
    """
    context = ExecutionContext(workflow="chat", stage="answer", timeout=limit)
    executor = EmpathyLLMExecutor(
        [_TimingOutProvider()],
        registry=OWN_REGISTRY,
        telemetry_store="null://",
        retry=RetryPolicy.none(),
    )
    async with executor:
        with pytest.raises(AllRoutesFailedError) as ran:
            await executor.run("hi", context)
        with pytest.raises(AllRoutesFailedError) as streamed:
            async with executor.stream("hi", context):
                pass
    (run_error,) = ran.value.exceptions
    (stream_error,) = streamed.value.exceptions
    assert isinstance(run_error, TimeoutError) and isinstance(stream_error, TimeoutError)
    assert str(stream_error) == str(run_error) == "the upstream read timed out after 2s"


@pytest.mark.parametrize("reader", ["whole", "left early"])
async def test_a_stream_whose_completion_fails_is_recorded_and_frees_its_slot(
    reader: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider's own stream whose ``completion()`` raises: its usage is estimated."""
    provider = _OwnStreamProvider(broken=True)
    telemetry = MemoryTelemetryBackend()
    context = ExecutionContext(workflow="w", stage="s", tier="cheap")
    async with EmpathyLLMExecutor(
        [provider], registry=OWN_REGISTRY, telemetry_store=telemetry, concurrency_per_provider=1
    ) as ex:
        for _ in range(2):  # the second stream needs the one slot the first held
            with anyio.fail_after(30):
                async with ex.stream("Hi", context) as stream:
                    async for _ in stream:
                        if reader == "left early":
                            break
    records = await telemetry.recent(limit=10)
    expected = Outcome.SUCCESS if reader == "whole" else Outcome.CANCELLED
    assert [r.outcome for r in records] == [expected] * 2
    assert all(r.input_tokens > 0 and r.output_tokens > 0 for r in records)
    assert "_OwnStream.completion() failed" in caplog.text


async def test_a_usage_count_no_record_can_hold_keeps_the_record_and_frees_the_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """10**400 tokens from a provider's own stream: recorded as 0, and the slot comes back."""
    provider = _OwnStreamProvider(input_tokens=10**400)
    telemetry = MemoryTelemetryBackend()
    context = ExecutionContext(workflow="w", stage="s", tier="cheap")
    caplog.set_level(logging.WARNING, "empathy_models.executor")
    async with EmpathyLLMExecutor(
        [provider], registry=OWN_REGISTRY, telemetry_store=telemetry, concurrency_per_provider=1
    ) as ex:
        for _ in range(2):  # the second stream needs the one slot the first held
            with anyio.fail_after(30):
                async with ex.stream("Hi", context) as stream:
                    response = await stream.get_final_response()
    assert (response.input_tokens, response.output_tokens) == (0, 12)
    assert response.cost_usd == OWN_REGISTRY.cost("own-model", 0, 12)
    records = await telemetry.recent(limit=10)
    assert [(r.outcome, r.input_tokens) for r in records] == [(Outcome.SUCCESS, 0)] * 2
    assert "own/own-model reported token counts a record cannot hold" in caplog.text
    assert "input a 1329-bit integer" in caplog.text


async def test_usage_counted_in_integers_of_another_type_is_recorded_and_charged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A provider counting with numpy (an int64 is no int): its tokens count, as ints."""
    provider = _OwnStreamProvider(input_tokens=OtherInt(30))  # type: ignore[arg-type]
    telemetry = MemoryTelemetryBackend()
    context = ExecutionContext(workflow="w", stage="s", tier="cheap")
    caplog.set_level(logging.WARNING, "empathy_models.executor")
    async with (
        EmpathyLLMExecutor([provider], registry=OWN_REGISTRY, telemetry_store=telemetry) as ex,
        ex.stream("Hi", context) as stream,
    ):
        response = await stream.get_final_response()
    # they were recorded as 0 (and the call as free), "a count a record cannot hold"
    assert (response.input_tokens, response.output_tokens) == (30, 12)
    assert type(response.input_tokens) is int
    assert response.cost_usd == OWN_REGISTRY.cost("own-model", 30, 12)
    [record] = await telemetry.recent(limit=10)
    assert (record.input_tokens, record.cost_usd) == (30, response.cost_usd)
    assert "cannot hold" not in caplog.text


async def test_a_stream_read_without_async_with_says_how_to_read_it() -> None:
    # `async for delta in executor.stream(...)` (as other SDKs stream) and `await
    # executor.stream(...)` raised a bare "'async for' requires an object with __aiter__
    # method, got StreamManager" / "can't be used in 'await' expression"
    async with (
        FakeLLMServer() as server,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key="k", base_url=server.openai_base_url)],
            telemetry_store="null://",
        ) as executor,
    ):
        with pytest.raises(TypeError, match=r"async with executor\.stream\(\.\.\.\) as stream"):
            async for _ in executor.stream("hi"):  # type: ignore[attr-defined]
                pass
        with pytest.raises(TypeError, match=r"async with executor\.stream\(\.\.\.\) as stream"):
            await executor.stream("hi")  # type: ignore[misc]
        assert server.requests() == 0
        async with executor.stream("hi") as stream:  # as the error says
            assert "".join([d async for d in stream])
