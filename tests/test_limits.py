"""
Budgets and rate limits through the executor's public API, over real HTTP to a
`FakeLLMServer`, on the memory and SQLite quota stores.  The four-process acceptance
tests are in ``test_limits_multiprocess.py``; the store contract in
``test_quota_contracts.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from empathy_models import (
    AllRoutesFailedError,
    Budget,
    BudgetExceededError,
    ConfigurationError,
    EmpathyLLMExecutor,
    EmpathyModelsError,
    ExecutionContext,
    FallbackPolicy,
    ModelInfo,
    ModelRegistry,
    RateLimit,
    RateLimitedError,
    RetryPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import StateStoreError
from empathy_models.limits import (
    MAX_WINDOW,
    WINDOW_RETENTION,
    LocalRateLimitError,
    MemoryQuotaStore,
    SQLiteQuotaStore,
    quota_store_from_url,
    window_bounds,
)
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.testing import FakeClock, FakeLLMServer

KEY = "test-key-0123"


def _model(model_id: str, provider: str, output_price: float) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        provider=provider,
        tier="cheap",
        input_price_per_mtok=1.0,
        output_price_per_mtok=output_price,
        context_window=64_000,
        max_output_tokens=4096,
    )


REGISTRY = ModelRegistry(
    models=[
        _model("gpt-cheap", "openai", 5.0),
        _model("gpt-dear", "openai", 50.0),
        _model("claude-other", "anthropic", 20.0),
    ],
    price_version="limits-test-1",
)
CTX = ExecutionContext(workflow="docs", stage="draft", max_tokens=1000)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    options.setdefault("registry", REGISTRY)
    providers = [
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
    ]
    options.setdefault("retry", RetryPolicy.none())
    options.setdefault("telemetry_store", MemoryTelemetryBackend())
    return EmpathyLLMExecutor(providers, **options)


# --------------------------------------------------------------------------- values


def test_budget_and_rate_limit_values_are_checked() -> None:
    for bad in (
        {"limit_usd": -1},
        {"limit_usd": float("nan")},
        {"limit_usd": True},
        {"limit_usd": 1, "scope": "team"},
        {"limit_usd": 1, "window": "week"},
        {"limit_usd": 1, "window": 0.5},
        {"limit_usd": 1, "window": 1e12},  # its end is past year 9999
        {"limit_usd": 1, "window": MAX_WINDOW + 1},
        {"limit_usd": 1, "value": "x"},
        {"limit_usd": 1, "name": "a|b"},
        {"limit_usd": 1, "scope": "user_id", "value": ""},
    ):
        with pytest.raises(ConfigurationError):
            Budget(**bad)
    for bad_rate in ({}, {"rpm": 0}, {"tpm": 1.5}, {"rpm": 10, "burst_requests": 0}):
        with pytest.raises(ConfigurationError):
            RateLimit(**bad_rate)
    assert RateLimit(rpm=600).request_burst == 1
    assert RateLimit(tpm=90_000).token_burst == 90_000


@pytest.mark.parametrize("field", ["name", "value"])
def test_a_budget_name_or_value_no_store_can_hold_is_refused_naming_it(field: str) -> None:
    # a lone surrogate, which UTF-8 cannot encode: the budget was taken, and every run
    # with a SQLite or Redis quota store then failed with a bare UnicodeEncodeError
    options: dict[str, Any] = {"limit_usd": 1, "scope": "workflow", field: "team\udce9"}
    with pytest.raises(ConfigurationError) as caught:
        Budget(**options)
    assert str(caught.value) == (
        f"Budget.{field} must be valid text (it holds a lone surrogate), got 'team\\udce9'"
    )


def test_budget_keys_name_the_scope_value_and_window() -> None:
    assert Budget(limit_usd=1).key_for(None) == "global/day"
    per_user = Budget(limit_usd=1, scope="user_id", window="hour")
    assert per_user.key_for("alice") == "user_id=alice/hour"
    assert per_user.key_for(None) is None  # a call without a user is not covered
    docs = Budget(limit_usd=1, scope="workflow", value="docs", window=600)
    assert docs.key_for("docs") == "workflow=docs/600s"
    assert docs.key_for("other") is None
    assert Budget(limit_usd=1, scope="model", name="models").key_for("m") == "models:m"
    # a window in whole seconds, as the CLI takes it, however long; never two in one
    assert Budget(limit_usd=1, window=30 * 86400).key_for(None) == "global/2592000s"
    assert Budget(limit_usd=1, window=MAX_WINDOW).key_for(None) == "global/3155760000s"
    assert Budget(limit_usd=1, window=1.5).key_for(None) == "global/1.5s"
    assert Budget(limit_usd=1, window=1234567).key_for(None) == "global/1234567s"
    assert Budget(limit_usd=1, window=1234568).key_for(None) == "global/1234568s"


def test_windows_are_calendar_windows_in_utc() -> None:
    # 2026-02-14 15:30:00 UTC
    now = 1771083000.0
    assert window_bounds("hour", now) == (1771081200.0, 1771084800.0)
    assert window_bounds("day", now) == (1771027200.0, 1771113600.0)
    start, end = window_bounds("month", now)  # February 2026: 28 days
    assert (start, end - start) == (1769904000.0, 28 * 86400.0)
    assert window_bounds(600.0, now + 100) == (1771083000.0, 1771083600.0)


def test_budget_exceeded_error_is_an_empathy_error_and_pickles() -> None:
    err = BudgetExceededError(
        "global/day", limit_usd=1.0, remaining_usd=0.25, needed_usd=0.5, resets_at=0.0
    )
    assert isinstance(err, EmpathyModelsError)
    assert "global/day" in str(err) and "$0.250000 is left" in str(err)
    assert "1970-01-01 00:00:00 UTC" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert (again.budget, again.remaining_usd, again.resets_at) == ("global/day", 0.25, 0.0)


def test_bad_executor_options_raise_configuration_error(server: FakeLLMServer) -> None:
    with pytest.raises(ConfigurationError, match="budgets"):
        make(server, budgets="ten dollars")
    with pytest.raises(ConfigurationError, match="RateLimit"):
        make(server, rate_limits={"openai": 500})
    with pytest.raises(ConfigurationError, match="rate_limit_wait"):
        make(server, rate_limits={"openai": RateLimit(rpm=1)}, rate_limit_wait=-1)
    with pytest.raises(ConfigurationError, match="named"):
        make(server, budgets=[Budget(limit_usd=1), Budget(limit_usd=2)])
    with pytest.raises(ConfigurationError, match="unknown backend scheme"):
        make(server, budgets=[Budget(limit_usd=1)], quota_store="nosuch://x")


def test_a_limiters_own_options_are_checked_naming_them() -> None:
    from empathy_models.limits import Limiter

    bad_options: tuple[tuple[str, Any], ...] = (
        ("store_timeout", -1),
        ("store_timeout", float("nan")),
        ("store_timeout", "5"),
        ("retry_interval", 0),
        ("retry_interval", "x"),
        ("sleep", None),
        ("monotonic", 3),
    )
    for name, bad in bad_options:
        with pytest.raises(ConfigurationError, match=f"^{name} "):
            Limiter([Budget(limit_usd=1)], None, None, **{name: bad})
    with pytest.raises(ConfigurationError, match=r"^max_wait "):
        Limiter(None, {"openai": RateLimit(rpm=1)}, None, max_wait=-1)
    assert Limiter(None, {"openai": RateLimit(rpm=1)}, None, store_timeout=None).max_wait == 30


def test_limits_naming_no_provider_or_model_of_the_executor_are_refused(
    server: FakeLLMServer,
) -> None:
    # a typo would otherwise leave the calls it meant unlimited, silently
    with pytest.raises(ConfigurationError, match=r"rate_limits.*'opneai'.*anthropic, openai"):
        make(server, rate_limits={"opneai": RateLimit(rpm=1)})
    with pytest.raises(ConfigurationError, match=r"Budget.*'gpt-chaep'.*no model"):
        make(server, budgets=[Budget(limit_usd=1, scope="model", value="gpt-chaep")])
    with pytest.raises(ConfigurationError, match=r"Budget.*'opneai'.*no provider"):
        make(server, budgets=[Budget(limit_usd=1, scope="provider", value="opneai")])
    make(  # a provider's name or a registry model's id: accepted
        server,
        rate_limits={"openai": RateLimit(rpm=1), "claude-other": RateLimit(tpm=100)},
        budgets=[Budget(limit_usd=1, scope="model", value="gpt-dear"), Budget(limit_usd=1)],
    )
    # a provider the registry knows, not given to this worker: a shared configuration
    only_openai = [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)]
    EmpathyLLMExecutor(
        only_openai,
        registry=REGISTRY,
        telemetry_store=MemoryTelemetryBackend(),
        rate_limits={"anthropic": RateLimit(rpm=1)},
        budgets=[Budget(limit_usd=1, scope="provider", value="anthropic")],
    )


# --------------------------------------------------------------------------- budgets


async def test_a_spent_budget_refuses_before_calling_and_says_when_it_resets(
    server: FakeLLMServer,
) -> None:
    store = MemoryQuotaStore()
    # each call may cost $0.005 (reserved), costs $0.000082: about a dozen fit
    budget = Budget(limit_usd=0.006, scope="workflow", window="hour")
    async with store, make(server, budgets=[budget], quota_store=store) as executor:
        answered = 0
        with pytest.raises(BudgetExceededError) as info:
            for _ in range(1000):
                await executor.run("hello", CTX)
                answered += 1
        requests = server.requests()
        (usage,) = await store.usages()
    err = info.value
    assert err.budget == "workflow=docs/hour"
    assert err.limit_usd == pytest.approx(0.006)
    assert 0 <= err.remaining_usd < err.needed_usd
    assert err.resets_at == window_bounds("hour", err.resets_at - 1)[1]
    assert answered > 5
    assert requests == answered  # the refused call reached no provider
    assert usage.held == 0 and usage.spent_usd <= 0.006 and usage.refused == 1
    assert usage.reserved == usage.settled + usage.released


async def test_a_budget_of_the_longest_window_refuses_saying_when_it_ends(
    server: FakeLLMServer,
) -> None:
    assert MAX_WINDOW == 100 * 365.25 * 86400
    async with make(server, budgets=[Budget(limit_usd=0, window=MAX_WINDOW)]) as executor:
        with pytest.raises(BudgetExceededError) as info:
            await executor.run("hello", CTX)
    # windows are aligned on multiples of their length since the epoch
    assert info.value.resets_at == MAX_WINDOW
    assert "resets at 2070-01-01 00:00:00 UTC" in str(info.value)
    assert server.requests() == 0


@contextlib.asynccontextmanager
async def worst_case_server() -> AsyncIterator[str]:
    """
    An OpenAI-compatible server that counts the most tokens a byte-level tokenizer
    could: a token per UTF-8 byte of every message's text, and ``max_tokens`` of
    output.  Yields its base URL.
    """

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = sum(len(m["content"].encode()) for m in body["messages"])
        output = body["max_tokens"]
        return web.json_response(
            {
                "id": "worst",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "好"},
                        "finish_reason": "length",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": output,
                    "total_tokens": prompt + output,
                },
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "prompt",
    [
        "请总结这段文字。" * 250,  # CJK: three bytes a character, about a token each
        "def f(x):\n    return {'a': [x, x]}\n" * 60,  # code
        "👍🏽🎉" * 300,  # emoji: four bytes a character
    ],
)
async def test_a_budget_is_never_overspent_whatever_the_prompt_tokenizes_to(prompt: str) -> None:
    store = MemoryQuotaStore()
    async with worst_case_server() as base_url, store:
        executor = EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=base_url)],
            registry=REGISTRY,
            telemetry_store=MemoryTelemetryBackend(),
            retry=RetryPolicy.none(),
            budgets=[Budget(limit_usd=0.05)],
            quota_store=store,
        )
        ctx = ExecutionContext(model="gpt-cheap", max_tokens=16)
        answers = []
        async with executor:
            with pytest.raises(BudgetExceededError):
                for _ in range(1000):
                    answer = await executor.run(prompt, ctx)
                    answers.append(answer)
        (usage,) = await store.usages()
    assert len(answers) >= 5
    assert usage.overrun == 0 and usage.spent_usd <= 0.05
    assert usage.spent_usd == pytest.approx(sum(a.cost_usd for a in answers), abs=1e-9)


async def test_a_budget_too_small_for_the_model_goes_to_a_cheaper_one_that_fits(
    server: FakeLLMServer,
) -> None:
    # gpt-dear may cost $0.05 (1000 output tokens at $50/Mtok), gpt-cheap $0.005
    async with make(server, budgets=[Budget(limit_usd=0.01)]) as executor:
        response = await executor.run("hello", ExecutionContext(model="gpt-dear", max_tokens=1000))
    assert response.model == "gpt-cheap"
    assert response.fallback_chain == ("gpt-cheap",)  # gpt-dear was never called
    assert server.requests("gpt-dear") == 0


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP4//8/AAX+Av6n1qSFAAAAAElFTkSuQmCC"
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "string"}},
    "required": ["a"],
    "additionalProperties": False,
}


def _with_plain(*others: ModelInfo) -> ModelRegistry:
    """REGISTRY's gpt-dear and claude-other, and gpt-plain: cheaper, no capabilities."""
    plain = attrs.evolve(_model("gpt-plain", "openai", 8.0), capabilities=[])
    dear = [m for m in REGISTRY.models if m.id != "gpt-cheap"]
    return ModelRegistry(models=[*dear, plain, *others], price_version="plain-1")


