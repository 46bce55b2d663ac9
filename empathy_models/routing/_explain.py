"""
Turning a selection into a `RoutingDecision` that explains itself, and what a decision
does when no candidate can be picked (``on_no_match``: raise, relax or a pinned model).
Pure but for logging: the router passes the time in.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from functools import partial
from typing import Final, NoReturn

import attrs

from .._fast import trusted_constructor
from ..exceptions import NoModelMeetsConstraintsError
from ..records import CandidateEvaluation, RoutingDecision
from ._rows import build_candidates
from ._verdicts import MAX_CONTEXTS, VerdictCache, classify, limits_of
from .decide import Context, Verdict, select
from .policy import Constraints, RoutingPolicy

__all__ = ["Decider", "annotated"]

logger = logging.getLogger("empathy_models.router")

CHANGE_NOTE_S: Final = 3600.0  # how long a pick says it regained its place by a change

_decision: Final[Callable[..., RoutingDecision]] = trusted_constructor(
    RoutingDecision, skip=("candidates",), positional=True
)
"""A `RoutingDecision` without its ``__init__`` (every value is of its field's converted
type and in range), with ``candidates`` left unset: it is built by the thunk on first
read (see RoutingDecision).  Positional, in the fields' order (checked below)."""
if tuple(a.name for a in attrs.fields(RoutingDecision)) != (
    "model",
    "provider",
    "tier",
    "workflow",
    "stage",
    "constraints_met",
    "reason",
    "candidates",
    "exploration",
    "relaxed",
    "policy_applied",
    "decided_at",
    "expected_cost_usd",
    "max_cost",
    "max_latency_ms",
    "min_success_rate",
    "strict_cost",
    "change",
    "max_ttft_ms",
    "exploration_kind",
    "_candidates_thunk",
):  # pragma: no cover - guards Decider.decide's argument order against field changes
    raise TypeError("RoutingDecision's fields changed: update routing._explain.Decider.decide")


def _joined(
    decision: RoutingDecision, extra: tuple[CandidateEvaluation, ...]
) -> tuple[CandidateEvaluation, ...]:
    return (*decision.candidates, *extra)


def annotated(
    decision: RoutingDecision, extra: tuple[CandidateEvaluation, ...], note: str | None
) -> RoutingDecision:
    """
    ``decision`` with ``extra`` rows after its candidates and ``note`` after its reason
    (the executor's models without an API key, a tier it substituted): its candidates
    are still built when first read, ``decision``'s with them.
    """
    return _decision(
        decision.model,
        decision.provider,
        decision.tier,
        decision.workflow,
        decision.stage,
        decision.constraints_met,
        decision.reason if note is None else f"{decision.reason}; {note}",
        decision.exploration,
        decision.relaxed,
        decision.policy_applied,
        decision.decided_at,
        decision.expected_cost_usd,
        decision.max_cost,
        decision.max_latency_ms,
        decision.min_success_rate,
        decision.strict_cost,
        decision.change,
        decision.max_ttft_ms,
        decision.exploration_kind,
        partial(_joined, decision, extra),
    )


def _unmet(v: Verdict, cost: float | None, cons: Constraints) -> list[str]:
    """The constraints a candidate picked despite them does not confidently meet."""
    unmet = [
        name
        for name, status in (
            ("min_success_rate", v.success),
            ("max_latency_ms", v.latency),
            ("max_ttft_ms", v.ttft),
        )
        if status is not None and status.value != "eligible"
    ]
    if cons.max_cost is not None and (cost is None or not cost <= cons.max_cost):
        unmet.append("max_cost")
    return unmet


def _unmet_detail(v: Verdict, cost: float | None, cons: Constraints) -> tuple[bool, str]:
    unmet = _unmet(v, cost, cons)
    return (not unmet, f"; unmet: {', '.join(unmet)}" if unmet else "")


