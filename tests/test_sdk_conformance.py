"""
The official ``openai`` and ``anthropic`` SDKs, configured the ordinary way
(``api_key=...``, ``base_url=...``), against `FakeLLMServer` over real HTTP: a tool call
round trip, image input, JSON-schema output (the SDKs' ``parse()`` of pydantic models),
the content blocks and parts each API takes, fields of the wrong type refused, and
errors raised as each SDK's own exception classes with its request ids.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import pydantic
import pytest

from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior, StreamBehavior

from ._fakes import KEY

if TYPE_CHECKING:
    import anthropic
    import openai
else:  # imported when a test first uses them (see _sdks)
    from ._sdks import anthropic, openai

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
THINKING: dict[str, Any] = {"type": "enabled", "budget_tokens": 1024}
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
        (400, "BadRequestError"),
        (401, "AuthenticationError"),
        (403, "PermissionDeniedError"),
        (404, "NotFoundError"),
        (413, "APIStatusError"),
        (422, "UnprocessableEntityError"),
        (429, "RateLimitError"),
        (500, "InternalServerError"),
    ],
)
async def test_openai_sdk_errors(
    server: FakeLLMServer, oai: openai.AsyncOpenAI, action: int, error: str
) -> None:
    server.script("gpt-4o-mini", [action])
    with pytest.raises(getattr(openai, error)) as raised:
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
        (400, "BadRequestError"),
        (401, "AuthenticationError"),
        (403, "PermissionDeniedError"),
        (404, "NotFoundError"),
        (413, "APIStatusError"),
        (429, "RateLimitError"),
        (500, "InternalServerError"),
        (529, "APIStatusError"),
    ],
)
async def test_anthropic_sdk_errors(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic, action: int, error: str
) -> None:
    server.script("claude-haiku-4-5", [action])
    with pytest.raises(getattr(anthropic, error)) as raised:
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
        await ant.messages.batches.list()  # no batches here
    assert isinstance(raised.value.body, dict) and raised.value.body["type"] == "error"
    raw = await ant.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "1000"
    assert raw.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")


# --------------------------------------------------------------------------- generated answers


class _Street(pydantic.BaseModel):
    line: str = pydantic.Field(min_length=3, max_length=5)
    zip: str = pydantic.Field(pattern=r"^\d{5}(-\d{4})?$")


class _Tree(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=1)
    children: list[_Tree]


class _Constrained(pydantic.BaseModel):
    """What pydantic writes into a schema for ordinary constraints and types."""

    name: str = pydantic.Field(min_length=1, max_length=20)
    when: datetime.datetime
    day: datetime.date
    at: datetime.time
    id: uuid.UUID
    url: pydantic.HttpUrl
    ip: ipaddress.IPv4Address
    below: int = pydantic.Field(le=-1)
    under: int = pydantic.Field(lt=-5)
    ratio: float = pydantic.Field(gt=0, lt=1)
    step: int = pydantic.Field(multiple_of=7, gt=10)
    tags: list[str] = pydantic.Field(min_length=2, max_length=3)
    none: list[int] = pydantic.Field(max_length=0)
    distinct: set[int] = pydantic.Field(min_length=3)
    pair: tuple[int, str]
    kind: Literal["a", "b"]
    maybe: int | None
    street: _Street
    tree: _Tree


async def test_openai_sdk_parse_gets_values_its_own_schema_accepts(
    oai: openai.AsyncOpenAI,
) -> None:
    response = await oai.chat.completions.parse(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Fill it in."}],
        response_format=_Constrained,
    )
    parsed = response.choices[0].message.parsed
    assert isinstance(parsed, _Constrained)
    assert parsed.name and parsed.below <= -1 and 0 < parsed.ratio < 1 and parsed.step % 7 == 0
    assert len(parsed.distinct) == 3 and parsed.none == []
    assert parsed.when.tzinfo is not None


class _Hinted(pydantic.BaseModel):
    """Constraints the anthropic SDK moves into descriptions (its API does not take them)."""

    name: str = pydantic.Field(min_length=1, max_length=4)
    below: int = pydantic.Field(le=-1)
    when: datetime.datetime
    id: uuid.UUID


async def test_anthropic_sdk_parse_gets_values_its_own_schema_accepts(
    ant: anthropic.AsyncAnthropic,
) -> None:
    message = await ant.messages.parse(
        model="claude-haiku-4-5",
        max_tokens=256,
        messages=[{"role": "user", "content": "Fill it in."}],
        output_format=_Hinted,
    )
    parsed = message.parsed_output
    assert isinstance(parsed, _Hinted)
    assert 1 <= len(parsed.name) <= 4 and parsed.below <= -1


async def test_openai_sdk_json_object_gets_a_json_object(oai: openai.AsyncOpenAI) -> None:
    response = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
    )
    content = response.choices[0].message.content
    assert content is not None and isinstance(json.loads(content), dict)
    with pytest.raises(openai.BadRequestError) as raised:  # as the API: JSON must be asked for
        await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Answer."}],
            response_format={"type": "json_object"},
        )
    assert "'json'" in raised.value.message


@pytest.mark.parametrize("count", [1500, 200_000])
async def test_sdks_schema_whose_value_is_too_large_is_a_bad_request(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic, count: int
) -> None:
    schema = {
        "type": "array",
        "minItems": count,
        "items": {"type": "array", "minItems": count, "items": {"type": "string"}},
    }
    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert "over 1,000,000 characters" in raised.value.message
    with pytest.raises(anthropic.BadRequestError) as refused:
        await ant.messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            tools=[
                {
                    "name": "t",
                    "input_schema": {
                        "type": "object",
                        "properties": {"x": schema},
                        "required": ["x"],
                    },
                }
            ],
            tool_choice={"type": "any"},
        )
    assert "over 1,000,000 characters" in refused.value.message
    bounded = {"type": "array", "minItems": 2000, "items": {"type": "integer", "minimum": 3}}
    response = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bounded}},
    )
    content = response.choices[0].message.content
    assert content is not None and json.loads(content) == [3] * 2000


# --------------------------------------------------------------------------- valid requests


async def test_anthropic_sdk_accepts_documents_thinking_search_results_files_and_server_tools(
    ant: anthropic.AsyncAnthropic,
) -> None:
    pdf = base64.b64encode(b"%PDF-1.4 fake").decode()
    user: Any = {
        "role": "user",
        "content": [
            {
                "type": "document",
                "source": {"type": "text", "media_type": "text/plain", "data": "a"},
            },
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": pdf},
                "title": "t",
            },
            {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
            {"type": "document", "source": {"type": "file", "file_id": "file_1"}},
            {
                "type": "document",
                "source": {"type": "content", "content": [{"type": "text", "text": "c"}]},
            },
            {
                "type": "search_result",
                "source": "https://example.com",
                "title": "r",
                "content": [{"type": "text", "text": "found"}],
            },
            {"type": "image", "source": {"type": "file", "file_id": "file_2"}},
            {"type": "text", "text": "Summarize."},
        ],
    }
    assistant: Any = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Done."},
        ],
    }
    tools: Any = [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
        {"name": "get_weather", "input_schema": WEATHER},
    ]
    message = await ant.messages.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=[user, assistant, {"role": "user", "content": "And?"}],
        tools=tools,
        tool_choice={"type": "any"},
    )
    # the server tool is the API's to run: the forced call is the custom one
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather"
    with pytest.raises(anthropic.BadRequestError) as raised:  # thinking is the assistant's
        await ant.messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "thinking", "thinking": "x", "signature": "s"}],
                }
            ],
        )
    assert "assistant" in raised.value.message


async def test_anthropic_sdk_tool_choice_needs_tools(ant: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await ant.messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            tool_choice={"type": "any"},
        )
    assert "tool_choice" in raised.value.message


async def test_openai_sdk_accepts_audio_file_and_refusal_parts(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-abc"}},
                {
                    "type": "file",
                    "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"},
                },
            ],
        },
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "user", "content": "Please?"},
    ]
    response = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert response.choices[0].message.content
    bad_messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "ogg"}}
            ],
        },
        {
            "role": "system",
            "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
        },
        {"role": "user", "content": [{"type": "file", "file": {}}]},
    ]
    for bad in bad_messages:
        with pytest.raises(openai.BadRequestError):
            await oai.chat.completions.create(model="gpt-4o-mini", messages=[bad])


@pytest.mark.parametrize(
    ("asked", "served"),
    [("flex", "flex"), ("priority", "priority"), ("auto", "default"), (None, None)],
)
async def test_openai_sdk_sees_the_service_tier_that_served_the_call(
    oai: openai.AsyncOpenAI, asked: Any, served: str | None
) -> None:
    # the answer names the tier that served it (and so prices it), whole or streamed; a
    # request that asks for none is answered without one, as the recorded samples are
    tier: Any = openai.NOT_GIVEN if asked is None else asked
    messages: Any = [{"role": "user", "content": "hi"}]
    answer = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, service_tier=tier
    )
    assert answer.service_tier == served
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, service_tier=tier, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    assert chunks and {chunk.service_tier for chunk in chunks} == {served}
    assert chunks[-1].usage is not None


async def test_openai_sdk_answer_ends_before_a_stop_sequence(oai: openai.AsyncOpenAI) -> None:
    # the fake answers "Reply from gpt-4o-mini."; the API leaves the sequence out
    messages: Any = [{"role": "user", "content": "hi"}]
    answer = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stop=["zzz", " from"]
    )
    assert answer.choices[0].message.content == "Reply"
    assert answer.choices[0].finish_reason == "stop"
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stop="from", stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Reply " and chunks[-1].choices[0].finish_reason == "stop"


async def test_anthropic_sdk_answer_ends_before_a_stop_sequence(
    ant: anthropic.AsyncAnthropic,
) -> None:
    # the fake answers "Reply from claude-haiku-4-5."
    ask: Any = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        "stop_sequences": ["zzz", " from"],
    }
    for message in (
        await ant.messages.create(**ask),
        await _streamed_message(ant, ask),
    ):
        assert [block.type for block in message.content] == ["text"]
        assert message.content[0].text == "Reply"
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " from")


async def _streamed_message(ant: anthropic.AsyncAnthropic, ask: Any) -> Any:
    async with ant.messages.stream(**ask) as stream:
        return await stream.get_final_message()


async def test_anthropic_sdk_counts_the_tokens_a_request_is_billed(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic
) -> None:
    ask: Any = {
        "model": "claude-haiku-4-5",
        "system": "be brief",
        "messages": [{"role": "user", "content": "what is the weather in Paris?"}],
        "tools": [{"name": "weather", "input_schema": WEATHER}],
    }
    counted = await ant.messages.count_tokens(**ask)
    answer = await ant.messages.create(**ask, max_tokens=64)
    assert counted.input_tokens == answer.usage.input_tokens > 0
    assert server.requests("claude-haiku-4-5") == 1  # a count is no model's request
    with pytest.raises(anthropic.BadRequestError, match="messages"):
        await ant.messages.count_tokens(model="claude-haiku-4-5", messages=[])
    async with anthropic.AsyncAnthropic(
        api_key="wrong", base_url=server.anthropic_base_url, max_retries=0
    ) as wrong:
        with pytest.raises(anthropic.AuthenticationError):
            await wrong.messages.count_tokens(**ask)


async def test_openai_sdk_gets_the_n_choices_it_asks_for(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    one = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    three = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert one.usage is not None and three.usage is not None
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens  # each billed
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, n=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [one.choices[0].message.content] * 2


async def test_sdks_list_and_retrieve_the_models_the_server_serves() -> None:
    behaviors = {"gpt-4o-mini": ModelBehavior(), "claude-haiku-4-5": ModelBehavior()}
    async with (
        FakeLLMServer(behaviors, api_key=KEY, default=None) as fake,
        openai.AsyncOpenAI(api_key=KEY, base_url=fake.openai_base_url, max_retries=0) as oai,
        anthropic.AsyncAnthropic(
            api_key=KEY, base_url=fake.anthropic_base_url, max_retries=0
        ) as ant,
    ):
        listed = [model.id async for model in oai.models.list()]
        assert listed == ["claude-haiku-4-5", "gpt-4o-mini"]
        assert (await oai.models.retrieve("gpt-4o-mini")).id == "gpt-4o-mini"
        with pytest.raises(openai.NotFoundError):
            await oai.models.retrieve("gpt-unknown")
        assert [model.id async for model in ant.models.list()] == listed
        assert (await ant.models.retrieve("claude-haiku-4-5")).id == "claude-haiku-4-5"
        with pytest.raises(anthropic.NotFoundError):
            await ant.models.retrieve("claude-unknown")
        async with openai.AsyncOpenAI(
            api_key="wrong", base_url=fake.openai_base_url, max_retries=0
        ) as wrong:
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
        assert fake.requests() == 0  # no model's request


async def test_openai_sdk_gets_the_logprobs_it_asks_for(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    plain = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert plain.choices[0].logprobs is None
    answer = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, logprobs=True, top_logprobs=3
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == answer.choices[0].message.content
    assert all(
        len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in logprobs.content
    )
    assert all(bytes(t.bytes or []) == t.token.encode() for t in logprobs.content)
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, logprobs=True, stream=True
    )
    tokens = [
        token.token
        async for chunk in stream
        for choice in chunk.choices
        if choice.logprobs is not None
        for token in choice.logprobs.content or []
    ]
    assert "".join(tokens) == answer.choices[0].message.content


async def test_anthropic_sdk_gets_a_thinking_block_when_it_turns_thinking_on(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic
) -> None:
    ask: Any = {
        "model": "claude-haiku-4-5",
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": "hi"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    plain = await ant.messages.create(**{**ask, "thinking": {"type": "disabled"}})
    assert [block.type for block in plain.content] == ["text"]
    for message in (await ant.messages.create(**ask), await _streamed_message(ant, ask)):
        thought, text = message.content
        assert thought.type == "thinking" and thought.thinking and thought.signature
        assert text.type == "text" and text.text == "Reply from claude-haiku-4-5."
    # a tool call after the thinking block, streamed (the blocks numbered after it)
    call = {"name": "weather", "arguments": {"city": "Paris", "unit": "c"}}
    server.script("claude-haiku-4-5", [FakeReply(content="", tool_calls=[call])])
    tools: Any = [{"name": "weather", "input_schema": WEATHER}]
    message = await _streamed_message(ant, {**ask, "tools": tools})
    assert [block.type for block in message.content] == ["thinking", "tool_use"]
    assert message.content[1].input == {"city": "Paris", "unit": "c"}


# --------------------------------------------------------------------------- field types


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"n": "x"}, "n"),
        ({"top_p": True}, "top_p"),
        ({"stop": 5}, "stop"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"service_tier": "cheapest"}, "service_tier"),
    ],
)
async def test_openai_sdk_fields_of_the_wrong_type_are_bad_requests(
    server: FakeLLMServer, oai: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    kwargs: Any = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]} | extra
    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(**kwargs)
    body = raised.value.body
    assert isinstance(body, dict) and body["param"] == param
    assert server.requests("gpt-4o-mini") == 0


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"system": 5}, "system"),
        ({"stop_sequences": 5}, "stop_sequences"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_k": 1.5}, "top_k"),
        ({"stream": "yes"}, "stream"),
        ({"service_tier": "flex"}, "service_tier"),
        # extended thinking: a budget of at least 1,024 tokens, below max_tokens (16 here)
        ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "thinking.enabled.budget"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "`max_tokens` must be"),
        ({"thinking": {"type": "enabled"}}, "thinking.enabled.budget_tokens"),
        # nor a temperature but 1, nor a forced tool
        ({"max_tokens": 2048, "thinking": THINKING, "temperature": 0.5}, "`temperature`"),
        (
            {
                "max_tokens": 2048,
                "thinking": THINKING,
                "tools": [{"name": "weather", "input_schema": WEATHER}],
                "tool_choice": {"type": "any"},
            },
            "Thinking may not be enabled",
        ),
        # a custom tool's name is letters, digits, '_' and '-', at most 128 of them
        *(
            ({"tools": [{"name": name, "input_schema": WEATHER}]}, "tools.0.custom.name")
            for name in ("get weather", "get.weather", "get_weather\n", "f" * 129)
        ),
    ],
)
async def test_anthropic_sdk_fields_of_the_wrong_type_are_bad_requests(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic, extra: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await ant.messages.create(
            model="claude-haiku-4-5",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
            extra_body=extra,
        )
    body = raised.value.body
    assert isinstance(body, dict) and body["error"]["message"].startswith(fragment)
    assert server.requests("claude-haiku-4-5") == 0


@pytest.mark.parametrize("name", ["get weather", "get.weather", "get_weather\n", "f" * 65])
async def test_openai_sdk_tool_name_the_api_refuses_is_a_bad_request(
    server: FakeLLMServer, oai: openai.AsyncOpenAI, name: str
) -> None:
    """A function name is letters, digits, '_' and '-', at most 64 of them."""
    tools: Any = [{"type": "function", "function": {"name": name, "parameters": WEATHER}}]
    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], tools=tools
        )
    body = raised.value.body
    assert isinstance(body, dict) and body["param"] == "tools[0].function.name"
    assert server.requests("gpt-4o-mini") == 0


STRICT_REFUSED = [
    (  # the root object may hold other properties
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "In context=(), 'additionalProperties' is required to be supplied and to be false.",
    ),
    (  # a property left out of required
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "In context=(), 'required' is required to be supplied and to be an array including "
        "every key in properties. Missing 'unit'.",
    ),
    (  # a nested object, through $defs
        {
            "type": "object",
            "properties": {"place": {"$ref": "#/$defs/place"}},
            "required": ["place"],
            "additionalProperties": False,
            "$defs": {"place": {"type": "object", "properties": {}}},
        },
        "In context=('$defs', 'place'), 'additionalProperties' is required to be supplied "
        "and to be false.",
    ),
]


@pytest.mark.parametrize(("schema", "why"), STRICT_REFUSED)
async def test_openai_sdk_strict_schema_without_closed_objects_is_a_bad_request(
    server: FakeLLMServer, oai: openai.AsyncOpenAI, schema: dict[str, Any], why: str
) -> None:
    """
    Strict mode (a strict response format or function) needs every object to set
    ``additionalProperties: false`` and to require all its properties; without strict,
    the same schema is taken.
    """
    messages: Any = [{"role": "user", "content": "Weather?"}]
    spec = {"name": "weather", "schema": schema, "strict": True}
    strict_format: Any = {"type": "json_schema", "json_schema": spec}
    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(
            model="gpt-4o-mini", messages=messages, response_format=strict_format
        )
    body = raised.value.body
    assert isinstance(body, dict) and body["param"] == "response_format"
    assert body["message"] == f"Invalid schema for response_format 'weather': {why}"
    function = {"name": "get_weather", "parameters": schema, "strict": True}
    strict_tools: Any = [{"type": "function", "function": function}]
    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=strict_tools
        )
    body = raised.value.body
    assert isinstance(body, dict) and body["param"] == "tools[0].function.parameters"
    assert body["code"] == "invalid_function_parameters"
    assert body["message"] == f"Invalid schema for function 'get_weather': {why}"
    assert server.requests("gpt-4o-mini") == 0
    loose_format: Any = {"type": "json_schema", "json_schema": {**spec, "strict": False}}
    loose_tools: Any = [{"type": "function", "function": {**function, "strict": False}}]
    await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, response_format=loose_format, tools=loose_tools
    )


async def test_openai_sdk_tool_call_id_over_40_characters_is_a_bad_request(
    server: FakeLLMServer, oai: openai.AsyncOpenAI
) -> None:
    """Chat Completions takes tool call ids of at most 40 characters."""

    def history(call_id: str) -> Any:
        call = {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}
        return [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [{"id": call_id, "type": "function", "function": call}],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "3 C"},
        ]

    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=history("c" * 41))
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["param"] == "messages[1].tool_calls[0].id"
    assert body["code"] == "string_above_max_length"
    assert "maximum length 40, but got a string with length 41" in body["message"]
    assert server.requests("gpt-4o-mini") == 0
    await oai.chat.completions.create(model="gpt-4o-mini", messages=history("c" * 40))


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ([{"type": "text", "text": ""}, {"type": "text", "text": "hi"}], "messages.0.content.0"),
        (
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": ""}],
                }
            ],
            "messages.2.content.0.tool_result.content.0",
        ),
    ],
)
async def test_anthropic_sdk_empty_text_block_is_a_bad_request(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic, content: Any, where: str
) -> None:
    """An empty text block is refused in a user message and in a tool result too."""
    messages: Any = [
        {"role": "user", "content": content},
        {"role": "user", "content": "Weather?"},
    ]
    if where.startswith("messages.2"):
        use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
        messages = [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": content},
        ]
    with pytest.raises(anthropic.BadRequestError) as raised:
        await ant.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=messages)
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["error"]["message"] == f"{where}: text content blocks must be non-empty"
    assert server.requests("claude-haiku-4-5") == 0


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        ([{"role": "user", "content": ""}], 0),
        ([{"role": "user", "content": []}], 0),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "and?"},
            ],
            1,
        ),
    ],
)
async def test_anthropic_sdk_message_without_content_is_a_bad_request(
    server: FakeLLMServer, ant: anthropic.AsyncAnthropic, messages: Any, index: int
) -> None:
    """Every message needs content, but for a final assistant one (a prefill)."""
    with pytest.raises(anthropic.BadRequestError) as raised:
        await ant.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=messages)
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["error"]["message"] == (
        f"messages.{index}: all messages must have non-empty content except for the "
        "optional final assistant message"
    )
    assert server.requests("claude-haiku-4-5") == 0
    prefill: Any = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    await ant.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=prefill)


# --------------------------------------------------------------------------- streams


async def test_anthropic_sdk_sees_a_malformed_stream_event() -> None:
    behavior = ModelBehavior(stream=StreamBehavior(fault_after=1, fault="malformed"))
    async with (
        FakeLLMServer({"claude-haiku-4-5": behavior}) as server,
        anthropic.AsyncAnthropic(
            api_key=KEY, base_url=server.anthropic_base_url, max_retries=0
        ) as client,
    ):
        with pytest.raises(ValueError):  # the SDK's JSON decoding of the event's data
            async with client.messages.stream(
                model="claude-haiku-4-5",
                max_tokens=64,
                messages=[{"role": "user", "content": "hi"}],
            ) as stream:
                async for _ in stream.text_stream:
                    pass
