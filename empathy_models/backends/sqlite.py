"""
SQLite backends: telemetry and shared circuit state in one file, safe across processes.

``sqlite:///relative.db``, ``sqlite:////abs/path.db`` and ``sqlite://:memory:`` (also
``sqlite:///:memory:``) resolve to `SQLiteTelemetryBackend` and `SQLiteStateStore`.
Both may use the same file (separate tables), and every worker process on a host may
open it at once.  Options may be given as keyword arguments or in the query string:
``sqlite:///calls.db?busy_timeout=10&batch=false``.

How it is built:

* One `aiosqlite` connection per backend, opened by the first operation (no thread
  exists before that) and closed by ``aclose()``.  Its worker thread is a daemon, so a
  backend never closed does not keep the interpreter from exiting (its queued records
  are written by the exit hook of `empathy_models.backends.batching`); close every
  backend you use all the same (``async with`` does).  aiosqlite runs each statement
  as one job, in order, on that thread; an `asyncio.Lock` is held from an operation's
  first statement to its last, so the operations of one backend never interleave on
  the connection.
* Transactions and cancellation: each attempt of a transaction (``BEGIN IMMEDIATE``,
  its statements, ``COMMIT``) runs inside ``anyio.CancelScope(shield=True)``, so anyio
  cancellation (cancel scopes, ``fail_after``, task groups) waits for it to end, which
  takes at most ``busy_timeout`` waiting for the write lock plus a few statements, and
  is delivered after.  asyncio-native cancellation (``Task.cancel``,
  ``asyncio.timeout``) is not stopped by anyio shields: it interrupts the ``await`` of
  a statement that still runs on the thread, and a rollback is queued right behind it
  before the lock is released.  Either way the transaction ends, committed whole or not
  at all, before the next operation's first statement, and the connection is never
  left inside an open transaction.  A cancelled read leaves nothing behind.  Waiting
  for the lock and the backoff between busy retries are cancellable at once.
* The file is created with mode 0600 before SQLite opens it (SQLite gives the ``-wal``
  and ``-shm`` files the same mode).  WAL journal, ``synchronous=NORMAL`` (a committed
  transaction survives a crash of the process, not necessarily a power cut), a busy
  timeout, and the schema created on first use and migrated by ``PRAGMA
  user_version``; a file written by a newer schema raises `SchemaVersionError` and is
  left untouched.
* Every write is one ``BEGIN IMMEDIATE`` transaction.  "database is locked" never
  reaches the caller: SQLite waits ``busy_timeout`` seconds, then the operation is
  retried with jittered backoff until ``lock_timeout`` seconds have passed, after which
  a `TelemetryError` / `StateStoreError` says the file stayed locked.
* A path in a missing directory, a directory, a file that is not a database, or a
  read-only file raises a `TelemetryError` / `StateStoreError` naming the path.
* Another application's file (tables that are not ours) is refused before anything is
  changed, unless ``allow_foreign=True`` (``?allow_foreign=true``) asks to add our
  tables to it.  ``read_only=True`` (``?read_only=true``) opens an existing
  empathy-models database read-only: nothing is created, migrated or switched to WAL
  (the CLI's ``telemetry summary``, ``breaker status`` and ``routing stats`` do this).

Telemetry is batched by default: `SQLiteTelemetryBackend` queues records and writes
them with ``executemany`` in one transaction per batch (see
`empathy_models.backends.batching` for the policy); ``batch=False`` writes each
``record_many`` call as one transaction before returning.

Evidence rollups (see `empathy_models.evidence`): the transaction that inserts a batch
also adds the batch's `rollup` to ``evidence_buckets`` (one row per workflow, stage,
model and minute; ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x``) and
stamps the rows it changes with the next value of the one-row ``evidence_version``
counter.  SQLite runs one writer at a time across every process, so versions follow
commit order, and `SQLiteTelemetryBackend.evidence` reads the counter and the buckets in
one statement (one snapshot): passing its version back returns each later change once.
Schema version 2 added the tables and built them from the calls already stored;
version 3 made ``call_id`` unique: a record already stored is skipped, and only the
records a transaction actually inserts are rolled up, so a replay counts nothing twice.

Circuit state: `SQLiteStateStore` runs each store operation as one ``BEGIN IMMEDIATE``
transaction that reads the key's row, applies the pure machine of
`empathy_models.circuit` with the UTC wall clock read *after* the lock is taken, and
writes the row back with a generation check.  Several processes sharing one file see
one breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import secrets
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiosqlite
import anyio
import anyio.to_thread

from ..abc import TelemetryBackend, TransactionalStateStore
from ..evidence import (
    BUCKET_SECONDS,
    SUM_FIELDS,
    EvidenceBatch,
    EvidenceBucket,
    log_ms,
    rollup,
)
from ..exceptions import (
    BackendError,
    ConfigurationError,
    SchemaVersionError,
    StateStoreError,
    TelemetryError,
)
from ..records import CircuitBreakerState, LLMCallRecord, ModelPerformance
from ..serialization import from_dict, to_dict
from ._plugin import BackendPlugin
from ._spool import Spool
from ._storable import refusals, storable
from .batching import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    OnFull,
    _Batcher,
    _check_records,
)

__all__ = [
    "SCHEMA_VERSION",
    "SQLiteCircuitStateStore",
    "SQLiteStateStore",
    "SQLiteTelemetryBackend",
    "parse_sqlite_url",
]

logger = logging.getLogger("empathy_models.backends.sqlite")

T = TypeVar("T")

MEMORY: Final = ":memory:"

# --------------------------------------------------------------------------- schema

_EVIDENCE_KEY: Final = "bucket_s, ifnull(workflow, x''), ifnull(stage, x''), model"
_EVIDENCE_COLUMNS: Final = ("bucket_s", "workflow", "stage", "model", *SUM_FIELDS)
_LOG_MS: Final = "empathy_log_ms"
"""SQL name of `empathy_models.evidence.log_ms`, registered on a connection that migrates."""

_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # version 1
    (
        """
        CREATE TABLE llm_calls (
            id INTEGER PRIMARY KEY,
            call_id TEXT NOT NULL,
            request_id TEXT,
            ts_us INTEGER NOT NULL,
            workflow TEXT,
            stage TEXT,
            task_type TEXT NOT NULL,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            tier TEXT,
            outcome TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            actual_cost_usd REAL,
            price_version TEXT,
            latency_ms REAL NOT NULL,
            ttft_ms REAL,
            error_type TEXT,
            error_message TEXT,
            status_code INTEGER,
            attempt INTEGER NOT NULL,
            fallback_used INTEGER NOT NULL,
            fallback_chain TEXT NOT NULL,
            original_provider TEXT,
            original_model TEXT,
            exploration INTEGER NOT NULL,
            breaker_generation INTEGER,
            circuit_state TEXT,
            user_id TEXT,
            session_id TEXT,
            metadata TEXT NOT NULL,
            prompt_text TEXT,
            response_text TEXT
        )
        """,
        # covers the router's aggregate for (workflow, stage, since) without a table lookup
        """
        CREATE INDEX ix_llm_calls_route ON llm_calls (
            workflow, stage, ts_us, model, outcome, latency_ms, cost_usd,
            input_tokens, output_tokens, provider, tier
        )
        """,
        # recent() without filters, and purge()
        "CREATE INDEX ix_llm_calls_ts ON llm_calls (ts_us)",
        """
        CREATE TABLE circuit_state (
            key TEXT PRIMARY KEY,
            generation INTEGER NOT NULL,
            state TEXT NOT NULL,
            data TEXT NOT NULL,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    # version 2: evidence rollups (see `empathy_models.evidence`), built from the calls
    (
        """
        CREATE TABLE evidence_buckets (
            id INTEGER PRIMARY KEY,
            bucket_s INTEGER NOT NULL,
            workflow TEXT,
            stage TEXT,
            model TEXT NOT NULL,
            samples INTEGER NOT NULL,
            successes INTEGER NOT NULL,
            latency_n INTEGER NOT NULL,
            latency_log_sum REAL NOT NULL,
            latency_log_sq_sum REAL NOT NULL,
            ttft_n INTEGER NOT NULL,
            ttft_log_sum REAL NOT NULL,
            ttft_log_sq_sum REAL NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            version INTEGER NOT NULL
        )
        """,
        # one row per key; a NULL workflow or stage is its own key (x'' is a BLOB, which
        # never equals a TEXT value).  Also the range index of since / until and purge.
        f"CREATE UNIQUE INDEX ux_evidence_key ON evidence_buckets ({_EVIDENCE_KEY})",
        # evidence(after_version=v) is a range scan on version
        "CREATE INDEX ix_evidence_version ON evidence_buckets (version)",
        """
        CREATE TABLE evidence_version (
            id INTEGER PRIMARY KEY CHECK (id = 0),
            version INTEGER NOT NULL
        )
        """,
        "INSERT INTO evidence_version (id, version) VALUES (0, 1)",
        f"""
        INSERT INTO evidence_buckets ({", ".join(_EVIDENCE_COLUMNS)}, version)
        SELECT b, workflow, stage, model, count(*), sum(ok), sum(ok),
               total(CASE WHEN ok THEN lat END), total(CASE WHEN ok THEN lat * lat END),
               sum(ok AND tt IS NOT NULL),
               total(CASE WHEN ok THEN tt END), total(CASE WHEN ok THEN tt * tt END),
               sum(CASE WHEN ok THEN input_tokens ELSE 0 END),
               sum(CASE WHEN ok THEN output_tokens ELSE 0 END),
               total(cost_usd), 1
        FROM (
            SELECT (ts_us - ((ts_us % {BUCKET_SECONDS * 1_000_000}) + {BUCKET_SECONDS * 1_000_000})
                    % {BUCKET_SECONDS * 1_000_000}) / 1000000 AS b,
                   workflow, stage, model, outcome = 'success' AS ok,
                   {_LOG_MS}(latency_ms) AS lat,
                   CASE WHEN ttft_ms IS NOT NULL THEN {_LOG_MS}(ttft_ms) END AS tt,
                   input_tokens, output_tokens, cost_usd
            FROM llm_calls
            WHERE outcome IN ('success', 'failure', 'rate_limited', 'fatal')
        )
        GROUP BY b, workflow, stage, model
        """,
    ),
    # version 3: one row per call_id, so a record written twice (a replay of the spool
    # after a crash) is stored once; copies already stored twice keep their first row
    (
        "DELETE FROM llm_calls WHERE id NOT IN (SELECT min(id) FROM llm_calls GROUP BY call_id)",
        "CREATE UNIQUE INDEX ux_llm_calls_call_id ON llm_calls (call_id)",
    ),
    # version 4: the router's aggregate also reads ttft_ms (time-to-first-token
    # percentiles); the covering index gains it, so the query still reads no table row
    (
        "DROP INDEX ix_llm_calls_route",
        """
        CREATE INDEX ix_llm_calls_route ON llm_calls (
            workflow, stage, ts_us, model, outcome, latency_ms, cost_usd,
            input_tokens, output_tokens, provider, tier, ttft_ms
        )
        """,
    ),
    # version 5: the router's selection probability of the model called (what-if's
    # off-policy estimate); NULL for calls recorded before
    ("ALTER TABLE llm_calls ADD COLUMN routing_propensity REAL",),
)

SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The ``PRAGMA user_version`` this code writes; a file with a higher one is refused."""

_CALL_COLUMNS: Final = (
    "call_id",
    "request_id",
    "ts_us",
    "workflow",
    "stage",
    "task_type",
    "provider",
    "model",
    "tier",
    "outcome",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "actual_cost_usd",
    "price_version",
    "latency_ms",
    "ttft_ms",
    "error_type",
    "error_message",
    "status_code",
    "attempt",
    "fallback_used",
    "fallback_chain",
    "original_provider",
    "original_model",
    "exploration",
    "breaker_generation",
    "circuit_state",
    "user_id",
    "session_id",
    "metadata",
    "prompt_text",
    "response_text",
    "routing_propensity",
)
_INSERT_CALL: Final = (
    f"INSERT INTO llm_calls ({', '.join(_CALL_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _CALL_COLUMNS)}) "
    "ON CONFLICT (call_id) DO NOTHING"
)
_SELECT_CALLS: Final = f"SELECT {', '.join(_CALL_COLUMNS)} FROM llm_calls"

# the counter is bumped once per write transaction that changes buckets; SQLite runs one
# writer at a time, so versions follow commit order across every process
_BUMP_EVIDENCE_VERSION: Final = "UPDATE evidence_version SET version = version + 1"
_UPSERT_EVIDENCE: Final = (
    f"INSERT INTO evidence_buckets ({', '.join(_EVIDENCE_COLUMNS)}, version) "
    f"VALUES ({', '.join('?' for _ in _EVIDENCE_COLUMNS)}, "
    "(SELECT version FROM evidence_version)) "
    f"ON CONFLICT ({_EVIDENCE_KEY}) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in _EVIDENCE_COLUMNS[4:])
    + ", version = excluded.version"
)

# what a write raises when a record holds a value SQLite cannot take (an integer past
# 64 bits, text with a lone surrogate, a NaN in the metadata): the records are refused,
# the file is fine
_REFUSED: Final = (
    OverflowError,
    ValueError,
    TypeError,
    sqlite3.DataError,
    sqlite3.IntegrityError,  # a constraint or a trigger refusing the row
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)


def _to_us(value: datetime) -> int:
    """Microseconds since the epoch, exactly (datetimes carry microseconds)."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


_json: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# metadata should hold JSON scalars; anything else is stored as its str() rather than
# failing the whole batch it travels in.  NaN and infinities are refused (ValueError):
# a record holding one could not be read back.
_json_metadata: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False
).encode


def _to_row(r: LLMCallRecord) -> tuple[Any, ...]:
    return (
        r.call_id,
        r.request_id,
        _to_us(r.timestamp),
        r.workflow,
        r.stage,
        r.task_type,
        r.provider,
        r.model,
        None if r.tier is None else r.tier.value,
        r.outcome.value,
        r.input_tokens,
        r.output_tokens,
        r.cost_usd,
        r.actual_cost_usd,
        r.price_version,
        r.latency_ms,
        r.ttft_ms,
        r.error_type,
        r.error_message,
        r.status_code,
        r.attempt,
        int(r.fallback_used),
        _json(r.fallback_chain) if r.fallback_chain else "[]",
        r.original_provider,
        r.original_model,
        int(r.exploration),
        r.breaker_generation,
        None if r.circuit_state is None else r.circuit_state.value,
        r.user_id,
        r.session_id,
        _json_metadata(dict(r.metadata)) if r.metadata else "{}",
        r.prompt_text,
        r.response_text,
        r.routing_propensity,
    )


