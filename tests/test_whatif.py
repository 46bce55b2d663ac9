"""
What-if (`empathy_models.whatif`, ``empathy-models routing whatif``): a routing policy
evaluated on recorded telemetry, judged against known truth and against the demo run
under the policy.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import attrs
import pytest

from empathy_models import (
    ConfigurationError,
    LLMCallRecord,
    Outcome,
    RoutingDecision,
    RoutingPolicy,
    telemetry_from_url,
)
from empathy_models._propensity import routing_propensity
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.cli.demo import _demo_registry, run_demo
from empathy_models.evidence import EvidenceBatch
from empathy_models.records import wilson_interval
from empathy_models.whatif import (
    Interval,
    StageEvidence,
    WhatIfReport,
    evaluate_policy,
    ipw_estimate,
    load_stage_evidence,
    simulate_policy,
    sweep_min_success_rate,
)

from ._cli import run_cli
from ._fakes import OtherInt
from ._whatif_synth import BY_ID, NOW, REGISTRY, ST, WF, history

# --------------------------------------------------------------------------- known truth


@pytest.mark.parametrize(
    ("candidates", "chosen", "seeds", "requests"),
    [
        # the cheaper model is truly below the gate: the policy's truth is the oracle's cost
        (None, "oracle", 10, 400),
        # only the two pricier models: the policy's truth is the cheaper of them
        (["pricey", "premium"], "pricey", 10, 200),
    ],
)
# 10 seeds of 30 replicates: ~8 s alone, minutes on a loaded machine (the benchmark,
# bench_whatif, judges the same bars over 40 seeds)
@pytest.mark.timeout(600)
@pytest.mark.slow
async def test_cost_estimate_is_within_5_percent_and_its_interval_covers_the_truth(
    tmp_path: Path, candidates: list[str] | None, chosen: str, seeds: int, requests: int
) -> None:
    """
    A store drawn from known truth (a week, 3,000 calls, four models); min_success_rate
    0.95, 30 replicates (the default) of 400 requests (the default; 200 for the second
    case, to keep the suite quick).  The truth of the policy's cost per request is the
    true expected cost of the cheapest truly compliant model.  Over the seeds the
    estimate is within 5% of it every time and the stated 95% interval covers it in
    >= 90% of them (the issue's bar).
    """
    truth = BY_ID[chosen].cost_per_call
    errors: list[float] = []
    covered = 0
    for seed in range(seeds):
        async with SQLiteTelemetryBackend(tmp_path / f"seed{seed}.db") as backend:
            await backend.record_many(history(seed, 3_000))
            report = await evaluate_policy(
                backend,
                WF,
                ST,
                registry=REGISTRY,
                now=NOW,
                min_success_rate=0.95,
                candidates=candidates,
                requests=requests,
                ipw_limit=0,
                seed=seed,
            )
        estimate = report.cost_per_request
        assert estimate.estimate is not None
        errors.append(estimate.estimate / truth - 1.0)
        covered += estimate.covers(truth)
        top = report.traffic[0]
        assert top.model == chosen, report.traffic
    assert max(abs(e) for e in errors) <= 0.05, errors
    assert covered >= 0.9 * seeds, (covered, errors)


async def test_a_tighter_policy_costs_more_and_a_model_without_data_is_unknown(
    tmp_path: Path,
) -> None:
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many(history(1, 2_000))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    loose, tight = await sweep_min_success_rate(
        evidence, [0.7, 0.95], registry=REGISTRY, requests=150, replicates=10
    )
    assert loose.cost_per_request.estimate is not None
    assert tight.cost_per_request.estimate is not None
    assert loose.cost_per_request.estimate < tight.cost_per_request.estimate
    assert tight.constraints["min_success_rate"] == 0.95
    assert tight.price_version == "synth-1"
    # a registry model that never served the stage: reported unknown, never assumed good
    registry = REGISTRY.with_models(
        attrs.evolve(REGISTRY.get("cheap-bad"), id="untried", input_price_per_mtok=0.1)
    )
    report = await simulate_policy(
        evidence,
        registry=registry,
        min_success_rate=0.95,
        candidates=["untried", "oracle"],
        requests=150,
        replicates=10,
    )
    assert report.unknown_models == ("untried",)
    fit = {m.model: m for m in report.models}["untried"]
    assert fit.known is False and fit.success_rate is None and fit.samples == 0
    assert any("untried" in n and "unknown" in n for n in report.notes)
    traffic = {t.model: t for t in report.traffic}
    assert traffic["untried"].known is False
    # the router explores the cheaper unknown model; what it does there is not known,
    # so the success interval is wider than the oracle's alone would make it
    assert (traffic["untried"].share.estimate or 0.0) > 0.0
    only_oracle = await simulate_policy(
        evidence,
        registry=registry,
        min_success_rate=0.95,
        candidates=["oracle"],
        requests=150,
        replicates=10,
    )
    width = report.success_rate.high - report.success_rate.low  # type: ignore[operator]
    narrow = only_oracle.success_rate.high - only_oracle.success_rate.low  # type: ignore[operator]
    assert width > narrow


async def test_a_candidate_neither_registered_nor_recorded_is_noted_as_unpriced(
    tmp_path: Path,
) -> None:
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many(history(1, 500))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    report = await simulate_policy(
        evidence,
        registry=REGISTRY,
        candidates=["oracle", "oracel"],
        requests=50,
        replicates=2,
    )
    assert report.unknown_models == ("oracel",)
    [note] = [n for n in report.notes if "oracel" in n and "registry" in n]
    assert "no price" in note and "$0" in note


async def _all_pinned_to_premium(evidence: StageEvidence, *, replicates: int) -> WhatIfReport:
    """50 requests simulated with every one pinned to "premium" (nothing meets a 1 ms p95)."""
    return await simulate_policy(
        evidence,
        registry=REGISTRY,
        max_latency_ms=1.0,
        on_no_match="premium",
        requests=50,
        replicates=replicates,
    )


async def test_a_model_pinned_by_on_no_match_without_calls_is_reported_unknown() -> None:
    # "premium" never served the stage; nothing meets 1 ms, so every request is pinned to it
    records = [r for r in history(1, 500) if r.model != "premium"]
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(records)
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    assert "premium" not in evidence.models
    report = await _all_pinned_to_premium(evidence, replicates=2)
    traffic = {t.model: t for t in report.traffic}
    assert traffic["premium"].share.estimate == 1.0 and traffic["premium"].known is False
    assert report.unknown_models == ("premium",)
    assert any(n.startswith("premium: no calls in the window") for n in report.notes)


async def test_a_model_outside_the_registry_cannot_be_pinned_by_on_no_match() -> None:
    """
    A deployed router pins only a registry model (the executor's candidates are its
    registry's): a policy pinning a recorded model the registry lacks cannot run, so it is
    refused, as the router refuses it live.  It was simulated as taking every request at
    its recorded cost, beside a note saying the router cannot choose it.
    """
    records = [
        attrs.evolve(r, model="mystery") if i % 2 else r for i, r in enumerate(history(1, 300))
    ]
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(records)
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    assert "mystery" in evidence.models and "mystery" not in REGISTRY
    with pytest.raises(ConfigurationError, match="on_no_match pins 'mystery', which is not in"):
        await simulate_policy(
            evidence,
            registry=REGISTRY,
            max_latency_ms=1.0,
            on_no_match="mystery",
            requests=20,
            replicates=2,
        )


async def test_a_model_with_only_billed_failures_shows_what_the_simulation_charges() -> None:
    # "premium" (in the registry) only failed, each attempt billed $0.002 (a stream cut off)
    others = [r for r in history(1, 500) if r.model != "premium"]
    failed = [
        attrs.evolve(
            others[0],
            model="premium",
            call_id=f"premium-{i}",
            outcome=Outcome.FAILURE,
            timestamp=NOW - timedelta(minutes=30 * (i + 1)),
            input_tokens=0,
            output_tokens=0,
            cost_usd=0.002,
        )
        for i in range(200)
    ]
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many([*others, *failed])
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    assert evidence.fits["premium"].successes == 0
    report = await _all_pinned_to_premium(evidence, replicates=5)
    [premium] = [t for t in report.traffic if t.model == "premium"]
    assert premium.share.estimate == 1.0
    # what each of its attempts was recorded to cost, as each simulated failure is charged
    assert premium.cost_per_call_usd == pytest.approx(0.002)
    assert report.cost_per_request.estimate == pytest.approx(0.002, rel=0.05)


async def test_a_stage_without_a_successful_call_has_no_made_up_latency_or_cost() -> None:
    """
    Every recorded call of the stage failed ("oracle"), and "pricey" never served it:
    nothing measured how long a call takes or how many tokens it uses.  The simulated
    p95 latency and the cost per request are not estimated (they were a 5,180 ms p95,
    from a made-up one-second median, and $0, zero-width intervals), and a note says
    why; given input_tokens and max_tokens, the calls are costed at that size.
    """
    failed = [
        attrs.evolve(r, model="oracle", outcome=Outcome.FAILURE, output_tokens=0, cost_usd=0.0)
        for r in history(1, 200)
    ]
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(failed)
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    assert evidence.fits["oracle"].successes == 0
    quick: dict[str, Any] = {
        "registry": REGISTRY,
        "candidates": ["oracle", "pricey"],
        "requests": 50,
        "replicates": 4,
    }
    report = await simulate_policy(evidence, **quick)
    assert report.success_rate.estimate is not None  # requests were served
    assert report.latency_p95_ms == Interval.none()
    assert report.cost_per_request == Interval.none()
    assert report.to_dict()["cost_per_1k"] == {"estimate": None, "low": None, "high": None}
    assert any(n.startswith("no call of this stage succeeded in the window") for n in report.notes)
    # no other model's tokens to take, and the notes do not claim any
    assert not any("stage's other models" in n for n in report.notes)
    sized = await simulate_policy(evidence, input_tokens=1_000, max_tokens=500, **quick)
    most = (1_000 * BY_ID["pricey"].input_price + 500 * BY_ID["pricey"].output_price) / 1e6
    assert sized.cost_per_request.estimate is not None
    assert 0.0 < sized.cost_per_request.estimate < most
    assert sized.latency_p95_ms == Interval.none()


async def test_a_note_quotes_a_model_name_that_could_be_misread(tmp_path: Path) -> None:
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many(history(1, 500))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    odd = "new\nmodel"
    report = await simulate_policy(
        evidence, registry=REGISTRY, candidates=["oracle", odd], requests=50, replicates=2
    )
    notes = [n for n in report.notes if "registry" in n]
    assert notes and all(n.startswith(f"{odd!r}: ") for n in notes)


async def test_the_share_of_requests_no_model_would_qualify_for(tmp_path: Path) -> None:
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many(history(2, 2_000))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    # every model's p50 is ~400 ms: a 50 ms p95 bound rejects them all
    raised = await simulate_policy(
        evidence, registry=REGISTRY, max_latency_ms=50.0, requests=50, replicates=4
    )
    assert raised.no_match_share.estimate == 1.0
    assert raised.cost_per_request.estimate == 0.0
    assert raised.success_rate.estimate is None  # no request was served
    relaxed = await simulate_policy(
        evidence,
        registry=REGISTRY,
        max_latency_ms=50.0,
        on_no_match="relax",
        requests=50,
        replicates=4,
    )
    assert relaxed.no_match_share.estimate == 1.0
    assert (relaxed.cost_per_request.estimate or 0.0) > 0.0
    assert relaxed.success_rate.estimate is not None
    fine = await simulate_policy(
        evidence, registry=REGISTRY, max_latency_ms=5_000.0, requests=50, replicates=4
    )
    assert fine.no_match_share.estimate == 0.0


async def test_requests_answered_while_no_model_is_proven_are_not_unmatched(
    tmp_path: Path,
) -> None:
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many(history(2, 2_000))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    # no model proves 99.9% on this evidence, yet some may meet it: the router answers
    # by exploring them instead of raising (on_no_match="raise" never applies)
    report = await simulate_policy(
        evidence, registry=REGISTRY, min_success_rate=0.999, requests=50, replicates=4
    )
    served = sum(t.share.estimate or 0.0 for t in report.traffic)
    assert served == pytest.approx(1.0)
    assert report.cost_per_request.estimate and report.success_rate.estimate
    assert report.no_match_share.estimate == 0.0  # the figures agree: none went unanswered
    assert (report.unproven_share.estimate or 0.0) > 0.5  # and they say why it is so
    assert report.to_dict()["unproven_share"] == report.unproven_share.to_dict()
    # where no model qualifies, none is answered unproven: the shares never overlap
    raised = await simulate_policy(
        evidence, registry=REGISTRY, max_latency_ms=50.0, requests=50, replicates=4
    )
    assert raised.no_match_share.estimate == 1.0 and raised.unproven_share.estimate == 0.0


async def test_invalid_arguments_are_configuration_errors(tmp_path: Path) -> None:
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many(history(3, 300))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
        with pytest.raises(ConfigurationError, match="days"):
            await load_stage_evidence(backend, WF, ST, days=0)
        with pytest.raises(ConfigurationError, match="workflow"):
            await load_stage_evidence(backend, "", ST)
        # names the router refuses (no store keeps them as given) are refused at once
        with pytest.raises(ConfigurationError, match=r"^stage must be valid text"):
            await load_stage_evidence(backend, WF, "caf\udce9")
        with pytest.raises(ConfigurationError, match=r"^workflow must not contain a NUL"):
            await load_stage_evidence(backend, "n\x00ul", ST)
        with pytest.raises(ConfigurationError, match="not other/stage"):
            await evaluate_policy(backend, "other", "stage", evidence=evidence)
        with pytest.raises(ConfigurationError, match="ipw_limit"):
            await evaluate_policy(backend, WF, ST, ipw_limit=-1)
        empty = await load_stage_evidence(backend, WF, "nothing-here", registry=REGISTRY)
    with pytest.raises(ConfigurationError, match="replicates"):
        await simulate_policy(evidence, registry=REGISTRY, replicates=1)
    with pytest.raises(ConfigurationError, match="requests"):
        await simulate_policy(evidence, registry=REGISTRY, requests=0)
    with pytest.raises(ConfigurationError, match="no calls recorded"):
        await simulate_policy(empty, registry=REGISTRY)
    with pytest.raises(ConfigurationError, match="min_success_rate"):
        await simulate_policy(evidence, registry=REGISTRY, min_success_rate=1.5, replicates=2)


async def test_a_seed_or_max_tokens_of_the_wrong_type_is_a_configuration_error() -> None:
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(history(3, 300))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    quick: dict[str, Any] = {"registry": REGISTRY, "requests": 5, "replicates": 2}
    seeds: list[Any] = ["1", None, 1.5, True]
    for seed in seeds:
        with pytest.raises(ConfigurationError, match=r"^seed must be an integer"):
            await simulate_policy(evidence, seed=seed, **quick)
    caps: list[Any] = ["100", 1.5, -1]
    for max_tokens in caps:
        with pytest.raises(ConfigurationError, match=r"^max_tokens must be an integer >= 0"):
            await simulate_policy(evidence, max_tokens=max_tokens, **quick)
    with pytest.raises(ConfigurationError, match=r"^seed must be an integer"):
        await sweep_min_success_rate(evidence, [0.9], seed="1", **quick)
    assert (await simulate_policy(evidence, seed=-3, max_tokens=0, **quick)).requests == 5


async def test_counts_of_another_integer_type_are_taken_as_the_plain_integers() -> None:
    # numpy's int64 (no int) was refused as no integer
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(history(3, 300))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    plain = await simulate_policy(
        evidence,
        registry=REGISTRY,
        requests=5,
        replicates=2,
        seed=-3,
        max_tokens=0,
        min_success_rate=0.75,
    )
    other = await simulate_policy(
        evidence,
        registry=REGISTRY,
        requests=OtherInt(5),  # type: ignore[arg-type]
        replicates=OtherInt(2),  # type: ignore[arg-type]
        seed=OtherInt(-3),  # type: ignore[arg-type]
        max_tokens=OtherInt(0),  # type: ignore[arg-type]
        min_success_rate=Fraction(3, 4),  # type: ignore[arg-type]
    )
    assert other == plain


async def test_limits_of_other_number_types_are_reported_as_the_plain_numbers() -> None:
    # the router takes a Decimal or -0.0 as the plain float; the report kept them as
    # given: its to_dict() was no JSON (Decimal) and showed min_success_rate=-0.0
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(history(3, 300))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    quick: dict[str, Any] = {"registry": REGISTRY, "requests": 5, "replicates": 2}
    report = await simulate_policy(
        evidence,
        max_cost=Decimal("0.5"),  # type: ignore[arg-type]
        max_latency_ms=Decimal("9000"),  # type: ignore[arg-type]
        max_ttft_ms=Fraction(9000),  # type: ignore[arg-type]
        min_success_rate=-0.0,
        **quick,
    )
    limits = [report.constraints[k] for k in ("max_cost", "max_latency_ms", "max_ttft_ms")]
    assert repr(limits) == "[0.5, 9000.0, 9000.0]"
    assert repr(report.constraints["min_success_rate"]) == "0.0"
    json.dumps(report.to_dict())
    # refused before any draw, naming the limit, as the router refuses it
    with pytest.raises(ConfigurationError, match=r"^max_cost must be a finite number"):
        await simulate_policy(evidence, max_cost="0.5", **quick)  # type: ignore[arg-type]


async def test_the_simulated_cost_is_of_the_prompt_size_asked_about() -> None:
    """
    The stage's prompts were 500 tokens; asked about prompts of 50,000 (input_tokens),
    each simulated call is charged for 50,000, as the router costs it: the cost per
    request is the oracle's true cost at that size (it stayed the recorded 500-token
    one before, about 30 times less, whatever input_tokens said).
    """
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(history(1, 1_000))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    oracle = BY_ID["oracle"]
    mean_out = sum(oracle.output_tokens) / 2
    quick: dict[str, Any] = {"registry": REGISTRY, "candidates": ["oracle"], "replicates": 5}
    for prompt in (500, 50_000):
        report = await simulate_policy(evidence, input_tokens=prompt, requests=50, **quick)
        truth = oracle.success * (prompt * oracle.input_price + mean_out * oracle.output_price)
        assert report.cost_per_request.estimate == pytest.approx(truth / 1e6, rel=0.03)
        assert report.constraints["input_tokens"] == prompt
        # the model taking the traffic costs as much a call as the requests it takes
        # (its cost/call stayed the recorded 500-token one, $0.00168 beside $0.0507)
        [taken] = report.traffic
        assert taken.share.estimate == 1.0
        assert taken.cost_per_call_usd == pytest.approx(truth / 1e6, rel=0.03)
    # checked before any draw, as max_tokens is
    sizes: list[Any] = ["500", 1.5, -1, True]
    for size in sizes:
        with pytest.raises(ConfigurationError, match=r"^input_tokens must be an integer >= 0"):
            await simulate_policy(evidence, input_tokens=size, requests=5, **quick)


async def test_a_sweep_given_min_success_rate_too_is_a_configuration_error() -> None:
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(history(3, 300))
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    with pytest.raises(ConfigurationError, match=r"sets min_success_rate itself"):
        await sweep_min_success_rate(
            evidence, [0.9], min_success_rate=0.8, registry=REGISTRY, requests=5, replicates=2
        )


async def test_a_window_or_a_simulation_past_the_calendar_is_a_configuration_error() -> None:
    async with telemetry_from_url("memory://") as backend:
        with pytest.raises(ConfigurationError, match="before the year 1"):
            await evaluate_policy(backend, WF, ST, now=datetime(1, 1, 3, tzinfo=UTC))
        # the replay runs one request a second from the window's end
        late = datetime.max.replace(tzinfo=UTC) - timedelta(minutes=5)
        await backend.record_many(
            [attrs.evolve(r, timestamp=late - (NOW - r.timestamp)) for r in history(2, 300)]
        )
        with pytest.raises(ConfigurationError, match=r"requests=400: .* pass the year 9999"):
            await evaluate_policy(
                backend, WF, ST, registry=REGISTRY, now=late, requests=400, replicates=2
            )
        report = await evaluate_policy(
            backend, WF, ST, registry=REGISTRY, now=late, requests=200, replicates=2
        )
    assert report.recorded_calls == 300


@pytest.mark.timeout(600)  # 100,000 calls recorded: seconds alone, more on a loaded machine
@pytest.mark.slow
async def test_a_window_edge_minute_with_more_than_100000_calls_is_read_whole() -> None:
    # the window starts mid-minute: that minute's calls are read one by one
    now = NOW + timedelta(seconds=30)
    since = now - timedelta(days=1)
    template = history(1, 1)[0]
    calls = 100_007
    records = [
        attrs.evolve(
            template,
            call_id=f"edge-{i}",
            timestamp=since + timedelta(seconds=i % 29),
            outcome=Outcome.SUCCESS if i % 10 else Outcome.FAILURE,
        )
        for i in range(calls)
    ]
    backend = MemoryTelemetryBackend(capacity=2 * calls)
    await backend.record_many(records)
    evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, days=1, now=now)
    assert evidence.source == "rollups"
    assert evidence.samples == calls
    [fit] = evidence.fits.values()
    assert fit.successes == calls - len(range(0, calls, 10))


class _NoRollups(MemoryTelemetryBackend):
    async def evidence(self, **_: object) -> EvidenceBatch:
        raise NotImplementedError


@pytest.mark.slow
async def test_a_window_read_only_in_part_from_a_backend_without_rollups_says_so() -> None:
    calls = 100_001
    template = history(1, 1)[0]
    records = [
        attrs.evolve(
            template,
            call_id=f"c-{i}",
            timestamp=NOW - timedelta(seconds=1 + i % 80_000),
            outcome=Outcome.SUCCESS,
        )
        for i in range(calls)
    ]
    backend = _NoRollups(capacity=2 * calls)
    await backend.record_many(records)
    evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, days=1, now=NOW)
    assert evidence.source == "records"
    assert evidence.samples == 100_000
    assert evidence.partial
    report = await simulate_policy(
        evidence, registry=REGISTRY, min_success_rate=0.95, requests=20, replicates=2
    )
    assert [n for n in report.notes if "newest 100,000 calls" in n], report.notes


async def test_a_backend_without_rollups_is_read_through_its_records() -> None:
    backend = _NoRollups()
    records = history(6, 1_000)
    await backend.record_many(records)
    evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY, now=NOW)
    assert evidence.source == "records"
    assert evidence.samples == len(records)
    report = await simulate_policy(
        evidence, registry=REGISTRY, min_success_rate=0.95, requests=50, replicates=3
    )
    assert report.evidence_source == "records"
    assert report.recorded_calls == len(records)
    assert not evidence.partial and not [n for n in report.notes if "newest" in n]


# --------------------------------------------------------------------------- off-policy


async def test_inverse_propensity_estimate_from_recorded_propensities(tmp_path: Path) -> None:
    """
    History logged by a random policy that picks each model with its known share, the
    share recorded as routing_propensity: the IPW estimate of the oracle-only policy
    recovers the oracle's true cost.
    """
    records = [attrs.evolve(r, routing_propensity=BY_ID[r.model].share) for r in history(5, 4_000)]
    estimate = ipw_estimate(records, {"oracle": 1.0})
    assert estimate is not None and estimate.with_propensity == 4_000
    truth = BY_ID["oracle"].cost_per_call
    assert estimate.cost_per_request.covers(truth), (estimate, truth)
    assert estimate.success_rate.covers(BY_ID["oracle"].success)
    assert ipw_estimate(history(5, 100), {"oracle": 1.0}) is None  # no propensities
    thin = ipw_estimate(records[:100], {"premium": 1.0})
    assert thin is not None and thin.cost_per_request.estimate is None  # too little overlap
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.record_many(records)
        report = await evaluate_policy(
            backend,
            WF,
            ST,
            registry=REGISTRY,
            now=NOW,
            min_success_rate=0.95,
            requests=100,
            replicates=4,
        )
    assert report.ipw is not None and report.ipw.with_propensity == report.ipw.calls
    assert report.ipw.cost_per_request.estimate is not None


def test_the_off_policy_cost_counts_unanswered_requests_as_free_as_the_simulation_does() -> None:
    """
    A policy that answers half the requests (with "a") and leaves the rest to
    ``on_no_match="raise"``: per request it costs half of what an "a" call costs, as
    the simulated ``cost_per_request`` counts it; its success rate is of answered ones.
    """
    records = [
        LLMCallRecord(
            provider="p",
            model=model,
            outcome="success" if i % 4 else "failure",
            cost_usd=cost,
            routing_propensity=0.5,  # the logging policy: a or b at random
            call_id=f"{model}{i}",
        )
        for model, cost in (("a", 0.001), ("b", 0.004))
        for i in range(100)
    ]
    half = ipw_estimate(records, {"a": 0.5})
    assert half is not None and half.effective_sample_size == pytest.approx(100.0)
    assert half.cost_per_request.estimate == pytest.approx(0.5 * 0.001)
    assert half.success_rate.estimate == pytest.approx(0.75)
    whole = ipw_estimate(records, {"a": 0.5, "b": 0.5})  # every request answered
    assert whole is not None
    assert whole.cost_per_request.estimate == pytest.approx((0.001 + 0.004) / 2)


def test_the_off_policy_estimate_counts_a_retried_request_once() -> None:
    """
    The logging policy picked "a" (propensity 0.5) for 100 requests: half answered at
    once, half failed and were retried on "a", each retry carrying the decision's
    propensity too.  A request is one routed attempt, as the simulation counts it: the
    policy "a only" answers half its requests at the first attempt (the retries made it
    2/3, weighing "a"'s failing requests twice), and costs one attempt per request.
    """

    def call(i: int, attempt: int, success: bool) -> LLMCallRecord:
        return LLMCallRecord(
            provider="p",
            model="a",
            outcome="success" if success else "failure",
            cost_usd=0.001 if attempt == 1 else 0.003,
            routing_propensity=0.5,
            request_id=f"r{i}",
            call_id=f"a{i}-{attempt}",
            attempt=attempt,
        )

    records = [call(i, 1, i % 2 == 0) for i in range(100)]
    records += [call(i, 2, True) for i in range(1, 100, 2)]  # the retries of the failures
    estimate = ipw_estimate(records, {"a": 1.0})
    assert estimate is not None and estimate.with_propensity == 150
    assert estimate.effective_sample_size == pytest.approx(100.0)
    assert estimate.success_rate.estimate == pytest.approx(0.5)
    assert estimate.cost_per_request.estimate == pytest.approx(0.001)
    # newest first, as the backend reads them: the same requests
    again = ipw_estimate(list(reversed(records)), {"a": 1.0})
    assert again is not None and again.success_rate.estimate == pytest.approx(0.5)
    # the newest calls read: a retry whose first attempt was older is no request
    chained = [attrs.evolve(r, fallback_chain=("a",)) for r in records]
    newest = ipw_estimate(chained[:50] + chained[100:], {"a": 1.0})
    assert newest is not None and newest.effective_sample_size == pytest.approx(50.0)
    assert newest.success_rate.estimate == pytest.approx(0.5)


def test_the_off_policy_estimate_stays_a_number_at_any_cost_or_propensity() -> None:
    """
    One call logged with a propensity of 1e-300 outweighs 40 others a 1e300-fold: the
    effective sample size is 1 (it was NaN, and the estimate given as if sound); one
    of the largest cost a float holds counts as 1e300, the estimate finite (it was inf).
    """

    def call(i: int, *, propensity: float = 0.5, cost: float = 0.001) -> LLMCallRecord:
        return LLMCallRecord(
            provider="p",
            model="a",
            outcome="success",
            cost_usd=cost,
            routing_propensity=propensity,
            call_id=f"a{i}",
        )

    usual = [call(i) for i in range(40)]
    for odd in (call(40, propensity=1e-300), call(40, propensity=5e-324)):
        lopsided = ipw_estimate([*usual, odd], {"a": 1.0})
        assert lopsided is not None
        assert lopsided.effective_sample_size == pytest.approx(1.0)
        assert lopsided.cost_per_request.estimate is None  # too few effective samples
    costly = ipw_estimate([*usual, call(40, cost=1.7976931348623157e308)], {"a": 1.0})
    assert costly is not None and costly.effective_sample_size == pytest.approx(41.0)
    cost = costly.cost_per_request
    assert cost.estimate == pytest.approx(1e300 / 41)
    assert cost.estimate is not None and cost.low is not None and cost.high is not None
    assert math.isfinite(cost.high) and cost.low <= cost.estimate <= cost.high


async def test_a_policy_without_overlap_says_why_it_has_no_off_policy_estimate() -> None:
    records = [attrs.evolve(r, routing_propensity=BY_ID[r.model].share) for r in history(5, 600)]
    unseen = ipw_estimate(records, {"untried": 1.0})
    assert unseen is not None and unseen.with_propensity == 600
    assert unseen.effective_sample_size == 0.0 and unseen.cost_per_request.estimate is None
    async with telemetry_from_url("memory://") as backend:
        await backend.record_many(records)
        # no model is free: the policy routes no request, and no recorded call stands for it
        report = await evaluate_policy(
            backend, WF, ST, registry=REGISTRY, now=NOW, max_cost=0.0, requests=50, replicates=2
        )
    assert report.no_match_share.estimate == 1.0
    assert report.ipw is not None and report.ipw.effective_sample_size == 0.0
    assert [n for n in report.notes if "IPW" in n] == [
        f"no off-policy (IPW) estimate: {report.ipw.with_propensity} recorded calls carry a "
        "routing_propensity, but the proposed policy routes no request (no model qualifies)"
    ]
    assert report.ipw.with_propensity == 600


def test_propensity_follows_what_the_decision_states() -> None:
    policy = RoutingPolicy(explore_rate=0.01, warmup_share=0.4, reprobe_interval=100.0)
    plain = RoutingDecision(model="m", reason="cheapest of 2 eligible models")
    assert routing_propensity(plain, policy) == pytest.approx(0.99)
    assert routing_propensity(plain, None) == 1.0
    relaxed = attrs.evolve(plain, policy_applied="relax", constraints_met=False)
    assert routing_propensity(relaxed, policy) == 1.0
    explore = attrs.evolve(plain, exploration=True, constraints_met=False)
    for kind, expected in [
        ("warm-up", 0.4),
        ("re-probe", 0.01),
        ("budget", 0.01),
        ("unproven", 1.0),
        (None, 1.0),
    ]:
        decision = attrs.evolve(explore, exploration_kind=kind)
        assert routing_propensity(decision, policy) == pytest.approx(expected)


def test_records_carry_the_propensity_and_reject_a_bad_one() -> None:
    record = LLMCallRecord(provider="p", model="m", outcome="success", routing_propensity=0.25)
    assert LLMCallRecord.from_dict(record.to_dict()).routing_propensity == 0.25
    assert LLMCallRecord(provider="p", model="m", outcome="success").routing_propensity is None
    with pytest.raises(Exception, match="routing_propensity"):
        LLMCallRecord(provider="p", model="m", outcome="success", routing_propensity=1.5)


# --------------------------------------------------------------------------- the demo


@attrs.frozen
class _Observed:
    """One run's docs/outline attempts: means and their standard errors."""

    cost: float
    cost_se: float
    success: float
    success_se: float
    attempts: int


async def _stage_calls(url: str, since: datetime) -> _Observed:
    async with telemetry_from_url(url) as backend:
        calls = [
            r
            for r in await backend.recent(
                limit=100_000, workflow="docs", stage="outline", since=since
            )
            if r.outcome.is_sample
        ]
    n = len(calls)
    costs = [r.cost_usd for r in calls]
    success = sum(r.success for r in calls) / n
    return _Observed(
        cost=statistics.fmean(costs),
        cost_se=statistics.stdev(costs) / math.sqrt(n),
        success=success,
        success_se=math.sqrt(max(success * (1 - success), 1 / n) / n),
        attempts=n,
    )


# One run is one draw: the test compares four of its figures with their predictions, so
# each run's own sampling error is allowed for at 3 standard errors (99.7% each; a
# family-wise false alarm under 1%).  At 1.96 about one test run in ten fails: the
# recorded demo's routing depends on the timing of its concurrent calls, and in one of
# its trajectories the model the looser policy picks gets ~300 calls at a lucky 91%
# (truth ~87%), so a run's 391 of 456 misses the predicted [0.893, 0.933] by 0.006.
_RUN_Z = 3.0


def _agrees(interval: Interval, observed: float, se: float) -> bool:
    """
    The prediction (an interval for the expected figure) agrees with one run's figure,
    whose own sampling error is ``se``: they overlap once that error is allowed for.
    """
    assert interval.low is not None and interval.high is not None
    return interval.low - _RUN_Z * se <= observed <= interval.high + _RUN_Z * se


def _rate_agrees(interval: Interval, seen: _Observed) -> bool:
    """
    The predicted success-rate interval overlaps the run's own Wilson interval at
    ``_RUN_Z`` (a rate near 1 has no usable normal-approximation error: 391 of 392
    gives 0.0026).
    """
    assert interval.low is not None and interval.high is not None
    low, high = wilson_interval(round(seen.success * seen.attempts), seen.attempts, _RUN_Z)
    return interval.low <= high and low <= interval.high


@pytest.mark.slow
@pytest.mark.timeout(600)  # 6,000 demo calls over HTTP: ~20 s alone, minutes on a busy machine
async def test_demo_whatif_directions_are_confirmed_by_running_the_demo_under_each_policy(
    tmp_path: Path,
) -> None:
    """
    The demo (every model up, 3,000 calls) records telemetry; `routing whatif` for
    docs/outline predicts a looser (0.7) and a tighter (0.95) min_success_rate than the
    demo's 0.9.  The demo then runs again under each policy, on a copy of the recorded
    store (the policy deployed on the same history): the tighter one costs more, as
    predicted, and each run's cost and success per attempt agree with the predicted 95%
    intervals (allowing for the run's own sampling error, at `_RUN_Z`: one run of ~450
    attempts is not its expectation).
    """
    recorded = tmp_path / "recorded.db"
    await run_demo(calls=3_000, seed=7, db_url=f"sqlite:///{recorded}", outage=False)
    registry = _demo_registry()
    predicted = {}
    async with telemetry_from_url(f"sqlite:///{recorded}") as backend:
        for rate in (0.7, 0.95):
            predicted[rate] = await evaluate_policy(
                backend,
                "docs",
                "outline",
                registry=registry,
                min_success_rate=rate,
                requests=450,  # what the run below sends to docs/outline (30% of 1,500)
            )
        # the executor recorded the router's selection probability with each routed call
        calls = await backend.recent(limit=500, workflow="docs", stage="outline")
    assert calls and all(r.routing_propensity is not None for r in calls if not r.fallback_used)
    plain = {r.routing_propensity for r in calls if not r.exploration and not r.fallback_used}
    assert plain == {1.0 - RoutingPolicy().explore_rate}
    assert predicted[0.95].ipw is not None
    loose, tight = predicted[0.7], predicted[0.95]
    assert loose.cost_per_request.estimate < tight.cost_per_request.estimate  # type: ignore[operator]
    observed = {}
    for rate in (0.7, 0.95):
        copy = tmp_path / f"under-{rate}.db"
        shutil.copyfile(recorded, copy)
        since = datetime.now(UTC)
        await run_demo(
            calls=1_500,
            seed=8,
            db_url=f"sqlite:///{copy}",
            outage=False,
            constraints={("docs", "outline"): {"min_success_rate": rate}},
        )
        observed[rate] = await _stage_calls(f"sqlite:///{copy}", since)
    assert observed[0.7].cost < observed[0.95].cost  # the direction, confirmed
    for rate, seen in observed.items():
        report = predicted[rate]
        assert seen.attempts > 100
        assert _agrees(report.cost_per_request, seen.cost, seen.cost_se), (rate, report, seen)
        assert _rate_agrees(report.success_rate, seen), (rate, report, seen)


# --------------------------------------------------------------------------- the command


@pytest.fixture
def synth_db(tmp_path: Path) -> tuple[Path, Path]:
    """A SQLite file with a day of synthetic calls ending now, and its registry file."""
    import anyio

    db = tmp_path / "calls.db"
    shift = datetime.now(UTC) - NOW - timedelta(minutes=1)
    records = [attrs.evolve(r, timestamp=r.timestamp + shift) for r in history(4, 1_500)]

    async def fill() -> None:
        async with SQLiteTelemetryBackend(db) as backend:
            await backend.record_many(records)
            await backend.flush()

    anyio.run(fill)
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(REGISTRY.to_dict()))
    return db, registry


def test_cli_table_and_json(tmp_path: Path, synth_db: tuple[Path, Path]) -> None:
    db, registry = synth_db
    home = tmp_path / "home"
    args = ("routing", "whatif", WF, ST, "--db", str(db), "--registry", str(registry))
    table = run_cli(home, *args, "--min-success-rate", "0.95", "--requests", "100")
    assert table.returncode == 0, table.stderr
    out = table.stdout
    for text in ("cost per request", "cost per 1,000", "success rate", "p95 latency ms"):
        assert text in out
    assert "no model qualifies" in out and "oracle" in out and "synth-1" in out
    assert "answered, none proven" in out
    result = run_cli(home, *args, "--min-success-rate", "0.95", "--requests", "100", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["traffic"][0]["model"] == "oracle"
    assert data["price_version"] == "synth-1"
    assert data["recorded"]["calls"] == 1_500
    low, high = data["cost_per_request"]["low"], data["cost_per_request"]["high"]
    assert low <= BY_ID["oracle"].cost_per_call <= high
    assert data["cost_per_1k"]["estimate"] == pytest.approx(
        1000 * data["cost_per_request"]["estimate"]
    )


def test_cli_shows_the_policy_as_given(tmp_path: Path, synth_db: tuple[Path, Path]) -> None:
    """The policy line repeats each bound as typed, never rounded to six digits."""
    db, registry = synth_db
    args = ("routing", "whatif", WF, ST, "--db", str(db), "--registry", str(registry))
    bounds = ("--min-success-rate", "0.9999999", "--max-latency-ms", "1234567.5")
    quick = ("--max-cost", "0.0123456789", "--requests", "5", "--replicates", "2")
    result = run_cli(tmp_path / "home", *args, *bounds, *quick)
    assert result.returncode == 0, result.stderr
    # it read "min_success_rate=1, max_latency_ms=1.23457e+06, max_cost=0.0123457" before
    assert (
        "policy     min_success_rate=0.9999999, max_latency_ms=1234567.5, "
        "max_cost=0.0123456789, on_no_match=raise\n"
    ) in result.stdout


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path: Path, synth_db: tuple[Path, Path]) -> None:
    db, registry = synth_db
    home = tmp_path / "home"
    base = ("routing", "whatif", WF, "--db", str(db), "--registry", str(registry))
    missing = run_cli(home, *base, "no-such-stage")
    assert missing.returncode == 1
    assert "no calls recorded for synth/no-such-stage" in missing.stderr
    assert "Traceback" not in missing.stderr
    for bad in (("--replicates", "1"), ("--requests", "0"), ("--min-success-rate", "2")):
        usage = run_cli(home, *base, ST, *bad)
        assert usage.returncode == 2 and "usage:" in usage.stderr, bad
    typo = run_cli(home, *base, ST, "--candidates", "oracle,oracel")  # as routing best says
    assert typo.returncode == 2, typo.stderr
    assert "unknown model id(s) in --candidates: oracel (known: " in typo.stderr
    sweep = run_cli(home, *base, ST, "--sweep", "0.8,0.9")  # what it sweeps is only plotted
    assert sweep.returncode == 2 and "pass --plot" in sweep.stderr
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot = run_cli(home, *base, ST, "--plot", str(tmp_path / "cost.png"))
        assert plot.returncode == 1 and "matplotlib" in plot.stderr
    else:  # pragma: no cover - with matplotlib installed
        png = tmp_path / "cost.png"
        plot = run_cli(home, *base, ST, "--plot", str(png), "--sweep", "0.8,0.95")
        assert plot.returncode == 0, plot.stderr
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_an_unknown_on_no_match_as_a_usage_error(
    tmp_path: Path, synth_db: tuple[Path, Path]
) -> None:
    db, registry = synth_db
    home = tmp_path / "home"
    base = ("routing", "whatif", WF, ST, "--db", str(db), "--registry", str(registry))
    quick = ("--requests", "20", "--replicates", "2")
    for given in ((), ("--candidates", "oracle,pricey")):
        bogus = run_cli(home, *base, *quick, *given, "--on-no-match", "bogus")
        assert bogus.returncode == 2, bogus.stderr
        assert bogus.stderr.startswith("empathy-models: error: --on-no-match bogus"), bogus.stderr
        assert "raise" in bogus.stderr and "relax" in bogus.stderr and "premium" in bogus.stderr
        assert "on_no_match pins" not in bogus.stderr
    # a registry model outside the candidates may be pinned, as the router allows
    pinned = run_cli(
        home, *base, *quick, "--candidates", "oracle", "--on-no-match", "premium", "--json"
    )
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["constraints"]["on_no_match"] == "premium"
    # a model recorded for the stage but not in the registry cannot be pinned live: it
    # was simulated as taking every request, beside a note that it cannot be chosen
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps(REGISTRY.without_models("premium").to_dict()))
    outside = run_cli(
        home,
        *base[:-1],
        str(lacking),
        *quick,
        "--max-latency-ms",
        "1",
        "--on-no-match",
        "premium",
    )
    assert outside.returncode == 2, outside.stdout
    assert outside.stderr.startswith("empathy-models: error: --on-no-match premium")


