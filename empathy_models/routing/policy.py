"""`RoutingPolicy` (how the router weighs evidence and explores) and `Constraints`."""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs
from attrs import field, frozen

from .._validators import Validator, failure, integer, number, one_of, shown
from ..exceptions import ConfigurationError
from .book import ChangeTest

__all__ = ["COST", "LATENCY", "SUCCESS", "TTFT", "Constraints", "Objective", "RoutingPolicy"]

SUCCESS: Final = "min_success_rate"
LATENCY: Final = "max_latency_ms"
COST: Final = "max_cost"
TTFT: Final = "max_ttft_ms"
CONSTRAINT_NAMES: Final = (SUCCESS, LATENCY, COST, TTFT)

Objective = Literal["cheapest", "most_reliable"]


_fail = failure(ConfigurationError)


def _number(
    low: float, *, strict: bool, high: float | None = None, optional: bool = False
) -> Validator:
    """An attrs validator: a finite real number above ``low`` (and at most ``high``)."""
    bound = f"> {low:g}" if strict else f">= {low:g}"
    if high is not None:
        bound += f" and <= {high:g}"
    return number(
        _fail,
        low=low,
        low_open=strict,
        high=high,
        optional=optional,
        why=f"must be a finite number {bound}",
    )


_check_unit = _number(0.0, strict=False, high=1.0)
_check_unit_opt = _number(0.0, strict=False, high=1.0, optional=True)
_check_positive = _number(0.0, strict=True)
_check_positive_opt = _number(0.0, strict=True, optional=True)
_check_non_negative = _number(0.0, strict=False)
_check_at_least_one = _number(1.0, strict=False)
# counts the router slices or counts to: an ``int`` (``bool`` and floats, even whole
# ones, refused)
_check_count = integer(_fail, low=0, why="must be an integer >= 0")
_check_count_positive = integer(_fail, low=1, why="must be an integer >= 1")
_check_objective = one_of(
    _fail, ("cheapest", "most_reliable"), why="must be 'cheapest' or 'most_reliable'"
)


def _check_relax_order(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, tuple)
        or len(set(value)) != len(value)
        or any(c not in CONSTRAINT_NAMES for c in value)
    ):
        raise ConfigurationError(
            f"{attribute.name} must be distinct names among {', '.join(CONSTRAINT_NAMES)}, "
            f"got {shown(value)}"
        )


def _to_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


