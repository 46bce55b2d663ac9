"""
Which models a run tries, in which order: the tier's candidates (providers without a
key left out, with the reason), the router's decision, routes whose circuit is known
open or whose rate limit is booked moved last, the higher tiers when the fallback
policy escalates.  Per-tier facts are computed once; the common case is a cached tuple.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ._request_options import capable
from ._run import _Run
from ._validators import shown, warn_caller
from .abc import Provider
from .breaker import CircuitBreaker
from .circuit import checked_key
from .exceptions import ConfigurationError, NotOpenError
from .records import CandidateEvaluation, ModelTier, RoutingDecision
from .registry import ModelInfo, ModelRegistry
from .routing._explain import annotated
from .tasks import TaskType, get_tier_for_task, is_known_task, normalize_task_type

if TYPE_CHECKING:
    from .limits.guard import Limiter

__all__ = ["TIER_ORDER"]

logger = logging.getLogger("empathy_models.executor")

_WARNED_MAX = 1024
"""The most unknown task types warned about, one warning each (then one saying so)."""

TIER_ORDER: tuple[ModelTier, ...] = (ModelTier.CHEAP, ModelTier.CAPABLE, ModelTier.PREMIUM)


def _key_hint(provider: Provider) -> str:
    """What to do about a provider without a key (its variable may be set but withheld)."""
    env_var = getattr(provider, "env_var", "") or "its API key variable"
    if getattr(provider, "env_key_withheld", False):
        # the variable is set, but sent only to the official endpoint, not to this one
        return f"{env_var} is only sent to the official endpoint; pass api_key="
    return f"set {env_var} or pass api_key="


_NO_IDS: frozenset[str] = frozenset()
_NO_ROUTER = (
    "ExecutionContext has routing constraints (max_cost / max_latency_ms / "
    "min_success_rate / max_ttft_ms) but the executor has no router to evaluate "
    "them; pass router=AdaptiveModelRouter(...)"
)

_ROUTER_CLOSED = (
    "AdaptiveModelRouter is closed (aclose() was called, or its `async with` block ended) "
    "while the executor it was given to is open: the executor can neither ask it nor "
    "teach it the outcome of this run; keep the router open while the executor uses it "
    "(`async with router, EmpathyLLMExecutor(..., router=router) as executor:`), or "
    "build a new one"
)


def _unless_closed(router: object) -> None:
    """
    Refuse a run the router is not asked for once its owner closed it, as one that asks
    it is refused (`AdaptiveModelRouter.closed`), before anything is sent: the outcome
    could not be learned.
    """
    if getattr(router, "closed", False) is True:
        raise NotOpenError(_ROUTER_CLOSED)


class _TierPlan(NamedTuple):
    """Per-tier routing facts, fixed for an executor's life."""

    same_tier: tuple[ModelInfo, ...]
    higher: tuple[ModelInfo, ...]
    hint_keys: tuple[tuple[str, str], ...] | None  # (model id, breaker key) per route
    keyless: tuple[CandidateEvaluation, ...]  # the tier's models without a key, excluded


def _order_routes(
    same_tier: Sequence[ModelInfo],
    higher: Sequence[ModelInfo],
    first: ModelInfo | None,
    open_ids: Collection[str],
) -> list[ModelInfo]:
    """``first``, then the tier cheapest first, then the higher tiers; known-open last."""

    def ordered(models: Sequence[ModelInfo]) -> list[ModelInfo]:
        if not open_ids:
            return list(models)
        return sorted(models, key=lambda m: m.id in open_ids)

    routes = ordered(same_tier)
    if first is not None:
        routes = [first, *(m for m in routes if m.id != first.id)]
    seen = {m.id for m in routes}
    routes.extend(m for m in ordered(higher) if m.id not in seen)
    return routes


