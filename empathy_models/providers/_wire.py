"""
What crosses the wire, below the HTTP client: request bodies encoded (`encode_body`),
answers read field by field (`ResponseReader`), and a provider's failure mapped to the
error tree (`error_from_response`, with the ``Retry-After`` and rate-limit reset headers
read; `error_from_transport`; `error_from_local` for a request that could not be built),
every message scrubbed of the key and of any password in a URL (`masked_url`).  A leaf of the
providers package: the HTTP client, the SSE decoder, the stream reader and the format
converters build on it.
"""

from __future__ import annotations

import email.utils
import json
import json.decoder
import json.encoder
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import quote, quote_plus

from .._text import utf8_size
from .._urls import masked_keys, masked_url
from ..exceptions import (
    AuthenticationError,
    ConfigurationError,
    ContentPolicyError,
    ContextWindowExceededError,
    InvalidRequestError,
    InvalidResponseError,
    MissingAPIKeyError,
    ModelNotFoundError,
    OverloadedError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
    ServerError,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "MAX_TOKEN_COUNT",
    "OUTPUT_BYTES_PER_TOKEN",
    "ResponseReader",
    "anthropic_usage_extras",
    "openai_cached_tokens",
    "error_from_local",
    "error_from_object",
    "error_from_response",
    "error_in_answer",
    "error_from_transport",
    "estimated_output_tokens",
    "is_own_timeout",
    "json_text",
    "masked_url",
    "missing_key",
    "own_timeout",
    "shown_count",
    "parse_ratelimit_reset",
    "text_of_chunks",
    "parse_retry_after",
    "read_bounded",
    "said_should_retry",
    "utf8_size",
    "whole_count",
]

_MAX_MESSAGE: Final = 300
MAX_TOKEN_COUNT: Final = 2**63 - 1
"""The largest usage count read: what an `LLMCallRecord` holds (no real count is larger)."""
OUTPUT_BYTES_PER_TOKEN: Final = 4
"""
The UTF-8 bytes of an answer counted as one output token when the provider reported no
count (`estimated_output_tokens`): about what providers count for English, what the
executor's estimate of a prompt assumes too (``limits.values.WORST_PER_ESTIMATE``).
"""
_URL_PASSWORD: Final = re.compile(r"((?<![A-Za-z0-9+.-])[A-Za-z0-9+.-]*://[^/?#@\s:]*:)\S{0,512}@")
"""
The password of a ``scheme://user:password@`` in a message (a proxy URL quoted back),
up to the last '@' before a space: a password may hold an unencoded '/', '?', '#', '@'.
The scheme is the whole run of scheme characters before ``://``, tried from its start
only: tried from each of its letters, a long run (``a.a.a...``) took time growing with
the square of its length.
"""
_CONTEXT_MARKERS: Final = (
    "context_length_exceeded",
    "maximum context length",
    "prompt is too long",
    "exceed context limit",
    "context window",
    # Gemini: "The input token count (N) exceeds the maximum number of tokens allowed (M)."
    "exceeds the maximum number of tokens allowed",
    # llama.cpp's server: "request (N tokens) exceeds the available context size (M
    # tokens), try increasing it" (type exceed_context_size_error)
    "exceeds the available context size",
    # text-generation-inference (and Together): "`inputs` tokens + `max_new_tokens`
    # must be <= N. Given: ..." (a 422)
    "`inputs` tokens + `max_new_tokens` must be <=",
)
_POLICY_CODES: Final = frozenset({"content_policy_violation", "content_filter"})
_POLICY_MARKERS: Final = ("content filtering policy", "usage policy", "content policy")
# a 400 that is the account's, not the request's (Anthropic sends these as
# invalid_request_error): no credit left, or the organization disabled; Gemini's key
# refused (INVALID_ARGUMENT, reason API_KEY_INVALID), or the account's region
# (FAILED_PRECONDITION), which no request from it can change
_ACCOUNT_MARKERS: Final = (
    "your credit balance is too low to access the anthropic api",
    "this organization has been disabled",
    "api key not valid. please pass a valid api key",
    "api key not found. please pass a valid api key",
    "api key expired. please renew the api key",
    "user location is not supported for the api use",
    "free tier is not available in your country",
)
# a 400 that names an unknown model (LiteLLM's proxy: "Invalid model name passed in
# model=..."; OpenRouter: "... is not a valid model ID"; OpenAI-compatible servers:
# "model ... does not exist" / "model_not_found")
_UNKNOWN_MODEL_MARKERS: Final = (
    "invalid model name",
    "is not a valid model id",
    "model_not_found",
    "model not found",
    "unknown model",
)


