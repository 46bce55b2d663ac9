"""
A streamed attempt's latency is the provider's, not its caller's: a caller that pauses
between deltas (or before reading the end) reads the network late, and the time it took
must not be recorded as the model's, neither in the record the router learns from nor in
the response.  Real HTTP (`FakeLLMServer` and a bare aiohttp server on 127.0.0.1), the
real providers, memory telemetry, the executor's real clock.  The bounds are wide: a
fast answer recorded under 1 s while its caller sleeps 1.5 s after the first delta and
0.2 s after each other one (the stream reads the rest of the answer only after the first
pause, so a latency ended by that read would be over 1.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from empathy_models import (
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    LLMResponse,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    Tool,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.content import ToolCallDelta
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior
from tests._serving import serving

pytestmark = pytest.mark.filterwarnings("error")  # an unclosed response would warn

KEY = "test-key-0123"
TEXT = "one two three four"  # four deltas: the fake streams a word per chunk
PAUSES = (1.5, 0.2, 0.2, 0.2)  # the caller's pause after each delta, the last included
BOUND_MS = 1000.0  # what the answer is recorded under: less than the first pause

REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="claude-latency",
            provider="anthropic",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=5.0,
            context_window=200_000,
            max_output_tokens=8192,
        ),
        ModelInfo(
            id="gpt-latency",
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=5.0,
            context_window=128_000,
            max_output_tokens=16384,
        ),
    ],
    price_version="latency-test-1",
)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    # a fast stream, its chunks 20 ms apart: they arrive, the end too, while the caller
    # sleeps after the first delta
    behavior = ModelBehavior(
        content=TEXT, output_tokens=4, stream=StreamBehavior(chunk_interval_ms=20)
    )
    async with FakeLLMServer(
        {"claude-latency": behavior, "gpt-latency": behavior}, api_key=KEY, seed=5
    ) as fake:
        yield fake


def executor(
    telemetry: MemoryTelemetryBackend, *, openai_url: str, anthropic_url: str
) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=anthropic_url),
            OpenAIProvider(api_key=KEY, base_url=openai_url),
        ],
        registry=REGISTRY,
        telemetry_store=telemetry,
        retry=RetryPolicy.none(),
    )


async def read_pausing(llm: EmpathyLLMExecutor, model: str) -> tuple[list[str], LLMResponse]:
    """Stream from ``model``, sleeping `PAUSES` after the deltas, the last one included."""
    deltas: list[str] = []
    async with llm.stream("Count to four", ExecutionContext(model=model)) as stream:
        async for delta in stream:
            deltas.append(delta)
            await asyncio.sleep(PAUSES[min(len(deltas), len(PAUSES)) - 1])
        response = await stream.get_final_response()
    return deltas, response


async def only_record(telemetry: MemoryTelemetryBackend) -> LLMCallRecord:
    (record,) = await telemetry.recent(limit=10)
    return record


@pytest.mark.parametrize("model", ["claude-latency", "gpt-latency"])
async def test_a_caller_pausing_between_deltas_is_not_recorded_as_the_models_latency(
    server: FakeLLMServer, model: str
) -> None:
    telemetry = MemoryTelemetryBackend()
    llm = executor(
        telemetry, openai_url=server.openai_base_url, anthropic_url=server.anthropic_base_url
    )
    async with llm:
        deltas, response = await read_pausing(llm, model)
    assert "".join(deltas) == TEXT and len(deltas) == 4  # 4 pauses, 2.1 s in all
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS and record.output_tokens == 4
    assert record.latency_ms < BOUND_MS
    assert response.latency_ms < BOUND_MS
    assert record.ttft_ms is not None and record.ttft_ms <= record.latency_ms
    assert response.ttft_ms is not None and response.ttft_ms <= response.latency_ms
    # the router's evidence is the record's: the telemetry's rollup agrees
    (performance,) = await telemetry.aggregate()
    assert performance.latency_p95_ms is not None and performance.latency_p95_ms < BOUND_MS


def _openai_events() -> bytes:
    def chunk(delta: dict[str, str], reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return "data: " + json.dumps({"id": "c1", "choices": [choice]}) + "\n\n"

    usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": word}) for word in ("one", " two", " three", " four")]
    events.append(chunk({}, "stop"))
    events.append("data: " + json.dumps({"id": "c1", "choices": [], "usage": usage}) + "\n\n")
    return ("".join(events) + "data: [DONE]\n\n").encode()


async def test_an_answer_read_whole_whose_body_stays_open_ends_at_that_read() -> None:
    # the whole answer, end marker included, in one write, and the body kept open (a
    # proxy's way): the marker is decoded only when the caller reads on, after its
    # pauses; the answer had arrived with the first delta
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_openai_events())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 10)  # open until the client is done
        with contextlib.suppress(ConnectionError):  # the client may have closed it
            await response.write_eof()
        return response

    telemetry = MemoryTelemetryBackend()
    async with serving("/v1/chat/completions", handler) as url:
        llm = executor(telemetry, openai_url=f"{url}/v1", anthropic_url=url)
        try:
            async with llm:
                deltas, response = await read_pausing(llm, "gpt-latency")
        finally:
            done.set()
    assert "".join(deltas) == TEXT
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS and record.output_tokens == 4
    assert record.latency_ms < BOUND_MS and response.latency_ms < BOUND_MS


@pytest.mark.slow
async def test_a_whole_body_answer_ends_when_it_was_read_not_when_its_pieces_were_taken() -> None:
    # a server that ignores "stream": true and answers with one JSON body: its text and
    # its tool call are served as pieces, all arrived at once, taken as the caller reads
    async def handler(request: web.Request) -> web.StreamResponse:
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Lisbon"}'},
        }
        message = {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}
        body = {
            "id": "c1",
            "object": "chat.completion",
            "model": "gpt-latency",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        }
        return web.json_response(body)

    tool = Tool(
        name="get_weather",
        description="The weather forecast",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
    telemetry = MemoryTelemetryBackend()
    async with serving("/v1/chat/completions", handler) as url:
        llm = executor(telemetry, openai_url=f"{url}/v1", anthropic_url=url)
        context = ExecutionContext(model="gpt-latency")
        async with llm, llm.stream("Weather?", context, tools=[tool]) as stream:
            events = []
            async for event in stream.events():
                events.append(event)
                await asyncio.sleep(PAUSES[0])  # after the text, then after the call
            response = await stream.get_final_response()
    assert events[0] == "Let me look." and isinstance(events[1], ToolCallDelta)
    assert response.tool_calls[0].arguments == {"city": "Lisbon"}
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS and record.output_tokens == 9
    assert record.latency_ms < BOUND_MS and response.latency_ms < BOUND_MS