@pytest.mark.parametrize("needs", ["tools", "json_schema", "images", "streaming"])
async def test_a_budgets_cheaper_model_is_one_that_can_serve_the_request(
    server: FakeLLMServer, needs: str
) -> None:
    from empathy_models import Message
    from empathy_models.content import ImageBlock, TextBlock, Tool

    registry = _with_plain(_model("gpt-cheap", "openai", 5.0))
    prompt: Any = "hello"
    options: dict[str, Any] = {}
    if needs == "tools":
        options["tools"] = [Tool(name="f", description="d", parameters={"type": "object"})]
    elif needs == "json_schema":
        options["response_format"] = SCHEMA
    elif needs == "images":
        image = ImageBlock.from_base64(PNG, "image/png")
        prompt = [Message(role="user", content=[TextBlock(text="what is it?"), image])]
    # gpt-dear may cost $0.05, gpt-plain $0.008, gpt-cheap $0.005: $0.01 covers the two
    ctx = ExecutionContext(model="gpt-dear", max_tokens=1000)
    async with make(server, registry=registry, budgets=[Budget(limit_usd=0.01)]) as executor:
        plain = await executor.run("hello", ctx)  # gpt-plain serves a plain request
        if needs == "streaming":
            async with executor.stream(prompt, ctx) as stream:
                response = await stream.get_final_response()
        else:
            response = await executor.run(prompt, ctx, **options)
    assert plain.model == "gpt-plain"
    assert response.model == "gpt-cheap"  # gpt-plain cannot serve this request
    assert server.requests("gpt-plain") == 1 and server.requests("gpt-dear") == 0


