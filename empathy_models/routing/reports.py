"""
What the router reports besides decisions: `RoutingStats` (per-model statistics read
from the telemetry backend) and `TierRecommendation` (whether a stage should move up a
tier, from the recent outcomes the router has seen).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import attrs
from attrs import field, frozen

from ..records import ModelPerformance, ModelTier
from .stats import wilson_bounds

__all__ = [
    "ModelStats",
    "RecentOutcomes",
    "RoutingStats",
    "TierRecommendation",
    "named",
    "recommend",
]

TIER_ORDER: Final = (ModelTier.CHEAP, ModelTier.CAPABLE, ModelTier.PREMIUM)


@frozen(kw_only=True)
class TierRecommendation:
    """
    Whether a workflow stage should move to a more capable tier, and why.

    ``failure_rate`` is over the ``window`` most recent sample outcomes of the stage
    (every model that served it; ``failures`` of them failed, ``by_model`` splits them
    per model as ``(failures, calls)``).  ``current_tiers`` are the tiers that served
    those calls; ``suggested_tier`` is the next tier above the highest of them (``None``
    when already at the top or when no upgrade is advised).  Unpacks as a
    ``(should_upgrade, reason)`` tuple.
    """

    workflow: str
    stage: str | None
    should_upgrade: bool
    reason: str
    failure_rate: float | None
    failures: int
    window: int
    current_tiers: tuple[ModelTier, ...] = ()
    suggested_tier: ModelTier | None = None
    by_model: Mapping[str, tuple[int, int]] = field(factory=dict)

    def __iter__(self) -> Iterator[object]:
        return iter((self.should_upgrade, self.reason))


@frozen(kw_only=True)
class ModelStats:
    """
    One model's calls in a `RoutingStats` window.

    ``success_rate_lower`` / ``_upper`` are the Wilson bounds at the router policy's ``z``
    (95% by default, the confidence ``sample_size_warning`` names); latency figures are of
    successful calls, ``ttft_p50`` / ``ttft_p95`` (time to first token) of streamed
    successful calls (None when the model never streamed); ``sample_size_warning`` says
    when the sample is too small to trust (``None`` otherwise); ``tier`` is the one its
    newest call was recorded with, else the registry's (``None``: neither says).
    """

    calls: int
    successes: int
    success_rate: float
    success_rate_lower: float
    success_rate_upper: float
    avg_cost: float
    avg_latency_ms: float | None
    p50: float | None
    p95: float | None
    tier: str | None
    sample_size_warning: str | None
    ttft_p50: float | None = None
    ttft_p95: float | None = None


@frozen(kw_only=True)
class RoutingStats:
    """
    Per-model statistics of one workflow (one ``stage``, or ``"all"``) over ``days_analyzed``.

    ``telemetry`` is ``"ok"``, or ``"none"`` without a store or when the store never
    received a record; ``message`` says what is missing (``None`` when nothing is).
    ``total_calls``, ``avg_cost`` and ``avg_success_rate`` are call-weighted over every
    model.  `to_dict` gives the JSON shape the CLI prints.
    """

    workflow: str
    stage: str
    days_analyzed: float
    models_used: tuple[str, ...] = ()
    performance_by_model: Mapping[str, ModelStats] = field(factory=dict)
    total_calls: int = 0
    avg_cost: float = 0.0
    avg_success_rate: float = 0.0
    telemetry: str = "ok"
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (models as dicts, ``models_used`` as a list)."""
        out = attrs.asdict(self, recurse=False)
        out["models_used"] = list(self.models_used)
        out["performance_by_model"] = {
            m: attrs.asdict(s) for m, s in self.performance_by_model.items()
        }
        return out


def merge_performances(perfs: Sequence[ModelPerformance]) -> dict[str, ModelPerformance]:
    """One `ModelPerformance` per model, summing a model's rows of several stages."""
    by_model: dict[str, list[ModelPerformance]] = {}
    for p in perfs:
        by_model.setdefault(p.model, []).append(p)
    out: dict[str, ModelPerformance] = {}
    for model, rows in by_model.items():
        if len(rows) == 1:
            out[model] = rows[0]
            continue
        n = sum(r.sample_size for r in rows)
        s = sum(r.successes for r in rows)
        lat = [(r.avg_latency_ms, r.successes) for r in rows if r.avg_latency_ms is not None]
        lat_w = sum(w for _, w in lat)
        out[model] = attrs.evolve(
            rows[-1],
            sample_size=n,
            successes=s,
            avg_cost_usd=sum(r.avg_cost_usd * r.sample_size for r in rows) / n if n else 0.0,
            avg_latency_ms=(sum(v * w for v, w in lat) / lat_w) if lat_w else None,
            latency_p50_ms=max((r.latency_p50_ms for r in rows if r.latency_p50_ms), default=None),
            latency_p95_ms=max((r.latency_p95_ms for r in rows if r.latency_p95_ms), default=None),
            ttft_p50_ms=max((r.ttft_p50_ms for r in rows if r.ttft_p50_ms), default=None),
            ttft_p95_ms=max((r.ttft_p95_ms for r in rows if r.ttft_p95_ms), default=None),
        )
    return out


