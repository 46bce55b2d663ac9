"""
The store side of the batching engine (`empathy_models.backends.batching`): writing a
batch to the wrapped store, and what happens when the store cannot take it.

* `_Ledger` holds the counts every part of the engine adds to (records settled,
  written, given up, spooled, replayed) and the signal `flush` waits on.
* `_StoreWriter` writes one batch.  A batch the store refuses for its content is split
  in halves until the refused record is alone, which is retried made storable
  (`empathy_models.backends._storable`) or given up.  A store fault (down, locked,
  full...) hands the unwritten records back; the writer counts the fault, warns once
  per outage and once on recovery, and paces the retries with exponential backoff.

An error that says the store failed (`BackendError`, which the built-in backends raise
for a fault, `ConfigurationError`, `OSError`) is always taken for a store fault.  Any
other (a third-party backend's own exception, say) is too, unless the store took the
write just before: then the batch is written in halves, down to the records the store
fails on alone while it takes the others.  Those are *held* (handed back, the store
known to be up); one that fails alone `STRIKES` times, the store having taken other
records between, is treated as refused: retried made storable, or given up.  In that
descent a half failing right after its sibling failed proves nothing by itself (each
may hold a record the store fails on): a record alone is held too, and several are
probed with one of them alone, the store taking it being up.  A failure right after
a failure outside that descent (the probe failing too: the store itself failing), or
one that says the store failed, ends the halving, and what is left is handed back as
a fault.
While the store fails so, nothing proves it down rather than failing on the records at
the head of the batch: each retry, after the batch, *probes* it with one of its records
alone (`_StoreWriter._probe`), and the store taking it is back, the batch then written
in halves.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from ..exceptions import (
    BackendError,
    ConfigurationError,
    RecordValidationError,
    TelemetryRejectedError,
)
from ..records import LLMCallRecord
from ._storable import storable

logger = logging.getLogger("empathy_models.telemetry")

MIN_BACKOFF: Final = 0.05
"""Seconds before the first retry of a batch the store failed to take."""
MAX_BACKOFF: Final = 2.0
"""The longest wait between two retries during a store outage."""
STRIKES: Final = 3
"""How often a record may fail alone, the store taking other records between, before it
is treated as refused (made storable, or given up)."""
_MAX_SUSPECTS: Final = 1024
"""The most records whose failures alone are remembered (the oldest is forgotten first)."""


def _is_rejection(exc: BaseException) -> bool:
    """True when ``exc`` says the records themselves were refused (not the store down)."""
    if isinstance(exc, TelemetryRejectedError | RecordValidationError):
        return True
    if isinstance(exc, BackendError | ConfigurationError):
        return False
    return isinstance(exc, ValueError | TypeError)


def _store_failed(exc: BaseException | None) -> bool:
    """True when ``exc`` says the store failed, whatever the records (see the module)."""
    return isinstance(exc, BackendError | ConfigurationError | OSError)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Ledger:
    """
    What became of the records one batcher accepted, and the signal of progress.

    ``settled`` counts the records written, spooled, dropped from the queue or given
    up; the other counts say which.  `signal_progress` wakes every task waiting on
    ``progress`` (a `flush`) and arms a new event for the next wait.
    """

    __slots__ = (
        "failed",
        "owner",
        "progress",
        "replayed",
        "sanitized",
        "settled",
        "spooled",
        "written",
    )

    def __init__(self, owner: str) -> None:
        self.owner = owner  # names the backend in warnings and errors
        self.settled = 0
        self.written = 0
        self.failed = 0
        self.spooled = 0
        self.replayed = 0
        self.sanitized = 0
        self.progress = asyncio.Event()

    def signal_progress(self) -> None:
        """Wake the tasks waiting for progress."""
        progress, self.progress = self.progress, asyncio.Event()
        progress.set()


class _StoreWriter:
    """
    Writes batches to the store and keeps track of its outages (see the module).

    ``faults`` counts failed write attempts; ``outage_since`` is the monotonic time the
    current outage began (None while the store takes records); ``last_fault`` is the
    error of the latest failed attempt.  Setting ``kick`` cuts a `pause` short.

    ``live`` is true while the store answered the latest attempt (took its records, or
    refused them for their content), or took the records around those the latest
    `deliver` held back;
    ``took`` counts the attempts it answered; ``held`` says that the records the latest
    `deliver` handed back are held back (they failed alone), not left by a store fault.
    """

    __slots__ = (
        "_backoff",
        "_kept",
        "_ledger",
        "_probed",
        "_probes",
        "_suspects",
        "_write",
        "faults",
        "held",
        "kick",
        "last_fault",
        "live",
        "outage_since",
        "took",
    )

    def __init__(
        self,
        write: Callable[[list[LLMCallRecord]], Awaitable[None]],
        ledger: _Ledger,
        kept: str,
    ) -> None:
        """
        Args:
            write: The wrapped store's ``record_many``.
            ledger: The batcher's counts.
            kept: Where records wait during an outage, for the outage warning ("in
                memory up to 10000, then in the spool").
        """
        self._write = write
        self._ledger = ledger
        self._kept = kept
        self._backoff = MIN_BACKOFF
        self.faults = 0
        self.outage_since: float | None = None
        self.last_fault: BaseException | None = None
        self.kick = asyncio.Event()  # flush or close: stop waiting between retries
        self.live = True  # taken to take records until it fails
        self.took = 0
        self.held = False
        self._probes = 0  # probes failed since the store last took records
        self._probed: set[str] = set()  # the records those probes wrote
        # call_id -> [failures alone counted, ``took`` at its latest failure alone]
        self._suspects: dict[str, list[int]] = {}

    async def pause(self) -> None:
        """Wait before the next retry (exponential backoff); a flush or close cuts it short."""
        delay = self._backoff * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2.0, MAX_BACKOFF)
        self.kick.clear()
        with anyio.move_on_after(delay):
            await self.kick.wait()

    def fault(self) -> None:
        """Count a failed write attempt (``last_fault``); warn when an outage begins."""
        self.faults += 1
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            exc = self.last_fault
            logger.warning(
                "%s: the telemetry store is unavailable (%s); records are kept and retried (%s)",
                self._ledger.owner,
                "unknown error" if exc is None else _describe(exc),
                self._kept,
            )
        self._ledger.signal_progress()

    def recovered(self, *, held: bool = False) -> bool:
        """
        The store took records: end the outage if there was one, and reset the backoff
        unless records were held back (they are retried at the growing pace).

        Returns:
            True when an outage ended here (the spool may hold records to replay).
        """
        if not held:
            self._backoff = MIN_BACKOFF
        if self.outage_since is None:
            return False
        logger.warning(
            "%s: the telemetry store is back after %.1f s; kept records are being written",
            self._ledger.owner,
            time.monotonic() - self.outage_since,
        )
        self.outage_since = None
        return True

    async def deliver(self, batch: list[LLMCallRecord]) -> list[LLMCallRecord]:
        """
        Write ``batch``; return the records not written.

        A batch refused for its content is split until each refused record is alone;
        that record is retried made safe, or given up.  A batch that fails with an
        error that does not say the store failed, right after the store took a write,
        is written in halves, down to the records that fail alone (see the module); one
        failing so while the store failed before it is followed by a probe (`_probe`).

        Args:
            batch: The records, in order.

        Returns:
            The records left, in order: held back when ``held`` (every one failed alone
            while the store took records), else left by a store fault (``last_fault``);
            empty when every record was written or given up.
        """
        live = self.live
        took = self.took
        self.held = False
        rest = await self._split(batch)
        if rest and self.probing and not live:
            rest, live = await self._probe(rest)
        if not rest or not live or _store_failed(self.last_fault):
            return rest
        rest, stalled = await self._isolate(rest)
        if rest and not stalled:
            self.held = True
            # live when the store took the records around them (a record alone took none)
            self.live = self.took != took
        return rest

    @property
    def failed_probes(self) -> int:
        """Probes failed since the store last took records: a batch written while
        `probing` holds that many records more, so the next probe has one to try."""
        return self._probes

    @property
    def probing(self) -> bool:
        """
        Whether the store is failing with errors that do not say it failed: a batch
        failing so may fail on its own records (see `_probe`).
        """
        return not self.live and not _store_failed(self.last_fault)

    async def _probe(self, records: list[LLMCallRecord]) -> tuple[list[LLMCallRecord], bool]:
        """
        Write one of ``records`` alone: they just failed together, and so did the write
        before them, with errors that do not say the store failed, so the store may be
        back, failing on some of them.  Taking the record proves it up.  The record is
        the newest not probed since the store last took records (the batch grows by one
        for each failed probe: `failed_probes`), so that records the store fails on
        cannot be the ones probed every time; when all were, the newest, then, as
        probes fail, the one before it.

        Returns:
            The records left, and whether the store took the probe (else all are left).
        """
        if len(records) < 2:
            return records, False
        probed = self._probed
        fresh = [i for i, record in enumerate(records) if record.call_id not in probed]
        at = fresh[-1] if fresh else len(records) - 1 - self._probes % len(records)
        self._probes += 1
        if len(probed) >= _MAX_SUSPECTS:
            probed.clear()
        probed.add(records[at].call_id)
        if await self._split([records[at]]):
            return records, False
        return records[:at] + records[at + 1 :], True

    async def _attempt(self, batch: list[LLMCallRecord]) -> BaseException | None:
        """One write of ``batch``; the error, if it failed (``live``, ``took`` kept)."""
        try:
            await self._write(batch)
        except Exception as exc:
            if _is_rejection(exc):
                self.live = True
                self.took += 1
            else:
                self.live = False
                self.last_fault = exc
            return exc
        self.live = True
        self.took += 1
        self._probes = 0
        self._probed.clear()
        self._ledger.written += len(batch)
        if self._suspects:
            for record in batch:
                self._suspects.pop(record.call_id, None)
        return None

    async def _split(self, batch: list[LLMCallRecord]) -> list[LLMCallRecord]:
        """Write ``batch``, halving it around refused records; what a fault left, in order."""
        exc = await self._attempt(batch)
        if exc is None:
            return []
        if not _is_rejection(exc):
            return batch
        if len(batch) > 1:
            mid = len(batch) // 2
            rest = await self._split(batch[:mid])
            if rest:
                return rest + batch[mid:]
            return await self._split(batch[mid:])
        return await self._made_safe(batch[0], exc)

    async def _isolate(self, records: list[LLMCallRecord]) -> tuple[list[LLMCallRecord], bool]:
        """
        Write ``records``, which just failed together, in halves down to the records
        that fail alone; a half is tried right after its failed parent, and its sibling
        after it.  A sibling failing right after a failure proves nothing by itself (a
        record the store fails on may be in each): alone, it is held too; several are
        probed with one of them alone (`_probe`).  The probe failing as well, or an
        error that says so, means the store itself failed.

        Returns:
            The records left, in order, and whether the store itself failed (else every
            record left failed alone and is held back).
        """
        if len(records) == 1:
            return await self._failed_alone(records[0]), False
        mid = len(records) // 2
        second = records[mid:]
        left = await self._split(records[:mid])
        if left:
            if _store_failed(self.last_fault):
                return left + second, True
            left, stalled = await self._isolate(left)
            if stalled:
                return left + second, True
        live = self.live
        more = await self._split(second)
        if not more:
            return left, False
        if _store_failed(self.last_fault):
            return left + more, True
        if not live and len(more) > 1:
            # failed right after a failure: the store down, or a record it fails on in
            # each half; one of them alone tells which
            more, live = await self._probe(more)
            if not live:
                return left + more, True
        more, stalled = await self._isolate(more)
        return left + more, stalled

    async def _failed_alone(self, record: LLMCallRecord) -> list[LLMCallRecord]:
        """
        Count a failure of ``record`` alone: its first, or one after the store took other
        records since its previous; at `STRIKES` it is treated as refused.

        Returns:
            ``[record]`` while it is held back, else empty (stored made safe, or given up).
        """
        suspects = self._suspects
        entry = suspects.get(record.call_id)
        if entry is None:
            if len(suspects) >= _MAX_SUSPECTS:
                del suspects[next(iter(suspects))]
            suspects[record.call_id] = [1, self.took]
            return [record]
        if entry[1] != self.took:
            entry[0] += 1
            entry[1] = self.took
        if entry[0] < STRIKES:
            return [record]
        del suspects[record.call_id]
        return await self._made_safe(record, self.last_fault or RuntimeError(), final=True)

    async def _made_safe(
        self, record: LLMCallRecord, exc: BaseException, *, final: bool = False
    ) -> list[LLMCallRecord]:
        """
        Retry ``record`` made storable, or give it up; ``final``: it failed alone
        `STRIKES` times, so a failure of the retry gives it up too.

        Returns:
            ``[record]`` when the retry failed for a store fault (not ``final``), else empty.
        """
        ledger = self._ledger
        fields: tuple[str, ...] = ()
        try:
            fixed, fields = storable(record)
        except RecordValidationError as invalid:
            exc = invalid
        if fields:
            again = await self._attempt([fixed])
            if again is None:
                ledger.sanitized += 1
                logger.warning(
                    "%s: record %s was refused by the store and stored with %s escaped or "
                    "clamped (listed in its metadata under %r)",
                    ledger.owner,
                    record.call_id,
                    ", ".join(fields),
                    "empathy_models.sanitized",
                )
                return []
            if not (final or _is_rejection(again)):
                return [record]
            exc = again
        ledger.failed += 1
        how = (
            f"failed alone {STRIKES} times while the store took other records, and was given up"
            if final
            else "was refused by the store and given up"
        )
        logger.warning(
            "%s: record %s %s (%s); %d records given up so far",
            ledger.owner,
            record.call_id,
            how,
            _describe(exc),
            ledger.failed,
        )
        return []
