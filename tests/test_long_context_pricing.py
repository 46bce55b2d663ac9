"""
Long-context prices: a model whose provider charges more for a call whose prompt is
over a threshold (Anthropic's 1M-token beta, Gemini's Pro models) is priced at those
rates for the whole call, in records, responses and budgets (real HTTP against a bare
aiohttp server answering with the API's usage), in the router's cost of a call and its
``max_cost``, and in a registry file.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    Budget,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    NoModelMeetsConstraintsError,
    Outcome,
    RoutingPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend, telemetry_from_url
from empathy_models.exceptions import ConfigurationError, RecordValidationError
from empathy_models.limits import MemoryQuotaStore
from empathy_models.providers import AnthropicProvider
from empathy_models.records import ConstraintStatus
from empathy_models.whatif import load_stage_evidence, simulate_policy
from tests._serving import anthropic_answering, serving

pytestmark = pytest.mark.filterwarnings("error")

KEY = "test-key-0123"
# Anthropic's published long-context rates for a 1M-token Sonnet: $3 / $15 per million
# tokens up to 200K prompt tokens, $6 / $22.50 for every token of a longer call
LONG = ModelInfo(
    id="sonnet-long",
    provider="anthropic",
    tier="capable",
    input_price_per_mtok=3.0,
    output_price_per_mtok=15.0,
    context_window=1_000_000,
    max_output_tokens=64_000,
    long_context_threshold=200_000,
    long_context_input_price_per_mtok=6.0,
    long_context_output_price_per_mtok=22.5,
)
# a flat-priced model that costs more than LONG's standard rate and less than its long one
FLAT = ModelInfo(
    id="flat",
    provider="anthropic",
    tier="capable",
    input_price_per_mtok=4.0,
    output_price_per_mtok=15.0,
    context_window=1_000_000,
    max_output_tokens=64_000,
)
REGISTRY = ModelRegistry(models=[LONG, FLAT], price_version="long-context-1")


def test_a_prompt_over_the_threshold_prices_every_token_at_the_long_rates() -> None:
    assert LONG.cost(200_000, 1_000) == pytest.approx((200_000 * 3.0 + 1_000 * 15.0) / 1e6)
    assert LONG.cost(200_001, 1_000) == pytest.approx((200_001 * 6.0 + 1_000 * 22.5) / 1e6)
    assert LONG.prices_for(200_000) == (3.0, 15.0)
    assert LONG.prices_for(200_001) == (6.0, 22.5)
    # Anthropic reports cache writes and reads apart from input_tokens: they are prompt
    # tokens too, count towards the threshold, and their prices scale with the input's
    cost = LONG.cost(150_000, 1_000, cache_read_tokens=60_000, cache_write_tokens=1_000)
    expected = 150_000 * 6.0 + 1_000 * 22.5 + 60_000 * 6.0 * 0.1 + 1_000 * 6.0 * 1.25
    assert cost == pytest.approx(expected / 1e6)
    assert LONG.cost(150_000, 1_000, cache_read_tokens=50_000) == pytest.approx(
        (150_000 * 3.0 + 1_000 * 15.0 + 50_000 * 0.3) / 1e6
    )


def test_cache_prices_an_entry_gives_and_a_long_price_it_leaves_out() -> None:
    # an OpenAI-style entry: cached input among the input tokens, its own price; only the
    # input is dearer past the threshold (the output price left out is the standard one)
    info = ModelInfo(
        id="gpt-long",
        provider="openai",
        tier="capable",
        input_price_per_mtok=2.0,
        output_price_per_mtok=8.0,
        cached_input_price_per_mtok=0.5,
        cache_read_price_per_mtok=0.2,
        context_window=1_000_000,
        max_output_tokens=32_000,
        long_context_threshold=272_000,
        long_context_input_price_per_mtok=4.0,
    )
    cost = info.cost(300_000, 100, cached_input_tokens=100_000)
    assert cost == pytest.approx((200_000 * 4.0 + 100_000 * 0.5 * 2 + 100 * 8.0) / 1e6)
    cost = info.cost(300_000, 100, cache_read_tokens=10)
    assert cost == pytest.approx((300_000 * 4.0 + 100 * 8.0 + 10 * 0.2 * 2) / 1e6)
    assert info.prices_for(272_001) == (4.0, 8.0)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"long_context_threshold": 200_000}, "needs long_context_input_price_per_mtok"),
        ({"long_context_input_price_per_mtok": 6.0}, "must be given with long-context prices"),
        (
            {"long_context_threshold": 0, "long_context_input_price_per_mtok": 6.0},
            "must be an integer >= 1",
        ),
        (
            {"long_context_threshold": 200_000, "long_context_output_price_per_mtok": -1},
            "long_context_output_price_per_mtok must be a finite number >= 0",
        ),
    ],
)
def test_a_threshold_and_its_prices_go_together(given: dict[str, object], message: str) -> None:
    entry = {**FLAT.to_dict(), **given}
    with pytest.raises(RecordValidationError, match=message):
        ModelInfo(**entry)


def test_a_registry_file_gives_long_context_prices_and_names_a_bad_entry(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        'price_version = "p1"\n[[models]]\n'
        + "".join(f"{k} = {v!r}\n" for k, v in LONG.to_dict().items()).replace("'", '"')
    )
    assert ModelRegistry.from_file(path).get("sonnet-long") == LONG
    assert LONG.to_dict()["long_context_threshold"] == 200_000
    path.write_text(path.read_text().replace("long_context_threshold = 200000\n", ""))
    with pytest.raises(ConfigurationError, match=r"models\[0\]\.long_context_threshold"):
        ModelRegistry.from_file(path)


async def test_a_long_call_is_recorded_and_charged_at_the_long_rates() -> None:
    usage = {"input_tokens": 240_000, "cache_read_input_tokens": 10_000, "output_tokens": 400}
    billed = (240_000 * 6.0 + 10_000 * 0.6 + 400 * 22.5) / 1e6
    telemetry, quota = MemoryTelemetryBackend(), MemoryQuotaStore()
    async with (
        serving("/v1/messages", anthropic_answering(usage)) as url,
        EmpathyLLMExecutor(
            [AnthropicProvider(api_key=KEY, base_url=url)],
            registry=REGISTRY,
            telemetry_store=telemetry,
            budgets=[Budget(limit_usd=100)],
            quota_store=quota,
        ) as executor,
    ):
        response = await executor.run(
            "summarise", ExecutionContext(workflow="w", stage="s", model="sonnet-long")
        )
    (record,) = await telemetry.recent(limit=10)
    (spent,) = await quota.usages()
    assert math.isclose(response.cost_usd, billed, rel_tol=1e-9)
    assert math.isclose(record.cost_usd, billed, rel_tol=1e-9)
    assert math.isclose(spent.spent_usd, billed, rel_tol=1e-6)


def _record(info: ModelInfo, input_tokens: int, output_tokens: int) -> LLMCallRecord:
    return LLMCallRecord(
        provider=info.provider,
        model=info.id,
        outcome=Outcome.SUCCESS,
        workflow="w",
        stage="s",
        latency_ms=100.0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=info.cost(input_tokens, output_tokens),
        timestamp=datetime.now(UTC),
    )


def _router(calls_in: int) -> AdaptiveModelRouter:
    # both models measured on 30 calls of ``calls_in`` prompt tokens and 1,000 output
    router = AdaptiveModelRouter(
        REGISTRY,
        policy=RoutingPolicy(explore_rate=0.0, warmup_share=0.0),
        refresh_interval=None,
    )
    for info in REGISTRY.models:
        for _ in range(30):
            router.record_outcome(_record(info, calls_in, 1_000))
    return router


@pytest.mark.parametrize("calls_in", [10_000, 300_000])
def test_the_router_costs_a_long_prompt_at_the_long_rates(calls_in: int) -> None:
    # whether the model was measured on short prompts or on long ones (whose recorded
    # costs carry the long rates), a call's cost follows its own prompt's size
    router = _router(calls_in)

    def decide(input_tokens: int, max_cost: float | None = None) -> dict[str, float | None]:
        decision = router.get_best_model(
            "w", "s", candidates=["sonnet-long", "flat"], input_tokens=input_tokens,
            max_cost=max_cost, min_success_rate=0.0,
        )  # fmt: skip
        return {row.model: row.expected_cost_usd for row in decision.candidates}

    short = decide(100_000)
    assert short["sonnet-long"] == pytest.approx((100_000 * 3.0 + 1_000 * 15.0) / 1e6)
    long = decide(300_000)
    assert long["sonnet-long"] == pytest.approx((300_000 * 6.0 + 1_000 * 22.5) / 1e6)
    assert long["flat"] == pytest.approx((300_000 * 4.0 + 1_000 * 15.0) / 1e6)
    # the cheaper model at 100K prompt tokens is the dearer one at 300K
    assert router.get_best_model("w", "s", input_tokens=100_000, min_success_rate=0.0).model == (
        "sonnet-long"
    )
    assert router.get_best_model("w", "s", input_tokens=300_000, min_success_rate=0.0).model == (
        "flat"
    )
    # and a max_cost its standard rate would meet is not met
    decision = router.get_best_model(
        "w", "s", candidates=["sonnet-long"], input_tokens=300_000, max_cost=1.0,
        min_success_rate=0.0, on_no_match="relax",
    )  # fmt: skip
    (row,) = decision.candidates
    assert row.constraints["max_cost"] is ConstraintStatus.REJECTED
    assert decision.constraints_met is False


def test_a_long_prompt_too_costly_for_a_float_is_never_within_a_cost_limit() -> None:
    # sonnet-long's calls recorded at $1e300 too (a valid cost): a prompt of 1e14
    # tokens costs more than a float holds at its standard rates; at its long rates that
    # must not become "not a number", which met every max_cost (beside a row saying
    # "expected cost $nan > max") and made the cheapest pick a coin toss
    router = _router(10_000)
    for _ in range(30):
        router.record_outcome(attrs.evolve(_record(LONG, 10_000, 1_000), cost_usd=1e300))
    ask: dict[str, Any] = {
        "candidates": ["sonnet-long", "flat"],
        "min_success_rate": 0.0,
        "input_tokens": 10**14,
    }
    flat = (10**14 * 4.0 + 1_000 * 15.0) / 1e6
    for max_cost in (None, 1e9):
        decision = router.get_best_model("w", "s", max_cost=max_cost, **ask)
        costs = {row.model: row.expected_cost_usd for row in decision.candidates}
        assert costs == {"sonnet-long": math.inf, "flat": pytest.approx(flat)}
        assert decision.model == "flat" and decision.constraints_met
    with pytest.raises(NoModelMeetsConstraintsError, match="sonnet-long: expected cost"):
        router.get_best_model("w", "s", max_cost=1e9, **{**ask, "candidates": ["sonnet-long"]})


async def test_what_if_prices_the_prompt_size_asked_about_at_its_own_rates() -> None:
    # a stage whose calls all had 300K-token prompts (recorded at the long rates), asked
    # about 100K-token prompts: charged the standard rates, not the long ones scaled down
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many([_record(LONG, 300_000, 1_000) for _ in range(200)])
        evidence = await load_stage_evidence(
            backend, "w", "s", registry=REGISTRY, now=datetime.now(UTC)
        )
    for prompt, (in_price, out_price) in ((100_000, (3.0, 15.0)), (300_000, (6.0, 22.5))):
        report = await simulate_policy(
            evidence, registry=REGISTRY, candidates=["sonnet-long"], input_tokens=prompt,
            requests=20, replicates=3, min_success_rate=0.0,
        )  # fmt: skip
        expected = (prompt * in_price + 1_000 * out_price) / 1e6
        assert report.cost_per_request.estimate == pytest.approx(expected, rel=0.01)


# free at its standard rates (a preview, a promotion), paid past its threshold
FREE_SHORT = ModelInfo(
    id="free-short",
    provider="anthropic",
    tier="capable",
    input_price_per_mtok=0.0,
    output_price_per_mtok=0.0,
    context_window=1_000_000,
    max_output_tokens=64_000,
    long_context_threshold=200_000,
    long_context_input_price_per_mtok=6.0,
    long_context_output_price_per_mtok=22.5,
)


@pytest.mark.parametrize("calls_in", [10_000, 300_000])
def test_a_model_free_at_standard_rates_costs_its_long_rates_on_a_long_prompt(
    calls_in: int,
) -> None:
    # its long-context prices were multiples of a zero standard price: a long prompt was
    # costed $0, met every max_cost and won every "cheapest" pick
    registry = ModelRegistry(models=[FREE_SHORT, FLAT], price_version="free-short-1")
    router = AdaptiveModelRouter(
        registry,
        policy=RoutingPolicy(explore_rate=0.0, warmup_share=0.0),
        refresh_interval=None,
    )
    for info in registry.models:
        for _ in range(30):
            router.record_outcome(_record(info, calls_in, 1_000))
    assert FREE_SHORT.cost(300_000, 1_000) == pytest.approx((300_000 * 6.0 + 1_000 * 22.5) / 1e6)

    def decide(input_tokens: int) -> dict[str, float | None]:
        decision = router.get_best_model(
            "w", "s", candidates=["free-short", "flat"], input_tokens=input_tokens,
            min_success_rate=0.0,
        )  # fmt: skip
        return {row.model: row.expected_cost_usd for row in decision.candidates}

    assert decide(100_000)["free-short"] == 0.0
    assert decide(300_000)["free-short"] == pytest.approx((300_000 * 6.0 + 1_000 * 22.5) / 1e6)
    assert router.get_best_model("w", "s", input_tokens=100_000, min_success_rate=0.0).model == (
        "free-short"
    )
    assert router.get_best_model("w", "s", input_tokens=300_000, min_success_rate=0.0).model == (
        "flat"
    )
    decision = router.get_best_model(
        "w", "s", candidates=["free-short"], input_tokens=300_000, max_cost=1.0,
        min_success_rate=0.0, on_no_match="relax",
    )  # fmt: skip
    assert decision.candidates[0].constraints["max_cost"] is ConstraintStatus.REJECTED


def test_an_unmeasured_model_free_at_standard_rates_costs_its_long_worst_case() -> None:
    # nothing measured its output: a long prompt's output at the long price is the most
    # it may write (max_tokens, else its max_output_tokens), never $0
    registry = ModelRegistry(models=[FREE_SHORT, FLAT], price_version="free-short-1")
    router = AdaptiveModelRouter(
        registry, policy=RoutingPolicy(explore_rate=0.0), refresh_interval=None
    )
    extras: list[dict[str, Any]] = [{}, {"max_tokens": 1_000}]
    extras.append({"max_tokens": 1_000, "strict_cost": True})
    for extra in extras:
        decision = router.get_best_model(
            "w", "s", candidates=["free-short"], input_tokens=300_000, min_success_rate=0.0,
            **extra,
        )  # fmt: skip
        out = extra.get("max_tokens", FREE_SHORT.max_output_tokens)
        (row,) = decision.candidates
        assert row.expected_cost_usd == pytest.approx((300_000 * 6.0 + out * 22.5) / 1e6)
        decision = router.get_best_model(
            "w", "s", candidates=["free-short"], input_tokens=100_000, min_success_rate=0.0,
            **extra,
        )  # fmt: skip
        assert decision.candidates[0].expected_cost_usd == 0.0
