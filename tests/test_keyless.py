"""
One API key is enough: a provider configured without a key is not routed to, says so
in every routing decision and once at start-up, and an attempt that fails on our side
(a model pinned to that provider) is recorded as ``not_sent``, which changes no model's
routing statistics for any worker sharing the telemetry.  Also: a task whose tier has
no usable model moves to another tier and says so, or raises an error that says what
to pass.  Real HTTP to `FakeLLMServer`, real SQLite files.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    AnthropicProvider,
    CircuitBreaker,
    CircuitState,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    MissingAPIKeyWarning,
    ModelRegistry,
    ModelTier,
    OpenAIProvider,
    Outcome,
    RetryPolicy,
    RoutingDecision,
)
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.exceptions import MissingAPIKeyError
from empathy_models.testing import FakeLLMServer

from ._fakes import CHEAP_ONLY, KEY, TWO_TIERS, NoSleep, fake_model

REGISTRY = TWO_TIERS
CHEAP = ExecutionContext(workflow="support", stage="triage", tier="cheap")


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=3) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _no_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def one_key(server: FakeLLMServer) -> list[Any]:
    """Anthropic without a key, OpenAI with one."""
    return [
        AnthropicProvider(base_url=server.anthropic_base_url),
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
    ]


def both_keys(server: FakeLLMServer) -> list[Any]:
    return [
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
    ]


def keyless_executor(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    with pytest.warns(MissingAPIKeyWarning) as caught:
        executor = EmpathyLLMExecutor(
            one_key(server),
            registry=options.pop("registry", REGISTRY),
            retry=RetryPolicy(jitter=False),
            sleep=NoSleep(),
            **options,
        )
    assert len(caught) == 1
    return executor


# --------------------------------------------------------------------------- routing


def test_one_warning_at_start_up_names_the_provider_and_its_variable(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="empathy_models.executor"),
        pytest.warns(MissingAPIKeyWarning) as caught,
    ):
        EmpathyLLMExecutor(one_key(server), registry=REGISTRY, telemetry_store="null://")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "anthropic" in message and "ANTHROPIC_API_KEY" in message
    assert "openai" not in message
    assert [r.getMessage() for r in caplog.records] == [message]


async def test_keyless_provider_is_never_called_and_the_decision_says_why(
    server: FakeLLMServer,
) -> None:
    """The router sees only keyed models; the keyless ones are listed as excluded."""
    router = AdaptiveModelRouter(REGISTRY, seed=1)
    telemetry = SQLiteTelemetryBackend(":memory:")
    async with (
        telemetry,
        keyless_executor(server, telemetry_store=telemetry, router=router) as executor,
    ):
        responses = [await executor.run(f"question {i}", CHEAP) for i in range(10)]
        records = await telemetry.recent(limit=100)
    assert {r.model for r in responses} == {"gpt-fake-mini"}
    assert server.requests("claude-fake-haiku") == 0
    assert all(r.fallback_chain == ("gpt-fake-mini",) for r in responses)
    assert {r.model for r in records} == {"gpt-fake-mini"}
    decision = responses[-1].routing_decision
    assert isinstance(decision, RoutingDecision)
    excluded = {c.model: c for c in decision.candidates if c.excluded}
    assert set(excluded) == {"claude-fake-haiku"}
    (reason,) = excluded["claude-fake-haiku"].reasons
    assert "no API key for anthropic" in reason and "ANTHROPIC_API_KEY" in reason
    assert "gpt-fake-mini" in {c.model for c in decision.candidates if not c.excluded}
    # a record like any other: what the validated constructor builds from its dict
    assert RoutingDecision.from_dict(decision.to_dict()) == decision


async def test_a_decision_with_keyless_models_keeps_every_field_of_the_routers(
    server: FakeLLMServer,
) -> None:
    # the executor adds the keyless rows to the router's decision: the constraints it
    # was judged against, its pick and its cost stay the router's
    context = ExecutionContext(
        workflow="support",
        stage="triage",
        tier="cheap",
        max_cost=0.75,
        max_latency_ms=45_000.0,
        min_success_rate=0.55,
        max_tokens=64,
    )
    async with keyless_executor(
        server, telemetry_store="null://", router=AdaptiveModelRouter(REGISTRY, seed=1)
    ) as executor:
        decision = (await executor.run("hello", context)).routing_decision
    assert decision is not None
    assert (decision.max_cost, decision.max_latency_ms, decision.min_success_rate) == (
        0.75,
        45_000.0,
        0.55,
    )
    assert (decision.workflow, decision.stage, decision.model) == (
        "support",
        "triage",
        "gpt-fake-mini",
    )
    assert decision.expected_cost_usd is not None and decision.expected_cost_usd > 0
    assert [c.model for c in decision.candidates if c.excluded] == ["claude-fake-haiku"]
    assert RoutingDecision.from_dict(decision.to_dict()) == decision


async def test_without_a_router_the_keyed_provider_answers_first(server: FakeLLMServer) -> None:
    async with keyless_executor(server, telemetry_store="null://") as executor:
        response = await executor.run("hello", CHEAP)
    assert response.fallback_chain == ("gpt-fake-mini",)
    assert len(response.attempts) == 1
    assert server.requests("claude-fake-haiku") == 0


async def test_a_pinned_keyless_model_is_tried_recorded_not_sent_and_falls_back(
    server: FakeLLMServer,
) -> None:
    """Pinning overrides routing: the attempt fails locally and the next route answers."""
    telemetry = SQLiteTelemetryBackend(":memory:")
    async with (
        telemetry,
        CircuitBreaker() as breaker,
        keyless_executor(server, telemetry_store=telemetry, breaker=breaker) as executor,
    ):
        response = await executor.run(
            "hello", ExecutionContext(workflow="support", stage="triage", model="claude-fake-haiku")
        )
        status = await breaker.get_status(breaker.key_for("anthropic", "claude-fake-haiku"))
        records = sorted(await telemetry.recent(limit=100), key=lambda r: r.attempt)
    assert response.model == "gpt-fake-mini"
    assert [a.outcome for a in response.attempts] == [Outcome.NOT_SENT, Outcome.SUCCESS]
    assert response.retry_count == 0  # a fallback is not a retry
    assert response.fallback_count == 1
    assert server.requests("claude-fake-haiku") == 0
    assert status.state is CircuitState.CLOSED and status.failure_count == 0
    assert [(r.model, r.outcome, r.error_type) for r in records] == [
        ("claude-fake-haiku", Outcome.NOT_SENT, "MissingAPIKeyError"),
        ("gpt-fake-mini", Outcome.SUCCESS, None),
    ]


async def test_a_keyless_attempt_leaves_every_models_statistics_unchanged(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """
    Two workers share one SQLite file.  Worker A (both keys) builds history; worker B
    (Anthropic only, without its key) makes keyless attempts.  Every model's statistics,
    as any router reading the file (and as B's own live router) sees them, are unchanged.
    """
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    candidates = [m.id for m in REGISTRY.models]

    def stats(decision: RoutingDecision) -> dict[str, tuple[int, float | None]]:
        return {
            c.model: (c.sample_size, c.success_rate) for c in decision.candidates if not c.excluded
        }

    server.script("claude-fake-haiku", [503, "ok", "ok", 503])
    async with (
        AdaptiveModelRouter(REGISTRY, url, refresh_interval=None, seed=1) as router_a,
        EmpathyLLMExecutor(
            both_keys(server),
            registry=REGISTRY,
            telemetry_store=url,
            router=router_a,
            retry=RetryPolicy.none(),
            sleep=NoSleep(),
        ) as worker_a,
    ):
        for model in candidates:
            for i in range(4):
                ctx = ExecutionContext(workflow="support", stage="triage", model=model)
                await worker_a.run(f"q{i}", ctx)
    async with AdaptiveModelRouter(REGISTRY, url, refresh_interval=None) as reader:
        before = await reader.get_routing_stats("support")
        seen_before = stats(reader.get_best_model("support", "triage", candidates=candidates))
    assert before.performance_by_model["claude-fake-haiku"].successes == 2
    assert before.performance_by_model["claude-fake-sonnet"].calls == 4

    # worker B has no other provider: a keyless attempt, not sent, does not count against
    # max_routes, and no other model may answer in its place here
    router_b = AdaptiveModelRouter(REGISTRY, url, refresh_interval=None)
    with pytest.warns(MissingAPIKeyWarning):
        worker_b = EmpathyLLMExecutor(
            [AnthropicProvider(base_url=server.anthropic_base_url)],
            registry=REGISTRY,
            telemetry_store=url,
            router=router_b,
            fallback=FallbackPolicy.none(),
            retry=RetryPolicy(jitter=False),
            sleep=NoSleep(),
        )
    async with router_b, worker_b:
        live_before = stats(router_b.get_best_model("support", "triage", candidates=candidates))
        for model in ("claude-fake-haiku", "claude-fake-sonnet"):
            for _ in range(3):
                ctx = ExecutionContext(workflow="support", stage="triage", model=model)
                with pytest.raises(AllRoutesFailedError) as failed:
                    await worker_b.run("hello", ctx)
                assert failed.group_contains(MissingAPIKeyError)
        live_after = stats(router_b.get_best_model("support", "triage", candidates=candidates))
    async with AdaptiveModelRouter(REGISTRY, url, refresh_interval=None) as reader:
        after = await reader.get_routing_stats("support")
        seen_after = stats(reader.get_best_model("support", "triage", candidates=candidates))
    assert after.performance_by_model == before.performance_by_model
    assert seen_after == seen_before
    assert live_after == live_before
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        kept = await backend.recent(limit=1000)
    assert sum(r.outcome is Outcome.NOT_SENT for r in kept) == 6  # recorded, not counted


# --------------------------------------------------------------------------- tiers


async def test_default_context_with_only_cheap_models_uses_the_cheap_tier_and_says_so(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """ExecutionContext() asks for the capable tier; a cheap-only registry still answers."""
    router = AdaptiveModelRouter(CHEAP_ONLY, seed=1)
    with caplog.at_level(logging.WARNING, logger="empathy_models.executor"):
        async with EmpathyLLMExecutor(
            both_keys(server), registry=CHEAP_ONLY, telemetry_store="null://", router=router
        ) as executor:
            first = await executor.run("hello")
            second = await executor.run("hello again")
    assert first.tier is ModelTier.CHEAP and second.tier is ModelTier.CHEAP
    assert first.routing_decision is not None
    assert "using the cheap tier" in first.routing_decision.reason
    notes = [r.getMessage() for r in caplog.records if "using the cheap tier" in r.getMessage()]
    assert len(notes) == 1  # once per tier, not per call


async def test_the_tier_substitution_names_each_runs_own_task(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    router = AdaptiveModelRouter(CHEAP_ONLY, seed=1)
    tasks = ("final_review", "coordinate", "critical_decision")  # premium tier tasks
    reasons = []
    with caplog.at_level(logging.WARNING, logger="empathy_models.executor"):
        async with EmpathyLLMExecutor(
            both_keys(server), registry=CHEAP_ONLY, telemetry_store="null://", router=router
        ) as executor:
            for task in tasks:
                response = await executor.run("hello", ExecutionContext(task_type=task))
                assert response.routing_decision is not None
                reasons.append(response.routing_decision.reason)
    for task, reason in zip(tasks, reasons, strict=True):
        assert f"task {task!r} asks for the premium tier" in reason, reason
        assert "using the cheap tier" in reason
    notes = [r.getMessage() for r in caplog.records if "using the cheap tier" in r.getMessage()]
    assert len(notes) == 1 and "'final_review'" in notes[0]  # logged once per tier


async def test_a_missing_tier_moves_towards_more_capability_first(server: FakeLLMServer) -> None:
    registry = ModelRegistry(
        models=[
            fake_model("claude-fake-haiku", "anthropic", "cheap", 0.8),
            fake_model("gpt-fake-5", "openai", "premium", 10.0),
        ],
        price_version="gap-1",
    )
    async with EmpathyLLMExecutor(
        both_keys(server), registry=registry, telemetry_store="null://"
    ) as executor:
        response = await executor.run("hello", ExecutionContext(task_type="unknown"))
    assert response.model == "gpt-fake-5"


async def test_an_explicit_tier_without_models_raises_and_suggests_what_to_pass(
    server: FakeLLMServer,
) -> None:
    async with EmpathyLLMExecutor(
        both_keys(server), registry=CHEAP_ONLY, telemetry_store="null://"
    ) as executor:
        with pytest.raises(ConfigurationError) as raised:
            await executor.run("hello", ExecutionContext(tier="premium"))
    message = str(raised.value)
    assert "no premium model" in message
    assert "tier=" in message and "task_type=" in message and "model=" in message
    assert "cheap" in message


async def test_no_keyed_provider_at_all_raises_naming_the_variables(server: FakeLLMServer) -> None:
    with pytest.warns(MissingAPIKeyWarning):
        executor = EmpathyLLMExecutor(
            [AnthropicProvider(base_url=server.anthropic_base_url)],
            registry=REGISTRY,
            telemetry_store="null://",
        )
    async with executor:
        with pytest.raises(ConfigurationError) as raised:
            await executor.run("hello", CHEAP)
    assert "ANTHROPIC_API_KEY" in str(raised.value)
    assert server.requests() == 0
