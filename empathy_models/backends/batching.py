"""
Write-behind batching for any telemetry backend.

`BatchingTelemetryBackend` wraps a `TelemetryBackend` so that ``record`` and
``record_many`` only append to an in-memory queue; one background flusher task writes
the queue to the wrapped backend with ``record_many`` in batches.  The call path never
waits on disk or network (an append and a couple of comparisons, about a
microsecond), whatever state the store is in.

* A batch is written when ``max_batch`` records are waiting, when the oldest waiting
  record is ``flush_interval`` seconds old, on `flush`, on every read (`aggregate`,
  `recent`, `purge` flush first, so they see every record accepted before them) and on
  `aclose`.
* The queue holds at most ``max_queue`` records in memory.  When it is full,
  ``on_full="spill"`` (the default) moves the queue to the local spool file (see
  `empathy_models.backends._spool`, under ``$EMPATHY_HOME/spool``) on a worker thread
  and the records are written to the store later; the caller never waits.  A backend
  that keeps nothing across processes (memory) has no spool, and waits instead.
  ``on_full="wait"`` makes the caller wait for room; ``on_full="drop"`` discards the
  new record, counts it in `dropped` and warns once (``RuntimeWarning``).  If the
  spool itself falls a full queue behind, new records are dropped and counted.
* A store fault (the database unreachable, locked, full...) loses nothing: the batch
  is kept at the head of the queue and retried with exponential backoff (up to
  `MAX_BACKOFF` seconds), while new records keep queueing and spilling.  One warning is
  logged per outage and one when the store is back; then the spool is replayed.
  Writes are idempotent by ``call_id``, so a record written twice (a replay after a
  crash) is stored once.
* A batch the store refuses for its content (`TelemetryRejectedError`, or a
  ``ValueError`` / ``TypeError`` from the backend) is split in halves until the
  refused record is alone, so the others are stored; that record is retried with its
  values escaped or clamped (`empathy_models.backends._storable`, flagged in its
  metadata), and given up only if it is still refused.  `failed` counts the records
  truly given up, each with a warning.
* `aclose` writes what it can within ``close_timeout`` seconds, then spools the rest
  (a write still in flight is spooled too; the replay skips it if it was committed).
* Exit paths: unless ``exit_flush=False``, a backend still open at interpreter exit or
  on SIGTERM has its queued records written synchronously (SQLite) or spooled,
  within a bounded time.  The SIGTERM handler is installed only when SIGTERM still
  has its default action, in the main thread; it flushes, then ends the process with
  status 143 at once, as the default action would.  A backend garbage
  collected while open emits a ``ResourceWarning`` and is flushed the same way.
  SIGKILL (and a power cut) loses what is in memory: at most ``max_queue`` queued
  records and a batch in flight (``max_batch``), plus, while the store is failing or
  slower than the producer, two spills (``max_queue`` each) not yet on disk.

The same engine batches `SQLiteTelemetryBackend` by default.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from types import FrameType
from typing import Final, Literal

import anyio
import anyio.to_thread

from ..abc import TelemetryBackend
from ..evidence import EvidenceBatch
from ..exceptions import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    RecordValidationError,
    TelemetryRejectedError,
)
from ..records import LLMCallRecord, ModelPerformance
from ._spool import Spool
from ._storable import storable

__all__ = ["BatchingTelemetryBackend"]

logger = logging.getLogger("empathy_models.telemetry")

OnFull = Literal["spill", "wait", "drop"]

DEFAULT_MAX_BATCH: Final = 500
DEFAULT_FLUSH_INTERVAL: Final = 0.1
DEFAULT_MAX_QUEUE: Final = 10_000
DEFAULT_CLOSE_TIMEOUT: Final = 5.0
MIN_BACKOFF: Final = 0.05
"""Seconds before the first retry of a batch the store failed to take."""
MAX_BACKOFF: Final = 2.0
"""The longest wait between two retries during a store outage."""
_CANCEL_GRACE: Final = 1.0


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_interval(value: object) -> float:
    return _check_seconds("flush_interval", value)


def _check_on_full(value: object) -> OnFull:
    if value == "spill":
        return "spill"
    if value == "wait":
        return "wait"
    if value == "drop":
        return "drop"
    raise ConfigurationError(f"on_full must be 'spill', 'wait' or 'drop', got {value!r}")


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def _check_records(records: Sequence[LLMCallRecord]) -> list[LLMCallRecord]:
    batch = list(records)
    for r in batch:
        if not isinstance(r, LLMCallRecord):
            raise RecordValidationError(f"expected an LLMCallRecord, got {type(r).__name__}")
    return batch


def _is_rejection(exc: BaseException) -> bool:
    """True when ``exc`` says the records themselves were refused (not the store down)."""
    if isinstance(exc, TelemetryRejectedError | RecordValidationError):
        return True
    if isinstance(exc, BackendError | ConfigurationError):
        return False
    return isinstance(exc, ValueError | TypeError)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- exit hooks

_live: weakref.WeakSet[_Batcher] = weakref.WeakSet()
_hooks_installed = False


def _flush_all(why: str) -> None:
    for batcher in list(_live):
        try:
            batcher.exit_flush(why)
        except Exception:  # an exit hook must never stop the others
            logger.exception("%s: flushing telemetry at %s failed", batcher.owner, why)


def _at_exit() -> None:
    for batcher in list(_live):
        if not batcher.closed:
            warnings.warn(
                f"{batcher.owner} was never closed; flushing it at interpreter exit "
                "(use 'async with' or aclose())",
                ResourceWarning,
                stacklevel=1,
            )
    _flush_all("interpreter exit")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # The handler replaces SIGTERM's default action (end the process at once): flush, then
    # end the process the same way.  Unwinding a running event loop with SystemExit could
    # wait for ever on a backend's worker thread.
    _flush_all("SIGTERM")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


def _install_exit_hooks() -> None:
    """Register the atexit flush, and the SIGTERM handler if SIGTERM is at its default."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # no signals here (embedded interpreter)
            pass


