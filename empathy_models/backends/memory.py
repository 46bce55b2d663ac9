"""
In-process backends: fast, exact, and gone when the process exits.

`MemoryTelemetryBackend` keeps at most ``capacity`` records (default 100,000); when full
it drops the oldest, counts them in `evicted`, and warns once.  The evidence rollups of
the records it dropped are kept for ``evidence_days`` (default 31) back from the newest
record, so its memory stays bounded.  Like the SQLite and
PostgreSQL backends it keeps one record per ``call_id`` (the first written).
`MemoryStateStore` keeps breaker state in a dict; every operation runs without an
``await`` between read and write, so it is atomic within the event loop without a lock.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import attrs

from .._stats import Spend, aggregate_records, matches, spend_of
from .._validators import check, failure, integer, number, plain_number, shown
from ..abc import TelemetryBackend, TransactionalStateStore
from ..circuit import (
    CLOCK_STEP,
    BreakerPolicy,
    _closed_success_runs,
    _closed_successes,
    initial_state,
    unstepped,
)
from ..evidence import (
    BUCKET_SECONDS,
    EvidenceBatch,
    EvidenceBucket,
    merge_buckets,
    rollup,
    sorted_buckets,
)
from ..exceptions import ConfigurationError, RecordValidationError
from ..records import CircuitBreakerState, CircuitState, LLMCallRecord, ModelPerformance
from ._plugin import BackendPlugin

__all__ = ["MemoryStateStore", "MemoryTelemetryBackend"]

T = TypeVar("T")

logger = logging.getLogger("empathy_models.telemetry")

_CLOSED = CircuitState.CLOSED
_floor = math.floor

_BUCKET = timedelta(seconds=BUCKET_SECONDS)

_MAX_RUNS = 8
"""A key's tail folds when it would hold more runs (window buckets) than this."""


_capacity = integer(failure(ConfigurationError), low=1, why="must be an integer >= 1")
_evidence_days = number(
    failure(ConfigurationError),
    low=0.0,
    low_open=True,
    optional=True,
    why="must be a finite number of days > 0, or None",
)
_MAX_DAYS = 999_999_999  # timedelta's largest number of days: further keeps everything


