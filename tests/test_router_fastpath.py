"""
The router's cached decision path against its reference path and a rebuilt router.

`AdaptiveModelRouter.get_best_model` answers from per-candidate verdicts it caches
between decisions and builds a decision's ``candidates`` only when they are read.
These tests hold that to the uncached computation: the same picks with the same random
draws, the same candidates, and no stale verdict after an arm changes.
"""

from __future__ import annotations

import gc
import random
import weakref
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    ConfigurationError,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    NoModelMeetsConstraintsError,
    Outcome,
    RoutingDecision,
    RoutingPolicy,
)
from empathy_models.testing.clock import FakeClock

WF = "docs"


def _registry(n: int, rng: random.Random) -> ModelRegistry:
    return ModelRegistry(
        models=tuple(
            ModelInfo(
                id=f"m{i}",
                provider="openai",
                tier="capable",
                # a few shared prices, so near-ties (Thompson draws) happen
                input_price_per_mtok=rng.choice([1.0, 2.0, 2.05, round(rng.uniform(0.1, 15), 3)]),
                output_price_per_mtok=rng.choice([4.0, 8.0, round(rng.uniform(0.4, 75), 3)]),
                context_window=100_000,
                max_output_tokens=rng.choice([1_000, 8_192]),
            )
            for i in range(n)
        ),
        price_version="fastpath",
    )


def _record(clock: FakeClock, rng: random.Random, model: str, stage: str) -> LLMCallRecord:
    ok = rng.random() < 0.85
    return LLMCallRecord(
        provider="openai",
        model=model,
        outcome=Outcome.SUCCESS if ok else rng.choice([Outcome.FAILURE, Outcome.RATE_LIMITED]),
        timestamp=datetime.fromtimestamp(clock(), UTC),
        workflow=WF,
        stage=stage,
        latency_ms=rng.lognormvariate(6.0, 0.5),
        input_tokens=rng.randint(10, 2_000),
        output_tokens=rng.randint(1, 800),
        cost_usd=rng.uniform(0.0, 0.01),
    )


def _options(rng: random.Random, ids: list[str], menu: list[list[str]]) -> dict[str, Any]:
    # mostly a few recurring candidate lists, as an application has, so that cached
    # verdicts are reused after the arms behind them changed
    candidates = list(rng.choice(menu)) if rng.random() < 0.8 else rng.sample(ids, len(ids))
    if rng.random() < 0.1:
        candidates.append(candidates[0])  # duplicates are ignored
    opts: dict[str, Any] = {
        "candidates": candidates if rng.random() < 0.9 else None,
        "input_tokens": rng.choice([None, 0, 300, 5_000]),
        "max_tokens": rng.choice([None, 100, 900]),
        "max_cost": rng.choice([None, 0.0005, 0.002, 0.02, 1.0]),
        "max_latency_ms": rng.choice([None, 200.0, 1_000.0, 5_000.0]),
        "min_success_rate": rng.choice([None, 0.5, 0.8, 0.95]),
        "on_no_match": rng.choice(["raise", "relax", "relax", candidates[0]]),
        "unavailable": rng.choice([(), (), (), (), frozenset(candidates[:1]), set(ids[:2])]),
        "strict_cost": rng.random() < 0.15,
    }
    if opts["strict_cost"] and opts["max_cost"] is not None and opts["input_tokens"] is None:
        opts["input_tokens"] = 700
    return opts


def _outcome(router: AdaptiveModelRouter, stage: str | None, opts: dict[str, Any]) -> object:
    try:
        return router.get_best_model(WF, stage, **opts).to_dict()
    except NoModelMeetsConstraintsError as exc:
        return ("no match", str(exc), exc.reasons)
    except ConfigurationError as exc:
        return ("configuration", str(exc))


