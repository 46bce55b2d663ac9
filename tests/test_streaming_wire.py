"""
Streaming on the wire: the SSE decoder, `FakeLLMServer`'s event streams against recorded
samples of the real APIs, the official `openai` and `anthropic` SDKs streaming from the
fake, and the providers' `stream` over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

from empathy_models import (
    EmpathyLLMExecutor,
    ExecutionContext,
    Message,
    ProviderError,
    RetryPolicy,
)
from empathy_models.abc import CompletionRequest
from empathy_models.exceptions import (
    InvalidRequestError,
    InvalidResponseError,
    OverloadedError,
    ProviderTimeoutError,
    ServerError,
)
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.providers._sse import (
    AnthropicStreamDecoder,
    OpenAIStreamDecoder,
    SSEDecoder,
)
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior
from tests._fakes import CHEAP_ONLY
from tests._serving import anthropic_streaming, serving

if TYPE_CHECKING:
    import anthropic
    import openai
else:  # imported when a test first uses them (see _sdks)
    from ._sdks import anthropic, openai

KEY = "test-key-0123"
DATA = Path(__file__).parent / "data"
TEXT = "The quick brown fox jumps over the lazy dog, twice."
BEHAVIOR = ModelBehavior(content=TEXT, output_tokens=(5, 60))


def request(model: str) -> CompletionRequest:
    return CompletionRequest(model=model, messages=(Message(role="user", content="Hello!"),))


# --------------------------------------------------------------------------- the decoder


def test_sse_decoder_gives_the_same_events_whatever_the_chunking() -> None:
    raw = (DATA / "anthropic_messages_stream.sse").read_bytes().replace(b"\n", b"\r\n")
    raw = b": keep-alive comment\r\n\r\n" + raw
    whole = SSEDecoder().feed(raw)
    assert [name for name, _ in whole][:3] == ["message_start", "content_block_start", "ping"]
    assert len(whole) == 9
    for size in (1, 2, 3, 7, 64):
        decoder = SSEDecoder()
        events: list[tuple[str, str]] = []
        for i in range(0, len(raw), size):
            events.extend(decoder.feed(raw[i : i + size]))
        assert events == whole, size
        assert not decoder.pending


def test_sse_decoder_joins_multiline_data_and_defaults_the_event_name() -> None:
    events = SSEDecoder().feed(b"data: a\ndata:b\nid: 7\nretry: 10\n\nevent: x\n\n")
    assert events == [("message", "a\nb")]  # the data-less "x" event is dropped


def test_sse_decoder_bounds_its_buffer() -> None:
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(InvalidResponseError, match="longer than 100 bytes"):
        decoder.feed(b"data: " + b"x" * 200)  # no newline yet: one line too long
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(InvalidResponseError, match="event is longer"):
        decoder.feed(b"data: " + b"y" * 60 + b"\ndata: " + b"z" * 60 + b"\n")
    with pytest.raises(InvalidResponseError, match="UTF-8"):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")


def test_sse_decoder_returns_the_events_before_a_flaw_then_raises() -> None:
    decoder = SSEDecoder(max_event_bytes=50)
    events = decoder.feed(b"data: ok\n\ndata: " + b"x" * 80 + b"\n\n")
    assert events == [("message", "ok")]
    with pytest.raises(InvalidResponseError):
        decoder.feed(b"")


# Whole events of the plain shape take a short way through the decoder; a piece of one
# byte never holds a whole event, so it always takes the general parser: the two must
# give the same events and fail alike.
SSE_SAMPLES = [
    b"data: {}\n\n",
    b"data: a\n\ndata: b\n\n",
    b"event: delta\ndata: x\n\nevent: ping\ndata: {}\n\n",
    b"event: \ndata: unnamed\n\n",  # an empty name is "message"
    b"data:  two spaces\n\ndata:no space\n\n",
    b"data: one\ndata: two\n\n",  # multi-line data
    b": comment\n\ndata: after\n\n",
    b"id: 7\ndata: with an id\n\n",
    b"event: x\n\ndata: y\n\n",  # a data-less event is dropped
    b"event: a\nevent: b\ndata: z\n\n",
    b"data: crlf\r\n\r\ndata: lf\n\n",
    b"data: trailing\r\n\n",
    b"data: first\n\ndata: cut sh",  # a partial event after whole ones
    b"data: first\n\n\n\ndata: blank lines between\n\n",
    "data: caf\u00e9 \u2603\n\n".encode(),
    b"data: \xff\n\n",
    b"event: \xfe\ndata: x\n\n",
    b"data: ok\n\ndata: " + b"x" * 80 + b"\n\n",  # over the limit of 64
    b"data: " + b"x" * 64 + b"\n\n",  # at the limit
    b"event: e\ndata: " + b"y" * 65 + b"\n\n",
]


def _sse_events(pieces: list[bytes], limit: int = 64) -> tuple[list[tuple[str, str]], bool, bool]:
    """(events, whether it failed, whether a partial event is left) over ``pieces``."""
    decoder = SSEDecoder(max_event_bytes=limit)
    events: list[tuple[str, str]] = []
    try:
        for piece in pieces:
            events.extend(decoder.feed(piece))
        events.extend(decoder.feed(b""))  # a failure kept after events raises here
    except InvalidResponseError:
        return events, True, False
    return events, False, decoder.pending


@pytest.mark.parametrize("raw", SSE_SAMPLES, ids=range(len(SSE_SAMPLES)))
def test_sse_decoder_reads_whole_events_as_it_reads_them_byte_by_byte(raw: bytes) -> None:
    general = _sse_events([raw[i : i + 1] for i in range(len(raw))])
    assert _sse_events([raw]) == general
    # whole events after a partial one, and a stream cut at every event boundary
    assert _sse_events([b"data: spl", b"it\n\n" + raw]) == _sse_events(
        [(b"data: split\n\n" + raw)[i : i + 1] for i in range(len(raw) + 13)]
    )
    cuts = [i + 2 for i in range(len(raw)) if raw[i : i + 2] == b"\n\n"]
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert _sse_events([p for p in pieces if p]) == general


_SSE_ATOMS = [
    *(b"data: ", b"data:", b"event: ", b"event:", b"id: 1", b": c", b"x", b"yz", b" ", b"{}"),
    *(b"\n", b"\n", b"\n\n", b"\r\n", b"\r", "\u00e9".encode(), b"\xff"),
    *(b"data: " + b"q" * 30, b"data: a\n\n", b"event: e\ndata: b\n\n", b"event: \ndata: c\n\n"),
]


def test_sse_decoder_reads_random_bytes_alike_whatever_the_pieces() -> None:
    # seeded random streams of SSE fragments, odd ones included, under tight limits:
    # whole, byte by byte and cut in two, the same events and the same failure
    rng = random.Random(20261205)
    for _ in range(3_000):
        raw = b"".join(rng.choice(_SSE_ATOMS) for _ in range(rng.randint(1, 12)))
        limit = rng.choice([4, 8, 16, 64, 1 << 20])
        cut = rng.randint(0, len(raw))
        general = _sse_events([raw[i : i + 1] for i in range(len(raw))], limit)
        assert _sse_events([raw], limit) == general, (raw, limit)
        assert _sse_events([raw[:cut], raw[cut:]], limit) == general, (raw, limit, cut)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"choices":[{"index":0,"delta":{"content":"x"}}]}', ["x"]),
        ('  {"choices":[{"index":0,"delta":{"content":"x"}}]}  ', ["x"]),  # spaces around
        ('{"choices":[{"index":0,"delta":{"content":"\\u00e9"}}]}', ["\u00e9"]),
        ('{"choices":[]} {"x":1}', "not JSON"),  # extra data
        ('{"choices":[', "not JSON"),
        ("[1, 2]", "not an object"),
        ("NaN", "not an object"),
        ("", []),  # an empty data: a keep-alive, no event (the SSE standard)
        ("   ", []),  # blanks: a keep-alive too, never a chunk
    ],
)
def test_openai_decoder_reads_each_events_json_as_json_loads_does(
    data: str, expected: list[str] | str
) -> None:
    decoder = OpenAIStreamDecoder(provider="openai", model="gpt-4o")
    raw = f"data: {data}\n\n".encode()
    if isinstance(expected, list):
        assert decoder.feed(raw) == expected
    else:
        with pytest.raises(InvalidResponseError, match=expected):
            decoder.feed(raw)


def test_openai_decoder_reads_a_recorded_stream() -> None:
    decoder = OpenAIStreamDecoder(provider="openai", model="gpt-4o")
    deltas = decoder.feed((DATA / "openai_chat_stream.sse").read_bytes())
    assert deltas == ["I'm", " unable", " to"]
    assert decoder.finished
    assert (decoder.input_tokens, decoder.output_tokens) == (14, 47)
    assert decoder.stop_reason == "stop"
    assert decoder.response_id == "chatcmpl-9tXjg9DdaOfymTPDrSLfxslQEH0C2"


def test_anthropic_decoder_reads_a_recorded_stream() -> None:
    decoder = AnthropicStreamDecoder(provider="anthropic", model="claude")
    deltas = decoder.feed((DATA / "anthropic_messages_stream.sse").read_bytes())
    assert deltas == ["Hello", " there", "!"]
    assert decoder.finished
    assert (decoder.input_tokens, decoder.output_tokens) == (11, 6)
    assert decoder.stop_reason == "end_turn"


def test_error_events_map_like_their_status() -> None:
    decoder = AnthropicStreamDecoder(provider="anthropic", model="claude")
    with pytest.raises(OverloadedError, match="overloaded_error") as caught:
        decoder.feed(
            b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
            b'"message":"Overloaded"}}\n\n'
        )
    assert caught.value.status is None  # the HTTP status was 200
    with pytest.raises(ServerError):
        OpenAIStreamDecoder(provider="openai", model="gpt").feed(
            b'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
        )
    with pytest.raises(InvalidResponseError, match="not JSON"):
        OpenAIStreamDecoder(provider="openai", model="gpt").feed(b"data: {nope\n\n")


def test_a_failure_after_deltas_in_one_piece_waits_until_they_are_read() -> None:
    decoder = AnthropicStreamDecoder(provider="anthropic", model="claude")
    deltas = decoder.feed(
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"x"}}\n\n'
    )
    assert deltas == ["Hi"]
    assert isinstance(decoder.error, ServerError)


def test_after_the_first_delta_a_failure_keeps_the_deltas_before_it_and_drops_the_rest() -> None:
    def delta(text: str) -> bytes:
        body = {"choices": [{"index": 0, "delta": {"content": text}}]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    decoder = OpenAIStreamDecoder(provider="openai", model="gpt-4o")
    assert decoder.feed(delta("first")) == ["first"]
    # a later read, decoded in one pass: two deltas, an error, one more delta
    error = b'data: {"error": {"type": "server_error", "message": "boom"}}\n\n'
    assert decoder.feed(delta("a") + delta("b") + error + delta("after")) == ["a", "b"]
    assert isinstance(decoder.error, ServerError)
    assert not decoder.queued  # what came after the error is not read


# --------------------------------------------------------------------------- the fake's bytes


def _shape(value: Any) -> Any:
    """Keys (in order) and value types: what a sample and the fake must share."""
    if isinstance(value, dict):
        return tuple((key, _shape(item)) for key, item in value.items())
    if isinstance(value, list):
        return ("list", tuple(dict.fromkeys(_shape(item) for item in value)))
    return type(value).__name__


def _events(raw: bytes) -> list[tuple[str | None, Any]]:
    """Split an SSE body strictly: every event ends with a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), "an event stream ends with a blank line"
    out: list[tuple[str | None, Any]] = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        name = None
        if lines[0].startswith("event: "):
            name = lines.pop(0)[len("event: ") :]
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        data = lines[0][len("data: ") :]
        out.append((name, data if data == "[DONE]" else _shape(json.loads(data))))
    return out


