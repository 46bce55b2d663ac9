"""
The aggregation tests of `TelemetryBackendContract`, checked against a brute-force
computation made independently of every backend, and the data set they (and the
evidence tests) store.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ...abc import TelemetryBackend
from ...records import LLMCallRecord, ModelPerformance, ModelTier, Outcome
from ._base import _base_time, _record, _TelemetryTests

_SAMPLES = frozenset({"success", "failure", "rate_limited", "fatal"})


def _nearest_rank(values: Sequence[float], percent: int) -> float | None:
    """Nearest-rank percentile with exact integer arithmetic: the ceil(p*n)-th smallest."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    rank = max(1, -(-percent * n // 100))
    return ordered[rank - 1]


GroupKey = tuple[str | None, str | None, str]


def _brute_force(
    records: Iterable[LLMCallRecord],
    *,
    workflow: str | None = None,
    stage: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    per_stage: bool = True,
) -> dict[GroupKey, dict[str, Any]]:
    """The aggregation, computed independently of every backend."""
    groups: dict[GroupKey, list[LLMCallRecord]] = {}
    for r in records:
        if r.outcome.value not in _SAMPLES:
            continue
        if workflow is not None and r.workflow != workflow:
            continue
        if stage is not None and r.stage != stage:
            continue
        if since is not None and not r.timestamp >= since:
            continue
        if until is not None and not r.timestamp < until:
            continue
        key = (r.workflow, r.stage if per_stage else None, r.model)
        groups.setdefault(key, []).append(r)
    out: dict[GroupKey, dict[str, Any]] = {}
    for key, rows in groups.items():
        ok = [r for r in rows if r.outcome.value == "success"]
        latencies = [r.latency_ms for r in ok]
        ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        out[key] = {
            "provider": rows[0].provider,
            "tier": rows[0].tier,
            "sample_size": len(rows),
            "successes": len(ok),
            "latency_p50_ms": _nearest_rank(latencies, 50),
            "latency_p95_ms": _nearest_rank(latencies, 95),
            "avg_latency_ms": math.fsum(latencies) / len(latencies) if latencies else None,
            "ttft_p50_ms": _nearest_rank(ttfts, 50),
            "ttft_p95_ms": _nearest_rank(ttfts, 95),
            "avg_cost_usd": math.fsum(r.cost_usd for r in rows) / len(rows),
            "avg_input_tokens": sum(r.input_tokens for r in ok) / len(ok) if ok else 0.0,
            "avg_output_tokens": sum(r.output_tokens for r in ok) / len(ok) if ok else 0.0,
            "first_seen": min(r.timestamp for r in rows),
            "last_seen": max(r.timestamp for r in rows),
        }
    return out


def _close(actual: float | None, expected: float | None) -> bool:
    if actual is None or expected is None:
        return actual is expected
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9)


def _assert_aggregate(
    got: list[ModelPerformance], want: dict[GroupKey, dict[str, Any]], query: str
) -> None:
    by_key: dict[GroupKey, ModelPerformance] = {}
    for perf in got:
        key = (perf.workflow, perf.stage, perf.model)
        assert key not in by_key, f"{query}: group {key} returned twice"
        by_key[key] = perf
    assert set(by_key) == set(want), (
        f"{query}: groups differ; missing {sorted(set(want) - set(by_key), key=str)}, "
        f"unexpected {sorted(set(by_key) - set(want), key=str)}"
    )
    problems: list[str] = []
    for key, expected in want.items():
        perf = by_key[key]
        for name, value in expected.items():
            actual = getattr(perf, name)
            same = (
                _close(actual, value)
                if name.startswith("avg_")
                else (actual == value and (value is None) == (actual is None))
            )
            if not same:
                problems.append(f"{key} {name}: expected {value!r}, got {actual!r}")
    assert not problems, f"{query}: aggregation differs from brute force:\n  " + "\n  ".join(
        problems
    )
    complete = [
        (perf.workflow, perf.stage, perf.model)
        for perf in got
        if perf.workflow is not None and perf.stage is not None
    ]
    assert complete == sorted(complete), f"{query}: groups not sorted by (workflow, stage, model)"


