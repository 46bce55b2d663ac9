"""
Errors a server sends with a status of success, over real HTTP on 127.0.0.1: an
OpenAI-compatible gateway's ``{"error": {...}}`` body sent with 200 (OpenRouter, LiteLLM
proxies), for a whole answer and for a streamed request answered whole, and error events
in a stream whose ``code`` is the HTTP status (OpenRouter's numeric codes).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from empathy_models import (
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMResponse,
    ModelInfo,
    ModelRegistry,
    RateLimitedError,
    RetryPolicy,
)
from empathy_models.abc import CompletionRequest
from empathy_models.backends import NullTelemetryBackend
from empathy_models.exceptions import (
    AuthenticationError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderConnectionError,
    ProviderError,
    ServerError,
)
from empathy_models.providers import AnthropicProvider, OpenAIProvider

from ._serving import cutting_short, serving

KEY = "sk-or-v1-WIREtestKEY-0123456789abcdefXYZ"
MODEL = "gw-model"
REQUEST = CompletionRequest(model=MODEL, messages="hello")


class Replies:
    """A real aiohttp server on 127.0.0.1 answering each POST with the next scripted reply."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict[str, str], bytes]] = []
        self.requests = 0
        self.url = ""

    def script(
        self, *bodies: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        sent = {"content-type": "application/json", **(headers or {})}
        for body in bodies:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.replies.append((status, sent, raw))

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        status, headers, body = self.replies.pop(0)
        return web.Response(status=status, headers=headers, body=body)


@pytest.fixture(name="server")
async def serving_replies() -> AsyncIterator[Replies]:
    """`Replies` being served (test_retry_signals.py imports it too)."""
    replies = Replies()
    async with serving("/{tail:.*}", replies._handle) as url:
        replies.url = url
        yield replies


REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id=MODEL,
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=1.0,
            context_window=100_000,
            max_output_tokens=4096,
        )
    ],
    price_version="wire-1",
)


def openai_ok(text: str = "fine") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }


async def complete(provider: OpenAIProvider | AnthropicProvider) -> Any:
    async with provider:
        return await provider.complete(REQUEST)


# --------------------------------------------------------------------------- 200 with an error


@pytest.mark.parametrize(
    ("error", "expected", "retryable"),
    [
        # OpenRouter: the upstream's failure, its HTTP status as a numeric code
        ({"code": 502, "message": "Upstream provider returned error"}, ServerError, True),
        ({"code": 429, "message": "Rate limit exceeded upstream"}, RateLimitedError, True),
        ({"code": "401", "message": "No auth credentials found"}, AuthenticationError, False),
        # OpenAI's own shape: the type says what it is
        (
            {"type": "invalid_request_error", "code": None, "message": "Bad messages[0]"},
            InvalidRequestError,
            False,
        ),
        ({"type": "server_error", "message": "The server had an error"}, ServerError, True),
        # a bare string, and an object naming nothing known: a server's failure
        ("Internal gateway failure", ServerError, True),
    ],
)
async def test_an_openai_gateways_error_sent_with_200_is_that_error(
    server: Replies, error: object, expected: type[ProviderError], retryable: bool
) -> None:
    message = error if isinstance(error, str) else error["message"]  # type: ignore[index]
    server.script({"error": error})
    with pytest.raises(ProviderError) as info:
        await complete(OpenAIProvider(api_key=KEY, base_url=server.url))
    assert type(info.value) is expected
    assert message in str(info.value)
    assert "choices" not in str(info.value)  # not a parse failure of the missing answer
    assert RetryPolicy().is_retryable(info.value) is retryable
    assert info.value.provider == "openai" and info.value.model == MODEL


async def test_the_error_with_200_is_scrubbed_and_keeps_the_retry_after(server: Replies) -> None:
    server.script(
        {"error": {"code": 429, "message": f"slow down, key {KEY}"}, "choices": []},
        headers={"retry-after": "3"},
    )
    with pytest.raises(RateLimitedError) as info:
        await complete(OpenAIProvider(api_key=KEY, base_url=server.url))
    assert KEY not in str(info.value) and "slow down, key ***" in str(info.value)
    assert info.value.retry_after == 3.0