def _collapsed(events: list[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
    """Runs of identical events (the text deltas) counted once."""
    out: list[tuple[str | None, Any]] = []
    for event in events:
        if not out or out[-1] != event:
            out.append(event)
    return out


async def _raw_stream(url: str, headers: dict[str, str], body: dict[str, Any]) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        return await response.read()


async def test_the_fakes_openai_stream_matches_the_recorded_sample() -> None:
    async with FakeLLMServer({"gpt-4o": BEHAVIOR}, api_key=KEY) as server:
        raw = await _raw_stream(
            server.openai_base_url + "/chat/completions",
            {"Authorization": f"Bearer {KEY}"},
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    sample = _events((DATA / "openai_chat_stream.sse").read_bytes())
    fake = _events(raw)
    assert _collapsed(fake) == _collapsed(sample)
    assert len(fake) == len(TEXT.split()) + 4  # role, one per word, finish, usage, [DONE]


async def test_the_fakes_anthropic_stream_matches_the_recorded_sample() -> None:
    async with FakeLLMServer({"claude": BEHAVIOR}, api_key=KEY) as server:
        raw = await _raw_stream(
            server.anthropic_base_url + "/v1/messages",
            {"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            {
                "model": "claude",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
        )
    sample = _events((DATA / "anthropic_messages_stream.sse").read_bytes())
    fake = _events(raw)
    assert _collapsed(fake) == _collapsed(sample)
    assert [name for name, _ in fake].count("content_block_delta") == len(TEXT.split())


@pytest.mark.parametrize("action", ["ok", "malformed", "incomplete", "truncated"])
async def test_a_streamed_request_never_gets_a_plain_json_body(action: str) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        FakeLLMServer({"gpt-4o": ModelBehavior.always(action)}, api_key=KEY) as server,
        aiohttp.ClientSession() as session,
        session.post(
            server.openai_base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        try:
            await response.read()
        except aiohttp.ClientPayloadError:
            assert action == "truncated"  # the connection was dropped mid-stream


# --------------------------------------------------------------------------- the official SDKs


async def test_the_openai_sdk_streams_the_same_text_and_usage_as_a_whole_answer() -> None:
    async with (
        FakeLLMServer({"gpt-4o": BEHAVIOR}, api_key=KEY, seed=3) as whole_server,
        FakeLLMServer({"gpt-4o": BEHAVIOR}, api_key=KEY, seed=3) as stream_server,
    ):
        messages: Any = [{"role": "user", "content": "Tell me about foxes."}]
        whole_client = openai.AsyncOpenAI(api_key=KEY, base_url=whole_server.openai_base_url)
        whole = await whole_client.chat.completions.create(model="gpt-4o", messages=messages)
        client = openai.AsyncOpenAI(api_key=KEY, base_url=stream_server.openai_base_url)
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        deltas: list[str] = []
        usage = None
        finish = None
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].delta.content:
                    deltas.append(chunk.choices[0].delta.content)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        await whole_client.close()
        await client.close()
    assert len(deltas) > 1
    assert "".join(deltas) == whole.choices[0].message.content == TEXT
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert finish == whole.choices[0].finish_reason


async def test_the_anthropic_sdk_streams_the_same_text_and_usage_as_a_whole_answer() -> None:
    async with (
        FakeLLMServer({"claude": BEHAVIOR}, api_key=KEY, seed=3) as whole_server,
        FakeLLMServer({"claude": BEHAVIOR}, api_key=KEY, seed=3) as stream_server,
    ):
        messages: Any = [{"role": "user", "content": "Tell me about foxes."}]
        whole_client = anthropic.AsyncAnthropic(
            api_key=KEY, base_url=whole_server.anthropic_base_url
        )
        whole = await whole_client.messages.create(
            model="claude", max_tokens=100, messages=messages
        )
        client = anthropic.AsyncAnthropic(api_key=KEY, base_url=stream_server.anthropic_base_url)
        async with client.messages.stream(
            model="claude", max_tokens=100, messages=messages
        ) as stream:
            deltas = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        await whole_client.close()
        await client.close()
    assert len(deltas) > 1
    whole_text = "".join(b.text for b in whole.content if b.type == "text")
    assert "".join(deltas) == whole_text == TEXT
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )
    assert final.stop_reason == whole.stop_reason


# --------------------------------------------------------------------------- the providers


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_providers_stream_matches_its_whole_answer(api: str) -> None:
    async with (
        FakeLLMServer({"m": BEHAVIOR}, api_key=KEY, seed=5) as whole_server,
        FakeLLMServer({"m": BEHAVIOR}, api_key=KEY, seed=5) as stream_server,
    ):
        if api == "openai":
            whole_provider: Any = OpenAIProvider(api_key=KEY, base_url=whole_server.openai_base_url)
            provider: Any = OpenAIProvider(api_key=KEY, base_url=stream_server.openai_base_url)
        else:
            whole_provider = AnthropicProvider(
                api_key=KEY, base_url=whole_server.anthropic_base_url
            )
            provider = AnthropicProvider(api_key=KEY, base_url=stream_server.anthropic_base_url)
        async with whole_provider, provider:
            whole = await whole_provider.complete(request("m"))
            stream = await provider.stream(request("m"))
            deltas = [delta async for delta in stream]
            streamed = stream.completion()
            assert stream.finished
        assert stream_server.last_request("m") is not None
        body = stream_server.last_request("m").body  # type: ignore[union-attr]
    assert body["stream"] is True
    if api == "openai":
        assert body["stream_options"] == {"include_usage": True}
    assert "".join(deltas) == streamed.content == whole.content
    assert (streamed.input_tokens, streamed.output_tokens) == (
        whole.input_tokens,
        whole.output_tokens,
    )
    assert streamed.stop_reason == whole.stop_reason


async def test_a_streams_rate_limit_reset_counts_from_when_its_headers_came() -> None:
    """
    ``x-ratelimit-reset-requests: 2s`` counts from the response's headers: a stream's
    completion said 2 s however long after them it was read (the answer streamed for a
    while, its reset long past), so every worker was pushed back by as long again.
    """
    exhausted = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps(chunk | {'choices': [choice]})}\n\n".encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"Content-Type": "text/event-stream", **exhausted}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        await response.write(event({"content": "Hel"}))
        await asyncio.sleep(0.2)  # the model writes on
        await response.write(event({"content": "lo"}, "stop") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with (
        serving("/v1/chat/completions", handler) as url,
        OpenAIProvider(api_key=KEY, base_url=f"{url}/v1") as provider,
    ):
        stream = await provider.stream(request("m"))
        opened = stream.completion().rate_limit_reset
        assert [delta async for delta in stream] == ["Hel", "lo"]
        ended = stream.completion().rate_limit_reset
    assert opened is not None and ended is not None
    assert ended < opened <= 2.0


MISTRAL_422 = {
    "object": "error",
    "message": {
        "detail": [
            {
                "type": "extra_forbidden",
                "loc": ["body", "stream_options", "include_usage"],
                "msg": "Extra inputs are not permitted",
                "input": True,
            }
        ]
    },
    "type": "invalid_request_error",
    "param": None,
    "code": None,
}


async def test_a_server_refusing_stream_options_streams_when_extra_body_sends_none() -> None:
    """
    Mistral's API (and Azure AI Foundry's Mistral models) refuse ``stream_options`` with
    a 422, and send the usage in their last chunk unasked: ``extra_body`` could not
    stop the provider from sending the field (its ``None`` was replaced by
    ``{"include_usage": true}``), so no stream from them could open.
    """
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-fake-mini"}
    chunks: list[dict[str, Any]] = [
        chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Bon"}}]},
        chunk | {"choices": [{"index": 0, "delta": {"content": "jour"}}]},
        chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage},
    ]
    sent: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sent.append(body)
        if "stream_options" in body:
            return web.json_response(MISTRAL_422, status=422)
        return await _openai_answer({}, chunks)(request)

    async with serving("/v1/chat/completions", handler) as url:
        executor = EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
            registry=CHEAP_ONLY,
            telemetry_store="null://",
            retry=RetryPolicy.none(),
        )
        context = ExecutionContext(workflow="chat", stage="answer", model="gpt-fake-mini")
        async with executor:
            with pytest.raises(InvalidRequestError, match="422"):  # the field sent: refused
                async with executor.stream("Salut", context):
                    pass
            async with executor.stream(
                "Salut", context, extra_body={"stream_options": None}
            ) as stream:
                response = await stream.get_final_response()
    assert [body.get("stream_options") for body in sent] == [{"include_usage": True}, None]
    assert "stream_options" not in sent[1] and sent[1]["stream"] is True
    assert response.content == "Bonjour"
    assert (response.input_tokens, response.output_tokens) == (7, 2)


# OpenAI-format answers with no content and no call: (message, streamed delta, finish)
NO_CONTENT = {
    "filtered": ({"role": "assistant", "content": None}, {}, "content_filter"),  # Azure
    "reasoned-out": (  # vLLM: a reasoning model spent max_tokens thinking
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Let me think",
            "tool_calls": [],
        },
        {"reasoning_content": "Let me think"},
        "length",
    ),
}