_ANYWHERE_FROM: Final = 8
"""A secret this long or longer is scrubbed wherever it appears, even inside a word."""


class _Secrets:
    """
    Texts that every message is scrubbed of (a provider's key, the values of its
    secret-looking headers), each also as a URL would carry it (percent-encoded, with
    and without its '/', and form-encoded: a gateway may quote a token back as it read
    it from a query); its repr and str never show them.
    """

    __slots__ = ("_short", "_values", "longest")

    def __init__(self, *values: str) -> None:
        forms = {form for v in values if v for form in (v, *_url_forms(v))}
        # longest first: a value that holds another ("Bearer <token>") goes whole
        ordered = sorted(forms, key=len, reverse=True)
        self._values = tuple(v for v in ordered if len(v) >= _ANYWHERE_FROM)
        # a very short value (a local server's key "k") only where it stands alone:
        # replaced anywhere, it would turn "tokens" into "to***ens"
        short = [re.escape(v) for v in ordered if len(v) < _ANYWHERE_FROM]
        self._short = (
            re.compile(rf"(?<![A-Za-z0-9])(?:{'|'.join(short)})(?![A-Za-z0-9])") if short else None
        )
        self.longest = len(ordered[0]) if ordered else 0

    def scrub(self, text: str) -> str:
        """
        ``text`` with each of the values (in each of its forms) replaced by ``***``: a
        value of 8 characters or more wherever it appears, a shorter one where no letter
        or digit touches it.
        """
        for value in self._values:
            if value in text:
                text = text.replace(value, "***")
        if self._short is not None:
            text = self._short.sub("***", text)
        return text

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def _url_forms(value: str) -> tuple[str, str, str]:
    """``value`` percent-encoded (with and without its '/') and form-encoded."""
    return quote(value, safe=""), quote(value), quote_plus(value)


class _Secret(_Secrets):
    """Holds one secret (an API key, a header's value), to send; scrubbed like the rest."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        super().__init__(value)
        self._value = value

    def reveal(self) -> str:
        return self._value


def _scrub(text: str, secret: _Secrets | None) -> str:
    if secret is not None:
        text = secret.scrub(text)
    text = masked_keys(text)
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _reach(length: int, secret: _Secrets | None) -> int:
    """How much of a text to scrub so that its first ``length`` characters are clean."""
    return length + (secret.longest if secret is not None else 0) + 200


def _quote(text: str, length: int, secret: _Secrets | None) -> str:
    """The first ``length`` characters of ``text``, scrubbed of keys (before cutting)."""
    # scrub before cutting: a key that straddles the cut would escape the scrub
    return _scrub(text[: _reach(length, secret)], secret)[:length].strip()


def _snippet(body: bytes, length: int, secret: _Secrets | None) -> str:
    """The first ``length`` characters of ``body``, scrubbed of keys (before cutting)."""
    return _quote(body[: _reach(length, secret)].decode("utf-8", "replace"), length, secret)


# --------------------------------------------------------------------------- the mapping


def said_should_retry(headers: Mapping[str, str]) -> bool | None:
    """
    The provider's ``x-should-retry`` header: True for ``true``, False for ``false``
    (in any case), None when absent or anything else.
    """
    said = headers.get("x-should-retry")
    if said is None:
        return None
    return {"true": True, "false": False}.get(said.strip().lower())


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """
    Seconds to wait according to ``retry-after-ms`` or ``Retry-After`` (delta seconds or
    an HTTP date, relative to ``now``, epoch seconds), or None when absent or unreadable
    (a date whose numbers no clock holds included).
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError, OverflowError):  # Overflow: a huge number
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = time.time() if now is None else now
        return max(0.0, when.timestamp() - current)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: ``"20ms"``, ``"1s"``, ``"6m0s"``, ``"1h2m3.5s"``."""
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _parse_instant(text: str, now: float) -> float | None:
    """Anthropic's reset instants (RFC 3339) as seconds from ``now``."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


