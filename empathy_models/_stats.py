"""Pure helpers for aggregating call records (shared by in-process backends)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Final

from ._validators import shown
from .exceptions import RecordValidationError
from .records import LLMCallRecord, ModelPerformance, Outcome

AVERAGE_CAP: Final = 1e300
"""
The most one latency or cost counts for in an aggregate's averages (every backend alike):
1.7e308 is a valid number, and two such values would overflow the sum.
"""

__all__ = [
    "Spend",
    "aggregate_records",
    "check_aware",
    "interpolated_quantile",
    "matches",
    "nearest_rank",
    "spend_of",
]

Spend = dict[tuple[str | None, str | None, str], float]
"""What `TelemetryBackend.spend` returns: USD per (workflow, stage, model)."""


def spend_of(records: Iterable[LLMCallRecord]) -> Spend:
    """
    The cost of ``records`` per (workflow, stage, model), every outcome counted, each
    cost at most `AVERAGE_CAP`; no workflow or stage (``None`` or ``""``) keyed ``None``.
    """
    out: Spend = {}
    for r in records:
        key = (r.workflow or None, r.stage or None, r.model)
        out[key] = out.get(key, 0.0) + min(r.cost_usd, AVERAGE_CAP)
    return out


def nearest_rank(sorted_values: Sequence[float], p: float) -> float | None:
    """
    The nearest-rank percentile: the ceil(p*n)-th smallest value (1-based).

    The percentile of observed calls (latency, time to first token) everywhere: the
    in-memory backends, the demo's report, and the SQL of the SQLite and PostgreSQL
    backends (``percentile_disc``) give the same value.

    Args:
        sorted_values: the sample, sorted ascending.
        p: the fraction, in [0, 1] (0.95 for the p95).

    Returns:
        One of the values, or None for an empty sample.
    """
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, math.ceil(p * n))
    return sorted_values[min(rank, n) - 1]


def interpolated_quantile(sorted_values: Sequence[float], q: float) -> float:
    """
    The ``q`` quantile interpolated between neighbours (numpy's default, R's type 7).

    For the spread of simulated estimates (what-if replicates), where a value between
    two replicates is as good as either; observed calls use `nearest_rank`.

    Args:
        sorted_values: the sample, sorted ascending, not empty.
        q: the fraction, in [0, 1].

    Returns:
        The quantile.
    """
    pos = q * (len(sorted_values) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (sorted_values[j] - sorted_values[i]) * (pos - i)


def check_aware(name: str, value: datetime | None) -> None:
    """Raise `RecordValidationError` naming ``name`` unless ``value`` is None or aware."""
    if value is None:
        return
    if not isinstance(value, datetime):
        raise RecordValidationError(f"{name} must be a datetime, got {shown(value)}", path=name)
    if value.tzinfo is None or value.utcoffset() is None:
        raise RecordValidationError(
            f"{name} must be a timezone-aware datetime, got naive {value.isoformat()}",
            path=name,
        )


def matches(
    record: LLMCallRecord,
    *,
    workflow: str | None,
    stage: str | None,
    since: datetime | None,
    until: datetime | None,
    model: str | None = None,
) -> bool:
    return (
        # "" finds the records without one, recorded as None or ""
        (workflow is None or (record.workflow or "") == workflow)
        and (stage is None or (record.stage or "") == stage)
        and (model is None or record.model == model)
        and (since is None or record.timestamp >= since)
        and (until is None or record.timestamp < until)
    )


def aggregate_records(
    records: Iterable[LLMCallRecord], *, per_stage: bool = True
) -> list[ModelPerformance]:
    """Group sample records per (workflow, stage, model) and summarize each group."""
    groups: dict[tuple[str, str, str], list[LLMCallRecord]] = {}
    for r in records:
        if not r.outcome.is_sample:
            continue
        key = (r.workflow or "", (r.stage or "") if per_stage else "", r.model)
        groups.setdefault(key, []).append(r)
    out: list[ModelPerformance] = []
    for (workflow, stage, model), rows in sorted(groups.items()):
        ok = [r for r in rows if r.outcome is Outcome.SUCCESS]
        latencies = sorted(r.latency_ms for r in ok)
        ttfts = sorted(r.ttft_ms for r in ok if r.ttft_ms is not None)
        last = max(rows, key=lambda r: r.timestamp)
        out.append(
            ModelPerformance(
                model=model,
                provider=last.provider,
                workflow=workflow or None,
                stage=(stage or None) if per_stage else None,
                tier=last.tier,
                sample_size=len(rows),
                successes=len(ok),
                latency_p50_ms=nearest_rank(latencies, 0.50),
                latency_p95_ms=nearest_rank(latencies, 0.95),
                avg_latency_ms=(
                    sum(min(x, AVERAGE_CAP) for x in latencies) / len(latencies)
                    if latencies
                    else None
                ),
                ttft_p50_ms=nearest_rank(ttfts, 0.50),
                ttft_p95_ms=nearest_rank(ttfts, 0.95),
                avg_cost_usd=sum(min(r.cost_usd, AVERAGE_CAP) for r in rows) / len(rows),
                avg_input_tokens=(sum(r.input_tokens for r in ok) / len(ok)) if ok else 0.0,
                avg_output_tokens=(sum(r.output_tokens for r in ok) / len(ok)) if ok else 0.0,
                first_seen=min(r.timestamp for r in rows),
                last_seen=last.timestamp,
            )
        )
    return out
