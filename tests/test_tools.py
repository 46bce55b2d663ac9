"""
Tool calling, content blocks and structured output through `EmpathyLLMExecutor.run`,
over real HTTP to `FakeLLMServer` with the real providers, on both wire formats.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
from aiohttp import web

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    AnthropicProvider,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
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

from ._fakes import CHEAP_ONLY, KEY, NoSleep

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP4//8/AAX+Av6n1qSFAAAAAElFTkSuQmCC"
WEATHER = Tool(
    name="get_weather",
    description="Current weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CLAUDE = "claude-fake-haiku"
GPT = "gpt-fake-mini"
MODELS = [(CLAUDE, "anthropic"), (GPT, "openai")]


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=3) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    options.setdefault("registry", CHEAP_ONLY)
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        telemetry_store="null://",
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
    assert sent.body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1_a", "name": "get_weather", "input": {"city": "Oslo"}}
    ]
    assert sent.body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1_a", "content": "3 C"},
        {"type": "text", "text": "And tomorrow?"},
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
                "format": {"type": "json_schema", "schema": PERSON}
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


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize(("model", "api"), MODELS)
async def test_malformed_tool_arguments_are_an_invalid_response_with_the_raw_text(
    server: FakeLLMServer, model: str, api: str
) -> None:
    raw = '{"city": "Oslo"'
    server.script(model, [FakeReply(tool_calls=[{"name": "get_weather", "arguments": raw}])])
    provider: Any = (
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)
        if api == "anthropic"
        else OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)
    )
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
    provider: Any = (
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)
        if api == "anthropic"
        else OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)
    )
    async with provider:
        with pytest.raises(InvalidResponseError, match="nested at most 100 levels deep"):
            await provider.complete(CompletionRequest(model=model, messages="Hi", tools=[WEATHER]))
