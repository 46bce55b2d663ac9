"""
EmpathyLLMExecutor with in-process scripted providers: routing order, retries, fallback,
deadlines, cancellation, feedback to breaker/router/telemetry, and lifecycle.

The providers here are small test doubles (the executor is the subject and is real, as
are the registry, the circuit breaker and the telemetry backend).  The same behaviour
over real HTTP is in ``test_executor_http.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import warnings
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
import attrs
import pytest

from empathy_models import (
    AllRoutesFailedError,
    BreakerPolicy,
    CircuitOpenError,
    CircuitState,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    Message,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    Outcome,
    RateLimitedError,
    RetryPolicy,
    RoutingDecision,
    TelemetryDisabledWarning,
)
from empathy_models.abc import Completion, CompletionRequest, Provider, TelemetryBackend
from empathy_models.backends import (
    MemoryTelemetryBackend,
    NullTelemetryBackend,
    state_store_from_url,
)
from empathy_models.breaker import CircuitBreaker
from empathy_models.exceptions import (
    AuthenticationError,
    ConfigurationWarning,
    ContentPolicyError,
    ContextWindowExceededError,
    InvalidRequestError,
    InvalidResponseError,
    ModelNotFoundError,
    NotOpenError,
    ProviderConnectionError,
    ProviderTimeoutError,
    ServerError,
    TelemetryError,
)
from empathy_models.tasks import is_known_task
from empathy_models.testing.clock import FakeClock

# --------------------------------------------------------------------------- fixtures


def _model(
    model_id: str, provider: str, tier: str, price_in: float, price_out: float, window: int
) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        provider=provider,
        tier=tier,
        input_price_per_mtok=price_in,
        output_price_per_mtok=price_out,
        context_window=window,
        max_output_tokens=4096,
    )


REGISTRY = ModelRegistry(
    models=[
        _model("cheap-a", "alpha", "cheap", 1.0, 2.0, 8_000),
        _model("cheap-b", "beta", "cheap", 2.0, 4.0, 16_000),
        _model("capable-a", "alpha", "capable", 3.0, 15.0, 200_000),
        _model("capable-b", "beta", "capable", 5.0, 20.0, 100_000),
        _model("premium-a", "alpha", "premium", 15.0, 75.0, 200_000),
        _model("premium-b", "beta", "premium", 20.0, 80.0, 400_000),
    ],
    price_version="test-2026-11",
)

CHEAP = ExecutionContext(workflow="docs", stage="outline", tier="cheap")

Action = BaseException | str


class ScriptedProvider(Provider):
    """
    A provider double: per model, a queue of actions (an exception to raise, ``"ok"``,
    ``"hang"``, ``"gate"`` to wait for `gate`, or ``"slow:<s>"`` to advance `clock`).
    """

    def __init__(self, name: str, *, clock: FakeClock | None = None) -> None:
        self.name = name
        self.clock = clock
        self.scripts: dict[str, list[Action]] = {}
        self.default: Action = "ok"
        self.calls: list[str] = []
        self.requests: list[CompletionRequest] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.session: aiohttp.ClientSession | None = None
        self.binds = 0
        self.unbinds = 0

    def script(self, model: str, *actions: Action) -> None:
        self.scripts.setdefault(model, []).extend(actions)

    async def bind(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.binds += 1

    async def unbind(self) -> None:
        self.session = None
        self.unbinds += 1

    async def _complete(self, request: CompletionRequest) -> Completion:
        self.calls.append(request.model)
        self.requests.append(request)
        queue = self.scripts.get(request.model)
        action = queue.pop(0) if queue else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            while isinstance(action, str) and action.startswith("slow:"):
                assert self.clock is not None
                self.clock.advance(float(action.split(":", 1)[1]))
                action = queue.pop(0) if queue else self.default
            if isinstance(action, BaseException):
                raise action
            if action == "hang":
                self.started.set()
                await asyncio.Event().wait()
            elif action == "gate":
                await self.gate.wait()
            return Completion(
                content=f"answer from {request.model}",
                model=f"{request.model}-20261101",
                input_tokens=1000,
                output_tokens=500,
                stop_reason="end_turn",
            )
        finally:
            self.in_flight -= 1


class SleepRecorder:
    """An injected sleep: records each delay and advances a fake clock by it."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.delays: list[float] = []
        self.clock = clock

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.clock is not None:
            self.clock.advance(delay)
        await anyio.lowlevel.checkpoint()


class RecordingRouter:
    """A router double: answers a fixed decision and keeps what it was told."""

    def __init__(self, model: str, *, exploration: bool = False) -> None:
        self.model = model
        self.exploration = exploration
        self.queries: list[dict[str, Any]] = []
        self.records: list[LLMCallRecord] = []

    def get_best_model(
        self,
        workflow: str,
        stage: str,
        *,
        candidates: Sequence[str] | None = None,
        input_tokens: int | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        max_latency_ms: float | None = None,
        min_success_rate: float | None = None,
        on_no_match: str = "raise",
        unavailable: Collection[str] = (),
    ) -> RoutingDecision:
        self.queries.append(
            {
                "workflow": workflow,
                "stage": stage,
                "candidates": list(candidates or ()),
                "input_tokens": input_tokens,
                "max_tokens": max_tokens,
                "max_cost": max_cost,
                "max_latency_ms": max_latency_ms,
                "min_success_rate": min_success_rate,
                "on_no_match": on_no_match,
                "unavailable": set(unavailable),
            }
        )
        return RoutingDecision(
            model=self.model, workflow=workflow, stage=stage, exploration=self.exploration
        )

    def record_outcome(self, record: LLMCallRecord) -> None:
        self.records.append(record)


class BrokenTelemetry(TelemetryBackend):
    """A backend whose writes always fail."""

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        raise TelemetryError("disk full")

    async def _aggregate(self, **_: Any) -> list[Any]:
        return []

    async def _recent(self, **_: Any) -> list[LLMCallRecord]:
        return []

    async def _purge(self, *, before: datetime) -> int:
        return 0


