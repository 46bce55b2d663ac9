"""
Pure statistics of the router: Wilson bounds, log-normal latency bounds, and the
sum vector every arm's evidence is kept in.

Nothing here does I/O, reads a clock or draws a random number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, Final, TypeAlias, TypeVar

import attrs

from .._stats import AVERAGE_CAP
from ..evidence import ROW_FIELDS, log_ms
from ..records import wilson_bounds

_A = TypeVar("_A", bound=attrs.AttrsInstance)

__all__ = [
    "COST_SUM",
    "IN_SUM",
    "LAT_LOG",
    "LAT_N",
    "LAT_SQ",
    "OUT_SUM",
    "SAMPLES",
    "SUCCESSES",
    "WIDTH",
    "Sums",
    "add_outcome",
    "latency_bounds",
    "row_sums",
    "summary_bounds",
    "wilson_bounds",
    "wilson_lower",
    "wilson_upper",
]

# A sum vector: the additive fields of an `EvidenceBucket`, as numbers in this order.
# Tokens are summed over successful calls, cost over every sample, latency as natural
# logs of milliseconds over successful calls (see `empathy_models.evidence`).
SAMPLES: Final = 0
SUCCESSES: Final = 1
LAT_N: Final = 2
LAT_LOG: Final = 3
LAT_SQ: Final = 4
IN_SUM: Final = 5
OUT_SUM: Final = 6
COST_SUM: Final = 7
TTFT_N: Final = 8
TTFT_LOG: Final = 9
TTFT_SQ: Final = 10
WIDTH: Final = 11

P95_Z: Final = 1.6448536269514722  # standard normal quantile of 0.95


Sums: TypeAlias = tuple[float, ...]
"""
One bucket's sum vector, as the evidence book keeps it: a tuple of `WIDTH` numbers (a
live outcome replaces its bucket's tuple).  A tuple of numbers only is left out of the
garbage collector's tracking after its first collection, so a router holding a week of
minute buckets for many arms (hundreds of thousands) does not make every full
collection of the process walk them; a list (or an ``array``) would stay tracked.
Running sums (a regime's) are lists of the same layout.
"""


_SUM_ORDER: Final = (
    "samples",
    "successes",
    "latency_n",
    "latency_log_sum",
    "latency_log_sq_sum",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "ttft_n",
    "ttft_log_sum",
    "ttft_log_sq_sum",
)

row_sums: Final[Callable[[Sequence[Any]], Sums]] = itemgetter(
    *(ROW_FIELDS.index(name) for name in _SUM_ORDER)
)
"""The sum vector of a row of `EvidenceBatch.rows` (one C call: a tuple, nothing converted)."""


def add_outcome(
    v: list[float],
    success: bool,
    latency_ms: float,
    input_tokens: int,
    output_tokens: int,
    cost_usd: float,
    ttft_ms: float | None = None,
) -> None:
    """
    Add one sample outcome to ``v`` with `empathy_models.evidence.rollup`'s arithmetic
    (the cost counting for at most ``AVERAGE_CAP``, as in the store's buckets).
    """
    v[SAMPLES] += 1
    v[COST_SUM] += cost_usd if cost_usd < AVERAGE_CAP else AVERAGE_CAP
    if not success:
        return
    v[SUCCESSES] += 1
    lat = log_ms(latency_ms)
    v[LAT_N] += 1
    v[LAT_LOG] += lat
    v[LAT_SQ] += lat * lat
    v[IN_SUM] += input_tokens
    v[OUT_SUM] += output_tokens
    if ttft_ms is not None:
        t = log_ms(ttft_ms)
        v[TTFT_N] += 1
        v[TTFT_LOG] += t
        v[TTFT_SQ] += t * t


EXP_LIMIT: Final = 709.0
"""The largest exponent `bounded_exp` takes as it is (``exp(709)`` is ~8.2e307)."""


def bounded_exp(x: float) -> float:
    """
    ``e ** x``, at most ``e ** EXP_LIMIT``: a finite duration (ms) however absurd the
    latencies it was fitted to (a recorded 1e300 ms, valid as a number, would otherwise
    overflow the fit's bounds and make every decision over that model raise).
    """
    return math.exp(x if x < EXP_LIMIT else EXP_LIMIT)


def latency_bounds(
    n: float, log_sum: float, log_sq_sum: float, z: float
) -> tuple[float | None, float | None, float | None, float | None]:
    """
    ``(p50, p95, p95_lower, p95_upper)`` in ms of a log-normal fit to ``n`` latencies.

    The p95 bounds are the ``z`` confidence bounds of the fitted 95th percentile
    (normal approximation of the quantile's standard error).  ``None`` where there is
    not enough data: no p50 without a sample, no p95 with fewer than two.
    """
    if n <= 0.0:
        return (None, None, None, None)
    mu = log_sum / n
    p50 = bounded_exp(mu)
    if n < 2.0:
        return (p50, None, None, None)
    var = max(0.0, log_sq_sum / n - mu * mu) * n / (n - 1.0)
    sigma = math.sqrt(var)
    q = mu + P95_Z * sigma
    se = sigma * math.sqrt(1.0 / n + P95_Z * P95_Z / (2.0 * (n - 1.0)))
    return (p50, bounded_exp(q), bounded_exp(q - z * se), bounded_exp(q + z * se))


# One bound alone, for the loops that need one per bucket (the change test's walk): the
# same arithmetic as `wilson_bounds`, so the same value (tests/test_routing_evidence.py
# compares them), without its tuple and the other bound's work.


def wilson_lower(s: float, n: float, z: float, z2: float) -> float:
    """The lower bound of ``wilson_bounds(s, n, z)`` (``z2 = z * z``); 0 at n = 0.  It is
    not clamped to the rate above, which it exceeds only by a rounding error."""
    if n <= 0.0:
        return 0.0
    q = s / n
    q = q if q > 0.0 else 0.0
    q = q if q < 1.0 else 1.0
    margin = z * math.sqrt(q * (1.0 - q) / n + z2 / (4.0 * n * n))
    lower = (q + z2 / (2.0 * n) - margin) / (1.0 + z2 / n)
    return lower if lower > 0.0 else 0.0


def summary_bounds(
    s: float, n: float, z: float, reject_z: float, keep_z: float
) -> tuple[float, float, float, float]:
    """
    ``(lower, upper)`` of ``wilson_bounds(s, n, z)``, the upper bound at ``reject_z``
    and the lower bound at ``keep_z``: what an arm's summary holds, with the same
    arithmetic (so the same values) as three `wilson_bounds` calls; the two extra
    bounds share the first's rate and variance term.
    """
    lower, upper = wilson_bounds(s, n, z)
    if n <= 0.0:
        return (lower, upper, 1.0, 0.0)
    p = s / n
    p = p if p > 0.0 else 0.0
    p = p if p < 1.0 else 1.0
    pq = p * (1.0 - p) / n
    z2 = reject_z * reject_z
    margin = reject_z * math.sqrt(pq + z2 / (4.0 * n * n))
    reject = (p + z2 / (2.0 * n) + margin) / (1.0 + z2 / n)
    reject = reject if reject < 1.0 else 1.0
    reject = reject if reject > p else p
    z2 = keep_z * keep_z
    margin = keep_z * math.sqrt(pq + z2 / (4.0 * n * n))
    keep = (p + z2 / (2.0 * n) - margin) / (1.0 + z2 / n)
    keep = keep if keep > 0.0 else 0.0
    keep = keep if keep < p else p
    return (lower, upper, reject, keep)


def wilson_upper(s: float, n: float, z: float) -> float:
    """The upper bound of ``wilson_bounds(s, n, z)``; 1 at n = 0."""
    if n <= 0.0:
        return 1.0
    p = s / n
    p = p if p > 0.0 else 0.0
    p = p if p < 1.0 else 1.0
    z2 = z * z
    margin = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    upper = (p + z2 / (2.0 * n) + margin) / (1.0 + z2 / n)
    upper = upper if upper < 1.0 else 1.0
    return upper if upper > p else p
