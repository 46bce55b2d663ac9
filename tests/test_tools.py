"""
Tool calling, content blocks and structured output through `EmpathyLLMExecutor.run`,
over real HTTP to `FakeLLMServer` with the real providers, on both wire formats.
"""

from __future__ import annotations

import asyncio
import decimal
import json
import random
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import attrs
import jsonschema
import pytest
from aiohttp import web

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    AnthropicProvider,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMResponse,
    Message,
    ModelRegistry,
    OpenAIProvider,
    RetryPolicy,
    Tool,
)
from empathy_models.abc import CompletionRequest
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.content import ImageBlock, ResponseFormat, TextBlock, ToolCall, ToolResult
from empathy_models.exceptions import (
    InvalidRequestError,
    InvalidResponseError,
    ModelNotFoundError,
    RecordValidationError,
)
from empathy_models.testing import FakeLLMServer, FakeReply

from ._fakes import CHEAP_ONLY, KEY, WEATHER, NoSleep
from ._serving import serving

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP4//8/AAX+Av6n1qSFAAAAAElFTkSuQmCC"
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_TO_ANTHROPIC: dict[str, Any] = {
    **PERSON,
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "description": "{minimum: 0}"},
    },
}
"""`PERSON` as Anthropic's structured outputs take it: the bound its API refuses described."""
CLAUDE = "claude-fake-haiku"
GPT = "gpt-fake-mini"
MODELS = [(CLAUDE, "anthropic"), (GPT, "openai")]


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=3) as fake:
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


# --------------------------------------------------------------------------- a conversation


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_a_two_turn_tool_conversation(server: FakeLLMServer, model: str, api: str) -> None:
    server.script(
        model,
        [
            FakeReply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
            FakeReply(content="3 C and cloudy in Oslo."),
        ],
    )
    history: list[Message] = [Message(role="user", content="Weather in Oslo?")]
    async with make(server) as executor:
        first = await executor.run(history, pinned(model), tools=[WEATHER])
        assert first.stop_reason == ("tool_use" if api == "anthropic" else "tool_calls")
        (call,) = first.tool_calls
        assert call.name == "get_weather" and call.arguments == {"city": "Oslo"}
        assert first.input_tokens > 0 and first.cost_usd > 0  # still from usage
        history.append(
            Message(role="assistant", content=first.content, tool_calls=first.tool_calls)
        )
        history.append(Message(role="tool", tool_call_id=call.id, content="3 C, cloudy"))
        second = await executor.run(history, pinned(model), tools=[WEATHER])
    assert second.content == "3 C and cloudy in Oslo."
    assert second.tool_calls == ()
    sent = server.last_request(model)
    assert sent is not None and sent.api == api
    if api == "openai":
        assert [m["role"] for m in sent.body["messages"]] == ["user", "assistant", "tool"]
        assert sent.body["messages"][1]["tool_calls"][0]["id"] == call.id
        assert sent.body["messages"][2] == {
            "role": "tool",
            "tool_call_id": call.id,
            "content": "3 C, cloudy",
        }
        assert sent.body["tools"][0]["function"]["name"] == "get_weather"
    else:
        assert [m["role"] for m in sent.body["messages"]] == ["user", "assistant", "user"]
        assert sent.body["messages"][1]["content"][-1]["type"] == "tool_use"
        assert sent.body["messages"][2]["content"] == [
            {"type": "tool_result", "tool_use_id": call.id, "content": "3 C, cloudy"}
        ]
        assert sent.body["tools"][0]["input_schema"] == WEATHER.parameters


async def test_fallback_from_anthropic_to_openai_mid_conversation(server: FakeLLMServer) -> None:
    """Turn one on Claude calls a tool; turn two, Claude is down: GPT gets the history."""
    server.script(
        CLAUDE,
        [
            FakeReply(
                content="Let me check.",
                tool_calls=[
                    {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    {"name": "get_weather", "arguments": {"city": "Bergen"}},
                ],
            )
        ],
    )
    server.script(GPT, [FakeReply(content="Oslo 3 C, Bergen 6 C.")])
    ctx = ExecutionContext(workflow="agent", stage="tools", tier="cheap")
    history: list[Message] = [
        Message(
            role="user",
            content=[TextBlock(text="Weather here?"), ImageBlock.from_base64(PNG, "image/png")],
        )
    ]
    async with make(server) as executor:
        first = await executor.run(history, ctx, tools=[WEATHER])
        assert first.model == CLAUDE and len(first.tool_calls) == 2
        history.append(
            Message(role="assistant", content=first.content, tool_calls=first.tool_calls)
        )
        history.extend(
            Message(role="tool", tool_call_id=call.id, content=f"{call.arguments['city']}: ok")
            for call in first.tool_calls
        )
        server.set_outage("anthropic", True)
        second = await executor.run(history, ctx, tools=[WEATHER])
    assert second.model == GPT and second.fallback_chain == (CLAUDE, GPT)
    assert second.content == "Oslo 3 C, Bergen 6 C."
    sent = server.last_request(GPT)
    assert sent is not None
    messages = sent.body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PNG}"},
    }
    assert messages[1]["content"] == "Let me check."
    ids = [c.id for c in first.tool_calls]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ids
    assert [json.loads(c["function"]["arguments"]) for c in messages[1]["tool_calls"]] == [
        {"city": "Oslo"},
        {"city": "Bergen"},
    ]
    assert [(m["tool_call_id"], m["content"]) for m in messages[2:]] == [
        (ids[0], "Oslo: ok"),
        (ids[1], "Bergen: ok"),
    ]


async def test_openai_history_continues_on_anthropic(server: FakeLLMServer) -> None:
    """OpenAI-style dicts (ids with characters Anthropic refuses) convert the other way."""
    history: list[Any] = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call:1/a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call:1/a", "content": "3 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    async with make(server) as executor:
        response = await executor.run(history, pinned(CLAUDE), tools=[WEATHER])
    assert response.content
    sent = server.last_request(CLAUDE)
    assert sent is not None
    (use,) = sent.body["messages"][1]["content"]
    assert re.fullmatch(r"call_1_a_[0-9a-f]{16}", use["id"])
    assert use == {
        "type": "tool_use",
        "id": use["id"],
        "name": "get_weather",
        "input": {"city": "Oslo"},
    }
    assert sent.body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": use["id"], "content": "3 C"},
        {"type": "text", "text": "And tomorrow?"},
    ]


async def test_tool_ids_that_differ_stay_distinct_on_anthropic(server: FakeLLMServer) -> None:
    """call:1 and call/1 were both sent as call_1: two calls Anthropic could not tell apart."""
    history = [
        Message(role="user", content="Weather?"),
        Message(
            role="assistant",
            tool_calls=[
                ToolCall(id="call:1", name="get_weather", arguments={"city": "Oslo"}),
                ToolCall(id="call/1", name="get_weather", arguments={"city": "Rome"}),
                ToolCall(id="toolu_01-Ab_9", name="get_weather", arguments={"city": "Bern"}),
            ],
        ),
        Message(role="tool", tool_call_id="call/1", content="20 C"),
        Message(role="tool", tool_call_id="call:1", content="3 C"),
        Message(role="tool", tool_call_id="toolu_01-Ab_9", content="9 C"),
    ]
    async with make(server) as executor:
        await executor.run(history, pinned(CLAUDE), tools=[WEATHER])
        first = server.last_request(CLAUDE)
        await executor.run(history, pinned(CLAUDE), tools=[WEATHER])
    sent = server.last_request(CLAUDE)
    assert first is not None and sent is not None
    assert first.body["messages"] == sent.body["messages"]  # the same ids each time
    uses = {b["input"]["city"]: b["id"] for b in sent.body["messages"][1]["content"]}
    results = {b["content"]: b["tool_use_id"] for b in sent.body["messages"][2]["content"]}
    assert len(set(uses.values())) == 3  # distinct, each as Anthropic's ids must be
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in uses.values())
    assert uses["Bern"] == "toolu_01-Ab_9"  # a valid id is sent as it is
    assert (uses["Oslo"], uses["Rome"], uses["Bern"]) == (
        results["3 C"],
        results["20 C"],
        results["9 C"],
    )