class _Planner:
    """
    The executor's routing plan (see the module docstring), fixed facts computed at
    construction and per tier on first use.  ``on_hint_error(model_id)`` is called
    (inside the ``except`` block) when the breaker's ``available_hint`` fails.
    """

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        providers: dict[str, Provider],
        keyless: frozenset[str],
        router: Any,
        breaker: Any,
        limiter: Limiter | None,
        escalate: bool,
        on_hint_error: Callable[[str], None],
    ) -> None:
        self._registry = registry
        self._providers = providers
        self.keyless = keyless
        self._router = router
        self._breaker = breaker
        # a breaker whose hints are `CircuitBreaker`'s says at once when none refuses
        self._all_available: Callable[[], bool] | None = (
            getattr(breaker, "all_available_hint", None)
            if getattr(type(breaker), "available_hint", None) is CircuitBreaker.available_hint
            else None
        )
        self._limiter = limiter
        self._escalate = escalate
        self._on_hint_error = on_hint_error
        self.candidates: dict[ModelTier, tuple[ModelInfo, ...]] = {
            tier: tuple(
                m
                for m in registry.for_tier(tier)
                if m.provider in providers and m.provider not in keyless
            )
            for tier in TIER_ORDER
        }
        self._keyless_models: dict[ModelTier, tuple[ModelInfo, ...]] = {
            tier: tuple(m for m in registry.for_tier(tier) if m.provider in keyless)
            for tier in TIER_ORDER
        }
        self._keys: dict[tuple[str, str], str] = {}
        self._route_keys: dict[str, tuple[str | None, str | None]] = {}
        self._tier_plans: dict[ModelTier, _TierPlan] = {}
        self._default_routes: dict[tuple[ModelTier, str | None], tuple[ModelInfo, ...]] = {}
        self._models_by_id: dict[str, ModelInfo] = {
            m.id: m for tier in TIER_ORDER for m in self.candidates[tier]
        }
        # per tier without a model: the tier used instead, and the reason after the task
        self._tier_notes: dict[ModelTier, tuple[ModelTier, str]] = {}
        self._tasks: dict[str, tuple[str, ModelTier]] = {}
        self._warned: set[str] = set()  # the unknown task types warned about
        # unknown task types in the memo not warned about yet: a run that gives its tier
        # is not told the task's tier is used (`task`)
        self._unwarned: set[str] = set()
        self._warned_full = False  # past `_WARNED_MAX` of them: no more warnings

    def task(self, task_type: str, given: ModelTier | None = None) -> tuple[str, ModelTier]:
        """
        ``task_type``'s normalized name and tier (memoized: task names are few).  One
        not in `TaskType` is warned about (`_warn_unknown`) when its tier is used: not
        for a run whose context ``given`` a tier, for which the task type picks nothing.
        """
        known = self._tasks.get(task_type)
        if known is None:
            if len(self._tasks) > 1024:
                self._tasks.clear()
                self._unwarned.clear()
            known = (normalize_task_type(task_type) or "unknown", get_tier_for_task(task_type))
            self._tasks[task_type] = known
            if known[0] != "unknown" and not is_known_task(task_type):
                self._unwarned.add(task_type)
        if given is None and self._unwarned and task_type in self._unwarned:
            self._unwarned.discard(task_type)
            self._warn_unknown(task_type, known[1])
        return known

    def _warn_unknown(self, task_type: str, tier: ModelTier) -> None:
        """
        Warn once per name (an unknown task must not silently cost a capable model):
        for the first `_WARNED_MAX` names, then once that no more warnings come (the
        names warned about are kept apart from the `task` memo, which starts over).
        """
        warned = self._warned
        if task_type in warned or self._warned_full:
            return
        if len(warned) >= _WARNED_MAX:
            self._warned_full = True
            warned.clear()
            logger.warning(
                "more than %d task types unknown to empathy_models.tasks: no more warnings "
                "about them from this executor",
                _WARNED_MAX,
            )
            return
        warned.add(task_type)
        import difflib

        names = [t.value for t in TaskType]
        close = difflib.get_close_matches(normalize_task_type(task_type), names, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        message = (
            f"unknown task type {shown(task_type)}: using the {tier.value} tier ({guess}see "
            "empathy_models.tasks.TaskType, or pass ExecutionContext(tier=...))"
        )
        logger.warning("%s", message)
        warn_caller(message)  # the caller's code names it: seen without logging set up

    def breaker_key(self, info: ModelInfo) -> str:
        assert self._breaker is not None
        pair = (info.provider, info.id)
        key = self._keys.get(pair)
        if key is None:
            key = self._keys[pair] = self._breaker.key_for(info.provider, info.id)
        return key

    def route_keys(self, info: ModelInfo) -> tuple[str | None, str | None]:
        """
        ``info``'s breaker key and its `scope_key`, memoized per model (both None
        without a breaker or for a provider without a key: those calls are not guarded).
        """
        keys = self._route_keys.get(info.id)
        if keys is None:
            if self._breaker is None or info.provider in self.keyless:
                keys = (None, None)
            else:
                keys = (self.breaker_key(info), self.scope_key(info))
            self._route_keys[info.id] = keys
        return keys

    def provider_key(self, provider: str) -> str:
        """The breaker key of ``provider`` as a whole (no model)."""
        assert self._breaker is not None
        pair = (provider, "")
        key = self._keys.get(pair)
        if key is None:
            key = self._keys[pair] = self._breaker.key_for(provider)
        return key

    def scope_key(self, info: ModelInfo) -> str | None:
        """
        The provider-wide key also guarding ``info``'s calls, when the breaker keys calls
        per model (None when the model's key already is the provider's).
        """
        provider_key = self.provider_key(info.provider)
        return None if provider_key == self.breaker_key(info) else provider_key

    def known_open(self, models: Sequence[ModelInfo]) -> set[str]:
        if self._breaker is None:
            return set()
        out: set[str] = set()
        for m in models:
            try:
                scope = self.scope_key(m)
                if not self._breaker.available_hint(self.breaker_key(m)) or (
                    scope is not None and not self._breaker.available_hint(scope)
                ):
                    out.add(m.id)
            except Exception:
                self._on_hint_error(m.id)
        return out

    def tier_plan(self, tier: ModelTier) -> _TierPlan:
        """The per-tier facts `_plan` needs on every call, computed once."""
        plan = self._tier_plans.get(tier)
        if plan is None:
            same_tier = self.candidates[tier]
            higher: list[ModelInfo] = []
            if self._escalate:
                for t in TIER_ORDER[TIER_ORDER.index(tier) + 1 :]:
                    higher.extend(self.candidates[t])
            hint_keys: tuple[tuple[str, str], ...] | None = None
            if self._breaker is not None:
                try:
                    pairs: list[tuple[str, str]] = []
                    for m in (*same_tier, *higher):
                        pairs.append((m.id, checked_key(self.breaker_key(m))))
                        scope = self.scope_key(m)
                        if scope is not None:
                            pairs.append((m.id, checked_key(scope)))
                    hint_keys = tuple(pairs)
                except Exception:
                    hint_keys = None  # `_known_open` reports the failure on every call
            keyless = tuple(
                CandidateEvaluation(
                    model=m.id,
                    provider=m.provider,
                    tier=m.tier,
                    excluded=True,
                    reasons=(
                        f"no API key for {m.provider} ({_key_hint(self._providers[m.provider])})",
                    ),
                )
                for m in self._keyless_models[tier]
            )
            plan = _TierPlan(same_tier, tuple(higher), hint_keys, keyless)
            self._tier_plans[tier] = plan
        return plan

    def substitute_tier(self, tier: ModelTier, task_type: str) -> tuple[ModelTier, str]:
        """
        The tier to use when the task's ``tier`` has no routable model, and why.

        More capable tiers first (capable -> premium), then the nearest less capable
        one; `ConfigurationError` when no tier has a model.  The reason names the run's
        ``task_type``; logged once per tier (naming the first task that needed it).
        """
        known = self._tier_notes.get(tier)
        if known is not None:
            other, rest = known
            return other, f"task {task_type!r} {rest}"
        index = TIER_ORDER.index(tier)
        order = [*TIER_ORDER[index + 1 :], *reversed(TIER_ORDER[:index])]
        for other in order:
            if self.candidates[other]:
                rest = (
                    f"asks for the {tier.value} tier, which has no model "
                    f"{self.served_by()}; using the {other.value} tier instead "
                    "(pass ExecutionContext(tier=...), task_type=... or model=... to choose)"
                )
                note = f"task {task_type!r} {rest}"
                logger.warning("%s", note)
                self._tier_notes[tier] = (other, rest)
                return other, note
        raise ConfigurationError(self.no_model_message(tier, explicit=False))

    def served_by(self) -> str:
        keyed = sorted(set(self._providers) - self.keyless)
        return (
            f"served by a configured provider with an API key ({', '.join(keyed)})"
            if keyed
            else "served by a configured provider with an API key (none has one)"
        )

    def no_model_message(self, tier: ModelTier, *, explicit: bool) -> str:
        parts = [
            f"no {tier.value} model in the registry (price table "
            f"{self._registry.price_version}) is {self.served_by()}"
        ]
        if self.keyless:
            parts.append(
                "no API key for "
                + ", ".join(
                    f"{name} ({_key_hint(self._providers[name])})" for name in sorted(self.keyless)
                )
            )
        usable = [t for t in TIER_ORDER if self.candidates[t]]
        if usable:
            example = self.candidates[usable[0]][0].id
            parts.append(
                "pass ExecutionContext(tier=...) with one of "
                f"{', '.join(t.value for t in usable)}, "
                f"a task_type= of such a tier, or model=... (for example model={example!r})"
            )
        elif not explicit:
            parts.append("no tier has one")
        return "; ".join(parts)

    def open_ids(self, plan: _TierPlan) -> Collection[str]:
        """Ids of the tier's routes whose breaker is known to be open (often none)."""
        if self._breaker is None:
            return _NO_IDS
        keys = plan.hint_keys
        if keys is None:
            return self.known_open([*plan.same_tier, *plan.higher])
        if self._all_available is not None and self._all_available():
            return _NO_IDS  # the keys were checked when the plan was made
        hint = self._breaker.available_hint
        out: set[str] | None = None
        for model_id, key in keys:
            try:
                available = hint(key)
            except Exception:
                self._on_hint_error(model_id)
                continue
            if not available:
                if out is None:
                    out = set()
                out.add(model_id)
        return _NO_IDS if out is None else out

    def plan(
        self, run: _Run, task_tier: ModelTier, needs: frozenset[str] = frozenset()
    ) -> tuple[list[ModelInfo], RoutingDecision | None]:
        """
        The routes ``run`` tries, in order (``needs``: what a model must support), and the
        router's decision (None when it was not asked), made with the request's input
        estimate (`_Run.estimate`, which the budgets and rate limits read after it) and
        the output cap it sends (`_Run.routed_cap`: ``extra_body``'s, when larger).
        """
        context = run.context
        pinned = None if context.model is None else self.pinned(context.model, needs)
        if context.tier is not None:
            tier = context.tier
        elif pinned is not None:
            tier = pinned.tier
        else:
            tier = task_tier
        plan = self.tier_plan(tier)
        substituted: str | None = None
        if not plan.same_tier and pinned is None:
            if context.tier is not None:
                raise ConfigurationError(self.no_model_message(tier, explicit=True))
            # the tier came from the task: another tier serves rather than every run failing
            tier, substituted = self.substitute_tier(tier, context.task_type)
            plan = self.tier_plan(tier)
        if needs:
            plan = self.capable_plan(plan, needs, tier)
        same_tier = plan.same_tier
        open_ids = self.open_ids(plan)
        if self._limiter is not None:
            # routes whose rate limit is booked beyond the wait allowed: avoided like open ones
            busy = self._limiter.saturated((*same_tier, *plan.higher))
            if busy:
                open_ids = {*open_ids, *busy}

        decision: RoutingDecision | None = None
        first: ModelInfo | None = pinned
        all_open = all(m.id in open_ids for m in same_tier) if open_ids else not same_tier
        if first is None and self._router is not None and not all_open:
            extra: dict[str, Any] = {}
            if context.on_no_match is not None:
                extra["on_no_match"] = context.on_no_match
            if context.max_ttft_ms is not None:
                extra["max_ttft_ms"] = context.max_ttft_ms
            decision = self._router.get_best_model(
                context.workflow,
                context.stage,
                candidates=[m.id for m in same_tier],
                input_tokens=run.estimate(),
                max_tokens=run.routed_cap(same_tier),
                max_cost=context.max_cost,
                max_latency_ms=context.max_latency_ms,
                min_success_rate=context.min_success_rate,
                unavailable=(
                    frozenset(m.id for m in same_tier if m.id in open_ids) if open_ids else _NO_IDS
                ),
                **extra,
            )
            if plan.keyless or substituted is not None:
                decision = annotated(decision, plan.keyless, substituted)
            first = self._models_by_id.get(decision.model) or self._registry.get(decision.model)
            if first.provider not in self._providers:
                raise ConfigurationError(
                    f"the router chose {first.id!r}, served by {first.provider!r}, which is "
                    "not configured"
                )
        elif first is None and self._router is None and context.has_constraints:
            raise ConfigurationError(_NO_ROUTER)
        elif self._router is not None:
            _unless_closed(self._router)  # not asked: a model pinned, every circuit open
        if not open_ids and not needs:
            # the common case: the registry's order, computed once per (tier, first route)
            cache_key = (tier, None if first is None else first.id)
            cached = self._default_routes.get(cache_key)
            if cached is None:
                cached = self._default_routes[cache_key] = tuple(
                    _order_routes(same_tier, plan.higher, first, _NO_IDS)
                )
            return list(cached), decision
        return _order_routes(same_tier, plan.higher, first, open_ids), decision

    def pinned(self, model: str, needs: frozenset[str]) -> ModelInfo:
        """
        The model ``ExecutionContext.model`` pins.

        Raises:
            ConfigurationError: it cannot serve ``needs``, or its provider is not
                configured (`ModelNotFoundError` when the registry does not know it).
        """
        pinned = self._registry.get(model)
        if not needs <= pinned.capabilities:
            raise ConfigurationError(
                f"ExecutionContext.model={model!r} cannot serve this request: no "
                f"{', '.join(sorted(needs - pinned.capabilities))} support (registry "
                "capabilities)"
            )
        if pinned.provider not in self._providers:
            raise ConfigurationError(
                f"ExecutionContext.model={model!r} is served by "
                f"{pinned.provider!r}, which is not configured "
                f"(configured: {', '.join(sorted(self._providers))})"
            )
        return pinned

    def capable_plan(self, plan: _TierPlan, needs: frozenset[str], tier: ModelTier) -> _TierPlan:
        """``plan`` without the models that cannot serve ``needs`` (listed as excluded)."""
        same_tier, unfit = capable(plan.same_tier, needs)
        higher, _ = capable(plan.higher, needs)
        if not same_tier and not higher:
            raise ConfigurationError(
                f"no configured model of tier {tier.value!r} or above can serve this request "
                f"(it needs {', '.join(sorted(needs))} support; see ModelInfo.capabilities)"
            )
        if not same_tier:  # the tier cannot: the next capable tier serves
            same_tier, higher = higher, ()
        return plan._replace(same_tier=same_tier, higher=higher, keyless=plan.keyless + unfit)