def _from_row(row: Sequence[Any]) -> LLMCallRecord:
    return LLMCallRecord(
        call_id=row[0],
        request_id=row[1],
        timestamp=_from_us(row[2]),
        workflow=row[3],
        stage=row[4],
        task_type=row[5],
        provider=row[6],
        model=row[7],
        tier=row[8],
        outcome=row[9],
        input_tokens=row[10],
        output_tokens=row[11],
        cost_usd=row[12],
        actual_cost_usd=row[13],
        price_version=row[14],
        latency_ms=row[15],
        ttft_ms=row[16],
        error_type=row[17],
        error_message=row[18],
        status_code=row[19],
        attempt=row[20],
        fallback_used=bool(row[21]),
        fallback_chain=tuple(json.loads(row[22])),
        original_provider=row[23],
        original_model=row[24],
        exploration=bool(row[25]),
        breaker_generation=row[26],
        circuit_state=row[27],
        user_id=row[28],
        session_id=row[29],
        metadata=json.loads(row[30]),
        prompt_text=row[31],
        response_text=row[32],
        routing_propensity=row[33],
    )


_MAX_ID: Final = "SELECT ifnull(max(id), 0) FROM llm_calls"
_IDS_AFTER: Final = "SELECT call_id FROM llm_calls WHERE id > ?"


def _first_of(records: Sequence[LLMCallRecord], call_ids: set[str]) -> list[LLMCallRecord]:
    """The records whose call_id is in ``call_ids``, the first of each (in order)."""
    out = []
    for r in records:
        if r.call_id in call_ids:
            call_ids.discard(r.call_id)
            out.append(r)
    return out


async def _insert_calls(
    conn: aiosqlite.Connection, records: Sequence[LLMCallRecord]
) -> list[LLMCallRecord]:
    """
    Insert ``records`` inside the caller's transaction, skipping every ``call_id`` already
    stored; return the records actually inserted (what anything derived from the calls,
    such as rollups, must count, so that a replay counts nothing twice).

    New rows get ids above the largest one before the insert, so when fewer rows than
    records went in, those ids name the inserted ones.  `_insert_calls_now` is the same
    for a plain `sqlite3` connection (exit paths); keep the two in step.
    """
    (before,) = await _fetchone(conn, _MAX_ID) or (0,)
    changes = conn.total_changes
    # the rows are built lazily, on the connection's thread, inside executemany
    await conn.executemany(_INSERT_CALL, map(_to_row, records))
    if conn.total_changes - changes == len(records):
        return list(records)
    rows = await conn.execute_fetchall(_IDS_AFTER, (before,))
    return _first_of(records, {row[0] for row in rows})


def _insert_calls_now(
    conn: sqlite3.Connection, records: Sequence[LLMCallRecord]
) -> list[LLMCallRecord]:
    """`_insert_calls` on a plain `sqlite3` connection (no event loop: exit paths)."""
    (before,) = conn.execute(_MAX_ID).fetchone() or (0,)
    changes = conn.total_changes
    conn.executemany(_INSERT_CALL, map(_to_row, records))
    if conn.total_changes - changes == len(records):
        return list(records)
    rows = conn.execute(_IDS_AFTER, (before,)).fetchall()
    return _first_of(records, {row[0] for row in rows})


def _rank(param: str) -> str:
    """SQL for the nearest rank ``min(n, max(1, ceil(p * n)))`` with ``p`` bound as a double."""
    x = f"({param} * n)"
    ceil = f"(CAST({x} AS INTEGER) + ({x} > CAST({x} AS INTEGER)))"
    return f"min(n, max(1, {ceil}))"


def _aggregate_sql(where: str, per_stage: bool) -> str:
    """
    One query for `SQLiteTelemetryBackend.aggregate`.

    It reproduces `empathy_models._stats.aggregate_records` exactly: nearest-rank
    percentiles by row number, the latency sum accumulated in ascending order and the
    cost sum in insertion order (the orders the reference sums in), provider and tier
    of the newest record (first inserted among equal timestamps).
    """
    stage = "ifnull(stage, '')" if per_stage else "''"
    return f"""
WITH base AS (
    SELECT id, ifnull(workflow, '') AS wf, {stage} AS st, model, provider, tier, ts_us,
           outcome = 'success' AS ok, latency_ms, ttft_ms, cost_usd, input_tokens,
           output_tokens
    FROM llm_calls
    WHERE outcome IN ('success', 'failure', 'rate_limited', 'fatal'){where}
),
per_row AS (
    SELECT wf, st, model, provider, tier, ts_us, ok, input_tokens, output_tokens,
           SUM(cost_usd) OVER (PARTITION BY wf, st, model ORDER BY id
                               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS cost_sum,
           ROW_NUMBER() OVER (PARTITION BY wf, st, model ORDER BY id DESC) AS from_end,
           ROW_NUMBER() OVER (PARTITION BY wf, st, model ORDER BY ts_us DESC, id ASC) AS newest
    FROM base
),
groups AS (
    SELECT wf, st, model, COUNT(*) AS n, SUM(ok) AS successes,
           MAX(CASE WHEN from_end = 1 THEN cost_sum END) AS cost_sum,
           SUM(CASE WHEN ok THEN input_tokens ELSE 0 END) AS in_sum,
           SUM(CASE WHEN ok THEN output_tokens ELSE 0 END) AS out_sum,
           MIN(ts_us) AS first_us, MAX(ts_us) AS last_us,
           MAX(CASE WHEN newest = 1 THEN provider END) AS provider,
           MAX(CASE WHEN newest = 1 THEN tier END) AS tier
    FROM per_row
    GROUP BY wf, st, model
),
lat AS (
    SELECT wf, st, model, latency_ms,
           ROW_NUMBER() OVER w AS rn,
           COUNT(*) OVER (PARTITION BY wf, st, model) AS n,
           SUM(latency_ms) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS lat_sum
    FROM base
    WHERE ok
    WINDOW w AS (PARTITION BY wf, st, model ORDER BY latency_ms)
),
pct AS (
    SELECT wf, st, model,
           MAX(CASE WHEN rn = {_rank(":p50")} THEN latency_ms END) AS p50,
           MAX(CASE WHEN rn = {_rank(":p95")} THEN latency_ms END) AS p95,
           MAX(CASE WHEN rn = n THEN lat_sum END) AS lat_sum
    FROM lat
    GROUP BY wf, st, model
),
ttft AS (
    SELECT wf, st, model, ttft_ms,
           ROW_NUMBER() OVER (PARTITION BY wf, st, model ORDER BY ttft_ms) AS rn,
           COUNT(*) OVER (PARTITION BY wf, st, model) AS n
    FROM base
    WHERE ok AND ttft_ms IS NOT NULL
),
tpct AS (
    SELECT wf, st, model,
           MAX(CASE WHEN rn = {_rank(":p50")} THEN ttft_ms END) AS t50,
           MAX(CASE WHEN rn = {_rank(":p95")} THEN ttft_ms END) AS t95
    FROM ttft
    GROUP BY wf, st, model
)
SELECT g.wf, g.st, g.model, g.provider, g.tier, g.n, g.successes, p.p50, p.p95, p.lat_sum,
       g.cost_sum, g.in_sum, g.out_sum, g.first_us, g.last_us, t.t50, t.t95
FROM groups AS g
LEFT JOIN pct AS p ON p.wf = g.wf AND p.st = g.st AND p.model = g.model
LEFT JOIN tpct AS t ON t.wf = g.wf AND t.st = g.st AND t.model = g.model
ORDER BY g.wf, g.st, g.model
"""