def _openai_answer(
    whole: dict[str, Any], chunks: list[dict[str, Any]]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A chat completions handler: ``whole`` unstreamed, else ``chunks`` as SSE events."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response(whole)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for data in chunks:
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handler


@pytest.mark.parametrize("case", NO_CONTENT)
async def test_an_openai_answer_without_content_reads_alike_whether_streamed_or_not(
    case: str,
) -> None:
    """
    Null content with a finish reason and no call (Azure's output filter, a reasoning
    model out of tokens) is an empty answer with that stop reason, streamed or not.
    """
    message, delta, finish = NO_CONTENT[case]
    usage = {"prompt_tokens": 12, "completion_tokens": 64}

    base = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m"}
    choice = {"index": 0, "message": message, "finish_reason": finish}
    chunk = base | {"object": "chat.completion.chunk"}
    handler = _openai_answer(
        base | {"choices": [choice], "usage": usage},
        [
            chunk
            | {
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": None}
                ]
            },
            chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
            chunk | {"choices": [], "usage": usage},
        ],
    )
    async with (
        serving("/v1/chat/completions", handler) as url,
        OpenAIProvider(api_key=KEY, base_url=f"{url}/v1") as provider,
    ):
        whole = await provider.complete(request("m"))
        stream = await provider.stream(request("m"))
        assert [delta async for delta in stream] == []
        streamed = stream.completion()
    for answer in (whole, streamed):
        assert (answer.content, answer.stop_reason, answer.tool_calls) == ("", finish, ())
        assert (answer.input_tokens, answer.output_tokens) == (12, 64)


