"""
`FakeLLMServer` spoken to with a plain aiohttp client (the wire formats, validation and
fault injection as the real APIs shape them), and the in-process `FakeProvider`.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from empathy_models import ConfigurationError, RateLimitedError
from empathy_models.abc import CompletionRequest
from empathy_models.exceptions import (
    ContentPolicyError,
    ContextWindowExceededError,
    InvalidRequestError,
    InvalidResponseError,
    ModelNotFoundError,
    OverloadedError,
    ProviderConnectionError,
    ProviderTimeoutError,
    RecordValidationError,
    ServerError,
)
from empathy_models.testing import (
    FakeLLMServer,
    FakeProvider,
    FakeReply,
    Latency,
    ModelBehavior,
)
from empathy_models.testing.clock import FakeClock

KEY = "server-key"
A_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
O_HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with session.post(url, json=body, headers=headers) as response:
        data = await response.json(content_type=None)
        return response.status, data, response.headers


def a_body(model: str = "m", text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": text}],
    } | extra


def o_body(model: str = "m", text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]} | extra


async def anthropic(
    session: aiohttp.ClientSession, server: FakeLLMServer, body: Any = None, headers: Any = None
) -> tuple[int, Any, Any]:
    return await post(
        session,
        server.url + "/v1/messages",
        a_body() if body is None else body,
        A_HEADERS if headers is None else headers,
    )


async def openai(
    session: aiohttp.ClientSession, server: FakeLLMServer, body: Any = None, headers: Any = None
) -> tuple[int, Any, Any]:
    return await post(
        session,
        server.openai_base_url + "/chat/completions",
        o_body() if body is None else body,
        O_HEADERS if headers is None else headers,
    )


# ------------------------------------------------------------------ wire formats


async def test_anthropic_success_shape(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer({"m": ModelBehavior(output_tokens=9, content="hi")}) as server:
        body = a_body(system="sys", text="x" * 40)
        status, data, _ = await anthropic(session, server, body)
    assert status == 200
    assert data["type"] == "message"
    assert data["role"] == "assistant"
    assert data["content"] == [{"type": "text", "text": "hi"}]
    assert data["model"] == "m"
    assert data["stop_reason"] == "end_turn"
    assert data["usage"] == {"input_tokens": len("sys" + "x" * 40) // 4 + 1, "output_tokens": 9}
    assert data["id"].startswith("msg_")


async def test_openai_success_shape(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer({"m": ModelBehavior(output_tokens=5, content="yo")}) as server:
        body = o_body(text="y" * 20, max_tokens=3)
        status, data, _ = await openai(session, server, body)
    assert status == 200
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "yo"
    assert choice["finish_reason"] == "length"  # 5 tokens wanted, max_tokens 3
    assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


@pytest.mark.parametrize(
    ("headers", "body", "status", "kind", "fragment"),
    [
        ({}, a_body(), 401, "authentication_error", "x-api-key"),
        (
            {"x-api-key": "other", "anthropic-version": "1"},
            a_body(),
            401,
            "authentication_error",
            "",
        ),
        ({"x-api-key": KEY}, a_body(), 400, "invalid_request_error", "anthropic-version"),
        (A_HEADERS, {"model": "m", "messages": []}, 400, "invalid_request_error", "max_tokens"),
        (A_HEADERS, a_body() | {"messages": []}, 400, "invalid_request_error", "messages"),
        (A_HEADERS, a_body() | {"model": ""}, 400, "invalid_request_error", "model"),
        (
            A_HEADERS,
            a_body() | {"messages": [{"role": "system", "content": "x"}]},
            400,
            "invalid_request_error",
            "role",
        ),
        (A_HEADERS, [1, 2], 400, "invalid_request_error", "JSON object"),
    ],
)
async def test_anthropic_validation(
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    body: Any,
    status: int,
    kind: str,
    fragment: str,
) -> None:
    async with FakeLLMServer(api_key=KEY) as server:
        got, data, _ = await anthropic(session, server, body, headers)
        assert server.requests() == 1
        assert server.requests("m") == 0  # rejected before reaching the model
    assert got == status
    assert data["type"] == "error"
    assert data["error"]["type"] == kind
    assert fragment in data["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "body", "status", "param"),
    [
        ({}, o_body(), 401, None),
        ({"Authorization": "Bearer nope"}, o_body(), 401, None),
        ({"Authorization": "Basic abc"}, o_body(), 401, None),
        (O_HEADERS, {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        (O_HEADERS, {"model": "m"}, 400, "messages"),
        (O_HEADERS, o_body() | {"max_tokens": 0}, 400, "max_tokens"),
    ],
)
async def test_openai_validation(
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    body: Any,
    status: int,
    param: str | None,
) -> None:
    async with FakeLLMServer(api_key=KEY) as server:
        got, data, _ = await openai(session, server, body, headers)
    assert got == status
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["param"] == param
    if status == 401:
        assert data["error"]["code"] == "invalid_api_key"


async def test_invalid_json_body(session: aiohttp.ClientSession) -> None:
    async with (
        FakeLLMServer() as server,
        session.post(server.url + "/v1/messages", data=b"{", headers=A_HEADERS) as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_any_key_is_accepted_when_none_is_configured(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer() as server:
        status, _, _ = await openai(session, server, headers={"Authorization": "Bearer whatever"})
    assert status == 200


async def test_unknown_model_is_404_without_a_default(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer({"m": ModelBehavior()}, default=None) as server:
        a_status, a_data, _ = await anthropic(session, server, a_body("zz"))
        o_status, o_data, _ = await openai(session, server, o_body("zz"))
        assert (await anthropic(session, server))[0] == 200
    assert (a_status, a_data["error"]["type"]) == (404, "not_found_error")
    assert (o_status, o_data["error"]["code"]) == (404, "model_not_found")


async def test_context_window(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer({"m": ModelBehavior(context_window=20)}) as server:
        a_status, a_data, _ = await anthropic(session, server, a_body(text="z" * 100))
        o_status, o_data, _ = await openai(session, server, o_body(text="z" * 100))
        fits = await openai(session, server, o_body(text="z"))
    assert a_status == o_status == 400
    assert a_data["error"]["message"].startswith("prompt is too long")
    assert o_data["error"]["code"] == "context_length_exceeded"
    assert fits[0] == 200


async def test_max_output_tokens(session: aiohttp.ClientSession) -> None:
    """A request for more output tokens than the model writes gets each API's 400."""
    async with FakeLLMServer({"m": ModelBehavior(max_output_tokens=40)}) as server:
        a_status, a_data, _ = await anthropic(session, server, a_body(max_tokens=41))
        o_status, o_data, _ = await openai(session, server, o_body(max_completion_tokens=41))
        fits = await anthropic(session, server, a_body(max_tokens=40))
    assert a_status == o_status == 400
    assert a_data["error"]["type"] == "invalid_request_error"
    assert a_data["error"]["message"] == (
        "max_tokens: 41 > 40, which is the maximum allowed number of output tokens for m"
    )
    assert (o_data["error"]["param"], o_data["error"]["code"]) == (
        "max_completion_tokens",
        "invalid_value",
    )
    assert fits[0] == 200
    provider = FakeProvider({"m": ModelBehavior(max_output_tokens=40)}, name="fp")
    with pytest.raises(InvalidRequestError, match="maximum allowed number of output tokens"):
        await provider.complete(creq(max_tokens=41))
    assert (await provider.complete(creq(max_tokens=40))).model == "m"


