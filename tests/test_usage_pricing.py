"""
What a call costs beyond its plain input and output tokens: Anthropic's prompt-cache
writes (5-minute and 1-hour) and reads and its server-side web searches, which
``usage.input_tokens`` leaves out, are priced into records, responses and budgets,
streamed or not.  Real HTTP against a bare aiohttp server on 127.0.0.1 that answers
with the APIs' own usage shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
from aiohttp import web

from empathy_models import (
    AllRoutesFailedError,
    Budget,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    LLMResponse,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    Tool,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import (
    ConfigurationError,
    InvalidResponseError,
    RecordValidationError,
)
from empathy_models.limits import MemoryQuotaStore
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from tests._serving import Handler, anthropic_answering, serving

pytestmark = pytest.mark.filterwarnings("error")

KEY = "test-key-0123"
CLAUDE = ModelInfo(
    id="claude-cache",
    provider="anthropic",
    tier="cheap",
    input_price_per_mtok=1.0,
    output_price_per_mtok=5.0,
    context_window=200_000,
    max_output_tokens=8192,
)
REGISTRY = ModelRegistry(models=[CLAUDE], price_version="usage-pricing-1")

# Anthropic's usage of a call that wrote 100,000 prompt tokens to the cache (60,000 to
# the 1-hour cache), read 40,000 from it and ran 2 web searches: input_tokens excludes
# every cache token
ANTHROPIC_USAGE: dict[str, Any] = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 100_000,
    "cache_read_input_tokens": 40_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 40_000, "ephemeral_1h_input_tokens": 60_000},
    "output_tokens": 20,
    "server_tool_use": {"web_search_requests": 2},
}
# as Anthropic bills it: input $1/MTok, 5-minute writes 1.25x, 1-hour writes 2x, reads
# 0.1x, output $5/MTok, $10 per 1,000 searches
BILLED = (12 * 1.0 + 40_000 * 1.25 + 60_000 * 2.0 + 40_000 * 0.1 + 20 * 5.0) / 1e6 + 2 * 0.01


DATED = "claude-cache-20251001"


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


# what the API's message_delta reports: the cumulative counts, without the cache
# write's split by TTL, which only message_start gives (its SDKs keep that one)
DELTA_USAGE: dict[str, Any] = {k: v for k, v in ANTHROPIC_USAGE.items() if k != "cache_creation"}


def _anthropic_answering(delta_usage: dict[str, Any]) -> Handler:
    """Answers with ANTHROPIC_USAGE; streamed, with ``delta_usage`` in message_delta."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        # the model id reported is a dated snapshot of the one asked for, as the API's is
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": DATED}
        if not body.get("stream"):
            return web.json_response(
                {
                    **message,
                    "content": [{"type": "text", "text": "hi there"}],
                    "stop_reason": "end_turn",
                    "usage": ANTHROPIC_USAGE,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        start = {**ANTHROPIC_USAGE, "output_tokens": 1}
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"message": {**message, "content": [], "usage": start}}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
            ("content_block_stop", {"index": 0}),
            ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": delta_usage}),
            ("message_stop", {}),
        ]
        for kind, data in events:
            await response.write(_event(kind, {"type": kind, **data}))
        return response

    return handler


_anthropic = _anthropic_answering(ANTHROPIC_USAGE)


@pytest.fixture
async def anthropic_url() -> AsyncIterator[str]:
    async with serving("/v1/messages", _anthropic) as url:
        yield url


def _executor(
    url: str, telemetry: MemoryTelemetryBackend, quota: MemoryQuotaStore
) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [AnthropicProvider(api_key=KEY, base_url=url)],
        registry=REGISTRY,
        telemetry_store=telemetry,
        budgets=[Budget(limit_usd=100)],
        quota_store=quota,
    )


CONTEXT = ExecutionContext(workflow="w", stage="s", model="claude-cache", max_tokens=50)