async def test_azures_opening_chunk_without_id_or_model_leaves_the_answers_own() -> None:
    """
    Azure OpenAI opens a stream with a chunk of the prompt filter's results whose
    ``id`` and ``model`` are empty: the answer's own id and reported model, in the
    chunks after it, are read as from the whole answer.
    """
    usage = {"prompt_tokens": 12, "completion_tokens": 3}
    base = {"id": "chatcmpl-9", "created": 1, "model": "gpt-4o-2024-11-20"}

    message = {"role": "assistant", "content": "Hi"}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    filters = [{"prompt_index": 0, "content_filter_results": {}}]
    opening = {"id": "", "object": "", "created": 0, "model": "", "choices": []}
    chunk = {**base, "object": "chat.completion.chunk"}
    handler = _openai_answer(
        {**base, "object": "chat.completion", "choices": [choice], "usage": usage},
        [
            {**opening, "prompt_filter_results": filters},
            {**chunk, "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ],
    )
    async with (
        serving("/v1/chat/completions", handler) as url,
        OpenAIProvider(api_key=KEY, base_url=f"{url}/v1") as provider,
    ):
        whole = await provider.complete(request("gpt-4o"))
        stream = await provider.stream(request("gpt-4o"))
        assert [delta async for delta in stream] == ["Hi"]
        streamed = stream.completion()
    assert (whole.response_id, whole.model) == ("chatcmpl-9", "gpt-4o-2024-11-20")
    assert (streamed.response_id, streamed.model) == (whole.response_id, whole.model)


async def test_content_sent_as_a_list_of_chunks_is_its_text_streamed_or_not() -> None:
    """
    Mistral's reasoning models (Magistral) send ``content`` as a list of chunks, their
    thinking among them, in the answer and in each delta: the answer is the text
    chunks' text, the thinking left out, as the reasoning of other servers is.  It was
    refused as malformed, every time.
    """
    usage = {"prompt_tokens": 12, "completion_tokens": 30}
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "2 and 2 make 4"}]}
    message = {
        "role": "assistant",
        "content": [thinking, {"type": "text", "text": "The answer is 4."}],
    }
    base = {"id": "cmpl-7", "object": "chat.completion", "created": 1, "model": "magistral"}
    chunk = base | {"object": "chat.completion.chunk"}

    def delta(content: object, finish: str | None = None) -> dict[str, Any]:
        return chunk | {
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
        }

    handler = _openai_answer(
        base
        | {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        | {"usage": usage},
        [
            delta([thinking]),
            delta([{"type": "text", "text": "The answer"}]),
            delta(" is 4."),  # a plain string between them, as it also comes
            delta([], "stop"),
            chunk | {"choices": [], "usage": usage},
        ],
    )
    async with (
        serving("/v1/chat/completions", handler) as url,
        OpenAIProvider(api_key=KEY, base_url=f"{url}/v1") as provider,
    ):
        whole = await provider.complete(request("magistral"))
        stream = await provider.stream(request("magistral"))
        assert [piece async for piece in stream] == ["The answer", " is 4."]
        streamed = stream.completion()
    for answer in (whole, streamed):
        assert (answer.content, answer.stop_reason) == ("The answer is 4.", "stop")
        assert (answer.input_tokens, answer.output_tokens) == (12, 30)


@pytest.mark.parametrize(
    "content",
    [[{"type": "text", "text": 4}], ["The answer"], [{"type": "text"}]],
    ids=["a text that is no string", "a bare string", "no text"],
)
async def test_a_list_of_chunks_with_a_malformed_text_is_malformed(content: object) -> None:
    answer = {
        "id": "cmpl-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1},
    }
    handler = _openai_answer(
        answer,
        [{"id": "cmpl-1", "choices": [{"index": 0, "delta": {"content": content}}]}],
    )
    async with (
        serving("/v1/chat/completions", handler) as url,
        OpenAIProvider(api_key=KEY, base_url=f"{url}/v1") as provider,
    ):
        with pytest.raises(InvalidResponseError, match="content must be"):
            await provider.complete(request("m"))
        with pytest.raises(InvalidResponseError, match="content must be"):
            stream = await provider.stream(request("m"))
            _ = [piece async for piece in stream]


async def test_an_openai_answer_without_content_or_a_finish_reason_is_malformed() -> None:
    """Null content with no call, no refusal and no finish reason says nothing: refused."""
    answer = {
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 0},
    }

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(answer)

    async with (
        serving("/v1/chat/completions", handler) as url,
        OpenAIProvider(api_key=KEY, base_url=f"{url}/v1") as provider,
    ):
        with pytest.raises(InvalidResponseError, match="content is missing"):
            await provider.complete(request("m"))


