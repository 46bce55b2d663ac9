"""
Tool calls in streams: `FakeLLMServer` streams them as the real APIs do (judged by the
official ``openai`` and ``anthropic`` SDKs), and `EmpathyLLMExecutor.stream` yields
their pieces (`ToolCallDelta`) from ``stream.events()`` with the calls parsed in the
final response, over real HTTP on both wire formats.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from empathy_models import (
    AnthropicProvider,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMResponse,
    Message,
    OpenAIProvider,
    Outcome,
    RetryPolicy,
    StreamInterruptedError,
    Tool,
)
from empathy_models.abc import CompletionRequest
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.content import ResponseFormat, ToolCallDelta
from empathy_models.exceptions import InvalidResponseError
from empathy_models.testing import FakeLLMServer, FakeReply
from tests._serving import serving

from ._fakes import CHEAP_ONLY, KEY, NoSleep

if TYPE_CHECKING:
    import anthropic
    import openai
else:  # imported when a test first uses them (see _sdks)
    from ._sdks import anthropic, openai

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = Tool(name="get_weather", description="Weather in a city", parameters=WEATHER_SCHEMA)
OSLO = {"city": "Oslo, Norway", "unit": "c"}
OSLO_C = {"city": "Oslo", "unit": "c"}
CLAUDE = "claude-fake-haiku"
GPT = "gpt-fake-mini"
MODELS = [(CLAUDE, "anthropic"), (GPT, "openai")]


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=5) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    options.setdefault("registry", CHEAP_ONLY)
    options.setdefault("telemetry_store", "null://")
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        retry=RetryPolicy.none(),
        sleep=NoSleep(),
        **options,
    )


def pinned(model: str) -> ExecutionContext:
    return ExecutionContext(workflow="agent", stage="tools", model=model)


# --------------------------------------------------------------------------- the official SDKs


async def test_openai_sdk_streams_a_tool_call_as_it_would_receive_it_whole(
    server: FakeLLMServer,
) -> None:
    tools: Any = [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
    ]
    script = FakeReply(
        tool_calls=[
            {"name": "get_weather", "arguments": OSLO},
            {"name": "get_weather", "arguments": {"city": "Bergen", "unit": "f"}},
        ]
    )
    server.script("gpt-4o-mini", [script, script])
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo and Bergen?"}]
    async with openai.AsyncOpenAI(
        api_key=KEY, base_url=server.openai_base_url, max_retries=0
    ) as client:
        raw = await client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=tools, stream=True
        )
        by_index: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in raw:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for call in choice.delta.tool_calls or ():
                    slot = by_index.setdefault(call.index, {"id": "", "name": "", "args": ""})
                    slot["id"] += call.id or ""
                    if call.function is not None:
                        slot["name"] += call.function.name or ""
                        slot["args"] += call.function.arguments or ""
        async with client.chat.completions.stream(
            model="gpt-4o-mini", messages=messages, tools=tools
        ) as stream:
            final = await stream.get_final_completion()
    assert finish == "tool_calls"
    assert [(s["name"], json.loads(s["args"])) for s in by_index.values()] == [
        ("get_weather", OSLO),
        ("get_weather", {"city": "Bergen", "unit": "f"}),
    ]
    assert all(s["id"].startswith("call_") for s in by_index.values())
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None and len(message.tool_calls) == 2
    whole = message.tool_calls[0]
    assert whole.type == "function" and json.loads(whole.function.arguments) == OSLO


async def test_anthropic_sdk_streams_a_tool_call_as_it_would_receive_it_whole(
    server: FakeLLMServer,
) -> None:
    tools: Any = [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}]
    reply = FakeReply(
        content="Let me look.", tool_calls=[{"name": "get_weather", "arguments": OSLO}]
    )
    server.script("claude-haiku-4-5", [reply, reply])
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    async with anthropic.AsyncAnthropic(
        api_key=KEY, base_url=server.anthropic_base_url, max_retries=0
    ) as client:
        whole = await client.messages.create(
            model="claude-haiku-4-5", max_tokens=256, messages=messages, tools=tools
        )
        async with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=256, messages=messages, tools=tools
        ) as stream:
            partial = ""
            async for event in stream:
                if event.type == "input_json":
                    partial += event.partial_json
            streamed = await stream.get_final_message()
    assert streamed.stop_reason == whole.stop_reason == "tool_use"
    assert [b.type for b in streamed.content] == ["text", "tool_use"]
    use = streamed.content[1]
    assert isinstance(use, anthropic.types.ToolUseBlock)
    assert use.name == "get_weather" and use.input == OSLO and json.loads(partial) == OSLO
    assert use.id.startswith("toolu_")
    assert streamed.usage.output_tokens == whole.usage.output_tokens


async def test_a_forced_tool_streams_its_schema_arguments_to_both_sdks(
    server: FakeLLMServer,
) -> None:
    async with (
        openai.AsyncOpenAI(api_key=KEY, base_url=server.openai_base_url, max_retries=0) as oai,
        anthropic.AsyncAnthropic(
            api_key=KEY, base_url=server.anthropic_base_url, max_retries=0
        ) as ant,
    ):
        async with oai.chat.completions.stream(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[
                {
                    "type": "function",
                    "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA},
                }
            ],
            tool_choice="required",
        ) as stream:
            final = await stream.get_final_completion()
        async with ant.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=128,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[{"name": "get_weather", "input_schema": WEATHER_SCHEMA}],
            tool_choice={"type": "any"},
        ) as astream:
            message = await astream.get_final_message()
    calls = final.choices[0].message.tool_calls
    assert calls is not None
    assert set(json.loads(calls[0].function.arguments)) == {"city", "unit"}
    assert [b.type for b in message.content] == ["tool_use"]  # no empty text block
    block = message.content[0]
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert isinstance(block.input, dict) and set(block.input) == {"city", "unit"}


# --------------------------------------------------------------------------- the executor


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_a_streamed_two_turn_tool_conversation(
    server: FakeLLMServer, model: str, api: str
) -> None:
    server.script(
        model,
        [
            FakeReply(content="Checking.", tool_calls=[{"name": "get_weather", "arguments": OSLO}]),
            FakeReply(content="3 C and cloudy in Oslo."),
        ],
    )
    telemetry = MemoryTelemetryBackend()
    async with make(server, telemetry_store=telemetry) as executor:
        events: list[str | ToolCallDelta] = []
        async with executor.stream("Weather in Oslo?", pinned(model), tools=[WEATHER]) as stream:
            async for event in stream.events():
                events.append(event)  # noqa: PERF401 - the order is what is checked
            first = await stream.get_final_response()
        texts = [e for e in events if isinstance(e, str)]
        pieces = [e for e in events if isinstance(e, ToolCallDelta)]
        assert "".join(texts) == first.content == "Checking."
        assert events.index(pieces[0]) > events.index(texts[-1])  # the text, then the call
        assert pieces[0].name == "get_weather" and pieces[0].id == first.tool_calls[0].id
        assert all(p.index == 0 for p in pieces) and all(p.id is None for p in pieces[1:])
        assert len(pieces) > 2  # the arguments arrive in pieces
        assert json.loads("".join(p.arguments for p in pieces)) == OSLO
        assert first.tool_calls[0].name == "get_weather"
        assert dict(first.tool_calls[0].arguments) == OSLO
        assert first.stop_reason == ("tool_use" if api == "anthropic" else "tool_calls")
        assert first.ttft_ms is not None and first.input_tokens > 0 and first.output_tokens > 0

        history = [
            Message(role="user", content="Weather in Oslo?"),
            Message(role="assistant", content=first.content, tool_calls=first.tool_calls),
            Message(role="tool", tool_call_id=first.tool_calls[0].id, content="3 C, cloudy"),
        ]
        async with executor.stream(history, pinned(model), tools=[WEATHER]) as stream:
            text = "".join([delta async for delta in stream])  # text only
            second = await stream.get_final_response()
    assert text == second.content == "3 C and cloudy in Oslo." and second.tool_calls == ()
    sent = server.last_request(model)
    assert sent is not None and sent.body["stream"] is True
    if api == "openai":
        assert [m["role"] for m in sent.body["messages"]] == ["user", "assistant", "tool"]
        assert sent.body["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    else:
        assert sent.body["messages"][2]["content"][0]["type"] == "tool_result"
    records = await telemetry.recent(limit=10)
    assert [r.outcome for r in records] == [Outcome.SUCCESS, Outcome.SUCCESS]
    assert all(r.output_tokens > 0 and r.cost_usd > 0 for r in records)
    assert all(r.ttft_ms is not None for r in records)


async def test_a_streamed_tool_call_falls_back_before_its_first_piece(
    server: FakeLLMServer,
) -> None:
    # the Anthropic model fails before anything is streamed: the OpenAI one answers,
    # with the conversation so far converted to its format
    server.script(CLAUDE, [503])
    server.script(GPT, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": OSLO}])])
    history = [
        Message(role="user", content="Weather in Oslo?"),
        Message(role="assistant", content="Which unit?"),
        Message(role="user", content="Celsius."),
    ]
    ctx = ExecutionContext(workflow="agent", stage="tools", tier="cheap")
    async with (
        make(server) as executor,
        executor.stream(history, ctx, tools=[WEATHER]) as stream,
    ):
        kinds = [type(e).__name__ async for e in stream.events()]
        response = await stream.get_final_response()
    assert response.fallback_chain == (CLAUDE, GPT) and response.model == GPT
    assert set(kinds) == {"ToolCallDelta"}
    assert dict(response.tool_calls[0].arguments) == OSLO
    assert [a.outcome for a in response.attempts] == [Outcome.FAILURE, Outcome.SUCCESS]


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_malformed_streamed_arguments_are_an_invalid_response_kept_raw(
    server: FakeLLMServer, model: str, api: str
) -> None:
    raw = '{"city": "Oslo", "unit":'
    server.script(model, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": raw}])])
    telemetry = MemoryTelemetryBackend()
    async with make(server, telemetry_store=telemetry) as executor:
        async with executor.stream("Weather?", pinned(model), tools=[WEATHER]) as stream:
            with pytest.raises(StreamInterruptedError) as caught:
                await stream.get_final_response()
        records = await telemetry.recent(limit=5)
    error = caught.value.error
    assert isinstance(error, InvalidResponseError)
    assert getattr(error, "raw_arguments", None) == raw
    assert "get_weather" in str(error)
    assert [r.outcome for r in records] == [Outcome.FAILURE]


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_streamed_arguments_nested_too_deeply_are_an_invalid_response(
    server: FakeLLMServer, model: str, api: str
) -> None:
    deep = '{"a": ' + "[" * 400 + "]" * 400 + "}"
    server.script(model, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": deep}])])
    async with (
        make(server) as executor,
        executor.stream("Weather?", pinned(model), tools=[WEATHER]) as stream,
    ):
        with pytest.raises(StreamInterruptedError) as caught:
            await stream.get_final_response()
    assert isinstance(caught.value.error, InvalidResponseError)
    assert "nested at most 100 levels deep" in str(caught.value.error)


async def test_stream_options_are_checked_before_anything_is_sent(server: FakeLLMServer) -> None:
    from empathy_models import ConfigurationError

    async with make(server) as executor:
        with pytest.raises(ConfigurationError):
            executor.stream("hi", pinned(GPT), tools=[WEATHER], tool_choice="no_such_tool")
        with pytest.raises(ConfigurationError):
            executor.stream("hi", pinned(GPT), top_p=2.0)
        with pytest.raises(ConfigurationError, match="extra_body must not set stream"):
            executor.stream("hi", pinned(GPT), extra_body={"stream": False})
    assert server.requests() == 0


async def test_a_streamed_json_schema_answer_is_parsed(server: FakeLLMServer) -> None:
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    async with make(server) as executor:
        for model, _ in MODELS:
            async with executor.stream(
                "Who?", pinned(model), response_format=person, stop=["END"], seed=7
            ) as stream:
                response = await stream.get_final_response()
            assert isinstance(response.parsed, dict) and set(response.parsed) == {"name", "age"}
            assert json.loads(response.content) == response.parsed
    sent = server.last_request(GPT)
    assert sent is not None and sent.body["response_format"]["type"] == "json_schema"
    assert sent.body["stop"] == ["END"] and sent.body["seed"] == 7


async def test_a_response_format_in_anthropics_shape_asks_for_its_schema(
    server: FakeLLMServer,
) -> None:
    """
    Anthropic's ``output_config.format`` object, ``{"type": "json_schema", "schema": ...}``,
    is read as its schema, as OpenAI's whole ``response_format`` is (it was read as a
    schema itself and refused: ``response_format.schema.type ... got 'json_schema'``).
    """
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    anthropic_shape = {"type": "json_schema", "schema": person}
    assert ResponseFormat.of(anthropic_shape) == ResponseFormat(schema=person)
    async with make(server) as executor:
        for model, _ in MODELS:
            async with executor.stream(
                "Who?", pinned(model), response_format=anthropic_shape
            ) as stream:
                response = await stream.get_final_response()
            assert response.parse_error is None
            assert isinstance(response.parsed, dict) and set(response.parsed) == {"name"}
    sent = server.last_request(CLAUDE)
    assert sent is not None
    assert sent.body["output_config"]["format"] == {"type": "json_schema", "schema": person}


async def test_a_schema_goes_to_anthropic_without_the_bounds_its_api_refuses(
    server: FakeLLMServer,
) -> None:
    """
    Anthropic's structured outputs answer 400 to numeric, length and size bounds
    ("For 'integer' type, property 'minimum' is not supported"): its request carries
    them in each schema's description instead, as the official SDK sends them, for the
    model to read; OpenAI's carries the schema as given; the answer is checked against
    the whole schema either way.
    """
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150, "description": "Years"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "one": {"type": "array", "items": {"type": "number", "multipleOf": 0.5}, "minItems": 1},
            "minimum": {"type": "boolean"},  # a property so named stays a property
        },
        "required": ["name", "age", "tags", "one", "minimum"],
        "additionalProperties": False,
    }
    async with make(server) as executor:
        for model, _ in MODELS:
            async with executor.stream("Who?", pinned(model), response_format=person) as stream:
                response = await stream.get_final_response()
            assert response.parse_error is None, (model, response.parse_error)
            assert response.parsed["age"] >= 0 and len(response.parsed["tags"]) >= 2
    openai_sent = server.last_request(GPT)
    assert openai_sent is not None
    assert openai_sent.body["response_format"]["json_schema"]["schema"] == person
    sent = server.last_request(CLAUDE)
    assert sent is not None
    properties = sent.body["output_config"]["format"]["schema"]["properties"]
    assert properties == {
        "name": {"type": "string", "description": "{minLength: 2, maxLength: 40}"},
        "age": {"type": "integer", "description": "Years\n\n{minimum: 0, maximum: 150}"},
        "tags": {"type": "array", "items": {"type": "string"}, "description": "{minItems: 2}"},
        "one": {
            "type": "array",
            "items": {"type": "number", "description": "{multipleOf: 0.5}"},
            "minItems": 1,
        },
        "minimum": {"type": "boolean"},
    }


async def test_a_strict_tools_schema_goes_to_anthropic_without_the_bounds_its_api_refuses(
    server: FakeLLMServer,
) -> None:
    """A strict tool's schema is compiled into a grammar too: its bounds are described."""
    days = {
        "type": "object",
        "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["days"],
        "additionalProperties": False,
    }
    forecast = Tool(name="forecast", parameters=days, strict=True)
    loose = Tool(name="loose", parameters=days)  # not strict: sent as given
    async with make(server) as executor:
        answer = await executor.run(
            "Plan.", pinned(CLAUDE), tools=[forecast, loose], tool_choice="forecast"
        )
    assert [call.name for call in answer.tool_calls] == ["forecast"]
    assert 1 <= answer.tool_calls[0].arguments["days"] <= 14
    sent = server.last_request(CLAUDE)
    assert sent is not None
    strict, as_given = sent.body["tools"]
    assert strict["strict"] is True
    assert strict["input_schema"]["properties"]["days"] == {
        "type": "integer",
        "description": "{minimum: 1, maximum: 14}",
    }
    assert as_given["input_schema"] == days


