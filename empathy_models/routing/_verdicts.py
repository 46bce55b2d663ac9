"""
The verdict cache behind every decision: one `Context` per (workflow, stage,
candidate list, constraints), whose verdicts are recomputed only for arms whose
evidence changed since they were judged, so a decision costs O(candidates) with a
small constant.  Pure: reads the in-memory evidence only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Final

from ..exceptions import ConfigurationError
from ..registry import ModelRegistry
from ._memory import EvidenceMemory
from .book import StagePrior
from .decide import EMPTY_SUMMARY, Context, ModelFacts, Verdict, judge
from .policy import Constraints, RoutingPolicy

__all__ = ["Limits", "VerdictCache", "classify", "limits_of"]

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
        versions = ctx.arm_versions
        stale_prior = pv != ctx.prior_version and ctx.on_prior
        verdicts = ctx.verdicts
        for i, arm in enumerate(ctx.arms):
            version = arm.version if arm is not None else -1
            if version != versions[i] or (
                stale_prior and verdicts[i].summary.mean_output_tokens is None
            ):
                old = verdicts[i]
                new = verdicts[i] = self.judge(ctx, i, prior)
                ctx.caches[i] = {}
                versions[i] = version
                if (new.summary.change is None) != (old.summary.change is None):
                    ctx.changed = tuple(j for j, v in enumerate(verdicts) if v.summary.change)
                if (new.summary.mean_output_tokens is None) != (
                    old.summary.mean_output_tokens is None
                ):
                    # verdicts of arms without output tokens of their own use the prior
                    ctx.on_prior = any(v.summary.mean_output_tokens is None for v in verdicts)
        ctx.prior_version = pv
        return ctx

    def _attach(self, ctx: Context, workflow: str | None, stage: str | None) -> None:
        # (re)read the context's arms after arms were added; judge them the first time
        memory = self.memory
        arms = memory.arms
        ctx.arms = [arms.get((workflow, stage, m)) for m in ctx.models]
        ctx.arms_epoch = memory.epoch
        if not ctx.verdicts:
            ctx.verdicts = [self.judge(ctx, i, None) for i in range(len(ctx.models))]
            ctx.caches = [{} for _ in ctx.models]
            ctx.arm_versions = [-1] * len(ctx.models)
            ctx.on_prior = True
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
        was = False
        if ctx.verdicts:
            old = ctx.verdicts[i]
            was = old.success is not None and old.code == 0 and old.summary.since == summary.since
        return judge(
            ctx.models[i],
            ctx.facts[i],
            summary,
            ctx.cons,
            policy,
            was_eligible=was,
            prior_output_tokens=prior.mean() if prior is not None else None,
        )


def classify(
    ctx: Context, input_tokens: int | None, blocked: Collection[str]
) -> tuple[list[float | None], list[int], list[int], list[int]]:
    """
    Each candidate's expected cost of this call, and the candidates that may be
    picked: ``(costs, eligible, explorable, probeable)`` (see `decide.select`).

    ``blocked`` ids (an open circuit) and candidates over ``max_cost`` are in none of
    the three lists: the budget is a hard limit, for exploration too.
    """
    costs: list[float | None] = []
    eligible: list[int] = []
    explorable: list[int] = []
    probeable: list[int] = []
    max_cost = ctx.cons.max_cost
    for i, v in enumerate(ctx.verdicts):
        if input_tokens is None:
            cost = v.const_no_input
        else:
            slope = v.slope
            cost = None if slope is None else input_tokens * slope + v.const
        costs.append(cost)
        code = v.code
        if code == 3 or (blocked and v.model in blocked):
            continue
        if max_cost is not None and (cost is None or cost > max_cost):
            continue
        if code == 0:
            eligible.append(i)
        elif code == 1:
            explorable.append(i)
        else:
            probeable.append(i)
    return costs, eligible, explorable, probeable
