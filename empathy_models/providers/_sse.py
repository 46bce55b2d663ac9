"""
Server-Sent Events, read incrementally, and the two streaming wire formats on top.

`SSEDecoder` turns bytes, as they arrive in arbitrary pieces, into ``(event, data)``
pairs (the ``text/event-stream`` framing: ``event:`` and ``data:`` fields, a blank line
ends an event, ``:`` starts a comment; ``id:`` and ``retry:`` are ignored).  Its buffer
is bounded: a line (beyond a ``data: `` prefix) or an event longer than
``max_event_bytes`` raises `InvalidResponseError` instead of growing without limit.

`OpenAIStreamDecoder` reads Chat Completions chunks (``data: {...}`` with
``choices[0].delta.content``, the usage-only chunk that ``stream_options.include_usage``
adds before ``data: [DONE]``, and an ``{"error": ...}`` object sent mid-stream).
`AnthropicStreamDecoder` reads the Messages events (``message_start``,
``content_block_start`` / ``content_block_delta`` / ``content_block_stop``,
``message_delta``, ``message_stop``, ``ping``, and ``error`` mid-stream; a text block
opened with text, not empty, starts with that text, as the SDK reads it).  Both return
the text deltas (`str`) and tool-call pieces (`ToolCallDelta`: OpenAI's
``delta.tool_calls[]``, Anthropic's ``tool_use`` block start and ``input_json_delta``;
a server tool's block, ``server_tool_use`` or ``mcp_tool_use``, is no call: its input
is read and dropped) of each piece fed to them and keep the usage, stop reason, ids
and the tool calls seen so far; an ``error`` event raises the `ProviderError` its
type or code maps to (an ``overloaded_error`` is an `OverloadedError`, as a 529 would
be; a numeric code, as OpenRouter sends, is the HTTP status it names:
`error_from_object`).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeGuard

from ..content import ToolCallDelta
from ..exceptions import InvalidResponseError, ProviderError
from ._wire import (
    MAX_TOKEN_COUNT,
    _quote,
    _scrub,
    _Secrets,
    anthropic_usage_extras,
    error_from_object,
    json_text,
    openai_cached_tokens,
    shown_count,
    text_of_chunks,
    utf8_size,
    whole_count,
)

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "AnthropicStreamDecoder",
    "OpenAIStreamDecoder",
    "SSEDecoder",
    "StreamDecoder",
]

_JSON_MARKS: Final = re.compile(r'[][{}"\\]')
"""The characters that open or close a JSON value's nesting or string, and escapes."""


class _Nesting:
    """
    How far a tool call's argument pieces are read for the end of their JSON value: the
    pieces read, the brackets and braces left open, inside a string or not, and whether
    the last piece ended on a string's escaping backslash.  Each piece is read once, so
    telling whether a call is whole (`StreamDecoder._starts_call`) costs its new pieces
    only, not a parse of all its arguments at every piece.
    """

    __slots__ = ("depth", "escaped", "in_string", "read")

    def __init__(self) -> None:
        self.read = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def closed(self, parts: list[str]) -> bool:
        """Whether ``parts`` (the call's pieces, the ones read before first) leave no
        bracket, brace or string open."""
        for part in parts[self.read :]:
            self._take(part)
        self.read = len(parts)
        return self.depth == 0 and not self.in_string

    def _take(self, text: str) -> None:
        depth, in_string = self.depth, self.in_string
        skip = 0 if self.escaped else -1  # the index of a character a backslash escapes
        for mark in _JSON_MARKS.finditer(text):
            at = mark.start()
            if at == skip:
                continue
            char = mark.group()
            if in_string:
                if char == "\\":
                    skip = at + 1
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
        self.depth, self.in_string = depth, in_string
        self.escaped = skip == len(text)  # a backslash ended it (or an empty piece)


_scan: Final = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
"""``(value, end)`` of the JSON value at an index (the C scanner `json.loads` uses)."""

_SLIPS: Final = (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError)
"""What reading an odd event may raise beyond the checks: a malformed event, like the rest."""

_SERVER_TOOL_BLOCKS: Final = frozenset({"server_tool_use", "mcp_tool_use"})
"""Anthropic's blocks of a tool the API runs itself: input deltas follow, no call does."""