# --------------------------------------------------------------------------- evidence

_US_PER_S: Final = 1_000_000
_INT64_MAX: Final = 2**63 - 1


def _sqlite_int(value: int) -> int | float:
    """``value``, or as a float beyond SQLite's 64-bit integers (a sum must never fail a batch)."""
    return value if -_INT64_MAX <= value <= _INT64_MAX else float(value)


def _evidence_rows(records: Iterable[LLMCallRecord]) -> list[tuple[Any, ...]]:
    """The rollup of ``records`` as parameter rows of `_UPSERT_EVIDENCE`, in key order."""
    return [
        (
            int(b.bucket_start.timestamp()),
            b.workflow,
            b.stage,
            b.model,
            b.samples,
            b.successes,
            b.latency_n,
            b.latency_log_sum,
            b.latency_log_sq_sum,
            b.ttft_n,
            b.ttft_log_sum,
            b.ttft_log_sq_sum,
            _sqlite_int(b.input_tokens),
            _sqlite_int(b.output_tokens),
            b.cost_usd,
        )
        for b in rollup(records)
    ]


async def _add_evidence(conn: aiosqlite.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Add partial buckets to the stored ones, stamped with a new version (in a transaction)."""
    if rows:
        await conn.execute(_BUMP_EVIDENCE_VERSION)
        await conn.executemany(_UPSERT_EVIDENCE, rows)


def _add_evidence_now(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """`_add_evidence` on a plain `sqlite3` connection (no event loop: exit paths)."""
    if rows:
        conn.execute(_BUMP_EVIDENCE_VERSION)
        conn.executemany(_UPSERT_EVIDENCE, rows)


async def _purge_evidence(conn: aiosqlite.Connection, before_us: int) -> None:
    """Delete the buckets that end at or before ``before_us`` (in a transaction)."""
    last_start = before_us // _US_PER_S - BUCKET_SECONDS
    await conn.execute("DELETE FROM evidence_buckets WHERE bucket_s <= ?", (last_start,))


def _ceil_s(value: datetime) -> int:
    """The first whole second at or after ``value``, in seconds since the epoch."""
    return -(-_to_us(value) // _US_PER_S)


def _evidence_query(
    since: datetime | None, until: datetime | None, after_version: int
) -> tuple[str, dict[str, Any]]:
    clauses = ["version > :after"]
    params: dict[str, Any] = {"after": after_version}
    if since is not None:
        clauses.append("bucket_s >= :since")
        params["since"] = _ceil_s(since)
    if until is not None:
        clauses.append("bucket_s < :until")
        params["until"] = _ceil_s(until)
    columns = ", ".join(_EVIDENCE_COLUMNS)
    nulls = ", ".join("NULL" for _ in _EVIDENCE_COLUMNS)
    # the version row first (part 0), then the buckets in the order of EvidenceBatch
    # (SQLite sorts NULL first and compares text by code point, as Python does)
    sql = (
        f"SELECT 0 AS part, {nulls}, version FROM evidence_version "
        f"UNION ALL SELECT 1 AS part, {columns}, version FROM evidence_buckets "
        f"WHERE {' AND '.join(clauses)} "
        "ORDER BY part, bucket_s, workflow, stage, model"
    )
    return sql, params


def _evidence_batch(rows: Iterable[Sequence[Any]]) -> EvidenceBatch:
    it = iter(rows)
    head = next(it)
    starts: dict[int, datetime] = {}
    buckets = []
    for row in it:
        start = row[1]
        when = starts.get(start)
        if when is None:
            when = starts[start] = datetime.fromtimestamp(start, UTC)
        buckets.append(
            EvidenceBucket(
                bucket_start=when,
                workflow=row[2],
                stage=row[3],
                model=row[4],
                samples=row[5],
                successes=row[6],
                latency_n=row[7],
                latency_log_sum=row[8],
                latency_log_sq_sum=row[9],
                ttft_n=row[10],
                ttft_log_sum=row[11],
                ttft_log_sq_sum=row[12],
                # sums past 2**63 - 1 are stored as REAL (SQLite's arithmetic does the same)
                input_tokens=int(row[13]),
                output_tokens=int(row[14]),
                cost_usd=row[15],
                version=row[16],
            )
        )
    return EvidenceBatch(buckets=buckets, version=head[16])


# --------------------------------------------------------------------------- the connection


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class _Busy(Exception):
    """The database stayed locked for longer than ``lock_timeout``."""


async def _fetchone(
    conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()
) -> sqlite3.Row | None:
    """The first row of a query's result, or None (one hop to the connection's thread)."""
    return next(iter(await conn.execute_fetchall(sql, params)), None)


async def _nothing(conn: aiosqlite.Connection) -> None:
    """An operation that only opens the connection."""


async def _rollback(conn: aiosqlite.Connection) -> None:
    """
    Queue a rollback behind every statement already sent on ``conn`` and await it.

    ``Connection.rollback`` does nothing outside a transaction, so this is safe after
    any failure.  The rollback is queued before the first suspension: if this await
    is itself cancelled, the rollback still runs on the connection's thread before
    any statement sent later.
    """
    try:
        await conn.rollback()
    except (sqlite3.Error, ValueError):  # the transaction or the connection is gone
        logger.debug("rollback failed", exc_info=True)


class _Connector:
    """
    Makes the `sqlite3` connection on aiosqlite's thread and keeps hold of it until
    the open that asked for it is settled.

    aiosqlite drops the connection its thread made when the awaiting open is
    cancelled, leaving it to the garbage collector unclosed (a file descriptor held
    until then, and a ``ResourceWarning`` from Python 3.13).  `abandon` closes that
    connection, or makes the thread close it if it is still connecting.  The
    connection is made with ``check_same_thread=False`` so that `abandon` may close it
    from the event loop's thread; aiosqlite itself uses it on its own thread only.
    """

    def __init__(self, path: str, timeout: float, *, uri: bool = False) -> None:
        self._path = path
        self._timeout = timeout
        self._uri = uri
        self._lock = threading.Lock()
        self._made: sqlite3.Connection | None = None
        self._abandoned = False

    def __call__(self) -> sqlite3.Connection:
        made = sqlite3.connect(
            self._path,
            timeout=self._timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=self._uri,
        )
        with self._lock:
            if self._abandoned:
                made.close()
                raise sqlite3.OperationalError("the open was cancelled")
            self._made = made
        return made

    def adopted(self) -> None:
        """The open succeeded: the aiosqlite connection owns and closes the connection."""
        with self._lock:
            self._made = None

    def abandon(self) -> None:
        """The open failed before `adopted`: close the connection, made or still to be."""
        with self._lock:
            self._abandoned = True
            made, self._made = self._made, None
        if made is not None:
            made.close()


class _Database:
    """
    One aiosqlite connection, opened on first use, and the rules for using it.

    `run` holds an `asyncio.Lock` from an operation's first statement to its last, so
    the operations of one backend never interleave on the connection.  The connection
    is opened (file created 0600, PRAGMAs, migrations) by the first operation; no
    thread exists before that.  Native errors are mapped to ``error`` (a
    `BackendError` subclass) naming the path; other exceptions pass through.

    Cancellation: see `_attempt`.  A transaction is never left open on the connection.
    """

    def __init__(
        self,
        path: str,
        *,
        error: type[BackendError],
        busy_timeout: float,
        lock_timeout: float,
        read_only: bool = False,
        allow_foreign: bool = False,
    ) -> None:
        if not isinstance(read_only, bool) or not isinstance(allow_foreign, bool):
            raise ConfigurationError(
                f"read_only and allow_foreign must be True or False, got {read_only!r}, "
                f"{allow_foreign!r}"
            )
        if read_only and path == MEMORY:
            raise ConfigurationError("read_only needs a database file, not ':memory:'")
        self.read_only = read_only
        self.allow_foreign = allow_foreign
        self.path = path
        self.error = error
        self.busy_timeout = busy_timeout
        self.lock_timeout = lock_timeout
        self.busy_retries = 0
        self.recreated = 0  # times the file was found deleted or replaced and recreated
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._stopped = False  # close() was called: no new operations
        self._finished = False  # close() is done (or gave up): no connection again

    # ------------------------------------------------------------------ errors

    def _fail(self, message: str, exc: BaseException | None = None) -> BackendError:
        err = self.error(f"SQLite database {self.path}: {message}", target=self.path)
        if exc is not None:
            err.__cause__ = exc
        return err

    def _map(self, exc: BaseException) -> BaseException:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, _Busy):
            return self._fail(
                f"stayed locked by other writers for more than {self.lock_timeout:g} s "
                "(raise lock_timeout or busy_timeout)",
                exc.__cause__,
            )
        if isinstance(exc, sqlite3.Error):
            text = str(exc)
            low = text.lower()
            if "not a database" in low or "malformed" in low or "corrupt" in low:
                return self._fail(f"the file is not a SQLite database or is corrupt ({text})", exc)
            if "readonly" in low or "read-only" in low:
                return self._fail(f"the database is read-only ({text})", exc)
            if "unable to open" in low:
                return self._fail(f"cannot open the file ({text})", exc)
            return self._fail(f"{type(exc).__name__}: {text}", exc)
        if isinstance(exc, OverflowError):
            return self._fail(f"a value does not fit in SQLite ({exc})", exc)
        if isinstance(exc, OSError):
            return self._fail(f"{exc.strerror or exc}", exc)
        if isinstance(exc, ValueError) and self._stopped:
            # aiosqlite's "Connection closed": aclose() stopped the connection meanwhile
            return self._fail("the connection is closed", exc)
        return exc

    # ------------------------------------------------------------------ building blocks

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Await ``attempt()``, retrying with jittered backoff while the file is busy."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while True:
            try:
                return await attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise _Busy() from exc
                self.busy_retries += 1
                # outside any shield: a caller may be cancelled between attempts
                await anyio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2.0, 0.25)

    async def transaction(
        self,
        conn: aiosqlite.Connection,
        body: Callable[[aiosqlite.Connection], Awaitable[T]],
    ) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction, retrying while busy."""
        return await self.retrying(partial(self._attempt, conn, body))

    @staticmethod
    async def _attempt(
        conn: aiosqlite.Connection,
        body: Callable[[aiosqlite.Connection], Awaitable[T]],
    ) -> T:
        """
        ``BEGIN IMMEDIATE``; ``body``; ``COMMIT``, or a rollback on any exception.

        Shielded from anyio cancellation (cancel scopes, ``fail_after``, task groups):
        a cancelled caller waits for the attempt to end (at most ``busy_timeout``
        waiting for the write lock, plus a few statements) and is cancelled after.
        asyncio-native cancellation (``Task.cancel``, ``asyncio.timeout``) goes through
        anyio shields; it then lands in the ``except`` below with the interrupted
        statement still queued on the connection's thread.  `_rollback` is queued
        behind it, before the lock is released, so the transaction ends (committed if
        COMMIT had been sent, else rolled back) before the next operation's first
        statement runs.
        """
        with anyio.CancelScope(shield=True):
            try:
                await conn.execute("BEGIN IMMEDIATE")
                result = await body(conn)
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
        return result

    # ------------------------------------------------------------------ opening

    def _prepare_file(self) -> None:
        path = self.path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileNotFoundError as exc:
            raise self._fail(
                f"the directory {os.path.dirname(path) or '.'} does not exist", exc
            ) from exc
        except IsADirectoryError as exc:
            raise self._fail("the path is a directory, not a database file", exc) from exc
        except PermissionError as exc:
            raise self._fail(
                "permission denied: the file or its directory is read-only for this user", exc
            ) from exc
        except OSError as exc:
            raise self._fail(f"cannot create or open the file ({exc.strerror})", exc) from exc
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise self._fail("the path is not a regular file")
        if st.st_mode & 0o222 == 0:
            # root can write anyway; honour the file's read-only mode all the same
            raise self._fail(f"the file is read-only (mode {stat.S_IMODE(st.st_mode):04o})")

    def _check_readable(self) -> None:
        if not os.path.isfile(self.path):
            raise self._fail("no such database file (opened read-only: nothing is created)")

    async def _open(self) -> aiosqlite.Connection:
        if self.read_only:
            await anyio.to_thread.run_sync(self._check_readable)
            target = "file:" + urllib.parse.quote(self.path) + "?mode=ro"
            connector = _Connector(target, self.busy_timeout, uri=True)
        else:
            if self.path != MEMORY:
                # on a worker thread: the event loop never waits on the file system
                await anyio.to_thread.run_sync(self._prepare_file)
            connector = _Connector(self.path, self.busy_timeout)
        conn = aiosqlite.Connection(connector, iter_chunk_size=64)
        thread = getattr(conn, "_thread", None)
        if isinstance(thread, threading.Thread) and not thread.is_alive():
            # a backend never closed must not keep the interpreter from exiting
            thread.daemon = True
        try:
            # Not shielded: a cancelled open is simply discarded.  The migration is a
            # shielded transaction of its own; PRAGMAs are idempotent.
            try:
                await conn  # starts the connection's thread (stopped again if this fails)
            except BaseException:
                connector.abandon()
                raise
            connector.adopted()
            await self.retrying(partial(self._setup, conn))
            if self._finished:  # close() gave up waiting for this open
                raise self._fail("the connection is closed")
            if self.path != MEMORY:
                self._ident = await anyio.to_thread.run_sync(self._identity)
        except BaseException:
            await self._discard(conn)
            raise
        self._conn = conn
        return conn

    def _identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file at ``path`` now, or None when there is none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _remove_orphans(self) -> None:
        """Delete a ``-wal`` / ``-shm`` left by a deleted database (never pair them anew)."""
        if not os.path.exists(self.path):
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)

    async def _reopen_if_replaced(self, conn: aiosqlite.Connection) -> aiosqlite.Connection:
        """
        The connection to use for a write: ``conn``, or a new one when the file at
        ``path`` was deleted or replaced since it was opened.

        What the old file held is still readable through ``conn``: it is copied out
        first (``VACUUM INTO`` a 0600 file next to it), the file is recreated (or the
        replacing file used), and the copy's calls and circuit states are merged in
        (rows already there win), so nothing is lost.
        """
        if self.path == MEMORY or self._ident is None:
            return conn
        now = await anyio.to_thread.run_sync(self._identity)
        if now == self._ident:
            return conn
        self.recreated += 1
        rescue = await self._rescue(conn)
        self._conn = None
        await self._discard(conn)
        await anyio.to_thread.run_sync(self._remove_orphans)
        conn = await self._open()
        merged = 0 if rescue is None else await self._merge(conn, rescue)
        logger.warning(
            "SQLite database %s was %s while open; %s it with the %d calls the old file held%s",
            self.path,
            "deleted" if now is None else "replaced by another file",
            "recreated" if now is None else "switched to",
            merged,
            "" if rescue is not None else " (the old file could not be copied: they are lost)",
        )
        return conn

    async def _rescue(self, conn: aiosqlite.Connection) -> str | None:
        """Copy the (deleted) database ``conn`` still holds open; the copy's path or None."""
        rescue = f"{self.path}.rescued-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            # VACUUM INTO fills an empty file and keeps its mode: create it 0600 first
            os.close(os.open(rescue, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            await conn.execute("VACUUM INTO ?", (rescue,))
        except (OSError, sqlite3.Error):
            logger.warning(
                "copying the deleted SQLite database %s failed", self.path, exc_info=True
            )
            with contextlib.suppress(OSError):
                os.unlink(rescue)
            return None
        return rescue

    async def _merge(self, conn: aiosqlite.Connection, rescue: str) -> int:
        """Merge the rescued copy into the file ``conn`` has open; the calls added."""
        columns = ", ".join(_CALL_COLUMNS)

        async def body(c: aiosqlite.Connection) -> int:
            (before,) = await _fetchone(c, _MAX_ID) or (0,)
            cursor = await c.execute(
                f"INSERT INTO llm_calls ({columns}) SELECT {columns} FROM rescued.llm_calls "
                "WHERE true ON CONFLICT (call_id) DO NOTHING"
            )
            added = cursor.rowcount
            # the merged calls count in the rollups like any call written here
            merged = await c.execute_fetchall(f"{_SELECT_CALLS} WHERE id > ?", (before,))
            await _add_evidence(c, _evidence_rows(_from_row(row) for row in merged))
            await c.execute(
                "INSERT OR IGNORE INTO circuit_state SELECT * FROM rescued.circuit_state"
            )
            return added

        try:
            await conn.execute("ATTACH DATABASE ? AS rescued", (rescue,))
            try:
                added = await self.transaction(conn, body)
            finally:
                await conn.execute("DETACH DATABASE rescued")
        except sqlite3.Error:
            logger.warning(
                "merging the copy of the deleted SQLite database %s failed; the copy is kept at %s",
                self.path,
                rescue,
                exc_info=True,
            )
            return 0
        with contextlib.suppress(OSError):
            os.unlink(rescue)
        return added

    async def _setup(self, conn: aiosqlite.Connection) -> None:
        # every check comes before the first change (journal mode, tables): a refused
        # file is left exactly as it was
        # one read transaction: the version and the tables from the same snapshot (another
        # process may be creating this file's tables right now)
        await conn.execute("BEGIN")
        try:
            row = await _fetchone(conn, "PRAGMA user_version")
            tables = {
                str(r[0])
                for r in await conn.execute_fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
                )
            }
        finally:
            await _rollback(conn)
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite database {self.path} has schema version {version}, newer than the "
                f"{SCHEMA_VERSION} this version of empathy-models understands; upgrade "
                "empathy-models (the file was left untouched)",
                target=self.path,
            )
        ours = version >= 1 and {"llm_calls", "circuit_state"} <= tables
        if tables and not ours and not self.allow_foreign:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise self._fail(
                f"the file belongs to another application (user_version {version}, tables "
                f"{shown}); it was left untouched.  Point empathy-models at its own file, "
                "or pass allow_foreign=True (URL: ?allow_foreign=true) to add its tables "
                "to this one"
            )
        if self.read_only:
            if not ours:
                raise self._fail(
                    "not an empathy-models database (opened read-only: nothing is created)"
                )
            return
        if self.path != MEMORY:
            row = await _fetchone(conn, "PRAGMA journal_mode")
            if row is None or str(row[0]).lower() != "wal":
                await conn.execute_fetchall("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            # the migration to version 2 builds the evidence rollups in SQL with log_ms
            await conn.create_function(_LOG_MS, 1, log_ms, deterministic=True)
            await self.transaction(conn, self._migrate)

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        # re-read under the write lock: another process may have migrated meanwhile
        row = await _fetchone(conn, "PRAGMA user_version")
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite database {self.path} has schema version {version}, newer than "
                f"{SCHEMA_VERSION}",
                target=self.path,
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target - 1]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {target:d}")

    @staticmethod
    async def _discard(conn: aiosqlite.Connection) -> None:
        """Close ``conn`` and stop its thread, even when the caller is being cancelled."""
        with anyio.CancelScope(shield=True):
            try:
                await conn.close()  # a no-op if it never opened (it stopped itself)
            except sqlite3.Error:
                logger.warning("closing a SQLite connection failed", exc_info=True)

    # ------------------------------------------------------------------ public

    async def run(
        self, op: Callable[[aiosqlite.Connection], Awaitable[T]], *, check_file: bool = False
    ) -> T:
        """
        Await ``op(conn)`` holding the connection's lock (opening it first if needed).

        Operations wait for one another in arrival order; an operation begun before
        `close` still runs, one begun after raises ``error`` ("the connection is
        closed").  Native errors are mapped to ``error``.  With ``check_file``, a file
        deleted or replaced since it was opened is detected (by inode), logged, and
        recreated (or the new file used) before ``op`` runs.
        """
        if self._stopped:
            raise self._fail("the connection is closed")
        try:
            async with self._lock:
                conn = self._conn
                if conn is None:
                    if self._finished:
                        raise self._fail("the connection is closed")
                    conn = await self._open()
                elif check_file:
                    conn = await self._reopen_if_replaced(conn)
                return await op(conn)
        except Exception as exc:
            mapped = self._map(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def close(self) -> None:
        """Let the operation in progress finish, close the connection, stop its thread."""
        if self._stopped:
            return
        self._stopped = True
        try:
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    self._finished = True
                    conn, self._conn = self._conn, None
                    if conn is not None:
                        await self._discard(conn)
        finally:
            # cancelled (asyncio-natively) while waiting for the lock: stop the thread
            # anyway.  stop() queues the close behind the statements already sent;
            # SQLite rolls back a transaction still open, later statements fail as
            # "the connection is closed".
            self._finished = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.stop()


def _check_seconds(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _normalize_path(path: str | os.PathLike[str]) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ConfigurationError(f"path must be a non-empty file path or ':memory:', got {path!r}")
    if path == MEMORY:
        return MEMORY
    if "\x00" in path:
        raise ConfigurationError(f"path must not contain a NUL character, got {path!r}")
    return os.path.abspath(path)


# --------------------------------------------------------------------------- telemetry


class SQLiteTelemetryBackend(TelemetryBackend):
    """
    `LLMCallRecord`s in a SQLite file (or ``":memory:"``), shared by every process.

    Every field of a record is stored (metadata and the fallback chain as JSON, the
    timestamp as integer microseconds since the epoch, UTC), and `recent` gives back
    records equal to those written.  `aggregate` runs in SQL over an index covering
    ``(workflow, stage, timestamp, model, outcome, latency, cost, tokens, provider,
    tier)`` and matches the in-memory reference exactly (nearest-rank percentiles).

    With ``batch=True`` (the default) ``record`` and ``record_many`` only queue; a
    background task writes batches of up to ``max_batch`` records, one transaction
    each, on size, every ``flush_interval`` seconds, on `flush`, before every read and
    on `aclose` (see `empathy_models.backends.batching`; `dropped`, `failed` and
    `pending` count what happened).  With ``batch=False``, ``record_many`` returns once
    its records are committed, or raises `TelemetryError` having stored none of them.

    Nothing is lost to a bad record or a bad moment: writes are idempotent by
    ``call_id``; a batch the file refuses for one record's content stores the others
    and that record made safe (`TelemetryRejectedError` without batching); a failing
    file (disk full, locked past ``lock_timeout``) keeps the records and retries them,
    spooling past ``max_queue`` (``spool=False`` to disable); a file deleted while open
    is recreated on the next write; ``close_timeout`` bounds `aclose`; and unless
    ``exit_flush=False`` records still queued at interpreter exit or on SIGTERM are
    written synchronously (see `empathy_models.backends.batching`).  A value SQLite
    would store but could not give back (a NaN in the metadata) is refused.

    ``busy_timeout`` is how long SQLite waits for another writer; ``lock_timeout`` how
    long an operation keeps retrying in total before `TelemetryError`.  Safe to use
    from several tasks of one event loop at once; operations run one at a time on the
    backend's connection (see the module docstring for cancellation).
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
            raise ConfigurationError(f"batch must be True or False, got {batch!r}")
        self._path = _normalize_path(path)
        self._db = _Database(
            self._path,
            error=TelemetryError,
            busy_timeout=_check_seconds("busy_timeout", busy_timeout),
            lock_timeout=_check_seconds("lock_timeout", lock_timeout),
            read_only=read_only,
            allow_foreign=allow_foreign,
        )
        self._batcher: _Batcher | None = None
        if not isinstance(spool, bool):
            raise ConfigurationError(f"spool must be True or False, got {spool!r}")
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

        Values are made safe first (`storable`); waits at most 2 s for the write lock.
        The file must exist at the current schema version (it is never created here).
        """
        conn = sqlite3.connect(
            f"file:{quote(self._path)}?mode=rw",
            uri=True,
            timeout=min(self._db.busy_timeout, 2.0),
            isolation_level=None,
        )
        try:
            row = conn.execute("PRAGMA user_version").fetchone()
            if row is None or int(row[0]) != SCHEMA_VERSION:
                raise self._db._fail("the file is not at this version's schema")
            conn.execute("BEGIN IMMEDIATE")
            try:
                inserted = _insert_calls_now(conn, [storable(r)[0] for r in records])
                _add_evidence_now(conn, _evidence_rows(inserted))
                conn.execute("COMMIT")
            except BaseException:
                conn.rollback()
                raise
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

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        """Store several records (queued when batching; else one transaction)."""
        self._check_open()
        if self._batcher is not None:
            await self._batcher.submit_many(records)
        else:
            await self._write(_check_records(records))

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
            if value is not None:
                clauses.append(f"{name} = :{name}")
                params[name] = value
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
                    tier=tier,
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
    ) -> list[LLMCallRecord]:
        """The ``limit`` newest matching records, newest first (flushes first)."""
        await self.flush()
        if limit == 0:
            return []
        where, params = self._filters(workflow=workflow, stage=stage, model=model, since=since)
        params["limit"] = limit
        sql = f"{_SELECT_CALLS} WHERE 1{where} ORDER BY ts_us DESC, id DESC LIMIT :limit"

        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            return await self._db.retrying(partial(conn.execute_fetchall, sql, params))

        return [self._record(row) for row in await self._db.run(job)]

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

        One statement reads the buckets and the store's version from the same snapshot,
        over the index on version (incremental reads) or on bucket start (windows).
        """
        await self.flush()
        sql, params = _evidence_query(since, until, after_version)

        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            return await self._db.retrying(partial(conn.execute_fetchall, sql, params))

        return _evidence_batch(await self._db.run(job))

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


# --------------------------------------------------------------------------- circuit state


_SELECT_STATE: Final = "SELECT data, generation FROM circuit_state WHERE key = ?"


class SQLiteStateStore(TransactionalStateStore):
    """
    Circuit-breaker state in a SQLite file, shared by every process that opens it.

    Each store operation (`admit`, `record`, `force`, `reset`) that changes the state is
    one ``BEGIN IMMEDIATE`` transaction: the key's row is read, the pure machine of
    `empathy_models.circuit` runs with ``clock()`` (UTC epoch seconds, read after the
    write lock is held, so time never runs backwards between two operations on one
    host), and the row is written back only if its generation is still the one read.
    An operation that changes nothing (admitting while CLOSED, rejecting while OPEN)
    is answered from a plain read and takes no lock, so it never waits for writers.
    States are stored as the versioned JSON of `empathy_models.serialization`.
    ``shared`` is true for a file and false for ``":memory:"`` (a private database).

    ``clock`` defaults to `time.time`; tests inject a fake one.  Raises
    `StateStoreError` (naming the path) when the file cannot be used.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        lock_timeout: float = 30.0,
        read_only: bool = False,
        allow_foreign: bool = False,
    ) -> None:
        if not callable(clock):
            raise ConfigurationError(f"clock must be callable, got {clock!r}")
        self._path = _normalize_path(path)
        if self._path == MEMORY:
            # each :memory: store is a private database: nothing is shared with another
            self.shared = False  # type: ignore[misc]
        self._clock = clock
        self._db = _Database(
            self._path,
            error=StateStoreError,
            busy_timeout=_check_seconds("busy_timeout", busy_timeout),
            lock_timeout=_check_seconds("lock_timeout", lock_timeout),
            read_only=read_only,
            allow_foreign=allow_foreign,
        )

    def __repr__(self) -> str:
        return f"SQLiteStateStore({self._path!r})"

    @property
    def path(self) -> str:
        """The absolute path of the database file, or ``":memory:"``."""
        return self._path

    @property
    def busy_retries(self) -> int:
        """How often an operation found the file locked and retried."""
        return self._db.busy_retries

    async def _aopen(self) -> None:
        await self._db.run(_nothing)

    def _decode(self, key: str, data: object) -> CircuitBreakerState:
        """The stored state of ``key``, or `StateStoreError` naming the key it belongs to."""
        try:
            if not isinstance(data, str):
                raise TypeError(f"expected JSON text, got {type(data).__name__}")
            state = from_dict(json.loads(data), CircuitBreakerState)
            if state.key != key:
                raise ValueError(f"the row holds the state of {state.key!r}")
        except (ValueError, TypeError, RecursionError, KeyError) as exc:
            raise StateStoreError(
                f"SQLite database {self._path}: the circuit state of {key!r} is unreadable "
                f"({type(exc).__name__}: {str(exc)[:200]}); repair it with "
                f"`empathy-models breaker reset {key}`",
                target=self._path,
                key=key,
            ) from exc
        return state

    async def reset(self, key: str | None = None) -> None:
        """
        Return ``key`` (or every key) to a fresh CLOSED state; a row whose state cannot
        be read is replaced, which is how a corrupt row is repaired.
        """
        for _ in range(10_000):  # one pass per unreadable row found on the way
            try:
                await super().reset(key)
                return
            except StateStoreError as exc:
                if exc.key is None or (key is not None and exc.key != key):
                    raise
                logger.warning("replacing the unreadable circuit state of %r", exc.key)
                await self._clear(exc.key)
        raise StateStoreError(f"SQLite database {self._path}: reset did not finish")

    async def _transact(
        self,
        key: str,
        fn: Callable[[CircuitBreakerState | None, float], tuple[CircuitBreakerState | None, T]],
    ) -> T:
        db = self._db
        clock = self._clock

        async def body(conn: aiosqlite.Connection) -> T:
            row = await _fetchone(conn, _SELECT_STATE, (key,))
            current = None if row is None else self._decode(key, row[0])
            new, result = fn(current, clock())  # now: read with the write lock held
            if new is not None and new is not current:
                data = _json(to_dict(new))
                now = new.updated_at_ts if new.updated_at_ts is not None else time.time()
                if row is None:
                    await conn.execute(
                        "INSERT INTO circuit_state (key, generation, state, data, updated_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (key, new.generation, new.state.value, data, now),
                    )
                else:
                    cursor = await conn.execute(
                        "UPDATE circuit_state SET generation = ?, state = ?, data = ?, "
                        "updated_at = ? WHERE key = ? AND generation = ?",
                        (new.generation, new.state.value, data, now, key, row[1]),
                    )
                    if cursor.rowcount != 1:  # cannot happen under the write lock
                        raise StateStoreError(
                            f"SQLite database {db.path}: the state of {key!r} changed "
                            "during a transaction",
                            target=db.path,
                        )
            return result

        async def job(conn: aiosqlite.Connection) -> T:
            # Optimistic first pass without the write lock (a WAL read never waits for
            # writers): when the machine changes nothing (an admit while CLOSED, or a
            # rejection while OPEN) the answer is consistent with the state as read, so
            # it is returned as is.  Otherwise the step runs again from a fresh read
            # inside BEGIN IMMEDIATE, which is what makes it atomic.
            row = await db.retrying(partial(_fetchone, conn, _SELECT_STATE, (key,)))
            current = None if row is None else self._decode(key, row[0])
            new, result = fn(current, clock())
            if new is None or new is current:
                return result
            return await db.transaction(conn, body)

        return await db.run(job)

    async def _load(self, key: str) -> CircuitBreakerState | None:
        async def job(conn: aiosqlite.Connection) -> sqlite3.Row | None:
            return await self._db.retrying(
                partial(_fetchone, conn, "SELECT data FROM circuit_state WHERE key = ?", (key,))
            )

        row = await self._db.run(job)
        return None if row is None else self._decode(key, row[0])

    async def _load_all(self) -> list[CircuitBreakerState]:
        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            return await self._db.retrying(
                partial(conn.execute_fetchall, "SELECT key, data FROM circuit_state ORDER BY key")
            )

        return [self._decode(row[0], row[1]) for row in await self._db.run(job)]

    async def _clear(self, key: str | None) -> None:
        async def body(conn: aiosqlite.Connection) -> None:
            if key is None:
                await conn.execute("DELETE FROM circuit_state")
            else:
                await conn.execute("DELETE FROM circuit_state WHERE key = ?", (key,))

        await self._db.run(partial(self._db.transaction, body=body))

    async def _aclose(self) -> None:
        await self._db.close()


