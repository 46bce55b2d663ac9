"""
What the router holds follows its evidence window: the arms, stage priors and
recent-outcome windows of stages whose outcomes all left the window go, a refresh's
work does not grow with them, and decisions stay those of a router that never held them.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
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
from empathy_models.abc import TelemetryBackend
from empathy_models.backends import MemoryTelemetryBackend, telemetry_from_url
from empathy_models.records import CandidateEvaluation
from empathy_models.testing import FakeClock

pytest.importorskip("empathy_models.backends.sqlite", reason="the SQLite backend has not landed")

WF = "svc"
MODELS = ("gpt-4.1-nano", "gpt-4.1-mini")
DAY = 86400.0
PER_DAY = 24  # new stages (tenants) a day
WINDOW_DAYS = 7.0  # RoutingPolicy's default


def record(
    clock: FakeClock,
    stage: str,
    model: str,
    ok: bool = True,
    latency: float = 100.0,
    output_tokens: int = 10,
) -> LLMCallRecord:
    return LLMCallRecord(
        provider="openai",
        model=model,
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        timestamp=datetime.fromtimestamp(clock(), UTC),
        workflow=WF,
        stage=stage,
        latency_ms=latency,
        input_tokens=10,
        output_tokens=output_tokens,
        cost_usd=1e-5,
    )


def sizes(router: AdaptiveModelRouter) -> tuple[int, int, int]:
    # what the router holds: arms, stage priors, recent-outcome windows
    memory = router._memory
    return len(memory.arms), len(memory.priors), len(router._recent._rings)


async def churn(
    router: AdaptiveModelRouter, store: TelemetryBackend, clock: FakeClock, day: int
) -> None:
    # one day of a service with a stage per tenant: PER_DAY new tenants, 3 outcomes per
    # model each, a refresh every few tenants (and one at the day's end)
    for s in range(PER_DAY):
        records = [record(clock, f"tenant-{day}-{s}", m) for m in MODELS for _ in range(3)]
        await store.record_many(records)
        for r in records:
            router.record_outcome(r)
        clock.advance(DAY / PER_DAY)
        if s % 6 == 0:
            await router.refresh()
    await router.refresh()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_tenants_whose_outcomes_left_the_window_leave_the_router(
    tmp_path: Path, kind: str
) -> None:
    clock = FakeClock()
    store: TelemetryBackend = (
        MemoryTelemetryBackend(capacity=50_000)
        if kind == "memory"
        else telemetry_from_url(f"sqlite:///{tmp_path / 'calls.db'}")
    )
    router = AdaptiveModelRouter(
        ModelRegistry.default(), store, seed=1, refresh_interval=None, clock=clock
    )
    held: list[tuple[int, int, int]] = []
    async with store, router:
        for day in range(16):
            await churn(router, store, clock, day)
            held.append(sizes(router))
            # after a refresh no arm is left for the next one to visit but those with
            # buckets the store changes
            assert not router._memory.live
        # a tenant gone for more than the window is gone from the router: no arm, no
        # prior, no recent outcomes (a router started now reads none of them)
        assert router.recommend_tier_upgrade(WF, "tenant-0-0").window == 0
        assert (WF, "tenant-0-0", MODELS[0]) not in router._memory.arms
        assert (WF, "tenant-15-0", MODELS[0]) in router._memory.arms
        assert router.recommend_tier_upgrade(WF, "tenant-15-0").window == 3 * len(MODELS)
        # the workflow's own recent window is kept while it has recent outcomes
        assert router.recommend_tier_upgrade(WF, None).window == router.RECENT_WINDOW_SIZE

    # the window holds 7 days of tenants (and up to a step of 1/168 of it more)
    most = int((WINDOW_DAYS + 1) * PER_DAY)
    for day, (arms, priors, rings) in enumerate(held):
        tenants = min((day + 1) * PER_DAY, most)
        assert arms <= tenants * len(MODELS), (day, held)
        assert priors <= tenants, (day, held)
        assert rings <= tenants + 1, (day, held)  # + the workflow's own
    # from the second week on what it holds is flat, not growing by PER_DAY a day
    assert held[8:] == [held[8]] * (len(held) - 8), held
    assert held[8][0] >= int(WINDOW_DAYS * PER_DAY) * len(MODELS)


def test_a_router_without_a_store_lets_go_of_a_window_it_has_passed() -> None:
    clock = FakeClock()
    router = AdaptiveModelRouter(ModelRegistry.default(), seed=1, clock=clock)
    for i in range(300):
        router.record_outcome(record(clock, f"tenant-{i}", MODELS[0]))
    router.get_best_model(WF, "tenant-1", candidates=MODELS, on_no_match="relax")
    assert sizes(router) == (300, 300, 301)

    clock.advance(9 * DAY)  # every outcome is out of the 7-day window now
    router.record_outcome(record(clock, "tenant-new", MODELS[1]))  # moves the window
    assert sizes(router) == (1, 1, 2)
    assert "arms=1," in repr(router)
    assert router.recommend_tier_upgrade(WF, "tenant-1").window == 0
    decision = router.get_best_model(WF, "tenant-1", candidates=MODELS, on_no_match="relax")
    assert [c.sample_size for c in decision.candidates] == [0, 0]


def test_a_router_without_a_store_advises_on_no_outcome_it_ignored_as_too_old(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # outcomes from before the evidence window are not taken (a warning says so): the
    # tier advice must not count them either, as if they were the stage's recent calls
    clock = FakeClock()
    router = AdaptiveModelRouter(ModelRegistry.default(), seed=1, clock=clock)
    router.record_outcome(record(clock, "now", MODELS[0]))  # moves the window to now
    old = FakeClock(clock() - 8 * DAY)
    with caplog.at_level("WARNING", "empathy_models.router"):
        for _ in range(20):
            old.advance(1.0)
            router.record_outcome(record(old, "stale", MODELS[0], ok=False))
    assert "ignored an outcome" in caplog.text
    advice = router.recommend_tier_upgrade(WF, "stale")
    assert advice.window == 0 and not advice.should_upgrade, advice.reason
    assert router.recommend_tier_upgrade(WF, None).window == 1  # the one in the window


def test_an_arm_dropped_and_begun_again_is_judged_on_its_new_evidence() -> None:
    # the same number of outcomes before and after: the new arm's version equals the
    # one the cached verdict was judged at, and it must be judged all the same
    clock = FakeClock()
    router = AdaptiveModelRouter(
        ModelRegistry.default(), seed=1, clock=clock, policy=RoutingPolicy(explore_rate=0.0)
    )
    ask: dict[str, Any] = {
        "candidates": list(MODELS),
        "min_success_rate": 0.8,
        "on_no_match": "relax",
    }
    for _ in range(40):
        router.record_outcome(record(clock, "st", MODELS[0], ok=False))
        clock.advance(30)
    before = router.get_best_model(WF, "st", **ask)
    nano = before.candidates[0]
    assert nano.model == MODELS[0] and nano.sample_size == 40 and nano.success_rate == 0.0

    clock.advance(9 * DAY)
    for _ in range(40):  # the first one moves the window: the old arm goes
        router.record_outcome(record(clock, "st", MODELS[0], ok=True))
        clock.advance(30)
    after = router.get_best_model(WF, "st", **ask)
    nano = after.candidates[0]
    assert nano.sample_size == 40 and nano.success_rate == 1.0
    assert after.model == MODELS[0] and after.constraints_met


def view(d: RoutingDecision) -> list[tuple[object, ...]]:
    # every candidate's evidence, verdict and cost (not the pick: the two routers'
    # exploration and random draws went differently); floats to 9 digits, as outcomes
    # added live and the store's buckets sum in different orders
    return [
        tuple(
            float(f"{v:.9g}") if isinstance(v, float) else v
            for v in (getattr(c, f.name) for f in attrs.fields(CandidateEvaluation))
        )
        for c in d.candidates
    ]


def feed(clock: FakeClock, rng: random.Random, stages: list[str]) -> list[LLMCallRecord]:
    records: list[LLMCallRecord] = []
    for st in stages:
        for m in MODELS:
            p = rng.random()
            records.extend(
                record(
                    clock,
                    st,
                    m,
                    ok=rng.random() < p,
                    latency=rng.uniform(50, 3000),
                    output_tokens=rng.randint(1, 400),
                )
                for _ in range(rng.randint(0, 40))
            )
            clock.advance(7)
    return records


def asks(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [
        {
            "candidates": list(MODELS),
            "max_cost": rng.choice([None, 0.01, 0.0005]),
            "max_tokens": rng.choice([None, 64, 256]),
            "input_tokens": rng.choice([None, 100, 2000]),
            "min_success_rate": rng.choice([None, 0.5, 0.9]),
            "max_latency_ms": rng.choice([None, 1500.0]),
            "on_no_match": "relax",
        }
        for _ in range(n)
    ]


async def test_verdicts_after_eviction_equal_a_router_that_never_held_the_arms(
    tmp_path: Path,
) -> None:
    """
    A router that lived through the stages' first outcomes, judged them (its verdict
    cache holding their arms), let them go when their outcomes left the window and then
    saw some of them again judges every stage as a router started afterwards, which
    never held them, does.
    """
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    clock = FakeClock()
    stages = [f"s{i}" for i in range(30)]
    ask = asks(random.Random(7), len(stages))
    old_ones, kept, back = stages[:10], stages[10:20], stages[20:]
    async with (
        telemetry_from_url(url) as store,
        AdaptiveModelRouter(
            ModelRegistry.default(), store, seed=1, clock=clock, refresh_interval=None
        ) as lived,
    ):

        async def report(records: list[LLMCallRecord]) -> None:
            await store.record_many(records)
            for r in records:
                lived.record_outcome(r)

        await report(feed(clock, random.Random(1), [*old_ones, *back]))
        await lived.refresh()
        for st, kw in zip(stages, ask, strict=True):  # judged: the verdict cache holds their arms
            lived.get_best_model(WF, st, **kw)
        clock.advance(5 * DAY)
        await report(feed(clock, random.Random(2), kept))
        await lived.refresh()
        clock.advance(3 * DAY)  # the first outcomes are out of the window now
        await lived.refresh()
        assert all((WF, st, m) not in lived._memory.arms for st in old_ones for m in MODELS)
        await report(feed(clock, random.Random(3), back))  # some reported live only
        await lived.refresh()
        await report(feed(clock, random.Random(4), back[::2]))
        clock.advance(60)
        await store.flush()
        async with AdaptiveModelRouter(
            ModelRegistry.default(), store, seed=1, clock=clock, refresh_interval=None
        ) as started:
            for st, kw in zip(stages, ask, strict=True):
                assert view(lived.get_best_model(WF, st, **kw)) == view(
                    started.get_best_model(WF, st, **kw)
                ), st
            # the stages gone are judged on no evidence, as before they had any
            for st, kw in zip(old_ones, ask[: len(old_ones)], strict=True):
                decision = lived.get_best_model(WF, st, **kw)
                assert [c.sample_size for c in decision.candidates] == [0, 0]
            assert sizes(lived)[:2] == sizes(started)[:2]
