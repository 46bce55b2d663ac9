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
``recent`` instead (the whole window at every refresh).  Without a store the window's
start moves when an outcome or a decision finds it has moved on (`_StorelessWindow`).

**Deciding** (`AdaptiveModelRouter.get_best_model`) reads only in-memory verdicts,
cached per candidate list and recomputed for arms whose evidence changed: O(number of
candidates), no I/O.  A decision's ``candidates`` are built when first read.

**Lifecycle.**  ``async with router:`` reads the evidence of the window, fills the
recent-outcome windows of `recommend_tier_upgrade` (one small ``recent`` call per
workflow stage) and starts the periodic refresh, a task owned by the router and
cancelled and awaited by `aclose`.  A backend error while reading is logged and
counted in `refresh_errors`; it never fails a decision.  A router without a store
decides and learns unstarted (an executor given one neither opens nor closes it).
After `aclose` (or its ``async with`` block) the router is done: a decision, an
outcome, a `start`, a `refresh` or a store read (`get_routing_stats`) raises
`NotOpenError`, rather than routing on evidence no refresh keeps current any more
(``closed`` says so; an executor given the router refuses every run then, one that
would not ask it too); `recommend_tier_upgrade`, a read of what the router held, still
answers.

**Concurrency.**  The synchronous methods (`record_outcome`, `get_best_model`,
`recommend_tier_upgrade`) must be called from the event loop's thread; they never
await, so each is atomic with respect to other tasks.  The router is not thread-safe.
The work it hands to a worker thread touches nothing the event loop's thread uses
meanwhile: grouping a large read per arm (`_read_evidence`), building the arms a read
brings that it held nothing of, every arm at start (`_walk_new`), and the change
test's walk over a copy of an arm when the window's start moves (`_slide`).  The
router's own arms are only changed in the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, ClassVar, Final, Self, TypeVar

from ._fast import gc_paused
from ._loops import close_at_home, dropped, elsewhere, other_loop_error, running_loop
from ._propagation import background
from ._validators import plain_number, shown, warn_caller
from .abc import TelemetryBackend
from .evidence import EvidenceBatch, rollup
from .exceptions import ConfigurationError, NotOpenError
from .records import LLMCallRecord, RoutingDecision
from .registry import ModelRegistry
from .routing._args import (
    blocked_set,
    candidate_names,
    check_names,
    decision_limits,
    plain_name,
    positive_number,
)
from .routing._explain import Decider
from .routing._memory import ArmKey, ChangedBuckets, EvidenceMemory
from .routing._recent import RecentWindows
from .routing._verdicts import Limits, VerdictCache, classify
from .routing.book import BUCKET, Arm
from .routing.decide import Context, select
from .routing.policy import RoutingPolicy
from .routing.reports import (
    RoutingStats,
    TierRecommendation,
    recommend,
    stats_from,
)
from .routing.stats import Sums, row_sums

__all__ = ["AdaptiveModelRouter", "RoutingPolicy", "RoutingStats", "TierRecommendation"]

logger = logging.getLogger("empathy_models.router")

_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)
_CLOSED: Final = (
    "AdaptiveModelRouter is closed (aclose() was called, or its `async with` block ended): "
    "its refresh has stopped and an owned store is closed, so it decides and learns no "
    "more; build a new AdaptiveModelRouter (`async with AdaptiveModelRouter(...) as "
    "router:`) and keep it open while it is used"
)
_RECENT_FALLBACK_LIMIT: Final = 10_000_000
_T = TypeVar("_T")
WINDOW_STEPS: Final = 168
"""The evidence window's start moves in steps of 1/WINDOW_STEPS of it (`window_floor`)."""


def _iso(ts: float | None) -> str:
    try:
        return "?" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return repr(ts)


def _since(floor: int | None) -> datetime:
    """The window's start (`window_floor`) as a datetime to read from."""
    return _EARLIEST if floor is None else datetime.fromtimestamp(floor, UTC)


