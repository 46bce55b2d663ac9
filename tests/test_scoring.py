"""Pure routing arithmetic: Wilson gates, latency and cost constraints, selection, decay."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from empathy_models.records import ConstraintStatus, ModelPerformance, wilson_interval
from empathy_models.scoring import (
    COST,
    LATENCY,
    SUCCESS,
    ArmAccumulator,
    ArmSummary,
    Evaluation,
    choose,
    evaluate,
    expected_cost,
    merge,
    summarize,
    wilson_bounds,
)

E, U, R = ConstraintStatus.ELIGIBLE, ConstraintStatus.UNPROVEN, ConstraintStatus.REJECTED
IN_PRICE = 1e-6  # $1 per million input tokens
OUT_PRICE = 5e-6  # $5 per million output tokens


def arm(
    successes: int,
    failures: int = 0,
    *,
    latency_ms: float | list[float] = 100.0,
    input_tokens: int = 1000,
    output_tokens: int = 200,
    cost: float = 0.002,
    half_life: float | None = None,
    start: float = 0.0,
    step: float = 0.0,
) -> ArmAccumulator:
    """Build an accumulator by feeding outcomes, ``step`` seconds apart."""
    acc = ArmAccumulator(t=start)
    lat = latency_ms if isinstance(latency_ms, list) else [latency_ms]
    t = start
    for i in range(successes + failures):
        acc.add(
            at=t,
            success=i < successes,
            latency_ms=lat[i % len(lat)],
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            half_life=half_life,
        )
        t += step
    return acc


def summary_of(acc: ArmAccumulator, now: float | None = None) -> ArmSummary:
    return summarize([acc], now=acc.t if now is None else now, half_life=None)


def judge(summary: ArmSummary, **kwargs: Any) -> tuple[dict[str, ConstraintStatus], Evaluation]:
    kw: dict[str, Any] = {"input_price": IN_PRICE, "output_price": OUT_PRICE}
    kw.update(kwargs)
    ev = evaluate("m", summary, **kw)
    return dict(ev.constraints), ev


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    ("s", "n", "lo", "hi"),
    [
        (1, 1, 0.207, 1.000),
        (5, 5, 0.566, 1.000),
        (9, 10, 0.596, 0.982),
        (20, 20, 0.839, 1.000),
        (45, 50, 0.786, 0.957),
        (99, 100, 0.946, 0.998),
        (950, 1000, 0.935, 0.962),
    ],
)
def test_wilson_bounds_match_the_worked_table(s: int, n: int, lo: float, hi: float) -> None:
    got = wilson_bounds(s, n)
    assert got == pytest.approx((lo, hi), abs=1e-3)
    assert got == pytest.approx(wilson_interval(s, n))


def test_nine_of_ten_is_not_eligible_for_ninety_percent() -> None:
    statuses, ev = judge(summary_of(arm(9, 1)), min_success_rate=0.9)
    assert statuses == {SUCCESS: U}
    assert "not yet proven" in ev.reasons[0]


def test_zero_samples_is_unproven_on_every_constraint() -> None:
    empty = summarize([], now=0.0, half_life=None)
    statuses, ev = judge(empty, min_success_rate=0.5, max_latency_ms=1000.0, max_cost=1.0)
    assert statuses == {SUCCESS: U, LATENCY: U, COST: U}
    assert ev.reasons


@pytest.mark.parametrize(("needed", "minimum"), [(35, 0.90), (73, 0.95)])
def test_a_new_model_needs_the_stated_run_of_successes(needed: int, minimum: float) -> None:
    assert judge(summary_of(arm(needed - 1)), min_success_rate=minimum)[0] == {SUCCESS: U}
    assert judge(summary_of(arm(needed)), min_success_rate=minimum)[0] == {SUCCESS: E}


def test_confidently_below_the_minimum_is_rejected() -> None:
    # 80/100: the upper bound at the rejection confidence (z=3) is 0.893
    s = summary_of(arm(80, 20))
    assert s.reject_upper == pytest.approx(wilson_bounds(80, 100, 3.0)[1])
    assert s.reject_upper == pytest.approx(0.893, abs=1e-3)
    assert judge(s, min_success_rate=0.95)[0] == {SUCCESS: R}
    assert judge(s, min_success_rate=0.85)[0] == {SUCCESS: U}


def test_rejection_needs_stronger_evidence_than_eligibility() -> None:
    # a 99% model with two unlucky failures in its first eleven calls: the 95% upper
    # bound (0.949) is below 0.95, but it is not written off
    s = summary_of(arm(9, 2))
    assert s.upper < 0.95
    assert judge(s, min_success_rate=0.95)[0] == {SUCCESS: U}
    # and nothing is rejected on fewer than ten calls, however bad
    assert judge(summary_of(arm(0, 9)), min_success_rate=0.5)[0] == {SUCCESS: U}
    assert judge(summary_of(arm(0, 10)), min_success_rate=0.5)[0] == {SUCCESS: R}


# --------------------------------------------------------------------------- latency


def test_latency_needs_five_measured_calls() -> None:
    assert judge(summary_of(arm(4, latency_ms=50.0)), max_latency_ms=1000.0)[0] == {LATENCY: U}
    assert judge(summary_of(arm(5, latency_ms=50.0)), max_latency_ms=1000.0)[0] == {LATENCY: E}


def test_latency_p50_above_the_limit_is_rejected() -> None:
    s = summary_of(arm(20, latency_ms=[300.0, 320.0, 280.0]))
    assert judge(s, max_latency_ms=200.0)[0] == {LATENCY: R}


def test_latency_held_to_the_p95_bounds_not_the_median() -> None:
    # median ~110 ms, one call in ten at 400 ms: the p95 is confidently above 150 ms
    tail = [80.0, 90.0, 100.0, 110.0, 120.0, 100.0, 95.0, 105.0, 400.0, 100.0]
    s = summary_of(arm(30, latency_ms=tail))
    assert s.p50 is not None and s.p50 < 150.0
    assert s.p95_lower is not None and s.p95_lower > 150.0
    assert judge(s, max_latency_ms=150.0)[0] == {LATENCY: R}
    assert judge(s, max_latency_ms=1000.0)[0] == {LATENCY: E}


def test_latency_bound_that_straddles_the_limit_is_unproven() -> None:
    # six calls around 100-130 ms: p95 ~129 ms, but its upper bound (~152 ms) is above 150
    s = summary_of(arm(6, latency_ms=[90.0, 110.0, 100.0, 130.0, 95.0, 105.0]))
    assert s.p95_lower is not None and s.p95_upper is not None
    assert s.p95_lower < 150.0 < s.p95_upper
    assert judge(s, max_latency_ms=150.0)[0] == {LATENCY: U}
    # the same spread measured 60 times is proven
    many = summary_of(arm(60, latency_ms=[90.0, 110.0, 100.0, 130.0, 95.0, 105.0]))
    assert judge(many, max_latency_ms=150.0)[0] == {LATENCY: E}


def test_failures_do_not_feed_the_latency_estimate() -> None:
    s = summary_of(arm(0, 10, latency_ms=5.0))
    assert s.p50 is None and s.latency_n == 0.0


# --------------------------------------------------------------------------- cost


def test_expected_cost_uses_observed_output_tokens() -> None:
    s = summary_of(arm(10, output_tokens=200))
    cost, basis = expected_cost(
        s,
        input_price=IN_PRICE,
        output_price=OUT_PRICE,
        input_tokens=2000,
        max_tokens=4000,
        strict=False,
    )
    assert basis == "estimate"
    assert cost == pytest.approx(2000 * IN_PRICE + 200 * OUT_PRICE)


def test_without_observations_the_worst_case_is_used() -> None:
    empty = summarize([], now=0.0, half_life=None)
    cost, basis = expected_cost(
        empty,
        input_price=IN_PRICE,
        output_price=OUT_PRICE,
        input_tokens=100,
        max_tokens=50,
        strict=False,
    )
    assert cost == pytest.approx(100 * IN_PRICE + 50 * OUT_PRICE)
    assert basis == "worst_case"
    assert expected_cost(
        empty,
        input_price=IN_PRICE,
        output_price=OUT_PRICE,
        input_tokens=100,
        max_tokens=None,
        strict=False,
    ) == (None, None)


def test_strict_cost_ignores_observations_and_uses_max_tokens() -> None:
    s = summary_of(arm(50, output_tokens=10))
    limit = 1000 * IN_PRICE + 500 * OUT_PRICE  # what max_tokens=500 could cost
    loose, _ = judge(s, input_tokens=1000, max_tokens=500, max_cost=limit * 0.5)
    strict, ev = judge(s, input_tokens=1000, max_tokens=500, max_cost=limit * 0.5, strict_cost=True)
    assert loose == {COST: E}
    assert strict == {COST: R}
    assert ev.cost_basis == "worst_case"
    assert judge(s, input_tokens=1000, max_tokens=500, max_cost=limit, strict_cost=True)[0] == {
        COST: E
    }


def test_observed_cost_is_the_fallback_without_input_tokens() -> None:
    s = summary_of(arm(10, cost=0.01, input_tokens=0, output_tokens=0))
    # mean input tokens observed (0) makes the estimate computable from prices
    assert judge(s, max_cost=0.001)[0] == {COST: E}
    s2 = summarize([arm(0, 10, cost=0.01)], now=0.0, half_life=None)  # failures only
    statuses, ev = judge(s2, max_cost=0.001)
    assert statuses == {COST: R}
    assert ev.cost_basis == "observed"


# --------------------------------------------------------------------------- selection


def evaluations(
    specs: list[tuple[str, ArmAccumulator | None, float]],
    **constraints: Any,
) -> list[Evaluation]:
    out = []
    for model, acc, price in specs:
        s = summarize([] if acc is None else [acc], now=0.0, half_life=None)
        out.append(
            evaluate(
                model,
                s,
                input_price=price * 1e-6,
                output_price=price * 5e-6,
                **constraints,
            )
        )
    return out


def test_cheapest_eligible_model_wins() -> None:
    evs = evaluations(
        [("pricey", arm(200), 10.0), ("cheap", arm(200, 5), 1.0), ("mid", arm(200), 3.0)],
        input_tokens=1000,
        min_success_rate=0.9,
    )
    pick = choose(evs, [SUCCESS], random.Random(0), explore_rate=0.0)
    assert pick is not None and pick.evaluation.model == "cheap" and not pick.exploration


def test_most_reliable_objective_prefers_success() -> None:
    evs = evaluations(
        [("solid", arm(500), 10.0), ("shaky", arm(450, 50), 1.0)],
        input_tokens=1000,
        min_success_rate=0.8,
    )
    picks = set()
    for seed in range(20):
        pick = choose(
            evs, [SUCCESS], random.Random(seed), objective="most_reliable", explore_rate=0.0
        )
        assert pick is not None
        picks.add(pick.evaluation.model)
    assert picks == {"solid"}


def test_nothing_eligible_explores_the_least_measured_within_budget() -> None:
    evs = evaluations(
        [("a", arm(10), 1.0), ("b", arm(3), 1.0), ("c", None, 100.0)],
        input_tokens=1000,
        max_tokens=100,
        min_success_rate=0.95,
        max_cost=0.01,
    )
    # c is unmeasured but its worst case exceeds max_cost: it is not explorable
    pick = choose(evs, [SUCCESS, COST], random.Random(0))
    assert pick is not None and pick.exploration and pick.evaluation.model == "b"


def test_explore_rate_sends_a_share_to_unproven_models() -> None:
    evs = evaluations(
        [("proven", arm(500), 1.0), ("new", None, 2.0)],
        input_tokens=100,
        max_tokens=100,
        min_success_rate=0.9,
    )
    rng = random.Random(7)
    picks = [choose(evs, [SUCCESS], rng, explore_rate=0.1) for _ in range(2000)]
    explored = sum(1 for p in picks if p is not None and p.exploration)
    assert all(p is not None for p in picks)
    assert all(p.evaluation.model == "new" for p in picks if p is not None and p.exploration)
    assert 120 <= explored <= 280  # 10% of 2000 = 200


def test_all_rejected_gives_no_pick() -> None:
    evs = evaluations(
        [("a", arm(10, 90), 1.0), ("b", arm(5, 95), 1.0)], input_tokens=100, min_success_rate=0.9
    )
    assert choose(evs, [SUCCESS], random.Random(0)) is None
    # with the constraint dropped, the cheapest remaining is chosen
    assert choose(evs, [], random.Random(0)) is not None


def test_excluded_models_are_never_picked() -> None:
    s = summarize([arm(500)], now=0.0, half_life=None)
    ev = evaluate("x", s, input_price=0.0, output_price=0.0, excluded_reason="circuit open")
    assert ev.status() is R and ev.reasons == ("circuit open",)
    assert choose([ev], [], random.Random(0)) is None


@settings(max_examples=200, deadline=None)
@given(
    arms=st.lists(
        st.tuples(
            st.integers(0, 300),  # successes
            st.integers(0, 60),  # failures
            st.integers(1, 2000),  # output tokens observed
            st.floats(0.05, 20.0),  # price multiplier
        ),
        min_size=1,
        max_size=8,
    ),
    input_tokens=st.integers(0, 20_000),
    max_tokens=st.integers(1, 4000),
    max_cost=st.floats(0.0, 0.2),
    strict=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_confident_pick_never_exceeds_max_cost(
    arms: list[tuple[int, int, int, float]],
    input_tokens: int,
    max_tokens: int,
    max_cost: float,
    strict: bool,
    seed: int,
) -> None:
    evs = []
    for i, (s, f, out, mult) in enumerate(arms):
        acc = arm(s, f, output_tokens=out) if s + f else None
        summary = summarize([] if acc is None else [acc], now=0.0, half_life=None)
        evs.append(
            evaluate(
                f"m{i}",
                summary,
                input_price=mult * 1e-6,
                output_price=mult * 4e-6,
                input_tokens=input_tokens,
                max_tokens=max_tokens,
                max_cost=max_cost,
                min_success_rate=0.5,
                strict_cost=strict,
            )
        )
    pick = choose(evs, [SUCCESS, COST], random.Random(seed))
    if pick is None:
        return
    chosen = pick.evaluation
    # exploration picks too must stay within the (hard) budget
    assert chosen.cost is not None and chosen.cost <= max_cost
    if strict:
        i = int(chosen.model[1:])
        worst = input_tokens * arms[i][3] * 1e-6 + max_tokens * arms[i][3] * 4e-6
        assert worst <= max_cost * (1 + 1e-12)


# --------------------------------------------------------------------------- decay


def test_half_life_halves_old_evidence() -> None:
    acc = arm(100, half_life=60.0)
    later = summarize([acc], now=60.0, half_life=60.0)
    assert later.effective_n == pytest.approx(50.0)
    assert later.sample_size == 100  # the undecayed count is kept
    assert summarize([acc], now=60.0, half_life=None).effective_n == pytest.approx(100.0)


def test_recent_failures_outweigh_old_successes() -> None:
    half_life = 100.0
    summaries = []
    for hl in (half_life, None):
        acc = arm(1000, half_life=hl, step=1.0)  # a long good history
        for i in range(60):  # then a regression: one call in two fails
            acc.add(
                at=1000.0 + i,
                success=i % 2 == 0,
                latency_ms=100.0,
                input_tokens=1,
                output_tokens=1,
                cost_usd=0.0,
                half_life=hl,
            )
        summaries.append(summarize([acc], now=acc.t, half_life=hl))
    decayed, undecayed = summaries
    assert undecayed.lower >= 0.95  # all history at full weight hides the regression
    assert decayed.upper < 0.95  # with a half-life it is plain


def test_from_performance_spreads_the_aggregate_over_its_window() -> None:
    t0 = 1_767_225_600.0
    perf = ModelPerformance(
        model="m",
        sample_size=100,
        successes=90,
        latency_p50_ms=200.0,
        latency_p95_ms=400.0,
        avg_cost_usd=0.01,
        avg_input_tokens=500.0,
        avg_output_tokens=50.0,
        first_seen=datetime.fromtimestamp(t0 - 600.0, UTC),
        last_seen=datetime.fromtimestamp(t0, UTC),
    )
    full = summarize(
        [ArmAccumulator.from_performance(perf, now=t0, half_life=None)], now=t0, half_life=None
    )
    assert full.effective_n == pytest.approx(100.0)
    assert full.success_rate == pytest.approx(0.9)
    assert full.p50 == pytest.approx(200.0)
    assert full.p95 is not None and full.p95 == pytest.approx(400.0, rel=0.05)
    assert full.mean_output_tokens == pytest.approx(50.0)
    assert full.mean_cost == pytest.approx(0.01)
    # spread evenly over 600 s with a 600 s half-life: mean weight (1 - 1/2) / ln 2
    decayed = summarize(
        [ArmAccumulator.from_performance(perf, now=t0, half_life=600.0)], now=t0, half_life=600.0
    )
    assert decayed.effective_n == pytest.approx(100 * 0.5 / math.log(2))
    assert decayed.success_rate == pytest.approx(0.9)


def test_merge_equals_feeding_everything_to_one_accumulator() -> None:
    a = arm(30, 3, half_life=50.0, step=1.0)
    b = arm(20, 7, half_life=50.0, start=40.0, step=1.0)
    merge(a, b, 50.0)
    both = ArmAccumulator(t=0.0)
    for acc_start, s, f in ((0.0, 30, 3), (40.0, 20, 7)):
        for i in range(s + f):
            both.add(
                at=acc_start + i,
                success=i < s,
                latency_ms=100.0,
                input_tokens=1000,
                output_tokens=200,
                cost_usd=0.002,
                half_life=50.0,
            )
    got = summarize([a], now=100.0, half_life=50.0)
    want = summarize([both], now=100.0, half_life=50.0)
    assert got.sample_size == want.sample_size == 60
    assert got.effective_n == pytest.approx(want.effective_n)
    assert got.successes == pytest.approx(want.successes)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.floats(0.0, 10_000.0),
            st.integers(0, 5_000),
            st.floats(0.0, 1.0),
        ),
        max_size=30,
    ),
    st.sampled_from([None, 600.0, 86_400.0]),
    st.sampled_from([None, 20.0, 500.0]),
)
def test_summarize_builds_the_summary_the_public_constructor_builds(
    calls: list[tuple[bool, float, int, float]],
    half_life: float | None,
    count_half_life: float | None,
) -> None:
    # summarize skips attrs' __init__ for speed; the object must be indistinguishable
    acc = ArmAccumulator(t=1_000.0)
    for i, (ok, latency, tokens, cost) in enumerate(calls):
        acc.add(
            at=1_000.0 + i,
            success=ok,
            latency_ms=latency,
            input_tokens=tokens,
            output_tokens=tokens // 2,
            cost_usd=cost,
            half_life=half_life,
            count_half_life=count_half_life,
        )
    got = summarize((acc,), now=1_100.0, half_life=half_life, count_half_life=count_half_life)
    assert type(got) is ArmSummary
    rebuilt = ArmSummary(**attrs.asdict(got))
    assert got == rebuilt and repr(got) == repr(rebuilt) and hash(got) == hash(rebuilt)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        got.p50 = 1.0  # type: ignore[misc]
