"""
What-if: evaluate a routing policy on recorded telemetry before deploying it.

"If I raise ``min_success_rate`` to 0.97 for docs/write, what will it cost, and how
often will nothing qualify?"  `evaluate_policy` answers from the evidence rollups the
telemetry backend already keeps (`TelemetryBackend.evidence`, one additive bucket per
model and minute), never from the individual calls, so a stage with 100,000 recorded
calls is evaluated in about a second.

How:

1. **A model of the stage per model** (`ModelFit`): success rate, log-normal latency of
   successful calls, mean input and output tokens, each with its uncertainty.  The
   uncertainty comes from resampling the evidence: the minute buckets are the units
   (a cluster-robust variance of each mean over buckets), so a model whose failures
   came in bursts (an outage) is known less precisely than the same count of
   independent failures would suggest.  Prices are the registry's current ones (its
   ``price_version`` is reported), not the prices the calls were recorded at.
2. **Replicates.**  Each replicate draws one plausible truth for every model from that
   uncertainty and replays ``requests`` simulated requests through the real
   `AdaptiveModelRouter` with the proposed constraints and routing policy: the router
   starts from the recorded evidence, as a deployed one would, decides, and learns
   from the outcomes drawn from the replicate's truth.  Every figure (cost per request,
   success rate, p95 latency, share of requests where no model qualifies, traffic per
   model) is the mean over replicates with a 95% interval from their spread.
3. **Unknown is not good.**  A candidate without data in the window is reported as
   unknown; when the router sends simulated traffic to it, its success rate is drawn
   from the uniform prior (anything from 0 to 1), its tokens and latency from the
   stage's pooled evidence, so the intervals widen instead of assuming it works.
4. **Off-policy check.**  When the recorded calls carry the router's selection
   probability (``LLMCallRecord.routing_propensity``), an inverse-propensity-weighted
   estimate over the most recent calls (`ipw_limit`, the one step that reads rows) is
   reported beside the simulation, with its effective sample size.

One simulated request is one routed attempt: retries and fallbacks are not simulated,
failed attempts are costed at zero (as the executor records them: nothing billed), and
"what was actually spent" is likewise the recorded cost per attempt.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

from attrs import evolve, field, frozen

from .abc import TelemetryBackend
from .evidence import (
    BUCKET_SECONDS,
    SUM_FIELDS,
    EvidenceBatch,
    EvidenceBucket,
    rollup,
    sorted_buckets,
)
from .exceptions import ConfigurationError, NoModelMeetsConstraintsError
from .records import (
    ConstraintStatus,
    LLMCallRecord,
    ModelPerformance,
    Outcome,
    _trusted_call_record,
    wilson_interval,
)
from .registry import ModelRegistry
from .router import AdaptiveModelRouter
from .routing.policy import RoutingPolicy

__all__ = [
    "IPWEstimate",
    "Interval",
    "ModelFit",
    "ModelTraffic",
    "StageEvidence",
    "WhatIfReport",
    "evaluate_policy",
    "ipw_estimate",
    "load_stage_evidence",
    "simulate_policy",
    "sweep_min_success_rate",
]

_Z95: Final = 1.959963984540054
_P95_Z: Final = 1.6448536269514722
_MIN_CLUSTERS: Final = 10  # fewer buckets than this: the spread is not trusted alone
_FALLBACK_CV: Final = 0.5  # assumed coefficient of variation of tokens when it is unknown
_FALLBACK_SIGMA: Final = 0.5  # log-sd of latency when a model has < 2 measured calls
_RECENT_FALLBACK: Final = 100_000
_SIM_BUCKETS: Final = 64  # evidence buckets per model the simulated router starts from


# --------------------------------------------------------------------------- values


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
    log-normal over successful calls; ``cost_per_call_usd`` prices the mean tokens of a
    successful call at the registry's current prices and weighs it by the success rate
    (failed attempts cost nothing).
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
            "recorded_cost_usd": self.recorded_cost_usd,
            "cost_per_call_usd": self.cost_per_call_usd,
            "in_registry": self.in_registry,
            "overdispersion": self.overdispersion,
        }


@frozen(kw_only=True)
class StageEvidence:
    """
    The evidence of one workflow stage over a window, read once, evaluated many times.

    ``buckets`` are the stage's evidence buckets (every model); ``fits`` one `ModelFit`
    per model seen.  ``source`` is ``"rollups"`` or, for a backend that keeps none,
    ``"records"`` (the newest records rolled up in memory).
    """

    workflow: str
    stage: str
    since: datetime
    until: datetime
    days: float
    buckets: tuple[EvidenceBucket, ...]
    fits: Mapping[str, ModelFit]
    source: str = "rollups"

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
    """The share of simulated requests one model would take, and what is known of it."""

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
    calls), ``no_match_share`` (requests where no model met every constraint: raised,
    relaxed, pinned, or explored because nothing was eligible), ``ttft_p95_ms`` (time
    to first token of the successful calls of models that streamed; all ``None`` when
    none did).  ``recorded_*`` are what the recorded calls in the window did, per attempt.
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
            "cost_per_request": self.cost_per_request.to_dict(),
            "cost_per_1k": self.cost_per_1k.to_dict(),
            "success_rate": self.success_rate.to_dict(),
            "latency_p95_ms": self.latency_p95_ms.to_dict(),
            "ttft_p95_ms": self.ttft_p95_ms.to_dict(),
            "no_match_share": self.no_match_share.to_dict(),
            "traffic": [t.to_dict() for t in self.traffic],
            "models": [m.to_dict() for m in self.models],
            "unknown_models": list(self.unknown_models),
            "ipw": None if self.ipw is None else self.ipw.to_dict(),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- reading


def _ratio_se(pairs: Sequence[tuple[float, float]], ratio: float) -> float:
    """Cluster-robust standard error of sum(y)/sum(n) over clusters (n, y)."""
    k = len(pairs)
    total = sum(n for n, _ in pairs)
    if k < 2 or total <= 0:
        return 0.0
    resid = sum((y - ratio * n) ** 2 for n, y in pairs)
    return math.sqrt(resid * k / (k - 1)) / total


def _fit(model: str, buckets: Sequence[EvidenceBucket], registry: ModelRegistry) -> ModelFit:
    samples = sum(b.samples for b in buckets)
    successes = sum(b.successes for b in buckets)
    lat_n = sum(b.latency_n for b in buckets)
    cost = sum(b.cost_usd for b in buckets)
    in_registry = model in registry
    if samples == 0:
        return ModelFit(model=model, known=False, in_registry=in_registry)
    rate = successes / samples
    low, high = wilson_interval(successes, samples)
    k = len(buckets)
    phi = 1.0
    if k >= _MIN_CLUSTERS and 0.0 < rate < 1.0:
        se = _ratio_se([(b.samples, b.successes) for b in buckets], rate)
        phi = max(1.0, se * se / (rate * (1.0 - rate) / samples))
    mean_in = mean_out = mu = sigma = None
    se_in = se_out = se_mu = 0.0
    p50 = p95 = None
    if lat_n:
        mean_in = sum(b.input_tokens for b in buckets) / lat_n
        mean_out = sum(b.output_tokens for b in buckets) / lat_n
        mu = sum(b.latency_log_sum for b in buckets) / lat_n
        sq = sum(b.latency_log_sq_sum for b in buckets) / lat_n
        sigma = math.sqrt(max(0.0, sq - mu * mu) * lat_n / (lat_n - 1)) if lat_n > 1 else None
        clusters = [b for b in buckets if b.latency_n]
        se_in = _ratio_se([(b.latency_n, b.input_tokens) for b in clusters], mean_in)
        se_out = _ratio_se([(b.latency_n, b.output_tokens) for b in clusters], mean_out)
        se_mu = _ratio_se([(b.latency_n, b.latency_log_sum) for b in clusters], mu)
        if len(clusters) < _MIN_CLUSTERS:
            # too few buckets to trust their spread: never claim more precision than
            # independent calls with a typical spread would give
            root = math.sqrt(lat_n)
            se_in = max(se_in, _FALLBACK_CV * mean_in / root)
            se_out = max(se_out, _FALLBACK_CV * mean_out / root)
            se_mu = max(se_mu, (sigma if sigma is not None else _FALLBACK_SIGMA) / root)
        s = sigma if sigma is not None else 0.0
        p50 = math.exp(mu)
        p95 = math.exp(mu + _P95_Z * s)
    ttft_n = sum(b.ttft_n for b in buckets)
    t_mu = t_sigma = t_p50 = t_p95 = None
    se_t = 0.0
    if ttft_n:
        t_mu = sum(b.ttft_log_sum for b in buckets) / ttft_n
        t_sq = sum(b.ttft_log_sq_sum for b in buckets) / ttft_n
        t_sigma = (
            math.sqrt(max(0.0, t_sq - t_mu * t_mu) * ttft_n / (ttft_n - 1)) if ttft_n > 1 else None
        )
        t_clusters = [b for b in buckets if b.ttft_n]
        se_t = _ratio_se([(b.ttft_n, b.ttft_log_sum) for b in t_clusters], t_mu)
        if len(t_clusters) < _MIN_CLUSTERS:
            se_t = max(
                se_t, (t_sigma if t_sigma is not None else _FALLBACK_SIGMA) / math.sqrt(ttft_n)
            )
        t_p50 = math.exp(t_mu)
        t_p95 = math.exp(t_mu + _P95_Z * (t_sigma if t_sigma is not None else 0.0))
    per_call: float | None = None
    if in_registry and mean_in is not None and mean_out is not None:
        info = registry.get(model)
        per_success = (
            mean_in * info.input_price_per_mtok + mean_out * info.output_price_per_mtok
        ) / 1e6
        per_call = rate * per_success
    elif not in_registry:
        per_call = cost / samples
    return ModelFit(
        model=model,
        known=True,
        samples=samples,
        successes=successes,
        buckets=k,
        success_rate=rate,
        success_rate_lower=low,
        success_rate_upper=high,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        mean_input_tokens=mean_in,
        mean_output_tokens=mean_out,
        recorded_cost_usd=cost,
        cost_per_call_usd=per_call,
        in_registry=in_registry,
        overdispersion=phi,
        latency_mu=mu,
        latency_sigma=sigma,
        se_latency_mu=se_mu,
        se_input_tokens=se_in,
        se_output_tokens=se_out,
        latency_n=lat_n,
        ttft_p50_ms=t_p50,
        ttft_p95_ms=t_p95,
        ttft_mu=t_mu,
        ttft_sigma=t_sigma,
        se_ttft_mu=se_t,
        ttft_n=ttft_n,
    )


def _check_days(days: object) -> float:
    if (
        isinstance(days, bool)
        or not isinstance(days, int | float)
        or not math.isfinite(days)
        or not 0 < days <= 36_500
    ):
        raise ConfigurationError(f"days must be a number > 0 and <= 36500, got {days!r}")
    return float(days)


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{what} must be a non-empty string, got {value!r}")
    return value


async def load_stage_evidence(
    backend: TelemetryBackend,
    workflow: str,
    stage: str,
    *,
    registry: ModelRegistry | None = None,
    days: float = 7.0,
    now: datetime | None = None,
) -> StageEvidence:
    """
    Read the evidence buckets of ``workflow``/``stage`` over the last ``days`` and fit
    each model seen (`ModelFit`).  The backend is flushed first, then read once
    (``evidence()``); a backend that keeps no rollups has its newest records (up to
    100,000) rolled up in memory instead.
    """
    _check_name("workflow", workflow)
    _check_name("stage", stage)
    days = _check_days(days)
    registry = ModelRegistry.default() if registry is None else registry
    until = now if now is not None else datetime.now(UTC)
    if until.tzinfo is None:
        raise ConfigurationError("now must be a timezone-aware datetime")
    since = until - timedelta(days=days)
    source = "rollups"
    await backend.flush()  # what this process handed to a batching backend counts too
    try:
        batch = await backend.evidence(since=since, until=until)
        found: Iterable[EvidenceBucket] = batch.buckets
    except NotImplementedError:
        source = "records"
        recent = await backend.recent(
            limit=_RECENT_FALLBACK, workflow=workflow, stage=stage, since=since
        )
        found = rollup(r for r in recent if r.timestamp < until)
    mine = tuple(b for b in found if b.workflow == workflow and b.stage == stage)
    per_model: dict[str, list[EvidenceBucket]] = {}
    for b in mine:
        per_model.setdefault(b.model, []).append(b)
    fits = {m: _fit(m, bs, registry) for m, bs in sorted(per_model.items())}
    return StageEvidence(
        workflow=workflow,
        stage=stage,
        since=since,
        until=until,
        days=days,
        buckets=mine,
        fits=fits,
        source=source,
    )


# --------------------------------------------------------------------------- simulation


class _FrozenEvidence(TelemetryBackend):
    """A backend holding fixed evidence buckets: what the simulated router starts from."""

    def __init__(self, buckets: Sequence[EvidenceBucket]) -> None:
        super().__init__()
        self._buckets = tuple(buckets)

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        return None

    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        return []

    async def _recent(
        self,
        *,
        limit: int,
        workflow: str | None,
        stage: str | None,
        model: str | None,
        since: datetime | None,
    ) -> list[LLMCallRecord]:
        return []

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        if after_version >= 1:
            return EvidenceBatch(buckets=(), version=1)
        return EvidenceBatch(
            buckets=[
                b
                for b in self._buckets
                if (since is None or b.bucket_start >= since)
                and (until is None or b.bucket_start < until)
            ],
            version=1,
        )

    async def _purge(self, *, before: datetime) -> int:
        return 0


def _coarsen(buckets: Sequence[EvidenceBucket], days: float) -> list[EvidenceBucket]:
    """
    The buckets merged into wider ones (at most ~`_SIM_BUCKETS` per model over the
    window), stamped version 1: every sum is kept, so the simulated router's verdicts
    are those of the recorded evidence, and its start costs the same at 1k or 1M calls.
    """
    width = max(BUCKET_SECONDS, math.ceil(days * 86_400 / _SIM_BUCKETS / BUCKET_SECONDS) * 60)
    acc: dict[tuple[str | None, str | None, str, int], list[float]] = {}
    starts: dict[tuple[str | None, str | None, str, int], datetime] = {}
    for b in buckets:
        key = (b.workflow, b.stage, b.model, math.floor(b.bucket_start.timestamp() / width))
        sums = acc.get(key)
        if sums is None:
            sums = acc[key] = [0.0] * len(SUM_FIELDS)
            starts[key] = b.bucket_start
        elif b.bucket_start < starts[key]:
            starts[key] = b.bucket_start  # the earliest: a merged bucket stays in the window
        for i, name in enumerate(SUM_FIELDS):
            sums[i] += getattr(b, name)
    out = []
    for key, sums in acc.items():
        wf, st, model, _ = key
        values: dict[str, Any] = {
            name: int(v) if isinstance(getattr(_ZERO_BUCKET, name), int) else v
            for name, v in zip(SUM_FIELDS, sums, strict=True)
        }
        out.append(
            EvidenceBucket(
                workflow=wf,
                stage=st,
                model=model,
                bucket_start=starts[key],
                version=1,
                **values,
            )
        )
    return sorted_buckets(out)


_ZERO_BUCKET: Final = EvidenceBucket(
    workflow=None, stage=None, model="-", bucket_start=datetime.fromtimestamp(0, UTC)
)


@frozen(kw_only=True)
class _Draw:
    """One replicate's truth for one model."""

    provider: str
    success: float
    input_tokens: float
    output_tokens: float
    mu: float
    sigma: float
    cost_per_success: float
    # log-normal time to first token; None: no streamed call to learn it from
    ttft_mu: float | None = None
    ttft_sigma: float = _FALLBACK_SIGMA