def stats_from(
    workflow: str,
    stage: str,
    days: float,
    perfs: Sequence[ModelPerformance],
    *,
    z: float,
    min_sample_size: int,
    tier_of: Callable[[str], ModelTier | None] = lambda _: None,
) -> RoutingStats:
    """
    `RoutingStats` of a backend's aggregate rows (at least one); a model's tier is the
    one its newest call was recorded with, else ``tier_of(model)`` (the registry's).
    """
    merged = merge_performances(perfs)
    level = f"{math.erf(z / math.sqrt(2.0)) * 100.0:.3g}%"  # the bounds' confidence
    total = sum(p.sample_size for p in merged.values())
    successes = sum(p.successes for p in merged.values())
    cost = sum(p.avg_cost_usd * p.sample_size for p in merged.values())
    per_model: dict[str, ModelStats] = {}
    for model in sorted(merged):
        p = merged[model]
        lo, hi = wilson_bounds(p.successes, p.sample_size, z)
        warning: str | None = None
        if p.sample_size < min_sample_size or hi - lo > 0.2:
            warning = (
                f"only {p.sample_size} call{'' if p.sample_size == 1 else 's'}: the success "
                f"rate is known only to within {lo:.2f}-{hi:.2f} ({level})"
            )
        per_model[model] = ModelStats(
            calls=p.sample_size,
            successes=p.successes,
            success_rate=p.success_rate,
            success_rate_lower=lo,
            success_rate_upper=hi,
            avg_cost=p.avg_cost_usd,
            avg_latency_ms=p.avg_latency_ms,
            p50=p.latency_p50_ms,
            p95=p.latency_p95_ms,
            tier=tier.value if (tier := p.tier or tier_of(model)) is not None else None,
            sample_size_warning=warning,
            ttft_p50=p.ttft_p50_ms,
            ttft_p95=p.ttft_p95_ms,
        )
    return RoutingStats(
        workflow=workflow,
        stage=stage,
        days_analyzed=days,
        models_used=tuple(sorted(merged)),
        performance_by_model=per_model,
        total_calls=total,
        avg_cost=cost / total if total else 0.0,
        avg_success_rate=successes / total if total else 0.0,
    )


# --------------------------------------------------------------------------- tier upgrades

RecentOutcomes = deque[tuple[str, ModelTier | None, bool]]
"""The most recent (model, tier, failed) outcomes of one stage, oldest first."""


def recommend(
    workflow: str,
    stage: str | None,
    items: Sequence[tuple[str, ModelTier | None, bool]],
    *,
    min_sample_size: int,
    threshold: float,
) -> TierRecommendation:
    """The `TierRecommendation` for a stage's recent outcomes (see the router's method)."""
    n = len(items)
    failures = sum(1 for _, _, failed in items if failed)
    by_model: dict[str, tuple[int, int]] = {}
    tiers: set[ModelTier] = set()
    for model, tier, failed in items:
        f, c = by_model.get(model, (0, 0))
        by_model[model] = (f + int(failed), c + 1)
        if tier is not None:
            tiers.add(tier)
    current = tuple(t for t in TIER_ORDER if t in tiers)
    where = f"{named(workflow)}/{named(stage) if stage is not None else '*'}"
    common: dict[str, Any] = {
        "workflow": workflow,
        "stage": stage,
        "failures": failures,
        "window": n,
        "current_tiers": current,
        "by_model": by_model,
    }
    if n < min_sample_size:
        return TierRecommendation(
            should_upgrade=False,
            reason=f"Insufficient data for {where} ({n} calls, need {min_sample_size})",
            failure_rate=(failures / n) if n else None,
            **common,
        )
    rate = failures / n
    if rate <= threshold:
        return TierRecommendation(
            should_upgrade=False,
            reason=f"Performance acceptable for {where}: {rate:.1%} failure rate "
            f"({failures}/{n} recent calls)",
            failure_rate=rate,
            **common,
        )
    top = current[-1] if current else None
    suggested = (
        TIER_ORDER[TIER_ORDER.index(top) + 1]
        if top is not None and top is not TIER_ORDER[-1]
        else None
    )
    worst = max(by_model.items(), key=lambda kv: (kv[1][0] / kv[1][1], kv[1][0]))[0]
    if top is None:
        tail = "; the tiers of the models are unknown"
    elif suggested is None:
        tail = f"; already at the top tier ({top.value}): check the provider or the prompt"
    else:
        tail = f"; move from {top.value} to {suggested.value}"
    return TierRecommendation(
        should_upgrade=suggested is not None,
        reason=(
            f"High failure rate for {where}: {rate:.1%} ({failures}/{n} failed in recent "
            f"calls; worst model {named(worst)}){tail}"
        ),
        failure_rate=rate,
        suggested_tier=suggested,
        **common,
    )


def named(name: str) -> str:
    """
    A workflow, stage or model as a reason names it: as it is when that cannot be
    misread, else quoted as ``repr`` quotes it (a line break, a space at either end, a
    '/' that would blur where the workflow ends, a quote or backslash, an invisible or
    control character).
    """
    plain = (
        name
        and name.isprintable()
        and not name[0].isspace()
        and not name[-1].isspace()
        and not any(c in name for c in "/\\'\"*")
    )
    return name if plain else repr(name)