def _tool_text(message: Mapping[str, Any]) -> str:
    """A ``tool`` message's text: its string, or its text parts joined."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


async def test_tool_ids_over_40_characters_are_shortened_for_openai(
    server: FakeLLMServer,
) -> None:
    """
    Chat Completions refuses a tool call id over 40 characters (Responses-style ``fc_``
    ids are 53): each such id is sent as 40, the same in its call and its result, and
    two ids that start alike stay distinct.
    """
    long_a = "fc_" + "0f0e50a1476a6c35006912c58dc9f88191" + "92c25864eb16f07f"
    long_b = "fc_" + "0f0e50a1476a6c35006912c58dc9f88191" + "000000000000000b"
    image = ImageBlock.from_base64(PNG, "image/png")
    history = [
        Message(role="user", content="Weather?"),
        Message(
            role="assistant",
            tool_calls=[
                ToolCall(id=long_a, name="get_weather", arguments={"city": "Oslo"}),
                ToolCall(id=long_b, name="get_weather", arguments={"city": "Rome"}),
                ToolCall(id="call_" + "x" * 35, name="get_weather", arguments={"city": "Bern"}),
            ],
        ),
        Message(role="tool", tool_call_id=long_b, content="20 C"),
        Message(
            role="user",
            content=[
                ToolResult(tool_call_id=long_a, content=[TextBlock(text="3 C"), image]),
                ToolResult(tool_call_id="call_" + "x" * 35, content="9 C"),
            ],
        ),
    ]
    async with make(server) as executor:
        response = await executor.run(history, pinned(GPT), tools=[WEATHER])
    assert response.content
    sent = server.last_request(GPT)
    assert sent is not None
    calls = {
        json.loads(c["function"]["arguments"])["city"]: c["id"]
        for c in sent.body["messages"][1]["tool_calls"]
    }
    results = {_tool_text(m): m["tool_call_id"] for m in sent.body["messages"][2:5]}
    assert all(len(i) <= 40 for i in calls.values())
    assert calls["Bern"] == "call_" + "x" * 35  # 40 characters: sent as it is
    assert len({calls["Oslo"], calls["Rome"]}) == 2
    assert (calls["Oslo"], calls["Rome"], calls["Bern"]) == (
        results["3 C"],
        results["20 C"],
        results["9 C"],
    )


def _texts(value: Any) -> Iterator[str]:
    """Every text block's text in a wire body, however deep."""
    if isinstance(value, Mapping):
        if value.get("type") == "text":
            yield value["text"]
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


async def test_empty_text_blocks_are_left_out_for_anthropic(server: FakeLLMServer) -> None:
    """
    OpenAI takes an empty text part; the Messages API refuses an empty text block, in a
    message or a tool result: a conversation holding one continues on Claude.
    """
    image = ImageBlock.from_base64(PNG, "image/png")
    history = [
        Message(role="user", content=[TextBlock(text=""), TextBlock(text="Weather?")]),
        Message(
            role="assistant",
            tool_calls=[
                ToolCall(id="call_1", name="get_weather", arguments={"city": "Oslo"}),
                ToolCall(id="call_2", name="get_weather", arguments={"city": "Rome"}),
            ],
        ),
        Message(
            role="user",
            content=[
                ToolResult(tool_call_id="call_1", content=[TextBlock(text=""), image]),
                ToolResult(tool_call_id="call_2", content=[TextBlock(text="")]),
                TextBlock(text=""),
            ],
        ),
    ]
    async with make(server) as executor:
        response = await executor.run(history, pinned(CLAUDE), tools=[WEATHER])
    assert response.content
    sent = server.last_request(CLAUDE)
    assert sent is not None
    assert list(_texts(sent.body["messages"])) == ["Weather?"]
    first, second = sent.body["messages"][2]["content"]
    assert first["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    ]
    assert second == {"type": "tool_result", "tool_use_id": "call_2"}


@pytest.mark.parametrize("empty", ["", [TextBlock(text="")]], ids=["string", "blocks"])
async def test_an_empty_answer_in_the_history_continues_on_anthropic(
    server: FakeLLMServer, empty: Any
) -> None:
    """
    An answer with no text (OpenAI's ``content_filter``, or a reasoning model out of
    tokens, gives ``""``) sent back whole, as the README has it: OpenAI takes the empty
    assistant turn, the Messages API refuses one before the last message (a 400 before).
    Claude gets the conversation without it; the empty last assistant turn it allows stays.
    """
    history = [
        Message(role="user", content="Weather in Oslo?"),
        Message(role="assistant", content=empty),
        Message(role="user", content="Try again, please."),
    ]
    async with make(server) as executor:
        response = await executor.run(history, pinned(CLAUDE))
        assert response.content
        sent = server.last_request(CLAUDE)
        assert sent is not None
        assert sent.body["messages"] == [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "user", "content": "Try again, please."},
        ]
        gpt = await executor.run(history, pinned(GPT))  # OpenAI is sent it as it is
        assert gpt.content
        sent = server.last_request(GPT)
        assert sent is not None and [m["role"] for m in sent.body["messages"]] == [
            "user",
            "assistant",
            "user",
        ]


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_tool_results_as_blocks_with_an_error_flag(
    server: FakeLLMServer, model: str, api: str
) -> None:
    history = [
        Message(role="user", content="Weather?"),
        Message(
            role="assistant",
            content=[ToolCall(id="toolu_1", name="get_weather", arguments={"city": "Oslo"})],
        ),
        Message(
            role="user",
            content=[ToolResult(tool_call_id="toolu_1", content="service down", is_error=True)],
        ),
    ]
    async with make(server) as executor:
        await executor.run(history, pinned(model), tools=[WEATHER])
    sent = server.last_request(model)
    assert sent is not None
    last = sent.body["messages"][-1]
    if api == "anthropic":
        assert last["content"] == [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": "service down",
                "is_error": True,
            }
        ]
    else:
        assert last == {"role": "tool", "tool_call_id": "toolu_1", "content": "service down"}


