"""
The spool side of the batching engine (`empathy_models.backends.batching`): moving
records the queue has no room for to the local spool file (`_spool.Spool`), and
replaying the spool into the store once it takes records again.

Spills run on a worker thread from a spill task of their own, so the caller that
found the queue full never waits; the exit paths spill synchronously.  A backend
without a spool (it keeps nothing across processes) counts what it would have
spilled as given up.

A replay that leaves records in the spool (the store failed, or held records back:
see `empathy_models.backends._batch_writer`) is tried again after a backoff of its
own, so the flusher writes the queue meanwhile.  Records held back go to files of
their own, replayed after the other files (`_spool.Spool`), one record at a time, so
that records the store fails on hold up no other.  A spool file that cannot be listed,
renamed, read or rewritten (an `OSError`: a file or directory whose mode forbids it,
say) is left where it is while the other files are replayed, and tried again after
the same backoff; one warning is logged for a run of such failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread

from .._propagation import background
from ..exceptions import ConfigurationError
from ..records import LLMCallRecord
from ._batch_writer import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    _describe,
    _Ledger,
    _store_failed,
    _StoreWriter,
)
from ._spool import Spool

logger = logging.getLogger("empathy_models.telemetry")

_QUEUE_FULL = "the queue was full"

_Replayed = Literal["written", "held", "failed", "stopped"]
"""How a spool file's replay ended: all written (or given up), records held back, the
store failed, or the replay stopped at a record whose failure proved nothing
(`_Spiller._replay_file`)."""


class _Spiller:
    """
    The records on their way to the spool, the spill task, and the replay state.

    ``overflow`` holds the records handed over and waiting for the spill task;
    ``spilling`` the ones it is writing.  ``replay_due`` says the spool may hold
    records for the store (set at start, after a spill and when an outage ends);
    ``replaying`` is true while `replay` runs.  A replay that left records waits
    until ``replay_at`` (monotonic) before the next; ``setbacks`` counts those replays.
    """

    __slots__ = (
        "_backoff",
        "_ledger",
        "_spool",
        "_spool_fault",
        "_wake",
        "_warned",
        "_writer",
        "closing",
        "max_batch",
        "overflow",
        "replay_at",
        "replay_due",
        "replaying",
        "setbacks",
        "spilling",
        "task",
    )

    def __init__(
        self, spool: Spool | None, ledger: _Ledger, writer: _StoreWriter, max_batch: int
    ) -> None:
        """
        Args:
            spool: The store's spool, or None when the backend keeps nothing across
                processes.
            ledger: The batcher's counts.
            writer: Writes the replayed records to the store.
            max_batch: The largest batch a replay writes at once.
        """
        self._spool = spool
        self._ledger = ledger
        self._writer = writer
        self.max_batch = max_batch
        self.overflow: list[LLMCallRecord] = []  # waiting for the spill task
        self.spilling: list[LLMCallRecord] | None = None  # the records being spooled
        self.replay_due = spool is not None
        self.replaying = False
        self.replay_at = 0.0
        self.setbacks = 0
        self._backoff = MIN_BACKOFF
        self.closing = False
        self._warned = False
        self._spool_fault: BaseException | None = None  # the spool's latest failure in a row
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def has_spool(self) -> bool:
        """Whether records can be spilled to a spool file."""
        return self._spool is not None

    def hand_over(self, queue: list[LLMCallRecord], max_queue: int) -> None:
        """
        Take a full queue's records for the spill task (started if need be); never waits.

        Args:
            queue: The records to spill (copied: the caller starts a new queue).
            max_queue: The queue bound.  When the spill task is that far behind (the
                producer never yielded, or the disk is slow), the backlog is spooled
                here, so memory stays bounded; this waits on the local disk, never on
                the store.
        """
        if len(self.overflow) >= max_queue:
            backlog, self.overflow = self.overflow, []
            self.spill_or_fail(backlog, _QUEUE_FULL)
        self.overflow.extend(queue)
        if self.task is None:
            self.task = background(
                self._run(), f"empathy-models telemetry spill for {self._ledger.owner}"
            )
        self._wake.set()

    def give_back_overflow(self, queue: list[LLMCallRecord]) -> None:
        """
        On close: put the records waiting for the spill task (not yet being written) at
        the head of ``queue``, which is written to the store, and spooled only if the
        store cannot take them by ``close_timeout``.
        """
        if self.overflow:
            queue[:0] = self.overflow
            self.overflow = []

    def stop(self) -> None:
        """Let the spill task end once it has spilled what it holds (on close)."""
        self.closing = True
        self._wake.set()

    def outage_over(self) -> None:
        """The store is back: replay the spool now if records were spooled."""
        if self._spool is not None and self._ledger.spooled:
            self.replay_due = True
            self.replay_at = 0.0

    def replay_wait(self) -> float:
        """Seconds until a replay is to be tried (0: now; infinite: none is due)."""
        if not self.replay_due:
            return math.inf
        return max(0.0, self.replay_at - time.monotonic())

    def hurry(self) -> None:
        """Cut the replay's backoff short (a flush)."""
        self.replay_at = 0.0

    def defer(self) -> None:
        """Records held back were just spooled: replay them after the backoff."""
        delay = self._backoff * random.uniform(0.5, 1.0)
        self.replay_at = max(self.replay_at, time.monotonic() + delay)

    def _set_back(self) -> None:
        """The replay left records in the spool: try again after a growing backoff."""
        self.replay_due = True
        self.setbacks += 1
        self.replay_at = time.monotonic() + self._backoff * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2.0, MAX_BACKOFF)

    async def _run(self) -> None:
        while True:
            if not self.overflow:
                if self.closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            records, self.overflow = self.overflow, []
            self.spilling = records
            failure = await anyio.to_thread.run_sync(self.write, records)
            self.spilling = None
            self.account(len(records), failure, _QUEUE_FULL)

    def write(self, records: list[LLMCallRecord], held: bool = False) -> BaseException | None:
        """
        Write ``records`` to a spool file (blocking), one of held records when ``held``
        (`_spool.Spool.write`); the error, if it failed.
        """
        if self._spool is None:
            return RuntimeError("this backend has no spool (it keeps nothing across processes)")
        try:
            self._spool.write(records, held=held)
        except (OSError, ValueError) as exc:
            return exc
        return None

    def account(self, n: int, failure: BaseException | None, why: str) -> None:
        """Count ``n`` records spooled (or given up when ``failure``) and say so once."""
        ledger = self._ledger
        ledger.settled += n
        if failure is None:
            ledger.spooled += n
            self.replay_due = True
            if not self._warned or why != _QUEUE_FULL:
                self._warned = True
                logger.warning(
                    "%s: %d telemetry records spooled (%s); they are written to the store "
                    "when it next takes records",
                    ledger.owner,
                    n,
                    why,
                )
        else:
            ledger.failed += n
            logger.warning(
                "%s: %d telemetry records given up (%s; %s); %d records given up so far",
                ledger.owner,
                n,
                why,
                _describe(failure),
                ledger.failed,
            )
        ledger.signal_progress()

    def spill_or_fail(self, records: list[LLMCallRecord], why: str) -> None:
        """Spool ``records`` now, blocking (exit paths), or count them given up."""
        if records:
            self.account(len(records), self.write(records), why)

    async def replay(self) -> None:
        """
        Write the spool's files to the store, oldest first, the files of held records
        last.  When the store fails, the file being replayed is released and the replay
        stops; records held back move to a file of held records while the others are
        replayed.  Either way the next replay is due after the backoff (`replay_wait`).
        """
        self.replay_due = False
        spool = self._spool
        if spool is None:
            return
        self.replaying = True
        try:
            replayed = await self._replay_files(spool)
        except (OSError, ConfigurationError) as exc:  # ConfigurationError: EMPATHY_HOME
            self._unreachable(exc)
            self._set_back()
        else:
            if self._spool_fault is not None:
                logger.warning("%s: the spool can be replayed again", self._ledger.owner)
                self._spool_fault = None
            if replayed in ("failed", "stopped", "held"):
                self._set_back()
            else:
                self._backoff = MIN_BACKOFF
        finally:
            self.replaying = False
            self._ledger.signal_progress()

    def _unreachable(self, exc: BaseException) -> None:
        """
        The spool could not be listed, or a file of it renamed, read or rewritten
        (``exc``): warn at the first such failure in a row, the records staying in the
        spool for a later replay.
        """
        first = self._spool_fault is None
        self._spool_fault = exc
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "%s: cannot replay the spool (%s); its records stay in it and are replayed later",
            self._ledger.owner,
            _describe(exc),
        )

    async def _replay_files(self, spool: Spool) -> _Replayed:
        """
        Replay the spool's files in order (`replay`): "written" when every file was,
        "held" when records were held back, "failed" or "stopped" at the file where the
        replay stopped (`_replay_file`).  A file that fails with an `OSError` (it cannot
        be renamed, say) is given back, or left to a later replay, and the replay goes
        on with the next; the error is raised once the others are replayed.  On close,
        the files of held records are left for the next replay (the next process's),
        so that a close, which hurries the replay, costs none of them a strike.
        """
        paths = await anyio.to_thread.run_sync(spool.files)
        held = False
        fault: OSError | None = None
        for path in paths:
            if self.closing and spool.is_held(path):
                continue  # not tried again at close: retried after the backoff, next time
            try:
                claimed = await anyio.to_thread.run_sync(spool.claim, path)
            except OSError as exc:
                fault = exc
                continue
            if claimed is None:
                continue
            try:
                replayed = await self._replay_file(spool, claimed)
            except BaseException as exc:
                # cut short (aclose past close_timeout): give the file back, or its
                # claim, under this process's id, keeps every other process from
                # replaying it while this one lives (a chunk written meanwhile is
                # skipped by the next replay); a claim that cannot be given back is
                # one this process's next listing takes up again
                with contextlib.suppress(OSError):
                    spool.release(claimed)
                if not isinstance(exc, OSError):
                    raise
                fault = exc
                continue
            finally:
                spool.done(claimed)
            if replayed in ("failed", "stopped"):
                return replayed
            held = held or replayed == "held"
        if fault is not None:
            raise fault
        return "held" if held else "written"

    async def _give_back(self, spool: Spool, claimed: Path, rest: list[LLMCallRecord]) -> None:
        """Give ``claimed`` back holding ``rest``; as it was, if it cannot be rewritten."""
        try:
            await anyio.to_thread.run_sync(spool.give_back, claimed, rest)
        except (OSError, ValueError) as exc:
            logger.warning(
                "%s: cannot rewrite spool file %s (%s); it is replayed whole again",
                self._ledger.owner,
                claimed.name,
                _describe(exc),
            )
            await anyio.to_thread.run_sync(spool.release, claimed)

    async def _settle(
        self, spool: Spool, claimed: Path, held: list[LLMCallRecord], left: list[LLMCallRecord]
    ) -> None:
        """
        Move ``held`` (records that failed alone) to a new file of held records, replayed
        after those held before, and give ``claimed`` back holding ``left`` (removed when
        empty).
        """
        if held:
            failure = await anyio.to_thread.run_sync(self.write, held, True)
            if failure is not None:
                logger.warning(
                    "%s: cannot write a spool file of held records (%s); they stay in %s",
                    self._ledger.owner,
                    _describe(failure),
                    claimed.name,
                )
                left = held + left
        await self._give_back(spool, claimed, left)

    async def _replay_file(self, spool: Spool, claimed: Path) -> _Replayed:
        """
        Replay one claimed spool file (released, or given back, with what is left): in
        chunks of ``max_batch`` (at least two while the store fails), a file of held
        records one record at a time.

        A single record failing right after a failure, with an error that does not say
        the store failed, proves the store neither down (the record may be one it fails
        on, as the one before may be) nor up: it is not taken for an outage (no warning,
        and records behind it are not held up by it); it goes to the files of held
        records (a held one stays where it is, first of them) and the replay stops.
        """
        ledger = self._ledger
        writer = self._writer
        # a file that cannot be read raises: given back, and tried again later
        records, bad = await anyio.to_thread.run_sync(spool.read, claimed)
        ledger.failed += bad
        was_held = spool.is_held(claimed)
        held: list[LLMCallRecord] = []
        start = 0
        while start < len(records):
            live = writer.live
            # while the store fails, two records let `deliver` probe it with one of them,
            # and one more for each failed probe, to reach past records it fails on
            probes = 1 if live else 2 + writer.failed_probes
            size = 1 if was_held else max(self.max_batch, probes)
            chunk = records[start : start + size]
            start += len(chunk)
            rest = await writer.deliver(chunk)
            ledger.replayed += len(chunk) - len(rest)
            if rest and not writer.held:
                after = records[start:]
                if live or len(chunk) > 1 or _store_failed(writer.last_fault):
                    # given back without what was written (or unreadable): counted once
                    await self._give_back(spool, claimed, held + rest + after)
                    writer.fault()
                    return "failed"
                if was_held:
                    await self._settle(spool, claimed, held, rest + after)
                else:
                    await self._settle(spool, claimed, held + rest, after)
                return "stopped"
            held += rest
        await self._settle(spool, claimed, held, [])
        if writer.recovered(held=bool(held)):
            self.outage_over()
        return "held" if held else "written"