_RESET_HEADERS: Final = tuple(
    (
        f"anthropic-ratelimit-{kind}-remaining",
        f"anthropic-ratelimit-{kind}-reset",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
)
"""Per kind of limit: Anthropic's remaining and reset headers, then OpenAI's."""


def parse_ratelimit_reset(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """
    Seconds until an exhausted rate limit resets, from the providers' own headers:
    Anthropic's ``anthropic-ratelimit-<kind>-remaining`` / ``-reset`` (RFC 3339) and
    OpenAI's ``x-ratelimit-remaining-<kind>`` / ``x-ratelimit-reset-<kind>`` (``"6m0s"``).
    Only limits whose remaining count is 0 are considered; the longest wait wins.  None
    when no exhausted limit says when it resets.
    """
    current = now  # the clock is read once, when an Anthropic instant needs it
    waits: list[float] = []
    get = headers.get
    for a_remaining, a_reset, o_remaining, o_reset in _RESET_HEADERS:
        if (remaining := get(a_remaining)) is not None and remaining.strip() == "0":
            reset = headers.get(a_reset)
            if reset is not None:
                if current is None:
                    current = time.time()
                wait = _parse_instant(reset, current)
                if wait is not None:
                    waits.append(wait)
        if (remaining := get(o_remaining)) is not None and remaining.strip() == "0":
            reset = headers.get(o_reset)
            wait = None if reset is None else _parse_duration(reset)
            if wait is not None:
                waits.append(wait)
    return max(waits) if waits else None


def _error_details(body: bytes) -> tuple[str | None, str | None, str | None, bool]:
    """
    (type, code, message, whether ``body`` is JSON) from an error body: either API's
    shape, a bare ``"error"`` or ``"message"`` string, or FastAPI's ``"detail"`` string
    (servers built on it answer a wrong path so); Google's shape too (Gemini's
    OpenAI-compatible endpoint: ``[{"error": {"code", "message", "status"}}]``, the
    ``status`` read as the type); Nones when none is found.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # Recursion: absurd nesting
        return None, None, None, False
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        data = data[0]  # Gemini wraps its error object in a list
    if not isinstance(data, Mapping):
        return None, None, None, True
    error = data.get("error")
    if isinstance(error, str):
        return None, None, error, True
    if not isinstance(error, Mapping):
        for field in ("message", "detail"):
            if isinstance(message := data.get(field), str):
                return None, None, message, True
        return None, None, None, True
    kind = error.get("type")
    if kind is None:
        kind = error.get("status")  # Google's "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"
    code = error.get("code")
    message = error.get("message")
    return (
        kind if isinstance(kind, str) else None,
        code if isinstance(code, str) else None,
        message if isinstance(message, str) else None,
        True,
    )


def error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    provider: str,
    model: str,
    secret: _Secrets | None = None,
    cut: bool = False,
) -> ProviderError:
    """
    The error for a non-2xx response (see the module table), scrubbed of ``secret``;
    ``cut``: its body was cut short, and ``body`` is empty (the status and headers
    decide alone).
    """
    kind, code, message, is_json = _error_details(body)
    location = headers.get("location") if 300 <= status < 400 else None
    if cut:
        message = "the body was cut short"
    elif location is not None:
        message = (
            f"a redirect to {masked_url(location[:400])!r}, not followed since it would carry "
            "the API key: check base_url"
        )
    elif message is None:
        snippet = _snippet(body, 120, secret)
        shape = "body" if is_json else "non-JSON body"
        message = f"{shape}: {snippet!r}" if snippet else "empty body"
    label = " ".join(p for p in (kind, f"({code})" if code else None) if p)
    text = _scrub(f"{provider} HTTP {status}{' ' + label if label else ''}: {message}", secret)
    text += f" [model {model}]"
    retry_after = parse_retry_after(headers)
    if retry_after is None and status == 429:
        retry_after = parse_ratelimit_reset(headers)
    lowered = f"{code or ''} {message}".lower()
    cls: type[ProviderError]
    if status == 529 or kind == "overloaded_error":
        cls = OverloadedError
    elif status == 429 and "insufficient_quota" in (kind, code):
        cls = AuthenticationError  # OpenAI's "no credit left": waiting will not help
    elif status == 429:
        cls = RateLimitedError
    elif status == 403 and code == "model_not_found":
        cls = ModelNotFoundError  # OpenAI: the project may not use this one model
    elif status in (401, 402, 403):  # 402: the account cannot pay, not a bad request
        cls = AuthenticationError
    elif status == 400 and any(marker in lowered for marker in _ACCOUNT_MARKERS):
        cls = AuthenticationError  # Anthropic's account errors, sent as a 400
    elif status in (404, 410):  # 410 Gone: a model past its end of life (NVIDIA's API)
        cls = ModelNotFoundError
    elif status in (408, 409):  # 409: a lock timeout, retried as the official SDKs do
        cls = ProviderTimeoutError
    elif status == 499:  # cancelled on the way (a gateway; Gemini's CANCELLED): transient
        cls = ProviderConnectionError
    elif status == 400 and (
        any(marker in lowered for marker in _UNKNOWN_MODEL_MARKERS)
        or ("the model" in lowered and "does not exist" in lowered)
    ):
        cls = ModelNotFoundError  # treated like a 404: next route, per-model key only
    elif 400 <= status < 500:
        if any(marker in lowered for marker in _CONTEXT_MARKERS):
            cls = ContextWindowExceededError
        elif code in _POLICY_CODES or any(marker in lowered for marker in _POLICY_MARKERS):
            cls = ContentPolicyError
        else:
            cls = InvalidRequestError
    elif 500 <= status < 600:
        cls = ServerError
    else:
        cls = InvalidResponseError
    return cls(
        text,
        provider=provider,
        model=model,
        status=status,
        retry_after=retry_after,
        should_retry=said_should_retry(headers),
    )


# the HTTP status each API's error type (or code) stands for, so an error object sent
# with a 2xx status (in a stream's event, or as a gateway's whole body) maps to the same
# error class as the status would
_ERROR_STATUS: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "requests": 429,
    "tokens": 429,
    "api_error": 500,
    "server_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    "overloaded": 529,
}


def _error_status(kind: object, code: object) -> int:
    """
    The HTTP status an error object's ``type`` or ``code`` stands for: a known name
    (`_ERROR_STATUS`), else a code that is itself an HTTP error status (``429``, or
    ``"429"``: OpenRouter sends the status as the code), else 500.
    """
    for value in (kind, code):
        status = _ERROR_STATUS.get(str(value))
        if status is not None:
            return status
    if isinstance(code, str) and code.isascii() and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return code
    return 500


def error_in_answer(data: Mapping[str, Any], answer_field: str) -> object | None:
    """
    The error object a 2xx body holds instead of an answer (an OpenAI-compatible
    gateway's ``{"error": {...}}`` sent with status 200), or None: a non-empty
    ``error`` string or object, and no ``answer_field`` (``choices``, ``content``).
    """
    error = data.get("error")
    if not error or not isinstance(error, str | Mapping) or data.get(answer_field):
        return None
    return error


def error_from_object(
    error: object,
    *,
    provider: str,
    model: str,
    where: str,
    secret: _Secrets | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProviderError:
    """
    The error for an ``error`` object sent with a 2xx status (``where`` says how: "error
    event in the stream", ...): the class the status its ``type`` or ``code`` stands for
    maps to (`_error_status`), its ``type``, ``code`` and ``message`` quoted when they are
    strings or numbers (anything else ignored), scrubbed of ``secret``; ``status`` None
    (no error status was sent), ``retry_after`` from ``headers``.
    """
    if isinstance(error, Mapping):
        fields = ((key, error.get(key)) for key in ("type", "code", "message"))
        error = {key: value for key, value in fields if isinstance(value, str | int | float)}
    elif not isinstance(error, str):
        error = None
    kind = error.get("type") if isinstance(error, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    status = _error_status(kind, code)
    body = json.dumps({"error": error}).encode()
    mapped = error_from_response(status, body, {}, provider=provider, model=model)
    message = error.get("message") if isinstance(error, dict) else error
    label = " ".join(str(p) for p in (kind, code) if p) or "error"
    text = _scrub(f"{provider}: {where} ({label}): {message or 'no message'}", secret)
    if headers is None:
        return type(mapped)(f"{text} [model {model}]", provider=provider, model=model)
    return type(mapped)(
        f"{text} [model {model}]",
        provider=provider,
        model=model,
        retry_after=parse_retry_after(headers),
        should_retry=said_should_retry(headers),
    )


def error_from_transport(
    exc: BaseException,
    *,
    provider: str,
    model: str,
    secret: _Secrets | None = None,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProviderError:
    """
    The error for an exception raised while sending or reading (never for
    `asyncio.CancelledError`, which callers must let through), scrubbed of ``secret``.
    ``status``: the answer's, when it was read before the body failed; a 2xx body cut
    short keeps it (the request was accepted, and is billed: see `InvalidResponseError`);
    a status that asks for a retry (408, 409, 429, 499, 5xx) whose body was cut short (not by
    a timeout) is the error that status and ``headers``, the answer's, map to
    (`error_from_response`: a 503's `ServerError` with its ``Retry-After``), the body
    said to be cut short.  (Another status's class may depend on the body lost: a 400
    may be a context window's, so it stays an `InvalidResponseError`.)
    """
    import aiohttp  # loaded by whoever sent the request

    if (
        status is not None
        and (status in (408, 409, 429, 499) or 500 <= status < 600)
        and isinstance(exc, aiohttp.ClientError)
        and not isinstance(exc, TimeoutError)
    ):
        return error_from_response(
            status, b"", headers or {}, provider=provider, model=model, secret=secret, cut=True
        )

    detail = _scrub(str(exc) or type(exc).__name__, secret)
    where = f"[model {model}]"
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError and aiohttp's timeout errors
        return ProviderTimeoutError(
            f"{provider}: no answer before the timeout ({type(exc).__name__}) {where}",
            provider=provider,
            model=model,
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        # the proxy (HTTPS_PROXY / HTTP_PROXY) refused the tunnel or wants credentials
        return ProviderConnectionError(
            f"{provider}: the HTTP proxy refused the connection "
            f"({exc.status} {_scrub(str(exc.message), secret)}) {where}",
            provider=provider,
            model=model,
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return InvalidResponseError(
            f"{provider}: the response body was cut short: {detail} {where}",
            provider=provider,
            model=model,
            status=status if status is not None and 200 <= status < 300 else None,
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        # a head aiohttp could not parse: its ``status`` is the parser's own code (400),
        # which the server never sent
        return InvalidResponseError(
            f"{provider}: unreadable response "
            f"({type(exc).__name__}: {_scrub(str(exc.message), secret)}) {where}",
            provider=provider,
            model=model,
        )
    return ProviderConnectionError(
        f"{provider}: connection failed ({type(exc).__name__}: {detail}) {where}",
        provider=provider,
        model=model,
    )


_OWN_TIMEOUT: Final = "_empathy_own_timeout"
"""The attribute marking a `ProviderTimeoutError` as the provider's own timeout's."""


def own_timeout(error: ProviderTimeoutError) -> ProviderTimeoutError:
    """
    ``error``, marked as raised by the provider's own timeout (shorter than the one
    its caller gave): its message names that limit, which the executor keeps rather
    than naming its per-attempt timeout (`is_own_timeout`).
    """
    setattr(error, _OWN_TIMEOUT, True)
    return error


def is_own_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a timeout `own_timeout` marked as the provider's own."""
    return getattr(error, _OWN_TIMEOUT, False) is True


def error_from_local(
    exc: BaseException, *, provider: str, model: str, secret: _Secrets | None = None
) -> ConfigurationError:
    """
    The error for an exception aiohttp raised while building the request, before
    anything was sent (a session's own ``auth=`` beside the key's ``Authorization``
    header, a URL it cannot use): a `ConfigurationError`, which the executor records
    as ``not_sent`` and no model's statistics or breaker count, scrubbed of ``secret``.
    """
    detail = _scrub(str(exc) or type(exc).__name__, secret)
    hint = ""
    if "AUTHORIZATION" in str(exc):
        hint = (
            "; a session's auth= cannot be sent beside the provider's Authorization header: "
            "give the credential as the provider's headers= instead"
        )
    return ConfigurationError(
        f"{provider}: the request could not be built, nothing was sent "
        f"({type(exc).__name__}: {detail}){hint} [model {model}]"
    )


def _without_request(exc: BaseException) -> BaseException:
    """
    ``exc`` with the request headers (which hold the API key) dropped, so it can be the
    chained cause: aiohttp's response errors carry the request and its redirect history.
    """
    import aiohttp
    from multidict import CIMultiDict, CIMultiDictProxy

    if isinstance(exc, aiohttp.ClientResponseError):
        info = exc.request_info
        exc.request_info = aiohttp.RequestInfo(
            info.url, info.method, CIMultiDictProxy(CIMultiDict()), info.real_url
        )
        exc.history = ()
        exc.args = (exc.request_info, exc.history)
    return exc


async def read_bounded(
    response: aiohttp.ClientResponse, limit: int, provider: str, model: str
) -> bytes:
    """
    The body of ``response``, or `InvalidResponseError` as soon as it is known to be
    larger than ``limit``, ``provider``'s ``max_response_bytes`` (from the
    Content-Length, or while reading).  A compressed body is counted as aiohttp
    decompresses it: its Content-Length (the compressed size) says nothing of what a
    gzip or deflate body expands to.
    """
    status = response.status
    length = response.content_length
    if "Content-Encoding" in response.headers:
        length = None  # the compressed size: it does not bound the body
    elif length is not None and length <= limit:
        return await response.read()  # aiohttp reads no more than Content-Length
    if length is None:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
        chunks.clear()
        response.close()  # drop the connection: the rest of the body is never read
        shown = f"more than {limit:,} bytes"
    else:
        shown = f"{length:,} bytes (Content-Length)"
    raise InvalidResponseError(
        f"{provider}: the response body is {shown}, over max_response_bytes="
        f"{limit:,}; raise max_response_bytes if such answers are expected [model {model}]",
        provider=provider,
        model=model,
        status=status,
    )


# --------------------------------------------------------------------------- response fields

# one compact encoder for every request: json.dumps(..., separators=...) builds a new
# JSONEncoder per call (about half the cost of encoding a small body)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))
# the C encoder maker `JSONEncoder.iterencode` calls (None where the accelerator is missing)
_C_ENCODER: Final[Callable[..., Callable[[object, int], Sequence[str]]] | None] = getattr(
    json.encoder, "c_make_encoder", None
)


def encode_body(body: dict[str, Any]) -> bytes:
    """
    ``body`` as compact JSON (ASCII, no spaces), as `_ENCODER` writes it: through the
    C encoder `_ENCODER.encode` would make, made here directly (a fresh one per body,
    so a body that failed leaves no circular-reference marks behind), without the two
    Python frames and the closure ``JSONEncoder.iterencode`` builds on every call.
    """
    if _C_ENCODER is None:
        return _ENCODER.encode(body).encode()
    # markers, default, encoder, indent, separators, sort_keys, skipkeys, allow_nan
    ascii_text = json.encoder.encode_basestring_ascii
    encode = _C_ENCODER({}, _ENCODER.default, ascii_text, None, ":", ",", False, False, True)
    return "".join(encode(body, 0)).encode()


_MODEL_ID_LIMIT: Final = 256


def reported_model(value: object, requested: str) -> str:
    """
    The model id a provider reported for its answer (often a dated snapshot of the one
    asked for, ``gpt-4o-2024-08-06``): a printable string of 1 to 256 characters, else
    ``requested``.
    """
    if isinstance(value, str) and 0 < len(value) <= _MODEL_ID_LIMIT and value.isprintable():
        return value
    return requested


def shown_count(value: int) -> str:
    """``value`` as a message shows it: an absurd integer by its size, not its digits."""
    if -MAX_TOKEN_COUNT <= value <= MAX_TOKEN_COUNT:
        return str(value)
    return f"a {value.bit_length()}-bit integer"


def json_text(value: Any) -> str:
    """``value`` (parsed from a response) written back as JSON text, however deep."""
    try:
        return json.dumps(value)
    except RecursionError:  # parsed, yet too deep for the encoder at this stack depth
        return "<JSON nested too deeply to show>"


_SCAN: Final = json.decoder.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads(body: bytes) -> Any:
    """
    ``json.loads(body)``: the same value, or the same error.  A body that is one UTF-8
    JSON object with nothing around it (an API's answer) is read by the decoder's
    scanner directly, without ``json.loads``' encoding detection and its two
    whitespace matches; anything else (a byte-order mark, UTF-16, whitespace around
    it, an error to report) by ``json.loads`` itself.
    """
    if body[:1] == b"{" and body[1:2] != b"\x00":  # json.loads would read it as UTF-8
        try:
            text = body.decode("utf-8", "surrogatepass")
            data, end = _SCAN(text, 0)
        except (StopIteration, ValueError):  # UnicodeDecodeError too: json.loads says why
            pass
        else:
            if end == len(text):
                return data
    return json.loads(body)


class ResponseReader:
    """
    Typed access to a decoded JSON response; any missing or mistyped field raises
    `InvalidResponseError` naming its path (never ``KeyError``).  Every message is
    scrubbed of API keys (``secret``'s values, and anything shaped like a key).
    """

    __slots__ = ("_model", "_provider", "_secret", "_status")

    def __init__(
        self, *, provider: str, model: str, status: int, secret: _Secrets | None = None
    ) -> None:
        self._provider = provider
        self._model = model
        self._status = status
        self._secret = secret

    def error(self, why: str) -> InvalidResponseError:
        """The `InvalidResponseError` for ``why`` (scrubbed)."""
        why = _scrub(why, self._secret)
        return InvalidResponseError(
            f"{self._provider}: invalid response: {why} [model {self._model}]",
            provider=self._provider,
            model=self._model,
            status=self._status,
        )

    def fail(self, why: str) -> NoReturn:
        """Raise `error` for ``why``."""
        raise self.error(why)

    def decode(self, body: bytes) -> dict[str, Any]:
        """
        The JSON object in ``body``, or `InvalidResponseError` (also for nesting too deep
        to parse).  The error quotes at most 60 scrubbed characters and keeps nothing
        that references the body (no chained `json.JSONDecodeError`, whose ``doc`` is
        the whole text).
        """
        try:
            data = loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            if isinstance(exc, RecursionError):
                why = "nested too deeply to parse"
            elif isinstance(exc, json.JSONDecodeError):
                why = f"{exc.msg}: line {exc.lineno} column {exc.colno} (char {exc.pos})"
            else:
                why = f"{type(exc).__name__}"
            error = InvalidResponseError(
                f"{self._provider}: the response is not valid JSON ({why}; starts "
                f"{_snippet(body, 60, self._secret)!r}) [model {self._model}]",
                provider=self._provider,
                model=self._model,
                status=self._status,
            )
        else:
            if not isinstance(data, dict):
                self.fail(f"expected a JSON object, got {type(data).__name__}")
            return data
        body = b""  # this frame is in the error's traceback: let the body go
        raise error

    def get(self, data: Mapping[str, Any], key: str, kind: type[Any], path: str) -> Any:
        value = data.get(key)
        if value is None or not isinstance(value, kind) or isinstance(value, bool):
            shown = "missing" if value is None else f"a {type(value).__name__}"
            self.fail(f"{path}.{key} must be {kind.__name__}, got {shown}")
        return value

    def optional_str(self, data: Mapping[str, Any], key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) else None

    def count(self, data: Mapping[str, Any], key: str, path: str) -> int | None:
        """An optional usage count: None when absent or null, else as `tokens` reads it."""
        value = data.get(key)
        if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:
            return value  # what `tokens` returns for it, without its checks' calls
        return None if value is None else self.tokens(data, key, path)

    def tokens(self, data: Mapping[str, Any], key: str, path: str) -> int:
        """
        A usage count: an integer >= 0 and at most `MAX_TOKEN_COUNT` (a whole number
        written as a JSON float, ``10.0``, as some servers send it, counts as that
        integer), else it fails.
        """
        value = whole_count(data.get(key))
        if isinstance(value, float):  # fractional, inf or nan
            self.fail(f"{path}.{key} must be a whole number, got {value!r}")
        if value is None or not isinstance(value, int) or isinstance(value, bool):
            shown = "missing" if value is None else f"a {type(value).__name__}"
            self.fail(f"{path}.{key} must be int, got {shown}")
        if value < 0:
            self.fail(f"{path}.{key} must be >= 0, got {shown_count(value)}")
        if value > MAX_TOKEN_COUNT:
            self.fail(f"{path}.{key} must be < 2**63, got {shown_count(value)}")
        return int(value)


def text_of_chunks(chunks: list[Any]) -> str | None:
    """
    The text of a Chat Completions ``content`` sent as a list of chunks (Mistral's
    reasoning models: ``[{"type": "thinking", ...}, {"type": "text", "text": "..."}]``,
    in an answer and in a stream's deltas): its ``text`` chunks' text, joined; the other
    chunks (the thinking) left out, as other servers' reasoning is.  None when a chunk
    is no object, or a ``text`` chunk's text no string: a malformed answer.
    """
    parts: list[str] = []
    for chunk in chunks:
        if not isinstance(chunk, Mapping):
            return None
        if chunk.get("type") == "text":
            text = chunk.get("text")
            if not isinstance(text, str):
                return None
            parts.append(text)
    return "".join(parts)


def whole_count(value: object) -> object:
    """
    ``value`` as a usage count is read: a JSON float holding a whole number (``10.0``)
    as that integer, anything else as it is (left for the reader to accept or refuse;
    ``inf`` and ``nan`` are no whole numbers).
    """
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def estimated_output_tokens(size: int, pieces: int = 0) -> int:
    """
    The output tokens of an answer whose provider reported none: a quarter of its
    ``size`` (the UTF-8 bytes of its text and of its tool calls' names and arguments,
    `utf8_size`), rounded up (`OUTPUT_BYTES_PER_TOKEN`), and at least ``pieces`` (a
    stream's deltas: each holds a token or more).  The one estimate of output tokens,
    for a whole answer and a stream alike.
    """
    by_size = -(-size // OUTPUT_BYTES_PER_TOKEN)
    return by_size if by_size > pieces else pieces


def anthropic_usage_extras(
    usage: Mapping[str, Any], count: Callable[[Mapping[str, Any], str, str], int | None], path: str
) -> dict[str, int]:
    """
    The prompt-cache and server-tool counts an Anthropic ``usage`` object reports, as
    `Completion` fields (those it leaves out are not in the result): the cache writes
    (``cache_creation_input_tokens``, of which ``cache_creation.ephemeral_1h_input_tokens``
    went to the 1-hour cache, the rest to the 5-minute one), the cache reads
    (``cache_read_input_tokens``) and ``server_tool_use.web_search_requests``.  ``count``
    reads one count (None when absent) or fails; ``path`` names ``usage`` in its errors.
    """
    found: dict[str, int] = {}
    written = count(usage, "cache_creation_input_tokens", path)
    detail = usage.get("cache_creation")
    hour = five = None
    if isinstance(detail, Mapping):
        hour = count(detail, "ephemeral_1h_input_tokens", f"{path}.cache_creation")
        five = count(detail, "ephemeral_5m_input_tokens", f"{path}.cache_creation")
    if written is None and (hour is not None or five is not None):
        written = (hour or 0) + (five or 0)
    if written is not None:
        hour = min(hour or 0, written)
        found["cache_write_tokens"] = written - hour
        found["cache_write_1h_tokens"] = hour
    read = count(usage, "cache_read_input_tokens", path)
    if read is not None:
        found["cache_read_tokens"] = read
    tools = usage.get("server_tool_use")
    if isinstance(tools, Mapping):
        searches = count(tools, "web_search_requests", f"{path}.server_tool_use")
        if searches is not None:
            found["web_search_requests"] = searches
    return found


def missing_key(
    name: str, env_var: str, base_url: str, withheld: bool, model: str, env_off: bool = False
) -> MissingAPIKeyError:
    """
    The error for a request made without any credential, saying how to give one.

    Args:
        name: The provider's name.
        env_var: The variable its key is read from ("": none).
        base_url: Where it sends requests.
        withheld: The variable is set but not sent to ``base_url``.
        model: The requested model, named in the message.
        env_off: The caller turned reading the variable off (``api_key_from_env=False``).

    Returns:
        The `MissingAPIKeyError` to raise (before any request is sent).
    """
    if withheld:
        hint = (
            f"{env_var} is set but only sent to the official endpoint, not to "
            f"{base_url}; pass api_key=, or api_key_from_env=True to send it there"
        )
    elif env_off:
        hint = "api_key_from_env=False reads no variable: pass api_key="
    else:
        hint = f"pass api_key= or set {env_var or 'the API key variable'}"
    return MissingAPIKeyError(
        f"{name}: no API key; {hint} [model {model}]", provider=name, model=model
    )


def openai_cached_tokens(
    usage: Mapping[str, Any], count: Callable[[Mapping[str, Any], str, str], int | None], path: str
) -> int:
    """
    The prompt tokens an OpenAI ``usage`` object says came from the prompt cache
    (``prompt_tokens_details.cached_tokens``; 0 when absent); ``count`` and ``path`` as
    for `anthropic_usage_extras`.
    """
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, Mapping):
        return 0
    return count(details, "cached_tokens", f"{path}.prompt_tokens_details") or 0


# --------------------------------------------------------------------------- the base class
