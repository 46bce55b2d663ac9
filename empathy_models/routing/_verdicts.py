"""
The verdict cache behind every decision: one `Context` per (workflow, stage,
candidate list, constraints), whose verdicts are recomputed only for arms whose
evidence changed since they were judged, so a decision costs O(candidates) with a
small constant.  Pure: reads the in-memory evidence only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from typing import Any, Final

from .._validators import shown
from ..exceptions import ConfigurationError
from ..registry import ModelRegistry
from ._memory import EvidenceMemory
from .book import StagePrior
from .decide import (
    EMPTY_SUMMARY,
    Context,
    Exploration,
    ModelFacts,
    Terms,
    Verdict,
    judge,
    recost,
)
from .policy import Constraints, RoutingPolicy

__all__ = ["Limits", "VerdictCache", "classify", "limits_of"]

MAX_CONTEXTS: Final = 1024
"""The most decision contexts kept (a cache: past it, they are judged afresh)."""
MAX_STREAMS: Final = 16_384
"""
The most streams (workflow, stage, candidates) whose exploration state is kept: the
budget and re-probe waits, which build up over a stream's decisions.  Past it every
stream starts over (~450 bytes a stream, its key included: ~7 MB at the bound).
"""

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

    __slots__ = (
        "_contexts",
        "_explorations",
        "_facts",
        "_latest",
        "clock",
        "memory",
        "policy",
        "registry",
    )

    def __init__(
        self,
        registry: ModelRegistry,
        policy: RoutingPolicy,
        memory: EvidenceMemory,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.policy = policy
        self.memory = memory
        self._contexts: dict[tuple[Any, ...], Context] = {}
        # one per (workflow, stage, candidates): shared by its contexts
        self._explorations: dict[tuple[Any, ...], Exploration] = {}
        # the newest context of each (workflow, stage, candidates, judging constraints):
        # what a context that differs from it in max_cost / max_tokens only starts from
        self._latest: dict[tuple[Any, ...], Context] = {}
        # the registry's models only: an id outside it is looked up each time a context
        # is made, never kept here (and past twice the registry's size plus
        # MAX_CONTEXTS ids, as spelt in as many cases, it starts over)
        self._facts: dict[str, ModelFacts] = {}

    def model_facts(self, model: str) -> ModelFacts | None:
        """What the registry says of ``model`` (``None``: not in it); cached."""
        try:
            return self._facts[model]
        except KeyError:
            pass
        if model not in self.registry:
            return None
        info = self.registry.get(model)
        if len(self._facts) >= 2 * len(self.registry) + MAX_CONTEXTS:
            self._facts.clear()
        threshold = info.long_context_threshold
        long_in, long_out = info.prices_for(math.inf)  # the standard ones without a threshold
        facts = self._facts[model] = ModelFacts(
            provider=info.provider,
            tier=info.tier,
            input_price=info.input_price_per_mtok / 1e6,
            output_price=info.output_price_per_mtok / 1e6,
            max_output_tokens=info.max_output_tokens,
            long_from=math.inf if threshold is None else float(threshold),
            long_input_ratio=_ratio(long_in, info.input_price_per_mtok),
            long_output_ratio=_ratio(long_out, info.output_price_per_mtok),
            long_input_extra=long_in / 1e6 if info.input_price_per_mtok == 0.0 else 0.0,
            long_output_extra=long_out / 1e6 if info.output_price_per_mtok == 0.0 else 0.0,
        )
        return facts

    def _new(
        self, workflow: str | None, stage: str | None, names: tuple[str, ...], limits: Limits
    ) -> Context:
        models: list[str] = []
        seen: set[str] = set()
        for model in names:
            if not isinstance(model, str) or not model:
                raise ConfigurationError(
                    f"candidate model ids must be non-empty strings, got {shown(model)}"
                )
            if model not in seen:
                seen.add(model)
                models.append(model)
        stream = (workflow, stage, tuple(models))
        exploration = self._explorations.get(stream)
        if exploration is None:
            if len(self._explorations) >= MAX_STREAMS:
                # the cached contexts go too: none may keep a budget the stream lost
                self._explorations.clear()
                self._contexts.clear()
                self._latest.clear()
            exploration = self._explorations[stream] = Exploration(clock=self.clock)
        facts = [self.model_facts(m) for m in models]
        return _context(stream[2], facts, exploration, limits, self.policy.prior_output_tokens)

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
        memory = self.memory
        if ctx is None:
            # (min_success_rate, max_latency_ms, strict_cost, max_ttft_ms): what a
            # verdict is judged on; max_cost never enters one, max_tokens only its cost
            judged = (workflow, stage, names, limits[0], limits[1], limits[3], limits[5])
            sibling = self._latest.get(judged)
            if sibling is None:
                ctx = self._new(workflow, stage, names, limits)
            else:
                ctx = _context(
                    sibling.models,
                    sibling.facts,
                    sibling.exploration,
                    limits,
                    self.policy.prior_output_tokens,
                )
                if sibling.verdicts and sibling.arms_epoch == memory.epoch:
                    self._seed(ctx, sibling, memory.priors.get((workflow, stage)))
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.clear()
                self._latest.clear()
            self._contexts[key] = ctx
            self._latest[judged] = ctx
        if ctx.arms_epoch != memory.epoch:
            self._attach(ctx, workflow, stage)
        prior = memory.priors.get((workflow, stage))
        pv = prior.version if prior is not None else -1
        stale_prior = False
        if pv != ctx.prior_version:
            # verdicts costed on the prior follow its value in `classify`; only one that
            # starts or stops having a value changes how a verdict is costed
            value = (prior.mean() if prior is not None else None) or self.policy.prior_output_tokens
            stale_prior = ctx.on_prior and (value is None) != (ctx.prior_tokens is None)
            ctx.prior_tokens = value
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

    def _seed(self, ctx: Context, sibling: Context, prior: StagePrior | None) -> None:
        """
        Start ``ctx`` from ``sibling``'s verdicts, which differ from a fresh judgement
        in their cost terms at most (``max_tokens`` differs: recosted); `context` then
        brings them up to date as it does any context's.
        """
        ctx.arms = sibling.arms
        ctx.arms_epoch = sibling.arms_epoch
        ctx.index = sibling.index
        ctx.seen = sibling.seen
        ctx.resets = sibling.resets
        ctx.prior_version = sibling.prior_version
        ctx.prior_tokens = sibling.prior_tokens
        ctx.on_prior = sibling.on_prior
        ctx.changed = sibling.changed
        ctx.groups = sibling.groups
        ctx.degraded = sibling.degraded
        ctx.arm_versions = sibling.arm_versions[:]
        ctx.caches = [{} for _ in ctx.models]
        ctx.verdicts = sibling.verdicts[:]
        cap, other = ctx.cons.max_tokens, sibling.cons.max_tokens
        if cap != other:
            # a verdict depends on max_tokens when costed on the worst case (or not
            # costed: no max_tokens then), on the stage prior, or on a mean of output
            # tokens above either cap (the output stops at max_tokens)
            low = other if cap is None else cap if other is None else min(cap, other)
            tokens = prior.mean() if prior is not None else None
            verdicts = ctx.verdicts
            for i, v in enumerate(verdicts):
                basis = v.basis
                if (
                    basis is None
                    or basis == "worst_case"
                    or basis == "prior"
                    or (
                        low is not None
                        and (out := v.summary.mean_output_tokens) is not None
                        and out > low
                    )
                ):
                    verdicts[i] = recost(v, ctx.cons, self.policy, prior_output_tokens=tokens)

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
                    new = verdicts[i] = recost(
                        verdicts[i], ctx.cons, self.policy, prior_output_tokens=prior_tokens
                    )
                    ctx.caches[i] = {}
                    if ctx.terms is not None:
                        _reterm(ctx.terms, i, new)
            else:
                old = verdicts[i]
                new = verdicts[i] = self.judge(ctx, i, prior)
                ctx.caches[i] = {}
                versions[i] = version
                if new.code != old.code:
                    ctx.groups = None
                    ctx.terms = None
                elif ctx.terms is not None:
                    _reterm(ctx.terms, i, new)
                if new.degraded:
                    ctx.degraded = True  # (cleared only when the groups are made again)
                if (new.summary.change is None) != (old.summary.change is None):
                    ctx.changed = tuple(j for j, v in enumerate(verdicts) if v.summary.change)
                if (new.summary.mean_output_tokens is None) != (
                    old.summary.mean_output_tokens is None
                ):
                    # verdicts of arms without output tokens of their own use the prior
                    ctx.on_prior = any(v.summary.mean_output_tokens is None for v in verdicts)

    def _attach(self, ctx: Context, workflow: str | None, stage: str | None) -> None:
        # (re)read the context's arms after arms were added or dropped; judge them the
        # first time
        memory = self.memory
        arms = memory.arms
        old = ctx.arms
        ctx.arms = [arms.get((workflow, stage, m)) for m in ctx.models]
        if old and ctx.arm_versions:
            # a dropped arm's successor starts its versions over: judged anew
            versions = ctx.arm_versions
            for i, arm in enumerate(ctx.arms):
                if arm is not old[i]:
                    versions[i] = -2
        ctx.arms_epoch = memory.epoch
        ctx.index = {arm: i for i, arm in enumerate(ctx.arms) if arm is not None}
        ctx.seen = -1  # every arm is looked at next
        if not ctx.verdicts:
            ctx.verdicts = [self.judge(ctx, i, None) for i in range(len(ctx.models))]
            ctx.groups = None
            ctx.terms = None
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


def _ratio(long_price: float, price: float) -> float:
    # a long-context price as a multiple of the standard one (1 for a zero price, whose
    # long-context price `ModelFacts.long_extra` adds)
    return long_price / price if price > 0.0 else 1.0


def _context(
    models: tuple[str, ...],
    facts: list[ModelFacts | None],
    exploration: Exploration,
    limits: Limits,
    prior_tokens: float | None,
) -> Context:
    # a context not attached to the evidence yet (see `VerdictCache._attach`);
    # ``prior_tokens``: the policy's, while the stage has no prior
    return Context(
        cons=Constraints(*limits),
        models=models,
        facts=facts,  # never mutated: contexts of the same candidates share it
        arms=[],
        arms_epoch=-1,
        exploration=exploration,
        prior_tokens=prior_tokens,
        long_from=min([f.long_from for f in facts if f is not None], default=math.inf),
    )


def _groups(verdicts: list[Verdict]) -> tuple[list[int], list[int], list[int]]:
    # the candidates by verdict code: eligible, unproven, rejected (none not in the registry)
    groups: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for i, v in enumerate(verdicts):
        groups[v.code].append(i)
    return groups[0], groups[1], groups[2]


def _terms(verdicts: list[Verdict]) -> Terms:
    # the verdicts' cost terms (see `Terms`), their groups by their codes
    terms = Terms(
        slopes=[math.nan if (s := v.slope) is None else s for v in verdicts],
        consts=[v.const for v in verdicts],
        group_of=[v.code for v in verdicts],
        top_slope=[0.0, 0.0, 0.0, 0.0],
        top_const=[0.0, 0.0, 0.0, 0.0],
    )
    for i, s in enumerate(terms.slopes):
        _raise_top(terms, i, s, terms.consts[i])
    return terms


def _reterm(terms: Terms, i: int, v: Verdict) -> None:
    # candidate ``i``'s verdict is now ``v``, of the same code as before
    slope = math.nan if v.slope is None else v.slope
    const = v.const
    slopes, consts = terms.slopes, terms.consts
    before, before_const = slopes[i], consts[i]
    slopes[i] = slope
    consts[i] = const
    if before != before or before_const != before_const:
        terms.bad -= 1  # it had a bad term
    _raise_top(terms, i, slope, const)


def _raise_top(terms: Terms, i: int, slope: float, const: float) -> None:
    # count a bad term, or raise the top terms of i's group to i's (NaN is never larger)
    if slope != slope or const != const:
        terms.bad += 1
        return
    g = terms.group_of[i]
    if slope > terms.top_slope[g]:
        terms.top_slope[g] = slope
    if const > terms.top_const[g]:
        terms.top_const[g] = const


def classify(
    ctx: Context, input_tokens: int | None, blocked: Collection[str]
) -> tuple[list[float | None], list[int], list[int], list[int]]:
    """
    Each candidate's expected cost of this call, and the candidates that may be
    picked: ``(costs, eligible, explorable, probeable)`` (see `decide.select`), each
    in candidate order.

    ``blocked`` ids (an open circuit) and candidates over ``max_cost`` are in none of
    the three lists: the budget is a hard limit, for exploration too.
    """
    verdicts = ctx.verdicts
    groups = ctx.groups
    if groups is None:
        groups = ctx.groups = _groups(verdicts)
        ctx.degraded = any(v.degraded for v in verdicts)
        ctx.terms = None
    terms = ctx.terms
    if terms is None:
        terms = ctx.terms = _terms(verdicts)
    # the two lists give the same costs as the verdicts (the same operations in order)
    fast = input_tokens is not None and terms.bad == 0 and not ctx.on_prior
    costs: list[float | None]
    if input_tokens is None:
        costs = [v.const_no_input for v in verdicts]
    elif fast:
        # (one length: zip's strict=True would cost a keyword call, ~2% of a decision)
        costs = [input_tokens * s + c for s, c in zip(terms.slopes, terms.consts)]  # noqa: B905
    elif not ctx.on_prior:
        costs = [
            None if (slope := v.slope) is None else input_tokens * slope + v.const for v in verdicts
        ]
    else:  # some are costed on the stage prior's current value (NaN: none, never here)
        prior = ctx.prior_tokens if ctx.prior_tokens is not None else math.nan
        cap = ctx.cons.max_tokens
        if cap is not None and prior > cap:
            prior = cap  # the call's output stops at max_tokens
        # and at the model's longest output, which the executor asks it for no more than
        costs = [
            None
            if (slope := v.slope) is None
            else input_tokens * slope
            + (v.const if (price := v.prior_price) is None else _prior_within(prior, v) * price)
            for v in verdicts
        ]
    if input_tokens is not None and input_tokens > ctx.long_from:
        # a prompt past some candidate's long-context threshold: its costs at those prices
        costs = _long_costs(ctx, costs, input_tokens)
        fast = False
    eligible, explorable, probeable = groups
    if blocked:
        models = ctx.models
        eligible = [i for i in eligible if models[i] not in blocked]
        explorable = [i for i in explorable if models[i] not in blocked]
        probeable = [i for i in probeable if models[i] not in blocked]
    max_cost = ctx.cons.max_cost
    if max_cost is None:
        return costs, eligible[:], explorable[:], probeable[:]
    if fast:
        x: Any = input_tokens
        return (
            costs,
            _within_top(eligible, costs, max_cost, x, terms, 0),
            _within_top(explorable, costs, max_cost, x, terms, 1),
            _within_top(probeable, costs, max_cost, x, terms, 2),
        )
    return (
        costs,
        _within(eligible, costs, max_cost) if eligible else [],
        _within(explorable, costs, max_cost) if explorable else [],
        _within(probeable, costs, max_cost) if probeable else [],
    )


def _long_costs(ctx: Context, costs: list[float | None], input_tokens: int) -> list[float | None]:
    # `classify`'s costs, each candidate's input and output terms at its long-context
    # prices where the prompt is past its threshold (verdicts are costed at the standard
    # prices: see `decide.cost_factor`)
    out = costs[:]
    for i, (v, cost) in enumerate(zip(ctx.verdicts, costs, strict=True)):
        facts = v.facts
        slope = v.slope
        if cost is None or slope is None or facts is None or not input_tokens > facts.long_from:
            continue
        input_cost = input_tokens * slope
        long = input_cost * facts.long_input_ratio + (cost - input_cost) * facts.long_output_ratio
        if facts.long_input_extra or facts.long_output_extra:
            # a price that is 0 at the standard rates and not past the threshold
            out_tokens = v.tokens_out
            if v.prior_price is not None and ctx.prior_tokens is not None:
                out_tokens = _prior_within(_capped(ctx.prior_tokens, ctx.cons.max_tokens), v)
            long += facts.long_extra(input_tokens, out_tokens)
        # (NaN only from a prompt whose cost is past a float: inf - inf)
        out[i] = long if long == long else math.inf
    return out


def _within_top(
    group: list[int], costs: list[float | None], max_cost: float, x: int, terms: Terms, g: int
) -> list[int]:
    # `_within`, for group ``g``, seen at once when its top terms cost at most max_cost
    # for ``x`` input tokens (x >= 0: a cost grows with its terms, rounded or not)
    if not group:
        return []
    if x * terms.top_slope[g] + terms.top_const[g] <= max_cost:
        return group[:]
    return _within(group, costs, max_cost)


def _within(group: list[int], costs: list[float | None], max_cost: float) -> list[int]:
    # the candidates of ``group`` whose cost of this call is known and <= max_cost
    try:  # the common case first: every cost known and within (max_cost is usually loose)
        top = max(map(costs.__getitem__, group))  # type: ignore[type-var]
    except TypeError:  # a cost unknown (None)
        top = None
    if top is not None and top <= max_cost:  # False for NaN, which may hide a larger cost
        return group[:]
    return [i for i in group if (c := costs[i]) is not None and c <= max_cost]  # never NaN


def _capped(tokens: float, cap: int | None) -> float:
    # output tokens stop at max_tokens
    return tokens if cap is None or not tokens > cap else float(cap)


def _prior_within(prior: float, verdict: Verdict) -> float:
    # the stage prior's output tokens for a verdict costed on it: at most its model's
    # longest output (`ModelFacts.max_output_tokens`), as `decide._cost_terms` caps it
    facts = verdict.facts
    most = math.inf if facts is None else facts.max_output_tokens
    return most if prior > most else prior