def _pooled(evidence: StageEvidence) -> tuple[float, float, float, float]:
    """Stage-wide mean input / output tokens and latency log-mean / log-sd."""
    n = sum(f.latency_n for f in evidence.fits.values())
    if n == 0:
        return (0.0, 0.0, math.log(1000.0), 1.0)
    b = evidence.buckets
    mean_in = sum(x.input_tokens for x in b) / n
    mean_out = sum(x.output_tokens for x in b) / n
    mu = sum(x.latency_log_sum for x in b) / n
    sq = sum(x.latency_log_sq_sum for x in b) / n
    return (mean_in, mean_out, mu, math.sqrt(max(0.0, sq - mu * mu)) or _FALLBACK_SIGMA)


def _pooled_ttft(evidence: StageEvidence) -> tuple[float, float] | None:
    """Stage-wide TTFT log-mean / log-sd of the streamed calls; None if none streamed."""
    b = evidence.buckets
    n = sum(x.ttft_n for x in b)
    if n == 0:
        return None
    mu = sum(x.ttft_log_sum for x in b) / n
    sq = sum(x.ttft_log_sq_sum for x in b) / n
    return (mu, math.sqrt(max(0.0, sq - mu * mu)) or _FALLBACK_SIGMA)


def _draw_ttft(
    fit: ModelFit, pooled_ttft: tuple[float, float] | None, rng: random.Random
) -> tuple[float | None, float]:
    """One replicate's TTFT log-mean / log-sd for a model (the stage's if it never streamed)."""
    if fit.ttft_mu is None:
        if pooled_ttft is None:
            return None, _FALLBACK_SIGMA
        return pooled_ttft
    mu = rng.gauss(fit.ttft_mu, fit.se_ttft_mu)
    n = fit.ttft_n
    if fit.ttft_sigma is not None and n > 2:
        sigma = fit.ttft_sigma * math.sqrt(rng.gammavariate((n - 1) / 2.0, 2.0) / (n - 1))
    else:
        sigma = fit.ttft_sigma if fit.ttft_sigma is not None else _FALLBACK_SIGMA
    return mu, max(sigma, 1e-6)


