"""
What a provider's answer says about retrying it, over real HTTP on 127.0.0.1, as the
official SDKs read it: the ``x-should-retry`` header (``false``: never retried, the
executor falls back at once) and a 409 (a lock timeout: retried).
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from empathy_models import (
    AllRoutesFailedError,
    EmpathyLLMExecutor,
    ExecutionContext,
    RetryPolicy,
)
from empathy_models.backends import NullTelemetryBackend
from empathy_models.exceptions import (
    InvalidRequestError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
    ServerError,
)
from empathy_models.providers import AnthropicProvider, OpenAIProvider

from .test_wire_errors import (  # noqa: F401 - serving_replies: the fixture `server`
    KEY,
    MODEL,
    REGISTRY,
    REQUEST,
    Replies,
    openai_ok,
    serving_replies,
)


async def run(server: Replies) -> tuple[Any, list[float]]:
    """One run on the one route, three attempts allowed; its response or error, and waits."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async with EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=server.url)],
        registry=REGISTRY,
        telemetry_store=NullTelemetryBackend(),
        retry=RetryPolicy(max_attempts=3, jitter=False),
        sleep=sleep,
    ) as executor:
        try:
            return await executor.run("hello", ExecutionContext(tier="cheap")), waits
        except (AllRoutesFailedError, ProviderError) as exc:  # a 400 ends the run as itself
            return exc, waits


async def failure(server: Replies, provider: type[OpenAIProvider | AnthropicProvider]) -> Any:
    async with provider(api_key=KEY, base_url=server.url) as p:
        with pytest.raises(ProviderError) as info:
            await p.complete(REQUEST)
    return info.value


@pytest.mark.parametrize(
    ("status", "cls"), [(500, ServerError), (429, RateLimitedError), (529, ServerError)]
)
async def test_x_should_retry_false_is_never_retried(
    server: Replies, status: int, cls: type[ProviderError]
) -> None:
    server.script(
        {"error": {"type": "server_error", "message": "deterministic failure"}},
        status=status,
        headers={"x-should-retry": "false", "retry-after": "1"},
    )
    error, waits = await run(server)
    assert isinstance(error, AllRoutesFailedError)
    [leaf] = error.exceptions
    assert isinstance(leaf, cls) and leaf.should_retry is False
    assert server.requests == 1 and waits == []  # retried twice before, waiting each time
    assert RetryPolicy().is_retryable(leaf) is False


async def test_x_should_retry_is_read_from_either_api_and_kept_by_pickle(server: Replies) -> None:
    server.script({}, status=503, headers={"x-should-retry": "FALSE"})
    server.script({}, status=503, headers={"x-should-retry": "true"})
    server.script({}, status=503)
    said = [await failure(server, AnthropicProvider) for _ in range(3)]
    assert [e.should_retry for e in said] == [False, True, None]
    assert [pickle.loads(pickle.dumps(e)).should_retry for e in said] == [False, True, None]
    assert [RetryPolicy().is_retryable(e) for e in said] == [False, True, True]


async def test_x_should_retry_false_on_a_200_error_body_is_kept(server: Replies) -> None:
    server.script(
        {"error": {"code": 502, "message": "upstream"}}, headers={"x-should-retry": "false"}
    )
    error = await failure(server, OpenAIProvider)
    assert isinstance(error, ServerError) and error.should_retry is False


async def test_x_should_retry_true_does_not_retry_a_bad_request(server: Replies) -> None:
    server.script(
        {"error": {"type": "invalid_request_error", "message": "bad"}},
        status=400,
        headers={"x-should-retry": "true"},
    )
    error, waits = await run(server)
    assert isinstance(error, InvalidRequestError)  # the run ends, as for any 400
    assert server.requests == 1 and waits == []


async def test_a_409_is_a_lock_timeout_and_retried(server: Replies) -> None:
    server.script({"error": {"message": "lock timeout", "type": "conflict"}}, status=409)
    server.script(openai_ok("after the conflict"))
    response, waits = await run(server)
    assert response.content == "after the conflict"  # the run used to end on the 409
    assert server.requests == 2 and waits == [1.0]
    assert response.attempts[0].error_type == "ProviderTimeoutError"
    assert response.attempts[0].status_code == 409
    server.script({}, status=409)
    error = await failure(server, AnthropicProvider)
    assert isinstance(error, ProviderTimeoutError) and error.status == 409
