"""
Providers on corporate networks, over real HTTP on 127.0.0.1: proxies from the
environment (a tiny aiohttp proxy in the test), ``OPENAI_BASE_URL`` /
``ANTHROPIC_BASE_URL``, the environment key sent only where it belongs, the
``User-Agent`` and custom headers.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from empathy_models import (
    AllRoutesFailedError,
    AnthropicProvider,
    BreakerPolicy,
    CircuitBreaker,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    MissingAPIKeyWarning,
    ModelInfo,
    ModelRegistry,
    OpenAIProvider,
    Outcome,
    __version__,
)
from empathy_models.abc import CompletionRequest
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import (
    AuthenticationError,
    MissingAPIKeyError,
    ProviderConnectionError,
)
from empathy_models.testing import FakeLLMServer
from tests._serving import anthropic_answering, serving

KEY = "gateway-key-0123"
ENV_KEY = "sk-real-openai-key-from-the-environment"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def req(model: str = "m") -> CompletionRequest:
    return CompletionRequest(model=model, messages="hello")


def one_model(model_id: str, provider: str) -> ModelRegistry:
    """A registry of one cheap model of ``provider``."""
    info = ModelInfo(
        id=model_id,
        provider=provider,
        tier="cheap",
        input_price_per_mtok=1.0,
        output_price_per_mtok=1.0,
        context_window=10_000,
        max_output_tokens=1000,
    )
    return ModelRegistry(models=[info], price_version="network-test")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy, base URL or key from the machine running the tests leaks in."""
    for name in (*PROXY_VARS, "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


class Proxy:
    """
    A forwarding HTTP proxy on 127.0.0.1: it records every request (method, target,
    headers) and forwards plain-HTTP ones; CONNECT tunnels are refused with 403.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""
        self._runner: web.ServerRunner | None = None

    async def __aenter__(self) -> Proxy:
        runner = web.ServerRunner(web.Server(self._handle), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner = runner
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append((request.method, request.raw_path, dict(request.headers)))
        if request.method == "CONNECT":
            return web.Response(status=403, text="no tunnels")
        hop = {"host", "proxy-connection", "content-length", "connection"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, request.raw_path, data=await request.read(), headers=headers
            ) as upstream,
        ):
            body = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=body,
                content_type=upstream.content_type,
            )


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    async with Proxy() as p:
        yield p


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as fake:
        yield fake


# --------------------------------------------------------------------------- proxies


async def test_http_proxy_carries_the_executor_requests(
    server: FakeLLMServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # NO_PROXY is unset: 127.0.0.1 is proxied
    async with EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
        registry=one_model("m", "openai"),
        telemetry_store=MemoryTelemetryBackend(),
    ) as executor:
        response = await executor.run("hello", ExecutionContext(tier="cheap"))
    assert response.content == "Reply from m."
    assert [(m, target) for m, target, _ in proxy.seen] == [
        ("POST", server.openai_base_url + "/chat/completions")
    ]
    assert server.requests("m") == 1


async def test_a_provider_session_of_its_own_uses_the_proxy_too(
    server: FakeLLMServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url) as provider:
        await provider.complete(req())
    assert [m for m, _, _ in proxy.seen] == ["POST"]


async def test_https_proxy_is_asked_for_a_tunnel_to_the_official_host(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS endpoints go through HTTPS_PROXY with CONNECT (this proxy refuses it)."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    async with OpenAIProvider(api_key=KEY) as provider:
        with pytest.raises(ProviderConnectionError, match="proxy refused"):
            await provider.complete(req())
    assert [(m, target) for m, target, _ in proxy.seen] == [("CONNECT", "api.openai.com:443")]
    # the tunnel request carries no credential: the key would only travel inside TLS
    assert not any(name.lower() == "authorization" for name in proxy.seen[0][2])


async def test_no_proxy_bypasses_the_proxy(
    server: FakeLLMServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with OpenAIProvider(api_key=KEY, base_url=server.openai_base_url) as provider:
        await provider.complete(req())
    assert proxy.seen == []
    assert server.requests("m") == 1


# --------------------------------------------------------------------------- base URLs and keys


async def test_openai_base_url_is_read_from_the_environment(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # configured together, as the SDK reads them
    async with OpenAIProvider() as provider:
        assert provider.base_url == server.openai_base_url
        assert (await provider.complete(req())).content == "Reply from m."
    assert server.requests("m") == 1


async def test_anthropic_base_url_is_read_from_the_environment(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.anthropic_base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    async with AnthropicProvider() as provider:
        assert (await provider.complete(req())).content == "Reply from m."


def test_the_official_endpoint_is_the_default() -> None:
    assert OpenAIProvider(api_key="k").base_url == "https://api.openai.com/v1"
    assert AnthropicProvider(api_key="k").base_url == "https://api.anthropic.com"


def test_a_bad_base_url_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:8000")
    with pytest.raises(ConfigurationError, match="OPENAI_BASE_URL"):
        OpenAIProvider(api_key="k")


async def test_a_custom_base_url_never_sends_the_openai_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``OpenAIProvider(name="ollama", base_url=...)`` without api_key sends no env key."""
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    async with FakeLLMServer(api_key=ENV_KEY) as ollama:
        provider = OpenAIProvider(name="ollama", base_url=ollama.openai_base_url)
        assert not provider.has_api_key
        async with provider:
            with pytest.raises(AuthenticationError, match="api_key_from_env=True") as info:
                await provider.complete(req())
        assert ENV_KEY not in str(info.value)
        assert ollama.requests() == 0  # nothing reached the server, key or no key


async def test_a_custom_base_url_sends_its_own_key_not_the_environment_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server accepts only its own key: a request with OPENAI_API_KEY would get 401."""
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    async with FakeLLMServer(api_key="ollama") as ollama:
        async with OpenAIProvider(
            "ollama", name="ollama", base_url=ollama.openai_base_url
        ) as provider:
            await provider.complete(req())
        async with OpenAIProvider(
            name="ollama", base_url=ollama.openai_base_url, api_key_from_env=True
        ) as asked:
            with pytest.raises(AuthenticationError, match="401"):
                await asked.complete(req())  # sent, as asked: the server refuses it


async def test_a_keyless_custom_provider_in_the_executor_is_never_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    async with FakeLLMServer() as local:  # it would accept any key
        ollama = OpenAIProvider(name="ollama", base_url=local.openai_base_url)
        with pytest.warns(MissingAPIKeyWarning, match="only sent to the official endpoint"):
            executor = EmpathyLLMExecutor(
                [ollama],
                registry=one_model("llama", "ollama"),
                telemetry_store=MemoryTelemetryBackend(),
            )
        async with executor:
            with pytest.raises(ConfigurationError, match="no API key"):
                await executor.run("hello", ExecutionContext(tier="cheap"))
        assert local.requests() == 0


def test_api_key_from_env_false_never_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    assert OpenAIProvider().has_api_key
    assert not OpenAIProvider(api_key_from_env=False).has_api_key


def test_env_key_withheld_tells_a_provider_whose_variable_is_not_sent_to_its_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    local = "http://127.0.0.1:9/v1"
    assert OpenAIProvider(name="ollama", base_url=local).env_key_withheld
    assert not OpenAIProvider(name="ollama", base_url=local, api_key_from_env=True).env_key_withheld
    assert not OpenAIProvider().env_key_withheld  # the official host: read
    assert not OpenAIProvider("k", name="ollama", base_url=local).env_key_withheld
    monkeypatch.delenv("OPENAI_API_KEY")
    assert not OpenAIProvider(name="ollama", base_url=local).env_key_withheld  # not set


@pytest.mark.parametrize(
    ("provider_class", "plain"),
    [(OpenAIProvider, "http://api.openai.com/v1"), (AnthropicProvider, "http://api.anthropic.com")],
)
def test_the_official_host_over_plain_http_is_not_sent_the_environments_key(
    monkeypatch: pytest.MonkeyPatch,
    provider_class: type[OpenAIProvider] | type[AnthropicProvider],
    plain: str,
) -> None:
    # the key would cross the network in clear text before any redirect to https
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    provider = provider_class(base_url=plain)
    assert provider.env_key_withheld and not provider.has_api_key
    assert provider_class(base_url=plain.replace("http:", "https:")).has_api_key


@pytest.mark.parametrize("provider_class", [OpenAIProvider, AnthropicProvider])
async def test_api_key_env_names_the_variable_the_key_is_read_from(
    monkeypatch: pytest.MonkeyPatch,
    provider_class: type[OpenAIProvider] | type[AnthropicProvider],
) -> None:
    """A variable named for the provider is read for its base URL, whatever the host."""
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    monkeypatch.delenv("TEAM_GATEWAY_KEY", raising=False)
    async with FakeLLMServer(api_key=KEY) as gateway:
        url = (
            gateway.openai_base_url
            if provider_class is OpenAIProvider
            else gateway.anthropic_base_url
        )
        keyless = provider_class(name="gw", base_url=url, api_key_env="TEAM_GATEWAY_KEY")
        assert not keyless.has_api_key and not keyless.env_key_withheld
        assert keyless.env_var == "TEAM_GATEWAY_KEY"
        async with keyless:
            with pytest.raises(MissingAPIKeyError, match="set TEAM_GATEWAY_KEY") as info:
                await keyless.complete(req())
        assert ENV_KEY not in str(info.value)
        monkeypatch.setenv("TEAM_GATEWAY_KEY", KEY)
        async with provider_class(name="gw", base_url=url, api_key_env="TEAM_GATEWAY_KEY") as keyed:
            answer = await keyed.complete(req())
        assert answer.content and gateway.requests() == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"api_key_env": ""}, "api_key_env must be a non-empty string"),
        ({"api_key_env": "A=B"}, "api_key_env must name an environment variable"),
        ({"api_key_env": "TEAM_KEY", "api_key_from_env": False}, "one or the other"),
    ],
)
def test_an_api_key_env_that_cannot_be_read_is_refused(options: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        OpenAIProvider(name="gw", base_url="http://127.0.0.1:9/v1", **options)


# --------------------------------------------------------------------------- headers


async def test_requests_carry_a_user_agent(server: FakeLLMServer) -> None:
    for provider in (
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
    ):
        async with provider:
            await provider.complete(req())
        recorded = server.last_request("m")
        assert recorded is not None
        assert recorded.headers["User-Agent"] == f"empathy-models/{__version__}"


async def test_custom_headers_are_sent_and_win_over_the_defaults(server: FakeLLMServer) -> None:
    headers = {"X-Gateway-Team": "search", "user-agent": "my-app/2.0"}
    async with OpenAIProvider(
        api_key=KEY, base_url=server.openai_base_url, headers=headers
    ) as provider:
        await provider.complete(req())
    recorded = server.last_request("m")
    assert recorded is not None
    assert recorded.headers["X-Gateway-Team"] == "search"
    assert recorded.headers["User-Agent"] == "my-app/2.0"  # one User-Agent, the caller's
    assert provider.header_names == ("X-Gateway-Team", "user-agent")


async def test_an_api_key_header_is_the_credential(
    server: FakeLLMServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure style: ``headers={"api-key": ...}`` and no api_key; no Authorization is sent."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # the proxy sees every header on the wire
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    provider = OpenAIProvider(
        name="azure", base_url=server.openai_base_url, headers={"api-key": "azure-secret-1"}
    )
    assert provider.has_api_key
    async with provider:
        with pytest.raises(AuthenticationError):  # FakeLLMServer wants Bearer auth
            await provider.complete(req())
    [(_, _, sent)] = proxy.seen
    lowered = {k.lower(): v for k, v in sent.items()}
    assert lowered["api-key"] == "azure-secret-1"
    assert "authorization" not in lowered


def test_secret_looking_header_values_stay_out_of_reprs_and_errors() -> None:
    provider = OpenAIProvider(
        name="gw",
        base_url="http://gateway.internal/v1",
        headers={"X-Gateway-Token": "tok-very-secret", "X-Team": "search"},
        api_key="k",
    )
    assert "tok-very-secret" not in repr(provider)
    assert "tok-very-secret" not in str(vars(provider))
    with pytest.raises(ConfigurationError) as info:
        OpenAIProvider(api_key="k", headers={"X-Api-Key": "bad\nvalue-secret"})
    assert "value-secret" not in str(info.value)


def test_a_secret_in_the_base_urls_query_stays_out_of_reprs_and_errors() -> None:
    # a gateway that takes its key in the query (?api-key=, ?key=, ?sig=)
    provider = OpenAIProvider(
        name="gw", base_url="http://gateway.internal/v1?api-key=qs-very-secret&team=a", api_key="k"
    )
    assert repr(provider) == (
        "OpenAIProvider(name='gw', base_url='http://gateway.internal/v1?api-key=***&team=a')"
    )
    with pytest.raises(ConfigurationError) as info:
        OpenAIProvider(api_key="k", base_url="http://gateway.internal:port/v1?sig=qs-very-secret")
    assert "qs-very-secret" not in str(info.value) and "sig=***" in str(info.value)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_the_base_urls_query_stays_the_query_of_every_request(
    kind: str, streamed: bool
) -> None:
    # a gateway's key or Azure's api-version in the query: the endpoint goes on the path
    queries: list[dict[str, str]] = []
    answer = anthropic_answering({"input_tokens": 1, "output_tokens": 1})

    async def handler(request: web.Request) -> web.StreamResponse:
        queries.append(dict(request.query))
        if kind == "anthropic":
            return await answer(request)
        return web.json_response(
            {
                "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        )

    path = "/gw/v1/chat/completions" if kind == "openai" else "/gw/v1/messages"
    async with serving(path, handler) as url:
        base_url = f"{url}/gw/v1/?api-version=2024-10-21&team=a"
        provider_class = OpenAIProvider if kind == "openai" else AnthropicProvider
        async with provider_class(name="gw", base_url=base_url, api_key=KEY) as provider:
            request = CompletionRequest(model="m", messages="hi")
            if streamed:
                stream = await provider.stream(request)
                content = "".join([piece async for piece in stream if isinstance(piece, str)])
            else:
                content = (await provider.complete(request)).content
    assert content == "ok"
    assert queries == [{"api-version": "2024-10-21", "team": "a"}]


@pytest.mark.parametrize("headers", [{"": "x"}, {"a:b": "x"}, {"X": 3}])
def test_malformed_headers_are_refused(headers: Any) -> None:
    with pytest.raises(ConfigurationError, match="header"):
        OpenAIProvider(api_key="k", headers=headers)


async def test_a_stream_without_a_key_says_why_the_environment_key_was_withheld(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the same error as complete(): the key is set, but not for this host
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    async with FakeLLMServer() as local:
        provider = OpenAIProvider(name="ollama", base_url=local.openai_base_url)
        async with provider:
            with pytest.raises(MissingAPIKeyError, match="only sent to the official endpoint"):
                await provider.stream(req())
        assert local.requests() == 0


# --------------------------------------------------------------------------- credentials in URLs


async def test_a_proxy_variable_that_is_no_url_is_a_configuration_error(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://gw:SECRETPW-proxy@[::1")
    provider = OpenAIProvider(name="gw", api_key=KEY, base_url=server.openai_base_url)
    with pytest.raises(ConfigurationError, match="HTTP_PROXY") as info:
        async with provider:
            pass
    assert "SECRETPW-proxy" not in str(info.value)


PASSWORD = "SECRETPW-gateway-4242"


def gateway_session() -> aiohttp.ClientSession:
    """A session with a gateway's basic auth of its own (deprecated in aiohttp, still there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return aiohttp.ClientSession(auth=aiohttp.BasicAuth("gw", PASSWORD))


@pytest.mark.parametrize("provider_class", [OpenAIProvider, AnthropicProvider])
@pytest.mark.parametrize("userinfo", [f"gw:{PASSWORD}@", f":{PASSWORD}@", f"{PASSWORD}@"])
def test_credentials_in_the_base_url_are_refused_and_never_shown(
    provider_class: type[OpenAIProvider] | type[AnthropicProvider], userinfo: str
) -> None:
    # aiohttp cannot send them beside the key's header; the official SDKs silently send
    # them instead of the key: refused when the provider is built, saying what to do
    with pytest.raises(ConfigurationError, match=r"must not hold credentials.*headers=") as info:
        provider_class(api_key="k", base_url=f"https://{userinfo}gateway.internal/v1")
    assert PASSWORD not in str(info.value)
    assert "gateway.internal" in str(info.value)


def test_credentials_in_the_base_url_from_the_environment_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://gw:{PASSWORD}@gateway.internal/v1")
    with pytest.raises(ConfigurationError, match="OPENAI_BASE_URL") as info:
        OpenAIProvider(api_key="k")
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://gw:{PASSWORD}@gateway.internal/",
        f"gw:{PASSWORD}@gateway.internal/v1",
        f"http://gw:{PASSWORD}@[::1/v1",
        f"http://gw:{PASSWORD}@gateway.internal:port/v1",
    ],
)
def test_a_bad_base_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError, match="base_url") as info:
        OpenAIProvider(api_key="k", base_url=url)
    assert PASSWORD not in str(info.value)
    assert "gw:***@" in str(info.value)


