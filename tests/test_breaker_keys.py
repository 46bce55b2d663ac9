"""
Breaker keys per model by default, with provider-wide trips for what is provider-wide,
and breaker transitions in the log: over `FakeLLMServer` (real HTTP on 127.0.0.1), the
real providers, the real executor and SQLite / memory state stores.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import anyio.lowlevel
import anyio.to_thread
import pytest

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
)
from empathy_models.backends import MemoryStateStore, MemoryTelemetryBackend
from empathy_models.breaker import provider_outcome
from empathy_models.exceptions import AuthenticationError, ProviderConnectionError, ServerError
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.records import CircuitBreakerState
from empathy_models.testing import FakeLLMServer
from empathy_models.testing.clock import FakeClock

KEY = "test-key-0123"


def _model(model_id: str, provider: str, price: float) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        provider=provider,
        tier="cheap",
        input_price_per_mtok=price,
        output_price_per_mtok=price * 4,
        context_window=100_000,
        max_output_tokens=4096,
    )


REGISTRY = ModelRegistry(
    models=[
        _model("gpt-a", "openai", 0.1),  # the cheapest: tried first
        _model("gpt-b", "openai", 0.2),
        _model("claude-c", "anthropic", 0.3),
    ],
    price_version="keys-test-1",
)
CHEAP = ExecutionContext(workflow="support", stage="triage", tier="cheap")


class NoSleep:
    async def __call__(self, delay: float) -> None:
        await anyio.lowlevel.checkpoint()


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=3) as fake:
        yield fake


def executor(
    openai_url: str, anthropic_url: str, telemetry: MemoryTelemetryBackend, breaker: object
) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [
            OpenAIProvider(api_key=KEY, base_url=openai_url),
            AnthropicProvider(api_key=KEY, base_url=anthropic_url),
        ],
        registry=REGISTRY,
        telemetry_store=telemetry,
        breaker=breaker,  # type: ignore[arg-type]
        retry=RetryPolicy(jitter=False),
        sleep=NoSleep(),
    )


async def states(url: str) -> dict[str, CircuitBreakerState]:
    """Every key's state, read by a second breaker on the same store."""
    async with CircuitBreaker(url) as reader:
        return {s.key: s for s in await reader.snapshot()}


# --------------------------------------------------------------------------- one model's outage


