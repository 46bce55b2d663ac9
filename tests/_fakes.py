"""
Models, a tool, executors over a `FakeLLMServer`, a non-waiting sleep, a breaker
double shared by the executor's tests, numbers of other types (numpy's, without
numpy), and a quota store's settlements made to fail.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio.lowlevel

from empathy_models import (
    EmpathyLLMExecutor,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    Tool,
)
from empathy_models.abc import Completion, CompletionRequest, CompletionStream, QuotaStore
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.content import ToolCallDelta
from empathy_models.exceptions import StateStoreError
from empathy_models.limits import BudgetUsage
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.records import Ticket
from empathy_models.testing import FakeLLMServer

KEY = "test-key-0123"
"""The key the tests' `FakeLLMServer(api_key=KEY)` accepts."""


def fake_model(
    model_id: str, provider: str, tier: str, price: float, *, max_output_tokens: int = 8192
) -> ModelInfo:
    """A registry entry for the fake server (output priced at five times the input)."""
    return ModelInfo(
        id=model_id,
        provider=provider,
        tier=tier,
        input_price_per_mtok=price,
        output_price_per_mtok=price * 5,
        context_window=128_000,
        max_output_tokens=max_output_tokens,
    )


CHEAP_PAIR = (
    fake_model("claude-fake-haiku", "anthropic", "cheap", 0.8),
    fake_model("gpt-fake-mini", "openai", "cheap", 1.0),
)
"""One cheap model per provider, Anthropic's the cheaper."""

TWO_TIERS = ModelRegistry(
    models=[
        *CHEAP_PAIR,
        fake_model("claude-fake-sonnet", "anthropic", "capable", 3.0),
        fake_model("gpt-fake-4o", "openai", "capable", 2.5),
    ],
    price_version="fakes-two-tiers-1",
)
CHEAP_ONLY = ModelRegistry(models=list(CHEAP_PAIR), price_version="fakes-cheap-only-1")

WEATHER = Tool(
    name="get_weather",
    description="Current weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
"""A tool of one required string argument."""


def http_provider(server: FakeLLMServer, api: str) -> AnthropicProvider | OpenAIProvider:
    """The provider of ``api`` (``"openai"`` or ``"anthropic"``) on ``server``, with `KEY`."""
    if api == "openai":
        return OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)
    if api == "anthropic":
        return AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)
    raise ValueError(f"no provider for {api!r}")


def http_executor(
    server: FakeLLMServer, registry: ModelRegistry, *apis: str, **options: Any
) -> EmpathyLLMExecutor:
    """
    An executor over ``server``'s ``apis`` in that order (OpenAI's alone when none is
    named) and ``registry``; no retries and records kept in memory unless ``options``
    say otherwise.
    """
    options.setdefault("retry", RetryPolicy.none())
    options.setdefault("telemetry_store", MemoryTelemetryBackend())
    providers = [http_provider(server, api) for api in apis or ("openai",)]
    return EmpathyLLMExecutor(providers, registry=registry, **options)