@pytest.mark.parametrize("password", ["Xy7/Qz+9", "Xy7#Qz9", "Xy7?Qz9", "Xy7@Qz/9"])
@pytest.mark.parametrize("from_env", [False, True], ids=["argument", "OPENAI_BASE_URL"])
def test_a_base_url_password_with_an_unencoded_delimiter_is_never_shown(
    monkeypatch: pytest.MonkeyPatch, password: str, from_env: bool
) -> None:
    # "gw:Xy7" is no host:port: the error names the URL masked, without the parser's
    # message (which quotes the text it took for a port)
    url = f"https://gw:{password}@gateway.internal/v1"
    with pytest.raises(ConfigurationError, match="base_url") as info:
        if from_env:
            monkeypatch.setenv("OPENAI_BASE_URL", url)
            OpenAIProvider(api_key="k")
        else:
            OpenAIProvider(api_key="k", base_url=url)
    message = str(info.value)
    assert "Xy7" not in message and "Qz" not in message, message
    assert "gw:***@gateway.internal" in message


@pytest.mark.parametrize("url", ["http:///v1", "https://:443/v1"])
def test_a_base_url_without_a_host_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="base_url has no host"):
        OpenAIProvider(api_key="k", base_url=url)


async def test_a_request_that_cannot_be_built_is_a_configuration_error_not_sent(
    server: FakeLLMServer,
) -> None:
    # a borrowed session with basic auth of its own: aiohttp refuses to build a request
    # that also carries the key's Authorization header, before anything is sent
    async with gateway_session() as session:
        provider = OpenAIProvider(name="gw", api_key=KEY, base_url=server.openai_base_url)
        await provider.bind(session)
        with pytest.raises(ConfigurationError, match="nothing was sent") as info:
            await provider.complete(req())
        assert not isinstance(info.value, MissingAPIKeyError)
        with pytest.raises(ConfigurationError, match="nothing was sent"):
            await provider.stream(req())
    assert server.requests() == 0


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "stream"])
async def test_a_request_that_cannot_be_built_counts_against_no_model(
    server: FakeLLMServer, streamed: bool
) -> None:
    telemetry = MemoryTelemetryBackend()
    breaker = CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1))
    async with gateway_session() as session:
        provider = OpenAIProvider(name="gw", api_key=KEY, base_url=server.openai_base_url)
        executor = EmpathyLLMExecutor(
            [provider],
            registry=one_model("m", "gw"),
            telemetry_store=telemetry,
            breaker=breaker,
            session=session,
        )
        async with executor, breaker:
            for _ in range(2):  # the second run is not refused by an opened circuit
                with pytest.raises(AllRoutesFailedError) as info:
                    if streamed:
                        async with executor.stream("hello", ExecutionContext(tier="cheap")):
                            pass
                    else:
                        await executor.run("hello", ExecutionContext(tier="cheap"))
                (error,) = info.value.exceptions
                assert isinstance(error, ConfigurationError)
                assert "nothing was sent" in str(error)
            records = await telemetry.recent(limit=10)
    assert [r.outcome for r in records] == [Outcome.NOT_SENT, Outcome.NOT_SENT]
    assert all(PASSWORD not in (r.error_message or "") for r in records)
    assert server.requests() == 0


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "stream"])
async def test_routes_where_nothing_was_sent_leave_max_routes_to_the_models_called(
    server: FakeLLMServer, streamed: bool
) -> None:
    # three OpenAI routes whose requests cannot be built (the borrowed session's auth=),
    # then an Anthropic one that can: the default FallbackPolicy (max_routes=3) reaches it
    def cheap(model_id: str, provider: str, price: float) -> ModelInfo:
        return ModelInfo(
            id=model_id,
            provider=provider,
            tier="cheap",
            input_price_per_mtok=price,
            output_price_per_mtok=price,
            context_window=10_000,
            max_output_tokens=1000,
        )

    registry = ModelRegistry(
        models=[
            cheap("o-1", "openai", 0.1),
            cheap("o-2", "openai", 0.2),
            cheap("o-3", "openai", 0.3),
            cheap("a-1", "anthropic", 1.0),
        ],
        price_version="network-test",
    )
    telemetry = MemoryTelemetryBackend()
    async with gateway_session() as session:
        providers = [
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
        ]
        executor = EmpathyLLMExecutor(
            providers,
            registry=registry,
            telemetry_store=telemetry,
            session=session,
            concurrency_per_provider=8,  # within the session's pool (else a warning)
        )
        async with executor:
            if streamed:
                async with executor.stream("hello", ExecutionContext(tier="cheap")) as stream:
                    response = await stream.get_final_response()
            else:
                response = await executor.run("hello", ExecutionContext(tier="cheap"))
            records = await telemetry.recent(limit=10)
    assert response.model == "a-1"
    assert response.fallback_chain == ("o-1", "o-2", "o-3", "a-1")
    assert sorted(r.outcome.value for r in records) == ["not_sent"] * 3 + ["success"]
    assert server.request_counts() == {"a-1": 1}


async def test_a_key_variable_turned_off_at_the_official_host_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the variable is set and the host is the official one: only the caller's choice
    # kept the key unread, which is what the error must say
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    provider = OpenAIProvider(api_key_from_env=False)
    assert not provider.has_api_key and not provider.env_key_withheld
    with pytest.raises(MissingAPIKeyError, match="api_key_from_env=False") as info:
        await provider.complete(req())
    assert "official endpoint" not in str(info.value)
