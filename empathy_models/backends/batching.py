"""
Write-behind batching for any telemetry backend.

`BatchingTelemetryBackend` wraps a `TelemetryBackend` so that ``record`` and
``record_many`` only append to an in-memory queue; one background flusher task writes
the queue to the wrapped backend with ``record_many`` in batches.  The call path never
waits on disk or network while the queue has room (an append and a couple of
comparisons, about a microsecond).

* A batch is written when ``max_batch`` records are waiting, when the oldest waiting
  record is ``flush_interval`` seconds old, on `flush`, on every read (`aggregate`,
  `recent`, `purge` flush first, so they see every record accepted before them) and on
  `aclose`.
* The queue holds at most ``max_queue`` records (plus the batch being written).  When it
  is full, ``on_full="wait"`` (the default) makes the caller wait for room: nothing is
  lost.  ``on_full="drop"`` discards the new record instead, counts it in `dropped`
  and warns once (``RuntimeWarning``).
* A failing write is logged on the ``empathy_models.telemetry`` logger and counted in
  `failed` (records); it never raises into ``record``.  The wrapped backend is
  responsible for transient retries (the SQLite backend retries a busy database).
* Nothing enqueued before a clean ``aclose()`` is lost: `aclose` writes every waiting
  record, stops the flusher task, awaits it, and closes the wrapped backend.  The
  flusher is a single asyncio task owned by the wrapper, started by ``__aenter__`` or
  by the first record; there is no task per call and no fire-and-forget.

The same engine batches `SQLiteTelemetryBackend` by default.
"""

from __future__ import annotations

import asyncio
import logging
import math
import warnings
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Final, Literal

import anyio

from ..abc import TelemetryBackend
from ..evidence import EvidenceBatch
from ..exceptions import BackendClosedError, ConfigurationError, RecordValidationError
from ..records import LLMCallRecord, ModelPerformance

__all__ = ["BatchingTelemetryBackend"]

logger = logging.getLogger("empathy_models.telemetry")

OnFull = Literal["wait", "drop"]

DEFAULT_MAX_BATCH: Final = 500
DEFAULT_FLUSH_INTERVAL: Final = 0.1
DEFAULT_MAX_QUEUE: Final = 10_000


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_interval(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"flush_interval must be a finite number > 0, got {value!r}")
    return float(value)


def _check_on_full(value: object) -> OnFull:
    if value == "wait":
        return "wait"
    if value == "drop":
        return "drop"
    raise ConfigurationError(f"on_full must be 'wait' or 'drop', got {value!r}")


def _check_records(records: Sequence[LLMCallRecord]) -> list[LLMCallRecord]:
    batch = list(records)
    for r in batch:
        if not isinstance(r, LLMCallRecord):
            raise RecordValidationError(f"expected an LLMCallRecord, got {type(r).__name__}")
    return batch


