"""
What-if against what was recorded: the recorded p95 is the recorded calls' own (not a
fit's), the window is ``[now - days, now)`` exactly, a past ``now`` keeps its
off-policy estimate, and the calls recorded without a stage can be evaluated; and
``telemetry summary`` counts what every attempt cost.  Real SQLite files, the CLI as
users run it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    ConfigurationError,
    LLMCallRecord,
    ModelRegistry,
    Outcome,
    telemetry_from_url,
)
from empathy_models.whatif import evaluate_policy, load_stage_evidence
from tests._cli import run_cli

HAIKU = "claude-haiku-4-5"


def _call(
    ts: datetime,
    *,
    i: int = 0,
    ok: bool = True,
    outcome: Outcome | None = None,
    stage: str | None = "write",
    latency_ms: float = 500.0,
    cost_usd: float = 0.0015,
    propensity: float | None = None,
) -> LLMCallRecord:
    return LLMCallRecord(
        provider="anthropic",
        model=HAIKU,
        outcome=outcome or (Outcome.SUCCESS if ok else Outcome.FAILURE),
        workflow="docs",
        stage=stage,
        timestamp=ts,
        latency_ms=latency_ms,
        input_tokens=1000 if ok else 0,
        output_tokens=100 if ok else 0,
        cost_usd=cost_usd if ok else 0.0,
        routing_propensity=propensity,
        call_id=f"c{i}",
    )


async def _store(path: Path, records: list[LLMCallRecord]) -> str:
    url = f"sqlite:///{path}"
    async with telemetry_from_url(url) as store:
        await store.record_many(records)
    return url


async def test_the_recorded_p95_is_the_recorded_calls_own_and_the_fit_is_labelled(
    tmp_path: Path,
) -> None:
    # 90% of the calls answer in 100 ms, 10% in 5,000 ms: the recorded p95 is 5,000 ms;
    # a log-normal fitted to them says about 1,000 ms
    now = datetime.now(UTC).replace(microsecond=0)
    records = [
        _call(now - timedelta(minutes=i), i=i, latency_ms=5000.0 if i % 10 == 0 else 100.0)
        for i in range(1, 401)
    ]
    url = await _store(tmp_path / "calls.db", records)
    async with telemetry_from_url(url) as store:
        (perf,) = await store.aggregate(workflow="docs", stage="write")
        report = await evaluate_policy(store, "docs", "write", requests=50, replicates=3)
        async with AdaptiveModelRouter(ModelRegistry.default(), store) as router:
            row = router.get_best_model("docs", "write", candidates=[HAIKU]).candidates[0]
    assert perf.latency_p95_ms == 5000.0
    assert report.recorded_latency_p95_ms == 5000.0
    (fit,) = report.models
    assert fit.recorded_latency_p95_ms == 5000.0
    # the log-normal fit (the simulation's, the router's) is reported as such, apart
    assert fit.latency_p95_ms is not None and fit.latency_p95_ms < 2000.0
    assert report.fitted_latency_p95_ms == pytest.approx(fit.latency_p95_ms)
    # the router judges max_latency_ms on such a fit too (a documented limitation)
    assert row.latency_p95_ms is not None and row.latency_p95_ms < 2000.0
    [note] = [n for n in report.notes if "heavier tail" in n]
    assert "recorded p95 latency (5000 ms)" in note and "max_latency_ms" in note
    data = report.to_dict()
    assert data["recorded"]["latency_p95_ms"] == 5000.0
    assert data["fitted"]["latency_p95_ms"] == pytest.approx(fit.latency_p95_ms)


async def test_a_model_fit_on_one_call_has_the_p95_the_simulation_draws_from(
    tmp_path: Path,
) -> None:
    """
    One successful call measures no spread: the simulation draws it with the log-sd it
    assumes then (0.5), and the stage's fitted p95 says so; the model's own fitted p95
    said the call's latency (1,000 ms beside the stage's 2,276 ms, with one model).
    """
    now = datetime.now(UTC).replace(microsecond=0)
    url = await _store(tmp_path / "calls.db", [_call(now - timedelta(minutes=5), latency_ms=1e3)])
    async with telemetry_from_url(url) as store:
        report = await evaluate_policy(store, "docs", "write", requests=5, replicates=2)
    (fit,) = report.models
    assert fit.latency_p50_ms == pytest.approx(1000.0)
    assert report.fitted_latency_p95_ms is not None and report.fitted_latency_p95_ms > 2000.0
    assert fit.latency_p95_ms == pytest.approx(report.fitted_latency_p95_ms)


async def test_a_past_now_keeps_its_off_policy_estimate(tmp_path: Path) -> None:
    # 200 calls in the week before ``now``, 600 after it: the off-policy estimate reads
    # the newest ``ipw_limit`` calls before ``now``, not the newest of all
    now = datetime(2025, 6, 1, tzinfo=UTC)
    before = [_call(now - timedelta(minutes=2 * i + 1), i=i, propensity=0.5) for i in range(200)]
    after = [_call(now + timedelta(minutes=i + 1), i=1_000 + i, propensity=0.5) for i in range(600)]
    url = await _store(tmp_path / "calls.db", before + after)
    async with telemetry_from_url(url) as store:
        report = await evaluate_policy(
            store, "docs", "write", now=now, requests=50, replicates=3, ipw_limit=150
        )
    assert report.recorded_calls == 200
    assert report.ipw is not None
    assert report.ipw.calls == report.ipw.with_propensity == 150
    assert report.ipw.cost_per_request.estimate == pytest.approx(0.0015)
    assert not any("routing_propensity" in n for n in report.notes)


async def test_the_window_is_now_minus_days_to_now_exactly(tmp_path: Path) -> None:
    now = datetime(2025, 6, 1, 12, 0, 30, tzinfo=UTC)
    since = now - timedelta(days=1)
    records = [
        _call(since + timedelta(seconds=10), i=0),  # in its first, partial minute
        _call(now - timedelta(hours=3), i=1),
        _call(now - timedelta(seconds=20), i=2),  # in now's minute, before now
        _call(now + timedelta(seconds=20), i=3, ok=False),  # after now, in its minute
        _call(now + timedelta(seconds=25), i=4, ok=False),
        _call(since - timedelta(seconds=5), i=5, ok=False),  # before the window
    ]
    url = await _store(tmp_path / "calls.db", records)
    async with telemetry_from_url(url) as store:
        evidence = await load_stage_evidence(store, "docs", "write", now=now, days=1)
        (perf,) = await store.aggregate(workflow="docs", stage="write", since=since, until=now)
        short = await load_stage_evidence(store, "docs", "write", now=now, days=30 / 86_400)
        tiny = await load_stage_evidence(store, "docs", "write", now=now, days=1e-9)
        with pytest.raises(ConfigurationError) as info:
            await evaluate_policy(store, "docs", "write", now=now, days=1e-9)
    fit = evidence.fits[HAIKU]
    assert (fit.samples, fit.successes) == (perf.sample_size, perf.successes) == (3, 3)
    assert (evidence.since, evidence.until) == (since, now)
    assert short.fits[HAIKU].samples == 1  # the call 20 s before now
    assert tiny.samples == 0
    message = str(info.value)
    assert "no calls recorded for docs/write" in message and now.isoformat() in message


async def test_calls_recorded_without_a_stage_can_be_evaluated(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    records = [
        _call(now - timedelta(minutes=i + 1), i=i, stage=(None, "")[i % 2]) for i in range(100)
    ]
    url = await _store(tmp_path / "calls.db", records)
    async with telemetry_from_url(url) as store:
        report = await evaluate_policy(store, "docs", "", requests=20, replicates=2)
    assert report.stage == "" and report.recorded_calls == 100
    assert report.traffic[0].model == HAIKU
    db = url.removeprefix("sqlite:///")
    cli = run_cli(
        tmp_path / "home", "routing", "whatif", "docs", "", "--requests", "20",
        "--replicates", "2", "--db", db,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "What if docs/(none)" in cli.stdout and "100 recorded calls" in cli.stdout


def test_telemetry_summary_counts_what_every_attempt_cost(tmp_path: Path) -> None:
    # 5 answers, and 5 streams the caller abandoned (billed for what they used: not
    # samples, so not in the calls column); one model only ever abandoned
    now = datetime.now(UTC)
    kinds: list[tuple[str, Outcome, float]] = [
        *[(HAIKU, Outcome.SUCCESS, 0.027)] * 5,
        *[(HAIKU, Outcome.CANCELLED, 0.027)] * 5,
        ("claude-sonnet-4-5", Outcome.CANCELLED, 0.05),
        (HAIKU, Outcome.CACHE_HIT, 0.0),
    ]
    records = [
        LLMCallRecord(
            provider="anthropic",
            model=model,
            outcome=outcome,
            workflow="w",
            stage="s",
            timestamp=now - timedelta(minutes=i + 1),
            cost_usd=cost,
            latency_ms=100.0,
        )
        for i, (model, outcome, cost) in enumerate(kinds)
    ]
    db = tmp_path / "calls.db"
    anyio.run(_store, db, records)
    home = tmp_path / "home"
    table = run_cli(home, "telemetry", "summary", "--db", str(db))
    assert table.returncode == 0, table.stderr
    assert "total: 5 calls, $0.3200" in table.stdout
    data = json.loads(run_cli(home, "telemetry", "summary", "--db", str(db), "--json").stdout)
    rows: dict[str, dict[str, object]] = {r["model"]: r for r in data["models"]}
    assert rows[HAIKU]["calls"] == 5
    assert rows[HAIKU]["total_cost_usd"] == pytest.approx(0.27)
    assert rows[HAIKU]["samples_cost_usd"] == pytest.approx(0.135)
    assert rows["claude-sonnet-4-5"]["calls"] == 0
    assert rows["claude-sonnet-4-5"]["total_cost_usd"] == pytest.approx(0.05)
    assert data["total_cost_usd"] == pytest.approx(0.32)
