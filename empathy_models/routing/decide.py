"""
Verdicts and selection: how one decision judges its candidates and picks one.

**Verdicts** (peers.md §5.2), per constraint ELIGIBLE (confidently met), REJECTED
(confidently violated) or UNPROVEN, from the current regime of each arm
(`empathy_models.routing.book`):

* ``min_success_rate`` against the Wilson interval: lower bound (``z``) >= min ->
  ELIGIBLE, and an arm whose regime proved it at the end of an earlier bucket
  (`ArmSummary.proven_lower`) stays so while its lower bound at ``keep_z`` holds
  (hysteresis that depends on the buckets only, so processes that read the same
  evidence agree); upper bound at ``reject_z`` < min with at least ``reject_min_samples``
  calls -> REJECTED; otherwise UNPROVEN.  9 successes out of 10 is not eligible for 0.9.
* ``max_latency_ms`` bounds the p95 latency of successful calls (log-normal fit): its
  upper confidence bound <= max -> ELIGIBLE; p50 > max or the lower bound of p95 > max
  -> REJECTED; fewer than ``latency_min_samples`` measured calls or a bound that
  straddles max -> UNPROVEN.
* ``max_cost`` against the expected cost of *this* call: ``input_tokens * input_price +
  E[output_tokens] * output_price``, ``E[output_tokens]`` being the arm's mean, or for
  an arm not yet measured the stage's mean (basis ``"prior"``), or ``max_tokens`` when
  nothing is known (``"worst_case"``); strict mode always uses the worst case.  For an
  arm with successful calls both prices are scaled by its `cost_factor`: what its calls
  were recorded to cost over what their tokens cost at list price, so a prompt cache's
  discount or surcharge and the failed attempts that were billed count, and the
  estimate is what an answer costs (the billed failures on the way included).  An arm
  without a success, and strict mode, use the list prices.
  Estimate <= max -> ELIGIBLE, > max -> REJECTED, no estimate -> UNPROVEN.

A `Verdict` holds everything but the call's cost, which is ``input_tokens * slope +
const``; verdicts are cached per (workflow, stage, candidates, constraints) and
recomputed only for arms whose evidence changed, so a decision costs O(candidates)
with a small constant.

**Selection.**  Among candidates ELIGIBLE on every constraint the cheapest wins (or
the most reliable, by objective); a near-tie on cost is broken by a Thompson draw on
the success rate.  Exploration is paid from a budget (see `RoutingPolicy`): only a
candidate that could beat the pick is explored, the cheapest-priced one first.  While
nothing is eligible, the cheapest candidate that a Thompson draw finds compliant (and,
past its warm-up, provable within another warm-up's calls) is explored.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any, Final

from attrs import define, field, frozen

from .._fast import trusted_constructor
from ..records import ConstraintStatus, ModelTier
from .book import EMPTY_SUMMARY, Arm, ArmSummary
from .policy import Constraints, RoutingPolicy
from .stats import bounded_exp, wilson_bounds

__all__ = [
    "Context",
    "ModelFacts",
    "Verdict",
    "cost_factor",
    "judge",
    "recost",
    "select",
]

ELIGIBLE: Final = ConstraintStatus.ELIGIBLE
UNPROVEN: Final = ConstraintStatus.UNPROVEN
REJECTED: Final = ConstraintStatus.REJECTED
_CODE: Final = {ELIGIBLE: 0, UNPROVEN: 1, REJECTED: 2}
NOT_IN_REGISTRY: Final = "not in the model registry"
NO_PRICE: Final = "cost: no price (not in the model registry)"
CIRCUIT_OPEN: Final = "circuit open"

RELIABLE_COST_WEIGHT: Final = 0.001
"""``objective="most_reliable"``: what the dearest eligible model's cost takes off its draw."""
RELIABLE_LATENCY_WEIGHT: Final = 0.001
"""``objective="most_reliable"``: what the slowest eligible model's p50 takes off its draw."""
TIE_LATENCY_WEIGHT: Final = 0.01
"""``objective="cheapest"``: what the slowest model of a cost tie's p50 takes off its draw."""


@frozen(slots=True)
class ModelFacts:
    """What the router needs from the registry about one model (prices per token)."""

    provider: str
    tier: ModelTier
    input_price: float
    output_price: float
    max_output_tokens: int
    # a call whose prompt is over ``long_from`` tokens costs its input and output
    # tokens these times more (`ModelInfo.long_context_threshold`; inf: never)
    long_from: float = math.inf
    long_input_ratio: float = 1.0
    long_output_ratio: float = 1.0
    # the long-context price per token of an input or output price that is 0 at the
    # standard rates (no ratio scales a zero price: a model free up to its threshold)
    long_input_extra: float = 0.0
    long_output_extra: float = 0.0

    def long_ratios(self, prompt_tokens: float) -> tuple[float, float]:
        """What the input and output prices are multiplied by for this prompt size."""
        if prompt_tokens > self.long_from:
            return self.long_input_ratio, self.long_output_ratio
        return 1.0, 1.0

    def long_extra(self, prompt_tokens: float, output_tokens: float) -> float:
        """
        What a call of this prompt size and output costs beyond its standard prices
        times `long_ratios`: the long-context prices of the prices that are 0 at the
        standard rates, at list price (0 below the threshold).
        """
        if not prompt_tokens > self.long_from:
            return 0.0
        return prompt_tokens * self.long_input_extra + output_tokens * self.long_output_extra