async def test_error_statuses_with_retry_after(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer({"m": ModelBehavior(retry_after=1.2)}) as server:
        server.script("m", [429, 529])
        s1, d1, h1 = await anthropic(session, server)
        s2, d2, h2 = await anthropic(session, server)
        server.script("m", [429, 500])
        s3, d3, h3 = await openai(session, server)
        s4, d4, h4 = await openai(session, server)
    assert (s1, d1["error"]["type"], h1["retry-after"]) == (429, "rate_limit_error", "2")
    assert (s2, d2["error"]["type"], h2["retry-after"]) == (529, "overloaded_error", "2")
    assert (s3, d3["error"]["code"], h3["retry-after-ms"]) == (429, "rate_limit_exceeded", "1200")
    assert (s4, d4["error"]["type"]) == (500, "server_error")
    assert "retry-after" not in h4
    assert "request-id" in h1
    assert "x-request-id" in h3


# ------------------------------------------------------------------ hostile requests

A_PATH, O_PATH = "/v1/messages", "/v1/chat/completions"


async def post_raw(
    session: aiohttp.ClientSession, server: FakeLLMServer, api: str, data: bytes | io.BytesIO
) -> tuple[int, str, Any]:
    """POST ``data`` as it is: (status, content type, the JSON body)."""
    path, headers = (A_PATH, A_HEADERS) if api == "a" else (O_PATH, O_HEADERS)
    async with session.post(server.url + path, data=data, headers=headers) as response:
        return response.status, response.content_type, await response.json(content_type=None)


def assert_error_shape(api: str, data: Any, kind: str = "invalid_request_error") -> None:
    if api == "a":
        assert data["type"] == "error" and data["error"]["type"] == kind
        assert isinstance(data["error"]["message"], str)
    else:
        assert set(data["error"]) == {"message", "type", "param", "code"}


def aiohttp_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("aiohttp")]