def _aggregation_dataset(base: datetime) -> list[LLMCallRecord]:
    rng = random.Random(20261125)
    models = [
        ("anthropic", "m-cheap", ModelTier.CHEAP),
        ("anthropic", "m-capable", ModelTier.CAPABLE),
        ("openai", "m-premium", ModelTier.PREMIUM),
    ]
    outcomes = [
        *[Outcome.SUCCESS] * 12,
        Outcome.FAILURE,
        Outcome.FAILURE,
        Outcome.RATE_LIMITED,
        Outcome.FATAL,
        Outcome.IGNORED,
        Outcome.CANCELLED,
        Outcome.REJECTED,
        Outcome.NOT_SENT,
    ]
    records: list[LLMCallRecord] = []
    for i in range(480):
        provider, model, tier = rng.choice(models)
        if records and rng.random() < 0.1:
            ts = rng.choice(records).timestamp  # ties in time
        else:
            ts = base + timedelta(
                seconds=rng.randrange(0, 10 * 86_400), microseconds=rng.randrange(0, 10**6)
            )
        latency = (
            rng.choice([120.0, 250.5, 999.0])
            if rng.random() < 0.3
            else round(rng.uniform(20.0, 5000.0), 3)
        )
        records.append(
            _record(
                ts,
                provider=provider,
                model=model,
                tier=tier,
                outcome=rng.choice(outcomes),
                workflow=rng.choice(["wf-a", "wf-b", "wf-b", None]),
                stage=rng.choice(["plan", "write", "write", None]),
                latency_ms=latency,
                cost_usd=round(rng.uniform(0.0, 0.05), 6),
                input_tokens=rng.randrange(0, 20_000),
                output_tokens=rng.randrange(0, 4_000),
                call_id=f"agg-{i:04d}",
            )
        )
    return records