def _check_billed(response: LLMResponse, record: LLMCallRecord, spent: float) -> None:
    assert response.input_tokens == record.input_tokens == 12  # the uncached input, as reported
    assert response.response_model == DATED and record.model == "claude-cache"
    assert math.isclose(response.cost_usd, BILLED, rel_tol=1e-9)
    assert math.isclose(record.cost_usd, BILLED, rel_tol=1e-9)
    assert math.isclose(spent, BILLED, rel_tol=1e-6)
    assert record.metadata["empathy_models.cache_write_tokens"] == 40_000
    assert record.metadata["empathy_models.cache_write_1h_tokens"] == 60_000
    assert record.metadata["empathy_models.cache_read_tokens"] == 40_000
    assert record.metadata["empathy_models.web_search_requests"] == 2


async def _answered(
    executor: EmpathyLLMExecutor,
    prompt: str,
    context: ExecutionContext,
    streamed: bool,
    **options: Any,
) -> LLMResponse:
    """``executor.run(prompt, context, **options)``'s answer, or its stream's read to the end."""
    if not streamed:
        return await executor.run(prompt, context, **options)
    async with executor.stream(prompt, context, **options) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_response()


async def test_anthropic_cache_tokens_and_web_searches_are_priced_in_run(
    anthropic_url: str,
) -> None:
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    async with _executor(anthropic_url, telemetry, quota) as executor:
        response = await executor.run("hello", CONTEXT)
    (record,) = await telemetry.recent(limit=10)
    (usage,) = await quota.usages()
    _check_billed(response, record, usage.spent_usd)


@pytest.mark.parametrize(
    "delta_usage",
    [ANTHROPIC_USAGE, DELTA_USAGE],
    ids=["delta-with-split", "delta-as-the-api-sends"],
)
async def test_anthropic_cache_tokens_and_web_searches_are_priced_in_stream(
    delta_usage: dict[str, Any],
) -> None:
    """
    The cache write's split by TTL comes in message_start; message_delta's cumulative
    count without it keeps that split (1-hour writes cost 2x, 5-minute ones 1.25x).
    """
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    async with (
        serving("/v1/messages", _anthropic_answering(delta_usage)) as url,
        _executor(url, telemetry, quota) as executor,
        executor.stream("hello", CONTEXT) as stream,
    ):
        async for _ in stream:
            pass
        response = await stream.get_final_response()
    (record,) = await telemetry.recent(limit=10)
    (usage,) = await quota.usages()
    _check_billed(response, record, usage.spent_usd)


async def test_a_cache_write_without_its_split_is_priced_as_the_5_minute_cache() -> None:
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 1000, "output_tokens": 5}
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    async with (
        serving("/v1/messages", anthropic_answering(usage)) as url,
        _executor(url, telemetry, quota) as executor,
    ):
        response = await executor.run("hello", CONTEXT)
    (record,) = await telemetry.recent(limit=10)
    assert math.isclose(response.cost_usd, (10 + 1000 * 1.25 + 5 * 5.0) / 1e6, rel_tol=1e-9)
    assert record.metadata["empathy_models.cache_write_tokens"] == 1000
    assert "empathy_models.cache_write_1h_tokens" not in record.metadata
    assert "empathy_models.cache_read_tokens" not in record.metadata


def test_a_registry_entry_may_give_its_own_cache_prices() -> None:
    registry = ModelRegistry.from_dict(
        {
            "price_version": "x",
            "models": [
                {
                    **CLAUDE.to_dict(),
                    "cache_write_price_per_mtok": 3.0,
                    "cache_write_1h_price_per_mtok": 4.0,
                    "cache_read_price_per_mtok": 0.0,
                }
            ],
        }
    )
    model = registry.get("claude-cache")
    cost = model.cost(
        10,
        5,
        cache_write_tokens=1000,
        cache_write_1h_tokens=100,
        cache_read_tokens=5000,
        web_search_requests=1,
    )
    assert math.isclose(cost, (10 + 5 * 5.0 + 1000 * 3.0 + 100 * 4.0) / 1e6 + 0.01, rel_tol=1e-9)
    assert model.to_dict()["cache_read_price_per_mtok"] == 0.0  # a free read is kept
    assert ModelRegistry.from_dict(registry.to_dict()) == registry
    assert "cache_read_price_per_mtok" not in CLAUDE.to_dict()  # the default multiplier
    assert CLAUDE.cost(0, 0, cache_read_tokens=1_000_000) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="cache_read_tokens"):
        CLAUDE.cost(0, 0, cache_read_tokens=-1)