async def test_an_anthropic_shaped_error_sent_with_200_is_that_error(server: Replies) -> None:
    server.script({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    with pytest.raises(ServerError) as info:
        await complete(AnthropicProvider(api_key=KEY, base_url=server.url))
    assert "overloaded_error" in str(info.value) and "Overloaded" in str(info.value)


async def test_a_streamed_request_answered_whole_with_an_error_raises_it(server: Replies) -> None:
    server.script({"error": {"code": 404, "message": "No endpoints found for gw-model"}})
    async with OpenAIProvider(api_key=KEY, base_url=server.url) as provider:
        with pytest.raises(ProviderError) as info:
            await provider.stream(REQUEST)
    assert type(info.value).__name__ == "ModelNotFoundError"
    assert "No endpoints found" in str(info.value)


async def _run_waiting(server: Replies) -> tuple[LLMResponse, list[float]]:
    """One run against ``server`` with retries and no jitter: its answer, and the waits."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async with EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=server.url)],
        registry=REGISTRY,
        telemetry_store=NullTelemetryBackend(),
        retry=RetryPolicy(jitter=False),
        sleep=sleep,
    ) as executor:
        return await executor.run("hello", ExecutionContext(tier="cheap")), waits


async def test_the_executor_retries_a_retryable_error_sent_with_200(server: Replies) -> None:
    server.script({"error": {"code": 502, "message": "Upstream error"}}, openai_ok("hello"))
    response, waits = await _run_waiting(server)
    assert response.content == "hello"
    assert server.requests == 2 and waits == [1.0]
    [failed, _] = response.attempts
    assert failed.error_type == "ServerError"


async def test_an_answer_beside_an_error_field_is_still_the_answer(server: Replies) -> None:
    server.script({**openai_ok("kept"), "error": None}, {**openai_ok("kept too"), "error": {}})
    provider = OpenAIProvider(api_key=KEY, base_url=server.url)
    async with provider:
        assert (await provider.complete(REQUEST)).content == "kept"
        assert (await provider.complete(REQUEST)).content == "kept too"


# --------------------------------------------------------------------------- stream events


async def test_a_stream_error_events_numeric_code_is_its_status(server: Replies) -> None:
    event = {"error": {"code": 400, "message": "Input is too long for the requested model"}}
    body = f"data: {json.dumps(event)}\n\n".encode()
    server.script(body, headers={"content-type": "text/event-stream"})
    async with OpenAIProvider(api_key=KEY, base_url=server.url) as provider:
        with pytest.raises(ProviderError) as info:
            stream = await provider.stream(REQUEST)
            _ = [piece async for piece in stream]
    assert isinstance(info.value, InvalidRequestError)  # was a ServerError, and retried
    assert "Input is too long" in str(info.value)


# --------------------------------------------------------------------------- cut error bodies


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (503, ServerError),
        (502, ServerError),
        (429, RateLimitedError),
        (499, ProviderConnectionError),
    ],
)
async def test_an_error_status_whose_body_was_cut_short_is_that_statuss_error(
    status: int, expected: type[ProviderError], streamed: bool
) -> None:
    # a load balancer's 503 (or a 429) that promises a body, sends half and hangs up
    body = b'{"error": {"message": "overloaded, try again", "type": "server_error"}}'
    head = b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\nRetry-After: 2\r\n" % status
    async with (
        cutting_short(head, body, 20) as url,
        OpenAIProvider(api_key=KEY, base_url=url) as provider,
    ):
        with pytest.raises(ProviderError) as info:
            if streamed:
                await provider.stream(REQUEST)
            else:
                await provider.complete(REQUEST)
    # it was an InvalidResponseError without status or Retry-After, never retried
    assert type(info.value) is expected
    assert (info.value.status, info.value.retry_after) == (status, 2.0)
    assert "cut short" in str(info.value)
    assert RetryPolicy().is_retryable(info.value)


# --------------------------------------------------------------------------- Gemini's errors


def gemini_error(code: int, message: str, status: str) -> list[dict[str, Any]]:
    # Gemini's OpenAI-compatible endpoint wraps its error object in a list
    return [{"error": {"code": code, "message": message, "status": status}}]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            400,
            gemini_error(
                400,
                "The input token count (1200293) exceeds the maximum number of tokens allowed "
                "(1048576).",
                "INVALID_ARGUMENT",
            ),
            ContextWindowExceededError,
        ),
        (
            429,
            gemini_error(
                429, "Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED"
            ),
            RateLimitedError,
        ),
        (
            400,
            gemini_error(
                400,
                'Invalid JSON payload received. Unknown name "reasoning": Cannot find field.',
                "INVALID_ARGUMENT",
            ),
            InvalidRequestError,
        ),
        (
            # a key Gemini refuses is a 400: the provider's key, not the request, is bad
            400,
            gemini_error(
                400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT"
            ),
            AuthenticationError,
        ),
        (
            400,
            gemini_error(400, "API key expired. Please renew the API key.", "INVALID_ARGUMENT"),
            AuthenticationError,
        ),
        (
            400,
            gemini_error(
                400, "API Key not found. Please pass a valid API key.", "INVALID_ARGUMENT"
            ),
            AuthenticationError,
        ),
        (
            # the account's region, not the request: no Gemini request can succeed
            400,
            gemini_error(
                400, "User location is not supported for the API use.", "FAILED_PRECONDITION"
            ),
            AuthenticationError,
        ),
        (
            400,
            gemini_error(
                400,
                "Gemini API free tier is not available in your country. Please enable billing "
                "on your project in Google AI Studio.",
                "FAILED_PRECONDITION",
            ),
            AuthenticationError,
        ),
        (
            # gRPC's CANCELLED: the request was cancelled on the way, not a bad request
            499,
            gemini_error(499, "The operation was cancelled.", "CANCELLED"),
            ProviderConnectionError,
        ),
    ],
)
async def test_geminis_errors_in_a_list_are_read(
    server: Replies, status: int, body: Any, expected: type[ProviderError]
) -> None:
    server.script(body, status=status)
    with pytest.raises(ProviderError) as info:
        await complete(OpenAIProvider(api_key=KEY, base_url=server.url))
    assert type(info.value) is expected
    error = body[0]["error"]
    # it quoted the list's first 120 characters, JSON-escaped, the message cut
    assert f"{error['status']}: {error['message']}" in str(info.value)


async def test_a_499_is_retried_rather_than_ending_the_run(server: Replies) -> None:
    # a request a gateway or Gemini cancelled on the way (HTTP 499, CANCELLED) says
    # nothing against the request: it used to be an InvalidRequestError, which ends the
    # run at once, with no retry and no other route tried
    cancelled = gemini_error(499, "The operation was cancelled.", "CANCELLED")
    server.script(cancelled, status=499)
    server.script(openai_ok("after the cancel"))
    response, waits = await _run_waiting(server)
    assert response.content == "after the cancel"
    assert server.requests == 2 and waits == [1.0]
    [failed, _] = response.attempts
    assert (failed.error_type, failed.status_code) == ("ProviderConnectionError", 499)


# --------------------------------------------------------------------------- self-hosted servers


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (  # llama.cpp's server (llama-server)
            400,
            {
                "error": {
                    "code": 400,
                    "message": "request (9412 tokens) exceeds the available context size "
                    "(8192 tokens), try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 9412,
                    "n_ctx": 8192,
                }
            },
        ),
        (  # Hugging Face text-generation-inference, and Together in its shape
            422,
            {
                "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be "
                "<= 4096. Given: 4000 `inputs` tokens and 1024 `max_new_tokens`",
                "error_type": "validation",
            },
        ),
    ],
    ids=["llama.cpp", "text-generation-inference"],
)
async def test_a_self_hosted_servers_context_overflow_is_a_context_window_error(
    server: Replies, status: int, body: dict[str, Any]
) -> None:
    # it was an InvalidRequestError: the run ended at once, where a model with a larger
    # context window would have been tried next
    server.script(body, status=status)
    with pytest.raises(ProviderError) as info:
        await complete(OpenAIProvider(api_key=KEY, base_url=server.url))
    assert type(info.value) is ContextWindowExceededError
    assert info.value.status == status


async def test_a_410_gone_is_a_retired_model_not_a_bad_request(server: Replies) -> None:
    # NVIDIA's API catalog answers a model past its end of life with 410 Gone (RFC 9457
    # problem details): it was an InvalidRequestError, which ends the run at once, where
    # a 404 for a retired model moves on to the next route
    detail = "The model 'vendor/old-model' has reached its end of life and is no longer available."
    problem = {"type": "about:blank", "title": "Gone", "status": 410, "detail": detail}
    server.script(problem, status=410, headers={"content-type": "application/problem+json"})
    with pytest.raises(ProviderError) as info:
        await complete(OpenAIProvider(api_key=KEY, base_url=server.url))
    assert type(info.value) is ModelNotFoundError
    assert info.value.status == 410 and "end of life" in str(info.value)


async def test_openrouters_400_for_a_model_it_does_not_know_is_a_model_not_found(
    server: Replies,
) -> None:
    # OpenRouter answers an unknown model id with a 400 "... is not a valid model ID": it
    # was an InvalidRequestError, which ends the run at once, where a 404 (or LiteLLM's
    # 400 "Invalid model name") moves on to the next route
    error = {"message": "openrouter/no-such-model is not a valid model ID", "code": 400}
    server.script({"error": error}, status=400)
    with pytest.raises(ProviderError) as info:
        await complete(OpenAIProvider(api_key=KEY, base_url=server.url))
    assert type(info.value) is ModelNotFoundError
    assert info.value.status == 400 and "is not a valid model ID" in str(info.value)