class _Batcher:
    """
    The bounded queue and its one flusher task (shared by the batching front-ends).

    Counters: ``enqueued`` records accepted so far, ``settled`` records written or
    failed so far (``settled <= enqueued``); `flush` waits until ``settled`` reaches
    the ``enqueued`` it saw.  Everything runs on the event loop; no locks are needed
    because the fast path never awaits.
    """

    def __init__(
        self,
        write: Callable[[list[LLMCallRecord]], Awaitable[None]],
        *,
        owner: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        on_full: OnFull = "wait",
    ) -> None:
        self.max_batch = _check_int("max_batch", max_batch)
        self.flush_interval = _check_interval(flush_interval)
        self.max_queue = _check_int("max_queue", max_queue)
        self.on_full: OnFull = _check_on_full(on_full)
        self._write = write
        self._owner = owner
        self.queue: list[LLMCallRecord] = []
        self.enqueued = 0
        self.settled = 0
        self.written = 0
        self.failed = 0
        self.dropped = 0
        self.closing = False
        self._urgent = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._space = asyncio.Event()

    # ------------------------------------------------------------------ enqueue

    def _closed_error(self) -> BackendClosedError:
        return BackendClosedError(f"{self._owner} was used after aclose()", target=self._owner)

    def start(self) -> None:
        """Start the flusher task if it is not running (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"empathy-models telemetry flusher for {self._owner}"
            )

    def put_nowait(self, record: LLMCallRecord) -> bool:
        """Append ``record`` if there is room; return False when the queue is full."""
        queue = self.queue
        n = len(queue)
        if n >= self.max_queue:
            return False
        queue.append(record)
        self.enqueued += 1
        if n == 0:
            if self._task is None:
                self.start()
            self._wake.set()
        elif n + 1 >= self.max_batch:
            self._urgent = True
            self._wake.set()
        return True

    async def _put_slow(self, record: LLMCallRecord) -> None:
        if self.on_full == "drop":
            self.dropped += 1
            if self.dropped == 1:
                logger.warning(
                    "%s: telemetry queue full (%d records); dropping records",
                    self._owner,
                    self.max_queue,
                )
                warnings.warn(
                    f"{self._owner}: the telemetry queue is full ({self.max_queue} records) and "
                    "on_full='drop'; records are being dropped (counted in .dropped)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        while not self.put_nowait(record):
            if self.closing or (self._task is not None and self._task.done()):
                raise self._closed_error()
            self._urgent = True
            self._wake.set()
            space = self._space
            await space.wait()

    async def submit(self, record: LLMCallRecord) -> None:
        """Enqueue one record; waits only when the queue is full and the policy is wait."""
        if self.closing:
            raise self._closed_error()
        if not isinstance(record, LLMCallRecord):
            raise RecordValidationError(f"expected an LLMCallRecord, got {type(record).__name__}")
        if not self.put_nowait(record):
            await self._put_slow(record)

    async def submit_many(self, records: Sequence[LLMCallRecord]) -> None:
        """Enqueue several records in order (all are type-checked before any is queued)."""
        if self.closing:
            raise self._closed_error()
        for record in _check_records(records):
            if not self.put_nowait(record):
                await self._put_slow(record)

    # ------------------------------------------------------------------ flusher

    async def _run(self) -> None:
        try:
            while True:
                if not self.queue:
                    if self.closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not (self._urgent or self.closing) and len(self.queue) < self.max_batch:
                    # let the batch fill: until it is full, a flush is asked for, or the
                    # interval has passed since the first record arrived
                    self._wake.clear()
                    with anyio.move_on_after(self.flush_interval):
                        await self._wake.wait()
                self._urgent = False
                await self._drain()
        finally:
            # wake every waiter so none can hang on a stopped flusher
            self._progress.set()
            self._space.set()

    async def _drain(self) -> None:
        while self.queue:
            if len(self.queue) <= self.max_batch:
                batch, self.queue = self.queue, []
            else:
                batch = self.queue[: self.max_batch]
                del self.queue[: self.max_batch]
            space, self._space = self._space, asyncio.Event()
            space.set()
            try:
                await self._write(batch)
            except Exception as exc:
                self.failed += len(batch)
                logger.warning(
                    "%s: a batch of %d telemetry records could not be written (%s: %s); "
                    "%d records failed so far",
                    self._owner,
                    len(batch),
                    type(exc).__name__,
                    exc,
                    self.failed,
                )
            else:
                self.written += len(batch)
            finally:
                self.settled += len(batch)
                progress, self._progress = self._progress, asyncio.Event()
                progress.set()

    # ------------------------------------------------------------------ flush / close

    async def flush(self) -> None:
        """Wait until every record enqueued before this call is written (or failed)."""
        target = self.enqueued
        while self.settled < target:
            task = self._task
            if task is None or task.done():
                # no flusher (never started, or stopped by cancellation): write inline
                await self._drain()
                continue
            self._urgent = True
            self._wake.set()
            progress = self._progress
            await progress.wait()

    async def aclose(self) -> None:
        """Write everything waiting, then stop and await the flusher task."""
        self.closing = True
        task = self._task
        if task is None:
            await self._drain()
            return
        self._wake.set()
        # If this await is cancelled, asyncio cancels the flusher with it; records still
        # queued are then lost, which is why only a *clean* aclose() promises delivery.
        await task
        if self.queue:  # the flusher stopped early (it was cancelled from outside)
            await self._drain()


class BatchingTelemetryBackend(TelemetryBackend):
    """
    Wrap any `TelemetryBackend` (or a URL for one) with write-behind batching.

    ``record`` / ``record_many`` return as soon as the records are queued; see the
    module docstring for when batches are written, the ``on_full`` policy and the
    counters `dropped`, `failed`, `written` and `pending`.  Reads flush first.
    `aclose` writes everything still queued, then closes the wrapped backend.

    Raises `ConfigurationError` for a bad setting, `RecordValidationError` when given
    something that is not an `LLMCallRecord`, and `BackendClosedError` after `aclose`.
    """

    def __init__(
        self,
        inner: TelemetryBackend | str,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        on_full: OnFull = "wait",
    ) -> None:
        if isinstance(inner, str):
            from . import telemetry_from_url

            inner = telemetry_from_url(inner)
        if not isinstance(inner, TelemetryBackend):
            raise ConfigurationError(f"inner must be a TelemetryBackend or a URL, got {inner!r}")
        self._inner = inner
        self._batcher = _Batcher(
            inner.record_many,
            owner=f"BatchingTelemetryBackend({inner!r})",
            max_batch=max_batch,
            flush_interval=flush_interval,
            max_queue=max_queue,
            on_full=on_full,
        )

    def __repr__(self) -> str:
        b = self._batcher
        return (
            f"BatchingTelemetryBackend({self._inner!r}, max_batch={b.max_batch}, "
            f"flush_interval={b.flush_interval}, max_queue={b.max_queue}, on_full={b.on_full!r})"
        )

    @property
    def inner(self) -> TelemetryBackend:
        """The wrapped backend."""
        return self._inner

    @property
    def dropped(self) -> int:
        """Records discarded because the queue was full (``on_full="drop"`` only)."""
        return self._batcher.dropped

    @property
    def failed(self) -> int:
        """Records whose batch the wrapped backend failed to write."""
        return self._batcher.failed

    @property
    def written(self) -> int:
        """Records written to the wrapped backend so far."""
        return self._batcher.written

    @property
    def pending(self) -> int:
        """Records queued and not yet handed to the wrapped backend."""
        return len(self._batcher.queue)

    @property
    def persistent(self) -> bool:
        return self._inner.persistent

    async def _aopen(self) -> None:
        await self._inner.__aenter__()
        self._batcher.start()

    async def record(self, record: LLMCallRecord) -> None:
        """Queue one record (see the class docstring); does not wait on the backend."""
        if self._closed:
            self._check_open()
        await self._batcher.submit(record)

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        """Queue several records in order; does not wait on the backend."""
        self._check_open()
        await self._batcher.submit_many(records)

    async def flush(self) -> None:
        """Write every record queued so far, then flush the wrapped backend."""
        self._check_open()
        await self._batcher.flush()
        await self._inner.flush()

    async def aggregate(
        self,
        *,
        workflow: str | None = None,
        stage: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        per_stage: bool = True,
    ) -> list[ModelPerformance]:
        await self.flush()
        return await self._inner.aggregate(
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
    ) -> list[LLMCallRecord]:
        await self.flush()
        return await self._inner.recent(
            limit=limit, workflow=workflow, stage=stage, model=model, since=since
        )

    async def evidence(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        after_version: int = 0,
    ) -> EvidenceBatch:
        await self.flush()
        return await self._inner.evidence(since=since, until=until, after_version=after_version)

    async def purge(self, *, before: datetime) -> int:
        await self.flush()
        return await self._inner.purge(before=before)

    async def _aclose(self) -> None:
        try:
            await self._batcher.aclose()
        finally:
            await self._inner.aclose()
