"""
Telemetry in PostgreSQL: idempotent batched writes, SQL aggregation on an index of the
arms, and evidence rollups kept in the writing transaction.  Names and ids of any length
are stored: the indexes hold a prefix or a digest of them (see migration version 4).

Evidence versions follow commit order.  Each write transaction that changes buckets
takes the next number from a one-row counter table (``UPDATE ... RETURNING``) after its
insert, stamps its buckets with it and commits; the counter row stays locked until
that commit, so the transaction holding version n is visible before any other can even
take n + 1.  A reader that sees the counter at v (in the same statement, hence the same
snapshot, as the buckets) therefore sees every transaction numbered <= v and none
numbered above: passing v back returns each later change once and misses none, however
many processes commit concurrently.  (A plain sequence would not do: a transaction
holding 9 may commit after one holding 10 was read.)  The price is that writers queue
on the counter row from their bucket upsert to their commit, a few statements.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from empathy_models.abc import TelemetryBackend
from empathy_models.backends import (
    gc_paused,
    known_outcomes,
    refusals,
    stored_forms,
    stored_record,
    stored_tier,
)
from empathy_models.evidence import (
    BUCKET_SECONDS,
    SUM_FIELDS,
    EvidenceBatch,
    rollup,
)
from empathy_models.exceptions import (
    ConfigurationError,
    RecordValidationError,
    TelemetryError,
)
from empathy_models.records import LLMCallRecord, ModelPerformance, Outcome
from empathy_models.serialization import to_dict

from ._common import DEFAULT_TABLE_PREFIX, Database, build_migrations, text_digest as _digest
from ._spool_key import spool_target

__all__ = ["PostgresTelemetryBackend", "TELEMETRY_SCHEMA_VERSION"]


_PREFIX: Final = 200
"""
Characters of workflow and stage that the calls' index on them holds (at most 800
bytes each, so any name fits a btree entry); queries compare the whole names too.
"""
_KEY_V2: Final = (
    "bucket_start, (workflow IS NULL), coalesce(workflow, ''), "
    "(stage IS NULL), coalesce(stage, ''), model"
)
"""The evidence key of schema versions 2 and 3 (whole names: long ones did not fit)."""
_KEY: Final = ", ".join(
    (
        "bucket_start",
        "(workflow IS NULL)",
        _digest("coalesce(workflow, '')"),
        "(stage IS NULL)",
        _digest("coalesce(stage, '')"),
        _digest("model"),
    )
)
"""
One evidence bucket per key: its start and its names' digests (names of any length;
a NULL workflow or stage is its own key).
"""
_CAP: Final = "1e300::double precision"
"""
The most one latency or cost counts for in the averages and one cost in an evidence
bucket's sum, as `_stats.AVERAGE_CAP`.
"""
_MIN_MS: Final = "1e-3"  # empathy_models.evidence.log_ms floors durations at 1 microsecond
_SAMPLE_LIST: Final = ", ".join(f"'{o.value}'" for o in Outcome if o.is_sample)
_FINITE_TS: Final = "least(greatest(ts, '0001-01-01 00:00:00+00'), '9999-12-31 23:59:59.999999+00')"
"""
A call's ``ts`` as a finite time: asyncpg writes the first and the last aware datetime
(0001-01-01 00:00 and 9999-12-31 23:59:59.999999 UTC) as -infinity and infinity, which
this turns back into those times.
"""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND: Final = timedelta(seconds=1)

_MIGRATIONS: Final = (
    (
        "CREATE TABLE IF NOT EXISTS {t_calls} ("
        " seq bigserial PRIMARY KEY,"
        " call_id text NOT NULL,"
        " ts timestamptz NOT NULL,"
        " workflow text,"
        " stage text,"
        " provider text NOT NULL,"
        " model text NOT NULL,"
        " tier text,"
        " outcome text NOT NULL,"
        " latency_ms double precision NOT NULL,"
        " cost_usd double precision NOT NULL,"
        " input_tokens bigint NOT NULL,"
        " output_tokens bigint NOT NULL,"
        " record jsonb NOT NULL)",
        # the router's aggregation read only this index (filters, then the columns it
        # summed); replaced in version 4
        "CREATE INDEX IF NOT EXISTS {i_calls_aggregate} ON {t_calls}"
        " (workflow, stage, ts) INCLUDE"
        " (model, outcome, latency_ms, cost_usd, input_tokens, output_tokens, provider, tier,"
        " seq)",
        "CREATE INDEX IF NOT EXISTS {i_calls_ts} ON {t_calls} (ts, seq)",
    ),
    # version 2: evidence rollups (see empathy_models.evidence), built from the calls
    (
        "CREATE TABLE IF NOT EXISTS {t_evidence} ("
        " bucket_start timestamptz NOT NULL,"
        " workflow text,"
        " stage text,"
        " model text NOT NULL,"
        " samples bigint NOT NULL,"
        " successes bigint NOT NULL,"
        " latency_n bigint NOT NULL,"
        " latency_log_sum double precision NOT NULL,"
        " latency_log_sq_sum double precision NOT NULL,"
        " ttft_n bigint NOT NULL,"
        " ttft_log_sum double precision NOT NULL,"
        " ttft_log_sq_sum double precision NOT NULL,"
        # token sums as doubles: exact to 2**53, and a sum never overflows (fails a batch)
        " input_tokens double precision NOT NULL,"
        " output_tokens double precision NOT NULL,"
        " cost_usd double precision NOT NULL,"
        " version bigint NOT NULL)",
        # one row per key (a NULL workflow or stage is its own key, on any PostgreSQL
        # version); also the range index of since / until and purge
        f"CREATE UNIQUE INDEX IF NOT EXISTS {{i_evidence_key}} ON {{t_evidence}} ({_KEY_V2})",
        # evidence(after_version=v) is a range scan on version
        "CREATE INDEX IF NOT EXISTS {i_evidence_by_version} ON {t_evidence} (version)",
        "CREATE TABLE IF NOT EXISTS {t_evidence_version} ("
        " id integer PRIMARY KEY CHECK (id = 0), version bigint NOT NULL)",
        "INSERT INTO {t_evidence_version} (id, version) VALUES (0, 1) ON CONFLICT DO NOTHING",
        "INSERT INTO {t_evidence} ("
        " bucket_start, workflow, stage, model, samples, successes, latency_n,"
        " latency_log_sum, latency_log_sq_sum, ttft_n, ttft_log_sum, ttft_log_sq_sum,"
        " input_tokens, output_tokens, cost_usd, version) "
        # the bucket's start from whole seconds, in integers (exact on any server)
        f"SELECT to_timestamp(s - ((s % {BUCKET_SECONDS}) + {BUCKET_SECONDS}) % {BUCKET_SECONDS}),"
        " workflow, stage, model, count(*), count(*) FILTER (WHERE ok),"
        " count(*) FILTER (WHERE ok),"
        " coalesce(sum(lat) FILTER (WHERE ok), 0), coalesce(sum(lat * lat) FILTER (WHERE ok), 0),"
        " count(tt) FILTER (WHERE ok),"
        " coalesce(sum(tt) FILTER (WHERE ok), 0), coalesce(sum(tt * tt) FILTER (WHERE ok), 0),"
        " coalesce(sum(input_tokens) FILTER (WHERE ok), 0),"
        " coalesce(sum(output_tokens) FILTER (WHERE ok), 0),"
        f" sum(least(cost_usd, {_CAP})), 1 "
        f"FROM (SELECT extract(epoch FROM date_trunc('second', {_FINITE_TS}))::bigint AS s,"
        " workflow, stage, model, outcome = 'success' AS ok,"
        f" ln(greatest(latency_ms, {_MIN_MS})) AS lat,"
        # greatest() skips NULLs: a missing time to first token must stay NULL
        " CASE WHEN record->>'ttft_ms' IS NOT NULL THEN"
        f" ln(greatest((record->>'ttft_ms')::double precision, {_MIN_MS})) END AS tt,"
        " input_tokens, output_tokens, cost_usd"
        " FROM {t_calls}"
        f" WHERE outcome IN ({_SAMPLE_LIST})) AS calls "
        "GROUP BY 1, 2, 3, 4",
    ),
    # version 3: one row per call_id, so a record written twice (a replay of the spool
    # after a crash) is stored once; copies already stored twice keep their first row
    (
        "DELETE FROM {t_calls} AS a USING {t_calls} AS b"
        " WHERE a.call_id = b.call_id AND a.seq > b.seq",
        "CREATE UNIQUE INDEX IF NOT EXISTS {i_calls_call_id} ON {t_calls} (call_id)",
    ),
    # version 4: names of any length.  A btree entry holds about 2,700 bytes, and the
    # indexes held whole names: one long workflow, stage, model, provider or call_id
    # made the server refuse its record.  The calls are found by arm on a prefix of
    # workflow and stage, and kept unique by a digest of call_id; the evidence is keyed
    # on digests.  ({t_...} also qualifies an index's name, as DROP INDEX needs.)
    (
        "DROP INDEX IF EXISTS {t_calls_aggregate}",
        f"CREATE INDEX IF NOT EXISTS {{i_calls_by_arm}} ON {{t_calls}}"
        f" (left(workflow, {_PREFIX}), left(stage, {_PREFIX}), ts)",
        "DROP INDEX IF EXISTS {t_calls_call_id}",
        f"CREATE UNIQUE INDEX {{i_calls_call_id}} ON {{t_calls}} ({_digest('call_id')})",
        "DROP INDEX IF EXISTS {t_evidence_key}",
        f"CREATE UNIQUE INDEX {{i_evidence_key}} ON {{t_evidence}} ({_KEY})",
    ),
)

TELEMETRY_SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The schema version of the telemetry tables this code writes."""

