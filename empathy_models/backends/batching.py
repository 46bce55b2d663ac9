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
* The spool is replayed before the queue is written (its records are the older), but
  a replay that leaves records in it (the store failed, or records were held back,
  below) is retried after a backoff of its own, while the queue goes on being written.
* A batch the store refuses for its content (`TelemetryRejectedError`, or a
  ``ValueError`` / ``TypeError`` from the backend) is split in halves until the
  refused record is alone, so the others are stored; that record is retried with its
  values escaped or clamped (`empathy_models.backends._storable`, flagged in its
  metadata), and given up only if it is still refused.  `failed` counts the records
  truly given up, each with a warning.
* A batch that fails with an error that is neither a refusal nor a store fault
  (`BackendError`, `OSError`), a third-party backend's own exception say, is taken
  for a store fault, unless the store took the write just before: then it is written
  in halves, so the other records are stored.  A record the store fails on alone is
  held back: spooled, in a file replayed after the rest of the spool (without a
  spool, kept at the head of the queue), and retried after the backoff; one that
  fails alone ``STRIKES`` (3) times, the store taking other records between, is
  treated as refused (retried made storable, or given up, counted in `failed` with a
  warning).  In the halving, a half failing right after its sibling failed is held
  back too when it is one record, and probed with one of its records alone when it
  is several.  Two failures in a row outside the halving (the probe's failure after
  its half's) are a store fault: nothing is held back or given up (but a spooled
  record alone failing right after a failure proves nothing, and waits with the held
  ones: see `_batch_spill`).  While the store fails so, each retry writes the batch,
  then one of its records alone (the newest not yet probed): the store taking it is
  back, and the batch is written in halves as above, so records it fails on at the
  head of the queue hold up nothing.  A batch holds at least one record behind those
  held back at the head of the queue and, while probing, two, and one more for each
  failed probe (either can take it past ``max_batch``).
* `aclose` writes what it can within ``close_timeout`` seconds, then spools the rest
  (a write still in flight is spooled too; the replay skips it if it was committed).
  Records still waiting for the spill task are written with the queue, a spill being
  written when it closes is replayed once on disk, and the spool is replayed as by a
  flush (its backoff cut short) unless the store is down, so a store that is up at
  close is left nothing in the spool but the records it failed on alone (held back,
  whose files a close leaves for the next replay).
* Exit paths: unless ``exit_flush=False``, a backend still open at interpreter exit or
  on SIGTERM has its queued records written synchronously (SQLite) or spooled,
  within a bounded time, and only then warned about (``-W error`` loses nothing).  The
  SIGTERM handler is installed only when SIGTERM still has its default action, from
  the main thread (a backend started on another thread leaves it to the next backend
  start in the main thread, or to `SyncExecutor`, which installs it from its caller's
  thread); it flushes, then ends the process with status 143 at once, as the default
  action would.  A backend garbage collected while open is flushed the same way, then
  emits a ``ResourceWarning``.
  SIGKILL (and a power cut) loses what is in memory: at most ``max_queue`` queued
  records and a batch in flight (``max_batch``), plus, while the store is failing or
  slower than the producer, two spills (``max_queue`` each) not yet on disk.

The same engine batches `SQLiteTelemetryBackend` by default.  The queue, its flusher
and the exit paths are here; writing a batch to the store (splitting refused batches,
outages, backoff) is `empathy_models.backends._batch_writer`, and spilling to the spool
and replaying it `empathy_models.backends._batch_spill`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from types import FrameType
from typing import Any, Final, Literal

import anyio
import anyio.to_thread

from .._loops import close_at_home, elsewhere
from .._propagation import background
from .._stats import Spend
from .._validators import check, failure, instance_of, integer, number, shown
from ..abc import TelemetryBackend
from ..evidence import EvidenceBatch
from ..exceptions import (
    BackendClosedError,
    ConfigurationError,
    RecordValidationError,
)
from ..records import LLMCallRecord, ModelPerformance
from ._batch_spill import _Spiller
from ._batch_writer import (
    MAX_BACKOFF as MAX_BACKOFF,
    MIN_BACKOFF as MIN_BACKOFF,
    _describe,
    _Ledger,
    _StoreWriter,
)
from ._spool import Spool