async def test_an_anthropic_text_block_opened_with_text_keeps_it_as_the_sdk_does() -> None:
    """
    A ``content_block_start`` whose text block already holds text (a proxy's shape; the
    API opens it empty) starts the answer: the stream dropped it, giving " world" where
    the ``anthropic`` SDK's final message, and the whole answer, read "Hello world".
    """

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    usage = {"input_tokens": 25, "output_tokens": 3}
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m"}
    message |= {"content": [], "stop_reason": None, "stop_sequence": None}
    whole: dict[str, Any] = message | {"content": [{"type": "text", "text": "Hello world"}]}
    whole |= {"stop_reason": "end_turn", "usage": usage}
    events = [
        event("message_start", {"message": message | {"usage": usage | {"output_tokens": 1}}}),
        event("ping", {}),
        event(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": "Hello"}}
        ),
        event(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": " world"}}
        ),
        event("content_block_stop", {"index": 0}),
        event(
            "message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}
        ),
        event("message_stop", {}),
    ]

    async with serving("/v1/messages", anthropic_streaming(whole, events)) as url:
        async with AnthropicProvider(api_key=KEY, base_url=url) as provider:
            answered = await provider.complete(request("m"))
            stream = await provider.stream(request("m"))
            deltas = [delta async for delta in stream]
            streamed = stream.completion()
        async with (
            anthropic.AsyncAnthropic(api_key=KEY, base_url=url, max_retries=0) as client,
            client.messages.stream(
                model="m", max_tokens=10, messages=[{"role": "user", "content": "Hi"}]
            ) as sdk_stream,
        ):
            final = await sdk_stream.get_final_message()
    assert [block.text for block in final.content if block.type == "text"] == ["Hello world"]
    assert deltas == ["Hello", " world"]
    assert streamed.content == answered.content == "Hello world"
    assert (streamed.output_tokens, streamed.stop_reason) == (3, "end_turn")