@pytest.mark.parametrize("form", ["blocks", "tool messages"])
async def test_a_tool_results_images_follow_all_the_turns_tool_messages(
    server: FakeLLMServer, form: str
) -> None:
    # OpenAI wants every call of an assistant message answered by the tool messages
    # right after it: the first result's image must not come between them
    photo = [TextBlock(text="a photo"), ImageBlock.from_base64(PNG, "image/png")]
    history: list[Message] = [
        Message(role="user", content="Weather in Oslo and Rome?"),
        Message(
            role="assistant",
            content="",
            tool_calls=[
                ToolCall(id="call_1", name="get_weather", arguments={"city": "Oslo"}),
                ToolCall(id="call_2", name="get_weather", arguments={"city": "Rome"}),
            ],
        ),
    ]
    if form == "blocks":
        history.append(
            Message(
                role="user",
                content=[
                    ToolResult(tool_call_id="call_1", content=photo),
                    ToolResult(tool_call_id="call_2", content="20 C"),
                ],
            )
        )
    else:
        history += [
            Message(role="tool", tool_call_id="call_1", content=photo),
            Message(role="tool", tool_call_id="call_2", content="20 C"),
        ]
    async with make(server) as executor:
        response = await executor.run(history, pinned(GPT), tools=[WEATHER])
    assert response.content
    sent = server.last_request(GPT)
    assert sent is not None
    messages = sent.body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert [m["tool_call_id"] for m in messages[2:4]] == ["call_1", "call_2"]
    assert messages[2]["content"] == [{"type": "text", "text": "a photo"}]
    note, image = messages[4]["content"]
    assert "call_1" in note["text"] and image["type"] == "image_url"


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_tool_choice_maps_and_a_forced_tool_is_called(
    server: FakeLLMServer, model: str, api: str
) -> None:
    wire_choices: dict[str, dict[str, Any]] = {
        "anthropic": {
            "auto": {"type": "auto"},
            "none": {"type": "none"},
            "required": {"type": "any"},
            "get_weather": {"type": "tool", "name": "get_weather"},
        },
        "openai": {
            "auto": "auto",
            "none": "none",
            "required": "required",
            "get_weather": {"type": "function", "function": {"name": "get_weather"}},
        },
    }
    async with make(server) as executor:
        for choice, wire in wire_choices[api].items():
            response = await executor.run(
                "Weather?", pinned(model), tools=[WEATHER], tool_choice=choice
            )
            sent = server.last_request(model)
            assert sent is not None and sent.body["tool_choice"] == wire
            if choice in ("required", "get_weather"):
                (call,) = response.tool_calls
                assert call.name == "get_weather" and isinstance(call.arguments["city"], str)
            else:
                assert response.tool_calls == ()


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_tool_choice_none_without_tools(server: FakeLLMServer, model: str, api: str) -> None:
    # OpenAI refuses a tool_choice without tools (400); Anthropic takes {"type": "none"}
    async with make(server) as executor:
        response = await executor.run("Weather?", pinned(model), tool_choice="none")
    assert response.content and response.tool_calls == ()
    sent = server.last_request(model)
    assert sent is not None and "tools" not in sent.body
    if api == "anthropic":
        assert sent.body["tool_choice"] == {"type": "none"}
    else:
        assert "tool_choice" not in sent.body


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_structured_output_is_parsed_when_it_validates(
    server: FakeLLMServer, model: str, api: str
) -> None:
    async with make(server) as executor:
        good = await executor.run("A person.", pinned(model), response_format=PERSON)
        assert isinstance(good.parsed, dict) and set(good.parsed) == {"name", "age"}
        assert good.parse_error is None
        sent = server.last_request(model)
        assert sent is not None
        if api == "openai":
            assert sent.body["response_format"] == {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": PERSON, "strict": True},
            }
        else:
            assert sent.body["output_config"] == {
                "format": {"type": "json_schema", "schema": PERSON_TO_ANTHROPIC}
            }
        server.script(model, [FakeReply(json={"name": "Ada", "age": -1})])
        bad = await executor.run(
            "A person.", pinned(model), response_format=ResponseFormat(schema=PERSON, name="person")
        )
        assert bad.parsed is None
        assert bad.parse_error is not None and "$.age" in bad.parse_error
        server.script(model, [FakeReply(content="not json")])
        text = await executor.run("A person.", pinned(model), response_format=PERSON)
        assert text.parsed is None and "not JSON" in (text.parse_error or "")
        plain = await executor.run("A person.", pinned(model))
        assert plain.parsed is None and plain.parse_error is None


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_a_refused_or_cut_off_answer_says_so_in_its_parse_error(
    server: FakeLLMServer, model: str, api: str
) -> None:
    """
    A structured answer that is no JSON because the model refused or ran out of
    max_tokens says so first, not only "not JSON" as if the model wrote bad JSON.
    """
    cut = "max_tokens" if api == "anthropic" else "length"
    server.script(model, [FakeReply(content='{"name": "Ad', stop_reason=cut)])
    async with make(server) as executor:
        response = await executor.run("A person.", pinned(model), response_format=PERSON)
        assert response.parsed is None and response.stop_reason == cut
        assert (response.parse_error or "").startswith(
            f"the answer was cut off at max_tokens (stop_reason {cut!r}); the answer is not JSON"
        )
        if api == "anthropic":  # a refusal is a stop reason, its text the content
            server.script(model, [FakeReply(content="I can't help.", stop_reason="refusal")])
            response = await executor.run("A person.", pinned(model), response_format=PERSON)
            assert response.parsed is None
            assert (response.parse_error or "").startswith(
                "the model refused to answer (stop_reason 'refusal')"
            )
        # an answer that parses is kept whatever the stop reason
        server.script(model, [FakeReply(json={"name": "Ada", "age": 36}, stop_reason=cut)])
        response = await executor.run("A person.", pinned(model), response_format=PERSON)
        assert response.parsed == {"name": "Ada", "age": 36} and response.parse_error is None


async def test_an_openai_refusal_says_so_in_its_parse_error() -> None:
    """OpenAI's refusal (a null content beside its ``refusal`` text) is no bad JSON."""

    async def answer(request: web.Request) -> web.Response:
        message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 6},
            }
        )

    async with (
        serving("/v1/chat/completions", answer) as url,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
            registry=CHEAP_ONLY,
            telemetry_store="null://",
            retry=RetryPolicy.none(),
            sleep=NoSleep(),
        ) as executor,
    ):
        response = await executor.run("A person.", pinned(GPT), response_format=PERSON)
    assert response.content == "" and response.parsed is None
    assert response.parse_error == (
        "the model refused to answer (stop_reason 'refusal'); the answer is not JSON "
        "(Expecting value)"
    )


