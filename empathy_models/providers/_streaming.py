"""
Streamed requests for the HTTP providers: the POST with ``"stream": true``, the
timeouts, and the `CompletionStream` that reads the Server-Sent Events as they arrive.

The idle timeout is aiohttp's ``sock_read``: it bounds the wait for the response and
every gap between received chunks (it pauses while the caller is not reading and the
transport is paused, so a slow reader is not a stalled server); the total timeout is
aiohttp's ``total``, which covers the body too.  Both raise `ProviderTimeoutError`.
Errors are mapped exactly as for a whole response (`error_from_response`,
`error_from_transport`); an ``error`` event inside the stream maps like the status its
type stands for.  The answer is complete at its format's end marker (``data: [DONE]``,
``message_stop``), as the official SDKs read it: a body still open after it is waited
for a moment at most (`_EOF_GRACE`), and its stall or failure then is no failure of
the answer.  The connection goes back to the pool when the body ended, and is closed
when it did not, or the stream is left early or fails.

The body is read up to the provider's ``max_stream_bytes`` (every byte of it, keep-alives
included): a stream that goes on past it, an endless answer or a relay's keep-alives
for ever, ends with `InvalidResponseError`, and the connection is closed.  One event may
be as long as the provider's ``max_response_bytes`` (a whole answer sent as one event
reads as it reads unstreamed), within that bound.

The stream reads the network only when its caller asks for pieces, so it notes when
the answer arrived as the bytes come (`HTTPCompletionStream.ended_at`), for the
attempt's latency; and, until the provider reports the output tokens, it estimates them
from the pieces' size (`HTTPCompletionStream._estimate`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import aiohttp
import attrs

from .._propagation import outgoing_headers
from ..abc import Completion, CompletionRequest, CompletionStream, whole_answer_pieces
from ..content import ToolCall, ToolCallDelta
from ..exceptions import (
    EmpathyModelsError,
    InvalidResponseError,
    ProviderError,
    ProviderTimeoutError,
)
from ._convert import openai_tool_calls
from ._sse import StreamDecoder
from ._wire import (
    _ENCODER,
    ResponseReader,
    _snippet,
    _without_request,
    error_from_response,
    error_from_transport,
    estimated_output_tokens,
    own_timeout,
    parse_ratelimit_reset,
    read_bounded,
    reported_model,
    utf8_size,
)

if TYPE_CHECKING:
    from ._http import HTTPProvider

__all__ = ["HTTPCompletionStream", "open_http_stream"]

_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError)

_HEAD_BYTES: Final = 4096
"""The body's first bytes a stream keeps, to quote when no piece came (`_what_came`)."""

_EOF_GRACE: Final = 0.05
"""Seconds a stream waits for the body's end after its end marker (`_await_eof`)."""


def _timeout_error(
    provider: str,
    model: str,
    idle: float | None,
    total: float | None,
    exc: BaseException,
    own_idle: bool = False,
) -> ProviderTimeoutError:
    """
    The error of a stream's timeout ``exc``; ``own_idle``: the idle timeout is the
    provider's own (shorter than the one asked for), which the error then names and is
    marked with (`own_timeout`), unless the total timeout ran out.
    """
    if isinstance(exc, aiohttp.SocketTimeoutError) and idle is not None:
        limit = "the provider's own timeout, an idle timeout" if own_idle else "idle timeout"
        why = f"no data for {idle:.3f}s ({limit})"
    elif total is not None:
        why = f"the stream took longer than {total:.3f}s (total timeout)"
        own_idle = False
    else:
        why = f"timed out ({type(exc).__name__})"
    error = ProviderTimeoutError(
        f"{provider}: {why} [model {model}]", provider=provider, model=model
    )
    return own_timeout(error) if own_idle else error


def _stream_headers(provider: HTTPProvider) -> dict[str, str]:
    cached: dict[str, str] | None = getattr(provider, "_sse_headers", None)
    if cached is None:
        cached = {
            name: value
            for name, value in provider._request_headers().items()
            if name.lower() != "accept"
        }
        cached["accept"] = "text/event-stream"
        provider._sse_headers = cached  # type: ignore[attr-defined]
    return cached


def _client_timeout(
    provider: HTTPProvider, idle: float | None, total: float | None
) -> aiohttp.ClientTimeout:
    if total is None:  # the common case (no deadline): one object per idle timeout
        cache: dict[float | None, aiohttp.ClientTimeout] | None = getattr(
            provider, "_sse_timeouts", None
        )
        if cache is None:
            cache = provider._sse_timeouts = {}  # type: ignore[attr-defined]
        cached = cache.get(idle)
        if cached is None:
            if len(cache) > 64:
                cache.clear()
            cached = cache[idle] = _new_client_timeout(provider, idle, None)
        return cached
    return _new_client_timeout(provider, idle, total)