@pytest.mark.parametrize(
    ("api", "error"), [("openai", ServerError), ("anthropic", OverloadedError)]
)
async def test_an_error_event_mid_stream_raises_after_the_deltas_before_it(
    api: str, error: type[Exception]
) -> None:
    behavior = ModelBehavior(content=TEXT, stream=StreamBehavior(fault_after=3))
    async with FakeLLMServer({"m": behavior}, api_key=KEY) as server:
        provider: Any = (
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)
            if api == "openai"
            else AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)
        )
        async with provider:
            stream = await provider.stream(request("m"))
            deltas: list[str] = []
            with pytest.raises(error):
                async for delta in stream:
                    deltas.append(delta)  # noqa: PERF401 - keeps the deltas before the error
            assert not stream.finished
    assert "".join(deltas) == "The quick brown"


@pytest.mark.parametrize("fault", ["reset", "malformed", "incomplete"])
async def test_a_broken_stream_raises_a_provider_error(fault: str) -> None:
    behavior = ModelBehavior(content=TEXT, stream=StreamBehavior(fault_after=2, fault=fault))  # type: ignore[arg-type]
    async with FakeLLMServer({"m": behavior}, api_key=KEY) as server:
        provider = AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)
        async with provider:
            stream = await provider.stream(request("m"))
            deltas: list[object] = []
            with pytest.raises(ProviderError) as caught:
                async for delta in stream:
                    deltas.append(delta)  # noqa: PERF401 - keeps the deltas before the error
    assert deltas == ["The", " quick"]
    assert type(caught.value).__name__ in {"InvalidResponseError", "ProviderConnectionError"}


