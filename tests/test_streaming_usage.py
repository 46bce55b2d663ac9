"""
The usage a streamed attempt records when it does not finish: OpenAI-format servers send
the prompt's token count only in the last chunk, so a stream left early or cut short
records the request's own estimate of the prompt (flagged in the record's metadata) and
charges budgets the prompt's worst case; Anthropic's ``message_start`` count is kept,
before the first delta too.  Output tokens the provider did not report are estimated
from the text's size, as the prompt is (a quarter of its UTF-8 bytes, rounded up), and
at least one per delta.  Real HTTP against `FakeLLMServer` on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
from aiohttp import web

from empathy_models import (
    AllRoutesFailedError,
    Budget,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    StreamInterruptedError,
    Tool,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.limits import MemoryQuotaStore
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior
from tests._serving import anthropic_streaming, serving
from tests._usage import (
    INPUT_ESTIMATED as ESTIMATED,
    OUTPUT_ESTIMATED,
    estimate,
    only_record,
    spent,
)

pytestmark = pytest.mark.filterwarnings("error")  # an unclosed response would warn

KEY = "test-key-0123"
PROMPT = "word " * 4000  # 20,000 bytes: the fake counts 5,001 tokens

REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="claude-usage",
            provider="anthropic",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=5.0,
            context_window=200_000,
            max_output_tokens=8192,
        ),
        ModelInfo(
            id="gpt-usage",
            provider="openai",
            tier="cheap",
            input_price_per_mtok=2.5,
            output_price_per_mtok=10.0,
            context_window=128_000,
            max_output_tokens=16384,
        ),
    ],
    price_version="usage-test-1",
)

INFO = {m.id: m for m in REGISTRY.models}


def fake_count(prompt: str) -> int:
    return len(prompt) // 4 + 1  # what FakeLLMServer reports (and bills)


def output_estimate(deltas: list[str]) -> int:
    # the documented estimate of output the provider did not count: a quarter of the
    # deltas' UTF-8 bytes, rounded up, and at least one token per delta
    return max(len(deltas), -(-len("".join(deltas).encode()) // 4))


LONG_TEXT = "The quick brown fox jumps over the lazy dog; " * 6  # 270 characters


def chunk(
    delta: dict[str, Any], reason: str | None = None, *, usage: dict[str, Any] | None = None
) -> bytes:
    """One OpenAI ``chat.completion.chunk`` as an SSE event."""
    choice = {"index": 0, "delta": delta, "finish_reason": reason}
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    # chunks 5 ms apart: a stream left after its first deltas has not seen the end
    behavior = ModelBehavior(
        output_tokens=50, stream=StreamBehavior(chunk_chars=3, chunk_interval_ms=5)
    )
    async with FakeLLMServer(
        {"claude-usage": behavior, "gpt-usage": behavior}, api_key=KEY, seed=3
    ) as fake:
        yield fake


def make(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, **options: Any
) -> EmpathyLLMExecutor:
    options.setdefault("retry", RetryPolicy(jitter=False, base_delay=0.0, max_attempts=1))
    options.setdefault("fallback", FallbackPolicy(max_routes=1))
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        registry=REGISTRY,
        telemetry_store=telemetry,
        **options,
    )


@pytest.fixture
def telemetry() -> MemoryTelemetryBackend:
    return MemoryTelemetryBackend()


@pytest.fixture
def quota() -> MemoryQuotaStore:
    return MemoryQuotaStore()


@pytest.fixture
def budgeted(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> EmpathyLLMExecutor:
    """An executor (not open yet) recording into ``telemetry``, a $100 budget in ``quota``."""
    return make(server, telemetry, budgets=[Budget(limit_usd=100)], quota_store=quota)


def context(model: str) -> ExecutionContext:
    # the timeout ends a stream that hangs; 3 s also bounds the connect and the first
    # chunk, which a busy machine stays well inside
    return ExecutionContext(workflow="w", stage="s", model=model, max_tokens=100, timeout=3.0)


Fault = Literal["error", "reset", "hang", "malformed", "incomplete"]


def faulty(fault: Fault, after: int) -> ModelBehavior:
    return ModelBehavior(
        output_tokens=50, stream=StreamBehavior(chunk_chars=3, fault_after=after, fault=fault)
    )


# --------------------------------------------------------------------------- OpenAI format


async def test_an_openai_stream_left_early_records_the_prompts_estimate_and_charges_its_worst(
    budgeted: EmpathyLLMExecutor, telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> None:
    async with budgeted as executor, executor.stream(PROMPT, context("gpt-usage")) as stream:
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
    record = await only_record(telemetry)
    assert record.outcome is Outcome.CANCELLED and record.output_tokens == 2
    assert record.input_tokens == estimate(PROMPT)  # not 0: the prompt was sent
    assert record.metadata[ESTIMATED] is True and record.metadata[OUTPUT_ESTIMATED] is True
    info = INFO["gpt-usage"]
    assert math.isclose(record.cost_usd, info.cost(estimate(PROMPT), 2))
    # the budget is charged the worst case the reservation held for the prompt: never
    # less than the provider bills, whatever the real count
    charged = await spent(quota)
    assert math.isclose(charged, info.cost(4 * estimate(PROMPT), 2), rel_tol=1e-6)
    assert charged >= info.cost(fake_count(PROMPT), 2)


@pytest.mark.parametrize("fault", ["error", "reset", "hang", "malformed", "incomplete"])
async def test_an_openai_stream_cut_short_records_the_prompts_estimate(
    server: FakeLLMServer,
    budgeted: EmpathyLLMExecutor,
    telemetry: MemoryTelemetryBackend,
    quota: MemoryQuotaStore,
    fault: Fault,
) -> None:
    server.set_behavior("gpt-usage", faulty(fault, 3))
    async with budgeted as executor:
        with pytest.raises(StreamInterruptedError) as caught:
            async with executor.stream(PROMPT, context("gpt-usage")) as stream:
                async for _ in stream:
                    pass
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE and record.output_tokens == 3
    assert record.input_tokens == estimate(PROMPT) == caught.value.input_tokens
    assert record.metadata[ESTIMATED] is True
    assert await spent(quota) >= INFO["gpt-usage"].cost(fake_count(PROMPT), 3)


async def test_an_openai_stream_failing_before_its_first_delta_records_the_estimate(
    server: FakeLLMServer,
    budgeted: EmpathyLLMExecutor,
    telemetry: MemoryTelemetryBackend,
    quota: MemoryQuotaStore,
) -> None:
    server.set_behavior("gpt-usage", faulty("error", 0))
    async with budgeted as executor:
        with pytest.raises(AllRoutesFailedError):
            async with executor.stream(PROMPT, context("gpt-usage")):
                pass
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE and record.error_type == "ServerError"
    assert record.input_tokens == estimate(PROMPT) and record.metadata[ESTIMATED] is True
    assert record.cost_usd > 0
    assert await spent(quota) >= INFO["gpt-usage"].cost(fake_count(PROMPT), 0)


async def test_a_finished_openai_stream_records_the_reported_count_unflagged(
    budgeted: EmpathyLLMExecutor, telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> None:
    async with budgeted as executor, executor.stream(PROMPT, context("gpt-usage")) as stream:
        response = await stream.get_final_response()
    record = await only_record(telemetry)
    assert record.input_tokens == response.input_tokens == fake_count(PROMPT)
    assert record.output_tokens == response.output_tokens == 50
    assert ESTIMATED not in record.metadata and OUTPUT_ESTIMATED not in record.metadata
    assert math.isclose(await spent(quota), record.cost_usd, rel_tol=1e-6)


async def test_a_finished_openai_stream_without_usage_estimates_its_output_by_size(
    telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> None:
    # some OpenAI-compatible servers ignore stream_options.include_usage: the answer ends
    # with [DONE] and no usage chunk
    words = [f" word{i}" for i in range(20)]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in words:
            await response.write(chunk({"content": word}))
        await response.write(chunk({}, "stop") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with serving("/v1/chat/completions", handler) as url:
        executor = EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
            registry=REGISTRY,
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
        )
        async with executor, executor.stream(PROMPT, context("gpt-usage")) as stream:
            response = await stream.get_final_response()
    assert response.content == "".join(words)
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS
    output = output_estimate(words)
    assert output == 33 > len(words)  # 130 bytes: a delta of 6 or 7 holds more than a token
    assert record.output_tokens == response.output_tokens == output
    assert record.metadata[OUTPUT_ESTIMATED] is True
    assert record.input_tokens == estimate(PROMPT) and record.metadata[ESTIMATED] is True
    info = INFO["gpt-usage"]
    assert math.isclose(record.cost_usd, info.cost(estimate(PROMPT), output))
    assert await spent(quota) >= info.cost(4 * estimate(PROMPT), output) * (1 - 1e-6)


async def test_an_openai_stream_cut_short_estimates_its_output_by_the_texts_size(
    server: FakeLLMServer,
    budgeted: EmpathyLLMExecutor,
    telemetry: MemoryTelemetryBackend,
    quota: MemoryQuotaStore,
) -> None:
    # deltas of 40 characters, several tokens each, and no usage: the body ends after
    # three of them without the usage chunk
    server.set_behavior(
        "gpt-usage",
        ModelBehavior(
            content=LONG_TEXT,
            output_tokens=68,
            stream=StreamBehavior(chunk_chars=40, fault_after=3, fault="incomplete"),
        ),
    )
    async with budgeted as executor:
        with pytest.raises(StreamInterruptedError) as caught:
            async with executor.stream(PROMPT, context("gpt-usage")) as stream:
                async for _ in stream:
                    pass
    pieces = [LONG_TEXT[i : i + 40] for i in range(0, 120, 40)]
    assert caught.value.partial_text == "".join(pieces)
    output = output_estimate(pieces)
    assert output == 30  # not 3, one per delta
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE
    assert record.output_tokens == caught.value.output_tokens == output
    assert record.metadata[OUTPUT_ESTIMATED] is True
    info = INFO["gpt-usage"]
    assert math.isclose(record.cost_usd, info.cost(estimate(PROMPT), output))
    charged = await spent(quota)  # the prompt's worst case and the output's estimate
    assert math.isclose(charged, info.cost(4 * estimate(PROMPT), output), rel_tol=1e-6)


async def test_a_tool_calls_streamed_pieces_are_estimated_by_their_size(
    telemetry: MemoryTelemetryBackend,
) -> None:
    # an OpenAI-compatible server that ignores include_usage, answering with a tool call
    # whose arguments come in two pieces: the name and the arguments' bytes are counted
    arguments = json.dumps(
        {"city": "Lisbon, Portugal", "units": "metric", "days": 7}, separators=(",", ":")
    )
    call = {"index": 0, "id": "call_1", "type": "function"}

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        first = {**call, "function": {"name": "get_weather", "arguments": arguments[:30]}}
        await response.write(chunk({"tool_calls": [first]}))
        rest = {"index": 0, "function": {"arguments": arguments[30:]}}
        await response.write(chunk({"tool_calls": [rest]}))
        await response.write(chunk({}, "tool_calls") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    tool = Tool(
        name="get_weather",
        description="The weather forecast",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
    async with serving("/v1/chat/completions", handler) as url:
        executor = EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
            registry=REGISTRY,
            telemetry_store=telemetry,
        )
        async with executor, executor.stream("hi", context("gpt-usage"), tools=[tool]) as stream:
            response = await stream.get_final_response()
    assert response.tool_calls[0].arguments_json == arguments
    output = -(-len(("get_weather" + arguments).encode()) // 4)
    assert output > 2  # two pieces
    record = await only_record(telemetry)
    assert record.output_tokens == response.output_tokens == output
    assert record.metadata[OUTPUT_ESTIMATED] is True


THOUGHTS = [f"step {i:02}: weigh the evidence once more before answering. " * 2 for i in range(20)]


def _reasoning_then_cut(api: str) -> bytes:
    """
    A reasoning model's stream (Anthropic's thinking block, an OpenAI-compatible
    server's ``reasoning_content`` as DeepSeek and vLLM send it, Mistral's thinking
    chunks in ``content``), then one text delta, then the body ends without the end
    marker.
    """
    if api == "openai":
        pieces = [chunk({"role": "assistant", "reasoning_content": t}) for t in THOUGHTS]
        return b"".join([*pieces, chunk({"content": "Yes"})])
    if api == "mistral":
        thinking = [
            [{"type": "thinking", "thinking": [{"type": "text", "text": t}]}] for t in THOUGHTS
        ]
        pieces = [chunk({"content": content}) for content in thinking]
        return b"".join([*pieces, chunk({"content": [{"type": "text", "text": "Yes"}]})])

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
    usage = {"input_tokens": 12, "output_tokens": 1}
    return b"".join(
        [
            event("message_start", {"message": message | {"usage": usage}}),
            event("content_block_start", {"index": 0, "content_block": {"type": "thinking"}}),
            *(
                event(
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "thinking_delta", "thinking": t}},
                )
                for t in THOUGHTS
            ),
            event(
                "content_block_delta",
                {"index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}},
            ),
            event("content_block_stop", {"index": 0}),
            event(
                "content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}
            ),
            event(
                "content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "Yes"}}
            ),
        ]
    )


@pytest.mark.parametrize("api", ["anthropic", "openai", "mistral"])
async def test_a_reasoning_stream_cut_short_estimates_the_reasoning_it_carried_as_output(
    telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore, api: str
) -> None:
    """
    The model's reasoning is output it is billed for, streamed before the answer's
    first delta: a stream cut short after a long reasoning recorded, and charged, the
    one delta's estimate (1 output token) as if the model had written nothing more.
    """
    body = _reasoning_then_cut(api)

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    model = "claude-usage" if api == "anthropic" else "gpt-usage"
    async with serving("/{tail:.*}", handler) as url:
        provider = (
            AnthropicProvider(api_key=KEY, base_url=url)
            if api == "anthropic"
            else OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")
        )
        executor = EmpathyLLMExecutor(
            [provider],
            registry=REGISTRY,
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
        )
        async with executor:
            with pytest.raises(StreamInterruptedError) as caught:
                async with executor.stream("Is it?", context(model)) as stream:
                    async for _ in stream:
                        pass
    assert caught.value.partial_text == "Yes"
    output = output_estimate([*THOUGHTS, "Yes"])
    assert output > 100
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE
    assert record.output_tokens == caught.value.output_tokens == output
    assert record.metadata[OUTPUT_ESTIMATED] is True
    assert await spent(quota) >= INFO[model].cost(record.input_tokens, output) * (1 - 1e-6)


async def test_an_http_error_before_the_stream_opens_records_no_tokens(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    server.script("gpt-usage", [500])  # answered with an error status: nothing billed
    async with make(server, telemetry) as executor:
        with pytest.raises(AllRoutesFailedError):
            async with executor.stream(PROMPT, context("gpt-usage")):
                pass
    record = await only_record(telemetry)
    assert (record.input_tokens, record.output_tokens, record.cost_usd) == (0, 0, 0.0)
    assert ESTIMATED not in record.metadata


# --------------------------------------------------------------------------- Anthropic format


@pytest.mark.parametrize("fault", ["error", "incomplete"])
async def test_an_anthropic_stream_failing_before_its_first_delta_keeps_message_starts_count(
    server: FakeLLMServer,
    budgeted: EmpathyLLMExecutor,
    telemetry: MemoryTelemetryBackend,
    quota: MemoryQuotaStore,
    fault: Fault,
) -> None:
    server.set_behavior("claude-usage", faulty(fault, 0))
    async with budgeted as executor:
        with pytest.raises(AllRoutesFailedError):
            async with executor.stream(PROMPT, context("claude-usage")):
                pass
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE
    assert record.input_tokens == fake_count(PROMPT)  # message_start's count
    assert ESTIMATED not in record.metadata
    assert record.cost_usd > 0
    assert math.isclose(await spent(quota), record.cost_usd, rel_tol=1e-6)


async def test_an_anthropic_stream_left_early_estimates_its_output_past_the_placeholder(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    # message_start says 1 output token, a placeholder: the deltas seen hold more
    behavior = ModelBehavior(
        content=LONG_TEXT,
        output_tokens=68,
        stream=StreamBehavior(chunk_chars=40, chunk_interval_ms=50),
    )
    server.set_behavior("claude-usage", behavior)
    async with (
        make(server, telemetry) as executor,
        executor.stream(PROMPT, context("claude-usage")) as stream,
    ):
        async for _ in stream:
            break
    record = await only_record(telemetry)
    assert record.outcome is Outcome.CANCELLED
    # each delta read is 40 bytes: 10 tokens (how many came before the break may vary)
    assert record.output_tokens in (10, 20, 30, 40, 50, 60)
    assert record.metadata[OUTPUT_ESTIMATED] is True


async def test_an_anthropic_stream_left_early_keeps_the_reported_count(
    budgeted: EmpathyLLMExecutor, telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> None:
    async with budgeted as executor, executor.stream(PROMPT, context("claude-usage")) as stream:
        async for _ in stream:
            break
    record = await only_record(telemetry)
    assert record.outcome is Outcome.CANCELLED
    assert record.input_tokens == fake_count(PROMPT) and ESTIMATED not in record.metadata
    assert math.isclose(await spent(quota), record.cost_usd, rel_tol=1e-6)


async def test_an_anthropic_message_delta_zeroing_the_prompts_counts_keeps_message_starts(
    telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> None:
    """
    Anthropic-compatible servers (SGLang, gateways translating OpenAI streams) send the
    prompt's counts in ``message_start`` and 0 for them in ``message_delta``: the 0
    replaced the real count, so the finished stream recorded the request's estimate of
    the prompt (flagged), no cache reads, and charged the prompt's worst case, where
    the same answer unstreamed recorded what the server reported.
    """
    usage = {"input_tokens": 25, "cache_read_input_tokens": 4000, "output_tokens": 3}
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-usage",
    }
    message |= {"content": [], "stop_reason": None, "stop_sequence": None}

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    text = {"type": "text_delta", "text": "Hello there"}
    zeroed = {"input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 3}
    events = [
        event("message_start", {"message": message | {"usage": usage | {"output_tokens": 1}}}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"index": 0, "delta": text}),
        event("content_block_stop", {"index": 0}),
        event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": zeroed}),
        event("message_stop", {}),
    ]
    whole = message | {"content": [{"type": "text", "text": "Hello there"}], "usage": usage}

    handler = anthropic_streaming(whole | {"stop_reason": "end_turn"}, events)
    async with serving("/v1/messages", handler) as url:
        executor = EmpathyLLMExecutor(
            [AnthropicProvider(api_key=KEY, base_url=url)],
            registry=REGISTRY,
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
        )
        async with executor:
            answered = await executor.run(PROMPT, context("claude-usage"))
            async with executor.stream(PROMPT, context("claude-usage")) as stream:
                streamed = await stream.get_final_response()
    assert (streamed.input_tokens, streamed.output_tokens) == (25, 3)
    assert streamed.cost_usd == answered.cost_usd > INFO["claude-usage"].cost(25, 3)
    run_record, stream_record = sorted(await telemetry.recent(limit=10), key=lambda r: r.timestamp)
    assert stream_record.input_tokens == run_record.input_tokens == 25
    assert stream_record.metadata == run_record.metadata
    assert stream_record.metadata["empathy_models.cache_read_tokens"] == 4000
    assert math.isclose(await spent(quota), 2 * answered.cost_usd, rel_tol=1e-6)


async def test_a_later_openai_usage_chunk_leaving_a_count_out_keeps_the_earlier_one(
    telemetry: MemoryTelemetryBackend,
) -> None:
    # servers that report usage on several chunks (vLLM's continuous usage, gateways
    # that split it) may leave the prompt's count out of the last one
    first_usage = {
        "prompt_tokens": 41,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 32},
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"content": "Hello"}, usage=first_usage))
        await response.write(chunk({"content": " there"}, usage={"completion_tokens": 2}))
        done = chunk({}, "stop", usage={"completion_tokens": 2})
        await response.write(done + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with serving("/v1/chat/completions", handler) as url:
        executor = EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
            registry=REGISTRY,
            telemetry_store=telemetry,
        )
        async with executor, executor.stream(PROMPT, context("gpt-usage")) as stream:
            response = await stream.get_final_response()
    assert (response.input_tokens, response.output_tokens) == (41, 2)
    record = await only_record(telemetry)
    assert (record.input_tokens, record.output_tokens) == (41, 2)
    # the later chunks give no prompt_tokens_details: the cache count stands
    assert record.metadata["empathy_models.cached_input_tokens"] == 32
    assert ESTIMATED not in record.metadata and OUTPUT_ESTIMATED not in record.metadata
