"""AdaptiveModelRouter through its public API: decisions, no-match policies, seeding, reports."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from empathy_models import (
    AdaptiveModelRouter,
    ConfigurationError,
    ConfigurationWarning,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    NoModelMeetsConstraintsError,
    NotOpenError,
    Outcome,
    RoutingDecision,
    RoutingPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend, NullTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.evidence import EvidenceBatch
from empathy_models.exceptions import TelemetryError
from empathy_models.records import CandidateEvaluation, ConstraintStatus, wilson_interval
from empathy_models.routing import TierRecommendation
from empathy_models.testing.clock import FakeClock
from tests._fakes import list_cost

WF, ST = "docs", "outline"


def info(model: str, tier: str, in_price: float, out_price: float) -> ModelInfo:
    return ModelInfo(
        id=model,
        provider="openai",
        tier=tier,
        input_price_per_mtok=in_price,
        output_price_per_mtok=out_price,
        context_window=128_000,
        max_output_tokens=8192,
    )


REGISTRY = ModelRegistry(
    models=(
        info("nano", "cheap", 0.1, 0.4),
        info("mini", "cheap", 0.4, 1.6),
        info("small", "cheap", 1.0, 5.0),
        info("mid", "capable", 3.0, 15.0),
        info("big", "premium", 15.0, 75.0),
    ),
    price_version="test-1",
)
CHEAP = ["nano", "mini", "small"]


def rec(
    clock: FakeClock,
    model: str,
    ok: bool = True,
    *,
    outcome: Outcome | None = None,
    workflow: str = WF,
    stage: str = ST,
    latency_ms: float = 100.0,
    output_tokens: int = 200,
    tier: ModelTier | None = None,
) -> LLMCallRecord:
    outcome = outcome or (Outcome.SUCCESS if ok else Outcome.FAILURE)
    return LLMCallRecord(
        provider="openai",
        model=model,
        outcome=outcome,
        timestamp=datetime.fromtimestamp(clock(), UTC),
        workflow=workflow,
        stage=stage,
        tier=tier,
        input_tokens=1000,
        output_tokens=output_tokens,
        cost_usd=list_cost(REGISTRY, model, outcome is Outcome.SUCCESS, 1000, output_tokens),
        latency_ms=latency_ms,
    )


def feed(
    router: AdaptiveModelRouter,
    clock: FakeClock,
    model: str,
    successes: int,
    failures: int = 0,
    **kw: object,
) -> None:
    for i in range(successes + failures):
        clock.advance(1.0)
        router.record_outcome(rec(clock, model, i < successes, **kw))  # type: ignore[arg-type]


def make(clock: FakeClock, **kw: object) -> AdaptiveModelRouter:
    kw.setdefault("seed", 1)
    return AdaptiveModelRouter(REGISTRY, clock=clock, **kw)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def by_model(decision: RoutingDecision) -> dict[str, object]:
    return {c.model: c for c in decision.candidates}


# --------------------------------------------------------------------------- decisions


def test_cold_start_explores_and_says_constraints_are_not_met(clock: FakeClock) -> None:
    router = make(clock)
    d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=500, max_tokens=100)
    assert d.exploration is True
    assert d.constraints_met is False
    assert d.model in CHEAP
    assert d.min_success_rate == 0.8  # the policy's default floor is applied and reported
    for c in d.candidates:
        assert c.sample_size == 0
        assert c.constraints == {"min_success_rate": ConstraintStatus.UNPROVEN}


def test_cheapest_model_that_meets_the_constraints_is_chosen(clock: FakeClock) -> None:
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 60, 40)  # 60%: rejected for 0.9
    feed(router, clock, "mini", 200, 1)
    feed(router, clock, "small", 200)
    d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=500, min_success_rate=0.9)
    assert d.model == "mini"
    assert d.constraints_met is True and d.exploration is False and d.policy_applied is None
    cands = by_model(d)
    nano = cands["nano"]
    assert nano.status is ConstraintStatus.REJECTED  # type: ignore[attr-defined]
    assert nano.sample_size == 100  # type: ignore[attr-defined]
    assert nano.success_rate_upper < 0.9  # type: ignore[attr-defined]
    assert any("below 0.9" in r for r in nano.reasons)  # type: ignore[attr-defined]
    assert d.expected_cost_usd == pytest.approx(500 * 0.4e-6 + 200 * 1.6e-6)


def feed_rate(
    router: AdaptiveModelRouter, clock: FakeClock, model: str, calls: int, every: int, **kw: object
) -> None:
    # one failure every ``every`` calls, spread evenly (a steady rate, no change to detect)
    for i in range(calls):
        clock.advance(1.0)
        router.record_outcome(rec(clock, model, i % every != every - 1, **kw))  # type: ignore[arg-type]


def test_most_reliable_picks_the_clearly_more_reliable_model_whatever_it_costs(
    clock: FakeClock,
) -> None:
    # 99.0% against 99.9% over 5,000 calls each (bounds far apart): the dearer, slower
    # model is the more reliable one, and cost and latency must not outweigh that
    router = make(clock, policy=RoutingPolicy(objective="most_reliable", explore_rate=0.0))
    feed_rate(router, clock, "nano", 5000, 100)
    feed_rate(router, clock, "big", 5000, 1000, latency_ms=300.0)
    picks = Counter(
        router.get_best_model(WF, ST, candidates=["nano", "big"], input_tokens=500).model
        for _ in range(1000)
    )
    assert picks["big"] >= 990


def test_most_reliable_breaks_a_tie_in_reliability_toward_the_cheaper_model(
    clock: FakeClock,
) -> None:
    router = make(clock, policy=RoutingPolicy(objective="most_reliable", explore_rate=0.0))
    feed_rate(router, clock, "nano", 5000, 100)
    feed_rate(router, clock, "big", 5000, 100)  # the same evidence, 150 times the price
    picks = Counter(
        router.get_best_model(WF, ST, candidates=["nano", "big"], input_tokens=500).model
        for _ in range(1000)
    )
    assert picks["nano"] > 600


def test_decision_lists_every_candidate_with_its_evidence(clock: FakeClock) -> None:
    router = make(clock)
    feed(router, clock, "mini", 50, latency_ms=120.0)
    d = router.get_best_model(
        WF, ST, candidates=CHEAP, input_tokens=100, max_latency_ms=500, max_cost=0.01
    )
    mini = by_model(d)["mini"]
    assert mini.sample_size == 50  # type: ignore[attr-defined]
    assert mini.success_rate == 1.0  # type: ignore[attr-defined]
    assert mini.latency_p50_ms == pytest.approx(120.0)  # type: ignore[attr-defined]
    assert mini.latency_p95_ms == pytest.approx(120.0)  # type: ignore[attr-defined]
    assert mini.expected_cost_usd == pytest.approx(100 * 0.4e-6 + 200 * 1.6e-6)  # type: ignore[attr-defined]
    assert mini.cost_basis == "estimate"  # type: ignore[attr-defined]
    assert set(mini.constraints) == {"min_success_rate", "max_latency_ms", "max_cost"}  # type: ignore[attr-defined]
    again = RoutingDecision.from_dict(d.to_dict())
    assert again == d


def test_explanation_rows_are_what_the_validated_constructor_builds(clock: FakeClock) -> None:
    # rows are built without __init__; each must equal the checked record of its fields,
    # whatever the decision: costs in and over the limit, strict, no input tokens, an
    # open circuit, a model not in the registry, a change, the same call again (its
    # verdicts' templates found again)
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 60, 40)
    feed(router, clock, "mini", 200, 1, latency_ms=90.0)
    feed(router, clock, "small", 30)
    feed(router, clock, "mini", 5, 40)  # a detected degradation
    shapes: list[dict[str, object]] = [
        {"input_tokens": 500, "max_cost": 0.001},
        {"input_tokens": 500, "max_cost": 0.001},  # the same call: templates found again
        {"input_tokens": 50_000, "max_cost": 0.001, "max_latency_ms": 100.0},
        {"input_tokens": 500, "max_tokens": 100, "strict_cost": True, "max_cost": 0.01},
        {"max_cost": 0.01},
        {"input_tokens": 500, "unavailable": {"small"}, "max_ttft_ms": 50.0},
        {},
    ]
    seen = 0
    for shape in shapes:
        d = router.get_best_model(
            WF,
            ST,
            candidates=[*CHEAP, "ghost"],
            on_no_match="relax",
            **shape,  # type: ignore[arg-type]
        )
        for row in d.candidates:
            fields = {a.name: getattr(row, a.name) for a in attrs.fields(CandidateEvaluation)}
            checked = CandidateEvaluation(**fields)
            assert row == checked and repr(row) == repr(checked)
            assert vars(row) == vars(checked)  # no attribute beyond the fields
            assert type(row.reasons) is tuple and type(row.constraints) is MappingProxyType
            seen += 1
        assert by_model(d)["ghost"].excluded  # type: ignore[attr-defined]
    assert seen == 4 * len(shapes)
    assert any("degraded" in (c.change or "") for c in d.candidates)


def test_explanations_of_calls_at_other_costs_share_no_row_state(clock: FakeClock) -> None:
    # rows of one verdict are copies of shared templates: a row over max_cost quotes its
    # own cost once, whatever the calls read before it (within the limit, over it)
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 100)
    feed(router, clock, "mini", 100)
    quoted: list[tuple[str, ...]] = []
    for tokens in (100, 5_000, 200_000, 300_000, 5_000):
        d = router.get_best_model(
            WF, ST, candidates=CHEAP, input_tokens=tokens, max_cost=0.01, on_no_match="relax"
        )
        for row in d.candidates:
            cost_reasons = [r for r in row.reasons if r.startswith("expected cost $")]
            assert len(cost_reasons) == (row.constraints["max_cost"] == "rejected")
            assert row.expected_cost_usd is not None
            if cost_reasons:
                assert f"${row.expected_cost_usd:.6f}" in cost_reasons[0]
                quoted.append(row.reasons)
    assert len(set(quoted)) >= 2  # rows over the limit at two costs at least


@pytest.mark.parametrize("varying", [None, "max_tokens", "max_cost"])
def test_a_recovered_model_regains_its_traffic_whatever_limits_each_call_gives(
    varying: str | None,
) -> None:
    # re-probes and the exploration budget count every decision of the stage, also when
    # each call gives its own max_tokens or max_cost (each such limit is a new set of
    # constraints); the bar: >= 90% of the traffic within 1,000 requests
    clock = FakeClock()
    router = make(clock)
    feed(router, clock, "nano", 300)
    feed(router, clock, "mini", 300)
    feed(router, clock, "nano", 10, 40)  # nano degrades, then is healthy again
    sizes = random.Random(3)
    picks: list[str] = []
    probes = 0
    for _ in range(1000):
        limits: dict[str, object] = {"max_tokens": 400, "max_cost": 0.01}
        if varying == "max_tokens":
            limits["max_tokens"] = sizes.randint(100, 4000)
        elif varying == "max_cost":
            limits["max_cost"] = round(sizes.uniform(0.005, 0.05), 6)
        d = router.get_best_model(
            WF,
            ST,
            candidates=["nano", "mini"],
            input_tokens=500,
            **limits,  # type: ignore[arg-type]
        )
        picks.append(d.model)
        probes += d.model == "nano" and d.exploration
        clock.advance(1.0)
        router.record_outcome(rec(clock, d.model, True))
    assert probes >= 1  # re-probed while rejected
    windows = [picks[k : k + 100].count("nano") for k in range(0, 1000, 100)]
    assert max(windows) >= 90, windows


def test_open_circuits_are_excluded(clock: FakeClock) -> None:
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 100)
    feed(router, clock, "mini", 100)
    d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=10, unavailable={"nano"})
    assert d.model == "mini"
    nano = by_model(d)["nano"]
    assert nano.excluded and nano.reasons[0] == "circuit open"  # type: ignore[attr-defined]


def test_models_missing_from_the_registry_are_excluded(clock: FakeClock) -> None:
    router = make(clock)
    feed(router, clock, "mini", 100)
    d = router.get_best_model(WF, ST, candidates=["ghost", "mini"], input_tokens=10)
    assert d.model == "mini"
    assert by_model(d)["ghost"].reasons[0] == "not in the model registry"  # type: ignore[attr-defined]


def test_reasons_never_show_an_amount_or_a_time_as_if_within_the_limit_it_exceeds(
    clock: FakeClock,
) -> None:
    # amounts too small for six decimals, values that round to their limit, and values
    # too large to print in full: each reason shows the two numbers apart, as compared
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "mini", 30, latency_ms=500.4)
    feed(router, clock, "small", 30, latency_ms=1e300)

    def said(model: str, **limits: Any) -> str:
        d = router.get_best_model(WF, ST, candidates=[model], on_no_match="relax", **limits)
        return " | ".join(by_model(d)[model].reasons)  # type: ignore[attr-defined]

    # a fresh stage, one output token: nano costs $0.0000004, over a $0.0000002 limit
    fresh = router.get_best_model(
        WF, "fresh", candidates=["nano"], input_tokens=0, max_tokens=1, max_cost=2e-7,
        on_no_match="relax",
    )  # fmt: skip
    cost = " | ".join(fresh.candidates[0].reasons)
    assert "expected cost $0.00000040 (worst_case) > max $0.00000020" in cost, cost
    assert "latency p50 500.4 ms > max 500 ms" in said("mini", max_latency_ms=500.0)
    assert "> max 0.001 ms" in said("mini", max_latency_ms=0.001)
    slow = said("small", max_latency_ms=1000.0, max_cost=0.5, input_tokens=10**18)
    assert "latency p50 1e+300 ms > max 1000 ms" in slow, slow
    assert "expected cost $1e+12 (estimate) > max $0.500000" in slow, slow


def test_a_candidate_without_a_cost_estimate_is_told_what_is_missing(clock: FakeClock) -> None:
    # an untried model in a stage without evidence: its cost needs the call's size, and
    # the reason names the part the call left out, not one it gave
    router = make(clock)

    def reason(**sizes: Any) -> str:
        d = router.get_best_model(
            WF, "fresh", candidates=["mini"], max_cost=1.0, on_no_match="mini", **sizes
        )
        (row,) = d.candidates
        assert row.constraints["max_cost"] is ConstraintStatus.UNPROVEN
        return next(r for r in row.reasons if r.startswith("cost:"))

    assert (
        reason(input_tokens=100) == "cost: no estimate (no observations, and max_tokens not given)"
    )
    assert reason(max_tokens=100) == (
        "cost: no estimate (no observations, and input_tokens not given)"
    )
    assert reason() == "cost: no estimate (no observations, and input_tokens/max_tokens not given)"


def test_a_model_missing_from_the_registry_has_no_cost_and_never_meets_max_cost(
    clock: FakeClock,
) -> None:
    # it has no price: its row must not say it costs $0 and meets the cost limit, nor a
    # pin of it claim max_cost is met
    router = make(clock)
    feed(router, clock, "mini", 100)
    feed(router, clock, "ghost", 100)
    d = router.get_best_model(WF, ST, candidates=["ghost", "mini"], input_tokens=10, max_cost=0.01)
    ghost = by_model(d)["ghost"]
    assert ghost.expected_cost_usd is None and ghost.cost_basis is None  # type: ignore[attr-defined]
    assert ghost.constraints["max_cost"] is not ConstraintStatus.ELIGIBLE  # type: ignore[attr-defined]
    assert "cost: no price (not in the model registry)" in ghost.reasons  # type: ignore[attr-defined]
    pinned = router.get_best_model(
        WF, ST, candidates=["ghost"], input_tokens=10, max_cost=0.01, on_no_match="ghost"
    )
    assert pinned.model == "ghost" and pinned.expected_cost_usd is None
    assert pinned.reason.endswith("unmet: max_cost")
    assert not pinned.constraints_met


def test_outcomes_that_say_nothing_about_health_are_not_counted(clock: FakeClock) -> None:
    router = make(clock)
    for outcome in (Outcome.IGNORED, Outcome.CANCELLED, Outcome.REJECTED):
        router.record_outcome(rec(clock, "mini", outcome=outcome))
    router.record_outcome(rec(clock, "mini", outcome=Outcome.RATE_LIMITED))
    d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=10, on_no_match="relax")
    mini = by_model(d)["mini"]
    assert mini.sample_size == 1  # type: ignore[attr-defined]
    assert mini.success_rate == 0.0  # type: ignore[attr-defined]


def test_statistics_are_per_workflow_stage(clock: FakeClock) -> None:
    router = make(clock)
    feed(router, clock, "mini", 30, stage="other")
    d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=10)
    assert by_model(d)["mini"].sample_size == 0  # type: ignore[attr-defined]


def test_same_seed_same_decisions(clock: FakeClock) -> None:
    def run(seed: int) -> list[tuple[str, bool]]:
        c = FakeClock()
        router = make(c, seed=seed, policy=RoutingPolicy(explore_rate=0.3))
        feed(router, c, "nano", 3)  # cheaper than the pick, not yet proven
        feed(router, c, "mini", 100)
        out = []
        for _ in range(200):
            d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=10, max_tokens=10)
            out.append((d.model, d.exploration))
            c.advance(1.0)
            router.record_outcome(rec(c, d.model, True))
        return out

    first = run(42)
    assert first == run(42)
    # only a model that could beat the pick (cheaper) is explored
    assert {m for m, explored in first if explored} == {"nano"}
    assert any(explored for _, explored in first)


def test_invalid_arguments_raise_configuration_error(clock: FakeClock) -> None:
    router = make(clock)
    bad: list[dict[str, object]] = [
        {"max_cost": -1.0},
        {"max_latency_ms": 0},
        {"min_success_rate": 1.5},
        {"input_tokens": -3},
        {"candidates": []},
        {"candidates": "mini"},
        {"candidates": ["mini", ""]},
        {"on_no_match": "not-a-model"},
        {"strict_cost": True, "max_cost": 0.1},  # strict without input_tokens
        {"strict_cost": "no", "max_cost": 0.1, "input_tokens": 10},  # truthy, not a bool
        {"strict_cost": None},
    ]
    for kwargs in bad:
        kwargs.setdefault("candidates", CHEAP)
        with pytest.raises(ConfigurationError):
            router.get_best_model(WF, ST, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="explore_rate"):
        RoutingPolicy(explore_rate=2.0)
    with pytest.raises(ConfigurationError, match="relax_order"):
        RoutingPolicy(relax_order=("max_cost", "nope"))
    with pytest.raises(ConfigurationError, match="rng or seed"):
        AdaptiveModelRouter(REGISTRY, seed=1, rng=__import__("random").Random(1))


# --------------------------------------------------------------------------- no match


@pytest.fixture
def all_rejected(clock: FakeClock) -> AdaptiveModelRouter:
    """Every cheap model is confidently below 0.9; 'small' is also slow."""
    router = make(clock)
    feed(router, clock, "nano", 50, 50, latency_ms=100.0)
    feed(router, clock, "mini", 70, 30, latency_ms=100.0)
    feed(router, clock, "small", 80, 20, latency_ms=900.0)
    return router


def test_no_match_raise_lists_every_model_and_its_reasons(
    all_rejected: AdaptiveModelRouter, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, "empathy_models.router"),
        pytest.raises(NoModelMeetsConstraintsError) as info_,
    ):
        all_rejected.get_best_model(
            WF, ST, candidates=CHEAP, input_tokens=10, min_success_rate=0.9, max_latency_ms=500
        )
    err = info_.value
    assert set(err.reasons) == set(CHEAP)
    assert all(err.reasons[m] for m in CHEAP)
    assert any("latency p50" in r for r in err.reasons["small"])
    assert (err.workflow, err.stage) == (WF, ST)
    assert "no candidate meets the constraints" in caplog.text


def test_no_match_relax_drops_constraints_in_the_declared_order(
    all_rejected: AdaptiveModelRouter, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "empathy_models.router"):
        d = all_rejected.get_best_model(
            WF,
            ST,
            candidates=CHEAP,
            input_tokens=10,
            min_success_rate=0.9,
            max_latency_ms=500,
            on_no_match="relax",
        )
    # latency goes first (nothing yet), then the success rate: 'nano' qualifies, on
    # latency too (unproven there since its change, so explored), which is kept after all
    assert d.relaxed == ("min_success_rate",)
    assert d.policy_applied == "relax"
    assert d.constraints_met is False
    assert d.model == "nano"
    assert "relaxed min_success_rate (judged on the rest)" in d.reason
    # the reason never claims the relaxed pick meets the constraints
    assert "unmet: min_success_rate, max_latency_ms" in d.reason
    assert "meets the constraints" not in d.reason
    assert "relax" in caplog.text


def test_relax_order_is_configurable(clock: FakeClock) -> None:
    router = make(clock, policy=RoutingPolicy(relax_order=("min_success_rate", "max_latency_ms")))
    feed(router, clock, "nano", 50, 50, latency_ms=100.0)
    feed(router, clock, "mini", 100, latency_ms=900.0)
    d = router.get_best_model(
        WF,
        ST,
        candidates=["nano", "mini"],
        input_tokens=10,
        min_success_rate=0.9,
        max_latency_ms=500,
        on_no_match="relax",
    )
    assert d.relaxed == ("min_success_rate",)
    assert d.model == "nano"  # meets latency once success is dropped


def test_relax_keeps_a_constraint_it_did_not_need_to_drop(clock: FakeClock) -> None:
    # both models are over the cost limit, only 'mini' meets the success rate: dropping
    # the success rate first (the declared order) frees no one, dropping the cost does;
    # the success rate is then kept, so the pick is the model that meets it
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 50, 50)
    feed(router, clock, "mini", 100)
    d = router.get_best_model(
        WF,
        ST,
        candidates=["nano", "mini"],
        input_tokens=1000,
        max_tokens=200,
        min_success_rate=0.9,
        max_cost=1e-4,
        on_no_match="relax",
    )
    assert d.relaxed == ("max_cost",)
    assert d.model == "mini"
    assert "relaxed max_cost " in d.reason and "min_success_rate" not in d.reason
    assert by_model(d)["mini"].constraints["min_success_rate"] is ConstraintStatus.ELIGIBLE  # type: ignore[attr-defined]


def test_no_match_pinned_model_reports_honestly(all_rejected: AdaptiveModelRouter) -> None:
    d = all_rejected.get_best_model(
        WF, ST, candidates=CHEAP, input_tokens=10, min_success_rate=0.9, on_no_match="big"
    )
    assert d.model == "big"
    assert d.policy_applied == "pinned"
    assert d.constraints_met is False  # 'big' has no evidence: not proven
    assert "big" in by_model(d)
    assert "unmet: min_success_rate" in d.reason


def test_pinned_model_behind_an_open_circuit_raises(all_rejected: AdaptiveModelRouter) -> None:
    with pytest.raises(NoModelMeetsConstraintsError, match="circuit open"):
        all_rejected.get_best_model(
            WF,
            ST,
            candidates=CHEAP,
            input_tokens=10,
            min_success_rate=0.9,
            on_no_match="mini",
            unavailable={"mini"},
        )


def test_every_circuit_open_raises_even_when_relaxing(clock: FakeClock) -> None:
    router = make(clock)
    with pytest.raises(NoModelMeetsConstraintsError) as info_:
        router.get_best_model(
            WF, ST, candidates=CHEAP, input_tokens=10, on_no_match="relax", unavailable=CHEAP
        )
    assert all(info_.value.reasons[m][0] == "circuit open" for m in CHEAP)


def test_exploration_never_breaks_the_cost_limit(clock: FakeClock) -> None:
    router = make(clock)
    # no evidence anywhere; only nano's worst case fits the budget
    limit = (1000 * 0.1e-6 + 100 * 0.4e-6) * (1 + 1e-9)
    for _ in range(50):
        d = router.get_best_model(
            WF, ST, candidates=CHEAP, input_tokens=1000, max_tokens=100, max_cost=limit
        )
        assert d.model == "nano" and d.exploration
        assert d.expected_cost_usd is not None and d.expected_cost_usd <= limit


def test_a_call_whose_max_tokens_caps_its_output_is_costed_at_the_cap(clock: FakeClock) -> None:
    # the model's answers so far were long (2,000 output tokens), but this call's
    # max_tokens caps its output at 5: its expected cost is the capped one, so a
    # max_cost that fits the cap admits it (judging it on the mean refused it)
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "mini", 100, output_tokens=2_000)
    capped = 1000 * 0.4e-6 + 5 * 1.6e-6
    d = router.get_best_model(
        WF, ST, candidates=["mini"], input_tokens=1000, max_tokens=5, max_cost=capped * 1.01
    )
    assert d.constraints_met
    assert d.expected_cost_usd == pytest.approx(capped)
    # a cap above the mean leaves the mean
    d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=1000, max_tokens=4_000)
    assert d.expected_cost_usd == pytest.approx(1000 * 0.4e-6 + 2_000 * 1.6e-6)
    # a model costed on the stage's prior (not measured yet) is capped the same way
    d = router.get_best_model(WF, ST, candidates=["nano"], input_tokens=1000, max_tokens=5)
    assert d.expected_cost_usd == pytest.approx(1000 * 0.1e-6 + 5 * 0.4e-6)


def test_a_model_costed_on_the_stage_prior_is_costed_at_most_its_longest_output(
    clock: FakeClock,
) -> None:
    # the stage's answers so far were long (20,000 output tokens, from a model that
    # writes that many), but nano writes at most 8,192: its expected cost stops there,
    # so a max_cost that fits it is met (costing it on 20,000 tokens, $0.0081, refused it)
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "mini", 100, output_tokens=20_000)
    worst = 1000 * 0.1e-6 + 8192 * 0.4e-6
    for _ in range(2):  # a new decision context, then the cached one
        d = router.get_best_model(
            WF,
            ST,
            candidates=["nano"],
            input_tokens=1000,
            max_tokens=50_000,
            max_cost=0.005,
            min_success_rate=0.0,
        )
        nano = by_model(d)["nano"]
        assert nano.cost_basis == "prior"  # type: ignore[attr-defined]
        assert nano.expected_cost_usd == pytest.approx(worst)  # type: ignore[attr-defined]
        assert nano.constraints["max_cost"] is ConstraintStatus.ELIGIBLE  # type: ignore[attr-defined]
        assert d.model == "nano" and d.constraints_met


def test_strict_cost_judges_the_worst_case(clock: FakeClock) -> None:
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 100, output_tokens=10)
    feed(router, clock, "mini", 100, output_tokens=10)
    budget = 1000 * 0.4e-6 + 10 * 1.6e-6 + 1e-9  # mini's *expected* cost fits
    kw: dict[str, object] = {
        "candidates": ["mini"],
        "input_tokens": 1000,
        "max_tokens": 4000,
        "max_cost": budget,
    }
    assert router.get_best_model(WF, ST, **kw).constraints_met  # type: ignore[arg-type]
    with pytest.raises(NoModelMeetsConstraintsError, match="worst_case"):
        router.get_best_model(WF, ST, strict_cost=True, **kw)  # type: ignore[arg-type]
    d = router.get_best_model(
        WF,
        ST,
        candidates=CHEAP,
        input_tokens=1000,
        max_tokens=4000,
        max_cost=0.01,
        strict_cost=True,
    )
    assert d.constraints_met and d.strict_cost
    assert d.expected_cost_usd == pytest.approx(1000 * 0.1e-6 + 4000 * 0.4e-6)
    assert by_model(d)["nano"].cost_basis == "worst_case"  # type: ignore[attr-defined]


def test_strict_cost_judges_no_more_output_than_the_model_writes(clock: FakeClock) -> None:
    # the executor asks each model for at most its max_output_tokens (8,192 here): a
    # larger max_tokens is never billed, so the worst case stops there
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 100, output_tokens=10)
    worst = 1000 * 0.1e-6 + 8192 * 0.4e-6
    d = router.get_best_model(
        WF,
        ST,
        candidates=["nano"],
        input_tokens=1000,
        max_tokens=50_000,
        max_cost=worst + 1e-9,
        strict_cost=True,
    )
    assert d.constraints_met and d.model == "nano"
    assert d.expected_cost_usd == pytest.approx(worst)
    # untried in a stage with no evidence, without strict cost: the same worst case
    d = router.get_best_model(
        WF, "fresh", candidates=["mini"], input_tokens=1000, max_tokens=50_000
    )
    assert by_model(d)["mini"].cost_basis == "worst_case"  # type: ignore[attr-defined]
    assert d.expected_cost_usd == pytest.approx(1000 * 0.4e-6 + 8192 * 1.6e-6)


def test_normal_decisions_are_logged_at_debug(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    router = make(clock)
    with caplog.at_level(logging.DEBUG, "empathy_models.router"):
        d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=1, max_tokens=1)
    assert f"-> {d.model}" in caplog.text and "exploration=True" in caplog.text


def test_a_degraded_model_loses_eligibility(clock: FakeClock) -> None:
    # default policy: an arm's evidence halves every 500 of its calls
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 1000)
    feed(router, clock, "mini", 400)
    d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=10, min_success_rate=0.95)
    assert d.model == "nano"
    moved_after = None
    for i in range(200):
        clock.advance(1.0)
        router.record_outcome(rec(clock, "nano", i % 2 == 0))  # now fails half the time
        d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=10, min_success_rate=0.95)
        if d.model != "nano":
            moved_after = i + 1
            break
    # 1,000 straight successes behind it, yet it is dropped within 60 of its own calls
    assert moved_after is not None and moved_after <= 60
    assert d.model == "mini"


# --------------------------------------------------------------------------- seeding


class CountingBackend(MemoryTelemetryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.evidence_calls = 0
        self.fail = False

    async def evidence(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        after_version: int = 0,
    ) -> EvidenceBatch:
        self.evidence_calls += 1
        if self.fail:
            raise TelemetryError("backend down")
        return await super().evidence(since=since, until=until, after_version=after_version)


async def store_records(store: MemoryTelemetryBackend, records: Sequence[LLMCallRecord]) -> None:
    await store.record_many(records)


async def test_start_reads_the_evidence_once(clock: FakeClock) -> None:
    store = CountingBackend()
    recs = []
    for i in range(120):
        clock.advance(1.0)
        recs.append(rec(clock, "mini", i % 40 != 0, latency_ms=200.0))
        recs.append(rec(clock, "nano", i % 2 == 0, stage="other"))
    await store.record_many(recs)
    clock.advance(1.0)
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        assert store.evidence_calls == 1
        d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=10, max_tokens=10)
        assert store.evidence_calls == 1  # decisions never read the backend
        mini = by_model(d)["mini"]
        assert mini.sample_size == 120  # type: ignore[attr-defined]
        assert mini.success_rate == pytest.approx(117 / 120)  # type: ignore[attr-defined]
        assert mini.latency_p50_ms == pytest.approx(200.0)  # type: ignore[attr-defined]
        assert by_model(d)["nano"].sample_size == 0  # type: ignore[attr-defined]  # other stage


async def test_refresh_does_not_double_count_live_outcomes(clock: FakeClock) -> None:
    store = MemoryTelemetryBackend()
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        for i in range(30):  # what an executor does: record, and tell the router
            clock.advance(1.0)
            r = rec(clock, "mini", i != 0)
            await store.record(r)
            router.record_outcome(r)

        def mini_n() -> int:
            d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=1, max_tokens=1)
            return by_model(d)["mini"].sample_size  # type: ignore[attr-defined, no-any-return]

        assert mini_n() == 30
        clock.advance(1.0)
        assert await router.refresh() is True
        assert mini_n() == 30
        # a late report of a call from before the refresh is already in the store
        late = LLMCallRecord(
            provider="openai",
            model="mini",
            outcome=Outcome.FAILURE,
            timestamp=datetime.fromtimestamp(clock() - 5.0, UTC),
            workflow=WF,
            stage=ST,
        )
        await store.record(late)
        router.record_outcome(late)
        assert mini_n() == 30
        clock.advance(1.0)
        await router.refresh()
        assert mini_n() == 31


async def test_processes_sharing_a_store_learn_from_each_other(clock: FakeClock) -> None:
    store = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0)
    async with (
        make(clock, telemetry_store=store, refresh_interval=None, policy=policy) as a,
        make(clock, telemetry_store=store, refresh_interval=None, policy=policy) as b,
    ):
        for i in range(200):
            clock.advance(1.0)
            r = rec(clock, "nano", i % 2 == 0)  # a learns nano is bad
            await store.record(r)
            a.record_outcome(r)
            r = rec(clock, "mini", True)
            await store.record(r)
            a.record_outcome(r)
        kw: dict[str, object] = {"candidates": CHEAP, "input_tokens": 10, "max_tokens": 10}
        assert a.get_best_model(WF, ST, **kw).model == "mini"  # type: ignore[arg-type]
        assert b.get_best_model(WF, ST, **kw).exploration  # type: ignore[arg-type]
        await b.refresh()
        d = b.get_best_model(WF, ST, **kw)  # type: ignore[arg-type]
        assert d.model == "mini" and not d.exploration


async def test_refresh_errors_are_logged_and_counted(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = CountingBackend()
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        feed(router, clock, "mini", 100)
        store.fail = True
        with caplog.at_level(logging.WARNING, "empathy_models.router"):
            assert await router.refresh() is False
        assert router.refresh_errors == 1
        assert "backend down" in caplog.text
        d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=1, max_tokens=1)
        assert by_model(d)["mini"].sample_size == 100  # type: ignore[attr-defined]


async def test_the_window_slides_while_the_store_cannot_be_read(clock: FakeClock) -> None:
    # an outage must not keep evidence older than the window counting
    store = CountingBackend()
    policy = RoutingPolicy(window_days=1.0)
    async with make(clock, telemetry_store=store, refresh_interval=None, policy=policy) as router:
        store.fail = True
        feed(router, clock, "mini", 0, 50)  # failures, then two days on: out of the window
        clock.advance(2 * 86400.0)
        feed(router, clock, "mini", 30)
        assert await router.refresh() is False
        d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=1, max_tokens=1)
        mini = by_model(d)["mini"]
        assert (mini.sample_size, mini.success_rate) == (30, 1.0)  # type: ignore[attr-defined]


async def test_periodic_refresh_task_is_owned_and_cancelled(clock: FakeClock) -> None:
    store = CountingBackend()
    router = make(clock, telemetry_store=store, refresh_interval=60.0, sleep=clock.sleep)
    start = clock()
    async with router:
        for _ in range(50):  # let the refresh task take a few turns
            await asyncio.sleep(0)
        assert store.evidence_calls >= 3
        assert router.last_refresh is not None and router.last_refresh >= start + 120.0
    calls = store.evidence_calls
    for _ in range(10):
        await asyncio.sleep(0)
    assert store.evidence_calls == calls  # nothing runs after aclose
    await router.aclose()  # idempotent
    with pytest.raises(NotOpenError, match="AdaptiveModelRouter is closed"):
        await router.start()


async def test_a_closed_router_refuses_to_read_its_store(clock: FakeClock, tmp_path: Path) -> None:
    # as start() does: after aclose(), refresh() and get_routing_stats() raise
    # NotOpenError naming the router, whether the store is borrowed (it read on) or
    # owned (closed with it: a refresh logged a store failure and counted it)
    store = CountingBackend()
    owned = make(clock, telemetry_store=f"sqlite:///{tmp_path / 'calls.db'}")
    for router in (make(clock, telemetry_store=store, refresh_interval=None), owned):
        async with router:
            pass
        calls = store.evidence_calls
        with pytest.raises(NotOpenError, match="AdaptiveModelRouter is closed"):
            await router.refresh()
        with pytest.raises(NotOpenError, match="AdaptiveModelRouter is closed"):
            await router.get_routing_stats(WF)
        assert store.evidence_calls == calls and router.refresh_errors == 0


async def test_a_closed_router_refuses_decisions_and_outcomes(clock: FakeClock) -> None:
    # a router without a store (never started) and one with a store: after aclose(),
    # or the end of its `async with` block, a decision or an outcome raises
    # NotOpenError saying what to do; what it held stays readable
    plain = make(clock)
    feed(plain, clock, "nano", 12, 4)
    await plain.aclose()
    entered = make(clock, telemetry_store=MemoryTelemetryBackend(), refresh_interval=None)
    async with entered:
        feed(entered, clock, "nano", 12, 4)
        entered.get_best_model(WF, ST, candidates=CHEAP, input_tokens=1, max_tokens=1)
    for router in (plain, entered):
        closed = r"AdaptiveModelRouter is closed .*aclose\(\).*build a new AdaptiveModelRouter"
        with pytest.raises(NotOpenError, match=closed):
            router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=1, max_tokens=1)
        with pytest.raises(NotOpenError, match=closed):
            router.record_outcome(rec(clock, "nano"))
        with pytest.raises(NotOpenError, match=closed):
            await router.start()
        advice = router.recommend_tier_upgrade(WF, ST)  # a report of what it held
        assert advice.failures == 4 and advice.should_upgrade


class GatedBackend(MemoryTelemetryBackend):
    """
    A store whose evidence reads (``gate_evidence``) or recent-call reads from the
    ``gate_recent``-th on wait for ``gate``; ``waiting`` is set once one waits.
    """

    def __init__(self, *, gate_evidence: bool = True, gate_recent: int | None = None) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.gate_evidence = gate_evidence
        self.gate_recent = gate_recent
        self.recent_reads = 0

    async def _wait(self) -> None:
        self.waiting.set()
        await self.gate.wait()

    async def evidence(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        after_version: int = 0,
    ) -> EvidenceBatch:
        if self.gate_evidence:
            await self._wait()
        return await super().evidence(since=since, until=until, after_version=after_version)

    async def recent(self, **kw: Any) -> list[LLMCallRecord]:
        self.recent_reads += 1
        if self.gate_recent is not None and self.recent_reads >= self.gate_recent:
            await self._wait()
        return await super().recent(**kw)


def _refresh_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "empathy-models-router-refresh"]


async def test_a_start_cancelled_while_reading_is_made_again_by_the_next_start(
    clock: FakeClock,
) -> None:
    # asyncio.wait_for(router.start(), timeout) on a slow store, then a retry: the
    # router must read its evidence and refresh, not stay "started" with nothing
    store = GatedBackend()
    await store.record_many([rec(clock, "mini", True) for _ in range(30)])
    router = make(clock, telemetry_store=store, refresh_interval=60.0, sleep=clock.sleep)
    starting = asyncio.create_task(router.start())
    await store.waiting.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    store.gate.set()
    async with router:
        assert router.last_refresh is not None
        d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=1, max_tokens=1)
        assert by_model(d)["mini"].sample_size == 30  # type: ignore[attr-defined]
        assert router.recommend_tier_upgrade(WF, ST).window == 20
        assert len(_refresh_tasks()) == 1
    assert _refresh_tasks() == []


async def test_a_start_cancelled_while_seeding_seeds_each_window_once(clock: FakeClock) -> None:
    # the tier-advice windows are read one stage at a time: a start cancelled between
    # two reads and made again holds each recent call once
    store = GatedBackend(gate_evidence=False, gate_recent=2)
    await store.record_many(
        [rec(clock, "mini", False, stage="a") for _ in range(10)]
        + [rec(clock, "mini", True, stage="b") for _ in range(10)]
    )
    router = make(clock, telemetry_store=store, refresh_interval=None)
    starting = asyncio.create_task(router.start())
    await store.waiting.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    store.gate.set()
    async with router:
        a, b, both = (router.recommend_tier_upgrade(WF, s) for s in ("a", "b", None))
    assert (a.window, a.failures) == (10, 10)
    assert (b.window, b.failures) == (10, 0)
    assert (both.window, both.failures) == (20, 10)


async def test_a_second_start_waits_for_the_first_to_read_the_evidence(clock: FakeClock) -> None:
    store = GatedBackend()
    await store.record_many([rec(clock, "mini", True) for _ in range(30)])
    router = make(clock, telemetry_store=store, refresh_interval=None)
    first = asyncio.create_task(router.start())
    await store.waiting.wait()
    second = asyncio.create_task(router.start())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not second.done()  # it would decide on no evidence
    store.gate.set()
    await asyncio.gather(first, second)
    d = router.get_best_model(WF, ST, candidates=["mini"], input_tokens=1, max_tokens=1)
    assert by_model(d)["mini"].sample_size == 30  # type: ignore[attr-defined]
    await router.aclose()


async def test_a_router_closed_while_it_starts_leaves_no_refresh_running(
    clock: FakeClock,
) -> None:
    store = GatedBackend()
    router = make(clock, telemetry_store=store, refresh_interval=60.0, sleep=clock.sleep)
    starting = asyncio.create_task(router.start())
    await store.waiting.wait()
    await router.aclose()
    store.gate.set()
    with pytest.raises(NotOpenError, match=r"closed \(aclose\(\)\) while this start was under"):
        await starting
    assert _refresh_tasks() == []


async def test_an_owned_store_that_cannot_be_opened_fails_every_start(
    clock: FakeClock, tmp_path: Path
) -> None:
    router = make(clock, telemetry_store=f"sqlite:///{tmp_path / 'missing' / 'calls.db'}")
    for _ in range(2):  # the second start is no silent success over an unopened store
        with pytest.raises(TelemetryError, match="does not exist"):
            await router.start()
    await router.aclose()


async def test_router_owns_a_store_built_from_a_url(clock: FakeClock) -> None:
    async with make(clock, telemetry_store="memory://") as router:
        stats = (await router.get_routing_stats(WF)).to_dict()
        assert stats["telemetry"] == "none"


def test_unstarted_router_with_a_store_warns_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    router = make(clock, telemetry_store=MemoryTelemetryBackend())
    with (
        caplog.at_level(logging.WARNING, "empathy_models.router"),
        pytest.warns(ConfigurationWarning, match="use `async with router:`") as given,
    ):
        router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=1, max_tokens=1)
        router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=1, max_tokens=1)
    assert caplog.text.count("was not started") == 1
    # seen without logging set up, at the caller's line
    assert len(given) == 1 and given[0].filename == __file__


# --------------------------------------------------------------------------- stats


STATS_KEYS = {
    "workflow",
    "stage",
    "days_analyzed",
    "models_used",
    "performance_by_model",
    "total_calls",
    "avg_cost",
    "avg_success_rate",
    "telemetry",
    "message",
}


async def test_stats_without_a_store_say_so(clock: FakeClock) -> None:
    stats = (await make(clock).get_routing_stats(WF)).to_dict()
    assert set(stats) == STATS_KEYS
    assert stats["telemetry"] == "none" and "no telemetry store" in stats["message"]
    assert stats["stage"] == "all" and stats["models_used"] == [] and stats["total_calls"] == 0
    null = (
        await make(clock, telemetry_store=NullTelemetryBackend()).get_routing_stats(WF)
    ).to_dict()
    assert null["telemetry"] == "none" and "null" in null["message"]


async def test_stats_when_nothing_was_ever_recorded(clock: FakeClock) -> None:
    async with make(clock, telemetry_store=MemoryTelemetryBackend()) as router:
        stats = (await router.get_routing_stats(WF, ST, days=3)).to_dict()
    assert set(stats) == STATS_KEYS
    assert stats["telemetry"] == "none"
    assert "no telemetry has ever been recorded" in stats["message"]
    assert (stats["stage"], stats["days_analyzed"]) == (ST, 3)


async def test_stats_report_per_model_with_bounds_and_warnings(clock: FakeClock) -> None:
    store = MemoryTelemetryBackend()
    recs = []
    for i in range(100):
        clock.advance(1.0)
        recs.append(rec(clock, "mini", i % 10 != 0, latency_ms=100.0 + i))
    for _ in range(5):
        clock.advance(1.0)
        recs.append(rec(clock, "nano", True, stage="other"))
    recs.append(rec(clock, "big", True, workflow="elsewhere"))
    await store.record_many(recs)
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        everything = (await router.get_routing_stats(WF)).to_dict()
        one = (await router.get_routing_stats(WF, ST)).to_dict()
        empty = (await router.get_routing_stats("unknown-workflow")).to_dict()
    assert set(everything) == STATS_KEYS
    assert everything["telemetry"] == "ok" and everything["message"] is None
    assert everything["models_used"] == ["mini", "nano"]
    assert everything["total_calls"] == 105
    assert everything["avg_success_rate"] == pytest.approx(95 / 105)
    mini = everything["performance_by_model"]["mini"]
    assert mini["calls"] == 100 and mini["success_rate"] == pytest.approx(0.9)
    assert mini["success_rate_lower"] == pytest.approx(0.826, abs=1e-3)
    assert mini["success_rate_upper"] == pytest.approx(0.945, abs=1e-3)
    assert mini["sample_size_warning"] is None
    assert mini["p50"] is not None and mini["p95"] is not None and mini["p95"] > mini["p50"]
    nano = everything["performance_by_model"]["nano"]
    assert nano["sample_size_warning"] is not None and "only 5 calls" in nano["sample_size_warning"]
    assert one["models_used"] == ["mini"] and one["stage"] == ST
    assert set(empty) == STATS_KEYS
    assert empty["telemetry"] == "ok" and "no calls recorded" in empty["message"]


async def test_stats_give_the_registry_tier_of_a_model_whose_calls_carry_none(
    clock: FakeClock,
) -> None:
    # calls recorded without a tier (record_outcome's own records, another writer) showed
    # tier None in the stats, "-" in `routing stats`, while tier advice took the
    # registry's; the tier a call was recorded with still wins
    store = MemoryTelemetryBackend()
    await store.record_many(
        [
            rec(clock, "mini", True),
            rec(clock, "nano", True, tier=ModelTier.PREMIUM),
            attrs.evolve(rec(clock, "mini", True), model="gone"),
        ]
    )
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        stats = await router.get_routing_stats(WF, ST)
    tiers = {m: s.tier for m, s in stats.performance_by_model.items()}
    assert tiers == {"mini": "cheap", "nano": "premium", "gone": None}


async def test_stats_warnings_name_the_confidence_of_the_bounds_they_quote(
    clock: FakeClock,
) -> None:
    # the bounds are at the policy's z: a warning quoting them names that confidence
    store = MemoryTelemetryBackend()
    await store.record_many([rec(clock, "mini", True), rec(clock, "nano", True)])
    await store.record_many([rec(clock, "nano", i != 0) for i in range(5)])
    policies = {"95%": RoutingPolicy(), "99%": RoutingPolicy(z=2.576)}
    for confidence, policy in policies.items():
        async with make(clock, telemetry_store=store, policy=policy) as router:
            stats = await router.get_routing_stats(WF, ST)
        mini = stats.performance_by_model["mini"]
        nano = stats.performance_by_model["nano"]
        lo, hi = wilson_interval(1, 1, policy.z)
        assert (mini.success_rate_lower, mini.success_rate_upper) == (lo, hi)
        assert mini.sample_size_warning == (
            f"only 1 call: the success rate is known only to within {lo:.2f}-{hi:.2f} "
            f"({confidence})"
        )
        assert nano.sample_size_warning is not None
        assert nano.sample_size_warning.startswith("only 6 calls:")
        assert nano.sample_size_warning.endswith(f"({confidence})")


# --------------------------------------------------------------------------- tier advice


def test_tier_upgrade_needs_ten_calls(clock: FakeClock) -> None:
    router = make(clock)
    feed(router, clock, "nano", 0, 9)
    advice = router.recommend_tier_upgrade(WF, ST)
    assert isinstance(advice, TierRecommendation)
    assert not advice.should_upgrade and "Insufficient data" in advice.reason
    assert advice.window == 9


@pytest.mark.parametrize(
    ("failures", "calls", "upgrade"),
    [(4, 20, False), (5, 20, True), (3, 12, True), (2, 10, False), (3, 10, True)],
)
def test_tier_upgrade_threshold_is_strictly_above_twenty_percent(
    clock: FakeClock, failures: int, calls: int, upgrade: bool
) -> None:
    router = make(clock)
    feed(router, clock, "nano", calls - failures, failures)
    advice = router.recommend_tier_upgrade(WF, ST)
    assert advice.should_upgrade is upgrade
    assert advice.failure_rate == pytest.approx(failures / calls)
    should, reason = advice  # unpacks as a (should_upgrade, reason) tuple
    assert should is upgrade and reason == advice.reason
    if upgrade:
        assert advice.current_tiers == (ModelTier.CHEAP,)
        assert advice.suggested_tier is ModelTier.CAPABLE
        assert "move from cheap to capable" in advice.reason


def test_tier_upgrade_looks_at_the_most_recent_twenty(clock: FakeClock) -> None:
    router = make(clock)
    feed(router, clock, "nano", 0, 15)  # old failures
    feed(router, clock, "nano", 20)  # recent successes
    advice = router.recommend_tier_upgrade(WF, ST)
    assert advice.window == 20 and advice.failures == 0 and not advice.should_upgrade


def test_tier_upgrade_names_the_worst_model_and_the_top_tier(clock: FakeClock) -> None:
    router = make(clock)
    feed(router, clock, "big", 5, 15)
    advice = router.recommend_tier_upgrade(WF, ST)
    assert advice.failure_rate == pytest.approx(0.75)
    assert advice.should_upgrade is False and advice.suggested_tier is None
    assert "already at the top tier" in advice.reason
    mixed = make(clock)
    feed(mixed, clock, "nano", 2, 8)
    feed(mixed, clock, "mid", 10)
    advice = mixed.recommend_tier_upgrade(WF, ST)
    assert advice.by_model == {"nano": (8, 10), "mid": (0, 10)}
    assert advice.current_tiers == (ModelTier.CHEAP, ModelTier.CAPABLE)
    assert advice.suggested_tier is ModelTier.PREMIUM and "worst model nano" in advice.reason
    every_stage = mixed.recommend_tier_upgrade(WF, None)
    assert every_stage.window == 20


async def test_tier_upgrade_ring_is_seeded_from_the_store(clock: FakeClock) -> None:
    store = MemoryTelemetryBackend()
    recs = []
    for i in range(20):
        clock.advance(1.0)
        recs.append(rec(clock, "nano", i % 2 == 0))
    await store.record_many(recs)
    clock.advance(1.0)
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        advice = router.recommend_tier_upgrade(WF, ST)
    assert advice.window == 20 and advice.failures == 10 and advice.should_upgrade


def test_a_limit_of_negative_zero_is_zero(clock: FakeClock) -> None:
    # -0.0 (a budget's remainder, 0.0 * -1) passed the checks as it came: a reason read
    # "> max $-0.000000" and the decision carried max_cost=-0.0 and min_success_rate=-0.0
    router = make(clock, policy=RoutingPolicy(explore_rate=0.0))
    feed(router, clock, "nano", 40)
    d = router.get_best_model(
        WF,
        ST,
        candidates=["nano"],
        input_tokens=500,
        max_tokens=100,
        max_cost=-0.0,
        min_success_rate=-0.0,
        on_no_match="nano",
    )
    assert (d.max_cost, d.min_success_rate) == (0.0, 0.0)
    assert math.copysign(1.0, d.max_cost) == math.copysign(1.0, d.min_success_rate) == 1.0  # type: ignore[arg-type]
    [reason] = by_model(d)["nano"].reasons  # type: ignore[attr-defined]
    assert reason.endswith("> max $0.000000"), reason
    out = d.to_dict()
    assert repr((out["max_cost"], out["min_success_rate"])) == "(0.0, 0.0)"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(
        st.tuples(st.sampled_from(CHEAP), st.booleans(), st.integers(1, 3000)),
        max_size=150,
    ),
    input_tokens=st.integers(0, 50_000),
    max_tokens=st.integers(1, 8000),
    max_cost=st.floats(0.0, 0.05),
    strict=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_a_decision_that_claims_constraints_met_never_exceeds_max_cost(
    history: list[tuple[str, bool, int]],
    input_tokens: int,
    max_tokens: int,
    max_cost: float,
    strict: bool,
    seed: int,
) -> None:
    clock = FakeClock()
    router = make(clock, seed=seed, policy=RoutingPolicy(explore_rate=0.2))
    for model, ok, out in history:
        clock.advance(1.0)
        router.record_outcome(rec(clock, model, ok, output_tokens=out))
    try:
        d = router.get_best_model(
            WF,
            ST,
            candidates=CHEAP,
            input_tokens=input_tokens,
            max_tokens=max_tokens,
            max_cost=max_cost,
            min_success_rate=0.5,
            strict_cost=strict,
        )
    except NoModelMeetsConstraintsError:
        return
    # every pick (exploration included) stays within the budget as estimated
    assert d.expected_cost_usd is not None and d.expected_cost_usd <= max_cost
    if d.constraints_met and strict:
        worst = REGISTRY.get(d.model).cost(input_tokens, max_tokens)
        assert worst <= max_cost * (1 + 1e-9)


async def test_a_quiet_stage_is_seeded_even_next_to_a_busy_one(clock: FakeClock) -> None:
    # each stage's window is seeded on its own, so a busy stage cannot push a quiet
    # one out of it
    store = MemoryTelemetryBackend()
    quiet = []
    for i in range(12):
        clock.advance(1.0)
        quiet.append(rec(clock, "nano", i % 2 == 0, stage="quiet"))
    await store.record_many(quiet)
    busy = []
    for _ in range(3000):
        clock.advance(0.01)
        busy.append(rec(clock, "mini", True, stage="busy"))
    await store.record_many(busy)
    clock.advance(1.0)
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        advice = router.recommend_tier_upgrade(WF, "quiet")
        everything = router.recommend_tier_upgrade(WF, None)
        clock.advance(1.0)
        router.record_outcome(rec(clock, "nano", False, stage="quiet"))  # a live report
        after = router.recommend_tier_upgrade(WF, "quiet")
    assert (advice.window, advice.failures, advice.should_upgrade) == (12, 6, True)
    assert everything.window == 20 and everything.failures == 0  # the newest 20: busy
    assert (after.window, after.failures) == (13, 7)


async def test_a_workflow_window_is_the_newest_of_its_stages_interleaved(
    clock: FakeClock,
) -> None:
    # the workflow's window (stage=None) at start is built from its stages' own windows
    # (no query over every stage): the newest 20 of both, interleaved in time
    store = MemoryTelemetryBackend()
    recs = []
    for i in range(40):
        clock.advance(1.0)
        recs.append(rec(clock, "nano", i % 2 == 1, stage="a" if i % 2 else "b"))
    await store.record_many(recs)
    clock.advance(1.0)
    async with make(clock, telemetry_store=store, refresh_interval=None) as router:
        everything = router.recommend_tier_upgrade(WF, None)
        only_b = router.recommend_tier_upgrade(WF, "b")
    assert (everything.window, everything.failures) == (20, 10)
    assert (only_b.window, only_b.failures) == (20, 20)


async def test_stats_over_a_window_longer_than_a_datetime_can_hold(
    clock: FakeClock, tmp_path: Path
) -> None:
    # days=1e9 is a finite, positive window: it covers all of history rather than
    # failing with an OverflowError from the datetime arithmetic
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as store:
        await store.record_many([rec(clock, "mini", True), rec(clock, "mini", False)])
        async with make(clock, telemetry_store=store, refresh_interval=None) as router:
            stats = (await router.get_routing_stats(WF, days=1e9)).to_dict()
    assert set(stats) == STATS_KEYS
    assert stats["telemetry"] == "ok" and stats["total_calls"] == 2
    assert stats["performance_by_model"]["mini"]["successes"] == 1


def test_exploring_without_any_cost_estimate_does_not_claim_the_cheapest() -> None:
    # No history and no token counts: no candidate has an expected cost, so the
    # exploration pick is not "the cheapest" (here it is not: nano costs far less)
    registry = ModelRegistry.default()
    router = AdaptiveModelRouter(registry, seed=0)
    names = ["gpt-4.1-nano", "claude-haiku-4-5"]
    decision = router.get_best_model(WF, ST, candidates=names)
    assert decision.exploration and not decision.constraints_met
    assert all(c.expected_cost_usd is None for c in decision.candidates)
    assert "cheapest" not in decision.reason, decision.reason
    assert "no cost estimate" in decision.reason
    # with token counts the costs are known: exploration goes to the cheapest candidate
    # a draw from its evidence finds compliant, so the cheaper one is tried more often
    picks = [
        router.get_best_model(WF, ST, candidates=names, input_tokens=100, max_tokens=100)
        for _ in range(200)
    ]
    assert all("cheapest" in d.reason and d.expected_cost_usd is not None for d in picks)
    nano = sum(d.model == "gpt-4.1-nano" for d in picks)
    assert nano > 100, nano


async def test_a_window_longer_than_a_datetime_can_hold_seeds_from_all_history(
    clock: FakeClock, tmp_path: Path
) -> None:
    # window_days=1e6 passes RoutingPolicy's checks; starting the router must not fail
    # with "year out of range", nor must a refresh fail and leave the router blind
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as store:
        await store.record_many([rec(clock, "mini", True) for _ in range(12)])
        clock.advance(60.0)
        router = make(
            clock,
            telemetry_store=store,
            refresh_interval=None,
            policy=RoutingPolicy(window_days=1e6),
        )
        async with router:
            assert router.refresh_errors == 0
            assert await router.refresh()
            decision = router.get_best_model(WF, ST, candidates=["mini"])
            assert by_model(decision)["mini"].sample_size == 12  # type: ignore[attr-defined]
            assert router.recommend_tier_upgrade(WF, ST).window == 12


def test_exploring_because_nothing_is_proven_is_logged_once_per_stage(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing meets min_success_rate and on_no_match="raise", yet a model comes back
    # (an unproven one, to learn about it): the decision says so, and so does the log.
    router = make(clock)
    with caplog.at_level(logging.WARNING, "empathy_models.router"):
        for _ in range(3):
            d = router.get_best_model(WF, ST, candidates=CHEAP, input_tokens=500, max_tokens=9)
            assert d.exploration and not d.constraints_met
        router.get_best_model(WF, "other", candidates=CHEAP, input_tokens=500, max_tokens=9)
    lines = [r.getMessage() for r in caplog.records if "no model is proven" in r.getMessage()]
    assert len(lines) == 2, lines
    assert f"{WF}/{ST}" in lines[0] and f"{WF}/other" in lines[1]
    assert "constraints_met=False" in lines[0]


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("odd", ["caf\udce9", "n\x00ul"], ids=["lone-surrogate", "nul"])
async def test_a_name_no_store_keeps_as_given_is_refused_as_execution_context_refuses_it(
    clock: FakeClock, tmp_path: Path, odd: str
) -> None:
    # a store keeps such a workflow or stage escaped (SQLite a lone surrogate,
    # PostgreSQL a NUL too), so what the router learned of it live would vanish at the
    # next refresh: the router refuses it as ExecutionContext does
    async with (
        SQLiteTelemetryBackend(tmp_path / "calls.db") as store,
        make(clock, telemetry_store=store, refresh_interval=None) as router,
    ):
        for workflow, stage, field in ((odd, ST, "workflow"), (WF, odd, "stage")):
            call = rec(clock, "nano", workflow=workflow, stage=stage)
            with pytest.raises(ConfigurationError, match=f"^{field} must"):
                router.record_outcome(call)
            with pytest.raises(ConfigurationError, match=f"^{field} must"):
                router.get_best_model(workflow, stage, candidates=CHEAP)
            with pytest.raises(ConfigurationError, match=f"^{field} must"):
                router.recommend_tier_upgrade(workflow, stage)
            with pytest.raises(ConfigurationError, match=f"^{field} must"):
                await router.get_routing_stats(workflow, stage)
        # any other text is kept as given: learned live and after a refresh alike
        name = "wf-\U0001f600-\u00fc"
        for _ in range(12):
            clock.advance(1.0)
            call = rec(clock, "nano", workflow=name, stage=name)
            await store.record(call)
            router.record_outcome(call)
        sizes = [by_model(router.get_best_model(name, name, candidates=CHEAP))["nano"]]
        assert await router.refresh()
        sizes.append(by_model(router.get_best_model(name, name, candidates=CHEAP))["nano"])
    assert [s.sample_size for s in sizes] == [12, 12]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("workflow", "stage", "where"),
    [
        ("review", "draft", "review/draft"),
        ("code\nreview", "draft", "'code\\nreview'/draft"),
        ("a/b", "c", "'a/b'/c"),
        ("review", " draft", "review/' draft'"),
    ],
)
def test_tier_advice_names_odd_workflows_and_stages_quoted_on_one_line(
    clock: FakeClock, workflow: str, stage: str, where: str
) -> None:
    router = make(clock)
    feed(router, clock, "nano", 2, 8, workflow=workflow, stage=stage)
    advice = router.recommend_tier_upgrade(workflow, stage)
    assert advice.should_upgrade
    assert advice.reason.startswith(f"High failure rate for {where}: 80.0%"), advice.reason
    assert "\n" not in advice.reason


def test_tier_advice_names_an_odd_model_quoted(clock: FakeClock) -> None:
    registry = ModelRegistry(models=(info("nano\n2", "cheap", 0.1, 0.4),), price_version="t")
    router = AdaptiveModelRouter(registry, clock=clock)
    feed(router, clock, "nano\n2", 2, 8)
    advice = router.recommend_tier_upgrade(WF, ST)
    assert "worst model 'nano\\n2'" in advice.reason and "\n" not in advice.reason