async def test_a_budgets_cheaper_model_is_one_whose_context_did_not_overflow(
    server: FakeLLMServer,
) -> None:
    def model(model_id: str, tier: str, output_price: float, window: int) -> ModelInfo:
        return attrs.evolve(
            _model(model_id, "openai", output_price), tier=tier, context_window=window
        )

    registry = ModelRegistry(
        models=[
            model("gpt-small", "capable", 1.0, 8_000),
            model("gpt-big", "capable", 50.0, 64_000),
            model("gpt-mid", "cheap", 8.0, 8_000),
            model("gpt-wide", "cheap", 5.0, 64_000),
            *(m for m in REGISTRY.models if m.provider == "anthropic"),
        ],
        price_version="windows-1",
    )
    server.script("gpt-small", ["context_length"])
    # gpt-small's window overflowed; gpt-big may cost $0.05: of the cheaper ones that
    # fit $0.01, gpt-mid's window is gpt-small's, so gpt-wide answers
    ctx = ExecutionContext(model="gpt-small", max_tokens=1000)
    async with make(server, registry=registry, budgets=[Budget(limit_usd=0.01)]) as executor:
        response = await executor.run("a long prompt", ctx)
    assert response.model == "gpt-wide"
    assert response.fallback_chain == ("gpt-small", "gpt-wide")
    assert server.requests("gpt-mid") == 0


async def test_a_spent_provider_budget_is_raised_when_the_routes_outside_it_overflowed(
    server: FakeLLMServer,
) -> None:
    # gpt-cheap's window overflowed; claude-other, wide enough, is refused by the spent
    # anthropic budget; gpt-dear is outside that budget but no wider than gpt-cheap, so
    # it is not tried: the run fails on the budget, whose refusal the error holds
    registry = ModelRegistry(
        models=[
            *(m for m in REGISTRY.models if m.provider == "openai"),
            attrs.evolve(REGISTRY.get("claude-other"), context_window=200_000),
        ],
        price_version="windows-2",
    )
    server.script("gpt-cheap", ["context_length"])
    spent = Budget(limit_usd=0.0, scope="provider", value="anthropic")
    async with make(server, registry=registry, budgets=[spent]) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run("a long prompt", CTX)
    assert [type(e).__name__ for e in caught.value.exceptions] == [
        "ContextWindowExceededError",
        "BudgetExceededError",
    ]
    assert server.requests("claude-other") == 0 and server.requests("gpt-dear") == 0


@pytest.mark.parametrize(
    "spent",
    [
        Budget(limit_usd=0.0, scope="model", value="gpt-dear"),
        Budget(limit_usd=0.0, scope="provider", value="openai"),
    ],
    ids=["model", "provider"],
)
async def test_a_spent_budget_of_some_models_sends_the_call_to_a_cheaper_one_it_does_not_cover(
    server: FakeLLMServer, spent: Budget
) -> None:
    # nothing is left of the budget that refused gpt-dear, but it does not cover
    # claude-other ($0.02 at most), the most capable cheaper model
    ctx = ExecutionContext(model="gpt-dear", max_tokens=1000)
    async with make(server, budgets=[spent]) as executor:
        response = await executor.run("hello", ctx)
    assert response.model == "claude-other"
    assert server.requests("gpt-dear") == 0


async def test_a_budgets_refusal_is_in_the_error_when_the_routes_after_it_fail(
    server: FakeLLMServer,
) -> None:
    # the spent budget refuses gpt-dear and sends the run to claude-other, which fails,
    # as gpt-cheap after it: the error lists every route's outcome, the refusal first
    server.set_outage("claude-other")
    server.set_outage("gpt-cheap")
    spent = Budget(limit_usd=0.0, scope="model", value="gpt-dear")
    ctx = ExecutionContext(model="gpt-dear", max_tokens=1000)
    async with make(server, budgets=[spent]) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run("hello", ctx)
    assert [type(e).__name__ for e in caught.value.exceptions] == [
        "BudgetExceededError",
        "ServerError",
        "ServerError",
    ]
    assert server.requests("gpt-dear") == 0


async def test_budgets_refusals_alone_raise_the_last_refusal(server: FakeLLMServer) -> None:
    # the openai budget refuses gpt-dear, the anthropic one claude-other (put next), the
    # openai one gpt-cheap (put next): only budgets refused, so the last refusal is raised
    spent = [
        Budget(limit_usd=0.0, scope="provider", value="openai"),
        Budget(limit_usd=0.0, scope="provider", value="anthropic"),
    ]
    ctx = ExecutionContext(model="gpt-dear", max_tokens=1000)
    async with make(server, budgets=spent) as executor:
        with pytest.raises(BudgetExceededError, match="provider=openai"):
            await executor.run("hello", ctx)
    assert server.requests() == 0


async def test_no_cheaper_model_that_can_serve_the_request_raises_the_budgets_refusal(
    server: FakeLLMServer,
) -> None:
    ctx = ExecutionContext(model="gpt-dear", max_tokens=1000)
    async with make(server, registry=_with_plain(), budgets=[Budget(limit_usd=0.01)]) as executor:
        with pytest.raises(BudgetExceededError):
            await executor.run("hello", ctx, response_format=SCHEMA)
    assert server.requests() == 0


