"""
EmpathyLLMExecutor over real HTTP: `FakeLLMServer` on 127.0.0.1 speaking both wire
formats, the real `AnthropicProvider` / `OpenAIProvider`, the real breaker, router and
memory telemetry.  Retry waits go through an injected sleep, so nothing here waits for
time to pass except the one deadline test (a 0.2 s budget against a hanging server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import random
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from aiohttp import web

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    BreakerPolicy,
    Budget,
    BudgetExceededError,
    CircuitState,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    LLMResponse,
    MissingAPIKeyWarning,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    NoModelMeetsConstraintsError,
    NotOpenError,
    Outcome,
    RateLimit,
    RetryPolicy,
    RoutingPolicy,
    StreamInterruptedError,
    TelemetryDisabledWarning,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.breaker import CircuitBreaker
from empathy_models.exceptions import (
    AuthenticationError,
    ConfigurationWarning,
    ContextWindowExceededError,
    InvalidRequestError,
    InvalidResponseError,
    ModelNotFoundError,
    ProviderTimeoutError,
    ServerError,
)
from empathy_models.limits import LocalRateLimitError
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.records import CircuitBreakerState
from empathy_models.testing import FakeLLMServer, Latency, ModelBehavior
from empathy_models.testing.clock import FakeClock
from tests._fakes import HintBreaker
from tests._serving import serving

KEY = "test-key-0123"

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
        ),
        ModelInfo(
            id="gpt-fake-mini",
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=5.0,
            context_window=128_000,
            max_output_tokens=16384,
        ),
        ModelInfo(
            id="claude-fake-sonnet",
            provider="anthropic",
            tier="capable",
            input_price_per_mtok=3.0,
            output_price_per_mtok=15.0,
            context_window=200_000,
            max_output_tokens=8192,
        ),
        ModelInfo(
            id="gpt-fake-4o",
            provider="openai",
            tier="capable",
            input_price_per_mtok=2.5,
            output_price_per_mtok=10.0,
            context_window=128_000,
            max_output_tokens=16384,
        ),
    ],
    price_version="http-test-1",
)

CHEAP = ExecutionContext(workflow="support", stage="triage", tier="cheap")


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await anyio.lowlevel.checkpoint()


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=7) as fake:
        yield fake


@pytest.fixture
def telemetry() -> MemoryTelemetryBackend:
    return MemoryTelemetryBackend()


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


def providers(server: FakeLLMServer) -> list[Any]:
    return [
        AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
    ]


def make(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend | None,
    sleep: Callable[[float], Awaitable[None]],
    **options: Any,
) -> EmpathyLLMExecutor:
    options.setdefault("retry", RetryPolicy(jitter=False))
    return EmpathyLLMExecutor(
        providers(server), registry=REGISTRY, telemetry_store=telemetry, sleep=sleep, **options
    )


async def records_of(telemetry: MemoryTelemetryBackend) -> list[LLMCallRecord]:
    return sorted(await telemetry.recent(limit=100_000), key=lambda r: (r.timestamp, r.attempt))


async def until(predicate: Any, *, limit: int = 100_000) -> None:
    """Yield to the event loop until ``predicate()`` holds (no wall-clock waiting)."""
    for _ in range(limit):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition never became true")


# --------------------------------------------------------------------------- fallback


async def test_primary_provider_outage_falls_back_to_the_next_candidate(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """Anthropic is down (503): the answer comes from OpenAI; both are in the chain."""
    server.set_outage("anthropic", action=503)
    async with make(server, telemetry, sleep) as executor:
        response = await executor.run("Where is my parcel?", CHEAP)
    assert response.provider == "openai"
    assert response.model == "gpt-fake-mini"
    assert response.fallback_chain == ("claude-fake-haiku", "gpt-fake-mini")
    assert response.fallback_used is True
    assert response.input_tokens > 0 and response.output_tokens > 0
    assert response.cost_usd == pytest.approx(
        REGISTRY.cost("gpt-fake-mini", response.input_tokens, response.output_tokens)
    )
    records = await records_of(telemetry)
    failures = [r for r in records if not r.success]
    successes = [r for r in records if r.success]
    assert len(failures) == 3 and len(successes) == 1
    assert {(r.model, r.status_code, r.outcome) for r in failures} == {
        ("claude-fake-haiku", 503, Outcome.FAILURE)
    }
    assert successes[0].model == "gpt-fake-mini" and successes[0].fallback_used
    assert len(records) == len(response.attempts)
    assert sleep.delays == [1.0, 2.0]
    assert server.requests("claude-fake-haiku") == 3
    assert server.requests("gpt-fake-mini") == 1


async def test_open_breaker_sends_later_runs_straight_to_the_next_provider(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    server.set_outage("anthropic", action=529)
    policy = BreakerPolicy(consecutive_failures=3)
    async with (
        CircuitBreaker(policy=policy) as breaker,
        make(server, telemetry, sleep, breaker=breaker) as executor,
    ):
        first = await executor.run("hello", CHEAP)
        second = await executor.run("hello", CHEAP)
    assert first.fallback_chain == ("claude-fake-haiku", "gpt-fake-mini")
    assert second.fallback_chain == ("gpt-fake-mini",)
    assert len(second.attempts) == 1
    assert server.requests("claude-fake-haiku") == 3  # none after the trip


async def test_real_router_learns_from_every_attempt_and_routes_away(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    Pinned runs make claude-fake-haiku fail 12 times (and fall back to gpt-fake-mini);
    the router, fed every record by the executor, then routes around haiku on its own.
    """
    server.set_outage("claude-fake-haiku", action=500)
    router = AdaptiveModelRouter(REGISTRY, telemetry, seed=3)
    async with router, make(server, telemetry, sleep, router=router) as executor:
        for _ in range(4):
            pinned = await executor.run("hello", attrs.evolve(CHEAP, model="claude-fake-haiku"))
            assert pinned.fallback_chain == ("claude-fake-haiku", "gpt-fake-mini")
        decision = router.get_best_model(
            "support", "triage", candidates=["claude-fake-haiku", "gpt-fake-mini"]
        )
        routed = await executor.run("hello", CHEAP)
    evidence = {c.model: c for c in decision.candidates}
    assert evidence["claude-fake-haiku"].sample_size == 12
    assert evidence["claude-fake-haiku"].success_rate == 0.0
    assert evidence["gpt-fake-mini"].sample_size == 4
    assert routed.routing_decision is not None
    assert routed.routing_decision.model == "gpt-fake-mini"
    assert routed.fallback_chain == ("gpt-fake-mini",)
    assert server.requests("claude-fake-haiku") == 12


