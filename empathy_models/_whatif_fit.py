"""
The what-if's statistics: one model's fit from its evidence buckets, and the summaries
the report is made of (the p95 of a mix of log-normals, a replicates' interval).

Every uncertainty is cluster-robust: the minute buckets are the units, so a model whose
failures came in bursts is known less precisely than the same count of independent
failures would suggest.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Final

from attrs import frozen

from ._stats import AVERAGE_CAP, interpolated_quantile
from ._whatif_values import Interval, ModelFit
from .evidence import EvidenceBucket
from .records import wilson_interval
from .registry import ModelRegistry
from .routing.stats import bounded_exp

__all__: list[str] = []

_Z95: Final = 1.959963984540054
_P95_Z: Final = 1.6448536269514722
_MIN_CLUSTERS: Final = 10  # fewer buckets than this: the spread is not trusted alone
_FALLBACK_CV: Final = 0.5  # assumed coefficient of variation of tokens when it is unknown
_FALLBACK_SIGMA: Final = 0.5  # log-sd of latency when a model has < 2 measured calls


def _ratio_se(pairs: Sequence[tuple[float, float]], ratio: float) -> float:
    """Cluster-robust standard error of sum(y)/sum(n) over clusters (n, y)."""
    k = len(pairs)
    total = sum(n for n, _ in pairs)
    if k < 2 or total <= 0:
        return 0.0
    resid = sum((y - ratio * n) ** 2 for n, y in pairs)
    return math.sqrt(resid * k / (k - 1)) / total


@frozen(kw_only=True)
class _LogNormal:
    """
    A log-normal fitted from per-bucket sums of logs (latency, or time to first token).

    ``sigma`` is ``None`` below two measured calls (``p95`` is then at
    `_FALLBACK_SIGMA`, as the replicates draw such a model); ``se_mu`` is the cluster-robust
    standard error of ``mu``, never below what independent calls would give when
    fewer than `_MIN_CLUSTERS` buckets measured anything (``clusters``).
    """

    n: int
    mu: float
    sigma: float | None
    se_mu: float
    clusters: int
    p50: float
    p95: float


def _log_normal(
    ns: Sequence[int], log_sums: Sequence[float], log_sq_sums: Sequence[float]
) -> _LogNormal | None:
    """
    Fit a log-normal to bucket sums.

    Args:
        ns: each bucket's count of measured calls.
        log_sums: each bucket's sum of the logs of the measured values.
        log_sq_sums: each bucket's sum of their squares.

    Returns:
        The fit, or ``None`` when nothing was measured.
    """
    n = sum(ns)
    if not n:
        return None
    mu = sum(log_sums) / n
    sq = sum(log_sq_sums) / n
    sigma = math.sqrt(max(0.0, sq - mu * mu) * n / (n - 1)) if n > 1 else None
    clusters = [(k, s) for k, s in zip(ns, log_sums, strict=True) if k]
    se_mu = _ratio_se(clusters, mu)
    if len(clusters) < _MIN_CLUSTERS:
        # too few buckets to trust their spread: never claim more precision than
        # independent calls with a typical spread would give
        se_mu = max(se_mu, (sigma if sigma is not None else _FALLBACK_SIGMA) / math.sqrt(n))
    return _LogNormal(
        n=n,
        mu=mu,
        sigma=sigma,
        se_mu=se_mu,
        clusters=len(clusters),
        p50=bounded_exp(mu),
        # one measured call has no spread: the log-sd the replicates draw it with
        p95=bounded_exp(mu + _P95_Z * (sigma if sigma is not None else _FALLBACK_SIGMA)),
    )


def _token_mean(
    ns: Sequence[int], totals: Sequence[float], latency: _LogNormal
) -> tuple[float, float]:
    """
    Mean tokens per measured call, and its cluster-robust standard error.

    Args:
        ns: each bucket's count of measured (successful) calls.
        totals: each bucket's total tokens.
        latency: the latency fit over the same buckets (its count and clusters).

    Returns:
        The mean and its standard error (at least an assumed spread's, over few buckets).
    """
    mean = sum(totals) / latency.n
    se = _ratio_se([(k, t) for k, t in zip(ns, totals, strict=True) if k], mean)
    if latency.clusters < _MIN_CLUSTERS:
        se = max(se, _FALLBACK_CV * mean / math.sqrt(latency.n))
    return mean, se


def _overdispersion(buckets: Sequence[EvidenceBucket], rate: float, samples: int) -> float:
    """How much wider the success rate's spread over buckets is than a binomial's (>= 1)."""
    if len(buckets) >= _MIN_CLUSTERS and 0.0 < rate < 1.0:
        se = _ratio_se([(b.samples, b.successes) for b in buckets], rate)
        return max(1.0, se * se / (rate * (1.0 - rate) / samples))
    return 1.0


_SAME_PRICE: Final = 1e-9  # a ratio of costs this close to 1 is 1 (float sums' rounding)


def _cost_split(cost: float, samples: int, successes: int, listed: float) -> tuple[float, float]:
    """
    How a model's recorded cost splits between its successful and failed attempts, each
    as a multiple of ``listed`` (the list price of a successful call's mean tokens).

    A bucket sums the cost of every attempt but the tokens of successful ones only, so
    the split is an assumption, the one that needs the fewest: successes cost their list
    price and failed attempts what is left, up to what a success costs; a recorded cost
    below the successes' list price (a prompt cache's discount) lowers the successes'
    price, failures then costing nothing; one above what every attempt would cost at
    list price (prompt-cache writes and reads, which ``input_tokens`` leave out) raises
    both alike.  With nothing recorded as spent (calls never priced) or no list price:
    successes at list price, failures free.

    Returns:
        (cost of a success, cost of a failure), as multiples of ``listed``.
    """
    if not (cost > 0.0 and listed > 0.0 and successes > 0):
        return 1.0, 0.0
    at_list = successes * listed
    if cost <= at_list * (1.0 + _SAME_PRICE):
        ratio = cost / at_list
        return (1.0 if ratio >= 1.0 - _SAME_PRICE else ratio), 0.0
    failures = samples - successes
    if failures > 0 and cost <= samples * listed:
        return 1.0, (cost - at_list) / (failures * listed)
    ratio = cost / (samples * listed)
    return ratio, ratio if failures > 0 else 0.0


def _fit(model: str, buckets: Sequence[EvidenceBucket], registry: ModelRegistry) -> ModelFit:
    """
    One model's `ModelFit` from its evidence buckets in the window.

    Args:
        model: the model id.
        buckets: its buckets (of one stage).
        registry: prices the mean tokens of a successful call.

    Returns:
        The fit; ``known`` false when the buckets hold no sample.
    """
    samples = sum(b.samples for b in buckets)
    successes = sum(b.successes for b in buckets)
    cost = sum(b.cost_usd for b in buckets)
    in_registry = model in registry
    if samples == 0:
        return ModelFit(model=model, known=False, in_registry=in_registry)
    rate = successes / samples
    low, high = wilson_interval(successes, samples)
    lat_ns = [b.latency_n for b in buckets]
    latency = _log_normal(
        lat_ns, [b.latency_log_sum for b in buckets], [b.latency_log_sq_sum for b in buckets]
    )
    ttft = _log_normal(
        [b.ttft_n for b in buckets],
        [b.ttft_log_sum for b in buckets],
        [b.ttft_log_sq_sum for b in buckets],
    )
    mean_in = mean_out = None
    se_in = se_out = 0.0
    if latency is not None:
        mean_in, se_in = _token_mean(lat_ns, [b.input_tokens for b in buckets], latency)
        mean_out, se_out = _token_mean(lat_ns, [b.output_tokens for b in buckets], latency)
    per_call: float | None = None
    success_cost = 1.0
    failure_cost = 0.0
    if in_registry and mean_in is not None and mean_out is not None:
        info = registry.get(model)
        in_price, out_price = info.prices_for(mean_in)  # long-context prices past the threshold
        listed = (mean_in * in_price + mean_out * out_price) / 1e6
        success_cost, failure_cost = _cost_split(cost, samples, successes, listed)
        per_call = (rate * success_cost + (1.0 - rate) * failure_cost) * listed
    elif not in_registry or successes == 0:
        # no price, or no success to price: the recorded cost per attempt (what the
        # simulation charges a failure of a model that never succeeded)
        per_call = cost / samples
    return ModelFit(
        model=model,
        known=True,
        samples=samples,
        successes=successes,
        buckets=len(buckets),
        success_rate=rate,
        success_rate_lower=low,
        success_rate_upper=high,
        latency_p50_ms=None if latency is None else latency.p50,
        latency_p95_ms=None if latency is None else latency.p95,
        mean_input_tokens=mean_in,
        mean_output_tokens=mean_out,
        recorded_cost_usd=cost,
        cost_per_call_usd=per_call,
        in_registry=in_registry,
        success_cost_factor=success_cost,
        failure_cost_factor=failure_cost,
        overdispersion=_overdispersion(buckets, rate, samples),
        latency_mu=None if latency is None else latency.mu,
        latency_sigma=None if latency is None else latency.sigma,
        se_latency_mu=0.0 if latency is None else latency.se_mu,
        se_input_tokens=se_in,
        se_output_tokens=se_out,
        latency_n=0 if latency is None else latency.n,
        ttft_p50_ms=None if ttft is None else ttft.p50,
        ttft_p95_ms=None if ttft is None else ttft.p95,
        ttft_mu=None if ttft is None else ttft.mu,
        ttft_sigma=None if ttft is None else ttft.sigma,
        se_ttft_mu=0.0 if ttft is None else ttft.se_mu,
        ttft_n=0 if ttft is None else ttft.n,
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
    return bounded_exp((lo + hi) / 2)


def _interval(values: Sequence[float | None], *, upper: float | None = None) -> Interval:
    """
    The mean of the replicates and a 95% interval that holds both the normal one (mean
    +- 1.96 sd) and the replicates' own 2.5-97.5% range: when the router's choice
    splits the replicates (a model proven in some, not in others) the figures are
    bimodal, and the interval must reach both modes.  A value counts for at most
    `AVERAGE_CAP` (1e300), as in the telemetry's averages, so that no valid one can
    overflow the mean.
    """
    xs = [min(v, AVERAGE_CAP) for v in values if v is not None]
    if not xs:
        return Interval.none()
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    ordered = sorted(xs)
    low = max(0.0, min(mean - _Z95 * sd, interpolated_quantile(ordered, 0.025)))
    high = max(mean + _Z95 * sd, interpolated_quantile(ordered, 0.975))
    if upper is not None:
        high = min(upper, high)
    return Interval(estimate=mean, low=low, high=high)