def _draw(
    fit: ModelFit,
    registry: ModelRegistry,
    pooled: tuple[float, float, float, float],
    rng: random.Random,
    pooled_ttft: tuple[float, float] | None = None,
) -> _Draw:
    info = registry.get(fit.model) if fit.model in registry else None
    provider = info.provider if info is not None else "unknown"
    if not fit.known or fit.mean_output_tokens is None or fit.latency_mu is None:
        # unknown (or never successful): anything from 0 to 1, the stage's tokens/latency
        s = fit.successes
        f = fit.samples - s
        success = rng.betavariate(1.0 + s, 1.0 + f)
        mean_in, mean_out, mu, sigma = pooled
    else:
        phi = fit.overdispersion
        s = fit.successes
        f = fit.samples - s
        success = rng.betavariate(1.0 + s / phi, 1.0 + f / phi)
        assert fit.mean_input_tokens is not None
        mean_in = max(0.0, rng.gauss(fit.mean_input_tokens, fit.se_input_tokens))
        mean_out = max(0.0, rng.gauss(fit.mean_output_tokens, fit.se_output_tokens))
        mu = rng.gauss(fit.latency_mu, fit.se_latency_mu)
        n = fit.latency_n
        if fit.latency_sigma is not None and n > 2:
            sigma = fit.latency_sigma * math.sqrt(rng.gammavariate((n - 1) / 2.0, 2.0) / (n - 1))
        else:
            sigma = fit.latency_sigma if fit.latency_sigma is not None else _FALLBACK_SIGMA
    if info is not None:
        per_success = (
            mean_in * info.input_price_per_mtok + mean_out * info.output_price_per_mtok
        ) / 1e6
    else:
        rate = fit.success_rate or 0.0
        per_success = fit.recorded_cost_usd / max(1, fit.samples) / rate if rate > 0 else 0.0
    ttft_mu, ttft_sigma = _draw_ttft(fit, pooled_ttft, rng)
    return _Draw(
        provider=provider,
        success=success,
        input_tokens=mean_in,
        output_tokens=mean_out,
        mu=mu,
        sigma=max(sigma, 1e-6),
        cost_per_success=per_success,
        ttft_mu=ttft_mu,
        ttft_sigma=ttft_sigma,
    )


