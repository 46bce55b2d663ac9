"""
`AdaptiveModelRouter`: picks a model per (workflow, stage) from recorded outcomes.

The router keeps, in memory, decayed statistics per arm (one model serving one
workflow stage).  They are seeded from the telemetry backend's aggregates when the
router starts (``async with router:``, one ``aggregate`` call for every arm), refreshed
on an interval so that processes sharing a store learn from each other, and updated in
O(1) by `AdaptiveModelRouter.record_outcome`, which the executor calls for every
attempt.  A decision (`AdaptiveModelRouter.get_best_model`) reads only those in-memory
summaries: it costs O(number of candidates) and never touches the backend or history.
Per candidate list, each candidate's verdict (success-rate and latency status, cost
terms) is kept between decisions and recomputed only for arms whose evidence changed,
and a decision's ``candidates`` are built when first read; both give exactly what
evaluating every candidate afresh gives (tests/test_router_fastpath.py holds them to it).

How a decision is made is described in `empathy_models.scoring`: each constraint is
ELIGIBLE, REJECTED or UNPROVEN for each candidate (Wilson bounds for the success rate,
a log-normal bound for p95 latency, an expected or worst-case cost); among candidates
that confidently meet every constraint the cheapest wins; unproven candidates within
the cost limit get a small exploration share.  When nothing qualifies, the caller's
``on_no_match`` policy acts and the decision says so; nothing falls back silently.

**Seeded and live evidence are never counted twice.**  A refresh at time ``T`` asks the
backend for the window ending at ``T`` (``until=T``) and *replaces* each arm's seeded
base with the answer; live updates are kept only for records timestamped at or after
``T``.  A record timestamped before the last refresh that is reported afterwards is not
added (the backend holds it, or will, and the next refresh brings it in).  Give the
router the same telemetry backend the executor records to, and a ``clock`` on the same
time base as the records' timestamps (UTC epoch seconds; `time.time` by default).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Final, Self, TypeVar

import attrs
from attrs import define, field, frozen

from .abc import TelemetryBackend
from .exceptions import ConfigurationError, NoModelMeetsConstraintsError
from .records import (
    CandidateEvaluation,
    ConstraintStatus,
    LLMCallRecord,
    ModelPerformance,
    ModelTier,
    Outcome,
    RoutingDecision,
)
from .registry import ModelRegistry
from .scoring import (
    COST,
    LATENCY,
    SUCCESS,
    ArmAccumulator,
    ArmSummary,
    Evaluation,
    Objective,
    Pick,
    _add_outcome,
    _expected_cost,
    _judge,
    _positional_constructor,
    _select,
    _summarize,
    choose,
    evaluate,
    summarize,
    wilson_bounds,
)

__all__ = ["AdaptiveModelRouter", "RoutingPolicy", "TierRecommendation"]

logger = logging.getLogger("empathy_models.router")

_CONSTRAINTS: Final = (SUCCESS, LATENCY, COST)
_TIER_ORDER: Final = (ModelTier.CHEAP, ModelTier.CAPABLE, ModelTier.PREMIUM)


# --------------------------------------------------------------------------- policy


def _number(
    low: float, *, strict: bool, high: float | None = None, optional: bool = False
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """An attrs validator: a finite real number above ``low`` (and at most ``high``)."""
    bound = f"> {low:g}" if strict else f">= {low:g}"
    if high is not None:
        bound += f" and <= {high:g}"

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and optional:
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or (value <= low if strict else value < low)
            or (high is not None and value > high)
        ):
            raise ConfigurationError(
                f"{attribute.name} must be a finite number {bound}, got {value!r}"
            )

    return check


_check_unit = _number(0.0, strict=False, high=1.0)
_check_unit_opt = _number(0.0, strict=False, high=1.0, optional=True)
_check_positive = _number(0.0, strict=True)
_check_positive_opt = _number(0.0, strict=True, optional=True)
_check_non_negative = _number(0.0, strict=False)


def _check_objective(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in ("cheapest", "most_reliable"):
        raise ConfigurationError(
            f"{attribute.name} must be 'cheapest' or 'most_reliable', got {value!r}"
        )


def _check_relax_order(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, tuple)
        or len(set(value)) != len(value)
        or any(c not in _CONSTRAINTS for c in value)
    ):
        raise ConfigurationError(
            f"{attribute.name} must be distinct names among {', '.join(_CONSTRAINTS)}, "
            f"got {value!r}"
        )


def _to_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


@frozen(kw_only=True)
class RoutingPolicy:
    """
    How the router weighs evidence and what it does when nothing qualifies.

    * ``explore_rate``: share of decisions (0..1, default 0.05) given to an unproven
      candidate that fits the cost limit, when some candidate is already eligible.
    * ``half_life_calls``: an arm's evidence halves every this many of its own calls
      (default 500, so an arm never holds much more than ~720 calls' weight).  This is
      what bounds how many calls a regressed model keeps its traffic: a model at 99%
      that starts failing one call in two loses a 0.95 gate after ~50 of its calls.
      ``None``: all calls weigh alike, and a long history hides a regression.
    * ``half_life_s``: seconds after which an observation weighs half (default one day;
      ``None``: never).  Lets evidence about idle models fade, so a rejected model gets
      a new trial eventually.  Keep it long: with a short one, models that get only
      exploration traffic can never accumulate enough evidence to be proven (see
      `empathy_models.scoring`).
    * ``window_days``: how much history the seeding and refresh read (default 7).
    * ``default_min_success_rate``: the success-rate floor used when a decision gives
      none (default 0.8, the original's default); ``None`` for no floor.
    * ``objective``: ``"cheapest"`` (default) or ``"most_reliable"`` among eligible
      candidates (see `empathy_models.scoring`).
    * ``relax_order``: the order ``on_no_match="relax"`` drops constraints in (default
      latency, then success rate, then cost last because it is a budget); a constraint
      left out of it is never relaxed.
    * ``cost_tie_tolerance``: relative cost difference treated as a tie (default 5%).
    * ``latency_min_samples``: measured successful calls needed before the latency
      constraint can be judged (default 5).
    * ``reject_min_samples``: effective calls needed before a success rate can be
      REJECTED (default 10), so one unlucky first call does not write a model off.
    * ``inconclusive_n``: effective calls after which an arm that is still unproven
      (its true rate sits right at the limit) stops being preferred when nothing is
      eligible (default 400).
    * ``z``: the normal quantile of the confidence bounds (default 1.96, i.e. 95%).
    * ``reject_z``: the quantile a success rate must clear to be REJECTED (default 3.0):
      stricter than ``z`` because a rejected model gets no traffic at all.
    * ``prior_alpha`` / ``prior_beta``: Beta prior of the Thompson draws (they never
      count toward the eligibility gate).
    * ``seed_stage_limit``: how many workflow stages get their recent-outcome window
      (used by `AdaptiveModelRouter.recommend_tier_upgrade`) filled from the backend at
      start, one small ``recent`` query each (default 1000; 0 disables).

    Invalid values raise `ConfigurationError` naming the field.
    """

    explore_rate: float = field(default=0.05, validator=_check_unit)
    half_life_calls: float | None = field(default=500.0, validator=_check_positive_opt)
    half_life_s: float | None = field(default=86400.0, validator=_check_positive_opt)
    window_days: float = field(default=7.0, validator=_check_positive)
    default_min_success_rate: float | None = field(default=0.8, validator=_check_unit_opt)
    objective: Objective = field(default="cheapest", validator=_check_objective)
    relax_order: tuple[str, ...] = field(
        default=(LATENCY, SUCCESS, COST), converter=_to_tuple, validator=_check_relax_order
    )
    cost_tie_tolerance: float = field(default=0.05, validator=_check_non_negative)
    latency_min_samples: int = field(default=5, validator=_check_positive)
    inconclusive_n: float = field(default=400.0, validator=_check_positive)
    reject_min_samples: float = field(default=10.0, validator=_check_positive)
    reject_z: float = field(default=3.0, validator=_check_positive)
    z: float = field(default=1.96, validator=_check_positive)
    prior_alpha: float = field(default=1.0, validator=_check_positive)
    prior_beta: float = field(default=1.0, validator=_check_positive)
    seed_stage_limit: int = field(default=1000, validator=_check_non_negative)


@frozen(kw_only=True)
class TierRecommendation:
    """
    Whether a workflow stage should move to a more capable tier, and why.

    ``failure_rate`` is over the ``window`` most recent sample outcomes of the stage
    (every model that served it; ``failures`` of them failed, ``by_model`` splits them
    per model as ``(failures, calls)``).  ``current_tiers`` are the tiers that served
    those calls; ``suggested_tier`` is the next tier above the highest of them (``None``
    when already at the top or when no upgrade is advised).  Unpacks like the original's
    ``(should_upgrade, reason)`` tuple.
    """

    workflow: str
    stage: str | None
    should_upgrade: bool
    reason: str
    failure_rate: float | None
    failures: int
    window: int
    current_tiers: tuple[ModelTier, ...] = ()
    suggested_tier: ModelTier | None = None
    by_model: Mapping[str, tuple[int, int]] = field(factory=dict)

    def __iter__(self) -> Iterator[object]:
        return iter((self.should_upgrade, self.reason))


# --------------------------------------------------------------------------- internals


@define(slots=True)
class _Arm:
    base: ArmAccumulator | None
    live: ArmAccumulator
    next_live: ArmAccumulator | None = None
    summary: ArmSummary | None = None
    dirty: bool = True


@frozen(slots=True)
class _ModelFacts:
    provider: str
    tier: ModelTier
    input_price: float  # USD per token
    output_price: float
    max_output_tokens: int


_Ring = deque[tuple[str, ModelTier | None, bool]]

_NOT_IN_REGISTRY: Final = "not in the model registry"
_CIRCUIT_OPEN: Final = "circuit open"


def _key(workflow: str | None, stage: str | None) -> tuple[str, str]:
    return (workflow or "", stage or "")


_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)


def _window_start(now: float, days: float) -> datetime:
    """``now`` (epoch seconds) less ``days``; the earliest datetime when that is before it."""
    try:
        return datetime.fromtimestamp(now - days * 86400.0, UTC)
    except (OverflowError, ValueError, OSError):
        return _EARLIEST


def _opt_number(name: str, value: object, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigurationError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _positive_number(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _opt_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be an integer >= 0, got {value!r}")
    return value


_T = TypeVar("_T")


_Setter = Callable[[Any, Any], None]


def _field_defaults(cls: type) -> tuple[tuple[_Setter, str, Any, bool], ...]:
    out = []
    for f in attrs.fields(cls):
        is_factory = isinstance(f.default, attrs.Factory)  # type: ignore[arg-type]
        out.append((cls.__dict__[f.name].__set__, f.name, f.default, is_factory))
    return tuple(out)


def _trusted(
    cls: type[_T], fields: tuple[tuple[_Setter, str, Any, bool], ...], **values: Any
) -> _T:
    """
    Build a frozen slotted record from values this module produced, skipping validators.

    A decision builds one `CandidateEvaluation` per candidate; through ``__init__``
    (converters and validators) that is ~12 us each on the reference machine, which
    would dominate a decision (this path: ~4.6 us).  Every value passed here is already
    of the field's converted type and within its bounds (Wilson bounds clipped to
    [0, 1], counts and latencies >= 0, mappings frozen), and fields not passed get their
    declared defaults, so the object is the one ``__init__`` would build.
    """
    obj = object.__new__(cls)
    for setter, name, default, is_factory in fields:
        if name in values:
            setter(obj, values[name])
        else:
            setter(obj, default.factory() if is_factory else default)
    return obj


_CANDIDATE_FIELDS: Final = _field_defaults(CandidateEvaluation)
_DECISION_FIELDS: Final = _field_defaults(RoutingDecision)

if tuple(f.name for f in attrs.fields(RoutingDecision)) != (
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
    "_candidates_thunk",
):  # pragma: no cover - guards _fast_decision's argument order against field changes
    raise TypeError("RoutingDecision's fields changed: update router._decide_fast")
# every field but candidates, positionally in the order above (candidates is left unset
# and built on first read through _candidates_thunk)
_fast_decision: Final = _positional_constructor(RoutingDecision, skip=("candidates",))

_STATUS_CODE: Final = {
    ConstraintStatus.ELIGIBLE: 0,
    ConstraintStatus.UNPROVEN: 1,
    ConstraintStatus.REJECTED: 2,
}
_MAX_CONTEXTS: Final = 1024
_NO_MODELS: Final[frozenset[str]] = frozenset()
_INF: Final = math.inf


@define(slots=True, eq=False)
class _Context:
    """
    Cached per-candidate verdicts of one (workflow, stage, candidate list).

    Slot ``i`` holds, for the summary ``sums[i]`` of candidate ``i``'s arm and the
    constraint settings ``limits``, ``slots[i] = (slope, const, code)``: its cost for
    this call is ``input_tokens * slope + const`` (``slope`` None: ``const``, itself
    None when there is no estimate) and ``code`` is the worst status of its
    success-rate and latency constraints (0 eligible, 1 unproven, 2 rejected or not in
    the registry).  Slots are recomputed with `judge` and `expected_cost` when their
    arm's summary changes, so the cache is only a memo of those functions.

    Which arms may have changed comes from the router's change log (``log_pos``: how
    far this context has read it); every ``sums[i].computed_at`` lies in ``[lo, hi]``,
    so while ``now`` stays within the summaries' time tolerance of both no summary can
    have aged out without the log saying so.
    """

    arms_epoch: int
    models: tuple[str, ...]
    arms: list[_Arm | None]
    facts: list[_ModelFacts | None]
    index: dict[int, list[int]]  # id(arm) -> slots that arm backs
    limits: tuple[Any, ...] | None = None
    sums: list[ArmSummary] = attrs.Factory(list)
    slots: list[tuple[float | None, float | None, int]] = attrs.Factory(list)
    log_epoch: int = -1
    log_pos: int = 0
    lo: float = math.inf
    hi: float = -math.inf


_LOG_LIMIT: Final = 4096


def _evaluate_with(
    model: str,
    facts: _ModelFacts | None,
    summary: ArmSummary,
    policy: RoutingPolicy,
    unavailable: Collection[str],
    input_tokens: int | None,
    max_tokens: int | None,
    max_cost: float | None,
    max_latency_ms: float | None,
    min_success_rate: float | None,
    strict_cost: bool,
) -> Evaluation:
    # One candidate judged for one decision: what both decision paths report.
    excluded: str | None = None
    if model in unavailable:
        excluded = _CIRCUIT_OPEN
    elif facts is None:
        excluded = _NOT_IN_REGISTRY
    worst_out = max_tokens
    if strict_cost and worst_out is None and facts is not None:
        worst_out = facts.max_output_tokens
    return evaluate(
        model,
        summary,
        input_price=facts.input_price if facts is not None else 0.0,
        output_price=facts.output_price if facts is not None else 0.0,
        input_tokens=input_tokens,
        max_tokens=worst_out,
        max_cost=max_cost,
        max_latency_ms=max_latency_ms,
        min_success_rate=min_success_rate,
        strict_cost=strict_cost,
        latency_min_samples=float(policy.latency_min_samples),
        reject_min_samples=policy.reject_min_samples,
        excluded_reason=excluded,
    )


def _candidate_of(e: Evaluation, facts: _ModelFacts | None) -> CandidateEvaluation:
    s = e.summary
    return _trusted(
        CandidateEvaluation,
        _CANDIDATE_FIELDS,
        model=e.model,
        provider=facts.provider if facts is not None else None,
        tier=facts.tier if facts is not None else None,
        sample_size=s.sample_size,
        success_rate=s.success_rate,
        success_rate_lower=s.lower,
        success_rate_upper=s.upper,
        latency_p50_ms=s.p50,
        latency_p95_ms=s.p95,
        expected_cost_usd=e.cost,
        constraints=MappingProxyType(e.constraints),
        excluded=e.excluded,
        reasons=e.reasons,
        effective_sample_size=s.effective_n,
        latency_p95_upper_ms=s.p95_upper,
        cost_basis=e.cost_basis,
    )


def _materialize(
    models: Sequence[str],
    facts: Sequence[_ModelFacts | None],
    sums: Sequence[ArmSummary],
    policy: RoutingPolicy,
    blocked: frozenset[str],
    input_tokens: int | None,
    max_tokens: int | None,
    max_cost: float | None,
    max_latency_ms: float | None,
    min_success_rate: float | None,
    strict_cost: bool,
) -> tuple[CandidateEvaluation, ...]:
    # A fast decision's candidates, evaluated as the reference path evaluates them.  It
    # holds no reference to the router, so a kept decision does not keep the router.
    return tuple(
        _candidate_of(
            _evaluate_with(
                model,
                f,
                summary,
                policy,
                blocked,
                input_tokens,
                max_tokens,
                max_cost,
                max_latency_ms,
                min_success_rate,
                strict_cost,
            ),
            f,
        )
        for model, f, summary in zip(models, facts, sums, strict=True)
    )


# --------------------------------------------------------------------------- router


class AdaptiveModelRouter:
    """
    Chooses the model for each call from in-memory, decayed per-arm statistics.

    ``registry`` defaults to `ModelRegistry.default`, as the executor's does.
    ``telemetry_store`` is a `TelemetryBackend` or a URL (``"sqlite:///calls.db"``); a
    URL's backend is owned and closed by the router.  Without one (or with the null
    backend) the router learns only from `record_outcome`, and `get_routing_stats` says
    so.  ``refresh_interval`` (seconds, default 60; ``None`` disables) is how often the
    started router re-reads the backend's aggregates.  ``rng`` or ``seed`` makes every
    random choice reproducible; ``clock`` returns UTC epoch seconds, and ``sleep``
    waits between refreshes (tests pass `FakeClock.sleep` so no real time passes).

    Lifecycle: ``async with router:`` seeds the statistics (one ``aggregate`` call for
    every arm, then one small ``recent`` call per workflow stage for the windows of
    `recommend_tier_upgrade`) and starts the periodic refresh, a task owned by the
    router and cancelled and awaited by `aclose`.  A backend error while seeding or refreshing is
    logged and counted in `refresh_errors`; it never fails a decision.

    Concurrency: the synchronous methods (`record_outcome`, `get_best_model`,
    `recommend_tier_upgrade`) must be called from the event loop's thread; they never
    await, so each is atomic with respect to other tasks.  The router is not thread-safe.
    """

    MIN_SAMPLE_SIZE: ClassVar[int] = 10
    """Fewest recent calls before `recommend_tier_upgrade` judges a stage."""
    FAILURE_RATE_THRESHOLD: ClassVar[float] = 0.2
    """A recent failure rate strictly above this advises an upgrade."""
    RECENT_WINDOW_SIZE: ClassVar[int] = 20
    """How many recent calls per stage `recommend_tier_upgrade` looks at."""

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        telemetry_store: TelemetryBackend | str | None = None,
        *,
        policy: RoutingPolicy | None = None,
        refresh_interval: float | None = 60.0,
        rng: random.Random | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        registry = ModelRegistry.default() if registry is None else registry
        if not isinstance(registry, ModelRegistry):
            raise ConfigurationError(
                f"registry must be a ModelRegistry, got {type(registry).__name__}"
            )
        if rng is not None and seed is not None:
            raise ConfigurationError("pass rng or seed, not both")
        if refresh_interval is not None:
            _positive_number("refresh_interval", refresh_interval)
        self.registry = registry
        self.policy = policy if policy is not None else RoutingPolicy()
        if not isinstance(self.policy, RoutingPolicy):
            raise ConfigurationError(f"policy must be a RoutingPolicy, got {policy!r}")
        self.refresh_interval = refresh_interval
        self._rng = rng if rng is not None else random.Random(seed)
        self._clock = clock
        self._sleep = sleep
        self._owns_store = False
        store: TelemetryBackend | None
        if isinstance(telemetry_store, str):
            from .backends import telemetry_from_url

            store = telemetry_from_url(telemetry_store)
            self._owns_store = True
        elif telemetry_store is None or isinstance(telemetry_store, TelemetryBackend):
            store = telemetry_store
        else:
            raise ConfigurationError(
                "telemetry_store must be a TelemetryBackend, a URL string or None, "
                f"got {type(telemetry_store).__name__}"
            )
        from .backends.null import NullTelemetryBackend

        self._null_store = isinstance(store, NullTelemetryBackend)
        self._store_obj = store
        self._store: TelemetryBackend | None = None if self._null_store else store
        self._arms: dict[tuple[str, str, str], _Arm] = {}
        self._arms_epoch = 0  # bumped whenever an arm is added to _arms
        # arms whose summary went stale or was replaced, in order (see _Context)
        self._log: list[_Arm] = []
        self._log_epoch = 0  # bumped when the log is cleared: every context rescans
        self._contexts: dict[tuple[str, str, tuple[str, ...]], _Context] = {}
        self._fast = True  # False: every decision takes the reference path (tests)
        self._rings: dict[tuple[str, str | None], deque[tuple[str, ModelTier | None, bool]]] = {}
        # (workflow, stage) -> (its ring, its workflow's ring); cleared when rings are replaced
        self._ring_pairs: dict[tuple[str, str], tuple[_Ring, _Ring]] = {}
        self._facts: dict[str, _ModelFacts | None] = {}
        self._cutoff: float | None = None
        self._pending_cutoff: float | None = None
        self._ring_cutoff: float | None = None
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._warned_not_started = False
        self._unproven_logged: set[tuple[str, str | None]] = set()
        self._empty = summarize((), now=0.0, half_life=None, z=self.policy.z)
        self.refresh_errors = 0
        """How many seeding or refresh reads of the backend failed."""
        self.last_refresh: float | None = None
        """Epoch seconds of the last successful refresh (``None``: never)."""

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **options: Any) -> Self:
        """
        A router over ``empathy.toml``'s registry and telemetry database (found as
        `empathy_models.config.find_config_file` says; see `EmpathyLLMExecutor.from_config`).
        The router owns the backend it opens; ``options`` go to the constructor.
        """
        from .config import EmpathyConfig

        config = EmpathyConfig.load(path)
        return cls(config.registry(), config.telemetry_url, **options)

    def __repr__(self) -> str:
        return (
            f"AdaptiveModelRouter(arms={len(self._arms)}, store={self._store_obj!r}, "
            f"started={self._started})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """
        Seed from the backend and start the periodic refresh; idempotent.

        Raises `ConfigurationError` after `aclose`.  Backend errors are logged, not raised.
        """
        if self._closed:
            raise ConfigurationError("AdaptiveModelRouter was used after aclose()")
        if self._started:
            return
        self._started = True
        if self._owns_store and self._store_obj is not None:
            await self._store_obj.__aenter__()
        if self._store is None:
            logger.info(
                "router started without a telemetry store: routing uses only outcomes "
                "reported to this process"
            )
            return
        await self.refresh()
        await self._seed_rings()
        if self.refresh_interval is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_loop(self.refresh_interval), name="empathy-models-router-refresh"
            )

    async def aclose(self) -> None:
        """Stop the refresh task (cancelled and awaited) and close an owned store."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
        finally:
            if self._owns_store and self._store_obj is not None:
                await self._store_obj.aclose()

    async def _refresh_loop(self, interval: float) -> None:
        while True:
            await self._sleep(interval)
            try:
                await self.refresh()
            except Exception:  # refresh handles backend errors; this keeps the loop alive
                self.refresh_errors += 1
                logger.exception("router refresh failed unexpectedly")

    async def refresh(self) -> bool:
        """
        Replace the seeded evidence with the backend's current aggregates.

        The backend is flushed (so records this process handed to a batching backend
        are visible), then one ``aggregate`` call covers every (workflow, stage, model).
        Live updates for records timestamped at or after the refresh are kept; older
        ones are now in the seeded base (see the module docstring).  Returns ``True`` on
        success; on a backend error logs a warning, counts it in `refresh_errors`, keeps
        the previous evidence and returns ``False``.  Concurrent calls are serialized.
        """
        store = self._store
        if store is None:
            return False
        async with self._refresh_lock:
            cutoff = self._clock()
            half_life = self.policy.half_life_s
            self._pending_cutoff = cutoff
            for arm in self._arms.values():
                arm.next_live = ArmAccumulator(t=cutoff)
            try:
                # records this process handed to a batching backend become visible first
                await store.flush()
                perfs = await store.aggregate(
                    since=_window_start(cutoff, self.policy.window_days),
                    until=datetime.fromtimestamp(cutoff, UTC),
                )
            except Exception as exc:
                self.refresh_errors += 1
                logger.warning(
                    "router refresh from %r failed (%s: %s); keeping the previous statistics",
                    store,
                    type(exc).__name__,
                    exc,
                )
                for arm in self._arms.values():
                    arm.next_live = None
                return False
            finally:
                self._pending_cutoff = None
            bases: dict[tuple[str, str, str], ArmAccumulator] = {}
            for perf in perfs:
                key = (perf.workflow or "", perf.stage or "", perf.model)
                bases[key] = ArmAccumulator.from_performance(perf, now=cutoff, half_life=half_life)
            for key, arm in self._arms.items():
                arm.base = bases.pop(key, None)
                arm.live = arm.next_live if arm.next_live is not None else ArmAccumulator(t=cutoff)
                arm.next_live = None
                arm.dirty = True
            for key, base in bases.items():
                self._arms[key] = _Arm(base=base, live=ArmAccumulator(t=cutoff))
            if bases:
                self._arms_epoch += 1
            self._log.clear()
            self._log_epoch += 1
            self._cutoff = cutoff
            self.last_refresh = cutoff
            logger.debug("router refreshed %d arms from %r", len(perfs), store)
            return True

    async def _seed_rings(self) -> None:
        # One ``recent`` call per workflow stage seen in the seeding aggregate (and one per
        # workflow for ``stage=None``), so a low-traffic stage is not starved by a busy
        # one as with the original's global 10,000-entry fetch.  At start only.
        store = self._store
        limit = self.policy.seed_stage_limit
        if store is None or limit == 0:
            return
        now = self._clock()
        since = _window_start(now, self.policy.window_days)
        stages = sorted({(wf, st) for wf, st, _ in self._arms if wf and st})[:limit]
        targets: list[tuple[str, str | None]] = [*stages, *sorted({(wf, None) for wf, _ in stages})]
        size = self.RECENT_WINDOW_SIZE
        for workflow, stage in targets:
            try:
                records = await store.recent(
                    limit=size, workflow=workflow, stage=stage, since=since
                )
            except Exception as exc:
                self.refresh_errors += 1
                logger.warning(
                    "router could not read recent calls from %r (%s: %s)",
                    store,
                    type(exc).__name__,
                    exc,
                )
                return
            items = [
                self._ring_item(r)
                for r in sorted(records, key=lambda r: r.timestamp)
                if r.outcome.is_sample
            ]
            # seeded outcomes are older than anything already reported live
            ring = deque(items, maxlen=size)
            ring.extend(self._ring(workflow, stage))
            self._rings[(workflow, stage)] = ring
            self._ring_pairs.clear()
        self._ring_cutoff = now

    # ------------------------------------------------------------------ learning

    def record_outcome(self, record: LLMCallRecord) -> None:
        """
        Learn from one attempt, in O(1) and without I/O.

        Only sample outcomes count (success, failure, rate_limited, fatal); ignored,
        cancelled and rejected attempts are dropped.  A record timestamped before the
        last refresh is not added to the statistics (the backend already holds it).
        The observation's weight ages from the router's ``clock`` at the time of the
        report.
        """
        outcome = record.outcome
        if not outcome.is_sample:
            return
        ts = record.timestamp.timestamp()
        workflow = record.workflow or ""
        stage = record.stage or ""
        model = record.model
        if self._ring_cutoff is None or ts >= self._ring_cutoff:
            tier = record.tier
            if tier is None:
                facts = self._model_facts(model)
                tier = facts.tier if facts is not None else None
            item = (model, tier, outcome.is_failure)
            rings = self._ring_pairs.get((workflow, stage))
            if rings is None:
                rings = self._ring_pairs[(workflow, stage)] = (
                    self._ring(workflow, stage),
                    self._ring(workflow, None),
                )
            rings[0].append(item)
            rings[1].append(item)
        if self._cutoff is not None and ts < self._cutoff:
            return
        key = (workflow, stage, model)
        arm = self._arms.get(key)
        if arm is None:
            arm = self._arms[key] = _Arm(base=None, live=ArmAccumulator(t=self._clock()))
            self._arms_epoch += 1
        success = outcome is Outcome.SUCCESS
        policy = self.policy
        half_life = policy.half_life_s
        count_half_life = policy.half_life_calls
        # weights age on the router's clock from the moment the outcome is reported
        now = self._clock()
        _add_outcome(
            arm.live,
            now,
            success,
            record.latency_ms,
            record.input_tokens,
            record.output_tokens,
            record.cost_usd,
            half_life,
            count_half_life,
        )
        pending = self._pending_cutoff
        if pending is not None and ts >= pending:
            if arm.next_live is None:
                arm.next_live = ArmAccumulator(t=pending)
            arm.next_live.add(
                at=now,
                success=success,
                latency_ms=record.latency_ms,
                input_tokens=record.input_tokens,
                output_tokens=record.output_tokens,
                cost_usd=record.cost_usd,
                half_life=half_life,
                count_half_life=count_half_life,
            )
        if not arm.dirty:  # a dirty arm is in the log already, after every reader's position
            arm.dirty = True
            self._note_change(arm)

    def _note_change(self, arm: _Arm) -> None:
        log = self._log
        log.append(arm)
        if len(log) > _LOG_LIMIT:
            log.clear()
            self._log_epoch += 1

    def _ring(self, workflow: str, stage: str | None) -> deque[tuple[str, ModelTier | None, bool]]:
        ring = self._rings.get((workflow, stage))
        if ring is None:
            ring = self._rings[(workflow, stage)] = deque(maxlen=self.RECENT_WINDOW_SIZE)
        return ring

    def _ring_item(self, record: LLMCallRecord) -> tuple[str, ModelTier | None, bool]:
        tier = record.tier
        if tier is None:
            facts = self._model_facts(record.model)
            tier = facts.tier if facts is not None else None
        return (record.model, tier, record.outcome.is_failure)

    # ------------------------------------------------------------------ deciding

    def _model_facts(self, model: str) -> _ModelFacts | None:
        try:
            return self._facts[model]
        except KeyError:
            pass
        facts: _ModelFacts | None = None
        if model in self.registry:
            info = self.registry.get(model)
            facts = _ModelFacts(
                provider=info.provider,
                tier=info.tier,
                input_price=info.input_price_per_mtok / 1e6,
                output_price=info.output_price_per_mtok / 1e6,
                max_output_tokens=info.max_output_tokens,
            )
        self._facts[model] = facts
        return facts

    def _summary(self, arm: _Arm | None, now: float) -> ArmSummary:
        if arm is None:
            return self._empty
        half_life = self.policy.half_life_s
        cached = arm.summary
        if (
            cached is None
            or arm.dirty
            # decayed bounds move with time: recompute once the weights moved ~0.3%
            or (half_life is not None and abs(now - cached.computed_at) > half_life / 256.0)
        ):
            parts = (arm.live,) if arm.base is None else (arm.base, arm.live)
            policy = self.policy
            cached = arm.summary = _summarize(
                parts, now, half_life, policy.z, policy.half_life_calls, policy.reject_z
            )
            arm.dirty = False
            self._note_change(arm)
        return cached

    def _default_candidates(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.registry)

    def get_best_model(
        self,
        workflow: str,
        stage: str | None,
        *,
        candidates: Sequence[str] | None = None,
        input_tokens: int | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        max_latency_ms: float | None = None,
        min_success_rate: float | None = None,
        on_no_match: str = "raise",
        unavailable: Collection[str] = (),
        strict_cost: bool = False,
    ) -> RoutingDecision:
        """
        Choose a model for one call of ``workflow``/``stage``; never does I/O.

        ``candidates`` are model ids (default: every model in the registry), in any
        order; ``unavailable`` ids (an open circuit) are excluded with the reason
        ``"circuit open"``, ids missing from the registry with ``"not in the model
        registry"``.  ``min_success_rate`` defaults to the policy's
        ``default_min_success_rate``.  ``input_tokens`` and ``max_tokens`` feed the
        expected cost; ``strict_cost=True`` holds ``max_cost`` against the worst case
        (``max_tokens`` output tokens, defaulting to the model's maximum) and needs
        ``input_tokens``.

        Returns a `RoutingDecision` listing every candidate with its evidence.
        ``constraints_met`` is true only when the chosen model is ELIGIBLE on every
        constraint given, so a decision that claims it never has an expected cost above
        ``max_cost``.  An exploration pick (an unproven model, within ``max_cost``) has
        ``exploration=True`` and ``constraints_met=False``; when it is made because no
        candidate is eligible, it is logged as a warning the first time per stage (then
        at DEBUG).

        When no candidate is eligible or explorable, ``on_no_match`` acts:
        ``"raise"`` raises `NoModelMeetsConstraintsError` with every candidate's
        reasons; ``"relax"`` drops constraints in the policy's ``relax_order`` until a
        candidate qualifies and lists them in ``relaxed``; any other string is a pinned
        model id, returned with ``policy_applied="pinned"`` unless its circuit is open.
        With every candidate unavailable, even ``"relax"`` raises.  Invalid arguments
        raise `ConfigurationError`.  Cost: O(len(candidates)).
        """
        if not isinstance(workflow, str):
            raise ConfigurationError(f"workflow must be a string, got {workflow!r}")
        # exact float types in range skip the full checks (which also convert ints)
        if max_cost is not None and (type(max_cost) is not float or not 0.0 <= max_cost < _INF):
            max_cost = _opt_number("max_cost", max_cost)
        if max_latency_ms is not None and (
            type(max_latency_ms) is not float or not 0.0 < max_latency_ms < _INF
        ):
            max_latency_ms = _opt_number("max_latency_ms", max_latency_ms, positive=True)
        if min_success_rate is None:
            min_success_rate = self.policy.default_min_success_rate
        elif type(min_success_rate) is float and 0.0 <= min_success_rate <= 1.0:
            pass
        elif (
            isinstance(min_success_rate, bool)
            or not isinstance(min_success_rate, int | float)
            or not 0.0 <= min_success_rate <= 1.0
        ):
            raise ConfigurationError(
                f"min_success_rate must be a number in [0, 1], got {min_success_rate!r}"
            )
        if input_tokens is not None and (type(input_tokens) is not int or input_tokens < 0):
            input_tokens = _opt_int("input_tokens", input_tokens)
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 0):
            max_tokens = _opt_int("max_tokens", max_tokens)
        if not isinstance(on_no_match, str) or not on_no_match:
            raise ConfigurationError(
                f"on_no_match must be 'raise', 'relax' or a model id, got {on_no_match!r}"
            )
        if strict_cost and max_cost is not None and input_tokens is None:
            raise ConfigurationError("strict_cost=True with max_cost needs input_tokens")
        if self._store is not None and not self._started and not self._warned_not_started:
            self._warned_not_started = True
            logger.warning(
                "AdaptiveModelRouter has a telemetry store but was not started "
                "(use `async with router:`): decisions use only outcomes reported to this "
                "process"
            )

        names = self._default_candidates() if candidates is None else tuple(candidates)
        if isinstance(candidates, str):
            raise ConfigurationError("candidates must be a sequence of model ids, not a string")
        if not names:
            raise ConfigurationError(f"no candidate models for {workflow}/{stage}")
        pinned: str | None = None if on_no_match in ("raise", "relax") else on_no_match
        if pinned is not None and pinned not in names and self._model_facts(pinned) is None:
            raise ConfigurationError(
                f"on_no_match pins {pinned!r}, which is neither a candidate nor in the registry"
            )

        now = self._clock()
        unavailable_set: Collection[str]
        if isinstance(unavailable, set | frozenset):
            unavailable_set = unavailable
        else:
            unavailable_set = set(unavailable) if unavailable else _NO_MODELS
        if self._fast:
            decision = self._decide_fast(
                workflow,
                stage,
                names,
                now,
                unavailable_set,
                input_tokens,
                max_tokens,
                max_cost,
                max_latency_ms,
                min_success_rate,
                strict_cost,
            )
            if decision is not None:
                return decision
        return self._decide(
            workflow,
            stage,
            names,
            now,
            unavailable_set,
            pinned=pinned,
            on_no_match=on_no_match,
            input_tokens=input_tokens,
            max_tokens=max_tokens,
            max_cost=max_cost,
            max_latency_ms=max_latency_ms,
            min_success_rate=min_success_rate,
            strict_cost=strict_cost,
        )

    def _decide(
        self,
        workflow: str,
        stage: str | None,
        names: Sequence[str],
        now: float,
        unavailable_set: Collection[str],
        *,
        pinned: str | None,
        on_no_match: str,
        input_tokens: int | None,
        max_tokens: int | None,
        max_cost: float | None,
        max_latency_ms: float | None,
        min_success_rate: float | None,
        strict_cost: bool,
    ) -> RoutingDecision:
        # The reference path: every candidate evaluated afresh, every no-match policy.
        wf, st = _key(workflow, stage)
        arms = self._arms
        evals: list[Evaluation] = []
        seen: set[str] = set()
        for model in names:
            if model in seen:
                continue
            if not isinstance(model, str) or not model:
                raise ConfigurationError(
                    f"candidate model ids must be non-empty strings, got {model!r}"
                )
            seen.add(model)
            evals.append(
                self._evaluate(
                    model,
                    arms.get((wf, st, model)),
                    now,
                    unavailable_set,
                    input_tokens=input_tokens,
                    max_tokens=max_tokens,
                    max_cost=max_cost,
                    max_latency_ms=max_latency_ms,
                    min_success_rate=min_success_rate,
                    strict_cost=strict_cost,
                )
            )

        given = [
            c
            for c, v in ((SUCCESS, min_success_rate), (LATENCY, max_latency_ms), (COST, max_cost))
            if v is not None
        ]
        policy = self.policy
        pick = self._choose(evals, given)
        relaxed: list[str] = []
        applied: str | None = None
        if pick is None:
            if on_no_match == "relax":
                active = list(given)
                for name in policy.relax_order:
                    if name not in active:
                        continue
                    active.remove(name)
                    relaxed.append(name)
                    pick = self._choose(evals, active)
                    if pick is not None:
                        break
                applied = "relax"
            elif pinned is not None:
                target = next((e for e in evals if e.model == pinned), None)
                if target is None:
                    target = self._evaluate(
                        pinned,
                        arms.get((wf, st, pinned)),
                        now,
                        unavailable_set,
                        input_tokens=input_tokens,
                        max_tokens=max_tokens,
                        max_cost=max_cost,
                        max_latency_ms=max_latency_ms,
                        min_success_rate=min_success_rate,
                        strict_cost=strict_cost,
                    )
                    evals.append(target)
                if pinned in unavailable_set:
                    self._raise_no_match(
                        workflow,
                        stage,
                        evals,
                        f"pinned model {pinned!r} is unavailable (circuit open)",
                    )
                pick = Pick(
                    evaluation=target,
                    exploration=False,
                    why=f"pinned by on_no_match={pinned!r}",
                )
                applied = "pinned"
            if pick is None:
                self._raise_no_match(workflow, stage, evals, "no candidate meets the constraints")
        assert pick is not None
        chosen = pick.evaluation
        constraints_met = chosen.status(given) is ConstraintStatus.ELIGIBLE
        if relaxed or applied == "pinned":
            unmet = [c for c in given if chosen.constraints.get(c) is not ConstraintStatus.ELIGIBLE]
            detail = f"; unmet: {', '.join(unmet)}" if unmet else ""
            if applied == "relax":
                reason = (
                    f"no candidate met every constraint; relaxed {', '.join(relaxed)}: "
                    f"{pick.why}{detail}"
                )
            else:
                reason = f"no candidate met every constraint; {pick.why}{detail}"
        else:
            reason = pick.why
        facts = self._model_facts(chosen.model)
        decision = _trusted(
            RoutingDecision,
            _DECISION_FIELDS,
            model=chosen.model,
            provider=facts.provider if facts is not None else None,
            tier=facts.tier if facts is not None else None,
            workflow=workflow,
            stage=stage,
            constraints_met=constraints_met,
            reason=reason,
            candidates=tuple(self._candidate(e) for e in evals),
            exploration=pick.exploration,
            relaxed=tuple(relaxed),
            policy_applied=applied,
            decided_at=datetime.fromtimestamp(now, UTC),
            expected_cost_usd=chosen.cost,
            max_cost=max_cost,
            max_latency_ms=max_latency_ms,
            min_success_rate=min_success_rate,
            strict_cost=strict_cost,
        )
        if (
            applied is None
            and pick.exploration
            and not any(e.status(given) is ConstraintStatus.ELIGIBLE for e in evals)
        ):
            self._log_unproven(workflow, stage, chosen.model, reason)
        if applied is not None:
            logger.warning(
                "routing %s/%s -> %s (%s; constraints_met=%s)",
                workflow,
                stage,
                chosen.model,
                reason,
                constraints_met,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "routing %s/%s -> %s (%s; exploration=%s; constraints_met=%s; "
                "expected cost %s; %d candidates)",
                workflow,
                stage,
                chosen.model,
                reason,
                pick.exploration,
                constraints_met,
                chosen.cost,
                len(evals),
            )
        return decision

    # ------------------------------------------------------------------ fast path

    def _context(self, workflow: str, stage: str | None, names: Sequence[str]) -> _Context | None:
        """The cached context of these candidates, or None when their ids are invalid."""
        wf, st = _key(workflow, stage)
        try:
            key = (wf, st, tuple(names))
            ctx = self._contexts.get(key)
        except TypeError:  # an unhashable id: the reference path reports it
            return None
        epoch = self._arms_epoch
        if ctx is not None:
            if ctx.arms_epoch != epoch:  # an arm was added since: look the arms up again
                self._bind_arms(ctx, wf, st)
            return ctx
        models: list[str] = []
        seen: set[str] = set()
        for model in names:
            if model in seen:
                continue
            if not isinstance(model, str) or not model:
                return None
            seen.add(model)
            models.append(model)
        ctx = _Context(
            arms_epoch=epoch,
            models=tuple(models),
            arms=[],
            facts=[self._model_facts(m) for m in models],
            index={},
        )
        self._bind_arms(ctx, wf, st)
        if len(self._contexts) >= _MAX_CONTEXTS:
            self._contexts.clear()
        self._contexts[key] = ctx
        return ctx

    def _bind_arms(self, ctx: _Context, wf: str, st: str) -> None:
        arms = self._arms
        ctx.arms = [arms.get((wf, st, m)) for m in ctx.models]
        ctx.index = {}
        for i, arm in enumerate(ctx.arms):
            if arm is not None:
                ctx.index.setdefault(id(arm), []).append(i)
        ctx.arms_epoch = self._arms_epoch
        ctx.log_epoch = -1  # rescan every slot

    def _rescan(
        self,
        ctx: _Context,
        limits: tuple[Any, ...],
        now: float,
        input_tokens: int | None,
        max_tokens: int | None,
        strict_cost: bool,
    ) -> None:
        # Check every slot (new limits, a refresh, a cleared log, or summaries that may
        # have aged past their time tolerance), recomputing those whose summary changed.
        policy = self.policy
        n = len(ctx.models)
        if ctx.limits != limits:
            ctx.limits = limits
            ctx.sums = [self._empty] * n
            ctx.slots = [(None, None, 0)] * n
            stale = True
        else:
            stale = False
        ctx.log_epoch = self._log_epoch
        ctx.log_pos = len(self._log)
        lo, hi = math.inf, -math.inf
        for i, arm in enumerate(ctx.arms):
            s = self._summary(arm, now)
            if stale or s is not ctx.sums[i]:
                self._fill(ctx, i, s, policy, input_tokens, max_tokens, strict_cost)
            if arm is not None:
                lo = min(lo, s.computed_at)
                hi = max(hi, s.computed_at)
        # _summary may have logged arms it recomputed: this context has seen them
        ctx.log_pos = len(self._log)
        ctx.lo, ctx.hi = lo, hi

    def _fill(
        self,
        ctx: _Context,
        i: int,
        summary: ArmSummary,
        policy: RoutingPolicy,
        input_tokens: int | None,
        max_tokens: int | None,
        strict_cost: bool,
    ) -> None:
        # Memoize `judge` (success rate, latency: what `evaluate` decides them with),
        # the registry exclusion and `expected_cost` for slot i.  Which cost branch
        # applies depends only on whether input_tokens is given, not on its value, and
        # the estimate is input_tokens * price + a term that does not depend on it:
        # evaluated at 0 tokens, that term is exact.
        assert ctx.limits is not None
        _, min_success_rate, max_latency_ms = ctx.limits[:3]
        facts = ctx.facts[i]
        if facts is None:
            code = 2  # not in the registry: excluded
        else:
            success, latency = _judge(
                summary,
                min_success_rate,
                max_latency_ms,
                float(policy.latency_min_samples),
                policy.reject_min_samples,
            )
            code = max(
                _STATUS_CODE[success] if success is not None else 0,
                _STATUS_CODE[latency] if latency is not None else 0,
            )
        input_price = facts.input_price if facts is not None else 0.0
        worst_out = max_tokens
        if strict_cost and worst_out is None and facts is not None:
            worst_out = facts.max_output_tokens
        const, basis = _expected_cost(
            summary,
            input_price,
            facts.output_price if facts is not None else 0.0,
            None if input_tokens is None else 0,
            worst_out,
            strict_cost,
        )
        ctx.sums[i] = summary
        slope = (
            input_price
            if input_tokens is not None and basis in ("estimate", "worst_case")
            else None
        )
        ctx.slots[i] = (slope, const, code)

    def _decide_fast(
        self,
        workflow: str,
        stage: str | None,
        names: Sequence[str],
        now: float,
        unavailable_set: Collection[str],
        input_tokens: int | None,
        max_tokens: int | None,
        max_cost: float | None,
        max_latency_ms: float | None,
        min_success_rate: float | None,
        strict_cost: bool,
    ) -> RoutingDecision | None:
        """
        The decision, from cached per-candidate verdicts; None: take the reference path.

        Returns None when the candidate ids are invalid or nothing is eligible or
        explorable (the no-match policies live on the reference path); in that case
        nothing was drawn from the random source.  Otherwise the same pick, with the
        same draws, as the reference path, because both classify candidates the same
        way and call `select`.  The decision's ``candidates`` are built on first read,
        by the reference path's `evaluate`, from the summaries this decision used.
        """
        ctx = self._context(workflow, stage, names)
        if ctx is None:
            return None
        policy = self.policy
        limits = (
            policy,
            min_success_rate,
            max_latency_ms,
            strict_cost,
            max_tokens,
            input_tokens is None,
        )
        half_life = policy.half_life_s
        drift = half_life / 256.0 if half_life is not None else math.inf
        log = self._log
        if (
            ctx.limits != limits
            or ctx.log_epoch != self._log_epoch
            or now - ctx.lo > drift
            or ctx.hi - now > drift
        ):
            self._rescan(ctx, limits, now, input_tokens, max_tokens, strict_cost)
        elif ctx.log_pos != len(log):
            backing = ctx.index
            cached = ctx.sums
            for arm in log[ctx.log_pos :]:
                for i in backing.get(id(arm), ()):
                    s = self._summary(arm, now)
                    if s is not cached[i]:
                        self._fill(ctx, i, s, policy, input_tokens, max_tokens, strict_cost)
                        t = s.computed_at
                        if t < ctx.lo:
                            ctx.lo = t
                        if t > ctx.hi:
                            ctx.hi = t
            ctx.log_pos = len(log)
        models = ctx.models
        n = len(models)
        sums = ctx.sums[:]  # this decision's summaries (the lazy candidates read them)
        costs: list[float | None] = []
        eligible: list[int] = []
        explorable: list[int] = []
        blocked = unavailable_set if unavailable_set else None
        cheapest = _INF  # the lowest cost among the eligible (inf: missing), for select
        for i, (slope, cost, code) in enumerate(ctx.slots):
            if slope is not None:
                cost = input_tokens * slope + cost  # type: ignore[operator]
            costs.append(cost)
            if blocked is not None and models[i] in blocked:
                continue  # circuit open: excluded
            # with max_cost, an unproven cost is not explorable and one over it rejects
            if code < 2 and (max_cost is None or (cost is not None and cost <= max_cost)):
                if code:
                    explorable.append(i)
                else:
                    eligible.append(i)
                    if cost is not None and cost < cheapest:
                        cheapest = cost
        picked = _select(
            eligible,
            explorable,
            costs,
            sums,
            models,
            self._rng,
            policy.objective,
            policy.explore_rate,
            policy.cost_tie_tolerance,
            policy.prior_alpha,
            policy.prior_beta,
            0.01,  # latency_weight: choose's default, as the reference path uses
            0.01,  # cost_weight: likewise
            policy.inconclusive_n,
            cheapest,
        )
        if picked is None:
            return None
        index, exploration, why = picked
        model = models[index]
        if exploration and not eligible:
            self._log_unproven(workflow, stage, model, why)
        facts = ctx.facts[index]
        blocked_now: frozenset[str] = (
            _NO_MODELS
            if blocked is None
            else blocked
            if isinstance(blocked, frozenset)
            else frozenset(blocked)
        )
        decision = _fast_decision(
            model,
            facts.provider if facts is not None else None,
            facts.tier if facts is not None else None,
            workflow,
            stage,
            not exploration,  # an exploitation pick is eligible on every constraint
            why,
            exploration,
            (),
            None,
            datetime.fromtimestamp(now, UTC),
            costs[index],
            max_cost,
            max_latency_ms,
            min_success_rate,
            strict_cost,
            partial(
                _materialize,
                models,
                ctx.facts,
                sums,
                policy,
                blocked_now,
                input_tokens,
                max_tokens,
                max_cost,
                max_latency_ms,
                min_success_rate,
                strict_cost,
            ),
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "routing %s/%s -> %s (%s; exploration=%s; constraints_met=%s; "
                "expected cost %s; %d candidates)",
                workflow,
                stage,
                model,
                why,
                exploration,
                not exploration,
                costs[index],
                n,
            )
        return decision

    def _log_unproven(self, workflow: str, stage: str | None, model: str, why: str) -> None:
        # No candidate is eligible, so an unproven one was returned rather than the
        # on_no_match policy acting: a warning the first time per stage, then DEBUG.
        key = (workflow, stage)
        if key in self._unproven_logged:
            logger.debug("routing %s/%s -> %s (%s; constraints_met=False)", *key, model, why)
            return
        if len(self._unproven_logged) >= _MAX_CONTEXTS:
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

    def _choose(self, evals: Sequence[Evaluation], active: Sequence[str]) -> Pick | None:
        p = self.policy
        return choose(
            evals,
            active,
            self._rng,
            objective=p.objective,
            explore_rate=p.explore_rate,
            cost_tie_tolerance=p.cost_tie_tolerance,
            prior_alpha=p.prior_alpha,
            prior_beta=p.prior_beta,
            inconclusive_n=p.inconclusive_n,
        )

    def _evaluate(
        self,
        model: str,
        arm: _Arm | None,
        now: float,
        unavailable: Collection[str],
        *,
        input_tokens: int | None,
        max_tokens: int | None,
        max_cost: float | None,
        max_latency_ms: float | None,
        min_success_rate: float | None,
        strict_cost: bool,
    ) -> Evaluation:
        return self._evaluate_summary(
            model,
            self._summary(arm, now),
            self.policy,
            unavailable,
            input_tokens=input_tokens,
            max_tokens=max_tokens,
            max_cost=max_cost,
            max_latency_ms=max_latency_ms,
            min_success_rate=min_success_rate,
            strict_cost=strict_cost,
        )

    def _evaluate_summary(
        self,
        model: str,
        summary: ArmSummary,
        policy: RoutingPolicy,
        unavailable: Collection[str],
        *,
        input_tokens: int | None,
        max_tokens: int | None,
        max_cost: float | None,
        max_latency_ms: float | None,
        min_success_rate: float | None,
        strict_cost: bool,
    ) -> Evaluation:
        return _evaluate_with(
            model,
            self._model_facts(model),
            summary,
            policy,
            unavailable,
            input_tokens,
            max_tokens,
            max_cost,
            max_latency_ms,
            min_success_rate,
            strict_cost,
        )

    def _candidate(self, e: Evaluation) -> CandidateEvaluation:
        return _candidate_of(e, self._facts.get(e.model))

    def _raise_no_match(
        self, workflow: str, stage: str | None, evals: Sequence[Evaluation], message: str
    ) -> None:
        reasons = {e.model: (e.reasons or ("not eligible",)) for e in evals}
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

    # ------------------------------------------------------------------ reports

    def recommend_tier_upgrade(self, workflow: str, stage: str | None) -> TierRecommendation:
        """
        Advise moving ``workflow``/``stage`` (``None``: every stage) up a tier.

        Looks at the last `RECENT_WINDOW_SIZE` (20) sample outcomes this router has seen
        (seeded from the backend at start, then live).  With fewer than
        `MIN_SAMPLE_SIZE` (10) it declines for lack of data; a failure rate strictly
        above `FAILURE_RATE_THRESHOLD` (20%) advises the next tier above the highest one
        that served the calls.  Pure read of memory; never modifies routing.
        """
        ring_key: tuple[str, str | None] = (workflow or "", stage)
        ring = self._rings.get(ring_key)
        items = list(ring) if ring is not None else []
        n = len(items)
        failures = sum(1 for _, _, failed in items if failed)
        by_model: dict[str, tuple[int, int]] = {}
        tiers: set[ModelTier] = set()
        for model, tier, failed in items:
            f, c = by_model.get(model, (0, 0))
            by_model[model] = (f + int(failed), c + 1)
            if tier is not None:
                tiers.add(tier)
        current = tuple(t for t in _TIER_ORDER if t in tiers)
        where = f"{workflow}/{stage if stage is not None else '*'}"
        if n < self.MIN_SAMPLE_SIZE:
            return TierRecommendation(
                workflow=workflow,
                stage=stage,
                should_upgrade=False,
                reason=f"Insufficient data for {where} ({n} calls, need {self.MIN_SAMPLE_SIZE})",
                failure_rate=(failures / n) if n else None,
                failures=failures,
                window=n,
                current_tiers=current,
                by_model=by_model,
            )
        rate = failures / n
        if rate <= self.FAILURE_RATE_THRESHOLD:
            return TierRecommendation(
                workflow=workflow,
                stage=stage,
                should_upgrade=False,
                reason=f"Performance acceptable for {where}: {rate:.1%} failure rate "
                f"({failures}/{n} recent calls)",
                failure_rate=rate,
                failures=failures,
                window=n,
                current_tiers=current,
                by_model=by_model,
            )
        top = current[-1] if current else None
        suggested = (
            _TIER_ORDER[_TIER_ORDER.index(top) + 1]
            if top is not None and top is not _TIER_ORDER[-1]
            else None
        )
        worst = max(by_model.items(), key=lambda kv: (kv[1][0] / kv[1][1], kv[1][0]))[0]
        if top is None:
            tail = "; the tiers of the models are unknown"
        elif suggested is None:
            tail = f"; already at the top tier ({top.value}): check the provider or the prompt"
        else:
            tail = f"; move from {top.value} to {suggested.value}"
        return TierRecommendation(
            workflow=workflow,
            stage=stage,
            should_upgrade=suggested is not None,
            reason=(
                f"High failure rate for {where}: {rate:.1%} ({failures}/{n} failed in recent "
                f"calls; worst model {worst}){tail}"
            ),
            failure_rate=rate,
            failures=failures,
            window=n,
            current_tiers=current,
            suggested_tier=suggested,
            by_model=by_model,
        )

    async def get_routing_stats(
        self, workflow: str, stage: str | None = None, days: float = 7
    ) -> dict[str, Any]:
        """
        Per-model statistics of ``workflow`` (one ``stage``, or ``"all"``) from the backend.

        Always the same shape: ``workflow``, ``stage``, ``days_analyzed``,
        ``models_used`` (sorted), ``performance_by_model`` (per model: ``calls``,
        ``successes``, ``success_rate`` with ``success_rate_lower``/``_upper`` (95%
        Wilson), ``avg_cost``, ``avg_latency_ms``, ``p50``, ``p95``, ``tier``,
        ``sample_size_warning``), call-weighted ``total_calls``, ``avg_cost``,
        ``avg_success_rate``, and ``telemetry`` (``"ok"``, or ``"none"`` without a
        store or when the store has never received a record) with a ``message`` saying
        what is missing (``None`` when nothing is).  Raises what the backend raises.
        """
        _positive_number("days", days)
        out: dict[str, Any] = {
            "workflow": workflow,
            "stage": stage if stage is not None else "all",
            "days_analyzed": days,
            "models_used": [],
            "performance_by_model": {},
            "total_calls": 0,
            "avg_cost": 0.0,
            "avg_success_rate": 0.0,
            "telemetry": "ok",
            "message": None,
        }
        store = self._store
        if store is None:
            out["telemetry"] = "none"
            out["message"] = (
                "the null telemetry backend keeps no records: no statistics to report"
                if self._null_store
                else "no telemetry store configured: no statistics to report"
            )
            return out
        since: datetime | None
        try:
            since = datetime.fromtimestamp(self._clock(), UTC) - timedelta(days=days)
        except OverflowError:
            since = None  # a window reaching before year 1 covers all of history
        perfs = await store.aggregate(
            workflow=workflow, stage=stage, since=since, per_stage=stage is not None
        )
        perfs = [p for p in perfs if p.workflow == workflow]
        if not perfs:
            ever = await store.recent(limit=1)
            if not ever:
                out["telemetry"] = "none"
                out["message"] = "no telemetry has ever been recorded in this store"
            else:
                out["message"] = (
                    f"no calls recorded for {workflow}/{out['stage']} in the last {days:g} days"
                )
            return out
        merged = _merge_perfs(perfs)
        total = sum(p.sample_size for p in merged.values())
        successes = sum(p.successes for p in merged.values())
        cost = sum(p.avg_cost_usd * p.sample_size for p in merged.values())
        per_model: dict[str, Any] = {}
        for model in sorted(merged):
            p = merged[model]
            lo, hi = wilson_bounds(p.successes, p.sample_size, self.policy.z)
            warning: str | None = None
            if p.sample_size < self.MIN_SAMPLE_SIZE or hi - lo > 0.2:
                warning = (
                    f"only {p.sample_size} calls: the success rate is known only to within "
                    f"{lo:.2f}-{hi:.2f} (95%)"
                )
            per_model[model] = {
                "calls": p.sample_size,
                "successes": p.successes,
                "success_rate": p.success_rate,
                "success_rate_lower": lo,
                "success_rate_upper": hi,
                "avg_cost": p.avg_cost_usd,
                "avg_latency_ms": p.avg_latency_ms,
                "p50": p.latency_p50_ms,
                "p95": p.latency_p95_ms,
                "tier": p.tier.value if p.tier is not None else None,
                "sample_size_warning": warning,
            }
        out["models_used"] = sorted(merged)
        out["performance_by_model"] = per_model
        out["total_calls"] = total
        out["avg_cost"] = cost / total if total else 0.0
        out["avg_success_rate"] = successes / total if total else 0.0
        return out


def _merge_perfs(perfs: Sequence[ModelPerformance]) -> dict[str, ModelPerformance]:
    by_model: dict[str, list[ModelPerformance]] = {}
    for p in perfs:
        by_model.setdefault(p.model, []).append(p)
    out: dict[str, ModelPerformance] = {}
    for model, rows in by_model.items():
        if len(rows) == 1:
            out[model] = rows[0]
            continue
        n = sum(r.sample_size for r in rows)
        s = sum(r.successes for r in rows)
        lat = [(r.avg_latency_ms, r.successes) for r in rows if r.avg_latency_ms is not None]
        lat_w = sum(w for _, w in lat)
        out[model] = attrs.evolve(
            rows[-1],
            sample_size=n,
            successes=s,
            avg_cost_usd=sum(r.avg_cost_usd * r.sample_size for r in rows) / n if n else 0.0,
            avg_latency_ms=(sum(v * w for v, w in lat) / lat_w) if lat_w else None,
            latency_p50_ms=max((r.latency_p50_ms for r in rows if r.latency_p50_ms), default=None),
            latency_p95_ms=max((r.latency_p95_ms for r in rows if r.latency_p95_ms), default=None),
        )
    return out
