"""Restart: a new router over the same SQLite file picks what the old one picked."""

from __future__ import annotations

import json
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    LLMCallRecord,
    ModelRegistry,
    Outcome,
    RoutingDecision,
    RoutingPolicy,
    telemetry_from_url,
)
from empathy_models.routing import TierRecommendation
from empathy_models.testing.clock import FakeClock
from tests._fakes import list_cost, priced_registry

pytest.importorskip("empathy_models.backends.sqlite", reason="the SQLite backend has not landed")

WF, ST = "billing", "summarize"
MODELS = [("nano", 0.1), ("mini", 0.4), ("small", 1.0)]
# (model, successes, failures, latency) as observed before the restart
HISTORY = [("nano", 120, 80, 150.0), ("mini", 300, 2, 400.0), ("small", 150, 0, 350.0)]
ASK: dict[str, object] = {
    "candidates": [m for m, _ in MODELS],
    "input_tokens": 800,
    "max_tokens": 300,
    "min_success_rate": 0.95,
    "max_latency_ms": 2000.0,
}


def registry() -> ModelRegistry:
    return priced_registry(MODELS, "restart-test")


PRICES = registry()


def summary(d: RoutingDecision) -> dict[str, object]:
    return {
        "model": d.model,
        "constraints_met": d.constraints_met,
        "exploration": d.exploration,
        "sizes": {c.model: c.sample_size for c in d.candidates},
        "statuses": {c.model: c.status.value for c in d.candidates},
    }


async def run_before_restart(url: str, clock: FakeClock) -> dict[str, object]:
    policy = RoutingPolicy(explore_rate=0.0)
    async with (
        telemetry_from_url(url) as store,
        AdaptiveModelRouter(
            registry(), store, policy=policy, seed=1, clock=clock, refresh_interval=None
        ) as router,
    ):
        # what the executor does with every attempt: record it and tell the router
        rows = [(m, i < s, lat) for m, s, f, lat in HISTORY for i in range(s + f)]
        for model, ok, latency in rows:
            clock.advance(2.0)
            record = LLMCallRecord(
                provider="openai",
                model=model,
                outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                timestamp=datetime.fromtimestamp(clock(), UTC),
                workflow=WF,
                stage=ST,
                input_tokens=800,
                output_tokens=120,
                cost_usd=list_cost(PRICES, model, ok, 800, 120),
                latency_ms=latency,
            )
            await store.record(record)
            router.record_outcome(record)
        await store.flush()
        return summary(router.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]


