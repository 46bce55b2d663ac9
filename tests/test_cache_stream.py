"""
The response cache through `EmpathyLLMExecutor.stream`: a stream whose context sets
``cache_ttl`` is served from the cache as `run` is (the answer replayed as a stream,
recorded as a hit), and a stream that ended whole fills it; one that did not, never.
Real HTTP to `FakeLLMServer`, a memory and an SQLite cache.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from empathy_models import (
    EmpathyLLMExecutor,
    ExecutionContext,
    Outcome,
    StreamInterruptedError,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.content import ToolCallDelta
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior

from ._fakes import KEY, WEATHER, http_executor, priced_registry

REGISTRY = priced_registry([("gpt-a", 1.0)], "cache-stream-test-1")
CTX = ExecutionContext(workflow="faq", stage="answer", temperature=0, cache_ttl=600)
ANSWER = "The answer is in three words."


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer({"gpt-a": ModelBehavior(content=ANSWER)}, api_key=KEY) as fake:
        yield fake


@pytest.fixture(params=["memory", "sqlite"])
def cache_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/cache.db"


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    options.setdefault("cache", "memory://")
    return http_executor(server, REGISTRY, **options)


async def streamed(
    executor: EmpathyLLMExecutor, prompt: str, **options: Any
) -> tuple[list[str | ToolCallDelta], Any]:
    """Every piece a stream delivers (`events`), and its final response."""
    async with executor.stream(prompt, CTX, **options) as stream:
        pieces = [piece async for piece in stream.events()]
        response = await stream.get_final_response()
        assert stream.response is response
        assert stream.model == response.model and stream.provider == response.provider
        assert stream.request_id == response.request_id
    return pieces, response


async def test_a_repeated_stream_is_answered_from_the_cache(
    server: FakeLLMServer, cache_url: str
) -> None:
    telemetry = MemoryTelemetryBackend()
    async with make(server, telemetry_store=telemetry, cache=cache_url) as executor:
        first_pieces, first = await streamed(executor, "What is GCRA?")
        again_pieces, again = await streamed(executor, "What is GCRA?")
        run_after = await executor.run("What is GCRA?", CTX)
        await executor.run("What is a token bucket?", CTX)  # a run's answer, streamed
        _, streamed_after_run = await streamed(executor, "What is a token bucket?")
        records = await telemetry.recent(limit=10)
    assert not first.cached and first.cost_usd > 0 and len(first_pieces) > 1
    assert again.cached and again.cost_usd == 0.0 and again.attempts == ()
    assert again_pieces == [ANSWER]  # the text as one delta
    assert (again.content, again.model, again.input_tokens, again.output_tokens) == (
        first.content,
        first.model,
        first.input_tokens,
        first.output_tokens,
    )
    assert run_after.cached and streamed_after_run.cached
    assert server.requests() == 2
    hits = [r for r in records if r.outcome is Outcome.CACHE_HIT]
    assert len(hits) == 3 and len(records) == 5
    assert hits[-1].request_id == again.request_id  # the oldest hit: the second stream's
    assert hits[-1].cost_usd == 0.0
    assert hits[-1].metadata["cache_cost_saved_usd"] == pytest.approx(first.cost_usd)


async def test_a_cached_stream_replays_its_tool_calls(server: FakeLLMServer) -> None:
    options: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required"}
    async with make(server) as executor:
        _, called = await streamed(executor, "weather?", **options)
        pieces, again = await streamed(executor, "weather?", **options)
    assert called.tool_calls and not called.cached
    assert again.cached and again.tool_calls == called.tool_calls
    deltas = [p for p in pieces if isinstance(p, ToolCallDelta)]
    assert [(d.index, d.id, d.name) for d in deltas] == [
        (i, c.id, c.name) for i, c in enumerate(called.tool_calls)
    ]
    assert [json.loads(d.arguments) for d in deltas] == [
        dict(c.arguments) for c in called.tool_calls
    ]
    assert "".join(p for p in pieces if isinstance(p, str)) == called.content
    assert server.requests() == 1


async def test_a_stream_that_did_not_end_whole_is_not_cached(server: FakeLLMServer) -> None:
    async with make(server) as executor:
        async with executor.stream("left early", CTX) as stream:
            async for _ in stream:
                break  # the caller leaves: the stream is cancelled
        server.set_behavior(
            "gpt-a",
            ModelBehavior(content=ANSWER, stream=StreamBehavior(chunk_chars=4, fault_after=2)),
        )
        with pytest.raises(StreamInterruptedError):
            async with executor.stream("interrupted", CTX) as stream:
                await stream.get_final_response()
        server.set_behavior("gpt-a", ModelBehavior(content=ANSWER))
        assert not (await executor.run("left early", CTX)).cached
        assert not (await executor.run("interrupted", CTX)).cached
    assert server.requests() == 4


async def test_a_cached_stream_left_unread_is_closed(server: FakeLLMServer) -> None:
    async with make(server) as executor:
        await executor.run("hello", CTX)
        async with executor.stream("hello", CTX) as stream:
            assert stream.model == "gpt-a"
        with pytest.raises(RuntimeError, match="closed before it finished"):
            await stream.get_final_response()
        assert stream.text == ""
    assert server.requests() == 1