async def test_a_response_format_of_plain_text_asks_for_plain_text(server: FakeLLMServer) -> None:
    """
    OpenAI's ``{"type": "text"}``, its default, asks for plain text: no schema is sent and
    nothing is parsed (it was read as a schema and refused: ``... got 'text'``).
    """
    async with make(server) as executor:
        for model, _ in MODELS:
            response = await executor.run("Hi", pinned(model), response_format={"type": "text"})
            async with executor.stream(
                "Hi", pinned(model), response_format={"type": "text"}
            ) as stream:
                streamed = await stream.get_final_response()
            for answer in (response, streamed):
                assert answer.content and answer.parsed is None and answer.parse_error is None
    for model in (GPT, CLAUDE):
        sent = server.last_request(model)
        assert sent is not None
        assert "response_format" not in sent.body and "output_config" not in sent.body


# --------------------------------------------------------------------------- servers' own shapes


async def _weather_stream(url: str) -> tuple[list[ToolCallDelta], LLMResponse]:
    """A streamed run offering WEATHER, pinned to GPT at ``url``: its tool call pieces, answer."""
    executor = EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=url)],
        registry=CHEAP_ONLY,
        telemetry_store="null://",
        retry=RetryPolicy.none(),
        sleep=NoSleep(),
    )
    async with (
        executor,
        executor.stream("Weather?", pinned(GPT), tools=[WEATHER]) as stream,
    ):
        pieces = [e async for e in stream.events() if isinstance(e, ToolCallDelta)]
        return pieces, await stream.get_final_response()