def _seed_targets(
    arms: Iterable[tuple[str | None, str | None, str]], limit: int
) -> tuple[list[tuple[str, str | None]], set[str]]:
    """
    The recent-outcome windows a router's start reads: the first ``limit`` (workflow,
    stage) pairs of ``arms``, then each of their workflows (stage ``None``); and the
    workflows whose every stage is read, whose own window is the latest of theirs (one
    query without a stage can scan the whole table: ~0.85 s at 1M calls).  Calls
    without a workflow or stage are those of workflow or stage ``""`` (the store's
    filter ``""`` finds them, recorded as ``None`` or ``""``), as `RecentWindows` keys
    them; a workflow's calls without a stage count as one of its stages.
    """
    every = {(wf or "", st or "") for wf, st, _ in arms}
    stages = sorted(every)[:limit]
    read = set(stages)
    whole = {wf for wf, _ in stages if all((w, st) in read for w, st in every if w == wf)}
    return [*stages, *sorted({(wf, None) for wf, _ in stages})], whole


def window_step(days: float) -> float:
    """How far the window's start moves at once: 1/168 of it in whole minutes, at least one."""
    return max(float(BUCKET), math.floor(days * 86400.0 / WINDOW_STEPS / BUCKET) * BUCKET)


def window_floor(now: float, days: float) -> int | None:
    """
    Where the router's evidence window starts at ``now`` (epoch seconds): ``days``
    back, then down to a whole step of 1/168 of the window (an hour for a week; at
    least a minute), so that the window's start moves only once a step and every
    process, started whenever, counts the same buckets from the same start.  ``None``
    when that is before the earliest datetime (the whole history).
    """
    span = days * 86400.0
    step = window_step(days)
    floor = math.floor((now - span) / step) * step
    try:
        datetime.fromtimestamp(floor, UTC)
    except (OverflowError, ValueError, OSError):
        return None
    return int(floor)


def _by_arm(rows: Iterable[Sequence[Any]]) -> ChangedBuckets:
    """
    The changed buckets per arm, as (bucket start, sums), from rows of `ROW_FIELDS`.

    An empty workflow or stage is the same arm as none (as for live outcomes), so a
    minute's buckets of the two, which the store keeps apart, are added up.
    """
    by_arm: ChangedBuckets = {}
    merged: set[ArmKey] = set()
    for row in rows:
        workflow, stage = row[1], row[2]
        key = (workflow or None, stage or None, row[3])
        arm = by_arm.get(key)
        if arm is None:
            arm = by_arm[key] = []
        arm.append((row[0], row_sums(row)))
        if workflow == "" or stage == "":
            merged.add(key)
    for key in merged:
        sums: dict[int, Sums] = {}
        for t, v in by_arm[key]:
            held = sums.get(t)
            sums[t] = v if held is None else tuple(a + b for a, b in zip(held, v, strict=True))
        by_arm[key] = list(sums.items())
    return by_arm


async def _read_evidence(
    store: TelemetryBackend, since: datetime, after: int, rollups: bool
) -> tuple[ChangedBuckets, int, bool]:
    """
    The buckets changed in ``store`` since version ``after`` per arm, as (bucket start,
    sums); the version to ask after next; and whether the store keeps rollups (when it
    does not, ``recent`` is read instead: the whole window).
    """
    batch: EvidenceBatch | None = None
    if rollups:
        try:
            batch = await store.evidence(since=since, after_version=after)
        except NotImplementedError:
            rollups = False
            logger.info(
                "%r keeps no evidence rollups: the router reads its records instead "
                "(the whole window at every refresh)",
                store,
            )
    if batch is None:
        records = await store.recent(limit=_RECENT_FALLBACK_LIMIT, since=since)
        batch = EvidenceBatch(buckets=rollup(records), version=0)
    if len(batch) < _INLINE_ROWS:
        with gc_paused():
            return _by_arm(batch.rows), batch.version, rollups
    grouped = await asyncio.to_thread(_paused, lambda: _by_arm(batch.rows))
    return grouped, batch.version, rollups


_INLINE_ROWS: Final = 4096
"""Fewer rows than this are grouped (and new arms walked) in the event loop's thread."""


def _paused(work: Callable[[], _T]) -> _T:
    """``work()`` (in a worker thread) without collections of the whole process meanwhile."""
    with gc_paused():
        return work()


