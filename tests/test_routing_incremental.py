"""
The verdict cache re-judges only the arms that live outcomes changed (the evidence
memory's change log), and a context new only in ``max_cost`` / ``max_tokens`` starts
from its sibling's verdicts: the decisions and their explanations must be exactly those
of a cache that looks at every arm before every decision and judges every new context
afresh, also when the log is trimmed.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import pytest

import empathy_models.routing._memory as memory_module
import empathy_models.routing._verdicts as verdicts_module
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
from tests._fakes import list_cost, priced_registry

START = 1_767_225_600.0


def _registry(n: int) -> ModelRegistry:
    rng = random.Random(n)
    return ModelRegistry(
        models=tuple(
            ModelInfo(
                id=f"m{i}",
                provider="openai",
                tier=ModelTier.CAPABLE,
                input_price_per_mtok=round(rng.uniform(0.1, 15.0), 3),
                output_price_per_mtok=round(rng.uniform(0.4, 75.0), 3),
                context_window=200_000,
                max_output_tokens=8_192,
            )
            for i in range(n)
        ),
        price_version="test",
    )


def _run(full_scan: bool) -> list[Any]:
    """Seeded outcomes and decisions; ``full_scan``: every arm looked at before each one."""
    registry = _registry(9)
    ids = [m.id for m in registry.models]
    now = [START]
    router = AdaptiveModelRouter(registry, seed=5, refresh_interval=None, clock=lambda: now[0])
    rng = random.Random(11)
    quality = {m: rng.uniform(0.7, 0.999) for m in ids}
    out: list[Any] = []
    for i in range(1_500):
        now[0] += 1.0
        model = rng.choice(ids)
        if i == 700:
            quality = {m: q * 0.8 for m, q in quality.items()}  # a change to detect
        ok = rng.random() < quality[model]
        stage = rng.choice(("a", "b"))
        latency_ms = rng.uniform(100, 3_000)
        tokens_in = rng.randint(10, 2_000)
        output_tokens = rng.randint(1, 800)
        router.record_outcome(
            LLMCallRecord(
                provider="openai",
                model=model,
                outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                workflow="wf",
                stage=stage,
                latency_ms=latency_ms,
                input_tokens=tokens_in,
                output_tokens=output_tokens,
                cost_usd=list_cost(registry, model, ok, tokens_in, output_tokens),
                timestamp=datetime.fromtimestamp(now[0], UTC),
            )
        )
        if full_scan:
            router._memory.resets += 1  # as after a refresh: every arm is looked at
            router._verdicts._latest.clear()  # and a new context is judged afresh
        input_tokens = rng.choice((None, 300, 1_200))
        try:
            decision = router.get_best_model(
                "wf",
                rng.choice(("a", "b")),
                candidates=rng.choice((ids, ids[:4])),
                input_tokens=input_tokens,
                max_tokens=rng.choice((None, 400, 400, 4_000)),
                strict_cost=input_tokens is not None and rng.random() < 0.2,
                max_cost=rng.choice((None, 0.01, 0.01, round(rng.uniform(0.002, 0.05), 6))),
                max_latency_ms=rng.choice((None, 2_500.0)),
                min_success_rate=0.85,
                on_no_match=rng.choice(("raise", "relax")),
                unavailable=rng.choice(((), (ids[0],))),
            )
            out.append(decision.to_dict())
        except NoModelMeetsConstraintsError as exc:
            out.append(dict(exc.reasons))
    return out


@pytest.mark.parametrize(("log_size", "max_contexts"), [(4_096, 1_024), (3, 1_024), (4_096, 8)])
def test_incremental_verdicts_decide_as_looking_at_every_arm(
    log_size: int, max_contexts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _run(full_scan=True)
    monkeypatch.setattr(memory_module, "LOG_SIZE", log_size)
    # a full context cache starts over (8: every few decisions; the 4 streams'
    # ledgers are kept)
    monkeypatch.setattr(verdicts_module, "MAX_CONTEXTS", max_contexts)
    assert _run(full_scan=False) == expected


def test_a_stream_keeps_one_exploration_budget_when_the_caches_start_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the exploration budgets (one per workflow, stage and candidates) start over when
    # too many streams were seen (4 here, 16,384 by default): no cached decision context
    # may keep the old budget of a stream while a new context of it gets a new one
    monkeypatch.setattr(verdicts_module, "MAX_CONTEXTS", 4)
    monkeypatch.setattr(verdicts_module, "MAX_STREAMS", 4)
    registry = priced_registry([("a", 1.0), ("b", 2.0)], "test")
    router = AdaptiveModelRouter(registry, seed=3, refresh_interval=None)

    def decide(stage: str, min_success_rate: float) -> None:
        router.get_best_model(
            "wf",
            stage,
            candidates=["a", "b"],
            input_tokens=100,
            max_tokens=400,
            min_success_rate=min_success_rate,
            on_no_match="relax",
        )

    for stage in ("s", "t", "u"):  # three streams
        decide(stage, 0.9)
    decide("s", 0.8)  # a fourth context: the context cache is full
    decide("s", 0.7)  # the context cache starts over; this one is kept, with s's budget
    decide("v", 0.9)  # a fourth stream
    decide("w", 0.9)  # a fifth: the budgets start over
    decide("s", 0.4)  # a new context of s, with s's new budget
    budgets = {
        id(ctx.exploration)
        for key, ctx in router._verdicts._contexts.items()
        if key[:2] == ("wf", "s")
    }
    assert len(budgets) == 1


def test_many_streams_keep_their_exploration_and_re_probes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # more streams than the decision-context cache holds (4 here, 1,024 by default),
    # decided in turn: the cache starts over again and again, but each stream keeps its
    # exploration state, so the cheaper model it rejected is still re-probed
    monkeypatch.setattr(verdicts_module, "MAX_CONTEXTS", 4)
    registry = priced_registry([("a", 1.0), ("b", 2.0)], "test")
    router = AdaptiveModelRouter(
        registry, seed=3, refresh_interval=None, policy=RoutingPolicy(reprobe_interval=10)
    )
    rng = random.Random(5)
    ask: dict[str, Any] = {"candidates": ["a", "b"], "input_tokens": 100, "max_tokens": 400}
    kinds: dict[str, list[str | None]] = {f"s{i}": [] for i in range(6)}
    for _ in range(300):
        for stage, seen in kinds.items():
            d = router.get_best_model("wf", stage, min_success_rate=0.9, **ask)
            seen.append(d.exploration_kind)
            ok = rng.random() < (0.5 if d.model == "a" else 0.99)  # a misses the limit
            router.record_outcome(_stage_call(d.model, ok, 100, stage=stage))
    for stage, seen in kinds.items():
        assert seen[-100:].count("re-probe") >= 2, (stage, seen[-100:])


def _stage_call(model: str, ok: bool, output_tokens: int, stage: str = "s") -> LLMCallRecord:
    """One call of stage wf/``stage``: 100 tokens in, ``output_tokens`` out (never priced)."""
    return LLMCallRecord(
        provider="openai",
        model=model,
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        workflow="wf",
        stage=stage,
        latency_ms=200.0,
        input_tokens=100,
        output_tokens=output_tokens,
    )


def test_an_untried_model_is_costed_on_the_stage_mean_after_every_outcome() -> None:
    # the stage's mean output tokens changes with every success on the other models;
    # the untried model's row must show it at once (its evidence did not change), up to
    # the call's max_tokens, where its output stops
    registry = priced_registry([("a", 1.0), ("b", 2.0), ("x", 0.5)], "test")
    router = AdaptiveModelRouter(registry, seed=3, refresh_interval=None)
    rng = random.Random(4)
    outputs: list[int] = []
    for i in range(60):
        tokens = rng.randint(1, 900)
        failed = i % 7 == 3  # failures do not move the mean
        if not failed:
            outputs.append(tokens)
        router.record_outcome(_stage_call(rng.choice(("a", "b")), not failed, tokens))
        decision = router.get_best_model(
            "wf",
            "s",
            candidates=["a", "b", "x"],
            input_tokens=100,
            max_tokens=400,
            max_cost=1.0,
            on_no_match="relax",
        )
        (row,) = [c for c in decision.candidates if c.model == "x"]
        mean = sum(outputs) / len(outputs)
        assert row.cost_basis == "prior"
        assert row.expected_cost_usd == pytest.approx(
            (100 * 0.5 + min(mean, 400) * 2.0) / 1e6, rel=1e-12
        )


@pytest.mark.parametrize("stated_prior", [None, 300.0])
def test_an_untried_model_moves_from_its_first_costing_to_the_stage_mean(
    stated_prior: float | None,
) -> None:
    # before any success in the stage an untried model is costed at max_tokens (or on
    # the policy's stated prior); from the first success on, on the stage's mean
    router = AdaptiveModelRouter(
        priced_registry([("a", 1.0), ("x", 0.5)], "test"),
        policy=RoutingPolicy(prior_output_tokens=stated_prior),
        seed=3,
        refresh_interval=None,
    )

    def row_of_x() -> Any:
        decision = router.get_best_model(
            "wf", "s", candidates=["a", "x"], input_tokens=100, max_tokens=400,
            max_cost=1.0, on_no_match="relax",
        )  # fmt: skip
        (row,) = [c for c in decision.candidates if c.model == "x"]
        return row

    first = row_of_x()
    out = 400.0 if stated_prior is None else stated_prior
    assert first.cost_basis == ("worst_case" if stated_prior is None else "prior")
    assert first.expected_cost_usd == pytest.approx((100 * 0.5 + out * 2.0) / 1e6, rel=1e-12)
    router.record_outcome(_stage_call("a", False, 0))
    assert row_of_x().expected_cost_usd == first.expected_cost_usd  # a failure moves nothing
    seen: list[int] = []
    for tokens in (120, 700, 333):
        router.record_outcome(_stage_call("a", True, tokens))
        seen.append(tokens)
        row = row_of_x()
        mean = sum(seen) / len(seen)
        assert row.cost_basis == "prior"
        assert row.expected_cost_usd == pytest.approx(
            (100 * 0.5 + min(mean, 400) * 2.0) / 1e6, rel=1e-12
        )


@pytest.mark.slow
def test_candidate_ids_outside_the_registry_are_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a new custom id in every call: whatever is kept of them must stay bounded (the
    # contexts and streams that hold them too: 4 of each here)
    monkeypatch.setattr(verdicts_module, "MAX_CONTEXTS", 4)
    monkeypatch.setattr(verdicts_module, "MAX_STREAMS", 4)
    router = AdaptiveModelRouter(
        priced_registry([("a", 1.0)], "test"), seed=3, refresh_interval=None
    )

    def decide(i: int) -> None:
        router.get_best_model(
            "wf", "s", candidates=["a", f"custom-model-{i:08d}"], on_no_match="relax"
        )

    tracemalloc.start()
    try:
        for i in range(3_000):
            decide(i)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3_000, 13_000):
            decide(i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 300_000  # ~1.25 MB if every id were kept
