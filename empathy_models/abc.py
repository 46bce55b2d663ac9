"""
What implementers subclass: telemetry backends, circuit-state stores and providers.

Users rarely touch these classes directly; they pass an instance (or a URL that
`empathy_models.backends` turns into one) to the executor, router or breaker.  Each
class is an async resource: ``async with backend:`` opens it if needed and closes it
on exit, and ``aclose()`` is idempotent.  Using a closed backend raises
`BackendClosedError`.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import inspect
import math
import os
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Self, TypeVar

import anyio
from attrs import field, frozen

from . import circuit
from ._change_feed import ChangeFeed
from ._stats import Spend, check_aware, spend_of
from ._validators import (
    check,
    escaped,
    failure,
    instance_of,
    integer,
    one_of,
    plain_number,
    shown,
    text,
)
from .content import (
    ContentBlock,
    ImageBlock,
    ResponseFormat,
    TextBlock,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolResult,
    check_options,
    plain_of,
    text_of,
    to_blocks,
    to_extra_body,
    to_response_format,
    to_stop,
    to_tool_choice,
    to_tools,
    tool_call_of,
)
from .evidence import EvidenceBatch, check_after_version
from .exceptions import BackendClosedError, ConfigurationError, RecordValidationError
from .records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    LLMCallRecord,
    ModelPerformance,
    OutcomeReport,
)

if TYPE_CHECKING:
    import aiohttp

    from .circuit import BreakerPolicy
    from .limits.values import BudgetGrant, BudgetUsage, RateGrant

__all__ = [
    "AsyncResource",
    "AttemptTimeout",
    "ChangeFeed",
    "QuotaStore",
    "ResponseCache",
    "CircuitStateStore",
    "Completion",
    "CompletionRequest",
    "CompletionStream",
    "Message",
    "Provider",
    "TelemetryBackend",
    "TransactionalQuotaStore",
    "TransactionalStateStore",
]

T = TypeVar("T")

MAX_TOKENS_LIMIT: Final = 1_000_000
"""The largest ``max_tokens`` a request may ask for (no model writes more)."""


_limit = integer(failure(ConfigurationError), low=0, why="must be an integer >= 0")
_EVERY: Final = 2**63 - 1  # a limit no store reaches: every matching record
_flag = instance_of(failure(ConfigurationError), bool, why="must be True or False")


class AsyncResource(abc.ABC):
    """
    Base of every backend: ``async with`` support and an idempotent ``aclose()``.

    Subclasses implement `_aclose` (called at most once, shielded from anyio's
    cancellation: it must end in a bounded time) and may override `_aopen` (called by
    ``__aenter__``, and lazily by backends that connect on first use).
    """

    _closed: bool = False
    _closing: asyncio.Future[None] | None = None
    """Set while `_aclose` runs: a second `aclose` in its event loop waits for it."""

    @property
    def closed(self) -> bool:
        """True once `aclose` has been called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(
                f"{self!r} is closed (aclose() was called, or its `async with` block ended) "
                "and cannot be used again: build a new one",
                target=repr(self),
            )

    async def _aopen(self) -> None:
        """Acquire connections or files; default: nothing to do."""

    async def _aclose(self) -> None:
        """Release everything; called once."""

    async def aclose(self) -> None:
        """
        Flush what must be flushed and release resources.  Safe to call twice: a call
        while another is closing the backend returns once that one is over (`_aclose`
        runs once).

        A cancelled anyio cancel scope around the call (``anyio.move_on_after`` fired)
        does not stop `_aclose` halfway, which would leave connections and threads open
        while the backend says it is closed: `_aclose` is to end in a bounded time.
        """
        if self._closed:
            return
        closing = self._closing
        if closing is not None:
            if closing.get_loop() is asyncio.get_running_loop():
                await asyncio.shield(closing)  # cancelling this wait leaves that close alone
            return
        self._closing = closing = asyncio.get_running_loop().create_future()
        try:
            with anyio.CancelScope(shield=True):
                await self._aclose()
        finally:
            self._closed = True
            closing.set_result(None)

    async def __aenter__(self) -> Self:
        self._check_open()
        await self._aopen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --------------------------------------------------------------------------- telemetry