class NoSleep:
    """An executor ``sleep`` that records the delays asked for and does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await anyio.lowlevel.checkpoint()


def list_cost(
    registry: ModelRegistry, model: str, ok: bool, input_tokens: int, output_tokens: int
) -> float:
    """
    What the executor records as a call's cost: a success at its tokens' list price, a
    failure at nothing (not billed); 0 for a model outside ``registry`` (never priced).
    The router scales list prices by what calls were recorded to cost
    (`empathy_models.routing.decide.cost_factor`), so a record's cost must be its price.
    """
    if not ok or model not in registry:
        return 0.0
    return registry.get(model).cost(input_tokens, output_tokens)


def priced_registry(models: list[tuple[str, float]], price_version: str) -> ModelRegistry:
    """One cheap-tier OpenAI model per (id, input price per Mtok); output costs 4x input."""
    return ModelRegistry(
        models=tuple(
            ModelInfo(
                id=m,
                provider="openai",
                tier="cheap",
                input_price_per_mtok=p,
                output_price_per_mtok=4 * p,
                context_window=64_000,
                max_output_tokens=4096,
            )
            for m, p in models
        ),
        price_version=price_version,
    )


def spread_calls(
    model: str, calls: int, successes: int, start: float, workflow: str, stage: str
) -> list[LLMCallRecord]:
    """``calls`` records of ``model`` one second apart from ``start``, the failures
    spread evenly among them (300 ms, 500 tokens in, 300 out; never priced: cost 0)."""
    failures = calls - successes
    return [
        LLMCallRecord(
            workflow=workflow,
            stage=stage,
            model=model,
            provider="openai",
            outcome=(
                Outcome.FAILURE
                if (i + 1) * failures // calls > i * failures // calls
                else Outcome.SUCCESS
            ),
            latency_ms=300.0,
            input_tokens=500,
            output_tokens=300,
            timestamp=datetime.fromtimestamp(start + i, UTC),
        )
        for i in range(calls)
    ]


class HintBreaker:
    """A breaker double: admits everything; ``available_hint`` answers from ``open`` or raises."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.broken: set[str] = set()
        self.generation = 0

    def key_for(self, provider: str, model: str | None = None) -> str:
        return provider

    async def admit(self, key: str) -> Ticket:
        return Ticket(key=key, generation=self.generation)

    async def report(self, ticket: Ticket, outcome: Outcome, **_: Any) -> None:
        return None

    def available_hint(self, key: str) -> bool:
        if key in self.broken:
            raise RuntimeError(f"hint for {key} failed")
        return key not in self.open


class OtherInt:
    """An integer that is no ``int``, as numpy's ``int64`` is: it has ``__index__``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"OtherInt({self.value})"


class ShownFloat(float):
    """A float shown its own way, as numpy 2 shows its float64 (``np.float64(0.5)``)."""

    def __repr__(self) -> str:
        return f"ShownFloat({float(self)})"


class WrappedStream(CompletionStream):
    """
    A provider's stream handed on as it is (``inner``'s pieces, close, end and usage),
    for a test's subclass to change one part of; its `ended_at` is the base's (None:
    it cannot say when its answer arrived) unless the subclass gives ``inner``'s.
    """

    def __init__(self, inner: CompletionStream) -> None:
        self.inner = inner

    async def __anext__(self) -> str | ToolCallDelta:
        return await self.inner.__anext__()

    async def next_pieces(self) -> list[str | ToolCallDelta]:
        return await self.inner.next_pieces()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def finished(self) -> bool:
        return self.inner.finished

    def completion(self) -> Completion:
        return self.inner.completion()

    @property
    def output_estimated(self) -> bool:
        return self.inner.output_estimated


class _Wrapping:
    """A provider mixin whose streams are handed on through ``wrap`` (a test's change)."""

    def __init__(
        self, wrap: Callable[[CompletionStream], CompletionStream], **options: Any
    ) -> None:
        super().__init__(**options)
        self.wrap = wrap

    async def stream(
        self,
        request: CompletionRequest,
        *,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> CompletionStream:
        plain: Any = super()  # the provider class this is mixed into
        inner = await plain.stream(request, idle_timeout=idle_timeout, total_timeout=total_timeout)
        return self.wrap(inner)


class WrappingAnthropic(_Wrapping, AnthropicProvider):
    """An `AnthropicProvider` whose streams are handed on through ``wrap``."""


class WrappingOpenAI(_Wrapping, OpenAIProvider):
    """An `OpenAIProvider` whose streams are handed on through ``wrap``."""


class FailingSettle:
    """
    Makes ``store``'s budget settlements fail (a `StateStoreError`, as from a store
    that went down) while ``down`` is set or for the next ``times`` of them; with
    ``landing``, each failed settlement lands in the store first (its answer lost on
    the way back).  ``calls`` counts the settlements sent, ``failed`` those failed.
    """

    def __init__(
        self, store: QuotaStore, *, times: int = 0, landing: bool = False, down: bool = False
    ) -> None:
        self.settle = store.settle
        self.times, self.landing, self.down = times, landing, down
        self.calls = self.failed = 0
        setattr(store, "settle", self)  # noqa: B010 - an instance's method replaced

    async def __call__(self, key: str, **options: Any) -> BudgetUsage:
        self.calls += 1
        if self.down or self.times > 0:
            self.times = max(0, self.times - 1)
            self.failed += 1
            if self.landing:
                await self.settle(key, **options)
            raise StateStoreError("settle: connection reset by peer", target="test")
        return await self.settle(key, **options)
