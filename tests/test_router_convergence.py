"""
Convergence: 3,000 calls through the real executor and FakeLLMServer (real HTTP on
127.0.0.1) with five models of known profiles.

Failures come from the fake server (seeded per model).  Latency is simulated on an
injected clock rather than slept: a thin provider wrapper forwards each request over
HTTP and then advances the clock the executor measures latency with by a seeded draw
from the model's profile, so the run is deterministic and takes seconds.  Traffic is
counted at the server (one route, one attempt per call, so one request per call).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from datetime import UTC, datetime

import aiohttp
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RoutingPolicy,
)
from empathy_models.abc import Completion, CompletionRequest, Provider
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.providers import OpenAIProvider
from empathy_models.retry import RetryPolicy
from empathy_models.testing import FakeLLMServer, ModelBehavior
from empathy_models.testing.clock import FakeClock

MIN_SUCCESS = 0.95
MAX_LATENCY_MS = 1000.0
CALLS = 3000
DEGRADE_AT = 1500
#: after the cheapest compliant model degrades (99% -> 60% success), it must have lost
#: its traffic within this many calls: from then on it gets at most 10% of the calls
#: (the exploration share; at most 6% over 60 seeds of the router-only run) and never
#: more than 20 calls in any 100 (at most 14 over those seeds), and the next-cheapest
#: compliant model gets at least 85% (at least 93.7% over those seeds).  It stops being
#: the router's pick after ~25-65 calls (its evidence halves every 500 of its calls);
#: while its bound settles near the limit it can win a few calls back now and then.
DEGRADE_BOUND = 150
#: calls before convergence is judged: the cold start explores the cheapest unproven
#: models first, and a model needs ~75-95 straight successes for a 0.95 lower bound
WARM_UP = 300

# id, price per million input tokens, true success rate, median latency (ms)
PROFILES = [
    ("flaky-nano", 0.10, 0.80, 200.0),  # cheapest, fails the success rate
    ("slow-mini", 0.20, 0.995, 1600.0),  # fails the latency limit
    ("good-small", 0.40, 0.99, 300.0),  # the cheapest that truly meets both: the target
    ("good-medium", 0.80, 0.995, 250.0),  # the next compliant one: takes over after degrading
    ("best-large", 2.00, 0.999, 200.0),
]
TARGET, RUNNER_UP = "good-small", "good-medium"


class SimulatedLatency(Provider):
    """Forwards to a real HTTP provider, then lets the model's latency pass on the clock."""

    def __init__(self, inner: Provider, clock: FakeClock, medians: dict[str, float]) -> None:
        self.name = inner.name
        self._inner = inner
        self._clock = clock
        self._medians = medians
        self._rng = random.Random(99)

    async def bind(self, session: aiohttp.ClientSession) -> None:
        await self._inner.bind(session)

    async def unbind(self) -> None:
        await self._inner.unbind()

    async def _complete(self, request: CompletionRequest) -> Completion:
        try:
            return await self._inner.complete(request)
        finally:
            median = self._medians[request.model]
            self._clock.advance(self._rng.lognormvariate(math.log(median), 0.2) / 1000.0)


def registry() -> ModelRegistry:
    return ModelRegistry(
        models=tuple(
            ModelInfo(
                id=model,
                provider="openai",
                tier="cheap",
                input_price_per_mtok=price,
                output_price_per_mtok=price * 4,
                context_window=128_000,
                max_output_tokens=4096,
            )
            for model, price, _, _ in PROFILES
        ),
        price_version="convergence-test",
    )


def behavior(success: float) -> ModelBehavior:
    return ModelBehavior(failure_rate=round(1.0 - success, 6), failures=(500,), output_tokens=64)