async def _walk_new(memory: EvidenceMemory, by_arm: ChangedBuckets) -> dict[ArmKey, Arm]:
    """
    The arms a read brings that the memory holds nothing of yet (every arm, at start),
    built from their buckets with the change test run over them (`Arm.walked`) in a
    worker thread, so that a start leaves the event loop free; `EvidenceMemory.apply`
    takes them over.  None when the buckets are few (they are applied in the loop).
    """
    new = {
        key: buckets
        for key, buckets in by_arm.items()
        if (arm := memory.arms.get(key)) is None or not (arm.starts or arm.saved)
    }
    if sum(map(len, new.values())) < _INLINE_ROWS:
        return {}
    test = memory.test
    return await asyncio.to_thread(
        _paused, lambda: {key: Arm.walked(test, dict(b)) for key, b in new.items()}
    )


async def _slide(memory: EvidenceMemory, floor: int) -> None:
    """
    Judge again from ``floor``, the window's new start, every arm holding older
    buckets, one arm at a time: the change test's walk over an arm's window (tens of
    milliseconds for a week of minute buckets) runs in a worker thread on a copy, so
    the event loop waits at most a thread switch interval for it, and outcomes that
    arrive meanwhile are applied to the walked copy when it is taken over.
    """
    behind = memory.behind(floor)
    for key, arm in behind:
        snapshot = arm.window_from(floor)
        fresh = await asyncio.to_thread(_paused, partial(Arm.walked, arm.test, snapshot))
        memory.adopt(key, arm, fresh, snapshot, floor)
    if behind:
        memory.settle()  # arms left with nothing in the window go


class _StorelessWindow:
    """
    Moves the window's start for a router without a store, which no refresh does: the
    first outcome or decision after the start has moved on (``due``) stops taking
    outcomes older than it and drops the older buckets, judging each arm that held some
    again (as `_slide` does), in a task when an event loop is running, else at once.
    A router with a store never is due (its refresh moves the window).  The
    recent-outcome windows older than the start go at once (`RecentWindows.expire`).
    """

    __slots__ = ("clock", "days", "due", "memory", "recent", "task", "warned")

    def __init__(
        self,
        memory: EvidenceMemory,
        recent: RecentWindows,
        clock: Callable[[], float],
        days: float,
        active: bool,
    ) -> None:
        self.memory = memory
        self.recent = recent
        self.clock = clock
        self.days = days
        self.due = -math.inf if active else math.inf
        self.task: asyncio.Task[None] | None = None
        self.warned = False

    def dropped(self, ts: float) -> None:
        """An outcome from before the window's start was not taken: said once, then DEBUG."""
        level = logging.DEBUG if self.warned else logging.WARNING
        self.warned = True
        logger.log(
            level,
            "router without a store ignored an outcome from %s, before its evidence "
            "window (RoutingPolicy.window_days=%g) starts at %s",
            _iso(ts),
            self.days,
            _iso(self.memory.cutoff),
        )

    def move(self) -> None:
        """Move the window's start to where it is now, and schedule the slide."""
        floor = window_floor(self.clock(), self.days)
        if floor is None:  # the window reaches back to the earliest datetime
            self.due = math.inf
            return
        self.due = floor + self.days * 86400.0 + window_step(self.days)
        memory = self.memory
        memory.cutoff = floor
        self.recent.expire(floor)
        if self.task is not None and not self.task.done():
            return  # the running slide moves on to the new start when it ends
        behind = memory.behind(floor)
        if not behind:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop runs: the slide is made here
            with gc_paused():
                for key, arm in behind:
                    memory.rebase(key, arm, floor)
                memory.settle()
            return
        self.task = background(self._run(floor), "empathy-models-router-window")

    async def _run(self, floor: int) -> None:
        try:
            while True:
                await _slide(self.memory, floor)
                later = self.memory.cutoff
                if later is None or later <= floor:
                    return
                floor = int(later)
        except Exception:
            logger.exception("router could not move its evidence window")

    def follow(self) -> None:
        """
        Move the window's start if the clock says it is due (an outcome stamped at or
        after ``due`` while the clock is not, ahead of it, moves nothing and costs no
        look at every arm).
        """
        if self.clock() >= self.due:
            self.move()

    async def settle(self) -> None:
        """Move the window's start if it is due, and wait for a slide under way."""
        self.follow()
        task = self.task
        if task is not None:
            await asyncio.wait({task})

    async def aclose(self) -> None:
        """Cancel and await a slide under way."""
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _store_of(telemetry_store: object) -> tuple[TelemetryBackend | None, bool]:
    """The router's backend, and whether the router owns it (built from a URL)."""
    if isinstance(telemetry_store, str):
        from .backends import telemetry_from_url

        return telemetry_from_url(telemetry_store), True
    if telemetry_store is None or isinstance(telemetry_store, TelemetryBackend):
        return telemetry_store, False
    raise ConfigurationError(
        "telemetry_store must be a TelemetryBackend, a URL string or None, "
        f"got {type(telemetry_store).__name__}"
    )