REPROBE_REASON: Final = "re-probe: measuring a rejected or degraded model that would be cheaper"
"""The reason of a decision that re-probes a rejected or degraded model."""

STRANDED_REASON: Final = (
    "re-probe: no candidate meets the constraints; measuring a rejected model again so "
    "that a recovery is found"
)
"""The reason of a re-probe made while no candidate is eligible or unproven."""

Pick = tuple[int, str | None, str]
"""A selection: (candidate index, exploration kind or ``None``, why)."""


SHORT_FROM: Final = 1e9
"""Amounts and times of this size or more show in short scientific form (``1e+300``)."""


def _ms(v: float) -> str:
    # milliseconds: whole from 10 ms, two decimals below, two significant digits under
    # 0.01 ms
    if v >= SHORT_FROM:
        return f"{v:.4g}"
    if v >= 10:
        return f"{v:.0f}"
    return f"{v:.2f}" if v >= 0.01 or v <= 0.0 else f"{v:.2g}"


def _usd(v: float) -> str:
    # dollars: six decimals, or as many as show an amount too small for them with two
    # significant digits (up to 12, then short scientific, as from SHORT_FROM on)
    if v >= SHORT_FROM:
        return f"{v:.4g}"
    if 0.0 < v < 1e-5:
        digits = 1 - math.floor(math.log10(v))
        return f"{v:.{digits}f}" if digits <= 12 else f"{v:.2g}"
    return f"{v:.6f}"


def _over(value: float, limit: float, fmt: Callable[[float], str]) -> tuple[str, str]:
    """
    ``value`` and the ``limit`` it exceeds as a reason shows them: ``fmt``'s, or, when
    those read alike (``500 ms > max 500 ms``), with the fewest significant digits
    that tell them apart.
    """
    shown, most = fmt(value), fmt(limit)
    digits = 4
    while shown == most and digits <= 17:
        shown, most = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        digits += 1
    return shown, most


@frozen(slots=True)
class Verdict:
    """
    One candidate judged against one `Constraints`, all but the call's cost.

    ``code`` is the worst of the success-rate and latency statuses (0 eligible, 1
    unproven, 2 rejected; 3 not in the registry).  The cost of a call is ``input_tokens
    * slope + const`` when the call gives ``input_tokens`` (``slope`` None: no
    estimate), else ``const_no_input``.  A verdict costed on the stage's mean output
    tokens (``basis`` "prior") also has ``prior_price``, and ``const`` is that mean
    times it: such a verdict is costed on the stage's current mean (`_verdicts.classify`),
    so it need not be judged again whenever the mean moves.
    """

    model: str
    facts: ModelFacts | None
    summary: ArmSummary
    success: ConstraintStatus | None
    latency: ConstraintStatus | None
    code: int
    slope: float | None
    const: float
    basis: str | None
    const_no_input: float | None
    basis_no_input: str | None
    reasons: tuple[str, ...]
    degraded: bool  # rejected, or its evidence restarted with a detected degradation
    ttft: ConstraintStatus | None = None
    warm: bool = False  # may be given a warm-up's calls when cheaper (see `_warm_up`)
    prior_price: float | None = None  # the output price, when costed on the stage prior
    # the output tokens a long prompt's output is costed on at a long-context price whose
    # standard price is 0 (`ModelFacts.long_extra`; the stage prior's when ``prior_price``)
    tokens_out: float = 0.0


def judge(
    model: str,
    facts: ModelFacts | None,
    summary: ArmSummary,
    cons: Constraints,
    policy: RoutingPolicy,
    *,
    prior_output_tokens: float | None = None,
) -> Verdict:
    """
    Judge ``model`` (its current-regime ``summary``) against ``cons``; O(1).

    ``prior_output_tokens``: the stage's mean, used to cost an arm with no successful
    call of its own.
    """
    reasons: list[str] = []
    if facts is None:
        reasons.append(NOT_IN_REGISTRY)
    min_sr = cons.min_success_rate
    success = _judge_success(summary, min_sr, policy, reasons) if min_sr is not None else None
    need = float(policy.latency_min_samples)
    latency = ttft = None
    if cons.max_latency_ms is not None:
        latency = _judge_timing(
            "latency", "measured successful calls", summary.latency_n, summary.p50,
            summary.p95_lower, summary.p95_upper, cons.max_latency_ms, need, reasons,
        )  # fmt: skip
    if cons.max_ttft_ms is not None:
        ttft = _judge_timing(
            "time to first token", "streamed successful calls", summary.ttft_n,
            summary.ttft_p50, summary.ttft_p95_lower, summary.ttft_p95_upper,
            cons.max_ttft_ms, need, reasons,
        )  # fmt: skip
    if summary.change is not None and reasons:
        reasons.append(f"evidence restarted: {summary.change}")
    code = (
        3
        if facts is None
        else max(
            _CODE[success] if success is not None else 0,
            _CODE[latency] if latency is not None else 0,
            _CODE[ttft] if ttft is not None else 0,
        )
    )
    slope, const, basis, const_ni, basis_ni, prior_price, tokens_out = _cost_terms(
        facts, summary, cons, prior_output_tokens or policy.prior_output_tokens
    )
    # an improvement not acted on yet is re-probed like the degradation it ends
    degraded = code == 2 or (summary.change or "").startswith("degraded") or summary.improving
    warm = (
        not degraded and _warming(summary, min_sr) and _young(summary, min_sr, policy.warmup_calls)
    )
    return _new_verdict(
        model, facts, summary, success, latency, code, slope, const, basis, const_ni,
        basis_ni, tuple(reasons), degraded, ttft, warm, prior_price, tokens_out,
    )  # fmt: skip


