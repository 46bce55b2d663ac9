"""
``max_ttft_ms``: the router holds a model's p95 time to first token (of its streamed
successful calls) to the limit as it holds latency, live, after a restart over a store,
and through `ExecutionContext` and `executor.stream` over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    NoModelMeetsConstraintsError,
    OpenAIProvider,
    Outcome,
    RetryPolicy,
    RoutingDecision,
    RoutingPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.records import ConstraintStatus
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior
from empathy_models.testing.clock import FakeClock

from ._cli import run_cli
from ._fakes import KEY, list_cost

WF, ST = "chat", "reply"


def info(model: str, out_price: float) -> ModelInfo:
    return ModelInfo(
        id=model,
        provider="openai",
        tier="cheap",
        input_price_per_mtok=0.1,
        output_price_per_mtok=out_price,
        context_window=128_000,
        max_output_tokens=8192,
    )


# cheapest first: "slow" starts streaming late, "unstreamed" was never streamed
REGISTRY = ModelRegistry(
    models=(info("slow", 0.2), info("unstreamed", 0.4), info("fast", 1.0)),
    price_version="ttft-test-1",
)
CANDIDATES = ["slow", "unstreamed", "fast"]
TTFT = {"slow": 900.0, "unstreamed": None, "fast": 120.0}


def rec(clock: FakeClock, model: str, k: int) -> LLMCallRecord:
    ttft = TTFT[model]
    return LLMCallRecord(
        provider="openai",
        model=model,
        outcome=Outcome.SUCCESS,
        timestamp=datetime.fromtimestamp(clock(), UTC),
        workflow=WF,
        stage=ST,
        input_tokens=500,
        output_tokens=100,
        cost_usd=list_cost(REGISTRY, model, True, 500, 100),
        latency_ms=1500.0 + k % 7,
        ttft_ms=None if ttft is None else ttft * (1.0 + 0.05 * (k % 5)),
    )


def records(clock: FakeClock, per_model: int = 60) -> list[LLMCallRecord]:
    out = []
    for k in range(per_model):
        for model in CANDIDATES:
            clock.advance(1.0)
            out.append(rec(clock, model, k))
    return out


def statuses(decision: RoutingDecision) -> dict[str, ConstraintStatus | None]:
    return {c.model: c.constraints.get("max_ttft_ms") for c in decision.candidates}


def reasons(decision: RoutingDecision, model: str) -> str:
    return " | ".join(next(c for c in decision.candidates if c.model == model).reasons)


def check(decision: RoutingDecision) -> None:
    assert decision.model == "fast" and decision.constraints_met and not decision.exploration
    assert decision.max_ttft_ms == 300.0
    assert statuses(decision) == {
        "slow": ConstraintStatus.REJECTED,
        "unstreamed": ConstraintStatus.UNPROVEN,
        "fast": ConstraintStatus.ELIGIBLE,
    }
    assert re.search(r"time to first token p50 9\d\d ms > max 300 ms", reasons(decision, "slow"))
    assert "time to first token: 0 streamed successful calls" in reasons(decision, "unstreamed")
    fast = next(c for c in decision.candidates if c.model == "fast")
    assert fast.ttft_p50_ms is not None and 120.0 <= fast.ttft_p50_ms <= 140.0
    assert fast.ttft_p95_ms is not None and fast.ttft_p95_ms < 300.0


POLICY = RoutingPolicy(explore_rate=0.0)


def test_a_slow_first_token_is_excluded_and_an_unstreamed_model_is_not_assumed_fast() -> None:
    clock = FakeClock()
    router = AdaptiveModelRouter(REGISTRY, clock=clock, seed=1, policy=POLICY)
    for record in records(clock):
        router.record_outcome(record)
    check(router.get_best_model(WF, ST, candidates=CANDIDATES, max_ttft_ms=300.0))
    # without the limit, the cheapest model that meets the rest is chosen
    plain = router.get_best_model(WF, ST, candidates=CANDIDATES)
    assert plain.model == "slow" and plain.max_ttft_ms is None
    assert all(c.constraints.get("max_ttft_ms") is None for c in plain.candidates)


async def test_the_same_verdicts_after_a_restart_over_the_store(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(path) as store:
        await store.record_many(records(clock))
    async with (
        SQLiteTelemetryBackend(path) as store,
        AdaptiveModelRouter(REGISTRY, store, clock=clock, seed=1, policy=POLICY) as router,
    ):
        check(router.get_best_model(WF, ST, candidates=CANDIDATES, max_ttft_ms=300.0))


def test_no_model_fast_enough_raises_or_relaxes_the_ttft_first() -> None:
    clock = FakeClock()
    router = AdaptiveModelRouter(REGISTRY, clock=clock, seed=1, policy=POLICY)
    for record in records(clock):
        router.record_outcome(record)
    with pytest.raises(NoModelMeetsConstraintsError) as caught:
        router.get_best_model(WF, ST, candidates=["slow"], max_ttft_ms=300.0)
    assert "time to first token" in str(caught.value)
    relaxed = router.get_best_model(
        WF, ST, candidates=["slow"], max_ttft_ms=300.0, max_latency_ms=5000.0, on_no_match="relax"
    )
    assert relaxed.model == "slow" and relaxed.relaxed == ("max_ttft_ms",)


def test_one_measured_call_is_not_said_to_bound_the_p95_at_zero() -> None:
    # latency_min_samples=1 judges from one call: its p50 can rule a model out, but one
    # call gives no p95 bound; the reason must say so, not "p95 upper bound 0.00 ms not
    # yet proven <= max 5000 ms" (as if 0 ms were over the limit)
    clock = FakeClock()
    router = AdaptiveModelRouter(
        REGISTRY, clock=clock, seed=1, policy=RoutingPolicy(latency_min_samples=1)
    )
    clock.advance(1.0)
    router.record_outcome(rec(clock, "fast", 0))
    decision = router.get_best_model(
        WF, ST, candidates=["fast"], max_latency_ms=5000.0, max_ttft_ms=500.0, on_no_match="relax"
    )
    (fast,) = decision.candidates
    assert fast.constraints["max_latency_ms"] is ConstraintStatus.UNPROVEN
    assert fast.constraints["max_ttft_ms"] is ConstraintStatus.UNPROVEN
    said = reasons(decision, "fast")
    assert "0.00 ms" not in said, said
    assert "latency p95: 1 measured successful call, need 2 for a bound" in said
    assert "time to first token p95: 1 streamed successful call, need 2 for a bound" in said


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "100", True])
def test_bad_limits_are_configuration_errors(bad: object) -> None:
    router = AdaptiveModelRouter(REGISTRY, seed=1)
    with pytest.raises(ConfigurationError, match="max_ttft_ms"):
        router.get_best_model(WF, ST, max_ttft_ms=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_ttft_ms"):
        ExecutionContext(workflow=WF, max_ttft_ms=bad)  # type: ignore[arg-type]


def test_a_pinned_model_cannot_be_held_to_a_ttft_limit() -> None:
    with pytest.raises(ConfigurationError, match="max_ttft_ms"):
        ExecutionContext(workflow=WF, model="fast", max_ttft_ms=300.0)


async def test_streams_learn_ttft_and_the_context_limit_routes_to_the_fast_model() -> None:
    registry = ModelRegistry(models=(info("slow", 0.2), info("fast", 1.0)), price_version="t2")
    # far apart, and the fast one not at 0 ms, so that a loaded machine's delays (tens
    # of ms) neither blur the gap nor spread the fast model's few samples
    behaviors = {
        "slow": ModelBehavior(stream=StreamBehavior(first_chunk_ms=1000.0)),
        "fast": ModelBehavior(stream=StreamBehavior(first_chunk_ms=60.0)),
    }
    policy = RoutingPolicy(explore_rate=0.0, latency_min_samples=3)
    async with FakeLLMServer(behaviors, api_key=KEY) as server:
        router = AdaptiveModelRouter(registry, seed=1, policy=policy)
        async with EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            registry=registry,
            router=router,
            telemetry_store="memory://",
            retry=RetryPolicy.none(),
        ) as executor:

            async def pinned(model: str) -> None:
                async with executor.stream("hi", ExecutionContext(model=model)) as stream:
                    await stream.get_final_response()

            for model in ("slow", "fast"):  # each streamed five times at once, pinned
                await asyncio.gather(*(pinned(model) for _ in range(5)))
            ctx = ExecutionContext(min_success_rate=0.0, max_ttft_ms=400.0)
            async with executor.stream("hi", ctx) as stream:
                response = await stream.get_final_response()
            plain = await executor.run("hi", ExecutionContext(min_success_rate=0.0))
    decision = response.routing_decision
    assert decision is not None and decision.max_ttft_ms == 400.0
    assert response.model == "fast" and decision.constraints_met
    assert statuses(decision) == {
        "slow": ConstraintStatus.REJECTED,
        "fast": ConstraintStatus.ELIGIBLE,
    }
    assert plain.model == "slow"  # without the limit, the cheaper model


async def test_routing_stats_shows_time_to_first_token(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    path = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(path) as store:
        await store.record_many(
            [
                LLMCallRecord(
                    provider="openai",
                    model=model,
                    outcome=Outcome.SUCCESS,
                    timestamp=now,
                    workflow=WF,
                    stage=ST,
                    input_tokens=400,
                    output_tokens=100,
                    cost_usd=0.0001,
                    latency_ms=900.0,
                    ttft_ms=ttft,
                )
                for model, ttft in [("gpt-4o-mini", 150.0)] * 10 + [("gpt-4o", None)] * 10
            ]
        )
    home = tmp_path / "home"
    result = run_cli(home, "routing", "stats", WF, "--db", str(path), "--json")
    assert result.returncode == 0, result.stderr
    (stats,) = json.loads(result.stdout)["workflows"]
    by_model = stats["performance_by_model"]
    assert by_model["gpt-4o-mini"]["ttft_p50"] == pytest.approx(150.0, rel=0.05)
    assert by_model["gpt-4o-mini"]["ttft_p95"] == pytest.approx(150.0, rel=0.05)
    assert by_model["gpt-4o"]["ttft_p50"] is None
    table = run_cli(home, "routing", "stats", WF, "--db", str(path))
    assert table.returncode == 0, table.stderr
    assert "ttft p50 ms" in table.stdout and "ttft p95 ms" in table.stdout
    line = next(row for row in table.stdout.splitlines() if "gpt-4o-mini" in row)
    assert "150" in line
    best = run_cli(
        home,
        "routing",
        "best",
        WF,
        ST,
        "--db",
        str(path),
        "--candidates",
        "gpt-4o-mini,gpt-4o",
        "--max-ttft-ms",
        "100",
        "--min-success-rate",
        "0",
        "--json",
    )
    assert best.returncode == 0, best.stderr
    decision = json.loads(best.stdout)
    # 150 ms measured is too slow; the other model never streamed: explored, not proven
    assert decision["model"] == "gpt-4o" and decision["exploration"] is True
    assert decision["constraints_met"] is False and decision["max_ttft_ms"] == 100.0
    mini = next(c for c in decision["candidates"] if c["model"] == "gpt-4o-mini")
    assert mini["constraints"]["max_ttft_ms"] == "rejected"


def _absurdly_slow() -> list[LLMCallRecord]:
    now = datetime.now(UTC)
    return [
        LLMCallRecord(
            provider="openai",
            model="gpt-4.1-mini",
            outcome=Outcome.SUCCESS,
            workflow="w",
            stage="s",
            latency_ms=latency,
            ttft_ms=latency,
            timestamp=now,
        )
        for latency in [1e300, 1.0, 1e300, 2.0] * 10
    ]


@pytest.mark.parametrize("where", ["live", "stored"])
async def test_absurd_latencies_are_judged_not_a_crash(where: str) -> None:
    # 1e300 ms is a valid number: a model measured that slow is judged (and refused on
    # latency), and a decision over it answers; it used to overflow the latency fit
    telemetry = MemoryTelemetryBackend()
    async with telemetry:
        if where == "stored":
            await telemetry.record_many(_absurdly_slow())
        async with AdaptiveModelRouter(ModelRegistry.default(), telemetry, seed=1) as router:
            for record in _absurdly_slow() if where == "live" else ():
                router.record_outcome(record)
            for latency, ttft in ((1000.0, None), (None, 1000.0)):
                decision = router.get_best_model(
                    "w",
                    "s",
                    candidates=["gpt-4.1-mini", "gpt-4o-mini"],
                    max_latency_ms=latency,
                    max_ttft_ms=ttft,
                )
                slow = next(c for c in decision.candidates if c.model == "gpt-4.1-mini")
                assert decision.model == "gpt-4o-mini"
                assert ConstraintStatus.REJECTED in slow.constraints.values()
