"""
Pure routing arithmetic: decayed per-arm statistics, constraint evaluation, selection.

Nothing here does I/O, logs, awaits or reads a clock: every function takes the time
and the random source it needs, so the same inputs always give the same answer.
`empathy_models.router.AdaptiveModelRouter` owns the state and calls these.

**Arms.** An arm is one model serving one (workflow, stage).  Its evidence is an
`ArmAccumulator` of *decayed* sums, with two independent half-lives:

* ``count_half_life`` (calls): every new observation of the arm multiplies the weight
  of its older ones by ``2 ** (-1 / N)``.  The evidence of an arm is therefore capped
  near ``N / ln 2`` calls, and a provider that regresses is noticed after a bounded
  number of its *own* calls, whatever its history.  An arm that is not called keeps
  its evidence, so a model that only receives exploration traffic can still build up
  enough evidence to be proven (a time-only half-life starves such arms: at 1% of one
  call per second and a one-hour half-life an arm never holds more than ~52 calls'
  weight, short of the 73 straight successes a 0.95 gate needs).
* ``half_life`` (seconds): an observation ``dt`` seconds old weighs ``2 ** (-dt / H)``.
  Meant to be long (hours to days): evidence about an idle arm fades, so a rejected
  model eventually becomes unproven again and earns a new trial.

``None`` disables either.

**Constraints** (peers.md §5.2), each ELIGIBLE (confidently met), REJECTED (confidently
violated) or UNPROVEN:

* ``min_success_rate`` against the Wilson interval of the decayed counts: the 95%
  lower bound >= min -> ELIGIBLE; an upper bound < min at the stricter rejection
  confidence (``reject_z``, default 3.0, ~99.87% one-sided) with at least
  ``reject_min_samples`` (default 10) effective calls -> REJECTED; otherwise (and with
  no samples) UNPROVEN.  9 successes out of 10 is *not* eligible for 0.9.  Rejection
  is asymmetric on purpose: a rejected model gets no traffic until its evidence fades,
  while an unproven one keeps its exploration share, so a 99% model with two unlucky
  failures in its first eleven calls (95% upper bound 0.949) is not written off.
* ``max_latency_ms`` bounds the p95 latency of successful calls, from a log-normal fit
  of the decayed log-latencies: the 95% upper confidence bound of p95 <= max ->
  ELIGIBLE; p50 > max, or the lower confidence bound of p95 > max -> REJECTED; fewer
  than ``latency_min_samples`` measured calls, or a bound that straddles max -> UNPROVEN.
* ``max_cost`` against the expected cost of *this* call:
  ``input_tokens * input_price + E[output_tokens] * output_price`` where
  ``E[output_tokens]`` is the arm's decayed mean; with no observation yet (or in strict
  mode) the worst case ``max_tokens * output_price`` is used.  Estimate <= max ->
  ELIGIBLE, > max -> REJECTED, no estimate possible -> UNPROVEN.

**Selection** (`choose`).  Among arms ELIGIBLE on every constraint the objective is
``"cheapest"`` by default: the constraints say what quality is needed, and the cheapest
model that confidently meets them wins.  Arms whose expected cost is within
``cost_tie_tolerance`` of the cheapest are a near-tie, broken by a Thompson draw of the
success rate (Beta(prior_alpha + s, prior_beta + f)) less a small latency penalty.  The
``"most_reliable"`` objective instead maximizes the Thompson draw, with cost and latency
as small penalties.  With probability ``explore_rate`` (and always when nothing is
eligible) an *explorable* arm is picked instead: not excluded, nothing REJECTED, and
cost ELIGIBLE whenever a ``max_cost`` is given (the budget is a hard limit even for
exploration).  Which explorable arm:

* when nothing is eligible, the cheapest one, so that under the ``"cheapest"``
  objective the first model proven is the cheapest that can be; arms that stayed
  unproven after ``inconclusive_n`` effective calls (a true rate right at the limit)
  go last, so one of them cannot hold every call;
* for the exploration share, the least-measured arm among those that could displace
  the current pick (cheaper than it, under ``"cheapest"``), else among the other
  explorable arms (conclusive ones first), which keeps fallbacks measured.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal, TypeVar

import attrs
from attrs import define, frozen

from .records import ConstraintStatus, ModelPerformance

__all__ = [
    "COST",
    "LATENCY",
    "SUCCESS",
    "ArmAccumulator",
    "ArmSummary",
    "Evaluation",
    "Objective",
    "Pick",
    "choose",
    "evaluate",
    "expected_cost",
    "judge",
    "merge",
    "select",
    "summarize",
    "wilson_bounds",
]

SUCCESS: Final = "min_success_rate"
LATENCY: Final = "max_latency_ms"
COST: Final = "max_cost"

Objective = Literal["cheapest", "most_reliable"]
_A = TypeVar("_A", bound=attrs.AttrsInstance)

_P95_Z: Final = 1.6448536269514722  # standard normal quantile of 0.95
_LN2: Final = math.log(2.0)
_MIN_LATENCY_MS: Final = 1e-3  # log() floor: a 0 ms latency is measured as 1 microsecond


def wilson_bounds(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """
    Wilson score interval for a possibly fractional (decayed) count; ``(0, 1)`` at n = 0.

    Same formula as `empathy_models.records.wilson_interval`, for float counts.
    """
    if n <= 0.0:
        return (0.0, 1.0)
    # min/max spelled as comparisons (same results, NaN included): this runs twice for
    # every summary the router computes
    p = successes / n
    p = p if p > 0.0 else 0.0
    p = p if p < 1.0 else 1.0
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = p + z2 / (2.0 * n)
    margin = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    # clamp: rounding must never put the observed rate outside its own interval
    lower = (centre - margin) / denom
    lower = lower if lower > 0.0 else 0.0
    lower = lower if lower < p else p
    upper = (centre + margin) / denom
    upper = upper if upper < 1.0 else 1.0
    upper = upper if upper > p else p
    return (lower, upper)


def _count_factor(calls: int, count_half_life: float | None) -> float:
    if count_half_life is None or calls <= 0:
        return 1.0
    return math.exp(-_LN2 * calls / count_half_life)


def _factor(dt: float, half_life: float | None) -> float:
    if half_life is None or dt <= 0.0:
        return 1.0
    return math.exp(-_LN2 * dt / half_life)


# --------------------------------------------------------------------------- accumulators


@define(slots=True)
class ArmAccumulator:
    """
    Decayed sufficient statistics of one arm, referenced to time ``t`` (epoch seconds).

    ``count`` is the undecayed number of sample outcomes; every other sum is decayed.
    Success and failure weights count sample outcomes; latency (as log-milliseconds) and
    tokens are over successes, cost over every sample.  Mutated in place by `add`,
    `decay_to` and `merge`; not thread-safe.
    """

    t: float
    count: int = 0
    s: float = 0.0
    f: float = 0.0
    lat_w: float = 0.0
    lat_m1: float = 0.0
    lat_m2: float = 0.0
    tok_w: float = 0.0
    in_sum: float = 0.0
    out_sum: float = 0.0
    cost_sum: float = 0.0

    def decay_to(self, now: float, half_life: float | None) -> None:
        """Move the reference time forward to ``now``, scaling every decayed sum."""
        if now <= self.t:
            return
        k = _factor(now - self.t, half_life)
        self.t = now
        if k != 1.0:
            self._scale(k)

    def _scale(self, k: float) -> None:
        self.s *= k
        self.f *= k
        self.lat_w *= k
        self.lat_m1 *= k
        self.lat_m2 *= k
        self.tok_w *= k
        self.in_sum *= k
        self.out_sum *= k
        self.cost_sum *= k

    def _scale_twice(self, k: float, c: float) -> None:
        self.s = self.s * k * c
        self.f = self.f * k * c
        self.lat_w = self.lat_w * k * c
        self.lat_m1 = self.lat_m1 * k * c
        self.lat_m2 = self.lat_m2 * k * c
        self.tok_w = self.tok_w * k * c
        self.in_sum = self.in_sum * k * c
        self.out_sum = self.out_sum * k * c
        self.cost_sum = self.cost_sum * k * c

    def add(
        self,
        *,
        at: float,
        success: bool,
        latency_ms: float,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
        half_life: float | None,
        count_half_life: float | None = None,
    ) -> None:
        """
        Add one sample outcome observed at ``at``, in O(1).

        An observation newer than ``t`` moves the reference time forward; an older one
        (a late report) enters with the weight it would have now.  With a
        ``count_half_life`` the weight of everything already held shrinks first.
        """
        _add_outcome(
            self,
            at,
            success,
            latency_ms,
            input_tokens,
            output_tokens,
            cost_usd,
            half_life,
            count_half_life,
        )

    @classmethod
    def from_performance(
        cls,
        perf: ModelPerformance,
        *,
        now: float,
        half_life: float | None,
        count_half_life: float | None = None,
    ) -> ArmAccumulator:
        """
        Evidence equivalent to an aggregate from a telemetry backend, as seen at ``now``.

        The aggregate's calls are taken as spread evenly between its ``first_seen`` and
        ``last_seen`` and observed one after another, so both half-lives weigh them as
        they would have weighed the individual calls.  Latency is fitted as log-normal
        from the aggregate's p50 and p95.
        """
        n = perf.sample_size
        acc = cls(t=now, count=n)
        if n == 0:
            return acc
        w = _lump_weight(perf, now=now, half_life=half_life)
        if count_half_life is not None:
            g = _count_factor(1, count_half_life)
            w *= (1.0 - g**n) / ((1.0 - g) * n)
        acc.s = perf.successes * w
        acc.f = (n - perf.successes) * w
        acc.cost_sum = perf.avg_cost_usd * n * w
        if perf.successes:
            acc.tok_w = perf.successes * w
            acc.in_sum = perf.avg_input_tokens * acc.tok_w
            acc.out_sum = perf.avg_output_tokens * acc.tok_w
            p50 = perf.latency_p50_ms
            if p50 is not None:
                mu = math.log(max(p50, _MIN_LATENCY_MS))
                p95 = perf.latency_p95_ms if perf.latency_p95_ms is not None else p50
                sigma = max(0.0, math.log(max(p95, _MIN_LATENCY_MS)) - mu) / _P95_Z
                acc.lat_w = acc.tok_w
                acc.lat_m1 = acc.lat_w * mu
                acc.lat_m2 = acc.lat_w * (sigma * sigma + mu * mu)
        return acc


def _add_outcome(
    acc: ArmAccumulator,
    at: float,
    success: bool,
    latency_ms: float,
    input_tokens: int,
    output_tokens: int,
    cost_usd: float,
    half_life: float | None,
    count_half_life: float | None,
) -> None:
    # ArmAccumulator.add with positional arguments (the router calls it per outcome).
    # The time decay (decay_to) and the count decay are applied in one pass as
    # x * k * c, which is (x * k) * c: the same floats as scaling twice.
    k = 1.0
    t = acc.t
    if at > t:
        acc.t = at
        k = _factor(at - t, half_life)
        w = 1.0
    else:
        w = _factor(t - at, half_life)
    if count_half_life is not None:
        c = _count_factor(1, count_half_life)
        if k != 1.0:
            acc._scale_twice(k, c)
        else:
            acc._scale(c)
    elif k != 1.0:
        acc._scale(k)
    acc.count += 1
    acc.cost_sum += w * cost_usd
    if not success:
        acc.f += w
        return
    acc.s += w
    x = math.log(max(latency_ms, _MIN_LATENCY_MS))
    acc.lat_w += w
    acc.lat_m1 += w * x
    acc.lat_m2 += w * x * x
    acc.tok_w += w
    acc.in_sum += w * input_tokens
    acc.out_sum += w * output_tokens


def _lump_weight(perf: ModelPerformance, *, now: float, half_life: float | None) -> float:
    if half_life is None:
        return 1.0
    last = perf.last_seen.timestamp() if perf.last_seen is not None else now
    first = perf.first_seen.timestamp() if perf.first_seen is not None else last
    last = min(last, now)
    first = min(first, last)
    span = last - first
    if span <= 0.0:
        return _factor(now - last, half_life)
    # mean of 2**(-(now - t)/H) for t uniform on [first, last]
    recent = _factor(now - last, half_life)
    oldest = _factor(now - first, half_life)
    return (half_life / (_LN2 * span)) * (recent - oldest)


def merge(into: ArmAccumulator, other: ArmAccumulator, half_life: float | None) -> None:
    """
    Add ``other``'s evidence to ``into`` (both brought to the later reference time).

    Only the time half-life applies; the two are treated as concurrent observations.
    """
    now = max(into.t, other.t)
    into.decay_to(now, half_life)
    k = _factor(now - other.t, half_life)
    into.count += other.count
    into.s += k * other.s
    into.f += k * other.f
    into.lat_w += k * other.lat_w
    into.lat_m1 += k * other.lat_m1
    into.lat_m2 += k * other.lat_m2
    into.tok_w += k * other.tok_w
    into.in_sum += k * other.in_sum
    into.out_sum += k * other.out_sum
    into.cost_sum += k * other.cost_sum


# --------------------------------------------------------------------------- summaries


@frozen(slots=True)
class ArmSummary:
    """
    What a decision needs to know about one arm, precomputed from its accumulators.

    ``sample_size`` is the undecayed count; ``effective_n`` the decayed weight the
    bounds are computed from.  Latency figures are ``None`` until two successful calls
    were measured; token and cost means are ``None`` without observations.
    """

    computed_at: float
    sample_size: int = 0
    effective_n: float = 0.0
    successes: float = 0.0
    success_rate: float | None = None
    lower: float = 0.0
    upper: float = 1.0
    reject_upper: float = 1.0
    latency_n: float = 0.0
    p50: float | None = None
    p95: float | None = None
    p95_lower: float | None = None
    p95_upper: float | None = None
    mean_input_tokens: float | None = None
    mean_output_tokens: float | None = None
    mean_cost: float | None = None


def summarize(
    parts: Sequence[ArmAccumulator],
    *,
    now: float,
    half_life: float | None,
    z: float = 1.96,
    count_half_life: float | None = None,
    reject_z: float = 3.0,
) -> ArmSummary:
    """
    Combine ``parts``, oldest first (e.g. a seeded base, then live updates), at ``now``.

    With a ``count_half_life`` each part is discounted by the calls of the parts after it.
    """
    return _summarize(parts, now, half_life, z, count_half_life, reject_z)


def _summarize(
    parts: Sequence[ArmAccumulator],
    now: float,
    half_life: float | None,
    z: float,
    count_half_life: float | None,
    reject_z: float,
) -> ArmSummary:
    # summarize with positional arguments (the router calls it per changed arm)
    count = 0
    s = f = lat_w = lat_m1 = lat_m2 = tok_w = in_sum = out_sum = cost_sum = 0.0
    later = 0
    for acc in parts:
        later += acc.count
    for acc in parts:
        later -= acc.count
        # _factor(now - acc.t, half_life) * _count_factor(later, count_half_life), inlined
        dt = now - acc.t
        k = 1.0 if half_life is None or dt <= 0.0 else math.exp(-_LN2 * dt / half_life)
        if count_half_life is not None and later > 0:
            k *= math.exp(-_LN2 * later / count_half_life)
        count += acc.count
        s += k * acc.s
        f += k * acc.f
        lat_w += k * acc.lat_w
        lat_m1 += k * acc.lat_m1
        lat_m2 += k * acc.lat_m2
        tok_w += k * acc.tok_w
        in_sum += k * acc.in_sum
        out_sum += k * acc.out_sum
        cost_sum += k * acc.cost_sum
    n = s + f
    lower, upper = wilson_bounds(s, n, z)
    reject_upper = wilson_bounds(s, n, reject_z)[1] if reject_z != z else upper
    p50 = p95 = p95_lo = p95_hi = None
    if lat_w > 0.0:
        mu = lat_m1 / lat_w
        p50 = math.exp(mu)
        if lat_w >= 2.0:
            var = max(0.0, lat_m2 / lat_w - mu * mu) * lat_w / (lat_w - 1.0)
            sigma = math.sqrt(var)
            q = mu + _P95_Z * sigma
            se = sigma * math.sqrt(1.0 / lat_w + _P95_Z * _P95_Z / (2.0 * (lat_w - 1.0)))
            p95 = math.exp(q)
            p95_lo = math.exp(q - z * se)
            p95_hi = math.exp(q + z * se)
    tiny = 1e-12
    return _new_summary(
        now,
        count,
        n,
        s,
        (s / n) if n > tiny else None,
        lower,
        upper,
        reject_upper,
        lat_w,
        p50,
        p95,
        p95_lo,
        p95_hi,
        (in_sum / tok_w) if tok_w > tiny else None,
        (out_sum / tok_w) if tok_w > tiny else None,
        (cost_sum / n) if n > tiny else None,
    )


def _positional_constructor(cls: type[_A], skip: tuple[str, ...] = ()) -> Callable[..., _A]:
    # Like records._trusted_constructor, with the fields as positional parameters in
    # declaration order and the slot setters bound as defaults (fast locals).  Fields
    # in ``skip`` are left unset (reading one raises AttributeError, or reaches the
    # class's __getattr__).
    names = [a.name for a in attrs.fields(cls) if a.name not in skip]
    setters = ", ".join(f"_s_{n}=_cls.__dict__[{n!r}].__set__" for n in names)
    lines = [f"def build({', '.join(names)}, *, _new=object.__new__, _cls=_cls, {setters}):"]
    lines.append("    self = _new(_cls)")
    lines.extend(f"    _s_{n}(self, {n})" for n in names)
    lines.append("    return self")
    namespace: dict[str, object] = {"_cls": cls}
    exec(
        compile("\n".join(lines), f"<positional constructor of {cls.__name__}>", "exec"), namespace
    )
    build: Callable[..., _A] = namespace["build"]  # type: ignore[assignment]
    return build


# every value summarize passes is a float, int or None of the field's type: it skips
# attrs' frozen __init__ (~3 us for 16 fields), which summarize would pay per arm change
_new_summary = _positional_constructor(ArmSummary)


# --------------------------------------------------------------------------- evaluation


def expected_cost(
    summary: ArmSummary,
    *,
    input_price: float,
    output_price: float,
    input_tokens: int | None,
    max_tokens: int | None,
    strict: bool,
) -> tuple[float | None, str | None]:
    """
    The expected USD cost of one call on this arm, and how it was obtained.

    Prices are USD per token.  Returns ``(cost, basis)`` with basis ``"worst_case"``
    (``max_tokens`` output tokens: strict mode, or no observation yet), ``"estimate"``
    (the arm's mean output tokens) or ``"observed"`` (the arm's mean realized cost, when
    ``input_tokens`` is unknown); ``(None, None)`` when nothing supports an estimate.
    In strict mode only a worst case counts.
    """
    return _expected_cost(summary, input_price, output_price, input_tokens, max_tokens, strict)


def _expected_cost(
    summary: ArmSummary,
    input_price: float,
    output_price: float,
    input_tokens: int | None,
    max_tokens: int | None,
    strict: bool,
) -> tuple[float | None, str | None]:
    if strict:
        if input_tokens is None or max_tokens is None:
            return (None, None)
        return (input_tokens * input_price + max_tokens * output_price, "worst_case")
    in_tok = input_tokens if input_tokens is not None else summary.mean_input_tokens
    if in_tok is not None:
        if summary.mean_output_tokens is not None:
            return (in_tok * input_price + summary.mean_output_tokens * output_price, "estimate")
        if max_tokens is not None:
            return (in_tok * input_price + max_tokens * output_price, "worst_case")
    if summary.mean_cost is not None:
        return (summary.mean_cost, "observed")
    return (None, None)


@frozen(slots=True)
class Evaluation:
    """One arm judged against the constraints of one decision (pure data)."""

    model: str
    summary: ArmSummary
    constraints: Mapping[str, ConstraintStatus]
    reasons: tuple[str, ...]
    cost: float | None
    cost_basis: str | None
    excluded: bool = False

    def status(self, active: Sequence[str] | None = None) -> ConstraintStatus:
        """REJECTED if excluded or any active constraint rejects; else UNPROVEN if any is."""
        if self.excluded:
            return ConstraintStatus.REJECTED
        statuses = (
            self.constraints.values()
            if active is None
            else [self.constraints[c] for c in active if c in self.constraints]
        )
        worst = ConstraintStatus.ELIGIBLE
        for st in statuses:
            if st is ConstraintStatus.REJECTED:
                return st
            if st is ConstraintStatus.UNPROVEN:
                worst = st
        return worst

    def explorable(self, active: Sequence[str]) -> bool:
        """Unproven on some active constraint, rejected on none, and within the budget."""
        if self.status(active) is not ConstraintStatus.UNPROVEN:
            return False
        return COST not in active or self.constraints.get(COST) is ConstraintStatus.ELIGIBLE


def _fmt_ms(v: float) -> str:
    return f"{v:.0f} ms" if v >= 10 else f"{v:.2f} ms"


def judge(
    summary: ArmSummary,
    *,
    min_success_rate: float | None,
    max_latency_ms: float | None,
    latency_min_samples: float = 5.0,
    reject_min_samples: float = 10.0,
) -> tuple[ConstraintStatus | None, ConstraintStatus | None]:
    """
    The success-rate and latency statuses of one arm (``None``: constraint not given).

    The rules of the module docstring; `evaluate` takes its statuses from here and
    adds the reasons.  Runs in O(1) and builds nothing.
    """
    return _judge(
        summary, min_success_rate, max_latency_ms, latency_min_samples, reject_min_samples
    )


def _judge(
    summary: ArmSummary,
    min_success_rate: float | None,
    max_latency_ms: float | None,
    latency_min_samples: float,
    reject_min_samples: float,
) -> tuple[ConstraintStatus | None, ConstraintStatus | None]:
    success: ConstraintStatus | None = None
    if min_success_rate is not None:
        if summary.lower >= min_success_rate:
            success = ConstraintStatus.ELIGIBLE
        elif (
            summary.effective_n > 0.0
            and summary.reject_upper < min_success_rate
            and summary.effective_n >= reject_min_samples
        ):
            success = ConstraintStatus.REJECTED
        else:
            success = ConstraintStatus.UNPROVEN
    latency: ConstraintStatus | None = None
    if max_latency_ms is not None:
        if summary.latency_n < latency_min_samples:
            latency = ConstraintStatus.UNPROVEN
        elif (summary.p50 is not None and summary.p50 > max_latency_ms) or (
            summary.p95_lower is not None and summary.p95_lower > max_latency_ms
        ):
            latency = ConstraintStatus.REJECTED
        elif summary.p95_upper is not None and summary.p95_upper <= max_latency_ms:
            latency = ConstraintStatus.ELIGIBLE
        else:
            latency = ConstraintStatus.UNPROVEN
    return (success, latency)


def evaluate(
    model: str,
    summary: ArmSummary,
    *,
    input_price: float,
    output_price: float,
    input_tokens: int | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
    max_latency_ms: float | None = None,
    min_success_rate: float | None = None,
    strict_cost: bool = False,
    latency_min_samples: float = 5.0,
    reject_min_samples: float = 10.0,
    excluded_reason: str | None = None,
) -> Evaluation:
    """
    Judge one arm against the given constraints (see the module docstring).

    Constraints given as ``None`` are absent from the result.  ``excluded_reason``
    (an open circuit, a model missing from the registry) excludes the arm whatever its
    statistics.  Runs in O(1).
    """
    statuses: dict[str, ConstraintStatus] = {}
    reasons: list[str] = []
    if excluded_reason is not None:
        reasons.append(excluded_reason)
    cost, basis = expected_cost(
        summary,
        input_price=input_price,
        output_price=output_price,
        input_tokens=input_tokens,
        max_tokens=max_tokens,
        strict=strict_cost,
    )
    success, latency = judge(
        summary,
        min_success_rate=min_success_rate,
        max_latency_ms=max_latency_ms,
        latency_min_samples=latency_min_samples,
        reject_min_samples=reject_min_samples,
    )
    if success is not None:
        statuses[SUCCESS] = success
        n = summary.effective_n
        if success is not ConstraintStatus.ELIGIBLE:
            if n <= 0.0:
                reasons.append("success rate: no samples yet")
            else:
                band = (
                    f"{summary.successes:.1f}/{n:.1f} successes, 95% interval "
                    f"{summary.lower:.3f}-{summary.upper:.3f}"
                )
                if success is ConstraintStatus.REJECTED:
                    reasons.append(
                        f"success rate below {min_success_rate:g} ({band}; upper bound "
                        f"{summary.reject_upper:.3f} at the rejection confidence)"
                    )
                else:
                    reasons.append(f"success rate not yet proven >= {min_success_rate:g} ({band})")
    if latency is not None:
        assert max_latency_ms is not None
        statuses[LATENCY] = latency
        lat_n = summary.latency_n
        p50 = summary.p50
        if latency is ConstraintStatus.REJECTED:
            if p50 is not None and p50 > max_latency_ms:
                reasons.append(f"latency p50 {_fmt_ms(p50)} > max {_fmt_ms(max_latency_ms)}")
            else:
                reasons.append(
                    f"latency p95 >= {_fmt_ms(summary.p95_lower or 0.0)} (95% lower bound) "
                    f"> max {_fmt_ms(max_latency_ms)}"
                )
        elif latency is ConstraintStatus.UNPROVEN:
            if lat_n < latency_min_samples:
                reasons.append(
                    f"latency: {lat_n:.1f} measured successful calls, need {latency_min_samples:g}"
                )
            else:
                reasons.append(
                    f"latency p95 upper bound {_fmt_ms(summary.p95_upper or 0.0)} "
                    f"not yet proven <= max {_fmt_ms(max_latency_ms)}"
                )
    if max_cost is not None:
        if cost is None:
            statuses[COST] = ConstraintStatus.UNPROVEN
            reasons.append(
                "cost: no estimate (strict mode needs input_tokens and max_tokens)"
                if strict_cost
                else "cost: no estimate (no observations, and input_tokens/max_tokens not given)"
            )
        elif cost <= max_cost:
            statuses[COST] = ConstraintStatus.ELIGIBLE
        else:
            statuses[COST] = ConstraintStatus.REJECTED
            reasons.append(f"expected cost ${cost:.6f} ({basis}) > max ${max_cost:.6f}")
    return Evaluation(
        model=model,
        summary=summary,
        constraints=statuses,
        reasons=tuple(reasons),
        cost=cost,
        cost_basis=basis,
        excluded=excluded_reason is not None,
    )


# --------------------------------------------------------------------------- selection


@frozen(slots=True)
class Pick:
    """The result of `choose`: which evaluation, whether it was exploration, and why."""

    evaluation: Evaluation
    exploration: bool
    why: str


def _thompson(e: Evaluation, rng: random.Random, alpha: float, beta: float) -> float:
    s = e.summary.successes
    f = max(0.0, e.summary.effective_n - s)
    return rng.betavariate(alpha + s, beta + f)


def choose(
    evaluations: Sequence[Evaluation],
    active: Sequence[str],
    rng: random.Random,
    *,
    objective: Objective = "cheapest",
    explore_rate: float = 0.05,
    cost_tie_tolerance: float = 0.05,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
    latency_weight: float = 0.01,
    cost_weight: float = 0.01,
    inconclusive_n: float = 400.0,
) -> Pick | None:
    """
    Pick an arm among ``evaluations`` judged on the ``active`` constraints, or ``None``.

    Returns ``None`` when no arm is eligible and none is explorable.  Draws from ``rng``
    only when a choice depends on chance (one Thompson draw per near-tied eligible arm,
    then an exploration coin when both eligible and explorable arms exist), so a
    seeded ``rng`` replays the same decisions.
    """
    eligible: list[int] = []
    explorable: list[int] = []
    for i, e in enumerate(evaluations):
        st = e.status(active)
        if st is ConstraintStatus.ELIGIBLE:
            eligible.append(i)
        elif st is ConstraintStatus.UNPROVEN and e.explorable(active):
            explorable.append(i)
    picked = select(
        eligible,
        explorable,
        [e.cost for e in evaluations],
        [e.summary for e in evaluations],
        [e.model for e in evaluations],
        rng,
        objective=objective,
        explore_rate=explore_rate,
        cost_tie_tolerance=cost_tie_tolerance,
        prior_alpha=prior_alpha,
        prior_beta=prior_beta,
        latency_weight=latency_weight,
        cost_weight=cost_weight,
        inconclusive_n=inconclusive_n,
    )
    if picked is None:
        return None
    index, exploration, why = picked
    return Pick(evaluation=evaluations[index], exploration=exploration, why=why)


def select(
    eligible: Sequence[int],
    explorable: Sequence[int],
    costs: Sequence[float | None],
    summaries: Sequence[ArmSummary],
    models: Sequence[str],
    rng: random.Random,
    *,
    objective: Objective = "cheapest",
    explore_rate: float = 0.05,
    cost_tie_tolerance: float = 0.05,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
    latency_weight: float = 0.01,
    cost_weight: float = 0.01,
    inconclusive_n: float = 400.0,
    cheapest: float | None = None,
) -> tuple[int, bool, str] | None:
    """
    `choose` on pre-classified arms: the selection rules, over parallel sequences.

    ``eligible`` and ``explorable`` are indices (in candidate order) into ``costs``,
    ``summaries`` and ``models``.  Returns ``(index, exploration, why)``, or ``None``
    when both are empty (without drawing from ``rng``).  `choose` classifies
    `Evaluation` objects and calls this, so both make the same pick with the same draws.
    ``cheapest``, when given, must be the lowest cost among ``eligible`` (``inf`` for
    a missing cost): a caller that classified the arms already knows it.
    """
    return _select(
        eligible,
        explorable,
        costs,
        summaries,
        models,
        rng,
        objective,
        explore_rate,
        cost_tie_tolerance,
        prior_alpha,
        prior_beta,
        latency_weight,
        cost_weight,
        inconclusive_n,
        cheapest,
    )


def _select(
    eligible: Sequence[int],
    explorable: Sequence[int],
    costs: Sequence[float | None],
    summaries: Sequence[ArmSummary],
    models: Sequence[str],
    rng: random.Random,
    objective: Objective,
    explore_rate: float,
    cost_tie_tolerance: float,
    prior_alpha: float,
    prior_beta: float,
    latency_weight: float,
    cost_weight: float,
    inconclusive_n: float,
    cheapest: float | None,
) -> tuple[int, bool, str] | None:
    # select with positional arguments (the router calls it per decision)
    exploit = (
        _exploit(
            eligible,
            costs,
            summaries,
            rng,
            objective,
            cost_tie_tolerance,
            prior_alpha,
            prior_beta,
            latency_weight,
            cost_weight,
            cheapest,
        )
        if eligible
        else None
    )
    if explorable:
        if exploit is None:
            target = min(
                explorable,
                key=lambda i: (
                    summaries[i].effective_n >= inconclusive_n,
                    _cost_key(costs[i]),
                    summaries[i].effective_n,
                    models[i],
                ),
            )
            return (
                target,
                True,
                "no model is proven to meet the constraints yet: exploring the cheapest "
                "unproven one"
                if costs[target] is not None
                else "no model is proven to meet the constraints yet: exploring an unproven "
                "one (no cost estimate to rank them by: give input_tokens and max_tokens)",
            )
        if explore_rate > 0.0 and rng.random() < explore_rate:
            current = costs[exploit[0]]
            pool: Sequence[int] = explorable
            if objective == "cheapest" and current is not None:
                # only a cheaper model can displace the pick: measure those first, even
                # one that has been unproven for long (it may be noise near the limit)
                pool = [i for i in explorable if (c := costs[i]) is not None and c < current]
            if not pool:
                pool = [
                    i for i in explorable if summaries[i].effective_n < inconclusive_n
                ] or explorable
            target = min(
                pool,
                key=lambda i: (round(summaries[i].effective_n, 6), _cost_key(costs[i]), models[i]),
            )
            return (target, True, "exploration share: measuring an unproven model")
    return exploit


def _cost_key(cost: float | None) -> float:
    return math.inf if cost is None else cost


def _exploit(
    eligible: Sequence[int],
    costs: Sequence[float | None],
    summaries: Sequence[ArmSummary],
    rng: random.Random,
    objective: Objective,
    cost_tie_tolerance: float,
    prior_alpha: float,
    prior_beta: float,
    latency_weight: float,
    cost_weight: float,
    cheapest: float | None,
) -> tuple[int, bool, str]:
    if len(eligible) == 1:
        return (eligible[0], False, "the only eligible model")
    if objective == "cheapest":
        if cheapest is None:
            cheapest = min([math.inf if (c := costs[i]) is None else c for i in eligible])
        if math.isinf(cheapest):
            group = list(eligible)
        else:
            limit = cheapest * (1.0 + cost_tie_tolerance) + 1e-15
            group = [i for i in eligible if (c := costs[i]) is not None and c <= limit]
        if len(group) == 1:
            return (
                group[0],
                False,
                f"cheapest of {len(eligible)} models that meet the constraints",
            )
        best = _best_by_draw(
            group, costs, summaries, rng, prior_alpha, prior_beta, latency_weight, 0.0
        )
        return (
            best,
            False,
            f"cheapest of {len(eligible)} eligible models (near-tie of {len(group)} "
            "on cost broken by a Thompson draw on success rate)",
        )
    best = _best_by_draw(
        eligible, costs, summaries, rng, prior_alpha, prior_beta, latency_weight, cost_weight
    )
    return (best, False, f"most reliable (Thompson draw) of {len(eligible)} eligible models")


def _best_by_draw(
    group: Sequence[int],
    costs: Sequence[float | None],
    summaries: Sequence[ArmSummary],
    rng: random.Random,
    alpha: float,
    beta: float,
    latency_weight: float,
    cost_weight: float,
) -> int:
    max_p50 = max((summaries[i].p50 or 0.0) for i in group) or 1.0
    max_cost = max((costs[i] or 0.0) for i in group) or 1.0
    best = -1
    best_u = -math.inf
    for i in group:
        s = summaries[i]
        cost = costs[i]
        successes = s.successes
        failures = max(0.0, s.effective_n - successes)
        u = (
            rng.betavariate(alpha + successes, beta + failures)
            - latency_weight * ((s.p50 or max_p50) / max_p50)
            - cost_weight * ((cost if cost is not None else max_cost) / max_cost)
        )
        if u > best_u:
            best, best_u = i, u
    assert best >= 0
    return best