def _mixture_p95(parts: Sequence[tuple[float, float, float]]) -> float | None:
    """The 95th percentile of a mixture of log-normals given as (weight, mu, sigma)."""
    parts = [p for p in parts if p[0] > 0]
    total = sum(w for w, _, _ in parts)
    if not parts or total <= 0:
        return None
    norm = statistics.NormalDist()

    parts = [(w, mu, max(s, 1e-9)) for w, mu, s in parts]

    def cdf(x: float) -> float:
        return sum(w * norm.cdf((x - mu) / s) for w, mu, s in parts) / total

    lo = min(mu - 6 * s for _, mu, s in parts)
    hi = max(mu + 6 * s for _, mu, s in parts)
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) < 0.95:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _quantile(ordered: Sequence[float], q: float) -> float:
    pos = q * (len(ordered) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(ordered) - 1)
    return ordered[i] + (ordered[j] - ordered[i]) * (pos - i)


def _interval(values: Sequence[float | None], *, upper: float | None = None) -> Interval:
    """
    The mean of the replicates and a 95% interval that holds both the normal one (mean
    +- 1.96 sd) and the replicates' own 2.5-97.5% range: when the router's choice
    splits the replicates (a model proven in some, not in others) the figures are
    bimodal, and the interval must reach both modes.
    """
    xs = [v for v in values if v is not None]
    if not xs:
        return Interval.none()
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    ordered = sorted(xs)
    low = max(0.0, min(mean - _Z95 * sd, _quantile(ordered, 0.025)))
    high = max(mean + _Z95 * sd, _quantile(ordered, 0.975))
    if upper is not None:
        high = min(upper, high)
    return Interval(estimate=mean, low=low, high=high)