class Decider:
    """Builds decisions over a `VerdictCache`; ``rng`` draws the relaxed selections."""

    __slots__ = ("_unproven_logged", "policy", "rng", "verdicts")

    def __init__(self, verdicts: VerdictCache, policy: RoutingPolicy, rng: random.Random) -> None:
        self.verdicts = verdicts
        self.policy = policy
        self.rng = rng
        self._unproven_logged: set[tuple[str, str | None]] = set()

    def _change(
        self, ctx: Context, costs: list[float | None], index: int, now: float
    ) -> str | None:
        # a change this decision acted on: a model that would be cheaper lost its
        # standing to one, or the pick regained it through one within the hour
        pick_cost = costs[index]
        cheapest = self.policy.objective == "cheapest"
        for i in ctx.changed:
            other = ctx.verdicts[i]
            c = costs[i]
            since = other.summary.since
            if (i == index and since is not None and now - since <= CHANGE_NOTE_S) or (
                i != index
                and other.code != 0
                and cheapest
                and c is not None
                and pick_cost is not None
                and c < pick_cost
            ):
                return f"{other.model} {other.summary.change}"
        return None

    def decide(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        index: int,
        kind: str | None,
        why: str,
        input_tokens: int | None,
        blocked: Collection[str],
        now: float,
        *,
        relaxed: tuple[str, ...] = (),
        applied: str | None = None,
        met: bool | None = None,
        shown: Context | None = None,
    ) -> RoutingDecision:
        """
        The decision for ``ctx``'s candidate ``index``, an exploration of ``kind``
        (`RoutingDecision.exploration_kind`) unless that is ``None``.

        ``shown`` (a relaxed decision): the context whose candidates and constraints
        the decision explains itself with, when it was selected in a looser one.
        """
        v = ctx.verdicts[index]
        exploration = kind is not None
        change = self._change(ctx, costs, index, now) if ctx.changed else None
        if change is not None:
            why = f"{why}; acting on a detected change: {change}"
        facts = v.facts
        view = shown if shown is not None else ctx
        view_costs = costs if shown is None else classify(view, input_tokens, blocked)[0]
        cons = view.cons
        decision = _decision(
            v.model,
            facts.provider if facts is not None else None,
            facts.tier if facts is not None else None,
            workflow,
            stage,
            (not exploration) if met is None else met,
            why,
            exploration,
            relaxed,
            applied,
            datetime.fromtimestamp(now, UTC),
            costs[index],
            cons.max_cost,
            cons.max_latency_ms,
            cons.min_success_rate,
            cons.strict_cost,
            change,
            cons.max_ttft_ms,
            kind,
            partial(
                build_candidates,
                list(view.verdicts),
                view_costs,
                cons,
                input_tokens,
                blocked,
                list(view.caches),
            ),
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "routing %s/%s -> %s (%s; exploration=%s; constraints_met=%s; "
                "expected cost %s; %d candidates)",
                workflow,
                stage,
                v.model,
                why,
                exploration,
                decision.constraints_met,
                costs[index],
                len(ctx.models),
            )
        return decision

    def no_match(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        on_no_match: str,
        pinned: str | None,
        input_tokens: int | None,
        blocked: Collection[str],
        now: float,
    ) -> RoutingDecision:
        """What ``on_no_match`` does when no candidate could be picked in ``ctx``."""
        decision: RoutingDecision | None = None
        if on_no_match == "relax":
            decision = self._relax(workflow, stage, ctx, costs, input_tokens, blocked, now)
        elif pinned is not None:
            decision = self._pin(workflow, stage, ctx, costs, pinned, input_tokens, blocked, now)
        if decision is None:
            self.raise_no_match(
                workflow,
                stage,
                ctx,
                costs,
                input_tokens,
                blocked,
                "no candidate meets the constraints",
            )
        logger.warning(
            "routing %s/%s -> %s (%s; constraints_met=%s)",
            workflow,
            stage,
            decision.model,
            decision.reason,
            decision.constraints_met,
        )
        return decision

    def _relax(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        input_tokens: int | None,
        blocked: Collection[str],
        now: float,
    ) -> RoutingDecision | None:
        # drop constraints in the policy's relax_order until a candidate qualifies, then
        # keep after all those dropped on the way that a candidate still qualifies with
        cons = ctx.cons
        relaxed: list[str] = []
        for name in self.policy.relax_order:
            if name not in cons.given:
                continue
            relaxed.append(name)
            found = self._loose(workflow, stage, ctx, relaxed, input_tokens, blocked)
            if found is None:
                continue
            for earlier in reversed(relaxed[:-1]):  # the most valued first
                fewer = [n for n in relaxed if n != earlier]
                kept = self._loose(workflow, stage, ctx, fewer, input_tokens, blocked)
                if kept is not None:
                    relaxed, found = fewer, kept
            loose, lcosts, (index, kind, why) = found
            met, detail = _unmet_detail(ctx.verdicts[index], costs[index], cons)
            return self.decide(
                workflow,
                stage,
                loose,
                lcosts,
                index,
                kind,
                f"no candidate met every constraint; relaxed {', '.join(relaxed)} "
                f"(judged on the rest): {why}{detail}",
                input_tokens,
                blocked,
                now,
                relaxed=tuple(relaxed),
                applied="relax",
                met=met and kind is None,
                shown=ctx,
            )
        return None

    def _loose(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        dropped: list[str],
        input_tokens: int | None,
        blocked: Collection[str],
    ) -> tuple[Context, list[float | None], tuple[int, str | None, str]] | None:
        # the selection in ``ctx`` without the constraints ``dropped`` (None: none qualifies)
        active = ctx.cons
        for name in dropped:
            active = active.without(name)
        loose = self.verdicts.context(
            workflow or None, stage or None, ctx.models, limits_of(active)
        )
        lcosts, el, ex, pr = classify(loose, input_tokens, blocked)
        picked = select(loose, lcosts, el, ex, pr, self.rng, self.policy, budget=False)
        return None if picked is None else (loose, lcosts, picked)

    def _pin(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        pinned: str,
        input_tokens: int | None,
        blocked: Collection[str],
        now: float,
    ) -> RoutingDecision:
        view = ctx
        if pinned not in ctx.models:
            view = self.verdicts.context(
                workflow or None, stage or None, (*ctx.models, pinned), limits_of(ctx.cons)
            )
            costs = classify(view, input_tokens, blocked)[0]
        index = view.models.index(pinned)
        if pinned in blocked:
            self.raise_no_match(
                workflow,
                stage,
                view,
                costs,
                input_tokens,
                blocked,
                f"pinned model {pinned!r} is unavailable (circuit open)",
            )
        met, detail = _unmet_detail(view.verdicts[index], costs[index], ctx.cons)
        return self.decide(
            workflow,
            stage,
            view,
            costs,
            index,
            None,
            f"no candidate met every constraint; pinned by on_no_match={pinned!r}{detail}",
            input_tokens,
            blocked,
            now,
            applied="pinned",
            met=met and view.verdicts[index].code == 0,
        )

    def raise_no_match(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        input_tokens: int | None,
        blocked: Collection[str],
        message: str,
    ) -> NoReturn:
        """Log every candidate's reasons and raise `NoModelMeetsConstraintsError`."""
        cands = build_candidates(ctx.verdicts, costs, ctx.cons, input_tokens, blocked)
        reasons = {c.model: (c.reasons or ("not eligible",)) for c in cands}
        logger.warning(
            "routing %s/%s: %s; %s",
            workflow,
            stage,
            message,
            "; ".join(f"{m}: {', '.join(r)}" for m, r in reasons.items()),
        )
        raise NoModelMeetsConstraintsError(
            f"{message} for {workflow}/{stage}", reasons=reasons, workflow=workflow, stage=stage
        )

    def log_unproven(self, workflow: str, stage: str | None, model: str, why: str) -> None:
        """
        No candidate is eligible, so an unproven one was returned rather than the
        on_no_match policy acting: a warning the first time per stage, then DEBUG.
        """
        key = (workflow, stage)
        if key in self._unproven_logged:
            logger.debug("routing %s/%s -> %s (%s; constraints_met=False)", *key, model, why)
            return
        if len(self._unproven_logged) >= MAX_CONTEXTS:
            self._unproven_logged.clear()
        self._unproven_logged.add(key)
        logger.warning(
            "routing %s/%s -> %s (%s; constraints_met=False, exploration=True; later "
            "decisions like this for this stage are logged at DEBUG)",
            workflow,
            stage,
            model,
            why,
        )