async def test_a_stall_raises_the_idle_timeout() -> None:
    behavior = ModelBehavior(content=TEXT, stream=StreamBehavior(fault_after=1, fault="hang"))
    async with FakeLLMServer({"m": behavior}, api_key=KEY) as server:
        provider = OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)
        async with provider:
            # the idle timeout also bounds the wait for the answer's headers: 3 s, which
            # a busy machine does not reach
            stream = await provider.stream(request("m"), idle_timeout=3.0)
            assert await stream.__anext__() == "The"
            with pytest.raises(ProviderTimeoutError, match="idle timeout"):
                await stream.__anext__()


async def test_a_key_echoed_in_an_error_event_is_scrubbed() -> None:
    secret = "tok-0123456789-very-secret"

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        error = {"type": "error", "error": {"type": "api_error", "message": f"bad {secret}"}}
        await response.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
        await response.write_eof()
        return response

    async with serving("/v1/messages", handler) as url:
        provider = AnthropicProvider(api_key=secret, base_url=url)
        async with provider:
            with pytest.raises(ServerError) as caught:
                stream = await provider.stream(request("m"))
                await stream.__anext__()
    assert secret not in str(caught.value)
    assert "***" in str(caught.value)


def _error_body(message: str, kind: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


# every status the error table maps, with the body or header that decides the class
STATUS_ANSWERS = [
    (400, _error_body("This model's maximum context length is 8192 tokens"), {}),
    (400, _error_body("flagged", code="content_filter"), {}),
    (400, _error_body("Invalid model name passed in model=m"), {}),
    (400, _error_body("temperature must be a number"), {}),
    (401, _error_body("Incorrect API key provided"), {}),
    (402, _error_body("payment required"), {}),
    (403, _error_body("not allowed"), {}),
    (404, _error_body("no such model"), {}),
    (408, _error_body("request timeout"), {}),
    (413, b"too large", {}),
    (422, _error_body("unprocessable"), {}),
    (429, _error_body("slow down", kind="rate_limit_error"), {"Retry-After": "7"}),
    (429, _error_body("no credit", kind="insufficient_quota", code="insufficient_quota"), {}),
    (500, _error_body("boom", kind="api_error"), {}),
    (503, b"<html>unavailable</html>", {"Retry-After": "2"}),
    (529, _error_body("overloaded", kind="overloaded_error"), {}),
    (302, b"", {"Location": "http://127.0.0.1:1/elsewhere"}),
]


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    STATUS_ANSWERS,
    ids=[f"{status}-{i}" for i, (status, _, _) in enumerate(STATUS_ANSWERS)],
)
async def test_an_error_status_maps_alike_whether_streamed_or_not(
    status: int, body: bytes, headers: dict[str, str]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, headers=headers)

    async with serving("/{tail:.*}", handler) as url:
        for provider in (
            OpenAIProvider(api_key=KEY, base_url=f"{url}/v1"),
            AnthropicProvider(api_key=KEY, base_url=url),
        ):
            async with provider:
                with pytest.raises(ProviderError) as whole:
                    await provider.complete(request("m"))
                with pytest.raises(ProviderError) as streamed:
                    await provider.stream(request("m"))
            assert type(streamed.value) is type(whole.value), provider
            assert str(streamed.value) == str(whole.value)
            assert (streamed.value.status, streamed.value.retry_after) == (
                whole.value.status,
                whole.value.retry_after,
            )


