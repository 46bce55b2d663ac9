"""
The executor's fast paths keep public behaviour: records it builds without running the
validators are exactly what the validated constructor builds from the same values, and
values the validated constructor would reject still never reach a record.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

from empathy_models import (
    AllRoutesFailedError,
    AttemptSummary,
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    LLMResponse,
    Message,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    OpenAIProvider,
    Outcome,
    RetryPolicy,
)
from empathy_models.abc import AttemptTimeout, Completion, CompletionRequest, Provider
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import (
    ProviderConnectionError,
    ProviderTimeoutError,
    RecordValidationError,
    ServerError,
)
from empathy_models.records import _trusted_call_record
from empathy_models.serialization import from_dict, to_dict
from empathy_models.testing import FakeLLMServer
from empathy_models.testing.clock import FakeClock
from tests._fakes import HintBreaker

FIELDS = [a.name for a in attrs.fields(LLMCallRecord)]

FULL: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4.1-nano",
    "outcome": Outcome.FAILURE,
    "call_id": "c" * 32,
    "request_id": "r" * 32,
    "timestamp": datetime(2026, 11, 25, 20, 0, 1, 123456, tzinfo=UTC),
    "workflow": "docs",
    "stage": "outline",
    "task_type": "summarize",
    "tier": ModelTier.CAPABLE,
    "input_tokens": 1200,
    "output_tokens": 300,
    "cost_usd": 0.0042,
    "actual_cost_usd": 0.004,
    "price_version": "2026-11",
    "latency_ms": 812.5,
    "ttft_ms": 95.0,
    "error_type": "ServerError",
    "error_message": "openai HTTP 503: overloaded",
    "status_code": 503,
    "attempt": 3,
    "fallback_used": True,
    "fallback_chain": ("gpt-4.1-nano", "gpt-4o-mini"),
    "original_provider": "openai",
    "original_model": "gpt-4.1-nano",
    "exploration": True,
    "routing_propensity": 0.005,
    "breaker_generation": 7,
    "circuit_state": CircuitState.HALF_OPEN,
    "user_id": "u-1",
    "session_id": "s-1",
    "metadata": MappingProxyType({"team": "docs", "n": 3, "ok": True, "none": None}),
    "prompt_text": "user: hello",
    "response_text": "hi",
}

SPARSE: dict[str, Any] = {
    **dict.fromkeys(FIELDS),
    "provider": "anthropic",
    "model": "claude-haiku-4-5",
    "outcome": Outcome.SUCCESS,
    "call_id": "0" * 32,
    "timestamp": datetime(2026, 1, 1, tzinfo=UTC),
    "task_type": "unknown",
    "input_tokens": 0,
    "output_tokens": 0,
    "cost_usd": 0.0,
    "latency_ms": 0.0,
    "attempt": 1,
    "fallback_used": False,
    "fallback_chain": (),
    "exploration": False,
    "metadata": MappingProxyType({}),
}


def assert_same_record(fast: LLMCallRecord, checked: LLMCallRecord) -> None:
    for name in FIELDS:
        a, b = getattr(fast, name), getattr(checked, name)
        assert a == b, name
        assert type(a) is type(b), name
    assert fast == checked
    assert repr(fast) == repr(checked)
    assert to_dict(fast) == to_dict(checked)


def revalidated(record: LLMCallRecord) -> LLMCallRecord:
    return LLMCallRecord(**{name: getattr(record, name) for name in FIELDS})


# --------------------------------------------------------------------------- the constructor


@pytest.mark.parametrize("values", [FULL, SPARSE], ids=["full", "sparse"])
def test_trusted_constructor_builds_what_the_validated_one_builds(values: dict[str, Any]) -> None:
    assert set(values) == set(FIELDS)
    fast = _trusted_call_record(**values)
    assert type(fast) is LLMCallRecord
    assert_same_record(fast, LLMCallRecord(**values))
    assert from_dict(to_dict(fast), LLMCallRecord) == fast


def test_trusted_constructor_requires_every_field_and_keeps_records_frozen() -> None:
    partial = {k: v for k, v in FULL.items() if k != "metadata"}
    with pytest.raises(TypeError, match="metadata"):
        _trusted_call_record(**partial)
    fast = _trusted_call_record(**FULL)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.model = "other"  # type: ignore[misc]


def test_positional_builder_and_evolver_set_every_field_as_given() -> None:
    from empathy_models._fast import trusted_constructor, trusted_evolver

    positional = trusted_constructor(LLMCallRecord, positional=True)
    built = positional(*(FULL[name] for name in FIELDS))
    assert_same_record(built, LLMCallRecord(**FULL))
    with pytest.raises(TypeError):
        positional(*(FULL[name] for name in FIELDS[:-1]))
    evolve = trusted_evolver(LLMCallRecord)
    changed = evolve(built, model="other", attempt=2)
    assert changed is not built and built.model == FULL["model"]
    expected = {**FULL, "model": "other", "attempt": 2}
    assert {name: getattr(changed, name) for name in FIELDS} == expected
    with pytest.raises(TypeError):
        evolve(built, no_such_field=1)


def test_public_construction_still_validates_and_converts() -> None:
    with pytest.raises(RecordValidationError, match="latency_ms"):
        LLMCallRecord(**{**FULL, "latency_ms": -1.0})
    east = timezone(timedelta(hours=2))
    converted = LLMCallRecord(
        **{**FULL, "outcome": "success", "tier": "cheap", "fallback_chain": ["a"]},
    )
    assert converted.outcome is Outcome.SUCCESS
    assert converted.tier is ModelTier.CHEAP
    assert converted.fallback_chain == ("a",)
    shifted = LLMCallRecord(**{**FULL, "timestamp": datetime(2026, 1, 1, 2, tzinfo=east)})
    assert shifted.timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    assert shifted.timestamp.tzinfo is UTC


# --------------------------------------------------------------------------- the executor's records


def _model(model_id: str, provider: str, tier: str) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        provider=provider,
        tier=tier,
        input_price_per_mtok=1.0,
        output_price_per_mtok=2.0,
        context_window=100_000,
        max_output_tokens=4096,
    )


REGISTRY = ModelRegistry(
    models=[_model("cheap-a", "alpha", "cheap"), _model("capable-b", "beta", "capable")],
    price_version="fastpath-test",
)


class Scripted(Provider):
    """Answers per a queue of actions: an exception, ``"hang"``, or a `Completion`."""

    def __init__(self, name: str = "alpha") -> None:
        self.name = name
        self.queue: list[BaseException | Completion | str] = []
        self.started = asyncio.Event()

    async def _complete(self, request: CompletionRequest) -> Completion:
        action = self.queue.pop(0) if self.queue else "ok"
        if isinstance(action, BaseException):
            raise action
        if isinstance(action, Completion):
            return action
        if action == "hang":
            self.started.set()
            await asyncio.Event().wait()
        return Completion(
            content=f"answer from {request.model}",
            model=request.model,
            input_tokens=40,
            output_tokens=12,
            ttft_ms=3.5,
        )


async def test_every_record_the_executor_writes_equals_its_validated_copy() -> None:
    """Success, retry, fallback, rejection, half-open probe and cancellation records."""
    clock = FakeClock()
    provider = Scripted()
    telemetry = MemoryTelemetryBackend()
    ctx = ExecutionContext(
        workflow="docs",
        stage="outline",
        tier="cheap",
        metadata={"team": "docs", "n": 2},
        user_id="u-9",
        session_id="s-9",
        record_text=True,
        system="be brief",
    )
    policy = BreakerPolicy(consecutive_failures=2, recovery_seconds=10)

    async def no_sleep(_: float) -> None:
        return None

    async with (
        CircuitBreaker(policy=policy, clock=clock, local_view_ttl=0) as breaker,
        EmpathyLLMExecutor(
            [provider, Scripted("beta")],
            registry=REGISTRY,
            telemetry_store=telemetry,
            breaker=breaker,
            retry=RetryPolicy(max_attempts=2, jitter=False),
            sleep=no_sleep,
            clock=clock,
        ) as executor,
    ):
        # a retry and a plain success
        provider.queue = [ServerError("boom", status=500)]
        first = await executor.run("hello", ctx)
        assert first.content == "answer from cheap-a"
        # two failures trip alpha's breaker; the run falls back to capable-b
        provider.queue = [ServerError("a", status=502), ServerError("b", status=503)]
        assert (await executor.run("again", ctx)).model == "capable-b"
        # alpha is open: cheap-a is rejected without a call (it goes last), capable-b answers
        assert (await executor.run("third", ExecutionContext(model="cheap-a"))).model == "capable-b"
        # past the recovery time: a half-open probe, then a cancelled probe
        clock.advance(60)
        assert (await executor.run("probe", ctx)).model == "cheap-a"
        provider.queue = ["hang"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.run, "cancel me", ExecutionContext(model="cheap-a"))
            await provider.started.wait()
            tg.cancel_scope.cancel()

    records = await telemetry.recent(limit=100)
    outcomes = {r.outcome for r in records}
    assert {Outcome.SUCCESS, Outcome.FAILURE, Outcome.REJECTED, Outcome.CANCELLED} <= outcomes
    assert any(r.circuit_state is CircuitState.HALF_OPEN for r in records)
    assert any(r.fallback_used for r in records)
    assert len(records) >= 9
    for record in records:
        assert_same_record(record, revalidated(record))
        assert record.timestamp.tzinfo is UTC
        assert isinstance(record.metadata, MappingProxyType)
        assert from_dict(to_dict(record), LLMCallRecord) == record
    success = next(
        r for r in records if r.outcome is Outcome.SUCCESS and r.request_id == first.request_id
    )
    assert success.response_text == "answer from cheap-a"
    assert success.prompt_text == "system: be brief\nuser: hello"
    assert success.ttft_ms == 3.5
    assert dict(success.metadata) == {"team": "docs", "n": 2}


@pytest.mark.parametrize(
    ("completion", "field"),
    [
        (Completion(content="x", model="m", ttft_ms=-1.0), "ttft_ms"),
        (Completion(content="x", model="m", ttft_ms=math.nan), "ttft_ms"),
        (Completion(content="x", model="m", ttft_ms=True), "ttft_ms"),
        (Completion(content=b"x", model="m"), "response_text"),  # type: ignore[arg-type]
    ],
    ids=["negative-ttft", "nan-ttft", "bool-ttft", "bytes-content"],
)
async def test_a_provider_value_the_record_rejects_never_reaches_a_record(
    completion: Completion, field: str
) -> None:
    provider = Scripted()
    provider.queue = [completion]
    telemetry = MemoryTelemetryBackend()
    async with EmpathyLLMExecutor(
        [provider],
        registry=REGISTRY,
        telemetry_store=telemetry,
        fallback=FallbackPolicy.none(),
    ) as executor:
        with pytest.raises(RecordValidationError, match=field):
            await executor.run("x", ExecutionContext(tier="cheap", record_text=True))
    assert await telemetry.recent(limit=10) == []


async def test_all_routes_failed_records_are_validated_copies_too() -> None:
    provider = Scripted()
    provider.queue = [ServerError("down", status=500)]
    telemetry = MemoryTelemetryBackend()
    async with EmpathyLLMExecutor(
        [provider],
        registry=REGISTRY,
        telemetry_store=telemetry,
        retry=RetryPolicy.none(),
        fallback=FallbackPolicy.none(),
    ) as executor:
        with pytest.raises(AllRoutesFailedError):
            await executor.run("x", ExecutionContext(tier="cheap"))
    (record,) = await telemetry.recent(limit=10)
    assert record.outcome is Outcome.FAILURE
    assert record.status_code == 500
    assert_same_record(record, revalidated(record))


# --------------------------------------------------------------------------- planning


async def test_route_order_follows_the_breaker_hints_on_every_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Known-open routes go last on the call that sees them open, not on a cached plan."""
    breaker = HintBreaker()
    ctx = ExecutionContext(tier="cheap")
    registry = ModelRegistry(
        models=[_model("cheap-a", "alpha", "cheap"), _model("cheap-b", "beta", "cheap")],
        price_version="fastpath-test",
    )
    async with EmpathyLLMExecutor(
        [Scripted("alpha"), Scripted("beta")],
        registry=registry,
        telemetry_store=MemoryTelemetryBackend(),
        breaker=breaker,
    ) as executor:
        first = await executor.run("x", ctx)
        assert first.fallback_chain == ("cheap-a",)
        breaker.open.add("alpha")
        second = await executor.run("x", ctx)
        assert second.fallback_chain == ("cheap-b",)  # cheap-a known open: tried last
        breaker.open.clear()
        assert (await executor.run("x", ctx)).fallback_chain == ("cheap-a",)
        breaker.broken.add("beta")
        with caplog.at_level("ERROR", logger="empathy_models.executor"):
            assert (await executor.run("x", ctx)).fallback_chain == ("cheap-a",)
        assert executor.feedback_errors == 1
        assert "available_hint failed for cheap-b" in caplog.text