SQLiteCircuitStateStore = SQLiteStateStore
"""Alias of `SQLiteStateStore` (the name used in the design issue)."""


# --------------------------------------------------------------------------- URLs


def _parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"sqlite URL option {name}={value!r} must be true or false")


def _parse_number(kind: Callable[[str], Any]) -> Callable[[str, str], Any]:
    def parse(name: str, value: str) -> Any:
        try:
            return kind(value)
        except ValueError as exc:
            raise ConfigurationError(
                f"sqlite URL option {name}={value!r} must be a {kind.__name__}"
            ) from exc

    return parse


_COMMON_OPTIONS: Final[Mapping[str, Callable[[str, str], Any]]] = {
    "busy_timeout": _parse_number(float),
    "lock_timeout": _parse_number(float),
    "read_only": _parse_bool,
    "allow_foreign": _parse_bool,
}
_TELEMETRY_OPTIONS: Final[Mapping[str, Callable[[str, str], Any]]] = {
    **_COMMON_OPTIONS,
    "batch": _parse_bool,
    "max_batch": _parse_number(int),
    "flush_interval": _parse_number(float),
    "max_queue": _parse_number(int),
    "on_full": lambda name, value: value,
    "spool": _parse_bool,
    "close_timeout": _parse_number(float),
    "exit_flush": _parse_bool,
}