async def test_no_cheaper_candidate_raises_naming_the_budget(server: FakeLLMServer) -> None:
    async with make(server, budgets=[Budget(limit_usd=0.0001, name="tiny")]) as executor:
        with pytest.raises(BudgetExceededError, match="'tiny'"):
            await executor.run("hello", CTX)
    assert server.requests() == 0


async def test_failed_and_cancelled_calls_settle_at_what_they_cost(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    store = quota_store_from_url(f"sqlite:///{tmp_path}/quota.db")
    server.set_outage("gpt-cheap", action=500)
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=1000)
    async with (
        store,
        make(
            server,
            budgets=[Budget(limit_usd=1.0)],
            quota_store=store,
            fallback=FallbackPolicy.none(),
        ) as executor,
    ):
        with pytest.raises(AllRoutesFailedError):
            await executor.run("hello", pinned)
        server.set_outage("gpt-cheap", False)
        server.script("gpt-cheap", ["hang"])
        task = asyncio.create_task(executor.run("hello", pinned))
        await server.wait_for_requests(2)
        (during,) = await store.usages()
        assert during.held > 0  # the hanging call holds its estimate
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ok = await executor.run("hello", pinned)
        (usage,) = await store.usages()
    # the provider's error answer cost nothing; the cancelled call was sent, and a
    # provider bills a request it received, answered or not: charged its reservation
    assert usage.calls == 2 and usage.held == 0
    assert usage.spent == during.held + round(ok.cost_usd * 1e9)
    assert usage.reserved == usage.settled + usage.released


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "stream"])
@pytest.mark.parametrize("ended_by", ["timeout", "deadline", "cancel"])
async def test_a_call_sent_and_given_up_on_is_charged_what_it_may_be_billed(
    server: FakeLLMServer, streamed: bool, ended_by: str
) -> None:
    # the server never answers; the caller gives up on the call (its timeout, the
    # run's deadline, a cancel) after it was sent.  The provider bills it all the same:
    # a run is charged its whole reservation, a stream that did not open the prompt's
    # worst case and no output (as a stream left early is charged what it streamed);
    # so do rate limits count it: a run the tokens they reserved, a stream its prompt
    adjusted: list[float] = []

    class Recording(MemoryQuotaStore):
        async def adjust(self, key: str, *, delta: float, place: float | None = None) -> None:
            adjusted.append(delta)
            await super().adjust(key, delta=delta, place=place)

    store, telemetry = Recording(), MemoryTelemetryBackend()
    server.script("gpt-cheap", ["hang"])
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=1000)
    # 2 s: the call is sent within it however busy the machine
    if ended_by == "timeout":
        pinned = attrs.evolve(pinned, timeout=2.0)
    elif ended_by == "deadline":
        pinned = attrs.evolve(pinned, deadline=2.0)
    options = {
        "budgets": [Budget(limit_usd=1.0)],
        "rate_limits": {"gpt-cheap": RateLimit(tpm=60_000)},
        "telemetry_store": telemetry,
        "fallback": FallbackPolicy.none(),
    }
    async with store:
        async with make(server, quota_store=store, **options) as executor:

            async def call() -> None:
                if not streamed:
                    await executor.run("hello", pinned)
                    return
                async with executor.stream("hello", pinned) as stream:
                    async for _ in stream:
                        pass

            task = asyncio.create_task(call())
            if ended_by == "cancel":
                await server.wait_for_requests(1)
                task.cancel()
            with pytest.raises(
                asyncio.CancelledError if ended_by == "cancel" else AllRoutesFailedError
            ):
                await task
        (usage,) = await store.usages()  # the executor's exit waited for the settlement
    (record,) = await telemetry.recent()
    assert server.requests() == 1 and usage.held == 0 and usage.calls == 1
    output = 1000 * 5.0 / 1e6  # max_tokens at gpt-cheap's output price
    charged = usage.reserved - (round(output * 1e9) if streamed else 0)
    assert usage.spent == usage.settled == charged
    assert record.cost_usd == 0.0  # what it cost is unknown: the record does not guess
    # tpm: a token a millisecond; a stream gives back its max_tokens, a run nothing
    assert adjusted == ([pytest.approx(-1.0)] if streamed else [])


async def test_a_call_not_sent_before_the_deadline_gives_its_reservation_back(
    server: FakeLLMServer,
) -> None:
    clock = FakeClock()

    class SlowQuota(MemoryQuotaStore):
        async def reserve(self, key: str, **kw: Any) -> Any:
            clock.advance(3.0)  # the store took 3 s of the run's 2: nothing is sent
            return await super().reserve(key, **kw)

    store = SlowQuota()
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=1000, deadline=2.0)
    async with store:
        async with make(
            server, clock=clock, budgets=[Budget(limit_usd=1.0)], quota_store=store
        ) as ex:
            with pytest.raises(AllRoutesFailedError, match="before the call to openai/gpt-cheap"):
                await ex.run("hello", pinned)
        (usage,) = await store.usages()
    assert server.requests() == 0 and usage.calls == 0
    assert usage.reserved > 0 and usage.released == usage.reserved
    assert usage.spent == usage.held == 0


async def test_a_hold_its_worker_cannot_settle_lapses_after_the_calls_bound(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    # a worker whose call hangs holds its estimate until the call's bound (timeout 20 s,
    # a rate-limit wait of 30 s, 120 s to settle), not until the window ends: another
    # worker whose clock is past that (as a killed worker's would be) sees it lapsed
    path = tmp_path / "quota.db"
    server.script("gpt-cheap", ["hang"])
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=1000, timeout=20)
    async with make(
        server,
        budgets=[Budget(limit_usd=1.0, window="month")],
        quota_store=f"sqlite:///{path}",
        fallback=FallbackPolicy.none(),
    ) as executor:
        before = time.time()
        task = asyncio.create_task(executor.run("hello", pinned))
        await server.wait_for_requests(1)
        after = time.time()
        try:
            async with SQLiteQuotaStore(path) as now_store:
                (during,) = await now_store.usages()
            async with SQLiteQuotaStore(path, clock=lambda: time.time() + 300) as later:
                (lapsed,) = await later.usages()
                ws, we = lapsed.window_start, lapsed.window_end
                grant = await later.reserve(
                    during.key, window_start=ws, window_end=we, amount=10**9, limit=10**9
                )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert during.held > 0 and during.held_until is not None
    assert before + 170 <= during.held_until <= after + 170 + 60  # a whole minute up
    assert (lapsed.held, lapsed.lapsed, lapsed.held_until) == (0, during.held, None)
    assert grant.granted  # the whole dollar: nothing of the hung call's counts


