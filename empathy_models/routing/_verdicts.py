"""
The verdict cache behind every decision: one `Context` per (workflow, stage,
candidate list, constraints), whose verdicts are recomputed only for arms whose
evidence changed since they were judged, so a decision costs O(candidates) with a
small constant.  Pure: reads the in-memory evidence only.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any, Final

from ..exceptions import ConfigurationError
from ..registry import ModelRegistry
from ._memory import EvidenceMemory
from .book import StagePrior
from .decide import EMPTY_SUMMARY, Context, ModelFacts, Verdict, judge, recost
from .policy import Constraints, RoutingPolicy

__all__ = ["Costed", "Limits", "VerdictCache", "classify", "limits_of"]

MAX_CONTEXTS: Final = 1024

Limits = tuple[float | None, float | None, float | None, bool, int | None, float | None]
"""A `Constraints` as a plain tuple, in its fields' order (a cheap context key)."""


def limits_of(c: Constraints) -> Limits:
    """``c`` as a `Limits` tuple."""
    return (
        c.min_success_rate,
        c.max_latency_ms,
        c.max_cost,
        c.strict_cost,
        c.max_tokens,
        c.max_ttft_ms,
    )


class VerdictCache:
    """The contexts of the decisions made so far, over one `EvidenceMemory`."""

    __slots__ = ("_contexts", "_facts", "memory", "policy", "registry")

    def __init__(
        self, registry: ModelRegistry, policy: RoutingPolicy, memory: EvidenceMemory
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.memory = memory
        self._contexts: dict[tuple[Any, ...], Context] = {}
        self._facts: dict[str, ModelFacts | None] = {}

    def model_facts(self, model: str) -> ModelFacts | None:
        """What the registry says of ``model`` (``None``: not in it); cached."""
        try:
            return self._facts[model]
        except KeyError:
            pass
        facts: ModelFacts | None = None
        if model in self.registry:
            info = self.registry.get(model)
            facts = ModelFacts(
                provider=info.provider,
                tier=info.tier,
                input_price=info.input_price_per_mtok / 1e6,
                output_price=info.output_price_per_mtok / 1e6,
                max_output_tokens=info.max_output_tokens,
            )
        self._facts[model] = facts
        return facts

    def _new(self, names: tuple[str, ...], limits: Limits) -> Context:
        models: list[str] = []
        seen: set[str] = set()
        for model in names:
            if not isinstance(model, str) or not model:
                raise ConfigurationError(
                    f"candidate model ids must be non-empty strings, got {model!r}"
                )
            if model not in seen:
                seen.add(model)
                models.append(model)
        return Context(
            cons=Constraints(*limits),
            models=tuple(models),
            facts=[self.model_facts(m) for m in models],
            arms=[],
            arms_epoch=-1,
        )

    def context(
        self, workflow: str | None, stage: str | None, names: tuple[str, ...], limits: Limits
    ) -> Context:
        """
        The context of one decision, its verdicts brought up to date with the evidence.

        Raises `ConfigurationError` for a candidate id that is not a non-empty string
        (and `TypeError` for an unhashable one).
        """
        key = (workflow, stage, names, limits)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._new(names, limits)
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.clear()
            self._contexts[key] = ctx
        memory = self.memory
        if ctx.arms_epoch != memory.epoch:
            self._attach(ctx, workflow, stage)
        prior = memory.priors.get((workflow, stage))
        pv = prior.version if prior is not None else -1
        stale_prior = pv != ctx.prior_version and ctx.on_prior
        start = memory.log_start
        log = memory.log
        if stale_prior or ctx.resets != memory.resets or ctx.seen < start:
            self._rejudge(ctx, range(len(ctx.arms)), prior, stale_prior)
            ctx.resets = memory.resets
        elif ctx.seen - start != len(log):
            # only the arms live outcomes changed since: re-judged in candidate order
            index = ctx.index
            new = log[ctx.seen - start :]
            if len(new) == 1:
                i = index.get(new[0])
                if i is not None:
                    self._rejudge(ctx, (i,), prior, False)
            else:
                changed = {index.get(arm, -1) for arm in new}
                changed.discard(-1)
                self._rejudge(ctx, sorted(changed), prior, False)
        ctx.seen = start + len(log)
        ctx.prior_version = pv
        return ctx

    def _rejudge(
        self, ctx: Context, which: Iterable[int], prior: StagePrior | None, stale_prior: bool
    ) -> None:
        # re-judge the candidates in ``which`` whose arm changed, or (``stale_prior``)
        # whose verdict is costed on the stage prior, which changed
        versions = ctx.arm_versions
        verdicts = ctx.verdicts
        arms = ctx.arms
        prior_tokens = prior.mean() if stale_prior and prior is not None else None
        for i in which:
            arm = arms[i]
            version = arm.version if arm is not None else -1
            if version == versions[i]:
                if stale_prior and verdicts[i].summary.mean_output_tokens is None:
                    # the same evidence costed on the new prior: only the cost changes
                    verdicts[i] = recost(
                        verdicts[i], ctx.cons, self.policy, prior_output_tokens=prior_tokens
                    )
                    ctx.caches[i] = {}
                    _changed(ctx, i)
            else:
                old = verdicts[i]
                new = verdicts[i] = self.judge(ctx, i, prior)
                ctx.caches[i] = {}
                versions[i] = version
                _changed(ctx, i)
                if new.code != old.code:
                    ctx.groups = None
                if (new.summary.change is None) != (old.summary.change is None):
                    ctx.changed = tuple(j for j, v in enumerate(verdicts) if v.summary.change)
                if (new.summary.mean_output_tokens is None) != (
                    old.summary.mean_output_tokens is None
                ):
                    # verdicts of arms without output tokens of their own use the prior
                    ctx.on_prior = any(v.summary.mean_output_tokens is None for v in verdicts)

    def _attach(self, ctx: Context, workflow: str | None, stage: str | None) -> None:
        # (re)read the context's arms after arms were added; judge them the first time
        memory = self.memory
        arms = memory.arms
        ctx.arms = [arms.get((workflow, stage, m)) for m in ctx.models]
        ctx.arms_epoch = memory.epoch
        ctx.index = {arm: i for i, arm in enumerate(ctx.arms) if arm is not None}
        ctx.seen = -1  # every arm is looked at next
        if not ctx.verdicts:
            ctx.verdicts = [self.judge(ctx, i, None) for i in range(len(ctx.models))]
            ctx.groups = None
            ctx.caches = [{} for _ in ctx.models]
            ctx.arm_versions = [-1] * len(ctx.models)
            # exactly: a verdict with output tokens of its own never uses the prior
            ctx.on_prior = any(v.summary.mean_output_tokens is None for v in ctx.verdicts)
            ctx.changed = tuple(
                j for j, v in enumerate(ctx.verdicts) if v.summary.change is not None
            )

    def judge(self, ctx: Context, i: int, prior: StagePrior | None) -> Verdict:
        """The verdict of ``ctx``'s candidate ``i`` on its arm's current evidence."""
        policy = self.policy
        arm = ctx.arms[i]
        summary = (
            arm.summarize(policy.z, policy.reject_z, policy.keep_z)
            if arm is not None
            else EMPTY_SUMMARY
        )
        return judge(
            ctx.models[i],
            ctx.facts[i],
            summary,
            ctx.cons,
            policy,
            prior_output_tokens=prior.mean() if prior is not None else None,
        )


MAX_CHANGES: Final = 4096


def _changed(ctx: Context, i: int) -> None:
    # log that candidate i's verdict was replaced (for the costings to catch up with)
    changes = ctx.changes
    changes.append(i)
    if len(changes) > MAX_CHANGES:
        del changes[: MAX_CHANGES // 2]
        ctx.changes_start += MAX_CHANGES // 2


def _groups(verdicts: list[Verdict]) -> tuple[list[int], list[int], list[int]]:
    # the candidates by verdict code: eligible, unproven, rejected (none not in the registry)
    groups: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for i, v in enumerate(verdicts):
        groups[v.code].append(i)
    return groups[0], groups[1], groups[2]


class Costed:
    """
    A context's candidates costed for one call: each one's expected cost, and those
    that may be picked (see `classify`).  ``eligible``, ``explorable`` and
    ``probeable`` are in candidate order, and nobody mutates them; ``costs`` neither
    once it was handed out (``shared``).

    Kept per ``input_tokens`` in the context (`Context.costed`) and brought up to date
    from the verdicts that changed since (`Context.changes`), so a decision after one
    outcome costs O(changed candidates) here instead of O(candidates).
    """

    __slots__ = (
        "costs",
        "eligible",
        "explorable",
        "groups_of",
        "limit",
        "near_tie",
        "probeable",
        "seen",
        "shared",
        "tokens",
    )

    costs: list[float | None]
    eligible: list[int]
    explorable: list[int]
    probeable: list[int]
    near_tie: list[int] | None  # memo of `cheapest_group`, current while not None
    limit: float  # the cost limit of ``near_tie``
    shared: bool  # handed to a decision: copied before it is changed
    # kept costings only (`classify`): their input_tokens, the `Context.groups` the
    # lists were drawn from, and the `Context.changes` position they are current with
    tokens: int | None
    groups_of: object
    seen: int

    def __init__(
        self, costs: list[float | None], lists: tuple[list[int], list[int], list[int]]
    ) -> None:
        self.costs = costs
        self.eligible, self.explorable, self.probeable = lists
        self.near_tie = None
        self.shared = False

    def cheapest_group(self, tolerance: float) -> list[int]:
        """
        The eligible candidates whose cost is within ``tolerance`` of the cheapest
        (every eligible one when none has a cost estimate); memoized until a change
        could alter it.
        """
        group = self.near_tie
        if group is None:
            costs = self.costs
            eligible = self.eligible
            cheapest = min([math.inf if (c := costs[i]) is None else c for i in eligible])
            if math.isinf(cheapest):
                group = list(eligible)
                self.limit = math.inf
            else:
                limit = self.limit = cheapest * (1.0 + tolerance) + 1e-15
                group = [i for i in eligible if (c := costs[i]) is not None and c <= limit]
            self.near_tie = group
        return group


MAX_COSTED: Final = 16  # input_tokens values kept per context
KEEP_FROM = 24  # candidates from which costings are kept (fewer: recomputing is cheaper)
_CATCH_UP: Final = 4  # catch up while changes * this <= candidates, else recompute


def _cost(v: Verdict, input_tokens: int | None) -> float | None:
    if input_tokens is None:
        return v.const_no_input
    slope = v.slope
    return None if slope is None else input_tokens * slope + v.const


def _within_limit(cost: float | None, max_cost: float | None) -> bool:
    return max_cost is None or (cost is not None and not cost > max_cost)


def _catch_up(entry: Costed, ctx: Context) -> bool:
    """Bring ``entry`` up to date with ``ctx``'s verdicts; False: recompute it instead."""
    start = ctx.changes_start
    if entry.seen < start:
        return False
    new = ctx.changes[entry.seen - start :]
    if not new:
        return True
    costs = entry.costs
    if len(new) * _CATCH_UP > len(costs):
        return False
    if entry.shared:  # a decision holds the list: copy on write
        costs = entry.costs = costs[:]
        entry.shared = False
    tokens = entry.tokens
    verdicts = ctx.verdicts
    max_cost = ctx.cons.max_cost
    lists_valid = entry.groups_of is ctx.groups
    for i in new:
        v = verdicts[i]
        old = costs[i]
        cost = costs[i] = _cost(v, tokens)
        if not lists_valid or _within_limit(old, max_cost) != _within_limit(cost, max_cost):
            lists_valid = False
        elif entry.near_tie is not None and v.code == 0 and _within_limit(cost, max_cost):
            # an eligible candidate's cost moved: the near-tie group changes only if it
            # was or is within the group's limit
            limit = entry.limit
            if old is None or cost is None or old <= limit or cost <= limit:
                entry.near_tie = None
    entry.seen = start + len(ctx.changes)
    if not lists_valid:
        groups = _current_groups(ctx)
        entry.groups_of = groups
        entry.eligible, entry.explorable, entry.probeable = _lists(groups, costs, max_cost)
        entry.near_tie = None
    return True


def _current_groups(ctx: Context) -> tuple[list[int], list[int], list[int]]:
    groups = ctx.groups
    if groups is None:
        groups = ctx.groups = _groups(ctx.verdicts)
    return groups


def _lists(
    groups: tuple[list[int], list[int], list[int]],
    costs: list[float | None],
    max_cost: float | None,
) -> tuple[list[int], list[int], list[int]]:
    # the groups' candidates within max_cost (the context's own lists when there is no
    # limit, or when all are within it: nobody mutates them)
    if max_cost is None:
        return groups
    eligible, explorable, probeable = groups
    return (
        _within(eligible, costs, max_cost) if eligible else [],
        _within(explorable, costs, max_cost) if explorable else [],
        _within(probeable, costs, max_cost) if probeable else [],
    )


def classify(ctx: Context, input_tokens: int | None, blocked: Collection[str]) -> Costed:
    """
    Each candidate's expected cost of this call, and the candidates that may be
    picked: ``eligible``, ``explorable`` and ``probeable`` (see `decide.select`).

    ``blocked`` ids (an open circuit) and candidates over ``max_cost`` are in none of
    the three lists: the budget is a hard limit, for exploration too.
    """
    if blocked:
        costed = _costed(ctx, input_tokens)
        models = ctx.models
        costed.eligible = [i for i in costed.eligible if models[i] not in blocked]
        costed.explorable = [i for i in costed.explorable if models[i] not in blocked]
        costed.probeable = [i for i in costed.probeable if models[i] not in blocked]
        costed.shared = True
        return costed
    if len(ctx.verdicts) < KEEP_FROM:
        return _costed(ctx, input_tokens)  # shared=False: it is nobody else's
    cache = ctx.costed
    kept = cache.get(input_tokens)
    if kept is None or not _catch_up(kept, ctx):
        if len(cache) >= MAX_COSTED:
            cache.clear()
        kept = cache[input_tokens] = _costed(ctx, input_tokens)
        kept.tokens = input_tokens
        kept.groups_of = ctx.groups
        kept.seen = ctx.changes_start + len(ctx.changes)
    kept.shared = True
    return kept


def _costed(ctx: Context, input_tokens: int | None) -> Costed:
    verdicts = ctx.verdicts
    costs: list[float | None]
    if input_tokens is None:
        costs = [v.const_no_input for v in verdicts]
    else:
        costs = [
            None if (slope := v.slope) is None else input_tokens * slope + v.const for v in verdicts
        ]
    groups = ctx.groups
    if groups is None:
        groups = ctx.groups = _groups(verdicts)
    max_cost = ctx.cons.max_cost
    return Costed(costs, groups if max_cost is None else _lists(groups, costs, max_cost))


def _within(group: list[int], costs: list[float | None], max_cost: float) -> list[int]:
    # the candidates of ``group`` whose cost of this call is known and <= max_cost
    try:  # the common case first: every cost known and within (max_cost is usually loose)
        top = max(map(costs.__getitem__, group))  # type: ignore[type-var]
    except TypeError:  # a cost unknown (None)
        top = None
    if top is not None and top <= max_cost:  # False for NaN, which may hide a larger cost
        return group
    return [i for i in group if (c := costs[i]) is not None and not c > max_cost]