# ------------------------------------------------------------------ one timer per HTTP call

HTTP_REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="gpt-fake-mini",
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=5.0,
            context_window=128_000,
            max_output_tokens=16384,
        )
    ],
    price_version="fastpath-http",
)


class CountingOpenAI(OpenAIProvider):
    """A subclass that overrides `complete`: the executor must call the override."""

    calls = 0

    async def complete(
        self,
        request: CompletionRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the interface's parameter
    ) -> Completion:
        type(self).calls += 1
        return await super().complete(request, timeout=timeout)


async def test_per_attempt_timeout_over_http_is_the_executors_timeout() -> None:
    async with FakeLLMServer() as server:
        server.script("gpt-fake-mini", ["hang"])
        telemetry = MemoryTelemetryBackend()
        provider = OpenAIProvider(api_key="sk-test", base_url=server.openai_base_url)
        async with EmpathyLLMExecutor(
            [provider],
            registry=HTTP_REGISTRY,
            telemetry_store=telemetry,
            retry=RetryPolicy.none(),
            fallback=FallbackPolicy.none(),
        ) as executor:
            with pytest.raises(AllRoutesFailedError) as info:
                await executor.run("x", ExecutionContext(tier="cheap", timeout=0.05))
    [error] = info.value.exceptions
    assert isinstance(error, ProviderTimeoutError)
    assert "within 0.050s (the per-attempt timeout)" in str(error)
    assert isinstance(error.__cause__, TimeoutError)
    [record] = await telemetry.recent(limit=10)
    assert (record.outcome, record.error_type) == (Outcome.FAILURE, "ProviderTimeoutError")
    assert "per-attempt timeout" in (record.error_message or "")