def _bound_loop(store: TelemetryBackend | None) -> asyncio.AbstractEventLoop | None:
    """The running loop, for a store doing I/O (bound to the loop it is opened in)."""
    from .backends.memory import MemoryTelemetryBackend
    from .backends.null import NullTelemetryBackend

    if isinstance(store, MemoryTelemetryBackend | NullTelemetryBackend | None):
        return None
    return running_loop()


async def _close_elsewhere(router: AdaptiveModelRouter) -> bool:
    """
    ``router.aclose()`` from another event loop than the one it started in: in that loop
    if it still runs (another thread), else the refresh task is dropped and the store
    closed as far as it can be from here (a `ResourceWarning` says so).  False: the
    running loop is the router's own.
    """
    home = router._loop
    if home is None or not elsewhere(home):
        return False
    if await close_at_home(home, router.aclose):
        return True
    router._closed = router._unready = True
    task, router._task = router._task, None
    if router._owns_store and router._store_obj is not None:
        await router._store_obj.aclose()
    if task is not None:
        dropped("AdaptiveModelRouter", "its refresh task", home)
    return True


async def _start(router: AdaptiveModelRouter) -> None:
    """
    What `AdaptiveModelRouter.start` does: open an owned store, read the evidence, fill
    the recent-outcome windows and start the periodic refresh.  Cut short (a
    cancellation, a store that cannot be opened) it leaves the router unstarted, so that
    the next start does it all again; once the router is closed meanwhile, it goes no
    further (no refresh task outlives `aclose`).
    """
    router._started = True
    router._loop = _bound_loop(router._store_obj)
    try:
        if router._owns_store and router._store_obj is not None:
            await router._store_obj.__aenter__()
        if router._store is None:
            logger.info(
                "router started without a telemetry store: routing uses only outcomes "
                "reported to this process"
            )
            return
        if router._closed:
            return  # closed while its store was opening: start() says so
        await router.refresh()
        if not router._closed:
            await _seed_rings(router)
    except BaseException:
        router._started = False
        router._unready = True
        raise
    if router.refresh_interval is not None and not router._closed:
        router._task = background(
            router._refresh_loop(router.refresh_interval), "empathy-models-router-refresh"
        )


async def _seed_rings(router: AdaptiveModelRouter) -> None:
    """
    Fill the router's recent-outcome windows at start: one ``recent`` call per workflow
    stage with evidence (and one per workflow for ``stage=None``, see `_seed_targets`),
    so a low-traffic stage is not starved by a busy one.  What was read is applied after
    the reads (up to the first that failed, which is logged and counted), so a start
    cancelled among them seeds nothing and the next start seeds each window once.
    """
    store = router._store
    limit = router.policy.seed_stage_limit
    if store is None or limit == 0:
        return
    now = router._clock()
    since = _since(window_floor(now, router.policy.window_days))
    targets, whole = _seed_targets(router._memory.arms, limit)
    by_stage: dict[str, list[LLMCallRecord]] = {}
    size = router.RECENT_WINDOW_SIZE
    read: list[tuple[str, str | None, list[LLMCallRecord]]] = []
    for workflow, stage in targets:
        try:
            if stage is None and workflow in whole:
                merged = by_stage.get(workflow, [])
                merged.sort(key=lambda r: r.timestamp)
                records = merged[-size:]
            else:
                records = await store.recent(
                    limit=size, workflow=workflow, stage=stage, since=since, samples_only=True
                )
                if stage is not None:
                    by_stage.setdefault(workflow, []).extend(records)
        except Exception as exc:
            router.refresh_errors += 1
            logger.warning(
                "router could not read recent calls from %r (%s: %s)",
                store,
                type(exc).__name__,
                exc,
            )
            break
        read.append((workflow, stage, records))
    else:
        router._recent.cutoff = now
    for workflow, stage, records in read:
        # seeded outcomes are older than anything already reported live
        router._recent.seed(workflow, stage, records)


