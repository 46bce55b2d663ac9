"""
A decision's costs and its cost limit, as the evidence moves each candidate's cost.

The router keeps every candidate's cost terms between decisions and sees a group of
candidates within ``max_cost`` at once when their largest terms are; these tests hold
each decision against what it explains about itself: the picked model is the cheapest
of the candidates its explanation shows eligible on every constraint (``max_cost``
included), and it counts exactly those.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from empathy_models import (
    AdaptiveModelRouter,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    NoModelMeetsConstraintsError,
    Outcome,
    RoutingPolicy,
)
from empathy_models.records import ConstraintStatus, RoutingDecision

MODELS = 6
_CHEAPEST = re.compile(r"cheapest of (\d+) eligible models")

prices = st.floats(min_value=0.05, max_value=60.0, allow_nan=False).map(lambda p: round(p, 3))
event = st.one_of(
    # a successful call of model i and its output tokens, which move the model's mean
    st.tuples(st.just("outcome"), st.integers(0, MODELS - 1), st.integers(0, 5_000), st.none()),
    # a decision: input tokens, max_tokens (or none), max_cost (or none)
    st.tuples(
        st.just("decide"),
        st.integers(0, 20_000),
        st.one_of(st.none(), st.integers(1, 8_000)),
        st.one_of(st.none(), st.floats(min_value=0.0, max_value=0.3, allow_nan=False)),
    ),
)


def _registry(price_pairs: list[tuple[float, float]]) -> ModelRegistry:
    return ModelRegistry(
        models=tuple(
            ModelInfo(
                id=f"m{i}",
                provider="openai",
                tier=ModelTier.CAPABLE,
                input_price_per_mtok=inp,
                output_price_per_mtok=out,
                context_window=200_000,
                max_output_tokens=8_192,
            )
            for i, (inp, out) in enumerate(price_pairs)
        ),
        price_version="test",
    )


def _record(info: ModelInfo, output_tokens: int) -> LLMCallRecord:
    return LLMCallRecord(
        provider="openai",
        model=info.id,
        outcome=Outcome.SUCCESS,
        workflow="w",
        stage="s",
        latency_ms=100.0,
        input_tokens=500,
        output_tokens=output_tokens,
        cost_usd=info.cost(500, output_tokens),
        timestamp=datetime.now(UTC),
    )


def _expected_cost(
    info: ModelInfo, outputs: list[int], input_tokens: int, max_tokens: int | None
) -> float:
    # a measured model's cost of a call, worked out here: its mean output tokens (at most
    # max_tokens) and the input at its list prices (what its calls were recorded to cost)
    mean = sum(outputs) / len(outputs)
    if max_tokens is not None:
        mean = min(mean, max_tokens)
    return (input_tokens * info.input_price_per_mtok + mean * info.output_price_per_mtok) / 1e6


def _check(decision: RoutingDecision, max_cost: float | None, tolerance: float) -> None:
    rows = {row.model: row for row in decision.candidates}
    eligible = [
        row
        for row in rows.values()
        if not row.excluded
        and all(status is ConstraintStatus.ELIGIBLE for status in row.constraints.values())
    ]
    picked = rows[decision.model]
    if max_cost is not None and decision.constraints_met:
        assert picked.expected_cost_usd is not None
        assert picked.expected_cost_usd <= max_cost
    if decision.exploration:
        return
    found = _CHEAPEST.search(decision.reason)
    shown = int(found.group(1)) if found else 1 if "the only eligible" in decision.reason else None
    if shown is None:
        return
    assert shown == len(eligible), (decision.reason, [r.model for r in eligible])
    assert picked in eligible
    costs = [r.expected_cost_usd for r in eligible if r.expected_cost_usd is not None]
    if costs and picked.expected_cost_usd is not None:
        assert picked.expected_cost_usd <= min(costs) * (1.0 + tolerance) + 1e-15


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    price_pairs=st.lists(st.tuples(prices, prices), min_size=MODELS, max_size=MODELS),
    first_outputs=st.lists(st.integers(1, 5_000), min_size=MODELS, max_size=MODELS),
    events=st.lists(event, min_size=1, max_size=120),
)
def test_every_decision_picks_the_cheapest_it_shows_eligible_within_max_cost(
    price_pairs: list[tuple[float, float]],
    first_outputs: list[int],
    events: list[tuple[object, ...]],
) -> None:
    registry = _registry(price_pairs)
    # no exploration: every pick is the cheapest eligible one (or the only one)
    policy = RoutingPolicy(explore_rate=0.0, warmup_share=0.0)
    router = AdaptiveModelRouter(registry, policy=policy, seed=3, refresh_interval=None)
    ids = [m.id for m in registry.models]
    outputs: list[list[int]] = [[tokens] for tokens in first_outputs]
    for i, tokens in enumerate(first_outputs):  # every model measured: each is eligible
        router.record_outcome(_record(registry.models[i], tokens))
    for kind, a, b, c in events:
        if kind == "outcome":
            assert isinstance(a, int) and isinstance(b, int)
            router.record_outcome(_record(registry.models[a], b))
            outputs[a].append(b)
            continue
        assert isinstance(a, int)
        max_tokens = b if isinstance(b, int) else None
        max_cost = c if isinstance(c, float) else None
        try:
            decision = router.get_best_model(
                "w",
                "s",
                candidates=ids,
                input_tokens=a,
                max_tokens=max_tokens,
                max_cost=max_cost,
                min_success_rate=0.0,
            )
        except NoModelMeetsConstraintsError:
            continue
        for row in decision.candidates:
            info = registry.get(row.model)
            expected = _expected_cost(info, outputs[ids.index(row.model)], a, max_tokens)
            assert row.expected_cost_usd == pytest.approx(expected, rel=1e-9, abs=1e-15)
        _check(decision, max_cost, policy.cost_tie_tolerance)


def test_a_model_whose_cost_rose_past_max_cost_is_no_longer_eligible() -> None:
    # m1 is as cheap as m0 until its answers grow ten times longer: past max_cost then
    registry = _registry([(1.0, 10.0), (1.0, 10.0)])
    router = AdaptiveModelRouter(
        registry,
        policy=RoutingPolicy(explore_rate=0.0, warmup_share=0.0),
        refresh_interval=None,
    )
    for m in registry.models:
        router.record_outcome(_record(m, 100))

    def decide(max_cost: float) -> RoutingDecision:
        return router.get_best_model(
            "w", "s", candidates=["m0", "m1"], input_tokens=1_000, max_cost=max_cost,
            min_success_rate=0.0,
        )  # fmt: skip

    assert "cheapest of 2 eligible models" in decide(0.01).reason  # each costs $0.002
    for _ in range(20):
        router.record_outcome(_record(registry.models[1], 5_000))  # mean ~4,766: ~$0.049
    decision = decide(0.01)
    assert (decision.model, decision.reason) == ("m0", "the only eligible model")
    (m1,) = [row for row in decision.candidates if row.model == "m1"]
    assert m1.constraints["max_cost"] is ConstraintStatus.REJECTED


def test_a_free_model_never_measured_is_within_any_cost_limit() -> None:
    # a local model at $0 per million tokens costs nothing whatever it writes: before
    # any call of it, and whether or not the call gives its size, it meets max_cost=0
    # (it was refused: "cost: no estimate (no observations, and input_tokens/max_tokens
    # not given)", input_tokens given)
    registry = _registry([(0.0, 0.0), (1.0, 10.0)])
    router = AdaptiveModelRouter(registry, seed=3, refresh_interval=None)
    for input_tokens in (100, None):
        decision = router.get_best_model(
            "w", "fresh", candidates=["m0", "m1"], max_cost=0.0, input_tokens=input_tokens
        )
        assert decision.model == "m0" and decision.expected_cost_usd == 0.0
        free, paid = decision.candidates
        assert free.constraints["max_cost"] is ConstraintStatus.ELIGIBLE
        assert paid.constraints["max_cost"] is ConstraintStatus.UNPROVEN  # no estimate