_COLUMNS: Final = (
    "call_id",
    "ts",
    "workflow",
    "stage",
    "provider",
    "model",
    "tier",
    "outcome",
    "latency_ms",
    "cost_usd",
    "input_tokens",
    "output_tokens",
    "record",
)

_SAMPLES: Final = [o.value for o in Outcome if o.is_sample]

_ARRAY_TYPES: Final = (
    "text",
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "float8",
    "float8",
    "int8",
    "int8",
    "text",
)

# what building or sending a row raises when a record holds a value PostgreSQL cannot
# take (NUL or a lone surrogate in text, an integer past 64 bits, NaN in JSON, a value
# past one of the server's limits, such as an index entry's size in an index an
# operator added): the records are refused, the database is fine
_REFUSED: Final = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    UnicodeError,
    OverflowError,
    ValueError,
    TypeError,
)


def _outcome_of(data: Any) -> object:
    """The outcome a row's JSON holds (anything else, the record's own error, passes)."""
    return data.get("outcome", Outcome.FAILURE) if isinstance(data, dict) else Outcome.FAILURE


def _row(record: LLMCallRecord) -> tuple[Any, ...]:
    return (
        record.call_id,
        record.timestamp,
        record.workflow,
        record.stage,
        record.provider,
        record.model,
        None if record.tier is None else record.tier.value,
        record.outcome.value,
        float(record.latency_ms),
        float(record.cost_usd),
        record.input_tokens,
        record.output_tokens,
        json.dumps(to_dict(record), separators=(",", ":"), allow_nan=False),
    )