@pytest.mark.parametrize("scenario", range(12))
def test_cached_path_makes_the_reference_decisions_with_the_same_draws(scenario: int) -> None:
    # Two routers see the same outcomes and the same seed; one takes the reference path
    # (every candidate evaluated afresh) for every decision.  Their decisions, including
    # the candidates and every random pick, must be identical all along.
    rng = random.Random(scenario)
    registry = _registry(rng.choice([1, 3, 6, 12]), rng)
    ids = [m.id for m in registry.models] + ["not-registered"]
    policy = RoutingPolicy(
        objective=rng.choice(["cheapest", "most_reliable"]),
        explore_rate=rng.choice([0.0, 0.05, 0.3]),
        half_life_s=rng.choice([None, 86_400.0, 600.0]),
        half_life_calls=rng.choice([None, 500.0, 20.0]),
    )
    clock = FakeClock()
    fast = AdaptiveModelRouter(registry, seed=scenario, clock=clock, policy=policy)
    reference = AdaptiveModelRouter(registry, seed=scenario, clock=clock, policy=policy)
    reference._fast = False
    menu = [ids, ids[:-1], rng.sample(ids, max(1, len(ids) // 2))]
    fast_decisions = 0
    for _ in range(300):
        clock.advance(rng.choice([0.0, 0.0, 0.5, 10.0, 400.0]))
        if rng.random() < 0.5:
            record = _record(clock, rng, rng.choice(ids), rng.choice(["a", "b"]))
            fast.record_outcome(record)
            reference.record_outcome(record)
            continue
        stage = rng.choice(["a", "b", None])
        opts = _options(rng, ids, menu)
        got = _outcome(fast, stage, opts)
        assert got == _outcome(reference, stage, opts)
        fast_decisions += isinstance(got, dict) and got["policy_applied"] is None
    assert fast_decisions > 0  # the cached path was exercised, not only the fallbacks


def _fed_router(
    registry: ModelRegistry, records: list[LLMCallRecord], now: float
) -> tuple[AdaptiveModelRouter, FakeClock]:
    """
    A new router told of ``records`` when they happened, with its clock at ``now``.

    Without a time half-life, so that summaries do not depend on when they were
    computed (the router reuses an arm's summary while its weights moved < 0.3%).
    """
    clock = FakeClock()
    router = AdaptiveModelRouter(
        registry, seed=3, clock=clock, policy=RoutingPolicy(explore_rate=0.0, half_life_s=None)
    )
    for record in records:  # an outcome's weight ages from when it was reported
        clock.set(record.timestamp.timestamp())
        router.record_outcome(record)
    clock.set(now)
    return router, clock


def test_lazy_candidates_equal_a_fresh_evaluation_after_an_arm_changes() -> None:
    rng = random.Random(11)
    registry = _registry(8, rng)
    ids = [m.id for m in registry.models]
    clock = FakeClock()
    records = []
    for i in range(400):
        clock.advance(1.0)
        records.append(_record(clock, rng, ids[i % len(ids)], "a"))
    router, clock = _fed_router(registry, records, clock())
    opts: dict[str, Any] = {
        "candidates": ids,
        "input_tokens": 800,
        "max_tokens": 300,
        "max_cost": 0.02,
        "max_latency_ms": 2_000.0,
        "min_success_rate": 0.7,
        "on_no_match": "relax",
    }
    before = router.get_best_model(WF, "a", **opts)
    assert before.policy_applied is None  # decided on the cached path
    expected_before = _fed_router(registry, records, clock())[0].get_best_model(WF, "a", **opts)
    # the chosen arm changes: a run of failures, reported live
    for _ in range(30):
        clock.advance(1.0)
        failure = attrs.evolve(_record(clock, rng, before.model, "a"), outcome=Outcome.FAILURE)
        records.append(failure)
        router.record_outcome(failure)
    after = router.get_best_model(WF, "a", **opts)
    rebuilt = _fed_router(registry, records, clock())[0].get_best_model(WF, "a", **opts)
    assert after.candidates == rebuilt.candidates
    assert after == rebuilt  # model, reason, cost, constraints_met, decided_at ...
    old = {c.model: c for c in before.candidates}[before.model]
    new = {c.model: c for c in after.candidates}[before.model]
    assert new.sample_size == old.sample_size + 30
    assert new.success_rate is not None and old.success_rate is not None
    assert new.success_rate < old.success_rate
    # the earlier decision's candidates, read only now, are as they were when it was made
    assert before.candidates == expected_before.candidates
    assert before == expected_before


def test_a_lazily_built_decision_behaves_like_a_constructed_one() -> None:
    rng = random.Random(5)
    registry = _registry(4, rng)
    clock = FakeClock()
    router, _ = _fed_router(
        registry, [_record(clock, rng, f"m{i % 4}", "a") for i in range(200)], clock()
    )
    opts: dict[str, Any] = {"input_tokens": 100, "max_tokens": 50, "min_success_rate": 0.5}
    lazy = router.get_best_model(WF, "a", **opts)
    twin = router.get_best_model(WF, "a", **opts)  # equal, and not materialized yet either
    assert lazy == twin
    assert RoutingDecision.from_dict(lazy.to_dict()) == lazy
    assert len(lazy.candidates) == 4 and "candidates=(CandidateEvaluation(" in repr(lazy)
    assert attrs.evolve(lazy, reason="x").candidates == lazy.candidates
    assert "_candidates_thunk" not in lazy.to_dict()
    with pytest.raises(AttributeError):
        lazy.candidates = ()  # type: ignore[misc]  # still frozen
    with pytest.raises(AttributeError, match="no_such_field"):
        lazy.no_such_field  # type: ignore[attr-defined]  # noqa: B018


def test_an_unread_decision_does_not_keep_its_router_alive() -> None:
    rng = random.Random(9)
    registry = _registry(3, rng)
    clock = FakeClock()
    router, _ = _fed_router(
        registry, [_record(clock, rng, f"m{i % 3}", "a") for i in range(90)], clock()
    )
    decision = router.get_best_model(WF, "a", input_tokens=100, min_success_rate=0.5)
    expected = router.get_best_model(WF, "a", input_tokens=100, min_success_rate=0.5)
    alive = weakref.ref(router)
    del router
    gc.collect()
    assert alive() is None
    assert decision.candidates == expected.candidates and len(decision.candidates) == 3