def _judge_success(
    summary: ArmSummary,
    min_sr: float,
    policy: RoutingPolicy,
    reasons: list[str],
) -> ConstraintStatus:
    """``min_success_rate`` against the Wilson bounds (see the module docstring)."""
    n = summary.samples
    unpooled = summary.unpooled_lower
    if (summary.proven_lower >= min_sr and summary.keep_lower >= min_sr) or (
        summary.lower >= min_sr and (unpooled is None or unpooled >= min_sr)
    ):
        if not summary.improving:
            return ELIGIBLE
        # acting now would flip the model in and out: a later outcome of the same minute
        # may still undo the improvement
        reasons.append(
            f"success rate not yet proven >= {min_sr:g}: its improvement was detected in "
            "its newest minute and counts once a later minute holds an outcome"
        )
        return UNPROVEN
    if summary.lower >= min_sr:
        reasons.append(
            f"success rate not yet proven >= {min_sr:g}: the evidence restored from an "
            "earlier regime proves it only pooled with this one's, and neither part does "
            "by itself"
        )
        return UNPROVEN
    success = (
        REJECTED if n >= policy.reject_min_samples and summary.reject_upper < min_sr else UNPROVEN
    )
    if n <= 0:
        reasons.append("success rate: no samples yet")
        return success
    band = (
        f"{summary.successes:.0f}/{n:.0f} successes, 95% interval "
        f"{summary.lower:.3f}-{summary.upper:.3f}"
    )
    if success is REJECTED:
        reasons.append(
            f"success rate below {min_sr:g} ({band}; upper bound "
            f"{summary.reject_upper:.3f} at the rejection confidence)"
        )
    else:
        reasons.append(f"success rate not yet proven >= {min_sr:g} ({band})")
    return success


def _judge_timing(
    label: str,
    counted: str,
    n: float,
    p50: float | None,
    p95_lower: float | None,
    p95_upper: float | None,
    limit: float,
    need: float,
    reasons: list[str],
) -> ConstraintStatus:
    """A p95 timing limit (latency, time to first token) against its log-normal bounds."""
    if n < need:
        reasons.append(f"{label}: {n:.0f} {counted}, need {need:g}")
        return UNPROVEN
    if p50 is not None and p50 > limit:
        shown, most = _over(p50, limit, _ms)
        reasons.append(f"{label} p50 {shown} ms > max {most} ms")
        return REJECTED
    if p95_lower is not None and p95_lower > limit:
        shown, most = _over(p95_lower, limit, _ms)
        reasons.append(f"{label} p95 >= {shown} ms (95% lower bound) > max {most} ms")
        return REJECTED
    if p95_upper is None:  # one call (``latency_min_samples=1``): a p50, no p95 bound
        reasons.append(
            f"{label} p95: {n:.0f} {counted[:-1] if n == 1 else counted}, need 2 for a bound"
        )
        return UNPROVEN
    if p95_upper <= limit:
        return ELIGIBLE
    shown, most = _over(p95_upper, limit, _ms)
    reasons.append(f"{label} p95 upper bound {shown} ms not yet proven <= max {most} ms")
    return UNPROVEN


_new_verdict: Final = trusted_constructor(Verdict, positional=True)


def recost(
    v: Verdict,
    cons: Constraints,
    policy: RoutingPolicy,
    *,
    prior_output_tokens: float | None = None,
) -> Verdict:
    """
    ``v`` with its cost terms recomputed on a new stage prior: what `judge` gives for
    the same summary and ``prior_output_tokens`` (only the cost depends on the prior).
    """
    slope, const, basis, const_ni, basis_ni, prior_price, tokens_out = _cost_terms(
        v.facts, v.summary, cons, prior_output_tokens or policy.prior_output_tokens
    )
    return _new_verdict(
        v.model, v.facts, v.summary, v.success, v.latency, v.code, slope, const, basis,
        const_ni, basis_ni, v.reasons, v.degraded, v.ttft, v.warm, prior_price, tokens_out,
    )  # fmt: skip