async def test_per_user_budgets_are_separate_and_a_limit_set_in_the_store_wins(
    server: FakeLLMServer,
) -> None:
    store = MemoryQuotaStore()
    budget = Budget(limit_usd=1.0, scope="user_id")
    async with store, make(server, budgets=[budget], quota_store=store) as executor:
        await store.set_limit("user_id=bob/day", 0)
        await executor.run("hello", ExecutionContext(user_id="alice", max_tokens=10))
        await executor.run("hello", ExecutionContext(max_tokens=10))  # no user: not covered
        with pytest.raises(BudgetExceededError, match="bob"):
            await executor.run("hello", ExecutionContext(user_id="bob", max_tokens=10))
        keys = [(u.key, u.calls) for u in await store.usages()]
    assert keys == [("user_id=alice/day", 1), ("user_id=bob/day", 0)]


async def test_a_budget_for_one_value_takes_the_place_of_the_per_value_budget(
    server: FakeLLMServer,
) -> None:
    # every user may spend $0.001 a day (less than a call's reservation), alice $1
    store = MemoryQuotaStore()
    budgets = [
        Budget(limit_usd=0.001, scope="user_id"),
        Budget(limit_usd=1.0, scope="user_id", value="alice"),
    ]
    alice = ExecutionContext(user_id="alice", max_tokens=1000)
    async with store, make(server, budgets=budgets, quota_store=store) as executor:
        first = await executor.run("hello", alice)
        second = await executor.run("hello", alice)
        with pytest.raises(BudgetExceededError, match="user_id=bob/day"):
            await executor.run("hello", ExecutionContext(user_id="bob", max_tokens=1000))
        usages = {u.key: u for u in await store.usages()}
    usage = usages["user_id=alice/day"]
    assert usage.calls == 2 and usage.held == 0 and usage.limit_usd == 1.0
    # each call reserved and charged once
    assert usage.spent_usd == pytest.approx(first.cost_usd + second.cost_usd, abs=1e-9)
    assert usage.reserved == usage.settled + usage.released
    assert usages["user_id=bob/day"].refused == 1


async def test_budgets_for_one_value_of_different_scopes_all_apply(
    server: FakeLLMServer,
) -> None:
    budgets = [
        Budget(limit_usd=1.0, scope="user_id", value="alice"),
        Budget(limit_usd=0.001, scope="workflow", value="docs"),
    ]
    async with make(server, budgets=budgets) as executor:
        answer = await executor.run("hello", ExecutionContext(user_id="alice", max_tokens=10))
        with pytest.raises(BudgetExceededError, match="workflow=docs/day"):
            await executor.run("hello", attrs.evolve(CTX, user_id="alice"))
    assert answer.cost_usd > 0


@pytest.mark.parametrize(
    "budgets",
    [
        [
            Budget(limit_usd=1, scope="user_id", value="a"),
            Budget(limit_usd=2, scope="user_id", value="a"),
        ],
        [Budget(limit_usd=1, scope="user_id"), Budget(limit_usd=2, scope="user_id")],
        [Budget(limit_usd=1, scope="user_id"), Budget(limit_usd=2, name="user_id=bob/day")],
        [
            Budget(limit_usd=1, scope="stage", name="t"),
            Budget(limit_usd=2, scope="user_id", name="t:x"),
        ],
        [
            Budget(limit_usd=1, scope="model", name="t"),
            Budget(limit_usd=2, scope="user_id", value="x", name="t:x"),
        ],
    ],
)
def test_budgets_that_could_charge_one_key_twice_are_refused(
    server: FakeLLMServer, budgets: list[Budget]
) -> None:
    with pytest.raises(ConfigurationError, match="named"):
        make(server, budgets=budgets)


