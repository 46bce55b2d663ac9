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
    """

    __slots__ = (
        "_backoff",
        "_ledger",
        "_max_queue",
        "_write",
        "faults",
        "kick",
        "last_fault",
        "outage_since",
    )

    def __init__(
        self,
        write: Callable[[list[LLMCallRecord]], Awaitable[None]],
        ledger: _Ledger,
        max_queue: int,
    ) -> None:
        """
        Args:
            write: The wrapped store's ``record_many``.
            ledger: The batcher's counts.
            max_queue: The batcher's queue bound (named in the outage warning).
        """
        self._write = write
        self._ledger = ledger
        self._max_queue = max_queue
        self._backoff = MIN_BACKOFF
        self.faults = 0
        self.outage_since: float | None = None
        self.last_fault: BaseException | None = None
        self.kick = asyncio.Event()  # flush or close: stop waiting between retries

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
                "%s: the telemetry store is unavailable (%s); records are kept and retried "
                "(in memory up to %d, then in the spool)",
                self._ledger.owner,
                "unknown error" if exc is None else _describe(exc),
                self._max_queue,
            )
        self._ledger.signal_progress()

    def recovered(self) -> bool:
        """
        The store took a batch: reset the backoff, and end the outage if there was one.

        Returns:
            True when an outage ended here (the spool may hold records to replay).
        """
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
        Write ``batch``; return the records not written because the store failed.

        A batch refused for its content is split until each refused record is alone;
        that record is retried made safe, or given up.

        Args:
            batch: The records, in order.

        Returns:
            The records left unwritten by a store fault (``last_fault``), in order;
            empty when every record was written or given up.
        """
        try:
            await self._write(batch)
        except Exception as exc:
            if not _is_rejection(exc):
                self.last_fault = exc
                return batch
            if len(batch) > 1:
                mid = len(batch) // 2
                rest = await self.deliver(batch[:mid])
                if rest:
                    return rest + batch[mid:]
                return await self.deliver(batch[mid:])
            return await self._deliver_made_safe(batch[0], exc)
        self._ledger.written += len(batch)
        return []

    async def _deliver_made_safe(
        self, record: LLMCallRecord, exc: BaseException
    ) -> list[LLMCallRecord]:
        ledger = self._ledger
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
                    self.last_fault = again
                    return [record]
                exc = again
            else:
                ledger.written += 1
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
        ledger.failed += 1
        logger.warning(
            "%s: record %s was refused by the store and given up (%s); %d records given up so far",
            ledger.owner,
            record.call_id,
            _describe(exc),
            ledger.failed,
        )
        return []