class _Batcher:
    """
    The bounded queue, its flusher task and its spill task (shared by the front-ends).

    Counters: ``enqueued`` records accepted so far, ``settled`` records written,
    spooled, dropped from the queue or given up (``settled <= enqueued``); `flush`
    waits until ``settled`` reaches the ``enqueued`` it saw, or until a write attempt
    failed.  Everything runs on the event loop; no locks are needed because the fast
    path never awaits.  ``exit_flush`` is synchronous: it runs at interpreter exit,
    in the SIGTERM handler and when the batcher is garbage collected while open.
    """

    def __init__(
        self,
        write: Callable[[list[LLMCallRecord]], Awaitable[None]],
        *,
        owner: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        on_full: OnFull = "spill",
        spool: Spool | None = None,
        sync_write: Callable[[list[LLMCallRecord]], None] | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        exit_flush: bool = True,
    ) -> None:
        self.max_batch = _check_int("max_batch", max_batch)
        self.flush_interval = _check_interval(flush_interval)
        self.max_queue = _check_int("max_queue", max_queue)
        self.on_full: OnFull = _check_on_full(on_full)
        self.close_timeout = _check_seconds("close_timeout", close_timeout, allow_zero=True)
        self.exit_flush_enabled = _check_bool("exit_flush", exit_flush)
        self._write = write
        self._sync_write = sync_write
        self._spool = spool
        self.owner = owner
        self.queue: list[LLMCallRecord] = []
        self.overflow: list[LLMCallRecord] = []  # waiting for the spill task
        self.inflight: list[LLMCallRecord] | None = None  # the batch being written
        self.spilling: list[LLMCallRecord] | None = None  # the records being spooled
        self.enqueued = 0
        self.settled = 0
        self.written = 0
        self.failed = 0
        self.dropped = 0
        self.spooled = 0
        self.replayed = 0
        self.sanitized = 0
        self.faults = 0
        self.outage_since: float | None = None
        self.closing = False
        self.closed = False
        self._urgent = False
        self._backoff = MIN_BACKOFF
        self._replay_due = spool is not None
        self._replaying = False
        self._spill_warned = False
        self._task: asyncio.Task[None] | None = None
        self._spill_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()  # flush or close: stop waiting between retries
        self._spill_wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._space = asyncio.Event()

    def __del__(self) -> None:
        if getattr(self, "closed", True) or getattr(self, "_task", None) is None:
            return
        pending = len(self.queue) + len(self.overflow) + len(self.inflight or ())
        warnings.warn(
            f"{self.owner} was garbage collected without aclose() ({pending} telemetry "
            "records still queued are flushed now); use 'async with' or aclose()",
            ResourceWarning,
            stacklevel=1,
            source=self,
        )
        try:
            self.exit_flush("garbage collection")
        except Exception:
            logger.exception("%s: flushing telemetry at garbage collection failed", self.owner)

    # ------------------------------------------------------------------ enqueue

    @property
    def pending(self) -> int:
        """Records in memory: queued, or on their way to the spool."""
        return len(self.queue) + len(self.overflow) + len(self.spilling or ())

    def _closed_error(self) -> BackendClosedError:
        return BackendClosedError(f"{self.owner} was used after aclose()", target=self.owner)

    def start(self) -> None:
        """Start the flusher task if it is not running (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"empathy-models telemetry flusher for {self.owner}"
            )
            if self.exit_flush_enabled:
                _live.add(self)
                _install_exit_hooks()

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

    def _drop(self, record: LLMCallRecord, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1:
            logger.warning("%s: %s; dropping records (counted in .dropped)", self.owner, why)
            warnings.warn(
                f"{self.owner}: {why}; records are being dropped (counted in .dropped)",
                RuntimeWarning,
                stacklevel=5,
            )

    def _spill_queue(self, record: LLMCallRecord) -> None:
        """Queue full: hand the queue to the spill task and start a new one (never waits)."""
        if len(self.overflow) >= self.max_queue:
            # the spill task is a full queue behind (the producer never yielded, or the
            # disk is slow): spool that backlog here, so memory stays bounded; this
            # waits on the local disk, never on the store
            backlog, self.overflow = self.overflow, []
            self.spill_or_fail(backlog, "the queue was full")
        self.overflow.extend(self.queue)
        self.queue = [record]
        self.enqueued += 1
        if self._spill_task is None:
            self._spill_task = asyncio.get_running_loop().create_task(
                self._spill_run(), name=f"empathy-models telemetry spill for {self.owner}"
            )
        self._spill_wake.set()
        self._wake.set()

    async def _put_slow(self, record: LLMCallRecord) -> None:
        if self.on_full == "drop":
            self._drop(
                record,
                f"the telemetry queue is full ({self.max_queue} records) and on_full='drop'",
            )
            return
        if self.on_full == "spill" and self._spool is not None:
            self._spill_queue(record)
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

    def _signal_progress(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def _run(self) -> None:
        try:
            while True:
                if self._replay_due:
                    if not await self._replay():
                        if self.closing:
                            return
                        await self._pause()
                    continue
                if not self.queue:
                    if self.closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if (
                    not (self._urgent or self.closing)
                    and self.outage_since is None
                    and len(self.queue) < self.max_batch
                ):
                    # let the batch fill: until it is full, a flush is asked for, or the
                    # interval has passed since the first record arrived
                    self._wake.clear()
                    with anyio.move_on_after(self.flush_interval):
                        await self._wake.wait()
                self._urgent = False
                if not await self._drain():
                    if self.closing:
                        return
                    await self._pause()
        finally:
            # wake every waiter so none can hang on a stopped flusher
            self._progress.set()
            self._space.set()

    async def _pause(self) -> None:
        """Wait before the next retry (exponential backoff); a flush or close cuts it short."""
        delay = self._backoff * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2.0, MAX_BACKOFF)
        self._kick.clear()
        with anyio.move_on_after(delay):
            await self._kick.wait()

    def _fault(self, exc: BaseException | None) -> None:
        self.faults += 1
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            logger.warning(
                "%s: the telemetry store is unavailable (%s); records are kept and retried "
                "(in memory up to %d, then in the spool)",
                self.owner,
                "unknown error" if exc is None else _describe(exc),
                self.max_queue,
            )
        self._signal_progress()

    def _recovered(self) -> None:
        self._backoff = MIN_BACKOFF
        if self.outage_since is not None:
            logger.warning(
                "%s: the telemetry store is back after %.1f s; kept records are being written",
                self.owner,
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None
            if self._spool is not None and self.spooled:
                self._replay_due = True

    async def _drain(self) -> bool:
        """Write the queue; False when the store failed (the rest is back in the queue)."""
        while self.queue:
            batch = self.queue[: self.max_batch]
            self.inflight = batch  # before the records leave the queue (exit hooks)
            del self.queue[: len(batch)]
            space, self._space = self._space, asyncio.Event()
            space.set()
            rest = await self._deliver(batch)
            self.inflight = None
            self.settled += len(batch) - len(rest)
            if rest:
                self.queue[:0] = rest
                self._fault(self._last_fault)
                return False
            self._recovered()
            self._signal_progress()
        return True

    _last_fault: BaseException | None = None

    async def _deliver(self, batch: list[LLMCallRecord]) -> list[LLMCallRecord]:
        """
        Write ``batch``; return the records not written because the store failed.

        A batch refused for its content is split until each refused record is alone;
        that record is retried made safe, or given up.
        """
        try:
            await self._write(batch)
        except Exception as exc:
            if not _is_rejection(exc):
                self._last_fault = exc
                return batch
            if len(batch) > 1:
                mid = len(batch) // 2
                rest = await self._deliver(batch[:mid])
                if rest:
                    return rest + batch[mid:]
                return await self._deliver(batch[mid:])
            return await self._deliver_made_safe(batch[0], exc)
        self.written += len(batch)
        return []

    async def _deliver_made_safe(
        self, record: LLMCallRecord, exc: BaseException
    ) -> list[LLMCallRecord]:
        fields: tuple[str, ...] = ()
        try:
            fixed, fields = storable(record)
        except RecordValidationError as invalid:
            exc = invalid
        if fields:
            try:
                await self._write([fixed])
            except Exception as again:
                if not _is_rejection(again):
                    self._last_fault = again
                    return [record]
                exc = again
            else:
                self.written += 1
                self.sanitized += 1
                logger.warning(
                    "%s: record %s was refused by the store and stored with %s escaped or "
                    "clamped (listed in its metadata under %r)",
                    self.owner,
                    record.call_id,
                    ", ".join(fields),
                    "empathy_models.sanitized",
                )
                return []
        self.failed += 1
        logger.warning(
            "%s: record %s was refused by the store and given up (%s); %d records given up so far",
            self.owner,
            record.call_id,
            _describe(exc),
            self.failed,
        )
        return []

    async def _replay(self) -> bool:
        """Write the spool's files to the store; False when the store failed meanwhile."""
        self._replay_due = False
        spool = self._spool
        if spool is None:
            return True
        self._replaying = True
        try:
            try:
                paths = await anyio.to_thread.run_sync(spool.files)
            except OSError as exc:
                logger.warning("%s: cannot read the spool (%s)", self.owner, _describe(exc))
                return True
            for path in paths:
                claimed = await anyio.to_thread.run_sync(spool.claim, path)
                if claimed is None:
                    continue
                try:
                    records, bad = await anyio.to_thread.run_sync(spool.read, claimed)
                except OSError as exc:
                    logger.warning(
                        "%s: cannot read spool file %s (%s)", self.owner, claimed, _describe(exc)
                    )
                    continue
                self.failed += bad
                for start in range(0, len(records), self.max_batch):
                    chunk = records[start : start + self.max_batch]
                    rest = await self._deliver(chunk)
                    self.replayed += len(chunk) - len(rest)
                    if rest:
                        await anyio.to_thread.run_sync(spool.release, claimed)
                        self._replay_due = True
                        self._fault(self._last_fault)
                        return False
                await anyio.to_thread.run_sync(spool.remove, claimed)
                self._recovered()
            return True
        finally:
            self._replaying = False
            self._signal_progress()

    # ------------------------------------------------------------------ spill

    async def _spill_run(self) -> None:
        while True:
            if not self.overflow:
                if self.closing:
                    return
                self._spill_wake.clear()
                await self._spill_wake.wait()
                continue
            records, self.overflow = self.overflow, []
            self.spilling = records
            failure = await anyio.to_thread.run_sync(self._spool_write, records)
            self.spilling = None
            self._account_spill(len(records), failure, "the queue was full")

    def _spool_write(self, records: list[LLMCallRecord]) -> BaseException | None:
        """Write ``records`` to the spool file (blocking); the error, if it failed."""
        if self._spool is None:
            return RuntimeError("this backend has no spool (it keeps nothing across processes)")
        try:
            self._spool.write(records)
        except (OSError, ValueError) as exc:
            return exc
        return None

    def _account_spill(self, n: int, failure: BaseException | None, why: str) -> None:
        """Count ``n`` records spooled (or given up when ``failure``) and say so once."""
        self.settled += n
        if failure is None:
            self.spooled += n
            self._replay_due = True
            if not self._spill_warned or why != "the queue was full":
                self._spill_warned = True
                logger.warning(
                    "%s: %d telemetry records spooled (%s); they are written to the store "
                    "when it next takes records",
                    self.owner,
                    n,
                    why,
                )
        else:
            self.failed += n
            logger.warning(
                "%s: %d telemetry records given up (%s; %s); %d records given up so far",
                self.owner,
                n,
                why,
                _describe(failure),
                self.failed,
            )
        self._signal_progress()

    def spill_or_fail(self, records: list[LLMCallRecord], why: str) -> None:
        """Spool ``records`` now, blocking (exit paths), or count them given up."""
        if records:
            self._account_spill(len(records), self._spool_write(records), why)

    # ------------------------------------------------------------------ flush / close

    async def flush(self) -> None:
        """
        Wait until every record enqueued before this call is written (or spooled, or
        given up), or until a write attempt fails: during a store outage, flush makes
        one attempt and returns, the records staying queued for the next.
        """
        target = self.enqueued
        faults = self.faults
        while (
            self.settled < target or self._replay_due or self._replaying
        ) and self.faults == faults:
            task = self._task
            if task is None or task.done():
                # never started, or stopped by cancellation from outside: (re)start it
                self._task = None
                self.start()
            self._urgent = True
            self._wake.set()
            self._kick.set()
            progress = self._progress
            await progress.wait()

    def _take_all(self) -> list[LLMCallRecord]:
        records = list(self.inflight or ())
        self.inflight = None
        records.extend(self.spilling or ())
        self.spilling = None
        records.extend(self.queue)
        self.queue = []
        records.extend(self.overflow)
        self.overflow = []
        return records

    async def aclose(self) -> None:
        """
        Write everything waiting within ``close_timeout`` seconds, spool the rest, and
        stop the flusher and spill tasks.
        """
        self.closing = True
        if self._task is None and self.queue:
            self.start()
        self._wake.set()
        self._kick.set()
        self._spill_wake.set()
        deadline = time.monotonic() + self.close_timeout
        for task in (self._task, self._spill_task):
            if task is None:
                continue
            left = max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({task}, timeout=left)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=_CANCEL_GRACE)
            if task.done() and not task.cancelled() and task.exception() is not None:
                logger.error(
                    "%s: the telemetry flusher failed", self.owner, exc_info=task.exception()
                )
        remaining = self._take_all()
        if remaining:
            failure = await anyio.to_thread.run_sync(self._spool_write, remaining)
            self._account_spill(
                len(remaining),
                failure,
                f"not written within close_timeout={self.close_timeout:g} s",
            )
        self.closed = True
        _live.discard(self)

    def exit_flush(self, why: str) -> None:
        """Synchronously write (or spool) every record still in memory; for exit paths."""
        if self.closed:
            return
        records = self._take_all()
        if not records:
            return
        if self._sync_write is not None:
            try:
                self._sync_write(records)
            except Exception as exc:
                logger.warning(
                    "%s: writing %d telemetry records at %s failed (%s); spooling them",
                    self.owner,
                    len(records),
                    why,
                    _describe(exc),
                )
            else:
                self.written += len(records)
                self.settled += len(records)
                return
        self.spill_or_fail(records, f"flushed at {why}")