def _new_client_timeout(
    provider: HTTPProvider, idle: float | None, total: float | None
) -> aiohttp.ClientTimeout:
    own = provider._timeout
    # the idle timeout bounds the wait for a connection too (a host whose packets are
    # dropped, a DNS lookup that stalls): ``sock_read`` starts once the request is sent
    connect = own.connect if idle is None or (own.connect or math.inf) <= idle else idle
    return aiohttp.ClientTimeout(
        total=total,
        connect=connect,
        sock_connect=own.sock_connect,
        sock_read=idle,
        ceil_threshold=math.inf,  # keep short budgets exact (aiohttp rounds long ones up)
    )


def _idle_limit(provider: HTTPProvider, asked: float | None) -> tuple[float | None, bool]:
    """
    A stream's idle timeout: the one ``asked`` for, or the provider's own timeout (its
    total or read timeout, the shorter) when that is shorter or none was asked for, as
    it bounds `HTTPProvider.complete`; and whether it is the provider's own.
    """
    own = provider._idle_default
    if own is not None and (asked is None or own < asked):
        return own, True
    return asked, False


async def open_http_stream(
    provider: HTTPProvider,
    request: CompletionRequest,
    decoder_class: type[StreamDecoder],
    *,
    idle_timeout: float | None,
    total_timeout: float | None,
) -> CompletionStream:
    """POST ``request`` with ``"stream": true``; the open stream (idle: `_idle_limit`)."""
    model, name = request.model, provider.name
    idle_timeout, own_idle = _idle_limit(provider, idle_timeout)
    if not provider.has_api_key:
        raise provider._missing_key(model)
    session = provider._session()
    payload = _ENCODER.encode(decoder_class.prepare(provider._payload(request))).encode()
    headers = _stream_headers(provider)
    trace_headers = outgoing_headers.get()  # the attempt span's traceparent, when traced
    if trace_headers is not None:
        headers = {**headers, **trace_headers}
    try:
        response = await session.post(
            provider._url,
            data=payload,
            headers=headers,
            timeout=_client_timeout(provider, idle_timeout, total_timeout),
            allow_redirects=False,  # a redirect would carry the key elsewhere
            proxy=provider._proxy[0],
            proxy_auth=provider._proxy[1],
        )
    except TimeoutError as exc:
        raise _timeout_error(name, model, idle_timeout, total_timeout, exc, own_idle) from None
    except aiohttp.InvalidURL as exc:  # a ClientError too, but nothing was sent
        raise provider._not_built(exc, model) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise error_from_transport(  # its context: aiohttp's error, without the headers
            _without_request(exc), provider=name, model=model, secret=provider._redacted
        ) from None
    except (ValueError, TypeError) as exc:  # aiohttp refused to build the request
        if isinstance(exc, EmpathyModelsError):
            raise
        raise provider._not_built(exc, model) from None
    try:
        status = response.status
        if not 200 <= status < 300 or response.content_type == "application/json":
            # an error, or a server that ignored "stream": true and sent a whole body
            return await _whole_answer(provider, response, request)
        decoder = _decoder(provider, decoder_class, model)
        return HTTPCompletionStream(
            response,
            decoder,
            provider=name,
            model=model,
            request_id=response.headers.get("x-request-id") or response.headers.get("request-id"),
            headers=response.headers,
            idle_timeout=idle_timeout,
            total_timeout=total_timeout,
            own_idle=own_idle,
            max_bytes=provider._max_stream,
        )
    except ProviderError:
        # mapped already, exactly as for a whole response: a 401 (a PermissionError,
        # so an OSError) or a 408 (a TimeoutError) must not be restated below
        response.close()
        raise
    except TimeoutError as exc:
        response.close()
        raise _timeout_error(name, model, idle_timeout, total_timeout, exc, own_idle) from None
    except (aiohttp.ClientError, OSError) as exc:
        response.close()
        raise error_from_transport(  # a whole body cut short keeps its status
            _without_request(exc),
            provider=name,
            model=model,
            secret=provider._redacted,
            status=response.status,
            headers=response.headers,
        ) from None
    except BaseException:
        response.close()
        raise


