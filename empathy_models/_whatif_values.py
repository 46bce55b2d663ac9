"""
The what-if's values: intervals, per-model fits, a stage's evidence, and the report.

`empathy_models.whatif` re-exports every public name here; import them from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from attrs import field, frozen

from .evidence import EvidenceBucket

__all__ = [
    "IPWEstimate",
    "Interval",
    "ModelFit",
    "ModelTraffic",
    "StageEvidence",
    "WhatIfReport",
]


@frozen(kw_only=True)
class Interval:
    """An estimate and its 95% interval (``None`` everywhere: nothing to estimate)."""

    estimate: float | None
    low: float | None
    high: float | None

    @classmethod
    def none(cls) -> Interval:
        return cls(estimate=None, low=None, high=None)

    def covers(self, value: float) -> bool:
        """True when ``value`` lies in [low, high]."""
        return self.low is not None and self.high is not None and self.low <= value <= self.high

    def scaled(self, factor: float) -> Interval:
        def mul(v: float | None) -> float | None:
            return None if v is None else v * factor

        return Interval(estimate=mul(self.estimate), low=mul(self.low), high=mul(self.high))

    def to_dict(self) -> dict[str, float | None]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@frozen(kw_only=True)
class ModelFit:
    """
    One model's behaviour in the stage, fitted from its evidence buckets in the window.

    ``known`` is false for a candidate without a single sample in the window: its
    success rate is then unknown (reported as ``None``), never assumed.  Latency is
    log-normal over successful calls: ``latency_p50_ms`` / ``latency_p95_ms`` are the
    fit's (with one successful call, which measures no spread, at the log-sd of 0.5 the
    simulation draws it with), ``recorded_latency_p95_ms`` the recorded calls' own (nearest rank, as
    `TelemetryBackend.aggregate` computes it; likewise for the time to first token), so
    a tail the fit misses shows as a gap between the two.

    ``cost_per_call_usd`` is what an attempt costs: the list price of a successful
    call's mean tokens (the registry's current prices) times ``success_cost_factor``
    for a success and ``failure_cost_factor`` for a failure, weighed by the success
    rate.  The factors split what the model's calls were recorded to cost (every
    attempt's, the failed ones that were billed included; see
    `empathy_models.whatif`, *Costs*): 1 and 0 when they cost their list price and failures
    nothing; a prompt cache's discount or surcharge and billed failures move them, so
    at the recorded success rate ``cost_per_call_usd`` is the recorded cost per attempt.
    A model outside the registry, or without a success in the window, is costed at its
    recorded cost per attempt.
    """

    model: str
    known: bool
    samples: int = 0
    successes: int = 0
    buckets: int = 0
    success_rate: float | None = None
    success_rate_lower: float | None = None
    success_rate_upper: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    mean_input_tokens: float | None = None
    mean_output_tokens: float | None = None
    recorded_cost_usd: float = 0.0
    cost_per_call_usd: float | None = None
    in_registry: bool = True
    # what a success and a failure cost, as multiples of the list price of a success
    success_cost_factor: float = 1.0
    failure_cost_factor: float = 0.0
    recorded_latency_p95_ms: float | None = None
    recorded_ttft_p95_ms: float | None = None
    # what the replicates draw from (cluster-robust standard errors)
    overdispersion: float = 1.0
    latency_mu: float | None = None
    latency_sigma: float | None = None
    se_latency_mu: float = 0.0
    se_input_tokens: float = 0.0
    se_output_tokens: float = 0.0
    latency_n: int = 0
    # time to first token of the streamed calls (log-normal; none when never streamed)
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_mu: float | None = None
    ttft_sigma: float | None = None
    se_ttft_mu: float = 0.0
    ttft_n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "known": self.known,
            "calls": self.samples,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "success_rate_lower": self.success_rate_lower,
            "success_rate_upper": self.success_rate_upper,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "ttft_p50_ms": self.ttft_p50_ms,
            "ttft_p95_ms": self.ttft_p95_ms,
            "mean_input_tokens": self.mean_input_tokens,
            "mean_output_tokens": self.mean_output_tokens,
            "recorded_latency_p95_ms": self.recorded_latency_p95_ms,
            "recorded_ttft_p95_ms": self.recorded_ttft_p95_ms,
            "recorded_cost_usd": self.recorded_cost_usd,
            "cost_per_call_usd": self.cost_per_call_usd,
            "success_cost_factor": self.success_cost_factor,
            "failure_cost_factor": self.failure_cost_factor,
            "in_registry": self.in_registry,
            "overdispersion": self.overdispersion,
        }


@frozen(kw_only=True)
class StageEvidence:
    """
    The evidence of one workflow stage over a window, read once, evaluated many times.

    ``buckets`` are the stage's evidence buckets (every model); ``fits`` one `ModelFit`
    per model seen.  ``source`` is ``"rollups"`` or, for a backend that keeps none,
    ``"records"`` (the newest records rolled up in memory); ``partial``: the window
    held more records than were read (a backend without rollups; the report notes it).
    """

    workflow: str
    stage: str
    since: datetime
    until: datetime
    days: float
    buckets: tuple[EvidenceBucket, ...]
    fits: Mapping[str, ModelFit]
    source: str = "rollups"
    partial: bool = False

    @property
    def models(self) -> list[str]:
        return sorted(self.fits)

    @property
    def samples(self) -> int:
        return sum(f.samples for f in self.fits.values())

    @property
    def recorded_cost_usd(self) -> float:
        return sum(f.recorded_cost_usd for f in self.fits.values())


@frozen(kw_only=True)
class ModelTraffic:
    """
    The share of simulated requests one model would take, and what is known of it.

    ``cost_per_call_usd`` is what an attempt on it costs in the simulation, at its
    recorded success rate: at the prompt size (``input_tokens``) and output cap
    (``max_tokens``) evaluated when given, else its fit's `ModelFit.cost_per_call_usd`,
    which is at the sizes recorded.
    """

    model: str
    share: Interval
    known: bool
    recorded_share: float | None
    success_rate: float | None
    cost_per_call_usd: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "share": self.share.to_dict(),
            "known": self.known,
            "recorded_share": self.recorded_share,
            "success_rate": self.success_rate,
            "cost_per_call_usd": self.cost_per_call_usd,
        }


@frozen(kw_only=True)
class IPWEstimate:
    """
    Inverse-propensity-weighted (self-normalized) estimate over recorded calls.

    ``calls`` is how many recent calls were read, ``with_propensity`` how many carried
    ``routing_propensity``; ``effective_sample_size`` is (sum w)^2 / sum w^2 of the
    weights: small means the recorded traffic says little about the proposed policy.
    """

    calls: int
    with_propensity: int
    effective_sample_size: float
    cost_per_request: Interval
    success_rate: Interval

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "with_propensity": self.with_propensity,
            "effective_sample_size": self.effective_sample_size,
            "cost_per_request": self.cost_per_request.to_dict(),
            "success_rate": self.success_rate.to_dict(),
        }


@frozen(kw_only=True)
class WhatIfReport:
    """
    What a routing policy would do on a stage, estimated from its recorded evidence.

    Simulated figures are `Interval` s (mean over replicates, 95% interval):
    ``cost_per_request`` (USD per simulated request; a request no model served costs
    nothing), ``success_rate`` (of served requests), ``latency_p95_ms`` (of successful
    calls), ``no_match_share`` (requests no model qualified for, so that ``on_no_match``
    applied: raised and not answered, or answered relaxed or pinned),
    ``unproven_share`` (requests answered while no model was proven to meet every
    constraint: the router explored an unproven model, or re-probed, instead of applying
    ``on_no_match``; not counted in ``no_match_share``), ``ttft_p95_ms`` (time to first
    token of the successful calls of models that streamed; all ``None`` when none did).
    ``recorded_*`` are what the recorded calls in the window did, per attempt:
    ``recorded_latency_p95_ms`` / ``recorded_ttft_p95_ms`` as the store computes them
    (nearest rank, `TelemetryBackend.aggregate`) when one model served the stage, and
    across several models the p95 of the mix of their log-normal fits, each moved to
    its recorded p95.  ``fitted_latency_p95_ms`` / ``fitted_ttft_p95_ms`` are the p95
    of the mix of the fits themselves, what the simulation draws from: a recorded p95
    well above it means a heavier tail than a log-normal (noted in ``notes``), which
    the simulated p95 understates.
    """

    workflow: str
    stage: str
    since: datetime
    until: datetime
    price_version: str
    constraints: Mapping[str, Any]
    requests: int
    replicates: int
    recorded_calls: int
    recorded_cost_per_call: float | None
    recorded_success_rate: float | None
    recorded_latency_p95_ms: float | None
    cost_per_request: Interval
    success_rate: Interval
    latency_p95_ms: Interval
    no_match_share: Interval
    traffic: tuple[ModelTraffic, ...]
    models: tuple[ModelFit, ...]
    unknown_models: tuple[str, ...]
    ipw: IPWEstimate | None
    notes: tuple[str, ...] = field(factory=tuple)
    evidence_source: str = "rollups"
    recorded_ttft_p95_ms: float | None = None
    ttft_p95_ms: Interval = field(factory=Interval.none)
    unproven_share: Interval = field(factory=Interval.none)
    fitted_latency_p95_ms: float | None = None
    fitted_ttft_p95_ms: float | None = None

    @property
    def cost_per_1k(self) -> Interval:
        """Cost per 1,000 requests."""
        return self.cost_per_request.scaled(1000.0)

    @property
    def recorded_cost_per_1k(self) -> float | None:
        c = self.recorded_cost_per_call
        return None if c is None else c * 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "stage": self.stage,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "price_version": self.price_version,
            "constraints": dict(self.constraints),
            "requests": self.requests,
            "replicates": self.replicates,
            "evidence_source": self.evidence_source,
            "recorded": {
                "calls": self.recorded_calls,
                "cost_per_call": self.recorded_cost_per_call,
                "cost_per_1k": self.recorded_cost_per_1k,
                "success_rate": self.recorded_success_rate,
                "latency_p95_ms": self.recorded_latency_p95_ms,
                "ttft_p95_ms": self.recorded_ttft_p95_ms,
            },
            "fitted": {
                "latency_p95_ms": self.fitted_latency_p95_ms,
                "ttft_p95_ms": self.fitted_ttft_p95_ms,
            },
            "cost_per_request": self.cost_per_request.to_dict(),
            "cost_per_1k": self.cost_per_1k.to_dict(),
            "success_rate": self.success_rate.to_dict(),
            "latency_p95_ms": self.latency_p95_ms.to_dict(),
            "ttft_p95_ms": self.ttft_p95_ms.to_dict(),
            "no_match_share": self.no_match_share.to_dict(),
            "unproven_share": self.unproven_share.to_dict(),
            "traffic": [t.to_dict() for t in self.traffic],
            "models": [m.to_dict() for m in self.models],
            "unknown_models": list(self.unknown_models),
            "ipw": None if self.ipw is None else self.ipw.to_dict(),
            "notes": list(self.notes),
        }