def _lifecycle(router: AdaptiveModelRouter) -> None:
    """
    What a decision checks while ``router._unready``: raise after `aclose`; warn once
    when a store was given and not read (`start`).  Clears ``_unready`` once nothing is
    left to check (a start cut short, or `aclose`, sets it again).
    """
    if router._closed:
        raise NotOpenError(_CLOSED)
    if router._store is not None and not router._started and not router._warned_not_started:
        router._warned_not_started = True
        message = (
            "AdaptiveModelRouter has a telemetry store but was not started "
            "(use `async with router:`): decisions use only outcomes reported to this "
            "process"
        )
        logger.warning("%s", message)
        warn_caller(message)  # the caller's code is to change: seen without logging set up
    router._unready = False


class AdaptiveModelRouter:
    """
    Chooses the model for each call from in-memory, per-arm evidence.

    See the module docstring for its lifecycle (``async with``) and concurrency.

    Args:
        registry: models, tiers and prices (default `ModelRegistry.default`, as the executor's).
        telemetry_store: a `TelemetryBackend` or a URL (``"sqlite:///calls.db"``; its
            backend is owned and closed by the router).  Without one (or with the null
            backend) the router learns only from `record_outcome`, and `get_routing_stats`
            says so; its window still moves (see `RoutingPolicy.window_days`).
        policy: how evidence is weighed (default `RoutingPolicy()`).
        refresh_interval: how often (seconds, default 60; ``None`` disables) the started
            router reads what changed in the backend (with a store, the window's start
            moves at a refresh: with ``None``, only when you call `refresh`).
        rng, seed: either makes every random choice reproducible.
        clock: returns UTC epoch seconds.
        sleep: waits between refreshes (tests pass `FakeClock.sleep`: no real time passes).
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
        given: object = seed  # what random.Random takes; any other integer (numpy's) as an int
        if given is not None and not isinstance(given, int | float | str | bytes | bytearray):
            if (plain := plain_number(given, reals=False)) is None:
                raise ConfigurationError(f"seed must be an integer or None, got {shown(given)}")
            seed = int(plain)
        if refresh_interval is not None:
            refresh_interval = positive_number("refresh_interval", refresh_interval)
        self.registry = registry
        self.policy = policy if policy is not None else RoutingPolicy()
        if not isinstance(self.policy, RoutingPolicy):
            raise ConfigurationError(f"policy must be a RoutingPolicy, got {shown(policy)}")
        self.refresh_interval = refresh_interval
        self._rng = rng if rng is not None else random.Random(seed)
        self._clock = clock
        self._sleep = sleep
        store, self._owns_store = _store_of(telemetry_store)
        self._null_store = store is not None and not store.stores_records
        self._store_obj = store
        self._store: TelemetryBackend | None = None if self._null_store else store
        self._memory = EvidenceMemory(self.policy.change_test)
        self._verdicts = VerdictCache(registry, self.policy, self._memory, clock)
        self._decider = Decider(self._verdicts, self.policy, self._rng)
        self._recent = RecentWindows(self.RECENT_WINDOW_SIZE, self._verdicts.model_facts)
        self._window = _StorelessWindow(
            self._memory, self._recent, clock, self.policy.window_days, self._store is None
        )
        self._rollups = True  # False: the backend keeps none, read records instead
        self._refresh_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned_not_started = False
        self._unready = self._store is not None  # a decision checks: closed, store unread
        self.refresh_errors = 0
        """How many reads of the backend failed."""
        self.last_refresh: float | None = None
        """Epoch seconds of the last successful refresh (``None``: never)."""

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **options: Any) -> Self:
        """
        A router over ``empathy.toml``'s registry and telemetry database (owning the backend).

        As `EmpathyLLMExecutor.from_config` builds it: the directory of a SQLite
        database is created (``$EMPATHY_HOME`` on first use), and a URL refused is named
        with the file and key it came from.

        Args:
            path: the file (found as `empathy_models.config.find_config_file` says).
            **options: passed to the constructor; ``registry`` and ``telemetry_store``
                win over the file's.
        """
        from .config import EmpathyConfig

        config = EmpathyConfig.load(path)
        registry = options.pop("registry", None)
        if registry is None:
            registry = config.registry()
        telemetry = options.pop("telemetry_store", None)
        if telemetry is None:
            config.telemetry_store()  # refused naming the file and key; built from the URL
            config.ensure_directory("telemetry")
            telemetry = config.telemetry_url
        return cls(registry, telemetry, **options)

    @property
    def telemetry_store(self) -> TelemetryBackend | None:
        """The telemetry backend the router reads its evidence from (None: none)."""
        return self._store_obj

    @property
    def closed(self) -> bool:
        """True once `aclose` has been called: decisions and outcomes raise `NotOpenError`."""
        return self._closed

    def __repr__(self) -> str:
        return (
            f"AdaptiveModelRouter(arms={len(self._memory.arms)}, store={self._store_obj!r}, "
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
        Read the backend's evidence and start the periodic refresh; idempotent (a call
        while another is starting the router waits for it).  A start cut short (cancelled,
        or an owned store that could not be opened) leaves the router unstarted: the next
        call starts it.

        Backend errors are logged, not raised.

        Raises:
            NotOpenError: after `aclose` (also one while this call was starting the
                router: no refresh is left running), or started already in another event
                loop.
        """
        if self._closed:
            raise NotOpenError(_CLOSED)
        if self._started and elsewhere(self._loop):  # its task and store are bound to it
            raise other_loop_error("AdaptiveModelRouter")
        async with self._start_lock:
            if not self._started and not self._closed:
                await _start(self)
        if self._closed:
            raise NotOpenError(
                "AdaptiveModelRouter was closed (aclose()) while this start was under way, "
                "and cannot be started again: build a new AdaptiveModelRouter"
            )

    async def aclose(self) -> None:
        """Stop the refresh task (awaited), close an owned store (see `_close_elsewhere`)."""
        if self._closed or (self._loop is not None and await _close_elsewhere(self)):
            return
        self._closed = self._unready = True
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
            await self._window.aclose()
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

        The backend is flushed first (so records this process handed to a batching backend
        are visible); changed buckets replace the router's (see the module docstring) and the
        change test re-runs from the earliest changed bucket of each arm (a large read's
        new arms, every arm at start, are built in a worker thread, the event loop free
        meanwhile).  When the
        window's start has moved on (once a step: see `RoutingPolicy.window_days`), the
        buckets before it are dropped and each arm holding some is judged again from the
        new start, one arm at a time, the walk in a worker thread; a router started
        now would hold the same.  Concurrent calls are serialized.

        Without a store it only moves the window's start if that is due, and waits for
        such a move under way.

        Returns:
            ``True`` on success; ``False`` without a store, or on a backend error, which is
            logged as a warning and counted in `refresh_errors` (the evidence is kept,
            but for what fell out of the window, which goes as on success).

        Raises:
            NotOpenError: after `aclose`, or started in another event loop.
        """
        if self._closed:
            raise NotOpenError(_CLOSED)
        if elsewhere(self._loop):
            raise other_loop_error("AdaptiveModelRouter")
        store = self._store
        if store is None:
            await self._window.settle()
            return False
        async with self._refresh_lock:
            cutoff = self._clock()
            floor = window_floor(cutoff, self.policy.window_days)
            since = _since(floor)
            try:
                await store.flush()
                by_arm, version, self._rollups = await _read_evidence(
                    store, since, self._memory.version, self._rollups
                )
            except Exception as exc:
                self.refresh_errors += 1
                logger.warning(
                    "router refresh from %r failed (%s: %s); keeping the previous evidence",
                    store,
                    type(exc).__name__,
                    exc,
                )
                if floor is not None:  # what fell out of the window goes all the same
                    await _slide(self._memory, floor)
                    self._recent.expire(floor)
                return False
            walked = await _walk_new(self._memory, by_arm)
            with gc_paused():
                self._memory.apply(by_arm, version, cutoff, walked)
            self.last_refresh = cutoff
            logger.debug(
                "router refreshed %d buckets from %r", sum(map(len, by_arm.values())), store
            )
            if floor is not None:
                await _slide(self._memory, floor)
                self._recent.expire(floor)
            return True

    # ------------------------------------------------------------------ learning

    def record_outcome(self, record: LLMCallRecord) -> None:
        """
        Learn from one attempt, without I/O.

        Only sample outcomes count (success, failure, rate_limited, fatal); ignored,
        cancelled and rejected attempts are dropped.  A record timestamped before the
        last refresh began is not added (the backend holds it, or will); without a
        store, one from before the window's start is not (a warning says so, once).
        A workflow or stage no store keeps as given (with a NUL or a lone surrogate, as
        `ExecutionContext` refuses) is a `ConfigurationError`.

        Raises:
            NotOpenError: after `aclose`.
        """
        if self._closed:
            raise NotOpenError(_CLOSED)
        if not (plain_name(record.workflow or "") and plain_name(record.stage or "")):
            check_names(record.workflow or "", record.stage)
        if not record.outcome.is_sample:
            return
        ts = record.timestamp.timestamp()
        if ts >= self._window.due:
            self._window.follow()
        self._recent.add(record, ts)
        if not self._memory.add(record, ts) and self._store is None:
            self._window.dropped(ts)

    # ------------------------------------------------------------------ deciding

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
        Choose a model for one call of ``workflow``/``stage``: no I/O, O(len(candidates)).
        An exploration pick (``exploration=True``, ``constraints_met=False``) made because no
        candidate is eligible is logged as a warning the first time per stage (then DEBUG).

        Args:
            workflow, stage: the stage the call is for.
            candidates: model ids, in any order (default: every model in the registry); ids
                missing from the registry are excluded (``"not in the model registry"``).
            input_tokens, max_tokens: the expected cost's: a model's mean output tokens (the
                stage's if unmeasured, else ``max_tokens``), at most ``max_tokens``.
            max_cost, max_latency_ms, min_success_rate: the constraints (the last defaults to
                the policy's ``default_min_success_rate``); cost: `decide.cost_factor`.
            on_no_match: with no candidate eligible or explorable: ``"raise"``; ``"relax"``
                drops constraints in the policy's ``relax_order`` until one qualifies, but
                none it still would with (``relaxed``); any other string is a pinned model
                id, returned with ``policy_applied="pinned"`` unless its circuit is open.
            unavailable: ids with an open circuit, excluded (``"circuit open"``).
            strict_cost: hold ``max_cost`` against the worst case (``max_tokens`` output
                tokens, defaulting to the model's maximum); needs ``input_tokens``.
            max_ttft_ms: bounds the p95 time to first token of streamed successful calls,
                judged as ``max_latency_ms`` is (a model never streamed is unproven).

        Returns:
            A `RoutingDecision` listing every candidate with its evidence (built when first
            read).  ``constraints_met`` is true only when the chosen model is ELIGIBLE on
            every constraint given (so never with an expected cost above ``max_cost``).

        Raises:
            NoModelMeetsConstraintsError: with every candidate's reasons: on ``"raise"``,
                and with every candidate unavailable (even on ``"relax"``).
            ConfigurationError: invalid arguments.
            NotOpenError: after `aclose`.
        """
        if self._unready:  # closed, or a store not read yet
            _lifecycle(self)
        if not (plain_name(workflow) and (stage is None or plain_name(stage))):
            check_names(workflow, stage)
        limits, input_tokens = decision_limits(
            self.policy.default_min_success_rate if min_success_rate is None else min_success_rate,
            max_latency_ms,
            max_cost,
            strict_cost,
            max_tokens,
            max_ttft_ms,
            input_tokens,
            on_no_match,
        )
        ctx, pinned = self._context(workflow, stage, candidates, limits, on_no_match)
        blocked = blocked_set(unavailable)
        costs, eligible, explorable, probeable = classify(ctx, input_tokens, blocked)
        picked = select(ctx, costs, eligible, explorable, probeable, self._rng, self.policy)
        if (now := self._clock()) >= self._window.due:
            self._window.move()
        if picked is None:
            return self._decider.no_match(
                workflow, stage, ctx, costs, on_no_match, pinned, input_tokens, blocked, now
            )
        index, kind, why = picked
        if kind is not None and not eligible:
            self._decider.log_unproven(workflow, stage, ctx.models[index], why)
        return self._decider.decide(
            workflow, stage, ctx, costs, index, kind, why, input_tokens, blocked, now
        )

    def _context(
        self,
        workflow: str,
        stage: str | None,
        candidates: Sequence[str] | None,
        limits: Limits,
        on_no_match: str,
    ) -> tuple[Context, str | None]:
        # the decision's context, and the model on_no_match pins (None: "raise", "relax")
        names = candidate_names(candidates, self._default_candidates, workflow, stage)
        pinned: str | None = None if on_no_match in ("raise", "relax") else on_no_match
        verdicts = self._verdicts
        if pinned is not None and pinned not in names and verdicts.model_facts(pinned) is None:
            raise ConfigurationError(
                f"on_no_match pins {pinned!r}, which is neither a candidate nor in the registry"
            )
        try:
            return verdicts.context(workflow or None, stage or None, names, limits), pinned
        except TypeError:  # an unhashable candidate id
            raise ConfigurationError(
                f"candidate model ids must be non-empty strings, got {shown(names)}"
            ) from None

    # ------------------------------------------------------------------ reports

    def recommend_tier_upgrade(self, workflow: str, stage: str | None) -> TierRecommendation:
        """
        Advise moving ``workflow``/``stage`` (``None``: every stage; ``""``: the calls
        without a stage, and workflow ``""`` those without a workflow) up a tier.

        Looks at the last `RECENT_WINDOW_SIZE` (20) sample outcomes this router has seen
        (read from the backend at start, then live; none from before the evidence
        window's start, `RoutingPolicy.window_days`), forgotten once all of them are
        older than that start.  With fewer than
        `MIN_SAMPLE_SIZE` (10) it declines for lack of data; a failure rate strictly above
        `FAILURE_RATE_THRESHOLD` (20%) advises the next tier above the highest one
        that served the calls.  Pure read of memory; never modifies routing.
        """
        check_names(workflow, stage)
        return recommend(
            workflow,
            stage,
            self._recent.window(workflow or "", stage),
            min_sample_size=self.MIN_SAMPLE_SIZE,
            threshold=self.FAILURE_RATE_THRESHOLD,
        )

    async def get_routing_stats(
        self, workflow: str, stage: str | None = None, days: float = 7
    ) -> RoutingStats:
        """
        Per-model `RoutingStats` of ``workflow`` from the backend (whose errors propagate).

        Args:
            workflow, stage: the workflow and one stage (``None``: every stage, ``"all"``;
                ``""``: the calls recorded without one).
            days: the window, in days back from the router's clock (positive).

        Returns:
            The stats, always, also without telemetry: ``telemetry`` is ``"none"`` without a
            store or when the store has never received a record, with a ``message`` saying
            what is missing.

        Raises:
            NotOpenError: after `aclose`, or started in another event loop.
        """
        check_names(workflow, stage)
        days = positive_number("days", days)
        if self._closed:
            raise NotOpenError(_CLOSED)
        if elsewhere(self._loop):
            raise other_loop_error("AdaptiveModelRouter")
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
        perfs = [p for p in perfs if (p.workflow or "") == workflow]
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
            workflow,
            shown,
            days,
            perfs,
            z=self.policy.z,
            min_sample_size=self.MIN_SAMPLE_SIZE,
            tier_of=lambda model: (
                None if (f := self._verdicts.model_facts(model)) is None else f.tier
            ),
        )