async def _sdk_tool_calls(url: str) -> list[Any]:
    """The tool calls the openai SDK's stream accumulator assembles from the stream at ``url``."""
    async with (
        openai.AsyncOpenAI(api_key=KEY, base_url=url, max_retries=0) as client,
        client.chat.completions.stream(
            model=GPT, messages=[{"role": "user", "content": "Weather?"}]
        ) as sdk_stream,
    ):
        final = await sdk_stream.get_final_completion()
    return list(final.choices[0].message.tool_calls or [])


@contextlib.asynccontextmanager
async def _sse_server(body: bytes) -> AsyncIterator[str]:
    """A server on 127.0.0.1 answering every POST with ``body`` as an event stream."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(body), 7):  # in small pieces
            await response.write(body[start : start + 7])
        await response.write_eof()
        return response

    async with serving("/{tail:.*}", handler) as url:
        yield f"{url}/v1"


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}
    chunk |= {"model": GPT, "choices": choices, **extra}
    return f"data: {json.dumps(chunk)}\n\n".encode()


def _call_piece(**piece: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"index": 0}
    if "id" in piece:
        call |= {"id": piece.pop("id"), "type": "function"}
    return {"tool_calls": [{**call, "function": piece}]}


async def test_a_tool_name_sent_in_pieces_is_joined_as_the_openai_sdk_joins_it() -> None:
    """Some OpenAI-compatible servers split the name too: only the first piece was kept."""
    body = b"".join(
        [
            _chunk({"role": "assistant", "content": None}),
            _chunk(_call_piece(id="call_1", name="get_", arguments="")),
            _chunk(_call_piece(name="wea", arguments='{"city": "Oslo", ')),
            _chunk(_call_piece(name="ther", arguments='"unit": "c"}')),
            _chunk({}, "tool_calls"),
            _chunk(None, usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}),
            b"data: [DONE]\n\n",
        ]
    )
    async with _sse_server(body) as url:
        pieces, response = await _weather_stream(url)
        sdk_calls = await _sdk_tool_calls(url)
    assert sdk_calls and sdk_calls[0].function.name == "get_weather"
    (call,) = response.tool_calls
    assert (call.id, call.name, dict(call.arguments)) == (
        "call_1",
        "get_weather",
        {"city": "Oslo", "unit": "c"},
    )
    assert "".join(p.name or "" for p in pieces) == "get_weather"
    assert pieces[0].id == "call_1" and all(p.id is None for p in pieces[1:])


@pytest.mark.parametrize("index", [0, None])
async def test_parallel_calls_sharing_an_index_are_told_apart_by_their_ids(
    index: int | None,
) -> None:
    """
    Gemini's OpenAI-compatible stream gives each parallel call index 0 (or none), with
    an id of its own: the calls were joined into one whose arguments were not JSON.
    """

    def piece(**fields: Any) -> dict[str, Any]:
        call = _call_piece(**fields)
        if index is None:
            del call["tool_calls"][0]["index"]
        return call

    body = b"".join(
        [
            _chunk(piece(id="function-call-1", name="get_weather", arguments='{"city": ')),
            _chunk(piece(arguments='"Oslo"}')),
            _chunk(piece(id="function-call-2", name="get_weather", arguments='{"city": "Rome"}')),
            _chunk(piece(id="function-call-2", arguments="")),  # its id again: the same call
            _chunk({}, "stop"),
            b"data: [DONE]\n\n",
        ]
    )
    async with _sse_server(body) as url:
        pieces, response = await _weather_stream(url)
    assert [(c.id, c.name, dict(c.arguments)) for c in response.tool_calls] == [
        ("function-call-1", "get_weather", {"city": "Oslo"}),
        ("function-call-2", "get_weather", {"city": "Rome"}),
    ]
    assert [p.index for p in pieces] == [0, 0, 1, 1]


def _indexed(index: int, **fields: Any) -> dict[str, Any]:
    """One entry of ``delta.tool_calls`` at wire ``index`` (``id`` beside ``function``)."""
    call: dict[str, Any] = {"index": index}
    if "id" in fields:
        call |= {"id": fields.pop("id"), "type": "function"}
    return {**call, "function": fields}


def _calls_body(*pieces: list[dict[str, Any]]) -> bytes:
    """An answer of tool calls: each chunk's ``delta.tool_calls`` from ``pieces``."""
    return b"".join(
        [
            _chunk({"role": "assistant", "content": None}),
            *(_chunk({"tool_calls": calls}) for calls in pieces),
            _chunk({}, "tool_calls"),
            b"data: [DONE]\n\n",
        ]
    )


