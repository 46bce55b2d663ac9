"""
`AdaptiveModelRouter`: picks a model per (workflow, stage) from recorded outcomes.

The router is a thin facade over `empathy_models.routing`: an evidence book of
per-arm minute buckets with a change test (`routing.book`), verdicts and selection
(`routing.decide`), and reports (`routing.reports`).

**Where the evidence comes from.**  ``async with router:`` reads the telemetry
backend's evidence rollups for the window (`TelemetryBackend.evidence`), then every
``refresh_interval`` reads only the buckets changed since (so a refresh costs what is
new, not the history).  Between refreshes `record_outcome`, which the executor calls
for every attempt, adds this process's outcomes to their buckets with the rollups'
arithmetic; the next refresh replaces those buckets by the store's version, which
holds them.  A record timestamped before the last refresh began is not added (the
store holds it, or will, and a later refresh brings it in).  So the same records give
the same evidence, and the same verdict, whether they arrived live, through a refresh
or after a restart.  Give the router the same telemetry backend the executor records
to, and a ``clock`` on the same time base as the records' timestamps (UTC epoch
seconds; `time.time` by default).  A backend without rollups is read through
``recent`` instead (the whole window at every refresh).

**Deciding** (`AdaptiveModelRouter.get_best_model`) reads only in-memory verdicts,
cached per candidate list and recomputed for arms whose evidence changed: O(number of
candidates), no I/O.  A decision's ``candidates`` are built when first read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, ClassVar, Final, Self

from ._fast import trusted_constructor
from .abc import TelemetryBackend
from .evidence import EvidenceBucket, rollup
from .exceptions import ConfigurationError, NoModelMeetsConstraintsError, NotOpenError
from .records import LLMCallRecord, ModelTier, Outcome, RoutingDecision
from .registry import ModelRegistry
from .routing.book import Arm, StagePrior, bucket_of
from .routing.decide import (
    EMPTY_SUMMARY,
    Context,
    ModelFacts,
    Verdict,
    build_candidates,
    judge,
    select,
)
from .routing.policy import Constraints, RoutingPolicy
from .routing.reports import (
    RecentOutcomes,
    RoutingStats,
    TierRecommendation,
    recommend,
    stats_from,
)
from .routing.stats import bucket_sums

__all__ = ["AdaptiveModelRouter", "RoutingPolicy", "RoutingStats", "TierRecommendation"]

logger = logging.getLogger("empathy_models.router")

_MAX_CONTEXTS: Final = 1024
_NO_MODELS: Final[frozenset[str]] = frozenset()
_INF: Final = math.inf
_Limits = tuple[float | None, float | None, float | None, bool, int | None, float | None]
"""A `Constraints` as a plain tuple, in its fields' order (a cheap context key)."""
_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)
_RECENT_FALLBACK_LIMIT: Final = 10_000_000
_CHANGE_NOTE_S: Final = 3600.0  # how long a pick says it regained its place by a change

_ArmKey = tuple[str | None, str | None, str]


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