async def test_a_failing_quota_store_degrades_to_local_limits(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    class Down(MemoryQuotaStore):
        async def _transact(self, key: str, fn: Any) -> Any:
            raise StateStoreError("store down", target="test")

    caplog.set_level(logging.WARNING, logger="empathy_models.limits")
    async with make(server, budgets=[Budget(limit_usd=0.006)], quota_store=Down()) as executor:
        answered = 0
        with pytest.raises(BudgetExceededError):  # the limit still holds, per process
            for _ in range(100):
                await executor.run("hello", CTX)
                answered += 1
    assert answered > 0
    warnings_logged = [r for r in caplog.records if "quota store" in r.getMessage()]
    assert len(warnings_logged) == 1  # one warning per outage


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
async def test_a_store_drops_a_budget_window_a_week_after_it_ended(
    kind: str, tmp_path: Path, private_postgres: Callable[[], str | None]
) -> None:
    # (Redis expires a window a week after it ended, on its own clock)
    first = 1_800_000_000.0
    if kind == "memory":
        store: Any = MemoryQuotaStore()
    elif kind == "sqlite":
        store = SQLiteQuotaStore(tmp_path / "q.db")
    else:
        store = _quota_store(kind, tmp_path, private_postgres)
    width, count = 1800, 1000  # half-hour windows for about three weeks
    async with store:
        for i in range(count):
            ws = first + width * i
            await store.reserve(
                "b/1800s", window_start=ws, window_end=ws + width, amount=1, limit=9
            )
        starts = {u.window_start for u in await store.usages()}
    newest = first + width * (count - 1)
    # every window that ended less than a week before the newest began is kept; the
    # rest are dropped (checked once an hour)
    assert {
        first + width * i
        for i in range(count)
        if first + width * (i + 1) >= newest - WINDOW_RETENTION
    } <= starts
    assert min(starts) + width >= newest - WINDOW_RETENTION - 3600
    assert len(starts) <= WINDOW_RETENTION / width + 3


def _quota_store(kind: str, tmp_path: Path, private_postgres: Callable[[], str | None]) -> Any:
    if kind == "memory":
        return MemoryQuotaStore()
    if kind == "sqlite":
        return SQLiteQuotaStore(tmp_path / "q.db")
    url = private_postgres()  # a schema of this test's own, dropped afterwards
    if url is None:
        pytest.skip("EMPATHY_TEST_POSTGRES_DSN is not set")
    return quota_store_from_url(url)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
async def test_a_monthly_window_goes_a_week_after_it_ended(
    kind: str, tmp_path: Path, private_postgres: Callable[[], str | None]
) -> None:
    # monthly windows only: the newest window start written is this month's first day,
    # yet last month's windows, which ended more than a week ago, must go
    day = 86_400.0
    now = time.time()
    this_month = now - 8 * day  # began 8 days ago: last month's ended then
    async with _quota_store(kind, tmp_path, private_postgres) as store:
        for u in range(20):
            await store.reserve(
                f"user_id=u{u}/month",
                window_start=this_month - 30 * day,
                window_end=this_month,
                amount=1,
                limit=10**9,
            )
        ended_6_days_ago = now - 6 * day  # a 30-day window a user of a later cycle had
        await store.reserve(
            "user_id=v/month",
            window_start=ended_6_days_ago - 30 * day,
            window_end=ended_6_days_ago,
            amount=1,
            limit=10**9,
        )
        await store.reserve(
            "user_id=w/month",
            window_start=this_month,
            window_end=this_month + 30 * day,
            amount=1,
            limit=10**9,
        )
        held = {u.key for u in await store.usages()}
    assert held == {"user_id=v/month", "user_id=w/month"}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_named_budget_made_monthly_keeps_its_spend_all_month(
    server: FakeLLMServer, kind: str, tmp_path: Path
) -> None:
    # a daily budget "team" ran on the 1st; from the 5th the same name is a monthly
    # budget, whose window starts on the 1st too: the month's spend is kept until a week
    # after the month ends, not dropped a week after the 1st's window ended
    day = 86_400.0
    wall = FakeClock(start=1_801_440_000.0 + 12 * 3600)  # 2027-02-01 12:00 UTC
    store: Any = (
        MemoryQuotaStore(clock=wall)
        if kind == "memory"
        else SQLiteQuotaStore(tmp_path / "q.db", clock=wall)
    )
    ctx = ExecutionContext(model="gpt-cheap", max_tokens=10)

    def executor(*budgets: Budget) -> EmpathyLLMExecutor:
        return make(server, budgets=list(budgets), quota_store=store, wall_clock=wall)

    async with store:
        async with executor(Budget(name="team", limit_usd=1.0, window="day")) as daily:
            await daily.run("hello", ctx)
        wall.advance(4 * day)  # the 5th
        monthly = Budget(name="team", limit_usd=0.001, window="month")
        async with executor(monthly) as ex:
            with pytest.raises(BudgetExceededError):
                for _ in range(100):
                    await ex.run("hello", ctx)
        spent = (await store.usages())[0]
        wall.advance(5 * day)  # the 10th: another budget's call (the store's sweep)
        async with executor(Budget(limit_usd=1.0, scope="user_id")) as other:
            await other.run("hello", attrs.evolve(ctx, user_id="bob"))
        async with executor(monthly) as ex:
            with pytest.raises(BudgetExceededError):
                await ex.run("hello", ctx)
        (team,) = [u for u in await store.usages() if u.key == "team"]
    assert team.window_end == 1_803_859_200.0  # 2027-03-01: the month's end
    assert team.spent == spent.spent


# --------------------------------------------------------------------------- rate limits


async def test_a_rate_limit_without_capacity_in_time_falls_back(server: FakeLLMServer) -> None:
    limits = {"openai": RateLimit(rpm=1)}
    async with make(server, rate_limits=limits, rate_limit_wait=0.0) as executor:
        first = await executor.run("hello", ExecutionContext(model="gpt-cheap"))
        second = await executor.run("hello", ExecutionContext(model="gpt-cheap"))
    assert first.model == "gpt-cheap"
    assert second.model == "claude-other"  # openai's minute is used up: the next route
    assert server.requests("gpt-cheap") == 1


async def test_every_route_rate_limited_raises_local_rate_limit_errors(
    server: FakeLLMServer,
) -> None:
    limits = {"openai": RateLimit(rpm=1), "anthropic": RateLimit(rpm=1)}
    async with make(server, rate_limits=limits, rate_limit_wait=0.0) as executor:
        await executor.run("hello", ExecutionContext(model="gpt-cheap"))
        await executor.run("hello", ExecutionContext(model="claude-other"))
        with pytest.raises(AllRoutesFailedError) as info:
            await executor.run("hello", CTX)
    assert info.value.exceptions
    for error in info.value.exceptions:
        assert isinstance(error, LocalRateLimitError) and isinstance(error, RateLimitedError)
        assert error.retry_after is not None and 50 < error.retry_after <= 60
    assert server.requests() == 2


async def test_a_call_too_large_for_the_token_burst_says_so_not_to_retry_later(
    server: FakeLLMServer,
) -> None:
    # 4,000 tokens against a burst of 1,000 a minute: three minutes even when idle
    limits = {"openai": RateLimit(tpm=1000), "anthropic": RateLimit(tpm=1000)}
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=4000)
    async with make(server, rate_limits=limits) as executor:
        for _ in range(2):  # the same refusal every time, however long one waits
            with pytest.raises(AllRoutesFailedError) as info:
                await executor.run("hello", pinned)
            busy = info.value.exceptions[0]
            assert isinstance(busy, LocalRateLimitError)
            message = str(busy)
            assert "more than the burst of tpm:openai (1000 tokens)" in message, message
            assert "even when it is idle" in message and "burst_tokens" in message, message
    assert server.requests() == 0


async def test_calls_wait_for_their_place_and_unused_tokens_are_given_back(
    server: FakeLLMServer,
) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    # the clocks stand still (a call under load can take a large part of a second, which
    # would shorten the next wait), and the sleep above does not wait
    clock, wall = FakeClock(start=1_000.0), FakeClock(start=1_800_000_000.0)
    limits = {"gpt-cheap": RateLimit(rpm=60, tpm=100_000)}
    async with make(
        server,
        rate_limits=limits,
        sleep=sleep,
        clock=clock,
        wall_clock=wall,
        quota_store=MemoryQuotaStore(clock=wall),
    ) as executor:
        for _ in range(3):
            await executor.run("hello", ExecutionContext(model="gpt-cheap", max_tokens=1000))
    # one request a second, spaced evenly: each asks for its place at the same instant,
    # so the second and third wait 1 s and 2 s
    assert waits == [pytest.approx(1.0), pytest.approx(2.0)]


async def test_a_providers_429_pushes_the_shared_schedule_back(server: FakeLLMServer) -> None:
    from empathy_models.testing import ModelBehavior

    server.set_behavior("gpt-cheap", ModelBehavior(retry_after=20))
    server.script("gpt-cheap", [429])
    store = MemoryQuotaStore()
    limits = {"openai": RateLimit(rpm=6000)}
    async with (
        store,
        make(server, rate_limits=limits, quota_store=store, rate_limit_wait=1.0) as executor,
    ):
        first = await executor.run("hello", ExecutionContext(model="gpt-cheap"))
        # the 429 said "come back in 20 s": openai's schedule moved 20 s on for everyone
        grant = await store.acquire("rpm:openai", cost=1.0, interval=0.01, burst=1.0, max_wait=0.0)
    assert first.model == "claude-other"  # the 429 (no retries) fell back
    assert not grant.granted and 10.0 < grant.wait <= 20.1  # less the time since the 429


async def test_a_429_after_a_slow_call_holds_the_schedule_from_when_it_came(
    server: FakeLLMServer,
) -> None:
    from empathy_models.testing import ModelBehavior

    server.set_behavior("gpt-cheap", ModelBehavior(retry_after=20))
    server.script("gpt-cheap", [429])
    slow = [0.0]  # the store's clock runs 100 s on once the call has its place

    def clock() -> float:
        now = time.time() + slow[0]
        slow[0] = 100.0
        return now

    store = MemoryQuotaStore(clock=clock)
    limits = {"openai": RateLimit(rpm=6000)}
    async with (
        store,
        make(server, rate_limits=limits, quota_store=store, rate_limit_wait=1.0) as executor,
    ):
        await executor.run("hello", ExecutionContext(model="gpt-cheap"))
        # the call took 100 s, then its 429 said "come back in 20 s": 20 s from then
        grant = await store.acquire("rpm:openai", cost=1.0, interval=0.01, burst=1.0, max_wait=0.0)
    assert not grant.granted and 10.0 < grant.wait <= 20.1  # less the time since the 429