@pytest.fixture
def alpha() -> ScriptedProvider:
    return ScriptedProvider("alpha")


@pytest.fixture
def beta() -> ScriptedProvider:
    return ScriptedProvider("beta")


@pytest.fixture
def telemetry() -> MemoryTelemetryBackend:
    return MemoryTelemetryBackend()


@pytest.fixture
def sleep() -> SleepRecorder:
    return SleepRecorder()


def make(
    providers: Sequence[Provider],
    telemetry: TelemetryBackend | str | None,
    sleep: SleepRecorder,
    **options: Any,
) -> EmpathyLLMExecutor:
    options.setdefault("retry", RetryPolicy(jitter=False))
    return EmpathyLLMExecutor(
        providers, registry=REGISTRY, telemetry_store=telemetry, sleep=sleep, **options
    )


def is_closed(resource: Any) -> bool:
    return bool(resource.closed)  # read after exit (keeps mypy's narrowing out of it)


async def records_of(telemetry: MemoryTelemetryBackend) -> list[LLMCallRecord]:
    return sorted(await telemetry.recent(limit=10_000), key=lambda r: (r.timestamp, r.attempt))


# --------------------------------------------------------------------------- the happy path


async def test_success_returns_the_answer_priced_from_the_registry(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    """The cheapest candidate answers; cost uses the registry price of the model called."""
    async with make([alpha, beta], telemetry, sleep) as executor:
        response = await executor.run("Summarize this", CHEAP)
    assert response.content == "answer from cheap-a"
    assert (response.model, response.provider, response.tier) == (
        "cheap-a",
        "alpha",
        ModelTier.CHEAP,
    )
    assert response.response_model == "cheap-a-20261101"
    assert (response.input_tokens, response.output_tokens) == (1000, 500)
    assert response.cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    assert response.price_version == "test-2026-11"
    assert response.fallback_chain == ("cheap-a",)
    assert response.fallback_used is False
    assert response.routing_decision is None
    assert [a.outcome for a in response.attempts] == [Outcome.SUCCESS]
    [record] = await records_of(telemetry)
    assert record.outcome is Outcome.SUCCESS
    assert record.request_id == response.request_id
    assert record.call_id == response.attempts[0].call_id
    assert (record.workflow, record.stage, record.task_type) == ("docs", "outline", "unknown")
    assert (record.model, record.provider, record.tier) == ("cheap-a", "alpha", ModelTier.CHEAP)
    assert record.cost_usd == pytest.approx(response.cost_usd)
    assert record.price_version == "test-2026-11"
    assert record.attempt == 1
    assert record.original_model == "cheap-a"
    assert record.prompt_text is None and record.response_text is None
    assert alpha.requests[0].messages == (Message(role="user", content="Summarize this"),)
    assert sleep.delays == []


@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("SUMMARIZE", "cheap-a"),
        ("fix-bug", "capable-a"),
        ("something new", "capable-a"),
        ("Final Review", "premium-a"),
    ],
)
async def test_task_type_decides_the_tier(
    alpha: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
    task: str,
    model: str,
) -> None:
    unknown = not is_known_task(task)  # warned about: it most likely is a typo
    async with make([alpha], telemetry, sleep) as executor:
        with pytest.warns(ConfigurationWarning) if unknown else contextlib.nullcontext():
            response = await executor.run("x", ExecutionContext(task_type=task))
    assert response.model == model
    [record] = await records_of(telemetry)
    assert record.task_type == task.lower().replace("-", "_").replace(" ", "_")


async def test_an_unknown_task_type_is_logged_once_per_name(
    alpha: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="empathy_models.executor")
    async with make([alpha], telemetry, sleep) as executor:
        with pytest.warns(ConfigurationWarning) as given:
            for _ in range(3):
                await executor.run("x", ExecutionContext(task_type="something new"))
        await executor.run("x", ExecutionContext(task_type="summarize"))
        await executor.run("x", ExecutionContext())  # the default "unknown" is not news
    warned = [r.getMessage() for r in caplog.records if "unknown task type" in r.getMessage()]
    assert warned == [
        "unknown task type 'something new': using the capable tier "
        "(see empathy_models.tasks.TaskType, or pass ExecutionContext(tier=...))"
    ]
    assert [str(w.message) for w in given] == warned