async def test_a_new_router_over_the_same_sqlite_store_picks_the_same_model(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    clock = FakeClock()
    before = await run_before_restart(url, clock)
    assert before["model"] == "mini" and before["constraints_met"] is True

    clock.advance(30.0)  # the restart takes a while
    async with AdaptiveModelRouter(
        registry(),
        url,  # a fresh backend, owned by the new router
        policy=RoutingPolicy(explore_rate=0.0),
        seed=2,
        clock=clock,
        refresh_interval=None,
    ) as fresh:
        after = summary(fresh.get_best_model(WF, ST, **ASK))  # type: ignore[arg-type]
        stats = await fresh.get_routing_stats(WF, ST)
    assert after == before
    assert stats.telemetry == "ok" and stats.models_used == ("mini", "nano", "small")
    assert stats.total_calls == sum(s + f for _, s, f, _ in HISTORY)
    assert stats.performance_by_model["mini"].success_rate == pytest.approx(300 / 302)


@pytest.mark.multiprocess
async def test_a_new_process_over_the_same_sqlite_store_picks_the_same_model(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    clock = FakeClock()
    before = await run_before_restart(url, clock)
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from empathy_models import AdaptiveModelRouter, RoutingPolicy
        from tests.test_router_restart import ASK, WF, ST, registry, summary

        async def main():
            now = {clock() + 60.0!r}
            async with AdaptiveModelRouter(
                registry(), {url!r}, policy=RoutingPolicy(explore_rate=0.0),
                seed=3, clock=lambda: now, refresh_interval=None,
            ) as router:
                print(json.dumps(summary(router.get_best_model(WF, ST, **ASK))))

        asyncio.run(main())
        """
    )
    with anyio.fail_after(60):
        out = await anyio.run_process([sys.executable, "-c", script])
    assert json.loads(out.stdout.decode()) == before


@pytest.mark.multiprocess
async def test_a_running_router_learns_from_another_process_on_refresh(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    clock = FakeClock()
    async with AdaptiveModelRouter(
        registry(),
        url,
        policy=RoutingPolicy(explore_rate=0.0),
        seed=4,
        clock=clock,
        refresh_interval=None,
    ) as router:
        first = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
        assert first.exploration  # nothing known yet
        # another worker process records its calls into the same file
        start = clock()
        script = textwrap.dedent(
            f"""
            import asyncio, sys
            from datetime import UTC, datetime
            sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            from empathy_models import LLMCallRecord, Outcome, telemetry_from_url
            from tests.test_router_restart import HISTORY, WF, ST

            async def main():
                t = {start!r}
                async with telemetry_from_url({url!r}) as store:
                    for model, s, f, latency in HISTORY:
                        for i in range(s + f):
                            t += 1.0
                            await store.record(LLMCallRecord(
                                provider="openai", model=model,
                                outcome=Outcome.SUCCESS if i < s else Outcome.FAILURE,
                                timestamp=datetime.fromtimestamp(t, UTC),
                                workflow=WF, stage=ST, input_tokens=800,
                                output_tokens=120, latency_ms=latency))
                    await store.flush()
                print(t)

            asyncio.run(main())
            """
        )
        with anyio.fail_after(60):
            out = await anyio.run_process([sys.executable, "-c", script])
        clock.set(float(out.stdout.decode()) + 1.0)
        assert router.get_best_model(WF, ST, **ASK).exploration  # type: ignore[arg-type]
        assert await router.refresh()
        learned = router.get_best_model(WF, ST, **ASK)  # type: ignore[arg-type]
    assert learned.model == "mini" and learned.constraints_met and not learned.exploration
    sizes = {c.model: c.sample_size for c in learned.candidates}
    assert sizes == {m: s + f for m, s, f, _ in HISTORY}


async def test_tier_advice_for_calls_without_a_stage_survives_a_restart(tmp_path: Path) -> None:
    # recommend_tier_upgrade(workflow, None) judges a workflow's calls whatever their
    # stage: a restarted router over the same file sees what the live one saw, also for
    # a workflow whose calls carry no stage (alone, or next to staged ones)
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    clock = FakeClock()
    shapes: dict[str, list[str | None]] = {"unstaged": [None], "mixed": [None, "draft"]}
    live: dict[str, tuple[int, int, bool]] = {}
    async with (
        telemetry_from_url(url) as store,
        AdaptiveModelRouter(registry(), store, clock=clock, refresh_interval=None) as router,
    ):
        for workflow, stages in shapes.items():
            for i in range(20):
                clock.advance(1.0)
                record = LLMCallRecord(
                    provider="openai",
                    model="mini",
                    outcome=Outcome.SUCCESS if i % 2 else Outcome.FAILURE,
                    timestamp=datetime.fromtimestamp(clock(), UTC),
                    workflow=workflow,
                    stage=stages[i % len(stages)],
                )
                await store.record(record)
                router.record_outcome(record)
            advice = router.recommend_tier_upgrade(workflow, None)
            live[workflow] = (advice.window, advice.failures, advice.should_upgrade)
    assert live == {"unstaged": (20, 10, True), "mixed": (20, 10, True)}
    clock.advance(60.0)
    async with AdaptiveModelRouter(registry(), url, clock=clock, refresh_interval=None) as fresh:
        for workflow in shapes:
            advice = fresh.recommend_tier_upgrade(workflow, None)
            assert (advice.window, advice.failures, advice.should_upgrade) == live[workflow]


Call = tuple[str | None, str | None, Outcome]
"""A call's workflow, stage and outcome."""


async def advice_live_and_restarted(
    tmp_path: Path, calls: list[Call], asked: list[tuple[str, str | None]]
) -> tuple[list[TierRecommendation], list[TierRecommendation]]:
    """
    ``calls`` of one model, a second apart, recorded into a SQLite store and told to a
    live router (as the executor does); the tier advice for each (workflow, stage) of
    ``asked``: the live router's, then a router's restarted a minute later over the
    same file.
    """
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    clock = FakeClock()
    async with (
        telemetry_from_url(url) as store,
        AdaptiveModelRouter(registry(), store, clock=clock, refresh_interval=None) as router,
    ):
        for workflow, stage, outcome in calls:
            clock.advance(1.0)
            record = LLMCallRecord(
                provider="openai",
                model="nano",
                outcome=outcome,
                timestamp=datetime.fromtimestamp(clock(), UTC),
                workflow=workflow,
                stage=stage,
            )
            await store.record(record)
            router.record_outcome(record)
        live = [router.recommend_tier_upgrade(wf, st) for wf, st in asked]
    clock.advance(60.0)
    async with AdaptiveModelRouter(registry(), url, clock=clock, refresh_interval=None) as fresh:
        return live, [fresh.recommend_tier_upgrade(wf, st) for wf, st in asked]


async def test_tier_advice_after_a_restart_skips_newer_calls_that_are_not_samples(
    tmp_path: Path,
) -> None:
    # 20 calls (8 failed), then 15 answers from the response cache and 5 cancelled
    # calls: the live router's window holds the 20 calls, and so must a restarted one's
    outcomes = [Outcome.FAILURE if i % 5 < 2 else Outcome.SUCCESS for i in range(20)]
    outcomes += [Outcome.CACHE_HIT] * 15 + [Outcome.CANCELLED] * 5
    live, restarted = await advice_live_and_restarted(
        tmp_path, [(WF, ST, outcome) for outcome in outcomes], [(WF, ST), (WF, None)]
    )
    assert [(a.window, a.failures, a.should_upgrade) for a in live] == [(20, 8, True)] * 2
    assert restarted == live


async def test_tier_advice_for_calls_without_a_workflow_or_stage_survives_a_restart(
    tmp_path: Path,
) -> None:
    # calls without a workflow (all failed), a workflow's calls without a stage (all
    # fine) and one of its stages (all failed): every window a restarted router holds
    # is the live one's, the stage-less ones ("") included
    groups: list[Call] = [
        (None, None, Outcome.FAILURE),
        ("wf", None, Outcome.SUCCESS),
    ]
    groups += [("wf", "s1", Outcome.FAILURE), ("", "", Outcome.FAILURE)]
    asked: list[tuple[str, str | None]] = [
        ("", ""),
        ("", None),
        ("wf", ""),
        ("wf", None),
        ("wf", "s1"),
    ]
    live, restarted = await advice_live_and_restarted(
        tmp_path, [group for group in groups for _ in range(12)], asked
    )
    assert [(a.window, a.failures) for a in live] == [
        (20, 20),
        (20, 20),
        (12, 0),
        (20, 12),
        (12, 12),
    ]
    assert restarted == live