def cost_factor(facts: ModelFacts | None, summary: ArmSummary) -> float:
    """
    What the arm's recorded calls cost over what their tokens cost at list price: the
    recorded cost of every sample (failed attempts that were billed included) over the
    list price of the successful calls' input and output tokens.  Below 1 when a prompt
    cache discounted the input (OpenAI counts cached tokens among the input), above 1
    when cache writes and reads were billed beside the input (Anthropic counts them
    apart) or failed attempts were billed (a stream cut off, a malformed answer), and it
    carries any price change since the calls were recorded.  1 when the arm has no
    successful call, no price, or no recorded cost (records that were never priced).
    Too large for a float (costs recorded at 1e300 for calls that list at a billionth
    of a dollar), as large as keeps the prices finite (`MOST_PRICE`).  O(1): the
    summary's sums.
    """
    cost = summary.mean_cost
    mean_in = summary.mean_input_tokens
    mean_out = summary.mean_output_tokens
    if facts is None or cost is None or mean_in is None or mean_out is None or not cost > 0.0:
        return 1.0
    # at the prices of the mean call's prompt size: calls past a long-context threshold
    # cost more by their list price, not by a factor (see `classify`)
    r_in, r_out = facts.long_ratios(mean_in)
    listed = (
        mean_in * facts.input_price * r_in + mean_out * facts.output_price * r_out
    ) * summary.successes
    if not listed > 0.0:
        return 1.0
    factor = cost * summary.samples / listed
    if factor == math.inf:
        # recorded at more than a float holds times the list price: as much as keeps
        # the scaled prices within MOST_PRICE (never their list price)
        return min(MOST_PRICE, MOST_PRICE / max(facts.input_price, facts.output_price))
    if not 0.0 < factor < math.inf or abs(factor - 1.0) <= _SAME_PRICE:
        return 1.0  # recorded at the list price, but for rounding
    return factor


_SAME_PRICE: Final = 1e-9
"""A cost factor this close to 1 is 1: the calls were recorded at the list price."""

MOST_PRICE: Final = 1e300
"""
The most a token is costed at once scaled by a `cost_factor` too large for a float (calls
recorded at absurd costs): a finite price, so no call's cost is NaN, however few tokens.
"""


def _cost_terms(
    facts: ModelFacts | None, summary: ArmSummary, cons: Constraints, prior: float | None
) -> tuple[float | None, float, str | None, float | None, str | None, float | None, float]:
    if facts is None:  # not in the registry: no price, no cost estimate
        return (None, 0.0, None, None, None, None, 0.0)
    in_price = facts.input_price
    out_price = facts.output_price
    # no more output than the model writes: the executor asks it for no more
    cap = cons.max_tokens
    if cap is not None and cap > facts.max_output_tokens:
        cap = facts.max_output_tokens
    worst = cap if cap is not None else facts.max_output_tokens
    if cons.strict_cost:
        return (in_price, worst * out_price, "worst_case", None, None, None, float(worst))
    out: float | None = summary.mean_output_tokens
    basis: str | None = "estimate"
    prior_price: float | None = None
    if out is not None:
        # a measured arm: list prices scaled to what its calls were recorded to cost
        factor = cost_factor(facts, summary)
        if factor != 1.0:
            in_price *= factor
            out_price *= factor
    if out is None and prior is not None:
        out, basis, prior_price = prior, "prior", out_price
    if out is None and cap is not None:
        out, basis = float(cap), "worst_case"
    elif out is not None and cap is not None and out > cap:
        out = float(cap)  # the call's output stops at max_tokens, however long the mean
    # a free model's call costs nothing, whatever it writes: its worst case (a long
    # prompt's output at a long-context price: the most it may write)
    tokens_out = out if out is not None else float(worst)
    free = out is None and in_price == 0.0 and out_price == 0.0
    if free:
        out, basis = 0.0, "worst_case"
    slope: float | None = in_price if out is not None else None
    const = out * out_price if out is not None else 0.0
    const_ni: float | None = None
    basis_ni: str | None = None
    if out is not None and (mean_in := summary.mean_input_tokens) is not None:
        r_in, r_out = facts.long_ratios(mean_in)
        const_ni = mean_in * in_price * r_in + const * r_out + facts.long_extra(mean_in, tokens_out)
        basis_ni = basis
    elif summary.mean_cost is not None:
        const_ni, basis_ni = summary.mean_cost, "observed"
    elif free:
        const_ni, basis_ni = 0.0, basis
    # (a prior-costed verdict's const_ni is the observed mean cost, or None: without a
    # success there is no mean of input tokens)
    basis = basis if out is not None else None
    return (slope, const, basis, const_ni, basis_ni, prior_price, tokens_out)


# --------------------------------------------------------------------------- context


RowCache = dict[Any, Any]
"""Holds the templates of one verdict's explanation rows once read (see `routing._rows`);
a verdict judged again gets a new one."""


@define(slots=True, eq=False)
class Exploration:
    """
    The exploration budget and re-probe waits of one stream of decisions: a (workflow,
    stage, candidate list), whatever constraints each decision gives.  Shared by every
    `Context` of that stream, so a call whose ``max_tokens`` or ``max_cost`` differs
    from the last one's still counts towards the next re-probe and the budget.
    """

    tokens: float = 0.0
    decisions: int = 0
    waits: dict[int, int] = field(factory=dict)  # candidate -> decision it last waited from
    stranded: set[int] = field(factory=set)  # re-probed while nothing else could be picked
    clock: Callable[[], float] | None = None  # the router's: stranded re-probes' time pace
    probed_at: dict[int, float] = field(factory=dict)  # candidate -> its last stranded re-probe