async def test_workers_told_the_same_reset_together_push_the_schedule_back_once(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    from empathy_models.testing import ModelBehavior

    # each 429 comes 3 s after its request, by when all three requests were sent (on a
    # busy machine too)
    server.set_behavior("gpt-cheap", ModelBehavior(retry_after=20, latency=3000))
    server.script("gpt-cheap", [429, 429, 429])
    url = f"sqlite:///{tmp_path}/quota.db"
    limits = {"openai": RateLimit(rpm=6000)}
    workers = [make(server, rate_limits=limits, quota_store=url) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        answers = await asyncio.gather(
            *(w.run("hello", ExecutionContext(model="gpt-cheap")) for w in workers)
        )
    assert [a.model for a in answers] == ["claude-other"] * 3  # each 429 fell back
    assert server.requests("gpt-cheap") == 3
    async with SQLiteQuotaStore(tmp_path / "quota.db") as store:
        grant = await store.acquire("rpm:openai", cost=1.0, interval=0.01, burst=1.0, max_wait=0.0)
    # every worker's 429 said "20 s from now": the schedule moved to that time once
    assert not grant.granted and 10.0 < grant.wait <= 20.1  # less the time since the 429


async def test_a_providers_wait_pushes_the_schedule_back_ten_minutes_at_most(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    from empathy_models import BreakerPolicy
    from empathy_models.testing import ModelBehavior

    caplog.set_level(logging.WARNING, logger="empathy_models.limits")
    server.set_behavior("gpt-cheap", ModelBehavior(retry_after=1_000_000 * 3600))
    server.script("gpt-cheap", [429])
    store = MemoryQuotaStore()
    limits = {"openai": RateLimit(rpm=6000)}
    async with (
        store,
        make(server, rate_limits=limits, quota_store=store, rate_limit_wait=1.0) as executor,
    ):
        await executor.run("hello", ExecutionContext(model="gpt-cheap"))
        grant = await store.acquire("rpm:openai", cost=1.0, interval=0.01, burst=1.0, max_wait=0.0)
    cap = BreakerPolicy().max_retry_after_open  # the breaker's cap on the same hint
    assert cap == 600.0
    assert not grant.granted and cap - 10.0 < grant.wait <= cap + 0.1  # less the time since the 429
    assert any("at most 600 s" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("model", "provider"), [("gpt-cheap", "openai"), ("claude-other", "anthropic")]
)
async def test_a_providers_exhausted_limit_header_holds_calls_back_before_any_429(
    model: str, provider: str
) -> None:
    # the provider allows 2 requests a second (a burst of 2); the executor was told
    # 6,000 a minute: only the remaining/reset headers on its answers can keep it
    # from sending the third request into a 429
    async with FakeLLMServer(api_key=KEY, rpm=120, rpm_burst=2) as server:
        limits = {provider: RateLimit(rpm=6000)}
        async with make(server, rate_limits=limits, rate_limit_wait=5.0) as executor:
            answers = [
                await executor.run("hello", ExecutionContext(model=model, max_tokens=10))
                for _ in range(6)
            ]
        stats = server.rpm_stats()
    assert [a.model for a in answers] == [model] * 6
    assert all(len(a.attempts) == 1 for a in answers)
    assert (stats["accepted"], stats["refused"]) == (6, 0)


async def test_a_streams_exhausted_limit_header_holds_the_next_calls_back() -> None:
    async with FakeLLMServer(api_key=KEY, rpm=120, rpm_burst=2) as server:
        limits = {"anthropic": RateLimit(rpm=6000)}
        ctx = ExecutionContext(model="claude-other", max_tokens=10)
        async with make(server, rate_limits=limits, rate_limit_wait=5.0) as executor:
            for _ in range(5):
                async with executor.stream("hello", ctx) as stream:
                    response = await stream.get_final_response()
                assert response.model == "claude-other" and len(response.attempts) == 1
        stats = server.rpm_stats()
    assert (stats["accepted"], stats["refused"]) == (5, 0)


async def test_routes_whose_schedule_is_booked_too_far_are_avoided(server: FakeLLMServer) -> None:
    limits = {"openai": RateLimit(rpm=1)}
    ctx = ExecutionContext(tier="cheap", max_tokens=10)
    async with make(server, rate_limits=limits, rate_limit_wait=0.0) as executor:
        first = await executor.run("hello", ctx)
        second = await executor.run("hello", ctx)
        third = await executor.run("hello", ctx)
    assert first.fallback_chain == ("gpt-cheap",)
    # the second tried openai's models, found no capacity within the wait, fell back
    assert second.fallback_chain[-1] == "claude-other" and second.fallback_chain[0] == "gpt-cheap"
    # by the third, openai is known to be booked for a minute: not tried first
    assert third.fallback_chain == ("claude-other",)
    assert server.requests("gpt-cheap") == 1


async def test_a_call_too_large_for_the_burst_leaves_the_route_to_the_small_ones(
    server: FakeLLMServer,
) -> None:
    # the large call's wait is its own size, not the schedule's load: openai is idle
    limits = {"openai": RateLimit(tpm=1000)}
    async with make(server, rate_limits=limits) as executor:
        large = await executor.run("hello", ExecutionContext(tier="cheap", max_tokens=4000))
        small = await executor.run("hello", ExecutionContext(tier="cheap", max_tokens=10))
    assert large.model == "claude-other"
    assert small.fallback_chain == ("gpt-cheap",)


async def test_the_routing_decision_says_why_a_cheaper_model_answered(
    server: FakeLLMServer,
) -> None:
    from empathy_models import AdaptiveModelRouter

    # the capable tier holds only gpt-dear; the budget fits only the cheap gpt-cheap
    registry = ModelRegistry(
        models=[
            _model("gpt-cheap", "openai", 5.0),
            attrs.evolve(_model("gpt-dear", "openai", 50.0), tier="capable"),
        ],
        price_version="limits-test-2",
    )
    telemetry = MemoryTelemetryBackend()
    router = AdaptiveModelRouter(registry, telemetry, seed=1)
    executor = EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
        registry=registry,
        telemetry_store=telemetry,
        router=router,
        budgets=[Budget(limit_usd=0.01)],
    )
    async with router, executor:
        response = await executor.run("hello", ExecutionContext(tier="capable", max_tokens=1000))
        assert executor.limiter is not None and not executor.limiter.degraded
    assert response.model == "gpt-cheap"
    assert response.routing_decision is not None
    assert response.routing_decision.model == "gpt-dear"
    assert "budget 'global/day'" in response.routing_decision.reason
    assert "gpt-cheap instead" in response.routing_decision.reason


async def test_the_routing_decision_says_why_a_model_outside_a_spent_budget_answered(
    server: FakeLLMServer,
) -> None:
    from empathy_models import AdaptiveModelRouter, RoutingPolicy

    # the router picks gpt-cheap, the cheaper of the capable tier; the spent openai budget
    # refuses it and no cheaper model is left: claude-other, the next route, which that
    # budget does not cover, answers, and the decision says why
    registry = ModelRegistry(
        models=[
            attrs.evolve(REGISTRY.get("gpt-cheap"), tier="capable"),
            attrs.evolve(REGISTRY.get("claude-other"), tier="capable"),
        ],
        price_version="limits-test-4",
    )
    telemetry = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0, warmup_share=0.0)
    router = AdaptiveModelRouter(registry, telemetry, policy=policy, refresh_interval=None)
    spent = Budget(limit_usd=0.0, scope="provider", value="openai")
    async with (
        router,
        make(
            server, registry=registry, telemetry_store=telemetry, router=router, budgets=[spent]
        ) as executor,
    ):
        ctx = ExecutionContext(tier="capable", max_tokens=1000, min_success_rate=0.0)
        response = await executor.run("hello", ctx)
    assert response.model == "claude-other"
    assert response.routing_decision is not None
    assert response.routing_decision.model == "gpt-cheap"
    assert "budget 'provider=openai/day'" in response.routing_decision.reason
    assert "on to claude-other" in response.routing_decision.reason
    assert server.requests("gpt-cheap") == 0


async def test_a_registry_models_rpm_is_enforced_unless_the_executor_overrides_it(
    server: FakeLLMServer,
) -> None:
    registry = ModelRegistry.from_dict(
        {
            "price_version": "limits-test-3",
            "models": [
                {**_model("gpt-cheap", "openai", 5.0).to_dict(), "rpm": 1, "tpm": 50_000},
                _model("claude-other", "anthropic", 20.0).to_dict(),
            ],
        }
    )
    limited = registry.get("gpt-cheap")
    assert (limited.rpm, limited.tpm) == (1, 50_000)
    assert ModelRegistry.from_dict(registry.to_dict()) == registry
    providers = [
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
    ]
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=10)
    async with EmpathyLLMExecutor(
        providers,
        registry=registry,
        telemetry_store=MemoryTelemetryBackend(),
        rate_limit_wait=0.0,
    ) as executor:
        assert (await executor.run("hello", pinned)).model == "gpt-cheap"
        assert (await executor.run("hello", pinned)).model == "claude-other"  # 1 a minute
    async with EmpathyLLMExecutor(
        providers,
        registry=registry,
        telemetry_store=MemoryTelemetryBackend(),
        rate_limits={"gpt-cheap": RateLimit(rpm=6000, burst_requests=10)},
        rate_limit_wait=0.0,
    ) as executor:
        for _ in range(3):  # the executor's own limit for the model wins
            assert (await executor.run("hello", pinned)).model == "gpt-cheap"
    with pytest.raises(ConfigurationError, match="rpm"):
        ModelRegistry.from_dict({"price_version": "x", "models": [{**limited.to_dict(), "rpm": 0}]})