async def test_a_borrowed_router_decides_unstarted_and_refuses_once_closed(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    The executor neither opens nor closes a router it is given: one without a store
    decides unstarted; once its owner closes it, a run that asks it raises the router's
    `NotOpenError`, before any request is sent, instead of routing on what it held.  So
    does a run or stream that would not ask it (a model pinned): its outcome could not
    be learned from.
    """
    router = AdaptiveModelRouter(REGISTRY, seed=3)
    async with make(server, telemetry, sleep, router=router) as executor:
        routed = await executor.run("hello", CHEAP)
        assert routed.routing_decision is not None
        await router.aclose()
        sent = server.requests()
        with pytest.raises(NotOpenError, match="AdaptiveModelRouter is closed"):
            await executor.run("hello", CHEAP)
        pinned = attrs.evolve(CHEAP, model="claude-fake-haiku")
        with pytest.raises(NotOpenError, match="AdaptiveModelRouter is closed"):
            await executor.run("hello", pinned)
        with pytest.raises(NotOpenError, match="AdaptiveModelRouter is closed"):
            executor.stream("hello", pinned)
        assert server.requests() == sent
        assert executor.feedback_errors == 0


async def test_a_run_that_ends_after_its_router_closed_is_recorded_and_logged_once(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    Runs still in flight when the router they were routed by is closed end as usual:
    their records reach telemetry, and the router's refusal of their outcomes is one
    log line for the executor, not an error with a traceback per run.
    """
    router = AdaptiveModelRouter(REGISTRY, seed=3)
    async with make(server, telemetry, sleep, router=router) as executor:
        first = await executor.run("hello", CHEAP)
        server.set_behavior(first.model, ModelBehavior(latency=300.0))
        runs = [asyncio.create_task(executor.run("hello", CHEAP)) for _ in range(3)]
        await server.wait_for_requests(4, first.model)  # the three are at the server
        await router.aclose()
        with caplog.at_level(logging.DEBUG, logger="empathy_models"):
            answered = await asyncio.gather(*runs)
    assert [r.model for r in answered] == [first.model] * 3
    assert len(await telemetry.recent(limit=10)) == 4
    said = [r for r in caplog.records if "router" in r.getMessage() and "closed" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None and said[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("varying", [False, True], ids=["constant limits", "limits per run"])
async def test_a_rejected_model_is_re_probed_when_each_run_gives_its_own_limits(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep, varying: bool
) -> None:
    """
    The executor passes each run's `ExecutionContext` limits to the router: runs whose
    ``max_tokens`` / ``max_cost`` differ still count towards re-probing the cheaper model
    the router rejected, so its recovery is seen (a re-probe every 40 runs here: a model
    never proven waits four times ``reprobe_interval``).
    """
    server.set_outage("claude-fake-haiku", action=500)
    router = AdaptiveModelRouter(
        REGISTRY, telemetry, seed=3, policy=RoutingPolicy(reprobe_interval=10)
    )
    sizes = random.Random(5)

    def context() -> ExecutionContext:
        if not varying:
            return attrs.evolve(CHEAP, min_success_rate=0.9, max_tokens=200, max_cost=0.01)
        return attrs.evolve(
            CHEAP,
            min_success_rate=0.9,
            max_tokens=sizes.randint(50, 400),
            max_cost=round(sizes.uniform(0.005, 0.05), 6),
        )

    retry = RetryPolicy(max_attempts=1)
    async with router, make(server, telemetry, sleep, router=router, retry=retry) as executor:
        for _ in range(40):
            await executor.run("hello", context())
        server.set_outage("claude-fake-haiku", enabled=False)  # healthy again
        probes = 0
        for _ in range(120):
            decision = (await executor.run("hello", context())).routing_decision
            assert decision is not None
            probes += decision.model == "claude-fake-haiku" and decision.exploration
    assert probes >= 2, probes


@pytest.mark.parametrize("case", ["fallback", "no fallback", "fallback's hint fails"])
async def test_a_failed_re_probe_falls_back_at_once_rather_than_retrying(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep, case: str
) -> None:
    """
    A re-probe measures a model the router rejected or saw degrade. When it fails, the
    request goes to the next route at once: it does not wait for a backoff and another
    try on that model. With no route left, it is retried as any attempt. A breaker
    whose hint for the next route fails counts and logs it, and the route is tried.
    """
    server.set_outage("claude-fake-haiku", action=500)
    router = AdaptiveModelRouter(
        REGISTRY, telemetry, seed=3, policy=RoutingPolicy(reprobe_interval=10)
    )
    context = attrs.evolve(CHEAP, min_success_rate=0.9, max_tokens=200, max_cost=0.01)
    # a breaker that never trips: the routes stay open to the re-probes
    patient = BreakerPolicy(consecutive_failures=10_000, minimum_calls=10_000)
    breaker = CircuitBreaker(policy=patient)
    double = HintBreaker()  # admits everything; its hints can be made to fail
    options: dict[str, Any] = {"breaker": double if case == "fallback's hint fails" else breaker}
    if case == "no fallback":
        options["fallback"] = FallbackPolicy.none()
    probes: list[tuple[tuple[str, ...], int]] = []
    seen = 0
    async with breaker, router, make(server, telemetry, sleep, router=router, **options) as ex:
        for i in range(160):
            if i == 40:  # by now the model is rejected: its later calls are re-probes
                seen = len(await records_of(telemetry))
                double.broken.add("openai")  # gpt-fake-mini's hint fails from now on
            waits = len(sleep.delays)
            try:
                response = await ex.run("hello", context)
            except AllRoutesFailedError:
                continue  # without fallback, the rejected model's own runs fail
            decision = response.routing_decision
            assert decision is not None
            if decision.exploration_kind == "re-probe":
                probes.append((response.fallback_chain, len(sleep.delays) - waits))
    later = [r for r in (await records_of(telemetry))[seen:] if r.model == "claude-fake-haiku"]
    reprobed = [r for r in later if r.exploration]
    assert reprobed
    if case != "no fallback":
        assert len(probes) >= 2, probes
        assert set(probes) == {(("claude-fake-haiku", "gpt-fake-mini"), 0)}, probes
        assert {r.attempt for r in reprobed} == {1}  # one try per re-probe
        assert (ex.feedback_errors > 0) is (case == "fallback's hint fails")
    else:  # nowhere else to go: retried, then the run failed (the outage)
        assert not probes
        assert {r.attempt for r in reprobed} >= {1, 2}


async def test_a_stage_an_outage_ruled_out_entirely_is_re_probed_once_it_ends(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    An outage of every model rules a stage's candidates out, and the stage raises
    `NoModelMeetsConstraintsError` while nothing can be routed; the router keeps
    re-probing them meanwhile, so once the outage ends requests are answered again
    (before, no call was routed again until the window forgot the outage).  The
    recovery itself is acted on once a later minute holds an outcome of the model
    (`tests/test_routing_exploration.py`, on a clock that moves).
    """
    for provider in ("anthropic", "openai"):
        server.set_outage(provider, action=500)
    router = AdaptiveModelRouter(REGISTRY, telemetry, seed=3)
    context = attrs.evolve(CHEAP, min_success_rate=0.9)
    patient = CircuitBreaker(
        policy=BreakerPolicy(consecutive_failures=10_000, minimum_calls=10_000)
    )
    retry = RetryPolicy(max_attempts=1)
    errors = (AllRoutesFailedError, NoModelMeetsConstraintsError)
    async with (
        patient,
        router,
        make(server, telemetry, sleep, router=router, retry=retry, breaker=patient) as executor,
    ):
        ruled_out = 0
        for _ in range(80):
            with pytest.raises(errors) as failed:
                await executor.run("hello", context)
            ruled_out += isinstance(failed.value, NoModelMeetsConstraintsError)
        assert ruled_out > 0
        for provider in ("anthropic", "openai"):
            server.set_outage(provider, enabled=False)
        answered: list[int] = []
        kinds: list[str | None] = []
        for i in range(400):
            try:
                response = await executor.run("hello", context)
            except NoModelMeetsConstraintsError:
                continue
            answered.append(i)
            decision = response.routing_decision
            assert decision is not None and response.model == decision.model
            kinds.append(decision.exploration_kind)
    # the re-probes that failed in the outage backed off to one per reprobe_interval
    # (200) decisions; they come faster while they succeed
    assert answered and answered[0] <= 200, answered
    assert kinds[0] == "re-probe", kinds
    assert len(answered) >= 10, answered


# --------------------------------------------------------------------------- retry and errors


async def test_retry_after_from_the_wire_is_honoured(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    server.set_behavior("claude-fake-haiku", ModelBehavior(retry_after=4))
    server.script("claude-fake-haiku", [429, 529, "ok"])
    async with make(server, telemetry, sleep) as executor:
        response = await executor.run("hello", CHEAP)
    assert response.model == "claude-fake-haiku"
    assert sleep.delays == [4.0, 4.0]
    records = await records_of(telemetry)
    assert [(r.outcome, r.status_code) for r in records] == [
        (Outcome.RATE_LIMITED, 429),
        (Outcome.FAILURE, 529),
        (Outcome.SUCCESS, None),
    ]


async def test_a_routine_429_leaves_the_model_open_only_for_its_retry_after(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    """
    ``Retry-After: 1`` opens the model's circuit for that one second, no trip counted:
    the retry after the wait is the probe that closes it, and later routine 429s do
    not hold the model out any longer.
    """
    clock = FakeClock()
    server.set_behavior("claude-fake-haiku", ModelBehavior(retry_after=1))
    server.script("claude-fake-haiku", [429, "ok", 429, "ok", 429, "ok"])
    ctx = attrs.evolve(CHEAP, model="claude-fake-haiku")
    async with (
        CircuitBreaker(clock=clock) as breaker,
        make(
            server, telemetry, clock.sleep, breaker=breaker, fallback=FallbackPolicy.none()
        ) as executor,
    ):
        key = breaker.key_for("anthropic", "claude-fake-haiku")
        for _ in range(3):
            response = await executor.run("hello", ctx)
            assert response.model == "claude-fake-haiku"
            assert [a.outcome for a in response.attempts] == [
                Outcome.RATE_LIMITED,
                Outcome.SUCCESS,
            ]
            status = await breaker.get_status(key)
            assert (status.state, status.open_count) == (CircuitState.CLOSED, 0)
            clock.advance(5)
    assert server.requests("claude-fake-haiku") == 6


@pytest.mark.parametrize(
    ("action", "policy", "retried"),
    [
        (429, BreakerPolicy(), False),
        (500, BreakerPolicy(consecutive_failures=1), False),
        (500, BreakerPolicy(), True),
    ],
    ids=["a 429's Retry-After opens it", "the failure trips it", "it stays closed"],
)
async def test_a_failure_that_opens_the_routes_circuit_falls_back_without_waiting(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    action: int,
    policy: BreakerPolicy,
    retried: bool,
) -> None:
    """
    A retry of a route whose circuit the failed attempt has just opened would be
    refused by the breaker once its wait (a 429's Retry-After, 3 s here) was over: the
    next route answers at once instead.  A route whose circuit stays closed is retried.
    """
    server.set_behavior("claude-fake-haiku", ModelBehavior(retry_after=3))
    server.script("claude-fake-haiku", [action])
    async with (
        CircuitBreaker(policy=policy) as breaker,
        make(server, telemetry, sleep, breaker=breaker) as executor,
    ):
        response = await executor.run("hello", CHEAP)
    assert response.model == ("claude-fake-haiku" if retried else "gpt-fake-mini")
    assert len(sleep.delays) == retried
    assert server.requests("claude-fake-haiku") == 1 + retried
    records = await records_of(telemetry)
    assert Outcome.REJECTED not in {r.outcome for r in records}
    assert len(records) == len(response.attempts) == 2


class BreakerClock:
    """A breaker's clock that the executor's injected sleep moves on."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.delays: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay
        await anyio.lowlevel.checkpoint()


async def test_with_no_other_route_the_route_whose_circuit_opened_is_still_retried(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    """
    Without fallback the retry is the run's only chance: it waits the Retry-After, by
    when the circuit the 429 opened for as long lets a probe through, which answers.
    """
    server.set_behavior("claude-fake-haiku", ModelBehavior(retry_after=3))
    server.script("claude-fake-haiku", [429])
    clock = BreakerClock()
    policy = BreakerPolicy(recovery_seconds=1)
    async with (
        CircuitBreaker(policy=policy, clock=clock) as breaker,
        EmpathyLLMExecutor(
            providers(server),
            registry=REGISTRY,
            telemetry_store=telemetry,
            breaker=breaker,
            fallback=FallbackPolicy.none(),
            retry=RetryPolicy(jitter=False),
            sleep=clock.sleep,
        ) as executor,
    ):
        response = await executor.run("hello", CHEAP)
    assert response.model == "claude-fake-haiku"
    assert clock.delays == [3.0]
    assert [r.outcome for r in await records_of(telemetry)] == [
        Outcome.RATE_LIMITED,
        Outcome.SUCCESS,
    ]


async def test_a_route_whose_retry_the_rate_limit_refused_counts_as_tried(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    ``FallbackPolicy.none()`` calls one model: a route that was called and failed, and
    whose retry then finds no capacity within ``rate_limit_wait``, was tried; no other
    model is called.
    """
    server.set_outage("claude-fake-haiku", action=500)
    async with make(
        server,
        telemetry,
        sleep,
        fallback=FallbackPolicy.none(),
        rate_limits={"claude-fake-haiku": RateLimit(rpm=1)},
        rate_limit_wait=0.1,
    ) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run("hello", CHEAP)
    assert server.requests("claude-fake-haiku") == 1
    assert server.requests("gpt-fake-mini") == 0
    assert [type(e) for e in caught.value.exceptions] == [ServerError, LocalRateLimitError]
    assert "claude-fake-haiku" in str(caught.value)


async def test_a_retry_the_open_circuit_refused_gives_its_rate_limit_place_back(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    The route's first call failed and opened its circuit; with no other route its
    retry waits, is admitted by the rate limit, then refused by the breaker: that call
    never went out, so its place comes back, as a first attempt's does, and the
    provider's other model gets the burst's second place.
    """
    server.script("claude-fake-haiku", [500])
    async with (
        CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1)) as breaker,
        make(
            server,
            telemetry,
            sleep,
            breaker=breaker,
            fallback=FallbackPolicy.none(),
            rate_limits={"anthropic": RateLimit(rpm=1, burst_requests=2)},
            rate_limit_wait=0,
        ) as executor,
    ):
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run("hello", CHEAP)
        assert [type(e).__name__ for e in caught.value.exceptions] == [
            "ServerError",
            "CircuitOpenError",
        ]
        other = attrs.evolve(CHEAP, model="claude-fake-sonnet", tier=None)
        response = await executor.run("hello", other)  # the place kept: gpt-fake-4o answered
    assert response.model == "claude-fake-sonnet"
    assert server.requests("claude-fake-haiku") == 1


async def test_a_route_whose_retry_the_budget_refused_counts_as_tried(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    """
    As with a rate limit: a route that was called and failed, and whose retry the
    budget then refuses (another run spent it meanwhile), was tried; with
    ``FallbackPolicy.none()`` no cheaper model is called instead.
    """
    server.script("gpt-fake-mini", [500])
    server.set_behavior("gpt-fake-4o", ModelBehavior(output_tokens=1000))
    pinned = attrs.evolve(CHEAP, model="gpt-fake-mini", tier=None, max_tokens=1000)
    spent: list[float] = []

    async def spend_while_waiting(delay: float) -> None:
        # about $0.01 of the $0.0145: what is left covers claude-fake-haiku's estimate
        # (about $0.004 for 1000 tokens), not gpt-fake-mini's (about $0.005)
        if not spent:
            other = await executor.run("hello", attrs.evolve(pinned, model="gpt-fake-4o"))
            spent.append(other.cost_usd)

    executor = EmpathyLLMExecutor(
        providers(server),
        registry=REGISTRY,
        telemetry_store=telemetry,
        fallback=FallbackPolicy.none(),
        budgets=[Budget(limit_usd=0.0145)],
        retry=RetryPolicy(jitter=False),
        sleep=spend_while_waiting,
    )
    async with executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run("hello", pinned)
    assert spent and spent[0] > 0.01
    assert server.requests("gpt-fake-mini") == 1
    assert server.requests("claude-fake-haiku") == 0
    assert [type(e) for e in caught.value.exceptions] == [ServerError, BudgetExceededError]


async def test_a_budget_that_refuses_the_fallback_keeps_the_failures_before_it(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    claude-fake-haiku is down (503); what the budget has left covers it (about $0.004
    for 1000 tokens), not gpt-fake-mini (about $0.005), and no cheaper model is left:
    the run raises `AllRoutesFailedError` with the 503s and the refusal, which
    ``except* BudgetExceededError`` catches, not a bare `BudgetExceededError` that hid
    the outage and said no provider was called.
    """
    server.set_outage("claude-fake-haiku", action=503)
    refused: list[BaseException] = []
    async with make(server, telemetry, sleep, budgets=[Budget(limit_usd=0.0045)]) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            try:
                await executor.run("hello", attrs.evolve(CHEAP, max_tokens=1000))
            except* BudgetExceededError as group:
                refused.extend(group.exceptions)
                raise
    errors = caught.value.exceptions
    assert [type(e) for e in errors] == [ServerError] * 3 + [BudgetExceededError]
    assert [getattr(e, "status", None) for e in errors[:3]] == [503] * 3
    [budget] = refused
    assert isinstance(budget, BudgetExceededError) and budget.model == "gpt-fake-mini"
    assert "BudgetExceededError" in str(caught.value)
    assert server.requests("claude-fake-haiku") == 3 and server.requests("gpt-fake-mini") == 0
    assert [r.status_code for r in await records_of(telemetry)] == [503] * 3


async def test_a_failed_run_names_the_request_id_its_records_carry(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    # every route down: the error says which records are the run's, and keeps saying so
    # through except* and pickling
    for model in REGISTRY.models:
        server.set_outage(model.id, action=503)
    async with make(server, telemetry, sleep) as executor:
        with pytest.raises(AllRoutesFailedError) as caught:
            await executor.run("hello", CHEAP)
    records = await records_of(telemetry)
    assert len(records) >= 6 and {r.request_id for r in records} == {caught.value.request_id}
    assert caught.value.request_id is not None
    split, _ = caught.value.split(ServerError)
    assert isinstance(split, AllRoutesFailedError) and split.request_id == caught.value.request_id
    assert pickle.loads(pickle.dumps(caught.value)).request_id == caught.value.request_id


async def test_a_spent_provider_budget_leaves_the_planned_fallback_of_another_provider(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    The anthropic budget cannot cover claude-fake-haiku; gpt-fake-mini, the run's next
    route, costs more but is outside that budget: the run goes on to it, as it would
    after a failure, instead of raising because no cheaper model was left.
    """
    spent = Budget(limit_usd=0.000001, scope="provider", value="anthropic")
    async with make(server, telemetry, sleep, budgets=[spent]) as executor:
        response = await executor.run("hello", attrs.evolve(CHEAP, max_tokens=1000))
    assert response.model == "gpt-fake-mini"
    assert server.requests("claude-fake-haiku") == 0 and server.requests("gpt-fake-mini") == 1
    # a budget covering every route still refuses the run
    everything = Budget(limit_usd=0.000001)
    async with make(server, telemetry, sleep, budgets=[everything]) as executor:
        with pytest.raises(BudgetExceededError):
            await executor.run("hello", attrs.evolve(CHEAP, max_tokens=1000))
    assert server.requests("gpt-fake-mini") == 1


@pytest.mark.parametrize(
    ("action", "falls_back", "sleeps"),
    [
        (401, True, 0),
        (404, True, 0),
        ("malformed", True, 0),
        ("incomplete", True, 0),
        ("truncated", True, 0),
        (500, False, 1),
        (502, False, 1),
        ("reset", False, 1),
    ],
)
async def test_each_wire_failure_gets_its_decision(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    action: int | str,
    falls_back: bool,
    sleeps: int,
) -> None:
    """Fatal and malformed answers fall back at once; transient ones are retried."""
    server.script("claude-fake-haiku", [action])
    async with make(server, telemetry, sleep) as executor:
        response = await executor.run("hello", CHEAP)
    assert response.model == ("gpt-fake-mini" if falls_back else "claude-fake-haiku")
    assert len(sleep.delays) == sleeps
    assert len(await records_of(telemetry)) == 2


async def test_bad_request_is_raised_without_fallback(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    server.script("claude-fake-haiku", [400])
    async with make(server, telemetry, sleep) as executor:
        with pytest.raises(InvalidRequestError) as info:
            await executor.run("hello", CHEAP)
    assert info.value.status == 400
    assert server.requests("gpt-fake-mini") == 0
    [record] = await records_of(telemetry)
    assert record.outcome is Outcome.IGNORED


async def test_context_overflow_moves_only_to_a_larger_window(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """claude-fake-haiku (200k) overflows; every other model's window is not larger."""
    server.script("claude-fake-haiku", ["context_length"])
    async with make(server, telemetry, sleep) as executor:
        with pytest.raises(ContextWindowExceededError):
            await executor.run("hello", CHEAP)
    assert server.requests() == 1


def output_limits(server: FakeLLMServer) -> None:
    """Every model of `REGISTRY` refuses (a 400) more output tokens than its limit."""
    for model in REGISTRY.models:
        server.set_behavior(model.id, ModelBehavior(max_output_tokens=model.max_output_tokens))


def sent_max_tokens(server: FakeLLMServer, model: str) -> int:
    request = server.last_request(model)
    assert request is not None
    body = request.body
    return int(body.get("max_completion_tokens", body.get("max_tokens")))


@pytest.mark.parametrize(
    ("model", "limit"), [("claude-fake-haiku", 8192), ("gpt-fake-mini", 16384)]
)
async def test_a_max_tokens_above_a_models_output_limit_asks_it_for_its_most(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    model: str,
    limit: int,
) -> None:
    """
    A model refuses a max_tokens above its output limit with a 400, which is raised at
    once: each model is asked for at most its registry ``max_output_tokens``.
    """
    output_limits(server)
    context = ExecutionContext(workflow="long", stage="draft", model=model, max_tokens=50_000)
    async with make(server, telemetry, sleep) as executor:
        response = await executor.run("Write at length.", context)
        assert sent_max_tokens(server, model) == limit
        async with executor.stream("Write at length.", context) as stream:
            streamed = await stream.get_final_response()
        assert sent_max_tokens(server, model) == limit
        # a model whose limit is above it is asked for max_tokens as given
        small = attrs.evolve(context, max_tokens=limit - 1)
        await executor.run("Write at length.", small)
        assert sent_max_tokens(server, model) == limit - 1
    assert response.model == streamed.model == model
    assert [r.outcome for r in await records_of(telemetry)] == [Outcome.SUCCESS] * 3


async def test_a_budget_reserves_a_models_output_limit_not_a_larger_max_tokens(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    claude-fake-haiku writes 8,192 tokens at most ($0.033 at $4/Mtok): a $0.05 budget
    covers its call, though 50,000 tokens of output would cost $0.20.
    """
    output_limits(server)
    context = ExecutionContext(model="claude-fake-haiku", max_tokens=50_000)
    async with make(server, telemetry, sleep, budgets=[Budget(limit_usd=0.05)]) as executor:
        response = await executor.run("Write at length.", context)
    assert response.model == "claude-fake-haiku"
    assert sent_max_tokens(server, "claude-fake-haiku") == 8192


@pytest.mark.parametrize("extra", [{"max_completion_tokens": None}, {"max_tokens": 50_000}])
async def test_a_budget_reserves_no_more_than_a_model_writes_whatever_extra_body_sends(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    extra: dict[str, int | None],
) -> None:
    """
    gpt-fake-mini writes 16,384 tokens at most ($0.082 at $5/Mtok): a $0.10 budget
    covers its call, whether ``extra_body`` lifts the cap (null) or raises it past that
    (the provider may refuse the request then, but never bills more).
    """
    context = ExecutionContext(model="gpt-fake-mini", max_tokens=50_000)
    async with make(server, telemetry, sleep, budgets=[Budget(limit_usd=0.10)]) as executor:
        response = await executor.run("Write at length.", context, extra_body=extra)
    assert response.model == "gpt-fake-mini"


async def test_calls_waiting_for_a_models_rate_limit_hold_up_no_other_model(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend
) -> None:
    """
    Two slots for the provider; gpt-fake-mini at 60 calls a minute: its second and
    third calls wait for their places (the sleep holds them until the gate opens),
    and meanwhile a call of gpt-fake-4o, on the same provider, goes through.
    """
    gate = asyncio.Event()
    waits: list[float] = []

    async def gated(seconds: float) -> None:
        waits.append(seconds)
        await gate.wait()

    executor = make(
        server,
        telemetry,
        gated,
        concurrency_per_provider=2,
        rate_limits={"gpt-fake-mini": RateLimit(rpm=60)},
        fallback=FallbackPolicy.none(),
    )
    async with executor:
        mini = [
            asyncio.create_task(executor.run("m", ExecutionContext(model="gpt-fake-mini")))
            for _ in range(3)
        ]
        await until(lambda: len(waits) == 2)
        other = await executor.run("o", ExecutionContext(model="gpt-fake-4o", deadline=5.0))
        assert other.model == "gpt-fake-4o"
        assert server.requests("gpt-fake-mini") == 1  # the other two still wait
        gate.set()
        answers = await asyncio.gather(*mini)
    assert [a.model for a in answers] == ["gpt-fake-mini"] * 3
    assert server.requests("gpt-fake-mini") == 3


async def test_all_routes_failed_over_http_has_every_attempt(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    server.set_outage("*", action=500)
    async with make(server, telemetry, sleep, fallback=FallbackPolicy(max_routes=3)) as executor:
        with pytest.raises(AllRoutesFailedError) as info:
            await executor.run("hello", CHEAP)
    errors = info.value.exceptions
    assert len(errors) == 9  # 3 routes x 3 attempts
    assert all(isinstance(e, ServerError) and e.status == 500 for e in errors)
    assert [getattr(e, "model", None) for e in errors] == (
        ["claude-fake-haiku"] * 3 + ["gpt-fake-mini"] * 3 + ["gpt-fake-4o"] * 3
    )
    records = await records_of(telemetry)
    assert len(records) == 9 == server.requests()
    assert len({r.request_id for r in records}) == 1


# --------------------------------------------------------------------------- deadline, cancellation


async def test_deadline_against_a_hanging_server(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    server.script("claude-fake-haiku", ["hang"])
    async with make(server, telemetry, sleep) as executor:
        with pytest.raises(AllRoutesFailedError) as info:
            # 2 s: the call is sent within it however busy the machine (else no record)
            await executor.run("hello", attrs.evolve(CHEAP, deadline=2.0))
    [error] = info.value.exceptions
    assert isinstance(error, ProviderTimeoutError)
    assert server.requests("gpt-fake-mini") == 0
    [record] = await records_of(telemetry)
    assert record.error_type == "ProviderTimeoutError"


@pytest.mark.parametrize("limit", ["deadline", "timeout"])
async def test_a_call_the_runs_deadline_cut_short_is_not_held_against_the_model(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep, limit: str
) -> None:
    """
    The primary fails and the fallback gets what is left of the run's deadline, which
    runs out: that says nothing about the fallback, so its attempt is recorded as
    ``cancelled``, which neither the breaker nor the router counts.  When the model's
    own per-attempt timeout is what ran out, that is its failure.
    """
    server.script("claude-fake-haiku", [500])
    server.script("gpt-fake-mini", ["hang"])
    pinned = attrs.evolve(CHEAP, model="claude-fake-haiku")
    if limit == "deadline":
        # the first call and the fallback's sending within it on a busy machine (and
        # short of `_attempt.STARVED_SECONDS`, past which a cut call is the model's)
        context = attrs.evolve(pinned, deadline=3.0)
    else:
        context = attrs.evolve(pinned, timeout=0.3)
    router = AdaptiveModelRouter(REGISTRY, telemetry, seed=3)
    async with (
        router,
        CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1)) as breaker,
        make(
            server,
            telemetry,
            sleep,
            breaker=breaker,
            router=router,
            retry=RetryPolicy.none(),
            fallback=FallbackPolicy(max_routes=2),
        ) as executor,
    ):
        with pytest.raises(AllRoutesFailedError):
            await executor.run("hello", context)
        status = await breaker.get_status(breaker.key_for("openai", "gpt-fake-mini"))
        decision = router.get_best_model(
            "support", "triage", candidates=["claude-fake-haiku", "gpt-fake-mini"]
        )
    evidence = {c.model: c for c in decision.candidates}
    failed, cut = await records_of(telemetry)
    assert (failed.model, failed.outcome) == ("claude-fake-haiku", Outcome.FAILURE)
    assert (cut.model, cut.error_type) == ("gpt-fake-mini", "ProviderTimeoutError")
    if limit == "deadline":
        assert cut.outcome is Outcome.CANCELLED
        assert status.state is CircuitState.CLOSED and status.consecutive_failures == 0
        assert evidence["gpt-fake-mini"].sample_size == 0
    else:
        assert cut.outcome is Outcome.FAILURE
        assert status.state is CircuitState.OPEN
        assert evidence["gpt-fake-mini"].sample_size == 1


async def test_a_model_that_hangs_through_a_long_deadline_is_still_its_failure(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A call the run's deadline cut short after 5 s or more (`_attempt.STARVED_SECONDS`)
    is the model's timeout: a model that hangs is found out by runs whose deadline is shorter
    than the per-attempt timeout (60 s by default).  Here the bound is 0.5 s (and the
    deadline 1 s) so the test does not wait 5 s.
    """
    monkeypatch.setattr("empathy_models._attempt.STARVED_SECONDS", 0.5)
    server.script("gpt-fake-mini", ["hang"])
    pinned = attrs.evolve(CHEAP, model="gpt-fake-mini", deadline=1.0)
    async with (
        CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1)) as breaker,
        make(server, telemetry, sleep, breaker=breaker, retry=RetryPolicy.none()) as executor,
    ):
        with pytest.raises(AllRoutesFailedError):
            await executor.run("hello", pinned)
        status = await breaker.get_status(breaker.key_for("openai", "gpt-fake-mini"))
    [record] = await records_of(telemetry)
    assert (record.outcome, record.error_type) == (Outcome.FAILURE, "ProviderTimeoutError")
    assert status.state is CircuitState.OPEN


async def test_cancel_mid_request_leaves_no_task_and_records_cancelled(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    server.script("claude-fake-haiku", ["hang"])
    async with make(server, telemetry, sleep) as executor:
        before = asyncio.all_tasks()
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.run, "hello", CHEAP)
            with anyio.fail_after(10):  # a guard, not a wait: the request comes at once
                await server.wait_for_requests(1, "claude-fake-haiku")
            tg.cancel_scope.cancel()
        # the server side sees the client go away and ends its handler
        await until(lambda: asyncio.all_tasks() <= before)
        assert asyncio.all_tasks() <= before
        # the executor still works afterwards
        response = await executor.run("hello", CHEAP)
    assert response.model == "claude-fake-haiku"
    cancelled, success = await records_of(telemetry)
    assert cancelled.outcome is Outcome.CANCELLED
    assert cancelled.model == "claude-fake-haiku"
    assert success.outcome is Outcome.SUCCESS


# --------------------------------------------------------------------------- load


async def test_200_concurrent_runs_complete_with_one_record_per_attempt(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    for model in ("claude-fake-haiku", "gpt-fake-mini"):
        server.set_behavior(
            model,
            ModelBehavior(
                latency=Latency.uniform(0.0, 3.0),
                failure_rate=0.15,
                failures=(500, 429, 529, "reset"),
                retry_after=0,
                output_tokens=(5, 40),
            ),
        )
    results: list[Any] = []
    async with (
        CircuitBreaker(policy=BreakerPolicy(consecutive_failures=50)) as breaker,
        make(server, telemetry, sleep, breaker=breaker, concurrency_per_provider=32) as executor,
    ):

        async def one(i: int) -> None:
            ctx = attrs.evolve(CHEAP, metadata={"i": i})
            results.append(await executor.run(f"question {i}", ctx))

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert len(results) == 200
    attempts = sum(len(r.attempts) for r in results)
    records = await records_of(telemetry)
    assert len(records) == attempts
    assert len({r.request_id for r in records}) == 200
    assert server.requests() == attempts  # no breaker rejections with this policy
    assert attempts > 200  # some failures were retried or fell back
    assert sum(r.success for r in records) == 200
    assert {r.request_id for r in records if r.success} == {r.request_id for r in results}


async def test_no_telemetry_over_http_warns_exactly_once(
    server: FakeLLMServer, sleep: RecordingSleep
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        executor = make(server, None, sleep)
        async with executor:
            for _ in range(5):
                response = await executor.run("hello", CHEAP)
    assert [w.category for w in caught] == [TelemetryDisabledWarning]
    assert executor.telemetry_enabled is False
    assert response.tier is ModelTier.CHEAP


@pytest.mark.parametrize(
    ("limit", "per_host", "warned"),
    [
        (4, 0, True),  # 4 connections for the 8 calls two providers have in flight
        (100, 2, True),  # 2 per host for one provider's 4
        (8, 4, False),
        (0, 0, False),  # no limit
    ],
)
async def test_a_borrowed_session_holding_fewer_connections_than_calls_in_flight_is_warned(
    server: FakeLLMServer,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    caplog: pytest.LogCaptureFixture,
    limit: int,
    per_host: int,
    warned: bool,
) -> None:
    """
    A borrowed session's pool smaller than the calls `concurrency_per_provider` lets in
    flight queues the calls beyond inside their attempt: the wait for a connection is
    counted against their timeout, and a model that answers in time is recorded as
    timing out (the breaker and the router count it).  The executor says so on enter.
    """
    import aiohttp

    def connector(limit: int, per_host: int) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(limit=limit, limit_per_host=per_host)

    caplog.set_level(logging.WARNING, logger="empathy_models.executor")
    # a warning (seen without logging set up, at the `async with` line), and logged
    expected = pytest.warns(ConfigurationWarning) if warned else contextlib.nullcontext()
    with expected as given:
        async with (
            aiohttp.ClientSession(connector=connector(limit, per_host)) as session,
            make(server, telemetry, sleep, session=session, concurrency_per_provider=4) as ex,
        ):
            assert (await ex.run("hello", CHEAP)).provider == "anthropic"
    said = [r.getMessage() for r in caplog.records if "session=" in r.getMessage()]
    assert bool(said) is warned, said
    if warned:
        assert "fewer than the 8 call(s)" in said[0] and "(4 for one provider)" in said[0]
        assert given is not None and [str(w.message) for w in given] == said
        assert given[0].filename == __file__


async def test_a_provider_without_a_key_adds_no_calls_to_the_borrowed_pool_it_is_judged_by(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    A provider with no API key is not routed to, so none of its calls are ever in
    flight: a pool that holds the calls of the providers that are is warned about for
    nothing else than the missing key (a warning saying 8 calls fly where 4 can would
    be false, and fail a suite run with warnings as errors).
    """
    import aiohttp

    keyless = [
        AnthropicProvider(api_key="", base_url=server.anthropic_base_url),
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=6)) as session,
            EmpathyLLMExecutor(
                keyless,
                registry=REGISTRY,
                telemetry_store=telemetry,
                sleep=sleep,
                session=session,
                concurrency_per_provider=4,
            ) as executor,
        ):
            assert (await executor.run("hello", CHEAP)).provider == "openai"
    assert [w.category for w in seen] == [MissingAPIKeyWarning], [str(w.message) for w in seen]


# --------------------------------------------------------------------------- review fixes


async def test_a_missing_api_key_does_not_force_the_shared_breaker_open(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    One worker without ANTHROPIC_API_KEY is a local misconfiguration: a model pinned to
    that provider is recorded as not sent and falls back, and nothing reaches a breaker
    every worker shares (a fatal report would force the provider open for the fleet).
    """
    keyless = [
        AnthropicProvider(api_key="", base_url=server.anthropic_base_url),
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
    ]
    with pytest.warns(MissingAPIKeyWarning):
        executor = EmpathyLLMExecutor(
            keyless,
            registry=REGISTRY,
            telemetry_store=telemetry,
            breaker=CircuitBreaker(),
            retry=RetryPolicy(jitter=False),
            sleep=sleep,
        )
    breaker = executor._breaker
    assert isinstance(breaker, CircuitBreaker)
    async with breaker, executor:
        pinned = attrs.evolve(CHEAP, model="claude-fake-haiku", tier=None)
        response = await executor.run("hello", pinned)
        status = await breaker.get_status(breaker.key_for("anthropic", "claude-fake-haiku"))
    assert response.model == "gpt-fake-mini"
    assert server.requests("claude-fake-haiku") == 0
    assert status.state is CircuitState.CLOSED
    first, second = await records_of(telemetry)
    assert (first.model, first.error_type, first.outcome) == (
        "claude-fake-haiku",
        "MissingAPIKeyError",
        Outcome.NOT_SENT,
    )
    assert second.success
    assert sleep.delays == []  # a missing key is never retried


async def test_402_payment_required_falls_back_instead_of_raising(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """An account out of credit is not a bad request: the next provider answers."""
    server.script("claude-fake-haiku", [402])
    async with make(server, telemetry, sleep) as executor:
        response = await executor.run("hello", CHEAP)
    assert response.model == "gpt-fake-mini"
    assert sleep.delays == []
    failed = (await records_of(telemetry))[0]
    assert (failed.status_code, failed.outcome) == (402, Outcome.FATAL)


class SlowFailureWrites(MemoryTelemetryBackend):
    """Holds every failure record until ``release`` is set (a backend under pressure)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked = anyio.Event()
        self.release = anyio.Event()

    async def record(self, record: LLMCallRecord) -> None:
        if not record.success:
            self.blocked.set()
            await self.release.wait()
        await super().record(record)


async def test_cancelling_while_a_failed_attempt_is_being_recorded_keeps_its_record(
    server: FakeLLMServer, sleep: RecordingSleep
) -> None:
    """
    The failed attempt's feedback (breaker report, record) finishes even when the run is
    cancelled in the middle of it; the cancellation then propagates.
    """
    server.script("claude-fake-haiku", [503])
    telemetry = SlowFailureWrites()
    async with make(server, telemetry, sleep) as executor, anyio.create_task_group() as tg:
        tg.start_soon(executor.run, "hello", CHEAP)
        with anyio.fail_after(10):  # a guard, not a wait
            await telemetry.blocked.wait()
        tg.cancel_scope.cancel()
        telemetry.release.set()
    [record] = await records_of(telemetry)
    assert (record.model, record.status_code, record.outcome) == (
        "claude-fake-haiku",
        503,
        Outcome.FAILURE,
    )
    assert server.requests("gpt-fake-mini") == 0


async def test_one_retired_model_does_not_force_its_whole_provider_open(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    A 404 names one model (retired, or a typo in the registry).  With a provider-wide
    breaker key it must not shut every other model of that provider out.
    """
    server.script("claude-fake-haiku", [404])
    async with (
        CircuitBreaker(per_model=False) as breaker,
        make(server, telemetry, sleep, breaker=breaker) as executor,
    ):
        cheap = await executor.run("hello", CHEAP)
        sonnet = attrs.evolve(CHEAP, tier=None, model="claude-fake-sonnet")
        capable = await executor.run("hello", sonnet)
        status = await breaker.get_status(breaker.key_for("anthropic"))
    assert cheap.model == "gpt-fake-mini"
    assert capable.model == "claude-fake-sonnet"
    assert status.state is CircuitState.CLOSED
    not_found = (await records_of(telemetry))[0]
    assert (not_found.status_code, not_found.outcome) == (404, Outcome.FATAL)


async def test_a_404_still_forces_open_a_per_model_key(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    server.script("claude-fake-haiku", [404])
    async with (
        CircuitBreaker(per_model=True) as breaker,
        make(server, telemetry, sleep, breaker=breaker) as executor,
    ):
        await executor.run("hello", CHEAP)
        status = await breaker.get_status(breaker.key_for("anthropic", "claude-fake-haiku"))
    assert status.state is CircuitState.FORCED_OPEN


# a 403 for one model the project may not use, as OpenAI sends it
NO_ACCESS = {
    "error": {
        "message": "Project `proj_9KoeXdtHe0YQ` does not have access to model `gpt-fake-4o`",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
}
TWO_OPENAI_MODELS = ModelRegistry(
    models=[
        attrs.evolve(
            REGISTRY.get("gpt-fake-4o"),
            tier="cheap",
            input_price_per_mtok=0.5,
            output_price_per_mtok=2.0,
        ),
        REGISTRY.get("gpt-fake-mini"),
    ],
    price_version="http-test-403",
)


async def run_twice(
    providers: list[Any],
    registry: ModelRegistry,
    telemetry: MemoryTelemetryBackend,
    sleep: RecordingSleep,
    *keys: tuple[str, ...],
) -> tuple[LLMResponse, LLMResponse, list[CircuitBreakerState]]:
    """
    Two runs of `CHEAP` through ``providers`` with a breaker of their own, and then the
    breaker's status of each of ``keys`` (the arguments of its ``key_for``).
    """
    async with (
        CircuitBreaker() as breaker,
        EmpathyLLMExecutor(
            providers, registry=registry, telemetry_store=telemetry, sleep=sleep, breaker=breaker
        ) as executor,
    ):
        first = await executor.run("hello", CHEAP)
        second = await executor.run("hello", CHEAP)
        statuses = [await breaker.get_status(breaker.key_for(*key)) for key in keys]
    return first, second, statuses


async def refusal(telemetry: MemoryTelemetryBackend) -> tuple[int | None, str | None, Outcome]:
    """The first record's status code, error type and outcome."""
    first = (await records_of(telemetry))[0]
    return first.status_code, first.error_type, first.outcome


async def test_a_403_naming_one_inaccessible_model_blocks_only_that_model(
    telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """
    OpenAI answers a model the project may not use with 403 ``model_not_found``: like a
    404 it names one model, so the next route answers and the project's other models of
    the provider stay usable.
    """

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        if body["model"] == "gpt-fake-4o":
            return web.json_response(NO_ACCESS, status=403)
        message = {"role": "assistant", "content": "hi", "refusal": None}
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1},
            }
        )

    async with serving("/v1/chat/completions", answer) as url:
        first, second, (provider_key, model_key) = await run_twice(
            [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
            TWO_OPENAI_MODELS,
            telemetry,
            sleep,
            ("openai",),
            ("openai", "gpt-fake-4o"),
        )
    assert first.fallback_chain == ("gpt-fake-4o", "gpt-fake-mini")
    assert second.fallback_chain == ("gpt-fake-mini",)
    assert provider_key.state is CircuitState.CLOSED
    assert model_key.state is CircuitState.FORCED_OPEN
    assert await refusal(telemetry) == (403, ModelNotFoundError.__name__, Outcome.FATAL)
    assert sleep.delays == []


# Anthropic's account errors, sent as 400 invalid_request_error
ACCOUNT_400S = [
    "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
    "Billing to upgrade or purchase credits.",
    "This organization has been disabled.",
]


@pytest.mark.parametrize("message", ACCOUNT_400S, ids=["credit", "disabled"])
async def test_an_anthropic_account_error_sent_as_a_400_falls_back_to_another_provider(
    server: FakeLLMServer, telemetry: MemoryTelemetryBackend, sleep: RecordingSleep, message: str
) -> None:
    """
    Out of credit or a disabled organization is the account, not the request: the next
    provider answers and the Anthropic provider is forced open, as for a 402.
    """
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(error, status=400)

    async with serving("/v1/messages", answer) as url:
        first, second, (status,) = await run_twice(
            [
                AnthropicProvider(api_key=KEY, base_url=url),
                OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
            ],
            REGISTRY,
            telemetry,
            sleep,
            ("anthropic",),
        )
    assert first.fallback_chain == ("claude-fake-haiku", "gpt-fake-mini")
    assert second.fallback_chain == ("gpt-fake-mini",)
    assert status.state is CircuitState.FORCED_OPEN
    assert await refusal(telemetry) == (400, AuthenticationError.__name__, Outcome.FATAL)
    assert sleep.delays == []


# --------------------------------------------------------------------------- absurd usage


@contextlib.asynccontextmanager
async def usage_server(prompt_tokens: int) -> AsyncIterator[tuple[str, list[int]]]:
    """An OpenAI-format server reporting ``prompt_tokens``; yields its URL and a hit count."""
    hits = [0]

    async def answer(request: web.Request) -> web.StreamResponse:
        hits[0] += 1
        body = await request.json()
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 1}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "x",
                    "choices": [
                        {"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in (
            {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {"choices": [], "usage": usage},
        ):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with serving("/v1/chat/completions", answer) as url:
        yield f"{url}/v1", hits


async def test_an_absurd_usage_count_is_a_malformed_answer_with_its_record(
    telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    """10**400 prompt tokens: every attempt fails as malformed, is recorded, frees its slot."""
    context = ExecutionContext(model="gpt-fake-mini")
    async with (
        usage_server(10**400) as (url, hits),
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=url)],
            registry=REGISTRY,
            telemetry_store=telemetry,
            sleep=sleep,
            concurrency_per_provider=1,
        ) as executor,
    ):
        with anyio.fail_after(30):  # a slot kept by a failed attempt would hang the next
            with pytest.raises(AllRoutesFailedError) as ran:
                await executor.run("hello", context)
            with pytest.raises(StreamInterruptedError) as streamed:
                async with executor.stream("hello", context) as stream:
                    await stream.get_final_response()
            with pytest.raises(AllRoutesFailedError):
                await executor.run("hello", context)
    assert all(isinstance(e, InvalidResponseError) for e in ran.value.exceptions)
    assert isinstance(streamed.value.error, InvalidResponseError)
    assert "prompt_tokens must be < 2**63" in str(streamed.value.error)
    assert len(await records_of(telemetry)) == hits[0]


def _priced(price: float) -> ModelInfo:
    # the fake server's model at ``price`` USD per million tokens, in and out
    return ModelInfo(
        id="gpt-fake-mini",
        provider="openai",
        tier="cheap",
        input_price_per_mtok=price,
        output_price_per_mtok=price,
        context_window=128_000,
        max_output_tokens=16384,
    )


async def test_the_cost_of_a_call_stays_finite_at_an_absurd_price(
    telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    absurd = _priced(1e300)
    async with (
        usage_server(2**63 - 1) as (url, _),
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=url)],
            registry=ModelRegistry(models=[absurd], price_version="absurd"),
            telemetry_store=telemetry,
            sleep=sleep,
        ) as executor,
    ):
        response = await executor.run("hello", ExecutionContext(model="gpt-fake-mini"))
    [record] = await records_of(telemetry)
    assert response.input_tokens == record.input_tokens == 2**63 - 1
    assert response.cost_usd == record.cost_usd == sys.float_info.max


async def test_a_budget_refuses_a_call_at_an_absurd_price_without_overflowing(
    telemetry: MemoryTelemetryBackend, sleep: RecordingSleep
) -> None:
    # a worst case past what nano-dollars hold is more than any budget: refused, never a
    # raw error
    absurd = _priced(1e307)
    async with (
        usage_server(10) as (url, _),
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=url)],
            registry=ModelRegistry(models=[absurd], price_version="absurd"),
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=1_000_000.0)],
            sleep=sleep,
        ) as executor,
    ):
        with pytest.raises(BudgetExceededError):
            await executor.run("hello", ExecutionContext(model="gpt-fake-mini"))
