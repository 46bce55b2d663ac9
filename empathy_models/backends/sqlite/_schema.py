"""
Schema, rows and queries of the SQLite telemetry: the migrations, a record as a row and
back, the aggregate query, the evidence rollups.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiosqlite

from ...evidence import (
    BUCKET_SECONDS,
    SUM_FIELDS,
    EvidenceBatch,
    rollup,
)
from ...records import LLMCallRecord, Outcome
from .._storable import stored_circuit_state, stored_tier
from ._conn import _fetchone

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
    # as `rollup` builds them: each cost counts for at most 1e300 (`_stats.AVERAGE_CAP`),
    # and of the copies of one call_id (version 1 kept them) only the first, the row
    # version 3 keeps
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
               total(min(cost_usd, 1e300)), 1
        FROM (
            SELECT (ts_us - ((ts_us % {BUCKET_SECONDS * 1_000_000}) + {BUCKET_SECONDS * 1_000_000})
                    % {BUCKET_SECONDS * 1_000_000}) / 1000000 AS b,
                   workflow, stage, model, outcome = 'success' AS ok,
                   {_LOG_MS}(latency_ms) AS lat,
                   CASE WHEN ttft_ms IS NOT NULL THEN {_LOG_MS}(ttft_ms) END AS tt,
                   input_tokens, output_tokens, cost_usd
            FROM llm_calls
            WHERE outcome IN ('success', 'failure', 'rate_limited', 'fatal')
              AND id IN (SELECT min(id) FROM llm_calls GROUP BY call_id)
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
# the sample outcomes (`Outcome.is_sample`), as an SQL condition
_SAMPLES_ONLY: Final = "outcome IN ({})".format(
    ", ".join(f"'{o.value}'" for o in Outcome if o.is_sample)
)

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


_OUTCOME_COLUMN: Final = _CALL_COLUMNS.index("outcome")


def _outcome_of(row: Sequence[Any]) -> object:
    """The outcome an llm_calls row read with `_SELECT_CALLS` holds, as stored."""
    return row[_OUTCOME_COLUMN]


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
        tier=stored_tier(row[8]),
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
        circuit_state=stored_circuit_state(row[27]),
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

    It reproduces `empathy_models._stats.aggregate_records` exactly (latencies and costs
    capped at its ``AVERAGE_CAP``, 1e300, in the averages; token sums as floats, which
    hold every total below 2**53 exactly and never overflow): nearest-rank
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
           SUM(min(cost_usd, 1e300)) OVER (PARTITION BY wf, st, model ORDER BY id
                               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS cost_sum,
           ROW_NUMBER() OVER (PARTITION BY wf, st, model ORDER BY id DESC) AS from_end,
           ROW_NUMBER() OVER (PARTITION BY wf, st, model ORDER BY ts_us DESC, id ASC) AS newest
    FROM base
),
groups AS (
    SELECT wf, st, model, COUNT(*) AS n, SUM(ok) AS successes,
           MAX(CASE WHEN from_end = 1 THEN cost_sum END) AS cost_sum,
           TOTAL(CASE WHEN ok THEN input_tokens ELSE 0 END) AS in_sum,
           TOTAL(CASE WHEN ok THEN output_tokens ELSE 0 END) AS out_sum,
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
           SUM(min(latency_ms, 1e300)) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
               AS lat_sum
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
    """The rollup of ``records`` as parameter rows of `_UPSERT_EVIDENCE`."""
    return [
        (*row[:12], _sqlite_int(row[12]), _sqlite_int(row[13]), row[14])  # no version
        for row in EvidenceBatch(buckets=rollup(records), version=0).rows
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


_EVIDENCE_VERSION: Final = "SELECT version FROM evidence_version"


def _evidence_query(
    since: datetime | None, until: datetime | None, after_version: int
) -> tuple[str, dict[str, Any]]:
    """The buckets changed after ``after_version``, as rows of `ROW_FIELDS`, unsorted."""
    clauses = ["version > :after"]
    params: dict[str, Any] = {"after": after_version}
    if since is not None:
        clauses.append("bucket_s >= :since")
        params["since"] = _ceil_s(since)
    if until is not None:
        clauses.append("bucket_s < :until")
        params["until"] = _ceil_s(until)
    columns = ", ".join((*_EVIDENCE_COLUMNS, "version"))
    sql = f"SELECT {columns} FROM evidence_buckets WHERE {' AND '.join(clauses)}"
    return sql, params