async def test_a_provider_timeout_shorter_than_the_budget_is_the_providers_own() -> None:
    async with FakeLLMServer() as server:
        server.script("gpt-fake-mini", ["hang"])
        provider = OpenAIProvider(api_key="sk-test", base_url=server.openai_base_url, timeout=0.05)
        async with EmpathyLLMExecutor(
            [provider],
            registry=HTTP_REGISTRY,
            telemetry_store=MemoryTelemetryBackend(),
            retry=RetryPolicy.none(),
            fallback=FallbackPolicy.none(),
        ) as executor:
            with pytest.raises(AllRoutesFailedError) as info:
                await executor.run("x", ExecutionContext(tier="cheap", timeout=30))
    [error] = info.value.exceptions
    assert isinstance(error, ProviderTimeoutError)
    assert "no answer before the timeout" in str(error)
    assert "per-attempt" not in str(error)


async def test_an_http_timeout_raises_attempt_timeout_only_for_its_own_budget() -> None:
    async with FakeLLMServer() as server:
        # a model of its own per call: the first call's request may never reach the
        # server (its 0.02 s can run out while connecting), leaving its "hang" queued
        server.script("gpt-fake-mini", ["hang"])
        server.script("gpt-fake-other", ["hang"])
        request = CompletionRequest(model="gpt-fake-mini", messages="x", max_tokens=8)
        # the provider's own timeout well after the attempt's: a loaded machine whose
        # event loop stalls past both must still fire the attempt's first; and long
        # enough for the last call to connect and answer on a busy machine
        async with OpenAIProvider(
            api_key="sk-test", base_url=server.openai_base_url, timeout=3.0
        ) as provider:
            with pytest.raises(AttemptTimeout) as budget_ran_out:
                await provider.complete(request, timeout=0.02)
            with pytest.raises(ProviderTimeoutError) as own_ran_out:
                await provider.complete(attrs.evolve(request, model="gpt-fake-other"), timeout=10.0)
            answer = await provider.complete(
                attrs.evolve(request, model="gpt-fake-answers"), timeout=10.0
            )
    assert isinstance(budget_ran_out.value.__cause__, TimeoutError)
    assert not isinstance(own_ran_out.value, AttemptTimeout)
    assert answer.model == "gpt-fake-answers"


