"""
Golden request fixtures: what our providers put on the wire for tools, tool calls, tool
results, images, structured output and the sampling options, byte for byte
(``tests/data/golden/*_request.json``), and checked against the request types the
official SDKs declare (``tests/_wire_shapes.py``).  Golden responses in the shapes the
APIs document (validated by each SDK's own response model) are parsed by our
providers.  Set ``EMPATHY_REGENERATE_GOLDEN=1`` to rewrite the request fixtures after a
deliberate change, then read the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from empathy_models import AnthropicProvider, Message, OpenAIProvider, Tool
from empathy_models.abc import CompletionRequest
from empathy_models.content import ImageBlock, TextBlock, ToolCall, ToolResult
from empathy_models.testing import FakeLLMServer

from ._fakes import KEY
from ._wire_shapes import problems

if TYPE_CHECKING:
    import anthropic
    import openai
else:  # imported when a test first uses them (see _sdks)
    from ._sdks import anthropic, openai

GOLDEN = Path(__file__).parent / "data" / "golden"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP4//8/AAX+Av6n1qSFAAAAAElFTkSuQmCC"
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
SUMMARY: dict[str, Any] = {
    "type": "object",
    "properties": {"summary": {"type": "string"}},
    "required": ["summary"],
    "additionalProperties": False,
}


def conversation(model: str, **options: Any) -> CompletionRequest:
    """Every feature at once: images, parallel tool calls, results, a schema, options."""
    return CompletionRequest(
        model=model,
        system="Be brief.",
        max_tokens=300,
        messages=[
            Message(
                role="user",
                content=[
                    TextBlock(text="Compare these."),
                    ImageBlock.from_base64(PNG, "image/png"),
                    ImageBlock.from_url("https://example.com/cat.jpg"),
                ],
            ),
            Message(
                role="assistant",
                content="Checking the weather.",
                tool_calls=[
                    ToolCall(id="call_1", name="get_weather", arguments={"city": "Oslo"}),
                    ToolCall(id="call_2", name="get_time", arguments={}),
                ],
            ),
            Message(role="tool", tool_call_id="call_1", content="3 C"),
            Message(
                role="user",
                content=[
                    ToolResult(tool_call_id="call_2", content="clock unavailable", is_error=True),
                    TextBlock(text="Summarise as JSON."),
                ],
            ),
        ],
        tools=[
            Tool(name="get_weather", description="Weather for a city", parameters=WEATHER),
            Tool(name="get_time"),
        ],
        tool_choice="get_weather",
        response_format=SUMMARY,
        stop=["END"],
        **options,
    )


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as fake:
        yield fake


def check_golden(name: str, body: dict[str, Any]) -> None:
    path = GOLDEN / name
    if os.environ.get("EMPATHY_REGENERATE_GOLDEN") == "1":
        path.write_text(json.dumps(body, indent=2) + "\n")
    assert body == json.loads(path.read_text())


def openai_problems(body: dict[str, Any]) -> list[str]:
    """Where ``body`` departs from the openai SDK's documented request type."""
    params = openai.types.chat.completion_create_params
    return problems(body, params.CompletionCreateParamsNonStreaming)


def anthropic_problems(body: dict[str, Any]) -> list[str]:
    """Where ``body`` departs from the anthropic SDK's documented request type."""
    params = anthropic.types.message_create_params
    return problems(body, params.MessageCreateParamsNonStreaming)


async def test_openai_request_matches_the_golden_fixture_and_the_documented_types(
    server: FakeLLMServer,
) -> None:
    request = conversation(
        "gpt-4o-mini", temperature=0.2, top_p=0.9, seed=7, extra_body={"user": "u-1"}
    )
    async with OpenAIProvider(api_key=KEY, base_url=server.openai_base_url) as provider:
        completion = await provider.complete(request)
    assert completion.tool_calls[0].name == "get_weather"  # the fake honoured tool_choice
    sent = server.last_request("gpt-4o-mini")
    assert sent is not None
    body = dict(sent.body)
    check_golden("openai_request.json", body)
    assert openai_problems(body) == []


async def test_anthropic_request_matches_the_golden_fixture_and_the_documented_types(
    server: FakeLLMServer,
) -> None:
    # temperature and top_p are left out: the SDK's request type no longer declares them
    # (newer Claude models refuse them); `test_sampling_options_map` covers the mapping
    request = conversation("claude-haiku-4-5", seed=7, extra_body={"metadata": {"user_id": "u-1"}})
    async with AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url) as provider:
        completion = await provider.complete(request)
    assert completion.tool_calls[0].name == "get_weather"
    sent = server.last_request("claude-haiku-4-5")
    assert sent is not None
    body = dict(sent.body)
    check_golden("anthropic_request.json", body)
    assert anthropic_problems(body) == []


def test_the_shape_checker_catches_a_misplaced_field() -> None:
    body = json.loads((GOLDEN / "anthropic_request.json").read_text())
    body["tools"][0]["parameters"] = body["tools"][0].pop("input_schema")
    assert any("tools[0]" in p for p in anthropic_problems(body))
    body = json.loads((GOLDEN / "openai_request.json").read_text())
    body["messages"][3]["tool_use_id"] = body["messages"][3].pop("tool_call_id")
    assert openai_problems(body) != []


# --------------------------------------------------------------------------- responses


async def serve_body(body: dict[str, Any]) -> tuple[web.AppRunner, str]:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body, headers={"request-id": "req_1", "x-request-id": "req_1"})

    app = web.Application()
    app.router.add_post("/v1/messages", answer)
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_openai_documented_tool_call_response_is_parsed() -> None:
    body = json.loads((GOLDEN / "openai_tool_response.json").read_text())
    openai.types.chat.ChatCompletion.model_validate(body)  # the documented shape
    runner, url = await serve_body(body)
    try:
        async with OpenAIProvider(api_key=KEY, base_url=url + "/v1") as provider:
            completion = await provider.complete(CompletionRequest(model="gpt-4o", messages="Hi"))
    finally:
        await runner.cleanup()
    assert completion.content == ""
    assert completion.stop_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in completion.tool_calls] == [
        ("call_abc123", "get_current_weather", {"location": "Boston, MA", "unit": "celsius"})
    ]
    assert (completion.input_tokens, completion.output_tokens) == (82, 17)


async def test_anthropic_documented_tool_use_response_is_parsed() -> None:
    body = json.loads((GOLDEN / "anthropic_tool_response.json").read_text())
    anthropic.types.Message.model_validate(body)
    runner, url = await serve_body(body)
    try:
        async with AnthropicProvider(api_key=KEY, base_url=url) as provider:
            completion = await provider.complete(
                CompletionRequest(model="claude-sonnet-4-5", messages="Hi")
            )
    finally:
        await runner.cleanup()
    assert completion.content == "I'll check the weather in San Francisco."
    assert completion.stop_reason == "tool_use"
    assert [(c.id, c.name, c.arguments) for c in completion.tool_calls] == [
        ("toolu_01A09q90qw90lq917835lq9", "get_weather", {"location": "San Francisco, CA"})
    ]
    assert (completion.input_tokens, completion.output_tokens) == (472, 89)