async def test_parallel_calls_interleaved_by_index_assemble_as_the_openai_sdk_does() -> None:
    # OpenAI's own shape: the id and name only in a call's first piece, the later ones
    # carry the index alone, and two calls' pieces alternate (one chunk holds both)
    body = _calls_body(
        [_indexed(0, id="call_a", name="get_weather", arguments="")],
        [_indexed(1, id="call_b", name="get_weather", arguments="")],
        [_indexed(0, arguments='{"city": '), _indexed(1, arguments='{"city": ')],
        [_indexed(1, arguments='"Rome", "unit": "c"}')],
        [_indexed(0, arguments='"Oslo", "unit": "f"}')],
    )
    async with _sse_server(body) as url:
        pieces, response = await _weather_stream(url)
        sdk_calls = await _sdk_tool_calls(url)
    expected = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in sdk_calls]
    assert [(c.id, c.name, dict(c.arguments)) for c in response.tool_calls] == expected
    assert expected == [
        ("call_a", "get_weather", {"city": "Oslo", "unit": "f"}),
        ("call_b", "get_weather", {"city": "Rome", "unit": "c"}),
    ]
    assert [p.index for p in pieces] == [0, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("repeated", ["id", "id and name", "name"])
async def test_a_server_repeating_a_calls_id_or_name_in_every_piece_gives_one_call(
    repeated: str,
) -> None:
    """
    Some servers send the call's id (and name) again in every piece: the names were
    joined into ``get_weatherget_weather...`` (the openai SDK joins both, the ids too).
    """
    again: dict[str, Any] = {}
    if "id" in repeated:
        again["id"] = "call_1"
    if "name" in repeated:
        again["name"] = "get_weather"
    body = _calls_body(
        [_indexed(0, id="call_1", name="get_weather", arguments="")],
        [_indexed(0, **again, arguments='{"city": ')],
        [_indexed(0, **again, arguments='"Oslo", "unit": "c"}')],
    )
    async with _sse_server(body) as url:
        pieces, response = await _weather_stream(url)
    (call,) = response.tool_calls
    assert (call.id, call.name, dict(call.arguments)) == ("call_1", "get_weather", OSLO_C)
    # as `ToolCallDelta` says: the id and name on the first piece only
    assert [(p.index, p.id, p.name) for p in pieces] == [
        (0, "call_1", "get_weather"),
        (0, None, None),
        (0, None, None),
    ]


@pytest.mark.parametrize("given_id", ["", None])
async def test_parallel_calls_at_one_index_without_ids_are_told_apart(
    given_id: str | None,
) -> None:
    """
    Gemini's OpenAI-compatible stream may send parallel calls all at index 0 with empty
    ids (or none): the second call's arguments were joined to the first's, not JSON.
    """
    ids = {} if given_id is None else {"id": given_id}
    body = _calls_body(
        [_indexed(0, **ids, name="get_weather", arguments='{"city": "Oslo", ')],
        [_indexed(0, arguments='"unit": "c"}')],
        [_indexed(0, **ids, name="get_weather", arguments='{"city": "Rome", "unit": "f"}')],
    )
    async with _sse_server(body) as url:
        pieces, response = await _weather_stream(url)
    assert [(c.name, dict(c.arguments)) for c in response.tool_calls] == [
        ("get_weather", OSLO_C),
        ("get_weather", {"city": "Rome", "unit": "f"}),
    ]
    first, second = response.tool_calls
    assert first.id and second.id and first.id != second.id  # ids given to them
    assert [p.index for p in pieces] == [0, 0, 1]


async def test_braces_and_escapes_in_a_calls_strings_neither_end_nor_join_calls() -> None:
    """
    A server sending the name with every piece, and calls at one index told apart by
    their arguments being a whole object: a ``}`` or an escaped quote inside a string
    (a piece may end on the escaping backslash) ends no call, and a call that is whole
    is, whatever its strings hold.
    """
    named = {"name": "get_weather"}
    body = _calls_body(
        [_indexed(0, id="call_1", **named, arguments="")],
        [_indexed(0, **named, arguments='{"city": "Oslo }')],
        [_indexed(0, **named, arguments=" \\")],
        [_indexed(0, **named, arguments='"}')],
        [_indexed(0, **named, arguments='", "unit": "c"}')],
        [_indexed(0, **named, arguments='{"city": "Rome\\')],
        [_indexed(0, **named, arguments='\\", "unit": "f"}')],
    )
    async with _sse_server(body) as url:
        pieces, response = await _weather_stream(url)
    assert [(c.name, dict(c.arguments)) for c in response.tool_calls] == [
        ("get_weather", {"city": 'Oslo } "}', "unit": "c"}),
        ("get_weather", {"city": "Rome\\", "unit": "f"}),
    ]
    assert [p.index for p in pieces] == [0, 0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("named", [False, True])
async def test_a_server_changing_a_calls_id_mid_call_gives_one_call(named: bool) -> None:
    """
    A server that sends a fresh id with each piece of one call: its later pieces made
    calls of their own (without a name, or with arguments that are no JSON).
    """
    name = {"name": "get_weather"} if named else {}
    body = _calls_body(
        [_indexed(0, id="call_1", name="get_weather", arguments="")],
        [_indexed(0, id="call_2", **name, arguments='{"city": ')],
        [_indexed(0, id="call_3", **name, arguments='"Oslo", "unit": "c"}')],
    )
    async with _sse_server(body) as url:
        pieces, response = await _weather_stream(url)
    (call,) = response.tool_calls
    assert (call.id, call.name, dict(call.arguments)) == ("call_1", "get_weather", OSLO_C)
    assert [p.index for p in pieces] == [0, 0, 0]


@pytest.mark.parametrize("given", [[1], "{}", None, 3])
async def test_an_anthropic_tool_use_start_whose_input_is_not_an_object_is_invalid(
    given: Any,
) -> None:
    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    usage = {"input_tokens": 5, "output_tokens": 1}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": CLAUDE}
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": given}
    body = b"".join(
        [
            event("message_start", {"message": {**message, "content": [], "usage": usage}}),
            event("content_block_start", {"index": 0, "content_block": block}),
            event("content_block_stop", {"index": 0}),
            event("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": usage}),
            event("message_stop", {}),
        ]
    )
    async with _sse_server(body) as url:
        provider = AnthropicProvider(api_key=KEY, base_url=url.removesuffix("/v1"))
        async with provider:
            stream = await provider.stream(
                CompletionRequest(model=CLAUDE, messages="Weather?", tools=[WEATHER])
            )
            with pytest.raises(InvalidResponseError, match="tool_use block's input"):
                async for _ in stream:
                    pass


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_a_streamed_answer_the_check_refuses_is_a_parse_error(
    server: FakeLLMServer, model: str, api: str
) -> None:
    """NaN and 1e400 under a multipleOf raised a ValueError or OverflowError at the end."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "number", "multipleOf": 2}},
        "required": ["n"],
        "additionalProperties": False,
    }
    telemetry = MemoryTelemetryBackend()
    async with make(server, telemetry_store=telemetry) as executor:
        for text in ('{"n": NaN}', '{"n": 1e400}', '{"n": -Infinity}'):
            server.script(model, [FakeReply(content=text)])
            async with executor.stream("N?", pinned(model), response_format=schema) as stream:
                response = await stream.get_final_response()
            assert response.content == text and response.parsed is None
            assert "the answer is not JSON" in (response.parse_error or "")
        records = await telemetry.recent(limit=5)
    assert [r.outcome for r in records] == [Outcome.SUCCESS] * 3


# a web search the server runs itself, then a client tool call (Anthropic's documented
# shapes): the server tool's block is not a call the caller answers
SEARCH_INPUT = {"query": "weather in Oslo"}
SERVER_TOOL_BLOCKS: list[dict[str, Any]] = [
    {"type": "text", "text": "I'll search for that."},
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": SEARCH_INPUT},
    {
        "type": "web_search_tool_result",
        "tool_use_id": "srvtoolu_1",
        "content": [
            {
                "type": "web_search_result",
                "title": "Oslo weather",
                "url": "https://example.com/oslo",
                "encrypted_content": "x",
                "page_age": None,
            }
        ],
    },
    {"type": "text", "text": " It is mild."},
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": OSLO},
]


def _anthropic_answer(blocks: list[dict[str, Any]], stop: str | None) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": CLAUDE,
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 40},
    }


def _anthropic_events(blocks: list[dict[str, Any]], stop: str) -> bytes:
    """``blocks`` streamed as the Messages API streams them (inputs as input_json_delta)."""

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    start = _anthropic_answer([], None)
    out = [event("message_start", {"message": start | {"usage": {"input_tokens": 25}}})]
    for index, block in enumerate(blocks):
        opened, delta = block, None
        if block["type"] == "text":
            opened = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        elif "input" in block:
            opened = block | {"input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        out.append(event("content_block_start", {"index": index, "content_block": opened}))
        if delta is not None:
            out.append(event("content_block_delta", {"index": index, "delta": delta}))
        out.append(event("content_block_stop", {"index": index}))
    delta = {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 40}}
    out += [event("message_delta", delta), event("message_stop", {})]
    return b"".join(out)


@pytest.mark.parametrize("client_call", [False, True], ids=["search-only", "search-then-call"])
async def test_a_server_tool_streams_as_it_answers_whole_and_is_no_call_to_answer(
    client_call: bool,
) -> None:
    """
    A server tool (web search) sends ``server_tool_use`` and its ``input_json_delta``
    pieces: the stream reads them as the official SDK does, and, as in a whole answer,
    only ``tool_use`` blocks are calls the caller must answer.
    """
    blocks = SERVER_TOOL_BLOCKS if client_call else SERVER_TOOL_BLOCKS[:-1]
    stop = "tool_use" if client_call else "end_turn"

    async def handler(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response(_anthropic_answer(blocks, stop))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_anthropic_events(blocks, stop))
        await response.write_eof()
        return response

    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    async with serving("/v1/messages", handler) as url:
        executor = EmpathyLLMExecutor(
            [AnthropicProvider(api_key=KEY, base_url=url)],
            registry=CHEAP_ONLY,
            telemetry_store="null://",
            retry=RetryPolicy.none(),
            sleep=NoSleep(),
        )
        async with executor:
            whole = await executor.run(
                "Weather?", pinned(CLAUDE), tools=[WEATHER], extra_body={"tools": [search]}
            )
            async with executor.stream(
                "Weather?", pinned(CLAUDE), tools=[WEATHER], extra_body={"tools": [search]}
            ) as stream:
                events = [e async for e in stream.events()]
                streamed = await stream.get_final_response()
        async with (
            anthropic.AsyncAnthropic(api_key=KEY, base_url=url, max_retries=0) as client,
            client.messages.stream(
                model=CLAUDE, max_tokens=100, messages=[{"role": "user", "content": "Weather?"}]
            ) as sdk_stream,
        ):
            final = await sdk_stream.get_final_message()
    assert [b.type for b in final.content] == [b["type"] for b in blocks]
    assert final.content[1].input == SEARCH_INPUT  # type: ignore[union-attr]
    text = "I'll search for that. It is mild."
    assert streamed.content == whole.content == text
    assert "".join(e for e in events if isinstance(e, str)) == text
    assert streamed.stop_reason == whole.stop_reason == stop
    calls = [(c.id, c.name, dict(c.arguments)) for c in streamed.tool_calls]
    assert calls == [(c.id, c.name, dict(c.arguments)) for c in whole.tool_calls]
    assert calls == ([("toolu_1", "get_weather", OSLO)] if client_call else [])
    pieces = [e for e in events if isinstance(e, ToolCallDelta)]
    assert {p.index for p in pieces} == ({0} if client_call else set())