async def test_extra_body_objects_merge_into_those_the_library_sets(
    server: FakeLLMServer,
) -> None:
    """
    An object in ``extra_body`` for a field the request sets too (Anthropic's
    ``output_config`` holds the structured output's ``format`` and ``effort``, its
    ``tool_choice`` the choice and ``disable_parallel_tool_use``; OpenAI's
    ``stream_options`` the usage the stream asks for) is merged into it, not put in
    its place.
    """
    extra = {
        "output_config": {"effort": "low"},
        "tool_choice": {"disable_parallel_tool_use": True},
    }
    async with make(server) as executor:
        await executor.run(
            "A person.",
            pinned(CLAUDE),
            response_format=PERSON,
            tools=[WEATHER],
            tool_choice="auto",
            extra_body=extra,
        )
        async with executor.stream(
            "Hi", pinned(GPT), extra_body={"stream_options": {"include_obfuscation": False}}
        ) as stream:
            response = await stream.get_final_response()
    sent = server.last_request(CLAUDE)
    assert sent is not None
    assert sent.body["output_config"] == {
        "format": {"type": "json_schema", "schema": PERSON_TO_ANTHROPIC},
        "effort": "low",
    }
    assert sent.body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    sent = server.last_request(GPT)
    assert sent is not None
    assert sent.body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert response.input_tokens > 0  # the usage the stream asked for came


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_stop_top_p_seed_and_extra_body(server: FakeLLMServer, model: str, api: str) -> None:
    async with make(server) as executor:
        await executor.run(
            "Hi",
            pinned(model),
            stop="END",
            top_p=0.5,
            seed=42,
            extra_body={"metadata": {"user_id": "u-1"}},
        )
    sent = server.last_request(model)
    assert sent is not None
    body = sent.body
    assert body["top_p"] == 0.5 and body["metadata"] == {"user_id": "u-1"}
    if api == "anthropic":
        assert body["stop_sequences"] == ["END"] and "seed" not in body and "stop" not in body
    else:
        assert body["stop"] == ["END"] and body["seed"] == 42


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tools": [{"name": "bad name!"}]}, "Tool.name must be 1-64"),
        # the APIs refuse a name with a line end (a regex '$' lets one through)
        ({"tools": [{"name": "get_weather\n"}]}, "Tool.name must be 1-64"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "answer\n", "schema": {"type": "object"}},
                }
            },
            "ResponseFormat.name must be 1-64",
        ),
        ({"tools": [WEATHER, WEATHER]}, "used twice"),
        ({"tools": [{"name": "f", "parameters": {"type": "array"}}]}, "of type 'object'"),
        ({"tool_choice": "auto"}, "needs tools"),
        ({"tools": [WEATHER], "tool_choice": "get_time"}, "tool_choice must be one of"),
        ({"response_format": "json"}, "response_format must be a JSON Schema dict"),
        ({"response_format": {"type": "json_object"}}, "not supported"),
        ({"stop": ["", "x"]}, "non-empty strings"),
        ({"top_p": 1.5}, "top_p must be a number between 0 and 1"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"extra_body": {"model": "other"}}, "extra_body must not set model"),
        # run() would get an event stream it reads as a malformed answer, held against
        # every model tried
        ({"extra_body": {"stream": True}}, "extra_body must not set stream"),
        # several choices: each billed, the first alone returned
        ({"extra_body": {"n": 3}}, "extra_body must not set n to 3"),
        ({"extra_body": {"n": True}}, "extra_body must not set n"),
        ({"extra_body": {"x": float("nan")}}, "not a finite number"),
    ],
)
async def test_bad_options_raise_configuration_error_before_any_call(
    server: FakeLLMServer, options: dict[str, Any], message: str
) -> None:
    async with make(server) as executor:
        with pytest.raises(ConfigurationError, match=message):
            await executor.run("Hi", pinned(GPT), **options)
    assert server.requests() == 0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Message(role="user", tool_calls=[ToolCall(id="a", name="f")]), "only assistant"),
        (lambda: Message(role="assistant", content="x", tool_call_id="a"), "only tool messages"),
        (lambda: Message(role="tool", content="x"), "needs tool_call_id"),
        (
            lambda: Message(role="assistant", content=[ImageBlock.from_base64(PNG, "image/png")]),
            "assistant message may hold TextBlock, ToolCall",
        ),
        (lambda: ImageBlock.from_base64("@@@", "image/png"), "must be base64"),
        (lambda: ImageBlock.from_base64(PNG, "image/tiff"), "media_type must be one of"),
        (lambda: ImageBlock.from_url("file:///etc/passwd"), "https://"),
        (lambda: ImageBlock(), "exactly one of data"),
        (lambda: Message(role="user", content=[{"type": "audio"}]), "type must be one of"),
        # a string is no boolean: "false" was read as an error result (bool("false"))
        (
            lambda: Message(
                role="user",
                content=[
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": "3 C",
                        "is_error": "false",
                    }
                ],
            ),
            "is_error must be True or False, got .false.",
        ),
    ],
)
def test_bad_messages_and_blocks_say_what_is_wrong(build: Any, message: str) -> None:
    with pytest.raises(RecordValidationError, match=message):
        build()


def test_image_block_repr_hides_the_data() -> None:
    block = ImageBlock.from_bytes(b"\x89PNG" * 1000, "image/png")
    assert block.data is not None and block.data not in repr(block)
    assert ImageBlock.from_url("https://x.test/a.png").data_url == "https://x.test/a.png"


def test_message_of_takes_either_apis_dicts() -> None:
    openai_style = Message.of(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        }
    )
    anthropic_style = Message.of(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
            ],
        }
    )
    assert openai_style == anthropic_style
    assert openai_style.text == "hi"


def test_message_of_takes_sdk_messages_and_their_dumps_with_null_fields() -> None:
    from anthropic.types import TextBlock as AnthropicText, ToolUseBlock
    from openai.types.chat import ChatCompletionMessage

    answer = ChatCompletionMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    )
    plain = ChatCompletionMessage(role="assistant", content="hi")
    expected = Message(role="assistant", tool_calls=[ToolCall(id="c1", name="f", arguments={})])
    # refusal, audio, function_call, annotations: None, as the SDK fills them in
    assert Message.of(answer) == Message.of(answer.model_dump()) == expected
    assert (
        Message.of(plain)
        == Message.of(plain.model_dump())
        == Message.of(
            {"role": "assistant", "content": "hi", "tool_calls": None, "tool_call_id": None}
        )
    )
    assert Message.of(plain).text == "hi"
    # OpenAI's answers now hold "annotations": [] (url citations when there are some)
    cited = ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": "hi", "annotations": []}
    )
    assert Message.of(cited) == Message.of(cited.model_dump()) == Message.of(plain)
    blocks = [
        AnthropicText(type="text", text="hi"),
        ToolUseBlock(type="tool_use", id="t1", name="f", input={}),
    ]
    message = Message.of({"role": "assistant", "content": blocks})
    assert message.text == "hi" and message.calls == (ToolCall(id="t1", name="f", arguments={}),)
    # a field the library cannot send is still refused when it holds something
    refusal = ChatCompletionMessage(role="assistant", content=None, refusal="I cannot")
    with pytest.raises(RecordValidationError, match="unsupported refusal"):
        Message.of(refusal)
    with pytest.raises(RecordValidationError, match="role must be one of"):
        Message.of({"role": None, "content": "hi"})


@pytest.mark.parametrize(
    ("item", "refused"),
    [
        ({"role": "assistant", "content": "x", "tool_calls": {}}, "tool_calls must be a list"),
        ({"role": "user", "content": "x", "tool_call_id": ()}, "only tool messages carry"),
        ({"role": "user", "content": {}}, "content"),
    ],
)
def test_a_known_key_of_the_wrong_type_is_refused_even_when_empty(
    item: dict[str, object], refused: str
) -> None:
    # only an unknown key's empty value counts as left out: a known one is checked
    with pytest.raises(RecordValidationError, match=refused):
        Message.of(item)
    # a known key left null or empty as its own type still says nothing
    assert Message.of({"role": "assistant", "content": "x", "tool_calls": []}) == Message.of(
        {"role": "assistant", "content": "x", "tool_calls": None}
    )


# --------------------------------------------------------------------------- responses


def _provider(server: FakeLLMServer, api: str) -> AnthropicProvider | OpenAIProvider:
    """A provider of ``api``'s wire format on ``server``."""
    if api == "anthropic":
        return AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)
    return OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_malformed_tool_arguments_are_an_invalid_response_with_the_raw_text(
    server: FakeLLMServer, model: str, api: str
) -> None:
    raw = '{"city": "Oslo"'
    server.script(model, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": raw}])])
    provider = _provider(server, api)
    async with provider:
        with pytest.raises(InvalidResponseError, match="get_weather") as raised:
            await provider.complete(CompletionRequest(model=model, messages="Hi", tools=[WEATHER]))
    assert raised.value.raw_arguments == (raw if api == "openai" else json.dumps(raw))  # type: ignore[attr-defined]
    assert raised.value.status == 200


async def test_a_400_naming_an_unknown_model_moves_to_the_next_route(
    server: FakeLLMServer,
) -> None:
    """LiteLLM's proxy answers an unknown model with a 400, not a 404."""
    server.script(CLAUDE, [400])
    async with make(server) as executor:
        with pytest.raises(InvalidRequestError):  # a plain 400 is the caller's: raised
            await executor.run("Hi", ExecutionContext(tier="cheap"))
    async with FakeLLMServer(api_key=KEY) as fake:

        async def litellm(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "error": {
                        "message": "Invalid model name passed in model=claude-fake-haiku.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "400",
                    }
                },
                status=400,
            )

        app = web.Application()
        app.router.add_post("/v1/messages", litellm)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            executor = EmpathyLLMExecutor(
                [
                    AnthropicProvider(api_key=KEY, base_url=f"http://127.0.0.1:{port}"),
                    OpenAIProvider(api_key=KEY, base_url=fake.openai_base_url),
                ],
                registry=CHEAP_ONLY,
                telemetry_store="null://",
                retry=RetryPolicy.none(),
                sleep=NoSleep(),
            )
            async with executor:
                answered = await executor.run("Hi", ExecutionContext(tier="cheap"))
        finally:
            await runner.cleanup()
    assert answered.model == GPT and answered.fallback_chain == (CLAUDE, GPT)
    assert answered.attempts[0].error_type == ModelNotFoundError.__name__


