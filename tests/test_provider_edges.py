"""
Hostile answers over real HTTP on 127.0.0.1: unbounded bodies, a key echoed in a 2xx
body, nesting too deep to parse, odd values in stream events, and a 429 whose
Retry-After would close a provider for a day or forever.

`RawServer` answers every POST with whatever the test scripted (status, headers, body,
streamed or not), which `FakeLLMServer` cannot be made to send.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import logging
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import anyio.to_thread
import attrs
import pytest
from aiohttp import web

from empathy_models import (
    AllRoutesFailedError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    RateLimitedError,
    RetryPolicy,
    telemetry_from_url,
)
from empathy_models.abc import CompletionRequest
from empathy_models.cli import main as cli_main
from empathy_models.exceptions import InvalidRequestError, InvalidResponseError, ServerError
from empathy_models.providers import AnthropicProvider, OpenAIProvider

from ._serving import cutting_short

KEY = "sk-ant-api03-EDGEtestKEY-0123456789abcdefXYZ"
MODEL = "claude-raw"
REQUEST = CompletionRequest(model=MODEL, messages="hello")


@attrs.define
class Reply:
    status: int = 200
    headers: dict[str, str] = attrs.Factory(dict)
    body: bytes = b""
    stream_chunks: int = 0
    """Stream ``body`` this many times, chunked, without a Content-Length."""


class RawServer:
    """A real aiohttp server on 127.0.0.1 answering every POST with `reply`."""

    def __init__(self) -> None:
        self.reply = Reply()
        self.requests = 0
        self.bytes_sent = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        reply = self.reply
        if not reply.stream_chunks:
            self.bytes_sent += len(reply.body)
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(reply.stream_chunks):
                await response.write(reply.body)
                self.bytes_sent += len(reply.body)
        except (ConnectionError, RuntimeError):  # the client hung up: what we test for
            return response
        await response.write_eof()
        return response

    async def __aenter__(self) -> RawServer:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    async with RawServer() as server:
        yield server


def anthropic_ok(text: str = "fine") -> bytes:
    return json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }
    ).encode()


# --------------------------------------------------------------------------- helpers


def _large_strings_reachable(exc: BaseException, threshold: int) -> list[str]:
    """
    Strings / bytes of at least ``threshold`` bytes that ``exc`` keeps alive: through its
    attributes and args, its cause and context, and the locals of its traceback's frames.
    """
    found: list[str] = []
    seen: set[int] = set()
    todo: list[tuple[str, Any, int]] = [("exc", exc, 0)]
    while todo:
        where, obj, depth = todo.pop()
        if id(obj) in seen or depth > 6:
            continue
        seen.add(id(obj))
        if isinstance(obj, str | bytes | bytearray | memoryview):
            if sys.getsizeof(obj) >= threshold:
                found.append(f"{where} ({type(obj).__name__}, {sys.getsizeof(obj):,} bytes)")
            continue
        if isinstance(obj, BaseException):
            todo.append((f"{where}.args", obj.args, depth + 1))
            todo.extend((f"{where}.{k}", v, depth + 1) for k, v in vars(obj).items())
            todo.extend(
                (f"{where}.{name}", getattr(obj, name), depth + 1)
                for name in ("__cause__", "__context__")
                if getattr(obj, name) is not None
            )
            if obj.__traceback__ is not None:
                todo.append((f"{where}.tb", obj.__traceback__, depth + 1))
        elif isinstance(obj, TracebackType):
            todo.append((where, obj.tb_frame, depth))
            if obj.tb_next is not None:
                todo.append((where, obj.tb_next, depth))
        elif isinstance(obj, FrameType):
            name = obj.f_code.co_name
            todo.extend((f"{name}:{k}", v, depth + 1) for k, v in obj.f_locals.items())
        elif isinstance(obj, list | tuple | set | frozenset):
            todo.extend((f"{where}[]", v, depth + 1) for v in obj)
        elif isinstance(obj, dict):
            todo.extend((f"{where}[{k!r}]", v, depth + 1) for k, v in obj.items())
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("aiohttp", "json")):
            todo.extend((f"{where}.{k}", v, depth + 1) for k, v in vars(obj).items())
            todo.extend(
                (f"{where}.{attr}", getattr(obj, attr), depth + 1)
                for attr in ("_body", "doc", "object")
                if hasattr(obj, attr)
            )
    return found


async def complete(provider: AnthropicProvider, request: CompletionRequest = REQUEST) -> Any:
    async with provider:
        return await provider.complete(request)


# --------------------------------------------------------------------------- item 12


async def test_a_streamed_answer_over_the_limit_stops_reading_early(raw: RawServer) -> None:
    raw.reply = Reply(body=b"x" * 65_536, stream_chunks=4_800)  # 300 MiB, no Content-Length
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url, max_response_bytes=1 << 20)
    with pytest.raises(
        InvalidResponseError, match=r"more than 1,048,576 bytes.*max_response_bytes"
    ):
        await complete(provider)
    # the client hung up long before the 300 MiB were out (socket buffers hold a few MiB)
    assert raw.bytes_sent < 64 * 1024 * 1024


async def test_a_declared_length_over_the_limit_is_refused_without_reading(
    raw: RawServer,
) -> None:
    raw.reply = Reply(body=b"y" * (3 << 20))
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url, max_response_bytes=1 << 20)
    with pytest.raises(InvalidResponseError, match=r"3,145,728 bytes \(Content-Length\)"):
        await complete(provider)


async def test_the_default_limit_is_16_mib_and_normal_answers_pass(raw: RawServer) -> None:
    raw.reply = Reply(body=anthropic_ok())
    assert (await complete(AnthropicProvider(api_key=KEY, base_url=raw.url))).content == "fine"
    raw.reply = Reply(body=b" " * (17 << 20))
    with pytest.raises(InvalidResponseError, match="max_response_bytes=16,777,216"):
        await complete(AnthropicProvider(api_key=KEY, base_url=raw.url))


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_measured_as_it_expands(raw: RawServer, encoding: str) -> None:
    # 64 MiB of blanks compress to some 64 KiB: the Content-Length is far under the limit
    blanks = b" " * (64 << 20)
    packed = gzip.compress(blanks, 9) if encoding == "gzip" else zlib.compress(blanks, 9)
    del blanks
    raw.reply = Reply(body=packed, headers={"Content-Encoding": encoding})
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url, max_response_bytes=1 << 20)
    with pytest.raises(
        InvalidResponseError, match=r"more than 1,048,576 bytes.*max_response_bytes"
    ):
        await complete(provider)
    # a compressed answer of the usual size is read as before
    raw.reply = Reply(body=gzip.compress(anthropic_ok()), headers={"Content-Encoding": "gzip"})
    assert (await complete(provider)).content == "fine"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_whole_answer_cut_short_keeps_its_2xx_status(streamed: bool) -> None:
    # a server that ignored "stream": true promises a whole JSON body and drops the
    # connection halfway: accepted (and billed) alike whether the request was streamed
    body = anthropic_ok()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    async with (
        cutting_short(head, body, len(body) // 2) as url,
        AnthropicProvider(api_key=KEY, base_url=url) as provider,
    ):
        with pytest.raises(InvalidResponseError, match="cut short") as info:
            if streamed:
                await provider.stream(REQUEST)
            else:
                await provider.complete(REQUEST)
    assert info.value.status == 200


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_max_response_bytes_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_response_bytes must be an integer >= 1"):
        OpenAIProvider(api_key=KEY, base_url="http://127.0.0.1:1", max_response_bytes=bad)


_SSE_HEADERS = {"Content-Type": "text/event-stream"}
_OPENING = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
    b'"model":"claude-raw","usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"more "}}\n\n'
)


@pytest.mark.parametrize("body", ["text", "keep-alives"])
async def test_a_stream_that_never_ends_stops_at_max_stream_bytes(
    raw: RawServer, body: str
) -> None:
    # an answer that goes on and on (some 300 MiB), or a proxy's keep-alives for ever:
    # neither is read past the bound, and the client hangs up
    piece = _TEXT_DELTA * 64 if body == "text" else b": keep-alive\n\n" * 512
    raw.reply = Reply(headers=_SSE_HEADERS, body=piece, stream_chunks=(300 << 20) // len(piece))
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url, max_stream_bytes=1 << 20)
    text: list[str] = []
    async with provider:
        stream = await provider.stream(REQUEST)
        with anyio.fail_after(30), pytest.raises(InvalidResponseError) as caught:
            async for piece_read in stream:
                text.append(str(piece_read))  # noqa: PERF401 - keeps the pieces before the error
        await stream.aclose()
    assert "more than 1,048,576 bytes" in str(caught.value)
    assert "max_stream_bytes" in str(caught.value) and caught.value.status == 200
    assert len("".join(text)) < 1 << 20
    assert raw.bytes_sent < 64 * 1024 * 1024


async def test_a_stream_within_max_stream_bytes_is_read_whole(raw: RawServer) -> None:
    ending = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn"},"usage":{"output_tokens":2}}\n\nevent: message_stop\ndata: '
        b'{"type":"message_stop"}\n\n'
    )
    whole = _OPENING + _TEXT_DELTA * 2 + ending
    raw.reply = Reply(headers=_SSE_HEADERS, body=whole, stream_chunks=1)
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url, max_stream_bytes=len(whole))
    async with provider:
        stream = await provider.stream(REQUEST)
        assert [piece async for piece in stream] == ["more ", "more "]
        assert stream.completion().content == "more more "


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_max_stream_bytes_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_stream_bytes must be an integer >= 1"):
        OpenAIProvider(api_key=KEY, base_url="http://127.0.0.1:1", max_stream_bytes=bad)
    with pytest.raises(ValueError, match="max_stream_bytes must be an integer >= 1"):
        AnthropicProvider(api_key=KEY, base_url="http://127.0.0.1:1", max_stream_bytes=bad)


@pytest.mark.parametrize("status", [200, 500])
async def test_the_error_keeps_nothing_of_a_large_body_alive(raw: RawServer, status: int) -> None:
    raw.reply = Reply(status=status, body=b"<html>" + b"z" * (5 << 20))
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url)
    with pytest.raises((InvalidResponseError, ServerError)) as info:
        await complete(provider)
    gc.collect()
    assert _large_strings_reachable(info.value, 256 * 1024) == []


# --------------------------------------------------------------------------- item 15


async def test_a_key_echoed_in_a_2xx_non_json_body_is_scrubbed_everywhere(
    raw: RawServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw.reply = Reply(body=f"debug: your key is {KEY} ok".encode())
    with pytest.raises(InvalidResponseError) as info:
        await complete(AnthropicProvider(api_key=KEY, base_url=raw.url))
    assert KEY not in str(info.value) and "***" in str(info.value)
    assert "KEY" not in str(info.value).split("***")[-1][:5]  # nothing of the key after it

    # and through the executor into the record, the SQLite file and `telemetry export`
    db = tmp_path / "t.db"
    registry = ModelRegistry(
        models=[
            ModelInfo(
                id=MODEL,
                provider="anthropic",
                tier="cheap",
                input_price_per_mtok=1.0,
                output_price_per_mtok=1.0,
                context_window=100_000,
                max_output_tokens=4096,
            )
        ],
        price_version="raw-1",
    )
    async with (
        telemetry_from_url(f"sqlite:///{db}") as telemetry,
        EmpathyLLMExecutor(
            [AnthropicProvider(api_key=KEY, base_url=raw.url)],
            registry=registry,
            telemetry_store=telemetry,
            retry=RetryPolicy(max_attempts=1),
        ) as executor,
    ):
        with pytest.raises(AllRoutesFailedError):  # the run fails; its record matters
            await executor.run("hello", ExecutionContext(tier="cheap"))
    async with telemetry_from_url(f"sqlite:///{db}") as reader:
        [record] = await reader.recent()
    assert record.error_message is not None and "not valid JSON" in record.error_message
    assert KEY not in record.error_message
    assert KEY.encode() not in db.read_bytes()
    args = ["telemetry", "export", "--format", "jsonl", "--db", str(db)]
    assert await anyio.to_thread.run_sync(cli_main, args) == 0
    exported = capsys.readouterr().out
    assert "not valid JSON" in exported and KEY not in exported


# --------------------------------------------------------------------------- item 16


@pytest.mark.parametrize("status", [200, 500, 429])
async def test_json_nested_too_deeply_is_a_provider_error_not_recursion(
    raw: RawServer, status: int
) -> None:
    depth = 200_000
    raw.reply = Reply(status=status, body=b"[" * depth + b"]" * depth)
    with pytest.raises((InvalidResponseError, ServerError, RateLimitedError)) as info:
        await complete(AnthropicProvider(api_key=KEY, base_url=raw.url))
    if status == 200:
        assert isinstance(info.value, InvalidResponseError)
        assert "nested too deeply" in str(info.value)
    else:
        assert info.value.status == status


DEEP = "[" * 500 + "]" * 500  # parsed, and far deeper than any real value


def _sse(*events: tuple[str | None, str]) -> bytes:
    return b"".join(
        (f"event: {name}\n" if name else "").encode() + f"data: {data}\n\n".encode()
        for name, data in events
    )


def _anthropic(*events: tuple[str, str]) -> list[tuple[str | None, str]]:
    start = '{"type":"message_start","message":{"id":"m","usage":{"input_tokens":1}}}'
    return [("message_start", start), *events, ("message_stop", '{"type":"message_stop"}')]


def _tool_start(index: str = "0", given: str = "{}") -> tuple[str, str]:
    block = '{"type":"tool_use","id":"t1","name":"f","input":' + given + "}"
    data = '{"type":"content_block_start","index":' + index + ',"content_block":' + block + "}"
    return ("content_block_start", data)


def _json_delta(index: str) -> tuple[str, str]:
    delta = '{"type":"input_json_delta","partial_json":"{}"}'
    return (
        "content_block_delta",
        '{"type":"content_block_delta","index":' + index + ',"delta":' + delta + "}",
    )


def _openai(*chunks: str) -> list[tuple[str | None, str]]:
    return [*((None, chunk) for chunk in chunks), (None, "[DONE]")]


def _openai_call(index: str) -> str:
    call = '{"index":' + index + ',"id":"c1","function":{"name":"f","arguments":"{}"}}'
    return '{"choices":[{"index":0,"delta":{"tool_calls":[' + call + "]}}]}"


# each stream is complete: only the odd value can fail it
ODD_EVENTS: dict[str, tuple[str, list[tuple[str | None, str]], type[Exception], str]] = {
    "anthropic: a delta's index is a list": (
        "anthropic",
        _anthropic(_tool_start(), _json_delta("[0]")),
        InvalidResponseError,
        "input_json_delta needs",
    ),
    "anthropic: a delta's index is an object": (
        "anthropic",
        _anthropic(_tool_start(), _json_delta('{"i":0}')),
        InvalidResponseError,
        "input_json_delta needs",
    ),
    "anthropic: a delta's index is true (block 1)": (
        "anthropic",
        _anthropic(_tool_start("1"), _json_delta("true")),
        InvalidResponseError,
        "input_json_delta needs",
    ),
    "anthropic: a block's input nests too deeply": (
        "anthropic",
        _anthropic(_tool_start(given='{"a":' + DEEP + "}")),
        InvalidResponseError,
        r"stream\.tool_calls\[0\]",
    ),
    "anthropic: an error event's message nests too deeply": (
        "anthropic",
        [("error", '{"type":"error","error":{"type":"api_error","message":' + DEEP + "}}")],
        ServerError,
        r"error event in the stream \(api_error\): no message",
    ),
    "anthropic: a usage count nests too deeply": (
        "anthropic",
        [
            (
                "message_start",
                '{"type":"message_start","message":{"usage":{"input_tokens":' + DEEP + "}}}",
            )
        ],
        InvalidResponseError,
        "input_tokens must be an integer >= 0, got a JSON list",
    ),
    "openai: a call's index is true": (
        "openai",
        _openai(_openai_call("true")),
        InvalidResponseError,
        "integer index",
    ),
    "openai: an error's message and code nest too deeply": (
        "openai",
        _openai('{"error":{"message":' + DEEP + ',"code":' + DEEP + "}}"),
        ServerError,
        r"error event in the stream \(error\): no message",
    ),
    "openai: a usage count nests too deeply": (
        "openai",
        _openai('{"choices":[],"usage":{"prompt_tokens":' + DEEP + "}}"),
        InvalidResponseError,
        "prompt_tokens must be an integer >= 0, got a JSON list",
    ),
}


@pytest.mark.parametrize("case", list(ODD_EVENTS))
async def test_odd_values_in_stream_events_are_provider_errors(raw: RawServer, case: str) -> None:
    api, events, error, match = ODD_EVENTS[case]
    headers = {"Content-Type": "text/event-stream"}
    raw.reply = Reply(headers=headers, body=_sse(*events), stream_chunks=1)
    provider: Any = (
        OpenAIProvider(api_key=KEY, base_url=f"{raw.url}/v1")
        if api == "openai"
        else AnthropicProvider(api_key=KEY, base_url=raw.url)
    )
    async with provider:
        with pytest.raises(error, match=match):
            stream = await provider.stream(REQUEST)
            async for _ in stream:
                pass


def _anthropic_usage(count: int, streamed: bool) -> bytes:
    usage = f'{{"input_tokens":{count},"output_tokens":1}}'
    if not streamed:
        return anthropic_ok().replace(b'{"input_tokens": 3, "output_tokens": 1}', usage.encode())
    text = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}'
    return _sse(
        ("message_start", '{"type":"message_start","message":{"id":"m","usage":' + usage + "}}"),
        ("content_block_delta", text),
        ("message_stop", '{"type":"message_stop"}'),
    )


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("count", [2**63, 10**400], ids=["2**63", "10**400"])
async def test_a_usage_count_no_record_can_hold_is_a_malformed_answer(
    raw: RawServer, count: int, streamed: bool
) -> None:
    headers = {"Content-Type": "text/event-stream"} if streamed else {}
    raw.reply = Reply(
        headers=headers, body=_anthropic_usage(count, streamed), stream_chunks=int(streamed)
    )
    async with AnthropicProvider(api_key=KEY, base_url=raw.url) as provider:
        with pytest.raises(InvalidResponseError, match=r"input_tokens must be < 2\*\*63, got a"):
            if streamed:
                stream = await provider.stream(REQUEST)
                await stream.__anext__()
            else:
                await provider.complete(REQUEST)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_the_largest_count_a_record_holds_is_read(raw: RawServer, streamed: bool) -> None:
    headers = {"Content-Type": "text/event-stream"} if streamed else {}
    body = _anthropic_usage(2**63 - 1, streamed)
    raw.reply = Reply(headers=headers, body=body, stream_chunks=int(streamed))
    async with AnthropicProvider(api_key=KEY, base_url=raw.url) as provider:
        if streamed:
            stream = await provider.stream(REQUEST)
            _ = [piece async for piece in stream]
            completion = stream.completion()
        else:
            completion = await provider.complete(REQUEST)
    assert completion.input_tokens == 2**63 - 1


# --------------------------------------------------------------------------- item 9


@pytest.mark.parametrize(
    "retry_after", ["86400", "Thu, 01 Jan 2099 00:00:00 GMT", "1" + "0" * 300, "1e300"]
)
async def test_one_429_cannot_open_a_circuit_for_longer_than_the_cap(
    raw: RawServer, tmp_path: Path, retry_after: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw.reply = Reply(
        status=429,
        headers={"retry-after": retry_after, "content-type": "application/json"},
        body=b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}',
    )
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url)
    store = f"sqlite:///{tmp_path / 'state.db'}"
    caplog.set_level(logging.WARNING, "empathy_models.breaker")
    async with provider, CircuitBreaker(store=store) as breaker:
        cap = breaker.policy.max_retry_after_open
        assert cap == 600.0
        before = time.time()
        with pytest.raises(RateLimitedError) as info:
            async with breaker.guard("anthropic"):
                await provider.complete(REQUEST)
        assert info.value.retry_after is not None and info.value.retry_after > cap
        state = await breaker.get_status("anthropic")
        assert state.state is CircuitState.OPEN
        assert state.open_until_ts is not None
        assert before + cap - 1 <= state.open_until_ts <= time.time() + cap
        with pytest.raises(CircuitOpenError) as rejected:
            await breaker.admit("anthropic")
        assert rejected.value.retry_after is not None and rejected.value.retry_after <= cap
    assert any("max_retry_after_open=600s" in r.getMessage() for r in caplog.records)


async def test_the_cap_is_configurable(raw: RawServer) -> None:
    from empathy_models import BreakerPolicy

    raw.reply = Reply(status=429, headers={"retry-after": "86400"}, body=b"{}")
    provider = AnthropicProvider(api_key=KEY, base_url=raw.url)
    async with (
        provider,
        CircuitBreaker(policy=BreakerPolicy(recovery_seconds=10, max_retry_after_open=30)) as b,
    ):
        before = time.time()
        with pytest.raises(RateLimitedError):
            async with b.guard("anthropic"):
                await provider.complete(REQUEST)
        until = (await b.get_status("anthropic")).open_until_ts
        assert until is not None and until <= time.time() + 30 and until >= before + 29


async def test_a_long_error_message_of_dotted_words_is_quoted_at_once(raw: RawServer) -> None:
    # a 400 whose message is 180 KB of "a.a.a...": looking in it for a URL's password to
    # mask took time growing with the square of its length (over a minute here, with
    # the event loop blocked all along); the client runs in a thread, for the guard
    message = "a." * 90_000
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    raw.reply = Reply(
        status=400, headers={"content-type": "application/json"}, body=json.dumps(error).encode()
    )

    def call() -> str:
        async def failed() -> str:
            with pytest.raises(InvalidRequestError) as info:
                await complete(AnthropicProvider(api_key=KEY, base_url=raw.url))
            return str(info.value)

        return asyncio.run(failed())

    with anyio.fail_after(30):
        shown = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    assert "invalid_request_error: a.a.a." in shown and len(shown) < 400


@pytest.mark.parametrize(
    "retry_after",
    [
        "Mon, 1 Jan 2030 00:00:00 +99999999999999999999",  # an offset no clock holds
        "Mon, 1 Jan 99999999999999999999 00:00:00 GMT",  # a year
        "Mon, 99999999999999999999 Jan 2030 00:00:00 GMT",  # a day
        "Mon, 1 Jan 2030 99999999999999999999:00:00 GMT",  # an hour
    ],
)
@pytest.mark.parametrize("status", [429, 503])
async def test_a_retry_after_date_past_any_clock_is_no_hint(
    raw: RawServer, retry_after: str, status: int
) -> None:
    # an HTTP date whose numbers overflow: read as no hint, as any unreadable value is
    # (the error used to be the parser's OverflowError: not a provider error, not retried)
    raw.reply = Reply(
        status=status,
        headers={"retry-after": retry_after, "content-type": "application/json"},
        body=b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}',
    )
    with pytest.raises((RateLimitedError, ServerError)) as info:
        await complete(AnthropicProvider(api_key=KEY, base_url=raw.url))
    assert info.value.status == status and info.value.retry_after is None
    assert RetryPolicy().is_retryable(info.value)


@pytest.mark.parametrize("provider_class", [OpenAIProvider, AnthropicProvider])
@pytest.mark.parametrize("url", ["http://[::1/v1", "http://127.0.0.1:99999/v1", "http://h:x/"])
def test_a_base_url_that_does_not_parse_is_a_configuration_error(
    provider_class: type[OpenAIProvider] | type[AnthropicProvider], url: str
) -> None:
    with pytest.raises(ConfigurationError, match=r"base_url is not a valid URL") as info:
        provider_class(api_key=KEY, name="x", base_url=url)
    assert repr(url) in str(info.value)


@pytest.mark.parametrize("number", ["1" + "0" * 400, "1e400"], ids=["integer", "float"])
async def test_tool_arguments_past_json_numbers_are_an_invalid_response(
    raw: RawServer, number: str
) -> None:
    # what no JSON decoder of the next request reads as a number: refused as the
    # provider's malformed answer, naming where, as a float past the largest is
    body = anthropic_ok().replace(
        b'[{"type": "text", "text": "fine"}]',
        b'[{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"n": '
        + number.encode()
        + b"}}]",
    )
    raw.reply = Reply(body=body)
    with pytest.raises(InvalidResponseError, match=r"arguments\.n must be JSON"):
        await complete(AnthropicProvider(api_key=KEY, base_url=raw.url))


async def test_a_long_answer_sent_as_one_event_streams_as_it_reads_whole(raw: RawServer) -> None:
    # a gateway that buffers the answer sends it as one event: within max_response_bytes
    # it is read streamed as it is read whole (events were bounded at 1 MiB apart)
    text = "word " * (400 << 10)  # 2 MiB
    delta = {"type": "content_block_delta", "index": 0}
    delta["delta"] = {"type": "text_delta", "text": text}
    ending = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn"},"usage":{"output_tokens":2}}\n\nevent: message_stop\ndata: '
        b'{"type":"message_stop"}\n\n'
    )
    body = b"event: content_block_delta\ndata: " + json.dumps(delta).encode() + b"\n\n"
    raw.reply = Reply(headers=_SSE_HEADERS, body=_OPENING + body + ending, stream_chunks=1)
    async with AnthropicProvider(api_key=KEY, base_url=raw.url) as provider:
        stream = await provider.stream(REQUEST)
        assert "".join([str(piece) async for piece in stream]) == text
    raw.reply = Reply(headers=_SSE_HEADERS, body=_OPENING + body + ending, stream_chunks=1)
    bounded = AnthropicProvider(api_key=KEY, base_url=raw.url, max_response_bytes=1 << 20)
    async with bounded:
        stream = await bounded.stream(REQUEST)
        with pytest.raises(InvalidResponseError, match="longer than 1,048,576 bytes"):
            async for _ in stream:
                pass


@pytest.mark.parametrize("body", [b"<html><body>Sign in to the proxy</body></html>", b""])
async def test_a_2xx_page_that_is_no_event_stream_is_quoted_in_the_error(
    raw: RawServer, body: bytes
) -> None:
    # a proxy's sign-in page answered with 200 to a streamed request: the error said only
    # that the stream ended early, not what came instead
    raw.reply = Reply(headers={"Content-Type": "text/html"}, body=body + KEY.encode())
    async with AnthropicProvider(api_key=KEY, base_url=raw.url) as provider:
        stream = await provider.stream(REQUEST)
        with pytest.raises(InvalidResponseError) as caught:
            async for _ in stream:
                pass
    message = str(caught.value)
    assert "ended before the answer was complete" in message and "text/html" in message
    assert "no piece came" in message and KEY not in message
    if body:
        assert "the body starts '<html><body>Sign in to the proxy" in message
