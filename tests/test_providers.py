"""
The HTTP providers against `FakeLLMServer` over real HTTP on 127.0.0.1, in both wire
formats: every wire outcome maps to its documented error class with provider, model,
status and retry_after set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from aiohttp import web

from empathy_models import (
    AllRoutesFailedError,
    AnthropicProvider,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    Message,
    NotOpenError,
    OpenAIProvider,
    Outcome,
    ProviderError,
    RateLimitedError,
    RetryPolicy,
)
from empathy_models.abc import CompletionRequest
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import (
    AuthenticationError,
    ContentPolicyError,
    ContextWindowExceededError,
    InvalidRequestError,
    InvalidResponseError,
    MissingAPIKeyError,
    ModelNotFoundError,
    OverloadedError,
    ProviderConnectionError,
    ProviderTimeoutError,
    ServerError,
)
from empathy_models.outcomes import classify_error
from empathy_models.providers._http import (
    HTTPProvider,
    error_from_response,
    error_from_transport,
    parse_ratelimit_reset,
    parse_retry_after,
)
from empathy_models.testing import FakeLLMServer, ModelBehavior
from tests._serving import serving

KEY = "test-key-0123456789"
MODEL = "model-a"
FORMATS = ["anthropic", "openai"]


def make_provider(
    wire: str, server: FakeLLMServer, *, key: str | None = KEY, **kwargs: Any
) -> HTTPProvider:
    if wire == "anthropic":
        return AnthropicProvider(api_key=key, base_url=server.anthropic_base_url, **kwargs)
    return OpenAIProvider(api_key=key, base_url=server.openai_base_url, **kwargs)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    behaviors = {
        MODEL: ModelBehavior(output_tokens=7, content="hello there", retry_after=7),
        "fractional": ModelBehavior(retry_after=2.5),
        "small": ModelBehavior(context_window=50),
    }
    async with FakeLLMServer(behaviors, api_key=KEY, default=None) as fake:
        yield fake


@pytest.fixture(params=FORMATS)
async def provider(
    request: pytest.FixtureRequest, server: FakeLLMServer
) -> AsyncIterator[HTTPProvider]:
    async with make_provider(request.param, server) as p:
        yield p


def req(
    model: str = MODEL, text: str = "Summarize this please.", **kwargs: Any
) -> CompletionRequest:
    return CompletionRequest(model=model, messages=text, **kwargs)


async def failure(provider: HTTPProvider, request: CompletionRequest) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await provider.complete(request)
    return info.value


def assert_error(
    exc: ProviderError,
    cls: type[ProviderError],
    provider: HTTPProvider,
    *,
    status: int | None,
    model: str = MODEL,
    retry_after: float | None = None,
) -> None:
    assert type(exc) is cls, (type(exc), exc)
    assert exc.provider == provider.name
    assert exc.model == model
    assert exc.status == status
    assert exc.retry_after == retry_after
    assert KEY not in str(exc)
    assert not isinstance(exc, KeyError)
    assert exc.__cause__ is None or KEY not in repr(exc.__cause__)


# ------------------------------------------------------------------ success


async def test_success_in_both_formats(provider: HTTPProvider, server: FakeLLMServer) -> None:
    text = "Summarize this please."
    completion = await provider.complete(
        CompletionRequest(
            model=MODEL,
            messages=[Message(role="user", content=text)],
            system="Be brief.",
            max_tokens=100,
            temperature=0.2,
        )
    )
    assert completion.content == "hello there"
    assert completion.model == MODEL
    assert completion.input_tokens == len("Be brief." + text) // 4 + 1
    assert completion.output_tokens == 7
    assert completion.request_id
    assert completion.stop_reason in ("end_turn", "stop")
    seen = server.last_request(MODEL)
    assert seen is not None
    assert seen.api == provider.name
    assert seen.body["temperature"] == 0.2
    if isinstance(provider, AnthropicProvider):
        assert seen.body["system"] == "Be brief."
        assert seen.body["max_tokens"] == 100
        assert seen.body["messages"] == [{"role": "user", "content": text}]
        assert seen.headers["anthropic-version"] == "2023-06-01"
    else:
        assert seen.body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": text},
        ]
        assert seen.body["max_tokens"] == 100  # not api.openai.com: the portable field
    assert all(KEY not in value for value in seen.headers.values())


async def test_anthropic_answers_with_a_thinking_block_give_their_text(
    server: FakeLLMServer,
) -> None:
    # the fake opens an answer with extended thinking with a thinking block, as the API
    # does: the text is the answer's, whole or streamed, the thought no delta
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
    async with make_provider("anthropic", server) as provider:
        asked = req(max_tokens=2048, extra_body=thinking)
        completion = await provider.complete(asked)
        assert completion.content == "hello there" and completion.output_tokens == 7
        stream = await provider.stream(asked)
        pieces = [str(piece) async for piece in stream]
        await stream.aclose()
        assert "".join(pieces) == "hello there"
        assert stream.completion().output_tokens == 7


async def test_max_tokens_cap_is_reported_as_the_stop_reason(provider: HTTPProvider) -> None:
    completion = await provider.complete(req(max_tokens=3))
    assert completion.output_tokens == 3
    assert completion.stop_reason in ("max_tokens", "length")


async def test_two_hundred_concurrent_calls_over_a_borrowed_session(
    server: FakeLLMServer,
) -> None:
    anthropic = make_provider("anthropic", server)
    openai = make_provider("openai", server)
    async with aiohttp.ClientSession() as session:
        await anthropic.bind(session)
        await openai.bind(session)
        results = await asyncio.gather(*(p.complete(req()) for p in [anthropic, openai] * 100))
        await anthropic.unbind()
        await openai.unbind()
        assert not session.closed  # the owner closes a borrowed session, not the provider
    assert len(results) == 200
    assert server.requests(MODEL) == 200
    with pytest.raises(NotOpenError, match="no open HTTP session"):
        await anthropic.complete(req())


async def test_own_session_is_closed_on_exit(server: FakeLLMServer) -> None:
    provider = make_provider("openai", server)
    with pytest.raises(NotOpenError, match="async with provider"):
        await provider.complete(req())
    async with provider:
        assert (await provider.complete(req())).content == "hello there"
    with pytest.raises(NotOpenError):
        await provider.complete(req())


# ------------------------------------------------------------------ HTTP errors


async def test_400_invalid_request(provider: HTTPProvider, server: FakeLLMServer) -> None:
    server.script(MODEL, [400])
    assert_error(await failure(provider, req()), InvalidRequestError, provider, status=400)


async def test_400_context_window_from_the_script(
    provider: HTTPProvider, server: FakeLLMServer
) -> None:
    server.script(MODEL, ["context_length"])
    exc = await failure(provider, req())
    assert_error(exc, ContextWindowExceededError, provider, status=400)
    assert isinstance(exc, InvalidRequestError)


async def test_400_context_window_from_a_long_prompt(provider: HTTPProvider) -> None:
    exc = await failure(provider, req("small", "word " * 100, max_tokens=10))
    assert_error(exc, ContextWindowExceededError, provider, status=400, model="small")


async def test_400_content_policy(provider: HTTPProvider, server: FakeLLMServer) -> None:
    server.script(MODEL, ["content_policy"])
    assert_error(await failure(provider, req()), ContentPolicyError, provider, status=400)


async def test_401_wrong_key(server: FakeLLMServer, wire: str) -> None:
    async with make_provider(wire, server, key="wrong-key-abcdef") as provider:
        exc = await failure(provider, req())
    assert_error(exc, AuthenticationError, provider, status=401)
    assert "wrong-key-abcdef" not in str(exc)
    assert isinstance(exc, PermissionError)


async def test_403_is_an_authentication_error(
    provider: HTTPProvider, server: FakeLLMServer
) -> None:
    server.script(MODEL, [403])
    assert_error(await failure(provider, req()), AuthenticationError, provider, status=403)


async def test_404_unknown_model(provider: HTTPProvider, server: FakeLLMServer) -> None:
    exc = await failure(provider, req("no-such-model"))
    assert_error(exc, ModelNotFoundError, provider, status=404, model="no-such-model")
    assert server.requests("no-such-model") == 0


async def test_429_with_retry_after(provider: HTTPProvider, server: FakeLLMServer) -> None:
    server.script(MODEL, [429])
    exc = await failure(provider, req())
    assert_error(exc, RateLimitedError, provider, status=429, retry_after=7.0)


async def test_429_fractional_retry_after(provider: HTTPProvider, server: FakeLLMServer) -> None:
    server.script("fractional", [429])
    exc = await failure(provider, req("fractional"))
    # Anthropic sends whole seconds in Retry-After; OpenAI also sends retry-after-ms
    expected = 3.0 if isinstance(provider, AnthropicProvider) else 2.5
    assert_error(
        exc, RateLimitedError, provider, status=429, model="fractional", retry_after=expected
    )


async def test_500_server_error(provider: HTTPProvider, server: FakeLLMServer) -> None:
    server.script(MODEL, [500])
    assert_error(await failure(provider, req()), ServerError, provider, status=500)


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_other_5xx_are_server_errors(
    provider: HTTPProvider, server: FakeLLMServer, status: int
) -> None:
    server.script(MODEL, [status])
    exc = await failure(provider, req())
    retry = 7.0 if status == 503 else None
    assert_error(exc, ServerError, provider, status=status, retry_after=retry)
    if status != 503:
        assert "non-JSON body" in str(exc)  # the gateway's HTML page, not InvalidResponseError


async def test_529_overloaded(provider: HTTPProvider, server: FakeLLMServer) -> None:
    server.script(MODEL, [529])
    exc = await failure(provider, req())
    assert_error(exc, OverloadedError, provider, status=529, retry_after=7.0)
    assert isinstance(exc, ServerError)


# ------------------------------------------------------------------ transport failures


@pytest.mark.parametrize(
    "client_timeout", [0.2, aiohttp.ClientTimeout(sock_read=0.2)], ids=["total", "sock_read"]
)
async def test_timeout_on_a_hanging_server(
    server: FakeLLMServer, wire: str, client_timeout: float | aiohttp.ClientTimeout
) -> None:
    # aiohttp raises asyncio.TimeoutError for the total and ServerTimeoutError (also a
    # ClientConnectionError) for sock_read: both are timeouts, not connection errors
    server.script(MODEL, ["hang"])
    async with make_provider(wire, server, timeout=client_timeout) as provider:
        exc = await failure(provider, req())
    assert_error(exc, ProviderTimeoutError, provider, status=None)
    assert isinstance(exc, TimeoutError)


async def test_connection_refused(server: FakeLLMServer, wire: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # nothing listens on the port any more
    if wire == "anthropic":
        provider: HTTPProvider = AnthropicProvider(api_key=KEY, base_url=f"http://127.0.0.1:{port}")
    else:
        provider = OpenAIProvider(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1")
    async with provider:
        exc = await failure(provider, req())
    assert_error(exc, ProviderConnectionError, provider, status=None)
    assert isinstance(exc, ConnectionError)


async def test_connection_reset(provider: HTTPProvider, server: FakeLLMServer) -> None:
    server.script(MODEL, ["reset"])
    assert_error(await failure(provider, req()), ProviderConnectionError, provider, status=None)


@pytest.mark.parametrize("action", ["malformed", "incomplete"])
async def test_bad_bodies_are_invalid_responses(
    provider: HTTPProvider, server: FakeLLMServer, action: str
) -> None:
    server.script(MODEL, [action])
    exc = await failure(provider, req())
    assert_error(exc, InvalidResponseError, provider, status=200)
    if action == "incomplete":
        assert "response." in str(exc)  # names the missing field


async def test_truncated_body_is_an_invalid_response(
    provider: HTTPProvider, server: FakeLLMServer
) -> None:
    server.script(MODEL, ["truncated"])
    exc = await failure(provider, req())
    assert_error(exc, InvalidResponseError, provider, status=200)  # the status was read
    assert "cut short" in str(exc)


async def test_cancellation_passes_through_untouched(
    provider: HTTPProvider, server: FakeLLMServer
) -> None:
    server.script(MODEL, ["hang"])
    task = asyncio.create_task(provider.complete(req()))
    await server.wait_for_requests(1, MODEL)  # the request is in the server
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the provider still works afterwards
    assert (await provider.complete(req())).content == "hello there"


# ------------------------------------------------------------------ keys and configuration


@pytest.mark.parametrize(
    ("factory", "env_var"),
    [(AnthropicProvider, "ANTHROPIC_API_KEY"), (OpenAIProvider, "OPENAI_API_KEY")],
)
async def test_missing_key_fails_before_any_request(
    server: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
    factory: Callable[..., HTTPProvider],
    env_var: str,
) -> None:
    monkeypatch.delenv(env_var, raising=False)
    provider = factory(base_url=server.url)
    assert not provider.has_api_key
    async with provider:
        exc = await failure(provider, req())
    assert type(exc) is MissingAPIKeyError
    assert isinstance(exc, AuthenticationError) and isinstance(exc, ConfigurationError)
    assert classify_error(exc) is Outcome.NOT_SENT
    assert env_var in str(exc)
    assert server.requests() == 0


@pytest.mark.parametrize("wire", FORMATS)
async def test_key_from_the_environment(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, wire: str
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # a 127.0.0.1 base URL is not the official host: reading the key there is asked for
    async with make_provider(wire, server, key=None, api_key_from_env=True) as provider:
        assert provider.has_api_key
        assert (await provider.complete(req())).output_tokens == 7


@pytest.mark.parametrize("wire", FORMATS)
@pytest.mark.parametrize("written", [KEY + "\n", KEY + "\r\n", f"  {KEY}\r"])
async def test_a_key_with_the_line_break_of_its_file_is_the_key(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, wire: str, written: str
) -> None:
    # a key read from a file, a Kubernetes secret or a CRLF .env ends in a line break,
    # which no request header may carry: every call failed, "the request could not be
    # built", naming no key
    monkeypatch.setenv("ANTHROPIC_API_KEY", written)
    monkeypatch.setenv("OPENAI_API_KEY", written)
    async with make_provider(wire, server, key=None, api_key_from_env=True) as from_env:
        assert (await from_env.complete(req())).output_tokens == 7
    async with make_provider(wire, server, key=written) as given:
        assert (await given.complete(req())).output_tokens == 7


KEYED = pytest.mark.parametrize(
    ("factory", "env_var"),
    [(AnthropicProvider, "ANTHROPIC_API_KEY"), (OpenAIProvider, "OPENAI_API_KEY")],
)


@KEYED
def test_a_key_that_no_header_can_carry_is_refused_when_the_provider_is_made(
    monkeypatch: pytest.MonkeyPatch, factory: Callable[..., HTTPProvider], env_var: str
) -> None:
    monkeypatch.setenv(env_var, "sk-first-half\nsk-second-half")
    with pytest.raises(ConfigurationError, match=rf"\${env_var}\) holds a line break"):
        factory()
    for key, message in (
        ("sk-abc\x00def", "holds a line break or a NUL"),
        (b"sk-bytes-key", "must be a string, got bytes"),
        (12345678, "must be a string, got int"),
    ):
        with pytest.raises(ConfigurationError, match=message) as refused:
            factory(api_key=key)
        assert "sk-" not in str(refused.value)


@KEYED
def test_a_key_of_blanks_is_no_key(
    monkeypatch: pytest.MonkeyPatch, factory: Callable[..., HTTPProvider], env_var: str
) -> None:
    # as an empty variable: the provider is keyless (left out by the executor, with
    # MissingAPIKeyWarning), not keyed with blanks every call of which fails with a 401
    monkeypatch.setenv(env_var, "  ")
    assert not factory().has_api_key
    assert not factory(api_key=" \n").has_api_key


@pytest.mark.parametrize(
    "build",
    [
        lambda key: OpenAIProvider(api_key="x", base_url=key),
        lambda key: AnthropicProvider(api_key="x", base_url=key),
        lambda key: ExecutionContext(temperature=key),
        lambda key: ExecutionContext(max_tokens=key),
    ],
    ids=["openai base_url", "anthropic base_url", "temperature", "max_tokens"],
)
@pytest.mark.parametrize("key", ["sk-proj-Abc123_def456-ghi789", "sk-ant-api03-Abc123_def456"])
def test_a_key_given_as_another_argument_is_not_quoted_by_its_error(
    build: Callable[[str], object], key: str
) -> None:
    # an API key passed in the wrong place: the error (often logged) says what is wrong
    # without the key
    with pytest.raises(ConfigurationError) as raised:
        build(key)
    assert key not in str(raised.value) and key[:12] not in str(raised.value)
    assert "sk-***" in str(raised.value)


def test_repr_shows_name_and_url_but_never_the_key() -> None:
    anthropic = AnthropicProvider(api_key="sk-ant-secret-value")
    openai = OpenAIProvider(api_key="sk-secret-value", name="vllm", base_url="http://gpu:8000/v1/")
    assert repr(anthropic) == (
        "AnthropicProvider(name='anthropic', base_url='https://api.anthropic.com')"
    )
    assert repr(openai) == "OpenAIProvider(name='vllm', base_url='http://gpu:8000/v1')"
    for provider, key in ((anthropic, "sk-ant-secret-value"), (openai, "sk-secret-value")):
        assert key not in repr(provider)
        assert key not in str(vars(provider))


def test_openai_max_tokens_field_depends_on_the_server() -> None:
    assert OpenAIProvider(api_key="k").max_tokens_field == "max_completion_tokens"
    assert OpenAIProvider(api_key="k", base_url="http://localhost:11434/v1").max_tokens_field == (
        "max_tokens"
    )
    forced = OpenAIProvider(
        api_key="k", max_tokens_field="max_completion_tokens", base_url="http://localhost:8000/v1"
    )
    assert forced.max_tokens_field == "max_completion_tokens"


async def test_anthropic_base_url_may_end_in_v1(server: FakeLLMServer) -> None:
    async with AnthropicProvider(api_key=KEY, base_url=server.url + "/v1/") as provider:
        assert (await provider.complete(req())).content == "hello there"


@pytest.mark.parametrize(
    "kwargs",
    [{"base_url": "ftp://x"}, {"name": ""}, {"timeout": 0}, {"timeout": -1.0}],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        AnthropicProvider(api_key="k", **kwargs)


# ------------------------------------------------------------------ the mapping itself


def test_overloaded_body_on_another_status_is_overloaded() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    exc = error_from_response(500, body, {}, provider="anthropic", model="m")
    assert type(exc) is OverloadedError
    assert exc.status == 500


def test_keys_echoed_by_the_server_are_scrubbed() -> None:
    body = (
        b'{"error":{"message":"Incorrect API key provided: sk-proj-abcdefgh1234. '
        b'Also my-literal-key.","type":"invalid_request_error","code":"invalid_api_key"}}'
    )
    from empathy_models.providers._wire import _Secret

    exc = error_from_response(
        401, body, {}, provider="openai", model="m", secret=_Secret("my-literal-key")
    )
    assert "sk-proj-abcdefgh1234" not in str(exc)
    assert "my-literal-key" not in str(exc)
    assert "invalid_api_key" in str(exc)


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": "12"}) == 12.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = "Tue, 14 Nov 2023 22:13:50 GMT"  # now + 30 s
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30.0)
    assert parse_retry_after({"retry-after": date}, now=now + 100) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequestError),
        (408, ProviderTimeoutError),
        (409, ProviderTimeoutError),
        (413, InvalidRequestError),
        (422, InvalidRequestError),
        (302, InvalidResponseError),
        (599, ServerError),
    ],
)
def test_status_table(status: int, cls: type[ProviderError]) -> None:
    exc = error_from_response(status, b"", {}, provider="p", model="m")
    assert type(exc) is cls
    assert exc.status == status


@pytest.fixture(params=FORMATS)
def wire(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (aiohttp.ServerTimeoutError("read"), ProviderTimeoutError),
        (aiohttp.ConnectionTimeoutError("connect"), ProviderTimeoutError),
        (TimeoutError(), ProviderTimeoutError),
        (aiohttp.ServerDisconnectedError(), ProviderConnectionError),
        (ConnectionResetError(104, "reset"), ProviderConnectionError),
        (aiohttp.ClientPayloadError("cut"), InvalidResponseError),
    ],
)
def test_transport_table(exc: BaseException, cls: type[ProviderError]) -> None:
    mapped = error_from_transport(exc, provider="p", model="m")
    assert type(mapped) is cls
    assert (mapped.provider, mapped.model, mapped.status) == ("p", "m", None)


def test_ratelimit_reset_headers() -> None:
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    anthropic = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:32Z",
        "anthropic-ratelimit-tokens-remaining": "5000",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T22:20:00Z",
    }
    assert parse_ratelimit_reset(anthropic, now=now) == pytest.approx(12.0)
    openai = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m30.5s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "250ms",
    }
    assert parse_ratelimit_reset(openai, now=now) == pytest.approx(90.5)
    assert parse_ratelimit_reset({"x-ratelimit-remaining-requests": "3"}) is None
    assert (
        parse_ratelimit_reset(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"}
        )
        is None
    )
    # used for a 429 only when Retry-After is absent
    body = b'{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}'
    limited = error_from_response(429, body, openai, provider="openai", model="m")
    assert limited.retry_after == pytest.approx(90.5)
    hinted = error_from_response(
        429, body, openai | {"retry-after": "2"}, provider="openai", model="m"
    )
    assert hinted.retry_after == 2.0
    assert error_from_response(500, body, openai, provider="openai", model="m").retry_after is None


async def test_402_payment_required_is_an_account_error(
    provider: HTTPProvider, server: FakeLLMServer
) -> None:
    """Out of credit (402, Anthropic's billing_error) is the account, not the request."""
    server.script(MODEL, [402])
    assert_error(await failure(provider, req()), AuthenticationError, provider, status=402)


@contextlib.asynccontextmanager
async def _broken_http() -> AsyncIterator[str]:
    """A gateway answering every request with a 200 whose Content-Length is no number."""

    async def broken_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await writer.drain()
        writer.close()

    gateway = await asyncio.start_server(broken_http, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{gateway.sockets[0].getsockname()[1]}/v1"
    finally:
        gateway.close()
        await gateway.wait_closed()


async def test_an_unparsable_response_leaves_no_key_in_the_chained_cause(wire: str) -> None:
    """
    A gateway answering broken HTTP makes aiohttp raise an error that carries the
    request (and its headers, the key among them); the cause we chain must not.
    """

    secret = "sk-live-0123456789abcdef"
    cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
    async with _broken_http() as url, cls(api_key=secret, base_url=url) as provider:
        exc = await failure(provider, req())
    assert isinstance(exc, InvalidResponseError)
    assert isinstance(exc.__cause__, aiohttp.ClientResponseError)
    chain = [exc, exc.__cause__]
    for item in chain:
        assert secret not in repr(item) and secret not in str(item)
        assert secret not in repr(getattr(item, "args", ()))
    assert secret not in repr(exc.__cause__.request_info)


async def test_an_unparsable_streamed_answer_leaves_no_key_in_the_error_chain(wire: str) -> None:
    """
    The same for a stream: the aiohttp error is the context of the one raised (chained
    with ``from None``, but kept as ``__context__``), and held the request's headers.
    """

    secret = "sk-live-0123456789abcdef"
    cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
    async with _broken_http() as url, cls(api_key=secret, base_url=url) as provider:
        with pytest.raises(InvalidResponseError) as info:
            await provider.stream(req())
    chained: list[BaseException] = []
    item: BaseException | None = info.value
    while item is not None:
        chained.append(item)
        item = item.__cause__ or item.__context__
    assert any(isinstance(e, aiohttp.ClientResponseError) for e in chained)
    for e in chained:
        assert secret not in repr(e) and secret not in str(e)
        assert secret not in repr(getattr(e, "request_info", None))


@pytest.mark.parametrize(
    "head",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # no HTTP at all
        b"HTTP/1.1 200 OK\r\nX-Trace: " + b"a" * 20_000 + b"\r\n\r\n",  # a header too long
    ],
    ids=["not-http", "long-header"],
)
@pytest.mark.parametrize("streamed", [False, True])
async def test_an_unparsable_answer_claims_no_status_the_server_never_sent(
    wire: str, head: bytes, streamed: bool
) -> None:
    """aiohttp's parser reports its own 400 for a head it cannot read: no server's status."""

    async def broken_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        await writer.drain()
        writer.close()

    gateway = await asyncio.start_server(broken_http, "127.0.0.1", 0)
    try:
        port = gateway.sockets[0].getsockname()[1]
        cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
        async with cls(api_key="k", base_url=f"http://127.0.0.1:{port}/v1") as provider:
            with pytest.raises(InvalidResponseError) as info:
                if streamed:
                    await provider.stream(req())
                else:
                    await provider.complete(req())
    finally:
        gateway.close()
        await gateway.wait_closed()
    assert "unreadable response" in str(info.value)
    assert info.value.status is None


def test_a_key_cut_by_the_body_snippet_is_not_half_shown() -> None:
    """A plain-text error echoing the key across the snippet's cut must not show a part."""
    from empathy_models.providers._wire import _Secret

    key = "gw-key-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    body = ("Unauthorized. " + "." * 80 + f" rejected key {key}").encode()
    exc = error_from_response(401, body, {}, provider="gateway", model="m", secret=_Secret(key))
    text = str(exc)
    assert "non-JSON body" in text
    for start in range(len(key) - 7):
        assert key[start : start + 8] not in text, text


def test_openai_insufficient_quota_429_is_an_account_error_not_a_rate_limit() -> None:
    """
    OpenAI answers 429 ``insufficient_quota`` when the account has no credit: waiting and
    retrying cannot help, so it is not a `RateLimitedError` (a true rate limit still is).
    """
    body = (
        b'{"error":{"message":"You exceeded your current quota, please check your plan and '
        b'billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}'
    )
    exc = error_from_response(429, body, {}, provider="openai", model="m")
    assert type(exc) is AuthenticationError
    assert exc.status == 429
    limited = error_from_response(
        429,
        b'{"error":{"message":"Rate limit reached","type":"requests",'
        b'"code":"rate_limit_exceeded"}}',
        {"retry-after": "2"},
        provider="openai",
        model="m",
    )
    assert type(limited) is RateLimitedError and limited.retry_after == 2.0


def test_a_403_naming_a_model_the_project_may_not_use_is_model_not_found() -> None:
    """
    OpenAI's 403 ``model_not_found`` names one model (a `ModelNotFoundError`, like a
    404); any other 403 is the key's (an `AuthenticationError`).
    """
    body = (
        b'{"error":{"message":"Project `proj_1` does not have access to model `gpt-4o`",'
        b'"type":"invalid_request_error","param":null,"code":"model_not_found"}}'
    )
    exc = error_from_response(403, body, {}, provider="openai", model="gpt-4o")
    assert type(exc) is ModelNotFoundError and exc.status == 403
    denied = error_from_response(
        403,
        b'{"error":{"message":"not allowed","type":"permission_error"}}',
        {},
        provider="openai",
        model="gpt-4o",
    )
    assert type(denied) is AuthenticationError


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Your credit balance is too low to access the Anthropic API. Please go to "
            "Plans & Billing to upgrade or purchase credits.",
            AuthenticationError,
        ),
        ("This organization has been disabled.", AuthenticationError),
        ("max_tokens: 100000 > 8192, the maximum for this model", InvalidRequestError),
        ("messages: the credit balance field is unknown", InvalidRequestError),
    ],
)
def test_anthropic_account_errors_sent_as_a_400_are_account_errors(
    message: str, expected: type[Exception]
) -> None:
    """Out of credit and a disabled organization come as 400s; other 400s stay requests'."""
    body = json.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    ).encode()
    exc = error_from_response(400, body, {}, provider="anthropic", model="m")
    assert type(exc) is expected and exc.status == 400