@define(slots=True, eq=False)
class Terms:
    """
    A context's cost terms in candidate order, used while every verdict has a slope and
    no term is NaN (``bad == 0``): a call's costs computed from two lists, and per group
    (eligible, unproven, rejected) the largest slope and constant, so that a cost limit
    all of a group's calls are within is seen without computing each one's.  The
    largest terms may be larger than the current ones (a verdict's new terms only raise
    them), never smaller: an upper bound.
    """

    slopes: list[float]  # NaN for a verdict without a slope
    consts: list[float]
    group_of: list[int]  # each candidate's verdict code (its group; 3: in none)
    top_slope: list[float]  # per group
    top_const: list[float]  # per group
    bad: int = 0  # candidates without a slope or with a NaN term: unusable while > 0


@define(slots=True, eq=False)
class Context:
    """
    Cached verdicts of one (workflow, stage, candidate list, constraints), and the
    `Exploration` of its stream of decisions.

    ``arm_versions[i]`` is the version of ``arms[i]`` that ``verdicts[i]`` was computed
    from; ``prior_version`` the stage prior's, for verdicts costed on it.
    """

    cons: Constraints
    models: tuple[str, ...]
    facts: list[ModelFacts | None]
    arms: list[Arm | None]
    arms_epoch: int
    exploration: Exploration
    verdicts: list[Verdict] = field(factory=list)
    caches: list[RowCache] = field(factory=list)
    arm_versions: list[int] = field(factory=list)
    prior_version: int = -1
    on_prior: bool = False
    prior_tokens: float | None = None  # the stage prior verdicts with a prior_price are on
    changed: tuple[int, ...] = ()
    index: dict[Arm, int] = field(factory=dict)
    seen: int = -1
    resets: int = -1
    groups: tuple[list[int], list[int], list[int]] | None = None
    degraded: bool = False  # some verdict is degraded (set with ``groups``)
    terms: Terms | None = None  # built with ``groups`` (see `_verdicts.classify`)
    long_from: float = math.inf  # the lowest long-context threshold of the candidates


# --------------------------------------------------------------------------- selection


def _exploit(
    eligible: Sequence[int],
    costs: Sequence[float | None],
    verdicts: Sequence[Verdict],
    rng: random.Random,
    policy: RoutingPolicy,
) -> tuple[int, str]:
    if len(eligible) == 1:
        return (eligible[0], "the only eligible model")
    if policy.objective == "cheapest":
        cheapest = min([math.inf if (c := costs[i]) is None else c for i in eligible])
        if math.isinf(cheapest):
            group = list(eligible)
        else:
            limit = cheapest * (1.0 + policy.cost_tie_tolerance) + 1e-15
            group = [i for i in eligible if (c := costs[i]) is not None and c <= limit]
        if len(group) == 1:
            return (group[0], f"cheapest of {len(eligible)} eligible models")
        best = _best_by_draw(group, costs, verdicts, rng, policy, 0.0, TIE_LATENCY_WEIGHT)
        return (
            best,
            f"cheapest of {len(eligible)} eligible models (near-tie of {len(group)} on cost "
            "broken by a Thompson draw on success rate)",
        )
    best = _best_by_draw(
        eligible, costs, verdicts, rng, policy, RELIABLE_COST_WEIGHT, RELIABLE_LATENCY_WEIGHT
    )
    return (best, f"most reliable (Thompson draw) of {len(eligible)} eligible models")


def _best_by_draw(
    group: Sequence[int],
    costs: Sequence[float | None],
    verdicts: Sequence[Verdict],
    rng: random.Random,
    policy: RoutingPolicy,
    cost_weight: float,
    latency_weight: float,
) -> int:
    # the highest Thompson draw of the success rate, less ``cost_weight`` times the
    # expected cost over the group's dearest and ``latency_weight`` times the median
    # latency over its slowest (an unknown one counts as the dearest, the slowest)
    max_p50 = max((verdicts[i].summary.p50 or 0.0) for i in group) or 1.0
    max_cost = max((costs[i] or 0.0) for i in group) or 1.0
    best = -1
    best_u = -math.inf
    for i in group:
        s = verdicts[i].summary
        cost = costs[i]
        u = (
            rng.betavariate(
                policy.prior_alpha + s.successes, policy.prior_beta + s.samples - s.successes
            )
            - latency_weight * ((s.p50 or max_p50) / max_p50)
            - cost_weight * ((cost if cost is not None else max_cost) / max_cost)
        )
        if u > best_u:
            best, best_u = i, u
    return best


def _plausible(v: Verdict, cons: Constraints, rng: random.Random, policy: RoutingPolicy) -> bool:
    return _plausible_draw(v, cons, rng, policy) is not None