def _decoder(
    provider: HTTPProvider, decoder_class: type[StreamDecoder], model: str
) -> StreamDecoder:
    """
    The stream's decoder: an event may be as long as a whole answer may be (a gateway
    that buffers the answer sends it as one event), within the stream's own bound.
    """
    longest = min(provider._max_body, provider._max_stream)
    return decoder_class(
        provider=provider.name, model=model, secret=provider._redacted, max_event_bytes=longest
    )


async def _whole_answer(
    provider: HTTPProvider, response: aiohttp.ClientResponse, request: CompletionRequest
) -> CompletionStream:
    """
    The answer to a streamed request that came as a whole body: an error status raises
    `error_from_response`'s error, a 2xx JSON body is served as its pieces.
    """
    status, model, secret = response.status, request.model, provider._redacted
    body = await read_bounded(response, provider._max_body, provider.name, model)
    response.release()
    if not 200 <= status < 300:
        raise error_from_response(
            status, body, response.headers, provider=provider.name, model=model, secret=secret
        )
    reader = ResponseReader(provider=provider.name, model=model, status=status, secret=secret)
    completion = provider._parse_checked(reader, reader.decode(body), request, response.headers)
    exhausted = parse_ratelimit_reset(response.headers)
    if exhausted is not None:
        completion = attrs.evolve(completion, rate_limit_reset=exhausted)
    return _WholeBody(completion)


class _WholeBody(CompletionStream):
    """A whole JSON answer to a streamed request, served as its pieces."""

    def __init__(self, completion: Completion) -> None:
        self._completion = completion
        self._pieces = deque(whole_answer_pieces(completion))
        self._ended_at = time.perf_counter()  # the body was read whole

    async def __anext__(self) -> str | ToolCallDelta:
        if not self._pieces:
            raise StopAsyncIteration
        return self._pieces.popleft()

    async def aclose(self) -> None:
        self._pieces.clear()

    @property
    def finished(self) -> bool:
        return not self._pieces

    @property
    def ended_at(self) -> float:
        return self._ended_at

    def completion(self) -> Completion:
        return self._completion


