"""
User mistakes at the edges get the project's own errors, naming what was wrong, before
anything is sent or opened (issue #14, items 16 and 18).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from empathy_models import (
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    MemoryTelemetryBackend,
    Message,
    ModelInfo,
    ModelRegistry,
    RecordValidationError,
    state_store_from_url,
    telemetry_from_url,
)
from empathy_models.abc import CompletionRequest
from empathy_models.providers import AnthropicProvider
from empathy_models.testing import FakeLLMServer

KEY = "test-key-edge-0001"
REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="claude-fake-haiku",
            provider="anthropic",
            tier="cheap",
            input_price_per_mtok=0.8,
            output_price_per_mtok=4.0,
            context_window=200_000,
            max_output_tokens=8192,
        )
    ],
    price_version="edge-1",
)
CHEAP = ExecutionContext(tier="cheap")


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=3) as fake:
        yield fake


def executor_for(server: FakeLLMServer) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)],
        registry=REGISTRY,
        telemetry_store=MemoryTelemetryBackend(),
    )


# --------------------------------------------------------------------------- URLs (item 18)


@pytest.mark.parametrize("url", ["memory://foo", "null://x", "memory://h/p", "null://?a=1"])
def test_memory_and_null_urls_with_anything_after_the_scheme_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="takes no host, path or options"):
        telemetry_from_url(url)
    with pytest.raises(ConfigurationError, match="takes no host, path or options"):
        state_store_from_url(url)


def test_a_repeated_url_option_is_an_error_naming_it(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/x.db?busy_timeout=1&busy_timeout=9"
    with pytest.raises(ConfigurationError, match="'busy_timeout' is given more than once"):
        telemetry_from_url(url)
    with pytest.raises(ConfigurationError, match="'busy_timeout' is given more than once"):
        state_store_from_url(url)
    assert not (tmp_path / "x.db").exists()


# --------------------------------------------------------------------------- prompts (16, 18)


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        (None, "got NoneType"),
        (5, "got int"),
        (b"hi", "got bytes"),
        (bytearray(b"hi"), "got bytearray"),
        ("", "prompt is empty"),
        ("   \n", "prompt is empty"),
        ([Message(role="user", content="")], "prompt is empty"),
    ],
)
async def test_bad_prompts_are_refused_before_anything_is_sent(
    server: FakeLLMServer, prompt: Any, named: str
) -> None:
    async with executor_for(server) as executor:
        with pytest.raises(ConfigurationError, match=named):
            await executor.run(prompt, CHEAP)
        assert (await executor.run("hello", CHEAP)).content  # the executor still works
    assert server.requests() == 1


def test_an_absurd_max_tokens_is_refused_with_the_bound() -> None:
    with pytest.raises(ConfigurationError, match=r"max_tokens must be at most 1,000,000"):
        ExecutionContext(max_tokens=10**30)
    with pytest.raises(RecordValidationError, match=r"max_tokens must be at most 1,000,000"):
        CompletionRequest(model="m", messages="hi", max_tokens=10**30)
    assert ExecutionContext(max_tokens=1_000_000).max_tokens == 1_000_000