_CACHE_WRITES: Final = frozenset({"cache_write_tokens", "cache_write_1h_tokens"})
"""The two shares of an Anthropic cache write (5-minute and 1-hour), reported together."""

DEFAULT_MAX_EVENT_BYTES: Final = 1024 * 1024
"""The longest SSE line or event a decoder buffers (1 MiB; a chunk is well under 1 KiB)."""


class SSEDecoder:
    """
    Incremental ``text/event-stream`` parser: `feed` bytes, get complete events.

    Lines end with ``\\n`` or ``\\r\\n``.  An event without ``data``, or whose data is
    empty (a relay's ``data:`` keep-alive), is dropped (as the standard says); the
    event name defaults to ``"message"``.  An event whose data is longer than
    ``max_event_bytes``, or a line (finished or not) longer than that plus the six
    bytes of a ``data: `` prefix, raises `InvalidResponseError` (the buffer never
    grows past it), as does a line that is not UTF-8: the same whatever pieces the bytes
    arrive in.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_deferred",
        "_event",
        "_limit",
        "_model",
        "_provider",
        "_size",
    )

    def __init__(
        self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, provider: str = "", model: str = ""
    ) -> None:
        self._buffer = b""
        self._deferred: InvalidResponseError | None = None
        self._event: str | None = None
        self._data: list[str] | None = None
        self._size = 0
        self._limit = max_event_bytes
        self._provider = provider
        self._model = model

    def _error(self, why: str) -> InvalidResponseError:
        return InvalidResponseError(
            f"{self._provider}: invalid event stream: {why} [model {self._model}]",
            provider=self._provider,
            model=self._model,
            status=200,
        )

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished line or event are buffered."""
        return bool(self._buffer) or self._data is not None

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """
        The events completed by ``chunk`` (possibly none), in order.  A flaw raises
        `InvalidResponseError`, after the events completed before it (those are
        returned, and the error is raised by the next call).
        """
        deferred = self._deferred
        if deferred is not None:
            raise deferred
        events: list[tuple[str, str]] = []
        try:
            return self._feed(chunk, events)
        except InvalidResponseError as exc:
            if not events:
                raise
            self._deferred = exc
            return events

    def _feed(self, chunk: bytes, events: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not self._buffer and self._data is None and self._event is None:
            # nothing half-read: whole events of the plain shape go the short way
            cut = chunk.rfind(b"\n\n") + 2
            if cut > 1 and self._plain(chunk[:cut] if cut < len(chunk) else chunk, events):
                if cut == len(chunk):
                    return events
                chunk = chunk[cut:]
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        find = buffer.find
        # a line may hold the limit's bytes after a ``data: `` prefix (the event's bytes)
        longest = self._limit + 6
        while (end := find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > longest:
                self._buffer = b""
                self._data = None
                raise self._error(f"a line is longer than {self._limit:,} bytes")
            if not line:
                data = self._data
                # an event whose data is empty (a relay's ``data:`` keep-alive) is not
                # dispatched, as the standard says
                if data is not None and (len(data) > 1 or data[0]):
                    events.append((self._event or "message", "\n".join(data)))
                self._event = self._data = None
                self._size = 0
                continue
            if line[:1] == b":":
                continue  # a comment (a keep-alive)
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._size += len(value)
                if self._size > self._limit:
                    self._buffer = b""
                    self._data = None
                    raise self._error(f"an event is longer than {self._limit:,} bytes")
                try:
                    text = value.decode()
                except UnicodeDecodeError:
                    raise self._error("a line is not UTF-8") from None
                if self._data is None:
                    self._data = [text]
                else:
                    self._data.append(text)
            elif name == b"event":
                try:
                    self._event = value.decode()
                except UnicodeDecodeError:
                    raise self._error("a line is not UTF-8") from None
            # id:, retry: and unknown fields are ignored
        rest = buffer[start:] if start else buffer
        # an unfinished line is held to the same bound (its ``\r`` may be the line end's)
        if len(rest) - (rest[-1:] == b"\r") > longest:
            self._buffer = b""
            raise self._error(f"a line is longer than {self._limit:,} bytes")
        self._buffer = rest
        return events

    def _plain(self, whole: bytes, events: list[tuple[str, str]]) -> bool:
        """
        Add the events of ``whole`` (bytes that end with a blank line) to ``events`` and
        return True when every event in it has the plain shape the APIs send: one
        ``data: <value>`` line, after one ``event: <name>`` line or none, ``\\n`` line
        ends, UTF-8, within the size limit.  Otherwise add nothing and return False,
        for the general parser to read ``whole`` (and raise on a flaw).  The events are
        the ones the general parser gives for the same bytes.
        """
        if b"\r" in whole:
            return False
        parts = whole.split(b"\n\n")
        parts.pop()  # the empty piece after the last blank line
        limit = self._limit
        found: list[tuple[str, str]] = []
        try:
            for part in parts:
                if part[:6] == b"data: ":
                    name, value = "message", part[6:]
                elif part[:7] == b"event: ":
                    head, _, value = part.partition(b"\n")
                    if value[:6] != b"data: " or len(head) > limit + 6:
                        return False
                    name, value = head[7:].decode() or "message", value[6:]
                else:
                    return False
                if b"\n" in value or len(value) > limit:
                    return False
                if value:  # an empty ``data:`` is no event (see `_feed`)
                    found.append((name, value.decode()))
        except UnicodeDecodeError:
            return False
        events.extend(found)
        return True


class StreamDecoder:
    """
    A wire format's streamed answer, decoded as it arrives.

    `feed` returns the non-empty text deltas completed by a piece of the body (a
    failure after some of them waits in ``error``); the decoder keeps ``input_tokens``
    / ``output_tokens`` (None until reported), the prompt-cache and web-search counts
    (``cache_write_tokens``, ``cache_write_1h_tokens``, ``cache_read_tokens``,
    ``web_search_requests``, ``cached_input_tokens``: 0 until reported),
    ``stop_reason``, ``response_id`` and ``finished`` (the format's end marker seen),
    and the output the model wrote that the stream carries but yields no delta for
    (``unseen_bytes``, its UTF-8 bytes, in ``unseen_pieces`` pieces): its reasoning
    (Anthropic's ``thinking_delta``, an OpenAI-compatible server's ``reasoning_content``
    or ``reasoning``), a refusal's text, a server tool's input, which the provider bills
    as output tokens and the estimate of a stream that does not finish counts.
    """

    __slots__ = (
        "_calls",
        "_model",
        "_nestings",
        "_pos",
        "_provider",
        "_queue",
        "_raw",
        "_reason_seen",
        "_secret",
        "_slots",
        "_sse",
        "_started",
        "cache_read_tokens",
        "cache_write_1h_tokens",
        "cache_write_tokens",
        "cached_input_tokens",
        "error",
        "finished",
        "input_tokens",
        "output_tokens",
        "response_id",
        "response_model",
        "service_tier",
        "stop_reason",
        "unseen_bytes",
        "unseen_pieces",
        "web_search_requests",
    )

    api: ClassVar[str] = ""

    def __init__(
        self,
        *,
        provider: str,
        model: str,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        secret: _Secrets | None = None,
    ) -> None:
        self._sse = SSEDecoder(max_event_bytes=max_event_bytes, provider=provider, model=model)
        self._secret = secret  # the provider's secrets: scrubbed from every message
        self._provider = provider
        self._model = model
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.cache_write_tokens = 0
        self.cache_write_1h_tokens = 0
        self.cache_read_tokens = 0
        self.web_search_requests = 0
        self.cached_input_tokens = 0
        self.stop_reason: str | None = None
        self.response_id: str | None = None
        self.response_model: object = None  # the model id the stream reported, as sent
        self.service_tier: str | None = None  # the tier the stream said served it
        self.finished = False
        self.error: ProviderError | None = None
        self.unseen_bytes = 0
        self.unseen_pieces = 0
        self._queue: deque[tuple[str, str]] = deque()  # events framed, not yet decoded
        self._raw = b""  # bytes pushed and not yet framed, from ``_pos`` on
        self._started = False  # a delta was decoded: decode eagerly from then on
        self._pos = 0
        self._reason_seen = False  # a finish reason came (OpenAI: `whole_at_eof`)
        self._calls: list[tuple[str | None, str | None, list[str]]] = []
        self._slots: dict[int, int] = {}  # the wire's index of a call -> its place in _calls
        self._nestings: dict[int, _Nesting] = {}  # a call's place -> its pieces' nesting

    @property
    def whole_at_eof(self) -> bool:
        """
        Whether the answer is whole if the body ends now, without the format's end
        marker: for OpenAI-compatible servers that send no ``data: [DONE]`` (older
        llama.cpp servers, text-generation-webui), once a finish reason came; never for
        Anthropic's ``message_stop``.
        """
        return self._reason_seen

    @property
    def has_tool_calls(self) -> bool:
        """Whether a tool-call piece was decoded (else every delta so far is text)."""
        return bool(self._calls)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls so far, as Chat Completions ``tool_calls`` (arguments as text)."""
        return [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": "".join(parts)},
            }
            for call_id, name, parts in self._calls
        ]

    def _call_piece(
        self,
        wire_index: int,
        call_id: str | None,
        name: str | None,
        arguments: str,
        *,
        name_in_pieces: bool = False,
        starts: bool = False,
    ) -> ToolCallDelta:
        """
        Keep one piece of a tool call; the delta that shows it.  With ``name_in_pieces``
        the pieces' names are joined, as their arguments are (OpenAI-compatible servers
        may split a name; the openai SDK's stream accumulator joins them too), except a
        name equal to the call's so far, which a server sent again; else the first name
        stays.  A piece at a known index is its call's, whatever id it carries (a server
        may send the id again, or a fresh one, with every piece: the first id stays),
        unless `_starts_call` says it starts another (Gemini's OpenAI-compatible stream
        gives parallel calls the same index, 0 or none, with ids of their own or empty
        ones).  A piece that ``starts`` a call (Anthropic's ``tool_use`` block start) is
        always a new one.  The delta carries the id and name as `ToolCallDelta` says:
        the id on the piece that gave the call its id, a name on the pieces that added
        to it.
        """
        index = None if starts else self._slots.get(wire_index)
        if index is not None and self._starts_call(index, call_id, name, arguments):
            index = None  # another call at the same index
        if index is None:
            index = self._slots[wire_index] = len(self._calls)
            self._calls.append((call_id, name, [arguments]))
            return ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments)
        known_id, known_name, parts = self._calls[index]
        parts.append(arguments)
        if not name or name == known_name or not (name_in_pieces or not known_name):
            name = None  # none, sent again, or not joined (Anthropic's first name stays)
        new_id = call_id if call_id and not known_id else None
        if new_id or name:
            self._calls[index] = (known_id or new_id, (known_name or "") + (name or ""), parts)
        return ToolCallDelta(index=index, id=new_id, name=name, arguments=arguments)

    def _starts_call(
        self, index: int, call_id: str | None, name: str | None, arguments: str
    ) -> bool:
        """
        Whether a piece at the wire index of the call at ``index`` (in ``_calls``)
        starts a new call: when that call's arguments are a whole JSON object already
        (no piece can add to them) and the piece brings a function's name, or another
        id than the call's, with arguments or a name of its own.  Otherwise it is the
        same call's: its arguments go on, whatever id or name the server sent again.
        """
        known_id, _, parts = self._calls[index]
        other_id = bool(call_id) and known_id not in (None, call_id)
        if not (name or other_id) or not (arguments.strip() or (other_id and name)):
            return False
        last = next((part for part in reversed(parts) if part.strip()), "")
        if not last.rstrip().endswith("}"):  # the cheap test first: no object ends here
            return False
        nesting = self._nestings.get(index)
        if nesting is None:
            nesting = self._nestings[index] = _Nesting()
        if not nesting.closed(parts):  # each piece read once: no parse of every prefix
            return False
        try:
            return isinstance(json.loads("".join(parts)), dict)
        except (ValueError, RecursionError):
            return False

    @staticmethod
    def prepare(payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` (a non-streamed request body) turned into the streamed request."""
        payload["stream"] = True
        return payload

    def feed(self, chunk: bytes) -> list[str | ToolCallDelta]:
        """
        The text deltas and tool-call pieces completed by ``chunk``.  A failure (an
        ``error`` event, a malformed event) raises at once when no delta came before it
        in ``chunk``; otherwise those deltas are returned and the failure is kept in
        ``error``, for the reader to raise once it has delivered them.
        """
        self.push(chunk)
        out: list[str | ToolCallDelta] = []
        while self.queued and self.error is None:
            try:
                out.extend(self.more())
            except ProviderError as exc:
                if not out:
                    raise
                self.error = exc  # raised by the reader once the deltas are delivered
        return out

    def push(self, chunk: bytes) -> None:
        """Keep ``chunk`` for `more`, which frames and decodes its events as it goes."""
        if self._pos < len(self._raw):
            self._raw = self._raw[self._pos :] + chunk
        else:
            self._raw = chunk
        self._pos = 0

    @property
    def queued(self) -> bool:
        """True when bytes or events from `push` wait for `more`."""
        return bool(self._queue) or self._pos < len(self._raw)

    def _frame_next(self, rest: bool) -> None:
        """Frame the next event of the pushed bytes (all the rest: ``rest``, or none ends)."""
        raw, pos = self._raw, self._pos
        end = -1 if rest else raw.find(b"\n\n", pos)
        if end < 0:  # no event ends here (or CRLF line ends): the rest, as it is
            piece = raw[pos:] if pos else raw
            self._raw, self._pos = b"", 0
        else:
            piece = raw[pos : end + 2]
            self._pos = end + 2
        self._queue.extend(self._sse.feed(piece))

    def more(self) -> list[str | ToolCallDelta]:
        """
        The deltas of the events pushed so far.  Until the first delta, events are
        framed and decoded one at a time and the first that yields something is
        returned (the first delta of a body that arrived whole costs one event's
        decoding, not the body's); after it, everything pushed is decoded at once.
        Empty when nothing yields a delta.  A failure raises, or, after deltas, is
        kept in ``error``.
        """
        out: list[str | ToolCallDelta] = []
        queue = self._queue
        eager = self._started
        if eager and not queue:
            # after the first delta: everything pushed, framed and decoded in one pass
            raw, pos = self._raw, self._pos
            if pos >= len(raw):
                return out
            self._raw, self._pos = b"", 0
            handle = self._event
            for event, data in self._sse.feed(raw[pos:] if pos else raw):
                try:
                    handle(event, data, out)
                except (ProviderError, *_SLIPS) as exc:
                    error = self._failure(exc)
                    if not out:
                        raise error from None
                    self.error = error  # the events after it are dropped, as below
                    break
            return out
        while eager or not out:
            if not queue:
                if self._pos >= len(self._raw):
                    break
                self._frame_next(eager)
                continue
            event, data = queue.popleft()
            try:
                self._event(event, data, out)
            except (ProviderError, *_SLIPS) as exc:
                queue.clear()
                self._raw, self._pos = b"", 0
                error = self._failure(exc)
                if not out:
                    raise error from None
                self.error = error
                break
        if out:
            self._started = True
        return out

    def _event(self, event: str, data: str, out: list[str | ToolCallDelta]) -> None:
        raise NotImplementedError

    def _unseen(self, text: object) -> None:
        """Count ``text``, output the model wrote that yields no delta (`unseen_bytes`)."""
        if isinstance(text, str) and text:
            self.unseen_bytes += utf8_size(text)
            self.unseen_pieces += 1

    def _failure(self, exc: Exception) -> ProviderError:
        """
        The error for what `_event` raised: its own `ProviderError`, or, for a slip on a
        shape no check foresaw (a ``TypeError`` of an odd value, nesting too deep), the
        `InvalidResponseError` of a malformed event.
        """
        if isinstance(exc, ProviderError):
            return exc
        return self._invalid(f"an event could not be read ({type(exc).__name__})")

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            # the C scanner alone, when it reads exactly ``data``: what `json.loads` gives
            # without its two Python frames and whitespace matches; anything else (spaces
            # around, extra data, not JSON) is left to `json.loads` to read or refuse
            value, end = _scan(data, 0)
        except (StopIteration, ValueError, RecursionError):
            end = -1
        if end != len(data):
            try:
                value = json.loads(data)
            except (ValueError, RecursionError):
                shown = _quote(data, 40, self._secret)
                raise self._invalid(f"an event's data is not JSON (starts {shown!r})") from None
        if not isinstance(value, dict):
            raise self._invalid(f"an event's data is a {type(value).__name__}, not an object")
        return value

    def _invalid(self, why: str) -> InvalidResponseError:
        return InvalidResponseError(
            f"{self._provider}: invalid event stream: {_scrub(why, self._secret)} "
            f"[model {self._model}]",
            provider=self._provider,
            model=self._model,
            status=200,
        )

    def _stream_error(self, error: object) -> ProviderError:
        """The error for an ``error`` object sent in the stream (`error_from_object`)."""
        return error_from_object(
            error,
            provider=self._provider,
            model=self._model,
            where="error event in the stream",
            secret=self._secret,
        )

    def _tokens(self, usage: Mapping[str, Any], key: str) -> int | None:
        # a whole number sent as a JSON float (10.0) counts as that integer
        value = whole_count(usage.get(key))
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            if _index(value):
                shown = shown_count(value)
            else:
                shown = repr(value) if _scalar(value) else f"a JSON {type(value).__name__}"
            raise self._invalid(f"usage.{key} must be an integer >= 0, got {shown}")
        if value > MAX_TOKEN_COUNT:  # no real count: what a record cannot hold
            raise self._invalid(f"usage.{key} must be < 2**63, got {shown_count(value)}")
        return value

    @property
    def sse_pending(self) -> bool:
        """True when a partial SSE line or event is buffered."""
        return self._sse.pending


def _scalar(value: object) -> bool:
    """Whether ``value`` is a JSON string or number (safe to show and to compare)."""
    return isinstance(value, str | int | float)


def _index(value: object) -> TypeGuard[int]:
    """Whether ``value`` can be a call's or block's index: an integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


class OpenAIStreamDecoder(StreamDecoder):
    """OpenAI Chat Completions chunks (``choices[0].delta.content``; usage before [DONE])."""

    __slots__ = ()
    api = "openai"

    @staticmethod
    def prepare(payload: dict[str, Any]) -> dict[str, Any]:
        payload["stream"] = True
        # the usage chunk asked for, beside any other option extra_body gave; its
        # ``"stream_options": None`` sends none, for a server that refuses the field
        # (Mistral's API answers 422; it sends the usage in its last chunk unasked)
        options = payload.get("stream_options", {})
        if options is None:
            del payload["stream_options"]
            return payload
        given = options if isinstance(options, dict) else {}
        payload["stream_options"] = {**given, "include_usage": True}
        return payload

    def _event(self, event: str, data: str, out: list[str | ToolCallDelta]) -> None:
        if data == "[DONE]":
            self.finished = True
            return
        if data.isspace():  # a keep-alive of blanks: no chunk
            return
        chunk = self._decode(data)
        if "error" in chunk and chunk["error"] is not None:
            raise self._stream_error(chunk["error"])
        # the first chunk that names them (Azure's opening chunk, the prompt filter's
        # results, has an empty id and model)
        if self.response_id is None and isinstance(chunk.get("id"), str) and chunk["id"]:
            self.response_id = chunk["id"]
        if self.response_model is None and chunk.get("model"):
            self.response_model = chunk["model"]
        choices = chunk.get("choices")
        if choices:
            if not isinstance(choices, list):
                raise self._invalid("chunk.choices must be a list")
            for choice in choices:
                if not isinstance(choice, dict):
                    raise self._invalid("chunk.choices[] must be objects")
                if choice.get("index", 0) != 0:
                    continue  # only the first choice is read, as for a whole response
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if content:
                        if not isinstance(content, str):
                            content = self._chunks_text(content)
                        if content:
                            out.append(content)
                    elif delta.get("refusal"):
                        self.stop_reason = "refusal"
                        self._unseen(delta["refusal"])
                    else:  # reasoning (vLLM, DeepSeek: reasoning_content; OpenRouter: reasoning)
                        self._unseen(delta.get("reasoning_content") or delta.get("reasoning"))
                    calls = delta.get("tool_calls")
                    if calls:
                        self._openai_calls(calls, out)
                reason = choice.get("finish_reason")
                if isinstance(reason, str):
                    self._reason_seen = True
                    if self.stop_reason != "refusal":
                        self.stop_reason = reason
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            # the tier that served the call, which prices it (every chunk names it: read
            # with the usage only, off the path of the text's chunks)
            tier = chunk.get("service_tier")
            if isinstance(tier, str):
                self.service_tier = tier
            # a count a later usage chunk leaves out keeps the one reported before it
            given = self._tokens(usage, "prompt_tokens")
            if given is not None:
                self.input_tokens = given
            given = self._tokens(usage, "completion_tokens")
            if given is not None:
                self.output_tokens = given
            if isinstance(usage.get("prompt_tokens_details"), dict):
                self.cached_input_tokens = openai_cached_tokens(
                    usage, lambda data, key, _: self._tokens(data, key), ""
                )

    def _chunks_text(self, content: object) -> str:
        """
        A delta's ``content`` that is no string: a list of chunks' text
        (`text_of_chunks`); its ``thinking`` chunks' text (Mistral's reasoning, a list
        of text chunks) counted as output that yields no delta (`unseen_bytes`).
        """
        if not isinstance(content, list) or (text := text_of_chunks(content)) is None:
            raise self._invalid(
                "chunk.choices[0].delta.content must be a string or a list of content chunks"
            )
        for chunk in content:  # objects all (`text_of_chunks` read them)
            if chunk.get("type") == "thinking":
                thought = chunk.get("thinking")
                self._unseen(text_of_chunks(thought) if isinstance(thought, list) else thought)
        return text

    def _openai_calls(self, calls: object, out: list[str | ToolCallDelta]) -> None:
        """``delta.tool_calls``: the first piece of a call has its id and name."""
        if not isinstance(calls, list):
            raise self._invalid("chunk.choices[0].delta.tool_calls must be a list")
        for call in calls:
            if not isinstance(call, dict) or not _index(call.get("index", 0)):
                raise self._invalid("delta.tool_calls[] must be objects with an integer index")
            function = call.get("function") or {}
            if not isinstance(function, dict):
                raise self._invalid("delta.tool_calls[].function must be an object")
            call_id, name, arguments = (
                call.get("id"),
                function.get("name"),
                function.get("arguments"),
            )
            if not isinstance(call_id, str | None) or not isinstance(name, str | None):
                raise self._invalid("delta.tool_calls[] id and function.name must be strings")
            if not isinstance(arguments, str | None):
                raise self._invalid("delta.tool_calls[].function.arguments must be a string")
            out.append(
                self._call_piece(
                    call.get("index", 0), call_id, name, arguments or "", name_in_pieces=True
                )
            )


class AnthropicStreamDecoder(StreamDecoder):
    """
    Anthropic Messages events (``content_block_delta`` text; usage in start and delta).

    A ``tool_use`` block is a tool call; a server tool's block (``server_tool_use``,
    ``mcp_tool_use``: the API runs the tool itself) is not one the caller answers, so
    its ``input_json_delta`` pieces are read and dropped, as a whole answer drops the
    block.
    """

    __slots__ = ("_server_blocks",)
    api = "anthropic"

    def __init__(
        self,
        *,
        provider: str,
        model: str,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        secret: _Secrets | None = None,
    ) -> None:
        super().__init__(
            provider=provider, model=model, max_event_bytes=max_event_bytes, secret=secret
        )
        self._server_blocks: set[int] = set()  # the wire's indexes of server tool blocks

    def _event(self, event: str, data: str, out: list[str | ToolCallDelta]) -> None:
        if event == "ping" or data.isspace():  # keep-alives
            return
        body = self._decode(data)
        kind = body.get("type", event)
        if kind == "content_block_delta":
            delta = body.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if not isinstance(text, str):
                    raise self._invalid("content_block_delta.delta.text must be a string")
                if text:
                    out.append(text)
            elif isinstance(delta, dict) and delta.get("type") == "input_json_delta":
                partial = delta.get("partial_json")
                block = body.get("index")
                if (
                    not isinstance(partial, str)
                    or not _index(block)
                    or (block not in self._slots and block not in self._server_blocks)
                ):
                    raise self._invalid(
                        "input_json_delta needs partial_json (a string) and the index of a "
                        "tool_use or server tool block started before it"
                    )
                if block in self._slots:
                    if partial:
                        out.append(self._call_piece(block, None, None, partial))
                else:  # a server tool's input: no call, but output all the same
                    self._unseen(partial)
            elif isinstance(delta, dict) and delta.get("type") == "thinking_delta":
                self._unseen(delta.get("thinking"))
        elif kind == "content_block_start":
            self._block_start(body, out)
        elif kind == "message_start":
            message = body.get("message")
            if not isinstance(message, dict):
                raise self._invalid("message_start.message must be an object")
            if isinstance(message.get("id"), str):
                self.response_id = message["id"]
            self.response_model = message.get("model")
            usage = message.get("usage")
            if isinstance(usage, dict):
                self.input_tokens = self._tokens(usage, "input_tokens")
                self.output_tokens = self._tokens(usage, "output_tokens")
                self._extras(usage)
                if isinstance(usage.get("service_tier"), str):
                    self.service_tier = usage["service_tier"]
        elif kind == "message_delta":
            delta = body.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
            usage = body.get("usage")
            if isinstance(usage, dict):
                # message_delta's counts are cumulative, the prompt's never below
                # message_start's: a 0 for them is a count the server gave only there
                # (SGLang and gateways send ``input_tokens: 0``), which it keeps
                output = self._tokens(usage, "output_tokens")
                if output is not None:
                    self.output_tokens = output
                given = self._tokens(usage, "input_tokens")
                if given:
                    self.input_tokens = given
                self._extras(usage, later=True)
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            raise self._stream_error(body.get("error"))
        # content_block_stop and new event types carry nothing to keep

    def _extras(self, usage: dict[str, Any], *, later: bool = False) -> None:
        """
        The cache and web-search counts ``usage`` reports (cumulative: they replace).
        A cache write's count without its split by TTL (``message_delta`` sends none:
        ``message_start`` does) keeps the 1-hour share reported before it.  ``later``
        (``message_delta``): a count of 0 keeps the one reported before it (a cache
        write's split goes with its total).
        """
        found = anthropic_usage_extras(usage, lambda data, key, _: self._tokens(data, key), "")
        if "cache_write_tokens" in found and not isinstance(usage.get("cache_creation"), dict):
            written = found["cache_write_tokens"]  # all of it, with no split given
            hour = min(self.cache_write_1h_tokens, written)
            found["cache_write_tokens"], found["cache_write_1h_tokens"] = written - hour, hour
        if later:
            written = found.get("cache_write_tokens", 0) + found.get("cache_write_1h_tokens", 0)
            found = {
                name: value
                for name, value in found.items()
                if value or (written and name in _CACHE_WRITES)
            }
        for name, value in found.items():
            setattr(self, name, value)

    def _block_start(self, body: dict[str, Any], out: list[str | ToolCallDelta]) -> None:
        """
        ``content_block_start``: a ``tool_use`` block starts a call, a server tool's
        block is remembered (its input pieces are dropped), a text block opened with
        text already (a proxy's shape; the API opens it empty) gives that text as a
        delta, as the official SDK keeps it; any other carries nothing.
        """
        block = body.get("content_block")
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(block, dict) and kind == "text":
            text = block.get("text")
            if text:
                if not isinstance(text, str):
                    raise self._invalid("a text block's text must be a string")
                out.append(text)
        elif kind in _SERVER_TOOL_BLOCKS:
            index = body.get("index")
            if not _index(index):
                raise self._invalid("content_block_start.index must be an integer")
            self._server_blocks.add(index)
        elif isinstance(block, dict) and kind == "tool_use":
            call_id, name, index = block.get("id"), block.get("name"), body.get("index")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise self._invalid("a tool_use block needs an id and a name (strings)")
            if not _index(index):
                raise self._invalid("content_block_start.index must be an integer")
            given = block.get("input", {})
            if not isinstance(given, dict):
                raise self._invalid("a tool_use block's input must be an object")
            # the input arrives as input_json_delta pieces; a non-empty one given
            # here whole (a server that does not stream it) is kept as its text
            start = json_text(given) if given else ""
            out.append(self._call_piece(index, call_id, name, start, starts=True))
