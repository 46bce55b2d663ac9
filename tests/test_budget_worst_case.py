"""
What a budget reserves for a call is the most it can cost: beside the prompt's text,
the request's tool definitions and structured-output schema (which providers bill as
input) and ``extra_body``, and, when the request marks parts for Anthropic's prompt
cache, the prompt at the cache write price; rate limits count the same estimate.  Real
HTTP against `FakeLLMServer` on 127.0.0.1, which bills tools and schemas as input and
prompt-cache writes and reads as the real APIs report them.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    Budget,
    BudgetExceededError,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMResponse,
    Message,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    RateLimit,
    RoutingDecision,
    Tool,
)
from empathy_models.abc import CompletionRequest
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.content import ImageBlock, TextBlock
from empathy_models.limits import NANO, LocalRateLimitError, MemoryQuotaStore
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior
from empathy_models.testing.fake_server import estimate_tokens

from ._fakes import KEY, http_executor, http_provider

pytestmark = pytest.mark.filterwarnings("error")

PROMPT = "Summarize the ticket."
MAX_TOKENS = 100
MODELS = {
    "openai": ModelInfo(
        id="gpt-worst",
        provider="openai",
        tier="cheap",
        input_price_per_mtok=2.5,
        output_price_per_mtok=10.0,
        context_window=128_000,
        max_output_tokens=16_384,
    ),
    "anthropic": ModelInfo(
        id="claude-worst",
        provider="anthropic",
        tier="cheap",
        input_price_per_mtok=3.0,
        output_price_per_mtok=15.0,
        context_window=200_000,
        max_output_tokens=8192,
    ),
}
REGISTRY = ModelRegistry(models=list(MODELS.values()), price_version="worst-case-1")

# five tools of about 2.6 KB of JSON each: some 3,300 tokens the provider bills as input
TOOLS = [
    Tool(
        name=f"lookup_{i}",
        description="Look up one record of the ledger by its fields. " * 4,
        parameters={
            "type": "object",
            "properties": {
                f"field_{j}": {"type": "string", "description": "A field of the record. " * 4}
                for j in range(25)
            },
        },
    )
    for i in range(5)
]
SCHEMA = {
    "type": "object",
    "properties": {
        f"answer_{j}": {"type": "string", "description": "One part of the answer. " * 6}
        for j in range(80)
    },
    "required": [f"answer_{j}" for j in range(80)],
    "additionalProperties": False,
}
# a system prompt of about 2,000 tokens, in blocks marked for Anthropic's prompt cache
MANUAL = "The manual says what each ledger field means and how to read it. " * 125


def estimate(prompt: str, extra_body: dict[str, Any] | None = None) -> int:
    # the executor's documented estimate of a one-message prompt: a quarter of its worst
    # case (a token per UTF-8 byte, 8 for the message and 8 for the reply, and the JSON
    # of extra_body), rounded up
    extra = 0 if extra_body is None else len(json.dumps(extra_body, separators=(",", ":")))
    return -(-(len(prompt.encode()) + 16 + extra) // 4)


def cached_system(ttl: str | None = None) -> dict[str, Any]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    return {"system": [{"type": "text", "text": MANUAL, "cache_control": control}]}


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    # chunks 5 ms apart: a stream left after its first deltas has not seen the end
    behavior = ModelBehavior(
        output_tokens=50, stream=StreamBehavior(chunk_chars=3, chunk_interval_ms=5)
    )
    async with FakeLLMServer(default=behavior, api_key=KEY) as fake:
        yield fake


def make(server: FakeLLMServer, api: str, **options: Any) -> EmpathyLLMExecutor:
    # one provider only: no cheaper route for a budget to send a call to
    return http_executor(server, REGISTRY, api, **options)


def with_ample_budget(
    server: FakeLLMServer,
    api: str,
    quota: MemoryQuotaStore,
    telemetry: MemoryTelemetryBackend | None = None,
) -> EmpathyLLMExecutor:
    """`make` with a $10 budget, far more than any call here costs, kept in ``quota``."""
    return make(
        server,
        api,
        budgets=[Budget(limit_usd=10)],
        quota_store=quota,
        telemetry_store=MemoryTelemetryBackend() if telemetry is None else telemetry,
    )


def context(api: str) -> ExecutionContext:
    return ExecutionContext(model=MODELS[api].id, max_tokens=MAX_TOKENS, timeout=5.0)


# --------------------------------------------------------------------------- tools, schemas


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("option", ["tools", "response_format"])
async def test_a_budget_reserves_the_tool_definitions_and_schema_a_request_sends(
    server: FakeLLMServer, api: str, option: str
) -> None:
    info = MODELS[api]
    options: dict[str, Any] = {"tools": TOOLS} if option == "tools" else {"response_format": SCHEMA}
    without = info.cost(4 * estimate(PROMPT), MAX_TOKENS)  # the worst case of the text alone
    quota = MemoryQuotaStore()
    budget = Budget(limit_usd=without * 1.5)
    async with make(server, api, budgets=[budget], quota_store=quota) as executor:
        with pytest.raises(BudgetExceededError) as refused:
            await executor.run(PROMPT, context(api), **options)
        assert refused.value.needed_usd > without * 1.5
        # the same budget covers the prompt without them
        answer = await executor.run(PROMPT, context(api))
    assert server.requests(info.id) == 1  # the refused call was never sent
    (usage,) = await quota.usages()
    assert usage.overrun == 0 and usage.spent_usd == pytest.approx(answer.cost_usd, abs=1e-9)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_call_with_tools_costs_no_more_than_it_reserved(
    server: FakeLLMServer, api: str
) -> None:
    quota = MemoryQuotaStore()
    async with with_ample_budget(server, api, quota) as executor:
        answer = await executor.run(PROMPT, context(api), tools=TOOLS)
    body = server.last_request(MODELS[api].id)
    assert body is not None
    # the fake bills the tool definitions as input, as the real APIs do
    assert answer.input_tokens > len(json.dumps(body.body["tools"])) // 5
    (usage,) = await quota.usages()
    assert usage.overrun == 0 and usage.held == 0
    assert usage.settled == usage.spent and usage.spent_usd == pytest.approx(answer.cost_usd)


async def test_a_rate_limit_counts_the_tool_definitions(server: FakeLLMServer) -> None:
    # room in the minute for the prompt's estimate and max_tokens, not for the tools too
    limits = {"gpt-worst": RateLimit(tpm=estimate(PROMPT) + MAX_TOKENS + 50)}
    async with make(server, "openai", rate_limits=limits, rate_limit_wait=0.0) as executor:
        with pytest.raises(AllRoutesFailedError) as refused:
            await executor.run(PROMPT, context("openai"), tools=TOOLS)
        assert all(isinstance(e, LocalRateLimitError) for e in refused.value.exceptions)
        await executor.run(PROMPT, context("openai"))  # without them it fits
    assert server.requests("gpt-worst") == 1


async def test_an_openai_stream_with_tools_left_early_charges_them_and_the_deltas_seen(
    server: FakeLLMServer,
) -> None:
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    async with (
        with_ample_budget(server, "openai", quota, telemetry) as executor,
        executor.stream(PROMPT, context("openai"), tools=TOOLS) as stream,
    ):
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
    (record,) = await telemetry.recent(limit=10)
    assert record.metadata["empathy_models.input_tokens_estimated"] is True
    assert record.output_tokens == 2  # the deltas seen, never max_tokens
    body = server.last_request("gpt-worst")
    assert body is not None
    billed = estimate_tokens(json.dumps(body.body["tools"], separators=(",", ":")) + PROMPT)
    info = MODELS["openai"]
    charged = (await quota.usages())[0].spent_usd
    # the prompt (tools included) at its worst case, the output seen: never less than
    # the provider bills for what was seen, and not max_tokens of output
    assert math.isclose(charged, info.cost(4 * record.input_tokens, 2), rel_tol=1e-6)
    assert charged >= info.cost(billed, 2)
    assert charged < info.cost(4 * record.input_tokens, MAX_TOKENS)


# --------------------------------------------------------------------------- prompt caching


async def test_a_request_marked_for_caching_reserves_its_prompt_at_the_cache_write_price(
    server: FakeLLMServer,
) -> None:
    info = MODELS["anthropic"]
    extra = cached_system()
    tokens = estimate(PROMPT, extra)
    plain = info.cost(4 * tokens, MAX_TOKENS)  # the worst case at the plain input price
    quota = MemoryQuotaStore()
    async with make(
        server, "anthropic", budgets=[Budget(limit_usd=plain * 1.1)], quota_store=quota
    ) as executor:
        with pytest.raises(BudgetExceededError) as refused:
            await executor.run(PROMPT, context("anthropic"), extra_body=extra)
    # 1.25 times the input price for the 5-minute cache
    needed = info.cost(0, MAX_TOKENS, cache_write_tokens=4 * tokens)
    assert refused.value.needed_usd == pytest.approx(needed)
    assert server.requests("claude-worst") == 0


async def test_a_cached_prompt_costs_no_more_than_it_reserved_then_reads_cheaper(
    server: FakeLLMServer,
) -> None:
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    extra = cached_system()
    async with with_ample_budget(server, "anthropic", quota, telemetry) as executor:
        first = await executor.run(PROMPT, context("anthropic"), extra_body=extra)
        (usage,) = await quota.usages()
        assert usage.overrun == 0 and usage.spent_usd == pytest.approx(first.cost_usd)
        again = await executor.run(PROMPT, context("anthropic"), extra_body=extra)
    wrote, read = sorted(await telemetry.recent(limit=10), key=lambda r: r.timestamp)
    written = wrote.metadata["empathy_models.cache_write_tokens"]
    assert written == len(MANUAL) // 4 and "empathy_models.cache_read_tokens" not in wrote.metadata
    assert read.metadata["empathy_models.cache_read_tokens"] == written
    assert again.cost_usd < first.cost_usd  # a read is 0.1 times the input price
    (usage,) = await quota.usages()
    assert usage.overrun == 0 and usage.held == 0


async def test_a_rate_limit_counts_the_prompt_cache_writes_a_call_used(
    server: FakeLLMServer,
) -> None:
    # Anthropic counts the tokens written to its prompt cache (reported apart from
    # input_tokens) against its input tokens per minute: room in the minute for one
    # call's estimate, and the first call's writes fill it, so the second waits
    extra = cached_system()
    limits = {"claude-worst": RateLimit(tpm=estimate(PROMPT, extra) + MAX_TOKENS + 100)}
    telemetry = MemoryTelemetryBackend()
    async with make(
        server, "anthropic", rate_limits=limits, rate_limit_wait=0.0, telemetry_store=telemetry
    ) as executor:
        await executor.run(PROMPT, context("anthropic"), extra_body=extra)
        (wrote,) = await telemetry.recent(limit=10)
        assert wrote.metadata["empathy_models.cache_write_tokens"] == len(MANUAL) // 4
        with pytest.raises(AllRoutesFailedError) as refused:
            await executor.run(PROMPT, context("anthropic"), extra_body=extra)
        assert all(isinstance(e, LocalRateLimitError) for e in refused.value.exceptions)
    assert server.requests("claude-worst") == 1


async def test_the_one_hour_cache_is_reserved_at_its_own_price(server: FakeLLMServer) -> None:
    info = MODELS["anthropic"]
    tokens = estimate(PROMPT, cached_system("1h"))
    # room for the 5-minute write price (1.25x), not for the 1-hour one (2x)
    budget = Budget(limit_usd=info.cost(0, MAX_TOKENS, cache_write_tokens=4 * tokens) * 1.2)
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    async with make(
        server, "anthropic", budgets=[budget], quota_store=quota, telemetry_store=telemetry
    ) as executor:
        with pytest.raises(BudgetExceededError):
            await executor.run(PROMPT, context("anthropic"), extra_body=cached_system("1h"))
        await executor.run(PROMPT, context("anthropic"), extra_body=cached_system("5m"))
    (record,) = await telemetry.recent(limit=10)
    assert record.metadata["empathy_models.cache_write_tokens"] == len(MANUAL) // 4
    (usage,) = await quota.usages()
    assert usage.overrun == 0


async def test_a_streamed_cached_prompt_reports_its_writes_at_the_start(
    server: FakeLLMServer,
) -> None:
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    extra = cached_system("1h")
    async with (
        with_ample_budget(server, "anthropic", quota, telemetry) as executor,
        executor.stream(PROMPT, context("anthropic"), extra_body=extra) as stream,
    ):
        async for _ in stream:
            break  # left early: message_start has reported the prompt already
    (record,) = await telemetry.recent(limit=10)
    assert record.metadata["empathy_models.cache_write_1h_tokens"] == len(MANUAL) // 4
    assert "empathy_models.input_tokens_estimated" not in record.metadata
    (usage,) = await quota.usages()
    assert usage.overrun == 0 and usage.spent_usd == pytest.approx(record.cost_usd)


async def test_the_fake_bills_marked_prefixes_apart_in_cache_order(server: FakeLLMServer) -> None:
    # tools, then system, then messages: the marked system prompt caches the tools too
    async with http_provider(server, "anthropic") as provider:
        plain = await provider.complete(
            CompletionRequest(model="claude-worst", messages=PROMPT, system=MANUAL, tools=TOOLS[:1])
        )
        marked = CompletionRequest(
            model="claude-worst",
            messages=PROMPT,
            tools=TOOLS[:1],
            extra_body={
                "system": [
                    {
                        "type": "text",
                        "text": MANUAL,
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ]
            },
        )
        first = await provider.complete(marked)
        second = await provider.complete(marked)
    total = plain.input_tokens
    assert first.cache_write_1h_tokens > len(MANUAL) // 4 and first.cache_read_tokens == 0
    assert first.input_tokens + first.cache_write_1h_tokens == total
    assert second.cache_read_tokens == first.cache_write_1h_tokens
    assert second.cache_write_tokens == second.cache_write_1h_tokens == 0
    assert second.input_tokens == first.input_tokens


# --------------------------------------------------------------------------- one estimate

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP4//8/AAX+Av6n1qSFAAAAAElFTkSuQmCC"
SYSTEM = "Answer from the ledger only."


class EstimateSeen(AdaptiveModelRouter):
    """The real router, keeping the input estimate each decision was asked with."""

    def __init__(self) -> None:
        super().__init__(REGISTRY, refresh_interval=None, seed=1)
        self.input_tokens: list[int | None] = []

    def get_best_model(self, *args: Any, **kwargs: Any) -> RoutingDecision:
        self.input_tokens.append(kwargs.get("input_tokens"))
        return super().get_best_model(*args, **kwargs)


def everything(api: str) -> tuple[list[Any], dict[str, Any], int]:
    """
    A prompt with a system message and an image, with tools, a schema and an
    ``extra_body`` (for Anthropic a system prompt marked for its prompt cache), and its
    documented estimate: a quarter of the worst case, rounded up.
    """
    prompt: list[Any] = [
        {"role": "system", "content": SYSTEM},
        Message(
            role="user",
            content=[TextBlock(text=PROMPT), ImageBlock.from_base64(PNG, "image/png")],
        ),
    ]
    tools = TOOLS[:2]
    extra = cached_system() if api == "anthropic" else {"metadata": {"team": "ledger"}}

    def compact(value: object) -> int:
        return len(json.dumps(value, separators=(",", ":")).encode())

    worst = 8 * 2 + (8 + len(SYSTEM)) + len(PROMPT) + 1600  # frames, system, text, image
    # each tool's name, description and parameters, 8 more each, 600 once for tool use
    worst += 600 + sum(
        len(t.name) + len(t.description or "") + compact(t.parameters) + 8 for t in tools
    )
    worst += len("response") + compact(SCHEMA) + 8  # the schema, under its default name
    worst += compact(extra)
    options = {"tools": tools, "response_format": SCHEMA, "extra_body": extra}
    return prompt, options, -(-worst // 4)


def routed() -> ExecutionContext:
    # not pinned: the router decides (among the one model of the provider)
    return ExecutionContext(tier=ModelTier.CHEAP, max_tokens=MAX_TOKENS, timeout=5.0)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_the_router_and_the_budget_read_the_same_input_estimate(
    server: FakeLLMServer, api: str
) -> None:
    info = MODELS[api]
    router, quota = EstimateSeen(), MemoryQuotaStore()
    prompt, options, expected = everything(api)
    async with make(
        server, api, router=router, budgets=[Budget(limit_usd=10)], quota_store=quota
    ) as executor:
        answer = await executor.run(prompt, routed(), **options)
    assert answer.model == info.id and answer.routing_decision is not None
    # the router decided with the estimate of everything the request sends
    assert router.input_tokens == [expected]
    # and the budget reserved the worst case of that same estimate: at the cache write
    # price where extra_body marks the prompt for Anthropic's cache
    if api == "anthropic":
        reserved = info.cost(0, MAX_TOKENS, cache_write_tokens=4 * expected)
    else:
        reserved = info.cost(4 * expected, MAX_TOKENS)
    (usage,) = await quota.usages()
    assert usage.reserved / NANO == pytest.approx(reserved, abs=1e-9)
    assert usage.overrun == 0 and usage.held == 0


async def test_a_stream_left_early_is_charged_the_estimate_the_router_read(
    server: FakeLLMServer,
) -> None:
    # an OpenAI stream left early reports no usage: its record carries the estimate
    info = MODELS["openai"]
    router, quota, telemetry = EstimateSeen(), MemoryQuotaStore(), MemoryTelemetryBackend()
    prompt, options, expected = everything("openai")
    async with (
        make(
            server,
            "openai",
            router=router,
            budgets=[Budget(limit_usd=10)],
            quota_store=quota,
            telemetry_store=telemetry,
        ) as executor,
        executor.stream(prompt, routed(), **options) as stream,
    ):
        async for _ in stream.events():
            break
    assert router.input_tokens == [expected]
    (record,) = await telemetry.recent(limit=10)
    assert record.metadata["empathy_models.input_tokens_estimated"] is True
    assert record.input_tokens == expected
    (usage,) = await quota.usages()
    assert usage.reserved / NANO == pytest.approx(info.cost(4 * expected, MAX_TOKENS), abs=1e-9)
    assert usage.spent_usd == pytest.approx(info.cost(4 * expected, record.output_tokens))


# --------------------------------------------------------------------------- output caps


LONG_ANSWER = 4000
"""Output tokens the fake answers with, up to the cap the request sends."""


@pytest.fixture
async def verbose() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(default=ModelBehavior(output_tokens=LONG_ANSWER), api_key=KEY) as fake:
        yield fake


@pytest.mark.parametrize(
    ("api", "extra_body"),
    [
        ("anthropic", {"max_tokens": LONG_ANSWER}),
        ("openai", {"max_completion_tokens": LONG_ANSWER}),
        ("openai", {"max_tokens": LONG_ANSWER}),
        # null: no cap of the request's own, so the model's longest output
        ("openai", {"max_completion_tokens": None}),
    ],
)
async def test_concurrent_calls_whose_extra_body_raises_max_tokens_never_overspend(
    verbose: FakeLLMServer, api: str, extra_body: dict[str, Any]
) -> None:
    # extra_body is merged over the body: its output cap replaces the context's
    info = MODELS[api]
    cap = extra_body[next(iter(extra_body))] or info.max_output_tokens
    quota = MemoryQuotaStore()
    budget = Budget(limit_usd=info.cost(0, cap) * 2.5)  # two calls' output at that cap
    async with http_executor(verbose, REGISTRY, api, budgets=[budget], quota_store=quota) as ex:
        answers = await asyncio.gather(
            *(ex.run(PROMPT, context(api), extra_body=extra_body) for _ in range(12)),
            return_exceptions=True,
        )
    assert all(isinstance(a, LLMResponse | BudgetExceededError) for a in answers), answers
    assert any(isinstance(a, LLMResponse) and a.output_tokens == LONG_ANSWER for a in answers)
    (usage,) = await quota.usages()
    assert usage.spent <= usage.limit and usage.overrun == 0, usage


async def test_a_rate_limit_counts_the_output_cap_extra_body_sends(verbose: FakeLLMServer) -> None:
    # room in the minute for the prompt's estimate and max_tokens, not for the cap sent
    limits = {"gpt-worst": RateLimit(tpm=estimate(PROMPT) + MAX_TOKENS + 50)}
    body = {"max_completion_tokens": LONG_ANSWER}
    async with make(verbose, "openai", rate_limits=limits, rate_limit_wait=0.0) as executor:
        with pytest.raises(AllRoutesFailedError) as refused:
            await executor.run(PROMPT, context("openai"), extra_body=body)
        assert all(isinstance(e, LocalRateLimitError) for e in refused.value.exceptions)
    assert verbose.requests("gpt-worst") == 0


# --------------------------------------------------------------------------- choices


async def test_a_request_for_several_choices_is_refused_before_anything_is_reserved(
    server: FakeLLMServer,
) -> None:
    # OpenAI bills every choice's output, while a budget reserves (and a run returns)
    # one answer: n=4 would spend up to four times what was reserved
    quota = MemoryQuotaStore()
    async with with_ample_budget(server, "openai", quota) as executor:
        with pytest.raises(ConfigurationError, match="extra_body must not set n to 4"):
            await executor.run(PROMPT, context("openai"), extra_body={"n": 4})
        with pytest.raises(ConfigurationError, match="extra_body must not set n to 4"):
            executor.stream(PROMPT, context("openai"), extra_body={"n": 4})
        assert server.requests() == 0
        assert await quota.usages() == []
        # one choice, as sent without n, is what a run asks for
        answer = await executor.run(PROMPT, context("openai"), extra_body={"n": 1})
    assert answer.output_tokens == 50
    assert server.requests("gpt-worst") == 1
