"""
Streamed answers for `FakeLLMServer`: Server-Sent Events in the OpenAI Chat
Completions and the Anthropic Messages formats, byte for byte as the real APIs send
them (``tests/data/*.sse`` hold recorded samples the tests compare against).

OpenAI: a first chunk with ``delta.role``, one chunk per piece of text, a chunk with
``finish_reason``, then (when the request asked for ``stream_options.include_usage``)
a usage-only chunk with ``choices: []``, and ``data: [DONE]``.  Anthropic:
``message_start`` (input tokens), ``content_block_start``, ``ping``, one
``content_block_delta`` per piece, ``content_block_stop``, ``message_delta`` (stop
reason and output tokens), ``message_stop``.

Tool calls follow the text: OpenAI sends a ``delta.tool_calls[]`` piece with the call's
``id``, ``type`` and ``function.name`` and then its ``function.arguments`` in pieces
(``finish_reason: "tool_calls"``); Anthropic a ``tool_use`` block
(``content_block_start`` with ``input: {}``, ``input_json_delta`` pieces,
``content_block_stop``; ``stop_reason: "tool_use"``), with no text block when the
answer is only tool calls.

`StreamBehavior` (``ModelBehavior(stream=...)``) controls the timing and the faults:
a delay before the first text chunk, a delay between chunks, the chunk size, and a
fault after N text chunks (an ``error`` event, a reset connection, a stall, a
malformed event, or a stream that ends without its end marker).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

from aiohttp import web
from attrs import field, frozen

from .._validators import Validator, failure, integer, number, one_of
from ..exceptions import RecordValidationError
from ._fake_fields import (
    SIGNATURE,
    THOUGHT,
    choices_asked,
    openai_logprobs,
    openai_served_tier,
    thinking_asked,
)
from ._fake_wire import anthropic_usage

__all__ = ["STREAM_FAULTS", "StreamBehavior", "StreamedCall", "serve_stream", "split_text"]

STREAM_FAULTS: Final = frozenset({"error", "reset", "hang", "malformed", "incomplete"})
"""What `StreamBehavior.fault` may be."""

_WORDS: Final = re.compile(r"\s*\S+|\s+$")
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode


def split_text(text: str, chunk_chars: int | None = None) -> list[str]:
    """
    ``text`` in the pieces the fake streams: words with their leading space (as the
    real APIs' token-sized deltas look), or ``chunk_chars`` characters each.
    """
    if not text:
        return []
    if chunk_chars is not None:
        return [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    return _WORDS.findall(text) or [text]


_field_fail = failure(RecordValidationError)
_non_negative = number(_field_fail, low=0, why="must be a number of ms >= 0")


def _opt_count(minimum: int) -> Validator:
    return integer(
        _field_fail, low=minimum, optional=True, why=f"must be None or an integer >= {minimum}"
    )


_fault = one_of(
    _field_fail, STREAM_FAULTS, why=f"must be one of {', '.join(sorted(STREAM_FAULTS))}"
)


@frozen(kw_only=True)
class StreamBehavior:
    """
    How a model streams (requests with ``"stream": true``).

    Args:
        first_chunk_ms: after the response headers and the opening events, the wait
            before the first text chunk (the model's time to first token).
        chunk_interval_ms: the wait between text chunks.
        chunk_chars: characters per chunk (default: one word per chunk).
        fault_after: after this many text chunks, ``fault`` happens instead of the rest.
        fault: ``"error"`` (an ``error`` event: an ``overloaded_error`` in Anthropic's
            format, a ``server_error`` object in OpenAI's), ``"reset"`` (the connection
            is dropped), ``"hang"`` (nothing more is sent until the client gives up or
            the server stops), ``"malformed"`` (an event whose data is not JSON; in
            Anthropic's format a ``content_block_delta`` event),
            ``"incomplete"`` (the body ends without ``message_stop`` / ``[DONE]``).
    """

    first_chunk_ms: float = field(default=0.0, validator=_non_negative)
    chunk_interval_ms: float = field(default=0.0, validator=_non_negative)
    chunk_chars: int | None = field(default=None, validator=_opt_count(1))
    fault_after: int | None = field(default=None, validator=_opt_count(0))
    fault: Literal["error", "reset", "hang", "malformed", "incomplete"] = field(
        default="error", validator=_fault
    )


DEFAULT_STREAM: Final = StreamBehavior()


def _data(value: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {_ENCODE(value)}\n\n".encode()


StreamedCall = tuple[str, str, str]
"""A tool call to stream: (id, name, the arguments' JSON text)."""

_ARGUMENT_PIECE: Final = 8
"""Characters of a tool call's arguments per streamed piece (the real APIs send a few)."""


def _argument_pieces(arguments: str) -> list[str]:
    return [arguments[i : i + _ARGUMENT_PIECE] for i in range(0, len(arguments), _ARGUMENT_PIECE)]


_OPENAI_ERROR_EVENT: Final = _data(
    {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
)
"""The error event OpenAI sends when a stream fails mid-way."""


def _openai_events(
    model: str,
    number: int,
    pieces: list[str],
    input_tokens: int,
    output_tokens: int,
    truncated: bool,
    body: Mapping[str, Any],
    calls: list[StreamedCall] | None = None,
    stop_reason: str | None = None,
    scripted: Mapping[str, Any] | None = None,
) -> tuple[bytes, list[bytes], bytes, bytes]:
    """(opening, one event per piece, closing, the error event) for OpenAI's answer to
    ``body``; ``scripted``: the usage object to send instead of the counts
    (`FakeReply.usage`).  Every chunk names the service tier asked for (`openai_served_tier`)
    and carries each of the ``n`` choices asked for, alike (`choices_asked`)."""
    n = choices_asked(body)
    options = body.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    head: dict[str, Any] = {"id": f"chatcmpl-{number:024d}", "object": "chat.completion.chunk"}
    head |= {"created": int(time.time()), "model": model}
    if (tier := openai_served_tier(body)) is not None:
        head["service_tier"] = tier
    head["system_fingerprint"] = "fp_fake"

    def chunk(choices: list[Any], **extra: Any) -> bytes:
        return _data({**head, "choices": choices, **extra})

    def choice(
        delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None
    ) -> list[Any]:
        return [
            {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            for i in range(n)
        ]

    calls = calls or []
    # an answer that is only tool calls opens with "content": null, as the API's does
    opening = chunk(
        choice(
            {"role": "assistant", "content": "" if pieces or not calls else None, "refusal": None}
        )
    )
    # each piece with its logprobs when asked (`openai_logprobs`)
    chunks = [chunk(choice({"content": p}, None, openai_logprobs(body, p))) for p in pieces]
    for index, (call_id, name, arguments) in enumerate(calls):
        start = {"name": name, "arguments": ""}
        chunks.append(
            chunk(
                choice(
                    {
                        "tool_calls": [
                            {"index": index, "id": call_id, "type": "function", "function": start}
                        ]
                    }
                )
            )
        )
        chunks.extend(
            chunk(choice({"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
            for part in _argument_pieces(arguments)
        )
    reason = "length" if truncated else ("tool_calls" if calls else "stop")
    closing = chunk(choice({}, stop_reason or reason))
    if include_usage:
        usage = {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens * n,
            "total_tokens": input_tokens + output_tokens * n,
        }
        closing += chunk([], usage=usage if scripted is None else dict(scripted))
    closing += b"data: [DONE]\n\n"
    return opening, chunks, closing, _OPENAI_ERROR_EVENT


def _anthropic_tool_blocks(calls: list[StreamedCall], first: int) -> list[bytes]:
    """Each tool call's block events (start, argument deltas, stop), numbered from ``first``."""
    chunks: list[bytes] = []
    for offset, (call_id, name, arguments) in enumerate(calls):
        index = offset + first
        block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
        chunks.append(
            _data(
                {"type": "content_block_start", "index": index, "content_block": block},
                "content_block_start",
            )
        )
        chunks.extend(
            _data(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                },
                "content_block_delta",
            )
            for part in ["", *_argument_pieces(arguments)]
        )
        chunks.append(_data({"type": "content_block_stop", "index": index}, "content_block_stop"))
    return chunks


def _anthropic_thinking() -> bytes:
    """The events of a thinking block at index 0: its thought, then its signature."""
    start = {"type": "thinking", "thinking": "", "signature": ""}
    deltas = [
        {"type": "thinking_delta", "thinking": THOUGHT},
        {"type": "signature_delta", "signature": SIGNATURE},
    ]
    return (
        _data(
            {"type": "content_block_start", "index": 0, "content_block": start},
            "content_block_start",
        )
        + b"".join(
            _data({"type": "content_block_delta", "index": 0, "delta": d}, "content_block_delta")
            for d in deltas
        )
        + _data({"type": "content_block_stop", "index": 0}, "content_block_stop")
    )


def _anthropic_events(
    model: str,
    number: int,
    pieces: list[str],
    usage: tuple[int, int, tuple[int, int, int] | None],
    truncated: bool,
    calls: list[StreamedCall] | None = None,
    ending: tuple[str | None, str | None] = (None, None),
    scripted: Mapping[str, Any] | None = None,
    body: Mapping[str, Any] | None = None,
) -> tuple[bytes, list[bytes], bytes, bytes]:
    """
    (opening, one event per piece, closing, the error event) for Anthropic's answer to
    ``body``; ``usage``: the input and output tokens and the prompt cache's counts
    (`anthropic_usage`); ``ending``: the stop reason and stop sequence (None: the
    usual); ``scripted``: the usage object ``message_start`` and ``message_delta`` send
    instead (`FakeReply.usage`).  A request with extended thinking (`thinking_asked`)
    gets a thinking block first, the text and tool blocks numbered after it.
    """
    stop_reason, stop_sequence = ending
    first = 1 if body is not None and thinking_asked(body) else 0  # the text block's index
    input_tokens, output_tokens, cache = usage
    message: dict[str, Any] = {
        "id": f"msg_{number:024d}",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": anthropic_usage(input_tokens, 1, cache) if scripted is None else dict(scripted),
    }
    calls = calls or []
    text_block = bool(pieces) or not calls  # an answer of tool calls only has no text block
    opening = _data({"type": "message_start", "message": message}, "message_start")
    opening += _anthropic_thinking() if first else b""
    if text_block:
        block = {"type": "content_block_start", "index": first}
        block["content_block"] = {"type": "text", "text": ""}
        opening += _data(block, "content_block_start")
    opening += b'event: ping\ndata: {"type": "ping"}\n\n'
    chunks = [
        _data(
            {
                "type": "content_block_delta",
                "index": first,
                "delta": {"type": "text_delta", "text": piece},
            },
            "content_block_delta",
        )
        for piece in pieces
    ]
    text_stop = _data({"type": "content_block_stop", "index": first}, "content_block_stop")
    if calls and text_block:
        chunks.append(text_stop)
    chunks.extend(_anthropic_tool_blocks(calls, first=first + int(text_block)))
    reason = "max_tokens" if truncated else ("tool_use" if calls else "end_turn")
    closing = (
        (b"" if calls else text_stop)
        + _data(
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": stop_reason or reason,
                    "stop_sequence": stop_sequence,
                },
                "usage": {"output_tokens": output_tokens} if scripted is None else dict(scripted),
            },
            "message_delta",
        )
        + _data({"type": "message_stop"}, "message_stop")
    )
    error = _data(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"
    )
    return opening, chunks, closing, error


def _malformed(api: str, number: int) -> bytes:
    """
    A malformed event: its data is cut off mid-JSON (Anthropic's names its event, as its
    SDK skips an event without a name).
    """
    if api == "anthropic":
        return (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,"delta":{"ty\n\n'
        )
    return b'data: {"id":"chatcmpl-' + str(number).encode() + b'","object":"chat.comp\n\n'


async def serve_stream(
    request: web.Request,
    *,
    api: str,
    model: str,
    number: int,
    body: Mapping[str, Any],
    content: str,
    usage: tuple[int, int, tuple[int, int, int] | None],
    truncated: bool,
    behavior: StreamBehavior | None,
    closing: asyncio.Event,
    fault: str | None = None,
    calls: list[StreamedCall] | None = None,
    stop_reason: str | None = None,
    scripted: Mapping[str, Any] | None = None,
    stop_sequence: str | None = None,
) -> web.StreamResponse:
    """
    Answer ``request`` with the events of ``content`` and then ``calls`` (tool calls,
    their arguments in pieces) in ``api``'s format, with ``usage`` (the input and output
    tokens and the prompt cache's counts, see `anthropic_usage`; ``scripted``: the usage
    object sent instead, `FakeReply.usage`).  ``fault`` (one of
    `STREAM_FAULTS`) overrides the behaviour's, right after the opening events; a
    behaviour's ``fault_after`` counts every event after the opening ones.
    """
    behavior = DEFAULT_STREAM if behavior is None else behavior
    pieces = split_text(content, behavior.chunk_chars)
    if api == "anthropic":
        ending_as = (stop_reason, stop_sequence)
        opening, chunks, ending, error = _anthropic_events(
            model, number, pieces, usage, truncated, calls, ending_as, scripted, body
        )
        headers = {"request-id": f"req_{number:024d}"}
    else:
        given = (usage[0], usage[1], truncated, body, calls, stop_reason, scripted)
        opening, chunks, ending, error = _openai_events(model, number, pieces, *given)
        headers = {"x-request-id": f"req_{number:024d}"}
    malformed = _malformed(api, number)
    fault_after = behavior.fault_after
    what: str = behavior.fault
    if fault is not None:
        fault_after, what = 0, fault
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **headers,
        },
    )
    await response.prepare(request)
    try:
        await response.write(opening)
        if behavior.first_chunk_ms:
            await asyncio.sleep(behavior.first_chunk_ms / 1000)
        interval = behavior.chunk_interval_ms / 1000
        for sent, chunk in enumerate(chunks):
            if sent == fault_after:
                return await _fail(request, response, what, (error, malformed), closing)
            if sent and interval:
                await asyncio.sleep(interval)
            await response.write(chunk)
        if fault_after is not None and fault_after >= len(chunks):
            return await _fail(request, response, what, (error, malformed), closing)
        await response.write(ending)
        await response.write_eof()
    except ConnectionError:  # the client left (a normal end): nothing to log
        pass
    return response


async def _fail(
    request: web.Request,
    response: web.StreamResponse,
    fault: str,
    events: tuple[bytes, bytes],
    closing: asyncio.Event,
) -> web.StreamResponse:
    """Send ``fault``; ``events`` are the error event and the malformed one."""
    error, malformed = events
    if fault == "error":
        await response.write(error)
    elif fault == "malformed":
        await response.write(malformed)
    elif fault == "hang":
        await closing.wait()
    elif fault == "reset":
        if request.transport is not None:
            request.transport.close()
        return response
    # "incomplete" (and what follows an error event): the body ends, no end marker
    await response.write_eof()
    return response