def _limits(c: Constraints) -> _Limits:
    return (
        c.min_success_rate,
        c.max_latency_ms,
        c.max_cost,
        c.strict_cost,
        c.max_tokens,
        c.max_ttft_ms,
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
    if cons.max_cost is not None and (cost is None or cost > cons.max_cost):
        unmet.append("max_cost")
    return unmet


_decision: Final[Callable[..., RoutingDecision]] = trusted_constructor(
    RoutingDecision, skip=("candidates",)
)
"""A `RoutingDecision` without its ``__init__`` (every value is of its field's converted
type and in range), with ``candidates`` left unset: it is built by the thunk on first
read (see RoutingDecision)."""


class AdaptiveModelRouter:
    """
    Chooses the model for each call from in-memory, per-arm evidence.

    ``registry`` defaults to `ModelRegistry.default`, as the executor's does.
    ``telemetry_store`` is a `TelemetryBackend` or a URL (``"sqlite:///calls.db"``); a
    URL's backend is owned and closed by the router.  Without one (or with the null
    backend) the router learns only from `record_outcome`, and `get_routing_stats` says
    so.  ``refresh_interval`` (seconds, default 60; ``None`` disables) is how often the
    started router reads what changed in the backend.  ``rng`` or ``seed`` makes every
    random choice reproducible; ``clock`` returns UTC epoch seconds, and ``sleep``
    waits between refreshes (tests pass `FakeClock.sleep` so no real time passes).

    Lifecycle: ``async with router:`` reads the evidence of the window, fills the
    recent-outcome windows of `recommend_tier_upgrade` (one small ``recent`` call per
    workflow stage) and starts the periodic refresh, a task owned by the router and
    cancelled and awaited by `aclose`.  A backend error while reading is logged and
    counted in `refresh_errors`; it never fails a decision.

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
        self._null_store = store is not None and not store.stores_records
        self._store_obj = store
        self._store: TelemetryBackend | None = None if self._null_store else store
        self._test = self.policy.change_test
        self._arms: dict[_ArmKey, Arm] = {}
        self._arms_epoch = 0  # bumped whenever an arm is added
        self._priors: dict[tuple[str | None, str | None], StagePrior] = {}
        self._contexts: dict[tuple[Any, ...], Context] = {}
        self._facts: dict[str, ModelFacts | None] = {}
        self._rings: dict[tuple[str, str | None], RecentOutcomes] = {}
        self._ring_pairs: dict[tuple[str, str], tuple[RecentOutcomes, RecentOutcomes]] = {}
        self._ring_cutoff: float | None = None
        self._cutoff: float | None = None  # when the last successful refresh began
        self._version = 0  # the store's evidence version read so far
        self._rollups = True  # False: the backend keeps none, read records instead
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._warned_not_started = False
        self._unproven_logged: set[tuple[str, str | None]] = set()
        self.refresh_errors = 0
        """How many reads of the backend failed."""
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
        Read the backend's evidence and start the periodic refresh; idempotent.

        Raises `NotOpenError` after `aclose`.  Backend errors are logged, not raised.
        """
        if self._closed:
            raise NotOpenError("AdaptiveModelRouter was used after aclose()")
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
        Read the evidence buckets that changed in the backend since the last refresh.

        The backend is flushed first (so records this process handed to a batching
        backend are visible).  Each changed bucket replaces the router's, and buckets
        this process added outcomes to go back to the store's version; the change test
        re-runs from the earliest changed bucket of each arm.  Buckets older than the
        policy's ``window_days`` are dropped.  Returns ``True`` on success; on a backend
        error logs a warning, counts it in `refresh_errors`, keeps the previous evidence
        and returns ``False``.  Concurrent calls are serialized.
        """
        store = self._store
        if store is None:
            return False
        async with self._refresh_lock:
            cutoff = self._clock()
            since = _window_start(cutoff, self.policy.window_days)
            try:
                await store.flush()
                by_arm, version = await self._read(store, since)
            except Exception as exc:
                self.refresh_errors += 1
                logger.warning(
                    "router refresh from %r failed (%s: %s); keeping the previous evidence",
                    store,
                    type(exc).__name__,
                    exc,
                )
                return False
            for key in by_arm:
                if key not in self._arms:
                    self._arms[key] = Arm(test=self._test)
                    self._arms_epoch += 1
            floor = bucket_of(since.timestamp()) if since is not _EARLIEST else None
            priors: dict[tuple[str | None, str | None], StagePrior] = {}
            for key, arm in self._arms.items():
                arm.apply(by_arm.get(key, ()))
                if floor is not None:
                    arm.expire(floor)
                prior = priors.get(key[:2])
                if prior is None:
                    prior = priors[key[:2]] = StagePrior()
                prior.successes += arm.cur[1]
                prior.output_tokens += arm.cur[6]
            for stage_key, prior in priors.items():
                old = self._priors.get(stage_key)
                prior.version = (old.version + 1) if old is not None else 0
                self._priors[stage_key] = prior
            self._version = version
            self._cutoff = cutoff
            self.last_refresh = cutoff
            logger.debug(
                "router refreshed %d buckets from %r", sum(map(len, by_arm.values())), store
            )
            return True

    async def _read(
        self, store: TelemetryBackend, since: datetime
    ) -> tuple[dict[_ArmKey, list[tuple[int, list[float]]]], int]:
        # the changed buckets per arm as (bucket start, sums), and the version to ask after
        buckets: Iterable[EvidenceBucket]
        version = 0
        if self._rollups:
            try:
                batch = await store.evidence(since=since, after_version=self._version)
            except NotImplementedError:
                self._rollups = False
                logger.info(
                    "%r keeps no evidence rollups: the router reads its records instead "
                    "(the whole window at every refresh)",
                    store,
                )
            else:
                buckets, version = batch.buckets, batch.version
        if not self._rollups:
            buckets = rollup(await store.recent(limit=_RECENT_FALLBACK_LIMIT, since=since))
        by_arm: dict[_ArmKey, list[tuple[int, list[float]]]] = {}
        for b in buckets:
            key = (b.workflow or None, b.stage or None, b.model)
            rows = by_arm.get(key)
            if rows is None:
                rows = by_arm[key] = []
            rows.append((int(b.bucket_start.timestamp()), bucket_sums(b)))
        return by_arm, version

    async def _seed_rings(self) -> None:
        # One ``recent`` call per workflow stage with evidence (and one per workflow for
        # ``stage=None``), so a low-traffic stage is not starved by a busy one.  At start.
        store = self._store
        limit = self.policy.seed_stage_limit
        if store is None or limit == 0:
            return
        now = self._clock()
        since = _window_start(now, self.policy.window_days)
        every = {(wf, st) for wf, st, _ in self._arms if wf}
        stages = sorted((wf, st) for wf, st in every if st)[:limit]
        targets: list[tuple[str, str | None]] = [*stages, *sorted({(wf, None) for wf, _ in stages})]
        # a workflow whose every stage was read: its own window is the latest of theirs
        # (one query without a stage can scan the whole table: ~0.85 s at 1M calls)
        read = set(stages)
        whole = {wf for wf, _ in stages if all((w, st) in read for w, st in every if w == wf)}
        by_stage: dict[str, list[LLMCallRecord]] = {}
        size = self.RECENT_WINDOW_SIZE
        for workflow, stage in targets:
            try:
                if stage is None and workflow in whole:
                    merged = by_stage.get(workflow, [])
                    merged.sort(key=lambda r: r.timestamp)
                    records = merged[-size:]
                else:
                    records = await store.recent(
                        limit=size, workflow=workflow, stage=stage, since=since
                    )
                    if stage is not None:
                        by_stage.setdefault(workflow, []).extend(records)
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
            ring: RecentOutcomes = deque(items, maxlen=size)
            ring.extend(self._ring(workflow, stage))
            self._rings[(workflow, stage)] = ring
            self._ring_pairs.clear()
        self._ring_cutoff = now

    # ------------------------------------------------------------------ learning

    def record_outcome(self, record: LLMCallRecord) -> None:
        """
        Learn from one attempt, without I/O.

        Only sample outcomes count (success, failure, rate_limited, fatal); ignored,
        cancelled and rejected attempts are dropped.  A record timestamped before the
        last refresh began is not added (the backend holds it, or will).
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
        key = (record.workflow or None, record.stage or None, model)
        arm = self._arms.get(key)
        if arm is None:
            arm = self._arms[key] = Arm(test=self._test)
            self._arms_epoch += 1
        success = outcome is Outcome.SUCCESS
        arm.add(
            ts,
            success,
            record.latency_ms,
            record.input_tokens,
            record.output_tokens,
            record.cost_usd,
            record.ttft_ms,
        )
        if success:
            prior = self._priors.get(key[:2])
            if prior is None:
                prior = self._priors[key[:2]] = StagePrior()
            prior.successes += 1
            prior.output_tokens += record.output_tokens
            prior.version += 1

    def _ring(self, workflow: str, stage: str | None) -> RecentOutcomes:
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

    def _model_facts(self, model: str) -> ModelFacts | None:
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

    def _context(
        self,
        workflow: str | None,
        stage: str | None,
        names: tuple[str, ...],
        limits: _Limits,
    ) -> Context:
        # ``limits``: the fields of the decision's `Constraints`, as a plain tuple (a
        # cheaper key than the record, which is built only with a new context)
        key = (workflow, stage, names, limits)
        ctx = self._contexts.get(key)
        if ctx is None:
            cons = Constraints(*limits)
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
            ctx = Context(
                cons=cons,
                models=tuple(models),
                facts=[self._model_facts(m) for m in models],
                arms=[],
                arms_epoch=-1,
            )
            if len(self._contexts) >= _MAX_CONTEXTS:
                self._contexts.clear()
            self._contexts[key] = ctx
        if ctx.arms_epoch != self._arms_epoch:
            arms = self._arms
            ctx.arms = [arms.get((workflow, stage, m)) for m in ctx.models]
            ctx.arms_epoch = self._arms_epoch
            if not ctx.verdicts:
                ctx.verdicts = [self._judge(ctx, i, None) for i in range(len(ctx.models))]
                ctx.caches = [{} for _ in ctx.models]
                ctx.arm_versions = [-1] * len(ctx.models)
                ctx.on_prior = True
                ctx.changed = tuple(
                    j for j, v in enumerate(ctx.verdicts) if v.summary.change is not None
                )
        prior = self._priors.get((workflow, stage))
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
                new = verdicts[i] = self._judge(ctx, i, prior)
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

    def _judge(self, ctx: Context, i: int, prior: StagePrior | None) -> Verdict:
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

    def _classify(
        self, ctx: Context, input_tokens: int | None, blocked: Collection[str]
    ) -> tuple[list[float | None], list[int], list[int], list[int]]:
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
                continue  # the budget is a hard limit, for exploration too
            if code == 0:
                eligible.append(i)
            elif code == 1:
                explorable.append(i)
            else:
                probeable.append(i)
        return costs, eligible, explorable, probeable

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
        max_ttft_ms: float | None = None,
    ) -> RoutingDecision:
        """
        Choose a model for one call of ``workflow``/``stage``; never does I/O.

        ``candidates`` are model ids (default: every model in the registry), in any
        order; ``unavailable`` ids (an open circuit) are excluded with the reason
        ``"circuit open"``, ids missing from the registry with ``"not in the model
        registry"``.  ``min_success_rate`` defaults to the policy's
        ``default_min_success_rate``.  ``input_tokens`` and ``max_tokens`` feed the
        expected cost: a model's mean output tokens, the stage's for a model not yet
        measured, ``max_tokens`` when nothing is known; ``strict_cost=True`` holds
        ``max_cost`` against the worst case (``max_tokens`` output tokens, defaulting to
        the model's maximum) and needs ``input_tokens``.  ``max_ttft_ms`` bounds the p95
        time to first token of a model's streamed successful calls, judged as
        ``max_latency_ms`` is (a model never streamed is unproven, not assumed fast).

        Returns a `RoutingDecision` listing every candidate with its evidence (built
        when first read).  ``constraints_met`` is true only when the chosen model is
        ELIGIBLE on every constraint given, so a decision that claims it never has an
        expected cost above ``max_cost``.  An exploration pick has ``exploration=True``
        and ``constraints_met=False``; when it is made because no candidate is
        eligible, it is logged as a warning the first time per stage (then at DEBUG).
        When the decision acted on a detected change (the pick, or a model that would
        otherwise be preferred, changed its success rate), ``change`` says so and so
        does the reason.

        When no candidate is eligible or explorable, ``on_no_match`` acts: ``"raise"``
        raises `NoModelMeetsConstraintsError` with every candidate's reasons;
        ``"relax"`` drops constraints in the policy's ``relax_order`` until a candidate
        qualifies and lists them in ``relaxed``; any other string is a pinned model id,
        returned with ``policy_applied="pinned"`` unless its circuit is open.  With
        every candidate unavailable, even ``"relax"`` raises.  Invalid arguments raise
        `ConfigurationError`.  Cost: O(len(candidates)).
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
        if max_ttft_ms is not None and (
            type(max_ttft_ms) is not float or not 0.0 < max_ttft_ms < _INF
        ):
            max_ttft_ms = _opt_number("max_ttft_ms", max_ttft_ms, positive=True)
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
        if isinstance(candidates, str):
            raise ConfigurationError("candidates must be a sequence of model ids, not a string")
        names = self._default_candidates() if candidates is None else tuple(candidates)
        if not names:
            raise ConfigurationError(f"no candidate models for {workflow}/{stage}")
        pinned: str | None = None if on_no_match in ("raise", "relax") else on_no_match
        if pinned is not None and pinned not in names and self._model_facts(pinned) is None:
            raise ConfigurationError(
                f"on_no_match pins {pinned!r}, which is neither a candidate nor in the registry"
            )
        blocked: Collection[str]
        if not unavailable:
            blocked = _NO_MODELS
        elif isinstance(unavailable, set | frozenset):
            blocked = unavailable
        else:
            blocked = frozenset(unavailable)
        limits = (min_success_rate, max_latency_ms, max_cost, strict_cost, max_tokens, max_ttft_ms)
        wf = workflow or None
        try:
            ctx = self._context(wf, stage or None, names, limits)
        except TypeError:  # an unhashable candidate id
            raise ConfigurationError(
                f"candidate model ids must be non-empty strings, got {names!r}"
            ) from None
        costs, eligible, explorable, probeable = self._classify(ctx, input_tokens, blocked)
        picked = select(ctx, costs, eligible, explorable, probeable, self._rng, self.policy)
        now = self._clock()
        if picked is not None:
            index, exploration, why = picked
            if exploration and not eligible:
                self._log_unproven(workflow, stage, ctx.models[index], why)
            return self._decide(
                workflow, stage, ctx, costs, index, exploration, why, input_tokens, blocked, now
            )
        return self._no_match(
            workflow, stage, ctx, costs, names, on_no_match, pinned, input_tokens, blocked, now
        )

    def _decide(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        index: int,
        exploration: bool,
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
        v = ctx.verdicts[index]
        change: str | None = None
        if ctx.changed:
            # a change this decision acted on: a model that would be cheaper lost its
            # standing to one, or the pick regained it through one within the hour
            pick_cost = costs[index]
            cheapest = self.policy.objective == "cheapest"
            for i in ctx.changed:
                other = ctx.verdicts[i]
                c = costs[i]
                since = other.summary.since
                if (i == index and since is not None and now - since <= _CHANGE_NOTE_S) or (
                    i != index
                    and other.code != 0
                    and cheapest
                    and c is not None
                    and pick_cost is not None
                    and c < pick_cost
                ):
                    change = f"{other.model} {other.summary.change}"
                    why = f"{why}; acting on a detected change: {change}"
                    break
        facts = v.facts
        view = shown if shown is not None else ctx
        view_costs = costs if shown is None else self._classify(view, input_tokens, blocked)[0]
        decision = _decision(
            model=v.model,
            provider=facts.provider if facts is not None else None,
            tier=facts.tier if facts is not None else None,
            workflow=workflow,
            stage=stage,
            constraints_met=(not exploration) if met is None else met,
            reason=why,
            exploration=exploration,
            relaxed=relaxed,
            policy_applied=applied,
            decided_at=datetime.fromtimestamp(now, UTC),
            expected_cost_usd=costs[index],
            max_cost=view.cons.max_cost,
            max_latency_ms=view.cons.max_latency_ms,
            max_ttft_ms=view.cons.max_ttft_ms,
            min_success_rate=view.cons.min_success_rate,
            strict_cost=view.cons.strict_cost,
            change=change,
            _candidates_thunk=partial(
                build_candidates,
                list(view.verdicts),
                view_costs,
                view.cons,
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

    def _no_match(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        names: tuple[str, ...],
        on_no_match: str,
        pinned: str | None,
        input_tokens: int | None,
        blocked: Collection[str],
        now: float,
    ) -> RoutingDecision:
        wf = workflow or None
        st = stage or None
        cons = ctx.cons
        if on_no_match == "relax":
            relaxed: list[str] = []
            active = cons
            for name in self.policy.relax_order:
                if name not in active.given:
                    continue
                active = active.without(name)
                relaxed.append(name)
                loose = self._context(wf, st, names, _limits(active))
                lcosts, el, ex, pr = self._classify(loose, input_tokens, blocked)
                picked = select(loose, lcosts, el, ex, pr, self._rng, self.policy, budget=False)
                if picked is None:
                    continue
                index, exploration, why = picked
                unmet = _unmet(ctx.verdicts[index], costs[index], cons)
                detail = f"; unmet: {', '.join(unmet)}" if unmet else ""
                decision = self._decide(
                    workflow,
                    stage,
                    loose,
                    lcosts,
                    index,
                    exploration,
                    f"no candidate met every constraint; relaxed {', '.join(relaxed)} "
                    f"(judged on the rest): {why}{detail}",
                    input_tokens,
                    blocked,
                    now,
                    relaxed=tuple(relaxed),
                    applied="relax",
                    met=not unmet and not exploration,
                    shown=ctx,
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
        elif pinned is not None:
            view = ctx
            if pinned not in ctx.models:
                view = self._context(wf, st, (*ctx.models, pinned), _limits(cons))
                costs = self._classify(view, input_tokens, blocked)[0]
            index = view.models.index(pinned)
            if pinned in blocked:
                self._raise_no_match(
                    workflow,
                    stage,
                    view,
                    costs,
                    input_tokens,
                    blocked,
                    f"pinned model {pinned!r} is unavailable (circuit open)",
                )
            unmet = _unmet(view.verdicts[index], costs[index], cons)
            detail = f"; unmet: {', '.join(unmet)}" if unmet else ""
            decision = self._decide(
                workflow,
                stage,
                view,
                costs,
                index,
                False,
                f"no candidate met every constraint; pinned by on_no_match={pinned!r}{detail}",
                input_tokens,
                blocked,
                now,
                applied="pinned",
                met=not unmet and view.verdicts[index].code == 0,
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
        self._raise_no_match(
            workflow,
            stage,
            ctx,
            costs,
            input_tokens,
            blocked,
            "no candidate meets the constraints",
        )
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_no_match(
        self,
        workflow: str,
        stage: str | None,
        ctx: Context,
        costs: list[float | None],
        input_tokens: int | None,
        blocked: Collection[str],
        message: str,
    ) -> None:
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

    # ------------------------------------------------------------------ reports

    def recommend_tier_upgrade(self, workflow: str, stage: str | None) -> TierRecommendation:
        """
        Advise moving ``workflow``/``stage`` (``None``: every stage) up a tier.

        Looks at the last `RECENT_WINDOW_SIZE` (20) sample outcomes this router has seen
        (read from the backend at start, then live).  With fewer than
        `MIN_SAMPLE_SIZE` (10) it declines for lack of data; a failure rate strictly
        above `FAILURE_RATE_THRESHOLD` (20%) advises the next tier above the highest one
        that served the calls.  Pure read of memory; never modifies routing.
        """
        ring = self._rings.get((workflow or "", stage))
        return recommend(
            workflow,
            stage,
            list(ring) if ring is not None else [],
            min_sample_size=self.MIN_SAMPLE_SIZE,
            threshold=self.FAILURE_RATE_THRESHOLD,
        )

    async def get_routing_stats(
        self, workflow: str, stage: str | None = None, days: float = 7
    ) -> RoutingStats:
        """
        Per-model `RoutingStats` of ``workflow`` (one ``stage``, or ``"all"``) from the backend.

        Always returned, also without telemetry: ``telemetry`` is ``"none"`` without a
        store or when the store has never received a record, with a ``message`` saying
        what is missing.  Raises what the backend raises.
        """
        _positive_number("days", days)
        shown = stage if stage is not None else "all"
        store = self._store
        if store is None:
            return RoutingStats(
                workflow=workflow,
                stage=shown,
                days_analyzed=days,
                telemetry="none",
                message=(
                    "the null telemetry backend keeps no records: no statistics to report"
                    if self._null_store
                    else "no telemetry store configured: no statistics to report"
                ),
            )
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
            return RoutingStats(
                workflow=workflow,
                stage=shown,
                days_analyzed=days,
                telemetry="ok" if ever else "none",
                message=(
                    f"no calls recorded for {workflow}/{shown} in the last {days:g} days"
                    if ever
                    else "no telemetry has ever been recorded in this store"
                ),
            )
        return stats_from(
            workflow, shown, days, perfs, z=self.policy.z, min_sample_size=self.MIN_SAMPLE_SIZE
        )