# --------------------------------------------------------------------------- OpenAI format

# OpenAI's usage of a call 99,968 of whose 100,000 prompt tokens came from the cache:
# prompt_tokens includes them
OPENAI_USAGE: dict[str, Any] = {
    "prompt_tokens": 100_000,
    "completion_tokens": 20,
    "total_tokens": 100_020,
    "prompt_tokens_details": {"cached_tokens": 99_968},
}


async def _openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    base = {"id": "chatcmpl-1", "model": f"{body['model']}-2025-08-07"}
    if not body.get("stream"):
        return web.json_response(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi there"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": OPENAI_USAGE,
            }
        )
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**base, "object": "chat.completion.chunk"}
    for data in [
        {**chunk, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": OPENAI_USAGE},
    ]:
        await response.write(f"data: {json.dumps(data)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.mark.parametrize("streamed", [False, True])
async def test_openai_cached_input_is_priced_at_the_cached_rate(streamed: bool) -> None:
    # gpt-5 in the default table: input $1.25/MTok, cached input $0.125/MTok, output $10
    billed = ((100_000 - 99_968) * 1.25 + 99_968 * 0.125 + 20 * 10.0) / 1e6
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    context = ExecutionContext(workflow="w", stage="s", model="gpt-5", max_tokens=50)
    async with (
        serving("/v1/chat/completions", _openai) as url,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=url + "/v1")],
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
        ) as executor,
    ):
        response = await _answered(executor, "hello", context, streamed)
    (record,) = await telemetry.recent(limit=10)
    (usage,) = await quota.usages()
    assert response.input_tokens == record.input_tokens == 100_000  # cached ones included
    assert response.response_model == "gpt-5-2025-08-07" and record.model == "gpt-5"
    assert math.isclose(response.cost_usd, billed, rel_tol=1e-9)
    assert math.isclose(record.cost_usd, billed, rel_tol=1e-9)
    assert math.isclose(usage.spent_usd, billed, rel_tol=1e-6)
    assert record.metadata["empathy_models.cached_input_tokens"] == 99_968


def test_cached_input_costs_the_input_price_unless_the_entry_says_otherwise() -> None:
    plain = ModelInfo(
        id="vllm-model",
        provider="openai",
        tier="cheap",
        input_price_per_mtok=2.0,
        output_price_per_mtok=8.0,
        context_window=32_000,
        max_output_tokens=4096,
    )
    assert plain.cost(1000, 10, cached_input_tokens=900) == plain.cost(1000, 10)
    cheaper = ModelInfo(**{**plain.to_dict(), "cached_input_price_per_mtok": 0.5})
    assert math.isclose(
        cheaper.cost(1000, 10, cached_input_tokens=900),
        (100 * 2.0 + 900 * 0.5 + 10 * 8.0) / 1e6,
        rel_tol=1e-12,
    )
    # a cached count above the input's is the whole input, never a negative cost
    assert math.isclose(
        cheaper.cost(1000, 0, cached_input_tokens=5000), 1000 * 0.5 / 1e6, rel_tol=1e-12
    )
    assert ModelRegistry.default().get("gpt-4o").cached_input_price_per_mtok == 1.25


# --------------------------------------------------------------------------- billed, refused

CUT_USAGE = {"prompt_tokens": 20_000, "completion_tokens": 1024, "total_tokens": 21_024}


async def _cut_tool_call(request: web.Request) -> web.StreamResponse:
    # a tool call cut off by max_tokens: its arguments are not JSON, the usage is billed
    body = await request.json()
    call = {"name": "write", "arguments": '{"text": "a very long argu'}
    return web.json_response(
        {
            "id": "chatcmpl-2",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
                    },
                }
            ],
            "usage": CUT_USAGE,
        }
    )