__all__ = ["URL_OPTIONS", "BatchingTelemetryBackend", "url_flag", "url_number"]

logger = logging.getLogger("empathy_models.telemetry")

OnFull = Literal["spill", "wait", "drop"]

DEFAULT_MAX_BATCH: Final = 500
DEFAULT_FLUSH_INTERVAL: Final = 0.1
DEFAULT_MAX_QUEUE: Final = 10_000
DEFAULT_CLOSE_TIMEOUT: Final = 5.0
_CANCEL_GRACE: Final = 1.0


def url_flag(scheme: str, name: str, value: str) -> bool:
    """A backend URL's query option ``name=value`` that is true or false (``1``/``0``,
    ``true``/``false``, ``yes``/``no``, ``on``/``off``)."""
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{scheme} URL option {name}={value!r} must be true or false")


def url_number(kind: type[int] | type[float]) -> Callable[[str, str, str], float]:
    """A converter like `url_flag` for a query option that is an integer or a number."""
    what = "an integer" if kind is int else "a number"

    def convert(scheme: str, name: str, value: str) -> float:
        try:
            return kind(value)
        except ValueError:
            raise ConfigurationError(
                f"{scheme} URL option {name}={value!r} must be {what}"
            ) from None

    return convert


URL_OPTIONS: Final[Mapping[str, Callable[[str, str, str], Any]]] = {
    "batch": url_flag,
    "max_batch": url_number(int),
    "flush_interval": url_number(float),
    "max_queue": url_number(int),
    "on_full": lambda scheme, name, value: value,
    "spool": url_flag,
    "close_timeout": url_number(float),
    "exit_flush": url_flag,
}
"""``batch`` and the batching's options as a telemetry URL's query gives them
(``sqlite:///calls.db?max_queue=50000``, and the same in a ``postgresql://`` URL), each
with its converter ``(scheme, name, text)``; a state store's URL takes none of them."""

_fail = failure(ConfigurationError)
_count = integer(_fail, low=1, why="must be an integer >= 1")
_positive_seconds = number(_fail, low=0, low_open=True, why="must be a finite number > 0")
_seconds = number(_fail, low=0, why="must be a finite number >= 0")
_flag = instance_of(_fail, bool, why="must be True or False")


def _check_int(name: str, value: int) -> int:
    return check(_count, name, value)


def _check_interval(value: float) -> float:
    return float(check(_positive_seconds, "flush_interval", value))


def _check_on_full(value: object) -> OnFull:
    if value == "spill":
        return "spill"
    if value == "wait":
        return "wait"
    if value == "drop":
        return "drop"
    raise ConfigurationError(f"on_full must be 'spill', 'wait' or 'drop', got {shown(value)}")


def _check_bool(name: str, value: bool) -> bool:
    return check(_flag, name, value)


def _check_records(records: Sequence[LLMCallRecord]) -> list[LLMCallRecord]:
    batch = list(records)
    for r in batch:
        if not isinstance(r, LLMCallRecord):
            raise RecordValidationError(f"expected an LLMCallRecord, got {type(r).__name__}")
    return batch


# --------------------------------------------------------------------------- exit hooks

_live: weakref.WeakSet[_Batcher] = weakref.WeakSet()
_atexit_registered = False
_sigterm_settled = False  # the handler installed, or SIGTERM found taken by someone else


def _forget_after_fork() -> None:
    # a forked child holds copies of its parent's queues: they are the parent's to
    # write, not the child's (at its exit, or on SIGTERM)
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _flush_all(why: str) -> None:
    for batcher in list(_live):
        try:
            batcher.exit_flush(why)
        except Exception:  # an exit hook must never stop the others
            logger.exception("%s: flushing telemetry at %s failed", batcher.owner, why)


def _at_exit() -> None:
    # flush first, warn after: under ``-W error`` (pytest's filterwarnings=error) the
    # warning raises, and must not cost the records
    unclosed = [batcher.owner for batcher in list(_live) if not batcher.closed]
    _flush_all("interpreter exit")
    for owner in unclosed:
        warnings.warn(
            f"{owner} was never closed; its queued telemetry was flushed at interpreter "
            "exit (use 'async with' or aclose())",
            ResourceWarning,
            stacklevel=1,
        )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # The handler replaces SIGTERM's default action (end the process at once): flush, then
    # end the process the same way.  Unwinding a running event loop with SystemExit could
    # wait for ever on a backend's worker thread.
    _flush_all("SIGTERM")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