async def test_a_redirect_is_not_followed_so_the_key_never_reaches_another_host(
    wire: str,
) -> None:
    """
    An API POST is never redirected legitimately; following a 307 to another origin
    would hand it the key (aiohttp drops ``Authorization`` there, not ``x-api-key``).
    """
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"error": {"message": "gotcha"}}, status=400)

    async def redirecting(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://localhost:{other_port}{request.path}")

    apps = []
    ports = []
    for handler in (elsewhere, redirecting):
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        apps.append(runner)
        ports.append(runner.addresses[0][1])
    other_port, port = ports
    secret = "sk-live-redirect-0123456789"
    try:
        cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
        async with cls(api_key=secret, base_url=f"http://127.0.0.1:{port}/v1") as provider:
            exc = await failure(provider, req())
    finally:
        for runner in apps:
            await runner.cleanup()
    assert seen == []
    assert isinstance(exc, InvalidResponseError)
    assert exc.status == 307
    assert secret not in str(exc)
    # the message says what happened and where the redirect pointed
    assert f"a redirect to 'http://localhost:{other_port}/v1/" in str(exc)
    assert "not followed" in str(exc)


async def test_a_redirects_target_is_shown_without_its_secrets(wire: str) -> None:
    secret = "sk-live-redirect-0123456789"
    target = f"https://user:pw-0123456@gw.example/v1?api-key=qs-secret-42&echo={secret}"

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently(target)

    path = "/v1/messages" if wire == "anthropic" else "/v1/chat/completions"
    async with serving(path, moved) as url:
        cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
        async with cls(api_key=secret, base_url=f"{url}/v1") as provider:
            exc = await failure(provider, req())
    assert isinstance(exc, InvalidResponseError) and exc.status == 301
    assert "a redirect to 'https://user:***@gw.example/v1?api-key=***&echo=***'" in str(exc)
    assert all(s not in str(exc) for s in (secret, "pw-0123456", "qs-secret-42"))


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"detail": "Not Found"}, "HTTP 404: Not Found ["),  # FastAPI, a wrong path
        (422, {"detail": [{"loc": ["body"], "msg": "field required"}]}, "HTTP 422: body: '{"),
        (502, ["upstream", "failed"], "HTTP 502: body: '["),
    ],
    ids=["detail", "fastapi-422", "json-list"],
)
async def test_a_json_error_of_another_shape_is_quoted_as_json(
    wire: str, status: int, body: Any, expected: str
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    path = "/v1/messages" if wire == "anthropic" else "/v1/chat/completions"
    async with serving(path, answer) as url:
        cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
        async with cls(api_key=KEY, base_url=f"{url}/v1") as provider:
            exc = await failure(provider, req())
    assert exc.status == status and expected in str(exc)
    assert "non-JSON" not in str(exc)


# --------------------------------------------------------------------------- secret headers echoed

TOKEN = "gw_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
# (header, value sent, what the server echoes): a scheme's credential may come back alone
SECRET_HEADERS = [
    pytest.param("X-Gateway-Token", TOKEN, TOKEN, id="token"),
    pytest.param("X-Team-Credential", "cred-0123456789abcdef", "cred-0123456789abcdef", id="cred"),
    pytest.param("Authorization", f"Bearer {TOKEN}", TOKEN, id="bearer"),
    pytest.param(
        "Authorization", "Basic dXNlcjpwYXNzd29yZDEyMw==", "dXNlcjpwYXNzd29yZDEyMw==", id="basic"
    ),
]


async def _sse_answer(request: web.Request, data: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(f"data: {data}\n\n".encode())
    await response.write_eof()
    return response


# how a careless server echoes it: (streamed?, the answer for the echoed text)
ECHOES: dict[str, tuple[bool, Callable[[web.Request, str], Awaitable[web.StreamResponse]]]] = {
    "500 JSON message": (
        False,
        lambda r, s: _json_answer({"error": {"message": f"rejected {s} here"}}, 500),
    ),
    "502 text body": (False, lambda r, s: _text_answer(f"saw {s} and failed", 502)),
    "200 non-JSON body": (False, lambda r, s: _text_answer(f"saw {s} and failed", 200)),
    "error event": (
        True,
        lambda r, s: _sse_answer(
            r, json.dumps({"type": "error", "error": {"message": f"rejected {s} here"}})
        ),
    ),
    "malformed event": (True, lambda r, s: _sse_answer(r, "{saw " + s)),
}


async def _json_answer(body: Any, status: int) -> web.StreamResponse:
    return web.json_response(body, status=status)


async def _text_answer(text: str, status: int) -> web.StreamResponse:
    return web.Response(text=text, status=status)


@contextlib.asynccontextmanager
async def echo_server(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A server on 127.0.0.1 answering every POST with ``answer``; yields its base URL."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("echo", list(ECHOES))
@pytest.mark.parametrize(("header", "value", "echoed"), SECRET_HEADERS)
async def test_secret_header_values_echoed_by_the_server_are_scrubbed(
    wire: str, echo: str, header: str, value: str, echoed: str
) -> None:
    streamed, answer = ECHOES[echo]

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.headers[header] == value  # sent as given
        return await answer(request, echoed)

    async with echo_server(handler) as url:
        cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
        async with cls(api_key=KEY, base_url=f"{url}/v1", headers={header: value}) as provider:
            with pytest.raises(ProviderError) as caught:
                if streamed:
                    stream = await provider.stream(req())
                    await stream.__anext__()
                else:
                    await provider.complete(req())
    text = str(caught.value)
    assert "***" in text
    assert not any(echoed[i : i + 8] in text for i in range(len(echoed) - 7)), text


async def test_a_secret_header_echoed_reaches_no_record_or_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        token = request.headers["X-Gateway-Token"]
        return web.json_response({"error": {"message": f"gateway rejected {token}"}}, status=500)

    telemetry = MemoryTelemetryBackend()
    caplog.set_level(logging.DEBUG, "empathy_models")
    async with echo_server(handler) as url:
        provider = OpenAIProvider(
            api_key="sk-test-aaaa", base_url=f"{url}/v1", headers={"X-Gateway-Token": TOKEN}
        )
        async with EmpathyLLMExecutor(
            [provider],
            telemetry_store=telemetry,
            retry=RetryPolicy.none(),
            fallback=FallbackPolicy(max_routes=1),
        ) as executor:
            with pytest.raises(AllRoutesFailedError) as caught:
                await executor.run("hi", ExecutionContext(model="gpt-4o-mini"))
    [record] = await telemetry.recent()
    assert "gateway rejected ***" in (record.error_message or "")
    assert TOKEN not in str(caught.value.exceptions[0])
    assert TOKEN not in caplog.text


GATEWAY_KEY = "gw-tok/AbC+dEf=GhIjKlMnOp"  # a gateway token: base64, with '/', '+', '='


@pytest.mark.parametrize("echo", list(ECHOES))
@pytest.mark.parametrize(
    "encode",
    [lambda k: k, lambda k: quote(k, safe=""), quote_plus, lambda k: quote(k)],
    ids=["raw", "percent-encoded", "form-encoded", "path-encoded"],
)
async def test_a_key_echoed_url_encoded_is_scrubbed(
    wire: str, echo: str, encode: Callable[[str], str]
) -> None:
    # a gateway that quotes the token back as it read it from a query or a form
    streamed, answer = ECHOES[echo]
    echoed = encode(GATEWAY_KEY)

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await answer(request, echoed)

    async with echo_server(handler) as url:
        cls = AnthropicProvider if wire == "anthropic" else OpenAIProvider
        async with cls(api_key=GATEWAY_KEY, base_url=f"{url}/v1") as provider:
            with pytest.raises(ProviderError) as caught:
                if streamed:
                    stream = await provider.stream(req())
                    await stream.__anext__()
                else:
                    await provider.complete(req())
    text = str(caught.value)
    assert "***" in text
    assert "AbC" not in text and "GhIjKlMnOp" not in text, text


@pytest.mark.parametrize("password", ["Xy7/Qz+9", "Xy7#Qz9", "Xy7?Qz9", "Xy7@Qz/9"])
async def test_a_url_password_with_an_unencoded_delimiter_quoted_back_is_scrubbed(
    password: str,
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await _text_answer(f"upstream http://alice:{password}@proxy:3128 refused", 502)

    async with echo_server(handler) as url, OpenAIProvider(api_key=KEY, base_url=url) as provider:
        error = await failure(provider, req())
    assert "Xy7" not in str(error) and "Qz" not in str(error), str(error)
    assert "http://alice:***@proxy:3128 refused" in str(error)


async def test_short_secret_header_values_are_not_scrubbed() -> None:
    """Scrubbing ``on`` everywhere would mangle messages; no credential is that short."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"error": {"message": "turned on: mode on"}}, status=500)

    async with (
        echo_server(handler) as url,
        OpenAIProvider(
            base_url=f"{url}/v1", headers={"X-Auth-Mode": "on", "Authorization": f"Bearer {TOKEN}"}
        ) as provider,
    ):
        error = await failure(provider, req())
    assert "turned on: mode on" in str(error)


@pytest.mark.parametrize("key", ["k", "test", "sk-1"])
async def test_a_very_short_key_is_scrubbed_where_it_stands_alone_not_inside_words(
    key: str,
) -> None:
    """A local server's key ``k`` must not turn ``tokens`` into ``to***ens``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        message = f"too many tokens, latest request: key {key} rejected ({key})"
        return web.json_response({"error": {"message": message}}, status=500)

    async with (
        echo_server(handler) as url,
        OpenAIProvider(api_key=key, base_url=f"{url}/v1") as provider,
    ):
        error = await failure(provider, req())
    assert "too many tokens, latest request: key *** rejected (***)" in str(error), str(error)