async def test_a_key_echoed_in_a_malformed_event_is_scrubbed_before_the_quote_is_cut() -> None:
    secret = "0f3c9a7be21d4c58a6e9b0d7c4f1e2a3b5c6d7e8"  # Azure-like: not shaped like sk-...

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # not JSON, and the key straddles the 40 characters the error quotes
        await response.write(b"data: {" + request.headers["api-key"].encode() + b"\n\n")
        await response.write_eof()
        return response

    async with serving("/v1/chat/completions", handler) as url:
        provider = OpenAIProvider(base_url=f"{url}/v1", headers={"api-key": secret})
        async with provider:
            with pytest.raises(InvalidResponseError, match="not JSON") as caught:
                stream = await provider.stream(request("m"))
                await stream.__anext__()
    message = str(caught.value)
    assert "'{***'" in message
    assert not any(secret[i : i + 8] in message for i in range(len(secret) - 7))


def test_each_anthropic_tool_use_block_is_a_call_of_its_own() -> None:
    # a tool_use block always starts a call, whatever its index and its input so far
    # (an empty input is no JSON text yet): two blocks at one index stay two calls
    def event(body: dict[str, Any]) -> bytes:
        return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n".encode()

    def start(call_id: str) -> bytes:
        block = {"type": "tool_use", "id": call_id, "name": "ping", "input": {}}
        return event({"type": "content_block_start", "index": 0, "content_block": block})

    decoder = AnthropicStreamDecoder(provider="anthropic", model="m")
    decoder.feed(start("toolu_1") + start("toolu_2") + event({"type": "message_stop"}))
    assert [call["id"] for call in decoder.tool_calls] == ["toolu_1", "toolu_2"]