async def test_an_unknown_task_type_is_not_warned_about_while_the_context_gives_the_tier(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    # with `tier=` the task type picks nothing (a label on the records): a warning
    # saying "using the capable tier" would be false, and fail a suite run with
    # warnings as errors (this one: filterwarnings = error)
    async with make([alpha], telemetry, sleep) as executor:
        response = await executor.run("x", ExecutionContext(task_type="support", tier="cheap"))
        async with executor.stream("x", ExecutionContext(task_type="support", tier="cheap")) as s:
            streamed = await s.get_final_response()
        assert response.model == streamed.model == "cheap-a"
        # the same name picking the tier later: warned then, once
        with pytest.warns(ConfigurationWarning, match="'support': using the capable tier") as given:
            for _ in range(2):
                response = await executor.run("x", ExecutionContext(task_type="support"))
        assert response.model == "capable-a" and len(given) == 1
        await executor.run("x", ExecutionContext(task_type="support", tier="cheap"))


async def test_unknown_task_types_are_never_warned_about_twice(
    alpha: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # more names than are remembered: one warning each up to 1,024 names, then one
    # saying no more come, and never a second one about a name
    caplog.set_level(logging.WARNING, logger="empathy_models.executor")
    async with make([alpha], telemetry, sleep) as executor:
        with pytest.warns(ConfigurationWarning) as given:
            for i in [*range(1100), *range(20)]:
                await executor.run("x", ExecutionContext(task_type=f"job {i}"))
    assert len(given) == 1024
    warned = [r.getMessage() for r in caplog.records if "unknown task type" in r.getMessage()]
    assert len(warned) == len(set(warned)) == 1024
    stop = [r.getMessage() for r in caplog.records if "no more warnings" in r.getMessage()]
    assert stop == [
        "more than 1024 task types unknown to empathy_models.tasks: no more warnings "
        "about them from this executor"
    ]


async def test_tier_override_beats_the_task(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    async with make([alpha], telemetry, sleep) as executor:
        response = await executor.run("x", ExecutionContext(task_type="summarize", tier="premium"))
    assert response.model == "premium-a"


async def test_request_carries_context_settings(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    ctx = attrs.evolve(CHEAP, system="be brief", max_tokens=77, temperature=0.2)
    messages = [Message(role="user", content="hi"), Message(role="assistant", content="hello")]
    async with make([alpha], telemetry, sleep) as executor:
        await executor.run(messages, ctx)
    [request] = alpha.requests
    assert (request.system, request.max_tokens, request.temperature) == ("be brief", 77, 0.2)
    assert request.messages == tuple(messages)


# --------------------------------------------------------------------------- retries


async def test_retry_honours_retry_after_and_backoff_through_the_injected_sleep(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    """429 with Retry-After 2.5 s waits 2.5 s; a 503 then waits the backoff (3 s)."""
    alpha.script(
        "cheap-a",
        RateLimitedError("slow down", status=429, retry_after=2.5),
        ServerError("unavailable", status=503),
        "ok",
    )
    retry = RetryPolicy(base_delay=1.0, multiplier=3.0, jitter=False)
    async with make([alpha], telemetry, sleep, retry=retry) as executor:
        response = await executor.run("x", CHEAP)
    assert sleep.delays == [2.5, 3.0]
    assert [a.delay_s for a in response.attempts] == [2.5, 3.0, None]
    assert [a.status_code for a in response.attempts] == [429, 503, None]
    assert response.attempts[0].retry_after == 2.5
    assert response.retry_count == 2
    assert response.fallback_chain == ("cheap-a",)
    records = await records_of(telemetry)
    assert [r.outcome for r in records] == [Outcome.RATE_LIMITED, Outcome.FAILURE, Outcome.SUCCESS]
    assert [r.attempt for r in records] == [1, 2, 3]
    assert {r.request_id for r in records} == {response.request_id}
    assert [r.error_type for r in records] == ["RateLimitedError", "ServerError", None]
    assert alpha.calls == ["cheap-a"] * 3


async def test_retry_after_beyond_the_cap_falls_back_without_sleeping(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.script("cheap-a", RateLimitedError("come back in 2 min", status=429, retry_after=120))
    async with make([alpha, beta], telemetry, sleep) as executor:
        response = await executor.run("x", CHEAP)
    assert sleep.delays == []
    assert response.model == "cheap-b"
    assert response.fallback_chain == ("cheap-a", "cheap-b")
    assert response.fallback_used is True
    first, second = await records_of(telemetry)
    assert (first.model, first.outcome, first.fallback_used) == (
        "cheap-a",
        Outcome.RATE_LIMITED,
        False,
    )
    assert (second.model, second.outcome, second.fallback_used) == (
        "cheap-b",
        Outcome.SUCCESS,
        True,
    )
    assert second.original_model == "cheap-a" and second.original_provider == "alpha"
    assert second.fallback_chain == ("cheap-a", "cheap-b")


async def test_exhausted_retries_fall_back_to_the_same_tier_then_the_next_tier_up(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.script("cheap-a", *(ServerError("boom", status=500) for _ in range(3)))
    beta.script("cheap-b", *(ProviderTimeoutError("slow") for _ in range(3)))
    async with make([alpha, beta], telemetry, sleep) as executor:
        response = await executor.run("x", CHEAP)
    assert response.model == "capable-a"
    assert response.tier is ModelTier.CAPABLE
    assert response.fallback_chain == ("cheap-a", "cheap-b", "capable-a")
    assert sleep.delays == [1.0, 2.0, 1.0, 2.0]
    assert alpha.calls == ["cheap-a"] * 3 + ["capable-a"]
    assert beta.calls == ["cheap-b"] * 3
    records = await records_of(telemetry)
    assert len(records) == len(response.attempts) == 7
    assert [r.attempt for r in records] == list(range(1, 8))


@pytest.mark.parametrize(
    "error",
    [
        AuthenticationError("bad key", status=401),
        AuthenticationError("forbidden", status=403),
        ModelNotFoundError("no such model", status=404),
        InvalidResponseError("not JSON"),
    ],
    ids=["401", "403", "404", "malformed"],
)
async def test_fatal_and_malformed_answers_fall_back_at_once_without_retrying(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
    error: Exception,
) -> None:
    alpha.script("cheap-a", error)
    async with make([alpha, beta], telemetry, sleep) as executor:
        response = await executor.run("x", CHEAP)
    assert response.model == "cheap-b"
    assert alpha.calls == ["cheap-a"]
    assert sleep.delays == []
    first, _ = await records_of(telemetry)
    expected = Outcome.FAILURE if isinstance(error, InvalidResponseError) else Outcome.FATAL
    assert first.outcome is expected


@pytest.mark.parametrize(
    "error",
    [InvalidRequestError("bad field", status=400), ContentPolicyError("no", status=400)],
    ids=["400", "content-policy"],
)
async def test_invalid_requests_are_raised_at_once(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
    error: Exception,
) -> None:
    """Falling back does not fix a bad request: the provider's error comes back as is."""
    alpha.script("cheap-a", error)
    async with make([alpha, beta], telemetry, sleep) as executor:
        with pytest.raises(InvalidRequestError) as info:
            await executor.run("x", CHEAP)
    assert info.value is error
    assert beta.calls == []
    [record] = await records_of(telemetry)
    assert record.outcome is Outcome.IGNORED
    assert record.status_code == 400


async def test_context_window_overflow_moves_to_a_larger_window(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    """capable-a (200k) overflows: capable-b (100k) and premium-a (200k) are skipped."""
    alpha.script("capable-a", ContextWindowExceededError("too long", status=400))
    ctx = attrs.evolve(CHEAP, tier="capable")
    async with make([alpha, beta], telemetry, sleep) as executor:
        response = await executor.run("x", ctx)
    assert response.model == "premium-b"
    assert response.fallback_chain == ("capable-a", "premium-b")
    assert beta.calls == ["premium-b"]
    assert [r.outcome for r in await records_of(telemetry)] == [Outcome.IGNORED, Outcome.SUCCESS]


async def test_context_window_overflow_without_a_larger_window_is_raised(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    beta.script("premium-b", ContextWindowExceededError("too long", status=400))
    ctx = attrs.evolve(CHEAP, model="premium-b")
    async with make([alpha, beta], telemetry, sleep) as executor:
        with pytest.raises(ContextWindowExceededError):
            await executor.run("x", ctx)
    assert alpha.calls == []


async def test_context_window_overflow_is_raised_when_the_policy_says_so(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.script("cheap-a", ContextWindowExceededError("too long", status=400))
    fallback = FallbackPolicy(larger_context_on_overflow=False)
    async with make([alpha, beta], telemetry, sleep, fallback=fallback) as executor:
        with pytest.raises(ContextWindowExceededError):
            await executor.run("x", CHEAP)
    assert beta.calls == []


# --------------------------------------------------------------------------- all routes failed


async def test_all_routes_failed_holds_every_attempts_error_in_order(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    errors: list[Exception] = [
        ServerError("boom", status=500),
        ServerError("unavailable", status=503),
        ProviderConnectionError("refused"),
        ProviderTimeoutError("slow"),
    ]
    alpha.script("cheap-a", *errors[:2])
    beta.script("cheap-b", *errors[2:])
    async with make(
        [alpha, beta],
        telemetry,
        sleep,
        retry=RetryPolicy(max_attempts=2, jitter=False),
        fallback=FallbackPolicy(max_routes=2),
    ) as executor:
        with pytest.raises(AllRoutesFailedError) as info:
            await executor.run("x", CHEAP)
    group = info.value
    assert list(group.exceptions) == errors
    assert "cheap-a, cheap-b" in str(group)
    assert alpha.calls == ["cheap-a", "cheap-a"]  # max_routes=2: capable-a never called
    records = await records_of(telemetry)
    assert [r.error_type for r in records] == [type(e).__name__ for e in errors]
    assert all(not r.success for r in records)
    # except* by the class of the individual failures
    caught: list[BaseException] = []
    try:
        raise group
    except* ServerError as servers:
        caught.extend(servers.exceptions)
    except* (ProviderConnectionError, ProviderTimeoutError):
        pass
    assert caught == errors[:2]


async def test_without_escalation_fallback_stays_in_the_tier(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.script("cheap-a", AuthenticationError("no", status=401))
    beta.script("cheap-b", AuthenticationError("no", status=401))
    async with make(
        [alpha, beta], telemetry, sleep, fallback=FallbackPolicy(escalate=False)
    ) as executor:
        with pytest.raises(AllRoutesFailedError) as info:
            await executor.run("x", CHEAP)
    assert len(info.value.exceptions) == 2
    assert alpha.calls == ["cheap-a"] and beta.calls == ["cheap-b"]


async def test_a_model_is_never_tried_twice(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.default = AuthenticationError("no", status=401)
    beta.default = AuthenticationError("no", status=401)
    async with make(
        [alpha, beta], telemetry, sleep, fallback=FallbackPolicy(max_routes=10)
    ) as executor:
        with pytest.raises(AllRoutesFailedError):
            await executor.run("x", ExecutionContext(tier="cheap", model="cheap-b"))
    tried = alpha.calls + beta.calls
    assert sorted(tried) == sorted(m.id for m in REGISTRY)
    assert beta.calls[0] == "cheap-b"


# --------------------------------------------------------------------------- deadline and timeouts


async def test_deadline_stops_retry_waits_that_would_outlast_it(
    alpha: ScriptedProvider, beta: ScriptedProvider, telemetry: MemoryTelemetryBackend
) -> None:
    """With a fake clock: a 3 s wait fits a 5 s deadline once, not twice."""
    clock = FakeClock(start=1000.0)
    sleep = SleepRecorder(clock)
    alpha.script("cheap-a", *(RateLimitedError("429", status=429, retry_after=3) for _ in range(3)))
    async with make([alpha, beta], telemetry, sleep, clock=clock) as executor:
        response = await executor.run("x", attrs.evolve(CHEAP, deadline=5.0))
    assert sleep.delays == [3.0]
    assert response.model == "cheap-b"
    assert alpha.calls == ["cheap-a", "cheap-a"]


async def test_deadline_passed_raises_with_every_attempt_so_far(
    telemetry: MemoryTelemetryBackend,
) -> None:
    clock = FakeClock(start=1000.0)
    sleep = SleepRecorder(clock)
    alpha = ScriptedProvider("alpha", clock=clock)
    beta = ScriptedProvider("beta", clock=clock)
    # the first call takes 4 s (fake) and fails; the retry wait (1 s) would reach the
    # deadline, so the executor moves on; cheap-b's call takes 2 s more: past the deadline
    alpha.script("cheap-a", "slow:4", ServerError("boom", status=500))
    beta.script("cheap-b", "slow:2", ServerError("boom", status=502))
    async with make([alpha, beta], telemetry, sleep, clock=clock) as executor:
        with pytest.raises(AllRoutesFailedError) as info:
            await executor.run("x", attrs.evolve(CHEAP, deadline=5.0))
    errors = info.value.exceptions
    assert [type(e) for e in errors] == [ServerError, ServerError, ProviderTimeoutError]
    assert "deadline of 5.0s exceeded" in str(errors[-1])
    assert "deadline" in str(info.value)
    assert sleep.delays == []
    assert alpha.calls == ["cheap-a"] and beta.calls == ["cheap-b"]
    assert len(await records_of(telemetry)) == 2


async def test_deadline_cuts_a_hanging_call(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    """
    A real deadline interrupts the call itself; no further route is tried.  2 s: the
    call is sent within it however busy the machine (else it is recorded not sent).
    """
    alpha.script("cheap-a", "hang")
    async with make([alpha, beta], telemetry, sleep) as executor:
        with pytest.raises(AllRoutesFailedError) as info:
            await executor.run("x", attrs.evolve(CHEAP, deadline=2.0))
    [error] = info.value.exceptions
    assert isinstance(error, ProviderTimeoutError)
    assert "deadline" in str(error)
    assert beta.calls == []
    [record] = await records_of(telemetry)
    # the deadline, not the model's own timeout, ended it: not held against the model
    assert (record.outcome, record.error_type) == (Outcome.CANCELLED, "ProviderTimeoutError")


async def test_per_attempt_timeout_is_a_retryable_provider_timeout(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.script("cheap-a", "hang", "ok")
    async with make([alpha, beta], telemetry, sleep) as executor:
        response = await executor.run("x", attrs.evolve(CHEAP, timeout=0.05))
    assert response.model == "cheap-a"
    assert sleep.delays == [1.0]
    first, second = await records_of(telemetry)
    assert (first.outcome, first.error_type) == (Outcome.FAILURE, "ProviderTimeoutError")
    assert "per-attempt timeout" in (first.error_message or "")
    assert second.outcome is Outcome.SUCCESS


# --------------------------------------------------------------------------- breaker


async def test_open_breaker_route_is_rejected_without_calling_and_falls_back(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    async with CircuitBreaker() as breaker:
        await breaker.force_open("alpha")
        async with make([alpha, beta], telemetry, sleep, breaker=breaker) as executor:
            response = await executor.run("x", attrs.evolve(CHEAP, model="cheap-a"))
    assert alpha.calls == []
    assert response.model == "cheap-b"
    assert response.fallback_chain == ("cheap-a", "cheap-b")
    assert [a.outcome for a in response.attempts] == [Outcome.REJECTED, Outcome.SUCCESS]
    rejected, success = await records_of(telemetry)
    assert rejected.outcome is Outcome.REJECTED
    assert rejected.circuit_state is CircuitState.FORCED_OPEN
    assert rejected.error_type == "CircuitOpenError"
    assert success.breaker_generation is not None


async def test_known_open_routes_go_last(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    """The cheapest candidate's breaker is open: the next one goes first, no rejection."""
    async with CircuitBreaker() as breaker:
        await breaker.force_open("alpha")
        async with make([alpha, beta], telemetry, sleep, breaker=breaker) as executor:
            response = await executor.run("x", CHEAP)
    assert response.model == "cheap-b"
    assert [a.outcome for a in response.attempts] == [Outcome.SUCCESS]


async def test_every_route_open_raises_all_routes_failed_with_the_rejections(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    async with CircuitBreaker() as breaker:
        await breaker.force_open("alpha")
        await breaker.force_open("beta")
        async with make([alpha, beta], telemetry, sleep, breaker=breaker) as executor:
            with pytest.raises(AllRoutesFailedError) as info:
                await executor.run("x", CHEAP)
    assert all(isinstance(e, CircuitOpenError) for e in info.value.exceptions)
    assert len(info.value.exceptions) == 6  # every model of cheap, capable, premium
    assert alpha.calls == [] and beta.calls == []


async def test_breaker_is_told_every_outcome(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.script("cheap-a", *(ServerError("boom", status=500) for _ in range(3)))
    beta.script("cheap-b", AuthenticationError("bad key", status=401))
    policy = BreakerPolicy(consecutive_failures=10)
    async with CircuitBreaker(policy=policy, local_view_ttl=0, per_model=False) as breaker:
        async with make([alpha, beta], telemetry, sleep, breaker=breaker) as executor:
            response = await executor.run("x", CHEAP)
        alpha_state = await breaker.get_status("alpha")
        beta_state = await breaker.get_status("beta")
    assert response.model == "capable-a"
    # three failures, then capable-a's success on the same (per-provider) key
    assert alpha_state.state is CircuitState.CLOSED
    assert alpha_state.window_failures == 3 and alpha_state.window_calls == 4
    assert beta_state.state is CircuitState.FORCED_OPEN  # 401 forces the key open


# --------------------------------------------------------------------------- router


async def test_router_picks_the_first_route_and_learns_every_attempt(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    router = RecordingRouter("cheap-b", exploration=True)
    beta.script("cheap-b", ServerError("boom", status=500))
    ctx = attrs.evolve(CHEAP, max_cost=0.5, max_latency_ms=2000, min_success_rate=0.9)
    async with make([alpha, beta], telemetry, sleep, router=router) as executor:
        response = await executor.run("x" * 400, ctx)
    assert response.model == "cheap-b"
    assert response.routing_decision is not None
    assert response.routing_decision.model == "cheap-b"
    [query] = router.queries
    assert query["candidates"] == ["cheap-a", "cheap-b"]
    # the prompt's estimate: a quarter of its 400 bytes and two framings (message, reply)
    assert query["input_tokens"] == (400 + 2 * 8) // 4
    assert query["max_tokens"] == 1024
    assert (query["max_cost"], query["max_latency_ms"], query["min_success_rate"]) == (
        0.5,
        2000,
        0.9,
    )
    assert [r.outcome for r in router.records] == [Outcome.FAILURE, Outcome.SUCCESS]
    assert all(r.exploration for r in router.records)
    assert router.records == await records_of(telemetry)


async def test_router_is_told_which_models_are_known_open(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    router = RecordingRouter("cheap-b")
    async with CircuitBreaker() as breaker:
        await breaker.force_open("alpha")
        async with make(
            [alpha, beta], telemetry, sleep, router=router, breaker=breaker
        ) as executor:
            await executor.run("x", CHEAP)
    assert router.queries[0]["unavailable"] == {"cheap-a"}


async def test_on_no_match_is_passed_only_when_set(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    router = RecordingRouter("cheap-a")
    async with make([alpha, beta], telemetry, sleep, router=router) as executor:
        await executor.run("x", CHEAP)
        await executor.run("x", attrs.evolve(CHEAP, on_no_match="relax"))
    assert [q["on_no_match"] for q in router.queries] == ["raise", "relax"]


async def test_router_is_not_asked_when_every_candidate_is_known_open(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    """The breakers decide: both cheap models are rejected, the next tier answers."""
    router = RecordingRouter("cheap-a")
    async with CircuitBreaker(per_model=True) as breaker:
        await breaker.force_open(breaker.key_for("alpha", "cheap-a"))
        await breaker.force_open(breaker.key_for("beta", "cheap-b"))
        async with make(
            [alpha, beta], telemetry, sleep, router=router, breaker=breaker
        ) as executor:
            response = await executor.run("x", CHEAP)
    assert router.queries == []
    assert response.routing_decision is None
    assert response.model == "capable-a"
    assert [a.outcome for a in response.attempts] == [
        Outcome.REJECTED,
        Outcome.REJECTED,
        Outcome.SUCCESS,
    ]
    assert [r.outcome for r in router.records] == [a.outcome for a in response.attempts]


async def test_router_fallback_continues_with_the_remaining_candidates(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    router = RecordingRouter("cheap-b")
    beta.script("cheap-b", AuthenticationError("no", status=401))
    async with make([alpha, beta], telemetry, sleep, router=router) as executor:
        response = await executor.run("x", CHEAP)
    assert response.fallback_chain == ("cheap-b", "cheap-a")
    success = router.records[-1]
    assert success.exploration is False
    assert success.original_model == "cheap-b"


async def test_constraints_without_a_router_are_refused(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    async with make([alpha], telemetry, sleep) as executor:
        with pytest.raises(ConfigurationError, match="no router"):
            await executor.run("x", attrs.evolve(CHEAP, max_cost=0.01))
    assert alpha.calls == []


def test_a_pinned_model_cannot_carry_constraints() -> None:
    with pytest.raises(ConfigurationError, match="pins the model"):
        ExecutionContext(model="cheap-a", min_success_rate=0.9)


# --------------------------------------------------------------------------- telemetry


async def test_without_telemetry_one_warning_and_the_router_still_learns(
    alpha: ScriptedProvider, sleep: SleepRecorder
) -> None:
    router = RecordingRouter("cheap-a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        executor = make([alpha], None, sleep, router=router)
        async with executor:
            for _ in range(3):
                await executor.run("x", CHEAP)
    assert [w.category for w in caught] == [TelemetryDisabledWarning]
    assert "no LLMCallRecord is kept" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line
    assert executor.telemetry_enabled is False
    assert len(router.records) == 3


async def test_an_explicit_null_backend_is_a_silent_opt_out(
    alpha: ScriptedProvider, sleep: SleepRecorder
) -> None:
    null = NullTelemetryBackend()
    executor = make([alpha], null, sleep)  # filterwarnings=error: any warning would fail
    async with executor:
        await executor.run("x", CHEAP)
    assert executor.telemetry_enabled is False
    assert null.accepted == 1


async def test_telemetry_failure_never_fails_the_request(
    alpha: ScriptedProvider, sleep: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    executor = make([alpha], BrokenTelemetry(), sleep)
    assert executor.telemetry_enabled is True
    with caplog.at_level(logging.ERROR, logger="empathy_models.executor"):
        async with executor:
            response = await executor.run("x", CHEAP)
            await executor.run("x", CHEAP)
    assert response.content == "answer from cheap-a"
    assert executor.telemetry_errors == 2
    assert sum("telemetry write failed" in r.getMessage() for r in caplog.records) == 2


async def test_record_text_is_opt_in(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    async with make([alpha], telemetry, sleep) as executor:
        await executor.run("secret prompt", attrs.evolve(CHEAP, system="sys"))
        await executor.run("shared prompt", attrs.evolve(CHEAP, system="sys", record_text=True))
    hidden, shown = await records_of(telemetry)
    assert hidden.prompt_text is None and hidden.response_text is None
    assert shown.prompt_text == "system: sys\nuser: shared prompt"
    assert shown.response_text == "answer from cheap-a"
    assert "shared prompt" not in repr(shown)


async def test_context_is_not_mutated_and_metadata_is_copied(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    metadata: dict[str, str | int] = {"team": "docs", "ticket": 42}
    ctx = ExecutionContext(
        workflow="docs", stage="outline", tier="cheap", metadata=metadata, user_id="u1"
    )
    metadata["team"] = "changed after construction"
    before = attrs.asdict(ctx)
    alpha.script("cheap-a", AuthenticationError("no", status=401))
    async with make([alpha, beta], telemetry, sleep) as executor:
        await executor.run("x", ctx)
    assert attrs.asdict(ctx) == before
    records = await records_of(telemetry)
    assert [dict(r.metadata) for r in records] == [{"team": "docs", "ticket": 42}] * 2
    assert {r.user_id for r in records} == {"u1"}


def test_context_validation_names_field_and_value() -> None:
    with pytest.raises(ConfigurationError, match=r"ExecutionContext\.timeout .* got -1"):
        ExecutionContext(timeout=-1)
    with pytest.raises(ConfigurationError, match=r"ExecutionContext\.max_tokens .* got 0"):
        ExecutionContext(max_tokens=0)
    with pytest.raises(ConfigurationError, match=r"ExecutionContext\.tier .* 'ultra'"):
        ExecutionContext(tier="ultra")
    with pytest.raises(ConfigurationError, match=r"metadata\['obj'\]"):
        ExecutionContext(metadata={"obj": object()})
    with pytest.raises(ConfigurationError, match=r"FallbackPolicy\.max_routes .* got 0"):
        FallbackPolicy(max_routes=0)


# --------------------------------------------------------------------------- cancellation


async def test_cancellation_records_cancelled_returns_the_probe_lease_and_leaves_no_task(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    """A half-open probe cancelled mid-request gives its lease back at once."""
    clock = FakeClock()
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=10)
    async with CircuitBreaker(policy=policy, clock=clock, local_view_ttl=0) as breaker:
        key = breaker.key_for("alpha", "cheap-a")
        alpha.script("cheap-a", ServerError("boom", status=500), "hang")
        ctx = attrs.evolve(CHEAP, model="cheap-a")
        async with make(
            [alpha],
            telemetry,
            sleep,
            breaker=breaker,
            retry=RetryPolicy.none(),
            fallback=FallbackPolicy.none(),
        ) as executor:
            with pytest.raises(AllRoutesFailedError):
                await executor.run("x", ctx)
            assert (await breaker.get_status(key)).state is CircuitState.OPEN
            clock.advance(60)  # past the recovery time: the next call is a probe

            before = asyncio.all_tasks()
            async with anyio.create_task_group() as tg:
                tg.start_soon(executor.run, "x", ctx)
                await alpha.started.wait()
                assert (await breaker.get_status(key)).probes_in_flight == 1
                tg.cancel_scope.cancel()
            assert asyncio.all_tasks() == before
            status = await breaker.get_status(key)
            assert status.state is CircuitState.HALF_OPEN
            assert status.probes_in_flight == 0  # lease returned, not left to expire
            assert await breaker.is_available(key)
    _, cancelled = await records_of(telemetry)
    assert cancelled.outcome is Outcome.CANCELLED
    assert cancelled.model == "cheap-a"
    assert cancelled.error_type == "CancelledError"
    assert cancelled.breaker_generation is not None
    assert cancelled.circuit_state is CircuitState.HALF_OPEN


async def test_task_cancel_is_reraised_untouched_and_recorded(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    alpha.script("cheap-a", "hang")
    async with make([alpha], telemetry, sleep) as executor:
        task = asyncio.ensure_future(executor.run("x", CHEAP))
        await alpha.started.wait()
        task.cancel("caller gave up")
        with pytest.raises(asyncio.CancelledError) as info:
            await task
    assert info.value.args == ("caller gave up",)
    [record] = await records_of(telemetry)
    assert record.outcome is Outcome.CANCELLED


# --------------------------------------------------------------------------- concurrency


async def test_concurrency_is_capped_per_provider(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.default = "gate"
    beta.default = "gate"
    results: list[str] = []
    async with make(
        [alpha, beta], telemetry, sleep, concurrency_per_provider={"alpha": 3}
    ) as executor:

        async def one(ctx: ExecutionContext) -> None:
            results.append((await executor.run("x", ctx)).model)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one, CHEAP)
            for _ in range(5):
                tg.start_soon(one, attrs.evolve(CHEAP, model="cheap-b"))
            while alpha.in_flight < 3 or beta.in_flight < 5:
                await anyio.lowlevel.checkpoint()
            for _ in range(50):  # give every waiting task the chance to get in
                await anyio.lowlevel.checkpoint()
            assert alpha.in_flight == 3  # capped
            assert beta.in_flight == 5  # default cap (64) not reached
            alpha.gate.set()
            beta.gate.set()
    assert alpha.max_in_flight == 3
    assert sorted(results) == ["cheap-a"] * 20 + ["cheap-b"] * 5
    assert len(await records_of(telemetry)) == 25


# --------------------------------------------------------------------------- lifecycle


async def test_run_outside_async_with_raises(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    # each message says the executor's state in words and what to do
    executor = make([alpha], telemetry, sleep)
    for use in (lambda: executor.run("x"), lambda: executor.stream("x").__aenter__()):
        with pytest.raises(NotOpenError) as new:
            await use()
        assert "has not been opened yet" in str(new.value)
        assert "`async with EmpathyLLMExecutor(...) as executor:`" in str(new.value)
        assert "(it is" not in str(new.value)
    async with executor:
        pass
    with pytest.raises(NotOpenError) as closed:
        await executor.run("x")
    assert "is closed (aclose() was called, or its `async with` block ended)" in str(closed.value)
    assert "build a new EmpathyLLMExecutor" in str(closed.value)
    assert "(it is" not in str(closed.value)
    with pytest.raises(NotOpenError, match="cannot be entered again"):
        await executor.__aenter__()


def test_an_executor_used_in_another_event_loop_refuses_before_any_attempt(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    """The notebook / pytest-asyncio pattern: opened in one asyncio.run(), used in the next."""
    executor = make([alpha], telemetry, sleep)

    async def first() -> None:
        await executor.__aenter__()
        await executor.run("x")

    async def second() -> None:
        with pytest.raises(NotOpenError, match="opened in another event loop"):
            await executor.run("x")
        with pytest.raises(NotOpenError, match="opened in another event loop"):
            async with executor.stream("x"):
                pass

    opened_in = asyncio.new_event_loop()
    try:
        opened_in.run_until_complete(first())
        asyncio.run(second())
        assert len(alpha.calls) == 1  # nothing attempted in the second loop
    finally:
        opened_in.run_until_complete(executor.aclose())
        opened_in.close()


async def test_entering_an_open_executor_again_raises_the_librarys_error(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    async with make([alpha], telemetry, sleep) as executor:
        with pytest.raises(NotOpenError, match="already open"):
            await executor.__aenter__()


async def test_owned_session_is_created_bound_and_closed(
    alpha: ScriptedProvider, beta: ScriptedProvider, sleep: SleepRecorder
) -> None:
    executor = make([alpha, beta], "memory://", sleep)
    async with executor:
        session = alpha.session
        assert session is not None and session is beta.session
        assert not session.closed
        store = executor.telemetry_store
        assert store is not None and not store.closed
        await executor.run("x", CHEAP)
        assert len(await store.recent()) == 1
    assert is_closed(session)
    assert is_closed(store)  # built from a URL: owned and closed
    assert (alpha.binds, alpha.unbinds) == (1, 1)
    assert alpha.session is None


async def test_borrowed_session_breaker_and_telemetry_stay_open(
    alpha: ScriptedProvider, telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    async with aiohttp.ClientSession() as session, CircuitBreaker() as breaker:
        async with make([alpha], telemetry, sleep, session=session, breaker=breaker):
            assert alpha.session is session
        assert not session.closed
        assert not telemetry.closed
        assert not breaker.closed


@pytest.mark.slow
async def test_a_borrowed_telemetry_backend_whose_flush_hangs_does_not_hold_the_exit(
    alpha: ScriptedProvider, sleep: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """
    The executor flushes a borrowed backend on exit, within its close budget (10 s): one
    whose flush never ends (a store that stopped answering) is left with a warning,
    its records still in it for its owner to write.
    """

    class HangingFlush(MemoryTelemetryBackend):
        async def flush(self) -> None:
            await asyncio.Event().wait()

    telemetry = HangingFlush()
    async with telemetry:
        with anyio.fail_after(30):  # a guard: the exit takes the close budget, 10 s
            async with make([alpha], telemetry, sleep) as executor:
                await executor.run("x", CHEAP)
        assert executor.telemetry_errors == 1
        assert len(await telemetry.recent()) == 1  # the record stays, for its owner
    [warning] = [r for r in caplog.records if "did not finish flushing" in r.getMessage()]
    # what was left of the 10 s budget once the runs were ended (a few ms less under load)
    assert warning.levelname == "WARNING"
    assert re.search(r"within (9\.\d+|10) s", warning.getMessage()), warning.getMessage()


async def test_breaker_url_builds_an_owned_breaker(
    alpha: ScriptedProvider,
    beta: ScriptedProvider,
    telemetry: MemoryTelemetryBackend,
    sleep: SleepRecorder,
) -> None:
    alpha.script("cheap-a", AuthenticationError("no", status=401))
    async with make([alpha, beta], telemetry, sleep, breaker="memory://") as executor:
        first = await executor.run("x", CHEAP)
        second = await executor.run("x", CHEAP)
    assert first.fallback_chain == ("cheap-a", "cheap-b")
    # the 401 forced "alpha" open: the second run puts cheap-a last and never calls it
    assert second.fallback_chain == ("cheap-b",)
    assert alpha.calls == ["cheap-a"]


def test_configuration_errors_are_explicit(sleep: SleepRecorder) -> None:
    with pytest.raises(ConfigurationError, match="no models in the registry"):
        make([ScriptedProvider("gamma")], MemoryTelemetryBackend(), sleep)
    with pytest.raises(ConfigurationError, match="two providers are named"):
        make([ScriptedProvider("alpha"), ScriptedProvider("alpha")], "memory://", sleep)
    with pytest.raises(ConfigurationError, match="must not be empty"):
        make([], "memory://", sleep)
    with pytest.raises(ConfigurationError, match=r"concurrency_per_provider\['\*'\]"):
        make([ScriptedProvider("alpha")], "memory://", sleep, concurrency_per_provider=0)
    with pytest.raises(ConfigurationError, match="unknown providers: zeta"):
        make([ScriptedProvider("alpha")], "memory://", sleep, concurrency_per_provider={"zeta": 1})


def test_providers_not_given_as_provider_objects_are_refused_saying_what_to_pass() -> None:
    # the name as a string read "providers[None] is not a Provider: 'openai'"; one provider
    # outside a list, "providers must be a sequence of Provider or a mapping, got ..."
    from empathy_models import OpenAIProvider

    with pytest.raises(ConfigurationError) as named:
        EmpathyLLMExecutor(["openai"], telemetry_store="null://")  # type: ignore[list-item]
    assert "providers[0] is not a Provider: 'openai'" in str(named.value)
    assert "OpenAIProvider()" in str(named.value)
    alone = OpenAIProvider(api_key="k")
    with pytest.raises(ConfigurationError) as single:
        EmpathyLLMExecutor(alone, telemetry_store="null://")  # type: ignore[arg-type]
    assert "in a list: [OpenAIProvider(...)]" in str(single.value)


@pytest.mark.parametrize("url", ["memory://", "sqlite://:memory:"])
def test_a_state_store_as_the_breaker_is_refused_saying_what_to_pass(
    sleep: SleepRecorder, url: str
) -> None:
    # a store holds circuit state; the executor calls a breaker (which runs over one)
    store = state_store_from_url(url)
    with pytest.raises(ConfigurationError, match=r"CircuitBreaker\(store=") as info:
        make([ScriptedProvider("alpha")], "memory://", sleep, breaker=store)
    assert "state store" in str(info.value)
    with pytest.raises(ConfigurationError, match="key_for, admit, report, available_hint"):
        make([ScriptedProvider("alpha")], "memory://", sleep, breaker=object())


async def test_a_tier_without_models_for_the_configured_providers_is_an_error(
    sleep: SleepRecorder,
) -> None:
    registry = REGISTRY.without_models("premium-a", "premium-b")
    alpha = ScriptedProvider("alpha")
    async with EmpathyLLMExecutor(
        [alpha], registry=registry, telemetry_store="memory://", sleep=sleep
    ) as executor:
        with pytest.raises(ConfigurationError, match="no premium model"):
            await executor.run("x", ExecutionContext(tier="premium"))
    assert alpha.calls == []


async def test_providers_as_a_mapping_use_the_mapping_keys(
    telemetry: MemoryTelemetryBackend, sleep: SleepRecorder
) -> None:
    provider = ScriptedProvider("whatever-name")
    async with EmpathyLLMExecutor(
        {"beta": provider}, registry=REGISTRY, telemetry_store=telemetry, sleep=sleep
    ) as executor:
        response = await executor.run("x", CHEAP)
    assert response.model == "cheap-b"
    assert provider.calls == ["cheap-b"]