def _record(
    *,
    provider: str,
    model: str,
    outcome: Outcome,
    timestamp: datetime,
    workflow: str,
    stage: str,
    input_tokens: int,
    output_tokens: int,
    cost_usd: float,
    latency_ms: float,
    ttft_ms: float | None = None,
) -> LLMCallRecord:
    # a simulated attempt: every value is computed here and valid, so the record is
    # built without re-validating (a third of the simulation's time otherwise)
    return _trusted_call_record(
        provider=provider,
        model=model,
        outcome=outcome,
        call_id="whatif",
        request_id=None,
        timestamp=timestamp,
        workflow=workflow,
        stage=stage,
        task_type="unknown",
        tier=None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost_usd,
        actual_cost_usd=None,
        price_version=None,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        error_type=None,
        error_message=None,
        status_code=None,
        attempt=1,
        fallback_used=False,
        fallback_chain=(),
        original_provider=None,
        original_model=None,
        exploration=False,
        routing_propensity=None,
        breaker_generation=None,
        circuit_state=None,
        user_id=None,
        session_id=None,
        metadata=_NO_METADATA,
        prompt_text=None,
        response_text=None,
    )


_NO_METADATA: Final[MappingProxyType[str, Any]] = MappingProxyType({})


def _check_positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be an integer >= 1, got {value!r}")
    return value