async def test_any_provider_takes_a_timeout_through_complete() -> None:
    provider = Scripted()
    request = CompletionRequest(model="m", messages="x", max_tokens=8)
    provider.queue.append("hang")
    with pytest.raises(AttemptTimeout, match=r"no answer within 0\.02s") as ran_out:
        await provider.complete(request, timeout=0.02)
    assert isinstance(ran_out.value.__cause__, TimeoutError)
    assert provider.started.is_set()
    provider.queue.append("hang")
    with pytest.raises(AttemptTimeout, match="no time left"):
        await provider.complete(request, timeout=0)
    assert provider.queue == ["hang"]  # never called
    provider.queue.clear()
    provider.queue.append(ProviderConnectionError("down", provider="alpha", model="m"))
    with pytest.raises(ProviderConnectionError):  # the provider's own errors pass unchanged
        await provider.complete(request, timeout=5)
    answer = await provider.complete(request, timeout=5)
    assert answer.model == "m"


async def test_an_overridden_complete_is_called_by_the_executor() -> None:
    async with FakeLLMServer() as server:
        CountingOpenAI.calls = 0  # a count of this test's calls, however often it runs
        provider = CountingOpenAI(api_key="sk-test", base_url=server.openai_base_url)
        async with EmpathyLLMExecutor(
            [provider], registry=HTTP_REGISTRY, telemetry_store=MemoryTelemetryBackend()
        ) as executor:
            response = await executor.run("x", ExecutionContext(tier="cheap"))
    assert response.model == "gpt-fake-mini"
    assert CountingOpenAI.calls == 1