def check_convergence(picks: list[str]) -> None:
    def share(model: str, start: int, stop: int) -> float:
        return Counter(picks[start:stop])[model] / (stop - start)

    before = Counter(picks[WARM_UP:DEGRADE_AT])
    # The cheapest model that truly meets min_success_rate and max_latency_ms gets most
    # traffic: asserted at least 85% after the warm-up (at least 93.2% over 60 seeds).
    assert share(TARGET, WARM_UP, DEGRADE_AT) >= 0.85, before
    # the cheaper models that fail a constraint get at most exploration-sized traffic
    assert share("flaky-nano", WARM_UP, DEGRADE_AT) <= 0.05, before
    assert share("slow-mini", WARM_UP, DEGRADE_AT) <= 0.05, before
    # After it degrades, it loses its traffic within DEGRADE_BOUND calls.
    settled = DEGRADE_AT + DEGRADE_BOUND
    after = Counter(picks[settled:])
    assert share(TARGET, settled, CALLS) <= 0.10, after
    busiest = max(Counter(picks[i : i + 100])[TARGET] for i in range(settled, CALLS - 100))
    assert busiest <= 20, after
    assert share(RUNNER_UP, settled, CALLS) >= 0.85, after


@pytest.mark.slow
async def test_router_converges_to_the_cheapest_compliant_model_and_reacts_to_degradation() -> None:
    clock = FakeClock()
    reg = registry()
    router = AdaptiveModelRouter(
        reg,
        seed=7,
        clock=clock,
        policy=RoutingPolicy(explore_rate=0.05),
    )
    context = ExecutionContext(
        workflow="support",
        stage="answer",
        tier="cheap",
        min_success_rate=MIN_SUCCESS,
        max_latency_ms=MAX_LATENCY_MS,
        max_tokens=128,
    )
    picks: list[str] = []
    async with FakeLLMServer(
        {model: behavior(success) for model, _, success, _ in PROFILES}, api_key="k", seed=3
    ) as server:
        provider = SimulatedLatency(
            OpenAIProvider(api_key="k", base_url=server.openai_base_url),
            clock,
            {model: median for model, _, _, median in PROFILES},
        )
        async with EmpathyLLMExecutor(
            [provider],
            registry=reg,
            router=router,
            retry=RetryPolicy(max_attempts=1),
            fallback=FallbackPolicy.none(),
            telemetry_store=MemoryTelemetryBackend(),
            clock=clock,
            wall_clock=clock,
        ) as executor:
            for i in range(CALLS):
                if i == DEGRADE_AT:
                    server.set_behavior(TARGET, behavior(0.6))
                before = server.request_counts()
                # a failed call raises, having still gone to exactly one model
                with contextlib.suppress(AllRoutesFailedError):
                    await executor.run("How do I reset my password?", context)
                after = server.request_counts()
                (model,) = [m for m in after if after[m] != before.get(m, 0)]
                picks.append(model)
                clock.advance(1.0)  # one call per simulated second

    assert len(picks) == CALLS
    check_convergence(picks)


def test_router_alone_converges_on_seeded_outcomes() -> None:
    """
    The same scenario without HTTP: outcomes drawn from seeded distributions are fed
    straight to `record_outcome` (a real router; only the model calls are simulated).
    """
    clock = FakeClock()
    reg = registry()
    router = AdaptiveModelRouter(reg, seed=11, clock=clock, policy=RoutingPolicy(explore_rate=0.05))
    rng = random.Random(5)
    success = {model: s for model, _, s, _ in PROFILES}
    medians = {model: median for model, _, _, median in PROFILES}
    picks: list[str] = []
    for i in range(CALLS):
        if i == DEGRADE_AT:
            success[TARGET] = 0.6
        decision = router.get_best_model(
            "support",
            "answer",
            candidates=[m for m, *_ in PROFILES],
            input_tokens=50,
            max_tokens=128,
            min_success_rate=MIN_SUCCESS,
            max_latency_ms=MAX_LATENCY_MS,
        )
        model = decision.model
        picks.append(model)
        latency = rng.lognormvariate(math.log(medians[model]), 0.2)
        clock.advance(latency / 1000.0)
        ok = rng.random() < success[model]
        router.record_outcome(
            LLMCallRecord(
                provider="openai",
                model=model,
                outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                timestamp=datetime.fromtimestamp(clock(), UTC),
                workflow="support",
                stage="answer",
                input_tokens=50,
                output_tokens=64,
                latency_ms=latency,
                exploration=decision.exploration,
            )
        )
        clock.advance(1.0)

    check_convergence(picks)
