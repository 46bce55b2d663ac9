"""
The router's evidence and promise: buckets, the change test, verdicts that do not
depend on how the evidence arrived, exploration with a budget, explanations.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import random
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    LLMCallRecord,
    ModelRegistry,
    Outcome,
    RoutingDecision,
    RoutingPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend, NullTelemetryBackend, gc_paused
from empathy_models.evidence import (
    ROW_FIELDS,
    SUM_FIELDS,
    EvidenceBatch,
    EvidenceBucket,
    bucket_from_fields,
    rollup,
)
from empathy_models.records import CandidateEvaluation, ConstraintStatus, wilson_interval
from empathy_models.routing import ModelStats, RoutingStats
from empathy_models.routing._memory import EvidenceMemory
from empathy_models.routing.book import Arm, ChangeTest, bucket_of
from empathy_models.routing.stats import (
    SAMPLES,
    SUCCESSES,
    row_sums,
    summary_bounds,
    wilson_bounds,
    wilson_lower,
    wilson_upper,
)
from empathy_models.testing.clock import FakeClock
from tests._fakes import list_cost, priced_registry

WF, ST = "docs", "outline"
# (id, input price per Mtok): output price is four times it
MODELS = [("nano", 0.1), ("mini", 0.4), ("small", 1.0), ("mid", 3.0)]
ASK: dict[str, object] = {
    "candidates": [m for m, _ in MODELS],
    "input_tokens": 500,
    "max_tokens": 400,
    "min_success_rate": 0.95,
}


def registry() -> ModelRegistry:
    return priced_registry(MODELS, "evidence-test")


_PRICES = registry()


def rec(ts: float, model: str, ok: bool, *, output_tokens: int = 100) -> LLMCallRecord:
    return LLMCallRecord(
        provider="openai",
        model=model,
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        timestamp=datetime.fromtimestamp(ts, UTC),
        workflow=WF,
        stage=ST,
        input_tokens=500,
        output_tokens=output_tokens if ok else 0,
        cost_usd=list_cost(_PRICES, model, ok, 500, output_tokens),
        latency_ms=100.0 + (ts % 7),
    )


def outcomes(rate: float, n: int, rng: random.Random) -> list[bool]:
    return [rng.random() < rate for _ in range(n)]


def feed_arm(arm: Arm, start: float, oks: list[bool], step: float = 1.0) -> float:
    t = start
    for ok in oks:
        arm.add(t, ok, 100.0, 500, 100 if ok else 0, 0.0001)
        t += step
    return t


def feed_drawn(arm: Arm, t: float, rate: float, n: int, rng: random.Random, step: float) -> float:
    """``n`` outcomes at success rate ``rate``, latencies spread as real ones are."""
    for _ in range(n):
        ok = rng.random() < rate
        arm.add(t, ok, rng.lognormvariate(4.6, 0.3), 500, 100 * ok, 0.0001 * ok)
        t += step
    return t


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("s", "n", "lo", "hi"),
    [
        (1, 1, 0.207, 1.000),
        (9, 10, 0.596, 0.982),
        (45, 50, 0.786, 0.957),
        (99, 100, 0.946, 0.998),
        (950, 1000, 0.935, 0.962),
    ],
)
def test_wilson_bounds_match_the_worked_table(s: int, n: int, lo: float, hi: float) -> None:
    got = wilson_bounds(s, n)
    assert got == pytest.approx((lo, hi), abs=1e-3)
    assert got == pytest.approx(wilson_interval(s, n))


def test_the_single_bounds_are_those_of_wilson_bounds() -> None:
    # the change test's walk uses them for speed; its regimes must not depend on that
    rng = random.Random(11)
    for _ in range(20_000):
        n = rng.choice([0.0, rng.uniform(0.0, 5.0), float(rng.randint(1, 10**6))])
        s = rng.uniform(-0.1, 1.1) * n
        z = rng.choice([1.0, 1.96, 3.0])
        lower, upper = wilson_bounds(s, n, z)
        assert wilson_upper(s, n, z) == upper
        got = wilson_lower(s, n, z, z * z)
        assert got == lower or (got > lower == min(max(s / n, 0.0), 1.0))


def test_an_arms_summary_bounds_are_those_of_wilson_bounds() -> None:
    # an arm's summary takes its four bounds in one call; verdicts must not depend on that
    rng = random.Random(12)
    for _ in range(20_000):
        n = rng.choice([0.0, rng.uniform(0.0, 5.0), float(rng.randint(1, 10**6))])
        s = rng.uniform(-0.1, 1.1) * n
        z, reject_z, keep_z = (rng.choice([0.5, 1.0, 1.96, 2.58, 3.0]) for _ in range(3))
        lower, upper = wilson_bounds(s, n, z)
        expected = (lower, upper, wilson_bounds(s, n, reject_z)[1], wilson_bounds(s, n, keep_z)[0])
        assert summary_bounds(s, n, z, reject_z, keep_z) == expected


def test_a_bucket_built_from_fields_is_the_constructors() -> None:
    # backends build the buckets of a start this way; a field out of order would show
    start = datetime(2026, 12, 4, 18, 30, tzinfo=UTC)
    values = [10, 9, 8, 1.5, 2.5, 7, 0.5, 0.75, 1200, 3400, 0.0125]
    sums: dict[str, Any] = dict(zip(SUM_FIELDS, values, strict=True))
    built = bucket_from_fields("wf", "st", "m", start, *sums.values(), 42)
    expected = EvidenceBucket(
        workflow="wf", stage="st", model="m", bucket_start=start, version=42, **sums
    )
    assert built == expected
    assert [getattr(built, f) for f in SUM_FIELDS] == list(sums.values())
    assert built.key == ("wf", "st", "m", start) and built.version == 42


def test_a_batch_of_rows_is_the_batch_of_their_buckets() -> None:
    # backends build a start's batch from their rows, unsorted; its buckets are built and
    # sorted when read, and the router reads the rows (`row_sums`: the book's layout)
    rng = random.Random(4)
    records = [
        LLMCallRecord(
            provider="openai",
            model=rng.choice(["m1", "m2"]),
            outcome=Outcome.SUCCESS if rng.random() < 0.8 else Outcome.FAILURE,
            timestamp=datetime.fromtimestamp(1_000_000.0 + rng.uniform(0, 600), UTC),
            workflow=rng.choice([None, "", "wf"]),
            stage=rng.choice([None, "", "st"]),
            input_tokens=rng.randint(1, 900),
            output_tokens=rng.randint(1, 300),
            cost_usd=rng.uniform(0.0, 0.01),
            latency_ms=rng.uniform(1.0, 900.0),
            ttft_ms=rng.choice([None, rng.uniform(1.0, 90.0)]),
        )
        for _ in range(300)
    ]
    buckets = rollup(records)
    of_buckets = EvidenceBatch(buckets=buckets, version=7)
    rows = list(of_buckets.rows)
    assert len(rows) == len(buckets) > 20 and all(len(r) == len(ROW_FIELDS) for r in rows)
    assert [dict(zip(ROW_FIELDS, r, strict=True)) for r in rows[:1]] == [
        {
            "bucket_s": int(buckets[0].bucket_start.timestamp()),
            "workflow": buckets[0].workflow,
            "stage": buckets[0].stage,
            "model": buckets[0].model,
            **{name: getattr(buckets[0], name) for name in SUM_FIELDS},
            "version": 0,
        }
    ]
    rng.shuffle(rows)
    of_rows = EvidenceBatch.from_rows(rows, 7)
    assert len(of_rows) == len(buckets)
    assert of_rows.buckets == tuple(buckets)  # sorted, every field as the bucket's
    assert of_rows == of_buckets and of_rows != EvidenceBatch(buckets=buckets, version=8)
    assert hash(of_rows) == hash(of_buckets)
    assert repr(of_rows) == f"EvidenceBatch(version=7, buckets=<{len(buckets)} buckets>)"
    first = buckets[0]
    sums = row_sums(of_buckets.rows[0])
    assert sums[0] == first.samples and sums[1] == first.successes
    assert sums[5] == first.input_tokens and sums[7] == first.cost_usd
    assert sums[8] == first.ttft_n
    with pytest.raises(AttributeError, match="immutable"):
        of_rows.version = 8


def test_gc_paused_holds_the_collector_off_and_restores_it() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), gc_paused():
        raise KeyError("x")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


# --------------------------------------------------------------------------- the book


def test_live_outcomes_and_stored_buckets_give_the_same_regimes_and_summary() -> None:
    rng = random.Random(3)
    oks = outcomes(0.99, 1500, rng) + outcomes(0.8, 200, rng) + outcomes(0.99, 600, rng)
    records = [rec(1_000_000.0 + i, "nano", ok) for i, ok in enumerate(oks)]
    live = Arm(test=ChangeTest())
    for r in records:
        ts = r.timestamp.timestamp()
        ok = r.outcome is Outcome.SUCCESS
        live.add(ts, ok, r.latency_ms, r.input_tokens, r.output_tokens, r.cost_usd)
    stored = Arm(test=ChangeTest())
    rows = EvidenceBatch(buckets=rollup(records), version=0).rows
    stored.apply((row[0], row_sums(row)) for row in rows)
    assert [(r.start, r.kind) for r in live.regimes] == [(r.start, r.kind) for r in stored.regimes]
    assert len(live.regimes) >= 2  # the drop was detected
    a = live.summarize(1.96, 3.0, 1.0)
    b = stored.summarize(1.96, 3.0, 1.0)
    assert (a.samples, a.successes, a.window_samples) == (b.samples, b.successes, b.window_samples)
    assert a.lower == pytest.approx(b.lower) and a.p95 == pytest.approx(b.p95)


def _same_summary(a: Any, b: Any) -> None:
    # equal, the figures taken from sums of latencies and costs up to the order they
    # were added in (an arm adds each live outcome to its regime's sums)
    for name, x in attrs.asdict(a).items():
        y = getattr(b, name)
        if isinstance(x, float) and isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-9, abs=0.0), name
        else:
            assert x == y, name


def _holds_what_a_fresh_walk_holds(live: Arm) -> Arm:
    """Assert ``live`` holds what an arm walked from its buckets holds; return that arm."""
    fresh = Arm.walked(live.test, dict(live.data))
    assert [(r.start, r.kind) for r in live.regimes] == [(r.start, r.kind) for r in fresh.regimes]
    assert [r.closed for r in live.regimes] == [r.closed for r in fresh.regimes]
    assert live._earlier_rates() == fresh._earlier_rates()
    _same_summary(live.summarize(1.96, 3.0, 1.0), fresh.summarize(1.96, 3.0, 1.0))
    # the change test's state after every bucket, which later outcomes continue from
    for name in ("cum_n", "cum_f", "up", "dn", "up_from", "dn_from", "proof"):
        assert list(getattr(live, name)) == list(getattr(fresh, name)), name
    assert live.cur == pytest.approx(fresh.cur, rel=1e-9, abs=0.0)
    return fresh


def _with_more_successes(live: Arm, bucket: int, successes: int) -> dict[int, Any]:
    """The store's version of ``live``'s buckets: ``bucket`` with more successes."""
    stored = dict(live.data)
    v = list(stored[bucket])
    v[SAMPLES] += successes
    v[SUCCESSES] += successes
    stored[bucket] = tuple(v)
    return stored


def _degraded(seed: int, failures: int) -> tuple[Arm, float, random.Random]:
    # 3,000 calls at 0.99, then ``failures`` in a row: a degradation detected live;
    # what the closed regimes give is taken (and kept) here
    rng = random.Random(seed)
    live = Arm(test=ChangeTest())
    t = feed_arm(live, 0.0, outcomes(0.99, 3000, rng))
    t = feed_arm(live, t, [False] * failures)
    assert live.regimes[-1].kind == "degraded"
    live.summarize(1.96, 3.0, 1.0)
    live._earlier_rates()
    return live, t, rng


def test_an_arm_whose_detected_change_is_undone_holds_what_a_fresh_walk_holds() -> None:
    # the store's version of the detection's minute (other workers' successes in it)
    # undoes the degradation
    live, t, rng = _degraded(5, 40)
    live.apply(_with_more_successes(live, live.starts[-1], 3000).items())
    assert [r.kind for r in live.regimes] == ["initial"]
    fresh = _holds_what_a_fresh_walk_holds(live)
    # and the arm goes on as the fresh one does
    more = outcomes(0.9, 600, rng)
    feed_arm(live, t + 120, more)
    feed_arm(fresh, t + 120, more)
    assert [(r.start, r.kind) for r in live.regimes] == [(r.start, r.kind) for r in fresh.regimes]
    _same_summary(live.summarize(1.96, 3.0, 1.0), fresh.summarize(1.96, 3.0, 1.0))


def test_an_arm_whose_window_moved_on_holds_what_a_fresh_walk_holds() -> None:
    # regimes (a drop, a recovery) taken in, then the window's start passes the first
    rng = random.Random(6)
    live = Arm(test=ChangeTest())
    t = feed_arm(live, 0.0, outcomes(0.99, 3000, rng))
    t = feed_arm(live, t, outcomes(0.6, 200, rng))
    feed_arm(live, t, outcomes(0.99, 3000, rng))
    assert len(live.regimes) >= 3
    live.summarize(1.96, 3.0, 1.0)
    live._earlier_rates()
    assert live.rebase(live.starts[len(live.starts) // 3])
    _holds_what_a_fresh_walk_holds(live)


def test_an_arm_taking_outcomes_around_a_detected_change_holds_what_a_fresh_walk_holds() -> None:
    # outcomes in the minute a change was detected (the change is decided again each
    # time), then late ones in minutes before it, then the store's version of a minute
    # before it
    live, t, rng = _degraded(8, 30)
    feed_arm(live, t, outcomes(0.7, 20, rng), step=0.1)  # the same minute
    change = live.regimes[-1].start
    for late in (change - 600.0, change - 1800.0):
        feed_arm(live, late, [False, True, False])
        _holds_what_a_fresh_walk_holds(live)
    feed_arm(live, t + 1.0, [False] * 5, step=0.1)  # the change decided again
    early = max(b for b in live.data if b < live.regimes[-1].start)
    live.apply(_with_more_successes(live, early, 30).items())
    _holds_what_a_fresh_walk_holds(live)


@pytest.mark.parametrize("seed", range(16))
def test_outcomes_in_the_minute_a_change_was_detected_leave_what_a_fresh_walk_holds(
    seed: int,
) -> None:
    # a change detected in the newest minute is decided again by each outcome in that
    # minute, from the state before it (the change may hold, move, take other restored
    # evidence or be undone); after every outcome the arm holds what a walk holds
    rng = random.Random(seed)
    live = Arm(test=ChangeTest())
    t = feed_drawn(live, 0.0, 0.99, 1500, rng, 1.0)
    if seed % 2:  # an earlier regime that a recovery may restore
        t = feed_drawn(live, t, 0.6, 120, rng, 1.0)
        t = feed_drawn(live, t, 0.99, 300, rng, 1.0)
    t = feed_drawn(live, t, rng.choice((0.3, 0.6, 0.9, 0.95)), 400, rng, 1.0)
    minute = bucket_of(t)
    while t < minute + 59.0 and not any(r.detected == minute for r in live.regimes):
        t = feed_drawn(live, t, 0.5, 1, rng, 0.01)  # until a change is detected in this minute
    rate = rng.choice((rng.random(), 0.95, 0.98))
    for _ in range(150):
        feed_drawn(live, t, rate, 1, rng, 0.0)
        _holds_what_a_fresh_walk_holds(live)


@pytest.mark.parametrize("seed", range(48))
def test_outcomes_after_a_slow_drop_detected_in_the_newest_minute_leave_what_a_walk_holds(
    seed: int,
) -> None:
    # a drop from 0.99 to a rate near it, detected in the newest minute, then outcomes
    # at another rate near it in that minute: the change holds while the new regime's
    # own improvement test (which the closed regime's rate feeds) moves
    rng = random.Random(seed)
    live = Arm(test=ChangeTest())
    t = feed_drawn(live, 0.0, 0.99, 1500, rng, 1.0)
    drop = rng.uniform(0.8, 0.97)
    while len(live.regimes) == 1 and t < 3600.0:
        t = feed_drawn(live, t, drop, 1, rng, 1.0)
    minute = bucket_of(t - 1.0)
    t = min(t, minute + 59.0)
    after = rng.uniform(0.85, 1.0)
    for _ in range(100):
        feed_drawn(live, t, after, 1, rng, 0.0)
        _holds_what_a_fresh_walk_holds(live)


def test_a_refresh_that_turns_the_newest_minutes_improvement_into_a_drop_is_acted_on() -> None:
    # an improvement detected live in the newest minute; the store's version of that
    # minute (other workers' failures in it) shows a degradation from the same minute
    rng = random.Random(1)
    history = Arm(test=ChangeTest())
    t = feed_drawn(history, 0.0, 0.85, 3000, rng, 1.0)
    live = Arm.walked(ChangeTest(), dict(history.data))  # as a start reads them
    minute = bucket_of(t) + 60
    while not any(r.detected == minute for r in live.regimes):
        live.add(minute, True, 100.0, 500, 100, 0.0001)
    assert live.regimes[-1].kind == "improved"
    stored = list(live.data[minute])
    stored[SAMPLES] += 200  # 200 failures
    live.apply([(minute, tuple(stored))])
    assert [(r.start, r.kind) for r in live.regimes[1:]] == [(minute, "degraded")]
    _holds_what_a_fresh_walk_holds(live)


def test_a_change_decided_again_after_the_window_moved_rests_on_the_window_alone() -> None:
    live, t, _ = _degraded(9, 30)
    assert live.rebase(live.starts[len(live.starts) // 2])  # the oldest half drops out
    feed_arm(live, t, [False, False], step=0.1)  # the detection's minute: decided again
    _holds_what_a_fresh_walk_holds(live)


def test_a_stationary_arm_accumulates_evidence_without_a_cap() -> None:
    rng = random.Random(1)
    arm = Arm(test=ChangeTest())
    feed_arm(arm, 0.0, outcomes(0.93, 6000, rng))
    s = arm.summarize(1.96, 3.0, 1.0)
    # with a half-life this arm could never be decided against 0.95; here it is
    assert s.samples >= 3000
    assert s.reject_upper < 0.95


def test_a_drop_from_99_to_80_percent_is_detected_within_50_calls() -> None:
    for seed in range(5):
        rng = random.Random(seed)
        arm = Arm(test=ChangeTest())
        t = feed_arm(arm, 0.0, outcomes(0.99, 3000, rng))
        before = len(arm.regimes)
        calls = 0
        while len(arm.regimes) == before or arm.regimes[-1].kind != "degraded":
            t = feed_arm(arm, t, [rng.random() < 0.8])
            calls += 1
            assert calls <= 50, f"seed {seed}: not detected after 50 calls"
        summary = arm.summarize(1.96, 3.0, 1.0)
        assert summary.change is not None and summary.change.startswith("degraded")
        assert summary.samples < 400  # the old evidence (3,000 calls) is set aside


def _walk_reference(arm: Arm) -> list[tuple[float, float, float]]:
    """
    Every bucket's (degradation sum, improvement sum, proof) recomputed from the arm's
    regimes with `wilson_upper` / `wilson_lower`, as the change test's walk defines
    them (see `Arm._rerun`): each bucket in the regime that holds it, after the
    bucket before it.  A bucket whose sums signal a change was one where a change
    already detected at or after it was not acted on again: its sums restart at 0.
    """
    test = arm.test
    z, rz = test.proof_z, test.reference_z
    out: list[tuple[float, float, float]] = []
    regimes = arm.regimes
    for j, t in enumerate(arm.starts):
        k = max(i for i, r in enumerate(regimes) if r.start <= t)
        regime, base = regimes[k], regimes[k].base
        # an improvement to a new rate, ended by a degradation that restored an earlier
        # regime holding more calls, was a fluke: not a target of the cheaper restore
        # threshold
        rates = [
            (c[0] - c[1] + 0.5) / (c[0] + 1.0)
            for r, after in itertools.pairwise(regimes[: k + 1])
            if (c := r.closed) is not None
            and c[0] >= test.min_samples
            and not (
                r.kind == "improved"
                and r.restored is None
                and after.kind == "degraded"
                and after.restored is not None
                and (after.base is None or c[0] < after.base[0])
            )
        ]
        if j == 0 or arm.starts[j - 1] < regime.start:
            n0 = base[0] if base is not None else 0.0
            f0 = base[0] - base[1] if base is not None else 0.0
            u0 = d0 = best = 0.0
            uf = df = t
        else:
            n0, f0, best = arm.cum_n[j - 1], arm.cum_f[j - 1], arm.proof[j - 1]
            u0, d0 = arm.up[j - 1], arm.dn[j - 1]
            uf = arm.up_from[j - 1] if u0 > 0 else t
            df = arm.dn_from[j - 1] if d0 > 0 else t
        n, f = arm.data[t][0], arm.data[t][0] - arm.data[t][1]
        u = d = 0.0
        if n0 >= test.min_samples and n > 0:
            q = max(wilson_upper(f0, n0, rz), test.min_rate)
            q_up = min(0.5, max(q * test.degrade_ratio, q + test.degrade_step))
            if q_up > q:
                u = u0 + f * math.log(q_up / q) + (n - f) * math.log((1 - q_up) / (1 - q))
            q = (f0 + 0.5) / (n0 + 1.0)
            better = [qr for qr in rates if qr < q / 1.5]
            q_dn = better[-1] if better else q / test.improve_ratio
            h_dn = test.restore_threshold if better else test.improve_threshold
            if q_dn < q:
                d = d0 + f * math.log(q_dn / q) + (n - f) * math.log((1 - q_dn) / (1 - q))
            u, d = max(u, 0.0), max(d, 0.0)
            alarm = False
            if u > test.threshold:
                if uf > regime.start or base is not None:
                    alarm = True
                else:
                    u = 0.0
            elif d > h_dn:
                if df > regime.start or base is not None:
                    alarm = True
                else:
                    d = 0.0
            if alarm:
                u = d = 0.0  # a change not acted on again
        n1, f1 = n0 + n, f0 + f
        proved = best
        if n1 > 0 and n1 - f1 > best * n1:
            proved = wilson_lower(n1 - f1, n1, z, z * z)
            if base is not None and proved > best:
                part = max(
                    wilson_lower(base[1], base[0], z, z * z),
                    wilson_lower(n1 - f1 - base[1], n1 - base[0], z, z * z),
                )
                proved = min(part, proved)
            proved = max(proved, best)
        out.append((u, d, proved))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_change_test_walk_is_the_bounds_arithmetic_bucket_by_bucket(seed: int) -> None:
    # degradations, recoveries to an earlier rate (restored evidence) and noise, over
    # uneven minutes: every bucket's sums and proof are what the stats functions give
    rng = random.Random(seed)
    arm = Arm(test=ChangeTest())
    t = 0.0
    for rate, n in [(0.99, 1500), (0.8, 150), (0.99, 600), (0.9, 400), (0.99, 500)]:
        for _ in range(n):
            t += rng.choice([1.0, 3.0, 7.0])
            arm.add(t, rng.random() < rate, 100.0, 500, 100, 0.0001)
    assert len(arm.regimes) >= 3 and any(r.base is not None for r in arm.regimes)
    stored = Arm(test=ChangeTest())
    stored.apply(arm.data.items())
    for built in (arm, stored):  # live, and in one pass as a start does
        expected = _walk_reference(built)
        got = list(zip(built.up, built.dn, built.proof, strict=True))
        assert got == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_lucky_stretch_does_not_split_a_steady_arm_again_and_again(seed: int) -> None:
    # a 95% arm, 15 calls a minute for two days, with one stretch of 400 successes in a
    # row: the stretch may read as an improvement, and noise may take the arm back to
    # its rate once by chance, but it is no target of the cheap restore ever after
    # (were it one, the arm would go back to it every ~45 lucky successes: hundreds of
    # regimes)
    rng = random.Random(seed)
    arm = Arm(test=ChangeTest())
    t = 0.0
    for i in range(2 * 24 * 60 * 15):
        t += 4.0
        ok = True if 3000 <= i < 3400 else rng.random() < 0.95
        arm.add(t, ok, 100.0, 500, 100 if ok else 0, 0.0001)
    lucky = [r for r in arm.regimes if r.base is not None and r.base[1] / r.base[0] >= 0.98]
    assert len(lucky) <= 2, [(r.kind, r.start, r.base) for r in lucky]
    assert len(arm.regimes) <= 40, [(r.kind, r.start) for r in arm.regimes]
    summary = arm.summarize(1.96, 3.0, 1.0)
    assert summary.samples > 10_000  # the steady evidence stays whole
    assert 0.94 <= summary.successes / summary.samples <= 0.96


def test_a_model_that_recovered_keeps_its_old_standing_after_a_false_alarm() -> None:
    # 0.99 for 3,000 calls, 0.80 for 100 (degraded), back to 0.99: its old evidence is
    # restored; a false alarm after that (a short unlucky run) and the next return to
    # 0.99 restore it again at the cheap threshold (a restored regime is never a fluke)
    rng = random.Random(5)
    arm = Arm(test=ChangeTest())
    t = feed_arm(arm, 0.0, outcomes(0.99, 3000, rng))
    t = feed_arm(arm, t, outcomes(0.8, 100, rng))
    t = feed_arm(arm, t, [True] * 40)
    assert arm.regimes[-1].kind == "improved" and arm.regimes[-1].restored is not None
    t = feed_arm(arm, t, [False] * 6 + [True] * 20 + [False] * 4)
    assert arm.regimes[-1].kind == "degraded"
    detected = len(arm.regimes)
    feed_arm(arm, t, [True] * 60)
    assert len(arm.regimes) == detected + 1
    assert arm.regimes[-1].kind == "improved" and arm.regimes[-1].restored is not None
    assert arm.summarize(1.96, 3.0, 1.0).lower >= 0.95


def test_a_recovery_to_the_old_rate_restores_the_old_evidence() -> None:
    rng = random.Random(2)
    arm = Arm(test=ChangeTest())
    t = feed_arm(arm, 0.0, outcomes(0.99, 3000, rng))
    t = feed_arm(arm, t, outcomes(0.8, 100, rng))
    assert arm.regimes[-1].kind == "degraded"
    feed_arm(arm, t, [True] * 40)
    summary = arm.summarize(1.96, 3.0, 1.0)
    assert arm.regimes[-1].kind == "improved" and arm.regimes[-1].restored is not None
    assert summary.samples > 2000 and summary.lower >= 0.95


def test_a_steady_rate_after_a_worse_start_is_no_fluke() -> None:
    # a cold start of 27 / 30, then ~1,300 calls at 0.99 (an improvement), a real
    # degradation to 0.80 that restores the first minute (56 / 60), and a recovery: the
    # 0.99 regime is the model's steady rate, not a lucky stretch, so the return to it
    # is found at the restore threshold (this seed: 122 calls when it was a fluke)
    rng = random.Random(3)
    arm = Arm(test=ChangeTest())
    t = feed_arm(arm, 0.0, ([True] * 9 + [False]) * 3)
    t = feed_arm(arm, t, outcomes(0.99, 1300, rng))
    t = feed_arm(arm, t, outcomes(0.8, 200, rng))
    first, steady, degraded = arm.regimes
    assert (first.kind, steady.kind, degraded.kind) == ("initial", "improved", "degraded")
    assert steady.restored is None and degraded.restored == first.start
    assert first.closed is not None and first.closed[:2] == [60.0, 56.0]
    assert degraded.base == first.closed
    calls = 0
    while len(arm.regimes) == 3:
        t = feed_arm(arm, t, outcomes(0.99, 1, rng))
        calls += 1
        assert calls <= 60, "the recovery was not found within 60 calls"
    recovered = arm.regimes[-1]
    assert recovered.kind == "improved" and recovered.restored == steady.start


# --------------------------------------------------------------------------- the router


async def fill(
    store: MemoryTelemetryBackend,
    clock: FakeClock,
    router: AdaptiveModelRouter | None,
    plan: list[tuple[str, float, int]],
    rng: random.Random,
) -> None:
    for model, rate, n in plan:
        for _ in range(n):
            clock.advance(1.0)
            r = rec(clock(), model, rng.random() < rate)
            await store.record(r)
            if router is not None:
                router.record_outcome(r)


def view(d: RoutingDecision) -> dict[str, object]:
    return {
        "model": d.model,
        "exploration": d.exploration,
        "candidates": [
            (c.model, c.status.value, c.sample_size, round(c.effective_sample_size or 0, 6))
            for c in d.candidates
        ],
    }


async def restarted_view(
    store: MemoryTelemetryBackend, clock: FakeClock, policy: RoutingPolicy, stage: str | None
) -> dict[str, object]:
    """The decision of a router started now on ``store``, as `view` shows it."""
    async with AdaptiveModelRouter(
        registry(), store, policy=policy, seed=2, clock=clock, refresh_interval=None
    ) as router:
        return view(router.get_best_model(WF, stage, **ASK))  # type: ignore[arg-type]


async def test_live_refreshed_and_restarted_routers_reach_the_same_verdicts() -> None:
    clock = FakeClock()
    store = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0)
    rng = random.Random(5)
    plan = [("nano", 0.99, 1500), ("nano", 0.7, 150), ("mini", 0.995, 600), ("small", 0.9, 200)]
    async with AdaptiveModelRouter(
        registry(), store, policy=policy, seed=1, clock=clock, refresh_interval=None
    ) as live:
        await fill(store, clock, live, plan, rng)
        clock.advance(5.0)
        first = view(live.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
        assert await live.refresh()
        refreshed = view(live.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
    restarted = await restarted_view(store, clock, policy, ST)
    assert first == refreshed == restarted
    assert first["model"] == "mini" and not first["exploration"]


async def test_an_empty_stage_and_none_are_one_arm_live_and_after_a_restart() -> None:
    # the store keeps a stage of "" and of None apart; the router, like its live
    # outcomes, counts both as the arm without a stage, whatever order the rows come in
    clock = FakeClock()
    store = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0)
    rng = random.Random(6)
    async with AdaptiveModelRouter(
        registry(), store, policy=policy, seed=1, clock=clock, refresh_interval=None
    ) as live:
        for i in range(900):
            clock.advance(1.0)
            r = attrs.evolve(rec(clock(), "mini", rng.random() < 0.99), stage=("", None)[i % 2])
            await store.record(r)
            live.record_outcome(r)
        clock.advance(5.0)
        seen = view(live.get_best_model(WF, None, **ASK))  # type: ignore[arg-type]
    again = await restarted_view(store, clock, policy, None)
    assert seen == again
    assert ("mini", 900) in [(c[0], c[2]) for c in seen["candidates"]]  # type: ignore[attr-defined]


async def test_two_routers_on_one_store_agree_after_one_refresh() -> None:
    clock = FakeClock()
    store = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0)
    rng = random.Random(8)
    a = AdaptiveModelRouter(
        registry(), store, policy=policy, seed=1, clock=clock, refresh_interval=None
    )
    b = AdaptiveModelRouter(
        registry(), store, policy=policy, seed=2, clock=clock, refresh_interval=None
    )
    async with a, b:
        half = [("nano", 0.6, 300), ("mini", 0.995, 400)]
        await fill(store, clock, a, half, rng)  # a serves these calls
        await fill(store, clock, b, [("small", 0.99, 300)], rng)  # b serves these
        assert view(a.get_best_model(WF, ST, **ASK)) != view(b.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
        await a.refresh()
        await b.refresh()
        assert view(a.get_best_model(WF, ST, **ASK)) == view(b.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]


async def test_a_refresh_reads_only_what_changed() -> None:
    clock = FakeClock()
    store = MemoryTelemetryBackend()
    rng = random.Random(9)
    await fill(store, clock, None, [("mini", 0.99, 2000)], rng)
    async with AdaptiveModelRouter(registry(), store, clock=clock, refresh_interval=None) as router:
        arm = next(iter(router._memory.arms.values()))
        version = arm.version
        clock.advance(60.0)
        assert await router.refresh()
        assert arm.version == version  # nothing new: nothing re-applied
        batch = await store.evidence(after_version=router._memory.version)
        assert batch.buckets == ()


@pytest.mark.parametrize("meanwhile", [False, True], ids=["awaited", "calls-meanwhile"])
@pytest.mark.slow
async def test_a_router_whose_window_slid_agrees_with_a_restart_and_keeps_only_the_window(
    meanwhile: bool,
) -> None:
    # 18 hours of traffic through a live router refreshing every 45 s, over a 6-hour
    # window: models near the gate, one degrading for a while then recovering (restored
    # regimes).  Once the window has slid, the live router holds what a router started
    # on the same store holds: the window's evidence, judged alike, none of it older.
    # Also when calls go on while a refresh runs (its slide walks in a worker thread)
    clock = FakeClock()
    pending: asyncio.Task[bool] | None = None
    store = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0, window_days=0.25)
    rng = random.Random(0)
    rates = {"nano": 0.93, "mini": 0.957, "small": 0.99, "mid": 0.995}
    async with AdaptiveModelRouter(
        registry(), store, policy=policy, seed=1, clock=clock, refresh_interval=None
    ) as live:
        for step in range(18 * 240):
            clock.advance(15.0)
            for model, rate in rates.items():
                degraded = model == "mini" and 6 * 240 <= step < 9 * 240
                r = rec(clock(), model, rng.random() < (0.90 if degraded else rate))
                await store.record(r)
                live.record_outcome(r)
            if step % 3 == 0 and not meanwhile:
                assert await live.refresh()
            elif step % 3 == 0:  # the last refresh ran while these calls came in
                assert pending is None or await pending
                pending = asyncio.create_task(live.refresh())
            await asyncio.sleep(0)
        if meanwhile:
            # no refresh after the last one (it would mend what a slide got wrong): a
            # router started at that refresh's window start reads the later calls too
            assert pending is not None and await pending
            assert live.last_refresh is not None
            later = (clock() - live.last_refresh) // 15.0  # calls after it, per model
            clock.set(live.last_refresh)
        else:
            later = 0
            clock.advance(5.0)
            assert await live.refresh()
        seen = view(live.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
    again = await restarted_view(store, clock, policy, ST)
    assert seen == again
    for _, _, window, effective in seen["candidates"]:  # type: ignore[attr-defined]
        assert 0 < effective <= window <= 6 * 240 + 8 + later


def _near_gate_traffic(steps: int) -> list[LLMCallRecord]:
    # four models near the gate, one every 15 s each; mini degraded for a while
    rng = random.Random(0)
    rates = {"nano": 0.93, "mini": 0.957, "small": 0.99, "mid": 0.995}
    start = FakeClock()()
    return [
        rec(start + 15.0 * (step + 1), model, rng.random() < (0.90 if bad else rate))
        for step in range(steps)
        for model, rate in rates.items()
        for bad in [model == "mini" and steps // 3 <= step < steps // 2]
    ]


@pytest.mark.parametrize("backend", [None, NullTelemetryBackend])
@pytest.mark.slow
async def test_a_router_without_a_store_moves_its_window_too(backend: Any) -> None:
    # no refresh runs without a store (or with the null backend): the window's start
    # still moves, so a long-running process holds the window's evidence, judged as a
    # router started on a store of the same calls judges it, and no more
    clock = FakeClock()
    store = MemoryTelemetryBackend()  # the same calls, for the router started on it
    policy = RoutingPolicy(explore_rate=0.0, window_days=0.25)
    telemetry = None if backend is None else backend()
    async with AdaptiveModelRouter(
        registry(), telemetry, policy=policy, seed=1, clock=clock, refresh_interval=None
    ) as live:
        for r in _near_gate_traffic(18 * 240):
            clock.set(r.timestamp.timestamp())
            await store.record(r)
            live.record_outcome(r)
            await asyncio.sleep(0)
        clock.advance(5.0)
        assert not await live.refresh()  # no store to read; waits for the window's move
        seen = view(live.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
    assert seen == await restarted_view(store, clock, policy, ST)
    for _, _, window, effective in seen["candidates"]:  # type: ignore[attr-defined]
        assert 0 < effective <= window <= 6 * 240 + 8


def test_a_router_used_without_an_event_loop_moves_its_window_at_once() -> None:
    # the same without a running event loop: the slide runs within the call that finds
    # the window's start moved on.  The router then holds what one that only ever saw
    # the window's calls holds: a one-hour window starts an hour back, in whole minutes
    clock = FakeClock()
    policy = RoutingPolicy(explore_rate=0.0, window_days=1 / 24)
    traffic = _near_gate_traffic(3 * 240)
    live = AdaptiveModelRouter(registry(), policy=policy, seed=1, clock=clock)
    for r in traffic:
        clock.set(r.timestamp.timestamp())
        live.record_outcome(r)
    seen = view(live.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
    start = math.floor((clock() - 3600.0) / 60.0) * 60.0
    fresh = AdaptiveModelRouter(registry(), policy=policy, seed=1, clock=clock)
    for r in traffic:
        if r.timestamp.timestamp() >= start:
            fresh.record_outcome(r)
    assert seen == view(fresh.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
    for _, _, window, _ in seen["candidates"]:  # type: ignore[attr-defined]
        assert 240 <= window <= 240 + 4  # an hour of calls, and up to a minute's more


def test_a_router_without_a_store_says_when_it_ignores_an_outcome_before_its_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    policy = RoutingPolicy(window_days=1.0)
    router = AdaptiveModelRouter(registry(), clock=clock, policy=policy)
    with caplog.at_level("DEBUG", logger="empathy_models.router"):
        for age_s in (2 * 86400.0, 3 * 86400.0, 60.0):
            router.record_outcome(rec(clock() - age_s, "nano", True))
    said = [r.levelname for r in caplog.records if "ignored an outcome" in r.getMessage()]
    assert said == ["WARNING", "DEBUG"]  # once, then quietly
    decision = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
    assert {c.model: c.sample_size for c in decision.candidates}["nano"] == 1


def test_an_outcome_stamped_ahead_of_the_clock_does_not_move_the_window() -> None:
    # without a store the window's start moves with the router's clock, not with the
    # outcomes' timestamps: one stamped ahead of the clock costs what a current one does
    # (it does not go over every arm to move the window) and moves nothing, not even
    # back to where the clock is after a step back (an NTP step), which would let in
    # outcomes from before the start the window has moved to
    clock = FakeClock()
    start = clock()
    router = AdaptiveModelRouter(registry(), clock=clock, policy=RoutingPolicy(window_days=1.0))
    router.record_outcome(rec(start, "nano", True))
    clock.advance(3600.0)
    router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]  # the window moves on
    clock.set(start)  # the clock is stepped back an hour
    router.record_outcome(rec(start + 7200.0, "nano", True))  # stamped ahead of the clock
    router.record_outcome(rec(start - 86400.0 + 60.0, "nano", True))  # before the window
    decision = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
    assert {c.model: c.sample_size for c in decision.candidates}["nano"] == 2


async def test_a_start_leaves_the_event_loop_free_and_takes_outcomes_meanwhile() -> None:
    # a start over thousands of buckets groups and builds its arms in a worker thread:
    # other tasks run meanwhile, and the outcomes they report are kept; a refresh
    # later, a restart agrees
    clock = FakeClock()
    store = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0)
    rng = random.Random(13)
    for _ in range(3000):  # two models, one call each a minute: 6,000 buckets
        clock.advance(60.0)
        for model, rate in (("nano", 0.93), ("mini", 0.99)):
            await store.record(rec(clock(), model, rng.random() < rate))
    clock.advance(60.0)
    router = AdaptiveModelRouter(
        registry(), store, policy=policy, seed=1, clock=clock, refresh_interval=None
    )
    starting = asyncio.create_task(router.start())
    meanwhile = 0
    while not starting.done():
        r = rec(clock() + meanwhile, "nano", rng.random() < 0.93)
        await store.record(r)
        router.record_outcome(r)
        meanwhile += 1
        await asyncio.sleep(0)
    await starting
    assert meanwhile > 1  # the start let this task run while it worked
    async with router:
        clock.advance(120.0)
        assert await router.refresh()
        seen = view(router.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
    assert seen == await restarted_view(store, clock, policy, ST)
    nano = next(c for c in seen["candidates"] if c[0] == "nano")  # type: ignore[attr-defined]
    assert nano[2] == 3000 + meanwhile


def test_a_walked_arm_is_taken_only_where_nothing_arrived_meanwhile() -> None:
    # arms built away from the event loop (Arm.walked) are taken over where the memory
    # still holds nothing of them; one that took a live outcome meanwhile is applied as
    # any refresh's buckets are.  Either way: what applying the buckets gives
    clock = FakeClock()
    rng = random.Random(14)
    records = []
    for _ in range(600):
        clock.advance(60.0)
        records += [rec(clock(), m, rng.random() < p) for m, p in (("nano", 0.9), ("mini", 0.99))]
    rows = EvidenceBatch(buckets=tuple(rollup(records)), version=1).rows
    changed: dict[Any, list[Any]] = {}
    for row in rows:
        changed.setdefault((WF, ST, row[3]), []).append((row[0], row_sums(row)))
    late = rec(clock() + 30.0, "nano", True)  # reported while the arms were being built
    test = RoutingPolicy().change_test
    states = []
    for walked in (True, False):
        memory = EvidenceMemory(test)
        memory.add(late, late.timestamp.timestamp())
        built = {k: Arm.walked(test, dict(v)) for k, v in changed.items()} if walked else None
        memory.apply(changed, 1, clock(), built)
        states.append(
            {
                key: (
                    arm.starts,
                    arm.data,
                    arm.saved,
                    [attrs.asdict(r) for r in arm.regimes],
                    arm.cur,
                    arm.window_n,
                    arm.cum_n,
                    arm.proof,
                )
                for key, arm in memory.arms.items()
            }
        )
    assert states[0] == states[1]
    assert len(states[0][(WF, ST, "mini")][0]) == 600


def _tracked() -> int:
    # objects the cyclic garbage collector tracks, once what can be collected is gone
    # (the second pass: the first one stops tracking tuples of plain values it meets)
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


async def test_the_evidence_book_leaves_the_garbage_collector_nothing_per_bucket() -> None:
    # every full collection walks each tracked object: a router holding a week of minute
    # buckets (hundreds of thousands at scale) must not add one per bucket to that walk
    clock = FakeClock()
    store = MemoryTelemetryBackend()
    rng = random.Random(12)
    for _ in range(3000):  # one call a minute: 3,000 buckets read at start
        clock.advance(60.0)
        await store.record(rec(clock(), "mini", rng.random() < 0.99))
    router = AdaptiveModelRouter(registry(), store, clock=clock, refresh_interval=None)
    await store.evidence(after_version=0)  # the store builds (and keeps) its rollups
    before = _tracked()
    async with router:
        assert sum(len(arm.starts) for arm in router._memory.arms.values()) == 3000
        started = _tracked()
        for _ in range(2000):  # and 2,000 more buckets from live outcomes
            clock.advance(60.0)
            router.record_outcome(rec(clock(), "nano", rng.random() < 0.99))
        router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
        live = _tracked()
    assert started - before < 300, started - before
    assert live - started < 300, live - started


def test_a_degraded_model_loses_its_traffic_and_the_decision_says_why() -> None:
    clock = FakeClock()
    router = AdaptiveModelRouter(
        registry(), clock=clock, seed=3, policy=RoutingPolicy(explore_rate=0.0)
    )
    rng = random.Random(4)
    for model, rate, n in [("nano", 0.995, 2000), ("mini", 0.995, 400)]:
        for _ in range(n):
            clock.advance(1.0)
            router.record_outcome(rec(clock(), model, rng.random() < rate))
    assert router.get_best_model(WF, ST, **ASK).model == "nano"  # type: ignore[arg-type]
    served = 0
    decision = None
    while True:
        decision = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
        if decision.model != "nano":
            break
        served += 1
        clock.advance(1.0)
        router.record_outcome(rec(clock(), "nano", rng.random() < 0.8))
    assert served <= 50
    assert decision.model == "mini" and decision.change is not None
    assert "acting on a detected change" in decision.reason and "nano" in decision.change
    nano = {c.model: c for c in decision.candidates}["nano"]
    assert nano.change is not None and nano.evidence_since is not None


def test_exploration_after_warm_up_stays_within_its_budget() -> None:
    clock = FakeClock()
    router = AdaptiveModelRouter(registry(), clock=clock, seed=5)
    rng = random.Random(6)
    truth = {"nano": 0.93, "mini": 0.99, "small": 0.99, "mid": 0.999}
    explored = 0
    for i in range(6000):
        d = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
        if i >= 1000:
            explored += d.exploration
        clock.advance(1.0)
        router.record_outcome(rec(clock(), d.model, rng.random() < truth[d.model]))
    assert explored / 5000 < 0.01
    assert router.get_best_model(WF, ST, **ASK).model == "mini"  # type: ignore[arg-type]


def test_each_exploration_says_what_it_is_for() -> None:
    # a cold start, cheaper challengers warmed up and measured from the budget, and the
    # near-gate model re-probed once rejected: each pick's kind matches its reason
    clock = FakeClock()
    router = AdaptiveModelRouter(
        registry(), clock=clock, seed=2, policy=RoutingPolicy(reprobe_interval=50)
    )
    rng = random.Random(8)
    truth = {"nano": 0.93, "mini": 0.99, "small": 0.99, "mid": 0.999}
    begins = {
        None: ("cheapest of", "the only eligible"),
        "unproven": ("no model is proven",),
        "warm-up": ("warm-up",),
        "budget": ("exploration budget",),
        "re-probe": ("re-probe",),
    }
    kinds: dict[str | None, int] = {}
    for _ in range(6000):
        d = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
        assert d.exploration is (d.exploration_kind is not None)
        assert d.reason.startswith(begins[d.exploration_kind]), (d.exploration_kind, d.reason)
        kinds[d.exploration_kind] = kinds.get(d.exploration_kind, 0) + 1
        clock.advance(1.0)
        router.record_outcome(rec(clock(), d.model, rng.random() < truth[d.model]))
    assert set(kinds) == set(begins), kinds


def test_untried_models_are_costed_on_the_stage_not_the_worst_case() -> None:
    clock = FakeClock()
    router = AdaptiveModelRouter(registry(), clock=clock, seed=1)
    for _ in range(50):
        clock.advance(1.0)
        router.record_outcome(rec(clock(), "nano", True, output_tokens=100))
    # small's worst case (500 in + 400 out) is $0.0021; its expected cost fits $0.001
    ask = {**ASK, "max_cost": 0.001}
    d = router.get_best_model(WF, ST, **ask)  # type: ignore[arg-type]
    small = {c.model: c for c in d.candidates}["small"]
    assert small.cost_basis == "prior" and small.expected_cost_usd == pytest.approx(0.0009)
    assert small.constraints["max_cost"].value == "eligible"
    strict = router.get_best_model(WF, ST, strict_cost=True, **ask)  # type: ignore[arg-type]
    small = {c.model: c for c in strict.candidates}["small"]
    assert small.cost_basis == "worst_case" and small.constraints["max_cost"].value == "rejected"


def test_an_eligible_model_near_the_limit_does_not_flap() -> None:
    clock = FakeClock()
    router = AdaptiveModelRouter(
        registry(), clock=clock, seed=1, policy=RoutingPolicy(explore_rate=0.0)
    )
    for _ in range(300):
        clock.advance(1.0)
        router.record_outcome(rec(clock(), "mini", True))
    ask = {**ASK, "candidates": ["mini"], "min_success_rate": 0.975}
    assert router.get_best_model(WF, ST, **ask).constraints_met  # type: ignore[arg-type]
    # a few failures pull the 95% lower bound under 0.975, but not the hysteresis bound
    for _ in range(3):
        clock.advance(1.0)
        router.record_outcome(rec(clock(), "mini", False))
    d = router.get_best_model(WF, ST, **ask)  # type: ignore[arg-type]
    mini = d.candidates[0]
    assert mini.success_rate_lower < 0.975 and d.constraints_met


async def test_routing_stats_are_a_typed_record() -> None:
    clock = FakeClock()
    store = MemoryTelemetryBackend()
    await fill(store, clock, None, [("mini", 1.0, 20)], random.Random(0))
    async with AdaptiveModelRouter(registry(), store, clock=clock, refresh_interval=None) as r:
        stats = await r.get_routing_stats(WF, ST)
    assert isinstance(stats, RoutingStats) and stats.total_calls == 20
    mini = stats.performance_by_model["mini"]
    assert isinstance(mini, ModelStats) and mini.calls == 20 and mini.success_rate == 1.0
    assert stats.to_dict()["performance_by_model"]["mini"]["calls"] == 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [3, 6, 11])
def test_the_change_test_ends_on_evidence_that_keeps_changing(seed: int) -> None:
    # Rates that change every 400 calls, at uneven arrival gaps: the change test once
    # re-detected a change inside the evidence that had just started one and looped for
    # ever (regimes piling up by the thousand) on these seeds.
    rng = random.Random(seed)
    arm = Arm(test=ChangeTest(threshold=rng.choice([2.0, 3.0, 5.0])))
    rates = [rng.choice([0.99, 0.8, 0.5, 0.95, 0.3]) for _ in range(6)]
    t = 0.0
    for i in range(3000):
        t += rng.choice([0.5, 5, 30, 61])
        arm.add(t, rng.random() < rates[(i // 400) % len(rates)], 300.0, 100, 50, 0.001)
    # the first regime, then at most one change detected per bucket
    assert len(arm.regimes) <= 1 + len(arm.starts)
    assert arm.summarize(1.96, 3.0, 1.0).samples > 0


async def _mini_verdicts(runs: list[tuple[int, int]]) -> tuple[str, str, str]:
    """``mini``'s success-rate verdict live (deciding after every call), after a refresh
    and after a restart, once ``runs`` (per minute bucket: successes, then failures) are
    recorded one a second."""
    clock = FakeClock()
    start = (int(clock()) // 60 + 1) * 60  # a bucket's first second
    store = MemoryTelemetryBackend()
    policy = RoutingPolicy(explore_rate=0.0)
    ask = {**ASK, "candidates": ["mini"]}

    def status(router: AdaptiveModelRouter) -> str:
        d = router.get_best_model(WF, ST, **ask)  # type: ignore[arg-type]
        return str(d.candidates[0].constraints["min_success_rate"].value)

    async with AdaptiveModelRouter(
        registry(), store, policy=policy, seed=1, clock=clock, refresh_interval=None
    ) as live:
        for minute, (ok, failed) in enumerate(runs):
            for i, success in enumerate([True] * ok + [False] * failed):
                ts = start + 60 * minute + i
                clock.set(ts)
                r = rec(ts, "mini", success)
                await store.record(r)
                live.record_outcome(r)
                status(live)  # a decision per call, as an executor makes
        clock.advance(1.0)
        seen_live = status(live)
        assert await live.refresh()
        refreshed = status(live)
    async with AdaptiveModelRouter(
        registry(), store, policy=policy, seed=2, clock=clock, refresh_interval=None
    ) as fresh:
        restarted = status(fresh)
    return seen_live, refreshed, restarted


async def test_the_success_rate_hysteresis_depends_on_the_evidence_alone() -> None:
    # proven in the middle of a minute (74 of 74), then one failure: the 95% bound falls
    # under 0.95 and the hysteresis bound does not; no bucket had ended proven, so no
    # router keeps it eligible, whether it saw the calls live or read them
    assert await _mini_verdicts([(60, 0), (14, 1)]) == ("unproven",) * 3
    # proven at the end of a minute (80 of 80), then one failure: every router keeps it
    assert await _mini_verdicts([(60, 0), (20, 0), (0, 1)]) == ("eligible",) * 3


def test_an_improvement_counts_once_its_minute_is_over() -> None:
    # a recovery detected in the minute still open is not acted on in that minute: a
    # failure later in the same minute would undo it (the change test runs per minute),
    # and acting at once flips the model in and out of the traffic
    clock = FakeClock()
    router = AdaptiveModelRouter(
        registry(), clock=clock, seed=3, policy=RoutingPolicy(explore_rate=0.0)
    )
    rng = random.Random(2)

    def report(ok: bool) -> None:
        clock.advance(1.0)
        router.record_outcome(rec(clock(), "nano", ok))

    def nano() -> CandidateEvaluation:
        decision = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
        return next(c for c in decision.candidates if c.model == "nano")

    for ok in outcomes(0.99, 3000, rng) + outcomes(0.8, 100, rng):
        report(ok)
    assert (nano().change or "").startswith("degraded")
    for _ in range(200):  # back to its old rate: successes until the change test sees it
        report(True)
        row = nano()
        if (row.change or "").startswith("improved"):
            break
    assert (row.change or "").startswith("improved"), row.change
    assert row.status is ConstraintStatus.UNPROVEN
    assert any("counts once a later minute" in r for r in row.reasons), row.reasons
    report(True)  # the same minute: still not acted on
    assert nano().status is ConstraintStatus.UNPROVEN
    clock.advance(60.0 - clock() % 60.0)  # the next minute
    report(True)
    row = nano()
    assert row.status is ConstraintStatus.ELIGIBLE and (row.change or "").startswith("improved")
