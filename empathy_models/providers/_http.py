"""
Shared aiohttp plumbing for the HTTP providers, and the one place where wire failures
become errors of the tree.

`HTTPProvider` owns the session handling (borrowed through `bind`, or its own under
``async with``), the per-request timeout and the POST.  Everything that can go wrong
on the wire is turned into a `ProviderError` subclass here, and only here:

=========================================  ======================================
what happened                              raised
=========================================  ======================================
a 4xx whose body says the context is too   `ContextWindowExceededError`
small (the APIs' wording, vLLM's,
llama.cpp's, TGI's 422)
400 (body says content policy)             `ContentPolicyError`
400, 413, 422 and other 4xx                `InvalidRequestError`
401, 403, 402 (billing: out of credit)     `AuthenticationError`
400 saying the account is out of credit    `AuthenticationError`
or disabled (Anthropic: "Your credit
balance is too low ...", "This
organization has been disabled."), or
the key or its region refused (Gemini:
"API key not valid ...", "User location
is not supported ...")
404, 410 (a retired model), or a 400       `ModelNotFoundError`
naming an unknown model
("Invalid model name", as from LiteLLM;
OpenRouter's "is not a valid model ID"),
or a 403 ``model_not_found`` (OpenAI: a
model the project may not use)
408, 409 (a lock timeout: retried, as the  `ProviderTimeoutError`
official SDKs retry it)
429                                        `RateLimitedError` (``retry_after`` set)
429 ``insufficient_quota`` (no credit)     `AuthenticationError`
529, or an ``overloaded_error`` body       `OverloadedError`
500-599                                    `ServerError`
aiohttp / asyncio timeout                  `ProviderTimeoutError`
refused, reset, DNS, disconnected, a       `ProviderConnectionError`
proxy refusing the tunnel; a 499 (the
request cancelled on the way: a gateway's,
Gemini's ``CANCELLED``)
a 2xx body holding an ``error`` and no     the class its ``type`` or ``code``
answer (an OpenAI-compatible gateway's     stands for, as that status maps (a
``{"error": {...}}`` sent with 200)        numeric ``code``, OpenRouter's, is the
                                           status; else `ServerError`)
408, 409, 429, 499 or 5xx whose body was   that status's error (its headers'
cut short                                  ``Retry-After`` kept)
truncated body, malformed JSON, missing    `InvalidResponseError`
fields, unexpected status (a 3xx: redirects
are never followed, they would carry the key)
aiohttp refuses to build the request       `ConfigurationError` (nothing was sent:
(a session's ``auth=`` beside the key's    recorded ``not_sent``, counted by no
``Authorization``; a URL it cannot use)    model's statistics or breaker)
``asyncio.CancelledError``                 re-raised untouched
=========================================  ======================================

Every error carries ``provider``, ``model``, ``status`` (when there was a response),
``retry_after`` in seconds (from ``retry-after-ms``, or ``Retry-After`` as seconds or
an HTTP date; for a 429 without them, from the providers' rate-limit reset headers) and
``should_retry``, the ``x-should-retry`` header's word (``False`` is never retried).
Messages quote the provider's own error text with any API key removed; the chained
cause is an aiohttp or JSON exception that holds no request headers.
"""

from __future__ import annotations

import abc
import asyncio
import math
import os
import re
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self
from urllib.parse import urlsplit, urlunsplit

import attrs

from .._propagation import outgoing_headers
from .._urls import masked_keys, url_flaw
from .._validators import MAX_SIZE, check, failure, integer, number, shown
from .._version import __version__
from ..abc import AttemptTimeout, Completion, CompletionRequest, CompletionStream, Provider
from ..exceptions import (
    ConfigurationError,
    EmpathyModelsError,
    InvalidResponseError,
    MissingAPIKeyError,
    NotOpenError,
    ProviderError,
)
from ._convert import answer_usage
from ._sse import StreamDecoder
from ._wire import (
    ResponseReader,
    _Secret,
    _Secrets,
    _without_request,
    encode_body,
    error_from_local,
    error_from_object,
    error_from_response,
    error_from_transport,
    error_in_answer,
    masked_url,
    missing_key,
    parse_ratelimit_reset,
    parse_retry_after,
    read_bounded,
)

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = [
    "AttemptTimeout",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_MAX_STREAM_BYTES",
    "DEFAULT_TIMEOUT",
    "HTTPProvider",
    "ResponseReader",
    "error_from_response",
    "error_from_transport",
    "parse_ratelimit_reset",
    "parse_retry_after",
    "user_agent",
]

DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
"""The largest response body a provider reads (16 MiB; a long answer is well under 1 MiB)."""
DEFAULT_MAX_STREAM_BYTES: Final = 256 * 1024 * 1024
"""
The most bytes a provider reads of one streamed answer (256 MiB): the events take some
100 to 300 bytes per delta, so an answer of 128k output tokens takes some 15 to 40 MiB.
"""
_TIMER_SLACK: Final = 0.001  # the loop may run a timer up to its clock resolution early


_Proxy = tuple["URL | None", "aiohttp.BasicAuth | None"]
"""A request's proxy and its credentials, as aiohttp's ``post(proxy=, proxy_auth=)`` take them."""


def _env_proxy(url: str) -> _Proxy:
    """
    The proxy the environment names for ``url``: ``HTTPS_PROXY`` / ``HTTP_PROXY``, unless
    ``NO_PROXY`` exempts its host; credentials from the proxy URL or ``~/.netrc``.  The
    same reading as aiohttp's ``trust_env``, done once per session instead of in a
    worker thread on every request: ``ALL_PROXY`` is not read, and a proxy URL of
    scheme ``https://`` is ignored (aiohttp logs a warning).

    Returns:
        ``(proxy, auth)``; ``(None, None)`` when no proxy applies.

    Raises:
        ConfigurationError: the proxy variable holds no valid URL (its password masked).
    """
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return (None, None)
    except ValueError as exc:  # yarl refused the variable's value
        raise ConfigurationError(
            "the proxy named by HTTPS_PROXY / HTTP_PROXY is not a valid URL "
            f"({masked_url(str(exc))})"
        ) from None


def _request_url(base_url: str, endpoint: str) -> str:
    """
    The URL requests go to: ``endpoint`` appended to ``base_url``'s path, before its
    query (a gateway's ``?api-key=``, Azure's ``?api-version=``), which is kept.
    """
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/") + endpoint
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _host(url: str) -> str | None:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return None if host is None else host.lower()


# an infinite timeout is no timeout
_timeout = number(
    failure(ConfigurationError),
    low=0,
    low_open=True,
    finite=False,
    why="must be a number of seconds > 0",
)

_body_bound = integer(
    failure(ConfigurationError),
    low=1,
    high=MAX_SIZE,  # no larger body can be held
    why="must be an integer >= 1",
    high_why="must be < 2**63",
)


def _to_timeout(value: float | aiohttp.ClientTimeout | None) -> aiohttp.ClientTimeout:
    import aiohttp  # at first use: `import empathy_models` does not load it

    if isinstance(value, aiohttp.ClientTimeout):
        return value
    seconds = None if value is None else float(check(_timeout, "timeout", value))
    # aiohttp cannot time an infinity (it rounds the end up to an int): no timeout
    return aiohttp.ClientTimeout(total=None if seconds == math.inf else seconds)


_AUTH_HEADERS: Final = frozenset({"authorization", "api-key", "x-api-key"})
"""Custom headers that carry the credential themselves (Azure's ``api-key``, a gateway's)."""
_SECRET_WORDS: Final = (
    "auth",
    "key",
    "token",
    "secret",
    "password",
    "cookie",
    "signature",
    "credential",
)
_SHORTEST_SCRUBBED: Final = 8
"""A secret header's value (or credential) shorter than this is not scrubbed from messages."""
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*[ \t]+(\S.*)")
"""A value made of an auth scheme and a credential: ``Bearer <token>``, ``Basic <b64>``."""