async def test_calls_without_an_id_are_given_one_and_their_results_pair_up(
    server: FakeLLMServer,
) -> None:
    """
    Gemini's OpenAI-compatible endpoint answers calls with ``"id": ""``: the answer was
    an invalid response.  Each call gets an id of its own, which its result echoes.
    """

    def call(city: str, **id_field: Any) -> dict[str, Any]:
        function = {"name": "get_weather", "arguments": json.dumps({"city": city})}
        return {**id_field, "type": "function", "function": function}

    async def gemini(request: web.Request) -> web.Response:
        message = {
            "role": "assistant",
            "tool_calls": [call("Oslo", id=""), call("Rome", id=""), call("Bern")],
        }
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
        return web.json_response({"choices": [choice], "model": GPT, "usage": usage})

    async with serving("/v1/chat/completions", gemini) as url:
        executor = EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
            registry=CHEAP_ONLY,
            telemetry_store="null://",
            retry=RetryPolicy.none(),
            sleep=NoSleep(),
        )
        async with executor:
            first = await executor.run("Weather?", pinned(GPT), tools=[WEATHER])
    ids = [c.id for c in first.tool_calls]
    assert [c.arguments["city"] for c in first.tool_calls] == ["Oslo", "Rome", "Bern"]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == 3
    history = [
        Message(role="user", content="Weather?"),
        Message(role="assistant", content=first.content, tool_calls=first.tool_calls),
        *(Message(role="tool", tool_call_id=i, content="9 C") for i in ids),
    ]
    async with make(server) as executor:  # the fake pairs each result with its call
        second = await executor.run(history, pinned(GPT), tools=[WEATHER])
    assert second.content


async def test_every_route_failing_on_a_tool_request_keeps_the_errors(
    server: FakeLLMServer,
) -> None:
    server.set_outage("*", True)
    async with make(server) as executor:
        with pytest.raises(AllRoutesFailedError):
            await executor.run("Hi", ExecutionContext(tier="cheap"), tools=[WEATHER])


# --------------------------------------------------------------------------- capabilities

NO_TOOLS = ModelRegistry(
    models=[
        attrs.evolve(CHEAP_ONLY.get(CLAUDE), capabilities=["images", "streaming"]),
        CHEAP_ONLY.get(GPT),
        attrs.evolve(CHEAP_ONLY.get(GPT), id="gpt-fake-4o", tier="capable", capabilities=["tools"]),
    ],
    price_version="fakes-capabilities-1",
)


async def test_models_that_cannot_serve_the_request_are_excluded_with_a_reason(
    server: FakeLLMServer,
) -> None:
    telemetry = MemoryTelemetryBackend()
    router = AdaptiveModelRouter(NO_TOOLS, telemetry, seed=1)
    async with router, make(server, registry=NO_TOOLS, router=router) as executor:
        response = await executor.run("Hi", ExecutionContext(tier="cheap"), tools=[WEATHER])
        assert response.model == GPT
        decision = response.routing_decision
        assert decision is not None and decision.model == GPT
        excluded = {c.model: c for c in decision.candidates if c.excluded}
        assert "no tools support" in excluded[CLAUDE].reasons[0]
        # a request without tools may still go to the cheaper Claude
        plain = await executor.run("Hi", ExecutionContext(tier="cheap"))
        assert plain.model == CLAUDE
        # images: Claude serves them, gpt-fake-mini has every capability
        image = Message(role="user", content=[ImageBlock.from_base64(PNG, "image/png")])
        assert (await executor.run([image], ExecutionContext(tier="cheap"))).model == CLAUDE
    assert server.requests(CLAUDE) == 2


async def test_no_capable_model_or_a_pinned_one_that_cannot_is_a_configuration_error(
    server: FakeLLMServer,
) -> None:
    async with make(server, registry=NO_TOOLS) as executor:
        with pytest.raises(ConfigurationError, match="no tools support"):
            await executor.run("Hi", pinned(CLAUDE), tools=[WEATHER])
        with pytest.raises(ConfigurationError, match="needs json_schema"):
            await executor.run("Hi", ExecutionContext(tier="capable"), response_format=PERSON)
        # only gpt-fake-mini can: when it fails, no model that cannot is tried
        server.set_outage(GPT, True)
        with pytest.raises(AllRoutesFailedError):
            await executor.run("Hi", ExecutionContext(tier="cheap"), response_format=PERSON)
    assert server.requests() == 1


def test_capabilities_in_a_registry_file() -> None:
    registry = ModelRegistry.from_dict(
        {"price_version": "t", "models": [{**CHEAP_ONLY.get(GPT).to_dict(), "capabilities": []}]}
    )
    assert registry.get(GPT).capabilities == frozenset()
    assert registry.get(GPT).to_dict()["capabilities"] == []
    assert "capabilities" not in CHEAP_ONLY.get(GPT).to_dict()  # all: the default
    with pytest.raises(ConfigurationError, match="unknown 'telepathy'"):
        ModelRegistry.from_dict(
            {
                "price_version": "t",
                "models": [{**CHEAP_ONLY.get(GPT).to_dict(), "capabilities": ["telepathy"]}],
            }
        )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"tools": [1]}),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}),
        ("/v1/chat/completions", {"tool_choice": "auto"}),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [3]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "x"}]}]}),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}),
        ("/v1/messages", {"tools": [{"name": "f"}]}),
        ("/v1/messages", {"tools": "f"}),
        ("/v1/messages", {"tool_choice": {"type": "tool", "name": "nope"}}),
        ("/v1/messages", {"messages": [{"role": "user", "content": [7]}]}),
        ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]}),
        ("/v1/messages", {"output_config": {"format": {"type": "json_object"}}}),
    ],
)
async def test_the_fake_answers_malformed_tool_requests_with_a_400(
    server: FakeLLMServer, path: str, body: dict[str, Any]
) -> None:
    import aiohttp

    payload: dict[str, Any] = {
        "model": "m",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        **body,
    }
    headers = {
        "x-api-key": KEY,
        "anthropic-version": "2023-06-01",
        "authorization": f"Bearer {KEY}",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + path, json=payload, headers=headers) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    assert server.requests("m") == 0