def test_routing_best_refuses_an_unknown_on_no_match_as_a_usage_error(
    tmp_path: Path, synth_db: tuple[Path, Path]
) -> None:
    db, registry = synth_db
    home = tmp_path / "home"
    base = ("routing", "best", WF, ST, "--db", str(db), "--registry", str(registry))
    for given in ((), ("--candidates", "oracle,pricey")):
        bogus = run_cli(home, *base, *given, "--on-no-match", "bogus")
        assert bogus.returncode == 2, bogus.stderr
        assert bogus.stderr.startswith("empathy-models: error: --on-no-match bogus"), bogus.stderr
        assert "on_no_match pins" not in bogus.stderr
    pinned = run_cli(home, *base, "--candidates", "oracle", "--on-no-match", "premium")
    assert pinned.returncode == 0, pinned.stderr


def test_cli_plot_is_private_and_path_options_expand_a_tilde(
    tmp_path: Path, synth_db: tuple[Path, Path]
) -> None:
    # the plot holds what the user's calls cost: 0600 like the database and exports,
    # also over a file that was 0644; "~/..." is the home directory in every path option
    pytest.importorskip("matplotlib")
    db, registry = synth_db
    home, user = tmp_path / "home", tmp_path / "user"
    user.mkdir()
    shutil.copy(registry, user / "registry.json")
    env = {"HOME": str(user)}
    base = ("routing", "whatif", WF, ST, "--db", str(db), "--registry", "~/registry.json")
    quick = ("--requests", "50", "--replicates", "2", "--sweep", "0.8,0.95")
    plotted = run_cli(home, *base, *quick, "--plot", "~/cost.png", env=env)
    assert plotted.returncode == 0, plotted.stderr
    assert plotted.stdout.endswith(f"written to {user / 'cost.png'}\n")
    assert (user / "cost.png").stat().st_mode & 0o777 == 0o600
    (user / "cost.png").chmod(0o644)
    again = run_cli(home, *base, *quick, "--plot", str(user / "cost.png"), env=env)
    assert again.returncode == 0, again.stderr
    assert (user / "cost.png").stat().st_mode & 0o777 == 0o600
    exported = run_cli(
        home,
        "telemetry",
        "export",
        "--format",
        "csv",
        "--db",
        str(db),
        "-o",
        "~/calls.csv",
        env=env,
    )
    assert exported.returncode == 0, exported.stderr
    assert (user / "calls.csv").stat().st_mode & 0o777 == 0o600
    nobody = run_cli(home, *base, *quick, "--plot", "~no_such_user_here/cost.png", env=env)
    assert nobody.returncode == 2 and "no home directory" in nobody.stderr, nobody.stderr