async def test_an_answer_refused_as_malformed_is_recorded_and_charged_its_usage() -> None:
    gpt = ModelInfo(
        id="gpt-cut",
        provider="openai",
        tier="cheap",
        input_price_per_mtok=2.5,
        output_price_per_mtok=10.0,
        context_window=128_000,
        max_output_tokens=16_384,
    )
    per_call = (20_000 * 2.5 + 1024 * 10.0) / 1e6
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    tool = Tool(name="write", description="write", parameters={"type": "object"})
    async with (
        serving("/v1/chat/completions", _cut_tool_call) as url,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=url + "/v1")],
            registry=ModelRegistry(models=[gpt], price_version="cut-1"),
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
            retry=RetryPolicy(max_attempts=2, base_delay=0.0, jitter=False),
            fallback=FallbackPolicy(max_routes=1),
        ) as executor,
    ):
        context = ExecutionContext(workflow="w", stage="s", model="gpt-cut", max_tokens=1024)
        with pytest.raises(AllRoutesFailedError) as raised:
            await executor.run("write a long essay", context, tools=[tool])
    assert all(isinstance(e, InvalidResponseError) for e in raised.value.exceptions)
    records = await telemetry.recent(limit=10)
    assert records  # each attempt is billed
    for record in records:
        assert record.outcome is Outcome.FAILURE
        assert (record.input_tokens, record.output_tokens) == (20_000, 1024)
        assert math.isclose(record.cost_usd, per_call, rel_tol=1e-9)
    (usage,) = await quota.usages()
    assert math.isclose(usage.spent_usd, len(records) * per_call, rel_tol=1e-6)


# gpt-5's published prices per tier: standard $1.25 / $10, flex $0.625 / $5, priority
# $2.50 / $20 per million input / output tokens
TIERED = ModelInfo(
    id="gpt-tiered",
    provider="openai",
    tier="cheap",
    input_price_per_mtok=1.25,
    output_price_per_mtok=10.0,
    context_window=400_000,
    max_output_tokens=128_000,
    service_tier_prices={
        "flex": {"input_price_per_mtok": 0.625, "output_price_per_mtok": 5.0},
        "priority": {"input_price_per_mtok": 2.5, "output_price_per_mtok": 20.0},
    },
)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("asked", "prices"),
    [
        ("flex", (0.625, 5.0)),
        ("priority", (2.5, 20.0)),
        ("scale", (1.25, 10.0)),
        (None, (1.25, 10.0)),
    ],
)
async def test_openai_calls_are_priced_at_the_service_tier_the_answer_reports(
    streamed: bool, asked: str | None, prices: tuple[float, float]
) -> None:
    # the answer says which tier served the call; a tier the entry gives no prices for
    # ("scale"), or the standard one, is charged the entry's own prices
    from empathy_models.testing import FakeLLMServer, ModelBehavior

    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    context = ExecutionContext(workflow="w", stage="s", model="gpt-tiered", max_tokens=50)
    extra = {"service_tier": asked} if asked is not None else None
    async with (
        FakeLLMServer({"gpt-tiered": ModelBehavior(output_tokens=20)}, api_key=KEY) as server,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            registry=ModelRegistry(models=[TIERED], price_version="tiers-1"),
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
        ) as executor,
    ):
        response = await _answered(executor, "hello " * 400, context, streamed, extra_body=extra)
    (record,) = await telemetry.recent(limit=10)
    (usage,) = await quota.usages()
    billed = (record.input_tokens * prices[0] + record.output_tokens * prices[1]) / 1e6
    assert record.input_tokens > 0 and record.output_tokens == 20
    assert math.isclose(record.cost_usd, billed, rel_tol=1e-9)
    assert math.isclose(response.cost_usd, billed, rel_tol=1e-9)
    assert math.isclose(usage.spent_usd, billed, rel_tol=1e-6)
    # the record says which tier it was served at (the standard one: nothing)
    served = None if asked in (None, "auto") else asked
    assert record.metadata.get("empathy_models.service_tier") == served