class TelemetryBackend(AsyncResource):
    """
    Where `LLMCallRecord`s go, and where the router's statistics come from.

    Contract (checked by `empathy_models.testing.contracts`):

    * `record_many` stores every record it is given, exactly once, or raises
      `TelemetryError` having stored none of them in the failing batch.  Writes are
      idempotent by ``call_id``: a record whose ``call_id`` is stored is skipped (the
      first written is kept), so a replayed or retried batch counts once.
    * `aggregate` groups sample records (see `Outcome.is_sample`) per (workflow, stage,
      model), or per (workflow, model) with ``per_stage=False``.  Latency (p50, p95
      nearest-rank, and the average) and average tokens are over successful calls;
      ``avg_cost_usd`` is over all samples.  ``first_seen`` / ``last_seen`` span the
      group's samples.  Records without a ``workflow`` or ``stage`` (``None`` or ``""``)
      form their own groups, reported as ``None``; where they sort is up to the backend.
    * `recent` returns the newest records first, ordered by timestamp; with
      ``samples_only`` only sample records (see `Outcome.is_sample`); with ``until``
      only records before it, however many later ones there are.
    * `spend` sums the cost of every matching record, whatever its outcome, per
      (workflow, stage, model), grouped as `aggregate` groups.
    * Filters given as ``None`` match everything.  A ``workflow`` or ``stage`` filter of
      ``""`` matches the records without one (``None`` or ``""``).  ``since`` is
      inclusive, ``until`` exclusive; both must be aware datetimes.
    """

    async def record(self, record: LLMCallRecord) -> None:
        """Store one record (may be buffered; see `flush`)."""
        await self.record_many((record,))

    @abc.abstractmethod
    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        """Store several records (may be buffered; see `flush`)."""

    async def aggregate(
        self,
        *,
        workflow: str | None = None,
        stage: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        per_stage: bool = True,
    ) -> list[ModelPerformance]:
        """
        Per-model performance for the matching records, sorted by (workflow, stage, model).

        Every field is exact except the averages (``avg_*``), which are float sums over
        the group divided by its size: backends sum in their own order (SQLite's
        ``SUM``, Python's ``sum``, which compensates from 3.12), so two backends agree
        on them to a relative 1e-9, not bit for bit.  In the averages a latency or cost
        counts for at most 1e300 (``_stats.AVERAGE_CAP``), so that no valid value can
        overflow them; implementers of ``_aggregate`` cap alike.
        """
        self._check_open()
        check_aware("since", since)
        check_aware("until", until)
        return await self._aggregate(
            workflow=workflow, stage=stage, since=since, until=until, per_stage=per_stage
        )

    async def recent(
        self,
        *,
        limit: int = 100,
        workflow: str | None = None,
        stage: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        samples_only: bool = False,
    ) -> list[LLMCallRecord]:
        """
        The ``limit`` newest matching records, newest first.

        ``samples_only``: only sample outcomes (`Outcome.is_sample`), so the ``limit``
        newest samples come back however many other records (cache hits, cancelled or
        refused calls) are newer.  ``until`` (exclusive, as ``since`` is inclusive):
        only records before it, so the ``limit`` newest of an earlier window come back
        however many later records there are.  A backend whose `_recent` predates
        ``samples_only`` or ``until`` (its signature has no such parameter) is read in
        pages of growing size until enough matching records are found or no older
        record matches.  A stored row whose outcome this version does not know (a newer
        version's) is left out, with a warning (`empathy_models.backends.known_outcomes`),
        so fewer than ``limit`` records may come back.
        """
        self._check_open()
        limit = check(_limit, "limit", limit)
        check_aware("since", since)
        check_aware("until", until)
        check(_flag, "samples_only", samples_only)
        if _takes(type(self), "until"):
            return await self._recent(
                limit=limit,
                workflow=workflow,
                stage=stage,
                model=model,
                since=since,
                until=until,
                samples_only=samples_only,
            )
        if until is None:
            return await _recent_without_until(
                self, limit, workflow, stage, model, since, samples_only
            )
        return await _paged_until(self, limit, workflow, stage, model, since, samples_only, until)

    async def evidence(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        after_version: int = 0,
    ) -> EvidenceBatch:
        """
        The evidence buckets (see `empathy_models.evidence`) changed after ``after_version``.

        Args:
            since: the earliest ``bucket_start`` returned (inclusive).
            until: the end of the buckets' ``bucket_start`` range (exclusive).
            after_version: only buckets whose version is greater are returned.

        Returns:
            The batch; its ``version`` is the value to pass next time so that every later
            change is returned once and none is missed, even with concurrent writers.

        Raises:
            NotImplementedError: from backends that keep no rollups.
        """
        self._check_open()
        check_aware("since", since)
        check_aware("until", until)
        check_after_version(after_version)
        return await self._evidence(since=since, until=until, after_version=after_version)

    async def spend(
        self,
        *,
        workflow: str | None = None,
        stage: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Spend:
        """
        What the matching calls cost in USD, per (workflow, stage, model), whatever their
        outcome: the samples `aggregate` averages over, and the attempts it leaves out
        (a stream the caller abandoned or a deadline cut short is billed for what it
        used; cache hits, breaker rejections and calls never sent cost 0).

        Keys are as `aggregate` groups: ``None`` for a record without a workflow or
        stage (``None`` or ``""``).  A cost counts for at most 1e300
        (``_stats.AVERAGE_CAP``), as in `aggregate`'s averages; backends sum in their own
        order, so two agree to a relative 1e-9.  A backend that does not implement
        `_spend` is read through `recent` (every matching record).
        """
        self._check_open()
        check_aware("since", since)
        check_aware("until", until)
        return await self._spend(workflow=workflow, stage=stage, since=since, until=until)

    async def purge(self, *, before: datetime) -> int:
        """Delete records older than ``before``; return how many were deleted."""
        self._check_open()
        if before is None:
            raise RecordValidationError("before must be a datetime, got None", path="before")
        check_aware("before", before)
        return await self._purge(before=before)

    # What an implementation provides.  The public methods above check that the backend
    # is open and that every argument is valid, then call these with the same keywords.

    @abc.abstractmethod
    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        """`aggregate` for arguments already checked."""

    @abc.abstractmethod
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
        """`recent` for arguments already checked."""

    async def _spend(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> Spend:
        """`spend` for arguments already checked (default: every matching record read)."""
        return spend_of(
            await self.recent(
                limit=_EVERY, workflow=workflow, stage=stage, since=since, until=until
            )
        )

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        """`evidence` for arguments already checked (default: no rollups kept)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no evidence rollups")

    @abc.abstractmethod
    async def _purge(self, *, before: datetime) -> int:
        """`purge` for a ``before`` already checked (an aware datetime)."""

    async def flush(self) -> None:
        """Make every record accepted so far durable and visible to readers."""

    @property
    def persistent(self) -> bool:
        """True when records survive the process (false for memory and null)."""
        return False

    @property
    def stores_records(self) -> bool:
        """True when the records given to `record_many` are kept and can be read back
        (false for the null backend: then nothing reads from it)."""
        return True

    def _home_loop(self) -> asyncio.AbstractEventLoop | None:
        """
        The event loop this backend's background work runs in (a batching backend's
        flusher task), to which it is bound while that runs; None when it has none
        running, or is not bound to a loop.
        """
        return None


@functools.cache
def _takes(backend_type: type[TelemetryBackend], name: str) -> bool:
    """Whether ``backend_type._recent`` takes ``name`` (by name or ``**kwargs``)."""
    parameters = inspect.signature(backend_type._recent).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def _legacy_recent(backend: TelemetryBackend) -> Callable[..., Awaitable[list[LLMCallRecord]]]:
    """The `_recent` of a backend whose signature predates ``until`` or ``samples_only``."""
    return backend._recent


async def _recent_without_until(
    backend: TelemetryBackend,
    limit: int,
    workflow: str | None,
    stage: str | None,
    model: str | None,
    since: datetime | None,
    samples_only: bool,
) -> list[LLMCallRecord]:
    """``recent`` (without ``until``) from a `_recent` that predates ``until``."""
    if _takes(type(backend), "samples_only"):
        return await _legacy_recent(backend)(
            limit=limit,
            workflow=workflow,
            stage=stage,
            model=model,
            since=since,
            samples_only=samples_only,
        )
    if not samples_only:
        return await _legacy_recent(backend)(
            limit=limit, workflow=workflow, stage=stage, model=model, since=since
        )
    return await _paged_samples(backend, limit, workflow, stage, model, since)


async def _paged_until(
    backend: TelemetryBackend,
    limit: int,
    workflow: str | None,
    stage: str | None,
    model: str | None,
    since: datetime | None,
    samples_only: bool,
    until: datetime,
) -> list[LLMCallRecord]:
    """
    ``recent(until=...)`` from a `_recent` that predates ``until``: the newest records
    are read, four times as many each time, until ``limit`` of them are before
    ``until`` or no older record matches.
    """
    if limit == 0:
        return []
    size = limit
    while True:
        records = await _recent_without_until(
            backend, size, workflow, stage, model, since, samples_only
        )
        before = [r for r in records if r.timestamp < until]
        if len(before) >= limit or len(records) < size:
            return before[:limit]
        size *= 4


async def _paged_samples(
    backend: TelemetryBackend,
    limit: int,
    workflow: str | None,
    stage: str | None,
    model: str | None,
    since: datetime | None,
) -> list[LLMCallRecord]:
    """
    ``recent(samples_only=True)`` from a `_recent` that cannot filter on the outcome:
    the newest records are read, four times as many each time, until ``limit`` of them
    are samples or no older record matches.
    """
    size = limit
    while True:
        records = await _legacy_recent(backend)(
            limit=size, workflow=workflow, stage=stage, model=model, since=since
        )
        samples = [r for r in records if r.outcome.is_sample]
        if len(samples) >= limit or len(records) < size:
            return samples[:limit]
        size *= 4


# --------------------------------------------------------------------------- circuit state


class CircuitStateStore(AsyncResource):
    """
    Holds circuit-breaker state; every operation is atomic on the store's side.

    The caller never reads, decides and writes back: `admit` performs the lazy
    OPEN -> HALF_OPEN step and grants probe leases, `record` applies outcomes for a
    ticket, `force` and `reset` are transitions.  Each returns the resulting state.
    Stores that hold state for several processes set ``shared = True`` and take time
    from the store's side or from the UTC wall clock, never from a monotonic clock.
    Every operation given a key checks it first (`checked_key`), so a key no store can
    hold is a `ConfigurationError` on every store, as on the breaker.
    """

    shared: ClassVar[bool] = False

    @staticmethod
    def checked_key(key: object) -> str:
        """
        ``key`` if every store can hold it: a non-empty string of at most 500
        characters, without NUL or lone surrogates (`empathy_models.circuit.checked_key`).

        Raises:
            ConfigurationError: any other ``key``.
        """
        return circuit.checked_key(key)

    @abc.abstractmethod
    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        """Admit or reject one call for ``key`` (see `empathy_models.circuit.admit`)."""

    @abc.abstractmethod
    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        """Apply ``reports`` to ``key`` in order, atomically; stale tickets are dropped."""

    @staticmethod
    def checked_force_end(
        until: datetime | None, for_seconds: float | None
    ) -> tuple[float | None, float | None]:
        """
        `force`'s end as ``(until, for_seconds)``: ``until`` as UTC epoch seconds, or the
        span to add to the store's own now; both ``None`` for an end at a reset.

        Raises:
            RecordValidationError: a naive ``until`` or one before 1970 (no state holds
                it), a ``for_seconds`` that is not a finite number of seconds >= 0, or
                both given.
        """
        check_aware("until", until)
        if for_seconds is None:
            if until is None:
                return None, None
            until_ts = until.timestamp()
            if until_ts < 0:
                raise RecordValidationError(
                    f"until must be 1970-01-01 or later, got {until.isoformat()}", path="until"
                )
            return until_ts, None
        if until is not None:
            raise RecordValidationError(
                "give force() until or for_seconds, not both", path="for_seconds"
            )
        seconds = plain_number(for_seconds)  # numpy's numbers too
        if seconds is None or not 0 <= seconds < math.inf:
            raise RecordValidationError(
                f"for_seconds must be a finite number of seconds >= 0, got {shown(for_seconds)}",
                path="for_seconds",
            )
        return None, float(seconds)

    @staticmethod
    def checked_reason(reason: object) -> str | None:
        """
        `force`'s ``reason`` as every store holds it: a lone surrogate or a NUL escaped
        with backslashes (`empathy_models._validators.escaped`), so each store keeps, and
        each worker shows, the same text.

        Raises:
            RecordValidationError: a ``reason`` that is neither a string nor ``None``.
        """
        if reason is None:
            return None
        if not isinstance(reason, str):
            raise RecordValidationError(
                f"reason must be a string or None, got {shown(reason)}", path="reason"
            )
        return escaped(reason)

    @abc.abstractmethod
    async def force(
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        """
        Force ``key`` into FORCED_OPEN, DISABLED or CLOSED.  FORCED_OPEN holds until
        ``until``, for ``for_seconds`` from the store's own now (the clock every other
        time in the store comes from; give this rather than an ``until`` computed on a
        worker's clock), or until a reset when neither is given (`checked_force_end`).
        """

    @abc.abstractmethod
    async def snapshot(self, key: str) -> CircuitBreakerState:
        """The current state of ``key``; a key never seen reads as CLOSED, generation 0."""

    @abc.abstractmethod
    async def snapshot_all(self) -> list[CircuitBreakerState]:
        """The state of every key the store holds, sorted by key."""

    @abc.abstractmethod
    async def reset(self, key: str | None = None) -> None:
        """Forget ``key`` (or every key): it reads as CLOSED and older tickets stop counting."""

    @property
    def in_process(self) -> bool:
        """
        True when every operation completes in this process without waiting on I/O
        (the memory and null stores): the breaker then skips the timeouts and
        cancellation shields that guard a call to a store doing I/O.
        """
        return False

    async def now(self) -> float | None:
        """
        The store's clock: UTC epoch seconds as the store reads them to time its states
        (``open_until_ts``, probe leases, ``updated_at_ts``); None when the store does
        not say (the default), and breakers then take their own clock for it.

        A `CircuitBreaker` keeps the difference between its clock and its store's,
        measured with this (a round trip at most once a minute, while it sees circuits
        that are not CLOSED), and judges open periods and leases by the store's clock:
        a worker whose clock is S seconds off would otherwise reject S seconds too long,
        or let calls through to the store S seconds too early.  Stores of this package
        answer with the clock their operations read (SQLite and memory: the store's
        ``clock``; Redis: ``TIME``; PostgreSQL: ``clock_timestamp()``).

        Raises:
            BackendError: the store cannot be read (the breaker then keeps its estimate).
        """
        return None

    def change_feed(self) -> ChangeFeed | None:
        """
        The store's announcements of changed keys, if it can make them (default: none).

        A shared store that can tell every process of a key's new generation (Redis
        pub/sub, PostgreSQL ``NOTIFY``) returns one `ChangeFeed` (the same each time)
        and closes it with the store; a breaker's local view then stays usable past
        ``local_view_ttl`` while the feed proves nothing changed (see `ChangeFeed`).
        """
        return None


def force_for(
    store: CircuitStateStore,
    key: str,
    state: CircuitState,
    *,
    for_seconds: float | None,
    reason: str | None = None,
) -> Awaitable[CircuitBreakerState]:
    """
    ``store.force(key, state, reason=reason, for_seconds=for_seconds)``.  A store whose
    `CircuitStateStore.force` predates ``for_seconds`` (its signature has no such
    parameter) is given the end on this process's clock as ``until`` instead.
    """
    if for_seconds is None:
        return store.force(key, state, reason=reason)
    if _takes_for_seconds(type(store)):
        return store.force(key, state, reason=reason, for_seconds=for_seconds)
    _, span = CircuitStateStore.checked_force_end(None, for_seconds)
    assert span is not None
    try:
        until = datetime.now(UTC) + timedelta(seconds=span)
    except OverflowError:
        until = datetime.max.replace(tzinfo=UTC)
    return store.force(key, state, until=until, reason=reason)


def reset_command(key: str, store: str) -> str:
    """
    The command that resets ``key`` in the state store ``store`` (a SQLite file's path,
    a URL shown without its password; empty: the name left to the reader), for the
    error of a key whose stored state cannot be read: quoted for a POSIX shell, with
    ``--db`` (without it the CLI resets the default store, not this one).
    """
    if not store:
        db = "<this store's URL>"
    else:  # a path as the CLI reads it from any directory
        db = shlex.quote(store if "://" in store else os.path.abspath(store))
    return (
        f"empathy-models breaker reset --db {db} "
        f"{'-- ' if key.startswith('-') else ''}{shlex.quote(key)}"
    )


@functools.cache
def _takes_for_seconds(store_type: type[CircuitStateStore]) -> bool:
    """Whether ``store_type.force`` takes ``for_seconds`` (by name or ``**kwargs``)."""
    parameters = inspect.signature(store_type.force).parameters.values()
    return any(p.name == "for_seconds" or p.kind is p.VAR_KEYWORD for p in parameters)


_CLOCK_KEY: Final = "empathy-models:clock"
"""The key `TransactionalStateStore.now` reads (nothing is ever written to it)."""


class TransactionalStateStore(CircuitStateStore):
    """
    A store that can run a function on one key's state atomically.

    Subclasses implement `_transact` and `_load_all`; the pure machine in
    `empathy_models.circuit` does the rest.  `_load` reads one key through a
    transaction that changes nothing; a store that can read without locking overrides
    it.  Memory, SQLite and PostgreSQL stores are built this way.

    A store that can read a key without locking and write it back conditionally (the
    SQLite and PostgreSQL stores) also implements `_peek` and `_put_if`: every
    operation then starts optimistically (see `_apply`) and takes `_transact` only
    when the key changed between the read and the write.
    """

    @abc.abstractmethod
    async def _transact(
        self,
        key: str,
        fn: Callable[[CircuitBreakerState | None, float], tuple[CircuitBreakerState | None, T]],
    ) -> T:
        """
        Atomically: load ``key`` (``None`` if absent), call ``fn(state, now)`` with the
        store's notion of now (UTC epoch seconds), save the returned state if it is not
        ``None`` and not the very object passed in, and return the second element.
        """

    async def now(self) -> float | None:
        """
        The ``now`` `_transact` passes (`_peek`'s, when the store has one), read with
        an operation that saves nothing; stores with a cheaper read of their clock
        override it.
        """
        self._check_open()
        peeked = await self._peek(_CLOCK_KEY)
        if peeked is not None:
            return peeked[1]

        def read(state: CircuitBreakerState | None, now: float) -> tuple[None, float]:
            return None, now

        return await self._transact(_CLOCK_KEY, read)

    async def _load(self, key: str) -> CircuitBreakerState | None:
        """Read one key's state (by default a transaction that saves nothing)."""

        def read(
            state: CircuitBreakerState | None, now: float
        ) -> tuple[None, CircuitBreakerState | None]:
            return None, state

        return await self._transact(key, read)

    @abc.abstractmethod
    async def _load_all(self) -> list[CircuitBreakerState]:
        """Read every state without locking."""

    _MEMO_KEYS: ClassVar[int] = 4096
    _memo: dict[str, tuple[object, CircuitBreakerState]] | None = None

    def _decoded(
        self, key: str, text: object, decode: Callable[[object], CircuitBreakerState]
    ) -> CircuitBreakerState:
        """
        ``decode(text)``, the stored form of ``key``'s state; when it is the text last
        decoded or written for ``key``, the state kept then (see `_remember`).
        """
        hit = None if self._memo is None else self._memo.get(key)
        if hit is not None and hit[0] == text:
            return hit[1]
        state = decode(text)
        self._remember(key, text, state)
        return state

    def _remember(self, key: str, text: object, state: CircuitBreakerState) -> None:
        """
        Keep ``state`` as what ``key``'s stored ``text`` decodes to, so that reading
        the same text again skips decoding it (for the last 4,096 keys or so).
        """
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        elif len(memo) >= self._MEMO_KEYS and key not in memo:
            memo.clear()
        memo[key] = (text, state)

    async def _peek(self, key: str) -> tuple[CircuitBreakerState | None, float, object] | None:
        """
        Read ``key`` without locking: its state (``None`` if absent), the store's now
        (as `_transact` would pass it) and a token for `_put_if`; or ``None`` (the
        default) when the store has no such read, and every operation takes `_transact`.
        """
        return None

    async def _put_if(self, key: str, seen: object, new: CircuitBreakerState) -> bool:
        """
        Save ``new`` as ``key``'s state in one atomic write if the key still holds what
        `_peek` read as ``seen``; False, having written nothing, when it does not.
        """
        return False

    async def _apply(
        self,
        key: str,
        fn: Callable[[CircuitBreakerState | None, float], tuple[CircuitBreakerState | None, T]],
    ) -> T:
        """
        `_transact`'s contract, optimistically: ``fn`` runs on the state `_peek` read.
        When it changes nothing (an admit while CLOSED, a rejection while OPEN) its
        answer is consistent with that state and is returned as is; otherwise the new
        state is written only if the key is unchanged since the read.  The write that
        finds it changed, or a store without `_peek`, runs ``fn`` again in `_transact`.
        """
        peeked = await self._peek(key)
        if peeked is not None:
            current, now, seen = peeked
            new, result = fn(current, now)
            if new is None or new is current or await self._put_if(key, seen, new):
                return result
        return await self._transact(key, fn)

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        self._check_open()
        self.checked_key(key)

        def step(
            state: CircuitBreakerState | None, now: float
        ) -> tuple[CircuitBreakerState | None, Admission]:
            new, admission = circuit.admit(state, policy, now, key=key)
            return (None if new is state else new), admission

        return await self._apply(key, step)

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        self._check_open()
        self.checked_key(key)
        previous = None
        for report in reports:
            if report is previous:  # a written-behind batch repeats one report object
                continue
            previous = report
            if report.ticket.key != key:
                raise ConfigurationError(
                    f"a ticket for {report.ticket.key!r} was reported against {key!r}"
                )

        def step(
            state: CircuitBreakerState | None, now: float
        ) -> tuple[CircuitBreakerState | None, CircuitBreakerState]:
            current = state if state is not None else circuit.initial_state(key, now)
            new = circuit.apply_outcomes(current, policy, list(reports), now)
            return (None if new is state else new), new

        return await self._apply(key, step)

    async def force(
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        self._check_open()
        self.checked_key(key)
        until_ts, span = self.checked_force_end(until, for_seconds)
        reason = self.checked_reason(reason)

        def step(
            current: CircuitBreakerState | None, now: float
        ) -> tuple[CircuitBreakerState, CircuitBreakerState]:
            end = until_ts if span is None else now + span
            new = circuit.force(current, state, now, key=key, until=end, reason=reason)
            return new, new

        return await self._apply(key, step)

    async def snapshot(self, key: str) -> CircuitBreakerState:
        self._check_open()
        self.checked_key(key)
        state = await self._load(key)
        return state if state is not None else circuit.initial_state(key)

    async def snapshot_all(self) -> list[CircuitBreakerState]:
        self._check_open()
        return sorted(await self._load_all(), key=lambda s: s.key)

    async def reset(self, key: str | None = None) -> None:
        self._check_open()
        if key is None:
            for state in await self._load_all():
                await self.reset(state.key)
            return
        self.checked_key(key)

        def step(
            current: CircuitBreakerState | None, now: float
        ) -> tuple[CircuitBreakerState, None]:
            return circuit.reset(current, now, key=key), None

        await self._apply(key, step)


# --------------------------------------------------------------------------- quotas


class QuotaStore(AsyncResource):
    """
    Spend budgets and rate-limit schedules shared by every worker; each operation atomic.

    Budgets (see `empathy_models.limits.Budget`) are counted per window under
    ``key`` in integer nano-dollars: `reserve` holds a call's estimate if it fits under
    the limit, `settle` releases the hold and charges what the call cost.  Rate limits
    (`empathy_models.limits.RateLimit`) are GCRA schedules: `acquire` takes the next
    place and says how long to wait for it, `adjust` moves the schedule when a call
    used fewer (or more) tokens than it reserved, `push_back` holds it until a
    provider's reset time.  ``shared`` stores take time for
    rate limits from the store's side (or the UTC wall clock on one host).  Contract
    suite: `empathy_models.testing.contracts.QuotaStoreContract`.

    A store with ``hold_ids`` takes a ``hold_id`` in `reserve` and `settle`, unique to
    one call's hold, and `settle`'s ``resent``: the limiter then sends a settlement that
    failed (the store down, or its answer lost) again until it lands, and one that had
    landed is not counted twice.  A store without them has a failed
    settlement lost (its hold lapses; the limiter counts it in ``unsettled``).
    """

    shared: ClassVar[bool] = False
    hold_ids: ClassVar[bool] = False

    async def now(self) -> float | None:
        """
        The store's clock: UTC epoch seconds by which it lapses budget holds
        (``lapses_at``) and reads show them released; None when the store does not say
        (the default), and limiters then take their own clock for it.

        A limiter on a `shared` store keeps the difference between its wall clock and
        the store's, measured with this (a round trip at most once a minute), and gives
        its holds lapse times and budget windows by the store's clock: a worker whose
        clock is an hour behind would otherwise ask for holds that lapse at once, and
        another worker could spend what they hold.  Stores of this package answer with
        the clock their operations read (memory and SQLite: the store's ``clock``;
        Redis: ``TIME``; PostgreSQL: ``clock_timestamp()``).

        Raises:
            BackendError: the store cannot be read (the limiter keeps its estimate).
        """
        return None

    @abc.abstractmethod
    async def reserve(
        self,
        key: str,
        *,
        window_start: float,
        window_end: float,
        amount: int,
        limit: int,
        lapses_at: float | None = None,
        hold_id: str | None = None,
    ) -> BudgetGrant:
        """
        Hold ``amount`` in ``key``'s window if ``spent + held + amount <= limit``, until
        it is settled or ``lapses_at`` (UTC epoch seconds, rounded up to a whole minute;
        None: the window's end) passes, whichever comes first.  Holds that lapsed are
        released (counted in ``lapsed``) by the store's next operation on the window,
        and reads show them released.  ``hold_id`` (given only to a store with
        ``hold_ids``): the name its settlement gives the hold.
        """

    @abc.abstractmethod
    async def settle(
        self,
        key: str,
        *,
        window_start: float,
        window_end: float,
        held: int,
        actual: int,
        lapses_at: float | None = None,
        hold_id: str | None = None,
        resent: bool = False,
    ) -> BudgetUsage:
        """
        Release a hold of ``held`` from ``key``'s window, reserved with ``lapses_at``,
        and charge ``actual``; a hold that lapsed already has nothing left to release.
        With ``hold_id`` (given only to a store with ``hold_ids``), the hold reserved
        under it, whose id the settlement takes away; ``resent``: the settlement was
        sent before and failed, and changes nothing when the window no longer keeps
        the id (it landed, its answer lost).  A hold's id is kept while the hold is,
        and an hour past its lapse (`empathy_models.limits.meter.LAPSED_IDS_KEPT`).
        """

    @abc.abstractmethod
    async def usage(self, key: str, *, window_start: float, window_end: float) -> BudgetUsage:
        """``key``'s window as stored (an empty one when never charged)."""

    @abc.abstractmethod
    async def usages(self) -> list[BudgetUsage]:
        """Every stored window of every budget, sorted by key and window."""

    @abc.abstractmethod
    async def reset_budget(self, key: str) -> int:
        """Forget every window of ``key`` (spend starts from zero); how many were held."""

    @abc.abstractmethod
    async def set_limit(self, key: str, limit: int | None) -> None:
        """Override ``key``'s limit for every worker (``None``: back to the code's)."""

    @abc.abstractmethod
    async def limit_overrides(self) -> dict[str, int]:
        """Every limit set with `set_limit`."""

    @abc.abstractmethod
    async def acquire(
        self, key: str, *, cost: float, interval: float, burst: float, max_wait: float
    ) -> RateGrant:
        """Take the next place in ``key``'s schedule if it comes within ``max_wait`` s."""

    @abc.abstractmethod
    async def adjust(self, key: str, *, delta: float, place: float | None = None) -> None:
        """
        Move ``key``'s schedule by ``delta`` seconds (negative gives capacity back).

        With ``place`` (a `RateGrant`'s), only if the schedule still ends exactly there,
        that is no later place was taken since: a place given back while later ones
        keep their times would let the next call share one of their instants.  The
        limiter passes ``place`` only when `acquire` returned one.
        """

    async def push_back(self, key: str, *, seconds: float) -> None:
        """
        Hold ``key``'s schedule until the store's now plus ``seconds`` (a provider's
        reset time): no place comes before then, whatever the burst of the `acquire`
        calls that follow (a schedule with room for a burst would otherwise let that
        many places in before the end), and the schedule ends then at the earliest, so
        at the reset the burst is whole again.  Workers pushing back the same reset
        together move the schedule once, not once each.

        The stores of this package keep the reset time with the schedule until it has
        passed (`empathy_models.limits.meter.push_back_step`).  The default here is
        built on `acquire` (a place of cost 0 reads where the schedule ends) and
        `adjust` with that ``place``, read again while other places move the schedule
        in between: it moves the schedule's end only, so with a burst above 1 up to
        burst - 1 places may still come before the reset; stores override it with one
        atomic step.  A store whose grants name no place, or a schedule still moving on
        the last try, is moved by the difference (not atomic: it may end a little later).
        """
        target: float | None = None
        for tries_left in reversed(range(_PUSH_BACK_TRIES)):
            grant = await self.acquire(key, cost=0.0, interval=1.0, burst=0.0, max_wait=math.inf)
            if grant.place is None:  # the wait is how far the schedule's end is
                if grant.wait < seconds:
                    await self.adjust(key, delta=seconds - grant.wait)
                return
            if target is None:  # the store's now plus ``seconds``
                target = grant.place - grant.wait + seconds
            if grant.place >= target - _PUSH_BACK_SLACK:
                return
            place = grant.place if tries_left else None
            await self.adjust(key, delta=target - grant.place, place=place)


_PUSH_BACK_TRIES: Final = 8
"""How many times the default `QuotaStore.push_back` reads the schedule's end."""
_PUSH_BACK_SLACK: Final = 0.001
"""Seconds short of its target at which the default `QuotaStore.push_back` is done."""


def _window_key(key: str, window_start: float) -> str:
    return f"b|{key}@{float(window_start)!r}"  # an int's start: the same window


def _is_number(text: str) -> bool:
    """True for a window start (so ``b|name:alice@x.com@...`` is not ``name:alice``'s)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


class TransactionalQuotaStore(QuotaStore):
    """
    A quota store built on one atomic read-modify-write of a JSON value per key.

    Subclasses implement `_transact`, `_load`, `_scan` and `_delete`; the pure steps of
    `empathy_models.limits.meter` do the rest.  Memory, SQLite and PostgreSQL stores
    are built this way.
    """

    hold_ids: ClassVar[bool] = True

    @abc.abstractmethod
    async def _transact(
        self, key: str, fn: Callable[[dict[str, Any] | None, float], tuple[Any, T]]
    ) -> T:
        """
        Atomically: load ``key`` (``None`` if absent), call ``fn(data, now)`` with the
        store's notion of now (UTC epoch seconds), save the first element it returns
        unless that is ``None``, and return the second.
        """

    @abc.abstractmethod
    async def _load(self, key: str) -> dict[str, Any] | None:
        """Read one key without locking."""

    @abc.abstractmethod
    async def _scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every (key, value) whose key starts with ``prefix``."""

    @abc.abstractmethod
    async def _delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys``."""

    def _now(self) -> float:
        """
        UTC epoch seconds at which reads (`usage`, `usages`) release lapsed holds; the
        wall clock unless overridden (operations take ``now`` from `_transact`).
        """
        return time.time()

    async def now(self) -> float | None:
        """The clock reads release lapsed holds by (`_now`; a server store its own)."""
        self._check_open()
        return self._now()

    async def _read_now(self) -> float:
        told = await self.now()
        return self._now() if told is None else told

    async def reserve(
        self,
        key: str,
        *,
        window_start: float,
        window_end: float,
        amount: int,
        limit: int,
        lapses_at: float | None = None,
        hold_id: str | None = None,
    ) -> BudgetGrant:
        self._check_open()
        from .limits.meter import reserve_step

        return await self._transact(
            _window_key(key, window_start),
            lambda data, now: reserve_step(
                key,
                data,
                window_start=window_start,
                window_end=window_end,
                amount=amount,
                limit=limit,
                now=now,
                lapses_at=lapses_at,
                hold_id=hold_id,
            ),
        )

    async def settle(
        self,
        key: str,
        *,
        window_start: float,
        window_end: float,
        held: int,
        actual: int,
        lapses_at: float | None = None,
        hold_id: str | None = None,
        resent: bool = False,
    ) -> BudgetUsage:
        self._check_open()
        from .limits.meter import settle_step

        return await self._transact(
            _window_key(key, window_start),
            lambda data, now: settle_step(
                key,
                data,
                window_start=window_start,
                window_end=window_end,
                held=held,
                actual=actual,
                now=now,
                lapses_at=lapses_at,
                hold_id=hold_id,
                resent=resent,
            ),
        )

    async def usage(self, key: str, *, window_start: float, window_end: float) -> BudgetUsage:
        self._check_open()
        from .limits.meter import usage_of

        data = await self._load(_window_key(key, window_start))
        return usage_of(key, data, window_start, window_end, await self._read_now())

    async def usages(self) -> list[BudgetUsage]:
        self._check_open()
        from .limits.meter import usage_of

        out = []
        now = await self._read_now()
        for stored, data in await self._scan("b|"):
            key = stored[2:].rsplit("@", 1)[0]
            ws, we = float(data["window_start"]), float(data["window_end"])
            out.append(usage_of(key, data, ws, we, now))
        return sorted(out, key=lambda u: (u.key, u.window_start))

    async def reset_budget(self, key: str) -> int:
        self._check_open()
        prefix = f"b|{key}@"
        found = [k for k, _ in await self._scan(prefix) if _is_number(k[len(prefix) :])]
        await self._delete(found)
        return len(found)

    async def set_limit(self, key: str, limit: int | None) -> None:
        self._check_open()
        if limit is None:
            await self._delete([f"l|{key}"])
            return
        await self._transact(f"l|{key}", lambda _data, _now: ({"limit": int(limit)}, None))

    async def limit_overrides(self) -> dict[str, int]:
        self._check_open()
        return {k[2:]: int(v["limit"]) for k, v in await self._scan("l|")}

    async def acquire(
        self, key: str, *, cost: float, interval: float, burst: float, max_wait: float
    ) -> RateGrant:
        self._check_open()
        from .limits.meter import gcra_step

        return await self._transact(
            f"r|{key}",
            lambda data, now: gcra_step(
                data, now, cost=cost, interval=interval, burst=burst, max_wait=max_wait
            ),
        )

    async def adjust(self, key: str, *, delta: float, place: float | None = None) -> None:
        self._check_open()
        from .limits.meter import adjust_step

        await self._transact(
            f"r|{key}",
            lambda data, now: (adjust_step(data, now, delta=delta, place=place), None),
        )

    async def push_back(self, key: str, *, seconds: float) -> None:
        self._check_open()
        from .limits.meter import push_back_step

        await self._transact(
            f"r|{key}", lambda data, now: (push_back_step(data, now, seconds=seconds), None)
        )


# --------------------------------------------------------------------------- response cache


class ResponseCache(AsyncResource):
    """
    Where the executor keeps answers for `ExecutionContext.cache_ttl`: opaque values
    under hashed keys, each with a time to live.

    Contract (`empathy_models.testing.contracts.ResponseCacheContract`): `get` returns
    what `set` stored until its TTL (`empathy_models.cache.MAX_TTL` at most) has
    passed, then ``None``; a value larger than the backend's ``max_value_bytes`` is not
    stored; backends with ``max_entries`` evict (oldest first) past it.  Keys are hex
    digests: the executor never puts a prompt in a key.  ``shared`` backends show one
    process's entries to the others.  Backends with ``leases`` keep a lease per key
    (`acquire_lease`, `release_lease`), taken atomically by one holder at a time;
    `acquire_lease_and_get` takes one and reads the entry it guards with it.
    """

    shared: ClassVar[bool] = False

    _decoded: Any = None
    _generation: int = 0
    """
    Internal: the executor's memo of the answers it decoded lately from this cache
    (`empathy_models._cached`), bounded in bytes; `clear`, `aclose` and the executor's
    `aclose` let go of it, so no answer stays in memory through them.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        clear = cls.__dict__.get("clear")
        if clear is not None and not getattr(clear, "_lets_go", False):
            setattr(cls, "clear", _letting_go(clear))  # noqa: B010

    async def aclose(self) -> None:
        """Release resources (and the answers decoded from this cache).  Safe to call twice."""
        try:
            await super().aclose()
        finally:
            self._let_go()

    def _drop_memo(self) -> None:
        """
        Internal: drop the executor's memo of answers decoded from this cache (an
        executor's `aclose`), in the same generation: the answers other executors
        sharing the cache write behind still land.
        """
        self._decoded = None

    def _let_go(self) -> None:
        """
        Internal: drop the executor's memo of answers decoded from this cache, and start
        a new generation: an answer an executor writes behind from before it is not
        stored (or is deleted again if its write was under way), so a `clear` is not
        undone by a write landing after it.
        """
        self._decoded = None
        self._generation += 1

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key`` and not expired, or None."""

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """
        Store ``value`` under ``key`` for ``ttl`` seconds (replacing any value), at
        most `empathy_models.cache.MAX_TTL` (100 years): a longer finite ``ttl`` is
        stored for that long, never refused.  A value larger than ``max_value_bytes``,
        or a ``ttl`` that is not a finite number above 0, is not stored, and the key's
        earlier value is removed: a later `get` never serves it as the newer answer.
        """

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; True when it was held."""

    leases: ClassVar[bool] = False
    """
    True for a backend whose `acquire_lease` is atomic across every process using the
    store (the contract holds it to that); the executor coalesces identical runs of
    several processes through such a store (`ExecutionContext.cache_coalesce`).
    """

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> tuple[str, float] | None:
        """
        Take the lease on ``key`` (a short "computing" mark, kept apart from the entries:
        `get`, `clear` and ``max_entries`` never see it) for ``holder``, for ``ttl``
        seconds, atomically: None when it is now ``holder``'s (it was free, expired, or
        ``holder``'s already, then renewed for ``ttl``, kept
        `MAX_LEASE_TTL` at most); else ``(other_holder,
        seconds_left)`` of the live lease another holds, unchanged.  A backend without
        leases (``leases`` False, this default) grants every caller, so each asks a
        model as it did before leases.

        Raises:
            TypeError, ValueError: ``ttl`` is not a finite number of seconds above 0.
        """
        lease_ttl(ttl)
        return None

    async def acquire_lease_and_get(
        self, key: str, holder: str, ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        """
        ``(lease, value)``: `acquire_lease` of ``key`` for ``holder``, and the value
        `get` returns for ``key``, read no earlier than the take.  How a run
        that missed takes its request's lease: when it is granted, an entry the lease's
        last holder stored before letting go of it is ``value``, and the run is
        answered from it instead of asking a model too.  A granted lease is taken
        whatever ``value`` is (an entry too old for the run leaves it to ask).

        This default takes the lease, then reads the entry (two calls, which find such
        an entry all the same); a backend may do both atomically, in one round trip.

        Raises:
            TypeError, ValueError: ``ttl`` is not a finite number of seconds above 0.
        """
        held = await self.acquire_lease(key, holder, ttl)
        return held, await self.get(key)

    async def release_lease(self, key: str, holder: str) -> bool:
        """
        Remove ``key``'s lease if ``holder`` holds it: True when it held it, live (not
        expired); False for another's lease, which stays, for no lease, and for
        ``holder``'s own expired one (no one's once expired, as `acquire_lease` finds
        it: removed, or left to expire), alike in every backend.
        """
        return False

    async def set_and_release(self, key: str, value: bytes, ttl: float, holder: str) -> None:
        """
        `set`, then `release_lease` of ``holder``'s lease on ``key``, also when `set`
        failed: how a run that held the lease stores its answer, so that the runs
        waiting for it find the entry once the lease is gone.  This default makes two
        calls; a backend may do both in one round trip.
        """
        try:
            await self.set(key, value, ttl)
        finally:
            await self.release_lease(key, holder)

    @abc.abstractmethod
    async def clear(self) -> int:
        """
        Remove every entry; how many it removed that had not expired (that `get` would
        have returned), so two clears at once count each entry once between them.
        (Every subclass's `clear` also lets go of the answers the executor decoded from
        the cache: no override needs to.)
        """


MAX_LEASE_TTL: Final = 86_400.0
"""The longest a lease is kept (a day), however long its ``ttl``."""


def lease_ttl(ttl: float) -> float:
    """
    The ``ttl`` of `ResponseCache.acquire_lease` checked, as every backend keeps it:
    `MAX_LEASE_TTL` at most.

    Raises:
        TypeError: ``ttl`` is not a number.
        ValueError: ``ttl`` is not a finite number of seconds above 0.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds, got {type(ttl).__name__}")
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a finite number of seconds above 0, got {ttl!r}")
    return min(float(ttl), MAX_LEASE_TTL)


def _letting_go(clear: Callable[[Any], Awaitable[int]]) -> Callable[[Any], Awaitable[int]]:
    """``clear`` that also drops the cache's decoded answers (`ResponseCache._decoded`)."""

    @functools.wraps(clear)
    async def cleared(self: ResponseCache) -> int:
        try:
            return await clear(self)
        finally:
            self._let_go()

    cleared._lets_go = True  # type: ignore[attr-defined]
    return cleared


# --------------------------------------------------------------------------- providers


_non_empty = text(failure(RecordValidationError, shown=None), strip=False)


Role = Literal["system", "user", "assistant", "tool"]
"""The roles a `Message` may have (``"tool"``: a tool result, with ``tool_call_id``)."""

_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = frozenset({"role", "content"})
_OPTIONAL_MESSAGE_KEYS = frozenset({"tool_calls", "tool_call_id"})
_KNOWN_KEYS = _MESSAGE_KEYS | _OPTIONAL_MESSAGE_KEYS
_ALLOWED_BLOCKS: Final[Mapping[str, tuple[type, ...]]] = {
    "system": (TextBlock,),
    "user": (TextBlock, ImageBlock, ToolResult),
    "assistant": (TextBlock, ToolCall),
    "tool": (TextBlock, ImageBlock),
}


_role = one_of(
    failure(RecordValidationError, owner="Message"),
    _ROLES,
    why=f"must be one of {', '.join(map(repr, _ROLES))}",
)


def _content(value: object) -> str | tuple[ContentBlock, ...]:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return to_blocks(value, "content")
    except RecordValidationError as exc:
        raise RecordValidationError(
            f"Message.content must be a string or a list of content blocks: {exc}",
            path=exc.path or "content",
        ) from None


def _tool_calls(value: object) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise RecordValidationError(
            f"Message.tool_calls must be a list of ToolCall, got {type(value).__name__}",
            path="tool_calls",
        )
    return tuple(tool_call_of(item, f"tool_calls[{i}]") for i, item in enumerate(value))


@frozen(kw_only=True)
class Message:
    """
    One chat message.

    A ``"system"`` message is not sent as a message: `CompletionRequest` (and so
    `EmpathyLLMExecutor.run`) moves its content into the system prompt, after
    ``system=`` / ``ExecutionContext.system`` when both are given.  `Message.of` also
    takes OpenAI-style ``{"role": ..., "content": ..., "tool_calls": ...,
    "tool_call_id": ...}`` dicts and the SDKs' message objects.

    Args:
        role: ``"system"``, ``"user"``, ``"assistant"`` or ``"tool"``.
        content: a string or a sequence of content blocks (`TextBlock`, `ImageBlock`,
            `ToolCall`, `ToolResult`; dicts in either API's block shape are converted):
            users send text, images and tool results; assistants text and tool calls; a
            system message text only.
        tool_calls: the calls an assistant message made (so a response can be sent back
            whole: ``Message(role="assistant", content=r.content,
            tool_calls=r.tool_calls)``).
        tool_call_id: the one call a ``"tool"`` message answers.

    Raises:
        RecordValidationError: a bad role or content, naming the field.
    """

    role: Role = field(validator=_role)
    content: str | tuple[ContentBlock, ...] = field(default="", converter=_content)
    tool_calls: tuple[ToolCall, ...] = field(default=(), converter=_tool_calls)
    tool_call_id: str | None = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.content, tuple):
            allowed = _ALLOWED_BLOCKS[self.role]
            for index, block in enumerate(self.content):
                if not isinstance(block, allowed):
                    names = ", ".join(kind.__name__ for kind in allowed)
                    raise RecordValidationError(
                        f"a {self.role} message may hold {names} blocks, not "
                        f"{type(block).__name__}",
                        path=f"content[{index}]",
                    )
        if self.tool_calls and self.role != "assistant":
            raise RecordValidationError(
                f"only assistant messages carry tool_calls (this one is {self.role!r})",
                path="tool_calls",
            )
        if self.role == "tool":
            if not isinstance(self.tool_call_id, str) or not self.tool_call_id:
                raise RecordValidationError(
                    "a tool message needs tool_call_id: the id of the ToolCall it answers",
                    path="tool_call_id",
                )
        elif self.tool_call_id is not None:
            raise RecordValidationError(
                f"only tool messages carry tool_call_id (this one is {self.role!r})",
                path="tool_call_id",
            )

    @property
    def text(self) -> str:
        """The message's text: the string, or its text blocks (and tool results) joined."""
        return text_of(self.content)

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        """Every tool call of the message: its `ToolCall` blocks, then ``tool_calls``."""
        if isinstance(self.content, str):
            return self.tool_calls
        blocks = tuple(b for b in self.content if isinstance(b, ToolCall))
        return blocks + tuple(c for c in self.tool_calls if c not in blocks)

    @classmethod
    def of(cls, item: object, *, index: int | None = None) -> Message:
        """
        ``item`` as a `Message`.

        Args:
            item: a `Message` (returned as is), or a mapping with the keys ``role`` and
                ``content`` (OpenAI's chat format; ``content`` may be left out of an
                assistant message with ``tool_calls``) and optionally ``tool_calls`` and
                ``tool_call_id`` (each checked, even when empty: ``"tool_calls": {}``
                is refused); any other key is refused unless its value is ``None``
                or empty, as in the ``model_dump()`` of the openai SDK's
                ``ChatCompletionMessage`` (``refusal``, ``audio``, ``annotations: []``,
                ...), which is taken itself too (an SDK's object, pydantic's: its
                ``model_dump``).
            index: the position in a prompt, put in the error's path.

        Raises:
            RecordValidationError: for anything else.
        """
        if isinstance(item, Message):
            return item
        where = "message" if index is None else f"messages[{index}]"
        item = plain_of(item)
        if not isinstance(item, Mapping):
            raise RecordValidationError(
                f"{where} must be a Message or a {{'role': ..., 'content': ...}} dict, "
                f"got {type(item).__name__}",
                path=where,
            )
        # a field left null is a field left out (an SDK's dump holds every field it
        # knows), and so is an empty one of those it cannot send (OpenAI's answers hold
        # "annotations": []); a key it knows is kept, so a wrong type is refused by name
        if not item.keys() <= _KNOWN_KEYS:  # the common message has no other key
            item = {k: v for k, v in item.items() if k in _KNOWN_KEYS or not _blank(v)}
        unknown = sorted(map(str, set(item) - _MESSAGE_KEYS - _OPTIONAL_MESSAGE_KEYS))
        required = _MESSAGE_KEYS - ({"content"} if item.get("tool_calls") else set())
        missing = sorted(required - set(item))
        if unknown or missing:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if unknown:
                problems.append(f"unsupported {', '.join(unknown)}")
            raise RecordValidationError(
                f"{where} must have the keys 'role' and 'content' (and may have 'tool_calls' "
                f"and 'tool_call_id'): {'; '.join(problems)}",
                path=where,
            )
        try:
            return cls(
                role=item["role"],
                content=item.get("content"),
                tool_calls=item.get("tool_calls"),
                tool_call_id=item.get("tool_call_id"),
            )
        except RecordValidationError as exc:
            raise RecordValidationError(
                f"{where}: {exc}", path=f"{where}.{exc.path or ''}".rstrip(".")
            ) from None


def _blank(value: object) -> bool:
    """``None``, or an empty list, tuple or mapping: a message field that says nothing."""
    return value is None or (isinstance(value, list | tuple | Mapping) and not value)


def split_system(
    messages: Sequence[Message], system: str | None
) -> tuple[tuple[Message, ...], str | None]:
    """
    ``messages`` without their system messages, and the system prompt: ``system``
    followed by the content of each system message, in order, separated by blank lines.
    """
    if not any(m.role == "system" for m in messages):
        return tuple(messages), system
    parts = [] if system is None else [system]
    parts.extend(m.text for m in messages if m.role == "system")
    rest = tuple(m for m in messages if m.role != "system")
    return rest, "\n\n".join(parts)


def _messages(value: Sequence[Message] | str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return (Message(role="user", content=value),)
    return tuple(value)


@frozen(kw_only=True)
class CompletionRequest:
    """
    What the executor asks a provider for; a plain string becomes one user message.

    System messages in ``messages`` are moved into ``system`` (see `split_system`), so
    a provider only ever sees user, assistant and tool messages.  Only ``model`` and
    ``messages`` are required; see `empathy_models.content` for the request options.

    Args:
        model: the model id sent to the provider.
        messages: the conversation (a string: one user message).
        system: the system prompt.
        max_tokens: the most output tokens asked for (default 1024).
        temperature: sampling temperature (``None``: the provider's default).
        tools: the tools offered.
        tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a tool's name (either API's
            own object for one of them is read as it).
        response_format: a `ResponseFormat` or a JSON Schema dict.
        stop, top_p, seed: passed to the provider.
        extra_body: merged into the provider's JSON body, for what the library does not
            model (an object for a field the body sets too is merged into it key by key).
    """

    model: str = field(validator=_non_empty)
    messages: tuple[Message, ...] = field(converter=_messages)
    system: str | None = None
    max_tokens: int = 1024
    temperature: float | None = None
    tools: tuple[Tool, ...] = field(default=(), converter=to_tools)
    tool_choice: str | None = field(default=None, converter=to_tool_choice)
    response_format: ResponseFormat | None = field(default=None, converter=to_response_format)
    stop: tuple[str, ...] = field(default=(), converter=to_stop)
    top_p: float | None = None
    seed: int | None = None
    extra_body: Mapping[str, Any] | None = field(default=None, converter=to_extra_body)

    def __attrs_post_init__(self) -> None:
        top_p, seed = check_options(
            tools=self.tools, tool_choice=self.tool_choice, top_p=self.top_p, seed=self.seed
        )
        if top_p is not self.top_p or seed is not self.seed:  # numpy's numbers: plain ones
            object.__setattr__(self, "top_p", top_p)
            object.__setattr__(self, "seed", seed)
        messages, system = split_system(self.messages, self.system)
        if len(messages) != len(self.messages):
            # system messages become the system prompt (no provider gets a system role)
            object.__setattr__(self, "messages", messages)
            object.__setattr__(self, "system", system)
        if not self.messages:
            raise RecordValidationError(
                "messages must hold at least one user, assistant or tool message",
                path="messages",
            )
        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise RecordValidationError(
                f"max_tokens must be an integer >= 1, got {shown(self.max_tokens)}",
                path="max_tokens",
            )
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise RecordValidationError(
                f"max_tokens must be at most {MAX_TOKENS_LIMIT:,}, got {shown(self.max_tokens)}",
                path="max_tokens",
            )


@frozen(kw_only=True)
class Completion:
    """
    A provider's answer with the usage it reported.

    Args:
        content: its text.
        model: the model id the provider reported for its answer (often a dated
            snapshot of the one asked for), else the request's; what
            `LLMResponse.response_model` and ``gen_ai.response.model`` show.
        input_tokens, output_tokens: the usage it reported (see ``usage_reported``).
        stop_reason: why it stopped, in the provider's words.
        request_id: identifies the HTTP exchange (the provider's request-id header, for
            support tickets).
        ttft_ms: the time to its first token in milliseconds (``None``: not measured).
        tool_calls: the tools it called.
        response_id: the completion's own id in the body (``chatcmpl-...``,
            ``msg_...``) when the API returns one.
        rate_limit_reset: set when the provider's rate-limit headers on this answer said
            a limit is exhausted (remaining 0): the seconds until it resets, which the
            executor's rate limits wait out.
        cache_write_tokens, cache_write_1h_tokens, cache_read_tokens: prompt tokens
            written to the 5-minute and the 1-hour prompt cache and read from it, as
            reported apart from ``input_tokens`` (Anthropic's
            ``cache_creation_input_tokens`` and ``cache_read_input_tokens``); priced by
            `ModelInfo.cost`.
        web_search_requests: the server-side web searches the model ran (Anthropic's
            ``usage.server_tool_use.web_search_requests``), billed per search.
        cached_input_tokens: those of ``input_tokens`` the provider served from its
            prompt cache (OpenAI's ``usage.prompt_tokens_details.cached_tokens``), billed
            at the model's cached input price.
        service_tier: the service tier the provider says served the call (OpenAI's
            ``service_tier``: ``"default"``, ``"flex"``, ``"priority"``, ``"scale"``;
            Anthropic's ``usage.service_tier``: ``"standard"``, ``"priority"``,
            ``"batch"``; ``None``: not reported), by which `ModelInfo.at_service_tier`
            prices it.
        usage_reported: False when the answer did not report all of its usage (some
            OpenAI-compatible servers leave ``usage`` out or send null, or leave one of
            its counts out or null): a count it gave is kept, one it left out is
            estimated: ``output_tokens`` by the provider (the HTTP providers': a quarter
            of the UTF-8 bytes of the text and the tool calls' names and arguments,
            rounded up), ``input_tokens`` left 0, for which the executor records the
            request's estimate of the prompt and charges budgets the prompt's worst
            case, as for a stream without usage.  The record's metadata flags its
            output tokens as estimated then, and its input tokens when they are the
            request's estimate (a nonzero ``input_tokens`` is recorded as given).
    """

    content: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    stop_reason: str | None = None
    request_id: str | None = None
    ttft_ms: float | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    response_id: str | None = None
    rate_limit_reset: float | None = None
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    web_search_requests: int = 0
    cached_input_tokens: int = 0
    usage_reported: bool = True
    service_tier: str | None = None


class AttemptTimeout(TimeoutError):
    """
    The ``timeout`` given to `Provider.complete` ran out.

    The executor turns it into a `ProviderTimeoutError` naming the per-attempt timeout
    or the run's deadline; its cause is the timer's (or the HTTP client's) timeout.
    """


class Provider(abc.ABC):
    """
    One model API (Anthropic Messages, OpenAI Chat Completions, or an in-process fake).

    ``name`` is the provider's label in records and breaker keys.  The executor calls
    `bind` with its shared ``aiohttp.ClientSession`` on enter and `unbind` on exit; a
    provider used on its own manages a session of its own.

    A provider implements `_complete` (one request, no time limit of its own making);
    `complete` adds the caller's ``timeout``.  A provider that can bound a request more
    cheaply itself (the HTTP providers put it on the request's own timer) overrides
    `complete` and keeps its contract: `AttemptTimeout` when ``timeout`` runs out,
    otherwise only `ProviderError` subclasses (and `asyncio.CancelledError`, untouched).
    """

    name: str

    async def bind(self, session: aiohttp.ClientSession) -> None:
        """Use ``session`` for every request until `unbind`; default: nothing."""

    async def unbind(self) -> None:
        """Stop using the bound session (the executor closes it); default: nothing."""

    async def complete(
        self,
        request: CompletionRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the interface: callers pass their budget
    ) -> Completion:
        """
        Send one request and return the completion.

        Args:
            request: the request.
            timeout: bounds the whole call in seconds (the executor passes the smaller of
                the per-attempt timeout and what is left of the run's deadline).

        Raises:
            AttemptTimeout: (a `TimeoutError`) when ``timeout`` runs out; at 0 or less,
                before the provider is called.
            ProviderError: any other failure.
        """
        if timeout is None:
            return await self._complete(request)
        if timeout <= 0:
            raise AttemptTimeout(f"{self.name}: no time left [model {request.model}]")
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                return await self._complete(request)
        except TimeoutError as exc:
            if timer.expired() and not isinstance(exc, AttemptTimeout):
                raise AttemptTimeout(
                    f"{self.name}: no answer within {timeout:g}s [model {request.model}]"
                ) from exc
            raise

    @abc.abstractmethod
    async def _complete(self, request: CompletionRequest) -> Completion:
        """Send one request and return the completion, or raise a `ProviderError`."""

    async def stream(
        self,
        request: CompletionRequest,
        *,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> CompletionStream:
        """
        Send one request and return its answer as a `CompletionStream` of text deltas.

        The default, for providers that cannot stream, calls `complete` (bounded by the
        smaller timeout) and yields its whole content as one delta; a timeout of the
        provider's own (its client's) is raised as it is, as `complete` raises it.

        Args:
            request: the request.
            idle_timeout: seconds; bounds the wait for the first byte and every gap between
                chunks.
            total_timeout: seconds; bounds the whole stream.

        Raises:
            ProviderTimeoutError: either timeout running out.
            ProviderError: errors before the stream opens are raised here, later ones by the
                stream's ``__anext__``.
        """
        from .exceptions import ProviderTimeoutError

        limits = [t for t in (idle_timeout, total_timeout) if t is not None]
        timer = asyncio.timeout(min(limits) if limits else None)
        try:
            async with timer:
                completion = await self.complete(request)
        except TimeoutError as exc:
            if isinstance(exc, ProviderTimeoutError) or not timer.expired():
                raise  # the provider's own
            raise ProviderTimeoutError(
                f"{self.name}: no answer within {min(limits):.3f}s [model {request.model}]",
                provider=self.name,
                model=request.model,
            ) from None
        return _CompletedStream(completion)


class CompletionStream(abc.ABC):
    """
    A provider's answer arriving in pieces: ``async for piece in stream`` yields the
    non-empty text deltas (`str`) and the pieces of its tool calls (`ToolCallDelta`)
    in order, then stops when the answer is complete.

    `__anext__` raises a `ProviderError` when the stream fails (a stall past the idle
    timeout, an error event, a cut connection, tool-call arguments that are not a JSON
    object); `aclose` (idempotent) ends it early and releases the connection.
    `completion` is the answer so far (its ``tool_calls`` once the stream finished).
    """

    def __aiter__(self) -> Self:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> str | ToolCallDelta:
        """The next piece; `StopAsyncIteration` when the answer is complete."""

    async def next_pieces(self) -> list[str | ToolCallDelta]:
        """
        The pieces that have arrived and not been taken yet, in order, at least one
        (waiting for one when none has); `StopAsyncIteration` when the answer is
        complete, and a failure raises as `__anext__` would (after the pieces that came
        before it were taken).  The executor reads a stream this way.  This default
        takes one piece from `__anext__`; a stream that decodes pieces in batches
        overrides it to hand over a whole batch at once.
        """
        return [await self.__anext__()]

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop reading and release the connection (a no-op once finished or closed)."""

    @property
    @abc.abstractmethod
    def finished(self) -> bool:
        """
        True once the whole answer has arrived (its pieces may still wait to be taken):
        a streamed attempt's latency ends at `ended_at`, or, when that is None, when the
        executor first sees this True.
        """

    @property
    def ended_at(self) -> float | None:
        """
        When the whole answer arrived, as a `time.perf_counter` reading; None when not
        known (or not arrived yet).  The executor ends a streamed attempt's latency
        (and its OpenTelemetry span) there, so that the time its caller took to read
        pieces that had arrived is not counted as the model's: a stream whose caller
        pauses reads the network late, and only a time taken as the bytes arrive says
        when the model ended.  This default: None (the latency then ends when the
        executor first sees `finished`).
        """
        return None

    @abc.abstractmethod
    def completion(self) -> Completion:
        """
        What has arrived so far: the text, and the usage the provider reported (output
        tokens estimated until it reports them, see `output_estimated`; input tokens 0
        until then).
        """

    @property
    def output_estimated(self) -> bool:
        """
        True when `completion`'s output tokens are an estimate, not the provider's (it
        reported none, or, before the end, fewer than the estimate); the attempt's
        record is flagged then.  The HTTP providers estimate a quarter of the UTF-8
        bytes of the text and tool-call pieces (and of the reasoning streamed with no
        delta), rounded up, and at least one token per piece, as the executor
        estimates a prompt.  This default: False.
        """
        return False


def whole_answer_pieces(completion: Completion) -> list[str | ToolCallDelta]:
    """A whole answer as the pieces a stream of it yields: its text, then each call."""
    pieces: list[str | ToolCallDelta] = [completion.content] if completion.content else []
    pieces.extend(
        ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments_json)
        for i, call in enumerate(completion.tool_calls)
    )
    return pieces


class _CompletedStream(CompletionStream):
    """A whole `Completion` served as a stream: its text, then each tool call."""

    def __init__(self, completion: Completion) -> None:
        self._completion = completion
        self._pieces = whole_answer_pieces(completion)
        self._closed = False
        self._ended_at = time.perf_counter()  # the whole answer is here

    async def __anext__(self) -> str | ToolCallDelta:
        if not self._pieces or self._closed:
            raise StopAsyncIteration
        return self._pieces.pop(0)

    async def aclose(self) -> None:
        self._closed = True

    @property
    def finished(self) -> bool:
        return not self._pieces

    @property
    def ended_at(self) -> float:
        return self._ended_at

    def completion(self) -> Completion:
        # the whole answer has arrived (and is billed whole), whatever pieces are taken
        return self._completion