def _plausible_draw(
    v: Verdict, cons: Constraints, rng: random.Random, policy: RoutingPolicy
) -> float | None:
    # a Thompson draw: could this unproven candidate meet the constraints (and, with
    # more than a warm-up's evidence, be proven to)?  The drawn success rate, or None
    s = v.summary
    min_sr = cons.min_success_rate
    draw = rng.betavariate(
        policy.prior_alpha + s.successes, policy.prior_beta + s.samples - s.successes
    )
    if v.success is UNPROVEN and min_sr is not None:
        n = s.samples + policy.warmup_calls
        if s.samples >= policy.warmup_calls and n > 0:
            # past its warm-up, a candidate is worth measuring only if it could be
            # proven within another warm-up's calls: the draw must clear the limit by
            # the margin those calls would need (one sitting at the limit rarely does)
            min_sr += policy.z * math.sqrt(min_sr * (1.0 - min_sr) / n)
        if draw < min_sr:
            return None
    max_lat = cons.max_latency_ms
    if v.latency is UNPROVEN and max_lat is not None and s.p95 is not None:
        hi = s.p95_upper if s.p95_upper is not None else s.p95
        sd = max(math.log(hi / s.p95) / policy.z, 1e-9)
        if bounded_exp(rng.gauss(math.log(s.p95), sd)) > max_lat:
            return None
    max_ttft = cons.max_ttft_ms
    if v.ttft is UNPROVEN and max_ttft is not None and s.ttft_p95 is not None:
        hi = s.ttft_p95_upper if s.ttft_p95_upper is not None else s.ttft_p95
        sd = max(math.log(hi / s.ttft_p95) / policy.z, 1e-9)
        if bounded_exp(rng.gauss(math.log(s.ttft_p95), sd)) > max_ttft:
            return None
    return draw


def _cheapest_plausible(
    order: Sequence[int],
    verdicts: Sequence[Verdict],
    cons: Constraints,
    rng: random.Random,
    policy: RoutingPolicy,
) -> int | None:
    for i in order:
        if _plausible(verdicts[i], cons, rng, policy):
            return i
    return None


def _likeliest_plausible(
    order: Sequence[int],
    verdicts: Sequence[Verdict],
    cons: Constraints,
    rng: random.Random,
    policy: RoutingPolicy,
) -> int | None:
    # of the candidates a draw finds compliant, the one with the highest drawn success
    # rate (the first, i.e. the cheapest, on a tie)
    best: int | None = None
    best_draw = -1.0
    for i in order:
        draw = _plausible_draw(verdicts[i], cons, rng, policy)
        if draw is not None and draw > best_draw:
            best, best_draw = i, draw
    return best


def _young(s: ArmSummary, min_sr: float | None, calls: float) -> bool:
    n = s.samples
    if n < calls:
        return True
    # past ``calls``, only while the lower bound at z = 0.5 (about a 70% one-sided
    # bound) still clears the limit, and for at most four times as many calls
    return (
        n < 4.0 * calls and min_sr is not None and wilson_bounds(s.successes, n, 0.5)[0] >= min_sr
    )


def select(
    ctx: Context,
    costs: Sequence[float | None],
    eligible: Sequence[int],
    explorable: Sequence[int],
    probeable: Sequence[int],
    rng: random.Random,
    policy: RoutingPolicy,
    *,
    budget: bool = True,
) -> Pick | None:
    """
    ``(index, kind, why)`` for one decision (``kind``: what an exploration pick is for,
    `RoutingDecision.exploration_kind`; ``None`` for the pick itself), or ``None`` when
    nothing can be picked.

    ``eligible``: candidates ELIGIBLE on every constraint; ``explorable``: UNPROVEN
    ones within the cost limit; ``probeable``: REJECTED ones within it (only re-probed
    from the budget).  ``budget=False`` (a relaxed or pinned decision) never explores
    once something is eligible.
    """
    if not eligible:
        if explorable:
            return _explore_unproven(ctx, costs, explorable, rng, policy)
        if not budget or policy.explore_rate <= 0.0 or not probeable:
            return None
        return _reprobe_stranded(ctx, probeable, policy)
    index, why = _exploit(eligible, costs, ctx.verdicts, rng, policy)
    if not budget or policy.explore_rate <= 0.0 or not (explorable or probeable):
        return (index, None, why)
    ctx.exploration.decisions += 1
    current = costs[index]
    return (
        _reprobe(ctx, costs, current, explorable, probeable, policy)
        or _warm_up(ctx, costs, current, explorable, rng, policy)
        or _from_budget(ctx, costs, current, explorable, policy)
        or (index, None, why)
    )


def _cheaper(cost: float | None, current: float | None) -> bool:
    return current is not None and cost is not None and cost < current


def _reprobe(
    ctx: Context,
    costs: Sequence[float | None],
    current: float | None,
    explorable: Sequence[int],
    probeable: Sequence[int],
    policy: RoutingPolicy,
) -> Pick | None:
    # re-probes of rejected or degraded candidates that would be cheaper: each waits
    # reprobe_interval decisions, halved per success in a row of its own
    if not ctx.degraded:
        return None  # (no candidate is degraded: nothing to re-probe)
    verdicts = ctx.verdicts
    cheapest = policy.objective == "cheapest"
    arms = ctx.arms
    exploration = ctx.exploration
    waits = exploration.waits
    for i in probeable if not explorable else (*explorable, *probeable):
        v = verdicts[i]
        if not v.degraded or (cheapest and not _cheaper(costs[i], current)):
            continue
        since = waits.get(i)
        if since is None:
            waits[i] = exploration.decisions
            continue
        arm = arms[i]
        if (
            v.latency is REJECTED
            or v.ttft is REJECTED
            or not ((v.summary.change or "").startswith("degraded") or v.summary.improving)
        ):
            # never proven, or too slow: successes in a row say nothing of a recovery
            wait = 4.0 * policy.reprobe_interval
        else:
            streak = arm.streak if arm is not None else 0
            # (interval / 2**streak, exactly, and 0 rather than an OverflowError once
            # thousands of successes in a row were reported)
            wait = max(policy.reprobe_min, math.ldexp(policy.reprobe_interval, -streak))
        if exploration.decisions - since >= wait:
            waits[i] = exploration.decisions
            return (
                i,
                "re-probe",
                REPROBE_REASON,
            )
    return None