async def test_one_model_answering_503_never_refuses_another_model_of_its_provider(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """
    The default configuration (a breaker built from a URL, every option at its
    default): gpt-a answers 503 to everything and trips; gpt-b, of the same provider,
    is never refused, whether it is reached by fallback or pinned.
    """
    server.set_outage("gpt-a", action=503)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    telemetry = MemoryTelemetryBackend()
    async with executor(
        server.openai_base_url, server.anthropic_base_url, telemetry, state_url
    ) as ex:
        routed = [await ex.run("hello", CHEAP) for _ in range(6)]
        pinned = [await ex.run("hello", ExecutionContext(model="gpt-b")) for _ in range(3)]
    assert {r.model for r in routed + pinned} == {"gpt-b"}
    records = await telemetry.recent(limit=10_000)
    # gpt-a trips at its fifth failure: that run falls back at once (a retry would be
    # refused), the later ones are routed around it; no call is refused at all
    assert not [r for r in records if r.outcome is Outcome.REJECTED]
    assert server.requests("gpt-b") == 9
    assert server.requests("gpt-a") == 5  # five consecutive failures trip its own key
    found = await states(state_url)
    assert found["openai:gpt-a"].state is CircuitState.OPEN
    assert found["openai"].state is CircuitState.CLOSED
    assert found["openai:gpt-b"].state is CircuitState.CLOSED


async def test_a_model_another_worker_forced_open_and_reset_is_routed_to_again(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """
    A model forced open until a reset is routed around; once an operator's reset is
    older than the local view, the next run may route to it again: a worker that only
    knew it as forced open by its own old view does not avoid it for good.
    """
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    clock = FakeClock(time.time())  # the breaker's: its views age without waiting
    telemetry = MemoryTelemetryBackend()
    async with (
        CircuitBreaker(state_url) as operator,
        CircuitBreaker(state_url, clock=clock) as breaker,
        executor(server.openai_base_url, server.anthropic_base_url, telemetry, breaker) as ex,
    ):
        assert (await ex.run("hello", CHEAP)).model == "gpt-a"  # the cheapest
        await operator.force_open("openai:gpt-a", reason="maintenance")
        clock.advance(2)  # the worker's view of gpt-a expires: it sees the force
        assert (await ex.run("hello", CHEAP)).model == "gpt-b"
        assert (await ex.run("hello", CHEAP)).model == "gpt-b"  # routed around it
        await operator.reset("openai:gpt-a")
        clock.advance(2)  # past local_view_ttl: the reset is what the store says now
        assert (await ex.run("hello", CHEAP)).model == "gpt-a"


async def test_an_account_error_still_opens_the_whole_provider(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """A 401 speaks for the account: the provider's other model is not called."""
    server.script("gpt-a", [401])
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    telemetry = MemoryTelemetryBackend()
    async with executor(
        server.openai_base_url, server.anthropic_base_url, telemetry, state_url
    ) as ex:
        first = await ex.run("hello", CHEAP)
        second = await ex.run("hello", CHEAP)
    assert first.model == second.model == "claude-c"
    assert server.requests("gpt-a") == 1
    assert server.requests("gpt-b") == 0
    outcomes = [(r.model, r.outcome) for r in first.attempts]
    assert outcomes == [
        ("gpt-a", Outcome.FATAL),
        ("gpt-b", Outcome.REJECTED),
        ("claude-c", Outcome.SUCCESS),
    ]
    assert second.fallback_chain == ("claude-c",)  # both openai models known open
    found = await states(state_url)
    assert found["openai"].state is CircuitState.FORCED_OPEN
    assert found["openai"].reason is not None and "AuthenticationError" in found["openai"].reason


@pytest.mark.parametrize("status", [402, 403])
async def test_billing_and_permission_errors_open_the_provider(
    server: FakeLLMServer, status: int
) -> None:
    server.script("gpt-a", [status])
    async with CircuitBreaker() as breaker:
        async with executor(
            server.openai_base_url, server.anthropic_base_url, MemoryTelemetryBackend(), breaker
        ) as ex:
            response = await ex.run("hello", CHEAP)
        provider = await breaker.get_status(breaker.key_for("openai"))
    assert response.model == "claude-c"
    assert provider.state is CircuitState.FORCED_OPEN
    assert server.requests("gpt-b") == 0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_refused_opens_the_provider(server: FakeLLMServer) -> None:
    """Nobody listens at the provider's address: every model of it is down."""
    async with CircuitBreaker() as breaker:
        async with executor(
            f"http://127.0.0.1:{closed_port()}/v1",
            server.anthropic_base_url,
            MemoryTelemetryBackend(),
            breaker,
        ) as ex:
            first = await ex.run("hello", CHEAP)
            second = await ex.run("hello", CHEAP)
        provider = await breaker.get_status(breaker.key_for("openai"))
        model_a = await breaker.get_status(breaker.key_for("openai", "gpt-a"))
    assert first.model == second.model == "claude-c"
    # gpt-a: 3 attempts; gpt-b: 2 more, which open the provider key (5 in a row): the
    # next route at once, rather than a retry the key would refuse
    assert [a.outcome for a in first.attempts] == [Outcome.FAILURE] * 5 + [Outcome.SUCCESS]
    assert provider.state is CircuitState.OPEN
    assert provider.reason == "5 consecutive failures"
    assert model_a.state is CircuitState.CLOSED  # 3 failures: under its own threshold
    assert second.fallback_chain == ("claude-c",)


# --------------------------------------------------------------------------- several models


async def test_several_models_of_one_provider_open_open_the_provider() -> None:
    """With ``provider_open_models`` (default 3) models tripped, the provider key opens."""
    clock = FakeClock()
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=30)
    async with CircuitBreaker(MemoryStateStore(clock=clock), policy, clock=clock) as breaker:
        keys = [breaker.key_for("gateway", f"m{i}") for i in range(1, 5)]
        for key in keys[:2]:
            with pytest.raises(ServerError):
                async with breaker.guard(key):
                    raise ServerError("boom", status=503)
        assert (await breaker.get_status("gateway")).state is CircuitState.CLOSED
        with pytest.raises(ServerError):
            async with breaker.guard(keys[2]):
                raise ServerError("boom", status=503)
        provider = await breaker.get_status("gateway")
        assert provider.state is CircuitState.FORCED_OPEN
        assert provider.reason == "3 models of gateway open (m1, m2, m3)"
        with pytest.raises(CircuitOpenError):
            await breaker.admit("gateway")
        await breaker.admit(keys[3])  # the model's own key is untouched
        clock.advance(31)  # the provider key recovers like any other: a probe
        probe = await breaker.admit("gateway")
        assert probe.lease_id is not None
        await breaker.report(probe, Outcome.SUCCESS)
        assert (await breaker.get_status("gateway")).state is CircuitState.CLOSED


class StoreWithoutSpans(MemoryStateStore):
    """A store written before ``force(for_seconds=...)``: it takes only an ``until``."""

    async def force(  # type: ignore[override]
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
    ) -> CircuitBreakerState:
        return await super().force(key, state, until=until, reason=reason)


async def test_the_several_models_rule_works_on_a_store_without_force_spans() -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=30)
    async with CircuitBreaker(StoreWithoutSpans(), policy) as breaker:
        for i in range(3):
            with pytest.raises(ServerError):
                async with breaker.guard(breaker.key_for("gateway", f"m{i}")):
                    raise ServerError("boom", status=503)
        provider = await breaker.get_status("gateway")
        assert provider.state is CircuitState.FORCED_OPEN
        assert provider.open_until_ts is not None and provider.updated_at_ts is not None
        assert provider.open_until_ts - provider.updated_at_ts == pytest.approx(30, abs=5)


async def test_the_several_models_rule_leaves_a_provider_another_worker_disabled_alone(
    tmp_path: Path,
) -> None:
    # DISABLED never trips: the rule must not force open a provider key an operator
    # disabled where this breaker has no fresh view of it
    url = f"sqlite:///{tmp_path / 'state.db'}"
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=30)
    async with CircuitBreaker(url, policy) as operator:
        await operator.disable("gateway", reason="never trip the gateway")
    async with CircuitBreaker(url, policy) as breaker:
        for i in range(3):
            with pytest.raises(ServerError):
                async with breaker.guard(breaker.key_for("gateway", f"m{i}")):
                    raise ServerError("boom", status=503)
        provider = await breaker.get_status("gateway")
    assert provider.state is CircuitState.DISABLED
    assert provider.reason == "never trip the gateway"