def _install_exit_hooks(*, sigterm: bool = True) -> bool:
    """
    Register the atexit flush, and the SIGTERM handler if SIGTERM is at its default;
    return True once the SIGTERM handler is settled (installed, or SIGTERM found taken).

    Signal handlers can only be installed from the main thread: called from another
    thread (a backend first started on a `SyncExecutor`'s loop thread, or in
    ``asyncio.run`` on a worker thread), it registers the atexit flush and leaves the
    handler to the next call from the main thread.
    """
    global _atexit_registered, _sigterm_settled
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_at_exit)
    if _sigterm_settled or not sigterm or threading.current_thread() is not threading.main_thread():
        return _sigterm_settled
    _sigterm_settled = True
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # no signals here (embedded interpreter)
        pass
    return True


def install_exit_hooks_from_caller() -> bool:
    """
    For `SyncExecutor`, whose backends start on its loop thread: from the caller's
    thread (often the main one), register the atexit flush (so that it runs after the
    SyncExecutor's own exit hook, registered later) and, once a backend needs it, the
    SIGTERM handler (from the main thread only).  True once the handler is settled.
    """
    return _install_exit_hooks(sigterm=bool(_live))


class _Batcher:
    """
    The bounded queue and its flusher task (shared by the front-ends).

    The store side (writing a batch, outages, backoff) is a `_StoreWriter`, the spool
    side (spills and replays) a `_Spiller`; their counts are kept in one `_Ledger`.

    Counters: ``enqueued`` records accepted so far, ``settled`` (in the ledger) records
    written, spooled, dropped from the queue or given up (``settled <= enqueued``);
    `flush` waits until ``settled`` reaches the ``enqueued`` it saw, or until a write
    attempt failed.  Everything runs on the event loop; no locks are needed because the
    fast path never awaits.  ``exit_flush`` is synchronous: it runs at interpreter exit,
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
        self.close_timeout = float(check(_seconds, "close_timeout", close_timeout))
        self.exit_flush_enabled = _check_bool("exit_flush", exit_flush)
        self._sync_write = sync_write
        self.owner = owner
        self._ledger = _Ledger(owner)
        if self.on_full == "drop":
            past = "; past that new records are dropped"
        elif self.on_full == "spill" and spool is not None:
            past = ", then in the spool"
        else:
            past = "; past that the caller waits for room"
        kept = f"in memory up to {self.max_queue}{past}"
        self._writer = _StoreWriter(write, self._ledger, kept)
        self._spill = _Spiller(spool, self._ledger, self._writer, self.max_batch)
        self.queue: list[LLMCallRecord] = []
        self.inflight: list[LLMCallRecord] | None = None  # the batch being written
        self.enqueued = 0
        self.setbacks = 0  # queue writes that left records in the queue
        self._held = 0  # records at the head of the queue held back (without a spool)
        self.dropped = 0
        self.closing = False
        self.closed = False
        self._urgent = False
        self._task: asyncio.Task[None] | None = None
        self._pid = os.getpid()  # the process whose exit paths flush this queue
        self._wake = asyncio.Event()
        self._space = asyncio.Event()

    def __del__(self) -> None:
        if getattr(self, "closed", True) or getattr(self, "_task", None) is None:
            return
        if getattr(self, "_pid", None) != os.getpid():
            return  # a forked child's copy: the parent writes these records
        pending = len(self.queue) + len(self._spill.overflow) + len(self.inflight or ())
        # flush before warning: under ``-W error`` the warning raises
        try:
            self.exit_flush("garbage collection")
        except Exception:
            logger.exception("%s: flushing telemetry at garbage collection failed", self.owner)
        warnings.warn(
            f"{self.owner} was garbage collected without aclose() ({pending} telemetry "
            "records still queued were flushed); use 'async with' or aclose()",
            ResourceWarning,
            stacklevel=1,
            source=self,
        )

    # ------------------------------------------------------------------ counts

    @property
    def pending(self) -> int:
        """Records in memory: queued, or on their way to the spool."""
        spill = self._spill
        return len(self.queue) + len(spill.overflow) + len(spill.spilling or ())

    @property
    def written(self) -> int:
        """Records written to the store (replayed ones included)."""
        return self._ledger.written

    @property
    def failed(self) -> int:
        """Records given up: refused by the store even made safe, or unspoolable."""
        return self._ledger.failed

    @property
    def spooled(self) -> int:
        """Records written to the spool."""
        return self._ledger.spooled

    # ------------------------------------------------------------------ enqueue

    def _closed_error(self) -> BackendClosedError:
        return BackendClosedError(
            f"{self.owner} is closed (aclose() was called, or its `async with` block ended) "
            "and cannot be used again: build a new one",
            target=self.owner,
        )

    def start(self) -> None:
        """Start the flusher task if it is not running (needs a running event loop)."""
        if self._task is None:
            self._task = background(
                self._run(), f"empathy-models telemetry flusher for {self.owner}"
            )
            self._pid = os.getpid()
            if self.exit_flush_enabled:
                _live.add(self)
                _install_exit_hooks()

    def home(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the flusher task runs in (None: not running)."""
        task = self._task
        return None if task is None or task.done() else task.get_loop()

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
        self._spill.hand_over(self.queue, self.max_queue)
        self.queue = [record]
        self.enqueued += 1
        self._wake.set()

    async def _put_slow(self, record: LLMCallRecord) -> None:
        if self.on_full == "drop":
            self._drop(
                record,
                f"the telemetry queue is full ({self.max_queue} records) and on_full='drop'",
            )
            return
        if self.on_full == "spill" and self._spill.has_spool:
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

    async def _run(self) -> None:
        writer = self._writer
        spill = self._spill
        try:
            while True:
                if spill.replay_wait() == 0.0:
                    # the spool before the queue, its records being the older; a replay
                    # that leaves records backs off on its own while the queue is written
                    await spill.replay()
                    continue
                if not self.queue:
                    if self.closing:
                        if spill.spilling is None:
                            return
                        # a spill still being written: replay it once it is, the
                        # store up, so that closing leaves nothing in the spool needlessly
                        await self._ledger.progress.wait()
                        if writer.outage_since is None:
                            spill.hurry()
                        continue
                    self._wake.clear()
                    with anyio.move_on_after(spill.replay_wait()):
                        await self._wake.wait()
                    continue
                if (
                    not (self._urgent or self.closing)
                    and writer.outage_since is None
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
                    await writer.pause()
        finally:
            if self.inflight is not None:
                # cancelled from outside in the middle of a batch: back to the head of
                # the queue (the writes are idempotent), where a flush that restarts
                # the flusher finds it; left in `inflight`, no flush could ever settle it
                self.queue[:0] = self.inflight
                self.inflight = None
            # wake every waiter so none can hang on a stopped flusher, and arm a new
            # event: a flush that restarts the flusher waits on it (a set one would
            # let that flush spin without ever yielding to the flusher it started)
            self._ledger.signal_progress()
            self._space.set()

    async def _drain(self) -> bool:
        """
        Write the queue; False when records are back at its head: the store failed, or
        (without a spool) it failed on them alone (see `_StoreWriter.deliver`).
        """
        ledger = self._ledger
        writer = self._writer
        while self.queue:
            # a batch holds a record behind those held back at the head of the queue,
            # and, while the store fails with errors of its own, one to probe it with
            # beside the head record, and one more for each probe failed, so that the
            # probes reach past records the store fails on: records it took between
            # their failures
            probes = 2 + writer.failed_probes if writer.probing else 1
            size = max(self.max_batch, self._held + 1, probes)
            batch = self.queue[:size]
            self.inflight = batch  # before the records leave the queue (exit hooks)
            del self.queue[: len(batch)]
            space, self._space = self._space, asyncio.Event()
            space.set()
            rest = await writer.deliver(batch)
            ledger.settled += len(batch) - len(rest)
            if rest and writer.held and self._spill.has_spool:
                await self._spool_held(rest)  # settled there: spooled, or given up
                rest = []
            self.inflight = None
            # the records held back at the head of the queue (a fault leaves them there)
            self._held = len(rest) if writer.held else min(self._held, len(rest))
            if rest:
                self.queue[:0] = rest
                self.setbacks += 1
                if writer.held:
                    # no spool: held at the head of the queue, retried after the backoff
                    if writer.recovered(held=True):
                        self._spill.outage_over()
                    ledger.signal_progress()
                else:
                    writer.fault()
                return False
            if writer.recovered():
                self._spill.outage_over()
            ledger.signal_progress()
        return True

    async def _spool_held(self, held: list[LLMCallRecord]) -> None:
        """
        Spool the records the store failed on alone while it took the rest of their
        batch, in a file of held records: the queue goes on, the replay retries them
        after its backoff, after the other spool files.
        """
        spill = self._spill
        self.inflight = held  # the exit hooks spool them if the process ends meanwhile
        failure = await anyio.to_thread.run_sync(spill.write, held, True)
        spill.account(
            len(held),
            failure,
            "the store failed on them alone, taking the rest of their batch: "
            + _describe(self._writer.last_fault or RuntimeError()),
        )
        spill.defer()

    # ------------------------------------------------------------------ flush / close

    async def flush(self) -> None:
        """
        Wait until every record enqueued before this call is written (or spooled, or
        given up), or until a write of the queue fails; and, when the spool holds
        records, until a replay has written them or one has failed.  During a store
        outage flush makes one attempt of each and returns, the records staying queued
        (or spooled) for the next; a replay's backoff is cut short.
        """
        ledger = self._ledger
        spill = self._spill
        target = self.enqueued
        setbacks = self.setbacks
        replays = spill.setbacks
        spill.hurry()
        while (ledger.settled < target and self.setbacks == setbacks) or (
            (spill.replay_due or spill.replaying) and spill.setbacks == replays
        ):
            task = self._task
            if task is None or task.done():
                # never started, or stopped by cancellation from outside: (re)start it
                self._task = None
                self.start()
            self._urgent = True
            self._wake.set()
            self._writer.kick.set()
            progress = ledger.progress
            await progress.wait()

    def _take_all(self) -> list[LLMCallRecord]:
        spill = self._spill
        records = list(self.inflight or ())
        self.inflight = None
        records.extend(spill.spilling or ())
        spill.spilling = None
        records.extend(self.queue)
        self.queue = []
        records.extend(spill.overflow)
        spill.overflow = []
        self._held = 0
        return records

    async def aclose(self) -> None:
        """
        Write everything waiting within ``close_timeout`` seconds (the records waiting
        for the spill task, and the spool, included), spool the rest, and stop the
        flusher and spill tasks.

        From another event loop than the flusher's (which no longer runs there), what
        is queued is written synchronously, as at exit (`exit_flush`), and the tasks are
        dropped.
        """
        task = self._task
        if task is not None and elsewhere(home := task.get_loop()):
            if await close_at_home(home, self.aclose):
                return
            self.exit_flush("close from another event loop")
            self.closing = self.closed = True
            _live.discard(self)
            return
        self.closing = True
        self._spill.give_back_overflow(self.queue)
        if self._writer.outage_since is None:
            self._spill.hurry()  # the spool too, as a flush, unless the store is down
        if self._task is None and self.queue:
            self.start()
        self._wake.set()
        self._writer.kick.set()
        self._spill.stop()
        deadline = time.monotonic() + self.close_timeout
        for task in (self._task, self._spill.task):
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
            # in ``inflight`` while the worker thread spools them: the exit hooks spool
            # them too if the process ends meanwhile (SIGTERM), or they would be in no
            # file and in no queue
            self.inflight = remaining
            try:
                failure = await anyio.to_thread.run_sync(self._spill.write, remaining)
            finally:
                self.inflight = None
            self._spill.account(
                len(remaining),
                failure,
                f"not written within close_timeout={self.close_timeout:g} s",
            )
        self.closed = True
        _live.discard(self)

    def exit_flush(self, why: str) -> None:
        """Synchronously write (or spool) every record still in memory; for exit paths."""
        if self.closed or self._pid != os.getpid():
            return
        records = self._take_all()
        if not records:
            return
        # in ``inflight`` until written or spooled: a SIGTERM landing meanwhile (in the
        # atexit flush, say) writes them again from its handler, then ends the process
        self.inflight = records
        try:
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
                    self._ledger.written += len(records)
                    self._ledger.settled += len(records)
                    return
            self._spill.spill_or_fail(records, f"flushed at {why}")
        finally:
            if self.inflight is records:
                self.inflight = None


def _spool(inner: TelemetryBackend) -> Spool:
    """
    ``inner``'s spool (see `BatchingTelemetryBackend`): named by `_spool_target`, and
    listing the files of the targets it gives as ``former_spool_targets`` too.
    """
    former = getattr(inner, "former_spool_targets", ())
    if not isinstance(former, tuple | list) or not all(isinstance(t, str) for t in former):
        former = ()
    return Spool(_spool_target(inner), former)


def _spool_target(inner: TelemetryBackend) -> str:
    """
    What names ``inner``'s store for its spool (see `BatchingTelemetryBackend`).  Python's
    default repr holds the object's address: a spool named after it would be one per
    instance, which no later process replays.
    """
    target = getattr(inner, "spool_target", None)
    if isinstance(target, str):
        return target
    cls = type(inner)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return name if cls.__repr__ is object.__repr__ else f"{name}:{inner!r}"


class BatchingTelemetryBackend(TelemetryBackend):
    """
    Wrap any `TelemetryBackend` (or a URL for one) with write-behind batching.

    ``record`` / ``record_many`` return as soon as the records are queued; see the
    module docstring for when batches are written, what happens during a store outage,
    the spool and the exit hooks, and the counters `dropped`, `failed`, `written`,
    `spooled` and `pending`.  Reads flush first.

    Args:
        inner: the wrapped backend, or a URL for one (a URL whose backend comes
            batched, such as ``postgresql://``, has that backend wrapped instead).
        max_batch, flush_interval: when a batch is written (see the module docstring).
        max_queue: the most records queued in memory.
        on_full: what a full queue does: ``"spill"``, ``"wait"`` or ``"drop"``.
        spool: ``False`` disables the spool (past ``max_queue`` the caller then waits,
            or records are dropped with ``on_full="drop"``); a wrapped backend that is
            not `persistent` never spools.
        close_timeout: seconds `aclose` spends writing everything still queued; it
            spools the rest, then closes the wrapped backend.
        exit_flush: ``False`` opts out of the exit hooks.

    The spool is named after the wrapped backend's store, so that the next process
    opening that store replays it: its ``spool_target`` (a string naming the store
    without secrets) when it has one, else its class and repr, or its class alone when
    the repr is Python's default (which names the object, not the store).  A backend
    class whose instances may keep different stores gives a ``spool_target``; one that
    named its store otherwise before gives those names as ``former_spool_targets`` (a
    tuple of strings), whose spools are replayed too.

    Raises:
        ConfigurationError: a bad setting.
        RecordValidationError: when given something that is not an `LLMCallRecord`.
        BackendClosedError: after `aclose`.
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
            if isinstance(inner, BatchingTelemetryBackend):
                inner = inner.inner  # the URL's backend comes batched: one queue, not two
        if not isinstance(inner, TelemetryBackend):
            raise ConfigurationError(
                f"inner must be a TelemetryBackend or a URL, got {shown(inner)}"
            )
        self._inner = inner
        use_spool = _check_bool("spool", spool) and inner.persistent
        self._batcher = _Batcher(
            inner.record_many,
            owner=f"BatchingTelemetryBackend({inner!r})",
            max_batch=max_batch,
            flush_interval=flush_interval,
            max_queue=max_queue,
            on_full=on_full,
            spool=_spool(inner) if use_spool else None,
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

    def _home_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._batcher.home()

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
        until: datetime | None,
        samples_only: bool,
    ) -> list[LLMCallRecord]:
        await self.flush()
        return await self._inner.recent(
            limit=limit,
            workflow=workflow,
            stage=stage,
            model=model,
            since=since,
            until=until,
            samples_only=samples_only,
        )

    async def _spend(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> Spend:
        await self.flush()
        return await self._inner.spend(workflow=workflow, stage=stage, since=since, until=until)

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