def _reprobe_stranded(ctx: Context, probeable: Sequence[int], policy: RoutingPolicy) -> Pick | None:
    # nothing is eligible or unproven: a decision not spent on a re-probe raises (or
    # relaxes, or pins), and no evidence would ever arrive to undo a rejection that a bad
    # streak or an outage caused.  Each rejected candidate within the cost limit is
    # first re-probed reprobe_min decisions after the stage ran out of candidates, then
    # after reprobe_interval / 2**streak decisions (its live successes in a row), down
    # to every decision: the calls it takes would otherwise fail, while a failure puts it
    # back to one re-probe per reprobe_interval.  One too slow waits four times that:
    # successes in a row say nothing of its speed.  Whatever the wait in decisions, a
    # candidate re-probed before is re-probed again STRANDED_PROBE_SECONDS after
    exploration = ctx.exploration
    exploration.decisions += 1
    decisions = exploration.decisions
    waits = exploration.waits
    stranded = exploration.stranded
    arms = ctx.arms
    verdicts = ctx.verdicts
    for i in probeable:
        since = waits.get(i)
        if since is None:
            waits[i] = decisions
            continue
        v = verdicts[i]
        if v.latency is REJECTED or v.ttft is REJECTED:
            wait = 4.0 * policy.reprobe_interval
        elif i in stranded:
            arm = arms[i]
            streak = arm.streak if arm is not None else 0
            wait = max(1.0, math.ldexp(policy.reprobe_interval, -streak))
        else:
            wait = policy.reprobe_min
        if decisions - since >= wait or _overdue(exploration, i):
            waits[i] = decisions
            stranded.add(i)
            if exploration.clock is not None:
                exploration.probed_at[i] = exploration.clock()
            return (i, "re-probe", STRANDED_REASON)
    return None


STRANDED_PROBE_SECONDS: Final = 120.0
"""
While a stage is stranded, each candidate re-probed before is re-probed again once this
long has passed since, however few decisions came meanwhile: after an outage that ruled
out every model ends, a stage with little traffic answers again within this long, not
only after ``reprobe_interval`` decisions.
"""


def _overdue(exploration: Exploration, i: int) -> bool:
    clock = exploration.clock
    last = exploration.probed_at.get(i)
    return clock is not None and last is not None and clock() - last >= STRANDED_PROBE_SECONDS


def _warming(s: ArmSummary, min_sr: float | None) -> bool:
    # a warm-up is for a challenger in its first regime, or for one returning to a
    # record it once proved: an arm whose best stretch never proved compliance and
    # whose rate changed is measured from the budget like any other (a lucky stretch
    # restored after an unlucky one must not buy it hundreds of warm-up calls)
    return s.since is None or (min_sr is not None and s.record_lower >= min_sr)


def _warm_up(
    ctx: Context,
    costs: Sequence[float | None],
    current: float | None,
    explorable: Sequence[int],
    rng: random.Random,
    policy: RoutingPolicy,
) -> Pick | None:
    # a cheaper challenger with fewer than warmup_calls calls whose evidence does not
    # already say it more likely misses than not gets every decision, so it is proven
    # (or ruled out) early and in one stretch; past that, up to four times as many calls
    # go to one whose evidence says it more likely than not complies, while a draw finds
    # it compliant (an unlucky start must not leave the cheapest compliant model unproven
    # for ever).  After a change was detected on an arm, only one that was once proven
    # compliant warms up again (see `_warming`).
    if not explorable or rng.random() >= policy.warmup_share:
        return None
    verdicts = ctx.verdicts
    min_sr = ctx.cons.min_success_rate
    # `Verdict.warm`: not degraded, `_warming` and `_young`, judged with the verdict
    if policy.objective != "cheapest":
        young = [i for i in explorable if verdicts[i].warm]
    elif current is None:
        return None  # nothing is cheaper than a pick without a cost estimate
    else:
        young = [
            i
            for i in explorable
            if verdicts[i].warm and (c := costs[i]) is not None and c < current
        ]
    # by cost, then by id: two stable sorts (with "cheapest", keys of C: every cost here
    # is a number)
    young.sort(key=ctx.models.__getitem__)
    cheapest = policy.objective == "cheapest"
    by_cost: Callable[[int], Any] = costs.__getitem__ if cheapest else lambda i: costs[i] or 0.0
    young.sort(key=by_cost)
    for i in young:
        s = verdicts[i].summary
        if s.samples < policy.warmup_min_calls:
            return (
                i,
                "warm-up",
                "warm-up: giving a cheaper model with fewer than "
                f"{policy.warmup_min_calls:g} calls its first calls",
            )
        if min_sr is not None and wilson_bounds(s.successes, s.samples, 1.0)[1] < min_sr:
            continue  # more likely than not below the limit already
        if s.samples < policy.warmup_calls:
            return (
                i,
                "warm-up",
                "warm-up: measuring a cheaper model whose evidence does not yet rule it out",
            )
        if _plausible(verdicts[i], ctx.cons, rng, policy):
            return (
                i,
                "warm-up",
                "warm-up: measuring a cheaper model a draw from its evidence finds compliant",
            )
    return None


