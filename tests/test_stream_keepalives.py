"""
Streams as relays and OpenAI-compatible servers send them, over real HTTP on 127.0.0.1:
an event whose data is empty (``data:`` or ``data: `` then a blank line, a relay's
keep-alive) is no event, as the Server-Sent Events standard says, and data of blanks
is no chunk; neither may end a stream that is otherwise whole.  A server that sends no
``data: [DONE]`` (older llama.cpp servers, text-generation-webui) ends its answer with
the body, after a finish reason.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from empathy_models.exceptions import InvalidResponseError
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.providers._sse import SSEDecoder

from .test_wire_errors import (  # noqa: F401 - serving_replies: the fixture `server`
    KEY,
    MODEL,
    REQUEST,
    Replies,
    serving_replies,
)

KEEPALIVES = (b"data:\n\n", b"data: \n\n", b": ping\n\n", b"data:  \n\n")


def event(data: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def openai_stream(line_end: bytes) -> bytes:
    chunk = {"id": "c1", "model": MODEL, "choices": [{"index": 0, "delta": {"content": "he"}}]}
    second = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "llo"}}]}
    last = {
        "id": "c1",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    parts = [*KEEPALIVES, event(chunk), *KEEPALIVES, event(second), event(last)]
    parts += [*KEEPALIVES, b"data: [DONE]\n\n"]
    return b"".join(parts).replace(b"\n", line_end)


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
async def test_an_openai_stream_with_empty_data_keepalives_is_whole(
    server: Replies, line_end: bytes
) -> None:
    server.script(openai_stream(line_end), headers={"content-type": "text/event-stream"})
    async with OpenAIProvider(api_key=KEY, base_url=server.url) as provider:
        stream = await provider.stream(REQUEST)
        pieces = [piece async for piece in stream]
        completion = stream.completion()
    assert pieces == ["he", "llo"]  # it failed: "an event's data is not JSON (starts '')"
    assert (completion.content, completion.output_tokens) == ("hello", 2)


async def test_an_anthropic_stream_with_empty_data_keepalives_is_whole(server: Replies) -> None:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "model": MODEL,
            "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    }
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "hi"},
    }
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 1},
    }
    body = b"".join(
        [
            event(start, "message_start"),
            *KEEPALIVES,
            b"event: ping\ndata:\n\n",
            event(block, "content_block_start"),
            event(delta, "content_block_delta"),
            *KEEPALIVES,
            event(end, "message_delta"),
            event({"type": "message_stop"}, "message_stop"),
        ]
    )
    server.script(body, headers={"content-type": "text/event-stream"})
    async with AnthropicProvider(api_key=KEY, base_url=server.url) as provider:
        stream = await provider.stream(REQUEST)
        assert [piece async for piece in stream] == ["hi"]
        assert stream.completion().stop_reason == "end_turn"


def test_the_decoder_drops_empty_data_events_whatever_the_chunking() -> None:
    body = b"data:\n\nevent: x\ndata: \n\ndata: a\n\ndata:\ndata:\n\n"
    expected = [("message", "a"), ("message", "\n")]  # two empty lines make one line break
    assert SSEDecoder().feed(body) == expected
    decoder = SSEDecoder()
    events = [e for i in range(len(body)) for e in decoder.feed(body[i : i + 1])]
    assert events == expected


# --------------------------------------------------------------------------- no [DONE]


def chunks(*pieces: dict[str, Any]) -> bytes:
    return b"".join(event({"id": "c1", "model": MODEL, **piece}) for piece in pieces)


HELLO = {"choices": [{"index": 0, "delta": {"content": "hello"}}]}
STOP = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


@pytest.mark.parametrize(
    "body", [chunks(HELLO, STOP, USAGE), chunks(HELLO, STOP)], ids=["usage", "no usage"]
)
async def test_an_openai_stream_without_done_is_whole_after_its_finish_reason(
    server: Replies, body: bytes
) -> None:
    server.script(body, headers={"content-type": "text/event-stream"})
    async with OpenAIProvider(api_key=KEY, base_url=server.url) as provider:
        stream = await provider.stream(REQUEST)
        # it failed: "the event stream ended before the answer was complete"
        assert [piece async for piece in stream] == ["hello"]
        assert stream.finished and stream.ended_at is not None
        completion = stream.completion()
    assert (completion.content, completion.stop_reason) == ("hello", "stop")
    assert completion.output_tokens == 2  # reported, or estimated from "hello"


async def test_a_stream_that_ends_before_a_finish_reason_is_still_cut_short(
    server: Replies,
) -> None:
    server.script(chunks(HELLO), headers={"content-type": "text/event-stream"})
    async with OpenAIProvider(api_key=KEY, base_url=server.url) as provider:
        stream = await provider.stream(REQUEST)
        with pytest.raises(InvalidResponseError, match="ended before the answer was complete"):
            _ = [piece async for piece in stream]
        assert not stream.finished