async def test_fake_provider_plays_scripted_tool_calls() -> None:
    from empathy_models.testing import FakeProvider

    provider = FakeProvider(name="anthropic")
    provider.script(
        CLAUDE, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}])]
    )
    async with EmpathyLLMExecutor(
        [provider], registry=CHEAP_ONLY, telemetry_store="null://"
    ) as executor:
        response = await executor.run("Weather?", pinned(CLAUDE), tools=[WEATHER])
    assert response.stop_reason == "tool_use"
    assert [(c.name, c.arguments) for c in response.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_tool_arguments_nested_too_deeply_are_an_invalid_response(
    server: FakeLLMServer, model: str, api: str
) -> None:
    """Deep enough to parse, too deep to copy by recursion: a malformed answer."""
    deep = '{"a": ' + "[" * 400 + "]" * 400 + "}"
    server.script(model, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": deep}])])
    provider = _provider(server, api)
    async with provider:
        with pytest.raises(InvalidResponseError, match="nested at most 100 levels deep"):
            await provider.complete(CompletionRequest(model=model, messages="Hi", tools=[WEATHER]))


# --------------------------------------------------------------------------- the schema check


async def _answer(
    executor: EmpathyLLMExecutor,
    server: FakeLLMServer,
    model: str,
    text: str,
    schema: Mapping[str, Any] | ResponseFormat,
) -> LLMResponse:
    """The response of a run whose model answers ``text`` to ``response_format=schema``."""
    server.script(model, [FakeReply(content=text)])
    return await executor.run("Answer.", pinned(model), response_format=schema)


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_numbers_json_does_not_have_are_a_parse_error_after_a_recorded_success(
    server: FakeLLMServer, model: str, api: str
) -> None:
    """NaN, Infinity and 1e400 are not JSON; a 400-digit integer is, and exact."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "number", "multipleOf": 2}},
        "required": ["n"],
        "additionalProperties": False,
    }
    telemetry = MemoryTelemetryBackend()
    async with make(server, telemetry_store=telemetry) as executor:
        for text in ('{"n": 1e400}', '{"n": NaN}', '{"n": Infinity}', '{"n": -Infinity}'):
            response = await _answer(executor, server, model, text, schema)
            assert response.content == text and response.parsed is None
            assert "not JSON" in (response.parse_error or ""), text
        huge = "1" + "0" * 399 + "1"  # odd
        response = await _answer(executor, server, model, f'{{"n": {huge}}}', schema)
        assert response.parsed is None and "not a multiple of 2" in (response.parse_error or "")
        response = await _answer(executor, server, model, f'{{"n": {huge[:-1]}2}}', schema)
        assert response.parsed == {"n": int(huge) + 1} and response.parse_error is None
        records = await telemetry.recent(limit=10)
    assert len(records) == 6 and all(r.success for r in records)


@pytest.mark.parametrize(
    ("value", "step", "multiple"),
    [
        (5000000003, 5, False),  # was accepted: a float division rounds it
        (1000000000.5, 1, False),
        (1e-10, 1, False),
        (10**17 + 1, 2, False),
        (10**17, 2, True),
        (1e300, 3, False),  # 10**300, as the answer says, not its binary float
        (19.99, 0.01, True),  # decimals, as JSON writes them: jsonschema's float
        (0.3, 0.1, True),  # division says 1998.9999999999998 and 2.9999999999999996
        (0.07, 0.01, True),
        (0.5, 0.2, False),
        (-4.5, 1.5, True),
        (0, 0.1, True),
    ],
)
async def test_multiple_of_is_exact(
    server: FakeLLMServer, value: float, step: float, multiple: bool
) -> None:
    schema = {"type": "number", "multipleOf": step}
    async with make(server) as executor:
        response = await _answer(executor, server, GPT, json.dumps(value), schema)
    if multiple:
        assert response.parse_error is None and response.parsed == value
    else:
        assert response.parsed is None
        assert response.parse_error == (
            f"the answer does not match the schema: $: not a multiple of {step!r}"
        )
    if isinstance(step, int) and abs(value) < 2**53:
        # where jsonschema is exact (an integer step; a float that is its decimal) it agrees
        assert jsonschema.Draft202012Validator(schema).is_valid(value) is multiple


@pytest.mark.parametrize(
    ("schema", "text"),
    [
        ({"const": 1}, "true"),
        ({"enum": [0, 2]}, "false"),
        ({"const": [0]}, "[false]"),
        ({"enum": [{"a": 1}]}, '{"a": true}'),
        ({"const": {"a": [1, {"b": 0}]}}, '{"a": [true, {"b": false}]}'),
        ({"const": True}, "1"),
        ({"enum": [None, False]}, "0"),
        ({"enum": ["1"]}, "1"),
    ],
)
async def test_const_and_enum_compare_as_json_true_is_not_1(
    server: FakeLLMServer, schema: dict[str, Any], text: str
) -> None:
    async with make(server) as executor:
        response = await _answer(executor, server, CLAUDE, text, schema)
        assert response.parsed is None and "must be" in (response.parse_error or "")
        assert not jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
        # the value itself matches (and 1.0 matches 1)
        same = schema["const"] if "const" in schema else schema["enum"][0]
        response = await _answer(executor, server, CLAUDE, json.dumps(same), schema)
        assert response.parse_error is None and response.parsed == same
    if json.dumps(schema) == '{"const": 1}':
        async with make(server) as executor:
            response = await _answer(executor, server, CLAUDE, "1.0", schema)
        assert response.parse_error is None


BAD_SCHEMAS: list[tuple[dict[str, Any], str, str]] = [
    ({"minimum": "5"}, "schema.minimum", "must be a number"),
    ({"type": "object", "properties": ["a"]}, "schema.properties", "object of schemas"),
    ({"maxLength": None}, "schema.maxLength", "non-negative integer"),
    ({"minItems": -1}, "schema.minItems", "non-negative integer"),
    ({"maxItems": 1.5}, "schema.maxItems", "non-negative integer"),
    ({"exclusiveMinimum": True}, "schema.exclusiveMinimum", "must be a number"),
    ({"multipleOf": 0}, "schema.multipleOf", "greater than 0"),
    ({"multipleOf": -2}, "schema.multipleOf", "greater than 0"),
    ({"required": "name"}, "schema.required", "list of strings"),
    ({"required": [1]}, "schema.required", "list of strings"),
    ({"items": [{"type": "string"}]}, "schema.items", "prefixItems"),
    ({"properties": {"a": {"items": 3}}}, "schema.properties.a.items", "must be a schema"),
    ({"enum": "abc"}, "schema.enum", "must be a list"),
    ({"type": "str"}, "schema.type", "must be one of object, array"),
    ({"type": ["string", "string"]}, "schema.type", "must be one of"),
    ({"type": []}, "schema.type", "must be one of"),
    ({"pattern": "["}, "schema.pattern", "regular expression"),
    ({"pattern": "a{99999999999}"}, "schema.pattern", "regular expression"),
    ({"patternProperties": {"(": {}}}, "schema.patternProperties", "regular expression"),
    ({"anyOf": []}, "schema.anyOf", "non-empty list"),
    ({"allOf": {"type": "string"}}, "schema.allOf", "non-empty list"),
    ({"additionalProperties": "no"}, "schema.additionalProperties", "must be a schema"),
    ({"$ref": 1}, "schema.$ref", "must be a string"),
    ({"$ref": "#/$defs/missing", "$defs": {}}, "schema.$ref", "points to no schema"),
    ({"$ref": "#/required", "required": ["a"]}, "schema.$ref", "points to no schema"),
    ({"$ref": "https://example.test/s.json"}, "schema.$ref", "only '#' and '#/...'"),
    ({"$defs": {"a": {"minLength": "2"}}}, "schema.$defs.a.minLength", "non-negative"),
    ({"$ref": "#/not", "not": {"minimum": "1"}}, "schema.$ref.minimum", "must be a number"),
    ({"anyOf": [{"type": "string"}, {"$ref": "#"}]}, "schema", "leads back to itself"),
]


@pytest.mark.parametrize(("schema", "path", "message"), BAD_SCHEMAS)
async def test_a_schema_the_check_cannot_read_is_refused_before_any_call(
    server: FakeLLMServer, schema: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(RecordValidationError, match=re.escape(message)) as raised:
        ResponseFormat(schema=schema)
    assert raised.value.path == f"response_format.{path}"
    async with make(server) as executor:
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            await executor.run("Hi", pinned(GPT), response_format=schema)
    assert server.requests() == 0


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_a_schema_spoilt_after_it_was_built_is_a_parse_error(
    server: FakeLLMServer, model: str, api: str
) -> None:
    """The check refuses to run on a schema it cannot read, rather than raise."""
    fmt = ResponseFormat(
        schema={
            "type": "object",
            "properties": {"n": {"minimum": 5}},
            "required": ["n"],
            "additionalProperties": False,
        }
    )
    spoilt: Any = fmt.schema
    async with make(server) as executor:
        # spoilt once the request is sent (an API refuses such a schema with a 400), before
        # the answer is read: the server counts the request before it answers
        answer = asyncio.create_task(_answer(executor, server, model, '{"n": 3}', fmt))
        await server.wait_for_requests(1, model)
        spoilt["properties"]["n"]["minimum"] = "5"
        response = await answer
    assert response.content == '{"n": 3}' and response.parsed is None
    assert response.parse_error == (
        "the schema cannot be checked: .properties.n.minimum must be a number, got '5'"
    )


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        (  # a boolean subschema
            {"$defs": {"any": True, "none": False}, "properties": {"x": {"$ref": "#/$defs/any"}}},
            {"x": [1, "a"]},
            None,
        ),
        ({"$defs": {"none": False}, "properties": {"x": {"$ref": "#/$defs/none"}}}, {}, {"x": 1}),
        ({"$defs": {"a b": {"type": "string"}}, "$ref": "#/$defs/a%20b"}, "s", 1),  # %-encoded
        ({"$defs": {"a/b": {"type": "string"}}, "$ref": "#/$defs/a~1b"}, "s", 1),  # ~1 is /
        ({"$defs": {"a~b": {"type": "string"}}, "$ref": "#/$defs/a~0b"}, "s", 1),  # ~0 is ~
        ({"$defs": {"~1": {"type": "string"}}, "$ref": "#/$defs/~01"}, "s", 1),  # not "/"
        (
            {"prefixItems": [{"type": "integer"}], "items": {"$ref": "#/prefixItems/0"}},
            [1, 2],
            [1, "2"],
        ),
        (  # a recursive schema: a tree
            {
                "$defs": {
                    "node": {
                        "type": "object",
                        "properties": {
                            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}
                        },
                        "additionalProperties": False,
                    }
                },
                "$ref": "#/$defs/node",
            },
            {"kids": [{"kids": []}, {"kids": [{}]}]},
            {"kids": [{"kids": [{"x": 1}]}]},
        ),
    ],
)
async def test_refs_resolve_as_json_schema_2020_12_has_them(
    server: FakeLLMServer, schema: dict[str, Any], good: Any, bad: Any
) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    async with make(server) as executor:
        response = await _answer(executor, server, CLAUDE, json.dumps(good), schema)
        assert response.parse_error is None and response.parsed == good
        assert validator.is_valid(good)
        if bad is not None:
            response = await _answer(executor, server, CLAUDE, json.dumps(bad), schema)
            assert response.parsed is None and response.parse_error
            assert not validator.is_valid(bad)


async def test_pattern_properties_are_checked_and_not_additional(server: FakeLLMServer) -> None:
    schema = {
        "type": "object",
        "properties": {"id": {"type": "string"}},
        "patternProperties": {"^x_": {"type": "integer"}, "_n$": {"minimum": 0}},
        "additionalProperties": False,
    }
    validator = jsonschema.Draft202012Validator(schema)
    cases = [
        ({"id": "a", "x_1": 1, "x_2": 2}, None),
        ({"x_n": 3}, None),  # both patterns match: both apply
        ({"x_1": "one"}, "$.x_1: expected integer"),
        ({"x_n": -1}, "$.x_n: less than 0"),
        ({"y": 1}, "$: unexpected property 'y'"),
    ]
    async with make(server) as executor:
        for value, problem in cases:
            fmt = ResponseFormat(schema=schema, strict=False)  # "id" is not required
            response = await _answer(executor, server, GPT, json.dumps(value), fmt)
            if problem is None:
                assert response.parse_error is None and response.parsed == value
            else:
                assert problem in (response.parse_error or ""), value
            assert validator.is_valid(value) is (problem is None)


# A differential test: random schemas of the documented subset and random answers, each
# judged by the executor (its LLMResponse.parsed) and by the jsonschema package.


_NAMES = ["a", "b", "x_1", "a b", "c/d", "t~"]
_SCALARS: list[Any] = [None, True, False, 0, 1, 1.0, -3, 2.5, "", "a", "ab", "abc", "x_", "é"]
_NUMBERS: list[Any] = [0, 1, -1, 2, 3, 5, 0.5, 1.5, 2.0, -2.5, 0.1, 0.3, 0.07, 19.99, 1e-10]
_NUMBERS += [1e9 + 0.5, 10**17 + 1, 10**20, 5000000003, 1e300]
_TWINS: list[Any] = [0, 1, 1.0, True, False, [0], [False], {"a": 1}, {"a": True}, {"a": 1.0}]
"""Values Python's == takes for equal and JSON does not (or does: 1 and 1.0)."""


class _Schemas:
    """Seeded random schemas of the checker's documented subset, and values to check."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def schema(self, depth: int = 0, defs: bool = False) -> Any:
        rng = self.rng
        if depth > 3 or rng.random() < 0.2:
            if defs and rng.random() < 0.4:
                return {"$ref": "#/$defs/" + rng.choice(["n", "t", "a%20b", "c~1d", "t~0"])}
            return rng.choice([True, False, {}, {"type": rng.choice(list(_TYPE_NAMES))}])
        out: dict[str, Any] = {}
        if rng.random() < 0.6:
            out["type"] = (
                rng.choice(_TYPE_NAMES) if rng.random() < 0.8 else rng.sample(_TYPE_NAMES, 2)
            )
        for key in rng.sample(_KEYS, rng.randint(0, 3)):
            out[key] = self.keyword(key, depth, defs)
        return out

    def keyword(self, key: str, depth: int, defs: bool) -> Any:
        rng = self.rng

        def sub() -> Any:
            return self.schema(depth + 1, defs)

        if key in ("properties", "patternProperties"):
            names = ["^x_", "b$", "\\s"] if key == "patternProperties" else _NAMES
            return {n: sub() for n in rng.sample(names, rng.randint(1, 2))}
        if key == "required":
            return rng.sample(_NAMES, rng.randint(0, 2))
        if key in ("additionalProperties", "items"):
            return rng.choice([True, False, sub()])
        if key in ("prefixItems", "anyOf", "oneOf", "allOf"):
            return [sub() for _ in range(rng.randint(1, 3))]
        if key == "enum":
            return [self.value(2, twins=0.5) for _ in range(rng.randint(1, 3))]
        if key == "const":
            return self.value(2, twins=0.5)
        if key in ("minItems", "maxItems", "minLength", "maxLength"):
            return rng.randint(0, 3)
        if key == "pattern":
            return rng.choice(["^a", "b$", "\\d", "^$", "é", "^[a-c]+$"])
        if key == "multipleOf":
            return rng.choice([1, 2, 3, 5, 0.5, 0.1, 0.01, 1.5])
        return rng.choice([n for n in _NUMBERS if not isinstance(n, bool)])

    def value(self, depth: int = 0, twins: float = 0.25) -> Any:
        rng = self.rng
        if rng.random() < twins:
            return rng.choice(_TWINS)
        roll = rng.random()
        if depth < 3 and roll < 0.2:
            return {n: self.value(depth + 1, 0.1) for n in rng.sample(_NAMES, rng.randint(0, 3))}
        if depth < 3 and roll < 0.35:
            return [self.value(depth + 1, 0.1) for _ in range(rng.randint(0, 3))]
        return rng.choice(_SCALARS if rng.random() < 0.5 else _NUMBERS)

    def document(self) -> dict[str, Any]:
        """A root schema, now and then with ``$defs`` (a tree, names to escape) to refer to."""
        if self.rng.random() < 0.3:
            return {"allOf": [self.schema()]}
        tree = {"type": ["object", "array"], "items": {"$ref": "#/$defs/t"}}
        defs = {"n": self.schema(2), "t": tree, "a b": self.schema(2), "c/d": True, "t~": False}
        return {"$defs": defs, "allOf": [self.schema(defs=True)]}


_TYPE_NAMES = ["object", "array", "string", "integer", "number", "boolean", "null"]
_KEYS = [
    "properties", "patternProperties", "required", "additionalProperties", "items",
    "prefixItems", "enum", "const", "anyOf", "oneOf", "allOf", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf",
]  # fmt: skip


def _decimal_multiple_of(
    validator: Any, step: Any, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    """multipleOf on the decimal values of the numbers (jsonschema divides floats)."""
    if validator.is_type(instance, "number"):
        with decimal.localcontext() as context:
            context.prec = 1000
            if decimal.Decimal(repr(instance)) % decimal.Decimal(repr(step)):
                yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {step!r}")


_ORACLE: Any = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"multipleOf": _decimal_multiple_of}
)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_check_agrees_with_jsonschema_on_random_schemas(
    server: FakeLLMServer, seed: int
) -> None:
    """
    The oracle is jsonschema's Draft 2020-12 validator, but for ``multipleOf``: it divides
    floats (0.07 / 0.01 is 7.000000000000001, so 0.07 would not be a multiple of 0.01),
    and the checker is exact on the decimals, as a multiple of 0.01 is meant; the
    oracle's ``multipleOf`` is Decimal arithmetic on the numbers as JSON writes them.
    """
    schemas = _Schemas(seed)
    verdicts = {True: 0, False: 0}
    async with make(server) as executor:
        for case in range(250):
            schema = schemas.document()
            jsonschema.Draft202012Validator.check_schema(schema)
            # a valid schema is never refused (not strict: OpenAI's strict mode would
            # refuse an object that allows properties other than its own, or leaves
            # some out)
            fmt = ResponseFormat(schema=schema, strict=False)
            oracle = _ORACLE(schema)
            for _ in range(3):
                value = schemas.value()
                text = json.dumps(value)
                model = MODELS[case % 2][0]
                response = await _answer(executor, server, model, text, fmt)
                valid = oracle.is_valid(value)
                assert (response.parse_error is None) is valid, (schema, text, response.parse_error)
                if valid:
                    assert json.dumps(response.parsed) == text
                verdicts[valid] += 1
    assert min(verdicts.values()) > 100  # both verdicts are well represented


# --------------------------------------------------------------------------- smaller ones


async def test_a_server_tool_given_as_a_tool_is_refused_not_made_a_function(
    server: FakeLLMServer,
) -> None:
    """
    Anthropic's server tools (``{"type": "web_search_20250305", "name": "web_search"}``)
    were read as a function named ``web_search`` without parameters, ``max_uses`` and
    the rest dropped: the model was offered a function the caller never answers instead
    of the search.  A tool dict whose ``type`` is no function's is refused, before any
    call; Anthropic's ``"type": "custom"`` is a function.
    """
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    with pytest.raises(RecordValidationError, match="web_search_20250305") as raised:
        Tool.of(search, "tools[1]")
    assert raised.value.path == "tools[1].type"
    assert "extra_body" in str(raised.value)
    custom = {"type": "custom", "name": "f", "input_schema": {"type": "object"}}
    assert Tool.of(custom) == Tool(name="f", parameters={"type": "object"})
    async with make(server) as executor:
        for model, _ in MODELS:
            with pytest.raises(ConfigurationError, match="server tool"):
                await executor.run("Hi", pinned(model), tools=[WEATHER, search])
            with pytest.raises(ConfigurationError, match="server tool"):
                executor.stream("Hi", pinned(model), tools=[search])
    assert server.requests() == 0


SDK_CHOICES = [
    ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
    ({"type": "tool", "name": "get_weather"}, "get_weather"),
    ({"type": "any"}, "required"),
    ({"type": "auto"}, "auto"),
    ({"type": "none"}, "none"),
]


@pytest.mark.parametrize(("given", "meant"), SDK_CHOICES)
async def test_tool_choice_takes_either_apis_own_object_as_tools_do(
    server: FakeLLMServer, given: dict[str, Any], meant: str
) -> None:
    """
    ``tools`` took either API's dicts, ``tool_choice`` only its strings: OpenAI's
    ``{"type": "function", "function": {"name": ...}}`` and Anthropic's ``{"type": "tool",
    "name": ...}`` / ``{"type": "any"}`` were refused (``tool_choice must be one of ...``).
    Each is now the string it stands for, sent to each API in its own shape.
    """
    async with make(server) as executor:
        for model, _ in MODELS:
            response = await executor.run("Hi", pinned(model), tools=[WEATHER], tool_choice=given)
            async with executor.stream(
                "Hi", pinned(model), tools=[WEATHER], tool_choice=given
            ) as stream:
                streamed = await stream.get_final_response()
            for answer in (response, streamed):
                assert bool(answer.tool_calls) == (meant in ("get_weather", "required"))
    expected = {
        "get_weather": (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
        "required": ("required", {"type": "any"}),
        "auto": ("auto", {"type": "auto"}),
        "none": ("none", {"type": "none"}),
    }[meant]
    for model, sent_choice in zip((GPT, CLAUDE), expected, strict=True):
        sent = server.last_request(model)
        assert sent is not None and sent.body["tool_choice"] == sent_choice
    options = {"type": "auto", "disable_parallel_tool_use": True}  # extra_body carries it
    async with make(server) as executor:
        with pytest.raises(ConfigurationError, match="extra_body"):
            await executor.run("Hi", pinned(GPT), tools=[WEATHER], tool_choice=options)


@pytest.mark.parametrize("strict", ["false", 0, 1, "yes"])
def test_of_refuses_a_strict_that_is_not_a_bool_as_the_constructors_do(strict: object) -> None:
    """``bool("false")`` is True: the dict forms were read as strict."""
    tool = {"type": "function", "function": {"name": "f", "strict": strict}}
    with pytest.raises(RecordValidationError, match="strict must be True or False") as raised:
        Tool.of(tool)
    assert raised.value.path == "tools[0].strict"
    fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "strict": strict}}
    with pytest.raises(RecordValidationError, match="strict must be True or False"):
        ResponseFormat.of(fmt)
    with pytest.raises(RecordValidationError, match="strict must be True or False"):
        Tool(name="f", strict=strict)  # type: ignore[arg-type]


def test_of_reads_strict_as_openai_writes_it() -> None:
    def tool(**spec: Any) -> Tool:
        return Tool.of({"type": "function", "function": {"name": "f", **spec}})

    def fmt(**spec: Any) -> ResponseFormat:
        return ResponseFormat.of({"type": "json_schema", "json_schema": {"schema": {}, **spec}})

    assert (tool().strict, tool(strict=True).strict, tool(strict=None).strict) == (
        False,
        True,
        False,
    )
    assert (fmt().strict, fmt(strict=False).strict, fmt(strict=None).strict) == (
        True,
        False,
        False,
    )


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_the_fake_answers_scripted_arguments_too_deep_to_parse(
    server: FakeLLMServer, model: str, api: str
) -> None:
    """It answered a 500 with a RecursionError; the client now sees malformed arguments."""
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    server.script(model, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": deep}])])
    provider = _provider(server, api)
    async with provider:
        with pytest.raises(InvalidResponseError) as raised:
            await provider.complete(CompletionRequest(model=model, messages="Hi", tools=[WEATHER]))
    assert raised.value.status == 200