def _from_budget(
    ctx: Context,
    costs: Sequence[float | None],
    current: float | None,
    explorable: Sequence[int],
    policy: RoutingPolicy,
) -> Pick | None:
    # the exploration budget: ``explore_rate`` tokens a decision, up to a burst; an
    # unproven candidate that could beat the pick costs more the more it was measured
    exploration = ctx.exploration
    tokens = exploration.tokens + policy.explore_rate
    exploration.tokens = tokens = tokens if tokens < policy.explore_burst else policy.explore_burst
    if tokens < 1.0:
        return None
    verdicts = ctx.verdicts
    cheapest = policy.objective == "cheapest"
    best = -1
    best_price = math.inf
    for i in explorable:
        v = verdicts[i]
        if v.degraded or (cheapest and not _cheaper(costs[i], current)):
            continue
        price = 1.0 + v.summary.samples / policy.explore_half
        if price < best_price:
            best, best_price = i, price
    if best < 0 or tokens < best_price:
        return None
    exploration.tokens = tokens - best_price
    return (
        best,
        "budget",
        "exploration budget: measuring an unproven model that could beat the pick",
    )


def _explore_unproven(
    ctx: Context,
    costs: Sequence[float | None],
    explorable: Sequence[int],
    rng: random.Random,
    policy: RoutingPolicy,
) -> Pick:
    # nothing is eligible: first calls for the cheapest candidates, then (a failover) the
    # one a draw finds likeliest to comply or (a cold start) the cheapest a draw finds
    # compliant, else the closest by a drawn success rate
    verdicts = ctx.verdicts
    order = sorted(explorable, key=lambda i: (costs[i] is None, costs[i] or 0.0, ctx.models[i]))
    first_calls = policy.warmup_min_calls
    for i in order:
        v = verdicts[i]
        if v.summary.samples < first_calls and not v.degraded:
            return (
                i,
                "unproven",
                "no model is proven to meet the constraints yet: giving the cheapest "
                f"candidate with fewer than {first_calls:g} calls its first calls"
                if costs[i] is not None
                else "no model is proven to meet the constraints yet: giving a candidate "
                f"with fewer than {first_calls:g} calls its first calls (no cost estimate "
                "to rank them by: give input_tokens and max_tokens)",
            )
    min_sr = ctx.cons.min_success_rate
    if min_sr is not None and any(v.summary.record_lower >= min_sr for v in verdicts):
        # a failover: a model proven compliant in this window no longer is; the calls go
        # to the one likeliest to be proven, not to a cheap near-miss (cheaper ones are
        # measured by their warm-up once something is proven)
        picked = _likeliest_plausible(order, verdicts, ctx.cons, rng, policy)
        if picked is None:
            return (_closest_by_draw(order, verdicts, rng, policy), "unproven", _NO_DRAW_COMPLIANT)
        return (picked, "unproven", _LIKELIEST)
    # a cold start: the cheapest a draw finds compliant, half the time the runner-up of
    # another draw (top-two sampling), so a model that a lucky run keeps ahead does not
    # starve the one that would be proven
    picked = _cheapest_plausible(order, verdicts, ctx.cons, rng, policy)
    if picked is None:
        return (_closest_by_draw(order, verdicts, rng, policy), "unproven", _NO_DRAW_COMPLIANT)
    runner_up = False
    if rng.random() < 0.5:
        for _ in range(8):
            other = _cheapest_plausible(order, verdicts, ctx.cons, rng, policy)
            if other is not None and other != picked:
                picked, runner_up = other, True
                break
    why = (
        "no model is proven to meet the constraints yet: exploring the cheapest one "
        "a draw from its evidence finds compliant"
        if costs[picked] is not None
        else "no model is proven to meet the constraints yet: exploring one a draw "
        "from its evidence finds compliant (no cost estimate to rank them by: give "
        "input_tokens and max_tokens)"
    )
    if runner_up:
        why += " (top-two sampling: the runner-up, chosen by a second draw)"
    return (picked, "unproven", why)


_LIKELIEST: Final = (
    "no model proven to meet the constraints does so now: exploring the one a draw from "
    "its evidence finds likeliest to (cheaper ones are measured once it is proven)"
)


_NO_DRAW_COMPLIANT: Final = (
    "no model is proven to meet the constraints yet, and no draw finds one compliant: "
    "exploring the one whose drawn success rate comes closest"
)


def _closest_by_draw(
    order: Sequence[int], verdicts: Sequence[Verdict], rng: random.Random, policy: RoutingPolicy
) -> int:
    # no draw finds any compliant: the one whose drawn success rate comes closest
    return max(
        order,
        key=lambda i: rng.betavariate(
            policy.prior_alpha + verdicts[i].summary.successes,
            policy.prior_beta + verdicts[i].summary.samples - verdicts[i].summary.successes,
        ),
    )


__all__ += ["CIRCUIT_OPEN", "EMPTY_SUMMARY", "NOT_IN_REGISTRY"]