async def test_a_rate_limit_named_by_both_the_provider_and_its_model_counts_once(
    server: FakeLLMServer,
) -> None:
    # a provider serving one model of the same name: the limit is one schedule, and a
    # call takes one place in it (it took two, the second a minute out at 1 rpm)
    registry = ModelRegistry(models=[_model("solo", "solo", 5.0)], price_version="solo-1")
    provider = OpenAIProvider(name="solo", api_key=KEY, base_url=server.openai_base_url)
    async with EmpathyLLMExecutor(
        [provider],
        registry=registry,
        telemetry_store=MemoryTelemetryBackend(),
        rate_limits={"solo": RateLimit(rpm=1)},
        rate_limit_wait=0.0,
    ) as executor:
        assert (await executor.run("hello", ExecutionContext(max_tokens=10))).model == "solo"
        with pytest.raises(AllRoutesFailedError) as info:
            await executor.run("hello", ExecutionContext(max_tokens=10))
    (busy,) = info.value.exceptions
    assert isinstance(busy, LocalRateLimitError) and "rpm:solo" in str(busy)
    assert server.requests() == 1


# --------------------------------------------------------------------------- streaming


async def test_streams_reserve_and_settle_like_runs(server: FakeLLMServer, tmp_path: Path) -> None:
    store = quota_store_from_url(f"sqlite:///{tmp_path}/quota.db")
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=1000)
    telemetry = MemoryTelemetryBackend()
    async with (
        store,
        make(
            server, budgets=[Budget(limit_usd=1.0)], quota_store=store, telemetry_store=telemetry
        ) as ex,
    ):
        async with ex.stream("hello there", pinned) as stream:
            async for _ in stream:
                pass
        whole = await stream.get_final_response()
        async with ex.stream("hello again", pinned) as stream:
            async for _ in stream:
                break  # the caller stops early: settled at what it may have cost
        (usage,) = await store.usages()
        records = await telemetry.recent()
    assert whole.cost_usd > 0
    cancelled, answered = sorted(records, key=lambda r: r.outcome.value)
    assert (cancelled.outcome.value, answered.outcome.value) == ("cancelled", "success")
    assert usage.calls == 2 and usage.held == 0
    # left before OpenAI's last chunk (its usage): the prompt is recorded as its
    # estimate and charged as its worst case, four times that
    assert cancelled.metadata["empathy_models.input_tokens_estimated"] is True
    info = REGISTRY.get("gpt-cheap")
    worst = info.cost(4 * cancelled.input_tokens, cancelled.output_tokens)
    assert usage.spent_usd == pytest.approx(answered.cost_usd + worst, abs=1e-9)
    assert usage.reserved == usage.settled + usage.released


async def test_a_stream_a_budget_cannot_cover_raises_before_calling(
    server: FakeLLMServer,
) -> None:
    async with make(server, budgets=[Budget(limit_usd=0.0001, name="tiny")]) as executor:
        with pytest.raises(BudgetExceededError, match="'tiny'"):
            async with executor.stream("hello", CTX) as stream:
                async for _ in stream:
                    pass
    assert server.requests() == 0


async def test_a_stream_waits_for_its_place_under_a_rate_limit(server: FakeLLMServer) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    limits = {"gpt-cheap": RateLimit(rpm=60, tpm=100_000)}
    pinned = ExecutionContext(model="gpt-cheap", max_tokens=1000)
    async with make(server, rate_limits=limits, sleep=sleep) as executor:
        for _ in range(2):
            async with executor.stream("hello", pinned) as stream:
                async for _ in stream:
                    pass
    assert len(waits) == 1 and 0.9 < waits[0] <= 1.0