async def simulate_policy(
    evidence: StageEvidence,
    *,
    registry: ModelRegistry | None = None,
    max_cost: float | None = None,
    max_latency_ms: float | None = None,
    min_success_rate: float | None = None,
    on_no_match: str = "raise",
    candidates: Sequence[str] | None = None,
    input_tokens: int | None = None,
    max_tokens: int | None = None,
    max_ttft_ms: float | None = None,
    routing_policy: RoutingPolicy | None = None,
    requests: int = 400,
    replicates: int = 30,
    seed: int = 0,
) -> WhatIfReport:
    """
    Replay ``requests`` simulated requests through the real router, ``replicates`` times.

    Constraints and ``on_no_match`` are those of `AdaptiveModelRouter.get_best_model`;
    ``min_success_rate`` ``None`` means the routing policy's default floor.
    ``candidates`` default to the models seen in the window; ``input_tokens`` to the
    stage's mean.  Simulated calls of a model with streamed calls in the window carry a
    time to first token drawn from them (``max_ttft_ms`` judges it as the router does); a
    model never streamed takes the stage's, and when nothing in the stage streamed no
    model can prove a ``max_ttft_ms``.  ``routing_policy`` defaults to `RoutingPolicy`
    with the evidence's window.  Invalid arguments raise `ConfigurationError`.
    """
    registry = ModelRegistry.default() if registry is None else registry
    if not isinstance(registry, ModelRegistry):
        raise ConfigurationError(f"registry must be a ModelRegistry, got {registry!r}")
    requests = _check_positive_int("requests", requests)
    replicates = _check_positive_int("replicates", replicates)
    if replicates < 2:
        raise ConfigurationError("replicates must be at least 2 (the interval needs a spread)")
    if routing_policy is None:
        routing_policy = RoutingPolicy(window_days=evidence.days)
    if isinstance(candidates, str):
        raise ConfigurationError("candidates must be a sequence of model ids, not a string")
    names = list(evidence.models) if candidates is None else list(dict.fromkeys(candidates))
    if any(not isinstance(n, str) or not n for n in names):
        raise ConfigurationError(f"candidate model ids must be non-empty strings, got {names!r}")
    if min_success_rate is not None and (
        isinstance(min_success_rate, bool)
        or not isinstance(min_success_rate, int | float)
        or not 0.0 <= min_success_rate <= 1.0
    ):
        raise ConfigurationError(
            f"min_success_rate must be a number in [0, 1], got {min_success_rate!r}"
        )
    if not names:
        raise ConfigurationError(
            f"no calls recorded for {evidence.workflow}/{evidence.stage} since "
            f"{evidence.since.isoformat()}, and no candidates given: nothing to evaluate"
        )
    fits: dict[str, ModelFit] = dict(evidence.fits)
    for name in names:
        if name not in fits:
            fits[name] = ModelFit(model=name, known=False, in_registry=name in registry)
    unknown = tuple(n for n in names if not fits[n].known)
    pooled = _pooled(evidence)
    pooled_ttft = _pooled_ttft(evidence)
    if input_tokens is None:
        input_tokens = round(pooled[0]) if pooled[0] > 0 else None
    constraints = {
        "max_cost": max_cost,
        "max_latency_ms": max_latency_ms,
        "max_ttft_ms": max_ttft_ms,
        "min_success_rate": min_success_rate
        if min_success_rate is not None
        else routing_policy.default_min_success_rate,
        "on_no_match": on_no_match,
        "input_tokens": input_tokens,
        "max_tokens": max_tokens,
        "candidates": names,
    }
    store = _FrozenEvidence(_coarsen(evidence.buckets, evidence.days))
    start = evidence.until.timestamp()
    costs: list[float] = []
    success: list[float | None] = []
    p95s: list[float | None] = []
    ttft_p95s: list[float | None] = []
    no_match: list[float] = []
    shares: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(replicates):
        rng = random.Random(seed * 1_000_003 + rep)
        draws = {n: _draw(fits[n], registry, pooled, rng, pooled_ttft) for n in names}
        now = [start]

        def clock(now: list[float] = now) -> float:
            return now[0]

        router = AdaptiveModelRouter(
            registry,
            store,
            policy=routing_policy,
            refresh_interval=None,
            seed=seed * 7_919 + rep,
            clock=clock,
        )
        picks: dict[str, int] = {}
        served = 0
        unmatched = 0
        exp_cost = 0.0
        exp_success = 0.0
        async with router:
            for _ in range(requests):
                now[0] += 1.0
                try:
                    decision = router.get_best_model(
                        evidence.workflow,
                        evidence.stage,
                        candidates=names,
                        input_tokens=input_tokens,
                        max_tokens=max_tokens,
                        max_cost=max_cost,
                        max_latency_ms=max_latency_ms,
                        min_success_rate=min_success_rate,
                        on_no_match=on_no_match,
                        max_ttft_ms=max_ttft_ms,
                    )
                except NoModelMeetsConstraintsError:
                    unmatched += 1
                    continue
                if decision.policy_applied is not None or (
                    decision.exploration
                    and not any(c.status is ConstraintStatus.ELIGIBLE for c in decision.candidates)
                ):
                    unmatched += 1
                model = decision.model
                d = draws.get(model)
                if d is None:  # a pinned model outside the candidates
                    fits.setdefault(
                        model, evidence.fits.get(model) or ModelFit(model=model, known=False)
                    )
                    d = draws[model] = _draw(fits[model], registry, pooled, rng, pooled_ttft)
                    shares.setdefault(model, [0.0] * rep)
                served += 1
                picks[model] = picks.get(model, 0) + 1
                exp_cost += d.success * d.cost_per_success
                exp_success += d.success
                ok = rng.random() < d.success
                out = round(d.output_tokens) if ok else 0
                router.record_outcome(
                    _record(
                        provider=d.provider,
                        model=model,
                        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                        timestamp=datetime.fromtimestamp(now[0], UTC),
                        workflow=evidence.workflow,
                        stage=evidence.stage,
                        input_tokens=round(d.input_tokens) if ok else 0,
                        output_tokens=out,
                        cost_usd=d.cost_per_success if ok else 0.0,
                        latency_ms=rng.lognormvariate(d.mu, d.sigma),
                        ttft_ms=None
                        if d.ttft_mu is None
                        else rng.lognormvariate(d.ttft_mu, d.ttft_sigma),
                    )
                )
        costs.append(exp_cost / requests)
        success.append(exp_success / served if served else None)
        no_match.append(unmatched / requests)
        p95s.append(
            _mixture_p95(
                [(picks.get(m, 0) * draws[m].success, draws[m].mu, draws[m].sigma) for m in picks]
            )
        )
        ttft_p95s.append(
            _mixture_p95(
                [
                    (picks.get(m, 0) * draws[m].success, t_mu, draws[m].ttft_sigma)
                    for m in picks
                    if (t_mu := draws[m].ttft_mu) is not None
                ]
            )
        )
        for m in shares:
            shares[m].append(picks.get(m, 0) / requests)
    total = evidence.samples
    traffic = tuple(
        sorted(
            (
                ModelTraffic(
                    model=m,
                    share=_interval(v, upper=1.0),
                    known=fits[m].known,
                    recorded_share=(fits[m].samples / total) if total else None,
                    success_rate=fits[m].success_rate,
                    cost_per_call_usd=fits[m].cost_per_call_usd,
                )
                for m, v in shares.items()
            ),
            key=lambda t: (-(t.share.estimate or 0.0), t.model),
        )
    )
    notes: list[str] = [
        f"{m}: no calls in the window: its success rate is unknown (drawn from 0..1 in "
        "the simulation), its tokens and latency taken from the stage's other models"
        for m in unknown
    ]
    if max_ttft_ms is not None and pooled_ttft is None:
        notes.append(
            "max_ttft_ms: no call of this stage streamed in the window, so no model has a "
            "time to first token to prove it (each is unproven, routed by exploration)"
        )
    for m in names:
        f = fits[m]
        if f.known and not f.in_registry:
            notes.append(f"{m}: not in the model registry: the router cannot choose it")
        elif f.known and f.samples < 30:
            notes.append(f"{m}: only {f.samples} calls in the window: its figures are uncertain")
    recorded_p95 = _mixture_p95(
        [
            (
                f.successes,
                f.latency_mu,
                f.latency_sigma if f.latency_sigma is not None else _FALLBACK_SIGMA,
            )
            for f in evidence.fits.values()
            if f.latency_mu is not None
        ]
    )
    recorded_ttft_p95 = _mixture_p95(
        [
            (
                f.ttft_n,
                f.ttft_mu,
                f.ttft_sigma if f.ttft_sigma is not None else _FALLBACK_SIGMA,
            )
            for f in evidence.fits.values()
            if f.ttft_mu is not None
        ]
    )
    return WhatIfReport(
        workflow=evidence.workflow,
        stage=evidence.stage,
        since=evidence.since,
        until=evidence.until,
        price_version=registry.price_version,
        constraints=constraints,
        requests=requests,
        replicates=replicates,
        recorded_calls=total,
        recorded_cost_per_call=(evidence.recorded_cost_usd / total) if total else None,
        recorded_success_rate=(sum(f.successes for f in evidence.fits.values()) / total)
        if total
        else None,
        recorded_latency_p95_ms=recorded_p95,
        cost_per_request=_interval(costs),
        success_rate=_interval(success, upper=1.0),
        latency_p95_ms=_interval(p95s),
        no_match_share=_interval(no_match, upper=1.0),
        traffic=traffic,
        models=tuple(fits[m] for m in sorted(fits)),
        unknown_models=unknown,
        ipw=None,
        notes=tuple(notes),
        evidence_source=evidence.source,
        recorded_ttft_p95_ms=recorded_ttft_p95,
        ttft_p95_ms=_interval(ttft_p95s),
    )


