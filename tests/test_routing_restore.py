"""
Evidence restored after a change proves a constraint only as its parts do.

The buckets below are a 0.93 model's own history in a seeded run of the routing-quality
benchmark: a lucky start (296 of 309), an unlucky stretch read as a degradation, then a
good stretch read as a return to the start, whose evidence is restored.  Pooled, the
restored and the new evidence clear a 0.95 lower bound; neither does by itself, so the
model must stay unproven (it was routed to as ELIGIBLE for 500 requests before).
"""

from __future__ import annotations

from datetime import UTC, datetime

from empathy_models import (
    AdaptiveModelRouter,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RoutingPolicy,
)
from empathy_models.records import ConstraintStatus
from tests._fakes import spread_calls

WF, ST = "wf", "stage"
T0 = 1_800_000_000.0  # a minute boundary
# (minute, calls, successes)
HISTORY = [
    (0, 20, 19),
    (1, 4, 3),
    (2, 18, 18),
    (3, 40, 40),
    (4, 50, 49),
    (5, 55, 54),
    (6, 59, 57),
    (7, 58, 52),
    (8, 5, 3),
    (30, 1, 1),
    (33, 8, 6),
    (38, 1, 1),
    (39, 1, 1),
    (40, 1, 1),
    (41, 12, 12),
    (42, 27, 26),
]

REGISTRY = ModelRegistry(
    models=(
        ModelInfo(
            id="near",
            provider="openai",
            tier="cheap",
            input_price_per_mtok=0.5,
            output_price_per_mtok=1.5,
            context_window=128_000,
            max_output_tokens=8192,
        ),
    ),
    price_version="test-restore",
)


def _records() -> list[LLMCallRecord]:
    out = []
    for minute, calls, successes in HISTORY:
        failures = calls - successes
        for i in range(calls):
            # exactly ``failures`` of the minute's calls fail, spread evenly
            failed = (i + 1) * failures // calls > i * failures // calls
            out.append(
                LLMCallRecord(
                    workflow=WF,
                    stage=ST,
                    model="near",
                    provider="openai",
                    outcome=Outcome.FAILURE if failed else Outcome.SUCCESS,
                    latency_ms=300.0,
                    input_tokens=500,
                    output_tokens=300,
                    cost_usd=0.0007,
                    timestamp=datetime.fromtimestamp(T0 + minute * 60 + i * 60 / calls, UTC),
                )
            )
    return out


def test_a_restored_lucky_stretch_does_not_prove_a_model_that_neither_part_proves() -> None:
    records = _records()
    assert sum(r.outcome is Outcome.SUCCESS for r in records) == sum(s for _, _, s in HISTORY)
    router = AdaptiveModelRouter(REGISTRY, seed=1, clock=lambda: T0 + 43 * 60)
    for record in records:
        router.record_outcome(record)
    decision = router.get_best_model(WF, ST, candidates=["near"], min_success_rate=0.95)
    (candidate,) = decision.candidates
    # the change test read the history as a degradation and a return, and restored
    assert candidate.change is not None and "restored" in candidate.change, candidate.change
    assert candidate.success_rate_lower is not None and candidate.success_rate_lower >= 0.95
    assert candidate.constraints["min_success_rate"] is ConstraintStatus.UNPROVEN
    assert not decision.constraints_met
    assert any("neither part does by itself" in r for r in candidate.reasons), candidate.reasons


def _calls(model: str, calls: int, successes: int, start: float) -> list[LLMCallRecord]:
    return spread_calls(model, calls, successes, start, WF, ST)


def test_a_candidate_sitting_at_the_limit_after_its_warm_up_is_rarely_explored() -> None:
    # Nothing is proven: "cheap" has 600 calls at exactly the limit (a draw from its
    # evidence clears 0.95 about half the time, but it could not be proven within
    # another warm-up), "dear" 30 successes in 30 (not yet proven, but provable soon).
    # Exploring "cheap" spends calls that prove nothing; "dear" gets them.
    registry = ModelRegistry(
        models=tuple(
            ModelInfo(
                id=model,
                provider="openai",
                tier="cheap",
                input_price_per_mtok=price,
                output_price_per_mtok=price * 3,
                context_window=128_000,
                max_output_tokens=8192,
            )
            for model, price in (("cheap", 0.5), ("dear", 1.0))
        ),
        price_version="test-provable",
    )
    router = AdaptiveModelRouter(registry, seed=3, clock=lambda: T0 + 3600)
    for record in [*_calls("cheap", 600, 570, T0), *_calls("dear", 30, 30, T0 + 600)]:
        router.record_outcome(record)
    picks = [
        router.get_best_model(WF, ST, input_tokens=500, max_tokens=300, min_success_rate=0.95)
        for _ in range(2000)
    ]
    assert all(d.exploration and not d.constraints_met for d in picks)
    cheap = sum(d.model == "cheap" for d in picks) / len(picks)
    # a plain draw would give "cheap" about half (top-two sampling included)
    assert cheap < 0.2, cheap


def test_no_warm_up_at_all_still_explores_an_untried_candidate() -> None:
    # warmup_calls=0 and warmup_min_calls=0: the provability margin has no calls to
    # count from for a candidate never called; it is drawn as plausible, not divided by 0
    registry = ModelRegistry(
        models=(
            ModelInfo(
                id="new",
                provider="openai",
                tier="cheap",
                input_price_per_mtok=0.5,
                output_price_per_mtok=1.5,
                context_window=128_000,
                max_output_tokens=8192,
            ),
        ),
        price_version="test-no-warm-up",
    )
    router = AdaptiveModelRouter(
        registry,
        seed=1,
        policy=RoutingPolicy(warmup_calls=0, warmup_min_calls=0),
    )
    decision = router.get_best_model(WF, ST, min_success_rate=0.95)
    assert decision.model == "new" and decision.exploration