@frozen(kw_only=True)
class RoutingPolicy:
    """
    How the router weighs evidence, explores, and what it does when nothing qualifies.

    Once a candidate is proven, only candidates that could beat it (cheaper under
    ``"cheapest"``) are explored, each exploration paid from a budget that accrues
    ``explore_rate`` per decision, so the share of exploration never exceeds it for long.
    A rejected or degraded candidate that would be cheaper is re-probed, so a recovery
    is found within a few hundred decisions while a model that keeps failing costs ~1%
    of them.  The budget and the re-probe waits count the decisions of a (workflow,
    stage, candidate list), whatever ``max_tokens``, ``max_cost`` or other constraints
    each one gives.  While nothing is proven, every decision explores: first each candidate's
    ``warmup_min_calls`` (cheapest first).  Then, on a cold start, the cheapest one that
    a random draw from its evidence finds compliant, half the time the runner-up of a
    second draw instead (top-two Thompson sampling), so a cheap near-miss on a lucky run
    does not starve the model that would be proven; after a failover (a candidate proven
    compliant in the window no longer is), the one whose drawn success rate is highest,
    so service is restored on the likeliest model rather than measured on a cheap
    near-miss, and cheaper candidates get their warm-up once it is proven.

    Args:
        window_days: how much history the router reads and keeps (default 7).  Within
            it a stationary model's evidence is never discounted; a change the router
            detects (``change_threshold``) sets older evidence aside.  The window's
            start moves in steps of 1/168 of it (an hour for a week, at least a
            minute), so it reaches back up to one step further: at each step a refresh
            drops what fell out and judges each model again from the new start, as a
            router started then would (without a store, the first outcome or decision
            after the step does, and older outcomes are not taken).
        change_threshold: the level (log-likelihood ratio) at which the per-model change
            test signals a change in success rate (default 5.0: a model dropping from
            0.99 to 0.80 is noticed after ~20 of its calls; a stationary one raises a
            false alarm about once in several thousand calls, and recovers from it).
        z: the normal quantile of the confidence bounds (default 1.96, i.e. 95%).
        reject_z: the stricter quantile a success rate must clear to be REJECTED
            (default 3.0).
        keep_z: the looser quantile a model's lower bound must stay above to remain
            eligible once its current regime proved it (at ``z``) at the end of a
            minute bucket (default 1.0: hysteresis, so a model near the limit does not
            flap; it depends on the evidence only, so routers reading the same agree).
        reject_min_samples: calls needed before a success rate can be REJECTED
            (default 10).
        latency_min_samples: measured successful calls needed before the latency
            constraint can be judged (an integer, default 5).
        prior_output_tokens: output tokens assumed for a model not yet measured in a
            stage where no model has been measured either (default ``None``: the call's
            ``max_tokens``, the worst case).  Once any model has served the stage,
            untried models are costed on the stage's mean output tokens.
        default_min_success_rate: the floor used when a decision gives none (default
            0.8); ``None`` for no floor.
        objective: how the pick is made among eligible candidates.  ``"cheapest"``
            (default): the one of least expected cost; those within
            ``cost_tie_tolerance`` of it tie, and the tie goes to the highest Thompson
            draw of the success rate (a draw from Beta(``prior_alpha`` + successes,
            ``prior_beta`` + failures)) less 0.01 times the model's median latency
            over the slowest tied one's.  ``"most_reliable"``: the highest such draw
            less 0.001 times the model's expected cost over the dearest eligible one's
            and 0.001 times its median latency over the slowest one's (a model without
            a cost estimate or a measured latency counts as the dearest or the
            slowest): cost and latency, together at most 0.2 percentage points, only
            decide between models whose draws are that close, so a clearly more
            reliable model is picked whatever it costs.
        cost_tie_tolerance: relative cost difference treated as a tie under
            ``"cheapest"`` (default 5%).
        explore_rate: exploration budget, as a share of decisions (default 0.005); ``0``
            disables exploration once something is proven.
        explore_burst: the most the budget accrues, in decisions' worth (default 10).
        explore_half: calls after which exploring a candidate costs twice as much
            (default 50): its price grows with its evidence, so its share shrinks.
        reprobe_interval: decisions between re-probes of a rejected or degraded
            candidate that would be cheaper (default 200); the wait is halved after each
            success of it in a row, and four times as long for one never proven or
            rejected on latency or time to first token.  A degraded candidate whose
            recovery was noticed in its newest minute is re-probed the same way until a
            later minute holds an outcome of it, when the recovery is acted on.
            While no candidate is eligible or unproven (a decision would raise,
            relax or pin), every rejected candidate within the cost limit is
            re-probed: first ``reprobe_min`` decisions after that began, then after
            ``reprobe_interval`` halved per success in a row, down to every decision
            (the calls it takes would otherwise fail); one rejected on latency or
            time to first token waits four times ``reprobe_interval``.  Whatever the
            wait, a candidate re-probed while stranded is re-probed again two minutes
            later (`decide.STRANDED_PROBE_SECONDS`, on the router's clock), so a stage
            with little traffic answers again within minutes of an outage's end.  Not
            when ``explore_rate`` is 0.
        reprobe_min: the shortest that wait gets (default 4).
        warmup_min_calls: before the exploration budget applies, a cheaper candidate
            with fewer calls than this is given them whatever they showed (default 20: a
            few unlucky first calls must not lock the cheapest compliant model out).
        warmup_calls: a cheaper candidate with fewer calls (default 150) whose
            evidence does not already say it more likely misses than not (upper bound
            at z = 1 below the limit) gets ``warmup_share`` of the decisions, so it is
            proven or ruled out early; one whose evidence still says it more likely
            complies than not (lower bound at z = 0.5 above the limit) keeps that share
            for up to four times ``warmup_calls`` while a draw from its evidence finds
            it compliant, so an unlucky start does not leave it unproven.
        warmup_share: that share (default 1.0: all).
        relax_order: the order ``on_no_match="relax"`` drops constraints in (default
            time to first token, latency, then success rate, then cost last because it
            is a budget) until a candidate qualifies; one dropped on the way that a
            candidate still qualifies with is then kept (the later ones in this order
            first), so only the constraints the pick needed dropped are; a constraint
            not listed is never dropped.
        prior_alpha, prior_beta: Beta prior of the Thompson draws (never counted toward
            a verdict).
        seed_stage_limit: how many workflow stages get their recent-outcome window (for
            `AdaptiveModelRouter.recommend_tier_upgrade`) filled at start (an integer,
            default 1000; 0: none).

    Raises:
        ConfigurationError: an invalid value, naming the field.
    """

    window_days: float = field(default=7.0, validator=_check_positive)
    change_threshold: float = field(default=5.0, validator=_check_positive)
    z: float = field(default=1.96, validator=_check_positive)
    reject_z: float = field(default=3.0, validator=_check_positive)
    keep_z: float = field(default=1.0, validator=_check_positive)
    reject_min_samples: float = field(default=10.0, validator=_check_positive)
    latency_min_samples: int = field(default=5, validator=_check_count_positive)
    prior_output_tokens: float | None = field(default=None, validator=_check_positive_opt)
    default_min_success_rate: float | None = field(default=0.8, validator=_check_unit_opt)
    objective: Objective = field(default="cheapest", validator=_check_objective)
    cost_tie_tolerance: float = field(default=0.05, validator=_check_non_negative)
    explore_rate: float = field(default=0.005, validator=_check_unit)
    explore_burst: float = field(default=10.0, validator=_check_at_least_one)
    warmup_calls: float = field(default=150.0, validator=_check_non_negative)
    warmup_share: float = field(default=1.0, validator=_check_unit)
    warmup_min_calls: float = field(default=20.0, validator=_check_non_negative)
    explore_half: float = field(default=50.0, validator=_check_positive)
    reprobe_interval: float = field(default=200.0, validator=_check_at_least_one)
    reprobe_min: float = field(default=4.0, validator=_check_at_least_one)
    relax_order: tuple[str, ...] = field(
        default=(TTFT, LATENCY, SUCCESS, COST),
        converter=_to_tuple,
        validator=_check_relax_order,
    )
    prior_alpha: float = field(default=1.0, validator=_check_positive)
    prior_beta: float = field(default=1.0, validator=_check_positive)
    seed_stage_limit: int = field(default=1000, validator=_check_count)

    @property
    def change_test(self) -> ChangeTest:
        """The per-model change test these settings describe."""
        # an improvement that is not a return to an earlier rate needs 3 more (see
        # ChangeTest): it only speeds a verdict up
        t = self.change_threshold
        return ChangeTest(threshold=t, improve_threshold=t + 3.0, proof_z=self.z)


@frozen
class Constraints:
    """
    What one decision asks of a model: the limits given (``None``: not constrained) and
    how cost is judged (``strict_cost``: against the worst case of ``max_tokens``).
    """

    min_success_rate: float | None = None
    max_latency_ms: float | None = None
    max_cost: float | None = None
    strict_cost: bool = False
    max_tokens: int | None = None
    max_ttft_ms: float | None = None

    @property
    def given(self) -> tuple[str, ...]:
        """Names of the constraints that are set, in (success, latency, cost, ttft) order."""
        return tuple(
            name
            for name, value in (
                (SUCCESS, self.min_success_rate),
                (LATENCY, self.max_latency_ms),
                (COST, self.max_cost),
                (TTFT, self.max_ttft_ms),
            )
            if value is not None
        )

    def without(self, name: str) -> Constraints:
        """These constraints with ``name`` dropped."""
        return attrs.evolve(
            self,
            min_success_rate=None if name == SUCCESS else self.min_success_rate,
            max_latency_ms=None if name == LATENCY else self.max_latency_ms,
            max_cost=None if name == COST else self.max_cost,
            max_ttft_ms=None if name == TTFT else self.max_ttft_ms,
        )