def parse_sqlite_url(
    url: str, allowed: Mapping[str, Callable[[str, str], Any]] = _TELEMETRY_OPTIONS
) -> tuple[str, dict[str, Any]]:
    """
    Split a ``sqlite://`` URL into a path and keyword options.

    ``sqlite:///rel.db`` -> ``rel.db`` (relative to the working directory),
    ``sqlite:////abs/x.db`` -> ``/abs/x.db``, ``sqlite://:memory:`` and
    ``sqlite:///:memory:`` -> ``:memory:``.  Raises `ConfigurationError` for another
    scheme, a host part, an empty path or an unknown option.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"not a valid sqlite:// URL: {url!r} ({exc})") from exc
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(f"not a sqlite:// URL: {url!r}")
    if parts.netloc == MEMORY and parts.path in ("", "/"):
        path = MEMORY
    elif parts.netloc:
        raise ConfigurationError(
            f"sqlite URL {url!r} has a host part {parts.netloc!r}; use sqlite:///relative.db, "
            "sqlite:////absolute/path.db or sqlite://:memory:"
        )
    else:
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ConfigurationError(
                f"sqlite URL {url!r} names no file; use sqlite:///relative.db, "
                "sqlite:////absolute/path.db or sqlite://:memory:"
            )
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in allowed:
            raise ConfigurationError(
                f"unknown sqlite URL option {name!r}; known: {', '.join(sorted(allowed))}"
            )
        options[name] = allowed[name](name, value)
    return path, options


def _telemetry(url: str, **options: Any) -> SQLiteTelemetryBackend:
    path, query = parse_sqlite_url(url, _TELEMETRY_OPTIONS)
    return SQLiteTelemetryBackend(path, **{**query, **options})


def _store(url: str, **options: Any) -> SQLiteStateStore:
    path, query = parse_sqlite_url(url, _COMMON_OPTIONS)
    return SQLiteStateStore(path, **{**query, **options})


PLUGIN = BackendPlugin(
    schemes=("sqlite",),
    package="empathy-models",
    telemetry=_telemetry,
    state_store=_store,
)