def _looks_secret(header: str) -> bool:
    """
    Whether a header's value must be treated as a credential (never shown): its name
    contains ``auth``, ``key``, ``token``, ``secret``, ``password``, ``cookie``,
    ``signature`` or ``credential``, in any case.
    """
    lowered = header.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _scrubbed_texts(value: str) -> tuple[str, ...]:
    """
    What a secret header's ``value`` adds to the texts scrubbed from every message: the
    value, and for a scheme and a credential (``Bearer <token>``) the credential alone
    too, since a server may echo just that.  A text shorter than 8 characters is left
    out: replacing ``on`` or ``1`` everywhere would mangle messages, and no credential is
    that short.  (The ``api_key`` itself is always scrubbed, whatever its length; one
    under 8 characters where no letter or digit touches it.)
    """
    scheme = _SCHEME.fullmatch(value)
    texts = (value,) if scheme is None else (value, scheme.group(1).strip())
    return tuple(text for text in texts if len(text) >= _SHORTEST_SCRUBBED)


def user_agent() -> str:
    """The ``User-Agent`` every request carries: ``empathy-models/<version>``."""
    return f"empathy-models/{__version__}"


_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name (RFC 9110's token)."""

_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""What no header value holds: a control character other than a tab (a line break too)."""


def _custom_headers(headers: Mapping[str, str] | None) -> tuple[tuple[str, str | _Secret], ...]:
    if headers is None:
        return ()
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"headers must be a mapping of strings, got {shown(headers)}")
    out: list[tuple[str, str | _Secret]] = []
    for name, value in headers.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"header names must be non-empty strings, got {shown(name)}")
        if _TOKEN.fullmatch(name.strip()) is None:  # no request could carry it
            raise ConfigurationError(
                f"header name {shown(name)} is not an HTTP token (letters, digits and "
                "!#$%&'*+-.^_`|~ only)"
            )
        secret = _looks_secret(name)
        if not isinstance(value, str) or _CONTROL.search(value) is not None:
            given = "<secret>" if secret else shown(value)
            raise ConfigurationError(
                f"header {shown(name)} must have a one-line string value, got {given}"
            )
        out.append((name.strip(), _Secret(value) if secret else value))
    return tuple(out)


_SLIPS: Final = (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError)
"""What reading an odd body may raise beyond the checks: a malformed answer, like the rest."""


def _billed(
    provider: HTTPProvider,
    reader: ResponseReader,
    data: dict[str, Any],
    request: CompletionRequest,
) -> Completion | None:
    """
    A `Completion` with no content and the usage of a 2xx body the provider's `_parse`
    refused (`HTTPProvider._usage`), which the provider bills whatever else is wrong (a
    count it left out as for an answer, `answer_usage`: the output then 0, there being
    no answer to measure); None when it reports none or that cannot be read either.
    """
    try:
        usage = provider._usage(reader, data)
    except (ProviderError, *_SLIPS):
        return None
    if usage is None:
        return None
    return Completion(content="", model=request.model, **answer_usage(usage, "", ()))


def env_name_flaw(value: object) -> str | None:
    """
    Why ``value`` cannot name an environment variable (``api_key_env``), or None when
    it can: an empty string, an ``=`` or a NUL character (the environment's
    separators) or a character the environment cannot encode can name none; and an API
    key (``sk-...``: `masked_keys`) is the key itself, given in the name's place, which
    would be shown wherever the variable is named.
    """
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if masked_keys(value) != value:
        return (
            "must be the name of the environment variable holding the key (such as "
            "OPENAI_API_KEY), not the key itself: put the key in the environment"
        )
    if "=" in value or "\0" in value:
        return "must name an environment variable: it holds a '=' or a NUL character"
    try:
        os.fsencode(value)
    except UnicodeError:
        return "must name an environment variable: it holds a character the OS cannot encode"
    return None


def _key_variable(env_var: str, api_key_env: str | None, api_key_from_env: object) -> str:
    """The variable a provider reads its key from: ``api_key_env``, else ``env_var``."""
    if api_key_from_env not in (None, True, False):
        raise ConfigurationError(
            f"api_key_from_env must be True, False or None, got {shown(api_key_from_env)}"
        )
    if api_key_env is None:
        return env_var
    if (flaw := env_name_flaw(api_key_env)) is not None:
        raise ConfigurationError(f"api_key_env {flaw}, got {shown(api_key_env)}")
    if api_key_from_env is False:
        raise ConfigurationError(
            f"api_key_env={api_key_env!r} names the variable to read the key from, and "
            "api_key_from_env=False reads none: pass one or the other"
        )
    return api_key_env


def _env_key(env_var: str, allowed: bool) -> tuple[str | None, bool]:
    """The key ``env_var`` holds when ``allowed`` to read it (`_key_text`); whether one
    set was withheld."""
    if allowed:
        return _key_text(os.environ.get(env_var), f"${env_var}"), False
    return None, bool(os.environ.get(env_var, "").strip())


def _key_text(key: object, source: str) -> str | None:
    """
    An API key without the whitespace around it (the line break a key file, a
    Kubernetes secret or a CRLF ``.env`` file leaves), None when nothing is left.

    Raises:
        ConfigurationError: not a string, or a line break or NUL inside it, which no
            HTTP header can carry (the key is not shown).
    """
    if key is None:
        return None
    if not isinstance(key, str):
        raise ConfigurationError(
            f"the API key ({source}) must be a string, got {type(key).__name__}"
        )
    key = key.strip()
    if any(c in key for c in "\r\n\0"):
        raise ConfigurationError(
            f"the API key ({source}) holds a line break or a NUL character, which no "
            "request header can carry: check how it was pasted or written"
        )
    return key or None


class HTTPProvider(Provider):
    """
    A provider that POSTs JSON to ``base_url`` with aiohttp.

    Subclasses set ``env_var``, ``base_url_env_var`` and ``default_base_url`` and
    implement `_endpoint`, `_headers`, `_payload` and `_parse`.

    **Base URL and key, as the official SDKs read them.**  ``base_url=None`` means the
    ``base_url_env_var`` environment variable (``OPENAI_BASE_URL``,
    ``ANTHROPIC_BASE_URL``) when set, else the official endpoint.  ``api_key`` given is
    always used.  Without it the ``env_var`` key (``OPENAI_API_KEY``, ...) is read only
    when it cannot leak to someone else: when the base URL is the official host (over
    ``https``) or came from the environment next to the key (``api_key_from_env=None``,
    the default); ``api_key_from_env=True`` reads it for any base URL, ``False`` never.  So
    ``OpenAIProvider(name="ollama", base_url="http://localhost:11434/v1")`` never sends
    ``OPENAI_API_KEY`` (`env_key_withheld` says so).  ``api_key_env`` names the variable
    to read instead (then the ``env_var``), for any base URL.  A key is stripped, one of
    blanks is none (`_key_text`); it is held in a wrapper that never prints and is never
    logged or put in a repr or an error.  A missing key raises `MissingAPIKeyError` (an
    `AuthenticationError`) from `complete` before any request.  A ``base_url`` holding
    credentials (``user:password@``) is refused with a `ConfigurationError` (the
    password masked): aiohttp cannot send them beside the key's header; give them as
    ``headers=`` instead (``Authorization: Basic ...``, or the header a gateway reads).

    **Headers.**  Every request carries ``User-Agent: empathy-models/<version>``.
    ``headers`` are added to every request and win over the defaults (names compare
    case-insensitively).  A custom ``Authorization``, ``api-key`` or ``x-api-key`` header
    is the credential itself (Azure OpenAI's ``api-key``, a gateway's token): no
    ``api_key`` is needed then and the provider's own auth header is not sent.  Values of
    headers whose names look secret (containing ``key``, ``token``, ``auth``,
    ``secret``, ``password``, ``cookie``, ``signature`` or ``credential``) are kept like
    the key: never in a repr, an error or a log; every quoted piece of a response body
    is scrubbed of them, and of the credential of a ``<scheme> <credential>`` value
    (``Bearer <token>``) alone, whatever the status.  A value or credential shorter than
    8 characters is not scrubbed (it would mangle messages; no credential is so short).

    **Body size.**  A response body larger than ``max_response_bytes`` (default 16 MiB;
    1 to ``2**63 - 1``; a compressed body measured decompressed) is not read further:
    `InvalidResponseError` says so.  A streamed answer's events are bounded apart, by
    ``max_stream_bytes`` (default 256 MiB; 1 to ``2**63 - 1``; every byte of the body
    counts, keep-alives included; one event may be as long as ``max_response_bytes``):
    a stream that goes on past it ends with an `InvalidResponseError` that says so.

    Sessions: `bind` lends one (the executor's); ``async with provider:`` creates and
    closes one of its own.  Either way ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``
    are honoured, read when the session is bound or opened.  `complete` is safe to call
    concurrently; its cost is the request itself.
    """

    env_var: str = ""
    base_url_env_var: str = ""
    default_base_url: str = ""

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        name: str,
        timeout: float | aiohttp.ClientTimeout | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        api_key_from_env: bool | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        api_key_env: str | None = None,
        max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty string, got {shown(name)}")
        self.env_var = _key_variable(self.env_var, api_key_env, api_key_from_env)
        from_env = False
        if base_url is None:
            configured = os.environ.get(self.base_url_env_var, "").strip()
            from_env = bool(configured) and bool(self.base_url_env_var)
            base_url = configured if from_env else self.default_base_url
        base_url = self._checked_base_url(base_url, from_env)
        # the official host over https only: over plain http the key crosses in clear
        official = urlsplit(base_url).scheme == "https" and _host(base_url) == _host(
            self.default_base_url
        )
        # the kind's variable only where it cannot leak; one named for the provider anywhere
        allowed = official or from_env or api_key_env is not None
        self._env_off = api_key_from_env is False  # the caller's choice, not the URL's rule
        key, self._withheld = (
            (_key_text(api_key, "api_key"), False)
            if api_key is not None or self._env_off
            else _env_key(self.env_var, allowed or api_key_from_env is True)
        )
        self._secret: _Secret | None = _Secret(key) if key else None
        self._extra_headers = _custom_headers(headers)
        auth = [v for n, v in self._extra_headers if n.lower() in _AUTH_HEADERS]
        self._header_secret: _Secret | None = next(
            (v for v in auth if isinstance(v, _Secret) and v.reveal()), None
        )
        # what every message quoting a response is scrubbed of
        self._redacted = _Secrets(
            *((key,) if key else ()),
            *(
                text
                for _, value in self._extra_headers
                if isinstance(value, _Secret)
                for text in _scrubbed_texts(value.reveal())
            ),
        )
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._timeout = _to_timeout(timeout)
        own = [t for t in (self._timeout.total, self._timeout.sock_read) if t is not None]
        self._idle_default = min(own, default=None)  # a stream's default idle timeout
        self._max_body = check(_body_bound, "max_response_bytes", max_response_bytes)
        self._max_stream = check(_body_bound, "max_stream_bytes", max_stream_bytes)
        self._url = _request_url(self.base_url, self._endpoint())
        self._bound: aiohttp.ClientSession | None = None
        self._own: aiohttp.ClientSession | None = None
        self._headers_cache: dict[str, str] | None = None
        self._proxy: _Proxy = (None, None)
        self._exact_cache: tuple[float, aiohttp.ClientTimeout] | None = None

    def _checked_base_url(self, base_url: object, from_env: bool) -> str:
        """
        ``base_url``, or a `ConfigurationError` (never showing a password) for one that
        is no http(s) URL, does not parse, holds credentials or names no host.
        """
        where = f" (from {self.base_url_env_var})" if from_env else ""
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            given = shown(masked_url(base_url)) if isinstance(base_url, str) else shown(base_url)
            raise ConfigurationError(f"base_url must be an http(s) URL, got {given}{where}")
        given = shown(masked_url(base_url))
        try:
            parts = urlsplit(base_url)
            parts.port  # noqa: B018 -- parsed on access: refuses a port that is no number
        except ValueError as exc:  # an unclosed IPv6 bracket, a port out of range
            raise ConfigurationError(
                f"base_url is not a valid URL ({url_flaw(exc)}): {given}{where}"
            ) from None
        if "@" in parts.netloc:
            # aiohttp cannot send them beside the key's Authorization header (and the
            # official SDKs send them *instead of* the key): say how to give them
            raise ConfigurationError(
                f"base_url must not hold credentials (user:password@), got {given}{where}; "
                "pass a gateway's credentials as headers= instead (such as "
                "{'Authorization': 'Basic <base64 of user:password>'}, or the header the "
                "gateway reads), and a proxy's in HTTPS_PROXY / HTTP_PROXY"
            )
        if not parts.hostname:
            raise ConfigurationError(f"base_url has no host, got {given}{where}")
        return base_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={masked_url(self.base_url)!r})"

    @property
    def has_api_key(self) -> bool:
        """True when a key was given, found in the environment, or set as a header."""
        return self._secret is not None or self._header_secret is not None

    @property
    def env_key_withheld(self) -> bool:
        """True when `env_var` is set but not read for this base URL (see the class)."""
        return self._withheld

    @property
    def header_names(self) -> tuple[str, ...]:
        """The names of the custom ``headers`` (their values are not shown)."""
        return tuple(name for name, _ in self._extra_headers)

    def _request_headers(self) -> dict[str, str]:
        """Every request's headers: User-Agent, the API's own, then the custom ones."""
        own = self._headers(None if self._secret is None else self._secret.reveal())
        custom = {
            name: value.reveal() if isinstance(value, _Secret) else value
            for name, value in self._extra_headers
        }
        replaced = {name.lower() for name in custom}
        headers = {
            name: value
            for name, value in {"User-Agent": user_agent(), **own}.items()
            if name.lower() not in replaced
        }
        headers.update(custom)
        return headers

    # ------------------------------------------------------------------ sessions

    async def bind(self, session: aiohttp.ClientSession) -> None:
        """Send every request through ``session`` until `unbind` (the owner closes it)."""
        self._proxy = _env_proxy(self._url)
        self._bound = session

    async def unbind(self) -> None:
        """Stop using the bound session."""
        self._bound = None

    async def __aenter__(self) -> Self:
        if self._own is None or self._own.closed:
            import aiohttp

            self._proxy = _env_proxy(self._url)
            self._own = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session this provider created (a bound one is left alone)."""
        own, self._own = self._own, None
        if own is not None:
            await own.close()

    def _session(self) -> aiohttp.ClientSession:
        session = self._bound if self._bound is not None else self._own
        if session is None or session.closed:
            raise NotOpenError(
                f"{self!r} has no open HTTP session: use `async with provider:` or pass it "
                "to an EmpathyLLMExecutor"
            )
        return session

    # ------------------------------------------------------------------ the call

    async def _complete(self, request: CompletionRequest) -> Completion:
        """
        POST ``request`` and return the `Completion`, within the provider's own timeout.

        Raises a `ProviderError` subclass for every failure (see the module table) and
        `NotOpenError` when no session is open; cancellation propagates untouched.
        """
        return await self._send(request, self._timeout, None)

    async def complete(
        self,
        request: CompletionRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - one timer for the budget (see docstring)
    ) -> Completion:
        """
        POST ``request`` and return the `Completion` (see `Provider.complete`).

        ``timeout`` and the provider's own timeout share aiohttp's one per-request
        timer (no second timer), and ``timeout`` is kept exactly (aiohttp rounds long
        timeouts up to a whole second; this is not rounded).  When ``timeout`` is not
        longer than the provider's own total timeout and runs out, raises
        `AttemptTimeout` from the aiohttp error; otherwise exactly what `_complete`
        raises.
        """
        if timeout is None:
            return await self._send(request, self._timeout, None)
        if timeout <= 0:
            raise AttemptTimeout(f"{self.name}: no time left [model {request.model}]")
        own = self._timeout
        if own.total is not None and own.total < timeout:
            return await self._send(request, own, None)  # the provider's own timeout comes first
        return await self._send(
            request, self._exact_timeout(timeout), asyncio.get_running_loop().time() + timeout
        )

    # the field of a 2xx body that holds the answer (``choices``, ``content``): a body
    # without it and with an ``error`` is that error (`_parse_checked`)
    _answer_field: str = ""

    _stream_decoder: type[StreamDecoder] | None = None
    """The wire format's SSE decoder (set by each subclass); None: `stream` is not offered."""

    async def stream(
        self,
        request: CompletionRequest,
        *,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> CompletionStream:
        """
        POST ``request`` with ``"stream": true`` and return the open `CompletionStream`.

        ``idle_timeout`` bounds the wait for the first byte and each gap between chunks,
        and so does the provider's own total timeout, or its read timeout (an
        `aiohttp.ClientTimeout`'s ``sock_read``), whichever is shortest: the provider's
        timeout applies to a stream as to `complete` (its error then names it);
        ``total_timeout`` the whole stream.
        Errors before the first byte are raised here, mapped as for `complete`; later
        ones (a stall, an ``error`` event, a cut connection) by the stream's
        ``__anext__``.  See `empathy_models.providers._streaming`.
        """
        decoder = self._stream_decoder
        if decoder is None:
            return await super().stream(
                request, idle_timeout=idle_timeout, total_timeout=total_timeout
            )
        from ._streaming import open_http_stream

        return await open_http_stream(
            self, request, decoder, idle_timeout=idle_timeout, total_timeout=total_timeout
        )

    def _exact_timeout(self, total: float) -> aiohttp.ClientTimeout:
        cached = self._exact_cache
        if cached is not None and cached[0] == total:
            return cached[1]
        import aiohttp

        own = self._timeout
        timeout = aiohttp.ClientTimeout(
            total=total,
            connect=own.connect,
            sock_read=own.sock_read,
            sock_connect=own.sock_connect,
            ceil_threshold=math.inf,
        )
        self._exact_cache = (total, timeout)
        return timeout

    async def _send(
        self,
        request: CompletionRequest,
        client_timeout: aiohttp.ClientTimeout,
        budget_ends: float | None,
    ) -> Completion:
        import aiohttp  # loaded since the provider was built: a dictionary lookup

        model = request.model
        if self._secret is None and self._header_secret is None:
            raise self._missing_key(model)
        session = self._session()
        headers = self._headers_cache
        if headers is None:
            headers = self._headers_cache = self._request_headers()
        trace_headers = outgoing_headers.get()  # the attempt span's traceparent, when traced
        if trace_headers is not None:
            headers = {**headers, **trace_headers}
        payload = encode_body(self._payload(request))
        answered = False
        try:
            # never follow a redirect: it would carry the key (x-api-key survives a
            # cross-origin hop) to wherever it points; a 3xx is an unexpected status
            async with session.post(
                self._url,
                data=payload,
                headers=headers,
                timeout=client_timeout,
                allow_redirects=False,
                proxy=self._proxy[0],
                proxy_auth=self._proxy[1],
            ) as response:
                answered = True
                status = response.status
                response_headers = response.headers
                body = await read_bounded(response, self._max_body, self.name, model)
        except aiohttp.InvalidURL as exc:  # a ClientError too, but nothing was sent
            raise self._not_built(exc, model) from _without_request(exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if not answered:
                self._transport_failed(exc, model, budget_ends, None)
            self._transport_failed(exc, model, budget_ends, status, response_headers)
        except (ValueError, TypeError) as exc:
            if answered or isinstance(exc, EmpathyModelsError):
                raise
            raise self._not_built(exc, model) from _without_request(exc)
        del response  # it holds the body too; from here only `body` does
        if not 200 <= status < 300:
            error = error_from_response(
                status,
                body,
                response_headers,
                provider=self.name,
                model=model,
                secret=self._redacted,
            )
            body = b""  # this frame is in the error's traceback: let the body go
            raise error
        reader = ResponseReader(
            provider=self.name, model=model, status=status, secret=self._redacted
        )
        try:
            data = reader.decode(body)
        except InvalidResponseError:
            body = b""  # this frame is in the error's traceback: let the body go
            raise
        try:
            completion = self._parse_checked(reader, data, request, response_headers)
        except ProviderError:
            body, data = b"", {}
            raise
        exhausted = parse_ratelimit_reset(response_headers)
        if exhausted is not None:
            completion = attrs.evolve(completion, rate_limit_reset=exhausted)
        return completion

    def _parse_checked(
        self,
        reader: ResponseReader,
        data: dict[str, Any],
        request: CompletionRequest,
        headers: Mapping[str, str],
    ) -> Completion:
        """
        `_parse`, with a slip the subclass's reading did not foresee (a ``KeyError``, a
        ``TypeError`` of an odd value, nesting too deep) raised as `InvalidResponseError`;
        that error carries the usage the body reports as its ``billed`` (`_billed`).  A
        body that holds an ``error`` and no answer (``_answer_field``: a gateway's error
        sent with status 200) raises the error it stands for (`error_from_object`).
        """
        error = error_in_answer(data, self._answer_field)
        if error is not None:
            raise error_from_object(
                error,
                provider=self.name,
                model=request.model,
                where="an error instead of an answer, with a 2xx status",
                secret=self._redacted,
                headers=headers,
            )
        try:
            return self._parse(reader, data, request, headers)
        except InvalidResponseError as exc:
            exc.billed = _billed(self, reader, data, request)
            raise
        except ProviderError:
            raise
        except _SLIPS as exc:
            error = reader.error(f"{type(exc).__name__}: {exc}")
            error.billed = _billed(self, reader, data, request)
            raise error from exc

    def _usage(self, reader: ResponseReader, data: dict[str, Any]) -> dict[str, Any] | None:
        """
        The usage of a 2xx body as `Completion` fields (``input_tokens``, ``output_tokens``:
        None when left out or null, `answer_usage`; the cache counts), failing through
        ``reader``; None when it reports none or (the default) the format has no reading.
        """
        return None

    def _missing_key(self, model: str) -> MissingAPIKeyError:
        """The error for a request made without any credential (`missing_key`)."""
        off = self._env_off
        return missing_key(self.name, self.env_var, self.base_url, self._withheld, model, off)

    def _not_built(self, exc: BaseException, model: str) -> ConfigurationError:
        """
        The error of a request aiohttp refused to build (nothing was sent): a
        `ConfigurationError`, recorded as ``not_sent``, scrubbed like every message.
        """
        return error_from_local(exc, provider=self.name, model=model, secret=self._redacted)

    def _transport_failed(
        self,
        exc: BaseException,
        model: str,
        budget_ends: float | None,
        status: int | None,
        headers: Mapping[str, str] | None = None,
    ) -> NoReturn:
        """Raise the error of a request that got no answer, or no whole body.

        Args:
            exc: The aiohttp, timeout or OS error the POST raised.
            model: The requested model.
            budget_ends: The loop time the caller's time budget ends, or None.
            status: The answer's status, read before ``exc`` (None: not read).
            headers: The answer's headers, read with ``status``.

        Raises:
            AttemptTimeout: When ``exc`` is a timeout and the caller's budget is spent.
            ProviderError: Otherwise, as `error_from_transport` maps ``exc``.
        """
        if (
            budget_ends is not None
            and isinstance(exc, TimeoutError)
            and asyncio.get_running_loop().time() >= budget_ends - _TIMER_SLACK
        ):
            raise AttemptTimeout(f"{self.name}: the time budget ran out [model {model}]") from exc
        name, secret = self.name, self._redacted
        raise error_from_transport(
            exc, provider=name, model=model, secret=secret, status=status, headers=headers
        ) from _without_request(exc)

    @abc.abstractmethod
    def _endpoint(self) -> str:
        """The path appended to ``base_url``."""

    @abc.abstractmethod
    def _headers(self, api_key: str | None) -> dict[str, str]:
        """The API's own request headers (no auth header when ``api_key`` is None)."""

    @abc.abstractmethod
    def _payload(self, request: CompletionRequest) -> dict[str, Any]:
        """The JSON body for ``request``."""

    @abc.abstractmethod
    def _parse(
        self,
        reader: ResponseReader,
        data: dict[str, Any],
        request: CompletionRequest,
        headers: Mapping[str, str],
    ) -> Completion:
        """Build the `Completion` from a 2xx body, failing through ``reader``."""
