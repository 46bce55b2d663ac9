"""
The official ``openai`` and ``anthropic`` SDKs, configured the ordinary way
(``api_key=...``, ``base_url=...``), against `FakeLLMServer` over real HTTP: a tool call
round trip, image input, JSON-schema output, and errors raised as each SDK's own
exception classes with its request ids.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior

from ._fakes import KEY

PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d4944415478da63f8ffff3f0005fe02fea7d6a4850000000049454e44ae426082"
    )
).decode()

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 1}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(
        {"gpt-down": ModelBehavior.always(500), "claude-down": ModelBehavior.always(500)},
        api_key=KEY,
    ) as fake:
        yield fake


@pytest.fixture
async def oai(server: FakeLLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        api_key=KEY, base_url=server.openai_base_url, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def ant(server: FakeLLMServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        api_key=KEY, base_url=server.anthropic_base_url, max_retries=0
    ) as client:
        yield client


# --------------------------------------------------------------------------- OpenAI


async def test_openai_sdk_tool_call_round_trip(
    server: FakeLLMServer, oai: openai.AsyncOpenAI
) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
        }
    ]
    server.script(
        "gpt-4o-mini",
        [
            FakeReply(
                tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]
            ),
            FakeReply(content="It is 3 C in Oslo."),
        ],
    )
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=tools, tool_choice="auto"
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "unit": "c"}
    assert first.usage is not None and first.usage.prompt_tokens > 0

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "3 C, cloudy"})
    second = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    assert second.choices[0].message.content == "It is 3 C in Oslo."
    assert second.choices[0].finish_reason == "stop"
    sent = server.last_request("gpt-4o-mini")
    assert sent is not None
    assert [m["role"] for m in sent.body["messages"]] == ["user", "assistant", "tool"]


async def test_openai_sdk_forced_tool_gets_schema_arguments(oai: openai.AsyncOpenAI) -> None:
    response = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = response.choices[0].message.tool_calls
    assert calls is not None
    call = calls[0]
    assert call.type == "function"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] == "c"


async def test_openai_sdk_tool_message_without_its_call_is_a_bad_request(
    oai: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "call_1", "content": "x"},
            ],
        )
    assert "preceeding message with 'tool_calls'" in str(raised.value)


async def test_openai_sdk_image_input(server: FakeLLMServer, oai: openai.AsyncOpenAI) -> None:
    response = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            }
        ],
    )
    assert response.choices[0].message.content
    sent = server.last_request("gpt-4o-mini")
    assert sent is not None
    assert sent.body["messages"][0]["content"][1]["image_url"]["url"].endswith(PNG)
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
                    ],
                }
            ],
        )


async def test_openai_sdk_json_schema_output(oai: openai.AsyncOpenAI) -> None:
    response = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "A person, please."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    content = response.choices[0].message.content
    assert content is not None
    person = json.loads(content)
    assert set(person) == {"name", "age"} and person["age"] >= 1


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (413, openai.APIStatusError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
async def test_openai_sdk_errors(
    server: FakeLLMServer, oai: openai.AsyncOpenAI, action: int, error: type[Exception]
) -> None:
    server.script("gpt-4o-mini", [action])
    with pytest.raises(error) as raised:
        await oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    exc = raised.value
    assert isinstance(exc, openai.APIStatusError) and exc.status_code == action
    assert exc.request_id and exc.request_id.startswith("req_")
    assert isinstance(exc.body, dict)
    expected = "server_error" if action >= 500 else None
    if action < 500 and action not in (403, 429):
        expected = "invalid_request_error"
    if expected is not None:
        assert exc.body["type"] == expected


async def test_openai_sdk_wrong_key_unknown_model_and_route(server: FakeLLMServer) -> None:
    async with openai.AsyncOpenAI(
        api_key="wrong", base_url=server.openai_base_url, max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    async with (
        FakeLLMServer(default=None, api_key=KEY) as strict,
        openai.AsyncOpenAI(api_key=KEY, base_url=strict.openai_base_url, max_retries=0) as client,
    ):
        with pytest.raises(openai.NotFoundError) as raised:
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
        assert raised.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError) as raised:
            await client.embeddings.create(model="x", input="hi")  # no such route here
        assert isinstance(raised.value.body, dict)
        assert raised.value.request_id


async def test_openai_sdk_sees_request_id_and_rate_limit_headers(
    oai: openai.AsyncOpenAI,
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 0
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")


# --------------------------------------------------------------------------- Anthropic


async def test_anthropic_sdk_tool_call_round_trip(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic
) -> None:
    tools: Any = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER}]
    server.script(
        "claude-haiku-4-5",
        [
            FakeReply(
                content="Let me look.",
                tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}],
            ),
            FakeReply(content="It is 3 C in Oslo."),
        ],
    )
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await ant.messages.create(
        model="claude-haiku-4-5", max_tokens=256, messages=messages, tools=tools
    )
    assert first.stop_reason == "tool_use"
    assert [block.type for block in first.content] == ["text", "tool_use"]
    use = first.content[1]
    assert isinstance(use, anthropic.types.ToolUseBlock)
    assert use.name == "get_weather" and use.input == {"city": "Oslo", "unit": "c"}
    assert first._request_id and first._request_id.startswith("req_")

    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append(
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3 C"}],
        }
    )
    second = await ant.messages.create(
        model="claude-haiku-4-5", max_tokens=256, messages=messages, tools=tools
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text" and second.content[0].text == "It is 3 C in Oslo."


async def test_anthropic_sdk_forced_tool_and_missing_result(ant: anthropic.AsyncAnthropic) -> None:
    tools: Any = [{"name": "get_weather", "input_schema": WEATHER}]
    first = await ant.messages.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    use = first.content[0]
    assert isinstance(use, anthropic.types.ToolUseBlock)
    assert set(use.input) == {"city", "unit"}
    history: list[Any] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": "never mind"},
    ]
    with pytest.raises(anthropic.BadRequestError) as raised:
        await ant.messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=history,
            tools=tools,
        )
    assert "without `tool_result` blocks" in str(raised.value)


async def test_anthropic_sdk_image_input(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic
) -> None:
    image: Any = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
    }
    response = await ant.messages.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
    )
    assert response.content[0].type == "text"
    sent = server.last_request("claude-haiku-4-5")
    assert sent is not None and sent.body["messages"][0]["content"][0]["source"]["data"] == PNG
    bad: Any = {**image, "source": {**image["source"], "media_type": "image/bmp"}}
    with pytest.raises(anthropic.BadRequestError) as raised:
        await ant.messages.create(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": [bad]}]
        )
    assert "media_type" in str(raised.value)


async def test_anthropic_sdk_json_schema_output(ant: anthropic.AsyncAnthropic) -> None:
    response = await ant.messages.create(
        model="claude-haiku-4-5",
        max_tokens=128,
        messages=[{"role": "user", "content": "A person, please."}],
        output_config={"format": {"type": "json_schema", "schema": PERSON}},
    )
    block = response.content[0]
    assert block.type == "text"
    person = json.loads(block.text)
    assert set(person) == {"name", "age"} and person["age"] >= 1


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (403, anthropic.PermissionDeniedError),
        (404, anthropic.NotFoundError),
        (413, anthropic.APIStatusError),
        (429, anthropic.RateLimitError),
        (500, anthropic.InternalServerError),
        (529, anthropic.APIStatusError),
    ],
)
async def test_anthropic_sdk_errors(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic, action: int, error: type[Exception]
) -> None:
    server.script("claude-haiku-4-5", [action])
    with pytest.raises(error) as raised:
        await ant.messages.create(
            model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    exc = raised.value
    assert isinstance(exc, anthropic.APIStatusError) and exc.status_code == action
    assert exc.request_id and exc.request_id.startswith("req_")
    assert isinstance(exc.body, dict)
    assert exc.body["type"] == "error"
    assert exc.body["request_id"] == exc.request_id


async def test_anthropic_sdk_authenticates_with_its_default_header(server: FakeLLMServer) -> None:
    # the SDK sends api_key as "Authorization: Bearer"; a wrong key is still refused
    async with anthropic.AsyncAnthropic(
        api_key="wrong", base_url=server.anthropic_base_url, max_retries=0
    ) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(
                model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "x"}]
            )


async def test_anthropic_sdk_unknown_route_and_headers(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(anthropic.NotFoundError) as raised:
        await ant.models.list()
    assert isinstance(raised.value.body, dict) and raised.value.body["type"] == "error"
    raw = await ant.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "1000"
    assert raw.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
