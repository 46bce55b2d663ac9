"""
`SQLiteTelemetryBackend`: records written behind into the calls table, evidence rolled
up in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

import aiosqlite

from ..._fast import gc_paused
from ..._paths import quoted_path
from ..._stats import Spend
from ..._validators import shown
from ...abc import TelemetryBackend
from ...evidence import (
    EvidenceBatch,
)
from ...exceptions import (
    ConfigurationError,
    TelemetryError,
)
from ...records import LLMCallRecord, ModelPerformance
from .._spool import Spool
from .._storable import (
    INT64_MAX,
    known_outcomes,
    refusals,
    storable,
    stored_forms,
    stored_tier,
)
from ..batching import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    OnFull,
    _Batcher,
    _check_records,
)
from ._conn import _nothing, _rollback
from ._database import MEMORY, _Database
from ._schema import (
    _EVIDENCE_VERSION,
    _REFUSED,
    _SAMPLES_ONLY,
    _SELECT_CALLS,
    SCHEMA_VERSION,
    _add_evidence,
    _add_evidence_now,
    _aggregate_sql,
    _evidence_query,
    _evidence_rows,
    _from_row,
    _from_us,
    _insert_calls,
    _insert_calls_now,
    _outcome_of,
    _purge_evidence,
    _to_us,
)

# --------------------------------------------------------------------------- telemetry


def _store_now(conn: sqlite3.Connection, records: list[LLMCallRecord]) -> None:
    """Insert ``records`` and their evidence in one transaction (rolled back on failure)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        inserted = _insert_calls_now(conn, records)
        _add_evidence_now(conn, _evidence_rows(inserted))
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise


class SQLiteTelemetryBackend(TelemetryBackend):
    """
    `LLMCallRecord`s in a SQLite file (or ``":memory:"``), shared by every process.

    Every field of a record is stored (metadata and the fallback chain as JSON, the
    timestamp as integer microseconds since the epoch, UTC), and `recent` gives back
    records equal to those written (but for one stored made safe, below); a
    ``workflow``, ``stage`` or ``model`` filter also finds the records written with that
    text and stored made safe (a lone surrogate escaped), as the in-memory backend finds
    them.  `aggregate` runs in SQL over an index covering
    ``(workflow, stage, timestamp, model, outcome, latency, cost, tokens, provider,
    tier)`` and matches the in-memory reference exactly (nearest-rank percentiles).

    Nothing is lost to a bad record or a bad moment: writes are idempotent by
    ``call_id``; a batch the file refuses for one record's content stores the others
    and that record made safe (`TelemetryRejectedError` without batching); a failing
    file (disk full, locked past ``lock_timeout``) keeps the records and retries them; a
    file deleted while open is recreated on the next write.  A value SQLite would store
    but could not give back (a NaN in the metadata) is refused.  Safe to use from
    several tasks of one event loop at once; operations run one at a time on the
    backend's connection (see the module docstring for cancellation).

    Args:
        path: the file, or ``":memory:"``.
        batch: ``True`` (the default): ``record`` and ``record_many`` only queue; a
            background task writes batches of up to ``max_batch`` records, one
            transaction each, on size, every ``flush_interval`` seconds, on `flush`,
            before every read and on `aclose` (see `empathy_models.backends.batching`;
            `written`, `spooled`, `dropped`, `failed` and `pending` count what
            happened).  ``False``: ``record_many`` returns once its records are
            committed (counted in `written`).
        max_batch, flush_interval, max_queue, on_full: the batching policy (see
            `empathy_models.backends.batching`); past ``max_queue``, ``on_full``
            ``"spill"`` (the default) spools them.
        busy_timeout: seconds SQLite waits for another writer.
        lock_timeout: seconds an operation keeps retrying in total before
            `TelemetryError`.
        spool: ``False`` disables the spool.
        close_timeout: bounds `aclose`.
        exit_flush: unless ``False``, records still queued at interpreter exit or on
            SIGTERM are written synchronously.
        read_only, allow_foreign: as for `SQLiteStateStore`.

    Raises:
        TelemetryError: with ``batch=False``, from ``record_many`` having stored none of
            its records.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        on_full: OnFull = "spill",
        busy_timeout: float = 5.0,
        lock_timeout: float = 30.0,
        spool: bool = True,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        exit_flush: bool = True,
        read_only: bool = False,
        allow_foreign: bool = False,
    ) -> None:
        if not isinstance(batch, bool):
            raise ConfigurationError(f"batch must be True or False, got {shown(batch)}")
        self._db = _Database(
            path,
            error=TelemetryError,
            busy_timeout=busy_timeout,
            lock_timeout=lock_timeout,
            read_only=read_only,
            allow_foreign=allow_foreign,
        )
        self._path = self._db.path
        self._batcher: _Batcher | None = None
        self._written = 0  # records committed by direct writes (``batch=False``)
        if not isinstance(spool, bool):
            raise ConfigurationError(f"spool must be True or False, got {shown(spool)}")
        if batch:
            on_disk = self._path != MEMORY
            self._batcher = _Batcher(
                self._write,
                owner=f"SQLiteTelemetryBackend({self._path!r})",
                max_batch=max_batch,
                flush_interval=flush_interval,
                max_queue=max_queue,
                on_full=on_full,
                spool=Spool(f"sqlite:{self._path}") if spool and on_disk else None,
                sync_write=self._write_now if on_disk else None,
                close_timeout=close_timeout,
                exit_flush=exit_flush,
            )

    def __repr__(self) -> str:
        return f"SQLiteTelemetryBackend({self._path!r}, batch={self._batcher is not None})"

    @property
    def path(self) -> str:
        """The absolute path of the database file, or ``":memory:"``."""
        return self._path

    @property
    def persistent(self) -> bool:
        """True for a file; a ``:memory:`` database is gone when the backend closes."""
        return self._path != MEMORY

    @property
    def dropped(self) -> int:
        """Records discarded because the queue was full (``on_full="drop"`` only)."""
        return 0 if self._batcher is None else self._batcher.dropped

    @property
    def failed(self) -> int:
        """Records given up (refused even made safe, or unspoolable), each logged."""
        return 0 if self._batcher is None else self._batcher.failed

    @property
    def spooled(self) -> int:
        """Records written to the local spool so far (replayed into the file later)."""
        return 0 if self._batcher is None else self._batcher.spooled

    @property
    def written(self) -> int:
        """Records written to the file so far (replayed ones included)."""
        return self._written if self._batcher is None else self._batcher.written

    @property
    def recreated(self) -> int:
        """How often the file was found deleted or replaced while open, and recreated."""
        return self._db.recreated

    @property
    def pending(self) -> int:
        """Records in memory, neither handed to SQLite nor spooled yet."""
        return 0 if self._batcher is None else self._batcher.pending

    @property
    def busy_retries(self) -> int:
        """How often an operation found the file locked and retried."""
        return self._db.busy_retries

    def _home_loop(self) -> asyncio.AbstractEventLoop | None:
        return None if self._batcher is None else self._batcher.home()

    async def _aopen(self) -> None:
        await self._db.run(_nothing)
        if self._batcher is not None:
            self._batcher.start()

    # ------------------------------------------------------------------ writes

    async def _write(self, records: list[LLMCallRecord]) -> None:
        if not records:
            return

        async def body(conn: aiosqlite.Connection) -> None:
            inserted = await _insert_calls(conn, records)
            await _add_evidence(conn, _evidence_rows(inserted))

        with refusals(_REFUSED, self._path, f"SQLite database {self._path}"):
            await self._db.run(partial(self._db.transaction, body=body), check_file=True)

    def _write_now(self, records: list[LLMCallRecord]) -> None:
        """
        Store ``records`` synchronously in one transaction (exit paths: no event loop).

        Records are stored as given; when SQLite refuses one for a value it holds, the
        transaction is written again with every record made safe (`storable`).  Waits
        at most 2 s for the write lock.  The file must exist at the current schema
        version (it is never created here).
        """
        conn = sqlite3.connect(
            f"file:{quoted_path(self._path)}?mode=rw",
            uri=True,
            timeout=min(self._db.busy_timeout, 2.0),
            isolation_level=None,
        )
        try:
            row = conn.execute("PRAGMA user_version").fetchone()
            if row is None or int(row[0]) != SCHEMA_VERSION:
                raise self._db._fail("the file is not at this version's schema")
            try:
                _store_now(conn, records)
            except _REFUSED:
                _store_now(conn, [storable(r)[0] for r in records])
        finally:
            conn.close()

    async def record(self, record: LLMCallRecord) -> None:
        """Store one record (queued when batching)."""
        if self._closed:
            self._check_open()
        if self._batcher is not None:
            await self._batcher.submit(record)
        else:
            await self._write(_check_records((record,)))
            self._written += 1

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        """Store several records (queued when batching; else one transaction)."""
        self._check_open()
        if self._batcher is not None:
            await self._batcher.submit_many(records)
        else:
            await self._write(_check_records(records))
            self._written += len(records)

    async def flush(self) -> None:
        """
        Write every record accepted so far; each committed batch is visible to every process.

        Flush does not raise for a write that fails: when the file cannot take records
        (disk full, locked past ``lock_timeout``), it returns after one attempt and the
        records stay queued (then spooled) for the next; a record the file refuses for
        its content is stored made safe, or given up and counted in `failed`.
        """
        self._check_open()
        if self._batcher is not None:
            await self._batcher.flush()

    # ------------------------------------------------------------------ reads

    @staticmethod
    def _filters(
        *,
        workflow: str | None,
        stage: str | None,
        model: str | None = None,
        since: datetime | None,
        until: datetime | None = None,
    ) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = []
        params: dict[str, Any] = {}
        for name, value in (("workflow", workflow), ("stage", stage), ("model", model)):
            if value is None:
                continue
            if not value and name != "model":  # none: recorded as NULL or ""
                clauses.append(f"({name} IS NULL OR {name} = '')")
                continue
            # a record SQLite refused (a lone surrogate) was stored made safe (`storable`)
            forms = stored_forms(value)
            if len(forms) == 1:
                clauses.append(f"{name} = :{name}")
                params[name] = forms[0]
            else:
                clauses.append(f"{name} IN (:{name}, :{name}_safe)")
                params[name], params[f"{name}_safe"] = forms
        if since is not None:
            clauses.append("ts_us >= :since")
            params["since"] = _to_us(since)
        if until is not None:
            clauses.append("ts_us < :until")
            params["until"] = _to_us(until)
        return "".join(f" AND {c}" for c in clauses), params

    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        """Per-model performance computed in SQL (flushes queued records first)."""
        await self.flush()
        where, params = self._filters(workflow=workflow, stage=stage, since=since, until=until)
        params.update(p50=0.50, p95=0.95)
        sql = _aggregate_sql(where, per_stage)

        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            return await self._db.retrying(partial(conn.execute_fetchall, sql, params))

        rows = await self._db.run(job)
        out: list[ModelPerformance] = []
        for row in rows:
            (wf, st, model, provider, tier, n, ok, p50, p95, lat_sum) = row[:10]
            (cost_sum, in_sum, out_sum, first_us, last_us, t50, t95) = row[10:]
            out.append(
                ModelPerformance(
                    model=model,
                    provider=provider,
                    workflow=wf or None,
                    stage=(st or None) if per_stage else None,
                    tier=stored_tier(tier),
                    sample_size=n,
                    successes=ok,
                    latency_p50_ms=p50,
                    latency_p95_ms=p95,
                    avg_latency_ms=(lat_sum / ok) if ok else None,
                    ttft_p50_ms=t50,
                    ttft_p95_ms=t95,
                    avg_cost_usd=cost_sum / n,
                    avg_input_tokens=(in_sum / ok) if ok else 0.0,
                    avg_output_tokens=(out_sum / ok) if ok else 0.0,
                    first_seen=_from_us(first_us),
                    last_seen=_from_us(last_us),
                )
            )
        out.sort(key=lambda m: (m.workflow or "", m.stage or "", m.model))
        return out

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
        """The ``limit`` newest matching records, newest first (flushes first)."""
        await self.flush()
        if limit == 0:
            return []
        where, params = self._filters(
            workflow=workflow, stage=stage, model=model, since=since, until=until
        )
        if samples_only:
            where += f" AND {_SAMPLES_ONLY}"
        params["limit"] = min(limit, INT64_MAX)  # no table holds more rows: the same answer
        sql = f"{_SELECT_CALLS} WHERE 1{where} ORDER BY ts_us DESC, id DESC LIMIT :limit"

        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            return await self._db.retrying(partial(conn.execute_fetchall, sql, params))

        rows = known_outcomes(
            list(await self._db.run(job)), _outcome_of, f"SQLite database {self._path}"
        )
        return [self._record(row) for row in rows]

    async def _spend(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> Spend:
        """What the matching calls cost, every outcome, summed in SQL (flushes first)."""
        await self.flush()
        where, params = self._filters(workflow=workflow, stage=stage, since=since, until=until)
        sql = (
            "SELECT ifnull(workflow, ''), ifnull(stage, ''), model, "
            f"TOTAL(min(cost_usd, 1e300)) FROM llm_calls WHERE 1{where} GROUP BY 1, 2, 3"
        )

        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            return await self._db.retrying(partial(conn.execute_fetchall, sql, params))

        return {
            (wf or None, st or None, model): cost for wf, st, model, cost in await self._db.run(job)
        }

    def _record(self, row: Sequence[Any]) -> LLMCallRecord:
        """The record of one row, or `TelemetryError` naming the row that cannot be read."""
        try:
            return _from_row(row)
        except (ValueError, TypeError, RecursionError) as exc:  # bad JSON, a broken value
            raise TelemetryError(
                f"SQLite database {self._path}: the llm_calls row of call_id {row[0]!r} "
                f"cannot be read ({type(exc).__name__}: {str(exc)[:200]}); fix or delete it",
                target=self._path,
            ) from exc

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        """
        Evidence buckets changed after ``after_version`` (flushes queued records first).

        One read transaction takes the store's version and the rows from the same
        snapshot, over the index on version (incremental reads) or on bucket start
        (windows), unsorted (`EvidenceBatch` sorts its buckets only when they are
        read).  A read of every version (a router's start: hundreds of thousands of
        rows at a week of history for many arms) holds the cyclic garbage collector off
        while its rows are fetched, which is otherwise a third of its time.
        """
        await self.flush()
        sql, params = _evidence_query(since, until, after_version)

        async def read(conn: aiosqlite.Connection) -> tuple[int, Iterable[Sequence[Any]]]:
            await conn.execute("BEGIN")
            try:
                head = await conn.execute_fetchall(_EVIDENCE_VERSION)
                rows = await conn.execute_fetchall(sql, params)
            finally:
                await _rollback(conn)
            return next(iter(head))[0], rows

        async def job(conn: aiosqlite.Connection) -> tuple[int, Iterable[Sequence[Any]]]:
            return await self._db.retrying(partial(read, conn))

        with gc_paused() if after_version == 0 else contextlib.nullcontext():
            version, rows = await self._db.run(job)
            return EvidenceBatch.from_rows(rows, version)

    async def _purge(self, *, before: datetime) -> int:
        """
        Delete records older than ``before`` and the evidence buckets that end at or
        before it, in one transaction; return how many records were deleted.
        """
        await self.flush()
        cutoff = _to_us(before)

        async def body(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute("DELETE FROM llm_calls WHERE ts_us < ?", (cutoff,))
            deleted = cursor.rowcount
            await _purge_evidence(conn, cutoff)
            return deleted

        return await self._db.run(partial(self._db.transaction, body=body))

    async def _aclose(self) -> None:
        try:
            if self._batcher is not None:
                await self._batcher.aclose()
        finally:
            await self._db.close()