async def test_the_several_models_rule_can_be_turned_off() -> None:
    policy = BreakerPolicy(consecutive_failures=1)
    async with CircuitBreaker(policy=policy, provider_open_models=None) as breaker:
        for i in range(5):
            with pytest.raises(ServerError):
                async with breaker.guard(breaker.key_for("gateway", f"m{i}")):
                    raise ServerError("boom", status=503)
        assert (await breaker.get_status("gateway")).state is CircuitState.CLOSED


def test_provider_outcome_keeps_only_what_is_provider_wide() -> None:
    auth = AuthenticationError("no credit", status=402)
    refused = ProviderConnectionError("refused")
    assert provider_outcome(Outcome.FATAL, auth) is Outcome.FATAL
    assert provider_outcome(Outcome.FAILURE, refused) is Outcome.FAILURE
    assert provider_outcome(Outcome.FAILURE, ServerError("x", status=503)) is Outcome.IGNORED
    assert provider_outcome(Outcome.SUCCESS, None) is Outcome.SUCCESS
    assert provider_outcome(Outcome.CANCELLED, None) is Outcome.CANCELLED


# --------------------------------------------------------------------------- logging


async def test_state_changes_are_logged_with_key_reason_and_generation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    policy = BreakerPolicy(consecutive_failures=2, recovery_seconds=10)
    caplog.set_level(logging.INFO, logger="empathy_models.breaker")
    async with CircuitBreaker(MemoryStateStore(clock=clock), policy, clock=clock) as breaker:
        key = breaker.key_for("openai", "gpt-a")
        for _ in range(2):
            with pytest.raises(ServerError):
                async with breaker.guard(key):
                    raise ServerError("boom", status=503)
        clock.advance(11)
        async with breaker.guard(key):
            pass
        await breaker.force_open(key, reason="maintenance window")
    lines = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "empathy_models.breaker"
    ]
    assert [level for level, _ in lines] == [
        logging.WARNING,
        logging.INFO,
        logging.INFO,
        logging.WARNING,
    ]
    opened, half_open, closed, forced = (text for _, text in lines)
    assert "'openai:gpt-a' opened" in opened
    assert "generation 1" in opened and "2 consecutive failures" in opened
    assert "'openai:gpt-a' half-open" in half_open and "generation 2" in half_open
    assert "'openai:gpt-a' closed" in closed and "generation 3" in closed
    assert "'openai:gpt-a' forced open" in forced and "maintenance window" in forced
    assert "generation 4" in forced and "until reset" in forced


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3"])
def test_provider_open_models_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ConfigurationError, match="provider_open_models"):
        CircuitBreaker(provider_open_models=value)  # type: ignore[arg-type]