CLAUDE_TIERED = attrs.evolve(
    CLAUDE,
    id="claude-tiered",
    service_tier_prices={"priority": {"input_price_per_mtok": 2.0, "output_price_per_mtok": 9.0}},
)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(("tier", "prices"), [("priority", (2.0, 9.0)), ("standard", (1.0, 5.0))])
async def test_anthropic_calls_are_priced_at_the_service_tier_their_usage_reports(
    streamed: bool, tier: str, prices: tuple[float, float]
) -> None:
    from empathy_models.testing import FakeLLMServer, FakeReply

    telemetry = MemoryTelemetryBackend()
    context = ExecutionContext(workflow="w", stage="s", model="claude-tiered", max_tokens=50)
    reported = {"input_tokens": 1000, "output_tokens": 20, "service_tier": tier}
    async with (
        FakeLLMServer(api_key=KEY) as server,
        EmpathyLLMExecutor(
            [AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)],
            registry=ModelRegistry(models=[CLAUDE_TIERED], price_version="tiers-1"),
            telemetry_store=telemetry,
        ) as executor,
    ):
        server.script("claude-tiered", [FakeReply(content="hi", usage=reported)])
        response = await _answered(executor, "hello", context, streamed)
    (record,) = await telemetry.recent(limit=10)
    billed = (1000 * prices[0] + 20 * prices[1]) / 1e6
    assert (record.input_tokens, record.output_tokens) == (1000, 20)
    assert math.isclose(record.cost_usd, billed, rel_tol=1e-9)
    assert math.isclose(response.cost_usd, billed, rel_tol=1e-9)
    served = None if tier == "standard" else tier
    assert record.metadata.get("empathy_models.service_tier") == served


def test_service_tier_prices_in_a_registry_entry_and_file() -> None:
    flex = TIERED.at_service_tier("flex")
    assert (flex.input_price_per_mtok, flex.output_price_per_mtok) == (0.625, 5.0)
    assert TIERED.at_service_tier("default") is TIERED
    assert TIERED.at_service_tier(None) is TIERED
    assert TIERED.at_service_tier("scale") is TIERED
    # written and read back by a registry file
    again = ModelInfo(**TIERED.to_dict())
    assert again == TIERED and again.at_service_tier("priority").cost(10**6, 0) == 2.5
    hash(again)
    base = {k: v for k, v in TIERED.to_dict().items() if k != "service_tier_prices"}
    for given, message in [
        ({"default": {"input_price_per_mtok": 1, "output_price_per_mtok": 1}}, "standard tier"),
        ({"flex": {"input_price_per_mtok": -1, "output_price_per_mtok": 1}}, ">= 0"),
        ({"flex": {"input_price_per_mtok": 1}}, "missing output_price_per_mtok"),
        ({"flex": {"input_price_per_mtok": 1, "output_price_per_mtok": 1, "x": 1}}, "'x'"),
        ({"": {"input_price_per_mtok": 1, "output_price_per_mtok": 1}}, "non-empty"),
        (["flex"], "table of service tier names"),
    ]:
        with pytest.raises(RecordValidationError, match=message) as caught:
            ModelInfo(**base, service_tier_prices=given)
        assert (caught.value.path or "").startswith("service_tier_prices")
    with pytest.raises(ConfigurationError, match=r"models\[0\]\.service_tier_prices\.flex"):
        ModelRegistry.from_dict(
            {
                "price_version": "v",
                "models": [{**base, "service_tier_prices": {"flex": {"input_price_per_mtok": 1}}}],
            }
        )


async def test_a_budget_reserves_a_call_at_the_service_tier_it_asks_for() -> None:
    # up to 10,000 output tokens: $0.10 at the standard price, $0.20 at priority; a
    # budget of $0.15 covers the first and refuses the second before any call
    from empathy_models import BudgetExceededError
    from empathy_models.testing import FakeLLMServer

    context = ExecutionContext(workflow="w", stage="s", model="gpt-tiered", max_tokens=10_000)
    async with (
        FakeLLMServer(api_key=KEY) as server,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            registry=ModelRegistry(models=[TIERED], price_version="tiers-1"),
            telemetry_store=MemoryTelemetryBackend(),
            budgets=[Budget(limit_usd=0.15)],
            quota_store=MemoryQuotaStore(),
        ) as executor,
    ):
        with pytest.raises(BudgetExceededError):
            await executor.run("hi", context, extra_body={"service_tier": "priority"})
        assert server.requests("gpt-tiered") == 0
        await executor.run("hi", context, extra_body={"service_tier": "flex"})
        await executor.run("hi", context)
        assert server.requests("gpt-tiered") == 2