_EVIDENCE_COLUMNS: Final = ("bucket_start", "workflow", "stage", "model", *SUM_FIELDS)

_EVIDENCE_TYPES: Final = (
    "bigint",  # the bucket's start in seconds since the epoch (see `_evidence_columns`)
    "text",
    "text",
    "text",
    "bigint",
    "bigint",
    "bigint",
    "float8",
    "float8",
    "bigint",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
)


def _evidence_columns(rows: list[LLMCallRecord]) -> list[list[Any]]:
    """
    The rollup of ``rows`` as one list per column (for ``unnest``), in key order; the
    bucket starts in whole seconds since the epoch, which the upsert turns into times
    (asyncpg would write the first minute of year 1 as -infinity).
    """
    buckets = rollup(rows)
    return [
        [(b.bucket_start - _EPOCH) // _SECOND for b in buckets],
        [b.workflow for b in buckets],
        [b.stage for b in buckets],
        [b.model for b in buckets],
        [b.samples for b in buckets],
        [b.successes for b in buckets],
        [b.latency_n for b in buckets],
        [b.latency_log_sum for b in buckets],
        [b.latency_log_sq_sum for b in buckets],
        [b.ttft_n for b in buckets],
        [b.ttft_log_sum for b in buckets],
        [b.ttft_log_sq_sum for b in buckets],
        [float(b.input_tokens) for b in buckets],
        [float(b.output_tokens) for b in buckets],
        [b.cost_usd for b in buckets],
    ]


# a bucket as a row of `empathy_models.evidence.ROW_FIELDS` (its start in epoch seconds)
_EVIDENCE_ROW: Final = ", ".join(
    (
        "extract(epoch FROM bucket_start)::bigint",
        *_EVIDENCE_COLUMNS[1:],
        "version",
    )
)


class PostgresTelemetryBackend(TelemetryBackend):
    """
    Call records in a PostgreSQL table, shared by every process and host.

    The first operation creates the connection pool and migrates the tables under an
    advisory lock, so several processes may start at once.  `record_many` writes its
    records in one transaction: all of them or none.  A record whose ``call_id`` is
    already stored is skipped (writes are idempotent, so a replayed spool stores nothing
    twice).  Names and ids of any length are stored.  `aggregate` runs one SQL query,
    filtered on the index of (workflow, stage, ts) (``percentile_disc`` over successes
    is the nearest-rank percentile of the in-memory backends).  `purge` deletes by
    time, for retention.  Safe to share between tasks: each operation takes its own
    pooled connection.

    Args:
        dsn: a ``postgresql://`` (or ``postgres://``) URL as asyncpg takes it.
        schema: where the tables ``<table_prefix>calls`` and
            ``<table_prefix>schema_version`` are (created if missing; default: the
            connection's ``search_path``); may also be given in the DSN's query string.
        table_prefix: see ``schema``; may also be given in the DSN's query string.
        batch_size: rows per statement of `record_many`.
        create: ``False`` (read-only use, such as the CLI's reports) creates and
            migrates nothing: missing or outdated tables raise `TelemetryError` instead,
            so a misspelt schema is reported rather than created.
        **pool_options: passed to ``asyncpg.create_pool`` (``min_size``, ``max_size``,
            ``command_timeout``...).

    Raises:
        ConfigurationError: at construction, a bad argument, or an option that neither
            the backend nor ``asyncpg.create_pool`` takes.
        SchemaVersionError: tables written by a newer version.
        TelemetryRejectedError: a record holding a value PostgreSQL refuses (NUL or a
            lone surrogate in text, an integer past 64 bits, NaN in the metadata, a
            value past one of the server's limits, such as an index entry's size).
        TelemetryError: driver errors, with the password removed from the DSN.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        batch_size: int = 5_000,
        create: bool = True,
        **pool_options: Any,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self._db = Database(
            dsn,
            schema=schema,
            table_prefix=table_prefix,
            error_type=TelemetryError,
            component="telemetry",
            pool_options=pool_options,
            create=create,
            # read-only, a schema whose telemetry tables were never made (breakers or
            # budgets only) reads as empty, as a SQLite file does
            empty_when_missing=True,
        )
        self.batch_size = batch_size
        self._spool_targets = spool_target(
            self._db.target, self._db.pool_options, self._db.schema, self._db.table_prefix
        )
        self._calls = self._db.table("calls")
        self._evidence_table = self._db.table("evidence")
        self._evidence_version = self._db.table("evidence_version")
        self._bump_version = (
            f"UPDATE {self._evidence_version} SET version = version + 1 WHERE id = 0 "
            "RETURNING version"
        )
        columns = ", ".join(_EVIDENCE_COLUMNS)
        self._upsert_evidence = (
            f"INSERT INTO {self._evidence_table} ({columns}, version) "
            f"SELECT to_timestamp(bucket_s), {', '.join(_EVIDENCE_COLUMNS[1:])}, "
            f"${len(_EVIDENCE_COLUMNS) + 1}::bigint FROM unnest("
            + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_EVIDENCE_TYPES))
            + f") AS b (bucket_s, {', '.join(_EVIDENCE_COLUMNS[1:])}) "
            f"ON CONFLICT ({_KEY}) DO UPDATE SET "
            + ", ".join(
                f"{c} = {self._evidence_table}.{c} + excluded.{c}" for c in _EVIDENCE_COLUMNS[4:]
            )
            + ", version = excluded.version"
        )
        self._migrations = build_migrations(self._db, _MIGRATIONS)
        params = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_ARRAY_TYPES, 1))
        names = ", ".join(f"c{i}" for i in range(len(_COLUMNS)))
        values = ", ".join(f"c{i}" for i in range(len(_COLUMNS) - 1))
        self._insert = (
            f"INSERT INTO {self._calls} ({', '.join(_COLUMNS)}) "
            f"SELECT {values}, c{len(_COLUMNS) - 1}::jsonb "
            f"FROM unnest({params}) AS u({names}) "
            f"ON CONFLICT ({_digest('call_id')}) DO NOTHING RETURNING call_id"
        )

    def __repr__(self) -> str:
        return (
            f"PostgresTelemetryBackend({self._db.target!r}, schema={self._db.schema!r}, "
            f"table_prefix={self._db.table_prefix!r})"
        )

    @property
    def spool_target(self) -> str:
        """
        Names these tables (without credentials) for the batching engine's spool: the
        DSN shown, the schema and prefix, and a digest of what else picks them (the
        connection options, ``PG*`` environment variables: see `_spool_key`).
        """
        return self._spool_targets[0]

    @property
    def former_spool_targets(self) -> tuple[str, ...]:
        """The name earlier versions gave these tables' spool, replayed too, if another."""
        target, former = self._spool_targets
        return () if former == target else (former,)

    @property
    def persistent(self) -> bool:
        return True

    async def _aopen(self) -> None:
        await self._db.open(self._migrations)

    async def _aclose(self) -> None:
        await self._db.close()

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        """Store every record and its evidence in one transaction, or none of them."""
        self._check_open()
        rows = []
        where = f"PostgreSQL telemetry {self._db.target}"
        with refusals(_REFUSED, self._db.target, where):
            for r in records:
                if not isinstance(r, LLMCallRecord):
                    raise RecordValidationError(
                        f"expected an LLMCallRecord, got {type(r).__name__}"
                    )
                rows.append(_row(r))
        if not rows:
            return
        pool = await self._db.pool(self._migrations)
        with refusals(_REFUSED, self._db.target, where):
            async with (
                self._db.errors(f"writing {len(rows)} records"),
                self._db.connection(pool) as conn,
                self._db.transaction(conn),
            ):
                inserted = await self._insert_calls(conn, list(records), rows)
                await self._add_evidence(conn, _evidence_columns(inserted))

    async def _insert_calls(
        self, conn: Any, records: list[LLMCallRecord], rows: list[tuple[Any, ...]]
    ) -> list[LLMCallRecord]:
        """
        Insert ``rows`` (those of ``records``) inside the caller's transaction, skipping
        every ``call_id`` already stored; return the records actually inserted (what
        anything derived from the calls, such as rollups, must count, so that a replay
        counts nothing twice).
        """
        inserted: set[str] = set()
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            columns = (list(col) for col in zip(*chunk, strict=True))
            inserted.update(row[0] for row in await conn.fetch(self._insert, *columns))
        out = []
        for r in records:
            if r.call_id in inserted:
                inserted.discard(r.call_id)
                out.append(r)
        return out

    async def _add_evidence(self, conn: Any, columns: list[list[Any]]) -> None:
        """
        Add partial buckets to the stored ones, stamped with the next version (inside the
        writing transaction, last, so that the counter row is locked only until commit).
        """
        if not columns[0]:
            return
        version = await conn.fetchval(self._bump_version)
        await conn.execute(self._upsert_evidence, *columns, version)

    def _where(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None = None,
        model: str | None = None,
        samples_only: bool = False,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, value in (("workflow", workflow), ("stage", stage), ("model", model)):
            if value is None:
                continue
            if not value and column != "model":  # none: recorded as NULL or ""
                clauses.append(f"({column} IS NULL OR {column} = '')")
                continue
            # a record PostgreSQL refused (a NUL, a lone surrogate) was stored made safe:
            # a filter finds it by that form (`stored_forms`), never sends one it refuses
            params = []
            for form in stored_forms(value):
                if "\x00" not in form:
                    args.append(form)
                    params.append(f"${len(args)}::text")
            clauses.append(f"{column} IN ({', '.join(params)})")
            if column != "model":
                # what the index on (workflow, stage) prefixes can look up
                prefixes = ", ".join(f"left({p}, {_PREFIX})" for p in params)
                clauses.append(f"left({column}, {_PREFIX}) IN ({prefixes})")
        if since is not None:
            args.append(since)
            clauses.append(f"ts >= ${len(args)}")
        if until is not None:
            args.append(until)
            clauses.append(f"ts < ${len(args)}")
        if samples_only:
            args.append(_SAMPLES)
            clauses.append(f"outcome = ANY(${len(args)}::text[])")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        """
        Per-model performance from one SQL query: sample outcomes only, nearest-rank
        p50/p95 of latency and of the time to first token over successes
        (``percentile_disc``), sorted by (workflow, stage, model).  The latency and cost
        averages are capped sums over counts: ``avg(float8)`` also sums squares, which
        overflow for a value past about 1e154 beside a different one.  First and last
        seen are read as finite times (`_FINITE_TS`): asyncpg reads the infinities it
        stores for the calendar's ends back as naive datetimes.
        """
        where, args = self._where(
            workflow=workflow, stage=stage, since=since, until=until, samples_only=True
        )
        stage_expr = "coalesce(stage, '')" if per_stage else "''"
        order_stage = f', {stage_expr} COLLATE "C"' if per_stage else ""
        ok = "FILTER (WHERE outcome = 'success')"
        ttft = "(record->>'ttft_ms')::double precision"
        ok_ttft = f"FILTER (WHERE outcome = 'success' AND {ttft} IS NOT NULL)"
        query = (
            "SELECT coalesce(workflow, '') AS wf, "
            f"{stage_expr} AS st, model, "
            "count(*) AS n, "
            f"count(*) {ok} AS ok, "
            f"percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms) {ok} AS p50, "
            f"percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms) {ok} AS p95, "
            f"sum(least(latency_ms, {_CAP}) ORDER BY latency_ms) {ok}"
            f" / nullif(count(*) {ok}, 0) AS avg_latency, "
            f"percentile_disc(0.5) WITHIN GROUP (ORDER BY {ttft}) {ok_ttft} AS t50, "
            f"percentile_disc(0.95) WITHIN GROUP (ORDER BY {ttft}) {ok_ttft} AS t95, "
            f"sum(least(cost_usd, {_CAP}) ORDER BY seq) / count(*) AS avg_cost, "
            f"avg(input_tokens::float8) {ok} AS avg_in, "
            f"avg(output_tokens::float8) {ok} AS avg_out, "
            f"min({_FINITE_TS}) AS first_seen, max({_FINITE_TS}) AS last_seen, "
            "(array_agg(provider ORDER BY ts DESC, seq ASC))[1] AS provider, "
            "(array_agg(tier ORDER BY ts DESC, seq ASC))[1] AS tier "
            f"FROM {self._calls}{where} "
            "GROUP BY 1, 2, 3 "
            f'ORDER BY coalesce(workflow, \'\') COLLATE "C"{order_stage}, model COLLATE "C"'
        )
        if await self._db.absent(self._migrations):
            return []
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("aggregate"):
            rows = await self._db.run(pool, "fetch", query, *args)
        return [
            ModelPerformance(
                model=row["model"],
                provider=row["provider"],
                workflow=row["wf"] or None,
                stage=(row["st"] or None) if per_stage else None,
                tier=stored_tier(row["tier"]),
                sample_size=int(row["n"]),
                successes=int(row["ok"]),
                latency_p50_ms=row["p50"],
                latency_p95_ms=row["p95"],
                avg_latency_ms=row["avg_latency"],
                ttft_p50_ms=row["t50"],
                ttft_p95_ms=row["t95"],
                avg_cost_usd=float(row["avg_cost"]),
                avg_input_tokens=float(row["avg_in"] or 0.0),
                avg_output_tokens=float(row["avg_out"] or 0.0),
                first_seen=row["first_seen"],
                last_seen=row["last_seen"],
            )
            for row in rows
        ]

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
        """The ``limit`` newest matching records, newest first (ties: last written first)."""
        where, args = self._where(
            workflow=workflow,
            stage=stage,
            since=since,
            until=until,
            model=model,
            samples_only=samples_only,
        )
        args.append(min(limit, 2**63 - 1))  # no table holds more rows: the same answer
        query = (
            f"SELECT record FROM {self._calls}{where} ORDER BY ts DESC, seq DESC LIMIT ${len(args)}"
        )
        if await self._db.absent(self._migrations):
            return []
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("recent"):
            rows = await self._db.run(pool, "fetch", query, *args)
        try:
            where = f"PostgreSQL telemetry {self._db.target}"
            datas = known_outcomes([json.loads(row["record"]) for row in rows], _outcome_of, where)
            return [stored_record(data) for data in datas]
        except (ValueError, RecordValidationError) as exc:
            raise TelemetryError(
                f"PostgreSQL telemetry {self._db.target}: unreadable record: {exc}",
                target=self._db.target,
            ) from exc

    async def _spend(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> dict[tuple[str | None, str | None, str], float]:
        """What the matching calls cost, every outcome, summed in SQL."""
        where, args = self._where(workflow=workflow, stage=stage, since=since, until=until)
        query = (
            "SELECT coalesce(workflow, '') AS wf, coalesce(stage, '') AS st, model, "
            f"sum(least(cost_usd, {_CAP})) AS cost FROM {self._calls}{where} GROUP BY 1, 2, 3"
        )
        if await self._db.absent(self._migrations):
            return {}
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("spend"):
            rows = await self._db.run(pool, "fetch", query, *args)
        return {
            (row["wf"] or None, row["st"] or None, row["model"]): float(row["cost"]) for row in rows
        }

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        """
        Evidence buckets changed after ``after_version`` (see the module docstring for why
        none is missed under concurrent writers): the counter and the buckets are read in
        one repeatable-read snapshot, over the index on version (incremental reads) or
        on bucket start (windows).
        """
        args: list[Any] = [after_version]
        clauses = ["version > $1"]
        if since is not None:
            args.append(since)
            clauses.append(f"bucket_start >= ${len(args)}")
        if until is not None:
            args.append(until)
            clauses.append(f"bucket_start < ${len(args)}")
        # unsorted: EvidenceBatch sorts its buckets only when they are read
        query = f"SELECT {_EVIDENCE_ROW} FROM {self._evidence_table} WHERE {' AND '.join(clauses)}"
        if await self._db.absent(self._migrations):
            return EvidenceBatch.from_rows((), 0)
        pool = await self._db.pool(self._migrations)
        async with (
            self._db.errors("evidence"),
            self._db.connection(pool) as conn,
            # one snapshot for the counter and the buckets
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            # compiling the scan of a whole window costs more than running it
            await conn.execute("SET LOCAL jit = off")
            version = await conn.fetchval(f"SELECT version FROM {self._evidence_version}")
            with gc_paused() if after_version == 0 else contextlib.nullcontext():
                rows = await conn.fetch(query, *args)
        return EvidenceBatch.from_rows(rows, int(version))

    async def _purge(self, *, before: datetime) -> int:
        """
        Delete the records older than ``before`` and the evidence buckets that end at or
        before it, in one transaction; return how many records were deleted.  Rows
        another session holds (a purge running at the same time) are left to it.
        """
        if await self._db.absent(self._migrations):
            return 0
        pool = await self._db.pool(self._migrations)
        # in whole seconds: exact, defined within year 1's first minute, and never the
        # infinity asyncpg sends for the last datetime (whose bucket ends after it)
        last_start = (before - _EPOCH) // _SECOND - BUCKET_SECONDS
        async with (
            self._db.errors("purge"),
            self._db.connection(pool) as conn,
            self._db.transaction(conn),
        ):
            # the rows another session holds (its own purge, under way; a write to an
            # old bucket) are skipped, not waited for, and left to a later purge:
            # two purges deleting the same rows in different orders would deadlock
            status = await conn.execute(_skip_locked(self._calls, "ts < $1"), before)
            await conn.execute(
                _skip_locked(self._evidence_table, "bucket_start <= to_timestamp($1)"),
                last_start,
            )
        return int(str(status).rsplit(" ", 1)[-1])

    async def drop_tables(self) -> None:
        """Drop this backend's tables (for tests and decommissioning); irreversible."""
        self._check_open()
        pool = await self._db.pool(self._migrations)
        async with (
            self._db.errors("drop"),
            self._db.connection(pool) as conn,
            self._db.transaction(conn),
        ):
            await conn.execute(f"DROP TABLE IF EXISTS {self._calls}")
            await conn.execute(f"DROP TABLE IF EXISTS {self._evidence_table}")
            await conn.execute(f"DROP TABLE IF EXISTS {self._evidence_version}")
            await conn.execute(
                f"DELETE FROM {self._db.table('schema_version')} WHERE component = $1",
                self._db.component,
            )


def _skip_locked(table: str, condition: str) -> str:
    """A ``DELETE`` of ``table``'s rows that meet ``condition``, but those another session
    has locked (``FOR UPDATE SKIP LOCKED``)."""
    return (
        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
        f"WHERE {condition} FOR UPDATE SKIP LOCKED))"
    )