async def test_a_wrong_key_fixed_is_refused_with_the_command_that_closes_the_circuit(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """
    A newcomer's wrong key forces the provider open for every worker sharing the store;
    the refusal that follows the fix says how to close it at once, and that works.
    """
    from empathy_models import AllRoutesFailedError
    from empathy_models.cli import main as cli_main

    db = tmp_path / "calls.db"
    registry = ModelRegistry(
        models=[m for m in REGISTRY if m.provider == "openai"], price_version="keys-test-1"
    )

    def worker(key: str) -> EmpathyLLMExecutor:
        return EmpathyLLMExecutor(
            [OpenAIProvider(api_key=key, base_url=server.openai_base_url)],
            registry=registry,
            telemetry_store="null://",
            breaker=f"sqlite:///{db}",
            retry=RetryPolicy(jitter=False),
            sleep=NoSleep(),
        )

    async with worker("wrong-key") as ex:
        with pytest.raises(AllRoutesFailedError) as failed:
            await ex.run("hello", CHEAP)
    assert any(isinstance(e, AuthenticationError) for e in failed.value.exceptions)
    async with worker(KEY) as ex:  # the key fixed: the provider is still forced open
        with pytest.raises(AllRoutesFailedError) as refused:
            await ex.run("hello", CHEAP)
    (error, *_) = [e for e in refused.value.exceptions if isinstance(e, CircuitOpenError)]
    assert error.key == "openai" and error.state is CircuitState.FORCED_OPEN
    message = str(error)
    assert "CircuitBreaker.reset('openai')" in message
    command = "empathy-models breaker reset --db <store> openai"
    assert command in message
    assert command in str(refused.value)  # the run's error says it too
    # the command as the message gives it, this store's file for the placeholder
    assert (
        await anyio.to_thread.run_sync(cli_main, ["breaker", "reset", "--db", str(db), "openai"])
        == 0
    )
    async with worker(KEY) as ex:
        assert (await ex.run("hello", CHEAP)).model == "gpt-a"