@pytest.mark.parametrize("api", ["a", "o"])
@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser's stack
        b'{"model": "m", "max_tokens": 5, "temperature": NaN, "messages": []}',  # not JSON
        b'{"model": "m", "max_tokens": Infinity, "messages": []}',
    ],
    ids=["deep", "nan", "infinity"],
)
async def test_bodies_that_are_not_json_are_a_400_and_nothing_is_logged(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, api: str, data: bytes
) -> None:
    async with FakeLLMServer(api_key=KEY) as server:
        status, content_type, body = await post_raw(session, server, api, data)
    assert (status, content_type) == (400, "application/json")
    assert_error_shape(api, body)
    assert "not valid JSON" in (body["error"]["message"])
    assert aiohttp_logged(caplog) == []


async def raw_status(server: FakeLLMServer, path: bytes, header: bytes) -> tuple[bytes, Any]:
    """A request with ``header`` sent as raw bytes: (status line, JSON body)."""
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
        b"anthropic-version: 2023-06-01\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(rest)


async def test_a_key_header_that_is_not_utf8_is_a_401(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeLLMServer(api_key=KEY) as server:
        o_line, o_body = await raw_status(
            server, b"/v1/chat/completions", b"Authorization: Bearer \xff\xfe"
        )
        a_line, a_body = await raw_status(server, b"/v1/messages", b"x-api-key: \xff")
    assert o_line == a_line == b"HTTP/1.1 401 Unauthorized"
    assert o_body["error"]["code"] == "invalid_api_key"
    assert a_body["error"]["type"] == "authentication_error"
    assert aiohttp_logged(caplog) == []


async def test_a_body_over_the_size_limit_is_a_413_in_each_shape(
    session: aiohttp.ClientSession,
) -> None:
    big = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"'
    big += b"a" * (64 * 1024 * 1024) + b'"}]}'
    async with FakeLLMServer(api_key=KEY) as server:
        a_status, a_type, a_data = await post_raw(session, server, "a", io.BytesIO(big))
        o_status, o_type, o_data = await post_raw(session, server, "o", io.BytesIO(big))
    assert (a_status, a_type, o_status, o_type) == (413, "application/json") * 2
    assert_error_shape("a", a_data, kind="request_too_large")
    assert_error_shape("o", o_data)


ODD_SCHEMAS: list[tuple[str, bytes]] = [
    ("properties a list", b'{"type": "object", "properties": [1]}'),
    ("minItems a string", b'{"type": "array", "minItems": "a"}'),
    ("minLength a string", b'{"type": "string", "minLength": "a"}'),
    ("minimum a string", b'{"type": "integer", "minimum": "a"}'),
    ("minimum 1e400", b'{"type": "integer", "minimum": 1e400}'),
    ("a property not a schema", b'{"type": "object", "properties": {"a": 5}}'),
]


def odd_bodies(schema: bytes) -> list[tuple[str, str, bytes]]:
    """(api, where the schema is, the body) for each place a request carries a schema."""
    user = b'"messages": [{"role": "user", "content": "hi"}]'
    obj = (
        schema
        if b'"object"' in schema
        else b'{"type": "object", "properties": {"x": ' + schema + b"}}"
    )
    return [
        (
            "o",
            "response_format",
            b'{"model": "m", ' + user + b', "response_format": {"type": "json_schema", '
            b'"json_schema": {"name": "x", "schema": ' + schema + b"}}}",
        ),
        (
            "o",
            "tools[0].function.parameters",
            b'{"model": "m", ' + user + b', "tools": [{"type": "function", "function": '
            b'{"name": "t", "parameters": ' + obj + b"}}]}",
        ),
        (
            "a",
            "tools.0.custom.input_schema",
            b'{"model": "m", "max_tokens": 5, ' + user + b', "tools": [{"name": "t", '
            b'"input_schema": ' + obj + b'}], "tool_choice": {"type": "any"}}',
        ),
        (
            "a",
            "output_config.format.schema",
            b'{"model": "m", "max_tokens": 5, ' + user + b', "output_config": {"format": '
            b'{"type": "json_schema", "schema": ' + schema + b"}}}",
        ),
    ]


@pytest.mark.parametrize(
    ("api", "where", "data"),
    [case for _, schema in ODD_SCHEMAS for case in odd_bodies(schema)],
    ids=[f"{name}-{api}-{where}" for name, s in ODD_SCHEMAS for api, where, _ in odd_bodies(s)],
)
async def test_schemas_that_are_not_json_schema_are_a_400_in_each_shape(
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    api: str,
    where: str,
    data: bytes,
) -> None:
    async with FakeLLMServer(api_key=KEY) as server:
        status, content_type, body = await post_raw(session, server, api, data)
        assert server.requests("m") == 0
    assert (status, content_type) == (400, "application/json")
    assert_error_shape(api, body)
    if api == "o":
        assert body["error"]["param"] == where
        assert body["error"]["message"].startswith("Invalid schema for ")
    else:
        assert body["error"]["message"].startswith(f"{where}: JSON schema is invalid")
    assert aiohttp_logged(caplog) == []


async def test_context_length_fault_numbers_add_up(session: aiohttp.ClientSession) -> None:
    """However short the prompt, the window the message states is below what was asked."""
    async with FakeLLMServer({"m": ModelBehavior.always("context_length")}) as server:
        messages = []
        extras: list[dict[str, Any]] = [{}, {"max_tokens": 5}]
        for extra in extras:
            _, o_data, _ = await openai(session, server, o_body(text="hi", **extra))
            messages.append(o_data["error"]["message"])
        _, a_data, _ = await anthropic(session, server, a_body(text="hi"))
    for message in messages:
        window, asked = (int(n) for n in re.findall(r"(\d+) tokens", message)[:2])
        assert asked > window, message
    assert "your messages resulted in 1 tokens" in messages[0]
    assert "(1 in the messages, 5 in the completion)" in messages[1]
    a_numbers = [int(n) for n in re.findall(r"\d+", a_data["error"]["message"])]
    assert sum(a_numbers[:-1]) > a_numbers[-1]  # input (+ max_tokens) > the limit


# ------------------------------------------------------------------ scripting


async def test_scripts_run_in_order_then_the_behaviour_resumes(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeLLMServer() as server:
        server.script("m", [500, "ok", 429])
        assert server.pending("m") == 3
        statuses = [(await anthropic(session, server))[0] for _ in range(4)]
        assert server.pending("m") == 0
        assert server.requests("m") == 4
        assert server.request_counts() == {"m": 4}
    assert statuses == [500, 200, 429, 200]


async def _sse_usages(
    session: aiohttp.ClientSession, url: str, body: Any, headers: Any
) -> list[Any]:
    # the "usage" of every SSE event that carries one (Anthropic's inside message_start)
    async with session.post(url, json=body, headers=headers) as response:
        text = (await response.read()).decode()
    found = []
    for line in text.splitlines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[len("data: ") :])
        holder = event.get("message", event)
        if "usage" in holder:
            found.append(holder["usage"])
    return found


async def test_a_scripted_usage_object_is_sent_as_given_whole_and_streamed(
    session: aiohttp.ClientSession,
) -> None:
    odd = {"prompt_tokens": 7, "completion_tokens": None, "extra": "x"}
    async with FakeLLMServer() as server:
        server.script("m", [FakeReply(usage=odd), FakeReply(content="hi", usage={})])
        _, whole, _ = await openai(session, server)
        _, plain, _ = await anthropic(session, server)
        server.script("m", [FakeReply(usage=odd)] * 2)
        streamed = o_body(stream=True, stream_options={"include_usage": True})
        openai_events = await _sse_usages(
            session, server.url + "/v1/chat/completions", streamed, O_HEADERS
        )
        anthropic_events = await _sse_usages(
            session, server.url + "/v1/messages", a_body(stream=True), A_HEADERS
        )
        _, counted, _ = await openai(session, server)  # the script is used up
    assert whole["usage"] == odd and whole["choices"][0]["message"]["content"]
    assert plain["usage"] == {} and plain["content"] == [{"type": "text", "text": "hi"}]
    assert openai_events == [odd]
    assert anthropic_events == [odd, odd]  # message_start's and message_delta's
    assert set(counted["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    with pytest.raises(RecordValidationError, match="usage"):
        FakeReply(usage=[1, 2])  # type: ignore[arg-type]


async def test_outages_switch_on_and_off_by_model_api_and_everything(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeLLMServer() as server:
        server.set_outage("openai", True)
        assert (await openai(session, server))[0] == 503
        assert (await anthropic(session, server))[0] == 200
        server.set_outage("openai", False)
        assert (await openai(session, server))[0] == 200

        server.set_outage("m", True, action=529)
        assert (await anthropic(session, server))[0] == 529
        assert (await anthropic(session, server, a_body("other")))[0] == 200
        assert dict(server.outages) == {"m": 529}
        server.set_outage("m", False)

        server.set_outage("*", True, action=500)
        assert (await anthropic(session, server, a_body("other")))[0] == 500
        server.set_outage("*", False)
        assert server.outages == {}
        assert (await anthropic(session, server))[0] == 200


async def test_failure_rate_is_seeded_and_roughly_right(session: aiohttp.ClientSession) -> None:
    behavior = ModelBehavior(failure_rate=0.3, failures=(500, 429))

    async def run(seed: int) -> list[int]:
        async with FakeLLMServer({"m": behavior}, seed=seed) as server:
            return [(await anthropic(session, server))[0] for _ in range(150)]

    first, again, other = await run(1), await run(1), await run(2)
    assert first == again
    assert first != other
    failures = sum(status != 200 for status in first)
    assert 20 <= failures <= 75  # 45 expected
    assert {s for s in first if s != 200} == {500, 429}


async def test_output_token_range(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer({"m": ModelBehavior(output_tokens=(10, 20))}) as server:
        counts = {
            (await anthropic(session, server))[1]["usage"]["output_tokens"] for _ in range(40)
        }
    assert counts <= set(range(10, 21))
    assert len(counts) > 3


async def test_set_behavior_at_run_time(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer(default=None) as server:
        assert (await anthropic(session, server))[0] == 404
        server.set_behavior("m", ModelBehavior.always(503))
        assert (await anthropic(session, server))[0] == 503
        server.set_behavior("m", ModelBehavior.always("ok"))
        assert (await anthropic(session, server))[0] == 200
        server.set_behavior("m", None)
        assert (await anthropic(session, server))[0] == 404


async def test_gateway_errors_are_html(session: aiohttp.ClientSession) -> None:
    async with (
        FakeLLMServer({"m": ModelBehavior.always(502)}) as server,
        session.post(server.url + "/v1/messages", json=a_body(), headers=A_HEADERS) as r,
    ):
        assert r.status == 502
        assert r.content_type == "text/html"


async def test_last_request_keeps_no_keys(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer(api_key=KEY) as server:
        await anthropic(session, server)
        await openai(session, server, o_body("o"))
        seen_a, seen_o = server.last_request("m"), server.last_request("o")
        server.reset_counters()
        assert server.requests() == 0
        assert server.last_request("m") is None
    assert seen_a is not None and seen_o is not None
    assert seen_a.body["max_tokens"] == 50
    assert seen_o.api == "openai"
    for seen in (seen_a, seen_o):
        assert all(KEY not in v for v in seen.headers.values())
        assert {k.lower() for k in seen.headers}.isdisjoint({"x-api-key", "authorization"})


async def test_hanging_requests_are_released_when_the_server_stops(
    session: aiohttp.ClientSession,
) -> None:
    server = FakeLLMServer({"m": ModelBehavior.always("hang")})
    async with server:
        task = asyncio.create_task(anthropic(session, server))
        await server.wait_for_requests(1, "m")
        assert not task.done()
    # the server is gone; the client gets an answer or a disconnect, never a hang
    try:
        status, _, _ = await task
        assert status == 503
    except aiohttp.ClientConnectionError:
        pass
    with pytest.raises(ConfigurationError, match="not running"):
        _ = server.url


async def test_url_before_enter_and_repr() -> None:
    server = FakeLLMServer()
    with pytest.raises(ConfigurationError):
        _ = server.openai_base_url
    async with server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.openai_base_url == server.url + "/v1"
        assert server.url in repr(server)
        with pytest.raises(ConfigurationError, match="already running"):
            await server.__aenter__()
    await server.aclose()  # idempotent


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_an_ipv6_host_gives_urls_a_client_can_use(session: aiohttp.ClientSession) -> None:
    async with FakeLLMServer(host="::1", api_key=KEY) as server:
        assert server.url.startswith("http://[::1]:")
        assert (await anthropic(session, server))[0] == 200
        assert (await openai(session, server))[0] == 200
        assert server.requests("m") == 2


# ------------------------------------------------------------------ behaviours


def test_latency_distributions_are_seeded_and_bounded() -> None:
    rng = random.Random(3)
    assert Latency.fixed(12).sample(rng) == 12.0
    draws = [Latency.uniform(5, 10).sample(rng) for _ in range(200)]
    assert all(5 <= d <= 10 for d in draws)
    logn = [Latency.lognormal(50, 0.5).sample(random.Random(7)) for _ in range(3)]
    assert logn[0] == logn[1] == logn[2]
    many = sorted(Latency.lognormal(50, 0.5).sample(rng) for _ in range(1001))
    assert 40 < many[500] < 62  # the median
    assert ModelBehavior(latency=30).latency == Latency.fixed(30)


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failures": ()}, "failures"),
        ({"failures": ("explode",)}, "failures[0]"),
        ({"failures": (200,)}, "failures[0]"),
        ({"failures": (True,)}, "failures[0]"),
        ({"output_tokens": (5, 1)}, "output_tokens"),
        ({"retry_after": -1}, "retry_after"),
        ({"context_window": 0}, "context_window"),
        ({"latency": "fast"}, "latency"),
    ],
)
def test_behavior_validation(kwargs: dict[str, Any], path: str) -> None:
    with pytest.raises(RecordValidationError) as info:
        ModelBehavior(**kwargs)
    assert info.value.path == path


def test_bad_latency_and_actions() -> None:
    with pytest.raises(RecordValidationError):
        Latency.uniform(10, 5)
    with pytest.raises(RecordValidationError):
        Latency.lognormal(0)
    with pytest.raises(RecordValidationError):
        Latency.fixed(-1)
    server = FakeLLMServer()
    with pytest.raises(RecordValidationError):
        server.script("m", [302])
    with pytest.raises(RecordValidationError):
        server.set_outage("m", True, action="boom")
    with pytest.raises(ConfigurationError):
        FakeLLMServer({"m": "fast"})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Latency.fixed("5"),  # type: ignore[arg-type]
        lambda: Latency.fixed(True),
        lambda: Latency.uniform(1, "9"),  # type: ignore[arg-type]
        lambda: Latency.uniform(math.nan, 5),
        lambda: Latency.lognormal(40, math.inf),  # every draw forever or nothing
        lambda: Latency.lognormal(40, "wide"),  # type: ignore[arg-type]
        lambda: Latency.lognormal(math.nan),
    ],
    ids=["fixed str", "fixed bool", "uniform str", "uniform nan", "sigma inf", "sigma str", "nan"],
)
def test_a_latency_that_is_no_distribution_is_refused_by_name(build: Any) -> None:
    with pytest.raises(RecordValidationError, match="latency") as info:
        build()
    assert info.value.path == "latency"


@pytest.mark.parametrize("actions", ["hang", 503, FakeReply(content="x"), None])
def test_a_script_that_is_not_a_list_of_actions_says_so(actions: Any) -> None:
    # a string is iterable: "hang" was read as the actions "h", "a", "n", "g"
    server = FakeLLMServer()
    with pytest.raises(RecordValidationError, match="must be a list of actions") as info:
        server.script("m", actions)
    assert info.value.path == "actions"
    assert server.pending("m") == 0
    server.script("m", ("hang", 503))  # any iterable of actions
    assert server.pending("m") == 2


# ------------------------------------------------------------------ FakeProvider


def creq(model: str = "m", text: str = "abcdefgh", **kwargs: Any) -> CompletionRequest:
    return CompletionRequest(model=model, messages=text, **kwargs)


async def test_fake_provider_success_and_latency_on_an_injected_clock(
    fake_clock: FakeClock,
) -> None:
    provider = FakeProvider(
        {"m": ModelBehavior(latency=Latency.fixed(250), output_tokens=4, content="ok!")},
        name="fake-a",
        sleep=fake_clock.sleep,
    )
    start = fake_clock.now
    completion = await provider.complete(creq(system="s"))
    assert fake_clock.now - start == pytest.approx(0.25)
    assert (completion.content, completion.model, completion.output_tokens) == ("ok!", "m", 4)
    assert completion.input_tokens == len("sabcdefgh") // 4 + 1
    assert provider.requests("m") == 1
    assert provider.last_request("m") == creq(system="s")
    assert repr(provider) == "FakeProvider(name='fake-a')"


@pytest.mark.parametrize(
    ("action", "cls", "status"),
    [
        (429, RateLimitedError, 429),
        (529, OverloadedError, 529),
        (500, ServerError, 500),
        ("timeout", ProviderTimeoutError, None),
        ("reset", ProviderConnectionError, None),
        ("malformed", InvalidResponseError, 200),
        ("truncated", InvalidResponseError, 200),
        ("incomplete", InvalidResponseError, 200),
        ("context_length", ContextWindowExceededError, 400),
        ("content_policy", ContentPolicyError, 400),
    ],
)
async def test_fake_provider_faults_map_like_the_http_providers(
    action: int | str, cls: type[Exception], status: int | None
) -> None:
    provider = FakeProvider({"m": ModelBehavior(retry_after=1.5)}, name="fp")
    provider.script("m", [action])
    with pytest.raises(cls) as info:
        await provider.complete(creq())
    exc = info.value
    assert type(exc) is cls
    assert (exc.provider, exc.model, exc.status) == ("fp", "m", status)  # type: ignore[attr-defined]
    expected_retry = 1.5 if action in (429, 529) else None
    assert exc.retry_after == expected_retry  # type: ignore[attr-defined]
    assert (await provider.complete(creq())).model == "m"  # the script is used up


async def test_fake_provider_outage_unknown_model_and_hang() -> None:
    provider = FakeProvider(name="fp", default=None)
    with pytest.raises(ModelNotFoundError):
        await provider.complete(creq())
    provider.set_behavior("m", ModelBehavior())
    provider.set_outage("fp", True)
    with pytest.raises(ServerError) as info:
        await provider.complete(creq())
    assert info.value.status == 503
    provider.set_outage("fp", False)
    provider.script("m", ["hang"])
    task = asyncio.create_task(provider.complete(creq()))
    await provider.wait_for_requests(3)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.requests() == 3
    assert provider.requests("m") == 2


@pytest.mark.parametrize("deltas_read", [1, 2])
async def test_a_client_leaving_a_stream_is_not_logged_as_a_server_error(
    caplog: pytest.LogCaptureFixture, deltas_read: int
) -> None:
    from empathy_models import EmpathyLLMExecutor, ExecutionContext, RetryPolicy
    from empathy_models.backends import MemoryTelemetryBackend
    from empathy_models.providers import OpenAIProvider
    from empathy_models.testing import StreamBehavior

    # three deltas 20 ms apart: the client leaves mid-stream, or just before its end
    behavior = ModelBehavior(output_tokens=3, stream=StreamBehavior(chunk_interval_ms=20))
    caplog.set_level("DEBUG", logger="aiohttp")
    async with (
        FakeLLMServer({"gpt-4o-mini": behavior}, api_key=KEY) as server,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            telemetry_store=MemoryTelemetryBackend(),
            retry=RetryPolicy.none(),
        ) as executor,
    ):
        ctx = ExecutionContext(model="gpt-4o-mini", max_tokens=300)
        async with executor.stream("hi", ctx) as stream:
            async for _ in stream:
                deltas_read -= 1
                if deltas_read == 0:
                    break
        await asyncio.sleep(0.3)  # the server goes on writing to the client that left
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == [], [r.getMessage() for r in errors]