# ------------------------------------------------------------------ responses and summaries


@pytest.mark.parametrize("cls", [LLMResponse, AttemptSummary])
def test_response_classes_built_through_their_slots_have_no_validators(cls: type) -> None:
    """The executor skips their __init__; that is only the same object while this holds."""
    for attribute in attrs.fields(cls):
        assert attribute.validator is None, attribute.name
        assert attribute.converter is None, attribute.name
    assert not hasattr(cls, "__attrs_post_init__")


async def test_responses_equal_their_publicly_constructed_copies() -> None:
    provider = Scripted()
    provider.queue = [ServerError("boom", status=500)]
    async with EmpathyLLMExecutor(
        [provider],
        registry=REGISTRY,
        telemetry_store=MemoryTelemetryBackend(),
        retry=RetryPolicy(max_attempts=2, jitter=False),
        sleep=lambda _: anyio.lowlevel.checkpoint(),
    ) as executor:
        response = await executor.run("x", ExecutionContext(tier="cheap"))
    assert len(response.attempts) == 2
    assert response.cost_usd == REGISTRY.cost("cheap-a", 40, 12) > 0
    for item in (response, *response.attempts):
        cls = type(item)
        copy = cls(**{a.name: getattr(item, a.name) for a in attrs.fields(cls)})
        assert copy == item
        assert repr(copy) == repr(item)


@pytest.mark.parametrize(
    ("prompt", "options"),
    [
        ("Summarize the report.", {}),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather?"},
            ],
            {
                "tools": [
                    {
                        "name": "get_weather",
                        "description": "Weather",
                        "input_schema": {"type": "object", "properties": {}},
                    }
                ],
                "tool_choice": "auto",
                "stop": "END",
                "top_p": 0.5,
                "seed": 3,
                "extra_body": {"metadata": {"user": "u1"}},
            },
        ),
        (
            "Give me JSON.",
            {"response_format": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        ),
    ],
)
async def test_the_request_a_provider_gets_is_what_the_public_constructor_builds(
    prompt: Any, options: dict[str, Any]
) -> None:
    from empathy_models.testing import FakeProvider

    provider = FakeProvider(name="openai")
    registry = ModelRegistry(
        models=[
            ModelInfo(
                id="gpt-x",
                provider="openai",
                tier="cheap",
                input_price_per_mtok=1.0,
                output_price_per_mtok=2.0,
                context_window=100_000,
                max_output_tokens=4096,
            )
        ],
        price_version="p1",
    )
    ctx = ExecutionContext(model="gpt-x", max_tokens=77, temperature=0.25)
    async with EmpathyLLMExecutor(
        [provider], registry=registry, telemetry_store="null://"
    ) as executor:
        await executor.run(prompt, ctx, **options)
        sent_run = provider.last_request("gpt-x")
        async with executor.stream(prompt, ctx, **options) as stream:
            await stream.get_final_response()
        sent_stream = provider.last_request("gpt-x")
    expected = CompletionRequest(
        model="gpt-x",
        messages=[Message.of(m) for m in prompt] if isinstance(prompt, list) else prompt,
        max_tokens=77,
        temperature=0.25,
        **options,
    )
    for sent in (sent_run, sent_stream):
        assert sent is not None
        assert {f.name: getattr(sent, f.name) for f in attrs.fields(CompletionRequest)} == {
            f.name: getattr(expected, f.name) for f in attrs.fields(CompletionRequest)
        }