class HTTPCompletionStream(CompletionStream):
    """The text deltas and tool-call pieces of one streamed HTTP answer, as they arrive."""

    __slots__ = (
        "_closed",
        "_decoder",
        "_deltas",
        "_eof_at",
        "_failed",
        "_head",
        "_idle",
        "_left",
        "_limit",
        "_marker_at",
        "_model",
        "_opened_at",
        "_own_idle",
        "_parts",
        "_pending",
        "_provider",
        "_read",
        "_read_at",
        "_request_id",
        "_reset",
        "_response",
        "_tool_bytes",
        "_tool_calls",
        "_total",
    )

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        decoder: StreamDecoder,
        *,
        provider: str,
        model: str,
        request_id: str | None,
        headers: Mapping[str, str] | None = None,
        idle_timeout: float | None,
        total_timeout: float | None,
        own_idle: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self._response = response
        # the bytes the body may still bring (`max_bytes`, the provider's max_stream_bytes)
        self._limit = max_bytes
        self._left = math.inf if max_bytes is None else max_bytes
        self._head = b""  # the body's first bytes, quoted when no piece came (`_end`)
        self._tool_calls: tuple[ToolCall, ...] = ()
        self._read = response.content.readany
        self._decoder = decoder
        self._provider = provider
        self._model = model
        self._request_id = request_id
        self._idle = idle_timeout
        self._total = total_timeout
        self._own_idle = own_idle  # the idle timeout is the provider's own
        self._pending: deque[str | ToolCallDelta] = deque()
        self._parts: list[str] = []  # the text deltas, one item each
        self._deltas = 0
        self._tool_bytes = 0  # the UTF-8 bytes of the tool-call pieces' names and arguments
        self._closed = False
        self._failed: ProviderError | None = None
        # when the answer arrived (`ended_at`), on `time.perf_counter`: the last network
        # read (the headers' at first), the read that carried the end marker, and the
        # body's end, which aiohttp reports as it arrives, whether or not it is read
        self._read_at = self._opened_at = time.perf_counter()
        # an exhausted rate limit's reset, as the headers said it when they came (the
        # wait left is counted from then: `completion`)
        self._reset = None if headers is None else parse_ratelimit_reset(headers)
        self._marker_at: float | None = None
        self._eof_at: float | None = None
        on_eof = getattr(response.content, "on_eof", None)  # aiohttp's own response uses it
        if on_eof is not None:
            on_eof(self._body_ended)

    async def __anext__(self) -> str | ToolCallDelta:
        pending = self._pending
        if not pending:
            await self._fill()
        return pending.popleft()

    async def next_pieces(self) -> list[str | ToolCallDelta]:
        pending = self._pending
        if not pending:
            await self._fill()
        pieces = [*pending]
        pending.clear()
        return pieces

    async def _fill(self) -> None:
        """Read and decode until a piece is pending; raise at the end or on a failure."""
        pending = self._pending
        while not pending:
            if self._closed:
                if self._failed is not None:
                    raise self._failed
                raise StopAsyncIteration
            failure = self._decoder.error
            if failure is not None:  # it came after deltas now delivered
                self._fail(failure)
                raise failure
            decoder = self._decoder
            if decoder.finished:  # the end marker came: the answer is whole
                await self._await_eof()
                self._end()
                continue
            chunk = b""
            if not decoder.queued:
                if self._left < 0:  # what came within the limit is decoded: no more is read
                    self._over_limit()
                try:
                    chunk = await self._read()
                    self._read_at = time.perf_counter()
                    self._left -= len(chunk)
                    if len(self._head) < _HEAD_BYTES:
                        self._head += chunk[: _HEAD_BYTES - len(self._head)]
                except _TRANSPORT_ERRORS as exc:
                    if isinstance(exc, TimeoutError):
                        error: ProviderError = _timeout_error(
                            self._provider,
                            self._model,
                            self._idle,
                            self._total,
                            exc,
                            self._own_idle,
                        )
                    else:
                        error = error_from_transport(
                            _without_request(exc),
                            provider=self._provider,
                            model=self._model,
                            secret=self._decoder._secret,
                            status=self._response.status,  # a 2xx: the answer had begun
                        )
                    self._fail(error)
                    raise error from None
                if self._left < 0:  # the bytes within the limit are decoded, then it fails
                    chunk = chunk[: len(chunk) + int(self._left)]
                    if not chunk:
                        self._over_limit()
                if not chunk:
                    if not decoder.finished and decoder.whole_at_eof:
                        decoder.finished = True  # a server that sends no end marker
                        self._marker_at = self._read_at
                    self._end()
                    continue
            try:
                if chunk:
                    decoder.push(chunk)
                # events are decoded up to the next delta: the first delta of an answer
                # that arrived in one piece does not wait for the rest to be decoded
                deltas = decoder.more()
            except ProviderError as exc:
                self._fail(exc)
                raise
            if self._decoder.finished and self._marker_at is None:  # `more` decoded it
                # it came in the bytes read so far: by the last read, maybe long before
                # it was decoded (events are decoded when the caller asks for pieces)
                self._marker_at = self._read_at
            if deltas:
                pending.extend(deltas)
                self._deltas += len(deltas)
                if decoder.has_tool_calls:  # tool-call pieces among the text
                    self._parts.extend(d for d in deltas if isinstance(d, str))
                    self._tool_bytes += sum(_tool_bytes(d) for d in deltas)
                else:
                    self._parts += deltas  # type: ignore[arg-type]  # text only: no call yet

    async def _await_eof(self) -> None:
        """
        After the end marker: wait up to `_EOF_GRACE` for the body's end, which lets
        the connection go back to the pool.  What comes is not decoded, and a stall or
        a failure costs nothing: `_end` closes a connection whose body did not end.
        """
        content = self._response.content
        if content.at_eof():
            return
        try:
            async with asyncio.timeout(_EOF_GRACE):
                while await content.readany():
                    pass
        except _TRANSPORT_ERRORS:
            pass

    def _end(self) -> None:
        """
        The body ended, or its format's end marker came (the rest is not read): complete
        when the marker came, else cut short.
        """
        self._closed = True
        decoder = self._decoder
        if decoder.finished:
            self._response.release()
            if decoder.tool_calls:
                reader = ResponseReader(
                    provider=self._provider, model=self._model, status=200, secret=decoder._secret
                )
                try:
                    self._tool_calls = openai_tool_calls(
                        reader, {"tool_calls": decoder.tool_calls}, "stream"
                    )
                except InvalidResponseError as exc:
                    self._failed = exc
                    raise
            return
        self._response.close()
        self._failed = InvalidResponseError(
            f"{self._provider}: the event stream ended before the answer was complete"
            f"{self._what_came()} [model {self._model}]",
            provider=self._provider,
            model=self._model,
            status=200,
        )
        raise self._failed

    def _what_came(self) -> str:
        """
        For a stream that ended with no piece: what came instead (a proxy's page
        answered with a 2xx), its content type and its first bytes, scrubbed of keys;
        else nothing.
        """
        if self._deltas:
            return ""
        kind = self._response.content_type
        if not self._head:
            return f" (no piece came; Content-Type {kind!r}, an empty body)"
        start = _snippet(self._head, 80, self._decoder._secret)
        return f" (no piece came; Content-Type {kind!r}, the body starts {start!r})"

    def _over_limit(self) -> None:
        """Fail the stream: its body went past ``max_stream_bytes`` (the rest is not read)."""
        error = InvalidResponseError(
            f"{self._provider}: the event stream is more than {self._limit:,} bytes, over "
            f"max_stream_bytes={self._limit:,}; raise max_stream_bytes if such answers are "
            f"expected [model {self._model}]",
            provider=self._provider,
            model=self._model,
            status=200,
        )
        self._fail(error)
        raise error

    def _body_ended(self) -> None:
        """aiohttp's callback: the body's end arrived (read or not)."""
        if self._eof_at is None:
            self._eof_at = time.perf_counter()

    def _fail(self, error: ProviderError) -> None:
        self._closed = True
        self._failed = error
        self._response.close()  # drop the connection: the rest is never read

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._response.close()
        self._pending.clear()

    @property
    def finished(self) -> bool:
        """True once the end marker came (its pieces may still wait to be taken)."""
        return self._failed is None and self._decoder.finished

    @property
    def ended_at(self) -> float | None:
        """
        When the end marker arrived, as nearly as the stream saw it without reading
        ahead of its caller: the body's end, when it came right after the marker (as the
        APIs send it; aiohttp reports it as it arrives, during the caller's pauses too),
        else the network read that carried the marker; None before the marker.
        """
        marker_at = self._marker_at
        if marker_at is None:
            return None
        eof_at = self._eof_at
        return marker_at if eof_at is None or eof_at > marker_at else eof_at

    @property
    def output_estimated(self) -> bool:
        return self._output_tokens()[1]

    def _output_tokens(self) -> tuple[int, bool]:
        """
        The output tokens so far, and whether they are the estimate (`_estimate`)
        rather than the provider's count: when it reported none (a server that ignores
        ``stream_options.include_usage`` never does), or, before the end, fewer than
        the estimate (a count then may be a placeholder: Anthropic's message_start
        says 1).
        """
        decoder = self._decoder
        reported = decoder.output_tokens
        if reported is not None and decoder.finished:
            return reported, False
        estimate = self._estimate()
        if reported is None or reported < estimate:
            return estimate, estimate > 0
        return reported, False

    def _estimate(self) -> int:
        """
        The output tokens of the pieces so far by their size
        (`estimated_output_tokens`: a quarter of the UTF-8 bytes of the text and of the
        tool calls' names and arguments, rounded up, and at least one per piece), the
        output the stream carried without a delta (a reasoning model's reasoning, a
        refusal, a server tool's input: the decoder's ``unseen_bytes``) included.
        """
        decoder = self._decoder
        pieces = self._deltas + decoder.unseen_pieces
        if not pieces:
            return 0
        size = self._tool_bytes + decoder.unseen_bytes + sum(map(utf8_size, self._parts))
        return estimated_output_tokens(size, pieces)

    def completion(self) -> Completion:
        decoder = self._decoder
        output = self._output_tokens()[0]
        return Completion(
            content="".join(self._parts),
            model=reported_model(decoder.response_model, self._model),
            input_tokens=decoder.input_tokens or 0,
            output_tokens=output,
            stop_reason=decoder.stop_reason,
            request_id=self._request_id or decoder.response_id,
            tool_calls=self._tool_calls,
            response_id=decoder.response_id,
            rate_limit_reset=self._reset_left(),
            cache_write_tokens=decoder.cache_write_tokens,
            cache_write_1h_tokens=decoder.cache_write_1h_tokens,
            cache_read_tokens=decoder.cache_read_tokens,
            web_search_requests=decoder.web_search_requests,
            cached_input_tokens=decoder.cached_input_tokens,
            service_tier=decoder.service_tier,
        )

    def _reset_left(self) -> float | None:
        """
        The seconds left until an exhausted rate limit resets, as the headers said it
        (counted from when they came: `_opened_at`, not when the stream is read); None
        when none is exhausted or it has reset since.
        """
        reset = self._reset
        if reset is None:
            return None
        left = reset - (time.perf_counter() - self._opened_at)
        return left if left > 0 else None


def _tool_bytes(piece: str | ToolCallDelta) -> int:
    # the UTF-8 bytes a tool-call piece's model wrote (its name and arguments); 0 for text
    if isinstance(piece, str):
        return 0
    return utf8_size(piece.name or "") + utf8_size(piece.arguments)