# --------------------------------------------------------------------------- off-policy


def ipw_estimate(
    records: Iterable[LLMCallRecord], target: Mapping[str, float], *, min_ess: float = 30.0
) -> IPWEstimate | None:
    """
    Self-normalized inverse-propensity estimate of cost per request and success rate.

    ``target`` is the proposed policy's probability of choosing each model (its
    simulated traffic shares); each recorded sample call with a ``routing_propensity``
    weighs ``target[model] / routing_propensity``.  Returns ``None`` when no recorded
    call carries a propensity, or the effective sample size is below ``min_ess``.
    """
    calls = 0
    rows: list[tuple[float, float, float]] = []
    for r in records:
        if not r.outcome.is_sample:
            continue
        calls += 1
        p = r.routing_propensity
        if p is None or p <= 0.0:
            continue
        rows.append((target.get(r.model, 0.0) / p, r.cost_usd, 1.0 if r.success else 0.0))
    if not rows:
        return None
    sw = sum(w for w, _, _ in rows)
    sw2 = sum(w * w for w, _, _ in rows)
    if sw <= 0:
        return None
    ess = sw * sw / sw2
    if ess < min_ess:
        return IPWEstimate(
            calls=calls,
            with_propensity=len(rows),
            effective_sample_size=ess,
            cost_per_request=Interval.none(),
            success_rate=Interval.none(),
        )

    def snips(values: Sequence[float], upper: float | None) -> Interval:
        est = sum(w * v for (w, _, _), v in zip(rows, values, strict=True)) / sw
        var = sum((w * (v - est)) ** 2 for (w, _, _), v in zip(rows, values, strict=True)) / (
            sw * sw
        )
        half = _Z95 * math.sqrt(var)
        high = est + half if upper is None else min(upper, est + half)
        return Interval(estimate=est, low=max(0.0, est - half), high=high)

    return IPWEstimate(
        calls=calls,
        with_propensity=len(rows),
        effective_sample_size=ess,
        cost_per_request=snips([c for _, c, _ in rows], None),
        success_rate=snips([s for _, _, s in rows], 1.0),
    )