def test_cli_plot_names_the_file_it_wrote_and_refuses_one_it_cannot_write(
    tmp_path: Path, synth_db: tuple[Path, Path]
) -> None:
    pytest.importorskip("matplotlib")
    db, registry = synth_db
    home = tmp_path / "home"
    base = ("routing", "whatif", WF, ST, "--db", str(db), "--registry", str(registry))
    quick = ("--requests", "50", "--replicates", "2", "--sweep", "0.8,0.95")
    plain = run_cli(home, *base, *quick, "--plot", str(tmp_path / "cost"))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.endswith(f"written to {tmp_path / 'cost.png'}\n")
    assert (tmp_path / "cost.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "cost").exists()
    svg = run_cli(home, *base, *quick, "--plot", str(tmp_path / "cost.svg"), "--json")
    assert json.loads(svg.stdout)["plot"] == str(tmp_path / "cost.svg")
    assert b"<svg" in (tmp_path / "cost.svg").read_bytes()
    folder = tmp_path / "plots"
    folder.mkdir()
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "no-such-dir" / "cost.png")
    for target, code, message in [
        (folder, 1, "is a directory"),
        (tmp_path / "cost.foo", 2, "matplotlib cannot write .foo files"),
        (tmp_path / "no-such-dir" / "cost.png", 1, "does not exist"),
        (dangling, 1, "cannot write it"),
    ]:
        refused = run_cli(home, *base, *quick, "--plot", str(target))
        assert refused.returncode == code, (target, refused.stderr)
        assert refused.stderr.startswith(f"empathy-models: error: --plot {target}")
        assert refused.stderr.count("\n") == 1 and message in refused.stderr, refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".svg")) == [
        "cost.png",
        "cost.svg",
        "dangling.png",
    ]
