"""
The response cache through `EmpathyLLMExecutor.stream`: a stream whose context sets
``cache_ttl`` is served from the cache as `run` is (the cache read before any routing,
the answer replayed as a stream, recorded as a hit), and a stream that ended whole
fills it; one that did not, never.  Real HTTP to `FakeLLMServer`, a memory and an
SQLite cache, real routers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    ConfigurationError,
    ConfigurationWarning,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
    NoModelMeetsConstraintsError,
    Outcome,
    RoutingDecision,
    StreamInterruptedError,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.cache import MemoryResponseCache
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
    return http_executor(server, options.pop("registry", REGISTRY), **options)


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


# --------------------------------------------------------------------------- no routing for a hit


class CountingRouter(AdaptiveModelRouter):
    """The real router, counting the routing decisions asked of it."""

    decisions = 0

    def get_best_model(self, *args: Any, **kwargs: Any) -> RoutingDecision:
        self.decisions += 1
        return super().get_best_model(*args, **kwargs)


def priced(input_price: float, output_price: float, **fields: Any) -> ModelRegistry:
    """`REGISTRY`'s one model at other prices (and with other ``fields``)."""
    model = attrs.evolve(
        REGISTRY.models[0],
        input_price_per_mtok=input_price,
        output_price_per_mtok=output_price,
        **fields,
    )
    return ModelRegistry(models=[model], price_version=f"cache-stream-{output_price}")


BOUNDED = attrs.evolve(CTX, max_cost=0.001, max_tokens=100)
"""A context whose cost bound the cheap registry meets and the dear one never does."""


async def test_a_cached_stream_makes_no_routing_decision(
    server: FakeLLMServer, cache_url: str
) -> None:
    router = CountingRouter(REGISTRY, seed=1)
    async with router, make(server, router=router, cache=cache_url) as executor:
        _, first = await streamed(executor, "What is GCRA?")
        decided = router.decisions
        _, again = await streamed(executor, "What is GCRA?")
        await executor.run("What is GCRA?", CTX)
    assert decided == 1 and first.routing_decision is not None
    assert again.cached and again.routing_decision is None
    assert router.decisions == decided  # neither the stream's hit nor the run's routed
    assert server.requests() == 1


async def test_a_cached_stream_is_served_when_the_router_rules_every_model_out(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """
    Two executors share a cache; the second's prices put its only model over the
    context's ``max_cost``: a run or stream it must route fails, a hit does not.
    """
    url = f"sqlite:///{tmp_path}/cache.db"
    cheap, dear = priced(0.0, 0.0), priced(1_000.0, 1_000.0)
    async with (
        AdaptiveModelRouter(cheap, seed=1) as filler_router,
        make(server, router=filler_router, cache=url, registry=cheap) as filler,
    ):
        _, filled = await streamed_in(filler, "What is GCRA?", BOUNDED)
    telemetry = MemoryTelemetryBackend()
    async with (
        CountingRouter(dear, seed=1) as router,
        make(server, router=router, cache=url, registry=dear, telemetry_store=telemetry) as ex,
    ):
        with pytest.raises(NoModelMeetsConstraintsError):
            await ex.run("Another question?", BOUNDED)  # a miss is routed: nothing fits
        ruled_out = router.decisions
        pieces, again = await streamed_in(ex, "What is GCRA?", BOUNDED)
        run_hit = await ex.run("What is GCRA?", BOUNDED)
        records = await telemetry.recent(limit=10)
    assert ruled_out == 1 and router.decisions == ruled_out
    assert again.cached and run_hit.cached and again.content == filled.content == ANSWER
    assert pieces == [ANSWER]
    assert [r.outcome for r in records] == [Outcome.CACHE_HIT, Outcome.CACHE_HIT]
    assert server.requests() == 1


async def test_a_cached_stream_is_served_when_no_model_can_stream(
    server: FakeLLMServer, cache_url: str
) -> None:
    """
    The registry's only model cannot stream: `run` fills the cache, a stream of the same
    request replays it; one the cache cannot answer fails to route, from ``async with``.
    """
    registry = priced(1.0, 4.0, capabilities=["tools", "images", "json_schema"])
    async with make(server, registry=registry, cache=cache_url) as executor:
        ran = await executor.run("What is GCRA?", CTX)
        pieces, again = await streamed(executor, "What is GCRA?")
        with pytest.raises(ConfigurationError, match="streaming"):
            async with executor.stream("Not cached yet", CTX):
                pass
        with (
            pytest.warns(ConfigurationWarning, match="on a request that samples"),
            pytest.raises(ConfigurationError, match="streaming"),
        ):
            executor.stream("Not cacheable", attrs.evolve(CTX, temperature=0.7))
    assert not ran.cached and again.cached and pieces == [ANSWER]
    assert again.content == ran.content
    assert server.requests() == 1


async def test_a_cached_stream_is_served_to_constraints_without_a_router(
    server: FakeLLMServer, cache_url: str
) -> None:
    cache = MemoryResponseCache() if cache_url == "memory://" else cache_url
    router = AdaptiveModelRouter(REGISTRY, seed=1)
    async with router, make(server, router=router, cache=cache) as filler:
        _, filled = await streamed_in(filler, "What is GCRA?", BOUNDED)
    async with make(server, cache=cache) as executor:  # no router for the constraints
        _, again = await streamed_in(executor, "What is GCRA?", BOUNDED)
        with pytest.raises(ConfigurationError, match="no router"):
            async with executor.stream("Not cached yet", BOUNDED):
                pass
    assert again.cached and again.content == filled.content
    assert server.requests() == 1


async def test_a_bad_input_raises_from_stream_even_with_the_answer_cached(
    server: FakeLLMServer,
) -> None:
    async with make(server) as executor:
        await executor.run("What is GCRA?", CTX)
        with pytest.raises(ConfigurationError, match="top_p"):
            executor.stream("What is GCRA?", CTX, top_p=2.0)
        with pytest.raises(ConfigurationError, match="ExecutionContext"):
            executor.stream("What is GCRA?", {"temperature": 0})  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="prompt"):
            executor.stream([{"role": "user"}], CTX)
    assert server.requests() == 1


async def streamed_in(
    executor: EmpathyLLMExecutor, prompt: str, context: ExecutionContext
) -> tuple[list[str | ToolCallDelta], Any]:
    """`streamed` with another context."""
    async with executor.stream(prompt, context) as stream:
        pieces = [piece async for piece in stream.events()]
        return pieces, await stream.get_final_response()
