"""
Answers whose ``usage`` is odd but billable, over real HTTP on 127.0.0.1: usage left
out or null on a whole answer is estimated (the prompt as the request's estimate, the
output from the answer's size) and flagged, as a stream without usage is; whole-number
counts written as JSON floats (``10.0``) are read as integers; fractional, negative and
non-finite counts are still a malformed answer.  Both wire formats, `run` and `stream`.

A bare aiohttp server answers: unlike `FakeLLMServer`, it can answer a streamed request
with a whole JSON body, as a server ignoring ``"stream": true`` does
(``tests/test_partial_usage.py`` drives partial usage through `FakeLLMServer`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest
from aiohttp import web

from empathy_models import (
    AllRoutesFailedError,
    Budget,
    CircuitBreaker,
    CircuitState,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    LLMResponse,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    StreamInterruptedError,
    Tool,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import InvalidResponseError
from empathy_models.limits import MemoryQuotaStore
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from tests._serving import serving
from tests._usage import INPUT_ESTIMATED, OUTPUT_ESTIMATED, estimate, only_record, spent

pytestmark = pytest.mark.filterwarnings("error")  # an unclosed response would warn

KEY = "test-key-0123"
PROMPT = "word " * 400  # 2,000 bytes
TEXT = "Paris is the capital of France; its river is the Seine."  # 55 bytes

Api = Literal["openai", "anthropic"]
MODEL: dict[Api, str] = {"openai": "gpt-odd", "anthropic": "claude-odd"}
PATH: dict[Api, str] = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
MISSING = object()
"""The usage a server leaves out of its answer."""


def _info(model: str, provider: str) -> ModelInfo:
    return ModelInfo(
        id=model,
        provider=provider,
        tier="cheap",
        input_price_per_mtok=2.0,
        output_price_per_mtok=8.0,
        context_window=128_000,
        max_output_tokens=4096,
    )


REGISTRY = ModelRegistry(
    models=[_info(MODEL["openai"], "openai"), _info(MODEL["anthropic"], "anthropic")],
    price_version="odd-usage-1",
)


def output_estimate(*texts: str) -> int:
    # the documented estimate of an answer's output: a quarter of its UTF-8 bytes, up
    return -(-sum(len(t.encode()) for t in texts) // 4)


# --------------------------------------------------------------------------- the server


def _usage_fields(api: Api, usage: object) -> dict[str, Any]:
    return {} if usage is MISSING else {"usage": usage}


def _whole(api: Api, model: str, usage: object, call: dict[str, Any] | None) -> dict[str, Any]:
    if api == "openai":
        message: dict[str, Any] = {"role": "assistant", "content": TEXT}
        if call is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": call["name"], "arguments": json.dumps(call["args"])},
                    }
                ],
            }
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            **_usage_fields(api, usage),
        }
    blocks: list[dict[str, Any]] = [{"type": "text", "text": TEXT}]
    if call is not None:
        blocks = [
            {"type": "tool_use", "id": "toolu_1", "name": call["name"], "input": call["args"]}
        ]
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": "end_turn",
        **_usage_fields(api, usage),
    }


def _sse(event: str | None, data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()


def _streamed(api: Api, model: str, usage: Any) -> list[bytes]:
    words = [TEXT[i : i + 7] for i in range(0, len(TEXT), 7)]
    if api == "openai":

        def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
            return {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [choice],
            }

        last = {**chunk({}, "stop"), **_usage_fields(api, usage)}
        return [
            *(_sse(None, chunk({"content": word})) for word in words),
            _sse(None, last),
            _sse(None, "[DONE]"),
        ]
    start: dict[str, Any] = {"id": "msg_1", "model": model}
    end: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    if usage is None:
        start["usage"] = end["usage"] = None
    elif usage is not MISSING:  # as Anthropic sends it: 1 at the start, the count at the end
        placeholder = 1.0 if isinstance(usage["input_tokens"], float) else 1  # the same type
        start["usage"] = {**usage, "output_tokens": placeholder}
        end["usage"] = {"output_tokens": usage["output_tokens"]}
    text_start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
    return [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse("content_block_start", text_start),
        *(
            _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
            )
            for word in words
        ),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", end),
        _sse("message_stop", {"type": "message_stop"}),
    ]


class Server:
    """Answers with ``usage`` (`MISSING`: none), whole or streamed as asked; counts calls."""

    def __init__(self, api: Api, usage: object, call: dict[str, Any] | None = None) -> None:
        self.api, self.usage, self.call = api, usage, call
        self.calls = 0
        self.streamed_whole = False
        """Answer a streamed request with a whole JSON body (a server ignoring ``stream``)."""
        self.not_json = False
        """Answer with a 200 whose JSON body is cut in half."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.json()
        model = body["model"]
        if self.not_json:
            whole = json.dumps(_whole(self.api, model, self.usage, self.call)).encode()
            return web.Response(body=whole[: len(whole) // 2], content_type="application/json")
        if not body.get("stream") or self.streamed_whole:
            return web.json_response(_whole(self.api, model, self.usage, self.call))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in _streamed(self.api, model, self.usage):
            await response.write(piece)
        await response.write_eof()
        return response


def _provider(api: Api, url: str) -> OpenAIProvider | AnthropicProvider:
    if api == "openai":
        return OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")
    return AnthropicProvider(api_key=KEY, base_url=url)


@pytest.fixture
def telemetry() -> MemoryTelemetryBackend:
    return MemoryTelemetryBackend()


@pytest.fixture
def quota() -> MemoryQuotaStore:
    return MemoryQuotaStore()


Served = Callable[[Server], Any]


@pytest.fixture
async def served(
    telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> AsyncIterator[Callable[[Server], Any]]:
    """Serve a `Server` and give an executor (not open yet) calling it, with a $100 budget."""
    stack: list[Any] = []

    async def start(server: Server) -> EmpathyLLMExecutor:
        opened = serving(PATH[server.api], server.handle)
        url = await opened.__aenter__()
        stack.append(opened)
        return EmpathyLLMExecutor(
            [_provider(server.api, url)],
            registry=REGISTRY,
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
            retry=RetryPolicy(jitter=False, base_delay=0.0, max_attempts=3),
            fallback=FallbackPolicy(max_routes=1),
        )

    yield start
    for opened in reversed(stack):
        await opened.__aexit__(None, None, None)


def context(api: Api) -> ExecutionContext:
    return ExecutionContext(workflow="w", stage="s", model=MODEL[api], max_tokens=100)


async def answer(executor: EmpathyLLMExecutor, api: Api, mode: str, **options: Any) -> LLMResponse:
    async with executor:
        if mode == "run":
            return await executor.run(PROMPT, context(api), **options)
        async with executor.stream(PROMPT, context(api), **options) as stream:
            return await stream.get_final_response()


# --------------------------------------------------------------------------- no usage


@pytest.mark.parametrize("usage", [MISSING, None], ids=["left-out", "null"])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_whole_answer_without_usage_is_an_answer_with_its_tokens_estimated(
    served: Served,
    telemetry: MemoryTelemetryBackend,
    quota: MemoryQuotaStore,
    api: Api,
    usage: object,
) -> None:
    # the provider billed the call: the answer is delivered, not retried or failed over
    server = Server(api, usage)
    response = await answer(await served(server), api, "run")
    assert response.content == TEXT and server.calls == 1
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS
    assert record.input_tokens == response.input_tokens == estimate(PROMPT)
    assert record.output_tokens == response.output_tokens == output_estimate(TEXT) > 0
    assert record.metadata[INPUT_ESTIMATED] is True
    assert record.metadata[OUTPUT_ESTIMATED] is True
    info = REGISTRY.get(MODEL[api])
    assert math.isclose(record.cost_usd, info.cost(estimate(PROMPT), output_estimate(TEXT)))
    assert response.cost_usd == record.cost_usd
    # budgets are charged the prompt's worst case, as for a stream without usage
    assert await spent(quota) >= info.cost(4 * estimate(PROMPT), output_estimate(TEXT)) * (1 - 1e-9)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_tool_call_without_usage_estimates_its_name_and_arguments(
    served: Served, telemetry: MemoryTelemetryBackend, api: Api
) -> None:
    args = {"city": "Reykjavík", "days": 3, "units": "metric"}
    server = Server(api, MISSING, call={"name": "get_weather", "args": args})
    tool = Tool(
        name="get_weather",
        description="Weather in a city",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
    async with await served(server) as executor:
        response = await executor.run(PROMPT, context(api), tools=[tool])
    (call,) = response.tool_calls
    assert call.arguments == args
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS
    assert record.output_tokens == output_estimate("get_weather", call.arguments_json)
    assert record.metadata[OUTPUT_ESTIMATED] is True


@pytest.mark.parametrize("usage", [MISSING, None], ids=["left-out", "null"])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_stream_answered_whole_without_usage_is_estimated_as_run_is(
    served: Served, telemetry: MemoryTelemetryBackend, api: Api, usage: object
) -> None:
    # a server that ignores "stream": true and answers with one JSON body
    server = Server(api, usage)
    server.streamed_whole = True
    response = await answer(await served(server), api, "stream")
    assert response.content == TEXT and server.calls == 1
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS
    assert (record.input_tokens, record.output_tokens) == (
        estimate(PROMPT),
        output_estimate(TEXT),
    )
    assert record.metadata[INPUT_ESTIMATED] is True
    assert record.metadata[OUTPUT_ESTIMATED] is True


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_stream_answered_whole_with_a_count_left_out_keeps_the_other(
    served: Served, telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore, api: Api
) -> None:
    server = Server(api, {"prompt_tokens": 12} if api == "openai" else {"input_tokens": 12})
    server.streamed_whole = True
    response = await answer(await served(server), api, "stream")
    assert response.content == TEXT and server.calls == 1
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS
    assert (record.input_tokens, record.output_tokens) == (12, output_estimate(TEXT))
    assert INPUT_ESTIMATED not in record.metadata  # the prompt's count was reported
    assert record.metadata[OUTPUT_ESTIMATED] is True
    assert math.isclose(await spent(quota), record.cost_usd, rel_tol=1e-6)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_stream_answered_whole_with_a_body_that_is_not_json_records_the_prompt(
    served: Served, telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore, api: Api
) -> None:
    server = Server(api, MISSING)
    server.streamed_whole = server.not_json = True
    with pytest.raises(AllRoutesFailedError) as caught:
        await answer(await served(server), api, "stream")
    (error,) = caught.value.exceptions
    assert isinstance(error, InvalidResponseError) and error.status == 200
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE and record.error_type == "InvalidResponseError"
    assert (record.input_tokens, record.output_tokens) == (estimate(PROMPT), 0)
    assert record.metadata[INPUT_ESTIMATED] is True
    info = REGISTRY.get(MODEL[api])
    assert math.isclose(record.cost_usd, info.cost(estimate(PROMPT), 0))
    assert await spent(quota) >= info.cost(4 * estimate(PROMPT), 0) * (1 - 1e-9)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_answers_without_usage_keep_the_circuit_closed(
    telemetry: MemoryTelemetryBackend, api: Api
) -> None:
    server = Server(api, MISSING)
    async with serving(PATH[api], server.handle) as url:
        breaker = CircuitBreaker(store="memory://")
        async with (
            breaker,
            EmpathyLLMExecutor(
                [_provider(api, url)], registry=REGISTRY, telemetry_store=telemetry, breaker=breaker
            ) as executor,
        ):
            for _ in range(6):
                await executor.run(PROMPT, context(api))
            status = await breaker.get_status(breaker.key_for(api, MODEL[api]))
    assert server.calls == 6
    assert status.state is CircuitState.CLOSED and status.failure_count == 0
    assert {r.outcome for r in await telemetry.recent(limit=10)} == {Outcome.SUCCESS}


# --------------------------------------------------------------------------- float counts


def _counts(api: Api, given: float, prompt: float = 10.0) -> dict[str, float]:
    if api == "openai":
        return {"prompt_tokens": prompt, "completion_tokens": given}
    return {"input_tokens": prompt, "output_tokens": given}


@pytest.mark.parametrize("mode", ["run", "stream"])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_whole_number_counts_sent_as_floats_are_read_as_integers(
    served: Served, telemetry: MemoryTelemetryBackend, api: Api, mode: str
) -> None:
    server = Server(api, _counts(api, 5.0))
    response = await answer(await served(server), api, mode)
    assert response.content == TEXT and server.calls == 1
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS
    assert (record.input_tokens, record.output_tokens) == (10, 5)
    assert (response.input_tokens, response.output_tokens) == (10, 5)
    assert type(record.input_tokens) is int and type(record.output_tokens) is int
    assert INPUT_ESTIMATED not in record.metadata and OUTPUT_ESTIMATED not in record.metadata


@pytest.mark.parametrize(
    ("given", "match"),
    [
        (5.5, r"usage\.(completion|output)_tokens must be a whole number, got 5\.5"),
        (-5.0, r"usage\.(completion|output)_tokens must be >= 0, got -5"),
        (math.inf, r"usage\.(completion|output)_tokens must be a whole number, got inf"),
    ],
    ids=["fractional", "negative", "infinite"],
)
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_fractional_negative_or_infinite_count_is_still_a_malformed_answer(
    served: Served, telemetry: MemoryTelemetryBackend, api: Api, given: float, match: str
) -> None:
    server = Server(api, _counts(api, given, prompt=10))
    with pytest.raises(AllRoutesFailedError) as caught:
        await answer(await served(server), api, "run")
    (error, *_) = caught.value.exceptions
    assert isinstance(error, InvalidResponseError)
    assert re.search(match, str(error)), str(error)
    assert {r.outcome for r in await telemetry.recent(limit=10)} == {Outcome.FAILURE}


@pytest.mark.parametrize(
    ("given", "match"),
    [
        (5.5, r"usage\.(completion|output)_tokens must be an integer >= 0, got 5\.5"),
        (-5.0, r"usage\.(completion|output)_tokens must be an integer >= 0, got -5"),
    ],
    ids=["fractional", "negative"],
)
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_stream_with_a_fractional_or_negative_count_is_still_malformed(
    served: Served, api: Api, given: float, match: str
) -> None:
    # the count comes after the text (OpenAI's last chunk, Anthropic's message_delta)
    server = Server(api, _counts(api, given, prompt=10))
    with pytest.raises(StreamInterruptedError) as caught:
        await answer(await served(server), api, "stream")
    assert isinstance(caught.value.error, InvalidResponseError)
    assert re.search(match, str(caught.value.error)), str(caught.value.error)