class MemoryTelemetryBackend(TelemetryBackend):
    """
    Records in a bounded in-memory ring; exact aggregation by scanning.

    Writes are idempotent by ``call_id``, as in the SQLite and PostgreSQL backends: a
    record whose ``call_id`` the ring holds is skipped (the first written is kept, a
    replay counts once).  Only the ring's ids are kept: a record written again after
    its first was dropped (past ``capacity``) or purged is stored again.

    Args:
        capacity: the most records kept; past it the oldest are dropped, counted in
            `evicted` (a warning once); their evidence rollups are kept.
        evidence_days: how long the evidence rollups of dropped records are kept, in
            days back from the newest record written (default 31: a router whose
            ``RoutingPolicy.window_days`` is up to 30 finds all it asks for); ``None``
            keeps them all (memory then grows by one rollup per workflow, stage, model
            and minute for ever).  The evidence of records still held is kept whatever
            their age.  Older rollups go a while after they fall out (every
            ``capacity // 2`` records dropped), so at most about that many minutes,
            and the ring's own, are held beyond the retention per key.

    Raises:
        ConfigurationError: ``capacity`` not an integer >= 1, or ``evidence_days`` not
            a number > 0 or ``None``.
    """

    def __init__(self, *, capacity: int = 100_000, evidence_days: float | None = 31) -> None:
        self.capacity = check(_capacity, "capacity", capacity)
        self.evidence_days = check(_evidence_days, "evidence_days", evidence_days)
        self._keep = (
            None
            if evidence_days is None or evidence_days > _MAX_DAYS
            else timedelta(days=evidence_days)
        )
        self._newest: datetime | None = None  # the newest bucket rolled up
        self._prune_at = max(1, self.capacity // 2)  # `evicted` at the next prune
        self.evicted = 0
        self._records: deque[LLMCallRecord] = deque()
        self._ids: set[str] = set()  # the call_id of every record in the ring
        # evidence rollups survive eviction: they are small and the router needs them
        self._buckets: dict[tuple[str | None, str | None, str, datetime], EvidenceBucket] = {}
        self._version = 0
        self._unrolled: list[LLMCallRecord] = []

    def __repr__(self) -> str:
        return f"MemoryTelemetryBackend(records={len(self._records)}, capacity={self.capacity})"

    def __len__(self) -> int:
        return len(self._records)

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self._check_open()
        batch = list(records)
        for r in batch:
            if not isinstance(r, LLMCallRecord):
                raise RecordValidationError(f"expected an LLMCallRecord, got {type(r).__name__}")
        ids = self._ids
        new = {r.call_id for r in batch}
        if len(new) == len(batch) and ids.isdisjoint(new):
            ids |= new
        else:  # a call_id held, or twice in the batch: the first of each, if new
            batch = _first_new(batch, ids)
        self._records.extend(batch)
        # rolled into the evidence buckets when they are next read (or before eviction):
        # one rollup per read instead of one per record
        self._unrolled.extend(batch)
        overflow = len(self._records) - self.capacity
        if overflow > 0:
            self._roll_up()  # their evidence is kept, and no record outside the ring
            if self.evicted == 0:
                warnings.warn(
                    f"MemoryTelemetryBackend is full ({self.capacity} records); the oldest "
                    "records are being dropped. Use a SQLite or PostgreSQL backend to keep them.",
                    ResourceWarning,
                    stacklevel=2,
                )
            popleft, discard = self._records.popleft, ids.discard
            for _ in range(overflow):
                discard(popleft().call_id)
            self.evicted += overflow
            if self.evicted >= self._prune_at:
                self._prune()

    def _prune(self) -> None:
        """
        Drop the evidence buckets that ended ``evidence_days`` or more before the newest
        one and hold no record of the ring (every record in a bucket that ended by the
        ring's oldest timestamp has been dropped).  Runs once every ``capacity // 2``
        records dropped: it reads the whole ring.
        """
        self._prune_at = self.evicted + max(1, self.capacity // 2)
        if self._keep is None or self._newest is None:
            return
        try:
            cut = self._newest - self._keep
            cut = min(cut, min(r.timestamp for r in self._records))
        except (OverflowError, TypeError):  # before year 1, or a naive record: keep all
            return
        buckets = self._buckets
        old = [k for k, b in buckets.items() if cut - b.bucket_start >= _BUCKET]
        for k in old:
            del buckets[k]

    def _roll_up(self) -> None:
        """
        Add the records not yet rolled up to the evidence buckets, as one version.  A
        record whose rollup fails is left out of the evidence (logged), the others kept.
        """
        batch = self._unrolled
        if not batch:
            return
        self._unrolled = []
        try:
            partials = rollup(batch)
        except Exception:
            partials = _rollup_each(batch)
        if partials:
            newest = max(p.bucket_start for p in partials)
            if self._newest is None or newest > self._newest:
                self._newest = newest
            self._version += 1
            version = self._version
            buckets = self._buckets
            for p in partials:
                old = buckets.get(p.key)
                buckets[p.key] = (
                    attrs.evolve(p, version=version)
                    if old is None
                    else merge_buckets(old, p, version=version)
                )

    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        rows = (
            r
            for r in self._records
            if matches(r, workflow=workflow, stage=stage, since=since, until=until)
        )
        return aggregate_records(rows, per_stage=per_stage)

    async def _recent(
        self,
        *,
        limit: int,
        workflow: str | None,
        stage: str | None,
        model: str | None,
        since: datetime | None,
        until: datetime | None,
        samples_only: bool,
    ) -> list[LLMCallRecord]:
        rows = [
            (r.timestamp, i, r)
            for i, r in enumerate(self._records)
            if matches(r, workflow=workflow, stage=stage, since=since, until=until, model=model)
            and (not samples_only or r.outcome.is_sample)
        ]
        rows.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [r for _, _, r in rows[:limit]]

    async def _spend(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> Spend:
        return spend_of(
            r
            for r in self._records
            if matches(r, workflow=workflow, stage=stage, since=since, until=until)
        )

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        self._roll_up()
        rows = [
            b
            for b in self._buckets.values()
            if b.version > after_version
            and (since is None or b.bucket_start >= since)
            and (until is None or b.bucket_start < until)
        ]
        return EvidenceBatch(buckets=sorted_buckets(rows), version=self._version)

    async def _purge(self, *, before: datetime) -> int:
        self._roll_up()
        # the buckets that end after ``before``, compared as a difference: exact, and the
        # last bucket of year 9999 ends past the last datetime
        self._buckets = {
            k: b for k, b in self._buckets.items() if before - b.bucket_start < _BUCKET
        }
        kept = deque(r for r in self._records if r.timestamp >= before)
        removed = len(self._records) - len(kept)
        self._records = kept
        if removed:
            self._ids = {r.call_id for r in kept}
        return removed


def _first_new(batch: list[LLMCallRecord], ids: set[str]) -> list[LLMCallRecord]:
    """The records of ``batch`` whose ``call_id`` is not in ``ids``, the first of each;
    their ids are added to ``ids``."""
    kept = []
    for r in batch:
        if r.call_id not in ids:
            ids.add(r.call_id)
            kept.append(r)
    return kept


def _rollup_each(batch: list[LLMCallRecord]) -> list[EvidenceBucket]:
    """
    The rollup of the records of ``batch`` that roll up on their own (a batch whose
    rollup failed); each one that does not is logged and left out.
    """
    kept = []
    for r in batch:
        try:
            rollup((r,))
        except Exception as exc:
            logger.warning(
                "MemoryTelemetryBackend: record %s is left out of the evidence: its rollup "
                "failed (%s: %s)",
                r.call_id,
                type(exc).__name__,
                exc,
            )
        else:
            kept.append(r)
    return rollup(kept)


def _bucket_end(bucket: int, width: float) -> float:
    """
    The least time whose window bucket (``floor(t / width)``, as `circuit._bucket`) is
    past ``bucket``: as that floor never decreases with ``t``, a time below it and at or
    above one known to be in ``bucket`` is in ``bucket``.
    """
    end = (bucket + 1) * width
    while _floor(end / width) > bucket:
        end = math.nextafter(end, -math.inf)
    while _floor(end / width) <= bucket:
        end = math.nextafter(end, math.inf)
    return end


class _Tail:
    """
    Successes added to a stored CLOSED state by the breaker's in-process path and not
    yet folded into it: runs of successes of the state's generation under ``policy``,
    each ``(bucket, count)`` (its window bucket), in the order added (``runs``, then the
    last one: ``bucket`` and ``count``), the last at ``now``.  Folded
    (`circuit._closed_success_runs`), they give exactly the state `record` would have
    stored for them one by one.  ``state`` is the stored state the
    tail belongs to (every change of it folds the tail first; ``None`` once folded:
    a breaker's view may keep the tail as a hint), ``generation`` its generation,
    ``width`` the policy's bucket length, ``clock`` the store's; every time from ``now``
    up to ``end`` (exclusive) is in the last run's bucket.
    """

    __slots__ = (
        "bucket",
        "clock",
        "count",
        "end",
        "generation",
        "now",
        "policy",
        "runs",
        "state",
        "width",
    )

    def __init__(
        self,
        state: CircuitBreakerState,
        policy: BreakerPolicy,
        bucket: int,
        count: int,
        now: float,
        clock: Callable[[], float],
    ) -> None:
        self.clock = clock
        self.state: CircuitBreakerState | None = state
        self.generation = state.generation
        self.policy = policy
        self.width = policy.bucket_seconds
        self.bucket = bucket
        self.count = count
        self.runs: list[tuple[int, int]] = []
        self.end = _bucket_end(bucket, self.width)
        self.now = now


KEY_TTL = 7 * 86400.0
"""How long `MemoryStateStore` keeps a key nothing was written to (plus what remains of
an open period), as the Redis store's ``key_ttl`` does by default."""

SWEEP_KEYS = 4096
"""How many keys `MemoryStateStore` holds before a new key's first write sweeps the idle
ones (then again when they have doubled)."""


class MemoryStateStore(TransactionalStateStore):
    """
    Breaker state for one process.

    A key nothing was written to for ``key_ttl`` seconds (plus whatever remained of an
    open period at its last write) is forgotten, as a Redis key expires: it reads as
    a fresh CLOSED key again, so a breaker keyed per tenant holds the tenants in use,
    not every one it ever saw.  A FORCED_OPEN key without an end and a DISABLED key are
    kept until a reset.  Such a key reads, counts and lists as never written from the
    moment its time is up; its memory is freed when it is next read or written, or by
    a sweep when a new key is written past `SWEEP_KEYS` keys (then past twice the keys
    kept).

    Args:
        clock: Returns UTC epoch seconds (default `time.time`); tests inject a fake one.
        states: States to start from, one per key (default: none, every key CLOSED).
        key_ttl: seconds, `KEY_TTL` (a week) by default; ``None`` keeps every key.

    Raises:
        ConfigurationError: ``clock`` not callable, or ``key_ttl`` not a number of
            seconds above 0 or None.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        states: Iterable[CircuitBreakerState] = (),
        key_ttl: float | None = KEY_TTL,
    ) -> None:
        if not callable(clock):
            raise ConfigurationError(f"clock must be callable, got {shown(clock)}")
        ttl = None if key_ttl is None else plain_number(key_ttl)  # numpy's numbers too
        if key_ttl is not None and not (ttl is not None and ttl > 0):
            raise ConfigurationError(
                f"key_ttl must be a number of seconds above 0 or None, got {shown(key_ttl)}"
            )
        self._clock = clock
        self._key_ttl = None if ttl is None else float(ttl)
        self._states: dict[str, CircuitBreakerState] = {state.key: state for state in states}
        # successes of the breaker's in-process path not yet folded into `_states`; every
        # operation but that path's two folds them first, so none of them sees a tail
        self._tails: dict[str, _Tail] = {}
        self._sweep_at = SWEEP_KEYS  # keys held before a new key's write sweeps

    def __repr__(self) -> str:
        return f"MemoryStateStore(keys={len(self._states)})"

    async def now(self) -> float:
        """The store's ``clock``, which times its states."""
        self._check_open()
        return self._clock()

    @property
    def in_process(self) -> bool:
        """
        True: every operation completes without waiting.  A subclass is assumed to wait
        (I/O, locks, events: its calls then get the breaker's timeouts and cancellation
        shields) unless it overrides this.
        """
        return type(self) is MemoryStateStore

    async def _aclose(self) -> None:
        for key in list(self._tails):
            self._fold(key)  # no tail stays live: a breaker's hint no longer admits

    async def _transact(
        self,
        key: str,
        fn: Callable[[CircuitBreakerState | None, float], tuple[CircuitBreakerState | None, T]],
    ) -> T:
        now = self._clock()
        current = self._live(key, now)
        new, result = fn(current, now)
        if new is not None and new is not current:
            if current is None and len(self._states) >= self._sweep_at:
                self._sweep()
            self._states[key] = new
        return result

    def _live(self, key: str, now: float) -> CircuitBreakerState | None:
        """
        ``key``'s stored state, its tail folded in, or ``None``: never written, or idle
        past ``key_ttl`` at ``now`` (forgotten here and now, as a Redis key expires, so
        no read or write before the next sweep finds what it held).
        """
        state = self._states.get(key) if key not in self._tails else self._fold(key)
        ttl = self._key_ttl
        if state is not None and ttl is not None and _expired(state, None, ttl, now):
            del self._states[key]
            return None
        return state

    def _sweep(self) -> None:
        """
        Forget the keys idle past ``key_ttl`` (see the class); the next sweep comes
        when the keys kept have doubled, so each costs a constant share per new key.
        """
        ttl = self._key_ttl
        states = self._states
        if ttl is not None:
            now = self._clock()
            tails = self._tails
            for key in [
                k for k, state in states.items() if _expired(state, tails.get(k), ttl, now)
            ]:
                self._forget(key)
        self._sweep_at = max(SWEEP_KEYS, 2 * len(states))

    def _forget(self, key: str) -> None:
        """Drop ``key``'s state and tail: it reads as never written."""
        del self._states[key]
        tail = self._tails.pop(key, None)
        if tail is not None:
            tail.state = None  # a hint held elsewhere is no longer live

    async def _load(self, key: str) -> CircuitBreakerState | None:
        return self._live(key, self._clock())

    async def _load_all(self) -> list[CircuitBreakerState]:
        now = self._clock()
        states = (self._live(key, now) for key in list(self._states))
        return [state for state in states if state is not None]

    # The breaker's in-process path (`CircuitBreaker` on this exact class): a view it
    # holds is checked against the stored object instead of re-read, and each success
    # is added at once without building a report or, within one window bucket, a new
    # state (the key's tail; a breaker's view keeps the live tail as a hint).

    def _fold(self, key: str) -> CircuitBreakerState:
        """Fold ``key``'s tail into its stored state; return the new state."""
        tail = self._tails.pop(key)
        tail.state = None  # a hint held elsewhere is no longer live
        state = self._states[key] = _closed_success_runs(
            self._states[key], tail.policy, [*tail.runs, (tail.bucket, tail.count)], tail.now
        )
        return state

    def _fold_with(
        self, key: str, tail: _Tail, bucket: int, count: int, now: float
    ) -> CircuitBreakerState:
        """Fold ``key``'s tail and one more run (a tail is kept short)."""
        tail.runs.append((tail.bucket, tail.count))
        tail.bucket = bucket
        tail.count = count
        tail.now = now
        return self._fold(key)

    def _holds(self, state: CircuitBreakerState) -> bool:
        """
        Internal: whether ``state`` is still its key's state here, as far as admission
        goes: the very object stored (successes added since in a tail change counts
        only).  A key never written holds nothing: its first admission goes through
        `admit`, which stores it, so that `reset` finds it and outdates the tickets
        handed out.  A closed store holds nothing.
        """
        return self._states.get(state.key) is state and not self._closed

    def _add_successes(
        self,
        key: str,
        policy: BreakerPolicy,
        generation: int,
        count: int,
        tail: _Tail | None = None,
    ) -> CircuitBreakerState | None:
        """
        Internal: ``count`` successes of CLOSED tickets of ``generation``, with exactly
        the effect of `record` on such a batch (the store's reads see them at once).
        Returns the stored state object (successes in its tail are not in it: read
        it for its state and generation only), or ``None`` (nothing done) when the key is
        not CLOSED in that generation or the store is closed: `record` then decides.

        Successes under one policy go to the key's tail, one run per window bucket:
        adding ``c1`` at ``t1`` and then ``c2`` at ``t2`` in the same bucket gives the
        state adding ``c1 + c2`` at ``t2`` gives (the first step already dropped the
        buckets out of the window, the second only adds to the last one and sets the
        time); runs of other buckets are applied in turn when folded.  ``tail``: the
        key's tail as last seen (`_tail`), a hint that spares a lookup while live.
        """
        if tail is None or tail.state is None:
            tail = self._tails.get(key)
        if tail is not None and tail.policy is policy and tail.generation == generation:
            # the common case: one more success in the last run's bucket
            now = self._clock()
            # in the last run's bucket, and the clock not stepped back since the tail's last
            # write (a time in that bucket): a step back of any size takes the path below
            if tail.now <= now < tail.end and not self._closed:
                tail.count += count
                tail.now = now
                return tail.state
        return self._add_to_state(key, policy, generation, count)

    def _tail(self, key: str) -> _Tail | None:
        """Internal: ``key``'s tail, if any (a hint for `_add_successes`)."""
        return self._tails.get(key)

    def _add_to_state(
        self, key: str, policy: BreakerPolicy, generation: int, count: int
    ) -> CircuitBreakerState | None:
        """`_add_successes` past its common case."""
        if self._closed:
            return None
        now = self._clock()
        state = self._states.get(key)
        ttl = self._key_ttl
        # idle past key_ttl (its tail counted): forgotten, so these successes start a
        # fresh state, as they would on a Redis key that expired
        if (
            state is not None
            and ttl is not None
            and _expired(state, self._tails.get(key), ttl, now)
        ):
            self._forget(key)
            state = None
        if state is None:
            if len(self._states) >= self._sweep_at:
                self._sweep()
            state = initial_state(key, now)
        elif state.state is _CLOSED and state.generation == generation:
            bucket = _floor(now / policy.bucket_seconds)  # as circuit._bucket
            tail = self._tails.get(key)
            if tail is not None and tail.now - now > CLOCK_STEP:
                state, tail = self._fold(key), None  # the clock stepped back since
            if tail is None:
                # no tail when a key may expire within one of its buckets: the tail's
                # common case would add to a key forgotten since its last success
                if ttl is None or ttl >= policy.bucket_seconds:
                    # times a clock stepped back left ahead move first, as `record` does
                    moved = unstepped(state, now, policy)
                    if moved is not state:
                        state = self._states[key] = moved
                    self._tails[key] = _Tail(state, policy, bucket, count, now, self._clock)
                    return state
            elif tail.policy is policy:
                if tail.bucket == bucket:
                    tail.count += count
                elif len(tail.runs) + 1 < _MAX_RUNS:
                    tail.runs.append((tail.bucket, tail.count))
                    tail.bucket = bucket
                    tail.count = count
                    tail.end = _bucket_end(bucket, tail.width)
                else:
                    return self._fold_with(key, tail, bucket, count, now)
                tail.now = now
                return state
            else:
                state = self._fold(key)  # a tail under another policy
        if state.state is not CircuitState.CLOSED or state.generation != generation:
            return None
        state = unstepped(state, now, policy)
        new = self._states[key] = _closed_successes(state, policy, count, now)
        return new


def _expired(state: CircuitBreakerState, tail: _Tail | None, ttl: float, now: float) -> bool:
    """
    Whether ``state`` (with successes in ``tail``, if any) was last written more than
    ``ttl`` seconds before ``now``, plus what remained of its open period then: never
    for a FORCED_OPEN key without an end, a DISABLED key, or a state without a time.
    """
    kind = state.state
    if kind is CircuitState.DISABLED or (
        kind is CircuitState.FORCED_OPEN and state.open_until_ts is None
    ):
        return False
    last = state.updated_at_ts
    if tail is not None and (last is None or tail.now > last):
        last = tail.now
    if last is None:
        return False
    until = state.open_until_ts
    left = until - last if until is not None and until > last else 0.0
    return now - last > ttl + left


def _telemetry(
    url: str, *, capacity: int = 100_000, evidence_days: float | None = 31
) -> TelemetryBackend:
    return MemoryTelemetryBackend(capacity=capacity, evidence_days=evidence_days)


def _store(url: str, **options: Any) -> MemoryStateStore:
    return MemoryStateStore(**options)


PLUGIN = BackendPlugin(
    schemes=("memory",),
    package="empathy-models",
    telemetry=_telemetry,
    state_store=_store,
)