class BatchingTelemetryBackend(TelemetryBackend):
    """
    Wrap any `TelemetryBackend` (or a URL for one) with write-behind batching.

    ``record`` / ``record_many`` return as soon as the records are queued; see the
    module docstring for when batches are written, what happens during a store outage,
    the ``on_full`` policy, the spool and the exit hooks, and the counters `dropped`,
    `failed`, `written`, `spooled` and `pending`.  Reads flush first.  `aclose` writes
    everything still queued within ``close_timeout`` seconds, spools the rest, then
    closes the wrapped backend.

    ``spool=False`` disables the spool (past ``max_queue`` the caller then waits, or
    records are dropped with ``on_full="drop"``); a wrapped backend that is not
    `persistent` never spools.  ``exit_flush=False`` opts out of the exit hooks.

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
        on_full: OnFull = "spill",
        spool: bool = True,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        exit_flush: bool = True,
    ) -> None:
        if isinstance(inner, str):
            from . import telemetry_from_url

            inner = telemetry_from_url(inner)
        if not isinstance(inner, TelemetryBackend):
            raise ConfigurationError(f"inner must be a TelemetryBackend or a URL, got {inner!r}")
        self._inner = inner
        target = getattr(inner, "spool_target", None)
        if not isinstance(target, str):
            target = f"{type(inner).__module__}.{type(inner).__qualname__}:{inner!r}"
        use_spool = _check_bool("spool", spool) and inner.persistent
        self._batcher = _Batcher(
            inner.record_many,
            owner=f"BatchingTelemetryBackend({inner!r})",
            max_batch=max_batch,
            flush_interval=flush_interval,
            max_queue=max_queue,
            on_full=on_full,
            spool=Spool(target) if use_spool else None,
            close_timeout=close_timeout,
            exit_flush=exit_flush,
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
        """Records given up: refused by the store even made safe, or unspoolable."""
        return self._batcher.failed

    @property
    def written(self) -> int:
        """Records written to the wrapped backend so far (replayed ones included)."""
        return self._batcher.written

    @property
    def spooled(self) -> int:
        """Records written to the local spool so far (replayed into the store later)."""
        return self._batcher.spooled

    @property
    def pending(self) -> int:
        """Records in memory, neither handed to the wrapped backend nor spooled yet."""
        return self._batcher.pending

    @property
    def persistent(self) -> bool:
        return self._inner.persistent

    @property
    def stores_records(self) -> bool:
        return self._inner.stores_records

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

    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        await self.flush()
        return await self._inner.aggregate(
            workflow=workflow, stage=stage, since=since, until=until, per_stage=per_stage
        )

    async def _recent(
        self,
        *,
        limit: int,
        workflow: str | None,
        stage: str | None,
        model: str | None,
        since: datetime | None,
    ) -> list[LLMCallRecord]:
        await self.flush()
        return await self._inner.recent(
            limit=limit, workflow=workflow, stage=stage, model=model, since=since
        )

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        await self.flush()
        return await self._inner.evidence(since=since, until=until, after_version=after_version)

    async def _purge(self, *, before: datetime) -> int:
        await self.flush()
        return await self._inner.purge(before=before)

    async def _aclose(self) -> None:
        try:
            await self._batcher.aclose()
        finally:
            await self._inner.aclose()