# --------------------------------------------------------------------------- entry points


async def evaluate_policy(
    backend: TelemetryBackend,
    workflow: str,
    stage: str,
    *,
    registry: ModelRegistry | None = None,
    days: float = 7.0,
    now: datetime | None = None,
    ipw_limit: int = 5_000,
    evidence: StageEvidence | None = None,
    **options: Any,
) -> WhatIfReport:
    """
    `load_stage_evidence` then `simulate_policy` (``options`` are its keywords), plus the
    off-policy estimate over the newest ``ipw_limit`` calls of the stage (0: skip it).
    ``evidence`` already loaded for this stage is used instead of reading it again.
    """
    if isinstance(ipw_limit, bool) or not isinstance(ipw_limit, int) or ipw_limit < 0:
        raise ConfigurationError(f"ipw_limit must be an integer >= 0, got {ipw_limit!r}")
    registry = ModelRegistry.default() if registry is None else registry
    if evidence is None:
        evidence = await load_stage_evidence(
            backend, workflow, stage, registry=registry, days=days, now=now
        )
    elif (evidence.workflow, evidence.stage) != (workflow, stage):
        raise ConfigurationError(
            f"evidence is for {evidence.workflow}/{evidence.stage}, not {workflow}/{stage}"
        )
    report = await simulate_policy(evidence, registry=registry, **options)
    if ipw_limit == 0 or not evidence.samples:
        return report
    recent = await backend.recent(
        limit=ipw_limit, workflow=workflow, stage=stage, since=evidence.since
    )
    target = {t.model: t.share.estimate or 0.0 for t in report.traffic}
    ipw = ipw_estimate((r for r in recent if r.timestamp < evidence.until), target)
    notes = list(report.notes)
    if ipw is None:
        notes.append(
            "no off-policy (IPW) estimate: the recorded calls carry no routing_propensity "
            "(recorded before this version, or without a router)"
        )
    elif ipw.cost_per_request.estimate is None:
        notes.append(
            f"no off-policy (IPW) estimate: the recorded traffic overlaps too little with "
            f"the proposed policy (effective sample size {ipw.effective_sample_size:.1f})"
        )
    return evolve(report, ipw=ipw, notes=tuple(notes))


async def sweep_min_success_rate(
    evidence: StageEvidence, values: Sequence[float], **options: Any
) -> list[WhatIfReport]:
    """`simulate_policy` for each ``min_success_rate`` in ``values`` (same evidence)."""
    if not values:
        raise ConfigurationError("sweep needs at least one min_success_rate value")
    return [await simulate_policy(evidence, min_success_rate=v, **options) for v in values]