class _AggregateTests(_TelemetryTests):
    """`TelemetryBackend.aggregate` against the brute force, windows, no successes."""

    async def test_aggregate_matches_brute_force(self, telemetry: TelemetryBackend) -> None:
        self._needs_records()
        records = _aggregation_dataset(_base_time())
        await telemetry.record_many(records[:200])
        for r in records[200:260]:
            await telemetry.record(r)
        await telemetry.record_many(records[260:])
        await telemetry.flush()
        times = sorted({r.timestamp for r in records})
        since, until = times[100], times[300]
        queries: list[dict[str, Any]] = [
            {},
            {"workflow": "wf-a"},
            {"workflow": "wf-b", "stage": "write"},
            {"stage": "plan"},
            {"since": since},
            {"until": until},
            {"since": since, "until": until},
            {"since": since, "until": since},
            {"per_stage": False},
            {"workflow": "wf-b", "per_stage": False, "since": since},
            {"workflow": "no-such-workflow"},
        ]
        for query in queries:
            got = await telemetry.aggregate(**query)
            _assert_aggregate(got, _brute_force(records, **query), f"aggregate({query})")

    async def test_aggregate_since_is_inclusive_and_until_exclusive(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        t = [base + timedelta(hours=i) for i in range(3)]
        await telemetry.record_many(
            [
                _record(t[0], latency_ms=10.0),
                _record(t[1], latency_ms=20.0),
                _record(t[2], latency_ms=30.0),
            ]
        )
        await telemetry.flush()
        (perf,) = await telemetry.aggregate(since=t[1], until=t[2])
        assert (perf.sample_size, perf.latency_p50_ms) == (1, 20.0)
        assert perf.first_seen == perf.last_seen == t[1]
        assert await telemetry.aggregate(since=t[2], until=t[2]) == []
        (everything,) = await telemetry.aggregate(since=t[0])
        assert everything.sample_size == 3
        assert [r.timestamp for r in await telemetry.recent(since=t[1])] == [t[2], t[1]]

    async def test_aggregate_at_the_first_and_last_microseconds_of_the_calendar(
        self, telemetry: TelemetryBackend
    ) -> None:
        # valid timestamps (a store may write them as -infinity and infinity): the
        # groups holding them report them as first and last seen, like any other time
        self._needs_records()
        first = datetime(1, 1, 1, tzinfo=UTC)
        last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        base = _base_time()
        records = [
            _record(first, workflow="early", latency_ms=10.0),
            _record(base, workflow="early", latency_ms=20.0),
            _record(base, workflow="late", latency_ms=30.0),
            _record(last, workflow="late", latency_ms=40.0, outcome=Outcome.FAILURE),
            _record(last, workflow="both", stage="s2", latency_ms=50.0),
            _record(first, workflow="both", stage="s1", latency_ms=60.0),
        ]
        await telemetry.record_many(records)
        await telemetry.flush()
        queries: list[dict[str, Any]] = [
            {},
            {"workflow": "late"},
            {"per_stage": False},
            {"since": base},
            {"until": base},
            {"since": first, "until": last},
        ]
        for query in queries:
            got = await telemetry.aggregate(**query)
            _assert_aggregate(got, _brute_force(records, **query), f"aggregate({query})")
        (both,) = await telemetry.aggregate(workflow="both", per_stage=False)
        assert (both.first_seen, both.last_seen) == (first, last)

    async def test_aggregate_of_no_successes_has_no_latency(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        await telemetry.record_many(
            [
                _record(base, outcome=Outcome.FAILURE, latency_ms=900.0, cost_usd=0.01),
                _record(base + timedelta(seconds=1), outcome=Outcome.FATAL, cost_usd=0.03),
                _record(base + timedelta(seconds=2), outcome=Outcome.CANCELLED),
            ]
        )
        await telemetry.flush()
        (perf,) = await telemetry.aggregate()
        assert (perf.sample_size, perf.successes) == (2, 0)
        assert perf.latency_p50_ms is None and perf.latency_p95_ms is None
        assert perf.avg_latency_ms is None
        assert math.isclose(perf.avg_cost_usd, 0.02)
        assert (perf.avg_input_tokens, perf.avg_output_tokens) == (0.0, 0.0)
        assert perf.success_rate == 0.0

    async def test_aggregate_of_extreme_values_stays_finite(
        self, telemetry: TelemetryBackend
    ) -> None:
        # 1.7e308 ms, $1.7e308 and 2**63-1 tokens are valid values: two of each must
        # not overflow the sums behind the averages (a latency or cost counts for at
        # most 1e300 in them), so one odd record cannot break every report
        self._needs_records()
        base = _base_time()
        huge, most = 1.7e308, 2**63 - 1
        await telemetry.record_many(
            [
                _record(
                    base + timedelta(seconds=i),
                    latency_ms=huge,
                    ttft_ms=huge,
                    cost_usd=huge,
                    input_tokens=most,
                    output_tokens=most,
                )
                for i in range(2)
            ]
        )
        # an ordinary value beside an extreme one (no running sum of squares may
        # overflow either), in an arm of its own
        await telemetry.record_many(
            [
                _record(base, model="model-b", latency_ms=5.0, cost_usd=huge),
                _record(base, model="model-b", latency_ms=huge, cost_usd=0.5),
                _record(base, model="model-c", latency_ms=5.0, cost_usd=1e160),
                _record(base, model="model-c", latency_ms=1e160, cost_usd=0.5),
            ]
        )
        await telemetry.flush()
        perf, mixed, moderate = await telemetry.aggregate()
        assert (mixed.model, moderate.model) == ("model-b", "model-c")
        assert math.isclose(mixed.avg_latency_ms or 0.0, 5e299)
        assert math.isclose(mixed.avg_cost_usd, 5e299)
        assert math.isclose(moderate.avg_latency_ms or 0.0, 5e159)
        assert math.isclose(moderate.avg_cost_usd, 5e159)
        assert (perf.sample_size, perf.successes) == (2, 2)
        assert perf.latency_p95_ms == huge and perf.ttft_p95_ms == huge
        assert perf.avg_latency_ms == 1e300 and perf.avg_cost_usd == 1e300
        assert math.isclose(perf.avg_input_tokens, most) and math.isclose(
            perf.avg_output_tokens, most
        )
